//! `keyward bench`: a load generator over real mutual TLS. It creates
//! accounts, drives signing RPCs at a given concurrency for a given time, and
//! in the same run measures the ceilings the daemon is compared with: a bare
//! tonic server that only signs with k256, raw k256/Ed25519 signing, and
//! (with --hsm-baseline) raw SoftHSM C_Sign. Figures are printed as ratios,
//! since the machines are shared and noisy.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use ed25519_dalek::Signer as _;
use serde_json::json;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::api::pb::account_service_client::AccountServiceClient;
use crate::api::pb::signing_service_client::SigningServiceClient;
use crate::api::pb::signing_service_server::{SigningService, SigningServiceServer};
use crate::api::pb::{
    CreateAccountRequest, SignMessageRequest, SignMessageResponse, SignPaymentRequest, SignPaymentResponse,
    SignTypedDataRequest, SignTypedDataResponse, SignatureAlgorithm,
};
use crate::cli::client::RpcError;
use crate::cli::ClientOpts;
use crate::crypto::eip712::keccak256;
use crate::types::KeyAlg;

/// `keyward bench` options.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Accounts to create and sign with.
    #[arg(long, default_value_t = 100)]
    pub accounts: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections the requests are spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Seconds of load per measurement.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// The operation.
    #[arg(long, value_enum, default_value_t = BenchOp::TypedData)]
    pub op: BenchOp,
    /// Also measure raw SoftHSM C_Sign on the dev token (set when the daemon runs custody hsm).
    #[arg(long)]
    pub hsm_baseline: bool,
    /// Skip the bare tonic baseline.
    #[arg(long)]
    pub no_tonic_baseline: bool,
    /// Skip the audit append measurement (group commit vs one commit per event).
    #[arg(long)]
    pub no_audit_baseline: bool,
    /// Instead of the dev daemon: start this many `keyward serve` replicas
    /// over one PostgreSQL schema and one SoftHSM token (the test database,
    /// KEYWARD_TEST_DATABASE_URL; see `keyward::cluster`), and measure the
    /// load against one of them, then spread over all of them.
    #[arg(long, default_value_t = 0)]
    pub replicas: usize,
}

/// What the load generator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchOp {
    /// SignTypedData with the EIP-712 Mail document (secp256k1).
    TypedData,
    /// SignMessage with Ed25519.
    Ed25519,
    /// SignPayment in one delegated session (the marketplace profile): a
    /// reservation and a completion in the store per signature.
    Payment,
}

/// The EIP-712 Mail document (the specification's example) the load generators sign.
pub(crate) const MAIL: &str = r#"{"types":{"EIP712Domain":[{"name":"name","type":"string"},{"name":"version","type":"string"},{"name":"chainId","type":"uint256"},{"name":"verifyingContract","type":"address"}],"Person":[{"name":"name","type":"string"},{"name":"wallet","type":"address"}],"Mail":[{"name":"from","type":"Person"},{"name":"to","type":"Person"},{"name":"contents","type":"string"}]},"primaryType":"Mail","domain":{"name":"Ether Mail","version":"1","chainId":1,"verifyingContract":"0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC"},"message":{"from":{"name":"Cow","wallet":"0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"},"to":{"name":"Bob","wallet":"0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbB"},"contents":"Hello, Bob!"}}"#;

/// Throughput and latency of one measurement.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Successful requests.
    pub ok: u64,
    /// Failed requests.
    pub errors: u64,
    /// Requests per second.
    pub per_sec: f64,
    /// Latency percentiles in microseconds: p50, p95, p99.
    pub p50_us: u64,
    /// 95th percentile.
    pub p95_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
}

impl LoadResult {
    fn json(&self) -> serde_json::Value {
        json!({"ok": self.ok, "errors": self.errors, "per_sec": self.per_sec.round(),
               "p50_us": self.p50_us, "p95_us": self.p95_us, "p99_us": self.p99_us})
    }
}

/// The `p` quantile (0..=1) of sorted samples, nearest rank; 0 when empty.
pub(crate) fn percentile(sorted: &[u32], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    u64::from(sorted[idx.min(sorted.len() - 1)])
}

