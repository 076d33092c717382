//! `keyward soak`: a long run of mixed load against a running daemon, with a
//! fraction of requests cancelled by the client, that samples the daemon's
//! own `/metrics` (memory, file descriptors, store pool wait, readiness) and
//! the answers it gets, then judges whether anything grew without bound or
//! failed when it should not have. It sends traffic only to the endpoints in
//! the home's client file (or the ones given on the command line); it never
//! starts, stops or reconfigures the daemon.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;
use serde_json::json;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::api::pb::account_service_client::AccountServiceClient;
use crate::api::pb::session_service_client::SessionServiceClient;
use crate::api::pb::signing_service_client::SigningServiceClient;
use crate::api::pb::{
    CreateAccountRequest, CreateSessionChallengeRequest, ListSessionsRequest, OpenSessionRequest, RevokeSessionRequest,
    SessionState, SignMessageRequest, SignPaymentRequest, SignTypedDataRequest, SignatureAlgorithm,
};
use crate::bench::percentile;
use crate::cli::client::RpcError;
use crate::cli::ClientOpts;
use crate::crypto::eip712::TypedData;
use crate::crypto::eth::{sign_digest, Address};
use crate::metrics::code_name;

/// `keyward soak` options.
#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// Seconds of load.
    #[arg(long, default_value_t = 600)]
    pub duration: u64,
    /// Requests in flight (one worker each).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Fraction of requests given a 1-20 ms client deadline (the client gives up).
    #[arg(long, default_value_t = 0.2)]
    pub cancel_fraction: f64,
    /// Seconds between samples of /metrics.
    #[arg(long, default_value_t = 5)]
    pub sample_every: u64,
    /// Accounts to create and sign with (each with one delegated session).
    #[arg(long, default_value_t = 10)]
    pub accounts: usize,
}

/// The delegate every soak session names (the marketplace profile).
const MARKETPLACE: &str = "spiffe://example.org/marketplace";
/// The manifest the sessions license and the payments name.
const MANIFEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
/// Session lifetime; sessions are re-opened once less than a quarter is left.
const SESSION_TTL: u64 = 3600;
/// How often the housekeeper revokes sessions left open by cancelled opens.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// Failure messages kept for the report.
const KEEP_FAILURES: usize = 8;

/// RSS may grow by this fraction of the second quarter's mean...
const RSS_GROWTH_FRACTION: f64 = 0.25;
/// ...or by this many bytes, whichever is larger.
const RSS_GROWTH_BYTES: f64 = 32.0 * 1024.0 * 1024.0;
/// Open file descriptors may grow by this many.
const FDS_GROWTH: f64 = 16.0;

// ---------------------------------------------------------------------------
// The pure parts: the /metrics text and the verdict.

/// Parses Prometheus text exposition into `series → value`, where a series
/// is the metric name followed by its label set exactly as written
/// (`name` or `name{a="b"}`). Comments, blank lines and lines that do not
/// parse are skipped; an optional timestamp after the value is ignored.
pub fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(end) = series_end(line) else { continue };
        let (series, rest) = line.split_at(end);
        let Some(value) = rest.split_whitespace().next().and_then(parse_value) else {
            continue;
        };
        out.insert(series.to_string(), value);
    }
    out
}

/// Where the series (name and labels) of a sample line ends.
fn series_end(line: &str) -> Option<usize> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    if name_end == 0 {
        return None;
    }
    if !line[name_end..].starts_with('{') {
        return Some(name_end);
    }
    // Labels: scan to the closing brace, honouring quoted values and escapes.
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line[name_end..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(name_end + i + 1),
            _ => {}
        }
    }
    None
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// The series the soak reads from one scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Scrape {
    /// `keyward_process_resident_memory_bytes`.
    pub rss_bytes: Option<f64>,
    /// `keyward_process_open_fds`.
    pub open_fds: Option<f64>,
    /// `keyward_store_begin_wait_seconds_sum` (pool checkout + BEGIN).
    pub begin_wait_sum: Option<f64>,
    /// `keyward_store_begin_wait_seconds_count`.
    pub begin_wait_count: Option<f64>,
    /// `keyward_store_pool_connections`.
    pub pool_connections: Option<f64>,
    /// `keyward_requests_in_flight`.
    pub in_flight: Option<f64>,
    /// `keyward_ready` (1 or 0).
    pub ready: Option<f64>,
}

impl Scrape {
    /// Picks the soak's series out of a `/metrics` body.
    pub fn from_text(text: &str) -> Scrape {
        let m = parse_prometheus(text);
        let get = |name: &str| m.get(name).copied();
        Scrape {
            rss_bytes: get("keyward_process_resident_memory_bytes"),
            open_fds: get("keyward_process_open_fds"),
            begin_wait_sum: get("keyward_store_begin_wait_seconds_sum"),
            begin_wait_count: get("keyward_store_begin_wait_seconds_count"),
            pool_connections: get("keyward_store_pool_connections"),
            in_flight: get("keyward_requests_in_flight"),
            ready: get("keyward_ready"),
        }
    }
}

/// Whether a series grew between the second quarter of the samples (after
/// warm-up) and the last quarter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Growth {
    /// Mean over the second quarter of the samples.
    pub early: f64,
    /// Mean over the last quarter.
    pub late: f64,
    /// The growth allowed: `max(early × fraction, absolute)`.
    pub allowed: f64,
    /// `late − early > allowed`.
    pub grew: bool,
}

