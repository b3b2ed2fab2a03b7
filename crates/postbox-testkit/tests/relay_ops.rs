//! What a relay tells operators (metrics, health) and how it shuts down,
//! checked on the in-memory store with scriptable publishers.

use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};
use postbox_core::observe;
use postbox_core::{
    CancellationToken, ListQuery, NewMessage, Publisher, Relay, Status, Store, TickReport,
};
use postbox_testkit::{Behaviour, MemoryStore, TestPublisher};

/// Everything recorded so far (a debugging snapshot resets what it reads,
/// so each check takes one and looks everything up in it).
struct Recorded(Vec<(CompositeKey, DebugValue)>);

fn recorded(snap: &Snapshotter) -> Recorded {
    Recorded(
        snap.snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| (key, value))
            .collect(),
    )
}

/// The value of counter `name` with exactly these labels, or 0.
fn counter(snap: &Recorded, name: &str, labels: &[(&str, &str)]) -> u64 {
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    want.sort();
    snap.0
        .iter()
        .find_map(|(key, value)| {
            if key.kind() != MetricKind::Counter {
                return None;
            }
            let mut got: Vec<(String, String)> = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            got.sort();
            match value {
                DebugValue::Counter(n) if key.key().name() == name && got == want => Some(*n),
                _ => None,
            }
        })
        .unwrap_or(0)
}

fn histogram_len(snap: &Recorded, name: &str) -> usize {
    snap.0
        .iter()
        .filter(|(key, _)| key.key().name() == name)
        .map(|(_, value)| match value {
            DebugValue::Histogram(v) => v.len(),
            _ => 0,
        })
        .sum()
}

fn gauge(snap: &Recorded, name: &str) -> Option<f64> {
    snap.0.iter().find_map(|(key, value)| match value {
        DebugValue::Gauge(g) if key.key().name() == name => Some(g.into_inner()),
        _ => None,
    })
}

