//! Issuer key lifecycle and the published JWKS.
//!
//! Per algorithm: `next` (published, not yet signing) → `active` (the one key that signs) →
//! `retired` (published, verifies old signatures) → removed from the store and destroyed on the
//! token after the grace period. `revoked` keys leave the JWKS at once.
//!
//! The invariant protected: no signature ever carries a kid that was absent from a JWKS fetched
//! within `max_age_seconds` before. Hence a `next` key is promoted (scheduled or on demand) only
//! once it has been published for at least `max_age_seconds`, and `max_age_seconds` is shorter
//! than the pre-publication window, so a scheduled rotation never waits. Replicas refresh their
//! view of the store on every scheduler tick (`tick_seconds`, which should be well below
//! `max_age_seconds`) and after each lifecycle change they make.
//!
//! State lives in the store; every change is one transaction there (PostgreSQL: under an
//! advisory lock, only tried by the scheduler so exactly one replica rotates; SQLite: the single
//! writer), and a partial unique index allows one active key per algorithm whatever races.
//! Token keys are created before their row is stored; a row that loses a race has its token key
//! destroyed again. Rows are deleted before their token key is destroyed, so a crash in between
//! leaves an unpublished orphan object on the token, never a published key without a private key.
//!
//! Every change the scheduler makes ([`KeyLifecycle::tick`]: a key created, promoted, retired,
//! removed) appends its audit event (identity `keyward`, see [`crate::audit::event`]) in the
//! store transaction that makes it; an on-demand rotation appends the request's one event in the
//! transaction that promotes the next keys of every algorithm rotated.
//!
//! The only exception to pre-publication is bootstrap (the very first key of an algorithm
//! signs at once: no verifier can have fetched anything yet) and revocation: see
//! [`KeyLifecycle::revoke`].

pub mod history;

use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tonic::Status;

use crate::audit::event::{
    daemon_event, ISSUER_KEY_PUBLISHED, ISSUER_KEY_REMOVED, ISSUER_KEY_RETIRED, SCHEDULED_ROTATION,
};
use crate::clock::Clock;
use crate::config::JwksConfig;
use crate::hsm::{Hsm, HsmError, IssuerAlg};
use crate::issuer::{create_token_key, create_wrapped_key, jwk_for, Issuer, IssuerError};
use crate::store::{IssuerKeyRecord, IssuerKeyState, PromoteAudit, PromoteOutcome, RevokeOutcome, Store, StoreError};

/// Lifecycle settings, in seconds.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// Algorithms that have an active key.
    pub algorithms: Vec<IssuerAlg>,
    /// How long an active key signs before the scheduled rotation.
    pub rotation: i64,
    /// How long before the rotation the next key is published.
    pub prepublish: i64,
    /// How long a retired key stays published.
    pub grace: i64,
    /// `Cache-Control: max-age` of the JWKS, and the least time a next key is published before
    /// it may sign.
    pub max_age: i64,
    /// Scheduler period.
    pub tick: Duration,
}

impl JwksSettings {
    /// From the (validated) `[jwks]` section.
    pub fn from_config(c: &JwksConfig) -> JwksSettings {
        let secs = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        JwksSettings {
            algorithms: c
                .algorithms
                .iter()
                .filter_map(|a| IssuerAlg::from_str(a).ok())
                .collect(),
            rotation: secs(c.rotation_days).saturating_mul(86_400),
            prepublish: secs(c.prepublish_hours).saturating_mul(3600),
            grace: secs(c.grace_days).saturating_mul(86_400),
            max_age: secs(c.max_age_seconds),
            tick: Duration::from_secs(c.tick_seconds.max(1)),
        }
    }
}

