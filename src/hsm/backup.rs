//! KEK backup and restore: the key ceremony.
//!
//! A KEK leaves the token only wrapped (`CKM_AES_KEY_WRAP_PAD`) under a **recovery key**: 32
//! random bytes made on the host for one backup, split M-of-N among custodians with Shamir's
//! secret sharing over GF(256) ([`split`], [`combine`]), and never stored whole.
//!
//! What the token allows, and why only this export is possible:
//!
//! * KEKs are created `CKA_EXTRACTABLE = true` **and** `CKA_WRAP_WITH_TRUSTED = true`
//!   (`kek.rs`), not modifiable, not copyable: the token wraps them only under a key whose
//!   `CKA_TRUSTED` is true.
//! * Only the security officer can set `CKA_TRUSTED` (PKCS#11 §4.7; SoftHSM 2.6.1 enforces it:
//!   a user session gets `CKR_ATTRIBUTE_READ_ONLY`, and wrapping such a KEK under an untrusted
//!   key gets `CKR_KEY_NOT_WRAPPABLE`, both checked in `tests/kek_backup.rs`). So whoever holds
//!   only the user PIN cannot take a KEK out in any form; a backup needs the SO PIN (dual
//!   control: the SO PIN holder and the share custodians).
//! * [`export_keks`] logs in as SO, creates the recovery key as a public, trusted, wrap-only
//!   **session** object (never a token object, so it never reaches the token's storage), logs
//!   out, logs in as user in the same session, wraps every KEK under it, and destroys it.
//!
//! [`import_keks`] recreates every KEK on an empty token from the wrapped copies: the
//! recovery key becomes an unwrap-only session object, each KEK is unwrapped as a token object
//! with the label, id and attributes it had (sealed KEKs with their `CKA_UNWRAP_TEMPLATE`), and
//! its check value must equal the one recorded at backup, or everything created is destroyed.
//!
//! A **check value** is a KEK's `CKM_AES_KEY_WRAP_PAD` wrap of an all-zero AES-256 session
//! key: deterministic, so equal check values mean equal KEKs, and it reveals nothing about the
//! KEK. [`verify_backup`] unwraps the backup's KEKs as session objects and compares their check
//! values with the token's own KEKs: a backup proven restorable without restoring it.

use std::collections::BTreeMap;
use std::path::Path;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use secrecy::SecretString;
use sha2::{Digest as _, Sha256};
use zeroize::{Zeroize as _, Zeroizing};

use super::error::{map_err, rv_of, HsmError};
use super::generate::{destroy_quietly, wrap_mechanism};
use super::kek::{find_keks_of, kek_label, kek_template, KekKind};

/// Bytes of the recovery key (AES-256).
pub const RECOVERY_KEY_LEN: usize = 32;

/// The recovery key of one backup (zeroized on drop).
pub struct RecoveryKey(Zeroizing<[u8; RECOVERY_KEY_LEN]>);

impl std::fmt::Debug for RecoveryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecoveryKey(<redacted>)")
    }
}

impl RecoveryKey {
    /// A new random recovery key from the OS RNG.
    pub fn generate() -> RecoveryKey {
        use rand::RngCore as _;
        let mut k = Zeroizing::new([0u8; RECOVERY_KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(&mut k[..]);
        RecoveryKey(k)
    }

    /// What the store keeps to recognise this key (and never the key):
    /// SHA-256("keyward recovery check" ‖ backup id ‖ key).
    pub fn check(&self, backup_id: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"keyward recovery check");
        h.update(backup_id.as_bytes());
        h.update(&self.0[..]);
        h.finalize().into()
    }
}

/// Why shares cannot rebuild a recovery key. Messages never contain share bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShareError {
    /// A share does not parse.
    #[error("share {which}: {reason}")]
    Malformed {
        /// Which share (its position or file).
        which: String,
        /// What is wrong.
        reason: String,
    },
    /// A share's checksum does not match its text: it was mistyped or damaged.
    #[error("share {which}: checksum mismatch (mistyped or damaged); nothing was done")]
    Checksum {
        /// Which share.
        which: String,
    },
    /// Shares of different backups, or of different thresholds.
    #[error("the shares belong to different backups ({0} and {1})")]
    Mixed(String, String),
    /// The same share twice.
    #[error("share number {0} was given twice")]
    Duplicate(u8),
    /// Fewer shares than the threshold.
    #[error("backup {backup} needs {threshold} shares; {given} given")]
    TooFew {
        /// The backup.
        backup: String,
        /// M.
        threshold: u8,
        /// How many distinct shares were given.
        given: usize,
    },
    /// The rebuilt key is not the backup's (a share is wrong although its checksum holds).
    #[error(
        "the shares do not rebuild the recovery key of backup {0}: one of them is corrupted or from \
         another backup; nothing was done"
    )]
    WrongKey(String),
    /// Threshold or count out of range.
    #[error("invalid split: {0}")]
    Split(String),
}

