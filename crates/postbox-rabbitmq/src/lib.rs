//! RabbitMQ (AMQP 0-9-1) publisher for **postbox**.
//!
//! Every message is published `mandatory` and persistent (delivery mode 2)
//! on a channel in confirm mode, with `message_id` = the message id. A
//! message is `Ok` once the broker confirmed it (for a durable queue: written
//! to disk); an unroutable one comes back as `Rejected`. A batch is
//! pipelined: all messages are published, then all confirms awaited.
//!
//! ```no_run
//! # async fn demo() -> Result<(), postbox_rabbitmq::RabbitMqError> {
//! use postbox_rabbitmq::{RabbitMqConfig, RabbitMqPublisher};
//!
//! let config = RabbitMqConfig::from_url("amqp://guest:guest@127.0.0.1:5672/%2f")?
//!     .exchange("events")
//!     .routing_key_template("{topic}");
//! // never contacts the broker: it connects on the first publish
//! let publisher = RabbitMqPublisher::new(config)?;
//! # let _ = publisher; Ok(()) }
//! ```

mod config;
mod error;
mod publisher;

pub use config::RabbitMqConfig;
pub use error::RabbitMqError;
pub use publisher::{KEY_HEADER, RabbitMqPublisher};
