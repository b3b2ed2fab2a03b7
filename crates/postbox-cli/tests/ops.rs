//! Operating the daemon, end to end through the binary on SQLite: the
//! metrics endpoint and probes, graceful shutdown against a slow webhook,
//! relay heartbeats in `status`, `dead show`, the chunked dead-letter
//! commands, the retention of sent messages with `purge`, and OTLP export
//! of the spans that continue a producer's trace.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::Connection;
use support::{postbox, run, stderr};

mod support;

fn json(o: &Output) -> serde_json::Value {
    assert_eq!(o.status.code(), Some(0), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

fn migrated_sqlite(dir: &Path) -> String {
    let url = format!("sqlite://{}", dir.join("outbox.db").display());
    let o = run(&["migrate", "--store", &url]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    url
}

fn enqueue(url: &str, extra: &[&str]) {
    let o = postbox()
        .args(["enqueue", "--store", url])
        .args(extra)
        .output()
        .expect("enqueue");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// `GET path` on 127.0.0.1:port: the status and body, or `None` while
/// nothing answers.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// Polls `f` until it gives a value, failing the test with `what` after a
/// generous deadline (these are real processes; nothing sleeps a fixed time
/// and hopes).
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Waits until `/readyz` answers 503 with this `reason` and a non-empty
/// `error`.
fn unready_because(port: u16, reason: &str) {
    let body = wait_for(&format!("/readyz to say {reason}"), || {
        let (code, body) = http_get(port, "/readyz")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (code == 503 && v["reason"] == reason).then_some(v)
    });
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
}

/// The value of one sample line of the Prometheus text, e.g.
/// `postbox_messages_published_total{topic="orders.created"}`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
}

/// Stops a relay with SIGTERM and checks it exits 0.
fn stop(mut child: Child) {
    sigterm(&child);
    let status = child.wait().expect("wait");
    let mut err = String::new();
    if let Some(e) = child.stderr.as_mut() {
        e.read_to_string(&mut err).ok();
    }
    assert_eq!(status.code(), Some(0), "relay did not exit 0: {err}");
}

fn spawn_relay(args: &[&str]) -> Child {
    postbox()
        .arg("relay")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn relay")
}

#[test]
fn metrics_health_and_readiness_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = migrated_sqlite(dir.path());
    for i in 0..7 {
        enqueue(
            &url,
            &["--topic", "orders.created", "--payload", &format!("o{i}")],
        );
    }
    enqueue(&url, &["--topic", "audit.login", "--payload", "a"]);
    let port = free_port();
    let out = dir.path().join("out.jsonl");
    let relay = spawn_relay(&[
        "--store",
        &url,
        "--publish",
        &format!("file://{}", out.display()),
        "--poll-interval",
        "20ms",
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    let (code, body) = wait_for("/healthz", || http_get(port, "/healthz"));
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    let metrics = wait_for("all 8 published in /metrics", || {
        let (_, m) = http_get(port, "/metrics")?;
        let created = sample(
            &m,
            "postbox_messages_published_total{topic=\"orders.created\"}",
        )?;
        let audit = sample(
            &m,
            "postbox_messages_published_total{topic=\"audit.login\"}",
        )?;
        (created + audit >= 8.0).then_some(m)
    });
    assert_eq!(
        sample(
            &metrics,
            "postbox_messages_published_total{topic=\"orders.created\"}"
        ),
        Some(7.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "postbox_messages_published_total{topic=\"audit.login\"}"
        ),
        Some(1.0)
    );
    // described, and rendered as histograms with seconds-scale buckets
    assert!(
        metrics.contains("# HELP postbox_messages_published_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "postbox_commit_to_publish_seconds_bucket{topic=\"orders.created\",le=\"0.25\"}"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("postbox_claim_duration_seconds_bucket{le=\"300\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("postbox_batch_size_bucket{le=\"100\"}"),
        "{metrics}"
    );

    let (code, body) = http_get(port, "/readyz").expect("/readyz");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["ready"], true);
    assert_eq!(http_get(port, "/nope").expect("404").0, 404);
    stop(relay);
    let delivered = std::fs::read_to_string(&out).expect("out").lines().count();
    assert_eq!(delivered, 8);
}

#[test]
fn readyz_is_503_naming_the_publisher_while_every_message_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = migrated_sqlite(dir.path());
    enqueue(&url, &["--topic", "t", "--payload", "x"]);
    // a webhook URL nothing listens on: every publish is refused (transient)
    let config = dir.path().join("postbox.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = \"{url}\"\n[relay]\npoll_interval = \"20ms\"\nretry_base = \"50ms\"\nretry_cap = \"50ms\"\nmax_attempts = 100000\n\
             [publishers.hook]\ntype = \"http\"\nurl = \"http://127.0.0.1:{}/hook\"\nunsigned = true\n\
             allow_private_networks = true\nconnect_timeout_ms = 500\n",
            free_port()
        ),
    )
    .expect("config");
    let port = free_port();
    let relay = postbox()
        .arg("relay")
        .arg("--config")
        .arg(&config)
        .env("POSTBOX_METRICS_ADDR", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("relay");
    unready_because(port, "publisher error");
    let (code, _) = http_get(port, "/healthz").expect("/healthz");
    assert_eq!(code, 200, "the process runs: healthy, just not ready");
    let m = http_get(port, "/metrics").expect("/metrics").1;
    assert!(
        sample(
            &m,
            "postbox_publish_failures_total{topic=\"t\",kind=\"transient\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{m}"
    );
    stop(relay);
}

#[test]
fn a_bad_metrics_address_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = migrated_sqlite(dir.path());
    let write = |name: &str, addr: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!("[store]\nurl = \"{url}\"\n[publishers.out]\nurl = \"stdout\"\n[metrics]\naddr = \"{addr}\"\n"),
        )
        .expect("config");
        path.display().to_string()
    };
    let good = write("good.toml", "127.0.0.1:1");
    let bad = write("bad.toml", "127.0.0.1:9x");
    let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_addr = busy.local_addr().expect("addr").to_string();
    let cases: Vec<(Vec<&str>, Option<&str>, &str)> = vec![
        // flag beats env beats file: each names the one in force
        (
            vec!["--config", &good, "--metrics-addr", "9090"],
            Some("127.0.0.1:9091"),
            "--metrics-addr",
        ),
        (
            vec!["--config", &good],
            Some("localhost"),
            "POSTBOX_METRICS_ADDR",
        ),
        (vec!["--config", &bad], None, "[metrics] addr"),
        // a well-formed address that cannot be bound
        (
            vec![
                "--store",
                &url,
                "--publish",
                "stdout",
                "--metrics-addr",
                &busy_addr,
            ],
            None,
            "cannot listen",
        ),
    ];
    for (args, env, named) in cases {
        let mut c = postbox();
        c.arg("relay").args(&args);
        if let Some(v) = env {
            c.env("POSTBOX_METRICS_ADDR", v);
        }
        let o = c.output().expect("run");
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(named), "{args:?}: {}", stderr(&o));
    }
    // `config check` refuses it too, without binding anything
    let o = run(&["config", "check", &bad]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("[metrics] addr"), "{}", stderr(&o));
    drop(busy);
}

/// A webhook receiver that, while `hold` is set, reads each request and
/// never answers; otherwise answers 200 and records the `webhook-id`.
struct SlowWebhook {
    port: u16,
    hold: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    delivered: Arc<Mutex<Vec<String>>>,
}

impl SlowWebhook {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let hook = SlowWebhook {
            port,
            hold: Arc::new(AtomicBool::new(true)),
            held: Arc::default(),
            delivered: Arc::default(),
        };
        let (hold, held, delivered) = (
            Arc::clone(&hook.hold),
            Arc::clone(&hook.held),
            Arc::clone(&hook.delivered),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (hold, held, delivered) =
                    (Arc::clone(&hold), Arc::clone(&held), Arc::clone(&delivered));
                std::thread::spawn(move || serve(stream, &hold, &held, &delivered));
            }
        });
        hook
    }

    fn held(&self) -> usize {
        self.held.lock().expect("lock").len()
    }

    fn delivered(&self) -> Vec<String> {
        self.delivered.lock().expect("lock").clone()
    }
}

