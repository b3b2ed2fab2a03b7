//! A relay's wait after an empty claim ends on a store notification that
//! landed while that claim was running: the claim was too early to see the
//! new rows, and the notification for them must not be lost with it (or the
//! relay sleeps a whole poll interval with work waiting). Also: when a
//! worker claims ahead, and when relays started together first sample the
//! store's counts.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postbox_core::{
    CancellationToken, Claim, ClaimRequest, CompleteReport, Completion, Filter, Holdups, ListQuery,
    Message, MessageRecord, NewMessage, PublishOutcome, Publisher, PurgeQuery, Relay,
    STATS_STRETCH, Stats, Store, StoreError,
};
use postbox_testkit::{Behaviour, MemoryStore, TestPublisher};
use tokio::sync::{Notify, oneshot, watch};

/// The in-memory store with a notification channel (like PostgreSQL's
/// LISTEN) and a gate that holds a claim after it has read the store.
#[derive(Clone)]
struct Notifying {
    inner: MemoryStore,
    hint: Arc<watch::Sender<u64>>,
    gate: Arc<Mutex<Option<oneshot::Receiver<()>>>>,
    held: Arc<Notify>,
    /// Claims that came back empty.
    empty: Arc<AtomicU64>,
    /// How long each claim takes.
    claim_takes: Duration,
    /// How long each completion takes.
    complete_takes: Duration,
    /// What `parallel_writes` says.
    parallel: bool,
    /// Completions running now.
    completing: Arc<AtomicU64>,
    /// Claims running now.
    claiming: Arc<AtomicU64>,
    /// Claims and completions that began while the other kind was running.
    overlapping: Arc<AtomicU64>,
    /// Publishes running now (kept by [`Watched`]).
    publishing: Arc<AtomicU64>,
    /// Claims made while a publish was running: claims ahead.
    ahead: Arc<AtomicU64>,
    /// `stats` calls so far.
    stats_calls: Arc<AtomicU64>,
    /// How long each `stats` call takes.
    stats_takes: Duration,
    /// `holdups` calls so far.
    holdups_calls: Arc<AtomicU64>,
    /// Claims still to panic (a bug in a store).
    claim_panics: Arc<AtomicU64>,
    /// Claims, then completions, still to never answer (a database
    /// connection gone silent).
    claim_hangs: Arc<AtomicU64>,
    complete_hangs: Arc<AtomicU64>,
    /// Completions still to panic.
    complete_panics: Arc<AtomicU64>,
}

