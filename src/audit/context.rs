//! The per-request audit context. `Daemon::handle` opens one around every
//! handler; a handler whose state change appends its event inside the
//! store transaction takes the event from here and marks it recorded, so
//! `handle` does not append a second one.

use std::future::Future;
use std::sync::{Arc, Mutex};

use super::event::{Decision, NewEvent};

/// What `handle` knows about the request so far.
#[derive(Debug, Clone, Default)]
pub struct Pending {
    /// The event being prepared (identity, action, request facts).
    pub event: NewEvent,
    /// The sequence number of the event appended in a store transaction.
    pub recorded: Option<u64>,
}

tokio::task_local! {
    static CURRENT: Arc<Mutex<Pending>>;
}

/// Runs `f` with `pending` as the request's context; returns the context
/// as `f` left it.
pub async fn scope<F: Future>(pending: Pending, f: F) -> (F::Output, Pending) {
    let cell = Arc::new(Mutex::new(pending));
    let out = CURRENT.scope(cell.clone(), f).await;
    let pending = match cell.lock() {
        Ok(p) => p.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    (out, pending)
}

fn with<R>(f: impl FnOnce(&mut Pending) -> R) -> Option<R> {
    CURRENT
        .try_with(|c| match c.lock() {
            Ok(mut p) => Some(f(&mut p)),
            Err(_) => None,
        })
        .ok()
        .flatten()
}

/// The event to append inside a store transaction that completes the
/// request (allowed, `OK`), or `None` outside a request.
pub fn in_transaction(digest: String, signature_ref: String) -> Option<NewEvent> {
    with(|p| {
        let mut e = p.event.clone();
        e.decision = Decision::Allow.as_str().into();
        e.code = "OK".into();
        e.digest = digest;
        e.signature_ref = signature_ref;
        e
    })
}

/// An event compensating for the request's event already appended in a
/// transaction (e.g. `ReleaseSpend` when signing failed after a spend was
/// reserved): the request's facts with `action`, `decision` and `code` of
/// the failure, or `None` outside a request.
pub fn compensating(action: &str, decision: Decision, code: &str, signature_ref: String) -> Option<NewEvent> {
    with(|p| {
        let mut e = p.event.clone();
        e.action = action.into();
        e.decision = decision.as_str().into();
        e.code = code.into();
        e.digest = String::new();
        e.signature_ref = signature_ref;
        e
    })
}

/// Records what decided the request (policy ids, `limit:<name>`), for its event.
pub fn record_policies(ids: Vec<String>) {
    with(|p| p.event.policies = ids);
}

/// Records the account the request turned out to be about (a session request names its
/// account only through its token), where the request's facts named none.
pub fn record_account(id: &str) {
    with(|p| {
        if p.event.account.is_empty() {
            p.event.account = id.to_string();
        }
    });
}

/// Records that the request's event was appended in a store transaction.
pub fn mark_recorded(seq: u64) {
    with(|p| p.recorded = Some(seq));
}
