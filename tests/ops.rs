//! Operations: certificate and client-CA reload on SIGHUP (and on a change of
//! the files, without a signal) through the real
//! binary, metrics and health on the HTTPS side port, and graceful stop that
//! drains in-flight requests.

// Requests set only the fields a test needs; the proto keeps growing.
#![allow(clippy::needless_update)]

mod common;

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::*;
use ed25519_dalek::Verifier as _;
use hyper_util::rt::TokioIo;
use keyward::api::pb::account_service_client::AccountServiceClient;
use keyward::api::pb::signing_service_client::SigningServiceClient;
use keyward::api::pb::{Account, CreateAccountRequest, SignMessageRequest, SignTypedDataRequest, SignatureAlgorithm};
use keyward::config::Custody;
use keyward::tls::devpki::{issue, new_ca, write_private, CertSpec};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

// ---------------------------------------------------------------------------
// The real binary.

fn keyward(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keyward"));
    c.arg("--home")
        .arg(home)
        .env_remove("SOFTHSM2_CONF")
        .env("RUST_LOG", "warn");
    c
}

/// A `keyward dev` process this test owns; killed on drop if still running.
struct DevProcess {
    child: Child,
    stderr: Receiver<String>,
    home: PathBuf,
    grpc: SocketAddr,
    metrics: String,
}

fn forward_lines(r: impl std::io::Read + Send + 'static, echo: bool) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if echo {
                eprintln!("[keyward] {line}");
            }
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("https://").parse().expect("endpoint address")
}

impl DevProcess {
    /// Starts `keyward dev` on ephemeral ports and waits for its "ready" line.
    fn start(home: &Path) -> DevProcess {
        let mut child = keyward(home)
            .args(["dev", "--listen", "127.0.0.1:0", "--https-listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keyward dev");
        let stdout = forward_lines(child.stdout.take().expect("stdout"), false);
        let stderr = forward_lines(child.stderr.take().expect("stderr"), true);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut lines = Vec::new();
        loop {
            match stdout.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) if l == "ready" => break,
                Ok(l) => lines.push(l),
                Err(_) => {
                    let _ = child.kill();
                    panic!("keyward dev did not print ready: {lines:?}");
                }
            }
        }
        let client = keyward::dev::read_client_file(home).expect("dev wrote client.toml");
        DevProcess {
            child,
            stderr,
            home: home.canonicalize().expect("home"),
            grpc: addr_of(&client.endpoint),
            metrics: client.metrics.expect("dev serves metrics"),
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args([sig, &pid]).status().expect("kill");
        assert!(status.success(), "kill {sig} {pid}");
    }

    /// Waits (deadline 10 s) for a stderr line containing `needle`.
    fn wait_stderr(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self
                .stderr
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) if l.contains(needle) => return,
                Ok(_) => {}
                Err(_) => panic!("daemon did not log {needle:?} within 10 s"),
            }
        }
    }

    fn sigterm(&mut self) -> std::process::ExitStatus {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// TLS clients.

fn first_der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("certificate PEM")
        .to_vec()
}

/// A rustls client config trusting `ca`, presenting `client` if given, and
/// offering one ALPN protocol.
fn client_config(ca: &Path, client: Option<(&Path, &Path)>, alpn: &[u8]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(c.expect("CA PEM")).expect("CA certificate");
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .expect("client certificate file")
                .collect::<Result<Vec<_>, _>>()
                .expect("client certificate PEM");
            let key = PrivateKeyDer::from_pem_file(key).expect("client key");
            builder.with_client_auth_cert(chain, key).expect("client auth")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

async fn tls_connect(addr: SocketAddr, tls: Arc<ClientConfig>) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    TlsConnector::from(tls).connect(name, tcp).await
}

/// What a probing connection saw: the server's leaf certificate, and every
/// plaintext byte the client handed to TLS and flushed to the socket.
#[derive(Clone, Default)]
struct Probe {
    server_cert: Arc<Mutex<Option<Vec<u8>>>>,
    unflushed: Arc<Mutex<Vec<u8>>>,
    flushed: Arc<Mutex<Vec<u8>>>,
}

