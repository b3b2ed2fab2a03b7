//! MQTT publisher settings.

use std::time::Duration;

use serde::Deserialize;

use crate::MqttError;

/// Settings of an [`MqttPublisher`](crate::MqttPublisher).
///
/// Plain data; deserialises from a config file with the defaults below.
/// `Debug` never shows the password.
///
/// ```
/// let cfg = postbox_mqtt::MqttConfig::from_url("mqtt://127.0.0.1:1883")?
///     .topic_template("outbox/{topic}");
/// assert_eq!(cfg.mqtt_topic("orders.created").as_deref(), Ok("outbox/orders/created"));
/// # Ok::<(), postbox_mqtt::MqttError>(())
/// ```
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct MqttConfig {
    /// Broker host. Required.
    pub host: String,
    /// Broker port. Default 1883 (8883 with `tls`).
    #[serde(default)]
    pub port: Option<u16>,
    /// TLS with the platform's root certificates (`mqtts://`). Default false.
    /// The broker's certificate is always verified; there is no setting to
    /// skip that.
    #[serde(default)]
    pub tls: bool,
    /// With `tls`: PEM file of extra root certificates (e.g. a private CA)
    /// trusted in addition to the platform's. Default none.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// User name, if the broker wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// Password (never logged).
    #[serde(default)]
    pub password: Option<String>,
    /// MQTT client id. Default `postbox-<random>`: two relays never share a
    /// session (a broker disconnects the older client of a duplicate id).
    #[serde(default)]
    pub client_id: Option<String>,
    /// The MQTT topic for a postbox topic: `{topic}` is replaced by the
    /// postbox topic. Default `"{topic}"`.
    #[serde(default = "default_template")]
    pub topic_template: String,
    /// Replace `.` by `/` in the postbox topic before it goes into the
    /// template, so `orders.created` becomes the MQTT topic levels
    /// `orders/created`. Default true.
    #[serde(default = "default_true")]
    pub dots_to_slashes: bool,
    /// How long a batch waits for its PUBACKs, in milliseconds, before the
    /// unacknowledged messages are `Transient` (and the connection is
    /// dropped and re-opened). Default 8000, below the relay's 10 s send
    /// timeout.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// TCP + MQTT connect timeout in seconds. Default 5.
    #[serde(default = "default_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    /// MQTT keep-alive in seconds. Default 15.
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u64,
    /// Largest payload accepted; bigger messages are `Rejected`. Default
    /// 16 MiB. A limit the broker announces in CONNACK (MQTT 5 maximum
    /// packet size) applies as well.
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// Publishes queued towards the connection at most (across concurrent
    /// batches). Default 10 000; beyond it messages are `Transient`.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Publish with the MQTT retain flag. Default false.
    #[serde(default)]
    pub retain: bool,
}

fn default_template() -> String {
    "{topic}".to_owned()
}
fn default_true() -> bool {
    true
}
fn default_ack_timeout_ms() -> u64 {
    8_000
}
fn default_connect_timeout_secs() -> u64 {
    5
}
fn default_keep_alive_secs() -> u64 {
    15
}
fn default_max_payload_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_queue_capacity() -> usize {
    10_000
}

impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("host", &self.host)
            .field("port", &self.port())
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("client_id", &self.client_id)
            .field("topic_template", &self.topic_template)
            .field("dots_to_slashes", &self.dots_to_slashes)
            .field("ack_timeout_ms", &self.ack_timeout_ms)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .finish_non_exhaustive()
    }
}

