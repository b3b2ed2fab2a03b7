//! Publishes 100k small messages in batches of 100 through `NatsPublisher`,
//! then the same with the raw async-nats client pipelined the same way, and
//! prints both rates. Needs NATS with JetStream on 127.0.0.1:4222
//! (`POSTBOX_TEST_NATS_ADDR`). `cargo run --release -p postbox-nats --example nats_throughput`
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::Instant;

use async_nats::jetstream;
use postbox_core::Publisher;
use postbox_nats::{NatsConfig, NatsPublisher};
use postbox_testkit::publisher_suite::message;

const TOTAL: usize = 100_000;
const BATCH: usize = 100;

#[tokio::main]
async fn main() {
    let addr = std::env::var("POSTBOX_TEST_NATS_ADDR").unwrap_or_else(|_| "127.0.0.1:4222".into());
    let suffix = format!("{:016x}", fastrand::u64(..));
    let name = format!("POSTBOX_BENCH_{suffix}");
    let js = jetstream::new(async_nats::connect(addr.as_str()).await.unwrap());
    js.create_stream(jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("postbox.bench.{suffix}.>")],
        ..Default::default()
    })
    .await
    .unwrap();
    let topic = format!("postbox.bench.{suffix}.events");
    let payload = vec![b'x'; 100];
    let messages: Vec<_> = (0..TOTAL)
        .map(|i| message(i as i64, &topic, None, payload.clone()))
        .collect();

    let publisher =
        NatsPublisher::connect(NatsConfig::from_url(&format!("nats://{addr}")).unwrap())
            .await
            .unwrap();
    let started = Instant::now();
    for batch in messages.chunks(BATCH) {
        let outcomes = publisher.publish(batch).await;
        assert!(outcomes.iter().all(|o| o.is_ok()), "{outcomes:?}");
    }
    let ours = TOTAL as f64 / started.elapsed().as_secs_f64();

    // raw: the same headers, pipelined per batch, acks awaited together
    let started = Instant::now();
    for batch in messages.chunks(BATCH) {
        let mut acks = Vec::with_capacity(batch.len());
        for m in batch {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("raw-{}", m.id).as_str());
            acks.push(
                js.publish_with_headers(topic.clone(), headers, m.payload.clone())
                    .await
                    .unwrap(),
            );
        }
        for ack in futures_util::future::join_all(
            acks.into_iter().map(std::future::IntoFuture::into_future),
        )
        .await
        {
            ack.unwrap();
        }
    }
    let raw = TOTAL as f64 / started.elapsed().as_secs_f64();
    js.delete_stream(&name).await.unwrap();
    println!(
        "NATS JetStream, {TOTAL} messages of 100 bytes in batches of {BATCH}: postbox-nats {ours:.0} msg/s, raw async-nats {raw:.0} msg/s, ratio {:.2}",
        ours / raw
    );
}
