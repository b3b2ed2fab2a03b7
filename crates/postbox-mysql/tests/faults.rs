//! Failures on the relay's side: connections gone silent under claims and
//! completions, claims queued behind DDL.

mod common;

use std::time::Duration;

use common::harness;
use postbox_core::{Claim, ClaimRequest, Completion, Disposition, NewMessage, Store};
use postbox_testkit::FaultProxy;
use sqlx::mysql::MySqlPoolOptions;

/// A claim or a completion the relay gives up (no answer: the connection
/// went silent) closes its connection instead of returning it to the pool,
/// where sqlx would ping it first and wait for the answer as long as the
/// kernel keeps the socket, holding the slot. With a pool of one, more cuts
/// than slots, and still a claim gets a connection within a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_and_completions_given_up_on_silent_connections_free_their_slots() {
    let h = harness().await;
    let proxy = FaultProxy::start(h.addr.clone()).await.expect("proxy");
    let pool = MySqlPoolOptions::new()
        .max_connections(1)
        .connect(&format!("mysql://root@{}/{}", proxy.addr(), h.db))
        .await
        .expect("pool through the proxy");
    // claims and completions run on a pool of the same size
    let store = h.outbox().store(pool);
    let req = ClaimRequest::new(10, Duration::from_secs(30));
    // a claim that works, retried while the pool waits for slots to free
    let claim_within_a_minute = || async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match store.claim(&req).await {
                Ok(claim) => return claim,
                Err(e) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "no connection for a claim within a minute: {e}"
                ),
            }
        }
    };
    let (mut claims_cut, mut completions_cut, mut tries) = (0, 0, 0);
    while claims_cut < 2 || completions_cut < 2 {
        h.enqueue_via(false, &[NewMessage::new("t", "x")], true)
            .await;
        let claim: Claim = claim_within_a_minute().await;
        // let the claim's connection finish going back to the pool (sqlx
        // pings it on the way): silenced during that ping, it would hold
        // its slot whatever the store does
        tokio::time::sleep(Duration::from_millis(200)).await;
        proxy.silence_open();
        // one that answers ran on a connection opened after the silence
        let answered = if claims_cut <= completions_cut {
            let answered = tokio::time::timeout(Duration::from_millis(500), store.claim(&req))
                .await
                .is_ok();
            claims_cut += usize::from(!answered);
            answered
        } else {
            let done: Vec<_> = claim
                .messages
                .iter()
                .map(|m| Completion::new(m.seq, Disposition::Sent))
                .collect();
            assert!(!done.is_empty(), "the message enqueued above was claimed");
            let answered = tokio::time::timeout(
                Duration::from_millis(500),
                store.complete(claim.lease.token, &done),
            )
            .await
            .is_ok();
            completions_cut += usize::from(!answered);
            answered
        };
        tries += 1;
        assert!(
            tries < 100,
            "claims and completions did not run on silenced connections ({answered})"
        );
    }
    claim_within_a_minute().await;
}

/// A claim or a completion queued behind DDL (a DBA's `ALTER TABLE` waiting
/// for a transaction that read the table) gives up after the relay
/// sessions' lock wait limit with a retryable error, instead of the server's
/// default (a day) or the DDL's own limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_and_completions_queued_behind_ddl_give_up() {
    let h = harness().await;
    h.enqueue_via(false, &[NewMessage::new("t", "x")], true)
        .await;
    let req = ClaimRequest::new(10, Duration::from_secs(30));
    let claim = h.store.claim(&req).await.expect("claim");
    assert_eq!(claim.messages.len(), 1);

    let mut reader = h.pool().begin().await.expect("begin");
    sqlx::query("SELECT COUNT(*) FROM postbox_outbox")
        .fetch_one(&mut *reader)
        .await
        .expect("read the table: holds its metadata lock");
    let ddl_pool = h.other_pool().await;
    // one call of raw_sql runs on one connection: the SET applies to the ALTER
    let ddl = tokio::spawn(async move {
        sqlx::raw_sql(
            "SET SESSION lock_wait_timeout = 40; \
             ALTER TABLE postbox_outbox ADD INDEX `postbox_test_ddl` (`created_at`)",
        )
        .execute(&ddl_pool)
        .await
    });
    common::wait_for_metadata_lock_waits(h.pool(), &h.db, 1).await;

    let claimed = tokio::time::timeout(Duration::from_secs(30), h.store.claim(&req))
        .await
        .expect("a claim queued behind DDL returns before the DDL gives up");
    let e = claimed.expect_err("the claim waited for the metadata lock");
    assert!(e.is_transient(), "{e:?}");
    let done = [Completion::new(claim.messages[0].seq, Disposition::Sent)];
    let completed = tokio::time::timeout(
        Duration::from_secs(30),
        h.store.complete(claim.lease.token, &done),
    )
    .await
    .expect("a completion queued behind DDL returns before the DDL gives up");
    let e = completed.expect_err("the completion waited for the metadata lock");
    assert!(e.is_transient(), "{e:?}");

    reader.commit().await.expect("commit");
    ddl.await
        .expect("ddl task")
        .expect("the DDL runs once the reader ended");
    let report = h
        .store
        .complete(claim.lease.token, &done)
        .await
        .expect("complete");
    assert_eq!(report.applied, 1);
}
