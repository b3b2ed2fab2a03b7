//! The relay's own vacuum (`PgOutbox::vacuum_after`): due from the
//! threshold, counted past the dead rows a vacuum could not remove, skipped
//! while another vacuum holds the table, too soon right after one, refused
//! for a role that may not vacuum, started by a claim that returns keyed
//! messages, and giving way to a waiting schema change.

mod common;

use std::num::NonZeroU64;
use std::time::Duration;

use common::{PgHarness, admin_url, complete_all};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use postbox_core::observe::{VACUUM_DURATION_SECONDS, VACUUMS_TOTAL};
use postbox_core::{ClaimRequest, Disposition, NewMessage, Store};
use postbox_postgres::{PgOutbox, PgStore, VacuumOutcome};
use sqlx::Connection;

/// Inserts and deletes `n` keyed rows on one session and makes it report
/// its statistics now (a busy session reports them about once a second, an
/// idle one within 10 s); then waits until the server's view counts at
/// least `at_least` dead rows.
async fn dead_rows(h: &PgHarness, n: u32, at_least: u64) {
    let t = h.outbox.qualified_name();
    let mut conn = h.app.acquire().await.expect("connection");
    sqlx::raw_sql(&format!(
        "INSERT INTO {t} (topic, key, payload)
              SELECT 't', 'k' || (i % 50), 'x' FROM generate_series(1, {n}) AS i;
         DELETE FROM {t};
         SELECT pg_stat_force_next_flush();"
    ))
    .execute(&mut *conn)
    .await
    .expect("insert, delete, flush");
    drop(conn);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let state = h.store.vacuum_state().await.expect("vacuum state");
        if state.dead_rows >= at_least {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "statistics never counted {at_least} dead rows: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `postbox_vacuums_total` done and skipped, and the durations recorded,
/// since the previous snapshot.
fn vacuum_counts(metrics: &Snapshotter) -> (u64, u64, usize) {
    let (mut done, mut skipped, mut durations) = (0, 0, 0);
    for (key, _, _, value) in metrics.snapshot().into_vec() {
        let name = key.key().name();
        match value {
            DebugValue::Counter(n) if name == VACUUMS_TOTAL => {
                let outcome = key
                    .key()
                    .labels()
                    .find(|l| l.key() == "outcome")
                    .map(|l| l.value().to_owned());
                match outcome.as_deref() {
                    Some("done") => done += n,
                    Some("skipped") => skipped += n,
                    other => panic!("unexpected outcome label {other:?}"),
                }
            }
            DebugValue::Histogram(v) if name == VACUUM_DURATION_SECONDS => durations += v.len(),
            _ => {}
        }
    }
    (done, skipped, durations)
}

/// Manual vacuums of the outbox table so far (autovacuum's not counted).
async fn vacuums(h: &PgHarness) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT pg_stat_get_vacuum_count('{}'::regclass)",
        h.outbox.qualified_name()
    ))
    .fetch_one(&h.app)
    .await
    .expect("vacuum count")
}

/// A harness whose outbox vacuums itself from `threshold` dead rows, with
/// autovacuum off for the table (on a server where it is on, it must not
/// clean up under the test).
async fn harness(threshold: Option<u64>) -> PgHarness {
    let h = PgHarness::with_outbox(
        PgOutbox::default().vacuum_after(threshold.and_then(NonZeroU64::new)),
    )
    .await;
    sqlx::raw_sql(&format!(
        "ALTER TABLE {} SET (autovacuum_enabled = false)",
        h.outbox.qualified_name()
    ))
    .execute(&h.app)
    .await
    .expect("autovacuum off");
    h
}