/// Takes one from `count` if it is above zero.
fn take_one(count: &AtomicU64) -> bool {
    count
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// A publisher that keeps its store's count of publishes in flight.
#[derive(Clone)]
struct Watched {
    inner: TestPublisher,
    publishing: Arc<AtomicU64>,
}

impl Publisher for Watched {
    async fn publish(&self, batch: &[Message]) -> Vec<PublishOutcome> {
        self.publishing.fetch_add(1, Ordering::SeqCst);
        let out = self.inner.publish(batch).await;
        self.publishing.fetch_sub(1, Ordering::SeqCst);
        out
    }
}

impl Notifying {
    fn new(inner: MemoryStore) -> Self {
        Self {
            inner,
            hint: Arc::new(watch::Sender::new(0)),
            gate: Arc::new(Mutex::new(None)),
            held: Arc::new(Notify::new()),
            empty: Arc::new(AtomicU64::new(0)),
            claim_takes: Duration::ZERO,
            complete_takes: Duration::ZERO,
            parallel: true,
            completing: Arc::new(AtomicU64::new(0)),
            claiming: Arc::new(AtomicU64::new(0)),
            overlapping: Arc::new(AtomicU64::new(0)),
            publishing: Arc::new(AtomicU64::new(0)),
            ahead: Arc::new(AtomicU64::new(0)),
            stats_calls: Arc::new(AtomicU64::new(0)),
            stats_takes: Duration::ZERO,
            holdups_calls: Arc::new(AtomicU64::new(0)),
            claim_panics: Arc::new(AtomicU64::new(0)),
            claim_hangs: Arc::new(AtomicU64::new(0)),
            complete_hangs: Arc::new(AtomicU64::new(0)),
            complete_panics: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The next claim reads the store, then waits for the returned sender.
    fn hold_next_claim(&self) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        *self.gate.lock().expect("gate") = Some(rx);
        tx
    }

    fn notify(&self) {
        self.hint.send_modify(|g| *g += 1);
    }
}

impl Store for Notifying {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let panics = self.claim_panics.load(Ordering::SeqCst);
        if panics > 0 {
            self.claim_panics.store(panics - 1, Ordering::SeqCst);
            panic!("a bug in the store");
        }
        if take_one(&self.claim_hangs) {
            std::future::pending::<()>().await;
        }
        self.claiming.fetch_add(1, Ordering::SeqCst);
        if self.completing.load(Ordering::SeqCst) > 0 {
            self.overlapping.fetch_add(1, Ordering::SeqCst);
        }
        if self.publishing.load(Ordering::SeqCst) > 0 {
            self.ahead.fetch_add(1, Ordering::SeqCst);
        }
        // reads the store at once, answers after `claim_takes` (a database
        // claim sees the rows as of its start)
        let claim = self.inner.claim(req).await;
        if !self.claim_takes.is_zero() {
            tokio::time::sleep(self.claim_takes).await;
        }
        self.claiming.fetch_sub(1, Ordering::SeqCst);
        if claim.as_ref().is_ok_and(Claim::is_empty) {
            self.empty.fetch_add(1, Ordering::Relaxed);
        }
        let gate = self.gate.lock().expect("gate").take();
        if let Some(gate) = gate {
            self.held.notify_one();
            let _ = gate.await;
        }
        claim
    }

    async fn complete(
        &self,
        token: uuid::Uuid,
        completions: &[Completion],
    ) -> Result<CompleteReport, StoreError> {
        if take_one(&self.complete_hangs) {
            std::future::pending::<()>().await;
        }
        if take_one(&self.complete_panics) {
            panic!("a bug in the store's completion");
        }
        self.completing.fetch_add(1, Ordering::SeqCst);
        if self.claiming.load(Ordering::SeqCst) > 0 {
            self.overlapping.fetch_add(1, Ordering::SeqCst);
        }
        let done = self.inner.complete(token, completions).await;
        if !self.complete_takes.is_zero() {
            tokio::time::sleep(self.complete_takes).await;
        }
        self.completing.fetch_sub(1, Ordering::SeqCst);
        done
    }

    fn parallel_writes(&self) -> bool {
        self.parallel
    }

    fn notified(&self) -> impl Future<Output = ()> + Send {
        // subscribed at the call, as the trait asks
        let mut rx = self.hint.subscribe();
        async move {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    async fn pending_tenants(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        self.inner.pending_tenants(limit).await
    }

    async fn stats(&self, filter: &Filter) -> Result<Stats, StoreError> {
        self.stats_calls.fetch_add(1, Ordering::SeqCst);
        if !self.stats_takes.is_zero() {
            tokio::time::sleep(self.stats_takes).await;
        }
        self.inner.stats(filter).await
    }

    async fn holdups(&self) -> Result<Holdups, StoreError> {
        self.holdups_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.holdups().await
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<MessageRecord>, StoreError> {
        self.inner.list(query).await
    }

    async fn replay(&self, filter: &Filter) -> Result<u64, StoreError> {
        self.inner.replay(filter).await
    }

    async fn skip(&self, filter: &Filter) -> Result<u64, StoreError> {
        self.inner.skip(filter).await
    }

    async fn purge(&self, query: &PurgeQuery) -> Result<u64, StoreError> {
        self.inner.purge(query).await
    }
}

/// Runs a relay of one worker with batches of `batch` and an hour-long
/// poll (so only a notification or a claim right after a batch delivers
/// within a test) until the returned token is cancelled.
fn run_one_worker<P: Publisher + Clone>(
    store: &Notifying,
    publisher: &P,
    batch: usize,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<postbox_core::TickReport>,
) {
    let relay = Relay::builder(store.clone(), publisher.clone())
        .batch_size(batch)
        .concurrency(1)
        .poll_interval(Duration::from_secs(3600))
        .build()
        .expect("relay");
    spawn_run(&relay)
}

/// `relay.run` in a task of its own, with the token that stops it.
fn spawn_run<P: Publisher + Clone>(
    relay: &Relay<Notifying, P>,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<postbox_core::TickReport>,
) {
    let relay = relay.clone();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });
    (shutdown, running)
}

/// With a slow broker a worker claims its next batch while it publishes;
/// when the batches in flight hold every claimable message (here one key,
/// batches of one) that claim ahead comes back empty every time. After one
/// such claim the worker stops claiming ahead for a while. The store's
/// writes do not run in parallel, so the worker never claims alongside a
/// recording and the claims ahead are the only ones that can come back
/// empty. Fails if every batch is accompanied by an empty claim (about 30
/// here).
#[tokio::test]
async fn a_worker_stops_claiming_ahead_after_a_claim_ahead_came_back_empty() {
    let memory = one_key_of_30();
    // publishing takes longer than a claim: a claim ahead pays
    let store = Notifying {
        claim_takes: Duration::from_millis(5),
        parallel: false,
        ..Notifying::new(memory)
    };
    let publisher = TestPublisher::new(|_| Behaviour::Slow(Duration::from_millis(20)));
    let empty = drain_one_key(&store, &publisher).await;
    assert!(
        empty <= 6,
        "{empty} empty claims for 30 batches: the worker kept claiming ahead"
    );
}

/// A store whose writes do not run in parallel (SQLite's single writer)
/// never has a claim made while a completion runs, claims ahead included:
/// while a batch is published the worker records the previous one and only
/// then claims the next. Fails if a claim ahead overlaps the recording (18
/// overlaps for 20 batches here without the check), or if claims ahead stop
/// (10 of 20 batches claimed ahead when the worker skipped the claim
/// ahead while recording, instead of making it after).
#[tokio::test]
async fn a_store_without_parallel_writes_never_claims_while_recording() {
    let memory = MemoryStore::new();
    memory.enqueue((0..20).map(|i| NewMessage::new("t", i.to_string())));
    let store = Notifying {
        claim_takes: Duration::from_millis(2),
        complete_takes: Duration::from_millis(10),
        parallel: false,
        ..Notifying::new(memory)
    };
    // a slow broker, so the worker claims ahead
    let publisher = Watched {
        inner: TestPublisher::new(|_| Behaviour::Slow(Duration::from_millis(20))),
        publishing: Arc::clone(&store.publishing),
    };
    let (shutdown, running) = run_one_worker(&store, &publisher, 1);
    let delivered = publisher
        .inner
        .delivered_within(20, Duration::from_secs(30))
        .await;
    assert_eq!(delivered.len(), 20);
    shutdown.cancel();
    running.await.expect("relay task");
    let overlapping = store.overlapping.load(Ordering::SeqCst);
    assert_eq!(
        overlapping, 0,
        "{overlapping} claims and completions overlapped"
    );
    let ahead = store.ahead.load(Ordering::SeqCst);
    assert!(ahead >= 15, "only {ahead} of 20 batches were claimed ahead");
}

/// A store holding 30 messages of one key, "0" to "29".
fn one_key_of_30() -> MemoryStore {
    let memory = MemoryStore::new();
    memory.enqueue((0..30).map(|i| NewMessage::new("t", i.to_string()).key("k")));
    memory
}

/// Runs one worker with batches of one over [`one_key_of_30`]'s store
/// until the 30 messages are delivered (in order, without a poll), and
/// returns how many of its claims came back empty.
async fn drain_one_key(store: &Notifying, publisher: &TestPublisher) -> u64 {
    let (shutdown, running) = run_one_worker(store, publisher, 1);
    let delivered = publisher
        .delivered_within(30, Duration::from_secs(30))
        .await;
    assert_eq!(delivered.len(), 30, "the key drained without a poll");
    let order: Vec<String> = delivered
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(order, (0..30).map(|i| i.to_string()).collect::<Vec<_>>());
    shutdown.cancel();
    running.await.expect("relay task");
    store.empty.load(Ordering::Relaxed)
}

/// Real time, 1 h poll: only the notification can deliver the message in
/// the 30 s the test waits. Fails if the relay subscribes to notifications
/// only when it starts to wait (after the claim).
#[tokio::test]
async fn a_notification_during_an_empty_claim_ends_the_wait_after_it() {
    let memory = MemoryStore::new();
    let store = Notifying::new(memory.clone());
    let release = store.hold_next_claim();
    let publisher = TestPublisher::recording();
    let (shutdown, running) = run_one_worker(&store, &publisher, 100);

    // the relay's first claim has looked (nothing there) and is held
    store.held.notified().await;
    // a producer commits and notifies before that claim returns
    memory.enqueue([NewMessage::new("t", "late")]);
    store.notify();
    release.send(()).expect("claim still held");

    let delivered = publisher.delivered_within(1, Duration::from_secs(30)).await;
    shutdown.cancel();
    let report = running.await.expect("relay task");
    assert_eq!(
        delivered.len(),
        1,
        "the notification sent during the empty claim was lost: nothing delivered in 30 s with a 1 h poll"
    );
    assert_eq!(report.sent, 1);
}

/// One key's messages, one per batch: each batch holds the key's only
/// claimable message, so a claim made while that batch is being recorded
/// comes back empty. After one such claim the worker records first and
/// then claims, for a while, instead of paying an empty claim per batch.
/// Fails if every batch is followed by an empty claim (about 30 here).
#[tokio::test]
async fn a_worker_records_first_after_claiming_alongside_came_back_empty() {
    let memory = one_key_of_30();
    // claims take longer than publishing, as on a database with a fast
    // broker, so the worker does not claim ahead while it publishes
    let store = Notifying {
        claim_takes: Duration::from_millis(10),
        ..Notifying::new(memory)
    };
    let publisher = TestPublisher::recording();
    let empty = drain_one_key(&store, &publisher).await;
    assert!(
        empty <= 6,
        "{empty} empty claims for 30 batches: the worker kept claiming alongside the recording"
    );
}

/// Relays started together (a deploy) spread their first samples of the
/// store's counts over the sampling interval instead of all counting the
/// whole outbox at once while they start on a backlog. Twenty relays (each
/// on its own store, to count each one's samples), a 100 s interval: in the
/// first second at most a few sample (one would be expected, more than 5
/// about once in 30 million runs; without the spread all twenty did), and by
/// the end of the first interval every one has.
#[tokio::test(start_paused = true)]
async fn relays_started_together_spread_their_first_stats_samples() {
    let stores: Vec<Notifying> = (0..20)
        .map(|_| Notifying::new(MemoryStore::new()))
        .collect();
    let sampled = || {
        stores
            .iter()
            .filter(|s| s.stats_calls.load(Ordering::SeqCst) > 0)
            .count()
    };
    let stop = CancellationToken::new();
    let mut running = Vec::new();
    for store in &stores {
        let relay = Relay::builder(store.clone(), TestPublisher::recording())
            .stats_interval(Some(Duration::from_secs(100)))
            .heartbeat_interval(None)
            .build()
            .expect("relay");
        let stop = stop.clone();
        running.push(tokio::spawn(async move { relay.run(stop).await }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let early = sampled();
    assert!(
        early <= 5,
        "{early} of 20 relays sampled in the first second"
    );
    tokio::time::sleep(Duration::from_secs(100)).await;
    assert_eq!(
        sampled(),
        20,
        "relays that sampled within the first interval"
    );
    stop.cancel();
    for r in running {
        r.await.expect("relay");
    }
}

/// Runs a relay whose store's `stats` takes `count_takes` for 1,000 s with a
/// 30 s interval; returns how many counts and `holdups` samples it made.
async fn samples_in_1000s(count_takes: Duration) -> (u64, u64) {
    let store = Notifying {
        stats_takes: count_takes,
        ..Notifying::new(MemoryStore::new())
    };
    let relay = Relay::builder(store.clone(), TestPublisher::recording())
        .stats_interval(Some(Duration::from_secs(30)))
        .heartbeat_interval(None)
        .build()
        .expect("relay");
    let (stop, running) = spawn_run(&relay);
    tokio::time::sleep(Duration::from_secs(1_000)).await;
    stop.cancel();
    running.await.expect("relay");
    (
        store.stats_calls.load(Ordering::SeqCst),
        store.holdups_calls.load(Ordering::SeqCst),
    )
}

/// A count of the outbox that takes long (a scan of a huge outbox) is not
/// repeated before [`STATS_STRETCH`] times its duration has passed, while
/// the cheap `holdups` sample keeps its interval. With counts of 10 s and a
/// 30 s interval, 1,000 s see two counts (the first at `f` in [0, 30 s),
/// the next due 500 s after it ended and made at the following interval,
/// at `f` + 520 s), not the 25 of counting every interval, and 32 or 33
/// `holdups` samples. A quick count (1 ms) is made every interval.
#[tokio::test(start_paused = true)]
async fn a_slow_count_spaces_out_the_next_ones_but_not_the_holdups() {
    let (counts, holdups) = samples_in_1000s(Duration::from_secs(10)).await;
    assert_eq!(
        counts, 2,
        "counts of 10 s each in 1,000 s (stretch {STATS_STRETCH})"
    );
    assert!(
        holdups >= 30,
        "{holdups} holdups samples in 1,000 s at a 30 s interval"
    );
    let (counts, holdups) = samples_in_1000s(Duration::from_millis(1)).await;
    assert!(
        counts >= 32,
        "{counts} counts of 1 ms each in 1,000 s at a 30 s interval"
    );
    assert_eq!(
        counts, holdups,
        "a quick count goes with every holdups sample"
    );
}

/// Tenant fairness on an outbox where nothing is claimable: 50 tenants,
/// each with a message due in an hour. Once a claim for any tenant came
/// back empty the worker claims for any tenant only, one claim per poll
/// interval, until a claim returns messages. Fails if each poll goes
/// through every tenant again (51 claims a poll, about 2,000 in 10 s).
#[tokio::test(start_paused = true)]
async fn an_idle_relay_claims_once_a_poll_however_many_tenants_wait() {
    let memory = MemoryStore::new();
    memory.enqueue((0..50).map(|i| {
        NewMessage::new("t", "later")
            .tenant(format!("tenant-{i}"))
            .delay(Duration::from_secs(3600))
    }));
    let store = Notifying::new(memory);
    let publisher = TestPublisher::new(|_| Behaviour::Deliver);
    let relay = Relay::builder(store.clone(), publisher.clone())
        .concurrency(1)
        .poll_interval(Duration::from_millis(250))
        .build()
        .expect("relay");
    let (shutdown, running) = spawn_run(&relay);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let empty = store.empty.load(Ordering::Relaxed);
    // the first round's 51, then one a poll: 40 polls in 10 s
    assert!(
        (40..=51 + 41).contains(&empty),
        "{empty} empty claims in 10 s of 250 ms polls"
    );
    // a tenant's new message is still found at the next poll
    store
        .inner
        .enqueue([NewMessage::new("t", "now").tenant("tenant-7")]);
    let delivered = publisher.delivered_within(1, Duration::from_secs(1)).await;
    assert_eq!(delivered.len(), 1);
    shutdown.cancel();
    running.await.expect("relay task");
}

/// A worker that panics (here in its store's claim) is started again: the
/// relay goes on delivering and `run` returns only at shutdown. Fails if
/// the worker is only logged: with one worker `run` returns at once.
#[tokio::test(start_paused = true)]
async fn a_worker_that_panics_is_started_again() {
    let memory = MemoryStore::new();
    memory.enqueue([NewMessage::new("t", "a")]);
    let store = Notifying::new(memory);
    store.claim_panics.store(2, Ordering::SeqCst);
    let publisher = TestPublisher::recording();
    let (shutdown, running) = run_one_worker(&store, &publisher, 10);
    let delivered = publisher.delivered_within(1, Duration::from_secs(10)).await;
    assert_eq!(delivered.len(), 1);
    assert!(!running.is_finished(), "run ended before shutdown");
    shutdown.cancel();
    running.await.expect("relay task");
}

/// A claim, then a completion, that never answer (a database connection
/// gone silent, which the kernel keeps for many minutes) are given up (the
/// claim after twice the lease, at least a minute; the recording at the
/// lease): the relay claims again and delivers, and the batch whose
/// recording hung is delivered again once its lease ran out and then
/// recorded. Fails if either call holds the worker: nothing is recorded
/// within the ten minutes given here.
#[tokio::test(start_paused = true)]
async fn a_claim_or_completion_that_never_answers_is_given_up() {
    let memory = MemoryStore::with_clock(Arc::new(postbox_core::TokioClock::new()));
    memory.enqueue([NewMessage::new("t", "a")]);
    let store = Notifying::new(memory);
    store.claim_hangs.store(1, Ordering::SeqCst);
    store.complete_hangs.store(1, Ordering::SeqCst);
    let publisher = TestPublisher::recording();
    run_until_nothing_pending(&store, &publisher).await;
    // delivered once before the completion hung, once after the lease
    assert_eq!(publisher.delivered().len(), 2);
}

/// Runs a relay of one worker (30 s lease, 1 s poll) until `store` has
/// nothing pending, at most ten minutes of (paused) time; returns it
/// stopped.
async fn run_until_nothing_pending(
    store: &Notifying,
    publisher: &TestPublisher,
) -> Relay<Notifying, TestPublisher> {
    let relay = Relay::builder(store.clone(), publisher.clone())
        .concurrency(1)
        .lease(Duration::from_secs(30))
        .poll_interval(Duration::from_secs(1))
        .build()
        .expect("relay");
    let (shutdown, running) = spawn_run(&relay);
    let mut waited = Duration::ZERO;
    while store
        .inner
        .stats(&Filter::all())
        .await
        .expect("stats")
        .pending
        > 0
    {
        assert!(
            waited < Duration::from_secs(600),
            "nothing recorded after {waited:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        waited += Duration::from_secs(1);
    }
    shutdown.cancel();
    running.await.expect("relay task");
    relay
}

/// A worker that panics while it holds a batch (here recording it) gives
/// the batch's rows up in the count of held rows (`Relay::leased`, the
/// heartbeat, `postbox_leases_held`): the restarted worker delivers the
/// batch again after its lease, and nothing stays counted. Fails if the
/// panicked worker's rows stay in the count.
#[tokio::test(start_paused = true)]
async fn a_worker_that_panics_holding_a_batch_leaves_nothing_counted() {
    let memory = MemoryStore::with_clock(Arc::new(postbox_core::TokioClock::new()));
    memory.enqueue([NewMessage::new("t", "a")]);
    let store = Notifying::new(memory);
    store.complete_panics.store(1, Ordering::SeqCst);
    let publisher = TestPublisher::recording();
    let relay = run_until_nothing_pending(&store, &publisher).await;
    assert_eq!(
        publisher.delivered().len(),
        2,
        "delivered again after the lease"
    );
    assert_eq!(
        relay.leased(),
        0,
        "rows of the panicked worker still counted"
    );
}
