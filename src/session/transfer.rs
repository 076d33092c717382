//! EIP-712 documents that move value, recognised so that a session bounds
//! them like its own payments: the token, the amount, who receives or may
//! spend it and until when are read from the document, checked against the
//! session, and the amount is reserved against the asset's cap.
//!
//! A document is recognised by its primary type's exact `encodeType` (field
//! names, types and order, nested types included) and, for Permit2, by the
//! canonical Permit2 domain. Anything else is not a recognised transfer, and
//! signs only under an unbounded typed-data scope.
//!
//! | document | asset | amount | payee | valid until |
//! |---|---|---|---|---|
//! | EIP-3009 `TransferWithAuthorization`, `ReceiveWithAuthorization` | the domain's token | `value` | `to` | `validBefore` |
//! | EIP-2612 `Permit` | the domain's token | `value` | `spender` | `deadline` |
//! | Permit2 `PermitTransferFrom` | `permitted.token` | `permitted.amount` | `spender` | `deadline` |
//! | Permit2 `PermitSingle` | `details.token` | `details.amount` | `spender` | `sigDeadline`, `details.expiration` |

use num_bigint::BigUint;
use serde_json::Value;

use super::scope::{Asset, ScopeDenied};
use crate::crypto::eip712::{address_value, uint_value, TypedData};
use crate::crypto::eth::Address;

/// Uniswap's Permit2, at the same address on every chain it is deployed to.
pub const PERMIT2: Address = Address([
    0x00, 0x00, 0x00, 0x00, 0x00, 0x22, 0xd4, 0x73, 0x03, 0x0f, 0x11, 0x6d, 0xde, 0xe9, 0xf6, 0xb4, 0x3a, 0xc7, 0x8b,
    0xa3,
]);

const TRANSFER_WITH_AUTHORIZATION: &str = "TransferWithAuthorization(address from,address to,uint256 value,\
     uint256 validAfter,uint256 validBefore,bytes32 nonce)";
const RECEIVE_WITH_AUTHORIZATION: &str = "ReceiveWithAuthorization(address from,address to,uint256 value,\
     uint256 validAfter,uint256 validBefore,bytes32 nonce)";
const PERMIT: &str = "Permit(address owner,address spender,uint256 value,uint256 nonce,uint256 deadline)";
const PERMIT_TRANSFER_FROM: &str = "PermitTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,\
     uint256 deadline)TokenPermissions(address token,uint256 amount)";
const PERMIT_SINGLE: &str = "PermitSingle(PermitDetails details,address spender,uint256 sigDeadline)\
     PermitDetails(address token,uint160 amount,uint48 expiration,uint48 nonce)";

/// Which recognised document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferKind {
    /// EIP-3009 `TransferWithAuthorization` (USDC and others).
    TransferWithAuthorization,
    /// EIP-3009 `ReceiveWithAuthorization`.
    ReceiveWithAuthorization,
    /// EIP-2612 `Permit`.
    Permit,
    /// Permit2 `PermitTransferFrom` (signature transfer).
    PermitTransferFrom,
    /// Permit2 `PermitSingle` (allowance).
    PermitSingle,
}

impl TransferKind {
    /// The primary type's name.
    pub fn name(self) -> &'static str {
        match self {
            TransferKind::TransferWithAuthorization => "TransferWithAuthorization",
            TransferKind::ReceiveWithAuthorization => "ReceiveWithAuthorization",
            TransferKind::Permit => "Permit",
            TransferKind::PermitTransferFrom => "PermitTransferFrom",
            TransferKind::PermitSingle => "PermitSingle",
        }
    }
}

/// A recognised transfer, read from its document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// Which document.
    pub kind: TransferKind,
    /// The token it moves.
    pub asset: Asset,
    /// How much, in the token's minor units.
    pub amount: u128,
    /// Whose tokens (`from` / `owner`); `None` for Permit2, where the signer is the owner.
    pub owner: Option<Address>,
    /// Who receives them or may spend them (`to` / `spender`).
    pub payee: Address,
    /// Unix seconds from which it is valid (EIP-3009 `validAfter`; 0 otherwise).
    pub valid_after: BigUint,
    /// Unix seconds until which it can be used (the latest of its deadlines).
    pub valid_until: BigUint,
}

fn field<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn uint(msg: &Value, path: &[&str]) -> Result<BigUint, ScopeDenied> {
    field(msg, path)
        .and_then(uint_value)
        .ok_or_else(|| ScopeDenied::Transfer(format!("{} is not an unsigned integer", path.join("."))))
}

fn address(msg: &Value, path: &[&str]) -> Result<Address, ScopeDenied> {
    field(msg, path)
        .and_then(address_value)
        .map(Address)
        .ok_or_else(|| ScopeDenied::Transfer(format!("{} is not an address", path.join("."))))
}

