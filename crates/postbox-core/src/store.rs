//! The [`Store`] trait: where messages wait, how relays lease them, and the
//! admin queries an operator needs.
//!
//! The state machine every store implements (and the conformance suite in
//! `postbox-testkit` checks):
//!
//! ```text
//!            claim (attempts += 1, lease token + deadline)
//!  pending ───────────────────────────────────────────────▶ leased
//!     ▲  ▲                                                   │ │ │
//!     │  └──── Retry (available_at = now + delay) ───────────┘ │ │
//!     │  └──── lease deadline passes (relay died) ─────────────┘ │
//!     │                                  Sent ──▶ deleted / sent │
//!     └── replay ── dead ◀──────────────── Dead ─────────────────┘
//! ```
//!
//! A keyed message can be claimed only when it is the head of its key: no
//! earlier message of that key is pending, leased, or dead and parked. Every
//! completion carries the lease token; a completion whose token no longer
//! matches the row changes nothing (fencing).
//!
//! Retention: by default `Sent` deletes the row. A store built with a
//! retention (`retain_sent(Some(period))` on each store crate's outbox or
//! store type) instead keeps it as `sent`, stamped with `sent_at` on the
//! store's clock: a sent row is never claimed again, never holds its key
//! back, and is counted in [`Stats::sent`] and listed as [`Status::Sent`].
//! [`Store::purge_sent`] deletes kept rows past a given age in small
//! batches; a running [`Relay`](crate::Relay) calls it every
//! [`cleanup_interval`](crate::RelayOptions::cleanup_interval) with the
//! store's [`Store::sent_retention`].

use std::future::Future;
use std::time::{Duration, SystemTime};

use uuid::Uuid;

use crate::error::StoreError;
use crate::message::{Headers, Message};

/// What a relay asks for when it claims.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClaimRequest {
    /// At most this many messages.
    pub limit: usize,
    /// How long the lease lasts, measured on the store's clock.
    pub lease: Duration,
    /// Claim only this tenant's messages.
    pub tenant: Option<String>,
}

impl ClaimRequest {
    /// A request for up to `limit` messages under a lease of `lease`.
    pub fn new(limit: usize, lease: Duration) -> Self {
        Self {
            limit,
            lease,
            tenant: None,
        }
    }

    /// Restricts the claim to one tenant.
    #[must_use]
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }
}

/// A lease: the fencing token written on every claimed row and the deadline
/// after which another relay may take the rows again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Random token; completions must present it.
    pub token: Uuid,
    /// When the lease ends, on the store's clock.
    pub expires_at: SystemTime,
}

/// A row the store could not decode into a [`Message`]; the relay
/// dead-letters it with `reason` instead of skipping it silently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// The row's position.
    pub seq: i64,
    /// The row's key, if it could be read (decides whether to park).
    pub key: Option<String>,
    /// What is wrong with it.
    pub reason: String,
}

/// The result of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Claim {
    /// The lease covering every row below.
    pub lease: Lease,
    /// Claimed messages in `seq` order, at most one per key.
    pub messages: Vec<Message>,
    /// Claimed rows that could not be decoded.
    pub malformed: Vec<Malformed>,
}

impl Claim {
    /// Builds a claim result.
    pub fn new(lease: Lease, messages: Vec<Message>, malformed: Vec<Malformed>) -> Self {
        Self {
            lease,
            messages,
            malformed,
        }
    }

    /// Number of rows claimed, decodable or not.
    pub fn len(&self) -> usize {
        self.messages.len() + self.malformed.len()
    }

    /// True when nothing was claimed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What to do with one claimed row.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Disposition {
    /// Published and acknowledged. The store deletes the row, or, when it
    /// was built with a retention ([`Store::sent_retention`] is `Some`),
    /// keeps it with status `sent` and `sent_at` = its clock's now and the
    /// lease cleared: never claimed again, never holding its key back, until
    /// [`Store::purge_sent`] deletes it once the retention has passed.
    Sent,
    /// Publish again after `delay`, recording `error`.
    Retry {
        /// How long to wait, from the store's clock now.
        delay: Duration,
        /// Why the attempt failed.
        error: String,
    },
    /// Give up: the message becomes dead.
    Dead {
        /// Why.
        error: String,
        /// Keep later messages of the same key waiting until an operator
        /// replays or skips this one.
        park: bool,
    },
    /// Give the row back untouched (not attempted): its attempt is not
    /// counted and it is claimable again at once.
    Release,
}

