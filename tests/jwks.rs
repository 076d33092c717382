//! The rotating JWKS end to end: a real daemon (ManualClock), a real SoftHSM token, real mTLS,
//! the HTTPS side port without a client certificate, and an independent JOSE library.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use common::*;
use k256::ecdsa::SigningKey;
use keyward::api::pb::jwks_service_client::JwksServiceClient;
use keyward::api::pb::session_service_client::SessionServiceClient;
use keyward::api::pb::{
    CreateAccountRequest, CreateSessionChallengeRequest, GetJwksRequest, ListIssuerKeysRequest, OpenSessionRequest,
    RevokeIssuerKeyRequest, RotateIssuerKeyRequest, SignPaymentRequest,
};
use keyward::clock::{Clock, ManualClock};
use keyward::config::Custody;
use keyward::crypto::jwk::Jwks;
use keyward::crypto::jws::verify_compact;
use keyward::hsm::IssuerAlg;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::Channel;
use tonic::Code;

const START: i64 = 1_800_000_000;
const MAX_AGE: i64 = 600;
const DAY: i64 = 86_400;
const MANIFEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const MARKETPLACE: &str = "spiffe://example.org/marketplace";

// ---- raw HTTPS (no client certificate) ----

struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn https_get(addr: SocketAddr, ca: &Path, path: &str, extra: &[(&str, &str)]) -> HttpResponse {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(c.expect("CA PEM")).expect("CA certificate");
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut stream = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS handshake without a client certificate");
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    stream.flush().await.expect("flush");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_len = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = stream.read(&mut chunk).await.expect("read head");
        assert!(n > 0, "closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_len - 4].to_vec()).expect("ASCII head");
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse::<usize>().expect("length"))
        .unwrap_or(0);
    while buf.len() < head_len + len {
        let n = stream.read(&mut chunk).await.expect("read body");
        assert!(n > 0, "closed inside the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8(buf[head_len..head_len + len].to_vec()).expect("UTF-8 body");
    HttpResponse { status, headers, body }
}

// ---- the story fixture ----

struct Story {
    env: Env,
    daemon: Daemon,
    clock: Arc<ManualClock>,
    wallet: Wallet,
    account_id: String,
}

fn env_with_jwks(store: StoreKind) -> Option<Env> {
    let env = Env::new(Custody::Host, store)?;
    let mut text = std::fs::read_to_string(&env.config_path).expect("config");
    text.push_str(&format!(
        "[jwks]\nalgorithms = [\"EdDSA\", \"ES256\"]\nmax_age_seconds = {MAX_AGE}\ntick_seconds = 300\n"
    ));
    std::fs::write(&env.config_path, text).expect("config");
    Some(env)
}

impl Story {
    async fn start(env: Env) -> Story {
        env.init().await;
        let clock = Arc::new(ManualClock::new(START));
        let daemon = env.start_with_clock(clock.clone()).await;
        let wallet = Wallet(SigningKey::from_slice(&[0x42; 32]).expect("key"));
        let account = daemon
            .accounts(&env, "admin")
            .await
            .create_account(CreateAccountRequest {
                controller: wallet.address().to_checksum(),
                label: "alice".into(),
                allow: vec![],
            })
            .await
            .expect("account")
            .into_inner();
        Story {
            env,
            daemon,
            clock,
            wallet,
            account_id: account.account_id,
        }
    }

    async fn jwks_client(&self, profile: &str) -> JwksServiceClient<Channel> {
        JwksServiceClient::new(self.daemon.channel(&self.env, profile).await)
    }

    /// A session token (EdDSA issuer JWS), opened through the daemon.
    async fn token(&self) -> String {
        let mut s = SessionServiceClient::new(self.daemon.channel(&self.env, "wallet-gateway").await);
        let c = s
            .create_session_challenge(CreateSessionChallengeRequest {
                account_id: self.account_id.clone(),
                delegate: MARKETPLACE.into(),
                scopes: vec!["payments:0-100".into(), format!("license:manifest:{MANIFEST}")],
                cap: "1000".into(),
                ttl_seconds: 3000,
            })
            .await
            .expect("challenge")
            .into_inner();
        s.open_session(OpenSessionRequest {
            challenge_id: c.challenge_id,
            signature: self.wallet.sign(&c.typed_data_json),
        })
        .await
        .expect("open")
        .into_inner()
        .token
    }

    async fn pay(&self, token: &str, request_id: &str) -> Result<(), tonic::Status> {
        self.daemon
            .signing(&self.env, "marketplace")
            .await
            .sign_payment(SignPaymentRequest {
                session_token: token.into(),
                amount: "1".into(),
                currency: "USDC".into(),
                manifest: MANIFEST.into(),
                license_id: "lic-7".into(),
                payee: String::new(),
                request_id: request_id.into(),
            })
            .await
            .map(|_| ())
    }

    async fn fetch(&self) -> HttpResponse {
        https_get(
            self.daemon.https_addr,
            &self.env.pki.ca_cert,
            "/.well-known/jwks.json",
            &[],
        )
        .await
    }

    async fn fetch_jwks(&self) -> (Jwks, String) {
        let r = self.fetch().await;
        assert_eq!(r.status, 200);
        (serde_json::from_str(&r.body).expect("JWKS JSON"), r.body)
    }

    async fn rotate(&self, alg: &str) -> Result<keyward::api::pb::RotateIssuerKeyResponse, tonic::Status> {
        self.jwks_client("admin")
            .await
            .rotate_issuer_key(RotateIssuerKeyRequest { alg: alg.into() })
            .await
            .map(|r| r.into_inner())
    }

    async fn states(&self) -> Vec<(String, String, String)> {
        self.jwks_client("admin")
            .await
            .list_issuer_keys(ListIssuerKeysRequest {})
            .await
            .expect("list")
            .into_inner()
            .keys
            .into_iter()
            .map(|k| (k.alg, k.state, k.kid))
            .collect()
    }

    async fn token_labels(&self) -> Vec<String> {
        let hsm = self.daemon.state.keys.hsm().clone();
        tokio::task::spawn_blocking(move || hsm.issuer_keys().expect("issuer keys"))
            .await
            .expect("task")
            .into_iter()
            .map(|i| i.label)
            .collect()
    }

    /// The stored row of `kid`: (has a blob, KEK version), or None once removed.
    async fn stored(&self, kid: &str) -> Option<(bool, Option<u32>)> {
        self.daemon
            .state
            .jwks
            .list()
            .await
            .expect("list")
            .into_iter()
            .find(|k| k.kid == kid)
            .map(|k| (k.wrapped.is_some(), k.kek_version))
    }
}

fn kid_of(token: &str) -> String {
    use base64::Engine as _;
    let head = token.split('.').next().expect("header");
    let v: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(head)
            .expect("b64"),
    )
    .expect("json");
    v["kid"].as_str().expect("kid").to_string()
}

fn kids(jwks: &Jwks) -> Vec<String> {
    jwks.keys.iter().map(|k| k.kid.clone()).collect()
}

fn kid_in_state(states: &[(String, String, String)], alg: &str, state: &str) -> Vec<String> {
    states
        .iter()
        .filter(|(a, s, _)| a == alg && s == state)
        .map(|(_, _, k)| k.clone())
        .collect()
}

#[test]
fn jwks_endpoint_etag_304_and_cache_headers() {
    let env = env_with_jwks(StoreKind::Sqlite).expect("env");
    block_on(async {
        let st = Story::start(env).await;
        let r = st.fetch().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("application/jwk-set+json"));
        assert_eq!(
            r.header("cache-control").map(str::to_string),
            Some(format!("public, max-age={MAX_AGE}"))
        );
        let etag = r.header("etag").expect("ETag").to_string();
        assert_eq!(etag, format!("\"{}\"", hex::encode(Sha256::digest(r.body.as_bytes()))));
        let jwks: Jwks = serde_json::from_str(&r.body).expect("JWKS");
        assert_eq!(jwks.keys.len(), 4, "EdDSA and ES256: active and next each");

        let same = https_get(
            st.daemon.https_addr,
            &st.env.pki.ca_cert,
            "/.well-known/jwks.json",
            &[("If-None-Match", &etag)],
        )
        .await;
        assert_eq!(same.status, 304);
        assert!(same.body.is_empty());
        assert_eq!(same.header("etag"), Some(etag.as_str()));
        let other = https_get(
            st.daemon.https_addr,
            &st.env.pki.ca_cert,
            "/.well-known/jwks.json",
            &[("If-None-Match", "\"0000\"")],
        )
        .await;
        assert_eq!(other.status, 200);
        assert_eq!(other.body, r.body);

        // Also over gRPC, to any client with a valid certificate.
        let g = st
            .jwks_client("marketplace")
            .await
            .get_jwks(GetJwksRequest {})
            .await
            .expect("GetJwks")
            .into_inner();
        assert_eq!(g.jwks_json, r.body);
        assert_eq!(g.etag, etag);
        assert_eq!(g.max_age_seconds, MAX_AGE as u64);
        // Lifecycle RPCs are for admins.
        let denied = st
            .jwks_client("marketplace")
            .await
            .rotate_issuer_key(RotateIssuerKeyRequest { alg: "EdDSA".into() })
            .await
            .expect_err("not admin");
        assert_eq!(denied.code(), Code::PermissionDenied);

        // A rotation changes the document and its ETag.
        st.clock.advance(MAX_AGE);
        st.rotate("").await.expect("rotate every algorithm");
        let after = https_get(
            st.daemon.https_addr,
            &st.env.pki.ca_cert,
            "/.well-known/jwks.json",
            &[("If-None-Match", &etag)],
        )
        .await;
        assert_eq!(after.status, 200);
        assert_ne!(after.header("etag"), Some(etag.as_str()));
        let jwks: Jwks = serde_json::from_str(&after.body).expect("JWKS");
        assert_eq!(jwks.keys.len(), 6, "retired, active and next per algorithm");
        st.daemon.stop().await;
    });
}

