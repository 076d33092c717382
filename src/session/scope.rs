//! The session scope grammar, parsed strictly when a challenge is created:
//!
//! ```text
//! payments:<min>-<max>                       per-call amount bounds, integer minor units (u128), min <= max,
//!                                            in any off-chain currency (sessions granted before assets)
//! payments:<asset>:<min>-<max>               the same, in one asset only
//! cap:<asset>:<amount>                       the most all spends in <asset> may add up to; spends in an
//!                                            asset without its own cap count against the session's cap
//! payee:<address>                            a payee payments may go to (0x address); with one or more,
//!                                            payments, transfers and allowances go to those only
//! license:manifest:<sha256>                  64 lowercase hex digits
//! typed-data:<chainId>:<verifyingContract>   EIP-712 documents of that domain that move value in a way
//!                                            keyward recognises (EIP-3009, EIP-2612, Permit2), each
//!                                            bounded by its asset's payments scope and counted
//!                                            against its cap
//! typed-data:<chainId>:<verifyingContract>:unbounded
//!                                            any document of that domain (recognised ones still
//!                                            bounded and counted)
//! tx:<chainId>:<to>[:<selector>]             transactions to <to> on that chain (calling that function
//!                                            only: 0x and 8 lower-case hex digits); their value is a
//!                                            spend of the chain's native asset, an ERC-20 transfer or
//!                                            approve to a token of a payments scope one of that token
//! attest:<dataset-id>                        1-128 of [A-Za-z0-9._:-]
//!
//! <asset>   <CURRENCY>                       an off-chain currency: 1-16 of [A-Z0-9] (SignPayment)
//!           eip155:<chainId>/erc20:<address> an ERC-20 token on an EVM chain (CAIP-19)
//!           eip155:<chainId>/slip44:60       the chain's native asset (ether), in wei
//! ```
//!
//! Anything else is refused. Scopes only ever grant: an operation is allowed
//! when a scope of its kind covers it; with no scope of that kind it is not.
//! Sessions opened before assets and the `:unbounded` marker existed (scope
//! grammar 1) read a plain typed-data scope as unbounded, as it was granted.

use std::fmt;

use crate::crypto::eth::Address;

/// Most scopes one session may carry.
pub const MAX_SCOPES: usize = 32;

/// The scope grammar of sessions opened from this version on: a plain
/// typed-data scope signs recognised transfers only. Grammar 1 (sessions
/// opened before) reads it as unbounded.
pub const SCOPE_GRAMMAR: u8 = 2;

/// What a spend moves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Asset {
    /// Off-chain credit in a currency (keyward's `Payment` voucher).
    Currency(String),
    /// An ERC-20 token.
    Erc20 {
        /// EIP-155 chain id.
        chain_id: u64,
        /// The token contract.
        token: Address,
    },
    /// A chain's native asset (ether on Ethereum), in wei.
    Native {
        /// EIP-155 chain id.
        chain_id: u64,
    },
}

impl Asset {
    /// Parses `<CURRENCY>` or `eip155:<chainId>/erc20:<address>`.
    pub fn parse(s: &str) -> Option<Asset> {
        if let Some(rest) = s.strip_prefix("eip155:") {
            let (chain, asset) = rest.split_once('/')?;
            let chain_id = parse_u128(chain).and_then(|c| u64::try_from(c).ok())?;
            if chain_id == 0 {
                return None;
            }
            if asset == "slip44:60" {
                return Some(Asset::Native { chain_id });
            }
            let token = Address::parse(asset.strip_prefix("erc20:")?).ok()?;
            // No token lives at the zero address; a grant shows the native asset there.
            if token.0 == [0; 20] {
                return None;
            }
            return Some(Asset::Erc20 { chain_id, token });
        }
        is_currency(s).then(|| Asset::Currency(s.to_string()))
    }
}

impl fmt::Display for Asset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Asset::Currency(c) => f.write_str(c),
            Asset::Erc20 { chain_id, token } => write!(f, "eip155:{chain_id}/erc20:0x{}", hex::encode(token.0)),
            Asset::Native { chain_id } => write!(f, "eip155:{chain_id}/slip44:60"),
        }
    }
}

