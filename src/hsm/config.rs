//! Configuration of the HSM connection.

use std::fmt;
use std::path::PathBuf;

use secrecy::SecretString;

use crate::config::Custody;

/// Default label prefix of key-encryption keys (`<prefix>-v<N>`).
pub const DEFAULT_KEK_LABEL_PREFIX: &str = "keyward-kek";

/// How to reach the token. `Debug` never shows the PIN.
#[derive(Clone)]
pub struct HsmConfig {
    /// Path of the PKCS#11 module (`.so`).
    pub module: PathBuf,
    /// Label of the token (the slot is found by this label, never by number).
    pub token_label: String,
    /// User PIN.
    pub pin: SecretString,
    /// Number of sessions in the pool (>= 1).
    pub pool_size: usize,
    /// Label prefix of the KEKs, default [`DEFAULT_KEK_LABEL_PREFIX`].
    pub kek_label_prefix: String,
    /// What the daemon promises about account keys, and so which KEKs it uses.
    pub custody: CustodyPolicy,
}

/// Custody mode and the two switches that weaken or tighten it (see the README's custody
/// section). `Default`: hsm custody, nothing weakened, Ed25519 through host memory allowed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CustodyPolicy {
    /// hsm: keys are unwrapped into the token, sensitive and non-extractable, under a KEK
    /// whose CKA_UNWRAP_TEMPLATE enforces that; host: keys are decrypted into host memory.
    pub mode: Custody,
    /// hsm custody only: run even if a KEK does not enforce its unwrap template (the token
    /// cannot, or the KEK predates it). Whoever holds the PIN can then read the keys it wraps.
    pub allow_unenforced_kek: bool,
    /// hsm custody only: refuse Ed25519 account keys on tokens that cannot unwrap EdDSA keys
    /// natively (SoftHSM 2.6.1), where the Ed25519 seed passes through host memory.
    pub refuse_host_ed25519: bool,
}

impl HsmConfig {
    /// A config with the default KEK label prefix.
    pub fn new(
        module: impl Into<PathBuf>,
        token_label: impl Into<String>,
        pin: SecretString,
        pool_size: usize,
    ) -> Self {
        HsmConfig {
            module: module.into(),
            token_label: token_label.into(),
            pin,
            pool_size,
            kek_label_prefix: DEFAULT_KEK_LABEL_PREFIX.to_string(),
            custody: CustodyPolicy::default(),
        }
    }

    /// The same config in another custody mode (nothing weakened).
    pub fn with_custody(mut self, mode: Custody) -> Self {
        self.custody.mode = mode;
        self
    }
}

impl fmt::Debug for HsmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmConfig")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin", &"<redacted>")
            .field("pool_size", &self.pool_size)
            .field("kek_label_prefix", &self.kek_label_prefix)
            .field("custody", &self.custody)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_pin() {
        let c = HsmConfig::new("/x.so", "tok", SecretString::from("hunter2-pin"), 2);
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("redacted"));
    }
}
