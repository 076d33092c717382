//! `keyward dev`: everything a developer needs under one home folder, created
//! on first run and reused after — dev certificates, a SoftHSM2 token with a
//! random PIN (stored 0600), a config file, a SQLite store and the client
//! profile file the CLI reads.
//!
//! The token is initialised through PKCS#11 (C_InitToken, C_InitPIN), not by
//! running `softhsm2-util`, which takes PINs only as command-line arguments
//! (readable by every local user in /proc/PID/cmdline) or from a prompt.

use rand::RngCore;
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

use crate::tls::devpki::{ensure_dev_pki, DevPki};

/// The dev client identities.
pub const DEV_CLIENTS: [&str; 3] = ["admin", "marketplace", "wallet-gateway"];
/// The dev token's label.
pub const DEV_TOKEN_LABEL: &str = "keyward-dev";
/// Default gRPC listener in dev mode.
pub const DEV_LISTEN: &str = "127.0.0.1:7443";
/// Default HTTPS side listener in dev mode.
pub const DEV_HTTPS_LISTEN: &str = "127.0.0.1:7444";

/// A dev home that could not be prepared.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevError {
    /// Filesystem trouble.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Certificates.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The dev token could not be initialised.
    #[error("dev token: {0}")]
    Token(#[from] crate::hsm::HsmError),
    /// The default policy set could not be written.
    #[error("policies: {0}")]
    Policy(String),
    /// The client profile file.
    #[error("client profile {path}: {reason}")]
    Profile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DevError + '_ {
    move |source| DevError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `prepare` set up.
#[derive(Debug)]
pub struct DevHome {
    /// The home folder.
    pub home: PathBuf,
    /// The server config file.
    pub config: PathBuf,
    /// The softhsm2.conf to export as SOFTHSM2_CONF.
    pub softhsm_conf: PathBuf,
    /// The certificates.
    pub pki: DevPki,
}

fn random_pin(bytes: usize) -> SecretString {
    let mut b = Zeroizing::new(vec![0u8; bytes]);
    rand::rngs::OsRng.fill_bytes(&mut b);
    SecretString::from(hex::encode(&*b))
}

/// A new 0600 file holding `secret` and a newline.
fn write_secret(path: &Path, secret: &SecretString) -> Result<(), DevError> {
    let line = Zeroizing::new(format!("{}\n", secret.expose_secret()));
    write_new(path, &line, 0o600)
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), DevError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    f.write_all(contents.as_bytes()).map_err(io(path))
}

/// The SoftHSM2 library, from `KEYWARD_PKCS11_MODULE` or Debian's paths.
pub fn softhsm_module() -> PathBuf {
    crate::testkit::SoftHsmToken::module_path()
}

/// Creates (first run) or reuses the dev home.
pub fn prepare(home: &Path, custody: crate::config::Custody) -> Result<DevHome, DevError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(home)
        .map_err(io(home))?;
    let home = home.canonicalize().map_err(io(home))?;
    let pki = ensure_dev_pki(&home.join("pki"), &DEV_CLIENTS)?;

    let tokens = home.join("tokens");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&tokens)
        .map_err(io(&tokens))?;
    let softhsm_conf = home.join("softhsm2.conf");
    if !softhsm_conf.exists() {
        write_new(
            &softhsm_conf,
            &format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
            0o600,
        )?;
    }
    let pin_file = home.join("hsm-pin");
    if !pin_file.exists() {
        let pin = random_pin(16);
        let so_pin = random_pin(16);
        // SoftHSM reads SOFTHSM2_CONF at C_Initialize. Sound: `prepare` runs on
        // the main thread before the runtime or any other thread starts.
        std::env::set_var("SOFTHSM2_CONF", &softhsm_conf);
        crate::hsm::init_token(&softhsm_module(), DEV_TOKEN_LABEL, &so_pin, &pin)?;
        write_secret(&home.join("hsm-so-pin"), &so_pin)?;
        write_secret(&pin_file, &pin)?;
    }

    crate::policy::install_defaults(&home.join("policies")).map_err(|e| DevError::Policy(e.to_string()))?;
    let config = home.join("keyward.toml");
    if !config.exists() {
        write_new(&config, &dev_config_text(&home, custody), 0o600)?;
    }
    Ok(DevHome {
        home,
        config,
        softhsm_conf,
        pki,
    })
}

