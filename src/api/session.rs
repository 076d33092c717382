//! SessionService: challenges, opening, reading, listing and revoking
//! delegated sessions.

use tonic::{Request, Response, Status};

use super::account::check_account_id;
use super::pb::session_service_server::SessionService;
use super::pb::{
    CreateSessionChallengeRequest, GetSessionRequest, ListSessionsRequest, ListSessionsResponse, OpenSessionRequest,
    OpenSessionResponse, RevokeSessionRequest, Session, SessionChallenge, SessionState,
};
use super::{ApiError, Daemon, SessionApi};
use crate::crypto::eth::Address;
use crate::keys::public_keys;
use crate::policy::{Action, RequestContext, Resource, SessionFacts};
use crate::session::ChallengeRequest;
use crate::store::{AccountRecord, SessionRecord};

fn check_session_id(id: &str) -> Result<(), ApiError> {
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(ApiError::invalid("session_id", "is not a session id (UUID)"));
    }
    Ok(())
}

impl Daemon {
    /// The session's public description, with its revocation document.
    pub(super) fn session_proto(&self, s: &SessionRecord, account: &AccountRecord) -> Session {
        let now = self.sessions.now();
        let state = if s.revoked_at.is_some() {
            SessionState::Revoked
        } else if now >= s.expires_at {
            SessionState::Expired
        } else {
            SessionState::Active
        };
        let revocation = Address::parse(&account.controller)
            .map(|c| self.sessions.revocation_document(s, c).to_string())
            .unwrap_or_default();
        Session {
            session_id: s.id.clone(),
            account_id: s.account_id.clone(),
            delegate: s.delegate.clone(),
            scopes: s.scopes.clone(),
            cap: s.cap.to_string(),
            remaining: s.remaining.to_string(),
            uses: s.uses,
            issued_at: s.issued_at,
            expires_at: s.expires_at,
            state: state as i32,
            revoked_at: s.revoked_at.unwrap_or_default(),
            revoked_by: s.revoked_by.clone().unwrap_or_default(),
            revocation_typed_data_json: revocation,
        }
    }
}

#[tonic::async_trait]
impl SessionService for SessionApi {
    async fn create_session_challenge(
        &self,
        request: Request<CreateSessionChallengeRequest>,
    ) -> Result<Response<SessionChallenge>, Status> {
        self.0
            .handle("CreateSessionChallenge", request, |d, identity, req| async move {
                check_account_id(&req.account_id)?;
                let account = d.keys.record(&req.account_id).await?;
                let (secp, _) = public_keys(&account)?;
                let challenge = ChallengeRequest {
                    account: &account,
                    account_address: Address::from_public_key(&secp),
                    delegate: &req.delegate,
                    scopes: &req.scopes,
                    cap: &req.cap,
                    ttl: req.ttl_seconds,
                };
                // Malformed requests are refused before the decision (and count against no limit).
                let (scopes, cap) = d.sessions.check_challenge(&challenge)?;
                let context = RequestContext {
                    session: SessionFacts {
                        active: false,
                        scopes: scopes.to_strings(),
                        ttl_seconds: req.ttl_seconds,
                        cap,
                    },
                    ..RequestContext::default()
                };
                d.decide(
                    &identity,
                    Action::CreateSessionChallenge,
                    Resource::Account(&account),
                    context,
                )
                .await?;
                let (challenge, session_expires_at) = d.sessions.create_challenge(challenge).await?;
                Ok(SessionChallenge {
                    challenge_id: challenge.id,
                    typed_data_json: challenge.typed_data,
                    expires_at: challenge.expires_at,
                    session_expires_at,
                })
            })
            .await
    }

    async fn open_session(
        &self,
        request: Request<OpenSessionRequest>,
    ) -> Result<Response<OpenSessionResponse>, Status> {
        self.0
            .handle("OpenSession", request, |d, identity, req| async move {
                if uuid::Uuid::parse_str(&req.challenge_id).is_err() {
                    return Err(ApiError::invalid("challenge_id", "is not a challenge id (UUID)"));
                }
                // Authorize against the challenge's account before touching it.
                let account_id = d.sessions.challenge_account(&req.challenge_id).await?;
                let account = d.keys.record(&account_id).await?;
                d.decide(
                    &identity,
                    Action::OpenSession,
                    Resource::Account(&account),
                    RequestContext::default(),
                )
                .await?;
                // The open-session limit is checked where it is exact: in the
                // opening transaction, which sees concurrent opens.
                let max_open = d.policy.current().limits().sessions.max_open_per_account;
                let (session, token) = match d.sessions.open(&req.challenge_id, &req.signature, max_open).await {
                    Err(crate::session::SessionError::TooManyOpen(open)) => {
                        return Err(d.limited(
                            &identity,
                            Action::OpenSession,
                            "sessions.max_open_per_account",
                            format!("{open} sessions already open"),
                        ))
                    }
                    opened => opened?,
                };
                Ok(OpenSessionResponse {
                    session: Some(d.session_proto(&session, &account)),
                    token,
                })
            })
            .await
    }

    async fn get_session(&self, request: Request<GetSessionRequest>) -> Result<Response<Session>, Status> {
        self.0
            .handle("GetSession", request, |d, identity, req| async move {
                check_session_id(&req.session_id)?;
                let session = d.sessions.get(&req.session_id).await?;
                let account = d.keys.record(&session.account_id).await?;
                d.decide(
                    &identity,
                    Action::GetSession,
                    Resource::Session(&session, &account),
                    RequestContext::default(),
                )
                .await?;
                Ok(d.session_proto(&session, &account))
            })
            .await
    }

    async fn list_sessions(
        &self,
        request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        self.0
            .handle("ListSessions", request, |d, identity, req| async move {
                check_account_id(&req.account_id)?;
                let account = d.keys.record(&req.account_id).await?;
                d.decide(
                    &identity,
                    Action::ListSessions,
                    Resource::Account(&account),
                    RequestContext::default(),
                )
                .await?;
                let sessions = d.sessions.list(&req.account_id).await?;
                Ok(ListSessionsResponse {
                    sessions: sessions.iter().map(|s| d.session_proto(s, &account)).collect(),
                })
            })
            .await
    }

    async fn revoke_session(&self, request: Request<RevokeSessionRequest>) -> Result<Response<Session>, Status> {
        self.0
            .handle("RevokeSession", request, |d, identity, req| async move {
                check_session_id(&req.session_id)?;
                let session = d.sessions.get(&req.session_id).await?;
                let account = d.keys.record(&session.account_id).await?;
                let context = RequestContext {
                    controller_signed: !req.controller_signature.is_empty(),
                    ..RequestContext::default()
                };
                d.decide(
                    &identity,
                    Action::RevokeSession,
                    Resource::Session(&session, &account),
                    context,
                )
                .await?;
                if !req.controller_signature.is_empty() {
                    let controller = Address::parse(&account.controller)
                        .map_err(|_| ApiError::invalid("controller", "stored controller is not an address"))?;
                    d.sessions
                        .check_revocation_signature(&session, controller, &req.controller_signature)?;
                }
                let by = if req.controller_signature.is_empty() {
                    identity
                } else {
                    format!("controller:{}", account.controller)
                };
                let revoked = d.sessions.revoke(&req.session_id, &by).await?;
                Ok(d.session_proto(&revoked, &account))
            })
            .await
    }
}
