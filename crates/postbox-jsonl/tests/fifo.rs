//! A FIFO as the destination: a batch counts as published only while a
//! process has the FIFO open for reading.
#![cfg(unix)]

use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use postbox_core::{Message, PublishOutcome, Publisher};
use postbox_jsonl::FilePublisher;
use postbox_testkit::publisher_suite::message;

fn fifo(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("feed.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    path
}

/// A reading end that never waits: not for a writer to open, not for data.
fn reader(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .expect("open the FIFO's reading end")
}

/// Everything in the pipe now.
fn drain(reader: &mut File) -> String {
    let mut text = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("reading the FIFO: {e}"),
        }
    }
    String::from_utf8(text).expect("UTF-8 lines")
}

fn batch(topic: &str, n: usize, size: usize) -> Vec<Message> {
    (0..n)
        .map(|i| message(i as i64 + 1, topic, None, "x".repeat(size).into_bytes()))
        .collect()
}

/// With no reader the batch stays pending (`Transient`); it used to be
/// reported published while its lines sat in a pipe nobody read, lost when
/// the relay closed it. The batch published once a reader has the FIFO
/// open reaches that reader.
#[tokio::test]
async fn without_a_reader_a_batch_is_transient_and_reaches_the_next_reader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = fifo(&dir);
    let p = FilePublisher::open(&path).expect("a FIFO without a reader opens");

    let out = p.publish(&batch("early", 1, 10)).await;
    assert!(
        matches!(&out[0], PublishOutcome::Transient { reason, .. }
            if reason.contains("no process has the FIFO open for reading")),
        "{out:?}"
    );

    let mut r = reader(&path);
    let out = p.publish(&batch("late", 1, 10)).await;
    assert!(out[0].is_ok(), "{out:?}");
    let text = drain(&mut r);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("\"topic\":\"late\""), "{text}");
}

/// A reader that goes away makes the next batch `Transient`, and a new
/// reader gets the batches after it.
#[tokio::test]
async fn a_reader_that_leaves_makes_batches_transient_until_another_comes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = fifo(&dir);
    let mut first = reader(&path);
    let p = FilePublisher::open(&path).expect("open");
    assert!(p.publish(&batch("one", 1, 10)).await[0].is_ok());
    assert!(drain(&mut first).contains("\"topic\":\"one\""));
    drop(first);

    let out = p.publish(&batch("two", 1, 10)).await;
    assert!(
        matches!(&out[0], PublishOutcome::Transient { .. }),
        "{out:?}"
    );

    let mut second = reader(&path);
    assert!(p.publish(&batch("three", 1, 10)).await[0].is_ok());
    let text = drain(&mut second);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("\"topic\":\"three\""), "{text}");
}

/// A publish cut short with the pipe full (a reader that stopped reading)
/// leaves part of a line in the pipe; the next batch starts on a new line,
/// so its lines stay whole.
#[tokio::test]
async fn a_publish_cut_short_in_a_full_pipe_leaves_the_next_batch_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = fifo(&dir);
    let mut r = reader(&path);
    let p = FilePublisher::open(&path).expect("open");

    // 40 lines of ~4 KiB: more than the pipe holds (64 KiB), and nothing
    // reads while the publish runs, so it cannot finish.
    let big = batch("big", 40, 4000);
    let cut = tokio::time::timeout(Duration::from_millis(200), p.publish(&big)).await;
    assert!(cut.is_err(), "a full pipe made the publish wait");

    let before = drain(&mut r);
    assert!(
        !before.is_empty() && !before.ends_with('\n'),
        "a partial line"
    );
    let out = p.publish(&batch("after", 1, 10)).await;
    assert!(out[0].is_ok(), "{out:?}");
    let text = drain(&mut r);
    let last = text.lines().last().expect("a line");
    let v: serde_json::Value = serde_json::from_str(last).expect("the new batch is a whole line");
    assert_eq!(v["topic"], "after");
}