/// One parsed scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Spends whose amount lies in `min..=max`, in `asset` (any currency when `None`).
    Payments {
        /// The asset the bounds are for; `None`: any off-chain currency (the form granted before assets).
        asset: Option<Asset>,
        /// Smallest amount per call.
        min: u128,
        /// Largest amount per call.
        max: u128,
    },
    /// The most all spends in one asset may add up to.
    Cap {
        /// The asset.
        asset: Asset,
        /// The cap, in its minor units.
        amount: u128,
    },
    /// A payee payments may go to.
    Payee(Address),
    /// Licenses of one dataset manifest (its SHA-256).
    LicenseManifest([u8; 32]),
    /// EIP-712 documents of one domain.
    TypedData {
        /// The domain's chainId.
        chain_id: u64,
        /// The domain's verifyingContract.
        verifying_contract: Address,
        /// Any document of the domain, not only recognised transfers.
        unbounded: bool,
    },
    /// Transactions to one address.
    Tx {
        /// The chain.
        chain_id: u64,
        /// The recipient or contract called.
        to: Address,
        /// The only function it may call; `None`: any call, or none.
        selector: Option<[u8; 4]>,
    },
    /// Attestations about one dataset.
    Attest(String),
}

/// A scope string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scope {scope:?}: {reason}")]
pub struct ScopeError {
    /// The scope as given.
    pub scope: String,
    /// Why it is refused.
    pub reason: &'static str,
}

