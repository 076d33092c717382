//! Decisions kept by everything Cedar sees of a request.
//!
//! [`super::decide`] is a pure function of the loaded set and of what the
//! request puts before Cedar: the principal (its entities are the set's), the
//! action, the resource's entity, and the context fields the action's
//! policies read (the same [`Reads`] that build the context). The key below
//! is those inputs, each written out in full and length-prefixed, so two
//! requests share a key only if Cedar would be given the same request: a
//! kept decision is the one deciding again would give. Nothing is hashed
//! into the key, so no collision can hand one request another's decision.
//!
//! Not kept: decisions on accounts without keys (ids nobody created, deleted
//! accounts: made-up ids must not push real decisions out), decisions whose
//! policies read `context.time.now` (a new key every second), and decisions
//! during which a policy failed to evaluate (its warning is logged each
//! time). The map is per set (a reload starts empty) and is emptied when full.

use std::collections::HashMap;
use std::sync::Mutex;

use super::context::{context_field, context_top, Field, Reads, RECORDS, TOP};
use super::request::{PolicyRequest, Resource};
use super::Decision;
use crate::store::AccountRecord;

/// Decisions kept per set.
pub(super) const KEPT_DECISIONS: usize = 8192;

/// The kept decisions of one set.
#[derive(Debug, Default)]
pub(super) struct KeptDecisions {
    map: Mutex<HashMap<Vec<u8>, Decision>>,
    #[cfg(test)]
    pub(super) hits: std::sync::atomic::AtomicUsize,
}

impl KeptDecisions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Decision>> {
        // Every update is one insert or clear: a panic elsewhere cannot leave it half done.
        self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The decision kept under `key`.
    pub(super) fn get(&self, key: &[u8]) -> Option<Decision> {
        let found = self.lock().get(key).cloned();
        #[cfg(test)]
        if found.is_some() {
            self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        found
    }

    /// Keeps `decision` under `key`; a full map is emptied first.
    pub(super) fn insert(&self, key: Vec<u8>, decision: &Decision) {
        let mut map = self.lock();
        if map.len() >= KEPT_DECISIONS && !map.contains_key(&key) {
            map.clear();
        }
        map.insert(key, decision.clone());
    }

    /// How many decisions are kept.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Writes values so that distinct sequences give distinct bytes: every
/// variable-length value is preceded by its length, every value by a tag.
struct KeyWriter(Vec<u8>);

impl KeyWriter {
    fn len(&mut self, n: usize) {
        // A usize always fits in a u64 on the targets keyward builds for.
        self.0
            .extend_from_slice(&u64::try_from(n).unwrap_or(u64::MAX).to_le_bytes());
    }

    fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.0.extend_from_slice(b);
    }

    fn str(&mut self, s: &str) {
        self.0.push(b's');
        self.bytes(s.as_bytes());
    }

    fn strs(&mut self, v: &[String]) {
        self.0.push(b'v');
        self.len(v.len());
        for s in v {
            self.bytes(s.as_bytes());
        }
    }

    fn long(&mut self, v: i64) {
        self.0.push(b'l');
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn field(&mut self, f: Field<'_>) {
        match f {
            Field::Bool(b) => {
                self.0.push(b'b');
                self.0.push(u8::from(b));
            }
            Field::Long(v) => self.long(v),
            Field::Str(s) => self.str(&s),
            Field::Set(v) => self.strs(v),
        }
    }

    /// What an account entity is built from.
    fn account(&mut self, a: &AccountRecord) {
        self.str(&a.id);
        match &a.label {
            Some(l) => self.str(l),
            None => self.0.push(b'n'),
        }
        self.str(&a.controller);
        self.str(&a.created_by);
        self.strs(&a.allowed);
    }
}

/// The key of `req` for an action whose policies read `reads`; `None`: not
/// to be kept (see the module's notes).
pub(super) fn key(req: &PolicyRequest<'_>, reads: &Reads) -> Option<Vec<u8>> {
    if reads.wants_field("time", "now") {
        return None;
    }
    let mut k = KeyWriter(Vec::with_capacity(256));
    k.str(req.action.name());
    k.str(req.principal);
    match req.resource {
        Resource::Service => k.0.push(b'S'),
        Resource::Account(a) => {
            if a.keys.is_empty() {
                return None;
            }
            k.0.push(b'A');
            k.account(a);
        }
        Resource::Session(s, a) => {
            if a.keys.is_empty() {
                return None;
            }
            k.0.push(b'E');
            k.str(&s.id);
            k.str(&s.delegate);
            k.strs(&s.scopes);
            k.long(s.expires_at);
            k.account(a);
        }
    }
    // Exactly the fields `context::context` builds, in its order.
    for (record, fields) in RECORDS {
        if !reads.wants(record) {
            continue;
        }
        k.0.push(b'r');
        for name in fields.iter().filter(|f| reads.wants_field(record, f)) {
            k.field(context_field(&req.context, record, name)?);
        }
    }
    for name in TOP.iter().filter(|t| reads.wants(t)) {
        k.0.push(b't');
        k.field(context_top(&req.context, name)?);
    }
    Some(k.0)
}