impl MqttConfig {
    /// Settings for `host:port` with every default.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port: Some(port),
            tls: false,
            ca_file: None,
            username: None,
            password: None,
            client_id: None,
            topic_template: default_template(),
            dots_to_slashes: true,
            ack_timeout_ms: default_ack_timeout_ms(),
            connect_timeout_secs: default_connect_timeout_secs(),
            keep_alive_secs: default_keep_alive_secs(),
            max_payload_bytes: default_max_payload_bytes(),
            queue_capacity: default_queue_capacity(),
            retain: false,
        }
    }

    /// Parses `mqtt://[user[:password]@]host[:port][?client_id=ID]` or
    /// `mqtts://...` (TLS, default port 8883). Errors name the problem and
    /// never contain the password.
    pub fn from_url(url: &str) -> Result<Self, MqttError> {
        let parsed = url::Url::parse(url).map_err(|e| {
            MqttError::invalid(
                "url",
                format!("{} is not a URL: {e}", postbox_core::redact_userinfo(url)),
            )
        })?;
        let tls = match parsed.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            other => {
                return Err(MqttError::invalid(
                    "url",
                    format!("unknown scheme `{other}`: use mqtt:// or mqtts://"),
                ));
            }
        };
        let host = match parsed.host_str() {
            Some(h) if !h.is_empty() => h.trim_start_matches('[').trim_end_matches(']'),
            _ => return Err(MqttError::invalid("url", "has no host")),
        };
        let mut cfg = Self::new(host, parsed.port().unwrap_or(if tls { 8883 } else { 1883 }));
        cfg.tls = tls;
        if !parsed.username().is_empty() {
            cfg.username = Some(decode(parsed.username()));
        }
        cfg.password = parsed.password().map(decode);
        for (k, v) in parsed.query_pairs() {
            match k.as_ref() {
                "client_id" => cfg.client_id = Some(v.into_owned()),
                other => {
                    return Err(MqttError::invalid(
                        "url",
                        format!("unknown query parameter `{other}` (known: client_id)"),
                    ));
                }
            }
        }
        Ok(cfg)
    }

    /// Trusts the root certificates in this PEM file too (see
    /// [`MqttConfig::ca_file`]).
    #[must_use]
    pub fn ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Sets the topic template (`{topic}` is the postbox topic).
    #[must_use]
    pub fn topic_template(mut self, template: impl Into<String>) -> Self {
        self.topic_template = template.into();
        self
    }

    /// Whether `.` in the postbox topic becomes `/`.
    #[must_use]
    pub fn dots_to_slashes(mut self, on: bool) -> Self {
        self.dots_to_slashes = on;
        self
    }

    /// Sets the client id.
    #[must_use]
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// Sets user name and password.
    #[must_use]
    pub fn credentials(mut self, username: impl Into<String>, password: impl Into<String>) -> Self {
        self.username = Some(username.into());
        self.password = Some(password.into());
        self
    }

    /// Sets how long a batch waits for its PUBACKs.
    #[must_use]
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// Sets the largest accepted payload.
    #[must_use]
    pub fn max_payload_bytes(mut self, n: usize) -> Self {
        self.max_payload_bytes = n;
        self
    }

    /// The port in effect.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(if self.tls { 8883 } else { 1883 })
    }

    /// The MQTT topic a postbox topic is published to, or why it cannot be
    /// one (empty, wildcard `+`/`#`, NUL, longer than 65 535 bytes).
    pub fn mqtt_topic(&self, topic: &str) -> Result<String, String> {
        let topic = if self.dots_to_slashes {
            topic.replace('.', "/")
        } else {
            topic.to_owned()
        };
        let t = self.topic_template.replace("{topic}", &topic);
        if t.is_empty() {
            return Err("the MQTT topic is empty".to_owned());
        }
        if t.contains(['+', '#']) {
            return Err(format!(
                "MQTT topic `{t}` contains a wildcard (+ or #), which a publish may not use"
            ));
        }
        if t.contains('\0') {
            return Err("the MQTT topic contains a NUL character".to_owned());
        }
        if t.len() > usize::from(u16::MAX) {
            return Err(format!(
                "the MQTT topic is {} bytes long (max 65535)",
                t.len()
            ));
        }
        Ok(t)
    }

    pub(crate) fn validate(&self) -> Result<(), MqttError> {
        if self.host.is_empty() {
            return Err(MqttError::invalid("host", "is empty"));
        }
        if !self.topic_template.contains("{topic}") {
            return Err(MqttError::invalid(
                "topic_template",
                format!(
                    "`{}` has no `{{topic}}` placeholder: every topic would go to one MQTT topic",
                    self.topic_template
                ),
            ));
        }
        // the template's own text must make a valid topic name: a wildcard
        // or a NUL in it would make every message `Rejected`
        let fixed = self.topic_template.replace("{topic}", "");
        if fixed.contains(['+', '#']) {
            return Err(MqttError::invalid(
                "topic_template",
                format!(
                    "`{}` contains a wildcard (+ or #), which a publish may not use",
                    self.topic_template
                ),
            ));
        }
        if fixed.contains('\0') {
            return Err(MqttError::invalid(
                "topic_template",
                "contains a NUL character",
            ));
        }
        if self.ack_timeout_ms == 0 {
            return Err(MqttError::invalid("ack_timeout_ms", "must be at least 1"));
        }
        if self.queue_capacity == 0 {
            return Err(MqttError::invalid("queue_capacity", "must be at least 1"));
        }
        if !(1..=u64::from(u16::MAX)).contains(&self.keep_alive_secs) {
            // MQTT sends it as 16 bits: 65536 would go out as 0, no keep-alive
            return Err(MqttError::invalid(
                "keep_alive_secs",
                "must be from 1 to 65535",
            ));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(MqttError::invalid("password", "is set without a username"));
        }
        Ok(())
    }
}

