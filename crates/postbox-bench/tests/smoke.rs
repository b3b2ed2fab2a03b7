//! Smoke runs: every scenario completes with tiny sizes against the real
//! services and prints its JSON lines. Timings are never asserted.

use std::process::Command;

use postbox_testkit::services::{KAFKA, MARIADB, NATS, POSTGRES};

/// A fresh database name per test, so parallel tests and a concurrent
/// benchmark run never share tables.
fn db_name(scenario: &str) -> String {
    format!(
        "postbox_bench_smoke_{}_{:08x}",
        scenario.replace('-', "_"),
        fastrand::u32(..)
    )
}

async fn pg_url(db: &str) -> String {
    let addr = POSTGRES.require().await;
    for role in ["postgres", "root"] {
        let url = format!("postgres://{role}@{addr}/postgres");
        if <sqlx::PgConnection as sqlx::Connection>::connect(&url)
            .await
            .is_ok()
        {
            return format!("postgres://{role}@{addr}/{db}");
        }
    }
    panic!("PostgreSQL at {addr} accepts neither role postgres nor root (trust auth expected)");
}

async fn drop_pg(url: &str, db: &str) {
    let admin = match url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/postgres"),
        None => return,
    };
    if let Ok(mut c) = <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&mut c)
            .await;
    }
}

/// Runs `postbox-bench <scenario>` with tiny sizes; returns its JSON lines.
fn run(scenario: &str, pg_url: &str, mysql_url: &str) -> Vec<serde_json::Value> {
    run_with(scenario, pg_url, mysql_url, &[])
}

fn run_with(
    scenario: &str,
    pg_url: &str,
    mysql_url: &str,
    extra: &[String],
) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_postbox-bench"))
        .args([
            scenario, "--rows", "2000", "--repeat", "1", "--batch", "100,1000", "--secs", "0.5",
            "--big", "20000", "--claims", "3",
        ])
        .args(["--pg-url", pg_url, "--mysql-url", mysql_url])
        .args(extra)
        .output()
        .expect("run postbox-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "postbox-bench {scenario} failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert!(
        !lines.is_empty(),
        "no JSON lines from {scenario}:\n{stdout}"
    );
    for l in &lines {
        assert_eq!(l["scenario"].as_str(), Some(scenario), "{l}");
        assert!(l["postbox_value"].as_f64().is_some(), "{l}");
        assert!(l["goal"].is_string(), "{l}");
    }
    assert!(stdout.contains("| scenario"), "no table:\n{stdout}");
    lines
}

async fn pg_scenario(scenario: &str) -> Vec<serde_json::Value> {
    pg_scenario_with(scenario, Vec::new()).await
}

async fn pg_scenario_with(scenario: &str, extra: Vec<String>) -> Vec<serde_json::Value> {
    let db = db_name(scenario);
    let url = pg_url(&db).await;
    let lines = tokio::task::spawn_blocking({
        let (scenario, url) = (scenario.to_owned(), url.clone());
        move || run_with(&scenario, &url, "mysql://unused@127.0.0.1/unused", &extra)
    })
    .await
    .expect("join");
    drop_pg(&url, &db).await;
    lines
}

#[tokio::test]
async fn drain_completes() {
    let lines = pg_scenario("drain").await;
    // C1 and C2 at each of the two batch sizes, with throughput fields
    assert_eq!(lines.len(), 4);
    assert!(
        lines
            .iter()
            .all(|l| l["ceiling_msgs_per_s"].as_f64().is_some())
    );
}

#[tokio::test]
async fn drain_keyed_completes() {
    assert_eq!(pg_scenario("drain-keyed").await.len(), 2);
}

#[tokio::test]
async fn enqueue_completes() {
    assert_eq!(pg_scenario("enqueue").await.len(), 4);
}

#[tokio::test]
async fn latency_completes() {
    assert_eq!(pg_scenario("latency").await.len(), 4);
}

#[tokio::test]
async fn relays_complete() {
    assert_eq!(pg_scenario("relays").await.len(), 3);
}

#[tokio::test]
async fn claim_cost_completes() {
    assert_eq!(pg_scenario("claim-cost").await.len(), 3);
}

#[tokio::test]
async fn dead_tuples_completes() {
    // postbox keyless, postbox keyed, C2
    assert_eq!(pg_scenario("dead-tuples").await.len(), 3);
}

#[tokio::test]
async fn memory_completes() {
    // idle, then busy at each batch size
    assert_eq!(pg_scenario("memory").await.len(), 3);
}

#[tokio::test]
async fn sqlite_completes() {
    let lines = tokio::task::spawn_blocking(|| {
        run(
            "sqlite",
            "postgres://unused@127.0.0.1/unused",
            "mysql://unused@127.0.0.1/unused",
        )
    })
    .await
    .expect("join");
    assert_eq!(lines.len(), 4);
}

#[tokio::test]
async fn mysql_completes() {
    let addr = MARIADB.require().await;
    let db = db_name("mysql");
    let url = format!("mysql://root@{addr}/{db}");
    let lines = tokio::task::spawn_blocking({
        let url = url.clone();
        move || run("mysql", "postgres://unused@127.0.0.1/unused", &url)
    })
    .await
    .expect("join");
    assert_eq!(lines.len(), 4);
    if let Ok(mut c) =
        <sqlx::MySqlConnection as sqlx::Connection>::connect(&format!("mysql://root@{addr}/mysql"))
            .await
    {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS `{db}`"))
            .execute(&mut c)
            .await;
    }
}

#[tokio::test]
async fn brokers_complete() {
    let nats = NATS.require().await;
    let kafka = KAFKA.require().await;
    let lines = pg_scenario_with(
        "brokers",
        vec![
            "--nats-url".into(),
            format!("nats://{nats}"),
            "--kafka-brokers".into(),
            kafka,
        ],
    )
    .await;
    // per batch size (2) and broker (2): vs min(C1, broker), vs min(C2,
    // broker), vs postbox to the null publisher
    assert_eq!(lines.len(), 12);
    for l in &lines {
        let extra = &l["extra"];
        assert!(extra["broker_ceiling_msgs_per_s"].as_f64().is_some(), "{l}");
        assert!(extra["c1_msgs_per_s"].as_f64().is_some(), "{l}");
        assert!(
            extra["postbox_profile"]["publish_ms_mean"]
                .as_f64()
                .is_some(),
            "{l}"
        );
    }
    for broker in ["nats", "kafka"] {
        assert!(
            lines
                .iter()
                .any(|l| l["variant"].as_str().is_some_and(|v| v.starts_with(broker))),
            "no {broker} line"
        );
    }
}
