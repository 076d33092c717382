//! Readiness: whether this replica can do its work right now, decided by a
//! probe that runs beside the requests and checks, in order: the store (a real
//! write transaction), the HSM (a pooled session reads back every KEK this
//! custody needs), the audit appender (running, and its queue not backlogged
//! past a bound) and the issuer (an active key for every configured
//! algorithm). `/readyz` and the gRPC health service report it; a replica that
//! is not ready keeps answering, so it recovers by itself as soon as the
//! cause is gone, without a restart. Never holds or logs anything secret.
//!
//! A transition is logged once, with its cause (not once per request), and
//! counted: `keyward_ready` (1 or 0), `keyward_not_ready_total{component}`
//! (transitions to not ready), `keyward_store_probe_failures_total` and
//! `keyward_store_probe_duration_seconds`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};
use tokio::sync::watch;

use crate::clock::Clock;
use crate::store::Store;

/// What the last probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Every component answered.
    Ready,
    /// A component failed; the daemon should not be sent traffic.
    NotReady {
        /// `store`, `hsm`, `audit` or `issuer`.
        component: &'static str,
        /// What failed (no secrets: store errors redact URLs).
        reason: String,
    },
}

impl Readiness {
    /// Whether the daemon is ready.
    pub fn is_ready(&self) -> bool {
        matches!(self, Readiness::Ready)
    }
}

/// How the probe runs.
#[derive(Debug, Clone, Copy)]
pub struct HealthSettings {
    /// Time between probes.
    pub every: Duration,
    /// A probe that takes longer fails (a lock held elsewhere, a server
    /// that does not answer, a token that hangs).
    pub timeout: Duration,
    /// Events waiting in the audit appender's queue at which the daemon is
    /// no longer ready: requests would wait for room before their event is
    /// even queued.
    pub audit_backlog: usize,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            every: Duration::from_secs(1),
            timeout: Duration::from_secs(3),
            audit_backlog: crate::audit::AppenderSettings::default().queue * 3 / 4,
        }
    }
}

/// What the probe checks beside the store; each is optional so that a
/// store-only probe stays possible (the store tests use one).
#[derive(Debug, Default, Clone)]
pub struct Components {
    /// The token: a pooled session reads back every KEK the custody needs.
    pub hsm: Option<crate::hsm::Hsm>,
    /// The audit appender: running, queue under [`HealthSettings::audit_backlog`].
    pub audit: Option<Arc<crate::audit::Appender>>,
    /// The issuer and the algorithms that must each have an active key.
    pub issuer: Option<(Arc<crate::issuer::Issuer>, Vec<crate::hsm::IssuerAlg>)>,
}

/// The readiness probe and its current answer.
#[derive(Debug)]
pub struct Health {
    store: Arc<dyn Store>,
    components: Components,
    clock: Arc<dyn Clock>,
    settings: HealthSettings,
    state: watch::Sender<Readiness>,
    ready: IntGauge,
    not_ready: IntCounterVec,
    probe_failures: IntCounter,
    probe_seconds: Histogram,
}

