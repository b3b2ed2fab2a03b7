//! Relay heartbeats: the `<table>_relays` table (migration 0002) that
//! `postbox status` reads to list the live relays and flag stale ones. One
//! small upsert every few seconds per relay, never on the claim path.

use std::time::Duration;

use postbox_core::{RelayHeartbeat, RelayRecord, StoreError, from_unix_micros, to_unix_micros};
use sqlx::mysql::MySqlRow;
use sqlx::{MySqlPool, Row};
use uuid::Uuid;

use crate::error::map_err;
use crate::outbox::{EPOCH, Sql};

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX / 2)
}

/// Upserts the relay's row, stamped with the database clock. The values
/// are bound twice rather than read back with `VALUES()`, which MySQL 8
/// deprecates and MariaDB spells differently.
pub(crate) async fn write(
    sql: &Sql,
    pool: &MySqlPool,
    beat: &RelayHeartbeat,
) -> Result<(), StoreError> {
    let at = format!("TIMESTAMPADD(MICROSECOND, ?, {EPOCH})");
    let text = format!(
        "INSERT INTO {r} (`relay_id`, `host`, `pid`, `version`, `started_at`, `interval_us`, \
           `last_heartbeat`, `last_claim_at`, `leased`) \
         VALUES (?, ?, ?, ?, {at}, ?, UTC_TIMESTAMP(6), {at}, ?) \
         ON DUPLICATE KEY UPDATE `host` = ?, `pid` = ?, `version` = ?, `started_at` = {at}, \
           `interval_us` = ?, `last_heartbeat` = UTC_TIMESTAMP(6), `last_claim_at` = {at}, `leased` = ?",
        r = sql.relays
    );
    let started = to_unix_micros(beat.started_at);
    let claimed = beat.last_claim_at.map(to_unix_micros);
    let interval = micros(beat.interval);
    let leased = i64::try_from(beat.leased).unwrap_or(i64::MAX);
    let pid = i64::from(beat.pid);
    sqlx::query(&text)
        .bind(beat.relay_id)
        .bind(beat.host.as_str())
        .bind(pid)
        .bind(beat.version.as_str())
        .bind(started)
        .bind(interval)
        .bind(claimed)
        .bind(leased)
        .bind(beat.host.as_str())
        .bind(pid)
        .bind(beat.version.as_str())
        .bind(started)
        .bind(interval)
        .bind(claimed)
        .bind(leased)
        .execute(pool)
        .await
        .map_err(map_err)?;
    Ok(())
}

/// Every row, oldest start first, aged on the database clock.
pub(crate) async fn list(sql: &Sql, pool: &MySqlPool) -> Result<Vec<RelayRecord>, StoreError> {
    let us = |col: &str| format!("TIMESTAMPDIFF(MICROSECOND, {EPOCH}, {col})");
    let text = format!(
        "SELECT `relay_id`, `host`, `pid`, `version`, {started} AS `started_us`, `interval_us`, \
           {beat} AS `heartbeat_us`, {claimed} AS `claimed_us`, `leased`, \
           GREATEST(TIMESTAMPDIFF(MICROSECOND, `last_heartbeat`, UTC_TIMESTAMP(6)), 0) AS `silent_us` \
         FROM {r} ORDER BY `started_at`, `relay_id`",
        started = us("`started_at`"),
        beat = us("`last_heartbeat`"),
        claimed = us("`last_claim_at`"),
        r = sql.relays
    );
    let rows = sqlx::query(&text).fetch_all(pool).await.map_err(map_err)?;
    rows.iter().map(decode).collect()
}

/// Text read as bytes: a server whose default collation is binary flags the
/// column BINARY, which sqlx refuses to decode as a string.
fn text(r: &MySqlRow, col: &str) -> Result<String, StoreError> {
    let b: Vec<u8> = r.try_get(col).map_err(map_err)?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

fn decode(r: &MySqlRow) -> Result<RelayRecord, StoreError> {
    let duration = |col: &str| -> Result<Duration, StoreError> {
        Ok(Duration::from_micros(
            r.try_get::<i64, _>(col)
                .map_err(map_err)?
                .max(0)
                .unsigned_abs(),
        ))
    };
    let heartbeat = RelayHeartbeat::new(
        Uuid::from_slice(&r.try_get::<Vec<u8>, _>("relay_id").map_err(map_err)?)
            .unwrap_or(Uuid::nil()),
        text(r, "host")?,
        u32::try_from(r.try_get::<i64, _>("pid").map_err(map_err)?).unwrap_or(0),
        text(r, "version")?,
        from_unix_micros(r.try_get("started_us").map_err(map_err)?),
        duration("interval_us")?,
    )
    .last_claim_at(
        r.try_get::<Option<i64>, _>("claimed_us")
            .map_err(map_err)?
            .map(from_unix_micros),
    )
    .leased(
        r.try_get::<i64, _>("leased")
            .map_err(map_err)?
            .max(0)
            .unsigned_abs(),
    );
    Ok(RelayRecord::new(
        heartbeat,
        from_unix_micros(r.try_get("heartbeat_us").map_err(map_err)?),
        duration("silent_us")?,
    ))
}

/// Deletes one relay's row; whether there was one.
pub(crate) async fn remove(sql: &Sql, pool: &MySqlPool, id: Uuid) -> Result<bool, StoreError> {
    let done = sqlx::query(&format!("DELETE FROM {} WHERE `relay_id` = ?", sql.relays))
        .bind(id)
        .execute(pool)
        .await
        .map_err(map_err)?;
    Ok(done.rows_affected() > 0)
}
