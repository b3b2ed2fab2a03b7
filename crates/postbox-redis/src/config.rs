//! Redis publisher settings.

use std::time::Duration;

use serde::Deserialize;

use crate::RedisError;

/// Settings of a [`RedisPublisher`](crate::RedisPublisher).
///
/// Plain data; deserialises from a config file with the defaults below.
/// `Debug` shows the URL without its password.
///
/// ```
/// let cfg = postbox_redis::RedisConfig::from_url("redis://127.0.0.1:6379/0")?
///     .stream_template("outbox:{topic}");
/// assert_eq!(cfg.stream_key("orders"), "outbox:orders");
/// # Ok::<(), postbox_redis::RedisError>(())
/// ```
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisConfig {
    /// Server URL: `redis://[[user]:password@]host[:port][/db]` (default port
    /// 6379, db 0). TLS (`rediss://`) is not built in. Required.
    pub url: String,
    /// The stream key for a postbox topic: `{topic}` is replaced by the
    /// topic as it is. Default `"{topic}"`, like the subject / topic
    /// templates of the other publishers; use e.g. `"outbox:{topic}"` to
    /// keep the streams apart from other keys.
    #[serde(default = "default_template")]
    pub stream_template: String,
    /// Trim each stream to about this many entries (`XADD ... MAXLEN ~ n`,
    /// which trims whole radix-tree nodes: cheap, and never below `n`).
    /// Default: no trimming.
    #[serde(default)]
    pub maxlen: Option<u64>,
    /// After the batch, wait until this many replicas acknowledged it
    /// (`WAIT n wait_timeout_ms`, in the same round trip). Fewer in time
    /// makes the whole batch `Transient` (it stays on the primary: the
    /// retry adds duplicate entries with the same `id` field). Default: no
    /// wait, `Ok` as soon as the primary took the entry.
    #[serde(default)]
    pub wait_replicas: Option<u32>,
    /// Timeout of `WAIT`, in milliseconds. Default 1000.
    #[serde(default = "default_wait_timeout_ms")]
    pub wait_timeout_ms: u64,
    /// How long to wait for the replies of a batch, in milliseconds, before
    /// its outcomes are `Transient`. Default 5000: below the relay's 10 s
    /// send timeout.
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// Timeout of one connection attempt, in milliseconds. Default 5000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

fn default_template() -> String {
    "{topic}".to_owned()
}
fn default_wait_timeout_ms() -> u64 {
    1_000
}
fn default_response_timeout_ms() -> u64 {
    5_000
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &postbox_core::redact_userinfo(&self.url))
            .field("stream_template", &self.stream_template)
            .field("maxlen", &self.maxlen)
            .field("wait_replicas", &self.wait_replicas)
            .field("wait_timeout_ms", &self.wait_timeout_ms)
            .field("response_timeout_ms", &self.response_timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .finish()
    }
}