/// User info as the URL carries it, percent-encoded.
fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_template_or_keep_alive_no_publish_could_use_is_refused() {
        for (template, needle) in [
            ("site/+/{topic}", "wildcard"),
            ("#{topic}", "wildcard"),
            ("a\0{topic}", "NUL"),
        ] {
            let e = MqttConfig::new("h", 1883)
                .topic_template(template)
                .validate()
                .unwrap_err()
                .to_string();
            assert!(e.contains("topic_template") && e.contains(needle), "{e}");
        }
        let mut c = MqttConfig::new("h", 1883);
        c.keep_alive_secs = 65_536;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("keep_alive_secs"), "{e}");
        c.keep_alive_secs = 65_535;
        c.validate().unwrap();
    }

    #[test]
    fn user_info_is_percent_decoded() {
        let c = MqttConfig::from_url("mqtt://us%40er:p%3Aw+d%zz@h").unwrap();
        assert_eq!(c.username.as_deref(), Some("us@er"));
        assert_eq!(c.password.as_deref(), Some("p:w+d%zz"));
    }

    #[test]
    fn parses_urls() {
        let c = MqttConfig::from_url("mqtt://127.0.0.1").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port(), c.tls),
            ("127.0.0.1", 1883, false)
        );
        let c = MqttConfig::from_url("mqtts://u%40x:p%3Ass@broker.example:8884?client_id=relay-1")
            .unwrap();
        assert_eq!(
            (c.host.as_str(), c.port(), c.tls),
            ("broker.example", 8884, true)
        );
        assert_eq!(c.username.as_deref(), Some("u@x"));
        assert_eq!(c.password.as_deref(), Some("p:ss"));
        assert_eq!(c.client_id.as_deref(), Some("relay-1"));
        assert_eq!(MqttConfig::from_url("mqtts://h").unwrap().port(), 8883);
        assert_eq!(
            MqttConfig::from_url("mqtt://[::1]:1884").unwrap().host,
            "::1"
        );
    }

    #[test]
    fn bad_urls_are_named_without_password() {
        let e = MqttConfig::from_url("http://u:hunter2@h")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown scheme `http`") && !e.contains("hunter2"),
            "{e}"
        );
        let e = MqttConfig::from_url("mqtt://u:hunter2@h:99999")
            .unwrap_err()
            .to_string();
        assert!(e.contains("url") && !e.contains("hunter2"), "{e}");
        let e = MqttConfig::from_url("mqtt://h?qos=2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("qos"), "{e}");
        let dbg = format!("{:?}", MqttConfig::from_url("mqtt://u:hunter2@h").unwrap());
        assert!(!dbg.contains("hunter2"), "{dbg}");
    }

    #[test]
    fn topic_mapping() {
        let c = MqttConfig::new("h", 1883);
        assert_eq!(c.mqtt_topic("orders.created").unwrap(), "orders/created");
        let c = c.dots_to_slashes(false).topic_template("outbox/{topic}");
        assert_eq!(
            c.mqtt_topic("orders.created").unwrap(),
            "outbox/orders.created"
        );
        assert!(c.mqtt_topic("a+b").is_err());
        assert!(c.mqtt_topic("a/#").is_err());
        let c = MqttConfig::new("h", 1883);
        assert!(c.mqtt_topic("").is_err());
        assert!(c.clone().topic_template("fixed").validate().is_err());
    }
}
