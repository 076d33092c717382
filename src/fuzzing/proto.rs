//! Target `proto_handler`: request bytes through the real gRPC services. A daemon is started
//! once per process, as `keyward dev --custody host` would start it (a SoftHSM token, dev
//! certificates, the default policies, a SQLite store; its home in /dev/shm where there is
//! one), without its listeners: each input is framed as one gRPC message and handed to the
//! generated tonic service of one unary RPC, so tonic's decoder, the handler, the policy
//! decision and the audit append all run as they do behind mTLS. The caller is one of the dev
//! clients or an identity no policy names, as the TLS layer would have attached it.
//!
//! Input: byte 0 picks the RPC, byte 1 the caller, the rest is the request message. The
//! harness creates two accounts at start; account ids are random, so a request whose first
//! field (the account id, in every request that names one) is one byte long names the
//! harness's account chosen by that byte: `0a 01 00` becomes field 1 = the first account's id.
//!
//! What must hold for every input:
//! - bytes that do not decode as the request are refused by the codec (INTERNAL, as gRPC's
//!   status-code table asks for a request that does not parse) before any handler work, so
//!   no audit event is written;
//! - a request that decodes is decided and answered with a status a caller can act on (never
//!   INTERNAL, UNKNOWN, UNAVAILABLE, DATA_LOSS or UNIMPLEMENTED) and leaves one audit event
//!   (a few more when it changes issuer keys, which add the daemon's own events);
//! - error messages are short, and no answer carries the HSM PIN unless the request did.
//!
//! `AuditService.StreamEvents` is left out: it follows the log for as long as the caller
//! stays, so it never answers one input.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use http_body_util::BodyExt as _;
use prost::Message as _;
use tonic::codegen::Bytes;
use tower::ServiceExt as _;

use crate::api::pb;
use crate::api::{AccountApi, Daemon, JwksApi, SessionApi, SigningApi};
use crate::tls::ConnInfo;

/// One unary RPC: its path and whether bytes decode as its request.
struct Rpc {
    path: &'static str,
    decodes: fn(&[u8]) -> bool,
}

macro_rules! rpc {
    ($path:literal, $msg:ty) => {
        Rpc {
            path: $path,
            decodes: |b| <$msg>::decode(b).is_ok(),
        }
    };
}

/// Every unary RPC of the wire contract, in the order the proto files declare them.
const RPCS: &[Rpc] = &[
    rpc!("/keyward.v1.AccountService/CreateAccount", pb::CreateAccountRequest),
    rpc!("/keyward.v1.AccountService/GetAccount", pb::GetAccountRequest),
    rpc!("/keyward.v1.AccountService/GetAccountJwks", pb::GetAccountJwksRequest),
    rpc!("/keyward.v1.SigningService/SignTypedData", pb::SignTypedDataRequest),
    rpc!("/keyward.v1.SigningService/SignMessage", pb::SignMessageRequest),
    rpc!("/keyward.v1.SigningService/SignPayment", pb::SignPaymentRequest),
    rpc!("/keyward.v1.SigningService/SignReceipt", pb::SignReceiptRequest),
    rpc!("/keyward.v1.SigningService/SignAttestation", pb::SignAttestationRequest),
    rpc!(
        "/keyward.v1.SessionService/CreateSessionChallenge",
        pb::CreateSessionChallengeRequest
    ),
    rpc!("/keyward.v1.SessionService/OpenSession", pb::OpenSessionRequest),
    rpc!("/keyward.v1.SessionService/GetSession", pb::GetSessionRequest),
    rpc!("/keyward.v1.SessionService/ListSessions", pb::ListSessionsRequest),
    rpc!("/keyward.v1.SessionService/RevokeSession", pb::RevokeSessionRequest),
    rpc!("/keyward.v1.JwksService/GetJwks", pb::GetJwksRequest),
    rpc!("/keyward.v1.JwksService/ListIssuerKeys", pb::ListIssuerKeysRequest),
    rpc!("/keyward.v1.JwksService/RotateIssuerKey", pb::RotateIssuerKeyRequest),
    rpc!("/keyward.v1.JwksService/RevokeIssuerKey", pb::RevokeIssuerKeyRequest),
];

/// The number of RPCs the target drives (the first input byte is taken modulo it).
pub const PROTO_RPCS: usize = RPCS.len();

