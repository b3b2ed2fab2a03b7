//! The Kafka publisher: an idempotent rdkafka producer, one record per
//! message, every record of a batch handed to librdkafka before any
//! delivery report is awaited.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use postbox_core::{Message, PublishOutcome, Publisher};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use tracing::Instrument as _;

use crate::KafkaError;
use crate::config::{KafkaConfig, invalid_topic, is_secret};

/// Header carrying the message id (the idempotency key).
pub const ID_HEADER: &str = "postbox-id";

/// Publishes to Kafka with an idempotent producer (`enable.idempotence`,
/// `acks=all`).
///
/// Each message becomes one record: topic from
/// [`KafkaConfig::kafka_topic`], record key = the postbox key (keyless
/// messages have no record key), value = the payload bytes, headers
/// `postbox-id` (the message id) plus every message header as it is. Records
/// with the same key go to the same partition (`murmur2_random`, the Java
/// client's partitioner, so Java and Rust producers agree), where the
/// idempotent producer keeps their order even across retries.
///
/// Outcomes come from the delivery reports: `Ok` once the broker has
/// acknowledged with `acks=all`; `Transient` for timeouts (after
/// `message_timeout_ms`), transport and retriable errors; `Rejected` for a
/// message that is too large, an invalid or unknown topic, or a record the
/// broker calls invalid.
///
/// Building it never contacts a broker (librdkafka connects lazily and
/// reconnects by itself with backoff). Cheap to clone.
#[derive(Clone)]
pub struct KafkaPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    client_config: ClientConfig,
    /// Replaced when librdkafka reports a fatal error (an idempotent
    /// producer that lost its sequence state cannot be used again).
    producer: RwLock<FutureProducer>,
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("brokers", &self.inner.config.brokers)
            .finish_non_exhaustive()
    }
}

fn client_error(e: &RdError) -> String {
    match e {
        RdError::ClientConfig(_, desc, key, _) => {
            if is_secret(key) {
                format!("property `{key}` is invalid")
            } else {
                format!("property `{key}`: {desc}")
            }
        }
        other => other.to_string(),
    }
}

impl KafkaPublisher {
    /// How long librdkafka may go on trying to deliver a message
    /// (`message_timeout_ms`): until then a message whose publish the
    /// relay gave up on may still land. A relay's send timeout must be
    /// longer, or a key's next message could overtake it.
    pub fn message_timeout(&self) -> Duration {
        Duration::from_millis(self.inner.config.message_timeout_ms)
    }

