//! Errors of the webhook publisher.

/// An error building an [`HttpPublisher`](crate::HttpPublisher).
///
/// Messages never contain the secret or a password from the URL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// A setting is missing or wrong; `field` names it.
    #[error("invalid webhook configuration: {field} {reason}")]
    InvalidConfig {
        /// The setting, e.g. `url` or `secret`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be built (TLS roots, resolver).
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

impl HttpError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        HttpError::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}
