//! A local cluster for tests and `keyward bench --replicas`: N `keyward
//! serve` processes over one PostgreSQL schema and one SoftHSM token, on
//! fixed loopback ports (a replica restarts on its own address, as behind a
//! load balancer's static list), with the development PKI's client profiles
//! (admin, marketplace, wallet-gateway).
//!
//! The replicas share one token folder: the only writes to it at run time are
//! issuer keys made by a rotation, one replica at a time under the store's
//! advisory lock (and SoftHSM's own token file at each login, which
//! [`crate::hsm`] tolerates at start-up); SoftHSM re-reads a folder's object
//! list on every object access, so each replica finds a key another one made
//! (softhsm/README.md, "Several processes, one token folder"). Account keys
//! are session objects and never touch the folder.
//!
//! The PostgreSQL schema comes from [`crate::store::testing::PgTestSchema`]
//! (the test database, `KEYWARD_TEST_DATABASE_URL`), dropped with the cluster.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tonic::transport::Channel;

use crate::store::testing::PgTestSchema;
use crate::testkit::SoftHsmToken;
use crate::tls::devpki::{ensure_dev_pki, DevPki};
use crate::tls::ClientTlsFiles;

/// The client profiles of the cluster's PKI.
pub const PROFILES: [&str; 3] = ["admin", "marketplace", "wallet-gateway"];

/// One replica: its config, its addresses and, while it runs, its process.
#[derive(Debug)]
pub struct Replica {
    /// Position in the cluster.
    pub index: usize,
    /// Its config file.
    pub config: PathBuf,
    /// gRPC (mutual TLS).
    pub grpc: SocketAddr,
    /// HTTPS side port (JWKS, health).
    pub https: SocketAddr,
    /// Plain-HTTP metrics.
    pub metrics: SocketAddr,
    /// Its stderr, appended across restarts.
    pub log: PathBuf,
    child: Option<Child>,
}

impl Replica {
    /// `https://<grpc address>`.
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.grpc)
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of replicas.
    pub replicas: usize,
    /// The `keyward` binary to run.
    pub binary: PathBuf,
    /// TOML appended to every replica's config.
    pub extra_config: String,
    /// TOML appended to `policies/limits.toml`.
    pub limits: String,
    /// `hsm.pool_size` of each replica.
    pub hsm_pool_size: usize,
}

impl ClusterOptions {
    /// `replicas` of `binary`, nothing extra, 4 HSM sessions each.
    pub fn new(replicas: usize, binary: impl Into<PathBuf>) -> ClusterOptions {
        ClusterOptions {
            replicas,
            binary: binary.into(),
            extra_config: String::new(),
            limits: String::new(),
            hsm_pool_size: 4,
        }
    }
}

/// The cluster: a temp dir with the PKI, the token, the policies and one
/// config per replica; a PostgreSQL schema they all use. Dropping it kills
/// the replicas and removes the schema and the files.
pub struct Cluster {
    /// Everything on disk.
    pub dir: tempfile::TempDir,
    /// The shared token.
    pub token: SoftHsmToken,
    /// The development PKI.
    pub pki: DevPki,
    /// The store URL every replica uses (its own schema, and an
    /// `application_name` that names this cluster's connections).
    pub store_url: String,
    /// The `application_name` of the replicas' database connections.
    pub app_name: String,
    /// The replicas.
    pub replicas: Vec<Replica>,
    binary: PathBuf,
    schema: PgTestSchema,
}

/// Three loopback ports the OS had free a moment ago.
fn free_ports() -> std::io::Result<(SocketAddr, SocketAddr, SocketAddr)> {
    let mut l = Vec::with_capacity(3);
    for _ in 0..3 {
        l.push(std::net::TcpListener::bind("127.0.0.1:0")?);
    }
    Ok((l[0].local_addr()?, l[1].local_addr()?, l[2].local_addr()?))
}

