//! `tls://` verifies the server's certificate: a server whose certificate
//! no trusted root signed is refused, and the refusal is `Transient`.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use postbox_core::{PublishOutcome, Publisher};
use postbox_nats::{NatsConfig, NatsError, NatsPublisher};
use postbox_testkit::publisher_suite::message;
use postbox_testkit::tls::{TestCa, TlsListener};

/// What a NATS server sends first, in clear text, before the TLS upgrade.
const INFO: &[u8] = b"INFO {\"server_id\":\"postbox-test\",\"version\":\"2.10.0\",\"proto\":1,\"host\":\"127.0.0.1\",\"port\":4222,\"max_payload\":1048576,\"tls_required\":true}\r\n";

fn config(addr: std::net::SocketAddr) -> NatsConfig {
    NatsConfig::from_url(&format!("tls://{addr}"))
        .unwrap()
        .ack_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused() {
    let ca = TestCa::generate();
    let server = TlsListener::start_with_preamble(&ca, INFO.to_vec())
        .await
        .unwrap();

    // the waiting constructor fails, naming the TLS problem
    match NatsPublisher::connect(config(server.addr())).await {
        Err(NatsError::Connect { reason, .. }) => {
            assert!(
                reason.contains("certificate refused") && reason.contains("UnknownIssuer"),
                "{reason}"
            )
        }
        other => panic!("connected to a server with an untrusted certificate: {other:?}"),
    }

    // the relay's constructor does not wait; publishing is Transient
    let publisher = NatsPublisher::new(config(server.addr())).await.unwrap();
    let outcomes = publisher
        .publish(&[message(1, "orders.created", None, &b"x"[..])])
        .await;
    match &outcomes[..] {
        [PublishOutcome::Transient { reason, .. }] => {
            assert!(reason.contains("certificate refused"), "{reason}")
        }
        other => panic!("expected Transient, got {other:?}"),
    }
    assert_eq!(server.handshakes_completed(), 0);
    let failures = server.handshake_failures();
    assert!(
        failures.iter().any(|f| f.contains("alert")),
        "the client should abort the handshake with an alert: {failures:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_ca_file_is_trusted() {
    let ca = TestCa::generate();
    let server = TlsListener::start_with_preamble(&ca, INFO.to_vec())
        .await
        .unwrap();
    let ca_file =
        std::env::temp_dir().join(format!("postbox-nats-ca-{}.pem", uuid::Uuid::new_v4()));
    std::fs::write(&ca_file, ca.ca_pem()).unwrap();
    let publisher = NatsPublisher::new(config(server.addr()).ca_file(&ca_file)).await;
    std::fs::remove_file(&ca_file).unwrap();
    let _publisher = publisher.unwrap();
    // the test server closes after the handshake, so the client never gets
    // further; that the handshake completed shows the CA was trusted
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

/// `ca_file` with a `nats://` URL: TLS is required even though the
/// server does not announce `tls_required` (else the credentials and the
/// messages would go in clear text).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_requires_tls_on_a_nats_url() {
    let ca = TestCa::generate();
    let plain_info = String::from_utf8(INFO.to_vec())
        .unwrap()
        .replace(",\"tls_required\":true", "");
    assert!(!plain_info.contains("tls_required"));
    let server = TlsListener::start_with_preamble(&ca, plain_info.into_bytes())
        .await
        .unwrap();
    let ca_file =
        std::env::temp_dir().join(format!("postbox-nats-ca-{}.pem", uuid::Uuid::new_v4()));
    std::fs::write(&ca_file, ca.ca_pem()).unwrap();
    let url = format!("nats://{}", server.addr());
    let publisher = NatsPublisher::new(
        NatsConfig::from_url(&url)
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .ca_file(&ca_file),
    )
    .await;
    std::fs::remove_file(&ca_file).unwrap();
    let _publisher = publisher.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.handshakes_completed() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no TLS handshake: the client did not require TLS ({:?})",
            server.handshake_failures()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_missing_ca_file_is_a_config_error() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let e = rt
        .block_on(NatsPublisher::new(
            NatsConfig::from_url("tls://127.0.0.1:4222")
                .unwrap()
                .ca_file("/nonexistent/ca.pem"),
        ))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ca_file") && e.contains("/nonexistent/ca.pem"),
        "{e}"
    );
}
