//! Admin queries: stats, list, replay, skip, purge. Exact, not hot-path: they
//! scan what the filter leaves.

use std::time::Duration;

use bytes::Bytes;
use postbox_core::{
    Filter, GroupBy, GroupStats, Headers, ListQuery, MessageRecord, PurgeQuery, Stats, Status,
    StoreError, from_unix_micros,
};
use sqlx::mysql::{MySqlArguments, MySqlRow};
use sqlx::query::Query;
use sqlx::{MySql, MySqlPool, Row};
use uuid::Uuid;

use crate::claim::{BEGIN_RC, placeholders};
use crate::error::map_err;
use crate::outbox::{EPOCH, Sql};

/// "Held by a relay under an unexpired lease", on the database clock.
const LEASED: &str = "(`lease_until` IS NOT NULL AND `lease_until` > UTC_TIMESTAMP(6))";

/// A value bound by a filter.
enum Bind {
    Text(String),
    Id(Uuid),
    Int(i64),
}

/// `AND ...` conditions for `filter`, and their bound values in order.
struct Where {
    sql: String,
    binds: Vec<Bind>,
}

impl Where {
    fn new(f: &Filter) -> Self {
        let mut w = Where {
            sql: String::new(),
            binds: Vec::new(),
        };
        if let Some(t) = &f.topic {
            w.sql.push_str(" AND `topic` = ?");
            w.binds.push(Bind::Text(t.clone()));
        }
        if let Some(k) = &f.key {
            // the hash is indexed and compares bytes exactly
            w.sql.push_str(" AND `key_hash` = UNHEX(SHA2(?, 256))");
            w.binds.push(Bind::Text(k.clone()));
        }
        if let Some(t) = &f.tenant {
            w.sql.push_str(" AND `tenant` = ?");
            w.binds.push(Bind::Text(t.clone()));
        }
        if !f.ids.is_empty() {
            w.sql
                .push_str(&format!(" AND `id` IN ({})", placeholders(f.ids.len())));
            w.binds.extend(f.ids.iter().map(|id| Bind::Id(*id)));
        }
        if let Some(age) = f.older_than {
            w.sql
                .push_str(" AND `created_at` <= TIMESTAMPADD(MICROSECOND, ?, UTC_TIMESTAMP(6))");
            w.binds.push(Bind::Int(-micros(age)));
        }
        if let Some(text) = &f.error_contains {
            // INSTR, not LIKE: no wildcard escaping; case-sensitive under utf8mb4_bin
            w.sql.push_str(" AND INSTR(`last_error`, ?) > 0");
            w.binds.push(Bind::Text(text.clone()));
        }
        w
    }

    fn bind<'q>(
        &'q self,
        mut q: Query<'q, MySql, MySqlArguments>,
    ) -> Query<'q, MySql, MySqlArguments> {
        for b in &self.binds {
            q = match b {
                Bind::Text(s) => q.bind(s.as_str()),
                Bind::Id(id) => q.bind(*id),
                Bind::Int(n) => q.bind(*n),
            };
        }
        q
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX / 2)
}