/// One row's completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The claimed row.
    pub seq: i64,
    /// What happens to it.
    pub disposition: Disposition,
}

impl Completion {
    /// Builds a completion.
    pub fn new(seq: i64, disposition: Disposition) -> Self {
        Self { seq, disposition }
    }
}

/// What a `complete` call changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompleteReport {
    /// Rows updated under a still-valid lease.
    pub applied: u64,
    /// Rows whose lease had been taken over (token mismatch or row gone):
    /// nothing was changed for them.
    pub lost: u64,
}

/// Narrows admin queries; every field set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Filter {
    /// Exact topic.
    pub topic: Option<String>,
    /// Exact key.
    pub key: Option<String>,
    /// Exact tenant.
    pub tenant: Option<String>,
    /// Only these message ids (empty: any).
    pub ids: Vec<Uuid>,
    /// Only messages created at least this long ago (store clock).
    pub older_than: Option<Duration>,
    /// Only messages whose last error contains this text.
    pub error_contains: Option<String>,
}

impl Filter {
    /// Matches everything.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only this topic.
    #[must_use]
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// Only this key.
    #[must_use]
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Only this tenant.
    #[must_use]
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Only these ids.
    #[must_use]
    pub fn ids(mut self, ids: impl IntoIterator<Item = Uuid>) -> Self {
        self.ids = ids.into_iter().collect();
        self
    }

    /// Only messages created at least `age` ago.
    #[must_use]
    pub fn older_than(mut self, age: Duration) -> Self {
        self.older_than = Some(age);
        self
    }

    /// Only messages whose last error contains `text`.
    #[must_use]
    pub fn error_contains(mut self, text: impl Into<String>) -> Self {
        self.error_contains = Some(text.into());
        self
    }
}

/// The lifecycle state of a stored message, as admin queries report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Status {
    /// Waiting to be published (ready, delayed or waiting for a retry).
    Pending,
    /// Claimed by a relay whose lease has not expired.
    Leased,
    /// Gave up; waits for replay, skip or purge.
    Dead,
    /// Published, and kept for audit because the store was built with a
    /// retention (see [`Disposition::Sent`]). Stores without one delete
    /// sent rows at once, so they never list any. Sent rows are never
    /// claimed, replayed or skipped, and never hold their key back; `purge`
    /// with this status and [`Store::purge_sent`] delete them.
    Sent,
}

/// Which rows `list` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListQuery {
    /// Only rows in this state (`None`: any).
    pub status: Option<Status>,
    /// Further narrowing.
    pub filter: Filter,
    /// Only rows with `seq` greater than this (for paging).
    pub after_seq: Option<i64>,
    /// At most this many rows.
    pub limit: usize,
}

impl ListQuery {
    /// Up to `limit` rows in state `status` (any state when `None`).
    pub fn new(status: Option<Status>, limit: usize) -> Self {
        Self {
            status,
            filter: Filter::default(),
            after_seq: None,
            limit,
        }
    }

    /// Narrows with `filter`.
    #[must_use]
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = filter;
        self
    }

    /// Continues after `seq`.
    #[must_use]
    pub fn after(mut self, seq: i64) -> Self {
        self.after_seq = Some(seq);
        self
    }
}

/// A stored message as admin queries see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct MessageRecord {
    /// Position in the outbox.
    pub seq: i64,
    /// Message id.
    pub id: Uuid,
    /// Topic.
    pub topic: String,
    /// Ordering key.
    pub key: Option<String>,
    /// Tenant.
    pub tenant: Option<String>,
    /// Current state.
    pub status: Status,
    /// Attempts made so far.
    pub attempts: u32,
    /// The message's own attempt limit.
    pub max_attempts: Option<u32>,
    /// Last failure reason.
    pub last_error: Option<String>,
    /// For a dead keyed message: whether it holds its key back.
    pub parked: bool,
    /// Written at.
    #[serde(with = "unix_micros")]
    pub created_at: SystemTime,
    /// Not published before.
    #[serde(with = "unix_micros")]
    pub available_at: SystemTime,
    /// Headers.
    pub headers: Headers,
    /// Body (serialised as base64-free lossy text in JSON output by the CLI).
    #[serde(skip)]
    pub payload: bytes::Bytes,
    /// When it was recorded as sent (store clock): set only for
    /// [`Status::Sent`] rows a retaining store keeps.
    #[serde(serialize_with = "opt_unix_micros")]
    pub sent_at: Option<SystemTime>,
}

