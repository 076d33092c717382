//! The one place that picks gRPC status codes.
//!
//! | error | status |
//! |---|---|
//! | no client identity | UNAUTHENTICATED |
//! | malformed field | INVALID_ARGUMENT (names the field) |
//! | a policy refuses (names the policy ids, or deny by default), wrong wallet signer, not the delegate, outside scopes | PERMISSION_DENIED |
//! | a limit refuses (names the limit) | RESOURCE_EXHAUSTED |
//! | policy set or limit counters unusable | INTERNAL / the store's status |
//! | session token does not verify or was altered | UNAUTHENTICATED |
//! | challenge used or expired, session revoked or expired | FAILED_PRECONDITION |
//! | session cap exhausted | RESOURCE_EXHAUSTED |
//! | same request_id still in progress | ABORTED |
//! | unknown account | NOT_FOUND |
//! | account already exists | ALREADY_EXISTS |
//! | stored key does not match its account | DATA_LOSS |
//! | HSM or store down, token missing or locked, stale handle | UNAVAILABLE |
//! | blob wrapped under a KEK the token lacks | FAILED_PRECONDITION |
//! | audit log not writable (the response is withheld) | UNAVAILABLE |
//! | audit RPC by a non-admin | PERMISSION_DENIED |
//! | anything else | INTERNAL |

use tonic::Status;

use crate::audit::AuditError;
use crate::hsm::HsmError;
use crate::keys::KeyError;
use crate::session::SessionError;
use crate::store::StoreError;

/// Why an RPC failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The connection carried no client identity.
    #[error("no client identity on this connection")]
    Unauthenticated,
    /// A request field is malformed.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field path.
        field: String,
        /// Why.
        reason: String,
    },
    /// The decision point refused (or could not decide).
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// The key layer failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A session refused or failed.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// A bug.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// The audit log refused or failed.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// The issuer key lifecycle refused or failed.
    #[error(transparent)]
    Jwks(#[from] crate::jwks::JwksError),
}

impl ApiError {
    /// The policy decision a refusal carries, for the audit record.
    pub fn decision(&self) -> Option<&crate::policy::Decision> {
        match self {
            ApiError::Policy(p) => p.decision(),
            _ => None,
        }
    }

    /// A malformed field.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ApiError {
        ApiError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

fn store_status(e: &StoreError, msg: String) -> Status {
    match e {
        StoreError::Unavailable { .. } => Status::unavailable(msg),
        StoreError::Conflict { .. } => Status::already_exists(msg),
        StoreError::Corrupt { .. } => Status::data_loss(msg),
        _ => Status::internal(msg),
    }
}

fn hsm_status(e: &HsmError, msg: String) -> Status {
    match e {
        HsmError::KekMissing { .. } => Status::failed_precondition(msg),
        HsmError::KeyMismatch { .. } => Status::data_loss(msg),
        HsmError::Internal { .. } | HsmError::Unsupported { .. } => Status::internal(msg),
        _ => Status::unavailable(msg),
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        e.status()
    }
}

impl ApiError {
    /// The status this error is answered with (see the table above).
    pub fn status(&self) -> Status {
        let msg = self.to_string();
        match self {
            ApiError::Unauthenticated => Status::unauthenticated(msg),
            ApiError::Invalid { .. } => Status::invalid_argument(msg),
            ApiError::Policy(p) => match p {
                crate::policy::PolicyError::Denied { .. } => Status::permission_denied(msg),
                crate::policy::PolicyError::Limited { .. } => Status::resource_exhausted(msg),
                crate::policy::PolicyError::Store(s) => store_status(s, msg),
                _ => Status::internal(msg),
            },
            ApiError::Key(k) => match k {
                KeyError::AccountNotFound(_) => Status::not_found(msg),
                KeyError::Binding { .. } | KeyError::MissingKey { .. } => Status::data_loss(msg),
                KeyError::Hsm(h) => hsm_status(h, msg),
                KeyError::Store(s) => store_status(s, msg),
                KeyError::Signature(_) => Status::data_loss(msg),
                _ => Status::internal(msg),
            },
            ApiError::Session(e) => match e {
                SessionError::Invalid { .. } | SessionError::IdempotencyMismatch => Status::invalid_argument(msg),
                SessionError::ChallengeNotFound(_) | SessionError::SessionNotFound(_) => Status::not_found(msg),
                SessionError::ChallengeUsed(_)
                | SessionError::ChallengeExpired(_)
                | SessionError::Revoked(_)
                | SessionError::Expired(_) => Status::failed_precondition(msg),
                SessionError::WrongSigner { .. }
                | SessionError::NotDelegate
                | SessionError::Scope(_)
                | SessionError::Forbidden(_) => Status::permission_denied(msg),
                SessionError::Token(_) => Status::unauthenticated(msg),
                SessionError::CapExhausted { .. } | SessionError::TooManyOpen(_) => Status::resource_exhausted(msg),
                SessionError::InProgress | SessionError::Released => Status::aborted(msg),
                SessionError::Store(s) => store_status(s, msg),
                SessionError::Issuer(_) => Status::unavailable(msg),
                _ => Status::internal(msg),
            },
            ApiError::Internal(_) => Status::internal(msg),
            ApiError::Jwks(e) => crate::jwks::status(e, msg),
            ApiError::Audit(e) => match e {
                AuditError::Store(s) => store_status(s, msg),
                AuditError::Invalid(_) => Status::invalid_argument(msg),
                AuditError::Unavailable(_) | AuditError::Stopped | AuditError::Sign(_) => Status::unavailable(msg),
                _ => Status::internal(msg),
            },
        }
    }
}
