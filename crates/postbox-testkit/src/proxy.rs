//! A userspace TCP proxy that injects network faults between a client under
//! test and a real service: cut connections, stalls, a black hole, latency.
//!
//! Point the client at [`FaultProxy::addr`] instead of the service, then
//! break things from the test:
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use postbox_testkit::proxy::FaultProxy;
//!
//! let proxy = FaultProxy::start("127.0.0.1:4222").await?;
//! let url = format!("nats://{}", proxy.addr());
//! // ... connect a client to `url`, publish ...
//! proxy.cut(); // every open connection is reset (RST), new ones are accepted
//! proxy.stall(true); // bytes stop flowing both ways, connections stay open
//! proxy.stall(false);
//! proxy.blackhole(true); // new connections are accepted but never reach the service
//! # Ok(()) }
//! ```
//!
//! Dropping the proxy closes its listener and every connection.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A TCP proxy on `127.0.0.1:<random port>` forwarding to one target, with
/// faults switched on and off by the test. See the [module docs](self).
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    target: String,
    /// Cancelled when the proxy is dropped: ends the listener and everything.
    shutdown: CancellationToken,
    /// Cancelled by [`FaultProxy::cut`] and replaced by a fresh child of
    /// `shutdown`; every connection holds the generation it was accepted in.
    generation: Mutex<CancellationToken>,
    /// Cancelled by [`FaultProxy::silence_open`] and replaced by a fresh
    /// token; every connection holds the one it was accepted under.
    silence: Mutex<CancellationToken>,
    stalled: watch::Sender<bool>,
    blackhole: AtomicBool,
    latency: watch::Sender<Duration>,
    connections: AtomicUsize,
}

