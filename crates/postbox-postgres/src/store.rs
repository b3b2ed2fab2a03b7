//! [`PgStore`]: the relay's side of the outbox, implementing
//! [`postbox_core::Store`].

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use postbox_core::{
    Claim, ClaimRequest, CompleteReport, Completion, Disposition, Filter, Lease, ListQuery,
    Malformed, Message, MessageRecord, PurgeQuery, Stats, Status, Store, StoreError,
    from_unix_micros,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};
use tokio::sync::watch;
use uuid::Uuid;

use crate::error::{map, map_connect};
use crate::listen::{Wakeup, listen_loop};
use crate::outbox::PgOutbox;

/// Connections in the pool [`PgStore::connect`] builds: enough for a relay
/// with a few batches in flight plus admin queries.
pub const DEFAULT_POOL_SIZE: u32 = 4;
/// How long a query waits for a free pooled connection before failing with
/// [`StoreError::Unavailable`].
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connect options for a relay's pool, sent in the startup packet (no extra
/// round trip):
///
/// * `plan_cache_mode = force_custom_plan`, so a claim prepared while the
///   table was empty is never stuck with a generic plan;
/// * `enable_bitmapscan = off`: before the first ANALYZE of a freshly
///   filled table the planner guesses the partial claim indexes hold a few
///   dozen rows and would bitmap-scan and sort all of them (measured: 430 ms
///   at 300k keyless rows) instead of reading the first rows in index order
///   (0.2 ms). Relay sessions run only postbox's own statements, none of
///   which wants a bitmap scan;
/// * `jit = off`: past ~30k rows the claim's estimated cost crosses
///   `jit_above_cost`, and since every claim is planned afresh, every claim
///   was JIT-compiled again (postbox-bench with auto_explain: 189 ms of a
///   206 ms claim; drain 2.5k → 9.1k msg/s at 30k rows with JIT off). The
///   claim is index probes over a bounded set of rows: JIT never pays off;
/// * `application_name = postbox-relay`.
pub fn relay_connect_options(options: PgConnectOptions) -> PgConnectOptions {
    options
        .options([
            ("plan_cache_mode", "force_custom_plan"),
            ("enable_bitmapscan", "off"),
            ("jit", "off"),
        ])
        .application_name("postbox-relay")
}

/// One session that holds back some of an outbox's keys: it has enqueued a
/// keyed message (holding that key's advisory lock) and not yet committed.
/// Later messages of those keys wait for it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Blocker {
    /// Backend process id (`pg_terminate_backend(pid)` ends it).
    pub pid: i32,
    /// How long its transaction has been open.
    pub xact_age: Duration,
    /// `pg_stat_activity.state`, e.g. `idle in transaction`.
    pub state: Option<String>,
    /// When its current (or last) query started, Unix µs.
    pub query_start_micros: Option<i64>,
    /// How many keys of this outbox it holds.
    pub keys_held: i64,
    /// How many sessions wait for those keys (producers queued behind it).
    pub waiters: i64,
}

/// The oldest open transaction of the database: it does not stop postbox
/// (ordering needs no horizon), but it holds back vacuum of the outbox's
/// deleted rows, which slows claims over time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct OldestTransaction {
    /// Backend process id.
    pub pid: i32,
    /// How long its transaction has been open.
    pub xact_age: Duration,
    /// `pg_stat_activity.state`.
    pub state: Option<String>,
    /// `application_name` of the session.
    pub application_name: Option<String>,
}

/// How many keys the claim's key walk visits per claim, and the size of
/// the window over the oldest keyed rows, as multiples of the batch size.
const WALK_FACTOR: usize = 1;
const WINDOW_FACTOR: usize = 2;

/// The PostgreSQL store. Cheap to clone; clones share the pool, the
/// listener and the key-walk cursor.
#[derive(Clone)]
pub struct PgStore {
    outbox: PgOutbox,
    pool: PgPool,
    shared: Arc<Shared>,
}

struct Shared {
    wakeup: Arc<Wakeup>,
    listen: bool,
    listener: OnceLock<watch::Sender<()>>,
    /// Where the next claim's walk over distinct keys starts (`None`: from
    /// the first key).
    cursor: Mutex<Option<String>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("table", &self.outbox.qualified_name())
            .finish_non_exhaustive()
    }
}

impl PgStore {
    pub(crate) fn new(outbox: PgOutbox, pool: PgPool) -> Self {
        Self {
            outbox,
            pool,
            shared: Arc::new(Shared {
                wakeup: Arc::default(),
                listen: true,
                listener: OnceLock::new(),
                cursor: Mutex::new(None),
            }),
        }
    }

