//! Key-encryption keys: AES-256 token objects, one version sequence (CKA_ID `b"kek" ‖ N (BE u32)`)
//! and two kinds, told apart by label and checked by a probe:
//!
//! * `<prefix>-v<N>`, **sealed**: carries `CKA_UNWRAP_TEMPLATE` {CKA_TOKEN = false,
//!   CKA_SENSITIVE = true, CKA_EXTRACTABLE = false, CKA_DERIVE = false}, so every key unwrapped
//!   with it, by anyone holding the PIN, is a sensitive, non-extractable session object that
//!   cannot derive; the KEK itself is CKA_MODIFIABLE = false and CKA_COPYABLE = false, so the
//!   template cannot be removed and CKA_DECRYPT cannot be turned on (an AES-ECB decrypt oracle
//!   would open any blob). hsm custody wraps its keys under these.
//! * `<prefix>-host-v<N>`, **host**: no unwrap template (also not modifiable or copyable): for
//!   keys that are decrypted into host memory anyway: every key in host custody, and Ed25519
//!   keys in hsm custody on tokens that cannot unwrap EdDSA natively (SoftHSM 2.6.1).
//!
//! A `<prefix>-v<N>` object that fails the probe is **unenforced** (made by keyward before KEKs
//! were sealed, or a token that ignores the template): hsm custody refuses to start with one
//! unless `allow_unenforced_kek`; host custody uses it like a host KEK.
//!
//! The probe (once per KEK and process, and right after creating one): wrap a throwaway session
//! AES key under the KEK, then ask C_UnwrapKey for it as non-sensitive, extractable, deriving or
//! persistent. Each ask must fail or give an object the template forced back (sensitive, not
//! extractable, not deriving, session); a compliant unwrap must succeed; C_SetAttributeValue on
//! the KEK must fail. cryptoki 0.12 cannot read CKA_UNWRAP_TEMPLATE back (it does not know the
//! attribute type), so the probe, not a read-back, decides.
//!
//! Looked up with C_FindObjects only at open / ensure / rotate time (and after a pool
//! re-initialisation, when handles change); the handles are cached.

use std::collections::{BTreeMap, BTreeSet};
use std::os::raw::c_ulong;
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

use cryptoki::error::Error as CkError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::error::{breakage, map_err, Breakage, HsmError};
use super::generate::{destroy_quietly, session_aes_key, wrap_mechanism};
use super::Hsm;
use crate::config::Custody;

/// `CKA_UNWRAP_TEMPLATE` (`CKF_ARRAY_ATTRIBUTE | 0x212`); cryptoki 0.12 has no variant for it.
const CKA_UNWRAP_TEMPLATE: c_ulong = 0x4000_0212;

/// The values the unwrap template pins, in the order of [`template_types`]: CKA_TOKEN false,
/// CKA_SENSITIVE true, CKA_EXTRACTABLE false, CKA_DERIVE false. A `static`, so the pointers the
/// template holds stay valid for as long as the process runs.
static TEMPLATE_VALUES: [u8; 4] = [0, 1, 0, 0];

fn template_types() -> [c_ulong; 4] {
    [
        AttributeType::Token.into(),
        AttributeType::Sensitive.into(),
        AttributeType::Extractable.into(),
        AttributeType::Derive.into(),
    ]
}

// The attribute array is passed as the bytes of `CK_ATTRIBUTE { type, pValue, ulValueLen }`
// elements, which needs pointers and CK_ULONG to have the same width (true on the LP64 targets
// PKCS#11 modules are built for).
const _: () = assert!(std::mem::size_of::<usize>() == std::mem::size_of::<c_ulong>());

