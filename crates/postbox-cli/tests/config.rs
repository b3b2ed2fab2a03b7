//! `postbox config check` and `postbox relay --config`.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn postbox() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_postbox"));
    c.env_remove("POSTBOX_STORE_URL")
        .env_remove("POSTBOX_STORE_RETAIN_SENT")
        .env_remove("POSTBOX_WEBHOOK_SECRET")
        .env("POSTBOX_LOG", "warn");
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_example_config_checks_ok() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../postbox.example.toml");
    let o = postbox()
        .args(["config", "check", example])
        .env(
            "POSTBOX_WEBHOOK_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        )
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("3 publisher(s), 3 route(s)"));
    // without the secret's variable the file is refused, naming it
    let o = postbox()
        .args(["config", "check", example])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("POSTBOX_WEBHOOK_SECRET"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_configs_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("[relay]\nlease = \"soon\"\n", "lease"),
        ("[relay]\nbatch_size = -3\n", "batch_size"),
        ("[store]\nurl = \"sqlite://x.db\"\nuser = \"bob\"\n", "user"),
        (
            "[publishers.a]\ntype = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nsubject_template = 42\n",
            "publishers.a",
        ),
        (
            "[publishers.a]\ntype = \"carrier-pigeon\"\n",
            "carrier-pigeon",
        ),
        (
            "[publishers.hook]\ntype = \"http\"\nurl = \"https://example.com/hook\"\n",
            "publishers.hook",
        ),
        (
            "[publishers.a]\nurl = \"stdout\"\n[publishers.b]\nurl = \"stdout\"\n",
            "routes",
        ),
        ("this is not toml", "config"),
        ("[relay]\ntenant = \"\"\n", "tenant"),
        (
            "[store]\nurl = \"sqlite://x.db\"\ntable = \"main.outbox\"\n",
            "\"main.outbox\": a schema-qualified name is for PostgreSQL outboxes only",
        ),
        ("[store]\nretain_sent = \"0s\"\n", "store.retain_sent"),
        ("[store]\nretain_sent = \"a week\"\n", "retain_sent"),
        (
            "[relay]\ncleanup_interval = \"never\"\n",
            "cleanup_interval",
        ),
        (
            "[publishers.k]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\nmessage_timeout_ms = 10000\n",
            "publishers.k: message_timeout_ms (10s) must be shorter than the relay's send_timeout (10s)",
        ),
    ];
    for (i, (text, named)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&path, text).expect("write");
        let o = postbox()
            .arg("config")
            .arg("check")
            .arg(&path)
            .output()
            .expect("run");
        assert_eq!(o.status.code(), Some(2), "{text:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(named),
            "{text:?} does not name {named:?}: {}",
            stderr(&o)
        );
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
}

/// `config check` takes the store URL from `POSTBOX_STORE_URL` when the file
/// has none, as `relay` does, and refuses what `relay` would refuse with it.
#[test]
fn config_check_judges_the_table_by_the_store_in_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[store]\ntable = \"main.outbox\"\n[publishers.out]\nurl = \"stdout\"\n",
    )
    .expect("write");
    let check = |url: &str| {
        postbox()
            .args(["config", "check"])
            .arg(&path)
            .env("POSTBOX_STORE_URL", url)
            .output()
            .expect("run")
    };
    let o = check("sqlite://x.db");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("main.outbox"), "{}", stderr(&o));
    let o = check("postgres://h/db");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // without a store URL anywhere, a schema-qualified table is taken for
    // the PostgreSQL one it can only be
    let o = postbox()
        .args(["config", "check"])
        .arg(&path)
        .env_remove("POSTBOX_STORE_URL")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// The store's and relay's environment variables and flags are checked like
