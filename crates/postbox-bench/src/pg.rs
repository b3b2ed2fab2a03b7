//! PostgreSQL: the database, the backlogs, the two ceilings and postbox's
//! relay, all on the table `PgOutbox::migrate` creates.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use postbox_core::{Ident, Publisher, Relay};
use postbox_postgres::PgStore;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{Connection, PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::util::{Counted, Null, RawMessage, null_publish, parse_headers, progress};

/// The bench database and an admin pool on it.
pub(crate) struct Pg {
    pub(crate) url: String,
    pub(crate) pool: PgPool,
    /// Diagnostic: run the ceilings with the relay's session settings
    /// (`relay_connect_options`: generic plans, no sequential or bitmap scans).
    pub(crate) ceiling_relay_session: bool,
}

/// How the loaded rows are keyed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Keys {
    /// Every row keyless.
    None,
    /// Every row keyed, over this many keys.
    All(u32),
    /// Every second row keyed over this many keys, the rest keyless.
    Half(u32),
}

/// The two hand-written ceilings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ceiling {
    /// One statement: `DELETE … WHERE seq IN (SELECT … FOR UPDATE SKIP
    /// LOCKED LIMIT n) RETURNING *` (at-most-once).
    C1,
    /// Lease `UPDATE … RETURNING`, publish, `DELETE` (two autocommit
    /// statements, at-least-once).
    C2,
}

/// C1: the physical limit. Same partial index postbox's keyless claim uses.
const C1_SQL: &str = "DELETE FROM postbox_outbox WHERE seq IN (
        SELECT seq FROM postbox_outbox
         WHERE key IS NULL AND status = 'pending'
         ORDER BY seq LIMIT $1
         FOR UPDATE SKIP LOCKED)
    RETURNING seq, id, topic, key, payload, headers::text AS headers";

/// C2, step 1: lease a batch (skipping rows another worker leased).
const C2_LEASE_SQL: &str = "UPDATE postbox_outbox AS t
       SET attempts = t.attempts + 1, lease_token = $2,
           lease_until = now() + interval '30 seconds'
     WHERE t.seq IN (
        SELECT seq FROM postbox_outbox
         WHERE key IS NULL AND status = 'pending'
           AND (lease_until IS NULL OR lease_until <= now())
         ORDER BY seq LIMIT $1
         FOR UPDATE SKIP LOCKED)
    RETURNING t.seq, t.id, t.topic, t.key, t.payload, t.headers::text AS headers";

/// C2, step 2: delete what was published, guarded by the lease token.
const C2_DELETE_SQL: &str = "DELETE FROM postbox_outbox WHERE seq = ANY($1) AND lease_token = $2";

fn raw(r: &PgRow) -> Result<RawMessage> {
    Ok(RawMessage {
        seq: r.try_get("seq")?,
        id: r.try_get("id")?,
        topic: r.try_get("topic")?,
        key: r.try_get("key")?,
        payload: r.try_get("payload")?,
        headers: parse_headers(r.try_get::<&str, _>("headers")?),
    })
}

impl Pg {
    /// Creates the database named in `url` if missing and connects.
    ///
    /// `jit_off` sets `jit = off` as the database default (the fix proposed
    /// in BENCHMARKS.md, applied from outside postbox); otherwise the
    /// server default is restored.
    pub(crate) async fn connect(url: &str, jit_off: bool) -> Result<Self> {
        let opts = PgConnectOptions::from_str(url).context("bad PostgreSQL URL")?;
        let db = opts.get_database().unwrap_or("postbox_bench").to_owned();
        let db = Ident::new(&db).with_context(|| format!("database name {db:?}"))?;
        let mut admin = sqlx::PgConnection::connect_with(&opts.clone().database("postgres"))
            .await
            .with_context(|| format!("connecting to {}", postbox_postgres::redact_url(url)))?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(db.as_str())
                .fetch_one(&mut admin)
                .await?;
        if !exists {
            sqlx::query(&format!("CREATE DATABASE {}", db.quoted()))
                .execute(&mut admin)
                .await
                .context("creating the bench database")?;
        }
        let jit = if jit_off {
            "SET jit = off"
        } else {
            "RESET jit"
        };
        sqlx::query(&format!("ALTER DATABASE {} {jit}", db.quoted()))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect_with(opts.database(db.as_str()))
            .await?;
        Ok(Self {
            url: url.to_owned(),
            pool,
            ceiling_relay_session: false,
        })
    }

