//! Lookups before the decision, without an existence oracle: a handler that
//! must load an account or a session to decide on it (the policies read its
//! creator and listed clients) loads it here, and a caller refused on it
//! cannot tell a missing resource from one it may not use.
//!
//! The rule: a caller who is refused, and who may not read the resource
//! (GetAccount on the account, GetSession on the session), gets exactly the
//! answer it would get if the resource did not exist; a missing resource is
//! decided as a *ghost* (its id, no creator, no listed clients, no label),
//! which refuses every caller the policies do not allow on any resource.
//! Callers the ghost allows (admins, wallet gateways relaying for any
//! account) may act on any account, so learn nothing new from NOT_FOUND.
//! What really decided goes to the audit event and the log line, never to
//! the caller. Never answers from a resource's attributes before the
//! decision.

use std::sync::Arc;

use super::{ApiError, Daemon};
use crate::keys::KeyError;
use crate::policy::{decide, Action, Decision, PolicyError, PolicyRequest, RequestContext, Resource};
use crate::session::SessionError;
use crate::store::{AccountRecord, SessionRecord};

/// An account that does not exist, as the policies see it: the id asked
/// for and no attributes.
fn ghost_account(id: &str) -> AccountRecord {
    AccountRecord {
        id: id.to_string(),
        label: None,
        controller: String::new(),
        created_by: String::new(),
        created_at: 0,
        allowed: Vec::new(),
        keys: Vec::new(),
        frozen: None,
        deleted_at: None,
    }
}

/// A session that does not exist: the id asked for, no delegate, no scopes,
/// of a ghost account.
fn ghost_session(id: &str) -> SessionRecord {
    SessionRecord {
        id: id.to_string(),
        account_id: String::new(),
        delegate: String::new(),
        scopes: Vec::new(),
        cap: 0,
        remaining: 0,
        uses: 0,
        issued_at: 0,
        expires_at: 0,
        challenge_id: String::new(),
        jti: String::new(),
        revoked_at: None,
        revoked_by: None,
        scope_grammar: crate::session::SCOPE_GRAMMAR,
    }
}

/// The read action that lets a caller know a resource exists.
fn read_action(resource: &Resource<'_>) -> Action {
    match resource {
        Resource::Session(..) => Action::GetSession,
        _ => Action::GetAccount,
    }
}

impl Daemon {
    /// What the policies would decide, without limits, counting or audit.
    fn peek(&self, identity: &str, action: Action, resource: Resource<'_>, mut context: RequestContext) -> Decision {
        if context.now == 0 {
            context.now = self.sessions.now();
        }
        let request = PolicyRequest {
            principal: identity,
            action,
            resource,
            context,
        };
        decide(&request, &self.policy.current())
    }

    /// Decides `action` on a resource that exists. A refused caller who
    /// may not read it, and whom `ghost` (the same request on a missing
    /// resource) refuses too, gets the ghost's refusal; the real decision
    /// is recorded.
    async fn decide_existing(
        &self,
        identity: &str,
        action: Action,
        real: Resource<'_>,
        ghost: Resource<'_>,
        context: RequestContext,
    ) -> Result<Decision, ApiError> {
        let refusal = match self.decide(identity, action, real, context.clone()).await {
            Err(ApiError::Policy(PolicyError::Denied { decision, .. })) => decision,
            other => return other,
        };
        let denied = |decision: Box<Decision>| PolicyError::Denied {
            identity: identity.to_string(),
            action: action.name(),
            decision,
        };
        if self
            .peek(identity, read_action(&real), real, RequestContext::default())
            .allowed
        {
            // The caller knows the resource: the precise refusal.
            return Err(denied(refusal).into());
        }
        let as_missing = self.peek(identity, action, ghost, context);
        if as_missing.allowed {
            // The caller may do this on any resource: existence is no secret to it.
            return Err(denied(refusal).into());
        }
        Err(ApiError::Concealed {
            shown: denied(Box::new(as_missing)),
            decision: refusal,
        })
    }

    /// Decides `action` on a resource that does not exist (`ghost`): the
    /// refusal any such resource gets, or `not_found` for a caller the
    /// ghost does not refuse.
    async fn decide_missing(
        &self,
        identity: &str,
        action: Action,
        ghost: Resource<'_>,
        context: RequestContext,
        not_found: ApiError,
    ) -> ApiError {
        // Peeked first: an allowed ghost must not take rate-limit tokens.
        if self.peek(identity, action, ghost, context.clone()).allowed {
            return not_found;
        }
        match self.decide(identity, action, ghost, context).await {
            Err(refusal) => refusal,
            Ok(_) => not_found,
        }
    }

    /// The account `id`, once `identity` may do `action` on it (see the
    /// module's rule for refusals and missing accounts).
    pub(super) async fn account_for(
        &self,
        identity: &str,
        action: Action,
        id: &str,
        context: RequestContext,
    ) -> Result<Arc<AccountRecord>, ApiError> {
        self.account_as(identity, action, id, id, context).await
    }

    /// As [`Daemon::account_for`], deciding a missing or concealed account
    /// as the ghost with id `ghost_id`.
    async fn account_as(
        &self,
        identity: &str,
        action: Action,
        id: &str,
        ghost_id: &str,
        context: RequestContext,
    ) -> Result<Arc<AccountRecord>, ApiError> {
        let ghost = ghost_account(ghost_id);
        match self.keys.record(id).await {
            Ok(record) => {
                self.decide_existing(
                    identity,
                    action,
                    Resource::Account(&record),
                    Resource::Account(&ghost),
                    context,
                )
                .await?;
                Ok(record)
            }
            Err(e @ KeyError::AccountNotFound(_)) => Err(self
                .decide_missing(identity, action, Resource::Account(&ghost), context, e.into())
                .await),
            Err(e) => Err(e.into()),
        }
    }

    /// The account a challenge is for, once `identity` may open sessions on
    /// it. A missing challenge is decided on a ghost account without an id,
    /// and so is a refusal the caller may not know about.
    pub(super) async fn challenge_account_for(
        &self,
        identity: &str,
        challenge_id: &str,
    ) -> Result<Arc<AccountRecord>, ApiError> {
        let (action, context) = (Action::OpenSession, RequestContext::default());
        let account_id = match self.sessions.challenge_account(challenge_id).await {
            Ok(id) => id,
            Err(e @ SessionError::ChallengeNotFound(_)) => {
                let ghost = ghost_account("");
                return Err(self
                    .decide_missing(identity, action, Resource::Account(&ghost), context, e.into())
                    .await);
            }
            Err(e) => return Err(e.into()),
        };
        self.account_as(identity, action, &account_id, "", context).await
    }

    /// The session `id` and its account, once `identity` may do `action`
    /// on it (see the module's rule).
    pub(super) async fn session_for(
        &self,
        identity: &str,
        action: Action,
        id: &str,
        context: RequestContext,
    ) -> Result<(SessionRecord, Arc<AccountRecord>), ApiError> {
        let (ghost, ghost_owner) = (ghost_session(id), ghost_account(""));
        let missing = Resource::Session(&ghost, &ghost_owner);
        let session = match self.sessions.get(id).await {
            Ok(s) => s,
            Err(e @ SessionError::SessionNotFound(_)) => {
                return Err(self.decide_missing(identity, action, missing, context, e.into()).await)
            }
            Err(e) => return Err(e.into()),
        };
        let account = self.keys.record(&session.account_id).await?;
        self.decide_existing(
            identity,
            action,
            Resource::Session(&session, &account),
            missing,
            context,
        )
        .await?;
        Ok((session, account))
    }
}
