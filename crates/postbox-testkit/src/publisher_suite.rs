//! The publisher conformance suite: what every [`Publisher`] must do against
//! its real broker.
//!
//! A publisher crate implements [`PublisherHarness`] (an isolated
//! destination: its own stream / topic / queue / key) and expands
//! [`publisher_conformance_tests!`](crate::publisher_conformance_tests) once.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use postbox_core::{Headers, Message, PublishOutcome, Publisher};
use uuid::Uuid;

/// A message as a consumer read it back from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The idempotency id as carried by the broker (`Nats-Msg-Id`,
    /// `message_id`, a header, `webhook-id`), parsed.
    pub id: Option<Uuid>,
    /// The ordering key as carried by the broker, if it carries one.
    pub key: Option<String>,
    /// Headers as received (brokers may add their own; the suite only checks
    /// that the sent ones are there).
    pub headers: Headers,
    /// Body bytes.
    pub payload: Bytes,
}

/// What a broker does with a 1 MiB payload, as the publisher crate documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LargePayload {
    /// Delivered intact.
    Delivered,
    /// Refused with `Rejected` and a reason.
    Rejected,
}

/// An isolated destination on a real broker plus a consumer for it.
pub trait PublisherHarness: Send + Sync + 'static {
    /// The publisher under test.
    type Publisher: Publisher;

    /// A publisher that routes [`PublisherHarness::topic`] to this harness's
    /// destination.
    fn publisher(&self) -> Self::Publisher;

    /// A publisher configured like [`PublisherHarness::publisher`] but pointed
    /// at an address where no broker listens.
    fn unreachable_publisher(&self) -> Self::Publisher;

    /// The topic to put in messages.
    fn topic(&self) -> String;

    /// Reads from the destination until `n` messages have arrived or
    /// `timeout` has passed; returns what arrived, in arrival order.
    fn receive(&self, n: usize, timeout: Duration) -> impl Future<Output = Vec<Received>> + Send;

    /// What this broker does with a 1 MiB payload.
    fn large_payload(&self) -> LargePayload;
}

const RECEIVE: Duration = Duration::from_secs(20);

/// Builds a message as a relay would hand it over.
pub fn message(seq: i64, topic: &str, key: Option<&str>, payload: impl Into<Bytes>) -> Message {
    Message::new(
        Uuid::now_v7(),
        seq,
        topic.to_owned(),
        key.map(str::to_owned),
        payload.into(),
        Headers::new(),
        None,
        1,
        None,
        SystemTime::now(),
    )
}

fn assert_all_ok(outcomes: &[PublishOutcome], n: usize) {
    assert_eq!(outcomes.len(), n, "one outcome per message");
    let bad: Vec<_> = outcomes.iter().filter(|o| !o.is_ok()).collect();
    assert!(bad.is_empty(), "not all Ok: {bad:?}");
}

/// Every message of a batch gets exactly one outcome and arrives once.
pub async fn one_outcome_per_message<H: PublisherHarness>(h: H) {
    let topic = h.topic();
    let p = h.publisher();
    let batch: Vec<_> = (0..25)
        .map(|i| message(i, &topic, None, format!("m{i}").into_bytes()))
        .collect();
    assert_all_ok(&p.publish(&batch).await, batch.len());
    let got = h.receive(batch.len(), RECEIVE).await;
    let mut ids: Vec<_> = got.iter().filter_map(|r| r.id).collect();
    ids.sort();
    let mut want: Vec<_> = batch.iter().map(|m| m.id).collect();
    want.sort();
    assert_eq!(ids, want, "received ids differ from sent ids");
}

/// Messages of one key arrive in the order published, within one batch and
/// across batches.
pub async fn same_key_order_is_kept<H: PublisherHarness>(h: H) {
    let topic = h.topic();
    let p = h.publisher();
    let mut sent: Vec<Message> = Vec::new();
    let mut seq = 0;
    // ten batches of one message per key, as a relay claims them
    for round in 0..10 {
        let batch: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|k| {
                seq += 1;
                message(seq, &topic, Some(k), format!("{k}-{round}").into_bytes())
            })
            .collect();
        assert_all_ok(&p.publish(&batch).await, batch.len());
        sent.extend(batch);
    }
    // and one batch holding several messages of one key
    let batch: Vec<_> = (0..10)
        .map(|i| {
            seq += 1;
            message(seq, &topic, Some("d"), format!("d-{i}").into_bytes())
        })
        .collect();
    assert_all_ok(&p.publish(&batch).await, batch.len());
    sent.extend(batch);

    let got = h.receive(sent.len(), RECEIVE).await;
    assert_eq!(got.len(), sent.len(), "not everything arrived");
    let position: HashMap<Uuid, usize> = got
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.id.map(|id| (id, i)))
        .collect();
    for key in ["a", "b", "c", "d"] {
        let order: Vec<usize> = sent
            .iter()
            .filter(|m| m.key.as_deref() == Some(key))
            .map(|m| {
                *position
                    .get(&m.id)
                    .unwrap_or_else(|| panic!("{} missing", m.id))
            })
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "key {key} arrived out of order: positions {order:?}"
        );
    }
}