/// `CKA_UNWRAP_TEMPLATE` as cryptoki can pass it: the native bytes of a `CK_ATTRIBUTE` array
/// whose values point into [`TEMPLATE_VALUES`].
fn unwrap_template() -> Attribute {
    let mut bytes = Vec::with_capacity(TEMPLATE_VALUES.len() * 3 * std::mem::size_of::<c_ulong>());
    for (i, t) in template_types().into_iter().enumerate() {
        bytes.extend_from_slice(&t.to_ne_bytes());
        bytes.extend_from_slice(&(std::ptr::addr_of!(TEMPLATE_VALUES[i]) as usize).to_ne_bytes());
        let len: c_ulong = 1;
        bytes.extend_from_slice(&len.to_ne_bytes());
    }
    Attribute::VendorDefined((AttributeType::VendorDefined(CKA_UNWRAP_TEMPLATE), bytes))
}

/// What a KEK may be used for (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KekKind {
    /// `<prefix>-v<N>` whose unwrap template the token enforces (probed): hsm custody.
    Sealed,
    /// `<prefix>-v<N>` without an enforced unwrap template.
    Unenforced,
    /// `<prefix>-host-v<N>`: for keys that pass through host memory.
    Host,
}

impl KekKind {
    /// Can a key unwrapped with this KEK be read out by whoever holds the PIN?
    pub fn exposes_keys(self) -> bool {
        self != KekKind::Sealed
    }
}

/// Which KEK a new key is wrapped under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Keys that must never leave the token (hsm custody).
    Sealed,
    /// Keys that pass through host memory.
    Host,
}

/// KEKs on the token: version -> (handle, kind).
type Keks = BTreeMap<u32, (ObjectHandle, KekKind)>;

#[derive(Debug, Default)]
pub(crate) struct KekCache {
    handles: Keks,
    /// Pool epoch the handles belong to (0: not loaded).
    epoch: u64,
    /// Every version seen on the token by this process: one that disappears means the token
    /// (or its storage) is in trouble, not that the version never existed.
    seen: BTreeSet<u32>,
    /// Probe results of `<prefix>-v<N>` KEKs (an object's kind never changes).
    probed: BTreeMap<u32, KekKind>,
    /// When the list was last read from the token: it is read again after [`KEK_RELOAD`], so a
    /// KEK another process created (`keyward kek rotate`, another replica) is used for new keys
    /// within that time.
    loaded: Option<std::time::Instant>,
}

/// How long a KEK list read from the token is trusted (see [`KekCache`]).
pub const KEK_RELOAD: std::time::Duration = std::time::Duration::from_secs(10);

/// A KEK handle valid in pool epoch `epoch`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kek {
    pub(crate) version: u32,
    pub(crate) handle: ObjectHandle,
    pub(crate) kind: KekKind,
    pub(crate) epoch: u64,
}

pub(crate) fn kek_id(version: u32) -> Vec<u8> {
    let mut id = b"kek".to_vec();
    id.extend_from_slice(&version.to_be_bytes());
    id
}

/// The label of KEK `version` of a kind: `<prefix>-v<N>` or `<prefix>-host-v<N>`.
pub fn kek_label(prefix: &str, version: u32, kind: KekKind) -> String {
    match kind {
        KekKind::Host => format!("{prefix}-host-v{version}"),
        KekKind::Sealed | KekKind::Unenforced => format!("{prefix}-v{version}"),
    }
}

/// (version, host?) of a KEK label.
fn parse_label(label: &str, prefix: &str) -> Option<(u32, bool)> {
    let rest = label.strip_prefix(prefix)?.strip_prefix('-')?;
    let (host, n) = match rest.strip_prefix("host-v") {
        Some(n) => (true, n),
        None => (false, rest.strip_prefix('v')?),
    };
    if n.starts_with('0') || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse::<u32>().ok().map(|v| (v, host))
}

/// KEKs on the token: version -> (handle, host?).
fn find_keks(s: &Session, prefix: &str) -> Result<BTreeMap<u32, (ObjectHandle, bool)>, CkError> {
    let handles = s.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
    ])?;
    let mut out = BTreeMap::new();
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
        let Some((v, host)) = parse_label(&label, prefix) else {
            continue;
        };
        if id != kek_id(v) {
            tracing::warn!(label = %label, "object with a KEK label but a foreign CKA_ID; ignored");
            continue;
        }
        if out.insert(v, (h, host)).is_some() {
            tracing::warn!(version = v, "two KEK objects with the same version; using one");
        }
    }
    Ok(out)
}

