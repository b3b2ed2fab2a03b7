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

/// The SQLite outbox store. Cheap to clone (pool handles).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Handed to producers ([`SqliteStore::pool`]) and used by the
    /// operator's commands.
    pool: SqlitePool,
    /// The relay's claims, completions, heartbeats and cleanups: the same
    /// pool unless built by [`SqliteStore::connect`].
    relay: SqlitePool,
    outbox: SqliteOutbox,
}

/// How many connections each of [`SqliteStore::connect`]'s pools opens.
const POOL_SIZE: u32 = 4;

impl SqliteStore {
    /// A store over an existing pool (table `postbox_outbox` unless built
    /// through [`SqliteOutbox::store`]), used for everything: its
    /// `synchronous` setting is yours.
    pub fn new(pool: SqlitePool, outbox: SqliteOutbox) -> Self {
        Self {
            relay: pool.clone(),
            pool,
            outbox,
        }
    }

    /// Opens (creating if missing) the database at `url`
    /// (`sqlite://path.db` or `sqlite::memory:`) in WAL mode with a busy
    /// timeout, for the default table.
    ///
    /// It opens two pools on the file. [`SqliteStore::pool`], for your
    /// transactions, uses `synchronous = FULL`: in WAL mode a `NORMAL`
    /// commit is not on disk until a checkpoint, so a power cut could undo a
    /// transaction whose message the relay had already published. The
    /// relay's claims, completions, heartbeats and cleanups use a pool of
    /// their own with `synchronous = NORMAL`: losing them only means
    /// redelivery, never loss (the log is written in order, so a later
    /// `FULL` commit also makes every earlier one durable).
    ///
    /// A file that cannot be opened is [`StoreError::Config`]; one that
    /// stays busy or locked past the 5 s busy timeout (another process in a
    /// long transaction) is [`StoreError::Unavailable`], to retry.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        // one options value for both pools: `sqlite::memory:` names its
        // shared in-memory database when parsed, so both open the same one
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("bad SQLite URL {}: {e}", redact_url(url))))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        let open = |synchronous: SqliteSynchronous| {
            SqlitePoolOptions::new()
                .max_connections(POOL_SIZE)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts.clone().synchronous(synchronous))
        };
        let opened = |r: Result<SqlitePool, sqlx::Error>| {
            r.map_err(|e| match db_error(e) {
                StoreError::Database(inner) => StoreError::Config(format!(
                    "cannot open SQLite database {}: {inner}",
                    redact_url(url)
                )),
                // busy or locked past the busy timeout (another process in a
                // long transaction): worth retrying, not a bad configuration
                other => other,
            })
        };
        let pool = opened(open(SqliteSynchronous::Full).await)?;
        let relay = opened(open(SqliteSynchronous::Normal).await)?;
        Ok(Self {
            pool,
            relay,
            outbox: SqliteOutbox::default(),
        })
    }

    /// This store over table `outbox` (and with its retention), keeping
    /// both of [`SqliteStore::connect`]'s pools; `outbox.store(pool)` would
    /// run the relay on the one pool.
    #[must_use]
    pub fn with_outbox(mut self, outbox: SqliteOutbox) -> Self {
        self.outbox = outbox;
        self
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

    /// The pool for your own transactions (`synchronous = FULL` when
    /// opened by [`SqliteStore::connect`]).
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

/// Rows one `replay`, `skip` or `purge` statement changes at most: each
/// statement is a write transaction holding SQLite's only write lock, and
/// producers wait for it at most their busy timeout (5 s). A few hundred
/// rows take milliseconds; a million in one statement took seconds.
const ADMIN_BATCH: i64 = 500;

impl SqliteStore {
    /// Runs `head` (an UPDATE or DELETE of the table) over the rows
    /// matching `cond` and `filter`, [`ADMIN_BATCH`] rows per statement in
    /// `seq` order, each statement its own transaction; returns how many
    /// rows changed.
    ///
    /// The rows are those up to the table's last `seq` when it starts, and
    /// `older_than` counts from that moment too, as in one statement. The
    /// cursor moves past each batch, so a row is changed at most once (a
    /// replayed row the relay dead-letters again meanwhile is not replayed
    /// twice) and no batch rescans rows the filter rejected.
    async fn in_batches(&self, head: &str, cond: &str, filter: &Filter) -> Result<u64, StoreError> {
        let t = &self.outbox.sql().table;
        let (now, top): (i64, i64) =
            sqlx::query_as(&format!("SELECT {NOW}, coalesce(max(seq), 0) FROM {t}"))
                .fetch_one(&self.pool)
                .await
                .map_err(db_error)?;
        let mut from = i64::MIN;
        let mut changed = 0;
        loop {
            let mut q = QueryBuilder::<Sqlite>::new(format!(
                "{head} WHERE seq IN (SELECT seq FROM {t} WHERE {cond} AND seq BETWEEN "
            ));
            q.push_bind(from).push(" AND ").push_bind(top);
            push_filter(&mut q, filter, Some(now));
            q.push(" ORDER BY seq LIMIT ")
                .push_bind(ADMIN_BATCH)
                .push(") RETURNING seq");
            let seqs: Vec<i64> = q
                .build_query_scalar()
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
            changed += seqs.len() as u64;
            let last = seqs.iter().max().copied();
            match last.and_then(|l| l.checked_add(1)) {
                Some(next) if seqs.len() as i64 == ADMIN_BATCH => from = next,
                _ => return Ok(changed),
            }
        }
    }
}

/// The counting columns shared by `stats` and `stats_by`, over a CTE `r`
/// holding the filtered rows with `leased` and `now`. A `created_at` a
/// plain-SQL producer wrote as text (an ORM's timestamp) has no age: the
/// oldest pending row is the oldest whose age is known.
const COUNTS: &str = "\
    coalesce(sum(status = 'pending' AND NOT leased AND attempts = 0 AND available_at <= now), 0), \
    coalesce(sum(status = 'pending' AND NOT leased AND attempts = 0 AND available_at > now), 0), \
    coalesce(sum(status = 'pending' AND NOT leased AND attempts > 0), 0), \
    coalesce(sum(leased), 0), \
    coalesce(sum(status = 'dead'), 0), \
    count(DISTINCT CASE WHEN status = 'dead' AND parked = 1 THEN key END), \
    coalesce(sum(status = 'sent'), 0), \
    min(CASE WHEN status = 'pending' AND typeof(created_at) = 'integer' THEN created_at END)";

/// The filtered rows with their lease state, for `stats` and `stats_by`.
fn counted_rows(t: &str, filter: &Filter) -> QueryBuilder<'static, Sqlite> {
    let mut q = QueryBuilder::<Sqlite>::new(format!(
        "WITH n(now) AS (SELECT {NOW}), r AS (SELECT o.*, \
           (o.status = 'pending' AND coalesce(o.lease_until, 0) > n.now) AS leased, n.now AS now \
           FROM {t} o, n WHERE 1 = 1"
    ));
    push_filter(&mut q, filter, None);
    q.push(")");
    q
}

