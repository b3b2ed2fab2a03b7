//! `amqps://` verifies the broker's certificate: a broker whose certificate
//! no trusted root signed is refused, and the refusal is `Transient`.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use postbox_core::{PublishOutcome, Publisher};
use postbox_rabbitmq::{RabbitMqConfig, RabbitMqError, RabbitMqPublisher};
use postbox_testkit::publisher_suite::message;
use postbox_testkit::tls::{TestCa, TlsListener};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused() {
    let ca = TestCa::generate();
    let server = TlsListener::start(&ca).await.unwrap();
    let config = RabbitMqConfig::from_url(&format!("amqps://guest:s3cret@{}/%2f", server.addr()))
        .unwrap()
        .connect_timeout(Duration::from_secs(3));

    match RabbitMqPublisher::connect(config.clone()).await {
        Err(RabbitMqError::Connect { reason, .. }) => {
            assert!(reason.contains("certificate"), "{reason}");
            assert!(!reason.contains("s3cret"), "{reason}");
        }
        other => panic!("connected to a broker with an untrusted certificate: {other:?}"),
    }

    let publisher = RabbitMqPublisher::new(config).unwrap();
    let outcomes = publisher
        .publish(&[message(1, "orders.created", None, &b"x"[..])])
        .await;
    match &outcomes[..] {
        [PublishOutcome::Transient { reason, .. }] => {
            assert!(reason.contains("certificate"), "{reason}")
        }
        other => panic!("expected Transient, got {other:?}"),
    }
    assert_eq!(server.handshakes_completed(), 0);
}
