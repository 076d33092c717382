//! Prometheus metrics: every component's series, registered in one place at
//! start-up and rendered on the HTTPS side port. No labels carry account ids,
//! identities or payloads.

use std::time::Instant;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The daemon's metric families.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    hsm_latency: HistogramVec,
    hsm_errors: IntCounterVec,
    hsm_pool_in_use: IntGauge,
    hsm_pool_size: IntGauge,
    cached_keys: IntGauge,
    keys_per_kek: IntGaugeVec,
    handshake_failures: IntCounter,
    store_pool_size: IntGauge,
    store_pool_idle: IntGauge,
    in_flight: IntGauge,
    connections: IntGaugeVec,
    accept_errors: IntCounterVec,
    shed: IntCounterVec,
    session_refusals: IntCounterVec,
    hsm_wait_timeouts: IntCounter,
    audit_queue: IntGauge,
    audit_committed: IntGauge,
    audit_checkpoint: IntGauge,
    issuer_activated: IntGaugeVec,
    issuer_rotation: IntGauge,
}

/// What the audit log and the issuer show at scrape (see [`Metrics::set_audit_and_issuer`]).
#[derive(Debug, Clone, Default)]
pub struct AuditIssuerSample {
    /// Events queued for the appender; `None` once it stopped.
    pub audit_queue: Option<usize>,
    /// The last sequence number this process's appender committed.
    pub audit_committed: u64,
    /// Unix seconds of the last checkpoint this process signed (0: none yet).
    pub last_checkpoint: i64,
    /// For each algorithm with an active issuer key: when it became active.
    pub issuer_activated: Vec<(String, i64)>,
    /// Seconds an active issuer key signs before its scheduled rotation.
    pub issuer_rotation: i64,
}

/// The reasons [`Metrics::session_refused`] counts (each series exists from the start).
pub const SESSION_REFUSALS: [&str; 6] = [
    "cap_exhausted",
    "too_many_open",
    "out_of_scope",
    "revoked",
    "expired",
    "challenge_used",
];

/// The operations [`Metrics::observe_hsm`] is called with.
const HSM_OPS: [&str; 4] = ["generate_wrapped", "unwrap", "sign_ecdsa", "sign_eddsa"];

const LATENCY_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