/// One keep-alive connection: request after request.
fn serve(
    stream: TcpStream,
    hold: &AtomicBool,
    held: &Mutex<Vec<TcpStream>>,
    delivered: &Mutex<Vec<String>>,
) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    loop {
        let mut id = None;
        let mut length = 0usize;
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((name, value)) = l.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "webhook-id" => id = Some(value.trim().to_owned()),
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if hold.load(Ordering::SeqCst) {
            // keep the socket open, never answer
            held.lock()
                .expect("lock")
                .push(writer.try_clone().expect("clone"));
            continue;
        }
        delivered.lock().expect("lock").push(id.unwrap_or_default());
        if writer
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .is_err()
        {
            return;
        }
    }
}

/// SIGTERM while a batch is being published to a webhook that holds every
/// request: the relay exits 0 within the shutdown grace (plus a margin),
/// its keyless rows are released (attempt not counted, no lease left) and a
/// relay started right after delivers them at once, long before the
/// 5-minute lease would have run out; the head of key k keeps its lease
/// (its abandoned request may still be answered, and k's next message must
/// not overtake it), so k waits.
#[test]
fn sigterm_mid_publish_releases_the_batch_to_the_next_relay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = migrated_sqlite(dir.path());
    for i in 0..5 {
        enqueue(&url, &["--topic", "t", "--payload", &format!("free-{i}")]);
    }
    for i in 0..2 {
        enqueue(
            &url,
            &["--topic", "t", "--key", "k", "--payload", &format!("k-{i}")],
        );
    }
    let hook = SlowWebhook::start();
    let config_arg = hook_config(dir.path(), &url, &hook);
    let grace = Duration::from_secs(1);
    let first = spawn_relay(&["--config", &config_arg, "--shutdown-grace", "1s"]);
    // five keyless messages and the head of key k are in flight, held
    wait_for("6 requests held by the webhook", || {
        (hook.held() == 6).then_some(())
    });
    let s = json(&run(&["status", "--store", &url, "--json"]));
    assert_eq!(s["leased"], 6, "{s}");

    let asked = Instant::now();
    let mut first = first;
    sigterm(&first);
    let status = first.wait().expect("wait");
    let took = asked.elapsed();
    let mut err = String::new();
    first
        .stderr
        .as_mut()
        .expect("stderr")
        .read_to_string(&mut err)
        .ok();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(
        took < grace + Duration::from_secs(10),
        "took {took:?} to stop with a 1 s grace"
    );

    // the keyless rows released (ready, not retrying: no attempt counted),
    // k's head still leased, and the relay's heartbeat row gone
    let s = json(&run(&["status", "--store", &url, "--json"]));
    assert_eq!(
        (&s["pending"], &s["ready"], &s["retrying"], &s["leased"]),
        (
            &serde_json::json!(7),
            &serde_json::json!(6),
            &serde_json::json!(0),
            &serde_json::json!(1)
        ),
        "{s}"
    );
    assert_eq!(s["relays"], serde_json::json!([]), "{s}");

    hook.hold.store(false, Ordering::SeqCst);
    let second = spawn_relay(&["--config", &config_arg]);
    wait_for("the next relay to deliver the 5 keyless messages", || {
        (hook.delivered().len() >= 5).then_some(())
    });
    stop(second);
    let delivered = hook.delivered();
    let distinct: HashSet<&String> = delivered.iter().collect();
    assert_eq!((delivered.len(), distinct.len()), (5, 5), "{delivered:?}");
    // k's two messages wait for the head's lease
    let s = json(&run(&["status", "--store", &url, "--json"]));
    assert_eq!(
        (&s["pending"], &s["leased"]),
        (&serde_json::json!(2), &serde_json::json!(1)),
        "{s}"
    );
}

