//! `postbox.toml`: the daemon's configuration, parsed and validated once at
//! start-up. Every error names the key and what is wrong.
//!
//! Precedence: command-line flags, then `POSTBOX_*` environment variables,
//! then the file, then the defaults. String values may use `${VAR}` to take
//! a value (typically a secret) from the environment.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use postbox_core::{MAX_LEASE, OnDead, RelayOptions, RetryPolicy, TopicPattern};
use serde::Deserialize;

use crate::usage;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    #[serde(default)]
    pub(crate) store: StoreSection,
    #[serde(default)]
    pub(crate) relay: RelaySection,
    #[serde(default)]
    pub(crate) log: LogSection,
    #[serde(default)]
    pub(crate) metrics: MetricsSection,
    /// Named publishers; routes refer to them by name.
    #[serde(default)]
    pub(crate) publishers: BTreeMap<String, toml::Table>,
    /// Topic patterns to publisher names, first match wins.
    #[serde(default)]
    pub(crate) routes: Vec<RouteSection>,
    /// The `${NAME}` substitutions made in `publishers`, so that an error
    /// about a publisher's settings need not show their values.
    #[serde(skip)]
    pub(crate) substituted: Substitutions,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoreSection {
    /// Database URL (env `POSTBOX_STORE_URL` overrides).
    pub(crate) url: Option<String>,
    /// Outbox table (env `POSTBOX_TABLE` overrides). Default `postbox_outbox`.
    pub(crate) table: Option<String>,
    /// Keep sent messages this long instead of deleting them on success
    /// (env `POSTBOX_STORE_RETAIN_SENT` and `--retain-sent` override).
    /// Unset: delete on success.
    #[serde(default, with = "opt_duration")]
    pub(crate) retain_sent: Option<Duration>,
    /// PostgreSQL only: dead rows from which the relay vacuums the outbox
    /// table itself while it claims keyed messages (env
    /// `POSTBOX_STORE_VACUUM_AFTER` and `--vacuum-after` override). Unset:
    /// never.
    pub(crate) vacuum_after: Option<u64>,
}

/// The environment variable for `[store] vacuum_after`.
pub(crate) const VACUUM_AFTER_ENV: &str = "POSTBOX_STORE_VACUUM_AFTER";

/// `POSTBOX_STORE_VACUUM_AFTER`, parsed and checked; an empty value is unset.
pub(crate) fn vacuum_after_from_env() -> anyhow::Result<Option<u64>> {
    let Some(v) = std::env::var(VACUUM_AFTER_ENV)
        .ok()
        .filter(|v| !v.is_empty())
    else {
        return Ok(None);
    };
    match v.parse::<u64>() {
        Ok(n) if n > 0 => Ok(Some(n)),
        _ => Err(usage(format!(
            "{VACUUM_AFTER_ENV}={v:?} must be a number of dead rows, at least 1"
        ))),
    }
}

/// The environment variable for `[store] retain_sent`.
pub(crate) const RETAIN_SENT_ENV: &str = "POSTBOX_STORE_RETAIN_SENT";

/// Longest retention accepted: past it the databases' date arithmetic runs
/// out of range.
const MAX_RETENTION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Checks a retention; the error says what is wrong, for a message that
/// names the key.
pub(crate) fn check_retention(keep: Duration) -> Result<(), String> {
    if keep.is_zero() {
        return Err(
            "must be greater than zero (leave it unset to delete sent messages at once)".to_owned(),
        );
    }
    if keep > MAX_RETENTION {
        return Err("must be at most 100 years".to_owned());
    }
    Ok(())
}

/// `POSTBOX_STORE_RETAIN_SENT`, parsed and checked; an empty value is unset.
pub(crate) fn retain_sent_from_env() -> anyhow::Result<Option<Duration>> {
    let Some(v) = std::env::var(RETAIN_SENT_ENV)
        .ok()
        .filter(|v| !v.is_empty())
    else {
        return Ok(None);
    };
    let keep = humantime::parse_duration(&v).map_err(|e| {
        usage(format!(
            "{RETAIN_SENT_ENV}={v:?} is not a duration like 7d: {e}"
        ))
    })?;
    check_retention(keep).map_err(|why| usage(format!("{RETAIN_SENT_ENV}={v:?} {why}")))?;
    Ok(Some(keep))
}

