//! W3C trace context carried in message headers (feature `opentelemetry`).
//!
//! At enqueue, the stores write the producer's current trace context into
//! the message's headers as `traceparent` (and `tracestate` when there is
//! one); every publisher passes headers through to the broker, so a consumer
//! extracts them and continues the producer's trace. The relay, too, opens
//! one `postbox.message` span per published message as a child of that
//! context, so the trace shows when the message left the outbox and with
//! what outcome.
//!
//! The current context is the OpenTelemetry context of the current
//! `tracing` span (through `tracing-opentelemetry`'s layer) or, when that
//! has none, OpenTelemetry's own [`Context::current`]. The format is always
//! W3C Trace Context, whatever global propagator the application installed.

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::message::{Headers, Message};
use crate::publish::PublishOutcome;

/// The W3C `traceparent` header.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C `tracestate` header.
pub const TRACESTATE: &str = "tracestate";

/// The trace context enqueue should capture: the current `tracing` span's,
/// else OpenTelemetry's current one.
fn current() -> Context {
    let from_span = tracing::Span::current().context();
    if from_span.span().span_context().is_valid() {
        from_span
    } else {
        Context::current()
    }
}

/// Writes the current trace context into `headers` as `traceparent` /
/// `tracestate`, unless there is no active trace or the headers already
/// carry a `traceparent` (the producer set one on purpose).
pub fn inject_current(headers: &mut Headers) {
    if headers.contains_key(TRACEPARENT) {
        return;
    }
    let cx = current();
    if !cx.span().span_context().is_valid() {
        return;
    }
    TraceContextPropagator::new().inject_context(&cx, &mut Writer(headers));
}

/// The trace context a message's headers carry; an empty context when they
/// carry none (or a malformed one).
pub fn extract(headers: &Headers) -> Context {
    TraceContextPropagator::new().extract(&Reader(headers))
}

/// One `postbox.message` span per message of `batch` that carries a trace
/// context, each a child of its producer's span; the relay keeps them open
/// while the batch is published and records each outcome with
/// [`record_outcomes`]. Messages without a trace context get none (no cost
/// on the hot path for untraced producers).
pub(crate) fn message_spans(batch: &[Message]) -> Vec<Option<tracing::Span>> {
    batch
        .iter()
        .map(|m| {
            let parent = extract(&m.headers);
            if !parent.span().span_context().is_valid() {
                return None;
            }
            let span = tracing::info_span!(
                "postbox.message",
                otel.kind = "producer",
                postbox.id = %m.id,
                postbox.topic = %m.topic,
                postbox.key = m.key.as_deref(),
                postbox.attempt = m.attempt,
                postbox.outcome = tracing::field::Empty,
            );
            // fails only when no OpenTelemetry layer is installed: then
            // there is no trace to join either
            let _ = span.set_parent(parent);
            Some(span)
        })
        .collect()
}

/// Records each message's outcome on its span (and so ends them when the
/// spans are dropped).
pub(crate) fn record_outcomes(spans: &[Option<tracing::Span>], outcomes: &[PublishOutcome]) {
    for (span, outcome) in spans.iter().zip(outcomes) {
        if let Some(span) = span {
            let what = match outcome {
                PublishOutcome::Ok => "ok",
                PublishOutcome::Transient { .. } => "transient",
                PublishOutcome::Rejected { .. } => "rejected",
                PublishOutcome::NotSent => "not_sent",
            };
            span.record("postbox.outcome", what);
        }
    }
}

/// [`Headers`] as OpenTelemetry's carrier, for writing. The propagator
/// writes `tracestate` even when the trace has no state; an empty one is
/// left out (and one the headers carried is dropped, as the propagator would
/// have overwritten it): W3C lets a context without state go without the
/// header, and consumers need not see `"tracestate": ""`.
struct Writer<'a>(&'a mut Headers);

impl Injector for Writer<'_> {
    fn set(&mut self, key: &str, value: String) {
        if key.eq_ignore_ascii_case(TRACESTATE) && value.is_empty() {
            self.0.remove(key);
        } else {
            self.0.insert(key.to_owned(), value);
        }
    }
}

/// [`Headers`] as OpenTelemetry's carrier, for reading. Header names match
/// without regard to case, as a producer writing `Traceparent` through an
/// HTTP-minded client would expect.
struct Reader<'a>(&'a Headers);

impl Extractor for Reader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .or_else(|| {
                self.0
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(key))
                    .map(|(_, v)| v)
            })
            .map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    fn remote(trace: u128, span: u64) -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ))
    }

    #[test]
    fn injects_the_current_context_as_w3c_traceparent() {
        let _guard = remote(0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331).attach();
        let mut headers = Headers::new();
        inject_current(&mut headers);
        assert_eq!(
            headers.get(TRACEPARENT).map(String::as_str),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        let back = extract(&headers);
        assert_eq!(
            back.span().span_context().trace_id(),
            TraceId::from(0x0af7651916cd43dd8448eb211c80319c)
        );
        // no state: no `tracestate` header, not an empty one
        assert!(!headers.contains_key(TRACESTATE), "{headers:?}");
    }

    #[test]
    fn a_trace_state_is_carried_as_tracestate() {
        let state = TraceState::from_key_value([("vendor", "value")]).expect("a valid trace state");
        let _guard = Context::new()
            .with_remote_span_context(SpanContext::new(
                TraceId::from(1),
                SpanId::from(2),
                TraceFlags::SAMPLED,
                true,
                state,
            ))
            .attach();
        let mut headers = Headers::new();
        inject_current(&mut headers);
        assert_eq!(
            headers.get(TRACESTATE).map(String::as_str),
            Some("vendor=value")
        );
        assert!(headers.contains_key(TRACEPARENT), "{headers:?}");
    }

    #[test]
    fn no_trace_no_header_and_a_producers_own_traceparent_is_kept() {
        let mut headers = Headers::new();
        inject_current(&mut headers);
        assert!(headers.is_empty(), "no active trace: {headers:?}");

        let _guard = remote(1, 2).attach();
        let own = "00-11111111111111111111111111111111-2222222222222222-01";
        headers.insert(TRACEPARENT.to_owned(), own.to_owned());
        inject_current(&mut headers);
        assert_eq!(headers.get(TRACEPARENT).map(String::as_str), Some(own));
    }

    #[test]
    fn malformed_traceparent_extracts_to_no_trace() {
        let mut headers = Headers::new();
        headers.insert(TRACEPARENT.to_owned(), "not-a-trace".to_owned());
        assert!(!extract(&headers).span().span_context().is_valid());
    }
}
