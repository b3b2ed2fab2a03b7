//! Per-key ordering under real concurrency: the advisory-lock design.

mod common;

use std::time::Duration;

use common::PgHarness;
use postbox_core::{
    CancellationToken, ClaimRequest, Disposition, Filter, ListQuery, NewMessage, Relay, Store,
};
use postbox_postgres::PgStore;
use postbox_testkit::{TestPublisher, key_order_violations};

const LEASE: Duration = Duration::from_secs(30);

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn body(m: &postbox_core::Message) -> String {
    String::from_utf8_lossy(&m.payload).into_owned()
}

/// One message for each of the keys `k0` .. `k{keys - 1}` per round, round
/// after round, with bodies `k<key>-<round>`.
async fn enqueue_rounds_of(h: &PgHarness, keys: usize, rounds: &[&str]) {
    let rows: Vec<NewMessage> = rounds
        .iter()
        .flat_map(|round| {
            (0..keys)
                .map(move |k| NewMessage::new("t", format!("k{k}-{round}")).key(format!("k{k}")))
        })
        .collect();
    h.outbox
        .enqueue_batch(&h.app, &rows)
        .await
        .expect("enqueue");
}

/// Claims with `req`: the claim, and its messages' bodies in `seq` order.
async fn claimed(store: &PgStore, req: &ClaimRequest) -> (postbox_core::Claim, Vec<String>) {
    let claim = store.claim(req).await.expect("claim");
    let bodies = claim.messages.iter().map(body).collect();
    (claim, bodies)
}

/// Enqueues `n` keyless messages with bodies `m00`, `m01`, ..., of `tenant`
/// if one is given.
async fn enqueue_numbered(h: &PgHarness, n: usize, tenant: Option<&str>) {
    let msgs: Vec<NewMessage> = (0..n)
        .map(|i| {
            let m = NewMessage::new("t", format!("m{i:02}"));
            match tenant {
                Some(t) => m.tenant(t),
                None => m,
            }
        })
        .collect();
    h.outbox
        .enqueue_batch(&h.app, &msgs)
        .await
        .expect("enqueue");
}

/// The first claim of a backlog of `enqueue_numbered` messages (a leasing
/// claim of `m00`..`m03`), completed as sent: the next claim of `req`'s
/// scope is a backlog claim.
async fn first_batch_sent(store: &PgStore, req: &ClaimRequest) {
    let first = store.claim(req).await.expect("claim");
    let bodies: Vec<String> = first.messages.iter().map(body).collect();
    assert_eq!(bodies, ["m00", "m01", "m02", "m03"]);
    common::complete_all(store, &first, Disposition::Sent).await;
}

/// The table's claim hint sequence (migration 8), quoted.
fn claim_hint_name(h: &PgHarness) -> String {
    format!(
        "\"{}\".\"{}_claim_hint\"",
        h.outbox.schema().as_str(),
        h.outbox.table().as_str()
    )
}

/// The claim hint's value, after setting it to `set` first if given (as
/// another relay's claim would).
async fn claim_hint(h: &PgHarness, set: Option<i64>) -> i64 {
    let hint = claim_hint_name(h);
    let sql = match set {
        Some(v) => format!("SELECT setval('{hint}', {v})"),
        None => format!("SELECT coalesce(pg_sequence_last_value('{hint}'), 0)"),
    };
    sqlx::query_scalar(&sql)
        .fetch_one(&h.app)
        .await
        .expect("claim hint")
}

/// Holds the outbox rows matching `condition` `FOR UPDATE` in a transaction
/// of its own, as a concurrent claim would, until it is rolled back;
/// checks that `count` rows matched.
async fn lock_rows(
    h: &PgHarness,
    condition: &str,
    count: usize,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut locker = h.app.begin().await.expect("begin");
    let locked: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT seq FROM {} WHERE {condition} ORDER BY seq FOR UPDATE",
        h.outbox.qualified_name()
    ))
    .fetch_all(&mut *locker)
    .await
    .expect("lock");
    assert_eq!(locked.len(), count, "rows locked");
    locker
}

/// Sixty keyed rows, one per key `k59`, `k58`, ... `k00` in that order, each
/// with its key as body: `seq` order is the reverse of key order, so heads
/// taken oldest first (the window) and heads taken in key order (the key
/// walk) differ.
async fn enqueue_descending_keys(h: &PgHarness) {
    let rows: Vec<NewMessage> = (0..60)
        .rev()
        .map(|k| NewMessage::new("t", format!("k{k:02}")).key(format!("k{k:02}")))
        .collect();
    h.outbox
        .enqueue_batch(&h.app, &rows)
        .await
        .expect("enqueue");
}

