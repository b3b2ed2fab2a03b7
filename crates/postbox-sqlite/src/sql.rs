//! Every SQL statement of the SQLite store, built once per table name.

use postbox_core::Ident;

/// Microseconds since the epoch on SQLite's clock. SQLite evaluates it once
/// per statement, so every row of one claim sees the same "now".
pub(crate) const NOW: &str = "CAST(unixepoch('subsec') * 1000000 AS INTEGER)";

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "outbox", include_str!("../migrations/0001_outbox.sql")),
    (2, "relays", include_str!("../migrations/0002_relays.sql")),
    (3, "tenants", include_str!("../migrations/0003_tenants.sql")),
    (
        4,
        "sent_retention",
        include_str!("../migrations/0004_sent_retention.sql"),
    ),
    (
        5,
        "text_columns",
        include_str!("../migrations/0005_text_columns.sql"),
    ),
];

/// Columns returned to build a `Message`.
const MESSAGE_COLUMNS: &str =
    "seq, id, topic, key, payload, headers, tenant, attempts, max_attempts, created_at";

/// Columns returned to build a `MessageRecord`.
pub(crate) const RECORD_COLUMNS: &str = "seq, id, topic, key, payload, headers, tenant, attempts, \
     max_attempts, created_at, status, lease_until, last_error, parked, available_at, sent_at";

#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) table: String,
    pub(crate) history: String,
    /// The relays' heartbeat table `<table>_relays`, quoted.
    pub(crate) relays: String,
    pub(crate) heartbeat: String,
    pub(crate) list_relays: String,
    pub(crate) remove_relay: String,
    pub(crate) migrations: Vec<(i64, &'static str, String)>,
    pub(crate) insert: String,
    pub(crate) claim: String,
    pub(crate) claim_tenant: String,
    pub(crate) pending_tenants: String,
    pub(crate) complete_sent_many: String,
    pub(crate) complete_sent_keep: String,
    pub(crate) purge_sent: String,
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
        let relays = format!("\"{}_relays\"", table.as_str());
        let idx = |suffix: &str| format!("\"{}_{suffix}\"", table.as_str());
        let migrations = MIGRATIONS
            .iter()
            .map(|(v, name, sql)| {
                let sql = sql
                    .replace("{table}", &t)
                    .replace("{index_pending}", &idx("pending"))
                    .replace("{index_keyed}", &idx("keyed"))
                    .replace("{index_dead}", &idx("dead"))
                    .replace("{index_tenant}", &idx("tenant"))
                    .replace("{index_sent}", &idx("sent"))
                    .replace("{trigger_text}", &idx("text_columns"))
                    .replace("{relays}", &relays);
                (*v, *name, sql)
            })
            .collect();
        // The claim is one UPDATE: SQLite starts a write transaction at the
        // start of a writing statement, so no other writer can slip between
        // choosing rows and leasing them. A keyed row qualifies only when no
        // earlier row of its key is pending (leased or not) or parked: that
        // probe is one lookup in the (key, seq) partial index. A row whose
        // `available_at` a plain-SQL producer wrote as text (which SQLite
        // sorts after every number, so never due) is claimed at once, to be
        // dead-lettered as malformed instead of holding its key forever.
        let claim_with = |tenant: &str| {
            format!(
                "UPDATE {t} SET attempts = attempts + 1, lease_token = ?1, lease_until = {NOW} + ?2 \
                 WHERE seq IN ( \
                   SELECT o.seq FROM {t} o \
                   WHERE o.status = 'pending' \
                     AND (o.available_at <= {NOW} OR typeof(o.available_at) NOT IN ('integer', 'real')) \
                     AND (o.lease_until IS NULL OR o.lease_until <= {NOW}) {tenant} \
                     AND (o.key IS NULL OR NOT EXISTS ( \
                       SELECT 1 FROM {t} p WHERE p.key = o.key AND p.seq < o.seq \
                         AND (p.status = 'pending' OR p.parked = 1))) \
                   ORDER BY o.seq LIMIT ?3) \
                 RETURNING {MESSAGE_COLUMNS}, {NOW} + ?2, \
                   typeof(available_at) IN ('integer', 'real') AS available_at_ok"
            )
        };
        Self {
            insert: format!(
                "INSERT INTO {t} (id, topic, key, payload, headers, tenant, available_at, max_attempts) VALUES "
            ),
            claim: claim_with(""),
            claim_tenant: claim_with("AND o.tenant = ?4"),
            // A loose index scan over the (tenant, seq) partial index: one
            // `min` lookup per tenant, however many rows each has.
            pending_tenants: format!(
                "WITH RECURSIVE tn(tenant) AS ( \
                   SELECT min(tenant) FROM {t} WHERE tenant IS NOT NULL AND status = 'pending' \
                   UNION ALL \
                   SELECT (SELECT min(x.tenant) FROM {t} x \
                            WHERE x.tenant > tn.tenant AND x.status = 'pending') \
                     FROM tn WHERE tn.tenant IS NOT NULL) \
                 SELECT tenant FROM tn WHERE tenant IS NOT NULL LIMIT ?1"
            ),
            // Every completion is fenced by the lease token: a relay whose
            // lease was taken over matches no row and changes nothing.
            // The hot path: every sent row of a batch in one statement.
            complete_sent_many: format!(
                "DELETE FROM {t} WHERE lease_token = ?1 AND status = 'pending' \
                 AND seq IN (SELECT value FROM json_each(?2))"
            ),
            // The same with a retention: the rows stay, marked sent on
            // SQLite's clock, lease cleared. `status` leaves 'pending', so
            // they drop out of the claim's and the key probe's partial
            // indexes: never claimed again, never blocking their key.
            complete_sent_keep: format!(
                "UPDATE {t} SET status = 'sent', sent_at = {NOW}, lease_token = NULL, \
                 lease_until = NULL WHERE lease_token = ?1 AND status = 'pending' \
                 AND seq IN (SELECT value FROM json_each(?2))"
            ),
            // Retention cleanup: at most ?2 sent rows at least ?1 µs old,
            // oldest first, found on the partial `(sent_at) WHERE status =
            // 'sent'` index (migration 3). A small LIMIT keeps each write
            // transaction, which holds SQLite's single write lock, short.
            purge_sent: format!(
                "DELETE FROM {t} WHERE seq IN ( \
                   SELECT seq FROM {t} WHERE status = 'sent' AND sent_at <= {NOW} - ?1 \
                   ORDER BY sent_at LIMIT ?2)"
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
            // One small upsert per heartbeat; the row is stamped with the
            // database clock so readers compare it with that same clock.
            heartbeat: format!(
                "INSERT INTO {relays} (relay_id, host, pid, version, started_at, interval_us, \
                 last_heartbeat, last_claim_at, leased) VALUES (?1, ?2, ?3, ?4, ?5, ?6, {NOW}, ?7, ?8) \
                 ON CONFLICT (relay_id) DO UPDATE SET host = excluded.host, pid = excluded.pid, \
                 version = excluded.version, started_at = excluded.started_at, \
                 interval_us = excluded.interval_us, last_heartbeat = excluded.last_heartbeat, \
                 last_claim_at = excluded.last_claim_at, leased = excluded.leased"
            ),
            list_relays: format!(
                "SELECT relay_id, host, pid, version, started_at, interval_us, last_heartbeat, \
                 last_claim_at, leased, {NOW} - last_heartbeat AS silent_us FROM {relays} \
                 ORDER BY started_at, relay_id"
            ),
            remove_relay: format!("DELETE FROM {relays} WHERE relay_id = ?1"),
            table: t,
            history,
            relays,
            migrations,
        }
    }
}
