//! A bounded cache of unwrapped account keys. Eviction drops the entry, which
//! destroys its HSM session object (or zeroizes its host key) once the last
//! request using it finishes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use super::AccountKeys;

/// Unwrapped keys by account id, first-in first-out beyond `capacity`.
#[derive(Debug)]
pub struct KeyCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<String, Arc<AccountKeys>>,
    order: VecDeque<String>,
    /// Bumped by every [`KeyCache::remove`] and [`KeyCache::clear`]: a load that began before
    /// a removal may carry the record as it was before the change that caused it.
    removals: u64,
}

impl KeyCache {
    /// An empty cache holding at most `capacity` accounts.
    pub fn new(capacity: usize) -> KeyCache {
        KeyCache {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every update is a single insert/remove), so recover the guard.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached keys of an account.
    pub fn get(&self, id: &str) -> Option<Arc<AccountKeys>> {
        self.lock().map.get(id).cloned()
    }

    /// A mark to take before reading an account from the store, for [`KeyCache::insert_since`].
    pub fn mark(&self) -> u64 {
        self.lock().removals
    }

    /// Caches keys, evicting the oldest beyond capacity. If another request
    /// cached the same account first, that entry wins and is returned.
    pub fn insert(&self, keys: Arc<AccountKeys>) -> Arc<AccountKeys> {
        self.insert_since(keys, None)
    }

    /// As [`KeyCache::insert`], but caches nothing if an entry was removed since `mark` (the
    /// keys were read from the store before a change that removal stands for: they serve the
    /// request that loaded them, and the next request reads the store again).
    pub fn insert_since(&self, keys: Arc<AccountKeys>, mark: Option<u64>) -> Arc<AccountKeys> {
        let evicted;
        let result;
        {
            let mut inner = self.lock();
            if mark.is_some_and(|m| m != inner.removals) {
                return keys;
            }
            let id = keys.record().id.clone();
            if let Some(existing) = inner.map.get(&id) {
                return existing.clone();
            }
            inner.map.insert(id.clone(), keys.clone());
            inner.order.push_back(id);
            let mut out = Vec::new();
            while inner.map.len() > self.capacity {
                match inner.order.pop_front() {
                    Some(old) => {
                        if let Some(v) = inner.map.remove(&old) {
                            out.push(v);
                        }
                    }
                    None => break,
                }
            }
            evicted = out;
            result = keys;
        }
        // Destroy evicted keys outside the lock (may call the HSM).
        drop(evicted);
        result
    }

    /// Forgets one account's keys.
    pub fn remove(&self, id: &str) {
        let removed = {
            let mut inner = self.lock();
            inner.removals = inner.removals.wrapping_add(1);
            inner.order.retain(|k| k != id);
            inner.map.remove(id)
        };
        drop(removed);
    }

    /// Forgets everything.
    pub fn clear(&self) {
        let drained: Vec<_> = {
            let mut inner = self.lock();
            inner.removals = inner.removals.wrapping_add(1);
            inner.order.clear();
            inner.map.drain().map(|(_, v)| v).collect()
        };
        drop(drained);
    }

    /// Number of cached accounts.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