fn amount(v: BigUint) -> Result<u128, ScopeDenied> {
    u128::try_from(&v).map_err(|_| ScopeDenied::TooLarge(v.to_string()))
}

/// The document's transfer, if it is one keyward recognises (its message
/// already validated against its types).
pub fn recognise(typed: &TypedData) -> Result<Option<Transfer>, ScopeDenied> {
    let Ok(encoded) = typed.encode_type(typed.primary_type()) else {
        return Ok(None);
    };
    let kind = match encoded.as_str() {
        TRANSFER_WITH_AUTHORIZATION => TransferKind::TransferWithAuthorization,
        RECEIVE_WITH_AUTHORIZATION => TransferKind::ReceiveWithAuthorization,
        PERMIT => TransferKind::Permit,
        PERMIT_TRANSFER_FROM => TransferKind::PermitTransferFrom,
        PERMIT_SINGLE => TransferKind::PermitSingle,
        _ => return Ok(None),
    };
    let chain_id = typed
        .domain_chain_id()
        .and_then(|c| c.parse::<u64>().ok())
        .filter(|c| *c != 0);
    let contract = typed.domain_verifying_contract().and_then(|c| Address::parse(&c).ok());
    let msg = typed.message();
    let token_domain = || -> Result<Asset, ScopeDenied> {
        match (chain_id, contract) {
            (Some(chain_id), Some(token)) => Ok(Asset::Erc20 { chain_id, token }),
            _ => Err(ScopeDenied::Transfer(format!(
                "{} must name its token in the domain (chainId and verifyingContract)",
                kind.name()
            ))),
        }
    };
    let transfer = match kind {
        TransferKind::TransferWithAuthorization | TransferKind::ReceiveWithAuthorization => Transfer {
            kind,
            asset: token_domain()?,
            amount: amount(uint(msg, &["value"])?)?,
            owner: Some(address(msg, &["from"])?),
            payee: address(msg, &["to"])?,
            valid_after: uint(msg, &["validAfter"])?,
            valid_until: uint(msg, &["validBefore"])?,
        },
        TransferKind::Permit => Transfer {
            kind,
            asset: token_domain()?,
            amount: amount(uint(msg, &["value"])?)?,
            owner: Some(address(msg, &["owner"])?),
            payee: address(msg, &["spender"])?,
            valid_after: BigUint::default(),
            valid_until: uint(msg, &["deadline"])?,
        },
        TransferKind::PermitTransferFrom | TransferKind::PermitSingle => {
            // The same struct under another contract means whatever that contract makes of it.
            if contract != Some(PERMIT2) || typed.domain_name() != Some("Permit2") {
                return Ok(None);
            }
            let Some(chain_id) = chain_id else {
                return Ok(None);
            };
            let (holder, deadline) = match kind {
                TransferKind::PermitTransferFrom => ("permitted", "deadline"),
                _ => ("details", "sigDeadline"),
            };
            let mut valid_until = uint(msg, &[deadline])?;
            if kind == TransferKind::PermitSingle {
                // The allowance itself lasts until `expiration` (0: the block it is used in).
                valid_until = valid_until.max(uint(msg, &["details", "expiration"])?);
            }
            Transfer {
                kind,
                asset: Asset::Erc20 {
                    chain_id,
                    token: address(msg, &[holder, "token"])?,
                },
                amount: amount(uint(msg, &[holder, "amount"])?)?,
                owner: None,
                payee: address(msg, &["spender"])?,
                valid_after: BigUint::default(),
                valid_until,
            }
        }
    };
    Ok(Some(transfer))
}

