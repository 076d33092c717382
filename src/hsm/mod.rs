//! The only module that calls cryptoki: token creation, PKCS#11 session pool, key-encryption keys (KEKs),
//! key generation and wrapping, unwrapping for in-token signing ("hsm" custody) or to the host
//! ("host" custody), signing, and inspection of key objects for tests.
//!
//! Keys never live on the token as token objects: each account key is stored wrapped
//! (`CKM_AES_KEY_WRAP_PAD` under an AES-256 KEK that is the only token object we create) and
//! unwrapped into a *session* object when needed. Callers cache the resulting [`HsmKey`].
//!
//! All calls block; run them on a blocking thread pool. Open one `Hsm` per process and clone
//! it: a re-initialisation (`C_Finalize` + `C_Initialize`) affects the whole process.
//!
//! Custody (see `kek.rs`): hsm custody wraps keys under *sealed* KEKs, whose
//! `CKA_UNWRAP_TEMPLATE` makes every key unwrapped with them sensitive and non-extractable, for
//! anyone holding the PIN; host custody uses separate *host* KEKs without a template. `open`
//! probes what the token really enforces and refuses hsm custody on a KEK that does not enforce
//! its template, unless the operator opted in.
//!
//! Ed25519 on SoftHSM 2.6.1: its C_WrapKey/C_UnwrapKey do not handle EdDSA keys
//! (`CKR_KEY_NOT_WRAPPABLE` / `CKR_FUNCTION_FAILED`); `open` probes this once. On such a token
//! an Ed25519 key passes through host memory (zeroized) at generation and at every unwrap, in
//! either custody: it is wrapped as a PKCS#8 carrier under a host KEK (see `generate.rs`,
//! `unwrap.rs`; the blob format, AES-KWP of an RFC 8410 PrivateKeyInfo, is the same as a native
//! wrap). `refuse_host_ed25519` refuses that in hsm custody. Tokens with native EdDSA wrapping
//! never take that path.
//!
//! No secret attribute is ever read (C_GetAttributeValue of CKA_VALUE): cryptoki leaves an
//! unzeroized copy of what it reads; see `transport.rs`.
//!
//! # Binding check (callers MUST do this)
//! [`Hsm::unwrap_for_signing`] does not prove that the wrapped blob belongs to the stored public
//! key (this module has no curve arithmetic). Before caching an [`HsmKey`] the caller MUST sign a
//! fixed test message with it ([`Hsm::sign`]) and verify that signature against
//! `WrappedRef::public_key`; a blob swapped between two accounts fails that check.

mod backup;
mod config;
mod error;
mod generate;
mod inspect;
mod issuer;
mod kek;
mod pool;
mod sign;
mod token;
mod transport;
mod unwrap;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

pub use backup::{
    combine as combine_shares, export_keks, import_keks, live_check_values, new_backup_id, split as split_recovery_key,
    BackedUpKek, RecoveryKey, Restored, ShareError,
};
pub use config::{CustodyPolicy, HsmConfig, DEFAULT_KEK_LABEL_PREFIX};
pub use error::{ckr_name, HsmError};
pub use generate::{Curve, TransportKey, WrappedKey};
pub use inspect::ObjectInfo;
pub use issuer::{issuer_label, IssuerAlg, IssuerKeyInfo, UnknownIssuerAlg, ISSUER_LABEL_PREFIX};
pub use kek::{kek_label, KekKind, KEK_RELOAD};
pub use sign::{flush_key_destroys, keys_reaped, HsmKey, REAPER_THREAD};
pub use token::{create_token, init_token, CustodyReport, TokenInit};
pub use unwrap::WrappedRef;

/// A handle on one token: a pool of logged-in sessions plus the cached KEK handles.
/// Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Hsm {
    inner: Arc<Inner>,
}

struct Inner {
    pool: pool::Pool,
    kek: Mutex<kek::KekCache>,
    /// Set when a KEK handle was reported invalid: reload the cache before the next use.
    kek_dirty: AtomicBool,
    kek_prefix: String,
    /// Custody mode and its switches.
    custody: CustodyPolicy,
    /// Whether the token wraps/unwraps Ed25519 private keys natively (probed at open).
    ed25519_native: AtomicBool,
    /// Cached issuer key handles (see `issuer.rs`).
    issuer: issuer::IssuerCache,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hsm")
            .field("token", &self.inner.pool.label)
            .field("pool_size", &self.inner.pool.size())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_are_send_sync() {
        assert_send_sync::<Hsm>();
        assert_send_sync::<HsmKey>();
    }
}
