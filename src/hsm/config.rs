//! Configuration of the HSM connection.

use std::fmt;
use std::path::PathBuf;

use secrecy::SecretString;

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
        }
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
