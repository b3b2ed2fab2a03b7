//! The webhook publisher against a real HTTP server on 127.0.0.1 (hyper).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use postbox_core::{Headers, PublishOutcome, Publisher};
use postbox_http::{HttpConfig, HttpError, HttpPublisher, WebhookSecret};
use postbox_testkit::publisher_suite::message;
use postbox_testkit::tls::{TestCa, TlsAcceptor, TlsListener};
use postbox_testkit::{LargePayload, PublisherHarness, Received};
use tokio::net::TcpListener;
use tokio::sync::Notify;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    headers: HashMap<String, Vec<u8>>,
    body: Bytes,
}

impl Seen {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8(v.clone()).expect("header value is UTF-8"))
    }
}

struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
}

fn reply(status: u16) -> Reply {
    Reply {
        status,
        headers: Vec::new(),
        body: String::new(),
    }
}

type Responder = Arc<dyn Fn(Seen) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

/// A webhook receiver: records every request, answers with `respond`.
#[derive(Clone)]
struct Server {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    arrived: Arc<Notify>,
}

impl Server {
    async fn start(respond: Responder) -> Self {
        Self::start_with(respond, None).await
    }

    /// An `https://` receiver presenting `tls`'s certificate.
    async fn start_tls(respond: Responder, tls: TlsAcceptor) -> Self {
        Self::start_with(respond, Some(tls)).await
    }

    async fn start_with(respond: Responder, tls: Option<TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let arrived = Arc::new(Notify::new());
        let (seen2, arrived2) = (seen.clone(), arrived.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (seen, arrived, respond) = (seen2.clone(), arrived2.clone(), respond.clone());
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (seen, arrived, respond) =
                            (seen.clone(), arrived.clone(), respond.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await?.to_bytes();
                            let headers = parts
                                .headers
                                .iter()
                                .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
                                .collect();
                            let s = Seen { headers, body };
                            seen.lock().unwrap().push(s.clone());
                            arrived.notify_waiters();
                            let r = respond(s).await;
                            let mut b = Response::builder().status(r.status);
                            for (k, v) in r.headers {
                                b = b.header(k, v);
                            }
                            Ok::<_, hyper::Error>(b.body(Full::new(Bytes::from(r.body))).unwrap())
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        None => http.serve_connection(TokioIo::new(stream), svc).await,
                        Some(tls) => {
                            let Ok(stream) = tls.accept(stream).await else {
                                return;
                            };
                            http.serve_connection(TokioIo::new(stream), svc).await
                        }
                    };
                });
            }
        });
        Self {
            addr,
            seen,
            arrived,
        }
    }

    async fn ok() -> Self {
        Self::start(Arc::new(|_| Box::pin(async { reply(204) }))).await
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.addr.port())
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Seen> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.arrived.notified();
            let seen = self.seen();
            if seen.len() >= n {
                return seen;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.seen();
            }
        }
    }
}

fn config(url: &str) -> HttpConfig {
    HttpConfig::new(url)
        .secret(SECRET)
        .allow_private_networks(true)
}

struct Harness {
    server: Server,
}

async fn harness() -> Harness {
    Harness {
        server: Server::ok().await,
    }
}

impl PublisherHarness for Harness {
    type Publisher = HttpPublisher;

    fn publisher(&self) -> HttpPublisher {
        HttpPublisher::new(config(&self.server.url())).unwrap()
    }

    fn unreachable_publisher(&self) -> HttpPublisher {
        // a port that was just free: nothing listens there
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        HttpPublisher::new(config(&format!("http://127.0.0.1:{port}/hook"))).unwrap()
    }

    fn topic(&self) -> String {
        "orders.created".to_owned()
    }

    fn receive(&self, n: usize, timeout: Duration) -> impl Future<Output = Vec<Received>> + Send {
        let server = self.server.clone();
        async move {
            let secret = WebhookSecret::parse(SECRET).unwrap();
            server
                .wait_for(n, timeout)
                .await
                .into_iter()
                .map(|s| {
                    let id = s.header("webhook-id").expect("webhook-id");
                    let ts: u64 = s
                        .header("webhook-timestamp")
                        .expect("webhook-timestamp")
                        .parse()
                        .unwrap();
                    let sig = s.header("webhook-signature").expect("webhook-signature");
                    assert!(
                        secret.verify(&id, ts, &s.body, &sig),
                        "signature does not verify"
                    );
                    let headers: Headers = s
                        .headers
                        .iter()
                        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                        .collect();
                    Received {
                        id: id.parse().ok(),
                        key: s.header("postbox-key"),
                        headers,
                        payload: s.body.clone(),
                    }
                })
                .collect()
        }
    }

