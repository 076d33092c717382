//! The audit side of every RPC: what each request and response contributes
//! to its event (`AuditFacts`), how an outcome becomes a decision, and the
//! AuditService (admin only): StreamEvents replays history and follows live.

use std::pin::Pin;
use std::time::Duration;

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::pb;
use super::pb::audit_service_server::AuditService;
use super::{ApiError, AuditApi};
use crate::audit::{Decision, Event, NewEvent};

/// What a request or response tells the audit event about itself. Never
/// copies a secret or a large payload: payloads go in as their SHA-256.
pub trait AuditFacts {
    /// Fills the fields this message knows.
    fn facts(&self, _e: &mut NewEvent) {}
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn sig_ref(signature: &[u8]) -> String {
    if signature.is_empty() {
        String::new()
    } else {
        format!("sig:{}", sha256_hex(signature))
    }
}

/// The session id a token names (`sid`), read without verifying it: the
/// handler verifies; the event only records what was presented.
fn token_session(token: &str) -> String {
    let Some(payload) = token.split('.').nth(1) else {
        return String::new();
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| {
            v.get("sid")
                .and_then(|s| s.as_str())
                .map(|s| s.chars().take(64).collect())
        })
        .unwrap_or_default()
}

/// Caps what a caller-chosen string can put in the log.
fn bounded(s: &str) -> String {
    s.chars().take(128).collect()
}

impl AuditFacts for pb::CreateAccountRequest {}
impl AuditFacts for pb::Account {
    fn facts(&self, e: &mut NewEvent) {
        e.account = self.account_id.clone();
    }
}
impl AuditFacts for pb::GetAccountRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.account = bounded(&self.account_id);
    }
}
impl AuditFacts for pb::GetAccountJwksRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.account = bounded(&self.account_id);
    }
}
impl AuditFacts for pb::GetAccountJwksResponse {}
impl AuditFacts for pb::ListAccountsRequest {}
impl AuditFacts for pb::ListAccountsResponse {}
impl AuditFacts for pb::UpdateAccountRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.account = bounded(&self.account_id);
    }
}
impl AuditFacts for pb::FreezeAccountRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.account = bounded(&self.account_id);
        // The reason is the operator's free text: the log binds it by its hash.
        e.digest = sha256_hex(self.reason.trim().as_bytes());
    }
}
impl AuditFacts for pb::DeleteAccountRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.account = bounded(&self.account_id);
        e.digest = sha256_hex(self.reason.trim().as_bytes());
    }
}
impl AuditFacts for pb::RotateAccountKeysRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.account = bounded(&self.account_id);
        e.digest = sha256_hex(self.reason.trim().as_bytes());
    }
}
impl AuditFacts for pb::ChangeControllerRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.account = bounded(&self.account_id);
    }
}
impl AuditFacts for pb::CancelControllerChangeRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.account = bounded(&self.account_id);
    }
}
impl AuditFacts for pb::ControllerChange {
    fn facts(&self, e: &mut NewEvent) {
        if !self.change_id.is_empty() {
            e.signature_ref = format!("controller-change:{}", self.change_id);
        }
    }
}
impl AuditFacts for pb::CreateImportJobRequest {}
impl AuditFacts for pb::ImportJob {
    fn facts(&self, e: &mut NewEvent) {
        e.signature_ref = format!("import-job:{}", self.job_id);
    }
}
impl AuditFacts for pb::ImportAccountRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.signature_ref = format!("import-job:{}", bounded(&self.job_id));
    }
}
impl AuditFacts for pb::UnfreezeAccountRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.account = bounded(&self.account_id);
    }
}
impl AuditFacts for pb::SignTypedDataRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.account = bounded(&self.account_id);
        e.session = token_session(&self.session_token);
        e.request_id = bounded(&self.request_id);
        e.digest = sha256_hex(self.typed_data_json.as_bytes());
    }
}
impl AuditFacts for pb::SignTypedDataResponse {
    fn facts(&self, e: &mut NewEvent) {
        e.digest = hex::encode(&self.digest);
        e.signature_ref = sig_ref(&self.signature);
    }
}
impl AuditFacts for pb::SignTransactionRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.account = bounded(&self.account_id);
        e.session = token_session(&self.session_token);
        e.request_id = bounded(&self.request_id);
    }
}
impl AuditFacts for pb::SignTransactionResponse {
    fn facts(&self, e: &mut NewEvent) {
        e.digest = hex::encode(&self.signing_hash);
        e.signature_ref = format!("tx:0x{}", hex::encode(&self.transaction_hash));
    }
}
impl AuditFacts for pb::SignMessageRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.account = bounded(&self.account_id);
        e.digest = sha256_hex(&self.data);
    }
}
impl AuditFacts for pb::SignMessageResponse {
    fn facts(&self, e: &mut NewEvent) {
        if !self.digest.is_empty() {
            e.digest = hex::encode(&self.digest);
        }
        e.signature_ref = sig_ref(&self.signature);
    }
}
impl AuditFacts for pb::SignPaymentRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.session = token_session(&self.session_token);
        e.request_id = bounded(&self.request_id);
    }
}
impl AuditFacts for pb::SignPaymentResponse {
    fn facts(&self, e: &mut NewEvent) {
        e.session = self.session_id.clone();
        e.request_id = self.request_id.clone();
        e.digest = hex::encode(&self.digest);
        e.signature_ref = sig_ref(&self.signature);
    }
}
impl AuditFacts for pb::SignReceiptRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.account = bounded(&self.account_id);
        e.session = token_session(&self.session_token);
        e.request_id = bounded(&self.request_id);
    }
}
impl AuditFacts for pb::SignReceiptResponse {
    fn facts(&self, e: &mut NewEvent) {
        e.request_id = self.request_id.clone();
        e.signature_ref = format!("receipt:{}", self.receipt_id);
    }
}
impl AuditFacts for pb::SignAttestationRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.account = bounded(&self.account_id);
        e.session = token_session(&self.session_token);
        e.digest = sha256_hex(self.contribution_hash.as_bytes());
    }
}
impl AuditFacts for pb::SignAttestationResponse {
    fn facts(&self, e: &mut NewEvent) {
        e.signature_ref = crate::audit::event::jws_ref(&self.attestation);
    }
}
impl AuditFacts for pb::CreateSessionChallengeRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.account = bounded(&self.account_id);
    }
}
impl AuditFacts for pb::SessionChallenge {
    fn facts(&self, e: &mut NewEvent) {
        e.signature_ref = format!("challenge:{}", self.challenge_id);
    }
}
impl AuditFacts for pb::OpenSessionRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.request_id = bounded(&self.challenge_id);
    }
}
impl AuditFacts for pb::OpenSessionResponse {
    fn facts(&self, e: &mut NewEvent) {
        if let Some(s) = &self.session {
            s.facts(e);
        }
        e.signature_ref = crate::audit::event::jws_ref(&self.token);
    }
}
impl AuditFacts for pb::Session {
    fn facts(&self, e: &mut NewEvent) {
        e.account = self.account_id.clone();
        e.session = self.session_id.clone();
    }
}
impl AuditFacts for pb::GetSessionRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.session = bounded(&self.session_id);
    }
}
impl AuditFacts for pb::ListSessionsRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.account = bounded(&self.account_id);
    }
}
impl AuditFacts for pb::ListSessionsResponse {}
impl AuditFacts for pb::RevokeSessionRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.session = bounded(&self.session_id);
    }
}
impl AuditFacts for pb::GetJwksRequest {}
impl AuditFacts for pb::GetJwksResponse {}
impl AuditFacts for pb::ListIssuerKeysRequest {}
impl AuditFacts for pb::ListIssuerKeysResponse {}
impl AuditFacts for pb::RotateIssuerKeyRequest {}
impl AuditFacts for pb::RotateIssuerKeyResponse {
    fn facts(&self, e: &mut NewEvent) {
        let kids: Vec<&str> = self.rotations.iter().map(|r| r.activated_kid.as_str()).collect();
        e.signature_ref = format!("kid:{}", kids.join(","));
    }
}
impl AuditFacts for pb::RevokeIssuerKeyRequest {
    fn facts(&self, e: &mut NewEvent) {
        e.signature_ref = format!("kid:{}", bounded(&self.kid));
    }
}
impl AuditFacts for pb::RevokeIssuerKeyResponse {}
impl AuditFacts for pb::StreamEventsRequest {}
impl AuditFacts for EventStream {}

