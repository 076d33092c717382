//! tonic services: proto <-> domain mapping and error mapping only. No crypto
//! and no policy logic lives here.

mod access;
mod account;
pub mod audit;
mod error;
mod jwks;
mod session;
mod signing;

pub use error::ApiError;
pub use session::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::keys::KeyService;
use crate::metrics::Metrics;
use crate::tls::ConnInfo;

/// Generated protobuf and gRPC types.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("keyward.v1");
}

/// Largest typed-data document accepted, in bytes.
pub const MAX_TYPED_DATA_BYTES: usize = crate::crypto::eip712::MAX_DOCUMENT_BYTES;
/// Largest message `SignMessage` accepts, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The rule a frozen account's refusals name in their audit event (not a Cedar policy: a
/// frozen account is refused whatever the policies say).
pub const FROZEN_RULE: &str = "account-frozen";

/// What every handler shares.
#[derive(Debug)]
pub struct Daemon {
    /// Accounts and signing.
    pub keys: KeyService,
    /// Who may do what: the policy decision point every RPC asks.
    pub policy: Arc<crate::policy::DecisionPoint>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Whether logs may carry account ids.
    pub log_details: bool,
    /// How long a controller change waits before it takes effect, seconds.
    pub controller_change_delay: i64,
    /// Delegated sessions.
    pub sessions: Arc<crate::session::Sessions>,
    /// Issuer key lifecycle and the published JWKS.
    pub jwks: Arc<crate::jwks::KeyLifecycle>,
    /// The audit log's group-commit appender.
    pub audit: Arc<crate::audit::Appender>,
    /// Readiness (the store probe), for `/readyz` and gRPC health.
    pub health: Arc<crate::health::Health>,
    /// Permits for requests being worked on (`server.max_requests_in_flight`).
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// Requests in flight per client identity (`server.max_requests_per_identity`).
    pub per_identity: Arc<PerIdentity>,
    /// Turns true when graceful shutdown starts: long-lived streams end.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// True while a stopping replica drains (`server.drain_seconds` > 0):
    /// new requests are answered UNAVAILABLE. Without a drain, requests
    /// already received when shutdown starts are served.
    pub refusing: std::sync::atomic::AtomicBool,
}

/// Requests in flight per client identity, so that one client (one
/// certificate, however many connections it opens) cannot hold every permit
/// of `server.max_requests_in_flight`.
#[derive(Debug)]
pub struct PerIdentity {
    max: usize,
    counts: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl PerIdentity {
    /// At most `max` requests in flight per identity.
    pub fn new(max: usize) -> PerIdentity {
        PerIdentity {
            max,
            counts: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// A place for one more request of `identity`, or `None` at its limit.
    fn enter(self: &Arc<Self>, identity: &str) -> Option<IdentitySlot> {
        let mut counts = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = counts.entry(identity.to_string()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IdentitySlot {
            owner: self.clone(),
            identity: identity.to_string(),
        })
    }

    /// Requests of `identity` in flight now.
    pub fn current(&self, identity: &str) -> usize {
        let counts = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        counts.get(identity).copied().unwrap_or(0)
    }
}

/// One request's place in its identity's count, given back on drop.
#[derive(Debug)]
struct IdentitySlot {
    owner: Arc<PerIdentity>,
    identity: String,
}

impl Drop for IdentitySlot {
    fn drop(&mut self) {
        let mut counts = self
            .owner
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.identity) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.identity);
            }
        }
    }
}

impl Daemon {
    /// Asks the decision point; a refusal carries the decision. What
    /// decided (policy ids or limit) goes into the request's audit event.
    async fn decide(
        &self,
        identity: &str,
        action: crate::policy::Action,
        resource: crate::policy::Resource<'_>,
        context: crate::policy::RequestContext,
    ) -> Result<crate::policy::Decision, ApiError> {
        // A frozen account signs nothing and opens no session, whatever the policies say;
        // checked after them, so that a caller who may not see the account learns nothing.
        let frozen = match &resource {
            crate::policy::Resource::Account(a) | crate::policy::Resource::Session(_, a) if action.needs_unfrozen() => {
                a.frozen.as_ref().map(|f| (a.id.clone(), f.at))
            }
            _ => None,
        };
        // A deleted account is only read (its public description and keys stay for verifiers).
        let deleted = match &resource {
            crate::policy::Resource::Account(a) | crate::policy::Resource::Session(_, a)
                if !matches!(
                    action,
                    crate::policy::Action::GetAccount
                        | crate::policy::Action::GetAccountJwks
                        | crate::policy::Action::DeleteAccount
                ) =>
            {
                a.deleted_at.map(|at| (a.id.clone(), at))
            }
            _ => None,
        };
        let request = crate::policy::PolicyRequest {
            principal: identity,
            action,
            resource,
            context,
        };
        let decide = tracing::debug_span!("policy", otel.name = "policy.decide", policy.action = action.name());
        let outcome = self.policy.authorize(request).instrument(decide).await;
        match &outcome {
            Ok(decision) => crate::audit::context::record_policies(audit::decided_by(decision)),
            Err(e) => {
                if let Some(decision) = e.decision() {
                    crate::audit::context::record_policies(audit::decided_by(decision));
                }
            }
        }
        let decision = outcome?;
        if let Some((account, at)) = deleted {
            crate::audit::context::record_account(&account);
            return Err(ApiError::Key(crate::keys::KeyError::Deleted { account, at }));
        }
        if let Some((account, since)) = frozen {
            // Recorded as `account-frozen` by `run`, as every freeze is.
            return Err(ApiError::Key(crate::keys::KeyError::Frozen { account, since }));
        }
        Ok(decision)
    }

