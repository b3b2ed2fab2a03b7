//! `postbox relay`.

use postbox_core::{CancellationToken, OnDead, Relay, RetryPolicy, Store, StoreError};

use crate::any::{AnyPublisher, AnyStore, Patience};
use crate::cli::{OnDeadArg, RelayArgs};
use crate::usage;

pub(crate) async fn run(args: RelayArgs) -> anyhow::Result<()> {
    // Everything that can be refused is checked before anything starts.
    let publisher = AnyPublisher::from_url(&args.publish).await?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;

    let store = tokio::select! {
        store = AnyStore::open(&args.store, Patience::Forever) => store?,
        () = shutdown.cancelled() => return Ok(()),
    };
    if let Err(StoreError::Schema(e)) = store.stats(&postbox_core::Filter::all()).await {
        return Err(usage(format!(
            "the outbox table {:?} is not there ({e}): run `postbox migrate --store …` first",
            args.store.table
        )));
    }
    let mut builder = Relay::builder(store, publisher)
        .batch_size(args.batch_size)
        .lease(args.lease)
        .send_timeout(args.send_timeout)
        .poll_interval(args.poll_interval)
        .concurrency(args.concurrency)
        .max_attempts(args.max_attempts)
        .retry_policy(RetryPolicy::new(args.retry_base, args.retry_cap))
        .on_dead(match args.on_dead {
            OnDeadArg::Park => OnDead::Park,
            OnDeadArg::Skip => OnDead::Skip,
        });
    if let Some(t) = &args.tenant {
        builder = builder.tenant(t.clone());
    }
    let relay = builder.build()?;
    tracing::info!(
        store = %postbox_core::redact_url(&args.store.url),
        publish = %postbox_core::redact_url(&args.publish),
        batch_size = args.batch_size,
        "relay started"
    );
    let report = relay.run(shutdown).await;
    tracing::info!(
        claimed = report.claimed,
        sent = report.sent,
        retried = report.retried,
        dead = report.dead,
        "relay stopped"
    );
    Ok(())
}

/// SIGTERM and SIGINT stop claiming; in-flight batches finish.
fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight batches"),
            _ = int.recv() => tracing::info!("SIGINT: finishing in-flight batches"),
        }
        shutdown.cancel();
    });
    Ok(())
}
