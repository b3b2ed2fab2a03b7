//! After a crash of the database server, keyed rows wait one lease length
//! (a claim the crash forgot may still be publishing their head), keyless
//! ones do not; a clean restart holds nothing back. On a throwaway cluster:
//! the shared server is never restarted.

use std::time::Duration;

use postbox_core::{ClaimRequest, Completion, Disposition, NewMessage, Store};
use postbox_postgres::PgStore;
use postbox_testkit::PgCluster;

/// Claims, records everything claimed as sent, returns the bodies.
async fn claim_bodies(store: &PgStore, lease: Duration) -> Vec<String> {
    let c = store
        .claim(&ClaimRequest::new(10, lease))
        .await
        .expect("claim");
    let sent: Vec<_> = c
        .messages
        .iter()
        .map(|m| Completion::new(m.seq, Disposition::Sent))
        .collect();
    store
        .complete(c.lease.token, &sent)
        .await
        .expect("complete");
    c.messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect()
}

async fn connect(cluster: &PgCluster) -> PgStore {
    // right after a restart the server may still refuse connections
    for _ in 0..100 {
        if let Ok(s) = PgStore::connect(&cluster.url("postgres")).await {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the throwaway cluster at {} did not come back",
        cluster.addr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_rows_wait_one_lease_after_a_crash_but_not_after_a_clean_restart() {
    let cluster = PgCluster::start();
    let started = tokio::time::Instant::now();
    let store = connect(&cluster).await;
    store.migrate().await.expect("migrate");
    // A new cluster's statistics start at its first start, as after a crash:
    // keyed claims with a lease longer than the cluster's age would wait.
    let short = Duration::from_secs(3);
    let long = Duration::from_secs(3600);

    // a clean restart: keyed rows are claimable at once
    postbox_postgres::enqueue_batch(
        store.pool(),
        &[
            NewMessage::new("t", "k1").key("k"),
            NewMessage::new("t", "free1"),
        ],
    )
    .await
    .expect("enqueue");
    drop(store);
    cluster.restart();
    let store = connect(&cluster).await;
    tokio::time::sleep_until(started + short).await;
    assert_eq!(claim_bodies(&store, short).await, ["k1", "free1"]);

    // a crash: keyless rows go on, keyed rows wait for the lease to pass
    postbox_postgres::enqueue_batch(
        store.pool(),
        &[
            NewMessage::new("t", "l1").key("l"),
            NewMessage::new("t", "free2"),
        ],
    )
    .await
    .expect("enqueue");
    // flush the enqueue (a producer's commit is synchronous anyway)
    sqlx::query("CHECKPOINT")
        .execute(store.pool())
        .await
        .expect("checkpoint");
    drop(store);
    cluster.crash_restart();
    let store = connect(&cluster).await;
    assert_eq!(
        claim_bodies(&store, long).await,
        ["free2"],
        "keyed rows claimed less than one lease after crash recovery"
    );
    // a relay with a lease that has already passed since the recovery
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(claim_bodies(&store, Duration::from_millis(1)).await, ["l1"]);
}
