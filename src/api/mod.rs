//! tonic services: proto <-> domain mapping and error mapping only. No crypto
//! and no policy logic lives here.

mod account;
mod error;
mod jwks;
mod session;
mod signing;

pub use error::ApiError;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

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
    /// Delegated sessions.
    pub sessions: crate::session::Sessions,
    /// Issuer key lifecycle and the published JWKS.
    pub jwks: Arc<crate::jwks::KeyLifecycle>,
}

impl Daemon {
    /// Asks the decision point; a refusal carries the decision.
    async fn decide(
        &self,
        identity: &str,
        action: crate::policy::Action,
        resource: crate::policy::Resource<'_>,
        context: crate::policy::RequestContext,
    ) -> Result<crate::policy::Decision, ApiError> {
        let request = crate::policy::PolicyRequest {
            principal: identity,
            action,
            resource,
            context,
        };
        Ok(self.policy.authorize(request).await?)
    }

    /// Runs one RPC: identity, handler, metrics, one log line, status mapping.
    async fn handle<Req, T, F, Fut>(
        &self,
        method: &'static str,
        request: Request<Req>,
        f: F,
    ) -> Result<Response<T>, Status>
    where
        F: FnOnce(String, Req) -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let started = Instant::now();
        let identity = request.extensions().get::<ConnInfo>().map(|c| c.identity.clone());
        let result = match identity {
            Some(identity) => f(identity, request.into_inner()).await,
            None => Err(ApiError::Unauthenticated),
        };
        // What decided a refusal (policy ids or limit), for the log line.
        let decided_by = result
            .as_ref()
            .err()
            .and_then(ApiError::decision)
            .map(crate::policy::Decision::decided_by);
        let result = result.map(Response::new).map_err(Status::from);
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

/// The account service bound to the daemon.
#[derive(Debug, Clone)]
pub struct AccountApi(pub Arc<Daemon>);

/// The signing service bound to the daemon.
#[derive(Debug, Clone)]
pub struct SigningApi(pub Arc<Daemon>);

/// The session service bound to the daemon.
#[derive(Debug, Clone)]
pub struct SessionApi(pub Arc<Daemon>);

/// The JWKS service bound to the daemon.
#[derive(Debug, Clone)]
pub struct JwksApi(pub Arc<Daemon>);