/// A transaction held open after enqueuing for key K makes later K
/// enqueues wait (they cannot take a lower-looking `seq`), the claim sees
/// nothing of K meanwhile while other keys flow, `blockers()` names the
/// holder, and after its commit all of K goes out in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_transaction_holds_its_key_then_all_go_out_in_order() {
    let h = PgHarness::new().await;
    let store = h.store.clone();

    let mut first = h.app.begin().await.expect("begin");
    h.outbox
        .enqueue(&mut *first, &NewMessage::new("t", "k-1").key("K"))
        .await
        .expect("enqueue");

    // A later producer of K queues behind the open transaction.
    let outbox = h.outbox.clone();
    let app = h.app.clone();
    let second = tokio::spawn(async move {
        let mut tx = app.begin().await.expect("begin");
        outbox
            .enqueue_batch(
                &mut *tx,
                &[
                    NewMessage::new("t", "k-2").key("K"),
                    NewMessage::new("t", "other-2").key("L"),
                ],
            )
            .await
            .expect("enqueue");
        tx.commit().await.expect("commit");
    });
    h.outbox
        .enqueue(&h.app, &NewMessage::new("t", "l-1").key("L0"))
        .await
        .expect("enqueue");

    // The stall is visible: one blocker, holding one key, one waiter.
    wait_until("the second producer to queue", || async {
        store
            .blockers()
            .await
            .expect("blockers")
            .iter()
            .any(|b| b.waiters == 1)
    })
    .await;
    let blockers = store.blockers().await.expect("blockers");
    // oldest first: the idle holder of K; the queued batch may show too (it
    // already holds L, taken before K in sorted order)
    assert!(!blockers.is_empty() && blockers.len() <= 2, "{blockers:?}");
    assert_eq!(
        (blockers[0].keys_held, blockers[0].waiters),
        (1, 1),
        "{blockers:?}"
    );
    assert_eq!(blockers[0].state.as_deref(), Some("idle in transaction"));
    // what a relay samples into its gauges: the same holder, with its age
    let holdups = store.holdups().await.expect("holdups");
    let holder = holdups.key_holder.expect("a key holder");
    assert_eq!(holder.pid, Some(blockers[0].pid), "{holder:?}");
    assert!(holder.description.contains("1 key(s)"), "{holder:?}");
    assert!(
        holdups.horizon.is_some(),
        "an open transaction holds the horizon"
    );

    // Other keys flow; nothing of K is claimable (k-1 is uncommitted, k-2 waits).
    let c = store
        .claim(&ClaimRequest::new(10, LEASE))
        .await
        .expect("claim");
    assert_eq!(c.messages.iter().map(body).collect::<Vec<_>>(), ["l-1"]);
    assert!(
        !second.is_finished(),
        "the second producer did not wait for the key"
    );

    first.commit().await.expect("commit");
    second.await.expect("second producer");
    assert!(store.blockers().await.expect("blockers").is_empty());

    let mut order = Vec::new();
    for _ in 0..3 {
        let c = store
            .claim(&ClaimRequest::new(10, LEASE))
            .await
            .expect("claim");
        let k: Vec<_> = c
            .messages
            .iter()
            .filter(|m| m.key.as_deref() == Some("K"))
            .cloned()
            .collect();
        assert!(k.len() <= 1, "two heads of K in one claim");
        order.extend(k.iter().map(body));
        common::complete_all(&store, &c, Disposition::Sent).await;
    }
    assert_eq!(order, ["k-1", "k-2"]);
}

/// Two batches that name the same keys in opposite orders do not deadlock:
/// `enqueue_batch` locks keys in sorted order before inserting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_with_crossed_keys_do_not_deadlock() {
    let h = PgHarness::new().await;
    let keys: Vec<String> = (0..20).map(|i| format!("key-{i}")).collect();
    let mut tasks = Vec::new();
    for round in 0..8 {
        let outbox = h.outbox.clone();
        let app = h.app.clone();
        let mut ks = keys.clone();
        if round % 2 == 1 {
            ks.reverse();
        }
        tasks.push(tokio::spawn(async move {
            for rep in 0..5 {
                let msgs: Vec<_> = ks
                    .iter()
                    .map(|k| NewMessage::new("t", format!("{round}/{rep}")).key(k.clone()))
                    .collect();
                let mut tx = app.begin().await.expect("begin");
                outbox
                    .enqueue_batch(&mut *tx, &msgs)
                    .await
                    .expect("batch (deadlock?)");
                tx.commit().await.expect("commit");
            }
        }));
    }
    for t in tasks {
        t.await.expect("producer");
    }
    let s = h.store.stats(&Filter::all()).await.expect("stats");
    assert_eq!(s.pending, 8 * 5 * 20);
}

/// Plain SQL from any client (no postbox code) is delivered with generated
/// id, seq and defaults; rolled-back plain inserts never are; per-key order
/// follows commit order across concurrent plain-SQL and `enqueue` producers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_sql_producers_are_delivered_in_commit_order() {
    let h = PgHarness::new().await;
    let t = h.outbox.qualified_name().to_owned();
    sqlx::query(&format!(
        "INSERT INTO {t} (topic, key, payload, headers)
         VALUES ('orders.created', 'order-42', convert_to('{{\"id\":42}}', 'UTF8'), '{{\"content-type\":\"application/json\"}}')"
    ))
    .execute(&h.app)
    .await
    .expect("plain insert");
    let mut tx = h.app.begin().await.expect("begin");
    sqlx::query(&format!(
        "INSERT INTO {t} (topic, key, payload) VALUES ('x', 'order-42', '\\x00')"
    ))
    .execute(&mut *tx)
    .await
    .expect("insert");
    tx.rollback().await.expect("rollback");

    // many concurrent writers on few keys, half plain SQL, half enqueue
    let mut tasks = Vec::new();
    for w in 0..8 {
        let app = h.app.clone();
        let outbox = h.outbox.clone();
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let key = format!("k{}", (w + i) % 3);
                let mut tx = app.begin().await.expect("begin");
                if w % 2 == 0 {
                    sqlx::query(&format!(
                        "INSERT INTO {t} (topic, key, payload) VALUES ('c', $1, $2)"
                    ))
                    .bind(&key)
                    .bind(format!("{w}/{i}").into_bytes())
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
                } else {
                    outbox
                        .enqueue(&mut *tx, &NewMessage::new("c", format!("{w}/{i}")).key(key))
                        .await
                        .expect("enqueue");
                }
                tx.commit().await.expect("commit");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }

    let publisher = TestPublisher::recording();
    let relay = Relay::builder(h.store.clone(), publisher.clone())
        .poll_interval(Duration::from_millis(10))
        .build()
        .expect("relay");
    let shutdown = CancellationToken::new();
    let run = tokio::spawn({
        let relay = relay.clone();
        let sd = shutdown.clone();
        async move { relay.run(sd).await }
    });
    wait_until("everything delivered", || async {
        h.store.stats(&Filter::all()).await.expect("stats").pending == 0
    })
    .await;
    shutdown.cancel();
    run.await.expect("relay");

    let delivered = publisher.delivered();
    assert_eq!(delivered.len(), 1 + 8 * 25);
    let first = &delivered
        .iter()
        .find(|m| m.topic == "orders.created")
        .expect("plain message");
    assert_eq!(&first.payload[..], br#"{"id":42}"#);
    assert_eq!(
        first.headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(first.id.get_version_num(), 7, "default id is not a UUIDv7");
    assert!(
        delivered.iter().all(|m| m.topic != "x"),
        "rolled-back row delivered"
    );
    // within each key, each writer's messages keep that writer's order
    assert!(key_order_violations(&delivered).is_empty());
    for k in 0..3 {
        let key = format!("k{k}");
        let seqs: Vec<i64> = delivered
            .iter()
            .filter(|m| m.key.as_deref() == Some(&*key))
            .map(|m| m.seq)
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "key {key} not delivered in seq order: {seqs:?}"
        );
        for w in 0..8 {
            let mine: Vec<usize> = delivered
                .iter()
                .filter(|m| m.key.as_deref() == Some(&*key))
                .filter_map(|m| {
                    let b = body(m);
                    let (who, i) = b.split_once('/')?;
                    (who == w.to_string()).then(|| i.parse().ok()).flatten()
                })
                .collect();
            assert!(
                mine.windows(2).all(|p| p[0] < p[1]),
                "writer {w} reordered on {key}: {mine:?}"
            );
        }
    }
}