fn dev_config_text(home: &Path, custody: crate::config::Custody) -> String {
    format!(
        r#"# keyward dev configuration, written by `keyward dev` on first run.
# See deploy/keyward.example.toml for every key.

[server]
listen = "{DEV_LISTEN}"
https_listen = "{DEV_HTTPS_LISTEN}"
# One daemon, no load balancer to move away from: stop at once on SIGTERM.
drain_seconds = 0

[tls]
cert = "pki/server.pem"
key = "pki/server-key.pem"
client_ca = "pki/ca.pem"

[hsm]
module = "{module}"
token_label = "{DEV_TOKEN_LABEL}"
pin_file = "hsm-pin"
pool_size = 4
softhsm_conf = "softhsm2.conf"

[keys]
custody = "{custody}"

[store]
url = "sqlite://{db}"

[policy]
# Written from the defaults shipped in the binary on first run; edit freely
# (`keyward policy check --dir policies` validates, SIGHUP reloads).
dir = "policies"
"#,
        module = softhsm_module().display(),
        custody = custody.as_str(),
        db = home.join("keyward.db").display(),
    )
}

/// The CLI's view of a home folder: where the daemon listens and which
/// certificate each client profile uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// gRPC endpoint, `https://host:port`.
    pub endpoint: String,
    /// HTTPS side endpoint.
    pub https: String,
    /// Metrics endpoint, `http://host:port` (absent: metrics are off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// CA that signed the server certificate.
    pub ca: PathBuf,
    /// Name the server certificate carries.
    pub domain: String,
    /// Profiles by name.
    pub profiles: std::collections::BTreeMap<String, Profile>,
}

/// One client identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The identity its certificate carries.
    pub identity: String,
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// Where the client file lives in a home.
pub fn client_file_path(home: &Path) -> PathBuf {
    home.join("client.toml")
}

/// Writes the client profile file for a serving daemon (atomically).
pub fn write_client_file(home: &Path, pki: &DevPki, endpoints: crate::server::Endpoints) -> Result<(), DevError> {
    let file = ClientFile {
        endpoint: format!("https://{}", endpoints.grpc),
        https: format!("https://{}", endpoints.https),
        metrics: endpoints.metrics.map(|m| format!("http://{m}")),
        ca: pki.ca_cert.clone(),
        domain: "localhost".into(),
        profiles: pki
            .clients
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    Profile {
                        identity: c.identity.clone(),
                        cert: c.cert.clone(),
                        key: c.key.clone(),
                    },
                )
            })
            .collect(),
    };
    let path = client_file_path(home);
    let text = toml::to_string_pretty(&file).map_err(|e| DevError::Profile {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let tmp = home.join(".client.toml.tmp");
    let _ = std::fs::remove_file(&tmp);
    write_new(
        &tmp,
        &format!("# written by `keyward dev`; read by the keyward CLI\n{text}"),
        0o644,
    )?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

/// Reads a home's client profile file.
pub fn read_client_file(home: &Path) -> Result<ClientFile, DevError> {
    let path = client_file_path(home);
    let text = std::fs::read_to_string(&path).map_err(|e| DevError::Profile {
        path: path.clone(),
        reason: format!(
            "{e} (start `keyward dev --home {}` first, or pass --endpoint and certificate flags)",
            home.display()
        ),
    })?;
    toml::from_str(&text).map_err(|e| DevError::Profile {
        path,
        reason: e.to_string(),
    })
}
