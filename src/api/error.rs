//! The one place that picks gRPC status codes.
//!
//! | error | status |
//! |---|---|
//! | no client identity | UNAUTHENTICATED |
//! | malformed field | INVALID_ARGUMENT (names the field) |
//! | a policy refuses (names the policy ids, or deny by default), wrong wallet signer, not the delegate, outside scopes | PERMISSION_DENIED |
//! | a policy refuses a caller who may not read the account or session: the refusal a missing one gets (see `access.rs`) | PERMISSION_DENIED |
//! | a limit refuses (names the limit) | RESOURCE_EXHAUSTED |
//! | policy set or limit counters unusable | INTERNAL / the store's status |
//! | session token does not verify or was altered | UNAUTHENTICATED |
//! | challenge used or expired, session revoked or expired | FAILED_PRECONDITION |
//! | session cap exhausted | RESOURCE_EXHAUSTED |
//! | same request_id still in progress | ABORTED |
//! | unknown account, session or challenge, to a caller the policies allow on any | NOT_FOUND |
//! | account already exists | ALREADY_EXISTS |
//! | stored key does not match its account | DATA_LOSS |
//! | HSM or store down, token missing or locked, stale handle | UNAVAILABLE |
//! | blob wrapped under a KEK the token lacks | FAILED_PRECONDITION |
//! | audit log not writable (the response is withheld) | UNAVAILABLE |
//! | audit RPC by a non-admin | PERMISSION_DENIED |
//! | anything else | INTERNAL |
//!
//! INTERNAL, UNAVAILABLE and DATA_LOSS answers caused by the store, the HSM,
//! the audit log or a bug carry a generic message and a reference; the
//! detail (HSM return values, store messages, paths) goes to the log line
//! with the same reference, never to the caller.

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
    /// A refusal answered as the same request on a missing resource is
    /// answered: the caller may not know the resource exists.
    #[error("{shown}")]
    Concealed {
        /// What the caller is told.
        shown: crate::policy::PolicyError,
        /// What decided, for the audit event and the log line.
        decision: Box<crate::policy::Decision>,
    },
}

impl ApiError {
    /// The policy decision a refusal carries, for the audit record.
    pub fn decision(&self) -> Option<&crate::policy::Decision> {
        match self {
            ApiError::Policy(p) => p.decision(),
            ApiError::Concealed { decision, .. } => Some(decision),
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

/// A failure whose detail (HSM return values, store messages, file paths,
/// SQL) is for operators, not callers: the caller gets `what` and a
/// reference; the log line with the same reference has the detail.
fn opaque(code: tonic::Code, what: &str, detail: &str) -> Status {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let reference = id.get(..12).unwrap_or(&id);
    tracing::warn!(
        reference,
        code = crate::metrics::code_name(code),
        error = detail,
        "{what}"
    );
    Status::new(
        code,
        format!("{what} (reference {reference}; the daemon's log has the details)"),
    )
}

fn store_status(e: &StoreError, msg: String) -> Status {
    match e {
        StoreError::Unavailable { .. } => opaque(tonic::Code::Unavailable, "store unavailable", &msg),
        StoreError::Conflict { .. } => Status::already_exists(msg),
        StoreError::Corrupt { .. } => opaque(tonic::Code::DataLoss, "a stored record does not decode", &msg),
        _ => opaque(tonic::Code::Internal, "store error", &msg),
    }
}

fn hsm_status(e: &HsmError, msg: String) -> Status {
    match e {
        HsmError::KekMissing { .. } | HsmError::CustodyRefused { .. } | HsmError::TransportKeyNotFound { .. } => {
            Status::failed_precondition(msg)
        }
        HsmError::ImportRefused { .. } => Status::invalid_argument(msg),
        HsmError::KeyMismatch { .. } => Status::data_loss(msg),
        HsmError::Internal { .. } | HsmError::Unsupported { .. } => opaque(tonic::Code::Internal, "HSM error", &msg),
        _ => opaque(tonic::Code::Unavailable, "HSM unavailable", &msg),
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
            ApiError::Concealed { .. } => Status::permission_denied(msg),
            ApiError::Invalid { .. } => Status::invalid_argument(msg),
            ApiError::Policy(p) => match p {
                crate::policy::PolicyError::Denied { .. } => Status::permission_denied(msg),
                crate::policy::PolicyError::Limited { .. } => Status::resource_exhausted(msg),
                crate::policy::PolicyError::Store(s) => store_status(s, msg),
                _ => opaque(tonic::Code::Internal, "policy decision failed", &msg),
            },
            ApiError::Key(k) => match k {
                KeyError::AccountNotFound(_) => Status::not_found(msg),
                KeyError::Frozen { .. } => Status::failed_precondition(msg),
                KeyError::Deleted { .. } => Status::not_found(msg),
                KeyError::Conflict(_) => Status::failed_precondition(msg),
                KeyError::NoPendingChange(_) => Status::not_found(msg),
                KeyError::Binding { .. } | KeyError::MissingKey { .. } => Status::data_loss(msg),
                KeyError::Hsm(h) => hsm_status(h, msg),
                KeyError::Store(s) => store_status(s, msg),
                KeyError::Signature(_) => Status::data_loss(msg),
                _ => opaque(tonic::Code::Internal, "internal error", &msg),
            },
            ApiError::Session(e) => match e {
                SessionError::Invalid { .. } | SessionError::IdempotencyMismatch => Status::invalid_argument(msg),
                SessionError::ChallengeNotFound(_)
                | SessionError::SessionNotFound(_)
                | SessionError::PaymentNotFound(_) => Status::not_found(msg),
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
                SessionError::InProgress | SessionError::Released | SessionError::PaymentPending(_) => {
                    Status::aborted(msg)
                }
                SessionError::Store(s) => store_status(s, msg),
                SessionError::Issuer(_) => opaque(tonic::Code::Unavailable, "issuer key unavailable", &msg),
                _ => opaque(tonic::Code::Internal, "internal error", &msg),
            },
            ApiError::Internal(_) => opaque(tonic::Code::Internal, "internal error", &msg),
            ApiError::Jwks(e) => crate::jwks::status(e, msg),
            ApiError::Audit(e) => match e {
                AuditError::Store(s) => store_status(s, msg),
                AuditError::Invalid(_) => Status::invalid_argument(msg),
                AuditError::Unavailable(_) | AuditError::Stopped | AuditError::Sign(_) => {
                    opaque(tonic::Code::Unavailable, "audit log unavailable", &msg)
                }
                _ => opaque(tonic::Code::Internal, "audit log error", &msg),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_and_hsm_detail_stay_in_the_log() {
        let e = ApiError::Key(KeyError::Store(StoreError::Unavailable {
            backend: "sqlite",
            reason: "unable to open /var/lib/keyward/keyward.db: disk I/O error".into(),
        }));
        let s = e.status();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(
            s.message().starts_with("store unavailable (reference "),
            "{}",
            s.message()
        );
        assert!(!s.message().contains("/var/lib"), "{}", s.message());
        let e = ApiError::Internal("stored response does not decode");
        assert!(!e.status().message().contains("decode"));
        // Refusals keep their precise, caller-facing text.
        let e = ApiError::invalid("typed_data_json.message", "expected an object");
        assert!(e.status().message().contains("typed_data_json.message"));
    }
}
