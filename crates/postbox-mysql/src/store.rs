//! [`MySqlStore`]: the [`Store`] implementation over a MySQL pool.

use std::str::FromStr;
use std::time::Duration;

use postbox_core::{
    Claim, ClaimRequest, CompleteReport, Completion, Filter, GroupBy, GroupStats, ListQuery,
    MessageRecord, PurgeQuery, RelayHeartbeat, RelayRecord, Stats, Store, StoreError,
};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{Executor, MySqlConnection, MySqlPool};
use uuid::Uuid;

use crate::error::{check_server_version, map_connect_err, redact_url};
use crate::outbox::MySqlOutbox;
use crate::{admin, claim, heartbeat};

/// The limits of a claim session, in one round trip: a claim or a
/// completion waits at most 5 s for a lock, row or metadata. Claims skip
/// locked rows, but a completion can find its rows locked (by an admin
/// `replay`, `skip` or `purge`), any statement queues
/// behind a migration's `ALTER TABLE` or a DBA's, and a `COMMIT` behind
/// `FLUSH TABLES WITH READ LOCK`. The error is [`StoreError::Unavailable`]
/// and the relay tries again, instead of the server defaults (50 s for
/// rows, a day for metadata) holding the relay, and committing leases after
/// it gave the claim up.
///
/// Statements are not limited in time (`max_statement_time`): a claim's
/// scan grows with one key's backlog in front of everything else (4 s for a
/// million rows of one key on MariaDB 10.11), and a limit it outgrew would
/// stop every claim, for every key, until that key drained, which it could
/// not.
const RELAY_SESSION_LIMITS: &str =
    "SET SESSION lock_wait_timeout = 5, SESSION innodb_lock_wait_timeout = 5";

/// The pool claims and completions run on: the same server, database,
/// credentials and size as `pool`, connecting on first use, with the limits
/// of [`RELAY_SESSION_LIMITS`] set in each session. A pool of its own so that
/// those limits never reach producers or admin commands sharing `pool` (a
/// producer may rightly wait 50 s for a key's lock).
///
/// No ping before each use: a claim would pay a second round trip for it,
/// and a connection that died meanwhile fails one claim with
/// [`StoreError::Unavailable`] and is then closed (see `Closing`).
fn claim_pool(pool: &MySqlPool) -> MySqlPool {
    let options = pool.options();
    MySqlPoolOptions::new()
        .max_connections(options.get_max_connections())
        .acquire_timeout(options.get_acquire_timeout())
        .test_before_acquire(false)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                conn.execute(RELAY_SESSION_LIMITS).await?;
                Ok(())
            })
        })
        .connect_lazy_with((*pool.connect_options()).clone())
}

/// Set in each session of [`MySqlStore::connect`]'s pool.
const READ_COMMITTED: &str = "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED";

/// How long [`MySqlStore::connect`] waits for the one direct connection it
/// tries after its pool timed out (see [`connect_timed_out`]).
const CAUSE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// The error of connecting to `shown` (the URL without its password) when
/// the pool timed out. sqlx's `PoolTimedOut` does not say why: the pool
/// retries a refused connection (or a failing session setup) until its
/// acquire timeout, then reports only the timeout. One direct connection
/// with the same `options` and session setup, bounded by
/// [`CAUSE_ATTEMPT_TIMEOUT`], names the cause ("Connection refused (os
/// error 111)"), mapped like any connect error: refused credentials or a
/// missing database found meanwhile are still [`StoreError::Config`],
/// anything else [`StoreError::Unavailable`] as the timeout was. If that
/// attempt gets no answer either, or succeeds (the server came up
/// meanwhile), the pool's timeout is reported.
async fn connect_timed_out(options: &MySqlConnectOptions, shown: &str) -> StoreError {
    use sqlx::Connection as _;
    let attempt = async {
        let mut conn = MySqlConnection::connect_with(options).await?;
        let setup = conn.execute(READ_COMMITTED).await;
        // an error closing this connection is no cause of the timeout
        let _ = conn.close().await;
        setup.map(drop)
    };
    let cause = match tokio::time::timeout(CAUSE_ATTEMPT_TIMEOUT, attempt).await {
        Ok(Err(e)) => e,
        // a race: the server answers now; the error stays the timeout
        Ok(Ok(())) | Err(_) => sqlx::Error::PoolTimedOut,
    };
    match map_connect_err(cause, shown) {
        // the pool timing out is Unavailable; so is what kept it from connecting
        StoreError::Database(e) => StoreError::Unavailable(e),
        other => other,
    }
}