/// Compares the mean of the last quarter of `values` with the mean of the
/// second quarter (the first quarter is warm-up). `None` with fewer than
/// four values: too few to judge.
pub fn growth(values: &[f64], fraction: f64, absolute: f64) -> Option<Growth> {
    let q = values.len() / 4;
    if q == 0 {
        return None;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let early = mean(&values[q..2 * q]);
    let late = mean(&values[values.len() - q..]);
    let allowed = (early * fraction).max(absolute);
    Some(Growth {
        early,
        late,
        allowed,
        grew: late - early > allowed,
    })
}

/// What the verdict is drawn from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evidence {
    /// Requests that failed (not cancelled by us, not an expected refusal).
    pub failed: u64,
    /// Some sample read `keyward_ready` 0 (or did not have it).
    pub ready_dropped: bool,
    /// Scrapes of /metrics that failed.
    pub scrape_failures: u64,
    /// RSS growth, if there were enough samples.
    pub rss: Option<Growth>,
    /// Open-fd growth, if there were enough samples.
    pub fds: Option<Growth>,
}

/// The reasons the run failed; empty means PASS.
pub fn verdict(e: &Evidence) -> Vec<String> {
    let mut reasons = Vec::new();
    if e.failed > 0 {
        reasons.push(format!("{} requests failed", e.failed));
    }
    if e.ready_dropped {
        reasons.push("readiness dropped (keyward_ready was not 1 in some sample)".into());
    }
    if e.scrape_failures > 0 {
        reasons.push(format!("{} scrapes of /metrics failed", e.scrape_failures));
    }
    match e.rss {
        None => reasons.push("too few RSS samples to judge growth (need 4)".into()),
        Some(g) if g.grew => reasons.push(format!(
            "RSS grew from {:.1} MiB to {:.1} MiB (allowed +{:.1} MiB)",
            g.early / MIB,
            g.late / MIB,
            g.allowed / MIB
        )),
        Some(_) => {}
    }
    match e.fds {
        None => reasons.push("too few fd samples to judge growth (need 4)".into()),
        Some(g) if g.grew => reasons.push(format!(
            "open fds grew from {:.1} to {:.1} (allowed +{:.0})",
            g.early, g.late, g.allowed
        )),
        Some(_) => {}
    }
    reasons
}

const MIB: f64 = 1024.0 * 1024.0;

// ---------------------------------------------------------------------------
// Answers and their tally.

/// The requests the soak makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    TypedData,
    Ed25519,
    Payment,
    CreateAccount,
    /// Challenge, open, revoke: a short-lived session.
    SessionChurn,
    /// Housekeeping: re-opening a main session, sweeping orphans.
    Housekeeping,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::TypedData => "SignTypedData",
            Op::Ed25519 => "SignMessage(Ed25519)",
            Op::Payment => "SignPayment",
            Op::CreateAccount => "CreateAccount",
            Op::SessionChurn => "Challenge+Open+Revoke",
            Op::Housekeeping => "housekeeping",
        }
    }

    /// One draw of the mix: mostly signing, now and then accounts and sessions.
    fn pick(rng: &mut StdRng) -> Op {
        match rng.gen_range(0..1000u32) {
            0..=379 => Op::TypedData,
            380..=679 => Op::Ed25519,
            680..=993 => Op::Payment,
            994..=996 => Op::CreateAccount,
            _ => Op::SessionChurn,
        }
    }
}

/// How one request ended.
#[derive(Debug)]
enum Outcome {
    Ok,
    /// The client's deadline passed first and it dropped the call.
    Cancelled,
    /// An expected refusal: a limit, or a session that ended.
    Refused(Code),
    /// Anything else.
    Failed(Status),
}

/// Sorts an error answer: RESOURCE_EXHAUSTED is a limit doing its job, and
/// FAILED_PRECONDITION on a session request is a session that expired or was
/// revoked under it; everything else is a failure.
fn classify(op: Op, status: Status) -> Outcome {
    match status.code() {
        Code::ResourceExhausted => Outcome::Refused(Code::ResourceExhausted),
        Code::FailedPrecondition if matches!(op, Op::Payment | Op::SessionChurn | Op::Housekeeping) => {
            Outcome::Refused(Code::FailedPrecondition)
        }
        _ => Outcome::Failed(status),
    }
}

#[derive(Debug, Default, Clone)]
struct Tally {
    ok: u64,
    cancelled: u64,
    refused: u64,
    failed: u64,
    refused_by_code: BTreeMap<&'static str, u64>,
    failed_by_code: BTreeMap<&'static str, u64>,
    /// Per operation: ok, cancelled, refused, failed.
    by_op: BTreeMap<&'static str, [u64; 4]>,
    failures: Vec<String>,
}