impl Transfer {
    /// Checks the transfer is the session account's own and ends before the
    /// session does (`expires_at`, unix seconds): a signed authorization must
    /// not outlive the grant it was signed under.
    pub fn check(&self, account: &Address, expires_at: i64) -> Result<(), ScopeDenied> {
        if let Some(owner) = self.owner {
            if owner != *account {
                return Err(ScopeDenied::Transfer(format!(
                    "{}: {} is not the session's account {}",
                    self.kind.name(),
                    owner.to_checksum(),
                    account.to_checksum()
                )));
            }
        }
        let end = BigUint::from(u64::try_from(expires_at).unwrap_or(0));
        if self.valid_until > end {
            return Err(ScopeDenied::Transfer(format!(
                "{}: valid until {}, after the session expires ({expires_at})",
                self.kind.name(),
                self.valid_until
            )));
        }
        if self.valid_after >= self.valid_until && self.kind != TransferKind::PermitSingle {
            return Err(ScopeDenied::Transfer(format!(
                "{}: valid from {} is not before valid until {}",
                self.kind.name(),
                self.valid_after,
                self.valid_until
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCUMENTS: [&str; 5] = [
        "eip3009_transfer",
        "eip3009_receive",
        "eip2612_permit",
        "permit2_transfer_from",
        "permit2_single",
    ];

    fn vector_of(name: &str, lib: &str) -> Value {
        let path = format!(
            "{}/tests/data/eip712/stablecoin/{name}.{lib}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).expect("vector json")
    }

    fn vector(name: &str) -> Value {
        vector_of(name, "eth_account")
    }

    /// keyward's digest of each document is ethers v6's and eth-account's, and
    /// their signature recovers to their signer under it.
    #[test]
    fn digests_match_ethers_and_eth_account() {
        for name in DOCUMENTS {
            for lib in ["ethers", "eth_account"] {
                let v = vector_of(name, lib);
                let typed = TypedData::from_value(&v["typed_data"]).expect(name);
                let digest = typed.signing_hash();
                assert_eq!(
                    format!("0x{}", hex::encode(digest)),
                    v["digest"].as_str().expect("digest"),
                    "{name} {lib}"
                );
                let sig = hex::decode(v["signature"].as_str().expect("sig").trim_start_matches("0x")).expect("hex");
                let signer = crate::crypto::eth::recover_address(&digest, &sig).expect("recovers");
                assert_eq!(
                    signer.to_checksum(),
                    v["address"].as_str().expect("address"),
                    "{name} {lib}"
                );
            }
        }
    }

    const USDC_BASE: &str = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913";
    const SIGNER: &str = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266";
    const SPENDER: &str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";

    fn read(name: &str) -> (TypedData, Value) {
        let v = vector(name);
        let doc = v["typed_data"].clone();
        let typed = TypedData::from_value(&doc).expect("typed data");
        (typed, doc)
    }

    #[test]
    fn recognises_the_stablecoin_vectors() {
        let usdc = Asset::Erc20 {
            chain_id: 8453,
            token: Address::parse(USDC_BASE).expect("address"),
        };
        let signer = Address::parse(SIGNER).expect("address");
        let spender = Address::parse(SPENDER).expect("address");
        for (name, kind, amount, owner) in [
            (
                "eip3009_transfer",
                TransferKind::TransferWithAuthorization,
                2_500_000,
                Some(signer),
            ),
            (
                "eip3009_receive",
                TransferKind::ReceiveWithAuthorization,
                2_500_000,
                Some(signer),
            ),
            ("eip2612_permit", TransferKind::Permit, 1_000_000, Some(signer)),
            (
                "permit2_transfer_from",
                TransferKind::PermitTransferFrom,
                3_000_000,
                None,
            ),
            ("permit2_single", TransferKind::PermitSingle, 4_000_000, None),
        ] {
            let (typed, _) = read(name);
            let t = recognise(&typed).expect(name).expect(name);
            assert_eq!(t.kind, kind, "{name}");
            assert_eq!(t.asset, usdc, "{name}");
            assert_eq!(t.amount, amount, "{name}");
            assert_eq!(t.owner, owner, "{name}");
            assert_eq!(t.payee, spender, "{name}");
            assert_eq!(t.valid_until, BigUint::from(1_900_000_000u64), "{name}");
            assert!(t.check(&signer, 1_900_000_000).is_ok(), "{name}");
            // Outliving the session, or someone else's tokens, is refused.
            assert!(t.check(&signer, 1_899_999_999).is_err(), "{name}");
            if owner.is_some() {
                assert!(t.check(&spender, 1_900_000_000).is_err(), "{name}");
            }
        }
    }

    #[test]
    fn the_same_struct_elsewhere_or_altered_is_not_recognised() {
        // Permit2's structs under another contract.
        let (_, mut doc) = read("permit2_transfer_from");
        doc["domain"]["verifyingContract"] = Value::String(USDC_BASE.into());
        let typed = TypedData::from_value(&doc).expect("typed");
        assert_eq!(recognise(&typed), Ok(None));
        // A field renamed: another type.
        let (_, mut doc) = read("eip3009_transfer");
        doc["types"]["TransferWithAuthorization"][2]["name"] = Value::String("amount".into());
        let value = doc["message"]["value"].take();
        doc["message"]["amount"] = value;
        if let Some(m) = doc["message"].as_object_mut() {
            m.remove("value");
        }
        let typed = TypedData::from_value(&doc).expect("typed");
        assert_eq!(recognise(&typed), Ok(None));
    }

    #[test]
    fn a_value_above_128_bits_is_refused() {
        let (_, mut doc) = read("eip2612_permit");
        doc["message"]["value"] =
            Value::String("115792089237316195423570985008687907853269984665640564039457584007913129639935".into());
        let typed = TypedData::from_value(&doc).expect("typed");
        assert!(matches!(recognise(&typed), Err(ScopeDenied::TooLarge(_))));
    }
}
