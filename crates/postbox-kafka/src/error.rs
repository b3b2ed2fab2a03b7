//! Errors of the Kafka publisher.

/// An error building or connecting a [`KafkaPublisher`](crate::KafkaPublisher).
///
/// Messages never contain passwords.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaError {
    /// A setting is missing or wrong; `field` names it.
    #[error("invalid Kafka configuration: {field} {reason}")]
    InvalidConfig {
        /// The setting, e.g. `url` or `topic_template`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// librdkafka refused the producer configuration.
    #[error("cannot create the Kafka producer: {0}")]
    Client(String),
    /// [`KafkaPublisher::connect`](crate::KafkaPublisher::connect) could not
    /// fetch cluster metadata in time.
    #[error("cannot reach the Kafka brokers {brokers}: {reason}")]
    Connect {
        /// The bootstrap servers.
        brokers: String,
        /// What went wrong.
        reason: String,
    },
}

impl KafkaError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        KafkaError::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}
