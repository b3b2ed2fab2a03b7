//! The fault-injection suite (issue 9): what production does to an outbox,
//! done on purpose, each scenario checked at the end from the sink side:
//! zero committed messages lost, zero messages from rolled-back
//! transactions, zero per-key order violations, and the duplicates counted.
//!
//! Short form by default (CI); `POSTBOX_CHAOS_LONG=1` (or `scripts/chaos
//! --long`) runs the long form. Every scenario has a database of its own.
//! `POSTBOX_CHAOS_RESULTS=FILE` appends one table row per scenario to FILE.
#![allow(
    clippy::unwrap_used,
    clippy::print_stderr,
    missing_docs,
    unreachable_pub,
    dead_code
)]

mod chaos {
    pub mod harness;
}

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use chaos::harness::{
    Delivery, Ledger, RelayProcess, TOPIC, Verdict, Written, drop_database, eventually, migrate,
    outbox_rows, pg_database, read_jsonl, size, start_producers, wait_drained,
};
use postbox_core::{
    Clock, Message, NewMessage, PublishOutcome, Publisher, Relay, RetryPolicy, Status, Store,
};
use postbox_postgres::PgStore;
use postbox_testkit::PgCluster;
use postbox_testkit::services::{NATS, POSTGRES, RABBITMQ};
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Relay flags for process scenarios: short leases so a dead relay's
/// messages come back within seconds.
const FAST_RELAY: &[&str] = &[
    "--lease",
    "3s",
    "--send-timeout",
    "1s",
    "--poll-interval",
    "50ms",
    "--batch-size",
    "200",
    "--concurrency",
    "2",
    "--retry-base",
    "100ms",
    "--retry-cap",
    "2s",
    "--max-attempts",
    "1000",
];

/// What a process scenario does to the system every round.
enum Chaos<'a> {
    /// `kill -9` one relay (round robin) and start a new one.
    Kill9,
    /// `pg_terminate_backend` every relay session.
    Terminate,
    /// `pg_ctl restart -m fast` the throwaway cluster at these fractions of
    /// the committed total.
    Restart(&'a PgCluster, Vec<usize>),
}

struct ProcessRun {
    scenario: &'static str,
    url: String,
    relays: usize,
    producers: usize,
    total: usize,
    /// Keyless messages committed before the relays start: a backlog, which
    /// the PostgreSQL store claims in held batches (a transaction open while
    /// the batch is published) rather than leased ones.
    backlog: usize,
    every: Duration,
}

/// Producers and `relays` relay processes sharing one file sink, with
/// `chaos` applied every `every` until the outbox is drained.
async fn process_scenario(run: ProcessRun, chaos: Chaos<'_>) -> Verdict {
    let dir = tempfile::tempdir().unwrap();
    let sink = dir.path().join("out.jsonl");
    migrate(&run.url);
    let ledger = Arc::new(Ledger::default());
    let held_seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampling = CancellationToken::new();
    if run.backlog > 0 {
        load_keyless_backlog(&run.url, run.backlog, &ledger).await;
        tokio::spawn(count_held_batches(
            run.url.clone(),
            Arc::clone(&held_seen),
            sampling.clone(),
        ));
    }
    let mut relays: Vec<RelayProcess> = (0..run.relays)
        .map(|_| RelayProcess::spawn(&run.url, &sink, dir.path(), FAST_RELAY))
        .collect();
    let stop = CancellationToken::new();
    // a backlog scenario's producers write keyless messages: keyed ones
    // would turn the claims to the keyed statements, which lease
    let keyless = run.backlog > 0;
    let producers = start_producers(
        &run.url,
        run.producers,
        run.total,
        20,
        &ledger,
        &stop,
        keyless,
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(if chaos::harness::long() { 3600 } else { 240 });
    let mut rounds = 0usize;
    let mut restarts_done = 0usize;
    let mut admin: Option<PgConnection> = None;
    loop {
        tokio::time::sleep(run.every).await;
        let producing = !producers.iter().all(tokio::task::JoinHandle::is_finished);
        if !producing && outbox_rows(&run.url).await == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}: not drained in time ({} committed, {:?} rows left)",
            run.scenario,
            ledger.committed(),
            outbox_rows(&run.url).await
        );
        match &chaos {
            Chaos::Kill9 => {
                let i = rounds % relays.len();
                relays.remove(i).kill9();
                relays.insert(
                    i,
                    RelayProcess::spawn(&run.url, &sink, dir.path(), FAST_RELAY),
                );
                rounds += 1;
            }
            Chaos::Terminate => {
                if admin.is_none() {
                    admin = PgConnection::connect(&run.url).await.ok();
                }
                if let Some(c) = admin.as_mut() {
                    let killed: i64 = sqlx::query_scalar(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                          WHERE datname = current_database() AND pid <> pg_backend_pid()
                            AND application_name LIKE 'postbox-%'",
                    )
                    .fetch_one(&mut *c)
                    .await
                    .unwrap();
                    rounds += usize::try_from(killed).unwrap();
                }
            }
            Chaos::Restart(cluster, at) => {
                if restarts_done < at.len() && ledger.committed() >= at[restarts_done] {
                    // alternately a clean restart and a crash (immediate
                    // shutdown: commits made without the WAL flush in the
                    // last moments are lost, as in a power cut)
                    let crash = restarts_done % 2 == 1;
                    eprintln!(
                        "restarting the cluster at {} ({})",
                        cluster.addr(),
                        if crash { "crash" } else { "clean" }
                    );
                    tokio::task::block_in_place(|| {
                        if crash {
                            cluster.crash_restart();
                        } else {
                            cluster.restart();
                        }
                    });
                    restarts_done += 1;
                    rounds += 1;
                }
            }
        }
    }
    if let Chaos::Restart(_, at) = &chaos {
        assert_eq!(
            restarts_done,
            at.len(),
            "the run ended before every restart"
        );
    }
    let mut produced = 0;
    for p in producers {
        produced += p.await.unwrap();
    }
    assert_eq!(produced + run.backlog, ledger.committed());
    sampling.cancel();
    let held_seen = held_seen.load(Ordering::Relaxed);
    if run.backlog > 0 {
        // the point of a backlog scenario: kills land on held batches
        assert!(
            held_seen > 0,
            "{}: no relay session was ever seen holding a batch (idle in transaction)",
            run.scenario
        );
        assert!(rounds > 0, "{}: drained before any chaos", run.scenario);
    }
    for r in relays {
        r.stop();
    }
    let (deliveries, torn) = read_jsonl(&sink);
    let what = match chaos {
        Chaos::Kill9 if run.backlog > 0 => format!(
            "{rounds} relays killed with kill -9; held batches seen open at once (sampled every 20 ms): up to {held_seen}"
        ),
        Chaos::Kill9 => format!("{rounds} relays killed with kill -9"),
        Chaos::Terminate => format!("{rounds} relay sessions terminated"),
        Chaos::Restart(..) => format!("{rounds} PostgreSQL restarts"),
    };
    let torn_note = if torn > 0 {
        format!("; {torn} sink lines that do not parse")
    } else {
        String::new()
    };
    let verdict = Verdict::check(run.scenario, &ledger, &deliveries)
        .torn(torn)
        .note(format!(
            "{what}; {:.0} s{torn_note}",
            started.elapsed().as_secs_f64()
        ));
    if !(verdict.lost.is_empty()
        && verdict.phantom.is_empty()
        && verdict.order_violations.is_empty())
    {
        // keep the evidence: the sink, every relay's log, and the sink lines
        // that mention a lost message (e.g. inside a line that does not parse)
        let text = std::fs::read_to_string(&sink).unwrap_or_default();
        for lost in verdict.lost.iter().take(5) {
            let needle = format!("\"{lost}\"");
            for line in text.lines().filter(|l| l.contains(&needle)) {
                eprintln!(
                    "sink line with lost {lost}: {}",
                    &line[..line.len().min(600)]
                );
            }
        }
        let kept = dir.keep();
        eprintln!(
            "{}: sink and relay logs kept in {}",
            run.scenario,
            kept.display()
        );
    }
    verdict
}

