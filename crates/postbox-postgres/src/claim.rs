//! The claim statements: which rows a relay may lease, and how. The per-key
//! ordering rule lives here (see [`ClaimSql`]).
//!
//! **Plans.** Claims run on claim sessions (`relay_connect_options`) that
//! plan each statement once per connection (`plan_cache_mode =
//! force_generic_plan`) with sequential and bitmap scans off. Planning a
//! claim afresh cost 0.4 ms (keyless) to 2.4 ms (keyed) per claim, as much as
//! running it; so every statement here is written to have one good plan
//! whatever the table holds, including a plan made while it was empty:
//!
//! * every scan is an ordered `LIMIT` on a partial index whose predicate the
//!   query repeats, or a lookup of `seq = ANY(ARRAY(SELECT ...))`, an index
//!   condition on the primary key or a claim index, never a join the
//!   planner could turn into a scan of the whole table;
//! * "is this row the head of its key" is decided within the keyed window
//!   (the key's first row there, see `keyed_sql`) plus a correlated scalar
//!   subquery on the parked index, or for one tenant's window a correlated
//!   `min(seq)` over the head index: PostgreSQL always runs a scalar
//!   subquery per row as one index probe and never rewrites it into a join;
//! * tenant-restricted claims are separate statements, so the tenant's
//!   `(tenant, seq)` index is in the plan instead of a filter;
//! * the key walk starts at `key >= $cursor` (the empty string for the
//!   start) rather than an optional condition, so it is an index condition.
//!
//! `tests/plans.rs` prepares every statement on an empty table, loads a
//! million rows and checks with `EXPLAIN` that the cached plans use the
//! indexes.

use crate::sql::{micros, micros_finite};
use crate::store::MIN_WALK;

/// How a keyed claim's transaction commits: like every statement of the
/// store's claim pool, without waiting for the WAL flush (that pool's
/// sessions carry `synchronous_commit = off`, see `claim_connect_options` in
/// the store; a flush measured ~2.4 ms per commit on our 2-core machines,
/// more than the rest of a claim), except on a server with synchronous
/// standbys.
///
/// A database crash may forget a claim committed this way. For a keyless
/// message that means one more delivery, which at-least-once allows. For a
/// keyed head it could mean a second relay leasing the head while the first
/// still publishes it, and then publishing the key's next message before the
/// first relay's (stale) copy lands. [`SETTLED`] rules that out: after a
/// crash, keyed rows wait one lease length, by which time every publish
/// started before the crash has ended (the relay's send timeout is shorter
/// than its lease). With synchronous standbys a failover could forget the
/// lease without any crash on the new primary, so there keyed claims wait
/// for the flush (and the standbys) like any synchronous commit.
///
/// `keyed_rows` is a query with a row when the claim leased keyed rows:
/// exactly so in the wrapped claims ([`CLAIMED_KEYED`]); in `keyed_bulk`,
/// whose `RETURNING` cannot read its own rows, when it locked keyed heads
/// ([`LOCKED_KEYED`]), which may say so of a claim that leased only keyless
/// rows, never the reverse.
///
/// A scalar subquery, so that it runs once per claim (an InitPlan) rather
/// than once per row returned: 0.3 ms of a keyed claim of 1,000 rows.
fn claim_commit(keyed_rows: &str) -> String {
    format!(
        "(SELECT set_config('synchronous_commit',
            CASE WHEN current_setting('synchronous_standby_names') <> ''
                      AND EXISTS ({keyed_rows})
                 THEN 'on' ELSE 'off' END,
            true)) AS commit_mode"
    )
}

/// For [`claim_commit`]: the keyed rows a wrapped claim leased.
const CLAIMED_KEYED: &str = "SELECT 1 FROM claimed WHERE key IS NOT NULL";

/// For [`claim_commit`]: the keyed heads a claim locked.
const LOCKED_KEYED: &str = "SELECT 1 FROM keyed";

/// True once the server has been up one lease length ($2, µs) since its
/// last crash recovery: keyed rows are claimable only then (see
/// [`claim_commit`]). PostgreSQL discards its cumulative statistics when it
/// recovers from a crash (a backend killed, the server killed, the machine
/// lost) and sets their reset time to the end of recovery, while a clean
/// restart keeps them, so the bgwriter statistics' reset time is the moment
/// the forgotten claims could have been lost. (`pg_stat_reset_shared` by an
/// operator moves it too; that costs one lease of keyed delay, nothing else.)
const SETTLED: &str = "now() >= coalesce(pg_stat_get_bgwriter_stat_reset_time(), '-infinity')
                              + $2::int8 * interval '1 microsecond'";

