//! Shared machinery of the fault-injection suite: databases, producers that
//! keep a ledger of what committed and what rolled back, relay processes,
//! a throwaway PostgreSQL cluster, and the end-of-run verdict.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postbox_core::NewMessage;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

/// The topic every chaos producer writes.
pub const TOPIC: &str = "chaos.events";

/// `POSTBOX_CHAOS_LONG=1` (what `scripts/chaos --long` sets) selects the
/// long form of every scenario.
pub fn long() -> bool {
    std::env::var("POSTBOX_CHAOS_LONG").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `ci` in the short form, `long` with `POSTBOX_CHAOS_LONG=1`.
pub fn size(ci: usize, long_form: usize) -> usize {
    if long() { long_form } else { ci }
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", fastrand::u64(..))
}

/// Creates a fresh database on the server at `addr` (trust auth, role
/// `postgres` or `root`) and returns its URL.
pub async fn pg_database(addr: &str) -> String {
    let name = unique("postbox_chaos");
    for role in ["postgres", "root"] {
        let admin = format!("postgres://{role}@{addr}/postgres");
        if let Ok(mut c) = PgConnection::connect(&admin).await {
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut c)
                .await
                .expect("create database");
            return format!("postgres://{role}@{addr}/{name}");
        }
    }
    panic!("PostgreSQL at {addr} accepts neither role postgres nor root (trust auth expected)");
}

/// Drops a database made by [`pg_database`] (best effort: a leftover
/// database is harmless, a failed test should still show its own error).
pub async fn drop_database(url: &str) {
    let Some((server, name)) = url.rsplit_once('/') else {
        return;
    };
    if let Ok(mut c) = PgConnection::connect(&format!("{server}/postgres")).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut c)
            .await;
    }
}

/// What one producer wrote, as the producer knows it.
#[derive(Debug, Clone)]
pub struct Written {
    pub key: Option<String>,
    /// Per-key order: the database's `seq` (plain-SQL producers, read back
    /// with `RETURNING`) or the producer's own counter (library producers,
    /// whose keys no one else writes). Compared only within one key.
    pub rank: i64,
}

/// Everything the producers committed, rolled back, or lost track of.
#[derive(Debug, Default)]
pub struct Ledger {
    inner: Mutex<LedgerInner>,
}

#[derive(Debug, Default)]
struct LedgerInner {
    committed: HashMap<String, Written>,
    rolled_back: HashSet<String>,
    /// COMMIT sent, no answer (the connection broke): committed or not.
    in_doubt: HashMap<String, Written>,
}

impl Ledger {
    fn with<T>(&self, f: impl FnOnce(&mut LedgerInner) -> T) -> T {
        f(&mut self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    pub fn commit(&self, batch: Vec<(String, Written)>) {
        self.with(|l| l.committed.extend(batch));
    }

    pub fn rollback(&self, batch: Vec<(String, Written)>) {
        self.with(|l| l.rolled_back.extend(batch.into_iter().map(|(p, _)| p)));
    }

    pub fn doubt(&self, batch: Vec<(String, Written)>) {
        self.with(|l| l.in_doubt.extend(batch));
    }

    pub fn committed(&self) -> usize {
        self.with(|l| l.committed.len())
    }
}

/// One message as it arrived at the sink, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub payload: String,
    pub key: Option<String>,
    /// The message id as the sink saw it (empty when the sink has none).
    pub id: String,
    /// The attempt number the relay published it with (0 when unknown).
    pub attempt: u64,
}

/// Reads a JSON-lines sink written by `file://` publishers. Returns the
/// deliveries and the number of lines that did not parse.
pub fn read_jsonl(path: &Path) -> (Vec<Delivery>, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = Vec::new();
    let mut torn = 0;
    for line in text.lines() {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => match v["payload"].as_str() {
                Some(p) => out.push(Delivery {
                    payload: p.to_owned(),
                    key: v["key"].as_str().map(str::to_owned),
                    id: v["id"].as_str().unwrap_or_default().to_owned(),
                    attempt: v["attempt"].as_u64().unwrap_or_default(),
                }),
                None => torn += 1,
            },
            Err(_) => torn += 1,
        }
    }
    (out, torn)
}