/// One parsed share.
struct Share {
    backup: String,
    threshold: u8,
    bytes: Zeroizing<Vec<u8>>,
}

const SHARE_PREFIX: &str = "kw1";

fn checksum(body: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"keyward share");
    h.update(body.as_bytes());
    hex::encode(&h.finalize()[..4])
}

/// Splits `key` into `shares` texts, any `threshold` of which rebuild it:
/// `kw1-<backup id>-<M>-<x>-<hex>-<checksum>`, where the checksum (4 bytes of SHA-256 over the
/// text before it) catches a mistyped share.
pub fn split(
    key: &RecoveryKey,
    backup_id: &str,
    threshold: u8,
    shares: u8,
) -> Result<Vec<Zeroizing<String>>, ShareError> {
    if threshold < 2 || shares < threshold {
        return Err(ShareError::Split(format!(
            "need 2 <= threshold <= shares, got threshold {threshold} of {shares}"
        )));
    }
    if backup_id.is_empty() || !backup_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ShareError::Split("backup id must be hex".into()));
    }
    let dealer = blahaj::Sharks(threshold).dealer(&key.0[..]);
    Ok(dealer
        .take(usize::from(shares))
        .map(|s| {
            let bytes = Zeroizing::new(Vec::<u8>::from(&s));
            let (x, y) = bytes.split_first().map_or((0, &[][..]), |(x, y)| (*x, y));
            let body = Zeroizing::new(format!("{SHARE_PREFIX}-{backup_id}-{threshold}-{x}-{}", hex::encode(y)));
            Zeroizing::new(format!("{}-{}", body.as_str(), checksum(&body)))
        })
        .collect())
}

fn parse_share(which: &str, text: &str) -> Result<Share, ShareError> {
    let bad = |reason: &str| ShareError::Malformed {
        which: which.to_string(),
        reason: reason.to_string(),
    };
    // Whitespace is ignored, so a share printed in groups can be typed back as printed.
    let compact: Zeroizing<String> = Zeroizing::new(text.chars().filter(|c| !c.is_whitespace()).collect());
    let (body, sum) = compact.rsplit_once('-').ok_or_else(|| bad("not a keyward share"))?;
    let parts: Vec<&str> = body.split('-').collect();
    let [prefix, backup, threshold, x, y] = parts.as_slice() else {
        return Err(bad(
            "not a keyward share (expected kw1-<backup>-<M>-<n>-<hex>-<checksum>)",
        ));
    };
    if *prefix != SHARE_PREFIX {
        return Err(bad("not a keyward share (expected kw1-...)"));
    }
    if !sum.eq_ignore_ascii_case(&checksum(body)) {
        return Err(ShareError::Checksum {
            which: which.to_string(),
        });
    }
    let threshold: u8 = threshold.parse().map_err(|_| bad("threshold is not a number"))?;
    let x: u8 = x.parse().map_err(|_| bad("share number is not a number"))?;
    if x == 0 {
        return Err(bad("share number 0"));
    }
    let y = Zeroizing::new(hex::decode(y).map_err(|_| bad("share value is not hex"))?);
    if y.len() != RECOVERY_KEY_LEN {
        return Err(bad("share value has the wrong length"));
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(1 + y.len()));
    bytes.push(x);
    bytes.extend_from_slice(&y);
    Ok(Share {
        backup: (*backup).to_string(),
        threshold,
        bytes,
    })
}