/// One request of the load `op` for `account_id`. A payment is signed in
/// the session `payment` names (its token, then the request id); without
/// one, a payment load's request is the Ed25519 load's message.
async fn request_once(
    client: &mut SigningServiceClient<Channel>,
    op: BenchOp,
    account_id: String,
    payment: Option<(String, String)>,
) -> Result<(), tonic::Status> {
    match (op, payment) {
        (BenchOp::TypedData, _) => client
            .sign_typed_data(SignTypedDataRequest {
                account_id,
                typed_data_json: MAIL.to_string(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        (BenchOp::Payment, Some((session_token, request_id))) => client
            .sign_payment(SignPaymentRequest {
                session_token,
                amount: "1".into(),
                currency: "USDC".into(),
                manifest: BENCH_MANIFEST.into(),
                license_id: "bench".into(),
                payee: String::new(),
                request_id,
            })
            .await
            .map(|_| ()),
        (BenchOp::Ed25519 | BenchOp::Payment, _) => client
            .sign_message(SignMessageRequest {
                account_id,
                alg: SignatureAlgorithm::Ed25519 as i32,
                data: MESSAGE.to_vec(),
            })
            .await
            .map(|_| ()),
    }
}

/// Drives `op` over `channels` for `duration`.
async fn drive(
    channels: &[Channel],
    accounts: Arc<Vec<String>>,
    op: BenchOp,
    concurrency: usize,
    duration: Duration,
    session_token: Option<Arc<String>>,
) -> LoadResult {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let deadline = Instant::now() + duration;
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for t in 0..concurrency {
        let ch = channels[t % channels.len()].clone();
        let accounts = accounts.clone();
        let errors = errors.clone();
        let token = session_token.clone();
        let run = run.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = SigningServiceClient::new(ch);
            let mut lat = Vec::with_capacity(4096);
            let mut i = t;
            while Instant::now() < deadline {
                let account_id = accounts[i % accounts.len()].clone();
                i = i.wrapping_add(concurrency);
                let t0 = Instant::now();
                let payment = (op == BenchOp::Payment)
                    .then(|| (token.as_deref().cloned().unwrap_or_default(), format!("{run}-{i}")));
                let r = request_once(&mut client, op, account_id, payment).await;
                match r {
                    Ok(()) => lat.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX)),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        if let Ok(mut l) = t.await {
            all.append(&mut l);
        }
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    all.sort_unstable();
    LoadResult {
        ok: all.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        per_sec: all.len() as f64 / elapsed,
        p50_us: percentile(&all, 0.50),
        p95_us: percentile(&all, 0.95),
        p99_us: percentile(&all, 0.99),
    }
}

async fn channels(home: &Path, opts: &ClientOpts, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        out.push(crate::cli::client::connect(home, opts).await?);
    }
    Ok(out)
}

/// How account creation went: the limit it met and the time it waited.
#[derive(Debug, Clone, Copy, Default)]
struct Creation {
    /// RESOURCE_EXHAUSTED answers (the `client-account-creation` bucket).
    refused: u64,
    /// Seconds spent waiting for the bucket to refill.
    waited: f64,
}

/// Creates `n` accounts, pacing itself to the daemon's account-creation
/// limit: a RESOURCE_EXHAUSTED answer is retried after a back-off (the
/// bucket refills), counted and reported, never fatal. Any other error ends
/// the run with the daemon's message.
async fn create_accounts(ch: &Channel, n: usize) -> anyhow::Result<(Vec<String>, Creation)> {
    let sem = Arc::new(tokio::sync::Semaphore::new(8));
    let refused = Arc::new(AtomicU64::new(0));
    let waited_ms = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = AccountServiceClient::new(ch.clone());
        let sem = sem.clone();
        let refused = refused.clone();
        let waited_ms = waited_ms.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await;
            let mut backoff = Duration::from_millis(50);
            loop {
                let r = c
                    .create_account(CreateAccountRequest {
                        controller: format!("0x{:040x}", i + 1),
                        label: format!("bench-{i}"),
                        allow: vec![],
                    })
                    .await;
                match r {
                    Ok(r) => return Ok(r.into_inner().account_id),
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        waited_ms.fetch_add(
                            u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                            Ordering::Relaxed,
                        );
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                    Err(s) => return Err(s),
                }
            }
        }));
    }
    let mut ids = Vec::with_capacity(n);
    for t in tasks {
        ids.push(t.await.context("account task")?.map_err(RpcError)?);
    }
    let creation = Creation {
        refused: refused.load(Ordering::Relaxed),
        waited: waited_ms.load(Ordering::Relaxed) as f64 / 1000.0 / 8.0,
    };
    if creation.refused > 0 {
        eprintln!(
            "note: account creation met the daemon's `client-account-creation` limit {} times and paced itself \
             (about {:.1} s of waiting); raise its capacity and refill_per_second in policies/limits.toml \
             for a faster set-up",
            creation.refused, creation.waited
        );
    }
    Ok((ids, creation))
}

