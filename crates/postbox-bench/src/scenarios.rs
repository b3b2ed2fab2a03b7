//! The PostgreSQL scenarios. Each measures its ceiling (or reference) and
//! postbox in the same run, interleaved repeat by repeat so drift on a
//! shared machine hits both alike.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use postbox_core::{ClaimRequest, Completion, Disposition, NewMessage, Relay, Store};
use postbox_postgres::{PgOutbox, PgStore};
use serde_json::json;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Opts;
use crate::pg::{
    Ceiling, Drain, Keys, Pg, ceiling_claim_once, ceiling_drain, postbox_drain, store_loop_drain,
};
use crate::report::{Better, Goal, Line, emit, median, percentile};
use crate::util::{RecordingPublisher, ms, payload, progress, rate};

/// drain: keyless backlog, C1 and C2 against postbox at each batch size.
pub(crate) async fn drain(pg: &Pg, o: &Opts, lines: &mut Vec<Line>) -> Result<()> {
    pg.reset().await?;
    let n = o.rows;
    for &batch in &o.batches {
        let (mut c1, mut c2, mut pb, mut loads, mut sl) = (vec![], vec![], vec![], vec![], vec![]);
        for rep in 1..=o.repeat {
            progress!("drain batch {batch}: repeat {rep}/{}", o.repeat);
            loads.push(rate(n, pg.fresh(n, Keys::None).await?));
            c1.push(rate(
                n,
                ceiling_drain(pg, Ceiling::C1, n, batch, o.concurrency).await?,
            ));
            pg.fresh(n, Keys::None).await?;
            c2.push(rate(
                n,
                ceiling_drain(pg, Ceiling::C2, n, batch, o.concurrency).await?,
            ));
            pg.fresh(n, Keys::None).await?;
            pb.push(rate(n, postbox_drain(pg, drain_of(o, n, batch, 1)).await?));
            pg.fresh(n, Keys::None).await?;
            sl.push(rate(
                n,
                store_loop_drain(pg, n, batch, o.concurrency).await?,
            ));
        }
        let extra = json!({"rows": n, "batch": batch, "concurrency": o.concurrency,
                           "load_rows_per_s": median(&loads),
                           "diag_store_sql_hand_loop_msgs_per_s": median(&sl)});
        let variant = format!("keyless, batch {batch}");
        emit(
            lines,
            Line::new(
                "drain",
                &variant,
                "C1 DELETE…SKIP LOCKED…RETURNING",
                "msg/s",
                Better::Higher,
                c1,
                pb.clone(),
                Goal::RatioAtLeast(0.6),
            )
            .extra(extra.clone()),
        );
        emit(
            lines,
            Line::new(
                "drain",
                &variant,
                "C2 lease UPDATE + DELETE",
                "msg/s",
                Better::Higher,
                c2,
                pb,
                Goal::RatioAtLeast(1.5),
            )
            .extra(extra),
        );
    }
    Ok(())
}

fn drain_of(o: &Opts, n: u64, batch: usize, relays: usize) -> Drain {
    Drain {
        n,
        batch,
        concurrency: o.concurrency,
        relays,
        vacuum_after: o.pg_vacuum_after,
    }
}