    /// Builds the producer. Never contacts a broker: messages published
    /// while Kafka is down are `Transient` after `message_timeout_ms`.
    pub fn new(config: KafkaConfig) -> Result<Self, KafkaError> {
        config.validate()?;
        let mut cc = ClientConfig::new();
        for (k, v) in &config.properties {
            cc.set(k, v);
        }
        cc.set("bootstrap.servers", &config.brokers)
            .set("client.id", &config.client_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", config.linger_ms.to_string())
            .set("message.timeout.ms", config.message_timeout_ms.to_string())
            .set("message.max.bytes", config.message_max_bytes.to_string())
            .set("partitioner", "murmur2_random");
        let producer: FutureProducer = cc
            .create()
            .map_err(|e| KafkaError::Client(client_error(&e)))?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                client_config: cc,
                producer: RwLock::new(producer),
            }),
        })
    }

    /// Builds the producer and checks that the cluster answers a metadata
    /// request within `timeout`. Use [`KafkaPublisher::new`] where starting
    /// while Kafka is down must work.
    pub async fn connect(config: KafkaConfig, timeout: Duration) -> Result<Self, KafkaError> {
        let brokers = config.brokers.clone();
        let publisher = Self::new(config)?;
        let producer = publisher.producer();
        let fetched = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        match fetched {
            Ok(()) => Ok(publisher),
            Err(reason) => Err(KafkaError::Connect { brokers, reason }),
        }
    }

    fn producer(&self) -> FutureProducer {
        // FutureProducer is a cheap Arc handle
        self.inner
            .producer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces `used` with a fresh producer (a new producer id) when it
    /// cannot deliver any more: librdkafka raised a fatal error, or the
    /// broker refused its producer id or epoch (`fenced`). A producer in
    /// that state fails every later record the same way, so without a new
    /// one the relay would retry forever.
    ///
    /// Safe for ordering: batches in flight together never share a key
    /// (the relay leases a key to one batch at a time), and this batch's
    /// delivery reports are all in.
    ///
    /// Returns whether it replaced it.
    fn renew_if_broken(&self, used: &FutureProducer, fenced: Option<RDKafkaErrorCode>) -> bool {
        let fatal = used.client().fatal_error();
        if fatal.is_none() && fenced.is_none() {
            return false;
        }
        let mut slot = self
            .inner
            .producer
            .write()
            .unwrap_or_else(|e| e.into_inner());
        // another batch may have replaced it already
        if slot.client().native_ptr() != used.client().native_ptr() {
            return false;
        }
        match self.inner.client_config.create::<FutureProducer>() {
            Ok(fresh) => {
                match (fatal, fenced) {
                    (Some((code, reason)), _) => tracing::warn!(
                        ?code,
                        %reason,
                        "Kafka producer hit a fatal error; created a new one"
                    ),
                    (None, Some(code)) => tracing::warn!(
                        ?code,
                        "Kafka broker refused the producer id or epoch; created a new producer"
                    ),
                    (None, None) => {}
                }
                *slot = fresh;
                true
            }
            Err(e) => {
                tracing::error!(error = %client_error(&e), "cannot recreate the Kafka producer");
                false
            }
        }
    }

    async fn publish_batch(&self, batch: &[Message]) -> Vec<PublishOutcome> {
        let producer = self.producer();
        let mut outcomes: Vec<Option<PublishOutcome>> = vec![None; batch.len()];
        let mut pending = Vec::with_capacity(batch.len());
        for (i, m) in batch.iter().enumerate() {
            let topic = self.inner.config.kafka_topic(&m.topic);
            if let Some(reason) = invalid_topic(&topic) {
                outcomes[i] = Some(PublishOutcome::rejected(reason));
                continue;
            }
            let id = m.id.to_string();
            let mut headers = OwnedHeaders::new_with_capacity(m.headers.len() + 1).insert(Header {
                key: ID_HEADER,
                value: Some(id.as_str()),
            });
            for (k, v) in &m.headers {
                if k != ID_HEADER {
                    headers = headers.insert(Header {
                        key: k.as_str(),
                        value: Some(v.as_str()),
                    });
                }
            }
            let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&topic)
                .payload(&m.payload[..])
                .headers(headers);
            if let Some(key) = &m.key {
                record = record.key(key.as_str());
            }
            match producer.send_result(record) {
                Ok(delivery) => pending.push((i, topic, delivery)),
                Err((e, _record)) => {
                    outcomes[i] = Some(outcome_for_error(&e, &topic, &self.inner.config));
                }
            }
        }
        // every record is queued: now wait for all delivery reports
        let reports = futures_util::future::join_all(
            pending
                .into_iter()
                .map(|(i, topic, fut)| async move { (i, topic, fut.await) }),
        )
        .await;
        let mut fenced = None;
        for (i, topic, report) in reports {
            outcomes[i] = Some(match report {
                Ok(Ok(_delivery)) => PublishOutcome::Ok,
                Ok(Err((e, _msg))) => {
                    if let Some(code) = e.rdkafka_error_code().filter(|c| is_fenced(*c)) {
                        fenced = Some(code);
                    }
                    outcome_for_error(&e, &topic, &self.inner.config)
                }
                Err(_canceled) => {
                    PublishOutcome::transient("the Kafka producer was closed before delivery")
                }
            });
        }
        if self.renew_if_broken(&producer, fenced) {
            // Dropping the last handle of a producer purges, flushes for up
            // to 500 ms and joins librdkafka's threads: not on the runtime.
            tokio::task::spawn_blocking(move || drop(producer));
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| PublishOutcome::transient("internal: no outcome")))
            .collect()
    }
}

