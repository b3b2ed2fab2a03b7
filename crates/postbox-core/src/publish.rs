//! The [`Publisher`] trait and per-message outcomes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::message::Message;

/// The result of publishing one message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishOutcome {
    /// The broker acknowledged the message durably.
    Ok,
    /// Not published this time; retry with backoff.
    Transient {
        /// Why (shown in `postbox dead list` if it ends dead).
        reason: String,
        /// The broker asked to wait at least this long (HTTP `Retry-After`).
        retry_after: Option<Duration>,
    },
    /// The broker will never take this message as it is: dead-letter it now.
    Rejected {
        /// Why.
        reason: String,
    },
    /// Never handed to the broker: the deadline of
    /// [`Publisher::publish_until`] came before this message's turn, or (in
    /// a batch with several messages of one key) an earlier message of its
    /// key failed. The relay gives the row back without counting an
    /// attempt, claimable again at once. A message that may have left (its
    /// send started) is `Transient`, never `NotSent`.
    NotSent,
}

impl PublishOutcome {
    /// A transient failure with no wait hint.
    pub fn transient(reason: impl Into<String>) -> Self {
        PublishOutcome::Transient {
            reason: reason.into(),
            retry_after: None,
        }
    }

    /// A permanent rejection.
    pub fn rejected(reason: impl Into<String>) -> Self {
        PublishOutcome::Rejected {
            reason: reason.into(),
        }
    }

    /// True for [`PublishOutcome::Ok`].
    pub fn is_ok(&self) -> bool {
        matches!(self, PublishOutcome::Ok)
    }
}

/// Sends messages to a broker.
///
/// `publish` gets a batch in `seq` order (at most one message per key) and
/// returns exactly one outcome per message, in the same order. It returns
/// only once the broker has acknowledged each `Ok` message durably (JetStream
/// PubAck, Kafka `acks=all`, AMQP confirm, MQTT PUBACK, HTTP 2xx). Batches
/// should be pipelined, not sent one round trip per message. Connection
/// problems are `Transient` outcomes, never panics.
///
/// The relay calls [`Publisher::publish_until`] with a deadline inside its
/// send timeout. A publisher that sends a batch in parts (one request per
/// message, or chunks) should implement it, so that a slow broker costs the
/// messages it did not get to, not the ones it already acknowledged; the
/// provided implementation ignores the deadline and the relay's send timeout
/// then turns every outcome of a late batch into `Transient`. A wrapper
/// around another publisher (metrics, routing) should forward
/// `publish_until` as well as `publish`, or the deadline is lost.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `batch`, one outcome per message.
    fn publish(&self, batch: &[Message]) -> impl Future<Output = Vec<PublishOutcome>> + Send;

    /// Publishes `batch` and returns by `deadline`: outcomes of messages
    /// finished by then as usual, [`PublishOutcome::NotSent`] for messages
    /// whose send had not started, `Transient` for sends cut short (they may
    /// still reach the broker). Provided: [`Publisher::publish`], deadline
    /// ignored.
    fn publish_until(
        &self,
        batch: &[Message],
        deadline: Instant,
    ) -> impl Future<Output = Vec<PublishOutcome>> + Send {
        let _ = deadline;
        self.publish(batch)
    }
}

impl<P: Publisher> Publisher for Arc<P> {
    fn publish(&self, batch: &[Message]) -> impl Future<Output = Vec<PublishOutcome>> + Send {
        (**self).publish(batch)
    }

    fn publish_until(
        &self,
        batch: &[Message],
        deadline: Instant,
    ) -> impl Future<Output = Vec<PublishOutcome>> + Send {
        (**self).publish_until(batch, deadline)
    }
}

/// `fut`'s output, or `None` if `deadline` comes first; without a deadline,
/// simply `fut`. For publishers implementing [`Publisher::publish_until`]
/// over [`Publisher::publish`]'s code path.
pub async fn by_deadline<F: Future>(deadline: Option<Instant>, fut: F) -> Option<F::Output> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// The `postbox.publish` span a publisher runs a batch in, naming the
/// publisher (`"nats"`, `"kafka"`, …) and the batch's size.
pub fn publish_span(publisher: &'static str, batch: &[Message]) -> tracing::Span {
    tracing::debug_span!(
        "postbox.publish",
        postbox.publisher = publisher,
        postbox.batch_size = batch.len()
    )
}
