//! The in-memory store passes the store conformance suite.

use std::time::Duration;

use postbox_core::NewMessage;
use postbox_testkit::{MemoryStore, StoreHarness};

struct Memory(MemoryStore);

impl StoreHarness for Memory {
    type Store = MemoryStore;

    fn store(&self) -> MemoryStore {
        self.0.clone()
    }

    async fn enqueue(&self, msgs: Vec<NewMessage>) {
        self.0.enqueue(msgs);
    }

    async fn enqueue_rolled_back(&self, msgs: Vec<NewMessage>) {
        let mut tx = self.0.begin();
        for m in msgs {
            tx.enqueue(m);
        }
        drop(tx);
    }

    async fn advance(&self, by: Duration) {
        self.0.advance(by);
    }
}

async fn harness() -> Memory {
    Memory(MemoryStore::new())
}

postbox_testkit::store_conformance_tests!(harness);
