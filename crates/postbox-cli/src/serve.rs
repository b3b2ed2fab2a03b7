//! `--metrics-addr`: Prometheus `/metrics`, `/healthz` and `/readyz`.
//!
//! Three fixed routes need no web framework: hyper serves HTTP/1.1 on a
//! listener bound at start-up (a bad or busy address is refused before
//! anything else starts), and the Prometheus recorder, installed as the
//! process's `metrics` recorder, renders on each scrape.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use postbox_core::{Health, observe};
use tokio::net::TcpListener;

use crate::usage;

/// How often the recorder's histograms are drained into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// What `/readyz` asks; set once the relay exists (until then: "starting").
pub(crate) type Probe = Arc<OnceLock<Box<dyn Fn() -> Health + Send + Sync>>>;

/// Binds `addr`, named `key` in errors (`--metrics-addr`,
/// `POSTBOX_METRICS_ADDR` or `[metrics] addr`).
pub(crate) async fn bind(key: &str, addr: &str) -> anyhow::Result<TcpListener> {
    crate::config::check_listen_addr(addr)
        .map_err(|why| usage(format!("{key} = {addr:?} {why}")))?;
    TcpListener::bind(addr)
        .await
        .map_err(|e| usage(format!("{key} = {addr:?}: cannot listen there: {e}")))
}

/// Installs the Prometheus recorder as the process's `metrics` recorder.
pub(crate) fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(observe::LATENCY_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(observe::BATCH_SIZE.to_owned()),
            observe::BATCH_SIZE_BUCKETS,
        )?
        .install_recorder()?;
    observe::describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP_EVERY).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Serves the three routes on `listener` until the process ends.
pub(crate) fn spawn(listener: TcpListener, metrics: PrometheusHandle, probe: Probe) {
    let local = listener.local_addr().ok();
    tracing::info!(addr = ?local, "serving /metrics, /healthz and /readyz");
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    // e.g. out of file descriptors: wait, do not spin
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            let probe = Arc::clone(&probe);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let reply = route(&req, &metrics, &probe);
                    async move { Ok::<_, Infallible>(reply) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    // a client that never finishes its headers is dropped
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(e) = served {
                    tracing::debug!(error = %e, "metrics endpoint: connection ended with an error");
                }
            });
        }
    });
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn route(
    req: &Request<Incoming>,
    metrics: &PrometheusHandle,
    probe: &Probe,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            let (status, body) = readiness(probe.get().map(|health| health()));
            reply(status, "application/json", body.to_string())
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n",
        ),
    }
}

/// `/readyz`: 200 once the relay's latest claim reached the store and the
/// publisher is not failing every message; 503 with the reason otherwise.
fn readiness(health: Option<Health>) -> (StatusCode, serde_json::Value) {
    let not_ready = |reason: &str, error: Option<&str>| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "ready": false, "reason": reason, "error": error }),
        )
    };
    let Some(h) = health else {
        return not_ready("starting: connecting to the database", None);
    };
    if let Some(e) = &h.store_error {
        return not_ready("store error", Some(e));
    }
    if let Some(e) = &h.publisher_error {
        return not_ready("publisher error", Some(e));
    }
    if !h.is_ready() {
        return not_ready("starting: no claim yet", None);
    }
    let since = h
        .last_claim_ok
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    (
        StatusCode::OK,
        serde_json::json!({ "ready": true, "last_claim_ms_ago": since }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_why() {
        assert_eq!(readiness(None).0, StatusCode::SERVICE_UNAVAILABLE);
        let (code, body) = readiness(Some(Health::default()));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["reason"], "starting: no claim yet");

        let mut ok = Health::default();
        ok.last_claim_ok = Some(Duration::from_millis(20));
        let (code, body) = readiness(Some(ok.clone()));
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body["ready"], true);

        let mut publisher = ok.clone();
        publisher.publisher_error = Some("connection refused".into());
        let (code, body) = readiness(Some(publisher));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["reason"], "publisher error");
        assert_eq!(body["error"], "connection refused");

        let mut store = ok;
        store.store_error = Some("database unavailable".into());
        let (code, body) = readiness(Some(store));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["reason"], "store error");
    }
}