fn count(row: &MySqlRow, col: &str) -> Result<u64, StoreError> {
    let n: i64 = row.try_get(col).map_err(map_err)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// The counting columns of `stats` and `stats_by`, read by `stats_of`.
fn counts() -> String {
    format!(
        "CAST(COALESCE(SUM(`status` = 'pending' AND NOT {LEASED} AND `attempts` = 0 AND `available_at` <= UTC_TIMESTAMP(6)), 0) AS SIGNED) AS `ready`, \
         CAST(COALESCE(SUM(`status` = 'pending' AND NOT {LEASED} AND `attempts` = 0 AND `available_at` > UTC_TIMESTAMP(6)), 0) AS SIGNED) AS `delayed`, \
         CAST(COALESCE(SUM(`status` = 'pending' AND NOT {LEASED} AND `attempts` > 0), 0) AS SIGNED) AS `retrying`, \
         CAST(COALESCE(SUM(`status` = 'pending' AND {LEASED}), 0) AS SIGNED) AS `leased`, \
         CAST(COALESCE(SUM(`status` = 'dead'), 0) AS SIGNED) AS `dead`, \
         CAST(COUNT(DISTINCT CASE WHEN `status` = 'dead' AND `parked` THEN `key_hash` END) AS SIGNED) AS `parked_keys`, \
         CAST(COALESCE(SUM(`status` = 'sent'), 0) AS SIGNED) AS `sent`, \
         TIMESTAMPDIFF(MICROSECOND, {EPOCH}, MIN(CASE WHEN `status` = 'pending' THEN `created_at` END)) AS `oldest_us`"
    )
}

fn stats_of(row: &MySqlRow) -> Result<Stats, StoreError> {
    let oldest: Option<i64> = row.try_get("oldest_us").map_err(map_err)?;
    Ok(Stats::new(
        count(row, "ready")?,
        count(row, "delayed")?,
        count(row, "retrying")?,
        count(row, "leased")?,
        count(row, "dead")?,
        count(row, "parked_keys")?,
        count(row, "sent")?,
        oldest.map(from_unix_micros),
    ))
}

pub(crate) async fn stats(sql: &Sql, pool: &MySqlPool, f: &Filter) -> Result<Stats, StoreError> {
    let w = Where::new(f);
    let text = format!(
        "SELECT {counts} FROM {t} WHERE 1 = 1{w}",
        counts = counts(),
        t = sql.t,
        w = w.sql
    );
    let row = w
        .bind(sqlx::query(&text))
        .fetch_one(pool)
        .await
        .map_err(map_err)?;
    stats_of(&row)
}

/// Counts per topic or tenant: the same columns as `stats`, grouped.
pub(crate) async fn stats_by(
    sql: &Sql,
    pool: &MySqlPool,
    f: &Filter,
    by: GroupBy,
) -> Result<Vec<GroupStats>, StoreError> {
    let column = match by {
        GroupBy::Tenant => "`tenant`",
        _ => "`topic`",
    };
    let w = Where::new(f);
    let text = format!(
        "SELECT {column} AS `grp`, {counts} FROM {t} WHERE 1 = 1{w} GROUP BY {column}",
        counts = counts(),
        t = sql.t,
        w = w.sql
    );
    let rows = w
        .bind(sqlx::query(&text))
        .fetch_all(pool)
        .await
        .map_err(map_err)?;
    let mut groups = rows
        .iter()
        .map(|row| Ok(GroupStats::new(opt_text(row, "grp")?, stats_of(row)?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    groups.sort_by(|a, b| a.group.cmp(&b.group));
    Ok(groups)
}

fn status_condition(status: Option<Status>) -> Result<String, StoreError> {
    Ok(match status {
        None => String::new(),
        Some(Status::Pending) => format!(" AND `status` = 'pending' AND NOT {LEASED}"),
        Some(Status::Leased) => format!(" AND `status` = 'pending' AND {LEASED}"),
        Some(Status::Dead) => " AND `status` = 'dead'".to_owned(),
        Some(Status::Sent) => " AND `status` = 'sent'".to_owned(),
        Some(other) => {
            return Err(StoreError::Config(format!(
                "postbox-mysql does not know the status {other:?}"
            )));
        }
    })
}

fn opt_text(row: &MySqlRow, col: &str) -> Result<Option<String>, StoreError> {
    let b: Option<Vec<u8>> = row.try_get(col).map_err(map_err)?;
    Ok(b.map(|b| String::from_utf8_lossy(&b).into_owned()))
}

pub(crate) async fn list(
    sql: &Sql,
    pool: &MySqlPool,
    q: &ListQuery,
) -> Result<Vec<MessageRecord>, StoreError> {
    let w = Where::new(&q.filter);
    let text = format!(
        "SELECT `seq`, `id`, `topic`, `key`, `tenant`, `status`, {LEASED} AS `leased`, `attempts`, \
           `max_attempts`, `last_error`, `parked`, \
           TIMESTAMPDIFF(MICROSECOND, {EPOCH}, `created_at`) AS `created_us`, \
           TIMESTAMPDIFF(MICROSECOND, {EPOCH}, `available_at`) AS `available_us`, \
           TIMESTAMPDIFF(MICROSECOND, {EPOCH}, `sent_at`) AS `sent_us`, \
           CAST(`headers` AS CHAR) AS `headers`, `payload` \
         FROM {t} WHERE `seq` > ?{status}{w} ORDER BY `seq` LIMIT ?",
        t = sql.t,
        status = status_condition(q.status)?,
        w = w.sql
    );
    let query = sqlx::query(&text).bind(q.after_seq.unwrap_or(i64::MIN));
    let rows = w
        .bind(query)
        .bind(i64::try_from(q.limit).unwrap_or(i64::MAX))
        .fetch_all(pool)
        .await
        .map_err(map_err)?;
    rows.iter().map(record).collect()
}

fn record(row: &MySqlRow) -> Result<MessageRecord, StoreError> {
    let id: Vec<u8> = row.try_get("id").map_err(map_err)?;
    let status_text = opt_text(row, "status")?.unwrap_or_default();
    let leased: bool = row.try_get("leased").map_err(map_err)?;
    let status = match status_text.as_str() {
        "dead" => Status::Dead,
        "sent" => Status::Sent,
        _ if leased => Status::Leased,
        _ => Status::Pending,
    };
    let attempts: i32 = row.try_get("attempts").map_err(map_err)?;
    let max_attempts: Option<i32> = row.try_get("max_attempts").map_err(map_err)?;
    let created_us: i64 = row.try_get("created_us").map_err(map_err)?;
    let available_us: i64 = row.try_get("available_us").map_err(map_err)?;
    // a row whose headers cannot be read is still listed, without them
    let headers: Headers = opt_text(row, "headers")?
        .and_then(|h| serde_json::from_str(&h).ok())
        .unwrap_or_default();
    let payload: Vec<u8> = row.try_get("payload").map_err(map_err)?;
    let sent_us: Option<i64> = row.try_get("sent_us").map_err(map_err)?;
    Ok(MessageRecord::new(
        row.try_get("seq").map_err(map_err)?,
        Uuid::from_slice(&id).unwrap_or(Uuid::nil()),
        opt_text(row, "topic")?.unwrap_or_default(),
        opt_text(row, "key")?,
        opt_text(row, "tenant")?,
        status,
        u32::try_from(attempts).unwrap_or(0),
        max_attempts.and_then(|n| u32::try_from(n).ok()),
        opt_text(row, "last_error")?,
        row.try_get("parked").map_err(map_err)?,
        from_unix_micros(created_us),
        from_unix_micros(available_us),
        headers,
        Bytes::from(payload),
    )
    .sent_at(sent_us.map(from_unix_micros)))
}

pub(crate) async fn replay(sql: &Sql, pool: &MySqlPool, f: &Filter) -> Result<u64, StoreError> {
    let w = Where::new(f);
    // A replayed keyed message becomes due when the live leases on its key
    // end, not at once: with `on_dead = skip` (or after a `skip`) a later
    // message of the key may be leased right now, and a key is held by one
    // lease at a time. `l` holds those leases' ends for the keys of dead
    // rows (the aggregate makes the server materialise it, as an `UPDATE`
    // may not read its own table in a subquery); its columns are named so
    // that the filter's bare column names can only mean `r`'s.
    let text = format!(
        "UPDATE {t} AS r \
         LEFT JOIN (SELECT p.`key_hash` AS `leased_key`, MAX(p.`lease_until`) AS `leased_until` \
                      FROM {t} AS p \
                     WHERE p.`status` = 'pending' AND p.`lease_until` > UTC_TIMESTAMP(6) \
                       AND p.`key_hash` IN (SELECT d.`key_hash` FROM {t} AS d WHERE d.`status` = 'dead') \
                     GROUP BY p.`key_hash`) AS l ON l.`leased_key` = r.`key_hash` \
         SET r.`status` = 'pending', r.`parked` = FALSE, r.`attempts` = 0, \
             r.`available_at` = GREATEST(UTC_TIMESTAMP(6), COALESCE(l.`leased_until`, UTC_TIMESTAMP(6))), \
             r.`lease_token` = NULL, r.`lease_until` = NULL \
         WHERE r.`status` = 'dead'{w}",
        t = sql.t,
        w = w.sql
    );
    let done = w
        .bind(sqlx::query(&text))
        .execute(pool)
        .await
        .map_err(map_err)?;
    Ok(done.rows_affected())
}

pub(crate) async fn skip(sql: &Sql, pool: &MySqlPool, f: &Filter) -> Result<u64, StoreError> {
    let w = Where::new(f);
    let text = format!(
        "UPDATE {t} SET `parked` = FALSE WHERE `status` = 'dead' AND `parked`{w}",
        t = sql.t,
        w = w.sql
    );
    let done = w
        .bind(sqlx::query(&text))
        .execute(pool)
        .await
        .map_err(map_err)?;
    Ok(done.rows_affected())
}

pub(crate) async fn purge(sql: &Sql, pool: &MySqlPool, q: &PurgeQuery) -> Result<u64, StoreError> {
    let status = match q.status {
        Status::Dead => "dead",
        Status::Sent => "sent",
        _ => return Ok(0),
    };
    let w = Where::new(&q.filter);
    let text = format!(
        "DELETE FROM {t} WHERE `status` = '{status}'{w}",
        t = sql.t,
        w = w.sql
    );
    let done = w
        .bind(sqlx::query(&text))
        .execute(pool)
        .await
        .map_err(map_err)?;
    Ok(done.rows_affected())
}

/// Tenants with pending rows, by name. No index serves it (tenants are TEXT):
/// it reads the pending rows through the `(status, seq)` index, which the
/// relay does once per fairness refresh (every few seconds), not per claim.
/// Claims restricted to a tenant likewise read pending rows in `seq` order
/// until they find that tenant's; see README.md, "Tenants".
pub(crate) async fn pending_tenants(
    sql: &Sql,
    pool: &MySqlPool,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
    let q = format!(
        "SELECT DISTINCT `tenant` FROM {t} \
         WHERE `status` = 'pending' AND `tenant` IS NOT NULL \
         ORDER BY `tenant` LIMIT ?",
        t = sql.t
    );
    // utf8mb4_bin TEXT comes back as bytes; it is valid UTF-8 by its charset
    let names: Vec<Vec<u8>> = sqlx::query_scalar(&q)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(pool)
        .await
        .map_err(map_err)?;
    Ok(names
        .into_iter()
        .map(|n| String::from_utf8_lossy(&n).into_owned())
        .collect())
}

/// Deletes at most `limit` sent rows at least `older_than` old, oldest
/// first: one statement (`Sql::purge_sent`) in one short READ COMMITTED
/// transaction.
pub(crate) async fn purge_sent(
    sql: &Sql,
    pool: &MySqlPool,
    older_than: Duration,
    limit: usize,
) -> Result<u64, StoreError> {
    // capped at ~100 years so that now - age stays a valid DATETIME
    let age = micros(older_than).min(3_155_760_000_000_000);
    let mut tx = pool.begin_with(BEGIN_RC).await.map_err(map_err)?;
    let done = sqlx::query(&sql.purge_sent)
        .bind(-age)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
    tx.commit().await.map_err(map_err)?;
    Ok(done.rows_affected())
}
