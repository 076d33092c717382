//! Shared fixtures for end-to-end tests: a real SoftHSM token in a temp dir,
//! real dev certificates, a real store (SQLite file or PostgreSQL schema), and
//! an in-process daemon on 127.0.0.1:0 reached over real mutual TLS.
//!
//! SoftHSM reads SOFTHSM2_CONF once per process; cargo-nextest runs every
//! test in its own process, so each test gets its own token.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keyward::api::pb::account_service_client::AccountServiceClient;
use keyward::api::pb::signing_service_client::SigningServiceClient;
use keyward::api::pb::{Account, CreateAccountRequest};
use keyward::config::{Config, Custody};
use keyward::testkit::SoftHsmToken;
use keyward::tls::devpki::{ensure_dev_pki, DevPki};
use keyward::tls::ClientTlsFiles;
use tonic::transport::Channel;

/// The Mail document from the EIP-712 specification.
pub const MAIL: &str = include_str!("../data/mail.json");

/// Which store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

/// Everything a daemon needs, on disk.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub token: SoftHsmToken,
    pub pki: DevPki,
    pub config_path: PathBuf,
    pub store_url: String,
}

impl Env {
    /// A fresh token, PKI and config. Returns None only for PostgreSQL when
    /// no server answers outside CI (the store testkit says so loudly).
    pub fn new(custody: Custody, store: StoreKind) -> Option<Env> {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = SoftHsmToken::new().expect("SoftHSM token (is softhsm2 installed?)");
        std::env::set_var("SOFTHSM2_CONF", &token.conf_path);
        let pki =
            ensure_dev_pki(&dir.path().join("pki"), &["admin", "marketplace", "wallet-gateway"]).expect("dev pki");
        let store_url = match store {
            StoreKind::Sqlite => format!("sqlite://{}", dir.path().join("keyward.db").display()),
            StoreKind::Postgres => keyward::store::testing::postgres_url_for_tests()?,
        };
        write_0600(&dir.path().join("hsm-pin"), &format!("{}\n", token.pin));
        let config_path = dir.path().join("keyward.toml");
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
https_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
drain_seconds = 0
[tls]
cert = "pki/server.pem"
key = "pki/server-key.pem"
client_ca = "pki/ca.pem"
[hsm]
module = "{module}"
token_label = "{label}"
pin_file = "hsm-pin"
pool_size = 4
softhsm_conf = "{conf}"
[keys]
custody = "{custody}"
cache_capacity = 1000
[store]
url = "{store_url}"
[policy]
dir = "policies"
"#,
            module = SoftHsmToken::module_path().display(),
            label = token.label,
            conf = token.conf_path.display(),
            custody = custody.as_str(),
        );
        std::fs::write(&config_path, text).expect("config");
        // The default set shipped in the binary, as `dev` and `init` install it.
        assert!(keyward::policy::install_defaults(&dir.path().join("policies")).expect("default policies"));
        Some(Env {
            dir,
            token,
            pki,
            config_path,
            store_url,
        })
    }

    pub fn config(&self) -> Config {
        Config::load(&self.config_path).expect("config loads")
    }

    /// Client TLS files for a dev profile.
    pub fn client_files(&self, profile: &str) -> ClientTlsFiles {
        let p = self.pki.clients.iter().find(|c| c.name == profile).expect("profile");
        ClientTlsFiles {
            ca: self.pki.ca_cert.clone(),
            cert: Some(p.cert.clone()),
            key: Some(p.key.clone()),
            domain: "localhost".into(),
        }
    }

    /// Creates the KEK (what `keyward init` does).
    pub async fn init(&self) {
        let config = self.config();
        let hsm = keyward::server::open_hsm(&config).await.expect("hsm opens");
        keyward::server::init_token(hsm).await.expect("KEK and issuer keys");
    }

    /// Starts an in-process daemon.
    pub async fn start(&self) -> Daemon {
        self.start_with_clock(std::sync::Arc::new(keyward::clock::SystemClock))
            .await
    }

    /// Starts an in-process daemon whose time the test drives.
    pub async fn start_with_clock(&self, clock: std::sync::Arc<dyn keyward::clock::Clock>) -> Daemon {
        let config = self.config();
        let mut running = keyward::server::start_with_clock(&config, clock)
            .await
            .expect("daemon starts");
        let state = running.daemon.clone();
        let (grpc, https) = keyward::server::bind(&config).await.expect("bind");
        running.metrics_listener = keyward::server::bind_metrics(&config).await.expect("bind metrics");
        let metrics_addr = running
            .metrics_listener
            .as_ref()
            .map(|l| l.local_addr().expect("metrics addr"));
        let grpc_addr = grpc.local_addr().expect("addr");
        let https_addr = https.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let tls = running.tls.clone();
        let handle = tokio::spawn(keyward::server::serve(running, grpc, https, async move {
            let _ = rx.await;
        }));
        let d = Daemon {
            grpc: format!("https://{grpc_addr}"),
            https_addr,
            metrics_addr,
            stop: Some(tx),
            handle: Some(handle),
            tls,
            state,
        };
        d.wait_healthy(self).await;
        d
    }
}