/// Relay tuning; every key optional, defaults as in `postbox relay --help`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RelaySection {
    pub(crate) batch_size: Option<usize>,
    #[serde(default, with = "opt_duration")]
    pub(crate) lease: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    pub(crate) send_timeout: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    pub(crate) poll_interval: Option<Duration>,
    pub(crate) concurrency: Option<usize>,
    pub(crate) max_attempts: Option<u32>,
    #[serde(default, with = "opt_duration")]
    pub(crate) retry_base: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    pub(crate) retry_cap: Option<Duration>,
    pub(crate) on_dead: Option<OnDead>,
    pub(crate) tenant: Option<String>,
    /// Rotate claims across tenants with pending messages (default true).
    pub(crate) tenant_fairness: Option<bool>,
    #[serde(default, with = "opt_duration")]
    pub(crate) shutdown_grace: Option<Duration>,
    /// A duration, or `off`.
    #[serde(default, with = "opt_every")]
    pub(crate) heartbeat_interval: Option<Every>,
    /// A duration, or `off`.
    #[serde(default, with = "opt_every")]
    pub(crate) cleanup_interval: Option<Every>,
    /// How often the relay samples the outbox's counts into its gauges; a
    /// duration, or `off`.
    #[serde(default, with = "opt_every")]
    pub(crate) stats_interval: Option<Every>,
}

impl RelaySection {
    /// Fills the unset keys of `self` from `other`.
    pub(crate) fn or(self, other: RelaySection) -> RelaySection {
        RelaySection {
            batch_size: self.batch_size.or(other.batch_size),
            lease: self.lease.or(other.lease),
            send_timeout: self.send_timeout.or(other.send_timeout),
            poll_interval: self.poll_interval.or(other.poll_interval),
            concurrency: self.concurrency.or(other.concurrency),
            max_attempts: self.max_attempts.or(other.max_attempts),
            retry_base: self.retry_base.or(other.retry_base),
            retry_cap: self.retry_cap.or(other.retry_cap),
            on_dead: self.on_dead.or(other.on_dead),
            tenant: self.tenant.or(other.tenant),
            tenant_fairness: self.tenant_fairness.or(other.tenant_fairness),
            shutdown_grace: self.shutdown_grace.or(other.shutdown_grace),
            heartbeat_interval: self.heartbeat_interval.or(other.heartbeat_interval),
            cleanup_interval: self.cleanup_interval.or(other.cleanup_interval),
            stats_interval: self.stats_interval.or(other.stats_interval),
        }
    }

    /// `POSTBOX_RELAY_<KEY>` variables, e.g. `POSTBOX_RELAY_BATCH_SIZE=500`.
    pub(crate) fn from_env() -> anyhow::Result<RelaySection> {
        /// Set and not empty: an empty variable (`POSTBOX_RELAY_TENANT=`
        /// from a template) counts as unset, as `POSTBOX_METRICS_ADDR` does.
        fn var(key: &str) -> Option<(String, String)> {
            let name = format!("POSTBOX_RELAY_{}", key.to_uppercase());
            std::env::var(&name)
                .ok()
                .filter(|v| !v.is_empty())
                .map(|v| (name, v))
        }
        fn num<T: std::str::FromStr>(key: &str) -> anyhow::Result<Option<T>> {
            var(key)
                .map(|(name, v)| {
                    v.parse()
                        .map_err(|_| usage(format!("{name}={v:?} is not a valid number")))
                })
                .transpose()
        }
        fn dur(key: &str) -> anyhow::Result<Option<Duration>> {
            var(key)
                .map(|(name, v)| {
                    humantime::parse_duration(&v)
                        .map_err(|e| usage(format!("{name}={v:?} is not a duration like 30s: {e}")))
                })
                .transpose()
        }
        fn every(key: &str) -> anyhow::Result<Option<Every>> {
            var(key)
                .map(|(name, v)| Every::parse(&v).map_err(|e| usage(format!("{name}={e}"))))
                .transpose()
        }
        Ok(RelaySection {
            batch_size: num("batch_size")?,
            lease: dur("lease")?,
            send_timeout: dur("send_timeout")?,
            poll_interval: dur("poll_interval")?,
            concurrency: num("concurrency")?,
            max_attempts: num("max_attempts")?,
            retry_base: dur("retry_base")?,
            retry_cap: dur("retry_cap")?,
            on_dead: var("on_dead")
                .map(|(name, v)| match v.as_str() {
                    "park" => Ok(OnDead::Park),
                    "skip" => Ok(OnDead::Skip),
                    _ => Err(usage(format!("{name}={v:?} must be park or skip"))),
                })
                .transpose()?,
            tenant: var("tenant").map(|(_, v)| v),
            tenant_fairness: var("tenant_fairness")
                .map(|(name, v)| match v.as_str() {
                    "true" | "1" => Ok(true),
                    "false" | "0" => Ok(false),
                    _ => Err(usage(format!("{name}={v:?} must be true or false"))),
                })
                .transpose()?,
            shutdown_grace: dur("shutdown_grace")?,
            heartbeat_interval: every("heartbeat_interval")?,
            cleanup_interval: every("cleanup_interval")?,
            stats_interval: every("stats_interval")?,
        })
    }

