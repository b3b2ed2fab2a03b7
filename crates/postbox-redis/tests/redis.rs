//! Redis-specific behaviour: entry layout, trimming, WRONGTYPE, WAIT,
//! faults on the wire.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{RedisHarness, config, harness};
use postbox_core::{PublishOutcome, Publisher};
use postbox_redis::{RedisConfig, RedisPublisher};
use postbox_testkit::FaultProxy;
use postbox_testkit::publisher_suite::message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_carry_id_topic_key_headers_and_payload() {
    let h = harness().await;
    let mut keyed = message(1, &h.stream(), Some("order-1"), &b"\x00\xffbin"[..]);
    keyed
        .headers
        .insert("traceparent".into(), "00-abc-01".into());
    let keyless = message(2, &h.stream(), None, &b"plain"[..]);
    let outcomes = h.publisher.publish(&[keyed.clone(), keyless.clone()]).await;
    assert_eq!(outcomes, vec![PublishOutcome::Ok; 2]);
    let entries = h.entries(&h.stream()).await;
    assert_eq!(entries.len(), 2);
    let e = &entries[0];
    assert_eq!(e["id"], keyed.id.to_string().into_bytes());
    assert_eq!(e["topic"], h.stream().into_bytes());
    assert_eq!(e["key"], b"order-1".to_vec());
    assert_eq!(e["headers"], br#"{"traceparent":"00-abc-01"}"#.to_vec());
    assert_eq!(e["payload"], b"\x00\xffbin".to_vec());
    let e = &entries[1];
    assert!(!e.contains_key("key"), "a keyless entry has no key field");
    assert_eq!(e["headers"], b"{}".to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maxlen_trims_approximately() {
    let h = harness().await;
    let publisher = RedisPublisher::new(config(&h.addr).maxlen(10)).unwrap();
    for round in 0..10 {
        let batch: Vec<_> = (0..100)
            .map(|i| message(round * 100 + i, &h.stream(), None, &b"x"[..]))
            .collect();
        assert!(
            publisher
                .publish(&batch)
                .await
                .iter()
                .all(PublishOutcome::is_ok)
        );
    }
    let len = h.entries(&h.stream()).await.len();
    // `~` trims whole nodes (100 entries by default): never below 10, far
    // below the 1000 written
    assert!((10..1000).contains(&len), "stream length {len}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_is_not_a_stream_is_rejected_alone() {
    let h = harness().await;
    let other = format!("{}:string", h.stream());
    let mut conn = h.conn.clone();
    let _: () = redis::cmd("SET")
        .arg(&other)
        .arg("v")
        .arg("EX")
        .arg(600)
        .query_async(&mut conn)
        .await
        .unwrap();
    let bad = message(1, &other, None, &b"x"[..]);
    let good = message(2, &h.stream(), None, &b"y"[..]);
    let outcomes = h.publisher.publish(&[bad, good]).await;
    match &outcomes[0] {
        PublishOutcome::Rejected { reason } => assert!(reason.contains("WRONGTYPE"), "{reason}"),
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert_eq!(outcomes[1], PublishOutcome::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_replicas_make_the_batch_transient() {
    let h = harness().await;
    // the test server has no replicas
    let publisher =
        RedisPublisher::new(config(&h.addr).wait_replicas(1, Duration::from_millis(50))).unwrap();
    let outcomes = publisher
        .publish(&[message(1, &h.stream(), None, &b"x"[..])])
        .await;
    match &outcomes[0] {
        PublishOutcome::Transient { reason, .. } => assert!(reason.contains("WAIT"), "{reason}"),
        other => panic!("expected Transient, got {other:?}"),
    }
    // zero replicas asked: WAIT returns at once and the batch is Ok
    let publisher =
        RedisPublisher::new(config(&h.addr).wait_replicas(0, Duration::from_millis(50))).unwrap();
    let outcomes = publisher
        .publish(&[message(2, &h.stream(), None, &b"y"[..])])
        .await;
    assert_eq!(outcomes, vec![PublishOutcome::Ok]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_the_connection_breaks() {
    let h = harness().await;
    let proxy = FaultProxy::start(h.addr.clone()).await.unwrap();
    let publisher = RedisPublisher::connect(config(&proxy.addr().to_string()))
        .await
        .unwrap();
    let report = postbox_testkit::connection_loss_scenario(&proxy, &publisher, &h.stream()).await;
    assert_all_stored(&h, &report).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_while_redis_is_down_and_recovers() {
    let h = harness().await;
    let proxy = FaultProxy::start(h.addr.clone()).await.unwrap();
    proxy.blackhole(true);
    let publisher = RedisPublisher::new(config(&proxy.addr().to_string())).unwrap();
    let m = message(1, &h.stream(), None, &b"late"[..]);
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
async fn connect_fails_clearly_without_the_password() {
    let err = RedisPublisher::connect(
        RedisConfig::from_url("redis://:s3cret@127.0.0.1:1")
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

async fn assert_all_stored(h: &RedisHarness, report: &postbox_testkit::LossReport) {
    let got = h.read(usize::MAX, Duration::ZERO).await;
    let ids: std::collections::HashSet<_> = got.iter().filter_map(|r| r.id).collect();
    for m in &report.ok {
        assert!(ids.contains(&m.id), "acknowledged message {} lost", m.id);
    }
}

/// A connection whose peer goes silent (no reset, no reply: a crashed host,
/// a dropped NAT entry) is given up after one response timeout, and the
/// next batch goes out on a new connection. Fails if the publisher keeps
/// writing into the silent one: every later batch `Transient`, for as long
/// as the kernel keeps the socket (many minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gone_silent_is_replaced() {
    let h = harness().await;
    let proxy = FaultProxy::start(h.addr.clone()).await.unwrap();
    let publisher = RedisPublisher::connect(
        config(&proxy.addr().to_string()).response_timeout(Duration::from_millis(500)),
    )
    .await
    .unwrap();
    let m = |n| message(n, &h.stream(), None, &b"x"[..]);
    assert_eq!(publisher.publish(&[m(1)]).await, [PublishOutcome::Ok]);
    proxy.silence_open();
    let outcomes = publisher.publish(&[m(2)]).await;
    assert!(
        matches!(outcomes[..], [PublishOutcome::Transient { .. }]),
        "{outcomes:?}"
    );
    assert_eq!(publisher.publish(&[m(3)]).await, [PublishOutcome::Ok]);
}

/// The relay's deadline bounds the round trip: a batch the deadline cuts
/// is `Transient`, one whose deadline has passed before it is sent is
/// `NotSent`; the connection that gave no reply by the deadline is given
/// up. Fails (after 60 s) if the deadline is ignored or the silent
/// connection kept: the response timeout here is two minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_bounds_a_batch() {
    let h = harness().await;
    let proxy = FaultProxy::start(h.addr.clone()).await.unwrap();
    let publisher = RedisPublisher::connect(
        config(&proxy.addr().to_string()).response_timeout(Duration::from_secs(120)),
    )
    .await
    .unwrap();
    let m = message(1, &h.stream(), None, &b"x"[..]);
    let outcomes = publisher
        .publish_until(std::slice::from_ref(&m), tokio::time::Instant::now())
        .await;
    assert_eq!(outcomes, [PublishOutcome::NotSent]);
    proxy.silence_open();
    let cut = publisher.publish_until(
        std::slice::from_ref(&m),
        tokio::time::Instant::now() + Duration::from_millis(300),
    );
    let outcomes = tokio::time::timeout(Duration::from_secs(60), cut)
        .await
        .expect("the deadline was ignored");
    assert!(
        matches!(outcomes[..], [PublishOutcome::Transient { .. }]),
        "{outcomes:?}"
    );
    // the connection that gave no reply by the deadline was given up
    let next = tokio::time::timeout(Duration::from_secs(60), publisher.publish(&[m]))
        .await
        .expect("the silent connection was kept");
    assert_eq!(next, [PublishOutcome::Ok]);
}

/// An ACL that forbids `XADD` is `Transient`, not `Rejected`: an operator
/// fixes the ACL and the messages go out without a replay. Fails if
/// `NOPERM` dead-letters the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidding_acl_is_transient() {
    let h = harness().await;
    let user = format!("postbox_noperm_{}", h.suffix);
    let mut conn = h.conn.clone();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(">pw")
        // connecting only (PING, HELLO, CLIENT): XADD is refused, and a
        // user left behind by a failed run can do nothing
        .arg("+@connection")
        .query_async(&mut conn)
        .await
        .unwrap();
    let publisher = RedisPublisher::connect(
        RedisConfig::from_url(&format!("redis://{user}:pw@{}", h.addr)).unwrap(),
    )
    .await
    .unwrap();
    let outcomes = publisher
        .publish(&[message(1, &h.stream(), None, &b"x"[..])])
        .await;
    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        matches!(&outcomes[..], [PublishOutcome::Transient { reason, .. }] if reason.contains("no permissions")),
        "{outcomes:?}"
    );
}