impl MessageRecord {
    /// Builds a record; used by stores.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        seq: i64,
        id: Uuid,
        topic: String,
        key: Option<String>,
        tenant: Option<String>,
        status: Status,
        attempts: u32,
        max_attempts: Option<u32>,
        last_error: Option<String>,
        parked: bool,
        created_at: SystemTime,
        available_at: SystemTime,
        headers: Headers,
        payload: bytes::Bytes,
    ) -> Self {
        Self {
            seq,
            id,
            topic,
            key,
            tenant,
            status,
            attempts,
            max_attempts,
            last_error,
            parked,
            created_at,
            available_at,
            headers,
            payload,
            sent_at: None,
        }
    }

    /// Sets when the row was recorded as sent; used by stores.
    #[must_use]
    pub fn sent_at(mut self, at: Option<SystemTime>) -> Self {
        self.sent_at = at;
        self
    }
}

mod unix_micros {
    use std::time::SystemTime;

    pub(super) fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(crate::message::to_unix_micros(*t))
    }
}

/// Exact counts of what is in the outbox.
///
/// `pending` counts every unsent, not-dead row; it splits without overlap
/// into `ready + delayed + retrying + leased`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Stats {
    /// Unsent rows that are not dead (including leased ones).
    pub pending: u64,
    /// Never attempted and due now (may still wait behind its key's head).
    pub ready: u64,
    /// Never attempted and not due yet.
    pub delayed: u64,
    /// Attempted before, failed, waiting for (or due for) the next attempt.
    pub retrying: u64,
    /// Held by a relay under an unexpired lease.
    pub leased: u64,
    /// Dead messages.
    pub dead: u64,
    /// Keys held back by a parked dead message.
    pub parked_keys: u64,
    /// Sent messages still kept (retaining stores only).
    pub sent: u64,
    /// Creation time of the oldest pending row.
    #[serde(serialize_with = "opt_unix_micros")]
    pub oldest_pending_at: Option<SystemTime>,
}

impl Stats {
    /// Builds stats; used by stores.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ready: u64,
        delayed: u64,
        retrying: u64,
        leased: u64,
        dead: u64,
        parked_keys: u64,
        sent: u64,
        oldest_pending_at: Option<SystemTime>,
    ) -> Self {
        Self {
            pending: ready + delayed + retrying + leased,
            ready,
            delayed,
            retrying,
            leased,
            dead,
            parked_keys,
            sent,
            oldest_pending_at,
        }
    }
}

fn opt_unix_micros<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_some(&crate::message::to_unix_micros(*t)),
        None => s.serialize_none(),
    }
}

/// How [`Store::stats_by`] groups its counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GroupBy {
    /// One group per topic.
    Topic,
    /// One group per tenant; rows without a tenant form the `None` group.
    Tenant,
}

/// The counts of one group of [`Store::stats_by`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct GroupStats {
    /// The topic or tenant (`None`: rows without a tenant).
    pub group: Option<String>,
    /// Exact counts of the group's rows.
    #[serde(flatten)]
    pub stats: Stats,
}

impl GroupStats {
    /// Builds one group's counts; used by stores.
    pub fn new(group: Option<String>, stats: Stats) -> Self {
        Self { group, stats }
    }
}

/// A relay's heartbeat is stale when it is older than this many heartbeat
/// intervals (see [`RelayRecord::is_stale`]).
pub const STALE_AFTER_INTERVALS: u32 = 3;

/// What a running relay reports about itself every
/// [`RelayOptions::heartbeat_interval`](crate::RelayOptions::heartbeat_interval),
/// written with [`Store::heartbeat`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct RelayHeartbeat {
    /// Chosen when the relay was built; the row's key.
    pub relay_id: Uuid,
    /// Host name of the relay's machine (or container).
    pub host: String,
    /// Operating-system process id.
    pub pid: u32,
    /// postbox version of the relay.
    pub version: String,
    /// When the relay started running, on its own clock.
    #[serde(with = "unix_micros")]
    pub started_at: SystemTime,
    /// How often it writes its heartbeat.
    #[serde(rename = "heartbeat_interval_ms", serialize_with = "duration_ms")]
    pub interval: Duration,
    /// Its latest successful claim (empty or not), on its own clock.
    #[serde(serialize_with = "opt_unix_micros")]
    pub last_claim_at: Option<SystemTime>,
    /// Rows it holds under lease right now (claimed, not yet completed).
    pub leased: u64,
}

