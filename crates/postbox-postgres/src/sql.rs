//! Every SQL statement of the store, built once per table from validated
//! identifiers. Each statement says why it is shaped the way it is.

use postbox_core::Ident;

/// The SQL text for one outbox table.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) insert: String,
    pub(crate) insert_notify: String,
    pub(crate) insert_batch: String,
    pub(crate) insert_batch_notify: String,
    pub(crate) claim: String,
    pub(crate) complete: String,
    pub(crate) stats: String,
    pub(crate) list: String,
    pub(crate) replay: String,
    pub(crate) skip: String,
    pub(crate) purge: String,
    pub(crate) blockers: String,
}

/// The admin filter, parameters $1..$6: topic, key, tenant, ids, older than
/// (µs), error text. Unset parameters fold away in a custom plan.
const FILTER: &str = "($1::text IS NULL OR topic = $1)
   AND ($2::text IS NULL OR key = $2)
   AND ($3::text IS NULL OR tenant = $3)
   AND (cardinality($4::uuid[]) = 0 OR id = ANY($4::uuid[]))
   AND ($5::int8 IS NULL OR created_at <= now() - $5::int8 * interval '1 microsecond')
   AND ($6::text IS NULL OR strpos(last_error, $6) > 0)";

fn micros(expr: &str) -> String {
    format!("(extract(epoch from {expr}) * 1000000)::int8")
}

