//! Command-line arguments.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// postbox — a transactional outbox: messages written in your database
/// transaction, published to your broker at least once, in order per key.
///
/// Start with `postbox demo`.
#[derive(Debug, Parser)]
#[command(name = "postbox", version, propagate_version = true)]
pub(crate) struct Cli {
    /// Log as JSON lines on stderr (level from POSTBOX_LOG, e.g. `debug`).
    #[arg(long, global = true)]
    pub(crate) log_json: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// See it work in under a minute: an "orders" service on an embedded
    /// SQLite file writes orders and their messages in one transaction (some
    /// roll back on purpose) while a relay publishes to stdout.
    Demo(DemoArgs),
    /// Create or upgrade the outbox table (idempotent; safe to run from
    /// several processes at once).
    Migrate(StoreArgs),
    /// Write one message into the outbox (for trying things out and scripts).
    Enqueue(EnqueueArgs),
    /// Run the relay: claim committed messages, publish them, repeat, until
    /// SIGTERM or SIGINT.
    Relay(RelayArgs),
    /// Show what is in the outbox: pending, retrying, leased, dead, parked
    /// keys, in total and per topic and tenant; the running relays; on
    /// PostgreSQL, what holds keys back.
    Status(StatusArgs),
    /// Inspect and act on dead messages.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Delete kept sent messages (and, if asked, dead ones) past an age, in
    /// chunks of 500.
    Purge(PurgeArgs),
    /// The relays that record heartbeats in this outbox.
    #[command(subcommand)]
    Relays(RelaysCommand),
    /// Work with postbox.toml files.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Args)]
pub(crate) struct StoreArgs {
    /// Database URL: sqlite://path.db, postgres://…, mysql://…
    #[arg(
        long = "store",
        env = "POSTBOX_STORE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub(crate) url: String,
    /// Outbox table name (on PostgreSQL also `schema.table`).
    #[arg(long, env = "POSTBOX_TABLE", default_value = "postbox_outbox")]
    pub(crate) table: String,
    /// Keep sent messages this long (the relay's `[store] retain_sent`);
    /// not a flag of the admin commands, which never complete messages.
    #[arg(skip)]
    pub(crate) retain_sent: Option<Duration>,
    /// Dead rows from which the relay vacuums a PostgreSQL outbox itself
    /// while it claims keyed messages (the relay's `[store] vacuum_after`).
    #[arg(skip)]
    pub(crate) vacuum_after: Option<std::num::NonZeroU64>,
}

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// How many orders the demo service places.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(crate) orders: u32,
    /// Print only the summary, not each published message.
    #[arg(long)]
    pub(crate) quiet: bool,
    /// Keep the SQLite file at this path instead of a temporary one; a run
    /// on an existing file adds its orders to those already there (and
    /// checks its own).
    #[arg(long, value_name = "PATH")]
    pub(crate) db: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct EnqueueArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Topic, e.g. orders.created.
    #[arg(long, value_parser = not_empty)]
    pub(crate) topic: String,
    /// Ordering key: messages with the same key are published in order.
    #[arg(long, value_parser = not_empty)]
    pub(crate) key: Option<String>,
    /// Message body (text).
    #[arg(long)]
    pub(crate) payload: String,
    /// A header as name=value; repeatable.
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    pub(crate) headers: Vec<(String, String)>,
    /// Tenant.
    #[arg(long, value_parser = not_empty)]
    pub(crate) tenant: Option<String>,
    /// Publish no earlier than this long from now, e.g. 30s, 5m (at most
    /// 100 years).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) delay: Option<Duration>,
    /// Attempts before the message is dead, at least 1 [default: the
    /// relay's max_attempts].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_attempts: Option<u32>,
}

/// Refuses an empty value: a message without a topic has nowhere to go, and
/// an empty key or tenant is far likelier an unset shell variable
/// (`--key "$ORDER"`) than meant.
fn not_empty(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("must not be empty".to_owned())
    } else {
        Ok(s.to_owned())
    }
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("header {s:?} must look like name=value")),
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum OnDeadArg {
    /// Later messages of the key wait for an operator (default).
    Park,
    /// Later messages of the key carry on.
    Skip,
}