    fn large_payload(&self) -> LargePayload {
        LargePayload::Delivered
    }
}

postbox_testkit::publisher_conformance_tests!(harness);

async fn publish_one(p: &HttpPublisher, payload: &'static [u8]) -> PublishOutcome {
    let m = message(1, "t", None, payload);
    p.publish(std::slice::from_ref(&m)).await.remove(0)
}

#[tokio::test]
async fn statuses_map_to_outcomes() {
    let server = Server::start(Arc::new(|s: Seen| {
        Box::pin(async move {
            match &s.body[..] {
                b"200" => reply(200),
                b"408" => reply(408),
                b"429" => Reply {
                    status: 429,
                    headers: vec![("retry-after", "7".to_owned())],
                    body: "slow down".to_owned(),
                },
                b"500" => reply(500),
                b"400" => Reply {
                    status: 400,
                    headers: vec![],
                    body: "field `amount` is\nmissing".to_owned(),
                },
                b"302" => Reply {
                    status: 302,
                    headers: vec![("location", "http://169.254.169.254/".to_owned())],
                    body: String::new(),
                },
                _ => reply(418),
            }
        })
    }))
    .await;
    let p = HttpPublisher::new(config(&server.url())).unwrap();
    assert_eq!(publish_one(&p, b"200").await, PublishOutcome::Ok);
    assert!(matches!(
        publish_one(&p, b"408").await,
        PublishOutcome::Transient {
            retry_after: None,
            ..
        }
    ));
    match publish_one(&p, b"429").await {
        PublishOutcome::Transient {
            retry_after,
            reason,
        } => {
            assert_eq!(retry_after, Some(Duration::from_secs(7)));
            assert!(reason.contains("429"), "{reason}");
        }
        o => panic!("429 gave {o:?}"),
    }
    assert!(matches!(
        publish_one(&p, b"500").await,
        PublishOutcome::Transient { .. }
    ));
    match publish_one(&p, b"400").await {
        PublishOutcome::Rejected { reason } => {
            assert_eq!(reason, "HTTP 400 Bad Request: field `amount` is missing")
        }
        o => panic!("400 gave {o:?}"),
    }
    match publish_one(&p, b"302").await {
        PublishOutcome::Rejected { reason } => assert!(reason.contains("302"), "{reason}"),
        o => panic!("302 gave {o:?}"),
    }
    // the redirect was not followed
    assert_eq!(server.seen().len(), 6);
}