/// What an event records as having decided: the matching policy ids,
/// `limit:<name>` for a limit, `default-deny` when no permit matched.
pub(super) fn decided_by(d: &crate::policy::Decision) -> Vec<String> {
    let mut ids = d.policy_ids.clone();
    if let Some(limit) = &d.limit {
        ids.push(format!("limit:{limit}"));
    }
    if ids.is_empty() && !d.allowed {
        ids.push("default-deny".to_string());
    }
    ids
}

/// The decision a response status records: refusals by authorization,
/// sessions, scopes and limits are `deny`; other failures `error`.
pub(super) fn decision(code: tonic::Code) -> Decision {
    use tonic::Code;
    match code {
        Code::Ok => Decision::Allow,
        Code::PermissionDenied | Code::Unauthenticated | Code::ResourceExhausted | Code::FailedPrecondition => {
            Decision::Deny
        }
        _ => Decision::Error,
    }
}

fn to_proto(e: Event) -> pb::AuditEvent {
    pb::AuditEvent {
        seq: e.seq,
        time_ms: e.body.time_ms,
        identity: e.body.identity,
        action: e.body.action,
        account: e.body.account,
        session: e.body.session,
        request_id: e.body.request_id,
        decision: e.body.decision,
        policies: e.body.policies,
        code: e.body.code,
        digest: e.body.digest,
        signature_ref: e.body.signature_ref,
        prev_hash: hex::encode(e.prev_hash),
        hash: hex::encode(e.hash),
        trace_id: e.body.trace_id,
    }
}

