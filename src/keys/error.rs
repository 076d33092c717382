//! Errors of the key layer.

use crate::crypto::eth::EthError;
use crate::hsm::HsmError;
use crate::store::StoreError;
use crate::types::KeyAlg;

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// No such account.
    #[error("account {0} not found")]
    AccountNotFound(String),
    /// The unwrapped key is not the account's key (a blob moved between rows).
    #[error("account {account}: the stored {alg} key does not match its public key; refusing to sign")]
    Binding {
        /// The account.
        account: String,
        /// Which key.
        alg: KeyAlg,
    },
    /// The account has no key of this algorithm, or it does not decode.
    #[error("account {account}: no usable {alg} key")]
    MissingKey {
        /// The account.
        account: String,
        /// Which key.
        alg: KeyAlg,
    },
    /// The account is frozen: it signs nothing until it is unfrozen.
    #[error("account {account} is frozen (since {since}); it signs nothing until an operator unfreezes it")]
    Frozen {
        /// The account.
        account: String,
        /// Since when, unix seconds.
        since: i64,
    },
    /// The account was deleted: its private keys no longer exist.
    #[error("account {account} was deleted (at {at}); its keys were destroyed")]
    Deleted {
        /// The account.
        account: String,
        /// When, unix seconds.
        at: i64,
    },
    /// A change the account's state refuses (a controller change pending, a document used).
    #[error("{0}")]
    Conflict(String),
    /// No controller change is pending on the account.
    #[error("no controller change of account {0} is pending")]
    NoPendingChange(String),
    /// The HSM failed.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A signature did not check out.
    #[error("signature check failed: {0}")]
    Signature(#[from] EthError),
    /// Host-custody key memory could not be locked.
    #[error(transparent)]
    Locked(#[from] super::locked::LockedError),
    /// A bug or a panicked task.
    #[error("internal error: {0}")]
    Internal(&'static str),
}
