//! The webhook publisher: one signed POST per message, bounded concurrency,
//! same-key messages strictly one after the other.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt as _;
use postbox_core::{Message, PublishOutcome, Publisher, by_deadline};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::HttpError;
use crate::config::{HttpConfig, parse_url};
use crate::guard::{GuardedResolver, refusal, refused_in_chain};
use crate::sign::WebhookSecret;

/// How much of an error response body goes into a `Rejected` reason.
const EXCERPT_CHARS: usize = 200;
/// How much of a response body is read at most (the rest is dropped).
const READ_CAP: usize = 64 * 1024;

/// Header names a message header may not set: framing, hop-by-hop, and the
/// ones this publisher owns.
const RESERVED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
    "proxy-connection",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "postbox-topic",
    "postbox-key",
];

/// Publishes each message as an HTTP POST to one fixed URL, signed per the
/// Standard Webhooks spec. Cheap to clone (shares one connection pool).
///
/// Per message: body = the payload bytes; headers `webhook-id` (the message
/// id), `webhook-timestamp` (Unix seconds), `webhook-signature`
/// (`v1,<base64 HMAC-SHA256>`), `postbox-topic`, `postbox-key` (when keyed),
/// `content-type` (the message's, else `application/octet-stream`) and every
/// message header (under `header_prefix`, default none).
///
/// Outcomes: 2xx → `Ok`; 408, 429, 5xx, timeouts and connection errors →
/// `Transient` (with `Retry-After` honoured); 3xx (redirects are not
/// followed), other 4xx, a destination refused by the SSRF guard, or a
/// header that cannot be sent → `Rejected`. A message after a failed one of
/// its key in the same batch, or whose turn comes after the deadline of
/// [`Publisher::publish_until`], is not sent (`NotSent`); a request still
/// running at that deadline is abandoned (`Transient`).
#[derive(Clone)]
pub struct HttpPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    url: Url,
    /// For logs and reasons: the URL without its password, query or fragment.
    display_url: String,
    secret: Option<WebhookSecret>,
    concurrency: usize,
    header_prefix: String,
}

impl std::fmt::Debug for HttpPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpPublisher")
            .field("url", &self.inner.display_url)
            .field("signed", &self.inner.secret.is_some())
            .field("concurrency", &self.inner.concurrency)
            .finish_non_exhaustive()
    }
}

