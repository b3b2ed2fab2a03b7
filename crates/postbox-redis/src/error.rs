//! Errors of the Redis publisher.

/// An error building or connecting a [`RedisPublisher`](crate::RedisPublisher).
///
/// Messages never contain passwords.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisError {
    /// A setting is missing or wrong; `field` names it.
    #[error("invalid Redis configuration: {field} {reason}")]
    InvalidConfig {
        /// The setting, e.g. `url` or `maxlen`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// [`RedisPublisher::connect`](crate::RedisPublisher::connect) could not
    /// reach the server in time.
    #[error("cannot connect to Redis at {server}: {reason}")]
    Connect {
        /// The server URL, password removed.
        server: String,
        /// What went wrong.
        reason: String,
    },
}

impl RedisError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        RedisError::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}
