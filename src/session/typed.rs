//! The EIP-712 documents of delegated sessions, built as the JSON that
//! `eth_signTypedData_v4` takes, under the `keyward` domain:
//!
//! ```text
//! EIP712Domain(string name,string version,uint256 chainId[,address verifyingContract])
//! SessionGrant(string accountId,address account,address controller,string delegate,
//!              Allowance[] allowances,address[] payees,Contract[] contracts,Call[] calls,string[] scopes,
//!              uint256 cap,bytes32 nonce,uint64 issuedAt,uint64 expiresAt)
//!   Allowance(string currency,uint256 chainId,address token,uint256 minPerCall,uint256 maxPerCall,
//!             uint256 cap,bool ownCap)
//!   Contract(uint256 chainId,address verifyingContract,bool unbounded)
//!   Call(uint256 chainId,address to,bytes4 selector,bool anyFunction)
//! SessionRevocation(string sessionId,string accountId,address controller)
//! ControllerChange(string accountId,address currentController,address newController,uint64 validBefore)
//! ControllerChangeCancellation(string accountId,address controller,string changeId)
//! Payment(string sessionId,string payerAccount,address payer,address payee,uint256 amount,
//!         string currency,bytes32 manifest,string licenseId,uint256 nonce)
//! ```

use serde_json::{json, Value};

use super::scope::{Asset, Scope, Scopes};
use crate::crypto::eth::Address;

/// The domain every session document is signed under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// EIP-155 chain id.
    pub chain_id: u64,
    /// Optional verifying contract.
    pub verifying_contract: Option<Address>,
}

/// Domain name.
pub const DOMAIN_NAME: &str = "keyward";
/// Domain version.
pub const DOMAIN_VERSION: &str = "1";

impl Domain {
    fn types(&self) -> Value {
        let mut fields = vec![
            json!({"name": "name", "type": "string"}),
            json!({"name": "version", "type": "string"}),
            json!({"name": "chainId", "type": "uint256"}),
        ];
        if self.verifying_contract.is_some() {
            fields.push(json!({"name": "verifyingContract", "type": "address"}));
        }
        Value::Array(fields)
    }

    fn value(&self) -> Value {
        let mut v = json!({"name": DOMAIN_NAME, "version": DOMAIN_VERSION, "chainId": self.chain_id});
        if let Some(c) = self.verifying_contract {
            v["verifyingContract"] = json!(c.to_checksum());
        }
        v
    }

    fn document(&self, primary: &str, fields: Value, message: Value) -> Value {
        json!({
            "types": {"EIP712Domain": self.types(), primary: fields},
            "primaryType": primary,
            "domain": self.value(),
            "message": message,
        })
    }
}

/// What a SessionGrant says.
#[derive(Debug, Clone)]
pub struct Grant<'a> {
    /// The account id.
    pub account_id: &'a str,
    /// The account's own address.
    pub account: Address,
    /// The controller wallet that must sign.
    pub controller: Address,
    /// The delegate's mTLS identity.
    pub delegate: &'a str,
    /// Canonical scope strings.
    pub scopes: &'a [String],
    /// Cumulative cap, minor units.
    pub cap: u128,
    /// Single-use random nonce.
    pub nonce: [u8; 32],
    /// UTC seconds.
    pub issued_at: i64,
    /// UTC seconds.
    pub expires_at: i64,
}

