//! `mqtts://` verifies the broker's certificate: a broker whose certificate
//! no trusted root signed is refused, and the refusal is `Transient`.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use postbox_core::{PublishOutcome, Publisher};
use postbox_mqtt::{MqttConfig, MqttPublisher};
use postbox_testkit::publisher_suite::message;
use postbox_testkit::tls::{TestCa, TlsListener};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused() {
    let ca = TestCa::generate();
    let server = TlsListener::start(&ca).await.unwrap();
    let config = MqttConfig::from_url(&format!("mqtts://{}", server.addr()))
        .unwrap()
        .ack_timeout(Duration::from_secs(2));
    assert!(config.tls);

    let err = MqttPublisher::connect(config.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("certificate"), "{err}");

    let publisher = MqttPublisher::new(config).unwrap();
    let outcomes = publisher
        .publish(&[message(1, "orders/created", None, &b"x"[..])])
        .await;
    match &outcomes[..] {
        [PublishOutcome::Transient { reason, .. }] => {
            assert!(reason.contains("certificate"), "{reason}")
        }
        other => panic!("expected Transient, got {other:?}"),
    }
    assert_eq!(server.handshakes_completed(), 0);
    assert!(
        server
            .handshake_failures()
            .iter()
            .any(|f| f.contains("alert")),
        "{:?}",
        server.handshake_failures()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_ca_file_is_trusted() {
    let ca = TestCa::generate();
    let server = TlsListener::start(&ca).await.unwrap();
    let ca_file =
        std::env::temp_dir().join(format!("postbox-mqtt-ca-{}.pem", uuid::Uuid::new_v4()));
    std::fs::write(&ca_file, ca.ca_pem()).unwrap();
    let config = MqttConfig::from_url(&format!("mqtts://{}", server.addr()))
        .unwrap()
        .ca_file(&ca_file);
    let publisher = MqttPublisher::new(config);
    std::fs::remove_file(&ca_file).unwrap();
    let _publisher = publisher.unwrap();
    // the test server closes after the handshake, so MQTT never gets further;
    // that the handshake completed shows the CA was trusted
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while server.handshakes_completed() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no handshake completed: {:?}",
            server.handshake_failures()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_unreadable_ca_file_is_a_config_error() {
    let e = MqttPublisher::new(
        MqttConfig::from_url("mqtts://127.0.0.1:8883")
            .unwrap()
            .ca_file("/nonexistent/ca.pem"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("ca_file") && e.contains("/nonexistent/ca.pem"),
        "{e}"
    );
}