/// The result of one scenario, checked from the sink side.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub scenario: String,
    /// Committed messages (known committed; in-doubt ones not included).
    pub messages: usize,
    pub rolled_back: usize,
    pub lost: Vec<String>,
    pub phantom: Vec<String>,
    pub order_violations: Vec<String>,
    /// Deliveries beyond the first of each message.
    pub duplicates: usize,
    /// Commits whose outcome the producer never learned.
    pub in_doubt: usize,
    /// Of those, how many were delivered (so they had committed).
    pub in_doubt_delivered: usize,
    /// Sink lines that did not parse (file sink only).
    pub torn_lines: usize,
    pub notes: String,
}

impl Verdict {
    /// Compares what arrived with the ledger.
    pub fn check(scenario: &str, ledger: &Ledger, deliveries: &[Delivery]) -> Self {
        ledger.with(|l| {
            let mut seen: HashMap<&str, usize> = HashMap::new();
            let mut last_rank: HashMap<&str, i64> = HashMap::new();
            let mut phantom = Vec::new();
            let mut order = Vec::new();
            for d in deliveries {
                let n = seen.entry(d.payload.as_str()).or_default();
                *n += 1;
                if *n > 1 {
                    continue;
                }
                let written = l
                    .committed
                    .get(&d.payload)
                    .or_else(|| l.in_doubt.get(&d.payload));
                let Some(w) = written else {
                    // rolled back, or never written at all: both are phantoms
                    phantom.push(d.payload.clone());
                    continue;
                };
                if w.key != d.key {
                    phantom.push(format!(
                        "{} arrived with key {:?}, written with {:?}",
                        d.payload, d.key, w.key
                    ));
                }
                if let Some(k) = w.key.as_deref() {
                    if let Some(prev) = last_rank.get(k)
                        && *prev >= w.rank
                    {
                        order.push(format!(
                            "key {k}: {} (rank {}) first delivered after rank {prev}",
                            d.payload, w.rank
                        ));
                    }
                    last_rank.insert(k, w.rank);
                }
            }
            let mut lost: Vec<String> = l
                .committed
                .keys()
                .filter(|p| !seen.contains_key(p.as_str()))
                .cloned()
                .collect();
            lost.sort();
            let duplicates = seen.values().map(|n| n - 1).sum();
            let in_doubt_delivered = l
                .in_doubt
                .keys()
                .filter(|p| seen.contains_key(p.as_str()))
                .count();
            Verdict {
                scenario: scenario.to_owned(),
                messages: l.committed.len(),
                rolled_back: l.rolled_back.len(),
                lost,
                phantom,
                order_violations: order,
                duplicates,
                in_doubt: l.in_doubt.len(),
                in_doubt_delivered,
                torn_lines: 0,
                notes: String::new(),
            }
        })
    }

    #[must_use]
    pub fn torn(mut self, torn: usize) -> Self {
        self.torn_lines = torn;
        self
    }

    #[must_use]
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes = note.into();
        self
    }

    /// Prints the result line (and appends it to `$POSTBOX_CHAOS_RESULTS`
    /// for `scripts/chaos`), then fails the test if a promise was broken.
    pub fn report_and_assert(&self) {
        let line = format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            self.scenario,
            self.messages,
            self.lost.len(),
            self.phantom.len(),
            self.order_violations.len(),
            self.duplicates,
            if self.in_doubt > 0 {
                format!(
                    "{} in doubt ({} delivered)",
                    self.in_doubt, self.in_doubt_delivered
                )
            } else {
                "0".to_owned()
            },
            self.notes,
        );
        eprintln!("CHAOS RESULT {line}");
        if let Ok(path) = std::env::var("POSTBOX_CHAOS_RESULTS") {
            use std::io::Write as _;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{line}");
            }
        }
        let head = |v: &[String]| v.iter().take(10).cloned().collect::<Vec<_>>().join("\n  ");
        assert!(
            self.lost.is_empty(),
            "{}: {} committed messages lost, e.g.\n  {}",
            self.scenario,
            self.lost.len(),
            head(&self.lost)
        );
        assert!(
            self.phantom.is_empty(),
            "{}: {} phantom deliveries (rolled back or never written), e.g.\n  {}",
            self.scenario,
            self.phantom.len(),
            head(&self.phantom)
        );
        assert!(
            self.order_violations.is_empty(),
            "{}: {} per-key order violations, e.g.\n  {}",
            self.scenario,
            self.order_violations.len(),
            head(&self.order_violations)
        );
    }
}