impl RedisConfig {
    /// Settings for the server at `url` with every default; the URL is not
    /// checked until [`RedisConfig::validate`].
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            stream_template: default_template(),
            maxlen: None,
            wait_replicas: None,
            wait_timeout_ms: default_wait_timeout_ms(),
            response_timeout_ms: default_response_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
        }
    }

    /// Parses and checks `redis://[[user]:password@]host[:port][/db]`.
    pub fn from_url(url: &str) -> Result<Self, RedisError> {
        let config = Self::new(url);
        config.validate()?;
        Ok(config)
    }

    /// Sets [`RedisConfig::stream_template`].
    #[must_use]
    pub fn stream_template(mut self, template: impl Into<String>) -> Self {
        self.stream_template = template.into();
        self
    }

    /// Sets [`RedisConfig::maxlen`].
    #[must_use]
    pub fn maxlen(mut self, maxlen: u64) -> Self {
        self.maxlen = Some(maxlen);
        self
    }

    /// Sets [`RedisConfig::wait_replicas`] and [`RedisConfig::wait_timeout_ms`].
    #[must_use]
    pub fn wait_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait_replicas = Some(replicas);
        self.wait_timeout_ms = millis(timeout);
        self
    }

    /// Sets [`RedisConfig::response_timeout_ms`].
    #[must_use]
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout_ms = millis(timeout);
        self
    }

    /// Sets [`RedisConfig::connect_timeout_ms`].
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout_ms = millis(timeout);
        self
    }

    /// The stream key of a message of `topic`.
    pub fn stream_key(&self, topic: &str) -> String {
        self.stream_template.replace("{topic}", topic)
    }

    /// Checks every setting; errors name the bad one (never a password).
    pub fn validate(&self) -> Result<(), RedisError> {
        let url = url::Url::parse(&self.url).map_err(|e| {
            RedisError::invalid(
                "url",
                format!(
                    "{} is not a URL ({e}); expected redis://host:6379",
                    postbox_core::redact_userinfo(&self.url)
                ),
            )
        })?;
        match url.scheme() {
            "redis" => {}
            "rediss" => {
                return Err(RedisError::invalid(
                    "url",
                    "uses rediss:// (TLS), which this build of postbox-redis does not support",
                ));
            }
            other => {
                return Err(RedisError::invalid(
                    "url",
                    format!(
                        "has unknown scheme {other:?} in {}; expected redis://",
                        postbox_core::redact_userinfo(&self.url)
                    ),
                ));
            }
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(RedisError::invalid(
                "url",
                format!("{} has no host", postbox_core::redact_userinfo(&self.url)),
            ));
        }
        if redis::Client::open(self.url.as_str()).is_err() {
            return Err(RedisError::invalid(
                "url",
                format!(
                    "{} is not a valid Redis URL",
                    postbox_core::redact_userinfo(&self.url)
                ),
            ));
        }
        if self.stream_template.is_empty() {
            return Err(RedisError::invalid("stream_template", "is empty"));
        }
        if self.maxlen == Some(0) {
            return Err(RedisError::invalid(
                "maxlen",
                "is 0, which would trim every entry away",
            ));
        }
        if self.wait_replicas.is_some() && self.wait_timeout_ms >= self.response_timeout_ms {
            // WAIT holds the connection: the client would give up first,
            // and every batch sharing the connection with it
            return Err(RedisError::invalid(
                "wait_timeout_ms",
                format!(
                    "must be shorter than response_timeout_ms ({} ms), which has to cover the WAIT",
                    self.response_timeout_ms
                ),
            ));
        }
        for (name, value) in [
            ("wait_timeout_ms", self.wait_timeout_ms),
            ("response_timeout_ms", self.response_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
        ] {
            if value == 0 {
                return Err(RedisError::invalid(name, "must be above 0"));
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
    fn wait_must_end_before_the_response_timeout() {
        let c = RedisConfig::from_url("redis://h")
            .unwrap()
            .wait_replicas(1, Duration::from_secs(10));
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("wait_timeout_ms"), "{e}");
        c.response_timeout(Duration::from_secs(11))
            .validate()
            .unwrap();
    }

    #[test]
    fn parses_urls_and_names_bad_ones() {
        assert!(RedisConfig::from_url("redis://127.0.0.1:6379").is_ok());
        assert!(RedisConfig::from_url("redis://:pw@127.0.0.1:6379/2").is_ok());
        let e = RedisConfig::from_url("amqp://h:1").unwrap_err().to_string();
        assert!(e.contains("url") && e.contains("amqp"), "{e}");
        let e = RedisConfig::from_url("rediss://h").unwrap_err().to_string();
        assert!(e.contains("TLS"), "{e}");
        let e = RedisConfig::from_url("redis://h").map(|c| c.maxlen(0).validate());
        assert!(e.unwrap().unwrap_err().to_string().contains("maxlen"));
    }

    #[test]
    fn passwords_never_show() {
        let e = RedisConfig::from_url("http://alice:s3cret@h:1")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cret") && !e.contains("alice"), "{e}");
        let e = RedisConfig::from_url("redis://:s3cret@h:99999")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cret"), "{e}");
        let dbg = format!("{:?}", RedisConfig::new("redis://:s3cret@h"));
        assert!(!dbg.contains("s3cret"), "{dbg}");
    }

    #[test]
    fn stream_key_from_template() {
        assert_eq!(RedisConfig::new("redis://h").stream_key("a.b"), "a.b");
        let cfg = RedisConfig::new("redis://h").stream_template("x:{topic}:y");
        assert_eq!(cfg.stream_key("a"), "x:a:y");
    }
}
