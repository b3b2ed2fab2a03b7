//! MySQL / MariaDB backend of **postbox**, the transactional outbox: the
//! schema and its migrations, `enqueue` inside the caller's transaction, and
//! [`MySqlStore`], the [`postbox_core::Store`] a relay claims from.
//!
//! ```no_run
//! # async fn run(pool: sqlx::MySqlPool) -> Result<(), Box<dyn std::error::Error>> {
//! use postbox_core::NewMessage;
//!
//! postbox_mysql::migrate(&pool).await?;
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id) VALUES (42)").execute(&mut *tx).await?;
//! let msg = NewMessage::new("orders.created", br#"{"id":42}"#.to_vec()).key("order-42");
//! postbox_mysql::enqueue(&mut *tx, &msg).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! Order per key comes from a per-key row lock taken by a trigger on every
//! insert and held to the end of the producer's transaction; the crate
//! README states exactly what is and is not guaranteed.

mod admin;
mod claim;
mod closing;
mod error;
mod heartbeat;
mod migrate;
mod outbox;
mod store;

pub use error::redact_url;
pub use outbox::{MySqlOutbox, key_slot};
pub use store::MySqlStore;

use postbox_core::{NewMessage, StoreError};
use sqlx::{Acquire, Executor, MySql, MySqlPool};

/// Creates or upgrades the default outbox table `postbox_outbox`; see
/// [`MySqlOutbox::migrate`].
pub async fn migrate(pool: &MySqlPool) -> Result<(), StoreError> {
    MySqlOutbox::default().migrate(pool).await
}

/// Writes `msg` into `postbox_outbox` through `executor` (pass `&mut *tx`);
/// see [`MySqlOutbox::enqueue`].
pub async fn enqueue<'e, E>(executor: E, msg: &NewMessage) -> Result<(), StoreError>
where
    E: Executor<'e, Database = MySql>,
{
    MySqlOutbox::default().enqueue(executor, msg).await
}

/// Writes all of `msgs` into `postbox_outbox` atomically; see
/// [`MySqlOutbox::enqueue_batch`].
pub async fn enqueue_batch<'a, A>(conn: A, msgs: &[NewMessage]) -> Result<(), StoreError>
where
    A: Acquire<'a, Database = MySql>,
{
    MySqlOutbox::default().enqueue_batch(conn, msgs).await
}
