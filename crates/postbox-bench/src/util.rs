//! Publishers and helpers shared by the scenarios.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use postbox_core::{Message, PublishOutcome, Publisher};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Progress to stderr, so stdout holds only the JSON lines and the table.
macro_rules! progress {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}
pub(crate) use progress;

/// The null publisher: `Ok` for every message, doing nothing.
pub(crate) struct Null;

impl Publisher for Null {
    async fn publish(&self, batch: &[Message]) -> Vec<PublishOutcome> {
        vec![PublishOutcome::Ok; batch.len()]
    }
}

/// The null publisher, counting, as the PostgreSQL scenarios use it.
pub(crate) type CountingPublisher = Counted<Null>;

/// Wraps a publisher (the null one, or a real broker's): counts the
/// messages it reported `Ok` and fires `done` once `target` of them were.
pub(crate) struct Counted<P> {
    inner: P,
    count: AtomicU64,
    target: u64,
    done: CancellationToken,
}

impl Counted<Null> {
    pub(crate) fn new(target: u64, done: CancellationToken) -> Self {
        Self::wrap(Null, target, done)
    }
}

impl<P> Counted<P> {
    pub(crate) fn wrap(inner: P, target: u64, done: CancellationToken) -> Self {
        Self {
            inner,
            count: AtomicU64::new(0),
            target,
            done,
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl<P: Publisher> Publisher for Counted<P> {
    async fn publish(&self, batch: &[Message]) -> Vec<PublishOutcome> {
        let outcomes = self.inner.publish(batch).await;
        self.counted(outcomes)
    }

    async fn publish_until(
        &self,
        batch: &[Message],
        deadline: tokio::time::Instant,
    ) -> Vec<PublishOutcome> {
        let outcomes = self.inner.publish_until(batch, deadline).await;
        self.counted(outcomes)
    }
}

impl<P> Counted<P> {
    fn counted(&self, outcomes: Vec<PublishOutcome>) -> Vec<PublishOutcome> {
        let n = outcomes.iter().filter(|o| o.is_ok()).count() as u64;
        let total = self.count.fetch_add(n, Ordering::Relaxed) + n;
        if total >= self.target {
            self.done.cancel();
        }
        outcomes
    }
}

/// A null publisher that records when each message id was published.
#[derive(Default)]
pub(crate) struct RecordingPublisher {
    pub(crate) seen: Mutex<Vec<(Uuid, Instant)>>,
}

impl Publisher for RecordingPublisher {
    async fn publish(&self, batch: &[Message]) -> Vec<PublishOutcome> {
        let now = Instant::now();
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.extend(batch.iter().map(|m| (m.id, now)));
        vec![PublishOutcome::Ok; batch.len()]
    }
}

/// What a hand-written consumer gets out of a row: the same columns the
/// relay decodes, headers parsed, so the ceilings do the same decoding work.
#[allow(dead_code)] // fields are read only by the null "publish"
pub(crate) struct RawMessage {
    pub(crate) seq: i64,
    pub(crate) id: Uuid,
    pub(crate) topic: String,
    pub(crate) key: Option<String>,
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: BTreeMap<String, String>,
}

/// The ceilings' null publisher: looks at every message, does nothing.
pub(crate) fn null_publish(batch: &[RawMessage]) -> usize {
    std::hint::black_box(batch.iter().map(|m| m.payload.len()).sum::<usize>());
    batch.len()
}

pub(crate) fn parse_headers(text: &str) -> BTreeMap<String, String> {
    serde_json::from_str(text).unwrap_or_default()
}

/// A ~200-byte JSON payload, like the loaded backlogs'.
pub(crate) fn payload(i: u64) -> Vec<u8> {
    format!(r#"{{"id":{i},"pad":"{}"}}"#, "x".repeat(180)).into_bytes()
}

/// Messages per second.
pub(crate) fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// Milliseconds as a float.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