/// A second SIGTERM ends a relay at once (status 143) instead of waiting out
/// the shutdown grace for a publish that hangs; its rows keep their leases.
#[test]
fn a_second_sigterm_exits_at_once() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let url = migrated_sqlite(dir.path());
    enqueue(&url, &["--topic", "t", "--payload", "held"]);
    let hook = SlowWebhook::start();
    let config = dir.path().join("postbox.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = \"{url}\"\n\
             [relay]\nlease = \"5m\"\nsend_timeout = \"60s\"\npoll_interval = \"20ms\"\n\
             [publishers.hook]\ntype = \"http\"\nurl = \"http://127.0.0.1:{}/hook\"\nunsigned = true\n\
             allow_private_networks = true\ntimeout_ms = 120000\n",
            hook.port
        ),
    )
    .expect("config");
    let config_arg = config.display().to_string();
    let mut relay = postbox()
        .args(["relay", "--config", &config_arg, "--shutdown-grace", "60s"])
        .env("POSTBOX_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn relay");
    wait_for("the request held by the webhook", || {
        (hook.held() == 1).then_some(())
    });
    // the second signal only once the first one was taken: signals that
    // arrive together may count as one
    let (seen, saw) = std::sync::mpsc::channel();
    let stderr = relay.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("finishing in-flight batches") {
                let _ = seen.send(());
            }
        }
    });
    sigterm(&relay);
    saw.recv_timeout(Duration::from_secs(30))
        .expect("the relay logged the first SIGTERM");
    // a signal within a second of the first counts as the same one (one
    // keypress can bring SIGINT and a forwarded SIGTERM): this one does not
    sigterm(&relay);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        relay.try_wait().expect("try_wait").is_none(),
        "a signal right after the first ended the relay"
    );
    sigterm(&relay);
    // 143 is the second signal's status: waiting out the 60 s grace would
    // end with 0
    let status = relay.wait().expect("wait");
    assert_eq!(status.code(), Some(143));
    let s = json(&run(&["status", "--store", &url, "--json"]));
    assert_eq!(s["leased"], 1, "{s}");
}

