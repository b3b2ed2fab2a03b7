//! NATS-specific behaviour: missing streams, stream creation, limits,
//! dedup, faults on the wire.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{NatsHarness, config, harness, suffix};
use postbox_core::{PublishOutcome, Publisher};
use postbox_nats::{NatsConfig, NatsPublisher, StreamSpec};
use postbox_testkit::FaultProxy;
use postbox_testkit::publisher_suite::message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_without_a_stream_is_rejected_naming_it() {
    let h = harness().await;
    let subject = format!("postbox.nostream.{}", suffix());
    let m = message(1, &subject, None, &b"x"[..]);
    let outcomes = h.publisher.publish(&[m]).await;
    match &outcomes[..] {
        [PublishOutcome::Rejected { reason }] => {
            assert!(
                reason.contains(&subject),
                "reason does not name the subject: {reason}"
            );
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_stream_is_created() {
    let addr = postbox_testkit::services::NATS.require().await;
    let s = suffix();
    let name = format!("POSTBOX_TEST_{s}");
    let publisher = NatsPublisher::new(
        config(&addr).create_stream(StreamSpec::new(&name, [format!("postbox.test.{s}.>")])),
    )
    .await
    .unwrap();
    let topic = format!("postbox.test.{s}.created");
    let outcomes = publisher
        .publish(&[message(1, &topic, None, &b"x"[..])])
        .await;
    assert_eq!(outcomes, vec![PublishOutcome::Ok]);
    let js = async_nats::jetstream::new(publisher.client().clone());
    let mut stream = js.get_stream(&name).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
    js.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_with_the_same_id_is_stored_once() {
    let h = harness().await;
    let m = message(1, &h.topic_name(), None, &b"once"[..]);
    let batch = vec![m.clone(), m.clone()];
    assert_eq!(
        h.publisher.publish(&batch).await,
        vec![PublishOutcome::Ok; 2]
    );
    assert_eq!(h.publisher.publish(&[m]).await, vec![PublishOutcome::Ok]);
    let got = h.read(3, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 1, "Nats-Msg-Id dedup failed: {got:?}");
}

/// A batch larger than async-nats's default room for unanswered acks
/// (5,000): sent whole before any ack was awaited, its 5,001st message
/// waited for a permit its own batch held, until the relay's send timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_ten_thousand_is_acknowledged() {
    let h = harness().await;
    let topic = h.topic_name();
    let batch: Vec<_> = (1..=10_000)
        .map(|i| message(i, &topic, None, format!("m{i}").into_bytes()))
        .collect();
    let outcomes = tokio::time::timeout(Duration::from_secs(60), h.publisher.publish(&batch))
        .await
        .expect("the batch's publish did not finish within 60 s");
    assert!(
        outcomes.iter().all(PublishOutcome::is_ok),
        "{:?}",
        &outcomes[..3]
    );
    assert_eq!(outcomes.len(), 10_000);
    let mut stream = h.js.get_stream(h.stream()).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_not_started_by_the_deadline_are_not_sent() {
    let h = harness().await;
    let topic = h.topic_name();
    let batch: Vec<_> = (1..=2_500)
        .map(|i| message(i, &topic, None, format!("m{i}").into_bytes()))
        .collect();
    let outcomes = h
        .publisher
        .publish_until(&batch, tokio::time::Instant::now())
        .await;
    assert_eq!(outcomes.len(), 2_500);
    assert!(
        outcomes.iter().all(|o| *o == PublishOutcome::NotSent),
        "{:?}",
        &outcomes[..3]
    );
    let mut stream = h.js.get_stream(h.stream()).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_not_in_by_the_deadline_are_transient() {
    let h = harness().await;
    let proxy = FaultProxy::start(h.addr.clone()).await.unwrap();
    let publisher = NatsPublisher::connect(config(&proxy.addr().to_string()))
        .await
        .unwrap();
    let topic = h.topic_name();
    let batch = |from: i64| -> Vec<_> {
        (from..from + 10)
            .map(|i| message(i, &topic, None, format!("m{i}").into_bytes()))
            .collect()
    };
    let first = publisher.publish(&batch(1)).await;
    assert!(first.iter().all(PublishOutcome::is_ok), "{first:?}");
    // the server goes silent: no ack comes before the deadline, well
    // before the publisher's own ack timeout
    proxy.stall(true);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    let late = publisher.publish_until(&batch(11), deadline).await;
    proxy.stall(false);
    for o in &late {
        match o {
            PublishOutcome::Transient { reason, .. } => {
                assert!(reason.contains("deadline"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_and_bad_headers_are_rejected_alone() {
    let h = harness().await;
    let topic = h.topic_name();
    let big = message(1, &topic, None, vec![7u8; 1024 * 1024]);
    let mut bad = message(2, &topic, None, &b"x"[..]);
    bad.headers.insert("bad name: colon".into(), "v".into());
    let fine = message(3, &topic, None, &b"fine"[..]);
    let outcomes = h.publisher.publish(&[big, bad, fine.clone()]).await;
    match &outcomes[0] {
        PublishOutcome::Rejected { reason } => {
            assert!(reason.contains("max_payload"), "{reason}")
        }
        other => panic!("1 MiB: expected Rejected, got {other:?}"),
    }
    match &outcomes[1] {
        PublishOutcome::Rejected { reason } => assert!(reason.contains("header"), "{reason}"),
        other => panic!("bad header: expected Rejected, got {other:?}"),
    }
    assert_eq!(outcomes[2], PublishOutcome::Ok);
    let got = h.read(1, Duration::from_secs(20)).await;
    assert_eq!(got[0].id, Some(fine.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_the_connection_breaks() {
    let h = harness().await;
    let proxy = FaultProxy::start(h.addr.clone()).await.unwrap();
    let publisher = NatsPublisher::connect(config(&proxy.addr().to_string()))
        .await
        .unwrap();
    let report =
        postbox_testkit::connection_loss_scenario(&proxy, &publisher, &h.topic_name()).await;
    assert_all_stored(&h, &report).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_while_nats_is_down_and_recovers() {
    let h = harness().await;
    let proxy = FaultProxy::start(h.addr.clone()).await.unwrap();
    proxy.blackhole(true);
    // `new` does not wait for the server
    let publisher = NatsPublisher::new(config(&proxy.addr().to_string()))
        .await
        .unwrap();
    let topic = h.topic_name();
    let m = message(1, &topic, None, &b"late"[..]);
    let outcomes = publisher.publish(std::slice::from_ref(&m)).await;
    assert!(
        matches!(outcomes[..], [PublishOutcome::Transient { .. }]),
        "{outcomes:?}"
    );
    proxy.blackhole(false);
    proxy.cut();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !publisher.publish(std::slice::from_ref(&m)).await[0].is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = h.read(1, Duration::from_secs(20)).await;
    assert_eq!(got[0].id, Some(m.id));
}

#[tokio::test]
async fn connect_fails_fast_and_clearly_when_nats_is_unreachable() {
    let err = NatsPublisher::connect(
        NatsConfig::from_url("nats://user:s3cret@127.0.0.1:1")
            .unwrap()
            .connect_timeout(Duration::from_millis(300)),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("127.0.0.1:1") && !err.contains("s3cret"),
        "{err}"
    );
}

async fn assert_all_stored(h: &NatsHarness, report: &postbox_testkit::LossReport) {
    // at-least-once: the stream may hold more (Transient ones that made it),
    // but every Ok one must be there
    let got = h.read(report.sent.len(), Duration::from_secs(5)).await;
    let ids: std::collections::HashSet<_> = got.iter().filter_map(|r| r.id).collect();
    for m in &report.ok {
        assert!(ids.contains(&m.id), "acknowledged message {} lost", m.id);
    }
}
