//! `postbox relay` and `postbox config check`.

use std::path::Path;
use std::sync::Arc;

use postbox_core::{CancellationToken, OnDead, Relay, Router, Store, StoreError};

use crate::any::{AnyPublisher, AnyStore, Patience};
use crate::cli::{OnDeadArg, RelayArgs, StoreArgs};
use crate::config::{FileConfig, RelaySection};
use crate::output::outln;
use crate::serve::{self, Probe};
use crate::usage;

/// The environment variable for the metrics address.
const METRICS_ADDR_ENV: &str = "POSTBOX_METRICS_ADDR";

/// The relay's settings after flags, environment, file and defaults.
struct Resolved {
    store: StoreArgs,
    relay: RelaySection,
    /// `(pattern, publisher name)`; publishers built from `publishers`.
    routes: Vec<(String, String)>,
    publishers: Vec<(String, Source)>,
    /// Where to serve metrics, and the key it came from (for errors).
    metrics: Option<(&'static str, String)>,
    /// The file's `${NAME}` substitutions in `publishers`, kept out of
    /// errors about them.
    substituted: crate::config::Substitutions,
}

enum Source {
    Url(String),
    Table(toml::Table),
}

fn resolve(args: RelayArgs) -> anyhow::Result<Resolved> {
    let mut file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    if let Some((key, endpoint)) = crate::otel::endpoint(&args, Some(&file)) {
        crate::config::check_otlp_endpoint(&endpoint)
            .map_err(|why| usage(format!("{key} {why}")))?;
    }
    let flags = RelaySection {
        batch_size: args.batch_size,
        lease: args.lease,
        send_timeout: args.send_timeout,
        poll_interval: args.poll_interval,
        concurrency: args.concurrency,
        max_attempts: args.max_attempts,
        retry_base: args.retry_base,
        retry_cap: args.retry_cap,
        on_dead: args.on_dead.map(|o| match o {
            OnDeadArg::Park => OnDead::Park,
            OnDeadArg::Skip => OnDead::Skip,
        }),
        tenant: args.tenant,
        tenant_fairness: None,
        shutdown_grace: args.shutdown_grace,
        heartbeat_interval: args.heartbeat_interval,
        cleanup_interval: args.cleanup_interval,
        stats_interval: args.stats_interval,
    };
    let relay = flags.or(RelaySection::from_env()?).or(file.relay.clone());
    // flags > env > file, like every relay setting; an empty variable is unset
    let metrics = args
        .metrics_addr
        .map(|a| ("--metrics-addr", a))
        .or_else(|| {
            std::env::var(METRICS_ADDR_ENV)
                .ok()
                .filter(|a| !a.is_empty())
                .map(|a| (METRICS_ADDR_ENV, a))
        })
        .or_else(|| file.metrics.addr.clone().map(|a| ("[metrics] addr", a)));
    if let Some((key, addr)) = &metrics {
        crate::config::check_listen_addr(addr)
            .map_err(|why| usage(format!("{key} = {addr:?} {why}")))?;
    }
    relay.options()?;
    let url = args.store.or(file.store.url.clone()).ok_or_else(|| {
        usage("no store: pass --store URL, set POSTBOX_STORE_URL, or set [store] url in the config file")
    })?;
    // the file's table was checked as it was read; one from --table or
    // POSTBOX_TABLE is checked here, so that `config check` judges it too
    if let Some(table) = &args.table {
        crate::config::check_table(table)
            .map_err(|e| usage(format!("table {table:?} (--table, POSTBOX_TABLE): {e}")))?;
    }
    let table = args
        .table
        .or(file.store.table.clone())
        .unwrap_or_else(|| "postbox_outbox".to_owned());
    let scheme = url.split_once(':').map_or("", |(s, _)| s);
    if table.contains('.') && matches!(scheme, "sqlite" | "mysql" | "mariadb") {
        return Err(usage(format!(
            "table {table:?}: a schema-qualified name is for PostgreSQL outboxes only, not {scheme}"
        )));
    }
    // flags > env > file, like the relay settings
    if let Some(keep) = args.retain_sent {
        crate::config::check_retention(keep).map_err(|why| {
            usage(format!(
                "--retain-sent {:?} {why}",
                crate::human::duration(keep)
            ))
        })?;
    }
    let retain_sent = match args.retain_sent {
        Some(keep) => Some(keep),
        None => crate::config::retain_sent_from_env()?.or(file.store.retain_sent),
    };
    let vacuum_after = match args.vacuum_after {
        Some(n) => Some(n),
        None => crate::config::vacuum_after_from_env()?.or(file.store.vacuum_after),
    }
    .and_then(std::num::NonZeroU64::new);
    if vacuum_after.is_some() && !matches!(scheme, "postgres" | "postgresql") {
        return Err(usage(format!(
            "[store] vacuum_after (--vacuum-after, {}) applies to PostgreSQL outboxes only, not {scheme}",
            crate::config::VACUUM_AFTER_ENV
        )));
    }
    let substituted = std::mem::take(&mut file.substituted);
    let (routes, publishers) = match args.publish {
        // --publish replaces the file's publishers: everything goes there
        Some(url) => (
            vec![("**".to_owned(), "publish".to_owned())],
            vec![("publish".to_owned(), Source::Url(url))],
        ),
        None if file.publishers.is_empty() => {
            return Err(usage(
                "nowhere to publish: pass --publish URL, set POSTBOX_PUBLISH_URL, or add [publishers.NAME] to the config file",
            ));
        }
        None => (
            file.routes()
                .into_iter()
                .map(|r| (r.topics, r.publisher))
                .collect(),
            file.publishers
                .into_iter()
                .map(|(name, table)| (name, Source::Table(table)))
                .collect(),
        ),
    };
    Ok(Resolved {
        store: StoreArgs {
            url,
            table,
            retain_sent,
            vacuum_after,
        },
        relay,
        routes,
        publishers,
        metrics,
        substituted,
    })
}

async fn build_router(r: &Resolved) -> anyhow::Result<Router<AnyPublisher>> {
    let send_timeout = r.relay.options()?.send_timeout;
    let mut built = std::collections::BTreeMap::new();
    for (name, source) in &r.publishers {
        let p = match source {
            Source::Url(url) => AnyPublisher::from_url(url).await?,
            Source::Table(table) => AnyPublisher::from_table(name, table)
                .await
                .map_err(|e| r.substituted.redact_error(e))?,
        };
        // A publish the relay gave up on must not land later: another
        // relay may by then have published the message again and its
        // key's next one.
        if let Some((setting, lands_until)) = p.lands_until()
            && lands_until >= send_timeout
        {
            return Err(usage(format!(
                "publishers.{name}: {setting} ({}) must be shorter than the relay's send_timeout ({}): the broker client keeps delivering a message until then, after the relay has counted it as failed, and a key's next message could overtake it",
                crate::human::duration(lands_until),
                crate::human::duration(send_timeout),
            )));
        }
        built.insert(name.clone(), p);
    }
    let mut router = Router::new();
    for (pattern, name) in &r.routes {
        let p = built.get(name).cloned().ok_or_else(|| {
            usage(format!(
                "route {pattern:?} names unknown publisher {name:?}"
            ))
        })?;
        router = router.route(pattern, p)?;
    }
    Ok(router)
}

pub(crate) async fn check_config(path: &Path) -> anyhow::Result<()> {
    let config = FileConfig::load(path)?;
    // where `relay` takes them from: the environment (standing for --store
    // and --table; empty is unset, as for `relay`) before the file
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let table = env("POSTBOX_TABLE");
    // Building the publishers checks their settings. That needs no broker,
    // but the NATS client opens its connection when built (the check goes
    // on whether or not it is reached).
    let mut r = resolve(RelayArgs {
        config: Some(path.to_owned()),
        store: env("POSTBOX_STORE_URL")
            .or_else(|| config.store.url.clone())
            // a placeholder that `resolve` accepts with every setting
            .or_else(|| {
                let vacuum = config.store.vacuum_after.is_some()
                    || std::env::var_os(crate::config::VACUUM_AFTER_ENV)
                        .is_some_and(|v| !v.is_empty());
                // a schema-qualified table is a PostgreSQL one
                let schema = table
                    .as_deref()
                    .or(config.store.table.as_deref())
                    .is_some_and(|t| t.contains('.'));
                Some(if vacuum || schema {
                    "postgres://unused/unused".into()
                } else {
                    "sqlite://unused.db".into()
                })
            }),
        table: table.clone(),
        publish: None,
        batch_size: None,
        lease: None,
        send_timeout: None,
        poll_interval: None,
        concurrency: None,
        max_attempts: None,
        retry_base: None,
        retry_cap: None,
        on_dead: None,
        tenant: None,
        shutdown_grace: None,
        heartbeat_interval: None,
        stats_interval: None,
        retain_sent: None,
        vacuum_after: None,
        cleanup_interval: None,
        metrics_addr: None,
        otlp_endpoint: None,
    })?;
    build_router(&r).await?;
    r.store.url = postbox_core::redact_url(&r.store.url);
    outln!(
        "{}: ok ({} publisher(s), {} route(s), store {})",
        path.display(),
        r.publishers.len(),
        r.routes.len(),
        r.store.url
    );
    Ok(())
}

pub(crate) async fn run(args: RelayArgs) -> anyhow::Result<()> {
    // Everything that can be refused is checked before anything starts.
    let resolved = resolve(args)?;
    let options = resolved.relay.options()?;
    let listener = match &resolved.metrics {
        Some((key, addr)) => Some(serve::bind(key, addr).await?),
        None => None,
    };
    // from here on a signal stops the relay cleanly, also while it still
    // connects to its brokers and its database
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    let publisher = tokio::select! {
        publisher = build_router(&resolved) => publisher?,
        () = shutdown.cancelled() => return Ok(()),
    };
    // Serving starts before the database answers: /healthz says the process
    // runs, /readyz says why it is not ready yet.
    let probe: Probe = Arc::default();
    if let Some(listener) = listener {
        let recorder = serve::install_recorder()?;
        serve::spawn(listener, recorder, Arc::clone(&probe));
    }

    let store = tokio::select! {
        store = AnyStore::open(&resolved.store, Patience::Forever) => store?,
        () = shutdown.cancelled() => return Ok(()),
    };
    if let Err(StoreError::Schema(e)) = store.stats(&postbox_core::Filter::all()).await {
        return Err(usage(format!(
            "the outbox table {:?} is not there ({e}): run `postbox migrate --store …` first",
            resolved.store.table
        )));
    }
    if let Err(StoreError::Schema(e)) = store.relays().await {
        return Err(usage(format!(
            "the outbox table {:?} predates relay heartbeats ({e}): run `postbox migrate --store …` to upgrade it",
            resolved.store.table
        )));
    }
    let relay = Relay::builder(store, publisher).options(options).build()?;
    let health = relay.clone();
    // set once, right here: nothing else can have set it
    let _ = probe.set(Box::new(move || health.health()));
    tracing::info!(
        store = %postbox_core::redact_url(&resolved.store.url),
        routes = resolved.routes.len(),
        batch_size = relay.options().batch_size,
        retain_sent = ?resolved.store.retain_sent,
        vacuum_after = ?resolved.store.vacuum_after,
        postbox.relay_id = %relay.id(),
        "relay started"
    );
    let report = relay.run(shutdown).await;
    tracing::info!(
        claimed = report.claimed,
        sent = report.sent,
        retried = report.retried,
        dead = report.dead,
        released = report.released,
        "relay stopped"
    );
    Ok(())
}

/// SIGTERM and SIGINT stop claiming; in-flight batches finish. A second
/// signal, at least a second after the first, exits at once (status 130 for
/// SIGINT, 143 for SIGTERM), leaving unfinished batches to their leases, as
/// `kill -9` would.
fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight batches (a second signal exits at once)"),
            _ = int.recv() => tracing::info!("SIGINT: finishing in-flight batches (a second signal exits at once)"),
        }
        shutdown.cancel();
        // one keypress can bring two signals (SIGINT to the process group,
        // SIGTERM forwarded by a wrapper): only one after a second counts
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        if drain(&mut term) + drain(&mut int) > 0 {
            tracing::info!("a signal within a second of the first counts as the same one");
        }
        let status = tokio::select! {
            _ = term.recv() => 143,
            _ = int.recv() => 130,
        };
        tracing::warn!("second signal: exiting now; unfinished batches wait for their leases");
        std::process::exit(status);
    });
    Ok(())
}

/// Consumes the signals `sig` has already received, without waiting;
/// returns how many.
fn drain(sig: &mut tokio::signal::unix::Signal) -> usize {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut n = 0;
    while matches!(sig.poll_recv(&mut cx), std::task::Poll::Ready(Some(()))) {
        n += 1;
    }
    n
}
