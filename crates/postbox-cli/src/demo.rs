//! `postbox demo`: an orders service and its outbox on an embedded SQLite
//! file, a relay publishing to stdout, and a check of every promise at the end.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use postbox_core::{
    CancellationToken, Filter, Message, NewMessage, PublishOutcome, Publisher, Relay, RetryPolicy,
    Store,
};
use postbox_sqlite::SqliteStore;
use uuid::Uuid;

use crate::cli::DemoArgs;

const CUSTOMERS: u32 = 8;
const PRODUCERS: u32 = 3;

/// Stands in for a broker: prints what it receives, and hiccups on about one
/// first attempt in ten so the retries show.
#[derive(Clone)]
struct DemoBroker {
    received: Arc<Mutex<Vec<Message>>>,
    hiccups: Arc<Mutex<u64>>,
    quiet: bool,
}

impl Publisher for DemoBroker {
    async fn publish(&self, batch: &[Message]) -> Vec<PublishOutcome> {
        let mut received = self.received.lock().unwrap_or_else(|p| p.into_inner());
        batch
            .iter()
            .map(|m| {
                if m.attempt == 1 && m.id.as_u128() % 10 == 3 {
                    *self.hiccups.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                    if !self.quiet {
                        println!("  broker hiccup    {}  will retry", describe(m));
                    }
                    return PublishOutcome::transient("demo broker hiccup");
                }
                if !self.quiet {
                    println!("  published        {}  attempt {}", describe(m), m.attempt);
                }
                received.push(m.clone());
                PublishOutcome::Ok
            })
            .collect()
    }
}

fn describe(m: &Message) -> String {
    let order = serde_json::from_slice::<serde_json::Value>(&m.payload)
        .ok()
        .and_then(|v| v["order"].as_u64())
        .unwrap_or(0);
    format!(
        "{} key={:<11} order #{order:<4}",
        m.topic,
        m.key.as_deref().unwrap_or("-")
    )
}

