//! Connecting, migrating, plain-SQL producers and bad input.

mod common;

use std::time::Duration;

use common::{fresh_database, harness};
use postbox_core::{ClaimRequest, Filter, ListQuery, Relay, Status, Store, StoreError};
use postbox_mysql::{MySqlOutbox, MySqlStore};
use postbox_testkit::TestPublisher;
use postbox_testkit::services::MARIADB;

fn lease() -> ClaimRequest {
    ClaimRequest::new(10, Duration::from_secs(30))
}

#[tokio::test]
async fn wrong_credentials_are_a_config_error_without_the_password() {
    let addr = MARIADB.require().await;
    let e = MySqlStore::connect(&format!("mysql://postbox_nobody:hunter2@{addr}/mysql"))
        .await
        .expect_err("login must fail");
    let text = e.to_string();
    assert!(matches!(e, StoreError::Config(_)), "{e:?}");
    assert!(text.contains("refused the login"), "{text}");
    assert!(text.contains("postbox_nobody:***@"), "{text}");
    assert!(!text.contains("hunter2"), "password leaked: {text}");
}

#[tokio::test]
async fn missing_database_is_a_config_error_naming_it() {
    let addr = MARIADB.require().await;
    let e = MySqlStore::connect(&format!("mysql://root@{addr}/postbox_no_such_db"))
        .await
        .expect_err("must fail");
    assert!(matches!(e, StoreError::Config(_)), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("postbox_no_such_db") && text.contains("create the database"),
        "{text}"
    );
}

#[tokio::test]
async fn unreachable_server_is_unavailable_naming_host_port_and_cause() {
    // a closed port on loopback: connection refused, which the pool retries
    // until its acquire timeout (10 s) and then reports only as timed out
    let port = postbox_testkit::closed_port();
    let e = MySqlStore::connect(&format!("mysql://root:s3cret@127.0.0.1:{port}/db"))
        .await
        .expect_err("must fail");
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    assert!(e.is_transient(), "{e:?}");
    let text = e.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(!text.contains("s3cret"), "password leaked: {text}");
    // the cause, named once, instead of the pool's timeout
    assert!(text.to_lowercase().contains("refused"), "{text}");
    assert_eq!(text.matches("cannot reach MySQL at").count(), 1, "{text}");
    let all = postbox_testkit::error_chain(&e);
    assert!(!all.contains("pool timed out"), "{all}");
    assert!(!all.contains("s3cret"), "password leaked: {all}");
}

#[tokio::test]
async fn bad_url_and_table_names_are_refused() {
    let e = MySqlStore::connect("mysql://root:pw@localhost:notaport/db")
        .await
        .expect_err("bad port");
    assert!(matches!(e, StoreError::Config(_)), "{e:?}");
    assert!(!e.to_string().contains(":pw@"), "{e}");
    for bad in ["a;b", "x`y", "", &"t".repeat(54)] {
        let e = MySqlOutbox::new(bad).expect_err(bad);
        assert!(matches!(e, StoreError::Config(_)), "{e:?}");
    }
    assert!(MySqlOutbox::new(&"t".repeat(53)).is_ok());
}

#[tokio::test]
async fn missing_schema_is_a_schema_error() {
    let (addr, db) = fresh_database().await;
    let store = MySqlStore::connect(&format!("mysql://root@{addr}/{db}"))
        .await
        .expect("connect");
    let e = store.claim(&lease()).await.expect_err("no table");
    assert!(matches!(e, StoreError::Schema(_)), "{e:?}");
    let admin = common::admin_pool(&addr).await;
    sqlx::raw_sql(&format!("DROP DATABASE `{db}`"))
        .execute(&admin)
        .await
        .expect("drop");
}

