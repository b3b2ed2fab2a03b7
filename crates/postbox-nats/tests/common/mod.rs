//! A per-test JetStream stream and a consumer for it.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use futures_util::StreamExt;
use postbox_core::Headers;
use postbox_nats::{KEY_HEADER, NatsConfig, NatsPublisher};
use postbox_testkit::{LargePayload, PublisherHarness, Received};

pub struct NatsHarness {
    pub suffix: String,
    pub js: jetstream::Context,
    pub publisher: NatsPublisher,
    /// nothing listens on port 1; `new` succeeds anyway
    pub unreachable: NatsPublisher,
    pub addr: String,
    /// next stream sequence `receive` reads from
    next: AtomicU64,
}

pub fn suffix() -> String {
    format!("{:016x}", fastrand::u64(..))
}

pub async fn harness() -> NatsHarness {
    let addr = postbox_testkit::services::NATS.require().await;
    let suffix = suffix();
    let client = async_nats::connect(addr.as_str()).await.unwrap();
    let js = jetstream::new(client);
    js.create_stream(jetstream::stream::Config {
        name: format!("POSTBOX_TEST_{suffix}"),
        subjects: vec![format!("postbox.test.{suffix}.>")],
        // memory: a restart of the test server clears what tests leave
        storage: jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .unwrap();
    let publisher = NatsPublisher::connect(config(&addr)).await.unwrap();
    let unreachable = NatsPublisher::new(config("127.0.0.1:1")).await.unwrap();
    NatsHarness {
        suffix,
        js,
        publisher,
        unreachable,
        addr,
        next: AtomicU64::new(1),
    }
}

pub fn config(addr: &str) -> NatsConfig {
    NatsConfig::from_url(&format!("nats://{addr}"))
        .unwrap()
        .ack_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2))
}

impl NatsHarness {
    pub fn topic_name(&self) -> String {
        format!("postbox.test.{}.events", self.suffix)
    }

    pub fn stream(&self) -> String {
        format!("POSTBOX_TEST_{}", self.suffix)
    }

    /// Reads up to `n` messages from the stream (from where the last call
    /// stopped) until `timeout`.
    pub async fn read(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let stream = self.js.get_stream(self.stream()).await.unwrap();
        let start = self.next.load(Ordering::SeqCst);
        let consumer = stream
            .create_consumer(OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while got.len() < n {
            let Ok(next) = tokio::time::timeout_at(deadline, messages.next()).await else {
                break;
            };
            let Some(m) = next else { break };
            let m = m.unwrap();
            self.next
                .store(m.info().unwrap().stream_sequence + 1, Ordering::SeqCst);
            let mut headers = Headers::new();
            let mut id = None;
            let mut key = None;
            if let Some(h) = &m.headers {
                for (name, values) in h.iter() {
                    let value = values
                        .first()
                        .map(|v| v.as_str().to_owned())
                        .unwrap_or_default();
                    match name.as_ref() {
                        "Nats-Msg-Id" => id = value.parse().ok(),
                        KEY_HEADER => key = Some(value.clone()),
                        _ => {}
                    }
                    headers.insert(name.to_string(), value);
                }
            }
            got.push(Received {
                id,
                key,
                headers,
                payload: m.payload.clone(),
            });
        }
        got
    }
}

impl PublisherHarness for NatsHarness {
    type Publisher = NatsPublisher;

    fn publisher(&self) -> NatsPublisher {
        self.publisher.clone()
    }

    fn unreachable_publisher(&self) -> NatsPublisher {
        self.unreachable.clone()
    }

    fn topic(&self) -> String {
        self.topic_name()
    }

    fn receive(&self, n: usize, timeout: Duration) -> impl Future<Output = Vec<Received>> + Send {
        self.read(n, timeout)
    }

    fn large_payload(&self) -> LargePayload {
        // the server's default max_payload is 1 MiB: 1 MiB plus headers is over
        LargePayload::Rejected
    }
}

/// A `nats-server` of the test's own (e.g. with authentication), on a free
/// port, with JetStream in a temporary directory; stopped when dropped.
pub struct OwnNatsServer {
    child: std::process::Child,
    pub port: u16,
    /// JetStream's store and the log; removed when dropped
    dir: tempfile::TempDir,
}

/// Where the `nats-server` binary is: `POSTBOX_TEST_NATS_SERVER`, else
/// `/usr/sbin/nats-server` (Debian's package, which also runs the shared
/// test server on 4222), else `nats-server` on `PATH`. Panics (failing the
/// test, never skipping it) naming what is missing.
pub fn nats_server_binary() -> std::path::PathBuf {
    if let Ok(path) = std::env::var("POSTBOX_TEST_NATS_SERVER") {
        return path.into();
    }
    let debian = std::path::Path::new("/usr/sbin/nats-server");
    if debian.is_file() {
        return debian.to_owned();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("nats-server"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "the nats-server binary is missing: this test starts its own NATS server (with authentication). \
                 Install Debian's package nats-server (it provides /usr/sbin/nats-server, which also serves \
                 the shared test server on 127.0.0.1:4222) or set POSTBOX_TEST_NATS_SERVER to its path."
            )
        })
}

impl OwnNatsServer {
    /// Starts `nats-server -js` with `args` (e.g. `["--user", "u",
    /// "--pass", "p"]`) and waits until it accepts connections.
    pub async fn start(args: &[&str]) -> Self {
        let binary = nats_server_binary();
        let dir = tempfile::tempdir().unwrap();
        let mut last_log = String::new();
        // the port is free when asked, and may be taken before the server
        // binds it: try again with another one
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let log = dir.path().join(format!("nats-{port}.log"));
            let mut child = std::process::Command::new(&binary)
                .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
                .arg(dir.path())
                .arg("-l")
                .arg(&log)
                .args(args)
                .stdin(std::process::Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return OwnNatsServer { child, port, dir };
                }
                if child.try_wait().unwrap().is_some() || tokio::time::Instant::now() >= deadline {
                    last_log = std::fs::read_to_string(&log).unwrap_or_default();
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!(
            "nats-server ({}) did not start; its last log: {last_log}",
            binary.display()
        );
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnNatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