impl RelayHeartbeat {
    /// A heartbeat with no claim yet and nothing leased.
    pub fn new(
        relay_id: Uuid,
        host: impl Into<String>,
        pid: u32,
        version: impl Into<String>,
        started_at: SystemTime,
        interval: Duration,
    ) -> Self {
        Self {
            relay_id,
            host: host.into(),
            pid,
            version: version.into(),
            started_at,
            interval,
            last_claim_at: None,
            leased: 0,
        }
    }

    /// Sets the latest successful claim.
    #[must_use]
    pub fn last_claim_at(mut self, at: Option<SystemTime>) -> Self {
        self.last_claim_at = at;
        self
    }

    /// Sets the number of rows held under lease.
    #[must_use]
    pub fn leased(mut self, rows: u64) -> Self {
        self.leased = rows;
        self
    }
}

/// A relay's heartbeat as [`Store::relays`] reads it back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct RelayRecord {
    /// What the relay last reported.
    #[serde(flatten)]
    pub heartbeat: RelayHeartbeat,
    /// When it was written, on the store's clock.
    #[serde(with = "unix_micros")]
    pub last_heartbeat: SystemTime,
    /// How long ago that was, on the store's clock (so the relay's and the
    /// reader's clocks never need to agree).
    #[serde(rename = "silent_for_ms", serialize_with = "duration_ms")]
    pub silent_for: Duration,
}

impl RelayRecord {
    /// Builds a record; used by stores.
    pub fn new(
        heartbeat: RelayHeartbeat,
        last_heartbeat: SystemTime,
        silent_for: Duration,
    ) -> Self {
        Self {
            heartbeat,
            last_heartbeat,
            silent_for,
        }
    }

    /// The relay has missed [`STALE_AFTER_INTERVALS`] heartbeats.
    pub fn is_silent(&self) -> bool {
        self.silent_for > self.heartbeat.interval * STALE_AFTER_INTERVALS
    }

    /// The relay has gone silent while holding leases: it has probably died
    /// (or is stuck, or cut off from the database), and its rows wait until
    /// their leases run out.
    pub fn is_stale(&self) -> bool {
        self.is_silent() && self.heartbeat.leased > 0
    }
}

fn duration_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Which dead or sent rows `purge` deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PurgeQuery {
    /// `Dead` or `Sent`; other states are never purged.
    pub status: Status,
    /// Narrowing, including `older_than`.
    pub filter: Filter,
}

impl PurgeQuery {
    /// Purge rows in `status` matching `filter`.
    pub fn new(status: Status, filter: Filter) -> Self {
        Self { status, filter }
    }
}

/// One session (or replication slot, or prepared transaction) that holds
/// postbox back, as a store can tell it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Holder {
    /// Database server process id, when it is a session.
    pub pid: Option<i32>,
    /// How long it has held on (its transaction's age), when known.
    pub age: Option<Duration>,
    /// What it is, for an operator: database, application, state, slot or
    /// transaction name.
    pub description: String,
}

impl Holder {
    /// Builds a holder; used by stores.
    pub fn new(pid: Option<i32>, age: Option<Duration>, description: impl Into<String>) -> Self {
        Self {
            pid,
            age,
            description: description.into(),
        }
    }
}

/// What holds delivery or cleanup back right now, so that a stall is
/// reported (by `postbox status`, by metrics and in the relay's log) instead
/// of staying silent.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Holdups {
    /// The oldest open transaction that wrote a keyed message and has not
    /// committed: later messages of its keys wait for it.
    pub key_holder: Option<Holder>,
    /// The oldest transaction (or replication slot, or prepared
    /// transaction), in any database of the server, that holds back the
    /// horizon below which the database may clean up dead rows: the
    /// outbox's deleted rows pile up until it ends.
    pub horizon: Option<Holder>,
    /// Rows deleted (or updated away) since the outbox table was last
    /// vacuumed, where the store knows (PostgreSQL: `n_dead_tup`). Claims
    /// step over their index entries until a vacuum removes them.
    pub unvacuumed_rows: Option<u64>,
}

impl Holdups {
    /// Builds holdups; used by stores.
    pub fn new(key_holder: Option<Holder>, horizon: Option<Holder>) -> Self {
        Self {
            key_holder,
            horizon,
            unvacuumed_rows: None,
        }
    }

