//! A relay's own `VACUUM` of the outbox while keyed messages drain (see
//! [`PgOutbox::vacuum_after`](crate::PgOutbox::vacuum_after)).
//!
//! Keyed claims read the oldest pending keyed rows from the front of the
//! keyed index, over the entry of every keyed row deleted since the table was
//! last vacuumed; only a vacuum removes those entries. Autovacuum visits a
//! table about once a minute at best and, by default, only once a fifth of
//! its rows are dead, so a large keyed backlog drains slower with every row
//! drained (BENCHMARKS.md, session 12). A store configured for it checks the
//! table's dead rows while its claims return keyed messages, and vacuums it
//! itself, on a connection of its own, off the claim path.

use std::time::{Duration, Instant};

use postbox_core::{StoreError, observe};
use sqlx::{ConnectOptions, Connection, Executor as _, PgConnection, Row};

use crate::error::map;
use crate::store::{PgStore, count_at, micros_to_duration};

/// How often at most a store looks at the outbox's dead rows while its
/// claims return keyed messages (see
/// [`PgOutbox::vacuum_after`](crate::PgOutbox::vacuum_after)).
pub const VACUUM_CHECK_EVERY: Duration = Duration::from_secs(5);

/// How long the vacuum's own connection may take to open.
const VACUUM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// While a relay's `VACUUM` runs, how often it looks for sessions waiting
/// for a lock on the table (DDL), to give way to them.
pub const VACUUM_YIELD_CHECK_EVERY: Duration = Duration::from_secs(1);

/// What one round of [`PgStore::vacuum_if_due`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VacuumOutcome {
    /// The outbox has no threshold
    /// ([`PgOutbox::vacuum_after`](crate::PgOutbox::vacuum_after) is `None`).
    Off,
    /// Fewer dead rows than the threshold past those the store's last vacuum
    /// left.
    NotDue {
        /// Dead rows in the table (`pg_stat_user_tables.n_dead_tup`).
        dead_rows: u64,
    },
    /// Due, but a vacuum of the table (any relay's, autovacuum's, an
    /// operator's) ended less than [`VACUUM_CHECK_EVERY`] or this store's
    /// last vacuum's duration ago, whichever is longer: relays take turns
    /// with a pause between vacuums, instead of one right after another.
    TooSoon {
        /// Dead rows in the table.
        dead_rows: u64,
        /// Since the last vacuum of the table ended.
        since_last: Duration,
    },
    /// Vacuumed.
    Vacuumed {
        /// Dead rows before.
        dead_rows: u64,
        /// Dead rows right after: those the vacuum could not remove yet
        /// (deleted by transactions that a running snapshot may still need
        /// to see, including deletes that committed while it ran).
        left: u64,
        /// How long the `VACUUM` took.
        took: Duration,
    },
    /// Another vacuum held the table (another relay's, autovacuum's, an
    /// operator's): this one skipped it.
    Skipped {
        /// Dead rows before.
        dead_rows: u64,
    },
    /// Stopped part-way (`pg_cancel_backend`) because another session
    /// waited for a lock on the table, a schema change most likely: like
    /// autovacuum, the relay's vacuum gives way rather than make that
    /// session, and every insert queued behind it, wait.
    Yielded {
        /// Dead rows before.
        dead_rows: u64,
        /// How long it ran.
        took: Duration,
    },
    /// The store's role may not vacuum the table (it must own the table or
    /// the database, or be a superuser). The store's relays stop checking.
    NotAllowed,
}

/// A store's record of its own vacuums (in its shared claim state).
#[derive(Debug, Default)]
pub(crate) struct VacuumRun {
    /// A round runs now (started by a claim).
    running: bool,
    /// No round starts before this.
    not_before: Option<Instant>,
    /// Dead rows right after the store's last vacuum: the next is due only
    /// once the threshold more have come.
    left: u64,
    /// How long the store's last vacuum took.
    took: Duration,
    /// The role may not vacuum the table: no more rounds.
    refused: bool,
}

/// Clears [`VacuumRun::running`] when a round started by a claim ends,
/// however it ends (also when its task is dropped unpolled).
struct Running(PgStore);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.vacuum_run().running = false;
    }
}

impl PgStore {
    /// Starts a round of the relay's own vacuum in the background when none
    /// runs and the last round was long enough ago; called after claims
    /// that returned keyed messages, when the outbox has a threshold (a
    /// round without one returns `Off`).
    pub(crate) fn vacuum_soon(&self) {
        // outside a Tokio runtime there is nothing to run it on
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        {
            let mut run = self.vacuum_run();
            if run.refused || run.running || run.not_before.is_some_and(|t| Instant::now() < t) {
                return;
            }
            run.running = true;
        }
        let running = Running(self.clone());
        runtime.spawn(async move {
            let store = &running.0;
            if let Err(e) = store.vacuum_if_due().await {
                tracing::warn!(
                    postbox.table = %store.outbox().qualified_name(),
                    error = %e,
                    "postbox could not check or vacuum the outbox table; it tries again at a later claim"
                );
            }
        });
    }