#[derive(Default)]
struct Ledger {
    committed: HashSet<Uuid>,
    rolled_back: HashSet<Uuid>,
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let path = args
        .db
        .clone()
        .unwrap_or_else(|| tmp.path().join("demo.db"));
    let store = SqliteStore::connect(&format!("sqlite://{}", path.display())).await?;
    postbox_sqlite::migrate(store.pool()).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL, \
         amount_cents INTEGER NOT NULL)",
    )
    .execute(store.pool())
    .await?;
    // A kept file (`--db`) may hold the orders of earlier runs, which this
    // run's check must not count: it counts the rows after these (SQLite
    // numbers a new row after the largest id there is).
    let earlier_orders: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM orders")
        .fetch_one(store.pool())
        .await?;

    println!(
        "postbox demo: an orders service and its outbox, on the SQLite file {}\n",
        path.display()
    );
    println!(
        "  Each order row is written together with its `orders.created` message in ONE transaction."
    );
    println!(
        "  About one transaction in six rolls back (payment declined): its message must never go out."
    );
    println!(
        "  The relay publishes committed messages to this terminal; the pretend broker fails about one"
    );
    println!(
        "  first attempt in ten, so you also see retries, and each customer's orders must stay in order.\n"
    );

    let broker = DemoBroker {
        received: Arc::default(),
        hiccups: Arc::default(),
        quiet: args.quiet,
    };
    let relay = Relay::builder(store.clone(), broker.clone())
        .batch_size(20)
        .poll_interval(Duration::from_millis(50))
        .retry_policy(RetryPolicy::new(
            Duration::from_millis(20),
            Duration::from_millis(200),
        ))
        .build()?;
    let shutdown = CancellationToken::new();
    let relay_task = tokio::spawn({
        let relay = relay.clone();
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let store = store.clone();
        let ledger = Arc::clone(&ledger);
        let waker = relay.waker();
        let share = args.orders / PRODUCERS + u32::from(p < args.orders % PRODUCERS);
        producers.push(tokio::spawn(async move {
            for _ in 0..share {
                place_order(&store, &ledger).await?;
                waker.wake();
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..20))).await;
            }
            anyhow::Ok(())
        }));
    }
    for p in producers {
        p.await.context("producer task failed")??;
    }

    // Let the relay drain what is left, then stop it the way SIGTERM would.
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.stats(&Filter::all()).await?.pending > 0 {
        if Instant::now() > deadline {
            bail!("the relay did not drain the outbox within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    relay_task.await.context("relay task failed")?;

    let ledger = std::mem::take(&mut *ledger.lock().unwrap_or_else(|p| p.into_inner()));
    let received = broker
        .received
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let hiccups = *broker.hiccups.lock().unwrap_or_else(|p| p.into_inner());
    let order_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE id > ?1")
        .bind(earlier_orders)
        .fetch_one(store.pool())
        .await?;
    summarize(&ledger, &received, hiccups, order_rows, started.elapsed())
}

async fn place_order(store: &SqliteStore, ledger: &Mutex<Ledger>) -> anyhow::Result<()> {
    let customer = format!("customer-{}", fastrand::u32(1..=CUSTOMERS));
    let amount = fastrand::u32(500..20_000);
    let declined = fastrand::u32(0..6) == 0;
    // SQLite has one writer: take the write lock up front.
    let mut tx = store.pool().begin_with("BEGIN IMMEDIATE").await?;
    // The order number comes from the database inside the transaction, so
    // (one writer at a time) it increases in commit order.
    let order: i64 = sqlx::query_scalar(
        "INSERT INTO orders (customer, amount_cents) VALUES (?1, ?2) RETURNING id",
    )
    .bind(&customer)
    .bind(amount)
    .fetch_one(&mut *tx)
    .await?;
    let msg = NewMessage::json(
        "orders.created",
        &serde_json::json!({ "order": order, "customer": customer, "amount_cents": amount }),
    )?
    .key(customer);
    postbox_sqlite::enqueue(&mut *tx, &msg).await?;
    if declined {
        tx.rollback().await?;
        ledger
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .rolled_back
            .insert(msg.id);
    } else {
        tx.commit().await?;
        ledger
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .committed
            .insert(msg.id);
    }
    Ok(())
}

fn summarize(
    ledger: &Ledger,
    received: &[Message],
    hiccups: u64,
    order_rows: i64,
    elapsed: Duration,
) -> anyhow::Result<()> {
    let distinct: HashSet<Uuid> = received.iter().map(|m| m.id).collect();
    let duplicates = received.len() - distinct.len();
    let phantom = distinct.intersection(&ledger.rolled_back).count();
    let lost = ledger.committed.difference(&distinct).count();
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut inversions = 0;
    for m in received {
        if let Some(k) = m.key.as_deref() {
            if last.get(k).is_some_and(|prev| *prev >= m.seq) {
                inversions += 1;
            }
            last.insert(k, m.seq);
        }
    }
    let placed = ledger.committed.len() + ledger.rolled_back.len();
    let check = |ok: bool| if ok { "ok" } else { "FAILED" };

    println!("\nsummary");
    println!("  orders placed              {placed}");
    println!(
        "    committed                {}   (rows this run added to `orders`: {order_rows})",
        ledger.committed.len()
    );
    println!("    rolled back              {}", ledger.rolled_back.len());
    println!(
        "  messages published         {}   ({duplicates} duplicates)",
        distinct.len()
    );
    println!(
        "  committed but not published {lost:>3}   {}",
        check(lost == 0)
    );
    println!(
        "  published from rollbacks    {phantom:>3}   {}",
        check(phantom == 0)
    );
    println!(
        "  per-customer order          {}   ({} customers, {inversions} inversions)",
        check(inversions == 0),
        last.len()
    );
    println!("  broker hiccups retried      {hiccups:>3}");
    println!("  elapsed                     {:.2?}", elapsed);
    if lost > 0 || phantom > 0 || inversions > 0 || order_rows != ledger.committed.len() as i64 {
        bail!("the demo found a broken promise (see the summary above)");
    }
    println!("\nNext: `postbox --help`, and the README's library example.");
    Ok(())
}
