//! The file publisher passes the publisher conformance suite; its "consumer"
//! reads the file back.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use postbox_jsonl::FilePublisher;
use postbox_testkit::{LargePayload, PublisherHarness, Received};

struct FileHarness {
    dir: tempfile::TempDir,
}

impl FileHarness {
    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("out.jsonl")
    }
}

fn parse(line: &str) -> Received {
    let v: serde_json::Value = serde_json::from_str(line).expect("each line is JSON");
    let payload = match (&v["payload"], &v["payload_base64"]) {
        (serde_json::Value::String(s), _) => Bytes::from(s.clone().into_bytes()),
        (_, serde_json::Value::String(b)) => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(b)
                .expect("base64"),
        ),
        _ => panic!("line without payload: {line}"),
    };
    Received {
        id: v["id"].as_str().and_then(|s| s.parse().ok()),
        key: v["key"].as_str().map(str::to_owned),
        headers: serde_json::from_value(v["headers"].clone()).expect("headers object"),
        payload,
    }
}

impl PublisherHarness for FileHarness {
    type Publisher = FilePublisher;

    fn publisher(&self) -> FilePublisher {
        FilePublisher::open(self.path()).expect("open")
    }

    fn unreachable_publisher(&self) -> FilePublisher {
        // every write to /dev/full fails with ENOSPC
        FilePublisher::open("/dev/full").expect("open /dev/full")
    }

    fn topic(&self) -> String {
        "orders.created".into()
    }

    async fn receive(&self, n: usize, _timeout: Duration) -> Vec<Received> {
        let text = std::fs::read_to_string(self.path()).unwrap_or_default();
        text.lines().take(n).map(parse).collect()
    }

    fn large_payload(&self) -> LargePayload {
        LargePayload::Delivered
    }
}

async fn harness() -> FileHarness {
    FileHarness {
        dir: tempfile::tempdir().expect("tempdir"),
    }
}

postbox_testkit::publisher_conformance_tests!(harness);

#[tokio::test]
async fn missing_directory_is_an_open_error() {
    let err = FilePublisher::from_url("file:///nonexistent-dir-postbox/out.jsonl")
        .expect_err("must fail");
    assert!(
        err.to_string()
            .contains("/nonexistent-dir-postbox/out.jsonl"),
        "{err}"
    );
    assert!(FilePublisher::from_url("file://relative.jsonl").is_err());
}

#[test]
fn keyless_empty_and_binary_lines_follow_the_contract() {
    use postbox_testkit::publisher_suite::message;
    let keyless = message(1, "t", None, Bytes::new());
    let binary = message(2, "t", Some("k"), Bytes::from_static(&[0xff, 0x00]));
    let text = String::from_utf8(postbox_jsonl::render(&[keyless, binary])).expect("utf8");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines[0]["key"], serde_json::Value::Null);
    assert!(lines[0].as_object().expect("object").contains_key("key"));
    assert_eq!(lines[0]["payload"], "");
    assert_eq!(lines[0]["headers"], serde_json::json!({}));
    assert_eq!(lines[0]["attempt"], 1);
    assert!(lines[1].get("payload").is_none());
    assert_eq!(lines[1]["payload_base64"], "/wA=");
    assert_eq!(lines[1]["key"], "k");
}

/// What a relay killed inside its `write(2)` leaves behind (a partial last
/// line, no newline) does not swallow the next batch: that batch starts on
/// a line of its own and every one of its lines parses. (Found by the chaos
/// suite's kill -9 scenario, where the next batch's first message was glued
/// to such a partial line and unreadable.)
#[tokio::test]
async fn a_partial_last_line_does_not_swallow_the_next_batch() {
    use postbox_core::Publisher;
    use postbox_testkit::publisher_suite::message;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("out.jsonl");
    let torn = r#"{"id":"0190a3c0-0000-7000-8000-000000000000","topic":"t","key":"k","head"#;
    std::fs::write(&path, format!("{{\"whole\":1}}\n{torn}")).expect("write");
    let p = FilePublisher::open(&path).expect("open");
    let batch = [
        message(1, "t", Some("k"), &b"first"[..]),
        message(2, "t", None, &b"second"[..]),
    ];
    assert!(p.publish(&batch).await.iter().all(|o| o.is_ok()));
    assert!(p.publish(&batch[..1]).await[0].is_ok());
    let text = std::fs::read_to_string(&path).expect("read");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert_eq!(lines[1], torn, "the partial line stays alone");
    let got: Vec<Received> = lines[2..].iter().map(|l| parse(l)).collect();
    assert_eq!(got[0].payload, Bytes::from_static(b"first"));
    assert_eq!(got[1].payload, Bytes::from_static(b"second"));
    assert_eq!(got[2].payload, Bytes::from_static(b"first"));
    assert!(text.ends_with('\n'));
}

/// A file that cannot be fsynced (a device, a FIFO, a pipe as
/// `/dev/stdout`) still gets `Ok` once the lines are written. Fails if
/// `fdatasync`'s EINVAL makes the batch `Transient`: sent again and again.
#[cfg(unix)]
#[tokio::test]
async fn a_device_or_fifo_takes_the_lines_without_an_fsync() {
    use postbox_core::Publisher;
    use postbox_testkit::publisher_suite::message;
    let batch = [message(1, "t", None, &b"x"[..])];
    let p = FilePublisher::open("/dev/null").expect("open /dev/null");
    let out = p.publish(&batch).await;
    assert!(out[0].is_ok(), "{out:?}");

    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("feed.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    // The reader's end, open before the publisher opens the FIFO: opened
    // read-write it does not wait for a writer (Linux), and the publisher's
    // open finds a reader. (A reader thread opening it read-only raced the
    // publisher: when the publisher came first, the line went nowhere and
    // the reader waited for a writer for ever.)
    let mut reader = std::io::BufReader::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .expect("open the FIFO's reading end"),
    );
    let p = FilePublisher::open(&fifo).expect("open the FIFO");
    let out = p.publish(&batch).await;
    assert!(out[0].is_ok(), "{out:?}");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).expect("read the FIFO");
    assert!(line.contains("\"topic\":\"t\""), "{line}");
}

/// Batches of one publisher (and its clones) appended concurrently, as a
/// relay's workers do: every line is one whole message, none empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_of_one_publisher_stay_whole_lines() {
    use postbox_core::Publisher;
    use postbox_testkit::publisher_suite::message;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("out.jsonl");
    let p = FilePublisher::open(&path).expect("open");
    let mut tasks = Vec::new();
    for w in 0..8u32 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            for b in 0..25u32 {
                let batch: Vec<_> = (0..200u32)
                    .map(|i| {
                        let n = i64::from((w * 25 + b) * 200 + i);
                        message(
                            n,
                            "t",
                            None,
                            format!("{w}:{b}:{i}:{}", "x".repeat(64)).into_bytes(),
                        )
                    })
                    .collect();
                assert!(p.publish(&batch).await.iter().all(|o| o.is_ok()));
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let text = std::fs::read_to_string(&path).expect("read");
    let mut n = 0;
    for line in text.lines() {
        assert!(!line.is_empty(), "an empty line");
        parse(line);
        n += 1;
    }
    assert_eq!(n, 8 * 25 * 200);
}
