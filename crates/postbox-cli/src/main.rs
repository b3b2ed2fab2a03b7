//! `postbox`: the relay daemon, admin commands and a one-minute demo.
//!
//! Exit status: 0 success, 2 bad usage or configuration (the message names
//! the bad value), 1 runtime failure.

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod admin;
mod any;
mod cli;
mod config;
mod demo;
mod human;
mod otel;
mod output;
mod relay;
mod serve;

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _};

use crate::cli::{Cli, Command};

/// An error in what the user asked for: exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Usage(pub(crate) String);

/// Shorthand for a usage error.
pub(crate) fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Usage(msg.into()))
}

fn main() -> ExitCode {
    let mut command = empty_env_is_unset(Cli::command());
    let mut matches = command
        .try_get_matches_from_mut(std::env::args_os())
        .unwrap_or_else(|e| with_env_tips(e).exit());
    let cli = Cli::from_arg_matches_mut(&mut matches)
        .unwrap_or_else(|e| with_env_tips(e.format(&mut command)).exit());
    let exporter = init_logging(&cli);
    // Two rustls providers are compiled in (reqwest brings aws-lc-rs, the
    // broker clients ring), so rustls cannot choose a process default and any
    // client building its TLS config with `ClientConfig::builder()` panics.
    // The publishers pass their provider explicitly; this covers the rest.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(run(cli));
    if let Some(exporter) = exporter {
        exporter.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // the reader of the results went away (`| head`): nothing to say
        Err(e) if e.chain().any(|c| c.is::<output::Closed>()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = if is_usage(&e) { 2 } else { 1 };
            eprintln!("error: {}", chain_text(&e));
            ExitCode::from(code)
        }
    }
}

/// The error and its causes, `: `-separated like anyhow's `{:#}`, leaving
/// out a cause whose text ends the cause before it: the library's errors
/// carry their cause both in their message (`database unavailable: {0}`)
/// and as their source, and `{:#}` printed it twice.
fn chain_text(e: &anyhow::Error) -> String {
    let mut line = String::new();
    let mut previous = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if previous.is_empty() || !previous.ends_with(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        previous = text;
    }
    line
}

/// Drops the environment variable of every argument whose variable is set
/// but empty, in every subcommand: `POSTBOX_STORE_URL=` (a template's blank)
/// counts as unset, so the flag's default or the config file applies, as
/// for `POSTBOX_RELAY_*` and `POSTBOX_METRICS_ADDR`. Clap itself would take
/// the empty text as the value.
fn empty_env_is_unset(command: clap::Command) -> clap::Command {
    command
        .mut_args(|arg| {
            let empty = arg
                .get_env()
                .and_then(std::env::var_os)
                .is_some_and(|v| v.is_empty());
            if empty { arg.env(None::<&str>) } else { arg }
        })
        .mut_subcommands(empty_env_is_unset)
}

/// Adds a tip naming the environment variable to a "required argument
/// missing" error, for each missing argument that can come from one
/// (`--store`: `POSTBOX_STORE_URL`): `--help` shows the variables, clap's
/// error does not. Looked up in the arguments as declared, so an empty
/// variable (dropped by [`empty_env_is_unset`]) is still named.
fn with_env_tips(mut error: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if error.kind() != ErrorKind::MissingRequiredArgument {
        return error;
    }
    let Some(ContextValue::Strings(missing)) = error.get(ContextKind::InvalidArg) else {
        return error;
    };
    let mut tips: Vec<clap::builder::StyledStr> = missing
        .iter()
        .filter_map(|shown| {
            // shown as `--store <URL>`
            let flag = shown.split_whitespace().next()?.strip_prefix("--")?;
            let env = env_of(&Cli::command(), flag)?;
            Some(format!("set {env} instead of passing --{flag}").into())
        })
        .collect();
    if tips.is_empty() {
        return error;
    }
    if let Some(ContextValue::StyledStrs(earlier)) = error.get(ContextKind::Suggested) {
        tips.splice(0..0, earlier.iter().cloned());
    }
    error.insert(ContextKind::Suggested, ContextValue::StyledStrs(tips));
    error
}

