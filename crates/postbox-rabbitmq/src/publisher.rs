//! The AMQP publisher: confirm mode, mandatory, persistent.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use futures_util::future::join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind,
    ExchangeKind,
};
use postbox_core::{Message, PublishOutcome, Publisher, by_deadline};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::Instrument;

use crate::{RabbitMqConfig, RabbitMqError};

/// AMQP header carrying the postbox key of a keyed message (AMQP has no
/// key of its own). Keyless messages have no such header.
pub const KEY_HEADER: &str = "postbox-key";

/// Publishes to RabbitMQ with publisher confirms.
///
/// Each message is one `basic.publish` to [`RabbitMqConfig::exchange_for`]
/// with routing key [`RabbitMqConfig::routing_key_for`], `mandatory` set,
/// properties `message_id` = the message id, `delivery_mode` = 2
/// (persistent), `content_type` from a `content-type` header if there is
/// one, and headers = every message header as an AMQP long string plus
/// [`KEY_HEADER`]. All messages of a batch go out on one channel before any
/// confirm is awaited; one channel keeps their order.
///
/// Outcomes: `Ok` on the broker's ack (`basic.ack` after routing; a
/// persistent message on a durable queue is on disk by then). `Rejected`
/// when the broker returned the message as unroutable (`basic.return`: no
/// queue bound for that exchange and routing key), or when the exchange,
/// routing key or a header cannot be expressed in AMQP. `Transient` for a
/// `basic.nack`, a confirm that does not arrive within
/// `confirm_timeout_ms`, a lost connection or channel, or a broker that
/// cannot be reached.
///
/// The connection is opened on the first publish and again, with
/// exponential backoff, after it was lost; messages that were published but
/// not confirmed when it broke are `Transient` (the retry carries the same
/// `message_id`, so a consumer can drop the duplicate). Cheap to clone.
#[derive(Clone, Debug)]
pub struct RabbitMqPublisher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: RabbitMqConfig,
    link: Mutex<Link>,
    /// Exchanges seen to exist (passive declare), so each is checked once.
    exchanges: std::sync::Mutex<HashSet<String>>,
    /// Held by a batch from its first publish to its last confirm: the
    /// channel is then the batch's alone, so the returns its confirms carry
    /// are its own (see `publish`).
    publishing: Mutex<()>,
    /// A batch's publish was dropped (the relay's send timeout, shutdown)
    /// before its last confirm: the next batch opens a new channel, since
    /// the dropped batch's unanswered confirms could still take its returns.
    abandoned: AtomicBool,
}

/// Sets [`Inner::abandoned`] when dropped before [`Abandoned::finished`]:
/// the batch's publish was dropped while it waited for confirms.
struct Abandoned<'a>(Option<&'a AtomicBool>);

impl Abandoned<'_> {
    fn finished(mut self) {
        self.0 = None;
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if let Some(flag) = self.0 {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

/// The current connection and confirm-mode channel, or when to try again.
#[derive(Debug, Default)]
struct Link {
    open: Option<(Connection, Channel)>,
    failures: u32,
    retry_at: Option<Instant>,
}

impl RabbitMqPublisher {
    /// Builds the publisher without contacting the broker: it connects on
    /// the first publish, whose messages are `Transient` while RabbitMQ is
    /// unreachable. Errors only for a bad configuration.
    pub fn new(config: RabbitMqConfig) -> Result<Self, RabbitMqError> {
        config.validate()?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                link: Mutex::new(Link::default()),
                exchanges: std::sync::Mutex::new(HashSet::new()),
                publishing: Mutex::new(()),
                abandoned: AtomicBool::new(false),
            }),
        })
    }

    /// Like [`RabbitMqPublisher::new`], then opens the connection and the
    /// confirm-mode channel now, so a wrong address or password fails at
    /// start-up. Use [`RabbitMqPublisher::new`] where starting while
    /// RabbitMQ is down must work.
    pub async fn connect(config: RabbitMqConfig) -> Result<Self, RabbitMqError> {
        let publisher = Self::new(config)?;
        publisher
            .inner
            .channel()
            .await
            .map_err(|reason| RabbitMqError::Connect {
                server: publisher.inner.config.server(),
                reason,
            })?;
        Ok(publisher)
    }
}

