//! The decision point: every RPC asks it, allowed or denied, before anything
//! else happens. Cedar policies (validated against `policies/schema.cedarschema`)
//! decide who may do what; deny by default; a forbid overrides every permit.
//! This module never signs, never touches the HSM, and never logs payloads.
//!
//! `decide(&PolicyRequest, &Policies) -> Decision` is pure; `DecisionPoint`
//! holds the loaded set (swapped atomically on reload) and counts decisions.

mod action;
mod context;
mod defaults;
mod engine;
mod error;
mod index;
mod kept;
pub mod limits;
mod point;
mod request;
pub mod table;

pub use action::Action;
pub use defaults::{default_policies, install_defaults, DEFAULT_FILES};
pub use engine::{decide, Policies};
pub use error::PolicyError;
pub use kept::KEPT_DECISIONS;
pub use point::{DecisionPoint, SpendHold};
pub use request::{
    MessageFacts, PaymentFacts, PolicyRequest, RequestContext, Resource, SessionFacts, TransactionFacts, TypedDataFacts,
};

/// What the decision point decided, for the caller to record (allowed or denied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The action asked for (the RPC name, or `ReadAudit`).
    pub action: &'static str,
    /// Whether the request may go on.
    pub allowed: bool,
    /// The policies that decided: the permits that matched when allowed, the
    /// forbids that matched when denied (empty: no permit matched, deny by default).
    pub policy_ids: Vec<String>,
    /// The limit that refused the request, if a limit did.
    pub limit: Option<String>,
}

impl Decision {
    /// What decided, for messages and metrics: the policy ids, the limit, or `default-deny`.
    pub fn decided_by(&self) -> String {
        if let Some(l) = &self.limit {
            return format!("limit {l}");
        }
        if self.policy_ids.is_empty() {
            return "default-deny".to_string();
        }
        self.policy_ids.join(", ")
    }
}

#[cfg(test)]
mod tests;
