//! `postbox-bench`: every scenario measures its ceiling (the same work in
//! hand-written SQL, or the reference named by the scenario) and then
//! postbox, in the same run and on the same database, and prints both with
//! their ratio as one JSON line per comparison, then a readable table.
//!
//! ```text
//! cargo run --release -p postbox-bench -- all
//! cargo run --release -p postbox-bench -- drain --rows 1000000 --batch 100,1000
//! ```
//!
//! Benchmarks never assert timings: goals are reported (`met`), not enforced.

mod brokers;
mod memory;
mod mysql;
mod pg;
mod report;
mod scenarios;
mod sqlite;
mod util;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};

use crate::pg::Pg;
use crate::report::Line;
use crate::util::progress;

/// A scenario to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Keyless backlog drained by postbox vs C1 and C2, at each batch size.
    Drain,
    /// Backlog keyed over 1,000 keys vs keyless, both postbox.
    DrainKeyed,
    /// Producer transactions with and without the outbox row, 1 and 8 writers.
    Enqueue,
    /// Commit → publish latency at a steady rate vs a raw LISTEN/NOTIFY client.
    Latency,
    /// 1, 2 and 4 relays on one keyless backlog; 1 and 2 relays on one
    /// keyed over 1,000 keys.
    Relays,
    /// Claim cost at 10k vs 1M pending rows (`--big`).
    ClaimCost,
    /// Claim cost at 10k vs 10M pending rows (opt-in: loading takes long).
    #[value(name = "backlog-10m")]
    Backlog10m,
    /// Drain right after a drain (dead tuples, no vacuum) vs a fresh table.
    DeadTuples,
    /// Relay RSS idle and busy (relay in a child process).
    Memory,
    /// SQLite drain vs its own C1 and C2.
    Sqlite,
    /// MySQL / MariaDB drain vs its own C1 and C2.
    Mysql,
    /// Relay → NATS JetStream and relay → Kafka vs min(C1 or C2, a plain
    /// broker client publishing the same messages).
    Brokers,
    /// Every scenario except `backlog-10m`.
    All,
    /// Internal: the relay process of the `memory` scenario.
    #[value(hide = true)]
    RelayChild,
}

/// Options shared by every scenario.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "postbox-bench",
    version,
    about = "postbox benchmarks: each scenario against its hand-written SQL ceiling, same run"
)]
pub(crate) struct Opts {
    /// Which scenario.
    #[arg(value_enum)]
    scenario: Scenario,
    /// PostgreSQL database for the benchmarks (created if missing; its
    /// `postbox_outbox` and `bench_orders` tables are dropped and recreated)
    /// [default: postgres://postgres@127.0.0.1:5432/postbox_bench, and
    /// …/postbox_bench_brokers for `brokers` alone, so it can run next to
    /// the other scenarios].
    #[arg(long, env = "POSTBOX_BENCH_PG_URL")]
    pg_url: Option<String>,
    /// MySQL / MariaDB database for the `mysql` scenario (dropped and recreated).
    #[arg(
        long,
        env = "POSTBOX_BENCH_MYSQL_URL",
        default_value = "mysql://root@127.0.0.1:3306/postbox_bench"
    )]
    pub(crate) mysql_url: String,
    /// Directory for the SQLite database file [system temp dir].
    #[arg(long)]
    pub(crate) sqlite_dir: Option<PathBuf>,
    /// Rows per backlog.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) rows: u64,
    /// Batch sizes (comma-separated); scenarios with one batch size use the first.
    #[arg(long = "batch", value_delimiter = ',', default_value = "100,1000")]
    pub(crate) batches: Vec<usize>,
    /// Repeats of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub(crate) repeat: usize,
    /// Batches in flight per relay, and workers per ceiling.
    #[arg(long, default_value_t = 2)]
    pub(crate) concurrency: usize,
    /// Seconds per timed run (enqueue, latency).
    #[arg(long, default_value_t = 3.0)]
    pub(crate) secs: f64,
    /// Messages per second of the latency scenario.
    #[arg(long, default_value_t = 1000)]
    pub(crate) rate: u64,
    /// The large backlog of `claim-cost`.
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) big: u64,
    /// Claims timed per repeat in `claim-cost`.
    #[arg(long, default_value_t = 20)]
    pub(crate) claims: usize,
    /// Diagnostic: run the PostgreSQL ceilings with the relay's session
    /// settings (`plan_cache_mode = force_custom_plan`, `enable_bitmapscan = off`).
    #[arg(long)]
    pub(crate) ceiling_relay_session: bool,
    /// NATS server of the `brokers` scenario (JetStream on; the scenario
    /// creates and deletes its own stream).
    #[arg(
        long,
        env = "POSTBOX_BENCH_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub(crate) nats_url: String,
    /// Kafka bootstrap servers of the `brokers` scenario (it creates and
    /// deletes its own topics).
    #[arg(
        long,
        env = "POSTBOX_BENCH_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub(crate) kafka_brokers: String,
    /// Kafka producer `linger.ms` in the `brokers` scenario, for postbox
    /// and the plain client alike [default: postbox-kafka's default].
    #[arg(long, default_value_t = postbox_kafka::KafkaConfig::new("").linger_ms)]
    pub(crate) kafka_linger_ms: u64,
    /// Brokers the `brokers` scenario measures (comma-separated).
    #[arg(
        long = "broker",
        value_enum,
        value_delimiter = ',',
        default_value = "nats,kafka"
    )]
    pub(crate) brokers: Vec<brokers::Broker>,
    /// Sets `jit = off` as the bench database's default, so relay sessions
    /// run without JIT (the fix proposed in BENCHMARKS.md). Without it the
    /// server default applies.
    #[arg(long)]
    pub(crate) pg_jit_off: bool,
    /// `drain-keyed` only: the drains' relays vacuum the outbox themselves
    /// from this many dead rows while they claim keyed messages
    /// (`PgOutbox::vacuum_after`; recorded in the result line). Without it
    /// they never do, and nothing else does: the bench turns autovacuum off
    /// on its table.
    #[arg(long, value_name = "ROWS")]
    pub(crate) pg_vacuum_after: Option<std::num::NonZeroU64>,
    /// Internal (relay-child): messages to wait for; 0 = stay idle.
    #[arg(long, default_value_t = 0, hide = true)]
    pub(crate) expect: u64,
    /// Internal (relay-child): how long to stay idle.
    #[arg(long, default_value_t = 3000, hide = true)]
    pub(crate) idle_ms: u64,
}

