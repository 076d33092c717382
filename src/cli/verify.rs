//! `keyward verify`: offline verification of a compact JWS (receipt,
//! attestation, session token) for operators. The keys come from the issuer
//! key history and/or a JWKS, each a file or an https URL (server-authenticated
//! TLS against `--ca`, default the dev home's CA); exit 0 with the claims, or
//! exit 1 with the reason.

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
use crate::jwks::history::{KeyHistory, HISTORY_PATH};

/// Largest JWKS document fetched.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Arguments of `keyward verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The compact JWS, or a file holding it.
    pub token: String,
    /// JWKS: an https URL or a file. Alone, only the keys published now verify.
    #[arg(long)]
    pub jwks: Option<String>,
    /// The issuer key history (an https URL or a file; default, when no --jwks is given: the dev
    /// home's side port): every issuer key ever published, so that what a retired key signed
    /// still verifies, and what a revoked key signed verifies only if signed before the revocation.
    #[arg(long)]
    pub history: Option<String>,
}

/// The keys to verify issuer signatures with: the issuer key history, a JWKS, or both (a JWKS
/// key the history lacks is added without times).
pub async fn read_keys(
    home: &Path,
    opts: &ClientOpts,
    history: Option<&str>,
    jwks: Option<&str>,
    ca: Option<PathBuf>,
) -> anyhow::Result<KeyHistory> {
    let mut keys = match history {
        Some(source) => {
            let text = read_jwks_source(home, opts, source, ca.clone()).await?;
            serde_json::from_str::<KeyHistory>(&text)
                .with_context(|| format!("{source} is not an issuer key history"))?
        }
        None => KeyHistory::default(),
    };
    if let Some(source) = jwks {
        let text = read_jwks_source(home, opts, source, ca).await?;
        let set: Jwks = serde_json::from_str(&text).with_context(|| format!("{source} is not a JWKS"))?;
        keys.merge(KeyHistory::from_jwks(&set.keys));
    }
    Ok(keys)
}

