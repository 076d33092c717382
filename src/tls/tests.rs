//! End-to-end tests: real TLS over 127.0.0.1, a real tonic server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::Server;
use tonic::{Request, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::server::{HealthReporter, HealthService};

use super::devpki::{self, issue, new_ca, write_private, CertSpec};
use super::*;

const ADMIN: &str = "spiffe://example.org/admin";

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    pki: DevPki,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pki");
        let pki = ensure_dev_pki(&root, &["admin", "signer"]).unwrap();
        Fixture { _dir: dir, root, pki }
    }

    fn paths(&self) -> TlsPaths {
        TlsPaths {
            cert: self.pki.server_cert.clone(),
            key: self.pki.server_key.clone(),
            client_ca: self.pki.ca_cert.clone(),
        }
    }

    fn client(&self, name: &str) -> ClientTlsFiles {
        let profile = self.pki.clients.iter().find(|c| c.name == name).unwrap();
        ClientTlsFiles {
            ca: self.pki.ca_cert.clone(),
            cert: Some(profile.cert.clone()),
            key: Some(profile.key.clone()),
            domain: "localhost".to_owned(),
        }
    }

    fn anonymous(&self) -> ClientTlsFiles {
        ClientTlsFiles {
            ca: self.pki.ca_cert.clone(),
            cert: None,
            key: None,
            domain: "localhost".to_owned(),
        }
    }

    fn ca_pems(&self) -> (String, String) {
        (
            std::fs::read_to_string(&self.pki.ca_cert).unwrap(),
            std::fs::read_to_string(&self.pki.ca_key).unwrap(),
        )
    }

    /// Write a certificate/key pair to `<root>/extra/<name>{,-key}.pem`.
    fn write_pair(&self, name: &str, pair: &(String, String)) -> (PathBuf, PathBuf) {
        let dir = self.root.join("extra");
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert, &pair.0).unwrap();
        write_private(&key, pair.1.as_bytes()).unwrap();
        (cert, key)
    }

    /// A client certificate issued by `ca` and written to disk.
    fn client_files(&self, name: &str, ca: &(String, String), spec: &CertSpec) -> ClientTlsFiles {
        let pair = issue(&ca.0, &ca.1, spec).unwrap();
        let (cert, key) = self.write_pair(name, &pair);
        ClientTlsFiles {
            cert: Some(cert),
            key: Some(key),
            ..self.anonymous()
        }
    }
}

fn client_spec(uri: Option<&str>, cn: &str) -> CertSpec {
    let now = OffsetDateTime::now_utc();
    CertSpec {
        common_name: cn.to_owned(),
        uri_sans: uri.map(str::to_owned).into_iter().collect(),
        dns_sans: Vec::new(),
        not_before: now - time::Duration::hours(1),
        not_after: now + time::Duration::days(1),
        client: true,
        server: false,
    }
}