/// The path of RPC `i` (modulo the count), for seed writers.
pub fn proto_rpc_path(i: usize) -> &'static str {
    RPCS[i % RPCS.len()].path
}

/// Callers: the dev clients (by their certificate identity), then one no policy names.
pub const PROTO_CALLERS: [&str; 4] = [
    "spiffe://example.org/admin",
    "spiffe://example.org/marketplace",
    "spiffe://example.org/wallet-gateway",
    "spiffe://example.org/stranger",
];

/// The controller of the harness's accounts (an EIP-55 address from EIP-55's examples).
pub const PROTO_CONTROLLER: &str = "0x52908400098527886E0F7030069857D2E4169EE7";
use PROTO_CONTROLLER as CONTROLLER;

/// Largest error message a refusal may carry.
const MAX_MESSAGE: usize = 1024;

struct Harness {
    rt: tokio::runtime::Runtime,
    daemon: Arc<Daemon>,
    pin: String,
    accounts: Vec<String>,
    _home: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| match start() {
        Ok(h) => h,
        // Without its daemon the target cannot test anything: fail loudly, once.
        Err(e) => panic!("proto_handler: cannot start the daemon: {e}"),
    })
}

fn start() -> Result<Harness, String> {
    let shm = PathBuf::from("/dev/shm");
    let parent = if shm.is_dir() { shm } else { std::env::temp_dir() };
    let home = tempfile::Builder::new()
        .prefix("keyward-fuzz-")
        .tempdir_in(parent)
        .map_err(|e| e.to_string())?;
    let dev =
        crate::dev::prepare(&home.path().join("home"), crate::config::Custody::Host).map_err(|e| e.to_string())?;
    let mut config = crate::config::Config::load(&dev.config).map_err(|e| e.to_string())?;
    config.load_pin().map_err(|e| e.to_string())?;
    let pin = std::fs::read_to_string(dev.home.join("hsm-pin"))
        .map_err(|e| e.to_string())?
        .trim()
        .to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let running = rt
        .block_on(async {
            let hsm = crate::server::open_hsm(&config).await?;
            crate::server::init_token(hsm).await?;
            crate::server::start(&config).await
        })
        .map_err(|e| e.to_string())?;
    let daemon = running.daemon;
    let mut accounts = Vec::new();
    for label in ["fuzz-a", "fuzz-b"] {
        let request = pb::CreateAccountRequest {
            label: label.into(),
            controller: CONTROLLER.into(),
            ..Default::default()
        };
        let answer = rt.block_on(call(&daemon, RPCS[0].path, PROTO_CALLERS[0], &request.encode_to_vec()));
        let account = answer
            .body
            .get(5..)
            .and_then(|b| pb::Account::decode(b).ok())
            .ok_or_else(|| format!("CreateAccount: {:?} {}", answer.code, answer.message))?;
        accounts.push(account.account_id);
    }
    Ok(Harness {
        rt,
        daemon,
        pin,
        accounts,
        _home: home,
    })
}

/// The answer to one call: gRPC status code, message and response body bytes.
struct Answer {
    code: tonic::Code,
    message: String,
    body: Bytes,
}

async fn call(daemon: &Arc<Daemon>, path: &'static str, caller: &str, message: &[u8]) -> Answer {
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap_or(u32::MAX).to_be_bytes());
    framed.extend_from_slice(message);
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(Bytes::from(framed))));
    let mut request = match request {
        Ok(r) => r,
        Err(e) => panic!("{path}: a request that cannot be built: {e}"),
    };
    request.extensions_mut().insert(ConnInfo {
        identity: caller.to_string(),
        remote_addr: None,
    });
    let d = daemon.clone();
    let response: Result<http::Response<tonic::body::Body>, Infallible> = match path.split('/').nth(1) {
        Some("keyward.v1.AccountService") => {
            pb::account_service_server::AccountServiceServer::new(AccountApi(d))
                .oneshot(request)
                .await
        }
        Some("keyward.v1.SigningService") => {
            pb::signing_service_server::SigningServiceServer::new(SigningApi(d))
                .oneshot(request)
                .await
        }
        Some("keyward.v1.SessionService") => {
            pb::session_service_server::SessionServiceServer::new(SessionApi(d))
                .oneshot(request)
                .await
        }
        _ => {
            pb::jwks_service_server::JwksServiceServer::new(JwksApi(d))
                .oneshot(request)
                .await
        }
    };
    let Ok(response) = response;
    let (parts, body) = response.into_parts();
    let collected = match body.collect().await {
        Ok(c) => c,
        Err(e) => panic!("{path}: the response body failed: {e}"),
    };
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let body = collected.to_bytes();
    let header = |name: &str| {
        trailers
            .get(name)
            .or_else(|| parts.headers.get(name))
            .map(|v| v.as_bytes().to_vec())
    };
    let code = match header("grpc-status") {
        Some(v) => std::str::from_utf8(&v)
            .ok()
            .and_then(|s| s.parse::<i32>().ok())
            .map(tonic::Code::from)
            .unwrap_or_else(|| panic!("{path}: grpc-status {v:?} is not a number")),
        None => panic!("{path}: no grpc-status in the answer"),
    };
    let message = header("grpc-message").map(|v| percent_decode(&v)).unwrap_or_default();
    Answer { code, message, body }
}