/// A row whose headers are not a JSON object of strings comes back as
/// malformed (the relay dead-letters it); the rest of the claim is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rows_are_reported_not_fatal() {
    let h = PgHarness::new().await;
    let t = h.outbox.qualified_name().to_owned();
    sqlx::query(&format!(
        "INSERT INTO {t} (topic, key, payload, headers) VALUES ('t', 'k', '\\x01', '{{\"n\": 1}}')"
    ))
    .execute(&h.app)
    .await
    .expect("insert");
    h.outbox
        .enqueue(&h.app, &NewMessage::new("t", "fine"))
        .await
        .expect("enqueue");
    let c = h
        .store
        .claim(&ClaimRequest::new(10, LEASE))
        .await
        .expect("claim");
    assert_eq!(c.messages.len(), 1);
    assert_eq!(c.malformed.len(), 1);
    assert_eq!(c.malformed[0].key.as_deref(), Some("k"));
    assert!(
        c.malformed[0].reason.contains("headers"),
        "{}",
        c.malformed[0].reason
    );
}

/// An empty claim means nothing is claimable. The store picks its claim
/// statement from what the previous claim saw: after a claim that found no
/// keyed row it uses the keyless statement, which cannot lease a keyed row
/// that arrives next. That claim must look again with the keyed statement
/// at once rather than come back empty, or a relay woken for the new row
/// sleeps a poll interval (a whole poll with LISTEN off and a long interval,
/// as the axum example's test showed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_keyed_row_after_keyless_ones_is_claimed_at_once() {
    let h = PgHarness::new().await;
    let store = h.store.clone();
    let req = ClaimRequest::new(10, LEASE);
    h.outbox
        .enqueue(&h.app, &NewMessage::new("t", "keyless"))
        .await
        .expect("enqueue");
    for (round, key) in ["A", "B", "C"].into_iter().enumerate() {
        // drain: the last claim of each round sees no keyed row pending
        loop {
            let claim = store.claim(&req).await.expect("claim");
            if claim.is_empty() {
                break;
            }
            common::complete_all(&store, &claim, Disposition::Sent).await;
        }
        h.outbox
            .enqueue(
                &h.app,
                &NewMessage::new("t", format!("keyed-{round}")).key(key),
            )
            .await
            .expect("enqueue");
        let claim = store.claim(&req).await.expect("claim");
        assert_eq!(
            claim.messages.iter().map(body).collect::<Vec<_>>(),
            [format!("keyed-{round}")],
            "round {round}: the keyed row is claimed by the first claim after its commit"
        );
        common::complete_all(&store, &claim, Disposition::Sent).await;
    }
}

/// `enqueue` and `enqueue_batch` take the key's lock and the `seq`
/// themselves; the plpgsql trigger runs only for plain-SQL rows (a few µs
/// per row saved). Counted by PostgreSQL's per-transaction function
/// statistics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_plain_sql_rows_go_through_the_trigger() {
    let h = PgHarness::new().await;
    let t = h.outbox.qualified_name().to_owned();
    let mut tx = h.app.begin().await.expect("begin");
    sqlx::query("SET LOCAL track_functions = 'pl'")
        .execute(&mut *tx)
        .await
        .expect("track_functions");
    h.outbox
        .enqueue(&mut *tx, &NewMessage::new("t", "a").key("K"))
        .await
        .expect("enqueue");
    h.outbox
        .enqueue(&mut *tx, &NewMessage::new("t", "b"))
        .await
        .expect("enqueue");
    h.outbox
        .enqueue_batch(
            &mut *tx,
            &[
                NewMessage::new("t", "c").key("K"),
                NewMessage::new("t", "d").key("L"),
            ],
        )
        .await
        .expect("enqueue_batch");
    assert_eq!(
        trigger_calls(&mut tx).await,
        0,
        "enqueue paths skip the trigger"
    );
    sqlx::query(&format!(
        "INSERT INTO {t} (topic, key, payload) VALUES ('t', 'K', 'e'), ('t', NULL, 'f')"
    ))
    .execute(&mut *tx)
    .await
    .expect("plain insert");
    assert_eq!(
        trigger_calls(&mut tx).await,
        2,
        "plain rows get their seq from the trigger"
    );
    tx.commit().await.expect("commit");

    let bodies: Vec<Vec<u8>> = sqlx::query_scalar(&format!("SELECT payload FROM {t} ORDER BY seq"))
        .fetch_all(&h.app)
        .await
        .expect("rows");
    assert_eq!(
        bodies,
        [b"a", b"b", b"c", b"d", b"e", b"f"].map(|b| b.to_vec()),
        "one seq order across both paths"
    );
}

/// Calls of the outbox trigger function in the current transaction.
async fn trigger_calls(tx: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_xact_user_functions
          WHERE funcname = 'postbox_outbox_before_insert'",
    )
    .fetch_one(tx)
    .await
    .expect("function stats")
}

