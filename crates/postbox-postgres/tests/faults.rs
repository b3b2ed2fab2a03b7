//! Failures: connections killed under three relays, the LISTEN connection
//! killed, unreachable or misconfigured databases, bad names.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{PgHarness, TestDb};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use postbox_core::{
    CancellationToken, ClaimRequest, Completion, Disposition, Filter, ListQuery, Message,
    MessageRecord, NewMessage, PublishOutcome, Publisher, Relay, RetryPolicy, Status, Store,
    StoreError,
};
use postbox_postgres::{PgOutbox, PgStore};
use postbox_testkit::{TestPublisher, key_order_violations};

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Forwards to a shared publisher and counts what this relay delivered.
#[derive(Clone)]
struct Counted {
    inner: TestPublisher,
    count: Arc<AtomicUsize>,
}

impl Publisher for Counted {
    async fn publish(&self, batch: &[Message]) -> Vec<PublishOutcome> {
        let out = self.inner.publish(batch).await;
        self.count
            .fetch_add(out.iter().filter(|o| o.is_ok()).count(), Ordering::Relaxed);
        out
    }
}

async fn terminate(app: &sqlx::PgPool, db: &str, application: &str) -> u64 {
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
    )
    .bind(db)
    .bind(application)
    .fetch_all(app)
    .await
    .expect("terminate");
    killed.into_iter().filter(|k| *k).count() as u64
}

/// Three relays (separate pools) drain a keyed backlog while one relay's
/// connections are killed again and again with `pg_terminate_backend`:
/// everything is delivered, per-key order holds, the victim reconnects
/// and keeps delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_survive_killed_connections() {
    let h = PgHarness::new().await;
    let mut ids = HashSet::new();
    for round in 0..40 {
        let batch: Vec<NewMessage> = (0..10)
            .map(|k| NewMessage::new("t", format!("{k}/{round}")).key(format!("key-{k}")))
            .chain((0..5).map(|i| NewMessage::new("t", format!("free-{round}-{i}"))))
            .collect();
        ids.extend(batch.iter().map(|m| m.id));
        h.outbox
            .enqueue_batch(&h.app, &batch)
            .await
            .expect("enqueue");
    }

    let publisher = TestPublisher::recording();
    let victim_count = Arc::new(AtomicUsize::new(0));
    let shutdown = CancellationToken::new();
    let mut relays = Vec::new();
    for i in 0..3 {
        let mut options = postbox_postgres::relay_connect_options(h.db.options());
        if i == 0 {
            // kept by the store's claim pool (a name starting with
            // `postbox-relay`), so its claim sessions are killed too
            options = options.application_name("postbox-relay-victim");
        }
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(3)
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .expect("pool");
        let store = h.outbox.store(pool);
        let p = Counted {
            inner: publisher.clone(),
            count: if i == 0 {
                Arc::clone(&victim_count)
            } else {
                Arc::new(AtomicUsize::new(0))
            },
        };
        let relay = Relay::builder(store, p)
            .batch_size(5)
            .poll_interval(Duration::from_millis(10))
            .retry_policy(RetryPolicy::immediate())
            .build()
            .expect("relay");
        let sd = shutdown.clone();
        relays.push(tokio::spawn(async move { relay.run(sd).await }));
    }
    // kill the victim's connections a few times while it works
    let mut kills = 0;
    let mut claim_sessions = 0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        // sessions whose last statement was a claim or a completion
        let claiming: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = $1 AND application_name = 'postbox-relay-victim'
                AND query LIKE '%lease_token%'",
        )
        .bind(&h.db.name)
        .fetch_one(&h.app)
        .await
        .expect("victim sessions");
        claim_sessions += claiming;
        kills += terminate(&h.app, &h.db.name, "postbox-relay-victim").await;
    }
    assert!(kills > 0, "no connection of the victim relay was killed");
    assert!(
        claim_sessions > 0,
        "none of the victim's claim or completion sessions was among those killed"
    );
    let before = victim_count.load(Ordering::Relaxed);
    // it reconnects and delivers again: add work and see the victim take some
    let mut round = 40;
    wait_until("the victim relay to deliver after the kills", || {
        round += 1;
        let batch: Vec<NewMessage> = (0..5)
            .map(|i| NewMessage::new("t", format!("late-{round}-{i}")))
            .collect();
        ids.extend(batch.iter().map(|m| m.id));
        let outbox = h.outbox.clone();
        let app = h.app.clone();
        let victim = Arc::clone(&victim_count);
        async move {
            outbox.enqueue_batch(&app, &batch).await.expect("enqueue");
            tokio::time::sleep(Duration::from_millis(30)).await;
            victim.load(Ordering::Relaxed) > before
        }
    })
    .await;
    wait_until("everything delivered", || async {
        h.store.stats(&Filter::all()).await.expect("stats").pending == 0
    })
    .await;
    shutdown.cancel();
    for r in relays {
        r.await.expect("relay task");
    }
    // one shared log, in the order the broker saw the messages
    let delivered = publisher.delivered();
    let distinct: HashSet<_> = delivered.iter().map(|m| m.id).collect();
    assert_eq!(distinct, ids, "not every message was delivered");
    let violations = key_order_violations(&delivered);
    assert!(
        violations.is_empty(),
        "per-key order broken: {violations:?}"
    );
}

