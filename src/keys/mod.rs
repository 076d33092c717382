//! Account keys: creation (generated in the HSM, stored wrapped), and signing
//! in either custody mode through a bounded cache of unwrapped keys.
//!
//! Never writes a plaintext private key anywhere; host-custody key bytes live
//! only in the locked, non-dumpable arena (`locked.rs`) and zeroizing
//! buffers, and the stack of every thread that touched them is scrubbed
//! afterwards. Every unwrapped key is proven to belong to its account (its
//! signature must verify under the stored public key) before it is cached or
//! used.

mod cache;
mod error;
pub mod locked;
mod signer;
mod token_threads;

pub use cache::KeyCache;
pub use error::KeyError;
pub use locked::{harden_process, scrub_stack, LockedError, SecretArena};
pub use signer::{public_keys, AccountKeys};

/// Stack scrubbed after an unwrap (SoftHSM, OpenSSL and PKCS#8 frames run deep).
const SCRUB_AFTER_UNWRAP: usize = 128 * 1024;
/// Stack scrubbed after a host signature.
const SCRUB_AFTER_SIGN: usize = 16 * 1024;

use std::sync::Arc;
use std::time::Instant;

use crate::config::Custody;
use crate::crypto::eth::Address;
use crate::hsm::{Hsm, HsmError};
use crate::metrics::Metrics;
use crate::store::{AccountRecord, KeyRecord, Store};
use crate::types::KeyAlg;

use token_threads::TokenThreads;

/// The key version new accounts get.
pub const INITIAL_KEY_VERSION: u32 = 1;

/// What a new account is made from.
#[derive(Debug, Clone)]
pub struct NewAccount {
    /// The controlling wallet.
    pub controller: Address,
    /// Free-form label.
    pub label: Option<String>,
    /// The creating identity.
    pub created_by: String,
    /// Further identities allowed to have it sign.
    pub allowed: Vec<String>,
}

/// Generates and wraps one key of each algorithm. Not inlined: its frames
/// (an Ed25519 seed made on the host) must lie below the caller's
/// `scrub_stack`.
#[inline(never)]
fn generate_keys(hsm: &Hsm, metrics: &Metrics, key_version: u32) -> Result<Vec<KeyRecord>, HsmError> {
    let mut keys = Vec::with_capacity(KeyAlg::ALL.len());
    for alg in KeyAlg::ALL {
        let started = Instant::now();
        let w = hsm.generate_wrapped(alg);
        metrics.observe_hsm("generate_wrapped", started, w.is_ok());
        let w = w?;
        keys.push(KeyRecord {
            alg,
            public_key: w.public_key,
            wrapped: w.wrapped,
            kek_version: w.kek_version,
            key_version,
        });
    }
    Ok(keys)
}

/// Creates accounts and signs with their keys.
#[derive(Debug, Clone)]
pub struct KeyService {
    hsm: Hsm,
    store: Arc<dyn Store>,
    custody: Custody,
    cache: Arc<KeyCache>,
    metrics: Arc<Metrics>,
    arena: Arc<SecretArena>,
    /// One thread per HSM session runs hsm-custody signatures: a signature
    /// waits in their queue, as a task, for a thread (and so a session) to
    /// be free. `None` if not one could be started (logged; such
    /// signatures then fail).
    token_threads: Option<TokenThreads>,
}

impl KeyService {
    /// Wires the service. Host custody also makes the process non-dumpable
    /// (best effort here: the daemon's commands do it at start and fail if
    /// they cannot).
    pub fn new(
        hsm: Hsm,
        store: Arc<dyn Store>,
        custody: Custody,
        cache_capacity: usize,
        metrics: Arc<Metrics>,
    ) -> KeyService {
        if custody == Custody::Host {
            if let Err(e) = harden_process() {
                tracing::warn!(error = %e, "cannot make the process non-dumpable (PR_SET_DUMPABLE)");
            }
        }
        let token_threads = TokenThreads::start(hsm.pool_size().max(1))
            .inspect_err(|e| tracing::error!(error = %e, "cannot start the HSM signing threads"))
            .ok();
        KeyService {
            hsm,
            store,
            custody,
            cache: Arc::new(KeyCache::new(cache_capacity)),
            metrics,
            arena: SecretArena::new(),
            token_threads,
        }
    }

    /// The locked memory host-custody keys live in.
    pub fn arena(&self) -> &Arc<SecretArena> {
        &self.arena
    }

    /// The custody mode in force.
    pub fn custody(&self) -> Custody {
        self.custody
    }

    /// The HSM behind the service.
    pub fn hsm(&self) -> &Hsm {
        &self.hsm
    }

    /// The store behind the service.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Generates both keys in the HSM, wraps them under the current KEK and
    /// stores the account in one transaction.
    pub async fn create_account(&self, new: NewAccount) -> Result<AccountRecord, KeyError> {
        Ok(self.create_account_audited(new, None).await?.0)
    }

