//! brokers: relay → NATS JetStream and relay → Kafka, each against
//! min(database ceiling, broker ceiling) measured in the same run.
//!
//! Per repeat, on one keyless backlog size:
//!
//! - the database ceilings C1 and C2 (`pg::ceiling_drain`, the same
//!   functions as the `drain` scenario) and postbox draining to the null
//!   publisher (`pg::postbox_drain`), for reference;
//! - per broker, the **broker ceiling**: a plain client (async-nats JetStream
//!   with every PubAck awaited; rdkafka `FutureProducer` with `acks=all` and
//!   idempotence) publishing the same messages (same ~200-byte payloads, same
//!   headers, same id header, keyless like the backlog), `concurrency`
//!   workers each sending a batch of `batch` messages and then awaiting its
//!   acknowledgements: the same batch size and batches in flight as the relay;
//! - per broker, **postbox**: the same backlog drained by `Relay` through
//!   `postbox-nats` / `postbox-kafka`, timed like every other drain.
//!
//! Every run checks that the broker stored exactly `n` messages. The relay's
//! own claim / publish / complete histograms (through a debugging `metrics`
//! recorder) are reported with each postbox line, to show where the time goes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream::StorageType};
use bytes::Bytes;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use postbox_core::observe;
use postbox_kafka::{KafkaConfig, KafkaPublisher};
use postbox_nats::{NatsConfig, NatsPublisher};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::Opts;
use crate::pg::{Ceiling, Drain, Keys, Pg, ceiling_drain, postbox_drain, postbox_drain_to};
use crate::report::{Better, Goal, Line, emit, median};
use crate::util::{payload, progress, rate};

/// The topic every backlog row carries (`Pg::load`).
const TOPIC: &str = "bench.event";
/// Partitions of each bench Kafka topic.
const KAFKA_PARTITIONS: i32 = 3;

/// A broker the scenario measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Broker {
    /// NATS JetStream (`--nats-url`).
    Nats,
    /// Kafka (`--kafka-brokers`).
    Kafka,
}

impl Broker {
    fn name(self) -> &'static str {
        match self {
            Broker::Nats => "nats",
            Broker::Kafka => "kafka",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Broker::Nats => "NATS JetStream",
            Broker::Kafka => "Kafka",
        }
    }
}

/// The messages a plain client publishes: what the backlog rows hold, with
/// fresh ids (a JetStream stream drops a repeated `Nats-Msg-Id` as a
/// duplicate for two minutes, so every run needs its own). Built before the
/// clock starts.
struct Prepared {
    ids: Vec<String>,
    payloads: Vec<Bytes>,
}

impl Prepared {
    fn new(n: u64) -> Self {
        // `Pg::load` numbers rows from 1
        let payloads = (1..=n).map(|i| Bytes::from(payload(i))).collect();
        let ids = (0..n).map(|_| Uuid::now_v7().to_string()).collect();
        Self { ids, payloads }
    }

    fn len(&self) -> u64 {
        self.payloads.len() as u64
    }
}

/// Hands out batch ranges `[from, to)` of `0..n` to ceiling workers.
struct Batches {
    next: AtomicU64,
    n: u64,
    batch: u64,
}

impl Batches {
    fn new(n: u64, batch: usize) -> Self {
        Self {
            next: AtomicU64::new(0),
            n,
            batch: batch as u64,
        }
    }

    fn take(&self) -> Option<std::ops::Range<usize>> {
        let from = self.next.fetch_add(self.batch, Ordering::Relaxed);
        (from < self.n).then(|| from as usize..(from + self.batch).min(self.n) as usize)
    }
}

// ---------------------------------------------------------------- NATS

/// The bench's JetStream stream: file storage (what a user runs), its own
/// name and subjects so concurrent runs and tests never share it.
struct NatsBench {
    url: String,
    js: jetstream::Context,
    stream: String,
    /// Subject prefix the stream captures (`<prefix>.>`).
    prefix: String,
}

