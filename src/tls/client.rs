//! gRPC client side: a tonic `Endpoint`/`Channel` over (mutual) TLS.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::error::TlsError;
use super::server::{parse_certs, parse_key, read_file};

/// Connect timeout applied by [`endpoint`]; callers may override it.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS material for a gRPC client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// PEM CA bundle that the server certificate must chain to.
    pub ca: PathBuf,
    /// PEM client certificate chain (mutual TLS); must be set with `key`.
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`; must be set with `cert`.
    pub key: Option<PathBuf>,
    /// Name the server certificate is verified against (e.g. "localhost").
    pub domain: String,
}

/// Build a TLS-configured endpoint (e.g. `"https://127.0.0.1:7443"`) without
/// connecting, so callers can `connect_lazy()` or open several channels.
pub fn endpoint(endpoint: &str, files: &ClientTlsFiles) -> Result<Endpoint, TlsError> {
    let bad = |reason: String| TlsError::Endpoint {
        endpoint: endpoint.to_owned(),
        reason,
    };
    if files.domain.is_empty() {
        return Err(bad("empty TLS domain name".to_owned()));
    }
    let ca = read_validated_certs(&files.ca)?;
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(files.domain.clone());
    match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            let cert_pem = read_validated_certs(cert)?;
            let key_pem = read_file(key)?;
            parse_key(key, &key_pem)?;
            config = config.identity(Identity::from_pem(cert_pem, key_pem));
        }
        (None, None) => {}
        (Some(_), None) => return Err(bad("client certificate given without a key".to_owned())),
        (None, Some(_)) => return Err(bad("client key given without a certificate".to_owned())),
    }
    Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| bad(format!("invalid URI: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tls_config(config)
        .map_err(|e| bad(format!("TLS settings rejected: {e}")))
}

/// Connect a channel to `endpoint` using [`endpoint`]'s configuration.
pub async fn connect(endpoint_uri: &str, files: &ClientTlsFiles) -> Result<Channel, TlsError> {
    endpoint(endpoint_uri, files)?
        .connect()
        .await
        .map_err(|source| TlsError::Connect {
            endpoint: endpoint_uri.to_owned(),
            source,
        })
}

/// Read a PEM certificate file, checking it holds at least one certificate
/// (so the error names the file rather than surfacing at handshake time).
fn read_validated_certs(path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = read_file(path)?;
    parse_certs(path, &bytes)?;
    Ok(bytes)
}
