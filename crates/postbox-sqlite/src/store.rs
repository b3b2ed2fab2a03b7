//! [`SqliteStore`]: the [`Store`] implementation.

use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use postbox_core::{
    Claim, ClaimRequest, CompleteReport, Completion, Disposition, Filter, GroupBy, GroupStats,
    Headers, Lease, ListQuery, Malformed, Message, MessageRecord, PurgeQuery, RelayHeartbeat,
    RelayRecord, Stats, Status, Store, StoreError, from_unix_micros, redact_url, to_unix_micros,
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
    ///
    /// A file that cannot be opened is [`StoreError::Config`]; one that
    /// stays busy or locked past the 5 s busy timeout (another process in a
    /// long transaction) is [`StoreError::Unavailable`], to retry.
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
                StoreError::Database(inner) => StoreError::Config(format!(
                    "cannot open SQLite database {}: {inner}",
                    redact_url(url)
                )),
                // busy or locked past the busy timeout (another process in a
                // long transaction): worth retrying, not a bad configuration
                other => other,
            })?;
        Ok(Self::new(pool, SqliteOutbox::default()))
    }

    /// This store keeping sent messages for `keep` instead of deleting them
    /// (see [`SqliteOutbox::retain_sent`]).
    #[must_use]
    pub fn retain_sent(mut self, keep: Option<Duration>) -> Self {
        self.outbox = self.outbox.retain_sent(keep);
        self
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
             lease_until = lease_until - ?1, sent_at = sent_at - ?1"
        ))
        .bind(micros(by))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        // heartbeats are stamped on the database clock too
        sqlx::query(&format!(
            "UPDATE {} SET last_heartbeat = last_heartbeat - ?1",
            self.outbox.sql().relays
        ))
        .bind(micros(by))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(())
    }
}

/// The counting columns shared by `stats` and `stats_by`, over a CTE `r`
/// holding the filtered rows with `leased` and `now`.
const COUNTS: &str = "\
    coalesce(sum(status = 'pending' AND NOT leased AND attempts = 0 AND available_at <= now), 0), \
    coalesce(sum(status = 'pending' AND NOT leased AND attempts = 0 AND available_at > now), 0), \
    coalesce(sum(status = 'pending' AND NOT leased AND attempts > 0), 0), \
    coalesce(sum(leased), 0), \
    coalesce(sum(status = 'dead'), 0), \
    count(DISTINCT CASE WHEN status = 'dead' AND parked = 1 THEN key END), \
    coalesce(sum(status = 'sent'), 0), \
    min(CASE WHEN status = 'pending' THEN created_at END)";

/// The filtered rows with their lease state, for `stats` and `stats_by`.
fn counted_rows(t: &str, filter: &Filter) -> QueryBuilder<'static, Sqlite> {
    let mut q = QueryBuilder::<Sqlite>::new(format!(
        "WITH n(now) AS (SELECT {NOW}), r AS (SELECT o.*, \
           (o.status = 'pending' AND coalesce(o.lease_until, 0) > n.now) AS leased, n.now AS now \
           FROM {t} o, n WHERE 1 = 1"
    ));
    push_filter(&mut q, filter);
    q.push(")");
    q
}

/// Reads the `COUNTS` columns starting at `at`.
fn stats_from_row(row: &SqliteRow, at: usize) -> Stats {
    let n = |i: usize| row.get::<i64, _>(at + i).max(0).unsigned_abs();
    Stats::new(
        n(0),
        n(1),
        n(2),
        n(3),
        n(4),
        n(5),
        n(6),
        row.get::<Option<i64>, _>(at + 7).map(from_unix_micros),
    )
}

fn relay_from_row(row: &SqliteRow) -> Result<RelayRecord, StoreError> {
    let get = |e: sqlx::Error| StoreError::Database(Box::new(e));
    let us = |col: &str| -> Result<Duration, StoreError> {
        Ok(Duration::from_micros(
            row.try_get::<i64, _>(col)
                .map_err(get)?
                .max(0)
                .unsigned_abs(),
        ))
    };
    let heartbeat = RelayHeartbeat::new(
        row.try_get("relay_id").map_err(get)?,
        row.try_get::<String, _>("host").map_err(get)?,
        u32::try_from(row.try_get::<i64, _>("pid").map_err(get)?).unwrap_or(0),
        row.try_get::<String, _>("version").map_err(get)?,
        from_unix_micros(row.try_get("started_at").map_err(get)?),
        us("interval_us")?,
    )
    .last_claim_at(
        row.try_get::<Option<i64>, _>("last_claim_at")
            .map_err(get)?
            .map(from_unix_micros),
    )
    .leased(
        row.try_get::<i64, _>("leased")
            .map_err(get)?
            .max(0)
            .unsigned_abs(),
    );
    Ok(RelayRecord::new(
        heartbeat,
        from_unix_micros(row.try_get("last_heartbeat").map_err(get)?),
        us("silent_us")?,
    ))
}