/// How long after a lease was taken its key counts as busy rather than
/// stuck in a window's count of heads (see `heads_seen` in [`keyed_sql`]).
const BUSY_FOR_US: i64 = 1_000_000;

/// Whether `alias`'s row is under a lease taken within the last
/// [`BUSY_FOR_US`], judged by its deadline and this claim's lease length
/// `$2`: a relay with a longer lease has its heads look busy for longer,
/// one with a shorter lease for less.
fn busy(alias: &str) -> String {
    format!(
        "{alias}.lease_until > now()
         AND {alias}.lease_until > now() + ($2::int8 - {BUSY_FOR_US}) * interval '1 microsecond'"
    )
}

/// A claimable row is due and not under a live lease.
const DUE: &str = "r.available_at <= now() AND (r.lease_until IS NULL OR r.lease_until <= now())";

/// Whether keyed rows wait (pending or leased, due or not), of any tenant:
/// the store then uses the keyed claim next time, else the keyless one. One
/// probe of the `keyed_idx` partial index, written as "the oldest such row"
/// rather than `EXISTS` because PostgreSQL drops `ORDER BY` and `LIMIT`
/// inside `EXISTS`, and may then plan a scan that, on a table of keyless
/// rows, reads all of them to find none.
fn keyed_probe(t: &str) -> String {
    format!(
        "(SELECT k.seq FROM {t} AS k WHERE k.key IS NOT NULL AND k.status = 'pending'
           ORDER BY k.seq LIMIT 1) IS NOT NULL"
    )
}

/// The claim statements (keyless, its backlog form, keyed, key walk) of one
/// outbox table for one scope (any tenant, or one tenant), chosen by the
/// store from what the previous claim of that scope saw.
///
/// Parameters, in every statement: `$1` limit, `$2` lease (µs), `$3` lease
/// token; then `keyed` and `walk` take `$4` the keyed window; `walk` takes
/// `$5` the walk's cursor (`''` for the first key) and `$6` its length;
/// `keyless_bulk` and `keyless_held` take `$4` the `seq` their scan starts
/// after; a
/// tenant-restricted statement takes the tenant as the last parameter.
///
/// The ordering rule: a keyed row may be leased only when it is the head of
/// its key, the lowest `seq` of the key's rows that are pending (leased or
/// not, delayed or not) or dead and parked. The head is locked `FOR UPDATE
/// OF r SKIP LOCKED` before it is leased, so two relays never both lease it:
/// the loser skips the locked row or, once the winner committed, re-checks
/// the new row version (EvalPlanQual) and finds it leased. Keyless rows have
/// no rule but `FOR UPDATE SKIP LOCKED`.
#[derive(Debug)]
pub(crate) struct ClaimSql {
    /// While no keyed row is pending: keyless rows only, shaped like the
    /// hand-written lease `UPDATE`.
    pub(crate) keyless: String,
    /// `keyless` for a backlog: the lease `UPDATE` alone, returning nothing
    /// at all when it leases nothing (see `keyless_bulk_sql`).
    pub(crate) keyless_bulk: String,
    /// `keyless_bulk` as a held claim: locks, no lease, the transaction
    /// left open (see `keyless_held_sql`).
    pub(crate) keyless_held: String,
    /// Keyless candidates plus the heads among the oldest `$4` keyed rows.
    pub(crate) keyed: String,
    /// `keyed` for a backlog of keyed rows: the lease `UPDATE` alone,
    /// returning nothing at all when it leases nothing (see [`Keyed::Bulk`]).
    pub(crate) keyed_bulk: String,
    /// `keyed`, plus the key walk when the window is short.
    pub(crate) walk: String,
}

