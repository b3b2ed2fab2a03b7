//! A stall is reported, never silent: a long transaction in another
//! database holds back the cleanup horizon, and `horizon_holders` and the
//! relay's gauge say so, naming the session.

mod common;

use std::time::Duration;

use common::{PgHarness, TestDb};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use postbox_core::observe::{HORIZON_AGE_SECONDS, UNVACUUMED_ROWS};
use postbox_core::{CancellationToken, Relay, Store};
use postbox_testkit::TestPublisher;
use sqlx::Connection;

#[test]
fn a_long_transaction_in_another_database_is_named_and_measured() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // current-thread: the recorder is local to this thread, and so are the
    // relay's tasks
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = metrics::set_default_local_recorder(&recorder);
    rt.block_on(async {
        let h = PgHarness::new().await;
        // a session in another database with an open snapshot
        let other = TestDb::create().await;
        let mut long = sqlx::PgConnection::connect(&other.url)
            .await
            .expect("connect");
        sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
            .execute(&mut long)
            .await
            .expect("open a snapshot");
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut long)
            .await
            .expect("pid");

        // Other sessions of the shared server may hold older snapshots; the
        // oldest few include ours.
        let holders = h.store.horizon_holders(20).await.expect("horizon");
        let ours = holders
            .iter()
            .find(|x| x.pid == Some(pid))
            .unwrap_or_else(|| panic!("pid {pid} not among the horizon holders: {holders:?}"));
        assert!(
            ours.description.contains(&other.name),
            "the holder's database is not named: {ours:?}"
        );
        assert!(ours.age.is_some(), "{ours:?}");
        assert!(h.store.holdups().await.expect("holdups").horizon.is_some());

        // A running relay samples it into its gauge.
        let relay = Relay::builder(h.store.clone(), TestPublisher::recording())
            .stats_interval(Some(Duration::from_millis(20)))
            .build()
            .expect("relay");
        let stop = CancellationToken::new();
        let running = tokio::spawn({
            let stop = stop.clone();
            async move { relay.run(stop).await }
        });
        let mut age = None;
        for _ in 0..500 {
            age = snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .find_map(|(key, _, _, value)| match value {
                    DebugValue::Gauge(g) if key.key().name() == HORIZON_AGE_SECONDS => {
                        Some(g.into_inner())
                    }
                    _ => None,
                });
            if age.is_some_and(|a| a > 0.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        running.await.expect("relay");
        assert!(
            age.is_some_and(|a| a > 0.0),
            "{HORIZON_AGE_SECONDS} never showed the open transaction: {age:?}"
        );
        // the same sample sets the table's unvacuumed rows
        let unvacuumed = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .any(|(key, _, _, value)| {
                matches!(value, DebugValue::Gauge(_)) && key.key().name() == UNVACUUMED_ROWS
            });
        assert!(unvacuumed, "{UNVACUUMED_ROWS} was never set");
        sqlx::query("ROLLBACK")
            .execute(&mut long)
            .await
            .expect("end it");
    });
}

/// `vacuum_state` counts the rows deleted since the last vacuum (from the
/// server's statistics, which the deleting session is told to report at
/// once), and a vacuum resets the count and is dated.
#[tokio::test]
async fn the_vacuum_state_counts_deleted_rows_until_a_vacuum() {
    let h = PgHarness::new().await;
    let t = h.outbox.qualified_name();
    // autovacuum must not clean up under the test on a server where it is on
    sqlx::raw_sql(&format!("ALTER TABLE {t} SET (autovacuum_enabled = false)"))
        .execute(&h.app)
        .await
        .expect("autovacuum off");
    // one session, told to report its statistics at once rather than when
    // next idle for a while (up to 10 s)
    let mut conn = h.app.acquire().await.expect("connection");
    sqlx::raw_sql(&format!(
        "INSERT INTO {t} (topic, payload) SELECT 't', 'x' FROM generate_series(1, 500);
         DELETE FROM {t};"
    ))
    .execute(&mut *conn)
    .await
    .expect("insert and delete 500 rows");
    sqlx::raw_sql("SELECT pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await
        .expect("flush statistics");
    drop(conn);
    let state = wait_for_vacuum_state(&h, |v| v.dead_rows >= 500).await;
    assert!(!state.autovacuum, "the table's option is read: {state:?}");
    // the relay's holdups sample carries it into `postbox_unvacuumed_rows`
    let holdups = h.store.holdups().await.expect("holdups");
    assert!(
        holdups.unvacuumed_rows.is_some_and(|n| n >= 500),
        "{holdups:?}"
    );

    sqlx::raw_sql(&format!("VACUUM {t}"))
        .execute(&h.app)
        .await
        .expect("vacuum");
    let state = wait_for_vacuum_state(&h, |v| v.since_vacuum.is_some()).await;
    assert_eq!(state.dead_rows, 0, "{state:?}");
    assert!(
        state
            .since_vacuum
            .is_some_and(|d| d < Duration::from_secs(60)),
        "{state:?}"
    );
}

/// Polls `vacuum_state` until `ok` holds (statistics reach the server's
/// views asynchronously); fails after 20 s with the last state seen.
async fn wait_for_vacuum_state(
    h: &PgHarness,
    ok: impl Fn(&postbox_postgres::VacuumState) -> bool,
) -> postbox_postgres::VacuumState {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let state = h.store.vacuum_state().await.expect("vacuum state");
        if ok(&state) {
            return state;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "statistics never showed the expected state: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
