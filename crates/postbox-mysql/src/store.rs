//! [`MySqlStore`]: the [`Store`] implementation over a MySQL pool.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postbox_core::{
    Claim, ClaimRequest, CompleteReport, Completion, Filter, ListQuery, MessageRecord, PurgeQuery,
    Stats, Store, StoreError,
};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{Executor, MySqlPool};
use uuid::Uuid;

use crate::error::{check_server_version, map_connect_err, redact_url};
use crate::outbox::MySqlOutbox;
use crate::{admin, claim};

/// How often a store sweeps `<table>_keys` for keys with no rows left, and
/// how many keys one sweep looks at.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
const SWEEP_KEYS: usize = 1_000;

/// Where the idle-key sweep stands.
#[derive(Debug)]
struct Sweep {
    last: Option<Instant>,
    after: Vec<u8>,
}

/// The outbox store on MySQL or MariaDB; implements [`Store`].
///
/// ```no_run
/// # async fn run() -> Result<(), postbox_core::StoreError> {
/// let store = postbox_mysql::MySqlStore::connect("mysql://app:secret@127.0.0.1/shop").await?;
/// postbox_mysql::migrate(store.pool()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MySqlStore {
    pool: MySqlPool,
    outbox: MySqlOutbox,
    sweep: Arc<Mutex<Sweep>>,
}

impl std::fmt::Debug for MySqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlStore")
            .field("table", &self.outbox.table())
            .finish_non_exhaustive()
    }
}

impl MySqlStore {
    pub(crate) fn new(pool: MySqlPool, outbox: MySqlOutbox) -> Self {
        Self {
            pool,
            outbox,
            sweep: Arc::new(Mutex::new(Sweep {
                last: None,
                after: Vec::new(),
            })),
        }
    }

    /// Connects a pool to `url` (`mysql://user:password@host:port/database`)
    /// with the session settings the store relies on (UTC `time_zone`,
    /// READ COMMITTED), for the default table `postbox_outbox`.
    ///
    /// Errors name the URL without its password: a bad URL, refused
    /// credentials or a missing database are [`StoreError::Config`]; an
    /// unreachable server is [`StoreError::Unavailable`]; a server without
    /// `FOR UPDATE SKIP LOCKED` (MariaDB < 10.6, MySQL < 8.0.29) is refused
    /// with a [`StoreError::Config`] naming both versions.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let shown = redact_url(url);
        let options = MySqlConnectOptions::from_str(url).map_err(|e| {
            StoreError::Config(format!(
                "invalid MySQL URL {shown}: {}",
                e.to_string().replace(url, &shown)
            ))
        })?;
        let pool = MySqlPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                        .await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| map_connect_err(e, &shown))?;
        let version: String = sqlx::query_scalar("SELECT VERSION()")
            .fetch_one(&pool)
            .await
            .map_err(|e| map_connect_err(e, &shown))?;
        check_server_version(&version)?;
        tracing::debug!(postbox.store = %shown, postbox.server = %version, "connected to MySQL");
        Ok(Self::new(pool, MySqlOutbox::default()))
    }

    /// The same pool on another outbox table.
    #[must_use]
    pub fn with_outbox(&self, outbox: MySqlOutbox) -> Self {
        Self::new(self.pool.clone(), outbox)
    }

    /// The outbox table this store reads.
    pub fn outbox(&self) -> &MySqlOutbox {
        &self.outbox
    }

    /// The connection pool.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Deletes the per-key lock rows (`<table>_keys`) of keys with no row
    /// left in the outbox, scanning up to `limit` keys from where the last
    /// sweep stopped. Claims run it every few seconds by themselves; call it
    /// to clean up at once. Returns how many key rows were deleted.
    pub async fn forget_idle_keys(&self, limit: usize) -> Result<u64, StoreError> {
        let after = self.lock_sweep().after.clone();
        let (deleted, next) =
            claim::forget_idle_keys(&self.outbox.inner, &self.pool, &after, limit).await?;
        self.lock_sweep().after = next.unwrap_or_default();
        Ok(deleted)
    }

    fn lock_sweep(&self) -> std::sync::MutexGuard<'_, Sweep> {
        self.sweep
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sweeps idle keys if the last sweep is old enough; a failure only logs.
    async fn maybe_sweep(&self) {
        let due = {
            let mut s = self.lock_sweep();
            let due = s.last.is_none_or(|t| t.elapsed() >= SWEEP_EVERY);
            if due {
                s.last = Some(Instant::now());
            }
            due
        };
        if due && let Err(e) = self.forget_idle_keys(SWEEP_KEYS).await {
            tracing::warn!(error = %e, "sweeping idle outbox keys failed");
        }
    }
}

impl Store for MySqlStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let claim = claim::claim(&self.outbox.inner, &self.pool, req).await?;
        self.maybe_sweep().await;
        Ok(claim)
    }

    async fn complete(
        &self,
        token: Uuid,
        completions: &[Completion],
    ) -> Result<CompleteReport, StoreError> {
        claim::complete(&self.outbox.inner, &self.pool, token, completions).await
    }

    async fn stats(&self, filter: &Filter) -> Result<Stats, StoreError> {
        admin::stats(&self.outbox.inner, &self.pool, filter).await
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<MessageRecord>, StoreError> {
        admin::list(&self.outbox.inner, &self.pool, query).await
    }

    async fn replay(&self, filter: &Filter) -> Result<u64, StoreError> {
        admin::replay(&self.outbox.inner, &self.pool, filter).await
    }

    async fn skip(&self, filter: &Filter) -> Result<u64, StoreError> {
        admin::skip(&self.outbox.inner, &self.pool, filter).await
    }

    async fn purge(&self, query: &PurgeQuery) -> Result<u64, StoreError> {
        admin::purge(&self.outbox.inner, &self.pool, query).await
    }
}
