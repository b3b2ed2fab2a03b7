//! Publishers for tests: one that records what it delivered, with scriptable
//! faults (fail N times, reject, hang past the send timeout, fail one key).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use postbox_core::{Message, PublishOutcome, Publisher};
use tokio::time::Instant;

/// What the [`TestPublisher`] does with one message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Behaviour {
    /// Deliver it (record it) and report `Ok`.
    Deliver,
    /// Report `Transient` with this reason; nothing is recorded.
    Transient(String),
    /// Report `Rejected` with this reason; nothing is recorded.
    Reject(String),
    /// Report `Transient` with the reason `"throttled"` and this wait hint
    /// (as an HTTP `429` with `Retry-After`); nothing is recorded.
    Throttled(Duration),
    /// Never answer for the whole batch (the relay's send timeout fires).
    Hang,
    /// Deliver it, answering for the whole batch only after this long (a
    /// slow broker; the batch waits for its slowest message).
    Slow(Duration),
    /// Deliver it after this long, one such message after the other in
    /// batch order (a webhook at concurrency 1), honouring the deadline of
    /// [`Publisher::publish_until`]: a message whose turn comes at or after
    /// the deadline is `NotSent`, one the deadline cuts short is
    /// `Transient` and not recorded.
    Paced(Duration),
}

type Rule = dyn Fn(&Message) -> Behaviour + Send + Sync;

/// A publisher that records every message it delivers and can be scripted to
/// fail.
///
/// ```
/// use postbox_testkit::{Behaviour, TestPublisher};
///
/// // fails every message's first two attempts, then delivers
/// let p = TestPublisher::new(|m| if m.attempt <= 2 {
///     Behaviour::Transient("broker down".into())
/// } else {
///     Behaviour::Deliver
/// });
/// assert!(p.delivered().is_empty());
/// ```
#[derive(Clone)]
pub struct TestPublisher {
    rule: Arc<Rule>,
    log: Arc<Mutex<Log>>,
}

#[derive(Debug, Default)]
struct Log {
    delivered: Vec<Message>,
    calls: u64,
    attempts: u64,
}

impl std::fmt::Debug for TestPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPublisher").finish_non_exhaustive()
    }
}

impl Default for TestPublisher {
    fn default() -> Self {
        Self::recording()
    }
}

impl TestPublisher {
    /// Delivers everything.
    pub fn recording() -> Self {
        Self::new(|_| Behaviour::Deliver)
    }

    /// Decides per message with `rule`.
    pub fn new(rule: impl Fn(&Message) -> Behaviour + Send + Sync + 'static) -> Self {
        Self {
            rule: Arc::new(rule),
            log: Arc::default(),
        }
    }

    /// Fails each message's first `n` attempts transiently.
    pub fn fail_first(n: u32) -> Self {
        Self::new(move |m| {
            if m.attempt <= n {
                Behaviour::Transient(format!("injected failure {} of {n}", m.attempt))
            } else {
                Behaviour::Deliver
            }
        })
    }

    /// Rejects every message of `key`.
    pub fn reject_key(key: &str) -> Self {
        let key = key.to_owned();
        Self::new(move |m| {
            if m.key.as_deref() == Some(key.as_str()) {
                Behaviour::Reject(format!("key {key} rejected on purpose"))
            } else {
                Behaviour::Deliver
            }
        })
    }

    /// Fails every message of `key` transiently, forever.
    pub fn fail_key(key: &str) -> Self {
        let key = key.to_owned();
        Self::new(move |m| {
            if m.key.as_deref() == Some(key.as_str()) {
                Behaviour::Transient(format!("key {key} failing on purpose"))
            } else {
                Behaviour::Deliver
            }
        })
    }

