//! The SQLite store passes the store conformance suite, each test on its own
//! database file.

use std::time::Duration;

use postbox_core::NewMessage;
use postbox_sqlite::SqliteStore;
use postbox_testkit::StoreHarness;

mod common;

struct Sqlite {
    store: SqliteStore,
    _dir: tempfile::TempDir,
}

impl StoreHarness for Sqlite {
    type Store = SqliteStore;

    fn store(&self) -> SqliteStore {
        self.store.clone()
    }

    async fn enqueue(&self, msgs: Vec<NewMessage>) {
        let mut tx = self.store.pool().begin().await.expect("begin");
        postbox_sqlite::enqueue_batch(&mut *tx, &msgs)
            .await
            .expect("enqueue");
        tx.commit().await.expect("commit");
    }

    async fn enqueue_rolled_back(&self, msgs: Vec<NewMessage>) {
        let mut tx = self.store.pool().begin().await.expect("begin");
        for m in &msgs {
            postbox_sqlite::enqueue(&mut *tx, m).await.expect("enqueue");
        }
        tx.rollback().await.expect("rollback");
    }

    async fn advance(&self, by: Duration) {
        self.store.shift_time_back(by).await.expect("shift time");
    }

    fn retaining_store(&self, keep: Duration) -> SqliteStore {
        self.store.clone().retain_sent(Some(keep))
    }
}

async fn harness() -> Sqlite {
    let (dir, store) = common::open().await;
    Sqlite { store, _dir: dir }
}

postbox_testkit::store_conformance_tests!(harness);
