//! Migrations: plain SQL files with `{schema}`/`{t}` placeholders, applied
//! in order under a transaction-scoped advisory lock and recorded in the
//! table's own history table `<table>_migrations`.
//!
//! `sqlx::migrate!` is not used because the table name is configurable.

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
    let setup = format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
         CREATE TABLE IF NOT EXISTS {history} (
             version    integer     PRIMARY KEY,
             name       text        NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    );
    let conn: &mut sqlx::PgConnection = &mut tx;
    conn.execute(sqlx::raw_sql(&setup)).await.map_err(map)?;
    let applied: Vec<i32> = sqlx::query_scalar(&format!("SELECT version FROM {history}"))
        .fetch_all(&mut *tx)
        .await
        .map_err(map)?;
    if let Some(newer) = applied.iter().copied().filter(|v| *v > LATEST).max() {
        return Err(StoreError::Schema(format!(
            "{} is at schema version {newer}, newer than this postbox ({LATEST}); upgrade postbox",
            outbox.qualified_name()
        )));
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