impl Sql {
    pub(crate) fn new(t: &str, _schema: &Ident, _table: &Ident) -> Self {
        // $7: available_at as Unix µs or NULL (= now()).
        let insert = format!(
            "INSERT INTO {t} (id, topic, key, payload, headers, tenant, available_at, max_attempts)
             VALUES ($1, $2, $3, $4, $5::jsonb, $6,
                     COALESCE('epoch'::timestamptz + $7::int8 * interval '1 microsecond', now()), $8)"
        );
        // pg_notify in the same statement: no extra round trip.
        let insert_notify = format!(
            "WITH ins AS ({insert} RETURNING 1) SELECT pg_notify($9, '') FROM (SELECT count(*) FROM ins) AS n"
        );

        // One statement for the whole batch. The `locks` CTE takes the
        // advisory locks of every distinct key in ascending hash order BEFORE
        // any row is inserted (the scalar subquery in WHERE is an InitPlan,
        // evaluated once before the first row is produced), so batches that
        // share keys queue instead of deadlocking. The trigger's own lock
        // calls then find the locks already held. `ORDER BY ord` keeps the
        // batch's order in `seq`.
        let insert_batch = format!(
            "WITH locks AS (
                SELECT count(*) AS n FROM (
                    SELECT pg_advisory_xact_lock('{t}'::regclass::oid::int4, h) AS locked
                      FROM (SELECT DISTINCT hashtext(k) AS h FROM unnest($3::text[]) AS k
                             WHERE k IS NOT NULL ORDER BY 1) AS hashes
                ) AS taken
             )
             INSERT INTO {t} (id, topic, key, payload, headers, tenant, available_at, max_attempts)
             SELECT m.id, m.topic, m.key, m.payload, m.headers::jsonb, m.tenant,
                    COALESCE('epoch'::timestamptz + m.avail * interval '1 microsecond', now()), m.max_attempts
               FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::text[],
                           $7::int8[], $8::int4[])
                    WITH ORDINALITY AS m(id, topic, key, payload, headers, tenant, avail, max_attempts, ord)
              WHERE (SELECT n FROM locks) >= 0
              ORDER BY m.ord"
        );
        let insert_batch_notify = format!(
            "WITH ins AS ({insert_batch} RETURNING 1) SELECT pg_notify($9, '') FROM (SELECT count(*) FROM ins) AS n"
        );

        let claim = claim_sql(t);

        // One round trip for a whole batch of outcomes: the arrays are
        // unnested and joined on `seq`; every row is guarded by the lease
        // token, so a relay whose lease was taken over changes nothing.
        let complete = format!(
            "WITH c AS (
                SELECT * FROM unnest($2::int8[], $3::text[], $4::int8[], $5::text[], $6::bool[])
                    AS c(seq, kind, delay_us, error, park)
             ),
             sent AS (
                DELETE FROM {t} AS t USING c
                 WHERE t.seq = c.seq AND c.kind = 'sent'
                   AND t.lease_token = $1 AND t.status = 'pending'
                RETURNING t.seq
             ),
             other AS (
                UPDATE {t} AS t SET
                    status = CASE WHEN c.kind = 'dead' THEN 'dead' ELSE 'pending' END,
                    parked = (c.kind = 'dead' AND c.park AND t.key IS NOT NULL),
                    available_at = CASE WHEN c.kind = 'retry'
                                        THEN now() + c.delay_us * interval '1 microsecond'
                                        ELSE t.available_at END,
                    last_error = CASE WHEN c.kind IN ('retry', 'dead') THEN c.error ELSE t.last_error END,
                    attempts = CASE WHEN c.kind = 'release' THEN greatest(t.attempts - 1, 0)
                                    ELSE t.attempts END,
                    lease_token = NULL,
                    lease_until = NULL
                  FROM c
                 WHERE t.seq = c.seq AND c.kind <> 'sent'
                   AND t.lease_token = $1 AND t.status = 'pending'
                RETURNING t.seq
             )
             SELECT (SELECT count(*) FROM sent) + (SELECT count(*) FROM other)"
        );

        let leased = "(status = 'pending' AND lease_until > now())";
        let stats = format!(
            "SELECT
                count(*) FILTER (WHERE status = 'pending' AND NOT coalesce({leased}, false)
                                   AND attempts = 0 AND available_at <= now()),
                count(*) FILTER (WHERE status = 'pending' AND NOT coalesce({leased}, false)
                                   AND attempts = 0 AND available_at > now()),
                count(*) FILTER (WHERE status = 'pending' AND NOT coalesce({leased}, false)
                                   AND attempts > 0),
                count(*) FILTER (WHERE coalesce({leased}, false)),
                count(*) FILTER (WHERE status = 'dead'),
                count(DISTINCT key) FILTER (WHERE status = 'dead' AND parked),
                count(*) FILTER (WHERE status = 'sent'),
                {}
               FROM {t}
              WHERE {FILTER}",
            micros("min(created_at) FILTER (WHERE status = 'pending')")
        );
        let list = format!(
            "SELECT seq, id, topic, key, tenant,
                    CASE WHEN status = 'pending' AND lease_until > now() THEN 'leased' ELSE status END,
                    attempts, max_attempts, last_error, parked,
                    {}, {}, headers::text, payload
               FROM {t}
              WHERE {FILTER}
                AND ($7::text IS NULL
                     OR ($7 = 'leased' AND status = 'pending' AND lease_until > now())
                     OR ($7 = 'pending' AND status = 'pending' AND NOT coalesce(lease_until > now(), false))
                     OR ($7 IN ('dead', 'sent') AND status = $7))
                AND ($8::int8 IS NULL OR seq > $8)
              ORDER BY seq
              LIMIT $9",
            micros("created_at"),
            micros("available_at")
        );
        let replay = format!(
            "UPDATE {t} SET status = 'pending', parked = false, attempts = 0, available_at = now(),
                            lease_token = NULL, lease_until = NULL
              WHERE status = 'dead' AND {FILTER}"
        );
        let skip =
            format!("UPDATE {t} SET parked = false WHERE status = 'dead' AND parked AND {FILTER}");
        let purge = format!("DELETE FROM {t} WHERE status = $7 AND {FILTER}");

        // Who holds this table's per-key advisory locks (classid = table oid,
        // objsubid = 2: see the trigger), how long their transaction has been
        // open, and how many sessions wait behind them.
        let blockers = format!(
            "SELECT a.pid, {age} AS xact_age_us, a.state, {qstart} AS query_start_us,
                    count(*) AS keys_held,
                    sum((SELECT count(*) FROM pg_locks w
                          WHERE w.locktype = 'advisory' AND NOT w.granted AND w.objsubid = 2
                            AND w.database = l.database
                            AND w.classid = l.classid AND w.objid = l.objid))::int8 AS waiters
               FROM pg_locks l
               JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND l.classid = '{t}'::regclass::oid
                AND a.pid <> pg_backend_pid()
              GROUP BY a.pid, a.xact_start, a.state, a.query_start
              ORDER BY a.xact_start",
            age = micros("now() - a.xact_start"),
            qstart = micros("a.query_start"),
        );

        Self {
            insert,
            insert_notify,
            insert_batch,
            insert_batch_notify,
            claim,
            complete,
            stats,
            list,
            replay,
            skip,
            purge,
            blockers,
        }
    }
}

