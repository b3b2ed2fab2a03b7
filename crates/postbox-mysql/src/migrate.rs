//! Schema migrations: plain SQL files with `{table}`-style placeholders, an
//! own history table per outbox table, and `GET_LOCK` so that several
//! processes migrating at once take turns.
//!
//! `sqlx::migrate!` cannot be used because the table name is configurable.
//! MySQL commits DDL implicitly, so a migration is not atomic: every
//! statement in the files is written to be re-runnable (`IF NOT EXISTS`),
//! and a version is recorded only after all its statements succeeded.

use std::time::Duration;

use postbox_core::StoreError;
use sqlx::{Executor, MySqlConnection, MySqlPool};

use crate::closing::Closing;
use crate::error::{ER_LOCK_WAIT_TIMEOUT, check_server_version, error_number, map_err};
use crate::outbox::Sql;

/// One migration: version, name, SQL text.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// In order. Never edit an applied file, add one: the history records
/// versions, no checksums, so an edited file would silently not run where
/// its version is applied, and one version would mean two schemas.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "outbox",
        sql: include_str!("../migrations/0001_outbox.sql"),
    },
    Migration {
        version: 2,
        name: "relays",
        sql: include_str!("../migrations/0002_relays.sql"),
    },
    Migration {
        version: 3,
        name: "sent_retention",
        sql: include_str!("../migrations/0003_sent_retention.sql"),
    },
    Migration {
        version: 4,
        name: "key_head",
        sql: include_str!("../migrations/0004_key_head.sql"),
    },
];

/// Separates statements inside a migration file.
const STATEMENT_BREAK: &str = "\n-- statement\n";

/// How long a migrating process waits for another one to finish.
const LOCK_WAIT: Duration = Duration::from_secs(120);

/// How long, in seconds, a migration statement waits for a metadata lock on
/// a table (`lock_wait_timeout`, a day by default). DDL on the outbox (an
/// `ALTER TABLE`, `CREATE TRIGGER`) needs a moment of exclusive metadata
/// lock, and while it waits for one, behind any open transaction that
/// touched the table, every producer's INSERT and every claim queues
/// behind it. Set here around every migration rather than in the files:
/// applied files are never edited (migration 4 also sets it itself).
const DDL_LOCK_WAIT_SECS: u32 = 10;

/// How many times a migration whose DDL hit [`DDL_LOCK_WAIT_SECS`] is run
/// (its statements are re-runnable), with [`DDL_RETRY_PAUSE`] in between,
/// in which queued producers go on; then `migrate` fails with
/// [`StoreError::Unavailable`].
const DDL_ATTEMPTS: u32 = 3;

/// Pause between two attempts of a migration that waited too long for a lock.
const DDL_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// Checks the server version, then applies the missing migrations under the
/// table's migration lock.
pub(crate) async fn run(sql: &Sql, pool: &MySqlPool) -> Result<(), StoreError> {
    // Closed, not returned to the pool, unless everything below succeeded:
    // `GET_LOCK` belongs to the session, so a session handed back while it
    // holds the lock (this future dropped, a failed release) would keep
    // every other migrator out; a failed migration may leave session state
    // behind (a shortened `lock_wait_timeout`, prepared statements).
    let mut conn = Closing::acquire(pool).await.map_err(map_err)?;
    let (version, database): (String, Option<String>) =
        sqlx::query_as("SELECT VERSION(), DATABASE()")
            .fetch_one(&mut *conn)
            .await
            .map_err(map_err)?;
    check_server_version(&version)?;
    if database.is_none() {
        // Without one, every name below would be NULL: the lock name
        // included, and GET_LOCK(NULL) fails as if the lock were taken.
        let options = pool.connect_options();
        return Err(StoreError::Config(format!(
            "cannot migrate table {}: the pool's connections to MySQL at {}@{}:{} have no database \
             selected; name the database in the URL (mysql://user:password@host:port/database)",
            sql.table,
            options.get_username(),
            options.get_host(),
            options.get_port()
        )));
    }

    // One lock name per database and table; GET_LOCK names are limited to 64
    // characters, so the pair is hashed.
    let got: Option<i64> = sqlx::query_scalar(
        "SELECT GET_LOCK(CONCAT('postbox_migrate_', SHA1(CONCAT(DATABASE(), '.', ?))), ?)",
    )
    .bind(sql.table.as_str())
    .bind(LOCK_WAIT.as_secs())
    .fetch_one(&mut *conn)
    .await
    .map_err(map_err)?;
    if got != Some(1) {
        return Err(StoreError::Unavailable(
            format!(
                "another process held the migration lock of table {} for over {:?}",
                sql.table, LOCK_WAIT
            )
            .into(),
        ));
    }
    let result = apply(sql, &mut conn).await;
    // Released on every path; if that fails, the connection is closed.
    let released = sqlx::query(
        "SELECT RELEASE_LOCK(CONCAT('postbox_migrate_', SHA1(CONCAT(DATABASE(), '.', ?))))",
    )
    .bind(sql.table.as_str())
    .execute(&mut *conn)
    .await;
    if released.is_ok() && result.is_ok() {
        conn.done();
    }
    result
}

