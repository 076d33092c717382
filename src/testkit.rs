//! Test helpers: a throw-away SoftHSM2 token in a temp directory.
//!
//! SoftHSM reads `SOFTHSM2_CONF` once, at `C_Initialize`. This kit never sets the variable in
//! the current process (that would race other threads): a test must call
//! `std::env::set_var("SOFTHSM2_CONF", &tok.conf_path)` itself before `Hsm::open`, and run in
//! its own process (cargo-nextest does that: one process per test).

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use secrecy::SecretString;

use crate::hsm::HsmConfig;

/// A freshly initialised SoftHSM2 token; its directory is removed on drop.
pub struct SoftHsmToken {
    /// Temp dir holding `softhsm2.conf` and `tokens/`.
    pub dir: tempfile::TempDir,
    /// Path of the generated `softhsm2.conf`.
    pub conf_path: PathBuf,
    /// Unique token label.
    pub label: String,
    /// User PIN.
    pub pin: String,
    /// Security-officer PIN.
    pub so_pin: String,
}

const CANDIDATE_MODULES: [&str; 2] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
];

impl SoftHsmToken {
    /// Create the temp dir and config and initialise a token with a unique label.
    ///
    /// `SOFTHSM2_CONF` is set for the `softhsm2-util` child only, never for this process: set it
    /// yourself (`std::env::set_var("SOFTHSM2_CONF", &tok.conf_path)`) before `Hsm::open`.
    pub fn new() -> io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("keyward-softhsm").tempdir()?;
        let tokens = dir.path().join("tokens");
        std::fs::create_dir_all(&tokens)?;
        let conf_path = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf_path,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let label = format!("kw-{}", &id[..12]);
        let pin = format!("user-{}", &id[12..20]);
        let so_pin = format!("so-{}", &id[20..28]);
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf_path)
            .args([
                "--init-token",
                "--free",
                "--label",
                &label,
                "--pin",
                &pin,
                "--so-pin",
                &so_pin,
            ])
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "softhsm2-util --init-token failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(SoftHsmToken {
            dir,
            conf_path,
            label,
            pin,
            so_pin,
        })
    }

    /// The token directory (`<dir>/tokens`).
    pub fn token_dir(&self) -> PathBuf {
        self.dir.path().join("tokens")
    }

    /// A config for this token with the default KEK prefix.
    pub fn hsm_config(&self, pool_size: usize) -> HsmConfig {
        HsmConfig::new(
            Self::module_path(),
            self.label.clone(),
            SecretString::from(self.pin.clone()),
            pool_size,
        )
    }

    /// `KEYWARD_PKCS11_MODULE` if set, else the first SoftHSM2 module found in the usual places.
    pub fn module_path() -> PathBuf {
        if let Some(p) = std::env::var_os("KEYWARD_PKCS11_MODULE") {
            return PathBuf::from(p);
        }
        CANDIDATE_MODULES
            .iter()
            .map(Path::new)
            .find(|p| p.exists())
            .unwrap_or(Path::new(CANDIDATE_MODULES[0]))
            .to_path_buf()
    }
}
