//! Errors of the RabbitMQ publisher.

/// An error building or connecting a
/// [`RabbitMqPublisher`](crate::RabbitMqPublisher).
///
/// Messages never contain passwords.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RabbitMqError {
    /// A setting is missing or wrong; `field` names it.
    #[error("invalid RabbitMQ configuration: {field} {reason}")]
    InvalidConfig {
        /// The setting, e.g. `url` or `exchange`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// [`RabbitMqPublisher::connect`](crate::RabbitMqPublisher::connect)
    /// could not open a connection and a confirm-mode channel in time.
    #[error("cannot connect to RabbitMQ at {server}: {reason}")]
    Connect {
        /// The broker URL, password removed.
        server: String,
        /// What went wrong.
        reason: String,
    },
}

impl RabbitMqError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        RabbitMqError::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}
