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

    fn retaining_store(&self, keep: Duration) -> MemoryStore {
        self.0.clone().retain_sent(Some(keep))
    }
}

async fn harness() -> Memory {
    Memory(MemoryStore::new())
}

postbox_testkit::store_conformance_tests!(harness);

/// A store that implements only the required methods, so the `Store`
/// trait's default `stats_by` (paging through `list`) is what runs.
#[derive(Clone)]
struct RequiredOnly(MemoryStore);

impl postbox_core::Store for RequiredOnly {
    async fn claim(
        &self,
        req: &postbox_core::ClaimRequest,
    ) -> Result<postbox_core::Claim, postbox_core::StoreError> {
        self.0.claim(req).await
    }

    async fn complete(
        &self,
        token: uuid::Uuid,
        completions: &[postbox_core::Completion],
    ) -> Result<postbox_core::CompleteReport, postbox_core::StoreError> {
        self.0.complete(token, completions).await
    }

    async fn stats(
        &self,
        filter: &postbox_core::Filter,
    ) -> Result<postbox_core::Stats, postbox_core::StoreError> {
        self.0.stats(filter).await
    }

    async fn list(
        &self,
        query: &postbox_core::ListQuery,
    ) -> Result<Vec<postbox_core::MessageRecord>, postbox_core::StoreError> {
        self.0.list(query).await
    }

    async fn replay(&self, filter: &postbox_core::Filter) -> Result<u64, postbox_core::StoreError> {
        self.0.replay(filter).await
    }

    async fn skip(&self, filter: &postbox_core::Filter) -> Result<u64, postbox_core::StoreError> {
        self.0.skip(filter).await
    }

    async fn purge(
        &self,
        query: &postbox_core::PurgeQuery,
    ) -> Result<u64, postbox_core::StoreError> {
        self.0.purge(query).await
    }
}

struct RequiredOnlyHarness(Memory);

impl StoreHarness for RequiredOnlyHarness {
    type Store = RequiredOnly;

    fn store(&self) -> RequiredOnly {
        RequiredOnly(self.0.store())
    }

    async fn enqueue(&self, msgs: Vec<NewMessage>) {
        self.0.enqueue(msgs).await;
    }

    async fn enqueue_rolled_back(&self, msgs: Vec<NewMessage>) {
        self.0.enqueue_rolled_back(msgs).await;
    }

    async fn advance(&self, by: Duration) {
        self.0.advance(by).await;
    }

    fn retaining_store(&self, keep: Duration) -> RequiredOnly {
        RequiredOnly(self.0.retaining_store(keep))
    }
}

#[tokio::test]
async fn default_stats_by_counts_what_list_returns() {
    postbox_testkit::store_suite::stats_break_down_by_topic_and_tenant(RequiredOnlyHarness(
        harness().await,
    ))
    .await;
}

#[tokio::test]
async fn default_heartbeats_record_nothing() {
    use postbox_core::{RelayHeartbeat, Store};
    let store = RequiredOnly(MemoryStore::new());
    let id = uuid::Uuid::now_v7();
    let beat = RelayHeartbeat::new(
        id,
        "h",
        1,
        "0",
        std::time::SystemTime::now(),
        Duration::from_secs(5),
    );
    store.heartbeat(&beat).await.expect("heartbeat");
    assert!(store.relays().await.expect("relays").is_empty());
    assert!(!store.remove_relay(id).await.expect("remove"));
}
