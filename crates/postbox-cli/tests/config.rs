//! `postbox config check` and `postbox relay --config`.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn postbox() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_postbox"));
    c.env_remove("POSTBOX_STORE_URL")
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
        ("https://hooks.example.com/x", "POSTBOX_WEBHOOK_SECRET"),
        ("amqp://user:hunter2@", "amqp"),
        (
            "ftp://user:hunter2@example.com",
            "ftp://user:***@example.com",
        ),
    ];
    for (publish, named) in cases {
        let o = postbox()
            .args(["relay", "--store", &url, "--publish", publish])
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