/// `notified()` waits from the call, not from the first poll: a relay takes
/// the future before it claims and awaits it only after an empty claim, so a
/// notification that arrives in between must resolve it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_before_the_first_poll_is_not_lost() {
    let h = PgHarness::new().await;
    let store = h.store.clone();
    let probe = tokio::spawn({
        let store = store.clone();
        async move { store.notified().await }
    });
    wait_until("LISTEN to start", || async { store.is_listening() }).await;
    let taken_early = store.notified();
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(h.outbox.channel())
        .execute(&h.app)
        .await
        .expect("notify");
    // the probe, polled all along, says the listener has passed it on
    tokio::time::timeout(Duration::from_secs(30), probe)
        .await
        .expect("the listener never passed the notification on")
        .expect("probe task");
    tokio::time::timeout(Duration::from_secs(5), taken_early)
        .await
        .expect("a notification that arrived before the first poll was lost");
}

/// An operator's replay makes rows claimable that no producer announced: the
/// store NOTIFYs, so relays listening claim them now, not at their next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_wakes_listening_relays() {
    let h = PgHarness::new().await;
    let store = h.store.clone();
    h.outbox
        .enqueue(&h.app, &NewMessage::new("t", "x").key("k"))
        .await
        .expect("enqueue");
    let claim = store
        .claim(&postbox_core::ClaimRequest::new(
            10,
            Duration::from_secs(30),
        ))
        .await
        .expect("claim");
    common::complete_all(&store, &claim, common::parked()).await;
    // the listener's own wake when it starts listening ends this first wait
    tokio::time::timeout(Duration::from_secs(30), store.notified())
        .await
        .expect("the listener never started");
    let probe = store.notified();
    assert_eq!(store.replay(&Filter::default()).await.expect("replay"), 1);
    tokio::time::timeout(Duration::from_secs(30), probe)
        .await
        .expect("no notification after the replay");
}