impl HttpPublisher {
    /// Builds the publisher. Nothing is contacted: an endpoint that is down
    /// now only yields `Transient` outcomes later.
    ///
    /// Fails on a bad URL, a missing or malformed secret (unless
    /// `unsigned`), zero concurrency, or an IP-literal host the SSRF guard
    /// refuses.
    pub fn new(config: HttpConfig) -> Result<Self, HttpError> {
        let url = parse_url(&config.url)?;
        let secret = match (&config.secret, config.unsigned) {
            (Some(s), false) => Some(WebhookSecret::parse(s)?),
            (None, false) => {
                return Err(HttpError::invalid(
                    "secret",
                    "is missing: a signed webhook needs `secret = \"whsec_...\"` (or set `unsigned = true`)",
                ));
            }
            (_, true) => None,
        };
        if config.concurrency == 0 {
            return Err(HttpError::invalid("concurrency", "must be at least 1"));
        }
        if config.timeout_ms == 0 {
            return Err(HttpError::invalid("timeout_ms", "must be at least 1"));
        }
        let prefix = config.header_prefix.to_ascii_lowercase();
        if !prefix.is_empty() && HeaderName::from_bytes(prefix.as_bytes()).is_err() {
            return Err(HttpError::invalid(
                "header_prefix",
                "must be made of header-name characters",
            ));
        }
        if !config.allow_private_networks {
            // reqwest connects to IP literals without asking the resolver
            let ip = match url.host() {
                Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::V4(ip)),
                Some(url::Host::Ipv6(ip)) => Some(std::net::IpAddr::V6(ip)),
                _ => None,
            };
            if let Some(ip) = ip
                && let Some(why) = refusal(ip)
            {
                return Err(HttpError::invalid(
                    "url",
                    format!(
                        "host {ip} is {why}; webhooks to internal addresses need `allow_private_networks = true`"
                    ),
                ));
            }
        }
        let mut builder = reqwest::Client::builder();
        if let Some(path) = &config.ca_file {
            builder = builder.tls_certs_merge(extra_roots(path)?);
        }
        let client = builder
            .dns_resolver(GuardedResolver {
                allow_private: config.allow_private_networks,
            })
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms.max(1)))
            .user_agent(concat!("postbox/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| HttpError::Client(e.without_url()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                display_url: shown_url(&url),
                url,
                secret,
                concurrency: config.concurrency,
                header_prefix: prefix,
            }),
        })
    }

    /// Same as [`HttpPublisher::new`]; there is no connection to open up
    /// front. Offered so every postbox publisher starts the same way.
    pub async fn connect(config: HttpConfig) -> Result<Self, HttpError> {
        Self::new(config)
    }

    /// Sends `batch`: each key's messages one after the other, lanes
    /// concurrently. With a deadline, a message whose turn comes after it is
    /// `NotSent` and a request still running at it is cut short (`Transient`:
    /// the endpoint may have got it).
    async fn publish_batch(
        &self,
        batch: &[Message],
        deadline: Option<Instant>,
    ) -> Vec<PublishOutcome> {
        // Lanes: all messages of one key in batch order (sent one after the
        // other), each keyless message alone. Lanes run concurrently.
        let mut lanes: Vec<Vec<usize>> = Vec::new();
        let mut lane_of_key: HashMap<&str, usize> = HashMap::new();
        for (i, m) in batch.iter().enumerate() {
            match m.key.as_deref() {
                Some(k) => match lane_of_key.get(k) {
                    Some(&lane) => lanes[lane].push(i),
                    None => {
                        lane_of_key.insert(k, lanes.len());
                        lanes.push(vec![i]);
                    }
                },
                None => lanes.push(vec![i]),
            }
        }
        let mut outcomes: Vec<Option<PublishOutcome>> = vec![None; batch.len()];
        let results: Vec<Vec<(usize, PublishOutcome)>> = futures_util::stream::iter(lanes)
            .map(|lane| async move {
                let mut done = Vec::with_capacity(lane.len());
                let mut failed = false;
                for i in lane {
                    // keep key order: nothing after a failed message of its key
                    let late = deadline.is_some_and(|d| Instant::now() >= d);
                    if failed || late {
                        done.push((i, PublishOutcome::NotSent));
                        failed = true;
                        continue;
                    }
                    let outcome = self.send_one(&batch[i], deadline).await;
                    failed = !outcome.is_ok();
                    done.push((i, outcome));
                }
                done
            })
            .buffer_unordered(self.inner.concurrency)
            .collect()
            .await;
        for (i, o) in results.into_iter().flatten() {
            outcomes[i] = Some(o);
        }
        let outcomes: Vec<PublishOutcome> = outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| PublishOutcome::transient("internal: no outcome")))
            .collect();
        // one line per batch, not per message: an endpoint that is down (or
        // whose certificate is refused) fails every request the same way
        let mut failed = outcomes.iter().filter_map(|o| match o {
            PublishOutcome::Transient { reason, .. } => Some(reason),
            _ => None,
        });
        if let Some(first) = failed.next() {
            tracing::warn!(
                url = %self.inner.display_url,
                failed = 1 + failed.count(),
                of = outcomes.len(),
                reason = %first,
                "webhook requests failed; they will be retried"
            );
        }
        let not_sent = outcomes
            .iter()
            .filter(|o| matches!(o, PublishOutcome::NotSent))
            .count();
        if not_sent > 0 {
            tracing::debug!(
                url = %self.inner.display_url,
                not_sent,
                of = outcomes.len(),
                "webhook messages not sent (the batch's deadline, or an earlier message of their key failed); given back untouched"
            );
        }
        outcomes
    }

    /// One request. A deadline cuts it short until the status arrives
    /// (`Transient`); after that only the body excerpt, which the outcome
    /// can do without.
    async fn send_one(&self, m: &Message, deadline: Option<Instant>) -> PublishOutcome {
        let headers = match self.headers_for(m) {
            Ok(h) => h,
            Err(reason) => return PublishOutcome::rejected(reason),
        };
        let send = self
            .inner
            .client
            .post(self.inner.url.clone())
            .headers(headers)
            .body(m.payload.clone())
            .send();
        let mut resp = match by_deadline(deadline, send).await {
            Some(Ok(r)) => r,
            Some(Err(e)) => return self.transport_outcome(e),
            None => {
                return PublishOutcome::transient(format!(
                    "POST {} cut short by the batch's deadline (the endpoint may have received it)",
                    self.inner.display_url
                ));
            }
        };
        let status = resp.status();
        let retry_after = retry_after(resp.headers());
        let excerpt = by_deadline(deadline, read_excerpt(&mut resp))
            .await
            .unwrap_or_default();
        outcome_for_status(status, retry_after, &excerpt)
    }

    fn transport_outcome(&self, e: reqwest::Error) -> PublishOutcome {
        let e = e.without_url();
        if let Some(refused) = refused_in_chain(&e) {
            // what the name resolves to may change (a DNS mistake, a
            // sinkhole answering 0.0.0.0): retried, not dead-lettered
            return PublishOutcome::transient(format!(
                "webhook destination {} refused: {refused}",
                self.inner.display_url
            ));
        }
        let what = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "connection failed"
        } else {
            "request failed"
        };
        PublishOutcome::transient(format!(
            "POST {} {what}: {}",
            self.inner.display_url,
            error_chain(&e)
        ))
    }

    fn headers_for(&self, m: &Message) -> Result<HeaderMap, String> {
        let mut h = HeaderMap::new();
        let id = m.id.to_string();
        let content_type = m
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.as_str())
            .unwrap_or("application/octet-stream");
        h.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_bytes(content_type.as_bytes())
                .map_err(|_| "header content-type has a value that cannot be sent".to_owned())?,
        );
        for (name, value) in &m.headers {
            let full = format!("{}{}", self.inner.header_prefix, name.to_ascii_lowercase());
            if RESERVED.contains(&full.as_str()) {
                return Err(format!(
                    "header `{name}` cannot be sent: the name is reserved for HTTP framing or the webhook signature"
                ));
            }
            let hn = HeaderName::from_bytes(full.as_bytes())
                .map_err(|_| format!("header `{name}` is not a valid HTTP header name"))?;
            // Non-ASCII values go out as their raw UTF-8 bytes (obs-text).
            let hv = HeaderValue::from_bytes(value.as_bytes()).map_err(|_| {
                format!(
                    "header `{name}` has a value that cannot be sent in HTTP (control characters)"
                )
            })?;
            h.insert(hn, hv);
        }
        h.insert(
            HeaderName::from_static("postbox-topic"),
            HeaderValue::from_bytes(m.topic.as_bytes())
                .map_err(|_| "the topic cannot be sent as a header value".to_owned())?,
        );
        if let Some(key) = &m.key {
            h.insert(
                HeaderName::from_static("postbox-key"),
                HeaderValue::from_bytes(key.as_bytes())
                    .map_err(|_| "the key cannot be sent as a header value".to_owned())?,
            );
        }
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        h.insert(
            HeaderName::from_static("webhook-id"),
            HeaderValue::from_str(&id).map_err(|e| e.to_string())?,
        );
        h.insert(
            HeaderName::from_static("webhook-timestamp"),
            HeaderValue::from(timestamp),
        );
        if let Some(secret) = &self.inner.secret {
            let sig = secret.sign(&id, timestamp, &m.payload);
            h.insert(
                HeaderName::from_static("webhook-signature"),
                HeaderValue::from_str(&sig).map_err(|e| e.to_string())?,
            );
        }
        Ok(h)
    }
}

