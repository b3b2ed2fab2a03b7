//! SQLite drain: C1 and C2 on the table `postbox_sqlite::migrate` creates,
//! then postbox's `SqliteStore`, in one file database (WAL, synchronous =
//! NORMAL, as `SqliteStore::connect` opens the relay's own pool; rows are
//! loaded through a pool of the same settings).

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use postbox_core::Relay;
use postbox_sqlite::SqliteStore;
use serde_json::json;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Opts;
use crate::report::{Better, Goal, Line, emit};
use crate::util::{CountingPublisher, RawMessage, null_publish, parse_headers, progress, rate};

const C1_SQL: &str = "DELETE FROM postbox_outbox WHERE seq IN (
        SELECT seq FROM postbox_outbox WHERE status = 'pending' ORDER BY seq LIMIT ?1)
    RETURNING seq, id, topic, key, payload, headers";

const C2_LEASE_SQL: &str = "UPDATE postbox_outbox
       SET attempts = attempts + 1, lease_token = ?2, lease_until = ?3
     WHERE seq IN (
        SELECT seq FROM postbox_outbox
         WHERE status = 'pending' AND (lease_until IS NULL OR lease_until <= ?4)
         ORDER BY seq LIMIT ?1)
    RETURNING seq, id, topic, key, payload, headers";

const C2_DELETE_SQL: &str = "DELETE FROM postbox_outbox
     WHERE seq IN (SELECT value FROM json_each(?1)) AND lease_token = ?2";

fn raw(r: &SqliteRow) -> Result<RawMessage> {
    Ok(RawMessage {
        seq: r.try_get("seq")?,
        id: r.try_get("id")?,
        topic: r.try_get("topic")?,
        key: r.try_get("key")?,
        payload: r.try_get("payload")?,
        headers: parse_headers(r.try_get::<&str, _>("headers")?),
    })
}

fn now_us() -> i64 {
    postbox_core::to_unix_micros(std::time::SystemTime::now())
}

async fn pool(url: &str, n: u32) -> Result<SqlitePool> {
    let opts = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(5));
    Ok(SqlitePoolOptions::new()
        .max_connections(n)
        .connect_with(opts)
        .await?)
}

async fn load(pool: &SqlitePool, n: u64) -> Result<()> {
    sqlx::query("DELETE FROM postbox_outbox")
        .execute(pool)
        .await?;
    sqlx::query(
        "WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < ?1)
         INSERT INTO postbox_outbox (topic, key, payload, headers)
         SELECT 'bench.event', NULL,
                CAST('{\"id\":' || x || ',\"pad\":\"' || replace(hex(zeroblob(90)), '0', 'x') || '\"}' AS BLOB),
                '{\"content-type\":\"application/json\"}'
           FROM g",
    )
    .bind(i64::try_from(n)?)
    .execute(pool)
    .await?;
    sqlx::raw_sql("ANALYZE; PRAGMA wal_checkpoint(TRUNCATE);")
        .execute(pool)
        .await?;
    Ok(())
}

async fn ceiling(pool: &SqlitePool, c2: bool, n: u64, batch: usize) -> Result<Duration> {
    let limit = i64::try_from(batch)?;
    let start = Instant::now();
    let mut done = 0u64;
    loop {
        let got = if c2 {
            let token = Uuid::new_v4();
            let now = now_us();
            let rows = sqlx::query(C2_LEASE_SQL)
                .bind(limit)
                .bind(token)
                .bind(now + 30_000_000)
                .bind(now)
                .fetch_all(pool)
                .await?;
            let msgs = rows.iter().map(raw).collect::<Result<Vec<_>>>()?;
            null_publish(&msgs);
            let seqs = serde_json::to_string(&msgs.iter().map(|m| m.seq).collect::<Vec<_>>())?;
            let deleted = sqlx::query(C2_DELETE_SQL)
                .bind(seqs)
                .bind(token)
                .execute(pool)
                .await?
                .rows_affected();
            ensure!(deleted == msgs.len() as u64, "C2 lost a lease");
            msgs.len()
        } else {
            let rows = sqlx::query(C1_SQL).bind(limit).fetch_all(pool).await?;
            let msgs = rows.iter().map(raw).collect::<Result<Vec<_>>>()?;
            null_publish(&msgs)
        };
        if got == 0 {
            break;
        }
        done += got as u64;
    }
    ensure!(done == n, "ceiling drained {done} of {n}");
    Ok(start.elapsed())
}

async fn postbox(url: &str, n: u64, batch: usize, concurrency: usize) -> Result<Duration> {
    let store = SqliteStore::connect(url).await?;
    let done = CancellationToken::new();
    let publisher = Arc::new(CountingPublisher::new(n, done.clone()));
    let relay = Relay::builder(store, publisher)
        .batch_size(batch)
        .concurrency(concurrency)
        .build()?;
    let watchdog = {
        let done = done.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(120 + n / 1_000)).await;
            done.cancel();
        })
    };
    let start = Instant::now();
    let report = relay.run(done).await;
    let took = start.elapsed();
    watchdog.abort();
    relay.store().pool().close().await;
    if report.sent != n {
        bail!("postbox (SQLite) sent {} of {n}", report.sent);
    }
    Ok(took)
}

/// sqlite: C1 and C2 (one connection: SQLite has one writer) against the
/// relay at each batch size.
pub(crate) async fn sqlite(o: &Opts, lines: &mut Vec<Line>) -> Result<()> {
    let dir = o.sqlite_dir.clone().unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("postbox-bench-{:016x}.db", fastrand::u64(..)));
    let url = format!("sqlite://{}", path.display());
    let result = async {
        let admin = pool(&url, 1).await?;
        postbox_sqlite::migrate(&admin).await?;
        let n = o.rows;
        for &batch in &o.batches {
            let (mut c1, mut c2, mut pb) = (vec![], vec![], vec![]);
            for rep in 1..=o.repeat {
                progress!("sqlite batch {batch}: repeat {rep}/{}", o.repeat);
                load(&admin, n).await?;
                c1.push(rate(n, ceiling(&admin, false, n, batch).await?));
                load(&admin, n).await?;
                c2.push(rate(n, ceiling(&admin, true, n, batch).await?));
                load(&admin, n).await?;
                pb.push(rate(n, postbox(&url, n, batch, o.concurrency).await?));
            }
            let extra = json!({"rows": n, "batch": batch, "ceiling_connections": 1,
                               "relay_concurrency": o.concurrency});
            let variant = format!("keyless, batch {batch}");
            emit(
                lines,
                Line::new(
                    "sqlite",
                    &variant,
                    "C1 DELETE…RETURNING",
                    "msg/s",
                    Better::Higher,
                    c1,
                    pb.clone(),
                    Goal::RatioAtLeast(0.6),
                )
                .extra(extra.clone()),
            );
            emit(
                lines,
                Line::new(
                    "sqlite",
                    &variant,
                    "C2 lease UPDATE…RETURNING + DELETE",
                    "msg/s",
                    Better::Higher,
                    c2,
                    pb,
                    Goal::RatioAtLeast(1.5),
                )
                .extra(extra),
            );
        }
        admin.close().await;
        anyhow::Ok(())
    }
    .await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    result
}
