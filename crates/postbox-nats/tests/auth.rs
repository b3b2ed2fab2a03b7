//! Credentials in the URL reach the server: user and password
//! (percent-decoded) and a token, each against a `nats-server` of the
//! test's own that requires them; a wrong password fails clearly without
//! showing it.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{OwnNatsServer, suffix};
use postbox_core::{PublishOutcome, Publisher};
use postbox_nats::{NatsConfig, NatsError, NatsPublisher, StreamSpec};
use postbox_testkit::publisher_suite::message;

fn config(url: &str) -> NatsConfig {
    let s = suffix();
    NatsConfig::from_url(url)
        .unwrap()
        .ack_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(3))
        .create_stream(StreamSpec::new(
            format!("POSTBOX_AUTH_{s}"),
            ["postbox.auth.>"],
        ))
}

async fn assert_publishes(url: &str) {
    let publisher = NatsPublisher::connect(config(url)).await.unwrap();
    let outcomes = publisher
        .publish(&[message(1, "postbox.auth.created", None, &b"x"[..])])
        .await;
    assert_eq!(outcomes, vec![PublishOutcome::Ok]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_from_the_url_are_sent() {
    // characters a URL must percent-encode: the server gets them decoded
    let server = OwnNatsServer::start(&["--user", "post box", "--pass", "s3cr/t@:x%"]).await;
    assert_publishes(&format!(
        "nats://post%20box:s3cr%2Ft%40%3Ax%25@{}",
        server.addr()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_the_url_is_sent() {
    let server = OwnNatsServer::start(&["--auth", "t0ken-of-postbox"]).await;
    assert_publishes(&format!("nats://t0ken-of-postbox@{}", server.addr())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_clearly_without_showing_it() {
    let server = OwnNatsServer::start(&["--user", "postbox", "--pass", "right-one"]).await;
    let url = format!("nats://postbox:wr0ng-pa55@{}", server.addr());
    match NatsPublisher::connect(config(&url)).await {
        Err(e @ NatsError::Connect { .. }) => {
            let e = e.to_string();
            assert!(
                e.contains("authorization violation") && e.contains(&server.addr()),
                "{e}"
            );
            assert!(!e.contains("wr0ng-pa55"), "{e}");
        }
        other => panic!("connected with a wrong password: {other:?}"),
    }
    // the relay's constructor does not wait: publishing is Transient and
    // says why, still without the password
    let publisher = NatsPublisher::new(config(&url)).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let outcomes = publisher
            .publish(&[message(1, "postbox.auth.created", None, &b"x"[..])])
            .await;
        let [PublishOutcome::Transient { reason, .. }] = &outcomes[..] else {
            panic!("expected Transient, got {outcomes:?}");
        };
        assert!(!reason.contains("wr0ng-pa55"), "{reason}");
        if reason.contains("authorization violation") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reason never named the authorization violation: {reason}"
        );
    }
    assert!(!format!("{publisher:?}").contains("wr0ng-pa55"));
}
