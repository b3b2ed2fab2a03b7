//! Webhook publisher settings.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::HttpError;

/// Settings of an [`HttpPublisher`](crate::HttpPublisher): one fixed URL
/// that every message routed to this publisher is POSTed to.
///
/// Plain data; deserialises from a config file with the defaults below.
/// `Debug` never shows the secret, nor the URL's user info, query or fragment.
///
/// ```
/// use postbox_http::HttpConfig;
/// let cfg = HttpConfig::from_url("https://hooks.example.com/orders")?
///     .secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
///     .concurrency(32);
/// # Ok::<(), postbox_http::HttpError>(())
/// ```
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HttpConfig {
    /// Destination URL (`http://` or `https://`). Required.
    pub url: String,
    /// Standard Webhooks signing secret, `whsec_<base64 key>`. Required
    /// unless `unsigned` is true.
    #[serde(default)]
    pub secret: Option<String>,
    /// Send unsigned requests (no `webhook-signature`). Default `false`: a
    /// missing secret is a configuration error, never a silent downgrade.
    #[serde(default)]
    pub unsigned: bool,
    /// Requests in flight at once within one batch. Default 16. Messages
    /// with the same key are always sent one after the other, in order.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Whole-request timeout (connect, send, response headers) in
    /// milliseconds. Default 8000: below the relay's 10 s send timeout, so
    /// a slow endpoint gives `Transient` outcomes rather than a cancelled
    /// batch.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// TCP + TLS connect timeout in milliseconds. Default 3000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Allow loopback, private, link-local and other internal destinations
    /// (the SSRF guard). Default `false`.
    #[serde(default)]
    pub allow_private_networks: bool,
    /// Prefix put before every message header name, e.g. `"x-postbox-"`.
    /// Default `""`: headers pass through under their own names (so
    /// `traceparent` and `content-type` mean what they say).
    #[serde(default)]
    pub header_prefix: String,
    /// PEM file of extra root certificates (e.g. a private CA) trusted for
    /// `https://` in addition to the platform's. Default none. Server
    /// certificates are always verified; there is no setting to skip that.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_concurrency() -> usize {
    16
}
fn default_timeout_ms() -> u64 {
    8_000
}
fn default_connect_timeout_ms() -> u64 {
    3_000
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field(
                "url",
                &url::Url::parse(&self.url).map_or_else(
                    // not a URL (`HttpPublisher::new` refuses it)
                    |_| shown_unparsed(&self.url),
                    |u| crate::publisher::shown_url(&u),
                ),
            )
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("unsigned", &self.unsigned)
            .field("concurrency", &self.concurrency)
            .field("timeout_ms", &self.timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("allow_private_networks", &self.allow_private_networks)
            .field("header_prefix", &self.header_prefix)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl HttpConfig {
    /// Settings for `url` with every default (and no secret yet).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            secret: None,
            unsigned: false,
            concurrency: default_concurrency(),
            timeout_ms: default_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            allow_private_networks: false,
            header_prefix: String::new(),
            ca_file: None,
        }
    }

    /// Parses and checks a webhook URL (`http(s)://host[:port]/path`).
    /// Errors name the problem, never the password.
    pub fn from_url(url: &str) -> Result<Self, HttpError> {
        parse_url(url)?;
        Ok(Self::new(url))
    }

    /// Sets the signing secret (`whsec_...`).
    #[must_use]
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = Some(secret.into());
        self
    }

    /// Sends unsigned requests (explicit opt-out of signing).
    #[must_use]
    pub fn unsigned(mut self, unsigned: bool) -> Self {
        self.unsigned = unsigned;
        self
    }

    /// Requests in flight at once within one batch.
    #[must_use]
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Whole-request timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// Allows internal destinations (turns the SSRF guard off).
    #[must_use]
    pub fn allow_private_networks(mut self, allow: bool) -> Self {
        self.allow_private_networks = allow;
        self
    }

    /// Prefix for message header names.
    #[must_use]
    pub fn header_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.header_prefix = prefix.into();
        self
    }

    /// Trusts the root certificates in this PEM file too (see
    /// [`HttpConfig::ca_file`]).
    #[must_use]
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }
}

