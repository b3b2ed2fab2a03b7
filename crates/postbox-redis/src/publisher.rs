//! The Redis Streams publisher.

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use postbox_core::{Message, PublishOutcome, Publisher};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;
use tracing::Instrument;

use crate::{RedisConfig, RedisError};

/// Publishes to Redis Streams.
///
/// Each message becomes one entry of the stream [`RedisConfig::stream_key`]
/// with the fields, in this order: `id` (the message id), `topic`, `key`
/// (only for a keyed message: a keyless message has no `key` field),
/// `headers` (a JSON object of strings, `{}` when none) and `payload` (the
/// exact payload bytes). With `maxlen` set, `XADD` trims with `MAXLEN ~`.
/// The whole batch is one pipeline: one write, one round trip, entries in
/// batch order.
///
/// Outcomes: `Ok` when `XADD` returned an entry id (and, with
/// `wait_replicas`, `WAIT` reported enough replicas). `Rejected` when the
/// key holds something that is not a stream (`WRONGTYPE`). `Transient` for
/// everything else: unreachable server, lost connection, no reply within
/// `response_timeout_ms`, `OOM`, `LOADING`, `READONLY`, too few replicas,
/// and an ACL that forbids it (`NOPERM`: an operator can fix that, and the
/// messages then go out without a replay). A pipeline is not atomic: after
/// a lost connection some entries of the batch may exist although their
/// outcome is `Transient`, and the retry adds them again (same `id` field).
///
/// The connection is opened on the first publish and re-opened in the
/// background after it broke (redis-rs `ConnectionManager`, exponential
/// backoff). A connection on which a reply did not come in time is given
/// up for a new one: the manager reconnects only after an error the
/// socket reports, and a peer that went silent (a crashed host, a dropped
/// NAT entry, a failover that moved the address) reports none until the
/// kernel gives up on it, many minutes later. Cheap to clone.
#[derive(Clone)]
pub struct RedisPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    client: redis::Client,
    manager: ConnectionManagerConfig,
    /// The connection in use and its generation (how many were given up).
    conn: std::sync::Mutex<(u64, ConnectionManager)>,
}

impl std::fmt::Debug for RedisPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPublisher")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl RedisPublisher {
    /// Builds the publisher without contacting Redis: it connects on the
    /// first publish, whose messages are `Transient` while Redis is down.
    /// Errors only for a bad configuration. Needs a tokio runtime.
    pub fn new(config: RedisConfig) -> Result<Self, RedisError> {
        config.validate()?;
        let client = redis::Client::open(config.url.as_str()).map_err(|_| {
            RedisError::invalid(
                "url",
                format!("{} is not a valid Redis URL", config.server()),
            )
        })?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
            .set_response_timeout(Some(Duration::from_millis(config.response_timeout_ms)))
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(5))
            // a handful per outage; the next publish starts another round
            .set_number_of_retries(6);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager.clone())
            .map_err(|e| RedisError::invalid("url", format!("{}: {e}", config.server())))?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                client,
                manager,
                conn: std::sync::Mutex::new((0, conn)),
            }),
        })
    }

    /// Like [`RedisPublisher::new`], then checks with a `PING` that Redis
    /// answers, so a wrong address fails at start-up. Use
    /// [`RedisPublisher::new`] where starting while Redis is down must work.
    pub async fn connect(config: RedisConfig) -> Result<Self, RedisError> {
        let publisher = Self::new(config)?;
        let (_, mut conn) = publisher.inner.current();
        let config = &publisher.inner.config;
        // the manager retries a refused connection with backoff: bound the
        // whole check by one connect timeout
        let ping = redis::cmd("PING");
        let ping = ping.query_async::<String>(&mut conn);
        match tokio::time::timeout(Duration::from_millis(config.connect_timeout_ms), ping).await {
            Ok(Ok(_)) => Ok(publisher),
            Ok(Err(e)) => Err(RedisError::Connect {
                server: config.server(),
                reason: e.to_string(),
            }),
            Err(_) => Err(RedisError::Connect {
                server: config.server(),
                reason: format!("no answer within {} ms", config.connect_timeout_ms),
            }),
        }
    }
}

impl Inner {
    /// The connection in use, with its generation.
    fn current(&self) -> (u64, ConnectionManager) {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        (conn.0, conn.1.clone())
    }

