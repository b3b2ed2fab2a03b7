//! Claiming under a lease and completing under its fencing token: the relay's
//! side of the outbox. The ordering rule is enforced here, in `claim`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use postbox_core::{
    Claim, ClaimRequest, CompleteReport, Completion, Disposition, Headers, Lease, Malformed,
    Message, StoreError, from_unix_micros,
};
use sqlx::mysql::MySqlRow;
use sqlx::{Connection, MySqlPool, Row};
use uuid::Uuid;

use crate::closing::Closing;
use crate::error::map_err;
use crate::outbox::{EPOCH, Sql};

/// Every store transaction runs in READ COMMITTED, whatever the session
/// default: each statement then reads a fresh snapshot (the claim's
/// re-check depends on it) and InnoDB takes no gap locks.
pub(crate) const BEGIN_RC: &str =
    "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION";

/// Upper bound on rows per claim and per `IN (...)` list.
const MAX_CLAIM: usize = 5_000;

/// Longest `last_error` kept (the column is TEXT: 65,535 bytes).
const MAX_ERROR_BYTES: usize = 16 * 1024;

/// A candidate row from the claim's first statement.
struct Candidate {
    seq: i64,
    key_hash: Option<Vec<u8>>,
    kseq: Option<i64>,
    row: MySqlRow,
}

/// `SELECT` placeholders for `n` values.
pub(crate) fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

fn micros(d: Duration) -> i64 {
    // capped at ~100 years so that now + d stays a valid DATETIME
    i64::try_from(d.as_micros()).map_or(3_155_760_000_000_000, |m| m.min(3_155_760_000_000_000))
}