/// How a producer writes its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// `postbox_postgres::enqueue(&mut *tx, ..)`, on keys only it writes.
    Library,
    /// A plain `INSERT ... RETURNING seq` (a producer in another language),
    /// on its own keys and on keys every plain-SQL producer shares.
    PlainSql,
}

/// A producer task: transactions of 1–3 messages, `rollback_pct` % of them
/// rolled back on purpose, until it has committed `quota` messages or
/// `stop` fires. Survives broken connections (reconnects), recording a
/// COMMIT without an answer as in doubt.
pub struct Producer {
    pub id: usize,
    pub style: Style,
    pub url: String,
    pub quota: usize,
    pub rollback_pct: u32,
    /// Keys of this producer's own; 0: every message keyless.
    pub private_keys: usize,
    pub shared_keys: usize,
}

impl Producer {
    pub async fn run(self, ledger: Arc<Ledger>, stop: CancellationToken) -> usize {
        let mut committed = 0;
        let mut counter: i64 = 0;
        let mut conn: Option<PgConnection> = None;
        let mut failures = 0u32;
        while committed < self.quota && !stop.is_cancelled() {
            if conn.is_none() {
                match PgConnection::connect(&self.url).await {
                    Ok(c) => conn = Some(c),
                    Err(_) => {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(50 * u64::from(failures.min(20))))
                            .await;
                        continue;
                    }
                }
            }
            let c = conn.as_mut().unwrap();
            let n = (fastrand::usize(1..=3)).min(self.quota - committed);
            let rollback = fastrand::u32(0..100) < self.rollback_pct;
            let mut batch = Vec::with_capacity(n);
            let mut shared_used = false;
            for _ in 0..n {
                counter += 1;
                let payload = format!("p{}:{counter}", self.id);
                let key = match fastrand::u32(0..10) {
                    _ if self.private_keys == 0 => None,
                    0 => None,
                    1..=3
                        if self.style == Style::PlainSql
                            && self.shared_keys > 0
                            && !shared_used =>
                    {
                        // one shared key per transaction: two shared keys
                        // taken in different orders could deadlock
                        shared_used = true;
                        Some(format!("shared-{}", fastrand::usize(0..self.shared_keys)))
                    }
                    _ => Some(format!(
                        "p{}-k{}",
                        self.id,
                        fastrand::usize(0..self.private_keys)
                    )),
                };
                batch.push((payload, Written { key, rank: counter }));
            }
            match self.transaction(c, &mut batch, rollback).await {
                Ok(()) if rollback => {
                    failures = 0;
                    ledger.rollback(batch);
                }
                Ok(()) => {
                    failures = 0;
                    committed += batch.len();
                    ledger.commit(batch);
                }
                Err(Failed::BeforeCommit) => {
                    // an error inside the transaction: it cannot commit
                    ledger.rollback(batch);
                    conn = None;
                }
                Err(Failed::AtCommit) => {
                    ledger.doubt(batch);
                    conn = None;
                }
            }
        }
        if let Some(c) = conn {
            let _ = c.close().await;
        }
        committed
    }

    async fn transaction(
        &self,
        c: &mut PgConnection,
        batch: &mut [(String, Written)],
        rollback: bool,
    ) -> Result<(), Failed> {
        let mut tx = c.begin().await.map_err(|_| Failed::BeforeCommit)?;
        for (payload, w) in batch.iter_mut() {
            match self.style {
                Style::Library => {
                    let mut m = NewMessage::new(TOPIC, payload.clone().into_bytes());
                    if let Some(k) = &w.key {
                        m = m.key(k.clone());
                    }
                    postbox_postgres::enqueue(&mut *tx, &m)
                        .await
                        .map_err(|_| Failed::BeforeCommit)?;
                }
                Style::PlainSql => {
                    let seq: i64 = sqlx::query_scalar(
                        "INSERT INTO postbox_outbox (topic, key, payload) VALUES ($1, $2, convert_to($3, 'UTF8')) RETURNING seq",
                    )
                    .bind(TOPIC)
                    .bind(w.key.as_deref())
                    .bind(payload.as_str())
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(|_| Failed::BeforeCommit)?;
                    w.rank = seq;
                }
            }
        }
        if rollback {
            tx.rollback().await.map_err(|_| Failed::BeforeCommit)
        } else {
            tx.commit().await.map_err(|_| Failed::AtCommit)
        }
    }
}

