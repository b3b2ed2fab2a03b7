//! [`PgOutbox`]: the validated names of one outbox table, the SQL built once
//! from them, migrations and the producer side (`enqueue`, `enqueue_batch`).

use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use postbox_core::{Ident, NewMessage, StoreError, to_unix_micros};
use sqlx::{PgPool, Postgres};

use crate::error::map;
use crate::sql::Sql;
use crate::store::PgStore;

/// The default table name.
pub const DEFAULT_TABLE: &str = "postbox_outbox";
/// The default schema.
pub const DEFAULT_SCHEMA: &str = "public";

/// Longest table name accepted: PostgreSQL truncates identifiers at 63
/// bytes, and postbox derives names such as `<table>_migrations` and
/// `<table>_before_insert` from it, which must not be truncated into
/// collisions.
pub const MAX_TABLE_LEN: usize = 48;

/// Longest LISTEN/NOTIFY channel name PostgreSQL takes (`NAMEDATALEN - 1`).
const MAX_CHANNEL_LEN: usize = 63;

/// Validated schema and table names plus the SQL text built once from them.
///
/// ```
/// use postbox_postgres::PgOutbox;
/// let outbox = PgOutbox::with_schema("billing", "outbox")?;
/// assert_eq!(outbox.qualified_name(), "\"billing\".\"outbox\"");
/// assert!(PgOutbox::new("my outbox").is_err());
/// # Ok::<(), postbox_core::StoreError>(())
/// ```
#[derive(Clone, Debug)]
pub struct PgOutbox {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) schema: Ident,
    pub(crate) table: Ident,
    pub(crate) qualified: String,
    pub(crate) options: Options,
    pub(crate) sql: Sql,
}

/// The settings of a [`PgOutbox`] besides its names.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Options {
    /// `NOTIFY` the relays' channel from `enqueue`.
    pub(crate) notify_on_enqueue: bool,
    /// Keep sent rows this long instead of deleting them.
    pub(crate) retain_sent: Option<Duration>,
    /// Dead rows from which a relay claiming keyed messages vacuums the
    /// table itself (`None`: never).
    pub(crate) vacuum_after: Option<NonZeroU64>,
}

impl Default for PgOutbox {
    fn default() -> Self {
        // both names are valid constants
        Self::build(
            Ident::new(DEFAULT_SCHEMA).unwrap_or_else(|_| unreachable!("valid constant")),
            Ident::new(DEFAULT_TABLE).unwrap_or_else(|_| unreachable!("valid constant")),
            Options::default(),
        )
    }
}

fn ident(what: &str, value: &str) -> Result<Ident, StoreError> {
    Ident::new(value).map_err(|e| StoreError::Config(format!("{what}: {e}")))
}

impl PgOutbox {
    /// The outbox table `table` in schema `public`.
    ///
    /// Refuses (with [`StoreError::Config`] naming the value) anything but
    /// 1 to 48 letters, digits and underscores.
    pub fn new(table: &str) -> Result<Self, StoreError> {
        Self::with_schema(DEFAULT_SCHEMA, table)
    }

    /// The outbox table `table` in schema `schema` (created by `migrate` if
    /// missing).
    pub fn with_schema(schema: &str, table: &str) -> Result<Self, StoreError> {
        let schema = ident("schema name", schema)?;
        let table = ident("table name", table)?;
        if table.as_str().len() > MAX_TABLE_LEN {
            return Err(StoreError::Config(format!(
                "table name {:?} is longer than {MAX_TABLE_LEN} bytes; postbox derives index, trigger and migration-table names from it",
                table.as_str()
            )));
        }
        Ok(Self::build(schema, table, Options::default()))
    }

    fn build(schema: Ident, table: Ident, options: Options) -> Self {
        let qualified = format!("{}.{}", schema.quoted(), table.quoted());
        let sql = Sql::new(&qualified, &schema, &table);
        Self {
            inner: Arc::new(Inner {
                schema,
                table,
                qualified,
                options,
                sql,
            }),
        }
    }

    /// Makes `enqueue` and `enqueue_batch` also `NOTIFY` the relay's channel
    /// in the producer's transaction (off by default).
    ///
    /// Off by default because a NOTIFY in every producer transaction
    /// serialises commits on PostgreSQL's notification queue lock; see the
    /// crate README for the measurements. Without it a relay in the same
    /// process is woken by its `RelayWaker`, and others by their poll.
    #[must_use]
    pub fn notify_on_enqueue(self, on: bool) -> Self {
        self.rebuild(|o| o.notify_on_enqueue = on)
    }

