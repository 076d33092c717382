//! Key-encryption keys: AES-256 token objects labelled `<prefix>-v<N>`, CKA_ID `b"kek" ‖ N (BE u32)`.
//! Looked up with C_FindObjects only at open / ensure / rotate time (and after a pool
//! re-initialisation, when handles change); the handles are cached.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

use cryptoki::error::Error as CkError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::error::{breakage, map_err, Breakage, HsmError};
use super::Hsm;

#[derive(Debug, Default)]
pub(crate) struct KekCache {
    current: u32,
    handles: BTreeMap<u32, ObjectHandle>,
    /// Pool epoch the handles belong to (0: not loaded).
    epoch: u64,
    /// Every version seen on the token by this process: one that disappears means the token
    /// (or its storage) is in trouble, not that the version never existed.
    seen: std::collections::BTreeSet<u32>,
}

/// A KEK handle valid in pool epoch `epoch`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kek {
    pub(crate) version: u32,
    pub(crate) handle: ObjectHandle,
    pub(crate) epoch: u64,
}

pub(crate) fn kek_id(version: u32) -> Vec<u8> {
    let mut id = b"kek".to_vec();
    id.extend_from_slice(&version.to_be_bytes());
    id
}

pub(crate) fn kek_label(prefix: &str, version: u32) -> String {
    format!("{prefix}-v{version}")
}

fn find_keks(s: &Session, prefix: &str) -> Result<BTreeMap<u32, ObjectHandle>, CkError> {
    let handles = s.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
    ])?;
    let mut out = BTreeMap::new();
    let want = format!("{prefix}-v");
    for h in handles {
        let attrs = s.get_attributes(h, &[AttributeType::Label, AttributeType::Id])?;
        let mut label = None;
        let mut id = None;
        for a in attrs {
            match a {
                Attribute::Label(l) => label = Some(l),
                Attribute::Id(i) => id = Some(i),
                _ => {}
            }
        }
        let (Some(label), Some(id)) = (label, id) else {
            continue;
        };
        let Ok(label) = String::from_utf8(label) else {
            continue;
        };
        let Some(v) = label.strip_prefix(&want).and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if v == 0 || id != kek_id(v) {
            tracing::warn!(label = %label, "object with a KEK label but a foreign CKA_ID; ignored");
            continue;
        }
        if out.insert(v, h).is_some() {
            tracing::warn!(version = v, "two KEK objects with the same version; using one");
        }
    }
    Ok(out)
}

fn create_kek(s: &Session, prefix: &str, version: u32) -> Result<ObjectHandle, CkError> {
    let label = kek_label(prefix, version);
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32u64.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Label(label.into_bytes()),
        Attribute::Id(kek_id(version)),
    ];
    s.generate_key(&Mechanism::AesKeyGen, &template)
}

enum Want {
    Load,
    Ensure,
    Rotate,
}