fn rotation_story(store: StoreKind) {
    let Some(env) = env_with_jwks(store) else { return };
    block_on(async {
        let st = Story::start(env).await;
        let old_token = st.token().await;
        let old_kid = kid_of(&old_token);
        let states = st.states().await;
        assert_eq!(kid_in_state(&states, "EdDSA", "active"), vec![old_kid.clone()]);
        let next = kid_in_state(&states, "EdDSA", "next");
        assert_eq!(next.len(), 1);

        // A verifier fetches the JWKS at T0: the next key is already in it.
        let fetched_at = st.clock.now();
        let (jwks0, _) = st.fetch_jwks().await;
        assert!(kids(&jwks0).contains(&next[0]));

        // Too early: the next key has been published for less than max-age.
        let early = st.rotate("EdDSA").await.expect_err("too early");
        assert_eq!(early.code(), Code::FailedPrecondition);
        assert!(
            early.message().contains(&(START + MAX_AGE).to_string()),
            "{}",
            early.message()
        );
        st.clock.advance(MAX_AGE - 1);
        assert_eq!(
            st.rotate("EdDSA").await.expect_err("still early").code(),
            Code::FailedPrecondition
        );
        st.clock.advance(1);
        let r = st.rotate("EdDSA").await.expect("rotate").rotations;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].activated_kid, next[0]);
        assert_eq!(r[0].retired_kid, old_kid);
        let fresh_next = r[0].next_kid.clone();
        assert!(!fresh_next.is_empty());

        // The first signature under the new key carries a kid that a JWKS fetched at least
        // max-age earlier already held.
        let new_token = st.token().await;
        let new_kid = kid_of(&new_token);
        assert_eq!(new_kid, next[0]);
        assert!(st.clock.now() - fetched_at >= MAX_AGE);
        assert!(kids(&jwks0).contains(&new_kid));

        // The token signed before the rotation still verifies against a JWKS fetched after it.
        let (jwks1, body1) = st.fetch_jwks().await;
        assert!(kids(&jwks1).contains(&old_kid));
        assert!(kids(&jwks1).contains(&fresh_next), "the fresh next key is published");
        verify_compact(&old_token, &jwks1.keys).expect("old token verifies after rotation");
        verify_compact(&new_token, &jwks1.keys).expect("new token verifies");
        if let Some(claims) = jose_verify(&body1, &old_token) {
            assert_eq!(claims["sub"], st.account_id.as_str());
        }
        st.pay(&old_token, "")
            .await
            .expect("the old token still works at the daemon");

        // Revoking the active key: gone from the JWKS at once, its tokens refused, and the
        // fresh next key signs immediately.
        let rv = st
            .jwks_client("admin")
            .await
            .revoke_issuer_key(RevokeIssuerKeyRequest { kid: new_kid.clone() })
            .await
            .expect("revoke")
            .into_inner();
        assert_eq!(rv.promoted_kid, fresh_next);
        assert_eq!(rv.revoked.expect("before").state, "active");
        let (jwks2, _) = st.fetch_jwks().await;
        assert!(!kids(&jwks2).contains(&new_kid));
        assert!(verify_compact(&new_token, &jwks2.keys).is_err());
        let refused = st.pay(&new_token, "").await.expect_err("revoked key");
        assert_eq!(refused.code(), Code::Unauthenticated, "{}", refused.message());
        assert_eq!(kid_of(&st.token().await), fresh_next);
        let states = st.states().await;
        assert_eq!(kid_in_state(&states, "EdDSA", "revoked"), vec![new_kid.clone()]);
        assert_eq!(kid_in_state(&states, "EdDSA", "next").len(), 1, "a new next key");
        // Issuer keys are stored wrapped under the KEK, never token objects; a revoked key's
        // blob is destroyed by the revoking transaction.
        assert!(st.token_labels().await.is_empty(), "no issuer key is a token object");
        assert_eq!(
            st.stored(&new_kid).await,
            Some((false, Some(1))),
            "revoked key destroyed"
        );
        assert_eq!(
            st.stored(&fresh_next).await,
            Some((true, Some(1))),
            "the active key keeps its blob"
        );
        let missing = st
            .jwks_client("admin")
            .await
            .revoke_issuer_key(RevokeIssuerKeyRequest { kid: "nope".into() })
            .await
            .expect_err("unknown kid");
        assert_eq!(missing.code(), Code::NotFound);

        // Retired keys stay published through the grace period, then are removed and destroyed.
        // A retired key signs nothing more: its blob went with its retirement.
        assert_eq!(st.stored(&old_kid).await, Some((false, Some(1))));
        let lc = st.daemon.state.jwks.clone();
        let retired_at = START + MAX_AGE;
        lc.tick(retired_at + 90 * DAY - 1).await.expect("tick");
        assert!(kids(&st.fetch_jwks().await.0).contains(&old_kid), "still in grace");
        let report = lc.tick(retired_at + 90 * DAY).await.expect("tick");
        assert!(report.removed.contains(&old_kid), "{report:?}");
        assert!(!kids(&st.fetch_jwks().await.0).contains(&old_kid));
        assert_eq!(st.stored(&old_kid).await, None, "removed from the store");
        let hsm = st.daemon.state.keys.hsm().clone();
        let objects = tokio::task::spawn_blocking(move || hsm.inspect_private_keys().expect("inspect"))
            .await
            .expect("task");
        assert!(!format!("{objects:?}").contains(&old_kid));
        st.daemon.stop().await;
    });
}

