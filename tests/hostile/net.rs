//! Availability under a hostile client: a daemon started as a process (its
//! memory and file descriptors read from /proc), under a file-descriptor
//! limit as systemd's `LimitNOFILE` would set it, flooded on both ports.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyward::api::pb::account_service_client::AccountServiceClient;
use keyward::api::pb::signing_service_client::SigningServiceClient;
use keyward::api::pb::{CreateAccountRequest, SignMessageRequest, SignTypedDataRequest, SignatureAlgorithm};
use keyward::config::Custody;
use keyward::dev::ClientFile;
use keyward::tls::ClientTlsFiles;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::common::{signal, start_dev_with, CONTROLLER, MAIL};

/// A `keyward dev` process with extra `[server]` settings.
struct Dev {
    home: tempfile::TempDir,
    child: std::process::Child,
    client: ClientFile,
}

impl Dev {
    fn start(server: &str, nofile: Option<u64>) -> Dev {
        let home = tempfile::tempdir().expect("tempdir");
        keyward::dev::prepare(home.path(), Custody::Host).expect("dev home");
        let config = home.path().join("keyward.toml");
        let text = std::fs::read_to_string(&config).expect("dev config");
        assert!(
            text.contains("\n[tls]"),
            "the dev config has a [tls] table after [server]"
        );
        std::fs::write(&config, text.replacen("\n[tls]", &format!("\n{server}\n\n[tls]"), 1)).expect("config");
        let child = start_dev_with(home.path(), &[], nofile);
        let client = keyward::dev::read_client_file(home.path()).expect("client file");
        Dev { home, child, client }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn files(&self, profile: &str) -> ClientTlsFiles {
        let p = &self.client.profiles[profile];
        ClientTlsFiles {
            ca: self.client.ca.clone(),
            cert: Some(p.cert.clone()),
            key: Some(p.key.clone()),
            domain: self.client.domain.clone(),
        }
    }

    fn addr(url: &str) -> SocketAddr {
        url.trim_start_matches("https://").parse().expect("host:port")
    }

    fn grpc_addr(&self) -> SocketAddr {
        Self::addr(&self.client.endpoint)
    }

    fn https_addr(&self) -> SocketAddr {
        Self::addr(&self.client.https)
    }

    async fn signing(&self, profile: &str) -> SigningServiceClient<tonic::transport::Channel> {
        let ch = keyward::tls::connect(&self.client.endpoint, &self.files(profile))
            .await
            .expect("mTLS connect");
        SigningServiceClient::new(ch)
    }

    async fn account(&self) -> String {
        let ch = keyward::tls::connect(&self.client.endpoint, &self.files("admin"))
            .await
            .expect("mTLS connect");
        AccountServiceClient::new(ch)
            .create_account(CreateAccountRequest {
                controller: CONTROLLER.into(),
                label: "hostile".into(),
                allow: vec![],
            })
            .await
            .expect("account")
            .into_inner()
            .account_id
    }

    async fn healthz(&self) -> anyhow::Result<(u16, String)> {
        keyward::cli::verify::https_get(
            &format!("{}/healthz", self.client.https),
            &self.client.ca,
            &self.client.domain,
        )
        .await
    }

    fn stop(mut self) {
        signal(&mut self.child, "-TERM");
    }
}

impl Drop for Dev {
    /// A failed test leaves no daemon behind.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The process's resident memory, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// File descriptors the process holds.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fd dir").count()
}

/// Up to `n` TCP connections that send nothing, opened all at once (a
/// connect the daemon's backlog has no room for times out and is left out).
async fn idle_sockets(addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        set.spawn(async move {
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
                .await
                .ok()
                .and_then(Result::ok)
        });
    }
    set.join_all().await.into_iter().flatten().collect()
}

fn sign(account: &str) -> SignMessageRequest {
    SignMessageRequest {
        account_id: account.to_string(),
        alg: SignatureAlgorithm::Secp256k1 as i32,
        data: b"still here".to_vec(),
    }
}

const CAPS: &str = "max_connections = 64\nhttps_max_connections = 32\nhandshake_timeout_seconds = 5";