/// `relay.run(shutdown)` in a task of its own.
fn spawn_run<P: Publisher>(
    relay: &Relay<MemoryStore, P>,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<TickReport> {
    let relay = relay.clone();
    let shutdown = shutdown.clone();
    tokio::spawn(async move { relay.run(shutdown).await })
}

/// Runs `f` on a current-thread runtime with paused time and a recorder
/// local to this test.
fn with_recorder(f: impl AsyncFnOnce(Snapshotter)) {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    metrics::with_local_recorder(&recorder, || rt.block_on(f(snap)));
}

#[test]
fn relay_counts_outcomes_by_topic_and_times_each_step() {
    with_recorder(async |snap| {
        let store = MemoryStore::new();
        store.enqueue([
            NewMessage::new("orders.created", "1"),
            NewMessage::new("orders.created", "2").key("k1"),
            NewMessage::new("orders.paid", "3").key("bad"),
            NewMessage::new("orders.paid", "4").key("flaky"),
        ]);
        let publisher = TestPublisher::new(|m| match m.key.as_deref() {
            Some("bad") => Behaviour::Reject("no such exchange".into()),
            Some("flaky") => Behaviour::Transient("broker busy".into()),
            _ => Behaviour::Deliver,
        });
        let relay = Relay::builder(store, publisher).build().expect("relay");
        let r = relay.tick().await.expect("tick");
        assert_eq!((r.claimed, r.sent, r.dead, r.retried), (4, 2, 1, 1));
        let snap = recorded(&snap);

        let published = |topic| counter(&snap, observe::PUBLISHED_TOTAL, &[("topic", topic)]);
        assert_eq!(published("orders.created"), 2);
        assert_eq!(published("orders.paid"), 0);
        let failed = |kind| {
            counter(
                &snap,
                observe::PUBLISH_FAILURES_TOTAL,
                &[("topic", "orders.paid"), ("kind", kind)],
            )
        };
        assert_eq!(failed("rejected"), 1);
        assert_eq!(failed("transient"), 1);
        assert_eq!(
            counter(&snap, observe::DEAD_TOTAL, &[("topic", "orders.paid")]),
            1
        );
        assert_eq!(histogram_len(&snap, observe::COMMIT_TO_PUBLISH_SECONDS), 2);
        assert_eq!(histogram_len(&snap, observe::CLAIM_DURATION_SECONDS), 1);
        assert_eq!(histogram_len(&snap, observe::PUBLISH_DURATION_SECONDS), 1);
        assert_eq!(histogram_len(&snap, observe::COMPLETE_DURATION_SECONDS), 1);
        assert_eq!(histogram_len(&snap, observe::BATCH_SIZE), 1);
        // a batch with an acknowledgement: the publisher counts as healthy
        let health = relay.health();
        assert!(health.is_ready(), "{health:?}");
    });
}

#[test]
fn topic_labels_past_the_limit_are_counted_as_other() {
    with_recorder(async |snap| {
        let store = MemoryStore::new();
        store.enqueue((0..5).map(|i| NewMessage::new(format!("tenant.{i}"), "x")));
        let mut options = postbox_core::RelayOptions::default();
        options.metrics_topic_limit = 2;
        let relay = Relay::builder(store, TestPublisher::recording())
            .options(options)
            .build()
            .expect("relay");
        relay.tick().await.expect("tick");
        let snap = recorded(&snap);
        let published = |topic| counter(&snap, observe::PUBLISHED_TOTAL, &[("topic", topic)]);
        assert_eq!(published("tenant.0"), 1);
        assert_eq!(published("tenant.1"), 1);
        assert_eq!(published(observe::OTHER_TOPIC), 3);
        assert_eq!(published("tenant.4"), 0);
    });
}

#[test]
fn an_all_transient_batch_makes_the_relay_unready_until_a_message_goes_through() {
    with_recorder(async |_snap| {
        let store = MemoryStore::new();
        store.enqueue([NewMessage::new("t", "a")]);
        // fails the first attempt of every message, delivers the second;
        // the retry is due only once the store's clock is moved on (a 1 ms
        // retry could come due before the next tick and spoil its emptiness)
        let relay = Relay::builder(store.clone(), TestPublisher::fail_first(1))
            .retry_policy(postbox_core::RetryPolicy::new(
                Duration::from_secs(600),
                Duration::from_secs(600),
            ))
            .build()
            .expect("relay");
        assert!(
            !relay.health().is_ready(),
            "not ready before the first claim"
        );
        relay.tick().await.expect("tick");
        let h = relay.health();
        assert!(!h.is_ready());
        assert_eq!(h.store_error, None);
        assert!(
            h.publisher_error
                .as_deref()
                .is_some_and(|e| e.contains("injected failure")),
            "{h:?}"
        );
        // an empty claim changes nothing about the publisher
        relay.tick().await.expect("tick");
        assert!(!relay.health().is_ready());
        store.advance(Duration::from_secs(601));
        let r = relay.tick().await.expect("tick");
        assert_eq!(r.sent, 1);
        assert!(relay.health().is_ready(), "{:?}", relay.health());
    });
}

#[test]
fn run_samples_store_counts_into_gauges() {
    with_recorder(async |snap| {
        let store = MemoryStore::new();
        // parked on a dead head: stays pending, so the gauges have something to show
        store.enqueue([
            NewMessage::new("t", "a").key("k"),
            NewMessage::new("t", "b").key("k"),
        ]);
        let relay = Relay::builder(store, TestPublisher::reject_key("k"))
            .stats_interval(Some(Duration::from_secs(1)))
            .build()
            .expect("relay");
        let shutdown = CancellationToken::new();
        let running = spawn_run(&relay, &shutdown);
        // (paused time) the claim at start dead-letters the head at once;
        // the first sample, at a random point of the first second, and
        // any later one see it
        tokio::time::sleep(Duration::from_millis(1500)).await;
        shutdown.cancel();
        running.await.expect("run");
        let snap = recorded(&snap);
        assert_eq!(gauge(&snap, observe::DEAD), Some(1.0));
        assert_eq!(gauge(&snap, observe::PENDING), Some(1.0));
        assert_eq!(gauge(&snap, observe::PARKED_KEYS), Some(1.0));
        assert!(gauge(&snap, observe::OLDEST_PENDING_AGE_SECONDS).is_some());
    });
}

#[tokio::test(start_paused = true)]
async fn shutdown_releases_a_batch_whose_publish_outlives_the_grace() {
    let store = MemoryStore::new();
    store.enqueue([
        NewMessage::new("t", "a").key("k"),
        NewMessage::new("t", "b"),
    ]);
    let publisher = TestPublisher::hanging();
    let relay = Relay::builder(store.clone(), publisher.clone())
        .concurrency(1)
        .send_timeout(Duration::from_secs(20))
        .shutdown_grace(Duration::from_secs(2))
        .build()
        .expect("relay");
    let shutdown = CancellationToken::new();
    let running = spawn_run(&relay, &shutdown);
    while publisher.calls() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let asked = tokio::time::Instant::now();
    shutdown.cancel();
    let report = running.await.expect("run");
    // it gave the publish its grace, not the whole send timeout
    let waited = asked.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(20),
        "{waited:?}"
    );
    assert_eq!((report.claimed, report.sent, report.retried), (2, 0, 0));

    // the keyless row is claimable at once, its attempt not counted; the
    // keyed one keeps its lease (the abandoned send may still land, and
    // the key's next message must not overtake it), its attempt counted
    let rows = store.list(&ListQuery::new(None, 10)).await.expect("list");
    let states: Vec<_> = rows
        .iter()
        .map(|r| (r.key.as_deref(), r.status, r.attempts))
        .collect();
    assert_eq!(
        states,
        [(Some("k"), Status::Leased, 1), (None, Status::Pending, 0)],
        "{rows:?}"
    );
    let next_publisher = TestPublisher::recording();
    let next = Relay::builder(store.clone(), next_publisher.clone())
        .build()
        .expect("relay");
    assert_eq!(next.tick().await.expect("tick").sent, 1);
    assert_eq!(next_publisher.delivered()[0].key, None);
    // once the lease is over, the keyed one goes out too
    store.advance(Duration::from_secs(31));
    assert_eq!(next.tick().await.expect("tick").sent, 1);
    let delivered = next_publisher.delivered();
    assert_eq!(delivered[1].key.as_deref(), Some("k"));
    assert_eq!(delivered[1].attempt, 2);
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_a_publish_finish_within_the_grace() {
    let store = MemoryStore::new();
    store.enqueue([NewMessage::new("t", "a")]);
    // answers after 1 s, inside the 5 s grace
    let publisher = SlowPublisher(TestPublisher::recording(), Duration::from_secs(1));
    let relay = Relay::builder(store.clone(), publisher.clone())
        .concurrency(1)
        .build()
        .expect("relay");
    let shutdown = CancellationToken::new();
    let running = spawn_run(&relay, &shutdown);
    while publisher.0.calls() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    let report = running.await.expect("run");
    assert_eq!(report.sent, 1);
    assert_eq!(publisher.0.delivered().len(), 1);
    assert!(
        store
            .list(&ListQuery::new(None, 10))
            .await
            .expect("list")
            .is_empty()
    );
}

#[derive(Clone)]
struct SlowPublisher(TestPublisher, Duration);

impl postbox_core::Publisher for SlowPublisher {
    async fn publish(&self, batch: &[postbox_core::Message]) -> Vec<postbox_core::PublishOutcome> {
        // counted first, answered after the delay
        let answer = self.0.publish(batch);
        tokio::time::sleep(self.1).await;
        answer.await
    }
}

#[test]
fn leases_held_gauge_and_heartbeat_follow_the_batch_in_flight() {
    with_recorder(async |snap| {
        let store = MemoryStore::new();
        store.enqueue([
            NewMessage::new("t", "a"),
            NewMessage::new("t", "b").key("k"),
        ]);
        let publisher = TestPublisher::hanging();
        let relay = Relay::builder(store.clone(), publisher.clone())
            .concurrency(1)
            .send_timeout(Duration::from_secs(20))
            .heartbeat_interval(Some(Duration::from_secs(1)))
            .shutdown_grace(Duration::from_secs(1))
            .build()
            .expect("relay");
        let shutdown = CancellationToken::new();
        let running = spawn_run(&relay, &shutdown);
        while publisher.calls() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // (paused time) the next heartbeat sees the batch held
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let rows = store.relays().await.expect("relays");
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].heartbeat.relay_id, relay.id());
        assert_eq!(rows[0].heartbeat.leased, 2);
        assert_eq!(gauge(&recorded(&snap), observe::LEASES_HELD), Some(2.0));

        shutdown.cancel();
        running.await.expect("run");
        // the debugging recorder resets what it reads: after reading 2,
        // releasing the batch moves the gauge by -2, back to 0 in total
        assert_eq!(gauge(&recorded(&snap), observe::LEASES_HELD), Some(-2.0));
        assert_eq!(relay.leased(), 0);
        assert!(store.relays().await.expect("relays").is_empty());
    });
}

