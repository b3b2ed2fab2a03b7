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

use crate::error::{check_server_version, map_err};
use crate::outbox::Sql;

/// One migration: version, name, SQL text.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

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

/// Checks the server version, then applies the missing migrations under the
/// table's migration lock.
pub(crate) async fn run(sql: &Sql, pool: &MySqlPool) -> Result<(), StoreError> {
    let mut conn = pool.acquire().await.map_err(map_err)?;
    let version: String = sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(&mut *conn)
        .await
        .map_err(map_err)?;
    check_server_version(&version)?;

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
    // GET_LOCK is held by the session, not a transaction: release it on every
    // path, and if that fails, close the connection so the pool cannot hand
    // out a session that still holds it.
    let released = sqlx::query(
        "SELECT RELEASE_LOCK(CONCAT('postbox_migrate_', SHA1(CONCAT(DATABASE(), '.', ?))))",
    )
    .bind(sql.table.as_str())
    .execute(&mut *conn)
    .await;
    // A failed migration may leave session state behind (a shortened
    // `lock_wait_timeout`, prepared statements): that session does not go
    // back to the caller's pool either.
    if released.is_err() || result.is_err() {
        conn.close_on_drop();
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
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
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
            conn.execute(statement)
                .await
                .map_err(|e| match map_err(e) {
                    StoreError::Database(src) => StoreError::Schema(format!(
                        "migration {} ({}) of table {} failed: {src}",
                        m.version, m.name, sql.table
                    )),
                    other => other,
                })?;
        }
        let record = format!(
            "INSERT INTO {} (`version`, `name`) VALUES (?, ?)",
            sql.migrations
        );
        sqlx::query(&record)
            .bind(m.version)
            .bind(m.name)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        tracing::info!(postbox.table = %sql.table, postbox.migration = m.version, "applied outbox migration");
    }
    Ok(())
}
