//! Token creation for `keyward init --init-token`: `C_InitToken` on a slot whose token is not
//! initialised yet, then `C_InitPIN` as the security officer. Both PINs travel only through this
//! process's memory (never a command line: `softhsm2-util --init-token` takes them on argv).
//!
//! Must never re-initialise a token that already carries the label: `C_InitToken` on an
//! initialised token erases every object on it, KEKs included. A token with the label is left
//! alone; if a previous run stopped between `C_InitToken` and `C_InitPIN`, only the user PIN is
//! set.

use std::path::Path;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::session::UserType;
use cryptoki::slot::Slot;
use secrecy::SecretString;

use super::error::{map_err, rv_of, HsmError};

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
    let ctx = Pkcs11::new(module).map_err(|e| HsmError::ModuleLoad {
        path: module.display().to_string(),
        reason: e.to_string(),
    })?;
    let owned = match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => true,
        Err(e) if rv_of(&e) == Some(RvError::CryptokiAlreadyInitialized) => false,
        Err(e) => return Err(map_err("initialize", &e, label)),
    };
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