struct TestServer {
    addr: SocketAddr,
    tls: Arc<ServerTls>,
    seen: Arc<Mutex<Vec<ConnInfo>>>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl TestServer {
    async fn start(tls: Arc<ServerTls>) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_in = seen.clone();
        let interceptor = move |req: Request<()>| match req.extensions().get::<ConnInfo>() {
            Some(info) => {
                seen_in.lock().unwrap().push(info.clone());
                Ok(req)
            }
            None => Err(Status::unauthenticated("no ConnInfo")),
        };
        let health =
            HealthServer::with_interceptor(HealthService::from_health_reporter(HealthReporter::new()), interceptor);
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(
            Server::builder().add_service(health).serve_with_incoming_shutdown(
                incoming(
                    listener,
                    tls.clone(),
                    crate::tls::Slots::new(
                        crate::tls::ListenerLimits::standalone("test", 64, std::time::Duration::from_secs(10))
                            .expect("limits"),
                    ),
                ),
                async {
                    let _ = rx.await;
                },
            ),
        );
        TestServer {
            addr,
            tls,
            seen,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    fn uri(&self) -> String {
        format!("https://{}", self.addr)
    }

    async fn check(&self, files: &ClientTlsFiles) -> Result<(), String> {
        let call = async {
            let channel = connect(&self.uri(), files).await.map_err(|e| format!("connect: {e}"))?;
            HealthClient::new(channel)
                .check(HealthCheckRequest { service: String::new() })
                .await
                .map_err(|e| format!("rpc: {e}"))?;
            Ok(())
        };
        tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .map_err(|_| "timed out".to_owned())?
    }

    async fn wait_failures(&self, at_least: u64) {
        for _ in 0..200 {
            if self.tls.handshake_failures() >= at_least {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "handshake_failures stayed at {} (< {at_least})",
            self.tls.handshake_failures()
        );
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(10), handle)
                .await
                .expect("server did not stop")
                .unwrap()
                .unwrap();
        }
    }
}

/// Expect the RPC to fail, the failure to be counted, and the server to go
/// on serving a valid client.
async fn assert_refused(fx: &Fixture, server: &TestServer, files: &ClientTlsFiles) {
    let before = server.tls.handshake_failures();
    let result = server.check(files).await;
    assert!(result.is_err(), "expected refusal, got {result:?}");
    server.wait_failures(before + 1).await;
    server.check(&fx.client("admin")).await.unwrap();
}

fn rustls_client(ca: &Path, identity: Option<(&Path, &Path)>, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

/// Handshake with a rustls client; returns the server's leaf certificate.
async fn server_leaf(fx: &Fixture, addr: SocketAddr) -> Vec<u8> {
    let admin = fx.client("admin");
    let (cert, key) = (admin.cert.unwrap(), admin.key.unwrap());
    let connector = rustls_client(&fx.pki.ca_cert, Some((&cert, &key)), &[b"h2"]);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let stream = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (_, session) = stream.get_ref();
    session.peer_certificates().unwrap()[0].as_ref().to_vec()
}

fn pem_der(path: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(path).unwrap().as_ref().to_vec()
}

#[tokio::test]
async fn valid_client_is_served_and_identity_reaches_handler() {
    let fx = Fixture::new();
    let server = TestServer::start(ServerTls::load(fx.paths()).unwrap()).await;
    server.check(&fx.client("admin")).await.unwrap();
    server.check(&fx.client("signer")).await.unwrap();
    {
        let seen = server.seen.lock().unwrap();
        let identities: Vec<&str> = seen.iter().map(|i| i.identity.as_str()).collect();
        assert_eq!(identities, [ADMIN, "spiffe://example.org/signer"]);
        let remote = seen[0].remote_addr.unwrap();
        assert!(remote.ip().is_loopback());
    }
    assert_eq!(server.tls.handshake_failures(), 0);
    server.stop().await;
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let fx = Fixture::new();
    let server = TestServer::start(ServerTls::load(fx.paths()).unwrap()).await;
    assert_refused(&fx, &server, &fx.anonymous()).await;
    assert_eq!(server.tls.handshake_failures(), 1);
    server.stop().await;
}

#[tokio::test]
async fn certificate_from_foreign_ca_is_refused() {
    let fx = Fixture::new();
    let server = TestServer::start(ServerTls::load(fx.paths()).unwrap()).await;
    let foreign = new_ca("keyward dev CA").unwrap();
    let files = fx.client_files("foreign", &foreign, &client_spec(Some(ADMIN), "admin"));
    assert_refused(&fx, &server, &files).await;
    server.stop().await;
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let fx = Fixture::new();
    let server = TestServer::start(ServerTls::load(fx.paths()).unwrap()).await;
    let now = OffsetDateTime::now_utc();
    let spec = CertSpec {
        not_before: now - time::Duration::days(30),
        not_after: now - time::Duration::days(1),
        ..client_spec(Some(ADMIN), "admin")
    };
    let files = fx.client_files("expired", &fx.ca_pems(), &spec);
    assert_refused(&fx, &server, &files).await;
    server.stop().await;
}

#[tokio::test]
async fn not_yet_valid_certificate_is_refused() {
    let fx = Fixture::new();
    let server = TestServer::start(ServerTls::load(fx.paths()).unwrap()).await;
    let now = OffsetDateTime::now_utc();
    let spec = CertSpec {
        not_before: now + time::Duration::days(1),
        not_after: now + time::Duration::days(30),
        ..client_spec(Some(ADMIN), "admin")
    };
    let files = fx.client_files("future", &fx.ca_pems(), &spec);
    assert_refused(&fx, &server, &files).await;
    server.stop().await;
}

#[tokio::test]
async fn server_only_certificate_is_refused_as_client() {
    let fx = Fixture::new();
    let server = TestServer::start(ServerTls::load(fx.paths()).unwrap()).await;
    let spec = CertSpec {
        client: false,
        server: true,
        ..client_spec(Some(ADMIN), "admin")
    };
    let files = fx.client_files("serveronly", &fx.ca_pems(), &spec);
    assert_refused(&fx, &server, &files).await;
    server.stop().await;
}

/// Certificates from the trusted CA that a hostile client could hold: a
/// SPIFFE id as the only CN, a SPIFFE id as a DNS SAN, two URI SANs. None
/// gets the admin identity: by default each fails the handshake; with DNS
/// and CN fallbacks allowed, the first two are typed (`cn:`, `dns:`) and so
/// never equal the SPIFFE id, and two URI SANs stay refused.
#[tokio::test]
async fn certificates_naming_no_single_uri_identity_never_become_it() {
    let fx = Fixture::new();
    let ca = fx.ca_pems();
    let cn_only = fx.client_files("cn-only", &ca, &client_spec(None, ADMIN));
    let mut dns_spec = client_spec(None, "x");
    dns_spec.dns_sans = vec!["admin.example.org".into()];
    let dns = fx.client_files("dns", &ca, &dns_spec);
    let mut spiffe_dns_spec = client_spec(None, "x");
    spiffe_dns_spec.dns_sans = vec![ADMIN.into()];
    let spiffe_dns = fx.client_files("spiffe-dns", &ca, &spiffe_dns_spec);
    let mut two_spec = client_spec(Some("spiffe://example.org/x"), "x");
    two_spec.uri_sans.push(ADMIN.into());
    let two = fx.client_files("two-uris", &ca, &two_spec);

    let server = TestServer::start(ServerTls::load(fx.paths()).unwrap()).await;
    for files in [&cn_only, &dns, &spiffe_dns, &two] {
        assert_refused(&fx, &server, files).await;
    }
    assert!(server.seen.lock().unwrap().iter().all(|i| i.identity == ADMIN));
    server.stop().await;

    let options = TlsOptions {
        identity: IdentityRules {
            fallback: vec![IdentityFallback::Dns, IdentityFallback::Cn],
        },
        crls: Vec::new(),
    };
    let server = TestServer::start(ServerTls::load_with(fx.paths(), options).unwrap()).await;
    server.check(&cn_only).await.unwrap();
    server.check(&dns).await.unwrap();
    // Typed as `dns:spiffe://...` if the chain verifies at all: never the admin.
    let _ = server.check(&spiffe_dns).await;
    assert_refused(&fx, &server, &two).await;
    let seen: Vec<String> = server.seen.lock().unwrap().iter().map(|i| i.identity.clone()).collect();
    assert!(seen.contains(&format!("cn:{ADMIN}")), "{seen:?}");
    assert!(seen.contains(&"dns:admin.example.org".to_string()), "{seen:?}");
    assert_eq!(
        seen.iter().filter(|i| *i == ADMIN).count(),
        1,
        "only the real admin: {seen:?}"
    );
    server.stop().await;
}

/// A client certificate revoked by a CRL of `tls.crls` fails the handshake,
/// from the reload on that follows the CRL's change; others are served.
#[tokio::test]
async fn a_revoked_client_certificate_is_refused_after_the_crl_reloads() {
    let fx = Fixture::new();
    let ca = fx.ca_pems();
    let revoked_pair = issue(
        &ca.0,
        &ca.1,
        &client_spec(Some("spiffe://example.org/stolen"), "stolen"),
    )
    .unwrap();
    let (cert, key) = fx.write_pair("stolen", &revoked_pair);
    let stolen = ClientTlsFiles {
        cert: Some(cert),
        key: Some(key),
        ..fx.anonymous()
    };
    let crl_path = fx.root.join("clients.crl.pem");
    let empty = devpki::revocation_list(&ca.0, &ca.1, &[], time::Duration::days(7)).unwrap();
    std::fs::write(&crl_path, empty).unwrap();
    let options = TlsOptions {
        identity: IdentityRules::default(),
        crls: vec![crl_path.clone()],
    };
    let server = TestServer::start(ServerTls::load_with(fx.paths(), options).unwrap()).await;
    server.check(&stolen).await.unwrap();

    let crl = devpki::revocation_list(&ca.0, &ca.1, &[&revoked_pair.0], time::Duration::days(7)).unwrap();
    std::fs::write(&crl_path, crl).unwrap();
    server.tls.reload().unwrap();
    assert_refused(&fx, &server, &stolen).await;
    server.check(&fx.client("admin")).await.unwrap();

    // A broken CRL file keeps the current configuration.
    std::fs::write(&crl_path, "not a crl").unwrap();
    assert!(server.tls.reload().is_err());
    assert_refused(&fx, &server, &stolen).await;
    server.stop().await;
}

#[tokio::test]
async fn certificate_without_identity_fails_the_handshake() {
    let fx = Fixture::new();
    let server = TestServer::start(ServerTls::load(fx.paths()).unwrap()).await;
    let files = fx.client_files("nobody", &fx.ca_pems(), &client_spec(None, ""));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server.tls.grpc_config());
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp).await.map(|_| ())
    });
    let (cert, key) = (files.cert.clone().unwrap(), files.key.clone().unwrap());
    let connector = rustls_client(&fx.pki.ca_cert, Some((&cert, &key)), &[b"h2"]);
    let tcp = TcpStream::connect(addr).await.unwrap();
    // (In TLS 1.3 the client's side may complete before the server judges
    // its certificate; the server's side fails.)
    let _client = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await;
    assert!(
        accept.await.unwrap().is_err(),
        "a chained certificate that names no identity fails the handshake"
    );
    assert_refused(&fx, &server, &files).await;
    assert!(server.seen.lock().unwrap().iter().all(|i| i.identity == ADMIN));
    server.stop().await;
}

