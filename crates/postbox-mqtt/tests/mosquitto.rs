//! The MQTT publisher against the real Mosquitto on this machine.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use postbox_core::{Headers, PublishOutcome, Publisher};
use postbox_mqtt::{MqttConfig, MqttError, MqttPublisher};
use postbox_testkit::proxy::FaultProxy;
use postbox_testkit::publisher_suite::message;
use postbox_testkit::services::MQTT;
use postbox_testkit::{LargePayload, PublisherHarness, Received};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn host_port(addr: &str) -> (String, u16) {
    let (h, p) = addr.rsplit_once(':').expect("host:port");
    (h.to_owned(), p.parse().expect("port"))
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", Uuid::new_v4().simple())
}

/// A subscriber on one MQTT topic that records everything it receives.
struct Subscriber {
    got: Arc<Mutex<Vec<Received>>>,
    arrived: Arc<Notify>,
    stop: CancellationToken,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Subscriber {
    async fn start(addr: &str, mqtt_topic: &str) -> Self {
        let (host, port) = host_port(addr);
        let mut opts = MqttOptions::new(unique("postbox-test-sub-"), host, port);
        opts.set_max_packet_size(Some(8 * 1024 * 1024));
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        client
            .subscribe(mqtt_topic.to_owned(), QoS::AtLeastOnce)
            .await
            .unwrap();
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let arrived = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let (g, a, s) = (got.clone(), arrived.clone(), stop.clone());
        tokio::spawn(async move {
            let _client = client; // keep the request channel open
            loop {
                let ev = tokio::select! {
                    () = s.cancelled() => return,
                    ev = eventloop.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let props = p.properties.unwrap_or_default();
                        let headers: Headers = props.user_properties.iter().cloned().collect();
                        g.lock().unwrap().push(Received {
                            id: headers.get("postbox-id").and_then(|v| v.parse().ok()),
                            key: headers.get("postbox-key").cloned(),
                            headers,
                            payload: p.payload,
                        });
                        a.notify_waiters();
                    }
                    Ok(_) => {}
                    Err(e) => panic!("test subscriber lost its connection: {e}"),
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
            .await
            .expect("no SUBACK within 10 s")
            .unwrap();
        Self { got, arrived, stop }
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    async fn wait_ids(&self, ids: &HashSet<Uuid>, timeout: Duration) -> HashSet<Uuid> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.arrived.notified();
            let got: HashSet<Uuid> = self.received().iter().filter_map(|r| r.id).collect();
            if ids.is_subset(&got) || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return got;
            }
        }
    }

    async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.arrived.notified();
            let got = self.received();
            if got.len() >= n || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.received();
            }
        }
    }
}

struct Harness {
    addr: String,
    topic: String,
    sub: Arc<Subscriber>,
}

async fn harness() -> Harness {
    let addr = MQTT.require().await;
    let topic = unique("postbox_test.");
    let sub = Subscriber::start(&addr, &topic.replace('.', "/")).await;
    Harness {
        addr,
        topic,
        sub: Arc::new(sub),
    }
}

fn config(addr: &str) -> MqttConfig {
    let (host, port) = host_port(addr);
    MqttConfig::new(host, port)
}

impl PublisherHarness for Harness {
    type Publisher = MqttPublisher;

    fn publisher(&self) -> MqttPublisher {
        MqttPublisher::new(config(&self.addr)).unwrap()
    }

    fn unreachable_publisher(&self) -> MqttPublisher {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        MqttPublisher::new(MqttConfig::new("127.0.0.1", port)).unwrap()
    }

    fn topic(&self) -> String {
        self.topic.clone()
    }

    fn receive(&self, n: usize, timeout: Duration) -> impl Future<Output = Vec<Received>> + Send {
        let sub = self.sub.clone();
        async move { sub.wait_for(n, timeout).await }
    }

    fn large_payload(&self) -> LargePayload {
        // Mosquitto's default message_size_limit is 0 (no limit below the
        // protocol's 256 MiB); the publisher's own default cap is 16 MiB
        LargePayload::Delivered
    }
}

