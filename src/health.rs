//! Readiness: whether this replica can do its work right now, decided by a
//! probe of the store (a real write transaction) that runs beside the
//! requests. `/readyz` and the gRPC health service report it; a replica that
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
        /// `store`.
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
    /// that does not answer).
    pub timeout: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            every: Duration::from_secs(1),
            timeout: Duration::from_secs(3),
        }
    }
}

/// The readiness probe and its current answer.
#[derive(Debug)]
pub struct Health {
    store: Arc<dyn Store>,
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

    /// Probes once, records the answer and returns it. The write runs in a
    /// task of its own (see [`crate::store::begin`]): a probe that times out
    /// leaves no transaction behind.
    pub async fn probe(&self) -> Readiness {
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
        self.record(answer.clone());
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