impl HttpPublisher {
    /// A publish in its `postbox.publish` span.
    fn traced(
        &self,
        batch: &[Message],
        deadline: Option<Instant>,
    ) -> impl Future<Output = Vec<PublishOutcome>> + Send {
        let span = postbox_core::publish_span("http", batch);
        self.publish_batch(batch, deadline).instrument(span)
    }
}

impl Publisher for HttpPublisher {
    fn publish(&self, batch: &[Message]) -> impl Future<Output = Vec<PublishOutcome>> + Send {
        self.traced(batch, None)
    }

    fn publish_until(
        &self,
        batch: &[Message],
        deadline: Instant,
    ) -> impl Future<Output = Vec<PublishOutcome>> + Send {
        self.traced(batch, Some(deadline))
    }
}

/// Maps a response status to an outcome.
pub(crate) fn outcome_for_status(
    status: StatusCode,
    retry_after: Option<Duration>,
    excerpt: &str,
) -> PublishOutcome {
    let code = status.as_u16();
    let label = match status.canonical_reason() {
        Some(r) => format!("HTTP {code} {r}"),
        None => format!("HTTP {code}"),
    };
    let with_body = if excerpt.is_empty() {
        label.clone()
    } else {
        format!("{label}: {excerpt}")
    };
    if status.is_success() {
        PublishOutcome::Ok
    } else if matches!(code, 408 | 409 | 423 | 425 | 429)
        || status.is_server_error()
        || status.is_informational()
        || code >= 600
    {
        // timeouts, conflicts, locks, "too early", throttling and server
        // errors pass; so may a status no endpoint should send
        PublishOutcome::Transient {
            reason: with_body,
            retry_after,
        }
    } else if status.is_redirection() {
        PublishOutcome::rejected(format!("{label}: redirects are not followed"))
    } else {
        PublishOutcome::rejected(with_body)
    }
}

