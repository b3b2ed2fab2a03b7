//! Every SQL statement of the SQLite store, built once per table name.

use postbox_core::Ident;

/// Microseconds since the epoch on SQLite's clock. SQLite evaluates it once
/// per statement, so every row of one claim sees the same "now".
pub(crate) const NOW: &str = "CAST(unixepoch('subsec') * 1000000 AS INTEGER)";

const MIGRATIONS: &[(i64, &str, &str)] =
    &[(1, "outbox", include_str!("../migrations/0001_outbox.sql"))];

/// Columns returned to build a `Message`.
const MESSAGE_COLUMNS: &str =
    "seq, id, topic, key, payload, headers, tenant, attempts, max_attempts, created_at";

/// Columns returned to build a `MessageRecord`.
pub(crate) const RECORD_COLUMNS: &str = "seq, id, topic, key, payload, headers, tenant, attempts, \
     max_attempts, created_at, status, lease_until, last_error, parked, available_at";

#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) table: String,
    pub(crate) history: String,
    pub(crate) migrations: Vec<(i64, &'static str, String)>,
    pub(crate) insert: String,
    pub(crate) claim: String,
    pub(crate) claim_tenant: String,
    pub(crate) complete_sent_many: String,
    pub(crate) complete_retry: String,
    pub(crate) complete_dead: String,
    pub(crate) complete_release: String,
}

impl Sql {
    pub(crate) fn new(table: &Ident) -> Self {
        let t = table.quoted();
        // SQLite has no identifier length limit, and a validated name plus a
        // suffix of letters stays a valid identifier.
        let history = format!("\"{}_migrations\"", table.as_str());
        let idx = |suffix: &str| format!("\"{}_{suffix}\"", table.as_str());
        let migrations = MIGRATIONS
            .iter()
            .map(|(v, name, sql)| {
                let sql = sql
                    .replace("{table}", &t)
                    .replace("{index_pending}", &idx("pending"))
                    .replace("{index_keyed}", &idx("keyed"))
                    .replace("{index_dead}", &idx("dead"));
                (*v, *name, sql)
            })
            .collect();
        // The claim is one UPDATE: SQLite starts a write transaction at the
        // start of a writing statement, so no other writer can slip between
        // choosing rows and leasing them. A keyed row qualifies only when no
        // earlier row of its key is pending (leased or not) or parked: that
        // probe is one lookup in the (key, seq) partial index.
        let claim_with = |tenant: &str| {
            format!(
                "UPDATE {t} SET attempts = attempts + 1, lease_token = ?1, lease_until = {NOW} + ?2 \
                 WHERE seq IN ( \
                   SELECT o.seq FROM {t} o \
                   WHERE o.status = 'pending' AND o.available_at <= {NOW} \
                     AND (o.lease_until IS NULL OR o.lease_until <= {NOW}) {tenant} \
                     AND (o.key IS NULL OR NOT EXISTS ( \
                       SELECT 1 FROM {t} p WHERE p.key = o.key AND p.seq < o.seq \
                         AND (p.status = 'pending' OR p.parked = 1))) \
                   ORDER BY o.seq LIMIT ?3) \
                 RETURNING {MESSAGE_COLUMNS}, {NOW} + ?2"
            )
        };
        Self {
            insert: format!(
                "INSERT INTO {t} (id, topic, key, payload, headers, tenant, available_at, max_attempts) VALUES "
            ),
            claim: claim_with(""),
            claim_tenant: claim_with("AND o.tenant = ?4"),
            // Every completion is fenced by the lease token: a relay whose
            // lease was taken over matches no row and changes nothing.
            // The hot path: every sent row of a batch in one statement.
            complete_sent_many: format!(
                "DELETE FROM {t} WHERE lease_token = ?1 AND status = 'pending' \
                 AND seq IN (SELECT value FROM json_each(?2))"
            ),
            complete_retry: format!(
                "UPDATE {t} SET lease_token = NULL, lease_until = NULL, available_at = {NOW} + ?3, \
                 last_error = ?4 WHERE seq = ?1 AND lease_token = ?2 AND status = 'pending'"
            ),
            complete_dead: format!(
                "UPDATE {t} SET lease_token = NULL, lease_until = NULL, status = 'dead', \
                 parked = (?3 AND key IS NOT NULL), last_error = ?4 \
                 WHERE seq = ?1 AND lease_token = ?2 AND status = 'pending'"
            ),
            complete_release: format!(
                "UPDATE {t} SET lease_token = NULL, lease_until = NULL, attempts = max(attempts - 1, 0) \
                 WHERE seq = ?1 AND lease_token = ?2 AND status = 'pending'"
            ),
            table: t,
            history,
            migrations,
        }
    }
}