/// Runs `keyward verify`: Ok(true) verified, Ok(false) refused (reason printed).
pub async fn verify(home: &Path, opts: &ClientOpts, args: VerifyArgs) -> anyhow::Result<bool> {
    let token = if Path::new(&args.token).is_file() {
        std::fs::read_to_string(&args.token).with_context(|| format!("reading {}", args.token))?
    } else {
        args.token.clone()
    };
    let token = token.trim();
    let (history, ca) = match (&args.history, &args.jwks) {
        (None, None) => {
            let f = crate::dev::read_client_file(home)
                .context("no --history or --jwks given and no dev home to take the issuer key history URL from")?;
            (
                Some(format!("{}{HISTORY_PATH}", f.https.trim_end_matches('/'))),
                opts.ca.clone().or(Some(f.ca)),
            )
        }
        (h, _) => (h.clone(), opts.ca.clone()),
    };
    let keys = read_keys(home, opts, history.as_deref(), args.jwks.as_deref(), ca).await?;
    match keys.verify(token) {
        Ok(v) => {
            let kid = v.header.kid.clone().unwrap_or_default();
            let key = keys.get(&kid);
            let out = json!({
                "valid": true,
                "header": {"alg": v.header.alg.as_str(), "kid": v.header.kid, "typ": v.header.typ},
                "claims": v.claims,
                "key": key.map(|k| json!({
                    "created_at": k.created_at,
                    "activated_at": k.activated_at,
                    "retired_at": k.retired_at,
                    "revoked_at": k.revoked_at,
                })),
            });
            if opts.json {
                println!("{out}");
            } else {
                println!("valid: alg {} kid {}", v.header.alg, kid);
                if let Some(k) = key {
                    if let Some(t) = k.revoked_at {
                        println!("key revoked at {t}; signed before that");
                    } else if let Some(t) = k.retired_at {
                        println!("key retired at {t}");
                    }
                }
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
/// `ca`, default the dev home's CA; the server name checked is `--domain`,
/// else the URL's host) or a file.
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
        let domain = match &opts.domain {
            Some(d) => d.clone(),
            None => Target::parse(source, "https://", 443)?.host,
        };
        let (status, body) = https_get(source, &ca, &domain).await?;
        anyhow::ensure!(status == 200, "GET {source}: HTTP {status}");
        Ok(body)
    } else {
        std::fs::read_to_string(source).with_context(|| format!("reading JWKS {source}"))
    }
}

/// Where a URL points: its authority (for `Host:`), its host (the TLS
/// server name: a DNS name or an IP address, brackets removed), the address
/// to connect to, and the path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    authority: String,
    host: String,
    addr: String,
    path: String,
}

impl Target {
    fn parse(url: &str, scheme: &str, default_port: u16) -> anyhow::Result<Target> {
        let rest = url
            .strip_prefix(scheme)
            .with_context(|| format!("not a {scheme} URL: {url}"))?;
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        anyhow::ensure!(!authority.contains('@'), "{url}: user information is not supported");
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .with_context(|| format!("{url}: unclosed [ in the host"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        anyhow::ensure!(!host.is_empty(), "{url}: no host");
        let port = match port {
            Some(p) => p.parse::<u16>().with_context(|| format!("{url}: bad port {p:?}"))?,
            None => default_port,
        };
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Target {
            authority: authority.to_string(),
            host: host.to_string(),
            addr,
            path,
        })
    }
}

/// A raw HTTP/1.1 GET over TLS (server authentication only, trusting `ca`,
/// checking the server name `domain`): returns the status and the body.
/// Enough for a JWKS; not a general client.
pub async fn https_get(url: &str, ca: &Path, domain: &str) -> anyhow::Result<(u16, String)> {
    let target = Target::parse(url, "https://", 443)?;
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
    within_deadline(async {
        let tcp = connect(&target).await?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS handshake with {}", target.addr))?;
        exchange(tls, &target).await
    })
    .await
}

/// A raw HTTP/1.1 GET in plain HTTP (the loopback metrics listener):
/// returns the status and the body.
pub async fn http_get(url: &str) -> anyhow::Result<(u16, String)> {
    let target = Target::parse(url, "http://", 80)?;
    within_deadline(async { exchange(connect(&target).await?, &target).await }).await
}

async fn connect(target: &Target) -> anyhow::Result<tokio::net::TcpStream> {
    tokio::net::TcpStream::connect(&target.addr)
        .await
        .with_context(|| format!("connecting to {}", target.addr))
}

/// Runs one exchange within 10 seconds and parses the response.
async fn within_deadline(
    fetch: impl std::future::Future<Output = anyhow::Result<Vec<u8>>>,
) -> anyhow::Result<(u16, String)> {
    let buf = tokio::time::timeout(std::time::Duration::from_secs(10), fetch)
        .await
        .context("timed out")??;
    parse_response(&buf)
}

/// Sends the GET and reads the whole response (at most
/// [`MAX_JWKS_BYTES`] of body and 16 KiB of head).
async fn exchange<S>(mut stream: S, target: &Target) -> anyhow::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
        target.path, target.authority
    );
    stream.write_all(req.as_bytes()).await?;
    stream.flush().await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = match stream.read(&mut chunk).await {
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
    Ok(buf)
}

/// Why a response body could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum BodyError {
    /// A chunk-size line has no CRLF within its length limit.
    #[error("chunk-size line missing or longer than {MAX_CHUNK_LINE} bytes")]
    ChunkLine,
    /// The chunk size is not 1 to 16 hex digits.
    #[error("chunk size {0:?} is not hexadecimal (1 to 16 digits)")]
    ChunkSize(String),
    /// The body would pass the cap.
    #[error("body larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    /// The data ends inside a chunk.
    #[error("truncated chunk")]
    Truncated,
    /// A chunk's data is not followed by CRLF.
    #[error("chunk data not followed by CRLF")]
    ChunkEnd,
}

