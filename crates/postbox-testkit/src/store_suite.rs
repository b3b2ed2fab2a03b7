//! The store conformance suite: the behaviour every [`Store`] must show.
//!
//! A store crate implements [`StoreHarness`] for a fresh, isolated store
//! (its own database or schema) and expands [`store_conformance_tests!`]
//! (crate::store_conformance_tests) once; each check becomes its own test.
//!
//! Time never passes by sleeping: [`StoreHarness::advance`] moves the store's
//! clock forward (the SQL stores shift their stored deadlines back instead).
//!
//! The retention checks run on [`StoreHarness::retaining_store`], the same
//! store built to keep sent messages.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use postbox_core::{
    CancellationToken, ClaimRequest, Completion, Disposition, Filter, GroupBy, GroupStats,
    ListQuery, MAX_RETRY_AFTER, Message, NewMessage, OnDead, PurgeQuery, Relay, RelayHeartbeat,
    RetryPolicy, Stats, Status, Store, from_unix_micros, to_unix_micros,
};
use uuid::Uuid;

use crate::publisher::{Behaviour, TestPublisher, key_order_violations};

/// A fresh, isolated store plus the few things the suite cannot do through
/// the [`Store`] trait.
pub trait StoreHarness: Send + Sync + 'static {
    /// The store under test.
    type Store: Store + Clone;

    /// A handle to the store.
    fn store(&self) -> Self::Store;

    /// Writes `msgs` in one transaction and commits it, through the store
    /// crate's own `enqueue`/`enqueue_batch`.
    fn enqueue(&self, msgs: Vec<NewMessage>) -> impl Future<Output = ()> + Send;

    /// Writes `msgs` in one transaction and rolls it back.
    fn enqueue_rolled_back(&self, msgs: Vec<NewMessage>) -> impl Future<Output = ()> + Send;

    /// Moves the store's notion of "now" forward by `by` (or, equivalently,
    /// every stored deadline and timestamp back by `by`, `sent_at` of kept
    /// sent rows included).
    fn advance(&self, by: Duration) -> impl Future<Output = ()> + Send;

    /// The store under test over the same tables, built to keep sent
    /// messages for `keep` instead of deleting them (its crate's
    /// `retain_sent(Some(keep))`).
    fn retaining_store(&self, keep: Duration) -> Self::Store;
}

const LEASE: Duration = Duration::from_secs(30);

fn req(limit: usize) -> ClaimRequest {
    ClaimRequest::new(limit, LEASE)
}

fn msg(topic: &str, key: Option<&str>, body: &str) -> NewMessage {
    let m = NewMessage::new(topic, body.as_bytes().to_vec());
    match key {
        Some(k) => m.key(k),
        None => m,
    }
}

fn bodies(msgs: &[Message]) -> Vec<String> {
    msgs.iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect()
}

async fn claim_bodies<S: Store>(store: &S, limit: usize) -> (uuid::Uuid, Vec<Message>) {
    let c = store.claim(&req(limit)).await.expect("claim");
    assert!(
        c.malformed.is_empty(),
        "unexpected malformed rows: {:?}",
        c.malformed
    );
    (c.lease.token, c.messages)
}

async fn complete_all<S: Store>(store: &S, token: uuid::Uuid, msgs: &[Message], d: Disposition) {
    let cs: Vec<Completion> = msgs
        .iter()
        .map(|m| Completion::new(m.seq, d.clone()))
        .collect();
    let r = store.complete(token, &cs).await.expect("complete");
    assert_eq!(
        r.applied,
        msgs.len() as u64,
        "completion not applied: {r:?}"
    );
}

fn dead(park: bool) -> Disposition {
    Disposition::Dead {
        error: "poison message".into(),
        park,
    }
}

fn retry(delay: Duration) -> Disposition {
    Disposition::Retry {
        delay,
        error: "broker down".into(),
    }
}

/// Every field a producer writes comes back unchanged, binary payloads and
/// empty payloads included; ids are kept; attempts start at 1.
pub async fn fields_round_trip<H: StoreHarness>(h: H) {
    let store = h.store();
    let binary = NewMessage::new("bin.topic", Bytes::from_static(&[0, 159, 146, 150, 255]))
        .key("k-1")
        .header("content-type", "application/octet-stream")
        .header("traceparent", "00-abc-def-01")
        .tenant("acme")
        .max_attempts(7);
    let empty = NewMessage::new("empty.topic", Bytes::new());
    let utf8 = NewMessage::new("text.topic", "héllo wörld ✓".as_bytes().to_vec());
    let sent = vec![binary.clone(), empty.clone(), utf8.clone()];
    h.enqueue(sent.clone()).await;

    let (_, got) = claim_bodies(&store, 10).await;
    assert_eq!(got.len(), 3, "claimed {got:?}");
    assert!(
        got.windows(2).all(|w| w[0].seq < w[1].seq),
        "claim not in seq order"
    );
    for (want, got) in sent.iter().zip(&got) {
        assert_eq!(got.id, want.id);
        assert_eq!(got.topic, want.topic);
        assert_eq!(got.key, want.key);
        assert_eq!(got.payload, want.payload);
        assert_eq!(got.headers, want.headers);
        assert_eq!(got.tenant, want.tenant);
        assert_eq!(got.max_attempts, want.max_attempts);
        assert_eq!(got.attempt, 1);
        let age = postbox_core::since(SystemTime::now(), got.created_at);
        assert!(
            age < Duration::from_secs(3600),
            "created_at is off by {age:?}"
        );
    }
}

/// A rolled-back enqueue is never claimed; the committed one beside it is.
pub async fn rolled_back_enqueue_is_never_claimed<H: StoreHarness>(h: H) {
    let store = h.store();
    h.enqueue_rolled_back(vec![
        msg("t", None, "rolled-back-1"),
        msg("t", Some("k"), "rolled-back-2"),
    ])
    .await;
    h.enqueue(vec![msg("t", Some("k"), "committed")]).await;
    h.enqueue_rolled_back(vec![msg("t", Some("k"), "rolled-back-3")])
        .await;

    let (token, got) = claim_bodies(&store, 100).await;
    assert_eq!(bodies(&got), ["committed"]);
    complete_all(&store, token, &got, Disposition::Sent).await;
    let (_, again) = claim_bodies(&store, 100).await;
    assert!(
        again.is_empty(),
        "claimed rolled-back rows: {:?}",
        bodies(&again)
    );
    let stats = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!(stats.pending, 0);
}

/// A claimed message is not claimed again while its lease runs; a relay that
/// dies holding it loses it to the next claim once the lease has expired,
/// which counts a second attempt (at-least-once).
pub async fn redelivered_after_lease_expires<H: StoreHarness>(h: H) {
    let store = h.store();
    h.enqueue(vec![msg("t", None, "a"), msg("t", Some("k"), "b")])
        .await;
    let (_, first) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&first), ["a", "b"]);
    // the relay "dies": no completion
    let (_, during) = claim_bodies(&store, 10).await;
    assert!(
        during.is_empty(),
        "leased rows claimed twice: {:?}",
        bodies(&during)
    );
    h.advance(LEASE / 2).await;
    assert!(
        claim_bodies(&store, 10).await.1.is_empty(),
        "lease ended early"
    );
    h.advance(LEASE).await;
    let (token, second) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&second), ["a", "b"]);
    assert!(
        second.iter().all(|m| m.attempt == 2),
        "attempts not counted: {second:?}"
    );
    assert_eq!(
        first.iter().map(|m| m.id).collect::<Vec<_>>(),
        second.iter().map(|m| m.id).collect::<Vec<_>>()
    );
    complete_all(&store, token, &second, Disposition::Sent).await;
    assert_eq!(store.stats(&Filter::all()).await.expect("stats").pending, 0);
}

