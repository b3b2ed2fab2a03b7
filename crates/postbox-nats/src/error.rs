//! Errors of the NATS publisher.

/// An error building or connecting a [`NatsPublisher`](crate::NatsPublisher).
///
/// Messages never contain passwords or tokens.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// A setting is missing or wrong; `field` names it.
    #[error("invalid NATS configuration: {field} {reason}")]
    InvalidConfig {
        /// The setting, e.g. `url` or `subject_template`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// [`NatsPublisher::connect`](crate::NatsPublisher::connect) could not
    /// reach the server (or create the configured stream) in time.
    #[error("cannot connect to NATS at {server}: {reason}")]
    Connect {
        /// The server URL, password removed.
        server: String,
        /// What went wrong.
        reason: String,
    },
}

impl NatsError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        NatsError::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}