/// The bare ceiling: a tonic service that only signs with one k256 (or Ed25519) key.
#[derive(Debug)]
struct Bare {
    secp: k256::ecdsa::SigningKey,
    ed: ed25519_dalek::SigningKey,
}

#[tonic::async_trait]
impl SigningService for Bare {
    async fn sign_typed_data(
        &self,
        r: Request<SignTypedDataRequest>,
    ) -> Result<Response<SignTypedDataResponse>, Status> {
        let digest = keccak256(r.into_inner().typed_data_json.as_bytes());
        let (sig, v) = self
            .secp
            .sign_prehash_recoverable(&digest)
            .map_err(|_| Status::internal("sign"))?;
        let mut out = sig.to_bytes().to_vec();
        out.push(27 + v.to_byte());
        Ok(Response::new(SignTypedDataResponse {
            digest: digest.to_vec(),
            signature: out,
            signer: String::new(),
            remaining: String::new(),
        }))
    }
    async fn sign_payment(&self, _: Request<SignPaymentRequest>) -> Result<Response<SignPaymentResponse>, Status> {
        Err(Status::unimplemented(
            "the bare baseline signs typed data and messages only",
        ))
    }
    async fn sign_receipt(
        &self,
        _: Request<crate::api::pb::SignReceiptRequest>,
    ) -> Result<Response<crate::api::pb::SignReceiptResponse>, Status> {
        Err(Status::unimplemented(
            "the bare baseline signs typed data and messages only",
        ))
    }
    async fn sign_attestation(
        &self,
        _: Request<crate::api::pb::SignAttestationRequest>,
    ) -> Result<Response<crate::api::pb::SignAttestationResponse>, Status> {
        Err(Status::unimplemented(
            "the bare baseline signs typed data and messages only",
        ))
    }
    async fn sign_transaction(
        &self,
        _: Request<crate::api::pb::SignTransactionRequest>,
    ) -> Result<Response<crate::api::pb::SignTransactionResponse>, Status> {
        Err(Status::unimplemented(
            "the bare baseline signs typed data and messages only",
        ))
    }
    async fn sign_message(&self, r: Request<SignMessageRequest>) -> Result<Response<SignMessageResponse>, Status> {
        let sig = self.ed.sign(&r.into_inner().data);
        Ok(Response::new(SignMessageResponse {
            signature: sig.to_bytes().to_vec(),
            public_key: Vec::new(),
            digest: Vec::new(),
        }))
    }
}

async fn bare_tonic(home: &Path, opts: &ClientOpts, args: &BenchArgs) -> anyhow::Result<LoadResult> {
    let pki = home.join("pki");
    let tls = crate::tls::ServerTls::load(crate::tls::TlsPaths {
        cert: pki.join("server.pem"),
        key: pki.join("server-key.pem"),
        client_ca: pki.join("ca.pem"),
    })?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let bare = Bare {
        secp: k256::ecdsa::SigningKey::random(&mut rand::thread_rng()),
        ed: ed25519_dalek::SigningKey::generate(&mut rand::thread_rng()),
    };
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let slots = crate::tls::Slots::new(crate::tls::ListenerLimits::standalone(
        "bench",
        4096,
        std::time::Duration::from_secs(10),
    )?);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(SigningServiceServer::new(bare))
            .serve_with_incoming_shutdown(crate::tls::incoming(listener, tls, slots), async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            }),
    );
    let mut opts = opts.clone();
    opts.endpoint = Some(format!("https://{addr}"));
    let chans = channels(home, &opts, args.connections).await?;
    let ids = Arc::new(vec!["00000000-0000-4000-8000-000000000000".to_string()]);
    let result = drive(
        &chans,
        ids,
        args.op,
        args.concurrency,
        Duration::from_secs(args.duration),
        None,
    )
    .await;
    let _ = stop_tx.send(true);
    let _ = server.await;
    Ok(result)
}