/// A currency code: 1-16 of [A-Z0-9] (what `SignPayment` accepts).
fn is_currency(s: &str) -> bool {
    !s.is_empty() && s.len() <= 16 && s.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

fn parse_u128(s: &str) -> Option<u128> {
    if s.is_empty() || s.len() > 39 || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

const ASSET_FORMS: &str = "asset must be a currency (1-16 of [A-Z0-9]), eip155:<chainId>/erc20:<address> \
     or eip155:<chainId>/slip44:60";

impl Scope {
    /// Parses one scope string.
    pub fn parse(s: &str) -> Result<Scope, ScopeError> {
        let err = |reason| ScopeError {
            scope: s.chars().take(200).collect(),
            reason,
        };
        if let Some(rest) = s.strip_prefix("payments:") {
            // The bounds are the last part: an asset may itself hold ':'.
            let (asset, bounds) = match rest.rsplit_once(':') {
                Some((asset, bounds)) => (Some(Asset::parse(asset).ok_or_else(|| err(ASSET_FORMS))?), bounds),
                None => (None, rest),
            };
            let (a, b) = bounds
                .split_once('-')
                .ok_or_else(|| err("expected payments:[<asset>:]<min>-<max>"))?;
            let min = parse_u128(a).ok_or_else(|| err("min is not a canonical unsigned integer"))?;
            let max = parse_u128(b).ok_or_else(|| err("max is not a canonical unsigned integer"))?;
            if min > max {
                return Err(err("min is greater than max"));
            }
            return Ok(Scope::Payments { asset, min, max });
        }
        if let Some(rest) = s.strip_prefix("cap:") {
            let (asset, amount) = rest
                .rsplit_once(':')
                .ok_or_else(|| err("expected cap:<asset>:<amount>"))?;
            let asset = Asset::parse(asset).ok_or_else(|| err(ASSET_FORMS))?;
            let amount = parse_u128(amount).ok_or_else(|| err("amount is not a canonical unsigned integer"))?;
            return Ok(Scope::Cap { asset, amount });
        }
        if let Some(rest) = s.strip_prefix("payee:") {
            let payee = Address::parse(rest).map_err(|_| err("expected payee:<0x address>"))?;
            return Ok(Scope::Payee(payee));
        }
        if let Some(rest) = s.strip_prefix("license:manifest:") {
            if rest.len() != 64 || !rest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                return Err(err("expected 64 lowercase hex digits (sha256)"));
            }
            let mut h = [0u8; 32];
            hex::decode_to_slice(rest, &mut h).map_err(|_| err("not hex"))?;
            return Ok(Scope::LicenseManifest(h));
        }
        if let Some(rest) = s.strip_prefix("typed-data:") {
            let (rest, unbounded) = match rest.strip_suffix(":unbounded") {
                Some(r) => (r, true),
                None => (rest, false),
            };
            let (chain, contract) = rest
                .split_once(':')
                .ok_or_else(|| err("expected typed-data:<chainId>:<verifyingContract>[:unbounded]"))?;
            let chain_id = parse_u128(chain)
                .and_then(|c| u64::try_from(c).ok())
                .ok_or_else(|| err("chainId is not a canonical u64"))?;
            let verifying_contract =
                Address::parse(contract).map_err(|_| err("verifyingContract is not an address"))?;
            return Ok(Scope::TypedData {
                chain_id,
                verifying_contract,
                unbounded,
            });
        }
        if let Some(rest) = s.strip_prefix("tx:") {
            let mut parts = rest.split(':');
            let (Some(chain), Some(to), selector, None) = (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(err("expected tx:<chainId>:<to>[:<selector>]"));
            };
            let chain_id = parse_u128(chain)
                .and_then(|c| u64::try_from(c).ok())
                .filter(|c| *c != 0)
                .ok_or_else(|| err("chainId is not a canonical u64 above 0"))?;
            let to = Address::parse(to).map_err(|_| err("to is not an address"))?;
            let selector = match selector {
                None => None,
                Some(sel) => {
                    let digits = sel
                        .strip_prefix("0x")
                        .filter(|d| d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
                        .ok_or_else(|| err("selector must be 0x and 8 lower-case hex digits"))?;
                    let mut out = [0u8; 4];
                    hex::decode_to_slice(digits, &mut out).map_err(|_| err("selector is not hex"))?;
                    Some(out)
                }
            };
            return Ok(Scope::Tx { chain_id, to, selector });
        }
        if let Some(rest) = s.strip_prefix("attest:") {
            if rest.is_empty()
                || rest.len() > 128
                || !rest
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
            {
                return Err(err("dataset id must be 1-128 of [A-Za-z0-9._:-]"));
            }
            return Ok(Scope::Attest(rest.to_string()));
        }
        Err(err(
            "unknown scope kind (payments, cap, payee, license:manifest, typed-data, tx, attest)",
        ))
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Payments { asset: None, min, max } => write!(f, "payments:{min}-{max}"),
            Scope::Payments {
                asset: Some(asset),
                min,
                max,
            } => write!(f, "payments:{asset}:{min}-{max}"),
            Scope::Cap { asset, amount } => write!(f, "cap:{asset}:{amount}"),
            Scope::Payee(a) => write!(f, "payee:{}", a.to_checksum()),
            Scope::LicenseManifest(h) => write!(f, "license:manifest:{}", hex::encode(h)),
            Scope::TypedData {
                chain_id,
                verifying_contract,
                unbounded,
            } => write!(
                f,
                "typed-data:{chain_id}:0x{}{}",
                hex::encode(verifying_contract.0),
                if *unbounded { ":unbounded" } else { "" }
            ),
            Scope::Tx { chain_id, to, selector } => {
                write!(f, "tx:{chain_id}:0x{}", hex::encode(to.0))?;
                match selector {
                    Some(s) => write!(f, ":0x{}", hex::encode(s)),
                    None => Ok(()),
                }
            }
            Scope::Attest(d) => write!(f, "attest:{d}"),
        }
    }
}

/// A session's scopes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scopes(Vec<Scope>);

/// What a scope check refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScopeDenied {
    /// No payments scope covers the amount.
    #[error("amount {0} is outside every payments scope of the session")]
    Amount(u128),
    /// An amount above what any scope can grant (more than 128 bits).
    #[error("amount {0} is above every payments scope of the session")]
    TooLarge(String),
    /// The session's payments scopes name other assets only.
    #[error("spends in {currency} are not granted: the session's payments scopes are {granted}")]
    Asset {
        /// The spend's asset (a currency, or `eip155:<chainId>/erc20:<address>`).
        currency: String,
        /// The session's payments scopes.
        granted: String,
    },
    /// The session names its payees, and not this one.
    #[error("payee {payee} is not one of the session's payee scopes ({granted})")]
    Payee {
        /// The payment's payee.
        payee: String,
        /// The session's payee scopes.
        granted: String,
    },
    /// No license scope names the manifest.
    #[error("manifest {0} is not covered by a license:manifest scope of the session")]
    Manifest(String),
    /// No typed-data scope names the domain.
    #[error(
        "EIP-712 domain (chainId {chain_id:?}, verifyingContract {contract:?}) is not covered by a typed-data scope"
    )]
    Domain {
        /// The document's chainId.
        chain_id: Option<String>,
        /// The document's verifyingContract.
        contract: Option<String>,
    },
    /// The domain's scope covers recognised transfers only, and this document is not one.
    #[error(
        "{primary_type} is not a transfer keyward recognises (EIP-3009, EIP-2612, Permit2); \
         the scope {scope} signs those only (typed-data:<chainId>:<verifyingContract>:unbounded signs any)"
    )]
    Unbounded {
        /// The document's primaryType.
        primary_type: String,
        /// The scope that named the domain.
        scope: String,
    },
    /// A recognised transfer that is not the account's own, or outlives the session.
    #[error("{0}")]
    Transfer(String),
    /// No tx scope names the transaction's chain, recipient and function.
    #[error("a transaction on chain {chain_id} to {to} calling {selector} is not covered by a tx scope")]
    Tx {
        /// The chain.
        chain_id: u64,
        /// The recipient or contract.
        to: String,
        /// The function's selector, or "no function".
        selector: String,
    },
}

