//! Sessions that bound real value: stablecoin authorizations (EIP-3009,
//! EIP-2612, Permit2) signed inside a session are bounded by the asset's
//! scopes and counted against its cap like keyward's own payments. A real
//! daemon, a real SoftHSM token, real mTLS, real stores; the documents are
//! the ones ethers v6 and eth-account built (tests/data/eip712/stablecoin).

mod common;

use std::sync::Arc;

use common::*;
use keyward::api::pb::session_service_client::SessionServiceClient;
use keyward::api::pb::{
    CreateSessionChallengeRequest, GetSessionRequest, OpenSessionRequest, SignPaymentRequest, SignTransactionRequest,
    SignTransactionResponse, SignTypedDataRequest, SignTypedDataResponse,
};
use keyward::clock::ManualClock;
use keyward::config::Custody;
use keyward::crypto::eth::recover_address;
use serde_json::Value;
use tonic::Code;

const MARKETPLACE: &str = "spiffe://example.org/marketplace";
const MANIFEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
/// USDC on Base, the EIP-3009 / EIP-2612 token of the vectors.
const USDC: &str = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913";
const PERMIT2: &str = "0x000000000022D473030F116dDEE9F6B43aC78BA3";
/// The vectors' spender and recipient.
const PAYEE: &str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";
/// The vectors' signer: the well-known test key #0 of Hardhat and Anvil.
const VECTOR_KEY: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
const VECTOR_SIGNER: &str = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266";
/// Every vector is valid until this time.
const VECTOR_DEADLINE: i64 = 1_900_000_000;
const DOCUMENTS: [&str; 5] = [
    "eip3009_transfer",
    "eip3009_receive",
    "eip2612_permit",
    "permit2_transfer_from",
    "permit2_single",
];

