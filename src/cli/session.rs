//! Session commands (challenge, open, show, list, revoke), `sign payment`,
//! and a software wallet for development and demos.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::{json, Value};

use super::client::{connect, RpcError};
use super::output::{emit, hex0x};
use super::ClientOpts;
use crate::api::pb::session_service_client::SessionServiceClient;
use crate::api::pb::signing_service_client::SigningServiceClient;
use crate::api::pb::{
    CreateSessionChallengeRequest, GetSessionRequest, ListSessionsRequest, OpenSessionRequest, RevokeSessionRequest,
    Session, SessionState, SignPaymentRequest, SignTransactionRequest,
};
use crate::crypto::eip712::TypedData;
use crate::crypto::eth::Address;

/// Session commands.
#[derive(Debug, Subcommand)]
pub enum SessionCmd {
    /// Ask for an EIP-712 SessionGrant for the account's controller to sign.
    Challenge {
        /// Account id.
        #[arg(long)]
        account: String,
        /// The delegate's identity (URI SAN of its client certificate).
        #[arg(long)]
        delegate: String,
        /// A scope (repeatable): payments:[<asset>:]<min>-<max>, cap:<asset>:<amount>,
        /// payee:<address>, license:manifest:<sha256>,
        /// typed-data:<chainId>:<verifyingContract>[:unbounded], attest:<dataset-id>.
        /// An asset is a currency (USDC) or eip155:<chainId>/erc20:<address>.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Cumulative cap in minor units, of every spend in an asset without its own
        /// cap:<asset>:<amount> scope (0: none).
        #[arg(long)]
        cap: String,
        /// Session lifetime: 90s, 30m, 2h, 1d, or seconds.
        #[arg(long, default_value = "30m")]
        ttl: String,
    },
    /// Open a session with the controller's signature over the challenge.
    Open {
        /// Challenge id.
        #[arg(long)]
        challenge: String,
        /// 65-byte signature, 0x-hex.
        #[arg(long)]
        signature: String,
    },
    /// Show a session.
    Show {
        /// Session id.
        session_id: String,
    },
    /// List an account's sessions (every page, newest first).
    List {
        /// Account id.
        #[arg(long)]
        account: String,
        /// Sessions asked for per page (0: the daemon's default, 100; at most 1000).
        #[arg(long, default_value_t = 0)]
        page_size: u32,
    },
    /// Revoke a session (as an account admin, or with the controller's signature).
    Revoke {
        /// Session id.
        session_id: String,
        /// The controller's signature over the session's SessionRevocation document.
        #[arg(long)]
        signature: Option<String>,
    },
}

/// `sign payment` arguments.
#[derive(Debug, clap::Args)]
pub struct PaymentArgs {
    /// Session token from `session open`.
    #[arg(long)]
    session: String,
    /// Amount in minor units.
    #[arg(long)]
    amount: String,
    /// Currency code.
    #[arg(long)]
    currency: String,
    /// Dataset manifest SHA-256 (hex).
    #[arg(long)]
    manifest: String,
    /// License id.
    #[arg(long)]
    license: String,
    /// Payee address.
    #[arg(long, default_value = "")]
    payee: String,
    /// Idempotency key: a retry with the same key returns the first result.
    #[arg(long, default_value = "")]
    request_id: String,
}

/// `sign transaction`.
#[derive(Debug, clap::Args)]
pub struct TransactionArgs {
    /// Account id.
    #[arg(long)]
    account: String,
    /// EIP-155 chain id.
    #[arg(long)]
    chain_id: u64,
    /// The account's nonce on that chain.
    #[arg(long)]
    nonce: u64,
    /// Gas limit.
    #[arg(long)]
    gas: u64,
    /// EIP-1559 fee cap, wei per gas.
    #[arg(long, default_value = "", conflicts_with = "gas_price")]
    max_fee_per_gas: String,
    /// EIP-1559 priority fee, wei per gas.
    #[arg(long, default_value = "", conflicts_with = "gas_price")]
    max_priority_fee_per_gas: String,
    /// Legacy (EIP-155) gas price, wei per gas: signs a legacy transaction.
    #[arg(long)]
    gas_price: Option<String>,
    /// Recipient or contract (0x address).
    #[arg(long)]
    to: String,
    /// Wei, decimal.
    #[arg(long, default_value = "")]
    value: String,
    /// Call data, 0x hex.
    #[arg(long, default_value = "")]
    data: String,
    /// Sign inside a delegated session (token from `session open`).
    #[arg(long, default_value = "")]
    session: String,
    /// Idempotency key (session signing).
    #[arg(long, default_value = "")]
    request_id: String,
}