/// drain-keyed: 1,000 keys against postbox keyless, same run.
pub(crate) async fn drain_keyed(pg: &Pg, o: &Opts, lines: &mut Vec<Line>) -> Result<()> {
    pg.reset().await?;
    let n = o.rows;
    for &batch in &o.batches {
        let (mut keyless, mut keyed) = (vec![], vec![]);
        for rep in 1..=o.repeat {
            progress!("drain-keyed batch {batch}: repeat {rep}/{}", o.repeat);
            pg.fresh(n, Keys::None).await?;
            keyless.push(rate(n, postbox_drain(pg, drain_of(o, n, batch, 1)).await?));
            pg.fresh(n, Keys::All(1000)).await?;
            keyed.push(rate(n, postbox_drain(pg, drain_of(o, n, batch, 1)).await?));
        }
        emit(
            lines,
            Line::new(
                "drain-keyed",
                format!("1000 keys, batch {batch}"),
                "postbox keyless",
                "msg/s",
                Better::Higher,
                keyless,
                keyed,
                Goal::RatioAtLeast(0.7),
            )
            .extra(json!({
                "rows": n,
                "batch": batch,
                "keys": 1000,
                "concurrency": o.concurrency,
                "pg_vacuum_after": o.pg_vacuum_after,
            })),
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Txn {
    /// One business INSERT.
    Business,
    /// + one keyed outbox row through `enqueue`.
    Outbox,
    /// + ten keyed outbox rows through `enqueue_batch`.
    Batch10,
}

/// Runs `writers` producers for `secs`, each committing `txn`-shaped
/// transactions back to back; returns transactions per second.
async fn enqueue_run(pg: &Pg, writers: usize, secs: f64, txn: Txn) -> Result<f64> {
    pg.truncate().await?;
    let pool = pg.plain_pool(u32::try_from(writers)?).await?;
    let stop = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let pool = pool.clone();
        tasks.spawn(async move {
            let mut done = 0u64;
            while Instant::now() < stop {
                let order = (w as u64) << 40 | done;
                let mut tx = pool.begin().await?;
                sqlx::query("INSERT INTO public.bench_orders (customer, amount) VALUES ($1, $2)")
                    .bind(format!("customer-{w}"))
                    .bind(i64::try_from(done)?)
                    .execute(&mut *tx)
                    .await?;
                let msg = |i: u64| {
                    NewMessage::new("orders.created", payload(order))
                        .key(format!("order-{order}-{i}"))
                        .header("content-type", "application/json")
                };
                match txn {
                    Txn::Business => {}
                    Txn::Outbox => postbox_postgres::enqueue(&mut *tx, &msg(0)).await?,
                    Txn::Batch10 => {
                        let batch: Vec<NewMessage> = (0..10).map(msg).collect();
                        postbox_postgres::enqueue_batch(&mut *tx, &batch).await?;
                    }
                }
                tx.commit().await?;
                done += 1;
            }
            anyhow::Ok(done)
        });
    }
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        total += r??;
    }
    let took = start.elapsed();
    pool.close().await;
    Ok(rate(total, took))
}

/// enqueue: business-only transactions against the same with one outbox
/// row and with a batch of ten, at 1 and 8 writers.
pub(crate) async fn enqueue(pg: &Pg, o: &Opts, lines: &mut Vec<Line>) -> Result<()> {
    pg.reset().await?;
    for writers in [1usize, 8] {
        let (mut biz, mut one, mut ten) = (vec![], vec![], vec![]);
        for rep in 1..=o.repeat {
            progress!("enqueue {writers} writers: repeat {rep}/{}", o.repeat);
            biz.push(enqueue_run(pg, writers, o.secs, Txn::Business).await?);
            one.push(enqueue_run(pg, writers, o.secs, Txn::Outbox).await?);
            ten.push(enqueue_run(pg, writers, o.secs, Txn::Batch10).await?);
        }
        let (b, t) = (median(&biz), median(&ten));
        // aggregate µs per transaction; the batch's extra cost spread over its 10 messages
        let per_msg_us = (1e6 / t - 1e6 / b) / 10.0;
        let goal = if writers == 8 {
            Goal::RatioAtLeast(0.7)
        } else {
            Goal::None
        };
        emit(
            lines,
            Line::new(
                "enqueue",
                format!("{writers} writers, 1 keyed outbox row"),
                "business row only",
                "txn/s",
                Better::Higher,
                biz.clone(),
                one.clone(),
                goal,
            )
            .extra(json!({"writers": writers, "secs": o.secs,
                          "business_us_per_txn": 1e6 / b,
                          "outbox_extra_us_per_txn": 1e6 / median(&one) - 1e6 / b})),
        );
        emit(
            lines,
            Line::new(
                "enqueue",
                format!("{writers} writers, batch of 10 keyed rows"),
                "business row only",
                "txn/s",
                Better::Higher,
                biz,
                ten,
                Goal::None,
            )
            .extra(json!({"writers": writers, "secs": o.secs,
                          "per_message_extra_us": per_msg_us})),
        );
    }
    Ok(())
}

/// How a latency run's relay learns about new rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// Raw client: `NOTIFY` in the producer transaction, a `LISTEN`ing
    /// connection receives it. No framework.
    RawNotify,
    /// postbox relay in the producer's process, woken by `RelayWaker`.
    Waker,
    /// postbox with `notify_on_enqueue(true)`: the relay's LISTEN connection.
    Notify,
}