fn vector(name: &str, lib: &str) -> Value {
    let path = format!(
        "{}/tests/data/eip712/stablecoin/{name}.{lib}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).expect("vector")).expect("vector json")
}

fn asset() -> String {
    format!("eip155:8453/erc20:{}", USDC.to_lowercase())
}

struct Holder {
    env: Env,
    daemon: Daemon,
    wallet: Wallet,
    account_id: String,
    address: String,
}

impl Holder {
    /// A daemon at `now`, and an account: the vectors' key imported when
    /// `import`, a fresh one otherwise.
    async fn start(env: Env, now: i64, import: bool) -> Holder {
        env.init().await;
        // The operator allows the token's and Permit2's domains on Base (the default
        // policies allow the EIP-712 specification's example domain only).
        let policy = env.dir.path().join("policies/signing.cedar");
        let text = std::fs::read_to_string(&policy).expect("policy");
        let mail = "\"eip155:1:0xcccccccccccccccccccccccccccccccccccccccc\"";
        assert!(text.contains(mail), "the default allow-list names the Mail domain");
        let allowed = format!(
            "{mail}, \"eip155:8453:{}\", \"eip155:8453:{}\"",
            USDC.to_lowercase(),
            PERMIT2.to_lowercase()
        );
        std::fs::write(&policy, text.replace(mail, &allowed)).expect("policy");
        let daemon = env.start_with_clock(Arc::new(ManualClock::new(now))).await;
        let wallet = Wallet::new(0x42);
        let controller = wallet.address().to_checksum();
        let (account_id, address) = if import {
            let key_file = env.dir.path().join("vector.key");
            std::fs::write(&key_file, VECTOR_KEY).expect("key file");
            let (ok, out, err) = cli(
                &env,
                &daemon,
                "admin",
                &[
                    "account",
                    "import",
                    "--alg",
                    "secp256k1",
                    "--key-file",
                    key_file.to_str().expect("path"),
                    "--controller",
                    &controller,
                    "--json",
                ],
            );
            assert!(ok, "{err}");
            let v: Value = serde_json::from_str(out.trim()).expect("json");
            (
                v["account_id"].as_str().expect("id").to_string(),
                v["eth_address"].as_str().expect("address").to_string(),
            )
        } else {
            let a = daemon
                .accounts(&env, "admin")
                .await
                .create_account(keyward::api::pb::CreateAccountRequest {
                    controller,
                    label: "alice".into(),
                    allow: vec![],
                })
                .await
                .expect("account")
                .into_inner();
            (a.account_id, a.eth_address)
        };
        Holder {
            env,
            daemon,
            wallet,
            account_id,
            address,
        }
    }

    /// The wallet signs the grant it is shown: (grant document, session id, token).
    async fn session(&self, scopes: &[String], cap: &str, ttl: u64) -> (Value, String, String) {
        let mut sessions = SessionServiceClient::new(self.daemon.channel(&self.env, "wallet-gateway").await);
        let c = sessions
            .create_session_challenge(CreateSessionChallengeRequest {
                account_id: self.account_id.clone(),
                delegate: MARKETPLACE.into(),
                scopes: scopes.to_vec(),
                cap: cap.into(),
                ttl_seconds: ttl,
            })
            .await
            .expect("challenge")
            .into_inner();
        let opened = sessions
            .open_session(OpenSessionRequest {
                challenge_id: c.challenge_id,
                signature: self.wallet.sign(&c.typed_data_json),
            })
            .await
            .expect("open")
            .into_inner();
        let grant = serde_json::from_str(&c.typed_data_json).expect("grant");
        (grant, opened.session.expect("session").session_id, opened.token)
    }

    async fn sign(&self, token: &str, doc: &Value, request_id: &str) -> Result<SignTypedDataResponse, tonic::Status> {
        self.daemon
            .signing(&self.env, "marketplace")
            .await
            .sign_typed_data(SignTypedDataRequest {
                account_id: self.account_id.clone(),
                typed_data_json: doc.to_string(),
                session_token: token.into(),
                request_id: request_id.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    async fn transaction(
        &self,
        profile: &str,
        req: SignTransactionRequest,
    ) -> Result<SignTransactionResponse, tonic::Status> {
        self.daemon
            .signing(&self.env, profile)
            .await
            .sign_transaction(SignTransactionRequest {
                account_id: self.account_id.clone(),
                ..req
            })
            .await
            .map(|r| r.into_inner())
    }

    async fn remaining(&self, session_id: &str) -> String {
        SessionServiceClient::new(self.daemon.channel(&self.env, "wallet-gateway").await)
            .get_session(GetSessionRequest {
                session_id: session_id.into(),
            })
            .await
            .expect("session")
            .into_inner()
            .remaining
    }
}

/// The five documents exactly as ethers v6 built them, signed inside a session
/// by the vectors' own key: the daemon's digest is ethers' and eth-account's,
/// its signature is theirs byte for byte (RFC 6979 on all three sides), and
/// each one counts against the asset's own cap until the cap is spent.
#[test]
fn stablecoin_authorizations_sign_as_ethers_does_and_count_against_the_asset_cap() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        let w = Holder::start(env, VECTOR_DEADLINE - 1000, true).await;
        assert_eq!(w.address, VECTOR_SIGNER, "the imported key is the vectors' signer");
        // 2.5 + 2.5 + 1 + 3 + 4 USDC: exactly the asset's cap.
        let scopes = [
            format!("payments:{}:1-4000000", asset()),
            format!("cap:{}:13000000", asset()),
            format!("payee:{PAYEE}"),
            format!("typed-data:8453:{USDC}"),
            format!("typed-data:8453:{PERMIT2}"),
        ];
        let (grant, session_id, token) = w.session(&scopes, "0", 1800).await;
        // What the wallet was shown, field by field.
        let m = &grant["message"];
        assert_eq!(m["allowances"].as_array().map(Vec::len), Some(1), "{m}");
        let a = &m["allowances"][0];
        assert_eq!(
            (
                &a["chainId"],
                &a["token"],
                &a["minPerCall"],
                &a["maxPerCall"],
                &a["cap"],
                &a["ownCap"]
            ),
            (
                &Value::from(8453),
                &Value::from(USDC),
                &Value::from("1"),
                &Value::from("4000000"),
                &Value::from("13000000"),
                &Value::from(true)
            ),
            "{a}"
        );
        assert_eq!(m["payees"], serde_json::json!([PAYEE]));
        assert_eq!(m["contracts"][0]["unbounded"], Value::from(false));
        assert_eq!(m["cap"], Value::from("0"), "nothing moves outside the asset's own cap");

        let mut first = None;
        let mut left: u128 = 13_000_000;
        for (name, amount) in DOCUMENTS
            .into_iter()
            .zip([2_500_000u128, 2_500_000, 1_000_000, 3_000_000, 4_000_000])
        {
            let ethers = vector(name, "ethers");
            let theirs = vector(name, "eth_account");
            assert_eq!(
                ethers["digest"], theirs["digest"],
                "{name}: ethers and eth-account agree"
            );
            let r = w.sign(&token, &ethers["typed_data"], name).await.expect(name);
            assert_eq!(
                format!("0x{}", hex::encode(&r.digest)),
                ethers["digest"].as_str().expect("digest"),
                "{name}: the daemon's digest is ethers'"
            );
            assert_eq!(
                format!("0x{}", hex::encode(&r.signature)),
                ethers["signature"].as_str().expect("signature"),
                "{name}: the daemon's signature is ethers'"
            );
            let digest: [u8; 32] = r.digest.as_slice().try_into().expect("32");
            assert_eq!(
                recover_address(&digest, &r.signature).expect("recovers").to_checksum(),
                VECTOR_SIGNER
            );
            left -= amount;
            assert_eq!(r.remaining, left.to_string(), "{name}: what is left of the asset's cap");
            first.get_or_insert(r);
        }
        // A retry is answered from the store and counts once.
        let again = w
            .sign(&token, &vector(DOCUMENTS[0], "ethers")["typed_data"], DOCUMENTS[0])
            .await
            .expect("retry");
        assert_eq!(Some(again), first);
        // The cap is spent: one more unit of USDC is refused, whatever the document.
        let mut more = vector("eip3009_transfer", "ethers")["typed_data"].clone();
        more["message"]["value"] = Value::from("1");
        more["message"]["nonce"] = Value::from(format!("0x{}", "11".repeat(32)));
        let err = w.sign(&token, &more, "one-more").await.expect_err("cap spent");
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
        assert!(
            err.message()
                .contains(&format!("cap of {} exhausted: 0 left, 1 requested", asset())),
            "{}",
            err.message()
        );
        assert_eq!(w.remaining(&session_id).await, "0");
        let s = SessionServiceClient::new(w.daemon.channel(&w.env, "wallet-gateway").await)
            .get_session(GetSessionRequest {
                session_id: session_id.clone(),
            })
            .await
            .expect("session")
            .into_inner();
        assert_eq!(s.assets.len(), 1);
        assert_eq!(
            (
                s.assets[0].asset.as_str(),
                s.assets[0].cap.as_str(),
                s.assets[0].remaining.as_str()
            ),
            (asset().as_str(), "13000000", "0")
        );
        w.daemon.stop().await;
    });
}

/// A document built from a vector for this account, valid until `until`.
fn document(name: &str, owner: &str, until: i64) -> Value {
    let mut doc = vector(name, "eth_account")["typed_data"].clone();
    let m = &mut doc["message"];
    for field in ["from", "owner"] {
        if m.get(field).is_some() {
            m[field] = Value::from(owner);
        }
    }
    for field in ["validBefore", "deadline", "sigDeadline"] {
        if m.get(field).is_some() {
            m[field] = Value::from(until.to_string());
        }
    }
    if m.get("details").is_some() {
        m["details"]["expiration"] = Value::from(until.to_string());
    }
    doc
}

/// Every way a transfer can leave the grant is refused with PERMISSION_DENIED
/// and spends nothing; what the grant names signs until its cap is spent.
#[test]
fn transfers_outside_the_grant_are_refused_and_spend_nothing() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        let now = 1_800_000_000;
        let w = Holder::start(env, now, false).await;
        let scopes = [
            format!("payments:{}:1-3000000", asset()),
            format!("cap:{}:5000000", asset()),
            format!("payee:{PAYEE}"),
            format!("typed-data:8453:{USDC}"),
            format!("typed-data:8453:{PERMIT2}"),
        ];
        let (_, _, token) = w.session(&scopes, "0", 600).await;
        let end = now + 600;
        let transfer = |value: &str| {
            let mut d = document("eip3009_transfer", &w.address, end);
            d["message"]["value"] = Value::from(value);
            d
        };
        let other = "0x2222222222222222222222222222222222222222";
        let mut cases: Vec<(&str, Value, &str)> = Vec::new();
        let mut d = transfer("5");
        d["message"]["to"] = Value::from(other);
        cases.push(("another payee", d, "is not one of the session's payee scopes"));
        cases.push((
            "above the per-call bound",
            transfer("3000001"),
            "outside every payments scope",
        ));
        cases.push((
            "above 128 bits",
            transfer("115792089237316195423570985008687907853269984665640564039457584007913129639935"),
            "above every payments scope",
        ));
        let mut d = transfer("5");
        d["message"]["validBefore"] = Value::from((end + 1).to_string());
        cases.push(("outliving the session", d, "after the session expires"));
        let mut d = transfer("5");
        d["message"]["from"] = Value::from(other);
        cases.push(("someone else's tokens", d, "is not the session's account"));
        let mut d = document("permit2_transfer_from", &w.address, end);
        d["message"]["permitted"]["token"] = Value::from("0xfde4C96c8593536E31F229EA8f37b2ADa2699bb2");
        cases.push(("another token through Permit2", d, "are not granted"));
        let mut d = document("permit2_single", &w.address, end);
        d["message"]["details"]["expiration"] = Value::from((end + 1).to_string());
        cases.push(("an allowance outliving the session", d, "after the session expires"));
        // Any other document of the token's domain needs the :unbounded marker.
        let mut mail: Value = serde_json::from_str(MAIL).expect("mail");
        mail["domain"]["chainId"] = Value::from(8453);
        mail["domain"]["verifyingContract"] = Value::from(USDC);
        cases.push(("an unrecognised document", mail.clone(), ":unbounded"));
        for (what, doc, needle) in &cases {
            let err = w.sign(&token, doc, "").await.expect_err(what);
            assert_eq!(err.code(), Code::PermissionDenied, "{what}: {}", err.message());
            assert!(err.message().contains(needle), "{what}: {}", err.message());
        }
        // Nothing was spent: the whole cap is still there.
        w.sign(&token, &transfer("3000000"), "a")
            .await
            .expect("within the grant");
        let err = w
            .sign(&token, &transfer("2000001"), "b")
            .await
            .expect_err("over the cap");
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
        assert!(err.message().contains("2000000 left"), "{}", err.message());
        let permit = {
            let mut d = document("eip2612_permit", &w.address, end);
            d["message"]["value"] = Value::from("2000000");
            d
        };
        w.sign(&token, &permit, "c").await.expect("the rest of the cap");

        // The same document under an unbounded scope signs, and counts nothing.
        let unbounded = [format!("typed-data:8453:{USDC}:unbounded")];
        let (grant, session_id, token) = w.session(&unbounded, "1", 600).await;
        assert_eq!(grant["message"]["contracts"][0]["unbounded"], Value::from(true));
        w.sign(&token, &mail, "").await.expect("unbounded domain");
        assert_eq!(w.remaining(&session_id).await, "1");
        // ...but a recognised transfer there still needs its asset's scope.
        let err = w.sign(&token, &transfer("1"), "").await.expect_err("no asset scope");
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
        assert!(err.message().contains("are not granted"), "{}", err.message());
        w.daemon.stop().await;
    });
}

