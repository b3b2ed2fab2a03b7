//! MySQL / MariaDB drain: C1 and C2 on the table `postbox_mysql::migrate`
//! creates, then postbox's `MySqlStore`. Neither server has
//! `DELETE … RETURNING` over a locking subquery of the same table, so C1 is
//! the shortest at-most-once form there is: one transaction of
//! `SELECT … FOR UPDATE SKIP LOCKED` and `DELETE`.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use postbox_core::{Ident, Relay};
use postbox_mysql::MySqlStore;
use serde_json::json;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions, MySqlRow};
use sqlx::{Connection, Executor, MySqlPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Opts;
use crate::report::{Better, Goal, Line, emit};
use crate::util::{CountingPublisher, RawMessage, null_publish, parse_headers, progress, rate};

const BEGIN_RC: &str = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION";

const C1_SELECT: &str =
    "SELECT `seq`, `id`, `topic`, `key`, `payload`, `headers` FROM postbox_outbox
     WHERE `status` = 'pending' ORDER BY `seq` LIMIT ? FOR UPDATE SKIP LOCKED";

const C2_SELECT: &str =
    "SELECT `seq`, `id`, `topic`, `key`, `payload`, `headers` FROM postbox_outbox
     WHERE `status` = 'pending' AND (`lease_until` IS NULL OR `lease_until` <= UTC_TIMESTAMP(6))
     ORDER BY `seq` LIMIT ? FOR UPDATE SKIP LOCKED";

fn raw(r: &MySqlRow) -> Result<RawMessage> {
    Ok(RawMessage {
        seq: r.try_get("seq")?,
        id: Uuid::from_slice(&r.try_get_unchecked::<Vec<u8>, _>("id")?)?,
        topic: r.try_get_unchecked("topic")?,
        key: r.try_get_unchecked("key")?,
        payload: r.try_get_unchecked("payload")?,
        headers: parse_headers(&r.try_get_unchecked::<String, _>("headers")?),
    })
}

fn in_list(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// Drops and recreates the database named in `url`, migrates it.
async fn reset(url: &str) -> Result<MySqlPool> {
    let opts = MySqlConnectOptions::from_str(url).context("bad MySQL URL")?;
    let db = opts.get_database().unwrap_or("postbox_bench").to_owned();
    let db = Ident::new(&db).with_context(|| format!("database name {db:?}"))?;
    let mut admin = sqlx::MySqlConnection::connect_with(&opts.clone().database("mysql"))
        .await
        .with_context(|| format!("connecting to {}", postbox_mysql::redact_url(url)))?;
    admin
        .execute(sqlx::raw_sql(&format!(
            "DROP DATABASE IF EXISTS `{db}`; CREATE DATABASE `{db}`"
        )))
        .await?;
    admin.close().await?;
    let pool = MySqlPoolOptions::new()
        .max_connections(8)
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    .await?;
                Ok(())
            })
        })
        .connect_with(opts)
        .await?;
    postbox_mysql::migrate(&pool).await?;
    Ok(pool)
}

async fn load(pool: &MySqlPool, n: u64) -> Result<()> {
    sqlx::query("DELETE FROM postbox_outbox")
        .execute(pool)
        .await?;
    let mut conn = pool.acquire().await?;
    // MariaDB and MySQL name the recursion limit differently; set both.
    let _ = conn
        .execute("SET SESSION max_recursive_iterations = 100000000")
        .await;
    let _ = conn
        .execute("SET SESSION cte_max_recursion_depth = 100000000")
        .await;
    let mut from = 1u64;
    while from <= n {
        let to = (from + 99_999).min(n);
        sqlx::query(
            "INSERT INTO postbox_outbox (`topic`, `payload`, `headers`)
             WITH RECURSIVE g (x) AS (SELECT ? UNION ALL SELECT x + 1 FROM g WHERE x < ?)
             SELECT 'bench.event',
                    CONCAT('{\"id\":', x, ',\"pad\":\"', REPEAT('x', 180), '\"}'),
                    '{\"content-type\":\"application/json\"}'
               FROM g",
        )
        .bind(i64::try_from(from)?)
        .bind(i64::try_from(to)?)
        .execute(&mut *conn)
        .await
        .context("loading the MySQL backlog")?;
        from = to + 1;
    }
    conn.execute("ANALYZE TABLE postbox_outbox").await?;
    Ok(())
}

/// A hand-written consumer retries InnoDB deadlocks (1213) and lock wait
/// timeouts (1205), as any MySQL client must.
fn retryable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<sqlx::Error>()
        .and_then(|e| e.as_database_error())
        .and_then(|d| d.code())
        .is_some_and(|c| matches!(c.as_ref(), "40001" | "1213" | "1205"))
}

async fn worker(pool: MySqlPool, c2: bool, batch: usize, done: Arc<AtomicU64>) -> Result<()> {
    let mut retries = 0u32;
    loop {
        match worker_pass(&pool, c2, batch, &done).await {
            Ok(()) => return Ok(()),
            Err(e) if retryable(&e) && retries < 1000 => retries += 1,
            Err(e) => return Err(e),
        }
    }
}