/// The SessionGrant document a wallet signs to open a session. Besides the
/// canonical scope strings (what the session token carries), what may move
/// is spelled out field by field for a wallet to display: one `Allowance`
/// per payments scope (an off-chain `currency`, or a token's `chainId` and
/// `token`; "*" for the scope of any currency; its per-call bounds; its own
/// cap, or the session's `cap` it shares when `ownCap` is false), the allowed
/// `payees` (none: any), one `Contract` per typed-data scope (`unbounded`:
/// any document of that domain, not only recognised transfers), and one
/// `Call` per tx scope (`anyFunction`: any call data). A chain's native asset
/// is shown as the zero `token` of its `chainId`.
pub fn session_grant(domain: &Domain, g: &Grant<'_>, parsed: &Scopes) -> Value {
    let mut allowances = Vec::new();
    let mut payees = Vec::new();
    let mut contracts = Vec::new();
    let mut calls = Vec::new();
    for s in parsed.iter() {
        match s {
            Scope::Payments { asset, min, max } => {
                let (currency, chain_id, token) = match asset {
                    None => ("*".to_string(), 0, Address([0; 20])),
                    Some(Asset::Currency(c)) => (c.clone(), 0, Address([0; 20])),
                    Some(Asset::Erc20 { chain_id, token }) => (String::new(), *chain_id, *token),
                    Some(Asset::Native { chain_id }) => (String::new(), *chain_id, Address([0; 20])),
                };
                let own = asset.as_ref().and_then(|a| parsed.cap_for(a));
                allowances.push(json!({
                    "currency": currency,
                    "chainId": chain_id,
                    "token": token.to_checksum(),
                    "minPerCall": min.to_string(),
                    "maxPerCall": max.to_string(),
                    "cap": own.unwrap_or(g.cap).to_string(),
                    "ownCap": own.is_some(),
                }));
            }
            Scope::Payee(p) => payees.push(json!(p.to_checksum())),
            Scope::TypedData {
                chain_id,
                verifying_contract,
                unbounded,
            } => contracts.push(json!({
                "chainId": chain_id,
                "verifyingContract": verifying_contract.to_checksum(),
                "unbounded": unbounded,
            })),
            Scope::Tx { chain_id, to, selector } => calls.push(json!({
                "chainId": chain_id,
                "to": to.to_checksum(),
                "selector": format!("0x{}", hex::encode(selector.unwrap_or_default())),
                "anyFunction": selector.is_none(),
            })),
            Scope::Cap { .. } | Scope::LicenseManifest(_) | Scope::Attest(_) => {}
        }
    }
    let mut doc = domain.document(
        "SessionGrant",
        json!([
            {"name": "accountId", "type": "string"},
            {"name": "account", "type": "address"},
            {"name": "controller", "type": "address"},
            {"name": "delegate", "type": "string"},
            {"name": "allowances", "type": "Allowance[]"},
            {"name": "payees", "type": "address[]"},
            {"name": "contracts", "type": "Contract[]"},
            {"name": "calls", "type": "Call[]"},
            {"name": "scopes", "type": "string[]"},
            {"name": "cap", "type": "uint256"},
            {"name": "nonce", "type": "bytes32"},
            {"name": "issuedAt", "type": "uint64"},
            {"name": "expiresAt", "type": "uint64"},
        ]),
        json!({
            "accountId": g.account_id,
            "account": g.account.to_checksum(),
            "controller": g.controller.to_checksum(),
            "delegate": g.delegate,
            "allowances": allowances,
            "payees": payees,
            "contracts": contracts,
            "calls": calls,
            "scopes": g.scopes,
            "cap": g.cap.to_string(),
            "nonce": format!("0x{}", hex::encode(g.nonce)),
            "issuedAt": g.issued_at,
            "expiresAt": g.expires_at,
        }),
    );
    doc["types"]["Allowance"] = json!([
        {"name": "currency", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "token", "type": "address"},
        {"name": "minPerCall", "type": "uint256"},
        {"name": "maxPerCall", "type": "uint256"},
        {"name": "cap", "type": "uint256"},
        {"name": "ownCap", "type": "bool"},
    ]);
    doc["types"]["Call"] = json!([
        {"name": "chainId", "type": "uint256"},
        {"name": "to", "type": "address"},
        {"name": "selector", "type": "bytes4"},
        {"name": "anyFunction", "type": "bool"},
    ]);
    doc["types"]["Contract"] = json!([
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
        {"name": "unbounded", "type": "bool"},
    ]);
    doc
}