/// [`find_keks`] for the ceremony steps (`backup.rs`).
pub(crate) fn find_keks_of(s: &Session, prefix: &str) -> Result<BTreeMap<u32, (ObjectHandle, bool)>, CkError> {
    find_keks(s, prefix)
}

/// The attributes of KEK `version` of `kind`, as created and as restored from a backup.
///
/// `CKA_EXTRACTABLE` with `CKA_WRAP_WITH_TRUSTED`: the token wraps the KEK only under a key the
/// security officer marked trusted, which is how `keyward kek backup` takes it out and the only
/// way it can leave (see `backup.rs`). `CKA_COPYABLE` comes before `CKA_MODIFIABLE`: SoftHSM
/// applies an unwrap template in order and refuses to change a key once it is not modifiable.
pub(crate) fn kek_template(prefix: &str, version: u32, kind: KekKind) -> Vec<Attribute> {
    let label = kek_label(prefix, version, kind);
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::WrapWithTrusted(true),
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
    if kind == KekKind::Sealed {
        template.push(unwrap_template());
    }
    template.push(Attribute::Copyable(false));
    template.push(Attribute::Modifiable(false));
    template
}

fn create_kek(s: &Session, prefix: &str, version: u32, kind: KekKind) -> Result<ObjectHandle, CkError> {
    let mut template = kek_template(prefix, version, kind);
    template.insert(2, Attribute::ValueLen(32u64.into()));
    s.generate_key(&Mechanism::AesKeyGen, &template)
}

/// Errors that mean "the token does not take this template" rather than token trouble.
fn is_template_refusal(e: &CkError) -> bool {
    matches!(e, CkError::Pkcs11(..)) && breakage(e) == Breakage::None
}

/// One attempt of the probe: `Ok(true)` if the unwrap was refused or the object came out
/// sealed anyway (the token applied the template), `Ok(false)` if it came out readable.
fn refused_or_sealed(s: &Session, kek: ObjectHandle, blob: &[u8], extra: &[Attribute]) -> Result<bool, CkError> {
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
    ];
    template.extend_from_slice(extra);
    let h = match s.unwrap_key(&wrap_mechanism(), kek, blob, &template) {
        Ok(h) => h,
        Err(e) if is_template_refusal(&e) => return Ok(true),
        Err(e) => return Err(e),
    };
    let attrs = s.get_attributes(
        h,
        &[
            AttributeType::Token,
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::Derive,
        ],
    );
    destroy_quietly(s, h, "KEK probe key");
    let mut sealed = true;
    for a in attrs? {
        match a {
            Attribute::Token(true)
            | Attribute::Sensitive(false)
            | Attribute::Extractable(true)
            | Attribute::Derive(true) => sealed = false,
            _ => {}
        }
    }
    Ok(sealed)
}