/// Signs a transaction and prints the raw transaction to broadcast.
pub async fn sign_transaction(home: &Path, opts: &ClientOpts, a: TransactionArgs) -> anyhow::Result<()> {
    let data = hex::decode(a.data.trim_start_matches("0x")).context("--data is not hex")?;
    let mut c = SigningServiceClient::new(connect(home, opts).await?);
    let r = c
        .sign_transaction(SignTransactionRequest {
            account_id: a.account.clone(),
            legacy: a.gas_price.is_some(),
            chain_id: a.chain_id,
            nonce: a.nonce,
            gas_limit: a.gas,
            max_fee_per_gas: a.max_fee_per_gas,
            max_priority_fee_per_gas: a.max_priority_fee_per_gas,
            gas_price: a.gas_price.unwrap_or_default(),
            to: a.to,
            value: a.value,
            data,
            session_token: a.session,
            request_id: a.request_id,
        })
        .await
        .map_err(RpcError)?
        .into_inner();
    let mut rows = vec![
        ("raw", hex0x(&r.raw_transaction)),
        ("hash", hex0x(&r.transaction_hash)),
        ("signer", r.signer.clone()),
    ];
    if !r.remaining.is_empty() {
        rows.push(("remaining", r.remaining.clone()));
    }
    emit(
        opts.json,
        &json!({
            "account_id": a.account,
            "raw_transaction": hex0x(&r.raw_transaction),
            "transaction_hash": hex0x(&r.transaction_hash),
            "signing_hash": hex0x(&r.signing_hash),
            "signer": r.signer,
            "remaining": r.remaining,
        }),
        &rows,
    );
    Ok(())
}

/// Software wallet commands (development and demos only: the key sits in a file).
#[derive(Debug, Subcommand)]
pub enum WalletCmd {
    /// Create a secp256k1 key file (0600) and print its address.
    New {
        /// Where to write the key (hex).
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign an EIP-712 document (eth_signTypedData_v4 JSON; `-` reads stdin).
    SignTypedData {
        /// The key file.
        #[arg(long)]
        key: PathBuf,
        /// The document.
        #[arg(long)]
        file: PathBuf,
    },
}

/// Parses 90s / 30m / 2h / 1d / plain seconds.
pub fn parse_ttl(s: &str) -> anyhow::Result<u64> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("--ttl {s:?}: expected e.g. 90s, 30m, 2h, 1d"))?;
    n.checked_mul(mult).context("--ttl is too large")
}

fn state_name(state: i32) -> &'static str {
    match SessionState::try_from(state).unwrap_or(SessionState::Unspecified) {
        SessionState::Active => "active",
        SessionState::Revoked => "revoked",
        SessionState::Expired => "expired",
        SessionState::Unspecified => "unknown",
    }
}

fn session_json(s: &Session) -> Value {
    json!({
        "session_id": s.session_id,
        "account_id": s.account_id,
        "delegate": s.delegate,
        "scopes": s.scopes,
        "cap": s.cap,
        "remaining": s.remaining,
        "uses": s.uses,
        "issued_at": s.issued_at,
        "expires_at": s.expires_at,
        "state": state_name(s.state),
        "revoked_at": (s.revoked_at != 0).then_some(s.revoked_at),
        "revoked_by": (!s.revoked_by.is_empty()).then(|| s.revoked_by.clone()),
        "revocation_typed_data": serde_json::from_str::<Value>(&s.revocation_typed_data_json).unwrap_or(Value::Null),
        "assets": s.assets.iter().map(|a| json!({"asset": a.asset, "cap": a.cap, "remaining": a.remaining})).collect::<Vec<_>>(),
    })
}

