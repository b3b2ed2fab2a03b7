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
    /// Published and acknowledged: delete it (or keep it as sent, per the
    /// store's retention).
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
    /// Published and kept for audit (only with a retaining store).
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
        }
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

/// Where messages wait and how relays lease them.
///
/// Implementations: `postbox-sqlite`, `postbox-postgres`, `postbox-mysql`, and
/// the in-memory store of `postbox-testkit`. All of them pass the store
/// conformance suite in `postbox-testkit`.
pub trait Store: Send + Sync + 'static {
    /// Leases up to `req.limit` claimable messages: keyless ones in `seq`
    /// order, and for keyed ones only the head of each key whose head is not
    /// already leased, parked or delayed. Increments each row's attempts.
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
    /// unparking their keys. Returns how many.
    fn replay(&self, filter: &Filter) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Unparks the keys held by matching dead messages, which stay dead.
    /// Returns how many messages were unparked.
    fn skip(&self, filter: &Filter) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Deletes matching dead (or retained sent) messages. Returns how many.
    fn purge(&self, query: &PurgeQuery) -> impl Future<Output = Result<u64, StoreError>> + Send;
}
