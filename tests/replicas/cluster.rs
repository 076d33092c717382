//! The tests' handle on [`keyward::cluster::Cluster`] (the harness
//! `keyward bench --replicas` uses too): the same cluster, with failures as
//! panics, blocking waits for the test's main thread, and the checks the
//! tests make on the shared store.

use std::ops::{Deref, DerefMut};

use keyward::cluster::ClusterOptions;
use tonic::transport::Channel;

pub struct Cluster(keyward::cluster::Cluster);

impl Deref for Cluster {
    type Target = keyward::cluster::Cluster;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// A runtime for the harness's own waits, on the test's main thread.
fn waits() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

impl Cluster {
    /// `n` replicas of the binary under test, started and SERVING. `extra`
    /// is appended to each config, `limits` to `policies/limits.toml`. None
    /// when PostgreSQL is not reachable outside CI.
    pub fn start(n: usize, extra: &str, limits: &str) -> Option<Cluster> {
        let mut opts = ClusterOptions::new(n, env!("CARGO_BIN_EXE_keyward"));
        opts.extra_config = extra.into();
        opts.limits = limits.into();
        waits()
            .block_on(keyward::cluster::Cluster::start(opts))
            .expect("cluster starts")
            .map(Cluster)
    }

    /// Starts replica `i` again.
    pub fn spawn(&mut self, i: usize) {
        self.0.spawn(i).expect("spawn replica");
    }

    /// Blocks until replica `i` is SERVING.
    pub fn wait_ready(&mut self, i: usize) {
        waits().block_on(self.0.wait_ready(i)).expect("replica ready");
    }

    /// Signals replica `i` and waits for it; whether it exited cleanly.
    pub fn signal(&mut self, i: usize, signal: &str) -> bool {
        self.0.signal(i, signal).expect("signal replica")
    }

    /// The `keyward` binary in the cluster's folder.
    pub fn keyward(&self) -> std::process::Command {
        self.0.command()
    }

    /// One mTLS channel to replica `i` as `profile`.
    pub async fn channel(&self, i: usize, profile: &str) -> Channel {
        self.0.channel(i, profile).await.expect("mTLS connect")
    }

    /// `per_replica` channels to every replica as `profile`, interleaved
    /// (replica 0, 1, 2, 0, 1, 2, ...).
    pub async fn channels(&self, profile: &str, per_replica: usize) -> Vec<Channel> {
        let mut out = Vec::new();
        for _ in 0..per_replica {
            for i in 0..self.replicas.len() {
                out.push(self.channel(i, profile).await);
            }
        }
        out
    }

    /// A connection to the cluster's schema, for the test's own checks.
    pub async fn db(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(self.schema_url())
            .await
            .expect("postgres")
    }

    /// `keyward audit verify` on the shared store: (exit ok, output).
    pub fn audit_verify(&self) -> (bool, String) {
        let out = self
            .keyward()
            .args(["audit", "verify", "--config"])
            .arg(&self.replicas[0].config)
            .output()
            .expect("keyward audit verify");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}
