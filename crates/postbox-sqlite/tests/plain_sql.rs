//! Rows written by plain-SQL producers with values of the wrong type: SQLite
//! stores them as given, and the store dead-letters them as malformed rather
//! than let them hold their key forever or lose a setting silently.

use std::time::Duration;

use postbox_core::{ClaimRequest, Completion, Disposition, Filter, ListQuery, Status, Store};
use postbox_sqlite::SqliteStore;

#[tokio::test]
async fn mistyped_columns_are_dead_lettered_and_free_their_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("outbox.db").display());
    let store = SqliteStore::connect(&url).await.expect("connect");
    postbox_sqlite::migrate(store.pool())
        .await
        .expect("migrate");
    sqlx::raw_sql(
        "INSERT INTO postbox_outbox (id, topic, key, payload, available_at) \
           VALUES (randomblob(16), 't', 'K', x'61', '2024-05-01T00:00:00Z'); \
         INSERT INTO postbox_outbox (id, topic, key, payload) \
           VALUES (randomblob(16), 't', 'K', x'62'); \
         INSERT INTO postbox_outbox (id, topic, key, payload, max_attempts) \
           VALUES (randomblob(16), 't', 'M', x'63', 'lots');",
    )
    .execute(store.pool())
    .await
    .expect("plain SQL inserts");

    let req = ClaimRequest::new(10, Duration::from_secs(30));
    let c = store.claim(&req).await.expect("claim");
    assert!(c.messages.is_empty(), "{:?}", c.messages);
    let reasons: Vec<(i64, &str)> = c
        .malformed
        .iter()
        .map(|m| (m.seq, m.reason.as_str()))
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].1.contains("available_at"), "{reasons:?}");
    assert!(reasons[1].1.contains("max_attempts"), "{reasons:?}");
    let dead: Vec<_> = c
        .malformed
        .iter()
        .map(|m| {
            Completion::new(
                m.seq,
                Disposition::Dead {
                    error: m.reason.clone(),
                    park: false,
                },
            )
        })
        .collect();
    store
        .complete(c.lease.token, &dead)
        .await
        .expect("complete");

    let c = store.claim(&req).await.expect("claim");
    let bodies: Vec<_> = c.messages.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(bodies, [&b"b"[..]], "{c:?}");

    // the dead rows still list, so they can be replayed, skipped or purged
    let dead = store
        .list(&ListQuery::new(Some(Status::Dead), 10))
        .await
        .expect("list");
    assert_eq!(dead.len(), 2, "{dead:?}");

    // replayed, both are delivered: `available_at` becomes now and a
    // `max_attempts` that is not an integer the relay's limit
    let replayed = store.replay(&Filter::default()).await.expect("replay");
    assert_eq!(replayed, 2);
    store
        .complete(
            c.lease.token,
            &[Completion::new(c.messages[0].seq, Disposition::Sent)],
        )
        .await
        .expect("complete");
    let c = store.claim(&req).await.expect("claim");
    assert!(c.malformed.is_empty(), "{:?}", c.malformed);
    let bodies: Vec<_> = c.messages.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(bodies, [&b"a"[..], &b"c"[..]], "{c:?}");
    assert_eq!(c.messages[1].max_attempts, None, "{c:?}");
}

/// A database another process keeps locked past the busy timeout is
/// `Unavailable` (retried by the relay), not a configuration error.
#[tokio::test]
async fn a_database_locked_at_start_is_unavailable_not_misconfigured() {
    use sqlx::Connection as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox.db");
    // a rollback-journal database held in a read transaction: switching it
    // to WAL, as `connect` does, needs the lock that reader holds
    let mut other =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .expect("open");
    sqlx::raw_sql("CREATE TABLE t (x); BEGIN; SELECT * FROM t;")
        .execute(&mut other)
        .await
        .expect("hold a read lock");
    let Err(err) = SqliteStore::connect(&format!("sqlite://{}", path.display())).await else {
        panic!("connected to a locked database");
    };
    assert!(
        matches!(err, postbox_core::StoreError::Unavailable(_)),
        "{err:?}"
    );
    sqlx::raw_sql("COMMIT")
        .execute(&mut other)
        .await
        .expect("commit");
}