    /// The same names with changed settings (the SQL is built anew).
    fn rebuild(&self, change: impl FnOnce(&mut Options)) -> Self {
        let mut options = self.inner.options;
        change(&mut options);
        Self::build(self.inner.schema.clone(), self.inner.table.clone(), options)
    }

    /// Makes stores over this table keep sent messages for `keep` instead
    /// of deleting them on success (`None`, the default, deletes them).
    ///
    /// A kept row is marked `sent` with `sent_at = now()` (database clock)
    /// and its lease cleared, in the same one-statement completion; it is
    /// never claimed again, never holds its key back, and a running relay
    /// deletes it once `keep` has passed (`Store::purge_sent`, 500 rows per
    /// statement, on the partial index of migration 5). The cost: marking
    /// a row sent is an `UPDATE` of a column that partial-index predicates
    /// use, so it is never HOT, and the rows (and their index entries) stay
    /// in the table for `keep`.
    #[must_use]
    pub fn retain_sent(self, keep: Option<Duration>) -> Self {
        self.rebuild(|o| o.retain_sent = keep)
    }

    /// Makes relays over this table `VACUUM` it themselves while they claim
    /// keyed messages and it holds at least `dead_rows` dead rows (`None`,
    /// the default: never; autovacuum or an operator does it).
    ///
    /// Why: keyed claims read the oldest pending keyed rows from the front
    /// of an index, over the entry of every keyed row deleted since the
    /// last vacuum, so a large keyed backlog drains slower with every row
    /// drained until the table is vacuumed (see the crate README, "Dead
    /// index entries and keyed claims").
    ///
    /// How: a store whose claims return keyed messages looks at the
    /// table's dead rows (`pg_stat_user_tables`) at most every
    /// [`VACUUM_CHECK_EVERY`](crate::VACUUM_CHECK_EVERY), in a task off the
    /// claim path; from `dead_rows` on it runs `VACUUM (SKIP_LOCKED,
    /// INDEX_CLEANUP ON, TRUNCATE false)` on a connection of its own.
    /// `SKIP_LOCKED` makes a vacuum already running (another relay's,
    /// autovacuum's) a reason to skip, never to wait; `TRUNCATE false`
    /// takes no exclusive lock. Its lock conflicts with schema changes
    /// only: like autovacuum, it gives way (cancels itself) when a session
    /// has waited for a lock on the table, checked every
    /// [`VACUUM_YIELD_CHECK_EVERY`](crate::VACUUM_YIELD_CHECK_EVERY). The
    /// threshold counts past the dead rows
    /// the store's last vacuum left (rows it could not remove yet); a
    /// store does not vacuum within
    /// [`VACUUM_CHECK_EVERY`](crate::VACUUM_CHECK_EVERY) or its last
    /// vacuum's duration (the longer) of the end of anyone's vacuum of the
    /// table, and checks no sooner than that after its own, so relays take
    /// turns with pauses between vacuums. The relay's role must own the
    /// table (or the database, or be a superuser): a store whose role may
    /// not vacuum it logs that once and stops checking.
    /// [`PgStore::vacuum_if_due`] does one round of it by hand.
    #[must_use]
    pub fn vacuum_after(self, dead_rows: Option<NonZeroU64>) -> Self {
        self.rebuild(|o| o.vacuum_after = dead_rows)
    }

    /// The dead rows from which relays over this table vacuum it (see
    /// [`PgOutbox::vacuum_after`]; `None`: they never do).
    pub fn vacuum_threshold(&self) -> Option<NonZeroU64> {
        self.inner.options.vacuum_after
    }

    /// How long stores over this table keep sent messages (`None`: they
    /// delete them on success).
    pub fn sent_retention(&self) -> Option<Duration> {
        self.inner.options.retain_sent
    }

    /// The schema name.
    pub fn schema(&self) -> &Ident {
        &self.inner.schema
    }

    /// The table name.
    pub fn table(&self) -> &Ident {
        &self.inner.table
    }

    /// `"schema"."table"`, quoted, ready to splice into SQL.
    pub fn qualified_name(&self) -> &str {
        &self.inner.qualified
    }

    /// The LISTEN/NOTIFY channel relays of this table listen on:
    /// `<schema>.<table>` (a plain-SQL producer may `NOTIFY` it too), cut to
    /// PostgreSQL's 63 bytes as `LISTEN` would cut it (`pg_notify` refuses a
    /// longer name, which would fail every enqueue). Two tables whose
    /// names agree in their first 63 bytes share a channel: a wake-up for
    /// one also wakes the other's relays, nothing more.
    pub fn channel(&self) -> String {
        let mut channel = format!("{}.{}", self.inner.schema, self.inner.table);
        // identifiers are ASCII (validated), so any byte is a boundary
        channel.truncate(MAX_CHANNEL_LEN);
        channel
    }

