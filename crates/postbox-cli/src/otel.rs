//! OTLP export of the relay daemon's spans (`--otlp-endpoint`).
//!
//! The relay's `postbox.message` spans continue the trace of the producer
//! that enqueued each message (its `traceparent` header); `postbox.batch`
//! and `postbox.publish` show up too when `POSTBOX_LOG` lets debug spans
//! through. Spans leave in batches from the SDK's own thread over
//! OTLP/HTTP (protobuf); [`Exporter::shutdown`] flushes what is left.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::cli::RelayArgs;
use crate::config::FileConfig;

/// The environment variable for the endpoint (the flag reads it too).
pub(crate) const ENDPOINT_ENV: &str = "POSTBOX_OTLP_ENDPOINT";
/// OpenTelemetry's own variable, the last fallback.
const OTEL_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Where the relay exports spans, and the key that said so (for errors):
/// flag > `POSTBOX_OTLP_ENDPOINT` > `[log] otlp_endpoint` >
/// `OTEL_EXPORTER_OTLP_ENDPOINT`. An empty variable is unset.
pub(crate) fn endpoint(
    args: &RelayArgs,
    file: Option<&FileConfig>,
) -> Option<(&'static str, String)> {
    let env = |name: &'static str| {
        std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| (name, v))
    };
    args.otlp_endpoint
        .clone()
        .map(|e| ("--otlp-endpoint", e))
        .or_else(|| env(ENDPOINT_ENV))
        .or_else(|| {
            file.and_then(|f| f.log.otlp_endpoint.clone())
                .map(|e| ("[log] otlp_endpoint", e))
        })
        .or_else(|| env(OTEL_ENDPOINT_ENV))
}

/// A running OTLP exporter; [`Exporter::shutdown`] flushes it.
pub(crate) struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Starts exporting to `endpoint` (`/v1/traces` appended), with the
    /// service name from `OTEL_SERVICE_NAME` or `postbox`.
    pub(crate) fn start(endpoint: &str) -> Result<Self, String> {
        let exporter = SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .build()
            .map_err(|e| e.to_string())?;
        let service = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "postbox".to_owned());
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(service).build())
            .build();
        Ok(Self { provider })
    }

    /// The tracer for `tracing-opentelemetry`'s layer.
    pub(crate) fn tracer(&self) -> SdkTracer {
        self.provider.tracer("postbox")
    }

    /// Exports the spans still buffered and stops the exporter's thread.
    pub(crate) fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "flushing the last spans to the OTLP collector failed");
        }
    }
}
