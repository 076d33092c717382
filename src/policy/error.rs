//! Why a policy set could not be loaded, or why a request was refused.

use std::path::PathBuf;

use super::Decision;

/// A policy failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The request was refused by a policy (or by default).
    #[error("permission denied: {identity} may not {action}: {}", denial_reason(.decision))]
    Denied {
        /// The caller.
        identity: String,
        /// The action.
        action: &'static str,
        /// The decision, to record.
        decision: Box<Decision>,
    },
    /// A limit refused the request.
    #[error("limit {limit} reached: {identity} may not {action} now ({detail})")]
    Limited {
        /// The caller.
        identity: String,
        /// The action.
        action: &'static str,
        /// The limit's name.
        limit: String,
        /// What was exceeded.
        detail: String,
        /// The decision, to record.
        decision: Box<Decision>,
    },
    /// A file of the set could not be read.
    #[error("policy set {path}: {source}")]
    Read {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file does not parse or does not validate.
    #[error("policy set {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, with positions where Cedar gives them.
        reason: String,
    },
    /// A request could not be put to Cedar (a bug: the daemon builds requests).
    #[error("policy request: {0}")]
    Request(String),
    /// The store holding limit counters failed.
    #[error("limit counters: {0}")]
    Store(#[from] crate::store::StoreError),
}

fn denial_reason(d: &Decision) -> String {
    if d.policy_ids.is_empty() {
        "no policy permits it (deny by default)".to_string()
    } else {
        format!("forbidden by policy {}", d.policy_ids.join(", "))
    }
}

impl PolicyError {
    /// The decision a refusal carries, for the audit record.
    pub fn decision(&self) -> Option<&Decision> {
        match self {
            PolicyError::Denied { decision, .. } | PolicyError::Limited { decision, .. } => Some(decision),
            _ => None,
        }
    }
}