/// Several processes migrating at once take turns; the result is one schema
/// and one history row per migration, and migrating again changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_safe_concurrently() {
    let h = harness().await; // migrated once already (default table)
    let outbox = MySqlOutbox::new("other_outbox").expect("name");
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let pool = h.other_pool().await;
        let outbox = outbox.clone();
        tasks.push(tokio::spawn(async move { outbox.migrate(&pool).await }));
    }
    for t in tasks {
        t.await.expect("task").expect("migrate");
    }
    outbox.migrate(h.pool()).await.expect("again");
    postbox_mysql::migrate(h.pool())
        .await
        .expect("default again");
    let history: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM `other_outbox_migrations`")
        .fetch_one(h.pool())
        .await
        .expect("history");
    assert_eq!(
        history, 4,
        "migrations 1 (outbox), 2 (relays), 3 (sent_retention) and 4 (key_head), once each"
    );
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT index_name FROM information_schema.statistics \
         WHERE table_schema = DATABASE() AND table_name = 'other_outbox' ORDER BY 1",
    )
    .fetch_all(h.pool())
    .await
    .expect("indexes");
    assert_eq!(
        indexes,
        ["by_id", "claim_scan", "key_head", "PRIMARY", "sent_age"],
        "migration 4 replaced key_order with key_head"
    );
    let slots: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM `other_outbox_key_locks`")
        .fetch_one(h.pool())
        .await
        .expect("slots");
    assert_eq!(slots, 65_536);
    let store = h.store.with_outbox(outbox.clone());
    let mut tx = h.pool().begin().await.expect("begin");
    outbox
        .enqueue(&mut *tx, &postbox_core::NewMessage::new("t", "x").key("k"))
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    assert_eq!(
        store.claim(&lease()).await.expect("claim").messages.len(),
        1
    );
}