/// With the LISTEN connection killed, polling still delivers; the listener
/// comes back on its own and a NOTIFY then wakes `notified()` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_listen_connection_falls_back_to_polling_and_returns() {
    let h = PgHarness::new().await;
    let store = h.store.clone();
    let channel = h.outbox.channel();
    let notify = |app: sqlx::PgPool, channel: String| async move {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(channel)
            .execute(&app)
            .await
            .expect("notify");
    };

    // start the listener and see a notification arrive
    let woke = tokio::spawn({
        let store = store.clone();
        async move { store.notified().await }
    });
    wait_until("LISTEN to start", || async { store.is_listening() }).await;
    notify(h.app.clone(), channel.clone()).await;
    tokio::time::timeout(Duration::from_secs(30), woke)
        .await
        .expect("notified() never resolved")
        .expect("task");

    // kill it; a relay keeps delivering by polling meanwhile
    let old_pid: i32 = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = 'postbox-listener'",
    )
    .bind(&h.db.name)
    .fetch_one(&h.app)
    .await
    .expect("listener session");
    assert!(terminate(&h.app, &h.db.name, "postbox-listener").await >= 1);
    let publisher = TestPublisher::recording();
    let relay = Relay::builder(store.clone(), publisher.clone())
        .poll_interval(Duration::from_millis(20))
        .build()
        .expect("relay");
    let shutdown = CancellationToken::new();
    let run = tokio::spawn({
        let relay = relay.clone();
        let sd = shutdown.clone();
        async move { relay.run(sd).await }
    });
    h.outbox
        .enqueue(&h.app, &NewMessage::new("t", "while-killed").key("k"))
        .await
        .expect("enqueue");
    wait_until("delivery by polling", || async {
        publisher.delivered().len() == 1
    })
    .await;

    // the listener is back, on a new session
    wait_until("LISTEN to come back", || async {
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = 'postbox-listener' AND query LIKE 'LISTEN%'",
        )
        .bind(&h.db.name)
        .fetch_optional(&h.app)
        .await
        .expect("activity");
        store.is_listening() && pid.is_some_and(|p| p != old_pid)
    })
    .await;
    let woke = tokio::spawn({
        let store = store.clone();
        async move { store.notified().await }
    });
    // the notification may race the task's registration: repeat until seen
    let app = h.app.clone();
    let ch = channel.clone();
    let pinger = tokio::spawn(async move {
        loop {
            notify(app.clone(), ch.clone()).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    tokio::time::timeout(Duration::from_secs(30), woke)
        .await
        .expect("notified() did not resolve after LISTEN came back")
        .expect("task");
    pinger.abort();
    shutdown.cancel();
    run.await.expect("relay");
}

#[tokio::test]
async fn unreachable_database_is_unavailable_naming_the_cause() {
    // a closed port on loopback: connection refused, which the pool retries
    // until its acquire timeout (5 s) and then reports only as timed out
    let port = postbox_testkit::closed_port();
    let err = PgStore::connect(&format!("postgres://postbox:topsecret@127.0.0.1:{port}/db"))
        .await
        .expect_err("connected?");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(err.is_transient());
    let text = err.to_string();
    assert!(
        text.contains(&format!("postgres://postbox:***@127.0.0.1:{port}/db")),
        "{text}"
    );
    assert!(!text.contains("topsecret"), "{text}");
    // the cause, named once, instead of the pool's timeout
    assert!(text.to_lowercase().contains("refused"), "{text}");
    assert_eq!(text.matches("cannot connect to").count(), 1, "{text}");
    let all = postbox_testkit::error_chain(&err);
    assert!(!all.contains("pool timed out"), "{all}");
    assert!(!all.contains("topsecret"), "{all}");
}

#[tokio::test]
async fn missing_database_and_bad_url_are_clear_config_errors() {
    let admin = common::admin_url().await;
    let (base, _) = admin.rsplit_once('/').expect("url");
    // trust auth ignores passwords, so the password below must merely never show
    let url = format!(
        "{base}/postbox_no_such_db_{:x}?password=topsecret",
        fastrand::u32(..)
    );
    let err = PgStore::connect(&url).await.expect_err("connected?");
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("postbox_no_such_db_") && text.contains("does not exist"),
        "{text}"
    );
    assert!(!text.contains("topsecret"), "{text}");

    let err = PgStore::connect("postgres://u:topsecret@host:notaport/db")
        .await
        .expect_err("parsed?");
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    assert!(!err.to_string().contains("topsecret"), "{err}");
}

#[test]
fn table_names_with_quotes_or_spaces_are_refused() {
    for bad in [
        "my outbox",
        "out\"box",
        "x; DROP TABLE y",
        "",
        "9lives",
        &"a".repeat(49),
    ] {
        let err = PgOutbox::new(bad).expect_err(bad);
        assert!(matches!(err, StoreError::Config(_)), "{err:?}");
        assert!(err.to_string().contains("table name"), "{err}");
    }
    assert!(PgOutbox::with_schema("bad schema", "ok").is_err());
    assert!(PgOutbox::with_schema("billing", "outbox_v2").is_ok());
}

/// Migrates each of `outboxes` at once, each from a pool of one connection
/// of its own (as separate processes would).
async fn migrate_at_once(url: &str, outboxes: Vec<PgOutbox>) -> Vec<Result<(), StoreError>> {
    let tasks: Vec<_> = outboxes
        .into_iter()
        .map(|outbox| {
            let url = url.to_owned();
            tokio::spawn(async move {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&url)
                    .await
                    .expect("pool");
                outbox.migrate(&pool).await
            })
        })
        .collect();
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.expect("migrator"));
    }
    done
}

/// Several processes migrating at once: all succeed, the schema is made
/// once, and a custom schema and table work end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_into_a_custom_schema() {
    let db = TestDb::create().await;
    let outbox = PgOutbox::with_schema("billing", "events_outbox").expect("names");
    for migrated in migrate_at_once(&db.url, vec![outbox.clone(); 6]).await {
        migrated.expect("migrate");
    }
    let pool = db.app_pool(2).await;
    let versions: Vec<i32> =
        sqlx::query_scalar("SELECT version FROM billing.events_outbox_migrations ORDER BY version")
            .fetch_all(&pool)
            .await
            .expect("history");
    assert_eq!(versions, [1, 2, 3, 4, 5, 6, 7, 8]);
    outbox.migrate(&pool).await.expect("idempotent");
    outbox
        .enqueue(&pool, &NewMessage::new("t", "x").key("k"))
        .await
        .expect("enqueue");
    let store = outbox.store(pool);
    assert_eq!(store.stats(&Filter::all()).await.expect("stats").pending, 1);
}

