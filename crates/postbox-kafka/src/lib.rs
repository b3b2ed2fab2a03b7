//! Kafka publisher for **postbox**: an idempotent rdkafka producer
//! (`acks=all`), record key = postbox key, the message id in the
//! `postbox-id` header, outcomes from the delivery reports.
//!
//! ```no_run
//! # fn demo() -> Result<(), postbox_kafka::KafkaError> {
//! use postbox_kafka::{KafkaConfig, KafkaPublisher};
//! // never contacts the broker here: starting while Kafka is down works
//! let publisher = KafkaPublisher::new(KafkaConfig::from_url("kafka://127.0.0.1:9092")?)?;
//! # Ok(()) }
//! ```

mod config;
mod error;
mod publisher;

pub use config::KafkaConfig;
pub use error::KafkaError;
pub use publisher::{ID_HEADER, KafkaPublisher};