/// Until `stop`, polls how many relay sessions sit idle in a transaction
/// (held backlog batches being published) and keeps the most seen at once.
async fn count_held_batches(
    url: String,
    seen: Arc<std::sync::atomic::AtomicUsize>,
    stop: CancellationToken,
) {
    let Ok(mut c) = PgConnection::connect(&url).await else {
        return;
    };
    while !stop.is_cancelled() {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = 'postbox-relay'
                AND state = 'idle in transaction'",
        )
        .fetch_one(&mut c)
        .await
        .unwrap_or(0);
        seen.fetch_max(usize::try_from(n).unwrap_or(0), Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = c.close().await;
}

/// `n` keyless messages in one transaction, recorded in `ledger`.
async fn load_keyless_backlog(url: &str, n: usize, ledger: &Ledger) {
    let mut c = PgConnection::connect(url).await.unwrap();
    sqlx::query(
        "INSERT INTO postbox_outbox (topic, payload)
         SELECT $1, convert_to('backlog:' || g, 'UTF8') FROM generate_series(1, $2) AS g",
    )
    .bind(TOPIC)
    .bind(i64::try_from(n).unwrap())
    .execute(&mut c)
    .await
    .unwrap();
    ledger.commit(
        (1..=n)
            .map(|g| {
                (
                    format!("backlog:{g}"),
                    Written {
                        key: None,
                        rank: i64::try_from(g).unwrap(),
                    },
                )
            })
            .collect(),
    );
    let _ = c.close().await;
}

/// 1. Eight producers (20 % rollbacks), three relay processes, one of them
///    `kill -9`'d and restarted every 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s1_relays_killed_every_two_seconds() {
    let addr = POSTGRES.require().await;
    let url = pg_database(&addr).await;
    let verdict = process_scenario(
        ProcessRun {
            scenario: "1. kill -9 a relay every 2 s (3 relays, 8 producers, 20 % rollbacks)",
            url: url.clone(),
            relays: 3,
            producers: 8,
            total: size(20_000, 200_000),
            backlog: 0,
            every: Duration::from_secs(2),
        },
        Chaos::Kill9,
    )
    .await;
    verdict.report_and_assert();
    drop_database(&url).await;
}

/// 1b. A keyless backlog drained by three relay processes in held batches
///     while four producers write more keyless messages (20 % rolled back),
///     one relay `kill -9`'d and restarted twice a second: a killed relay's
///     open batches roll back and go out again; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s1b_relays_killed_while_holding_keyless_batches() {
    let addr = POSTGRES.require().await;
    let url = pg_database(&addr).await;
    let verdict = process_scenario(
        ProcessRun {
            scenario: "1b. kill -9 a relay every 0.5 s during a keyless backlog (3 relays, 4 keyless producers, 20 % rollbacks)",
            url: url.clone(),
            relays: 3,
            producers: 4,
            total: size(5_000, 50_000),
            backlog: size(50_000, 300_000),
            every: Duration::from_millis(500),
        },
        Chaos::Kill9,
    )
    .await;
    verdict.report_and_assert();
    drop_database(&url).await;
}

