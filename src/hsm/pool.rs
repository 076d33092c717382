//! The session pool: loads the module, finds the token by label, logs in once, lends one
//! session per call, repairs broken sessions and re-initialises the library after fatal errors.
//!
//! Every re-initialisation bumps `epoch`; every session re-creation bumps the generation of its
//! pool index. An `HsmKey` records (epoch, index, generation) of the session that created it, so
//! a key whose session objects died with a session is reported as `StaleKey` instead of being
//! used through a handle that may now name something else.

use std::sync::{Condvar, Mutex, MutexGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::config::HsmConfig;
use super::error::{breakage, map_err, rv_of, Breakage, HsmError};
use super::generate::probe_eddsa_native;
use super::kek::KekCache;
use super::{Hsm, Inner};

/// A session lent out of the pool, tagged with where it came from.
pub(crate) struct Pooled {
    pub(crate) session: Session,
    pub(crate) index: usize,
    pub(crate) gen: u64,
    pub(crate) epoch: u64,
}

struct Lib {
    ctx: Pkcs11,
    slot: Slot,
}

struct State {
    lib: Option<Lib>,
    needs_reinit: bool,
    idle: Vec<Pooled>,
    /// Pool indices with no open session (to open on demand).
    missing: Vec<usize>,
    gens: Vec<u64>,
    in_use: usize,
    epoch: u64,
}

pub(crate) struct Pool {
    module: std::path::PathBuf,
    pub(crate) label: String,
    pin: SecretString,
    size: usize,
    state: Mutex<State>,
    cv: Condvar,
    /// Longest wait for a free session, in milliseconds.
    acquire_timeout_ms: std::sync::atomic::AtomicU64,
    /// Waits that reached it.
    acquire_timeouts: std::sync::atomic::AtomicU64,
}

/// Default longest wait for a free session (`hsm.acquire_timeout_ms`).
pub const DEFAULT_ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Identity of the session that created a session object.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin {
    pub(crate) epoch: u64,
    pub(crate) index: usize,
    pub(crate) gen: u64,
}

/// Times [`Pool::open`] starts again after a token it did not find or could
/// not log in to for a reason other than the PIN.
const OPEN_RETRIES: u64 = 5;

impl Pool {
    /// Loads the module and starts the pool; a token not found or not usable
    /// is tried again [`OPEN_RETRIES`] times (after 0.1 s, 0.2 s, ...: 1.5 s in all).
    pub(crate) fn open(cfg: &HsmConfig) -> Result<Pool, HsmError> {
        if cfg.pool_size == 0 {
            return Err(HsmError::Unsupported {
                what: "pool_size must be >= 1".to_string(),
            });
        }
        let pool = Pool {
            module: cfg.module.clone(),
            label: cfg.token_label.clone(),
            pin: cfg.pin.clone(),
            size: cfg.pool_size,
            state: Mutex::new(State {
                lib: None,
                needs_reinit: false,
                idle: Vec::new(),
                missing: Vec::new(),
                gens: vec![0; cfg.pool_size],
                in_use: 0,
                epoch: 0,
            }),
            cv: Condvar::new(),
            acquire_timeout_ms: std::sync::atomic::AtomicU64::new(
                u64::try_from(DEFAULT_ACQUIRE_TIMEOUT.as_millis()).unwrap_or(u64::MAX),
            ),
            acquire_timeouts: std::sync::atomic::AtomicU64::new(0),
        };
        // A token another process is writing at this moment (SoftHSM
        // rewrites its token file at each login) can be missing from the
        // slot list read at C_Initialize, or fail the login with
        // CKR_GENERAL_ERROR: several replicas starting at once on one token
        // folder meet this. Start again from a fresh C_Initialize, a few
        // times, before giving up. PIN errors are never retried (a real HSM
        // counts them).
        for attempt in 1u64.. {
            let started = {
                let mut st = pool.lock();
                pool.start(&mut st, false)
            };
            match started {
                Ok(()) => break,
                Err(e @ (HsmError::TokenNotFound { .. } | HsmError::Unavailable { .. })) if attempt <= OPEN_RETRIES => {
                    if attempt == 1 {
                        tracing::warn!(token = %pool.label, error = %e, "token not usable yet; starting again (another process may be writing it)");
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100 * attempt));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(pool)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (we never panic mid-update).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn size(&self) -> usize {
        self.size
    }

    pub(crate) fn in_use(&self) -> usize {
        self.lock().in_use
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Load + initialise (if `reinit`, finalise the old library first), find the token,
    /// open all sessions, log in. Caller holds the lock and `in_use == 0`.
    fn start(&self, st: &mut State, reinit: bool) -> Result<(), HsmError> {
        st.idle.clear(); // no-close sessions: finalize closes them all
        st.missing.clear();
        if let Some(old) = st.lib.take() {
            if reinit {
                if let Err(e) = old.ctx.finalize() {
                    tracing::debug!(error = %e, "C_Finalize during re-initialisation failed");
                }
            }
        }
        st.epoch += 1;
        for g in st.gens.iter_mut() {
            *g += 1;
        }
        let ctx = Pkcs11::new(&self.module).map_err(|e| HsmError::ModuleLoad {
            path: self.module.display().to_string(),
            reason: e.to_string(),
        })?;
        let owned = match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) => true,
            Err(e) if rv_of(&e) == Some(RvError::CryptokiAlreadyInitialized) => {
                tracing::debug!("PKCS#11 module already initialised in this process");
                false
            }
            Err(e) => return Err(map_err("initialize", &e, &self.label)),
        };
        match self.open_sessions(&ctx, st.epoch, &st.gens) {
            Ok((slot, sessions)) => {
                st.idle = sessions;
                st.lib = Some(Lib { ctx, slot });
                st.needs_reinit = false;
                tracing::info!(token = %self.label, epoch = st.epoch, sessions = self.size, "PKCS#11 pool ready");
                Ok(())
            }
            Err(e) => {
                // Leave the library uninitialised so the next attempt starts from scratch
                // (SoftHSM re-reads its token directory only at C_Initialize).
                if owned {
                    if let Err(fe) = ctx.finalize() {
                        tracing::debug!(error = %fe, "C_Finalize after failed start failed");
                    }
                }
                Err(e)
            }
        }
    }

    /// Find the token and open (and log in) `size` read-write sessions.
    fn open_sessions(&self, ctx: &Pkcs11, epoch: u64, gens: &[u64]) -> Result<(Slot, Vec<Pooled>), HsmError> {
        let slot = self.find_slot(ctx)?;
        let mut sessions = Vec::with_capacity(self.size);
        for (index, gen) in gens.iter().copied().enumerate() {
            let session = ctx
                .open_rw_session_no_drop(slot)
                .map_err(|e| map_err("open_session", &e, &self.label))?;
            if index == 0 {
                self.login(&session)?;
            }
            sessions.push(Pooled {
                session,
                index,
                gen,
                epoch,
            });
        }
        Ok((slot, sessions))
    }

    fn find_slot(&self, ctx: &Pkcs11) -> Result<Slot, HsmError> {
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| map_err("get_slot_list", &e, &self.label))?;
        for slot in slots {
            match ctx.get_token_info(slot) {
                Ok(info) if info.label().trim_end() == self.label => return Ok(slot),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "C_GetTokenInfo failed on a slot"),
            }
        }
        Err(HsmError::TokenNotFound {
            label: self.label.clone(),
        })
    }

    /// Log the application in (once for all sessions); "already logged in" is success.
    pub(crate) fn login(&self, session: &Session) -> Result<(), HsmError> {
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) => Ok(()),
            Err(e) if rv_of(&e) == Some(RvError::UserAlreadyLoggedIn) => Ok(()),
            Err(e) => Err(map_err("login", &e, &self.label)),
        }
    }

    /// Waits on the pool's condition until `deadline`; past it, the wait
    /// failed: counted, and UNAVAILABLE for the caller.
    fn wait_until<'a>(
        &'a self,
        st: MutexGuard<'a, State>,
        deadline: std::time::Instant,
        op: &'static str,
    ) -> Result<MutexGuard<'a, State>, HsmError> {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            self.acquire_timeouts.fetch_add(1, Ordering::Relaxed);
            return Err(HsmError::Unavailable {
                op,
                rv: format!(
                    "no PKCS#11 session free within {} ms (hsm.pool_size {} sessions, all busy)",
                    self.acquire_timeout_ms.load(Ordering::Relaxed),
                    self.size
                ),
            });
        }
        let (st, _) = self.cv.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner());
        Ok(st)
    }

    /// Sets the longest wait for a free session.
    pub(crate) fn set_acquire_timeout(&self, timeout: std::time::Duration) {
        self.acquire_timeout_ms.store(
            u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Waits for a free session that reached the timeout.
    pub(crate) fn acquire_timeouts(&self) -> u64 {
        self.acquire_timeouts.load(Ordering::Relaxed)
    }

    /// Borrow a session, waiting if all are busy, at most the acquire
    /// timeout. Repairs the pool first if needed.
    fn acquire(&self, op: &'static str) -> Result<Pooled, HsmError> {
        let deadline = std::time::Instant::now()
            + std::time::Duration::from_millis(self.acquire_timeout_ms.load(Ordering::Relaxed));
        let mut st = self.lock();
        loop {
            if st.lib.is_none() || st.needs_reinit {
                if st.in_use == 0 {
                    st.needs_reinit = true;
                    match self.start(&mut st, true) {
                        Ok(()) => {}
                        Err(e) => {
                            self.cv.notify_all();
                            return Err(unavailable_from_start(op, e));
                        }
                    }
                    self.cv.notify_all();
                } else {
                    st = self.wait_until(st, deadline, op)?;
                    continue;
                }
            }
            if let Some(p) = st.idle.pop() {
                st.in_use += 1;
                return Ok(p);
            }
            if let Some(index) = st.missing.pop() {
                let opened = match &st.lib {
                    Some(lib) => lib.ctx.open_rw_session_no_drop(lib.slot),
                    None => {
                        st.missing.push(index);
                        continue;
                    }
                };
                match opened {
                    Ok(session) => {
                        st.in_use += 1;
                        return Ok(Pooled {
                            session,
                            index,
                            gen: st.gens[index],
                            epoch: st.epoch,
                        });
                    }
                    Err(e) => {
                        st.missing.push(index);
                        if breakage(&e) == Breakage::Library {
                            st.needs_reinit = true;
                        }
                        return Err(map_err("open_session", &e, &self.label));
                    }
                }
            }
            st = self.wait_until(st, deadline, op)?;
        }
    }

    fn release(&self, p: Pooled, broke: Breakage) {
        let mut st = self.lock();
        st.in_use = st.in_use.saturating_sub(1);
        if p.epoch != st.epoch {
            // Library was re-initialised under us: the handle means nothing now. Not closed
            // (no-close session), so it cannot close a new session that reuses its number.
            drop(p);
        } else {
            match broke {
                Breakage::None | Breakage::NotLoggedIn => st.idle.push(p),
                Breakage::Session => {
                    tracing::warn!(index = p.index, "PKCS#11 session broken; reopening");
                    if let Err(e) = p.session.close() {
                        tracing::debug!(error = %e, "closing broken session failed");
                    }
                    st.gens[p.index] += 1;
                    st.missing.push(p.index);
                }
                Breakage::Library => {
                    tracing::warn!("PKCS#11 library/device broken; re-initialising on next use");
                    st.needs_reinit = true;
                    drop(p);
                }
            }
        }
        self.cv.notify_all();
    }

    /// Re-initialise the library before the next call (invalidates every `HsmKey`).
    pub(crate) fn request_reinit(&self) {
        self.lock().needs_reinit = true;
    }

    /// Is a session object created by `origin` still alive?
    pub(crate) fn is_current(&self, origin: Origin) -> bool {
        let st = self.lock();
        !st.needs_reinit
            && st.lib.is_some()
            && st.epoch == origin.epoch
            && st.gens.get(origin.index) == Some(&origin.gen)
    }

    /// Run `f` on a pooled session. `f` returns its result and what the pool must do (see
    /// [`breakage`]). If `f` fails with `CKR_USER_NOT_LOGGED_IN`, or fails otherwise while the
    /// session turns out not to be logged in (SoftHSM then reports private objects as invalid
    /// handles), the application logs in again and `f` runs once more.
    pub(crate) fn with_session<T>(
        &self,
        op: &'static str,
        mut f: impl FnMut(&Pooled) -> (Result<T, HsmError>, Breakage),
    ) -> Result<T, HsmError> {
        let p = self.acquire(op)?;
        let (mut res, mut b) = f(&p);
        let relogin = match b {
            Breakage::NotLoggedIn => true,
            Breakage::None => res.is_err() && !logged_in(&p.session),
            Breakage::Session | Breakage::Library => false,
        };
        if relogin {
            tracing::warn!(op, "PKCS#11 application not logged in; logging in again");
            if let Err(e) = self.login(&p.session) {
                self.release(p, Breakage::None);
                return Err(e);
            }
            (res, b) = f(&p);
        }
        self.release(p, b);
        res
    }
}

/// Is the user logged in on this session? (Errors count as "yes": nothing to repair by login.)
fn logged_in(s: &Session) -> bool {
    match s.get_session_info() {
        Ok(info) => !matches!(info.session_state(), SessionState::RoPublic | SessionState::RwPublic),
        Err(_) => true,
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let mut st = self.lock();
        for p in st.idle.drain(..) {
            if let Err(e) = p.session.close() {
                tracing::debug!(error = %e, "closing session at shutdown failed");
            }
        }
        // The library is not finalised: another Hsm in this process may share it.
    }
}

fn unavailable_from_start(op: &'static str, e: HsmError) -> HsmError {
    match e {
        HsmError::TokenNotFound { .. } => HsmError::Unavailable {
            op,
            rv: "token not found at re-initialisation".to_string(),
        },
        HsmError::ModuleLoad { reason, .. } => HsmError::Unavailable { op, rv: reason },
        other => other,
    }
}

impl Hsm {
    /// Load the module, initialise it (`CKF_OS_LOCKING_OK`), find the token by label, open
    /// `pool_size` read-write sessions and log in once; probe whether the token wraps Ed25519
    /// keys natively. Existing KEKs are looked up (not created) and probed: in hsm custody a
    /// `<prefix>-v<N>` KEK that does not enforce its unwrap template is refused
    /// ([`HsmError::CustodyRefused`]) unless `allow_unenforced_kek`.
    pub fn open(cfg: &HsmConfig) -> Result<Hsm, HsmError> {
        let pool = Pool::open(cfg)?;
        let label = pool.label.clone();
        let native = pool.with_session("probe_eddsa", |p| match probe_eddsa_native(&p.session) {
            Ok(n) => (Ok(n), Breakage::None),
            Err(e) => (Err(map_err("probe_eddsa", &e, &label)), breakage(&e)),
        })?;
        if !native {
            tracing::info!("token cannot wrap Ed25519 keys natively: Ed25519 keys pass through host memory");
        }
        let hsm = Hsm {
            inner: Arc::new(Inner {
                pool,
                kek: Mutex::new(KekCache::default()),
                kek_dirty: AtomicBool::new(false),
                kek_prefix: cfg.kek_label_prefix.clone(),
                custody: cfg.custody,
                ed25519_native: AtomicBool::new(native),
                issuer: Default::default(),
            }),
        };
        hsm.load_keks()?;
        Ok(hsm)
    }

    /// Sessions currently lent out.
    pub fn pool_in_use(&self) -> usize {
        self.inner.pool.in_use()
    }

    /// Configured number of sessions.
    pub fn pool_size(&self) -> usize {
        self.inner.pool.size()
    }

    /// Sets the longest wait for a free session (`hsm.acquire_timeout_ms`);
    /// an operation that waits longer fails as UNAVAILABLE.
    pub fn set_acquire_timeout(&self, timeout: std::time::Duration) {
        self.inner.pool.set_acquire_timeout(timeout);
    }

    /// Waits for a free session that reached the timeout, since start.
    pub fn pool_wait_timeouts(&self) -> u64 {
        self.inner.pool.acquire_timeouts()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With every session lent out, an operation waits the acquire timeout,
    /// then fails as UNAVAILABLE naming the pool, and is counted; once a
    /// session is back, operations run again.
    #[test]
    fn waits_for_a_session_end_at_the_deadline() {
        let tok = crate::testkit::SoftHsmToken::new().expect("token");
        // nextest runs each test in its own process.
        std::env::set_var("SOFTHSM2_CONF", &tok.conf_path);
        let hsm = Hsm::open(&tok.hsm_config(1)).expect("open");
        hsm.ensure_kek().expect("KEK");
        hsm.set_acquire_timeout(std::time::Duration::from_millis(200));
        let held = hsm.inner.pool.acquire("test").expect("the one session");
        let started = std::time::Instant::now();
        let err = hsm
            .generate_wrapped(crate::types::KeyAlg::Ed25519)
            .expect_err("no session free");
        assert!(started.elapsed() >= std::time::Duration::from_millis(200));
        assert!(
            matches!(&err, HsmError::Unavailable { rv, .. } if rv.contains("no PKCS#11 session free")),
            "{err}"
        );
        assert_eq!(hsm.pool_wait_timeouts(), 1);
        hsm.inner.pool.release(held, Breakage::None);
        hsm.generate_wrapped(crate::types::KeyAlg::Ed25519)
            .expect("a session is free again");
        assert_eq!(hsm.pool_wait_timeouts(), 1);
    }
}
