//! Delegated sessions: EIP-712 challenges a controller wallet signs, scoped
//! short-lived session tokens, exact spend reservation and idempotency.
//!
//! Never trusts a token alone: every use re-reads the session's state from
//! the store, so revocation takes effect at once.

mod error;
mod scope;
mod service;
mod token;
pub mod transfer;
mod typed;

pub use error::SessionError;
pub use scope::{Asset, Scope, ScopeDenied, ScopeError, Scopes, MAX_SCOPES, SCOPE_GRAMMAR};
pub use service::{
    check_controller_signature, parse_amount, ChallengeRequest, SessionSettings, Sessions, Spend, SpendResult,
    MAX_TOKEN_BYTES, RECOVERY_RULE,
};
pub use token::{SessionClaims, TOKEN_TYP};
pub use typed::{
    controller_change, controller_change_cancellation, payment, session_grant, session_revocation, Domain, Grant,
    Payment, DOMAIN_NAME, DOMAIN_VERSION,
};