/// Rebuilds the recovery key from share texts `(which, text)`: every share must parse and pass
/// its checksum, all must be of one backup, and at least its threshold must be given. Returns
/// (backup id, the key); the caller checks the key against the backup's stored check.
pub fn combine(shares: &[(String, Zeroizing<String>)]) -> Result<(String, RecoveryKey), ShareError> {
    let mut parsed: Vec<Share> = Vec::with_capacity(shares.len());
    for (which, text) in shares {
        let s = parse_share(which, text)?;
        if let Some(first) = parsed.first() {
            if first.backup != s.backup || first.threshold != s.threshold {
                return Err(ShareError::Mixed(
                    format!("{}/{}", first.backup, first.threshold),
                    format!("{}/{}", s.backup, s.threshold),
                ));
            }
        }
        if let Some(dup) = parsed.iter().find(|p| p.bytes.first() == s.bytes.first()) {
            return Err(ShareError::Duplicate(dup.bytes.first().copied().unwrap_or(0)));
        }
        parsed.push(s);
    }
    let Some(first) = parsed.first() else {
        return Err(ShareError::TooFew {
            backup: "?".into(),
            threshold: 2,
            given: 0,
        });
    };
    let (backup, threshold) = (first.backup.clone(), first.threshold);
    if parsed.len() < usize::from(threshold) {
        return Err(ShareError::TooFew {
            backup,
            threshold,
            given: parsed.len(),
        });
    }
    let blahaj_shares: Vec<blahaj::Share> = parsed
        .iter()
        .filter_map(|s| blahaj::Share::try_from(s.bytes.as_slice()).ok())
        .collect();
    let mut secret = blahaj::Sharks(threshold)
        .recover(&blahaj_shares)
        .map_err(|e| ShareError::Split(e.to_string()))?;
    let mut key = Zeroizing::new([0u8; RECOVERY_KEY_LEN]);
    if secret.len() != RECOVERY_KEY_LEN {
        secret.zeroize();
        return Err(ShareError::WrongKey(backup));
    }
    key.copy_from_slice(&secret);
    secret.zeroize();
    Ok((backup, RecoveryKey(key)))
}

/// One KEK as a backup holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackedUpKek {
    /// KEK version.
    pub version: u32,
    /// `sealed`, `unenforced` or `host`.
    pub kind: String,
    /// The KEK under the recovery key (`CKM_AES_KEY_WRAP_PAD`), hex.
    pub wrapped: String,
    /// The KEK's check value (see the module docs), hex.
    pub check_value: String,
}

fn kind_name(k: KekKind) -> &'static str {
    match k {
        KekKind::Sealed => "sealed",
        KekKind::Unenforced => "unenforced",
        KekKind::Host => "host",
    }
}

fn kind_of(name: &str) -> Option<KekKind> {
    match name {
        "sealed" => Some(KekKind::Sealed),
        "unenforced" => Some(KekKind::Unenforced),
        "host" => Some(KekKind::Host),
        _ => None,
    }
}

/// A PKCS#11 context of our own for one ceremony step, finalised afterwards when we
/// initialised it (the CLI runs these steps in a process without a session pool).
fn with_token<T>(module: &Path, label: &str, f: impl FnOnce(&Session) -> Result<T, HsmError>) -> Result<T, HsmError> {
    let (ctx, owned) = super::token::own_context(module, label)?;
    let result = (|| {
        let mut found = None;
        for slot in ctx
            .get_slots_with_token()
            .map_err(|e| map_err("get_slot_list", &e, label))?
        {
            let info = ctx
                .get_token_info(slot)
                .map_err(|e| map_err("get_token_info", &e, label))?;
            if info.token_initialized() && info.label().trim_end() == label {
                found = Some(slot);
                break;
            }
        }
        let slot = found.ok_or_else(|| HsmError::TokenNotFound {
            label: label.to_string(),
        })?;
        let session = ctx
            .open_rw_session(slot)
            .map_err(|e| map_err("open_session", &e, label))?;
        f(&session)
    })();
    if owned {
        if let Err(e) = ctx.finalize() {
            tracing::debug!(error = %e, "C_Finalize after the ceremony step failed");
        }
    }
    result
}

