//! Publishes 100k small messages in batches of 100 through `RedisPublisher`,
//! then the same with a raw redis-rs pipeline of the same XADDs, and prints
//! both rates. Needs Redis on 127.0.0.1:6379 (`POSTBOX_TEST_REDIS_ADDR`).
//! `cargo run --release -p postbox-redis --example redis_throughput`
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::Instant;

use postbox_core::Publisher;
use postbox_redis::{RedisConfig, RedisPublisher};
use postbox_testkit::publisher_suite::message;

const TOTAL: usize = 100_000;
const BATCH: usize = 100;

#[tokio::main]
async fn main() {
    let addr = std::env::var("POSTBOX_TEST_REDIS_ADDR").unwrap_or_else(|_| "127.0.0.1:6379".into());
    let url = format!("redis://{addr}");
    let key = format!("postbox:bench:{:016x}", fastrand::u64(..));
    let raw_key = format!("{key}:raw");
    let payload = vec![b'x'; 100];
    let messages: Vec<_> = (0..TOTAL)
        .map(|i| message(i as i64, &key, None, payload.clone()))
        .collect();

    let publisher = RedisPublisher::connect(RedisConfig::from_url(&url).unwrap())
        .await
        .unwrap();
    let started = Instant::now();
    for batch in messages.chunks(BATCH) {
        let outcomes = publisher.publish(batch).await;
        assert!(outcomes.iter().all(|o| o.is_ok()), "{outcomes:?}");
    }
    let ours = TOTAL as f64 / started.elapsed().as_secs_f64();

    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let started = Instant::now();
    for batch in messages.chunks(BATCH) {
        let mut pipe = redis::pipe();
        for m in batch {
            pipe.cmd("XADD")
                .arg(&raw_key)
                .arg("*")
                .arg("id")
                .arg(m.id.to_string())
                .arg("topic")
                .arg(&m.topic)
                .arg("headers")
                .arg("{}")
                .arg("payload")
                .arg(&m.payload[..]);
        }
        let _: Vec<String> = pipe.query_async(&mut conn).await.unwrap();
    }
    let raw = TOTAL as f64 / started.elapsed().as_secs_f64();
    let _: i64 = redis::cmd("DEL")
        .arg(&key)
        .arg(&raw_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    println!(
        "Redis Streams, {TOTAL} messages of 100 bytes in batches of {BATCH}: postbox-redis {ours:.0} msg/s, raw redis-rs pipeline {raw:.0} msg/s, ratio {:.2}",
        ours / raw
    );
}