/// Writes a secret file as the daemon demands it: mode 0600.
pub fn write_0600(path: &Path, contents: &str) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("secret file");
    f.write_all(contents.as_bytes()).expect("secret file");
}

/// A running in-process daemon.
pub struct Daemon {
    pub grpc: String,
    pub https_addr: std::net::SocketAddr,
    /// The plain-HTTP metrics listener (`server.metrics_listen`), if on.
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub tls: std::sync::Arc<keyward::tls::ServerTls>,
    pub state: std::sync::Arc<keyward::api::Daemon>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<Result<(), keyward::server::ServeError>>>,
}

impl Daemon {
    async fn wait_healthy(&self, env: &Env) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(ch) = keyward::tls::connect(&self.grpc, &env.client_files("admin")).await {
                let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
                if h.check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "daemon did not become healthy");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn channel(&self, env: &Env, profile: &str) -> Channel {
        keyward::tls::connect(&self.grpc, &env.client_files(profile))
            .await
            .expect("mTLS connect")
    }

    pub async fn accounts(&self, env: &Env, profile: &str) -> AccountServiceClient<Channel> {
        AccountServiceClient::new(self.channel(env, profile).await)
    }

    pub async fn signing(&self, env: &Env, profile: &str) -> SigningServiceClient<Channel> {
        SigningServiceClient::new(self.channel(env, profile).await).max_decoding_message_size(64 * 1024 * 1024)
    }

    /// Graceful stop; returns the serve result.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("serve task").expect("serve ok");
        }
    }
}

/// A wallet address to use as controller.
pub const CONTROLLER: &str = "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826";

pub async fn create_account(d: &Daemon, env: &Env, allow: &[&str]) -> Account {
    d.accounts(env, "admin")
        .await
        .create_account(CreateAccountRequest {
            controller: CONTROLLER.into(),
            label: "alice".into(),
            allow: allow.iter().map(|s| s.to_string()).collect(),
        })
        .await
        .expect("account created")
        .into_inner()
}

pub fn data_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// Runs a future on a fresh multi-thread runtime (built after the fixture set
/// SOFTHSM2_CONF, so no runtime thread exists while the environment changes).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Recovers the signer of an EIP-712 document with an independent
/// implementation (Python's eth-account), when it is installed. Under CI it
/// must be installed.
pub fn eth_account_recover(typed_data_json: &str, signature_hex: &str) -> Option<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/eip712_recover.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(signature_hex)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(typed_data_json.as_bytes())?;
            }
            child.wait_with_output()
        });
    match out {
        Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            if err.contains("No module named") && std::env::var("CI").as_deref() != Ok("true") {
                eprintln!(
                    "SKIPPED independent EIP-712 check: python eth-account is not installed (pip install eth-account)"
                );
                None
            } else {
                panic!("eth-account recovery failed: {err}");
            }
        }
        Err(e) => panic!("cannot run python3: {e}"),
    }
}

/// Verifies with Python's joserfc (an independent implementation) when installed. Under
/// `CI=true` it must be installed; otherwise a missing library prints a loud SKIPPED line.
pub fn joserfc_verify(jwks_path: &Path, token: &str) -> Option<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/jose_verify.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(jwks_path)
        .arg(token)
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            Some(serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("joserfc output {text:?}: {e}")))
        }
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            if err.contains("No module named") && std::env::var("CI").as_deref() != Ok("true") {
                eprintln!("SKIPPED independent JWS check: python joserfc is not installed (pip install joserfc)");
                None
            } else {
                panic!("joserfc verification failed: {err}");
            }
        }
        Err(e) => panic!("cannot run python3: {e}"),
    }
}

/// As `joserfc_verify`, with the JWKS given as JSON text.
pub fn jose_verify(jwks_json: &str, token: &str) -> Option<serde_json::Value> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks_json).expect("write jwks");
    joserfc_verify(&path, token)
}

/// A controller wallet: a software secp256k1 key that signs typed data the
/// way `eth_signTypedData_v4` does.
pub struct Wallet(pub k256::ecdsa::SigningKey);

impl Wallet {
    /// A deterministic wallet.
    pub fn new(seed: u8) -> Wallet {
        Wallet(k256::ecdsa::SigningKey::from_slice(&[seed; 32]).expect("key"))
    }