impl Metrics {
    /// Registers every family.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("keyward".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new("grpc_requests_total", "gRPC requests by method and status code"),
            &["method", "code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("grpc_request_duration_seconds", "gRPC request latency by method")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["method"],
        )?;
        let hsm_latency = HistogramVec::new(
            HistogramOpts::new("hsm_operation_duration_seconds", "HSM operation latency by operation")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["op"],
        )?;
        let hsm_errors = IntCounterVec::new(
            Opts::new("hsm_errors_total", "HSM operations that failed, by operation"),
            &["op"],
        )?;
        // Exported at 0 from the start, so a rate and an alert see the family.
        for op in HSM_OPS {
            hsm_errors.with_label_values(&[op]);
        }
        registry.register(Box::new(hsm_errors.clone()))?;
        let hsm_pool_in_use = IntGauge::new("hsm_pool_sessions_in_use", "PKCS#11 sessions in use")?;
        let hsm_pool_size = IntGauge::new("hsm_pool_sessions", "PKCS#11 sessions in the pool")?;
        let cached_keys = IntGauge::new("key_cache_accounts", "accounts with unwrapped keys cached")?;
        let keys_per_kek = IntGaugeVec::new(
            Opts::new(
                "account_keys",
                "account keys wrapped under each KEK version, from the store (refreshed every minute)",
            ),
            &["kek_version"],
        )?;
        let handshake_failures = IntCounter::new("tls_handshake_failures_total", "refused TLS handshakes")?;
        let in_flight = IntGauge::new(
            "requests_in_flight",
            "requests being worked on (each runs to its end, even when its client gave up)",
        )?;
        let store_pool_size = IntGauge::new("store_pool_connections", "store connections open (idle or in use)")?;
        let store_pool_idle = IntGauge::new("store_pool_idle_connections", "store connections idle in the pool")?;
        let connections = IntGaugeVec::new(
            Opts::new("connections", "connections held by a listener (handshaking or open)"),
            &["listener"],
        )?;
        let accept_errors = IntCounterVec::new(
            Opts::new(
                "accept_errors_total",
                "failed accept() calls by listener (e.g. out of file descriptors)",
            ),
            &["listener"],
        )?;
        let shed = IntCounterVec::new(
            Opts::new("requests_shed_total", "requests refused before any work, by reason"),
            &["reason"],
        )?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(accept_errors.clone()))?;
        registry.register(Box::new(shed.clone()))?;
        let session_refusals = IntCounterVec::new(
            Opts::new(
                "session_refusals_total",
                "delegated-session requests refused by the session's own bounds, by reason",
            ),
            &["reason"],
        )?;
        for reason in SESSION_REFUSALS {
            session_refusals.with_label_values(&[reason]).inc_by(0);
        }
        registry.register(Box::new(session_refusals.clone()))?;
        let hsm_wait_timeouts = IntCounter::new(
            "hsm_pool_wait_timeouts_total",
            "HSM operations refused (UNAVAILABLE) after waiting hsm.acquire_timeout_ms for a session",
        )?;
        registry.register(Box::new(hsm_wait_timeouts.clone()))?;
        let audit_queue = IntGauge::new(
            "audit_queue_depth",
            "audit events queued for the group-commit appender (-1 once it stopped)",
        )?;
        let audit_committed = IntGauge::new(
            "audit_committed_seq",
            "the last audit sequence number this replica's appender committed",
        )?;
        let audit_checkpoint = IntGauge::new(
            "audit_last_checkpoint_timestamp_seconds",
            "unix time of the last audit checkpoint this replica signed (0 until its first)",
        )?;
        let issuer_activated = IntGaugeVec::new(
            Opts::new(
                "issuer_key_activated_timestamp_seconds",
                "unix time the active issuer key of each algorithm became active",
            ),
            &["alg"],
        )?;
        let issuer_rotation = IntGauge::new(
            "issuer_key_rotation_seconds",
            "how long an active issuer key signs before its scheduled rotation (jwks.rotation_days)",
        )?;
        for c in [&audit_queue, &audit_committed, &audit_checkpoint, &issuer_rotation] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(issuer_activated.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(hsm_latency.clone()))?;
        registry.register(Box::new(hsm_pool_in_use.clone()))?;
        registry.register(Box::new(hsm_pool_size.clone()))?;
        registry.register(Box::new(cached_keys.clone()))?;
        registry.register(Box::new(keys_per_kek.clone()))?;
        registry.register(Box::new(handshake_failures.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(store_pool_size.clone()))?;
        registry.register(Box::new(store_pool_idle.clone()))?;
        // Resident memory, open file descriptors, CPU time of this process
        // (keyward_process_*), read from /proc at scrape.
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(Metrics {
            registry,
            requests,
            latency,
            hsm_latency,
            hsm_errors,
            hsm_pool_in_use,
            hsm_pool_size,
            cached_keys,
            keys_per_kek,
            handshake_failures,
            store_pool_size,
            store_pool_idle,
            in_flight,
            connections,
            accept_errors,
            shed,
            session_refusals,
            hsm_wait_timeouts,
            audit_queue,
            audit_committed,
            audit_checkpoint,
            issuer_activated,
            issuer_rotation,
        })
    }

    /// The audit log's and the issuer's gauges, sampled at scrape.
    pub fn set_audit_and_issuer(&self, sample: &AuditIssuerSample) {
        let int = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.audit_queue.set(sample.audit_queue.map(int).unwrap_or(-1));
        self.audit_committed
            .set(i64::try_from(sample.audit_committed).unwrap_or(i64::MAX));
        self.audit_checkpoint.set(sample.last_checkpoint);
        self.issuer_rotation.set(sample.issuer_rotation);
        for (alg, at) in &sample.issuer_activated {
            self.issuer_activated.with_label_values(&[alg]).set(*at);
        }
    }

    /// Brings the HSM wait-timeout counter up to the pool's total (at scrape).
    pub fn sync_hsm_wait_timeouts(&self, total: u64) {
        let seen = self.hsm_wait_timeouts.get();
        if total > seen {
            self.hsm_wait_timeouts.inc_by(total - seen);
        }
    }

    /// A listener's connection gauge and accept-error counter.
    pub fn listener(&self, name: &str) -> (IntGauge, IntCounter) {
        (
            self.connections.with_label_values(&[name]),
            self.accept_errors.with_label_values(&[name]),
        )
    }

    /// Counts a request refused before any work (`reason`: what shed it).
    pub fn shed(&self, reason: &str) {
        self.shed.with_label_values(&[reason]).inc();
    }

    /// Counts a request refused by a session's bounds (`reason` is one of
    /// [`SESSION_REFUSALS`]).
    pub fn session_refused(&self, reason: &str) {
        self.session_refusals.with_label_values(&[reason]).inc();
    }

    /// Registers a component's own series (the component keeps its handle).
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) -> Result<(), prometheus::Error> {
        self.registry.register(collector)
    }

    /// Account keys per KEK version (`keyward kek rewrap` empties old versions).
    pub fn set_keys_per_kek(&self, counts: &[(u32, u64)]) {
        self.keys_per_kek.reset();
        for (version, n) in counts {
            self.keys_per_kek
                .with_label_values(&[&version.to_string()])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }

    /// Records one finished RPC.
    pub fn observe_request(&self, method: &str, code: tonic::Code, started: Instant) {
        self.requests.with_label_values(&[method, code_name(code)]).inc();
        self.latency
            .with_label_values(&[method])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Records one HSM call: its latency, and whether it failed.
    pub fn observe_hsm(&self, op: &str, started: Instant, ok: bool) {
        self.hsm_latency
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        if !ok {
            self.hsm_errors.with_label_values(&[op]).inc();
        }
    }

    /// Point-in-time gauges, sampled at scrape.
    pub fn set_gauges(&self, pool_in_use: usize, pool_size: usize, cached_keys: usize, handshake_failures: u64) {
        self.hsm_pool_in_use.set(i64::try_from(pool_in_use).unwrap_or(i64::MAX));
        self.hsm_pool_size.set(i64::try_from(pool_size).unwrap_or(i64::MAX));
        self.cached_keys.set(i64::try_from(cached_keys).unwrap_or(i64::MAX));
        let seen = self.handshake_failures.get();
        if handshake_failures > seen {
            self.handshake_failures.inc_by(handshake_failures - seen);
        }
    }

    /// The gauge of requests being worked on.
    pub fn in_flight(&self) -> &IntGauge {
        &self.in_flight
    }

    /// The store's connection pool, sampled at scrape.
    pub fn set_store_pool(&self, pool: crate::store::PoolStats) {
        self.store_pool_size.set(i64::from(pool.size));
        self.store_pool_idle.set(i64::try_from(pool.idle).unwrap_or(i64::MAX));
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new().encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The canonical gRPC status name, as `grpc-status` docs spell it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
