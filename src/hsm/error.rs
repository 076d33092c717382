//! Errors of the HSM layer and the single place where PKCS#11 return values are mapped.
//!
//! # CKR_* to [`HsmError`]
//!
//! | CKR_* (as reported by the token)                                                   | HsmError        | pool action            |
//! |------------------------------------------------------------------------------------|-----------------|------------------------|
//! | (library cannot be loaded / has no `C_GetFunctionList`)                             | `ModuleLoad`    | -                      |
//! | no slot whose token label matches                                                  | `TokenNotFound` | -                      |
//! | `CKR_PIN_INCORRECT`, `CKR_PIN_INVALID`, `CKR_PIN_LEN_RANGE`                        | `PinIncorrect`  | -                      |
//! | `CKR_PIN_LOCKED`, `CKR_PIN_EXPIRED`                                                | `PinLocked`     | -                      |
//! | `CKR_SESSION_HANDLE_INVALID`, `CKR_SESSION_CLOSED`                                 | `Unavailable`   | recreate that session  |
//! | `CKR_TOKEN_NOT_PRESENT`, `CKR_TOKEN_NOT_RECOGNIZED`, `CKR_DEVICE_REMOVED`, `CKR_DEVICE_ERROR`, `CKR_GENERAL_ERROR`, `CKR_CRYPTOKI_NOT_INITIALIZED` | `Unavailable` | re-initialise the library (epoch bump) |
//! | `CKR_DEVICE_MEMORY`, `CKR_FUNCTION_FAILED`                                         | `Unavailable`   | -                      |
//! | `CKR_OBJECT_HANDLE_INVALID`, `CKR_KEY_HANDLE_INVALID`, `CKR_(UN)WRAPPING_KEY_HANDLE_INVALID` on a token object (the KEK) | `Unavailable` | KEK cache reloaded next call |
//! | `CKR_OBJECT_HANDLE_INVALID`, `CKR_KEY_HANDLE_INVALID` on an unwrapped session key (`HsmKey`) | `StaleKey` | -                  |
//! | `CKR_USER_NOT_LOGGED_IN`                                                           | (log in again, retry once; if it persists `Unavailable`) | - |
//! | `CKR_USER_ALREADY_LOGGED_IN` at login                                              | success         | -                      |
//! | at `C_UnwrapKey`: `CKR_WRAPPED_KEY_INVALID`, `CKR_WRAPPED_KEY_LEN_RANGE`, `CKR_ENCRYPTED_DATA_INVALID`, `CKR_ENCRYPTED_DATA_LEN_RANGE`, `CKR_FUNCTION_FAILED`, `CKR_TEMPLATE_INCONSISTENT`, `CKR_ATTRIBUTE_VALUE_INVALID`, `CKR_DOMAIN_PARAMS_INVALID`, `CKR_CURVE_NOT_SUPPORTED`; or an unwrapped key of the wrong type/curve | `KeyMismatch` | - |
//! | at `C_UnwrapKey`: `CKR_GENERAL_ERROR` (SoftHSM's answer to a corrupted blob or wrong KEK) | `KeyMismatch` if a probe (`C_GetSessionInfo` + reading the KEK's class) succeeds, else the probe's error per this table | - |
//! | a KEK version seen earlier is no longer found on the token                        | `Unavailable`   | re-initialise          |
//! | `CKR_MECHANISM_INVALID`, `CKR_MECHANISM_PARAM_INVALID`, `CKR_CURVE_NOT_SUPPORTED`, `CKR_FUNCTION_NOT_SUPPORTED`, `CKR_DOMAIN_PARAMS_INVALID` | `Unsupported` | - |
//! | anything else                                                                      | `Internal`      | -                      |
//!
//! Measured on SoftHSM 2.6.1:
//! * wrong PIN: `CKR_PIN_INCORRECT` at `C_Login` -> `PinIncorrect`;
//! * unknown label: no CKR at all (no slot's `C_GetTokenInfo` label matches) -> `TokenNotFound`;
//! * token directory deleted while open: the in-memory token stays "present"; the next use of the
//!   KEK fails with `CKR_WRAPPING_KEY_HANDLE_INVALID` (`C_WrapKey`) /
//!   `CKR_UNWRAPPING_KEY_HANDLE_INVALID` (`C_UnwrapKey`) -> `Unavailable`; the KEK cache reload
//!   then finds the KEK gone -> `Unavailable` + re-initialisation, whose `C_Initialize` fails with
//!   `CKR_GENERAL_ERROR` while the directory is missing (-> `Unavailable`); once it is back, the
//!   next call re-initialises and works, and older `HsmKey`s answer `StaleKey`;
//! * corrupted blob / wrong KEK: `CKR_GENERAL_ERROR` at `C_UnwrapKey` (see probe above);
//! * Ed25519: `C_WrapKey` gives `CKR_KEY_NOT_WRAPPABLE`, `C_UnwrapKey` `CKR_FUNCTION_FAILED`
//!   (no EdDSA key wrapping in 2.6.1; see `generate.rs` / `unwrap.rs` for the PKCS#8 carrier).
//!
//! No error carries the PIN: errors hold only the token label, the operation name and the CKR name.