/// 2. Every relay session (claims, completions, LISTEN) killed with
///    `pg_terminate_backend` twice a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s2_relay_connections_terminated_repeatedly() {
    let addr = POSTGRES.require().await;
    let url = pg_database(&addr).await;
    let verdict = process_scenario(
        ProcessRun {
            scenario: "2. pg_terminate_backend every relay session every 0.5 s (2 relays)",
            url: url.clone(),
            relays: 2,
            producers: 4,
            total: size(5_000, 50_000),
            backlog: 0,
            every: Duration::from_millis(500),
        },
        Chaos::Terminate,
    )
    .await;
    verdict.report_and_assert();
    drop_database(&url).await;
}

/// 3. PostgreSQL itself restarted twice mid-run, once cleanly (fast
///    shutdown) and once as in a crash (immediate shutdown: relay writes
///    committed without the WAL flush may be lost), on a throwaway cluster
///    made with initdb on a port of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_postgres_restarted_mid_run() {
    POSTGRES.require().await;
    let cluster = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
    let url = pg_database(&cluster.addr()).await;
    let total = size(5_000, 50_000);
    let verdict = process_scenario(
        ProcessRun {
            scenario: "3. PostgreSQL restarted mid-run, -m fast then -m immediate (2 relays, 4 producers)",
            url,
            relays: 2,
            producers: 4,
            total,
            backlog: 0,
            every: Duration::from_millis(250),
        },
        Chaos::Restart(&cluster, vec![total / 3, total * 2 / 3]),
    )
    .await;
    verdict.report_and_assert();
    drop(cluster);
}

/// What [`run_through_broker_faults`] did.
struct BrokerRun {
    ledger: Arc<Ledger>,
    report: postbox_core::TickReport,
    cuts: usize,
    stalls: usize,
    started: Instant,
}

/// Scenario 4's run, for any broker: an in-process relay publishing
/// through `publisher` (connected via `proxy`) while 4 producers commit
/// 5,000 messages (50,000 long), with the connection cut and stalled
/// until the outbox is drained; then the relay is stopped.
async fn run_through_broker_faults<P: Publisher>(
    url: &str,
    proxy: &postbox_testkit::FaultProxy,
    publisher: P,
) -> BrokerRun {
    let store = PgStore::connect(url).await.unwrap();
    let relay = broker_relay(store, publisher);
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let relay = relay.clone();
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });
    let ledger = Arc::new(Ledger::default());
    let stop = CancellationToken::new();
    let producers = start_producers(url, 4, size(5_000, 50_000), 20, &ledger, &stop, false);
    let started = Instant::now();
    let (cuts, stalls) = cut_and_stall_until_drained(proxy, url, &producers, started).await;
    shutdown.cancel();
    let report = running.await.unwrap();
    for p in producers {
        p.await.unwrap();
    }
    BrokerRun {
        ledger,
        report,
        cuts,
        stalls,
        started,
    }
}

/// The relay of scenario 4: an 8 s lease, a 3 s send timeout (the
/// publishers' ack/confirm timeouts are 2 s), fast polls and retries.
fn broker_relay<P: Publisher>(store: PgStore, publisher: P) -> Relay<PgStore, P> {
    Relay::builder(store, publisher)
        .lease(Duration::from_secs(8))
        .send_timeout(Duration::from_secs(3))
        .poll_interval(Duration::from_millis(50))
        .batch_size(100)
        .retry_policy(RetryPolicy::new(
            Duration::from_millis(100),
            Duration::from_secs(2),
        ))
        .max_attempts(1000)
        .build()
        .unwrap()
}

