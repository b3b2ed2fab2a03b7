//! The relay: claim a batch, publish it, record the outcomes, wait, repeat.
//!
//! Each of [`RelayOptions::concurrency`] workers overlaps the database's
//! work with the broker's: while it publishes a full batch it already claims
//! the next one and records the outcomes of the previous one. Order per key
//! is the store's to keep: a key whose head is still leased yields nothing
//! to the next claim, and a worker whose claim came back empty while it
//! recorded a batch claims again at once instead of sleeping. A batch
//! claimed ahead whose lease would end within the send timeout is released,
//! not published.
//!
//! Every decision about a message's fate after a publish lives in
//! [`Relay::dispose`]: `Ok` → sent; `Transient` → retry with backoff until the
//! attempts run out, then dead; `Rejected` → dead now; `NotSent` → given
//! back untouched. Dead keyed messages park their key unless `on_dead = skip`.
//!
//! A publish gets [`RelayOptions::send_timeout`]. The publisher is asked to
//! return by nine tenths of it ([`Publisher::publish_until`]), reporting what
//! it finished and `NotSent` for what it did not start; whatever is still
//! running at the send timeout itself is dropped, and every message of that
//! batch counts as a `Transient` failure.
//!
//! Shutdown: once the token fires, no new claim starts; a batch being
//! published gets [`RelayOptions::shutdown_grace`] to finish, after which its
//! keyless rows are released (claimable at once by another relay, attempt
//! not counted) and its keyed rows keep their lease until it ends (attempt
//! counted): the abandoned send may still reach the broker until the send
//! timeout, and a key's next message must not overtake it. A claim that
//! returns after the token fired is released without being published.
//!
//! Heartbeats: while [`Relay::run`] runs, a task of its own writes the
//! relay's [`RelayHeartbeat`] (id, host, pid, version, last claim, rows held)
//! every [`RelayOptions::heartbeat_interval`], off the claim path; a clean
//! shutdown deletes the row once every batch is completed, released or
//! (keyed rows of a publish abandoned at shutdown) left to its lease.
//!
//! Retention: when the store keeps sent messages
//! ([`Store::sent_retention`]), another task deletes those past the
//! retention every [`RelayOptions::cleanup_interval`], in batches of
//! [`CLEANUP_BATCH`] rows, one short transaction each
//! ([`Relay::clean_up_sent`]).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;
use uuid::Uuid;

use crate::clock::{SharedClock, SystemClock, since};
use crate::error::{ConfigError, RelayError, StoreError};
use crate::fairness::{MAX_TENANTS, Rotation};
use crate::message::{Message, from_unix_micros, to_unix_micros};
use crate::observe::{self, Health, HealthState, TopicLabels};
use crate::publish::{PublishOutcome, Publisher};
use crate::retry::RetryPolicy;
use crate::store::{ClaimRequest, CompleteReport, Completion, Disposition, RelayHeartbeat, Store};

/// What happens to the later messages of a key whose message went dead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum OnDead {
    /// They wait until an operator replays or skips the dead message, so the
    /// key's order is never broken (default).
    #[default]
    Park,
    /// They carry on; the dead message stays for inspection.
    Skip,
}

/// Relay settings. Build them through [`RelayBuilder`]; defaults in brackets.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RelayOptions {
    /// Messages per claim \[100\].
    pub batch_size: usize,
    /// Lease length, on the store's clock \[30 s\].
    pub lease: Duration,
    /// How long to wait between claims when idle; notifications and the
    /// waker cut it short \[250 ms\], and so does a retry that this
    /// worker recorded coming due. It also bounds how late other work that
    /// nobody announces is picked up: a delayed message that came due,
    /// another relay's retry, rows whose lease ran out after a relay died.
    /// Keep it short (the default) unless such lateness is acceptable.
    pub poll_interval: Duration,
    /// Workers, each with up to three batches in flight under load (one
    /// claimed ahead while one is published and the one before is
    /// recorded) \[2\].
    pub concurrency: usize,
    /// A publish taking longer counts as `Transient` for the whole batch \[10 s\];
    /// must be shorter than the lease. Publishers that implement
    /// [`Publisher::publish_until`] are asked to return by nine tenths of it
    /// with what they finished.
    pub send_timeout: Duration,
    /// Backoff between attempts of one message \[1 s doubling to 5 min, full jitter\].
    pub retry: RetryPolicy,
    /// Attempts before a message is dead, unless it set its own \[25\].
    pub max_attempts: u32,
    /// Park or skip the key of a dead message \[park\].
    pub on_dead: OnDead,
    /// Only claim this tenant's messages \[all tenants\].
    pub tenant: Option<String>,
    /// Rotate claims across the tenants with pending messages (each tenant
    /// in turn, then any tenant), so that one tenant's backlog does not
    /// starve the others; off: oldest first across tenants \[on\]. Needs a
    /// store that lists its tenants (`Store::pending_tenants`); ignored when
    /// `tenant` is set.
    pub tenant_fairness: bool,
    /// How often the rotation re-reads the tenants with pending messages
    /// (one cheap store query) \[5 s\].
    pub tenant_refresh: Duration,
    /// After shutdown is requested, how long a batch being published may
    /// still take before the relay stops waiting for it: its keyless rows
    /// are then released to other relays, its keyed rows keep their lease
    /// until it ends \[5 s\].
    pub shutdown_grace: Duration,
    /// How often [`Relay::run`] samples the store's counts into the
    /// `postbox_pending`… gauges (one `stats` query each time; on
    /// PostgreSQL a scan of the whole table); `None` turns the sampling off
    /// \[30 s\]. The first sample comes at a random point of the first
    /// interval, so that relays started together spread their samples. A
    /// count that takes longer than 1/[`STATS_STRETCH`] of the interval (a
    /// large backlog) is not repeated before [`STATS_STRETCH`] times its
    /// duration has passed; the cheap `holdups` gauges are still sampled
    /// every interval (plus the count's duration when one runs).
    pub stats_interval: Option<Duration>,
    /// Distinct `topic` label values in metrics before further topics are
    /// counted as `_other` \[100\].
    pub metrics_topic_limit: usize,
    /// How often [`Relay::run`] writes the relay's heartbeat row (one small
    /// upsert; `postbox status` flags a relay silent for 3 intervals while
    /// holding leases); `None` turns heartbeats off \[5 s\].
    pub heartbeat_interval: Option<Duration>,
    /// How often [`Relay::run`] deletes the sent messages the store has kept
    /// longer than its retention ([`Store::sent_retention`]; nothing runs
    /// for a store that deletes on success); `None` turns the cleanup off
    /// \[1 min\].
    pub cleanup_interval: Option<Duration>,
}

/// Rows one cleanup statement deletes at most ([`Relay::clean_up_sent`]):
/// small enough that each transaction, and the locks it takes, stay short
/// next to producers and claims.
pub const CLEANUP_BATCH: usize = 500;

/// After counting the outbox for its gauges took `d`, a relay counts again
/// no sooner than `STATS_STRETCH × d` later (at the first
/// [`RelayOptions::stats_interval`] after that; at most
/// [`STATS_PAUSE_CAP`] later), so a relay spends about 1/51 of its time or
/// less counting while a count takes under half an hour. A count reads the
/// whole outbox; on PostgreSQL a 10M-row backlog is a 7 GB table that took
/// 5–7 s to count, which every relay would otherwise repeat every 30 s.
pub const STATS_STRETCH: u32 = 50;

/// The longest pause [`STATS_STRETCH`] makes between two counts.
pub const STATS_PAUSE_CAP: Duration = Duration::from_secs(24 * 60 * 60);

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            batch_size: 100,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(250),
            concurrency: 2,
            send_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            max_attempts: 25,
            on_dead: OnDead::Park,
            tenant: None,
            tenant_fairness: true,
            tenant_refresh: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
            stats_interval: Some(Duration::from_secs(30)),
            metrics_topic_limit: 100,
            heartbeat_interval: Some(Duration::from_secs(5)),
            cleanup_interval: Some(Duration::from_secs(60)),
        }
    }
}

