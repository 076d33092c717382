//! The decision point the daemon holds: the current set behind an atomic
//! pointer (a reload swaps it whole; requests in flight finish on the set they
//! started with), the decision counter, and the clock.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::{IntCounterVec, Opts};

use super::limits::Per;
use super::{decide, Action, Decision, Policies, PolicyError, PolicyRequest, Resource};
use crate::clock::Clock;
use crate::store::Store;

/// Where requests are decided.
#[derive(Debug)]
pub struct DecisionPoint {
    dir: PathBuf,
    current: ArcSwap<Policies>,
    decisions: IntCounterVec,
    clock: Arc<dyn Clock>,
    watch_seconds: u64,
    /// Decisions each set keeps (`with_kept_decisions`).
    kept_decisions: usize,
    fingerprint: std::sync::Mutex<Option<Fingerprint>>,
    store: Option<Arc<dyn Store>>,
}

/// An amount added to a daily total, to take back if the request then fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendHold {
    key: String,
    amount: u128,
}

/// What the folder's files look like (names, sizes, modification times):
/// a change means "reload".
type Fingerprint = Vec<(PathBuf, u64, Option<std::time::SystemTime>)>;

fn fingerprint(dir: &Path) -> Option<Fingerprint> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).ok()? {
        let entry = entry.ok()?;
        let meta = entry.metadata().ok()?;
        if meta.is_file() {
            out.push((entry.path(), meta.len(), meta.modified().ok()));
        }
    }
    out.sort();
    Some(out)
}

impl DecisionPoint {
    /// Loads and validates the set in `dir`; registers the decision counter.
    pub fn load(
        dir: &Path,
        metrics: &crate::metrics::Metrics,
        clock: Arc<dyn Clock>,
    ) -> Result<DecisionPoint, PolicyError> {
        let policies = Policies::load_dir(dir)?;
        let decisions = IntCounterVec::new(
            Opts::new(
                "policy_decisions_total",
                "policy decisions by action, outcome and the policy (or limit) that decided",
            ),
            &["action", "outcome", "policy"],
        )
        .map_err(|e| PolicyError::Request(e.to_string()))?;
        metrics
            .register(Box::new(decisions.clone()))
            .map_err(|e| PolicyError::Request(e.to_string()))?;
        Ok(DecisionPoint {
            dir: dir.to_path_buf(),
            current: ArcSwap::from_pointee(policies),
            decisions,
            clock,
            watch_seconds: 0,
            kept_decisions: super::KEPT_DECISIONS,
            fingerprint: std::sync::Mutex::new(fingerprint(dir)),
            store: None,
        })
    }

    /// Keeps limit counters in `store` (without one, limits are not applied).
    pub fn with_store(mut self, store: Arc<dyn Store>) -> DecisionPoint {
        self.store = Some(store);
        self
    }

    /// Keeps up to `decisions` decisions per set, this one and every one
    /// reloaded (the daemon: two per account its key cache holds, at least
    /// [`super::KEPT_DECISIONS`]).
    pub fn with_kept_decisions(mut self, decisions: usize) -> DecisionPoint {
        self.kept_decisions = decisions;
        self.current.load().keep_decisions(decisions);
        self
    }

    /// Checks the folder for changes every `seconds` while `watch` runs (0: never).
    pub fn with_watch_interval(mut self, seconds: u64) -> DecisionPoint {
        self.watch_seconds = seconds;
        self
    }

    /// Reloads and logs the outcome: the new set, or why the old one stays.
    pub fn reload_logged(&self, why: &str) {
        match self.reload() {
            Ok(n) => tracing::info!(trigger = why, policies = n, dir = %self.dir.display(), "policy set reloaded"),
            Err(e) => tracing::error!(
                trigger = why,
                error = %e,
                "policy reload refused: the new set is invalid; keeping the current one"
            ),
        }
    }