    /// One round of the relay's own vacuum (see
    /// [`PgOutbox::vacuum_after`](crate::PgOutbox::vacuum_after)), now:
    /// reads the table's dead rows, its last vacuum and whether this role
    /// may vacuum it (on the admin pool), and when the threshold is reached
    /// runs `VACUUM (SKIP_LOCKED, INDEX_CLEANUP ON, TRUNCATE false)` on a
    /// connection of its own: the admin pool's settings with
    /// `statement_timeout = 0` (a vacuum of a large table may take
    /// minutes), `client_min_messages = error` (a vacuum skipped for a lock
    /// is not worth a warning) and the application name `postbox vacuum`.
    /// Relays call it on their own while they claim keyed messages; this
    /// is for tests and for a program's own schedule.
    pub async fn vacuum_if_due(&self) -> Result<VacuumOutcome, StoreError> {
        let Some(threshold) = self.outbox().vacuum_threshold() else {
            return Ok(VacuumOutcome::Off);
        };
        let started = Instant::now();
        let outcome = self.vacuum_round(threshold.get()).await;
        let now = Instant::now();
        let mut run = self.vacuum_run();
        // a round that failed slowly (a timeout, a server under load) waits
        // as long as it took, too
        run.not_before = Some(now + VACUUM_CHECK_EVERY.max(now - started));
        match &outcome {
            // said once per store
            Ok(VacuumOutcome::NotAllowed) if !std::mem::replace(&mut run.refused, true) => {
                tracing::warn!(
                    postbox.table = %self.outbox().qualified_name(),
                    "postbox may not VACUUM the outbox table (the relay's role owns neither it nor the database, and is no superuser); relays will not vacuum it themselves, leave it to autovacuum or an operator"
                );
            }
            Ok(VacuumOutcome::Vacuumed {
                dead_rows,
                left,
                took,
            }) => {
                run.left = *left;
                run.took = *took;
                metrics::counter!(observe::VACUUMS_TOTAL, "outcome" => "done").increment(1);
                metrics::histogram!(observe::VACUUM_DURATION_SECONDS).record(took.as_secs_f64());
                tracing::info!(
                    postbox.table = %self.outbox().qualified_name(),
                    dead_rows,
                    left,
                    took_ms = took.as_millis(),
                    "postbox vacuumed the outbox table"
                );
            }
            Ok(VacuumOutcome::Yielded { dead_rows, took }) => {
                metrics::counter!(observe::VACUUMS_TOTAL, "outcome" => "yielded").increment(1);
                tracing::info!(
                    postbox.table = %self.outbox().qualified_name(),
                    dead_rows,
                    took_ms = took.as_millis(),
                    "postbox stopped its vacuum of the outbox table: another session waits for a lock on it"
                );
            }
            Ok(VacuumOutcome::Skipped { dead_rows }) => {
                metrics::counter!(observe::VACUUMS_TOTAL, "outcome" => "skipped").increment(1);
                tracing::debug!(
                    postbox.table = %self.outbox().qualified_name(),
                    dead_rows,
                    "postbox skipped vacuuming the outbox table: another vacuum holds it"
                );
            }
            Ok(VacuumOutcome::NotDue { dead_rows }) if *dead_rows < run.left => {
                // someone else vacuumed since: count from what is there
                run.left = *dead_rows;
            }
            _ => {}
        }
        outcome
    }

