//! PostgreSQL store for **postbox**, a transactional outbox.
//!
//! Producers write messages in their own transaction:
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use postbox_core::NewMessage;
//!
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id) VALUES (42)").execute(&mut *tx).await?;
//! postbox_postgres::enqueue(&mut *tx, &NewMessage::new("orders.created", r#"{"id":42}"#).key("order-42")).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! and a relay moves them to a broker through [`PgStore`], which implements
//! [`postbox_core::Store`]. Per-key order comes from a per-key advisory lock
//! taken before `seq` is assigned (see the crate README for the guarantee
//! and its costs); claims are one statement each, cheap with millions of
//! pending rows.

mod claim;
mod error;
mod heartbeat;
mod listen;
mod migrate;
mod outbox;
mod sql;
mod store;
mod tid;
mod vacuum;

pub use error::redact_url;
pub use outbox::{DEFAULT_SCHEMA, DEFAULT_TABLE, MAX_TABLE_LEN, PgOutbox};
pub use store::{
    ACQUIRE_TIMEOUT, Blocker, CLAIM_POOL_SIZE, DEFAULT_POOL_SIZE, MAX_HELD, PgStore, VacuumState,
    relay_connect_options,
};
pub use vacuum::{VACUUM_CHECK_EVERY, VACUUM_YIELD_CHECK_EVERY, VacuumOutcome};

use std::sync::OnceLock;

use postbox_core::{NewMessage, StoreError};
use sqlx::{PgPool, Postgres};

/// The default outbox, built once (its SQL text is formatted at build time).
fn default_outbox() -> &'static PgOutbox {
    static DEFAULT: OnceLock<PgOutbox> = OnceLock::new();
    DEFAULT.get_or_init(PgOutbox::default)
}

/// Creates or upgrades the default table `public.postbox_outbox`.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    default_outbox().migrate(pool).await
}

/// Enqueues `msg` into the default table through `executor` (normally
/// `&mut *tx`). See [`PgOutbox::enqueue`].
pub async fn enqueue<'e, E>(executor: E, msg: &NewMessage) -> Result<(), StoreError>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    default_outbox().enqueue(executor, msg).await
}

/// Enqueues `msgs` atomically into the default table in one round trip.
/// See [`PgOutbox::enqueue_batch`].
pub async fn enqueue_batch<'e, E>(executor: E, msgs: &[NewMessage]) -> Result<(), StoreError>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    default_outbox().enqueue_batch(executor, msgs).await
}
