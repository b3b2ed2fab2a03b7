//! Redis Streams publisher for **postbox**.
//!
//! Each message becomes one stream entry (`XADD <stream> [MAXLEN ~ n] *
//! id .. topic .. [key ..] headers .. payload ..`); a batch is one pipelined
//! round trip. `Ok` means Redis answered the `XADD` with an entry id, i.e.
//! the entry is in the primary's memory; with `wait_replicas` set, also that
//! many replicas acknowledged it (`WAIT`). Redis persistence (AOF / RDB) is
//! the server's business and decides what survives a Redis crash.
//!
//! ```no_run
//! # fn demo() -> Result<(), postbox_redis::RedisError> {
//! use postbox_redis::{RedisConfig, RedisPublisher};
//!
//! let config = RedisConfig::from_url("redis://127.0.0.1:6379")?
//!     .stream_template("outbox:{topic}")
//!     .maxlen(1_000_000);
//! // never contacts Redis: it connects on the first publish
//! let publisher = RedisPublisher::new(config)?;
//! # let _ = publisher; Ok(()) }
//! ```

mod config;
mod error;
mod publisher;

pub use config::RedisConfig;
pub use error::RedisError;
pub use publisher::RedisPublisher;