/// A string that did not parse as a URL, as messages show it: as
/// [`crate::publisher::shown_url`] would, nothing after the host (a path or
/// query may hold the webhook's credential) and no user info.
fn shown_unparsed(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    // User info ends at the last `@` of the whole text: a password may hold
    // an unescaped `/`, `?` or `#` (`https://svc:ab/cd@host/x`), so nothing
    // before that `@` is shown, wherever it seems to end.
    let rest = rest.rsplit_once('@').map_or(rest, |(_, after)| after);
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let mut shown = if scheme.is_empty() {
        host.to_owned()
    } else {
        format!("{scheme}://{host}")
    };
    if !path.is_empty() && path != "/" {
        shown.push_str("/…");
    }
    shown
}

pub(crate) fn parse_url(url: &str) -> Result<url::Url, HttpError> {
    let parsed = url::Url::parse(url).map_err(|e| {
        HttpError::invalid("url", format!("{} is not a URL: {e}", shown_unparsed(url)))
    })?;
    match parsed.scheme() {
        "http" | "https" => {}
        other => {
            return Err(HttpError::invalid(
                "url",
                format!("unknown scheme `{other}`: a webhook URL starts with http:// or https://"),
            ));
        }
    }
    if parsed.host().is_none() {
        return Err(HttpError::invalid("url", "has no host"));
    }
    Ok(parsed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_unparsable_url_shows_neither_path_nor_query() {
        let e = HttpConfig::from_url(
            "https://u:pw@x.azurewebsites.net:99999/api/f/SECRET?code=SECRET2",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("https://x.azurewebsites.net:99999/…"), "{e}");
        assert!(!e.contains("SECRET") && !e.contains("pw"), "{e}");
        // a password holding an unescaped `/` or `?`
        for url in [
            "https://svc:ab/cdSECRET@hooks.example.com:99999/x",
            "https://svc:p?ssSECRET@hooks.example.com:99999/x",
        ] {
            let e = HttpConfig::from_url(url).unwrap_err().to_string();
            assert!(e.contains("https://hooks.example.com:99999/…"), "{e}");
            assert!(!e.contains("SECRET") && !e.contains("svc"), "{e}");
        }
    }

    #[test]
    fn from_url_checks_scheme_and_hides_password() {
        assert!(HttpConfig::from_url("https://example.com/hook").is_ok());
        let e = HttpConfig::from_url("ftp://example.com/").unwrap_err();
        assert!(e.to_string().contains("unknown scheme `ftp`"), "{e}");
        let e = HttpConfig::from_url("not a url").unwrap_err();
        assert!(e.to_string().contains("url"), "{e}");
        let cfg = HttpConfig::from_url("https://user:hunter2@example.com/hook")
            .unwrap()
            .secret("whsec_c2VjcmV0");
        let dbg = format!("{cfg:?}");
        assert!(
            !dbg.contains("hunter2") && !dbg.contains("c2VjcmV0"),
            "{dbg}"
        );
        // a token in the query or as the user name is not shown either
        let cfg = HttpConfig::from_url("https://tok3n@example.com/hook?token=abc123#frag").unwrap();
        let dbg = format!("{cfg:?}");
        assert!(dbg.contains("https://example.com/…#"), "{dbg}");
        assert!(
            !dbg.contains("abc123") && !dbg.contains("tok3n") && !dbg.contains("frag"),
            "{dbg}"
        );
    }

    #[test]
    fn deserialises_with_defaults() {
        let cfg: HttpConfig =
            serde_json::from_str(r#"{"url":"https://example.com/","secret":"whsec_c2VjcmV0"}"#)
                .unwrap();
        assert_eq!(cfg.concurrency, 16);
        assert_eq!(cfg.timeout_ms, 8000);
        assert!(!cfg.allow_private_networks);
        assert!(!cfg.unsigned);
    }
}