/// The contract of DESIGN.md: one plain INSERT naming only the producer's
/// columns works, and the row comes out with an id, headers and times.
#[tokio::test]
async fn plain_sql_insert_is_claimed() {
    let h = harness().await;
    sqlx::query(
        "INSERT INTO postbox_outbox (topic, `key`, payload, headers) \
         VALUES ('orders.created', 'order-42', CAST('{\"id\":42}' AS BINARY), '{\"content-type\":\"application/json\"}')",
    )
    .execute(h.pool())
    .await
    .expect("plain insert");
    sqlx::query("INSERT INTO postbox_outbox (topic, payload) VALUES ('bare', '')")
        .execute(h.pool())
        .await
        .expect("minimal insert");
    let c = h.store.claim(&lease()).await.expect("claim");
    assert!(c.malformed.is_empty(), "{:?}", c.malformed);
    assert_eq!(c.messages.len(), 2);
    let m = &c.messages[0];
    assert_eq!(m.topic, "orders.created");
    assert_eq!(m.key.as_deref(), Some("order-42"));
    assert_eq!(&m.payload[..], br#"{"id":42}"#);
    assert_eq!(
        m.headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert!(!m.id.is_nil());
    assert_ne!(m.id, c.messages[1].id);
    assert!(c.messages[1].headers.is_empty());
    let age = postbox_core::since(std::time::SystemTime::now(), m.created_at);
    assert!(age < Duration::from_secs(3600), "created_at off by {age:?}");
}

/// A row whose headers are valid JSON but not an object of strings is
/// returned as malformed, and the relay dead-letters it with the reason
/// while the rest of the batch is published.
#[tokio::test]
async fn malformed_rows_are_dead_lettered_not_fatal() {
    let h = harness().await;
    sqlx::query(
        "INSERT INTO postbox_outbox (topic, `key`, payload, headers) VALUES \
         ('t', 'k', 'bad', '[1, 2]'), ('t', NULL, 'good', '{}')",
    )
    .execute(h.pool())
    .await
    .expect("insert");
    let publisher = TestPublisher::recording();
    let relay = Relay::builder(h.store.clone(), publisher.clone())
        .build()
        .expect("relay");
    relay.tick().await.expect("tick");
    let delivered: Vec<_> = publisher
        .delivered()
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(delivered, ["good"]);
    let dead = h
        .store
        .list(&ListQuery::new(Some(Status::Dead), 10))
        .await
        .expect("list");
    assert_eq!(dead.len(), 1);
    let reason = dead[0].last_error.as_deref().unwrap_or_default();
    assert!(
        reason.contains("headers are not a JSON object of strings"),
        "{reason}"
    );
    assert!(dead[0].parked, "a malformed keyed row parks its key");
    let s = h.store.stats(&Filter::all()).await.expect("stats");
    assert_eq!((s.dead, s.pending), (1, 0));
}

/// An application that migrates at start-up under a user with only DML
/// rights (the owner migrated first) finds nothing to do. Fails if
/// `migrate` runs `CREATE TABLE IF NOT EXISTS` when every version is
/// applied: MySQL checks the CREATE privilege before it sees the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_up_to_date_table_migrates_without_create_privileges() {
    let h = harness().await; // migrated by root
    let user = format!("pb_app_{:08x}", fastrand::u32(..));
    let admin = common::admin_pool(&h.addr).await;
    for host in ["%", "localhost"] {
        sqlx::raw_sql(&format!(
            "CREATE USER '{user}'@'{host}' IDENTIFIED BY 'pw';
             GRANT SELECT, INSERT, UPDATE, DELETE, EXECUTE ON `{db}`.* TO '{user}'@'{host}';",
            db = h.db
        ))
        .execute(&admin)
        .await
        .expect("an application user");
    }
    let app = sqlx::MySqlPool::connect(&format!("mysql://{user}:pw@{}/{}", h.addr, h.db))
        .await
        .expect("connect as the application user");
    let migrated = postbox_mysql::migrate(&app).await;
    app.close().await;
    for host in ["%", "localhost"] {
        sqlx::raw_sql(&format!("DROP USER '{user}'@'{host}'"))
            .execute(&admin)
            .await
            .expect("drop the user");
    }
    migrated.expect("an up-to-date table needs no privilege to migrate");
}

/// Puts the default table back to schema version 2: migration 3 then adds
/// its index again, and migration 4 finds nothing to do.
async fn back_to_version_2(h: &common::MySqlHarness) {
    sqlx::raw_sql(
        "ALTER TABLE postbox_outbox DROP INDEX `sent_age`; \
         DELETE FROM postbox_outbox_migrations WHERE `version` >= 3",
    )
    .execute(h.pool())
    .await
    .expect("back to version 2");
}

/// A migration's `ALTER TABLE` waits a bounded time for the table's
/// metadata lock, held by a transaction that read the table, then gives up
/// with a retryable error (after trying again a few times), instead of
/// waiting the server's default (a day) with every producer queued behind
/// it. A producer that queued behind it goes on when it gives up; once the
/// transaction ended, migrating again works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_blocked_by_an_open_transaction_gives_up_and_lets_producers_through() {
    let h = harness().await;
    back_to_version_2(&h).await;
    let mut reader = h.pool().begin().await.expect("begin");
    sqlx::query("SELECT COUNT(*) FROM postbox_outbox")
        .fetch_one(&mut *reader)
        .await
        .expect("read the table: holds its metadata lock");

    let pool = h.pool().clone();
    let migrating = tokio::spawn(async move { postbox_mysql::migrate(&pool).await });
    common::wait_for_metadata_lock_waits(h.pool(), &h.db, 1).await;
    let pool = h.pool().clone();
    let producer = tokio::spawn(async move {
        postbox_mysql::enqueue(&pool, &postbox_core::NewMessage::new("t", "x")).await
    });
    tokio::time::timeout(Duration::from_secs(60), producer)
        .await
        .expect("the producer did not wait for the migration for long")
        .expect("producer task")
        .expect("enqueue");
    let e = tokio::time::timeout(Duration::from_secs(120), migrating)
        .await
        .expect("the migration gave up waiting for the lock")
        .expect("migrate task")
        .expect_err("the open transaction kept the migration from its lock");
    assert!(e.is_transient(), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("migration 3 (sent_retention)") && text.contains("run migrate again"),
        "{text}"
    );

    reader.commit().await.expect("commit");
    postbox_mysql::migrate(h.pool())
        .await
        .expect("migrates once the transaction ended");
    let history: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM postbox_outbox_migrations")
        .fetch_one(h.pool())
        .await
        .expect("history");
    assert_eq!(history, 4);
    // the session's own lock_wait_timeout is back
    let mut conn = h.pool().acquire().await.expect("connection");
    let defaults: (u64, u64) =
        sqlx::query_as("SELECT @@SESSION.lock_wait_timeout, @@GLOBAL.lock_wait_timeout")
            .fetch_one(&mut *conn)
            .await
            .expect("lock_wait_timeout");
    assert_eq!(defaults.0, defaults.1);
}

