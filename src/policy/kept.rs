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
//! time). The map is per set (a reload starts empty) and is emptied when full:
//! when it holds its capacity of decisions (the daemon sizes it to its key
//! cache, so every cached account's decisions fit) or `KEPT_KEY_BYTES` of
//! keys, whichever comes first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::context::{context_field, context_top, Field, Reads, RECORDS, TOP};
use super::request::{PolicyRequest, Resource};
use super::Decision;
use crate::store::AccountRecord;

/// Decisions kept per set, unless sized otherwise ([`KeptDecisions::set_capacity`]).
pub const KEPT_DECISIONS: usize = 8192;

/// Bytes of keys kept per set at most, whatever the capacity: a client that
/// varies what its policies read (a typed-data domain of up to 1 KiB, say)
/// fills the map with long keys, and this bounds what that costs.
pub(super) const KEPT_KEY_BYTES: usize = 64 << 20;

/// The kept decisions of one set.
#[derive(Debug)]
pub(super) struct KeptDecisions {
    map: Mutex<Kept>,
    capacity: AtomicUsize,
    #[cfg(test)]
    pub(super) hits: std::sync::atomic::AtomicUsize,
}

#[derive(Debug, Default)]
struct Kept {
    decisions: HashMap<Vec<u8>, Decision>,
    /// The keys' bytes.
    key_bytes: usize,
}

impl Default for KeptDecisions {
    fn default() -> Self {
        KeptDecisions {
            map: Mutex::default(),
            capacity: AtomicUsize::new(KEPT_DECISIONS),
            #[cfg(test)]
            hits: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

impl KeptDecisions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        // Every update is one insert or clear: a panic elsewhere cannot leave it half done.
        self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps up to `decisions` decisions (at least one) from now on.
    pub(super) fn set_capacity(&self, decisions: usize) {
        self.capacity.store(decisions.max(1), Ordering::Relaxed);
    }

    /// How many decisions the set keeps at most.
    pub(super) fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    /// The decision kept under `key`.
    pub(super) fn get(&self, key: &[u8]) -> Option<Decision> {
        let found = self.lock().decisions.get(key).cloned();
        #[cfg(test)]
        if found.is_some() {
            self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        found
    }

    /// Keeps `decision` under `key`; a full map is emptied first.
    pub(super) fn insert(&self, key: Vec<u8>, decision: &Decision) {
        let capacity = self.capacity();
        let mut kept = self.lock();
        if kept.decisions.contains_key(&key) {
            return;
        }
        if kept.decisions.len() >= capacity || kept.key_bytes + key.len() > KEPT_KEY_BYTES {
            kept.decisions.clear();
            kept.key_bytes = 0;
        }
        kept.key_bytes += key.len();
        kept.decisions.insert(key, decision.clone());
    }

    /// How many decisions are kept.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().decisions.len()
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