impl ClaimSql {
    /// The statements for table `t` (quoted), restricted to one tenant or
    /// not; `hint` and `issued` name the table's claim hint and `seq`
    /// sequences (quoted), which the backlog forms of claims for any tenant
    /// use (see [`past_hint`]).
    pub(crate) fn new(t: &str, hint: &str, issued: &str, tenant: bool) -> Self {
        let past = if tenant {
            PAST_FLOOR.to_owned()
        } else {
            past_hint(hint, issued)
        };
        Self {
            keyless: keyless_sql(t, tenant.then_some("$4")),
            keyless_bulk: keyless_bulk_sql(t, &past, tenant.then_some("$5")),
            keyless_held: keyless_held_sql(t, &past, tenant.then_some("$5")),
            keyed: keyed_sql(t, Keyed::Window, tenant.then_some("$5")),
            keyed_bulk: keyed_sql(t, Keyed::Bulk, tenant.then_some("$5")),
            walk: keyed_sql(t, Keyed::Walk, tenant.then_some("$7")),
        }
    }
}

/// True when no parked dead row of `alias`'s key precedes it: one probe of
/// `parked_idx` (usually empty). A scalar subquery, so that it stays one
/// probe per row rather than an anti-join that reads every parked row.
fn no_parked_before(t: &str, alias: &str) -> String {
    format!(
        "(SELECT p.seq FROM {t} AS p
           WHERE p.parked AND p.key = {alias}.key AND p.seq < {alias}.seq
           LIMIT 1) IS NULL"
    )
}

/// `AND r.tenant = $n` for a tenant-restricted statement.
fn tenant_pred(alias: &str, param: Option<&str>) -> String {
    param.map_or_else(String::new, |p| format!("AND {alias}.tenant = {p}"))
}

/// The backlog forms' scan starts past `$4` (see `keyless_held_sql`); the
/// form for one tenant's claims.
const PAST_FLOOR: &str = "AND r.seq > $4";

/// [`PAST_FLOOR`] for claims not restricted to one tenant, which also
/// start past the table's claim hint (`hint`, a sequence, migration 8) and
/// move it on. `issued` names the table's own `seq` sequence.
///
/// The floor `$4` knows only the batches this store holds. Several relays
/// on one backlog claim one after the other, so each claim's scan from its
/// own floor ran into the batches the other relays had just locked and
/// paid a lock attempt for each of their rows (1.6 µs a row measured: a
/// claim of 1,000 behind 1,900 locked rows 4–7 ms against 2.5 ms). So a
/// backlog claim reserves the `$1` row numbers past where it starts, by
/// moving the hint to start + `$1` before its scan runs, and every backlog
/// claim starts past the hint as well as past its own floor. `setval` is
/// not transactional, so the others see the reservation at once although
/// the claim's transaction stays open; it is one InitPlan, run once per
/// claim (~12 µs).
///
/// Only a hint, never a condition of correctness: claims that race read the
/// same value and skip each other's rows as before; rows below it that
/// nobody holds (the reserver took fewer, a batch was rolled back, a late
/// commit) are claimed by the scans from the front (`$4` = 0, which neither
/// read nor move the hint) and by every claim once the backlog ends. A hint
/// past the last `seq` issued (the backlog ended inside a reservation, or
/// the table was recreated) is ignored and set again from `$4`, so it can
/// never run away from the rows. On a table not migrated yet (`to_regclass`
/// finds no sequence: NULL), or for a relay role not granted `UPDATE` and
/// `SELECT` (or `USAGE`) on the hint and `SELECT` (or `USAGE`) on `issued`,
/// the claim starts past `$4` alone rather than fail.
fn past_hint(hint: &str, issued: &str) -> String {
    format!(
        "AND r.seq > (
            SELECT CASE WHEN $4 = 0 THEN 0::int8
                        WHEN NOT coalesce(has_sequence_privilege(h.hint, 'UPDATE')
                                          AND has_sequence_privilege(h.hint, 'SELECT, USAGE')
                                          AND has_sequence_privilege(h.issued, 'SELECT, USAGE'), false)
                        THEN $4
                        ELSE setval(h.hint,
                                    greatest($4, (SELECT CASE WHEN v.reserved <= v.issued THEN v.reserved ELSE 0 END
                                                    FROM (SELECT coalesce(pg_sequence_last_value(h.hint), 0) AS reserved,
                                                                 coalesce(pg_sequence_last_value(h.issued), 0) AS issued)
                                                         AS v))
                                    + $1) - $1
                   END
              FROM (SELECT to_regclass('{hint}') AS hint, to_regclass('{issued}') AS issued) AS h)"
    )
}