    pub fn address(&self) -> keyward::crypto::eth::Address {
        keyward::crypto::eth::Address::from_public_key(self.0.verifying_key())
    }

    /// r‖s‖v over the document's EIP-712 signing hash.
    pub fn sign(&self, typed_data_json: &str) -> Vec<u8> {
        let digest = keyward::crypto::eip712::TypedData::from_json_str(typed_data_json)
            .expect("typed data encodes")
            .signing_hash();
        keyward::crypto::eth::sign_digest(&self.0, &digest)
            .expect("sign")
            .to_vec()
    }
}

/// Starts the `keyward` binary's `dev` command on `home` with `extra`
/// arguments (loopback ports chosen by the OS) and waits for its `ready` line.
pub fn start_dev(home: &Path, extra: &[&str]) -> std::process::Child {
    start_dev_with(home, extra, None)
}

/// As [`start_dev`]; with `nofile`, the daemon runs under that
/// file-descriptor limit (`ulimit -n`, as systemd's `LimitNOFILE` sets it).
pub fn start_dev_with(home: &Path, extra: &[&str], nofile: Option<u64>) -> std::process::Child {
    spawn_dev(home, extra, nofile, None)
}

/// As [`start_dev`], with the daemon's log (stderr) written to `log`.
pub fn start_dev_logging(home: &Path, extra: &[&str], log: &Path) -> std::process::Child {
    spawn_dev(home, extra, None, Some(log))
}

fn spawn_dev(home: &Path, extra: &[&str], nofile: Option<u64>, log: Option<&Path>) -> std::process::Child {
    use std::io::BufRead as _;
    let mut cmd = match nofile {
        Some(n) => {
            let mut c = std::process::Command::new("sh");
            c.args([
                "-c",
                &format!("ulimit -n {n} && exec \"$0\" \"$@\""),
                env!("CARGO_BIN_EXE_keyward"),
            ]);
            c
        }
        None => std::process::Command::new(env!("CARGO_BIN_EXE_keyward")),
    };
    let mut child = cmd
        .arg("--home")
        .arg(home)
        .args(["dev", "--listen", "127.0.0.1:0", "--https-listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(extra)
        .env_remove("SOFTHSM2_CONF")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(match log {
            Some(path) => std::process::Stdio::from(std::fs::File::create(path).expect("log file")),
            None => std::process::Stdio::inherit(),
        })
        .spawn()
        .expect("spawn keyward dev");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) if l == "ready" => return child,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                panic!("keyward dev did not print ready: {e}");
            }
        }
    }
}

/// Sends `signal` (`-TERM`, `-KILL`) to the child's PID and waits for it.
pub fn signal(child: &mut std::process::Child, signal: &str) {
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .expect("kill")
        .success());
    child.wait().expect("wait");
}

/// A channel to a `keyward dev` daemon under `home`, as one of its client
/// profiles (from the client file `dev` writes).
pub async fn dev_channel(home: &Path, profile: &str) -> Channel {
    let f = keyward::dev::read_client_file(home).expect("client file");
    let p = f.profiles.get(profile).expect("profile");
    let files = ClientTlsFiles {
        ca: f.ca.clone(),
        cert: Some(p.cert.clone()),
        key: Some(p.key.clone()),
        domain: f.domain.clone(),
    };
    keyward::tls::connect(&f.endpoint, &files).await.expect("connect")
}

/// Decodes a raw signed transaction with Python's eth-account (an independent
/// implementation): its recovered sender, type and fields as JSON, when
/// eth-account is installed. Under CI it must be installed.
pub fn eth_account_decode_tx(raw: &[u8]) -> Option<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/tx_decode.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(format!("0x{}", hex::encode(raw)))
        .output()
        .expect("run python3");
    if out.status.success() {
        return Some(serde_json::from_slice(&out.stdout).expect("decoder JSON"));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("No module named") && std::env::var("CI").as_deref() != Ok("true") {
        eprintln!("SKIPPED independent transaction check: python eth-account is not installed");
        return None;
    }
    panic!("eth-account could not decode the transaction: {err}");
}

/// Runs the `keyward` binary against daemon `d` as `profile`.
pub fn cli(env: &Env, d: &Daemon, profile: &str, args: &[&str]) -> (bool, String, String) {
    let p = env.pki.clients.iter().find(|c| c.name == profile).expect("profile");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
        .arg("--home")
        .arg(env.dir.path().join("cli-home"))
        .arg("--endpoint")
        .arg(&d.grpc)
        .arg("--ca")
        .arg(&env.pki.ca_cert)
        .arg("--cert")
        .arg(&p.cert)
        .arg("--key")
        .arg(&p.key)
        .args(args)
        .output()
        .expect("run keyward");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}
