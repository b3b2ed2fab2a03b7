//! [`MySqlOutbox`]: the validated table names, the SQL text built once from
//! them, and the producer side (`enqueue`, `enqueue_batch`).

use std::sync::Arc;
use std::time::Duration;

use postbox_core::{Ident, NewMessage, StoreError, to_unix_micros};
use sqlx::mysql::MySql;
use sqlx::{Acquire, Executor, MySqlPool};

use crate::error::map_err;
use crate::store::MySqlStore;

/// The Unix epoch as a `DATETIME(6)` literal: times cross the wire as
/// microseconds since it, so no date type (or crate feature) is needed and
/// the session's `time_zone` never matters.
pub(crate) const EPOCH: &str = "TIMESTAMP'1970-01-01 00:00:00.000000'";

/// Longest table name: MySQL identifiers hold 64 characters and the longest
/// derived name adds `_migrations`.
const MAX_TABLE_LEN: usize = 64 - "_migrations".len();

/// Rows per multi-row `INSERT` in [`MySqlOutbox::enqueue_batch`] (8 bound
/// values each, far below the 65,535 placeholder limit)...
const BATCH_ROWS: usize = 500;
/// ...and payload bytes per statement, well under the default 16 MiB
/// `max_allowed_packet`.
const BATCH_BYTES: usize = 4 << 20;

/// Validated table names plus the SQL text built once from them.
///
/// ```
/// use postbox_mysql::MySqlOutbox;
/// assert!(MySqlOutbox::new("orders_outbox").is_ok());
/// assert!(MySqlOutbox::new("outbox`; DROP TABLE users; --").is_err());
/// ```
#[derive(Clone, Debug)]
pub struct MySqlOutbox {
    pub(crate) inner: Arc<Sql>,
    /// Keep sent rows this long instead of deleting them.
    pub(crate) retain_sent: Option<Duration>,
}

/// SQL text for one outbox table. Every statement lives here, with the reason
/// it is shaped as it is.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) table: Ident,
    /// `table` back-quoted.
    pub(crate) t: String,
    /// The key lock table (`<table>_key_locks`), back-quoted.
    pub(crate) keys: String,
    /// The ordering trigger, back-quoted.
    pub(crate) trigger: String,
    /// The migration history table, back-quoted.
    pub(crate) migrations: String,
    /// The relays' heartbeat table (`<table>_relays`), back-quoted.
    pub(crate) relays: String,
    pub(crate) insert_one: String,
    pub(crate) claim_any: String,
    pub(crate) claim_tenant: String,
    pub(crate) purge_sent: String,
}

/// Columns a claim reads, decoded by `claim::decode`.
pub(crate) fn row_columns(alias: &str) -> String {
    format!(
        "{a}.`seq`, {a}.`id`, {a}.`topic`, {a}.`key`, {a}.`payload`, CAST({a}.`headers` AS CHAR) AS `headers`, {a}.`tenant`, \
         {a}.`attempts`, {a}.`max_attempts`, \
         TIMESTAMPDIFF(MICROSECOND, {EPOCH}, {a}.`created_at`) AS `created_us`, \
         {a}.`key_hash`, {a}.`kseq`",
        a = alias
    )
}