    /// A limit enforced in a store transaction refused the request: the
    /// refusal, counted, with the limit recorded for the request's event.
    fn limited(&self, identity: &str, action: crate::policy::Action, limit: &str, detail: String) -> ApiError {
        let e = self.policy.refused_by_limit(identity, action, limit, detail);
        if let Some(decision) = e.decision() {
            crate::audit::context::record_policies(audit::decided_by(decision));
        }
        ApiError::from(e)
    }

    /// Runs one RPC: identity, handler, audit event, metrics, one log line,
    /// status mapping. Every request, allowed, denied or failed, gets exactly
    /// one audit event, durable before the response leaves: appended here
    /// (group commit) unless the handler appended it inside its own store
    /// transaction (see [`crate::audit::context`]). If the event cannot be
    /// written the response is withheld and the caller gets UNAVAILABLE.
    ///
    /// Cancellation: the handler, its audit event, its metrics and its log
    /// line run in a task of their own, which the request cannot cancel.
    /// When the client gives up (deadline, reset stream, connection gone)
    /// tonic drops the request future, and with it only the wait for this
    /// task: a reservation it made is completed or released, a transaction it
    /// opened commits or rolls back, and its audit event is written, exactly
    /// as if the client had waited. Handlers may therefore await freely; none
    /// of their awaits is where a request can stop half-way.
    async fn handle<Req, T, F, Fut>(
        self: &Arc<Self>,
        method: &'static str,
        request: Request<Req>,
        f: F,
    ) -> Result<Response<T>, Status>
    where
        Req: audit::AuditFacts + Send + 'static,
        T: audit::AuditFacts + Send + 'static,
        F: FnOnce(Arc<Daemon>, String, Req) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, ApiError>> + Send + 'static,
    {
        let started = Instant::now();
        // A stopping replica takes no new work (see `server.drain_seconds`):
        // the client retries elsewhere. Refused before anything is done, like
        // a shed request: no audit event.
        if self.refusing.load(std::sync::atomic::Ordering::Relaxed) {
            self.metrics.shed("shutting_down");
            self.metrics.observe_request(method, tonic::Code::Unavailable, started);
            return Err(Status::unavailable(
                "this replica is shutting down: retry the request (with the same request id) on another",
            ));
        }
        let identity = request.extensions().get::<ConnInfo>().map(|c| c.identity.clone());
        // One identity's share first: a client over it is refused before
        // anything is done or waited for (shed, not decided: no audit event).
        let slot = match &identity {
            Some(id) => match self.per_identity.enter(id) {
                Some(slot) => Some(slot),
                None => {
                    self.metrics.shed("identity_concurrency");
                    self.metrics
                        .observe_request(method, tonic::Code::ResourceExhausted, started);
                    return Err(Status::resource_exhausted(format!(
                        "too many requests in flight for this client (server.max_requests_per_identity = {})",
                        self.per_identity.max
                    )));
                }
            },
            None => None,
        };
        // The request's span (child of the caller's `traceparent`) and the
        // trace id its audit event records.
        let remote = crate::telemetry::remote_context(request.metadata());
        let span = crate::telemetry::rpc_span(method, &remote);
        let trace_id = crate::telemetry::trace_id(&span, &remote);
        let req = request.into_inner();
        // Waiting here starts nothing: a client that gives up while waiting
        // leaves nothing behind.
        let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
            return Err(Status::unavailable("the daemon is shutting down"));
        };
        let daemon = self.clone();
        // Boxed before it is spawned: the request's future (every handler's
        // state) is then moved once, into the box, instead of through the
        // spawn and into the task's cell and back out of it.
        let task = tokio::spawn(Box::pin(
            async move {
                let _in_flight = InFlight::new(daemon.metrics.in_flight().clone(), permit);
                // Counted until its event is written: a group commit waits for it.
                let _audit = daemon.audit.enter();
                let _slot = slot;
                let result = daemon.run(method, started, identity, trace_id, req, f).await;
                let code = result.as_ref().err().map_or(tonic::Code::Ok, Status::code);
                crate::telemetry::record_status(&tracing::Span::current(), code);
                result
            }
            .instrument(span),
        ));
        match task.await {
            Ok(result) => result.map(Response::new),
            Err(e) => {
                // A handler panicked (a bug): the client gets INTERNAL, the
                // daemon keeps serving. Its event may be missing; the log says so.
                tracing::error!(method, error = %e, "request task failed");
                Err(Status::from(ApiError::Internal("request task failed")))
            }
        }
    }

    /// The body of [`Daemon::handle`], inside the request's own task.
    async fn run<Req, T, F, Fut>(
        self: Arc<Self>,
        method: &'static str,
        started: Instant,
        identity: Option<String>,
        trace_id: String,
        req: Req,
        f: F,
    ) -> Result<T, Status>
    where
        Req: audit::AuditFacts,
        T: audit::AuditFacts,
        F: FnOnce(Arc<Daemon>, String, Req) -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let mut pending = crate::audit::context::Pending::default();
        pending.event.time_ms = crate::audit::event::now_ms();
        pending.event.identity = identity.clone().unwrap_or_default();
        pending.event.action = method.to_string();
        pending.event.trace_id = trace_id;
        req.facts(&mut pending.event);
        let daemon = self.clone();
        let (result, mut pending) = crate::audit::context::scope(pending, async move {
            match identity {
                Some(identity) => f(daemon, identity, req).await,
                None => Err(ApiError::Unauthenticated),
            }
        })
        .await;
        // A frozen account's refusal names `account-frozen`, whether the
        // decision saw the freeze or the key service did (another replica
        // froze the account between the two).
        if let Err(ApiError::Key(crate::keys::KeyError::Frozen { account, .. })) = &result {
            pending.event.policies = vec![FROZEN_RULE.to_string()];
            if pending.event.account.is_empty() {
                pending.event.account.clone_from(account);
            }
        }
        // What decided a refusal (policy ids or limit), for the log line.
        let decided_by = result
            .as_ref()
            .err()
            .and_then(ApiError::decision)
            .map(crate::policy::Decision::decided_by);
        if let Err(ApiError::Session(e)) = &result {
            if let Some(reason) = e.refusal_reason() {
                self.metrics.session_refused(reason);
            }
        }
        let result = result.map_err(Status::from);
        let result = match pending.recorded {
            Some(_) => result,
            None => {
                let code = match &result {
                    Ok(_) => tonic::Code::Ok,
                    Err(s) => s.code(),
                };
                let mut event = pending.event;
                event.decision = audit::decision(code).as_str().to_string();
                event.code = crate::metrics::code_name(code).to_string();
                if let Ok(t) = &result {
                    t.facts(&mut event);
                }
                let commit = tracing::debug_span!("audit", otel.name = "audit.commit");
                match self.audit.append(event).instrument(commit).await {
                    Ok(_) => result,
                    Err(e) => Err(Status::from(ApiError::from(e))),
                }
            }
        };
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.metrics.observe_request(method, code, started);
        // One line per refused or failed RPC at info; successes at debug (the
        // metrics count them), so the hot path does not format a log line.
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        if code == tonic::Code::Ok {
            tracing::debug!(method, code = "OK", micros, "rpc");
        } else {
            tracing::info!(
                method,
                code = crate::metrics::code_name(code),
                micros,
                policy = decided_by.as_deref(),
                "rpc"
            );
        }
        result
    }
}