#[test]
fn rotation_story_sqlite() {
    rotation_story(StoreKind::Sqlite);
}

#[test]
fn rotation_story_postgres() {
    rotation_story(StoreKind::Postgres);
}

#[test]
fn scheduled_rotation_publishes_then_promotes() {
    let env = env_with_jwks(StoreKind::Sqlite).expect("env");
    block_on(async {
        let st = Story::start(env).await;
        let lc = st.daemon.state.jwks.clone();
        let issuer = st.daemon.state.sessions.issuer().clone();
        let states = st.states().await;
        let a = kid_in_state(&states, "ES256", "active")[0].clone();
        let n = kid_in_state(&states, "ES256", "next")[0].clone();

        // Nothing is due yet.
        let r = lc.tick(START + 30 * DAY - 1).await.expect("tick");
        assert!(r.promoted.is_empty() && r.created.is_empty(), "{r:?}");
        // Rotation time: the pre-published next keys become active.
        let r = lc.tick(START + 30 * DAY).await.expect("tick");
        assert_eq!(r.promoted.len(), 2, "EdDSA and ES256: {r:?}");
        assert!(r.promoted.contains(&n));
        assert_eq!(issuer.active(IssuerAlg::ES256).expect("active").jwk.kid, n);
        let states = st.states().await;
        assert_eq!(kid_in_state(&states, "ES256", "retired"), vec![a.clone()]);
        assert!(kid_in_state(&states, "ES256", "next").is_empty());
        let claims = serde_json::json!({ "iss": "test" });
        let token = issuer.sign_jws(IssuerAlg::ES256, "test", &claims).expect("sign");
        assert_eq!(kid_of(&token), n);

        // Within the pre-publication window of the next rotation: a next key appears.
        let r = lc.tick(START + 60 * DAY - 24 * 3600 - 1).await.expect("tick");
        assert!(r.created.is_empty(), "{r:?}");
        let published_at = START + 60 * DAY - 24 * 3600;
        let r = lc.tick(published_at).await.expect("tick");
        assert_eq!(r.created.len(), 2, "{r:?}");
        assert!(r.promoted.is_empty());
        let n2 = kid_in_state(&st.states().await, "ES256", "next")[0].clone();
        let (jwks, _) = st.fetch_jwks().await;
        assert!(kids(&jwks).contains(&n2));
        // Ticking again changes nothing (idempotent).
        let r = lc.tick(published_at + 1).await.expect("tick");
        assert_eq!(r, Default::default());
        // Due: promoted, and it had been published for the whole window.
        let r = lc.tick(START + 60 * DAY).await.expect("tick");
        assert!(r.promoted.contains(&n2), "{r:?}");
        assert_eq!(issuer.active(IssuerAlg::ES256).expect("active").jwk.kid, n2);
        // The original key is past its grace period 90 days after it retired.
        let r = lc.tick(START + 120 * DAY).await.expect("tick");
        assert!(r.removed.contains(&a), "{r:?}");
        assert!(!kids(&st.fetch_jwks().await.0).contains(&a));
        st.daemon.stop().await;
    });
}

