//! Publishes 100k small messages in batches of 100 through
//! `RabbitMqPublisher`, then the same with the raw lapin client pipelined the
//! same way (confirm mode, persistent, mandatory), and prints both rates.
//! Needs RabbitMQ on 127.0.0.1:5672 (`POSTBOX_TEST_AMQP_ADDR`).
//! `cargo run --release -p postbox-rabbitmq --example rabbitmq_throughput`
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::Instant;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use postbox_core::Publisher;
use postbox_rabbitmq::{RabbitMqConfig, RabbitMqPublisher};
use postbox_testkit::publisher_suite::message;

const TOTAL: usize = 100_000;
const BATCH: usize = 100;

#[tokio::main]
async fn main() {
    let addr = std::env::var("POSTBOX_TEST_AMQP_ADDR").unwrap_or_else(|_| "127.0.0.1:5672".into());
    let url = format!("amqp://guest:guest@{addr}/%2f");
    let queue = format!("postbox.bench.{:016x}", fastrand::u64(..));
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    // durable, so persistent messages are written to disk as in production
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let payload = vec![b'x'; 100];
    let messages: Vec<_> = (0..TOTAL)
        .map(|i| message(i as i64, &queue, None, payload.clone()))
        .collect();

    let publisher = RabbitMqPublisher::connect(RabbitMqConfig::from_url(&url).unwrap())
        .await
        .unwrap();
    let started = Instant::now();
    for batch in messages.chunks(BATCH) {
        let outcomes = publisher.publish(batch).await;
        assert!(outcomes.iter().all(|o| o.is_ok()), "{outcomes:?}");
    }
    let ours = TOTAL as f64 / started.elapsed().as_secs_f64();

    let raw_channel = conn.create_channel().await.unwrap();
    raw_channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let started = Instant::now();
    for batch in messages.chunks(BATCH) {
        let mut confirms = Vec::with_capacity(batch.len());
        for m in batch {
            let props = BasicProperties::default()
                .with_message_id(m.id.to_string().into())
                .with_delivery_mode(2);
            confirms.push(
                raw_channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        &m.payload,
                        props,
                    )
                    .await
                    .unwrap(),
            );
        }
        for c in futures_util::future::join_all(confirms).await {
            assert!(c.unwrap().is_ack());
        }
    }
    let raw = TOTAL as f64 / started.elapsed().as_secs_f64();
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    println!(
        "RabbitMQ, {TOTAL} persistent messages of 100 bytes in batches of {BATCH}: postbox-rabbitmq {ours:.0} msg/s, raw lapin {raw:.0} msg/s, ratio {:.2}",
        ours / raw
    );
}