/// Signatures per second on `threads` threads for `secs`.
fn raw_crypto(op: BenchOp, threads: usize, secs: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let secp = k256::ecdsa::SigningKey::random(&mut rand::thread_rng());
                let ed = ed25519_dalek::SigningKey::generate(&mut rand::thread_rng());
                let mut n = 0u64;
                let mut digest = keccak256(MAIL.as_bytes());
                while Instant::now() < deadline {
                    match op {
                        BenchOp::TypedData | BenchOp::Payment => {
                            if let Ok((sig, _)) = secp.sign_prehash_recoverable(&digest) {
                                digest[0] ^= sig.to_bytes()[0];
                            }
                        }
                        BenchOp::Ed25519 => {
                            let sig = ed.sign(&digest);
                            digest[0] ^= sig.to_bytes()[0];
                        }
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total: u64 = handles.into_iter().filter_map(|h| h.join().ok()).sum();
    total as f64 / secs
}

/// Raw C_Sign on the dev token with as many threads as the daemon's pool.
fn raw_hsm(home: &Path, op: BenchOp, secs: f64) -> anyhow::Result<f64> {
    let config = crate::config::Config::load(&home.join("keyward.toml"))?;
    let hsm = crate::hsm::Hsm::open(&config.hsm_config()?)?;
    let alg = match op {
        BenchOp::TypedData | BenchOp::Payment => KeyAlg::Secp256k1,
        BenchOp::Ed25519 => KeyAlg::Ed25519,
    };
    let w = hsm.generate_wrapped(alg)?;
    let key = Arc::new(hsm.unwrap_for_signing(
        alg,
        &crate::hsm::WrappedRef {
            public_key: &w.public_key,
            wrapped: &w.wrapped,
            kek_version: w.kek_version,
        },
    )?);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..config.hsm.pool_size)
        .map(|_| {
            let hsm = hsm.clone();
            let key = key.clone();
            std::thread::spawn(move || {
                let digest = keccak256(MAIL.as_bytes());
                let mut n = 0u64;
                while Instant::now() < deadline {
                    if hsm.sign(&key, &digest).is_ok() {
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let total: u64 = handles.into_iter().filter_map(|h| h.join().ok()).sum();
    Ok(total as f64 / secs)
}

/// The message the Ed25519 load signs.
const MESSAGE: &[u8] = b"keyward bench message";

/// The license manifest of the payment load's session scope and payments.
const BENCH_MANIFEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// Opens the delegated session the payment load pays in: an account
/// controlled by a throw-away wallet key (created by `admin`), a challenge
/// asked for by the wallet gateway (`gateway`), signed by the wallet as
/// `eth_signTypedData_v4` does, opened. Returns the session token.
async fn payment_session(admin: &Channel, gateway: &Channel) -> anyhow::Result<String> {
    use crate::api::pb::session_service_client::SessionServiceClient;
    use crate::api::pb::{CreateSessionChallengeRequest, OpenSessionRequest};
    let wallet = k256::ecdsa::SigningKey::random(&mut rand::thread_rng());
    let controller = crate::crypto::eth::Address::from_public_key(wallet.verifying_key()).to_checksum();
    let account = AccountServiceClient::new(admin.clone())
        .create_account(CreateAccountRequest {
            controller,
            label: "bench-payments".into(),
            allow: vec![],
        })
        .await
        .map_err(RpcError)?
        .into_inner()
        .account_id;
    let mut sessions = SessionServiceClient::new(gateway.clone());
    let challenge = sessions
        .create_session_challenge(CreateSessionChallengeRequest {
            account_id: account,
            delegate: "spiffe://example.org/marketplace".into(),
            scopes: vec!["payments:0-100".into(), format!("license:manifest:{BENCH_MANIFEST}")],
            cap: "1000000000000".into(),
            ttl_seconds: 3600,
        })
        .await
        .map_err(RpcError)?
        .into_inner();
    let digest = crate::crypto::eip712::TypedData::from_json_str(&challenge.typed_data_json)?.signing_hash();
    let signature = crate::crypto::eth::sign_digest(&wallet, &digest)?.to_vec();
    let opened = sessions
        .open_session(OpenSessionRequest {
            challenge_id: challenge.challenge_id,
            signature,
        })
        .await
        .map_err(RpcError)?
        .into_inner();
    Ok(opened.token)
}

/// Database transactions (committed and rolled back) of the current
/// database so far, as PostgreSQL counts them.
async fn pg_transactions(db: &sqlx::PgPool) -> anyhow::Result<i64> {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT (xact_commit + xact_rollback)::BIGINT FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(db)
    .await?;
    Ok(n)
}

/// `drive` against `channels`, with the database transactions it cost per
/// signature (PostgreSQL's own counters, read before and after; they are
/// published about once a second, hence the pause).
async fn drive_counted(
    db: &sqlx::PgPool,
    channels: &[Channel],
    args: &BenchArgs,
    ids: Arc<Vec<String>>,
    token: Option<Arc<String>>,
) -> anyhow::Result<(LoadResult, f64)> {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = pg_transactions(db).await?;
    let r = drive(
        channels,
        ids,
        args.op,
        args.concurrency,
        Duration::from_secs(args.duration.max(1)),
        token,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = pg_transactions(db).await?;
    let per_sig = if r.ok > 0 {
        (after - before) as f64 / r.ok as f64
    } else {
        0.0
    };
    Ok((r, per_sig))
}

/// `keyward bench --replicas N`: a local cluster of N replicas (see
/// [`crate::cluster`]); the same load against replica 0 alone, then spread
/// over all N (the same number of connections, round-robin).
async fn run_replicas(opts: &ClientOpts, args: BenchArgs) -> anyhow::Result<()> {
    let binary = std::env::current_exe().context("the keyward binary")?;
    let mut options = crate::cluster::ClusterOptions::new(args.replicas, binary);
    // Set-up creates every account from one client: let it.
    options.limits = "[[rate]]\nname = \"bench-account-creation\"\nper = \"identity\"\nactions = [\"CreateAccount\"]\ncapacity = 100000\nrefill_per_second = 100000.0\n".into();
    let cluster = crate::cluster::Cluster::start(options)
        .await?
        .context("PostgreSQL is not reachable (KEYWARD_TEST_DATABASE_URL): the replicas need it")?;
    let n = cluster.replicas.len();
    let profile = match args.op {
        BenchOp::Payment => "marketplace",
        _ => "admin",
    };
    let mut one = Vec::with_capacity(args.connections);
    let mut all = Vec::with_capacity(args.connections);
    for c in 0..args.connections.max(1) {
        one.push(cluster.channel(0, profile).await?);
        all.push(cluster.channel(c % n, profile).await?);
    }
    let admin = cluster.channel(0, "admin").await?;
    let (ids, _) = create_accounts(&admin, args.accounts.max(1)).await?;
    let ids = Arc::new(ids);
    let token = match args.op {
        BenchOp::Payment => {
            let gateway = cluster.channel(0, "wallet-gateway").await?;
            Some(Arc::new(payment_session(&admin, &gateway).await?))
        }
        _ => None,
    };
    // Warm every replica's key cache (each unwraps on first use).
    for ch in &all {
        let _ = drive(
            std::slice::from_ref(ch),
            ids.clone(),
            args.op,
            ids.len().min(64),
            Duration::from_millis(500),
            token.clone(),
        )
        .await;
    }
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(cluster.schema_url())
        .await?;
    let (single, single_tx) = drive_counted(&db, &one, &args, ids.clone(), token.clone()).await?;
    let (spread, spread_tx) = drive_counted(&db, &all, &args, ids.clone(), token.clone()).await?;
    db.close().await;
    let ratio = if single.per_sec > 0.0 {
        spread.per_sec / single.per_sec
    } else {
        0.0
    };
    let out = json!({
        "op": format!("{:?}", args.op),
        "replicas": n,
        "concurrency": args.concurrency,
        "connections": args.connections,
        "duration_s": args.duration,
        "one_replica": single.json(),
        "all_replicas": spread.json(),
        "ratio_all_to_one": ratio,
        "db_transactions_per_signature_one": single_tx,
        "db_transactions_per_signature_all": spread_tx,
    });
    if opts.json {
        println!("{out}");
    } else {
        println!(
            "op {:?}, {n} replicas over one PostgreSQL schema, concurrency {}, {} connections, {} s each",
            args.op, args.concurrency, args.connections, args.duration
        );
        for (name, r, tx) in [("1 replica", &single, single_tx), ("all", &spread, spread_tx)] {
            println!(
                "  {name:<10} {:>9.0}/s  p50 {:>6} us  p99 {:>6} us  errors {}  db transactions/signature {tx:.2}",
                r.per_sec, r.p50_us, r.p99_us, r.errors
            );
        }
        println!("  ratio all / 1 replica {ratio:.2}");
    }
    Ok(())
}

/// Runs the benchmark and prints its figures.
pub async fn run(home: &Path, opts: &ClientOpts, args: BenchArgs) -> anyhow::Result<()> {
    if args.replicas > 0 {
        return run_replicas(opts, args).await;
    }
    let dur = Duration::from_secs(args.duration.max(1));
    let chans = channels(home, opts, args.connections).await?;
    let t0 = Instant::now();
    let (ids, creation) = create_accounts(&chans[0], args.accounts.max(1)).await?;
    let ids = Arc::new(ids);
    let create_secs = t0.elapsed().as_secs_f64();
    // Warm the daemon: one request per account, of the kind the load sends
    // (the same document or message), so that the key cache and the kept
    // decisions hold what the load asks for. With many accounts a load of a
    // few seconds touches each account once at most: warmed with another
    // kind of request, every decision it measured would be a first one.
    let t0 = Instant::now();
    for chunk in ids.chunks(args.concurrency.max(1)) {
        let futs: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let mut c = SigningServiceClient::new(chans[i % chans.len()].clone());
                let account_id = id.clone();
                // A payment signs in its session's one account: without a
                // session the accounts are warmed with the message load's request.
                async move { request_once(&mut c, args.op, account_id, None).await }
            })
            .collect();
        for f in futs {
            f.await.map_err(RpcError)?;
        }
    }
    let warm_secs = t0.elapsed().as_secs_f64();

    let (load_chans, token) = match args.op {
        BenchOp::Payment => {
            let profile = |p: &str| {
                let mut o = opts.clone();
                p.clone_into(&mut o.profile);
                o
            };
            let gateway = channels(home, &profile("wallet-gateway"), 1).await?;
            let token = payment_session(&chans[0], &gateway[0]).await?;
            (
                channels(home, &profile("marketplace"), args.connections).await?,
                Some(Arc::new(token)),
            )
        }
        _ => (chans.clone(), None),
    };
    let daemon = drive(&load_chans, ids.clone(), args.op, args.concurrency, dur, token).await;
    // The bare baseline signs typed data and messages only.
    let bare = if args.no_tonic_baseline || args.op == BenchOp::Payment {
        None
    } else {
        Some(bare_tonic(home, opts, &args).await?)
    };
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let op = args.op;
    let raw_1 = tokio::task::spawn_blocking(move || raw_crypto(op, 1, 2.0)).await?;
    let raw_all = tokio::task::spawn_blocking(move || raw_crypto(op, threads, 2.0)).await?;
    let hsm = if args.hsm_baseline {
        let home = home.to_path_buf();
        Some(tokio::task::spawn_blocking(move || raw_hsm(&home, op, 3.0)).await??)
    } else {
        None
    };

    // Audit appends from `concurrency` writers on a scratch store beside the
    // daemon's: group commit (the daemon's default) vs one commit per event.
    let audit = if args.no_audit_baseline {
        None
    } else {
        let secs = Duration::from_secs(2);
        let grouped = crate::audit::bench::append_rate(home, 256, args.concurrency, secs).await?;
        let single = crate::audit::bench::append_rate(home, 1, args.concurrency, secs).await?;
        // The bare ceiling: one connection, the same rows, as many per commit
        // as `concurrency` writers can put in one group.
        let bare = crate::audit::bench::bare_insert_rate(home, args.concurrency, secs).await?;
        Some((grouped, single, bare))
    };

    let ratio = |den: f64| if den > 0.0 { daemon.per_sec / den } else { 0.0 };
    let out = json!({
        "audit_appends_per_sec_group_commit": audit.map(|a| a.0.round()),
        "audit_appends_per_sec_commit_per_event": audit.map(|a| a.1.round()),
        "ratio_audit_group_to_per_event": audit.map(|a| if a.1 > 0.0 { a.0 / a.1 } else { 0.0 }),
        "audit_bare_sqlite_inserts_per_sec": audit.map(|a| a.2.round()),
        "ratio_audit_group_to_bare_sqlite": audit.map(|a| if a.2 > 0.0 { a.0 / a.2 } else { 0.0 }),
        "op": format!("{:?}", args.op),
        "accounts": ids.len(),
        "concurrency": args.concurrency,
        "connections": args.connections,
        "duration_s": args.duration,
        "account_create_s": create_secs,
        "account_create_refused": creation.refused,
        "cache_warm_s": warm_secs,
        "daemon": daemon.json(),
        "bare_tonic": bare.as_ref().map(LoadResult::json),
        "raw_sign_per_sec_1_thread": raw_1.round(),
        "raw_sign_per_sec_all_cores": raw_all.round(),
        "raw_hsm_sign_per_sec": hsm.map(f64::round),
        "ratio_daemon_to_bare_tonic": bare.as_ref().map(|b| ratio(b.per_sec)),
        "ratio_daemon_to_raw_all_cores": ratio(raw_all),
        "ratio_daemon_to_raw_hsm": hsm.map(ratio),
    });
    if opts.json {
        println!("{out}");
    } else {
        println!(
            "op {:?}, {} accounts, concurrency {}, {} connections, {} s",
            args.op,
            ids.len(),
            args.concurrency,
            args.connections,
            args.duration
        );
        println!(
            "  setup: {} accounts created in {:.1} s ({} paced by the creation limit), cache warmed in {:.1} s",
            ids.len(),
            create_secs,
            creation.refused,
            warm_secs
        );
        let line = |name: &str, r: &LoadResult| {
            println!(
                "  {name:<12} {:>9.0}/s  p50 {:>6} us  p95 {:>6} us  p99 {:>6} us  errors {}",
                r.per_sec, r.p50_us, r.p95_us, r.p99_us, r.errors
            )
        };
        line("daemon", &daemon);
        if let Some(b) = &bare {
            line("bare tonic", b);
        }
        println!("  raw sign     {raw_1:>9.0}/s on 1 thread, {raw_all:>9.0}/s on {threads} threads");
        if let Some(h) = hsm {
            println!("  raw SoftHSM  {h:>9.0}/s (C_Sign, pool-size threads)");
        }
        if let Some(b) = &bare {
            println!("  ratio daemon / bare tonic+sign   {:.2}", ratio(b.per_sec));
        }
        println!("  ratio daemon / raw sign (all cores) {:.2}", ratio(raw_all));
        if let Some(h) = hsm {
            println!("  ratio daemon / raw SoftHSM C_Sign {:.2}", ratio(h));
        }
        if let Some((grouped, single, bare)) = audit {
            println!(
                "  audit appends {grouped:>9.0}/s group commit, {single:>9.0}/s one commit per event (ratio {:.1})",
                if single > 0.0 { grouped / single } else { 0.0 }
            );
            println!(
                "  bare SQLite   {bare:>9.0}/s (one connection, {} rows per commit); ratio group commit / bare {:.2}",
                args.concurrency,
                if bare > 0.0 { grouped / bare } else { 0.0 }
            );
        }
    }
    Ok(())
}
