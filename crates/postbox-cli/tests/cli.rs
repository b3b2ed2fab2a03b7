//! End-to-end tests of the `postbox` binary on SQLite.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn postbox() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_postbox"));
    c.env_remove("POSTBOX_STORE_URL").env("POSTBOX_LOG", "warn");
    c
}

fn run(args: &[&str]) -> Output {
    postbox().args(args).output().expect("run postbox")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exit code")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("outbox.db").display())
}

/// The acceptance run: migrate, enqueue 1,000 messages across 10 keys
/// through the CLI, relay to a file, every message delivered once in per-key
/// order, and the relay exits 0 on SIGTERM.
#[test]
fn migrate_enqueue_relay_to_file_and_stop_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = sqlite_url(dir.path());
    let o = run(&["migrate", "--store", &url]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // twice: migrate is idempotent
    assert_eq!(code(&run(&["migrate", "--store", &url])), 0);

    // ten keys in parallel, each key's hundred messages in sequence
    std::thread::scope(|s| {
        for k in 0..10 {
            let url = url.clone();
            s.spawn(move || {
                for n in 0..100 {
                    let o = postbox()
                        .args(["enqueue", "--topic", "orders.created", "--key"])
                        .arg(format!("key-{k}"))
                        .args([
                            "--payload",
                            &format!("{k}:{n}"),
                            "--header",
                            "source=cli-test",
                        ])
                        .env("POSTBOX_STORE_URL", &url)
                        .output()
                        .expect("enqueue");
                    assert_eq!(code(&o), 0, "{}", stderr(&o));
                }
            });
        }
    });

    let out = dir.path().join("out.jsonl");
    let mut relay = postbox()
        .args([
            "relay",
            "--store",
            &url,
            "--poll-interval",
            "20ms",
            "--batch-size",
            "50",
        ])
        .arg("--publish")
        .arg(format!("file://{}", out.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn relay");

    let deadline = Instant::now() + Duration::from_secs(120);
    let lines = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        if lines.len() >= 1000 || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    let term = Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let status = relay.wait().expect("wait for relay");
    let mut err = String::new();
    std::io::Read::read_to_string(relay.stderr.as_mut().expect("stderr"), &mut err).ok();
    assert_eq!(
        status.code(),
        Some(0),
        "relay did not exit 0 on SIGTERM: {err}"
    );

    let ids: HashSet<&str> = lines
        .iter()
        .map(|l| l["id"].as_str().expect("id"))
        .collect();
    assert_eq!(lines.len(), 1000, "expected each message once");
    assert_eq!(ids.len(), 1000, "duplicate deliveries");
    let mut next: HashMap<String, u32> = HashMap::new();
    for l in &lines {
        let key = l["key"].as_str().expect("key").to_owned();
        let (k, n) = l["payload"]
            .as_str()
            .expect("payload")
            .split_once(':')
            .expect("k:n");
        assert_eq!(format!("key-{k}"), key);
        assert_eq!(l["headers"]["source"], "cli-test");
        assert_eq!(l["attempt"], 1);
        let n: u32 = n.parse().expect("n");
        let want = next.entry(key.clone()).or_default();
        assert_eq!(n, *want, "key {key} out of order");
        *want += 1;
    }
    assert_eq!(next.len(), 10);

    let o = run(&["status", "--store", &url, "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status json");
    assert_eq!(stats["pending"], 0);
}

#[test]
fn bad_input_exits_2_naming_the_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = sqlite_url(dir.path());
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["status".into(), "--store".into(), "oracle://db".into()],
            "oracle://db",
        ),
        (
            vec![
                "migrate".into(),
                "--store".into(),
                "sqlite:///no/such/dir/x.db".into(),
            ],
            "/no/such/dir/x.db",
        ),
        (
            vec![
                "relay".into(),
                "--store".into(),
                url.clone(),
                "--publish".into(),
                "carrier-pigeon://x".into(),
            ],
            "\"carrier-pigeon\"",
        ),
        (
            vec![
                "relay".into(),
                "--store".into(),
                url.clone(),
                "--publish".into(),
                "stdout".into(),
                "--batch-size".into(),
                "lots".into(),
            ],
            "lots",
        ),
        (
            vec![
                "relay".into(),
                "--store".into(),
                url.clone(),
                "--publish".into(),
                "stdout".into(),
                "--batch-size".into(),
                "0".into(),
            ],
            "batch_size",
        ),
        (
            vec![
                "relay".into(),
                "--store".into(),
                url.clone(),
                "--publish".into(),
                "file:///no/such/dir/out.jsonl".into(),
            ],
            "/no/such/dir/out.jsonl",
        ),
        (
            vec![
                "migrate".into(),
                "--store".into(),
                url.clone(),
                "--table".into(),
                "x\"; DROP TABLE y; --".into(),
            ],
            "DROP TABLE",
        ),
        (vec!["frobnicate".into()], "frobnicate"),
        (
            vec![
                "dead".into(),
                "replay".into(),
                "--store".into(),
                url.clone(),
            ],
            "--all",
        ),
        // filters that match everything do not stand in for --all
        (
            vec![
                "dead".into(),
                "purge".into(),
                "--store".into(),
                url.clone(),
                "--older-than".into(),
                "0s".into(),
            ],
            "--all",
        ),
        (
            vec![
                "dead".into(),
                "skip".into(),
                "--store".into(),
                url.clone(),
                "--error".into(),
                String::new(),
            ],
            "--all",
        ),
    ];
    assert_eq!(code(&run(&["migrate", "--store", &url])), 0);
    for (args, named) in cases {
        let o = postbox().args(&args).output().expect("run");
        let err = stderr(&o);
        assert_eq!(code(&o), 2, "{args:?} → {err}");
        assert!(
            err.contains(named),
            "{args:?}: message does not name {named:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[test]
fn relay_refuses_a_missing_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = sqlite_url(dir.path());
    let o = run(&["relay", "--store", &url, "--publish", "stdout"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("postbox migrate"), "{}", stderr(&o));
}

#[test]
fn dead_letters_can_be_listed_replayed_and_purged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = sqlite_url(dir.path());
    assert_eq!(code(&run(&["migrate", "--store", &url])), 0);
    // a message that allows one attempt, published to a full disk, dies at once
    let o = run(&[
        "enqueue",
        "--store",
        &url,
        "--topic",
        "t",
        "--key",
        "k",
        "--payload",
        "p",
        "--max-attempts",
        "1",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let mut relay = postbox()
        .args([
            "relay",
            "--store",
            &url,
            "--publish",
            "file:///dev/full",
            "--poll-interval",
            "20ms",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("relay");
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let o = run(&["dead", "list", "--store", &url, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        if v.as_array().is_some_and(|a| !a.is_empty()) || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()
        .expect("kill");
    assert_eq!(relay.wait().expect("wait").code(), Some(0));
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["parked"], true);
    assert!(
        listed[0]["last_error"]
            .as_str()
            .expect("error")
            .contains("/dev/full")
    );
    assert_eq!(listed[0]["payload"], "p");

    let o = run(&["dead", "replay", "--store", &url, "--id", &id, "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("json")["replayed"],
        1
    );
    let o = run(&["status", "--store", &url, "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        (s["pending"].as_u64(), s["dead"].as_u64()),
        (Some(1), Some(0))
    );
    let o = run(&["dead", "purge", "--store", &url, "--all", "--json"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("json")["purged"],
        0
    );
}

#[test]
fn demo_runs_and_verifies_its_promises() {
    let o = run(&["demo", "--quiet", "--orders", "40"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("published from rollbacks      0   ok"),
        "{out}"
    );
    assert!(
        out.contains("committed but not published   0   ok"),
        "{out}"
    );
}

/// `demo --db FILE` keeps its file; a second run on it adds its orders to
/// those of the first and checks only its own (it used to count every row
/// of `orders` against this run's commits and report a broken promise).
#[test]
fn demo_runs_twice_on_a_kept_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("demo.db");
    let db = db.to_str().expect("UTF-8 path");
    for run_no in 1..=2 {
        let o = run(&["demo", "--quiet", "--orders", "12", "--db", db]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(code(&o), 0, "run {run_no}: {out}{}", stderr(&o));
        assert!(out.contains("rows this run added to `orders`"), "{out}");
    }
    let o = run(&["status", "--store", &format!("sqlite://{db}"), "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

/// A dead row whose id a plain-SQL producer wrote as text is listed with the
/// nil id; `dead skip --key` and `dead purge --key` still reach it, so its
/// key does not stay parked for want of an id.
#[test]
fn dead_rows_with_an_unreadable_id_are_reached_by_their_filter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = sqlite_url(dir.path());
    assert_eq!(code(&run(&["migrate", "--store", &url])), 0);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        use sqlx::Connection as _;
        let mut c = sqlx::SqliteConnection::connect(&url).await.expect("open");
        sqlx::raw_sql(
            "INSERT INTO postbox_outbox (id, topic, key, payload, status, parked, last_error) \
             VALUES ('0190a4b2-7c3e-7d4f-8a1b-2c3d4e5f6a7b', 't', 'J', x'61', 'dead', 1, 'boom'); \
             INSERT INTO postbox_outbox (topic, key, payload) VALUES ('t', 'J', x'62');",
        )
        .execute(&mut c)
        .await
        .expect("plain SQL");
    });
    let o = run(&["dead", "list", "--store", &url, "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let listed = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        listed.contains("00000000-0000-0000-0000-000000000000"),
        "{listed}"
    );
    let o = run(&["dead", "skip", "--store", &url, "--key", "J", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("json")["unparked"],
        1
    );
    let o = run(&["dead", "purge", "--store", &url, "--key", "J", "--json"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("json")["purged"],
        1
    );
    let o = run(&["status", "--store", &url, "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        (
            s["pending"].as_u64(),
            s["dead"].as_u64(),
            s["parked_keys"].as_u64()
        ),
        (Some(1), Some(0), Some(0)),
        "{s}"
    );
}

/// A reader that goes away (`postbox status | head -1`) ends the command
/// quietly with exit 0, for a text and a JSON answer: `println!` panicked
/// there (exit 101, "failed printing to stdout").
#[test]
fn a_closed_standard_output_ends_the_command_quietly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = sqlite_url(dir.path());
    assert_eq!(code(&run(&["migrate", "--store", &url])), 0);
    for args in [
        vec!["status", "--store", &url],
        vec!["status", "--store", &url, "--json"],
    ] {
        // a pipe whose reading end is closed before the command writes
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let o = postbox()
            .args(&args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("run postbox");
        assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).is_empty(), "{args:?}: {}", stderr(&o));
    }
}

/// The text log on a stderr that is a pipe (or a file) is plain text: no
/// ANSI colour codes around the time, level and fields.
#[test]
fn the_text_log_has_no_colour_codes_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = sqlite_url(dir.path());
    let o = postbox()
        .args(["migrate", "--store", &url])
        .env("POSTBOX_LOG", "info")
        .env_remove("NO_COLOR")
        .output()
        .expect("run postbox");
    let err = stderr(&o);
    assert_eq!(code(&o), 0, "{err}");
    assert!(err.contains("applied outbox migration"), "{err}");
    assert!(err.contains("INFO"), "{err}");
    assert!(
        !err.contains("\x1b["),
        "colour codes in a piped log: {err:?}"
    );
}

/// `migrate` prints the same true line whether it applied migrations (a new
/// outbox) or found none to apply: it said "up to date" right after
/// applying them all.
#[test]
fn migrate_says_the_table_is_at_the_latest_schema_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = sqlite_url(dir.path());
    for run_no in ["first", "second"] {
        let o = run(&["migrate", "--store", &url]);
        assert_eq!(code(&o), 0, "{run_no}: {}", stderr(&o));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            "outbox table postbox_outbox is at the latest schema version\n",
            "{run_no}"
        );
    }
}

/// A missing `--store` names the variable that can stand for it, as
/// `--help` does.
#[test]
fn a_missing_store_names_its_environment_variable() {
    for args in [
        vec!["migrate"],
        vec!["status"],
        vec!["dead", "list"],
        vec!["purge", "--sent-older-than", "1d"],
        vec!["enqueue", "--topic", "t", "--payload", "p"],
    ] {
        let o = run(&args);
        let err = stderr(&o);
        assert_eq!(code(&o), 2, "{args:?}: {err}");
        assert!(err.contains("--store"), "{args:?}: {err}");
        assert!(err.contains("POSTBOX_STORE_URL"), "{args:?}: {err}");
    }
}

/// `purge` shows its ages in the units the flags take: `1d`, not `1day`,
/// and `90d`, not `2months 29days 2h 52m 48s`.
#[test]
fn purge_shows_its_ages_as_given() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = sqlite_url(dir.path());
    assert_eq!(code(&run(&["migrate", "--store", &url])), 0);
    let o = run(&[
        "purge",
        "--store",
        &url,
        "--sent-older-than",
        "1d",
        "--dead-older-than",
        "90d",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "purged 0 sent message(s) sent at least 1d ago\n\
         purged 0 dead message(s) created at least 90d ago\n"
    );
}

/// An unreachable database is reported once, with its cause, and without
/// the password: each library error carries its cause in its message and
/// as its source, and the error line used to print it twice.
#[test]
fn an_unreachable_database_is_named_once_with_its_cause() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("postgres://postgres:hunter2secret@127.0.0.1:{port}/postbox_cli_unreachable");
    let o = run(&["status", "--store", &url]);
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "{err}");
    assert!(err.to_lowercase().contains("refused"), "{err}");
    assert_eq!(err.matches("Connection refused").count(), 1, "{err}");
    assert_eq!(err.matches("cannot connect to").count(), 1, "{err}");
    assert!(!err.contains("hunter2secret"), "{err}");
}
