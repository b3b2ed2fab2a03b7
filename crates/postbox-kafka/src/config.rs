//! Kafka publisher settings.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::KafkaError;

/// Settings of a [`KafkaPublisher`](crate::KafkaPublisher).
///
/// Plain data; deserialises from a config file with the defaults below.
/// `Debug` hides the values of `properties` whose name mentions a password,
/// secret or key material.
///
/// ```
/// let cfg = postbox_kafka::KafkaConfig::from_url("kafka://127.0.0.1:9092")?
///     .topic_template("outbox.{topic}");
/// assert_eq!(cfg.kafka_topic("orders"), "outbox.orders");
/// # Ok::<(), postbox_kafka::KafkaError>(())
/// ```
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port...]`. Required.
    pub brokers: String,
    /// The Kafka topic for a postbox topic: `{topic}` is replaced by the
    /// postbox topic as it is. Default `"{topic}"`.
    #[serde(default = "default_template")]
    pub topic_template: String,
    /// How long librdkafka keeps trying to deliver a message, in
    /// milliseconds, before its outcome is `Transient`. Default 8000: below
    /// the relay's 10 s send timeout, so a broker outage gives outcomes
    /// rather than a cancelled batch.
    #[serde(default = "default_message_timeout_ms")]
    pub message_timeout_ms: u64,
    /// How long the producer waits to fill a batch, in milliseconds.
    /// Default 5.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// Largest message the producer accepts (librdkafka `message.max.bytes`).
    /// Default 1 000 000, librdkafka's own default and just under a Kafka
    /// broker's default limit (`message.max.bytes` = 1 048 588): a bigger
    /// message is `Rejected` at once. Raise it together with the broker's
    /// or topic's `max.message.bytes`.
    #[serde(default = "default_message_max_bytes")]
    pub message_max_bytes: usize,
    /// `client.id` reported to the broker. Default `postbox`.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// Extra librdkafka producer properties (e.g. `security.protocol`,
    /// `sasl.mechanism`, `sasl.username`, `sasl.password`). They cannot
    /// turn off idempotence or lower `acks`.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_template() -> String {
    "{topic}".to_owned()
}
fn default_message_timeout_ms() -> u64 {
    8_000
}
fn default_linger_ms() -> u64 {
    5
}
fn default_message_max_bytes() -> usize {
    1_000_000
}
fn default_client_id() -> String {
    "postbox".to_owned()
}

/// Producer properties postbox sets itself; overriding them would break
/// the delivery promise.
const OWNED: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "linger.ms",
    "queue.buffering.max.ms",
    "message.max.bytes",
    "client.id",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
    "retries",
    "message.send.max.retries",
    "enable.gapless.guarantee",
    // keys map to partitions as Java clients do (murmur2): order per key
    "partitioner",
    // a transactional producer needs init_transactions, which postbox
    // does not call: every send would fail
    "transactional.id",
];

pub(crate) fn is_secret(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("password") || n.contains("secret") || n.contains(".key") || n.contains("token")
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let props: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    if is_secret(k) {
                        "<redacted>"
                    } else {
                        v.as_str()
                    },
                )
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic_template", &self.topic_template)
            .field("message_timeout_ms", &self.message_timeout_ms)
            .field("linger_ms", &self.linger_ms)
            .field("message_max_bytes", &self.message_max_bytes)
            .field("client_id", &self.client_id)
            .field("properties", &props)
            .finish()
    }
}

impl KafkaConfig {
    /// Settings for `brokers` (`host:port[,host:port...]`) with every default.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic_template: default_template(),
            message_timeout_ms: default_message_timeout_ms(),
            linger_ms: default_linger_ms(),
            message_max_bytes: default_message_max_bytes(),
            client_id: default_client_id(),
            properties: BTreeMap::new(),
        }
    }

    /// Parses `kafka://host[:port][,host[:port]...][?name=value&...]`
    /// (default port 9092). Query parameters whose name contains a dot are
    /// librdkafka properties (`?security.protocol=SASL_SSL`); the others
    /// are `topic_template`, `client_id`, `message_timeout_ms`, `linger_ms`,
    /// `message_max_bytes`. Errors name the problem, never a password.
    pub fn from_url(url: &str) -> Result<Self, KafkaError> {
        let rest = match url.split_once("://") {
            Some(("kafka", rest)) => rest,
            Some((scheme, _)) => {
                return Err(KafkaError::invalid(
                    "url",
                    format!("unknown scheme `{scheme}`: use kafka://host:9092"),
                ));
            }
            None => return Err(KafkaError::invalid("url", "must start with kafka://")),
        };
        let (hosts, query) = match rest.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (rest, None),
        };
        let hosts = hosts.trim_end_matches('/');
        if hosts.contains('@') {
            return Err(KafkaError::invalid(
                "url",
                "must not carry credentials: set sasl.username / sasl.password in properties",
            ));
        }
        if hosts.contains('/') {
            return Err(KafkaError::invalid("url", "must not have a path"));
        }
        let mut brokers = Vec::new();
        for h in hosts.split(',') {
            let h = h.trim();
            if h.is_empty() {
                return Err(KafkaError::invalid("url", "has an empty broker address"));
            }
            let with_port = match h.rsplit_once(':') {
                // `[::1]` alone has a colon inside the brackets
                Some((_, port)) if !h.ends_with(']') => {
                    port.parse::<u16>().map_err(|_| {
                        KafkaError::invalid("url", format!("broker `{h}` has an invalid port"))
                    })?;
                    h.to_owned()
                }
                _ => format!("{h}:9092"),
            };
            brokers.push(with_port);
        }
        let mut cfg = Self::new(brokers.join(","));
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(k, v)?;
            let num = |name: &'static str| {
                v.parse::<u64>()
                    .map_err(|_| KafkaError::invalid(name, format!("`{v}` is not a number")))
            };
            match k {
                "topic_template" => cfg.topic_template = v.clone(),
                "client_id" => cfg.client_id = v.clone(),
                "message_timeout_ms" => cfg.message_timeout_ms = num("message_timeout_ms")?,
                "linger_ms" => cfg.linger_ms = num("linger_ms")?,
                "message_max_bytes" => {
                    cfg.message_max_bytes =
                        usize::try_from(num("message_max_bytes")?).unwrap_or(usize::MAX)
                }
                k if k.contains('.') => {
                    cfg.properties.insert(k.to_owned(), v.clone());
                }
                other => {
                    return Err(KafkaError::invalid(
                        "url",
                        format!("unknown query parameter `{other}`"),
                    ));
                }
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Sets the topic template.
    #[must_use]
    pub fn topic_template(mut self, template: impl Into<String>) -> Self {
        self.topic_template = template.into();
        self
    }

    /// Sets how long a message may take to be delivered.
    #[must_use]
    pub fn message_timeout(mut self, timeout: Duration) -> Self {
        self.message_timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// Sets the largest message the producer accepts.
    #[must_use]
    pub fn message_max_bytes(mut self, n: usize) -> Self {
        self.message_max_bytes = n;
        self
    }

    /// Adds one librdkafka producer property.
    #[must_use]
    pub fn property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }

    /// The Kafka topic for a postbox topic.
    pub fn kafka_topic(&self, topic: &str) -> String {
        self.topic_template.replace("{topic}", topic)
    }

    pub(crate) fn validate(&self) -> Result<(), KafkaError> {
        if self.brokers.trim().is_empty() {
            return Err(KafkaError::invalid("brokers", "is empty"));
        }
        if !self.topic_template.contains("{topic}") {
            return Err(KafkaError::invalid(
                "topic_template",
                format!(
                    "`{}` has no `{{topic}}` placeholder: every topic would go to one Kafka topic",
                    self.topic_template
                ),
            ));
        }
        if self.message_timeout_ms == 0 {
            return Err(KafkaError::invalid(
                "message_timeout_ms",
                "must be at least 1",
            ));
        }
        if self.message_max_bytes < 1000 {
            return Err(KafkaError::invalid(
                "message_max_bytes",
                "must be at least 1000",
            ));
        }
        for k in self.properties.keys() {
            if OWNED.contains(&k.as_str()) {
                return Err(KafkaError::invalid(
                    "properties",
                    format!("`{k}` is set by postbox (use the dedicated setting, if any)"),
                ));
            }
        }
        Ok(())
    }
}