/// The environment variable of the argument `--{long}`, in `command` or any
/// of its subcommands (each such flag reads the same variable everywhere).
fn env_of(command: &clap::Command, long: &str) -> Option<String> {
    command
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .or_else(|| command.get_subcommands().find_map(|c| env_of(c, long)))
}

fn is_usage(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<Usage>().is_some()
            || matches!(
                c.downcast_ref::<postbox_core::StoreError>(),
                Some(postbox_core::StoreError::Config(_) | postbox_core::StoreError::Schema(_))
            )
            || c.downcast_ref::<postbox_core::ConfigError>().is_some()
            || c.downcast_ref::<postbox_jsonl::JsonlError>().is_some()
    })
}

/// Logs to stderr (text or JSON lines) and, for a relay with an OTLP
/// endpoint, exports spans too; the exporter is returned to be flushed at
/// exit. A bad endpoint starts no exporter here: the relay then refuses it
/// with exit 2 naming the key.
fn init_logging(cli: &Cli) -> Option<otel::Exporter> {
    use std::io::IsTerminal as _;
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, fmt};
    let default = match &cli.command {
        // the demo speaks for itself on stdout; keep its stderr quiet
        Command::Demo(_) => "warn",
        _ => "info",
    };
    let log_filter = || {
        let mut filter =
            EnvFilter::try_from_env("POSTBOX_LOG").unwrap_or_else(|_| EnvFilter::new(default));
        // Dependencies that log a broker URL with its credentials at debug
        // level stay at info whatever POSTBOX_LOG says: async-nats prints
        // the server address as a `Url` whose `Debug` shows user and password.
        for quiet in ["async_nats::connector=info"] {
            if let Ok(directive) = quiet.parse() {
                filter = filter.add_directive(directive);
            }
        }
        filter
    };
    // `[log]` of a relay's config file; a file that does not parse is
    // reported (exit 2) once the command reads it properly.
    let (file, endpoint) = match &cli.command {
        Command::Relay(args) => {
            let file = args
                .config
                .as_deref()
                .and_then(|path| config::FileConfig::load(path).ok());
            let endpoint = otel::endpoint(args, file.as_ref());
            (file, endpoint)
        }
        _ => (None, None),
    };
    let json = cli.log_json
        || file
            .as_ref()
            .is_some_and(|c| c.log.format == Some(config::LogFormat::Json));
    let exporter = endpoint
        .filter(|(_, e)| config::check_otlp_endpoint(e).is_ok())
        .and_then(|(key, e)| match otel::Exporter::start(&e) {
            Ok(exporter) => Some(exporter),
            Err(why) => {
                eprintln!("warning: OTLP export ({key}) not started: {why}");
                None
            }
        });
    // POSTBOX_LOG quiets the log, not the traces: spans go to the collector
    // from info up (each message's `postbox.message`) whatever it says
    let spans = exporter.as_ref().map(|x| {
        tracing_opentelemetry::layer()
            .with_tracer(x.tracer())
            .with_filter(LevelFilter::INFO)
    });
    let (json_log, text_log) = if json {
        let layer = fmt::layer().json().with_writer(std::io::stderr);
        (Some(layer.with_filter(log_filter())), None)
    } else {
        let layer = fmt::layer()
            .with_ansi(colour(std::io::stderr().is_terminal()))
            .with_writer(std::io::stderr);
        (None, Some(layer.with_filter(log_filter())))
    };
    tracing_subscriber::registry()
        .with(spans)
        .with(json_log)
        .with(text_log)
        .init();
    exporter
}

/// Whether the text log is coloured: only on a terminal (a file or a pipe
/// gets plain text), and not when `NO_COLOR` is set to anything but empty
/// (<https://no-color.org>).
fn colour(terminal: bool) -> bool {
    terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(args) => demo::run(args).await,
        Command::Migrate(args) => admin::migrate(args).await,
        Command::Enqueue(args) => admin::enqueue(args).await,
        Command::Relay(args) => relay::run(args).await,
        Command::Status(args) => admin::status(args).await,
        Command::Dead(args) => admin::dead(args).await,
        Command::Purge(args) => admin::purge(args).await,
        Command::Relays(cmd) => admin::relays(cmd).await,
        Command::Config(cli::ConfigCommand::Check { file }) => relay::check_config(&file).await,
    }
}