/// Fencing: once another relay has claimed a message under a new lease, the
/// old lease's completion changes nothing, whatever it says.
pub async fn stale_lease_cannot_complete<H: StoreHarness>(h: H) {
    let store = h.store();
    h.enqueue(vec![msg("t", Some("k"), "a"), msg("t", None, "b")])
        .await;
    let (old, first) = claim_bodies(&store, 10).await;
    h.advance(LEASE + Duration::from_secs(1)).await;
    let (new, second) = claim_bodies(&store, 10).await;
    assert_eq!(second.len(), 2);

    for d in [
        Disposition::Sent,
        dead(true),
        retry(Duration::from_secs(1)),
        Disposition::Release,
    ] {
        let cs: Vec<_> = first
            .iter()
            .map(|m| Completion::new(m.seq, d.clone()))
            .collect();
        let r = store.complete(old, &cs).await.expect("complete");
        assert_eq!((r.applied, r.lost), (0, 2), "stale {d:?} applied: {r:?}");
    }
    let stats = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!(
        (stats.leased, stats.dead),
        (2, 0),
        "stale completion changed rows: {stats:?}"
    );

    complete_all(&store, new, &second, Disposition::Sent).await;
    // and a stale completion after the rows are gone is lost too
    let cs: Vec<_> = first
        .iter()
        .map(|m| Completion::new(m.seq, Disposition::Sent))
        .collect();
    let r = store.complete(old, &cs).await.expect("complete");
    assert_eq!((r.applied, r.lost), (0, 2));
}

/// Only the head of each key is claimable, one lease per key at a time;
/// the next message of a key becomes claimable when the head is sent.
pub async fn keyed_claims_take_only_the_head<H: StoreHarness>(h: H) {
    let store = h.store();
    h.enqueue(vec![
        msg("t", Some("k"), "k1"),
        msg("t", Some("k"), "k2"),
        msg("t", Some("l"), "l1"),
        msg("t", Some("k"), "k3"),
        msg("t", Some("l"), "l2"),
    ])
    .await;
    let (t1, first) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&first), ["k1", "l1"]);
    assert!(
        claim_bodies(&store, 10).await.1.is_empty(),
        "a key was leased twice"
    );
    let k1: Vec<_> = first
        .iter()
        .filter(|m| m.key.as_deref() == Some("k"))
        .cloned()
        .collect();
    complete_all(&store, t1, &k1, Disposition::Sent).await;
    let (t2, second) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&second), ["k2"], "l is still leased, k moves on");
    complete_all(&store, t2, &second, Disposition::Sent).await;
    let l1: Vec<_> = first
        .iter()
        .filter(|m| m.key.as_deref() == Some("l"))
        .cloned()
        .collect();
    complete_all(&store, t1, &l1, Disposition::Sent).await;
    let (_, third) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&third), ["k3", "l2"]);
}

/// Keyless messages spread across concurrent claims without overlap, each
/// claim in `seq` order, and a later claim takes whatever they left.
///
/// How many rows each concurrent claim gets is not fixed: with
/// `SKIP LOCKED` two scans that run side by side take alternate rows and
/// both run out early (`[3, 3, 4]` on MariaDB), and a row another claim has
/// locked for an instant may be passed over by all of them. What must hold
/// is that no row is leased twice, none is lost, and the claims do not shut
/// each other out: together they take well over one claim's worth (a store
/// that lets only one claim through at a time and turns the others away
/// empty gets 4).
pub async fn keyless_claims_run_in_parallel<H: StoreHarness>(h: H) {
    let store = h.store();
    h.enqueue((0..10).map(|i| msg("t", None, &format!("m{i}"))).collect())
        .await;
    let four = req(4);
    let (a, b, c) = tokio::join!(store.claim(&four), store.claim(&four), store.claim(&four));
    let mut sizes = Vec::new();
    let mut all = Vec::new();
    for claim in [a, b, c] {
        let claim = claim.expect("claim");
        let seqs: Vec<_> = claim.messages.iter().map(|m| m.seq).collect();
        assert!(seqs.len() <= 4, "a claim went past its limit: {seqs:?}");
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "a claim is not in seq order: {seqs:?}"
        );
        sizes.push(seqs.len());
        all.extend(claim.messages);
    }
    let together: usize = sizes.iter().sum();
    assert!(
        together >= 6,
        "concurrent claims shut each other out: sizes {sizes:?}"
    );
    let (_, rest) = claim_bodies(&store, 10).await;
    assert_eq!(
        rest.len(),
        10 - together,
        "the rows the concurrent claims left are claimable (sizes {sizes:?})"
    );
    all.extend(rest);
    let mut seqs: Vec<_> = all.iter().map(|m| m.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 10, "a message was claimed twice or lost");
}

/// A retried message waits until its `available_at`, then comes back with
/// the next attempt number and its last error recorded.
pub async fn retry_waits_for_its_delay<H: StoreHarness>(h: H) {
    let store = h.store();
    h.enqueue(vec![msg("t", Some("k"), "a"), msg("t", Some("k"), "b")])
        .await;
    let (token, got) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&got), ["a"]);
    complete_all(&store, token, &got, retry(Duration::from_secs(60))).await;
    let stats = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!(
        (stats.retrying, stats.ready, stats.leased),
        (1, 1, 0),
        "{stats:?}"
    );
    assert!(
        claim_bodies(&store, 10).await.1.is_empty(),
        "retry came early, or b overtook a"
    );
    h.advance(Duration::from_secs(30)).await;
    assert!(
        claim_bodies(&store, 10).await.1.is_empty(),
        "retry came early"
    );
    h.advance(Duration::from_secs(31)).await;
    let (_, again) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&again), ["a"]);
    assert_eq!(again[0].attempt, 2);
    let rows = store
        .list(&ListQuery::new(None, 10).filter(Filter::all().key("k")))
        .await
        .expect("list");
    assert_eq!(rows[0].last_error.as_deref(), Some("broker down"));
    assert_eq!(rows[0].attempts, 2);
}

/// `Release` gives a message back at once without counting the attempt.
pub async fn release_returns_without_counting<H: StoreHarness>(h: H) {
    let store = h.store();
    h.enqueue(vec![msg("t", Some("k"), "a")]).await;
    let (token, got) = claim_bodies(&store, 10).await;
    complete_all(&store, token, &got, Disposition::Release).await;
    let (_, again) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&again), ["a"]);
    assert_eq!(again[0].attempt, 1, "released attempt was counted");
}