    /// The relay options these settings describe, validated: each key, then
    /// the send timeout against the lease. Call it on the merged settings
    /// (flags, environment, file): the check across keys only means
    /// something there.
    pub(crate) fn options(&self) -> anyhow::Result<RelayOptions> {
        let o = self.unchecked_options();
        check_each_key(&o)?;
        if o.send_timeout >= o.lease {
            // say which side is a default: the operator may have set only
            // the other one
            let default = |set: bool| if set { "" } else { " (the default)" };
            return Err(usage(format!(
                "send_timeout = {:?}{} is invalid: must be shorter than the lease ({:?}{}), or another relay could publish the same key while this one still is",
                o.send_timeout,
                default(self.send_timeout.is_some()),
                o.lease,
                default(self.lease.is_some()),
            )));
        }
        // the library has the last word (and any check it gains)
        o.validate()?;
        Ok(o)
    }

    /// Checks each key on its own, as the file is read. The check across
    /// keys (the send timeout shorter than the lease) waits for the merged
    /// settings in [`Self::options`]: a file's `lease = "5s"` may be meant
    /// for a `--send-timeout 2s`, and must not be refused against a default
    /// send timeout the operator never set.
    pub(crate) fn check_keys(&self) -> anyhow::Result<()> {
        check_each_key(&self.unchecked_options())
    }

    /// The relay options these settings describe, defaults filled in, not
    /// checked.
    fn unchecked_options(&self) -> RelayOptions {
        let d = RelayOptions::default();
        let mut o = RelayOptions::default();
        o.batch_size = self.batch_size.unwrap_or(d.batch_size);
        o.lease = self.lease.unwrap_or(d.lease);
        o.send_timeout = self.send_timeout.unwrap_or(d.send_timeout);
        o.poll_interval = self.poll_interval.unwrap_or(d.poll_interval);
        o.concurrency = self.concurrency.unwrap_or(d.concurrency);
        o.max_attempts = self.max_attempts.unwrap_or(d.max_attempts);
        o.retry = RetryPolicy::new(
            self.retry_base.unwrap_or(d.retry.base()),
            self.retry_cap.unwrap_or(d.retry.cap()),
        );
        o.on_dead = self.on_dead.unwrap_or(d.on_dead);
        o.tenant.clone_from(&self.tenant);
        o.tenant_fairness = self.tenant_fairness.unwrap_or(d.tenant_fairness);
        o.shutdown_grace = self.shutdown_grace.unwrap_or(d.shutdown_grace);
        if let Some(every) = self.heartbeat_interval {
            o.heartbeat_interval = every.interval();
        }
        if let Some(every) = self.cleanup_interval {
            o.cleanup_interval = every.interval();
        }
        if let Some(every) = self.stats_interval {
            o.stats_interval = every.interval();
        }
        o
    }
}