/// A request being worked on: counted in the gauge and holding its permit
/// until the task ends, however it ends.
struct InFlight {
    gauge: prometheus::IntGauge,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl InFlight {
    fn new(gauge: prometheus::IntGauge, permit: tokio::sync::OwnedSemaphorePermit) -> InFlight {
        gauge.inc();
        InFlight { gauge, _permit: permit }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The account service bound to the daemon.
#[derive(Debug, Clone)]
pub struct AccountApi(pub Arc<Daemon>);

/// The signing service bound to the daemon.
#[derive(Debug, Clone)]
pub struct SigningApi(pub Arc<Daemon>);

/// The session service bound to the daemon.
#[derive(Debug, Clone)]
pub struct SessionApi(pub Arc<Daemon>);

/// The audit service bound to the daemon.
#[derive(Debug, Clone)]
pub struct AuditApi(pub Arc<Daemon>);

/// The JWKS service bound to the daemon.
#[derive(Debug, Clone)]
pub struct JwksApi(pub Arc<Daemon>);

#[cfg(test)]
mod tests {
    use super::PerIdentity;
    use std::sync::Arc;

    #[test]
    fn an_identity_gets_its_share_and_no_more() {
        let limits = Arc::new(PerIdentity::new(2));
        let a1 = limits.enter("a").expect("first");
        let a2 = limits.enter("a").expect("second");
        assert!(limits.enter("a").is_none(), "a third is over the share");
        // Another identity is counted on its own.
        let b = limits.enter("b").expect("b");
        assert_eq!((limits.current("a"), limits.current("b")), (2, 1));
        drop(a1);
        let a3 = limits.enter("a").expect("a place was given back");
        drop((a2, a3, b));
        assert_eq!((limits.current("a"), limits.current("b")), (0, 0));
        // Identities with nothing in flight are forgotten.
        assert!(limits.counts.lock().expect("lock").is_empty());
    }
}