/// grpc-message is percent-encoded (gRPC over HTTP/2).
fn percent_decode(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%' && i + 2 < v.len() {
            if let Ok(b) = u8::from_str_radix(&String::from_utf8_lossy(&v[i + 1..i + 3]), 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(v[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A one-byte field 1 replaced by the id of the harness's account it picks.
fn with_account(message: &[u8], accounts: &[String]) -> Vec<u8> {
    match message {
        [0x0a, 1, pick, rest @ ..] if !accounts.is_empty() => {
            let id = accounts[usize::from(*pick) % accounts.len()].as_bytes();
            let mut out = Vec::with_capacity(message.len() + id.len());
            out.push(0x0a);
            // Account ids are far shorter than 128 bytes: one length byte.
            out.push(u8::try_from(id.len()).unwrap_or(0x7f).min(0x7f));
            out.extend_from_slice(&id[..id.len().min(0x7f)]);
            out.extend_from_slice(rest);
            out
        }
        _ => message.to_vec(),
    }
}

async fn audit_seq(daemon: &Daemon) -> u64 {
    match daemon.keys.store().audit().audit_head().await {
        Ok(head) => head.seq,
        Err(e) => panic!("the audit head cannot be read: {e}"),
    }
}

/// Request bytes through the real gRPC services (see the module documentation).
pub fn proto_handler(data: &[u8]) {
    let h = harness();
    let (rpc, caller, message) = match data {
        [r, c, rest @ ..] => (
            &RPCS[usize::from(*r) % RPCS.len()],
            PROTO_CALLERS[usize::from(*c) % 4],
            rest,
        ),
        _ => return,
    };
    let message = with_account(message, &h.accounts);
    let message = &message[..];
    let decodes = (rpc.decodes)(message);
    let (before, answer, after) = h.rt.block_on(async {
        let before = audit_seq(&h.daemon).await;
        let answer = call(&h.daemon, rpc.path, caller, message).await;
        let after = audit_seq(&h.daemon).await;
        (before, answer, after)
    });
    let what = format!("{} as {caller}: {:?} {:?}", rpc.path, answer.code, answer.message);
    if decodes {
        assert!(
            !matches!(
                answer.code,
                tonic::Code::Internal
                    | tonic::Code::Unknown
                    | tonic::Code::Unavailable
                    | tonic::Code::DataLoss
                    | tonic::Code::Unimplemented
            ),
            "a request that decodes got a server-side failure: {what}"
        );
        let events = after.saturating_sub(before);
        assert!(
            (1..=4).contains(&events),
            "{events} audit events for one decided request: {what}"
        );
    } else {
        assert_eq!(answer.code, tonic::Code::Internal, "undecodable bytes: {what}");
        assert_eq!(after, before, "undecodable bytes reached the audit log: {what}");
    }
    assert!(answer.message.len() <= MAX_MESSAGE, "a long error message: {what}");
    // An answer may echo what the caller sent (a challenge repeats its
    // delegate): the PIN only counts as leaked when the request lacked it.
    // The fuzzer can learn the PIN from this very comparison (libFuzzer
    // watches comparisons) and did: it sent it as a delegate.
    let pin = h.pin.as_bytes();
    let holds_pin = |text: &[u8]| text.windows(pin.len().max(1)).any(|w| w == pin);
    if !holds_pin(message) {
        for text in [answer.message.as_bytes(), &answer.body[..]] {
            assert!(!holds_pin(text), "the HSM PIN in an answer: {}", rpc.path);
        }
    }
}