async fn worker_pass(pool: &MySqlPool, c2: bool, batch: usize, done: &AtomicU64) -> Result<()> {
    let limit = i64::try_from(batch)?;
    loop {
        let mut tx = pool.begin_with(BEGIN_RC).await?;
        let rows = sqlx::query(if c2 { C2_SELECT } else { C1_SELECT })
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        let msgs = rows.iter().map(raw).collect::<Result<Vec<_>>>()?;
        if msgs.is_empty() {
            tx.commit().await?;
            return Ok(());
        }
        let list = in_list(msgs.len());
        if c2 {
            let token = Uuid::new_v4();
            let sql = format!(
                "UPDATE postbox_outbox SET `attempts` = `attempts` + 1, `lease_token` = ?,
                        `lease_until` = UTC_TIMESTAMP(6) + INTERVAL 30 SECOND
                  WHERE `seq` IN ({list})"
            );
            let mut q = sqlx::query(&sql).bind(token.as_bytes().as_slice());
            for m in &msgs {
                q = q.bind(m.seq);
            }
            q.execute(&mut *tx).await?;
            tx.commit().await?;
            null_publish(&msgs);
            let sql =
                format!("DELETE FROM postbox_outbox WHERE `seq` IN ({list}) AND `lease_token` = ?");
            let mut q = sqlx::query(&sql);
            for m in &msgs {
                q = q.bind(m.seq);
            }
            let deleted = q
                .bind(token.as_bytes().as_slice())
                .execute(pool)
                .await?
                .rows_affected();
            ensure!(deleted == msgs.len() as u64, "C2 lost a lease");
        } else {
            let sql = format!("DELETE FROM postbox_outbox WHERE `seq` IN ({list})");
            let mut q = sqlx::query(&sql);
            for m in &msgs {
                q = q.bind(m.seq);
            }
            q.execute(&mut *tx).await?;
            tx.commit().await?;
            null_publish(&msgs);
        }
        done.fetch_add(msgs.len() as u64, Ordering::Relaxed);
    }
}

async fn ceiling(
    pool: &MySqlPool,
    c2: bool,
    n: u64,
    batch: usize,
    workers: usize,
) -> Result<Duration> {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        tasks.spawn(worker(pool.clone(), c2, batch, Arc::clone(&done)));
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let took = start.elapsed();
    let got = done.load(Ordering::Relaxed);
    ensure!(got == n, "MySQL ceiling drained {got} of {n}");
    Ok(took)
}

async fn postbox(url: &str, n: u64, batch: usize, concurrency: usize) -> Result<Duration> {
    let store = MySqlStore::connect(url).await?;
    let done = CancellationToken::new();
    let publisher = Arc::new(CountingPublisher::new(n, done.clone()));
    let relay = Relay::builder(store, publisher)
        .batch_size(batch)
        .concurrency(concurrency)
        .build()?;
    let watchdog = {
        let done = done.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(120 + n / 500)).await;
            done.cancel();
        })
    };
    let start = Instant::now();
    let report = relay.run(done).await;
    let took = start.elapsed();
    watchdog.abort();
    relay.store().pool().close().await;
    if report.sent != n {
        bail!("postbox (MySQL) sent {} of {n}", report.sent);
    }
    Ok(took)
}

/// mysql: C1 and C2 against the relay at each batch size.
pub(crate) async fn mysql(o: &Opts, lines: &mut Vec<Line>) -> Result<()> {
    let pool = reset(&o.mysql_url).await?;
    let n = o.rows;
    for &batch in &o.batches {
        let (mut c1, mut c2, mut pb) = (vec![], vec![], vec![]);
        for rep in 1..=o.repeat {
            progress!("mysql batch {batch}: repeat {rep}/{}", o.repeat);
            load(&pool, n).await?;
            c1.push(rate(
                n,
                ceiling(&pool, false, n, batch, o.concurrency).await?,
            ));
            load(&pool, n).await?;
            c2.push(rate(
                n,
                ceiling(&pool, true, n, batch, o.concurrency).await?,
            ));
            load(&pool, n).await?;
            pb.push(rate(
                n,
                postbox(&o.mysql_url, n, batch, o.concurrency).await?,
            ));
        }
        let extra = json!({"rows": n, "batch": batch, "concurrency": o.concurrency});
        let variant = format!("keyless, batch {batch}");
        emit(
            lines,
            Line::new(
                "mysql",
                &variant,
                "C1 SELECT…SKIP LOCKED + DELETE, one txn",
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
                "mysql",
                &variant,
                "C2 lease txn + DELETE",
                "msg/s",
                Better::Higher,
                c2,
                pb,
                Goal::RatioAtLeast(1.5),
            )
            .extra(extra),
        );
    }
    pool.close().await;
    Ok(())
}
