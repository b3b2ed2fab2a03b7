//! [`PgStore`]: the relay's side of the outbox, implementing
//! [`postbox_core::Store`].

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use postbox_core::{
    Claim, ClaimRequest, CompleteReport, Completion, Disposition, Filter, Holder, Holdups, Lease,
    ListQuery, Malformed, Message, MessageRecord, PurgeQuery, Stats, Status, Store, StoreError,
    from_unix_micros,
};
use postbox_core::{GroupBy, GroupStats, RelayHeartbeat, RelayRecord};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{Column as _, Executor as _, PgConnection, PgPool, Postgres, Row};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use uuid::Uuid;

use crate::error::{map, map_connect};
use crate::listen::{Wakeup, listen_loop};
use crate::outbox::PgOutbox;
use crate::tid::Tid;
use crate::vacuum::VacuumRun;

/// Connections in the admin pool [`PgStore::connect`] builds (stats,
/// listings, heartbeats, migrations); claims and completions have their own
/// pool of [`CLAIM_POOL_SIZE`].
pub const DEFAULT_POOL_SIZE: u32 = 2;
/// Connections in a store's claim pool: up to [`MAX_HELD`] held by backlog
/// batches being published, the rest for claims and completions.
pub const CLAIM_POOL_SIZE: u32 = 6;
/// The most backlog batches a store holds open transactions for at once
/// (held claims, see [`PgStore`]); further backlog claims lease their rows
/// instead. Two fewer than [`CLAIM_POOL_SIZE`]: the rest of the pool stays
/// for claims and completions, and a held batch's completion needs no
/// other connection, so held batches can never starve the pool for good.
pub const MAX_HELD: usize = 4;
/// How long a query waits for a free pooled connection before failing with
/// [`StoreError::Unavailable`].
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connect options for claim sessions, sent in the startup packet (no extra
/// round trip). A [`PgStore`] builds its claim pool with them from the
/// options of the pool it is given; they are public for `EXPLAIN` and tests.
///
/// * `plan_cache_mode = force_generic_plan`: each claim and completion
///   statement is planned once per connection. Planning afresh cost as much
///   as running the claim (0.4 ms keyless, up to 2.4 ms keyed, per claim).
///   The statements are written to have one good plan whatever the table
///   holds (see the `claim` module), and a plan made while the table was
///   empty is still right after a million rows: `tests/plans.rs`.
/// * `enable_seqscan = off`, `enable_bitmapscan = off`: every claim
///   statement reads a bounded number of rows through its partial indexes;
///   with the table empty or never analyzed, the planner would otherwise
///   cost a sequential scan or a bitmap scan plus sort as cheaper and keep
///   it (measured before: a bitmap scan and sort of 300k rows, 430 ms per
///   claim, where the index gives the first rows in 0.2 ms).
/// * `jit = off`: JIT never pays off for bounded index probes (measured: it
///   compiled every claim anew, 189 ms of a 206 ms claim).
/// * `application_name = postbox-relay`, unless `options` already carry
///   one that starts with `postbox-relay` (`postbox-relay-billing`: one
///   service's relays told apart from another's in `pg_stat_activity`;
///   monitoring matches `postbox-relay%`).
pub fn relay_connect_options(options: PgConnectOptions) -> PgConnectOptions {
    let name = options
        .get_application_name()
        .filter(|n| n.starts_with(RELAY_APPLICATION_NAME))
        .unwrap_or(RELAY_APPLICATION_NAME)
        .to_owned();
    options
        .options([
            ("plan_cache_mode", "force_generic_plan"),
            ("enable_seqscan", "off"),
            ("enable_bitmapscan", "off"),
            ("jit", "off"),
        ])
        .application_name(&name)
}

/// The `application_name` of relay sessions, or the start of it.
const RELAY_APPLICATION_NAME: &str = "postbox-relay";

/// The claim pool's sessions: [`relay_connect_options`] plus
/// `synchronous_commit = off`. The relay's claims, completions and retention
/// cleanup commit without waiting for the WAL flush (~2.4 ms per commit
/// measured on our 2-core machines, more than a claim). A database crash may
/// forget the last of them; each one forgotten only makes a message go out
/// once more, which at-least-once allows (a forgotten completion leaves its
/// row pending under an expired lease; a forgotten claim, its row unleased).
/// Keyed claims rule out the one case where that could break per-key order,
/// and commit synchronously on a server with synchronous standbys (see the
/// `claim` module). Private on purpose: only this pool, which runs nothing
/// but those statements, may carry it; a pool that producers or admin
/// commands commit on must keep the server's durable setting.
///
/// And `lock_timeout = 2s`: claims never wait for a row lock (they skip
/// locked rows), but a leasing completion can find its rows locked by a
/// held backlog batch: one that took them after the lease ran out, or one
/// whose `SKIP LOCKED` scan locked a row just as another relay leased it
/// (PostgreSQL then skips the row but keeps the lock until the holder's
/// transaction ends). Such a completion fails after 2 s as `Unavailable`
/// instead of waiting out the holder's publish; the relay retries it while
/// its lease lasts.
///
/// And `statement_timeout = 30s`: every statement of this pool takes
/// milliseconds; one queued for longer (behind a table lock) is rolled back
/// by the server rather than committing its leases after the relay gave the
/// claim up (it does after a minute), where no one would publish them.
fn claim_connect_options(options: PgConnectOptions) -> PgConnectOptions {
    relay_connect_options(options).options([
        ("synchronous_commit", "off"),
        ("lock_timeout", "2s"),
        ("statement_timeout", "30s"),
    ])
}

/// A claim-pool connection closed, not returned to the pool, when the
/// future using it is dropped before [`Closing::done`] (the relay gives up
/// a claim or a recording that gets no answer). sqlx would ping it before
/// taking it back, and a connection gone silent answers no ping for as long
/// as the kernel keeps the socket, many minutes, holding a pool slot all
/// that time; closing gives the slot back within seconds. An error returned
/// through it closes it too: its state is unknown then anyway.
struct Closing {
    conn: sqlx::pool::PoolConnection<Postgres>,
    done: bool,
}

impl Closing {
    async fn acquire(pool: &PgPool) -> Result<Self, sqlx::Error> {
        Ok(Self {
            conn: pool.acquire().await?,
            done: false,
        })
    }

    /// Finished normally: the connection goes back to the pool.
    fn done(mut self) {
        self.done = true;
    }
}

impl std::ops::Deref for Closing {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for Closing {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        if !self.done {
            self.conn.close_on_drop();
        }
    }
}

/// Connect options for the admin pool [`PgStore::connect`] builds: custom
/// plans (the admin statements' filters are optional parameters that fold
/// away only in a custom plan) and no JIT.
fn admin_connect_options(options: PgConnectOptions) -> PgConnectOptions {
    options
        .options([("plan_cache_mode", "force_custom_plan"), ("jit", "off")])
        .application_name("postbox")
}

/// How long [`PgStore::connect`] waits for the one direct connection it
/// tries after its pool timed out (see [`connect_timed_out`]).
const CAUSE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// The error of connecting to `url` when the pool timed out. sqlx's
/// `PoolTimedOut` does not say why: the pool retries a refused connection
/// (or a server starting up, or too many connections) until its acquire
/// timeout, then reports only the timeout. One direct connection with the
/// same `options`, bounded by [`CAUSE_ATTEMPT_TIMEOUT`], names the cause
/// ("Connection refused (os error 111)"), mapped like any connect error: a
/// wrong password or missing database found meanwhile is still
/// [`StoreError::Config`], anything else [`StoreError::Unavailable`] as the
/// timeout was. If that attempt gets no answer either, or succeeds (the
/// server came up meanwhile), the pool's timeout is reported.
async fn connect_timed_out(url: &str, options: &PgConnectOptions) -> StoreError {
    use sqlx::Connection as _;
    let attempt = async {
        let conn = PgConnection::connect_with(options).await?;
        // a race: the server answers now; the error stays the timeout, and
        // an error closing this connection is no cause of it
        let _ = conn.close().await;
        Ok::<(), sqlx::Error>(())
    };
    let cause = match tokio::time::timeout(CAUSE_ATTEMPT_TIMEOUT, attempt).await {
        Ok(Err(e)) => e,
        Ok(Ok(())) | Err(_) => sqlx::Error::PoolTimedOut,
    };
    match map_connect(url, cause) {
        // the pool timing out is Unavailable; so is what kept it from connecting
        StoreError::Database(e) => StoreError::Unavailable(e),
        other => other,
    }
}

/// The claim pool for a store over `pool`: the same server, database and
/// credentials, the claim session settings; connects on first use.
fn claim_pool(pool: &PgPool) -> PgPool {
    PgPoolOptions::new()
        .max_connections(CLAIM_POOL_SIZE)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        // A claim is one round trip; pinging before each would be a
        // second. A connection killed meanwhile fails one query with
        // `Unavailable`, which the relay retries.
        .test_before_acquire(false)
        .connect_lazy_with(claim_connect_options((*pool.connect_options()).clone()))
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

/// The outbox table's vacuum state, from `pg_stat_user_tables`: the
/// server's statistics, which a session reports within seconds of its
/// changes (up to a minute when busy), and which a crash, a failover or
/// `pg_stat_reset()` set back to nothing.
///
/// Every keyed row deleted since the last vacuum leaves an index entry that
/// each keyed claim steps over; millions of them slow keyed claims down to
/// tens of milliseconds (the crate README, "Dead index entries and keyed
/// claims"). `postbox status` prints this and warns from
/// [`VacuumState::SLOW_KEYED_CLAIMS`] dead rows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct VacuumState {
    /// Rows deleted or updated away since the table was last vacuumed
    /// (`n_dead_tup`, an estimate).
    pub dead_rows: u64,
    /// Live rows (`n_live_tup`, an estimate).
    pub live_rows: u64,
    /// How long ago the last vacuum, manual or automatic, ended; `None` if
    /// the server has no record of one.
    pub since_vacuum: Option<Duration>,
    /// Whether autovacuum may vacuum this table: the server's `autovacuum`
    /// setting and the table's `autovacuum_enabled` option both on.
    pub autovacuum: bool,
}

impl VacuumState {
    /// Dead rows from which `postbox status` warns that keyed claims slow
    /// down: with 200k keyed rows deleted since the last vacuum a keyed
    /// claim took about 1 ms more (the crate README). Dead rows also count
    /// keyless rows and old row versions, so this is a hint, not a
    /// measure.
    pub const SLOW_KEYED_CLAIMS: u64 = 200_000;
}

/// How many keys the claim's key walk visits per claim, as a multiple of
/// the batch size.
const WALK_FACTOR: usize = 1;
/// How far the keyed window reaches past the rows this store holds or is
/// leasing, as a multiple of the batch size (see [`keyed_window`]).
const WINDOW_FACTOR: usize = 2;
/// The most of those rows the keyed window reaches past, as a multiple of
/// the batch size.
const MAX_LEASED_FACTOR: usize = 8;
/// The fewest keys a walk visits. The next walk starts at the last key of
/// the previous one (inclusive), so a walk of one key would never move on.
pub(crate) const MIN_WALK: usize = 16;
/// Walk statements one claim may run while the keys walked yield nothing
/// (all parked, leased or delayed) before it reports "nothing claimable".
const MAX_WALKS: u32 = 8;

/// Claim statements, by what the previous claim saw: no keyed row pending;
/// keyed rows, most of them heads; a hot key's backlog in front of the
/// others (see `sql::claim_keyed_sql`).
const MODE_KEYLESS: u8 = 0;
const MODE_WINDOW: u8 = 1;
const MODE_WALK: u8 = 2;
/// `keyless_bulk`: the keyless claim after a full claim with no keyed row pending.
/// Outside the order of the three above (which `claim` compares: a wider
/// statement after an empty claim): a claim only moves to it after leasing
/// rows, and when it leases nothing it moves to `MODE_KEYLESS` before any
/// comparison.
const MODE_BULK: u8 = 3;
/// `keyed_bulk`: the keyed window claim after a full claim from the window.
/// Like `MODE_BULK` outside the order: when it leases nothing it moves to
/// `MODE_WINDOW` before any comparison.
const MODE_KEYED_BULK: u8 = 4;
/// `keyed` again after a window claim that got nothing because the heads
/// it saw were locked while another claim of this store was running: that
/// claim, most likely, which leases them a moment later. The next claim
/// then sees them leased (keys busy, no walk); only if it too is raced and
/// gets nothing does it walk. Ranks with `MODE_WINDOW` (see [`wider`]).
const MODE_RACED: u8 = 5;

/// What a claim saw, for [`next_mode`].
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// keyed rows are pending (the `keyed_pending` hint)
    keyed: bool,
    /// the window fell short of heads (the `short` hint)
    short: bool,
    /// the window's heads were there but locked (the `raced` hint)
    raced: bool,
    /// the claim leased nothing
    nothing: bool,
    /// the claim came back with as many rows as asked for
    full: bool,
    /// another claim of this store (of any scope, or a claim ahead) was
    /// running when it began
    concurrent: bool,
}