/// the file's keys, each error naming where the bad value came from.
#[test]
fn bad_store_and_interval_settings_exit_2_naming_the_variable_or_flag() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../postbox.example.toml");
    let secret = (
        "POSTBOX_WEBHOOK_SECRET",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    );
    // `config check` of the example with one variable set: exit 0, or exit
    // 2 naming the variable (the example's store is PostgreSQL)
    let cases = [
        ("POSTBOX_STORE_RETAIN_SENT", "forever", 2),
        ("POSTBOX_STORE_RETAIN_SENT", "0s", 2),
        ("POSTBOX_STORE_RETAIN_SENT", "30d", 0),
        // `off` turns the gauge sampling off
        ("POSTBOX_RELAY_STATS_INTERVAL", "off", 0),
        ("POSTBOX_RELAY_STATS_INTERVAL", "sometimes", 2),
        ("POSTBOX_STORE_VACUUM_AFTER", "0", 2),
        ("POSTBOX_STORE_VACUUM_AFTER", "many", 2),
        ("POSTBOX_STORE_VACUUM_AFTER", "200000", 0),
    ];
    for (var, value, code) in cases {
        let o = postbox()
            .args(["config", "check", example])
            .env(secret.0, secret.1)
            .env(var, value)
            .output()
            .expect("run");
        assert_eq!(o.status.code(), Some(code), "{var}={value}: {}", stderr(&o));
        assert!(
            code == 0 || stderr(&o).contains(var),
            "{var}={value}: {}",
            stderr(&o)
        );
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("o.db").display());
    for (flag, value) in [
        ("--retain-sent", "0s"),
        ("--retain-sent", "soon"),
        ("--cleanup-interval", "0s"),
        ("--vacuum-after", "0"),
        ("--stats-interval", "often"),
        ("--stats-interval", "0s"),
        // a PostgreSQL setting, refused for this SQLite store
        ("--vacuum-after", "200000"),
    ] {
        let o = postbox()
            .args(["relay", "--store", &url, "--publish", "stdout", flag, value])
            .output()
            .expect("run");
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {}", stderr(&o));
        let named = flag.trim_start_matches('-').replace('-', "_");
        assert!(
            stderr(&o).contains(flag) || stderr(&o).contains(&named),
            "{flag} {value}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn broker_urls_are_checked_without_leaking_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("o.db").display());
    assert_eq!(
        postbox()
            .args(["migrate", "--store", &url])
            .output()
            .expect("run")
            .status
            .code(),
        Some(0)
    );
    let cases = [
        // a signed webhook without its secret
        ("https://hooks.example.com/x", "POSTBOX_WEBHOOK_SECRET"),
        (
            "https://user:hunter2@hooks.example.com/x",
            "POSTBOX_WEBHOOK_SECRET",
        ),
        // malformed broker URLs, one per scheme
        ("amqp://user:hunter2@", "amqp"),
        ("nats://user:hunter2@", "url"),
        ("nats://user:hunter2@127.0.0.1:99999", "url"),
        ("tls://tok3n-hunter2@", "url"),
        ("kafka://user:hunter2@127.0.0.1:9092", "credentials"),
        ("kafka://127.0.0.1:99999", "invalid port"),
        ("redis://:hunter2@127.0.0.1:notaport", "redis"),
        ("mqtt://user:hunter2@", "mqtt"),
        ("mqtts://user:hunter2@127.0.0.1:99999", "mqtt"),
        ("http://user:hunter2@", "url"),
        // TLS that this build cannot do is refused, never downgraded
        ("rediss://:hunter2@127.0.0.1:6379", "TLS"),
        // unknown schemes
        ("ftp://user:hunter2@example.com", "scheme \"ftp\""),
        ("carrier-pigeon://user:hunter2@loft", "carrier-pigeon"),
    ];
    for (publish, named) in cases {
        let o = postbox()
            .args(["relay", "--store", &url, "--publish", publish])
            .env_remove("POSTBOX_WEBHOOK_SECRET")
            .output()
            .expect("run");
        assert_eq!(o.status.code(), Some(2), "{publish}: {}", stderr(&o));
        assert!(stderr(&o).contains(named), "{publish}: {}", stderr(&o));
        assert!(
            !stderr(&o).contains("hunter2"),
            "{publish}: password leaked: {}",
            stderr(&o)
        );
    }
}

/// Routes send each topic to its own file; an unrouted topic is dead with
/// "no route".
#[test]
fn relay_with_config_routes_topics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = format!("sqlite://{}", dir.path().join("o.db").display());
    let orders = dir.path().join("orders.jsonl");
    let audit = dir.path().join("audit.jsonl");
    let config = dir.path().join("postbox.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = \"{db}\"\n[relay]\npoll_interval = \"20ms\"\n\
             [publishers.orders]\ntype = \"file\"\npath = \"{}\"\n\
             [publishers.audit]\nurl = \"file://{}\"\n\
             [[routes]]\ntopics = \"orders.*\"\npublisher = \"orders\"\n\
             [[routes]]\ntopics = \"audit.**\"\npublisher = \"audit\"\n",
            orders.display(),
            audit.display()
        ),
    )
    .expect("write config");
    assert_eq!(
        postbox()
            .args(["migrate", "--store", &db])
            .output()
            .expect("run")
            .status
            .code(),
        Some(0)
    );
    for topic in [
        "orders.created",
        "audit.user.login",
        "orders.paid",
        "unrouted.thing",
    ] {
        let o = postbox()
            .args([
                "enqueue",
                "--store",
                &db,
                "--topic",
                topic,
                "--payload",
                topic,
            ])
            .output()
            .expect("run");
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    }
    let mut relay = postbox()
        .arg("relay")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("relay");
    let deadline = Instant::now() + Duration::from_secs(60);
    let count = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let dead = loop {
        let o = postbox()
            .args(["dead", "list", "--store", &db, "--json"])
            .output()
            .expect("run");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        let done =
            count(&orders) == 2 && count(&audit) == 1 && v.as_array().is_some_and(|a| a.len() == 1);
        if done || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()
        .expect("kill");
    assert_eq!(relay.wait().expect("wait").code(), Some(0));
    assert_eq!(count(&orders), 2);
    assert_eq!(count(&audit), 1);
    assert_eq!(dead[0]["topic"], "unrouted.thing");
    assert!(
        dead[0]["last_error"]
            .as_str()
            .expect("error")
            .contains("no route")
    );
}

