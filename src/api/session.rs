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
use crate::policy::{Action, RequestContext, SessionFacts};
use crate::session::ChallengeRequest;
use crate::store::{AccountRecord, SessionCursor, SessionRecord};

fn check_session_id(id: &str) -> Result<(), ApiError> {
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(ApiError::invalid("session_id", "is not a session id (UUID)"));
    }
    Ok(())
}

/// Sessions per ListSessions page when the request asks for 0.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// The most sessions per page; larger asks are answered with this many.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// The longest page token accepted (the daemon's are about 120 bytes).
const MAX_PAGE_TOKEN: usize = 256;

/// The token of the page after `last` of `account_id`'s listing: opaque to
/// callers (base64url of the account, the last session's issue time and id).
fn page_token(account_id: &str, last: &SessionRecord) -> String {
    use base64::Engine as _;
    let raw = format!("{account_id}/{}/{}", last.issued_at, last.id);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

/// Where a ListSessions request starts, checked before anything is looked
/// up: `None` for the first page.
fn page_start(account_id: &str, token: &str) -> Result<Option<SessionCursor>, ApiError> {
    use base64::Engine as _;
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || ApiError::invalid("page_token", "is not a next_page_token of this account's listing");
    if token.len() > MAX_PAGE_TOKEN {
        return Err(bad());
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let mut parts = raw.splitn(3, '/');
    let (Some(account), Some(issued_at), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let issued_at: i64 = issued_at.parse().map_err(|_| bad())?;
    if account != account_id || uuid::Uuid::parse_str(id).is_err() {
        return Err(bad());
    }
    Ok(Some(SessionCursor {
        issued_at,
        id: id.to_string(),
    }))
}

impl Daemon {
    /// Each asset of the session with its own cap, and what is left of it.
    async fn session_assets(&self, s: &SessionRecord) -> Result<Vec<crate::api::pb::AssetCap>, ApiError> {
        let scopes = crate::session::Scopes::parse(&s.scopes).map_err(|_| ApiError::Internal("stored scopes"))?;
        let spent = self.sessions.asset_spent(&s.id).await?;
        Ok(scopes
            .iter()
            .filter_map(|scope| match scope {
                crate::session::Scope::Cap { asset, amount } => {
                    let asset = asset.to_string();
                    let used = spent.iter().find(|(a, _)| *a == asset).map_or(0, |(_, v)| *v);
                    Some(crate::api::pb::AssetCap {
                        remaining: amount.saturating_sub(used).to_string(),
                        cap: amount.to_string(),
                        asset,
                    })
                }
                _ => None,
            })
            .collect())
    }

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
            assets: Vec::new(),
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
                // Malformed requests are refused before the lookup and the
                // decision, alike for every account id (and count against no limit).
                let (scopes, cap) =
                    d.sessions
                        .check_challenge(&req.delegate, &req.scopes, &req.cap, req.ttl_seconds)?;
                let context = RequestContext {
                    session: SessionFacts {
                        active: false,
                        scopes: scopes.to_strings(),
                        ttl_seconds: req.ttl_seconds,
                        cap,
                    },
                    ..RequestContext::default()
                };
                let account = d
                    .account_for(&identity, Action::CreateSessionChallenge, &req.account_id, context)
                    .await?;
                let (secp, _) = public_keys(&account)?;
                let challenge = ChallengeRequest {
                    account: &account,
                    account_address: Address::from_public_key(&secp),
                    delegate: &req.delegate,
                    scopes: &req.scopes,
                    cap: &req.cap,
                    ttl: req.ttl_seconds,
                };
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
                let account = d.challenge_account_for(&identity, &req.challenge_id).await?;
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
                let (session, account) = d
                    .session_for(
                        &identity,
                        Action::GetSession,
                        &req.session_id,
                        RequestContext::default(),
                    )
                    .await?;
                let mut out = d.session_proto(&session, &account);
                out.assets = d.session_assets(&session).await?;
                Ok(out)
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
                let after = page_start(&req.account_id, &req.page_token)?;
                let size = match req.page_size {
                    0 => DEFAULT_PAGE_SIZE,
                    n => n.min(MAX_PAGE_SIZE),
                };
                let account = d
                    .account_for(
                        &identity,
                        Action::ListSessions,
                        &req.account_id,
                        RequestContext::default(),
                    )
                    .await?;
                // One more than the page: whether a next page exists.
                let mut sessions = d.sessions.list_page(&req.account_id, after.as_ref(), size + 1).await?;
                let more = sessions.len() > size as usize;
                sessions.truncate(size as usize);
                let next_page_token = match sessions.last() {
                    Some(last) if more => page_token(&req.account_id, last),
                    _ => String::new(),
                };
                Ok(ListSessionsResponse {
                    sessions: sessions.iter().map(|s| d.session_proto(s, &account)).collect(),
                    next_page_token,
                })
            })
            .await
    }

    async fn revoke_session(&self, request: Request<RevokeSessionRequest>) -> Result<Response<Session>, Status> {
        self.0
            .handle("RevokeSession", request, |d, identity, req| async move {
                check_session_id(&req.session_id)?;
                let context = RequestContext {
                    controller_signed: !req.controller_signature.is_empty(),
                    ..RequestContext::default()
                };
                let (session, account) = d
                    .session_for(&identity, Action::RevokeSession, &req.session_id, context)
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