/// A dead keyed message parks its key: later messages of the key wait, other
/// keys flow. Replay makes it pending with fresh attempts and the key resumes
/// in order.
pub async fn dead_message_parks_key_until_replay<H: StoreHarness>(h: H) {
    let store = h.store();
    h.enqueue(vec![
        msg("t", Some("k"), "k1"),
        msg("t", Some("k"), "k2"),
        msg("t", Some("other"), "o1"),
        msg("t", Some("k"), "k3"),
        msg("t", Some("other"), "o2"),
    ])
    .await;
    let (token, got) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&got), ["k1", "o1"]);
    let (k1, o1): (Vec<_>, Vec<_>) = got.into_iter().partition(|m| m.key.as_deref() == Some("k"));
    complete_all(&store, token, &k1, dead(true)).await;
    complete_all(&store, token, &o1, Disposition::Sent).await;

    let (token, got) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&got), ["o2"], "parked key k moved on");
    complete_all(&store, token, &got, Disposition::Sent).await;
    assert!(claim_bodies(&store, 10).await.1.is_empty());

    let stats = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!(
        (stats.dead, stats.parked_keys, stats.pending),
        (1, 1, 2),
        "{stats:?}"
    );
    let deads = store
        .list(&ListQuery::new(Some(Status::Dead), 10))
        .await
        .expect("list");
    assert_eq!(deads.len(), 1);
    assert_eq!(deads[0].id, k1[0].id);
    assert!(deads[0].parked);
    assert_eq!(deads[0].last_error.as_deref(), Some("poison message"));

    assert_eq!(
        store
            .replay(&Filter::all().ids([k1[0].id]))
            .await
            .expect("replay"),
        1
    );
    let mut order = Vec::new();
    for _ in 0..3 {
        let (token, got) = claim_bodies(&store, 10).await;
        assert_eq!(
            got.len(),
            1,
            "key k leaked several heads: {:?}",
            bodies(&got)
        );
        order.extend(bodies(&got));
        if got[0].seq == k1[0].seq {
            assert_eq!(got[0].attempt, 1, "replay did not reset attempts");
        }
        complete_all(&store, token, &got, Disposition::Sent).await;
    }
    assert_eq!(order, ["k1", "k2", "k3"]);
    let stats = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!((stats.dead, stats.parked_keys, stats.pending), (0, 0, 0));
}

/// `skip` unparks a key: the dead message stays dead (and listed), the rest of
/// the key goes on.
pub async fn skip_unparks_key<H: StoreHarness>(h: H) {
    let store = h.store();
    h.enqueue(vec![msg("t", Some("k"), "k1"), msg("t", Some("k"), "k2")])
        .await;
    let (token, got) = claim_bodies(&store, 10).await;
    complete_all(&store, token, &got, dead(true)).await;
    assert!(claim_bodies(&store, 10).await.1.is_empty());
    assert_eq!(store.skip(&Filter::all().key("k")).await.expect("skip"), 1);
    let (_, next) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&next), ["k2"]);
    let stats = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!((stats.dead, stats.parked_keys), (1, 0));
}

/// With `park: false` (`on_dead = skip`) a dead message does not hold its key.
pub async fn dead_without_park_lets_key_continue<H: StoreHarness>(h: H) {
    let store = h.store();
    h.enqueue(vec![msg("t", Some("k"), "k1"), msg("t", Some("k"), "k2")])
        .await;
    let (token, got) = claim_bodies(&store, 10).await;
    complete_all(&store, token, &got, dead(false)).await;
    let (_, next) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&next), ["k2"]);
    let stats = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!((stats.dead, stats.parked_keys), (1, 0));
}

/// A dead message replayed while a later message of its key is leased
/// (`on_dead = skip`) waits for that lease to end: a key is held by one
/// lease at a time, replays included. Once the lease is over it is the
/// key's head again.
pub async fn a_replayed_message_waits_for_the_lease_on_its_key<H: StoreHarness>(h: H) {
    let store = h.store();
    h.enqueue(vec![msg("t", Some("k"), "k1"), msg("t", Some("k"), "k2")])
        .await;
    let (token, first) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&first), ["k1"]);
    complete_all(&store, token, &first, dead(false)).await;
    let (token, second) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&second), ["k2"]);
    let replayed = store
        .replay(&Filter::all().ids([first[0].id]))
        .await
        .expect("replay");
    assert_eq!(replayed, 1);
    let (_, during) = claim_bodies(&store, 10).await;
    assert!(
        during.is_empty(),
        "claimed while k2 held the key's lease: {:?}",
        bodies(&during)
    );
    complete_all(&store, token, &second, Disposition::Sent).await;
    h.advance(LEASE + Duration::from_secs(1)).await;
    let (_, after) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&after), ["k1"]);
}

/// A delayed message is not claimed before its time, and a delayed keyed
/// message holds back the later messages of its key (order per key).
pub async fn delayed_delivery_waits_and_holds_its_key<H: StoreHarness>(h: H) {
    let store = h.store();
    let later = SystemTime::now() + Duration::from_secs(300);
    h.enqueue(vec![
        msg("t", None, "delayed-keyless").available_at(later),
        msg("t", Some("k"), "k1-delayed").available_at(later),
        msg("t", Some("k"), "k2"),
        msg("t", None, "now"),
    ])
    .await;
    let (token, got) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&got), ["now"]);
    complete_all(&store, token, &got, Disposition::Sent).await;
    let stats = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!((stats.delayed, stats.ready), (2, 1), "{stats:?}");
    h.advance(Duration::from_secs(301)).await;
    let (_, got) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&got), ["delayed-keyless", "k1-delayed"]);
}

/// A relay scoped to a tenant claims only that tenant's messages; stats and
/// lists narrow by tenant.
pub async fn tenant_scoping<H: StoreHarness>(h: H) {
    let store = h.store();
    h.enqueue(vec![
        msg("t", None, "a1").tenant("a"),
        msg("t", None, "b1").tenant("b"),
        msg("t", Some("k"), "a2").tenant("a"),
        msg("t", None, "none"),
    ])
    .await;
    let c = store.claim(&req(10).tenant("b")).await.expect("claim");
    assert_eq!(bodies(&c.messages), ["b1"]);
    let sa = store
        .stats(&Filter::all().tenant("a"))
        .await
        .expect("stats");
    assert_eq!((sa.pending, sa.ready), (2, 2));
    let sb = store
        .stats(&Filter::all().tenant("b"))
        .await
        .expect("stats");
    assert_eq!((sb.pending, sb.leased), (1, 1));
    let la = store
        .list(&ListQuery::new(None, 10).filter(Filter::all().tenant("a")))
        .await
        .expect("list");
    assert_eq!(la.len(), 2);
    let c = store.claim(&req(10).tenant("a")).await.expect("claim");
    assert_eq!(bodies(&c.messages), ["a1", "a2"]);
}

