//! The [`Publisher`] trait and per-message outcomes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

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
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `batch`, one outcome per message.
    fn publish(&self, batch: &[Message]) -> impl Future<Output = Vec<PublishOutcome>> + Send;
}

impl<P: Publisher> Publisher for Arc<P> {
    fn publish(&self, batch: &[Message]) -> impl Future<Output = Vec<PublishOutcome>> + Send {
        (**self).publish(batch)
    }
}