/// Claims up to `req.limit` rows. Three statements in one transaction:
///
/// 1. `SELECT ... FOR UPDATE SKIP LOCKED`: candidate rows in seq order,
///    keyed ones only when no earlier unfinished row of their key is seen.
/// 2. For keyed candidates, the head of each key (lowest unfinished kseq) is
///    read again with a fresh snapshot, and only candidates that are still
///    heads are kept. Step 1's locking read sees rows committed after its
///    snapshot was taken while its NOT EXISTS probe reads that snapshot, so
///    a head that committed during the statement could be missed there; every
///    earlier row of a key committed before any later row of it (the key
///    lock), hence before step 2 starts, so step 2 cannot miss it.
/// 3. `UPDATE` the kept rows: attempts + 1, the lease token, and a deadline
///    of database time at step 1 plus the lease.
///
/// What it costs: five round trips per non-empty claim (BEGIN, three
/// statements, COMMIT) against one `UPDATE ... RETURNING` on PostgreSQL;
/// MySQL has no `RETURNING` on `UPDATE` and MariaDB none at all on it.
pub(crate) async fn claim(
    sql: &Sql,
    pool: &MySqlPool,
    req: &ClaimRequest,
) -> Result<Claim, StoreError> {
    let token = Uuid::new_v4();
    let limit = req.limit.min(MAX_CLAIM);
    if limit == 0 {
        return Ok(empty_claim(token, req.lease));
    }
    // Closed, not returned, if the relay gives this claim up or it fails.
    let mut conn = Closing::acquire(pool).await.map_err(map_err)?;
    let mut tx = conn.begin_with(BEGIN_RC).await.map_err(map_err)?;
    let q = match &req.tenant {
        Some(t) => sqlx::query(&sql.claim_tenant).bind(t),
        None => sqlx::query(&sql.claim_any),
    };
    let rows = q
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
    let Some(first) = rows.first() else {
        tx.commit().await.map_err(map_err)?;
        conn.done();
        return Ok(empty_claim(token, req.lease));
    };
    let now_us: i64 = first.try_get("now_us").map_err(map_err)?;
    let mut candidates = Vec::with_capacity(rows.len());
    for row in rows {
        candidates.push(Candidate {
            seq: row.try_get("seq").map_err(map_err)?,
            key_hash: row.try_get("key_hash").map_err(map_err)?,
            kseq: row.try_get("kseq").map_err(map_err)?,
            row,
        });
    }

    let hashes: Vec<Vec<u8>> = {
        let mut seen = HashSet::new();
        candidates
            .iter()
            .filter_map(|c| c.key_hash.clone())
            .filter(|h| seen.insert(h.clone()))
            .collect()
    };
    if !hashes.is_empty() {
        // by status, each part a range of (key_hash, status, kseq, parked)
        let check = format!(
            "SELECT h.`key_hash`, MIN(h.`head`) AS `head` FROM ( \
               SELECT `key_hash`, MIN(`kseq`) AS `head` FROM {t} \
               WHERE `key_hash` IN ({p}) AND `status` = 'pending' GROUP BY `key_hash` \
               UNION ALL \
               SELECT `key_hash`, MIN(`kseq`) AS `head` FROM {t} \
               WHERE `key_hash` IN ({p}) AND `status` = 'dead' AND `parked` GROUP BY `key_hash` \
             ) AS h GROUP BY h.`key_hash`",
            t = sql.t,
            p = placeholders(hashes.len())
        );
        let mut q = sqlx::query(&check);
        for h in hashes.iter().chain(&hashes) {
            q = q.bind(h.as_slice());
        }
        let heads: HashMap<Vec<u8>, i64> = q
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err)?
            .into_iter()
            // a key with only rows without kseq has no head (NULL)
            .filter_map(|r| {
                let head: Result<Option<i64>, _> = r.try_get("head");
                match head {
                    Ok(Some(head)) => Some(r.try_get("key_hash").map(|h| (h, head))),
                    Ok(None) => None,
                    Err(e) => Some(Err(e)),
                }
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(map_err)?;
        let mut taken = HashSet::new();
        candidates.retain(|c| match (&c.key_hash, c.kseq) {
            (None, _) => true,
            (Some(h), Some(k)) => heads.get(h) == Some(&k) && taken.insert(h.clone()),
            // written while the trigger was missing: dead-lettered below
            // instead of filling every claim's LIMIT forever
            (Some(_), None) => true,
        });
        if taken.len() < hashes.len() {
            tracing::debug!(
                postbox.keys_dropped = hashes.len() - taken.len(),
                "claim candidates were no longer the head of their key"
            );
        }
    }
    if candidates.is_empty() {
        tx.commit().await.map_err(map_err)?;
        conn.done();
        return Ok(empty_claim(token, req.lease));
    }

    let lease_until_us = now_us.saturating_add(micros(req.lease));
    let update = format!(
        "UPDATE {t} SET `attempts` = `attempts` + 1, `lease_token` = ?, \
           `lease_until` = TIMESTAMPADD(MICROSECOND, ?, {EPOCH}) \
         WHERE `seq` IN ({p})",
        t = sql.t,
        p = placeholders(candidates.len())
    );
    let mut q = sqlx::query(&update).bind(token).bind(lease_until_us);
    for c in &candidates {
        q = q.bind(c.seq);
    }
    q.execute(&mut *tx).await.map_err(map_err)?;
    tx.commit().await.map_err(map_err)?;
    conn.done();

    let mut messages = Vec::with_capacity(candidates.len());
    let mut malformed = Vec::new();
    for c in &candidates {
        // written while the trigger was missing: no place in its key's order
        let orphan = c.key_hash.is_some() && c.kseq.is_none();
        let decoded = if orphan {
            Err(NO_KSEQ.to_owned())
        } else {
            decode(&c.row)
        };
        match decoded {
            Ok(m) => messages.push(m),
            Err(reason) => {
                // an orphan parks nothing: parking it would block nothing
                // and only count as a parked key
                let key = c
                    .row
                    .try_get::<Option<Vec<u8>>, _>("key")
                    .ok()
                    .flatten()
                    .and_then(|k| String::from_utf8(k).ok())
                    .filter(|_| !orphan);
                malformed.push(Malformed {
                    seq: c.seq,
                    key,
                    reason,
                });
            }
        }
    }
    tracing::debug!(
        postbox.batch_size = messages.len(),
        postbox.malformed = malformed.len(),
        "claimed"
    );
    Ok(Claim::new(
        Lease {
            token,
            expires_at: from_unix_micros(lease_until_us),
        },
        messages,
        malformed,
    ))
}

/// Why a keyed row without `kseq` is dead-lettered.
const NO_KSEQ: &str = "keyed row without kseq: written while the table's ordering trigger was missing \
     (see SHOW TRIGGERS; run migrate), so its place in its key's order is unknown";

fn empty_claim(token: Uuid, lease: Duration) -> Claim {
    Claim::new(
        Lease {
            token,
            expires_at: SystemTime::now() + lease,
        },
        Vec::new(),
        Vec::new(),
    )
}

fn text(row: &MySqlRow, col: &str) -> Result<Option<String>, String> {
    let bytes: Option<Vec<u8>> = row
        .try_get(col)
        .map_err(|e| format!("cannot read {col}: {e}"))?;
    bytes
        .map(|b| String::from_utf8(b).map_err(|_| format!("{col} is not valid UTF-8")))
        .transpose()
}

/// Decodes a claimed row (columns of `outbox::row_columns`); the error is the
/// reason the relay dead-letters it with.
fn decode(row: &MySqlRow) -> Result<Message, String> {
    let seq: i64 = row.try_get("seq").map_err(|e| e.to_string())?;
    let id_bytes: Vec<u8> = row
        .try_get("id")
        .map_err(|e| format!("cannot read id: {e}"))?;
    let id = Uuid::from_slice(&id_bytes).map_err(|_| "id is not 16 bytes".to_owned())?;
    let topic = text(row, "topic")?.ok_or("topic is NULL")?;
    let key = text(row, "key")?;
    let payload: Vec<u8> = row
        .try_get("payload")
        .map_err(|e| format!("cannot read payload: {e}"))?;
    let headers_text = text(row, "headers")?.unwrap_or_default();
    let headers: Headers = serde_json::from_str(&headers_text).map_err(|e| {
        format!("headers are not a JSON object of strings ({e}): {headers_text:.200}")
    })?;
    let tenant = text(row, "tenant")?;
    let attempts: i32 = row.try_get("attempts").map_err(|e| e.to_string())?;
    let max_attempts: Option<i32> = row.try_get("max_attempts").map_err(|e| e.to_string())?;
    let max_attempts = max_attempts
        .map(|n| u32::try_from(n).map_err(|_| format!("max_attempts is negative ({n})")))
        .transpose()?;
    let created_us: i64 = row.try_get("created_us").map_err(|e| e.to_string())?;
    Ok(Message::new(
        id,
        seq,
        topic,
        key,
        Bytes::from(payload),
        headers,
        tenant,
        u32::try_from(attempts.saturating_add(1)).unwrap_or(1),
        max_attempts,
        from_unix_micros(created_us),
    ))
}

fn clip(error: &str) -> &str {
    if error.len() <= MAX_ERROR_BYTES {
        return error;
    }
    let mut end = MAX_ERROR_BYTES;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    &error[..end]
}

/// Applies completions in one transaction. Every statement is guarded by
/// `lease_token = ? AND status = 'pending'`: a relay whose lease was taken
/// over changes nothing (fencing), and the rows it names count as lost.
/// With `keep_sent` (a store with a retention) sent rows are marked sent
/// instead of deleted.
pub(crate) async fn complete(
    sql: &Sql,
    pool: &MySqlPool,
    token: Uuid,
    completions: &[Completion],
    keep_sent: bool,
) -> Result<CompleteReport, StoreError> {
    if completions.is_empty() {
        return Ok(CompleteReport::default());
    }
    let t = &sql.t;
    let guard = "`seq` = ? AND `lease_token` = ? AND `status` = 'pending'";
    // Closed, not returned, if the relay gives this recording up or it fails.
    let mut conn = Closing::acquire(pool).await.map_err(map_err)?;
    let mut tx = conn.begin_with(BEGIN_RC).await.map_err(map_err)?;
    let mut applied = 0u64;

    // Sent rows go in one statement per chunk: the common case, kept to one
    // statement. Deleted, or with a retention kept: marked sent on the
    // database clock with the lease cleared. `status` leaves 'pending', so
    // the rows drop out of the claim scan, and the per-key rule (only
    // pending and parked dead rows block a key) no longer sees them.
    let sent: Vec<i64> = completions
        .iter()
        .filter(|c| c.disposition == Disposition::Sent)
        .map(|c| c.seq)
        .collect();
    let sent_statement = if keep_sent {
        "UPDATE {t} SET `status` = 'sent', `sent_at` = UTC_TIMESTAMP(6), `lease_token` = NULL, \
         `lease_until` = NULL WHERE `lease_token` = ? AND `status` = 'pending' AND `seq` IN"
    } else {
        "DELETE FROM {t} WHERE `lease_token` = ? AND `status` = 'pending' AND `seq` IN"
    };
    for chunk in sent.chunks(MAX_CLAIM) {
        let delete = format!(
            "{} ({})",
            sent_statement.replace("{t}", t),
            placeholders(chunk.len())
        );
        let mut q = sqlx::query(&delete).bind(token);
        for seq in chunk {
            q = q.bind(*seq);
        }
        applied += q.execute(&mut *tx).await.map_err(map_err)?.rows_affected();
    }

    for c in completions {
        let done = match &c.disposition {
            Disposition::Sent => continue,
            Disposition::Retry { delay, error } => sqlx::query(&format!(
                "UPDATE {t} SET `available_at` = TIMESTAMPADD(MICROSECOND, ?, UTC_TIMESTAMP(6)), \
                   `lease_token` = NULL, `lease_until` = NULL, `last_error` = ? WHERE {guard}"
            ))
            .bind(micros(*delay))
            .bind(clip(error))
            .bind(c.seq)
            .bind(token)
            .execute(&mut *tx)
            .await,
            Disposition::Dead { error, park } => {
                sqlx::query(&format!(
                    "UPDATE {t} SET `status` = 'dead', `parked` = (? AND `key` IS NOT NULL), \
                   `lease_token` = NULL, `lease_until` = NULL, `last_error` = ? WHERE {guard}"
                ))
                .bind(*park)
                .bind(clip(error))
                .bind(c.seq)
                .bind(token)
                .execute(&mut *tx)
                .await
            }
            Disposition::Release => {
                sqlx::query(&format!(
                    "UPDATE {t} SET `attempts` = GREATEST(`attempts` - 1, 0), \
                   `lease_token` = NULL, `lease_until` = NULL WHERE {guard}"
                ))
                .bind(c.seq)
                .bind(token)
                .execute(&mut *tx)
                .await
            }
            other => {
                return Err(StoreError::Config(format!(
                    "postbox-mysql does not know the disposition {other:?}"
                )));
            }
        };
        applied += done.map_err(map_err)?.rows_affected();
    }
    tx.commit().await.map_err(map_err)?;
    conn.done();
    let applied = applied.min(completions.len() as u64);
    Ok(CompleteReport {
        applied,
        lost: completions.len() as u64 - applied,
    })
}