/// Scenario 4's faults: every 0.7 s alternately every connection through
/// `proxy` cut, or the link stalled for 4 s (past the relay's 3 s send
/// timeout and the publisher's 2 s ack/confirm timeout), until the
/// producers are done and the outbox is drained. Returns (cuts, stalls).
async fn cut_and_stall_until_drained(
    proxy: &postbox_testkit::FaultProxy,
    url: &str,
    producers: &[tokio::task::JoinHandle<usize>],
    started: Instant,
) -> (usize, usize) {
    let (mut cuts, mut stalls) = (0, 0);
    let deadline = started + Duration::from_secs(if chaos::harness::long() { 3600 } else { 240 });
    loop {
        let producing = !producers.iter().all(tokio::task::JoinHandle::is_finished);
        if !producing && outbox_rows(url).await == Some(0) {
            return (cuts, stalls);
        }
        assert!(
            Instant::now() < deadline,
            "not drained in time ({:?} rows left)",
            outbox_rows(url).await
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
        if (cuts + stalls) % 2 == 0 {
            proxy.cut();
            cuts += 1;
        } else {
            // past the relay's 3 s send timeout and the 2 s ack timeout
            proxy.stall(true);
            tokio::time::sleep(Duration::from_secs(4)).await;
            proxy.stall(false);
            stalls += 1;
        }
    }
}

/// 4. The broker connection cut and the broker stalled past the send
///    timeout, repeatedly, between an in-process relay and NATS JetStream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s4_nats_connection_cut_and_stalled() {
    use async_nats::jetstream;
    use futures_util::StreamExt as _;
    use postbox_nats::{KEY_HEADER, NatsConfig, NatsPublisher};

    let pg = POSTGRES.require().await;
    let nats = NATS.require().await;
    let url = pg_database(&pg).await;
    migrate(&url);
    let suffix = format!("{:016x}", fastrand::u64(..));
    let stream_name = format!("POSTBOX_CHAOS_{suffix}");
    let js = jetstream::new(async_nats::connect(nats.as_str()).await.unwrap());
    js.create_stream(jetstream::stream::Config {
        name: stream_name.clone(),
        subjects: vec![format!("chaos.{suffix}.>")],
        storage: jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .unwrap();
    let proxy = postbox_testkit::FaultProxy::start(nats.clone())
        .await
        .unwrap();
    let publisher = NatsPublisher::new(
        NatsConfig::from_url(&format!("nats://{}", proxy.addr()))
            .unwrap()
            .subject_template(format!("chaos.{suffix}.{{topic}}"))
            .ack_timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    let BrokerRun {
        ledger,
        report,
        cuts,
        stalls,
        started,
    } = run_through_broker_faults(&url, &proxy, publisher).await;

    // everything the stream stored, in stream order
    let mut stream = js.get_stream(&stream_name).await.unwrap();
    let stored = stream.info().await.unwrap().state.messages;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut deliveries = Vec::new();
    while (deliveries.len() as u64) < stored {
        let m = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .expect("reading the stream back")
            .unwrap()
            .unwrap();
        let key = m
            .headers
            .as_ref()
            .and_then(|h| h.get(KEY_HEADER))
            .map(|v| v.as_str().to_owned());
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        deliveries.push(Delivery {
            payload: String::from_utf8(m.payload.to_vec()).unwrap(),
            key,
            id,
            attempt: 0,
        });
    }
    js.delete_stream(&stream_name).await.unwrap();
    Verdict::check("4. NATS: connection cut / stalled 4 s past the 3 s send timeout", &ledger, &deliveries)
        .note(format!(
            "{cuts} cuts, {stalls} stalls; relay retried {} batches' messages; {:.0} s; JetStream dedups by Nats-Msg-Id",
            report.retried,
            started.elapsed().as_secs_f64()
        ))
        .report_and_assert();
    drop_database(&url).await;
}

/// 4 (RabbitMQ). The same faults between an in-process relay and RabbitMQ
/// (publisher confirms): read back from the queue, where nothing removes
/// the duplicates a lost confirm causes, so they are counted here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s4_rabbitmq_connection_cut_and_stalled() {
    use lapin::options::{
        BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{Connection, ConnectionProperties, ExchangeKind};
    use postbox_rabbitmq::{KEY_HEADER, RabbitMqConfig, RabbitMqPublisher};

    let pg = POSTGRES.require().await;
    let rabbit = RABBITMQ.require().await;
    let url = pg_database(&pg).await;
    migrate(&url);
    // A direct exchange and a queue of this run only: the queue is
    // exclusive to this connection (gone with it, even on a panic), the
    // exchange is deleted with its last binding.
    let name = chaos::harness::unique("postbox.chaos");
    let direct = Connection::connect(
        &format!("amqp://guest:guest@{rabbit}/%2f"),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = direct.create_channel().await.unwrap();
    channel
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            name.as_str().into(),
            name.as_str().into(),
            TOPIC.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let proxy = postbox_testkit::FaultProxy::start(rabbit.clone())
        .await
        .unwrap();
    let publisher = RabbitMqPublisher::new(
        RabbitMqConfig::from_url(&format!("amqp://guest:guest@{}/%2f", proxy.addr()))
            .unwrap()
            .exchange(name.as_str())
            .confirm_timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(2))
            .max_backoff(Duration::from_millis(500)),
    )
    .unwrap();
    let BrokerRun {
        ledger,
        report,
        cuts,
        stalls,
        started,
    } = run_through_broker_faults(&url, &proxy, publisher).await;
    // No more bytes through the proxy while the queue is read (a publish
    // written before a stall, on a connection the publisher has since given
    // up, could still be on its way).
    drop(proxy);

    // everything the queue holds, in queue order
    let mut deliveries = Vec::new();
    loop {
        let got = channel
            .basic_get(name.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        let Some(m) = got else { break };
        let props = &m.delivery.properties;
        let key = props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(KEY_HEADER).cloned())
            .and_then(|v| match v {
                AMQPValue::LongString(s) => Some(String::from_utf8(s.as_bytes().to_vec()).unwrap()),
                _ => None,
            });
        deliveries.push(Delivery {
            payload: String::from_utf8(m.delivery.data.clone()).unwrap(),
            key,
            id: props
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned())
                .unwrap_or_default(),
            attempt: 0,
        });
    }
    let _ = direct.close(200, "done".into()).await;
    Verdict::check("4. RabbitMQ: connection cut / stalled 4 s past the 3 s send timeout", &ledger, &deliveries)
        .note(format!(
            "{cuts} cuts, {stalls} stalls; {} message attempts retried; {:.0} s; no broker-side dedup: the duplicates are publishes whose confirm was lost",
            report.retried,
            started.elapsed().as_secs_f64()
        ))
        .report_and_assert();
    drop_database(&url).await;
}

/// A publisher for in-process relays: records every delivery in one
/// shared, ordered log; fails `held` messages transiently while `hold` is
/// on; rejects payloads in `poison` while `poisoned` is on.
#[derive(Clone, Default)]
struct Sink {
    log: Arc<Mutex<Vec<Delivery>>>,
    hold: Arc<AtomicBool>,
    held: Arc<Mutex<HashSet<Uuid>>>,
    tried_held: Arc<Mutex<HashSet<Uuid>>>,
    poisoned: Arc<AtomicBool>,
    poison: Arc<Mutex<HashSet<String>>>,
    /// A batch with a message of this key waits for the gate (per clone:
    /// only the relay given this clone is gated).
    gate_key: Option<String>,
    gate_open: Arc<AtomicBool>,
    at_gate: Arc<AtomicBool>,
}

impl Sink {
    fn deliveries(&self) -> Vec<Delivery> {
        self.log.lock().unwrap().clone()
    }
}

impl Publisher for Sink {
    async fn publish(&self, batch: &[Message]) -> Vec<PublishOutcome> {
        let gated = self.gate_key.is_some() && batch.iter().any(|m| m.key == self.gate_key);
        if gated {
            self.at_gate.store(true, Ordering::SeqCst);
            while !self.gate_open.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let mut out = Vec::with_capacity(batch.len());
        for m in batch {
            let payload = String::from_utf8_lossy(&m.payload).into_owned();
            if self.hold.load(Ordering::SeqCst) && self.held.lock().unwrap().contains(&m.id) {
                self.tried_held.lock().unwrap().insert(m.id);
                out.push(PublishOutcome::transient("held on purpose"));
            } else if self.poisoned.load(Ordering::SeqCst)
                && self.poison.lock().unwrap().contains(&payload)
            {
                out.push(PublishOutcome::rejected(
                    "poison: the consumer cannot parse this",
                ));
            } else {
                self.log.lock().unwrap().push(Delivery {
                    payload,
                    key: m.key.clone(),
                    id: m.id.to_string(),
                    attempt: u64::from(m.attempt),
                });
                out.push(PublishOutcome::Ok);
            }
        }
        out
    }
}

/// Enqueues `n` messages from one writer in batches (keys `k0..k{keys}`,
/// every 10th keyless); the ledger ranks them by their index.
async fn enqueue_plain(url: &str, prefix: &str, n: usize, keys: usize, ledger: &Ledger) {
    let mut c = PgConnection::connect(url).await.unwrap();
    let mut i = 0;
    while i < n {
        let mut msgs = Vec::new();
        let mut written = Vec::new();
        for _ in 0..100.min(n - i) {
            let payload = format!("{prefix}:{i}");
            let key = (i % 10 != 9).then(|| format!("k{}", i % keys));
            let mut m = NewMessage::new(TOPIC, payload.clone().into_bytes());
            if let Some(k) = &key {
                m = m.key(k.clone());
            }
            msgs.push(m);
            written.push((
                payload,
                Written {
                    key,
                    rank: i as i64,
                },
            ));
            i += 1;
        }
        postbox_postgres::enqueue_batch(&mut c, &msgs)
            .await
            .unwrap();
        ledger.commit(written);
    }
}

/// 5. A relay process stopped (SIGSTOP) while holding leases, past its
///    lease; another relay takes the messages over; the stopped one is
///    resumed: its late completion changes nothing (fencing), and the
///    messages are delivered by the other relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s5_relay_paused_past_its_lease_is_fenced() {
    let addr = POSTGRES.require().await;
    let url = pg_database(&addr).await;
    migrate(&url);
    let ledger = Ledger::default();
    let n = size(3_000, 30_000);
    enqueue_plain(&url, "s5", n, 20, &ledger).await;
    let dir = tempfile::tempdir().unwrap();
    let file_a = dir.path().join("a.jsonl");
    let a = RelayProcess::spawn(
        &url,
        &file_a,
        dir.path(),
        &[
            "--lease",
            "2s",
            "--send-timeout",
            "1s",
            "--batch-size",
            "20",
            "--poll-interval",
            "50ms",
        ],
    );
    let mut admin = PgConnection::connect(&url).await.unwrap();

    // Stop A while it holds leases (retrying if it is caught holding none).
    let mut held: Vec<Uuid> = Vec::new();
    let mut snapshot: Vec<(Uuid, i32)> = Vec::new();
    for _ in 0..50 {
        let lines_before = read_jsonl(&file_a).0.len();
        eventually("relay A to publish", Duration::from_secs(60), || {
            read_jsonl(&file_a).0.len() > lines_before
        })
        .await;
        a.signal("STOP");
        // a completion already on the wire finishes in the server meanwhile
        tokio::time::sleep(Duration::from_millis(300)).await;
        snapshot =
            sqlx::query_as("SELECT id, attempts FROM postbox_outbox WHERE lease_until > now()")
                .fetch_all(&mut admin)
                .await
                .unwrap();
        held = snapshot.iter().map(|(id, _)| *id).collect();
        if !held.is_empty() {
            break;
        }
        a.signal("CONT");
    }
    assert!(!held.is_empty(), "never caught relay A holding a lease");
    let offset = std::fs::metadata(&file_a).unwrap().len() as usize;

    // B takes over once A's leases run out; it fails A's messages
    // transiently until told otherwise, so they stay re-leased/retrying.
    let sink = Sink::default();
    sink.held.lock().unwrap().extend(held.iter().copied());
    sink.hold.store(true, Ordering::SeqCst);
    let store = PgStore::connect(&url).await.unwrap();
    let b = Relay::builder(store.clone(), sink.clone())
        .lease(Duration::from_secs(2))
        .send_timeout(Duration::from_secs(1))
        .poll_interval(Duration::from_millis(50))
        .batch_size(50)
        .retry_policy(RetryPolicy::new(
            Duration::from_millis(50),
            Duration::from_millis(200),
        ))
        .max_attempts(100_000)
        .build()
        .unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let b = b.clone();
        let shutdown = shutdown.clone();
        async move { b.run(shutdown).await }
    });
    let held_set: HashSet<Uuid> = held.iter().copied().collect();
    eventually(
        "relay B to take over every message A holds",
        Duration::from_secs(120),
        || sink.tried_held.lock().unwrap().is_superset(&held_set),
    )
    .await;

    // Resume A with a SIGTERM pending: it finishes the batches it holds
    // (publishing them late) and exits without claiming more.
    let b_mark = sink.deliveries().len();
    a.signal("TERM");
    a.signal("CONT");
    let mut a = a;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = a.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "relay A did not exit after SIGCONT"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0), "relay A: {}", a.log_text());
    assert!(
        a.log_text().contains("lease taken over"),
        "relay A's late completion was not reported as fenced:\n{}",
        a.log_text()
    );
    // Fencing: A's late "sent" changed none of the rows B had taken over.
    // A row may be gone only if A, resumed, claimed it afresh (a new lease:
    // attempt at least two above the snapshot, past B's claim) and
    // published it: a SIGTERM is handled by a task, so a worker can start
    // one more pass before it sees it.
    let present: Vec<(Uuid, i32)> =
        sqlx::query_as("SELECT id, attempts FROM postbox_outbox WHERE id = ANY($1)")
            .bind(held.as_slice())
            .fetch_all(&mut admin)
            .await
            .unwrap();
    let late = {
        let text = std::fs::read_to_string(&file_a).unwrap();
        let p = dir.path().join("late.jsonl");
        std::fs::write(&p, &text[offset..]).unwrap();
        read_jsonl(&p).0
    };
    let mut reclaimed_by_a = 0;
    for (id, attempts) in &snapshot {
        match present.iter().find(|(p, _)| p == id) {
            Some((_, now)) => assert!(
                now > attempts,
                "message {id}: B never claimed it ({attempts} -> {now} attempts)"
            ),
            None => {
                let fresh = late.iter().any(|d| {
                    d.id == id.to_string() && d.attempt >= u64::try_from(attempts + 2).unwrap()
                });
                assert!(
                    fresh,
                    "FENCING: message {id} (attempt {attempts} when relay A was stopped, then re-leased by relay B) \
                     is gone after A's late completion, and A did not claim it afresh. A's lines for it after the resume: {:?}\nA's log:\n{}",
                    late.iter()
                        .filter(|d| d.id == id.to_string())
                        .collect::<Vec<_>>(),
                    a.log_text()
                );
                reclaimed_by_a += 1;
            }
        }
    }

    sink.hold.store(false, Ordering::SeqCst);
    wait_drained(&url, Duration::from_secs(180)).await;
    shutdown.cancel();
    running.await.unwrap();

    let text = std::fs::read_to_string(&file_a).unwrap();
    let (before, after) = text.split_at(offset);
    let parse = |t: &str| {
        let p = dir.path().join("part.jsonl");
        std::fs::write(&p, t).unwrap();
        read_jsonl(&p)
    };
    let (a1, torn1) = parse(before);
    let (a2, torn2) = parse(after);
    let b_all = sink.deliveries();
    let mut timeline = a1;
    timeline.extend_from_slice(&b_all[..b_mark]);
    timeline.extend(a2.iter().cloned());
    timeline.extend_from_slice(&b_all[b_mark..]);
    Verdict::check("5. relay SIGSTOPped past its 2 s lease, then resumed", &ledger, &timeline)
        .torn(torn1 + torn2)
        .note(format!(
            "{} messages held by the stopped relay were taken over and survived its late completion ({} re-claimed by it afresh after the resume); it published {} lines after the resume",
            held.len(),
            reclaimed_by_a,
            a2.len()
        ))
        .report_and_assert();
    drop_database(&url).await;
}