#[tokio::test]
async fn a_vacuum_is_due_from_the_threshold_and_skipped_while_another_runs() {
    // the test's runtime runs on this thread: a local recorder sees the
    // store's metrics
    let recorder = DebuggingRecorder::new();
    let metrics = recorder.snapshotter();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let h = harness(Some(300)).await;
    dead_rows(&h, 200, 200).await;
    let outcome = h.store.vacuum_if_due().await.expect("round");
    assert!(
        matches!(outcome, VacuumOutcome::NotDue { dead_rows } if dead_rows >= 200),
        "{outcome:?}"
    );
    assert_eq!(vacuums(&h).await, 0);

    // a vacuum already running (here: its lock held) is skipped, not waited for
    let mut locker = sqlx::PgConnection::connect(&h.db.url)
        .await
        .expect("connect");
    sqlx::raw_sql(&format!(
        "BEGIN; LOCK TABLE {} IN SHARE UPDATE EXCLUSIVE MODE",
        h.outbox.qualified_name()
    ))
    .execute(&mut locker)
    .await
    .expect("lock");
    dead_rows(&h, 200, 400).await;
    let outcome = tokio::time::timeout(Duration::from_secs(30), h.store.vacuum_if_due())
        .await
        .expect("a locked table is skipped, not waited for")
        .expect("round");
    assert!(
        matches!(outcome, VacuumOutcome::Skipped { dead_rows } if dead_rows >= 400),
        "{outcome:?}"
    );
    assert_eq!(vacuums(&h).await, 0);
    assert_eq!(vacuum_counts(&metrics), (0, 1, 0));
    // released before the next round (a closed connection's backend may
    // still hold it for a moment)
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut locker)
        .await
        .expect("unlock");
    locker.close().await.expect("close");

    let outcome = h.store.vacuum_if_due().await.expect("round");
    // (a snapshot of another session of this database, an automatic
    // ANALYZE say, may keep a few)
    assert!(
        matches!(outcome, VacuumOutcome::Vacuumed { dead_rows, left, .. }
            if dead_rows >= 400 && left < dead_rows / 2),
        "{outcome:?}"
    );
    assert_eq!(vacuums(&h).await, 1);
    // (a snapshot counts since the previous one)
    assert_eq!(vacuum_counts(&metrics), (1, 0, 1));

    // due again by the count, but right after a vacuum of the table: a
    // pause first (relays take turns)
    dead_rows(&h, 400, 400).await;
    let outcome = h.store.vacuum_if_due().await.expect("round");
    assert!(
        matches!(outcome, VacuumOutcome::TooSoon { dead_rows, since_last }
            if dead_rows >= 400 && since_last < postbox_postgres::VACUUM_CHECK_EVERY),
        "{outcome:?}"
    );
    assert_eq!(vacuums(&h).await, 1);
}

/// Rows deleted while a snapshot that still sees them is open cannot be
/// removed: the vacuum leaves them, and the next is due only once the
/// threshold more have come.
#[tokio::test]
async fn the_threshold_counts_past_the_rows_a_vacuum_left() {
    let h = harness(Some(300)).await;
    let mut reader = sqlx::PgConnection::connect(&h.db.url)
        .await
        .expect("connect");
    sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
        .execute(&mut reader)
        .await
        .expect("open a snapshot");
    dead_rows(&h, 400, 400).await;
    let outcome = h.store.vacuum_if_due().await.expect("round");
    let VacuumOutcome::Vacuumed { left, .. } = outcome else {
        panic!("400 dead rows are due: {outcome:?}");
    };
    assert!(left >= 400, "the snapshot keeps them: {outcome:?}");
    dead_rows(&h, 100, left + 100).await;
    let outcome = h.store.vacuum_if_due().await.expect("round");
    assert!(
        matches!(outcome, VacuumOutcome::NotDue { .. }),
        "only 100 past what the last vacuum left: {outcome:?}"
    );
    assert_eq!(vacuums(&h).await, 1);
    reader.close().await.expect("close");
}

#[tokio::test]
async fn an_outbox_without_a_threshold_is_never_vacuumed() {
    let h = harness(None).await;
    dead_rows(&h, 200, 200).await;
    assert_eq!(
        h.store.vacuum_if_due().await.expect("round"),
        VacuumOutcome::Off
    );
    assert_eq!(vacuums(&h).await, 0);
}

/// A claim that returns keyed messages starts a round in the background.
#[tokio::test]
async fn a_claim_of_keyed_messages_starts_the_vacuum() {
    let h = harness(Some(100)).await;
    dead_rows(&h, 500, 500).await;
    keyed_row(&h).await;

    let claim = h
        .store
        .claim(&ClaimRequest::new(10, Duration::from_secs(30)))
        .await
        .expect("claim");
    assert_eq!(claim.len(), 1, "the keyed message is due");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while vacuums(&h).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the claim started no vacuum"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = h.store.vacuum_state().await.expect("vacuum state");
    assert!(state.dead_rows < 500, "{state:?}");
}