fn print_session(json: bool, s: &Session) {
    let mut rows = vec![
        ("session_id", s.session_id.clone()),
        ("account_id", s.account_id.clone()),
        ("delegate", s.delegate.clone()),
        ("scopes", s.scopes.join(" ")),
        ("remaining", format!("{} of {}", s.remaining, s.cap)),
    ];
    for a in &s.assets {
        rows.push(("asset", format!("{}: {} of {}", a.asset, a.remaining, a.cap)));
    }
    rows.extend([
        ("uses", s.uses.to_string()),
        ("state", state_name(s.state).to_string()),
        ("expires_at", s.expires_at.to_string()),
    ]);
    emit(json, &session_json(s), &rows);
}

fn parse_sig(s: &str) -> anyhow::Result<Vec<u8>> {
    hex::decode(s.trim().trim_start_matches("0x")).context("signature is not hex")
}

/// Runs a session command.
pub async fn session(home: &Path, opts: &ClientOpts, cmd: SessionCmd) -> anyhow::Result<()> {
    let mut c = SessionServiceClient::new(connect(home, opts).await?);
    match cmd {
        SessionCmd::Challenge {
            account,
            delegate,
            scopes,
            cap,
            ttl,
        } => {
            let r = c
                .create_session_challenge(CreateSessionChallengeRequest {
                    account_id: account,
                    delegate,
                    scopes,
                    cap,
                    ttl_seconds: parse_ttl(&ttl)?,
                })
                .await
                .map_err(RpcError)?
                .into_inner();
            let typed: Value = serde_json::from_str(&r.typed_data_json).context("typed data from the daemon")?;
            emit(
                opts.json,
                &json!({
                    "challenge_id": r.challenge_id,
                    "typed_data": typed,
                    "expires_at": r.expires_at,
                    "session_expires_at": r.session_expires_at,
                }),
                &[
                    ("challenge_id", r.challenge_id.clone()),
                    ("expires_at", r.expires_at.to_string()),
                    ("typed_data", r.typed_data_json.clone()),
                ],
            );
        }
        SessionCmd::Open { challenge, signature } => {
            let r = c
                .open_session(OpenSessionRequest {
                    challenge_id: challenge,
                    signature: parse_sig(&signature)?,
                })
                .await
                .map_err(RpcError)?
                .into_inner();
            let s = r.session.context("daemon returned no session")?;
            let mut v = session_json(&s);
            v["token"] = json!(r.token);
            emit(
                opts.json,
                &v,
                &[
                    ("session_id", s.session_id.clone()),
                    ("token", r.token.clone()),
                    ("expires_at", s.expires_at.to_string()),
                    ("scopes", s.scopes.join(" ")),
                    ("remaining", s.remaining.clone()),
                ],
            );
        }
        SessionCmd::Show { session_id } => {
            let s = c
                .get_session(GetSessionRequest { session_id })
                .await
                .map_err(RpcError)?
                .into_inner();
            print_session(opts.json, &s);
        }
        SessionCmd::List { account, page_size } => {
            let mut sessions = Vec::new();
            let mut page_token = String::new();
            loop {
                let r = c
                    .list_sessions(ListSessionsRequest {
                        account_id: account.clone(),
                        page_size,
                        page_token: page_token.clone(),
                    })
                    .await
                    .map_err(RpcError)?
                    .into_inner();
                sessions.extend(r.sessions);
                if r.next_page_token.is_empty() {
                    break;
                }
                anyhow::ensure!(
                    r.next_page_token != page_token,
                    "the daemon answered the same page token twice"
                );
                page_token = r.next_page_token;
            }
            if opts.json {
                println!(
                    "{}",
                    json!({"sessions": sessions.iter().map(session_json).collect::<Vec<_>>()})
                );
            } else {
                for s in &sessions {
                    println!(
                        "{}  {:<8} {} of {} left  {}",
                        s.session_id,
                        state_name(s.state),
                        s.remaining,
                        s.cap,
                        s.delegate
                    );
                }
            }
        }
        SessionCmd::Revoke { session_id, signature } => {
            let controller_signature = match signature {
                Some(s) => parse_sig(&s)?,
                None => Vec::new(),
            };
            let s = c
                .revoke_session(RevokeSessionRequest {
                    session_id,
                    controller_signature,
                })
                .await
                .map_err(RpcError)?
                .into_inner();
            print_session(opts.json, &s);
        }
    }
    Ok(())
}

