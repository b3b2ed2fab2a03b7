//! Rows written by plain-SQL producers with values of the wrong type: SQLite
//! stores them as given, and the store dead-letters them as malformed rather
//! than let them hold their key forever or lose a setting silently.

use std::time::Duration;

use postbox_core::{
    ClaimRequest, Completion, Disposition, Filter, GroupBy, ListQuery, Status, Store,
};
use postbox_sqlite::SqliteStore;

mod common;
use common::open;

#[tokio::test]
async fn mistyped_columns_are_dead_lettered_and_free_their_key() {
    let (_dir, store) = open().await;
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

    // replayed once "b" is sent (while it is leased, "a" would wait for
    // that lease), both are delivered: `available_at` becomes now and a
    // `max_attempts` that is not an integer the relay's limit
    store
        .complete(
            c.lease.token,
            &[Completion::new(c.messages[0].seq, Disposition::Sent)],
        )
        .await
        .expect("complete");
    let replayed = store.replay(&Filter::default()).await.expect("replay");
    assert_eq!(replayed, 2);
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

async fn plain_sql(store: &SqliteStore, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(store.pool())
        .await
        .expect("plain SQL");
}

/// Dead-letters every malformed row of `c` (without parking) and marks its
/// messages sent.
async fn settle(store: &SqliteStore, c: &postbox_core::Claim) {
    let done: Vec<_> = c
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
        .chain(
            c.messages
                .iter()
                .map(|m| Completion::new(m.seq, Disposition::Sent)),
        )
        .collect();
    store
        .complete(c.lease.token, &done)
        .await
        .expect("complete");
}

fn payloads(c: &postbox_core::Claim) -> Vec<Vec<u8>> {
    c.messages.iter().map(|m| m.payload.to_vec()).collect()
}

/// An ORM writing its own timestamp: `created_at` as text. The claim must
/// not fail (its UPDATE has already leased every row of the batch): the row
/// is dead-lettered naming the column, the rest of the batch goes out.
#[tokio::test]
async fn a_text_created_at_is_dead_lettered_and_the_batch_delivered() {
    let (_dir, store) = open().await;
    plain_sql(
        &store,
        "INSERT INTO postbox_outbox (topic, key, payload, created_at) \
           VALUES ('t', 'K', 'bad', CURRENT_TIMESTAMP)",
    )
    .await;
    // the only pending row has a text created_at: its age is unknown
    let stats = store.stats(&Filter::default()).await.expect("stats");
    assert_eq!(stats.pending, 1, "{stats:?}");
    assert_eq!(stats.oldest_pending_at, None, "{stats:?}");
    plain_sql(
        &store,
        "INSERT INTO postbox_outbox (topic, key, payload) VALUES ('t', 'K', 'later'); \
         INSERT INTO postbox_outbox (topic, payload) VALUES ('t', 'good');",
    )
    .await;
    let listed = store.list(&ListQuery::new(None, 10)).await.expect("list");
    assert_eq!(listed.len(), 3, "{listed:?}");

    let req = ClaimRequest::new(10, Duration::from_secs(30));
    let c = store.claim(&req).await.expect("claim");
    assert_eq!(payloads(&c), [b"good".to_vec()], "{c:?}");
    assert_eq!(c.malformed.len(), 1, "{c:?}");
    assert!(c.malformed[0].reason.contains("created_at"), "{c:?}");
    assert_eq!(c.malformed[0].key.as_deref(), Some("K"));
    settle(&store, &c).await;

    // the dead row freed its key, lists, and counts
    let c = store.claim(&req).await.expect("claim");
    assert_eq!(payloads(&c), [b"later".to_vec()], "{c:?}");
    settle(&store, &c).await;
    let dead = store
        .list(&ListQuery::new(Some(Status::Dead), 10))
        .await
        .expect("list dead");
    assert_eq!(dead.len(), 1, "{dead:?}");
    let stats = store.stats(&Filter::default()).await.expect("stats");
    assert_eq!((stats.pending, stats.dead), (0, 1), "{stats:?}");

    // replayed, it is delivered: created_at becomes now
    assert_eq!(store.replay(&Filter::default()).await.expect("replay"), 1);
    let c = store.claim(&req).await.expect("claim");
    assert!(c.malformed.is_empty(), "{c:?}");
    assert_eq!(payloads(&c), [b"bad".to_vec()], "{c:?}");
}

/// Python `bytes`, Go `[]byte` and Node `Buffer` bind as BLOB, which SQLite
/// never finds equal to TEXT: stored as given, a BLOB key would escape its
/// key's order and a BLOB tenant its tenant's claims.
#[tokio::test]
async fn blob_keys_tenants_and_topics_are_text() {
    let (_dir, store) = open().await;
    plain_sql(
        &store,
        "INSERT INTO postbox_outbox (topic, key, payload) VALUES ('t', 'K', 'first'); \
         INSERT INTO postbox_outbox (topic, key, payload) VALUES ('t', x'4b', 'second'); \
         INSERT INTO postbox_outbox (topic, tenant, payload) VALUES (x'74', x'41', 'third'); \
         INSERT INTO postbox_outbox (topic, key, payload) VALUES ('t', x'ff', 'not utf-8');",
    )
    .await;
    assert_eq!(
        store.pending_tenants(10).await.expect("tenants"),
        ["A".to_owned()]
    );
    let by_key = store
        .list(&ListQuery::new(None, 10).filter(Filter::default().key("K")))
        .await
        .expect("list");
    assert_eq!(by_key.len(), 2, "{by_key:?}");

    let req = ClaimRequest::new(10, Duration::from_secs(30));
    let c = store.claim(&req).await.expect("claim");
    assert_eq!(
        payloads(&c),
        [b"first".to_vec(), b"third".to_vec()],
        "one message of K at a time: {c:?}"
    );
    assert_eq!(c.messages[1].topic, "t");
    assert_eq!(c.messages[1].tenant.as_deref(), Some("A"));
    // a key that is not UTF-8 is still dead-lettered for that reason
    assert_eq!(c.malformed.len(), 1, "{c:?}");
    assert!(c.malformed[0].reason.contains("UTF-8"), "{c:?}");
    settle(&store, &c).await;

    let c = store.claim(&req).await.expect("claim");
    assert_eq!(payloads(&c), [b"second".to_vec()], "{c:?}");
    assert_eq!(c.messages[0].key.as_deref(), Some("K"));
}

/// Rows a producer wrote before migration 5 added the trigger are cast by
/// the migration itself.
#[tokio::test]
async fn the_migration_casts_blob_keys_already_stored() {
    let (_dir, store) = open().await;
    plain_sql(
        &store,
        "DROP TRIGGER postbox_outbox_text_columns; \
         DELETE FROM postbox_outbox_migrations WHERE version = 5; \
         INSERT INTO postbox_outbox (topic, key, payload) VALUES ('t', 'K', 'first'); \
         INSERT INTO postbox_outbox (topic, key, payload) VALUES ('t', x'4b', 'second');",
    )
    .await;
    postbox_sqlite::migrate(store.pool())
        .await
        .expect("migrate");
    let c = store
        .claim(&ClaimRequest::new(10, Duration::from_secs(30)))
        .await
        .expect("claim");
    assert_eq!(payloads(&c), [b"first".to_vec()], "{c:?}");
}

/// A topic or tenant that is not UTF-8 dead-letters its row; `postbox
/// status` (counts by topic and tenant) and the tenant rotation must still
/// work, before and after.
#[tokio::test]
async fn non_utf8_topics_and_tenants_still_count() {
    let (_dir, store) = open().await;
    plain_sql(
        &store,
        "INSERT INTO postbox_outbox (topic, tenant, payload) \
           VALUES (CAST(x'ff74' AS TEXT), CAST(x'ff41' AS TEXT), 'x'); \
         INSERT INTO postbox_outbox (topic, tenant, payload) VALUES ('t', 'B', 'y');",
    )
    .await;
    // a tenant no claim could name (a bound string is UTF-8) is left to the
    // claims across tenants
    assert_eq!(
        store.pending_tenants(10).await.expect("tenants"),
        ["B".to_owned()]
    );
    let by = |by: GroupBy| {
        let store = store.clone();
        async move {
            let groups = store
                .stats_by(&Filter::default(), by)
                .await
                .expect("stats by");
            groups
                .into_iter()
                .map(|g| (g.group.unwrap_or_default(), g.stats.pending, g.stats.dead))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        by(GroupBy::Topic).await,
        [("t".to_owned(), 1, 0), ("\u{fffd}t".to_owned(), 1, 0)]
    );
    assert_eq!(
        by(GroupBy::Tenant).await,
        [("B".to_owned(), 1, 0), ("\u{fffd}A".to_owned(), 1, 0)]
    );
    let c = store
        .claim(&ClaimRequest::new(10, Duration::from_secs(30)))
        .await
        .expect("claim");
    assert_eq!(payloads(&c), [b"y".to_vec()], "{c:?}");
    assert_eq!(c.malformed.len(), 1, "{c:?}");
    settle(&store, &c).await;
    // and once it is dead
    assert_eq!(by(GroupBy::Topic).await, [("\u{fffd}t".to_owned(), 0, 1)]);
    assert_eq!(by(GroupBy::Tenant).await, [("\u{fffd}A".to_owned(), 0, 1)]);
}

/// A `max_attempts` no relay can count to (negative, or past `u32`) is
/// dead-lettered, as on PostgreSQL, not silently replaced by the relay's
/// limit; replayed, it takes the relay's limit.
#[tokio::test]
async fn out_of_range_max_attempts_is_dead_lettered() {
    let (_dir, store) = open().await;
    plain_sql(
        &store,
        "INSERT INTO postbox_outbox (topic, payload, max_attempts) VALUES ('t', 'a', -1); \
         INSERT INTO postbox_outbox (topic, payload, max_attempts) VALUES ('t', 'b', 4294967296); \
         INSERT INTO postbox_outbox (topic, payload, max_attempts) VALUES ('t', 'c', 4294967295);",
    )
    .await;
    let req = ClaimRequest::new(10, Duration::from_secs(30));
    let c = store.claim(&req).await.expect("claim");
    assert_eq!(payloads(&c), [b"c".to_vec()], "{c:?}");
    assert_eq!(c.messages[0].max_attempts, Some(u32::MAX));
    assert_eq!(c.malformed.len(), 2, "{c:?}");
    assert!(
        c.malformed
            .iter()
            .all(|m| m.reason.contains("max_attempts")),
        "{c:?}"
    );
    settle(&store, &c).await;
    assert_eq!(store.replay(&Filter::default()).await.expect("replay"), 2);
    let c = store.claim(&req).await.expect("claim");
    assert_eq!(payloads(&c), [b"a".to_vec(), b"b".to_vec()], "{c:?}");
    assert!(c.messages.iter().all(|m| m.max_attempts.is_none()), "{c:?}");
}

/// Producers write through `store.pool()`: with WAL, `synchronous = NORMAL`
/// would let a committed message (already published by the relay) vanish
/// with its business rows on power loss.
#[tokio::test]
async fn the_producer_pool_syncs_every_commit() {
    let (_dir, store) = open().await;
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(store.pool())
        .await
        .expect("pragma");
    assert_eq!(sync, 2, "FULL");
}