    /// Connects to `url` with the default table: a pool of
    /// [`DEFAULT_POOL_SIZE`] connections with the relay session settings
    /// ([`relay_connect_options`]) and an acquire timeout of
    /// [`ACQUIRE_TIMEOUT`].
    ///
    /// Errors name the URL without its password: an unreachable server is
    /// [`StoreError::Unavailable`] (retry later); a wrong password, unknown
    /// role or missing database is [`StoreError::Config`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, PgOutbox::default()).await
    }

    /// Like [`PgStore::connect`], for a given outbox table.
    pub async fn connect_with(url: &str, outbox: PgOutbox) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(|e| {
            StoreError::Config(format!(
                "invalid PostgreSQL URL {}: {}",
                crate::redact_url(url),
                crate::error::redact_text(&e.to_string(), url)
            ))
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(DEFAULT_POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // A claim is one round trip; pinging before each would be a
            // second. A connection killed meanwhile fails one query with
            // `Unavailable`, which the relay retries.
            .test_before_acquire(false)
            .connect_with(relay_connect_options(options))
            .await
            .map_err(|e| map_connect(url, e))?;
        Ok(outbox.store(pool))
    }

    /// Disables (or re-enables) the LISTEN connection; the relay then wakes
    /// by polling and by its in-process waker only.
    #[must_use]
    pub fn listen(self, on: bool) -> Self {
        Self {
            outbox: self.outbox,
            pool: self.pool,
            shared: Arc::new(Shared {
                wakeup: Arc::default(),
                listen: on,
                listener: OnceLock::new(),
                cursor: Mutex::new(None),
            }),
        }
    }

    /// The outbox table this store serves.
    pub fn outbox(&self) -> &PgOutbox {
        &self.outbox
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Whether the LISTEN connection is up right now (false before the
    /// first [`Store::notified`] call starts it, and while it reconnects).
    pub fn is_listening(&self) -> bool {
        self.shared
            .wakeup
            .listening
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Creates or upgrades the schema (see [`PgOutbox::migrate`]).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.outbox.migrate(&self.pool).await
    }

    /// Sessions that hold keys of this outbox in an open transaction, oldest
    /// first: a stall's cause, with its pid and age, instead of silence.
    pub async fn blockers(&self) -> Result<Vec<Blocker>, StoreError> {
        let rows = sqlx::query(&self.outbox.inner.sql.blockers)
            .fetch_all(&self.pool)
            .await
            .map_err(map)?;
        rows.iter()
            .map(|r| {
                Ok(Blocker {
                    pid: r.try_get(0).map_err(map)?,
                    xact_age: micros_to_duration(r.try_get::<Option<i64>, _>(1).map_err(map)?),
                    state: r.try_get(2).map_err(map)?,
                    query_start_micros: r.try_get(3).map_err(map)?,
                    keys_held: r.try_get(4).map_err(map)?,
                    waiters: r.try_get::<Option<i64>, _>(5).map_err(map)?.unwrap_or(0),
                })
            })
            .collect()
    }

    /// The oldest open transaction in this database (other than this
    /// query's own), if any.
    pub async fn oldest_transaction(&self) -> Result<Option<OldestTransaction>, StoreError> {
        let row = sqlx::query(
            "SELECT pid, (extract(epoch from now() - xact_start) * 1000000)::int8, state, application_name
               FROM pg_stat_activity
              WHERE datname = current_database() AND xact_start IS NOT NULL
                AND pid <> pg_backend_pid()
                AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)
              ORDER BY xact_start
              LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(map)?;
        row.map(|r| {
            Ok(OldestTransaction {
                pid: r.try_get(0).map_err(map)?,
                xact_age: micros_to_duration(r.try_get::<Option<i64>, _>(1).map_err(map)?),
                state: r.try_get(2).map_err(map)?,
                application_name: r.try_get(3).map_err(map)?,
            })
        })
        .transpose()
    }

    /// The claim statement for `outbox` (parameters: limit, lease µs, token,
    /// tenant, window size, walk cursor, walk length), for `EXPLAIN` by
    /// operators and tests.
    pub fn claim_sql_for_explain(outbox: &PgOutbox) -> &str {
        &outbox.inner.sql.claim
    }

    fn start_listener(&self) {
        if !self.shared.listen {
            return;
        }
        self.shared.listener.get_or_init(|| {
            let (tx, rx) = watch::channel(());
            let options = (*self.pool.connect_options()).clone();
            tokio::spawn(listen_loop(
                options,
                self.outbox.channel(),
                Arc::clone(&self.shared.wakeup),
                rx,
            ));
            tx
        });
    }

    fn walk_from(&self) -> Option<String> {
        self.shared
            .cursor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_walk(&self, next: Option<String>) {
        *self
            .shared
            .cursor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = next;
    }
}

fn micros_to_duration(us: Option<i64>) -> Duration {
    Duration::from_micros(us.unwrap_or(0).max(0).unsigned_abs())
}

fn duration_micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn clamp_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Decodes one claimed row, or says why it cannot be.
fn decode(r: &PgRow) -> Result<Result<Message, Malformed>, sqlx::Error> {
    let seq: i64 = r.try_get("seq")?;
    let key: Option<String> = r.try_get("key")?;
    let bad = |reason: String| Malformed {
        seq,
        key: key.clone(),
        reason,
    };
    let headers_text: String = r.try_get("headers")?;
    let headers: BTreeMap<String, String> = match serde_json::from_str(&headers_text) {
        Ok(h) => h,
        Err(e) => {
            return Ok(Err(bad(format!(
                "headers are not a JSON object of strings ({e}): {}",
                truncate(&headers_text, 200)
            ))));
        }
    };
    let attempts: i32 = r.try_get("attempts")?;
    let max_attempts: Option<i32> = r.try_get("max_attempts")?;
    let max_attempts = match max_attempts.map(u32::try_from).transpose() {
        Ok(m) => m,
        Err(_) => {
            return Ok(Err(bad(format!(
                "max_attempts {max_attempts:?} is negative"
            ))));
        }
    };
    let payload: Vec<u8> = r.try_get("payload")?;
    Ok(Ok(Message::new(
        r.try_get("id")?,
        seq,
        r.try_get("topic")?,
        key,
        Bytes::from(payload),
        headers,
        r.try_get("tenant")?,
        u32::try_from(attempts).unwrap_or(0),
        max_attempts,
        from_unix_micros(r.try_get("created_us")?),
    )))
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn bind_filter<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    f: &'q Filter,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    q.bind(f.topic.as_deref())
        .bind(f.key.as_deref())
        .bind(f.tenant.as_deref())
        .bind(&f.ids[..])
        .bind(f.older_than.map(duration_micros))
        .bind(f.error_contains.as_deref())
}

fn status_text(s: Status) -> Option<&'static str> {
    match s {
        Status::Pending => Some("pending"),
        Status::Leased => Some("leased"),
        Status::Dead => Some("dead"),
        Status::Sent => Some("sent"),
        _ => None,
    }
}

fn parse_status(s: &str) -> Status {
    match s {
        "leased" => Status::Leased,
        "dead" => Status::Dead,
        "sent" => Status::Sent,
        _ => Status::Pending,
    }
}

impl Store for PgStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let token = Uuid::new_v4();
        let limit = req.limit.max(1);
        let walk_len =
            i32::try_from(limit.saturating_mul(WALK_FACTOR).min(10_000)).unwrap_or(10_000);
        let rows = sqlx::query(&self.outbox.inner.sql.claim)
            .bind(clamp_i64(limit))
            .bind(duration_micros(req.lease))
            .bind(token)
            .bind(req.tenant.as_deref())
            .bind(clamp_i64(limit.saturating_mul(WINDOW_FACTOR)))
            .bind(self.walk_from())
            .bind(walk_len)
            .fetch_all(&self.pool)
            .await
            .map_err(map)?;
        let mut messages = Vec::with_capacity(rows.len());
        let mut malformed = Vec::new();
        let mut expires = None;
        for r in &rows {
            if expires.is_none() {
                expires = r.try_get::<Option<i64>, _>("lease_until_us").map_err(map)?;
                let walked: i64 = r.try_get("walk_len").map_err(map)?;
                let end: Option<String> = r.try_get("walk_end").map_err(map)?;
                // A short walk reached the last key: start over next time.
                self.set_walk(if walked < i64::from(walk_len) {
                    None
                } else {
                    end
                });
            }
            if r.try_get::<Option<i64>, _>("seq").map_err(map)?.is_none() {
                continue; // the "nothing claimed" row
            }
            match decode(r).map_err(map)? {
                Ok(m) => messages.push(m),
                Err(bad) => malformed.push(bad),
            }
        }
        let expires_at = from_unix_micros(expires.unwrap_or(0));
        Ok(Claim::new(Lease { token, expires_at }, messages, malformed))
    }

    async fn complete(
        &self,
        token: Uuid,
        completions: &[Completion],
    ) -> Result<CompleteReport, StoreError> {
        if completions.is_empty() {
            return Ok(CompleteReport::default());
        }
        let n = completions.len();
        let (mut seqs, mut kinds, mut delays, mut errors, mut parks) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for c in completions {
            seqs.push(c.seq);
            let (kind, delay, error, park) = match &c.disposition {
                Disposition::Sent => ("sent", 0, None, false),
                Disposition::Retry { delay, error } => {
                    ("retry", duration_micros(*delay), Some(error.clone()), false)
                }
                Disposition::Dead { error, park } => ("dead", 0, Some(error.clone()), *park),
                Disposition::Release => ("release", 0, None, false),
                other => {
                    return Err(StoreError::Config(format!(
                        "unsupported disposition {other:?}"
                    )));
                }
            };
            kinds.push(kind);
            delays.push(delay);
            errors.push(error);
            parks.push(park);
        }
        let applied: i64 = sqlx::query_scalar(&self.outbox.inner.sql.complete)
            .bind(token)
            .bind(seqs)
            .bind(kinds)
            .bind(delays)
            .bind(errors)
            .bind(parks)
            .fetch_one(&self.pool)
            .await
            .map_err(map)?;
        let applied = u64::try_from(applied).unwrap_or(0);
        Ok(CompleteReport {
            applied,
            lost: (n as u64).saturating_sub(applied),
        })
    }

    fn notified(&self) -> impl std::future::Future<Output = ()> + Send {
        self.start_listener();
        let wakeup = Arc::clone(&self.shared.wakeup);
        let listen = self.shared.listen;
        async move {
            if listen {
                wakeup.notify.notified().await;
            } else {
                std::future::pending::<()>().await;
            }
        }
    }

    async fn stats(&self, filter: &Filter) -> Result<Stats, StoreError> {
        let r = bind_filter(sqlx::query(&self.outbox.inner.sql.stats), filter)
            .fetch_one(&self.pool)
            .await
            .map_err(map)?;
        let n = |i: usize| -> Result<u64, StoreError> {
            Ok(u64::try_from(r.try_get::<i64, _>(i).map_err(map)?).unwrap_or(0))
        };
        let oldest: Option<i64> = r.try_get(7).map_err(map)?;
        Ok(Stats::new(
            n(0)?,
            n(1)?,
            n(2)?,
            n(3)?,
            n(4)?,
            n(5)?,
            n(6)?,
            oldest.map(from_unix_micros),
        ))
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<MessageRecord>, StoreError> {
        let rows = bind_filter(sqlx::query(&self.outbox.inner.sql.list), &query.filter)
            .bind(query.status.and_then(status_text))
            .bind(query.after_seq)
            .bind(clamp_i64(query.limit))
            .fetch_all(&self.pool)
            .await
            .map_err(map)?;
        rows.iter()
            .map(|r| {
                let headers_text: String = r.try_get(12).map_err(map)?;
                // Admin listing shows what it can; a malformed row's headers
                // come back empty rather than failing the whole listing.
                let headers = serde_json::from_str(&headers_text).unwrap_or_default();
                let status: String = r.try_get(5).map_err(map)?;
                let attempts: i32 = r.try_get(6).map_err(map)?;
                let max_attempts: Option<i32> = r.try_get(7).map_err(map)?;
                let payload: Vec<u8> = r.try_get(13).map_err(map)?;
                Ok(MessageRecord::new(
                    r.try_get(0).map_err(map)?,
                    r.try_get(1).map_err(map)?,
                    r.try_get(2).map_err(map)?,
                    r.try_get(3).map_err(map)?,
                    r.try_get(4).map_err(map)?,
                    parse_status(&status),
                    u32::try_from(attempts).unwrap_or(0),
                    max_attempts.and_then(|m| u32::try_from(m).ok()),
                    r.try_get(8).map_err(map)?,
                    r.try_get(9).map_err(map)?,
                    from_unix_micros(r.try_get(10).map_err(map)?),
                    from_unix_micros(r.try_get(11).map_err(map)?),
                    headers,
                    Bytes::from(payload),
                ))
            })
            .collect()
    }

    async fn replay(&self, filter: &Filter) -> Result<u64, StoreError> {
        let done = bind_filter(sqlx::query(&self.outbox.inner.sql.replay), filter)
            .execute(&self.pool)
            .await
            .map_err(map)?;
        Ok(done.rows_affected())
    }

    async fn skip(&self, filter: &Filter) -> Result<u64, StoreError> {
        let done = bind_filter(sqlx::query(&self.outbox.inner.sql.skip), filter)
            .execute(&self.pool)
            .await
            .map_err(map)?;
        Ok(done.rows_affected())
    }

    async fn purge(&self, query: &PurgeQuery) -> Result<u64, StoreError> {
        let status = match query.status {
            Status::Dead => "dead",
            Status::Sent => "sent",
            // pending and leased messages are never purged
            _ => return Ok(0),
        };
        let done = bind_filter(sqlx::query(&self.outbox.inner.sql.purge), &query.filter)
            .bind(status)
            .execute(&self.pool)
            .await
            .map_err(map)?;
        Ok(done.rows_affected())
    }
}