/// The oldest due keyless rows, `FOR UPDATE SKIP LOCKED`, returning
/// `columns` of `r`: on the partial index `(seq) WHERE key IS NULL AND
/// status = 'pending'`, or for a tenant on `(tenant, seq) WHERE tenant IS
/// NOT NULL AND status = 'pending'`; with the extra condition `past` (`""`,
/// [`PAST_FLOOR`] or [`past_hint`]).
fn keyless_rows(t: &str, tenant: Option<&str>, past: &str, columns: &str) -> String {
    let tenant = tenant_pred("r", tenant);
    format!(
        "SELECT {columns} FROM {t} AS r
          WHERE r.key IS NULL AND r.status = 'pending' {past} AND {DUE} {tenant}
          ORDER BY r.seq
          LIMIT $1
          FOR UPDATE SKIP LOCKED"
    )
}

/// The oldest due keyless rows as the CTE `keyless`, with each row's address
/// (`tid`, see [`lease_and_return`]).
fn keyless_cte(t: &str, tenant: Option<&str>) -> String {
    format!(
        "keyless AS ({})",
        keyless_rows(t, tenant, "", "r.seq, r.ctid AS tid")
    )
}

/// The lease every claim writes on the rows it takes: attempts + 1, token
/// $3, deadline now + $2 µs.
const LEASE_SET: &str = "SET attempts = t.attempts + 1,
                   lease_token = $3,
                   lease_until = now() + $2::int8 * interval '1 microsecond'";

/// The columns a claim returns for each leased row (`t`).
fn returned_columns() -> String {
    columns_of("t", "t.attempts")
}

/// The columns a claim returns for each row of `alias`, with `attempts`
/// (the attempt this claim starts, counted from 1). Every claim statement
/// returns them first and in this order: the store reads them by position
/// (`CLAIMED_COLUMNS` in the store).
fn columns_of(alias: &str, attempts: &str) -> String {
    format!(
        "{alias}.seq, {alias}.id, {alias}.topic, {alias}.key, {alias}.payload,
         {alias}.headers::text AS headers, {alias}.tenant,
         {attempts} AS attempts, {alias}.max_attempts, {created} AS created_us",
        created = micros_finite(&format!("{alias}.created_at")),
    )
}

/// The lease deadline in Unix µs, as every claim returns it.
fn lease_until_us() -> String {
    micros("now() + $2::int8 * interval '1 microsecond'")
}

/// The rest of every claim but `keyless_bulk`, `keyless_held` and
/// `keyed_bulk`, following the CTE `picked`: lease the rows of `picked`
/// ([`LEASE_SET`]) and return them in `seq` order, or one row of NULLs when
/// nothing was claimed so that the lease deadline and the `extra` columns
/// always come back.
///
/// `picked` names each row by `seq` and by its address `tid` (`ctid`), as
/// the `FOR UPDATE` that locked it returned it, and the `UPDATE` finds the
/// rows by address: a TID scan, where looking each `seq` up in the primary
/// key cost a descent of the index per row. This statement holds the row
/// locked from then on, so the address stays the row's. In one race it
/// misses a row: when a transaction that committed after this statement's
/// snapshot was taken had changed the row and left it claimable, the lock
/// returns the new version, which this statement's snapshot cannot see, so
/// the `UPDATE` skips it. That row is simply not claimed this time (it is
/// unlocked at commit, untouched), never claimed twice.
fn lease_and_return(t: &str, extra: &str) -> String {
    format!(
        ",
         claimed AS (
            UPDATE {t} AS t
               {LEASE_SET}
             WHERE t.ctid = ANY(ARRAY(SELECT tid FROM picked))
            RETURNING {returned}
         )
         SELECT c.seq, c.id, c.topic, c.key, c.payload, c.headers, c.tenant, c.attempts,
                c.max_attempts, c.created_us,
                {until} AS lease_until_us,
                {extra}
           FROM (SELECT 1) AS one
           LEFT JOIN claimed AS c ON true
          ORDER BY c.seq",
        returned = returned_columns(),
        until = lease_until_us(),
    )
}

/// The keyless claim's hints: no walk, whether keyed rows arrived (then
/// the next claim looks at them), nothing short.
fn keyless_hints(t: &str) -> String {
    format!(
        "NULL::text AS walk_end, NULL::int8 AS walk_len,
         {} AS keyed_pending, true AS settled, false AS short, false AS raced,
         NULL::int8 AS window_leased",
        keyed_probe(t)
    )
}