/// Tenant fairness: a tenant whose backlog was written first does not starve
/// the others. The store lists the tenants with pending messages, and a
/// relay's claims rotate across them (each tenant, then any tenant).
pub async fn tenants_take_turns<H: StoreHarness>(h: H) {
    let store = h.store();
    let big: Vec<NewMessage> = (0..120)
        .map(|i| {
            let key = (i % 2 == 1).then(|| format!("big-{}", i % 7));
            msg("t", key.as_deref(), &format!("big-{i}")).tenant("big")
        })
        .collect();
    h.enqueue(big).await;
    h.enqueue(vec![
        msg("t", None, "s1-a").tenant("small1"),
        msg("t", Some("s1"), "s1-b").tenant("small1"),
        msg("t", Some("s1"), "s1-c").tenant("small1"),
        msg("t", None, "s2-a").tenant("small2"),
        msg("t", None, "no tenant"),
    ])
    .await;
    assert_eq!(
        store.pending_tenants(10).await.expect("tenants"),
        ["big", "small1", "small2"]
    );
    assert_eq!(
        store.pending_tenants(2).await.expect("tenants"),
        ["big", "small1"]
    );

    let publisher = TestPublisher::recording();
    let relay = Relay::builder(store.clone(), publisher.clone())
        .batch_size(10)
        .build()
        .expect("relay");
    // three rounds of big, small1, small2, any
    for _ in 0..12 {
        relay.tick().await.expect("tick");
    }
    let delivered = bodies(&publisher.delivered());
    for small in ["s1-a", "s1-b", "s1-c", "s2-a"] {
        assert!(
            delivered.iter().any(|b| b == small),
            "{small} starved behind the big tenant: {delivered:?}"
        );
    }
    let big = delivered.iter().filter(|b| b.starts_with("big-")).count();
    assert!(big < 120, "the big tenant went first: {delivered:?}");
    // each key's order holds across the rotation
    let violations = key_order_violations(&publisher.delivered());
    assert!(violations.is_empty(), "order violations: {violations:?}");
}

/// Stats count every state exactly, and narrow by topic.
pub async fn stats_are_exact<H: StoreHarness>(h: H) {
    let store = h.store();
    let empty = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!(empty.pending, 0);
    assert_eq!(empty.oldest_pending_at, None);
    h.enqueue(vec![
        msg("x", Some("dead-k"), "dead"),   // -> dead, parks dead-k
        msg("x", Some("dead-k"), "parked"), // ready but behind a parked head
        msg("x", None, "retry"),            // -> retrying
        msg("y", None, "lease-1"),          // -> leased
        msg("y", None, "lease-2"),          // -> leased
        msg("y", None, "ready"),            // stays ready
        msg("y", None, "delayed").delay(Duration::from_secs(600)),
    ])
    .await;
    let (token, got) = claim_bodies(&store, 5).await;
    assert_eq!(
        bodies(&got),
        ["dead", "retry", "lease-1", "lease-2", "ready"]
    );
    let by = |b: &str| {
        got.iter()
            .filter(|m| m.payload == b.as_bytes())
            .cloned()
            .collect::<Vec<_>>()
    };
    complete_all(&store, token, &by("dead"), dead(true)).await;
    complete_all(&store, token, &by("retry"), retry(Duration::from_secs(60))).await;
    complete_all(&store, token, &by("ready"), Disposition::Release).await;

    let s = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!(
        (
            s.ready,
            s.delayed,
            s.retrying,
            s.leased,
            s.dead,
            s.parked_keys,
            s.pending
        ),
        (2, 1, 1, 2, 1, 1, 6),
        "{s:?}"
    );
    assert!(s.oldest_pending_at.is_some());
    let x = store.stats(&Filter::all().topic("x")).await.expect("stats");
    assert_eq!(
        (x.pending, x.dead, x.retrying, x.ready),
        (2, 1, 1, 1),
        "{x:?}"
    );
}

/// `stats_by` breaks the exact counts down per topic and per tenant (rows
/// without a tenant in the `None` group, listed first), narrowed by the
/// filter, and the groups add up to the totals.
pub async fn stats_break_down_by_topic_and_tenant<H: StoreHarness>(h: H) {
    let store = h.store();
    assert!(
        store
            .stats_by(&Filter::all(), GroupBy::Topic)
            .await
            .expect("stats_by")
            .is_empty()
    );
    h.enqueue(vec![
        msg("a", None, "a1").tenant("t1"), // -> released: ready
        msg("a", Some("k"), "a2-dead"),    // -> dead, parks k; no tenant
        msg("b", None, "b1").tenant("t2"), // -> retrying
        msg("b", None, "b2")
            .tenant("t2")
            .delay(Duration::from_secs(600)), // delayed
        msg("a", None, "a3").tenant("t1"), // -> stays leased
    ])
    .await;
    let (token, got) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&got), ["a1", "a2-dead", "b1", "a3"]);
    let by = |b: &str| {
        got.iter()
            .filter(|m| m.payload == b.as_bytes())
            .cloned()
            .collect::<Vec<_>>()
    };
    complete_all(&store, token, &by("a1"), Disposition::Release).await;
    complete_all(&store, token, &by("a2-dead"), dead(true)).await;
    complete_all(&store, token, &by("b1"), retry(Duration::from_secs(60))).await;

    // (group, ready, delayed, retrying, leased, dead, parked keys, pending)
    type Row = (Option<String>, u64, u64, u64, u64, u64, u64, u64);
    fn rows(groups: &[GroupStats]) -> Vec<Row> {
        groups
            .iter()
            .map(|g| {
                let s = &g.stats;
                (
                    g.group.clone(),
                    s.ready,
                    s.delayed,
                    s.retrying,
                    s.leased,
                    s.dead,
                    s.parked_keys,
                    s.pending,
                )
            })
            .collect()
    }
    let some = |s: &str| Some(s.to_owned());
    let topics = store
        .stats_by(&Filter::all(), GroupBy::Topic)
        .await
        .expect("stats_by topic");
    assert_eq!(
        rows(&topics),
        [
            (some("a"), 1, 0, 0, 1, 1, 1, 2),
            (some("b"), 0, 1, 1, 0, 0, 0, 2)
        ]
    );
    let tenants = store
        .stats_by(&Filter::all(), GroupBy::Tenant)
        .await
        .expect("stats_by tenant");
    assert_eq!(
        rows(&tenants),
        [
            (None, 0, 0, 0, 0, 1, 1, 0),
            (some("t1"), 1, 0, 0, 1, 0, 0, 2),
            (some("t2"), 0, 1, 1, 0, 0, 0, 2)
        ]
    );
    assert_eq!(tenants[0].stats.oldest_pending_at, None, "{tenants:?}");
    assert!(tenants[1].stats.oldest_pending_at.is_some(), "{tenants:?}");
    let total: Stats = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!(
        tenants.iter().map(|g| g.stats.pending).sum::<u64>(),
        total.pending
    );
    let narrowed = store
        .stats_by(&Filter::all().topic("a"), GroupBy::Tenant)
        .await
        .expect("stats_by narrowed");
    assert_eq!(
        rows(&narrowed),
        [
            (None, 0, 0, 0, 0, 1, 1, 0),
            (some("t1"), 1, 0, 0, 1, 0, 0, 2)
        ]
    );
}

fn to_micros_precision(t: SystemTime) -> SystemTime {
    from_unix_micros(to_unix_micros(t))
}