/// The idempotency id reaches the broker, and the key where the broker
/// carries one.
pub async fn id_and_key_reach_the_broker<H: PublisherHarness>(h: H) {
    let topic = h.topic();
    let m = message(1, &topic, Some("order-42"), &b"{}"[..]);
    assert_all_ok(&h.publisher().publish(std::slice::from_ref(&m)).await, 1);
    let got = h.receive(1, RECEIVE).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, Some(m.id));
    if let Some(k) = &got[0].key {
        assert_eq!(k, "order-42");
    }
}

/// Headers and an exact binary payload (every byte value, and empty) round-trip.
pub async fn headers_and_binary_payload_round_trip<H: PublisherHarness>(h: H) {
    let topic = h.topic();
    let all_bytes: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let mut m = message(1, &topic, Some("k"), all_bytes.clone());
    m.headers
        .insert("content-type".into(), "application/octet-stream".into());
    m.headers.insert(
        "traceparent".into(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
    );
    m.headers.insert("x-unicode".into(), "zürich ✓".into());
    let empty = message(2, &topic, Some("k"), Bytes::new());
    let batch = vec![m.clone(), empty.clone()];
    assert_all_ok(&h.publisher().publish(&batch).await, 2);
    let got = h.receive(2, RECEIVE).await;
    assert_eq!(got.len(), 2);
    let first = got
        .iter()
        .find(|r| r.id == Some(m.id))
        .expect("binary message");
    assert_eq!(
        first.payload,
        Bytes::from(all_bytes),
        "payload bytes changed"
    );
    for (k, v) in &m.headers {
        assert_eq!(first.headers.get(k), Some(v), "header {k} lost or changed");
    }
    let second = got
        .iter()
        .find(|r| r.id == Some(empty.id))
        .expect("empty message");
    assert!(second.payload.is_empty());
}

/// An unreachable broker yields `Transient` outcomes (the relay retries),
/// not a panic and not `Ok`.
pub async fn unreachable_broker_is_transient<H: PublisherHarness>(h: H) {
    let topic = h.topic();
    let batch: Vec<_> = (0..3)
        .map(|i| message(i, &topic, None, &b"x"[..]))
        .collect();
    let p = h.unreachable_publisher();
    let outcomes = tokio::time::timeout(Duration::from_secs(60), p.publish(&batch))
        .await
        .expect("publish to an unreachable broker must give up within 60 s by itself");
    assert_eq!(outcomes.len(), 3);
    for o in outcomes {
        assert!(
            matches!(o, PublishOutcome::Transient { .. }),
            "expected Transient, got {o:?}"
        );
    }
}

/// A 1 MiB payload is delivered intact or rejected with a reason, as the
/// crate documents.
pub async fn large_payload_is_delivered_or_rejected<H: PublisherHarness>(h: H) {
    let topic = h.topic();
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let m = message(1, &topic, None, big.clone());
    let outcomes = h.publisher().publish(std::slice::from_ref(&m)).await;
    assert_eq!(outcomes.len(), 1);
    match h.large_payload() {
        LargePayload::Delivered => {
            assert!(
                outcomes[0].is_ok(),
                "1 MiB not delivered: {:?}",
                outcomes[0]
            );
            let got = h.receive(1, RECEIVE).await;
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].payload.len(), big.len());
            assert!(got[0].payload == big, "1 MiB payload corrupted");
        }
        LargePayload::Rejected => match &outcomes[0] {
            PublishOutcome::Rejected { reason } => assert!(!reason.is_empty()),
            other => panic!("expected Rejected for 1 MiB, got {other:?}"),
        },
    }
}

/// Expands to one `#[tokio::test]` per publisher conformance check.
/// `$harness` is an async function (path) returning a fresh
/// [`PublisherHarness`].
#[macro_export]
macro_rules! publisher_conformance_tests {
    ($harness:path) => {
        $crate::__publisher_conformance_tests!(
            $harness;
            one_outcome_per_message,
            same_key_order_is_kept,
            id_and_key_reach_the_broker,
            headers_and_binary_payload_round_trip,
            unreachable_broker_is_transient,
            large_payload_is_delivered_or_rejected,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __publisher_conformance_tests {
    ($harness:path; $($name:ident),* $(,)?) => {
        mod publisher_conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::publisher_suite::$name($harness().await).await;
                }
            )*
        }
    };
}