/// A `migrate` dropped while it holds the migration lock (here: waiting
/// for a metadata lock) closes its connection, which ends the session and
/// its `GET_LOCK`, instead of handing the pool a session that still holds
/// the lock and keeps every other migrator out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_migration_releases_the_migration_lock() {
    let h = harness().await;
    back_to_version_2(&h).await;
    let mut reader = h.pool().begin().await.expect("begin");
    sqlx::query("SELECT COUNT(*) FROM postbox_outbox")
        .fetch_one(&mut *reader)
        .await
        .expect("read the table: holds its metadata lock");
    let pool = h.pool().clone();
    let migrating = tokio::spawn(async move { postbox_mysql::migrate(&pool).await });
    common::wait_for_metadata_lock_waits(h.pool(), &h.db, 1).await;
    migrating.abort();
    let _ = migrating.await;
    reader.commit().await.expect("commit");
    // another process takes the lock within its wait (120 s) and migrates
    let other = h.other_pool().await;
    tokio::time::timeout(Duration::from_secs(100), postbox_mysql::migrate(&other))
        .await
        .expect("the migration lock was released")
        .expect("migrate");
}

/// A URL without a database leaves `DATABASE()` NULL: `migrate` says so
/// (a configuration error naming the fix), rather than blaming another
/// process for the migration lock.
#[tokio::test]
async fn migrating_without_a_database_is_a_config_error() {
    let addr = MARIADB.require().await;
    let pool = sqlx::MySqlPool::connect(&format!("mysql://root@{addr}"))
        .await
        .expect("connect");
    let e = postbox_mysql::migrate(&pool)
        .await
        .expect_err("no database to migrate in");
    assert!(matches!(e, StoreError::Config(_)), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("no database") && text.contains("root@"),
        "{text}"
    );
}

/// A write in a read-only transaction (error 1792, as on a server demoted
/// during a failover) is retryable.
#[tokio::test]
async fn writes_refused_as_read_only_are_retryable() {
    let h = harness().await;
    let mut tx = h
        .pool()
        .begin_with("START TRANSACTION READ ONLY")
        .await
        .expect("begin");
    let e = postbox_mysql::enqueue(&mut *tx, &postbox_core::NewMessage::new("t", "x"))
        .await
        .expect_err("read-only");
    assert!(e.is_transient(), "{e:?}");
}

/// `key_slot` is the slot the trigger and `enqueue_batch` lock.
#[tokio::test]
async fn key_slot_is_the_slot_the_server_computes() {
    let h = harness().await;
    for key in [
        "",
        "a",
        "order-42",
        "customer/7:ß→✓",
        "🦀 key",
        &"k".repeat(5000),
    ] {
        let server: u32 = sqlx::query_scalar("SELECT MOD(CRC32(?), 65536)")
            .bind(key)
            .fetch_one(h.pool())
            .await
            .expect("crc32");
        assert_eq!(u32::from(postbox_mysql::key_slot(key)), server, "{key:.20}");
    }
}