    /// Gives up connection `generation` for a new one (opened lazily), unless
    /// another batch already did.
    fn replace(&self, generation: u64) {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if conn.0 != generation {
            return;
        }
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.manager.clone()) {
            Ok(fresh) => {
                tracing::warn!(
                    server = %self.config.server(),
                    "no reply from Redis in time; opening a new connection"
                );
                *conn = (generation + 1, fresh);
            }
            Err(e) => tracing::warn!(error = %e, "opening a new Redis connection failed"),
        }
    }

    async fn publish(&self, batch: &[Message], deadline: Option<Instant>) -> Vec<PublishOutcome> {
        if batch.is_empty() {
            return Vec::new();
        }
        let started = Instant::now();
        if deadline.is_some_and(|d| d <= started) {
            return vec![PublishOutcome::NotSent; batch.len()];
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for m in batch {
            let headers = serde_json::to_vec(&m.headers).unwrap_or_else(|_| b"{}".to_vec());
            let cmd = pipe.cmd("XADD").arg(self.config.stream_key(&m.topic));
            if let Some(n) = self.config.maxlen {
                cmd.arg("MAXLEN").arg("~").arg(n);
            }
            cmd.arg("*")
                .arg("id")
                .arg(m.id.to_string())
                .arg("topic")
                .arg(&m.topic);
            if let Some(key) = &m.key {
                cmd.arg("key").arg(key);
            }
            cmd.arg("headers")
                .arg(headers)
                .arg("payload")
                .arg(&m.payload[..]);
        }
        if let Some(n) = self.config.wait_replicas {
            pipe.cmd("WAIT").arg(n).arg(self.config.wait_timeout_ms);
        }
        let (generation, mut conn) = self.current();
        // the connection's response timeout bounds this too; the outer one
        // also covers a connection attempt in progress
        let limit = Duration::from_millis(
            self.config
                .response_timeout_ms
                .saturating_add(self.config.connect_timeout_ms),
        );
        let until = deadline.map_or(started + limit, |d| d.min(started + limit));
        let replies = tokio::time::timeout_at(
            until,
            pipe.query_async::<Vec<redis::RedisResult<redis::Value>>>(&mut conn),
        )
        .await;
        let replies = match replies {
            Ok(Ok(r)) => r,
            Ok(Err(e)) if e.is_timeout() => {
                self.replace(generation);
                return all_transient(batch, &format!("Redis at {}: {e}", self.config.server()));
            }
            Ok(Err(e)) => {
                return all_transient(batch, &format!("Redis at {}: {e}", self.config.server()));
            }
            Err(_) => {
                let waited = started.elapsed();
                // No reply at all by the deadline (nine tenths of the
                // relay's send timeout) or our own limit: a healthy Redis
                // answers in milliseconds, so give the connection up.
                self.replace(generation);
                return all_transient(
                    batch,
                    &format!(
                        "no reply from Redis at {} within {} ms",
                        self.config.server(),
                        waited.as_millis()
                    ),
                );
            }
        };
        if replies.len() != batch.len() + usize::from(self.config.wait_replicas.is_some()) {
            return all_transient(
                batch,
                &format!(
                    "Redis answered {} replies for {} commands",
                    replies.len(),
                    batch.len()
                ),
            );
        }
        let mut outcomes: Vec<PublishOutcome> = replies
            .iter()
            .take(batch.len())
            .map(|r| match r {
                Ok(redis::Value::BulkString(_) | redis::Value::SimpleString(_)) => {
                    PublishOutcome::Ok
                }
                Ok(other) => PublishOutcome::transient(format!("unexpected XADD reply {other:?}")),
                Err(e) => match e.code() {
                    Some("WRONGTYPE") => {
                        PublishOutcome::rejected(format!("Redis refused XADD: {e}"))
                    }
                    // an ACL an operator can fix: retried, not dead-lettered
                    Some("NOPERM") => PublishOutcome::transient(format!(
                        "Redis refused XADD: {e} (the ACL of the user postbox connects as must allow XADD on the stream)"
                    )),
                    _ => PublishOutcome::transient(format!("Redis XADD failed: {e}")),
                },
            })
            .collect();
        if let Some(want) = self.config.wait_replicas {
            let acked = match replies.last() {
                Some(Ok(redis::Value::Int(n))) => Some(*n),
                _ => None,
            };
            if acked.is_none_or(|n| n < i64::from(want)) {
                let reason = format!(
                    "WAIT: {} of {want} replicas acknowledged within {} ms",
                    acked.map_or_else(|| "?".to_owned(), |n| n.to_string()),
                    self.config.wait_timeout_ms
                );
                for o in outcomes.iter_mut().filter(|o| o.is_ok()) {
                    *o = PublishOutcome::transient(reason.clone());
                }
            }
        }
        outcomes
    }
}

fn all_transient(batch: &[Message], reason: &str) -> Vec<PublishOutcome> {
    tracing::debug!(%reason, "batch not published");
    batch
        .iter()
        .map(|_| PublishOutcome::transient(reason))
        .collect()
}

impl RedisPublisher {
    fn traced(
        &self,
        batch: &[Message],
        deadline: Option<Instant>,
    ) -> impl Future<Output = Vec<PublishOutcome>> + Send {
        let span = postbox_core::publish_span("redis", batch);
        self.inner.publish(batch, deadline).instrument(span)
    }
}

/// The batch is one pipeline, one round trip: with a deadline it is sent
/// only if the deadline has not passed (else every message is `NotSent`),
/// and a reply still missing at the deadline makes every message
/// `Transient` (a pipeline's entries may exist although no reply came).
impl Publisher for RedisPublisher {
    fn publish(&self, batch: &[Message]) -> impl Future<Output = Vec<PublishOutcome>> + Send {
        self.traced(batch, None)
    }

    fn publish_until(
        &self,
        batch: &[Message],
        deadline: Instant,
    ) -> impl Future<Output = Vec<PublishOutcome>> + Send {
        self.traced(batch, Some(deadline))
    }
}