impl Cluster {
    /// Writes everything, runs `keyward init` once, starts every replica
    /// and waits until each reports SERVING. `Ok(None)` when PostgreSQL is
    /// not reachable and `CI` is not set (the store's test kit says so).
    pub async fn start(opts: ClusterOptions) -> anyhow::Result<Option<Cluster>> {
        let Some(schema) = tokio::task::spawn_blocking(PgTestSchema::create)
            .await
            .context("PostgreSQL schema task")?
        else {
            return Ok(None);
        };
        let dir = tempfile::tempdir().context("temp dir")?;
        let token = SoftHsmToken::new().context("SoftHSM token (is softhsm2 installed?)")?;
        let pki = ensure_dev_pki(&dir.path().join("pki"), &PROFILES).context("development PKI")?;
        write_0600(&dir.path().join("hsm-pin"), &format!("{}\n", token.pin))?;
        crate::policy::install_defaults(&dir.path().join("policies")).context("default policies")?;
        if !opts.limits.is_empty() {
            let path = dir.path().join("policies/limits.toml");
            let mut text = std::fs::read_to_string(&path).context("limits.toml")?;
            text.push('\n');
            text.push_str(&opts.limits);
            std::fs::write(&path, text).context("limits.toml")?;
        }
        let tail = schema
            .schema()
            .get(schema.schema().len().saturating_sub(12)..)
            .unwrap_or("x");
        let app_name = format!("kwrep_{tail}");
        let store_url = format!("{}&application_name={app_name}", schema.url());
        let mut replicas = Vec::with_capacity(opts.replicas);
        for index in 0..opts.replicas {
            let (grpc, https, metrics) = free_ports().context("free loopback ports")?;
            let config = dir.path().join(format!("replica-{index}.toml"));
            let text = format!(
                r#"
[server]
listen = "{grpc}"
https_listen = "{https}"
metrics_listen = "{metrics}"
[tls]
cert = "pki/server.pem"
key = "pki/server-key.pem"
client_ca = "pki/ca.pem"
[hsm]
module = "{module}"
token_label = "{label}"
pin_file = "hsm-pin"
pool_size = {pool}
softhsm_conf = "{conf}"
[keys]
custody = "hsm"
cache_capacity = 10000
[store]
url = "{store_url}"
[policy]
dir = "policies"
{extra}
"#,
                module = SoftHsmToken::module_path().display(),
                label = token.label,
                conf = token.conf_path.display(),
                pool = opts.hsm_pool_size,
                extra = opts.extra_config,
            );
            std::fs::write(&config, text).context("replica config")?;
            replicas.push(Replica {
                index,
                config,
                grpc,
                https,
                metrics,
                log: dir.path().join(format!("replica-{index}.log")),
                child: None,
            });
        }
        let mut cluster = Cluster {
            dir,
            token,
            pki,
            store_url,
            app_name,
            replicas,
            binary: opts.binary,
            schema,
        };
        if let Some(first) = cluster.replicas.first() {
            let init = cluster
                .command()
                .args(["init", "--config"])
                .arg(&first.config)
                .output()
                .context("keyward init")?;
            anyhow::ensure!(
                init.status.success(),
                "keyward init: {}",
                String::from_utf8_lossy(&init.stderr).trim()
            );
        }
        for i in 0..cluster.replicas.len() {
            cluster.spawn(i)?;
        }
        for i in 0..cluster.replicas.len() {
            cluster.wait_ready(i).await?;
        }
        Ok(Some(cluster))
    }