use cryptoki::error::{Error as CkError, RvError};

/// An error of the HSM layer. Every variant is safe to log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// The PKCS#11 module could not be loaded.
    #[error("cannot load PKCS#11 module {path}: {reason}")]
    ModuleLoad {
        /// Path of the module.
        path: String,
        /// Loader message.
        reason: String,
    },
    /// No slot holds a token with this label.
    #[error("no PKCS#11 token labelled {label:?}")]
    TokenNotFound {
        /// Configured token label.
        label: String,
    },
    /// The user PIN was rejected.
    #[error("PIN rejected by token {label:?}")]
    PinIncorrect {
        /// Token label.
        label: String,
    },
    /// The user PIN is locked (too many wrong attempts) or expired.
    #[error("user PIN of token {label:?} is locked")]
    PinLocked {
        /// Token label.
        label: String,
    },
    /// Device, session or token trouble; retry later (the pool repairs itself).
    #[error("HSM unavailable during {op}: {rv}")]
    Unavailable {
        /// Operation that failed.
        op: &'static str,
        /// CKR name.
        rv: String,
    },
    /// No KEK of this version on the token (0: `ensure_kek` was never called).
    #[error("key-encryption key version {version} not found on the token")]
    KekMissing {
        /// KEK version asked for.
        version: u32,
    },
    /// The wrapped blob does not belong to this KEK / algorithm / public key.
    #[error("wrapped key does not match: {reason}")]
    KeyMismatch {
        /// What did not match.
        reason: String,
    },
    /// The `HsmKey` was created before a pool re-initialisation or session loss: unwrap again.
    #[error("HSM key handle is stale (pool was re-initialised); unwrap again")]
    StaleKey,
    /// The token (or this layer) does not support what was asked.
    #[error("unsupported: {what}")]
    Unsupported {
        /// What is not supported.
        what: String,
    },
    /// An import job's transport key is not on this token.
    #[error("import job {job}: its transport key is not on this token (used, expired, or made on another token)")]
    TransportKeyNotFound {
        /// The job.
        job: String,
    },
    /// An imported key was refused.
    #[error("import refused: {reason}")]
    ImportRefused {
        /// Why.
        reason: String,
    },
    /// No issuer key with this label in the cache (run `issuer_keys` / `keyward init`).
    #[error("no issuer key labelled {label:?} on the token")]
    IssuerKeyNotFound {
        /// Issuer key label.
        label: String,
    },
    /// The caller's kid for a new issuer key was refused (the new pair was destroyed).
    #[error("issuer key id refused: {reason}")]
    InvalidIssuerKid {
        /// Why.
        reason: String,
    },
    /// The custody settings refuse this: a key whose KEK cannot keep it inside the token in
    /// hsm custody, an hsm-custody key asked for in host custody, Ed25519 through host memory
    /// with `hsm.refuse_host_ed25519`, or a KEK that does not enforce its unwrap template.
    #[error("refused by custody: {reason}")]
    CustodyRefused {
        /// What was refused and why, and what the operator can do.
        reason: String,
    },
    /// Anything else: a bug or an unexpected token answer.
    #[error("internal HSM error during {op}: {rv}")]
    Internal {
        /// Operation that failed.
        op: &'static str,
        /// CKR name or short description.
        rv: String,
    },
}

/// What the pool must do after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Breakage {
    /// Nothing: the error is about the request.
    None,
    /// The session is gone: close it and open a new one.
    Session,
    /// The library or device is broken: finalize and re-initialise (bumps the epoch).
    Library,
    /// `CKR_USER_NOT_LOGGED_IN`: log in again and retry once.
    NotLoggedIn,
}

/// The return value inside a cryptoki error, if it carries one.
pub(crate) fn rv_of(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// How bad an error is for the pool.
pub(crate) fn breakage(e: &CkError) -> Breakage {
    match rv_of(e) {
        Some(RvError::SessionHandleInvalid | RvError::SessionClosed) => Breakage::Session,
        Some(RvError::UserNotLoggedIn) => Breakage::NotLoggedIn,
        Some(
            RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::GeneralError
            | RvError::CryptokiNotInitialized,
        ) => Breakage::Library,
        _ => Breakage::None,
    }
}

/// True for "this object handle is not valid (any more)".
pub(crate) fn is_handle_invalid(e: &CkError) -> bool {
    matches!(
        rv_of(e),
        Some(
            RvError::ObjectHandleInvalid
                | RvError::KeyHandleInvalid
                | RvError::WrappingKeyHandleInvalid
                | RvError::UnwrappingKeyHandleInvalid
        )
    )
}

/// The CKR_* name of a return value, e.g. `CKR_PIN_INCORRECT`.
pub fn ckr_name(rv: RvError) -> String {
    match rv {
        RvError::VendorDefined(v) => format!("CKR_VENDOR_DEFINED(0x{v:x})"),
        RvError::UnknownErrorCode(v) => format!("CKR_UNKNOWN(0x{v:x})"),
        other => {
            let camel = format!("{other:?}");
            let mut out = String::from("CKR");
            for c in camel.chars() {
                if c.is_ascii_uppercase() {
                    out.push('_');
                }
                out.push(c.to_ascii_uppercase());
            }
            out
        }
    }
}

/// Short name of a cryptoki error for `rv` fields (never contains secrets).
pub(crate) fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, _) => ckr_name(*rv),
        CkError::LibraryLoading(_) => "library loading failed".to_string(),
        CkError::NullFunctionPointer => "null function pointer".to_string(),
        CkError::MissingSymbol(s) => format!("missing symbol {s}"),
        CkError::NotSupported => "not supported by cryptoki".to_string(),
        CkError::PinNotSet => "PIN not set".to_string(),
        _ => "conversion error".to_string(),
    }
}

