//! NATS publisher settings.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::NatsError;
use crate::subject::check_subject;

/// The topic `validate` renders `subject_template` with: an ordinary
/// dot-separated topic, so a template that gives no valid subject for it
/// gives none for the topics postbox is used with.
const SAMPLE_TOPIC: &str = "orders.created";

/// Settings of a [`NatsPublisher`](crate::NatsPublisher).
///
/// Plain data; deserialises from a config file with the defaults below.
/// `Debug` shows the URL without its password.
///
/// ```
/// let cfg = postbox_nats::NatsConfig::from_url("nats://127.0.0.1:4222")?
///     .subject_template("outbox.{topic}");
/// assert_eq!(cfg.subject("orders.created"), "outbox.orders.created");
/// # Ok::<(), postbox_nats::NatsError>(())
/// ```
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct NatsConfig {
    /// Server URL: `nats://[user:password@]host[:port]` or `tls://...`
    /// (default port 4222). A token goes in the user part:
    /// `nats://token@host`. User, password and token are percent-decoded
    /// (`%40` for `@`, `%2F` for `/`, `%3A` for `:`) and sent when
    /// connecting, never logged. Required.
    pub url: String,
    /// The subject for a postbox topic: `{topic}` is replaced by the topic
    /// as it is (NATS subjects are dot-separated like postbox topics).
    /// Default `"{topic}"`. Checked at start-up with a sample topic: it must
    /// give a subject without spaces, wildcards or empty tokens, whose first
    /// token neither starts with `$` nor is `_INBOX` (system subjects; a
    /// message whose topic makes one is `Rejected`).
    #[serde(default = "default_template")]
    pub subject_template: String,
    /// How long to wait for each PubAck (and for a message to be handed to
    /// the connection), in milliseconds, before its outcome is `Transient`.
    /// Default 5000: below the relay's 10 s send timeout, so a stalled
    /// server gives outcomes rather than a cancelled batch.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// TCP + handshake timeout of one connection attempt, in milliseconds.
    /// Default 5000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Create this stream (if missing) before the first publish. Without it,
    /// a subject no stream captures gives `Rejected` naming the subject.
    #[serde(default)]
    pub create_stream: Option<StreamSpec>,
    /// Connection name shown by the server (`nats server report
    /// connections`). Default `postbox`.
    #[serde(default = "default_client_name")]
    pub client_name: String,
    /// PEM file of extra root certificates (e.g. a private CA) trusted for
    /// TLS in addition to the platform's. Default none. Setting it requires
    /// TLS also with a `nats://` URL (the connection fails rather than going
    /// on in clear text). The server's certificate is always verified;
    /// there is no setting to skip that.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// Credentials from the URL's user part. No `Debug`: they must not reach
/// a log by accident.
pub(crate) enum Credentials {
    /// `nats://user:password@host`
    UserPassword {
        /// user name, percent-decoded
        user: String,
        /// password, percent-decoded
        password: String,
    },
    /// `nats://token@host`
    Token(String),
}

/// A JetStream stream the publisher creates when it does not exist yet
/// (file storage, limits retention, the server's defaults otherwise). An
/// existing stream of that name is used as it is, never changed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct StreamSpec {
    /// Stream name, e.g. `OUTBOX`.
    pub name: String,
    /// Subjects it captures, e.g. `["outbox.>"]`.
    pub subjects: Vec<String>,
}

impl StreamSpec {
    /// A stream `name` capturing `subjects`.
    pub fn new(
        name: impl Into<String>,
        subjects: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            name: name.into(),
            subjects: subjects.into_iter().map(Into::into).collect(),
        }
    }
}