/// A table at schema version 5 (the trigger runs for every row) keeps
/// working with this code before and after `migrate` takes it to the latest
/// version (from 6 on the trigger runs only for rows without a `seq`):
/// `enqueue` gives a
/// `seq` that the old trigger replaces, plain SQL and batches keep going,
/// and the key's order survives the upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_5_table_upgrades_in_place_and_keeps_key_order() {
    let db = TestDb::create().await;
    let pool = db.app_pool(4).await;
    let v5 = [
        include_str!("../migrations/0001_outbox.sql"),
        include_str!("../migrations/0002_relays.sql"),
        include_str!("../migrations/0003_fillfactor.sql"),
        include_str!("../migrations/0004_tenants.sql"),
        include_str!("../migrations/0005_sent_retention.sql"),
    ];
    let mut setup = String::from(
        "CREATE TABLE public.postbox_outbox_migrations (
             version integer PRIMARY KEY, name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO public.postbox_outbox_migrations (version, name)
             VALUES (1, 'outbox'), (2, 'relays'), (3, 'fillfactor'), (4, 'tenants'), (5, 'sent_retention');",
    );
    for sql in v5 {
        setup.push_str(
            &sql.replace("{schema}", "public")
                .replace("{t}", "postbox_outbox"),
        );
    }
    sqlx::raw_sql(&setup)
        .execute(&pool)
        .await
        .expect("version 5 schema");

    let outbox = PgOutbox::default();
    let plain = "INSERT INTO public.postbox_outbox (topic, key, payload) VALUES ('t', 'K', $1)";
    let write = |body: &'static str, how: u8| {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        async move {
            let msg = NewMessage::new("t", body).key("K");
            match how {
                0 => outbox.enqueue(&pool, &msg).await.expect("enqueue"),
                1 => outbox
                    .enqueue_batch(&pool, &[msg, NewMessage::new("t", "other").key("L")])
                    .await
                    .expect("enqueue_batch"),
                _ => {
                    sqlx::query(plain)
                        .bind(body.as_bytes())
                        .execute(&pool)
                        .await
                        .expect("plain insert");
                }
            }
        }
    };
    write("1", 0).await;
    write("2", 1).await;
    write("3", 2).await;
    outbox
        .migrate(&pool)
        .await
        .expect("upgrade to the latest version");
    let versions: Vec<i32> =
        sqlx::query_scalar("SELECT version FROM public.postbox_outbox_migrations ORDER BY version")
            .fetch_all(&pool)
            .await
            .expect("history");
    assert_eq!(versions, [1, 2, 3, 4, 5, 6, 7, 8]);
    write("4", 0).await;
    write("5", 1).await;
    write("6", 2).await;

    let bodies: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT payload FROM public.postbox_outbox WHERE key = 'K' ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .expect("rows");
    let bodies: Vec<String> = bodies
        .into_iter()
        .map(|b| String::from_utf8(b).expect("utf-8"))
        .collect();
    assert_eq!(
        bodies,
        ["1", "2", "3", "4", "5", "6"],
        "seq order is write order across the upgrade"
    );
}

/// Eight keyless rows, `store`'s full claim of four completed, and its next
/// claim of four: a backlog claim, held (its transaction open, its rows locked,
/// not leased). Returns the held claim.
async fn held_claim(h: &PgHarness, store: &PgStore, lease: Duration) -> postbox_core::Claim {
    let msgs: Vec<NewMessage> = (0..8)
        .map(|i| NewMessage::new("t", format!("m{i}")))
        .collect();
    h.outbox
        .enqueue_batch(&h.app, &msgs)
        .await
        .expect("enqueue");
    let req = ClaimRequest::new(4, lease);
    let first = store.claim(&req).await.expect("claim");
    assert_eq!(first.messages.len(), 4);
    common::complete_all(store, &first, Disposition::Sent).await;
    assert_eq!(store.next_claim_statement(None), "keyless_bulk");
    let held = store.claim(&req).await.expect("claim");
    assert_eq!(held.messages.len(), 4);
    assert_eq!(
        store.held_batches(),
        1,
        "the backlog claim holds its transaction"
    );
    assert!(
        held.messages.iter().all(|m| m.attempt == 1),
        "a held claim reports the attempt it starts"
    );
    held
}

/// A second store over `h`'s table, as another relay process would have.
async fn another_store(h: &PgHarness) -> PgStore {
    PgStore::connect_with(&h.db.url, h.outbox.clone())
        .await
        .expect("connect")
}

/// `store`'s first claim (of up to 10) that gets rows, polled with
/// [`wait_until`].
async fn claim_when_back(store: &PgStore, what: &str) -> postbox_core::Claim {
    let got = std::sync::Mutex::new(None);
    let got_ref = &got;
    wait_until(what, move || async move {
        let c = store
            .claim(&ClaimRequest::new(10, Duration::from_secs(30)))
            .await
            .expect("claim");
        let back = !c.messages.is_empty();
        if back {
            *got_ref.lock().expect("lock") = Some(c);
        }
        back
    })
    .await;
    got.into_inner().expect("lock").expect("a claim")
}

/// Terminates the sessions of `h`'s database that sit idle in a
/// transaction (held batches being published: nothing else here does);
/// returns how many.
async fn end_held_batches(h: &PgHarness) -> u64 {
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = $1 AND state = 'idle in transaction'",
    )
    .bind(&h.db.name)
    .fetch_all(&h.app)
    .await
    .expect("terminate");
    ended.into_iter().filter(|k| *k).count() as u64
}

async fn records(store: &PgStore) -> Vec<MessageRecord> {
    store.list(&ListQuery::new(None, 100)).await.expect("list")
}

/// Records `completions` under `token` (one part of a batch): `(applied,
/// lost)`.
async fn complete_part(
    store: &PgStore,
    token: uuid::Uuid,
    completions: &[Completion],
) -> (u64, u64) {
    let done = store.complete(token, completions).await.expect("complete");
    (done.applied, done.lost)
}