    /// Drops and recreates the outbox (through `PgOutbox::migrate`) and the
    /// business table. Autovacuum is off on the outbox so no run is slowed
    /// by a vacuum that happens to start during it; each backlog is
    /// vacuumed and analyzed explicitly after loading instead.
    pub(crate) async fn reset(&self) -> Result<()> {
        sqlx::raw_sql(
            "DROP TABLE IF EXISTS public.postbox_outbox CASCADE;
             DROP TABLE IF EXISTS public.postbox_outbox_migrations;
             DROP TABLE IF EXISTS public.postbox_outbox_relays;
             DROP FUNCTION IF EXISTS public.postbox_outbox_before_insert() CASCADE;
             DROP TABLE IF EXISTS public.bench_orders;
             CREATE TABLE public.bench_orders (
                 id         bigserial PRIMARY KEY,
                 customer   text        NOT NULL,
                 amount     bigint      NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now());",
        )
        .execute(&self.pool)
        .await?;
        postbox_postgres::migrate(&self.pool).await?;
        sqlx::raw_sql("ALTER TABLE public.postbox_outbox SET (autovacuum_enabled = false)")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Empties the outbox and the business table.
    pub(crate) async fn truncate(&self) -> Result<()> {
        sqlx::raw_sql("TRUNCATE public.postbox_outbox, public.bench_orders")
            .execute(&self.pool)
            .await?;
        self.checkpoint().await
    }

    /// `CHECKPOINT`, so that the measured run that comes next starts with
    /// the previous step's dirty pages written and no checkpoint in
    /// progress, whatever the steps before it wrote. Loading 1M rows writes
    /// about 1 GB of WAL; with the default `max_wal_size` of 1 GB the server
    /// log showed a checkpoint starting every ~7 s through a whole run, so
    /// the checkpointer's writes of one load's pages overlapped whichever
    /// drain came next. Needs superuser or (PostgreSQL 15+) `pg_checkpoint`;
    /// without the privilege the runs go on unsettled and the first refusal
    /// says so. Any other error fails the run.
    pub(crate) async fn checkpoint(&self) -> Result<()> {
        static WARNED: AtomicBool = AtomicBool::new(false);
        match sqlx::raw_sql("CHECKPOINT").execute(&self.pool).await {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_database_error()
                    .and_then(|d| d.code())
                    .is_some_and(|c| c == "42501") =>
            {
                if !WARNED.swap(true, Ordering::Relaxed) {
                    progress!("CHECKPOINT refused, runs are not settled first: {e}");
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Adds `n` rows (~200-byte JSON payloads) through the table's trigger,
    /// in statements of at most 500k rows. Returns the time it took.
    pub(crate) async fn load(&self, n: u64, keys: Keys) -> Result<Duration> {
        let (nkeys, half) = match keys {
            Keys::None => (0, false),
            Keys::All(k) => (k, false),
            Keys::Half(k) => (k, true),
        };
        let start = Instant::now();
        let mut from = 1u64;
        while from <= n {
            let to = (from + 499_999).min(n);
            sqlx::query(
                "INSERT INTO public.postbox_outbox (topic, key, payload, headers)
                 SELECT 'bench.event',
                        CASE WHEN $1::int4 = 0 OR ($2::bool AND g % 2 = 1) THEN NULL
                             ELSE 'key-' || (g % $1::int4) END,
                        convert_to('{\"id\":' || g || ',\"pad\":\"' || repeat('x', 180) || '\"}', 'UTF8'),
                        '{\"content-type\":\"application/json\"}'
                   FROM generate_series($3::int8, $4::int8) AS g",
            )
            .bind(i32::try_from(nkeys)?)
            .bind(half)
            .bind(i64::try_from(from)?)
            .bind(i64::try_from(to)?)
            .execute(&self.pool)
            .await
            .context("loading the backlog")?;
            if n > 1_000_000 {
                progress!("  loaded {to} of {n} rows");
            }
            from = to + 1;
        }
        Ok(start.elapsed())
    }

    /// `VACUUM ANALYZE` of the outbox (a settled table, visibility map set,
    /// statistics known, as autovacuum would leave it).
    pub(crate) async fn vacuum(&self) -> Result<()> {
        sqlx::raw_sql("VACUUM ANALYZE public.postbox_outbox")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Truncate, load `n` rows, vacuum and analyze. Returns the load time.
    pub(crate) async fn fresh(&self, n: u64, keys: Keys) -> Result<Duration> {
        self.truncate().await?;
        let took = self.load(n, keys).await?;
        self.vacuum().await?;
        self.checkpoint().await?;
        Ok(took)
    }

    /// Rows left in the outbox.
    pub(crate) async fn count(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM public.postbox_outbox")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// A plain pool of `n` connections (no relay session settings: the
    /// ceilings are what a hand-written consumer would run).
    pub(crate) async fn plain_pool(&self, n: u32) -> Result<PgPool> {
        let mut opts = PgConnectOptions::from_str(&self.url)?;
        if self.ceiling_relay_session {
            opts = postbox_postgres::relay_connect_options(opts);
        }
        Ok(PgPoolOptions::new()
            .max_connections(n)
            .min_connections(n)
            .connect_with(opts)
            .await?)
    }
}

/// Drains `n` keyless rows with a hand-written ceiling, `workers` loops in
/// parallel (the same number of batches in flight as the relay).
pub(crate) async fn ceiling_drain(
    pg: &Pg,
    which: Ceiling,
    n: u64,
    batch: usize,
    workers: usize,
) -> Result<Duration> {
    let pool = pg.plain_pool(u32::try_from(workers)?).await?;
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let pool = pool.clone();
        let done = Arc::clone(&done);
        tasks.spawn(async move { ceiling_worker(&pool, which, batch, &done).await });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let took = start.elapsed();
    pool.close().await;
    let got = done.load(Ordering::Relaxed);
    ensure!(got == n, "{which:?} drained {got} of {n} rows");
    Ok(took)
}

async fn ceiling_worker(
    pool: &PgPool,
    which: Ceiling,
    batch: usize,
    done: &AtomicU64,
) -> Result<()> {
    let limit = i64::try_from(batch)?;
    loop {
        let n = match which {
            Ceiling::C1 => {
                let rows = sqlx::query(C1_SQL).bind(limit).fetch_all(pool).await?;
                let msgs = rows.iter().map(raw).collect::<Result<Vec<_>>>()?;
                null_publish(&msgs)
            }
            Ceiling::C2 => {
                let token = Uuid::new_v4();
                let rows = sqlx::query(C2_LEASE_SQL)
                    .bind(limit)
                    .bind(token)
                    .fetch_all(pool)
                    .await?;
                let msgs = rows.iter().map(raw).collect::<Result<Vec<_>>>()?;
                null_publish(&msgs);
                let seqs: Vec<i64> = msgs.iter().map(|m| m.seq).collect();
                let deleted = sqlx::query(C2_DELETE_SQL)
                    .bind(&seqs)
                    .bind(token)
                    .execute(pool)
                    .await?
                    .rows_affected();
                ensure!(deleted == seqs.len() as u64, "C2 lost a lease");
                msgs.len()
            }
        };
        if n == 0 {
            return Ok(());
        }
        done.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// One lease `UPDATE` of C2 and its `DELETE`, timed separately (claim cost).
pub(crate) async fn ceiling_claim_once(
    pool: &PgPool,
    batch: usize,
) -> Result<(Duration, Duration, usize)> {
    let token = Uuid::new_v4();
    let t0 = Instant::now();
    let rows = sqlx::query(C2_LEASE_SQL)
        .bind(i64::try_from(batch)?)
        .bind(token)
        .fetch_all(pool)
        .await?;
    let claim = t0.elapsed();
    let seqs = rows
        .iter()
        .map(|r| r.try_get::<i64, _>("seq"))
        .collect::<Result<Vec<_>, _>>()?;
    let t1 = Instant::now();
    sqlx::query(C2_DELETE_SQL)
        .bind(&seqs)
        .bind(token)
        .execute(pool)
        .await?;
    Ok((claim, t1.elapsed(), seqs.len()))
}

/// Settings of a postbox drain.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Drain {
    pub(crate) n: u64,
    pub(crate) batch: usize,
    pub(crate) concurrency: usize,
    pub(crate) relays: usize,
    /// `PgOutbox::vacuum_after` of the relays' stores.
    pub(crate) vacuum_after: Option<std::num::NonZeroU64>,
}

/// Drains `n` rows with `relays` postbox relays (each its own `PgStore`,
/// as separate processes would have) and the null publisher; the clock
/// stops when every relay has returned from `run`, i.e. after the last
/// completion was recorded.
pub(crate) async fn postbox_drain(pg: &Pg, d: Drain) -> Result<Duration> {
    postbox_drain_to(pg, d, Null).await
}

/// [`postbox_drain`] through `publisher` (e.g. a real broker's); only the
/// messages it reports `Ok` count towards `n`.
pub(crate) async fn postbox_drain_to<P: Publisher>(
    pg: &Pg,
    d: Drain,
    publisher: P,
) -> Result<Duration> {
    let done = CancellationToken::new();
    let publisher = Arc::new(Counted::wrap(publisher, d.n, done.clone()));
    let mut relays = Vec::with_capacity(d.relays);
    for _ in 0..d.relays {
        let store = PgStore::connect(&pg.url)
            .await?
            .vacuum_after(d.vacuum_after);
        relays.push(
            Relay::builder(store, Arc::clone(&publisher))
                .batch_size(d.batch)
                .concurrency(d.concurrency)
                .build()?,
        );
    }
    // A stuck drain ends with an error instead of hanging the run.
    let deadline = Duration::from_secs(120 + d.n / 2_000);
    let watchdog = {
        let done = done.clone();
        tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            done.cancel();
        })
    };
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for relay in relays {
        let done = done.clone();
        tasks.spawn(async move { relay.run(done).await });
    }
    let mut sent = 0;
    while let Some(r) = tasks.join_next().await {
        sent += r?.sent;
    }
    let took = start.elapsed();
    watchdog.abort();
    if sent != d.n {
        bail!(
            "postbox sent {sent} of {} rows (published {}) within {deadline:?}",
            d.n,
            publisher.count()
        );
    }
    Ok(took)
}

/// Diagnostic: postbox's store SQL (`PgStore::claim` + `complete`) driven
/// by a hand loop of `workers` tasks instead of the `Relay`, to tell the
/// cost of the SQL from the cost of the relay loop.
pub(crate) async fn store_loop_drain(
    pg: &Pg,
    n: u64,
    batch: usize,
    workers: usize,
) -> Result<Duration> {
    use postbox_core::{ClaimRequest, Completion, Disposition, Store};
    let store = PgStore::connect(&pg.url).await?;
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let store = store.clone();
        let done = Arc::clone(&done);
        tasks.spawn(async move {
            let req = ClaimRequest::new(batch, Duration::from_secs(30));
            loop {
                let claim = store.claim(&req).await?;
                if claim.is_empty() {
                    return anyhow::Ok(());
                }
                let c: Vec<Completion> = claim
                    .messages
                    .iter()
                    .map(|m| Completion::new(m.seq, Disposition::Sent))
                    .collect();
                store.complete(claim.lease.token, &c).await?;
                done.fetch_add(c.len() as u64, Ordering::Relaxed);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let took = start.elapsed();
    let got = done.load(Ordering::Relaxed);
    ensure!(got == n, "store loop drained {got} of {n}");
    Ok(took)
}