/// 200 concurrent requests at the cap's boundary in one session, mixing
/// keyward payments (7 each), EIP-3009 authorizations (11 each) and ether
/// transactions (13 wei each) that share the session's cap: what was signed never adds up to more than the cap, and
/// what is left is exactly the cap less what was signed.
fn mixed_race(store: StoreKind) {
    let Some(env) = Env::new(Custody::Host, store) else {
        return;
    };
    block_on(async {
        let now = 1_800_000_000;
        let w = Arc::new(Holder::start(env, now, false).await);
        let scopes = [
            "payments:USDC:1-100".to_string(),
            format!("license:manifest:{MANIFEST}"),
            format!("payments:{}:1-100", asset()),
            format!("typed-data:8453:{USDC}"),
            format!("tx:8453:{PAYEE}"),
            "payments:eip155:8453/slip44:60:1-100".to_string(),
        ];
        let (_, session_id, token) = w.session(&scopes, "1000", 600).await;
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(w.daemon.signing(&w.env, "marketplace").await);
        }
        let mut tasks = Vec::new();
        for i in 0..200usize {
            let mut c = clients[i % clients.len()].clone();
            let token = token.clone();
            let (account_id, address) = (w.account_id.clone(), w.address.clone());
            tasks.push(tokio::spawn(async move {
                if i % 3 == 2 {
                    return c
                        .sign_transaction(SignTransactionRequest {
                            account_id,
                            session_token: token,
                            request_id: format!("tx-{i}"),
                            nonce: i as u64,
                            // No gas fee, so that each counts 13 wei.
                            max_fee_per_gas: "0".into(),
                            max_priority_fee_per_gas: "0".into(),
                            ..tx(PAYEE, "13", vec![])
                        })
                        .await
                        .map(|_| 13u128);
                }
                if i % 3 == 0 {
                    c.sign_payment(SignPaymentRequest {
                        session_token: token,
                        amount: "7".into(),
                        currency: "USDC".into(),
                        manifest: MANIFEST.into(),
                        license_id: "lic".into(),
                        payee: String::new(),
                        request_id: format!("pay-{i}"),
                    })
                    .await
                    .map(|_| 7u128)
                } else {
                    let mut d = document("eip3009_transfer", &address, now + 600);
                    d["message"]["value"] = Value::from("11");
                    d["message"]["nonce"] = Value::from(format!("0x{i:064x}"));
                    c.sign_typed_data(SignTypedDataRequest {
                        account_id,
                        typed_data_json: d.to_string(),
                        session_token: token,
                        request_id: format!("auth-{i}"),
                    })
                    .await
                    .map(|_| 11u128)
                }
            }));
        }
        let (mut signed, mut refused) = (0u128, 0);
        for t in tasks {
            match t.await.expect("task") {
                Ok(amount) => signed += amount,
                Err(e) if e.code() == Code::ResourceExhausted => refused += 1,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        let remaining: u128 = w.remaining(&session_id).await.parse().expect("remaining");
        assert!(signed <= 1000, "signed {signed} over a cap of 1000");
        assert_eq!(signed + remaining, 1000, "what is left is the cap less what was signed");
        assert!(refused > 0 && remaining < 13, "the cap was reached: {remaining} left");
        // Stopped, not dropped at exit: the HSM's threads end before the process does.
        match Arc::try_unwrap(w) {
            Ok(w) => w.daemon.stop().await,
            Err(_) => panic!("the daemon is still shared"),
        }
    });
}

#[test]
fn mixed_race_at_the_cap_sqlite() {
    mixed_race(StoreKind::Sqlite);
}

#[test]
fn mixed_race_at_the_cap_postgres() {
    mixed_race(StoreKind::Postgres);
}

/// An EIP-1559 transaction on Base, 21,000 gas at 1 gwei.
fn tx(to: &str, value: &str, data: Vec<u8>) -> SignTransactionRequest {
    SignTransactionRequest {
        chain_id: 8453,
        nonce: 0,
        gas_limit: 60_000,
        max_fee_per_gas: "1000000000".into(),
        max_priority_fee_per_gas: "1000000".into(),
        to: to.into(),
        value: value.into(),
        data,
        ..Default::default()
    }
}

/// ERC-20 `transfer(to, amount)` call data.
fn erc20_transfer(to: &str, amount: u128) -> Vec<u8> {
    let mut data = hex::decode("a9059cbb").expect("selector");
    data.extend_from_slice(&[0u8; 12]);
    data.extend_from_slice(&hex::decode(to.trim_start_matches("0x")).expect("address"));
    data.extend_from_slice(&[0u8; 16]);
    data.extend_from_slice(&amount.to_be_bytes());
    data
}

/// An operator has the account sign transactions directly: the raw bytes are
/// eth-account's for the same key and fields (RFC 6979 on both sides), and
/// eth-account decodes them to the fields asked for and the account as sender.
/// Malformed requests are INVALID_ARGUMENT; the marketplace signs nothing
/// outside a session.
#[test]
fn transactions_sign_as_eth_account_does_and_decode_with_it() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        let w = Holder::start(env, 1_800_000_000, true).await;
        let cases = [
            (
                SignTransactionRequest {
                    chain_id: 1,
                    nonce: 7,
                    gas_limit: 22_000,
                    max_fee_per_gas: "30000000000".into(),
                    max_priority_fee_per_gas: "2000000000".into(),
                    to: PAYEE.into(),
                    value: "1000000000000000".into(),
                    data: vec![0xde, 0xad, 0xbe, 0xef],
                    ..Default::default()
                },
                "0x02f876010784773594008506fc23ac008255f09470997970c51812dc3a010c7d01b50e0d17dc79c887038d7ea4c6800084deadbeefc001a05ebfc51c42b32dc76e934a90e727fb8b40d9d30c32540bece4375be973923535a056a8db22651544e30172736db06690a84c4e2fc5ae99b02eb89e3dc531f93e57",
            ),
            (
                SignTransactionRequest {
                    legacy: true,
                    chain_id: 1,
                    nonce: 8,
                    gas_limit: 21_000,
                    gas_price: "20000000000".into(),
                    to: PAYEE.into(),
                    value: "12345".into(),
                    ..Default::default()
                },
                "0xf866088504a817c8008252089470997970c51812dc3a010c7d01b50e0d17dc79c88230398026a008490ffb060bf92437f8736b36c6ec8d240a9fa8bd1ff67f0e5cf5fe8f0402afa069eb5f4fbc273abf6497fb9e59430ab17fdfc13cbe8318434001f54cda24f2f6",
            ),
        ];
        for (req, eth_account_raw) in cases {
            let legacy = req.legacy;
            let r = w.transaction("admin", req.clone()).await.expect("operator signs");
            assert_eq!(format!("0x{}", hex::encode(&r.raw_transaction)), eth_account_raw);
            assert_eq!(r.signer, VECTOR_SIGNER);
            let signing_hash: [u8; 32] = r.signing_hash.as_slice().try_into().expect("32");
            assert_ne!(
                signing_hash.to_vec(),
                r.transaction_hash,
                "the signed hash is not the transaction's"
            );
            if let Some(d) = eth_account_decode_tx(&r.raw_transaction) {
                assert_eq!(d["sender"], VECTOR_SIGNER);
                assert_eq!(d["hash"], format!("0x{}", hex::encode(&r.transaction_hash)));
                assert_eq!(d["type"], if legacy { "0" } else { "2" });
                assert_eq!(d["nonce"], req.nonce.to_string());
                assert_eq!(d["chainId"], req.chain_id.to_string());
                assert_eq!(d["to"], PAYEE);
                assert_eq!(d["value"], req.value);
                assert_eq!(d["data"], format!("0x{}", hex::encode(&req.data)));
            }
        }
        let err = w
            .transaction("marketplace", tx(PAYEE, "1", vec![]))
            .await
            .expect_err("no session");
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
        let bad = [
            ("to", tx("", "1", vec![])),
            ("to", tx("0x1234", "1", vec![])),
            ("value", tx(PAYEE, "01", vec![])),
            (
                "value",
                tx(
                    PAYEE,
                    "115792089237316195423570985008687907853269984665640564039457584007913129639936",
                    vec![],
                ),
            ),
            (
                "chain_id",
                SignTransactionRequest {
                    chain_id: 0,
                    ..tx(PAYEE, "1", vec![])
                },
            ),
            (
                "gas_limit",
                SignTransactionRequest {
                    gas_limit: 20_999,
                    ..tx(PAYEE, "1", vec![])
                },
            ),
            (
                "max_priority_fee_per_gas",
                SignTransactionRequest {
                    max_priority_fee_per_gas: "2000000000".into(),
                    ..tx(PAYEE, "1", vec![])
                },
            ),
            (
                "gas_price",
                SignTransactionRequest {
                    gas_price: "1".into(),
                    ..tx(PAYEE, "1", vec![])
                },
            ),
            (
                "gas_price",
                SignTransactionRequest {
                    legacy: true,
                    ..tx(PAYEE, "1", vec![])
                },
            ),
            ("data", tx(PAYEE, "1", vec![0; 128 * 1024 + 1])),
        ];
        for (field, req) in bad {
            let err = w.transaction("admin", req).await.expect_err(field);
            assert_eq!(err.code(), Code::InvalidArgument, "{field}: {}", err.message());
            assert!(err.message().contains(field), "{field}: {}", err.message());
        }
        w.daemon.stop().await;
    });
}

