//! A fresh MariaDB database per test, dropped when the harness is dropped.

#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use postbox_core::NewMessage;
use postbox_mysql::{MySqlOutbox, MySqlStore};
use postbox_testkit::StoreHarness;
use postbox_testkit::services::MARIADB;
use sqlx::MySqlPool;

pub struct MySqlHarness {
    pub store: MySqlStore,
    pub db: String,
    pub addr: String,
    calls: AtomicUsize,
}

/// A server-level pool (no database selected) for setup and teardown.
pub async fn admin_pool(addr: &str) -> MySqlPool {
    MySqlPool::connect(&format!("mysql://root@{addr}"))
        .await
        .expect("connect to MariaDB as root")
}

/// Creates an empty database with a random name.
pub async fn fresh_database() -> (String, String) {
    let addr = MARIADB.require().await;
    let db = format!("postbox_test_{:016x}", fastrand::u64(..));
    let admin = admin_pool(&addr).await;
    sqlx::raw_sql(&format!("CREATE DATABASE `{db}`"))
        .execute(&admin)
        .await
        .expect("create test database");
    admin.close().await;
    (addr, db)
}

/// A migrated store on a fresh database.
pub async fn harness() -> MySqlHarness {
    let (addr, db) = fresh_database().await;
    let store = MySqlStore::connect(&format!("mysql://root@{addr}/{db}"))
        .await
        .expect("connect store");
    postbox_mysql::migrate(store.pool()).await.expect("migrate");
    MySqlHarness {
        store,
        db,
        addr,
        calls: AtomicUsize::new(0),
    }
}

/// Polls until at least `n` sessions on database `db` wait for a table's
/// metadata lock (queued behind DDL, or DDL queued behind a transaction).
pub async fn wait_for_metadata_lock_waits(pool: &MySqlPool, db: &str, n: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
             WHERE DB = ? AND STATE = 'Waiting for table metadata lock'",
        )
        .bind(db)
        .fetch_one(pool)
        .await
        .expect("processlist");
        if waiting >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} sessions never waited for a metadata lock ({waiting} did)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl MySqlHarness {
    pub fn pool(&self) -> &MySqlPool {
        self.store.pool()
    }

    pub fn outbox(&self) -> &MySqlOutbox {
        self.store.outbox()
    }

    /// A new pool on the test database (its own connections).
    pub async fn other_pool(&self) -> MySqlPool {
        MySqlPool::connect(&format!("mysql://root@{}/{}", self.addr, self.db))
            .await
            .expect("connect")
    }

    pub async fn enqueue_via(&self, use_batch: bool, msgs: &[NewMessage], commit: bool) {
        let mut tx = self.pool().begin().await.expect("begin");
        if use_batch {
            self.outbox()
                .enqueue_batch(&mut *tx, msgs)
                .await
                .expect("enqueue_batch");
        } else {
            for m in msgs {
                self.outbox().enqueue(&mut *tx, m).await.expect("enqueue");
            }
        }
        if commit {
            tx.commit().await.expect("commit");
        } else {
            tx.rollback().await.expect("rollback");
        }
    }
}

impl StoreHarness for MySqlHarness {
    type Store = MySqlStore;

    fn store(&self) -> MySqlStore {
        self.store.clone()
    }

    async fn enqueue(&self, msgs: Vec<NewMessage>) {
        // alternate between one enqueue per message and enqueue_batch so the
        // suite runs through both
        let batch = self.calls.fetch_add(1, Ordering::Relaxed) % 2 == 1;
        self.enqueue_via(batch, &msgs, true).await;
    }

    async fn enqueue_rolled_back(&self, msgs: Vec<NewMessage>) {
        let batch = self.calls.fetch_add(1, Ordering::Relaxed) % 2 == 1;
        self.enqueue_via(batch, &msgs, false).await;
    }

    async fn advance(&self, by: Duration) {
        let us = i64::try_from(by.as_micros()).expect("duration");
        sqlx::query(&format!(
            "UPDATE `{}` SET \
               `available_at` = TIMESTAMPADD(MICROSECOND, -?, `available_at`), \
               `created_at` = TIMESTAMPADD(MICROSECOND, -?, `created_at`), \
               `lease_until` = TIMESTAMPADD(MICROSECOND, -?, `lease_until`), \
               `sent_at` = TIMESTAMPADD(MICROSECOND, -?, `sent_at`)",
            self.outbox().table()
        ))
        .bind(us)
        .bind(us)
        .bind(us)
        .bind(us)
        .execute(self.pool())
        .await
        .expect("advance");
        // heartbeats are stamped on the database clock too
        sqlx::query(&format!(
            "UPDATE `{}_relays` SET `last_heartbeat` = TIMESTAMPADD(MICROSECOND, -?, `last_heartbeat`)",
            self.outbox().table()
        ))
        .bind(us)
        .execute(self.pool())
        .await
        .expect("advance heartbeats");
    }

    fn retaining_store(&self, keep: Duration) -> MySqlStore {
        self.store.clone().retain_sent(Some(keep))
    }
}

impl Drop for MySqlHarness {
    fn drop(&mut self) {
        let addr = self.addr.clone();
        let db = self.db.clone();
        // Dropping happens outside any runtime we may block on: do it on a
        // thread of its own with a small runtime, and wait for it.
        let dropper = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let admin = admin_pool(&addr).await;
                sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS `{db}`"))
                    .execute(&admin)
                    .await
                    .expect("drop test database");
            });
        });
        let _ = dropper.join();
    }
}