/// Keys whose heads are parked fill the claim window and the first walks
/// over the keys; the one claimable head lies past them. A claim of one
/// message must still find it (the walk goes on past keys that yield
/// nothing) instead of reporting nothing claimable and leaving the relay
/// asleep for a poll interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimable_head_behind_many_parked_keys_is_found_by_one_claim() {
    let h = PgHarness::new().await;
    let store = h.store.clone();
    let keys: Vec<String> = (0..40).map(|k| format!("parked-{k:02}")).collect();
    let heads: Vec<NewMessage> = keys
        .iter()
        .map(|k| NewMessage::new("t", format!("{k}/head")).key(k.as_str()))
        .collect();
    h.outbox
        .enqueue_batch(&h.app, &heads)
        .await
        .expect("enqueue");
    let claim = store
        .claim(&ClaimRequest::new(100, LEASE))
        .await
        .expect("claim heads");
    assert_eq!(claim.messages.len(), keys.len());
    common::complete_all(&store, &claim, common::parked()).await;
    // two waiting messages behind each parked head, then one free key
    let behind: Vec<NewMessage> = keys
        .iter()
        .flat_map(|k| {
            (1..=2).map(move |i| NewMessage::new("t", format!("{k}/{i}")).key(k.as_str()))
        })
        .collect();
    h.outbox
        .enqueue_batch(&h.app, &behind)
        .await
        .expect("enqueue");
    h.outbox
        .enqueue(&h.app, &NewMessage::new("t", "free").key("zz-free"))
        .await
        .expect("enqueue");

    let claim = store
        .claim(&ClaimRequest::new(1, LEASE))
        .await
        .expect("claim");
    assert_eq!(
        claim.messages.iter().map(body).collect::<Vec<_>>(),
        ["free"],
        "the one claimable head, past 40 parked keys"
    );
}

/// A window of keys held back by parked heads, with one claimable head
/// among them, is short, not raced: the claim takes that head and the next
/// claim walks to the keys behind the window. (Counting the parked keys'
/// first rows as claimable heads would call the window raced and keep
/// claiming from it, leaving the keys behind to a later walk.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_parked_keys_sends_the_next_claim_to_the_walk() {
    let h = PgHarness::new().await;
    let store = h.store.clone();
    let parked: Vec<NewMessage> = (0..3)
        .map(|k| NewMessage::new("t", format!("p{k}-a")).key(format!("p{k}")))
        .collect();
    h.outbox
        .enqueue_batch(&h.app, &parked)
        .await
        .expect("enqueue");
    let req = ClaimRequest::new(4, LEASE);
    let heads = store.claim(&req).await.expect("claim");
    assert_eq!(heads.messages.len(), 3);
    common::complete_all(&store, &heads, common::parked()).await;
    // the window (twice the batch: 8 rows): 3 parked keys' next rows, one
    // free head, 4 more parked rows; then 4 keys behind the window
    let mut rows: Vec<NewMessage> = (0..3)
        .map(|k| NewMessage::new("t", format!("p{k}-b")).key(format!("p{k}")))
        .collect();
    rows.push(NewMessage::new("t", "x").key("x"));
    rows.extend(
        (0..4).map(|i| NewMessage::new("t", format!("p{}-c{i}", i % 3)).key(format!("p{}", i % 3))),
    );
    rows.extend((0..4).map(|k| NewMessage::new("t", format!("c{k}")).key(format!("c{k}"))));
    h.outbox
        .enqueue_batch(&h.app, &rows)
        .await
        .expect("enqueue");
    let (_, bodies) = claimed(&store, &req).await;
    assert_eq!(bodies, ["x"], "the one claimable head in the window");
    assert_eq!(
        store.next_claim_statement(None),
        "walk",
        "parked keys' rows are not claimable heads: the window is short"
    );
    let (_, bodies) = claimed(&store, &req).await;
    assert_eq!(
        bodies,
        ["c0", "c1", "c2", "c3"],
        "the keys behind the window"
    );
}

/// The keyed window reaches past the batches the same relay already holds:
/// with two batches of heads leased at the front of the table, the third
/// claim still takes the oldest claimable heads, from the window. (A window
/// of only twice the batch held nothing but the leased rows, and the claim
/// fell back on the key walk, which takes heads in key order: here the
/// newest ones.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_takes_the_oldest_heads_past_the_batches_its_store_holds() {
    let h = PgHarness::new().await;
    let store = h.store.clone();
    enqueue_descending_keys(&h).await;
    let req = ClaimRequest::new(10, LEASE);
    let mut held = Vec::new();
    for batch in 0..3 {
        let claim = store.claim(&req).await.expect("claim");
        let expected: Vec<String> = (0..10)
            .map(|i| format!("k{:02}", 59 - 10 * batch - i))
            .collect();
        assert_eq!(
            claim.messages.iter().map(body).collect::<Vec<_>>(),
            expected,
            "claim {batch}: the oldest ten heads not yet held"
        );
        held.push(claim);
    }
    for claim in &held {
        common::complete_all(&store, claim, Disposition::Sent).await;
    }
}

/// The keyed window also reaches past rows another relay holds: once a
/// claim has seen them leased in its window, the next claim takes the
/// oldest claimable heads from a longer window rather than from the key
/// walk (which takes heads in key order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_takes_the_oldest_heads_past_another_relays_leases() {
    let h = PgHarness::new().await;
    let other = PgStore::connect_with(&h.db.url, h.outbox.clone())
        .await
        .expect("second store");
    enqueue_descending_keys(&h).await;
    let req = ClaimRequest::new(10, LEASE);
    // the other relay holds the twenty oldest heads
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(other.claim(&req).await.expect("claim"));
    }
    // this store's first claim sees only leased rows in its window of 20;
    // it gives its batch back
    let first = h.store.claim(&req).await.expect("claim");
    assert_eq!(first.messages.len(), 10, "the walk finds heads");
    common::complete_all(&h.store, &first, Disposition::Release).await;
    let second = h.store.claim(&req).await.expect("claim");
    assert_eq!(
        second.messages.iter().map(body).collect::<Vec<_>>(),
        (30..40).rev().map(|k| format!("k{k}")).collect::<Vec<_>>(),
        "the oldest ten heads past the other relay's twenty"
    );
    for claim in &held {
        common::complete_all(&other, claim, Disposition::Sent).await;
    }
    common::complete_all(&h.store, &second, Disposition::Sent).await;
}