impl Sql {
    fn new(table: Ident) -> Self {
        let t = table.backquoted();
        let keys = format!("`{table}_key_locks`");
        let trigger = format!("`{table}_key_order`");
        let migrations = format!("`{table}_migrations`");
        // shorter than `_migrations`, so within MySQL's 64 characters
        let relays = format!("`{table}_relays`");
        // `available_at` NULL means "now" on the database clock.
        let insert_one = format!(
            "INSERT INTO {t} (`id`, `topic`, `key`, `payload`, `headers`, `tenant`, `available_at`, `max_attempts`) \
             VALUES {}",
            Self::insert_values(1)
        );
        // The claim's first step. Pending rows in seq order through the
        // (status, seq) index; a keyed row only when no earlier row of its
        // key (lower kseq) is unfinished: pending (leased or not, delayed or
        // not) or dead and parked. Both probes read ranges of the index
        // (key_hash, status, kseq, parked) of migration 4, so kept sent rows
        // are not in the way: the pending one stops at the first earlier
        // pending row, the dead one reads the key's earlier dead rows,
        // unparked ones included (purge them). (Not a correlated MIN of the
        // key's pending kseq: MySQL 8 reads all of a key's pending rows for
        // it, once per candidate.) A keyed row without kseq (written while
        // the trigger was missing) passes both, to be dead-lettered by the
        // claim. The subqueries are non-locking reads;
        // SKIP LOCKED applies to the candidate rows only, so two relays
        // never block each other. Its result is re-checked with a fresh
        // snapshot before anything is leased (see claim.rs).
        let claim = |tenant: &str| {
            format!(
                "SELECT {cols}, TIMESTAMPDIFF(MICROSECOND, {EPOCH}, UTC_TIMESTAMP(6)) AS `now_us` \
                 FROM {t} AS o \
                 WHERE o.`status` = 'pending' \
                   AND o.`available_at` <= UTC_TIMESTAMP(6) \
                   AND (o.`lease_until` IS NULL OR o.`lease_until` <= UTC_TIMESTAMP(6)) \
                   {tenant} \
                   AND (o.`key_hash` IS NULL OR ( \
                     NOT EXISTS (SELECT 1 FROM {t} AS e \
                       WHERE e.`key_hash` = o.`key_hash` AND e.`status` = 'pending' \
                         AND e.`kseq` < o.`kseq`) \
                     AND NOT EXISTS (SELECT 1 FROM {t} AS e \
                       WHERE e.`key_hash` = o.`key_hash` AND e.`status` = 'dead' \
                         AND e.`kseq` < o.`kseq` AND e.`parked`))) \
                 ORDER BY o.`seq` \
                 LIMIT ? \
                 FOR UPDATE SKIP LOCKED",
                cols = row_columns("o"),
            )
        };
        // Retention cleanup: at most `?` sent rows at least `?` old, oldest
        // first, read in order on the `sent_age (status, sent_at)` index
        // (migration 3), so the statement touches only the rows it deletes.
        // Run in its own short READ COMMITTED transaction: record locks on
        // those rows only, no gap locks in front of producers. `seq` makes
        // the order total, so the LIMIT is deterministic (statement-based
        // replication accepts it).
        let purge_sent = format!(
            "DELETE FROM {t} WHERE `status` = 'sent' \
               AND `sent_at` <= TIMESTAMPADD(MICROSECOND, ?, UTC_TIMESTAMP(6)) \
             ORDER BY `sent_at`, `seq` LIMIT ?"
        );
        Self {
            purge_sent,
            claim_any: claim(""),
            claim_tenant: claim("AND o.`tenant` = ?"),
            table,
            t,
            keys,
            trigger,
            migrations,
            relays,
            insert_one,
        }
    }

    fn insert_values(rows: usize) -> String {
        let one = format!(
            "(?, ?, ?, ?, ?, ?, COALESCE(TIMESTAMPADD(MICROSECOND, ?, {EPOCH}), UTC_TIMESTAMP(6)), ?)"
        );
        vec![one; rows].join(", ")
    }
}

impl Default for MySqlOutbox {
    /// The table `postbox_outbox`.
    fn default() -> Self {
        Self {
            inner: Arc::new(Sql::new(
                Ident::new("postbox_outbox").unwrap_or_else(|_| unreachable!("valid identifier")),
            )),
            retain_sent: None,
        }
    }
}

/// Number of rows of `<table>_key_locks`: a key's slot is `CRC32(key) mod`
/// this (the trigger of migration 1, and `enqueue_batch`).
const KEY_SLOTS: u32 = 65_536;

/// The slot of `key` in the key lock table, `MOD(CRC32(key), 65536)` as the
/// ordering trigger and [`MySqlOutbox::enqueue_batch`] compute it: the row
/// that an enqueue of `key` locks until its transaction ends.
///
/// A transaction that enqueues several keys one by one takes their slots in
/// the order it enqueues them; enqueued in ascending slot order, it cannot
/// deadlock with another doing the same, nor with `enqueue_batch`, which
/// takes its slots in that order. Keys sharing a slot (one pair in 65,536)
/// may go in any order among themselves.
///
/// ```
/// assert_eq!(postbox_mysql::key_slot("order-42"), postbox_mysql::key_slot("order-42"));
/// ```
pub fn key_slot(key: &str) -> u16 {
    // CRC-32 (IEEE 802.3, as zlib and MySQL's CRC32()) of the key's UTF-8
    // bytes, which is what the utf8mb4 `key` column holds.
    let crc = crc32fast::hash(key.as_bytes());
    // below 65,536, so the conversion cannot fail
    u16::try_from(crc % KEY_SLOTS).unwrap_or(u16::MAX)
}