impl Scopes {
    /// Parses every scope; refuses duplicates, an empty list, too many, a
    /// cap for an asset no payments scope names, two caps for one asset and
    /// two typed-data scopes for one domain.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Scopes, ScopeError> {
        if items.is_empty() {
            return Err(ScopeError {
                scope: String::new(),
                reason: "at least one scope is required",
            });
        }
        if items.len() > MAX_SCOPES {
            return Err(ScopeError {
                scope: String::new(),
                reason: "too many scopes (at most 32)",
            });
        }
        let mut out: Vec<Scope> = Vec::with_capacity(items.len());
        for s in items {
            let scope = Scope::parse(s.as_ref())?;
            let refuse = |reason| {
                Err(ScopeError {
                    scope: s.as_ref().to_string(),
                    reason,
                })
            };
            if out.contains(&scope) {
                return refuse("duplicate scope");
            }
            match &scope {
                Scope::Cap { asset, .. }
                    if out
                        .iter()
                        .any(|o| matches!(o, Scope::Cap { asset: a, .. } if a == asset)) =>
                {
                    return refuse("a second cap for the same asset");
                }
                Scope::TypedData {
                    chain_id,
                    verifying_contract,
                    ..
                } if out.iter().any(|o| {
                    matches!(o, Scope::TypedData { chain_id: c, verifying_contract: v, .. }
                        if c == chain_id && v == verifying_contract)
                }) =>
                {
                    return refuse("a second typed-data scope for the same domain");
                }
                _ => {}
            }
            out.push(scope);
        }
        for (scope, s) in out.iter().zip(items) {
            if let Scope::Cap { asset, .. } = scope {
                if !out
                    .iter()
                    .any(|o| matches!(o, Scope::Payments { asset: Some(a), .. } if a == asset))
                {
                    return Err(ScopeError {
                        scope: s.as_ref().to_string(),
                        reason: "a cap for an asset no payments:<asset>:<min>-<max> scope names",
                    });
                }
            }
        }
        Ok(Scopes(out))
    }

    /// Canonical strings, in the order given.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }

    /// The scopes.
    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }

    /// The asset's own cap, if a `cap:` scope names it; spends in an asset
    /// without one count against the session's cap.
    pub fn cap_for(&self, asset: &Asset) -> Option<u128> {
        self.0.iter().find_map(|s| match s {
            Scope::Cap { asset: a, amount } if a == asset => Some(*amount),
            _ => None,
        })
    }

    /// Checks a spend of `amount` in `asset` to `payee`: a payments scope for
    /// that asset (or, for a currency, one for any) must cover the amount, and
    /// the payee must be one of the session's payee scopes if it has any.
    pub fn check_spend(&self, asset: &Asset, amount: u128, payee: &Address) -> Result<(), ScopeDenied> {
        self.check_amount(asset, amount)?;
        self.check_payee(payee)
    }

    /// Checks that a payments scope for `asset` (or, for a currency, one for
    /// any) covers `amount`.
    pub fn check_amount(&self, asset: &Asset, amount: u128) -> Result<(), ScopeDenied> {
        let payments: Vec<&Scope> = self.0.iter().filter(|s| matches!(s, Scope::Payments { .. })).collect();
        let covering: Vec<&&Scope> = payments
            .iter()
            .filter(|s| match s {
                Scope::Payments { asset: Some(a), .. } => a == asset,
                // The form granted before assets: any off-chain currency, never a token.
                Scope::Payments { asset: None, .. } => matches!(asset, Asset::Currency(_)),
                _ => false,
            })
            .collect();
        if covering.is_empty() {
            return Err(ScopeDenied::Asset {
                currency: asset.to_string(),
                granted: if payments.is_empty() {
                    "none".to_string()
                } else {
                    payments.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                },
            });
        }
        let amount_ok = covering
            .iter()
            .any(|s| matches!(s, Scope::Payments { min, max, .. } if (*min..=*max).contains(&amount)));
        if !amount_ok {
            return Err(ScopeDenied::Amount(amount));
        }
        Ok(())
    }

    /// Checks that `payee` is one of the session's payee scopes, if it has any.
    pub fn check_payee(&self, payee: &Address) -> Result<(), ScopeDenied> {
        let payees: Vec<&Scope> = self.0.iter().filter(|s| matches!(s, Scope::Payee(_))).collect();
        if !payees.is_empty() && !payees.iter().any(|s| matches!(s, Scope::Payee(p) if p == payee)) {
            return Err(ScopeDenied::Payee {
                payee: payee.to_checksum(),
                granted: payees.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            });
        }
        Ok(())
    }

    /// Checks a payment of `amount` in `currency` to `payee` for `manifest`:
    /// [`Scopes::check_spend`], and a license scope must name the manifest.
    pub fn check_payment(
        &self,
        amount: u128,
        currency: &str,
        payee: &Address,
        manifest: &[u8; 32],
    ) -> Result<(), ScopeDenied> {
        self.check_spend(&Asset::Currency(currency.to_string()), amount, payee)?;
        let manifest_ok = self
            .0
            .iter()
            .any(|s| matches!(s, Scope::LicenseManifest(h) if h == manifest));
        if !manifest_ok {
            return Err(ScopeDenied::Manifest(hex::encode(manifest)));
        }
        Ok(())
    }

    /// Checks a transaction: a tx scope must name its chain and recipient,
    /// and its function if the scope names one.
    pub fn check_tx(&self, chain: u64, recipient: &Address, function: Option<[u8; 4]>) -> Result<(), ScopeDenied> {
        let ok = self.0.iter().any(|s| {
            matches!(s, Scope::Tx { chain_id, to, selector }
                if *chain_id == chain && to == recipient && selector.is_none_or(|sel| Some(sel) == function))
        });
        if ok {
            return Ok(());
        }
        Err(ScopeDenied::Tx {
            chain_id: chain,
            to: recipient.to_checksum(),
            selector: function.map_or_else(|| "no function".to_string(), |f| format!("0x{}", hex::encode(f))),
        })
    }

    /// Checks an EIP-712 document's domain: a typed-data scope must name it.
    /// A document keyward does not recognise as a transfer (`recognised`
    /// false) also needs the scope to be unbounded, or the session to be of
    /// scope grammar 1. The primary type names the document in the refusal.
    pub fn check_typed_data(
        &self,
        chain_id: Option<&str>,
        contract: Option<&str>,
        primary_type: &str,
        recognised: bool,
        grammar: u8,
    ) -> Result<(), ScopeDenied> {
        let denied = || ScopeDenied::Domain {
            chain_id: chain_id.map(str::to_string),
            contract: contract.map(str::to_string),
        };
        let chain: u64 = chain_id.and_then(|c| c.parse().ok()).ok_or_else(denied)?;
        let addr = contract.and_then(|c| Address::parse(c).ok()).ok_or_else(denied)?;
        let scope = self
            .0
            .iter()
            .find(|s| matches!(s, Scope::TypedData { chain_id, verifying_contract, .. } if *chain_id == chain && *verifying_contract == addr))
            .ok_or_else(denied)?;
        let unbounded = matches!(scope, Scope::TypedData { unbounded: true, .. }) || grammar < SCOPE_GRAMMAR;
        if recognised || unbounded {
            Ok(())
        } else {
            Err(ScopeDenied::Unbounded {
                primary_type: primary_type.chars().take(100).collect(),
                scope: scope.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn parses_and_prints_canonically() {
        for s in [
            "payments:0-100",
            "payments:340282366920938463463374607431768211455-340282366920938463463374607431768211455",
            &format!("license:manifest:{M}"),
            "typed-data:1:0xcccccccccccccccccccccccccccccccccccccccc",
            "attest:dataset-42.v1",
            "payments:USDC:0-100",
            "payments:EUR2:5-5",
            "payee:0x73d4EC5c27326aef6a683a42755e954A1F168D5f",
        ] {
            assert_eq!(Scope::parse(s).expect(s).to_string(), s);
        }
        // Checksummed contract addresses are accepted and printed lower-case.
        let s = Scope::parse("typed-data:1:0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC").expect("checksummed");
        assert_eq!(s.to_string(), "typed-data:1:0xcccccccccccccccccccccccccccccccccccccccc");
    }

    #[test]
    fn refuses_malformed() {
        for s in [
            "",
            "payments",
            "payments:100-0",
            "payments:-1-5",
            "payments:01-5",
            "payments:0-340282366920938463463374607431768211456",
            "payments:0-1e3",
            "payments:0 -1",
            "license:manifest:abc",
            &format!("license:manifest:{}", M.to_uppercase()),
            "license:manifest:zz86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "typed-data:1",
            "typed-data:x:0xcccccccccccccccccccccccccccccccccccccccc",
            "typed-data:1:0x1234",
            "typed-data:18446744073709551616:0xcccccccccccccccccccccccccccccccccccccccc",
            "attest:",
            "attest:a b",
            "admin:*",
            "PAYMENTS:0-1",
            "payments:usdc:0-1",
            "payments::0-1",
            "payments:USDC:",
            "payments:USDC:1-0",
            "payments:ABCDEFGHIJKLMNOPQ:0-1",
            "payments:US-DC:0-1",
            "payee:",
            "payee:0x1234",
            "payee:vitalik.eth",
        ] {
            assert!(Scope::parse(s).is_err(), "{s:?} must be refused");
        }
        assert!(Scopes::parse::<&str>(&[]).is_err());
        assert!(Scopes::parse(&["payments:0-1", "payments:0-1"]).is_err());
        let many: Vec<String> = (0..33).map(|i| format!("payments:0-{i}")).collect();
        assert!(Scopes::parse(&many).is_err());
    }

    #[test]
    fn payment_checks() {
        let scopes = Scopes::parse(&["payments:0-100".to_string(), format!("license:manifest:{M}")]).expect("valid");
        let mut m = [0u8; 32];
        hex::decode_to_slice(M, &mut m).expect("hex");
        let anyone = Address([0x22; 20]);
        assert!(scopes.check_payment(0, "USDC", &anyone, &m).is_ok());
        assert!(
            scopes.check_payment(100, "EUR", &anyone, &m).is_ok(),
            "no currency named: any"
        );
        assert_eq!(
            scopes.check_payment(101, "USDC", &anyone, &m),
            Err(ScopeDenied::Amount(101))
        );
        assert!(matches!(
            scopes.check_payment(5, "USDC", &anyone, &[0u8; 32]),
            Err(ScopeDenied::Manifest(_))
        ));
        // No manifest scope at all: payments are not covered.
        let no_manifest = Scopes::parse(&["payments:0-100"]).expect("valid");
        assert!(no_manifest.check_payment(5, "USDC", &anyone, &m).is_err());
    }

    #[test]
    fn currency_and_payee_checks() {
        let payee = Address([0x22; 20]);
        let scopes = Scopes::parse(&[
            "payments:USDC:0-100".to_string(),
            "payments:EUR:10-20".to_string(),
            format!("payee:0x{}", hex::encode(payee.0)),
            format!("license:manifest:{M}"),
        ])
        .expect("valid");
        let mut m = [0u8; 32];
        hex::decode_to_slice(M, &mut m).expect("hex");
        assert!(scopes.check_payment(100, "USDC", &payee, &m).is_ok());
        assert!(scopes.check_payment(15, "EUR", &payee, &m).is_ok());
        // Each currency has its own bounds.
        assert_eq!(
            scopes.check_payment(50, "EUR", &payee, &m),
            Err(ScopeDenied::Amount(50))
        );
        // A currency the grant does not name, whatever the amount.
        let denied = scopes.check_payment(1, "USDT", &payee, &m).expect_err("other currency");
        assert!(
            matches!(&denied, ScopeDenied::Asset { currency, .. } if currency == "USDT"),
            "{denied}"
        );
        assert!(denied.to_string().contains("payments:USDC:0-100"), "{denied}");
        // A payee the grant does not name; the zero address (no payee given) too.
        for other in [Address([0x33; 20]), Address([0; 20])] {
            let denied = scopes.check_payment(1, "USDC", &other, &m).expect_err("other payee");
            assert!(matches!(denied, ScopeDenied::Payee { .. }), "{denied}");
        }
    }

    #[test]
    fn typed_data_checks() {
        let c = "0xcccccccccccccccccccccccccccccccccccccccc";
        let scopes = Scopes::parse(&[format!("typed-data:1:{c}")]).expect("valid");
        let check = |chain, contract, recognised, grammar| {
            scopes.check_typed_data(chain, contract, "Order", recognised, grammar)
        };
        assert!(check(Some("1"), Some(c), true, SCOPE_GRAMMAR).is_ok());
        // Not a recognised transfer: refused under a plain scope, naming the marker.
        let denied = check(Some("1"), Some(c), false, SCOPE_GRAMMAR).expect_err("bounded");
        assert!(matches!(denied, ScopeDenied::Unbounded { .. }), "{denied}");
        assert!(denied.to_string().contains(":unbounded"), "{denied}");
        // Sessions opened before the marker existed keep what they were granted.
        assert!(check(Some("1"), Some(c), false, 1).is_ok());
        assert!(check(Some("5"), Some(c), true, SCOPE_GRAMMAR).is_err());
        assert!(check(Some("1"), Some("0xdddddddddddddddddddddddddddddddddddddddd"), true, 1).is_err());
        assert!(check(None, None, true, 1).is_err());
        let unbounded = Scopes::parse(&[format!("typed-data:1:{c}:unbounded")]).expect("valid");
        assert!(unbounded
            .check_typed_data(Some("1"), Some(c), "Order", false, SCOPE_GRAMMAR)
            .is_ok());
    }

    const USDC: &str = "eip155:8453/erc20:0x833589fcd6edb6e08f4c7c32d4f71b54bda02913";

    #[test]
    fn assets_parse_strictly_and_print_canonically() {
        for s in [
            format!("payments:{USDC}:1-5000000"),
            format!("cap:{USDC}:10000000"),
            "cap:EUR:500".to_string(),
            "typed-data:8453:0x833589fcd6edb6e08f4c7c32d4f71b54bda02913:unbounded".to_string(),
        ] {
            assert_eq!(Scope::parse(&s).expect(&s).to_string(), s);
        }
        // A checksummed token prints lower-case, as typed-data scopes do.
        let s = Scope::parse("payments:eip155:8453/erc20:0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913:0-1").expect("ok");
        assert_eq!(s.to_string(), format!("payments:{USDC}:0-1"));
        for s in [
            "payments:eip155:0/erc20:0x833589fcd6edb6e08f4c7c32d4f71b54bda02913:0-1",
            "payments:eip155:8453/erc20:0x1234:0-1",
            "payments:eip155:8453/erc721:0x833589fcd6edb6e08f4c7c32d4f71b54bda02913:0-1",
            "payments:eip155:08453/erc20:0x833589fcd6edb6e08f4c7c32d4f71b54bda02913:0-1",
            "payments:eip155:8453:0-1",
            "cap:USDC",
            "cap:USDC:-1",
            "cap:usdc:5",
            "cap::5",
            "typed-data:1:0xcccccccccccccccccccccccccccccccccccccccc:Unbounded",
            "typed-data:1:0xcccccccccccccccccccccccccccccccccccccccc:",
        ] {
            assert!(Scope::parse(s).is_err(), "{s:?} must be refused");
        }
        // A cap needs a payments scope for its asset, and one cap per asset, one scope per domain.
        assert!(Scopes::parse(&["payments:EUR:0-5", "cap:USDC:10"]).is_err());
        assert!(
            Scopes::parse(&["payments:0-5", "cap:USDC:10"]).is_err(),
            "the any-currency form names no asset"
        );
        assert!(Scopes::parse(&["payments:USDC:0-5", "cap:USDC:10", "cap:USDC:11"]).is_err());
        let c = "0xcccccccccccccccccccccccccccccccccccccccc";
        assert!(Scopes::parse(&[format!("typed-data:1:{c}"), format!("typed-data:1:{c}:unbounded")]).is_err());
        let ok = Scopes::parse(&["payments:USDC:0-5", "cap:USDC:10"]).expect("valid");
        assert_eq!(ok.cap_for(&Asset::Currency("USDC".into())), Some(10));
        assert_eq!(ok.cap_for(&Asset::Currency("EUR".into())), None);
    }

    #[test]
    fn spends_in_tokens_need_their_own_scope() {
        let usdc = Asset::parse("eip155:8453/erc20:0x833589fcd6edb6e08f4c7c32d4f71b54bda02913").expect("asset");
        let payee = Address([0x22; 20]);
        // The form granted before assets covers off-chain currencies, never a token.
        let legacy = Scopes::parse(&["payments:0-100"]).expect("valid");
        assert!(legacy.check_spend(&Asset::Currency("EUR".into()), 5, &payee).is_ok());
        let denied = legacy.check_spend(&usdc, 5, &payee).expect_err("token");
        assert!(denied.to_string().contains(USDC), "{denied}");
        let scopes = Scopes::parse(&[
            format!("payments:{USDC}:1-5000000"),
            format!("payee:0x{}", hex::encode(payee.0)),
        ])
        .expect("valid");
        assert!(scopes.check_spend(&usdc, 5_000_000, &payee).is_ok());
        assert_eq!(
            scopes.check_spend(&usdc, 5_000_001, &payee),
            Err(ScopeDenied::Amount(5_000_001))
        );
        assert!(matches!(
            scopes.check_spend(&usdc, 5, &Address([0x33; 20])),
            Err(ScopeDenied::Payee { .. })
        ));
        let other_chain = Asset::parse("eip155:1/erc20:0x833589fcd6edb6e08f4c7c32d4f71b54bda02913").expect("asset");
        assert!(matches!(
            scopes.check_spend(&other_chain, 5, &payee),
            Err(ScopeDenied::Asset { .. })
        ));
    }
}
