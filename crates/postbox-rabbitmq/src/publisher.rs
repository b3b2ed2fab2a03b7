//! The AMQP publisher: confirm mode, mandatory, persistent.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use futures_util::future::join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::{AMQPError, AMQPErrorKind};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind,
    ExchangeKind, PublisherConfirm,
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
/// A message the broker answers with a channel error closes the channel
/// under every unconfirmed message of the batch, and the close does not
/// say which message caused it. Those messages are then published again
/// one at a time, each confirm awaited before the next, within the relay's
/// deadline (what cannot start by it is `NotSent`): the batch-mates are
/// `Ok`, and the one that closes the channel again is `Rejected` for
/// `406 PRECONDITION_FAILED` (e.g. a body over `max_message_size`, with
/// the broker's reply text) and `404 NOT_FOUND` (an exchange deleted after
/// it was checked, which is then checked again next time), `Transient`
/// for `403 ACCESS_REFUSED` (an operator can grant the permission) and
/// anything else. A message the broker stored before it closed the channel
/// is then stored twice, with the same `message_id`.
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
        if let Some((conn, channel)) = link.open.as_mut() {
            if conn.status().connected() {
                if channel.status().connected() {
                    return Ok(channel.clone());
                }
                // The broker closed the channel (a channel error such as an
                // oversized message), not the connection: a new channel is
                // one round trip and keeps the exchanges checked on it.
                let timeout = Duration::from_millis(self.config.connect_timeout_ms);
                if let Ok(Ok(fresh)) = tokio::time::timeout(timeout, confirm_channel(conn)).await {
                    tracing::debug!("RabbitMQ closed the channel; opened a new one");
                    *channel = fresh.clone();
                    return Ok(fresh);
                }
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
        let channel = confirm_channel(&conn).await?;
        Ok((conn, channel))
    }

    /// The exchanges of `batch` that do not exist. Publishing to a missing
    /// exchange makes the broker close the channel under every other
    /// message in flight on it (which then go again one at a time), so each
    /// new exchange name is checked once with a passive declare on a
    /// channel of its own.
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
        // the deadline cut a send: the broker stopped reading
        let mut stalled = false;
        for m in batch {
            // past the deadline (or after a send it cut) nothing more is
            // handed over
            late = late || deadline.is_some_and(|d| d <= Instant::now());
            if late {
                pending.push(Err(Unconfirmed::settled(PublishOutcome::NotSent)));
                continue;
            }
            if let Some(reason) = &broken {
                pending.push(Err(Unconfirmed::cut_off(reason.clone(), None)));
                continue;
            }
            let (exchange, routing_key) = match self.destination(m) {
                Ok(d) => d,
                Err(reason) => {
                    pending.push(Err(Unconfirmed::settled(PublishOutcome::rejected(reason))));
                    continue;
                }
            };
            if missing.contains(exchange.as_str()) {
                pending.push(Err(Unconfirmed::settled(PublishOutcome::rejected(
                    format!(
                        "exchange {:?} does not exist (for topic {:?}); declare it or fix the exchange template",
                        exchange.as_str(),
                        m.topic
                    ),
                ))));
                continue;
            }
            let properties = match properties(m) {
                Ok(p) => p,
                Err(reason) => {
                    pending.push(Err(Unconfirmed::settled(PublishOutcome::rejected(reason))));
                    continue;
                }
            };
            // the deadline cutting the write gives the channel up
            match send(&channel, &exchange, &routing_key, m, properties, deadline).await {
                None => {
                    let reason = "RabbitMQ did not take the message by the relay's deadline";
                    broken = Some(reason.to_owned());
                    late = true;
                    stalled = true;
                    pending.push(Err(Unconfirmed::settled(PublishOutcome::transient(reason))));
                }
                Some(Ok(confirm)) => pending.push(Ok((confirm, exchange, routing_key))),
                Some(Err(e)) => {
                    // the channel closed under the batch: later messages are
                    // not handed over, and may go again alone (see below)
                    let reason = format!("RabbitMQ publish failed: {e}");
                    broken = Some(reason.clone());
                    pending.push(Err(Unconfirmed::cut_off(reason, channel_error(&e))));
                }
            }
        }
        let (confirms_by, confirms_until) = self.confirms_by(deadline);
        // per message: its confirm, or why there is none
        type Confirmed = Result<(Confirmation, ShortString, ShortString), Unconfirmed>;
        let confirms: Vec<Confirmed> = join_all(pending.into_iter().map(|p| async move {
            let (confirm, exchange, routing_key) = p?;
            match tokio::time::timeout_at(confirms_until, confirm).await {
                Ok(Ok(c)) => Ok((c, exchange, routing_key)),
                // the channel closed before this message's confirm: the
                // broker may or may not have taken it
                Ok(Err(e)) => Err(Unconfirmed {
                    lost: true,
                    ..Unconfirmed::cut_off(
                        format!("RabbitMQ confirm failed: {e}"),
                        channel_error(&e),
                    )
                }),
                Err(_) if confirms_until < confirms_by => Err(Unconfirmed::lost(
                    "no confirm from RabbitMQ by the relay's deadline".to_owned(),
                )),
                Err(_) => Err(Unconfirmed::lost(format!(
                    "no confirm from RabbitMQ within {} ms",
                    self.config.confirm_timeout_ms
                ))),
            }
        }))
        .await;
        // The broker closed the channel with a channel error (not a lost
        // connection): one message of the batch caused it, and which one
        // the close does not say. The messages it cut off go again alone.
        let closed_by = confirms
            .iter()
            .find_map(|c| c.as_ref().err()?.closed_by.clone());
        let again: Vec<usize> = match closed_by {
            Some(_) if !stalled => confirms
                .iter()
                .enumerate()
                .filter(|(_, c)| matches!(c, Err(u) if u.cut_off))
                .map(|(i, _)| i)
                .collect(),
            _ => Vec::new(),
        };
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
                Err(u) => (u.outcome, u.lost),
                Ok((Confirmation::Ack(_), exchange, routing_key)) => {
                    match returned.get(&m.id.to_string()) {
                        Some((code, text)) => {
                            (unroutable(&exchange, &routing_key, *code, text), false)
                        }
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
        let lost = broken.is_some() || outcomes.iter().any(|(_, lost)| *lost);
        let mut outcomes: Vec<PublishOutcome> = outcomes.into_iter().map(|(o, _)| o).collect();
        if let Some(error) = closed_by.filter(|_| !stalled) {
            tracing::warn!(
                reply_code = error.get_id(),
                reply_text = error.get_message().as_str(),
                postbox.again = again.len(),
                "RabbitMQ closed the channel; publishing the messages it cut off one at a time"
            );
            // the connection is fine: `channel()` opens a new channel on it
            self.publish_alone(batch, &again, &mut outcomes, deadline)
                .await;
        } else if lost {
            self.drop_channel(&channel).await;
        }
        abandoned.finished();
        outcomes
    }

    /// Publishes `batch[i]` for each `i` of `again` once more, alone: each
    /// on a working channel, its confirm awaited before the next is sent,
    /// so a message that makes the broker close the channel again is known
    /// and gets the outcome its error deserves ([`Inner::refused`]), while
    /// the others go through. What cannot start by `deadline` is `NotSent`.
    ///
    /// A batch holds at most one message per key, so this keeps the order
    /// per key. A message the broker took before it closed the channel (its
    /// confirm lost with the channel) is stored twice; the retry carries the
    /// same `message_id`, as after a lost connection.
    async fn publish_alone(
        &self,
        batch: &[Message],
        again: &[usize],
        outcomes: &mut [PublishOutcome],
        deadline: Option<Instant>,
    ) {
        for (n, &i) in again.iter().enumerate() {
            let channel = match by_deadline(deadline, self.channel()).await {
                Some(Ok(c)) if deadline.is_none_or(|d| d > Instant::now()) => c,
                Some(Err(reason)) => {
                    for &j in &again[n..] {
                        outcomes[j] = PublishOutcome::transient(reason.clone());
                    }
                    return;
                }
                // not started by the deadline: given back untouched
                _ => {
                    for &j in &again[n..] {
                        outcomes[j] = PublishOutcome::NotSent;
                    }
                    return;
                }
            };
            let (outcome, lost) = self.publish_one(&channel, &batch[i], deadline).await;
            outcomes[i] = outcome;
            if lost {
                // a lost connection or a missing confirm: the rest keep the
                // batch's `Transient` (or `NotSent` past the deadline)
                self.drop_channel(&channel).await;
                if deadline.is_some_and(|d| d <= Instant::now()) {
                    for &j in &again[n + 1..] {
                        outcomes[j] = PublishOutcome::NotSent;
                    }
                }
                return;
            }
        }
    }

    /// Publishes `m` alone on `channel` and awaits its confirm: its outcome,
    /// and whether the channel is to be given up. A channel error the broker
    /// answers with closes `channel` (the next [`Inner::channel`] opens a
    /// new one) and is this message's alone.
    async fn publish_one(
        &self,
        channel: &Channel,
        m: &Message,
        deadline: Option<Instant>,
    ) -> (PublishOutcome, bool) {
        // both worked when the batch published it
        let (exchange, routing_key) = match self.destination(m) {
            Ok(d) => d,
            Err(reason) => return (PublishOutcome::rejected(reason), false),
        };
        let properties = match properties(m) {
            Ok(p) => p,
            Err(reason) => return (PublishOutcome::rejected(reason), false),
        };
        let confirm = match send(channel, &exchange, &routing_key, m, properties, deadline).await {
            None => {
                let reason = "RabbitMQ did not take the message by the relay's deadline";
                return (PublishOutcome::transient(reason), true);
            }
            Some(Err(e)) => match channel_error(&e) {
                Some(error) => return (self.refused(m, &exchange, error), false),
                None => {
                    let reason = format!("RabbitMQ publish failed: {e}");
                    return (PublishOutcome::transient(reason), true);
                }
            },
            Some(Ok(confirm)) => confirm,
        };
        let (confirms_by, confirms_until) = self.confirms_by(deadline);
        match tokio::time::timeout_at(confirms_until, confirm).await {
            // alone on the channel: a return is this message's own
            Ok(Ok(Confirmation::Ack(Some(r)))) => (
                unroutable(&exchange, &routing_key, r.reply_code, r.reply_text.as_str()),
                false,
            ),
            Ok(Ok(Confirmation::Ack(None))) => (PublishOutcome::Ok, false),
            Ok(Ok(Confirmation::Nack(_))) => (
                PublishOutcome::transient("RabbitMQ nacked the message (it could not store it)"),
                false,
            ),
            Ok(Ok(Confirmation::NotRequested)) => (
                PublishOutcome::transient("channel is not in confirm mode"),
                true,
            ),
            Ok(Err(e)) => match channel_error(&e) {
                Some(error) => (self.refused(m, &exchange, error), false),
                None => (
                    PublishOutcome::transient(format!("RabbitMQ confirm failed: {e}")),
                    true,
                ),
            },
            Err(_) if confirms_until < confirms_by => (
                PublishOutcome::transient("no confirm from RabbitMQ by the relay's deadline"),
                true,
            ),
            Err(_) => (
                PublishOutcome::transient(format!(
                    "no confirm from RabbitMQ within {} ms",
                    self.config.confirm_timeout_ms
                )),
                true,
            ),
        }
    }

    /// The outcome of `m`, which alone made the broker close the channel
    /// with `error`.
    fn refused(&self, m: &Message, exchange: &ShortString, error: &AMQPError) -> PublishOutcome {
        let code = error.get_id();
        let text = error.get_message().as_str();
        tracing::warn!(
            postbox.id = %m.id,
            postbox.topic = m.topic.as_str(),
            reply_code = code,
            reply_text = text,
            "RabbitMQ closed the channel on this message"
        );
        match code {
            // the message itself is wrong (over `max_message_size`, a bad
            // property): sending it again cannot help
            406 => {
                PublishOutcome::rejected(format!("RabbitMQ refused the message ({code} {text})"))
            }
            // on basic.publish only the exchange can be missing: deleted
            // after the passive declare found it, so check it again next time
            404 => {
                self.exchanges
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(exchange.as_str());
                PublishOutcome::rejected(format!(
                    "exchange {:?} does not exist (for topic {:?}; {code} {text}); declare it or fix the exchange template",
                    exchange.as_str(),
                    m.topic
                ))
            }
            // an operator can grant the permission, and a permission
            // missing for a while should not dead-letter (and park) keys
            403 => PublishOutcome::transient(format!(
                "RabbitMQ refused the message ({code} {text}); give postbox's user write permission on exchange {:?}",
                exchange.as_str()
            )),
            _ => PublishOutcome::transient(format!("RabbitMQ closed the channel ({code} {text})")),
        }
    }

    /// When confirms of messages sent now are due: after `confirm_timeout_ms`
    /// (the first), or by the relay's `deadline` if that comes sooner (the
    /// second, the one to wait until).
    fn confirms_by(&self, deadline: Option<Instant>) -> (Instant, Instant) {
        let by = Instant::now() + Duration::from_millis(self.config.confirm_timeout_ms);
        (by, deadline.map_or(by, |d| d.min(by)))
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

/// Every message is `mandatory`, so an unroutable one comes back.
const PUBLISH: BasicPublishOptions = BasicPublishOptions {
    mandatory: true,
    immediate: false,
};

/// Why a message of a batch has no confirm to read.
struct Unconfirmed {
    outcome: PublishOutcome,
    /// The channel is given up after the batch.
    lost: bool,
    /// The channel stopped under the message (its publish or its confirm
    /// failed, or it was not handed over after an earlier publish failed):
    /// it goes again alone if the broker closed the channel.
    cut_off: bool,
    /// The channel error the broker closed the channel with, as this
    /// message's publish or confirm reported it.
    closed_by: Option<AMQPError>,
}

impl Unconfirmed {
    fn settled(outcome: PublishOutcome) -> Self {
        Self {
            outcome,
            lost: false,
            cut_off: false,
            closed_by: None,
        }
    }

    fn lost(reason: String) -> Self {
        Self {
            lost: true,
            ..Self::settled(PublishOutcome::transient(reason))
        }
    }

    fn cut_off(reason: String, closed_by: Option<&AMQPError>) -> Self {
        Self {
            outcome: PublishOutcome::transient(reason),
            lost: false,
            cut_off: true,
            closed_by: closed_by.cloned(),
        }
    }
}

/// The channel error in `e`: lapin 4 fails every confirm pending on a
/// channel the broker closed with `ProtocolError` of a soft (channel-level)
/// AMQP error, e.g. `406 PRECONDITION_FAILED - message size 134217729 is
/// larger than configured max size 134217728` or `404 NOT_FOUND - no
/// exchange 'x' in vhost '/'`. A connection the broker closed is a hard
/// error; a lost connection an IO error; both are `None`.
fn channel_error(e: &lapin::Error) -> Option<&AMQPError> {
    match e.kind() {
        ErrorKind::ProtocolError(error) if matches!(error.kind(), AMQPErrorKind::Soft(_)) => {
            Some(error)
        }
        _ => None,
    }
}

/// The outcome of a message the broker returned (`basic.return`).
fn unroutable(
    exchange: &ShortString,
    routing_key: &ShortString,
    code: u16,
    text: &str,
) -> PublishOutcome {
    PublishOutcome::rejected(format!(
        "unroutable: exchange {:?} routing key {:?} ({code} {text})",
        exchange.as_str(),
        routing_key.as_str(),
    ))
}

/// A new channel on `conn`, in confirm mode.
async fn confirm_channel(conn: &Connection) -> lapin::Result<Channel> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
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

/// Hands `m` to `channel` for `exchange` and `routing_key`; `None` when
/// `deadline` came first (a broker that stops reading, under a memory or
/// disk alarm, holds the write).
async fn send(
    channel: &Channel,
    exchange: &ShortString,
    routing_key: &ShortString,
    m: &Message,
    properties: BasicProperties,
    deadline: Option<Instant>,
) -> Option<lapin::Result<PublisherConfirm>> {
    by_deadline(
        deadline,
        channel.basic_publish(
            exchange.clone(),
            routing_key.clone(),
            PUBLISH,
            &m.payload,
            properties,
        ),
    )
    .await
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