#[tokio::test]
async fn stalled_handshake_does_not_block_other_clients() {
    let fx = Fixture::new();
    let server = TestServer::start(ServerTls::load(fx.paths()).unwrap()).await;
    // Connected but silent: its handshake task waits for the timeout.
    let _silent = TcpStream::connect(server.addr).await.unwrap();
    let _silent2 = TcpStream::connect(server.addr).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), server.check(&fx.client("admin")))
        .await
        .expect("valid client blocked behind a stalled handshake")
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn reload_applies_to_new_connections_and_keeps_old_config_on_error() {
    let fx = Fixture::new();
    let tls = ServerTls::load(fx.paths()).unwrap();
    let server = TestServer::start(tls.clone()).await;
    let original = pem_der(&fx.pki.server_cert);
    assert_eq!(server_leaf(&fx, server.addr).await, original);

    // Re-issue the server certificate under the same CA.
    let (ca_cert, ca_key) = fx.ca_pems();
    let now = OffsetDateTime::now_utc();
    let spec = CertSpec {
        common_name: "keyward reissued".to_owned(),
        uri_sans: vec![],
        dns_sans: vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
        not_before: now - time::Duration::hours(1),
        not_after: now + time::Duration::days(7),
        client: false,
        server: true,
    };
    let (cert, key) = issue(&ca_cert, &ca_key, &spec).unwrap();
    write_private(&fx.pki.server_key, key.as_bytes()).unwrap();
    std::fs::write(&fx.pki.server_cert, &cert).unwrap();
    tls.reload().unwrap();
    let reissued = pem_der(&fx.pki.server_cert);
    assert_ne!(reissued, original);
    assert_eq!(server_leaf(&fx, server.addr).await, reissued);
    server.check(&fx.client("admin")).await.unwrap();

    // Garbage certificate: reload fails, naming the file; old config stays.
    std::fs::write(&fx.pki.server_cert, b"not a certificate").unwrap();
    match tls.reload() {
        Err(TlsError::NoCertificate { path }) => assert_eq!(path, fx.pki.server_cert),
        other => panic!("expected NoCertificate, got {other:?}"),
    }
    // Corrupt PEM body.
    std::fs::write(
        &fx.pki.server_cert,
        b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert!(tls.reload().is_err());
    // Valid certificate whose key does not match.
    let (other_cert, _) = issue(&ca_cert, &ca_key, &spec).unwrap();
    std::fs::write(&fx.pki.server_cert, &other_cert).unwrap();
    let err = tls.reload().unwrap_err();
    assert!(
        matches!(err, TlsError::Rustls { ref path, .. } if *path == fx.pki.server_key),
        "{err:?}"
    );
    // Missing key file.
    std::fs::write(&fx.pki.server_cert, &cert).unwrap();
    std::fs::remove_file(&fx.pki.server_key).unwrap();
    match tls.reload() {
        Err(TlsError::Read { path, .. }) => assert_eq!(path, fx.pki.server_key),
        other => panic!("expected Read, got {other:?}"),
    }

    assert_eq!(server_leaf(&fx, server.addr).await, reissued);
    server.check(&fx.client("admin")).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn https_config_accepts_client_without_certificate() {
    let fx = Fixture::new();
    let tls = ServerTls::load(fx.paths()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let https = TlsAcceptor::from(tls.https_config());
    let grpc = TlsAcceptor::from(tls.grpc_config());
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let https_ok = https.accept(tcp).await.map(|s| {
            let (_, session) = s.get_ref();
            (
                session.alpn_protocol().map(<[u8]>::to_vec),
                session.peer_certificates().is_none(),
            )
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let grpc_ok = grpc.accept(tcp).await.is_ok();
        (https_ok.unwrap(), grpc_ok)
    });

    let connector = rustls_client(&fx.pki.ca_cert, None, &[b"http/1.1"]);
    let name = ServerName::try_from("localhost").unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let stream = connector.connect(name.clone(), tcp).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    // The same anonymous client is refused by the gRPC config.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let _ = connector.connect(name, tcp).await;

    let ((alpn, anonymous), grpc_ok) = server.await.unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert!(anonymous);
    assert!(!grpc_ok, "grpc config must require a client certificate");
}

#[tokio::test]
async fn tls12_client_is_refused() {
    let fx = Fixture::new();
    let tls = ServerTls::load(fx.paths()).unwrap();
    let server = TestServer::start(tls).await;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&fx.pki.ca_cert).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let result = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await;
    assert!(result.is_err());
    server.wait_failures(1).await;
    server.stop().await;
}

#[test]
fn ensure_dev_pki_is_idempotent_and_keys_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pki");
    let first = ensure_dev_pki(&root, &["admin"]).unwrap();
    assert_eq!(first.ca_cert, root.join("ca.pem"));
    assert_eq!(first.ca_key, root.join("ca-key.pem"));
    assert_eq!(first.server_cert, root.join("server.pem"));
    assert_eq!(first.server_key, root.join("server-key.pem"));
    assert_eq!(first.clients[0].cert, root.join("clients/admin.pem"));
    assert_eq!(first.clients[0].key, root.join("clients/admin-key.pem"));
    assert_eq!(first.clients[0].identity, ADMIN);

    let files = [
        &first.ca_cert,
        &first.ca_key,
        &first.server_cert,
        &first.server_key,
        &first.clients[0].cert,
        &first.clients[0].key,
    ];
    let before: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();

    let second = ensure_dev_pki(&root, &["admin", "ops"]).unwrap();
    assert_eq!(second.clients[0], first.clients[0]);
    let after: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert_eq!(before, after);
    assert!(second.clients[1].cert.exists());

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for key in [
            &second.ca_key,
            &second.server_key,
            &second.clients[0].key,
            &second.clients[1].key,
        ] {
            assert_eq!(mode(key), 0o600, "{}", key.display());
        }
        let loose = dir.path().join("loose-key.pem");
        write_private(&loose, b"secret").unwrap();
        assert_eq!(mode(&loose), 0o600);
    }

    // The server certificate carries the expected identity and SANs.
    let der = pem_der(&second.server_cert);
    let typed = IdentityRules {
        fallback: vec![IdentityFallback::Dns, IdentityFallback::Cn],
    };
    assert_eq!(identity_with(&der, &typed).unwrap(), "dns:localhost");
    let ca_der = pem_der(&second.ca_cert);
    assert_eq!(
        identity_with(&ca_der, &typed).unwrap(),
        format!("cn:{}", devpki::DEV_CA_NAME)
    );
    let client_der = pem_der(&second.clients[1].cert);
    assert_eq!(identity_from_cert(&client_der).unwrap(), "spiffe://example.org/ops");
}