    async fn vacuum_round(&self, threshold: u64) -> Result<VacuumOutcome, StoreError> {
        let before = self.vacuum_check().await?;
        let (left, took) = {
            let run = self.vacuum_run();
            (run.left, run.took)
        };
        if !before.allowed {
            return Ok(VacuumOutcome::NotAllowed);
        }
        if before.dead_rows < left.saturating_add(threshold) {
            return Ok(VacuumOutcome::NotDue {
                dead_rows: before.dead_rows,
            });
        }
        if before.vacuum_running {
            // not worth a connection: its `VACUUM` would be skipped
            return Ok(VacuumOutcome::Skipped {
                dead_rows: before.dead_rows,
            });
        }
        if let Some(since_last) = before
            .since_last
            .filter(|d| *d < VACUUM_CHECK_EVERY.max(took))
        {
            return Ok(VacuumOutcome::TooSoon {
                dead_rows: before.dead_rows,
                since_last,
            });
        }
        let options = (*self.pool().connect_options())
            .clone()
            .options([("statement_timeout", "0"), ("client_min_messages", "error")])
            .application_name("postbox vacuum");
        // bounded: a server gone silent would otherwise keep this round
        // (and so every later one) waiting on the connect
        let mut conn = tokio::time::timeout(VACUUM_CONNECT_TIMEOUT, options.connect())
            .await
            .map_err(|_| {
                StoreError::Unavailable(
                    format!("no connection for the vacuum within {VACUUM_CONNECT_TIMEOUT:?}")
                        .into(),
                )
            })?
            .map_err(map)?;
        let started = Instant::now();
        let vacuumed = self.vacuum_giving_way(&mut conn).await;
        let took = started.elapsed();
        // the round's answer stands even if the goodbye fails
        let _ = conn.close().await;
        if vacuumed? {
            return Ok(VacuumOutcome::Yielded {
                dead_rows: before.dead_rows,
                took,
            });
        }
        // `before` saw no vacuum holding the table; one that started since
        // (a race of milliseconds) made `SKIP_LOCKED` skip ours, which
        // leaves the table's manual-vacuum count as it was
        let after = self.vacuum_check().await?;
        Ok(if after.vacuums > before.vacuums {
            VacuumOutcome::Vacuumed {
                dead_rows: before.dead_rows,
                left: after.dead_rows,
                took,
            }
        } else {
            VacuumOutcome::Skipped {
                dead_rows: before.dead_rows,
            }
        })
    }

    /// The table's vacuum statistics and this role's right to vacuum it
    /// (`Sql::vacuum_check`), on the admin pool.
    async fn vacuum_check(&self) -> Result<Check, StoreError> {
        let r = sqlx::query(&self.outbox().inner.sql.vacuum_check)
            .fetch_one(self.pool())
            .await
            .map_err(map)?;
        let since_last: Option<i64> = r.try_get(3).map_err(map)?;
        Ok(Check {
            dead_rows: count_at(&r, 0)?,
            allowed: r.try_get(1).map_err(map)?,
            vacuums: count_at(&r, 2)?,
            // a last vacuum in the future (the clock stepped back) is no
            // reason to wait
            since_last: since_last
                .filter(|us| *us >= 0)
                .map(|us| micros_to_duration(Some(us))),
            vacuum_running: r.try_get(4).map_err(map)?,
        })
    }

    /// Runs the `VACUUM` on `conn` and, every
    /// [`VACUUM_YIELD_CHECK_EVERY`] while it runs, looks (on the admin
    /// pool) for sessions waiting for a lock on the table; if one does, it
    /// cancels its own statement and waits for it to end. `Ok(true)`: it
    /// gave way. A failed look counts as no one waiting.
    async fn vacuum_giving_way(&self, conn: &mut PgConnection) -> Result<bool, StoreError> {
        let sql = &self.outbox().inner.sql;
        let pid: i32 = conn
            .fetch_one("SELECT pg_catalog.pg_backend_pid()")
            .await
            .and_then(|r| r.try_get(0))
            .map_err(map)?;
        let mut running = std::pin::pin!(vacuum(conn, &sql.vacuum));
        let mut cancelled = false;
        loop {
            match tokio::time::timeout(VACUUM_YIELD_CHECK_EVERY, running.as_mut()).await {
                // finished before the cancel reached it: not given way
                Ok(Ok(())) => return Ok(false),
                Ok(Err(_)) if cancelled => return Ok(true),
                Ok(Err(e)) => return Err(e),
                Err(_) if cancelled => {}
                Err(_) => {
                    let waiters = sqlx::query_scalar::<_, bool>(&sql.vacuum_waiters)
                        .fetch_one(self.pool())
                        .await
                        .unwrap_or(false);
                    if waiters {
                        cancelled = sqlx::query_scalar::<_, bool>(
                            "SELECT pg_catalog.pg_cancel_backend($1)",
                        )
                        .bind(pid)
                        .fetch_one(self.pool())
                        .await
                        .unwrap_or(false);
                    }
                }
            }
        }
    }
}

/// What `Sql::vacuum_check` reads.
struct Check {
    dead_rows: u64,
    allowed: bool,
    /// Manual vacuums of the table so far (a `VACUUM` skipped for a lock
    /// leaves the count as it was).
    vacuums: u64,
    /// Since the table's last vacuum, manual or automatic, ended (`None`:
    /// none on record).
    since_last: Option<Duration>,
    /// A vacuum (or another holder of its lock) holds the table now.
    vacuum_running: bool,
}

/// Runs `VACUUM` as one statement in the simple query protocol (`&str`
/// without arguments): a `VACUUM` cannot run inside a transaction block.
async fn vacuum(conn: &mut PgConnection, sql: &str) -> Result<(), StoreError> {
    conn.execute(sql).await.map_err(map)?;
    Ok(())
}