/// 1,100 idle sockets on each port, against a daemon whose file-descriptor
/// limit is 256: a client already connected keeps signing throughout; the
/// daemon holds no more descriptors than its connection caps allow (without
/// the caps it takes one per socket until `accept` fails), its memory stays
/// bounded, and once the sockets go new clients are served on both ports.
#[test]
fn idle_socket_floods_do_not_stop_a_signing_client() {
    super::common::block_on(async {
        let dev = Dev::start(CAPS, Some(256));
        let account = dev.account().await;
        let mut client = dev.signing("admin").await;
        client
            .sign_message(sign(&account))
            .await
            .expect("signs before the flood");
        let (fds_before, rss_before) = (open_fds(dev.pid()), rss_kib(dev.pid()));

        let grpc_flood = idle_sockets(dev.grpc_addr(), 1100).await;
        let https_flood = idle_sockets(dev.https_addr(), 1100).await;
        assert!(grpc_flood.len() > 100 && https_flood.len() > 100, "the flood connected");
        // Let the daemon accept what it will.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in 0..20 {
            client
                .sign_message(sign(&account))
                .await
                .unwrap_or_else(|e| panic!("signing {i} during the flood: {e:?}"));
        }
        let fds = open_fds(dev.pid());
        assert!(
            fds <= fds_before + 64 + 32 + 8,
            "the daemon holds {fds} descriptors (before the flood: {fds_before}; caps 64 + 32)"
        );
        let rss = rss_kib(dev.pid());
        assert!(
            rss < rss_before + 64 * 1024,
            "resident memory grew from {rss_before} KiB to {rss} KiB"
        );

        // The flood goes; new clients are served on both ports.
        drop(grpc_flood);
        drop(https_flood);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let fresh = tokio::time::timeout(Duration::from_secs(2), async {
                let mut c = dev.signing("marketplace").await;
                c.sign_message(sign(&account)).await.map(|_| ()).or_else(|s| {
                    // Connected and decided: the marketplace may not sign this account.
                    (s.code() == tonic::Code::PermissionDenied).then_some(()).ok_or(s)
                })
            })
            .await;
            let health = dev.healthz().await;
            if matches!(fresh, Ok(Ok(()))) && matches!(&health, Ok((200, _))) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not serving new clients after the flood: {fresh:?} {health:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        client
            .sign_message(sign(&account))
            .await
            .expect("the first client still signs");
        dev.stop();
    });
}

/// A header slowloris on the HTTPS side port: a client that sends its
/// request headers a byte at a time is disconnected after the header-read
/// timeout, not kept for as long as it dribbles.
#[test]
fn slow_headers_are_cut_off() {
    super::common::block_on(async {
        let dev = Dev::start("header_read_timeout_seconds = 1", None);
        let mut tls = https_connect(&dev).await;
        tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        let started = Instant::now();
        let mut closed = false;
        for _ in 0..60 {
            if tls.write_all(b"X").await.is_err() || tls.flush().await.is_err() {
                closed = true;
                break;
            }
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_millis(100), tls.read(&mut buf)).await {
                // EOF, a reset, or an error response: the server is done with us.
                Ok(Ok(_)) | Ok(Err(_)) => {
                    closed = true;
                    break;
                }
                Err(_) => {}
            }
        }
        let waited = started.elapsed();
        assert!(closed, "a client dribbling its headers was kept for {waited:?}");
        assert!(waited < Duration::from_secs(5), "cut off only after {waited:?}");
        // A well-behaved client is served.
        assert_eq!(dev.healthz().await.expect("healthz").0, 200);
        dev.stop();
    });
}

async fn https_connect(dev: &Dev) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&dev.client.ca).expect("CA") {
        roots.add(c.expect("CA PEM")).expect("CA");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(dev.https_addr()).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from(dev.client.domain.clone()).expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS")
}

/// The pathological typed-data document (a 64 KiB field name, then tens of
/// thousands of elements) and session tokens far over any real size: each is
/// refused with INVALID_ARGUMENT / OUT_OF_RANGE / UNAUTHENTICATED, the
/// daemon's memory stays bounded over many of them, and it keeps signing.
#[test]
fn pathological_documents_are_refused_with_bounded_memory() {
    super::common::block_on(async {
        let dev = Dev::start("", None);
        let account = dev.account().await;
        let mut client = dev.signing("admin").await;
        client.sign_message(sign(&account)).await.expect("signs");
        let rss_before = rss_kib(dev.pid());

        let long = "a".repeat(64 * 1024);
        let long_name = serde_json::json!({
            "types": {"EIP712Domain": [], "T": [{"name": long, "type": "uint8[]"}]},
            "primaryType": "T",
            "domain": {},
            "message": {long.as_str(): vec![1; 60_000]},
        })
        .to_string();
        let many = serde_json::json!({
            "types": {"EIP712Domain": [], "T": [{"name": "v", "type": "uint8[]"}]},
            "primaryType": "T",
            "domain": {},
            "message": {"v": vec![1; 65_536]},
        })
        .to_string();
        let huge_token = format!("eyJhbGciOiJFZERTQSJ9.{}.AAAA", "A".repeat(16 * 1024 * 1024));
        for _ in 0..10 {
            for (doc, token, want) in [
                (long_name.as_str(), "", tonic::Code::InvalidArgument),
                (many.as_str(), "", tonic::Code::InvalidArgument),
                (MAIL, huge_token.as_str(), tonic::Code::OutOfRange),
            ] {
                let err = client
                    .sign_typed_data(SignTypedDataRequest {
                        account_id: account.clone(),
                        typed_data_json: doc.to_string(),
                        session_token: token.to_string(),
                        request_id: if token.is_empty() { String::new() } else { "r".into() },
                    })
                    .await
                    .expect_err("refused");
                assert_eq!(err.code(), want, "{}", &err.message()[..err.message().len().min(300)]);
                assert!(err.message().len() < 1024, "the error echoes the input");
            }
        }
        let rss = rss_kib(dev.pid());
        assert!(
            rss < rss_before + 96 * 1024,
            "resident memory grew from {rss_before} KiB to {rss} KiB"
        );
        client.sign_message(sign(&account)).await.expect("still signs");
        dev.stop();
    });
}

