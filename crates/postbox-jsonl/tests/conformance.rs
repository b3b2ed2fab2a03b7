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