#[test]
fn heartbeat_interval_must_be_positive() {
    let err = Relay::builder(MemoryStore::new(), TestPublisher::recording())
        .heartbeat_interval(Some(Duration::ZERO))
        .build()
        .err()
        .expect("refused");
    assert!(err.to_string().contains("heartbeat_interval"), "{err}");
    assert!(
        Relay::builder(MemoryStore::new(), TestPublisher::recording())
            .heartbeat_interval(None)
            .build()
            .is_ok()
    );
}

#[test]
fn an_absurd_lease_is_refused() {
    let err = Relay::builder(MemoryStore::new(), TestPublisher::recording())
        .lease(Duration::from_secs(u64::MAX))
        .build()
        .err()
        .expect("refused");
    assert!(err.to_string().contains("lease"), "{err}");
    assert!(
        Relay::builder(MemoryStore::new(), TestPublisher::recording())
            .lease(postbox_core::MAX_LEASE)
            .build()
            .is_ok()
    );
}

/// A worker records a batch's outcomes while it claims the next one; the
/// next message of a key in that batch becomes claimable only once they
/// are recorded. The worker must then look again at once, not sleep a poll
/// interval: one key of 20 messages, one per batch, drains in order with no
/// poll in between (virtual time: the hour-long poll never elapses).
#[test]
fn a_key_drains_back_to_back_while_each_batch_is_being_recorded() {
    with_recorder(async |_snap| {
        let store = MemoryStore::new();
        store.enqueue((0..20).map(|i| NewMessage::new("orders", i.to_string()).key("k")));
        let publisher = TestPublisher::recording();
        let poll = Duration::from_secs(3600);
        let relay = Relay::builder(store, publisher.clone())
            .batch_size(1)
            .concurrency(1)
            .poll_interval(poll)
            .build()
            .expect("relay");
        let shutdown = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let running = spawn_run(&relay, &shutdown);
        while publisher.delivered().len() < 20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            started.elapsed() < poll,
            "the worker slept a poll interval between two batches of one key"
        );
        let order: Vec<String> = publisher
            .delivered()
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect();
        let expected: Vec<String> = (0..20).map(|i: i32| i.to_string()).collect();
        assert_eq!(order, expected);
        shutdown.cancel();
        let report = running.await.expect("relay task");
        assert_eq!(report.sent, 20);
        assert_eq!(relay.leased(), 0, "every lease settled at shutdown");
    });
}