/// A malformed webhook secret (from the environment or a config file) is
/// refused naming the secret, never printing it.
#[test]
fn a_malformed_webhook_secret_exits_2_without_printing_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("o.db").display());
    let secret = "whsec_not*base64*hunter2";
    let o = postbox()
        .args([
            "relay",
            "--store",
            &url,
            "--publish",
            "https://hooks.example.com/x",
        ])
        .env("POSTBOX_WEBHOOK_SECRET", secret)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("secret"), "{}", stderr(&o));
    assert!(
        !stderr(&o).contains("hunter2"),
        "secret leaked: {}",
        stderr(&o)
    );

    let path = dir.path().join("hook.toml");
    std::fs::write(
        &path,
        format!(
            "[publishers.hook]\ntype = \"http\"\nurl = \"https://hooks.example.com/x\"\nsecret = \"{secret}\"\n"
        ),
    )
    .expect("write");
    let o = postbox()
        .args(["config", "check"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("publishers.hook") && stderr(&o).contains("secret"),
        "{}",
        stderr(&o)
    );
    assert!(
        !stderr(&o).contains("hunter2"),
        "secret leaked: {}",
        stderr(&o)
    );
}

/// A `ca_file` that cannot be read is a configuration error naming it.
#[test]
fn an_unreadable_ca_file_exits_2_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (kind, table) in [
        ("nats", "type = \"nats\"\nurl = \"tls://127.0.0.1:4222\"\n"),
        (
            "http",
            "type = \"http\"\nurl = \"https://hooks.example.com/x\"\nunsigned = true\n",
        ),
    ] {
        let path = dir.path().join(format!("{kind}.toml"));
        std::fs::write(
            &path,
            format!("[publishers.a]\n{table}ca_file = \"/no/such/ca.pem\"\n"),
        )
        .expect("write");
        let o = postbox()
            .args(["config", "check"])
            .arg(&path)
            .output()
            .expect("run");
        assert_eq!(o.status.code(), Some(2), "{kind}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("ca_file") && stderr(&o).contains("/no/such/ca.pem"),
            "{kind}: {}",
            stderr(&o)
        );
    }
}

