//! The EIP-712 documents of delegated sessions, built as the JSON that
//! `eth_signTypedData_v4` takes, under the `keyward` domain:
//!
//! ```text
//! EIP712Domain(string name,string version,uint256 chainId[,address verifyingContract])
//! SessionGrant(string accountId,address account,address controller,string delegate,string[] scopes,
//!              uint256 cap,bytes32 nonce,uint64 issuedAt,uint64 expiresAt)
//! SessionRevocation(string sessionId,string accountId,address controller)
//! ControllerChange(string accountId,address currentController,address newController,uint64 validBefore)
//! ControllerChangeCancellation(string accountId,address controller,string changeId)
//! Payment(string sessionId,string payerAccount,address payer,address payee,uint256 amount,
//!         string currency,bytes32 manifest,string licenseId,uint256 nonce)
//! ```

use serde_json::{json, Value};

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

/// The SessionGrant document a wallet signs to open a session.
pub fn session_grant(domain: &Domain, g: &Grant<'_>) -> Value {
    domain.document(
        "SessionGrant",
        json!([
            {"name": "accountId", "type": "string"},
            {"name": "account", "type": "address"},
            {"name": "controller", "type": "address"},
            {"name": "delegate", "type": "string"},
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
            "scopes": g.scopes,
            "cap": g.cap.to_string(),
            "nonce": format!("0x{}", hex::encode(g.nonce)),
            "issuedAt": g.issued_at,
            "expiresAt": g.expires_at,
        }),
    )
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
                scopes: &[],
                cap: 1,
                nonce: [0; 32],
                issued_at: 1,
                expires_at: 2,
            },
        );
        let t = TypedData::from_value(&g).expect("encodes");
        assert_eq!(
            t.encode_type("SessionGrant").expect("type"),
            "SessionGrant(string accountId,address account,address controller,string delegate,string[] scopes,uint256 cap,bytes32 nonce,uint64 issuedAt,uint64 expiresAt)"
        );
    }
}