/// A held batch's outcomes are recorded in its own transaction like a
/// lease's: sent rows deleted, a retry and a dead letter counted as an
/// attempt with their error, a released row untouched. While it is held,
/// another store's claims skip its rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_batch_records_every_outcome_and_is_skipped_while_held() {
    let h = PgHarness::new().await;
    let held = held_claim(&h, &h.store, Duration::from_secs(30)).await;
    let other = another_store(&h).await;
    h.outbox
        .enqueue_batch(&h.app, &[NewMessage::new("t", "late")])
        .await
        .expect("enqueue");
    let theirs = other
        .claim(&ClaimRequest::new(10, Duration::from_secs(30)))
        .await
        .expect("claim");
    assert_eq!(
        theirs
            .messages
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect::<Vec<_>>(),
        ["late"],
        "the held rows are locked: another claim skips them"
    );
    let seqs: Vec<i64> = held.messages.iter().map(|m| m.seq).collect();
    let outcomes = vec![
        Completion::new(seqs[0], Disposition::Sent),
        Completion::new(
            seqs[1],
            Disposition::Retry {
                delay: Duration::from_secs(3600),
                error: "broker said later".into(),
            },
        ),
        Completion::new(
            seqs[2],
            Disposition::Dead {
                error: "rejected".into(),
                park: false,
            },
        ),
        Completion::new(seqs[3], Disposition::Release),
    ];
    let report = h
        .store
        .complete(held.lease.token, &outcomes)
        .await
        .expect("complete");
    assert_eq!((report.applied, report.lost), (4, 0));
    assert_eq!(h.store.held_batches(), 0);
    let rows = records(&h.store).await;
    let row = |seq: i64| rows.iter().find(|r| r.seq == seq);
    assert!(row(seqs[0]).is_none(), "sent: deleted");
    let retry = row(seqs[1]).expect("retry row");
    assert_eq!(
        (retry.status, retry.attempts, retry.last_error.as_deref()),
        (Status::Pending, 1, Some("broker said later"))
    );
    assert!(retry.available_at > std::time::SystemTime::now() + Duration::from_secs(3000));
    let dead = row(seqs[2]).expect("dead row");
    assert_eq!(
        (dead.status, dead.attempts, dead.last_error.as_deref()),
        (Status::Dead, 1, Some("rejected"))
    );
    let released = row(seqs[3]).expect("released row");
    assert_eq!(
        (released.status, released.attempts),
        (Status::Pending, 0),
        "released: not attempted"
    );
    // the released row is claimable at once, by anyone
    let again = other
        .claim(&ClaimRequest::new(10, Duration::from_secs(30)))
        .await
        .expect("claim");
    assert_eq!(
        again.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [seqs[3]]
    );
    common::complete_all(&other, &again, Disposition::Sent).await;
    common::complete_all(&other, &theirs, Disposition::Sent).await;
}

/// The relay holding a batch loses its connection (a crash, a network
/// cut, `pg_terminate_backend`): the server rolls its transaction back, the
/// rows are claimable by anyone at once, untouched, and the old holder's
/// completion changes nothing and reports every row lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_batch_whose_connection_dies_gives_its_rows_back_at_once() {
    let h = PgHarness::new().await;
    let held = held_claim(&h, &h.store, Duration::from_secs(300)).await;
    assert_eq!(end_held_batches(&h).await, 1, "one session holds the batch");
    let other = another_store(&h).await;
    let claim = claim_when_back(&other, "the rows to come back").await;
    assert_eq!(
        claim.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        held.messages.iter().map(|m| m.seq).collect::<Vec<_>>()
    );
    assert!(
        claim.messages.iter().all(|m| m.attempt == 1),
        "the attempt that died was not counted"
    );
    let report = common::complete_all(&h.store, &held, Disposition::Sent).await;
    assert_eq!((report.applied, report.lost), (0, 4));
    assert_eq!(h.store.held_batches(), 0);
    assert_eq!(records(&h.store).await.len(), 4, "nothing was deleted");
    common::complete_all(&other, &claim, Disposition::Sent).await;
    assert!(records(&h.store).await.is_empty());
}

/// A relay that stalls with a held batch past its lease: the server ends
/// the transaction (its idle timeout is the lease), so the rows are
/// claimable again when the lease ends, as a leased row's would be, and the
/// stalled relay's late completion is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_batch_past_its_lease_is_ended_by_the_server() {
    let h = PgHarness::new().await;
    let held = held_claim(&h, &h.store, Duration::from_millis(500)).await;
    let other = another_store(&h).await;
    let claim = claim_when_back(&other, "the lease to end").await;
    assert_eq!(claim.messages.len(), 4);
    let report = common::complete_all(&h.store, &held, Disposition::Sent).await;
    assert_eq!((report.applied, report.lost), (0, 4));
    assert_eq!(records(&h.store).await.len(), 4, "nothing was deleted");
    common::complete_all(&other, &claim, Disposition::Sent).await;
}

