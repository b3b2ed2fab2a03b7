//! `dead replay` and `dead purge` over many rows run as a series of short
//! write transactions: one statement over a million rows would hold
//! SQLite's only write lock past the producers' busy timeout.

use postbox_core::{Filter, ListQuery, PurgeQuery, Status, Store};
use postbox_sqlite::SqliteStore;

mod common;

/// Rows of one admin statement (the store's batch size).
const BATCH: i64 = 500;

async fn open_with_dead_rows() -> (tempfile::TempDir, SqliteStore) {
    let (dir, store) = common::open().await;
    // 1300 dead rows, every third on topic 'b'
    sqlx::raw_sql(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1300) \
         INSERT INTO postbox_outbox (topic, payload, status, last_error) \
         SELECT CASE WHEN i % 3 = 0 THEN 'b' ELSE 'a' END, 'x', 'dead', 'boom' FROM n",
    )
    .execute(store.pool())
    .await
    .expect("plain SQL inserts");
    (dir, store)
}

async fn count(store: &SqliteStore, status: Status, filter: Filter) -> usize {
    store
        .list(&ListQuery::new(Some(status), 10_000).filter(filter))
        .await
        .expect("list")
        .len()
}

/// A test trigger fails the statement that reaches row `seq`: whatever
/// earlier statements did is committed, so it shows the batches.
async fn fail_at(store: &SqliteStore, event: &str, seq: i64) {
    sqlx::raw_sql(&format!(
        "CREATE TRIGGER fail_at BEFORE {event} ON postbox_outbox WHEN OLD.seq = {seq} \
         BEGIN SELECT RAISE(ABORT, 'test stop'); END"
    ))
    .execute(store.pool())
    .await
    .expect("trigger");
}

async fn stop_failing(store: &SqliteStore) {
    sqlx::raw_sql("DROP TRIGGER fail_at")
        .execute(store.pool())
        .await
        .expect("drop trigger");
}

#[tokio::test]
async fn purge_deletes_in_batches_and_counts_them_all() {
    let (_dir, store) = open_with_dead_rows().await;
    fail_at(&store, "DELETE", BATCH + 10).await;
    let all = PurgeQuery::new(Status::Dead, Filter::default());
    store.purge(&all).await.expect_err("stopped by the trigger");
    assert_eq!(count(&store, Status::Dead, Filter::default()).await, 800);
    stop_failing(&store).await;

    // the filter holds in every batch: 267 of the 800 left are on 'b'
    let b = PurgeQuery::new(Status::Dead, Filter::default().topic("b"));
    assert_eq!(store.purge(&b).await.expect("purge b"), 267);
    assert_eq!(store.purge(&all).await.expect("purge rest"), 533);
    assert_eq!(count(&store, Status::Dead, Filter::default()).await, 0);
}

#[tokio::test]
async fn replay_updates_in_batches_and_counts_them_all() {
    let (_dir, store) = open_with_dead_rows().await;
    fail_at(&store, "UPDATE", BATCH + 10).await;
    store
        .replay(&Filter::default())
        .await
        .expect_err("stopped by the trigger");
    assert_eq!(count(&store, Status::Pending, Filter::default()).await, 500);
    stop_failing(&store).await;

    assert_eq!(
        store
            .replay(&Filter::default().topic("b"))
            .await
            .expect("replay b"),
        267
    );
    assert_eq!(store.replay(&Filter::default()).await.expect("replay"), 533);
    assert_eq!(count(&store, Status::Dead, Filter::default()).await, 0);
    assert_eq!(
        count(&store, Status::Pending, Filter::default()).await,
        1300
    );
}
