//! Token set-up and what a token does for custody.
//!
//! [`init_token`] initialises a token through cryptoki (C_InitToken, then C_InitPIN as the
//! security officer) so that no PIN ever appears on a command line: `softhsm2-util` takes PINs
//! only as arguments (visible to every user in /proc/PID/cmdline) or from an interactive prompt.
//! [`CustodyReport`] is what `keyward init` and `keyward dev` print.

use std::fmt;
use std::path::Path;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::session::UserType;
use secrecy::SecretString;

use super::error::{map_err, rv_of, HsmError};
use super::kek::KekKind;
use super::Hsm;
use crate::config::Custody;

/// Initialise the first free token slot of `module` with `label`, the security-officer PIN and
/// the user PIN. For SoftHSM, `SOFTHSM2_CONF` must name the token directory before this runs
/// (SoftHSM reads it at C_Initialize). The library is finalised again if this call initialised
/// it, so a later [`Hsm::open`] sees the new token.
pub fn init_token(module: &Path, label: &str, so_pin: &SecretString, user_pin: &SecretString) -> Result<(), HsmError> {
    const OP: &str = "init_token";
    let ctx = Pkcs11::new(module).map_err(|e| HsmError::ModuleLoad {
        path: module.display().to_string(),
        reason: e.to_string(),
    })?;
    let owned = match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => true,
        Err(e) if rv_of(&e) == Some(RvError::CryptokiAlreadyInitialized) => false,
        Err(e) => return Err(map_err(OP, &e, label)),
    };
    let result = init_in(&ctx, label, so_pin, user_pin);
    if owned {
        if let Err(e) = ctx.finalize() {
            tracing::debug!(error = %e, "C_Finalize after token initialisation failed");
        }
    }
    result
}

fn init_in(ctx: &Pkcs11, label: &str, so_pin: &SecretString, user_pin: &SecretString) -> Result<(), HsmError> {
    const OP: &str = "init_token";
    let err = |e: cryptoki::error::Error| map_err(OP, &e, label);
    let mut free = None;
    for slot in ctx.get_slots_with_token().map_err(err)? {
        let info = ctx.get_token_info(slot).map_err(err)?;
        if info.token_initialized() {
            if info.label().trim_end() == label {
                return Err(HsmError::Unsupported {
                    what: format!("a token labelled {label:?} exists already"),
                });
            }
        } else if free.is_none() {
            free = Some(slot);
        }
    }
    let slot = free.ok_or_else(|| HsmError::Unsupported {
        what: "no free token slot to initialise".to_string(),
    })?;
    ctx.init_token(slot, so_pin, label).map_err(err)?;
    let session = ctx.open_rw_session(slot).map_err(err)?;
    session.login(UserType::So, Some(so_pin)).map_err(err)?;
    session.init_pin(user_pin).map_err(err)?;
    session.logout().map_err(err)?;
    Ok(())
}

/// What the token does for the configured custody: printed by `keyward init` and `dev`.
#[derive(Debug, Clone)]
pub struct CustodyReport {
    /// The custody mode.
    pub mode: Custody,
    /// KEKs on the token: (version, label, kind).
    pub keks: Vec<(u32, String, KekKind)>,
    /// Whether the token wraps and unwraps Ed25519 keys itself.
    pub ed25519_native: bool,
    /// `hsm.refuse_host_ed25519`.
    pub refuse_host_ed25519: bool,
}

impl Hsm {
    /// The custody report of this token and configuration.
    pub fn custody_report(&self) -> CustodyReport {
        CustodyReport {
            mode: self.inner.custody.mode,
            keks: self.keks(),
            ed25519_native: !self.ed25519_via_host(),
            refuse_host_ed25519: self.inner.custody.refuse_host_ed25519,
        }
    }
}

impl CustodyReport {
    fn labels(&self, pick: impl Fn(KekKind) -> bool) -> String {
        let l: Vec<&str> = self
            .keks
            .iter()
            .filter(|(_, _, k)| pick(*k))
            .map(|(_, l, _)| l.as_str())
            .collect();
        if l.is_empty() {
            "none yet".to_string()
        } else {
            l.join(", ")
        }
    }
}

impl fmt::Display for CustodyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.mode {
            Custody::Hsm => {
                writeln!(
                    f,
                    "custody      hsm: secp256k1 account keys are unwrapped only inside the token, as \
                     sensitive, non-extractable session keys, under KEKs whose unwrap template the \
                     token enforces ({})",
                    self.labels(|k| k == KekKind::Sealed)
                )?;
                let unenforced = self.labels(|k| k == KekKind::Unenforced);
                if unenforced != "none yet" {
                    writeln!(
                        f,
                        "  WARNING    KEKs without an enforced unwrap template ({unenforced}): whoever holds \
                         the PIN can read the keys they wrap (hsm.allow_unenforced_kek = true)"
                    )?;
                }
            }
            Custody::Host => writeln!(
                f,
                "custody      host: account keys are decrypted into locked, non-dumpable host memory \
                 and sign in software; host KEKs ({}) have no unwrap template",
                self.labels(|k| k != KekKind::Sealed)
            )?,
        }
        if self.ed25519_native {
            writeln!(
                f,
                "ed25519      the token wraps and unwraps Ed25519 keys itself: they get the same custody as secp256k1"
            )
        } else if self.mode == Custody::Hsm && self.refuse_host_ed25519 {
            writeln!(
                f,
                "ed25519      REFUSED: this token cannot wrap or unwrap Ed25519 keys (SoftHSM 2.6.1), so \
                 creating accounts and Ed25519 signing answer FAILED_PRECONDITION \
                 (hsm.refuse_host_ed25519 = true)"
            )
        } else {
            writeln!(
                f,
                "ed25519      this token cannot wrap or unwrap Ed25519 keys (SoftHSM 2.6.1): each Ed25519 \
                 account key's 32-byte seed passes through host memory (zeroized after use) when it is \
                 created and every time it is unwrapped, and is wrapped under a host KEK ({}), so \
                 whoever holds the PIN can read it; set hsm.refuse_host_ed25519 = true to refuse that",
                self.labels(|k| k != KekKind::Sealed)
            )
        }
    }
}