/// `url` as logs, reasons and `Debug` show it: scheme, host and port, and
/// for the path only a fingerprint (`/…#1a2b3c4d`, the first 4 bytes of its
/// SHA-256). Slack, Discord and Teams put the webhook's credential in the
/// path, and these texts end up in logs and in the outbox's `last_error`;
/// the fingerprint still tells two endpoints of one host apart. No user
/// info, query or fragment either (`https://TOKEN@host`, `?token=…`).
pub(crate) fn shown_url(url: &url::Url) -> String {
    use sha2::Digest as _;
    // An `@` in the path may mean user info the parser split at an
    // unescaped `/` (`https://TOK/EN@host/x` parses with host `tok`): then
    // the host is not shown either.
    let host = if url.path().contains('@') {
        "<redacted>"
    } else {
        url.host_str().unwrap_or("")
    };
    let mut shown = format!("{}://{host}", url.scheme());
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    let path = url.path();
    if !path.is_empty() && path != "/" {
        let digest = sha2::Sha256::digest(path.as_bytes());
        shown.push_str("/…#");
        for b in &digest[..4] {
            shown.push_str(&format!("{b:02x}"));
        }
    }
    shown
}

/// `Retry-After` as delay-seconds or an HTTP date.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// How long a 2xx's body is read (and thrown away) before the response is
/// dropped: a short body read to its end keeps the connection for the next
/// request; one that trickles must not hold the lane.
const SUCCESS_BODY_WAIT: Duration = Duration::from_millis(500);

