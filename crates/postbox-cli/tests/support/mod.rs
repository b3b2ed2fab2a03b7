//! Helpers shared by the binary's tests: the binary under test, with
//! nothing from the environment, and databases of their own on the shared
//! servers.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use postbox_testkit::services::{MARIADB, POSTGRES};
use sqlx::Connection;

/// The `postbox` binary, with no store or publisher from the environment.
pub fn postbox() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_postbox"));
    c.env_remove("POSTBOX_STORE_URL")
        .env_remove("POSTBOX_PUBLISH_URL")
        .env_remove("POSTBOX_STORE_RETAIN_SENT")
        .env_remove("POSTBOX_TABLE")
        .env_remove("POSTBOX_WEBHOOK_SECRET")
        .env_remove("POSTBOX_METRICS_ADDR")
        .env_remove("POSTBOX_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env("POSTBOX_LOG", "warn");
    c
}

pub fn run(args: &[&str]) -> Output {
    postbox().args(args).output().expect("run postbox")
}

pub fn code(o: &Output) -> i32 {
    o.status.code().expect("exit code")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", fastrand::u64(..))
}

/// A fresh PostgreSQL database (trust auth); returns its URL.
pub async fn pg_database() -> String {
    let addr = POSTGRES.require().await;
    let name = unique("postbox_bad");
    for role in ["postgres", "root"] {
        let admin = format!("postgres://{role}@{addr}/postgres");
        if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut c)
                .await
                .expect("create database");
            return format!("postgres://{role}@{addr}/{name}");
        }
    }
    panic!("PostgreSQL at {addr} accepts neither role postgres nor root (trust auth expected)");
}

/// A fresh MariaDB database (root, no password); returns its URL.
pub async fn mysql_database() -> String {
    let addr = MARIADB.require().await;
    let name = unique("postbox_bad");
    let mut c = sqlx::MySqlConnection::connect(&format!("mysql://root@{addr}/"))
        .await
        .expect("connect to MariaDB as root");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut c)
        .await
        .expect("create database");
    format!("mysql://root@{addr}/{name}")
}

/// Drops a database made by [`pg_database`] or [`mysql_database`] (best
/// effort: a failed test should show its own error, not this one).
pub async fn drop_database(url: &str) {
    let Some((server, name)) = url.rsplit_once('/') else {
        return;
    };
    if url.starts_with("postgres") {
        if let Ok(mut c) = sqlx::PgConnection::connect(&format!("{server}/postgres")).await {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut c)
                .await;
        }
    } else if let Ok(mut c) = sqlx::MySqlConnection::connect(&format!("{server}/")).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(&mut c)
            .await;
    }
}

/// Sends `sig` (e.g. "TERM") to a child.
pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success(), "kill -{sig} {}", child.id());
}

/// Waits up to `limit` for `child` to exit; kills it and panics otherwise.
pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("postbox did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
