//! SQLite store for **postbox**, the transactional outbox.
//!
//! Write messages in the same transaction as your business rows, then let a
//! [`Relay`](postbox_core::Relay) publish them:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use postbox_core::NewMessage;
//! use postbox_sqlite::SqliteStore;
//!
//! let store = SqliteStore::connect("sqlite://orders.db").await?;
//! store.outbox().migrate(store.pool()).await?;
//! sqlx::query("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY)")
//!     .execute(store.pool())
//!     .await?;
//!
//! let mut tx = store.pool().begin().await?;
//! sqlx::query("INSERT INTO orders (id) VALUES (42)").execute(&mut *tx).await?;
//! postbox_sqlite::enqueue(&mut *tx, &NewMessage::new("orders.created", r#"{"id":42}"#).key("order-42")).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! SQLite has one writer at a time, so insert order is commit order: per-key
//! order needs no extra locking here. Times are kept as integer microseconds
//! since the Unix epoch on SQLite's clock.

mod error;
mod sql;
mod store;

use std::sync::Arc;

use postbox_core::{Ident, NewMessage, StoreError, to_unix_micros};
use sqlx::{Executor, QueryBuilder, Sqlite};

pub use store::SqliteStore;

use crate::error::db_error;
use crate::sql::Sql;

/// SQLite allows 32766 bound parameters per statement; 8 per row.
const ROWS_PER_INSERT: usize = 1000;

/// A validated outbox table name and the SQL built from it, and whether
/// stores over it keep sent messages.
#[derive(Debug, Clone)]
pub struct SqliteOutbox {
    name: Ident,
    sql: Arc<Sql>,
    retain_sent: Option<std::time::Duration>,
}

impl Default for SqliteOutbox {
    /// The table `postbox_outbox`.
    fn default() -> Self {
        Self::from_ident(
            Ident::new("postbox_outbox").unwrap_or_else(|_| unreachable!("valid literal")),
        )
    }
}

impl SqliteOutbox {
    /// Uses table `table`, which must be a plain identifier.
    pub fn new(table: &str) -> Result<Self, StoreError> {
        Ident::new(table)
            .map(Self::from_ident)
            .map_err(|e| StoreError::Config(e.to_string()))
    }

    fn from_ident(name: Ident) -> Self {
        let sql = Arc::new(Sql::new(&name));
        Self {
            name,
            sql,
            retain_sent: None,
        }
    }

    /// Keep sent messages for `keep` instead of deleting them on success
    /// (`None`, the default, deletes them). Kept rows are marked `sent`
    /// with `sent_at` on SQLite's clock, are never claimed again and never
    /// hold their key back; a running relay deletes them once `keep` has
    /// passed (`postbox_core::Store::purge_sent`, a few hundred rows per
    /// statement).
    #[must_use]
    pub fn retain_sent(mut self, keep: Option<std::time::Duration>) -> Self {
        self.retain_sent = keep;
        self
    }

    /// How long sent messages are kept (`None`: deleted on success).
    pub fn sent_retention(&self) -> Option<std::time::Duration> {
        self.retain_sent
    }

    /// The table name.
    pub fn table(&self) -> &str {
        self.name.as_str()
    }

    pub(crate) fn sql(&self) -> &Sql {
        &self.sql
    }

    /// Creates or upgrades the outbox table. Idempotent; concurrent callers
    /// are serialised by SQLite's write lock (`BEGIN IMMEDIATE`).
    pub async fn migrate(&self, pool: &sqlx::SqlitePool) -> Result<(), StoreError> {
        let sql = self.sql();
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {} (version INTEGER PRIMARY KEY, name TEXT NOT NULL, \
             applied_at INTEGER NOT NULL DEFAULT ({}))",
            sql.history,
            sql::NOW
        ))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let applied: Vec<i64> = sqlx::query_scalar(&format!("SELECT version FROM {}", sql.history))
            .fetch_all(&mut *tx)
            .await
            .map_err(db_error)?;
        for (version, name, text) in &sql.migrations {
            if applied.contains(version) {
                continue;
            }
            sqlx::raw_sql(text)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            sqlx::query(&format!(
                "INSERT INTO {} (version, name) VALUES (?1, ?2)",
                sql.history
            ))
            .bind(version)
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            tracing::info!(table = %self.name, version, name, "applied outbox migration");
        }
        tx.commit().await.map_err(db_error)
    }

    /// Writes `msg` through `executor`: pass `&mut *tx` to make it part of
    /// your transaction.
    pub async fn enqueue<'e, E>(&self, executor: E, msg: &NewMessage) -> Result<(), StoreError>
    where
        E: Executor<'e, Database = Sqlite>,
    {
        self.insert(std::slice::from_ref(msg))
            .build()
            .execute(executor)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// Writes all of `msgs` atomically, in order, in as few statements as
    /// SQLite's parameter limit allows. Inside your transaction
    /// (`&mut *tx`) it joins it; on a pool it runs its own.
    pub async fn enqueue_batch<'a, A>(&self, conn: A, msgs: &[NewMessage]) -> Result<(), StoreError>
    where
        A: sqlx::Acquire<'a, Database = Sqlite>,
    {
        if msgs.is_empty() {
            return Ok(());
        }
        let mut tx = conn.begin().await.map_err(db_error)?;
        for chunk in msgs.chunks(ROWS_PER_INSERT) {
            self.insert(chunk)
                .build()
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)
    }

    fn insert<'q>(&self, msgs: &'q [NewMessage]) -> QueryBuilder<'q, Sqlite> {
        let mut q = QueryBuilder::new(&self.sql().insert);
        let mut first = true;
        for m in msgs {
            if !first {
                q.push(", ");
            }
            first = false;
            q.push("(");
            let mut row = q.separated(", ");
            row.push_bind(m.id);
            row.push_bind(m.topic.as_str());
            row.push_bind(m.key.as_deref());
            row.push_bind(m.payload.as_ref());
            row.push_bind(m.headers_json());
            row.push_bind(m.tenant.as_deref());
            match m.available_at {
                Some(t) => row.push_bind(to_unix_micros(t)),
                None => row.push(sql::NOW),
            };
            row.push_bind(m.max_attempts.map(i64::from));
            q.push(")");
        }
        q
    }

    /// A store over `pool` using this table.
    pub fn store(&self, pool: sqlx::SqlitePool) -> SqliteStore {
        SqliteStore::new(pool, self.clone())
    }
}

/// Creates or upgrades the default outbox table `postbox_outbox`.
pub async fn migrate(pool: &sqlx::SqlitePool) -> Result<(), StoreError> {
    SqliteOutbox::default().migrate(pool).await
}

/// Writes `msg` into the default outbox table through `executor` (pass
/// `&mut *tx` to join your transaction).
pub async fn enqueue<'e, E>(executor: E, msg: &NewMessage) -> Result<(), StoreError>
where
    E: Executor<'e, Database = Sqlite>,
{
    SqliteOutbox::default().enqueue(executor, msg).await
}

/// Writes `msgs` atomically into the default outbox table.
pub async fn enqueue_batch<'a, A>(conn: A, msgs: &[NewMessage]) -> Result<(), StoreError>
where
    A: sqlx::Acquire<'a, Database = Sqlite>,
{
    SqliteOutbox::default().enqueue_batch(conn, msgs).await
}