impl Opts {
    /// The PostgreSQL URL: `--pg-url`, or the scenario's default database.
    pub(crate) fn pg_url(&self) -> String {
        self.pg_url.clone().unwrap_or_else(|| {
            let db = if self.scenario == Scenario::Brokers {
                "postbox_bench_brokers"
            } else {
                "postbox_bench"
            };
            format!("postgres://postgres@127.0.0.1:5432/{db}")
        })
    }
}

async fn run(o: &Opts, lines: &mut Vec<Line>) -> anyhow::Result<()> {
    if o.scenario == Scenario::RelayChild {
        return memory::child(o).await;
    }
    anyhow::ensure!(
        o.repeat >= 1 && !o.batches.is_empty() && o.rows >= 1,
        "--repeat, --batch and --rows must be positive"
    );
    anyhow::ensure!(
        o.pg_vacuum_after.is_none() || o.scenario == Scenario::DrainKeyed,
        "--pg-vacuum-after applies to drain-keyed only (the other scenarios' lines would not say it was on)"
    );
    let needs_pg = !matches!(o.scenario, Scenario::Sqlite | Scenario::Mysql);
    let pg = if needs_pg {
        Some(Pg::connect(&o.pg_url(), o.pg_jit_off).await?)
    } else {
        None
    };
    let all = o.scenario == Scenario::All;
    let is = |s: Scenario| all || o.scenario == s;
    if let Some(pg) = &pg {
        if is(Scenario::Drain) {
            scenarios::drain(pg, o, lines).await?;
        }
        if is(Scenario::DrainKeyed) {
            scenarios::drain_keyed(pg, o, lines).await?;
        }
        if is(Scenario::Enqueue) {
            scenarios::enqueue(pg, o, lines).await?;
        }
        if is(Scenario::Latency) {
            scenarios::latency(pg, o, lines).await?;
        }
        if is(Scenario::Relays) {
            scenarios::relays(pg, o, lines).await?;
        }
        if is(Scenario::ClaimCost) {
            scenarios::claim_cost(pg, o, o.big, lines).await?;
        }
        if o.scenario == Scenario::Backlog10m {
            scenarios::claim_cost(pg, o, 10_000_000, lines).await?;
        }
        if is(Scenario::DeadTuples) {
            scenarios::dead_tuples(pg, o, lines).await?;
        }
        if is(Scenario::Memory) {
            memory::memory(pg, o, lines).await?;
        }
    }
    if is(Scenario::Sqlite) {
        sqlite::sqlite(o, lines).await?;
    }
    if is(Scenario::Mysql) {
        mysql::mysql(o, lines).await?;
    }
    // last: it installs a metrics recorder (to read the relay's timings)
    // that would otherwise stay installed for the scenarios after it
    if is(Scenario::Brokers)
        && let Some(pg) = &pg
    {
        brokers::brokers(pg, o, lines).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let opts = Opts::parse();
    let started = std::time::Instant::now();
    let mut lines = Vec::new();
    let result = run(&opts, &mut lines).await;
    if opts.scenario != Scenario::RelayChild && !lines.is_empty() {
        // the table of what completed, even when a later scenario failed
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "\n{}", report::table(&lines));
    }
    match result {
        Ok(()) => {
            progress!("done in {:.0} s", started.elapsed().as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(e) => {
            progress!("postbox-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