#[derive(Debug, Args)]
pub(crate) struct RelayArgs {
    /// A postbox.toml with store, relay settings, publishers and routes
    /// (see postbox.example.toml). Flags given here override it.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<std::path::PathBuf>,
    /// Database URL: sqlite://path.db, postgres://…, mysql://…
    #[arg(
        long = "store",
        env = "POSTBOX_STORE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub(crate) store: Option<String>,
    /// Outbox table name (on PostgreSQL also `schema.table`).
    #[arg(long, env = "POSTBOX_TABLE")]
    pub(crate) table: Option<String>,
    /// Where to publish: stdout, file:///path.jsonl, nats://host:4222,
    /// kafka://host:9092, amqp://user:pass@host:5672/%2f, redis://host:6379,
    /// mqtt://host:1883, http(s)://… (webhook; secret from POSTBOX_WEBHOOK_SECRET).
    #[arg(
        long = "publish",
        env = "POSTBOX_PUBLISH_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub(crate) publish: Option<String>,
    /// Messages per claim [default: 100].
    #[arg(long)]
    pub(crate) batch_size: Option<usize>,
    /// Lease length: another relay may take a message over after this [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) lease: Option<Duration>,
    /// A publish slower than this counts as a transient failure; must be
    /// shorter than the lease [default: 10s]. The webhook and NATS
    /// publishers return by nine tenths of it with what they finished.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) send_timeout: Option<Duration>,
    /// How often to look for work when idle [default: 250ms].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) poll_interval: Option<Duration>,
    /// Workers; each claims its next batch while it publishes one, so up to
    /// three batches each are in flight [default: 2].
    #[arg(long)]
    pub(crate) concurrency: Option<usize>,
    /// Attempts before a message is dead, unless it set its own [default: 25].
    #[arg(long)]
    pub(crate) max_attempts: Option<u32>,
    /// First retry wait; doubles per attempt, with full jitter [default: 1s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) retry_base: Option<Duration>,
    /// Longest retry wait [default: 5m].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) retry_cap: Option<Duration>,
    /// What a dead keyed message does to the rest of its key [default: park].
    #[arg(long, value_enum)]
    pub(crate) on_dead: Option<OnDeadArg>,
    /// Only publish this tenant's messages.
    #[arg(long)]
    pub(crate) tenant: Option<String>,
    /// After SIGTERM/SIGINT, how long a batch being published may still take
    /// before its keyless rows are released to other relays (its keyed rows
    /// keep their lease until it ends) [default: 5s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) shutdown_grace: Option<Duration>,
    /// How often to write this relay's heartbeat row, which `postbox status`
    /// lists; `off`: none, and `status` does not list this relay
    /// [default: 5s].
    #[arg(long, value_name = "DURATION|off", value_parser = crate::config::Every::parse)]
    pub(crate) heartbeat_interval: Option<crate::config::Every>,
    /// How often to sample the outbox's counts into the `postbox_pending`…
    /// gauges; each sample counts the whole outbox table, so with many
    /// relays on a large outbox sample less often on most of them; a count
    /// that took d is not repeated for 50 × d; `off`: no sampling, the
    /// gauges stay unset [default: 30s, the first at a random point of the
    /// first interval].
    #[arg(long, value_name = "DURATION|off", value_parser = crate::config::Every::parse)]
    pub(crate) stats_interval: Option<crate::config::Every>,
    /// Keep sent messages this long for audit instead of deleting them at
    /// once, e.g. 7d (also env POSTBOX_STORE_RETAIN_SENT, or [store]
    /// retain_sent) [default: delete on success].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub(crate) retain_sent: Option<Duration>,
    /// PostgreSQL: VACUUM the outbox table from this many dead rows while
    /// keyed messages are claimed, e.g. 200000 (also env
    /// POSTBOX_STORE_VACUUM_AFTER, or [store] vacuum_after);
    /// keyed claims slow down behind the rows deleted since the last vacuum.
    /// Needs the table's owner. [default: never; autovacuum's business]
    #[arg(long, value_name = "ROWS", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) vacuum_after: Option<u64>,
    /// How often to delete the kept sent messages older than --retain-sent,
    /// 500 rows per statement; `off`: this relay deletes none (another
    /// relay or `postbox purge` must) [default: 1m].
    #[arg(long, value_name = "DURATION|off", value_parser = crate::config::Every::parse)]
    pub(crate) cleanup_interval: Option<crate::config::Every>,
    /// Serve Prometheus /metrics, /healthz and /readyz on HOST:PORT, e.g.
    /// 0.0.0.0:9090 (also env POSTBOX_METRICS_ADDR, or [metrics] addr in the
    /// config file).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) metrics_addr: Option<String>,
    /// Export the relay's spans by OTLP over HTTP to this collector, e.g.
    /// http://127.0.0.1:4318 (`/v1/traces` is appended; also env
    /// POSTBOX_OTLP_ENDPOINT, [log] otlp_endpoint in the config file, or
    /// the standard OTEL_EXPORTER_OTLP_ENDPOINT; service name from
    /// OTEL_SERVICE_NAME, default `postbox`).
    #[arg(long, value_name = "URL")]
    pub(crate) otlp_endpoint: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Parse and validate a config file (syntax, keys, durations, relay
    /// settings, routes, publisher settings) without connecting anywhere.
    Check {
        /// The file.
        file: std::path::PathBuf,
    },
}

#[derive(Debug, Args)]
pub(crate) struct FilterArgs {
    /// Only this topic.
    #[arg(long)]
    pub(crate) topic: Option<String>,
    /// Only this key.
    #[arg(long)]
    pub(crate) key: Option<String>,
    /// Only this tenant.
    #[arg(long)]
    pub(crate) tenant: Option<String>,
    /// Only these message ids; repeatable.
    #[arg(long = "id")]
    pub(crate) ids: Vec<uuid::Uuid>,
    /// Only messages created at least this long ago, e.g. 1h.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) older_than: Option<Duration>,
    /// Only messages whose last error contains this text.
    #[arg(long)]
    pub(crate) error: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Only this topic.
    #[arg(long)]
    pub(crate) topic: Option<String>,
    /// Only this tenant.
    #[arg(long)]
    pub(crate) tenant: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum DeadCommand {
    /// List dead messages, oldest first.
    List(DeadListArgs),
    /// Print one dead message whole: headers, payload (text, or base64 when
    /// it is not UTF-8), last error, attempts.
    Show(DeadShowArgs),
    /// Make dead messages pending again (fresh attempts); their keys resume
    /// in order.
    Replay(DeadActArgs),
    /// Unpark the keys held by dead messages; the messages stay dead.
    Skip(DeadActArgs),
    /// Delete dead messages for good.
    Purge(DeadActArgs),
}

#[derive(Debug, Args)]
pub(crate) struct DeadListArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    #[command(flatten)]
    pub(crate) filter: FilterArgs,
    /// At most this many (at least 1).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) limit: u64,
    /// Print JSON (one array, payloads included).
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct DeadShowArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// The message id (as `dead list` shows it).
    pub(crate) id: uuid::Uuid,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum RelaysCommand {
    /// List them, oldest start first, flagging those silent for 3
    /// heartbeats while holding leases as stale.
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete the heartbeat row of a relay that stopped without a clean
    /// shutdown (a live relay writes it again at its next heartbeat).
    Forget {
        #[command(flatten)]
        store: StoreArgs,
        /// The relay id (as `postbox relays` shows it).
        id: uuid::Uuid,
    },
}

#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("age")
        .args(["sent_older_than", "dead_older_than"])
        .required(true)
        .multiple(true)
))]
pub(crate) struct PurgeArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Delete the sent messages kept for audit (a relay with
    /// --retain-sent) that were sent at least this long ago, e.g. 30d.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub(crate) sent_older_than: Option<Duration>,
    /// Delete the dead messages created at least this long ago, e.g. 90d
    /// (like `dead purge --older-than`).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub(crate) dead_older_than: Option<Duration>,
    /// Print a JSON summary.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct DeadActArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    #[command(flatten)]
    pub(crate) filter: FilterArgs,
    /// Act on every dead message (required when no filter is given).
    #[arg(long)]
    pub(crate) all: bool,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}