/// Heartbeat rows: written and read back whole, stamped and aged on the
/// store's clock, stale once silent for 3 intervals while holding leases,
/// refreshed by the next heartbeat, removed by id.
pub async fn relay_heartbeats_are_recorded_and_age<H: StoreHarness>(h: H) {
    let store = h.store();
    assert!(store.relays().await.expect("relays").is_empty());
    let now = to_micros_precision(SystemTime::now());
    let interval = Duration::from_secs(5);
    let one = Uuid::now_v7();
    let beat = RelayHeartbeat::new(
        one,
        "relay-host-1",
        4242,
        "9.8.7",
        now - Duration::from_secs(60),
        interval,
    )
    .last_claim_at(Some(now - Duration::from_secs(1)))
    .leased(100);
    store.heartbeat(&beat).await.expect("heartbeat");
    let relays = store.relays().await.expect("relays");
    assert_eq!(relays.len(), 1, "{relays:?}");
    assert_eq!(relays[0].heartbeat, beat, "fields did not round-trip");
    assert!(relays[0].silent_for < interval, "{:?}", relays[0]);
    assert!(!relays[0].is_silent() && !relays[0].is_stale());

    h.advance(Duration::from_secs(16)).await;
    let relays = store.relays().await.expect("relays");
    assert!(
        relays[0].silent_for >= Duration::from_secs(16),
        "{:?}",
        relays[0]
    );
    assert!(
        relays[0].is_stale(),
        "silent 16 s > 3 × 5 s holding 100 leases"
    );

    // the next heartbeat refreshes the row in place
    let refreshed = beat.clone().last_claim_at(Some(now)).leased(0);
    store.heartbeat(&refreshed).await.expect("heartbeat");
    let relays = store.relays().await.expect("relays");
    assert_eq!(relays.len(), 1, "{relays:?}");
    assert_eq!(relays[0].heartbeat, refreshed);
    assert!(relays[0].silent_for < interval, "{:?}", relays[0]);
    h.advance(Duration::from_secs(16)).await;
    let relays = store.relays().await.expect("relays");
    assert!(relays[0].is_silent(), "{:?}", relays[0]);
    assert!(!relays[0].is_stale(), "holds no lease: silent, not stale");

    let two = Uuid::now_v7();
    let other = RelayHeartbeat::new(two, "relay-host-2", 7, "9.8.7", now, interval);
    store.heartbeat(&other).await.expect("heartbeat");
    let relays = store.relays().await.expect("relays");
    let ids: Vec<Uuid> = relays.iter().map(|r| r.heartbeat.relay_id).collect();
    assert_eq!(ids, [one, two], "not in order of start");
    assert_eq!(relays[1].heartbeat.last_claim_at, None);

    assert!(store.remove_relay(one).await.expect("remove"));
    assert!(!store.remove_relay(one).await.expect("remove"));
    let relays = store.relays().await.expect("relays");
    assert_eq!(relays.len(), 1);
    assert_eq!(relays[0].heartbeat, other);
}

/// A running relay keeps its heartbeat row current (its id, this process,
/// the rows it holds under lease) and deletes it on a clean shutdown.
pub async fn relay_run_heartbeats_until_shutdown<H: StoreHarness>(h: H) {
    let store = h.store();
    h.enqueue(vec![msg("t", None, "a"), msg("t", Some("k"), "b")])
        .await;
    let publisher = TestPublisher::hanging();
    let relay = Relay::builder(store.clone(), publisher.clone())
        .heartbeat_interval(Some(Duration::from_millis(20)))
        .poll_interval(Duration::from_millis(10))
        .shutdown_grace(Duration::from_millis(10))
        .concurrency(1)
        .build()
        .expect("relay");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let relay = relay.clone();
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let row = loop {
        let relays = store.relays().await.expect("relays");
        if let Some(r) = relays.iter().find(|r| r.heartbeat.leased == 2) {
            break r.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no heartbeat showing 2 leased rows: {relays:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(row.heartbeat.relay_id, relay.id());
    assert_eq!(row.heartbeat.pid, std::process::id());
    assert!(!row.heartbeat.host.is_empty());
    assert!(!row.heartbeat.version.is_empty());
    assert!(row.heartbeat.last_claim_at.is_some());
    assert_eq!(relay.leased(), 2);

    shutdown.cancel();
    running.await.expect("relay task");
    assert_eq!(relay.leased(), 0);
    let left = store.relays().await.expect("relays");
    assert!(left.is_empty(), "heartbeat row left behind: {left:?}");
    // the abandoned publish's keyless row was released, not left to its
    // lease; the keyed one keeps its lease (a late copy may still land)
    let s = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!((s.ready, s.leased), (1, 1), "{s:?}");
    let leased = store
        .list(&ListQuery::new(Some(Status::Leased), 10))
        .await
        .expect("list");
    let keys: Vec<_> = leased.iter().map(|m| m.key.as_deref()).collect();
    assert_eq!(keys, [Some("k")], "{leased:?}");
}

/// Purge deletes only matching dead messages, never pending ones.
pub async fn purge_deletes_only_matching_dead<H: StoreHarness>(h: H) {
    let store = h.store();
    h.enqueue(vec![
        msg("a", None, "a-dead"),
        msg("b", None, "b-dead"),
        msg("a", None, "a-pending"),
    ])
    .await;
    let (token, got) = claim_bodies(&store, 2).await;
    complete_all(&store, token, &got, dead(false)).await;
    let purged = store
        .purge(&PurgeQuery::new(Status::Dead, Filter::all().topic("a")))
        .await
        .expect("purge");
    assert_eq!(purged, 1);
    let s = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!((s.dead, s.pending), (1, 1));
    // older_than spares the young
    let spared = store
        .purge(&PurgeQuery::new(
            Status::Dead,
            Filter::all().older_than(Duration::from_secs(3600)),
        ))
        .await
        .expect("purge");
    assert_eq!(spared, 0);
    h.advance(Duration::from_secs(3601)).await;
    let purged = store
        .purge(&PurgeQuery::new(
            Status::Dead,
            Filter::all().older_than(Duration::from_secs(3600)),
        ))
        .await
        .expect("purge");
    assert_eq!(purged, 1);
}

/// The retention of the retention checks: long enough that nothing
/// expires unless a check advances the clock past it.
const KEEP: Duration = Duration::from_secs(3600);

fn sent_count(s: &Stats) -> (u64, u64) {
    (s.sent, s.pending)
}

/// Without a retention (the default) a sent message is deleted: nothing is
/// counted or listed as sent, and `purge_sent` finds nothing to delete.
pub async fn sent_messages_are_deleted_without_retention<H: StoreHarness>(h: H) {
    let store = h.store();
    assert_eq!(store.sent_retention(), None);
    h.enqueue(vec![msg("t", Some("k"), "a"), msg("t", None, "b")])
        .await;
    let (token, got) = claim_bodies(&store, 10).await;
    complete_all(&store, token, &got, Disposition::Sent).await;
    let s = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!(sent_count(&s), (0, 0), "{s:?}");
    let rows = store.list(&ListQuery::new(None, 10)).await.expect("list");
    assert!(rows.is_empty(), "sent rows kept: {rows:?}");
    h.advance(KEEP * 2).await;
    assert_eq!(store.purge_sent(KEEP, 500).await.expect("purge_sent"), 0);
}

/// With a retention a sent message is kept as `sent`: counted in
/// `stats().sent` (also per topic), not pending, listed as `Status::Sent`
/// with its `sent_at`, never claimed again (even after its lease would have
/// ended), and it does not hold its key back. Replay and skip leave it
/// alone; `purge` with `Status::Sent` deletes it.
pub async fn sent_messages_are_kept_with_retention<H: StoreHarness>(h: H) {
    let store = h.retaining_store(KEEP);
    assert_eq!(store.sent_retention(), Some(KEEP));
    h.enqueue(vec![
        msg("a", Some("k"), "k1"),
        msg("b", None, "free"),
        msg("a", Some("k"), "k2"),
        msg("a", Some("l"), "l1"),
    ])
    .await;
    let (token, got) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&got), ["k1", "free", "l1"]);
    let (sent, held): (Vec<_>, Vec<_>) = got.into_iter().partition(|m| m.payload != "l1");
    complete_all(&store, token, &sent, Disposition::Sent).await;

    let s = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!(
        (s.sent, s.pending, s.ready, s.leased, s.dead),
        (2, 2, 1, 1, 0),
        "{s:?}"
    );
    let b = store.stats(&Filter::all().topic("b")).await.expect("stats");
    assert_eq!(sent_count(&b), (1, 0), "{b:?}");
    assert_eq!(b.oldest_pending_at, None, "a sent row counted as pending");
    let topics = store
        .stats_by(&Filter::all(), GroupBy::Topic)
        .await
        .expect("stats_by");
    let per_topic: Vec<_> = topics
        .iter()
        .map(|g| (g.group.clone(), g.stats.sent, g.stats.pending))
        .collect();
    assert_eq!(
        per_topic,
        [(Some("a".to_owned()), 1, 2), (Some("b".to_owned()), 1, 0)]
    );

    let listed = store
        .list(&ListQuery::new(Some(Status::Sent), 10))
        .await
        .expect("list sent");
    assert_eq!(bodies_of(&listed), ["k1", "free"]);
    for (row, m) in listed.iter().zip(&sent) {
        assert_eq!((row.id, row.status, row.attempts), (m.id, Status::Sent, 1));
        let at = row.sent_at.expect("sent_at of a kept sent row");
        let age = postbox_core::since(SystemTime::now(), at);
        assert!(age < Duration::from_secs(3600), "sent_at is off by {age:?}");
    }
    let pending = store
        .list(&ListQuery::new(Some(Status::Pending), 10))
        .await
        .expect("list pending");
    assert_eq!(bodies_of(&pending), ["k2"]);
    let key_k = store
        .list(&ListQuery::new(None, 10).filter(Filter::all().key("k")))
        .await
        .expect("list key");
    let states: Vec<_> = key_k
        .iter()
        .map(|r| (r.status, r.sent_at.is_some()))
        .collect();
    assert_eq!(states, [(Status::Sent, true), (Status::Pending, false)]);

    // k's sent head does not hold k2 back; l is still leased
    let (token, next) = claim_bodies(&store, 10).await;
    assert_eq!(
        bodies(&next),
        ["k2"],
        "a sent row blocked its key or was claimed"
    );
    complete_all(&store, token, &next, Disposition::Sent).await;
    h.advance(LEASE * 2).await;
    let (_, again) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&again), ["l1"], "a sent row was claimed again");
    assert_eq!(held[0].id, again[0].id);

    assert_eq!(store.replay(&Filter::all()).await.expect("replay"), 0);
    assert_eq!(store.skip(&Filter::all()).await.expect("skip"), 0);
    let s = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!((s.sent, s.pending, s.dead), (3, 1, 0), "{s:?}");

    let purged = store
        .purge(&PurgeQuery::new(Status::Sent, Filter::all().topic("b")))
        .await
        .expect("purge");
    assert_eq!(purged, 1);
    let purged = store
        .purge(&PurgeQuery::new(Status::Dead, Filter::all()))
        .await
        .expect("purge");
    assert_eq!(purged, 0, "purging dead rows deleted sent ones");
    let s = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!(sent_count(&s), (2, 1), "{s:?}");
}

