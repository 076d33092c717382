//! Signing with an unwrapped session key, and the key's lifetime.

use std::fmt;

use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;

use super::error::{breakage, is_handle_invalid, map_err, Breakage, HsmError};
use super::generate::Curve;
use super::pool::Origin;
use super::Hsm;

/// A private key unwrapped into a pool session (custody "hsm"). Dropping it destroys the
/// session object (best effort). Not `Clone`: one owner destroys it.
pub struct HsmKey {
    hsm: Hsm,
    handle: ObjectHandle,
    alg: Curve,
    origin: Origin,
}

impl fmt::Debug for HsmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmKey")
            .field("alg", &self.alg)
            .field("epoch", &self.origin.epoch)
            .finish()
    }
}

impl HsmKey {
    pub(crate) fn new(hsm: Hsm, handle: ObjectHandle, alg: Curve, origin: Origin) -> Self {
        HsmKey {
            hsm,
            handle,
            alg,
            origin,
        }
    }

    /// The key's curve.
    pub fn curve(&self) -> Curve {
        self.alg
    }

    /// False once the pool was re-initialised or the creating session was lost.
    pub fn is_current(&self) -> bool {
        self.hsm.inner.pool.is_current(self.origin)
    }
}

impl Drop for HsmKey {
    /// Destroys the session object. On a Tokio runtime (a cache eviction, the
    /// end of a request) the blocking PKCS#11 call is handed to the reaper
    /// thread, never made on an async worker; elsewhere it is made here.
    fn drop(&mut self) {
        let job = Destroy {
            hsm: self.hsm.clone(),
            handle: self.handle,
            origin: self.origin,
        };
        if tokio::runtime::Handle::try_current().is_err() {
            job.run();
            return;
        }
        if let Err(std::sync::mpsc::SendError(Job::Destroy(job))) = reaper().send(Job::Destroy(job)) {
            job.run();
        }
    }
}

/// One unwrapped key to destroy.
struct Destroy {
    hsm: Hsm,
    handle: ObjectHandle,
    origin: Origin,
}

impl Destroy {
    fn run(self) {
        let pool = &self.hsm.inner.pool;
        if !pool.is_current(self.origin) {
            return; // its session (and so the object) is gone already
        }
        let (handle, origin) = (self.handle, self.origin);
        let res = pool.with_session("destroy_key", |p| {
            if p.epoch != origin.epoch || !pool.is_current(origin) {
                return (Ok(None), Breakage::None);
            }
            match p.session.destroy_object(handle) {
                Ok(()) => (Ok(None), Breakage::None),
                Err(e) => (Ok(Some(e.to_string())), breakage(&e)),
            }
        });
        match res {
            Ok(None) => {}
            Ok(Some(e)) => tracing::debug!(error = %e, "destroying unwrapped key failed"),
            Err(e) => tracing::debug!(error = %e, "destroying unwrapped key failed"),
        }
    }
}

enum Job {
    Destroy(Destroy),
    /// Answered once every job sent before it ran.
    Flush(std::sync::mpsc::SyncSender<()>),
}

/// Name of the thread that destroys keys dropped on a Tokio runtime.
pub const REAPER_THREAD: &str = "keyward-hsm-reaper";

static REAPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The reaper's queue; the thread starts on first use. If it cannot be
/// started, sends fail and keys are destroyed where they are dropped.
fn reaper() -> &'static std::sync::mpsc::Sender<Job> {
    static REAPER: std::sync::OnceLock<std::sync::mpsc::Sender<Job>> = std::sync::OnceLock::new();
    REAPER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new().name(REAPER_THREAD.into()).spawn(move || {
            for job in rx {
                match job {
                    Job::Destroy(d) => {
                        d.run();
                        REAPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Job::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the key reaper thread; keys are destroyed where dropped");
        }
        tx
    })
}

/// Waits (blocking) until every key handed to the reaper so far is
/// destroyed. Call it off async threads (e.g. in `spawn_blocking`).
pub fn flush_key_destroys() {
    let (done, wait) = std::sync::mpsc::sync_channel(1);
    if reaper().send(Job::Flush(done)).is_ok() {
        let _ = wait.recv();
    }
}

/// Unwrapped keys the reaper thread has destroyed so far.
pub fn keys_reaped() -> u64 {
    REAPED.load(std::sync::atomic::Ordering::Relaxed)
}

impl Hsm {
    /// Sign with an unwrapped key. secp256k1 and P-256: `CKM_ECDSA` over a 32-byte prehash, returns raw
    /// `r‖s` (64 bytes, NOT low-s normalised: the caller normalises and finds v). ed25519:
    /// `CKM_EDDSA` over the message, 64 bytes. A key from an older pool epoch gives `StaleKey`.
    pub fn sign(&self, key: &HsmKey, data: &[u8]) -> Result<Vec<u8>, HsmError> {
        const OP: &str = "sign";
        if !Hsm::same(&self.inner, &key.hsm.inner) {
            return Err(HsmError::StaleKey);
        }
        if key.alg != Curve::Ed25519 && data.len() != 32 {
            return Err(HsmError::Unsupported {
                what: format!("{} signing takes a 32-byte prehash, got {} bytes", key.alg, data.len()),
            });
        }
        let pool = &self.inner.pool;
        if !pool.is_current(key.origin) {
            return Err(HsmError::StaleKey);
        }
        let label = pool.label.clone();
        let mech = match key.alg {
            Curve::Secp256k1 | Curve::P256 => Mechanism::Ecdsa,
            Curve::Ed25519 => Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
        };
        let sig = pool.with_session(OP, |p| {
            if p.epoch != key.origin.epoch || !pool.is_current(key.origin) {
                return (Err(HsmError::StaleKey), Breakage::None);
            }
            match p.session.sign(&mech, key.handle, data) {
                Ok(sig) => (Ok(sig), Breakage::None),
                Err(e) if is_handle_invalid(&e) => (Err(HsmError::StaleKey), Breakage::None),
                Err(e) => (Err(map_err(OP, &e, &label)), breakage(&e)),
            }
        })?;
        if sig.len() != 64 {
            return Err(HsmError::Internal {
                op: OP,
                rv: format!("signature of {} bytes", sig.len()),
            });
        }
        Ok(sig)
    }

    fn same(a: &std::sync::Arc<super::Inner>, b: &std::sync::Arc<super::Inner>) -> bool {
        std::sync::Arc::ptr_eq(a, b)
    }
}