/// Why a lifecycle operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The issuer ring or the HSM failed.
    #[error(transparent)]
    Issuer(#[from] IssuerError),
    /// The algorithm is not one of `jwks.algorithms`.
    #[error("alg: {0:?} is not a configured issuer algorithm")]
    NotConfigured(String),
    /// The next key has not been published for `max_age_seconds` yet.
    #[error(
        "{alg} next key {kid} has been published for less than max-age; it can be promoted at {ready_at} \
         (unix seconds, in {in_secs} s)"
    )]
    TooEarly {
        /// Algorithm.
        alg: IssuerAlg,
        /// The next key.
        kid: String,
        /// When it can be promoted.
        ready_at: i64,
        /// Seconds from now.
        in_secs: i64,
    },
    /// No key has this kid.
    #[error("no issuer key with kid {0:?}")]
    KeyNotFound(String),
    /// Another writer (a replica's scheduler or rotation) changed the keys
    /// between this request's check and its transaction; nothing changed.
    #[error("another replica changed the issuer keys at the same moment; nothing was rotated here: list the keys, then retry if still needed")]
    Busy,
    /// A stored issuer key history row does not decode.
    #[error("issuer key history: {0}")]
    History(String),
    /// A bug.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// A served document with its strong ETag.
fn document(body: String, max_age: i64) -> JwksDocument {
    let etag = format!("\"{}\"", hex::encode(Sha256::digest(body.as_bytes())));
    JwksDocument { body, etag, max_age }
}

/// The gRPC status of a lifecycle error (used by `api::error`).
pub fn status(e: &JwksError, msg: String) -> Status {
    match e {
        JwksError::NotConfigured(_) => Status::invalid_argument(msg),
        JwksError::TooEarly { .. } => Status::failed_precondition(msg),
        JwksError::KeyNotFound(_) => Status::not_found(msg),
        JwksError::Busy => Status::aborted(msg),
        JwksError::Store(StoreError::Unavailable { .. }) => Status::unavailable(msg),
        JwksError::Issuer(IssuerError::Hsm(h)) if !matches!(h, HsmError::Internal { .. }) => Status::unavailable(msg),
        _ => Status::internal(msg),
    }
}

/// What one scheduler run changed (kids).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Keys created (as `next`, or `active` at bootstrap).
    pub created: Vec<String>,
    /// Keys promoted to `active`.
    pub promoted: Vec<String>,
    /// Retired keys removed after the grace period (and destroyed on the token).
    pub removed: Vec<String>,
}

/// One on-demand rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// Algorithm.
    pub alg: IssuerAlg,
    /// The key now active.
    pub activated: String,
    /// The key retired, if there was an active key.
    pub retired: Option<String>,
    /// The fresh next key, if one was created.
    pub next: Option<String>,
}

/// The published key set as served: body and strong ETag.
#[derive(Debug, Clone)]
pub struct JwksDocument {
    /// `{"keys":[...]}`.
    pub body: String,
    /// `"<sha256 of body, hex>"`, quotes included.
    pub etag: String,
    /// `Cache-Control: max-age`.
    pub max_age: i64,
}

/// The issuer key lifecycle over the store, the token and the issuer ring.
#[derive(Debug)]
pub struct KeyLifecycle {
    store: Arc<dyn Store>,
    hsm: Hsm,
    issuer: Arc<Issuer>,
    clock: Arc<dyn Clock>,
    settings: JwksSettings,
    /// Serialises this process's lifecycle changes (the store arbitrates between processes).
    serial: tokio::sync::Mutex<()>,
    /// The issuer key history as served (reloaded with the ring).
    history: RwLock<Arc<JwksDocument>>,
    /// What the ring was last loaded from ([`fingerprint`]): the watch reloads when the store
    /// differs.
    loaded: std::sync::Mutex<Vec<KeyMark>>,
}

/// How often each replica compares the stored issuer keys with the ring it serves: a
/// rotation or revocation made by another replica reaches it within this, whatever
/// `jwks.tick_seconds` is.
pub const WATCH: std::time::Duration = std::time::Duration::from_secs(1);

/// What of a stored key the ring depends on: kid, state, KEK version and blob.
type KeyMark = (String, IssuerKeyState, Option<u32>, Option<Vec<u8>>);

fn fingerprint(records: &[IssuerKeyRecord]) -> Vec<KeyMark> {
    records
        .iter()
        .map(|r| (r.kid.clone(), r.state, r.kek_version, r.wrapped.clone()))
        .collect()
}