/// Does the KEK enforce its unwrap template (see the module docs)? `Err` only for token trouble.
fn probe_sealed(s: &Session, kek: ObjectHandle) -> Result<bool, CkError> {
    if s.update_attributes(kek, &[Attribute::Decrypt(false)]).is_ok() {
        return Ok(false); // modifiable: CKA_DECRYPT (or the template) could be changed
    }
    let probe = session_aes_key(s, &[Attribute::Extractable(true)])?;
    let blob = s.wrap_key(&wrap_mechanism(), kek, probe);
    destroy_quietly(s, probe, "KEK probe key");
    let blob = match blob {
        Ok(b) => b,
        Err(e) if is_template_refusal(&e) => return Ok(false),
        Err(e) => return Err(e),
    };
    let compliant = [
        Attribute::Token(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Derive(false),
    ];
    match s.unwrap_key(
        &wrap_mechanism(),
        kek,
        &blob,
        &[
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
            ][..],
            &compliant[..],
        ]
        .concat(),
    ) {
        Ok(h) => destroy_quietly(s, h, "KEK probe key"),
        // A KEK that refuses even a compliant unwrap cannot serve hsm custody.
        Err(e) if is_template_refusal(&e) => return Ok(false),
        Err(e) => return Err(e),
    }
    let asks: [&[Attribute]; 6] = [
        &[
            Attribute::Token(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
        ],
        &[
            Attribute::Token(false),
            Attribute::Sensitive(true),
            Attribute::Extractable(true),
            Attribute::Derive(false),
        ],
        &[
            Attribute::Token(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(false),
            Attribute::Derive(false),
        ],
        &[
            Attribute::Token(false),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Derive(true),
        ],
        &[
            Attribute::Token(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Derive(false),
        ],
        &[],
    ];
    for extra in asks {
        if !refused_or_sealed(s, kek, &blob, extra)? {
            return Ok(false);
        }
    }
    Ok(true)
}

enum Want {
    Load,
    Ensure,
    Rotate,
}

/// What a refresh found and made, computed inside the session closure.
struct Found {
    keks: Keks,
    probed: BTreeMap<u32, KekKind>,
    epoch: u64,
}

impl Hsm {
    fn kek_lock(&self) -> MutexGuard<'_, KekCache> {
        self.inner.kek.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Does this custody wrap Ed25519 keys under a host KEK (token without native EdDSA
    /// wrapping, and not refused)?
    pub(crate) fn ed25519_via_host(&self) -> bool {
        !self.inner.ed25519_native.load(Ordering::Relaxed)
    }

    /// The KEK kinds this custody needs to exist (see `kek_version`).
    fn needed(&self) -> Vec<Purpose> {
        let policy = self.inner.custody;
        match policy.mode {
            Custody::Host => vec![Purpose::Host],
            Custody::Hsm if self.ed25519_via_host() && !policy.refuse_host_ed25519 => {
                vec![Purpose::Sealed, Purpose::Host]
            }
            Custody::Hsm => vec![Purpose::Sealed],
        }
    }

    fn usable(&self, purpose: Purpose, kind: KekKind) -> bool {
        match purpose {
            Purpose::Sealed => {
                kind == KekKind::Sealed || (kind == KekKind::Unenforced && self.inner.custody.allow_unenforced_kek)
            }
            Purpose::Host => kind != KekKind::Sealed,
        }
    }

    fn current_in(&self, keks: &Keks, purpose: Purpose) -> u32 {
        keks.iter()
            .rev()
            .find(|(_, (_, kind))| self.usable(purpose, *kind))
            .map(|(v, _)| *v)
            .unwrap_or(0)
    }

    /// Classify, create and probe inside one session. `probed` carries earlier probe results.
    fn refresh_in_session(
        &self,
        s: &Session,
        want: &Want,
        mut probed: BTreeMap<u32, KekKind>,
    ) -> Result<(Keks, BTreeMap<u32, KekKind>), Fail2> {
        let prefix = self.inner.kek_prefix.as_str();
        let mut keks = BTreeMap::new();
        for (v, (h, host)) in find_keks(s, prefix)? {
            let kind = if host {
                KekKind::Host
            } else if let Some(k) = probed.get(&v) {
                *k
            } else {
                let k = if probe_sealed(s, h)? {
                    KekKind::Sealed
                } else {
                    KekKind::Unenforced
                };
                probed.insert(v, k);
                k
            };
            keks.insert(v, (h, kind));
        }
        let to_make: Vec<Purpose> = match want {
            Want::Load => Vec::new(),
            // A sealed KEK is wanted even when an unenforced one is usable (opted in): new keys
            // then get the real guarantee wherever the token can give it.
            Want::Ensure => self
                .needed()
                .into_iter()
                .filter(|p| match p {
                    Purpose::Sealed => !keks.values().any(|(_, k)| *k == KekKind::Sealed),
                    Purpose::Host => self.current_in(&keks, *p) == 0,
                })
                .collect(),
            Want::Rotate => self.needed(),
        };
        for purpose in to_make {
            let highest = keks.keys().next_back().copied().unwrap_or(0);
            let v = highest.checked_add(1).ok_or_else(|| {
                Fail2::Hsm(HsmError::Unsupported {
                    what: "KEK version overflow".to_string(),
                })
            })?;
            let fallback = self.current_in(&keks, purpose) != 0;
            let Some(kind) = self.create_checked(s, v, purpose, fallback)? else {
                continue;
            };
            probed.insert(v, kind);
            let h = find_keks(s, prefix)?.remove(&v).map(|(h, _)| h).ok_or_else(|| {
                Fail2::Hsm(HsmError::Internal {
                    op: "ensure_kek",
                    rv: format!("KEK v{v} not found after creating it"),
                })
            })?;
            keks.insert(v, (h, kind));
        }
        Ok((keks, probed))
    }

    /// Create KEK `v` for `purpose`; a sealed one is probed, and destroyed again (no side
    /// effect) if the token does not enforce its template. Then, if the operator opted in
    /// (`allow_unenforced_kek`), an unenforced KEK is made instead, unless `have_usable` says
    /// one is there already (`None`: nothing created); without the opt-in it is an error.
    fn create_checked(
        &self,
        s: &Session,
        v: u32,
        purpose: Purpose,
        have_usable: bool,
    ) -> Result<Option<KekKind>, Fail2> {
        let prefix = self.inner.kek_prefix.as_str();
        let allow = self.inner.custody.allow_unenforced_kek;
        let label = kek_label(prefix, v, KekKind::Sealed);
        if purpose == Purpose::Host {
            create_kek(s, prefix, v, KekKind::Host)?;
            tracing::info!(version = v, label = %kek_label(prefix, v, KekKind::Host), "created host key-encryption key");
            return Ok(Some(KekKind::Host));
        }
        let refusal = match create_kek(s, prefix, v, KekKind::Sealed) {
            Ok(h) if probe_sealed(s, h)? => {
                tracing::info!(version = v, label = %label, "created sealed key-encryption key (unwrap template enforced)");
                return Ok(Some(KekKind::Sealed));
            }
            Ok(h) => {
                destroy_quietly(s, h, "unenforced KEK");
                not_enforced(&label)
            }
            Err(e) if is_template_refusal(&e) => HsmError::CustodyRefused {
                reason: format!(
                    "the token refuses CKA_UNWRAP_TEMPLATE on a new KEK ({}): it cannot keep hsm-custody \
                     keys non-extractable. Use a token that supports unwrap templates, or set \
                     hsm.allow_unenforced_kek = true to run without that guarantee",
                    super::error::describe(&e)
                ),
            },
            Err(e) => return Err(e.into()),
        };
        if !allow {
            return Err(Fail2::Hsm(refusal));
        }
        tracing::warn!(version = v, reason = %refusal, "no sealed KEK on this token (hsm.allow_unenforced_kek)");
        if have_usable {
            return Ok(None);
        }
        create_kek(s, prefix, v, KekKind::Unenforced)?;
        Ok(Some(KekKind::Unenforced))
    }

    /// Find KEKs on the token (and create some if asked), refreshing the cache.
    /// Lock order: KEK cache, then a pool session (never the other way round).
    fn refresh_keks(&self, cache: &mut KekCache, want: Want) -> Result<u32, HsmError> {
        let pool = &self.inner.pool;
        let label = pool.label.clone();
        let op = match want {
            Want::Load => "load_kek",
            Want::Ensure => "ensure_kek",
            Want::Rotate => "rotate_kek",
        };
        let probed_before = cache.probed.clone();
        let found = pool.with_session(op, |p| {
            match self.refresh_in_session(&p.session, &want, probed_before.clone()) {
                Ok((keks, probed)) => (
                    Ok(Found {
                        keks,
                        probed,
                        epoch: p.epoch,
                    }),
                    Breakage::None,
                ),
                Err(Fail2::Hsm(e)) => (Err(e), Breakage::None),
                Err(Fail2::Ck(e)) => (Err(map_err(op, &e, &label)), breakage(&e)),
            }
        })?;
        // Older versions missing while every current one is there: retired (`keyward kek
        // retire`), not token trouble. A token read half-way while it goes away misses a
        // current version too, and stays token trouble.
        let current: Vec<u32> = self
            .needed()
            .into_iter()
            .map(|p| self.current_in(&cache.handles, p))
            .collect();
        let currents_present = !current.is_empty() && current.iter().all(|v| *v != 0 && found.keks.contains_key(v));
        if currents_present {
            let retired: Vec<u32> = cache
                .seen
                .iter()
                .filter(|v| !found.keks.contains_key(v) && !current.contains(v))
                .copied()
                .collect();
            for v in retired {
                tracing::warn!(version = v, "key-encryption key is no longer on the token (retired)");
                cache.seen.remove(&v);
            }
        }
        if let Some(v) = cache.seen.iter().find(|v| !found.keks.contains_key(v)) {
            tracing::error!(version = *v, "key-encryption key vanished from the token");
            self.inner.kek_dirty.store(true, Ordering::SeqCst);
            // The token's storage changed under SoftHSM (or the device lost state): start over.
            self.inner.pool.request_reinit();
            return Err(HsmError::Unavailable {
                op,
                rv: format!("KEK v{v} no longer on the token (CKR_OBJECT_HANDLE_INVALID)"),
            });
        }
        cache.seen.extend(found.keks.keys().copied());
        cache.handles = found.keks;
        cache.probed = found.probed;
        cache.epoch = found.epoch;
        cache.loaded = Some(std::time::Instant::now());
        self.inner.kek_dirty.store(false, Ordering::SeqCst);
        Ok(self.version_of(cache))
    }

    /// The primary version for this custody, or 0 if a KEK it needs is missing.
    fn version_of(&self, cache: &KekCache) -> u32 {
        let needed = self.needed();
        if needed.iter().any(|p| self.current_in(&cache.handles, *p) == 0) {
            return 0;
        }
        needed.first().map(|p| self.current_in(&cache.handles, *p)).unwrap_or(0)
    }

    /// The periodic re-read of [`Hsm::kek`]: new versions are taken, nothing else changes, and a
    /// failure or a missing version leaves the cache as it was.
    fn reload_keks_softly(&self, cache: &mut KekCache) {
        cache.loaded = Some(std::time::Instant::now());
        let pool = &self.inner.pool;
        let probed_before = cache.probed.clone();
        let found = pool.with_session("reload_kek", |p| {
            match self.refresh_in_session(&p.session, &Want::Load, probed_before.clone()) {
                Ok((keks, probed)) => (Ok((keks, probed, p.epoch)), Breakage::None),
                Err(Fail2::Hsm(e)) => (Err(e), Breakage::None),
                Err(Fail2::Ck(e)) => (Err(map_err("reload_kek", &e, &pool.label)), Breakage::None),
            }
        });
        match found {
            Ok((keks, probed, epoch)) if epoch == cache.epoch && cache.seen.iter().all(|v| keks.contains_key(v)) => {
                let new: Vec<u32> = keks
                    .keys()
                    .filter(|v| !cache.handles.contains_key(v))
                    .copied()
                    .collect();
                if !new.is_empty() {
                    tracing::info!(versions = ?new, "new key-encryption key versions on the token");
                }
                cache.seen.extend(keks.keys().copied());
                cache.handles = keks;
                cache.probed = probed;
            }
            Ok(_) => tracing::debug!("KEK list re-read incomplete or from another pool epoch; kept the cached one"),
            Err(e) => tracing::debug!(error = %e, "KEK list re-read failed; kept the cached one"),
        }
    }

    /// Load KEKs at open and refuse what this custody cannot accept (hsm custody: a
    /// `<prefix>-v<N>` KEK that does not enforce its template, unless the operator opted in).
    pub(crate) fn load_keks(&self) -> Result<u32, HsmError> {
        let mut cache = self.kek_lock();
        let v = self.refresh_keks(&mut cache, Want::Load)?;
        let policy = self.inner.custody;
        if policy.mode == Custody::Hsm {
            let prefix = self.inner.kek_prefix.as_str();
            for (version, (_, kind)) in &cache.handles {
                if *kind != KekKind::Unenforced {
                    continue;
                }
                let label = kek_label(prefix, *version, KekKind::Unenforced);
                if !policy.allow_unenforced_kek {
                    return Err(not_enforced(&label));
                }
                tracing::warn!(kek = %label, "KEK does not enforce an unwrap template: whoever holds the PIN can read the keys it wraps (hsm.allow_unenforced_kek = true)");
            }
        }
        Ok(v)
    }

    /// Make sure the KEKs this custody needs exist: hsm custody a sealed KEK (and a host KEK
    /// when Ed25519 keys must pass through host memory), host custody a host KEK. Returns the
    /// current version of the primary one (sealed in hsm custody, host in host custody).
    pub fn ensure_kek(&self) -> Result<u32, HsmError> {
        let mut cache = self.kek_lock();
        self.refresh_keks(&mut cache, Want::Ensure)
    }

    /// Create new versions of the KEKs this custody uses and make them current; older versions
    /// stay for unwrapping.
    pub fn rotate_kek(&self) -> Result<u32, HsmError> {
        let mut cache = self.kek_lock();
        self.refresh_keks(&mut cache, Want::Rotate)
    }

    /// Destroys KEK `version` on the token (`keyward kek retire`): refused while it is the
    /// current version of a purpose this custody uses. The caller checks that no key is
    /// wrapped under it any more.
    pub fn destroy_kek(&self, version: u32) -> Result<String, HsmError> {
        let mut cache = self.kek_lock();
        self.refresh_keks(&mut cache, Want::Load)?;
        for purpose in self.needed() {
            if self.current_in(&cache.handles, purpose) == version {
                return Err(HsmError::CustodyRefused {
                    reason: format!("KEK v{version} is current: rotate first (`keyward kek rotate`)"),
                });
            }
        }
        let Some((handle, kind)) = cache.handles.get(&version).copied() else {
            return Err(HsmError::KekMissing { version });
        };
        let label = kek_label(self.inner.kek_prefix.as_str(), version, kind);
        let pool_label = self.inner.pool.label.clone();
        self.inner
            .pool
            .with_session("destroy_kek", |p| match p.session.destroy_object(handle) {
                Ok(()) => (Ok(()), Breakage::None),
                Err(e) => (Err(map_err("destroy_kek", &e, &pool_label)), breakage(&e)),
            })?;
        cache.handles.remove(&version);
        cache.seen.remove(&version);
        cache.probed.remove(&version);
        tracing::info!(version, label = %label, "key-encryption key destroyed (retired)");
        Ok(label)
    }

    /// The current version of this custody's primary KEK; 0 if a KEK it needs is missing
    /// (run [`Hsm::ensure_kek`], i.e. `keyward init`).
    pub fn kek_version(&self) -> u32 {
        self.version_of(&self.kek_lock())
    }

    /// Every KEK on the token: (version, label, kind).
    pub fn keks(&self) -> Vec<(u32, String, KekKind)> {
        let cache = self.kek_lock();
        let prefix = self.inner.kek_prefix.as_str();
        cache
            .handles
            .iter()
            .map(|(v, (_, kind))| (*v, kek_label(prefix, *v, *kind), *kind))
            .collect()
    }

    /// The handle of KEK `version`, or of the current KEK for `purpose`, reloading the cache
    /// if the pool was re-initialised or a KEK handle was reported invalid.
    pub(crate) fn kek(&self, version: Option<u32>, purpose: Purpose) -> Result<Kek, HsmError> {
        let mut cache = self.kek_lock();
        let stale = cache.epoch != self.inner.pool.epoch() || self.inner.kek_dirty.load(Ordering::SeqCst);
        if stale {
            self.refresh_keks(&mut cache, Want::Load)?;
        } else if cache.loaded.is_none_or(|t| t.elapsed() >= KEK_RELOAD) {
            // Only to see versions made elsewhere: best effort. A list that looks short (a
            // token folder another process is writing, read half-way) is not trusted here; the
            // cached handles stay, and the next use after KEK_RELOAD looks again.
            self.reload_keks_softly(&mut cache);
        }
        let version = version.unwrap_or_else(|| self.current_in(&cache.handles, purpose));
        match cache.handles.get(&version) {
            Some((h, kind)) if version != 0 => Ok(Kek {
                version,
                handle: *h,
                kind: *kind,
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

    /// Readiness: a pooled session answers, and every KEK this custody needs is on the token
    /// (its object read back through a session, not only remembered). A KEK that is gone, or a
    /// token that went away, fails here before a request meets it; the cache is reloaded on the
    /// next use, so the probe turns green again by itself once the token is back.
    pub fn probe(&self) -> Result<(), HsmError> {
        let label = self.inner.pool.label.clone();
        for purpose in self.needed() {
            let kek = self.kek(None, purpose)?;
            let read = self.inner.pool.with_session("probe", |p| {
                match p.session.get_attributes(kek.handle, &[AttributeType::Class]) {
                    Ok(attrs)
                        if attrs
                            .iter()
                            .any(|a| matches!(a, Attribute::Class(ObjectClass::SECRET_KEY))) =>
                    {
                        (Ok(()), Breakage::None)
                    }
                    Ok(_) => (Err(HsmError::KekMissing { version: kek.version }), Breakage::None),
                    Err(e) => (Err(map_err("probe", &e, &label)), breakage(&e)),
                }
            });
            if let Err(e) = read {
                self.kek_failed();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Note that a KEK handle failed: reload before the next use.
    pub(crate) fn kek_failed(&self) {
        self.inner.kek_dirty.store(true, Ordering::SeqCst);
    }
}

fn not_enforced(label: &str) -> HsmError {
    HsmError::CustodyRefused {
        reason: format!(
            "KEK {label} does not enforce CKA_UNWRAP_TEMPLATE (it predates sealed KEKs, or the token \
             ignores the template): whoever holds the PIN can unwrap the keys it wraps as extractable, \
             so hsm custody cannot promise they stay in the token. Either set \
             hsm.allow_unenforced_kek = true to run with that weaker guarantee (`keyward init` then \
             adds a sealed KEK for new accounts where the token supports it), or run with \
             keys.custody = \"host\", which uses such a KEK as it is"
        ),
    }
}

/// A failure inside the refresh closure.
enum Fail2 {
    Ck(CkError),
    Hsm(HsmError),
}

impl From<CkError> for Fail2 {
    fn from(e: CkError) -> Self {
        Fail2::Ck(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip() {
        assert_eq!(kek_label("k", 3, KekKind::Sealed), "k-v3");
        assert_eq!(kek_label("k", 4, KekKind::Host), "k-host-v4");
        assert_eq!(parse_label("k-v3", "k"), Some((3, false)));
        assert_eq!(parse_label("k-host-v4", "k"), Some((4, true)));
        assert_eq!(parse_label("k-v0", "k"), None);
        assert_eq!(parse_label("k-v03", "k"), None);
        assert_eq!(parse_label("k-vx", "k"), None);
        assert_eq!(parse_label("kk-v1", "k"), None);
        assert_eq!(parse_label("k-host-v", "k"), None);
    }

    #[test]
    fn unwrap_template_bytes() {
        let Attribute::VendorDefined((AttributeType::VendorDefined(t), bytes)) = unwrap_template() else {
            panic!("not a raw attribute");
        };
        assert_eq!(t, CKA_UNWRAP_TEMPLATE);
        let w = std::mem::size_of::<c_ulong>();
        assert_eq!(bytes.len(), 4 * 3 * w);
        let word = |i: usize| c_ulong::from_ne_bytes(bytes[i * w..(i + 1) * w].try_into().expect("word"));
        assert_eq!(word(3), c_ulong::from(AttributeType::Sensitive));
        assert_eq!(word(5), 1);
        assert_eq!(word(4) as usize, std::ptr::addr_of!(TEMPLATE_VALUES[1]) as usize);
        assert_eq!(TEMPLATE_VALUES, [0, 1, 0, 0]);
    }
}