fn default_template() -> String {
    "{topic}".to_owned()
}
fn default_ack_timeout_ms() -> u64 {
    5_000
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_client_name() -> String {
    "postbox".to_owned()
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &postbox_core::redact_userinfo(&self.url))
            .field("subject_template", &self.subject_template)
            .field("ack_timeout_ms", &self.ack_timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("create_stream", &self.create_stream)
            .field("client_name", &self.client_name)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl NatsConfig {
    /// Settings for the server at `url` with every default; the URL is not
    /// checked until [`NatsConfig::validate`] (called by the publisher).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            subject_template: default_template(),
            ack_timeout_ms: default_ack_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            create_stream: None,
            client_name: default_client_name(),
            ca_file: None,
        }
    }

    /// Parses and checks `nats://[user:password@]host[:port]` (or `tls://`).
    pub fn from_url(url: &str) -> Result<Self, NatsError> {
        let config = Self::new(url);
        config.validate()?;
        Ok(config)
    }

    /// Sets [`NatsConfig::subject_template`].
    #[must_use]
    pub fn subject_template(mut self, template: impl Into<String>) -> Self {
        self.subject_template = template.into();
        self
    }

    /// Sets [`NatsConfig::ack_timeout_ms`].
    #[must_use]
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// Sets [`NatsConfig::connect_timeout_ms`].
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// Sets [`NatsConfig::create_stream`].
    #[must_use]
    pub fn create_stream(mut self, stream: StreamSpec) -> Self {
        self.create_stream = Some(stream);
        self
    }

    /// Sets [`NatsConfig::ca_file`].
    #[must_use]
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// The subject a message of `topic` is published to.
    pub fn subject(&self, topic: &str) -> String {
        self.subject_template.replace("{topic}", topic)
    }

    /// Checks every setting; errors name the bad one (never a password).
    pub fn validate(&self) -> Result<(), NatsError> {
        let url = url::Url::parse(&self.url).map_err(|e| {
            NatsError::invalid(
                "url",
                format!(
                    "{} is not a URL ({e}); expected nats://host:4222",
                    postbox_core::redact_userinfo(&self.url)
                ),
            )
        })?;
        if !matches!(url.scheme(), "nats" | "tls") {
            return Err(NatsError::invalid(
                "url",
                format!(
                    "has unknown scheme {:?} in {}; expected nats:// or tls://",
                    url.scheme(),
                    postbox_core::redact_userinfo(&self.url)
                ),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(NatsError::invalid(
                "url",
                format!("{} has no host", postbox_core::redact_userinfo(&self.url)),
            ));
        }
        if self.url.parse::<async_nats::ServerAddr>().is_err() {
            return Err(NatsError::invalid(
                "url",
                format!(
                    "{} is not a NATS server address",
                    postbox_core::redact_userinfo(&self.url)
                ),
            ));
        }
        // credentials that cannot be decoded fail here, not at `new`
        self.connect_target()?;
        if self.subject_template.trim().is_empty() {
            return Err(NatsError::invalid("subject_template", "is empty"));
        }
        // A template that cannot give a valid subject for an ordinary topic
        // would dead-letter every message (and park every key behind it):
        // refuse it at start-up instead.
        let sample = self.subject(SAMPLE_TOPIC);
        check_subject(&sample).map_err(|reason| {
            NatsError::invalid(
                "subject_template",
                format!(
                    "{:?} gives, for the topic {SAMPLE_TOPIC:?}, {reason}",
                    self.subject_template
                ),
            )
        })?;
        if self.ack_timeout_ms == 0 {
            return Err(NatsError::invalid("ack_timeout_ms", "must be above 0"));
        }
        if self.connect_timeout_ms == 0 {
            return Err(NatsError::invalid("connect_timeout_ms", "must be above 0"));
        }
        if let Some(stream) = &self.create_stream {
            if stream.name.is_empty() || stream.name.contains(['.', ' ', '*', '>', '/', '\\']) {
                return Err(NatsError::invalid(
                    "create_stream.name",
                    format!("{:?} is not a valid stream name", stream.name),
                ));
            }
            if stream.subjects.is_empty() {
                return Err(NatsError::invalid("create_stream.subjects", "is empty"));
            }
        }
        Ok(())
    }

    /// The URL to hand to async-nats, without its user part, and the
    /// credentials that were in it (percent-decoded): async-nats sends only
    /// what `ConnectOptions` carries, never the URL's user part, and would
    /// print the URL as it is in its debug logs.
    pub(crate) fn connect_target(&self) -> Result<(String, Option<Credentials>), NatsError> {
        let mut url = url::Url::parse(&self.url).map_err(|e| {
            NatsError::invalid(
                "url",
                format!(
                    "{} is not a URL ({e})",
                    postbox_core::redact_userinfo(&self.url)
                ),
            )
        })?;
        let decode = |part: &str, what: &str| {
            percent_encoding::percent_decode_str(part)
                .decode_utf8()
                .map(std::borrow::Cow::into_owned)
                .map_err(|_| {
                    NatsError::invalid(
                        "url",
                        format!(
                            "{} has a {what} that is not UTF-8 once percent-decoded",
                            postbox_core::redact_userinfo(&self.url)
                        ),
                    )
                })
        };
        let credentials = match (url.username(), url.password()) {
            ("", None) => None,
            (user, Some(password)) => Some(Credentials::UserPassword {
                user: decode(user, "user name")?,
                password: decode(password, "password")?,
            }),
            (token, None) => Some(Credentials::Token(decode(token, "token")?)),
        };
        // cannot fail for the nats:// and tls:// URLs `validate` accepts
        // (they have a host); checked anyway rather than unwrapped
        if url.set_password(None).is_err() || url.set_username("").is_err() {
            return Err(NatsError::invalid(
                "url",
                format!(
                    "{} cannot carry credentials",
                    postbox_core::redact_userinfo(&self.url)
                ),
            ));
        }
        Ok((url.into(), credentials))
    }

    /// `host:port` of the server, for messages.
    pub(crate) fn server(&self) -> String {
        postbox_core::redact_userinfo(&self.url)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_names_bad_ones() {
        assert!(NatsConfig::from_url("nats://127.0.0.1:4222").is_ok());
        assert!(NatsConfig::from_url("tls://nats.example.com").is_ok());
        let e = NatsConfig::from_url("kafka://h:1").unwrap_err().to_string();
        assert!(e.contains("url") && e.contains("kafka"), "{e}");
        let e = NatsConfig::from_url("not a url").unwrap_err().to_string();
        assert!(e.contains("url"), "{e}");
    }

    #[test]
    fn passwords_never_show() {
        let e = NatsConfig::from_url("amqp://alice:s3cret@h:1")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cret") && !e.contains("alice"), "{e}");
        let cfg = NatsConfig::new("nats://alice:s3cret@h:4222");
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("s3cret"), "{dbg}");
        let e = NatsConfig::from_url("nats://tok3n@h:99999")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("tok3n"), "{e}");
    }

    #[test]
    fn subject_from_template() {
        let cfg = NatsConfig::new("nats://h").subject_template("out.{topic}.v1");
        assert_eq!(cfg.subject("orders"), "out.orders.v1");
        assert_eq!(NatsConfig::new("nats://h").subject("a.b"), "a.b");
    }

    #[test]
    fn a_template_that_gives_no_valid_subject_is_refused() {
        for template in [
            "outbox {topic}",
            "outbox.{topic}.>",
            "$JS.API.{topic}",
            "{topic}.",
        ] {
            let e = NatsConfig::new("nats://h")
                .subject_template(template)
                .validate()
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("subject_template") && e.contains(&format!("{template:?}")),
                "{e}"
            );
        }
        for template in [
            "{topic}",
            "outbox.{topic}",
            "out.{topic}.v1",
            "_INBOXES.{topic}",
        ] {
            assert!(
                NatsConfig::new("nats://h")
                    .subject_template(template)
                    .validate()
                    .is_ok(),
                "{template}"
            );
        }
    }

    #[test]
    fn credentials_are_taken_from_the_url_and_removed_from_it() {
        let (url, c) = NatsConfig::new("nats://al%40ice:p%2Fw%3Ad@h:4222")
            .connect_target()
            .unwrap();
        assert_eq!(url, "nats://h:4222");
        match c {
            Some(Credentials::UserPassword { user, password }) => {
                assert_eq!((user.as_str(), password.as_str()), ("al@ice", "p/w:d"))
            }
            _ => panic!("expected user and password"),
        }
        let (url, c) = NatsConfig::new("tls://t0k%2Fen@h")
            .connect_target()
            .unwrap();
        assert_eq!(url, "tls://h");
        assert!(matches!(c, Some(Credentials::Token(t)) if t == "t0k/en"));
        let (_, c) = NatsConfig::new("nats://h:4222").connect_target().unwrap();
        assert!(c.is_none());
        let e = NatsConfig::new("nats://u:%FF%FEs3cret@h")
            .connect_target()
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("password") && !e.contains("s3cret"), "{e}");
        assert!(NatsConfig::from_url("nats://u:%FF%FEs3cret@h").is_err());
    }

    #[test]
    fn bad_settings_are_named() {
        let e = NatsConfig::new("nats://h")
            .subject_template(" ")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("subject_template"), "{e}");
        let e = NatsConfig::new("nats://h")
            .create_stream(StreamSpec::new("a.b", ["x.>"]))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("create_stream.name"), "{e}");
    }
}