/// Why a Kafka topic name is invalid, if it is (Kafka's own rules: 1 to
/// 249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`).
pub(crate) fn invalid_topic(name: &str) -> Option<String> {
    if name.is_empty() || name == "." || name == ".." {
        return Some(format!("`{name}` is not a valid Kafka topic name"));
    }
    if name.len() > 249 {
        return Some(format!(
            "Kafka topic name of {} characters is longer than 249",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Some(format!(
            "Kafka topic `{name}` contains `{c}`; only letters, digits, `.`, `_` and `-` are allowed"
        ));
    }
    None
}

/// A query value with its `%XX` escapes decoded; `+` stays a `+` (this is a
/// URL, not a form: `sasl.password=a+b` means `a+b`). The value is not shown
/// in the error, since it may be a password.
fn percent_decode(name: &str, s: &str) -> Result<String, KafkaError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| {
            KafkaError::invalid(
                "url",
                format!("query parameter `{name}` is not UTF-8 once decoded"),
            )
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let c = KafkaConfig::from_url("kafka://127.0.0.1").unwrap();
        assert_eq!(c.brokers, "127.0.0.1:9092");
        let c = KafkaConfig::from_url(
            "kafka://a:1,b,[::1]:3/?topic_template=pb.{topic}&linger_ms=0&security.protocol=SASL_SSL",
        )
        .unwrap();
        assert_eq!(c.brokers, "a:1,b:9092,[::1]:3");
        assert_eq!(c.topic_template, "pb.{topic}");
        assert_eq!(c.linger_ms, 0);
        assert_eq!(c.properties["security.protocol"], "SASL_SSL");
    }

    #[test]
    fn query_values_are_percent_decoded_as_a_url() {
        let c = KafkaConfig::from_url(
            "kafka://h?client_id=a%2Fb%C3%A9&sasl.password=p+q%25%aé&sasl.username=%+1",
        )
        .unwrap();
        assert_eq!(c.client_id, "a/bé");
        // `+` is not a space, a `%` without two hex digits stays as written
        assert_eq!(c.properties["sasl.password"], "p+q%%aé");
        assert_eq!(c.properties["sasl.username"], "%+1");
        let e = KafkaConfig::from_url("kafka://h?sasl.password=%ff%fehunter2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sasl.password") && e.contains("UTF-8"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn bad_urls_are_named() {
        for (url, needle) in [
            ("nats://h", "unknown scheme `nats`"),
            ("h:9092", "kafka://"),
            ("kafka://u:hunter2@h", "credentials"),
            ("kafka://h:99999", "invalid port"),
            ("kafka://h?flavour=x", "flavour"),
            ("kafka://h?acks=0", "acks"),
            ("kafka://h?enable.idempotence=false", "enable.idempotence"),
            ("kafka://h?transactional.id=x", "transactional.id"),
            ("kafka://h?topic_template=fixed", "topic_template"),
        ] {
            let e = KafkaConfig::from_url(url).unwrap_err().to_string();
            assert!(e.contains(needle), "{url}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn properties_postbox_sets_are_refused() {
        for name in ["partitioner", "transactional.id", "acks"] {
            let e = KafkaConfig::new("h:9092")
                .property(name, "x")
                .validate()
                .unwrap_err()
                .to_string();
            assert!(e.contains(name), "{e}");
        }
    }

    #[test]
    fn secrets_hidden_in_debug() {
        let c = KafkaConfig::new("h:9092").property("sasl.password", "hunter2");
        let d = format!("{c:?}");
        assert!(!d.contains("hunter2"), "{d}");
    }

    #[test]
    fn topic_names() {
        assert!(invalid_topic("orders.created").is_none());
        assert!(invalid_topic("a/b").is_some());
        assert!(invalid_topic("..").is_some());
        assert!(invalid_topic(&"x".repeat(250)).is_some());
    }
}
