//! The Kafka publisher against the real Kafka-compatible broker started by
//! `scripts/kafka` (Tansu, in-memory storage, 127.0.0.1:9092).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use common::{consume, create_topic};
use postbox_core::{PublishOutcome, Publisher};
use postbox_kafka::{KafkaConfig, KafkaError, KafkaPublisher};
use postbox_testkit::publisher_suite::message;
use postbox_testkit::services::KAFKA;
use postbox_testkit::{LargePayload, PublisherHarness, Received};
use uuid::Uuid;

struct Harness {
    brokers: String,
    topic: String,
}

async fn harness() -> Harness {
    let brokers = KAFKA.require().await;
    let topic = format!("postbox_test_{}", Uuid::new_v4().simple());
    create_topic(&brokers, &topic).await;
    Harness { brokers, topic }
}

impl PublisherHarness for Harness {
    type Publisher = KafkaPublisher;

    fn publisher(&self) -> KafkaPublisher {
        KafkaPublisher::new(KafkaConfig::new(&self.brokers)).unwrap()
    }

    fn unreachable_publisher(&self) -> KafkaPublisher {
        KafkaPublisher::new(KafkaConfig::new(format!(
            "127.0.0.1:{}",
            postbox_testkit::closed_port()
        )))
        .unwrap()
    }

    fn topic(&self) -> String {
        self.topic.clone()
    }

    fn receive(&self, n: usize, timeout: Duration) -> impl Future<Output = Vec<Received>> + Send {
        let (brokers, topic) = (self.brokers.clone(), self.topic.clone());
        async move {
            consume(&brokers, &topic, n, timeout)
                .await
                .into_iter()
                .map(|r| r.received)
                .collect()
        }
    }

    fn large_payload(&self) -> LargePayload {
        // the default producer limit (message_max_bytes = 1 000 000, like a
        // Kafka broker's default) refuses 1 MiB
        LargePayload::Rejected
    }
}

postbox_testkit::publisher_conformance_tests!(harness);

#[tokio::test]
async fn same_key_lands_in_one_partition_and_keeps_order() {
    let h = harness().await;
    let p = h.publisher();
    let keys = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7"];
    let mut sent = Vec::new();
    for round in 0..5 {
        let batch: Vec<_> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                message(
                    i as i64,
                    &h.topic,
                    Some(k),
                    format!("{k}-{round}").into_bytes(),
                )
            })
            .collect();
        let out = p.publish(&batch).await;
        assert!(out.iter().all(PublishOutcome::is_ok), "{out:?}");
        sent.extend(batch);
    }
    let got = consume(&h.brokers, &h.topic, sent.len(), Duration::from_secs(20)).await;
    assert_eq!(got.len(), sent.len());
    let mut partition_of: HashMap<String, HashSet<i32>> = HashMap::new();
    let mut order: HashMap<String, Vec<String>> = HashMap::new();
    for r in &got {
        let key = r.received.key.clone().unwrap();
        partition_of
            .entry(key.clone())
            .or_default()
            .insert(r.partition);
        order
            .entry(key)
            .or_default()
            .push(String::from_utf8(r.received.payload.to_vec()).unwrap());
    }
    for k in keys {
        assert_eq!(partition_of[k].len(), 1, "key {k} spread over partitions");
        let want: Vec<_> = (0..5).map(|r| format!("{k}-{r}")).collect();
        assert_eq!(order[k], want, "key {k} out of order");
    }
    let used: HashSet<i32> = partition_of.values().flatten().copied().collect();
    assert!(
        used.len() > 1,
        "8 keys all hashed to one partition: {used:?}"
    );
}

#[tokio::test]
async fn one_mib_is_delivered_when_the_producer_limit_is_raised() {
    // Tansu enforces no record size limit; a Kafka broker needs its own
    // message.max.bytes raised as well
    let h = harness().await;
    let p = KafkaPublisher::new(KafkaConfig::new(&h.brokers).message_max_bytes(4 * 1024 * 1024))
        .unwrap();
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let m = message(1, &h.topic, None, big.clone());
    let out = p.publish(std::slice::from_ref(&m)).await;
    assert!(out[0].is_ok(), "{out:?}");
    let got = consume(&h.brokers, &h.topic, 1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1);
    assert!(got[0].received.payload == big);
}

#[tokio::test]
async fn too_large_is_rejected_with_the_limit_named() {
    let h = harness().await;
    let out = h
        .publisher()
        .publish(&[message(1, &h.topic, None, vec![7u8; 1_100_000])])
        .await;
    match &out[0] {
        PublishOutcome::Rejected { reason } => {
            assert!(reason.contains("message_max_bytes = 1000000"), "{reason}")
        }
        o => panic!("{o:?}"),
    }
}

#[tokio::test]
async fn invalid_topic_names_are_rejected_without_a_round_trip() {
    let h = harness().await;
    let out = h
        .publisher()
        .publish(&[
            message(1, "orders/created", None, &b"x"[..]),
            message(2, &h.topic, None, &b"fine"[..]),
        ])
        .await;
    assert!(matches!(&out[0], PublishOutcome::Rejected { reason } if reason.contains('/')));
    assert!(out[1].is_ok(), "{:?}", out[1]);
}

#[tokio::test]
async fn connect_checks_the_cluster_and_names_it() {
    let h = harness().await;
    KafkaPublisher::connect(KafkaConfig::new(&h.brokers), Duration::from_secs(10))
        .await
        .unwrap();
    let down = format!("127.0.0.1:{}", postbox_testkit::closed_port());
    match KafkaPublisher::connect(KafkaConfig::new(&down), Duration::from_secs(2)).await {
        Err(KafkaError::Connect { brokers, .. }) => assert_eq!(brokers, down),
        other => panic!("expected a connect error, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_properties_are_config_errors_without_secrets() {
    let e = KafkaPublisher::new(
        KafkaConfig::new("127.0.0.1:9092")
            .property("sasl.password", "hunter2")
            .property("no.such.property", "x"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no.such.property"), "{e}");
    assert!(!e.contains("hunter2"), "{e}");
    // a secret property librdkafka itself refuses (this build has no
    // OpenSSL): named, its value and librdkafka's description not shown
    let e = KafkaPublisher::new(
        KafkaConfig::new("127.0.0.1:9092").property("ssl.key.password", "hunter2"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("ssl.key.password"), "{e}");
    assert!(!e.contains("hunter2"), "{e}");
}

#[test]
fn tls_is_a_config_error_in_this_build_not_a_plain_connection() {
    // librdkafka is built without OpenSSL: asking for TLS must fail up front
    for protocol in ["SSL", "SASL_SSL"] {
        let e = KafkaPublisher::new(
            KafkaConfig::new("127.0.0.1:9093").property("security.protocol", protocol),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("security.protocol"), "{protocol}: {e}");
    }
}