/// A relay config publishing to `hook` with one worker, a 60 s send timeout
/// and a 5-minute lease; returns its path.
fn hook_config(dir: &std::path::Path, url: &str, hook: &SlowWebhook) -> String {
    let config = dir.join("postbox.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = \"{url}\"\n\
             [relay]\nlease = \"5m\"\nsend_timeout = \"60s\"\npoll_interval = \"20ms\"\nconcurrency = 1\n\
             [publishers.hook]\ntype = \"http\"\nurl = \"http://127.0.0.1:{}/hook\"\nunsigned = true\n\
             allow_private_networks = true\ntimeout_ms = 120000\n",
            hook.port
        ),
    )
    .expect("config");
    config.display().to_string()
}

async fn sqlite(url: &str) -> sqlx::SqliteConnection {
    sqlx::SqliteConnection::connect(url)
        .await
        .expect("open sqlite")
}

/// `status` breaks counts down per topic and tenant and lists relays,
/// flagging one that went silent while holding leases; `relays forget`
/// removes it.
#[tokio::test]
async fn status_breaks_down_and_flags_a_stale_relay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = migrated_sqlite(dir.path());
    enqueue(
        &url,
        &[
            "--topic",
            "orders.created",
            "--payload",
            "1",
            "--tenant",
            "acme",
        ],
    );
    enqueue(
        &url,
        &[
            "--topic",
            "orders.created",
            "--payload",
            "2",
            "--tenant",
            "acme",
        ],
    );
    enqueue(&url, &["--topic", "audit.login", "--payload", "3"]);
    enqueue(
        &url,
        &["--topic", "audit.login", "--payload", "4", "--delay", "10m"],
    );
    // a relay that died two minutes ago holding 100 leases, and a live one
    let mut db = sqlite(&url).await;
    let stale = uuid::Uuid::now_v7();
    let live = uuid::Uuid::now_v7();
    let now_us = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_micros(),
    )
    .expect("micros");
    for (id, host, silent_us, leased) in [
        (stale, "box-a", 120_000_000_i64, 100_i64),
        (live, "box-b", 0, 3),
    ] {
        sqlx::query(
            "INSERT INTO postbox_outbox_relays (relay_id, host, pid, version, started_at, \
             interval_us, last_heartbeat, last_claim_at, leased) VALUES (?1, ?2, 77, '0.1.0', ?3, 5000000, ?4, ?4, ?5)",
        )
        .bind(id)
        .bind(host)
        .bind(now_us - 3_600_000_000)
        .bind(now_us - silent_us)
        .bind(leased)
        .execute(&mut db)
        .await
        .expect("insert heartbeat");
    }

    let v = json(&run(&["status", "--store", &url, "--json"]));
    assert_eq!(v["pending"], 4, "{v}");
    let topics = v["by_topic"].as_array().expect("by_topic");
    let orders = topics
        .iter()
        .find(|g| g["topic"] == "orders.created")
        .expect("orders.created");
    assert_eq!(
        (&orders["pending"], &orders["ready"]),
        (&2.into(), &2.into())
    );
    let audit = topics
        .iter()
        .find(|g| g["topic"] == "audit.login")
        .expect("audit.login");
    assert_eq!((&audit["ready"], &audit["delayed"]), (&1.into(), &1.into()));
    let tenants = v["by_tenant"].as_array().expect("by_tenant");
    assert_eq!(tenants.len(), 2, "{v}");
    assert_eq!(tenants[0]["tenant"], serde_json::Value::Null);
    assert_eq!(tenants[0]["pending"], 2);
    assert_eq!(tenants[1]["tenant"], "acme");
    let relays = v["relays"].as_array().expect("relays");
    let flag = |id: uuid::Uuid| {
        let r = relays
            .iter()
            .find(|r| r["relay_id"] == id.to_string())
            .expect("relay listed");
        (r["stale"].clone(), r["leased"].clone())
    };
    assert_eq!(flag(stale), (true.into(), 100.into()));
    assert_eq!(flag(live), (false.into(), 3.into()));

    let o = run(&["status", "--store", &url]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("by topic"), "{text}");
    assert!(text.contains("by tenant"), "{text}");
    assert!(text.contains("(none)"), "{text}");
    assert!(text.contains("STALE: last seen 2m"), "{text}");
    assert!(text.contains("ago holding 100 leases"), "{text}");
    assert!(text.contains("box-b"), "{text}");

    let listed = json(&run(&["relays", "list", "--store", &url, "--json"]));
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    let o = run(&["relays", "forget", "--store", &url, &stale.to_string()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = run(&["relays", "forget", "--store", &url, &stale.to_string()]);
    assert_eq!(o.status.code(), Some(1), "forgetting twice: {}", stderr(&o));
    let listed = json(&run(&["relays", "list", "--store", &url, "--json"]));
    assert_eq!(listed[0]["relay_id"], live.to_string(), "{listed}");
}

/// `dead show` prints one message whole: headers, text or base64 payload,
/// last error, attempts; `--json` too.
#[tokio::test]
async fn dead_show_prints_the_whole_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = migrated_sqlite(dir.path());
    let mut db = sqlite(&url).await;
    let binary = uuid::Uuid::now_v7();
    let text = uuid::Uuid::now_v7();
    for (id, payload, key) in [
        (binary, vec![0_u8, 159, 146, 150], Some("k")),
        (text, b"{\"order\":42}".to_vec(), None),
    ] {
        sqlx::query(
            "INSERT INTO postbox_outbox (id, topic, key, payload, headers, status, attempts, \
             max_attempts, last_error, parked) \
             VALUES (?1, 'orders.created', ?2, ?3, '{\"content-type\":\"application/json\",\"traceparent\":\"00-ab-cd-01\"}', \
             'dead', 3, 3, 'gave up after 3 attempts: 503 Service Unavailable', ?4)",
        )
        .bind(id)
        .bind(key)
        .bind(payload)
        .bind(key.is_some())
        .execute(&mut db)
        .await
        .expect("insert dead row");
    }
    let o = run(&["dead", "show", "--store", &url, &binary.to_string()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for want in [
        binary.to_string().as_str(),
        "orders.created",
        "dead, parks its key",
        "attempts    3 of 3",
        "gave up after 3 attempts: 503 Service Unavailable",
        "content-type: application/json",
        "traceparent: 00-ab-cd-01",
        "(4 bytes, not UTF-8: base64)",
        "AJ+Slg==",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let o = run(&["dead", "show", "--store", &url, &text.to_string()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("(12 bytes, text)\n{\"order\":42}"), "{out}");

    let v = json(&run(&[
        "dead",
        "show",
        "--store",
        &url,
        "--json",
        &binary.to_string(),
    ]));
    assert_eq!(v["payload_base64"], "AJ+Slg==");
    assert_eq!(v["attempts"], 3);
    assert_eq!(v["headers"]["traceparent"], "00-ab-cd-01");
    assert_eq!(v["parked"], true);
    let v = json(&run(&[
        "dead",
        "show",
        "--store",
        &url,
        "--json",
        &text.to_string(),
    ]));
    assert_eq!(v["payload"], "{\"order\":42}");

    let o = run(&[
        "dead",
        "show",
        "--store",
        &url,
        &uuid::Uuid::now_v7().to_string(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("no message"), "{}", stderr(&o));
}

/// Inserts `n` dead rows of `topic` in one statement.
async fn dead_rows(url: &str, topic: &str, n: i64) {
    let mut db = sqlite(url).await;
    sqlx::query(
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < ?1) \
         INSERT INTO postbox_outbox (topic, payload, status, attempts, last_error) \
         SELECT ?2, 'x' || i, 'dead', 1, 'rejected' FROM c",
    )
    .bind(n)
    .bind(topic)
    .execute(&mut db)
    .await
    .expect("insert dead rows");
}

/// Replay and purge work in chunks over more rows than one chunk, with no
/// progress bar when stderr is not a terminal.
#[tokio::test]
async fn dead_replay_and_purge_over_many_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = migrated_sqlite(dir.path());
    dead_rows(&url, "replay.me", 1203).await;
    dead_rows(&url, "purge.me", 1101).await;
    let o = run(&[
        "dead",
        "replay",
        "--store",
        &url,
        "--topic",
        "replay.me",
        "--json",
    ]);
    assert_eq!(json(&o)["replayed"], 1203);
    assert!(
        o.stderr.is_empty(),
        "progress drawn to a pipe: {}",
        stderr(&o)
    );
    let o = run(&[
        "dead", "purge", "--store", &url, "--topic", "purge.me", "--json",
    ]);
    assert_eq!(json(&o)["purged"], 1101);
    assert!(o.stderr.is_empty(), "{}", stderr(&o));
    let s = json(&run(&["status", "--store", &url, "--json"]));
    assert_eq!(
        (&s["pending"], &s["dead"]),
        (&1203.into(), &0.into()),
        "{s}"
    );
}

/// An age of zero matches every dead message, so it does not stand in for
/// `--all`: `purge --dead-older-than 0s` is refused like `dead purge
/// --older-than 0s`, and deletes nothing. `dead list --limit 0` is refused
/// rather than saying there are no dead messages.
#[tokio::test]
async fn a_zero_age_or_limit_is_refused_for_dead_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = migrated_sqlite(dir.path());
    dead_rows(&url, "keep.me", 3).await;
    for (args, named) in [
        (
            vec!["purge", "--store", &url, "--dead-older-than", "0s"],
            "--dead-older-than",
        ),
        (
            vec![
                "purge",
                "--store",
                &url,
                "--sent-older-than",
                "1d",
                "--dead-older-than",
                "0s",
            ],
            "--dead-older-than",
        ),
        (
            vec!["dead", "purge", "--store", &url, "--older-than", "0s"],
            "--all",
        ),
        (
            vec!["dead", "list", "--store", &url, "--limit", "0"],
            "--limit",
        ),
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(named), "{args:?}: {}", stderr(&o));
    }
    let s = json(&run(&["status", "--store", &url, "--json"]));
    assert_eq!(s["dead"], 3, "{s}");
    let listed = json(&run(&[
        "dead", "list", "--store", &url, "--limit", "2", "--json",
    ]));
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    // with --all, or an age, they go
    let o = run(&["dead", "purge", "--store", &url, "--all", "--json"]);
    assert_eq!(json(&o)["purged"], 3);
}

/// On a terminal the same purge draws a progress bar.
#[tokio::test]
async fn dead_purge_draws_progress_on_a_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = migrated_sqlite(dir.path());
    dead_rows(&url, "purge.me", 2500).await;
    // `script` runs the command on a pseudo-terminal and copies what it drew
    let cmd = format!(
        "{} dead purge --store {url} --all",
        env!("CARGO_BIN_EXE_postbox")
    );
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("POSTBOX_LOG", "warn")
        .env_remove("POSTBOX_STORE_URL")
        .output()
        .expect("script (util-linux) runs the command on a pty");
    let drawn = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{drawn}");
    assert!(drawn.contains("purged 2500 message(s)"), "{drawn}");
    assert!(drawn.contains("dead messages"), "no progress bar: {drawn}");
}

/// On PostgreSQL: ready while the database answers, 503 naming the store
/// once the database is gone, and still a clean exit 0 on SIGTERM.
#[tokio::test]
async fn postgres_readyz_is_503_naming_the_store_when_the_database_is_gone() {
    let addr = postbox_testkit::services::POSTGRES.require().await;
    let name = format!(
        "postbox_ops_{}",
        uuid::Uuid::now_v7()
            .simple()
            .to_string()
            .get(20..)
            .unwrap_or("x")
    );
    let mut admin = None;
    for role in ["postgres", "root"] {
        let url = format!("postgres://{role}@{addr}/test");
        if let Ok(c) = sqlx::PgConnection::connect(&url).await {
            admin = Some((c, role));
            break;
        }
    }
    let (mut admin, role) =
        admin.expect("PostgreSQL accepts role postgres or root (trust auth expected)");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create database");
    let url = format!("postgres://{role}@{addr}/{name}");
    let o = run(&["migrate", "--store", &url]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let port = free_port();
    let relay = spawn_relay(&[
        "--store",
        &url,
        "--publish",
        "stdout",
        "--poll-interval",
        "20ms",
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    wait_for("/readyz 200", || {
        http_get(port, "/readyz").and_then(|(code, _)| (code == 200).then_some(()))
    });
    // the relay's heartbeat row is there while it runs
    let v = json(&run(&["relays", "list", "--store", &url, "--json"]));
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");

    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .expect("drop database");
    unready_because(port, "store error");
    assert_eq!(http_get(port, "/healthz").expect("/healthz").0, 200);
    stop(relay);
}

/// Moves `sent_at` of the kept sent row `seq` back by `by`, as if it had
/// been sent that much earlier.
async fn age_sent(url: &str, seq: i64, by: Duration) {
    let mut db = sqlite(url).await;
    let done = sqlx::query(
        "UPDATE postbox_outbox SET sent_at = sent_at - ?1 WHERE seq = ?2 AND status = 'sent'",
    )
    .bind(i64::try_from(by.as_micros()).expect("micros"))
    .bind(seq)
    .execute(&mut db)
    .await
    .expect("age a sent row");
    assert_eq!(done.rows_affected(), 1, "row {seq} is not a kept sent row");
}

/// `[store] retain_sent` keeps sent messages (counted by `status`, shown by
/// `dead show`); `purge --sent-older-than` deletes those sent long enough
/// ago and refuses to run without a valid age; a relay started later
/// deletes the ones past the retention by itself and counts them in
/// `postbox_sent_purged_total`.
#[tokio::test]
async fn sent_messages_are_kept_then_purged_by_age() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = migrated_sqlite(dir.path());
    for key in ["a", "b", "c"] {
        enqueue(
            &url,
            &["--topic", "audit.kept", "--key", key, "--payload", key],
        );
    }
    let out = dir.path().join("out.jsonl");
    let config = dir.path().join("postbox.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = \"{url}\"\nretain_sent = \"7d\"\n\
             [relay]\npoll_interval = \"20ms\"\ncleanup_interval = \"50ms\"\n\
             [publishers.out]\nurl = \"file://{}\"\n",
            out.display()
        ),
    )
    .expect("write config");
    let config_arg = config.display().to_string();
    let relay = spawn_relay(&["--config", &config_arg]);
    let s = wait_for("3 kept sent messages", || {
        let s = json(&run(&["status", "--store", &url, "--json"]));
        (s["sent"] == 3 && s["pending"] == 0).then_some(s)
    });
    stop(relay);
    assert_eq!(s["dead"], 0, "{s}");
    let o = run(&["status", "--store", &url]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("sent (kept)"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let first = json(&run(&["dead", "list", "--store", &url, "--json"]));
    assert_eq!(first, serde_json::json!([]), "sent rows listed as dead");

    // no age, or one that does not parse: usage errors, nothing deleted
    let o = run(&["purge", "--store", &url]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--sent-older-than"), "{}", stderr(&o));
    let o = run(&["purge", "--store", &url, "--sent-older-than", "a while"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("a while"), "{}", stderr(&o));

    // all three were sent just now: nothing is an hour old
    let o = run(&[
        "purge",
        "--store",
        &url,
        "--sent-older-than",
        "1h",
        "--json",
    ]);
    assert_eq!(json(&o), serde_json::json!({ "sent_purged": 0 }));
    age_sent(&url, 1, Duration::from_secs(2 * 3600)).await;
    let o = run(&[
        "purge",
        "--store",
        &url,
        "--sent-older-than",
        "1h",
        "--dead-older-than",
        "1h",
        "--json",
    ]);
    assert_eq!(
        json(&o),
        serde_json::json!({ "sent_purged": 1, "dead_purged": 0 })
    );
    assert!(o.stderr.is_empty(), "{}", stderr(&o));
    let s = json(&run(&["status", "--store", &url, "--json"]));
    assert_eq!(s["sent"], 2, "{s}");

    // a relay deletes what is past its retention (7d) by itself, not the rest
    age_sent(&url, 2, Duration::from_secs(8 * 24 * 3600)).await;
    let port = free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let relay = spawn_relay(&["--config", &config_arg, "--metrics-addr", &metrics_addr]);
    let purged = wait_for("the relay's cleanup to count one purge", || {
        let (_, body) = http_get(port, "/metrics")?;
        sample(&body, "postbox_sent_purged_total").filter(|n| *n >= 1.0)
    });
    stop(relay);
    assert_eq!(purged, 1.0);
    let s = json(&run(&["status", "--store", &url, "--json"]));
    assert_eq!((&s["sent"], &s["pending"]), (&1.into(), &0.into()), "{s}");
    let kept = json(&run(&[
        "dead",
        "show",
        "--store",
        &url,
        "--json",
        &sent_id(&url, 3).await,
    ]));
    assert_eq!(kept["status"], "sent", "{kept}");
    assert!(kept["sent_at"].is_i64(), "{kept}");
}

/// The id of row `seq`.
async fn sent_id(url: &str, seq: i64) -> String {
    let mut db = sqlite(url).await;
    let id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM postbox_outbox WHERE seq = ?1")
        .bind(seq)
        .fetch_one(&mut db)
        .await
        .expect("id");
    id.to_string()
}

/// `(path, body)` of each request a [`Collector`] got.
type Requests = Vec<(String, Vec<u8>)>;

/// A stand-in OTLP/HTTP collector: answers every request 200 and keeps
/// each `(path, body)`.
struct Collector {
    port: u16,
    got: Arc<Mutex<Requests>>,
}

impl Collector {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind collector");
        let port = listener.local_addr().expect("addr").port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::clone(&got);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let keep = Arc::clone(&keep);
                std::thread::spawn(move || Self::serve(stream, &keep));
            }
        });
        Self { port, got }
    }

    /// HTTP/1.1 with keep-alive: requests with a content-length body.
    fn serve(stream: TcpStream, keep: &Mutex<Requests>) {
        let Ok(mut out) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(stream);
        loop {
            let mut request = String::new();
            if reader.read_line(&mut request).unwrap_or(0) == 0 {
                return;
            }
            let path = request.split_whitespace().nth(1).unwrap_or("").to_owned();
            let mut len = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                if line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    len = value.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            keep.lock().expect("collector lock").push((path, body));
            let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
            if out.write_all(ok).is_err() {
                return;
            }
        }
    }

    fn requests(&self) -> Requests {
        self.got.lock().expect("collector lock").clone()
    }
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn otlp_export_continues_the_producers_trace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = migrated_sqlite(dir.path());
    // a producer elsewhere, in a trace of its own, wrote the W3C header
    let trace = format!("{:032x}", fastrand::u128(1..));
    let parent = format!("{:016x}", fastrand::u64(1..));
    let traceparent = format!("00-{trace}-{parent}-01");
    enqueue(
        &url,
        &[
            "--topic",
            "orders.created",
            "--payload",
            "{}",
            "--header",
            &format!("traceparent={traceparent}"),
        ],
    );
    let collector = Collector::start();
    let out = dir.path().join("out.jsonl");
    let relay = spawn_relay(&[
        "--store",
        &url,
        "--publish",
        &format!("file://{}", out.display()),
        "--otlp-endpoint",
        &format!("http://127.0.0.1:{}/", collector.port),
    ]);
    let line = wait_for("the message published", || {
        std::fs::read_to_string(&out)
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned))
    });
    let published: serde_json::Value = serde_json::from_str(&line).expect("json line");
    assert_eq!(published["headers"]["traceparent"], traceparent.as_str());
    // SIGTERM: the relay flushes its spans before it exits
    stop(relay);

    let requests = collector.requests();
    let traces: Vec<&Vec<u8>> = requests
        .iter()
        .filter(|(path, _)| path == "/v1/traces")
        .map(|(_, body)| body)
        .collect();
    assert!(!traces.is_empty(), "no POST /v1/traces, got {requests:?}");
    // protobuf carries ids as raw bytes and names as plain strings: the
    // relay's span joined the producer's trace under the producer's span
    let span = traces
        .iter()
        .find(|b| contains(b, b"postbox.message"))
        .expect("a postbox.message span exported");
    assert!(
        contains(span, &hex_bytes(&trace)),
        "not in the producer's trace"
    );
    assert!(
        contains(span, &hex_bytes(&parent)),
        "not under the producer's span"
    );
    assert!(contains(span, b"orders.created"));
}

#[test]
fn a_bad_otlp_endpoint_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = migrated_sqlite(dir.path());
    let o = run(&[
        "relay",
        "--store",
        &url,
        "--publish",
        "stdout",
        "--otlp-endpoint",
        "grpc://collector:4317",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--otlp-endpoint"), "{}", stderr(&o));
    assert!(stderr(&o).contains("http://"), "{}", stderr(&o));
}