#[test]
fn ensure_dev_pki_rejects_bad_names_and_half_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pki");
    assert!(ensure_dev_pki(&root, &["../evil"]).is_err());
    assert!(ensure_dev_pki(&root, &[""]).is_err());
    let pki = ensure_dev_pki(&root, &["admin"]).unwrap();
    std::fs::remove_file(&pki.clients[0].key).unwrap();
    match ensure_dev_pki(&root, &["admin"]) {
        Err(TlsError::NoPrivateKey { path }) => assert_eq!(path, pki.clients[0].key),
        other => panic!("expected NoPrivateKey, got {other:?}"),
    }
    std::fs::remove_file(&pki.ca_cert).unwrap();
    std::fs::remove_file(&pki.ca_key).unwrap();
    assert!(matches!(ensure_dev_pki(&root, &[]), Err(TlsError::Invalid { .. })));
}

#[test]
fn load_errors_name_the_file() {
    let fx = Fixture::new();
    let missing = fx.root.join("missing.pem");
    let paths = TlsPaths {
        client_ca: missing.clone(),
        ..fx.paths()
    };
    match ServerTls::load(paths) {
        Err(TlsError::Read { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected Read, got {other:?}"),
    }
    // A certificate file given as the key.
    let paths = TlsPaths {
        key: fx.pki.server_cert.clone(),
        ..fx.paths()
    };
    match ServerTls::load(paths) {
        Err(TlsError::NoPrivateKey { path }) => assert_eq!(path, fx.pki.server_cert),
        other => panic!("expected NoPrivateKey, got {other:?}"),
    }
    // A key file given as the client CA.
    let paths = TlsPaths {
        client_ca: fx.pki.ca_key.clone(),
        ..fx.paths()
    };
    match ServerTls::load(paths) {
        Err(TlsError::NoCertificate { path }) => assert_eq!(path, fx.pki.ca_key),
        other => panic!("expected NoCertificate, got {other:?}"),
    }
}

#[tokio::test]
async fn client_settings_errors() {
    let fx = Fixture::new();
    let half = ClientTlsFiles {
        key: None,
        ..fx.client("admin")
    };
    assert!(matches!(
        endpoint("https://127.0.0.1:1", &half),
        Err(TlsError::Endpoint { .. })
    ));
    let missing_ca = ClientTlsFiles {
        ca: fx.root.join("nope.pem"),
        ..fx.client("admin")
    };
    assert!(matches!(
        endpoint("https://127.0.0.1:1", &missing_ca),
        Err(TlsError::Read { .. })
    ));
    assert!(matches!(
        endpoint("not a uri", &fx.client("admin")),
        Err(TlsError::Endpoint { .. })
    ));
    // Lazy endpoint: several channels from one endpoint, no connection yet.
    let ep = endpoint("https://127.0.0.1:1", &fx.client("admin")).unwrap();
    let _a = ep.connect_lazy();
    let _b = ep.connect_lazy();
    // Nothing listens on port 1.
    assert!(matches!(
        connect("https://127.0.0.1:1", &fx.client("admin")).await,
        Err(TlsError::Connect { .. })
    ));
}
