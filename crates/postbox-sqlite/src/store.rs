//! [`SqliteStore`]: the [`Store`] implementation.

use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use postbox_core::{
    Claim, ClaimRequest, CompleteReport, Completion, Disposition, Filter, Headers, Lease,
    ListQuery, Malformed, Message, MessageRecord, PurgeQuery, Stats, Status, Store, StoreError,
    from_unix_micros, redact_url,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use uuid::Uuid;

use crate::SqliteOutbox;
use crate::error::db_error;
use crate::sql::{NOW, RECORD_COLUMNS};

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// The SQLite outbox store. Cheap to clone (a pool handle).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    outbox: SqliteOutbox,
}

impl SqliteStore {
    /// A store over an existing pool (table `postbox_outbox` unless built
    /// through [`SqliteOutbox::store`]).
    pub fn new(pool: SqlitePool, outbox: SqliteOutbox) -> Self {
        Self { pool, outbox }
    }

    /// Opens (creating if missing) the database at `url`
    /// (`sqlite://path.db` or `sqlite::memory:`) in WAL mode with a busy
    /// timeout, for the default table.
    ///
    /// The relay's own connections use `synchronous = NORMAL`: losing its
    /// last deletes on power loss only means redelivery, never loss.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("bad SQLite URL {}: {e}", redact_url(url))))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(|e| match db_error(e) {
                StoreError::Database(inner) | StoreError::Unavailable(inner) => StoreError::Config(
                    format!("cannot open SQLite database {}: {inner}", redact_url(url)),
                ),
                other => other,
            })?;
        Ok(Self::new(pool, SqliteOutbox::default()))
    }

    /// The table and its SQL.
    pub fn outbox(&self) -> &SqliteOutbox {
        &self.outbox
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Moves every stored timestamp back by `by`, as if `by` had passed.
    /// For tests of retry, delay and lease logic; never use it in production.
    #[doc(hidden)]
    pub async fn shift_time_back(&self, by: Duration) -> Result<(), StoreError> {
        let t = &self.outbox.sql().table;
        sqlx::query(&format!(
            "UPDATE {t} SET available_at = available_at - ?1, created_at = created_at - ?1, \
             lease_until = lease_until - ?1"
        ))
        .bind(micros(by))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(())
    }
}

fn message_from_row(row: &SqliteRow) -> Result<Message, Malformed> {
    let seq: i64 = row.get("seq");
    let key: Option<String> = row.try_get("key").ok().flatten();
    let bad = |reason: String| Malformed {
        seq,
        key: key.clone(),
        reason,
    };
    let id: Uuid = row
        .try_get("id")
        .map_err(|e| bad(format!("id is not a 16-byte UUID: {e}")))?;
    let topic: String = row
        .try_get("topic")
        .map_err(|e| bad(format!("topic: {e}")))?;
    // Payload may have been written as TEXT by a plain-SQL producer.
    let payload: Vec<u8> = row
        .try_get_unchecked("payload")
        .map_err(|e| bad(format!("payload: {e}")))?;
    let headers_text: String = row
        .try_get_unchecked("headers")
        .map_err(|e| bad(format!("headers: {e}")))?;
    let headers: Headers = serde_json::from_str(&headers_text)
        .map_err(|e| bad(format!("headers are not a JSON object of strings: {e}")))?;
    let tenant: Option<String> = row
        .try_get("tenant")
        .map_err(|e| bad(format!("tenant: {e}")))?;
    let attempts: i64 = row.get("attempts");
    let max_attempts: Option<i64> = row.try_get("max_attempts").ok().flatten();
    let created_at: i64 = row.get("created_at");
    Ok(Message::new(
        id,
        seq,
        topic,
        key.clone(),
        Bytes::from(payload),
        headers,
        tenant,
        u32::try_from(attempts).unwrap_or(u32::MAX),
        max_attempts.and_then(|m| u32::try_from(m).ok()),
        from_unix_micros(created_at),
    ))
}