impl Inner {
    /// The open confirm-mode channel, opening a connection if there is none
    /// (unless the backoff after a failure has not run out yet).
    async fn channel(&self) -> Result<Channel, String> {
        let mut link = self.link.lock().await;
        if let Some((conn, channel)) = &link.open {
            if conn.status().connected() && channel.status().connected() {
                return Ok(channel.clone());
            }
            tracing::debug!("RabbitMQ connection or channel lost; reconnecting");
            link.open = None;
        }
        if let Some(at) = link.retry_at {
            let now = Instant::now();
            if now < at {
                return Err(format!(
                    "RabbitMQ at {} unreachable; next connection attempt in {} ms",
                    self.config.server(),
                    (at - now).as_millis()
                ));
            }
        }
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        match tokio::time::timeout(timeout, self.open()).await {
            Ok(Ok((conn, channel))) => {
                link.open = Some((conn, channel.clone()));
                link.failures = 0;
                link.retry_at = None;
                Ok(channel)
            }
            failed => {
                let reason = match failed {
                    Ok(Err(e)) => format!(
                        "cannot connect to RabbitMQ at {}: {e}",
                        self.config.server()
                    ),
                    _ => format!(
                        "cannot connect to RabbitMQ at {} within {} ms",
                        self.config.server(),
                        self.config.connect_timeout_ms
                    ),
                };
                link.failures = link.failures.saturating_add(1);
                let backoff = Duration::from_millis(100)
                    .saturating_mul(1 << link.failures.min(16).saturating_sub(1))
                    .min(Duration::from_millis(self.config.max_backoff_ms));
                link.retry_at = Some(Instant::now() + backoff);
                // warn: a refused certificate or password shows here first
                tracing::warn!(%reason, backoff_ms = backoff.as_millis(), "RabbitMQ connect failed");
                Err(reason)
            }
        }
    }