/// Fencing holds with a retention: a completion under a lease that was
/// taken over does not mark the row sent, and once it is sent no
/// completion, stale or current, changes it again.
pub async fn kept_sent_messages_are_fenced<H: StoreHarness>(h: H) {
    let store = h.retaining_store(KEEP);
    h.enqueue(vec![msg("t", Some("k"), "a"), msg("t", None, "b")])
        .await;
    let (old, first) = claim_bodies(&store, 10).await;
    h.advance(LEASE + Duration::from_secs(1)).await;
    let (new, second) = claim_bodies(&store, 10).await;
    assert_eq!(second.len(), 2);
    let all = |msgs: &[Message], d: Disposition| -> Vec<Completion> {
        msgs.iter()
            .map(|m| Completion::new(m.seq, d.clone()))
            .collect()
    };
    let r = store
        .complete(old, &all(&first, Disposition::Sent))
        .await
        .expect("complete");
    assert_eq!((r.applied, r.lost), (0, 2), "stale Sent applied: {r:?}");
    let s = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!((s.sent, s.leased), (0, 2), "{s:?}");

    complete_all(&store, new, &second, Disposition::Sent).await;
    for token in [old, new] {
        for d in [
            Disposition::Sent,
            dead(true),
            retry(Duration::from_secs(1)),
            Disposition::Release,
        ] {
            let r = store
                .complete(token, &all(&second, d.clone()))
                .await
                .expect("complete");
            assert_eq!(
                (r.applied, r.lost),
                (0, 2),
                "{d:?} changed a sent row: {r:?}"
            );
        }
    }
    let s = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!((s.sent, s.dead, s.pending), (2, 0, 0), "{s:?}");
    let rows = store
        .list(&ListQuery::new(Some(Status::Sent), 10))
        .await
        .expect("list");
    assert!(
        rows.iter().all(|r| r.attempts == 2 && !r.parked),
        "{rows:?}"
    );
}

/// `purge_sent` deletes only sent messages whose `sent_at` is at least
/// `older_than` ago on the store's clock, at most `limit` per call, and
/// never a pending or dead one however old.
pub async fn purge_sent_deletes_only_expired_sent<H: StoreHarness>(h: H) {
    let store = h.retaining_store(KEEP);
    let far = Duration::from_secs(100 * 3600);
    h.enqueue(vec![
        msg("t", None, "s1"),
        msg("t", None, "s2"),
        msg("t", None, "s3"),
        msg("t", Some("k"), "dead"),
        msg("t", None, "delayed").delay(far),
    ])
    .await;
    let (token, got) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&got), ["s1", "s2", "s3", "dead"]);
    let (to_dead, to_send): (Vec<_>, Vec<_>) = got.into_iter().partition(|m| m.payload == "dead");
    complete_all(&store, token, &to_send, Disposition::Sent).await;
    complete_all(&store, token, &to_dead, dead(true)).await;
    assert_eq!(store.purge_sent(KEEP, 500).await.expect("purge_sent"), 0);

    h.advance(KEEP / 2).await;
    h.enqueue(vec![msg("t", None, "s4")]).await;
    let (token, got) = claim_bodies(&store, 10).await;
    assert_eq!(bodies(&got), ["s4"]);
    complete_all(&store, token, &got, Disposition::Sent).await;
    assert_eq!(store.purge_sent(KEEP, 500).await.expect("purge_sent"), 0);

    h.advance(KEEP / 2 + Duration::from_secs(60)).await;
    assert_eq!(store.purge_sent(KEEP, 2).await.expect("purge_sent"), 2);
    assert_eq!(store.purge_sent(KEEP, 500).await.expect("purge_sent"), 1);
    assert_eq!(store.purge_sent(KEEP, 500).await.expect("purge_sent"), 0);
    let s = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!((s.sent, s.dead, s.pending), (1, 1, 1), "{s:?}");
    let kept = store
        .list(&ListQuery::new(Some(Status::Sent), 10))
        .await
        .expect("list");
    assert_eq!(bodies_of(&kept), ["s4"]);

    // the age is the caller's, not the store's retention
    assert_eq!(
        store.purge_sent(KEEP / 4, 500).await.expect("purge_sent"),
        1
    );
    let s = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!((s.sent, s.dead, s.pending), (0, 1, 1), "{s:?}");
}

