//! Migrations: plain SQL files with `{schema}`/`{t}` placeholders, applied
//! in order under a transaction-scoped advisory lock and recorded in the
//! table's own history table `<table>_migrations`.
//!
//! `sqlx::migrate!` is not used because the table name is configurable.

use std::time::Duration;

use postbox_core::StoreError;
use sqlx::{Executor, PgPool};

use crate::error::map;
use crate::outbox::PgOutbox;

/// `(version, name, sql)`, in order. Never edit an applied file: add one.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "outbox", include_str!("../migrations/0001_outbox.sql")),
    (2, "relays", include_str!("../migrations/0002_relays.sql")),
    (
        3,
        "fillfactor",
        include_str!("../migrations/0003_fillfactor.sql"),
    ),
    (4, "tenants", include_str!("../migrations/0004_tenants.sql")),
    (
        5,
        "sent_retention",
        include_str!("../migrations/0005_sent_retention.sql"),
    ),
    (
        6,
        "trigger_when",
        include_str!("../migrations/0006_trigger_when.sql"),
    ),
    (
        7,
        "parked_idx",
        include_str!("../migrations/0007_parked_idx.sql"),
    ),
    (
        8,
        "claim_hint",
        include_str!("../migrations/0008_claim_hint.sql"),
    ),
];

/// The newest schema version this crate knows.
pub(crate) const LATEST: i32 = 8;

pub(crate) async fn run(outbox: &PgOutbox, pool: &PgPool) -> Result<(), StoreError> {
    // A migration whose DDL waited too long for a lock (below) is run
    // again after a pause, a few times, before its error is returned.
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match run_once(outbox, pool).await {
            Err(StoreError::Unavailable(e)) if attempt < LOCK_ATTEMPTS && is_lock_timeout(&*e) => {
                tracing::warn!(postbox.table = %outbox.qualified_name(), attempt, "a migration waited too long for a lock on the outbox; trying again");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            done => return done,
        }
    }
}

/// How many times [`run`] tries a migration that hit its `lock_timeout`.
const LOCK_ATTEMPTS: u32 = 5;

/// How long a migration's DDL waits for a lock on the outbox: relays' held
/// batches and lease completions hold row locks for up to a lease, and
/// every producer's INSERT would queue behind a waiting `ALTER` or `DROP
/// TRIGGER` all that time.
const LOCK_TIMEOUT: &str = "10s";

fn is_lock_timeout(e: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    e.downcast_ref::<sqlx::Error>().is_some_and(
        |e| matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03")),
    )
}

async fn run_once(outbox: &PgOutbox, pool: &PgPool) -> Result<(), StoreError> {
    let schema = outbox.schema().as_str();
    let table = outbox.table().as_str();
    let history = format!("\"{schema}\".\"{table}_migrations\"");
    let mut tx = pool.begin().await.map_err(map)?;
    // Serialise concurrent migrators of this table. The single-bigint form
    // (objsubid 1) cannot collide with the per-key locks (objsubid 2).
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('postbox.migrate:' || $1, 0))")
        .bind(outbox.qualified_name())
        .execute(&mut *tx)
        .await
        .map_err(map)?;
    // Read first, create only what is missing: a role without CREATE on the
    // database or schema (an application migrating at start-up after its
    // DBA did) then finds nothing to do instead of a permission error,
    // which PostgreSQL raises even for `CREATE ... IF NOT EXISTS` of an
    // object that exists.
    let (schema_exists, history_exists): (bool, bool) = sqlx::query_as(
        "SELECT to_regnamespace(quote_ident($1)) IS NOT NULL, to_regclass($2) IS NOT NULL",
    )
    .bind(schema)
    .bind(&history)
    .fetch_one(&mut *tx)
    .await
    .map_err(map)?;
    let applied: Vec<i32> = if history_exists {
        sqlx::query_scalar(&format!("SELECT version FROM {history}"))
            .fetch_all(&mut *tx)
            .await
            .map_err(map)?
    } else {
        Vec::new()
    };
    if let Some(newer) = applied.iter().copied().filter(|v| *v > LATEST).max() {
        return Err(StoreError::Schema(format!(
            "{} is at schema version {newer}, newer than this postbox ({LATEST}); upgrade postbox",
            outbox.qualified_name()
        )));
    }
    if MIGRATIONS.iter().all(|(v, _, _)| applied.contains(v)) {
        return Ok(());
    }
    sqlx::query(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        .execute(&mut *tx)
        .await
        .map_err(map)?;
    if !schema_exists {
        // Tables of one schema migrate under different locks: serialise
        // creating the schema itself, or two of them race to a duplicate.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('postbox.schema:' || $1, 0))")
            .bind(schema)
            .execute(&mut *tx)
            .await
            .map_err(map)?;
        let conn: &mut sqlx::PgConnection = &mut tx;
        conn.execute(sqlx::raw_sql(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
        )))
        .await
        .map_err(map)?;
    }
    if !history_exists {
        let conn: &mut sqlx::PgConnection = &mut tx;
        conn.execute(sqlx::raw_sql(&format!(
            "CREATE TABLE IF NOT EXISTS {history} (
                 version    integer     PRIMARY KEY,
                 name       text        NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )"
        )))
        .await
        .map_err(map)?;
    }
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        let sql = sql.replace("{schema}", schema).replace("{t}", table);
        let conn: &mut sqlx::PgConnection = &mut tx;
        conn.execute(sqlx::raw_sql(&sql)).await.map_err(map)?;
        sqlx::query(&format!(
            "INSERT INTO {history} (version, name) VALUES ($1, $2)"
        ))
        .bind(version)
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(map)?;
        tracing::info!(postbox.table = %outbox.qualified_name(), version, name, "applied outbox migration");
    }
    tx.commit().await.map_err(map)?;
    Ok(())
}
