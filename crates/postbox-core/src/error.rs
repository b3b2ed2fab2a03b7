//! Errors of the core crate.

use std::time::Duration;

/// A boxed error from a backend (sqlx, a broker client).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error from a [`Store`](crate::Store).
///
/// Messages never contain credentials: store crates strip passwords from
/// URLs before they build an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database cannot be reached right now (connection refused or lost,
    /// pool timed out, database busy). Retrying later is the right response.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The database answered with an error.
    #[error("database error: {0}")]
    Database(#[source] BoxError),
    /// The schema is missing or older than this version of postbox expects.
    #[error("outbox schema problem: {0} (run `postbox migrate`)")]
    Schema(String),
    /// A bad setting (table name, URL, option).
    #[error("invalid store configuration: {0}")]
    Config(String),
}

impl StoreError {
    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// A relay setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value out of its allowed range.
    #[error("{name} = {value} is invalid: {reason}")]
    Invalid {
        /// The setting's name.
        name: &'static str,
        /// The offending value, as text.
        value: String,
        /// What it must be instead.
        reason: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(name: &'static str, value: impl std::fmt::Debug, reason: &str) -> Self {
        ConfigError::Invalid {
            name,
            value: format!("{value:?}"),
            reason: reason.to_owned(),
        }
    }
}

/// An error from one relay pass.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// Claiming failed.
    #[error("claim failed: {0}")]
    Claim(#[source] StoreError),
    /// Recording outcomes failed even after retrying until the lease ran
    /// out; the messages will be delivered again by whoever claims them next.
    #[error("could not record outcomes before the lease of {lease:?} ran out: {source}")]
    Complete {
        /// The lease length.
        lease: Duration,
        /// The last error.
        #[source]
        source: StoreError,
    },
}
