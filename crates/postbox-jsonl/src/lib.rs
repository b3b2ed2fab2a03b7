//! Publishers that write the JSON-lines format of postbox's contract: to
//! standard output ([`StdoutPublisher`]) or appended to a file
//! ([`FilePublisher`]).
//!
//! One object per message, one line each:
//!
//! ```text
//! {"id":"0192…","topic":"orders.created","key":"order-42","headers":{},"payload":"{\"id\":42}","tenant":null,"attempt":1}
//! ```
//!
//! `key` is `null` when keyless, `headers` is `{}` when empty, `payload` is
//! text whenever the bytes are valid UTF-8 (empty included) and otherwise
//! `payload_base64` replaces it. A redelivery carries the same `id` and a
//! higher `attempt`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine;
use postbox_core::{Headers, Message, PublishOutcome, Publisher};
use serde::Serialize;

/// One line of output.
#[derive(Serialize)]
struct Line<'a> {
    id: uuid::Uuid,
    topic: &'a str,
    key: Option<&'a str>,
    headers: &'a Headers,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
    tenant: Option<&'a str>,
    attempt: u32,
}

/// Renders `batch` as JSON lines, each ending in `\n`.
pub fn render(batch: &[Message]) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.iter().map(|m| m.payload.len() + 160).sum());
    for m in batch {
        let text = std::str::from_utf8(&m.payload).ok();
        let line = Line {
            id: m.id,
            topic: &m.topic,
            key: m.key.as_deref(),
            headers: &m.headers,
            payload: text,
            payload_base64: match text {
                Some(_) => None,
                None => Some(base64::engine::general_purpose::STANDARD.encode(&m.payload)),
            },
            tenant: m.tenant.as_deref(),
            attempt: m.attempt,
        };
        // Serialising strings and a string map into a Vec cannot fail.
        if serde_json::to_writer(&mut out, &line).is_ok() {
            out.push(b'\n');
        }
    }
    out
}

/// Errors opening a JSON-lines destination.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JsonlError {
    /// The file cannot be opened for appending (for example its directory
    /// does not exist).
    #[error("cannot open {path} for appending: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A `file://` URL that is not an absolute path.
    #[error("invalid file URL {url:?}: use file:///absolute/path.jsonl")]
    Url {
        /// The URL as given.
        url: String,
    },
}

/// Writes each batch to standard output. Counts as published once written
/// and flushed (stdout has no durability to wait for).
#[derive(Debug, Clone, Copy, Default)]
pub struct StdoutPublisher;

impl Publisher for StdoutPublisher {
    async fn publish(&self, batch: &[Message]) -> Vec<PublishOutcome> {
        let bytes = render(batch);
        let outcome = match tokio::task::spawn_blocking(move || {
            let mut out = io::stdout().lock();
            out.write_all(&bytes)?;
            out.flush()
        })
        .await
        {
            Ok(Ok(())) => PublishOutcome::Ok,
            Ok(Err(e)) => PublishOutcome::transient(format!("writing to stdout failed: {e}")),
            Err(e) => PublishOutcome::transient(format!("stdout writer task failed: {e}")),
        };
        vec![outcome; batch.len()]
    }
}

/// Appends each batch to a file with one `write(2)` on an `O_APPEND`
/// descriptor, then `fdatasync`s it before reporting the batch published.
/// Several relays (processes) may append to the same file: batches never
/// interleave within a line (appenders also take an exclusive `flock`, so
/// the rest of a short write is never interleaved either). A relay killed
/// inside its `write(2)` can leave a partial last line (SIGKILL ends a write
/// to a regular file between pages); the next batch then starts on a new
/// line, so that partial line stays one line a reader cannot parse (its
/// messages were never reported sent and are delivered again) and the next
/// batch's lines stay whole.
///
/// Write errors (`ENOSPC`, `EFBIG`, `EIO`) are `Transient`: the messages stay
/// pending and are retried.
#[derive(Debug, Clone)]
pub struct FilePublisher {
    file: Arc<File>,
    path: Arc<Path>,
    /// Serialises this process's appends: `flock` is held per open file,
    /// so it cannot keep two batches of one publisher (and its clones) apart.
    appending: Arc<Mutex<()>>,
}

