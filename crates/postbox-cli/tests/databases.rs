//! The `postbox` binary against real PostgreSQL and MariaDB servers, each
//! test in a database of its own.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use postbox_testkit::services::{MARIADB, POSTGRES};
use sqlx::Connection;
use support::{drop_database, pg_database, postbox, run, stderr, unique};

#[tokio::test]
async fn postgres_migrate_enqueue_relay_status() {
    let url = pg_database().await;
    let o = run(&["migrate", "--store", &url]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for i in 0..20 {
        let key = format!("k{}", i % 4);
        let payload = format!("{i}");
        let o = run(&[
            "enqueue",
            "--store",
            &url,
            "--topic",
            "t.x",
            "--key",
            &key,
            "--payload",
            &payload,
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.jsonl");
    let mut relay = postbox()
        .args(["relay", "--store", &url, "--poll-interval", "20ms"])
        .arg("--publish")
        .arg(format!("file://{}", out.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("relay");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&out)
        .unwrap_or_default()
        .lines()
        .count()
        < 20
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()
        .expect("kill");
    assert_eq!(relay.wait().expect("wait").code(), Some(0));
    let text = std::fs::read_to_string(&out).expect("output");
    let mut last = std::collections::HashMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json");
        let n: i64 = v["payload"].as_str().expect("payload").parse().expect("n");
        let k = v["key"].as_str().expect("key").to_owned();
        if let Some(prev) = last.insert(k.clone(), n) {
            assert!(prev < n, "key {k}: {n} after {prev}");
        }
    }
    assert_eq!(text.lines().count(), 20);

    // A transaction holding a key shows up in `status` with its pid.
    let mut holder = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::query("BEGIN")
        .execute(&mut holder)
        .await
        .expect("begin");
    sqlx::query("INSERT INTO postbox_outbox (topic, key, payload) VALUES ('t', 'held', 'x')")
        .execute(&mut holder)
        .await
        .expect("insert");
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await
        .expect("pid");
    let o = run(&["status", "--store", &url]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains(&format!("pid {pid}")), "{text}");
    assert!(
        text.contains("dead rows since the table was last vacuumed"),
        "{text}"
    );
    let o = run(&["status", "--store", &url, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["blockers"][0]["pid"], pid);
    assert!(v["vacuum"]["dead_rows"].is_u64(), "{v}");
    assert!(v["vacuum"]["autovacuum"].is_boolean(), "{v}");
    assert_eq!(v["pending"], 0, "an uncommitted row is not pending");
    sqlx::query("ROLLBACK")
        .execute(&mut holder)
        .await
        .expect("rollback");
    drop(holder);
    drop_database(&url).await;
}

#[tokio::test]
async fn postgres_bad_credentials_and_missing_database_exit_2_without_the_password() {
    let addr = POSTGRES.require().await;
    let missing = format!("postgres://postgres:s3cret-pw@{addr}/no_such_db_postbox");
    let o = run(&["migrate", "--store", &missing]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("no_such_db_postbox"), "{}", stderr(&o));
    assert!(
        !stderr(&o).contains("s3cret-pw"),
        "password leaked: {}",
        stderr(&o)
    );
}

#[tokio::test]
async fn unreachable_database_exits_1_naming_host_and_port() {
    // nothing listens on port 1
    let started = Instant::now();
    let o = run(&["status", "--store", "postgres://u:pw-secret@127.0.0.1:1/x"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("127.0.0.1:1"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("pw-secret"), "{}", stderr(&o));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "one-shot commands give up after a few seconds"
    );
}

#[tokio::test]
async fn mariadb_migrate_enqueue_status() {
    let addr = MARIADB.require().await;
    let name = unique("postbox_cli");
    let mut admin = sqlx::MySqlConnection::connect(&format!("mysql://root@{addr}/test"))
        .await
        .expect("connect to MariaDB as root");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create database");
    let url = format!("mysql://root@{addr}/{name}");
    for args in [
        vec!["migrate", "--store", &url],
        vec![
            "enqueue",
            "--store",
            &url,
            "--topic",
            "t",
            "--key",
            "k",
            "--payload",
            "p",
        ],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    }
    let o = run(&["status", "--store", &url, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["pending"], 1);
    sqlx::query(&format!("DROP DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("drop");
}