impl NatsBench {
    async fn start(url: &str, run: &str) -> Result<Self> {
        let client = async_nats::connect(url).await.with_context(|| {
            format!(
                "connecting to NATS at {}",
                postbox_core::redact_userinfo(url)
            )
        })?;
        let js = jetstream::new(client);
        let stream = format!("POSTBOX_BENCH_{run}");
        let prefix = format!("postbox.bench.{run}");
        js.create_stream(jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{prefix}.>")],
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating JetStream stream {stream}"))?;
        Ok(Self {
            url: url.to_owned(),
            js,
            stream,
            prefix,
        })
    }

    fn subject(&self) -> String {
        format!("{}.{TOPIC}", self.prefix)
    }

    /// Checks the stream holds exactly `n` messages, then empties it.
    async fn check_and_purge(&self, n: u64, what: &str) -> Result<()> {
        let stream = self.js.get_stream(&self.stream).await?;
        let stored = stream.get_info().await?.state.messages;
        stream.purge().await.context("purging the bench stream")?;
        ensure!(
            stored == n,
            "{what}: the stream holds {stored} of {n} messages"
        );
        Ok(())
    }

    async fn finish(self) -> Result<()> {
        self.js
            .delete_stream(&self.stream)
            .await
            .with_context(|| format!("deleting JetStream stream {}", self.stream))?;
        Ok(())
    }

    /// The plain client: `workers` tasks on one connection, each publishing
    /// a batch (every message written before any PubAck is awaited), then
    /// awaiting all of its PubAcks.
    async fn ceiling(&self, n: u64, batch: usize, workers: usize) -> Result<Duration> {
        let client = async_nats::connect(&self.url).await?;
        let js = jetstream::new(client);
        let subject = self.subject();
        let msgs = Arc::new(Prepared::new(n));
        let batches = Arc::new(Batches::new(msgs.len(), batch));
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let (js, subject, batches, msgs) = (
                js.clone(),
                subject.clone(),
                Arc::clone(&batches),
                Arc::clone(&msgs),
            );
            tasks.spawn(async move {
                while let Some(range) = batches.take() {
                    let mut acks = Vec::with_capacity(range.len());
                    for i in range {
                        let mut headers = HeaderMap::new();
                        headers.insert("content-type", "application/json");
                        headers.insert("Nats-Msg-Id", msgs.ids[i].as_str());
                        acks.push(
                            js.publish_with_headers(
                                subject.clone(),
                                headers,
                                msgs.payloads[i].clone(),
                            )
                            .await?,
                        );
                    }
                    for ack in futures_util::future::join_all(
                        acks.into_iter().map(IntoFuture::into_future),
                    )
                    .await
                    {
                        ack?;
                    }
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok(start.elapsed())
    }

    async fn publisher(&self) -> Result<NatsPublisher> {
        let config =
            NatsConfig::from_url(&self.url)?.subject_template(format!("{}.{{topic}}", self.prefix));
        Ok(NatsPublisher::connect(config).await?)
    }
}

// ---------------------------------------------------------------- Kafka

/// Kafka topics of the bench: one fresh topic per run (deleted after it, so
/// an in-memory broker does not keep every run's records).
struct KafkaBench {
    brokers: String,
    admin: AdminClient<DefaultClientContext>,
    run: String,
    topics: u32,
    /// `linger.ms`, the same for postbox and the plain client.
    linger_ms: u64,
}

impl KafkaBench {
    fn start(brokers: &str, run: &str, linger_ms: u64) -> Result<Self> {
        let admin = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .context("creating the Kafka admin client")?;
        Ok(Self {
            brokers: brokers.to_owned(),
            admin,
            run: run.to_ascii_lowercase(),
            topics: 0,
            linger_ms,
        })
    }

    /// Creates a fresh topic; returns its prefix (the Kafka topic is
    /// `<prefix>.bench.event`).
    async fn fresh_topic(&mut self) -> Result<String> {
        self.topics += 1;
        let prefix = format!("postbox_bench_{}_{}", self.run, self.topics);
        let name = format!("{prefix}.{TOPIC}");
        let results = self
            .admin
            .create_topics(
                &[NewTopic::new(
                    &name,
                    KAFKA_PARTITIONS,
                    TopicReplication::Fixed(1),
                )],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .with_context(|| format!("creating Kafka topic {name} at {}", self.brokers))?;
        for r in results {
            r.map_err(|(t, e)| anyhow::anyhow!("creating Kafka topic {t}: {e}"))?;
        }
        Ok(prefix)
    }

    /// Checks the topic holds exactly `n` records, then deletes it. Counts
    /// by reading the topic back: Tansu 0.6's high watermarks lag behind
    /// (they point into the last record batch), so they cannot be summed.
    async fn check_and_drop(&self, prefix: &str, n: u64, what: &str) -> Result<()> {
        let name = format!("{prefix}.{TOPIC}");
        let stored = self.count_records(&name, n).await;
        let deleted = self
            .admin
            .delete_topics(&[name.as_str()], &AdminOptions::new())
            .await;
        if let Err(e) = deleted.map(|r| r.into_iter().collect::<Result<Vec<_>, _>>()) {
            progress!("  could not delete Kafka topic {name}: {e:?}");
        }
        let stored = stored?;
        ensure!(
            stored == n,
            "{what}: Kafka topic {name} holds {stored} of {n} records"
        );
        Ok(())
    }

    /// Reads every partition of `topic` from the start until `expect`
    /// records arrived (then a little longer, to see any extra one) or
    /// nothing arrived for 10 s.
    async fn count_records(&self, topic: &str, expect: u64) -> Result<u64> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set(
                "group.id",
                format!("postbox-bench-{}", Uuid::new_v4().simple()),
            )
            .set("enable.auto.commit", "false")
            .create()?;
        let mut partitions = TopicPartitionList::new();
        for p in 0..KAFKA_PARTITIONS {
            partitions.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&partitions)?;
        let mut got = 0u64;
        loop {
            let quiet = if got >= expect {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(10)
            };
            match tokio::time::timeout(quiet, consumer.recv()).await {
                Ok(m) => {
                    m.with_context(|| format!("reading back Kafka topic {topic}"))?;
                    got += 1;
                }
                Err(_) => return Ok(got),
            }
        }
    }

    /// The plain client: one idempotent `acks=all` producer, `workers`
    /// tasks each handing a batch to librdkafka and then awaiting its
    /// delivery reports.
    async fn ceiling(
        &self,
        prefix: &str,
        n: u64,
        batch: usize,
        workers: usize,
    ) -> Result<Duration> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", self.linger_ms.to_string())
            // what postbox-kafka uses; keyless records land on a random partition either way
            .set("partitioner", "murmur2_random")
            .create()
            .context("creating the plain Kafka producer")?;
        let topic: Arc<str> = Arc::from(format!("{prefix}.{TOPIC}"));
        let msgs = Arc::new(Prepared::new(n));
        let batches = Arc::new(Batches::new(msgs.len(), batch));
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let (producer, topic, batches, msgs) = (
                producer.clone(),
                Arc::clone(&topic),
                Arc::clone(&batches),
                Arc::clone(&msgs),
            );
            tasks.spawn(async move {
                while let Some(range) = batches.take() {
                    let mut reports = Vec::with_capacity(range.len());
                    for i in range {
                        let headers = OwnedHeaders::new_with_capacity(2)
                            .insert(Header {
                                key: "postbox-id",
                                value: Some(msgs.ids[i].as_str()),
                            })
                            .insert(Header {
                                key: "content-type",
                                value: Some("application/json"),
                            });
                        let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&topic)
                            .payload(&msgs.payloads[i][..])
                            .headers(headers);
                        match producer.send_result(record) {
                            Ok(report) => reports.push(report),
                            Err((e, _)) => bail!("plain Kafka producer: {e}"),
                        }
                    }
                    for report in futures_util::future::join_all(reports).await {
                        report
                            .context("plain Kafka producer closed")?
                            .map_err(|(e, _)| anyhow::anyhow!("plain Kafka producer: {e}"))?;
                    }
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok(start.elapsed())
    }

    fn publisher(&self, prefix: &str) -> Result<KafkaPublisher> {
        let mut config =
            KafkaConfig::new(&self.brokers).topic_template(format!("{prefix}.{{topic}}"));
        config.linger_ms = self.linger_ms;
        Ok(KafkaPublisher::new(config)?)
    }
}

// ---------------------------------------------------------------- profile

/// The relay's own timings of one run, from its histograms.
#[derive(Debug, Clone, Copy, Default)]
struct Profile {
    claims: f64,
    claim_s: f64,
    batches: f64,
    publish_s: f64,
    completes: f64,
    complete_s: f64,
}

impl Profile {
    fn json(samples: &[Profile]) -> Value {
        let mean_ms = |f: fn(&Profile) -> (f64, f64)| {
            median(
                &samples
                    .iter()
                    .map(|p| {
                        let (sum, count) = f(p);
                        if count > 0.0 {
                            1000.0 * sum / count
                        } else {
                            0.0
                        }
                    })
                    .collect::<Vec<_>>(),
            )
        };
        let share = |f: fn(&Profile) -> f64| {
            median(
                &samples
                    .iter()
                    .map(|p| {
                        let total = p.claim_s + p.publish_s + p.complete_s;
                        if total > 0.0 { f(p) / total } else { 0.0 }
                    })
                    .collect::<Vec<_>>(),
            )
        };
        json!({
            "claim_ms_mean": round2(mean_ms(|p| (p.claim_s, p.claims))),
            "publish_ms_mean": round2(mean_ms(|p| (p.publish_s, p.batches))),
            "complete_ms_mean": round2(mean_ms(|p| (p.complete_s, p.completes))),
            "share_claim": round2(share(|p| p.claim_s)),
            "share_publish": round2(share(|p| p.publish_s)),
            "share_complete": round2(share(|p| p.complete_s)),
        })
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The process-wide debugging recorder, installed on first use; `None` if
/// another recorder was installed first.
fn snapshotter() -> Option<&'static Snapshotter> {
    static SNAPSHOTTER: OnceLock<Option<Snapshotter>> = OnceLock::new();
    SNAPSHOTTER
        .get_or_init(|| {
            let recorder = DebuggingRecorder::new();
            let snapshotter = recorder.snapshotter();
            recorder.install().ok().map(|()| snapshotter)
        })
        .as_ref()
}

/// Drains the recorder: what the relay recorded since the last call.
fn take_profile() -> Profile {
    let mut p = Profile::default();
    let Some(s) = snapshotter() else {
        return p;
    };
    for (key, _, _, value) in s.snapshot().into_vec() {
        let DebugValue::Histogram(values) = value else {
            continue;
        };
        let count = values.len() as f64;
        let sum: f64 = values.iter().map(|v| v.into_inner()).sum();
        match key.key().name() {
            observe::CLAIM_DURATION_SECONDS => (p.claims, p.claim_s) = (count, sum),
            observe::PUBLISH_DURATION_SECONDS => (p.batches, p.publish_s) = (count, sum),
            observe::COMPLETE_DURATION_SECONDS => (p.completes, p.complete_s) = (count, sum),
            _ => {}
        }
    }
    p
}

// ---------------------------------------------------------------- scenario

#[derive(Default)]
struct Figures {
    ceiling: Vec<f64>,
    postbox: Vec<f64>,
    profile: Vec<Profile>,
}

/// brokers: see the module docs.
pub(crate) async fn brokers(pg: &Pg, o: &Opts, lines: &mut Vec<Line>) -> Result<()> {
    ensure!(!o.brokers.is_empty(), "--broker names no broker");
    if snapshotter().is_none() {
        progress!(
            "brokers: a metrics recorder is already installed; no claim/publish/complete profile"
        );
    }
    pg.reset().await?;
    let run = format!("{:08X}", fastrand::u32(..));
    let mut nats = None;
    let mut kafka = None;
    for b in &o.brokers {
        match b {
            Broker::Nats => nats = Some(NatsBench::start(&o.nats_url, &run).await?),
            Broker::Kafka => {
                kafka = Some(KafkaBench::start(
                    &o.kafka_brokers,
                    &run,
                    o.kafka_linger_ms,
                )?)
            }
        }
    }
    let result = measure(pg, o, lines, nats.as_ref(), kafka.as_mut()).await;
    if let Some(nats) = nats
        && let Err(e) = nats.finish().await
    {
        progress!("  {e:#}");
    }
    result
}

async fn measure(
    pg: &Pg,
    o: &Opts,
    lines: &mut Vec<Line>,
    nats: Option<&NatsBench>,
    mut kafka: Option<&mut KafkaBench>,
) -> Result<()> {
    let n = o.rows;
    for &batch in &o.batches {
        let (mut c1, mut c2, mut null) = (vec![], vec![], vec![]);
        let mut by = std::collections::BTreeMap::<&str, Figures>::new();
        for rep in 1..=o.repeat {
            progress!("brokers batch {batch}: repeat {rep}/{}", o.repeat);
            pg.fresh(n, Keys::None).await?;
            c1.push(rate(
                n,
                ceiling_drain(pg, Ceiling::C1, n, batch, o.concurrency).await?,
            ));
            pg.fresh(n, Keys::None).await?;
            c2.push(rate(
                n,
                ceiling_drain(pg, Ceiling::C2, n, batch, o.concurrency).await?,
            ));
            pg.fresh(n, Keys::None).await?;
            take_profile();
            null.push(rate(n, postbox_drain(pg, drain(o, n, batch)).await?));
            let null_profile = take_profile();
            by.entry("null").or_default().profile.push(null_profile);

            if let Some(nb) = nats {
                let f = by.entry(Broker::Nats.name()).or_default();
                f.ceiling
                    .push(rate(n, nb.ceiling(n, batch, o.concurrency).await?));
                nb.check_and_purge(n, "NATS plain client").await?;
                pg.fresh(n, Keys::None).await?;
                let publisher = nb.publisher().await?;
                take_profile();
                f.postbox.push(rate(
                    n,
                    postbox_drain_to(pg, drain(o, n, batch), publisher).await?,
                ));
                f.profile.push(take_profile());
                nb.check_and_purge(n, "postbox → NATS").await?;
            }
            if let Some(kb) = kafka.as_deref_mut() {
                let prefix = kb.fresh_topic().await?;
                let ceiling = kb.ceiling(&prefix, n, batch, o.concurrency).await?;
                kb.check_and_drop(&prefix, n, "Kafka plain client").await?;
                let prefix = kb.fresh_topic().await?;
                pg.fresh(n, Keys::None).await?;
                let publisher = kb.publisher(&prefix)?;
                take_profile();
                let took = postbox_drain_to(pg, drain(o, n, batch), publisher).await?;
                let profile = take_profile();
                kb.check_and_drop(&prefix, n, "postbox → Kafka").await?;
                let f = by.entry(Broker::Kafka.name()).or_default();
                f.ceiling.push(rate(n, ceiling));
                f.postbox.push(rate(n, took));
                f.profile.push(profile);
            }
        }
        let null_profile = by.get("null").map(|f| Profile::json(&f.profile));
        for &b in &o.brokers {
            let Some(f) = by.remove(b.name()) else {
                continue;
            };
            let extra = json!({
                "rows": n, "batch": batch, "concurrency": o.concurrency,
                "c1_msgs_per_s": median(&c1), "c2_msgs_per_s": median(&c2),
                "broker_ceiling_msgs_per_s": median(&f.ceiling),
                "postbox_null_publisher_msgs_per_s": median(&null),
                "postbox_profile": Profile::json(&f.profile),
                "postbox_null_profile": null_profile,
                "broker": match b {
                    Broker::Nats => json!({"url": postbox_core::redact_userinfo(&o.nats_url), "storage": "file"}),
                    Broker::Kafka => json!({"brokers": o.kafka_brokers, "partitions": KAFKA_PARTITIONS,
                                            "linger_ms": o.kafka_linger_ms}),
                },
            });
            let variant = format!("{}, keyless, batch {batch}", b.name());
            for (which, db) in [("C1", &c1), ("C2", &c2)] {
                let floor: Vec<f64> = db.iter().zip(&f.ceiling).map(|(d, b)| d.min(*b)).collect();
                // the ratio within each repeat (ceiling and postbox measured
                // minutes apart), steadier than the ratio of the medians on
                // a machine whose load changes between repeats
                let mut extra = extra.clone();
                extra["ratio_per_repeat"] = json!(per_repeat(&f.postbox, &floor));
                emit(
                    lines,
                    Line::new(
                        "brokers",
                        &variant,
                        format!("min({which}, {} plain client)", b.label()),
                        "msg/s",
                        Better::Higher,
                        floor,
                        f.postbox.clone(),
                        Goal::RatioAtLeast(0.7),
                    )
                    .extra(extra),
                );
            }
            let mut extra = extra;
            extra["ratio_per_repeat"] = json!(per_repeat(&f.postbox, &null));
            emit(
                lines,
                Line::new(
                    "brokers",
                    &variant,
                    "postbox → null publisher",
                    "msg/s",
                    Better::Higher,
                    null.clone(),
                    f.postbox,
                    Goal::None,
                )
                .extra(extra),
            );
        }
    }
    Ok(())
}

/// `a[i] / b[i]`, rounded to 3 places.
fn per_repeat(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(a, b)| (1000.0 * a / b.max(1e-9)).round() / 1000.0)
        .collect()
}

fn drain(o: &Opts, n: u64, batch: usize) -> Drain {
    Drain {
        n,
        batch,
        concurrency: o.concurrency,
        relays: 1,
        vacuum_after: o.pg_vacuum_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_message_once() {
        let b = Batches::new(250, 100);
        let mut got = vec![];
        while let Some(r) = b.take() {
            got.push(r);
        }
        assert_eq!(got, vec![0..100, 100..200, 200..250]);
    }
}