/// The keyless claim. It also probes whether keyed rows arrived.
fn keyless_sql(t: &str, tenant: Option<&str>) -> String {
    format!(
        "WITH {keyless},
         picked AS (SELECT seq, tid FROM keyless)
         {rest}",
        keyless = keyless_cte(t, tenant),
        rest = lease_and_return(t, &keyless_hints(t)),
    )
}

/// The keyless claim while a backlog lasts: the lease `UPDATE` returns the
/// rows itself, hints in every row, in no particular order (the store sorts
/// them). The other claims wrap the `UPDATE` in a CTE read by an outer
/// query: its rows are stored once more, joined to one row so that a claim
/// of nothing still returns the hints, and sorted. That wrapper was 20 % of
/// a keyless claim of 1,000 rows (6.8 ms → 5.4 ms, `EXPLAIN ANALYZE` at
/// 300k pending rows). The price: a claim of nothing returns no row, and no
/// hints, so the store runs this statement only after a claim that came
/// back full with no keyed row pending, and `keyless` again after one that
/// leased nothing.
///
/// The `UPDATE` finds the rows by the address their lock returned, as in
/// [`lease_and_return`].
///
/// It starts past `$4` like `keyless_held` (see there): the store uses it
/// when all its held permits are taken, that is behind as many held
/// batches of its own. The tenant is `$5`.
fn keyless_bulk_sql(t: &str, past: &str, tenant: Option<&str>) -> String {
    lease_returning(
        t,
        &keyless_rows(t, tenant, past, "r.ctid"),
        &keyless_hints(t),
    )
}

/// The backlog forms' lease `UPDATE` as the whole statement: it leases
/// the rows at the addresses `tids` (a query of `ctid`s, locked by it) and
/// returns them, in no set order, with the lease deadline and `hints` in
/// every row; nothing at all when it leases nothing.
fn lease_returning(t: &str, tids: &str, hints: &str) -> String {
    format!(
        "UPDATE {t} AS t
            {LEASE_SET}
          WHERE t.ctid = ANY(ARRAY({tids}))
         RETURNING {returned}, {until} AS lease_until_us, {hints}",
        returned = returned_columns(),
        until = lease_until_us(),
    )
}

/// The keyless claim while a backlog lasts and the store can hold the
/// batch's transaction open ("held" claims): the rows are only locked
/// (`FOR UPDATE SKIP LOCKED`), not leased, and the transaction that locked
/// them stays open while the relay publishes; the completion deletes them in
/// that same transaction and commits. The row locks are the lease, and the
/// transaction its fence: every other claim skips locked rows, and if the
/// relay dies, its connection drops or it stalls past the lease (the
/// transaction's `idle_in_transaction_session_timeout` is the lease, see
/// the store), the server rolls the transaction back and the rows are
/// claimable again at once, untouched. Nothing can be overwritten by a
/// relay whose lease ended, because its writes can only ever commit inside
/// the transaction the server ended.
///
/// Why: a lease `UPDATE` writes a new version of every row it leases, and
/// the completion's `DELETE` writes each row again; a lock is one cheaper
/// write in the heap page, no new row version. Drained in a server-side loop
/// (200k rows, batch 1,000, no client), lock-then-delete ran 1.6–1.8× the
/// speed of lease-then-delete and about as fast as the one-statement
/// `DELETE … RETURNING` (see BENCHMARKS.md).
///
/// The attempt is counted when the completion records a failure (the store
/// stamps `attempts + 1` then), so `attempts` here is the row's plus one,
/// like a leasing claim's. A relay that dies mid-publish does not count an
/// attempt for these rows.
///
/// **Past the store's own batches.** A row another transaction holds
/// locked costs a `SKIP LOCKED` scan a lock attempt (1.6 µs a row measured,
/// against 0.3 µs for a leased row the scan's condition filters out), and a
/// relay claims its next batch while it still holds the previous ones: a
/// scan from the front paid 2–5 ms per claim of 1,000 rows to skip them,
/// more than the lease `UPDATE` it saves. So the scan starts past `$4`, the
/// highest `seq` of the batches this store holds (an index condition), and
/// for claims of any tenant also past the rows other relays' claims
/// reserved (`past`, see [`past_hint`]). A row below that which nobody
/// holds (a late commit, a retry come due) is taken by the claim that starts
/// from the front, at least once a second and whenever the backlog ends.
///
/// Parameters as in the other claims: `$1` limit, `$2` lease (µs, for the
/// deadline returned), `$3` the token (bound but unused: the
/// transaction is the lease), then `$4` where the scan starts (exclusive),
/// the tenant `$5`. Returns no row when nothing is claimable, like
/// `keyless_bulk`.
fn keyless_held_sql(t: &str, past: &str, tenant: Option<&str>) -> String {
    let columns = format!(
        "{returned}, {until} AS lease_until_us, {hints}, r.ctid AS row_tid",
        returned = columns_of("r", "r.attempts + 1"),
        until = lease_until_us(),
        hints = keyless_hints(t),
    );
    keyless_rows(t, tenant, past, &columns)
}