    async fn open(&self) -> lapin::Result<(Connection, Channel)> {
        let conn = Connection::connect(&self.config.url, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok((conn, channel))
    }

    /// The exchanges of `batch` that do not exist. Publishing to a missing
    /// exchange makes the broker close the channel, failing every other
    /// message in flight on it, so each new exchange name is checked once
    /// with a passive declare on a channel of its own.
    async fn missing_exchanges(&self, batch: &[Message]) -> HashSet<String> {
        let unknown: BTreeSet<String> = {
            let known = self
                .exchanges
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            batch
                .iter()
                .map(|m| self.config.exchange_for(&m.topic))
                .filter(|x| !x.is_empty() && !known.contains(x))
                .collect()
        };
        let mut missing = HashSet::new();
        if unknown.is_empty() {
            return missing;
        }
        let link = self.link.lock().await;
        let Some((conn, _)) = &link.open else {
            return missing;
        };
        let timeout = Duration::from_millis(self.config.confirm_timeout_ms);
        for exchange in unknown {
            // too long: `destination` rejects it
            let Ok(name) = ShortString::try_new(exchange.as_str()) else {
                continue;
            };
            let Ok(Ok(probe)) = tokio::time::timeout(timeout, conn.create_channel()).await else {
                break;
            };
            let passive = ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let declared =
                probe.exchange_declare(name, ExchangeKind::Direct, passive, FieldTable::default());
            match tokio::time::timeout(timeout, declared).await {
                Ok(Ok(())) => {
                    self.exchanges
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(exchange);
                    let _ = tokio::time::timeout(timeout, probe.close(200, "ok".into())).await;
                }
                // the broker closed the probe channel itself
                Ok(Err(e)) if is_not_found(&e) => {
                    missing.insert(exchange);
                }
                // unknown: publish, and let the confirm tell
                _ => {}
            }
        }
        missing
    }

    /// Forgets `channel` (and its connection) so the next publish opens a new
    /// one; a no-op when the channel in use has another id. Channel ids
    /// repeat across connections (the first is usually 1), so this tells a
    /// replaced channel apart only because batches hold
    /// [`Inner::publishing`]: no other batch can have replaced it meanwhile.
    async fn drop_channel(&self, channel: &Channel) {
        let mut link = self.link.lock().await;
        let current = link
            .open
            .as_ref()
            .is_some_and(|(_, c)| c.id() == channel.id());
        if current && let Some((conn, _)) = link.open.take() {
            // an exchange deleted since it was checked closes the channel
            // too: check them all again on the new one
            self.exchanges
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
            // best effort, bounded: the peer may be gone
            let _ = tokio::time::timeout(
                Duration::from_millis(200),
                conn.close(320, "postbox: reconnecting".into()),
            )
            .await;
        }
    }

    /// Publishes `batch`; with the relay's `deadline`, what has not been
    /// handed to the channel by then is `NotSent` (the wait for an earlier
    /// batch's confirms, a connection being opened and the exchange checks
    /// count against it), and confirms still missing at it are `Transient`.
    async fn publish(&self, batch: &[Message], deadline: Option<Instant>) -> Vec<PublishOutcome> {
        if batch.is_empty() {
            return Vec::new();
        }
        let not_sent = || vec![PublishOutcome::NotSent; batch.len()];
        // lapin hands each `basic.return` to whichever confirm completes
        // next on the channel, whatever its delivery tag (and a multiple ack
        // completes its tags in no set order). A return always comes before
        // its own message's ack, so on a channel that only this batch uses,
        // its confirms together carry exactly its returns; which message
        // each belongs to is read from its `message_id` below.
        let Some(_exclusive) = by_deadline(deadline, self.publishing.lock()).await else {
            return not_sent();
        };
        if self.abandoned.swap(false, Ordering::Relaxed) {
            let open = self.link.lock().await.open.as_ref().map(|(_, c)| c.clone());
            if let Some(channel) = open {
                self.drop_channel(&channel).await;
            }
        }
        let channel = match by_deadline(deadline, self.channel()).await {
            None => return not_sent(),
            Some(Ok(c)) => c,
            Some(Err(reason)) => {
                return batch
                    .iter()
                    .map(|_| PublishOutcome::transient(reason.clone()))
                    .collect();
            }
        };
        let Some(missing) = by_deadline(deadline, self.missing_exchanges(batch)).await else {
            return not_sent();
        };
        let abandoned = Abandoned(Some(&self.abandoned));
        // Publish everything first; confirms come back while later messages
        // are still being written.
        let mut pending = Vec::with_capacity(batch.len());
        let mut broken: Option<String> = None;
        let mut late = false;
        for m in batch {
            // past the deadline (or after a send it cut) nothing more is
            // handed over
            late = late || deadline.is_some_and(|d| d <= Instant::now());
            if late {
                pending.push(Err(PublishOutcome::NotSent));
                continue;
            }
            if let Some(reason) = &broken {
                pending.push(Err(PublishOutcome::transient(reason.clone())));
                continue;
            }
            let (exchange, routing_key) = match self.destination(m) {
                Ok(d) => d,
                Err(reason) => {
                    pending.push(Err(PublishOutcome::rejected(reason)));
                    continue;
                }
            };
            if missing.contains(exchange.as_str()) {
                pending.push(Err(PublishOutcome::rejected(format!(
                    "exchange {:?} does not exist (for topic {:?}); declare it or fix the exchange template",
                    exchange.as_str(),
                    m.topic
                ))));
                continue;
            }
            let properties = match properties(m) {
                Ok(p) => p,
                Err(reason) => {
                    pending.push(Err(PublishOutcome::rejected(reason)));
                    continue;
                }
            };
            let options = BasicPublishOptions {
                mandatory: true,
                immediate: false,
            };
            // a broker that stops reading (a memory or disk alarm) holds the
            // write: the deadline cuts it, and the channel is given up
            let published = by_deadline(
                deadline,
                channel.basic_publish(
                    exchange.clone(),
                    routing_key.clone(),
                    options,
                    &m.payload,
                    properties,
                ),
            );
            match published.await {
                None => {
                    let reason = "RabbitMQ did not take the message by the relay's deadline";
                    broken = Some(reason.to_owned());
                    late = true;
                    pending.push(Err(PublishOutcome::transient(reason)));
                }
                Some(Ok(confirm)) => pending.push(Ok((confirm, exchange, routing_key))),
                Some(Err(e)) => {
                    let reason = format!("RabbitMQ publish failed: {e}");
                    broken = Some(reason.clone());
                    pending.push(Err(PublishOutcome::transient(reason)));
                }
            }
        }
        let confirms_by = Instant::now() + Duration::from_millis(self.config.confirm_timeout_ms);
        let confirms_until = deadline.map_or(confirms_by, |d| d.min(confirms_by));
        // per message: its confirm, or its outcome and whether the channel
        // is to be dropped
        type Confirmed = Result<(Confirmation, ShortString, ShortString), (PublishOutcome, bool)>;
        let confirms: Vec<Confirmed> = join_all(pending.into_iter().map(|p| async move {
            let (confirm, exchange, routing_key) = p.map_err(|outcome| (outcome, false))?;
            match tokio::time::timeout_at(confirms_until, confirm).await {
                Ok(Ok(c)) => Ok((c, exchange, routing_key)),
                Ok(Err(e)) => Err((
                    PublishOutcome::transient(format!("RabbitMQ confirm failed: {e}")),
                    true,
                )),
                Err(_) if confirms_until < confirms_by => Err((
                    PublishOutcome::transient("no confirm from RabbitMQ by the relay's deadline"),
                    true,
                )),
                Err(_) => Err((
                    PublishOutcome::transient(format!(
                        "no confirm from RabbitMQ within {} ms",
                        self.config.confirm_timeout_ms
                    )),
                    true,
                )),
            }
        }))
        .await;
        // the returns this batch's confirms carried, by message id
        let mut returned: HashMap<String, (u16, String)> = HashMap::new();
        for (c, _, _) in confirms.iter().flatten() {
            if let Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)) = c
                && let Some(id) = r.delivery.properties.message_id()
            {
                returned.insert(id.to_string(), (r.reply_code, r.reply_text.to_string()));
            }
        }
        let outcomes: Vec<(PublishOutcome, bool)> = confirms
            .into_iter()
            .zip(batch)
            .map(|(c, m)| match c {
                Err(outcome_lost) => outcome_lost,
                Ok((Confirmation::Ack(_), exchange, routing_key)) => {
                    match returned.get(&m.id.to_string()) {
                        Some((code, text)) => (
                            PublishOutcome::rejected(format!(
                                "unroutable: exchange {:?} routing key {:?} ({code} {text})",
                                exchange.as_str(),
                                routing_key.as_str(),
                            )),
                            false,
                        ),
                        None => (PublishOutcome::Ok, false),
                    }
                }
                Ok((Confirmation::Nack(_), _, _)) => (
                    PublishOutcome::transient(
                        "RabbitMQ nacked the message (it could not store it)",
                    ),
                    false,
                ),
                Ok((Confirmation::NotRequested, _, _)) => (
                    PublishOutcome::transient("channel is not in confirm mode"),
                    true,
                ),
            })
            .collect();
        abandoned.finished();
        if broken.is_some() || outcomes.iter().any(|(_, lost)| *lost) {
            self.drop_channel(&channel).await;
        }
        outcomes.into_iter().map(|(o, _)| o).collect()
    }

    fn destination(&self, m: &Message) -> Result<(ShortString, ShortString), String> {
        let exchange = self.config.exchange_for(&m.topic);
        let routing_key = self.config.routing_key_for(&m.topic);
        let exchange = ShortString::try_new(exchange)
            .map_err(|e| format!("exchange for topic {:?}: {e}", m.topic))?;
        let routing_key = ShortString::try_new(routing_key)
            .map_err(|e| format!("routing key for topic {:?}: {e}", m.topic))?;
        Ok((exchange, routing_key))
    }
}