/// A retaining store's held batch keeps its sent rows, marked sent, like a
/// lease's completion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retaining_stores_held_batch_keeps_its_sent_rows() {
    let h = PgHarness::new().await;
    let store = h.store.clone().retain_sent(Some(Duration::from_secs(3600)));
    let held = held_claim(&h, &store, Duration::from_secs(30)).await;
    common::complete_all(&store, &held, Disposition::Sent).await;
    assert_eq!(store.held_batches(), 0);
    let rows = records(&store).await;
    assert_eq!(rows.len(), 8, "nothing deleted");
    assert!(
        rows.iter()
            .all(|r| r.status == Status::Sent && r.sent_at.is_some() && r.attempts == 1),
        "{rows:?}"
    );
}

/// A held batch completed in parts stays held until its last row has an
/// outcome; a `seq` that is not the batch's is reported lost and left alone.
/// The first part records a failure (its rows stamped and updated by
/// `seq`); the second is all sent, so its row is deleted by the address the
/// claim returned, which that first part's writes must not have disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_batch_completed_in_parts_commits_with_its_last_row() {
    let h = PgHarness::new().await;
    let held = held_claim(&h, &h.store, Duration::from_secs(30)).await;
    let seqs: Vec<i64> = held.messages.iter().map(|m| m.seq).collect();
    h.outbox
        .enqueue_batch(&h.app, &[NewMessage::new("t", "other")])
        .await
        .expect("enqueue");
    let other_seq = h.scalar("max(seq)", "").await;
    let failed = Disposition::Retry {
        delay: Duration::from_secs(60),
        error: "broker down".into(),
    };
    let first = [
        Completion::new(seqs[0], Disposition::Sent),
        Completion::new(seqs[1], failed),
        Completion::new(other_seq, Disposition::Sent),
    ];
    assert_eq!(
        complete_part(&h.store, held.lease.token, &first).await,
        (2, 1)
    );
    assert_eq!(h.store.held_batches(), 1, "two rows still open");
    assert_eq!(records(&h.store).await.len(), 5, "nothing committed yet");
    let last = [
        Completion::new(seqs[2], Disposition::Release),
        Completion::new(seqs[3], Disposition::Sent),
    ];
    assert_eq!(
        complete_part(&h.store, held.lease.token, &last).await,
        (2, 0)
    );
    assert_eq!(h.store.held_batches(), 0);
    let mut left: Vec<(i64, u32)> = records(&h.store)
        .await
        .iter()
        .map(|r| (r.seq, r.attempts))
        .collect();
    left.sort_unstable();
    assert_eq!(left, [(seqs[1], 1), (seqs[2], 0), (other_seq, 0)]);
}

/// A store holds at most `MAX_HELD` backlog batches open; the backlog
/// claims beyond that lease their rows as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_claims_past_max_held_lease_their_rows() {
    let h = PgHarness::new().await;
    let n = 4 * (postbox_postgres::MAX_HELD + 2);
    let msgs: Vec<NewMessage> = (0..n)
        .map(|i| NewMessage::new("t", format!("m{i}")))
        .collect();
    h.outbox
        .enqueue_batch(&h.app, &msgs)
        .await
        .expect("enqueue");
    let req = ClaimRequest::new(4, Duration::from_secs(30));
    let mut claims = Vec::new();
    for _ in 0..postbox_postgres::MAX_HELD + 2 {
        let c = h.store.claim(&req).await.expect("claim");
        assert_eq!(c.messages.len(), 4);
        claims.push(c);
    }
    // the first claim (not a backlog yet) and the last (no permit left)
    // leased their rows; the ones between hold theirs
    assert_eq!(h.store.held_batches(), postbox_postgres::MAX_HELD);
    let mut leased: Vec<uuid::Uuid> = sqlx::query_scalar(&format!(
        "SELECT DISTINCT lease_token FROM {} WHERE lease_token IS NOT NULL",
        h.outbox.qualified_name()
    ))
    .fetch_all(&h.app)
    .await
    .expect("tokens");
    let mut want = vec![claims[0].lease.token, claims[claims.len() - 1].lease.token];
    want.sort_unstable();
    leased.sort_unstable();
    assert_eq!(leased, want);
    for c in &claims {
        common::complete_all(&h.store, c, Disposition::Sent).await;
    }
    assert_eq!(h.store.held_batches(), 0);
    assert!(records(&h.store).await.is_empty());
}

/// Slows every publish down, so that a backlog lasts while the test kills
/// sessions.
#[derive(Clone)]
struct Slow(TestPublisher);

impl Publisher for Slow {
    async fn publish(&self, batch: &[Message]) -> Vec<PublishOutcome> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.0.publish(batch).await
    }
}