/// A wall clock off by a fixed amount.
struct Skewed(Duration, bool);

impl Clock for Skewed {
    fn now(&self) -> SystemTime {
        if self.1 {
            SystemTime::now() + self.0
        } else {
            SystemTime::now() - self.0
        }
    }
}

/// 6. Relays whose clocks are minutes apart: a lease taken by one is
///    respected by the others for its whole length, because leases come
///    from the database clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s6_relays_with_skewed_clocks_respect_leases() {
    let addr = POSTGRES.require().await;
    let url = pg_database(&addr).await;
    migrate(&url);
    let ledger = Ledger::default();
    let n = size(2_000, 20_000);
    enqueue_plain(&url, "s6", n, 10, &ledger).await;

    let sink = Sink::default();
    let store = PgStore::connect(&url).await.unwrap();
    let relay = |skew: Duration, ahead: bool, sink: Sink, batch: usize| {
        Relay::builder(store.clone(), sink)
            .lease(Duration::from_secs(60))
            .send_timeout(Duration::from_secs(50))
            .poll_interval(Duration::from_millis(50))
            .batch_size(batch)
            .concurrency(1)
            .clock(Arc::new(Skewed(skew, ahead)))
            .build()
            .unwrap()
    };
    let shutdown = CancellationToken::new();
    // A (one message per claim) runs alone until it holds k3's head at
    // its publisher's gate.
    let gated = Sink {
        gate_key: Some("k3".to_owned()),
        ..sink.clone()
    };
    let a = relay(Duration::from_secs(600), false, gated, 1);
    let ra = tokio::spawn({
        let s = shutdown.clone();
        async move { a.run(s).await }
    });
    eventually("relay A to hold key k3", Duration::from_secs(60), || {
        sink.at_gate.load(Ordering::SeqCst)
    })
    .await;
    let mut admin = PgConnection::connect(&url).await.unwrap();
    let lease_left: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM min(lease_until) - now())::float8
           FROM postbox_outbox WHERE key = 'k3' AND lease_until > now()",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(
        (0.0..=61.0).contains(&lease_left),
        "the lease is not 60 s on the database clock: {lease_left} s left (relay clock is 10 min behind)"
    );
    // B and C, 10 minutes and 1 hour ahead, run everything else.
    let b = relay(Duration::from_secs(600), true, sink.clone(), 50);
    let c = relay(Duration::from_secs(3600), true, sink.clone(), 50);
    let rb = tokio::spawn({
        let s = shutdown.clone();
        async move { b.run(s).await }
    });
    let rc = tokio::spawn({
        let s = shutdown.clone();
        async move { c.run(s).await }
    });
    // Everything but key k3 is delivered while A still holds k3's head.
    let others = ledger_keys_not(&ledger_snapshot(n, 10), "k3");
    eventually(
        "the other keys to be delivered",
        Duration::from_secs(180),
        || {
            let got: HashSet<String> = sink.deliveries().into_iter().map(|d| d.payload).collect();
            others.iter().all(|p| got.contains(p))
        },
    )
    .await;
    assert!(
        !sink
            .deliveries()
            .iter()
            .any(|d| d.key.as_deref() == Some("k3")),
        "a skewed relay delivered key k3 while relay A's lease on it was live"
    );
    // A finishes: its completion must apply (its lease was never taken).
    sink.gate_open.store(true, Ordering::SeqCst);
    wait_drained(&url, Duration::from_secs(120)).await;
    shutdown.cancel();
    let mut lost = 0;
    for r in [ra, rb, rc] {
        lost += r.await.unwrap().lost;
    }
    assert_eq!(
        lost, 0,
        "a lease was taken over although every relay was alive"
    );
    Verdict::check(
        "6. relay clocks -10 min / +10 min / +1 h, 60 s lease held throughout",
        &ledger,
        &sink.deliveries(),
    )
    .note(format!(
        "lease measured on the database clock: {lease_left:.1} s left of 60 s; 0 completions fenced"
    ))
    .report_and_assert();
    drop_database(&url).await;
}

