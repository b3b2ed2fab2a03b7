//! The relay: claim a batch, publish it, record the outcomes, wait, repeat.
//!
//! Every decision about a message's fate after a publish lives in
//! [`Relay::dispose`]: `Ok` → sent; `Transient` → retry with backoff until the
//! attempts run out, then dead; `Rejected` → dead now. Dead keyed messages
//! park their key unless `on_dead = skip`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::clock::{SharedClock, SystemClock, since};
use crate::error::{ConfigError, RelayError};
use crate::message::Message;
use crate::publish::{PublishOutcome, Publisher};
use crate::retry::RetryPolicy;
use crate::store::{ClaimRequest, CompleteReport, Completion, Disposition, Store};

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
    /// waker cut it short \[250 ms\].
    pub poll_interval: Duration,
    /// Batches in flight at once (claim of one overlaps publish of another) \[2\].
    pub concurrency: usize,
    /// A publish taking longer counts as `Transient` for the whole batch \[10 s\];
    /// must be shorter than the lease.
    pub send_timeout: Duration,
    /// Backoff between attempts of one message \[1 s doubling to 5 min, full jitter\].
    pub retry: RetryPolicy,
    /// Attempts before a message is dead, unless it set its own \[25\].
    pub max_attempts: u32,
    /// Park or skip the key of a dead message \[park\].
    pub on_dead: OnDead,
    /// Only claim this tenant's messages \[all tenants\].
    pub tenant: Option<String>,
}

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
    /// Outcomes not recorded because the lease had been taken over.
    pub lost: u64,
}

impl std::ops::AddAssign for TickReport {
    fn add_assign(&mut self, o: Self) {
        self.claimed += o.claimed;
        self.sent += o.sent;
        self.retried += o.retried;
        self.dead += o.dead;
        self.lost += o.lost;
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
                options: self.options,
                clock: self.clock,
                waker: RelayWaker { workers },
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
}

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

    /// A handle that wakes the running relay at once.
    pub fn waker(&self) -> RelayWaker {
        self.inner.waker.clone()
    }

    /// One pass: claim one batch, publish it, record the outcomes.
    ///
    /// For tests and cron-style use; [`Relay::run`] loops over it.
    pub async fn tick(&self) -> Result<TickReport, RelayError> {
        let o = &self.inner.options;
        let mut req = ClaimRequest::new(o.batch_size, o.lease);
        req.tenant.clone_from(&o.tenant);
        let claim = self
            .inner
            .store
            .claim(&req)
            .await
            .map_err(RelayError::Claim)?;
        if claim.is_empty() {
            return Ok(TickReport::default());
        }
        let lease_deadline = Instant::now() + o.lease;
        let token = claim.lease.token;
        let span = tracing::debug_span!(
            "postbox.batch",
            postbox.batch_size = claim.len(),
            postbox.lease_token = %token,
        );
        self.process(claim, token, lease_deadline)
            .instrument(span)
            .await
    }

    async fn process(
        &self,
        claim: crate::store::Claim,
        token: Uuid,
        lease_deadline: Instant,
    ) -> Result<TickReport, RelayError> {
        let o = &self.inner.options;
        let mut report = TickReport {
            claimed: claim.len() as u64,
            ..TickReport::default()
        };
        let mut completions = Vec::with_capacity(claim.len());

        for bad in claim.malformed {
            tracing::warn!(postbox.seq = bad.seq, reason = %bad.reason, "malformed outbox row dead-lettered");
            completions.push(Completion::new(
                bad.seq,
                Disposition::Dead {
                    error: format!("malformed row: {}", bad.reason),
                    park: bad.key.is_some() && o.on_dead == OnDead::Park,
                },
            ));
        }

        // A relay that died during a message's final attempt leaves it with
        // attempts > max: it is dead, not published once more.
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
            let outcomes = self.publish(&to_publish).await;
            let now = self.inner.clock.now();
            for (m, outcome) in to_publish.iter().zip(outcomes) {
                if outcome.is_ok() {
                    tracing::trace!(
                        postbox.id = %m.id,
                        postbox.topic = %m.topic,
                        postbox.latency_ms = since(now, m.created_at).as_millis() as u64,
                        "published"
                    );
                }
                completions.push(Completion::new(m.seq, self.dispose(m, outcome)));
            }
        }

