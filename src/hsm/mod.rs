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
//! Ed25519 on SoftHSM 2.6.1: its C_WrapKey/C_UnwrapKey do not handle EdDSA keys
//! (`CKR_KEY_NOT_WRAPPABLE` / `CKR_FUNCTION_FAILED`). The module then falls back, per process
//! and automatically, to a PKCS#8 carrier (see `generate.rs`, `unwrap.rs`): the blob format is
//! identical (AES-KWP of an RFC 8410 PrivateKeyInfo), but the 32-byte seed passes through host
//! memory (zeroized) at generation and at unwrap-for-signing. Tokens with native EdDSA wrapping
//! never take that path.
//!
//! # Binding check (callers MUST do this)
//! [`Hsm::unwrap_for_signing`] does not prove that the wrapped blob belongs to the stored public
//! key (this module has no curve arithmetic). Before caching an [`HsmKey`] the caller MUST sign a
//! fixed test message with it ([`Hsm::sign`]) and verify that signature against
//! `WrappedRef::public_key`; a blob swapped between two accounts fails that check.

mod config;
mod error;
mod generate;
mod inspect;
mod issuer;
mod kek;
mod pool;
mod sign;
mod token;
mod unwrap;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

pub use config::{HsmConfig, DEFAULT_KEK_LABEL_PREFIX};
pub use error::{ckr_name, HsmError};
pub use generate::WrappedKey;
pub use inspect::ObjectInfo;
pub use issuer::{issuer_label, IssuerAlg, IssuerKeyInfo, UnknownIssuerAlg, ISSUER_LABEL_PREFIX};
pub use sign::{flush_key_destroys, keys_reaped, HsmKey, REAPER_THREAD};
pub use token::{create_token, TokenInit};
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
    /// Whether the token wraps/unwraps Ed25519 private keys natively (learned on first use).
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
