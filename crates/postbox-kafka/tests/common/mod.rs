//! Topics and a reader for the Kafka tests.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::time::Duration;

use bytes::Bytes;
use postbox_core::Headers;
use postbox_testkit::Received;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use uuid::Uuid;

pub const PARTITIONS: i32 = 3;

pub async fn create_topic(brokers: &str, name: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let results = admin
        .create_topics(
            &[NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("CreateTopics request failed");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("cannot create topic {t}: {e}"));
    }
}

/// A received record plus where it was.
pub struct Record {
    pub received: Received,
    pub partition: i32,
}

/// Reads `topic` from the beginning of every partition until `n` records
/// arrived or `timeout` passed.
pub async fn consume(brokers: &str, topic: &str, n: usize, timeout: Duration) -> Vec<Record> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("postbox-test-{}", Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        let Ok(msg) = tokio::time::timeout_at(deadline, consumer.recv()).await else {
            break;
        };
        let msg = msg.expect("consumer error");
        let mut headers = Headers::new();
        if let Some(h) = msg.headers() {
            for header in h.iter() {
                headers.insert(
                    header.key.to_owned(),
                    String::from_utf8(header.value.unwrap_or_default().to_vec()).unwrap(),
                );
            }
        }
        out.push(Record {
            received: Received {
                id: headers.get("postbox-id").and_then(|v| v.parse().ok()),
                key: msg.key().map(|k| String::from_utf8(k.to_vec()).unwrap()),
                headers,
                payload: Bytes::copy_from_slice(msg.payload().unwrap_or_default()),
            },
            partition: msg.partition(),
        });
    }
    out
}