/// The claim mode of a scope's next claim, from what a claim in `mode` saw.
fn next_mode(seen: Seen, mode: u8) -> u8 {
    match (seen.keyed, seen.short, seen.raced) {
        // a backlog: the cheaper statement until one leases nothing
        (false, ..) if !seen.nothing && seen.full => MODE_BULK,
        (false, ..) => MODE_KEYLESS,
        (true, true, _) => MODE_WALK,
        // The window's heads were there but locked by other claims (or by
        // anyone holding them `FOR UPDATE`): stay with the window, unless
        // that left this claim nothing; then walk past them at once. Locks
        // held for long therefore cost a walk only once the window has
        // nothing else to give, and never hide the keys behind it. If
        // another claim of this store was running, its locks are the likely
        // ones: look at the window once more next time before walking (a
        // walk over 1,000 keys that found them all locked or leased cost
        // 12 ms, and two workers at batch 1,000 ran one after nearly every
        // claim).
        (true, false, true) if seen.nothing && seen.concurrent && mode == MODE_WINDOW => MODE_RACED,
        (true, false, true) if seen.nothing => MODE_WALK,
        // a keyed backlog: the cheaper statement until one leases nothing
        (true, false, _) if !seen.nothing && seen.full => MODE_KEYED_BULK,
        (true, false, _) => MODE_WINDOW,
    }
}

/// Whether claim mode `next` looks at more than `mode`: keyless < window
/// (raced or not) < walk. The backlog modes are outside the order: a claim
/// only moves to one after leasing rows, and leaves it before comparing.
fn wider(next: u8, mode: u8) -> bool {
    let rank = |m: u8| match m {
        MODE_KEYLESS => 0,
        MODE_WINDOW | MODE_RACED => 1,
        MODE_WALK => 2,
        _ => {
            debug_assert!(false, "claim mode {m} is outside the order");
            0
        }
    };
    rank(next) > rank(mode)
}
/// How often a held claim scans from the front of the keyless rows rather
/// than past the batches its store holds (see `claim::keyless_held_sql`).
const FRONT_SCAN_EVERY: Duration = Duration::from_secs(1);
/// Scopes whose claim mode is remembered (any tenant plus the tenants of a
/// fairness rotation, which holds at most 1,000).
const MAX_SCOPES: usize = 2_048;

/// The PostgreSQL store. Cheap to clone; clones share the pools, the
/// listener and the claim hints.
///
/// Two pools: the one it was built over, for admin queries, heartbeats and
/// migrations, and a claim pool to the same database with the claim session
/// settings ([`relay_connect_options`]) for claims and completions.
///
/// **Held backlog batches.** A keyless claim that follows a full one (a
/// backlog) does not lease its rows: it locks them `FOR UPDATE SKIP LOCKED`
/// in a transaction the store keeps open, on its own claim-pool connection,
/// until the batch is completed; the completion writes in that transaction
/// and commits. The locks are the lease and the transaction is the fence:
/// the server ends it once it has been idle for the lease
/// (`idle_in_transaction_session_timeout`), or when the relay's connection
/// drops, and then the rows are claimable again at once, untouched. This
/// writes each row once (its `DELETE`) instead of twice (lease, then
/// `DELETE`); see the README and BENCHMARKS.md. At most [`MAX_HELD`] batches
/// per store; beyond that, and for every other claim, rows are leased.
/// Differences a caller can see: such rows count as ready (or retrying),
/// not leased, in [`Store::stats`]; an attempt ended by the relay's death
/// is not counted (its transaction rolled back); a batch completed in parts
/// commits with its last part, and its parts must be completed one after
/// the other (a second `complete` of a batch while one runs reports its
/// rows lost); its transaction has a transaction id, so it shows in
/// [`PgStore::horizon`] while it is open; and schema changes to the table
/// wait for the open batches to end. [`PgStore::listen`] builds a store
/// with its own claim state: call it before claiming.
///
/// **Several relays on one backlog.** Backlog claims not restricted to one
/// tenant reserve the row numbers they are about to lock in the table's
/// claim hint (a sequence, migration 8) and start past the others'
/// reservations, so relays do not pay a lock attempt for each row another
/// relay holds. The relay's role needs `SELECT, UPDATE` on
/// `<table>_claim_hint` and `SELECT` on `<table>_seq` for that (the owner
/// has them); without them, or on a table not migrated yet, claims work as
/// before, past the store's own batches only.
#[derive(Clone)]
pub struct PgStore {
    outbox: PgOutbox,
    pool: PgPool,
    claims: PgPool,
    shared: Arc<Shared>,
}

