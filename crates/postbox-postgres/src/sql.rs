//! Every SQL statement of the store, built once per table from validated
//! identifiers. Each statement says why it is shaped the way it is.

use postbox_core::Ident;

use crate::claim::ClaimSql;

/// The SQL text for one outbox table.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) insert: String,
    pub(crate) insert_notify: String,
    pub(crate) insert_batch: String,
    pub(crate) insert_batch_notify: String,
    /// Claims for any tenant.
    pub(crate) claim_any: ClaimSql,
    /// Claims restricted to one tenant.
    pub(crate) claim_tenant: ClaimSql,
    pub(crate) complete: String,
    pub(crate) complete_sent: String,
    pub(crate) complete_keep: String,
    pub(crate) complete_sent_keep: String,
    pub(crate) held_sent: String,
    pub(crate) held_sent_keep: String,
    pub(crate) held_stamp: String,
    pub(crate) purge_sent: String,
    pub(crate) stats: String,
    pub(crate) stats_by_topic: String,
    pub(crate) stats_by_tenant: String,
    pub(crate) list: String,
    pub(crate) replay: String,
    pub(crate) skip: String,
    pub(crate) purge: String,
    pub(crate) blockers: String,
    pub(crate) horizon: String,
    pub(crate) vacuum_state: String,
    pub(crate) vacuum_check: String,
    pub(crate) vacuum_waiters: String,
    pub(crate) vacuum: String,
    pub(crate) pending_tenants: String,
}

/// The admin filter, parameters $1..$6: topic, key, tenant, ids, older than
/// (µs), error text. Unset parameters fold away in a custom plan.
const FILTER: &str = "($1::text IS NULL OR topic = $1)
   AND ($2::text IS NULL OR key = $2)
   AND ($3::text IS NULL OR tenant = $3)
   AND (cardinality($4::uuid[]) = 0 OR id = ANY($4::uuid[]))
   AND ($5::int8 IS NULL OR created_at <= now() - $5::int8 * interval '1 microsecond')
   AND ($6::text IS NULL OR strpos(last_error, $6) > 0)";

pub(crate) fn micros(expr: &str) -> String {
    format!("(extract(epoch from {expr}) * 1000000)::int8")
}

/// [`micros`] of a timestamp a producer may have set to `infinity` or
/// `-infinity`, which `int8` cannot hold: those come back as the end of
/// year 9999 (`postbox_core::latest_available_at`) and the start of year 1.
/// NULL stays NULL. Without it one such row made every claim that took it
/// fail (`cannot convert infinity to bigint`), again at every lease, and
/// `list` and `status` fail too.
pub(crate) fn micros_finite(expr: &str) -> String {
    format!(
        "CASE WHEN isfinite({expr}) THEN {finite}
              WHEN {expr} > 'epoch' THEN 253402300799000000
              WHEN {expr} < 'epoch' THEN -62135596800000000 END",
        finite = micros(expr)
    )
}

/// The oldest `$1` holders of the server's cleanup horizon: by
/// transaction-id age, the oldest snapshot or transaction of any session in
/// any database (but this one), prepared transaction or replication slot.
/// Columns: pid
/// (NULL but for sessions), age in µs (NULL for slots: they have no start
/// time), a description naming it.
const HORIZON: &str = "SELECT pid, age_us, description FROM (
        SELECT a.pid, (extract(epoch from now() - a.xact_start) * 1000000)::int8 AS age_us,
               format('pid %s in database %s (%s, %s, %s transactions behind)', a.pid,
                      coalesce(a.datname, '-'), coalesce(nullif(a.application_name, ''), 'no application name'),
                      coalesce(a.state, 'unknown state'),
                      greatest(age(a.backend_xmin), age(a.backend_xid))) AS description,
               greatest(age(a.backend_xmin), age(a.backend_xid)) AS xid_age
          FROM pg_stat_activity AS a
         WHERE (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
           AND a.pid <> pg_backend_pid()
        UNION ALL
        SELECT NULL, (extract(epoch from now() - p.prepared) * 1000000)::int8,
               format('prepared transaction %L in database %s (%s transactions behind)', p.gid, p.database,
                      age(p.transaction)),
               age(p.transaction)
          FROM pg_prepared_xacts AS p
        UNION ALL
        SELECT NULL, NULL,
               format('replication slot %L (%s, %s transactions behind)', s.slot_name, s.slot_type,
                      greatest(age(s.xmin), age(s.catalog_xmin))),
               greatest(age(s.xmin), age(s.catalog_xmin))
          FROM pg_replication_slots AS s
         WHERE s.xmin IS NOT NULL OR s.catalog_xmin IS NOT NULL
    ) AS h
    ORDER BY xid_age DESC NULLS LAST, age_us DESC NULLS LAST
    LIMIT $1";