/// Payloads [`enqueue_plain`] wrote, with their keys.
fn ledger_snapshot(n: usize, keys: usize) -> Vec<(String, Option<String>)> {
    (0..n)
        .map(|i| {
            (
                format!("s6:{i}"),
                (i % 10 != 9).then(|| format!("k{}", i % keys)),
            )
        })
        .collect()
}

fn ledger_keys_not(all: &[(String, Option<String>)], key: &str) -> Vec<String> {
    all.iter()
        .filter(|(_, k)| k.as_deref() != Some(key))
        .map(|(p, _)| p.clone())
        .collect()
}

/// Runs `relay.tick()` until a pass claims nothing.
async fn drain<S: Store, P: Publisher>(relay: &Relay<S, P>) {
    for _ in 0..100_000 {
        if relay.tick().await.unwrap().claimed == 0 {
            return;
        }
    }
    panic!("the relay never ran out of work");
}

/// 7. A poison message (the publisher always rejects it): dead-lettered
///    with its reason, its key parked, other keys unaffected; a replay after
///    the fix delivers the key in order. A corrupt row (headers that are not
///    an object of strings) is dead-lettered with a reason, not a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s7_poison_message_parks_its_key_and_replays_in_order() {
    let addr = POSTGRES.require().await;
    let url = pg_database(&addr).await;
    migrate(&url);
    let ledger = Ledger::default();
    let n = size(1_000, 10_000);
    enqueue_plain(&url, "s7", n, 10, &ledger).await;
    // poison: the 3rd message of key k4
    let poison = "s7:24".to_owned();
    let mut admin = PgConnection::connect(&url).await.unwrap();
    // a corrupt row from a careless plain-SQL producer, on its own key
    sqlx::query(
        "INSERT INTO postbox_outbox (topic, key, payload, headers) VALUES ($1, 'corrupt', 'x', '{\"n\": 5}')",
    )
    .bind(TOPIC)
    .execute(&mut admin)
    .await
    .unwrap();

    let sink = Sink::default();
    sink.poison.lock().unwrap().insert(poison.clone());
    sink.poisoned.store(true, Ordering::SeqCst);
    let store = PgStore::connect(&url).await.unwrap();
    let relay = Relay::builder(store.clone(), sink.clone())
        .batch_size(50)
        .build()
        .unwrap();
    drain(&relay).await;

    let dead = store
        .list(&postbox_core::ListQuery::new(Some(Status::Dead), 10))
        .await
        .unwrap();
    assert_eq!(
        dead.len(),
        2,
        "the poison and the corrupt row are dead: {dead:?}"
    );
    let p = dead
        .iter()
        .find(|d| d.key.as_deref() == Some("k4"))
        .expect("poison dead");
    assert!(p.parked, "the poison's key is parked");
    assert!(
        p.last_error.as_deref().unwrap_or("").contains("poison"),
        "reason kept: {p:?}"
    );
    let c = dead
        .iter()
        .find(|d| d.key.as_deref() == Some("corrupt"))
        .expect("corrupt dead");
    assert!(
        c.last_error.as_deref().unwrap_or("").contains("malformed"),
        "corrupt row's reason: {c:?}"
    );
    // k4 stopped at the poison; every other key went through completely.
    let got = sink.deliveries();
    let k4: Vec<&str> = got
        .iter()
        .filter(|d| d.key.as_deref() == Some("k4"))
        .map(|d| d.payload.as_str())
        .collect();
    assert_eq!(k4, ["s7:4", "s7:14"], "k4 stops before the poison");
    let k4_total = (0..n).filter(|i| i % 10 == 4).count();
    assert_eq!(
        got.len(),
        n - k4_total + 2,
        "every other key delivered in full"
    );
    let stats = store.stats(&postbox_core::Filter::all()).await.unwrap();
    assert_eq!(stats.parked_keys, 2, "{stats:?}");

    // the fix, then the replay of the key
    sink.poisoned.store(false, Ordering::SeqCst);
    let replayed = store
        .replay(&postbox_core::Filter::all().key("k4"))
        .await
        .unwrap();
    assert_eq!(replayed, 1);
    drain(&relay).await;
    let k4_after: Vec<String> = sink
        .deliveries()
        .into_iter()
        .filter(|d| d.key.as_deref() == Some("k4"))
        .map(|d| d.payload)
        .collect();
    let expected: Vec<String> = (0..n)
        .filter(|i| i % 10 == 4)
        .map(|i| format!("s7:{i}"))
        .collect();
    assert_eq!(
        k4_after, expected,
        "k4 after the replay: in order, nothing skipped"
    );
    // the corrupt row stays dead (nothing to fix in a relay); purge it
    let purged = store
        .purge(&postbox_core::PurgeQuery::new(
            Status::Dead,
            postbox_core::Filter::all().key("corrupt"),
        ))
        .await
        .unwrap();
    assert_eq!(purged, 1);
    assert_eq!(outbox_rows(&url).await, Some(0));
    Verdict::check("7. poison message rejected forever, then fixed and replayed", &ledger, &sink.deliveries())
        .note("poison dead + key parked, other keys delivered in full; corrupt-headers row dead-lettered as malformed")
        .report_and_assert();
    drop_database(&url).await;
}