/// The library's checks of every key of `o` but the one across keys: the
/// library compares the send timeout with the lease, so each of the two is
/// checked here against its most lenient partner (the send timeout against
/// the longest lease, the lease against the shortest send timeout), and
/// refused only when no partner could make it valid.
fn check_each_key(o: &RelayOptions) -> anyhow::Result<()> {
    const SHORTEST: Duration = Duration::from_nanos(1);
    if o.send_timeout >= MAX_LEASE {
        return Err(usage(format!(
            "send_timeout = {:?} is invalid: must be shorter than the longest lease ({MAX_LEASE:?})",
            o.send_timeout
        )));
    }
    if o.lease <= SHORTEST {
        return Err(usage(format!(
            "lease = {:?} is invalid: must be longer than {SHORTEST:?}, to leave room for a send_timeout greater than zero and shorter than it",
            o.lease
        )));
    }
    let mut longest_lease = o.clone();
    longest_lease.lease = MAX_LEASE;
    longest_lease.validate()?;
    let mut shortest_send = o.clone();
    shortest_send.send_timeout = SHORTEST;
    shortest_send.validate()?;
    Ok(())
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogSection {
    pub(crate) format: Option<LogFormat>,
    /// OTLP/HTTP collector the relay exports its spans to (flag
    /// `--otlp-endpoint` and env `POSTBOX_OTLP_ENDPOINT` override; the
    /// standard `OTEL_EXPORTER_OTLP_ENDPOINT` is the fallback).
    pub(crate) otlp_endpoint: Option<String>,
}

/// Checks an OTLP/HTTP collector URL: `http` or `https` with a host. The
/// error says what is wrong, for a message that names the key (the URL is
/// not repeated: it may carry credentials).
pub(crate) fn check_otlp_endpoint(endpoint: &str) -> Result<(), String> {
    let url = url::Url::parse(endpoint).map_err(|e| format!("is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "has scheme {:?}; OTLP export takes http:// or https:// (OTLP over HTTP)",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".to_owned());
    }
    Ok(())
}

/// `[metrics]`: where the daemon serves `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MetricsSection {
    /// `HOST:PORT` (flag `--metrics-addr` and env `POSTBOX_METRICS_ADDR`
    /// override). Unset: no metrics endpoint.
    pub(crate) addr: Option<String>,
}

/// Checks that `addr` looks like `HOST:PORT` (an IP address, `[v6]`, or a
/// host name, and a port number), without resolving or binding it. The
/// error says what is wrong, for a message that names the key.
pub(crate) fn check_listen_addr(addr: &str) -> Result<(), String> {
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err("is not HOST:PORT (e.g. 0.0.0.0:9090 or 127.0.0.1:9090)".to_owned());
    };
    if port.parse::<u16>().is_err() {
        return Err(format!("port {port:?} is not a number from 0 to 65535"));
    }
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !host_ok {
        return Err(format!(
            "host {host:?} is neither an IP address nor a host name (IPv6 goes in brackets: [::1]:9090)"
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteSection {
    /// Topic pattern: `*` one segment, a final `**` the rest.
    pub(crate) topics: String,
    /// Name of a `[publishers.NAME]` table.
    pub(crate) publisher: String,
}

/// How often a relay's periodic task runs: every so long, or not at all
/// (`off`; the library's `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Every {
    Off,
    Interval(Duration),
}

impl Every {
    /// `off`, or a duration such as `30s`; the error quotes the text.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        if text.trim().eq_ignore_ascii_case("off") {
            return Ok(Every::Off);
        }
        match humantime::parse_duration(text) {
            Ok(d) if d.is_zero() => Err(format!(
                "{text:?} must be greater than zero (\"off\" turns it off)"
            )),
            Ok(d) => Ok(Every::Interval(d)),
            Err(e) => Err(format!(
                "{text:?} is not a duration like \"30s\", or \"off\": {e}"
            )),
        }
    }

    /// The relay option: `None` for `off`.
    pub(crate) fn interval(self) -> Option<Duration> {
        match self {
            Every::Off => None,
            Every::Interval(d) => Some(d),
        }
    }
}

mod opt_every {
    use serde::{Deserialize, Deserializer};

    use super::Every;

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Every>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| Every::parse(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| {
            humantime::parse_duration(&t).map_err(|e| {
                serde::de::Error::custom(format!(
                    "{t:?} is not a duration like \"30s\" or \"250ms\": {e}"
                ))
            })
        })
        .transpose()
    }
}

/// Replaces `${NAME}` with the environment variable `NAME`; a missing
/// variable is an error naming it (never silently empty). Returns the text
/// and the variables used, with their values.
fn substitute_env(
    text: &str,
    at: &str,
    env: &Env<'_>,
) -> anyhow::Result<(String, Vec<(String, String)>)> {
    let mut out = String::with_capacity(text.len());
    let mut used = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        // the value is never quoted: it may be a password that holds `${`
        let end = after
            .find('}')
            .ok_or_else(|| usage(format!("{at}: unterminated ${{")))?;
        let name = &after[..end];
        let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(usage(format!(
                "{at}: ${{…}} must hold an environment variable name (letters, digits, _)"
            )));
        }
        let value = env(name)
            .ok_or_else(|| usage(format!("{at}: environment variable {name} is not set")))?;
        out.push_str(&value);
        used.push((name.to_owned(), value));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok((out, used))
}