/// Three relays drain a keyless backlog in held batches while the sessions
/// holding them (`idle in transaction`) are terminated again and again:
/// every message is delivered, none of a batch whose transaction the
/// server ended is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_whose_held_batches_are_killed_deliver_everything() {
    let h = PgHarness::new().await;
    let msgs: Vec<NewMessage> = (0..20_000)
        .map(|i| NewMessage::new("t", format!("m{i}")))
        .collect();
    let ids: HashSet<_> = msgs.iter().map(|m| m.id).collect();
    for chunk in msgs.chunks(1_000) {
        h.outbox
            .enqueue_batch(&h.app, chunk)
            .await
            .expect("enqueue");
    }
    let publisher = TestPublisher::recording();
    let shutdown = CancellationToken::new();
    let mut relays = Vec::new();
    for _ in 0..3 {
        let relay = Relay::builder(another_store(&h).await, Slow(publisher.clone()))
            .batch_size(50)
            .poll_interval(Duration::from_millis(10))
            .build()
            .expect("relay");
        let sd = shutdown.clone();
        relays.push(tokio::spawn(async move { relay.run(sd).await }));
    }
    // end held batches mid-publish until some were
    let mut killed = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while killed < 5 && tokio::time::Instant::now() < deadline {
        killed += end_held_batches(&h).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(killed > 0, "no held batch was open to end");
    wait_until("everything delivered", || async {
        h.store.stats(&Filter::all()).await.expect("stats").pending == 0
    })
    .await;
    shutdown.cancel();
    for r in relays {
        r.await.expect("relay task");
    }
    let distinct: HashSet<_> = publisher.delivered().iter().map(|m| m.id).collect();
    assert_eq!(distinct, ids, "not every message was delivered");
}

/// A held batch's outcomes are stamped with the time they are recorded, not
/// the time of the claim that began its transaction (where `now()` is): a
/// retry comes due its delay after the failure, however long the publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_batchs_retry_delay_counts_from_its_completion() {
    let h = PgHarness::new().await;
    let held = held_claim(&h, &h.store, Duration::from_secs(30)).await;
    // a slow publish
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let retry: Vec<Completion> = held
        .messages
        .iter()
        .map(|m| {
            Completion::new(
                m.seq,
                Disposition::Retry {
                    delay: Duration::from_secs(1),
                    error: "slow broker".into(),
                },
            )
        })
        .collect();
    let report = h
        .store
        .complete(held.lease.token, &retry)
        .await
        .expect("complete");
    assert_eq!(report.applied, 4);
    let early = h.scalar("count(*)", "WHERE available_at <= now()").await;
    assert_eq!(early, 0, "a retry came due before its delay had passed");
}

/// An application that migrates at start-up under a role without CREATE
/// (its DBA migrated as the owner) finds nothing to do: no permission
/// error for `CREATE SCHEMA/TABLE IF NOT EXISTS` of objects that exist.
/// Fails if `migrate` runs those statements when every version is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_up_to_date_table_migrates_without_create_privileges() {
    let db = TestDb::create().await;
    let owner = db.app_pool(2).await;
    let outbox = PgOutbox::with_schema("billing", "events").expect("names");
    outbox.migrate(&owner).await.expect("migrate as owner");
    let role = format!("postbox_app_{:08x}", fastrand::u32(..));
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role} LOGIN;
         REVOKE CREATE ON DATABASE {db} FROM PUBLIC;
         GRANT USAGE ON SCHEMA billing TO {role};
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA billing TO {role};
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA billing TO {role};",
        db = db.name
    ))
    .execute(&owner)
    .await
    .expect("an application role");
    let url = db
        .url
        .replacen("://postgres@", &format!("://{role}@"), 1)
        .replacen("://root@", &format!("://{role}@"), 1);
    let app = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("connect as the application role");
    let migrated = outbox.migrate(&app).await;
    app.close().await;
    sqlx::raw_sql(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .execute(&owner)
        .await
        .expect("drop the role");
    migrated.expect("an up-to-date table needs no privilege to migrate");
}

/// Two tables of one new schema migrated at once (each under its own
/// table's lock): both succeed. Fails if both create the schema at once
/// (a duplicate-key error on `pg_namespace`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_of_one_new_schema_migrate_at_once() {
    for _ in 0..3 {
        let db = TestDb::create().await;
        let outboxes = ["a_outbox", "b_outbox", "c_outbox", "d_outbox"]
            .map(|table| PgOutbox::with_schema("fresh", table).expect("names"));
        for migrated in migrate_at_once(&db.url, outboxes.to_vec()).await {
            migrated.expect("migrate");
        }
    }
}

/// The longest schema and table names make a channel name longer than
/// PostgreSQL's 63 bytes: `enqueue` with `notify_on_enqueue` still works
/// and its NOTIFY still wakes the listening relay. Fails if the channel is
/// not cut as LISTEN cuts it (`pg_notify` refuses the long name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_schema_and_table_name_still_notify() {
    let schema = "s".repeat(63);
    let table = "t".repeat(postbox_postgres::MAX_TABLE_LEN);
    let h = PgHarness::with_outbox(
        PgOutbox::with_schema(&schema, &table)
            .expect("names")
            .notify_on_enqueue(true),
    )
    .await;
    assert_eq!(h.outbox.channel().len(), 63);
    let store = h.store.clone();
    let woke = tokio::spawn({
        let store = store.clone();
        async move { store.notified().await }
    });
    wait_until("LISTEN to start", || async { store.is_listening() }).await;
    h.outbox
        .enqueue(&h.app, &NewMessage::new("t", "x"))
        .await
        .expect("enqueue with a NOTIFY on the long channel");
    tokio::time::timeout(Duration::from_secs(30), woke)
        .await
        .expect("the NOTIFY did not wake the listener")
        .expect("task");
}