impl RelayOptions {
    /// Checks that the settings can work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=10_000).contains(&self.batch_size) {
            return Err(ConfigError::invalid(
                "batch_size",
                self.batch_size,
                "must be between 1 and 10000",
            ));
        }
        if !(1..=64).contains(&self.concurrency) {
            return Err(ConfigError::invalid(
                "concurrency",
                self.concurrency,
                "must be between 1 and 64",
            ));
        }
        if self.tenant.as_deref() == Some("") {
            return Err(ConfigError::invalid(
                "tenant",
                "",
                "must not be empty (leave it unset to serve every tenant)",
            ));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::invalid(
                "max_attempts",
                self.max_attempts,
                "must be at least 1",
            ));
        }
        if self.poll_interval.is_zero() {
            return Err(ConfigError::invalid(
                "poll_interval",
                self.poll_interval,
                "must be greater than zero",
            ));
        }
        if self.send_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "send_timeout",
                self.send_timeout,
                "must be greater than zero",
            ));
        }
        if self.stats_interval.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::invalid(
                "stats_interval",
                self.stats_interval,
                "must be greater than zero (or unset to turn sampling off)",
            ));
        }
        if self.tenant_refresh.is_zero() {
            return Err(ConfigError::invalid(
                "tenant_refresh",
                self.tenant_refresh,
                "must be greater than zero",
            ));
        }
        if self.heartbeat_interval.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::invalid(
                "heartbeat_interval",
                self.heartbeat_interval,
                "must be greater than zero (or unset to turn heartbeats off)",
            ));
        }
        if self.cleanup_interval.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::invalid(
                "cleanup_interval",
                self.cleanup_interval,
                "must be greater than zero (or unset to turn the cleanup off)",
            ));
        }
        if self.lease > MAX_LEASE {
            return Err(ConfigError::invalid(
                "lease",
                self.lease,
                &format!("must be at most {MAX_LEASE:?}"),
            ));
        }
        if self.send_timeout >= self.lease {
            return Err(ConfigError::invalid(
                "send_timeout",
                self.send_timeout,
                &format!(
                    "must be shorter than the lease ({:?}), or another relay could publish the same key while this one still is",
                    self.lease
                ),
            ));
        }
        Ok(())
    }
}

/// Counts from one or more relay passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TickReport {
    /// Rows claimed.
    pub claimed: u64,
    /// Published and recorded as sent.
    pub sent: u64,
    /// Failed transiently and scheduled again.
    pub retried: u64,
    /// Went dead.
    pub dead: u64,
    /// Given back without an attempt counted: not sent by the publish's
    /// deadline ([`PublishOutcome::NotSent`]), claimed while shutting down,
    /// released at shutdown, or claimed ahead with too little lease left.
    pub released: u64,
    /// Outcomes not recorded because the lease had been taken over.
    pub lost: u64,
}

impl std::ops::AddAssign for TickReport {
    fn add_assign(&mut self, o: Self) {
        self.claimed += o.claimed;
        self.sent += o.sent;
        self.retried += o.retried;
        self.dead += o.dead;
        self.released += o.released;
        self.lost += o.lost;
    }
}

/// Whether a worker should claim its next batch while it publishes the
/// current one: only when publishing takes long enough to hide a good part
/// of a claim behind it (at least a quarter of the latest claim's time).
/// With a publisher that answers at once (a null or in-memory one) there is
/// nothing to overlap, and a claim ahead would only add a concurrent claim
/// that contends with the others in the database.
fn claim_ahead_pays(claim_took: Duration, publish_took: Duration) -> bool {
    publish_took > Duration::ZERO && publish_took * 4 >= claim_took
}

/// For how many claims a worker records its previous batch first and then
/// claims, rather than both at once, and claims no batch ahead while it
/// publishes, after a claim it made while recording or publishing came back
/// empty (a rotated tenant claim excepted). Often the batches in flight
/// held every claimable message: keyed batches with one message of each
/// key that has any waiting, whose next messages become claimable only
/// once they are recorded, so claiming alongside cost an empty claim per
/// batch (with 1,000 keys at batch 1,000 on PostgreSQL, 2–3 claims per
/// batch, most of them empty), and so did claiming ahead with a slow
/// broker. It is also how a backlog ends; then the next claims after an
/// idle spell record first, which costs them only the overlap. The count
/// drops as each of these claims is made, so the batch the last of them
/// takes may already have the next one claimed ahead of it.
const SETTLE_FIRST: u32 = 16;

/// The longest wait a publisher's hint (HTTP `Retry-After`) can set before
/// a retry; longer hints count as this. An endpoint's hint is not checked
/// by anyone else, and an absurd one (`Retry-After: 99999999999999`) must
/// not make the completion's timestamp overflow in the database, which
/// would fail the whole batch's completion.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// How long after a publish starts the publisher is asked to return
/// ([`Publisher::publish_until`]): nine tenths of the send timeout, so that
/// its outcomes arrive before the timeout discards them.
fn publish_deadline(send_timeout: Duration) -> Duration {
    send_timeout - send_timeout / 10
}

/// How [`Relay::publish`] ended.
enum Published {
    /// One outcome per message (a send that timed out: transient).
    Outcomes(Vec<PublishOutcome>),
    /// Shutdown was requested before the batch reached the publisher.
    NotStarted,
    /// Shutdown's grace period ran out while the publisher had the batch:
    /// what reached the broker is unknown, and more may still reach it
    /// until the send timeout.
    Abandoned,
}

/// A claim that got no answer for twice the lease, and at least this
/// long, is given up (see `Relay::claim_batch`).
const CLAIM_CUT_AT_LEAST: Duration = Duration::from_secs(60);

/// How long a claim (or the tenant list) may go unanswered under `lease`.
fn claim_cut(lease: Duration) -> Duration {
    lease.saturating_mul(2).max(CLAIM_CUT_AT_LEAST)
}

/// The longest lease a relay may take: a day. Longer ones only delay
/// redelivery after a crash (and would overflow time arithmetic if absurd).
pub const MAX_LEASE: Duration = Duration::from_secs(24 * 60 * 60);

/// The longest error text recorded with a message, in characters.
const MAX_ERROR_CHARS: usize = 2_000;

/// A publisher's reason as every store can keep it in `last_error`: control
/// characters other than tab and newline become U+FFFD (PostgreSQL refuses
/// a NUL in text, and the batch's whole completion with it, so the batch
/// would be published again and again until its attempts ran out), and at
/// most [`MAX_ERROR_CHARS`] characters, the cut marked with `…`.
fn storable(reason: String) -> String {
    let clean = |c: char| !c.is_control() || c == '\n' || c == '\t';
    if reason.chars().all(clean) && reason.len() <= MAX_ERROR_CHARS {
        return reason;
    }
    let mut out: String = reason
        .chars()
        .take(MAX_ERROR_CHARS)
        .map(|c| {
            if clean(c) {
                c
            } else {
                char::REPLACEMENT_CHARACTER
            }
        })
        .collect();
    if reason.chars().nth(MAX_ERROR_CHARS).is_some() {
        out.pop();
        out.push('…');
    }
    out
}

/// Completions that give rows back unpublished, their attempt not counted.
fn releases(seqs: impl IntoIterator<Item = i64>) -> Vec<Completion> {
    seqs.into_iter()
        .map(|seq| Completion::new(seq, Disposition::Release))
        .collect()
}

/// A claimed batch, not yet published.
struct Claimed {
    claim: crate::store::Claim,
    /// Its rows, counted as held until the batch is settled or dropped.
    held: HeldRows,
    /// Past this the rows are no longer ours.
    lease_deadline: Instant,
    /// How long the claim took.
    took: Duration,
    /// The claim was for a tenant the fairness rotation picked.
    rotated: bool,
}