/// Checks an outbox table name: `table`, or `schema.table` (PostgreSQL;
/// which store takes a schema is checked with the URL, wherever it comes
/// from, when the relay's settings are resolved). The error says what is
/// wrong, for a message that names the key.
pub(crate) fn check_table(table: &str) -> Result<(), postbox_core::IdentError> {
    let parts = match table.split_once('.') {
        Some((schema, name)) => vec![schema, name],
        None => vec![table],
    };
    for part in parts {
        postbox_core::Ident::new(part)?;
    }
    Ok(())
}

/// Looks up an environment variable (injectable for tests).
type Env<'a> = dyn Fn(&str) -> Option<String> + 'a;

/// The `${NAME}` substitutions made in a file: values that came from the
/// environment, typically secrets, which an error must not repeat.
#[derive(Debug, Default, Clone)]
pub(crate) struct Substitutions {
    /// (the string as the file wrote it, what it became)
    strings: Vec<(String, String)>,
    /// (variable name, its value)
    variables: Vec<(String, String)>,
}

impl Substitutions {
    /// Values shorter than this are not hunted for inside an error's text
    /// (only where it quotes a whole setting): they would match pieces of
    /// unrelated words and numbers (a `${PORT}` of `9092`).
    const SHORTEST_HUNTED: usize = 8;

    /// The same for a variable whose name says it holds a secret
    /// ([`Substitutions::secret_name`]): shorter, as a password may be, but
    /// not so short that a one-letter value would turn every such letter of
    /// the message into a placeholder.
    const SHORTEST_SECRET_HUNTED: usize = 4;

    /// Whether a variable's name says it holds a credential, so that its
    /// value is hunted for from [`Substitutions::SHORTEST_SECRET_HUNTED`]
    /// characters on.
    fn secret_name(name: &str) -> bool {
        let name = name.to_ascii_uppercase();
        ["PASS", "PW", "SECRET", "TOKEN", "KEY", "CRED", "AUTH"]
            .iter()
            .any(|w| name.contains(w))
    }

    /// `text` (an error message) with the values that came from the
    /// environment replaced by where they came from: a setting quoted whole
    /// (as a type error quotes it: `string "…"`) by `(the value of ${NAME})`,
    /// or by the string as the file wrote it; any other appearance of a
    /// variable's value of some length by `the value of ${NAME}`.
    pub(crate) fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (written, value) in &self.strings {
            let by_name = self
                .variables
                .iter()
                .find(|(name, _)| *written == format!("${{{name}}}"));
            let shown = match by_name {
                Some((name, _)) => format!("(the value of ${{{name}}})"),
                None => format!("{written:?}"),
            };
            out = out.replace(&format!("{value:?}"), &shown);
        }
        // each value as it is and as a quoted string shows it (`\"`, `\\`)
        let mut hunted: Vec<(&str, String)> = Vec::new();
        for (name, value) in &self.variables {
            let shortest = if Self::secret_name(name) {
                Self::SHORTEST_SECRET_HUNTED
            } else {
                Self::SHORTEST_HUNTED
            };
            if value.chars().count() < shortest {
                continue;
            }
            let quoted = format!("{value:?}");
            let escaped = &quoted[1..quoted.len() - 1];
            if escaped != value {
                hunted.push((name, escaped.to_owned()));
            }
            hunted.push((name, value.clone()));
        }
        // the longest first: a value may hold a shorter one
        hunted.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
        for (name, value) in hunted {
            out = out.replace(&value, &format!("the value of ${{{name}}}"));
        }
        out
    }

    /// `e` with its message redacted, still a usage error (exit 2) if it
    /// was one.
    pub(crate) fn redact_error(&self, e: anyhow::Error) -> anyhow::Error {
        if self.strings.is_empty() {
            return e;
        }
        let text = self.redact(&format!("{e:#}"));
        if crate::is_usage(&e) {
            usage(text)
        } else {
            anyhow::anyhow!(text)
        }
    }
}

