//! NATS-specific behaviour: missing streams, stream creation, limits,
//! dedup, faults on the wire.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use futures_util::StreamExt;

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

/// With the default template, a topic is the subject as it is: a system
/// subject would be a request made with the relay's credentials (this one
/// deletes the stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_subjects_are_rejected_and_the_stream_survives() {
    let h = harness().await;
    let delete = format!("$JS.API.STREAM.DELETE.{}", h.stream());
    let inbox = format!("_INBOX.{}", h.suffix);
    let outcomes = h
        .publisher
        .publish(&[
            message(1, &delete, None, &b""[..]),
            message(2, &inbox, None, &b"x"[..]),
        ])
        .await;
    for (o, subject) in outcomes.iter().zip([&delete, &inbox]) {
        match o {
            PublishOutcome::Rejected { reason } => {
                assert!(reason.contains(subject.as_str()), "{reason}")
            }
            other => panic!("{subject}: expected Rejected, got {other:?}"),
        }
    }
    assert!(
        h.js.get_stream(h.stream()).await.is_ok(),
        "the stream was deleted"
    );
}

/// Before the first connection the client only knows its own default
/// max_payload (1 MiB); the server may allow more, so the message must
/// stay retryable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_message_before_the_first_connection_stays_retryable() {
    // nothing listens on port 1
    let publisher = NatsPublisher::new(config("127.0.0.1:1")).await.unwrap();
    let big = message(1, "orders.created", None, vec![7u8; 1_500_000]);
    let outcomes = publisher.publish(&[big]).await;
    match &outcomes[..] {
        [PublishOutcome::Transient { reason, .. }] => {
            assert!(reason.contains("max_payload"), "{reason}")
        }
        other => panic!("expected Transient, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_the_created_stream_does_not_capture_is_rejected() {
    let addr = postbox_testkit::services::NATS.require().await;
    let s = suffix();
    let name = format!("POSTBOX_TEST_{s}");
    let publisher = NatsPublisher::connect(
        config(&addr).create_stream(StreamSpec::new(&name, [format!("postbox.test.{s}.a.>")])),
    )
    .await
    .unwrap();
    let elsewhere = format!("postbox.test.{s}.b.created");
    let outcomes = publisher
        .publish(&[message(1, &elsewhere, None, &b"x"[..])])
        .await;
    let js = async_nats::jetstream::new(publisher.client().clone());
    js.delete_stream(&name).await.unwrap();
    match &outcomes[..] {
        [PublishOutcome::Rejected { reason }] => {
            assert!(
                reason.contains(&elsewhere) && reason.contains(&name),
                "{reason}"
            )
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
}

/// A `Nats-Expected-Stream` naming another stream fails on every retry:
/// `Rejected`. An expected last sequence the stream has not reached yet may
/// be reached by the time of a retry: `Transient`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_expected_stream_is_rejected_an_unmet_last_sequence_retried() {
    let h = harness().await;
    let topic = h.topic_name();
    let mut wrong_stream = message(1, &topic, None, &b"x"[..]);
    wrong_stream
        .headers
        .insert("Nats-Expected-Stream".into(), "NOT_THIS_ONE".into());
    let mut wrong_seq = message(2, &topic, None, &b"x"[..]);
    wrong_seq
        .headers
        .insert("Nats-Expected-Last-Sequence".into(), "999".into());
    let outcomes = h.publisher.publish(&[wrong_stream, wrong_seq]).await;
    match &outcomes[0] {
        PublishOutcome::Rejected { reason } => {
            assert!(
                reason.contains("10060") && reason.contains(&topic),
                "{reason}"
            )
        }
        other => panic!("10060: expected Rejected, got {other:?}"),
    }
    // a last sequence the stream has not reached yet may be reached later
    match &outcomes[1] {
        PublishOutcome::Transient { reason, .. } => assert!(reason.contains("10071"), "{reason}"),
        other => panic!("10071: expected Transient, got {other:?}"),
    }
}

/// "No responders" for many messages of one subject asks JetStream which
/// stream captures it once per batch, not once per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_asks_once_per_subject_which_stream_captures_it() {
    let h = harness().await;
    let watcher = async_nats::connect(h.addr.as_str()).await.unwrap();
    let mut requests = watcher.subscribe("$JS.API.STREAM.NAMES").await.unwrap();
    watcher.flush().await.unwrap();
    let subject = format!("postbox.nostream.{}", suffix());
    let batch: Vec<_> = (1..=50)
        .map(|i| message(i, &subject, None, &b"x"[..]))
        .collect();
    let outcomes = h.publisher.publish(&batch).await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, PublishOutcome::Rejected { .. })),
        "{:?}",
        &outcomes[..3]
    );
    let mut asked = 0;
    while let Ok(Some(request)) =
        tokio::time::timeout(Duration::from_millis(500), requests.next()).await
    {
        // other tests run beside this one: count only the lookups of this subject
        if String::from_utf8_lossy(&request.payload).contains(&subject) {
            asked += 1;
        }
    }
    assert_eq!(asked, 1, "stream lookups for one subject in one batch");
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
