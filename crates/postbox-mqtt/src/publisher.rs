//! The MQTT publisher and the task that drives its connection.
//!
//! rumqttc's `AsyncClient::publish` only queues a request; the `EventLoop`
//! assigns the packet id when it writes the PUBLISH, and reports it as
//! `Event::Outgoing(Outgoing::Publish(pkid))`, strictly in request order.
//! So the driver keeps the waiters of queued publishes in a FIFO, moves
//! each to a `pkid → waiter` map when its PUBLISH is written, and completes
//! it when the PUBACK with that pkid arrives. A message is `Ok` only on its
//! own PUBACK.
//!
//! On any connection error every waiting message becomes `Transient`, and
//! the event loop's own retransmission state (pending publishes, buffered
//! events, queued requests) is cleared under the same lock, so nothing that
//! was reported `Transient` is sent later under a packet id the FIFO no
//! longer expects. The relay retries those messages; the broker may then
//! see one twice (at least once; consumers deduplicate on `postbox-id`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use postbox_core::{Message, PublishOutcome, Publisher};
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAck, PubAckReason, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{MqttConfig, MqttError};

/// User property carrying the message id.
pub const ID_PROPERTY: &str = "postbox-id";
/// User property carrying the ordering key (only for keyed messages).
pub const KEY_PROPERTY: &str = "postbox-key";

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

type Waiter = oneshot::Sender<PublishOutcome>;

#[derive(Default)]
struct Tracker {
    /// Publishes handed to rumqttc, in request order, not yet written.
    unsent: VecDeque<Waiter>,
    /// Written publishes waiting for their PUBACK, by packet id.
    inflight: HashMap<u16, Waiter>,
}

