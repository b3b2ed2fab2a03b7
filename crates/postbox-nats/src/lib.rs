//! NATS JetStream publisher for **postbox**.
//!
//! Each message is published to a JetStream subject (from
//! [`NatsConfig::subject_template`]) with `Nats-Msg-Id` set to the message id,
//! so the stream drops a redelivery inside its duplicate window. A message is
//! `Ok` only once its PubAck arrived, i.e. the stream stored it. A batch is
//! pipelined: every message is sent before any ack is awaited.
//!
//! ```no_run
//! # async fn demo() -> Result<(), postbox_nats::NatsError> {
//! use postbox_nats::{NatsConfig, NatsPublisher};
//!
//! let config = NatsConfig::from_url("nats://127.0.0.1:4222")?.subject_template("outbox.{topic}");
//! // never waits for the server: publishes are Transient until it is up
//! let publisher = NatsPublisher::new(config).await?;
//! # let _ = publisher; Ok(()) }
//! ```

mod config;
mod error;
mod publisher;
mod subject;
mod tls;

pub use config::{NatsConfig, StreamSpec};
pub use error::NatsError;
pub use publisher::{KEY_HEADER, NatsPublisher};