/// The claim: one statement, one round trip.
///
/// Parameters: $1 limit, $2 lease (µs), $3 lease token, $4 tenant or NULL,
/// $5 size of the keyed window, $6 key cursor of the walk or NULL, $7 walk
/// length.
///
/// * `keyless`: oldest due keyless rows, `FOR UPDATE SKIP LOCKED`, on the
///   partial index `(seq) WHERE key IS NULL AND status = 'pending'`.
/// * keyed candidates come from two bounded sources, so that neither a deep
///   backlog of one hot key nor a huge number of distinct keys makes a claim
///   expensive:
///   - `recent`: the oldest `$5` pending keyed rows (partial index on
///     `seq`): oldest-first fairness when most rows are heads (many keys);
///   - `walk`: a loose index scan over the distinct keys of the blocking
///     rows (partial index `(key, seq)`), `$7` keys per claim starting after
///     a cursor the store rotates, giving each key's head directly: every
///     key is reached within a bounded number of claims even when one key's
///     backlog fills the front of the table.
/// * `keyed`: of those candidates, the rows that are due, unleased and have
///   no earlier blocking row of their key (pending, leased, delayed, or dead
///   and parked), probed on the same `(key, seq)` index; `FOR UPDATE OF r
///   SKIP LOCKED` so two relays never both lease a head: the loser either
///   skips the locked row or, once the winner committed, re-checks it and
///   finds it leased.
/// * The final `SELECT` always returns one row (LEFT JOIN) so the lease
///   deadline and the walk's end come back even when nothing was claimed.
fn claim_sql(t: &str) -> String {
    let due = "r.available_at <= now() AND (r.lease_until IS NULL OR r.lease_until <= now())
               AND ($4::text IS NULL OR r.tenant = $4)";
    let head_pred = "h.key IS NOT NULL AND (h.status = 'pending' OR h.parked)";
    format!(
        "WITH RECURSIVE walk AS (
            (SELECT h.key, h.seq, 1 AS n FROM {t} AS h
              WHERE {head_pred} AND ($6::text IS NULL OR h.key > $6)
              ORDER BY h.key, h.seq LIMIT 1)
            UNION ALL
            SELECT nx.key, nx.seq, w.n + 1
              FROM walk AS w
              CROSS JOIN LATERAL (
                    SELECT h.key, h.seq FROM {t} AS h
                     WHERE {head_pred} AND h.key > w.key
                     ORDER BY h.key, h.seq LIMIT 1) AS nx
             WHERE w.n < $7
         ),
         keyless AS (
            SELECT r.seq FROM {t} AS r
             WHERE r.key IS NULL AND r.status = 'pending' AND {due}
             ORDER BY r.seq
             LIMIT $1
             FOR UPDATE SKIP LOCKED
         ),
         recent AS (
            SELECT r.seq FROM {t} AS r
             WHERE r.key IS NOT NULL AND r.status = 'pending'
             ORDER BY r.seq
             LIMIT $5
         ),
         keyed AS (
            SELECT r.seq FROM {t} AS r
             WHERE r.seq IN (SELECT seq FROM recent UNION SELECT seq FROM walk)
               AND r.key IS NOT NULL AND r.status = 'pending' AND {due}
               AND NOT EXISTS (
                    SELECT 1 FROM {t} AS e
                     WHERE e.key = r.key AND e.seq < r.seq
                       AND e.key IS NOT NULL AND (e.status = 'pending' OR e.parked))
             ORDER BY r.seq
             LIMIT $1
             FOR UPDATE OF r SKIP LOCKED
         ),
         picked AS (
            SELECT seq FROM (SELECT seq FROM keyless UNION ALL SELECT seq FROM keyed) AS c
             ORDER BY seq
             LIMIT $1
         ),
         claimed AS (
            UPDATE {t} AS t
               SET attempts = t.attempts + 1,
                   lease_token = $3,
                   lease_until = now() + $2::int8 * interval '1 microsecond'
              FROM picked
             WHERE t.seq = picked.seq
            RETURNING t.seq, t.id, t.topic, t.key, t.payload, t.headers::text AS headers, t.tenant,
                      t.attempts, t.max_attempts, {created} AS created_us
         )
         SELECT c.seq, c.id, c.topic, c.key, c.payload, c.headers, c.tenant, c.attempts,
                c.max_attempts, c.created_us,
                {until} AS lease_until_us,
                (SELECT max(key) FROM walk) AS walk_end,
                (SELECT count(*) FROM walk) AS walk_len
           FROM (SELECT 1) AS one
           LEFT JOIN claimed AS c ON true
          ORDER BY c.seq",
        created = micros("t.created_at"),
        until = micros("now() + $2::int8 * interval '1 microsecond'"),
    )
}