struct Shared {
    wakeup: Arc<Wakeup>,
    listen: bool,
    listener: OnceLock<watch::Sender<()>>,
    /// Where the next claim's walk over distinct keys starts (`None`: from
    /// the first key).
    cursor: Mutex<Option<String>>,
    /// Which claim statement the next claim of each scope (any tenant, or
    /// one tenant) uses (`MODE_*`), from what its latest claim saw. Per
    /// scope because claims rotate across tenants, and one tenant's hot key
    /// must get the key walk on that tenant's own turns.
    modes: Mutex<HashMap<Option<String>, u8>>,
    /// Whether the latest claim found keyed rows claimable after the
    /// server's last crash recovery (see `sql::SETTLED`); logged on change.
    settled: AtomicBool,
    /// Rows this store leased and has not completed yet: the keyed window
    /// reaches this far past the batch (see [`keyed_window`]).
    held: Mutex<Holdings>,
    /// The batch sizes of this store's claims running now: rows they may be
    /// locking, which the keyed window of a concurrent claim reaches past.
    claiming: AtomicU64,
    /// How many rows of the latest any-tenant keyed window were under a
    /// live lease, this store's or other relays'.
    window_leased: AtomicU64,
    /// The open transactions of held claims, by lease token.
    held_batches: Mutex<HashMap<Uuid, HeldBatch>>,
    /// One permit per held claim, [`MAX_HELD`] in all.
    hold_permits: Arc<Semaphore>,
    /// When each scope's held claims last scanned from the front (see
    /// [`Shared::held_floor`]).
    front_scanned: Mutex<HashMap<Option<String>, Instant>>,
    /// The relay's own vacuums of the table (see `vacuum.rs`).
    vacuum: Mutex<VacuumRun>,
}

/// A held claim's open transaction (see `claim::keyless_held_sql`): its row
/// locks are the batch's lease. Ends once every row of the batch has an
/// outcome (committed), or, if that never comes, when a later claim finds
/// its lease over (dropped: rolled back, the rows claimable again; the
/// server's `idle_in_transaction_session_timeout` ends it at the same time
/// anyway).
struct HeldBatch {
    /// The connection whose open transaction holds the rows; `None` only
    /// while a completion runs on it, and once dropped. Dropped with the
    /// transaction still open (a lease that ran out, a completion the relay
    /// gave up), it is closed rather than handed back to the pool
    /// ([`Closing`]): the server rolls the transaction back as the socket
    /// closes, and a connection gone silent does not hold a pool slot while
    /// sqlx waits for its rollback and ping to be answered.
    conn: Option<Closing>,
    until: Instant,
    /// The batch's rows that have no outcome yet, by `seq`, with the
    /// address of the version the claim locked (see `tid.rs`).
    open: HashMap<i64, Tid>,
    /// The claim's scope (any tenant, or one) and its highest `seq`: where
    /// that scope's next held claim starts.
    scope: Option<String>,
    last_seq: i64,
    _permit: OwnedSemaphorePermit,
}

impl Drop for HeldBatch {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Dropping a pooled connection closes it on the Tokio runtime
            // (sqlx spawns a task and panics without one). Outside a
            // runtime (a store dropped after its runtime ended) let it go
            // unclosed: the process is ending, and the server rolls the
            // transaction back when the socket closes or the idle timeout
            // ends it.
            if tokio::runtime::Handle::try_current().is_ok() {
                drop(conn);
            } else {
                std::mem::forget(conn);
            }
        }
    }
}

/// A `complete` call's outcomes as the statements bind them: one array per
/// field, in the completions' order.
struct Outcomes {
    seqs: Vec<i64>,
    kinds: Vec<&'static str>,
    delays: Vec<i64>,
    errors: Vec<Option<String>>,
    parks: Vec<bool>,
}

impl Outcomes {
    fn new<'a>(completions: impl IntoIterator<Item = &'a Completion>) -> Result<Self, StoreError> {
        let mut out = Self {
            seqs: Vec::new(),
            kinds: Vec::new(),
            delays: Vec::new(),
            errors: Vec::new(),
            parks: Vec::new(),
        };
        for c in completions {
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
            out.seqs.push(c.seq);
            out.kinds.push(kind);
            out.delays.push(delay);
            out.errors.push(error);
            out.parks.push(park);
        }
        Ok(out)
    }

    fn all(&self, kind: &str) -> bool {
        self.kinds.iter().all(|k| *k == kind)
    }

    fn rows(&self) -> u64 {
        u64::try_from(self.seqs.len()).unwrap_or(u64::MAX)
    }
}

impl Shared {
    fn new(listen: bool) -> Self {
        Self {
            wakeup: Arc::default(),
            listen,
            listener: OnceLock::new(),
            cursor: Mutex::new(None),
            modes: Mutex::default(),
            settled: AtomicBool::new(true),
            held: Mutex::default(),
            claiming: AtomicU64::new(0),
            window_leased: AtomicU64::new(0),
            held_batches: Mutex::default(),
            hold_permits: Arc::new(Semaphore::new(MAX_HELD)),
            front_scanned: Mutex::default(),
            vacuum: Mutex::default(),
        }
    }

    /// Where a held claim of `scope` starts its scan (exclusive), and the
    /// floor it would have started past: past the batches of that scope
    /// this store holds, whose locked rows it would otherwise try and skip
    /// one by one; from the front (0) when it holds none, and at least every
    /// [`FRONT_SCAN_EVERY`], for rows below that nobody holds.
    fn held_floor(&self, scope: &Option<String>, now: Instant) -> (i64, i64) {
        let floor = self
            .held_batches()
            .values()
            .filter(|b| b.scope == *scope)
            .map(|b| b.last_seq)
            .max()
            .unwrap_or(0);
        if floor == 0 {
            return (0, 0);
        }
        let mut front = self.front_scanned();
        match front.get(scope) {
            Some(at) if now.saturating_duration_since(*at) < FRONT_SCAN_EVERY => (floor, floor),
            _ => {
                // bounded like the claim modes
                if front.len() >= MAX_SCOPES && !front.contains_key(scope) {
                    front.clear();
                }
                front.insert(scope.clone(), now);
                (0, floor)
            }
        }
    }

    /// A front scan of `scope` came back full of rows below the floor: more
    /// may wait there, so its next held claim scans from the front again.
    fn front_again(&self, scope: &Option<String>) {
        self.front_scanned().remove(scope);
    }