/// Reads the `COUNTS` columns starting at `at`.
fn stats_from_row(row: &SqliteRow, at: usize) -> Result<Stats, StoreError> {
    let n = |i: usize| -> Result<u64, StoreError> {
        Ok(row
            .try_get::<i64, _>(at + i)
            .map_err(db_error)?
            .max(0)
            .unsigned_abs())
    };
    Ok(Stats::new(
        n(0)?,
        n(1)?,
        n(2)?,
        n(3)?,
        n(4)?,
        n(5)?,
        n(6)?,
        row.try_get::<Option<i64>, _>(at + 7)
            .map_err(db_error)?
            .map(from_unix_micros),
    ))
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

/// Decodes one claimed row, whose `seq` the caller has read. The claim has
/// already leased it: a value of the wrong type (SQLite stores whatever a
/// plain-SQL producer gives it) makes it [`Malformed`], to be dead-lettered
/// with the reason, never an error that would leave the batch leased.
fn message_from_row(row: &SqliteRow, seq: i64) -> Result<Message, Malformed> {
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
    let attempts: i64 = row
        .try_get("attempts")
        .map_err(|e| bad(format!("attempts is not an integer: {e}")))?;
    let max_attempts: Option<i64> = row
        .try_get("max_attempts")
        .map_err(|e| bad(format!("max_attempts is not an integer: {e}")))?;
    // as on the other stores: a limit no relay can count to is the
    // producer's mistake, not a request for the relay's default
    let max_attempts = max_attempts
        .map(|m| {
            u32::try_from(m).map_err(|_| {
                bad(format!(
                    "max_attempts {m} is out of range (0 to {})",
                    u32::MAX
                ))
            })
        })
        .transpose()?;
    // an ORM's own timestamp (`CURRENT_TIMESTAMP`, Rails' `created_at`)
    let created_at: i64 = row.try_get("created_at").map_err(|e| {
        bad(format!(
            "created_at is not an integer (Unix microseconds; leave it to its default): {e}"
        ))
    })?;
    Ok(Message::new(
        id,
        seq,
        topic,
        key.clone(),
        Bytes::from(payload),
        headers,
        tenant,
        u32::try_from(attempts).unwrap_or(u32::MAX),
        max_attempts,
        from_unix_micros(created_at),
    ))
}

/// Decodes one listed row. `dead list` must show the rows the relay
/// dead-lettered for a value of the wrong type, to be replayed, skipped or
/// purged, so every column a producer could have mistyped is read leniently.
fn record_from_row(row: &SqliteRow, now: i64) -> Result<MessageRecord, StoreError> {
    let get = |e: sqlx::Error| StoreError::Database(Box::new(e));
    // the CHECK constraint keeps `status` one of three texts
    let status: String = row.try_get("status").map_err(get)?;
    let lease_until: Option<i64> = row.try_get("lease_until").ok().flatten();
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
    // A plain-SQL producer's text in these columns dead-letters the row: a
    // `max_attempts` shows as no limit; a time as the other one (due when
    // created, created when due), or the epoch when neither is a number.
    let max_attempts: Option<i64> = row.try_get("max_attempts").ok().flatten();
    let created_at: Option<i64> = row.try_get("created_at").ok();
    let available_at: Option<i64> = row.try_get("available_at").ok();
    let attempts: i64 = row.try_get("attempts").unwrap_or(0);
    Ok(MessageRecord::new(
        row.try_get("seq").map_err(get)?,
        row.try_get("id").unwrap_or_else(|_| Uuid::nil()),
        lossy("topic")?.unwrap_or_default(),
        lossy("key")?,
        lossy("tenant")?,
        status,
        u32::try_from(attempts).unwrap_or(u32::MAX),
        max_attempts.and_then(|m| u32::try_from(m).ok()),
        lossy("last_error")?,
        row.try_get::<bool, _>("parked").unwrap_or(false),
        from_unix_micros(created_at.or(available_at).unwrap_or(0)),
        from_unix_micros(available_at.or(created_at).unwrap_or(0)),
        // an undecodable header column still lists; the relay dead-letters it
        serde_json::from_str(&headers_text).unwrap_or_default(),
        Bytes::from(payload),
    )
    .sent_at(
        row.try_get::<Option<i64>, _>("sent_at")
            .ok()
            .flatten()
            .map(from_unix_micros),
    ))
}

/// Appends `AND ...` conditions for `f`, with bound values; `older_than`
/// counts back from `now` (µs), or from the statement's own clock.
fn push_filter(q: &mut QueryBuilder<'_, Sqlite>, f: &Filter, now: Option<i64>) {
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
        match now {
            Some(now) => q.push(" AND created_at <= ").push_bind(now),
            None => q.push(format!(" AND created_at <= {NOW}")),
        };
        q.push(" - ").push_bind(micros(age));
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
        let rows = query.fetch_all(&self.relay).await.map_err(db_error)?;
        // `seq` is the rowid (INTEGER PRIMARY KEY), an integer whatever a
        // producer writes, so this never fails once the leases are taken.
        let mut rows = rows
            .into_iter()
            .map(|r| Ok((r.try_get::<i64, _>("seq")?, r)))
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(db_error)?;
        // RETURNING gives no order guarantee.
        rows.sort_by_key(|(seq, _)| *seq);
        let expires_at = rows
            .first()
            .and_then(|(_, r)| r.try_get::<i64, _>(10).ok())
            .map_or_else(std::time::SystemTime::now, from_unix_micros);
        let mut messages = Vec::with_capacity(rows.len());
        let mut malformed = Vec::new();
        for (seq, row) in &rows {
            match message_from_row(row, *seq) {
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
            .relay
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
        stats_from_row(&row, 0)
    }

    async fn pending_tenants(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        let tenants: Vec<Vec<u8>> = sqlx::query_scalar(&self.outbox.sql().pending_tenants)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.relay)
            .await
            .map_err(db_error)?;
        // A tenant a plain-SQL producer wrote with bytes that are not UTF-8
        // cannot be named by a claim (it binds a string), and failing here
        // would turn the whole rotation off: it is left out, and its rows go
        // out (as malformed) through the claims across tenants.
        Ok(tenants
            .into_iter()
            .filter_map(|t| String::from_utf8(t).ok())
            .collect())
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
                // shown lossily, as `list` shows them: a topic or tenant
                // that is not UTF-8 dead-letters its row, and `status`
                // must still count it
                let group: Option<Vec<u8>> = row.try_get_unchecked(0).map_err(db_error)?;
                let group = group.map(|g| String::from_utf8_lossy(&g).into_owned());
                Ok(GroupStats::new(group, stats_from_row(row, 1)?))
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
            .execute(&self.relay)
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
        push_filter(&mut q, &query.filter, None);
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
        // A `max_attempts` or `created_at` a plain-SQL producer wrote as
        // text, a real or out of range is what dead-lettered the row (see
        // `message_from_row`); replayed as it is, it would go straight back
        // to dead. `max_attempts` becomes NULL (the relay's limit) and
        // `created_at` now, as `available_at` does.
        //
        // A replayed keyed message becomes due when the live leases on its
        // key end, not at once: with `on_dead = skip` (or after a `skip`) a
        // later message of the key may be leased right now, and a key is
        // held by one lease at a time.
        self.in_batches(
            &format!(
                "UPDATE {t} SET status = 'pending', attempts = 0, parked = 0, \
                 available_at = max({NOW}, coalesce((SELECT max(l.lease_until) FROM {t} AS l \
                   WHERE l.key = {t}.key AND l.status = 'pending' AND l.lease_until > {NOW}), 0)), \
                 created_at = CASE WHEN typeof(created_at) = 'integer' THEN created_at \
                   ELSE {NOW} END, \
                 max_attempts = CASE WHEN typeof(max_attempts) = 'integer' \
                   AND max_attempts BETWEEN 0 AND {} THEN max_attempts END, \
                 lease_token = NULL, lease_until = NULL",
                u32::MAX
            ),
            "status = 'dead'",
            filter,
        )
        .await
    }

    async fn skip(&self, filter: &Filter) -> Result<u64, StoreError> {
        let t = &self.outbox.sql().table;
        self.in_batches(
            &format!("UPDATE {t} SET parked = 0"),
            "status = 'dead' AND parked = 1",
            filter,
        )
        .await
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
        self.in_batches(
            &format!("DELETE FROM {t}"),
            &format!("status = '{status}'"),
            &query.filter,
        )
        .await
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
            .execute(&self.relay)
            .await
            .map_err(db_error)?
            .rows_affected())
    }
}