/// Bound values of one message, owned so a query can borrow them.
struct Row {
    id: uuid::Uuid,
    topic: String,
    key: Option<String>,
    payload: Vec<u8>,
    headers: String,
    tenant: Option<String>,
    available_us: Option<i64>,
    max_attempts: Option<i32>,
}

/// Latest instant a `DATETIME` holds (9999-12-31 23:59:59.999999 UTC).
const MAX_DATETIME_US: i64 = 253_402_300_799_999_999;

impl Row {
    fn new(m: &NewMessage) -> Result<Self, StoreError> {
        let headers = m.headers_json();
        Ok(Self {
            id: m.id,
            topic: m.topic.clone(),
            key: m.key.clone(),
            payload: m.payload.to_vec(),
            headers,
            tenant: m.tenant.clone(),
            available_us: m
                .available_at
                .map(|t| to_unix_micros(t).clamp(0, MAX_DATETIME_US)),
            max_attempts: m.max_attempts.map(|n| i32::try_from(n).unwrap_or(i32::MAX)),
        })
    }

    fn bind<'q>(
        &'q self,
        q: sqlx::query::Query<'q, MySql, sqlx::mysql::MySqlArguments>,
    ) -> sqlx::query::Query<'q, MySql, sqlx::mysql::MySqlArguments> {
        q.bind(self.id)
            .bind(&self.topic)
            .bind(&self.key)
            .bind(&self.payload)
            .bind(&self.headers)
            .bind(&self.tenant)
            .bind(self.available_us)
            .bind(self.max_attempts)
    }
}

impl MySqlOutbox {
    /// An outbox in table `table` (plus `<table>_key_locks` and
    /// `<table>_migrations`). The name must be a plain identifier of at most
    /// 53 characters; the error names the bad value.
    pub fn new(table: &str) -> Result<Self, StoreError> {
        let ident = Ident::new(table).map_err(|e| StoreError::Config(e.to_string()))?;
        if table.len() > MAX_TABLE_LEN {
            return Err(StoreError::Config(format!(
                "table name {table:?} is too long for MySQL: use at most {MAX_TABLE_LEN} characters \
                 (postbox adds `_migrations` to it)"
            )));
        }
        Ok(Self {
            inner: Arc::new(Sql::new(ident)),
            retain_sent: None,
        })
    }

    /// The table name.
    pub fn table(&self) -> &str {
        self.inner.table.as_str()
    }

    /// Makes stores over this table keep sent messages for `keep` instead
    /// of deleting them on success (`None`, the default, deletes them).
    ///
    /// A kept row is marked `sent` with `sent_at = UTC_TIMESTAMP(6)` and its
    /// lease cleared, in the completion's transaction; it is never claimed
    /// again and never holds its key back (the per-key rule counts only
    /// pending and parked dead rows). A running relay deletes it once
    /// `keep` has passed (`Store::purge_sent`, 500 rows per statement on
    /// the `sent_age` index of migration 3).
    #[must_use]
    pub fn retain_sent(mut self, keep: Option<Duration>) -> Self {
        self.retain_sent = keep;
        self
    }

    /// How long stores over this table keep sent messages (`None`: they
    /// delete them on success).
    pub fn sent_retention(&self) -> Option<Duration> {
        self.retain_sent
    }

    /// Creates or upgrades the outbox schema. Idempotent; several processes
    /// may run it at once (they take turns through `GET_LOCK`). Refuses
    /// servers without `FOR UPDATE SKIP LOCKED` with a message naming the
    /// version found and the one needed.
    pub async fn migrate(&self, pool: &MySqlPool) -> Result<(), StoreError> {
        crate::migrate::run(&self.inner, pool).await
    }

