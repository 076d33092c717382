//! Server-side TLS configuration: loading, reloading, and the two configs
//! (mutual-TLS gRPC, and server-auth-only HTTPS for the public side port).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use super::error::TlsError;
use super::identity::IdentityRules;

/// Where the server's TLS material lives on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    /// PEM certificate chain presented by the server (leaf first).
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1) for `cert`.
    pub key: PathBuf,
    /// PEM bundle of CA certificates that client certificates must chain to.
    pub client_ca: PathBuf,
}

/// How client certificates are judged beyond their chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// What names a client (see [`crate::tls::identity`]).
    pub identity: IdentityRules,
    /// PEM files of certificate revocation lists of the client CAs; read at
    /// load and at every reload, with the certificates.
    pub crls: Vec<PathBuf>,
}

#[derive(Debug)]
struct Configs {
    grpc: Arc<ServerConfig>,
    https: Arc<ServerConfig>,
}

/// Reloadable server TLS state shared by all listeners.
#[derive(Debug)]
pub struct ServerTls {
    paths: TlsPaths,
    options: TlsOptions,
    configs: RwLock<Arc<Configs>>,
    handshake_failures: AtomicU64,
}

impl ServerTls {
    /// Read the three files and build both configurations, with the
    /// default options (a client is its one URI SAN; no CRLs).
    pub fn load(paths: TlsPaths) -> Result<Arc<ServerTls>, TlsError> {
        ServerTls::load_with(paths, TlsOptions::default())
    }

    /// As [`ServerTls::load`], with identity rules and CRLs.
    pub fn load_with(paths: TlsPaths, options: TlsOptions) -> Result<Arc<ServerTls>, TlsError> {
        let configs = build_configs(&paths, &options)?;
        Ok(Arc::new(ServerTls {
            paths,
            options,
            configs: RwLock::new(Arc::new(configs)),
            handshake_failures: AtomicU64::new(0),
        }))
    }

    /// Re-read all three files and the CRLs. On error the current
    /// configuration stays in force and the error is returned. Only new
    /// connections see the change.
    pub fn reload(&self) -> Result<(), TlsError> {
        let configs = build_configs(&self.paths, &self.options)?;
        let mut guard = self.configs.write().unwrap_or_else(|e| e.into_inner());
        *guard = Arc::new(configs);
        drop(guard);
        tracing::info!(cert = %self.paths.cert.display(), "server TLS material reloaded");
        Ok(())
    }

    /// A digest of the contents of every file this state is loaded from
    /// (certificate, key, client CA, CRLs); a missing or unreadable file
    /// counts as its own content, so its return is a change too.
    pub fn files_fingerprint(&self) -> [u8; 32] {
        use sha2::{Digest as _, Sha256};
        let mut h = Sha256::new();
        let files = [&self.paths.cert, &self.paths.key, &self.paths.client_ca]
            .into_iter()
            .chain(self.options.crls.iter());
        for path in files {
            h.update(path.as_os_str().as_encoded_bytes());
            match std::fs::read(path) {
                Ok(bytes) => {
                    h.update([1]);
                    h.update((bytes.len() as u64).to_be_bytes());
                    h.update(Sha256::digest(&bytes));
                }
                Err(_) => h.update([0]),
            }
        }
        h.finalize().into()
    }