    /// The `keyward` binary in the cluster's folder, with a quiet log (the
    /// configs name the SoftHSM configuration).
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.current_dir(self.dir.path())
            .env_remove("SOFTHSM2_CONF")
            .env("RUST_LOG", "warn");
        c
    }

    /// Starts replica `i` (without waiting for it).
    pub fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let r = self.replicas.get(i).context("no such replica")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&r.log)
            .context("replica log")?;
        let child = self
            .command()
            .args(["serve", "--config"])
            .arg(&r.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawn keyward serve")?;
        if let Some(r) = self.replicas.get_mut(i) {
            r.child = Some(child);
        }
        Ok(())
    }

    /// Waits until replica `i` answers SERVING on gRPC health; an error
    /// (with its log) if it exits or takes more than 60 s.
    pub async fn wait_ready(&mut self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let files = self.client_files("admin")?;
        let endpoint = self.replicas.get(i).context("no such replica")?.endpoint();
        loop {
            if let Some(child) = self.replicas.get_mut(i).and_then(|r| r.child.as_mut()) {
                if let Ok(Some(status)) = child.try_wait() {
                    anyhow::bail!("replica {i} exited ({status}): {}", self.log_tail(i));
                }
            }
            if let Ok(ch) = crate::tls::connect(&endpoint, &files).await {
                let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
                let serving = h
                    .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                    .await
                    .is_ok_and(|r| r.into_inner().status == 1);
                if serving {
                    return Ok(());
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "replica {i} not ready: {}", self.log_tail(i));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `signal` (`-TERM`, `-KILL`) to replica `i` and waits for it to
    /// exit; `Ok(true)` if it exited successfully.
    pub fn signal(&mut self, i: usize, signal: &str) -> anyhow::Result<bool> {
        let mut child = self
            .replicas
            .get_mut(i)
            .and_then(|r| r.child.take())
            .context("replica not running")?;
        let pid = child.id().to_string();
        let sent = Command::new("kill").args([signal, &pid]).status().context("kill")?;
        anyhow::ensure!(sent.success(), "kill {signal} {pid} failed");
        Ok(child.wait().context("wait for the replica")?.success())
    }

    /// Sends `signal` to replica `i` without waiting for it to exit.
    pub fn kill(&self, i: usize, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .replicas
            .get(i)
            .and_then(Replica::pid)
            .context("replica not running")?;
        let sent = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .context("kill")?;
        anyhow::ensure!(sent.success(), "kill {signal} {pid} failed");
        Ok(())
    }

    /// Waits for replica `i` to exit; `Ok(true)` if it exited successfully.
    pub fn wait_exit(&mut self, i: usize) -> anyhow::Result<bool> {
        let mut child = self
            .replicas
            .get_mut(i)
            .and_then(|r| r.child.take())
            .context("replica not running")?;
        Ok(child.wait().context("wait for the replica")?.success())
    }

    /// The last 30 lines of replica `i`'s log.
    pub fn log_tail(&self, i: usize) -> String {
        let text = self
            .replicas
            .get(i)
            .and_then(|r| std::fs::read_to_string(&r.log).ok())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Client TLS files for a profile of the cluster's PKI.
    pub fn client_files(&self, profile: &str) -> anyhow::Result<ClientTlsFiles> {
        let p = self
            .pki
            .clients
            .iter()
            .find(|c| c.name == profile)
            .with_context(|| format!("no client profile {profile}"))?;
        Ok(ClientTlsFiles {
            ca: self.pki.ca_cert.clone(),
            cert: Some(p.cert.clone()),
            key: Some(p.key.clone()),
            domain: "localhost".into(),
        })
    }

    /// One mTLS channel to replica `i` as `profile`.
    pub async fn channel(&self, i: usize, profile: &str) -> anyhow::Result<Channel> {
        let r = self.replicas.get(i).context("no such replica")?;
        Ok(crate::tls::connect(&r.endpoint(), &self.client_files(profile)?).await?)
    }

    /// The URL of the cluster's schema (without the replicas' application name).
    pub fn schema_url(&self) -> &str {
        self.schema.url()
    }

    /// The cluster's folder.
    pub fn home(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for r in &mut self.replicas {
            if let Some(mut c) = r.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn write_0600(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("{}", path.display()))?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("{}", path.display()))
}