/// Inside a session a transaction needs a tx scope naming its chain, address
/// and function; its ether (value and gas: gas limit × fee cap) is a spend of
/// the chain's native asset, an ERC-20 transfer a spend of that token and its
/// gas one of ether, all or nothing, each bounded by its payments scope and
/// payees and reserved against its cap.
#[test]
fn transactions_in_a_session_are_bounded_and_counted() {
    let env = Env::new(Custody::Host, StoreKind::Postgres).or_else(|| Env::new(Custody::Host, StoreKind::Sqlite));
    let env = env.expect("env");
    block_on(async {
        let w = Holder::start(env, 1_800_000_000, false).await;
        let eth = "eip155:8453/slip44:60";
        let scopes = [
            format!("tx:8453:{PAYEE}"),
            format!("payments:{eth}:1-2000000000000000"),
            format!("cap:{eth}:1500000000000000"),
            format!("tx:8453:{USDC}:0xa9059cbb"),
            format!("payments:{}:1-3000000", asset()),
            format!("cap:{}:3000000", asset()),
            format!("payee:{PAYEE}"),
        ];
        // An asset's cap is bounded by the operator's limit for that asset (1 ether on Base).
        let mut too_much = scopes.to_vec();
        too_much[2] = format!("cap:{eth}:1000000000000000001");
        let err = SessionServiceClient::new(w.daemon.channel(&w.env, "wallet-gateway").await)
            .create_session_challenge(CreateSessionChallengeRequest {
                account_id: w.account_id.clone(),
                delegate: MARKETPLACE.into(),
                scopes: too_much,
                cap: "0".into(),
                ttl_seconds: 600,
            })
            .await
            .expect_err("above the asset's limit");
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
        assert!(err.message().contains("sessions.max_asset_cap"), "{}", err.message());
        let (grant, session_id, token) = w.session(&scopes, "0", 600).await;
        let calls = &grant["message"]["calls"];
        assert_eq!(calls[1]["selector"], "0xa9059cbb", "{calls}");
        assert_eq!(calls[0]["anyFunction"], true, "{calls}");
        assert_eq!(
            grant["message"]["allowances"][0]["token"],
            "0x0000000000000000000000000000000000000000"
        );
        let in_session = |mut req: SignTransactionRequest, id: &str| {
            req.session_token = token.clone();
            req.request_id = id.into();
            req
        };
        let r = w
            .transaction(
                "marketplace",
                in_session(tx(PAYEE, "1000000000000000", vec![]), "eth-1"),
            )
            .await
            .expect("ether to the payee");
        // 0.001 ether and 60,000 gas at 1 gwei: 0.00106 of the 0.0015 cap.
        assert_eq!(r.remaining, "440000000000000");
        if let Some(d) = eth_account_decode_tx(&r.raw_transaction) {
            assert_eq!(d["sender"], w.address);
            assert_eq!(d["value"], "1000000000000000");
        }
        let again = w
            .transaction(
                "marketplace",
                in_session(tx(PAYEE, "1000000000000000", vec![]), "eth-1"),
            )
            .await
            .expect("retry");
        assert_eq!(again, r, "a retry is answered from the store");
        let err = w
            .transaction("marketplace", in_session(tx(PAYEE, "600000000000000", vec![]), "eth-2"))
            .await
            .expect_err("over the ether cap");
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());

        let other = "0x2222222222222222222222222222222222222222";
        let approve = {
            let mut d = erc20_transfer(PAYEE, 5);
            d[..4].copy_from_slice(&[0x09, 0x5e, 0xa7, 0xb3]);
            d
        };
        // Token calls a decoder might read as a transfer of anything.
        let mut trailing = erc20_transfer(PAYEE, 5_000_000_000);
        trailing.push(0);
        let mut dirty = erc20_transfer(PAYEE, 5_000_000_000);
        dirty[4] = 1;
        let mut transfer_from = hex::decode("23b872dd").expect("selector");
        transfer_from.extend_from_slice(&[0u8; 96]);
        for (what, req, needle) in [
            ("another address", tx(other, "1", vec![]), "not covered by a tx scope"),
            ("another function", tx(USDC, "", approve), "calling 0x095ea7b3"),
            (
                "another chain",
                SignTransactionRequest {
                    chain_id: 1,
                    ..tx(PAYEE, "1", vec![])
                },
                "chain 1",
            ),
            (
                "a token to another payee",
                tx(USDC, "", erc20_transfer(other, 5)),
                "payee",
            ),
            (
                "a token transfer above its bound",
                tx(USDC, "", erc20_transfer(PAYEE, 3_000_001)),
                "outside every",
            ),
            (
                "ether with a token transfer",
                tx(USDC, "1", erc20_transfer(PAYEE, 5)),
                "carries no ether",
            ),
            (
                "a transfer with a trailing byte",
                tx(USDC, "", trailing),
                "must be exactly transfer",
            ),
            (
                "a transfer with a dirty address word",
                tx(USDC, "", dirty),
                "must be exactly transfer",
            ),
            (
                "transferFrom through a contract any function may call",
                tx(PAYEE, "", transfer_from),
                "must be exactly transfer",
            ),
        ] {
            let err = w.transaction("marketplace", in_session(req, "")).await.expect_err(what);
            assert_eq!(err.code(), Code::PermissionDenied, "{what}: {}", err.message());
            assert!(err.message().contains(needle), "{what}: {}", err.message());
        }
        let r = w
            .transaction(
                "marketplace",
                in_session(tx(USDC, "", erc20_transfer(PAYEE, 2_000_000)), "usdc-1"),
            )
            .await
            .expect("USDC to the payee");
        assert_eq!(r.remaining, "1000000", "the token's own cap");
        let s = SessionServiceClient::new(w.daemon.channel(&w.env, "wallet-gateway").await)
            .get_session(GetSessionRequest {
                session_id: session_id.clone(),
            })
            .await
            .expect("session")
            .into_inner();
        let left: Vec<(&str, &str)> = s
            .assets
            .iter()
            .map(|a| (a.asset.as_str(), a.remaining.as_str()))
            .collect();
        assert_eq!(
            left,
            [(eth, "380000000000000"), (asset().as_str(), "1000000")],
            "its gas came from the ether cap"
        );
        // Gas the ether cap cannot pay: the token transfer is refused whole.
        let err = w
            .transaction(
                "marketplace",
                in_session(
                    SignTransactionRequest {
                        max_fee_per_gas: "7000000000".into(),
                        ..tx(USDC, "", erc20_transfer(PAYEE, 1))
                    },
                    "",
                ),
            )
            .await
            .expect_err("gas over the ether cap");
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
        assert!(
            err.message().contains(&format!("cap of {eth} exhausted")),
            "{}",
            err.message()
        );
        let err = w
            .transaction(
                "marketplace",
                in_session(tx(USDC, "", erc20_transfer(PAYEE, 1_000_001)), ""),
            )
            .await
            .expect_err("over the token's cap");
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
        w.daemon.stop().await;
    });
}

