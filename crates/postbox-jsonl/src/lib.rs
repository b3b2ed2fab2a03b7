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
//! `payload_base64` replaces it. A redelivery carries the same `id`; its
//! `attempt` is higher unless the earlier try was given back uncounted (at
//! shutdown, or never sent).

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
///
/// **A FIFO** (named pipe, or a pipe reached as `/dev/stdout`) is opened
/// for writing only, and only while a process has it open for reading:
/// with no reader a batch is `Transient` ("no process has the FIFO open
/// for reading"), retried with backoff like any transient failure (and
/// dead once its attempts run out). A reader that goes away makes the
/// batch being written `Transient` (`EPIPE`). A pipe has no
/// acknowledgement, so "published" means "in the pipe while a reader had
/// it open": lines the reader had not read when it closed are lost. Use a
/// regular file where that matters. A full pipe (a slow reader) makes the
/// publish wait for room until the relay's send timeout cuts it (the whole
/// batch is then `Transient`, lines already in the pipe included). Batches of
/// several processes writing one FIFO stay whole lines only up to the
/// pipe's atomic write size (4 KiB on Linux).
#[derive(Debug, Clone)]
pub struct FilePublisher {
    path: Arc<Path>,
    dest: Dest,
}

#[derive(Debug, Clone)]
enum Dest {
    /// A regular file or a device, opened once for appending.
    Append {
        file: Arc<File>,
        /// Serialises this process's appends: `flock` is held per open
        /// file, so it cannot keep two batches of one publisher (and its
        /// clones) apart.
        appending: Arc<Mutex<()>>,
    },
    /// A FIFO, opened write-only while it has a reader.
    #[cfg(unix)]
    Fifo(Arc<tokio::sync::Mutex<Fifo>>),
}

/// A FIFO's writing end and where its last write stopped.
#[cfg(unix)]
#[derive(Debug)]
struct Fifo {
    /// Opened by [`FilePublisher::open`], where no runtime may exist yet;
    /// registered with the runtime at the first publish.
    opened: Option<File>,
    /// The writing end; `None` while no reader has the FIFO open.
    sender: Option<tokio::net::unix::pipe::Sender>,
    /// The last write stopped inside a line (the publish was cut short or
    /// the pipe refused the rest): the next batch starts on a new line.
    mid_line: bool,
}

impl FilePublisher {
    /// Opens `path` for appending, creating the file (not its directory).
    /// An existing FIFO is opened for writing only, if a process has it
    /// open for reading (see the type's docs).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, JsonlError> {
        let path = path.as_ref();
        let failed = |source| JsonlError::Open {
            path: path.to_owned(),
            source,
        };
        #[cfg(unix)]
        if std::fs::metadata(path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()))
        {
            // Opened now so that a missing permission fails at start; kept
            // open, since closing it would end a reader that waits in
            // `read` with no other writer.
            let opened = match open_fifo(path) {
                Ok(file) => Some(file),
                Err(e) if no_reader(&e) => None,
                Err(e) => return Err(failed(e)),
            };
            return Ok(Self {
                path: path.into(),
                dest: Dest::Fifo(Arc::new(tokio::sync::Mutex::new(Fifo {
                    opened,
                    sender: None,
                    mid_line: false,
                }))),
            });
        }
        // read access lets a batch check whether the file ends mid-line;
        // a file we may only write to is appended to without that check
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .or_else(|_| OpenOptions::new().create(true).append(true).open(path))
            .map_err(failed)?;
        Ok(Self {
            path: path.into(),
            dest: Dest::Append {
                file: Arc::new(file),
                appending: Arc::new(Mutex::new(())),
            },
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

/// A FIFO's writing end, without waiting for a reader: `ENXIO` if none
/// has it open.
#[cfg(unix)]
fn open_fifo(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

#[cfg(unix)]
fn no_reader(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENXIO)
}

/// Writes `bytes` to the FIFO, opening its writing end first if needed.
#[cfg(unix)]
async fn write_fifo(path: &Path, fifo: &mut Fifo, bytes: &[u8]) -> io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::unix::pipe::Sender;
    let sender = match &mut fifo.sender {
        Some(sender) => sender,
        slot @ None => {
            let file = match fifo.opened.take() {
                Some(file) => file,
                None => {
                    let file = open_fifo(path).map_err(|e| {
                        if no_reader(&e) {
                            io::Error::new(e.kind(), "no process has the FIFO open for reading")
                        } else {
                            e
                        }
                    })?;
                    // `mid_line` stays: what an earlier reader had not read
                    // is gone only if no other process holds the FIFO open
                    // for writing; if one does, the partial line is still
                    // in the pipe (at worst a new reader sees an empty line)
                    file
                }
            };
            slot.insert(Sender::from_file_unchecked(file)?)
        }
    };
    let fresh_line;
    let bytes = if fifo.mid_line {
        fresh_line = [b"\n", bytes].concat();
        &fresh_line[..]
    } else {
        bytes
    };
    let mut written = 0;
    while written < bytes.len() {
        match sender.write(&bytes[written..]).await {
            Ok(n) => {
                written += n;
                // kept up to date at every step: a publish cut short by its
                // deadline leaves it right for the next batch
                fifo.mid_line = bytes[written - 1] != b'\n';
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                if e.kind() == io::ErrorKind::BrokenPipe {
                    // the reader went away: open again for the next one
                    fifo.sender = None;
                }
                return Err(e);
            }
        }
    }
    Ok(())
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
        let outcome = match &self.dest {
            Dest::Append { file, appending } => {
                let file = Arc::clone(file);
                let appending = Arc::clone(appending);
                match tokio::task::spawn_blocking(move || {
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
                }
            }
            #[cfg(unix)]
            Dest::Fifo(fifo) => match write_fifo(&self.path, &mut *fifo.lock().await, &bytes).await
            {
                Ok(()) => PublishOutcome::Ok,
                Err(e) => PublishOutcome::transient(format!(
                    "writing to the FIFO {} failed: {e}",
                    self.path.display()
                )),
            },
        };
        vec![outcome; batch.len()]
    }
}