    /// With [`Holdups::unvacuumed_rows`] set; used by stores.
    #[must_use]
    pub fn with_unvacuumed_rows(mut self, rows: Option<u64>) -> Self {
        self.unvacuumed_rows = rows;
        self
    }
}

/// Where messages wait and how relays lease them.
///
/// Implementations: `postbox-sqlite`, `postbox-postgres`, `postbox-mysql`, and
/// the in-memory store of `postbox-testkit`. All of them pass the store
/// conformance suite in `postbox-testkit`.
pub trait Store: Send + Sync + 'static {
    /// Leases up to `req.limit` claimable messages: keyless ones in `seq`
    /// order, and for keyed ones only the head of each key whose head is not
    /// already leased, parked or delayed. Increments each row's attempts
    /// (each message's [`Message::attempt`] is the one starting now).
    ///
    /// A store may count an attempt when it is recorded instead, if a claim
    /// whose relay dies leaves no trace (the PostgreSQL store's held backlog
    /// batches: their transaction rolls back). Such an attempt is then not
    /// counted, and the row is claimable again at once.
    fn claim(&self, req: &ClaimRequest) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// Applies completions for rows claimed under `token`. A row whose lease
    /// token differs (another relay took it over) is left untouched and
    /// counted as `lost`.
    fn complete(
        &self,
        token: Uuid,
        completions: &[Completion],
    ) -> impl Future<Output = Result<CompleteReport, StoreError>> + Send;

    /// Resolves when the store hears that new work may be there (for example
    /// a PostgreSQL notification). Only a hint: relays poll regardless. The
    /// default never resolves.
    ///
    /// The wait starts when this is called, not when the future is first
    /// polled: the relay calls it before it claims and awaits it only after
    /// an empty claim, so a notification that lands while the claim runs
    /// must resolve the future (implementations subscribe eagerly, outside
    /// the `async` block).
    fn notified(&self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }

    /// Exact counts, narrowed by `filter` (topic, tenant, key).
    fn stats(&self, filter: &Filter) -> impl Future<Output = Result<Stats, StoreError>> + Send;

    /// Rows for inspection, in `seq` order.
    fn list(
        &self,
        query: &ListQuery,
    ) -> impl Future<Output = Result<Vec<MessageRecord>, StoreError>> + Send;

    /// Makes matching dead messages pending again with fresh attempts,
    /// unparking their keys. Returns how many. A keyed message becomes due
    /// at once, or, if a later message of its key is leased right now
    /// (`on_dead = skip`, or after a skip), once that lease ends: a key is
    /// held by one lease at a time.
    fn replay(&self, filter: &Filter) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Unparks the keys held by matching dead messages, which stay dead.
    /// Returns how many messages were unparked.
    fn skip(&self, filter: &Filter) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Deletes matching dead (or retained sent) messages. Returns how many.
    fn purge(&self, query: &PurgeQuery) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Whether a claim and a completion on two connections run in parallel
    /// in the database. A relay worker records a batch's outcomes while it
    /// claims the next batch only when they do; a store with a single
    /// writer (SQLite) says `false`, and the worker records first, then
    /// claims, instead of making the two wait for each other's lock.
    ///
    /// The default is `true`.
    fn parallel_writes(&self) -> bool {
        true
    }

    /// How long this store keeps sent messages (see [`Disposition::Sent`]):
    /// `None` when it deletes them on success. A running
    /// [`Relay`](crate::Relay) deletes the kept ones past this age with
    /// [`Store::purge_sent`] every
    /// [`cleanup_interval`](crate::RelayOptions::cleanup_interval).
    ///
    /// The default is `None`.
    fn sent_retention(&self) -> Option<Duration> {
        None
    }

    /// Deletes at most `limit` kept sent messages whose `sent_at` is at
    /// least `older_than` ago on the store's clock, oldest first, in one
    /// short transaction, and returns how many. Callers loop until it
    /// returns less than `limit`; a small `limit` (hundreds) keeps every
    /// transaction and its locks short. Pending, leased and dead rows are
    /// never touched. Works whatever the store's own retention (an operator
    /// may purge rows kept under an earlier setting).
    ///
    /// The default deletes nothing (stores that never keep sent messages).
    fn purge_sent(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        let _ = (older_than, limit);
        async { Ok(0) }
    }

    /// Exact counts narrowed by `filter`, one [`GroupStats`] per topic or
    /// per tenant, sorted by group (the `None` group first).
    ///
    /// The default pages through [`Store::list`] and counts in memory: it
    /// reads every row, and splits ready from delayed on this process's
    /// clock. Stores override it with one grouped query.
    fn stats_by(
        &self,
        filter: &Filter,
        by: GroupBy,
    ) -> impl Future<Output = Result<Vec<GroupStats>, StoreError>> + Send {
        async move { stats_by_listing(self, filter, by).await }
    }

    /// Records (inserts or refreshes) a running relay's heartbeat, stamping
    /// it with the store's clock. One small write; relays call it every
    /// heartbeat interval, never on the claim path.
    ///
    /// The default records nothing (and [`Store::relays`] then lists no
    /// relay).
    fn heartbeat(
        &self,
        heartbeat: &RelayHeartbeat,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = heartbeat;
        async { Ok(()) }
    }

    /// The relays with a heartbeat row, oldest start first.
    ///
    /// The default lists none.
    fn relays(&self) -> impl Future<Output = Result<Vec<RelayRecord>, StoreError>> + Send {
        async { Ok(Vec::new()) }
    }

    /// Deletes a relay's heartbeat row (on its clean shutdown, or by an
    /// operator for a relay that died). Returns whether there was one.
    ///
    /// The default removes nothing.
    fn remove_relay(
        &self,
        relay_id: Uuid,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let _ = relay_id;
        async { Ok(false) }
    }

    /// Up to `limit` tenants that have pending messages (leased ones
    /// count), for fair claiming: the relay claims for each in turn (see
    /// `RelayOptions::tenant_fairness`). Messages without a tenant are not
    /// listed. A store implementing it must make claims restricted to one
    /// tenant cheap however many messages other tenants have (an index).
    ///
    /// The default lists none: the relay then claims oldest first across
    /// tenants.
    fn pending_tenants(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send {
        let _ = limit;
        async { Ok(Vec::new()) }
    }

    /// What holds delivery or cleanup back right now (see [`Holdups`]).
    /// The relay samples it with the stats into gauges and warns when a
    /// holder gets old.
    ///
    /// The default reports nothing (stores where nothing can hold back, such
    /// as single-writer SQLite).
    fn holdups(&self) -> impl Future<Output = Result<Holdups, StoreError>> + Send {
        async { Ok(Holdups::default()) }
    }
}