        for c in &completions {
            match c.disposition {
                Disposition::Sent => report.sent += 1,
                Disposition::Retry { .. } => report.retried += 1,
                Disposition::Dead { .. } => report.dead += 1,
                _ => {}
            }
        }
        let done = self
            .complete_until(token, &completions, lease_deadline)
            .await?;
        if done.lost > 0 {
            tracing::warn!(
                postbox.lost = done.lost,
                "lease taken over before completion; another relay will deliver these again"
            );
        }
        report.lost = done.lost;
        Ok(report)
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
        match outcome {
            PublishOutcome::Ok => Disposition::Sent,
            PublishOutcome::Transient {
                reason,
                retry_after,
            } => {
                let max = self.max_attempts(m);
                if m.attempt >= max {
                    tracing::warn!(postbox.id = %m.id, postbox.topic = %m.topic, %reason, "message dead after its last attempt");
                    Disposition::Dead {
                        error: format!("gave up after {max} attempts: {reason}"),
                        park: self.parks(m),
                    }
                } else {
                    let backoff = self.inner.options.retry.delay(m.attempt);
                    let delay = retry_after.map_or(backoff, |hint| hint.max(backoff));
                    tracing::debug!(postbox.id = %m.id, postbox.attempt = m.attempt, ?delay, %reason, "publish failed, will retry");
                    Disposition::Retry {
                        delay,
                        error: reason,
                    }
                }
            }
            PublishOutcome::Rejected { reason } => {
                tracing::warn!(postbox.id = %m.id, postbox.topic = %m.topic, %reason, "message rejected by the broker, dead-lettered");
                Disposition::Dead {
                    error: reason,
                    park: self.parks(m),
                }
            }
        }
    }

    async fn publish(&self, batch: &[Message]) -> Vec<PublishOutcome> {
        let timeout = self.inner.options.send_timeout;
        match tokio::time::timeout(timeout, self.inner.publisher.publish(batch)).await {
            Ok(outcomes) if outcomes.len() == batch.len() => outcomes,
            Ok(outcomes) => {
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
        }
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
            match self.inner.store.complete(token, completions).await {
                Ok(r) => return Ok(r),
                Err(e) => {
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

    /// Runs until `shutdown` fires, then lets each in-flight batch finish
    /// (bounded by the send timeout) and returns the totals.
    ///
    /// Database errors are retried with backoff forever; they never end the
    /// loop.
    pub async fn run(&self, shutdown: CancellationToken) -> TickReport {
        let mut workers = JoinSet::new();
        for worker in 0..self.inner.options.concurrency {
            let relay = self.clone();
            let shutdown = shutdown.clone();
            workers.spawn(async move { relay.work(worker, shutdown).await });
        }
        let mut total = TickReport::default();
        while let Some(done) = workers.join_next().await {
            match done {
                Ok(r) => total += r,
                Err(e) => tracing::error!(error = %e, "relay worker failed"),
            }
        }
        total
    }

    async fn work(&self, worker: usize, shutdown: CancellationToken) -> TickReport {
        let o = &self.inner.options;
        let wake = &self.inner.waker.workers[worker];
        let error_backoff = RetryPolicy::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut failures = 0u32;
        let mut total = TickReport::default();
        while !shutdown.is_cancelled() {
            let pause = match self.tick().await {
                Ok(r) => {
                    failures = 0;
                    total += r;
                    if r.claimed > 0 {
                        // More may be waiting, including the next message of
                        // each key just completed.
                        continue;
                    }
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
                () = self.inner.store.notified() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
        total
    }
}