impl Tracker {
    fn fail_all(&mut self, reason: &str) {
        let n = self.unsent.len() + self.inflight.len();
        for w in self
            .unsent
            .drain(..)
            .chain(self.inflight.drain().map(|(_, w)| w))
        {
            let _ = w.send(PublishOutcome::transient(reason));
        }
        if n > 0 {
            tracing::debug!(
                messages = n,
                reason,
                "unacknowledged MQTT publishes are transient"
            );
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Link {
    Connecting,
    Up,
    Down(String),
}

struct Shared {
    tracker: Mutex<Tracker>,
    /// Asks the driver to drop the connection (a batch saw no PUBACK in time).
    reset: Notify,
    link: watch::Sender<Link>,
    /// The broker's maximum packet size from CONNACK; 0 when it set none.
    broker_max_packet: AtomicU32,
}

impl Shared {
    fn tracker(&self) -> MutexGuard<'_, Tracker> {
        // a panic while holding this lock cannot leave it half-updated in a
        // way that matters more than losing the process: keep going
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Publishes to an MQTT broker with MQTT 5, QoS 1.
///
/// Each message: topic from [`MqttConfig::mqtt_topic`], the payload bytes
/// as they are, user properties `postbox-id` (the message id),
/// `postbox-key` (when keyed) and one per message header (name and value as
/// they are), and the `content-type` header also as the MQTT 5 content type.
/// A message is `Ok` only when the PUBACK with its own packet id arrives
/// with a success reason code.
///
/// One connection per publisher, opened and re-opened in the background
/// with exponential backoff (100 ms to 5 s). Clean start: no session state
/// is kept across reconnects; whatever was unacknowledged when a connection
/// broke is `Transient` and the relay retries it. In flight at once: at most
/// the broker's receive maximum (Mosquitto: 20 by default). Cheap to clone;
/// the connection closes when the last clone is dropped.
#[derive(Clone)]
pub struct MqttPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    client: AsyncClient,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    config: MqttConfig,
    addr: String,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl std::fmt::Debug for MqttPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttPublisher")
            .field("addr", &self.inner.addr)
            .finish_non_exhaustive()
    }
}

impl MqttPublisher {
    /// Builds the publisher and starts connecting in the background; never
    /// waits and never fails because the broker is down (publishes are
    /// `Transient` until it is up). Must be called inside a tokio runtime.
    pub fn new(config: MqttConfig) -> Result<Self, MqttError> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            MqttError::invalid(
                "runtime",
                "MqttPublisher::new must be called inside a tokio runtime",
            )
        })?;
        let addr = format!("{}:{}", config.host, config.port());
        let client_id = config.client_id.clone().unwrap_or_else(|| {
            let suffix: String = (0..12).map(|_| fastrand::alphanumeric()).collect();
            format!("postbox-{suffix}")
        });
        let mut options = MqttOptions::new(client_id, config.host.clone(), config.port());
        options
            .set_keep_alive(Duration::from_secs(config.keep_alive_secs))
            .set_clean_start(true)
            .set_connection_timeout(config.connect_timeout_secs.max(1));
        if let Some(user) = &config.username {
            options.set_credentials(user.clone(), config.password.clone().unwrap_or_default());
        }
        if config.tls {
            let tls = crate::tls::client_config(config.ca_file.as_deref())
                .map_err(|(field, reason)| MqttError::invalid(field, reason))?;
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
            ));
        }
        let (client, eventloop) = AsyncClient::new(options, config.queue_capacity);
        let (link, _) = watch::channel(Link::Connecting);
        let shared = Arc::new(Shared {
            tracker: Mutex::new(Tracker::default()),
            reset: Notify::new(),
            link,
            broker_max_packet: AtomicU32::new(0),
        });
        let cancel = CancellationToken::new();
        runtime.spawn(drive(
            eventloop,
            Arc::clone(&shared),
            cancel.clone(),
            addr.clone(),
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                shared,
                cancel,
                config,
                addr,
            }),
        })
    }

    /// Builds the publisher and waits until the broker has accepted the
    /// connection (CONNACK), up to the connect timeout. Use
    /// [`MqttPublisher::new`] where starting while the broker is down must
    /// work.
    pub async fn connect(config: MqttConfig) -> Result<Self, MqttError> {
        let timeout = Duration::from_secs(config.connect_timeout_secs.max(1));
        let publisher = Self::new(config)?;
        let mut link = publisher.inner.shared.link.subscribe();
        let mut last = String::from("no answer");
        let waited = tokio::time::timeout(timeout, async {
            loop {
                match &*link.borrow_and_update() {
                    Link::Up => return true,
                    Link::Down(reason) => last = reason.clone(),
                    Link::Connecting => {}
                }
                if link.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await;
        match waited {
            Ok(true) => Ok(publisher),
            _ => Err(MqttError::Connect {
                addr: publisher.inner.addr.clone(),
                reason: last,
            }),
        }
    }

    /// Publishes `batch`, waiting for its PUBACKs until `ack_timeout_ms`
    /// or the relay's `deadline`, whichever comes first.
    async fn publish_batch(
        &self,
        batch: &[Message],
        deadline: Option<Instant>,
    ) -> Vec<PublishOutcome> {
        let inner = &self.inner;
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return vec![PublishOutcome::NotSent; batch.len()];
        }
        let mut outcomes: Vec<Option<PublishOutcome>> = vec![None; batch.len()];
        let mut waits = Vec::with_capacity(batch.len());
        let broker_max = inner.shared.broker_max_packet.load(Ordering::Relaxed);
        {
            // Queue every publish (pipelined) while holding the tracker, so
            // the FIFO order is the request-channel order.
            let mut tracker = inner.shared.tracker();
            for (i, m) in batch.iter().enumerate() {
                let topic = match inner.config.mqtt_topic(&m.topic) {
                    Ok(t) => t,
                    Err(reason) => {
                        outcomes[i] = Some(PublishOutcome::rejected(reason));
                        continue;
                    }
                };
                let props = properties(m);
                if let Some(reason) = too_large(
                    m,
                    &topic,
                    &props,
                    inner.config.max_payload_bytes,
                    broker_max,
                ) {
                    outcomes[i] = Some(PublishOutcome::rejected(reason));
                    continue;
                }
                let (tx, rx) = oneshot::channel();
                tracker.unsent.push_back(tx);
                match inner.client.try_publish_with_properties(
                    topic,
                    QoS::AtLeastOnce,
                    inner.config.retain,
                    m.payload.clone(),
                    props,
                ) {
                    Ok(()) => waits.push((i, rx)),
                    Err(_) => {
                        tracker.unsent.pop_back();
                        outcomes[i] = Some(PublishOutcome::transient(format!(
                            "MQTT publish queue is full ({} messages) or the connection task stopped",
                            inner.config.queue_capacity
                        )));
                    }
                }
            }
        }
        let ack_timeout = Duration::from_millis(inner.config.ack_timeout_ms);
        let acks_by = Instant::now() + ack_timeout;
        // the relay's deadline may come first: what is unacknowledged then
        // is `Transient` (it may still arrive), the connection kept
        let wait_until = deadline.map_or(acks_by, |d| d.min(acks_by));
        let mut timed_out = 0usize;
        for (i, rx) in waits {
            outcomes[i] = Some(match tokio::time::timeout_at(wait_until, rx).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(_)) => PublishOutcome::transient("the MQTT connection task stopped"),
                Err(_) if wait_until < acks_by => PublishOutcome::transient(format!(
                    "no PUBACK from {} by the relay's deadline",
                    inner.addr
                )),
                Err(_) => {
                    timed_out += 1;
                    PublishOutcome::transient(format!(
                        "no PUBACK from {} within {} ms",
                        inner.addr, inner.config.ack_timeout_ms
                    ))
                }
            });
        }
        if timed_out > 0 {
            tracing::warn!(
                broker = %inner.addr,
                messages = timed_out,
                "no PUBACK in time; dropping the MQTT connection to start afresh"
            );
            inner.shared.reset.notify_one();
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| PublishOutcome::transient("internal: no outcome")))
            .collect()
    }
}