/// A window that comes back short only because concurrent claims locked
/// its heads first is not a hot key's backlog: the next claim stays with
/// the window instead of walking the keys (which costs more and takes
/// heads in key order). The "concurrent claim" here is a transaction that
/// holds the 25 oldest heads `FOR UPDATE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_locked_by_a_concurrent_claim_do_not_start_the_key_walk() {
    let h = PgHarness::new().await;
    let store = h.store.clone();
    enqueue_descending_keys(&h).await;
    let locker = lock_rows(&h, "key >= 'k35'", 25).await;
    let req = ClaimRequest::new(10, LEASE);
    let names = |c: &postbox_core::Claim| c.messages.iter().map(body).collect::<Vec<_>>();
    // a scope's first claim may walk; its window held only locked heads
    let first = store.claim(&req).await.expect("claim");
    assert_eq!(first.messages.len(), 10);
    let second = store.claim(&req).await.expect("claim");
    assert_eq!(
        names(&second),
        (30..35).rev().map(|k| format!("k{k}")).collect::<Vec<_>>(),
        "the window's five unlocked heads, and none from a walk over the keys"
    );
    locker.rollback().await.expect("rollback");
    for claim in [&first, &second] {
        common::complete_all(&store, claim, Disposition::Sent).await;
    }
}

/// Heads held `FOR UPDATE` by a transaction that is not a claim look
/// claimable to every claim's snapshot, like heads lost to a lock race. They
/// must not hide the keys behind the window: a claim that the locks left
/// with nothing walks on and finds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_held_for_update_do_not_hide_the_keys_behind_the_window() {
    let h = PgHarness::new().await;
    let store = h.store.clone();
    // 20 keys with three rows each, in rounds, then five more keys
    let rows: Vec<NewMessage> = (0..3)
        .flat_map(|round| {
            (0..20).map(move |k| {
                NewMessage::new("t", format!("a{k:02}/{round}")).key(format!("a{k:02}"))
            })
        })
        .chain((0..5).map(|k| NewMessage::new("t", format!("b{k}")).key(format!("b{k}"))))
        .collect();
    h.outbox
        .enqueue_batch(&h.app, &rows)
        .await
        .expect("enqueue");
    let locker = lock_rows(&h, "payload LIKE '%/0'", 20).await;
    let claim = store
        .claim(&ClaimRequest::new(10, LEASE))
        .await
        .expect("claim");
    assert_eq!(
        claim.messages.iter().map(body).collect::<Vec<_>>(),
        ["b0", "b1", "b2", "b3", "b4"],
        "the heads behind the locked ones"
    );
    locker.rollback().await.expect("rollback");
    common::complete_all(&store, &claim, Disposition::Sent).await;
}

/// After a keyless claim that came back full the store claims keyless rows
/// with the backlog statement, which returns no row (and no hints) when it
/// leases nothing. The claim after it must still see what arrived: keyed
/// rows, more keyless rows, or nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_after_a_full_keyless_claim_see_keyed_rows_that_arrived() {
    let h = PgHarness::new().await;
    let store = h.store.clone();
    let keyless = |n: usize, tag: &str| -> Vec<NewMessage> {
        (0..n)
            .map(|i| NewMessage::new("t", format!("{tag}{i}")))
            .collect()
    };
    let req = ClaimRequest::new(4, LEASE);
    h.outbox
        .enqueue_batch(&h.app, &keyless(8, "a"))
        .await
        .expect("enqueue");
    let first = store.claim(&req).await.expect("claim");
    assert_eq!(
        first.messages.iter().map(body).collect::<Vec<_>>(),
        ["a0", "a1", "a2", "a3"]
    );
    assert_eq!(
        store.next_claim_statement(None),
        "keyless_bulk",
        "came back full"
    );
    // full: the next claim uses the backlog statement, and gets the rest in
    // seq order
    let second = store.claim(&req).await.expect("claim");
    assert_eq!(
        second.messages.iter().map(body).collect::<Vec<_>>(),
        ["a4", "a5", "a6", "a7"]
    );
    assert_eq!(store.next_claim_statement(None), "keyless_bulk");
    // full again, but the keyless rows are gone and keyed ones arrived:
    // the backlog statement leases nothing and the claim goes on to them
    let keyed: Vec<NewMessage> = ["k", "l"]
        .iter()
        .map(|k| NewMessage::new("t", format!("{k}1")).key(*k))
        .collect();
    h.outbox
        .enqueue_batch(&h.app, &keyed)
        .await
        .expect("enqueue");
    let third = store.claim(&req).await.expect("claim");
    assert_eq!(
        third.messages.iter().map(body).collect::<Vec<_>>(),
        ["k1", "l1"],
        "the keyed heads that arrived behind a keyless backlog"
    );
    assert_eq!(store.next_claim_statement(None), "keyed");
    // and a backlog that ends with nothing new ends in an empty claim
    h.outbox
        .enqueue_batch(&h.app, &keyless(4, "b"))
        .await
        .expect("enqueue");
    for claim in [&first, &second, &third] {
        common::complete_all(&store, claim, Disposition::Sent).await;
    }
    let fourth = store.claim(&req).await.expect("claim");
    assert_eq!(fourth.messages.len(), 4);
    assert_eq!(store.next_claim_statement(None), "keyless_bulk");
    let fifth = store.claim(&req).await.expect("claim");
    assert!(fifth.messages.is_empty(), "nothing is left to claim");
    assert_eq!(
        store.next_claim_statement(None),
        "keyless",
        "the backlog ended"
    );
    common::complete_all(&store, &fourth, Disposition::Sent).await;
}