    fn front_scanned(&self) -> std::sync::MutexGuard<'_, HashMap<Option<String>, Instant>> {
        self.front_scanned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn vacuum(&self) -> std::sync::MutexGuard<'_, VacuumRun> {
        self.vacuum
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn held_batches(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, HeldBatch>> {
        self.held_batches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ends the held claims whose lease is over at `now`: their rows are
    /// anyone's again, and their connections go back to the pool.
    fn reap_held(&self, now: Instant) {
        let expired: Vec<HeldBatch> = self
            .held_batches()
            .extract_if(|_, b| b.until <= now)
            .map(|(_, b)| b)
            .collect();
        if !expired.is_empty() {
            tracing::warn!(
                batches = expired.len(),
                "held backlog batches were never completed within their lease; rolled back, their rows are claimable again"
            );
        }
        // dropped outside the lock: each queues its ROLLBACK
        drop(expired);
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Holdings> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The rows a store has leased and not completed yet, per lease.
///
/// A completion takes its rows off its lease once it has committed, so one
/// that the relay retries after a failure counts once; a lease whose
/// completions never commit stops counting when it expires (its rows are
/// then anyone's to claim again). Only a sizing hint for the keyed window:
/// a miscount makes claims cost more, never wrong.
#[derive(Debug, Default)]
struct Holdings {
    leases: HashMap<Uuid, (u64, Instant)>,
}

impl Holdings {
    /// `rows` leased under `token` until `until`.
    fn leased(&mut self, token: Uuid, rows: u64, until: Instant) {
        if rows > 0 {
            self.leases.insert(token, (rows, until));
        }
    }

    /// `rows` of the lease `token` completed (committed).
    fn completed(&mut self, token: Uuid, rows: u64) {
        if let Some((held, _)) = self.leases.get_mut(&token) {
            *held = held.saturating_sub(rows);
            if *held == 0 {
                self.leases.remove(&token);
            }
        }
    }

    /// The rows held under leases that have not expired at `now`; expired
    /// leases are forgotten.
    fn total(&mut self, now: Instant) -> u64 {
        self.leases.retain(|_, (_, until)| *until > now);
        self.leases
            .values()
            .fold(0, |sum, (rows, _)| sum.saturating_add(*rows))
    }
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
        let claims = claim_pool(&pool);
        Self {
            outbox,
            pool,
            claims,
            shared: Arc::new(Shared::new(true)),
        }
    }

    /// Connects to `url` with the default table: an admin pool of
    /// [`DEFAULT_POOL_SIZE`] connections (custom plans, no JIT) and a claim
    /// pool of [`CLAIM_POOL_SIZE`] (see [`relay_connect_options`]), both with
    /// an acquire timeout of [`ACQUIRE_TIMEOUT`].
    ///
    /// Errors name the URL without its password: an unreachable server is
    /// [`StoreError::Unavailable`] (retry later); a wrong password, unknown
    /// role or missing database is [`StoreError::Config`]. A refused
    /// connection is retried until [`ACQUIRE_TIMEOUT`], and the error then
    /// names the cause ("Connection refused"), not just the timeout.
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
        let options = admin_connect_options(options);
        let pool = match PgPoolOptions::new()
            .max_connections(DEFAULT_POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await
        {
            Ok(pool) => pool,
            Err(sqlx::Error::PoolTimedOut) => return Err(connect_timed_out(url, &options).await),
            Err(e) => return Err(map_connect(url, e)),
        };
        Ok(outbox.store(pool))
    }

    /// Disables (or re-enables) the LISTEN connection; the relay then wakes
    /// by polling and by its in-process waker only.
    #[must_use]
    pub fn listen(self, on: bool) -> Self {
        Self {
            outbox: self.outbox,
            pool: self.pool,
            claims: self.claims,
            shared: Arc::new(Shared::new(on)),
        }
    }

    /// This store keeping sent messages for `keep` instead of deleting them
    /// (see [`PgOutbox::retain_sent`]); clones share the pool and listener.
    #[must_use]
    pub fn retain_sent(self, keep: Option<Duration>) -> Self {
        Self {
            outbox: self.outbox.retain_sent(keep),
            ..self
        }
    }

    /// This store vacuuming the table itself from `dead_rows` dead rows
    /// while it claims keyed messages (see [`PgOutbox::vacuum_after`]);
    /// clones share the pool and listener.
    #[must_use]
    pub fn vacuum_after(self, dead_rows: Option<std::num::NonZeroU64>) -> Self {
        Self {
            outbox: self.outbox.vacuum_after(dead_rows),
            ..self
        }
    }

    /// The store's record of its own vacuums.
    pub(crate) fn vacuum_run(&self) -> std::sync::MutexGuard<'_, VacuumRun> {
        self.shared.vacuum()
    }

    /// The outbox table this store serves.
    pub fn outbox(&self) -> &PgOutbox {
        &self.outbox
    }

    /// The pool it was built over (admin queries, heartbeats, migrations).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Whether the LISTEN connection is up right now (false before the
    /// first [`Store::notified`] call starts it, and while it reconnects).
    pub fn is_listening(&self) -> bool {
        self.shared.wakeup.listening.load(Ordering::Relaxed)
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

    /// What holds back the server's cleanup horizon the longest: the
    /// session, in any database, whose snapshot or transaction is the
    /// oldest, or a prepared transaction, or a replication slot (`None` when
    /// nothing does but this query). It does not stop postbox (ordering needs
    /// no horizon), but the outbox's deleted rows cannot be vacuumed while
    /// it holds, which slows claims over time. Sessions in other databases
    /// are included: a slot or a prepared transaction holds every
    /// database's horizon, and so does a session for the shared catalogs.
    pub async fn horizon(&self) -> Result<Option<Holder>, StoreError> {
        Ok(self.horizon_holders(1).await?.into_iter().next())
    }

    /// The outbox table's vacuum state: dead rows since the last vacuum and
    /// when that was (see [`VacuumState`]).
    pub async fn vacuum_state(&self) -> Result<VacuumState, StoreError> {
        let r = sqlx::query(&self.outbox.inner.sql.vacuum_state)
            .fetch_one(&self.pool)
            .await
            .map_err(map)?;
        let since: Option<i64> = r.try_get(2).map_err(map)?;
        Ok(VacuumState {
            dead_rows: count_at(&r, 0)?,
            live_rows: count_at(&r, 1)?,
            since_vacuum: since.map(|us| micros_to_duration(Some(us))),
            autovacuum: r.try_get(3).map_err(map)?,
        })
    }

    /// The `n` oldest holders of the cleanup horizon, oldest first (see
    /// [`PgStore::horizon`]).
    pub async fn horizon_holders(&self, n: usize) -> Result<Vec<Holder>, StoreError> {
        let rows = sqlx::query(&self.outbox.inner.sql.horizon)
            .bind(clamp_i64(n))
            .fetch_all(&self.pool)
            .await
            .map_err(map)?;
        rows.iter()
            .map(|r| {
                let age: Option<i64> = r.try_get(1).map_err(map)?;
                Ok(Holder::new(
                    r.try_get(0).map_err(map)?,
                    age.map(|us| micros_to_duration(Some(us))),
                    r.try_get::<String, _>(2).map_err(map)?,
                ))
            })
            .collect()
    }

    /// The claim statements, for `EXPLAIN` by operators and tests: `(name,
    /// parameter types, SQL)` for the keyless claim (and its backlog forms,
    /// leasing and held), the keyed claim (and its backlog form) and the
    /// key-walk claim, for any tenant and restricted to one. Parameters:
    /// limit, lease µs, token; keyed claims and walk: window size; walk:
    /// cursor (`''` for the first key), walk length; the keyless backlog
    /// forms: the `seq` their scan starts after (0: from the front); the
    /// tenant last.
    pub fn claim_statements(outbox: &PgOutbox) -> Vec<(&'static str, &'static str, &str)> {
        let sql = &outbox.inner.sql;
        let (any, one) = (&sql.claim_any, &sql.claim_tenant);
        vec![
            ("keyless", "int8, int8, uuid", any.keyless.as_str()),
            (
                "keyless_bulk",
                "int8, int8, uuid, int8",
                any.keyless_bulk.as_str(),
            ),
            (
                "keyless_held",
                "int8, int8, uuid, int8",
                any.keyless_held.as_str(),
            ),
            ("keyed", "int8, int8, uuid, int8", any.keyed.as_str()),
            (
                "keyed_bulk",
                "int8, int8, uuid, int8",
                any.keyed_bulk.as_str(),
            ),
            (
                "walk",
                "int8, int8, uuid, int8, text, int4",
                any.walk.as_str(),
            ),
            (
                "keyless_tenant",
                "int8, int8, uuid, text",
                one.keyless.as_str(),
            ),
            (
                "keyless_bulk_tenant",
                "int8, int8, uuid, int8, text",
                one.keyless_bulk.as_str(),
            ),
            (
                "keyless_held_tenant",
                "int8, int8, uuid, int8, text",
                one.keyless_held.as_str(),
            ),
            (
                "keyed_tenant",
                "int8, int8, uuid, int8, text",
                one.keyed.as_str(),
            ),
            (
                "keyed_bulk_tenant",
                "int8, int8, uuid, int8, text",
                one.keyed_bulk.as_str(),
            ),
            (
                "walk_tenant",
                "int8, int8, uuid, int8, text, int4, text",
                one.walk.as_str(),
            ),
        ]
    }

    /// The retention cleanup's statement (parameters: age µs, limit; see
    /// [`Store::purge_sent`]), for `EXPLAIN`.
    pub fn purge_sent_sql_for_explain(outbox: &PgOutbox) -> &str {
        &outbox.inner.sql.purge_sent
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

    /// After an operator's replay, skip or purge made `n` rows claimable (or
    /// unparked their keys): NOTIFY the outbox's channel so that relays
    /// listening on it claim now rather than at their next poll. Only a
    /// hint, so a failure is logged, not returned.
    async fn announce(&self, n: u64) {
        if n == 0 {
            return;
        }
        if let Err(e) = sqlx::query("SELECT pg_notify($1, '')")
            .bind(self.outbox.channel())
            .execute(&self.pool)
            .await
        {
            tracing::debug!(error = %map(e), "NOTIFY after an admin change failed; relays see it at their next poll");
        }
    }

    /// Logs when keyed claims stop or resume after a database crash.
    fn note_settled(&self, settled: bool, lease: Duration) {
        if self.shared.settled.swap(settled, Ordering::Relaxed) == settled {
            return;
        }
        if settled {
            tracing::info!("keyed messages are claimable again");
        } else {
            tracing::warn!(
                ?lease,
                "the database recovered from a crash less than one lease ago: keyed messages wait until it has passed, so that no claim the crash forgot can still be publishing"
            );
        }
    }

    /// The claim statement for `scope`'s next claim; a scope not seen yet
    /// looks at everything.
    fn mode(&self, scope: &Option<String>) -> u8 {
        self.modes().get(scope).copied().unwrap_or(MODE_WALK)
    }

    /// Which claim statement this store's next claim for `tenant` (`None`:
    /// any tenant) runs first: `keyless`, `keyless_bulk`, `keyed`,
    /// `keyed_bulk` or `walk`.
    /// For tests and diagnostics.
    #[doc(hidden)]
    pub fn next_claim_statement(&self, tenant: Option<&str>) -> &'static str {
        match self.mode(&tenant.map(str::to_owned)) {
            MODE_KEYLESS => "keyless",
            MODE_BULK => "keyless_bulk",
            MODE_WINDOW | MODE_RACED => "keyed",
            MODE_KEYED_BULK => "keyed_bulk",
            _ => "walk",
        }
    }

    /// How many held claims (backlog batches whose transaction is open
    /// while they are published) this store has now. For tests and
    /// diagnostics.
    #[doc(hidden)]
    pub fn held_batches(&self) -> usize {
        self.shared.held_batches().len()
    }

    /// Writes `out` under lease `token` on `conn` and returns how many rows
    /// it applied: all sent, the plain statement counted by its command tag
    /// (see `sql.rs`); otherwise the mixed statement. `held`: the rows are a
    /// held batch's, locked by the transaction on `conn` and never stamped
    /// with the token, at these addresses (one per row of `out`, in its
    /// order): sent rows are reached by address and need no guard, and the
    /// mixed statement needs the stamp (`held_stamp`) first.
    async fn write_outcomes(
        &self,
        conn: &mut PgConnection,
        token: Uuid,
        out: &Outcomes,
        held: Option<&[Tid]>,
    ) -> Result<u64, sqlx::Error> {
        let sql = &self.outbox.inner.sql;
        let keep = self.outbox.sent_retention().is_some();
        if out.seqs.is_empty() {
            return Ok(0);
        }
        if out.all("sent") {
            let query = match (held, keep) {
                (Some(tids), false) => sqlx::query(&sql.held_sent).bind(tids),
                (Some(tids), true) => sqlx::query(&sql.held_sent_keep).bind(tids),
                (None, false) => sqlx::query(&sql.complete_sent)
                    .bind(token)
                    .bind(&out.seqs[..]),
                (None, true) => sqlx::query(&sql.complete_sent_keep)
                    .bind(token)
                    .bind(&out.seqs[..]),
            };
            let done = query.execute(&mut *conn).await?;
            // A held row's address cannot change before this statement
            // (see `tid.rs`): every one must have been found.
            debug_assert!(
                held.is_none_or(|tids| done.rows_affected() == tids.len() as u64),
                "a held batch's sent rows were not all at the addresses its claim returned"
            );
            return Ok(done.rows_affected());
        }
        if held.is_some() {
            sqlx::query(&sql.held_stamp)
                .bind(token)
                .bind(&out.seqs[..])
                .execute(&mut *conn)
                .await?;
        }
        let mixed = if keep {
            &sql.complete_keep
        } else {
            &sql.complete
        };
        let applied: i64 = sqlx::query(mixed)
            .bind(token)
            .bind(&out.seqs[..])
            .bind(&out.kinds[..])
            .bind(&out.delays[..])
            .bind(&out.errors[..])
            .bind(&out.parks[..])
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
        Ok(u64::try_from(applied).unwrap_or(0))
    }

    /// Records the outcomes of a held claim in its own transaction, and
    /// commits once every row of the batch has one (the relay completes a
    /// batch in one call; a caller that completes it in parts keeps it
    /// open until the last). Released rows need no write: the commit frees
    /// them untouched. A `seq` not of this batch is reported `lost`. A
    /// transaction that ended first (the server's idle timeout at the
    /// lease's end, the connection lost, the server restarted) took its
    /// writes with it, earlier parts' included: its rows are claimable
    /// again, untouched, and this call's are reported `lost`.
    async fn complete_held(
        &self,
        token: Uuid,
        mut batch: HeldBatch,
        completions: &[Completion],
    ) -> Result<CompleteReport, StoreError> {
        let n = u64::try_from(completions.len()).unwrap_or(u64::MAX);
        let (mut mine, mut released) = (0u64, 0u64);
        let mut tids = Vec::with_capacity(completions.len());
        let writes = Outcomes::new(completions.iter().filter(|c| {
            let Some(tid) = batch.open.remove(&c.seq) else {
                return false;
            };
            mine += 1;
            let release = c.disposition == Disposition::Release;
            released += u64::from(release);
            if !release {
                tids.push(tid);
            }
            !release
        }))?;
        let finished = batch.open.is_empty();
        let Some(mut conn) = batch.conn.take() else {
            return Ok(CompleteReport {
                applied: 0,
                lost: n,
            });
        };
        // Cut short (the relay gives the recording up), `conn` is dropped
        // here with its transaction open, and closed (see `HeldBatch`).
        let recorded = async {
            let applied = self
                .write_outcomes(&mut conn, token, &writes, Some(&tids))
                .await?;
            if finished {
                conn.execute("COMMIT").await?;
            }
            Ok::<_, sqlx::Error>(applied)
        }
        .await;
        let report = match recorded {
            Ok(applied) => {
                if finished {
                    conn.done();
                } else {
                    batch.conn = Some(conn);
                    self.shared.held_batches().insert(token, batch);
                }
                let applied = applied.saturating_add(released);
                CompleteReport {
                    applied,
                    lost: n.saturating_sub(applied),
                }
            }
            Err(e) => {
                tracing::warn!(
                    error = %map(e),
                    rows = n,
                    "a held batch's transaction ended before its outcomes were recorded; its rows are claimable again"
                );
                CompleteReport {
                    applied: 0,
                    lost: n,
                }
            }
        };
        // recorded or not, this store no longer holds these rows
        self.shared.held().completed(token, mine);
        Ok(report)
    }

    fn set_mode(&self, scope: &Option<String>, mode: u8) {
        let mut modes = self.modes();
        // bounded: forgetting costs one claim that looks at everything
        if modes.len() >= MAX_SCOPES && !modes.contains_key(scope) {
            modes.clear();
        }
        modes.insert(scope.clone(), mode);
    }

    fn modes(&self) -> std::sync::MutexGuard<'_, HashMap<Option<String>, u8>> {
        self.shared
            .modes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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

/// Column `i` of `r`, a count (`int8`), as `u64` (a negative one as 0).
pub(crate) fn count_at(r: &PgRow, i: usize) -> Result<u64, StoreError> {
    Ok(r.try_get::<i64, _>(i).map_err(map)?.max(0).unsigned_abs())
}

pub(crate) fn micros_to_duration(us: Option<i64>) -> Duration {
    Duration::from_micros(us.unwrap_or(0).max(0).unsigned_abs())
}

fn duration_micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// An age as µs for `now() - age`, capped at 100 years: past that,
/// PostgreSQL's timestamps run out of range (an error, not "nothing").
fn age_micros(d: Duration) -> i64 {
    duration_micros(d.min(Duration::from_secs(100 * 366 * 24 * 3600)))
}

fn clamp_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The columns every claim statement returns first, in this order (see
/// `claim::columns_of`); [`decode`] reads them by position. By name, each
/// column of each row cost a hash lookup and string comparisons, among the
/// relay's top symbols in `perf` at batch 1,000 (BENCHMARKS.md, session 8).
const CLAIMED_COLUMNS: [&str; 10] = [
    "seq",
    "id",
    "topic",
    "key",
    "payload",
    "headers",
    "tenant",
    "attempts",
    "max_attempts",
    "created_us",
];
/// The column of a held claim's rows that holds each one's address.
const HELD_TID: &str = "row_tid";
const SEQ: usize = 0;
const ID: usize = 1;
const TOPIC: usize = 2;
const KEY: usize = 3;
const PAYLOAD: usize = 4;
const HEADERS: usize = 5;
const TENANT: usize = 6;
const ATTEMPTS: usize = 7;
const MAX_ATTEMPTS: usize = 8;
const CREATED_US: usize = 9;

/// Whether `r`'s first columns are [`CLAIMED_COLUMNS`] (checked once per
/// claim in debug builds, so every test of every claim statement checks it).
fn claimed_columns_in_order(r: &PgRow) -> bool {
    let columns = r.columns();
    columns.len() >= CLAIMED_COLUMNS.len()
        && CLAIMED_COLUMNS
            .iter()
            .zip(columns)
            .all(|(want, c)| c.name() == *want)
}

/// Decodes one claimed row, or says why it cannot be.
fn decode(r: &PgRow) -> Result<Result<Message, Malformed>, sqlx::Error> {
    let seq: i64 = r.try_get(SEQ)?;
    let key: Option<String> = r.try_get(KEY)?;
    let bad = |reason: String| Malformed {
        seq,
        key: key.clone(),
        reason,
    };
    let headers_text: &str = r.try_get(HEADERS)?;
    let headers: BTreeMap<String, String> = match serde_json::from_str(headers_text) {
        Ok(h) => h,
        Err(e) => {
            return Ok(Err(bad(format!(
                "headers are not a JSON object of strings ({e}): {}",
                truncate(headers_text, 200)
            ))));
        }
    };
    let attempts: i32 = r.try_get(ATTEMPTS)?;
    let max_attempts: Option<i32> = r.try_get(MAX_ATTEMPTS)?;
    let max_attempts = match max_attempts.map(u32::try_from).transpose() {
        Ok(m) => m,
        Err(_) => {
            return Ok(Err(bad(format!(
                "max_attempts {max_attempts:?} is negative"
            ))));
        }
    };
    let payload: Vec<u8> = r.try_get(PAYLOAD)?;
    Ok(Ok(Message::new(
        r.try_get(ID)?,
        seq,
        r.try_get(TOPIC)?,
        key,
        Bytes::from(payload),
        headers,
        r.try_get(TENANT)?,
        u32::try_from(attempts).unwrap_or(0),
        max_attempts,
        from_unix_micros(r.try_get(CREATED_US)?),
    )))
}

/// The counts of a `stats` row whose first count is column `at`.
fn stats_from(r: &PgRow, at: usize) -> Result<Stats, StoreError> {
    let n = |i: usize| -> Result<u64, StoreError> {
        Ok(u64::try_from(r.try_get::<i64, _>(at + i).map_err(map)?).unwrap_or(0))
    };
    let oldest: Option<i64> = r.try_get(at + 7).map_err(map)?;
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

/// How a held claim's transaction begins: the server ends it (rolling it
/// back, its rows claimable again) once it has sat idle for the lease, so a
/// relay that stalls mid-publish loses its rows when its lease ends, as it
/// would a leasing claim's. A number, never text from outside.
fn held_begin(lease: Duration) -> String {
    let ms = lease.as_millis().clamp(1, i32::MAX as u128);
    format!("BEGIN; SET LOCAL idle_in_transaction_session_timeout = {ms}")
}

/// Whether a claim under `lease` may be held: the server's idle timeout
/// (an `int` of ms) and this process's clock can both express its end.
fn holdable(lease: Duration, now: Instant) -> bool {
    lease.as_millis() <= i32::MAX as u128 && now.checked_add(lease).is_some()
}

/// The keyed claim's window: how many of the oldest pending keyed rows it
/// looks at for heads. The oldest keyed rows are usually leased ones: this
/// relay's batches in flight (up to three per worker), its concurrent
/// claims, other relays' batches. A window that holds only those finds no
/// head, so the claim falls back on the key walk, which costs more and
/// takes heads in key order rather than oldest first. So the window
/// reaches `WINDOW_FACTOR` batches past `leased`, those rows (counting at
/// most `MAX_LEASED_FACTOR` batches of them): the larger of the rows this
/// store holds or is claiming now and the leased rows the previous window
/// held, which counts other relays' too.
///
/// The window costs one read of its rows and a hash aggregate by key hash,
/// whatever the batch needs: 0.3 ms for a window of 400 rows, 1.3 ms for
/// 3,000 (`EXPLAIN ANALYZE`, session 9), more for 10,000 (batch 1,000
/// with many rows held). `held` counts keyless and
/// tenant-claimed rows too, which are not in this window; the cap bounds
/// what that costs.
fn keyed_window(limit: usize, leased: u64) -> i64 {
    let leased = usize::try_from(leased).unwrap_or(usize::MAX);
    clamp_i64(
        limit
            .saturating_mul(WINDOW_FACTOR)
            .saturating_add(leased.min(limit.saturating_mul(MAX_LEASED_FACTOR))),
    )
}

/// Subtracts `rows` from a store's count of rows being claimed when
/// dropped: when a claim ends, however it ends (done, failed, cancelled).
struct Untally<'a> {
    count: &'a AtomicU64,
    rows: u64,
}

impl Drop for Untally<'_> {
    fn drop(&mut self) {
        // the closure always returns Some, so this cannot fail
        let _ = self
            .count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(self.rows))
            });
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
        let claimed_at = Instant::now();
        self.shared.reap_held(claimed_at);
        let limit = req.limit.max(1);
        let lease = duration_micros(req.lease);
        // Rows this store has leased or is leasing in another claim now:
        // the oldest keyed rows, usually, which this claim cannot have.
        let ours = u64::try_from(limit).unwrap_or(u64::MAX);
        let claiming = self.shared.claiming.fetch_add(ours, Ordering::Relaxed);
        // another claim of this store was running when this one began
        let concurrent = claiming > 0;
        let _claiming = Untally {
            count: &self.shared.claiming,
            rows: ours,
        };
        let held = self.shared.held().total(claimed_at);
        let leased = self.shared.window_leased.load(Ordering::Relaxed);
        let window = keyed_window(limit, held.saturating_add(claiming).max(leased));
        let walk_len = i32::try_from(limit.saturating_mul(WALK_FACTOR).clamp(MIN_WALK, 10_000))
            .unwrap_or(10_000);
        // Which claim: keyless while no keyed row is pending; the keyed
        // window while most keyed rows are heads; with the key walk while
        // the previous claim of this scope found the window short (a hot
        // key's backlog in front). The hints come from the previous claim;
        // a scope's first claim looks at everything.
        let sql = &self.outbox.inner.sql;
        let statements = match req.tenant {
            Some(_) => &sql.claim_tenant,
            None => &sql.claim_any,
        };
        let mut mode = self.mode(&req.tenant);
        let (mut walks, mut wrapped) = (0u32, false);
        // a held claim's open transaction and its permit
        let mut held = None;
        let (rows, expires) = loop {
            let walk_start = self.walk_from();
            // A backlog claim holds its transaction open when a permit is
            // free (and the lease fits the server's idle timeout), and
            // leases its rows otherwise.
            let hold = (mode == MODE_BULK && holdable(req.lease, claimed_at))
                .then(|| {
                    Arc::clone(&self.shared.hold_permits)
                        .try_acquire_owned()
                        .ok()
                })
                .flatten();
            let (start, floor) = match mode {
                MODE_BULK => self.shared.held_floor(&req.tenant, claimed_at),
                _ => (0, 0),
            };
            let query = match mode {
                MODE_KEYLESS => sqlx::query(&statements.keyless),
                MODE_BULK if hold.is_some() => sqlx::query(&statements.keyless_held),
                MODE_BULK => sqlx::query(&statements.keyless_bulk),
                MODE_WINDOW | MODE_RACED => sqlx::query(&statements.keyed),
                MODE_KEYED_BULK => sqlx::query(&statements.keyed_bulk),
                _ => sqlx::query(&statements.walk),
            }
            .bind(clamp_i64(limit))
            .bind(lease)
            .bind(token);
            let query = match mode {
                MODE_BULK => query.bind(start),
                MODE_KEYLESS => query,
                MODE_WINDOW | MODE_RACED | MODE_KEYED_BULK => query.bind(window),
                _ => query
                    .bind(window)
                    .bind(walk_start.as_deref().unwrap_or_default())
                    .bind(walk_len),
            };
            let query = match &req.tenant {
                Some(tenant) => query.bind(tenant.as_str()),
                None => query,
            };
            let rows = match hold {
                Some(permit) => {
                    // The transaction is begun and ended by hand on a
                    // connection that is closed if anything cuts it short
                    // (see `HeldBatch`); sqlx's `Transaction` would hand it
                    // back to the pool, to be rolled back and pinged there.
                    let mut conn = Closing::acquire(&self.claims).await.map_err(map)?;
                    let begin = held_begin(req.lease);
                    conn.execute(begin.as_str()).await.map_err(map)?;
                    let rows = query.fetch_all(&mut *conn).await.map_err(map)?;
                    if rows.is_empty() {
                        conn.execute("ROLLBACK").await.map_err(map)?;
                        conn.done();
                    } else {
                        held = Some((conn, permit, start == 0 && floor > 0, floor));
                    }
                    rows
                }
                None => {
                    let mut conn = Closing::acquire(&self.claims).await.map_err(map)?;
                    let rows = query.fetch_all(&mut *conn).await.map_err(map)?;
                    conn.done();
                    rows
                }
            };
            let Some(first) = rows.first() else {
                // A backlog form leased nothing, and says nothing more: ask
                // the wrapped statement that does (keyed rows may have
                // arrived; the heads may be past the window).
                match mode {
                    MODE_BULK => mode = MODE_KEYLESS,
                    MODE_KEYED_BULK => mode = MODE_WINDOW,
                    _ => {
                        return Err(StoreError::Database(
                            "the claim statement returned no row".into(),
                        ));
                    }
                }
                continue;
            };
            debug_assert!(
                claimed_columns_in_order(first),
                "a claim statement's first columns must be CLAIMED_COLUMNS"
            );
            let claimed_nothing =
                rows.len() == 1 && first.try_get::<Option<i64>, _>(SEQ).map_err(map)?.is_none();
            let keyed: bool = first.try_get("keyed_pending").map_err(map)?;
            let short: bool = first.try_get("short").map_err(map)?;
            let raced: bool = first.try_get("raced").map_err(map)?;
            let next = next_mode(
                Seen {
                    keyed,
                    short,
                    raced,
                    nothing: claimed_nothing,
                    full: rows.len() >= limit,
                    concurrent,
                },
                mode,
            );
            self.set_mode(&req.tenant, next);
            if let Some(leased) = first
                .try_get::<Option<i64>, _>("window_leased")
                .map_err(map)?
            {
                self.shared
                    .window_leased
                    .store(u64::try_from(leased).unwrap_or(0), Ordering::Relaxed);
            }
            self.note_settled(first.try_get("settled").map_err(map)?, req.lease);
            // NULL: the walk did not run; its cursor stays.
            let mut walk_on = false;
            if let Some(walked) = first.try_get::<Option<i64>, _>("walk_len").map_err(map)? {
                let end: Option<String> = first.try_get("walk_end").map_err(map)?;
                // A short walk reached the last key: start over next time.
                let reached_end = walked < i64::from(walk_len);
                self.set_walk(if reached_end { None } else { end });
                walks += 1;
                // If it leased nothing, a claimable head may lie beyond the
                // keys it walked: walk on from where it stopped, and from the
                // first key once if it started further on (bounded).
                walk_on = walks < MAX_WALKS
                    && if reached_end {
                        walk_start.is_some() && !std::mem::replace(&mut wrapped, true)
                    } else {
                        true
                    };
            }
            // Nothing claimed, and the hint says a wider statement could
            // have found something (keyed rows arrived while the keyless one
            // ran; the window was full of a hot key's rows): look again with
            // it now. An empty claim must mean "nothing claimable", or a
            // relay woken for exactly these rows would go back to sleep for a
            // poll interval. (One exception: a claim raced to nothing by
            // another claim of this store, `MODE_RACED`, returns empty and
            // looks again next time, when those rows are most likely
            // leased; claimable heads past the window may then wait one poll
            // interval.) A claim that did lease rows returns them; the
            // relay claims again at once after a batch anyway. `wider`
            // bounds this to two more statements; the walk to `MAX_WALKS`.
            if claimed_nothing && (wider(next, mode) || (next == MODE_WALK && walk_on)) {
                mode = next;
                continue;
            }
            let expires: Option<i64> = first.try_get("lease_until_us").map_err(map)?;
            break (rows, expires);
        };
        let mut messages = Vec::with_capacity(rows.len());
        let mut malformed = Vec::new();
        // a held claim's rows: where each one is (see `tid.rs`)
        let tid_at = match (&held, rows.first()) {
            (Some(_), Some(first)) => Some(first.try_column(HELD_TID).map_err(map)?.ordinal()),
            _ => None,
        };
        let mut tids = HashMap::with_capacity(if tid_at.is_some() { rows.len() } else { 0 });
        for r in &rows {
            let Some(seq) = r.try_get::<Option<i64>, _>(SEQ).map_err(map)? else {
                continue; // the "nothing claimed" row
            };
            if let Some(at) = tid_at {
                tids.insert(seq, r.try_get::<Tid, _>(at).map_err(map)?);
            }
            match decode(r).map_err(map)? {
                Ok(m) => messages.push(m),
                Err(bad) => malformed.push(bad),
            }
        }
        if self.outbox.vacuum_threshold().is_some() && messages.iter().any(|m| m.key.is_some()) {
            // keyed messages are draining: keyed claims pay for the keyed
            // rows deleted since the table's last vacuum
            self.vacuum_soon();
        }
        // `keyless_bulk` returns its rows in no set order (in practice
        // already sorted, which this sort checks in one pass)
        messages.sort_unstable_by_key(|m| m.seq);
        let leased = u64::try_from(messages.len() + malformed.len()).unwrap_or(u64::MAX);
        // the lease as this process sees it; the database's clock decides
        // when it ends, this only stops counting the rows (a lease too long
        // for `Instant` is simply not counted)
        let until = claimed_at.checked_add(req.lease).unwrap_or(claimed_at);
        self.shared.held().leased(token, leased, until);
        if let Some((conn, permit, front, floor)) = held {
            let last_seq = tids.keys().copied().max().unwrap_or(0);
            if front && rows.len() >= limit && last_seq < floor {
                // a full batch from below the floor: more may be there
                self.shared.front_again(&req.tenant);
            }
            self.shared.held_batches().insert(
                token,
                HeldBatch {
                    conn: Some(conn),
                    until,
                    open: tids,
                    scope: req.tenant.clone(),
                    last_seq,
                    _permit: permit,
                },
            );
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
        let held = self.shared.held_batches().remove(&token);
        if let Some(batch) = held {
            return self.complete_held(token, batch, completions).await;
        }
        let out = Outcomes::new(completions)?;
        let n = out.rows();
        let mut conn = Closing::acquire(&self.claims).await.map_err(map)?;
        let applied = self
            .write_outcomes(&mut conn, token, &out, None)
            .await
            .map_err(map)?;
        conn.done();
        // Committed: these rows no longer fill the front of the window of
        // the claims that follow. Not before, and not on failure: the relay
        // retries the same completions, and an expired lease stops counting.
        self.shared.held().completed(token, n);
        Ok(CompleteReport {
            applied,
            lost: n.saturating_sub(applied),
        })
    }

    fn notified(&self) -> impl std::future::Future<Output = ()> + Send {
        // subscribed now, so a notification that arrives before the future
        // is first polled still ends it (and before the listener starts, so
        // its first "look now" wake is not missed either)
        let woken = self.shared.listen.then(|| self.shared.wakeup.subscribe());
        self.start_listener();
        async move {
            if let Some(mut rx) = woken
                && rx.changed().await.is_ok()
            {
                return;
            }
            // not listening, or the sender is gone with the last store handle
            std::future::pending::<()>().await;
        }
    }

    async fn stats(&self, filter: &Filter) -> Result<Stats, StoreError> {
        let r = bind_filter(sqlx::query(&self.outbox.inner.sql.stats), filter)
            .fetch_one(&self.pool)
            .await
            .map_err(map)?;
        stats_from(&r, 0)
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
                let sent_at: Option<i64> = r.try_get(14).map_err(map)?;
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
                )
                .sent_at(sent_at.map(from_unix_micros)))
            })
            .collect()
    }

    async fn replay(&self, filter: &Filter) -> Result<u64, StoreError> {
        let done = bind_filter(sqlx::query(&self.outbox.inner.sql.replay), filter)
            .execute(&self.pool)
            .await
            .map_err(map)?;
        self.announce(done.rows_affected()).await;
        Ok(done.rows_affected())
    }

    async fn skip(&self, filter: &Filter) -> Result<u64, StoreError> {
        let done = bind_filter(sqlx::query(&self.outbox.inner.sql.skip), filter)
            .execute(&self.pool)
            .await
            .map_err(map)?;
        self.announce(done.rows_affected()).await;
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
        if query.status == Status::Dead {
            // a purged parked row no longer holds its key back
            self.announce(done.rows_affected()).await;
        }
        Ok(done.rows_affected())
    }

    fn sent_retention(&self) -> Option<Duration> {
        self.outbox.sent_retention()
    }

    async fn purge_sent(&self, older_than: Duration, limit: usize) -> Result<u64, StoreError> {
        // on a claim session: planned once, and robust like the claims
        let deleted: i64 = sqlx::query(&self.outbox.inner.sql.purge_sent)
            .bind(age_micros(older_than))
            .bind(clamp_i64(limit))
            .fetch_one(&self.claims)
            .await
            .map_err(map)?
            .try_get(0)
            .map_err(map)?;
        Ok(u64::try_from(deleted).unwrap_or(0))
    }

    async fn stats_by(&self, filter: &Filter, by: GroupBy) -> Result<Vec<GroupStats>, StoreError> {
        let sql = &self.outbox.inner.sql;
        let text = match by {
            GroupBy::Tenant => &sql.stats_by_tenant,
            _ => &sql.stats_by_topic,
        };
        let rows = bind_filter(sqlx::query(text), filter)
            .fetch_all(&self.pool)
            .await
            .map_err(map)?;
        let mut groups = rows
            .iter()
            .map(|r| {
                Ok(GroupStats::new(
                    r.try_get(0).map_err(map)?,
                    stats_from(r, 1)?,
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        // byte order, `None` first, whatever the database's collation
        groups.sort_by(|a, b| a.group.cmp(&b.group));
        Ok(groups)
    }

    async fn heartbeat(&self, heartbeat: &RelayHeartbeat) -> Result<(), StoreError> {
        crate::heartbeat::write(&self.outbox, &self.pool, heartbeat).await
    }

    async fn relays(&self) -> Result<Vec<RelayRecord>, StoreError> {
        crate::heartbeat::list(&self.outbox, &self.pool).await
    }

    async fn remove_relay(&self, relay_id: Uuid) -> Result<bool, StoreError> {
        crate::heartbeat::remove(&self.outbox, &self.pool, relay_id).await
    }

    async fn pending_tenants(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(&self.outbox.inner.sql.pending_tenants)
            .bind(clamp_i64(limit))
            .fetch_all(&self.claims)
            .await
            .map_err(map)
    }

    async fn holdups(&self) -> Result<Holdups, StoreError> {
        let key_holder = self.blockers().await?.into_iter().next().map(|b| {
            Holder::new(
                Some(b.pid),
                Some(b.xact_age),
                format!(
                    "pid {} ({}) holds {} key(s), {} producer(s) waiting",
                    b.pid,
                    b.state.as_deref().unwrap_or("unknown state"),
                    b.keys_held,
                    b.waiters
                ),
            )
        });
        // the vacuum state is a hint: its failure does not hide the holders
        let unvacuumed = match self.vacuum_state().await {
            Ok(v) => Some(v.dead_rows),
            Err(e) => {
                tracing::debug!(error = %e, "reading the outbox table's vacuum state failed");
                None
            }
        };
        Ok(Holdups::new(key_holder, self.horizon().await?).with_unvacuumed_rows(unvacuumed))
    }
}

#[cfg(test)]
mod tests {
    use super::{
        Holdings, MODE_BULK, MODE_KEYED_BULK, MODE_KEYLESS, MODE_RACED, MODE_WALK, MODE_WINDOW,
        Seen, claim_connect_options, keyed_window, next_mode, relay_connect_options, wider,
    };
    use sqlx::postgres::PgConnectOptions;
    use std::time::{Duration, Instant};
    use uuid::Uuid;

    #[test]
    fn only_the_claim_pool_commits_without_the_flush() {
        let base = PgConnectOptions::new();
        let claim = claim_connect_options(base.clone());
        let relay = relay_connect_options(base);
        let (claim, relay) = (
            claim.get_options().unwrap_or_default(),
            relay.get_options().unwrap_or_default(),
        );
        assert!(claim.contains("-c synchronous_commit=off"), "{claim}");
        assert!(claim.contains("-c lock_timeout=2s"), "{claim}");
        assert!(
            claim.contains("-c plan_cache_mode=force_generic_plan"),
            "{claim}"
        );
        assert!(!relay.contains("synchronous_commit"), "{relay}");
    }

    #[test]
    fn held_rows_count_each_committed_completion_once_and_end_with_the_lease() {
        let now = Instant::now();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut h = Holdings::default();
        h.leased(a, 100, now + Duration::from_secs(30));
        h.leased(b, 40, now + Duration::from_secs(10));
        h.leased(Uuid::new_v4(), 0, now + Duration::from_secs(30));
        assert_eq!(h.total(now), 140);
        // part of a's batch committed (a key's rows recorded on their own)
        h.completed(a, 30);
        assert_eq!(h.total(now), 110);
        // a completion that failed was not counted; its retry commits once
        h.completed(a, 70);
        assert_eq!(h.total(now), 40, "a's rows are all done");
        // a retry whose first attempt did commit after all counts nothing more
        h.completed(a, 70);
        assert_eq!(h.total(now), 40, "no other lease pays for a's retry");
        // b's completions never committed: its rows stop counting at expiry
        assert_eq!(h.total(now + Duration::from_secs(11)), 0);
        h.completed(b, 40);
        assert_eq!(h.total(now), 0);
    }

    #[test]
    fn a_claim_raced_by_its_own_store_looks_at_the_window_again_before_walking() {
        let seen = Seen {
            keyed: true,
            short: false,
            raced: true,
            nothing: true,
            full: false,
            concurrent: true,
        };
        // raced to nothing while another claim of this store ran: the
        // window once more, and no second statement in this claim
        assert_eq!(next_mode(seen, MODE_WINDOW), MODE_RACED);
        assert!(!wider(MODE_RACED, MODE_WINDOW));
        // raced to nothing again: walk, at once
        assert_eq!(next_mode(seen, MODE_RACED), MODE_WALK);
        assert!(wider(MODE_WALK, MODE_RACED));
        // a walk raced to nothing walks on (the walk's own bound applies)
        assert_eq!(next_mode(seen, MODE_WALK), MODE_WALK);
        // raced to nothing with no claim of this store running: walk
        let alone = Seen {
            concurrent: false,
            ..seen
        };
        assert_eq!(next_mode(alone, MODE_WINDOW), MODE_WALK);
        // busy keys (neither short nor raced): the window, no walk
        let busy = Seen {
            raced: false,
            ..seen
        };
        assert_eq!(next_mode(busy, MODE_WINDOW), MODE_WINDOW);
        assert_eq!(next_mode(busy, MODE_WALK), MODE_WINDOW);
        // full claims move to the backlog forms, keyed or keyless
        let full = Seen {
            raced: false,
            nothing: false,
            full: true,
            ..seen
        };
        assert_eq!(next_mode(full, MODE_WINDOW), MODE_KEYED_BULK);
        assert_eq!(
            next_mode(
                Seen {
                    keyed: false,
                    ..full
                },
                MODE_KEYLESS
            ),
            MODE_BULK
        );
        assert_eq!(
            next_mode(
                Seen {
                    short: true,
                    ..full
                },
                MODE_WINDOW
            ),
            MODE_WALK
        );
    }

    #[test]
    fn the_keyed_window_reaches_past_the_leased_rows_within_a_bound() {
        assert_eq!(
            keyed_window(100, 0),
            200,
            "two batches when nothing is leased"
        );
        assert_eq!(keyed_window(100, 350), 550, "past the 350 leased rows");
        assert_eq!(
            keyed_window(100, 1_000_000),
            1_000,
            "at most eight batches of leased rows"
        );
        assert_eq!(keyed_window(1, 0), 2);
        assert_eq!(keyed_window(usize::MAX, u64::MAX), i64::MAX, "no overflow");
    }
}