fn record_from_row(row: &SqliteRow, now: i64) -> Result<MessageRecord, StoreError> {
    let get = |e: sqlx::Error| StoreError::Database(Box::new(e));
    let status: String = row.try_get("status").map_err(get)?;
    let lease_until: Option<i64> = row.try_get("lease_until").map_err(get)?;
    let status = match status.as_str() {
        "dead" => Status::Dead,
        "sent" => Status::Sent,
        _ if lease_until.is_some_and(|l| l > now) => Status::Leased,
        _ => Status::Pending,
    };
    let headers_text: String = row.try_get_unchecked("headers").map_err(get)?;
    let payload: Vec<u8> = row.try_get_unchecked("payload").map_err(get)?;
    let max_attempts: Option<i64> = row.try_get("max_attempts").map_err(get)?;
    let attempts: i64 = row.try_get("attempts").map_err(get)?;
    Ok(MessageRecord::new(
        row.try_get("seq").map_err(get)?,
        row.try_get("id").unwrap_or_else(|_| Uuid::nil()),
        row.try_get("topic").map_err(get)?,
        row.try_get("key").map_err(get)?,
        row.try_get("tenant").map_err(get)?,
        status,
        u32::try_from(attempts).unwrap_or(u32::MAX),
        max_attempts.and_then(|m| u32::try_from(m).ok()),
        row.try_get("last_error").map_err(get)?,
        row.try_get::<bool, _>("parked").map_err(get)?,
        from_unix_micros(row.try_get("created_at").map_err(get)?),
        from_unix_micros(row.try_get("available_at").map_err(get)?),
        // an undecodable header column still lists; the relay dead-letters it
        serde_json::from_str(&headers_text).unwrap_or_default(),
        Bytes::from(payload),
    ))
}

/// Appends `AND ...` conditions for `f`, with bound values.
fn push_filter(q: &mut QueryBuilder<'_, Sqlite>, f: &Filter) {
    if let Some(topic) = &f.topic {
        q.push(" AND topic = ").push_bind(topic.clone());
    }
    if let Some(key) = &f.key {
        q.push(" AND key = ").push_bind(key.clone());
    }
    if let Some(tenant) = &f.tenant {
        q.push(" AND tenant = ").push_bind(tenant.clone());
    }
    if !f.ids.is_empty() {
        q.push(" AND id IN (");
        let mut ids = q.separated(", ");
        for id in &f.ids {
            ids.push_bind(*id);
        }
        q.push(")");
    }
    if let Some(age) = f.older_than {
        q.push(format!(" AND created_at <= {NOW} - "))
            .push_bind(micros(age));
    }
    if let Some(text) = &f.error_contains {
        q.push(" AND instr(last_error, ")
            .push_bind(text.clone())
            .push(") > 0");
    }
}

