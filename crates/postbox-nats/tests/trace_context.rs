//! With the `opentelemetry` feature, a consumer continues the producer's
//! trace: enqueue captures the current W3C context into the headers, the
//! relay publishes them, and JetStream hands them to the consumer.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::harness;
use opentelemetry::Context;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use postbox_core::{NewMessage, Relay, trace_context};
use postbox_sqlite::SqliteStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producers_trace_context_reaches_the_consumer() {
    let h = harness().await;
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::connect(&format!("sqlite://{}/outbox.db", dir.path().display()))
        .await
        .unwrap();
    postbox_sqlite::migrate(store.pool()).await.unwrap();

    let trace = TraceId::from(fastrand::u128(1..));
    let span = SpanId::from(fastrand::u64(1..));
    {
        // the producer's request span, as an OpenTelemetry-instrumented
        // service would have it current while it enqueues
        let _current = Context::new()
            .with_remote_span_context(SpanContext::new(
                trace,
                span,
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            ))
            .attach();
        let mut tx = store.pool().begin().await.unwrap();
        postbox_sqlite::enqueue(
            &mut *tx,
            &NewMessage::new(h.topic_name(), "traced").key("k"),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    // outside any trace: no header invented
    postbox_sqlite::enqueue(store.pool(), &NewMessage::new(h.topic_name(), "untraced"))
        .await
        .unwrap();

    let relay = Relay::builder(store, h.publisher.clone()).build().unwrap();
    let report = relay.tick().await.unwrap();
    assert_eq!(report.sent, 2, "{report:?}");

    let got = h.read(2, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 2);
    let traced = got.iter().find(|m| &m.payload[..] == b"traced").unwrap();
    let expected = format!("00-{trace}-{span}-01");
    assert_eq!(
        traced.headers.get(trace_context::TRACEPARENT),
        Some(&expected),
        "headers at the consumer: {:?}",
        traced.headers
    );
    let continued = trace_context::extract(&traced.headers);
    assert_eq!(continued.span().span_context().trace_id(), trace);
    let untraced = got.iter().find(|m| &m.payload[..] == b"untraced").unwrap();
    assert!(
        !untraced.headers.contains_key(trace_context::TRACEPARENT),
        "{:?}",
        untraced.headers
    );
}