/// Producers commit `rate` messages per second in total for `secs`; returns
/// the commit → publish latencies in ms (the first 10% dropped as warm-up)
/// and the achieved rate.
async fn latency_run(pg: &Pg, o: &Opts, wake: Wake) -> Result<(Vec<f64>, f64)> {
    pg.truncate().await?;
    const PRODUCERS: u64 = 4;
    let commits: Arc<Mutex<Vec<(Uuid, Instant)>>> = Arc::default();
    let published = Arc::new(RecordingPublisher::default());
    let raw_seen: Arc<Mutex<Vec<(Uuid, Instant)>>> = Arc::default();
    let stop = CancellationToken::new();
    let producers_pool = pg.plain_pool(PRODUCERS as u32).await?;

    // the consumer side
    let relay_handle;
    let mut waker = None;
    let outbox = match wake {
        Wake::Notify => PgOutbox::default().notify_on_enqueue(true),
        _ => PgOutbox::default(),
    };
    match wake {
        Wake::RawNotify => {
            let mut listener = PgListener::connect_with(&pg.pool).await?;
            listener.listen("postbox_bench_raw").await?;
            let seen = Arc::clone(&raw_seen);
            let stop = stop.clone();
            relay_handle = tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        n = listener.recv() => {
                            let n = n?;
                            let at = Instant::now();
                            if let Ok(id) = Uuid::parse_str(n.payload()) {
                                seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((id, at));
                            }
                        }
                    }
                }
                anyhow::Ok(0u64)
            });
        }
        Wake::Waker | Wake::Notify => {
            let store = PgStore::connect(&pg.url).await?;
            let relay = Relay::builder(store, Arc::clone(&published))
                .concurrency(o.concurrency)
                .build()?;
            waker = (wake == Wake::Waker).then(|| relay.waker());
            let stop = stop.clone();
            let r2 = relay.clone();
            relay_handle = tokio::spawn(async move { anyhow::Ok(r2.run(stop).await.sent) });
            // let the relay start its LISTEN connection before producing
            let deadline = Instant::now() + Duration::from_secs(10);
            while !relay.store().is_listening() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    let per_producer = Duration::from_secs_f64(PRODUCERS as f64 / o.rate as f64);
    let end = Instant::now() + Duration::from_secs_f64(o.secs);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..PRODUCERS {
        let pool = producers_pool.clone();
        let commits = Arc::clone(&commits);
        let waker = waker.clone();
        let outbox = outbox.clone();
        tasks.spawn(async move {
            // stagger the producers over one period
            tokio::time::sleep(per_producer.mul_f64(p as f64 / PRODUCERS as f64)).await;
            let mut tick = tokio::time::interval(per_producer);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut i = 0u64;
            while Instant::now() < end {
                tick.tick().await;
                let id = Uuid::now_v7();
                let mut tx = pool.begin().await?;
                if wake == Wake::RawNotify {
                    sqlx::query("INSERT INTO public.postbox_outbox (id, topic, payload, headers) VALUES ($1, 'bench.event', $2, '{}')")
                        .bind(id)
                        .bind(payload(i))
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("SELECT pg_notify('postbox_bench_raw', $1)")
                        .bind(id.to_string())
                        .execute(&mut *tx)
                        .await?;
                } else {
                    outbox
                        .enqueue(&mut *tx, &NewMessage::new("bench.event", payload(i)).with_id(id))
                        .await?;
                }
                tx.commit().await?;
                let at = Instant::now();
                if let Some(w) = &waker {
                    w.wake();
                }
                commits.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((id, at));
                i += 1;
            }
            anyhow::Ok(i)
        });
    }
    let mut sent = 0;
    while let Some(r) = tasks.join_next().await {
        sent += r??;
    }
    let achieved = rate(sent, start.elapsed());
    // wait (bounded) for the last messages to arrive
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = match wake {
            Wake::RawNotify => raw_seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .len(),
            _ => published
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .len(),
        } as u64;
        if got >= sent || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    relay_handle.await??;
    producers_pool.close().await;

    let seen = match wake {
        Wake::RawNotify => std::mem::take(
            &mut *raw_seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ),
        _ => std::mem::take(
            &mut *published
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ),
    };
    let seen: HashMap<Uuid, Instant> = seen.into_iter().collect();
    let commits = std::mem::take(
        &mut *commits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    ensure!(
        seen.len() as u64 >= sent,
        "{wake:?}: {} of {sent} messages arrived",
        seen.len()
    );
    let mut commits = commits;
    commits.sort_by_key(|(_, at)| *at);
    let skip = commits.len() / 10;
    let mut lat: Vec<f64> = commits[skip..]
        .iter()
        .filter_map(|(id, at)| seen.get(id).map(|p| ms(p.saturating_duration_since(*at))))
        .collect();
    lat.sort_by(f64::total_cmp);
    Ok((lat, achieved))
}

/// latency: commit → publish at a steady rate, raw LISTEN/NOTIFY against
/// postbox woken by its in-process waker and by LISTEN.
pub(crate) async fn latency(pg: &Pg, o: &Opts, lines: &mut Vec<Line>) -> Result<()> {
    pg.reset().await?;
    let mut p = HashMap::<(&str, &str), Vec<f64>>::new();
    let mut rates = HashMap::<&str, Vec<f64>>::new();
    for rep in 1..=o.repeat {
        progress!("latency: repeat {rep}/{}", o.repeat);
        for (name, wake) in [
            ("raw", Wake::RawNotify),
            ("waker", Wake::Waker),
            ("notify", Wake::Notify),
        ] {
            let (lat, achieved) = latency_run(pg, o, wake).await?;
            p.entry((name, "p50"))
                .or_default()
                .push(percentile(&lat, 50.0));
            p.entry((name, "p99"))
                .or_default()
                .push(percentile(&lat, 99.0));
            p.entry((name, "max"))
                .or_default()
                .push(lat.last().copied().unwrap_or(0.0));
            rates.entry(name).or_default().push(achieved);
        }
    }
    let get = |k: (&str, &str)| p.get(&k).cloned().unwrap_or_default();
    for (name, what) in [
        ("waker", "postbox woken by RelayWaker (producer in process)"),
        ("notify", "postbox woken by LISTEN (notify_on_enqueue)"),
    ] {
        for (pct, goal) in [("p50", 1.5), ("p99", 5.0)] {
            emit(
                lines,
                Line::new("latency", format!("{pct}, {what}"), format!("raw LISTEN/NOTIFY {pct}"),
                          "ms", Better::Lower, get(("raw", pct)), get((name, pct)), Goal::ValueAtMost(goal))
                .extra(json!({"rate_target": o.rate, "secs": o.secs,
                              "rate_achieved_raw": median(&rates.get("raw").cloned().unwrap_or_default()),
                              "rate_achieved_postbox": median(&rates.get(name).cloned().unwrap_or_default()),
                              "max_ms_raw": median(&get(("raw", "max"))),
                              "max_ms_postbox": median(&get((name, "max")))})),
            );
        }
    }
    Ok(())
}

/// relays: 1, 2 and 4 relays on one keyless backlog.
pub(crate) async fn relays(pg: &Pg, o: &Opts, lines: &mut Vec<Line>) -> Result<()> {
    pg.reset().await?;
    let n = o.rows;
    let batch = o.batches.first().copied().unwrap_or(100);
    let mut by = HashMap::<usize, Vec<f64>>::new();
    // keyed over 1,000 keys, 1 and 2 relays: each relay's window counts
    // only its own leases
    let mut keyed = HashMap::<usize, Vec<f64>>::new();
    for rep in 1..=o.repeat {
        progress!("relays: repeat {rep}/{}", o.repeat);
        for r in [1usize, 2, 4] {
            pg.fresh(n, Keys::None).await?;
            by.entry(r)
                .or_default()
                .push(rate(n, postbox_drain(pg, drain_of(o, n, batch, r)).await?));
        }
        for r in [1usize, 2] {
            pg.fresh(n, Keys::All(1000)).await?;
            keyed
                .entry(r)
                .or_default()
                .push(rate(n, postbox_drain(pg, drain_of(o, n, batch, r)).await?));
        }
    }
    for r in [2usize, 4] {
        emit(
            lines,
            Line::new(
                "relays",
                format!("{r} relays, batch {batch}"),
                "1 relay",
                "msg/s",
                Better::Higher,
                by[&1].clone(),
                by[&r].clone(),
                Goal::RatioAtLeast(0.9),
            )
            .extra(json!({"rows": n, "batch": batch, "concurrency_per_relay": o.concurrency})),
        );
    }
    emit(
        lines,
        Line::new(
            "relays",
            format!("2 relays, 1000 keys, batch {batch}"),
            "1 relay, 1000 keys",
            "msg/s",
            Better::Higher,
            keyed[&1].clone(),
            keyed[&2].clone(),
            Goal::RatioAtLeast(0.9),
        )
        .extra(json!({"rows": n, "batch": batch, "keys": 1000,
                      "concurrency_per_relay": o.concurrency})),
    );
    Ok(())
}

/// claim-cost: postbox's claim (and completion) and C2's lease UPDATE at
/// 10k pending rows against `big` pending rows; half keyed over 1,000 keys.
pub(crate) async fn claim_cost(pg: &Pg, o: &Opts, big: u64, lines: &mut Vec<Line>) -> Result<()> {
    pg.reset().await?;
    let batch = o.batches.first().copied().unwrap_or(100);
    let mut claim = HashMap::<u64, Vec<f64>>::new();
    let mut complete = HashMap::<u64, Vec<f64>>::new();
    let mut raw = HashMap::<u64, Vec<f64>>::new();
    let mut loads = HashMap::<u64, f64>::new();
    let small = 10_000u64.min(big);
    for size in [small, big] {
        for rep in 1..=o.repeat {
            // A repeat takes up to 2 × (claims + 2) batches (postbox's and
            // C2's), so the small backlog is loaded again before each one:
            // 10,000 rows ran dry in the third repeat of 20 claims of 100,
            // whose empty claims then counted as samples. The big one is
            // loaded once; a repeat takes a negligible share of it.
            if rep == 1 || size < big {
                progress!("claim-cost: loading {size} rows");
                loads.insert(size, pg.fresh(size, Keys::Half(1000)).await?.as_secs_f64());
            }
            progress!("claim-cost {size}: repeat {rep}/{}", o.repeat);
            let store = PgStore::connect(&pg.url).await?;
            let raw_pool = pg.plain_pool(1).await?;
            let (mut c, mut d, mut r) = (vec![], vec![], vec![]);
            for i in 0..o.claims + 2 {
                let t0 = Instant::now();
                let got = store
                    .claim(&ClaimRequest::new(batch, Duration::from_secs(30)))
                    .await?;
                let tc = t0.elapsed();
                let done: Vec<Completion> = got
                    .messages
                    .iter()
                    .map(|m| Completion::new(m.seq, Disposition::Sent))
                    .collect();
                let t1 = Instant::now();
                store.complete(got.lease.token, &done).await?;
                let td = t1.elapsed();
                let (rc, _, raw_rows) = ceiling_claim_once(&raw_pool, batch).await?;
                // a short claim measures a different thing (an emptier table)
                anyhow::ensure!(
                    got.messages.len() == batch && raw_rows == batch,
                    "claim-cost at {size} rows, repeat {rep}: postbox claimed {} and C2 {raw_rows} of a batch of {batch}",
                    got.messages.len()
                );
                if i >= 2 {
                    c.push(ms(tc));
                    d.push(ms(td));
                    r.push(ms(rc));
                }
            }
            claim.entry(size).or_default().push(median(&c));
            complete.entry(size).or_default().push(median(&d));
            raw.entry(size).or_default().push(median(&r));
            raw_pool.close().await;
        }
    }
    let extra = json!({"small": small, "big": big, "batch": batch, "claims_per_repeat": o.claims,
                       "load_secs_big": loads.get(&big), "keys": "half keyed over 1000 keys"});
    let name = if big >= 10_000_000 {
        "backlog-10m"
    } else {
        "claim-cost"
    };
    emit(
        lines,
        Line::new(
            name,
            format!("postbox claim, {big} pending"),
            format!("postbox claim, {small} pending"),
            "ms",
            Better::Lower,
            claim[&small].clone(),
            claim[&big].clone(),
            Goal::RatioAtMost(1.1),
        )
        .extra(extra.clone()),
    );
    emit(
        lines,
        Line::new(
            name,
            format!("postbox complete, {big} pending"),
            format!("postbox complete, {small} pending"),
            "ms",
            Better::Lower,
            complete[&small].clone(),
            complete[&big].clone(),
            Goal::RatioAtMost(1.1),
        )
        .extra(extra.clone()),
    );
    emit(
        lines,
        Line::new(
            name,
            format!("C2 lease UPDATE (keyless), {big} pending"),
            format!("C2 lease UPDATE, {small} pending"),
            "ms",
            Better::Lower,
            raw[&small].clone(),
            raw[&big].clone(),
            Goal::None,
        )
        .extra(extra),
    );
    Ok(())
}

/// dead-tuples: a drain right after draining the same number of rows (no
/// vacuum in between) against a drain of a freshly vacuumed table: postbox
/// keyless and keyed, and C2 the same way for reference.
pub(crate) async fn dead_tuples(pg: &Pg, o: &Opts, lines: &mut Vec<Line>) -> Result<()> {
    pg.reset().await?;
    let n = o.rows;
    let batch = o.batches.first().copied().unwrap_or(100);
    // Keyed claims read their window from the front of the keyed index,
    // past every entry deleted since the last vacuum (see the postgres
    // README, "Dead index entries and keyed claims").
    // (keys, drained by postbox or else by C2, variant, reference, goal)
    let cases = [
        (
            Keys::None,
            true,
            format!("postbox after draining {n}, no vacuum"),
            "postbox, fresh table",
            Goal::RatioAtLeast(0.8),
        ),
        (
            Keys::All(1000),
            true,
            format!("keyed over 1000 keys after draining {n} keyed, no vacuum"),
            "the same, fresh table",
            Goal::RatioAtLeast(0.8),
        ),
        (
            Keys::None,
            false,
            format!("C2 after draining {n}, no vacuum"),
            "C2, fresh table",
            Goal::None,
        ),
    ];
    let drain = |postbox: bool| async move {
        if postbox {
            postbox_drain(pg, drain_of(o, n, batch, 1)).await
        } else {
            ceiling_drain(pg, Ceiling::C2, n, batch, o.concurrency).await
        }
    };
    // per case: (fresh table, after a drain)
    let mut samples = vec![(Vec::new(), Vec::new()); cases.len()];
    for rep in 1..=o.repeat {
        progress!("dead-tuples: repeat {rep}/{}", o.repeat);
        for ((keys, postbox, ..), (fresh, dead)) in cases.iter().zip(&mut samples) {
            pg.fresh(n, *keys).await?;
            fresh.push(rate(n, drain(*postbox).await?));
            // the same rows again, the dead ones left in place
            pg.load(n, *keys).await?;
            pg.checkpoint().await?;
            dead.push(rate(n, drain(*postbox).await?));
        }
    }
    ensure!(pg.count().await? == 0, "rows left after dead-tuples");
    let extra = json!({"rows": n, "batch": batch, "autovacuum": "off on the outbox table"});
    for ((_, _, variant, reference, goal), (fresh, dead)) in cases.into_iter().zip(samples) {
        emit(
            lines,
            Line::new(
                "dead-tuples",
                variant,
                reference,
                "msg/s",
                Better::Higher,
                fresh,
                dead,
                goal,
            )
            .extra(extra.clone()),
        );
    }
    Ok(())
}
