//! Token creation for `keyward init --init-token`: `C_InitToken` on a slot whose token is not
//! initialised yet, then `C_InitPIN` as the security officer. Both PINs travel only through this
//! process's memory (never a command line: `softhsm2-util --init-token` takes them on argv).
//!
//! Must never re-initialise a token that already carries the label: `C_InitToken` on an
//! initialised token erases every object on it, KEKs included. A token with the label is left
//! alone; if a previous run stopped between `C_InitToken` and `C_InitPIN`, only the user PIN is
//! set.
//!
//! [`CustodyReport`] is what `keyward init` and `keyward dev` print about custody.

use std::fmt;
use std::path::Path;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::session::UserType;
use cryptoki::slot::Slot;
use secrecy::SecretString;

use super::error::{map_err, rv_of, HsmError};
use super::kek::KekKind;
use super::Hsm;
use crate::config::Custody;

/// What [`create_token`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenInit {
    /// A new token was initialised and its user PIN set.
    Created,
    /// A token with this label existed with its user PIN set: nothing changed.
    Existed,
    /// A token with this label existed without a user PIN: the user PIN was set.
    PinSet,
}

/// Creates the token `label` on the module at `module` unless it exists; sets its user PIN.
pub fn create_token(
    module: &Path,
    label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<TokenInit, HsmError> {
    let (ctx, owned) = own_context(module, label)?;
    let result = find_or_create(&ctx, label, so_pin, user_pin);
    // Finalise what we initialised, so the session pool opened next starts from a fresh
    // C_Initialize (SoftHSM reads its token directory only then).
    if owned {
        if let Err(e) = ctx.finalize() {
            tracing::debug!(error = %e, "C_Finalize after token initialisation failed");
        }
    }
    result
}

/// A PKCS#11 context of this process's own for a one-off step (token creation, the key
/// ceremony), and whether this call initialised it (then the caller finalises it, so a session
/// pool opened next starts from a fresh `C_Initialize`).
pub(crate) fn own_context(module: &Path, label: &str) -> Result<(Pkcs11, bool), HsmError> {
    let ctx = Pkcs11::new(module).map_err(|e| HsmError::ModuleLoad {
        path: module.display().to_string(),
        reason: e.to_string(),
    })?;
    let owned = match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => true,
        Err(e) if rv_of(&e) == Some(RvError::CryptokiAlreadyInitialized) => false,
        Err(e) => return Err(map_err("initialize", &e, label)),
    };
    Ok((ctx, owned))
}

fn find_or_create(
    ctx: &Pkcs11,
    label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<TokenInit, HsmError> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| map_err("get_slot_list", &e, label))?;
    let mut free = None;
    for slot in slots {
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| map_err("get_token_info", &e, label))?;
        if !info.token_initialized() {
            free = free.or(Some(slot));
        } else if info.label().trim_end() == label {
            if info.user_pin_initialized() {
                return Ok(TokenInit::Existed);
            }
            set_user_pin(ctx, slot, label, so_pin, user_pin)?;
            return Ok(TokenInit::PinSet);
        }
    }
    let slot = free.ok_or_else(|| HsmError::Unsupported {
        what: format!(
            "no slot holds an uninitialised token in which to create {label:?} \
             (SoftHSM: is directories.tokendir writable?)"
        ),
    })?;
    ctx.init_token(slot, so_pin, label)
        .map_err(|e| map_err("init_token", &e, label))?;
    set_user_pin(ctx, slot, label, so_pin, user_pin)?;
    Ok(TokenInit::Created)
}

fn set_user_pin(
    ctx: &Pkcs11,
    slot: Slot,
    label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<(), HsmError> {
    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| map_err("open_session", &e, label))?;
    session
        .login(UserType::So, Some(so_pin))
        .map_err(|e| map_err("login_so", &e, label))?;
    session.init_pin(user_pin).map_err(|e| map_err("init_pin", &e, label))?;
    session.logout().map_err(|e| map_err("logout", &e, label))
}

/// [`create_token`] for a first run (`keyward dev`): the token is made, or
/// finished if a previous run stopped half-way; an existing one is kept.
pub fn init_token(module: &Path, label: &str, so_pin: &SecretString, user_pin: &SecretString) -> Result<(), HsmError> {
    create_token(module, label, so_pin, user_pin).map(|_| ())
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