/// The stream StreamEvents answers with.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::AuditEvent, Status>> + Send>>;

/// How often a live stream looks for events committed elsewhere (in a
/// state-change transaction or by another replica).
const POLL: Duration = Duration::from_millis(250);

#[tonic::async_trait]
impl AuditService for AuditApi {
    type StreamEventsStream = EventStream;

    async fn stream_events(&self, request: Request<pb::StreamEventsRequest>) -> Result<Response<EventStream>, Status> {
        self.0
            .handle("StreamEvents", request, |d2, identity, req| async move {
                d2.decide(
                    &identity,
                    crate::policy::Action::ReadAudit,
                    crate::policy::Resource::Service,
                    crate::policy::RequestContext::default(),
                )
                .await?;
                let (tx, rx) = tokio::sync::mpsc::channel(256);
                let store = d2.keys.store().clone();
                let mut committed = d2.audit.committed();
                let mut stopping = d2.stopping.subscribe();
                tokio::spawn(async move {
                    let mut cursor = req.since_seq;
                    loop {
                        // The daemon is stopping: the stream ends (OK), so
                        // graceful shutdown need not wait for the follower.
                        if *stopping.borrow_and_update() {
                            return;
                        }
                        let page = match store.audit().events_after(cursor, 500).await {
                            Ok(p) => p,
                            Err(e) => {
                                let _ = tx
                                    .send(Err(Status::from(ApiError::from(crate::audit::AuditError::from(e)))))
                                    .await;
                                return;
                            }
                        };
                        if page.is_empty() {
                            tokio::select! {
                                _ = committed.changed() => {}
                                _ = tokio::time::sleep(POLL) => {}
                                _ = stopping.changed() => {}
                                _ = tx.closed() => return,
                            }
                            continue;
                        }
                        for e in page {
                            cursor = e.seq;
                            if tx.send(Ok(to_proto(e))).await.is_err() {
                                return;
                            }
                        }
                    }
                });
                Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as EventStream)
            })
            .await
    }
}