postbox_testkit::publisher_conformance_tests!(harness);

#[tokio::test]
async fn connect_waits_for_connack_and_fails_naming_the_broker() {
    let h = harness().await;
    MqttPublisher::connect(config(&h.addr)).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = MqttConfig::new("127.0.0.1", port);
    cfg.connect_timeout_secs = 1;
    match MqttPublisher::connect(cfg).await {
        Err(MqttError::Connect { addr, reason }) => {
            assert_eq!(addr, format!("127.0.0.1:{port}"));
            assert!(!reason.is_empty());
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
}

#[tokio::test]
async fn concurrent_batches_each_get_their_own_pubacks() {
    let h = harness().await;
    let p = h.publisher();
    let mut tasks = Vec::new();
    let mut ids = HashSet::new();
    for t in 0..4 {
        let batch: Vec<_> = (0..30)
            .map(|i| message(i, &h.topic, None, format!("{t}-{i}").into_bytes()))
            .collect();
        ids.extend(batch.iter().map(|m| m.id));
        let p = p.clone();
        tasks.push(tokio::spawn(async move { p.publish(&batch).await }));
    }
    for t in tasks {
        let out = t.await.unwrap();
        assert_eq!(out.len(), 30);
        assert!(out.iter().all(PublishOutcome::is_ok), "{out:?}");
    }
    let got = h.sub.wait_for(ids.len(), Duration::from_secs(20)).await;
    let got_ids: HashSet<_> = got.iter().filter_map(|r| r.id).collect();
    assert_eq!(got_ids, ids);
}

#[tokio::test]
async fn topics_that_cannot_be_published_are_rejected() {
    let h = harness().await;
    let p = h.publisher();
    let batch = vec![
        message(1, "a+b", None, &b"x"[..]),
        message(2, &h.topic, None, &b"fine"[..]),
        message(3, "", None, &b"x"[..]),
    ];
    let out = p.publish(&batch).await;
    assert!(matches!(&out[0], PublishOutcome::Rejected { reason } if reason.contains("wildcard")));
    assert!(out[1].is_ok(), "{:?}", out[1]);
    assert!(matches!(&out[2], PublishOutcome::Rejected { .. }));
    let mut cfg = config(&h.addr);
    cfg.max_payload_bytes = 10;
    let small = MqttPublisher::new(cfg).unwrap();
    let out = small
        .publish(&[message(1, &h.topic, None, vec![0u8; 11])])
        .await;
    assert!(
        matches!(&out[0], PublishOutcome::Rejected { reason } if reason.contains("max_payload_bytes"))
    );
}

#[tokio::test]
async fn starts_while_the_broker_is_down_and_publishes_once_it_is_up() {
    let addr = MQTT.require().await;
    let topic = unique("postbox_test.");
    let sub = Subscriber::start(&addr, &topic.replace('.', "/")).await;
    let proxy = FaultProxy::start(addr.clone()).await.unwrap();
    proxy.blackhole(true);
    let mut cfg = config(&proxy.addr().to_string());
    cfg.connect_timeout_secs = 1;
    cfg.ack_timeout_ms = 1500;
    let p = MqttPublisher::new(cfg).unwrap();
    let out = p.publish(&[message(1, &topic, None, &b"early"[..])]).await;
    assert!(
        matches!(out[0], PublishOutcome::Transient { .. }),
        "{out:?}"
    );
    proxy.blackhole(false);
    // the publisher reconnects by itself with backoff
    let m = message(2, &topic, None, &b"later"[..]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = p.publish(std::slice::from_ref(&m)).await;
        if out[0].is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never recovered: {out:?}"
        );
    }
    let got = sub.wait_for(1, Duration::from_secs(20)).await;
    assert!(got.iter().any(|r| r.id == Some(m.id)));
}

#[tokio::test]
async fn a_cut_connection_mid_batch_loses_nothing_reported_ok() {
    let addr = MQTT.require().await;
    let topic = unique("postbox_test.");
    let sub = Subscriber::start(&addr, &topic.replace('.', "/")).await;
    let proxy = FaultProxy::start(addr.clone()).await.unwrap();
    let mut cfg = config(&proxy.addr().to_string());
    cfg.connect_timeout_secs = 2;
    cfg.ack_timeout_ms = 5000;
    let p = MqttPublisher::connect(cfg).await.unwrap();
    // stall so that the batch is written but cannot be acknowledged, then cut
    proxy.stall(true);
    let batch: Vec<_> = (0..50)
        .map(|i| message(i, &topic, Some("k"), Bytes::from(format!("m{i}"))))
        .collect();
    let publishing = tokio::spawn({
        let p = p.clone();
        let batch = batch.clone();
        async move { p.publish(&batch).await }
    });
    tokio::task::yield_now().await;
    proxy.cut();
    proxy.stall(false);
    let out = publishing.await.unwrap();
    assert_eq!(out.len(), batch.len());
    for o in &out {
        assert!(
            matches!(o, PublishOutcome::Ok | PublishOutcome::Transient { .. }),
            "{o:?}"
        );
    }
    // the cut hit messages that were not yet acknowledged
    assert!(
        out.iter().any(|o| !o.is_ok()),
        "the stalled batch was acknowledged through a stalled connection"
    );
    // every message reported Ok really reached the broker
    let ok_ids: HashSet<_> = batch
        .iter()
        .zip(&out)
        .filter(|(_, o)| o.is_ok())
        .map(|(m, _)| m.id)
        .collect();
    let got_ids = sub.wait_ids(&ok_ids, Duration::from_secs(20)).await;
    assert!(ok_ids.is_subset(&got_ids), "a message reported Ok was lost");
    // and the transient ones go through on the retry, after a reconnect
    let retry: Vec<_> = batch
        .iter()
        .zip(&out)
        .filter(|(_, o)| !o.is_ok())
        .map(|(m, _)| m.clone())
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut left = retry;
    while !left.is_empty() {
        let out = p.publish(&left).await;
        left = left
            .into_iter()
            .zip(out)
            .filter(|(_, o)| !o.is_ok())
            .map(|(m, _)| m)
            .collect();
        assert!(
            tokio::time::Instant::now() < deadline,
            "retries never succeeded"
        );
    }
    let all: HashSet<_> = batch.iter().map(|m| m.id).collect();
    let got_ids = sub.wait_ids(&all, Duration::from_secs(20)).await;
    assert!(all.is_subset(&got_ids), "messages missing after retry");
}

/// The relay's deadline bounds the wait for PUBACKs: a batch whose deadline
/// passed before it was queued is `NotSent`, one still unacknowledged at
/// the deadline `Transient`. Fails (after 60 s) if the deadline is ignored:
/// the ack timeout here is two minutes.
#[tokio::test]
async fn the_deadline_bounds_the_wait_for_acks() {
    let addr = MQTT.require().await;
    let topic = unique("postbox_test.");
    let proxy = FaultProxy::start(addr.clone()).await.unwrap();
    let mut cfg = config(&proxy.addr().to_string());
    cfg.ack_timeout_ms = 120_000;
    let p = MqttPublisher::connect(cfg).await.unwrap();
    let m = message(1, &topic, None, &b"x"[..]);
    let out = p
        .publish_until(std::slice::from_ref(&m), tokio::time::Instant::now())
        .await;
    assert_eq!(out, [PublishOutcome::NotSent]);
    proxy.stall(true);
    let cut = p.publish_until(
        std::slice::from_ref(&m),
        tokio::time::Instant::now() + Duration::from_millis(300),
    );
    let out = tokio::time::timeout(Duration::from_secs(60), cut)
        .await
        .expect("the deadline was ignored");
    assert!(
        matches!(&out[..], [PublishOutcome::Transient { reason, .. }] if reason.contains("deadline")),
        "{out:?}"
    );
    proxy.stall(false);
}