/// The check value of `kek` (see the module docs).
fn check_value(s: &Session, kek: ObjectHandle) -> Result<Vec<u8>, CkError> {
    let zero = s.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Value(vec![0u8; 32]),
        Attribute::Token(false),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ])?;
    let out = s.wrap_key(&wrap_mechanism(), kek, zero);
    destroy_quietly(s, zero, "check-value key");
    out
}

/// The recovery key as a session object: `trusted` (SO session) for wrapping, or for unwrapping.
fn recovery_object(s: &Session, key: &RecoveryKey, trusted: bool) -> Result<ObjectHandle, CkError> {
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Value(key.0.to_vec()),
        Attribute::Token(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
    ];
    if trusted {
        template.extend([
            Attribute::Private(false),
            Attribute::Trusted(true),
            Attribute::Wrap(true),
            Attribute::Unwrap(false),
        ]);
    } else {
        template.extend([Attribute::Wrap(false), Attribute::Unwrap(true)]);
    }
    let out = s.create_object(&template);
    super::generate::scrub(&mut template);
    out
}

fn refused(reason: String) -> HsmError {
    HsmError::CustodyRefused { reason }
}

/// Wraps every KEK on the token (labels `<prefix>-…`) under `key` (see the module docs).
/// Refuses, naming it, a KEK the token will not export (one created before backups existed:
/// rotate, rewrap and retire it).
pub fn export_keks(
    module: &Path,
    label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
    prefix: &str,
    key: &RecoveryKey,
) -> Result<Vec<BackedUpKek>, HsmError> {
    with_token(module, label, |s| {
        s.login(UserType::So, Some(so_pin))
            .map_err(|e| map_err("login_so", &e, label))?;
        let made = recovery_object(s, key, true);
        let logout = s.logout();
        let rk = made.map_err(|e| map_err("create_recovery_key", &e, label))?;
        logout.map_err(|e| map_err("logout_so", &e, label))?;
        let result = (|| {
            s.login(UserType::User, Some(user_pin))
                .map_err(|e| map_err("login", &e, label))?;
            let keks = find_keks_of(s, prefix).map_err(|e| map_err("find_keks", &e, label))?;
            if keks.is_empty() {
                return Err(refused(format!("no KEK labelled {prefix}-v<N> on token {label:?}")));
            }
            let mut out = Vec::with_capacity(keks.len());
            for (version, (h, host)) in keks {
                // An exportable `<prefix>-v<N>` KEK was made with its unwrap template (KEKs
                // made before backups existed are not exportable at all).
                let kind = if host { KekKind::Host } else { KekKind::Sealed };
                let wrapped = match s.wrap_key(&wrap_mechanism(), rk, h) {
                    Ok(w) => w,
                    Err(e)
                        if matches!(
                            rv_of(&e),
                            Some(RvError::KeyUnextractable) | Some(RvError::KeyNotWrappable)
                        ) =>
                    {
                        return Err(refused(format!(
                            "KEK {} cannot be exported ({}): it was created before KEK backups \
                             existed. Run `keyward kek rotate` (new KEKs are exportable), move every \
                             key off it with `keyward kek rewrap`, retire it with `keyward kek retire`, \
                             then back up again",
                            kek_label(prefix, version, kind),
                            super::error::describe(&e)
                        )))
                    }
                    Err(e) => return Err(map_err("wrap_kek", &e, label)),
                };
                let cv = check_value(s, h).map_err(|e| map_err("check_value", &e, label))?;
                out.push(BackedUpKek {
                    version,
                    kind: kind_name(kind).to_string(),
                    wrapped: hex::encode(wrapped),
                    check_value: hex::encode(cv),
                });
            }
            Ok(out)
        })();
        destroy_quietly(s, rk, "recovery key");
        let _ = s.logout();
        result
    })
}