impl Health {
    /// A probe of `store`, registering its series with `metrics`. Starts
    /// not ready until the first probe answers.
    pub fn new(
        store: Arc<dyn Store>,
        components: Components,
        clock: Arc<dyn Clock>,
        metrics: &crate::metrics::Metrics,
        settings: HealthSettings,
    ) -> Result<Health, prometheus::Error> {
        let ready = IntGauge::new("ready", "1 while every component answers the readiness probe, else 0")?;
        let not_ready = IntCounterVec::new(
            Opts::new(
                "not_ready_total",
                "transitions to not ready, by the component that failed",
            ),
            &["component"],
        )?;
        let probe_failures = IntCounter::new("store_probe_failures_total", "failed store readiness probes")?;
        let probe_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "store_probe_duration_seconds",
                "time of the store readiness probe (one write transaction)",
            )
            .buckets(vec![0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 3.0]),
        )?;
        metrics.register(Box::new(ready.clone()))?;
        metrics.register(Box::new(not_ready.clone()))?;
        metrics.register(Box::new(probe_failures.clone()))?;
        metrics.register(Box::new(probe_seconds.clone()))?;
        let (state, _) = watch::channel(Readiness::NotReady {
            component: "store",
            reason: "not probed yet".into(),
        });
        Ok(Health {
            store,
            components,
            clock,
            settings,
            state,
            ready,
            not_ready,
            probe_failures,
            probe_seconds,
        })
    }

    /// The current answer.
    pub fn readiness(&self) -> Readiness {
        self.state.borrow().clone()
    }

    /// Changes of the answer.
    pub fn subscribe(&self) -> watch::Receiver<Readiness> {
        self.state.subscribe()
    }

    /// Probes once, records the answer and returns it. The store write runs in a
    /// task of its own (see [`crate::store::begin`]): a probe that times out
    /// leaves no transaction behind.
    pub async fn probe(&self) -> Readiness {
        let answer = match self.probe_store().await {
            Readiness::Ready => self.probe_components().await,
            not_ready => not_ready,
        };
        self.record(answer.clone());
        answer
    }

    /// The components after the store, in order; the first that fails is
    /// the answer.
    async fn probe_components(&self) -> Readiness {
        let not_ready = |component: &'static str, reason: String| Readiness::NotReady { component, reason };
        if let Some(hsm) = &self.components.hsm {
            let hsm = hsm.clone();
            let probe = tokio::task::spawn_blocking(move || hsm.probe());
            match tokio::time::timeout(self.settings.timeout, probe).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return not_ready("hsm", e.to_string()),
                Ok(Err(_)) => return not_ready("hsm", "the probe task failed".into()),
                Err(_) => {
                    return not_ready(
                        "hsm",
                        format!(
                            "the token did not answer within {} ms",
                            self.settings.timeout.as_millis()
                        ),
                    )
                }
            }
        }
        if let Some(audit) = &self.components.audit {
            match audit.backlog() {
                None => return not_ready("audit", "the audit appender has stopped".into()),
                Some(n) if n >= self.settings.audit_backlog => {
                    return not_ready(
                        "audit",
                        format!("{n} events wait to be written (bound {})", self.settings.audit_backlog),
                    )
                }
                Some(_) => {}
            }
        }
        if let Some((issuer, algs)) = &self.components.issuer {
            for alg in algs {
                if let Err(e) = issuer.active(*alg) {
                    return not_ready("issuer", e.to_string());
                }
            }
        }
        Readiness::Ready
    }

    async fn probe_store(&self) -> Readiness {
        let started = Instant::now();
        let store = self.store.clone();
        let now = self.clock.now();
        let write = tokio::spawn(async move { store.probe_write(now).await });
        let answer = match tokio::time::timeout(self.settings.timeout, write).await {
            Ok(Ok(Ok(()))) => Readiness::Ready,
            Ok(Ok(Err(e))) => Readiness::NotReady {
                component: "store",
                reason: e.to_string(),
            },
            Ok(Err(_)) => Readiness::NotReady {
                component: "store",
                reason: "the probe task failed".into(),
            },
            Err(_) => Readiness::NotReady {
                component: "store",
                reason: format!(
                    "a write transaction did not finish within {} ms (lock held elsewhere, or the server does not answer)",
                    self.settings.timeout.as_millis()
                ),
            },
        };
        self.probe_seconds.observe(started.elapsed().as_secs_f64());
        answer
    }

    /// Stores an answer; logs and counts transitions only.
    fn record(&self, answer: Readiness) {
        if let Readiness::NotReady { .. } = &answer {
            self.probe_failures.inc();
        }
        self.ready.set(i64::from(answer.is_ready()));
        let previous = self.state.send_replace(answer.clone());
        if previous == answer {
            return;
        }
        match (&previous, &answer) {
            (_, Readiness::Ready) => tracing::info!("ready: every component answers"),
            (Readiness::NotReady { component: a, .. }, Readiness::NotReady { component: b, .. }) if a == b => {
                // Same component, another wording of the failure: already said.
            }
            (_, Readiness::NotReady { component, reason }) => {
                self.not_ready.with_label_values(&[component]).inc();
                tracing::warn!(component, reason = %reason, "not ready: refusing traffic until it recovers");
            }
        }
    }

    /// Probes every [`HealthSettings::every`] until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.settings.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tick.tick() => {}
            }
            self.probe().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Appender, AppenderSettings, NewEvent};
    use sqlx::Connection as _;

    async fn sqlite(dir: &std::path::Path, name: &str) -> (Arc<dyn Store>, String) {
        let url = format!("sqlite://{}", dir.join(name).display());
        (crate::store::open(&url).await.expect("store"), url)
    }

    fn health(store: Arc<dyn Store>, components: Components, audit_backlog: usize) -> Health {
        let metrics = crate::metrics::Metrics::new().expect("metrics");
        let settings = HealthSettings {
            audit_backlog,
            ..Default::default()
        };
        Health::new(
            store,
            components,
            Arc::new(crate::clock::SystemClock),
            &metrics,
            settings,
        )
        .expect("health")
    }

    /// Appends queue up behind a write lock another connection holds on the
    /// audit's file: past the bound the daemon is not ready, naming the
    /// audit; once the lock goes the queue drains, every append succeeds and
    /// the daemon is ready again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backlogged_audit_queue_is_not_ready_until_it_drains() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (probe_store, _) = sqlite(dir.path(), "probe.db").await;
        let (audit_store, audit_url) = sqlite(dir.path(), "audit.db").await;
        let appender = Arc::new(Appender::start(
            audit_store,
            AppenderSettings {
                max_batch: 1,
                queue: 8,
                ..Default::default()
            },
            None,
        ));
        let components = Components {
            audit: Some(appender.clone()),
            ..Default::default()
        };
        let h = health(probe_store, components, 4);
        assert_eq!(h.probe().await, Readiness::Ready);

        let mut other = sqlx::SqliteConnection::connect(&audit_url).await.expect("connect");
        sqlx::query("BEGIN IMMEDIATE").execute(&mut other).await.expect("lock");
        let waiting: Vec<_> = (0..7)
            .map(|_| {
                let a = appender.clone();
                tokio::spawn(async move { a.append(NewEvent::default()).await })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(3);
        let answer = loop {
            let answer = h.probe().await;
            if !answer.is_ready() || Instant::now() > deadline {
                break answer;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        match &answer {
            Readiness::NotReady { component, reason } => {
                assert_eq!(*component, "audit");
                assert!(reason.contains("bound 4"), "{reason}");
            }
            Readiness::Ready => panic!("ready with appends queued behind a lock"),
        }

        sqlx::query("ROLLBACK").execute(&mut other).await.expect("unlock");
        drop(other);
        for w in waiting {
            w.await.expect("append task").expect("appended once the lock went");
        }
        assert_eq!(h.probe().await, Readiness::Ready);
    }

    /// A token whose issuer has no active key for a configured algorithm is
    /// not ready, naming the issuer; with the key created it is ready.
    #[test]
    fn no_active_issuer_key_is_not_ready() {
        let tok = crate::testkit::SoftHsmToken::new().expect("token");
        // nextest runs each test in its own process.
        std::env::set_var("SOFTHSM2_CONF", &tok.conf_path);
        let hsm = crate::hsm::Hsm::open(&tok.hsm_config(2)).expect("open");
        hsm.ensure_kek().expect("KEK");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let (store, _) = sqlite(dir.path(), "probe.db").await;
            let algs = vec![crate::hsm::IssuerAlg::EdDSA];
            let empty = Arc::new(crate::issuer::Issuer::empty(&hsm));
            let components = Components {
                hsm: Some(hsm.clone()),
                issuer: Some((empty, algs.clone())),
                ..Default::default()
            };
            match health(store.clone(), components, 16).probe().await {
                Readiness::NotReady { component, .. } => assert_eq!(component, "issuer"),
                Readiness::Ready => panic!("ready without an active issuer key"),
            }
            let with_key = {
                let hsm = hsm.clone();
                let algs = algs.clone();
                tokio::task::spawn_blocking(move || crate::issuer::Issuer::ensure(&hsm, &algs))
                    .await
                    .expect("join")
                    .expect("issuer key")
            };
            let components = Components {
                hsm: Some(hsm.clone()),
                issuer: Some((Arc::new(with_key), algs)),
                ..Default::default()
            };
            assert_eq!(health(store, components, 16).probe().await, Readiness::Ready);
        });
    }
}