    /// Writes `msg` through `executor`: pass `&mut *tx` to make it part of
    /// your transaction.
    ///
    /// A keyed message locks its key's slot row in `<table>_key_locks` (the
    /// trigger does it, see README.md) until your transaction ends: a concurrent
    /// transaction enqueuing the same key waits for yours to commit or roll
    /// back. Two transactions that enqueue several keys can deadlock if they
    /// take those slots in different orders; InnoDB then rolls one back
    /// ([`StoreError::Unavailable`], error 1213: retry the transaction). To
    /// avoid it, enqueue several keys in ascending order of their slot,
    /// [`key_slot`] (the order [`enqueue_batch`](Self::enqueue_batch) locks
    /// them in; sorting by the keys themselves is no such order), or use
    /// `enqueue_batch`.
    ///
    /// ```
    /// let mut keys = vec!["order-42", "order-7", "customer-3"];
    /// keys.sort_by_key(|k| postbox_mysql::key_slot(k));
    /// ```
    pub async fn enqueue<'e, E>(&self, executor: E, msg: &NewMessage) -> Result<(), StoreError>
    where
        E: Executor<'e, Database = MySql>,
    {
        let row = Row::new(msg)?;
        row.bind(sqlx::query(&self.inner.insert_one))
            .execute(executor)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    /// Writes all of `msgs` atomically: in one savepoint of your transaction
    /// (pass `&mut *tx` or `&mut tx`) or in a transaction of its own (pass a
    /// pool or a connection). Locks the keys involved in one order (their
    /// slots, [`key_slot`], ascending) first, so two batches with overlapping
    /// keys cannot deadlock each other, nor with transactions that enqueue
    /// keys one by one in that order.
    pub async fn enqueue_batch<'a, A>(&self, conn: A, msgs: &[NewMessage]) -> Result<(), StoreError>
    where
        A: Acquire<'a, Database = MySql>,
    {
        if msgs.is_empty() {
            return Ok(());
        }
        let rows = msgs.iter().map(Row::new).collect::<Result<Vec<_>, _>>()?;
        let mut tx = conn.begin().await.map_err(map_err)?;
        let mut keys: Vec<&str> = rows.iter().filter_map(|r| r.key.as_deref()).collect();
        keys.sort_unstable();
        keys.dedup();
        if keys.len() > 1 {
            // Take every key lock up front, in ascending slot order (the
            // primary key order InnoDB reads an IN list in), instead of in
            // the order the trigger meets the rows.
            // One statement, so the order is global (chunks only past the
            // 65,535-placeholder limit).
            for chunk in keys.chunks(60_000) {
                let sql = format!(
                    "SELECT `slot` FROM {} WHERE `slot` IN ({}) ORDER BY `slot` FOR UPDATE",
                    self.inner.keys,
                    vec!["MOD(CRC32(?), 65536)"; chunk.len()].join(", ")
                );
                let mut q = sqlx::query(&sql);
                for k in chunk {
                    q = q.bind(*k);
                }
                q.fetch_all(&mut *tx).await.map_err(map_err)?;
            }
        }
        let mut start = 0;
        while start < rows.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < rows.len()
                && end - start < BATCH_ROWS
                && (end == start || bytes < BATCH_BYTES)
            {
                bytes += rows[end].payload.len();
                end += 1;
            }
            let sql = format!(
                "INSERT INTO {} (`id`, `topic`, `key`, `payload`, `headers`, `tenant`, `available_at`, `max_attempts`) \
                 VALUES {}",
                self.inner.t,
                Sql::insert_values(end - start)
            );
            let mut q = sqlx::query(&sql);
            for r in &rows[start..end] {
                q = r.bind(q);
            }
            q.execute(&mut *tx).await.map_err(map_err)?;
            start = end;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(())
    }

    /// A store (for relays and admin queries) on `pool` for this table.
    ///
    /// The pool's sessions should run in READ COMMITTED, as those of
    /// [`MySqlStore::connect`] do: claims rely on each statement seeing a
    /// fresh snapshot.
    pub fn store(&self, pool: MySqlPool) -> MySqlStore {
        MySqlStore::new(pool, self.clone())
    }
}