/// 8. A long transaction elsewhere: one that never touched the outbox
///    stops nothing; one that enqueued key K holds back only K's later
///    producers, is reported (`blockers`, `postbox status --json`), and
///    delivery of K resumes in order when it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s8_long_transaction_elsewhere() {
    let addr = POSTGRES.require().await;
    let url = pg_database(&addr).await;
    migrate(&url);
    let mut admin = PgConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE business (id int8)")
        .execute(&mut admin)
        .await
        .unwrap();

    // an unrelated long transaction with an xid (holds the xmin horizon)
    let mut unrelated = PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut unrelated).await.unwrap();
    sqlx::query("INSERT INTO business VALUES (1)")
        .execute(&mut unrelated)
        .await
        .unwrap();
    let unrelated_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut unrelated)
        .await
        .unwrap();
    // a long transaction that enqueued key "held" and stays open
    let mut holder = PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query(
        "INSERT INTO postbox_outbox (topic, key, payload) VALUES ($1, 'held', 'h:0') RETURNING seq",
    )
    .bind(TOPIC)
    .execute(&mut holder)
    .await
    .unwrap();
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await
        .unwrap();

    let ledger = Arc::new(Ledger::default());
    let sink = Sink::default();
    let store = PgStore::connect(&url).await.unwrap();
    let relay = Relay::builder(store.clone(), sink.clone())
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let r = relay.clone();
        let s = shutdown.clone();
        async move { r.run(s).await }
    });
    // a later producer of "held": it waits for the holder's key lock
    let blocked = tokio::spawn({
        let url = url.clone();
        async move {
            let mut c = PgConnection::connect(&url).await.unwrap();
            let seq: i64 = sqlx::query_scalar(
                "INSERT INTO postbox_outbox (topic, key, payload) VALUES ($1, 'held', 'h:1') RETURNING seq",
            )
            .bind(TOPIC)
            .fetch_one(&mut c)
            .await
            .unwrap();
            seq
        }
    });
    // everything else flows meanwhile
    let n = size(2_000, 20_000);
    let stop = CancellationToken::new();
    let producers = start_producers(&url, 4, n, 20, &ledger, &stop, false);
    for p in producers {
        p.await.unwrap();
    }
    assert_eq!(ledger.committed(), n);
    eventually(
        "all other messages delivered while the long transactions are open",
        Duration::from_secs(180),
        || {
            Verdict::check("", &ledger, &sink.deliveries())
                .lost
                .is_empty()
        },
    )
    .await;
    assert!(
        !blocked.is_finished(),
        "the later producer of key 'held' must wait for the holder"
    );
    // the stall is reported, with the holder's pid
    let blockers = store.blockers().await.unwrap();
    assert!(
        blockers
            .iter()
            .any(|b| b.pid == holder_pid && b.waiters >= 1),
        "blockers() does not name the holder {holder_pid}: {blockers:?}"
    );
    let o = chaos::harness::postbox()
        .args(["status", "--store", &url, "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["blockers"][0]["pid"], holder_pid, "status --json: {v}");
    // the unrelated transaction holds the cleanup horizon (other sessions
    // of the shared server may hold older snapshots: it is among the oldest)
    let holders = store.horizon_holders(20).await.unwrap();
    assert!(
        holders.iter().any(|h| h.pid == Some(unrelated_pid)),
        "the unrelated transaction {unrelated_pid} is not named: {holders:?}"
    );

    // the holder commits: K resumes, in commit order
    let holder_seq: i64 =
        sqlx::query_scalar("SELECT max(seq) FROM postbox_outbox WHERE key = 'held'")
            .fetch_one(&mut holder)
            .await
            .unwrap();
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let blocked_seq = blocked.await.unwrap();
    assert!(blocked_seq > holder_seq);
    ledger.commit(vec![
        (
            "h:0".into(),
            Written {
                key: Some("held".into()),
                rank: holder_seq,
            },
        ),
        (
            "h:1".into(),
            Written {
                key: Some("held".into()),
                rank: blocked_seq,
            },
        ),
    ]);
    wait_drained(&url, Duration::from_secs(120)).await;
    sqlx::query("ROLLBACK")
        .execute(&mut unrelated)
        .await
        .unwrap();
    shutdown.cancel();
    running.await.unwrap();
    Verdict::check("8. long transactions open elsewhere (one unrelated, one holding a key)", &ledger, &sink.deliveries())
        .note("held key reported by blockers() and status --json; other keys unaffected; held key resumed in order")
        .report_and_assert();
    drop_database(&url).await;
}
