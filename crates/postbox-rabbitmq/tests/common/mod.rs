//! A per-test queue on the default exchange and a consumer for it.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::time::Duration;

use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};
use postbox_core::Headers;
use postbox_rabbitmq::{KEY_HEADER, RabbitMqConfig, RabbitMqPublisher};
use postbox_testkit::{LargePayload, PublisherHarness, Received};

pub struct RabbitHarness {
    pub suffix: String,
    pub addr: String,
    /// keeps the exclusive queue alive; it goes when this connection closes
    pub conn: Connection,
    pub channel: Channel,
    pub publisher: RabbitMqPublisher,
}

pub fn suffix() -> String {
    format!("{:016x}", fastrand::u64(..))
}

pub fn url(addr: &str) -> String {
    format!("amqp://guest:guest@{addr}/%2f")
}

pub fn config(addr: &str) -> RabbitMqConfig {
    RabbitMqConfig::from_url(&url(addr))
        .unwrap()
        .confirm_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2))
        .max_backoff(Duration::from_millis(500))
}

pub async fn harness() -> RabbitHarness {
    let addr = postbox_testkit::services::RABBITMQ.require().await;
    let suffix = suffix();
    let conn = Connection::connect(&url(&addr), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let h = RabbitHarness {
        suffix,
        publisher: RabbitMqPublisher::connect(config(&addr)).await.unwrap(),
        addr,
        conn,
        channel,
    };
    h.declare_queue(&h.queue()).await;
    h
}

impl RabbitHarness {
    /// The queue; also the topic, routed by the default exchange.
    pub fn queue(&self) -> String {
        format!("postbox.test.{}", self.suffix)
    }

    pub async fn declare_queue(&self, name: &str) {
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    /// Declares the direct exchange `postbox.test.<suffix>.x` (deleted with
    /// its last binding) and binds the harness queue to it with the
    /// exchange's own name as routing key.
    pub async fn bound_exchange(&self) -> String {
        let exchange = format!("postbox.test.{}.x", self.suffix);
        self.channel
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        self.channel
            .queue_bind(
                self.queue().into(),
                exchange.as_str().into(),
                exchange.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        exchange
    }

    /// Takes up to `n` messages from `queue` until `timeout`.
    pub async fn read_queue(&self, queue: &str, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < n && tokio::time::Instant::now() < deadline {
            let msg = self
                .channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap();
            let Some(msg) = msg else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let props = &msg.delivery.properties;
            let mut headers = Headers::new();
            if let Some(table) = props.headers() {
                for (k, v) in table.inner() {
                    if let AMQPValue::LongString(s) = v {
                        headers.insert(
                            k.as_str().to_owned(),
                            String::from_utf8(s.as_bytes().to_vec()).unwrap(),
                        );
                    }
                }
            }
            got.push(Received {
                id: props
                    .message_id()
                    .as_ref()
                    .and_then(|id| id.as_str().parse().ok()),
                key: headers.get(KEY_HEADER).cloned(),
                headers,
                payload: msg.delivery.data.clone().into(),
            });
        }
        got
    }
}

impl PublisherHarness for RabbitHarness {
    type Publisher = RabbitMqPublisher;

    fn publisher(&self) -> RabbitMqPublisher {
        self.publisher.clone()
    }

    fn unreachable_publisher(&self) -> RabbitMqPublisher {
        RabbitMqPublisher::new(config("127.0.0.1:1")).unwrap()
    }

    fn topic(&self) -> String {
        self.queue()
    }

    async fn receive(&self, n: usize, timeout: Duration) -> Vec<Received> {
        self.read_queue(&self.queue(), n, timeout).await
    }

    fn large_payload(&self) -> LargePayload {
        // RabbitMQ's max_message_size is 16 MiB or more by default
        LargePayload::Delivered
    }
}
