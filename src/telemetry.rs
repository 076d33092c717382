//! OpenTelemetry traces, off unless `[telemetry] otlp_endpoint` names a
//! collector.
//!
//! Every RPC is a server span named after its method, the child of the
//! caller's W3C `traceparent` when the request carries one (gRPC metadata);
//! below it, spans for the policy decision (`policy.decide`), each HSM
//! operation (`hsm.*`, on the blocking pool), each store write transaction
//! (`store.transaction`, from BEGIN to commit or rollback) and the audit
//! commit (`audit.commit`). The request's trace id is also written into its
//! audit event, so an auditor can go from an event to its trace and back.
//! That happens whether or not traces are exported: with telemetry off, the
//! trace id is the caller's (from `traceparent`), or none.
//!
//! Spans are at DEBUG level and the log layer has its own filter, so turning
//! traces on changes no log line, and with traces off and the default log
//! level the spans are never built. Span fields are method names, outcomes
//! and HSM operation names: never account ids, identities, documents or key
//! material (the same rule as the metrics).
//!
//! The export: OpenTelemetry's batch processor calls the exporter from a
//! thread of its own, and the OTLP/gRPC exporter (tonic) needs a tokio
//! reactor. [`OnRuntime`] gives it one: a one-thread runtime owned by the
//! exporter, which drives its channel; exports block on it from the batch
//! thread. A collector that is down or slow costs spans (dropped after
//! `export_timeout_seconds`; one warning when exports start failing, one
//! line when they work again), never requests.

use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::config::TelemetryConfig;

/// Why traces cannot be exported as configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// The exporter's runtime could not start.
    #[error("telemetry: cannot start the exporter's runtime: {0}")]
    Runtime(std::io::Error),
    /// The OTLP exporter refused its configuration.
    #[error("telemetry: OTLP exporter for {endpoint}: {reason}")]
    Exporter {
        /// The configured collector.
        endpoint: String,
        /// What the exporter said.
        reason: String,
    },
}

/// The OTLP exporter with the tokio runtime its channel needs.
#[derive(Debug)]
struct OnRuntime {
    inner: opentelemetry_otlp::SpanExporter,
    /// Taken in `drop` to shut down without blocking (drop may run on a runtime thread).
    rt: Option<tokio::runtime::Runtime>,
    /// Whether the last export failed (logged on change only).
    failing: std::sync::atomic::AtomicBool,
}

impl SpanExporter for OnRuntime {
    fn export(&self, batch: Vec<SpanData>) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let result = match (&self.rt, tokio::runtime::Handle::try_current()) {
            (Some(rt), Err(_)) => rt.block_on(self.inner.export(batch)),
            // The batch processor exports from its own thread; blocking a
            // runtime thread on another runtime would panic, so never do it.
            (Some(_), Ok(_)) => Err(OTelSdkError::InternalFailure(
                "span export called on a runtime thread".into(),
            )),
            (None, _) => Err(OTelSdkError::AlreadyShutdown),
        };
        let failed = result.is_err();
        if self.failing.swap(failed, std::sync::atomic::Ordering::Relaxed) != failed {
            match &result {
                Err(e) => {
                    tracing::warn!(error = %e, "telemetry: spans not exported (collector unreachable or slow); dropping them until it answers")
                }
                Ok(()) => tracing::info!("telemetry: spans exported again"),
            }
        }
        std::future::ready(result)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

impl Drop for OnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The `tracing` layer that turns spans into OpenTelemetry spans.
pub type SpanLayer<S> = tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>;

/// The running trace pipeline; [`Telemetry::shutdown`] flushes what is queued.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Builds the exporter and the tracer provider for `config`; `None` when
    /// no endpoint is configured. The returned layer goes into the
    /// subscriber; until then nothing is exported.
    pub fn start<S>(config: &TelemetryConfig) -> Result<Option<(Telemetry, SpanLayer<S>)>, TelemetryError>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        let Some(endpoint) = &config.otlp_endpoint else {
            return Ok(None);
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("keyward-otlp")
            .enable_all()
            .build()
            .map_err(TelemetryError::Runtime)?;
        // The channel is built lazily, its worker spawned on `rt`.
        let inner = {
            let _entered = rt.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(Duration::from_secs(config.export_timeout_seconds))
                .build()
                .map_err(|e| TelemetryError::Exporter {
                    endpoint: endpoint.clone(),
                    reason: e.to_string(),
                })?
        };
        let exporter = OnRuntime {
            inner,
            rt: Some(rt),
            failing: std::sync::atomic::AtomicBool::new(false),
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("keyward"))
            .with_tracked_inactivity(false);
        Ok(Some((Telemetry { provider }, layer)))
    }

    /// Exports what is queued and stops the pipeline (call off the async
    /// runtime: it waits for the batch thread).
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "telemetry: spans not exported at shutdown");
        }
    }
}

/// gRPC metadata as the W3C propagator reads it.
struct Metadata<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The caller's trace context from `traceparent` (and `tracestate`), or
/// an empty context when the request carries none or a malformed one.
pub fn remote_context(metadata: &tonic::metadata::MetadataMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&Metadata(metadata))
}

/// The server span of one RPC, child of `remote`.
pub fn rpc_span(method: &'static str, remote: &opentelemetry::Context) -> tracing::Span {
    let span = tracing::debug_span!(
        "rpc",
        otel.name = method,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.method = method,
        otel.status_code = tracing::field::Empty,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    if remote.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed (traces off).
        let _ = span.set_parent(remote.clone());
    }
    span
}

/// Records the gRPC status on an RPC's span.
pub fn record_status(span: &tracing::Span, code: tonic::Code) {
    span.record("rpc.grpc.status_code", code as i32);
    if code != tonic::Code::Ok {
        span.record("otel.status_code", "ERROR");
    }
}

/// The trace id an RPC's audit event records, as 32 lowercase hex digits:
/// its span's when traces are exported, else the caller's; empty when
/// neither exists.
pub fn trace_id(span: &tracing::Span, remote: &opentelemetry::Context) -> String {
    let own = span.context();
    let sc = own.span().span_context().clone();
    if sc.is_valid() {
        return sc.trace_id().to_string();
    }
    let theirs = remote.span().span_context().clone();
    if theirs.is_valid() {
        return theirs.trace_id().to_string();
    }
    String::new()
}

/// A closure for `spawn_blocking` that runs `f` inside a span named `name`,
/// child of the caller's current span (spans do not cross onto the blocking
/// pool by themselves).
pub fn in_span<R>(name: &'static str, f: impl FnOnce() -> R) -> impl FnOnce() -> R {
    let parent = tracing::Span::current();
    move || tracing::debug_span!(parent: &parent, "op", otel.name = name).in_scope(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(traceparent: &str) -> tonic::metadata::MetadataMap {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("traceparent", traceparent.parse().expect("ascii"));
        m
    }

    #[test]
    fn a_callers_trace_id_is_taken_from_traceparent() {
        let remote = remote_context(&metadata("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let span = rpc_span("SignTypedData", &remote);
        assert_eq!(trace_id(&span, &remote), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn malformed_or_absent_traceparent_gives_no_trace_id() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "not a traceparent",
        ] {
            let remote = if bad.is_empty() {
                remote_context(&tonic::metadata::MetadataMap::new())
            } else {
                remote_context(&metadata(bad))
            };
            let span = rpc_span("SignTypedData", &remote);
            assert_eq!(trace_id(&span, &remote), "", "{bad:?}");
        }
    }
}