/// A session opened before assets existed (scope grammar 1, as migration 0015
/// marks every older session) keeps what its wallet granted: its plain
/// typed-data scope still signs any document of the domain; a recognised
/// transfer is bounded all the same.
#[test]
fn a_session_opened_before_assets_keeps_its_unbounded_domain() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        let w = Holder::start(env, 1_800_000_000, false).await;
        let mail_domain = "typed-data:1:0xcccccccccccccccccccccccccccccccccccccccc".to_string();
        let (_, session_id, token) = w
            .session(&[mail_domain, format!("typed-data:8453:{USDC}")], "10", 600)
            .await;
        let mail: Value = serde_json::from_str(MAIL).expect("mail");
        let err = w
            .sign(&token, &mail, "")
            .await
            .expect_err("grammar 2: recognised transfers only");
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
        // What an older keyward wrote: the column's default.
        use sqlx::Connection as _;
        let mut db = sqlx::SqliteConnection::connect(&w.env.store_url).await.expect("db");
        sqlx::query("UPDATE sessions SET scope_grammar = 1 WHERE id = ?")
            .bind(&session_id)
            .execute(&mut db)
            .await
            .expect("update");
        db.close().await.expect("close");
        w.sign(&token, &mail, "")
            .await
            .expect("grammar 1: the domain as granted");
        let err = w
            .sign(&token, &document("eip3009_transfer", &w.address, 1_800_000_600), "")
            .await
            .expect_err("a transfer needs its token's payments scope");
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
        assert!(err.message().contains("are not granted"), "{}", err.message());
        w.daemon.stop().await;
    });
}