enum Failed {
    BeforeCommit,
    AtCommit,
}

/// Starts `producers` producers (half library, half plain SQL) sharing
/// `total` committed messages: one in ten keyless, the rest on 16 keys of
/// each producer's own and 8 shared ones; or, `keyless`, all keyless.
/// Returns their join handles.
pub fn start_producers(
    url: &str,
    producers: usize,
    total: usize,
    rollback_pct: u32,
    ledger: &Arc<Ledger>,
    stop: &CancellationToken,
    keyless: bool,
) -> Vec<tokio::task::JoinHandle<usize>> {
    let (private_keys, shared_keys) = if keyless { (0, 0) } else { (16, 8) };
    (0..producers)
        .map(|id| {
            let quota = total / producers + usize::from(id < total % producers);
            let p = Producer {
                id,
                style: if id % 2 == 0 {
                    Style::Library
                } else {
                    Style::PlainSql
                },
                url: url.to_owned(),
                quota,
                rollback_pct,
                private_keys,
                shared_keys,
            };
            tokio::spawn(p.run(Arc::clone(ledger), stop.clone()))
        })
        .collect()
}

/// The `postbox` binary under test.
pub fn postbox() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_postbox"));
    c.env_remove("POSTBOX_STORE_URL")
        .env_remove("POSTBOX_PUBLISH_URL")
        .env("POSTBOX_LOG", "warn");
    c
}

/// Runs `postbox migrate` against `url`.
pub fn migrate(url: &str) {
    let o = postbox()
        .args(["migrate", "--store", url])
        .output()
        .expect("run postbox migrate");
    assert_eq!(
        o.status.code(),
        Some(0),
        "migrate: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A `postbox relay` process publishing to a JSON-lines file; its stderr
/// goes to `<dir>/relay-<n>.log`.
pub struct RelayProcess {
    pub child: Child,
    pub log: PathBuf,
}

static RELAYS: AtomicUsize = AtomicUsize::new(0);

impl RelayProcess {
    pub fn spawn(url: &str, sink: &Path, dir: &Path, extra: &[&str]) -> Self {
        let log = dir.join(format!(
            "relay-{}.log",
            RELAYS.fetch_add(1, Ordering::SeqCst)
        ));
        let stderr = std::fs::File::create(&log).expect("relay log");
        let child = postbox()
            .args(["relay", "--store", url])
            .arg("--publish")
            .arg(format!("file://{}", sink.display()))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn postbox relay");
        Self { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill -{sig} {}", self.pid());
    }

    /// `kill -9` and reap.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits (up to a minute) for exit status 0.
    pub fn stop(mut self) {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert_eq!(
                    status.code(),
                    Some(0),
                    "relay exit status; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("relay did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        // a panicking test must not leave relays behind
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Rows left in the outbox (any status), `None` when the database cannot
/// be reached right now.
pub async fn outbox_rows(url: &str) -> Option<i64> {
    let mut c = PgConnection::connect(url).await.ok()?;
    let n = sqlx::query_scalar("SELECT count(*) FROM postbox_outbox")
        .fetch_one(&mut c)
        .await
        .ok();
    let _ = c.close().await;
    n
}

/// Waits until the outbox is empty (everything sent), polling, up to
/// `limit`. Panics with the count left otherwise.
pub async fn wait_drained(url: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut left = None;
    while Instant::now() < deadline {
        left = outbox_rows(url).await;
        if left == Some(0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("outbox not drained within {limit:?}: {left:?} rows left");
}

/// Polls `cond` every 50 ms until it holds, or panics after `limit`.
pub async fn eventually<F: FnMut() -> bool>(what: &str, limit: Duration, mut cond: F) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