/// A published batch whose outcomes are decided and not yet recorded.
struct Settle {
    token: Uuid,
    completions: Vec<Completion>,
    /// Past this the rows are no longer ours: recording stops retrying.
    lease_deadline: Instant,
    /// Its rows, counted as held until it is recorded (or dropped).
    held: HeldRows,
    /// The batch's `postbox.batch` span.
    span: tracing::Span,
}

/// Rows a batch holds, counted in [`Relay::leased`] and the
/// `postbox_leases_held` gauge from its claim until it is settled; dropping
/// the guard gives them up, so a worker that ends any way (a panic
/// unwinding included) leaves no rows counted that no one holds.
struct HeldRows {
    count: Arc<AtomicU64>,
    rows: u64,
}

impl HeldRows {
    fn new(count: &Arc<AtomicU64>, rows: u64) -> Self {
        if rows > 0 {
            count.fetch_add(rows, Ordering::Relaxed);
            // the gauge moves by the difference, so several relays in one
            // process add up instead of overwriting each other
            metrics::gauge!(observe::LEASES_HELD).increment(rows as f64);
        }
        Self {
            count: Arc::clone(count),
            rows,
        }
    }
}

impl Drop for HeldRows {
    fn drop(&mut self) {
        if self.rows > 0 {
            self.count.fetch_sub(self.rows, Ordering::Relaxed);
            metrics::gauge!(observe::LEASES_HELD).decrement(self.rows as f64);
        }
    }
}

/// Wakes a running relay right away, e.g. just after the producer's commit,
/// instead of waiting for the next poll. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RelayWaker {
    workers: Arc<[Notify]>,
}

impl RelayWaker {
    /// Wakes every idle worker of the relay (a wake while busy is kept and
    /// used at the next wait, never lost).
    pub fn wake(&self) {
        for n in self.workers.iter() {
            n.notify_one();
        }
    }

    /// Wakes every worker but `worker`.
    fn wake_others(&self, worker: usize) {
        for (i, n) in self.workers.iter().enumerate() {
            if i != worker {
                n.notify_one();
            }
        }
    }
}

/// Builds a [`Relay`].
///
/// ```no_run
/// # async fn demo<S: postbox_core::Store, P: postbox_core::Publisher>(store: S, publisher: P) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use postbox_core::Relay;
/// use tokio_util::sync::CancellationToken;
///
/// let relay = Relay::builder(store, publisher)
///     .batch_size(500)
///     .lease(Duration::from_secs(20))
///     .build()?;
/// let shutdown = CancellationToken::new();
/// relay.run(shutdown.clone()).await;
/// # Ok(()) }
/// ```
pub struct RelayBuilder<S, P> {
    store: S,
    publisher: P,
    options: RelayOptions,
    clock: SharedClock,
}

impl<S: Store, P: Publisher> RelayBuilder<S, P> {
    /// Messages per claim.
    #[must_use]
    pub fn batch_size(mut self, n: usize) -> Self {
        self.options.batch_size = n;
        self
    }

    /// Lease length.
    #[must_use]
    pub fn lease(mut self, d: Duration) -> Self {
        self.options.lease = d;
        self
    }

    /// Idle poll interval.
    #[must_use]
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.options.poll_interval = d;
        self
    }

    /// Batches in flight at once.
    #[must_use]
    pub fn concurrency(mut self, n: usize) -> Self {
        self.options.concurrency = n;
        self
    }

    /// Publish timeout per batch.
    #[must_use]
    pub fn send_timeout(mut self, d: Duration) -> Self {
        self.options.send_timeout = d;
        self
    }

    /// Backoff between attempts.
    #[must_use]
    pub fn retry_policy(mut self, p: RetryPolicy) -> Self {
        self.options.retry = p;
        self
    }

    /// Default attempt limit.
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.options.max_attempts = n;
        self
    }

    /// Park or skip keys of dead messages.
    #[must_use]
    pub fn on_dead(mut self, on_dead: OnDead) -> Self {
        self.options.on_dead = on_dead;
        self
    }

    /// Only claim `tenant`'s messages.
    #[must_use]
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.options.tenant = Some(tenant.into());
        self
    }

    /// Rotate claims across tenants with pending messages (on by default).
    #[must_use]
    pub fn tenant_fairness(mut self, on: bool) -> Self {
        self.options.tenant_fairness = on;
        self
    }

    /// How often the tenant rotation re-reads the pending tenants.
    #[must_use]
    pub fn tenant_refresh(mut self, d: Duration) -> Self {
        self.options.tenant_refresh = d;
        self
    }

    /// How long an in-flight publish may take after shutdown before its
    /// rows are released.
    #[must_use]
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.options.shutdown_grace = d;
        self
    }

    /// How often to sample the store's counts into gauges (`None`: never);
    /// the first sample comes at a random point of the first interval (see
    /// [`RelayOptions::stats_interval`]).
    #[must_use]
    pub fn stats_interval(mut self, d: Option<Duration>) -> Self {
        self.options.stats_interval = d;
        self
    }

    /// How often to write the relay's heartbeat row (`None`: never).
    #[must_use]
    pub fn heartbeat_interval(mut self, d: Option<Duration>) -> Self {
        self.options.heartbeat_interval = d;
        self
    }

    /// How often to delete sent messages kept past the store's retention
    /// (`None`: never).
    #[must_use]
    pub fn cleanup_interval(mut self, d: Option<Duration>) -> Self {
        self.options.cleanup_interval = d;
        self
    }

    /// Replaces all options at once.
    #[must_use]
    pub fn options(mut self, options: RelayOptions) -> Self {
        self.options = options;
        self
    }

    /// The wall clock used for latency measurements.
    #[must_use]
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Validates the options and builds the relay.
    pub fn build(self) -> Result<Relay<S, P>, ConfigError> {
        self.options.validate()?;
        let workers: Arc<[Notify]> = (0..self.options.concurrency)
            .map(|_| Notify::new())
            .collect();
        Ok(Relay {
            inner: Arc::new(Inner {
                store: self.store,
                publisher: self.publisher,
                topics: TopicLabels::new(self.options.metrics_topic_limit),
                options: self.options,
                clock: self.clock,
                waker: RelayWaker { workers },
                health: Mutex::new(HealthState::default()),
                id: Uuid::now_v7(),
                held: Arc::new(AtomicU64::new(0)),
                last_claim_us: AtomicI64::new(NEVER),
                rotation: Rotation::default(),
            }),
        })
    }
}

struct Inner<S, P> {
    store: S,
    publisher: P,
    options: RelayOptions,
    clock: SharedClock,
    waker: RelayWaker,
    topics: TopicLabels,
    health: Mutex<HealthState>,
    /// This relay's id in its heartbeat row.
    id: Uuid,
    /// Rows claimed and not yet completed or released.
    held: Arc<AtomicU64>,
    /// Unix µs (relay clock) of the latest successful claim, or [`NEVER`].
    last_claim_us: AtomicI64,
    /// Which tenant the next claim is for (see [`crate::fairness`]).
    rotation: Rotation,
}

const NEVER: i64 = i64::MIN;

/// Moves committed messages from a [`Store`] to a [`Publisher`].
///
/// Cheap to clone; clones share the store, publisher and waker.
pub struct Relay<S, P> {
    inner: Arc<Inner<S, P>>,
}

impl<S, P> Clone for Relay<S, P> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S: Store, P: Publisher> Relay<S, P> {
    /// Starts building a relay over `store` and `publisher`.
    pub fn builder(store: S, publisher: P) -> RelayBuilder<S, P> {
        RelayBuilder {
            store,
            publisher,
            options: RelayOptions::default(),
            clock: Arc::new(SystemClock),
        }
    }