/// The check values of the token's KEKs, by version.
pub fn live_check_values(
    module: &Path,
    label: &str,
    user_pin: &SecretString,
    prefix: &str,
) -> Result<BTreeMap<u32, String>, HsmError> {
    with_token(module, label, |s| {
        s.login(UserType::User, Some(user_pin))
            .map_err(|e| map_err("login", &e, label))?;
        let result = (|| {
            let mut out = BTreeMap::new();
            for (version, (h, _)) in find_keks_of(s, prefix).map_err(|e| map_err("find_keks", &e, label))? {
                let cv = check_value(s, h).map_err(|e| map_err("check_value", &e, label))?;
                out.insert(version, hex::encode(cv));
            }
            Ok(out)
        })();
        let _ = s.logout();
        result
    })
}

/// What [`import_keks`] (or a dry run) found for one KEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// KEK version.
    pub version: u32,
    /// Its label on the token.
    pub label: String,
}

/// Unwraps every backed-up KEK under `key`: as token objects with their original labels and
/// attributes (`restore`), or as session objects destroyed again (a verification). Each must
/// reproduce its recorded check value; on any failure every object created is destroyed.
pub fn import_keks(
    module: &Path,
    label: &str,
    user_pin: &SecretString,
    prefix: &str,
    key: &RecoveryKey,
    keks: &[BackedUpKek],
    restore: bool,
) -> Result<Vec<Restored>, HsmError> {
    with_token(module, label, |s| {
        s.login(UserType::User, Some(user_pin))
            .map_err(|e| map_err("login", &e, label))?;
        let mut created: Vec<ObjectHandle> = Vec::new();
        let result = (|| {
            if restore {
                let present = find_keks_of(s, prefix).map_err(|e| map_err("find_keks", &e, label))?;
                if let Some(v) = present.keys().next() {
                    return Err(refused(format!(
                        "token {label:?} already holds KEK version {v} ({prefix}-…): a restore needs a \
                         token without keyward KEKs; nothing was changed"
                    )));
                }
            }
            let rk = recovery_object(s, key, false).map_err(|e| map_err("create_recovery_key", &e, label))?;
            created.push(rk);
            let mut out = Vec::with_capacity(keks.len());
            for k in keks {
                let kind = kind_of(&k.kind)
                    .ok_or_else(|| refused(format!("backup names an unknown KEK kind {:?}", k.kind)))?;
                let wrapped = hex::decode(&k.wrapped)
                    .map_err(|_| refused(format!("backup entry for KEK v{} is not hex", k.version)))?;
                let mut template = kek_template(prefix, k.version, kind);
                if !restore {
                    for a in template.iter_mut() {
                        if let Attribute::Token(t) = a {
                            *t = false;
                        }
                    }
                }
                let h = s.unwrap_key(&wrap_mechanism(), rk, &wrapped, &template).map_err(|e| {
                    refused(format!(
                        "KEK v{} does not unwrap under the rebuilt recovery key ({}); nothing was changed",
                        k.version,
                        super::error::describe(&e)
                    ))
                })?;
                created.push(h);
                let cv = check_value(s, h).map_err(|e| map_err("check_value", &e, label))?;
                if hex::encode(cv) != k.check_value {
                    return Err(refused(format!(
                        "KEK v{} unwrapped, but its check value differs from the backup's; nothing was changed",
                        k.version
                    )));
                }
                out.push(Restored {
                    version: k.version,
                    label: kek_label(prefix, k.version, kind),
                });
            }
            Ok(out)
        })();
        // The recovery key always goes; KEK objects stay only after a successful restore.
        let keep_keks = restore && result.is_ok();
        for (i, h) in created.iter().enumerate() {
            if i == 0 || !keep_keks {
                destroy_quietly(s, *h, "restore object");
            }
        }
        let _ = s.logout();
        result
    })
}