impl Tally {
    fn add(&mut self, op: Op, outcome: &Outcome) {
        let slot = self.by_op.entry(op.name()).or_default();
        match outcome {
            Outcome::Ok => {
                self.ok += 1;
                slot[0] += 1;
            }
            Outcome::Cancelled => {
                self.cancelled += 1;
                slot[1] += 1;
            }
            Outcome::Refused(code) => {
                self.refused += 1;
                slot[2] += 1;
                *self.refused_by_code.entry(code_name(*code)).or_default() += 1;
            }
            Outcome::Failed(status) => {
                self.failed += 1;
                slot[3] += 1;
                *self.failed_by_code.entry(code_name(status.code())).or_default() += 1;
                if self.failures.len() < KEEP_FAILURES {
                    self.failures
                        .push(format!("{}: {}", op.name(), RpcError(status.clone())));
                }
            }
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.ok += other.ok;
        self.cancelled += other.cancelled;
        self.refused += other.refused;
        self.failed += other.failed;
        for (k, v) in &other.refused_by_code {
            *self.refused_by_code.entry(*k).or_default() += v;
        }
        for (k, v) in &other.failed_by_code {
            *self.failed_by_code.entry(*k).or_default() += v;
        }
        for (k, v) in &other.by_op {
            let slot = self.by_op.entry(*k).or_default();
            for (a, b) in slot.iter_mut().zip(v) {
                *a += b;
            }
        }
        for f in &other.failures {
            if self.failures.len() < KEEP_FAILURES {
                self.failures.push(f.clone());
            }
        }
    }
}

/// The current interval's answers and latencies (of ok answers, microseconds).
#[derive(Debug, Default)]
struct Interval {
    tally: Tally,
    latency_us: Vec<u32>,
}

// ---------------------------------------------------------------------------
// The load.

/// A session the account's delegate signs payments in.
#[derive(Debug)]
struct MainSession {
    id: String,
    token: String,
    expires_at: i64,
}

/// One soak account: its id, its controller wallet (in memory only), its
/// current main session, and a lock that serialises its session changes.
struct SoakAccount {
    id: String,
    wallet: k256::ecdsa::SigningKey,
    main: Mutex<Arc<MainSession>>,
    sessions: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for SoakAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoakAccount")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SoakAccount {
    fn main(&self) -> Arc<MainSession> {
        lock(&self.main).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Channels per profile and what the workers share.
#[derive(Debug)]
struct Ctx {
    admin: Channel,
    marketplace: Channel,
    gateway: Channel,
    accounts: Vec<SoakAccount>,
    deadline: Instant,
    cancel_fraction: f64,
    interval: Mutex<Interval>,
    serial: AtomicU64,
}

fn client_err(what: &str, e: impl std::fmt::Display) -> Status {
    Status::unknown(format!("soak client: {what}: {e}"))
}

/// r‖s‖v by the wallet over the document's EIP-712 signing hash.
fn wallet_sign(wallet: &k256::ecdsa::SigningKey, typed_data_json: &str) -> Result<Vec<u8>, Status> {
    let digest = TypedData::from_json_str(typed_data_json)
        .map_err(|e| client_err("the challenge's typed data", e))?
        .signing_hash();
    Ok(sign_digest(wallet, &digest)
        .map_err(|e| client_err("wallet signature", e))?
        .to_vec())
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Ctx {
    fn record(&self, op: Op, outcome: &Outcome, latency: Option<Duration>) {
        let mut i = lock(&self.interval);
        i.tally.add(op, outcome);
        if let (Outcome::Ok, Some(l)) = (outcome, latency) {
            i.latency_us.push(u32::try_from(l.as_micros()).unwrap_or(u32::MAX));
        }
    }

    /// Asks for a challenge (wallet gateway), signs it with the wallet, opens
    /// the session (wallet gateway).
    async fn open_session(&self, account: &SoakAccount) -> Result<MainSession, Status> {
        let mut gw = SessionServiceClient::new(self.gateway.clone());
        let license = format!("license:manifest:{MANIFEST}");
        let challenge = gw
            .create_session_challenge(CreateSessionChallengeRequest {
                account_id: account.id.clone(),
                delegate: MARKETPLACE.into(),
                scopes: vec!["payments:0-100".into(), license],
                cap: "1000000000".into(),
                ttl_seconds: SESSION_TTL,
            })
            .await?
            .into_inner();
        let signature = wallet_sign(&account.wallet, &challenge.typed_data_json)?;
        let opened = gw
            .open_session(OpenSessionRequest {
                challenge_id: challenge.challenge_id,
                signature,
            })
            .await?
            .into_inner();
        let session = opened
            .session
            .ok_or_else(|| Status::internal("OpenSession answered without a session"))?;
        Ok(MainSession {
            id: session.session_id,
            token: opened.token,
            expires_at: session.expires_at,
        })
    }

    async fn revoke(&self, session_id: String) -> Result<(), Status> {
        SessionServiceClient::new(self.admin.clone())
            .revoke_session(RevokeSessionRequest {
                session_id,
                controller_signature: vec![],
            })
            .await
            .map(|_| ())
    }

    /// One request of the mix.
    async fn call(&self, op: Op, account: &SoakAccount, rng: &mut StdRng) -> Result<(), Status> {
        let n = self.serial.fetch_add(1, Ordering::Relaxed);
        match op {
            Op::TypedData => SigningServiceClient::new(self.admin.clone())
                .sign_typed_data(SignTypedDataRequest {
                    account_id: account.id.clone(),
                    typed_data_json: crate::bench::MAIL.to_string(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            Op::Ed25519 => SigningServiceClient::new(self.admin.clone())
                .sign_message(SignMessageRequest {
                    account_id: account.id.clone(),
                    alg: SignatureAlgorithm::Ed25519 as i32,
                    data: format!("keyward soak message {n}").into_bytes(),
                })
                .await
                .map(|_| ()),
            Op::Payment => {
                let amount = rng.gen_range(1..=100u32);
                SigningServiceClient::new(self.marketplace.clone())
                    .sign_payment(SignPaymentRequest {
                        session_token: account.main().token.clone(),
                        amount: amount.to_string(),
                        currency: "USDC".into(),
                        manifest: MANIFEST.into(),
                        license_id: "lic-7".into(),
                        payee: String::new(),
                        request_id: uuid::Uuid::new_v4().to_string(),
                    })
                    .await
                    .map(|_| ())
            }
            Op::CreateAccount => {
                let wallet = k256::ecdsa::SigningKey::random(rng);
                AccountServiceClient::new(self.admin.clone())
                    .create_account(CreateAccountRequest {
                        controller: Address::from_public_key(wallet.verifying_key()).to_checksum(),
                        label: format!("soak-extra-{n}"),
                        allow: vec![],
                    })
                    .await
                    .map(|_| ())
            }
            Op::SessionChurn | Op::Housekeeping => {
                let _serial = account.sessions.lock().await;
                let s = self.open_session(account).await?;
                self.revoke(s.id).await
            }
        }
    }

    async fn worker(self: Arc<Self>, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        while Instant::now() < self.deadline {
            let op = Op::pick(&mut rng);
            let account = &self.accounts[rng.gen_range(0..self.accounts.len())];
            let give_up = rng
                .gen_bool(self.cancel_fraction)
                .then(|| Duration::from_millis(rng.gen_range(1..=20)));
            let t0 = Instant::now();
            let answer = match give_up {
                Some(d) => tokio::time::timeout(d, self.call(op, account, &mut rng)).await.ok(),
                None => Some(self.call(op, account, &mut rng).await),
            };
            let outcome = match answer {
                None => Outcome::Cancelled,
                Some(Ok(())) => Outcome::Ok,
                Some(Err(status)) => classify(op, status),
            };
            self.record(op, &outcome, Some(t0.elapsed()));
        }
    }

    /// Re-opens main sessions before their ttl ends, and revokes sessions
    /// that cancelled opens left behind (under the account's session lock,
    /// so no churn is half-way through).
    async fn housekeeper(self: Arc<Self>) {
        let mut last_sweep = Instant::now();
        while Instant::now() < self.deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let sweep = last_sweep.elapsed() >= SWEEP_EVERY;
            if sweep {
                last_sweep = Instant::now();
            }
            for account in &self.accounts {
                let _serial = account.sessions.lock().await;
                let old = account.main();
                if old.expires_at - now_unix() < i64::try_from(SESSION_TTL / 4).unwrap_or(i64::MAX) {
                    let outcome = match self.open_session(account).await {
                        Ok(s) => {
                            *lock(&account.main) = Arc::new(s);
                            match self.revoke(old.id.clone()).await {
                                Ok(()) => Outcome::Ok,
                                Err(s) => classify(Op::Housekeeping, s),
                            }
                        }
                        Err(s) => classify(Op::Housekeeping, s),
                    };
                    self.record(Op::Housekeeping, &outcome, None);
                }
                if sweep {
                    let outcome = match self.sweep(account).await {
                        Ok(()) => Outcome::Ok,
                        Err(s) => classify(Op::Housekeeping, s),
                    };
                    self.record(Op::Housekeeping, &outcome, None);
                }
            }
        }
    }

    async fn sweep(&self, account: &SoakAccount) -> Result<(), Status> {
        let main = account.main().id.clone();
        let list = SessionServiceClient::new(self.admin.clone())
            .list_sessions(ListSessionsRequest {
                account_id: account.id.clone(),
                // Newest first: the sessions still open are on the first page.
                page_size: crate::api::MAX_PAGE_SIZE,
                ..Default::default()
            })
            .await?
            .into_inner();
        for s in list.sessions {
            if s.state == SessionState::Active as i32 && s.session_id != main {
                self.revoke(s.session_id).await?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Set-up.

/// Creates the accounts with fresh in-memory controller wallets, pacing
/// itself to the account-creation limit (RESOURCE_EXHAUSTED is retried after
/// a back-off); any other error ends the run.
async fn create_accounts(admin: &Channel, n: usize) -> anyhow::Result<Vec<(String, k256::ecdsa::SigningKey)>> {
    let sem = Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = AccountServiceClient::new(admin.clone());
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await;
            let wallet = k256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
            let controller = Address::from_public_key(wallet.verifying_key()).to_checksum();
            let mut backoff = Duration::from_millis(50);
            loop {
                let r = c
                    .create_account(CreateAccountRequest {
                        controller: controller.clone(),
                        label: format!("soak-{i}"),
                        allow: vec![],
                    })
                    .await;
                match r {
                    Ok(r) => return Ok((r.into_inner().account_id, wallet)),
                    Err(s) if s.code() == Code::ResourceExhausted => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                    Err(s) => return Err(s),
                }
            }
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.context("account task")?.map_err(RpcError)?);
    }
    Ok(out)
}

async fn connect_as(home: &Path, opts: &ClientOpts, profile: &str) -> anyhow::Result<Channel> {
    let mut opts = opts.clone();
    opts.profile = profile.into();
    crate::cli::client::connect(home, &opts)
        .await
        .with_context(|| format!("connecting as {profile}"))
}

// ---------------------------------------------------------------------------
// Sampling.

/// One row: the daemon's series at the end of an interval, and the answers
/// the soak got during it.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the load started.
    pub t_s: f64,
    /// The scrape (all `None` when it failed).
    #[serde(flatten)]
    pub scrape: Scrape,
    /// Mean pool checkout + BEGIN wait over the interval, milliseconds.
    pub begin_wait_mean_ms: Option<f64>,
    /// Transactions begun in the interval.
    pub begins: Option<u64>,
    /// Answers in the interval.
    pub ok: u64,
    /// Calls the client gave up on.
    pub cancelled: u64,
    /// Expected refusals.
    pub refused: u64,
    /// Failures.
    pub failed: u64,
    /// Median latency of ok answers, microseconds.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Why the scrape failed.
    pub scrape_error: Option<String>,
}

struct Sampler {
    /// The metrics endpoint, `http://host:port`.
    metrics: String,
    started: Instant,
    prev: Scrape,
    json: bool,
}

impl Sampler {
    async fn scrape(&self) -> Result<Scrape, String> {
        let url = format!("{}/metrics", self.metrics.trim_end_matches('/'));
        match crate::cli::verify::http_get(&url).await {
            Ok((200, body)) => Ok(Scrape::from_text(&body)),
            Ok((status, _)) => Err(format!("/metrics answered HTTP {status}")),
            Err(e) => Err(format!("{e:#}")),
        }
    }

    async fn sample(&mut self, interval: Interval) -> Sample {
        let (scrape, scrape_error) = match self.scrape().await {
            Ok(s) => (s, None),
            Err(e) => (Scrape::default(), Some(e)),
        };
        let (begin_wait_mean_ms, begins) = match (
            scrape.begin_wait_sum,
            scrape.begin_wait_count,
            self.prev.begin_wait_sum,
            self.prev.begin_wait_count,
        ) {
            (Some(s), Some(c), Some(ps), Some(pc)) => {
                let dc = (c - pc).max(0.0);
                let mean = (dc > 0.0).then(|| (s - ps) / dc * 1000.0);
                (mean, Some(dc as u64))
            }
            _ => (None, None),
        };
        if scrape_error.is_none() {
            self.prev = scrape;
        }
        let mut lat = interval.latency_us;
        lat.sort_unstable();
        let t = &interval.tally;
        let sample = Sample {
            t_s: self.started.elapsed().as_secs_f64(),
            scrape,
            begin_wait_mean_ms,
            begins,
            ok: t.ok,
            cancelled: t.cancelled,
            refused: t.refused,
            failed: t.failed,
            p50_us: percentile(&lat, 0.50),
            p99_us: percentile(&lat, 0.99),
            scrape_error,
        };
        self.print_row(&sample);
        sample
    }

    fn print_row(&self, s: &Sample) {
        let opt = |v: Option<f64>, scale: f64, prec: usize| match v {
            Some(v) => format!("{:.*}", prec, v / scale),
            None => "-".into(),
        };
        let row = format!(
            "{:>6.0} {:>8} {:>5} {:>8} {:>4} {:>5} {:>5} {:>8} {:>6} {:>6} {:>6} {:>8.2} {:>8.2}{}",
            s.t_s,
            opt(s.scrape.rss_bytes, MIB, 1),
            opt(s.scrape.open_fds, 1.0, 0),
            opt(s.begin_wait_mean_ms, 1.0, 3),
            opt(s.scrape.pool_connections, 1.0, 0),
            opt(s.scrape.in_flight, 1.0, 0),
            opt(s.scrape.ready, 1.0, 0),
            s.ok,
            s.cancelled,
            s.refused,
            s.failed,
            s.p50_us as f64 / 1000.0,
            s.p99_us as f64 / 1000.0,
            s.scrape_error
                .as_deref()
                .map(|e| format!("  scrape failed: {e}"))
                .unwrap_or_default()
        );
        if self.json {
            eprintln!("{row}");
        } else {
            println!("{row}");
        }
    }

    fn print_header(&self) {
        let header = format!(
            "{:>6} {:>8} {:>5} {:>8} {:>4} {:>5} {:>5} {:>8} {:>6} {:>6} {:>6} {:>8} {:>8}",
            "t s",
            "rss MiB",
            "fds",
            "wait ms",
            "pool",
            "infl",
            "ready",
            "ok",
            "canc",
            "refu",
            "fail",
            "p50 ms",
            "p99 ms"
        );
        if self.json {
            eprintln!("{header}");
        } else {
            println!("{header}");
        }
    }
}

// ---------------------------------------------------------------------------
// The summary.

/// Start, end and largest value of a series.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Span {
    /// Before the load.
    pub start: Option<f64>,
    /// The last sample.
    pub end: Option<f64>,
    /// The largest sample.
    pub max: Option<f64>,
}

impl Span {
    fn of(start: Option<f64>, samples: &[f64]) -> Span {
        Span {
            start,
            end: samples.last().copied(),
            max: samples.iter().copied().reduce(f64::max),
        }
    }
}

fn summarize(
    args: &SoakArgs,
    baseline: &Scrape,
    samples: &[Sample],
    totals: &Tally,
    extra: Extra,
) -> serde_json::Value {
    let rss: Vec<f64> = samples.iter().filter_map(|s| s.scrape.rss_bytes).collect();
    let fds: Vec<f64> = samples.iter().filter_map(|s| s.scrape.open_fds).collect();
    let waits: Vec<f64> = samples.iter().filter_map(|s| s.begin_wait_mean_ms).collect();
    let last_ok = samples
        .iter()
        .rev()
        .find(|s| s.scrape_error.is_none())
        .map(|s| s.scrape);
    let begin_wait_mean_ms = match (
        last_ok.and_then(|s| s.begin_wait_sum),
        last_ok.and_then(|s| s.begin_wait_count),
        baseline.begin_wait_sum,
        baseline.begin_wait_count,
    ) {
        (Some(s), Some(c), Some(ps), Some(pc)) if c > pc => Some((s - ps) / (c - pc) * 1000.0),
        _ => None,
    };
    let evidence = Evidence {
        failed: totals.failed,
        ready_dropped: baseline.ready != Some(1.0)
            || samples
                .iter()
                .any(|s| s.scrape_error.is_none() && s.scrape.ready != Some(1.0)),
        scrape_failures: samples.iter().filter(|s| s.scrape_error.is_some()).count() as u64,
        rss: growth(&rss, RSS_GROWTH_FRACTION, RSS_GROWTH_BYTES),
        fds: growth(&fds, 0.0, FDS_GROWTH),
    };
    let reasons = verdict(&evidence);
    let by_op: BTreeMap<&str, serde_json::Value> = totals
        .by_op
        .iter()
        .map(|(k, v)| {
            (
                *k,
                json!({"ok": v[0], "cancelled": v[1], "refused": v[2], "failed": v[3]}),
            )
        })
        .collect();
    json!({
        "verdict": if reasons.is_empty() { "PASS" } else { "FAIL" },
        "reasons": reasons,
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "cancel_fraction": args.cancel_fraction,
        "sample_every_s": args.sample_every,
        "accounts": args.accounts,
        "accounts_created_during_load": extra.accounts_created,
        "setup_s": extra.setup_s,
        "samples": samples.len(),
        "rss_bytes": Span::of(baseline.rss_bytes, &rss),
        "open_fds": Span::of(baseline.open_fds, &fds),
        "rss_growth": evidence.rss,
        "fds_growth": evidence.fds,
        "begin_wait_mean_ms": begin_wait_mean_ms,
        "begin_wait_max_interval_mean_ms": waits.iter().copied().reduce(f64::max),
        "pool_connections_max": samples.iter().filter_map(|s| s.scrape.pool_connections).reduce(f64::max),
        "in_flight_max": samples.iter().filter_map(|s| s.scrape.in_flight).reduce(f64::max),
        "ready_dropped": evidence.ready_dropped,
        "scrape_failures": evidence.scrape_failures,
        "ok": totals.ok,
        "cancelled": totals.cancelled,
        "refused": totals.refused,
        "failed": totals.failed,
        "refused_by_code": totals.refused_by_code,
        "failed_by_code": totals.failed_by_code,
        "first_failures": totals.failures,
        "by_op": by_op,
    })
}

#[derive(Debug, Clone, Copy)]
struct Extra {
    accounts_created: u64,
    setup_s: f64,
}

fn print_summary(s: &serde_json::Value) {
    let f = |k: &str| s[k].as_f64();
    let mib = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.1} MiB", v / MIB));
    let num = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3} ms"));
    println!();
    println!(
        "soak: {} s, concurrency {}, cancel fraction {}, {} accounts (+{} created under load), {} samples",
        s["duration_s"],
        s["concurrency"],
        s["cancel_fraction"],
        s["accounts"],
        s["accounts_created_during_load"],
        s["samples"]
    );
    println!(
        "  rss    start {}  end {}  max {}",
        mib(s["rss_bytes"]["start"].as_f64()),
        mib(s["rss_bytes"]["end"].as_f64()),
        mib(s["rss_bytes"]["max"].as_f64())
    );
    if let Some(g) = s["rss_growth"].as_object() {
        let v = |k: &str| g.get(k).and_then(|v| v.as_f64());
        println!(
            "         2nd quarter mean {}  last quarter mean {}  allowed +{}",
            mib(v("early")),
            mib(v("late")),
            mib(v("allowed"))
        );
    }
    println!(
        "  fds    start {}  end {}  max {}",
        num(s["open_fds"]["start"].as_f64()),
        num(s["open_fds"]["end"].as_f64()),
        num(s["open_fds"]["max"].as_f64())
    );
    if let Some(g) = s["fds_growth"].as_object() {
        let v = |k: &str| g.get(k).and_then(|v| v.as_f64());
        println!(
            "         2nd quarter mean {:.1}  last quarter mean {:.1}  allowed +{}",
            v("early").unwrap_or(0.0),
            v("late").unwrap_or(0.0),
            num(v("allowed"))
        );
    }
    println!(
        "  store pool + BEGIN wait  mean {}  max interval mean {}  (pool connections max {}, in flight max {})",
        ms(f("begin_wait_mean_ms")),
        ms(f("begin_wait_max_interval_mean_ms")),
        num(f("pool_connections_max")),
        num(f("in_flight_max"))
    );
    println!(
        "  answers  ok {}  cancelled by the client {}  refused {} {}  failed {} {}",
        s["ok"], s["cancelled"], s["refused"], s["refused_by_code"], s["failed"], s["failed_by_code"]
    );
    if let Some(ops) = s["by_op"].as_object() {
        for (op, v) in ops {
            println!(
                "    {op:<24} ok {:>8}  cancelled {:>7}  refused {:>5}  failed {:>5}",
                v["ok"], v["cancelled"], v["refused"], v["failed"]
            );
        }
    }
    if let Some(fails) = s["first_failures"].as_array() {
        for f in fails {
            println!("    failure: {}", f.as_str().unwrap_or_default());
        }
    }
    println!(
        "  readiness dropped: {}   scrape failures: {}",
        s["ready_dropped"], s["scrape_failures"]
    );
    match s["reasons"].as_array() {
        Some(r) if !r.is_empty() => {
            println!("verdict: FAIL");
            for reason in r {
                println!("  - {}", reason.as_str().unwrap_or_default());
            }
        }
        _ => println!("verdict: PASS"),
    }
}

/// Runs the soak and prints its samples and summary; `Ok(false)` is a FAIL verdict.
pub async fn run(home: &Path, opts: &ClientOpts, args: SoakArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.cancel_fraction),
        "--cancel-fraction must be between 0 and 1"
    );
    anyhow::ensure!(args.accounts > 0, "--accounts must be at least 1");
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let file = crate::dev::read_client_file(home)?;
    let setup = Instant::now();
    let admin = connect_as(home, opts, "admin").await?;
    let marketplace = connect_as(home, opts, "marketplace").await?;
    let gateway = connect_as(home, opts, "wallet-gateway").await?;

    let created = create_accounts(&admin, args.accounts).await?;
    let mut accounts = Vec::with_capacity(created.len());
    let mut ctx = Ctx {
        admin,
        marketplace,
        gateway,
        accounts: Vec::new(),
        deadline: Instant::now(),
        cancel_fraction: args.cancel_fraction,
        interval: Mutex::new(Interval::default()),
        serial: AtomicU64::new(0),
    };
    for (id, wallet) in created {
        let placeholder = SoakAccount {
            id,
            wallet,
            main: Mutex::new(Arc::new(MainSession {
                id: String::new(),
                token: String::new(),
                expires_at: 0,
            })),
            sessions: tokio::sync::Mutex::new(()),
        };
        let session = ctx
            .open_session(&placeholder)
            .await
            .map_err(RpcError)
            .with_context(|| format!("opening the session of account {}", placeholder.id))?;
        *lock(&placeholder.main) = Arc::new(session);
        accounts.push(placeholder);
    }
    ctx.accounts = accounts;
    let setup_s = setup.elapsed().as_secs_f64();

    let metrics = file
        .metrics
        .clone()
        .context("the daemon serves no metrics (server.metrics_listen = \"off\"); the soak samples them")?;
    let mut sampler = Sampler {
        metrics: metrics.clone(),
        started: Instant::now(),
        prev: Scrape::default(),
        json: opts.json,
    };
    let baseline = sampler
        .scrape()
        .await
        .map_err(|e| anyhow::anyhow!("first scrape of {metrics}/metrics: {e}"))?;
    sampler.prev = baseline;
    let note = format!(
        "soak: {} accounts ready in {setup_s:.1} s; {} s of load at concurrency {}, cancel fraction {}, sampling every {} s",
        args.accounts, args.duration, args.concurrency, args.cancel_fraction, args.sample_every
    );
    if opts.json {
        eprintln!("{note}");
    } else {
        println!("{note}");
    }
    sampler.print_header();

    let started = Instant::now();
    sampler.started = started;
    ctx.deadline = started + Duration::from_secs(args.duration);
    let ctx = Arc::new(ctx);
    let mut tasks = Vec::with_capacity(args.concurrency + 1);
    let seed: u64 = rand::random();
    for w in 0..args.concurrency {
        tasks.push(tokio::spawn(ctx.clone().worker(seed.wrapping_add(w as u64))));
    }
    tasks.push(tokio::spawn(ctx.clone().housekeeper()));

    let every = Duration::from_secs(args.sample_every.max(1));
    let mut samples = Vec::new();
    let mut totals = Tally::default();
    let mut next = started + every;
    loop {
        let last = next >= ctx.deadline;
        if last {
            // The last interval ends when every worker has had its last answer.
            for t in tasks.drain(..) {
                t.await.context("a soak worker panicked")?;
            }
        } else {
            tokio::time::sleep_until(next.into()).await;
        }
        let interval = std::mem::take(&mut *lock(&ctx.interval));
        totals.merge(&interval.tally);
        samples.push(sampler.sample(interval).await);
        if last {
            break;
        }
        next += every;
    }

    let created_under_load = totals.by_op.get(Op::CreateAccount.name()).map_or(0, |v| v[0]);
    let summary = summarize(
        &args,
        &baseline,
        &samples,
        &totals,
        Extra {
            accounts_created: created_under_load,
            setup_s,
        },
    );
    let pass = summary["verdict"] == "PASS";
    if opts.json {
        println!(
            "{}",
            json!({"baseline": baseline, "samples": samples, "summary": summary})
        );
    } else {
        print_summary(&summary);
    }
    Ok(pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = r#"# HELP keyward_process_open_fds Number of open file descriptors.
# TYPE keyward_process_open_fds gauge
keyward_process_open_fds 37
keyward_process_resident_memory_bytes 2.5165824e7
# TYPE keyward_store_begin_wait_seconds histogram
keyward_store_begin_wait_seconds_bucket{le="0.001"} 90
keyward_store_begin_wait_seconds_bucket{le="+Inf"} 100
keyward_store_begin_wait_seconds_sum 0.25
keyward_store_begin_wait_seconds_count 100
keyward_grpc_requests_total{method="SignTypedData",code="OK"} 12 1700000000000
keyward_grpc_requests_total{method="odd } name",code="OK"} 3
keyward_requests_in_flight 4
keyward_store_pool_connections 5
keyward_ready 1
keyward_not_a_number abc
"#;

    #[test]
    fn parses_the_series_the_soak_reads() {
        let s = Scrape::from_text(METRICS);
        assert_eq!(s.open_fds, Some(37.0));
        assert_eq!(s.rss_bytes, Some(25_165_824.0));
        assert_eq!(s.begin_wait_sum, Some(0.25));
        assert_eq!(s.begin_wait_count, Some(100.0));
        assert_eq!(s.in_flight, Some(4.0));
        assert_eq!(s.pool_connections, Some(5.0));
        assert_eq!(s.ready, Some(1.0));
        assert_eq!(Scrape::from_text("keyward_ready 0\n").ready, Some(0.0));
        assert_eq!(Scrape::from_text("").rss_bytes, None);
    }

    #[test]
    fn parses_labels_timestamps_and_special_values() {
        let m = parse_prometheus(METRICS);
        assert_eq!(
            m.get(r#"keyward_grpc_requests_total{method="SignTypedData",code="OK"}"#),
            Some(&12.0),
            "the timestamp after the value is ignored"
        );
        assert_eq!(
            m.get(r#"keyward_grpc_requests_total{method="odd } name",code="OK"}"#),
            Some(&3.0),
            "a brace inside a quoted label value does not end the labels"
        );
        assert_eq!(
            m.get(r#"keyward_store_begin_wait_seconds_bucket{le="+Inf"}"#),
            Some(&100.0)
        );
        assert!(!m.contains_key("keyward_not_a_number"));
        assert!(!m.keys().any(|k| k.starts_with('#')));
        assert_eq!(parse_value("+Inf"), Some(f64::INFINITY));
        assert!(parse_value("NaN").is_some_and(f64::is_nan));
        assert_eq!(parse_prometheus("{} 3\nunterminated{a=\"b 4\n").len(), 0);
    }

    #[test]
    fn growth_compares_last_quarter_with_second() {
        // Warm-up in the first quarter does not count.
        let flat = [10.0, 50.0, 100.0, 100.0, 101.0, 100.0, 102.0, 101.0];
        let g = growth(&flat, 0.25, 1.0).expect("enough samples");
        assert_eq!((g.early, g.late), (100.0, 101.5));
        assert_eq!(g.allowed, 25.0);
        assert!(!g.grew);

        // Steady climb past the allowance.
        let climb: Vec<f64> = (0..20).map(|i| 100.0 + 10.0 * f64::from(i)).collect();
        let g = growth(&climb, 0.25, 1.0).expect("enough samples");
        assert!(g.grew, "{g:?}");

        // The absolute allowance wins when it is larger.
        let g = growth(&[0.0, 0.0, 10.0, 10.0, 20.0, 20.0, 25.0, 25.0], 0.0, 16.0).expect("enough");
        assert_eq!(g.late - g.early, 15.0);
        assert!(!g.grew);
        let g = growth(&[0.0, 0.0, 10.0, 10.0, 20.0, 20.0, 27.0, 27.0], 0.0, 16.0).expect("enough");
        assert!(g.grew);

        assert_eq!(growth(&[1.0, 2.0, 3.0], 0.25, 1.0), None);
    }

    #[test]
    fn verdict_fails_on_failures_readiness_scrapes_and_growth() {
        let steady = Growth {
            early: 100.0,
            late: 101.0,
            allowed: 25.0,
            grew: false,
        };
        let ok = Evidence {
            failed: 0,
            ready_dropped: false,
            scrape_failures: 0,
            rss: Some(steady),
            fds: Some(steady),
        };
        assert!(verdict(&ok).is_empty());
        assert_eq!(verdict(&Evidence { failed: 2, ..ok }).len(), 1);
        assert_eq!(
            verdict(&Evidence {
                ready_dropped: true,
                ..ok
            })
            .len(),
            1
        );
        assert_eq!(
            verdict(&Evidence {
                scrape_failures: 1,
                ..ok
            })
            .len(),
            1
        );
        let grew = Growth { grew: true, ..steady };
        assert_eq!(verdict(&Evidence { rss: Some(grew), ..ok }).len(), 1);
        assert_eq!(verdict(&Evidence { fds: Some(grew), ..ok }).len(), 1);
        assert_eq!(verdict(&Evidence { rss: None, ..ok }).len(), 1);
    }

    #[test]
    fn refusals_are_limits_and_ended_sessions_only() {
        assert!(matches!(
            classify(Op::CreateAccount, Status::resource_exhausted("limit")),
            Outcome::Refused(Code::ResourceExhausted)
        ));
        assert!(matches!(
            classify(Op::Payment, Status::failed_precondition("session expired")),
            Outcome::Refused(Code::FailedPrecondition)
        ));
        assert!(matches!(
            classify(Op::TypedData, Status::failed_precondition("kek missing")),
            Outcome::Failed(_)
        ));
        assert!(matches!(
            classify(Op::Payment, Status::aborted("in progress")),
            Outcome::Failed(_)
        ));
        assert!(matches!(
            classify(Op::Ed25519, Status::unavailable("store")),
            Outcome::Failed(_)
        ));
    }
}
