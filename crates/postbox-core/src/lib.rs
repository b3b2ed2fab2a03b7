//! Core of **postbox**, a transactional outbox for Rust services.
//!
//! A service writes its business rows and the messages they imply in one
//! database transaction (see the store crates' `enqueue`); a [`Relay`] then
//! moves every committed message from a [`Store`] to a [`Publisher`] at least
//! once, in order per key, with retries and dead letters.
//!
//! This crate holds the message model, the two traits, the relay loop and the
//! retry policy. It depends on no database or broker crate.

mod clock;
mod error;
mod fairness;
mod ident;
mod message;
pub mod observe;
mod publish;
mod redact;
mod relay;
mod retry;
mod route;
mod store;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "opentelemetry")]
pub mod trace_context;

pub use clock::{Clock, SharedClock, SystemClock, TokioClock, since};
pub use error::{BoxError, ConfigError, RelayError, StoreError};
pub use ident::{Ident, IdentError};
pub use message::{
    Headers, Message, NewMessage, from_unix_micros, latest_available_at, to_unix_micros,
};
pub use observe::Health;
pub use publish::{PublishOutcome, Publisher, by_deadline, publish_span};
pub use redact::{redact_url, redact_userinfo};
pub use relay::{
    CLEANUP_BATCH, MAX_LEASE, MAX_RETRY_AFTER, OnDead, Relay, RelayBuilder, RelayOptions,
    RelayWaker, STATS_PAUSE_CAP, STATS_STRETCH, TickReport,
};
pub use retry::RetryPolicy;
pub use route::{Router, TopicPattern};
pub use store::{
    Claim, ClaimRequest, CompleteReport, Completion, Disposition, Filter, GroupBy, GroupStats,
    Holder, Holdups, Lease, ListQuery, Malformed, MessageRecord, PurgeQuery, RelayHeartbeat,
    RelayRecord, STALE_AFTER_INTERVALS, Stats, Status, Store,
};

/// Re-exported so callers need not depend on tokio-util for shutdown.
pub use tokio_util::sync::CancellationToken;