/// The id of a new backup: 16 random hex digits.
pub fn new_backup_id() -> String {
    use rand::RngCore as _;
    let mut b = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(v: &[Zeroizing<String>]) -> Vec<(String, Zeroizing<String>)> {
        v.iter()
            .enumerate()
            .map(|(i, s)| (format!("#{}", i + 1), s.clone()))
            .collect()
    }

    #[test]
    fn any_threshold_of_the_shares_rebuilds_the_key() {
        let key = RecoveryKey::generate();
        let shares = split(&key, "00ff00ff00ff00ff", 3, 5).expect("split");
        assert_eq!(shares.len(), 5);
        for pick in [[0usize, 1, 2], [0, 2, 4], [4, 3, 1]] {
            let chosen: Vec<Zeroizing<String>> = pick.iter().map(|i| shares[*i].clone()).collect();
            let (id, rebuilt) = combine(&texts(&chosen)).expect("combine");
            assert_eq!(id, "00ff00ff00ff00ff");
            assert_eq!(rebuilt.0[..], key.0[..]);
        }
        // All five work too.
        let (_, rebuilt) = combine(&texts(&shares)).expect("all");
        assert_eq!(rebuilt.check("x"), key.check("x"));
    }

    #[test]
    fn too_few_mistyped_mixed_or_repeated_shares_are_refused() {
        let key = RecoveryKey::generate();
        let shares = split(&key, "0123456789abcdef", 3, 5).expect("split");
        assert!(matches!(
            combine(&texts(&shares[..2])),
            Err(ShareError::TooFew {
                threshold: 3,
                given: 2,
                ..
            })
        ));
        // One character changed in the value: the checksum catches it.
        let mut typo = shares[1].to_string();
        let pos = typo.len() - 20;
        let c = if &typo[pos..=pos] == "0" { "1" } else { "0" };
        typo.replace_range(pos..=pos, c);
        let bad = vec![shares[0].clone(), Zeroizing::new(typo), shares[2].clone()];
        assert!(matches!(combine(&texts(&bad)), Err(ShareError::Checksum { which }) if which == "#2"));
        // Another backup's share.
        let other = split(&RecoveryKey::generate(), "fedcba9876543210", 3, 5).expect("split");
        let mixed = vec![shares[0].clone(), shares[1].clone(), other[2].clone()];
        assert!(matches!(combine(&texts(&mixed)), Err(ShareError::Mixed(..))));
        let twice = vec![shares[0].clone(), shares[0].clone(), shares[1].clone()];
        assert!(matches!(combine(&texts(&twice)), Err(ShareError::Duplicate(_))));
        // Whitespace inside a share is ignored (a share printed in groups).
        let spaced: String = shares[3].chars().flat_map(|c| [c, ' ']).collect();
        let ok = vec![shares[0].clone(), shares[1].clone(), Zeroizing::new(spaced)];
        assert_eq!(combine(&texts(&ok)).expect("spaced").1.check("y"), key.check("y"));
    }

    #[test]
    fn a_forged_share_with_a_valid_checksum_rebuilds_another_key() {
        let key = RecoveryKey::generate();
        let shares = split(&key, "0123456789abcdef", 2, 3).expect("split");
        // Re-encode share 2 with one value byte flipped and a recomputed checksum.
        let body = shares[1].rsplit_once('-').expect("dash").0.to_string();
        let (head, value) = body.rsplit_once('-').expect("dash");
        let mut v = hex::decode(value).expect("hex");
        v[0] ^= 1;
        let forged_body = format!("{head}-{}", hex::encode(&v));
        let forged = format!("{forged_body}-{}", checksum(&forged_body));
        let (_, rebuilt) = combine(&texts(&[shares[0].clone(), Zeroizing::new(forged)])).expect("combine");
        assert_ne!(rebuilt.check("0123456789abcdef"), key.check("0123456789abcdef"));
    }

    #[test]
    fn splits_out_of_range_are_refused() {
        let key = RecoveryKey::generate();
        assert!(split(&key, "00", 1, 3).is_err());
        assert!(split(&key, "00", 4, 3).is_err());
        assert!(split(&key, "not-hex", 2, 3).is_err());
    }
}
