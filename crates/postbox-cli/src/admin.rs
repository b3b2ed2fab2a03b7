//! One-shot commands: migrate, enqueue, status, dead.

use std::time::SystemTime;

use postbox_core::{
    Filter, ListQuery, MessageRecord, NewMessage, PurgeQuery, Status, Store, since,
};

use crate::any::{AnyStore, Patience};
use crate::cli::{DeadActArgs, DeadCommand, EnqueueArgs, FilterArgs, StatusArgs, StoreArgs};
use crate::usage;

pub(crate) async fn migrate(args: StoreArgs) -> anyhow::Result<()> {
    let store = AnyStore::open(&args, Patience::Brief).await?;
    store.migrate().await?;
    println!("outbox table {} is up to date", args.table);
    Ok(())
}

pub(crate) async fn enqueue(args: EnqueueArgs) -> anyhow::Result<()> {
    let store = AnyStore::open(&args.store, Patience::Brief).await?;
    let mut msg = NewMessage::new(args.topic, args.payload.into_bytes());
    msg.key = args.key;
    msg.tenant = args.tenant;
    msg.max_attempts = args.max_attempts;
    for (k, v) in args.headers {
        msg.headers.insert(k, v);
    }
    if let Some(d) = args.delay {
        msg = msg.delay(d);
    }
    store.enqueue(&msg).await?;
    println!("{}", msg.id);
    Ok(())
}

pub(crate) async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let store = AnyStore::open(&args.store, Patience::Brief).await?;
    let mut filter = Filter::all();
    filter.topic = args.topic;
    filter.tenant = args.tenant;
    let s = store.stats(&filter).await?;
    if args.json {
        let mut v = serde_json::to_value(s)?;
        if let (AnyStore::Postgres(pg), Some(obj)) = (&store, v.as_object_mut()) {
            obj.insert(
                "blockers".into(),
                serde_json::to_value(pg.blockers().await?)?,
            );
            obj.insert(
                "oldest_transaction".into(),
                serde_json::to_value(pg.oldest_transaction().await?)?,
            );
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("outbox {}", args.store.table);
    println!(
        "  pending      {:>8}   (ready {}, delayed {}, retrying {}, leased {})",
        s.pending, s.ready, s.delayed, s.retrying, s.leased
    );
    println!(
        "  dead         {:>8}   (parked keys {})",
        s.dead, s.parked_keys
    );
    if s.sent > 0 {
        println!("  sent (kept)  {:>8}", s.sent);
    }
    match s.oldest_pending_at {
        Some(t) => println!(
            "  oldest pending written {} ago",
            humantime::format_duration(round_secs(since(SystemTime::now(), t)))
        ),
        None => println!("  nothing pending"),
    }
    if let AnyStore::Postgres(pg) = &store {
        print_pg_holdups(pg).await?;
    }
    Ok(())
}

/// What can hold messages back on PostgreSQL: open transactions holding
/// keys (their later messages wait), and the oldest open transaction
/// (it stops vacuum of the outbox's dead rows).
async fn print_pg_holdups(pg: &postbox_postgres::PgStore) -> anyhow::Result<()> {
    let blockers = pg.blockers().await?;
    if blockers.is_empty() {
        println!("  no open transaction holds a key");
    }
    for b in &blockers {
        println!(
            "  HELD: pid {} has held {} key(s) for {} ({}), {} producer(s) waiting; `SELECT pg_terminate_backend({})` ends it",
            b.pid,
            b.keys_held,
            humantime::format_duration(round_secs(b.xact_age)),
            b.state.as_deref().unwrap_or("unknown state"),
            b.waiters,
            b.pid
        );
    }
    if let Some(o) = pg.oldest_transaction().await?
        && o.xact_age >= std::time::Duration::from_secs(60)
    {
        println!(
            "  oldest open transaction: pid {} for {} ({}): it holds back vacuum of sent rows",
            o.pid,
            humantime::format_duration(round_secs(o.xact_age)),
            o.application_name.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

fn round_secs(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_secs(d.as_secs())
}

fn filter_of(f: FilterArgs) -> Filter {
    let mut filter = Filter::all().ids(f.ids);
    filter.topic = f.topic;
    filter.key = f.key;
    filter.tenant = f.tenant;
    filter.older_than = f.older_than;
    filter.error_contains = f.error;
    filter
}

fn is_unfiltered(f: &Filter) -> bool {
    *f == Filter::all()
}

pub(crate) async fn dead(cmd: DeadCommand) -> anyhow::Result<()> {
    match cmd {
        DeadCommand::List(args) => {
            let store = AnyStore::open(&args.store, Patience::Brief).await?;
            let q = ListQuery::new(Some(Status::Dead), args.limit).filter(filter_of(args.filter));
            let rows = store.list(&q).await?;
            if args.json {
                let out: Vec<_> = rows.iter().map(record_json).collect();
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else if rows.is_empty() {
                println!("no dead messages");
            } else {
                println!(
                    "{:<8} {:<36} {:<24} {:<16} {:>4} {:<6} error",
                    "seq", "id", "topic", "key", "try", "parks"
                );
                for r in &rows {
                    println!(
                        "{:<8} {:<36} {:<24} {:<16} {:>4} {:<6} {}",
                        r.seq,
                        r.id,
                        r.topic,
                        r.key.as_deref().unwrap_or("-"),
                        r.attempts,
                        if r.parked { "yes" } else { "no" },
                        r.last_error
                            .as_deref()
                            .unwrap_or("")
                            .chars()
                            .take(80)
                            .collect::<String>()
                    );
                }
            }
            Ok(())
        }
        DeadCommand::Replay(args) => {
            act(args, "replayed", |s, f| {
                Box::pin(async move { s.replay(&f).await })
            })
            .await
        }
        DeadCommand::Skip(args) => {
            act(args, "unparked", |s, f| {
                Box::pin(async move { s.skip(&f).await })
            })
            .await
        }
        DeadCommand::Purge(args) => {
            act(args, "purged", |s, f| {
                Box::pin(async move { s.purge(&PurgeQuery::new(Status::Dead, f)).await })
            })
            .await
        }
    }
}

type ActFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<u64, postbox_core::StoreError>> + Send>,
>;

async fn act(
    args: DeadActArgs,
    verb: &str,
    op: impl FnOnce(AnyStore, Filter) -> ActFuture,
) -> anyhow::Result<()> {
    let filter = filter_of(args.filter);
    if is_unfiltered(&filter) && !args.all {
        return Err(usage(
            "this would affect every dead message: pass --all, or narrow it with --id, --topic, --key, --tenant, --older-than or --error",
        ));
    }
    let store = AnyStore::open(&args.store, Patience::Brief).await?;
    let n = op(store, filter).await?;
    if args.json {
        println!("{}", serde_json::json!({ verb: n }));
    } else {
        println!("{verb} {n} message(s)");
    }
    Ok(())
}

fn record_json(r: &MessageRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        match std::str::from_utf8(&r.payload) {
            Ok(text) => obj.insert("payload".into(), text.into()),
            Err(_) => obj.insert("payload_base64".into(), base64_encode(&r.payload).into()),
        };
    }
    v
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