/// `tls://` and `mqtts://` from the binary, which compiles two rustls
/// crypto providers: the TLS clients still get one (no panic), verify the
/// broker's certificate, and log the refusal naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_refuses_an_untrusted_tls_broker_and_says_why() {
    use postbox_testkit::tls::{TestCa, TlsListener};
    const INFO: &[u8] = b"INFO {\"server_id\":\"t\",\"version\":\"2.10.0\",\"proto\":1,\"max_payload\":1048576,\"tls_required\":true}\r\n";
    let ca = TestCa::generate();
    let nats = TlsListener::start_with_preamble(&ca, INFO.to_vec())
        .await
        .expect("listener");
    let mqtt = TlsListener::start(&ca).await.expect("listener");
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("o.db").display());
    // not migrated yet: the relay stops with exit 2 while the NATS client is
    // in its first TLS handshake, without a panic from the client's task
    let o = postbox()
        .args([
            "relay",
            "--store",
            &url,
            "--publish",
            &format!("tls://{}", nats.addr()),
        ])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    let migrated = postbox()
        .args(["migrate", "--store", &url])
        .output()
        .expect("run");
    assert_eq!(migrated.status.code(), Some(0), "{}", stderr(&migrated));
    for (publish, listener) in [
        (format!("tls://{}", nats.addr()), &nats),
        (format!("mqtts://{}", mqtt.addr()), &mqtt),
    ] {
        let child = postbox()
            .args(["relay", "--store", &url, "--publish", &publish])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        // the client connects at once (NATS) or on the first publish
        // attempt (MQTT connects in the background at start)
        let deadline = Instant::now() + Duration::from_secs(30);
        while listener.handshake_failures().is_empty() {
            assert!(
                Instant::now() < deadline,
                "{publish}: no TLS handshake was attempted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // let the log line be written, then stop the relay
        tokio::time::sleep(Duration::from_millis(300)).await;
        let term = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(term.success());
        let o = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .expect("join")
            .expect("wait");
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{publish}: {err}");
        assert!(
            err.contains("invalid peer certificate"),
            "{publish}: the refusal is not logged: {err}"
        );
        assert_eq!(o.status.code(), Some(0), "{publish}: {err}");
        assert_eq!(listener.handshakes_completed(), 0, "{publish}");
    }
}

/// Starts `relay` with its stderr piped, waits until `out` holds `lines`
/// lines, then stops it with SIGTERM and checks that it exits 0; a relay
/// that exits before (it refused its settings) fails the test with its
/// error.
fn relay_delivers(relay: &mut Command, out: &std::path::Path, lines: usize) {
    let mut child = relay
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("relay");
    let deadline = Instant::now() + Duration::from_secs(60);
    let count = || {
        std::fs::read_to_string(out)
            .unwrap_or_default()
            .lines()
            .count()
    };
    while count() < lines {
        if child.try_wait().expect("wait").is_some() {
            let o = child.wait_with_output().expect("output");
            panic!("the relay exited {:?}: {}", o.status.code(), stderr(&o));
        }
        assert!(Instant::now() < deadline, "nothing delivered to {out:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let o = child.wait_with_output().expect("wait");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(count(), lines);
}

/// A migrated SQLite outbox holding one message, and a config file for it
/// that publishes to `out.jsonl` in `dir` with `relay` as its `[relay]`
/// section; returns (store URL, config path, output path).
fn outbox_and_config(
    dir: &std::path::Path,
    relay: &str,
) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let url = format!("sqlite://{}", dir.join("o.db").display());
    let out = dir.join("out.jsonl");
    let config = dir.join("postbox.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = \"{url}\"\n[relay]\npoll_interval = \"20ms\"\n{relay}\
             [publishers.out]\nurl = \"file://{}\"\n",
            out.display()
        ),
    )
    .expect("write config");
    for args in [
        vec!["migrate", "--store", &url],
        vec!["enqueue", "--store", &url, "--topic", "t", "--payload", "1"],
    ] {
        let o = postbox().args(args).output().expect("run");
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    }
    (url, config, out)
}

/// An empty `POSTBOX_STORE_URL`, `POSTBOX_PUBLISH_URL` or `POSTBOX_TABLE`
/// (a deployment template's blank) counts as unset in every command, as the
/// `POSTBOX_RELAY_*` variables do: the config file, the flag or the default
/// applies, and a missing `--store` is reported as missing.
#[test]
fn empty_store_publish_and_table_variables_count_as_unset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, config, out) = outbox_and_config(dir.path(), "");
    let blank = || {
        let mut c = postbox();
        c.env("POSTBOX_STORE_URL", "")
            .env("POSTBOX_PUBLISH_URL", "")
            .env("POSTBOX_TABLE", "");
        c
    };
    let o = blank()
        .args(["config", "check"])
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    relay_delivers(blank().arg("relay").arg("--config").arg(&config), &out, 1);
    // the table's default, and the flag's store
    let o = blank()
        .args(["status", "--store", &url])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("outbox postbox_outbox"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = blank()
        .args(["enqueue", "--store", &url, "--topic", "t", "--payload", "2"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // no store anywhere: the missing flag, not an empty URL
    for args in [vec!["status"], vec!["dead", "list"], vec!["migrate"]] {
        let o = blank().args(&args).output().expect("run");
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("--store"), "{args:?}: {}", stderr(&o));
        // the blank variable is named too, as the way to give the store
        assert!(
            stderr(&o).contains("POSTBOX_STORE_URL"),
            "{args:?}: {}",
            stderr(&o)
        );
        assert!(!stderr(&o).contains("scheme"), "{args:?}: {}", stderr(&o));
    }
    let o = blank()
        .args(["relay", "--publish", "stdout"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("no store"), "{}", stderr(&o));
}

/// The file's `lease` is compared with the send timeout the relay will
/// use, from a flag or the environment, not with the default one; alone
/// against the default it is refused, saying the send timeout is the
/// default.
#[test]
fn a_short_lease_in_the_file_takes_its_send_timeout_from_a_flag_or_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, config, out) = outbox_and_config(dir.path(), "lease = \"5s\"\n");
    let o = postbox()
        .args(["config", "check"])
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("send_timeout = 10s (the default) is invalid"),
        "{}",
        stderr(&o)
    );
    let o = postbox()
        .args(["relay", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("send_timeout"), "{}", stderr(&o));

    let o = postbox()
        .args(["config", "check"])
        .arg(&config)
        .env("POSTBOX_RELAY_SEND_TIMEOUT", "2s")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    relay_delivers(
        postbox()
            .args(["relay", "--send-timeout", "2s", "--config"])
            .arg(&config),
        &out,
        1,
    );
    let o = postbox()
        .args(["enqueue", "--store", &url, "--topic", "t", "--payload", "2"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    relay_delivers(
        postbox()
            .args(["relay", "--config"])
            .arg(&config)
            .env("POSTBOX_RELAY_SEND_TIMEOUT", "2s"),
        &out,
        2,
    );
}

/// A value that a `${NAME}` substitution put into a publisher's settings
/// (typically a secret) is not repeated when the setting is refused: the
/// error says where it came from instead.
#[test]
fn a_substituted_value_is_not_repeated_in_a_publisher_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (value, shown) in [
        (
            "${POSTBOX_TEST_SETTING}",
            "(the value of ${POSTBOX_TEST_SETTING})",
        ),
        (
            "ms-${POSTBOX_TEST_SETTING}",
            "\"ms-${POSTBOX_TEST_SETTING}\"",
        ),
    ] {
        let path = dir.path().join("kafka.toml");
        std::fs::write(
            &path,
            format!(
                "[publishers.k]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\n\
                 message_timeout_ms = \"{value}\"\n"
            ),
        )
        .expect("write");
        // the relay builds its publishers before it opens the store
        for command in [
            vec!["config", "check"],
            vec!["relay", "--store", "sqlite://unused.db", "--config"],
        ] {
            let o = postbox()
                .args(&command)
                .arg(&path)
                .env("POSTBOX_TEST_SETTING", "Hunter2Secret")
                .output()
                .expect("run");
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "{command:?} {value}: {err}");
            assert!(
                err.contains("message_timeout_ms") && err.contains(shown),
                "{command:?} {value}: {err}"
            );
            assert!(
                !err.contains("Hunter2"),
                "{command:?} {value}: leaked: {err}"
            );
        }
    }
    // a value the error shows escaped, and a short one in a variable named
    // as a secret, inside a subject the template made
    for (secret, fragment) in [("pa\"ss wo\\rd12345", "rd12345"), ("abc def", "abc def")] {
        let path = dir.path().join("nats.toml");
        std::fs::write(
            &path,
            "[publishers.n]\ntype = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\n\
             subject_template = \"x.${POSTBOX_TEST_PW}.{topic}\"\n",
        )
        .expect("write");
        let o = postbox()
            .args(["config", "check"])
            .arg(&path)
            .env("POSTBOX_TEST_PW", secret)
            .output()
            .expect("run");
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{secret}: {err}");
        assert!(err.contains("subject_template"), "{secret}: {err}");
        assert!(!err.contains(fragment), "{secret}: leaked: {err}");
    }
}