impl Hsm {
    fn kek_lock(&self) -> MutexGuard<'_, KekCache> {
        self.inner.kek.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Find KEKs on the token (and create one if asked), refreshing the cache.
    /// Lock order: KEK cache, then a pool session (never the other way round).
    fn refresh_keks(&self, cache: &mut KekCache, want: Want) -> Result<u32, HsmError> {
        let pool = &self.inner.pool;
        let prefix = self.inner.kek_prefix.as_str();
        let label = pool.label.clone();
        let op = match want {
            Want::Load => "load_kek",
            Want::Ensure => "ensure_kek",
            Want::Rotate => "rotate_kek",
        };
        let (found, epoch) = pool.with_session(op, |p| {
            let fail = |e: CkError| (Err(map_err(op, &e, &label)), breakage(&e));
            let mut found = match find_keks(&p.session, prefix) {
                Ok(f) => f,
                Err(e) => return fail(e),
            };
            let highest = found.keys().next_back().copied().unwrap_or(0);
            let create = match want {
                Want::Load => None,
                Want::Ensure if highest == 0 => Some(1),
                Want::Ensure => None,
                Want::Rotate => match highest.checked_add(1) {
                    Some(v) => Some(v),
                    None => {
                        let e = HsmError::Unsupported {
                            what: "KEK version overflow".to_string(),
                        };
                        return (Err(e), Breakage::None);
                    }
                },
            };
            if let Some(v) = create {
                match create_kek(&p.session, prefix, v) {
                    Ok(h) => {
                        tracing::info!(version = v, "created key-encryption key");
                        found.insert(v, h);
                    }
                    Err(e) => return fail(e),
                }
            }
            (Ok((found, p.epoch)), Breakage::None)
        })?;
        if let Some(v) = cache.seen.iter().find(|v| !found.contains_key(v)) {
            tracing::error!(version = *v, "key-encryption key vanished from the token");
            self.inner.kek_dirty.store(true, Ordering::SeqCst);
            // The token's storage changed under SoftHSM (or the device lost state): start over.
            self.inner.pool.request_reinit();
            return Err(HsmError::Unavailable {
                op,
                rv: format!("KEK v{v} no longer on the token (CKR_OBJECT_HANDLE_INVALID)"),
            });
        }
        cache.seen.extend(found.keys().copied());
        cache.current = found.keys().next_back().copied().unwrap_or(0);
        cache.handles = found;
        cache.epoch = epoch;
        self.inner.kek_dirty.store(false, Ordering::SeqCst);
        Ok(cache.current)
    }

    pub(crate) fn load_keks(&self) -> Result<u32, HsmError> {
        let mut cache = self.kek_lock();
        self.refresh_keks(&mut cache, Want::Load)
    }

    /// Make sure a KEK exists: finds the highest version on the token, creates v1 if there is
    /// none, and returns the current version.
    pub fn ensure_kek(&self) -> Result<u32, HsmError> {
        let mut cache = self.kek_lock();
        self.refresh_keks(&mut cache, Want::Ensure)
    }

    /// Create KEK v(N+1) and make it current; older versions stay for unwrapping.
    pub fn rotate_kek(&self) -> Result<u32, HsmError> {
        let mut cache = self.kek_lock();
        self.refresh_keks(&mut cache, Want::Rotate)
    }

    /// The current KEK version (0 if the token has none yet).
    pub fn kek_version(&self) -> u32 {
        self.kek_lock().current
    }

    /// The handle of KEK `version` (or the current one), reloading the cache if the pool was
    /// re-initialised or a KEK handle was reported invalid.
    pub(crate) fn kek(&self, version: Option<u32>) -> Result<Kek, HsmError> {
        let mut cache = self.kek_lock();
        let stale = cache.epoch != self.inner.pool.epoch() || self.inner.kek_dirty.load(Ordering::SeqCst);
        if stale {
            self.refresh_keks(&mut cache, Want::Load)?;
        }
        let version = version.unwrap_or(cache.current);
        match cache.handles.get(&version) {
            Some(h) if version != 0 => Ok(Kek {
                version,
                handle: *h,
                epoch: cache.epoch,
            }),
            _ => Err(HsmError::KekMissing { version }),
        }
    }

    /// Run `f`; if it failed because a KEK handle went bad (token logged out behind our back,
    /// storage reloaded), reload the KEK cache and run it once more.
    pub(crate) fn retry_on_kek<T>(&self, mut f: impl FnMut() -> Result<T, HsmError>) -> Result<T, HsmError> {
        match f() {
            Err(HsmError::Unavailable { op, rv }) if self.inner.kek_dirty.load(Ordering::SeqCst) => {
                tracing::warn!(op, rv = %rv, "KEK handle failed; reloading KEKs and retrying once");
                f()
            }
            other => other,
        }
    }

    /// Note that a KEK handle failed: reload before the next use.
    pub(crate) fn kek_failed(&self) {
        self.inner.kek_dirty.store(true, Ordering::SeqCst);
    }
}