async fn apply(sql: &Sql, conn: &mut MySqlConnection) -> Result<(), StoreError> {
    // Read first, create only what is missing: MySQL checks the CREATE
    // privilege before it sees that a table exists, so an application role
    // migrating at start-up (after the owner did) would fail for nothing.
    let history_exists: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.tables \
          WHERE table_schema = DATABASE() AND table_name = CONCAT(?, '_migrations')",
    )
    .bind(sql.table.as_str())
    .fetch_one(&mut *conn)
    .await
    .map_err(map_err)?;
    if history_exists == 0 {
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {} (\
               `version` BIGINT NOT NULL PRIMARY KEY, \
               `name` VARCHAR(255) NOT NULL, \
               `applied_at` DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6))\
             ) ENGINE = InnoDB",
            sql.migrations
        );
        conn.execute(create.as_str()).await.map_err(map_err)?;
    }
    let select = format!(
        "SELECT `version` FROM {} ORDER BY `version`",
        sql.migrations
    );
    let applied: Vec<i64> = sqlx::query_scalar(&select)
        .fetch_all(&mut *conn)
        .await
        .map_err(map_err)?;
    if let Some(&newest) = applied.last()
        && newest > MIGRATIONS.last().map_or(0, |m| m.version)
    {
        return Err(StoreError::Schema(format!(
            "table {} is at schema version {newest}, newer than this postbox knows; upgrade postbox",
            sql.table
        )));
    }
    let pending: Vec<&Migration> = MIGRATIONS
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    // Restored at the end; a failed run closes the session instead. The
    // variable's name differs from the one migration 4 saves its own in.
    conn.execute(
        format!(
            "SET @postbox_migrate_lock_wait_timeout = @@SESSION.lock_wait_timeout; \
             SET SESSION lock_wait_timeout = {DDL_LOCK_WAIT_SECS}"
        )
        .as_str(),
    )
    .await
    .map_err(map_err)?;
    for m in pending {
        let mut attempt = 1;
        loop {
            match apply_one(sql, conn, m).await {
                Err(e) if error_number(&e) == Some(ER_LOCK_WAIT_TIMEOUT) => {
                    if attempt == DDL_ATTEMPTS {
                        return Err(StoreError::Unavailable(
                            format!(
                                "migration {} ({}) of table {} waited {DDL_LOCK_WAIT_SECS} s for a lock \
                                 on the table {DDL_ATTEMPTS} times, and gave up rather than hold back \
                                 producers and relays queued behind it: a long transaction has used \
                                 the table; run migrate again once it ended ({e})",
                                m.version, m.name, sql.table
                            )
                            .into(),
                        ));
                    }
                    tracing::warn!(
                        postbox.table = %sql.table,
                        postbox.migration = m.version,
                        attempt,
                        "a migration waited too long for a lock on the outbox table; trying again"
                    );
                    attempt += 1;
                    tokio::time::sleep(DDL_RETRY_PAUSE).await;
                }
                Err(e) => {
                    return Err(match map_err(e) {
                        StoreError::Database(src) => StoreError::Schema(format!(
                            "migration {} ({}) of table {} failed: {src}",
                            m.version, m.name, sql.table
                        )),
                        other => other,
                    });
                }
                Ok(()) => break,
            }
        }
        tracing::info!(postbox.table = %sql.table, postbox.migration = m.version, "applied outbox migration");
    }
    conn.execute("SET SESSION lock_wait_timeout = @postbox_migrate_lock_wait_timeout")
        .await
        .map_err(map_err)?;
    Ok(())
}

/// Runs the statements of migration `m`, then records it.
async fn apply_one(
    sql: &Sql,
    conn: &mut MySqlConnection,
    m: &Migration,
) -> Result<(), sqlx::Error> {
    let text = m
        .sql
        .replace("{table}", &sql.t)
        .replace("{keys}", &sql.keys)
        .replace("{trigger}", &sql.trigger)
        .replace("{relays}", &sql.relays)
        .replace("{table_name}", sql.table.as_str());
    for statement in text.split(STATEMENT_BREAK) {
        // DDL and CREATE TRIGGER go over the text protocol: the prepared
        // statement protocol refuses CREATE TRIGGER.
        conn.execute(statement).await?;
    }
    let record = format!(
        "INSERT INTO {} (`version`, `name`) VALUES (?, ?)",
        sql.migrations
    );
    sqlx::query(&record)
        .bind(m.version)
        .bind(m.name)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