/// Runs `sign payment`.
pub async fn sign_payment(home: &Path, opts: &ClientOpts, a: PaymentArgs) -> anyhow::Result<()> {
    let mut c = SigningServiceClient::new(connect(home, opts).await?);
    let r = c
        .sign_payment(SignPaymentRequest {
            session_token: a.session,
            amount: a.amount,
            currency: a.currency,
            manifest: a.manifest,
            license_id: a.license,
            payee: a.payee,
            request_id: a.request_id,
        })
        .await
        .map_err(RpcError)?
        .into_inner();
    let typed: Value = serde_json::from_str(&r.typed_data_json).context("typed data from the daemon")?;
    emit(
        opts.json,
        &json!({
            "session_id": r.session_id,
            "request_id": r.request_id,
            "typed_data": typed,
            "digest": hex0x(&r.digest),
            "signature": hex0x(&r.signature),
            "signer": r.signer,
            "remaining": r.remaining,
            "nonce": r.nonce,
        }),
        &[
            ("signature", hex0x(&r.signature)),
            ("signer", r.signer.clone()),
            ("remaining", r.remaining.clone()),
            ("nonce", r.nonce.to_string()),
        ],
    );
    Ok(())
}

/// Runs a wallet command.
pub fn wallet(opts: &ClientOpts, cmd: WalletCmd) -> anyhow::Result<()> {
    match cmd {
        WalletCmd::New { out } => {
            let key = k256::ecdsa::SigningKey::random(&mut rand::thread_rng());
            let hexkey = zeroize::Zeroizing::new(hex::encode(key.to_bytes()));
            crate::tls::devpki::write_private(&out, hexkey.as_bytes())?;
            let address = Address::from_public_key(key.verifying_key()).to_checksum();
            emit(
                opts.json,
                &json!({"address": address, "key_file": out}),
                &[("address", address.clone()), ("key_file", out.display().to_string())],
            );
        }
        WalletCmd::SignTypedData { key, file } => {
            let text = zeroize::Zeroizing::new(
                std::fs::read_to_string(&key).with_context(|| format!("reading {}", key.display()))?,
            );
            let bytes = zeroize::Zeroizing::new(hex::decode(text.trim()).context("key file is not hex")?);
            let sk = k256::ecdsa::SigningKey::from_slice(&bytes).context("not a secp256k1 private key")?;
            let doc = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading stdin")?
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?
            };
            // Accept either the document itself or `{"typed_data": ...}` as `session challenge --json` prints it.
            let value: Value = serde_json::from_str(&doc).context("not JSON")?;
            let value = if value.get("typed_data").is_some() {
                value["typed_data"].clone()
            } else {
                value
            };
            let typed = TypedData::from_value(&value).map_err(|e| anyhow::anyhow!("typed data: {e}"))?;
            let digest = typed.signing_hash();
            let out = crate::crypto::eth::sign_digest(&sk, &digest).context("signing")?;
            let address = Address::from_public_key(sk.verifying_key()).to_checksum();
            emit(
                opts.json,
                &json!({"signature": hex0x(&out), "digest": hex0x(&digest), "address": address}),
                &[("signature", hex0x(&out)), ("address", address.clone())],
            );
        }
    }
    Ok(())
}