impl Probe {
    fn server_cert(&self) -> Option<Vec<u8>> {
        self.server_cert.lock().expect("lock").clone()
    }

    fn flushed_contains(&self, needle: &[u8]) -> bool {
        self.flushed
            .lock()
            .expect("lock")
            .windows(needle.len())
            .any(|w| w == needle)
    }
}

/// A TLS stream that records what is written through it.
struct Tapped {
    inner: TlsStream<TcpStream>,
    probe: Probe,
}

impl AsyncRead for Tapped {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tapped {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.probe.unflushed.lock().expect("lock").extend_from_slice(&buf[..*n]);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = &r {
            let mut pending = std::mem::take(&mut *self.probe.unflushed.lock().expect("lock"));
            self.probe.flushed.lock().expect("lock").append(&mut pending);
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A tonic connector: TCP + rustls (ALPN h2) to a fixed address, recording
/// into a [`Probe`].
#[derive(Clone)]
struct ProbeConnector {
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    probe: Probe,
}

impl tower::Service<http::Uri> for ProbeConnector {
    type Response = TokioIo<Tapped>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<Tapped>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let stream = tls_connect(this.addr, this.tls).await?;
            let leaf = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec());
            *this.probe.server_cert.lock().expect("lock") = leaf;
            Ok(TokioIo::new(Tapped {
                inner: stream,
                probe: this.probe,
            }))
        })
    }
}

/// One gRPC channel over one probed mutual-TLS connection.
async fn probed_channel(addr: SocketAddr, tls: Arc<ClientConfig>) -> Result<(Channel, Probe), String> {
    let probe = Probe::default();
    let connector = ProbeConnector {
        addr,
        tls,
        probe: probe.clone(),
    };
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    Ok((channel, probe))
}

/// Opens a NEW connection, creates an account over it, and returns the
/// server certificate that connection was shown.
async fn create_over_new_connection(addr: SocketAddr, tls: Arc<ClientConfig>) -> Result<(Vec<u8>, Account), String> {
    let (channel, probe) = probed_channel(addr, tls).await?;
    let account = AccountServiceClient::new(channel)
        .create_account(CreateAccountRequest {
            controller: CONTROLLER.into(),
            label: "ops".into(),
            allow: Vec::new(),
            ..Default::default()
        })
        .await
        .map_err(|s| format!("CreateAccount: {s:?}"))?
        .into_inner();
    Ok((probe.server_cert().expect("server certificate recorded"), account))
}

/// A raw HTTP/1.1 GET over TLS without a client certificate.
struct HttpResponse {
    status: u16,
    body: String,
}