impl Publisher for KafkaPublisher {
    fn publish(&self, batch: &[Message]) -> impl Future<Output = Vec<PublishOutcome>> + Send {
        let span = postbox_core::publish_span("kafka", batch);
        self.publish_batch(batch).instrument(span)
    }
}

/// Errors after which the producer's id or epoch is no good any more.
fn is_fenced(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::ProducerFenced | C::InvalidProducerEpoch | C::Fenced
    )
}

/// Maps a produce error (immediate or from the delivery report).
pub(crate) fn outcome_for_error(e: &RdError, topic: &str, config: &KafkaConfig) -> PublishOutcome {
    use RDKafkaErrorCode as C;
    let Some(code) = e.rdkafka_error_code() else {
        return PublishOutcome::transient(format!("Kafka: {e}"));
    };
    match code {
        C::MessageSizeTooLarge | C::InvalidMessageSize => PublishOutcome::rejected(format!(
            "message too large for Kafka topic `{topic}` ({code}); the producer accepts up to \
             message_max_bytes = {} and the broker/topic has its own max.message.bytes",
            config.message_max_bytes
        )),
        // Not `Rejected`: librdkafka reports an existing topic as unknown
        // for a while after one metadata reply said so (a broker restarting,
        // a partition leader moving), and a service may be deployed before
        // its topic is created. A topic that never comes costs the message
        // its attempts, then it is dead.
        C::UnknownTopic | C::UnknownTopicOrPartition | C::UnknownTopicId => {
            PublishOutcome::transient(format!(
                "Kafka topic `{topic}` does not exist, or the cluster does not know it yet ({code}); create it if it is missing"
            ))
        }
        C::InvalidTopic => PublishOutcome::rejected(format!("Kafka topic `{topic}` is invalid")),
        C::InvalidRecord | C::InvalidMessage | C::PolicyViolation => PublishOutcome::rejected(
            format!("Kafka broker refused the record for `{topic}`: {code}"),
        ),
        C::MessageTimedOut => PublishOutcome::transient(format!(
            "Kafka did not acknowledge within message_timeout_ms = {} ({code})",
            config.message_timeout_ms
        )),
        _ => PublishOutcome::transient(format!("Kafka error for `{topic}`: {code}")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn error_mapping() {
        let cfg = KafkaConfig::new("h:9092");
        let out = |c| outcome_for_error(&RdError::MessageProduction(c), "t", &cfg);
        assert!(matches!(
            out(RDKafkaErrorCode::MessageSizeTooLarge),
            PublishOutcome::Rejected { .. }
        ));
        for code in [
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::UnknownTopic,
            RDKafkaErrorCode::UnknownTopicId,
        ] {
            assert!(
                matches!(out(code), PublishOutcome::Transient { .. }),
                "{code}"
            );
        }
        assert!(matches!(
            out(RDKafkaErrorCode::InvalidRecord),
            PublishOutcome::Rejected { .. }
        ));
        assert!(matches!(
            out(RDKafkaErrorCode::MessageTimedOut),
            PublishOutcome::Transient { .. }
        ));
        assert!(matches!(
            out(RDKafkaErrorCode::AllBrokersDown),
            PublishOutcome::Transient { .. }
        ));
        assert!(matches!(
            out(RDKafkaErrorCode::NotEnoughReplicas),
            PublishOutcome::Transient { .. }
        ));
        assert!(matches!(
            out(RDKafkaErrorCode::QueueFull),
            PublishOutcome::Transient { .. }
        ));
    }
}