    /// Reloads when the folder's files change, until `stop` turns true.
    pub async fn watch(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        if self.watch_seconds == 0 {
            return;
        }
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(self.watch_seconds));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tick.tick() => {
                    let now = fingerprint(&self.dir);
                    let changed = {
                        let mut seen = self.fingerprint.lock().unwrap_or_else(|p| p.into_inner());
                        let changed = *seen != now;
                        *seen = now;
                        changed
                    };
                    if changed {
                        self.reload_logged("file change");
                    }
                }
            }
        }
    }

    /// The folder the set is loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The set requests are decided with now.
    pub fn current(&self) -> Arc<Policies> {
        self.current.load_full()
    }

    /// Loads the folder again and swaps the new set in if it validates;
    /// otherwise keeps the current set and says why.
    pub fn reload(&self) -> Result<usize, PolicyError> {
        let policies = Policies::load_dir(&self.dir)?;
        policies.keep_decisions(self.kept_decisions);
        let n = policies.len();
        self.current.store(Arc::new(policies));
        Ok(n)
    }

    fn count(&self, d: &Decision) {
        let outcome = if d.allowed { "allow" } else { "deny" };
        tracing::debug!(action = d.action, outcome, policy = %d.decided_by(), "policy decision");
        if let Some(l) = &d.limit {
            self.decisions
                .with_label_values(&[d.action, outcome, &format!("limit:{l}")])
                .inc();
        } else if d.policy_ids.is_empty() {
            self.decisions
                .with_label_values(&[d.action, outcome, "default-deny"])
                .inc();
        } else {
            for id in &d.policy_ids {
                self.decisions.with_label_values(&[d.action, outcome, id]).inc();
            }
        }
    }

    /// Decides a request: Ok with the decision when allowed, the denial
    /// (carrying the decision) otherwise. Every decision is counted.
    pub async fn authorize(&self, mut req: PolicyRequest<'_>) -> Result<Decision, PolicyError> {
        if req.context.now == 0 {
            req.context.now = self.clock.now();
        }
        let policies = self.current.load_full();
        let mut decision = decide(&req, &policies);
        if decision.allowed {
            if let Some((limit, detail)) = self.check_limits(&req, &policies).await? {
                decision.allowed = false;
                decision.limit = Some(limit.clone());
                self.count(&decision);
                return Err(PolicyError::Limited {
                    identity: req.principal.to_string(),
                    action: decision.action,
                    limit,
                    detail,
                    decision: Box::new(decision),
                });
            }
        }
        self.count(&decision);
        if decision.allowed {
            Ok(decision)
        } else {
            Err(PolicyError::Denied {
                identity: req.principal.to_string(),
                action: decision.action,
                decision: Box::new(decision),
            })
        }
    }

    /// The limit that refuses an allowed request, with what was exceeded.
    async fn check_limits(
        &self,
        req: &PolicyRequest<'_>,
        policies: &Policies,
    ) -> Result<Option<(String, String)>, PolicyError> {
        let Some(store) = &self.store else { return Ok(None) };
        let limits = policies.limits();
        let now = req.context.now;
        let account = match req.resource {
            Resource::Account(a) | Resource::Session(_, a) => Some(a),
            Resource::Service => None,
        };
        for r in limits.rates_for(req.action) {
            let key = match (r.per, account) {
                (Per::Identity, _) => format!("rate:{}:client:{}", r.name, req.principal),
                (Per::Account, Some(a)) => format!("rate:{}:account:{}", r.name, a.id),
                (Per::Account, None) => continue,
            };
            if !store.take_token(&key, r.bucket, now).await? {
                return Ok(Some((
                    r.name.clone(),
                    format!("more than {} requests at once; try again later", r.bucket.capacity),
                )));
            }
        }
        let s = &limits.sessions;
        if req.action == Action::CreateSessionChallenge {
            let asked = &req.context.session;
            if let Some(max) = s.max_ttl_seconds.filter(|m| asked.ttl_seconds > *m) {
                return Ok(Some(("sessions.max_ttl_seconds".into(), format!("ttl above {max} s"))));
            }
            if let Some(max) = s.max_cap.filter(|m| asked.cap > *m) {
                return Ok(Some(("sessions.max_cap".into(), format!("cap above {max}"))));
            }
            // Every asset's own cap, against its own limit or max_cap.
            for scope in &asked.scopes {
                let Ok(crate::session::Scope::Cap { asset, amount }) = crate::session::Scope::parse(scope) else {
                    continue;
                };
                let asset = asset.to_string();
                let (name, max) = match s.max_asset_cap.iter().find(|(a, _)| *a == asset) {
                    Some((_, max)) => ("sessions.max_asset_cap", Some(*max)),
                    None => ("sessions.max_cap", s.max_cap),
                };
                if let Some(max) = max.filter(|m| amount > *m) {
                    return Ok(Some((name.into(), format!("cap of {asset} above {max}"))));
                }
            }
        }
        // Asking for a challenge is refused early; opening is checked
        // exactly in the opening transaction (`Store::open_session_audited`).
        if let (Some(max), Some(a), Action::CreateSessionChallenge) = (s.max_open_per_account, account, req.action) {
            let open = store.count_open_sessions(&a.id, now).await?;
            if open >= max {
                return Ok(Some((
                    "sessions.max_open_per_account".into(),
                    format!("{open} sessions already open"),
                )));
            }
        }
        Ok(None)
    }

    /// Deletes the limit counters that hold nothing any more: daily totals
    /// of days before yesterday (their keys name a UTC day, so no request
    /// reads them again), and each rate's buckets untouched for longer than
    /// an empty bucket takes to refill (a missing bucket is a full one).
    /// Buckets of rates no longer configured are kept. Returns the rows deleted.
    pub async fn prune_counters(&self) -> Result<u64, PolicyError> {
        let Some(store) = &self.store else { return Ok(0) };
        let now = self.clock.now();
        let policies = self.current.load_full();
        let buckets: Vec<(String, i64)> = policies
            .limits()
            .rates
            .iter()
            .filter_map(|r| {
                let full = crate::store::limits::full_after(r.bucket)?;
                Some((format!("rate:{}:", r.name), now.saturating_sub(full)))
            })
            .collect();
        let today = now.div_euclid(86_400).saturating_mul(86_400);
        Ok(store
            .prune_limit_counters(today.saturating_sub(86_400), &buckets)
            .await?)
    }

    /// Prunes limit counters every `every` until `stop` turns true.
    pub async fn prune(self: Arc<Self>, every: std::time::Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tick.tick() => {}
            }
            match self.prune_counters().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(rows = n, "limit counters pruned"),
                Err(e) => tracing::warn!(error = %e, "limit counters could not be pruned"),
            }
        }
    }

    /// A limit checked where the state changes (in a store transaction)
    /// refused a request the policies allowed: counted like any limit
    /// refusal, and returned as one.
    pub fn refused_by_limit(&self, identity: &str, action: Action, limit: &str, detail: String) -> PolicyError {
        let decision = Decision {
            action: action.name(),
            allowed: false,
            policy_ids: Vec::new(),
            limit: Some(limit.to_string()),
        };
        self.count(&decision);
        PolicyError::Limited {
            identity: identity.to_string(),
            action: decision.action,
            limit: limit.to_string(),
            detail,
            decision: Box::new(decision),
        }
    }

    /// Adds a payment to its account's daily total for its currency, when a
    /// daily cap applies: the hold to release if the request then fails.
    pub async fn hold_daily_spend(
        &self,
        identity: &str,
        account_id: &str,
        currency: &str,
        amount: u128,
    ) -> Result<Option<SpendHold>, PolicyError> {
        let Some(store) = &self.store else { return Ok(None) };
        let policies = self.current.load_full();
        let Some(cap) = policies.limits().daily_cap(currency) else {
            return Ok(None);
        };
        let now = self.clock.now();
        let day = now.div_euclid(86_400);
        let key = format!("spend:{}:{account_id}:{currency}:{day}", cap.name);
        if store.add_to_total(&key, amount, cap.cap, now).await?.is_some() {
            return Ok(Some(SpendHold { key, amount }));
        }
        let decision = Decision {
            action: Action::SignPayment.name(),
            allowed: false,
            policy_ids: Vec::new(),
            limit: Some(cap.name.clone()),
        };
        self.count(&decision);
        Err(PolicyError::Limited {
            identity: identity.to_string(),
            action: decision.action,
            limit: cap.name.clone(),
            detail: format!("the account's {currency} spend today would pass {}", cap.cap),
            decision: Box::new(decision),
        })
    }

    /// Takes back a hold of a request that failed.
    pub async fn release_daily_spend(&self, hold: SpendHold) {
        if let Some(store) = &self.store {
            if let Err(e) = store
                .subtract_from_total(&hold.key, hold.amount, self.clock.now())
                .await
            {
                tracing::error!(error = %e, "could not take back a daily spend of a failed request");
            }
        }
    }
}