/// The longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE: usize = 1024;

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
    let mut body = buf.get(end + 4..).unwrap_or_default().to_vec();
    let mut chunked = false;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                let n: usize = v.trim().parse().context("Content-Length")?;
                anyhow::ensure!(n <= MAX_JWKS_BYTES, BodyError::TooLarge);
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
    anyhow::ensure!(body.len() <= MAX_JWKS_BYTES, BodyError::TooLarge);
    Ok((status, String::from_utf8(body).context("body is not UTF-8")?))
}

/// Decodes a chunked body, at most [`MAX_JWKS_BYTES`]; every length is
/// checked before it is added or sliced with.
fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, BodyError> {
    let mut out = Vec::new();
    loop {
        let window = b.get(..b.len().min(MAX_CHUNK_LINE + 2)).unwrap_or_default();
        let i = window
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or(BodyError::ChunkLine)?;
        let line = String::from_utf8_lossy(&window[..i]);
        let size_text = line.split(';').next().unwrap_or("").trim();
        if size_text.is_empty() || size_text.len() > 16 || !size_text.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(BodyError::ChunkSize(size_text.chars().take(32).collect()));
        }
        let size = usize::from_str_radix(size_text, 16).map_err(|_| BodyError::ChunkSize(size_text.to_string()))?;
        b = &b[i + 2..];
        if size == 0 {
            return Ok(out);
        }
        let total = out.len().checked_add(size).ok_or(BodyError::TooLarge)?;
        if total > MAX_JWKS_BYTES {
            return Err(BodyError::TooLarge);
        }
        let with_crlf = size.checked_add(2).ok_or(BodyError::TooLarge)?;
        let chunk = b.get(..with_crlf).ok_or(BodyError::Truncated)?;
        if &chunk[size..] != b"\r\n" {
            return Err(BodyError::ChunkEnd);
        }
        out.extend_from_slice(&chunk[..size]);
        b = &b[with_crlf..];
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

    #[test]
    fn the_server_name_is_the_urls_host() {
        let t = Target::parse("https://jwks.example.org:8443/.well-known/jwks.json", "https://", 443).expect("url");
        assert_eq!(
            (t.host.as_str(), t.addr.as_str(), t.path.as_str()),
            ("jwks.example.org", "jwks.example.org:8443", "/.well-known/jwks.json")
        );
        let t = Target::parse("https://10.0.0.7/x", "https://", 443).expect("url");
        assert_eq!((t.host.as_str(), t.addr.as_str()), ("10.0.0.7", "10.0.0.7:443"));
        let t = Target::parse("https://[::1]:7444", "https://", 443).expect("url");
        assert_eq!(
            (t.host.as_str(), t.addr.as_str(), t.path.as_str(), t.authority.as_str()),
            ("::1", "[::1]:7444", "/", "[::1]:7444")
        );
        for bad in [
            "https://:443/x",
            "https://user@host/x",
            "https://host:99999/",
            "https://[::1/",
            "http://host/",
        ] {
            assert!(Target::parse(bad, "https://", 443).is_err(), "{bad}");
        }
    }

    /// Serves one JWKS over TLS on 127.0.0.1:0 with a certificate (from a
    /// fresh CA) naming only `sans`; returns its address, the CA file and
    /// the folder holding it.
    async fn jwks_server(sans: &[&str]) -> (std::net::SocketAddr, PathBuf, tempfile::TempDir) {
        use crate::tls::devpki::{issue, new_ca, CertSpec};
        use rustls::pki_types::PrivateKeyDer;
        let (ca_cert, ca_key) = new_ca("verify test CA").expect("CA");
        let now = time::OffsetDateTime::now_utc();
        let spec = CertSpec {
            common_name: "jwks".into(),
            uri_sans: vec![],
            dns_sans: sans.iter().map(|s| s.to_string()).collect(),
            not_before: now - time::Duration::minutes(5),
            not_after: now + time::Duration::days(1),
            client: false,
            server: true,
        };
        let (cert, key) = issue(&ca_cert, &ca_key, &spec).expect("certificate");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &ca_cert).expect("write CA");
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("chain");
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut head = [0u8; 1024];
                let _ = tls.read(&mut head).await;
                let body = r#"{"keys":[]}"#;
                let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                let _ = tls.write_all(reply.as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        });
        (addr, ca, dir)
    }

    fn opts() -> ClientOpts {
        ClientOpts {
            profile: "admin".into(),
            endpoint: None,
            ca: None,
            cert: None,
            key: None,
            domain: None,
            json: false,
        }
    }

    #[tokio::test]
    async fn the_jwks_server_must_be_named_for_the_urls_host() {
        let home = Path::new("/nonexistent");
        // A certificate for localhost only, served at 127.0.0.1: refused
        // (the server name checked is the URL's host, not `localhost`).
        let (addr, ca, _dir) = jwks_server(&["localhost"]).await;
        let url = format!("https://{addr}/.well-known/jwks.json");
        assert!(read_jwks_source(home, &opts(), &url, Some(ca.clone())).await.is_err());
        // ... unless the operator names the server with --domain.
        let named = ClientOpts {
            domain: Some("localhost".into()),
            ..opts()
        };
        assert_eq!(
            read_jwks_source(home, &named, &url, Some(ca)).await.expect("named"),
            r#"{"keys":[]}"#
        );
        // A certificate for the address in the URL: accepted.
        let (addr, ca, _dir) = jwks_server(&["127.0.0.1"]).await;
        let url = format!("https://{addr}/.well-known/jwks.json");
        assert_eq!(
            read_jwks_source(home, &opts(), &url, Some(ca))
                .await
                .expect("by address"),
            r#"{"keys":[]}"#
        );
    }

    #[test]
    fn chunk_sizes_that_overflow_are_refused() {
        // usize::MAX: the old parser computed `size + 2` and overflowed.
        assert_eq!(
            dechunk(b"ffffffffffffffff\r\nab\r\n0\r\n\r\n"),
            Err(BodyError::TooLarge)
        );
        // Past 16 digits, and not hex at all.
        assert!(matches!(
            dechunk(b"10000000000000000\r\nab\r\n"),
            Err(BodyError::ChunkSize(_))
        ));
        for bad in [&b"zz\r\nab\r\n"[..], b"+2\r\nab\r\n0\r\n\r\n", b"\r\nab\r\n", b"-1\r\n"] {
            assert!(matches!(dechunk(bad), Err(BodyError::ChunkSize(_))), "{bad:?}");
        }
    }

    #[test]
    fn a_chunked_body_past_the_cap_is_refused() {
        let mut body = Vec::new();
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..=(MAX_JWKS_BYTES / chunk.len()) {
            body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            body.extend_from_slice(&chunk);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(dechunk(&body), Err(BodyError::TooLarge));
        // One chunk that claims more than the cap, with no data behind it.
        assert_eq!(dechunk(b"100001\r\nab"), Err(BodyError::TooLarge));
        // Exactly the cap is fine.
        let mut exact = format!("{MAX_JWKS_BYTES:x}\r\n").into_bytes();
        exact.extend(std::iter::repeat_n(b'b', MAX_JWKS_BYTES));
        exact.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(dechunk(&exact).map(|v| v.len()), Ok(MAX_JWKS_BYTES));
        // A Content-Length past the cap is refused before the body is read.
        let e = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 1048577\r\n\r\n{}").expect_err("too large");
        assert_eq!(e.downcast_ref::<BodyError>(), Some(&BodyError::TooLarge));
    }

    #[test]
    fn chunk_lines_and_ends_are_bounded() {
        let mut long = vec![b'1'; 1];
        long.extend(std::iter::repeat_n(b';', MAX_CHUNK_LINE + 10));
        long.extend_from_slice(b"\r\na\r\n0\r\n\r\n");
        assert_eq!(dechunk(&long), Err(BodyError::ChunkLine));
        assert_eq!(dechunk(b"5\r\nab"), Err(BodyError::Truncated));
        assert_eq!(dechunk(b"2\r\nabXY0\r\n\r\n"), Err(BodyError::ChunkEnd));
        assert_eq!(dechunk(b"2;ext=1\r\nab\r\n0\r\n\r\n"), Ok(b"ab".to_vec()));
    }
}
