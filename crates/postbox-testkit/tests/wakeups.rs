//! A relay's wait after an empty claim ends on a store notification that
//! landed while that claim was running: the claim was too early to see the
//! new rows, and the notification for them must not be lost with it (or the
//! relay sleeps a whole poll interval with work waiting).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postbox_core::{
    CancellationToken, Claim, ClaimRequest, CompleteReport, Completion, Filter, ListQuery,
    MessageRecord, NewMessage, PurgeQuery, Relay, Stats, Store, StoreError,
};
use postbox_testkit::{MemoryStore, TestPublisher};
use tokio::sync::{Notify, oneshot, watch};

/// The in-memory store with a notification channel (like PostgreSQL's
/// LISTEN) and a gate that holds a claim after it has read the store.
#[derive(Clone)]
struct Notifying {
    inner: MemoryStore,
    hint: Arc<watch::Sender<u64>>,
    gate: Arc<Mutex<Option<oneshot::Receiver<()>>>>,
    held: Arc<Notify>,
}

impl Notifying {
    fn new(inner: MemoryStore) -> Self {
        Self {
            inner,
            hint: Arc::new(watch::Sender::new(0)),
            gate: Arc::new(Mutex::new(None)),
            held: Arc::new(Notify::new()),
        }
    }

    /// The next claim reads the store, then waits for the returned sender.
    fn hold_next_claim(&self) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        *self.gate.lock().expect("gate") = Some(rx);
        tx
    }

    fn notify(&self) {
        self.hint.send_modify(|g| *g += 1);
    }
}

impl Store for Notifying {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let claim = self.inner.claim(req).await;
        let gate = self.gate.lock().expect("gate").take();
        if let Some(gate) = gate {
            self.held.notify_one();
            let _ = gate.await;
        }
        claim
    }

    async fn complete(
        &self,
        token: uuid::Uuid,
        completions: &[Completion],
    ) -> Result<CompleteReport, StoreError> {
        self.inner.complete(token, completions).await
    }

    fn notified(&self) -> impl Future<Output = ()> + Send {
        // subscribed at the call, as the trait asks
        let mut rx = self.hint.subscribe();
        async move {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    async fn stats(&self, filter: &Filter) -> Result<Stats, StoreError> {
        self.inner.stats(filter).await
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<MessageRecord>, StoreError> {
        self.inner.list(query).await
    }

    async fn replay(&self, filter: &Filter) -> Result<u64, StoreError> {
        self.inner.replay(filter).await
    }

    async fn skip(&self, filter: &Filter) -> Result<u64, StoreError> {
        self.inner.skip(filter).await
    }

    async fn purge(&self, query: &PurgeQuery) -> Result<u64, StoreError> {
        self.inner.purge(query).await
    }
}

/// Real time, 1 h poll: only the notification can deliver the message in
/// the 30 s the test waits. Fails if the relay subscribes to notifications
/// only when it starts to wait (after the claim).
#[tokio::test]
async fn a_notification_during_an_empty_claim_ends_the_wait_after_it() {
    let memory = MemoryStore::new();
    let store = Notifying::new(memory.clone());
    let release = store.hold_next_claim();
    let publisher = TestPublisher::recording();
    let relay = Relay::builder(store.clone(), publisher.clone())
        .poll_interval(Duration::from_secs(3600))
        .concurrency(1)
        .build()
        .expect("relay");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let (relay, shutdown) = (relay.clone(), shutdown.clone());
        async move { relay.run(shutdown).await }
    });

    // the relay's first claim has looked (nothing there) and is held
    store.held.notified().await;
    // a producer commits and notifies before that claim returns
    memory.enqueue([NewMessage::new("t", "late")]);
    store.notify();
    release.send(()).expect("claim still held");

    let delivered = publisher.delivered_within(1, Duration::from_secs(30)).await;
    shutdown.cancel();
    let report = running.await.expect("relay task");
    assert_eq!(
        delivered.len(),
        1,
        "the notification sent during the empty claim was lost: nothing delivered in 30 s with a 1 h poll"
    );
    assert_eq!(report.sent, 1);
}