/// A running relay deletes the sent messages kept past the store's
/// retention, and only those, from its cleanup task.
pub async fn relay_cleans_up_sent_past_retention<H: StoreHarness>(h: H) {
    let store = h.retaining_store(KEEP);
    h.enqueue(vec![msg("t", Some("k"), "old-1"), msg("t", None, "old-2")])
        .await;
    let publisher = TestPublisher::recording();
    let relay = Relay::builder(store.clone(), publisher.clone())
        .cleanup_interval(Some(Duration::from_millis(20)))
        .poll_interval(Duration::from_millis(10))
        .heartbeat_interval(None)
        .stats_interval(None)
        .build()
        .expect("relay");
    assert_eq!(relay.tick().await.expect("tick").sent, 2);
    assert_eq!(relay.clean_up_sent().await.expect("clean up"), 0);
    assert_eq!(
        store.stats(&Filter::all()).await.expect("stats").sent,
        2,
        "cleaned up before the retention"
    );

    h.advance(KEEP + Duration::from_secs(60)).await;
    h.enqueue(vec![msg("t", Some("k"), "young")]).await;
    assert_eq!(relay.tick().await.expect("tick").sent, 1);

    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let relay = relay.clone();
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = store.stats(&Filter::all()).await.expect("stats");
        if s.sent <= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay did not clean up: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    running.await.expect("relay task");
    let kept = store
        .list(&ListQuery::new(Some(Status::Sent), 10))
        .await
        .expect("list");
    assert_eq!(bodies_of(&kept), ["young"], "a young sent row was deleted");
    assert_eq!(bodies(&publisher.delivered()), ["old-1", "old-2", "young"]);

    // a relay over a store without retention has nothing to clean up
    let plain = Relay::builder(h.store(), TestPublisher::recording())
        .build()
        .expect("relay");
    assert_eq!(plain.clean_up_sent().await.expect("clean up"), 0);
    assert_eq!(store.stats(&Filter::all()).await.expect("stats").sent, 1);
}

/// The relay retries transient failures until `max_attempts`, then
/// dead-letters with the reason and parks the key; other keys are unaffected.
pub async fn relay_retries_then_dead_letters<H: StoreHarness>(h: H) {
    let store = h.store();
    h.enqueue(vec![
        msg("t", Some("bad"), "bad1"),
        msg("t", Some("bad"), "bad2"),
        msg("t", Some("good"), "good1"),
    ])
    .await;
    let publisher = TestPublisher::fail_key("bad");
    let relay = Relay::builder(store.clone(), publisher.clone())
        .max_attempts(3)
        .retry_policy(RetryPolicy::new(
            Duration::from_secs(1),
            Duration::from_secs(1),
        ))
        .build()
        .expect("relay");
    for _ in 0..5 {
        relay.tick().await.expect("tick");
        h.advance(Duration::from_secs(2)).await;
    }
    assert_eq!(bodies(&publisher.delivered()), ["good1"]);
    let deads = store
        .list(&ListQuery::new(Some(Status::Dead), 10))
        .await
        .expect("list");
    assert_eq!(bodies_of(&deads), ["bad1"]);
    assert_eq!(deads[0].attempts, 3);
    assert!(deads[0].parked);
    assert!(
        deads[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("gave up after 3 attempts")),
        "{:?}",
        deads[0].last_error
    );
    assert_eq!(publisher.attempts(), 4, "bad1 ×3 + good1; bad2 never tried");
}

/// A publisher's absurd wait hint (`Retry-After: 99999999999999`) counts
/// as [`MAX_RETRY_AFTER`]: the retry is recorded (no timestamp overflows in
/// the store, which would fail the batch's whole completion) and the
/// message comes back after that long, not before.
pub async fn relay_caps_a_huge_retry_after<H: StoreHarness>(h: H) {
    let store = h.store();
    h.enqueue(vec![msg("t", Some("k"), "a")]).await;
    let publisher = TestPublisher::new(|m| {
        if m.attempt == 1 {
            Behaviour::Throttled(Duration::from_secs(99_999_999_999_999))
        } else {
            Behaviour::Deliver
        }
    });
    let relay = Relay::builder(store.clone(), publisher.clone())
        .build()
        .expect("relay");
    let report = relay.tick().await.expect("the retry is recorded");
    assert_eq!(report.retried, 1, "{report:?}");
    let s = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!((s.retrying, s.leased), (1, 0), "{s:?}");
    h.advance(MAX_RETRY_AFTER - Duration::from_secs(60)).await;
    relay.tick().await.expect("tick");
    assert!(publisher.delivered().is_empty(), "back before the cap");
    h.advance(Duration::from_secs(120)).await;
    relay.tick().await.expect("tick");
    assert_eq!(bodies(&publisher.delivered()), ["a"]);
}

/// A publish that reaches the deadline of `publish_until` keeps what it
/// finished: the messages sent before it are sent (not retried, so not sent
/// again), the one cut short is retried with its attempt counted, and those
/// never started come back at once without one.
pub async fn relay_keeps_what_a_late_batch_sent<H: StoreHarness>(h: H) {
    let store = h.store();
    h.enqueue(vec![
        msg("t", Some("k1"), "a"),
        msg("t", Some("k2"), "b"),
        msg("t", Some("k3"), "slow"),
        msg("t", Some("k4"), "d"),
        msg("t", Some("k5"), "e"),
    ])
    .await;
    // one message after the other; "slow" never finishes its first attempt
    let publisher = TestPublisher::new(|m| {
        if m.payload == "slow".as_bytes() && m.attempt == 1 {
            Behaviour::Paced(Duration::from_secs(3600))
        } else {
            Behaviour::Paced(Duration::from_millis(10))
        }
    });
    let relay = Relay::builder(store.clone(), publisher.clone())
        .send_timeout(Duration::from_secs(3))
        // "slow" must not come back within the second tick
        .retry_policy(RetryPolicy::new(
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        ))
        .build()
        .expect("relay");
    let report = relay.tick().await.expect("tick");
    assert_eq!(
        (report.sent, report.retried, report.released),
        (2, 1, 2),
        "{report:?}"
    );
    assert_eq!(bodies(&publisher.delivered()), ["a", "b"]);
    let s = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!((s.ready, s.retrying, s.leased), (2, 1, 0), "{s:?}");

    relay.tick().await.expect("tick");
    let delivered = publisher.delivered();
    assert_eq!(bodies(&delivered), ["a", "b", "d", "e"]);
    assert!(
        delivered[2..].iter().all(|m| m.attempt == 1),
        "a message never sent had its attempt counted: {delivered:?}"
    );
}