/// The AMQP properties of `m`.
fn properties(m: &Message) -> Result<BasicProperties, String> {
    let mut headers = FieldTable::default();
    for (name, value) in &m.headers {
        let key = ShortString::try_new(name.as_str())
            .map_err(|e| format!("header name {:?}: {e}", truncate(name)))?;
        headers.insert(key, AMQPValue::LongString(LongString::from(value.as_str())));
    }
    if let Some(key) = &m.key {
        headers.insert(
            ShortString::from(KEY_HEADER),
            AMQPValue::LongString(LongString::from(key.as_str())),
        );
    }
    let mut properties = BasicProperties::default()
        .with_message_id(ShortString::from(m.id.to_string()))
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(ct) = m.headers.get("content-type")
        && let Ok(ct) = ShortString::try_new(ct.as_str())
    {
        properties = properties.with_content_type(ct);
    }
    Ok(properties)
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl Publisher for RabbitMqPublisher {
    fn publish(&self, batch: &[Message]) -> impl Future<Output = Vec<PublishOutcome>> + Send {
        let span = postbox_core::publish_span("rabbitmq", batch);
        self.inner.publish(batch, None).instrument(span)
    }

    fn publish_until(
        &self,
        batch: &[Message],
        deadline: Instant,
    ) -> impl Future<Output = Vec<PublishOutcome>> + Send {
        let span = postbox_core::publish_span("rabbitmq", batch);
        self.inner.publish(batch, Some(deadline)).instrument(span)
    }
}
