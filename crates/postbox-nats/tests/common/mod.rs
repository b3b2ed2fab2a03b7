//! A per-test JetStream stream and a consumer for it.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use futures_util::StreamExt;
use postbox_core::Headers;
use postbox_nats::{KEY_HEADER, NatsConfig, NatsPublisher};
use postbox_testkit::{LargePayload, PublisherHarness, Received};

pub struct NatsHarness {
    pub suffix: String,
    pub js: jetstream::Context,
    pub publisher: NatsPublisher,
    /// nothing listens on port 1; `new` succeeds anyway
    pub unreachable: NatsPublisher,
    pub addr: String,
    /// next stream sequence `receive` reads from
    next: AtomicU64,
}

pub fn suffix() -> String {
    format!("{:016x}", fastrand::u64(..))
}

pub async fn harness() -> NatsHarness {
    let addr = postbox_testkit::services::NATS.require().await;
    let suffix = suffix();
    let client = async_nats::connect(addr.as_str()).await.unwrap();
    let js = jetstream::new(client);
    js.create_stream(jetstream::stream::Config {
        name: format!("POSTBOX_TEST_{suffix}"),
        subjects: vec![format!("postbox.test.{suffix}.>")],
        // memory: a restart of the test server clears what tests leave
        storage: jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .unwrap();
    let publisher = NatsPublisher::connect(config(&addr)).await.unwrap();
    let unreachable = NatsPublisher::new(config("127.0.0.1:1")).await.unwrap();
    NatsHarness {
        suffix,
        js,
        publisher,
        unreachable,
        addr,
        next: AtomicU64::new(1),
    }
}

pub fn config(addr: &str) -> NatsConfig {
    NatsConfig::from_url(&format!("nats://{addr}"))
        .unwrap()
        .ack_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2))
}

impl NatsHarness {
    pub fn topic_name(&self) -> String {
        format!("postbox.test.{}.events", self.suffix)
    }

    pub fn stream(&self) -> String {
        format!("POSTBOX_TEST_{}", self.suffix)
    }

    /// Reads up to `n` messages from the stream (from where the last call
    /// stopped) until `timeout`.
    pub async fn read(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let stream = self.js.get_stream(self.stream()).await.unwrap();
        let start = self.next.load(Ordering::SeqCst);
        let consumer = stream
            .create_consumer(OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while got.len() < n {
            let Ok(next) = tokio::time::timeout_at(deadline, messages.next()).await else {
                break;
            };
            let Some(m) = next else { break };
            let m = m.unwrap();
            self.next
                .store(m.info().unwrap().stream_sequence + 1, Ordering::SeqCst);
            let mut headers = Headers::new();
            let mut id = None;
            let mut key = None;
            if let Some(h) = &m.headers {
                for (name, values) in h.iter() {
                    let value = values
                        .first()
                        .map(|v| v.as_str().to_owned())
                        .unwrap_or_default();
                    match name.as_ref() {
                        "Nats-Msg-Id" => id = value.parse().ok(),
                        KEY_HEADER => key = Some(value.clone()),
                        _ => {}
                    }
                    headers.insert(name.to_string(), value);
                }
            }
            got.push(Received {
                id,
                key,
                headers,
                payload: m.payload.clone(),
            });
        }
        got
    }
}

impl PublisherHarness for NatsHarness {
    type Publisher = NatsPublisher;

    fn publisher(&self) -> NatsPublisher {
        self.publisher.clone()
    }

    fn unreachable_publisher(&self) -> NatsPublisher {
        self.unreachable.clone()
    }

    fn topic(&self) -> String {
        self.topic_name()
    }

    fn receive(&self, n: usize, timeout: Duration) -> impl Future<Output = Vec<Received>> + Send {
        self.read(n, timeout)
    }

    fn large_payload(&self) -> LargePayload {
        // the server's default max_payload is 1 MiB: 1 MiB plus headers is over
        LargePayload::Rejected
    }
}