impl Publisher for MqttPublisher {
    fn publish(&self, batch: &[Message]) -> impl Future<Output = Vec<PublishOutcome>> + Send {
        let span = postbox_core::publish_span("mqtt", batch);
        self.publish_batch(batch, None).instrument(span)
    }

    fn publish_until(
        &self,
        batch: &[Message],
        deadline: Instant,
    ) -> impl Future<Output = Vec<PublishOutcome>> + Send {
        let span = postbox_core::publish_span("mqtt", batch);
        self.publish_batch(batch, Some(deadline)).instrument(span)
    }
}

fn properties(m: &Message) -> PublishProperties {
    let mut user = Vec::with_capacity(m.headers.len() + 2);
    user.push((ID_PROPERTY.to_owned(), m.id.to_string()));
    if let Some(key) = &m.key {
        user.push((KEY_PROPERTY.to_owned(), key.clone()));
    }
    for (k, v) in &m.headers {
        if k == ID_PROPERTY || k == KEY_PROPERTY {
            continue; // set by postbox above
        }
        user.push((k.clone(), v.clone()));
    }
    PublishProperties {
        user_properties: user,
        content_type: m
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.clone()),
        ..Default::default()
    }
}

/// Why a message is too large to publish, if it is.
fn too_large(
    m: &Message,
    topic: &str,
    props: &PublishProperties,
    max_payload: usize,
    broker_max_packet: u32,
) -> Option<String> {
    if m.payload.len() > max_payload {
        return Some(format!(
            "payload of {} bytes exceeds max_payload_bytes = {max_payload}",
            m.payload.len()
        ));
    }
    if broker_max_packet > 0 {
        // fixed header, topic, packet id, properties, payload
        let props_len: usize = props
            .user_properties
            .iter()
            .map(|(k, v)| 5 + k.len() + v.len())
            .sum::<usize>()
            + props.content_type.as_ref().map_or(0, |c| 3 + c.len());
        let size = 5 + 2 + topic.len() + 2 + 4 + props_len + m.payload.len();
        if size > broker_max_packet as usize {
            return Some(format!(
                "PUBLISH of about {size} bytes exceeds the broker's maximum packet size of {broker_max_packet} bytes"
            ));
        }
    }
    None
}

