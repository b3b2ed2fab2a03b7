//! Wake-ups: a dedicated LISTEN connection that resolves
//! [`Store::notified`](postbox_core::Store::notified) on a notification.
//!
//! Only a hint: the relay polls regardless, so while this connection is down
//! (killed, database restarting) messages are still delivered, just at the
//! poll interval. The task reconnects with backoff and stops when the last
//! handle of the store is dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::watch;

/// Shared between the store handles and the listener task.
///
/// A generation counter in a `watch` channel rather than a `Notify`: a
/// relay subscribes *before* it claims, and a notification that lands while
/// the claim runs (after its snapshot was taken) must still end the wait
/// that follows. `Notify::notify_waiters` reaches only futures already
/// waiting and would drop it.
#[derive(Debug)]
pub(crate) struct Wakeup {
    generation: watch::Sender<u64>,
    pub(crate) listening: AtomicBool,
}

impl Default for Wakeup {
    fn default() -> Self {
        Self {
            generation: watch::Sender::new(0),
            listening: AtomicBool::new(false),
        }
    }
}

impl Wakeup {
    /// Ends every wait subscribed before now.
    pub(crate) fn wake(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// A wait that ends at the next [`Wakeup::wake`] after this call (not
    /// after the first poll of the returned future).
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

/// Runs until `stop` is dropped.
pub(crate) async fn listen_loop(
    options: PgConnectOptions,
    channel: String,
    wakeup: Arc<Wakeup>,
    mut stop: watch::Receiver<()>,
) {
    let options = options.application_name("postbox-listener");
    let mut failures: u32 = 0;
    loop {
        let session = async {
            // A pool of one used only by this listener: PgListener takes its
            // connection from it and reconnects through it.
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(10))
                .max_lifetime(None)
                .idle_timeout(None)
                .connect_lazy_with(options.clone());
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.ignore_pool_close_event(true);
            listener.listen(&channel).await?;
            wakeup.listening.store(true, Ordering::Relaxed);
            tracing::debug!(postbox.channel = %channel, "listening for outbox notifications");
            // Anything notified while we were not listening was lost: look now.
            wakeup.wake();
            loop {
                match listener.try_recv().await? {
                    Some(_) => wakeup.wake(),
                    None => {
                        // connection lost; PgListener reconnects and
                        // re-listens on the next call
                        tracing::warn!(postbox.channel = %channel, "LISTEN connection lost, reconnecting");
                        wakeup.wake();
                    }
                }
                failures = 0;
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        let result = tokio::select! {
            _ = stop.changed() => return,
            r = session => r,
        };
        wakeup.listening.store(false, Ordering::Relaxed);
        wakeup.wake();
        failures = failures.saturating_add(1);
        let wait = Duration::from_millis(100)
            .saturating_mul(2u32.saturating_pow(failures.min(8)))
            .min(Duration::from_secs(10));
        if let Err(e) = result {
            tracing::warn!(postbox.channel = %channel, error = %e, ?wait, "LISTEN failed, polling only until it is back");
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
