//! Errors of delegated sessions.

use crate::store::StoreError;

/// Why a session operation was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// A request field is malformed.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// No such challenge.
    #[error("challenge {0} not found")]
    ChallengeNotFound(String),
    /// The challenge was already opened.
    #[error("challenge {0} was already used")]
    ChallengeUsed(String),
    /// The challenge expired.
    #[error("challenge {0} has expired")]
    ChallengeExpired(String),
    /// The account has as many open sessions as the limit allows
    /// (`sessions.max_open_per_account`, checked in the opening transaction).
    #[error("{0} sessions already open for this account")]
    TooManyOpen(u64),
    /// The signature is not the controller's.
    #[error("signature is not from the account's controller {expected}")]
    WrongSigner {
        /// The controller address.
        expected: String,
    },
    /// The token does not verify or its claims are wrong.
    #[error("session token refused: {0}")]
    Token(String),
    /// The caller is not the session's delegate.
    #[error("caller is not this session's delegate")]
    NotDelegate,
    /// A scope does not cover the operation.
    #[error("outside the session's scopes: {0}")]
    Scope(#[from] super::ScopeDenied),
    /// No such session.
    #[error("session {0} not found")]
    SessionNotFound(String),
    /// The session was revoked.
    #[error("session {0} was revoked")]
    Revoked(String),
    /// The session expired.
    #[error("session {0} has expired")]
    Expired(String),
    /// The cap does not cover the amount.
    #[error(
        "{} exhausted: {remaining} left, {requested} requested",
        asset.as_ref().map_or_else(|| "session cap".to_string(), |a| format!("cap of {a}"))
    )]
    CapExhausted {
        /// The asset whose own cap it is; `None`: the session's cap.
        asset: Option<String>,
        /// Left in the cap.
        remaining: u128,
        /// Asked for.
        requested: u128,
    },
    /// The request id was used with another body.
    #[error("request_id was already used with a different request")]
    IdempotencyMismatch,
    /// The request id is being processed.
    #[error("a request with this request_id is still in progress")]
    InProgress,
    /// The reservation was released by the recovery sweep before the
    /// signature was recorded (signing outlasted the recovery bound): the
    /// signature is withheld; a retry with the same request id signs anew.
    #[error("the request's reservation was released before it completed; retry with the same request_id")]
    Released,
    /// The caller may not manage this session.
    #[error("{0}")]
    Forbidden(String),
    /// A receipt names a payment request id the session has no spend for.
    #[error("no payment with request_id {0:?} in this session")]
    PaymentNotFound(String),
    /// A receipt names a payment that has not completed (yet).
    #[error("payment {0:?} has not completed; retry once it has")]
    PaymentPending(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The issuer key failed.
    #[error("issuer: {0}")]
    Issuer(String),
    /// A bug or a panicked task.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl SessionError {
    /// The session bound this refusal comes from, as
    /// `keyward_session_refusals_total` counts it; `None` for errors that
    /// are not a session's bounds (bad input, unknown ids, store or issuer
    /// failures).
    pub fn refusal_reason(&self) -> Option<&'static str> {
        match self {
            SessionError::CapExhausted { .. } => Some("cap_exhausted"),
            SessionError::TooManyOpen(_) => Some("too_many_open"),
            SessionError::NotDelegate | SessionError::Scope(_) | SessionError::Forbidden(_) => Some("out_of_scope"),
            SessionError::Revoked(_) => Some("revoked"),
            SessionError::Expired(_) | SessionError::ChallengeExpired(_) => Some("expired"),
            SessionError::ChallengeUsed(_) => Some("challenge_used"),
            _ => None,
        }
    }
}