async fn https_get(addr: SocketAddr, ca: &Path, path: &str) -> HttpResponse {
    let tls = client_config(ca, None, b"http/1.1");
    let mut stream = tls_connect(addr, tls)
        .await
        .expect("TLS handshake without a client certificate");
    assert_eq!(
        stream.get_ref().1.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "ALPN http/1.1"
    );
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("write request");
    stream.flush().await.expect("flush");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let (head_len, content_length) = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>())
                })
                .unwrap_or_else(|| panic!("response without Content-Length: {head}"))
                .expect("Content-Length value");
            break (end + 4, len);
        }
        let n = stream.read(&mut chunk).await.expect("read response head");
        assert!(n > 0, "connection closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    while buf.len() < head_len + content_length {
        let n = stream.read(&mut chunk).await.expect("read response body");
        assert!(n > 0, "connection closed inside the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8(buf[..head_len - 4].to_vec()).expect("ASCII head");
    let status_line = head.split("\r\n").next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let body = String::from_utf8(buf[head_len..head_len + content_length].to_vec()).expect("UTF-8 body");
    HttpResponse { status, body }
}

/// The value of the sample whose line starts with `series ` (exact labels).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}

/// The metrics text from the plain-HTTP metrics listener at `base` (`http://host:port`).
async fn scrape(base: &str) -> String {
    let (status, body) = keyward::cli::verify::http_get(&format!("{base}/metrics"))
        .await
        .expect("metrics answer");
    assert_eq!(status, 200);
    body
}

async fn handshake_failures(metrics: &str) -> f64 {
    sample(&scrape(metrics).await, "keyward_tls_handshake_failures_total").expect("handshake failure counter")
}

fn server_spec(cn: &str, sans: &[&str]) -> CertSpec {
    let now = time::OffsetDateTime::now_utc();
    CertSpec {
        common_name: cn.into(),
        uri_sans: vec![],
        dns_sans: sans.iter().map(|s| s.to_string()).collect(),
        not_before: now - time::Duration::minutes(5),
        not_after: now + time::Duration::days(1),
        client: false,
        server: true,
    }
}

// ---------------------------------------------------------------------------
// 1. Server certificate reload on SIGHUP; a bad file keeps the last good one.

#[test]
fn sighup_reloads_server_certificate_and_keeps_last_good_one() {
    server_certificate_reload(true);
}

/// Without any signal, as under Kubernetes and cert-manager: the daemon
/// notices that the certificate files changed and serves the new
/// certificate; files that do not load are refused once, logged, and the
/// last good certificate stays.
#[test]
fn changed_certificate_files_reload_without_a_signal() {
    server_certificate_reload(false);
}

/// Re-issues the server certificate under the dev CA, installs it, and sends
/// SIGHUP (`by_signal`) or nothing (the daemon checks the files every
/// second); new connections must then see the new certificate. Then a broken
/// certificate file: refused, and the last good certificate stays.
fn server_certificate_reload(by_signal: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    if !by_signal {
        // Prepare the home first to check the files every second instead of every 10.
        let prepared = keyward::dev::prepare(&home, keyward::config::Custody::Hsm).expect("dev home");
        let text = std::fs::read_to_string(&prepared.config).expect("config");
        std::fs::write(&prepared.config, text.replace("[tls]\n", "[tls]\nwatch_seconds = 1\n")).expect("config");
    }
    let mut dev = DevProcess::start(&home);
    let pki = dev.home.join("pki");
    let admin = client_config(
        &pki.join("ca.pem"),
        Some((&pki.join("clients/admin.pem"), &pki.join("clients/admin-key.pem"))),
        b"h2",
    );
    let original = first_der(&std::fs::read_to_string(pki.join("server.pem")).expect("server.pem"));

    block_on(async {
        let (seen, _) = create_over_new_connection(dev.grpc, admin.clone())
            .await
            .expect("RPC before reload");
        assert_eq!(seen, original, "serves the dev server certificate at start");

        // Re-issue under the same dev CA and install it.
        let ca_cert = std::fs::read_to_string(pki.join("ca.pem")).expect("ca.pem");
        let ca_key = std::fs::read_to_string(pki.join("ca-key.pem")).expect("ca-key.pem");
        let (cert, key) = issue(
            &ca_cert,
            &ca_key,
            &server_spec("localhost", &["localhost", "127.0.0.1"]),
        )
        .expect("re-issue server certificate");
        let reissued = first_der(&cert);
        assert_ne!(reissued, original);
        write_private(&pki.join("server-key.pem"), key.as_bytes()).expect("write key");
        write_private(&pki.join("server.pem"), cert.as_bytes()).expect("write cert");
        if by_signal {
            dev.signal("-HUP");
        }

        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match create_over_new_connection(dev.grpc, admin.clone()).await {
                Ok((seen, account)) if seen == reissued => {
                    assert!(!account.account_id.is_empty(), "RPC over the new certificate works");
                    break;
                }
                Ok((seen, _)) => assert_eq!(seen, original, "only the old or the new certificate"),
                Err(e) => panic!("daemon refused a connection around the reload: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "no new connection showed the re-issued certificate within 10 s (SIGHUP: {by_signal})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // A broken certificate file: the reload fails and the last good
        // certificate stays in force.
        write_private(&pki.join("server.pem"), b"this is not a certificate\n").expect("write garbage");
        if by_signal {
            dev.signal("-HUP");
            dev.wait_stderr("certificate reload failed");
        } else {
            dev.wait_stderr("certificate files changed but do not load");
        }
        let (seen, account) = create_over_new_connection(dev.grpc, admin.clone())
            .await
            .expect("still serves after a failed reload");
        assert_eq!(seen, reissued, "keeps the last good certificate");
        assert!(!account.account_id.is_empty());
    });

    let status = dev.sigterm();
    assert_eq!(status.code(), Some(0), "graceful exit on SIGTERM: {status:?}");
}

/// Signals sent the moment the daemon says "ready" are handled (reload,
/// graceful stop), not fatal: the handlers exist before readiness.
#[test]
fn signals_right_after_ready_are_handled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    // The window was narrow (between "ready" and the first poll of the
    // shutdown future); several rounds make hitting it likely.
    for round in 0..12 {
        let mut dev = DevProcess::start(&home);
        dev.signal("-HUP");
        let status = dev.sigterm();
        assert_eq!(
            status.code(),
            Some(0),
            "round {round}: SIGHUP then SIGTERM right after ready: {status:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// 2. Client CA reload on SIGHUP.

#[test]
fn sighup_reloads_client_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut dev = DevProcess::start(&dir.path().join("home"));
    let pki = dev.home.join("pki");
    let client_ca = keyward::config::Config::load(&dev.home.join("keyward.toml"))
        .expect("dev config")
        .tls
        .client_ca;
    // Clients keep trusting the dev CA for the server's certificate.
    let server_trust = dir.path().join("server-trust.pem");
    std::fs::copy(pki.join("ca.pem"), &server_trust).expect("copy CA");
    let old_admin = client_config(
        &server_trust,
        Some((&pki.join("clients/admin.pem"), &pki.join("clients/admin-key.pem"))),
        b"h2",
    );

    // A new CA and an admin certificate under it.
    let (new_ca_cert, new_ca_key) = new_ca("keyward rotated client CA").expect("new CA");
    let now = time::OffsetDateTime::now_utc();
    let (cert, key) = issue(
        &new_ca_cert,
        &new_ca_key,
        &CertSpec {
            common_name: "admin".into(),
            uri_sans: vec!["spiffe://example.org/admin".into()],
            dns_sans: Vec::new(),
            not_before: now - time::Duration::minutes(5),
            not_after: now + time::Duration::days(1),
            client: true,
            server: false,
        },
    )
    .expect("issue client certificate");
    let new_cert = dir.path().join("new-admin.pem");
    let new_key = dir.path().join("new-admin-key.pem");
    std::fs::write(&new_cert, &cert).expect("write");
    write_private(&new_key, key.as_bytes()).expect("write");
    let new_admin = client_config(&server_trust, Some((&new_cert, &new_key)), b"h2");

    block_on(async {
        let before = handshake_failures(&dev.metrics).await;
        let refused = create_over_new_connection(dev.grpc, new_admin.clone()).await;
        assert!(refused.is_err(), "a client of an unknown CA is refused");
        // Refused in the TLS handshake (counted), not by the application.
        let deadline = Instant::now() + Duration::from_secs(10);
        while handshake_failures(&dev.metrics).await <= before {
            assert!(Instant::now() < deadline, "refusal not counted as a handshake failure");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        create_over_new_connection(dev.grpc, old_admin.clone())
            .await
            .expect("the dev admin works before the rotation");

        write_private(&client_ca, new_ca_cert.as_bytes()).expect("replace client CA");
        dev.signal("-HUP");
        let deadline = Instant::now() + Duration::from_secs(10);
        let account = loop {
            match create_over_new_connection(dev.grpc, new_admin.clone()).await {
                Ok((_, account)) => break account,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "client of the new CA still refused 10 s after SIGHUP: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            !account.account_id.is_empty(),
            "admin under the new CA creates accounts"
        );
        assert!(
            create_over_new_connection(dev.grpc, old_admin.clone()).await.is_err(),
            "the old CA no longer admits clients once replaced"
        );
    });

    let status = dev.sigterm();
    assert_eq!(status.code(), Some(0), "graceful exit on SIGTERM: {status:?}");
}

// ---------------------------------------------------------------------------
// 3. Health on the HTTPS side port; metrics on their own listener only.

#[test]
fn metrics_only_on_their_listener_and_healthz_on_https_side_port() {
    let Some(env) = Env::new(Custody::Hsm, StoreKind::Sqlite) else {
        return;
    };
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let account = create_account(&d, &env, &[]).await;
        let req = SignTypedDataRequest {
            account_id: account.account_id.clone(),
            typed_data_json: MAIL.into(),
            ..Default::default()
        };
        d.signing(&env, "admin")
            .await
            .sign_typed_data(req.clone())
            .await
            .expect("admin signs");
        let denied = d
            .signing(&env, "wallet-gateway")
            .await
            .sign_typed_data(req)
            .await
            .expect_err("wallet-gateway is not allowed on this account");
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);

        let health = https_get(d.https_addr, &env.pki.ca_cert, "/healthz").await;
        assert_eq!(health.status, 200);
        assert_eq!(health.body.trim(), "ok");

        // Metrics are not on the public side port, only on their own listener.
        let public = https_get(d.https_addr, &env.pki.ca_cert, "/metrics").await;
        assert_eq!(public.status, 404, "/metrics on the JWKS port: {}", public.body);
        let m = scrape(&format!("http://{}", d.metrics_addr.expect("metrics listener"))).await;
        let body = &m;

        let ok = sample(body, r#"keyward_grpc_requests_total{code="OK",method="SignTypedData"}"#);
        assert!(ok.is_some_and(|v| v >= 1.0), "OK SignTypedData counted: {body}");
        let denied = sample(
            body,
            r#"keyward_grpc_requests_total{code="PERMISSION_DENIED",method="SignTypedData"}"#,
        );
        assert!(denied.is_some_and(|v| v >= 1.0), "PERMISSION_DENIED counted: {body}");
        assert!(
            body.lines()
                .any(|l| l.starts_with("keyward_grpc_request_duration_seconds_bucket{")
                    && l.contains(r#"method="SignTypedData""#)),
            "latency histogram: {body}"
        );
        for op in ["generate_wrapped", "unwrap", "sign_ecdsa"] {
            let n = sample(
                body,
                &format!(r#"keyward_hsm_operation_duration_seconds_count{{op="{op}"}}"#),
            );
            assert!(n.is_some_and(|v| v >= 1.0), "HSM op {op} timed: {body}");
        }
        assert!(
            body.lines().any(|l| l == "keyward_hsm_pool_sessions 4"),
            "pool size gauge: {body}"
        );

        // Privacy: no account id, address, controller or identity.
        let lower = body.to_lowercase();
        for secret in [
            account.account_id.as_str(),
            account.eth_address.as_str(),
            CONTROLLER,
            "spiffe://",
            "example.org",
            "wallet-gateway",
        ] {
            assert!(
                !lower.contains(&secret.to_lowercase()),
                "metrics leak {secret:?}: {body}"
            );
        }
        d.stop().await;
    });
}

// ---------------------------------------------------------------------------
// 4. Graceful stop drains in-flight requests.

/// An in-process daemon on a runtime of its own that is dropped as soon as
/// `serve` returns, as in the binary (where `main` then returns): connection
/// tasks `serve` did not wait for die with it.
struct OwnRuntimeDaemon {
    grpc: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl OwnRuntimeDaemon {
    fn start(env: &Env) -> OwnRuntimeDaemon {
        let config = env.config();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("daemon runtime");
            let result = rt.block_on(async move {
                let running = keyward::server::start(&config).await.map_err(|e| e.to_string())?;
                let (grpc, https) = keyward::server::bind(&config).await.map_err(|e| e.to_string())?;
                let _ = addr_tx.send(grpc.local_addr().expect("addr"));
                keyward::server::serve(running, grpc, https, async move {
                    let _ = stop_rx.await;
                })
                .await
                .map_err(|e| e.to_string())
            });
            drop(rt);
            result
        });
        let grpc = addr_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("daemon bound its listeners");
        OwnRuntimeDaemon { grpc, stop, thread }
    }

    /// Signals stop; resolves when `serve` has returned and its runtime is gone.
    async fn stop(self) -> Result<(), String> {
        let _ = self.stop.send(());
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join().expect("daemon thread"))
            .await
            .expect("join task")
    }
}

#[test]
fn stop_drains_in_flight_requests() {
    const N: usize = 32;
    let Some(env) = Env::new(Custody::Hsm, StoreKind::Sqlite) else {
        return;
    };
    block_on(async {
        env.init().await;
        let d = OwnRuntimeDaemon::start(&env);
        let grpc = d.grpc;
        let files = env.client_files("admin");
        let (cert, key) = (files.cert.expect("cert"), files.key.expect("key"));
        let admin = client_config(&env.pki.ca_cert, Some((&cert, &key)), b"h2");
        // A fresh account: the first signatures must unwrap its keys.
        let (_, account) = create_over_new_connection(grpc, admin.clone())
            .await
            .expect("account created");
        let (channel, probe) = probed_channel(grpc, admin).await.expect("connect");
        let client = SigningServiceClient::new(channel);

        let done = Arc::new(AtomicUsize::new(0));
        let mut calls = Vec::with_capacity(N);
        let mut markers = Vec::with_capacity(N);
        for _ in 0..N {
            let marker = uuid::Uuid::new_v4().as_bytes().to_vec();
            markers.push(marker.clone());
            let mut client = client.clone();
            let done = done.clone();
            let account_id = account.account_id.clone();
            calls.push(tokio::spawn(async move {
                let r = client
                    .sign_message(SignMessageRequest {
                        account_id,
                        alg: SignatureAlgorithm::Ed25519 as i32,
                        data: marker.clone(),
                        ..Default::default()
                    })
                    .await;
                done.fetch_add(1, Ordering::SeqCst);
                (marker, r)
            }));
        }

        // Every request is on the wire (written and flushed to the socket)
        // before the stop, so the server receives them all before it can
        // finish its graceful GOAWAY.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !markers.iter().all(|m| probe.flushed_contains(m)) {
            assert!(Instant::now() < deadline, "requests were not sent within 10 s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let finished_before_stop = done.load(Ordering::SeqCst);
        let stopping = tokio::spawn(d.stop());

        let pk: [u8; 32] = account.ed25519_public_key.as_slice().try_into().expect("32 bytes");
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&pk).expect("public key");
        let mut failures = Vec::new();
        for call in calls {
            let (marker, r) = call.await.expect("task");
            match r {
                Ok(resp) => {
                    let sig = ed25519_dalek::Signature::from_slice(&resp.into_inner().signature).expect("64 bytes");
                    vk.verify(&keyward::crypto::message::ed25519_message(&marker), &sig)
                        .expect("signature verifies");
                }
                Err(s) => failures.push(format!("{:?}: {}", s.code(), s.message())),
            }
        }
        stopping.await.expect("stop task").expect("serve returned Ok");
        assert!(
            failures.is_empty(),
            "{} of {N} in-flight requests were cut off by the stop: {failures:?}",
            failures.len()
        );
        assert!(
            finished_before_stop < N,
            "all {N} requests finished before the stop; nothing was in flight to drain"
        );
        eprintln!("{} of {N} requests were in flight at stop", N - finished_before_stop);

        // Stopped: new connections are refused.
        assert!(TcpStream::connect(grpc).await.is_err(), "gRPC port refuses after stop");
        assert!(
            create_over_new_connection(grpc, client_config(&env.pki.ca_cert, Some((&cert, &key)), b"h2"))
                .await
                .is_err(),
            "no RPC after stop"
        );
    });
}