fn message_from_row(row: &SqliteRow) -> Result<Message, Malformed> {
    let seq: i64 = row.get("seq");
    // SQLite's TEXT takes any bytes from a plain-SQL producer: a key that is
    // not UTF-8 dead-letters the row (and, shown lossily, parks that key)
    // rather than letting it through as a keyless message.
    let raw_key: Option<Vec<u8>> = row.try_get_unchecked("key").ok().flatten();
    let key = raw_key
        .as_deref()
        .map(|k| String::from_utf8_lossy(k).into_owned());
    let bad = |reason: String| Malformed {
        seq,
        key: key.clone(),
        reason,
    };
    if raw_key
        .as_deref()
        .is_some_and(|k| std::str::from_utf8(k).is_err())
    {
        return Err(bad("key is not valid UTF-8".to_owned()));
    }
    if row.try_get::<bool, _>("available_at_ok").ok() == Some(false) {
        return Err(bad(
            "available_at is not a number (Unix microseconds): SQLite would never find it due"
                .to_owned(),
        ));
    }
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
    let max_attempts: Option<i64> = row
        .try_get("max_attempts")
        .map_err(|e| bad(format!("max_attempts is not an integer: {e}")))?;
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
    // Text columns a producer may have filled with bytes that are not
    // UTF-8 are shown lossily: `dead list` must show the rows the relay
    // dead-lettered for exactly that reason.
    let lossy = |col: &str| -> Result<Option<String>, StoreError> {
        let bytes: Option<Vec<u8>> = row.try_get_unchecked(col).map_err(get)?;
        Ok(bytes.map(|b| String::from_utf8_lossy(&b).into_owned()))
    };
    let headers_text = lossy("headers")?.unwrap_or_default();
    let payload: Vec<u8> = row.try_get_unchecked("payload").map_err(get)?;
    // A plain-SQL producer's text in these two columns dead-letters the
    // row; it must still list (to be replayed, skipped or purged): shown
    // as no limit, and as due when created.
    let max_attempts: Option<i64> = row.try_get("max_attempts").ok().flatten();
    let available_at: i64 = match row.try_get("available_at") {
        Ok(at) => at,
        Err(_) => row.try_get("created_at").map_err(get)?,
    };
    let attempts: i64 = row.try_get("attempts").map_err(get)?;
    Ok(MessageRecord::new(
        row.try_get("seq").map_err(get)?,
        row.try_get("id").unwrap_or_else(|_| Uuid::nil()),
        lossy("topic")?.unwrap_or_default(),
        lossy("key")?,
        lossy("tenant")?,
        status,
        u32::try_from(attempts).unwrap_or(u32::MAX),
        max_attempts.and_then(|m| u32::try_from(m).ok()),
        row.try_get("last_error").map_err(get)?,
        row.try_get::<bool, _>("parked").map_err(get)?,
        from_unix_micros(row.try_get("created_at").map_err(get)?),
        from_unix_micros(available_at),
        // an undecodable header column still lists; the relay dead-letters it
        serde_json::from_str(&headers_text).unwrap_or_default(),
        Bytes::from(payload),
    )
    .sent_at(
        row.try_get::<Option<i64>, _>("sent_at")
            .map_err(get)?
            .map(from_unix_micros),
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
            let statement = match self.outbox.sent_retention() {
                Some(_) => &sql.complete_sent_keep,
                None => &sql.complete_sent_many,
            };
            applied += sqlx::query(statement)
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
        let mut q = counted_rows(&self.outbox.sql().table, filter);
        q.push(format!(" SELECT {COUNTS} FROM r"));
        let row = q.build().fetch_one(&self.pool).await.map_err(db_error)?;
        Ok(stats_from_row(&row, 0))
    }

    async fn pending_tenants(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(&self.outbox.sql().pending_tenants)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)
    }

    async fn stats_by(&self, filter: &Filter, by: GroupBy) -> Result<Vec<GroupStats>, StoreError> {
        let column = match by {
            GroupBy::Tenant => "tenant",
            _ => "topic",
        };
        let mut q = counted_rows(&self.outbox.sql().table, filter);
        q.push(format!(
            " SELECT {column}, {COUNTS} FROM r GROUP BY {column} ORDER BY {column}"
        ));
        let rows = q.build().fetch_all(&self.pool).await.map_err(db_error)?;
        rows.iter()
            .map(|row| {
                let group: Option<String> = row.try_get(0).map_err(db_error)?;
                Ok(GroupStats::new(group, stats_from_row(row, 1)))
            })
            .collect()
    }

    async fn heartbeat(&self, heartbeat: &RelayHeartbeat) -> Result<(), StoreError> {
        sqlx::query(&self.outbox.sql().heartbeat)
            .bind(heartbeat.relay_id)
            .bind(heartbeat.host.as_str())
            .bind(i64::from(heartbeat.pid))
            .bind(heartbeat.version.as_str())
            .bind(to_unix_micros(heartbeat.started_at))
            .bind(micros(heartbeat.interval))
            .bind(heartbeat.last_claim_at.map(to_unix_micros))
            .bind(i64::try_from(heartbeat.leased).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn relays(&self) -> Result<Vec<RelayRecord>, StoreError> {
        let rows = sqlx::query(&self.outbox.sql().list_relays)
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        rows.iter().map(relay_from_row).collect()
    }

    async fn remove_relay(&self, relay_id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.outbox.sql().remove_relay)
            .bind(relay_id)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(done.rows_affected() > 0)
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
        // A `max_attempts` a plain-SQL producer wrote as text or a real is
        // what dead-lettered the row (see `message_from_row`); replayed as
        // it is, it would go straight back to dead. It becomes NULL (the
        // relay's limit), as `available_at` becomes now.
        let mut q = QueryBuilder::<Sqlite>::new(format!(
            "UPDATE {t} SET status = 'pending', attempts = 0, parked = 0, available_at = {NOW}, \
             max_attempts = CASE WHEN typeof(max_attempts) = 'integer' THEN max_attempts END, \
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

    fn parallel_writes(&self) -> bool {
        // one writer at a time: a completion and a claim would queue on the
        // database lock (and its busy-wait backoff) rather than overlap
        false
    }

    fn sent_retention(&self) -> Option<Duration> {
        self.outbox.sent_retention()
    }

    async fn purge_sent(&self, older_than: Duration, limit: usize) -> Result<u64, StoreError> {
        Ok(sqlx::query(&self.outbox.sql().purge_sent)
            .bind(micros(older_than))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await
            .map_err(db_error)?
            .rows_affected())
    }
}