fn ack_outcome(ack: &PubAck) -> PublishOutcome {
    let reason = |what: &str| {
        let detail = ack
            .properties
            .as_ref()
            .and_then(|p| p.reason_string.as_deref())
            .map(|s| format!(": {s}"))
            .unwrap_or_default();
        format!("broker answered PUBACK {what}{detail}")
    };
    match ack.reason {
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => PublishOutcome::Ok,
        // an ACL an operator can fix: retried, not dead-lettered
        PubAckReason::NotAuthorized => PublishOutcome::transient(reason("not authorized")),
        PubAckReason::TopicNameInvalid => PublishOutcome::rejected(reason("topic name invalid")),
        PubAckReason::PayloadFormatInvalid => {
            PublishOutcome::rejected(reason("payload format invalid"))
        }
        PubAckReason::QuotaExceeded => PublishOutcome::transient(reason("quota exceeded")),
        PubAckReason::PacketIdentifierInUse => {
            PublishOutcome::transient(reason("packet identifier in use"))
        }
        PubAckReason::UnspecifiedError => PublishOutcome::transient(reason("unspecified error")),
        PubAckReason::ImplementationSpecificError => {
            PublishOutcome::transient(reason("implementation-specific error"))
        }
    }
}

/// Owns the event loop: matches packet ids to waiters, reconnects with
/// backoff, and fails every waiter on a connection error.
async fn drive(
    mut eventloop: EventLoop,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    addr: String,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let event = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            () = shared.reset.notified() => Err((String::from("no PUBACK in time; reconnecting"), false)),
            event = eventloop.poll() => event.map_err(|e| (e.to_string(), true)),
        };
        match event {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let mut t = shared.tracker();
                if let Some(w) = t.unsent.pop_front() {
                    t.inflight.insert(pkid, w);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let waiter = shared.tracker().inflight.remove(&ack.pkid);
                if let Some(w) = waiter {
                    let _ = w.send(ack_outcome(&ack));
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                backoff = BACKOFF_MIN;
                let max = connack
                    .properties
                    .as_ref()
                    .and_then(|p| p.max_packet_size)
                    .unwrap_or(0);
                shared.broker_max_packet.store(max, Ordering::Relaxed);
                tracing::debug!(broker = %addr, "MQTT connected");
                shared.link.send_replace(Link::Up);
            }
            Ok(_) => {}
            Err((error, wait)) => {
                let reason = format!("MQTT connection to {addr} lost or refused: {error}");
                {
                    let mut t = shared.tracker();
                    // drop the connection and everything rumqttc would
                    // retransmit or report later, then fail the waiters
                    eventloop.clean();
                    eventloop.pending.clear();
                    eventloop.state.events.clear();
                    // `clean` keeps a publish parked on a packet-id
                    // collision (PUBACKs out of order); left set, the new
                    // connection would read no request until its
                    // collision timeout, reconnect, and stall again
                    eventloop.state.collision = None;
                    t.fail_all(&reason);
                }
                tracing::warn!(broker = %addr, %error, retry_in = ?backoff, "MQTT connection problem");
                shared.link.send_replace(Link::Down(reason));
                if wait {
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
    shared.tracker().fail_all("the MQTT publisher was dropped");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn puback_reasons() {
        let ack = |reason| PubAck {
            pkid: 1,
            reason,
            properties: None,
        };
        assert!(ack_outcome(&ack(PubAckReason::Success)).is_ok());
        assert!(ack_outcome(&ack(PubAckReason::NoMatchingSubscribers)).is_ok());
        assert!(matches!(
            ack_outcome(&ack(PubAckReason::NotAuthorized)),
            PublishOutcome::Transient { .. }
        ));
        assert!(matches!(
            ack_outcome(&ack(PubAckReason::TopicNameInvalid)),
            PublishOutcome::Rejected { .. }
        ));
        assert!(matches!(
            ack_outcome(&ack(PubAckReason::QuotaExceeded)),
            PublishOutcome::Transient { .. }
        ));
    }
}
