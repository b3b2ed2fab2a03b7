//! The message model: what a producer writes ([`NewMessage`]) and what a relay
//! hands to a publisher ([`Message`]).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::Serialize;
use uuid::Uuid;

/// String headers carried with a message to the broker.
///
/// A `BTreeMap` so that the order headers are written in is deterministic.
pub type Headers = BTreeMap<String, String>;

/// A message a producer writes into the outbox, inside its own transaction.
///
/// The id is a UUIDv7 chosen here, at enqueue time; it is the idempotency key
/// every publisher sends to its broker (`Nats-Msg-Id`, AMQP `message_id`, a
/// Kafka header, `webhook-id`), so a redelivery can be recognised downstream.
///
/// ```
/// use postbox_core::NewMessage;
///
/// let msg = NewMessage::new("orders.created", br#"{"id":42}"#.to_vec())
///     .key("order-42")
///     .header("content-type", "application/json");
/// assert_eq!(msg.key.as_deref(), Some("order-42"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NewMessage {
    /// Idempotency key and primary identity of the message (UUIDv7).
    pub id: Uuid,
    /// Routing topic, e.g. `orders.created`. Publishers map it to a subject,
    /// Kafka topic, exchange/routing key or URL.
    pub topic: String,
    /// Ordering key: messages with the same key are published in outbox
    /// order, one at a time. `None` means no ordering constraint.
    pub key: Option<String>,
    /// The message body, as bytes.
    pub payload: Bytes,
    /// String headers passed through to the broker.
    pub headers: Headers,
    /// Optional tenant, for scoping relays and admin queries.
    pub tenant: Option<String>,
    /// Do not publish before this instant (delayed delivery).
    pub available_at: Option<SystemTime>,
    /// Maximum publish attempts before the message is dead; `None` uses the
    /// relay's default.
    pub max_attempts: Option<u32>,
}

impl NewMessage {
    /// A message for `topic` with the given payload and a fresh UUIDv7 id.
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            id: Uuid::now_v7(),
            topic: topic.into(),
            key: None,
            payload: payload.into(),
            headers: Headers::new(),
            tenant: None,
            available_at: None,
            max_attempts: None,
        }
    }

    /// A message whose payload is `value` serialised as JSON, with the header
    /// `content-type: application/json`.
    ///
    /// ```
    /// #[derive(serde::Serialize)]
    /// struct OrderCreated { id: u64 }
    /// let msg = postbox_core::NewMessage::json("orders.created", &OrderCreated { id: 42 })?;
    /// assert_eq!(&msg.payload[..], br#"{"id":42}"#);
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn json<T: Serialize + ?Sized>(
        topic: impl Into<String>,
        value: &T,
    ) -> Result<Self, serde_json::Error> {
        let payload = serde_json::to_vec(value)?;
        Ok(Self::new(topic, payload).header("content-type", "application/json"))
    }

    /// Sets the ordering key: messages of one key are published in the
    /// order their transactions committed. Keep it short (an entity id):
    /// stores index it, and PostgreSQL refuses a key over about 2,600 bytes.
    #[must_use]
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds (or replaces) one header.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the tenant.
    #[must_use]
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Delays delivery until `at`.
    ///
    /// For a keyed message this also holds back the later messages of the
    /// same key: order per key is kept.
    #[must_use]
    pub fn available_at(mut self, at: SystemTime) -> Self {
        self.available_at = Some(at);
        self
    }

    /// Delays delivery by `delay` from now (this process's clock).
    ///
    /// A delay that reaches past [`latest_available_at`] (the end of year
    /// 9999, the latest instant every store holds) is clamped to it: such a
    /// message is in practice never published, and no delay panics or
    /// makes a store refuse the insert. A caller that wants to refuse long
    /// delays compares them with its own limit first.
    ///
    /// ```
    /// use std::time::Duration;
    /// let msg = postbox_core::NewMessage::new("t", "p").delay(Duration::MAX);
    /// assert_eq!(msg.available_at, Some(postbox_core::latest_available_at()));
    /// ```
    #[must_use]
    pub fn delay(self, delay: Duration) -> Self {
        let latest = latest_available_at();
        let at = SystemTime::now()
            .checked_add(delay)
            .map_or(latest, |at| at.min(latest));
        self.available_at(at)
    }

    /// Sets the maximum number of publish attempts for this message.
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// Replaces the generated id, e.g. to make a retried producer request
    /// idempotent with an id derived upstream.
    #[must_use]
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// The headers as the stores write them at enqueue: a JSON object of
    /// strings. With the `opentelemetry` feature it also carries the
    /// producer's current W3C trace context (`traceparent`, and `tracestate`
    /// when the trace has state; see the `trace_context` module), unless the
    /// headers already have a `traceparent`.
    pub fn headers_json(&self) -> String {
        #[cfg(feature = "opentelemetry")]
        {
            let mut headers = self.headers.clone();
            crate::trace_context::inject_current(&mut headers);
            encode_headers(&headers)
        }
        #[cfg(not(feature = "opentelemetry"))]
        encode_headers(&self.headers)
    }
}