    /// Never answers.
    pub fn hanging() -> Self {
        Self::new(|_| Behaviour::Hang)
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Messages delivered so far, in delivery order (redeliveries included).
    pub fn delivered(&self) -> Vec<Message> {
        self.log().delivered.clone()
    }

    /// Waits until at least `n` messages were delivered, looking every
    /// 10 ms of tokio time (paused time advances), for at most `within`;
    /// gives what was delivered by then, fewer than `n` if time ran out.
    pub async fn delivered_within(&self, n: usize, within: Duration) -> Vec<Message> {
        let _ = tokio::time::timeout(within, async {
            while self.log().delivered.len() < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        self.delivered()
    }

    /// Number of `publish` calls.
    pub fn calls(&self) -> u64 {
        self.log().calls
    }

    /// Number of messages handed to `publish`, whatever their outcome.
    pub fn attempts(&self) -> u64 {
        self.log().attempts
    }
}

impl Publisher for TestPublisher {
    async fn publish(&self, batch: &[Message]) -> Vec<PublishOutcome> {
        self.publish_scripted(batch, None).await
    }

    async fn publish_until(&self, batch: &[Message], deadline: Instant) -> Vec<PublishOutcome> {
        self.publish_scripted(batch, Some(deadline)).await
    }
}

impl TestPublisher {
    async fn publish_scripted(
        &self,
        batch: &[Message],
        deadline: Option<Instant>,
    ) -> Vec<PublishOutcome> {
        let decisions: Vec<Behaviour> = batch.iter().map(|m| (self.rule)(m)).collect();
        {
            let mut log = self.log();
            log.calls += 1;
            log.attempts += batch.len() as u64;
        }
        if decisions.contains(&Behaviour::Hang) {
            std::future::pending::<()>().await;
        }
        let slowest = decisions
            .iter()
            .filter_map(|d| match d {
                Behaviour::Slow(t) => Some(*t),
                _ => None,
            })
            .max();
        if let Some(t) = slowest {
            tokio::time::sleep(t).await;
        }
        // paced messages, one after the other until the deadline
        let mut paced: HashMap<usize, PublishOutcome> = HashMap::new();
        for (i, d) in decisions.iter().enumerate() {
            let Behaviour::Paced(t) = d else { continue };
            let now = Instant::now();
            let outcome = match deadline {
                Some(end) if now >= end => PublishOutcome::NotSent,
                Some(end) if now + *t > end => {
                    tokio::time::sleep_until(end).await;
                    PublishOutcome::transient("cut short by the deadline")
                }
                _ => {
                    tokio::time::sleep(*t).await;
                    self.log().delivered.push(batch[i].clone());
                    PublishOutcome::Ok
                }
            };
            paced.insert(i, outcome);
        }
        let mut log = self.log();
        batch
            .iter()
            .zip(decisions)
            .enumerate()
            .map(|(i, (m, d))| match d {
                Behaviour::Paced(_) => paced
                    .remove(&i)
                    .unwrap_or_else(|| PublishOutcome::transient("internal: no paced outcome")),
                Behaviour::Deliver | Behaviour::Slow(_) => {
                    log.delivered.push(m.clone());
                    PublishOutcome::Ok
                }
                Behaviour::Transient(r) => PublishOutcome::transient(r),
                Behaviour::Reject(r) => PublishOutcome::rejected(r),
                Behaviour::Throttled(wait) => PublishOutcome::Transient {
                    reason: "throttled".to_owned(),
                    retry_after: Some(wait),
                },
                Behaviour::Hang => PublishOutcome::transient("hang"),
            })
            .collect()
    }
}

/// Checks delivered messages against the per-key promise: for each key, the
/// first deliveries of its messages come in strictly increasing `seq` order.
/// Redeliveries (same id again) are allowed anywhere. Returns a description of
/// each violation.
pub fn key_order_violations(delivered: &[Message]) -> Vec<String> {
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for m in delivered {
        if !seen.insert(m.id) {
            continue;
        }
        let Some(k) = m.key.as_deref() else { continue };
        if let Some(prev) = last.get(k)
            && *prev >= m.seq
        {
            out.push(format!("key {k}: seq {} delivered after seq {prev}", m.seq));
        }
        last.insert(k, m.seq);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::SystemTime;

    fn msg(seq: i64, key: Option<&str>) -> Message {
        Message::new(
            uuid::Uuid::now_v7(),
            seq,
            "t".into(),
            key.map(str::to_owned),
            Bytes::new(),
            Default::default(),
            None,
            1,
            None,
            SystemTime::now(),
        )
    }

    #[test]
    fn order_checker_finds_inversions_and_ignores_redeliveries() {
        let a1 = msg(1, Some("a"));
        let a2 = msg(2, Some("a"));
        let b3 = msg(3, Some("b"));
        assert!(key_order_violations(&[a1.clone(), b3.clone(), a2.clone(), a1.clone()]).is_empty());
        assert_eq!(key_order_violations(&[a2, b3, a1]).len(), 1);
    }
}