    /// Reloads when the files' contents change, checking every `every`
    /// until `stop` turns true. A set that does not load is refused once
    /// (logged) and the current one stays until the files change again.
    pub async fn watch(self: Arc<Self>, every: std::time::Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        if every.is_zero() {
            return;
        }
        let fingerprint = |tls: &Arc<ServerTls>| {
            let tls = tls.clone();
            tokio::task::spawn_blocking(move || tls.files_fingerprint())
        };
        let mut seen = match fingerprint(&self).await {
            Ok(f) => f,
            Err(_) => return,
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tick.tick() => {}
            }
            let Ok(now) = fingerprint(&self).await else {
                continue;
            };
            if now == seen {
                continue;
            }
            seen = now;
            // A writer may still be mid-way through the files (key before
            // certificate): a failed load is retried at the next change.
            if let Err(e) = self.reload() {
                tracing::error!(error = %e, "certificate files changed but do not load; keeping the current ones");
            }
        }
    }

    /// Mutual-TLS config for the gRPC listener: TLS 1.3 only, ALPN `h2`,
    /// client certificate required and verified against `client_ca`.
    pub fn grpc_config(&self) -> Arc<ServerConfig> {
        self.current().grpc.clone()
    }

    /// Server-auth-only config for the public HTTPS side port (JWKS,
    /// metrics): TLS 1.3 only, ALPN `h2` and `http/1.1`, no client auth.
    pub fn https_config(&self) -> Arc<ServerConfig> {
        self.current().https.clone()
    }

    /// The files this state is loaded from.
    pub fn paths(&self) -> &TlsPaths {
        &self.paths
    }

    /// What names a client.
    pub fn identity_rules(&self) -> &IdentityRules {
        &self.options.identity
    }

    /// Number of inbound gRPC connections refused during the TLS handshake
    /// (including timeouts and verified certificates without an identity).
    pub fn handshake_failures(&self) -> u64 {
        self.handshake_failures.load(Ordering::Relaxed)
    }

    pub(crate) fn record_handshake_failure(&self) {
        self.handshake_failures.fetch_add(1, Ordering::Relaxed);
    }

    fn current(&self) -> Arc<Configs> {
        self.configs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every CRL of every file, in order.
fn read_crls(files: &[PathBuf]) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let mut crls = Vec::new();
    for path in files {
        let bytes = read_file(path)?;
        let before = crls.len();
        for crl in CertificateRevocationListDer::pem_slice_iter(&bytes) {
            crls.push(crl.map_err(|e| TlsError::Invalid {
                path: path.clone(),
                reason: format!("bad CRL PEM: {e}"),
            })?);
        }
        if crls.len() == before {
            return Err(TlsError::Invalid {
                path: path.clone(),
                reason: "no X509 CRL block".into(),
            });
        }
    }
    Ok(crls)
}

fn build_configs(paths: &TlsPaths, options: &TlsOptions) -> Result<Configs, TlsError> {
    let chain = read_certs(&paths.cert)?;
    let key = read_key(&paths.key)?;
    let ca_certs = read_certs(&paths.client_ca)?;

    let mut roots = RootCertStore::empty();
    for ca in ca_certs {
        roots.add(ca).map_err(|e| TlsError::Invalid {
            path: paths.client_ca.clone(),
            reason: format!("unusable CA certificate: {e}"),
        })?;
    }
    let provider = provider();
    let crls = read_crls(&options.crls)?;
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if !crls.is_empty() {
        // The leaf's revocation, by the CRL of its issuer; a leaf from a CA
        // that has no CRL listed is judged by its chain alone.
        builder = builder
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    let webpki = builder.build().map_err(|e| TlsError::Invalid {
        path: options.crls.first().unwrap_or(&paths.client_ca).clone(),
        reason: format!("client verifier: {e}"),
    })?;
    let verifier = Arc::new(super::verifier::IdentityVerifier::new(webpki, options.identity.clone()));

    let rustls_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Rustls { path, source }
    };

    let mut grpc = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(rustls_err(&paths.cert))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(rustls_err(&paths.key))?;
    grpc.alpn_protocols = vec![b"h2".to_vec()];

    let mut https = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(rustls_err(&paths.cert))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(rustls_err(&paths.key))?;
    https.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

    Ok(Configs {
        grpc: Arc::new(grpc),
        https: Arc::new(https),
    })
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Read every CERTIFICATE block of a PEM file; error if there is none.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(path, &read_file(path)?)
}

/// Parse every CERTIFICATE block of PEM `bytes` read from `path`.
pub(crate) fn parse_certs(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_path_buf(),
            reason: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Read the first private key block of a PEM file.
pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    parse_key(path, &read_file(path)?)
}

/// Parse the first private key block of PEM `bytes` read from `path`.
pub(crate) fn parse_key(path: &Path, bytes: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_path_buf(),
        },
        other => TlsError::Invalid {
            path: path.to_path_buf(),
            reason: format!("bad PEM: {other}"),
        },
    })
}
