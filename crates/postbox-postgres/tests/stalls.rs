//! A stall is reported, never silent: a long transaction in another
//! database holds back the cleanup horizon, and `horizon_holders` and the
//! relay's gauge say so, naming the session.

mod common;

use std::time::Duration;

use common::{PgHarness, TestDb};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use postbox_core::observe::HORIZON_AGE_SECONDS;
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
        sqlx::query("ROLLBACK")
            .execute(&mut long)
            .await
            .expect("end it");
    });
}