/// The forms of the keyed claim (see [`keyed_sql`]).
#[derive(Debug, Clone, Copy)]
enum Keyed {
    /// The window, wrapped like the other claims ([`lease_and_return`]).
    Window,
    /// The window while a keyed backlog lasts: the lease `UPDATE` returns
    /// the rows itself, hints in every row, in no particular order, like
    /// `keyless_bulk` (see there for what the wrapper costs and what this
    /// form gives up). Measured in `EXPLAIN ANALYZE` on a claim of 100 of
    /// 100k rows over 1,000 keys: the wrapper was 0.15 ms of 1.2–1.4 ms.
    Bulk,
    /// The window, and the key walk when the window is short.
    Walk,
}

/// The keyed claim, with the key walk or without.
///
/// * `recent`: the oldest `$4` pending keyed rows (partial index on `seq`,
///   or the tenant's index); `firsts` (any tenant): each key's first row
///   among them; `keyed`: of those, the oldest that are due, unleased heads
///   of their keys, locked. All a claim needs while most rows are heads
///   (many keys).
/// * `short`: the window was full of rows but gave fewer heads than asked
///   for (for any tenant: and its snapshot held fewer heads that were
///   claimable or freshly leased ([`busy`]) too, so the shortfall was
///   neither lost lock races nor keys busy with a lease): a hot key's
///   backlog, or keys whose heads are stuck, fill the front of the table.
///   The store then claims with the walk from the next claim of this scope
///   on, until a claim is no longer short.
/// * `window_leased` (any tenant): the window's rows under a live lease.
/// * `walk` (only in the walk form, and only executed when the window
///   came back short of heads, `window_short`: a CTE runs only when read;
///   the store uses the walk form after a `short` claim or a raced one
///   that got nothing, unless another claim of the store was running:
///   `MODE_RACED` in the store): a loose index scan over the distinct keys
///   of the blocking rows (partial index `(key, seq)`), `$6` keys starting at the
///   cursor `$5` that the store rotates. Each step yields its key's head
///   directly (the key's lowest blocking row), so every key is reached
///   within a bounded number of claims however deep one key's backlog is;
///   `walked` locks the claimable ones.
/// * `keyless` as in the keyless claim; `picked` takes the oldest of all
///   candidates.
/// * `settled` ([`SETTLED`]) holds keyed rows back for one lease after a
///   crash of the database server.
/// * `keyed_pending`: whether `recent` found any row (leased ones count),
///   or for a tenant-restricted claim the keyless claim's probe, since the
///   hint is about every tenant's rows.
fn keyed_sql(t: &str, form: Keyed, tenant: Option<&str>) -> String {
    let walk = matches!(form, Keyed::Walk);
    let head_pred = "h.key IS NOT NULL AND (h.status = 'pending' OR h.parked)";
    let recent_tenant = tenant_pred("r", tenant);
    let (walk_ctes, walked, walk_report) = if walk {
        let walked_tenant = tenant_pred("r", tenant);
        (
            format!(
                "walk AS (
                    (SELECT h.key, h.seq, 1 AS n FROM {t} AS h
                      WHERE {head_pred} AND h.key >= $5
                      ORDER BY h.key, h.seq LIMIT 1)
                    UNION ALL
                    SELECT nx.key, nx.seq, w.n + 1
                      FROM walk AS w
                      CROSS JOIN LATERAL (
                            SELECT h.key, h.seq FROM {t} AS h
                             WHERE {head_pred} AND h.key > w.key
                             ORDER BY h.key, h.seq LIMIT 1) AS nx
                     WHERE w.n < $6
                 ),
                 walked AS (
                    SELECT r.seq, r.ctid AS tid FROM {t} AS r
                     WHERE (SELECT yes FROM window_short)
                       AND r.seq = ANY(ARRAY(SELECT seq FROM walk))
                       AND r.key IS NOT NULL AND r.status = 'pending' AND {DUE} {walked_tenant}
                     ORDER BY r.seq
                     LIMIT $1
                     FOR UPDATE OF r SKIP LOCKED
                 ),"
            ),
            "UNION SELECT seq, tid FROM walked",
            "CASE WHEN (SELECT yes FROM window_short) THEN (SELECT max(key) FROM walk) END AS walk_end,
             CASE WHEN (SELECT yes FROM window_short) THEN (SELECT count(*) FROM walk) END AS walk_len,",
        )
    } else {
        (
            String::new(),
            "",
            "NULL::text AS walk_end, NULL::int8 AS walk_len,",
        )
    };
    let keyed_pending = if tenant.is_some() {
        keyed_probe(t)
    } else {
        "EXISTS (SELECT 1 FROM recent)".to_owned()
    };
    // Which of the window's rows are heads, and the window itself.
    //
    // Any tenant: the window holds every pending keyed row up to its last
    // `seq` (one snapshot, the oldest `$4` of them), so a window row is its
    // key's head exactly when it is the key's first row in the window and
    // no parked dead row of the key comes before it. `firsts` finds each
    // key's first row in the window: one hash aggregate of the `$4` rows
    // it read anyway, grouped by a 64-bit hash of the key (one read of each
    // key, then integer comparisons, where comparing the keys themselves
    // cost up to 10x for long or TOASTed keys; two keys whose hashes
    // collide only look like one key, which can hold a head back, never let
    // a second row of a key through). It keeps, per key, the lowest `seq`,
    // the lowest due one and the lowest leased one, so "the first row is
    // due" is `due_seq = seq` without reading the row again. (It ranked the
    // rows with a sort and `row_number()` before: 1.15 ms of a window of
    // 3,000 rows against 0.35 ms now, measured in psql.) The parked check
    // is one probe of `parked_idx`, which holds only parked rows and is
    // usually empty. This replaced one `head_idx` probe per
    // candidate, whose cost grew with the backlog: 1-2 us a probe at 10k
    // pending rows, 6-7 us at 1M (a descent into a large index, cache misses
    // and all), 0.6 ms of a 1.0 ms keyed part; now 0.5 ms at 1M with a
    // window of 200 rows.
    //
    // One tenant: the window is that tenant's rows only, and a key's head
    // may belong to another tenant, so each candidate asks `head_idx`.
    //
    // `window_leased` (any tenant): how many of the window's rows were under
    // a live lease, whoever holds them; the store reaches that far past
    // them next time (see `keyed_window` in the store).
    let (recent_cols, firsts, keyed_pred, window_leased) = if tenant.is_some() {
        (
            "r.seq",
            String::new(),
            format!(
                "r.seq = ANY(ARRAY(SELECT seq FROM recent))
               AND r.key IS NOT NULL AND r.status = 'pending' AND {DUE}
               AND r.seq = (SELECT min(e.seq) FROM {t} AS e
                             WHERE e.key = r.key AND (e.status = 'pending' OR e.parked))"
            ),
            "NULL::int8",
        )
    } else {
        (
            "r.seq, r.key, r.available_at, r.lease_until",
            format!(
                "firsts AS (
                    SELECT min(w.seq) AS seq,
                           min(w.seq) FILTER (WHERE {due}) AS due_seq,
                           min(w.seq) FILTER (WHERE {BUSY}) AS leased_seq
                      FROM recent AS w
                     GROUP BY hashtextextended(w.key, 0)
                 ),",
                due = DUE.replace("r.", "w."),
                BUSY = busy("w"),
            ),
            format!(
                "r.seq = ANY(ARRAY(SELECT seq FROM firsts))
               AND r.key IS NOT NULL AND r.status = 'pending' AND {DUE}
               AND {}",
                no_parked_before(t, "r")
            ),
            "(SELECT count(*) FROM recent WHERE lease_until > now())",
        )
    };
    // `window_short`: the window was full and gave fewer heads than the
    // batch. `short`, which sends the next claim to the key walk: for any
    // tenant, only if the snapshot held fewer heads that are claimable or
    // leased (`heads_seen`) too. When it held enough claimable heads but
    // concurrent claims (other relays') locked some first, the window is
    // not what fell short: the claim reports `raced` instead, and the store
    // walks only when a raced claim got nothing (so that a long transaction
    // holding heads `FOR UPDATE` cannot hide the keys behind the window).
    // When it held enough keys but their heads were leased within the last
    // second ([`busy`]: in flight, here or in another relay), it is
    // neither: the keys are busy, not missing, and their next messages
    // become heads as the leases complete. A walk then found nothing but
    // the same leased heads: with 1,000 keys and batch 1,000 one batch
    // leases every head, and the other workers' claims walked all 1,000
    // keys for nothing, 12 ms a claim, 60 % of the keyed claims' server
    // time in `drain-keyed` at batch 1,000. Heads leased longer ago count
    // as missing again (a destination that hangs holds its keys' heads
    // until the send timeout): the window is short and the walk reaches
    // the keys behind it. Counted only when the window came back short
    // (`AND` stops at false), and then only over the keys' first rows.
    // Busy keys count as enough only from 16 of them (a walk's fewest keys,
    // [`MIN_WALK`]), whatever the batch: at batch 1 a single hot
    // key's leased head filled the batch, so no claim walked, and every
    // key behind its backlog waited until the backlog was gone, published
    // one message at a time while the relay's other workers claimed
    // nothing. A walk past fewer keys than that costs little.
    // A tenant's claims keep neither rule: their window is that tenant's
    // rows only, with no `firsts` to count busy or claimable heads by, so
    // a short window is always short (walked) and never raced.
    let (heads_seen, snapshot_short, raced) = if tenant.is_some() {
        (String::new(), String::new(), "false")
    } else {
        (
            format!(
                "heads_seen AS (
                    SELECT count(*) FILTER (
                               WHERE f.due_seq = f.seq
                                 AND (SELECT p.seq FROM {t} AS p
                                       WHERE p.parked AND p.seq < f.seq
                                         AND p.key = (SELECT k.key FROM {t} AS k
                                                       WHERE k.seq = f.seq)
                                       LIMIT 1) IS NULL) AS claimable,
                           count(*) FILTER (WHERE f.leased_seq = f.seq) AS leased
                      FROM firsts AS f
                 ),"
            ),
            format!(
                "AND (SELECT claimable FROM heads_seen) < $1
                 AND (SELECT claimable + leased FROM heads_seen) < GREATEST($1, {MIN_WALK})"
            ),
            "(SELECT yes FROM window_short) AND (SELECT claimable FROM heads_seen) >= $1",
        )
    };
    // what every form reports besides the rows; `commit` is how it commits
    let hints = |commit: &str| {
        format!(
            "{walk_report}
             {keyed_pending} AS keyed_pending,
             (SELECT yes FROM settled) AS settled,
             (SELECT yes FROM short) AS short,
             {raced} AS raced,
             {window_leased} AS window_leased,
             {commit}"
        )
    };
    format!(
        "WITH RECURSIVE recent AS (
            SELECT {recent_cols} FROM {t} AS r
             WHERE r.key IS NOT NULL AND r.status = 'pending' {recent_tenant}
             ORDER BY r.seq
             LIMIT $4
         ),
         settled AS (
            SELECT {SETTLED} AS yes
         ),
         {firsts}
         keyed AS (
            SELECT r.seq, r.ctid AS tid FROM {t} AS r
             WHERE (SELECT yes FROM settled)
               AND {keyed_pred}
             ORDER BY r.seq
             LIMIT $1
             FOR UPDATE OF r SKIP LOCKED
         ),
         window_short AS (
            SELECT (SELECT yes FROM settled)
                   AND (SELECT count(*) FROM recent) >= $4
                   AND count(*) < $1 AS yes
              FROM keyed
         ),
         {heads_seen}
         short AS (
            SELECT (SELECT yes FROM window_short) {snapshot_short} AS yes
         ),
         {walk_ctes}
         {keyless},
         picked AS (
            SELECT seq, tid FROM (
                SELECT seq, tid FROM keyless
                UNION ALL
                (SELECT seq, tid FROM keyed {walked})
            ) AS c
             ORDER BY seq
             LIMIT $1
         )
         {rest}",
        keyless = keyless_cte(t, tenant),
        rest = match form {
            Keyed::Bulk => lease_returning(
                t,
                "SELECT tid FROM picked",
                &hints(&claim_commit(LOCKED_KEYED)),
            ),
            Keyed::Window | Keyed::Walk =>
                lease_and_return(t, &hints(&claim_commit(CLAIMED_KEYED))),
        },
    )
}
