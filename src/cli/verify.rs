//! `keyward verify`: offline verification of a compact JWS (receipt,
//! attestation, session token) for operators. The JWKS comes from a file or
//! an https URL (server-authenticated TLS against `--ca`, default the dev
//! home's CA); exit 0 with the claims, or exit 1 with the reason.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::ClientOpts;
use crate::crypto::jwk::Jwks;
use crate::crypto::jws;

/// Largest JWKS document fetched.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Arguments of `keyward verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The compact JWS, or a file holding it.
    pub token: String,
    /// JWKS: an https URL or a file (default: the dev home's issuer JWKS URL).
    #[arg(long)]
    pub jwks: Option<String>,
}

/// Runs `keyward verify`: Ok(true) verified, Ok(false) refused (reason printed).
pub async fn verify(home: &Path, opts: &ClientOpts, args: VerifyArgs) -> anyhow::Result<bool> {
    let token = if Path::new(&args.token).is_file() {
        std::fs::read_to_string(&args.token).with_context(|| format!("reading {}", args.token))?
    } else {
        args.token.clone()
    };
    let token = token.trim();
    let (source, ca) = match &args.jwks {
        Some(s) => (s.clone(), opts.ca.clone()),
        None => {
            let f = crate::dev::read_client_file(home)
                .context("no --jwks given and no dev home to take the issuer JWKS URL from")?;
            (
                format!("{}/.well-known/jwks.json", f.https.trim_end_matches('/')),
                opts.ca.clone().or(Some(f.ca)),
            )
        }
    };
    let text = read_jwks_source(home, opts, &source, ca).await?;
    let jwks: Jwks = serde_json::from_str(&text).with_context(|| format!("{source} is not a JWKS"))?;
    match jws::verify_compact(token, &jwks.keys) {
        Ok(v) => {
            let out = json!({
                "valid": true,
                "header": {"alg": v.header.alg.as_str(), "kid": v.header.kid, "typ": v.header.typ},
                "claims": v.claims,
            });
            if opts.json {
                println!("{out}");
            } else {
                println!("valid: alg {} kid {}", v.header.alg, v.header.kid.unwrap_or_default());
                println!("{}", serde_json::to_string_pretty(&out["claims"]).unwrap_or_default());
            }
            Ok(true)
        }
        Err(e) => {
            if opts.json {
                println!("{}", json!({"valid": false, "reason": e.to_string()}));
            }
            eprintln!("invalid: {e}");
            Ok(false)
        }
    }
}

/// The text of a JWKS from an https URL (server-authenticated TLS trusting
/// `ca`, default the dev home's CA) or a file.
pub async fn read_jwks_source(
    home: &Path,
    opts: &ClientOpts,
    source: &str,
    ca: Option<PathBuf>,
) -> anyhow::Result<String> {
    if source.starts_with("https://") {
        let ca = match ca {
            Some(c) => c,
            None => default_ca(home),
        };
        let domain = opts.domain.clone().unwrap_or_else(|| "localhost".into());
        let (status, body) = https_get(source, &ca, &domain).await?;
        anyhow::ensure!(status == 200, "GET {source}: HTTP {status}");
        Ok(body)
    } else {
        std::fs::read_to_string(source).with_context(|| format!("reading JWKS {source}"))
    }
}

/// A raw HTTP/1.1 GET over TLS (server authentication only, trusting `ca`):
/// returns the status and the body. Enough for a JWKS; not a general client.
pub async fn https_get(url: &str, ca: &Path, domain: &str) -> anyhow::Result<(u16, String)> {
    let rest = url.strip_prefix("https://").context("not an https:// URL")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:443")
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading CA {}", ca.display()))? {
        roots.add(c.context("CA PEM")?).context("CA certificate")?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(domain.to_string()).context("TLS server name")?;
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS handshake with {addr}"))?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
        );
        tls.write_all(req.as_bytes()).await?;
        tls.flush().await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = match tls.read(&mut chunk).await {
                Ok(n) => n,
                // Servers may close without close_notify after Connection: close.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            anyhow::ensure!(buf.len() <= MAX_JWKS_BYTES + 16 * 1024, "response too large");
        }
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(std::time::Duration::from_secs(10), fetch)
        .await
        .context("timed out")??;
    parse_response(&buf)
}

fn parse_response(buf: &[u8]) -> anyhow::Result<(u16, String)> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP response head")?;
    let head = std::str::from_utf8(&buf[..end]).context("HTTP head is not text")?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .context("bad status line")?;
    let mut body = buf[end + 4..].to_vec();
    let mut chunked = false;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                let n: usize = v.trim().parse().context("Content-Length")?;
                anyhow::ensure!(body.len() >= n, "body shorter than Content-Length");
                body.truncate(n);
            }
            if k.trim().eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
    if chunked {
        body = dechunk(&body)?;
    }
    Ok((status, String::from_utf8(body).context("body is not UTF-8")?))
}

fn dechunk(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let i = b.windows(2).position(|w| w == b"\r\n").context("bad chunk")?;
        let size_text = std::str::from_utf8(&b[..i])?.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).context("bad chunk size")?;
        b = &b[i + 2..];
        if size == 0 {
            return Ok(out);
        }
        anyhow::ensure!(b.len() >= size + 2, "truncated chunk");
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// The default CA for `verify` when no --ca is given.
pub fn default_ca(home: &Path) -> PathBuf {
    home.join("pki/ca.pem")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").expect("parse");
        assert_eq!((s, b.as_str()), (200, "{}"));
        let (s, b) =
            parse_response(b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
                .expect("parse");
        assert_eq!((s, b.as_str()), (404, "abc"));
        assert!(parse_response(b"garbage").is_err());
    }
}