/// After a keyed claim that came back full the store claims with the keyed
/// backlog statement (`keyed_bulk`), which returns no row (and no hints)
/// when it leases nothing. It keeps the ordering rule (heads only, one per
/// key), and once it leases nothing the claim goes on with the window and
/// later claims see the keys' next messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_backlog_claims_keep_to_the_heads_and_end_when_nothing_is_left() {
    let h = PgHarness::new().await;
    let store = h.store.clone();
    // keys k0..k15, two messages each: k0-a .. k15-a, then k0-b .. k15-b
    // (16 keys: busy keys count as enough from 16 of them)
    enqueue_rounds_of(&h, 16, &["a", "b"]).await;
    let bodies_of = |round: &str, keys: std::ops::Range<usize>| {
        keys.map(|k| format!("k{k}-{round}")).collect::<Vec<_>>()
    };
    let req = ClaimRequest::new(8, LEASE);
    let (first, bodies) = claimed(&store, &req).await;
    assert_eq!(bodies, bodies_of("a", 0..8));
    assert_eq!(
        store.next_claim_statement(None),
        "keyed_bulk",
        "came back full"
    );
    // the backlog statement: the other keys' heads, none of the leased
    // keys' next messages, in seq order
    let (second, bodies) = claimed(&store, &req).await;
    assert_eq!(bodies, bodies_of("a", 8..16));
    assert_eq!(store.next_claim_statement(None), "keyed_bulk");
    // every head is leased: the backlog statement leases nothing, the claim
    // goes on with the window, which finds nothing either
    let third = store.claim(&req).await.expect("claim");
    assert!(third.messages.is_empty(), "every key's head is leased");
    assert_eq!(
        store.next_claim_statement(None),
        "keyed",
        "the keys are busy: the window again, no walk"
    );
    // a keyless row arriving behind the keyed ones is taken after them
    h.outbox
        .enqueue_batch(&h.app, &[NewMessage::new("t", "free")])
        .await
        .expect("enqueue");
    for claim in [&first, &second] {
        common::complete_all(&store, claim, Disposition::Sent).await;
    }
    let (fourth, bodies) = claimed(&store, &req).await;
    assert_eq!(bodies, bodies_of("b", 0..8));
    assert_eq!(store.next_claim_statement(None), "keyed_bulk");
    let (fifth, bodies) = claimed(&store, &req).await;
    assert_eq!(bodies, bodies_of("b", 8..16));
    let (sixth, bodies) = claimed(&store, &req).await;
    assert_eq!(bodies, ["free"], "the keyless row behind the keyed backlog");
    for claim in [&fourth, &fifth, &sixth] {
        common::complete_all(&store, claim, Disposition::Sent).await;
    }
    let last = store.claim(&req).await.expect("claim");
    assert!(last.messages.is_empty(), "nothing is left to claim");
    assert_eq!(
        store.next_claim_statement(None),
        "keyless",
        "the backlog ended"
    );
}

/// A window full of keys whose heads were just leased (in flight in
/// another relay) is not short: the keys are busy, not missing, so the
/// claim does not walk every key to find only those leased heads, and the
/// keys' next messages are claimed once the leases complete. Heads leased
/// longer ago count as stuck, and a window full of one busy key's backlog
/// still is short: the walk finds the keys behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_busy_keys_is_not_walked_but_stuck_keys_and_a_hot_backlog_are() {
    let h = PgHarness::new().await;
    let other = PgStore::connect_with(&h.db.url, h.outbox.clone())
        .await
        .expect("second store");
    // keys k0..k15, three messages each, round after round (busy keys
    // count as enough from 16 of them)
    enqueue_rounds_of(&h, 16, &["a", "b", "c"]).await;
    let req = ClaimRequest::new(16, LEASE);
    let busy = h.store.claim(&req).await.expect("claim");
    assert_eq!(busy.messages.len(), 16, "every key's head");
    let idle = other.claim(&req).await.expect("claim");
    assert!(idle.messages.is_empty(), "every head is leased");
    assert_eq!(
        other.next_claim_statement(None),
        "keyed",
        "busy keys are not a short window: no walk"
    );
    // Heads leased more than a second ago count as stuck, not busy: the
    // window is short and the walk reaches a key behind it. A relay whose
    // lease is a minute longer sees these 30-second leases as taken a
    // minute ago, without waiting for it.
    h.outbox
        .enqueue(&h.app, &NewMessage::new("t", "behind").key("z"))
        .await
        .expect("enqueue");
    let stuck = other
        .claim(&ClaimRequest::new(16, LEASE + Duration::from_secs(60)))
        .await
        .expect("claim");
    assert_eq!(
        stuck.messages.iter().map(body).collect::<Vec<_>>(),
        ["behind"],
        "the key behind a window of stuck heads"
    );
    assert_eq!(
        other.next_claim_statement(None),
        "walk",
        "stuck heads make the window short"
    );
    common::complete_all(&other, &stuck, Disposition::Sent).await;
    common::complete_all(&h.store, &busy, Disposition::Sent).await;
    let (next, bodies) = claimed(&other, &req).await;
    assert_eq!(
        bodies,
        (0..16).map(|k| format!("k{k}-b")).collect::<Vec<_>>(),
        "the keys' next messages"
    );
    common::complete_all(&other, &next, Disposition::Sent).await;
    let last = other.claim(&req).await.expect("claim");
    assert_eq!(last.messages.len(), 16);
    common::complete_all(&other, &last, Disposition::Sent).await;

    // one hot key's backlog in front, its head leased; four keys behind
    let mut rows: Vec<NewMessage> = (0..40)
        .map(|i| NewMessage::new("t", format!("hot-{i}")).key("hot"))
        .collect();
    rows.extend((0..4).map(|k| NewMessage::new("t", format!("c{k}")).key(format!("c{k}"))));
    h.outbox
        .enqueue_batch(&h.app, &rows)
        .await
        .expect("enqueue");
    let hot = h
        .store
        .claim(&ClaimRequest::new(1, LEASE))
        .await
        .expect("claim");
    assert_eq!(hot.messages.iter().map(body).collect::<Vec<_>>(), ["hot-0"]);
    let req = ClaimRequest::new(4, LEASE);
    let mut behind = Vec::new();
    for _ in 0..3 {
        let c = other.claim(&req).await.expect("claim");
        behind.extend(c.messages.iter().map(body));
        if behind.len() == 4 {
            break;
        }
    }
    assert_eq!(
        behind,
        ["c0", "c1", "c2", "c3"],
        "the keys behind a busy hot key's backlog, found by the walk"
    );
}

