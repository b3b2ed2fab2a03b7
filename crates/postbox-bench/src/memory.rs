//! Relay memory: the relay runs alone in a child process (this binary's
//! hidden `relay-child` scenario) so its RSS is not mixed with the
//! loader's; the child reports `VmRSS` and `VmHWM` (peak) from
//! `/proc/self/status` as one JSON line when it ends.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use postbox_core::Relay;
use postbox_postgres::PgStore;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::Opts;
use crate::pg::{Keys, Pg};
use crate::report::{Better, Goal, Line, emit, median};
use crate::util::{CountingPublisher, progress};

fn status_kib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field).and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
    })
}

/// The child: runs a relay with the null publisher until `expect` messages
/// were published (or, with `expect = 0`, for `idle_ms`), then prints its
/// memory figures.
pub(crate) async fn child(o: &Opts) -> Result<()> {
    let done = CancellationToken::new();
    let publisher = Arc::new(CountingPublisher::new(o.expect.max(1), done.clone()));
    let store = PgStore::connect(&o.pg_url()).await?;
    let relay = Relay::builder(store, Arc::clone(&publisher))
        .batch_size(o.batches.first().copied().unwrap_or(100))
        .concurrency(o.concurrency)
        .build()?;
    if o.expect == 0 {
        let d = done.clone();
        let idle = Duration::from_millis(o.idle_ms);
        tokio::spawn(async move {
            tokio::time::sleep(idle).await;
            d.cancel();
        });
    }
    let report = relay.run(done).await;
    let line = json!({
        "sent": report.sent,
        "vmrss_kib": status_kib("VmRSS:"),
        "vmhwm_kib": status_kib("VmHWM:"),
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    Ok(())
}

async fn spawn_child(o: &Opts, expect: u64, idle_ms: u64, batch: usize) -> Result<Value> {
    let exe = std::env::current_exe()?;
    let out = tokio::process::Command::new(exe)
        .arg("relay-child")
        .arg("--pg-url")
        .arg(o.pg_url())
        .arg("--expect")
        .arg(expect.to_string())
        .arg("--idle-ms")
        .arg(idle_ms.to_string())
        .arg("--batch")
        .arg(batch.to_string())
        .arg("--concurrency")
        .arg(o.concurrency.to_string())
        .kill_on_drop(true)
        .output()
        .await
        .context("running the relay child")?;
    if !out.status.success() {
        bail!(
            "relay child failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("relay child printed {last:?}"))
}

fn mib(v: &Value, field: &str) -> f64 {
    v[field].as_f64().unwrap_or(0.0) / 1024.0
}

/// memory: RSS of a relay process idle, and its peak while draining.
pub(crate) async fn memory(pg: &Pg, o: &Opts, lines: &mut Vec<Line>) -> Result<()> {
    pg.reset().await?;
    let n = o.rows;
    let mut idle = vec![];
    for rep in 1..=o.repeat {
        progress!("memory idle: repeat {rep}/{}", o.repeat);
        pg.truncate().await?;
        let v = spawn_child(o, 0, 3_000, 100).await?;
        idle.push(mib(&v, "vmrss_kib"));
    }
    emit(
        lines,
        Line::new(
            "memory",
            "relay idle (VmRSS after 3 s)",
            "-",
            "MiB",
            Better::Lower,
            vec![],
            idle,
            Goal::ValueAtMost(20.0),
        )
        .extra(json!({"concurrency": o.concurrency})),
    );
    for &batch in &o.batches {
        let mut busy = vec![];
        for rep in 1..=o.repeat {
            progress!("memory busy batch {batch}: repeat {rep}/{}", o.repeat);
            pg.fresh(n, Keys::None).await?;
            let v = spawn_child(o, n, 0, batch).await?;
            if v["sent"].as_u64() != Some(n) {
                bail!("relay child sent {} of {n}", v["sent"]);
            }
            busy.push(mib(&v, "vmhwm_kib"));
        }
        emit(
            lines,
            Line::new("memory", format!("relay busy, batch {batch} (VmHWM while draining {n})"), "-",
                      "MiB", Better::Lower, vec![], busy.clone(), Goal::ValueAtMost(64.0))
            .extra(json!({"rows": n, "batch": batch, "concurrency": o.concurrency, "median": median(&busy)})),
        );
    }
    Ok(())
}