/// A revocation made through one replica reaches another within about a second (the watch,
/// `keyward::jwks::WATCH`), long before its scheduler's next run (`tick_seconds = 300` here): the
/// other replica stops publishing the revoked key and signs with the promoted one.
fn a_revocation_reaches_the_other_replica_within_the_watch(store: StoreKind) {
    let Some(env) = env_with_jwks(store) else { return };
    block_on(async {
        let st = Story::start(env).await;
        let other = st.env.start_with_clock(st.clock.clone()).await;
        let states = st.states().await;
        let active = kid_in_state(&states, "EdDSA", "active")[0].clone();
        let issuer = other.state.sessions.issuer().clone();
        let claims = serde_json::json!({ "iss": "test" });
        let sign = |issuer: &keyward::issuer::Issuer| {
            kid_of(&issuer.sign_jws(IssuerAlg::EdDSA, "test", &claims).expect("sign"))
        };
        assert_eq!(sign(&issuer), active);
        let rv = st
            .jwks_client("admin")
            .await
            .revoke_issuer_key(RevokeIssuerKeyRequest { kid: active.clone() })
            .await
            .expect("revoke")
            .into_inner();
        let promoted = rv.promoted_kid;
        assert!(!promoted.is_empty());
        let revoked_at = std::time::Instant::now();
        loop {
            let r = https_get(other.https_addr, &st.env.pki.ca_cert, "/.well-known/jwks.json", &[]).await;
            let jwks: Jwks = serde_json::from_str(&r.body).expect("JWKS JSON");
            if !kids(&jwks).contains(&active) && sign(&issuer) == promoted {
                break;
            }
            assert!(
                revoked_at.elapsed() < keyward::jwks::WATCH * 4,
                "the other replica still serves or signs with the revoked key after {:?}",
                revoked_at.elapsed()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        other.stop().await;
        st.daemon.stop().await;
    });
}

#[test]
fn a_revocation_reaches_the_other_replica_within_the_watch_sqlite() {
    a_revocation_reaches_the_other_replica_within_the_watch(StoreKind::Sqlite);
}

#[test]
fn a_revocation_reaches_the_other_replica_within_the_watch_postgres() {
    a_revocation_reaches_the_other_replica_within_the_watch(StoreKind::Postgres);
}

/// Runs the `keyward` binary as a client of the in-process daemon.
fn cli(st: &Story, profile: &str, args: &[&str]) -> (bool, String, String) {
    common::cli(&st.env, &st.daemon, profile, args)
}

#[test]
fn jwks_cli_show_rotate_revoke() {
    let env = env_with_jwks(StoreKind::Sqlite).expect("env");
    block_on(async {
        let st = Story::start(env).await;
        let (ok, out, err) = cli(&st, "admin", &["jwks", "show", "--json"]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
        assert_eq!(v["jwks"]["keys"].as_array().expect("keys").len(), 4);
        assert_eq!(v["max_age_seconds"], MAX_AGE);
        assert_eq!(v["issuer_keys"].as_array().expect("issuer keys").len(), 4);
        // Non-admins see the published set only.
        let (ok, out, err) = cli(&st, "marketplace", &["jwks", "show", "--json"]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
        assert!(v.get("issuer_keys").is_none());

        let (ok, _, err) = cli(&st, "admin", &["jwks", "rotate", "--alg", "EdDSA"]);
        assert!(!ok);
        assert!(err.contains("FAILED_PRECONDITION"), "{err}");
        st.clock.advance(MAX_AGE);
        let (ok, out, err) = cli(&st, "admin", &["jwks", "rotate", "--alg", "EdDSA", "--json"]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
        let activated = v["rotations"][0]["activated"].as_str().expect("kid").to_string();
        assert_eq!(v["rotations"][0]["alg"], "EdDSA");

        let (ok, out, err) = cli(&st, "admin", &["jwks", "revoke", &activated, "--json"]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
        assert_eq!(v["revoked"], activated.as_str());
        assert_eq!(v["before"]["state"], "active");
        let (jwks, _) = st.fetch_jwks().await;
        assert!(!kids(&jwks).contains(&activated));
        st.daemon.stop().await;
    });
}

// ---- issue 13 §4: the issuer key history ----

/// The issuer key history URL on the story's side port.
fn history_url(st: &Story) -> String {
    format!(
        "https://127.0.0.1:{}{}",
        st.daemon.https_addr.port(),
        keyward::jwks::history::HISTORY_PATH
    )
}

/// The store's checkpoints, once there are at least `n`. Reads go through the group-commit
/// appender, which signs a checkpoint after a group once enough events are pending.
async fn checkpoints_at_least(st: &Story, n: usize) -> Vec<keyward::audit::store::Checkpoint> {
    let store = st.daemon.state.keys.store().clone();
    let mut accounts = st.daemon.accounts(&st.env, "admin").await;
    for _ in 0..100 {
        accounts
            .get_account(keyward::api::pb::GetAccountRequest {
                account_id: st.account_id.clone(),
            })
            .await
            .expect("read");
        let cps = store.audit().checkpoints().await.expect("checkpoints");
        if cps.len() >= n {
            return cps;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} checkpoints after 5 s");
}

/// `keyward verify TOKEN` with the given key sources; (valid, stdout + stderr).
fn cli_verify(st: &Story, token: &str, sources: &[&str]) -> (bool, String) {
    let mut args = vec!["verify", token];
    args.extend_from_slice(sources);
    let (ok, out, err) = cli(st, "admin", &args);
    (ok, format!("{out}{err}"))
}

/// Past two rotations and the grace period the first EdDSA key is gone from the store, the
/// token and the JWKS; everything it signed (a session token, a receipt, checkpoints, an
/// archive) still verifies against the history, through the binary, and not against the JWKS
/// alone. A revoked key verifies what it signed before its revocation only.
fn old_signatures_verify_against_the_history(store: StoreKind) {
    let env = env_with_jwks(store).expect("env");
    let mut text = std::fs::read_to_string(&env.config_path).expect("config");
    text.push_str("[audit]\ncheckpoint_every_events = 3\n");
    std::fs::write(&env.config_path, text).expect("config");
    block_on(async {
        let st = Story::start(env).await;
        let lc = st.daemon.state.jwks.clone();
        let issuer = st.daemon.state.sessions.issuer().clone();
        let config = st.env.config_path.to_str().expect("path").to_string();
        let first = issuer.active(IssuerAlg::EdDSA).expect("active").jwk.kid.clone();

        // Era 1: a session token, payments, a receipt, and checkpoints, all by the first key.
        let t1 = st.token().await;
        assert_eq!(kid_of(&t1), first);
        for i in 0..4 {
            st.pay(&t1, &format!("p1-{i}")).await.expect("pay");
        }
        let receipt = st
            .daemon
            .signing(&st.env, "admin")
            .await
            .sign_receipt(keyward::api::pb::SignReceiptRequest {
                account_id: st.account_id.clone(),
                buyer: "did:example:buyer".into(),
                amount: "5".into(),
                currency: "USDC".into(),
                manifest: MANIFEST.into(),
                license_id: "lic-7".into(),
                session_token: String::new(),
                payment_signature_ref: String::new(),
                request_id: "rcpt-1".into(),
                payment_request_id: String::new(),
            })
            .await
            .expect("receipt")
            .into_inner()
            .receipt;
        assert_eq!(kid_of(&receipt), first);
        let era1 = checkpoints_at_least(&st, 2).await;
        assert!(era1.iter().all(|c| kid_of(&c.jws) == first));

        // Two rotations; the first key retires at +30 days and is removed 90 days later.
        st.clock.advance(30 * DAY);
        assert_eq!(lc.tick(st.clock.now()).await.expect("tick").promoted.len(), 2);
        let second = issuer.active(IssuerAlg::EdDSA).expect("active").jwk.kid.clone();
        assert_ne!(second, first);
        let t2 = st.token().await;
        for i in 0..4 {
            st.pay(&t2, &format!("p2-{i}")).await.expect("pay");
        }
        let through_era2 = checkpoints_at_least(&st, era1.len() + 2).await;
        st.clock.advance(29 * DAY);
        lc.tick(st.clock.now()).await.expect("tick: publish");
        st.clock.advance(DAY);
        assert_eq!(lc.tick(st.clock.now()).await.expect("tick").promoted.len(), 2);
        st.clock.advance(60 * DAY);
        let r = lc.tick(st.clock.now()).await.expect("tick");
        assert!(r.removed.contains(&first), "{r:?}");
        assert!(!kids(&st.fetch_jwks().await.0).contains(&first));
        assert!(!st.token_labels().await.iter().any(|l| l.contains(&first)));

        // The JWKS alone no longer verifies the first key's signatures; the history does.
        let jwks_url = format!(
            "https://127.0.0.1:{}/.well-known/jwks.json",
            st.daemon.https_addr.port()
        );
        let url = history_url(&st);
        for token in [&t1, &receipt] {
            let (ok, out) = cli_verify(&st, token, &["--jwks", &jwks_url]);
            assert!(!ok && out.contains("no key with kid"), "{out}");
            let (ok, out) = cli_verify(&st, token, &["--history", &url, "--json"]);
            assert!(ok, "{out}");
            let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
            assert_eq!(v["header"]["kid"], first.as_str());
            assert_eq!(v["key"]["retired_at"], START + 30 * DAY);
        }
        let history: keyward::jwks::history::KeyHistory = {
            let r = https_get(
                st.daemon.https_addr,
                &st.env.pki.ca_cert,
                keyward::jwks::history::HISTORY_PATH,
                &[],
            )
            .await;
            assert_eq!(r.status, 200);
            assert!(r.header("etag").is_some());
            serde_json::from_str(&r.body).expect("history JSON")
        };
        assert_eq!(
            history.keys.len(),
            8,
            "3 EdDSA + 3 ES256 created, plus the next key of each"
        );
        let e = history.get(&first).expect("first key in the history");
        assert_eq!(
            (e.created_at, e.activated_at, e.retired_at, e.revoked_at),
            (Some(START), Some(START), Some(START + 30 * DAY), None)
        );

        // The store's log, checkpoints by removed keys included, verifies through the binary.
        let (ok, out, err) = cli(&st, "admin", &["audit", "verify", "--config", &config, "--json"]);
        assert!(ok, "{out} {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
        let verified = v["report"]["checkpoints_verified"].as_u64().expect("n");
        assert!(verified >= through_era2.len() as u64, "{v}");

        // An archive of the first era verifies with the history, not with the JWKS alone.
        let archive = st.env.dir.path().join("era1.jsonl");
        let through = era1.last().expect("checkpoint").last_seq.to_string();
        let archive_path = archive.to_str().expect("path");
        let (ok, out, err) = cli(
            &st,
            "admin",
            &[
                "audit",
                "archive",
                "--config",
                &config,
                "--through",
                &through,
                "--out",
                archive_path,
            ],
        );
        assert!(ok, "{out} {err}");
        let (ok, out, err) = cli(
            &st,
            "admin",
            &[
                "audit",
                "verify",
                "--from-export",
                archive_path,
                "--history",
                &url,
                "--json",
            ],
        );
        assert!(ok, "{out} {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
        assert_eq!(v["report"]["checkpoints_verified"].as_u64(), Some(era1.len() as u64));
        let (ok, out, _) = cli(
            &st,
            "admin",
            &["audit", "verify", "--from-export", archive_path, "--jwks", &jwks_url],
        );
        assert!(!ok && out.contains("no key with kid"), "{out}");

        // Revocation: what the active key signed before it verifies; a signature claiming a
        // later time (as a thief of the key would make) does not.
        let third = issuer.active(IssuerAlg::EdDSA).expect("active").jwk.kid.clone();
        let now = st.clock.now();
        let before = issuer
            .sign_jws(IssuerAlg::EdDSA, "test", &serde_json::json!({ "iat": now }))
            .expect("sign");
        let after = issuer
            .sign_jws(IssuerAlg::EdDSA, "test", &serde_json::json!({ "iat": now + 100 }))
            .expect("sign");
        let t3 = st.token().await;
        assert_eq!(kid_of(&t3), third);
        let signed_by_third = checkpoints_at_least(&st, through_era2.len() + 1).await;
        assert!(signed_by_third.iter().any(|c| kid_of(&c.jws) == third));
        st.clock.advance(10);
        st.jwks_client("admin")
            .await
            .revoke_issuer_key(RevokeIssuerKeyRequest { kid: third.clone() })
            .await
            .expect("revoke");
        let (ok, out) = cli_verify(&st, &before, &["--history", &url]);
        assert!(ok, "{out}");
        assert!(out.contains(&format!("key revoked at {}", now + 10)), "{out}");
        let (ok, out) = cli_verify(&st, &after, &["--history", &url]);
        assert!(!ok, "{out}");
        assert!(out.contains(&format!("was revoked at {}", now + 10)), "{out}");
        // Checkpoints the revoked key signed before its revocation still verify.
        let (ok, out, err) = cli(&st, "admin", &["audit", "verify", "--config", &config, "--json"]);
        assert!(ok, "{out} {err}");
        st.daemon.stop().await;
    });
}

#[test]
fn old_signatures_verify_against_the_history_sqlite() {
    old_signatures_verify_against_the_history(StoreKind::Sqlite);
}

#[test]
fn old_signatures_verify_against_the_history_postgres() {
    old_signatures_verify_against_the_history(StoreKind::Postgres);
}
