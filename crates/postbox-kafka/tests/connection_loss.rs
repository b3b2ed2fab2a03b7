//! Connection loss between the Kafka publisher and the broker, through the
//! testkit's `FaultProxy`.
//!
//! A Kafka client connects to the bootstrap address only to learn the
//! brokers' advertised addresses, then talks to those. The shared Tansu on
//! 127.0.0.1:9092 advertises itself, so a client pointed at a proxy in front
//! of it would go around the proxy after the first metadata request. This
//! test therefore starts its own Tansu (the binary `scripts/kafka install`
//! puts in place) on a free port, with in-memory storage, advertising the
//! proxy's address: every connection the client makes goes through the proxy.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::{consume, create_topic};
use postbox_kafka::{KafkaConfig, KafkaPublisher};
use postbox_testkit::FaultProxy;
use tokio::process::{Child, Command};
use uuid::Uuid;

/// Where `scripts/kafka install` puts the binary.
fn tansu_binary() -> PathBuf {
    let bin = match std::env::var_os("POSTBOX_TANSU_ROOT") {
        Some(root) => PathBuf::from(root).join("bin/tansu"),
        None => {
            let cargo_home = std::env::var_os("CARGO_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
                .expect("neither CARGO_HOME nor HOME is set: cannot find the tansu binary");
            cargo_home.join("bin/tansu")
        }
    };
    assert!(
        bin.is_file(),
        "Tansu (Kafka-compatible broker) is not installed at {}: run `scripts/kafka install` \
         (set POSTBOX_TANSU_ROOT if it was installed elsewhere)",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Tansu broker of this test alone; killed when dropped (also when the
/// test panics).
struct PrivateTansu {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl PrivateTansu {
    /// Starts Tansu on 127.0.0.1:`port`, advertising `advertised`
    /// (`host:port`), and waits until it accepts connections.
    async fn start_on(port: u16, advertised: &str) -> Self {
        let bin = tansu_binary();
        let addr = format!("127.0.0.1:{port}");
        let log = std::env::temp_dir().join(format!("postbox-tansu-{}.log", Uuid::new_v4()));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(&bin)
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://{addr}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://{advertised}"))
            .arg("--storage-engine")
            .arg("memory://tansu/")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut tansu = Self { child, addr, log };
        tansu.wait_until_listening().await;
        tansu
    }

    async fn wait_until_listening(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(&self.addr).await.is_ok() {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "tansu exited during start-up ({status}); log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "tansu did not listen on {} within 30 s; log:\n{}",
                self.addr,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PrivateTansu {
    fn drop(&mut self) {
        // kill_on_drop kills the child when `self.child` is dropped right after
        let _ = std::fs::remove_file(&self.log);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_the_connection_breaks() {
    // the proxy's target is resolved at each connect: Tansu can start after it
    let port = free_port();
    let proxy = FaultProxy::start(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let advertised = proxy.addr().to_string();
    let tansu = PrivateTansu::start_on(port, &advertised).await;
    let topic = format!("postbox_loss_{}", Uuid::new_v4().simple());
    create_topic(&advertised, &topic).await;

    // a few seconds to give up on a stalled broker, as the scenario asks
    let publisher =
        KafkaPublisher::new(KafkaConfig::new(&advertised).message_timeout(Duration::from_secs(3)))
            .unwrap();
    let report = postbox_testkit::connection_loss_scenario(&proxy, &publisher, &topic).await;

    // at-least-once: the topic may hold more (Transient ones that made it),
    // but every Ok one must be there
    let got = consume(
        &advertised,
        &topic,
        report.sent.len(),
        Duration::from_secs(20),
    )
    .await;
    let ids: HashSet<Uuid> = got.iter().filter_map(|r| r.received.id).collect();
    for m in &report.ok {
        assert!(ids.contains(&m.id), "acknowledged message {} lost", m.id);
    }
    assert!(!report.ok.is_empty());
    drop(tansu);
}
