//! The store conformance suite on a real PostgreSQL server, one fresh
//! database per test.

mod common;

async fn harness() -> common::PgHarness {
    common::PgHarness::new().await
}

postbox_testkit::store_conformance_tests!(harness);

/// Stricter than the suite's `keyless_claims_run_in_parallel`, which must
/// allow MariaDB's scans to pass over a row another claim held for an
/// instant: here a claim skips only rows another claim locked, and every row
/// a claim locks it leases, so three concurrent claims of 4 take all 10
/// rows between them (in some split), none twice, each in `seq` order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_keyless_claims_take_every_row_between_them() {
    use postbox_core::{ClaimRequest, NewMessage, Store};
    let h = harness().await;
    for round in 0..5 {
        let msgs: Vec<NewMessage> = (0..10)
            .map(|i| NewMessage::new("t", format!("r{round}m{i}")))
            .collect();
        h.outbox
            .enqueue_batch(&h.app, &msgs)
            .await
            .expect("enqueue");
        let req = ClaimRequest::new(4, std::time::Duration::from_secs(30));
        let store = &h.store;
        let (a, b, c) = tokio::join!(store.claim(&req), store.claim(&req), store.claim(&req));
        let mut seqs = Vec::new();
        for claim in [a, b, c] {
            let claim = claim.expect("claim");
            let mine: Vec<i64> = claim.messages.iter().map(|m| m.seq).collect();
            assert!(
                mine.len() <= 4 && mine.windows(2).all(|w| w[0] < w[1]),
                "{mine:?}"
            );
            seqs.extend(mine);
            common::complete_all(store, &claim, postbox_core::Disposition::Sent).await;
        }
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), 10, "round {round}: every row, once");
    }
}
