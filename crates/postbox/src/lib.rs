//! **postbox** — a transactional outbox for Rust services.
//!
//! Write your business rows and the messages they imply in one database
//! transaction; a [`Relay`] publishes every committed message at least once,
//! in order per key, with retries and dead letters.
//!
//! This facade re-exports [`postbox_core`] and, behind one cargo feature
//! each, the stores and publishers:
//!
//! | feature | module | what |
//! | --- | --- | --- |
//! | `sqlite` (default) | [`sqlite`] | SQLite store |
//! | `postgres` | `postgres` | PostgreSQL store |
//! | `mysql` | `mysql` | MySQL / MariaDB store |
//! | `jsonl` (default) | [`jsonl`] | stdout and JSON-lines file publishers |
//! | `nats` | `nats` | NATS JetStream publisher |
//! | `kafka` | `kafka` | Kafka publisher (rdkafka) |
//! | `rabbitmq` | `rabbitmq` | RabbitMQ publisher (lapin, confirms) |
//! | `redis` | `redis` | Redis Streams publisher |
//! | `mqtt` | `mqtt` | MQTT publisher (QoS 1, PUBACK per message) |
//! | `http` | `http` | signed webhook publisher (Standard Webhooks) |
//! | `opentelemetry` | `trace_context` | W3C trace context from `enqueue` through the relay to the broker |
//!
//! ```no_run
//! use postbox::{CancellationToken, NewMessage, Relay};
//! use postbox::sqlite::SqliteStore;
//! use postbox::jsonl::StdoutPublisher;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = SqliteStore::connect("sqlite://app.db").await?;
//! postbox::sqlite::migrate(store.pool()).await?;
//!
//! // in your request handler: business row and message, one transaction
//! let mut tx = store.pool().begin().await?;
//! sqlx::query("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY)").execute(&mut *tx).await?;
//! sqlx::query("INSERT INTO orders (id) VALUES (42)").execute(&mut *tx).await?;
//! postbox::sqlite::enqueue(&mut *tx, &NewMessage::new("orders.created", r#"{"id":42}"#).key("order-42")).await?;
//! tx.commit().await?;
//!
//! // in the background: the relay
//! let relay = Relay::builder(store.clone(), StdoutPublisher).build()?;
//! let shutdown = CancellationToken::new();
//! tokio::spawn({ let relay = relay.clone(); let s = shutdown.clone(); async move { relay.run(s).await } });
//! relay.waker().wake(); // publish now rather than at the next poll
//! # Ok(()) }
//! ```

pub use postbox_core::*;

/// SQLite store (feature `sqlite`).
#[cfg(feature = "sqlite")]
pub mod sqlite {
    pub use postbox_sqlite::*;
}

/// PostgreSQL store (feature `postgres`).
#[cfg(feature = "postgres")]
pub mod postgres {
    pub use postbox_postgres::*;
}

/// MySQL / MariaDB store (feature `mysql`).
#[cfg(feature = "mysql")]
pub mod mysql {
    pub use postbox_mysql::*;
}

/// stdout and JSON-lines file publishers (feature `jsonl`).
#[cfg(feature = "jsonl")]
pub mod jsonl {
    pub use postbox_jsonl::*;
}

/// NATS JetStream publisher (feature `nats`).
#[cfg(feature = "nats")]
pub mod nats {
    pub use postbox_nats::*;
}

/// Kafka publisher (feature `kafka`).
#[cfg(feature = "kafka")]
pub mod kafka {
    pub use postbox_kafka::*;
}

/// RabbitMQ publisher (feature `rabbitmq`).
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq {
    pub use postbox_rabbitmq::*;
}

/// Redis Streams publisher (feature `redis`).
#[cfg(feature = "redis")]
pub mod redis {
    pub use postbox_redis::*;
}

/// MQTT publisher (feature `mqtt`).
#[cfg(feature = "mqtt")]
pub mod mqtt {
    pub use postbox_mqtt::*;
}

/// Webhook publisher (feature `http`).
#[cfg(feature = "http")]
pub mod http {
    pub use postbox_http::*;
}

/// The repository README's library example, compiled as a doc test so it
/// cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