fn encode_headers(headers: &Headers) -> String {
    // a map of strings to strings always serialises
    serde_json::to_string(headers).unwrap_or_else(|_| "{}".to_owned())
}

/// A message claimed from the outbox, handed to a [`Publisher`](crate::Publisher).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Message {
    /// The id given at enqueue (idempotency key).
    pub id: Uuid,
    /// Position in the outbox; defines order per key.
    pub seq: i64,
    /// Routing topic.
    pub topic: String,
    /// Ordering key, if any.
    pub key: Option<String>,
    /// Body bytes.
    pub payload: Bytes,
    /// Headers.
    pub headers: Headers,
    /// Tenant, if any.
    pub tenant: Option<String>,
    /// Which attempt this is, starting at 1. A redelivery after a relay died
    /// counts as an attempt too.
    pub attempt: u32,
    /// The message's own attempt limit, if it set one.
    pub max_attempts: Option<u32>,
    /// When the message was written (store clock).
    pub created_at: SystemTime,
}

impl Message {
    /// Builds a message; used by stores and tests.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: Uuid,
        seq: i64,
        topic: String,
        key: Option<String>,
        payload: Bytes,
        headers: Headers,
        tenant: Option<String>,
        attempt: u32,
        max_attempts: Option<u32>,
        created_at: SystemTime,
    ) -> Self {
        Self {
            id,
            seq,
            topic,
            key,
            payload,
            headers,
            tenant,
            attempt,
            max_attempts,
            created_at,
        }
    }
}

/// The latest `available_at` postbox writes: 9999-12-31T23:59:59Z, which
/// every store holds (MySQL's `DATETIME` ends there; PostgreSQL's interval
/// arithmetic on microseconds ends in year 294,247). [`NewMessage::delay`]
/// clamps to it.
pub fn latest_available_at() -> SystemTime {
    // within every platform's `SystemTime` (Windows' ends in year 30,828)
    SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799)
}

/// Microseconds since the Unix epoch, saturating; how SQL stores keep time.
pub fn to_unix_micros(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// The inverse of [`to_unix_micros`].
pub fn from_unix_micros(micros: i64) -> SystemTime {
    if micros >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_micros(micros.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_micros(micros.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delay_too_long_for_the_stores_is_clamped_not_a_panic() {
        for delay in [
            Duration::MAX,
            // `enqueue --delay 500000000000y`
            Duration::from_secs(500_000_000_000 * 31_557_600),
            // representable, but past what the stores hold
            Duration::from_secs(400_000 * 31_557_600),
        ] {
            let msg = NewMessage::new("t", "p").delay(delay);
            assert_eq!(msg.available_at, Some(latest_available_at()), "{delay:?}");
        }
        // an ordinary delay is untouched
        let before = SystemTime::now();
        let msg = NewMessage::new("t", "p").delay(Duration::from_secs(60));
        let at = msg.available_at.expect("delayed");
        assert!(at >= before + Duration::from_secs(60), "{at:?}");
        assert!(at <= SystemTime::now() + Duration::from_secs(60), "{at:?}");
    }
}