/// Exact counts (see `Stats`), of the whole outbox or per `group` column
/// (`topic` or `tenant`, then the group value comes first), narrowed by the
/// admin [`FILTER`]. An admin query: one pass over the rows the filter
/// leaves, never on the relay's path.
fn stats_sql(t: &str, group: Option<&str>) -> String {
    let leased = "(status = 'pending' AND lease_until > now())";
    let (select_group, group_by) = match group {
        Some(column) => (format!("{column},"), format!("GROUP BY {column}")),
        None => (String::new(), String::new()),
    };
    format!(
        "SELECT {select_group}
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
          WHERE {FILTER}
          {group_by}",
        micros_finite("min(created_at) FILTER (WHERE status = 'pending')")
    )
}

impl Sql {
    pub(crate) fn new(t: &str, schema: &Ident, table: &Ident) -> Self {
        // The table's sequence, as the regclass literal `nextval` takes (the
        // identifiers are validated: letters, digits, underscores).
        let seq = format!("'\"{}\".\"{}_seq\"'", schema.as_str(), table.as_str());
        // The key's advisory lock, then `seq`, in one statement (see
        // migration 6: rows that come with a `seq` skip the plpgsql
        // trigger, a few µs per row, which a batch pays per row). The lock is
        // an InitPlan of the one-time filter, so it is taken before the row
        // is projected and `nextval` runs; for a keyless row it takes
        // nothing. Per key, `seq` order is therefore commit order, as with
        // the trigger. $7: available_at as Unix µs or NULL (= now()).
        let insert = format!(
            "INSERT INTO {t} (seq, id, topic, key, payload, headers, tenant, available_at, max_attempts)
             SELECT nextval({seq}), $1, $2, $3, $4, $5::jsonb, $6,
                    COALESCE('epoch'::timestamptz + $7::int8 * interval '1 microsecond', now()), $8
              WHERE (SELECT count(*) FROM (
                        SELECT pg_advisory_xact_lock('{t}'::regclass::oid::int4, hashtext($3::text))
                         WHERE $3::text IS NOT NULL) AS taken) >= 0"
        );
        // pg_notify in the same statement: no extra round trip.
        let insert_notify = format!(
            "WITH ins AS ({insert} RETURNING 1) SELECT pg_notify($9, '') FROM (SELECT count(*) FROM ins) AS n"
        );

        // One statement for the whole batch. The `locks` CTE takes the
        // advisory locks of every distinct key in ascending hash order BEFORE
        // any row is inserted (the scalar subquery in WHERE is an InitPlan,
        // evaluated once before the first row is produced), so batches that
        // share keys queue instead of deadlocking. `seq` comes from
        // `nextval` in the select list, which PostgreSQL evaluates after the
        // `ORDER BY ord` sort (volatile output expressions are computed
        // above the sort), so `seq` follows the batch's order and the
        // trigger is skipped (migration 6).
        let insert_batch = format!(
            "WITH locks AS (
                SELECT count(*) AS n FROM (
                    SELECT pg_advisory_xact_lock('{t}'::regclass::oid::int4, h) AS locked
                      FROM (SELECT DISTINCT hashtext(k) AS h FROM unnest($3::text[]) AS k
                             WHERE k IS NOT NULL ORDER BY 1) AS hashes
                ) AS taken
             )
             INSERT INTO {t} (seq, id, topic, key, payload, headers, tenant, available_at, max_attempts)
             SELECT nextval({seq}), m.id, m.topic, m.key, m.payload, m.headers::jsonb, m.tenant,
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

        // The claim hint (migration 8) and the `seq` sequence, as
        // `to_regclass` takes them.
        let hint = format!("\"{}\".\"{}_claim_hint\"", schema.as_str(), table.as_str());
        let issued = format!("\"{}\".\"{}_seq\"", schema.as_str(), table.as_str());
        let claim_any = ClaimSql::new(t, &hint, &issued, false);
        let claim_tenant = ClaimSql::new(t, &hint, &issued, true);

        // Completions stamp times with `statement_timestamp()`, not `now()`:
        // a held batch's completion runs in the transaction its claim began,
        // where `now()` is the claim's time, a whole publish earlier (a retry
        // would come due that much early, `sent_at` would precede the send).
        // In autocommit the two are the same.
        //
        // One round trip for a whole batch of outcomes: the arrays are
        // unnested and joined on `seq`; every row is guarded by the lease
        // token, so a relay whose lease was taken over changes nothing. The
        // `seq = ANY($2)` conditions let even a generic plan (claim sessions
        // plan once, see `claim.rs`) reach the rows through the primary key
        // instead of joining the whole table. Sent rows are deleted, or with
        // a retention (`complete_keep`) marked sent: the two `sent` CTEs
        // below.
        let complete_with = |sent: &str| {
            format!(
                "WITH c AS (
                SELECT * FROM unnest($2::int8[], $3::text[], $4::int8[], $5::text[], $6::bool[])
                    AS c(seq, kind, delay_us, error, park)
             ),
             sent AS ({sent}),
             other AS (
                UPDATE {t} AS t SET
                    status = CASE WHEN c.kind = 'dead' THEN 'dead' ELSE 'pending' END,
                    parked = (c.kind = 'dead' AND c.park AND t.key IS NOT NULL),
                    available_at = CASE WHEN c.kind = 'retry'
                                        THEN statement_timestamp() + c.delay_us * interval '1 microsecond'
                                        ELSE t.available_at END,
                    last_error = CASE WHEN c.kind IN ('retry', 'dead') THEN c.error ELSE t.last_error END,
                    attempts = CASE WHEN c.kind = 'release' THEN greatest(t.attempts - 1, 0)
                                    ELSE t.attempts END,
                    lease_token = NULL,
                    lease_until = NULL
                  FROM c
                 WHERE t.seq = ANY($2::int8[]) AND t.seq = c.seq AND c.kind <> 'sent'
                   AND t.lease_token = $1 AND t.status = 'pending'
                RETURNING t.seq
             )
             SELECT (SELECT count(*) FROM sent) + (SELECT count(*) FROM other)"
            )
        };
        let complete = complete_with(&format!(
            "DELETE FROM {t} AS t USING c
              WHERE t.seq = ANY($2::int8[]) AND t.seq = c.seq AND c.kind = 'sent'
                AND t.lease_token = $1 AND t.status = 'pending'
             RETURNING t.seq"
        ));
        // With a retention: the same, sent rows kept (see `complete_sent_keep`).
        let complete_keep = complete_with(&format!(
            "UPDATE {t} AS t SET status = 'sent', sent_at = statement_timestamp(),
                                 lease_token = NULL, lease_until = NULL
               FROM c
              WHERE t.seq = ANY($2::int8[]) AND t.seq = c.seq AND c.kind = 'sent'
                AND t.lease_token = $1 AND t.status = 'pending'
             RETURNING t.seq"
        ));
        // The common case, every row of the batch sent: a plain DELETE by
        // primary key, cheap to plan and to run; the count is the command
        // tag's. (Wrapped in a CTE with `count(*)` it cost 15 % more per
        // batch of 1,000.)
        let complete_sent = format!(
            "DELETE FROM {t}
              WHERE seq = ANY($2::int8[]) AND lease_token = $1 AND status = 'pending'"
        );
        // The same with a retention: an UPDATE by primary key under the same
        // fencing guard, marking the rows sent on the database clock and
        // clearing the lease. `status` leaves 'pending', so the rows drop out
        // of every claim index and of the head index (they never block their
        // key); since `status` is in those indexes' predicates the update
        // cannot be HOT, the price of the opt-in. Committed without the WAL
        // flush like every completion: a crash that forgets it leaves the
        // row pending under an expired lease, so it is delivered once more,
        // as after a forgotten DELETE.
        let complete_sent_keep = format!(
            "UPDATE {t} SET status = 'sent', sent_at = statement_timestamp(), lease_token = NULL, lease_until = NULL
              WHERE seq = ANY($2::int8[]) AND lease_token = $1 AND status = 'pending'"
        );
        // The completions of a held claim (see `claim::keyless_held_sql`),
        // run in the claim's own transaction on its own rows (the store
        // passes only those), whose locks it holds: no token to check,
        // nobody else can have changed them. All sent: delete them (or mark
        // them sent, with the attempt counted as a leasing claim would have,
        // with a retention), then the store commits. By address ($1, the
        // `ctid`s the claim returned, see `tid.rs`): a TID scan fetches each
        // row directly where a lookup by `seq` descended the primary key
        // once per row (deleting 1,000 locked rows by `ctid` took 0.49–0.67
        // ms against 1.14–1.40 ms by `seq`, in a server-side loop).
        let held_sent =
            format!("DELETE FROM {t} WHERE ctid = ANY($1::tid[]) AND status = 'pending'");
        let held_sent_keep = format!(
            "UPDATE {t} SET status = 'sent', sent_at = statement_timestamp(), attempts = attempts + 1,
                            lease_token = NULL, lease_until = NULL
              WHERE ctid = ANY($1::tid[]) AND status = 'pending'"
        );
        // Anything else: first write what a leasing claim would have (the
        // attempt counted, the token), then `complete` applies the outcomes
        // as for any lease, in the same transaction: batches with a failure
        // (released rows need no write and are left out).
        let held_stamp = format!(
            "UPDATE {t} SET attempts = attempts + 1, lease_token = $1
              WHERE seq = ANY($2::int8[]) AND status = 'pending'"
        );
        // Retention cleanup: at most $2 sent rows at least $1 µs old, oldest
        // first, read in order from the partial `sent_idx (sent_at) WHERE
        // status = 'sent'` (migration 5), so a statement touches only the
        // rows it deletes. SKIP LOCKED: the cleanups of several relays split
        // the rows instead of queueing on each other. A small LIMIT keeps the
        // transaction and its row locks short. A crash that forgets the
        // no-flush commit only means the rows are deleted again next time.
        let purge_sent = format!(
            "WITH doomed AS (
                SELECT seq FROM {t}
                 WHERE status = 'sent' AND sent_at <= now() - $1::int8 * interval '1 microsecond'
                 ORDER BY sent_at
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED
             ),
             gone AS (
                DELETE FROM {t} AS t USING doomed
                 WHERE t.seq = doomed.seq AND t.status = 'sent'
                RETURNING 1
             )
             SELECT count(*) FROM gone"
        );

        let stats = stats_sql(t, None);
        let stats_by_topic = stats_sql(t, Some("topic"));
        let stats_by_tenant = stats_sql(t, Some("tenant"));
        let list = format!(
            "SELECT seq, id, topic, key, tenant,
                    CASE WHEN status = 'pending' AND lease_until > now() THEN 'leased' ELSE status END,
                    attempts, max_attempts, last_error, parked,
                    {}, {}, headers::text, payload, {}
               FROM {t}
              WHERE {FILTER}
                AND ($7::text IS NULL
                     OR ($7 = 'leased' AND status = 'pending' AND lease_until > now())
                     OR ($7 = 'pending' AND status = 'pending' AND NOT coalesce(lease_until > now(), false))
                     OR ($7 IN ('dead', 'sent') AND status = $7))
                AND ($8::int8 IS NULL OR seq > $8)
              ORDER BY seq
              LIMIT $9",
            micros_finite("created_at"),
            micros_finite("available_at"),
            micros_finite("sent_at")
        );
        // A replayed keyed message becomes due when the live leases on its
        // key end, not at once: with `on_dead = skip` (or after a `skip`)
        // a later message of the key may be leased right now, and a key is
        // held by one lease at a time. The claim sees the replayed row as
        // the key's head and waits for it; `greatest` ignores the NULL of a
        // key without a lease.
        let replay = format!(
            "UPDATE {t} AS r
                SET status = 'pending', parked = false, attempts = 0,
                    available_at = greatest(now(), (SELECT max(l.lease_until) FROM {t} AS l
                                                     WHERE r.key IS NOT NULL AND l.key = r.key
                                                       AND l.status = 'pending'
                                                       AND l.lease_until > now())),
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
            claim_any,
            claim_tenant,
            complete,
            complete_sent,
            complete_keep,
            complete_sent_keep,
            held_sent,
            held_sent_keep,
            held_stamp,
            purge_sent,
            stats,
            stats_by_topic,
            stats_by_tenant,
            list,
            replay,
            skip,
            purge,
            blockers,
            horizon: HORIZON.to_owned(),
            // dead and live rows, µs since the last vacuum (NULL: none on
            // record), whether autovacuum may run on the table
            vacuum_state: format!(
                "SELECT s.n_dead_tup, s.n_live_tup,
                        (extract(epoch from now() - greatest(s.last_vacuum, s.last_autovacuum))
                         * 1000000)::int8,
                        current_setting('autovacuum')::bool
                        AND coalesce((SELECT option_value::bool
                                        FROM pg_options_to_table(c.reloptions)
                                       WHERE option_name = 'autovacuum_enabled'), true)
                   FROM pg_stat_user_tables AS s
                   JOIN pg_class AS c ON c.oid = s.relid
                  WHERE s.relid = '{t}'::regclass"
            ),
            // The relay's own vacuum (`vacuum.rs`): the table's dead rows,
            // whether this role may vacuum it (PostgreSQL 15: superuser,
            // the table's or the database's owner, or a member of either),
            // how many manual vacuums it has had (a `VACUUM` skipped for a
            // lock leaves the count as it was), µs since its last vacuum,
            // manual or automatic, ended, and whether a vacuum (or anything
            // else that takes its lock: ANALYZE, CREATE INDEX CONCURRENTLY)
            // holds the table now.
            vacuum_check: format!(
                "SELECT coalesce(pg_catalog.pg_stat_get_dead_tuples(c.oid), 0),
                        coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles AS r
                                   WHERE r.rolname = current_user), false)
                        OR pg_catalog.pg_has_role(c.relowner, 'USAGE')
                        OR pg_catalog.pg_has_role(d.datdba, 'USAGE'),
                        coalesce(pg_catalog.pg_stat_get_vacuum_count(c.oid), 0),
                        {since_last},
                        EXISTS (SELECT 1 FROM pg_catalog.pg_locks AS l
                                 WHERE l.locktype = 'relation' AND l.database = d.oid
                                   AND l.relation = c.oid AND l.granted
                                   AND l.mode = 'ShareUpdateExclusiveLock')
                   FROM pg_catalog.pg_class AS c
                   JOIN pg_catalog.pg_database AS d ON d.datname = current_database()
                  WHERE c.oid = '{t}'::regclass",
                since_last = micros(
                    "now() - greatest(pg_catalog.pg_stat_get_last_vacuum_time(c.oid),
                                      pg_catalog.pg_stat_get_last_autovacuum_time(c.oid))"
                )
            ),
            // `SKIP_LOCKED`: a vacuum already running (another relay's,
            // autovacuum's) is a reason to skip, never to wait. `INDEX_CLEANUP
            // ON`: the point is the dead index entries, and the default
            // (`AUTO`) skips index cleanup when few pages hold dead rows,
            // which a drain of the oldest rows of a large table is.
            // `TRUNCATE false`: no exclusive lock at the end.
            vacuum: format!("VACUUM (SKIP_LOCKED, INDEX_CLEANUP ON, TRUNCATE false) {t}"),
            // Whether a session waits for a lock on the table (DDL: a
            // relay's vacuum gives way to it, as autovacuum does; inserts,
            // claims and deletes never conflict with a vacuum's lock).
            vacuum_waiters: format!(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks AS l
                                 WHERE l.locktype = 'relation' AND NOT l.granted
                                   AND l.relation = '{t}'::regclass
                                   AND l.database = (SELECT oid FROM pg_catalog.pg_database
                                                      WHERE datname = current_database()))"
            ),
            pending_tenants: format!(
                // A loose index scan over `<t>_tenant_idx`: one probe per
                // tenant, however many rows each has.
                "WITH RECURSIVE tn AS (
                    (SELECT tenant FROM {t}
                      WHERE tenant IS NOT NULL AND status = 'pending'
                      ORDER BY tenant LIMIT 1)
                    UNION ALL
                    SELECT (SELECT x.tenant FROM {t} AS x
                             WHERE x.tenant > tn.tenant AND x.status = 'pending'
                             ORDER BY x.tenant LIMIT 1)
                      FROM tn WHERE tn.tenant IS NOT NULL
                 )
                 SELECT tenant FROM tn WHERE tenant IS NOT NULL LIMIT $1"
            ),
        }
    }
}