/// A store over `h`'s table whose connections all go through a
/// [`postbox_testkit::FaultProxy`] (its admin pool of one connection).
async fn store_through_a_proxy(h: &PgHarness) -> (postbox_testkit::FaultProxy, PgStore) {
    let target = format!(
        "{}:{}",
        h.db.options().get_host(),
        h.db.options().get_port()
    );
    let proxy = postbox_testkit::FaultProxy::start(target)
        .await
        .expect("proxy");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(h.db.options().host("127.0.0.1").port(proxy.addr().port()))
        .await
        .expect("pool through the proxy");
    (proxy, h.outbox.store(pool))
}

/// A claim the relay gives up because its connection went silent (a host
/// lost without a reset) gives its pool slot back: the connection is
/// closed (within sqlx's 5 s close timeout), not pinged before reuse (a
/// silent one answers no ping for many minutes). Claims are cut that way on
/// more connections than the claim pool holds, and claims still get
/// connections afterwards. Fails if the cut connections keep their slots:
/// every later claim then times out waiting for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_given_up_on_silent_connections_free_their_slots() {
    let h = PgHarness::new().await;
    let (proxy, store) = store_through_a_proxy(&h).await;
    let req = ClaimRequest::new(10, Duration::from_secs(30));
    // a claim that works, retried while the pool waits for slots to free
    let claim_within_a_minute = || async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match store.claim(&req).await {
                Ok(_) => return,
                Err(e) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "no connection for a claim within a minute: {e}"
                ),
            }
        }
    };
    let mut cut = 0;
    let mut tries = 0;
    while cut <= postbox_postgres::CLAIM_POOL_SIZE {
        claim_within_a_minute().await;
        // let the claim's connection finish going back to the pool (sqlx
        // pings it on the way): silenced during that ping, it would hold
        // its slot whatever the store does
        tokio::time::sleep(Duration::from_millis(200)).await;
        proxy.silence_open();
        // a claim that answers ran on a connection opened after the silence
        if tokio::time::timeout(Duration::from_millis(500), store.claim(&req))
            .await
            .is_err()
        {
            cut += 1;
        }
        tries += 1;
        assert!(tries < 100, "claims did not run on silenced connections");
    }
    claim_within_a_minute().await;
}

/// The same for held backlog batches, whose transaction stays open on its
/// claim-pool connection while the relay publishes: a batch whose
/// completion the relay gives up because that connection went silent
/// gives the pool slot back (the connection is closed, the server rolls
/// the transaction back), on more connections than the claim pool holds.
/// Fails if a given-up held batch's connection goes back to the pool to be
/// rolled back and pinged there: every later claim then waits for a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_batches_given_up_on_silent_connections_free_their_slots() {
    let h = PgHarness::new().await;
    let (proxy, store) = store_through_a_proxy(&h).await;
    // a backlog that outlasts the batches the cut transactions keep locked
    // until the server notices (their lease)
    let msgs: Vec<NewMessage> = (0..400)
        .map(|i| NewMessage::new("t", format!("m{i}")))
        .collect();
    h.outbox
        .enqueue_batch(&h.app, &msgs)
        .await
        .expect("enqueue");
    let req = ClaimRequest::new(4, Duration::from_secs(30));
    // a claim that works, retried while the pool waits for slots to free;
    // one that runs on an idle connection silenced earlier is cut (and
    // that connection closed) like the completions
    let claim_within_a_minute = || async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let claim = tokio::time::timeout(Duration::from_millis(500), store.claim(&req)).await;
            if let Ok(Ok(claim)) = claim {
                return claim;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no connection for a claim within a minute: {claim:?}"
            );
        }
    };
    let first = claim_within_a_minute().await;
    common::complete_all(&store, &first, Disposition::Sent).await;
    let mut cut = 0;
    let mut tries = 0;
    while cut <= postbox_postgres::CLAIM_POOL_SIZE {
        let held = claim_within_a_minute().await;
        tries += 1;
        assert!(tries < 100, "the claims were not held, or not cut");
        if store.held_batches() != 1 {
            // a leasing claim (the store's rhythm): not what this tests
            common::complete_all(&store, &held, Disposition::Sent).await;
            continue;
        }
        proxy.silence_open();
        let sent: Vec<Completion> = held
            .messages
            .iter()
            .map(|m| Completion::new(m.seq, Disposition::Sent))
            .collect();
        if tokio::time::timeout(
            Duration::from_millis(500),
            store.complete(held.lease.token, &sent),
        )
        .await
        .is_err()
        {
            cut += 1;
        }
        assert_eq!(store.held_batches(), 0, "a given-up batch is not held");
    }
    claim_within_a_minute().await;
}