fn substitute_table(
    table: &mut toml::Table,
    at: &str,
    env: &Env<'_>,
    made: &mut Substitutions,
) -> anyhow::Result<()> {
    for (key, value) in table.iter_mut() {
        let here = format!("{at}.{key}");
        match value {
            toml::Value::String(s) => {
                let (text, used) = substitute_env(s, &here, env)?;
                if !used.is_empty() {
                    made.strings.push((std::mem::replace(s, text), s.clone()));
                    made.variables.extend(used);
                }
            }
            toml::Value::Table(t) => substitute_table(t, &here, env, made)?,
            _ => {}
        }
    }
    Ok(())
}

impl FileConfig {
    /// Reads and checks `path`: syntax, unknown keys, durations, relay
    /// options, route patterns and that every route names a publisher.
    pub(crate) fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| usage(format!("cannot read config file {}: {e}", path.display())))?;
        Self::parse(&text).with_context(|| format!("in config file {}", path.display()))
    }

    pub(crate) fn parse(text: &str) -> anyhow::Result<Self> {
        Self::parse_with_env(text, &|name| std::env::var(name).ok())
    }

    pub(crate) fn parse_with_env(text: &str, env: &Env<'_>) -> anyhow::Result<Self> {
        // Not the error's own text: it quotes the offending line, which may
        // hold a password (`uri = "postgres://app:…@db"` for `url`).
        let mut config: FileConfig = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(String::new(), |span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let start = before.rfind('\n').map_or(0, |i| i + 1);
                let column = before.len() - start + 1;
                // the line's key, never its value: only when what precedes
                // the first `=` is a bare (dotted) TOML key (a line without
                // its `=`, or `url: "…"`, must not show the value as a "key")
                let key = text[start..]
                    .lines()
                    .next()
                    .and_then(|l| l.split_once('='))
                    .map(|(k, _)| k.trim())
                    .filter(|k| {
                        !k.is_empty()
                            && k.chars()
                                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                    })
                    .map_or(String::new(), |k| format!(", key {k}"));
                format!(" (line {line}, column {column}{key})")
            });
            usage(format!("{}{at}", e.message().trim_end()))
        })?;
        for (name, table) in &mut config.publishers {
            let at = format!("publishers.{name}");
            substitute_table(table, &at, env, &mut config.substituted)?;
        }
        if let Some(url) = &mut config.store.url {
            // its errors show it through `redact_url` only
            *url = substitute_env(url, "store.url", env)?.0;
        }
        // Refused here too, not only when a store opens: `config check`
        // must not call a file good that `relay` would refuse.
        if let Some(table) = &config.store.table {
            check_table(table).map_err(|e| usage(format!("store.table = {table:?}: {e}")))?;
        }
        if let Some(keep) = config.store.retain_sent {
            check_retention(keep).map_err(|why| {
                usage(format!(
                    "store.retain_sent = {:?} {why}",
                    crate::human::duration(keep)
                ))
            })?;
        }
        if config.store.vacuum_after == Some(0) {
            return Err(usage(
                "store.vacuum_after = 0 must be at least 1 (leave it unset to never vacuum)",
            ));
        }
        // each key alone: the file's settings may yet be merged with flags
        // and environment variables (see `RelaySection::check_keys`)
        config
            .relay
            .check_keys()
            .map_err(|e| usage(format!("[relay] {e}")))?;
        if let Some(addr) = &config.metrics.addr {
            check_listen_addr(addr)
                .map_err(|why| usage(format!("[metrics] addr = {addr:?} {why}")))?;
        }
        if let Some(endpoint) = &config.log.otlp_endpoint {
            check_otlp_endpoint(endpoint)
                .map_err(|why| usage(format!("[log] otlp_endpoint {why}")))?;
        }
        for (i, r) in config.routes.iter().enumerate() {
            TopicPattern::new(&r.topics).map_err(|e| usage(format!("routes[{i}].topics: {e}")))?;
            if !config.publishers.contains_key(&r.publisher) {
                return Err(usage(format!(
                    "routes[{i}].publisher = {:?} names no [publishers.{}] table (have: {})",
                    r.publisher,
                    r.publisher,
                    config
                        .publishers
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        if config.routes.is_empty() && config.publishers.len() > 1 {
            return Err(usage(
                "several publishers but no [[routes]]: add routes mapping topic patterns to publisher names",
            ));
        }
        Ok(config)
    }

    /// The routes to build: the configured ones, or `**` to the only
    /// publisher.
    pub(crate) fn routes(&self) -> Vec<RouteSection> {
        if self.routes.is_empty() {
            self.publishers
                .keys()
                .map(|name| RouteSection {
                    topics: "**".into(),
                    publisher: name.clone(),
                })
                .collect()
        } else {
            self.routes.clone()
        }
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_from_a_higher_source_overrides_a_duration_from_a_lower_one() {
        let flags = RelaySection {
            stats_interval: Some(Every::parse("off").expect("off")),
            ..RelaySection::default()
        };
        let file =
            FileConfig::parse("[relay]\nstats_interval = \"10m\"\nheartbeat_interval = \"2s\"\n")
                .expect("parses")
                .relay;
        let o = flags.or(file).options().expect("options");
        assert_eq!(o.stats_interval, None);
        assert_eq!(
            o.heartbeat_interval,
            Some(std::time::Duration::from_secs(2))
        );
        let zero = Every::parse("0s").expect_err("zero is refused");
        assert!(zero.contains("off"), "{zero}");
    }

    #[test]
    fn off_turns_a_periodic_task_off() {
        let config = FileConfig::parse(
            "[relay]\nstats_interval = \"off\"\nheartbeat_interval = \"Off\"\ncleanup_interval = \"off\"\n",
        )
        .expect("parses");
        let o = config.relay.options().expect("options");
        assert_eq!(o.stats_interval, None);
        assert_eq!(o.heartbeat_interval, None);
        assert_eq!(o.cleanup_interval, None);
        // unset keeps the library's defaults, which are on
        let d = FileConfig::parse("[relay]\n")
            .expect("parses")
            .relay
            .options()
            .expect("options");
        assert!(d.stats_interval.is_some() && d.heartbeat_interval.is_some());
        assert!(d.cleanup_interval.is_some());
    }

    #[test]
    fn only_values_long_enough_are_hunted_in_an_error() {
        let made = Substitutions {
            strings: Vec::new(),
            variables: vec![
                ("ROUTING_KEY".to_owned(), "o".to_owned()),
                ("BROKER_PW".to_owned(), "s3cr".to_owned()),
                ("GROUP".to_owned(), "billing".to_owned()),
            ],
        };
        assert_eq!(
            made.redact("no route for billing: bad password s3cr"),
            "no route for billing: bad password the value of ${BROKER_PW}",
            "a one-letter value must not turn every such letter into a placeholder"
        );
    }

    #[test]
    fn the_stats_interval_reaches_the_relay() {
        let config = FileConfig::parse("[relay]\nstats_interval = \"10m\"\n").expect("parses");
        let o = config.relay.options().expect("relay options");
        assert_eq!(o.stats_interval, Some(std::time::Duration::from_secs(600)));
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../../postbox.example.toml");
        let env = |name: &str| {
            (name == "POSTBOX_WEBHOOK_SECRET")
                .then(|| "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned())
        };
        let config = FileConfig::parse_with_env(text, &env).expect("example config parses");
        assert_eq!(config.routes().len(), 3);
        assert!(config.store.url.is_some());
        assert_eq!(config.metrics.addr.as_deref(), Some("0.0.0.0:9090"));
        let o = config.relay.options().expect("relay options");
        assert_eq!(o.shutdown_grace, std::time::Duration::from_secs(5));
        assert_eq!(
            o.heartbeat_interval,
            Some(std::time::Duration::from_secs(5))
        );
        assert_eq!(o.cleanup_interval, Some(std::time::Duration::from_secs(60)));
        assert_eq!(o.stats_interval, Some(std::time::Duration::from_secs(30)));
        assert_eq!(
            config.store.retain_sent,
            Some(std::time::Duration::from_secs(7 * 24 * 3600))
        );
    }

    #[test]
    fn listen_addresses() {
        for ok in [
            "127.0.0.1:9090",
            "0.0.0.0:0",
            "[::1]:9090",
            "localhost:9090",
            "metrics.internal:80",
        ] {
            assert_eq!(check_listen_addr(ok), Ok(()), "{ok}");
        }
        for bad in [
            "9090",
            ":9090",
            "host:",
            "host:99999",
            "a b:1",
            "::1:9090",
            "",
        ] {
            assert!(check_listen_addr(bad).is_err(), "{bad}");
        }
    }

    /// A file's lease and send timeout are compared with each other only
    /// once merged with the flags and environment that may override them.
    #[test]
    fn send_timeout_and_lease_are_compared_only_once_merged() {
        let file = FileConfig::parse("[relay]\nlease = \"5s\"\n")
            .expect("a short lease alone is not refused against the default send_timeout")
            .relay;
        // alone it is refused, saying the send timeout is the default
        let err = format!("{:#}", file.options().expect_err("10s default vs 5s"));
        assert!(err.contains("send_timeout = 10s (the default)"), "{err}");
        assert!(err.contains("lease (5s)"), "{err}");
        let flags = RelaySection {
            send_timeout: Some(Duration::from_secs(2)),
            ..RelaySection::default()
        };
        let o = flags.or(file).options().expect("2s is shorter than 5s");
        assert_eq!(
            (o.lease, o.send_timeout),
            (Duration::from_secs(5), Duration::from_secs(2))
        );
        // both in the file and the wrong way round: refused once merged
        let file = FileConfig::parse("[relay]\nsend_timeout = \"40s\"\nlease = \"30s\"\n")
            .expect("parses")
            .relay;
        let err = format!("{:#}", file.options().expect_err("40s vs 30s"));
        assert!(err.contains("send_timeout = 40s is invalid"), "{err}");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[relay]\nlease = \"30x\"\n", "lease"),
            ("[relay]\nbatch_size = 0\n", "batch_size"),
            ("[relay]\nlease = \"0s\"\n", "lease"),
            ("[relay]\nlease = \"2days\"\n", "lease"),
            ("[relay]\nsend_timeout = \"0s\"\n", "send_timeout"),
            ("[relay]\nsend_timeout = \"1day\"\n", "send_timeout"),
            ("[relay]\nbogus = 1\n", "bogus"),
            (
                "[publishers.a]\nurl = \"stdout\"\n[[routes]]\ntopics = \"a..b\"\npublisher = \"a\"\n",
                "routes[0].topics",
            ),
            (
                "[publishers.a]\nurl = \"stdout\"\n[[routes]]\ntopics = \"**\"\npublisher = \"b\"\n",
                "routes[0].publisher",
            ),
            (
                "[publishers.a]\nurl = \"${POSTBOX_SURELY_UNSET_VARIABLE}\"\n",
                "POSTBOX_SURELY_UNSET_VARIABLE",
            ),
            ("[relay]\non_dead = \"explode\"\n", "on_dead"),
            ("[relay]\nshutdown_grace = \"soon\"\n", "shutdown_grace"),
            (
                "[relay]\nheartbeat_interval = \"0s\"\n",
                "heartbeat_interval",
            ),
            ("[metrics]\naddr = \"9090\"\n", "[metrics] addr"),
            ("[metrics]\naddr = \"localhost:http\"\n", "[metrics] addr"),
            ("[metrics]\naddr = \"::1:9090\"\n", "[metrics] addr"),
            ("[metrics]\nport = 9090\n", "port"),
            ("[store]\ntable = \"x; drop table y\"\n", "store.table"),
            ("[store]\ntable = \"public.x.y\"\n", "store.table"),
            ("[store]\nretain_sent = \"0s\"\n", "store.retain_sent"),
            ("[store]\nvacuum_after = 0\n", "store.vacuum_after"),
            ("[store]\nvacuum_after = -5\n", "vacuum_after"),
            (
                "[store]\nretain_sent = \"1000years\"\n",
                "store.retain_sent",
            ),
            ("[store]\nretain_sent = \"a week\"\n", "retain_sent"),
            ("[store]\nretain_sent = 7\n", "retain_sent"),
            ("[relay]\ncleanup_interval = \"0s\"\n", "cleanup_interval"),
            ("[relay]\nstats_interval = \"0s\"\n", "stats_interval"),
            ("[relay]\nstats_interval = \"often\"\n", "stats_interval"),
            (
                "[relay]\ncleanup_interval = \"often\"\n",
                "cleanup_interval",
            ),
        ];
        for (text, named) in cases {
            let err = FileConfig::parse(text).expect_err(text);
            assert!(format!("{err:#}").contains(named), "{text:?}: {err:#}");
        }
    }
}