/// The SessionRevocation document a controller signs to revoke a session.
pub fn session_revocation(domain: &Domain, session_id: &str, account_id: &str, controller: Address) -> Value {
    domain.document(
        "SessionRevocation",
        json!([
            {"name": "sessionId", "type": "string"},
            {"name": "accountId", "type": "string"},
            {"name": "controller", "type": "address"},
        ]),
        json!({"sessionId": session_id, "accountId": account_id, "controller": controller.to_checksum()}),
    )
}

/// The ControllerChange document an account's current controller signs to hand the account
/// to another wallet (valid until `valid_before`, UTC seconds).
pub fn controller_change(
    domain: &Domain,
    account_id: &str,
    current: Address,
    new: Address,
    valid_before: i64,
) -> Value {
    domain.document(
        "ControllerChange",
        json!([
            {"name": "accountId", "type": "string"},
            {"name": "currentController", "type": "address"},
            {"name": "newController", "type": "address"},
            {"name": "validBefore", "type": "uint64"},
        ]),
        json!({
            "accountId": account_id,
            "currentController": current.to_checksum(),
            "newController": new.to_checksum(),
            "validBefore": valid_before,
        }),
    )
}

/// The ControllerChangeCancellation document an account's current controller signs to cancel
/// a pending controller change (whoever asked for it).
pub fn controller_change_cancellation(
    domain: &Domain,
    account_id: &str,
    controller: Address,
    change_id: &str,
) -> Value {
    domain.document(
        "ControllerChangeCancellation",
        json!([
            {"name": "accountId", "type": "string"},
            {"name": "controller", "type": "address"},
            {"name": "changeId", "type": "string"},
        ]),
        json!({
            "accountId": account_id,
            "controller": controller.to_checksum(),
            "changeId": change_id,
        }),
    )
}

/// What a Payment says.
#[derive(Debug, Clone)]
pub struct Payment<'a> {
    /// The session it is made under.
    pub session_id: &'a str,
    /// The paying account's id.
    pub payer_account: &'a str,
    /// The paying account's address.
    pub payer: Address,
    /// Who is paid (the zero address when unspecified).
    pub payee: Address,
    /// Minor units.
    pub amount: u128,
    /// Currency code.
    pub currency: &'a str,
    /// SHA-256 of the dataset manifest.
    pub manifest: [u8; 32],
    /// License id.
    pub license_id: &'a str,
    /// The session's use counter: unique per session.
    pub nonce: u64,
}