    /// The options in force.
    pub fn options(&self) -> &RelayOptions {
        &self.inner.options
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// The relay's id, chosen when it was built: the key of its heartbeat
    /// row and a field of its logs.
    pub fn id(&self) -> Uuid {
        self.inner.id
    }

    /// Rows this relay holds under lease right now (claimed, not yet
    /// completed or released).
    pub fn leased(&self) -> u64 {
        self.inner.held.load(Ordering::Relaxed)
    }

    /// A handle that wakes the running relay at once.
    pub fn waker(&self) -> RelayWaker {
        self.inner.waker.clone()
    }

    /// Whether the relay can work right now: the latest claim reached the
    /// store, and the publisher is not failing every message. For a
    /// readiness probe (`/readyz` in the daemon).
    pub fn health(&self) -> Health {
        self.health_state().snapshot()
    }

    fn health_state(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.inner
            .health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// One pass: claim one batch, publish it, record the outcomes.
    ///
    /// For tests and cron-style use; [`Relay::run`] loops over it.
    pub async fn tick(&self) -> Result<TickReport, RelayError> {
        let (mut report, settle) = self.pass(&CancellationToken::new()).await?;
        if let Some(settle) = settle {
            report.lost = self.settle(settle).await?;
        }
        Ok(report)
    }

    /// The tenant the next claim is for: the configured one, or the next in
    /// the fairness rotation (re-read from the store when stale), or any.
    /// The flag says whether it came from the rotation.
    async fn claim_scope(&self) -> (Option<String>, bool) {
        let o = &self.inner.options;
        if o.tenant.is_some() || !o.tenant_fairness {
            return (o.tenant.clone(), false);
        }
        let rotation = &self.inner.rotation;
        if rotation.stale(o.tenant_refresh) {
            // bounded like a claim: a silent connection must not hold it
            let listed = tokio::time::timeout(
                claim_cut(o.lease),
                self.inner.store.pending_tenants(MAX_TENANTS),
            )
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "no answer listing pending tenants".into(),
                ))
            });
            match listed {
                Ok(tenants) => rotation.refresh(tenants),
                Err(e) => {
                    tracing::debug!(error = %e, "listing pending tenants failed; keeping the rotation");
                    rotation.refresh(rotation.tenants());
                }
            }
        }
        let tenant = rotation.next();
        let rotated = tenant.is_some();
        (tenant, rotated)
    }

    /// One pass that gives way to `shutdown`: a claim that comes back after
    /// the token fired is released unpublished, and a publish still running
    /// [`RelayOptions::shutdown_grace`] after it fired is abandoned and its
    /// keyless rows released (its keyed rows keep their lease).
    ///
    /// The batch's outcomes are decided but not yet recorded: the caller
    /// hands the returned [`Settle`] to [`Relay::settle`].
    async fn pass(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<(TickReport, Option<Settle>), RelayError> {
        let claimed = self.claim_batch().await?;
        Ok(self.publish_claimed(claimed, shutdown).await)
    }

    /// Claims the next batch (for the tenant the rotation picks) and counts
    /// its rows as held.
    async fn claim_batch(&self) -> Result<Claimed, RelayError> {
        let o = &self.inner.options;
        let mut req = ClaimRequest::new(o.batch_size, o.lease);
        let (tenant, rotated) = self.claim_scope().await;
        req.tenant = tenant;
        let started = Instant::now();
        // A database connection that went silent (a host lost without a
        // reset) would hold a claim for as long as the kernel keeps the
        // socket, many minutes: give it up after twice the lease, at least
        // a minute.
        //
        // Not at the lease: a claim that is only slow (queued behind a lock) may
        // still commit its leases after the cut, and the relay, never
        // having seen them, could neither publish nor release those rows;
        // they would wait out the lease with an attempt counted. Stores
        // bound their own statements well within this (PostgreSQL's claim
        // sessions carry a `statement_timeout`), which rolls such a claim
        // back instead.
        let cut = claim_cut(o.lease);
        let claimed = tokio::time::timeout(cut, self.inner.store.claim(&req))
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    format!("no answer to a claim within {cut:?}").into(),
                ))
            });
        let claim = match claimed {
            Ok(claim) => {
                self.health_state().claim_ok();
                self.inner
                    .last_claim_us
                    .store(to_unix_micros(self.inner.clock.now()), Ordering::Relaxed);
                claim
            }
            Err(e) => {
                metrics::counter!(observe::CLAIM_ERRORS_TOTAL).increment(1);
                self.health_state().claim_failed(e.to_string());
                return Err(RelayError::Claim(e));
            }
        };
        metrics::histogram!(observe::CLAIM_DURATION_SECONDS).record(started.elapsed());
        if o.tenant.is_none() && o.tenant_fairness {
            self.inner.rotation.claimed(rotated, claim.is_empty());
        }
        if !claim.is_empty() {
            metrics::histogram!(observe::BATCH_SIZE).record(claim.len() as f64);
        }
        Ok(Claimed {
            held: HeldRows::new(&self.inner.held, claim.len() as u64),
            claim,
            lease_deadline: started + o.lease,
            took: started.elapsed(),
            rotated,
        })
    }

    /// Publishes a claimed batch and decides its outcomes; `None` for an
    /// empty claim. A batch whose lease would run out within the send
    /// timeout (one claimed ahead that waited too long) is released instead.
    async fn publish_claimed(
        &self,
        claimed: Claimed,
        shutdown: &CancellationToken,
    ) -> (TickReport, Option<Settle>) {
        let Claimed {
            claim,
            lease_deadline,
            held,
            ..
        } = claimed;
        if claim.is_empty() {
            return (TickReport::default(), None);
        }
        let token = claim.lease.token;
        let span = tracing::debug_span!(
            "postbox.batch",
            postbox.batch_size = claim.len(),
            postbox.lease_token = %token,
        );
        let rows = claim.len() as u64;
        let (report, completions) = if Instant::now() + self.inner.options.send_timeout
            >= lease_deadline
        {
            tracing::warn!(
                postbox.batch_size = rows,
                lease = ?self.inner.options.lease,
                send_timeout = ?self.inner.options.send_timeout,
                "lease too close to its end to publish; releasing the batch (if this repeats, the claim takes longer than the lease leaves after the send timeout: lengthen the lease)"
            );
            let release = releases(
                claim
                    .messages
                    .iter()
                    .map(|m| m.seq)
                    .chain(claim.malformed.iter().map(|m| m.seq)),
            );
            (
                TickReport {
                    claimed: rows,
                    released: release.len() as u64,
                    ..TickReport::default()
                },
                release,
            )
        } else {
            self.process(claim, shutdown).instrument(span.clone()).await
        };
        (
            report,
            Some(Settle {
                token,
                completions,
                lease_deadline,
                held,
                span,
            }),
        )
    }

    /// Records a published batch's outcomes ([`Relay::complete_until`]) and
    /// gives its rows up; returns how many rows another relay had taken over
    /// (their outcomes were not recorded).
    async fn settle(&self, settle: Settle) -> Result<u64, RelayError> {
        let Settle {
            token,
            completions,
            lease_deadline,
            held,
            span,
        } = settle;
        let started = Instant::now();
        let done = self
            .complete_until(token, &completions, lease_deadline)
            .instrument(span)
            .await;
        // completed, released, or (if recording failed) left to expire: no
        // longer this relay's either way
        drop(held);
        let done = done?;
        metrics::histogram!(observe::COMPLETE_DURATION_SECONDS).record(started.elapsed());
        if done.lost > 0 {
            metrics::counter!(observe::LEASE_LOST_TOTAL).increment(done.lost);
            tracing::warn!(
                postbox.lost = done.lost,
                "lease taken over before completion; another relay will deliver these again"
            );
        }
        Ok(done.lost)
    }

    /// Publishes a claimed batch and decides each row's disposition.
    async fn process(
        &self,
        claim: crate::store::Claim,
        shutdown: &CancellationToken,
    ) -> (TickReport, Vec<Completion>) {
        let o = &self.inner.options;
        let mut report = TickReport {
            claimed: claim.len() as u64,
            ..TickReport::default()
        };
        let mut completions = Vec::with_capacity(claim.len());

        for bad in claim.malformed {
            tracing::warn!(postbox.seq = bad.seq, reason = %bad.reason, "malformed outbox row dead-lettered");
            metrics::counter!(observe::DEAD_TOTAL, "topic" => observe::OTHER_TOPIC).increment(1);
            completions.push(Completion::new(
                bad.seq,
                Disposition::Dead {
                    error: format!("malformed row: {}", bad.reason),
                    park: bad.key.is_some() && o.on_dead == OnDead::Park,
                },
            ));
        }

        // A relay that died during a message's final attempt leaves it with
        // attempts > max: it is dead, not published once more. (A store may
        // leave such an attempt uncounted; see `Store::claim`.)
        let (to_publish, exhausted): (Vec<Message>, Vec<Message>) = claim
            .messages
            .into_iter()
            .partition(|m| m.attempt <= self.max_attempts(m));
        for m in &exhausted {
            completions.push(Completion::new(
                m.seq,
                Disposition::Dead {
                    error: format!(
                        "attempts exhausted ({} of {}): the last attempt's relay lost its lease",
                        m.attempt - 1,
                        self.max_attempts(m)
                    ),
                    park: self.parks(m),
                },
            ));
        }

        if !to_publish.is_empty() {
            #[cfg(feature = "opentelemetry")]
            let message_spans = crate::trace_context::message_spans(&to_publish);
            match self.publish(&to_publish, shutdown).await {
                Published::Outcomes(outcomes) => {
                    #[cfg(feature = "opentelemetry")]
                    crate::trace_context::record_outcomes(&message_spans, &outcomes);
                    self.observe_outcomes(&to_publish, &outcomes);
                    for (m, outcome) in to_publish.iter().zip(outcomes) {
                        completions.push(Completion::new(m.seq, self.dispose(m, outcome)));
                    }
                }
                Published::NotStarted => {
                    tracing::info!(
                        postbox.batch_size = to_publish.len(),
                        "shutting down: releasing the batch's leases to other relays"
                    );
                    completions.extend(releases(to_publish.iter().map(|m| m.seq)));
                }
                Published::Abandoned => {
                    // What the publisher sent may still reach the broker
                    // until the send timeout. Another relay may publish a
                    // keyless message again at once (a duplicate), but not
                    // a key's head: it would then publish the key's next
                    // message, which the stale copy could follow. Keyed
                    // rows keep their lease, which outlasts the send
                    // timeout (see `publish_claimed`).
                    let keyless =
                        releases(to_publish.iter().filter(|m| m.key.is_none()).map(|m| m.seq));
                    tracing::info!(
                        postbox.released = keyless.len(),
                        postbox.kept = to_publish.len() - keyless.len(),
                        "shutting down with a publish unfinished: its keyless rows are released to other relays, its keyed rows keep their lease until it ends"
                    );
                    completions.extend(keyless);
                }
            }
        }

        for c in &completions {
            match c.disposition {
                Disposition::Sent => report.sent += 1,
                Disposition::Retry { .. } => report.retried += 1,
                Disposition::Dead { .. } => report.dead += 1,
                Disposition::Release => report.released += 1,
            }
        }
        (report, completions)
    }

    /// Counters and latency per message, and the publisher's health.
    fn observe_outcomes(&self, batch: &[Message], outcomes: &[PublishOutcome]) {
        let now = self.inner.clock.now();
        let mut all_transient = None;
        for (m, outcome) in batch.iter().zip(outcomes) {
            let topic = self.inner.topics.label(&m.topic);
            match outcome {
                PublishOutcome::Ok => {
                    let latency = since(now, m.created_at);
                    tracing::trace!(
                        postbox.id = %m.id,
                        postbox.topic = %m.topic,
                        postbox.latency_ms = latency.as_millis() as u64,
                        "published"
                    );
                    metrics::counter!(observe::PUBLISHED_TOTAL, "topic" => topic.clone())
                        .increment(1);
                    metrics::histogram!(observe::COMMIT_TO_PUBLISH_SECONDS, "topic" => topic)
                        .record(latency);
                    all_transient = Some(None);
                }
                PublishOutcome::Transient { reason, .. } => {
                    metrics::counter!(observe::PUBLISH_FAILURES_TOTAL, "topic" => topic, "kind" => "transient")
                        .increment(1);
                    if all_transient.is_none() {
                        all_transient = Some(Some(reason.clone()));
                    }
                }
                PublishOutcome::Rejected { .. } => {
                    metrics::counter!(observe::PUBLISH_FAILURES_TOTAL, "topic" => topic, "kind" => "rejected")
                        .increment(1);
                }
                PublishOutcome::NotSent => {
                    metrics::counter!(observe::NOT_SENT_TOTAL, "topic" => topic).increment(1);
                }
            }
        }
        // Rejections say nothing about reachability: only a batch with an
        // acknowledgement clears the error, only an all-transient one sets it.
        if let Some(error) = all_transient {
            // `/readyz` shows it: no control characters, no megabyte
            self.health_state().publisher(error.map(storable));
        }
    }

    fn max_attempts(&self, m: &Message) -> u32 {
        m.max_attempts
            .unwrap_or(self.inner.options.max_attempts)
            .max(1)
    }

    fn parks(&self, m: &Message) -> bool {
        m.key.is_some() && self.inner.options.on_dead == OnDead::Park
    }

    /// The single place that turns a publish outcome into a message's fate.
    fn dispose(&self, m: &Message, outcome: PublishOutcome) -> Disposition {
        let outcome = match outcome {
            PublishOutcome::Transient {
                reason,
                retry_after,
            } => PublishOutcome::Transient {
                reason: storable(reason),
                retry_after,
            },
            PublishOutcome::Rejected { reason } => PublishOutcome::Rejected {
                reason: storable(reason),
            },
            other => other,
        };
        let dead = |error: String| {
            metrics::counter!(observe::DEAD_TOTAL, "topic" => self.inner.topics.label(&m.topic))
                .increment(1);
            Disposition::Dead {
                error,
                park: self.parks(m),
            }
        };
        match outcome {
            PublishOutcome::Ok => Disposition::Sent,
            PublishOutcome::Transient {
                reason,
                retry_after,
            } => {
                let max = self.max_attempts(m);
                if m.attempt >= max {
                    tracing::warn!(postbox.id = %m.id, postbox.topic = %m.topic, %reason, "message dead after its last attempt");
                    dead(format!("gave up after {max} attempts: {reason}"))
                } else {
                    let backoff = self.inner.options.retry.delay(m.attempt);
                    let delay =
                        retry_after.map_or(backoff, |hint| hint.min(MAX_RETRY_AFTER).max(backoff));
                    tracing::debug!(postbox.id = %m.id, postbox.attempt = m.attempt, ?delay, %reason, "publish failed, will retry");
                    Disposition::Retry {
                        delay,
                        error: reason,
                    }
                }
            }
            PublishOutcome::Rejected { reason } => {
                tracing::warn!(postbox.id = %m.id, postbox.topic = %m.topic, %reason, "message rejected by the broker, dead-lettered");
                dead(reason)
            }
            PublishOutcome::NotSent => Disposition::Release,
        }
    }

    /// Publishes `batch` within the send timeout, unless shutdown was
    /// requested before it started or its grace period runs out first. The
    /// publisher is asked to return by [`publish_deadline`] so that what it
    /// finished counts; past the send timeout itself every outcome is
    /// `Transient`.
    async fn publish(&self, batch: &[Message], shutdown: &CancellationToken) -> Published {
        if shutdown.is_cancelled() {
            // claimed while shutting down: hand it straight back
            return Published::NotStarted;
        }
        let timeout = self.inner.options.send_timeout;
        let grace = self.inner.options.shutdown_grace;
        let started = Instant::now();
        let span = tracing::debug_span!("postbox.publish", postbox.batch_size = batch.len());
        // A publisher that panics answers `Transient` for the batch rather
        // than ending the worker (a poison message then runs out of
        // attempts and is dead-lettered, as one that always fails).
        let sent = tokio::time::timeout(
            timeout,
            std::panic::AssertUnwindSafe(
                self.inner
                    .publisher
                    .publish_until(batch, started + publish_deadline(timeout))
                    .instrument(span),
            )
            .catch_unwind(),
        );
        let result = tokio::select! {
            // a publish done as the grace runs out still counts
            biased;
            r = sent => r,
            () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => return Published::Abandoned,
        };
        metrics::histogram!(observe::PUBLISH_DURATION_SECONDS).record(started.elapsed());
        Published::Outcomes(match result {
            Ok(Ok(outcomes)) if outcomes.len() == batch.len() => outcomes,
            Ok(Err(panic)) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".to_owned());
                let reason = format!("the publisher panicked: {what}");
                tracing::error!(postbox.batch_size = batch.len(), "{reason}");
                vec![PublishOutcome::transient(reason); batch.len()]
            }
            Ok(Ok(outcomes)) => {
                let reason = format!(
                    "publisher returned {} outcomes for {} messages",
                    outcomes.len(),
                    batch.len()
                );
                tracing::error!("{reason}");
                vec![PublishOutcome::transient(reason); batch.len()]
            }
            Err(_) => {
                let reason = format!("send timed out after {timeout:?}");
                tracing::warn!(postbox.batch_size = batch.len(), "{reason}");
                vec![PublishOutcome::transient(reason); batch.len()]
            }
        })
    }

    /// Records outcomes, retrying a failing database until the lease would
    /// have run out anyway: after that the rows belong to whoever claims next.
    async fn complete_until(
        &self,
        token: Uuid,
        completions: &[Completion],
        lease_deadline: Instant,
    ) -> Result<CompleteReport, RelayError> {
        let backoff = RetryPolicy::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut attempt = 0;
        loop {
            attempt += 1;
            // bounded by the lease, as a claim is: past it the rows are
            // another relay's to claim anyway (a few seconds at least: a
            // recording that starts late may still find its lease unclaimed)
            let until = lease_deadline.max(Instant::now() + Duration::from_secs(5));
            let completed =
                tokio::time::timeout_at(until, self.inner.store.complete(token, completions))
                    .await
                    .unwrap_or_else(|_| {
                        Err(StoreError::Unavailable(
                            "no answer to recording outcomes before the lease ran out".into(),
                        ))
                    });
            match completed {
                Ok(r) => return Ok(r),
                Err(e) => {
                    metrics::counter!(observe::COMPLETE_ERRORS_TOTAL).increment(1);
                    let wait = backoff.delay_with(attempt, 0.5 + fastrand::f64() / 2.0);
                    if Instant::now() + wait >= lease_deadline {
                        return Err(RelayError::Complete {
                            lease: self.inner.options.lease,
                            source: e,
                        });
                    }
                    tracing::warn!(error = %e, ?wait, "recording outcomes failed, retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Runs until `shutdown` fires, then stops claiming, gives each batch
    /// being published [`RelayOptions::shutdown_grace`] to finish, releases
    /// the keyless rows of those that did not (their keyed rows keep their
    /// lease until it ends), and returns the totals.
    ///
    /// Database errors are retried with backoff forever; they never end the
    /// loop. While it runs it also samples the store's counts into gauges
    /// every [`RelayOptions::stats_interval`] (less often when counting is
    /// slow, see [`STATS_STRETCH`]), writes its heartbeat every
    /// [`RelayOptions::heartbeat_interval`] and, for a store that keeps sent
    /// messages, deletes those past the retention every
    /// [`RelayOptions::cleanup_interval`].
    ///
    /// A worker that panics (a bug in a custom store, say) is logged, makes
    /// the relay unready until a claim goes through, and is started again
    /// after a second, doubling per panic up to a minute; a panicking
    /// publisher does not end its worker (its batch is `Transient`).
    /// Dropping the future returned by `run` stops everything it started.
    pub async fn run(&self, shutdown: CancellationToken) -> TickReport {
        let mut workers = JoinSet::new();
        let mut worker_of = std::collections::HashMap::new();
        let mut panics = vec![0u32; self.inner.options.concurrency];
        for worker in 0..self.inner.options.concurrency {
            let task = workers.spawn(self.clone().worker(worker, shutdown.clone(), None));
            worker_of.insert(task.id(), worker);
        }
        // Helpers are aborted when `run` is dropped (they would otherwise
        // outlive it: a heartbeat saying a relay lives that no longer does).
        let sampler = self.inner.options.stats_interval.map(|every| {
            let relay = self.clone();
            let shutdown = shutdown.clone();
            AbortOnDropHandle::new(tokio::spawn(async move {
                relay.sample_stats(every, shutdown).await;
            }))
        });
        let heartbeat = self.inner.options.heartbeat_interval.map(|every| {
            let relay = self.clone();
            let shutdown = shutdown.clone();
            let started_at = self.inner.clock.now();
            AbortOnDropHandle::new(tokio::spawn(async move {
                relay.beat(every, started_at, shutdown).await;
            }))
        });
        let cleanup = match (
            self.inner.options.cleanup_interval,
            self.inner.store.sent_retention(),
        ) {
            (Some(every), Some(retention)) => {
                tracing::info!(
                    ?retention,
                    ?every,
                    "keeping sent messages; deleting those past the retention every interval"
                );
                let relay = self.clone();
                let shutdown = shutdown.clone();
                Some(AbortOnDropHandle::new(tokio::spawn(async move {
                    relay.clean_up_every(every, shutdown).await;
                })))
            }
            _ => None,
        };
        tracing::info!(postbox.relay_id = %self.inner.id, "relay running");
        let mut total = TickReport::default();
        while let Some(done) = workers.join_next_with_id().await {
            match done {
                Ok((_, r)) => total += r,
                Err(e) => {
                    let worker = worker_of.remove(&e.id());
                    tracing::error!(error = %e, ?worker, "relay worker failed");
                    if let Some(worker) = worker
                        && e.is_panic()
                        && !shutdown.is_cancelled()
                    {
                        // Unready until a claim goes through again. What
                        // it held waits for its lease, as after a crash
                        // (and leaves the count of held rows as the
                        // unwinding drops its batches). Started again
                        // after 1 s, doubling per panic up to a minute.
                        self.health_state()
                            .claim_failed(format!("a relay worker panicked: {e}"));
                        let n = &mut panics[worker];
                        *n = n.saturating_add(1);
                        let again =
                            Duration::from_secs(1 << (*n - 1).min(6)).min(Duration::from_secs(60));
                        let task = workers.spawn(self.clone().worker(
                            worker,
                            shutdown.clone(),
                            Some(again),
                        ));
                        worker_of.insert(task.id(), worker);
                    }
                }
            }
        }
        if let Some(sampler) = sampler {
            sampler.abort();
        }
        if let Some(mut cleanup) = cleanup {
            // it stops between two batches once shutdown fired; a batch in
            // progress is one short statement
            if tokio::time::timeout(Duration::from_secs(5), &mut cleanup)
                .await
                .is_err()
            {
                cleanup.abort();
            }
        }
        if let Some(heartbeat) = heartbeat {
            self.stop_heartbeat(heartbeat).await;
        }
        total
    }

    /// Writes the heartbeat row every `every` until shutdown. A failing
    /// write is logged (a warning when it starts failing, then quietly) and
    /// tried again at the next interval; it never affects delivery.
    async fn beat(
        &self,
        every: Duration,
        started_at: std::time::SystemTime,
        shutdown: CancellationToken,
    ) {
        let base = RelayHeartbeat::new(
            self.inner.id,
            host_name(),
            std::process::id(),
            env!("CARGO_PKG_VERSION"),
            started_at,
            every,
        );
        let mut failing = false;
        loop {
            let last = self.inner.last_claim_us.load(Ordering::Relaxed);
            let beat = base
                .clone()
                .last_claim_at((last != NEVER).then(|| from_unix_micros(last)))
                .leased(self.leased());
            match self.inner.store.heartbeat(&beat).await {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "writing the relay heartbeat failed (run `postbox migrate`?); retrying every interval");
                }
                Err(e) => tracing::debug!(error = %e, "writing the relay heartbeat failed"),
            }
            // A write in progress finishes first: stopping mid-statement
            // could let the row reappear after `stop_heartbeat` deleted it.
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// After the workers are done (every lease completed or released): waits
    /// for a heartbeat write in progress, then deletes the row.
    async fn stop_heartbeat(&self, mut task: AbortOnDropHandle<()>) {
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
        match self.inner.store.remove_relay(self.inner.id).await {
            Ok(_) => tracing::debug!(postbox.relay_id = %self.inner.id, "heartbeat row removed"),
            Err(e) => {
                tracing::warn!(postbox.relay_id = %self.inner.id, error = %e, "removing the relay heartbeat failed; `postbox relays forget` removes it")
            }
        }
    }

    /// Deletes the sent messages the store has kept longer than its
    /// retention, [`CLEANUP_BATCH`] rows per statement (one short
    /// transaction each) until none is left, and returns how many. Nothing
    /// for a store without retention. [`Relay::run`] calls it every
    /// [`RelayOptions::cleanup_interval`]; call it yourself when you drive
    /// the relay with [`Relay::tick`].
    pub async fn clean_up_sent(&self) -> Result<u64, StoreError> {
        self.clean_up_until(&CancellationToken::new()).await
    }

    /// [`Relay::clean_up_sent`] that stops between batches once `stop`
    /// fires. Counts and logs what it deleted, also when a batch fails.
    async fn clean_up_until(&self, stop: &CancellationToken) -> Result<u64, StoreError> {
        let Some(retention) = self.inner.store.sent_retention() else {
            return Ok(0);
        };
        let mut purged = 0;
        let mut result = Ok(());
        while !stop.is_cancelled() {
            match self.inner.store.purge_sent(retention, CLEANUP_BATCH).await {
                Ok(n) => {
                    purged += n;
                    metrics::counter!(observe::SENT_PURGED_TOTAL).increment(n);
                    if n < CLEANUP_BATCH as u64 {
                        break;
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if purged > 0 {
            tracing::debug!(
                postbox.purged = purged,
                ?retention,
                "deleted sent messages kept past the retention"
            );
        }
        result.map(|()| purged)
    }

    /// Runs the cleanup now and then every `every` until shutdown. A failing
    /// cleanup is logged (a warning when it starts failing, then quietly)
    /// and tried again at the next interval; it never affects delivery.
    async fn clean_up_every(&self, every: Duration, shutdown: CancellationToken) {
        let mut failing = false;
        loop {
            match self.clean_up_until(&shutdown).await {
                Ok(_) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "deleting sent messages past the retention failed (run `postbox migrate`?); retrying every cleanup interval");
                }
                Err(e) => {
                    tracing::debug!(error = %e, "deleting sent messages past the retention failed")
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Keeps the store gauges current: every `every`, from a random point of
    /// the first interval, what holds the outbox back (`holdups`, cheap)
    /// and the outbox's counts (`stats`); a count that took `d` is not made
    /// again before `STATS_STRETCH × d` has passed, but at the first
    /// interval after that. A failing query is logged and tried again at
    /// the next interval (a count that failed slowly, after a stretched
    /// pause); it never affects delivery.
    ///
    /// Why not at once: a count reads the whole outbox, which on PostgreSQL
    /// is a scan of the whole table (1M rows: 0.76 s alone, 2.2–2.3 s each
    /// when four ran at once, on our 2-core machines). Relays started
    /// together, as a deploy starts them, all scanned at the same moment,
    /// right when they started on a backlog: four relays draining 1M rows
    /// together ran four such scans at once, and measured 0.86× of one
    /// relay's speed against 1.05× with no sampling (one run each of
    /// `postbox-bench relays --rows 1000000`, BENCHMARKS.md). Why the
    /// stretch: see [`STATS_STRETCH`].
    async fn sample_stats(&self, every: Duration, shutdown: CancellationToken) {
        let first =
            Duration::try_from_secs_f64(every.as_secs_f64() * fastrand::f64()).unwrap_or(every);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(first) => {}
        }
        let mut count_due = Instant::now();
        loop {
            // first, so that a slow count never delays these warnings
            match self.inner.store.holdups().await {
                Ok(h) => observe::record_holdups(&h),
                Err(e) => tracing::debug!(error = %e, "sampling what holds the outbox back failed"),
            }
            let started = Instant::now();
            if started >= count_due {
                match self.inner.store.stats(&crate::store::Filter::all()).await {
                    Ok(stats) => {
                        let age = stats
                            .oldest_pending_at
                            .map(|t| since(self.inner.clock.now(), t));
                        observe::record_stats(&stats, age);
                    }
                    Err(e) => tracing::debug!(error = %e, "sampling outbox stats failed"),
                }
                let took = started.elapsed();
                let pause = took.saturating_mul(STATS_STRETCH).min(STATS_PAUSE_CAP);
                if pause > every {
                    tracing::debug!(
                        ?took,
                        ?pause,
                        "counting the outbox was slow; the next count waits longer than the interval"
                    );
                }
                count_due = Instant::now() + pause;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// [`Relay::work`] as a task of [`Relay::run`], started after `after`
    /// when it replaces a worker that panicked.
    async fn worker(
        self,
        worker: usize,
        shutdown: CancellationToken,
        after: Option<Duration>,
    ) -> TickReport {
        if let Some(after) = after {
            tokio::select! {
                () = shutdown.cancelled() => return TickReport::default(),
                () = tokio::time::sleep(after) => {}
            }
        }
        self.work(worker, shutdown).await
    }

    /// One worker. While it publishes a batch it records the previous one's
    /// outcomes (or, when that is still to do and the store's writes run in
    /// parallel, while it claims the next one, unless such a claim came
    /// back empty lately: see [`SETTLE_FIRST`]) and, when the batch is full
    /// and publishing takes long enough to hide a claim behind
    /// ([`claim_ahead_pays`]), already claims the next one (again unless an
    /// overlapping claim came back empty lately; on a store whose writes do
    /// not run in parallel, only once the previous batch is recorded), so the
    /// database's work overlaps the broker's. A worker holds at most three
    /// batches' leases (one being recorded, one being published, one
    /// claimed ahead).
    async fn work(&self, worker: usize, shutdown: CancellationToken) -> TickReport {
        let o = &self.inner.options;
        let wake = &self.inner.waker.workers[worker];
        let error_backoff = RetryPolicy::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut failures = 0u32;
        let mut total = TickReport::default();
        let mut unsettled: Option<Settle> = None;
        let mut ahead: Option<Claimed> = None;
        let mut dues = RetryDues::default();
        // how long this worker's latest publish took
        let mut publish_took = Duration::ZERO;
        let parallel_writes = self.inner.store.parallel_writes();
        // Claims left that record before they claim, although the store's
        // writes run in parallel (see `SETTLE_FIRST`).
        let mut settle_first = 0u32;
        while !shutdown.is_cancelled() {
            let had_unsettled = unsettled.is_some();
            let parallel = parallel_writes && settle_first == 0;
            // Subscribed before the claim: a notification for rows the claim
            // is too early to see ends the wait below instead of being lost
            // while the claim runs.
            let mut store_woken = std::pin::pin!(self.inner.store.notified());
            let claimed = match ahead.take() {
                Some(claimed) => Ok(claimed),
                None if parallel => {
                    let (claimed, lost) = tokio::join!(
                        self.claim_batch(),
                        self.settle_quietly(unsettled.take(), &mut dues)
                    );
                    total.lost += lost;
                    claimed
                }
                None => {
                    settle_first = settle_first.saturating_sub(1);
                    total.lost += self.settle_quietly(unsettled.take(), &mut dues).await;
                    self.claim_batch().await
                }
            };
            let pause = match claimed {
                Ok(claimed) if claimed.claim.is_empty() => {
                    failures = 0;
                    let alongside = had_unsettled && parallel;
                    if alongside && !claimed.rotated {
                        settle_first = SETTLE_FIRST;
                    }
                    if claimed.rotated || alongside {
                        // A rotated claim: this tenant has nothing claimable
                        // now; the rotation's "any tenant" claim decides
                        // whether to sleep. A claim made while a batch was
                        // being recorded: the next message of each of its
                        // keys is claimable only now, so look again before
                        // sleeping (and record first for a while, see
                        // `SETTLE_FIRST`). A claim made after the recording
                        // already saw them.
                        continue;
                    }
                    dues.pause(o.poll_interval)
                }
                Ok(claimed) => {
                    failures = 0;
                    let claim_took = claimed.took;
                    // A full batch says more is waiting: claim the next one
                    // while this one is published, if there is broker time to
                    // hide it behind. A partial one says the backlog is
                    // drained: claiming ahead would mostly come back empty.
                    let full = claimed.claim.len() >= o.batch_size;
                    let ahead_pays =
                        full && settle_first == 0 && claim_ahead_pays(claim_took, publish_took);
                    // A store whose writes do not run in parallel (see
                    // `Store::parallel_writes`) first records the previous
                    // batch (still to do when this one was claimed ahead),
                    // then claims ahead, both while this one is published.
                    let overlap = parallel_writes || unsettled.is_none();
                    let claim_next = |now: bool| {
                        let shutdown = &shutdown;
                        async move {
                            if now && ahead_pays && !shutdown.is_cancelled() {
                                self.claim_batch().await.ok()
                            } else {
                                None
                            }
                        }
                    };
                    let claim_ahead = claim_next(overlap);
                    let record = async {
                        let lost = self.settle_quietly(unsettled.take(), &mut dues).await;
                        (lost, claim_next(!overlap).await)
                    };
                    let publish = async {
                        let started = Instant::now();
                        let done = self.publish_claimed(claimed, &shutdown).await;
                        (done, started.elapsed())
                    };
                    let (((report, settle), took), ahead_now, (lost, ahead_after)) =
                        tokio::join!(publish, claim_ahead, record);
                    let next = ahead_now.or(ahead_after);
                    publish_took = took;
                    // Nothing of the batch went out: its lease was too close
                    // to its end (claims slower than the lease leaves after
                    // the send timeout), or the publisher sent none of it.
                    // Claiming again at once would only repeat that.
                    let none_out = report.claimed > 0 && report.released == report.claimed;
                    total += report;
                    total.lost += lost;
                    unsettled = settle;
                    match next {
                        // The batches in flight held every claimable
                        // message (their keys open up once they are
                        // recorded): overlap no claim for a while.
                        Some(c) if c.claim.is_empty() => {
                            if !c.rotated {
                                settle_first = SETTLE_FIRST;
                            }
                        }
                        next => ahead = next,
                    }
                    if full {
                        // More may be waiting, including the next message of
                        // each key just published. Idle siblings help: a
                        // batch can hold every claimable head (as many keys
                        // as the batch size), leaving them an empty claim and
                        // a poll interval of sleep while the next heads are
                        // already there.
                        self.inner.waker.wake_others(worker);
                    }
                    // (a batch claimed ahead is published at once instead;
                    // the releases are recorded before the pause, so that
                    // other relays may take those rows meanwhile)
                    if !none_out || ahead.is_some() {
                        continue;
                    }
                    total.lost += self.settle_quietly(unsettled.take(), &mut dues).await;
                    o.poll_interval
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let wait = error_backoff.delay_with(failures, 0.5 + fastrand::f64() / 2.0);
                    tracing::warn!(error = %e, ?wait, "relay pass failed, backing off");
                    wait
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = wake.notified() => {}
                () = store_woken.as_mut() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
        // a batch claimed ahead is released unpublished (the token fired)
        if let Some(claimed) = ahead.take() {
            let (report, settle) = self.publish_claimed(claimed, &shutdown).await;
            total += report;
            total.lost += self.settle_quietly(settle, &mut dues).await;
        }
        total.lost += self.settle_quietly(unsettled.take(), &mut dues).await;
        total
    }

    /// [`Relay::settle`] for a worker: a failure is logged (the rows return
    /// to whoever claims once the lease ends), not returned. Gives the rows
    /// lost to a takeover, and notes in `dues` when the retries it recorded
    /// come due.
    async fn settle_quietly(&self, settle: Option<Settle>, dues: &mut RetryDues) -> u64 {
        let Some(settle) = settle else { return 0 };
        let delays: Vec<Duration> = settle
            .completions
            .iter()
            .filter_map(|c| match &c.disposition {
                Disposition::Retry { delay, .. } => Some(*delay),
                _ => None,
            })
            .collect();
        match self.settle(settle).await {
            Ok(lost) => {
                // measured from after the store recorded them, so never
                // before the store's own `now() + delay`
                let recorded = Instant::now();
                for delay in delays {
                    // past what `Instant` can hold: the poll finds it anyway
                    if let Some(due) = recorded.checked_add(delay) {
                        dues.add(due);
                    }
                }
                lost
            }
            Err(e) => {
                tracing::warn!(error = %e, "recording a batch's outcomes failed");
                0
            }
        }
    }
}

/// When the retries a worker recorded come due, so that an idle worker
/// wakes for them instead of waiting out a whole poll interval. Only this
/// worker's own retries: delayed messages and other relays' retries are
/// found by the poll.
#[derive(Debug, Default)]
struct RetryDues(std::collections::BinaryHeap<std::cmp::Reverse<Instant>>);

impl RetryDues {
    /// Due times kept at most; later ones fall back to the poll.
    const MAX: usize = 1024;

    fn add(&mut self, due: Instant) {
        if self.0.len() < Self::MAX {
            self.0.push(std::cmp::Reverse(due));
        }
    }

    /// How long an idle worker sleeps: `poll`, or less if one of its
    /// retries comes due sooner. Due times already passed are dropped (the
    /// claim that just came back empty was made after them), so each one
    /// shortens at most one sleep and an early wake cannot spin.
    fn pause(&mut self, poll: Duration) -> Duration {
        let now = Instant::now();
        while self.0.peek().is_some_and(|d| d.0 <= now) {
            self.0.pop();
        }
        self.0
            .peek()
            .map_or(poll, |d| poll.min(d.0.saturating_duration_since(now)))
    }
}

/// This machine's host name, for the heartbeat row.
fn host_name() -> String {
    whoami::fallible::hostname().unwrap_or_else(|_| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retry_dues_shorten_one_sleep_each_and_never_lengthen_the_poll() {
        let poll = Duration::from_secs(60);
        let mut dues = RetryDues::default();
        assert_eq!(dues.pause(poll), poll, "nothing due: the poll");
        let now = Instant::now();
        dues.add(now + Duration::from_secs(90));
        assert_eq!(dues.pause(poll), poll, "due after the poll: the poll");
        dues.add(now + Duration::from_secs(5));
        dues.add(now + Duration::from_secs(2));
        assert_eq!(dues.pause(poll), Duration::from_secs(2));
        tokio::time::advance(Duration::from_secs(3)).await;
        // 2 s has passed and is dropped; 5 s is next
        assert_eq!(dues.pause(poll), Duration::from_secs(2));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(dues.pause(poll), poll, "all passed or beyond the poll");
        tokio::time::advance(Duration::from_secs(85)).await;
        assert_eq!(
            dues.pause(poll),
            poll,
            "a passed due never gives a zero pause"
        );
        for i in 0..RetryDues::MAX + 10 {
            dues.add(Instant::now() + Duration::from_secs(1 + i as u64));
        }
        assert_eq!(dues.0.len(), RetryDues::MAX, "bounded");
    }
}