    /// Creates or upgrades the schema; idempotent and safe to run from
    /// several processes at once (they queue on an advisory lock).
    pub async fn migrate(&self, pool: &PgPool) -> Result<(), StoreError> {
        crate::migrate::run(self, pool).await
    }

    /// Writes `msg` through `executor`, normally the caller's transaction
    /// (`&mut *tx`), so the message commits or rolls back with the business
    /// rows. One round trip.
    ///
    /// A keyed message takes the key's transaction-scoped advisory lock (in
    /// the table's trigger): a second transaction enqueuing the same key
    /// waits until this one ends. Enqueue several keys in one transaction in
    /// a consistent (sorted) order, or use [`PgOutbox::enqueue_batch`], which
    /// sorts for you.
    pub async fn enqueue<'e, E>(&self, executor: E, msg: &NewMessage) -> Result<(), StoreError>
    where
        E: sqlx::Executor<'e, Database = Postgres>,
    {
        let headers = msg.headers_json();
        let sql = if self.inner.options.notify_on_enqueue {
            &self.inner.sql.insert_notify
        } else {
            &self.inner.sql.insert
        };
        let mut q = sqlx::query(sql)
            .bind(msg.id)
            .bind(&msg.topic)
            .bind(msg.key.as_deref())
            .bind(&msg.payload[..])
            .bind(headers)
            .bind(msg.tenant.as_deref())
            .bind(msg.available_at.map(to_unix_micros))
            .bind(max_attempts(msg)?);
        if self.inner.options.notify_on_enqueue {
            q = q.bind(self.channel());
        }
        q.execute(executor).await.map_err(map)?;
        Ok(())
    }

    /// Writes all of `msgs` atomically in ONE statement (one round trip),
    /// in order, through `executor` (`&mut *tx`, a connection or the pool:
    /// a single statement is atomic by itself, so no `Acquire` is needed).
    ///
    /// The statement first takes the advisory locks of all distinct keys in
    /// sorted order, then inserts, so two batches sharing keys cannot
    /// deadlock each other.
    pub async fn enqueue_batch<'e, E>(
        &self,
        executor: E,
        msgs: &[NewMessage],
    ) -> Result<(), StoreError>
    where
        E: sqlx::Executor<'e, Database = Postgres>,
    {
        if msgs.is_empty() {
            return Ok(());
        }
        let mut ids = Vec::with_capacity(msgs.len());
        let mut topics = Vec::with_capacity(msgs.len());
        let mut keys = Vec::with_capacity(msgs.len());
        let mut payloads = Vec::with_capacity(msgs.len());
        let mut headers = Vec::with_capacity(msgs.len());
        let mut tenants = Vec::with_capacity(msgs.len());
        let mut available = Vec::with_capacity(msgs.len());
        let mut attempts = Vec::with_capacity(msgs.len());
        for m in msgs {
            ids.push(m.id);
            topics.push(m.topic.clone());
            keys.push(m.key.clone());
            payloads.push(m.payload.to_vec());
            headers.push(m.headers_json());
            tenants.push(m.tenant.clone());
            available.push(m.available_at.map(to_unix_micros));
            attempts.push(max_attempts(m)?);
        }
        let sql = if self.inner.options.notify_on_enqueue {
            &self.inner.sql.insert_batch_notify
        } else {
            &self.inner.sql.insert_batch
        };
        let mut q = sqlx::query(sql)
            .bind(ids)
            .bind(topics)
            .bind(keys)
            .bind(payloads)
            .bind(headers)
            .bind(tenants)
            .bind(available)
            .bind(attempts);
        if self.inner.options.notify_on_enqueue {
            q = q.bind(self.channel());
        }
        q.execute(executor).await.map_err(map)?;
        Ok(())
    }

    /// A [`PgStore`] (the relay's side) over `pool`, which serves its admin
    /// queries; claims and completions get a pool of their own to the same
    /// database with the claim session settings
    /// ([`crate::relay_connect_options`]), connected on first use.
    pub fn store(&self, pool: PgPool) -> PgStore {
        PgStore::new(self.clone(), pool)
    }
}

fn max_attempts(msg: &NewMessage) -> Result<Option<i32>, StoreError> {
    msg.max_attempts
        .map(|n| {
            i32::try_from(n).map_err(|_| {
                StoreError::Config(format!(
                    "max_attempts {n} of message {} is too large",
                    msg.id
                ))
            })
        })
        .transpose()
}