impl Store for SqliteStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let sql = self.outbox.sql();
        let token = Uuid::new_v4();
        let limit = i64::try_from(req.limit).unwrap_or(i64::MAX);
        let query = match &req.tenant {
            None => sqlx::query(&sql.claim),
            Some(_) => sqlx::query(&sql.claim_tenant),
        }
        .bind(token)
        .bind(micros(req.lease))
        .bind(limit);
        let query = match &req.tenant {
            Some(t) => query.bind(t.as_str()),
            None => query,
        };
        let mut rows = query.fetch_all(&self.pool).await.map_err(db_error)?;
        // RETURNING gives no order guarantee.
        rows.sort_by_key(|r| r.get::<i64, _>("seq"));
        let expires_at = rows
            .first()
            .and_then(|r| r.try_get::<i64, _>(10).ok())
            .map_or_else(std::time::SystemTime::now, from_unix_micros);
        let mut messages = Vec::with_capacity(rows.len());
        let mut malformed = Vec::new();
        for row in &rows {
            match message_from_row(row) {
                Ok(m) => messages.push(m),
                Err(bad) => malformed.push(bad),
            }
        }
        Ok(Claim::new(Lease { token, expires_at }, messages, malformed))
    }

    async fn complete(
        &self,
        token: Uuid,
        completions: &[Completion],
    ) -> Result<CompleteReport, StoreError> {
        let sql = self.outbox.sql();
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_error)?;
        let mut applied = 0;
        let sent: Vec<i64> = completions
            .iter()
            .filter(|c| c.disposition == Disposition::Sent)
            .map(|c| c.seq)
            .collect();
        if !sent.is_empty() {
            let seqs = serde_json::to_string(&sent).unwrap_or_else(|_| "[]".to_owned());
            applied += sqlx::query(&sql.complete_sent_many)
                .bind(token)
                .bind(seqs)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?
                .rows_affected();
        }
        for c in completions {
            let q = match &c.disposition {
                Disposition::Sent => continue,
                Disposition::Retry { delay, error } => sqlx::query(&sql.complete_retry)
                    .bind(c.seq)
                    .bind(token)
                    .bind(micros(*delay))
                    .bind(error.as_str()),
                Disposition::Dead { error, park } => sqlx::query(&sql.complete_dead)
                    .bind(c.seq)
                    .bind(token)
                    .bind(*park)
                    .bind(error.as_str()),
                Disposition::Release => sqlx::query(&sql.complete_release).bind(c.seq).bind(token),
                other => {
                    return Err(StoreError::Config(format!(
                        "unsupported disposition {other:?}"
                    )));
                }
            };
            applied += q.execute(&mut *tx).await.map_err(db_error)?.rows_affected();
        }
        tx.commit().await.map_err(db_error)?;
        Ok(CompleteReport {
            applied,
            lost: completions.len() as u64 - applied,
        })
    }

    async fn stats(&self, filter: &Filter) -> Result<Stats, StoreError> {
        let t = &self.outbox.sql().table;
        let mut q = QueryBuilder::<Sqlite>::new(format!(
            "WITH n(now) AS (SELECT {NOW}), r AS (SELECT o.*, \
               (o.status = 'pending' AND coalesce(o.lease_until, 0) > n.now) AS leased, n.now AS now \
               FROM {t} o, n WHERE 1 = 1"
        ));
        push_filter(&mut q, filter);
        q.push(
            ") SELECT \
               coalesce(sum(status = 'pending' AND NOT leased AND attempts = 0 AND available_at <= now), 0), \
               coalesce(sum(status = 'pending' AND NOT leased AND attempts = 0 AND available_at > now), 0), \
               coalesce(sum(status = 'pending' AND NOT leased AND attempts > 0), 0), \
               coalesce(sum(leased), 0), \
               coalesce(sum(status = 'dead'), 0), \
               count(DISTINCT CASE WHEN status = 'dead' AND parked = 1 THEN key END), \
               coalesce(sum(status = 'sent'), 0), \
               min(CASE WHEN status = 'pending' THEN created_at END) \
             FROM r",
        );
        let row = q.build().fetch_one(&self.pool).await.map_err(db_error)?;
        let n = |i: usize| row.get::<i64, _>(i).max(0).unsigned_abs();
        Ok(Stats::new(
            n(0),
            n(1),
            n(2),
            n(3),
            n(4),
            n(5),
            n(6),
            row.get::<Option<i64>, _>(7).map(from_unix_micros),
        ))
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<MessageRecord>, StoreError> {
        let t = &self.outbox.sql().table;
        let now: i64 = sqlx::query_scalar(&format!("SELECT {NOW}"))
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)?;
        let mut q =
            QueryBuilder::<Sqlite>::new(format!("SELECT {RECORD_COLUMNS} FROM {t} WHERE 1 = 1"));
        push_filter(&mut q, &query.filter);
        match query.status {
            None => {}
            Some(Status::Pending) => {
                q.push(" AND status = 'pending' AND coalesce(lease_until, 0) <= ")
                    .push_bind(now);
            }
            Some(Status::Leased) => {
                q.push(" AND status = 'pending' AND coalesce(lease_until, 0) > ")
                    .push_bind(now);
            }
            Some(Status::Dead) => {
                q.push(" AND status = 'dead'");
            }
            Some(Status::Sent) => {
                q.push(" AND status = 'sent'");
            }
            Some(other) => {
                return Err(StoreError::Config(format!("cannot list status {other:?}")));
            }
        }
        if let Some(after) = query.after_seq {
            q.push(" AND seq > ").push_bind(after);
        }
        q.push(" ORDER BY seq LIMIT ")
            .push_bind(i64::try_from(query.limit).unwrap_or(i64::MAX));
        let rows = q.build().fetch_all(&self.pool).await.map_err(db_error)?;
        rows.iter().map(|r| record_from_row(r, now)).collect()
    }

    async fn replay(&self, filter: &Filter) -> Result<u64, StoreError> {
        let t = &self.outbox.sql().table;
        let mut q = QueryBuilder::<Sqlite>::new(format!(
            "UPDATE {t} SET status = 'pending', attempts = 0, parked = 0, available_at = {NOW}, \
             lease_token = NULL, lease_until = NULL WHERE status = 'dead'"
        ));
        push_filter(&mut q, filter);
        Ok(q.build()
            .execute(&self.pool)
            .await
            .map_err(db_error)?
            .rows_affected())
    }

    async fn skip(&self, filter: &Filter) -> Result<u64, StoreError> {
        let t = &self.outbox.sql().table;
        let mut q = QueryBuilder::<Sqlite>::new(format!(
            "UPDATE {t} SET parked = 0 WHERE status = 'dead' AND parked = 1"
        ));
        push_filter(&mut q, filter);
        Ok(q.build()
            .execute(&self.pool)
            .await
            .map_err(db_error)?
            .rows_affected())
    }

    async fn purge(&self, query: &PurgeQuery) -> Result<u64, StoreError> {
        let status = match query.status {
            Status::Dead => "dead",
            Status::Sent => "sent",
            other => {
                return Err(StoreError::Config(format!(
                    "only dead or sent messages can be purged, not {other:?}"
                )));
            }
        };
        let t = &self.outbox.sql().table;
        let mut q =
            QueryBuilder::<Sqlite>::new(format!("DELETE FROM {t} WHERE status = '{status}'"));
        push_filter(&mut q, &query.filter);
        Ok(q.build()
            .execute(&self.pool)
            .await
            .map_err(db_error)?
            .rows_affected())
    }
}