/// A role that may not vacuum the table gets `NotAllowed`, and its claims
/// of keyed messages, which start a round too, go on.
#[tokio::test]
async fn a_role_that_may_not_vacuum_is_told_so() {
    let h = harness(Some(1)).await;
    let role = Role::create(&h).await;
    dead_rows(&h, 10, 10).await;
    for _ in 0..3 {
        keyed_row(&h).await;
    }

    let mut options: sqlx::postgres::PgConnectOptions = h.db.url.parse().expect("url");
    options = options.username(&role.name);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .expect("connect as the role");
    let store: PgStore = h.outbox.store(pool.clone());
    for _ in 0..3 {
        // one head per claim: the key's next message waits for this one
        let claim = store
            .claim(&ClaimRequest::new(10, Duration::from_secs(30)))
            .await
            .expect("claims work without the vacuum");
        assert_eq!(claim.len(), 1);
        complete_all(&store, &claim, Disposition::Sent).await;
    }
    let outcome = store.vacuum_if_due().await.expect("round");
    assert_eq!(outcome, VacuumOutcome::NotAllowed);
    assert_eq!(vacuums(&h).await, 0);
    drop(store);
    pool.close().await;
}

/// A login role with the privileges a relay needs on the test database's
/// tables, dropped (with its privileges) when the test ends, however.
struct Role {
    name: String,
    db_url: String,
}

impl Role {
    async fn create(h: &PgHarness) -> Self {
        let name = format!("postbox_novacuum_{:08x}", fastrand::u32(..));
        sqlx::raw_sql(&format!(
            "CREATE ROLE {name} LOGIN;
             GRANT USAGE ON SCHEMA public TO {name};
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {name};
             GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {name};"
        ))
        .execute(&h.app)
        .await
        .expect("create role");
        Self {
            name,
            db_url: h.db.url.clone(),
        }
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let (name, db_url) = (self.name.clone(), self.db_url.clone());
        // on its own thread: Drop cannot await
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(mut c) = sqlx::PgConnection::connect(&db_url).await {
                    let _ = sqlx::raw_sql(&format!("DROP OWNED BY {name}"))
                        .execute(&mut c)
                        .await;
                }
                if let Ok(mut c) = sqlx::PgConnection::connect(&admin_url().await).await {
                    let _ = sqlx::raw_sql(&format!("DROP ROLE IF EXISTS {name}"))
                        .execute(&mut c)
                        .await;
                }
            });
        })
        .join();
    }
}

/// Enqueues a message of key `k1`, due now.
async fn keyed_row(h: &PgHarness) {
    let msg = NewMessage::new("t", "x").key("k1");
    let mut tx = h.app.begin().await.expect("begin");
    h.outbox.enqueue(&mut *tx, &msg).await.expect("enqueue");
    tx.commit().await.expect("commit");
}

/// The relay's vacuum gives way to a schema change that waits for its
/// lock (inserts would queue behind that): it cancels itself.
#[tokio::test]
async fn a_vacuum_gives_way_to_a_waiting_schema_change() {
    let h = harness(Some(100)).await;
    dead_rows(&h, 5_000, 5_000).await;
    // New sessions of this database vacuum at a crawl (100 ms after every
    // page), so the vacuum is still running when the schema change comes.
    sqlx::raw_sql(&format!(
        "ALTER DATABASE {db} SET vacuum_cost_delay = '100ms';
         ALTER DATABASE {db} SET vacuum_cost_limit = 1;",
        db = h.db.name
    ))
    .execute(&h.app)
    .await
    .expect("slow vacuums");
    let store = h.store.clone();
    let round = tokio::spawn(async move { store.vacuum_if_due().await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let running: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                             WHERE datname = current_database() AND state = 'active'
                               AND application_name = 'postbox vacuum'
                               AND query LIKE 'VACUUM%')",
        )
        .fetch_one(&h.app)
        .await
        .expect("activity");
        if running {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the vacuum never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let app = h.app.clone();
    let t = h.outbox.qualified_name().to_owned();
    let alter = tokio::spawn(async move {
        sqlx::raw_sql(&format!("ALTER TABLE {t} ADD COLUMN extra int"))
            .execute(&app)
            .await
    });
    let outcome = tokio::time::timeout(Duration::from_secs(30), round)
        .await
        .expect("the vacuum ends")
        .expect("task")
        .expect("round");
    assert!(
        matches!(outcome, VacuumOutcome::Yielded { dead_rows, .. } if dead_rows >= 5_000),
        "{outcome:?}"
    );
    tokio::time::timeout(Duration::from_secs(30), alter)
        .await
        .expect("the schema change goes through")
        .expect("task")
        .expect("alter");
    assert_eq!(vacuums(&h).await, 0, "not counted as a vacuum");
}
