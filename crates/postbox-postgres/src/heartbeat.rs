//! Relay heartbeats: the `<table>_relays` table (migration 0002) that
//! `postbox status` reads to list the live relays and flag stale ones.
//!
//! Kept apart from the claim and completion SQL: a heartbeat is one small
//! upsert every few seconds on its own connection checkout, never on the
//! claim path.

use std::time::Duration;

use postbox_core::{
    Ident, RelayHeartbeat, RelayRecord, StoreError, from_unix_micros, to_unix_micros,
};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::error::map;
use crate::outbox::PgOutbox;

/// `"schema"."<table>_relays"`, validated like the outbox name (the outbox
/// name's length limit leaves room for the suffix).
fn relays_table(outbox: &PgOutbox) -> Result<String, StoreError> {
    let name = format!("{}_relays", outbox.table().as_str());
    let table = Ident::new(&name).map_err(|e| StoreError::Config(format!("relays table: {e}")))?;
    Ok(format!("{}.{}", outbox.schema().quoted(), table.quoted()))
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Upserts the relay's row, stamped with the database clock.
pub(crate) async fn write(
    outbox: &PgOutbox,
    pool: &PgPool,
    beat: &RelayHeartbeat,
) -> Result<(), StoreError> {
    let t = relays_table(outbox)?;
    let at = |n: u8| format!("'epoch'::timestamptz + ${n}::int8 * interval '1 microsecond'");
    let sql = format!(
        "INSERT INTO {t} AS r (relay_id, host, pid, version, started_at, interval_us,
                               last_heartbeat, last_claim_at, leased)
         VALUES ($1, $2, $3, $4, {started}, $6, now(), {claimed}, $8)
         ON CONFLICT (relay_id) DO UPDATE SET
             host = excluded.host, pid = excluded.pid, version = excluded.version,
             started_at = excluded.started_at, interval_us = excluded.interval_us,
             last_heartbeat = excluded.last_heartbeat, last_claim_at = excluded.last_claim_at,
             leased = excluded.leased",
        started = at(5),
        claimed = at(7),
    );
    sqlx::query(&sql)
        .bind(beat.relay_id)
        .bind(beat.host.as_str())
        .bind(i64::from(beat.pid))
        .bind(beat.version.as_str())
        .bind(to_unix_micros(beat.started_at))
        .bind(micros(beat.interval))
        .bind(beat.last_claim_at.map(to_unix_micros))
        .bind(i64::try_from(beat.leased).unwrap_or(i64::MAX))
        .execute(pool)
        .await
        .map_err(map)?;
    Ok(())
}

fn us(expr: &str) -> String {
    format!("(extract(epoch from {expr}) * 1000000)::int8")
}

/// Every row, oldest start first, aged on the database clock.
pub(crate) async fn list(outbox: &PgOutbox, pool: &PgPool) -> Result<Vec<RelayRecord>, StoreError> {
    let t = relays_table(outbox)?;
    let sql = format!(
        "SELECT relay_id, host, pid, version, {started} AS started_us, interval_us,
                {beat} AS heartbeat_us, {claimed} AS claimed_us, leased,
                greatest({silent}, 0) AS silent_us
           FROM {t}
          ORDER BY started_at, relay_id",
        started = us("started_at"),
        beat = us("last_heartbeat"),
        claimed = us("last_claim_at"),
        silent = us("now() - last_heartbeat"),
    );
    let rows = sqlx::query(&sql).fetch_all(pool).await.map_err(map)?;
    rows.iter().map(decode).collect()
}

fn decode(r: &PgRow) -> Result<RelayRecord, StoreError> {
    let duration = |col: &str| -> Result<Duration, StoreError> {
        Ok(Duration::from_micros(
            r.try_get::<i64, _>(col).map_err(map)?.max(0).unsigned_abs(),
        ))
    };
    let heartbeat = RelayHeartbeat::new(
        r.try_get::<Uuid, _>("relay_id").map_err(map)?,
        r.try_get::<String, _>("host").map_err(map)?,
        u32::try_from(r.try_get::<i64, _>("pid").map_err(map)?).unwrap_or(0),
        r.try_get::<String, _>("version").map_err(map)?,
        from_unix_micros(r.try_get("started_us").map_err(map)?),
        duration("interval_us")?,
    )
    .last_claim_at(
        r.try_get::<Option<i64>, _>("claimed_us")
            .map_err(map)?
            .map(from_unix_micros),
    )
    .leased(
        r.try_get::<i64, _>("leased")
            .map_err(map)?
            .max(0)
            .unsigned_abs(),
    );
    Ok(RelayRecord::new(
        heartbeat,
        from_unix_micros(r.try_get("heartbeat_us").map_err(map)?),
        duration("silent_us")?,
    ))
}

/// Deletes one relay's row; whether there was one.
pub(crate) async fn remove(outbox: &PgOutbox, pool: &PgPool, id: Uuid) -> Result<bool, StoreError> {
    let t = relays_table(outbox)?;
    let done = sqlx::query(&format!("DELETE FROM {t} WHERE relay_id = $1"))
        .bind(id)
        .execute(pool)
        .await
        .map_err(map)?;
    Ok(done.rows_affected() > 0)
}