impl Shared {
    fn current_generation(&self) -> CancellationToken {
        self.generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn current_silence(&self) -> CancellationToken {
        self.silence
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl FaultProxy {
    /// Starts a proxy listening on `127.0.0.1:0` that forwards every accepted
    /// connection to `target` (`host:port`, resolved at each connect, so the
    /// target need not be up yet). Must be called inside a tokio runtime.
    pub async fn start(target: impl Into<String>) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            target: target.into(),
            generation: Mutex::new(shutdown.child_token()),
            silence: Mutex::new(CancellationToken::new()),
            shutdown,
            stalled: watch::Sender::new(false),
            blackhole: AtomicBool::new(false),
            latency: watch::Sender::new(Duration::ZERO),
            connections: AtomicUsize::new(0),
        });
        tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self { addr, shared })
    }

    /// The address clients should connect to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The target this proxy forwards to, as given to [`FaultProxy::start`].
    pub fn target(&self) -> &str {
        &self.shared.target
    }

    /// Resets every connection open right now (both sides see a TCP RST).
    /// Connections accepted afterwards work normally (unless another fault is
    /// on).
    pub fn cut(&self) {
        let mut generation = self
            .shared
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        generation.cancel();
        *generation = self.shared.shutdown.child_token();
    }

    /// Silences every connection open right now for good: no byte is
    /// forwarded on them in either direction again, and they stay open (a
    /// peer gone without a word: a crashed host, a dropped NAT entry).
    /// Connections accepted afterwards work normally.
    pub fn silence_open(&self) {
        let mut silence = self
            .shared
            .silence
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        silence.cancel();
        *silence = CancellationToken::new();
    }

    /// While `true`, no byte is forwarded in either direction; connections
    /// stay open and new ones are still accepted (and connected to the
    /// target), so a client sees a peer that has gone silent. Bytes read
    /// before the stall are delivered after it ends.
    pub fn stall(&self, on: bool) {
        self.shared.stalled.send_replace(on);
    }

    /// While `true`, new connections are accepted but never connected to the
    /// target: the client sees a connection on which nothing ever answers.
    /// Such connections stay open until [`FaultProxy::cut`] or drop, even
    /// after the black hole is switched off. Existing connections are not
    /// affected.
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::SeqCst);
    }

    /// Delays every chunk of bytes, in both directions, by `latency` after it
    /// was read (a one-way delay; throughput is not limited by it). Zero turns
    /// it off.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.latency.send_replace(latency);
    }

    /// How many client connections are open right now (black-holed ones
    /// included).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, _)) => {
                let generation = shared.current_generation();
                let silence = shared.current_silence();
                shared.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(connection(client, generation, silence, Arc::clone(&shared)));
            }
            Err(e) => {
                tracing::debug!(error = %e, "fault proxy accept failed");
                // e.g. EMFILE: back off instead of spinning
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Decrements the connection count however a connection task ends.
struct Counted(Arc<Shared>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn connection(
    client: TcpStream,
    cut: CancellationToken,
    silence: CancellationToken,
    shared: Arc<Shared>,
) {
    let _counted = Counted(Arc::clone(&shared));
    // A cut must look like a broken link (RST), not a polite close.
    let _ = client.set_zero_linger();
    let _ = client.set_nodelay(true);
    if shared.blackhole.load(Ordering::SeqCst) {
        // Hold the client socket open, never read, never answer.
        cut.cancelled().await;
        return;
    }
    let server = tokio::select! {
        () = cut.cancelled() => return,
        server = TcpStream::connect(shared.target.as_str()) => server,
    };
    let server = match server {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(target_addr = %shared.target, error = %e, "fault proxy cannot reach its target");
            return;
        }
    };
    let _ = server.set_zero_linger();
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // An EOF one way is passed on as a half-close (FIN); the connection ends
    // when both directions have ended, or at a cut.
    tokio::select! {
        () = cut.cancelled() => {}
        _ = futures_util::future::join(
            pipe(client_read, server_write, &shared, &silence),
            pipe(server_read, client_write, &shared, &silence),
        ) => {}
    }
}

/// Forwards one direction: a reader stamps each chunk with the time it was
/// read, a writer releases it `latency` later, unless stalled.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: &Shared,
    silence: &CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(16);
    // `move`: the reader owns `tx`, so its end closes the channel
    let read = async move {
        let mut stalled = shared.stalled.subscribe();
        loop {
            // stop reading while stalled so the sender's TCP window fills up
            if stalled.wait_for(|s| !*s).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 16 * 1024];
            let read = tokio::select! {
                // silenced: hold the connection, never read again
                () = silence.cancelled() => std::future::pending().await,
                read = from.read(&mut buf) => read,
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send((Instant::now(), buf)).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let write = async {
        let mut stalled = shared.stalled.subscribe();
        let latency = shared.latency.subscribe();
        while let Some((read_at, chunk)) = rx.recv().await {
            let delay = *latency.borrow();
            if !delay.is_zero() {
                tokio::time::sleep_until(read_at + delay).await;
            }
            if stalled.wait_for(|s| !*s).await.is_err() {
                return;
            }
            if silence.is_cancelled() {
                std::future::pending::<()>().await;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    // The reader ending (EOF) lets the writer flush what is queued, then the
    // channel closes and the writer ends too.
    tokio::join!(read, write);
}

/// What [`connection_loss_scenario`] published.
#[derive(Debug, Clone, Default)]
pub struct LossReport {
    /// Every message the publisher reported `Ok`, in any phase: each must be
    /// on the broker.
    pub ok: Vec<postbox_core::Message>,
    /// Every message sent, whatever its outcome (a retried one once per
    /// attempt).
    pub sent: Vec<postbox_core::Message>,
}

/// Publishes through `proxy` while it breaks, the way a relay would, and
/// panics if an outcome is wrong:
///
/// 1. a batch with the network healthy: all `Ok`;
/// 2. a batch while the proxy is stalled (the publisher's send/ack timeout
///    must fire): every outcome `Transient` (no acknowledgement can cross a
///    stalled link), one per message, within 60 s;
/// 3. the stall lifted and every connection cut while a batch is in flight:
///    again `Ok` or `Transient` only;
/// 4. the network healthy again: a batch retried (only its non-`Ok`
///    messages, like a relay) until all are `Ok`, within 60 s.
///
/// The caller then checks that every message in [`LossReport::ok`] is on
/// the broker (nothing acknowledged was lost). `publisher` must be
/// connected through `proxy`, and its send/ack timeout should be a few
/// seconds.
pub async fn connection_loss_scenario<P: postbox_core::Publisher>(
    proxy: &FaultProxy,
    publisher: &P,
    topic: &str,
) -> LossReport {
    use postbox_core::PublishOutcome;

    use crate::publisher_suite::message;

    let mut report = LossReport::default();
    let mut seq = 0;
    let mut batch = |n: usize, phase: &str| -> Vec<postbox_core::Message> {
        (0..n)
            .map(|i| {
                seq += 1;
                let key = format!("k{}", i % 3);
                message(seq, topic, Some(&key), format!("{phase}-{i}").into_bytes())
            })
            .collect()
    };
    let check = |phase: &str, sent: &[postbox_core::Message], outcomes: &[PublishOutcome]| {
        assert_eq!(
            outcomes.len(),
            sent.len(),
            "{phase}: one outcome per message"
        );
        for o in outcomes {
            assert!(
                matches!(o, PublishOutcome::Ok | PublishOutcome::Transient { .. }),
                "{phase}: a network fault must give Ok or Transient, got {o:?}"
            );
        }
    };
    async fn within<F: Future>(phase: &str, f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .unwrap_or_else(|_| panic!("{phase}: publish did not return within 60 s"))
    }
    let mut record = |sent: Vec<postbox_core::Message>, outcomes: &[PublishOutcome]| {
        for (m, o) in sent.into_iter().zip(outcomes) {
            if o.is_ok() {
                report.ok.push(m.clone());
            }
            report.sent.push(m);
        }
    };

    // 1. healthy
    let first = batch(10, "healthy");
    let outcomes = within("healthy", publisher.publish(&first)).await;
    assert!(
        outcomes.iter().all(PublishOutcome::is_ok),
        "healthy network: not all Ok: {outcomes:?}"
    );
    record(first, &outcomes);

    // 2. stalled past the publisher's timeout
    proxy.stall(true);
    let stalled = batch(10, "stalled");
    let outcomes = within("stalled", publisher.publish(&stalled)).await;
    check("stalled", &stalled, &outcomes);
    // nothing can have been acknowledged through a silent link
    assert!(
        !outcomes.iter().any(PublishOutcome::is_ok),
        "stalled: Ok without an acknowledgement from the broker: {outcomes:?}"
    );
    record(stalled, &outcomes);
    proxy.stall(false);

    // 3. cut while a batch is in flight
    let cut = batch(10, "cut");
    let (outcomes, ()) = tokio::join!(within("cut", publisher.publish(&cut)), async {
        tokio::task::yield_now().await;
        proxy.cut();
    });
    check("cut", &cut, &outcomes);
    record(cut, &outcomes);

    // 4. healthy again: retry until every message is Ok
    let mut rest = batch(10, "restored");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let outcomes = within("restored", publisher.publish(&rest)).await;
        check("restored", &rest, &outcomes);
        let failed: Vec<_> = rest
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| !o.is_ok())
            .map(|(m, _)| m.clone())
            .collect();
        record(rest, &outcomes);
        if failed.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reconnect: still failing after 60 s: {outcomes:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        rest = failed;
    }
    report
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn echo_server() -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = tokio::select! {
                    () = token.cancelled() => return,
                    a = listener.accept() => a.unwrap(),
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        (addr, stop)
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await?;
        Ok(got)
    }

    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn forwards_both_ways_and_counts_connections() {
        let (echo, _stop) = echo_server().await;
        let proxy = FaultProxy::start(echo.to_string()).await.unwrap();
        assert_eq!(proxy.connections(), 0);
        let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (ra, rb) = tokio::join!(round_trip(&mut a, &big), round_trip(&mut b, b"hello"));
        assert_eq!(ra.unwrap(), big);
        assert_eq!(rb.unwrap(), b"hello");
        assert_eq!(proxy.connections(), 2);
        drop(a);
        eventually("one connection to close", || proxy.connections() == 1).await;
    }

    #[tokio::test]
    async fn cut_resets_open_connections_and_accepts_new_ones() {
        let (echo, _stop) = echo_server().await;
        let proxy = FaultProxy::start(echo.to_string()).await.unwrap();
        let mut old = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut old, b"before").await.unwrap(), b"before");
        proxy.cut();
        eventually("the cut connection to go", || proxy.connections() == 0).await;
        // the old connection is dead: reading gives EOF or a reset
        let mut buf = [0u8; 8];
        let r = old.read(&mut buf).await;
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "old connection still alive: {r:?}"
        );
        let mut new = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut new, b"after").await.unwrap(), b"after");
    }

    #[tokio::test]
    async fn stall_holds_bytes_until_released() {
        let (echo, _stop) = echo_server().await;
        let proxy = FaultProxy::start(echo.to_string()).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut s, b"warm").await.unwrap(), b"warm");
        proxy.stall(true);
        s.write_all(b"held").await.unwrap();
        let mut buf = [0u8; 4];
        // nothing comes back while stalled (a bounded wait is only a
        // non-event check; the release below is what must happen)
        let early = tokio::time::timeout(Duration::from_millis(200), s.read_exact(&mut buf)).await;
        assert!(early.is_err(), "bytes passed a stalled proxy");
        assert_eq!(proxy.connections(), 1, "stall must keep the connection");
        proxy.stall(false);
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"held");
    }

    #[tokio::test]
    async fn blackhole_accepts_but_never_answers() {
        let (echo, _stop) = echo_server().await;
        let proxy = FaultProxy::start(echo.to_string()).await.unwrap();
        proxy.blackhole(true);
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(b"anyone?").await.unwrap();
        let mut buf = [0u8; 7];
        let r = tokio::time::timeout(Duration::from_millis(200), s.read_exact(&mut buf)).await;
        assert!(r.is_err(), "a black hole answered: {r:?}");
        eventually("the black-holed connection to count", || {
            proxy.connections() == 1
        })
        .await;
        proxy.blackhole(false);
        let mut ok = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut ok, b"hi").await.unwrap(), b"hi");
        proxy.cut();
        eventually("cut to close both", || proxy.connections() == 0).await;
    }

    #[tokio::test(start_paused = true)]
    async fn latency_delays_each_direction() {
        let (echo, _stop) = echo_server().await;
        let proxy = FaultProxy::start(echo.to_string()).await.unwrap();
        proxy.set_latency(Duration::from_secs(5));
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let start = Instant::now();
        assert_eq!(round_trip(&mut s, b"slow").await.unwrap(), b"slow");
        // paused clock: virtual time advanced by exactly the two one-way delays
        assert!(start.elapsed() >= Duration::from_secs(10));
    }

    #[tokio::test]
    async fn drop_closes_everything() {
        let (echo, _stop) = echo_server().await;
        let proxy = FaultProxy::start(echo.to_string()).await.unwrap();
        let addr = proxy.addr();
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(round_trip(&mut s, b"x").await.unwrap(), b"x");
        drop(proxy);
        let mut buf = [0u8; 1];
        let r = s.read(&mut buf).await;
        assert!(matches!(r, Ok(0) | Err(_)), "connection outlived the proxy");
        // the listener is gone too (poll: the accept task ends asynchronously)
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).await.is_ok() {
            assert!(Instant::now() < deadline, "listener still accepting");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
