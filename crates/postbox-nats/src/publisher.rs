//! The JetStream publisher.

use std::collections::HashMap;
use std::error::Error as _;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::context::{
    GetStreamByNameErrorKind, PublishAckFuture, PublishErrorKind,
};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Event, HeaderMap, HeaderName, HeaderValue};
use futures_util::future::join_all;
use postbox_core::{Message, PublishOutcome, Publisher, by_deadline};
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::Credentials;
use crate::subject::check_subject;
use crate::{NatsConfig, NatsError, tls};

/// Header carrying the postbox key of a keyed message (NATS has no key of
/// its own). Keyless messages have no such header.
pub const KEY_HEADER: &str = "postbox-key";

/// A batch is sent in chunks of this many messages, each chunk's acks
/// awaited before the next is sent (see `publish`).
const ACK_CHUNK: usize = 1_000;

/// Publishes to NATS JetStream.
///
/// Each message goes to [`NatsConfig::subject`] of its topic with headers
/// `Nats-Msg-Id` = message id (JetStream drops a redelivery inside the
/// stream's duplicate window, 2 minutes by default), [`KEY_HEADER`] = its
/// key, and every message header as it is. A batch is pipelined on the one
/// connection: all messages are sent, then all PubAcks awaited together, so
/// a batch costs about one round trip and the stream stores same-key
/// messages in batch order.
///
/// Outcomes: `Ok` once the PubAck arrived (the stream stored it).
/// `Transient`: no PubAck within `ack_timeout_ms` (server down, stalled or
/// reconnecting), a lost connection, a stream error that may clear
/// (storage full, no JetStream leader), or a message over the client's
/// default 1 MiB before the first connection (the server's `max_payload`
/// is not known yet). `Rejected`: no stream captures the subject (with
/// `create_stream`: after creating that stream, it does not capture the
/// subject either), an invalid subject or header, a system subject (first
/// token `$...` or `_INBOX`), a message bigger than the server's
/// `max_payload` / the stream's `max_msg_size`, or a JetStream error no
/// retry clears (sealed stream, a failed `Nats-Expected-*` precondition).
///
/// The client reconnects by itself with backoff; a message that was sent
/// but not acked before a connection loss is `Transient`, and if the server
/// stored it after all, the retry is dropped as a duplicate by its
/// `Nats-Msg-Id`. Cheap to clone.
#[derive(Clone, Debug)]
pub struct NatsPublisher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: NatsConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    /// Whether `create_stream` has been ensured since start (or since the
    /// stream went missing).
    stream_ready: AtomicBool,
    /// Why the last connection attempt failed (e.g. a TLS error), until the
    /// client connects again: put into `Transient` reasons while down.
    last_error: Arc<Mutex<Option<String>>>,
}