/// Map a cryptoki error per the table above. `label` is the token label (for PIN errors).
/// Handle-invalid errors map to `Unavailable` here (token objects); callers working with
/// session keys map them to [`HsmError::StaleKey`] themselves.
pub(crate) fn map_err(op: &'static str, e: &CkError, label: &str) -> HsmError {
    let rv = describe(e);
    match rv_of(e) {
        Some(RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange) => HsmError::PinIncorrect {
            label: label.to_string(),
        },
        Some(RvError::PinLocked | RvError::PinExpired) => HsmError::PinLocked {
            label: label.to_string(),
        },
        Some(
            RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::GeneralError
            | RvError::CryptokiNotInitialized
            | RvError::DeviceMemory
            | RvError::FunctionFailed
            | RvError::UserNotLoggedIn
            | RvError::ObjectHandleInvalid
            | RvError::KeyHandleInvalid
            | RvError::WrappingKeyHandleInvalid
            | RvError::UnwrappingKeyHandleInvalid,
        ) => HsmError::Unavailable { op, rv },
        Some(
            RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange
            | RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange,
        ) => HsmError::KeyMismatch {
            reason: format!("{op}: {rv}"),
        },
        Some(
            RvError::MechanismInvalid
            | RvError::MechanismParamInvalid
            | RvError::CurveNotSupported
            | RvError::FunctionNotSupported
            | RvError::DomainParamsInvalid,
        ) => HsmError::Unsupported {
            what: format!("{op}: {rv}"),
        },
        _ => HsmError::Internal { op, rv },
    }
}

/// Failure inside a multi-step session closure: a raw cryptoki error (mapped later, and fed
/// to the pool) or an already-decided `HsmError`.
pub(crate) enum Fail {
    Ck(CkError),
    Hsm(HsmError),
}

impl From<CkError> for Fail {
    fn from(e: CkError) -> Self {
        Fail::Ck(e)
    }
}

impl From<HsmError> for Fail {
    fn from(e: HsmError) -> Self {
        Fail::Hsm(e)
    }
}

impl Fail {
    /// The breakage this failure means for the pool.
    pub(crate) fn breakage(&self) -> Breakage {
        match self {
            Fail::Ck(e) => breakage(e),
            Fail::Hsm(_) => Breakage::None,
        }
    }

    /// True if the KEK handle may be bad (reload the cache).
    pub(crate) fn kek_suspect(&self) -> bool {
        match self {
            Fail::Ck(e) => is_handle_invalid(e) || breakage(e) != Breakage::None,
            Fail::Hsm(_) => false,
        }
    }
}

/// Turn a closure result into what `Pool::with_session` wants.
pub(crate) fn settle<T>(r: Result<T, Fail>, op: &'static str, label: &str) -> (Result<T, HsmError>, Breakage) {
    match r {
        Ok(v) => (Ok(v), Breakage::None),
        Err(f) => {
            let b = f.breakage();
            let e = match f {
                Fail::Ck(e) => map_err(op, &e, label),
                Fail::Hsm(e) => e,
            };
            (Err(e), b)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ckr_names() {
        assert_eq!(ckr_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(ckr_name(RvError::SessionHandleInvalid), "CKR_SESSION_HANDLE_INVALID");
        assert_eq!(ckr_name(RvError::GeneralError), "CKR_GENERAL_ERROR");
    }

    #[test]
    fn table() {
        let e = CkError::Pkcs11(RvError::PinLocked, cryptoki::context::Function::Login);
        assert!(matches!(map_err("login", &e, "t"), HsmError::PinLocked { .. }));
        let e = CkError::Pkcs11(RvError::DeviceRemoved, cryptoki::context::Function::Sign);
        assert!(matches!(map_err("sign", &e, "t"), HsmError::Unavailable { .. }));
        assert_eq!(breakage(&e), Breakage::Library);
        let e = CkError::Pkcs11(RvError::ArgumentsBad, cryptoki::context::Function::Sign);
        assert!(matches!(map_err("sign", &e, "t"), HsmError::Internal { .. }));
    }
}