/// Under load a worker claims its next batch while it publishes the
/// current one, when publishing is slow enough to hide a claim behind. At
/// shutdown the batch claimed ahead is released unpublished with the one
/// whose publish outlived the grace: every row claimable at once, no attempt
/// counted, nothing left leased.
#[tokio::test(start_paused = true)]
async fn a_batch_claimed_ahead_is_released_unpublished_at_shutdown() {
    let store = MemoryStore::new();
    store.enqueue((0..6).map(|i| NewMessage::new("t", i.to_string())));
    // the first batch is slow (so the worker learns that claiming ahead
    // pays), the second never answers
    let publisher = TestPublisher::new(|m| match &m.payload[..] {
        b"0" | b"1" => Behaviour::Slow(Duration::from_secs(1)),
        _ => Behaviour::Hang,
    });
    let relay = Relay::builder(store.clone(), publisher.clone())
        .batch_size(2)
        .concurrency(1)
        .send_timeout(Duration::from_secs(20))
        .shutdown_grace(Duration::from_secs(2))
        .build()
        .expect("relay");
    let shutdown = CancellationToken::new();
    let running = spawn_run(&relay, &shutdown);
    // the second batch is being published and the third claimed ahead
    while relay.leased() < 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(publisher.calls(), 2, "one publish at a time per worker");
    shutdown.cancel();
    let report = running.await.expect("run");
    assert_eq!((report.claimed, report.sent), (6, 2));
    assert_eq!(
        publisher.calls(),
        2,
        "the batch claimed ahead was never published"
    );
    assert_eq!(relay.leased(), 0);
    let rows = store.list(&ListQuery::new(None, 10)).await.expect("list");
    assert_eq!(rows.len(), 4);
    for r in &rows {
        assert_eq!((r.status, r.attempts), (Status::Pending, 0), "{r:?}");
    }
}

/// An idle worker wakes when a retry it recorded comes due, not a whole
/// poll interval later: with a 1 h poll and retries under 30 s, the message
/// goes out within ten minutes of (paused) time.
#[tokio::test(start_paused = true)]
async fn an_idle_worker_wakes_for_its_own_retry() {
    let store = MemoryStore::with_clock(std::sync::Arc::new(postbox_core::TokioClock::new()));
    store.enqueue([NewMessage::new("t", "flaky")]);
    let publisher = TestPublisher::fail_first(1);
    let relay = Relay::builder(store.clone(), publisher.clone())
        .poll_interval(Duration::from_secs(3600))
        .retry_policy(postbox_core::RetryPolicy::new(
            Duration::from_secs(30),
            Duration::from_secs(30),
        ))
        .concurrency(1)
        .build()
        .expect("relay");
    let shutdown = CancellationToken::new();
    let running = spawn_run(&relay, &shutdown);
    let delivered = publisher
        .delivered_within(1, Duration::from_secs(600))
        .await;
    shutdown.cancel();
    let report = running.await.expect("run");
    assert_eq!(
        delivered.len(),
        1,
        "the retry waited for the 1 h poll instead of its own due time"
    );
    assert_eq!((report.retried, report.sent), (1, 1));
}