#[tokio::test]
async fn request_carries_standard_webhook_headers() {
    let server = Server::ok().await;
    let p = HttpPublisher::new(config(&server.url())).unwrap();
    let mut m = message(1, "orders.created", Some("order-7"), &b"{\"a\":1}"[..]);
    m.headers
        .insert("content-type".into(), "application/json".into());
    assert!(p.publish(std::slice::from_ref(&m)).await[0].is_ok());
    let s = &server.wait_for(1, Duration::from_secs(10)).await[0];
    assert_eq!(s.header("webhook-id"), Some(m.id.to_string()));
    assert_eq!(
        s.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(s.header("postbox-topic").as_deref(), Some("orders.created"));
    assert_eq!(s.header("postbox-key").as_deref(), Some("order-7"));
    let ts: u64 = s.header("webhook-timestamp").unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(ts.abs_diff(now) < 300, "timestamp {ts} is not now ({now})");
    let sig = s.header("webhook-signature").unwrap();
    assert!(sig.starts_with("v1,"), "{sig}");
    let secret = WebhookSecret::parse(SECRET).unwrap();
    assert!(secret.verify(&m.id.to_string(), ts, br#"{"a":1}"#, &sig));
    assert!(!secret.verify(&m.id.to_string(), ts, br#"{"a":2}"#, &sig));
}

#[tokio::test]
async fn unsigned_only_when_asked() {
    let server = Server::ok().await;
    let e =
        HttpPublisher::new(HttpConfig::new(server.url()).allow_private_networks(true)).unwrap_err();
    assert!(
        matches!(
            e,
            HttpError::InvalidConfig {
                field: "secret",
                ..
            }
        ),
        "{e}"
    );
    let e = HttpPublisher::new(config(&server.url()).secret("whsec_%%%notbase64")).unwrap_err();
    assert!(
        e.to_string().contains("secret") && !e.to_string().contains("%%%"),
        "{e}"
    );
    let p = HttpPublisher::new(
        HttpConfig::new(server.url())
            .unsigned(true)
            .allow_private_networks(true),
    )
    .unwrap();
    assert!(publish_one(&p, b"x").await.is_ok());
    let s = &server.wait_for(1, Duration::from_secs(10)).await[0];
    assert!(s.header("webhook-signature").is_none());
    assert!(s.header("webhook-id").is_some());
}

#[tokio::test]
async fn ssrf_guard_refuses_internal_destinations() {
    for url in [
        "http://127.0.0.1:9/hook",
        "http://10.0.0.1/hook",
        "http://[::1]:9/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:127.0.0.1]/",
        "http://2130706433/", // 127.0.0.1 written as a number
        "http://100.64.0.1/",
    ] {
        let e = HttpPublisher::new(HttpConfig::new(url).secret(SECRET)).unwrap_err();
        assert!(
            matches!(e, HttpError::InvalidConfig { field: "url", .. }),
            "{url}: {e}"
        );
        assert!(e.to_string().contains("allow_private_networks"), "{e}");
    }
    // a name that resolves to loopback is refused when connecting, even
    // though a server really listens there
    let server = Server::ok().await;
    let by_name = format!("http://localhost:{}/hook", server.addr.port());
    let p = HttpPublisher::new(HttpConfig::new(&by_name).secret(SECRET)).unwrap();
    // retried, not dead-lettered: what a name resolves to may change
    match publish_one(&p, b"x").await {
        PublishOutcome::Transient { reason, .. } => {
            assert!(reason.contains("refused"), "{reason}");
            assert!(reason.contains("loopback"), "{reason}");
        }
        o => panic!("expected Transient, got {o:?}"),
    }
    assert!(server.seen().is_empty(), "the request reached the server");
    // and allowed when asked for
    let p = HttpPublisher::new(config(&by_name)).unwrap();
    assert!(publish_one(&p, b"x").await.is_ok());
}

#[tokio::test]
async fn bad_urls_are_config_errors() {
    for (url, needle) in [
        ("ftp://example.com/", "unknown scheme `ftp`"),
        ("example.com/hook", "url"),
        ("http://user:hunter2@[::1", "url"),
    ] {
        let e = HttpPublisher::new(HttpConfig::new(url).secret(SECRET)).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(needle), "{url}: {text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
}

#[tokio::test]
async fn same_key_is_sequential_other_keys_run_in_parallel() {
    // The server holds every request until 4 are in flight at once (or 10 s
    // pass), and counts in-flight requests per key: parallelism across keys
    // is observed, never assumed from timing.
    #[derive(Default)]
    struct State {
        in_flight: usize,
        max_in_flight: usize,
        per_key: HashMap<String, usize>,
        max_per_key: usize,
    }
    let state: Arc<Mutex<State>> = Arc::default();
    let gate = Arc::new(Notify::new());
    let (st, g) = (state.clone(), gate.clone());
    let server = Server::start(Arc::new(move |s: Seen| {
        let (st, g) = (st.clone(), g.clone());
        Box::pin(async move {
            let key = s.header("postbox-key").unwrap_or_default();
            {
                let mut st = st.lock().unwrap();
                st.in_flight += 1;
                st.max_in_flight = st.max_in_flight.max(st.in_flight);
                let k = st.per_key.entry(key.clone()).or_default();
                *k += 1;
                let now = *k;
                st.max_per_key = st.max_per_key.max(now);
                if st.max_in_flight >= 4 {
                    g.notify_waiters();
                }
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let notified = g.notified();
                if st.lock().unwrap().max_in_flight >= 4 {
                    break;
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    break;
                }
            }
            let mut st = st.lock().unwrap();
            st.in_flight -= 1;
            *st.per_key.get_mut(&key).unwrap() -= 1;
            reply(200)
        })
    }))
    .await;
    let p = HttpPublisher::new(config(&server.url()).concurrency(8)).unwrap();
    let mut batch = Vec::new();
    for i in 0..12 {
        let key = ["a", "b", "c", "d"][i % 4];
        batch.push(message(
            i as i64,
            "t",
            Some(key),
            format!("{key}-{i}").into_bytes(),
        ));
    }
    let outcomes = p.publish(&batch).await;
    assert!(outcomes.iter().all(PublishOutcome::is_ok), "{outcomes:?}");
    let st = state.lock().unwrap();
    assert!(st.max_in_flight >= 4, "requests were not concurrent");
    assert_eq!(
        st.max_per_key, 1,
        "two requests of one key were in flight at once"
    );
    // and per key they arrived in batch order
    let seen = server.seen();
    for key in ["a", "b", "c", "d"] {
        let got: Vec<_> = seen
            .iter()
            .filter(|s| s.header("postbox-key").as_deref() == Some(key))
            .map(|s| String::from_utf8(s.body.to_vec()).unwrap())
            .collect();
        let want: Vec<_> = batch
            .iter()
            .filter(|m| m.key.as_deref() == Some(key))
            .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
            .collect();
        assert_eq!(got, want);
    }
}

#[tokio::test]
async fn a_failed_message_holds_back_the_rest_of_its_key() {
    let server = Server::start(Arc::new(|s: Seen| {
        Box::pin(async move {
            if &s.body[..] == b"fail" {
                reply(503)
            } else {
                reply(200)
            }
        })
    }))
    .await;
    let p = HttpPublisher::new(config(&server.url())).unwrap();
    let batch = vec![
        message(1, "t", Some("k"), &b"one"[..]),
        message(2, "t", Some("k"), &b"fail"[..]),
        message(3, "t", Some("k"), &b"three"[..]),
        message(4, "t", Some("other"), &b"four"[..]),
    ];
    let out = p.publish(&batch).await;
    assert!(out[0].is_ok());
    assert!(matches!(out[1], PublishOutcome::Transient { .. }));
    assert_eq!(out[2], PublishOutcome::NotSent);
    assert!(out[3].is_ok());
    let bodies: Vec<_> = server.seen().iter().map(|s| s.body.clone()).collect();
    assert!(
        !bodies.contains(&Bytes::from_static(b"three")),
        "sent after its key failed"
    );
}

#[tokio::test]
async fn the_deadline_keeps_what_was_sent_and_gives_back_what_was_not() {
    // One request at a time; the endpoint never answers "slow". The deadline
    // cuts that request short, and the two messages behind it never start.
    let server = Server::start(Arc::new(|s: Seen| {
        Box::pin(async move {
            if &s.body[..] == b"slow" {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            reply(200)
        })
    }))
    .await;
    let p = HttpPublisher::new(config(&server.url()).concurrency(1)).unwrap();
    let batch = vec![
        message(1, "t", None, &b"one"[..]),
        message(2, "t", None, &b"two"[..]),
        message(3, "t", None, &b"slow"[..]),
        message(4, "t", None, &b"four"[..]),
        message(5, "t", Some("k"), &b"five"[..]),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let out = p.publish_until(&batch, deadline).await;
    assert!(out[0].is_ok() && out[1].is_ok(), "{out:?}");
    match &out[2] {
        PublishOutcome::Transient { reason, .. } => {
            assert!(reason.contains("deadline"), "{reason}")
        }
        o => panic!("{o:?}"),
    }
    assert_eq!(out[3..], [PublishOutcome::NotSent, PublishOutcome::NotSent]);
    let bodies: Vec<_> = server.seen().iter().map(|s| s.body.clone()).collect();
    assert_eq!(bodies, [&b"one"[..], &b"two"[..], &b"slow"[..]]);
}

#[tokio::test]
async fn a_server_that_never_answers_is_transient() {
    let server = Server::start(Arc::new(|_| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            reply(200)
        })
    }))
    .await;
    let p = HttpPublisher::new(config(&server.url()).timeout(Duration::from_millis(300))).unwrap();
    match publish_one(&p, b"x").await {
        PublishOutcome::Transient { reason, .. } => {
            assert!(reason.contains("timed out"), "{reason}")
        }
        o => panic!("{o:?}"),
    }
}

#[tokio::test]
async fn reserved_and_invalid_headers_are_rejected_with_the_name() {
    let server = Server::ok().await;
    let p = HttpPublisher::new(config(&server.url())).unwrap();
    for (name, value) in [
        ("webhook-signature", "v1,forged"),
        ("content-length", "1"),
        ("bad name", "x"),
        ("x-newline", "a\nb"),
    ] {
        let mut m = message(1, "t", None, &b"x"[..]);
        m.headers.insert(name.into(), value.into());
        match p.publish(std::slice::from_ref(&m)).await.remove(0) {
            PublishOutcome::Rejected { reason } => assert!(reason.contains(name), "{reason}"),
            o => panic!("{name}: {o:?}"),
        }
    }
    // with a prefix, a header named like ours is just data
    let p = HttpPublisher::new(config(&server.url()).header_prefix("x-postbox-")).unwrap();
    let mut m = message(1, "t", None, &b"x"[..]);
    m.headers.insert("webhook-id".into(), "mine".into());
    assert!(p.publish(std::slice::from_ref(&m)).await[0].is_ok());
    let s = server.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(s[0].header("x-postbox-webhook-id").as_deref(), Some("mine"));
    assert_eq!(s[0].header("webhook-id"), Some(m.id.to_string()));
}

#[tokio::test]
async fn connection_cut_mid_request_is_transient() {
    // the server holds the first request until released; the proxy cuts
    // the connection while it is in flight
    use std::sync::atomic::{AtomicBool, Ordering};
    let hold = Arc::new(AtomicBool::new(true));
    let release = Arc::new(Notify::new());
    let (h, r) = (hold.clone(), release.clone());
    let server = Server::start(Arc::new(move |_| {
        let (h, r) = (h.clone(), r.clone());
        Box::pin(async move {
            if h.load(Ordering::SeqCst) {
                r.notified().await;
            }
            reply(200)
        })
    }))
    .await;
    let proxy = postbox_testkit::proxy::FaultProxy::start(server.addr.to_string())
        .await
        .unwrap();
    let url = format!("http://{}/hook", proxy.addr());
    let p = HttpPublisher::new(config(&url)).unwrap();
    let publishing = tokio::spawn({
        let p = p.clone();
        async move { publish_one(&p, b"first").await }
    });
    assert_eq!(server.wait_for(1, Duration::from_secs(10)).await.len(), 1);
    proxy.cut();
    let out = publishing.await.unwrap();
    assert!(matches!(out, PublishOutcome::Transient { .. }), "{out:?}");
    hold.store(false, Ordering::SeqCst);
    release.notify_waiters();
    // the retry goes through a fresh connection
    assert!(publish_one(&p, b"again").await.is_ok());
}

/// An internal address written in any of the spellings a URL parser
/// accepts (hex, octal, shortened, one number, IPv6 forms of IPv4, zero
/// groups, a trailing dot) is refused: at build time when the host is an
/// address literal, else by the resolver at send time. Nothing is sent
/// either way (none of these hosts is ever connected to).
#[tokio::test]
async fn internal_addresses_in_every_spelling_are_refused() {
    for url in [
        "http://0x7f000001/",
        "http://0x7f.0.0.1/",
        "http://0177.0.0.1/",
        "http://017700000001/",
        "http://127.1/",
        "http://0/",
        "http://0xa9fea9fe/latest/meta-data",
        "http://169.254.169.254./latest/meta-data",
        "http://[0:0:0:0:0:0:0:1]/",
        "http://[::ffff:7f00:1]/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://[fe80::1]/",
        "http://[fd00::1]/",
        "http://[::]/",
        "https://192.168.0.1:8443/",
    ] {
        match HttpPublisher::new(HttpConfig::new(url).secret(SECRET)) {
            Err(e) => assert!(
                e.to_string().contains("allow_private_networks"),
                "{url}: {e}"
            ),
            Ok(p) => match publish_one(&p, b"x").await {
                PublishOutcome::Transient { reason, .. } => {
                    assert!(reason.contains("refused"), "{url}: {reason}")
                }
                o => panic!("{url}: expected a refusal, got {o:?}"),
            },
        }
    }
}

/// A redirect is never followed, whatever it points to: a receiver that
/// answers 301/302/303/307/308 towards a second, internal server gets a
/// `Rejected` naming the status, and the second server sees nothing. (The
/// first receiver is on loopback, so private networks are allowed here: the
/// guard alone would let the redirect through; not following it is what
/// stops it.)
#[tokio::test]
async fn redirects_are_never_followed() {
    let internal = Server::ok().await;
    let target = format!("http://localhost:{}/internal", internal.addr.port());
    for status in [301u16, 302, 303, 307, 308] {
        let location = target.clone();
        let redirecting = Server::start(Arc::new(move |_s: Seen| {
            let location = location.clone();
            Box::pin(async move {
                Reply {
                    status,
                    headers: vec![("location", location)],
                    body: String::new(),
                }
            })
        }))
        .await;
        let p = HttpPublisher::new(config(&redirecting.url())).unwrap();
        match publish_one(&p, b"x").await {
            PublishOutcome::Rejected { reason } => {
                assert!(reason.contains(&status.to_string()), "{status}: {reason}");
                assert!(reason.contains("redirect"), "{status}: {reason}");
            }
            o => panic!("{status}: expected Rejected, got {o:?}"),
        }
        assert_eq!(redirecting.seen().len(), 1, "{status}");
    }
    assert!(
        internal.seen().is_empty(),
        "a redirect was followed to the internal server"
    );
}

fn https_url(addr: SocketAddr) -> String {
    format!("https://127.0.0.1:{}/hook", addr.port())
}

#[tokio::test]
async fn an_untrusted_certificate_is_refused_as_transient() {
    let ca = TestCa::generate();
    let listener = TlsListener::start(&ca).await.unwrap();
    let p = HttpPublisher::new(config(&https_url(listener.addr()))).unwrap();
    match publish_one(&p, b"secret payload").await {
        PublishOutcome::Transient { reason, .. } => {
            assert!(
                reason.contains("certificate") && reason.contains("UnknownIssuer"),
                "the reason should name the certificate problem: {reason}"
            );
        }
        other => panic!("an untrusted certificate must give Transient, got {other:?}"),
    }
    assert_eq!(listener.handshakes_completed(), 0);
}

#[tokio::test]
async fn a_certificate_from_the_configured_ca_file_is_accepted() {
    let ca = TestCa::generate();
    let server =
        Server::start_tls(Arc::new(|_| Box::pin(async { reply(204) })), ca.acceptor()).await;
    let url = https_url(server.addr);
    // the same server is refused without the CA...
    let plain = HttpPublisher::new(config(&url)).unwrap();
    assert!(
        matches!(
            publish_one(&plain, b"x").await,
            PublishOutcome::Transient { .. }
        ),
        "accepted without the CA"
    );
    assert!(server.seen().is_empty());
    // ...and trusted with it
    let ca_file =
        std::env::temp_dir().join(format!("postbox-test-ca-{}.pem", uuid::Uuid::new_v4()));
    std::fs::write(&ca_file, ca.ca_pem()).unwrap();
    let trusting = HttpPublisher::new(config(&url).ca_file(&ca_file)).unwrap();
    let outcome = publish_one(&trusting, b"over tls").await;
    std::fs::remove_file(&ca_file).unwrap();
    assert_eq!(outcome, PublishOutcome::Ok);
    assert_eq!(server.seen()[0].body, Bytes::from_static(b"over tls"));
}

#[test]
fn an_unreadable_or_empty_ca_file_is_a_config_error() {
    let missing =
        std::env::temp_dir().join(format!("postbox-missing-{}.pem", uuid::Uuid::new_v4()));
    let e = HttpPublisher::new(config("https://example.com/hook").ca_file(&missing))
        .unwrap_err()
        .to_string();
    assert!(e.contains("ca_file") && e.contains("cannot read"), "{e}");
    let empty = std::env::temp_dir().join(format!("postbox-empty-{}.pem", uuid::Uuid::new_v4()));
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let e = HttpPublisher::new(config("https://example.com/hook").ca_file(&empty))
        .unwrap_err()
        .to_string();
    std::fs::remove_file(&empty).unwrap();
    assert!(e.contains("ca_file"), "{e}");
}
