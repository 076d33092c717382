//! The session life cycle: challenge → open → use (reserve, sign, complete)
//! → revoke or expire.

use std::sync::Arc;

use rand::RngCore;
use serde_json::Value;

use super::scope::{Scope, SCOPE_GRAMMAR};
use super::token::{SessionClaims, ISSUER, TOKEN_TYP};
use super::typed::{session_grant, session_revocation, Domain, Grant};
use super::{Scopes, SessionError};
use crate::clock::Clock;
use crate::crypto::eip712::TypedData;
use crate::crypto::eth::{recover_address, Address};
use crate::hsm::IssuerAlg;
use crate::issuer::Issuer;
use crate::store::{
    AccountRecord, ChallengeRecord, OpenOutcome, Pruned, SessionCursor, SessionRecord, SpendEvent, SpendOutcome,
    SpendPart, SpendRequest, Store,
};

/// Most characters in a delegate identity.
const MAX_DELEGATE: usize = 1024;

/// Session settings from config.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// The EIP-712 domain.
    pub domain: Domain,
    /// How long a challenge can be opened, seconds.
    pub challenge_ttl: i64,
    /// Longest session, seconds.
    pub max_ttl: i64,
    /// Tolerated clock difference between replicas, seconds.
    pub clock_skew: i64,
    /// The recovery bound, seconds: a spend still pending this long after
    /// its reservation is released by [`Sessions::sweep_pending`].
    pub pending_spend_timeout: i64,
    /// How long ended sessions and unopened challenges are kept, seconds
    /// (`None`: for ever); see [`Sessions::prune_ended`].
    pub retention: Option<i64>,
}

/// What a challenge asks for.
#[derive(Debug, Clone)]
pub struct ChallengeRequest<'a> {
    /// The account (already authorized).
    pub account: &'a AccountRecord,
    /// The account's own address.
    pub account_address: Address,
    /// Delegate identity.
    pub delegate: &'a str,
    /// Scope strings.
    pub scopes: &'a [String],
    /// Cap, decimal.
    pub cap: &'a str,
    /// Session lifetime, seconds.
    pub ttl: u64,
}

/// A reservation, or the stored result of an earlier identical request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spend {
    /// Reserved: sign, then `complete` (or `release` on failure).
    Reserved(SpendResult),
    /// The same request succeeded before: its encoded response.
    Replay(Vec<u8>),
}

/// A fresh reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendResult {
    /// The idempotency key in force (given or generated).
    pub request_id: String,
    /// Cap left after this spend.
    pub remaining: u128,
    /// The session's use counter for this spend.
    pub nonce: u64,
}

/// Delegated sessions over the store and the issuer key.
#[derive(Debug, Clone)]
pub struct Sessions {
    store: Arc<dyn Store>,
    issuer: Arc<Issuer>,
    clock: Arc<dyn Clock>,
    settings: SessionSettings,
}