/// Delivers every message but panics on a batch holding `"poison"`.
#[derive(Clone)]
struct Panicky(TestPublisher);

impl postbox_core::Publisher for Panicky {
    async fn publish(&self, batch: &[postbox_core::Message]) -> Vec<postbox_core::PublishOutcome> {
        assert!(
            batch.iter().all(|m| &m.payload[..] != b"poison"),
            "a publisher bug"
        );
        self.0.publish(batch).await
    }
}

/// A publisher that panics fails its batch (`Transient`, so the poison
/// message runs out of attempts and is dead-lettered); its worker goes on
/// and `run` returns only at shutdown. Fails if the panic ends the worker:
/// with one worker `run` then returns at once and nothing more is
/// delivered.
#[tokio::test(start_paused = true)]
async fn a_panicking_publisher_fails_its_batch_and_the_worker_goes_on() {
    let store = MemoryStore::with_clock(std::sync::Arc::new(postbox_core::TokioClock::new()));
    store.enqueue([
        NewMessage::new("t", "poison").key("a"),
        NewMessage::new("t", "fine").key("b"),
    ]);
    let publisher = Panicky(TestPublisher::recording());
    let relay = Relay::builder(store.clone(), publisher.clone())
        .concurrency(1)
        .batch_size(1)
        .max_attempts(3)
        .retry_policy(postbox_core::RetryPolicy::new(
            Duration::from_millis(10),
            Duration::from_millis(10),
        ))
        .build()
        .expect("relay");
    let shutdown = CancellationToken::new();
    let running = spawn_run(&relay, &shutdown);
    let delivered = publisher
        .0
        .delivered_within(1, Duration::from_secs(30))
        .await;
    assert_eq!(delivered.len(), 1);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!running.is_finished(), "run ended before shutdown");
    let dead = store
        .list(&ListQuery::new(Some(Status::Dead), 10))
        .await
        .expect("list");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("panicked")),
        "{dead:?}"
    );
    shutdown.cancel();
    running.await.expect("run");
}

/// Dropping `run`'s future (a `select!`, an aborted task) stops what it
/// started: the heartbeat no longer says the relay lives. Fails if the
/// heartbeat task outlives `run`: the row it writes comes back.
#[tokio::test(start_paused = true)]
async fn dropping_run_stops_its_heartbeat() {
    let store = MemoryStore::new();
    let relay = Relay::builder(store.clone(), TestPublisher::recording())
        .heartbeat_interval(Some(Duration::from_secs(1)))
        .build()
        .expect("relay");
    let running = spawn_run(&relay, &CancellationToken::new());
    while store.relays().await.expect("relays").is_empty() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.abort();
    assert!(running.await.expect_err("aborted").is_cancelled());
    store.remove_relay(relay.id()).await.expect("remove");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rows = store.relays().await.expect("relays");
    assert!(rows.is_empty(), "{rows:?}");
}

/// Gives every batch back unsent, after a millisecond.
#[derive(Clone, Default)]
struct SendsNothing(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl postbox_core::Publisher for SendsNothing {
    async fn publish(&self, batch: &[postbox_core::Message]) -> Vec<postbox_core::PublishOutcome> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1)).await;
        vec![postbox_core::PublishOutcome::NotSent; batch.len()]
    }
}

/// A batch of which nothing went out (all released: the publisher sent
/// none of it, or its lease was too close to its end) is followed by a
/// poll interval's pause, not by the same claim at once. Fails if the
/// worker claims again at once: about 10,000 publishes in 10 s here.
#[tokio::test(start_paused = true)]
async fn a_batch_of_which_nothing_went_out_is_not_claimed_again_at_once() {
    let store = MemoryStore::with_clock(std::sync::Arc::new(postbox_core::TokioClock::new()));
    store.enqueue([NewMessage::new("t", "a")]);
    let publisher = SendsNothing::default();
    let relay = Relay::builder(store.clone(), publisher.clone())
        .concurrency(1)
        .poll_interval(Duration::from_millis(250))
        .build()
        .expect("relay");
    let shutdown = CancellationToken::new();
    let running = spawn_run(&relay, &shutdown);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let calls = publisher.0.load(std::sync::atomic::Ordering::SeqCst);
    assert!((30..=41).contains(&calls), "{calls} publishes in 10 s");
    shutdown.cancel();
    running.await.expect("run");
}