/// The Payment document the account signs inside a session.
pub fn payment(domain: &Domain, p: &Payment<'_>) -> Value {
    domain.document(
        "Payment",
        json!([
            {"name": "sessionId", "type": "string"},
            {"name": "payerAccount", "type": "string"},
            {"name": "payer", "type": "address"},
            {"name": "payee", "type": "address"},
            {"name": "amount", "type": "uint256"},
            {"name": "currency", "type": "string"},
            {"name": "manifest", "type": "bytes32"},
            {"name": "licenseId", "type": "string"},
            {"name": "nonce", "type": "uint256"},
        ]),
        json!({
            "sessionId": p.session_id,
            "payerAccount": p.payer_account,
            "payer": p.payer.to_checksum(),
            "payee": p.payee.to_checksum(),
            "amount": p.amount.to_string(),
            "currency": p.currency,
            "manifest": format!("0x{}", hex::encode(p.manifest)),
            "licenseId": p.license_id,
            "nonce": p.nonce,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::eip712::TypedData;

    #[test]
    fn documents_encode_under_the_strict_encoder() {
        let a = Address([0x11; 20]);
        let scopes = vec!["payments:0-100".to_string()];
        for domain in [
            Domain {
                chain_id: 1,
                verifying_contract: None,
            },
            Domain {
                chain_id: 8453,
                verifying_contract: Some(Address([0xcc; 20])),
            },
        ] {
            let g = session_grant(
                &domain,
                &Grant {
                    account_id: "acc",
                    account: a,
                    controller: a,
                    delegate: "spiffe://example.org/marketplace",
                    scopes: &scopes,
                    cap: u128::MAX,
                    nonce: [7; 32],
                    issued_at: 1,
                    expires_at: 2,
                },
                &Scopes::parse(&scopes).expect("scopes"),
            );
            let t = TypedData::from_value(&g).expect("grant encodes");
            assert_eq!(t.primary_type(), "SessionGrant");
            assert_eq!(
                t.domain_chain_id().as_deref(),
                Some(domain.chain_id.to_string().as_str())
            );
            TypedData::from_value(&session_revocation(&domain, "s", "acc", a)).expect("revocation encodes");
            let p = payment(
                &domain,
                &Payment {
                    session_id: "s",
                    payer_account: "acc",
                    payer: a,
                    payee: Address([0; 20]),
                    amount: 40,
                    currency: "USDC",
                    manifest: [9; 32],
                    license_id: "lic-1",
                    nonce: 3,
                },
            );
            TypedData::from_value(&p).expect("payment encodes");
        }
    }

    #[test]
    fn grant_encode_type_is_stable() {
        // Wallet developers render this string; changing it breaks them.
        let a = Address([0x11; 20]);
        let scopes: Vec<String> = [
            "payments:0-5",
            "payments:eip155:8453/erc20:0x833589fcd6edb6e08f4c7c32d4f71b54bda02913:1-100",
            "cap:eip155:8453/erc20:0x833589fcd6edb6e08f4c7c32d4f71b54bda02913:500",
            "payee:0x2222222222222222222222222222222222222222",
            "typed-data:8453:0x833589fcd6edb6e08f4c7c32d4f71b54bda02913:unbounded",
            "tx:8453:0x833589fcd6edb6e08f4c7c32d4f71b54bda02913:0xa9059cbb",
        ]
        .map(String::from)
        .to_vec();
        let g = session_grant(
            &Domain {
                chain_id: 1,
                verifying_contract: None,
            },
            &Grant {
                account_id: "acc",
                account: a,
                controller: a,
                delegate: "d",
                scopes: &scopes,
                cap: 7,
                nonce: [0; 32],
                issued_at: 1,
                expires_at: 2,
            },
            &Scopes::parse(&scopes).expect("scopes"),
        );
        let t = TypedData::from_value(&g).expect("encodes");
        assert_eq!(
            t.encode_type("SessionGrant").expect("type"),
            "SessionGrant(string accountId,address account,address controller,string delegate,\
             Allowance[] allowances,address[] payees,Contract[] contracts,Call[] calls,string[] scopes,\
             uint256 cap,bytes32 nonce,uint64 issuedAt,uint64 expiresAt)\
             Allowance(string currency,uint256 chainId,address token,uint256 minPerCall,uint256 maxPerCall,\
             uint256 cap,bool ownCap)\
             Call(uint256 chainId,address to,bytes4 selector,bool anyFunction)\
             Contract(uint256 chainId,address verifyingContract,bool unbounded)"
        );
        // Field by field: the any-currency form shares the session's cap, the token has its own.
        let m = &g["message"];
        assert_eq!(m["allowances"][0]["currency"], "*");
        assert_eq!(
            (&m["allowances"][0]["cap"], &m["allowances"][0]["ownCap"]),
            (&json!("7"), &json!(false))
        );
        assert_eq!(
            m["allowances"][1]["token"],
            "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
        );
        assert_eq!(
            (&m["allowances"][1]["cap"], &m["allowances"][1]["ownCap"]),
            (&json!("500"), &json!(true))
        );
        assert_eq!(m["payees"], json!(["0x2222222222222222222222222222222222222222"]));
        assert_eq!(m["contracts"][0]["unbounded"], json!(true));
        assert_eq!(
            (&m["calls"][0]["selector"], &m["calls"][0]["anyFunction"]),
            (&json!("0xa9059cbb"), &json!(false))
        );
    }
}