    /// As [`KeyService::create_account`]; `event` (the request's audit
    /// event) is given the new account's id and appended in the storing
    /// transaction: the seq it got, if one was given.
    pub async fn create_account_audited(
        &self,
        new: NewAccount,
        event: Option<crate::audit::NewEvent>,
    ) -> Result<(AccountRecord, Option<u64>), KeyError> {
        let wrapped = self.generate(INITIAL_KEY_VERSION).await?;
        self.store_new(new, wrapped, event).await
    }

    /// As [`KeyService::create_account_audited`], with the key of `alg` imported (sent to import
    /// job `job` as RSA-OAEP ciphertext of its 32 bytes, see [`Hsm::import_wrapped`]) and the
    /// other one generated. The job must have been taken in the store first.
    pub async fn import_account_audited(
        &self,
        new: NewAccount,
        job: String,
        alg: KeyAlg,
        ciphertext: Vec<u8>,
        event: Option<crate::audit::NewEvent>,
    ) -> Result<(AccountRecord, Option<u64>), KeyError> {
        let hsm = self.hsm.clone();
        let imported = tokio::task::spawn_blocking(crate::telemetry::in_span("hsm.import_wrapped", move || {
            let out = hsm.import_wrapped(&job, alg, &ciphertext);
            // The imported key's bytes were on this thread's stack.
            scrub_stack::<SCRUB_AFTER_UNWRAP>();
            out
        }))
        .await
        .map_err(|_| KeyError::Internal("import task failed"))??;
        let mut keys = self.generate(INITIAL_KEY_VERSION).await?;
        for k in keys.iter_mut().filter(|k| k.alg == alg) {
            k.public_key.clone_from(&imported.public_key);
            k.wrapped.clone_from(&imported.wrapped);
            k.kek_version = imported.kek_version;
        }
        self.store_new(new, keys, event).await
    }

    /// Stores a new account with `keys` and its audit event, in one transaction.
    async fn store_new(
        &self,
        new: NewAccount,
        wrapped: Vec<KeyRecord>,
        event: Option<crate::audit::NewEvent>,
    ) -> Result<(AccountRecord, Option<u64>), KeyError> {
        let mut allowed = new.allowed;
        allowed.sort();
        allowed.dedup();
        let record = AccountRecord {
            id: uuid::Uuid::new_v4().to_string(),
            label: new.label,
            controller: new.controller.to_checksum(),
            created_by: new.created_by,
            created_at: crate::clock::unix_now(),
            allowed,
            keys: wrapped,
            frozen: None,
            deleted_at: None,
        };
        // Check the public keys decode before anything is stored.
        signer::public_keys(&record)?;
        let event = event.map(|mut e| {
            e.account.clone_from(&record.id);
            e
        });
        let seq = self.store.create_account_audited(&record, event.as_ref()).await?;
        Ok((record, seq))
    }

    /// Generates one key of each algorithm in the HSM, wrapped under the current KEK, as
    /// version `key_version` of an account's keys.
    pub async fn generate(&self, key_version: u32) -> Result<Vec<KeyRecord>, KeyError> {
        let hsm = self.hsm.clone();
        let metrics = self.metrics.clone();
        Ok(tokio::task::spawn_blocking(crate::telemetry::in_span(
            "hsm.generate_wrapped",
            move || -> Result<Vec<KeyRecord>, HsmError> {
                let out = generate_keys(&hsm, &metrics, key_version);
                // An Ed25519 seed made on the host (tokens without native EdDSA wrapping) was on
                // this thread's stack.
                scrub_stack::<SCRUB_AFTER_UNWRAP>();
                out
            },
        ))
        .await
        .map_err(|_| KeyError::Internal("key generation task failed"))??)
    }

    /// The account's record without unwrapping keys.
    pub async fn record(&self, id: &str) -> Result<Arc<AccountRecord>, KeyError> {
        if let Some(keys) = self.cache.get(id) {
            return Ok(keys.shared_record());
        }
        self.store
            .get_account(id)
            .await?
            .map(Arc::new)
            .ok_or_else(|| KeyError::AccountNotFound(id.to_string()))
    }

    /// The account with its keys ready to sign (cached).
    pub async fn account(&self, id: &str) -> Result<Arc<AccountKeys>, KeyError> {
        if let Some(keys) = self.cache.get(id) {
            return Ok(keys);
        }
        let mark = self.cache.mark();
        let record = self
            .store
            .get_account(id)
            .await?
            .ok_or_else(|| KeyError::AccountNotFound(id.to_string()))?;
        if let Some(at) = record.deleted_at {
            return Err(KeyError::Deleted {
                account: id.to_string(),
                at,
            });
        }
        let hsm = self.hsm.clone();
        let custody = self.custody;
        let metrics = self.metrics.clone();
        let arena = self.arena.clone();
        let keys = tokio::task::spawn_blocking(crate::telemetry::in_span("hsm.unwrap", move || {
            let started = Instant::now();
            let out = AccountKeys::unwrap(&hsm, custody, &arena, record);
            scrub_stack::<SCRUB_AFTER_UNWRAP>();
            metrics.observe_hsm("unwrap", started, out.is_ok());
            out
        }))
        .await
        .map_err(|_| KeyError::Internal("unwrap task failed"))??;
        Ok(self.cache.insert_since(Arc::new(keys), Some(mark)))
    }