/// The outbox store on MySQL or MariaDB; implements [`Store`].
///
/// ```no_run
/// # async fn run() -> Result<(), postbox_core::StoreError> {
/// let store = postbox_mysql::MySqlStore::connect("mysql://app:secret@127.0.0.1/shop").await?;
/// postbox_mysql::migrate(store.pool()).await?;
/// # Ok(()) }
/// ```
///
/// Claims and completions run on a second pool of the same size on the same
/// database, connecting on first use, whose sessions stop a lock wait after
/// 5 s (`lock_wait_timeout`, `innodb_lock_wait_timeout`) with
/// [`StoreError::Unavailable`]; a claim or
/// completion given up before it finished closes its connection instead of
/// returning it. Everything else uses [`MySqlStore::pool`].
#[derive(Clone)]
pub struct MySqlStore {
    pool: MySqlPool,
    /// Claims and completions only: see [`claim_pool`].
    claims: MySqlPool,
    outbox: MySqlOutbox,
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
            claims: claim_pool(&pool),
            pool,
            outbox,
        }
    }

    /// Connects a pool to `url` (`mysql://user:password@host:port/database`)
    /// whose sessions run in READ COMMITTED, for the default table
    /// `postbox_outbox`.
    ///
    /// Errors name the URL without its password: a bad URL, refused
    /// credentials or a missing database are [`StoreError::Config`]; an
    /// unreachable server is [`StoreError::Unavailable`] (a refused
    /// connection is retried for 10 s, and the error then names the cause,
    /// "Connection refused", not just the timeout); a server without
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
        let pool = match MySqlPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute(READ_COMMITTED).await?;
                    Ok(())
                })
            })
            .connect_with(options.clone())
            .await
        {
            Ok(pool) => pool,
            Err(sqlx::Error::PoolTimedOut) => {
                return Err(connect_timed_out(&options, &shown).await);
            }
            Err(e) => return Err(map_connect_err(e, &shown)),
        };
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
        Self {
            pool: self.pool.clone(),
            claims: self.claims.clone(),
            outbox,
        }
    }

    /// This store keeping sent messages for `keep` instead of deleting them
    /// (see [`MySqlOutbox::retain_sent`]).
    #[must_use]
    pub fn retain_sent(mut self, keep: Option<Duration>) -> Self {
        self.outbox = self.outbox.retain_sent(keep);
        self
    }

    /// The outbox table this store reads.
    pub fn outbox(&self) -> &MySqlOutbox {
        &self.outbox
    }

    /// The connection pool (everything but claims and completions).
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }
}

impl Store for MySqlStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        claim::claim(&self.outbox.inner, &self.claims, req).await
    }

    async fn complete(
        &self,
        token: Uuid,
        completions: &[Completion],
    ) -> Result<CompleteReport, StoreError> {
        claim::complete(
            &self.outbox.inner,
            &self.claims,
            token,
            completions,
            self.outbox.sent_retention().is_some(),
        )
        .await
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

    async fn pending_tenants(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        admin::pending_tenants(&self.outbox.inner, &self.pool, limit).await
    }

    fn sent_retention(&self) -> Option<Duration> {
        self.outbox.sent_retention()
    }

    async fn purge_sent(&self, older_than: Duration, limit: usize) -> Result<u64, StoreError> {
        admin::purge_sent(&self.outbox.inner, &self.pool, older_than, limit).await
    }

    async fn stats_by(&self, filter: &Filter, by: GroupBy) -> Result<Vec<GroupStats>, StoreError> {
        admin::stats_by(&self.outbox.inner, &self.pool, filter, by).await
    }

    async fn heartbeat(&self, beat: &RelayHeartbeat) -> Result<(), StoreError> {
        heartbeat::write(&self.outbox.inner, &self.pool, beat).await
    }

    async fn relays(&self) -> Result<Vec<RelayRecord>, StoreError> {
        heartbeat::list(&self.outbox.inner, &self.pool).await
    }

    async fn remove_relay(&self, relay_id: Uuid) -> Result<bool, StoreError> {
        heartbeat::remove(&self.outbox.inner, &self.pool, relay_id).await
    }
}
