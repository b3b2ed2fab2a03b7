//! A per-test stream key and XRANGE as the consumer.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::time::Duration;

use postbox_core::Headers;
use postbox_redis::{RedisConfig, RedisPublisher};
use postbox_testkit::{LargePayload, PublisherHarness, Received};
use redis::aio::MultiplexedConnection;

pub struct RedisHarness {
    pub suffix: String,
    pub addr: String,
    pub conn: MultiplexedConnection,
    pub publisher: RedisPublisher,
}

pub fn suffix() -> String {
    format!("{:016x}", fastrand::u64(..))
}

pub fn config(addr: &str) -> RedisConfig {
    RedisConfig::from_url(&format!("redis://{addr}"))
        .unwrap()
        .response_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2))
}

pub async fn harness() -> RedisHarness {
    let addr = postbox_testkit::services::REDIS.require().await;
    let client = redis::Client::open(format!("redis://{addr}")).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    RedisHarness {
        suffix: suffix(),
        publisher: RedisPublisher::connect(config(&addr)).await.unwrap(),
        addr,
        conn,
    }
}

/// One field of an entry: name, value.
type Field = (String, Vec<u8>);

/// One stream entry, field by field.
pub type Entry = HashMap<String, Vec<u8>>;

impl RedisHarness {
    pub fn stream(&self) -> String {
        format!("postbox:test:{}", self.suffix)
    }

    /// Every entry of `key`, oldest first.
    pub async fn entries(&self, key: &str) -> Vec<Entry> {
        let mut conn = self.conn.clone();
        let reply: Vec<(String, Vec<Field>)> = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        reply
            .into_iter()
            .map(|(_, fields)| fields.into_iter().collect())
            .collect()
    }

    pub async fn read(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let entries = self.entries(&self.stream()).await;
            if entries.len() >= n || tokio::time::Instant::now() >= deadline {
                return entries.into_iter().take(n).map(received).collect();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub fn received(e: Entry) -> Received {
    let text = |f: &str| e.get(f).map(|v| String::from_utf8(v.clone()).unwrap());
    let headers: Headers = serde_json::from_slice(&e["headers"]).unwrap();
    Received {
        id: text("id").and_then(|s| s.parse().ok()),
        key: text("key"),
        headers,
        payload: e["payload"].clone().into(),
    }
}

impl PublisherHarness for RedisHarness {
    type Publisher = RedisPublisher;

    fn publisher(&self) -> RedisPublisher {
        self.publisher.clone()
    }

    fn unreachable_publisher(&self) -> RedisPublisher {
        RedisPublisher::new(config("127.0.0.1:1")).unwrap()
    }

    fn topic(&self) -> String {
        // the default stream template is "{topic}"
        self.stream()
    }

    async fn receive(&self, n: usize, timeout: Duration) -> Vec<Received> {
        self.read(n, timeout).await
    }

    fn large_payload(&self) -> LargePayload {
        // a bulk string may be 512 MB
        LargePayload::Delivered
    }
}

impl Drop for RedisHarness {
    fn drop(&mut self) {
        // best effort: delete the test stream without blocking the runtime
        let mut conn = self.conn.clone();
        let key = self.stream();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _: Result<i64, _> = redis::cmd("DEL").arg(key).query_async(&mut conn).await;
            });
        }
    }
}