    /// Signs a 32-byte Ethereum digest (EIP-712 or EIP-191) with the
    /// account's secp256k1 key: r‖s‖v, low-s, v ∈ {27, 28}.
    pub async fn sign_eth_digest(&self, id: &str, digest: [u8; 32]) -> Result<(Arc<AccountKeys>, [u8; 65]), KeyError> {
        self.with_retry(id, move |keys, hsm, metrics| {
            keys.sign_eth_digest(hsm, metrics, &digest)
        })
        .await
    }

    /// Signs a caller's raw message with the account's Ed25519 key, always
    /// as [`crate::crypto::message::ed25519_message`] (prefixed), so that it
    /// can never verify as one of the account's JWS.
    pub async fn sign_ed25519_message(&self, id: &str, data: &[u8]) -> Result<(Arc<AccountKeys>, [u8; 64]), KeyError> {
        let msg = crate::crypto::message::ed25519_message(data);
        self.with_retry(id, move |keys, hsm, metrics| keys.sign_ed25519(hsm, metrics, &msg))
            .await
    }

    /// Signs a JWS signing input (an attestation) with the account's Ed25519
    /// key. Only an encoded header and payload can be passed here.
    pub async fn sign_ed25519_jws(
        &self,
        id: &str,
        input: crate::crypto::message::JwsSigningInput,
    ) -> Result<(Arc<AccountKeys>, [u8; 64]), KeyError> {
        self.with_retry(id, move |keys, hsm, metrics| {
            keys.sign_ed25519(hsm, metrics, input.as_bytes())
        })
        .await
    }

    /// ES256K over a SHA-256 prehash with the account's secp256k1 key: raw
    /// r‖s (64 bytes), low-s. Both custody modes.
    pub async fn sign_es256k_prehash(
        &self,
        id: &str,
        prehash: [u8; 32],
    ) -> Result<(Arc<AccountKeys>, [u8; 64]), KeyError> {
        self.with_retry(id, move |keys, hsm, metrics| {
            keys.sign_es256k_prehash(hsm, metrics, &prehash)
        })
        .await
    }

    async fn with_retry<T, F>(&self, id: &str, op: F) -> Result<(Arc<AccountKeys>, T), KeyError>
    where
        T: Send + 'static,
        F: Fn(&AccountKeys, &Hsm, &Metrics) -> Result<T, KeyError> + Send + Sync + 'static,
    {
        let op = Arc::new(op);
        for attempt in 0..2 {
            let keys = self.account(id).await?;
            if let Some(at) = keys.record().deleted_at {
                return Err(KeyError::Deleted {
                    account: id.to_string(),
                    at,
                });
            }
            if let Some(f) = &keys.record().frozen {
                return Err(KeyError::Frozen {
                    account: id.to_string(),
                    since: f.at,
                });
            }
            let result = if keys.signs_on_host() {
                let r = tracing::debug_span!("sign", otel.name = "host.sign")
                    .in_scope(|| op(&keys, &self.hsm, &self.metrics));
                scrub_stack::<SCRUB_AFTER_SIGN>();
                r
            } else {
                let hsm = self.hsm.clone();
                let metrics = self.metrics.clone();
                let k = keys.clone();
                let op = op.clone();
                let threads = self
                    .token_threads
                    .as_ref()
                    .ok_or(KeyError::Internal("no HSM signing threads"))?;
                // Queued, the job starts nothing if the request is dropped;
                // once a thread takes it, it runs to its end, whoever waits.
                threads
                    .run(crate::telemetry::in_span("hsm.sign", move || op(&k, &hsm, &metrics)))
                    .await
                    .map_err(|_| KeyError::Internal("signing task failed"))?
            };
            match result {
                Ok(v) => return Ok((keys, v)),
                // The HSM was re-initialised and forgot the unwrapped handle:
                // drop it and unwrap again, once.
                Err(KeyError::Hsm(HsmError::StaleKey)) if attempt == 0 => {
                    self.cache.remove(id);
                }
                Err(e) => return Err(e),
            }
        }
        Err(KeyError::Hsm(HsmError::StaleKey))
    }

    /// Drops an account from the cache (its record changed): the next request reads it anew.
    pub fn evict(&self, id: &str) {
        self.cache.remove(id);
    }

    /// Destroys every unwrapped key (at shutdown).
    pub fn clear_cache(&self) {
        self.cache.clear();
    }

    /// How many accounts have keys ready.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }
}