/// At batch 1, a hot key's backlog in front with its head leased does not
/// hold back the keys behind it: the next claim walks to them. (A busy
/// head counted as filling the batch of 1, so no claim walked, and the
/// keys behind waited for the whole backlog, published one at a time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_batch_one_a_busy_hot_key_does_not_hold_back_the_keys_behind_it() {
    let h = PgHarness::new().await;
    let mut rows: Vec<NewMessage> = (0..20)
        .map(|i| NewMessage::new("t", format!("hot-{i}")).key("hot"))
        .collect();
    rows.push(NewMessage::new("t", "behind").key("other"));
    h.outbox
        .enqueue_batch(&h.app, &rows)
        .await
        .expect("enqueue");
    let req = ClaimRequest::new(1, LEASE);
    let (hot, bodies) = claimed(&h.store, &req).await;
    assert_eq!(bodies, ["hot-0"]);
    let (behind, bodies) = claimed(&h.store, &req).await;
    assert_eq!(bodies, ["behind"], "the key behind the hot key's backlog");
    common::complete_all(&h.store, &hot, Disposition::Sent).await;
    common::complete_all(&h.store, &behind, Disposition::Sent).await;
    let (_, bodies) = claimed(&h.store, &req).await;
    assert_eq!(bodies, ["hot-1"]);
}

/// A held backlog claim scans past the batches its store holds. Rows below
/// them that nobody holds (here: delayed rows that came due) are taken by a
/// scan from the front: the first claim with batches held scans from there,
/// and while such scans come back full of rows below, the next one does
/// too. No row is claimed twice while the batches stay held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_below_the_held_batches_are_still_claimed() {
    let h = PgHarness::new().await;
    let store = h.store.clone();
    let mut msgs: Vec<NewMessage> = (0..6)
        .map(|i| NewMessage::new("t", format!("d{i}")).delay(Duration::from_secs(3600)))
        .collect();
    msgs.extend((0..16).map(|i| NewMessage::new("t", format!("m{i:02}"))));
    h.outbox
        .enqueue_batch(&h.app, &msgs)
        .await
        .expect("enqueue");
    let req = ClaimRequest::new(4, LEASE);
    let claim = || async { store.claim(&req).await.expect("claim") };
    let bodies = |c: &postbox_core::Claim| c.messages.iter().map(body).collect::<Vec<_>>();
    first_batch_sent(&store, &req).await;
    let mut claims = vec![claim().await];
    assert_eq!(bodies(&claims[0]), ["m04", "m05", "m06", "m07"]);
    assert_eq!(store.held_batches(), 1);
    // the delayed rows, below the held batch, come due
    let due = sqlx::query(&format!(
        "UPDATE {} SET available_at = now() WHERE available_at > now()",
        h.outbox.qualified_name()
    ))
    .execute(&h.app)
    .await
    .expect("due");
    assert_eq!(due.rows_affected(), 6);
    // the first claim past a held batch scans from the front, and finds a
    // full batch below it
    claims.push(claim().await);
    assert_eq!(bodies(&claims[1]), ["d0", "d1", "d2", "d3"]);
    // so the next one scans from the front again
    claims.push(claim().await);
    assert_eq!(bodies(&claims[2]), ["d4", "d5", "m08", "m09"]);
    assert_eq!(store.held_batches(), 3);
    // claim on, holding every batch (past MAX_HELD the claims lease): the
    // rest, once each
    for _ in 0..10 {
        let c = claim().await;
        if c.messages.is_empty() {
            break;
        }
        claims.push(c);
    }
    let mut claimed: Vec<String> = claims.iter().flat_map(bodies).collect();
    claimed.sort();
    let mut want: Vec<String> = (0..6).map(|i| format!("d{i}")).collect();
    want.extend((4..16).map(|i| format!("m{i:02}")));
    assert_eq!(claimed, want);
    for c in &claims {
        common::complete_all(&store, c, Disposition::Sent).await;
    }
    assert_eq!(store.held_batches(), 0);
    assert_eq!(h.scalar("count(*)", "").await, 0);
}