/// Whatever text a publisher gives as its reason, the relay records it: a
/// NUL (PostgreSQL refuses one in text, and with it the whole completion)
/// or a megabyte of it. The batch's other message is recorded as sent,
/// and the failed ones are retried and then dead with their reason.
pub async fn relay_records_any_reason_a_publisher_gives<H: StoreHarness>(h: H) {
    let store = h.store();
    h.enqueue(vec![
        msg("t", Some("k1"), "nul"),
        msg("t", None, "fine"),
        msg("t", Some("k2"), "huge"),
    ])
    .await;
    let publisher = TestPublisher::new(|m| match &m.payload[..] {
        b"nul" => Behaviour::Transient("broker said \0 and \u{1b}[31m".to_owned()),
        b"huge" => Behaviour::Reject("x".repeat(1 << 20)),
        _ => Behaviour::Deliver,
    });
    let relay = Relay::builder(store.clone(), publisher.clone())
        .max_attempts(1)
        .build()
        .expect("relay");
    let report = relay.tick().await.expect("tick");
    assert_eq!(
        (report.sent, report.dead, report.lost),
        (1, 2, 0),
        "{report:?}"
    );
    let s = store.stats(&Filter::all()).await.expect("stats");
    assert_eq!((s.dead, s.leased), (2, 0), "{s:?}");
    let dead = store
        .list(&ListQuery::new(Some(Status::Dead), 10))
        .await
        .expect("list");
    let errors: Vec<&str> = dead
        .iter()
        .map(|r| r.last_error.as_deref().unwrap_or_default())
        .collect();
    assert!(
        errors[0].ends_with(": broker said \u{fffd} and \u{fffd}[31m"),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("xxx")
            && errors[1].ends_with('…')
            && errors[1].chars().count() == 2_000,
        "{} chars",
        errors[1].chars().count()
    );
}

fn bodies_of(rows: &[postbox_core::MessageRecord]) -> Vec<String> {
    rows.iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect()
}

/// A rejected message is dead at once; with `on_dead = skip` its key goes on.
pub async fn relay_rejection_with_skip_policy<H: StoreHarness>(h: H) {
    let store = h.store();
    h.enqueue(vec![
        msg("t", Some("k"), "poison"),
        msg("t", Some("k"), "next"),
    ])
    .await;
    let publisher = TestPublisher::new(|m| {
        if m.payload == "poison".as_bytes() {
            Behaviour::Reject("schema mismatch".into())
        } else {
            Behaviour::Deliver
        }
    });
    let relay = Relay::builder(store.clone(), publisher.clone())
        .on_dead(OnDead::Skip)
        .build()
        .expect("relay");
    relay.tick().await.expect("tick");
    relay.tick().await.expect("tick");
    assert_eq!(bodies(&publisher.delivered()), ["next"]);
    let deads = store
        .list(&ListQuery::new(Some(Status::Dead), 10))
        .await
        .expect("list");
    assert_eq!(deads.len(), 1);
    assert!(!deads[0].parked);
    assert_eq!(deads[0].attempts, 1);
    assert_eq!(deads[0].last_error.as_deref(), Some("schema mismatch"));
}

/// Three relays at once, with transient failures injected, deliver every
/// committed message, none from a rolled-back transaction, and keep the
/// order of each key.
pub async fn concurrent_relays_keep_key_order<H: StoreHarness>(h: H) {
    let store = h.store();
    let keys = 12;
    let per_key = 15;
    let mut expected = HashMap::new();
    for round in 0..per_key {
        let batch: Vec<NewMessage> = (0..keys)
            .map(|k| msg("orders", Some(&format!("key-{k}")), &format!("{k}/{round}")))
            .chain((0..3).map(|i| msg("keyless", None, &format!("free-{round}-{i}"))))
            .collect();
        for m in &batch {
            expected.insert(m.id, ());
        }
        h.enqueue(batch).await;
        h.enqueue_rolled_back(vec![msg("orders", Some("key-0"), "ghost")])
            .await;
    }
    // every third attempt of anything fails once
    let publisher = TestPublisher::new(|m| {
        if m.attempt == 1 && m.seq % 3 == 0 {
            Behaviour::Transient("flaky".into())
        } else {
            Behaviour::Deliver
        }
    });
    let shutdown = CancellationToken::new();
    let mut relays = Vec::new();
    for _ in 0..3 {
        let relay = Relay::builder(store.clone(), publisher.clone())
            .batch_size(7)
            .concurrency(2)
            .poll_interval(Duration::from_millis(5))
            .retry_policy(RetryPolicy::immediate())
            .build()
            .expect("relay");
        let sd = shutdown.clone();
        relays.push(tokio::spawn(async move { relay.run(sd).await }));
    }
    let total = expected.len() as u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = store.stats(&Filter::all()).await.expect("stats");
        if s.pending == 0 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    for r in relays {
        r.await.expect("relay task");
    }
    let delivered = publisher.delivered();
    let distinct: std::collections::HashSet<_> = delivered.iter().map(|m| m.id).collect();
    assert!(
        delivered.iter().all(|m| expected.contains_key(&m.id)),
        "a rolled-back message was delivered"
    );
    assert_eq!(
        distinct.len() as u64,
        total,
        "not every committed message was delivered"
    );
    let violations = key_order_violations(&delivered);
    assert!(violations.is_empty(), "order violations: {violations:?}");
}

/// Expands to one `#[tokio::test]` per conformance check. `$harness` is an
/// async function (path) returning a fresh [`StoreHarness`].
///
/// ```ignore
/// async fn harness() -> MyHarness { ... }
/// postbox_testkit::store_conformance_tests!(harness);
/// ```
#[macro_export]
macro_rules! store_conformance_tests {
    ($harness:path) => {
        $crate::__store_conformance_tests!(
            $harness;
            fields_round_trip,
            rolled_back_enqueue_is_never_claimed,
            redelivered_after_lease_expires,
            stale_lease_cannot_complete,
            keyed_claims_take_only_the_head,
            keyless_claims_run_in_parallel,
            retry_waits_for_its_delay,
            release_returns_without_counting,
            dead_message_parks_key_until_replay,
            skip_unparks_key,
            dead_without_park_lets_key_continue,
            a_replayed_message_waits_for_the_lease_on_its_key,
            delayed_delivery_waits_and_holds_its_key,
            tenant_scoping,
            stats_are_exact,
            stats_break_down_by_topic_and_tenant,
            relay_heartbeats_are_recorded_and_age,
            relay_run_heartbeats_until_shutdown,
            tenants_take_turns,
            purge_deletes_only_matching_dead,
            sent_messages_are_deleted_without_retention,
            sent_messages_are_kept_with_retention,
            kept_sent_messages_are_fenced,
            purge_sent_deletes_only_expired_sent,
            relay_cleans_up_sent_past_retention,
            relay_retries_then_dead_letters,
            relay_caps_a_huge_retry_after,
            relay_keeps_what_a_late_batch_sent,
            relay_records_any_reason_a_publisher_gives,
            relay_rejection_with_skip_policy,
            concurrent_relays_keep_key_order,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __store_conformance_tests {
    ($harness:path; $($name:ident),* $(,)?) => {
        mod store_conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::store_suite::$name($harness().await).await;
                }
            )*
        }
    };
}