/// How long a retry waits for its first attempt, still running, to finish
/// before it is refused as in progress (ABORTED, retry later).
pub const IN_PROGRESS_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The longest session token accepted (a token with every scope the grammar
/// allows is a few KiB); longer ones are refused before they are decoded.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The rule a recovery release names in its audit event.
pub const RECOVERY_RULE: &str = "recovery:pending-spend-timeout";

/// How often [`Sessions::sweep`] prunes ended sessions and stale challenges.
pub const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Rows per prune transaction (the SQLite writer lock is free in between).
const PRUNE_BATCH: u32 = 500;

/// Checks that `signature` (65 bytes r‖s‖v, field `controller_signature`) over the EIP-712
/// document `doc` (one keyward builds) is `controller`'s; its signing hash.
pub fn check_controller_signature(
    doc: &Value,
    controller: Address,
    signature: &[u8],
) -> Result<[u8; 32], SessionError> {
    let typed = TypedData::from_value(doc).map_err(|_| SessionError::Internal("controller document"))?;
    if signature.len() != 65 {
        return Err(invalid("controller_signature", "expected 65 bytes r || s || v"));
    }
    let hash = typed.signing_hash();
    let signer = recover_address(&hash, signature).map_err(|e| invalid("controller_signature", e.to_string()))?;
    if signer != controller {
        return Err(SessionError::WrongSigner {
            expected: controller.to_checksum(),
        });
    }
    Ok(hash)
}

fn invalid(field: &'static str, reason: impl Into<String>) -> SessionError {
    SessionError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Parses a decimal u128 amount.
pub fn parse_amount(field: &'static str, s: &str) -> Result<u128, SessionError> {
    if s.is_empty() || s.len() > 39 || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0')) {
        return Err(invalid(field, "expected a canonical decimal integer (u128)"));
    }
    s.parse().map_err(|_| invalid(field, "does not fit in u128"))
}

impl Sessions {
    /// Wires the service.
    pub fn new(
        store: Arc<dyn Store>,
        issuer: Arc<Issuer>,
        clock: Arc<dyn Clock>,
        settings: SessionSettings,
    ) -> Sessions {
        Sessions {
            store,
            issuer,
            clock,
            settings,
        }
    }

    /// Now, UTC seconds.
    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    /// The issuer key ring.
    pub fn issuer(&self) -> &Arc<Issuer> {
        &self.issuer
    }

    /// Validates what a challenge asks for (delegate, scopes, cap and
    /// lifetime), without side effects and without the account (so a
    /// malformed request is refused alike for every account id): its parsed
    /// scopes and cap.
    pub fn check_challenge(
        &self,
        delegate: &str,
        scopes: &[String],
        cap: &str,
        ttl: u64,
    ) -> Result<(Scopes, u128), SessionError> {
        if delegate.is_empty() || delegate.len() > MAX_DELEGATE || delegate.chars().any(char::is_control) {
            return Err(invalid("delegate", "not a client identity"));
        }
        let scopes = Scopes::parse(scopes).map_err(|e| invalid("scopes", e.to_string()))?;
        let cap = parse_amount("cap", cap)?;
        // 0: nothing outside the assets' own caps (then at least one is needed).
        if cap == 0 && !scopes.iter().any(|s| matches!(s, Scope::Cap { .. })) {
            return Err(invalid(
                "cap",
                "must be greater than 0 (or 0 with a cap:<asset>:<amount> scope for each asset)",
            ));
        }
        let max = u64::try_from(self.settings.max_ttl).unwrap_or(0);
        if ttl == 0 || ttl > max {
            return Err(invalid("ttl_seconds", format!("must be between 1 and {max}")));
        }
        Ok((scopes, cap))
    }

    /// Validates the request and stores a single-use SessionGrant challenge.
    pub async fn create_challenge(&self, req: ChallengeRequest<'_>) -> Result<(ChallengeRecord, i64), SessionError> {
        let (scopes, cap) = self.check_challenge(req.delegate, req.scopes, req.cap, req.ttl)?;
        let controller =
            Address::parse(&req.account.controller).map_err(|_| SessionError::Internal("stored controller address"))?;
        let now = self.clock.now();
        let session_expires_at = now.saturating_add(i64::try_from(req.ttl).unwrap_or(i64::MAX));
        let mut nonce = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut nonce);
        let canonical = scopes.to_strings();
        let doc = session_grant(
            &self.settings.domain,
            &Grant {
                account_id: &req.account.id,
                account: req.account_address,
                controller,
                delegate: req.delegate,
                scopes: &canonical,
                cap,
                nonce,
                issued_at: now,
                expires_at: session_expires_at,
            },
            &scopes,
        );
        let record = ChallengeRecord {
            id: uuid::Uuid::new_v4().to_string(),
            account_id: req.account.id.clone(),
            delegate: req.delegate.to_string(),
            scopes: canonical,
            cap,
            nonce,
            typed_data: doc.to_string(),
            issued_at: now,
            expires_at: now.saturating_add(self.settings.challenge_ttl),
        };
        self.store.create_challenge(&record).await?;
        Ok((record, session_expires_at))
    }

    /// Opens a session if the controller signed the challenge: the challenge
    /// is consumed in the same transaction that creates the session.
    pub async fn open(
        &self,
        challenge_id: &str,
        signature: &[u8],
        max_open: Option<u64>,
    ) -> Result<(SessionRecord, String), SessionError> {
        let now = self.clock.now();
        let (challenge, consumed) = self
            .store
            .get_challenge(challenge_id)
            .await?
            .ok_or_else(|| SessionError::ChallengeNotFound(challenge_id.to_string()))?;
        if consumed.is_some() {
            return Err(SessionError::ChallengeUsed(challenge_id.to_string()));
        }
        if now >= challenge.expires_at {
            return Err(SessionError::ChallengeExpired(challenge_id.to_string()));
        }
        let typed =
            TypedData::from_json_str(&challenge.typed_data).map_err(|_| SessionError::Internal("stored challenge"))?;
        let doc: Value =
            serde_json::from_str(&challenge.typed_data).map_err(|_| SessionError::Internal("stored challenge"))?;
        let controller = doc["message"]["controller"]
            .as_str()
            .and_then(|c| Address::parse(c).ok())
            .ok_or(SessionError::Internal("stored challenge controller"))?;
        let expires_at = doc["message"]["expiresAt"]
            .as_i64()
            .ok_or(SessionError::Internal("stored challenge expiry"))?;
        if signature.len() != 65 {
            return Err(invalid("signature", "expected 65 bytes r || s || v"));
        }
        let signer = recover_address(&typed.signing_hash(), signature)
            .map_err(|e| invalid("signature", format!("{e} (high-s signatures are refused)")))?;
        if signer != controller {
            return Err(SessionError::WrongSigner {
                expected: controller.to_checksum(),
            });
        }
        if now >= expires_at {
            return Err(SessionError::ChallengeExpired(challenge_id.to_string()));
        }
        let session = SessionRecord {
            id: uuid::Uuid::new_v4().to_string(),
            account_id: challenge.account_id.clone(),
            delegate: challenge.delegate.clone(),
            scopes: challenge.scopes.clone(),
            cap: challenge.cap,
            remaining: challenge.cap,
            uses: 0,
            issued_at: now,
            expires_at,
            challenge_id: challenge.id.clone(),
            jti: uuid::Uuid::new_v4().to_string(),
            revoked_at: None,
            revoked_by: None,
            scope_grammar: SCOPE_GRAMMAR,
        };
        let token = self.issue_token(&session).await?;
        // The request's audit event is appended in the opening transaction.
        let event =
            crate::audit::context::in_transaction(String::new(), crate::audit::event::jws_ref(&token)).map(|mut e| {
                e.account.clone_from(&session.account_id);
                e.session.clone_from(&session.id);
                e
            });
        let (outcome, seq) = self
            .store
            .open_session_audited(challenge_id, now, &session, max_open, event.as_ref())
            .await?;
        match outcome {
            OpenOutcome::Opened => {
                if let Some(seq) = seq {
                    crate::audit::context::mark_recorded(seq);
                }
                Ok((session, token))
            }
            OpenOutcome::ChallengeNotFound => Err(SessionError::ChallengeNotFound(challenge_id.to_string())),
            OpenOutcome::ChallengeUsed => Err(SessionError::ChallengeUsed(challenge_id.to_string())),
            OpenOutcome::ChallengeExpired => Err(SessionError::ChallengeExpired(challenge_id.to_string())),
            OpenOutcome::TooManyOpen(open) => Err(SessionError::TooManyOpen(open)),
        }
    }

    async fn issue_token(&self, s: &SessionRecord) -> Result<String, SessionError> {
        let claims = SessionClaims {
            iss: ISSUER.to_string(),
            sid: s.id.clone(),
            sub: s.account_id.clone(),
            aud: s.delegate.clone(),
            scope: s.scopes.join(" "),
            cap: s.cap.to_string(),
            iat: s.issued_at,
            exp: s.expires_at,
            jti: s.jti.clone(),
        };
        let claims = serde_json::to_value(&claims).map_err(|_| SessionError::Internal("claims"))?;
        let issuer = self.issuer.clone();
        tokio::task::spawn_blocking(crate::telemetry::in_span("hsm.sign_jws", move || {
            issuer.sign_jws(IssuerAlg::EdDSA, TOKEN_TYP, &claims)
        }))
        .await
        .map_err(|_| SessionError::Internal("token signing task"))?
        .map_err(|e| SessionError::Issuer(e.to_string()))
    }

    /// A session by id.
    pub async fn get(&self, id: &str) -> Result<SessionRecord, SessionError> {
        self.store
            .get_session(id)
            .await?
            .ok_or_else(|| SessionError::SessionNotFound(id.to_string()))
    }

    /// What the session's spends under assets' own caps add up to, by asset.
    pub async fn asset_spent(&self, session_id: &str) -> Result<Vec<(String, u128)>, SessionError> {
        Ok(self.store.session_asset_spent(session_id).await?)
    }

    /// One page of an account's sessions, newest first, after `after`.
    pub async fn list_page(
        &self,
        account_id: &str,
        after: Option<&SessionCursor>,
        limit: u32,
    ) -> Result<Vec<SessionRecord>, SessionError> {
        Ok(self.store.list_sessions_page(account_id, after, limit).await?)
    }

    /// Retention: deletes the sessions that ended more than
    /// [`SessionSettings::retention`] ago (never before their token expires)
    /// with their spends and challenges, and the challenges that expired that
    /// long ago unopened. Nothing without a retention. Their audit events
    /// stay.
    pub async fn prune_ended(&self) -> Result<Pruned, SessionError> {
        let Some(retention) = self.settings.retention else {
            return Ok(Pruned::default());
        };
        let now = self.clock.now();
        Ok(self
            .store
            .prune_sessions(now.saturating_sub(retention), now, PRUNE_BATCH)
            .await?)
    }

    /// The SessionRevocation document for a session.
    pub fn revocation_document(&self, s: &SessionRecord, controller: Address) -> Value {
        session_revocation(&self.settings.domain, &s.id, &s.account_id, controller)
    }

    /// Checks the controller's signature over a session's revocation document.
    pub fn check_revocation_signature(
        &self,
        s: &SessionRecord,
        controller: Address,
        signature: &[u8],
    ) -> Result<(), SessionError> {
        check_controller_signature(&self.revocation_document(s, controller), controller, signature).map(drop)
    }

    /// Revokes at once (idempotent).
    pub async fn revoke(&self, id: &str, by: &str) -> Result<SessionRecord, SessionError> {
        self.store
            .revoke_session(id, by, self.clock.now())
            .await?
            .ok_or_else(|| SessionError::SessionNotFound(id.to_string()))
    }

    /// Verifies a token, checks the caller is its delegate, and reads the
    /// session's live state: revoked or expired sessions are refused.
    pub async fn authorize(&self, token: &str, caller: &str) -> Result<(SessionRecord, Scopes), SessionError> {
        // Sized before anything decodes it: a real token is a few hundred bytes.
        if token.len() > MAX_TOKEN_BYTES {
            return Err(SessionError::Token(format!(
                "a session token is at most {MAX_TOKEN_BYTES} bytes; this one is {}",
                token.len()
            )));
        }
        let verified = self
            .issuer
            .verify(token)
            .map_err(|e| SessionError::Token(e.to_string()))?;
        if verified.header.typ.as_deref() != Some(TOKEN_TYP) {
            return Err(SessionError::Token("not a session token (typ)".into()));
        }
        let claims: SessionClaims =
            serde_json::from_value(verified.claims).map_err(|e| SessionError::Token(format!("claims: {e}")))?;
        if claims.iss != ISSUER {
            return Err(SessionError::Token("wrong issuer".into()));
        }
        let now = self.clock.now();
        if claims.iat > now.saturating_add(self.settings.clock_skew) {
            return Err(SessionError::Token("issued in the future".into()));
        }
        if claims.aud != caller {
            return Err(SessionError::NotDelegate);
        }
        let session = self.get(&claims.sid).await?;
        // The token must be the one issued for this session, unaltered.
        if session.jti != claims.jti
            || session.account_id != claims.sub
            || session.delegate != claims.aud
            || session.scopes.join(" ") != claims.scope
            || session.cap.to_string() != claims.cap
            || session.expires_at != claims.exp
        {
            return Err(SessionError::Token("claims do not match the session".into()));
        }
        if session.revoked_at.is_some() {
            return Err(SessionError::Revoked(session.id));
        }
        if now >= session.expires_at {
            return Err(SessionError::Expired(session.id));
        }
        let scopes = Scopes::parse(&session.scopes).map_err(|_| SessionError::Internal("stored scopes"))?;
        Ok((session, scopes))
    }

    /// Reserves `part` against the session's cap (or, when it names one,
    /// against its asset's own cap), and `fee` with it when given, and
    /// records the request, atomically; or returns the stored result of the
    /// identical request.
    /// Inside a request the request's audit event is appended in the
    /// reserving transaction, before anything is signed: `digest` gives the
    /// hex digest of what will be signed from the spend's nonce, the
    /// signature reference is `spend:<session>/<request id>`.
    pub async fn begin_spend(
        &self,
        session: &SessionRecord,
        request_id: &str,
        body_hash: [u8; 32],
        part: SpendPart<'_>,
        fee: Option<SpendPart<'_>>,
        digest: &(dyn Fn(u64) -> String + Send + Sync),
    ) -> Result<Spend, SessionError> {
        if request_id.len() > 128 || request_id.chars().any(char::is_control) {
            return Err(invalid("request_id", "at most 128 printable characters"));
        }
        let request_id = if request_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            request_id.to_string()
        };
        let event = crate::audit::context::in_transaction(
            String::new(),
            crate::audit::event::spend_ref(&session.id, &request_id),
        )
        .map(|mut e| {
            e.account.clone_from(&session.account_id);
            e.session.clone_from(&session.id);
            e.request_id.clone_from(&request_id);
            e
        });
        let build = |nonce: u64| {
            let mut e = event.clone().unwrap_or_default();
            e.digest = digest(nonce);
            e
        };
        // A retry that finds its first attempt still running (its client
        // gave up, its task did not) waits for that attempt's answer a
        // little, and returns it, rather than refusing at once.
        let waited = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(5);
        let (outcome, seq) = loop {
            let (outcome, seq) = self
                .store
                .reserve_spend_audited(
                    &SpendRequest {
                        session_id: &session.id,
                        request_id: &request_id,
                        body_hash,
                        amount: part.amount,
                        asset_cap: part.asset_cap,
                        fee,
                        now: self.clock.now(),
                    },
                    event.as_ref().map(|_| &build as SpendEvent<'_>),
                )
                .await?;
            if outcome != SpendOutcome::InProgress || waited.elapsed() >= IN_PROGRESS_WAIT {
                break (outcome, seq);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(100));
        };
        if let Some(seq) = seq {
            crate::audit::context::mark_recorded(seq);
        }
        match outcome {
            SpendOutcome::Reserved { remaining, nonce } => Ok(Spend::Reserved(SpendResult {
                request_id,
                remaining,
                nonce,
            })),
            SpendOutcome::Replay { response } => Ok(Spend::Replay(response)),
            SpendOutcome::InProgress => Err(SessionError::InProgress),
            SpendOutcome::BodyMismatch => Err(SessionError::IdempotencyMismatch),
            SpendOutcome::Insufficient {
                remaining,
                asset,
                requested,
            } => Err(SessionError::CapExhausted {
                asset,
                remaining,
                requested,
            }),
            SpendOutcome::Revoked => Err(SessionError::Revoked(session.id.clone())),
            SpendOutcome::Expired => Err(SessionError::Expired(session.id.clone())),
            SpendOutcome::NotFound => Err(SessionError::SessionNotFound(session.id.clone())),
        }
    }

    /// Records the response of a reserved request (its audit event was
    /// appended with the reservation). [`SessionError::Released`] when the
    /// recovery sweep gave the reservation back first: the caller must then
    /// withhold what it signed.
    pub async fn complete_spend(
        &self,
        session_id: &str,
        request_id: &str,
        response: &[u8],
    ) -> Result<(), SessionError> {
        if self.store.complete_spend(session_id, request_id, response).await? {
            Ok(())
        } else {
            Err(SessionError::Released)
        }
    }

    /// Gives a reservation back after signing failed, appending the
    /// compensating audit `event` in the same transaction; its seq if one
    /// was appended.
    pub async fn release_spend(
        &self,
        session_id: &str,
        request_id: &str,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<Option<u64>, SessionError> {
        Ok(self.store.release_spend_audited(session_id, request_id, event).await?)
    }

    /// Releases every spend still pending [`SessionSettings::pending_spend_timeout`]
    /// seconds after its reservation, each with its compensating
    /// `ReleaseSpend` event (identity `keyward`, code `DEADLINE_EXCEEDED`,
    /// rule `recovery:pending-spend-timeout`) in the releasing transaction.
    /// A request's own task completes or releases its spend whatever its
    /// client does; what is left pending here is what a crash, or a store
    /// that failed at completion, left behind. Returns how many were released.
    pub async fn sweep_pending(&self) -> Result<usize, SessionError> {
        let before = self.clock.now().saturating_sub(self.settings.pending_spend_timeout);
        let mut released = 0;
        loop {
            let stale = self.store.stale_spends(before, 256).await?;
            let page = stale.len();
            for p in stale {
                let mut e = crate::audit::event::daemon_event(
                    crate::audit::event::RELEASE_SPEND,
                    crate::audit::event::spend_ref(&p.session_id, &p.request_id),
                );
                e.decision = crate::audit::Decision::Error.as_str().into();
                e.code = "DEADLINE_EXCEEDED".into();
                e.policies = vec![RECOVERY_RULE.into()];
                e.account = p.account_id;
                e.session.clone_from(&p.session_id);
                e.request_id.clone_from(&p.request_id);
                if self
                    .store
                    .release_spend_audited(&p.session_id, &p.request_id, Some(&e))
                    .await?
                    .is_some()
                {
                    released += 1;
                }
            }
            if page < 256 {
                if released > 0 {
                    // Which ones: their ReleaseSpend events in the audit log.
                    tracing::warn!(released, "released spends left pending past the recovery bound");
                }
                return Ok(released);
            }
        }
    }

    /// Runs [`Sessions::sweep_pending`] every `every`, and
    /// [`Sessions::prune_ended`] every [`PRUNE_EVERY`] (first at start),
    /// until `stop` turns true.
    pub async fn sweep(self: Arc<Self>, every: std::time::Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pruned_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.sweep_pending().await {
                tracing::debug!(error = %e, "pending spends could not be swept; will retry");
            }
            if pruned_at.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
                pruned_at = Some(tokio::time::Instant::now());
                match self.prune_ended().await {
                    Ok(p) if p == Pruned::default() => {}
                    Ok(p) => tracing::info!(
                        sessions = p.sessions,
                        challenges = p.challenges,
                        "ended sessions and stale challenges pruned"
                    ),
                    Err(e) => tracing::warn!(error = %e, "ended sessions could not be pruned; will retry"),
                }
            }
        }
    }

    /// The settings the service runs with.
    pub fn settings(&self) -> &SessionSettings {
        &self.settings
    }

    /// The EIP-712 domain sessions use.
    pub fn domain(&self) -> &Domain {
        &self.settings.domain
    }
}

impl Sessions {
    /// The account a challenge is for (to authorize before opening).
    pub async fn challenge_account(&self, challenge_id: &str) -> Result<String, SessionError> {
        self.store
            .get_challenge(challenge_id)
            .await?
            .map(|(c, _)| c.account_id)
            .ok_or_else(|| SessionError::ChallengeNotFound(challenge_id.to_string()))
    }
}