/// Several relays on one keyless backlog: a backlog claim past its own
/// batches reserves the rows it is about to lock by moving the table's
/// claim hint (migration 8), and starts past the rows others reserved, so
/// that relays do not try and skip each other's locked rows one by one.
/// Rows below the hint that nobody holds are still claimed, by the scan from
/// the front; a hint past every `seq` issued is ignored and set again; and a
/// table without the hint sequence (not migrated yet) is claimed past the
/// store's own batches alone. (Claims 4 and 5 must come within a second of
/// claim 3, the front scan, as in `rows_below_the_held_batches_are_still_claimed`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_claims_start_past_the_rows_other_relays_reserved() {
    let h = PgHarness::new().await;
    let store = h.store.clone();
    enqueue_numbered(&h, 40, None).await;
    let seq_of = |body: &str| {
        let rest = format!("WHERE payload = convert_to('{body}', 'UTF8')");
        let h = &h;
        async move { h.scalar("seq", &rest).await }
    };
    let req = ClaimRequest::new(4, LEASE);
    let claim = || async { store.claim(&req).await.expect("claim") };
    let bodies = |c: &postbox_core::Claim| c.messages.iter().map(body).collect::<Vec<_>>();

    // a leasing claim, then two held ones scanning from the front (the
    // first held batch, and the first claim past a held batch): none of
    // them moves the hint
    first_batch_sent(&store, &req).await;
    let mut claims = vec![claim().await, claim().await];
    assert_eq!(bodies(&claims[0]), ["m04", "m05", "m06", "m07"]);
    assert_eq!(bodies(&claims[1]), ["m08", "m09", "m10", "m11"]);
    assert_eq!(store.held_batches(), 2);
    assert_eq!(
        claim_hint(&h, None).await,
        0,
        "front scans leave the hint alone"
    );

    // past its own batches: it reserves the 4 rows past where it starts
    claims.push(claim().await);
    assert_eq!(bodies(&claims[2]), ["m12", "m13", "m14", "m15"]);
    assert_eq!(claim_hint(&h, None).await, seq_of("m11").await + 4);

    // another relay reserves m16..m23: the next claim starts past them
    claim_hint(&h, Some(seq_of("m23").await)).await;
    claims.push(claim().await);
    assert_eq!(bodies(&claims[3]), ["m24", "m25", "m26", "m27"]);
    assert_eq!(claim_hint(&h, None).await, seq_of("m23").await + 4);

    // that relay never claims them: once this store holds nothing, its
    // next claim scans from the front and finds them
    for c in &claims {
        common::complete_all(&store, c, Disposition::Sent).await;
    }
    assert_eq!(store.held_batches(), 0);
    let mut claims = vec![claim().await];
    assert_eq!(bodies(&claims[0]), ["m16", "m17", "m18", "m19"]);

    // a hint past every `seq` issued (here: as if the table had been
    // recreated) is ignored and set again from the claim's own floor
    claim_hint(&h, Some(1_000_000)).await;
    claims.push(claim().await);
    assert_eq!(bodies(&claims[1]), ["m20", "m21", "m22", "m23"]);
    assert_eq!(claim_hint(&h, None).await, seq_of("m19").await + 4);

    // without the sequence (a table not migrated yet) claims start past
    // the store's own batches alone. (Dropping it waits for the held
    // batches: `setval` locks the sequence until their transactions end.)
    for c in &claims {
        common::complete_all(&store, c, Disposition::Sent).await;
    }
    sqlx::query(&format!("DROP SEQUENCE {}", claim_hint_name(&h)))
        .execute(&h.app)
        .await
        .expect("drop the hint");
    let claims = [claim().await, claim().await];
    assert_eq!(bodies(&claims[0]), ["m28", "m29", "m30", "m31"]);
    assert_eq!(bodies(&claims[1]), ["m32", "m33", "m34", "m35"]);
    assert_eq!(store.held_batches(), 2);
    for c in &claims {
        common::complete_all(&store, c, Disposition::Sent).await;
    }
    assert_eq!(h.scalar("count(*)", "").await, 4);
}

/// Claims restricted to one tenant scan that tenant's index past their own
/// batches only: they neither read nor move the claim hint, which orders
/// the claims of every tenant together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_backlog_claims_leave_the_claim_hint_alone() {
    let h = PgHarness::new().await;
    let store = h.store.clone();
    enqueue_numbered(&h, 16, Some("t1")).await;
    assert_eq!(claim_hint(&h, Some(5)).await, 5);
    let req = ClaimRequest::new(4, LEASE).tenant("t1");
    let claim = || async { store.claim(&req).await.expect("claim") };
    let bodies = |c: &postbox_core::Claim| c.messages.iter().map(body).collect::<Vec<_>>();
    first_batch_sent(&store, &req).await;
    // held: from the front, the first past a held batch, then past its own
    // batches (the hint, 5, lies below all of them and would not matter;
    // it must not move)
    let claims = [claim().await, claim().await, claim().await];
    assert_eq!(bodies(&claims[0]), ["m04", "m05", "m06", "m07"]);
    assert_eq!(bodies(&claims[1]), ["m08", "m09", "m10", "m11"]);
    assert_eq!(bodies(&claims[2]), ["m12", "m13", "m14", "m15"]);
    assert_eq!(store.held_batches(), 3);
    assert_eq!(
        claim_hint(&h, None).await,
        5,
        "tenant claims leave the hint alone"
    );
    for c in &claims {
        common::complete_all(&store, c, Disposition::Sent).await;
    }
    assert_eq!(h.scalar("count(*)", "").await, 0);
}

/// Timestamps a plain-SQL producer set to `infinity` or `-infinity` do not
/// jam the outbox: a claim that takes such a row returns it (it used to
/// fail with "cannot convert infinity to bigint", again at every lease,
/// so the row and its batch-mates were never sent), and `list` and
/// `stats` still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_timestamps_set_by_a_producer_are_claimed_listed_and_counted() {
    let h = PgHarness::new().await;
    let t = h.outbox.qualified_name().to_owned();
    sqlx::query(&format!(
        "INSERT INTO {t} (topic, key, payload, created_at, available_at) VALUES
            ('t', NULL, 'future', 'infinity', now()), ('t', 'K', 'past', '-infinity', now()),
            ('t', NULL, 'never', now(), 'infinity')"
    ))
    .execute(&h.app)
    .await
    .expect("plain inserts");

    let all = h.store.list(&ListQuery::new(None, 10)).await.expect("list");
    assert_eq!(all.len(), 3);
    let stats = h.store.stats(&Filter::default()).await.expect("stats");
    assert_eq!(stats.pending, 3, "{stats:?}");

    let mut bodies = Vec::new();
    for _ in 0..3 {
        let claim = h
            .store
            .claim(&ClaimRequest::new(10, LEASE))
            .await
            .expect("claim");
        bodies.extend(claim.messages.iter().map(body));
        common::complete_all(&h.store, &claim, Disposition::Sent).await;
    }
    bodies.sort();
    assert_eq!(
        bodies,
        ["future", "past"],
        "both delivered; 'never' is not due"
    );
}