/// [`Store::stats_by`] for stores without a grouped query.
async fn stats_by_listing<S: Store + ?Sized>(
    store: &S,
    filter: &Filter,
    by: GroupBy,
) -> Result<Vec<GroupStats>, StoreError> {
    const PAGE: usize = 1000;
    #[derive(Default)]
    struct Acc {
        ready: u64,
        delayed: u64,
        retrying: u64,
        leased: u64,
        dead: u64,
        sent: u64,
        parked: std::collections::HashSet<Option<String>>,
        oldest: Option<SystemTime>,
    }
    let now = SystemTime::now();
    let mut groups: std::collections::BTreeMap<Option<String>, Acc> = Default::default();
    let mut query = ListQuery::new(None, PAGE).filter(filter.clone());
    loop {
        let page = store.list(&query).await?;
        for r in &page {
            let group = match by {
                GroupBy::Tenant => r.tenant.clone(),
                _ => Some(r.topic.clone()),
            };
            let acc = groups.entry(group).or_default();
            match r.status {
                Status::Dead => {
                    acc.dead += 1;
                    if r.parked {
                        acc.parked.insert(r.key.clone());
                    }
                    continue;
                }
                Status::Sent => {
                    acc.sent += 1;
                    continue;
                }
                Status::Leased => acc.leased += 1,
                _ if r.attempts > 0 => acc.retrying += 1,
                _ if r.available_at > now => acc.delayed += 1,
                _ => acc.ready += 1,
            }
            acc.oldest = Some(acc.oldest.map_or(r.created_at, |o| o.min(r.created_at)));
        }
        match page.last() {
            Some(last) if page.len() == PAGE => query.after_seq = Some(last.seq),
            _ => break,
        }
    }
    Ok(groups
        .into_iter()
        .map(|(group, a)| {
            GroupStats::new(
                group,
                Stats::new(
                    a.ready,
                    a.delayed,
                    a.retrying,
                    a.leased,
                    a.dead,
                    a.parked.len() as u64,
                    a.sent,
                    a.oldest,
                ),
            )
        })
        .collect())
}