/// Reads up to [`READ_CAP`] bytes of the body and returns a short,
/// single-line excerpt of it; for a 2xx nothing (the body is read for at
/// most [`SUCCESS_BODY_WAIT`]).
async fn read_excerpt(resp: &mut reqwest::Response) -> String {
    let success = resp.status().is_success();
    let read = async {
        let mut buf: Vec<u8> = Vec::new();
        while buf.len() < READ_CAP {
            match resp.chunk().await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
                _ => break,
            }
        }
        buf
    };
    if success {
        let _ = tokio::time::timeout(SUCCESS_BODY_WAIT, read).await;
        return String::new();
    }
    excerpt(&read.await)
}

pub(crate) fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(EXCERPT_CHARS)
        .collect();
    if text.chars().count() > EXCERPT_CHARS {
        out.push('…');
    }
    out.trim().to_owned()
}

/// The certificates of a `ca_file`, refusing a file without any.
fn extra_roots(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, HttpError> {
    let pem = std::fs::read(path).map_err(|e| {
        HttpError::invalid("ca_file", format!("cannot read {}: {e}", path.display()))
    })?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        HttpError::invalid(
            "ca_file",
            format!("{} is not a PEM certificate bundle: {e}", path.display()),
        )
    })?;
    if certs.is_empty() {
        return Err(HttpError::invalid(
            "ca_file",
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping() {
        let s = |c| StatusCode::from_u16(c).unwrap();
        assert!(outcome_for_status(s(200), None, "").is_ok());
        assert!(outcome_for_status(s(204), None, "").is_ok());
        for c in [408, 409, 423, 425, 429, 500, 502, 503, 504, 101, 600] {
            assert!(
                matches!(
                    outcome_for_status(s(c), Some(Duration::from_secs(3)), "x"),
                    PublishOutcome::Transient { retry_after: Some(d), .. } if d == Duration::from_secs(3)
                ),
                "{c}"
            );
        }
        for c in [301, 400, 401, 403, 404, 410, 413, 422] {
            assert!(
                matches!(
                    outcome_for_status(s(c), None, "bad"),
                    PublishOutcome::Rejected { .. }
                ),
                "{c}"
            );
        }
        match outcome_for_status(s(422), None, "field x is wrong") {
            PublishOutcome::Rejected { reason } => {
                assert_eq!(reason, "HTTP 422 Unprocessable Entity: field x is wrong")
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn shown_urls_hide_credentials_in_the_path() {
        let u = |s: &str| url::Url::parse(s).unwrap();
        let slack = shown_url(&u("https://hooks.slack.com/services/T0/B0/XXXXSECRET"));
        assert!(slack.starts_with("https://hooks.slack.com/…#"), "{slack}");
        assert!(!slack.contains("XXXX") && !slack.contains("T0"), "{slack}");
        let other = shown_url(&u("https://hooks.slack.com/services/T0/B0/YYYY"));
        assert_ne!(slack, other, "two endpoints of one host look alike");
        assert_eq!(
            shown_url(&u("http://u:p@[::1]:8080/?token=t#f")),
            "http://[::1]:8080"
        );
        assert_eq!(shown_url(&u("https://example.com")), "https://example.com");
        let split = shown_url(&u("https://TOK/EN@host/x"));
        assert!(split.starts_with("https://<redacted>/…#"), "{split}");
        assert!(!split.to_lowercase().contains("tok"), "{split}");
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("120"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(120)));
        let future = SystemTime::now() + Duration::from_secs(3600);
        h.insert(
            "retry-after",
            HeaderValue::from_str(&httpdate::fmt_http_date(future)).unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(3500) && d <= Duration::from_secs(3600),
            "{d:?}"
        );
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn excerpt_is_short_and_single_line() {
        let long = "a\nb".repeat(500);
        let e = excerpt(long.as_bytes());
        assert!(!e.contains('\n'));
        assert!(e.chars().count() <= EXCERPT_CHARS + 1);
        assert_eq!(excerpt(&[0xff, b'o', b'k']), "\u{fffd}ok");
    }
}
