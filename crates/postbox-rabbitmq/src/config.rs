//! RabbitMQ publisher settings.

use std::time::Duration;

use serde::Deserialize;

use crate::RabbitMqError;

/// Settings of a [`RabbitMqPublisher`](crate::RabbitMqPublisher).
///
/// Plain data; deserialises from a config file with the defaults below.
/// `Debug` shows the URL without its password.
///
/// The topic maps to an exchange and a routing key through two templates in
/// which `{topic}` is replaced by the message's topic. The defaults publish
/// to the default exchange `""` with routing key = topic, i.e. straight to
/// the queue named like the topic.
///
/// ```
/// let cfg = postbox_rabbitmq::RabbitMqConfig::from_url("amqp://guest:guest@localhost:5672/%2f")?
///     .exchange("events");
/// assert_eq!(cfg.exchange_for("orders.created"), "events");
/// assert_eq!(cfg.routing_key_for("orders.created"), "orders.created");
/// # Ok::<(), postbox_rabbitmq::RabbitMqError>(())
/// ```
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RabbitMqConfig {
    /// Broker URL: `amqp://user:password@host[:port]/vhost` or `amqps://...`
    /// (default port 5672 / 5671; the default vhost `/` is written `%2f`).
    /// Query parameters of the AMQP URI spec (`heartbeat`, `frame_max`,
    /// `channel_max`) are passed on. Required.
    pub url: String,
    /// Exchange template; `{topic}` is replaced by the topic. Default `""`
    /// (the default exchange, which routes to the queue named by the
    /// routing key). The exchange must exist: postbox declares nothing.
    #[serde(default)]
    pub exchange: String,
    /// Routing key template; `{topic}` is replaced by the topic. Default
    /// `"{topic}"`.
    #[serde(default = "default_routing_key")]
    pub routing_key_template: String,
    /// How long to wait for the confirms of a batch, in milliseconds,
    /// before the unconfirmed messages are `Transient` (and the connection
    /// is dropped and opened again). Default 5000: below the relay's 10 s
    /// send timeout.
    #[serde(default = "default_confirm_timeout_ms")]
    pub confirm_timeout_ms: u64,
    /// How long one connection attempt (TCP, AMQP handshake, channel,
    /// `confirm.select`) may take, in milliseconds. Default 5000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Longest wait between reconnection attempts, in milliseconds (the wait
    /// starts at 100 ms and doubles per failure). While waiting, publishes
    /// are `Transient` at once. Default 5000.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

fn default_routing_key() -> String {
    "{topic}".to_owned()
}
fn default_confirm_timeout_ms() -> u64 {
    5_000
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_max_backoff_ms() -> u64 {
    5_000
}

impl std::fmt::Debug for RabbitMqConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqConfig")
            .field("url", &postbox_core::redact_userinfo(&self.url))
            .field("exchange", &self.exchange)
            .field("routing_key_template", &self.routing_key_template)
            .field("confirm_timeout_ms", &self.confirm_timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("max_backoff_ms", &self.max_backoff_ms)
            .finish()
    }
}

impl RabbitMqConfig {
    /// Settings for the broker at `url` with every default; the URL is not
    /// checked until [`RabbitMqConfig::validate`].
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            exchange: String::new(),
            routing_key_template: default_routing_key(),
            confirm_timeout_ms: default_confirm_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            max_backoff_ms: default_max_backoff_ms(),
        }
    }

    /// Parses and checks `amqp[s]://user:password@host[:port]/vhost`.
    pub fn from_url(url: &str) -> Result<Self, RabbitMqError> {
        let config = Self::new(url);
        config.validate()?;
        Ok(config)
    }

    /// Sets the exchange template [`RabbitMqConfig::exchange`].
    #[must_use]
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// Sets [`RabbitMqConfig::routing_key_template`].
    #[must_use]
    pub fn routing_key_template(mut self, template: impl Into<String>) -> Self {
        self.routing_key_template = template.into();
        self
    }

    /// Sets [`RabbitMqConfig::confirm_timeout_ms`].
    #[must_use]
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout_ms = millis(timeout);
        self
    }

    /// Sets [`RabbitMqConfig::connect_timeout_ms`].
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout_ms = millis(timeout);
        self
    }

    /// Sets [`RabbitMqConfig::max_backoff_ms`].
    #[must_use]
    pub fn max_backoff(mut self, max: Duration) -> Self {
        self.max_backoff_ms = millis(max);
        self
    }

    /// The exchange a message of `topic` is published to.
    pub fn exchange_for(&self, topic: &str) -> String {
        self.exchange.replace("{topic}", topic)
    }

    /// The routing key of a message of `topic`.
    pub fn routing_key_for(&self, topic: &str) -> String {
        self.routing_key_template.replace("{topic}", topic)
    }

    /// Checks every setting; errors name the bad one (never a password).
    pub fn validate(&self) -> Result<(), RabbitMqError> {
        let url = url::Url::parse(&self.url).map_err(|e| {
            RabbitMqError::invalid(
                "url",
                format!(
                    "{} is not a URL ({e}); expected amqp://user:password@host:5672/%2f",
                    postbox_core::redact_userinfo(&self.url)
                ),
            )
        })?;
        if !matches!(url.scheme(), "amqp" | "amqps") {
            return Err(RabbitMqError::invalid(
                "url",
                format!(
                    "has unknown scheme {:?} in {}; expected amqp:// or amqps://",
                    url.scheme(),
                    postbox_core::redact_userinfo(&self.url)
                ),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(RabbitMqError::invalid(
                "url",
                format!("{} has no host", postbox_core::redact_userinfo(&self.url)),
            ));
        }
        if self.url.parse::<lapin::uri::AMQPUri>().is_err() {
            return Err(RabbitMqError::invalid(
                "url",
                format!(
                    "{} is not a valid AMQP URI",
                    postbox_core::redact_userinfo(&self.url)
                ),
            ));
        }
        if self.routing_key_template.len() > 255 || self.exchange.len() > 255 {
            return Err(RabbitMqError::invalid(
                "exchange/routing_key_template",
                "is longer than AMQP's 255 bytes",
            ));
        }
        for (name, value) in [
            ("confirm_timeout_ms", self.confirm_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("max_backoff_ms", self.max_backoff_ms),
        ] {
            if value == 0 {
                return Err(RabbitMqError::invalid(name, "must be above 0"));
            }
        }
        Ok(())
    }

    /// The URL without credentials, for messages.
    pub(crate) fn server(&self) -> String {
        postbox_core::redact_userinfo(&self.url)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_names_bad_ones() {
        assert!(RabbitMqConfig::from_url("amqp://guest:guest@127.0.0.1:5672/%2f").is_ok());
        assert!(RabbitMqConfig::from_url("amqps://u:p@mq.example.com/prod").is_ok());
        let e = RabbitMqConfig::from_url("nats://h:1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("url") && e.contains("nats"), "{e}");
        let e = RabbitMqConfig::from_url("amqp//nohost")
            .unwrap_err()
            .to_string();
        assert!(e.contains("url"), "{e}");
    }

    #[test]
    fn passwords_never_show() {
        let e = RabbitMqConfig::from_url("http://alice:s3cret@h:1")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cret") && !e.contains("alice"), "{e}");
        let e = RabbitMqConfig::from_url("amqp://alice:s3cret@h:99999/x")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cret"), "{e}");
        let dbg = format!("{:?}", RabbitMqConfig::new("amqp://alice:s3cret@h/%2f"));
        assert!(!dbg.contains("s3cret"), "{dbg}");
    }

    #[test]
    fn exchange_and_routing_key_from_templates() {
        let cfg = RabbitMqConfig::new("amqp://h");
        assert_eq!(cfg.exchange_for("a.b"), "");
        assert_eq!(cfg.routing_key_for("a.b"), "a.b");
        let cfg = cfg
            .exchange("ex.{topic}")
            .routing_key_template("rk.{topic}");
        assert_eq!(cfg.exchange_for("a"), "ex.a");
        assert_eq!(cfg.routing_key_for("a"), "rk.a");
    }
}
