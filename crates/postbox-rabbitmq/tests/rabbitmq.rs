//! RabbitMQ-specific behaviour: unroutable messages, exchange/routing-key
//! templates, persistence, faults on the wire.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{RabbitHarness, config, harness, suffix};
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use postbox_core::{Message, PublishOutcome, Publisher};
use postbox_rabbitmq::{RabbitMqConfig, RabbitMqPublisher};
use postbox_testkit::FaultProxy;
use postbox_testkit::publisher_suite::message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_message_is_rejected_naming_exchange_and_routing_key() {
    let h = harness().await;
    let nowhere = format!("postbox.test.nowhere.{}", suffix());
    let routed = message(1, &h.queue(), None, &b"ok"[..]);
    let lost = message(2, &nowhere, None, &b"x"[..]);
    let outcomes = h.publisher.publish(&[routed.clone(), lost]).await;
    assert_eq!(outcomes[0], PublishOutcome::Ok);
    match &outcomes[1] {
        PublishOutcome::Rejected { reason } => {
            assert!(reason.contains("unroutable"), "{reason}");
            assert!(reason.contains(&nowhere), "routing key not named: {reason}");
            assert!(
                reason.contains("exchange \"\""),
                "exchange not named: {reason}"
            );
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    let got = h.read_queue(&h.queue(), 1, Duration::from_secs(20)).await;
    assert_eq!(got[0].id, Some(routed.id));
}

/// Unroutable messages among routable ones bound for a durable queue (whose
/// acks wait for the disk while a return's ack does not), in two batches
/// at once on one publisher: each unroutable message is rejected, each
/// routable one is `Ok` and in the queue. lapin hands a return to whichever
/// confirm completes next, so without reading the return's `message_id`
/// a return could be pinned on another message, and its own reported `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_are_pinned_on_their_own_messages() {
    let h = harness().await;
    let durable = format!("postbox.test.{}.durable", h.suffix);
    h.channel
        .queue_declare(
            durable.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let nowhere = format!("postbox.test.nowhere.{}", suffix());
    let batch = |base: i64| -> Vec<Message> {
        (base..base + 200)
            .map(|i| {
                if i % 2 == 0 {
                    message(i, &durable, None, format!("r{i}").into_bytes())
                } else {
                    message(i, &nowhere, None, &b"x"[..])
                }
            })
            .collect()
    };
    let (a, b) = (batch(0), batch(1_000));
    let (oa, ob) = tokio::join!(h.publisher.publish(&a), h.publisher.publish(&b));
    for (m, o) in a.iter().zip(&oa).chain(b.iter().zip(&ob)) {
        if m.topic == durable {
            assert_eq!(*o, PublishOutcome::Ok, "seq {}", m.seq);
        } else {
            assert!(
                matches!(o, PublishOutcome::Rejected { reason } if reason.contains("unroutable")),
                "seq {}: {o:?}",
                m.seq
            );
        }
    }
    let got = h.read_queue(&durable, 200, Duration::from_secs(20)).await;
    h.channel
        .queue_delete(durable.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(got.len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_and_routing_key_come_from_the_templates() {
    let h = harness().await;
    let exchange = h.bound_exchange().await;
    let queue = format!("postbox.test.{}.bound", h.suffix);
    h.declare_queue(&queue).await;
    h.channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "rk.orders".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let publisher = RabbitMqPublisher::new(
        config(&h.addr)
            .exchange(exchange.as_str())
            .routing_key_template("rk.{topic}"),
    )
    .unwrap();
    let m = message(1, "orders", Some("k"), &b"routed"[..]);
    assert_eq!(
        publisher.publish(std::slice::from_ref(&m)).await,
        vec![PublishOutcome::Ok]
    );
    let got = h.read_queue(&queue, 1, Duration::from_secs(20)).await;
    assert_eq!(got[0].id, Some(m.id));
    assert_eq!(got[0].key.as_deref(), Some("k"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_persistent_with_message_id() {
    let h = harness().await;
    let mut m = message(1, &h.queue(), None, &b"{}"[..]);
    m.headers
        .insert("content-type".into(), "application/json".into());
    assert_eq!(
        h.publisher.publish(std::slice::from_ref(&m)).await,
        vec![PublishOutcome::Ok]
    );
    let msg = loop {
        if let Some(msg) = h
            .channel
            .basic_get(
                h.queue().as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            break msg;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let props = &msg.delivery.properties;
    assert_eq!(*props.delivery_mode(), Some(2));
    assert_eq!(
        props.message_id().as_ref().map(|s| s.as_str().to_owned()),
        Some(m.id.to_string())
    );
    assert_eq!(
        props.content_type().as_ref().map(|s| s.as_str().to_owned()),
        Some("application/json".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_exchange_is_rejected_alone() {
    let h = harness().await;
    // exchange and routing key are both the topic; one topic has an
    // exchange bound to the harness queue, the other none
    let exchange = h.bound_exchange().await;
    let publisher = RabbitMqPublisher::new(config(&h.addr).exchange("{topic}")).unwrap();
    let missing = format!("postbox.test.no-such-exchange.{}", suffix());
    let bad = message(1, &missing, None, &b"x"[..]);
    let good = message(2, &exchange, None, &b"y"[..]);
    let outcomes = publisher.publish(&[bad, good.clone()]).await;
    match &outcomes[0] {
        PublishOutcome::Rejected { reason } => {
            assert!(
                reason.contains(&missing) && reason.contains("does not exist"),
                "{reason}"
            )
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    // the good message was not caught in a channel the broker closed
    assert_eq!(outcomes[1], PublishOutcome::Ok);
    let got = h.read_queue(&h.queue(), 1, Duration::from_secs(20)).await;
    assert_eq!(got[0].id, Some(good.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_the_connection_breaks() {
    let h = harness().await;
    let proxy = FaultProxy::start(h.addr.clone()).await.unwrap();
    let publisher = RabbitMqPublisher::connect(config(&proxy.addr().to_string()))
        .await
        .unwrap();
    let report = postbox_testkit::connection_loss_scenario(&proxy, &publisher, &h.queue()).await;
    assert_all_stored(&h, &report).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_while_rabbitmq_is_down_and_recovers() {
    let h = harness().await;
    let proxy = FaultProxy::start(h.addr.clone()).await.unwrap();
    proxy.blackhole(true);
    let publisher = RabbitMqPublisher::new(config(&proxy.addr().to_string())).unwrap();
    let m = message(1, &h.queue(), None, &b"late"[..]);
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
    let got = h.read_queue(&h.queue(), 1, Duration::from_secs(20)).await;
    assert_eq!(got[0].id, Some(m.id));
}

#[tokio::test]
async fn connect_fails_clearly_without_the_password() {
    let err = RabbitMqPublisher::connect(
        RabbitMqConfig::from_url("amqp://alice:s3cret@127.0.0.1:1/%2f")
            .unwrap()
            .connect_timeout(Duration::from_millis(500)),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("127.0.0.1:1") && !err.contains("s3cret"),
        "{err}"
    );
}

async fn assert_all_stored(h: &RabbitHarness, report: &postbox_testkit::LossReport) {
    let got = h
        .read_queue(&h.queue(), report.sent.len(), Duration::from_secs(5))
        .await;
    let ids: std::collections::HashSet<_> = got.iter().filter_map(|r| r.id).collect();
    for m in &report.ok {
        assert!(ids.contains(&m.id), "acknowledged message {} lost", m.id);
    }
}

/// The relay's deadline bounds a batch: one whose deadline passed before it
/// was handed over is `NotSent`; one still unconfirmed at the deadline is
/// `Transient`; one that waited the whole time for the batch before it (a
/// channel carries one batch at a time) is `NotSent`. Fails (after 60 s)
/// if the deadline is ignored: the confirm timeout here is two minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_bounds_a_batch() {
    let h = harness().await;
    let proxy = FaultProxy::start(h.addr.clone()).await.unwrap();
    let publisher = RabbitMqPublisher::connect(
        config(&proxy.addr().to_string()).confirm_timeout(Duration::from_secs(120)),
    )
    .await
    .unwrap();
    let m = |n| message(n, &h.queue(), None, &b"x"[..]);
    let soon = || tokio::time::Instant::now() + Duration::from_millis(300);
    let outcomes = publisher
        .publish_until(&[m(1)], tokio::time::Instant::now())
        .await;
    assert_eq!(outcomes, [PublishOutcome::NotSent]);
    proxy.stall(true);
    let first = tokio::spawn({
        let publisher = publisher.clone();
        let m = m(2);
        async move { publisher.publish(&[m]).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let third = [m(3)];
    let waited = publisher.publish_until(&third, soon());
    let outcomes = tokio::time::timeout(Duration::from_secs(60), waited)
        .await
        .expect("the deadline was ignored while waiting for the channel");
    assert_eq!(outcomes, [PublishOutcome::NotSent]);
    proxy.cut();
    proxy.stall(false);
    let first = first.await.unwrap();
    assert!(
        matches!(first[..], [PublishOutcome::Transient { .. }]),
        "{first:?}"
    );
    // a healthy link again, then one that goes quiet after the publish
    assert_eq!(publisher.publish(&[m(4)]).await, [PublishOutcome::Ok]);
    proxy.stall(true);
    let fifth = [m(5)];
    let cut = publisher.publish_until(&fifth, soon());
    let outcomes = tokio::time::timeout(Duration::from_secs(60), cut)
        .await
        .expect("the deadline was ignored");
    assert!(
        matches!(&outcomes[..], [PublishOutcome::Transient { reason, .. }] if reason.contains("deadline")),
        "{outcomes:?}"
    );
    proxy.stall(false);
}

/// Declares the durable direct exchange `name` (not auto-deleted: the test
/// deletes it) and binds the harness queue to it with routing key `name`.
async fn declare_bound_exchange(h: &RabbitHarness, name: &str) {
    h.channel
        .exchange_declare(
            name.into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    h.channel
        .queue_bind(
            h.queue().into(),
            name.into(),
            name.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// Asserts every message of `batch` but the one at `bad` is `Ok` and in the
/// harness queue, and returns the outcome of the one at `bad`.
async fn others_went_through(
    h: &RabbitHarness,
    batch: &[Message],
    outcomes: &[PublishOutcome],
    bad: usize,
) -> PublishOutcome {
    assert_eq!(outcomes.len(), batch.len());
    for (i, o) in outcomes.iter().enumerate() {
        if i != bad {
            assert_eq!(*o, PublishOutcome::Ok, "batch-mate {i}: {outcomes:?}");
        }
    }
    let mates = batch.iter().enumerate().filter(|(i, _)| *i != bad);
    arrive(h, mates.map(|(_, m)| m)).await;
    outcomes[bad].clone()
}

/// Waits until each of `sent` is in the harness queue. Duplicates are
/// expected: a message the broker took before it closed the channel went
/// again alone.
async fn arrive<'a>(h: &RabbitHarness, sent: impl IntoIterator<Item = &'a Message>) {
    let mut waiting: std::collections::HashSet<_> = sent.into_iter().map(|m| m.id).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !waiting.is_empty() && tokio::time::Instant::now() < deadline {
        for r in h.read_queue(&h.queue(), 1, Duration::from_secs(1)).await {
            waiting.remove(&r.id.unwrap());
        }
    }
    assert!(waiting.is_empty(), "not in the queue: {waiting:?}");
}

/// An exchange deleted after postbox's passive declare found it makes the
/// broker close the channel (404) under the whole batch: its batch-mates go
/// again one at a time and are `Ok`; the message for the deleted exchange
/// is `Rejected` naming it, and checked again once it is back. Before, the
/// whole batch was `Transient`, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_deleted_after_the_check_rejects_only_its_message() {
    let h = harness().await;
    let a = format!("postbox.test.{}.a", h.suffix);
    let b = format!("postbox.test.{}.b", h.suffix);
    declare_bound_exchange(&h, &a).await;
    declare_bound_exchange(&h, &b).await;
    let publisher = RabbitMqPublisher::new(config(&h.addr).exchange("{topic}")).unwrap();
    // both exchanges are checked and cached as existing
    let warm = [
        message(1, &a, None, &b"a"[..]),
        message(2, &b, None, &b"b"[..]),
    ];
    assert_eq!(
        publisher.publish(&warm).await,
        [PublishOutcome::Ok, PublishOutcome::Ok]
    );
    arrive(&h, &warm).await;
    h.channel
        .exchange_delete(b.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    let batch: Vec<Message> = (0..5)
        .map(|i| {
            let topic = if i == 2 { &b } else { &a };
            message(
                10 + i,
                topic,
                Some(&format!("k{i}")),
                format!("m{i}").into_bytes(),
            )
        })
        .collect();
    let outcomes = publisher.publish(&batch).await;
    match others_went_through(&h, &batch, &outcomes, 2).await {
        PublishOutcome::Rejected { reason } => {
            assert!(
                reason.contains(&b) && reason.contains("does not exist"),
                "{reason}"
            )
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    // back again: the cached "exists" was forgotten, so it is checked anew
    declare_bound_exchange(&h, &b).await;
    let again = [
        message(20, &a, None, &b"a"[..]),
        message(21, &b, None, &b"b"[..]),
    ];
    assert_eq!(
        publisher.publish(&again).await,
        [PublishOutcome::Ok, PublishOutcome::Ok]
    );
    arrive(&h, &again).await;
    for x in [&a, &b] {
        h.channel
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .unwrap();
    }
}

/// A body over the broker's `max_message_size` (128 MiB on RabbitMQ 3.8 to
/// 3.13, 16 MiB on 4.x) makes it close the channel (406) under the whole
/// batch: the batch-mates go again one at a time and are `Ok`, the big one
/// is `Rejected` with the broker's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_max_message_size_is_rejected_alone() {
    let h = harness().await;
    let big = vec![0u8; 128 * 1024 * 1024 + 1];
    let batch: Vec<Message> = (0..5)
        .map(|i| {
            let payload = if i == 2 {
                big.clone()
            } else {
                format!("m{i}").into_bytes()
            };
            message(i, &h.queue(), Some(&format!("k{i}")), payload)
        })
        .collect();
    let outcomes = h.publisher.publish(&batch).await;
    match others_went_through(&h, &batch, &outcomes, 2).await {
        PublishOutcome::Rejected { reason } => {
            assert!(
                reason.contains("406") && reason.contains("larger than configured max size"),
                "{reason}"
            )
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    // the publisher goes on as before
    let after = message(9, &h.queue(), None, &b"after"[..]);
    assert_eq!(
        h.publisher.publish(std::slice::from_ref(&after)).await,
        [PublishOutcome::Ok]
    );
}