impl FilePublisher {
    /// Opens `path` for appending, creating the file (not its directory).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, JsonlError> {
        let path = path.as_ref();
        // read access lets a batch check whether the file ends mid-line;
        // a file we may only write to is appended to without that check
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .or_else(|_| OpenOptions::new().create(true).append(true).open(path))
            .map_err(|source| JsonlError::Open {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            file: Arc::new(file),
            path: path.into(),
            appending: Arc::new(Mutex::new(())),
        })
    }

    /// Opens the file named by a `file:///absolute/path` URL.
    pub fn from_url(url: &str) -> Result<Self, JsonlError> {
        let path = url
            .strip_prefix("file://")
            .filter(|p| p.starts_with('/'))
            .ok_or_else(|| JsonlError::Url {
                url: url.to_owned(),
            })?;
        Self::open(path)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn append(file: &File, bytes: &[u8]) -> io::Result<()> {
    // Other postbox appenders take the same lock (a file system without
    // flock gets the single write(2) alone). The lock goes with the process
    // when it dies.
    let locked = file.lock().is_ok();
    let result = append_locked(file, bytes);
    if locked {
        let _ = file.unlock();
    }
    result
}

fn append_locked(mut file: &File, bytes: &[u8]) -> io::Result<()> {
    let fresh_line;
    let bytes = if ends_mid_line(file) {
        fresh_line = [b"\n", bytes].concat();
        &fresh_line[..]
    } else {
        bytes
    };
    // One write(2) for the whole batch keeps concurrent appenders' lines
    // whole; a short write (rare on regular files) is completed, not lost.
    let n = file.write(bytes)?;
    if n < bytes.len() {
        tracing::warn!(
            written = n,
            total = bytes.len(),
            "short write to JSON-lines file"
        );
        file.write_all(&bytes[n..])?;
    }
    // Only a regular file has anything to sync: a FIFO, a socket or a
    // device (`/dev/null`, a pipe as `/dev/stdout`) refuses `fdatasync`
    // (EINVAL) after the write already went out, and the batch would be
    // sent again and again.
    if file.metadata().map_or(true, |m| m.is_file()) {
        file.sync_data()?;
    }
    Ok(())
}

/// Whether a regular file's last byte is not a newline: a batch written by
/// a relay that was killed during its `write(2)`.
#[cfg(unix)]
fn ends_mid_line(file: &File) -> bool {
    use std::os::unix::fs::FileExt as _;
    let Ok(meta) = file.metadata() else {
        return false;
    };
    if !meta.is_file() || meta.len() == 0 {
        return false;
    }
    let mut last = [0u8; 1];
    matches!(file.read_at(&mut last, meta.len() - 1), Ok(1)) && last[0] != b'\n'
}

#[cfg(not(unix))]
fn ends_mid_line(_file: &File) -> bool {
    false
}

impl Publisher for FilePublisher {
    async fn publish(&self, batch: &[Message]) -> Vec<PublishOutcome> {
        let bytes = render(batch);
        let file = Arc::clone(&self.file);
        let appending = Arc::clone(&self.appending);
        let outcome = match tokio::task::spawn_blocking(move || {
            let _one_at_a_time = appending.lock().unwrap_or_else(PoisonError::into_inner);
            append(&file, &bytes)
        })
        .await
        {
            Ok(Ok(())) => PublishOutcome::Ok,
            Ok(Err(e)) => PublishOutcome::transient(format!(
                "appending to {} failed: {e}",
                self.path.display()
            )),
            Err(e) => PublishOutcome::transient(format!("file writer task failed: {e}")),
        };
        vec![outcome; batch.len()]
    }
}
