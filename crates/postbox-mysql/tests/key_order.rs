//! The per-key promise on MySQL, tested with producers whose transactions
//! interleave on the same key (see README.md, "Order per key").

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{MySqlHarness, harness};
use postbox_core::{
    CancellationToken, ClaimRequest, Completion, Disposition, Filter, NewMessage, Relay, Store,
};
use postbox_testkit::TestPublisher;
use sqlx::MySqlPool;

fn msg(key: Option<&str>, body: &str) -> NewMessage {
    let m = NewMessage::new("orders", body.as_bytes().to_vec());
    match key {
        Some(k) => m.key(k),
        None => m,
    }
}

fn lease() -> ClaimRequest {
    ClaimRequest::new(100, Duration::from_secs(30))
}

async fn connection_id(conn: &mut sqlx::MySqlConnection) -> u64 {
    sqlx::query_scalar("SELECT CONNECTION_ID()")
        .fetch_one(conn)
        .await
        .expect("connection id")
}

/// Polls until connection `id` is stuck in the trigger's statement on the
/// key lock table (it waits there for the key's lock). InnoDB's own
/// `INNODB_TRX` view is a cache that MariaDB may leave stale, so the process
/// list is the signal; the callers then check that the waiter has not finished.
async fn wait_until_lock_wait(pool: &MySqlPool, id: u64, waiter: &tokio::task::JoinHandle<()>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
             WHERE ID = ? AND INFO LIKE '%key_locks%'",
        )
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("processlist");
        if waiting > 0 {
            return;
        }
        assert!(
            !waiter.is_finished(),
            "connection {id} finished without waiting for the key lock"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "connection {id} never waited for the key lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Claims one message at a time, marking each sent, until nothing is left.
async fn drain_bodies(h: &MySqlHarness) -> Vec<String> {
    let store = h.store.clone();
    let mut out = Vec::new();
    for _ in 0..1000 {
        let c = store.claim(&lease()).await.expect("claim");
        assert!(c.malformed.is_empty(), "{:?}", c.malformed);
        if c.messages.is_empty() {
            break;
        }
        let done: Vec<_> = c
            .messages
            .iter()
            .map(|m| Completion::new(m.seq, Disposition::Sent))
            .collect();
        out.extend(
            c.messages
                .iter()
                .map(|m| String::from_utf8_lossy(&m.payload).into_owned()),
        );
        store
            .complete(c.lease.token, &done)
            .await
            .expect("complete");
    }
    out
}

/// The hazard of the issue: T1 enqueues K and stays open; T2 enqueues K and
/// wants to commit first. T2 waits for T1, and is published after it. Other
/// keys and keyless messages are not held up by T1 meanwhile.
async fn second_writer_waits(plain_sql_second: bool) {
    let h = harness().await;
    let mut t1 = h.pool().begin().await.expect("begin t1");
    h.outbox()
        .enqueue(&mut *t1, &msg(Some("K"), "t1"))
        .await
        .expect("t1 enqueue");

    let (tx_id, rx_id) = tokio::sync::oneshot::channel();
    let pool = h.pool().clone();
    let outbox = h.outbox().clone();
    let t2 = tokio::spawn(async move {
        let mut t2 = pool.begin().await.expect("begin t2");
        let _ = tx_id.send(connection_id(&mut t2).await);
        if plain_sql_second {
            sqlx::query(&format!(
                "INSERT INTO `{}` (`topic`, `key`, `payload`) VALUES ('orders', 'K', 't2')",
                outbox.table()
            ))
            .execute(&mut *t2)
            .await
            .expect("t2 plain insert");
        } else {
            outbox
                .enqueue(&mut *t2, &msg(Some("K"), "t2"))
                .await
                .expect("t2 enqueue");
        }
        t2.commit().await.expect("t2 commit");
    });
    let t2_conn = rx_id.await.expect("t2 connection id");
    wait_until_lock_wait(h.pool(), t2_conn, &t2).await;
    assert!(
        !t2.is_finished(),
        "t2 got past the key lock while t1 is open"
    );

    // a long producer transaction on K holds up neither other keys nor keyless work
    h.enqueue_via(false, &[msg(Some("L"), "l"), msg(None, "free")], true)
        .await;
    let c = h.store.claim(&lease()).await.expect("claim");
    let mut got: Vec<_> = c
        .messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    got.sort();
    assert_eq!(got, ["free", "l"]);
    let done: Vec<_> = c
        .messages
        .iter()
        .map(|m| Completion::new(m.seq, Disposition::Sent))
        .collect();
    h.store
        .complete(c.lease.token, &done)
        .await
        .expect("complete");

    t1.commit().await.expect("t1 commit");
    t2.await.expect("t2 task");
    assert_eq!(drain_bodies(&h).await, ["t1", "t2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_enqueue_of_a_key_waits_for_the_first_to_commit() {
    second_writer_waits(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_sql_insert_of_a_key_waits_for_the_first_to_commit() {
    second_writer_waits(true).await;
}

/// A waiting producer goes on when the holder rolls back, and its message is
/// then the head of the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_producer_proceeds_after_rollback() {
    let h = harness().await;
    h.enqueue_via(false, &[msg(Some("K"), "before")], true)
        .await;
    let mut t1 = h.pool().begin().await.expect("begin");
    h.outbox()
        .enqueue(&mut *t1, &msg(Some("K"), "ghost"))
        .await
        .expect("enqueue");
    let (tx_id, rx_id) = tokio::sync::oneshot::channel();
    let pool = h.pool().clone();
    let outbox = h.outbox().clone();
    let t2 = tokio::spawn(async move {
        let mut t2 = pool.begin().await.expect("begin");
        let _ = tx_id.send(connection_id(&mut t2).await);
        outbox
            .enqueue(&mut *t2, &msg(Some("K"), "after"))
            .await
            .expect("enqueue");
        t2.commit().await.expect("commit");
    });
    wait_until_lock_wait(h.pool(), rx_id.await.expect("id"), &t2).await;
    t1.rollback().await.expect("rollback");
    t2.await.expect("t2");
    assert_eq!(drain_bodies(&h).await, ["before", "after"]);
}

/// Many producers interleave transactions on three keys (some through
/// `enqueue`, some with plain SQL, some rolling back, each holding its
/// transaction open a little) while two relays publish concurrently. For each
/// key, the published order is the commit order.
///
/// The commit order is observed from outside: a producer stamps a global
/// counter right after its insert of K returned. A later producer of K gets
/// past its insert only after the earlier one committed, and the earlier one
/// stamped before committing, so per key the stamps order the commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_producers_publish_in_commit_order() {
    let h = harness().await;
    let keys = ["a", "b", "c"];
    let producers = 8;
    let per_producer = 20;
    let stamp = Arc::new(AtomicU64::new(0));
    let committed: Arc<Mutex<Vec<(String, String, u64)>>> = Arc::default();

    let publisher = TestPublisher::recording();
    let shutdown = CancellationToken::new();
    let mut relays = Vec::new();
    for _ in 0..2 {
        let relay = Relay::builder(h.store.clone(), publisher.clone())
            .batch_size(5)
            .poll_interval(Duration::from_millis(2))
            .build()
            .expect("relay");
        let sd = shutdown.clone();
        relays.push(tokio::spawn(async move { relay.run(sd).await }));
    }

    let mut tasks = Vec::new();
    for p in 0..producers {
        let pool = h.pool().clone();
        let outbox = h.outbox().clone();
        let stamp = stamp.clone();
        let committed = committed.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_producer {
                let key = keys[fastrand::usize(..keys.len())];
                let body = format!("{key}/{p}/{i}");
                let mut tx = pool.begin().await.expect("begin");
                if fastrand::bool() {
                    outbox
                        .enqueue(&mut *tx, &msg(None, &format!("free/{p}/{i}")))
                        .await
                        .expect("keyless");
                }
                if p % 2 == 0 {
                    outbox
                        .enqueue(&mut *tx, &msg(Some(key), &body))
                        .await
                        .expect("enqueue");
                } else {
                    sqlx::query(&format!(
                        "INSERT INTO `{}` (`topic`, `key`, `payload`) VALUES ('orders', ?, ?)",
                        outbox.table()
                    ))
                    .bind(key)
                    .bind(body.as_bytes())
                    .execute(&mut *tx)
                    .await
                    .expect("plain insert");
                }
                let s = stamp.fetch_add(1, Ordering::SeqCst);
                // hold the transaction open so that producers overlap
                tokio::time::sleep(Duration::from_micros(fastrand::u64(0..3000))).await;
                if fastrand::u8(..10) == 0 {
                    tx.rollback().await.expect("rollback");
                } else {
                    tx.commit().await.expect("commit");
                    committed
                        .lock()
                        .expect("lock")
                        .push((key.to_owned(), body, s));
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("producer");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = h.store.stats(&Filter::all()).await.expect("stats");
        if s.pending == 0 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    for r in relays {
        r.await.expect("relay");
    }

    let mut expected: HashMap<String, Vec<(u64, String)>> = HashMap::new();
    for (key, body, s) in committed.lock().expect("lock").iter() {
        expected
            .entry(key.clone())
            .or_default()
            .push((*s, body.clone()));
    }
    let mut published: HashMap<String, Vec<String>> = HashMap::new();
    for m in publisher.delivered() {
        if let Some(k) = &m.key {
            let body = String::from_utf8_lossy(&m.payload).into_owned();
            let seen = published.entry(k.clone()).or_default();
            if !seen.contains(&body) {
                seen.push(body);
            }
        }
    }
    for key in keys {
        let mut want = expected.remove(key).unwrap_or_default();
        want.sort();
        let want: Vec<String> = want.into_iter().map(|(_, b)| b).collect();
        let got = published.remove(key).unwrap_or_default();
        assert_eq!(got, want, "key {key}: published order is not commit order");
    }
    assert!(
        postbox_testkit::key_order_violations(&publisher.delivered()).is_empty(),
        "seq order violated"
    );
}

/// Batches lock their keys in sorted order first, so batches naming the same
/// keys in opposite orders, with transactions held open, never deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_batches_do_not_deadlock() {
    let h = harness().await;
    let mut tasks = Vec::new();
    for order in [["a", "b", "c"], ["c", "b", "a"]] {
        let pool = h.pool().clone();
        let outbox = h.outbox().clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let batch: Vec<_> = order
                    .iter()
                    .map(|k| msg(Some(k), &format!("{k}/{i}")))
                    .collect();
                let mut tx = pool.begin().await.expect("begin");
                outbox
                    .enqueue_batch(&mut *tx, &batch)
                    .await
                    .expect("enqueue_batch: deadlock?");
                tokio::time::sleep(Duration::from_micros(fastrand::u64(0..2000))).await;
                tx.commit().await.expect("commit");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let s = h.store.stats(&Filter::all()).await.expect("stats");
    assert_eq!(s.pending, 150);
}

/// Under `innodb_snapshot_isolation` (MariaDB's default from 11.6.2), a
/// REPEATABLE READ producer whose snapshot predates another producer's
/// commit of the same key fails with error 1020; that is a conflict to
/// retry, like a deadlock, not a database fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_isolation_conflicts_are_retryable() {
    use sqlx::Connection as _;
    let h = harness().await;
    let url = format!("mysql://root@{}/{}", h.addr, h.db);
    let mut a = sqlx::MySqlConnection::connect(&url).await.expect("connect");
    sqlx::raw_sql(
        "SET SESSION innodb_snapshot_isolation = ON; \
         SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    )
    .execute(&mut a)
    .await
    .expect("session settings");
    let mut ta = a.begin().await.expect("begin");
    // any read fixes the transaction's snapshot
    let _: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM `{}`", h.outbox().table()))
        .fetch_one(&mut *ta)
        .await
        .expect("read");
    h.enqueue_via(false, &[msg(Some("K"), "first")], true).await;
    let err = h
        .outbox()
        .enqueue(&mut *ta, &msg(Some("K"), "second"))
        .await
        .expect_err("the key's slot changed after the snapshot");
    assert!(
        matches!(err, postbox_core::StoreError::Unavailable(_)),
        "{err:?}"
    );
    ta.rollback().await.expect("rollback");
    // the retried transaction goes through
    h.enqueue_via(false, &[msg(Some("K"), "second")], true)
        .await;
    assert_eq!(drain_bodies(&h).await, ["first", "second"]);
}

/// A keyed row written while the ordering trigger was missing has no `kseq`:
/// it is dead-lettered naming the trigger, and does not take the place of
/// claimable rows behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_row_written_without_the_trigger_is_dead_lettered() {
    let h = harness().await;
    sqlx::query(&format!("DROP TRIGGER `{}_key_order`", h.outbox().table()))
        .execute(h.pool())
        .await
        .expect("drop trigger");
    h.enqueue_via(
        false,
        &[msg(Some("K"), "orphan"), msg(None, "keyless")],
        true,
    )
    .await;
    let one = ClaimRequest::new(1, Duration::from_secs(30));
    let c = h.store.claim(&one).await.expect("claim");
    assert!(c.messages.is_empty(), "{:?}", c.messages);
    assert_eq!(c.malformed.len(), 1, "{c:?}");
    assert!(c.malformed[0].reason.contains("trigger"), "{c:?}");
    assert_eq!(c.malformed[0].key, None, "an orphan must not park its key");
    let dead = Disposition::Dead {
        error: c.malformed[0].reason.clone(),
        park: false,
    };
    h.store
        .complete(c.lease.token, &[Completion::new(c.malformed[0].seq, dead)])
        .await
        .expect("complete");
    let c = h.store.claim(&one).await.expect("claim");
    let bodies: Vec<_> = c.messages.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(bodies, [&b"keyless"[..]]);
}