impl NatsPublisher {
    /// Builds the publisher without waiting for the server: the client
    /// connects and reconnects in the background, and publishes are
    /// `Transient` until it is up. Errors only for a bad configuration.
    /// Needs a tokio runtime.
    pub async fn new(config: NatsConfig) -> Result<Self, NatsError> {
        config.validate()?;
        let last_error: Arc<Mutex<Option<String>>> = Arc::default();
        let refused: tls::Refusal = Arc::default();
        let tls_config = tls::client_config(
            config.ca_file.as_deref(),
            config.url.starts_with("tls://"),
            Arc::clone(&refused),
        )
        .map_err(|(field, reason)| NatsError::invalid(field, reason))?;
        let on_event = {
            let last_error = Arc::clone(&last_error);
            let server = config.server();
            move |event: Event| {
                let (last_error, refused, server) = (
                    Arc::clone(&last_error),
                    Arc::clone(&refused),
                    server.clone(),
                );
                async move {
                    // async-nats says only "IO error" when the handshake
                    // failed on the certificate: add what the verifier saw
                    let refusal = refused
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .take();
                    let mut last = last_error.lock().unwrap_or_else(PoisonError::into_inner);
                    match event {
                        Event::Connected => {
                            tracing::info!(%server, "connected to NATS");
                            *last = None;
                        }
                        Event::Disconnected => {
                            tracing::warn!(%server, "disconnected from NATS; reconnecting");
                        }
                        // a failed (re)connection attempt: refused, timed out,
                        // TLS handshake or certificate refused, ...
                        Event::ClientError(e) => {
                            let error = match refusal {
                                Some(why) => format!("{e} ({why})"),
                                None => e.to_string(),
                            };
                            tracing::warn!(%server, %error, "NATS connection attempt failed");
                            *last = Some(error);
                        }
                        other => tracing::debug!(%server, event = %other, "NATS connection event"),
                    }
                }
            }
        };
        let (url, credentials) = config.connect_target()?;
        let mut options = async_nats::ConnectOptions::new()
            .name(&config.client_name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
            .tls_client_config(tls_config)
            .event_callback(on_event);
        // async-nats authenticates only with what the options carry; the
        // URL's user part would be ignored (and the server would answer
        // "authorization violation" at every attempt)
        options = match credentials {
            Some(Credentials::UserPassword { user, password }) => {
                options.user_and_password(user, password)
            }
            Some(Credentials::Token(token)) => options.token(token),
            None => options,
        };
        // A CA file means the operator expects TLS: without this, a
        // nats:// server that does not announce `tls_required` would get
        // the credentials and the messages in clear text.
        if config.ca_file.is_some() {
            options = options.require_tls(true);
        }
        let client = options
            .connect(url.as_str())
            .await
            .map_err(|e| NatsError::invalid("url", format!("{} ({e})", config.server())))?;
        // Room for a chunk of every batch a relay can have in flight (at
        // most 64 workers), so chunks never wait for each other's permits.
        let mut js = jetstream::ContextBuilder::new()
            .max_ack_inflight(ACK_CHUNK * 64)
            .build(client.clone());
        js.set_timeout(Duration::from_millis(config.ack_timeout_ms));
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                client,
                js,
                stream_ready: AtomicBool::new(false),
                last_error,
            }),
        })
    }

    /// Like [`NatsPublisher::new`], then waits up to `connect_timeout_ms`
    /// for the connection (and creates the configured stream): for callers
    /// that want a wrong address to fail at start-up. Use
    /// [`NatsPublisher::new`] where starting while NATS is down must work.
    pub async fn connect(config: NatsConfig) -> Result<Self, NatsError> {
        let publisher = Self::new(config).await?;
        let inner = &publisher.inner;
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(inner.config.connect_timeout_ms);
        while inner.client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() >= deadline {
                return Err(NatsError::Connect {
                    server: inner.config.server(),
                    reason: format!(
                        "not connected after {} ms{}",
                        inner.config.connect_timeout_ms,
                        inner.link_note()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        inner
            .ensure_stream()
            .await
            .map_err(|reason| NatsError::Connect {
                server: inner.config.server(),
                reason,
            })?;
        Ok(publisher)
    }

    /// The underlying client (e.g. to read `server_info().max_payload`).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }
}

impl Inner {
    /// `"; last connection error: …"` while the client is not connected
    /// and an attempt has failed, else nothing.
    fn link_note(&self) -> String {
        if self.client.connection_state() == async_nats::connection::State::Connected {
            return String::new();
        }
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|e| format!("; not connected, last connection error: {e}"))
            .unwrap_or_default()
    }

    /// Creates the configured stream once (again after it went missing).
    async fn ensure_stream(&self) -> Result<(), String> {
        let Some(spec) = &self.config.create_stream else {
            return Ok(());
        };
        if self.stream_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let config = jetstream::stream::Config {
            name: spec.name.clone(),
            subjects: spec.subjects.clone(),
            ..Default::default()
        };
        // bounded by the context timeout (ack_timeout_ms)
        self.js.get_or_create_stream(config).await.map_err(|e| {
            format!(
                "cannot create JetStream stream {}: {e}{}",
                spec.name,
                self.link_note()
            )
        })?;
        self.stream_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Publishes `batch` in chunks. With a deadline, chunks not started by
    /// then are `NotSent`; in a chunk cut while sending, the message being
    /// handed over is `Transient` and the ones after it `NotSent`; acks not
    /// in by then are `Transient`.
    async fn publish(&self, batch: &[Message], deadline: Option<Instant>) -> Vec<PublishOutcome> {
        if batch.is_empty() {
            return Vec::new();
        }
        match by_deadline(deadline, self.ensure_stream()).await {
            None => return vec![PublishOutcome::NotSent; batch.len()],
            Some(Err(reason)) => {
                tracing::debug!(%reason, "stream not ready");
                return batch
                    .iter()
                    .map(|_| PublishOutcome::transient(reason.clone()))
                    .collect();
            }
            Some(Ok(())) => {}
        }
        // Send a chunk first, then await its acks: the acks travel back while
        // later messages of the chunk are still being written. In chunks,
        // because every ack not yet awaited holds one of the context's
        // in-flight permits and a publish waits for a free one: a batch
        // larger than the permits (async-nats's default, 5,000) sent whole
        // before awaiting any ack waited for itself until the relay's send
        // timeout.
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut broken: Option<String> = None;
        let lookups = Lookups::default();
        let lookups = &lookups;
        for chunk in batch.chunks(ACK_CHUNK) {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                outcomes.extend(chunk.iter().map(|_| PublishOutcome::NotSent));
                continue;
            }
            let mut sent: Vec<Result<(PublishAckFuture, String), PublishOutcome>> =
                Vec::with_capacity(chunk.len());
            // One timer for the chunk's sends, not one per message: a send
            // usually returns at once (into the client's buffer).
            let sending = async {
                for m in chunk {
                    if let Some(reason) = &broken {
                        // the connection is not taking messages: do not wait
                        // `ack_timeout` once more per message
                        sent.push(Err(PublishOutcome::transient(reason.clone())));
                        continue;
                    }
                    let subject = self.config.subject(&m.topic);
                    let headers = match check_subject(&subject).and_then(|()| headers_for(m)) {
                        Ok(h) => h,
                        Err(reason) => {
                            sent.push(Err(PublishOutcome::rejected(reason)));
                            continue;
                        }
                    };
                    match self
                        .js
                        .publish_with_headers(subject.clone(), headers, m.payload.clone())
                        .await
                    {
                        Ok(ack) => sent.push(Ok((ack, subject))),
                        Err(e) => {
                            if matches!(
                                e.kind(),
                                PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe
                            ) {
                                broken = Some(format!(
                                    "NATS at {}: {e}{}",
                                    self.config.server(),
                                    self.link_note()
                                ));
                            }
                            sent.push(Err(self.map_error(&e, &subject, m, lookups).await));
                        }
                    }
                }
            };
            if by_deadline(deadline, sending).await.is_none() {
                // cut mid-send: the message being handed over may have left,
                // the ones after it did not
                if sent.len() < chunk.len() {
                    sent.push(Err(PublishOutcome::transient(format!(
                        "NATS at {}: publish cut short by the batch's deadline (it may have been sent)",
                        self.config.server()
                    ))));
                }
                sent.resize_with(chunk.len(), || Err(PublishOutcome::NotSent));
            }
            // Ack timers start when awaited: await them together so a dead
            // server costs one `ack_timeout`, not one per message; and the
            // deadline with one timer for the chunk, not one per ack. Each
            // outcome lands in its slot as it comes, so a cut keeps them.
            let mut got: Vec<Option<PublishOutcome>> = vec![None; chunk.len()];
            let acks = join_all(sent.into_iter().zip(chunk).zip(got.iter_mut()).map(
                |((s, m), slot)| async move {
                    *slot = Some(match s {
                        Ok((ack, subject)) => match ack.await {
                            Ok(_) => PublishOutcome::Ok,
                            Err(e) => self.map_error(&e, &subject, m, lookups).await,
                        },
                        Err(outcome) => outcome,
                    });
                },
            ));
            let _ = by_deadline(deadline, acks).await;
            outcomes.extend(got.into_iter().map(|o| {
                o.unwrap_or_else(|| {
                    PublishOutcome::transient(format!(
                        "NATS at {}: no ack by the batch's deadline",
                        self.config.server()
                    ))
                })
            }));
        }
        outcomes
    }

    /// The outcome of a failed publish of `m` to `subject`. `lookups`
    /// holds, for the batch, the outcome of "no stream answered" per
    /// subject (see [`Inner::no_stream`]).
    async fn map_error(
        &self,
        e: &jetstream::context::PublishError,
        subject: &str,
        m: &Message,
        lookups: &Lookups,
    ) -> PublishOutcome {
        match e.kind() {
            PublishErrorKind::StreamNotFound => self.no_stream(subject, lookups).await,
            // Before the first connection the client checks sizes against
            // its built-in 1 MiB, not the server's max_payload (which may
            // be up to 64 MiB): only the server's own figure may dead-letter
            PublishErrorKind::MaxPayloadExceeded if self.client.server_info().max_payload == 0 => {
                PublishOutcome::transient(format!(
                    "NATS at {}: not connected yet, so the server's max_payload is not known; message of {} payload bytes plus headers is over the client's default of 1 MiB ({}){}",
                    self.config.server(),
                    m.payload.len(),
                    source_text(e),
                    self.link_note()
                ))
            }
            PublishErrorKind::MaxPayloadExceeded => PublishOutcome::rejected(format!(
                "message of {} payload bytes plus headers exceeds the NATS server's max_payload of {} bytes ({}); raise max_payload in the server configuration (at most 64 MiB)",
                m.payload.len(),
                self.client.server_info().max_payload,
                source_text(e),
            )),
            _ => {
                let code = e
                    .source()
                    .and_then(|s| s.downcast_ref::<jetstream::Error>())
                    .map(jetstream::Error::error_code);
                match code {
                    Some(code) if PERMANENT.contains(&code) => PublishOutcome::rejected(format!(
                        "JetStream refused the message on subject {subject:?}: {}",
                        source_text(e)
                    )),
                    _ => PublishOutcome::transient(format!(
                        "NATS publish to {subject:?} at {}: {e}{}{}",
                        self.config.server(),
                        source_suffix(e),
                        self.link_note()
                    )),
                }
            }
        }
    }

    /// The outcome for "no stream answered on `subject`" (the server said
    /// "no responders"), looked up once per subject and batch: a batch of
    /// 1,000 messages to a subject without a stream asks JetStream once,
    /// not 1,000 times. The other messages of that subject wait for its
    /// answer instead of asking too; other subjects are looked up beside it.
    async fn no_stream(&self, subject: &str, lookups: &Lookups) -> PublishOutcome {
        let answer = lookups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(subject.to_owned())
            .or_default()
            .clone();
        answer
            .get_or_init(|| self.who_captures(subject))
            .await
            .clone()
    }

    /// Asks JetStream which stream captures `subject` after a publish to it
    /// got "no responders": none is `Rejected`; one (JetStream still
    /// starting after a restart, or the stream just created) or no answer
    /// is `Transient`. With `create_stream`, the stream is first created
    /// again (it may have been deleted under us), so `Rejected` there means
    /// the configured stream exists and does not capture the subject:
    /// retrying could not change that.
    async fn who_captures(&self, subject: &str) -> PublishOutcome {
        if self.config.create_stream.is_some() {
            self.stream_ready.store(false, Ordering::Release);
            if let Err(reason) = self.ensure_stream().await {
                return PublishOutcome::transient(format!(
                    "no JetStream stream answered for subject {subject:?}: {reason}"
                ));
            }
        }
        match self.js.stream_by_subject(subject).await {
            Err(e) if matches!(e.kind(), GetStreamByNameErrorKind::NotFound) => {
                PublishOutcome::rejected(match &self.config.create_stream {
                    Some(spec) => format!(
                        "no JetStream stream captures subject {subject:?}, and stream {} (create_stream) does not: add the subject to that stream, or change subject_template or the topic",
                        spec.name
                    ),
                    None => format!(
                        "no JetStream stream captures subject {subject:?}: create a stream for it or set create_stream"
                    ),
                })
            }
            Ok(stream) => PublishOutcome::transient(format!(
                "stream {stream} captures subject {subject:?} but did not answer"
            )),
            Err(e) => PublishOutcome::transient(format!(
                "no JetStream stream answered for subject {subject:?}, and JetStream could not be asked which should ({e})"
            )),
        }
    }
}

/// A batch's answers to "which stream captures this subject", by subject
/// (see [`Inner::no_stream`]): one cell per subject, so that the messages of
/// one subject wait for its single lookup while other subjects' lookups run
/// beside it.
type Lookups = Mutex<HashMap<String, Arc<tokio::sync::OnceCell<PublishOutcome>>>>;

/// JetStream errors of a publish that no retry of the same message can
/// clear: the message (its size, or a precondition its own headers set)
/// or the stream's configuration is at fault, so they are `Rejected`.
///
/// Not here: the expected-last-sequence / last-message-id preconditions
/// (10070, 10071), since a producer may expect a message the outbox has not
/// published yet (an earlier row of another key) and a retry then
/// succeeds; 10164, the per-subject precondition refused because another
/// message to that subject is in flight; 10158, a duplicate still in
/// process. Those clear, or run out of attempts.
const PERMANENT: [ErrorCode; 7] = [
    ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM, // 10054: over max_msg_size
    ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM,  // 10097
    ErrorCode::STREAM_SEALED,                  // 10109
    ErrorCode::STREAM_NOT_MATCH,               // 10060: Nats-Expected-Stream
    ErrorCode(10165),                          // invalid Nats-TTL header
    ErrorCode(10166),                          // Nats-TTL on a stream without per-message TTL
    ErrorCode(10193), // Nats-Expected-Last-Subject-Sequence-Subject without the sequence
];

fn source_text(e: &jetstream::context::PublishError) -> String {
    e.source()
        .map_or_else(|| e.to_string(), ToString::to_string)
}

fn source_suffix(e: &jetstream::context::PublishError) -> String {
    e.source().map(|s| format!(" ({s})")).unwrap_or_default()
}

/// The NATS headers of `m`: its own headers, then [`KEY_HEADER`] and
/// `Nats-Msg-Id` (set last so a message header cannot override them).
fn headers_for(m: &Message) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    let mut put = |name: &str, value: &str| -> Result<(), String> {
        let n = HeaderName::from_str(name).map_err(|_| {
            format!(
                "header name {name:?} is not valid in NATS (ASCII, no ':' or control characters)"
            )
        })?;
        let v = HeaderValue::from_str(value)
            .map_err(|_| format!("header {name:?} has a value NATS cannot carry (CR or LF)"))?;
        headers.insert(n, v);
        Ok(())
    };
    for (name, value) in &m.headers {
        put(name, value)?;
    }
    if let Some(key) = &m.key {
        put(KEY_HEADER, key)?;
    }
    put("Nats-Msg-Id", &m.id.to_string())?;
    Ok(headers)
}

impl NatsPublisher {
    /// A publish in its `postbox.publish` span.
    fn traced(
        &self,
        batch: &[Message],
        deadline: Option<Instant>,
    ) -> impl Future<Output = Vec<PublishOutcome>> + Send {
        let span = postbox_core::publish_span("nats", batch);
        self.inner.publish(batch, deadline).instrument(span)
    }
}

impl Publisher for NatsPublisher {
    fn publish(&self, batch: &[Message]) -> impl Future<Output = Vec<PublishOutcome>> + Send {
        self.traced(batch, None)
    }

    fn publish_until(
        &self,
        batch: &[Message],
        deadline: Instant,
    ) -> impl Future<Output = Vec<PublishOutcome>> + Send {
        self.traced(batch, Some(deadline))
    }
}