/// One client's share: an identity over `server.max_requests_per_identity`
/// in flight is refused at once (RESOURCE_EXHAUSTED naming the setting);
/// another identity signing at the same time is never refused.
#[test]
fn one_identity_cannot_take_every_request_slot() {
    super::common::block_on(async {
        let dev = Dev::start("max_requests_per_identity = 4", None);
        let account = dev.account().await;
        let (mut refused, mut signed) = (0, 0);
        let mut flood = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let client = dev.signing("admin").await;
            let account = account.clone();
            flood.spawn(async move {
                let mut tasks = tokio::task::JoinSet::new();
                for _ in 0..40 {
                    let mut c = client.clone();
                    let req = sign(&account);
                    tasks.spawn(async move { c.sign_message(req).await });
                }
                tasks.join_all().await
            });
        }
        // The other identity, one request at a time, while the flood runs.
        let mut other = dev.signing("marketplace").await;
        let mut other_refused = 0;
        while !flood.is_empty() {
            if let Err(e) = other.sign_message(sign(&account)).await {
                if e.code() == tonic::Code::ResourceExhausted {
                    other_refused += 1;
                }
            }
            if let Some(done) = flood.try_join_next() {
                for r in done.expect("flood task") {
                    match r {
                        Ok(_) => signed += 1,
                        Err(e) => {
                            assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                            assert!(e.message().contains("server.max_requests_per_identity"), "{e:?}");
                            refused += 1;
                        }
                    }
                }
            }
        }
        assert!(refused > 0, "320 concurrent requests of one identity: none refused");
        assert!(signed > 0, "the identity's requests within its share are served");
        assert_eq!(other_refused, 0, "another identity was refused");
        dev.stop();
    });
}

/// Graceful shutdown has a deadline: a client following `StreamEvents` (a
/// stream that never ends by itself) and a client that opened a connection
/// and sends nothing cannot hold the daemon past `server.shutdown_grace_seconds`;
/// the follower's stream ends, and the final checkpoint covers the last event.
#[test]
fn shutdown_is_bounded_by_its_grace() {
    use keyward::api::pb::audit_service_client::AuditServiceClient;
    use keyward::api::pb::StreamEventsRequest;
    super::common::block_on(async {
        let mut dev = Dev::start("shutdown_grace_seconds = 2", None);
        dev.account().await;
        let ch = keyward::tls::connect(&dev.client.endpoint, &dev.files("admin"))
            .await
            .expect("connect");
        let mut events = AuditServiceClient::new(ch)
            .stream_events(StreamEventsRequest { since_seq: 0 })
            .await
            .expect("StreamEvents")
            .into_inner();
        events.message().await.expect("an event").expect("the history");
        let _silent = TcpStream::connect(dev.grpc_addr()).expect("a silent connection");

        let started = Instant::now();
        let pid = dev.pid().to_string();
        assert!(std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success());
        // The follower reads the rest of the history, then its stream ends.
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match events.message().await {
                    Ok(Some(_)) => continue,
                    other => return other.map(|_| ()),
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the follower's stream did not end");
        let status = loop {
            if let Some(s) = dev.child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the daemon did not stop within its grace (2 s) and the drain"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "{status:?}");

        let store_url = format!("sqlite://{}", dev.home.path().join("keyward.db").display());
        let s = keyward::store::open(&store_url).await.expect("store");
        let head = s.audit().audit_head().await.expect("head").seq;
        let cps = s.audit().checkpoints().await.expect("checkpoints");
        s.close().await;
        assert_eq!(cps.last().map(|c| c.last_seq), Some(head), "final checkpoint");
    });
}