async fn blocking<T, F>(f: F) -> Result<T, JwksError>
where
    F: FnOnce() -> Result<T, JwksError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| JwksError::Internal("blocking task failed"))?
}

fn alg_of(rec: &IssuerKeyRecord) -> Option<IssuerAlg> {
    IssuerAlg::from_str(&rec.alg).ok()
}

impl KeyLifecycle {
    /// Makes sure every configured algorithm has an active and a next key (adopting a token key
    /// the store does not know yet, from before the store tracked them, as active), then loads
    /// the issuer ring from the store.
    pub async fn start(
        store: Arc<dyn Store>,
        hsm: Hsm,
        clock: Arc<dyn Clock>,
        settings: JwksSettings,
    ) -> Result<KeyLifecycle, JwksError> {
        let now = clock.now();
        let mut records = store.list_issuer_keys().await?;
        // A stored key this custody no longer admits (e.g. `hsm.refuse_host_ed25519` turned
        // on after EdDSA keys were wrapped through host memory) can never sign here: retire it
        // (it stays published and verifies what it signed), so new keys are made below.
        let mut retired_any = false;
        for rec in records
            .iter()
            .filter(|r| r.wrapped.is_some() && matches!(r.state, IssuerKeyState::Next | IssuerKeyState::Active))
        {
            let (h, r) = (hsm.clone(), rec.clone());
            let refused = match blocking(move || Ok(Issuer::check_stored(&h, &r))).await? {
                Err(IssuerError::Hsm(HsmError::CustodyRefused { reason })) => reason,
                _ => continue,
            };
            tracing::warn!(alg = %rec.alg, kid = %rec.kid, reason = %refused,
                "stored issuer key refused by this custody: retired, a new one is made");
            let event = daemon_event(ISSUER_KEY_RETIRED, format!("kid:{}", rec.kid));
            retired_any |= store.retire_issuer_key_audited(&rec.kid, now, &event).await?;
        }
        if retired_any {
            records = store.list_issuer_keys().await?;
        }
        let adopt = {
            let hsm = hsm.clone();
            let known: Vec<String> = records.iter().map(|r| r.label.clone()).collect();
            blocking(move || {
                let mut infos = hsm.issuer_keys().map_err(IssuerError::from)?;
                infos.retain(|i| !known.contains(&i.label));
                Ok(infos)
            })
            .await?
        };
        for &alg in &settings.algorithms {
            let has_active = records
                .iter()
                .any(|r| r.alg == alg.as_str() && r.state == IssuerKeyState::Active);
            if has_active {
                continue;
            }
            if let Some(info) = adopt.iter().find(|i| i.alg == alg) {
                let jwk = jwk_for(alg, &info.public_key).map_err(|source| IssuerError::BadPublicKey {
                    label: info.label.clone(),
                    source,
                })?;
                let rec = record(alg, &info.label, &jwk, IssuerKeyState::Active, now)?;
                let event = daemon_event(ISSUER_KEY_PUBLISHED, format!("kid:{}", rec.kid));
                if store.add_issuer_key_audited(&rec, Some(&event)).await?.0 {
                    tracing::info!(alg = %alg, kid = %rec.kid, "adopted token issuer key as active");
                }
            }
        }
        let issuer = Arc::new(Issuer::empty(&hsm));
        let lc = KeyLifecycle {
            store,
            hsm,
            issuer,
            clock,
            settings,
            serial: tokio::sync::Mutex::new(()),
            history: RwLock::new(Arc::new(document(r#"{"keys":[]}"#.into(), 0))),
            loaded: std::sync::Mutex::new(Vec::new()),
        };
        {
            let _g = lc.serial.lock().await;
            for alg in lc.settings.algorithms.clone() {
                lc.ensure_alg(alg, now, &mut Vec::new()).await?;
            }
        }
        lc.refresh().await?;
        lc.issuer.active(IssuerAlg::EdDSA)?;
        Ok(lc)
    }

    /// The issuer ring this lifecycle keeps current.
    pub fn issuer(&self) -> &Arc<Issuer> {
        &self.issuer
    }

    /// The settings.
    pub fn settings(&self) -> &JwksSettings {
        &self.settings
    }

    /// The daemon's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Every stored key (revoked ones included).
    pub async fn list(&self) -> Result<Vec<IssuerKeyRecord>, JwksError> {
        Ok(self.store.list_issuer_keys().await?)
    }

    /// The published key set with its ETag.
    pub fn document(&self) -> JwksDocument {
        let body = serde_json::to_string(&self.issuer.jwks()).unwrap_or_else(|_| r#"{"keys":[]}"#.into());
        document(body, self.settings.max_age)
    }

    /// The issuer key history as last loaded ([`history`]), with its ETag.
    pub fn history_document(&self) -> Arc<JwksDocument> {
        match self.history.read() {
            Ok(h) => h.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The issuer key history, read from the store now.
    pub async fn history(&self) -> Result<history::KeyHistory, JwksError> {
        let records = self.store.issuer_key_history().await?;
        history::KeyHistory::from_records(&records).map_err(|e| JwksError::History(e.to_string()))
    }

    /// Reloads the ring and the history from the store.
    pub async fn refresh(&self) -> Result<(), JwksError> {
        let records = self.store.list_issuer_keys().await?;
        let mark = fingerprint(&records);
        let issuer = self.issuer.clone();
        blocking(move || Ok(issuer.refresh(&records)?)).await?;
        *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) = mark;
        let body = serde_json::to_string(&self.history().await?)
            .map_err(|_| JwksError::Internal("issuer key history does not encode"))?;
        let doc = Arc::new(document(body, self.settings.max_age));
        match self.history.write() {
            Ok(mut h) => *h = doc,
            Err(poisoned) => *poisoned.into_inner() = doc,
        }
        Ok(())
    }

    /// Creates a token key and stores it in `state` unless another writer stored one first (the
    /// token key is then destroyed). Returns the kid stored. The daemon's audit event for it
    /// (`IssuerKeyPublished`, `kid:<kid>`) is appended in the storing transaction, whoever
    /// asked (first start, the scheduler, or a rotation or revocation a request made).
    async fn add(&self, alg: IssuerAlg, state: IssuerKeyState, now: i64) -> Result<Option<String>, JwksError> {
        let hsm = self.hsm.clone();
        let made = blocking(move || match create_wrapped_key(&hsm, alg) {
            Ok((jwk, w)) => Ok((jwk, Some(w), None)),
            // hsm custody with `refuse_host_ed25519` on a token that cannot wrap EdDSA keys
            // itself: an EdDSA key would pass through host memory to be wrapped, so it is made
            // as a token object instead, as before issuer keys were stored (it does not survive
            // the token; the README's key ceremony says so).
            Err(IssuerError::Hsm(HsmError::CustodyRefused { reason })) => {
                tracing::warn!(alg = %alg, reason = %reason,
                    "issuer key cannot be wrapped in this custody; made as a token object that no KEK backup holds");
                let (info, jwk) = create_token_key(&hsm, alg)?;
                Ok((jwk, None, Some(info.label)))
            }
            Err(e) => Err(e.into()),
        })
        .await?;
        let (jwk, wrapped, token_label) = made;
        let label = token_label
            .clone()
            .unwrap_or_else(|| crate::hsm::issuer_label(alg, &jwk.kid));
        let mut rec = record(alg, &label, &jwk, state, now)?;
        if let Some(w) = wrapped {
            rec.wrapped = Some(w.wrapped);
            rec.kek_version = Some(w.kek_version);
        }
        let event = daemon_event(ISSUER_KEY_PUBLISHED, format!("kid:{}", rec.kid));
        if self.store.add_issuer_key_audited(&rec, Some(&event)).await?.0 {
            tracing::info!(alg = %alg, kid = %rec.kid, state = state.as_str(), stored = rec.wrapped.is_some(),
                "issuer key published");
            Ok(Some(rec.kid))
        } else {
            if let Some(label) = token_label {
                self.destroy(label).await;
            }
            Ok(None)
        }
    }

    /// Destroys a token key, logging failures (the key is no longer published).
    async fn destroy(&self, label: String) {
        let hsm = self.hsm.clone();
        let l = label.clone();
        match tokio::task::spawn_blocking(move || hsm.destroy_issuer_key(&l)).await {
            Ok(Ok(())) | Ok(Err(HsmError::IssuerKeyNotFound { .. })) => {}
            Ok(Err(e)) => tracing::warn!(label = %label, error = %e, "could not destroy issuer key on the token"),
            Err(_) => tracing::warn!(label = %label, "issuer key destroy task failed"),
        }
    }

    /// Makes sure `alg` has an active key (bootstrap, or after revoking the last key) and a
    /// next key.
    async fn ensure_alg(&self, alg: IssuerAlg, now: i64, created: &mut Vec<String>) -> Result<(), JwksError> {
        let rows: Vec<IssuerKeyRecord> = self
            .store
            .list_issuer_keys()
            .await?
            .into_iter()
            .filter(|r| alg_of(r) == Some(alg))
            .collect();
        if !rows.iter().any(|r| r.state == IssuerKeyState::Active) {
            created.extend(self.add(alg, IssuerKeyState::Active, now).await?);
        }
        if !rows.iter().any(|r| r.state == IssuerKeyState::Next) {
            created.extend(self.add(alg, IssuerKeyState::Next, now).await?);
        }
        Ok(())
    }

    /// One scheduler run at `now`: per configured algorithm, publish a next key once the active
    /// key is within the pre-publication window of its rotation time, promote it when the
    /// rotation is due; then remove (and destroy on the token) retired keys past their grace
    /// period, and refresh the ring. Idempotent; replicas may run it concurrently. Each change
    /// appends its audit event in its own transaction (see [`crate::audit::event`]).
    pub async fn tick(&self, now: i64) -> Result<TickReport, JwksError> {
        let _g = self.serial.lock().await;
        let mut report = TickReport::default();
        let s = &self.settings;
        for &alg in &s.algorithms {
            let rows: Vec<IssuerKeyRecord> = self
                .store
                .list_issuer_keys()
                .await?
                .into_iter()
                .filter(|r| alg_of(r) == Some(alg))
                .collect();
            let Some(active) = rows.iter().find(|r| r.state == IssuerKeyState::Active) else {
                // Bootstrap (or every key revoked): sign at once.
                self.ensure_alg(alg, now, &mut report.created).await?;
                continue;
            };
            let due = active
                .activated_at
                .unwrap_or(active.created_at)
                .saturating_add(s.rotation);
            if !rows.iter().any(|r| r.state == IssuerKeyState::Next) && now >= due.saturating_sub(s.prepublish) {
                report.created.extend(self.add(alg, IssuerKeyState::Next, now).await?);
            }
            if now >= due {
                let audit = PromoteAudit {
                    promoted: daemon_event(SCHEDULED_ROTATION, String::new()),
                    retired: Some(daemon_event(ISSUER_KEY_RETIRED, String::new())),
                };
                let (mut outcomes, _) = self
                    .store
                    .promote_issuer_keys_audited(
                        &[alg.as_str()],
                        now,
                        s.max_age,
                        Some(now.saturating_sub(s.rotation)),
                        Some(&audit),
                    )
                    .await?;
                match outcomes
                    .pop()
                    .ok_or(JwksError::Internal("promotion answered nothing"))?
                {
                    PromoteOutcome::Promoted { kid, retired } => {
                        tracing::info!(alg = %alg, kid = %kid, retired = ?retired, "scheduled issuer key rotation");
                        report.promoted.push(kid);
                    }
                    PromoteOutcome::TooEarly { kid, ready_at } => {
                        tracing::info!(alg = %alg, kid = %kid, ready_at, "rotation due; next key not published long enough yet");
                    }
                    other => tracing::debug!(alg = %alg, outcome = ?other, "scheduled rotation skipped"),
                }
            }
        }
        for rec in self.store.list_issuer_keys().await? {
            let expired = rec.state == IssuerKeyState::Retired
                && rec.retired_at.unwrap_or(rec.created_at).saturating_add(s.grace) <= now;
            if !expired {
                continue;
            }
            let event = daemon_event(ISSUER_KEY_REMOVED, format!("kid:{}", rec.kid));
            if self.store.delete_issuer_key_audited(&rec.kid, Some(&event)).await?.0 {
                tracing::info!(alg = %rec.alg, kid = %rec.kid, "retired issuer key removed after the grace period");
                if rec.kek_version.is_none() {
                    self.destroy(rec.label.clone()).await;
                }
                report.removed.push(rec.kid);
            }
        }
        self.refresh().await?;
        Ok(report)
    }

    /// On-demand rotation of `alg` (every configured algorithm if `None`): the next key becomes
    /// active (the active key retires) only if it has been published for at least
    /// `max_age_seconds` (else [`JwksError::TooEarly`], saying when it can be, and nothing
    /// changes); every algorithm is promoted in one transaction, with the request's audit event
    /// (all or nothing); then a fresh next key is published. Algorithms without a next key get one and
    /// the call fails with `TooEarly`.
    pub async fn rotate(&self, alg: Option<IssuerAlg>) -> Result<Vec<Rotation>, JwksError> {
        let algs = match alg {
            Some(a) if !self.settings.algorithms.contains(&a) => {
                return Err(JwksError::NotConfigured(a.as_str().into()))
            }
            Some(a) => vec![a],
            None => self.settings.algorithms.clone(),
        };
        let _g = self.serial.lock().await;
        let now = self.clock.now();
        // Check every algorithm first, so a refusal changes nothing.
        let rows = self.store.list_issuer_keys().await?;
        for &a in &algs {
            let next = rows
                .iter()
                .filter(|r| alg_of(r) == Some(a) && r.state == IssuerKeyState::Next)
                .min_by_key(|r| (r.created_at, r.kid.clone()));
            let (kid, ready_at) = match next {
                Some(n) => (n.kid.clone(), n.created_at.saturating_add(self.settings.max_age)),
                None => {
                    let kid = self.add(a, IssuerKeyState::Next, now).await?.unwrap_or_default();
                    self.refresh().await?;
                    (kid, now.saturating_add(self.settings.max_age))
                }
            };
            if ready_at > now {
                return Err(JwksError::TooEarly {
                    alg: a,
                    kid,
                    ready_at,
                    in_secs: ready_at - now,
                });
            }
        }
        // One transaction promotes every algorithm and appends the request's
        // one audit event (`kid:` and the new active kids).
        let audit = crate::audit::context::in_transaction(String::new(), String::new()).map(|promoted| PromoteAudit {
            promoted,
            retired: None,
        });
        let names: Vec<&str> = algs.iter().map(|a| a.as_str()).collect();
        let (outcomes, seq) = self
            .store
            .promote_issuer_keys_audited(&names, now, self.settings.max_age, None, audit.as_ref())
            .await?;
        if let Some(seq) = seq {
            crate::audit::context::mark_recorded(seq);
        }
        let mut promoted = Vec::with_capacity(algs.len());
        for outcome in outcomes {
            match outcome {
                PromoteOutcome::Promoted { kid, retired } => promoted.push((kid, retired)),
                // Another writer changed the keys since the check above.
                PromoteOutcome::TooEarly { kid, ready_at } => {
                    let alg = rows.iter().find(|r| r.kid == kid).and_then(alg_of);
                    return Err(match alg {
                        Some(alg) => JwksError::TooEarly {
                            alg,
                            kid,
                            ready_at,
                            in_secs: ready_at - now,
                        },
                        None => JwksError::Busy,
                    });
                }
                _ => return Err(JwksError::Busy),
            }
        }
        if promoted.len() != algs.len() {
            return Err(JwksError::Busy);
        }
        self.refresh().await?;
        let mut out = Vec::with_capacity(promoted.len());
        for (a, (kid, retired)) in algs.into_iter().zip(promoted) {
            tracing::info!(alg = %a, kid = %kid, retired = ?retired, "issuer key rotated on demand");
            let next = self.add(a, IssuerKeyState::Next, now).await?;
            out.push(Rotation {
                alg: a,
                activated: kid,
                retired,
                next,
            });
        }
        self.refresh().await?;
        Ok(out)
    }

    /// Revokes a key: it leaves the JWKS at once and no longer verifies; its token key is
    /// destroyed. If it was the active key, the next key is promoted immediately, without
    /// waiting for `max_age_seconds` of publication: a compromise outranks the pre-publication
    /// rule (verifiers holding a cached JWKS may briefly fail to resolve the new kid, which is
    /// better than accepting signatures from a compromised key). A fresh next key (and, if no
    /// next key existed, a fresh active key) is then created. Idempotent.
    pub async fn revoke(&self, kid: &str) -> Result<RevokeOutcome, JwksError> {
        let _g = self.serial.lock().await;
        let now = self.clock.now();
        // The request's audit event is appended in the revoking transaction.
        let event = crate::audit::context::in_transaction(String::new(), format!("kid:{kid}"));
        let (outcome, seq) = self.store.revoke_issuer_key_audited(kid, now, event.as_ref()).await?;
        if let Some(seq) = seq {
            crate::audit::context::mark_recorded(seq);
        }
        let outcome = outcome.ok_or_else(|| JwksError::KeyNotFound(kid.to_string()))?;
        let before = &outcome.before;
        if before.state != IssuerKeyState::Revoked {
            tracing::warn!(kid = %kid, alg = %before.alg, was = before.state.as_str(), promoted = ?outcome.promoted,
                "issuer key revoked: removed from the JWKS");
        }
        self.refresh().await?;
        // A stored key's blob was destroyed by the revoking transaction; a token key's
        // object is destroyed here.
        if before.state != IssuerKeyState::Revoked && before.kek_version.is_none() {
            self.destroy(before.label.clone()).await;
        }
        if let Some(alg) = alg_of(before).filter(|a| self.settings.algorithms.contains(a)) {
            self.ensure_alg(alg, now, &mut Vec::new()).await?;
            self.refresh().await?;
        }
        Ok(outcome)
    }

    /// Reloads the ring if the stored keys differ from what it was loaded from (another
    /// replica rotated, revoked or rewrapped). Returns whether it reloaded.
    pub async fn watch_once(&self) -> Result<bool, JwksError> {
        let records = self.store.list_issuer_keys().await?;
        if *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) == fingerprint(&records) {
            return Ok(false);
        }
        let _g = self.serial.lock().await;
        self.refresh().await?;
        Ok(true)
    }

    /// Runs [`KeyLifecycle::tick`] every `tick_seconds`, and [`KeyLifecycle::watch_once`]
    /// every [`WATCH`], until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut interval = tokio::time::interval(self.settings.tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        let mut watch = tokio::time::interval(WATCH.min(self.settings.tick));
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        watch.tick().await;
        loop {
            if *stop.borrow() {
                break;
            }
            enum Due {
                Tick,
                Watch,
            }
            let due = tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    continue;
                }
                _ = interval.tick() => Due::Tick,
                _ = watch.tick() => Due::Watch,
            };
            match due {
                Due::Tick => {
                    if let Err(e) = self.tick(self.clock.now()).await {
                        tracing::warn!(error = %e, "issuer key scheduler run failed");
                    }
                }
                Due::Watch => match self.watch_once().await {
                    Ok(true) => tracing::debug!("issuer keys changed in the store; ring reloaded"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "issuer key watch failed"),
                },
            }
        }
    }
}

fn record(
    alg: IssuerAlg,
    label: &str,
    jwk: &crate::crypto::jwk::Jwk,
    state: IssuerKeyState,
    now: i64,
) -> Result<IssuerKeyRecord, JwksError> {
    Ok(IssuerKeyRecord {
        kid: jwk.kid.clone(),
        alg: alg.as_str().into(),
        label: label.to_string(),
        state,
        created_at: now,
        activated_at: (state == IssuerKeyState::Active).then_some(now),
        retired_at: None,
        revoked_at: None,
        jwk: serde_json::to_string(jwk).map_err(|_| JwksError::Internal("JWK encoding"))?,
        wrapped: None,
        kek_version: None,
    })
}
