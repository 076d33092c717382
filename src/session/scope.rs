//! The session scope grammar, parsed strictly when a challenge is created:
//!
//! ```text
//! payments:<min>-<max>                       per-call amount bounds, integer minor units (u128), min <= max,
//!                                            in any currency (sessions granted before assets were named)
//! payments:<currency>:<min>-<max>            the same, in one currency only (1-16 of [A-Z0-9])
//! payee:<address>                            a payee payments may go to (0x address); with one or more,
//!                                            payments go to those only
//! license:manifest:<sha256>                  64 lowercase hex digits
//! typed-data:<chainId>:<verifyingContract>   decimal chain id (u64), 0x address
//! attest:<dataset-id>                        1-128 of [A-Za-z0-9._:-]
//! ```
//!
//! Anything else is refused. Scopes only ever grant: an operation is allowed
//! when a scope of its kind covers it; with no scope of that kind it is not.

use std::fmt;

use crate::crypto::eth::Address;

/// Most scopes one session may carry.
pub const MAX_SCOPES: usize = 32;

/// One parsed scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Payments whose amount lies in `min..=max`, in `asset` (any currency when `None`).
    Payments {
        /// The currency the bounds are for; `None`: any (the form granted before assets).
        asset: Option<String>,
        /// Smallest amount per call.
        min: u128,
        /// Largest amount per call.
        max: u128,
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

impl Scope {
    /// Parses one scope string.
    pub fn parse(s: &str) -> Result<Scope, ScopeError> {
        let err = |reason| ScopeError {
            scope: s.chars().take(200).collect(),
            reason,
        };
        if let Some(rest) = s.strip_prefix("payments:") {
            let (asset, bounds) = match rest.split_once(':') {
                Some((asset, bounds)) => {
                    if !is_currency(asset) {
                        return Err(err("currency must be 1-16 of [A-Z0-9]"));
                    }
                    (Some(asset.to_string()), bounds)
                }
                None => (None, rest),
            };
            let (a, b) = bounds
                .split_once('-')
                .ok_or_else(|| err("expected payments:[<currency>:]<min>-<max>"))?;
            let min = parse_u128(a).ok_or_else(|| err("min is not a canonical unsigned integer"))?;
            let max = parse_u128(b).ok_or_else(|| err("max is not a canonical unsigned integer"))?;
            if min > max {
                return Err(err("min is greater than max"));
            }
            return Ok(Scope::Payments { asset, min, max });
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
            let (chain, contract) = rest
                .split_once(':')
                .ok_or_else(|| err("expected typed-data:<chainId>:<verifyingContract>"))?;
            let chain_id = parse_u128(chain)
                .and_then(|c| u64::try_from(c).ok())
                .ok_or_else(|| err("chainId is not a canonical u64"))?;
            let verifying_contract =
                Address::parse(contract).map_err(|_| err("verifyingContract is not an address"))?;
            return Ok(Scope::TypedData {
                chain_id,
                verifying_contract,
            });
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
            "unknown scope kind (payments, payee, license:manifest, typed-data, attest)",
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
            Scope::Payee(a) => write!(f, "payee:{}", a.to_checksum()),
            Scope::LicenseManifest(h) => write!(f, "license:manifest:{}", hex::encode(h)),
            Scope::TypedData {
                chain_id,
                verifying_contract,
            } => write!(f, "typed-data:{chain_id}:0x{}", hex::encode(verifying_contract.0)),
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
    /// The session's payments scopes name other currencies only.
    #[error("payments in {currency} are not granted: the session's payments scopes are {granted}")]
    Asset {
        /// The payment's currency.
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
}

impl Scopes {
    /// Parses every scope; refuses duplicates, an empty list and too many.
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
            if out.contains(&scope) {
                return Err(ScopeError {
                    scope: s.as_ref().to_string(),
                    reason: "duplicate scope",
                });
            }
            out.push(scope);
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

    /// Checks a payment of `amount` in `currency` to `payee` for `manifest`: a payments scope
    /// for that currency (or for any) must cover the amount, the payee must be one of the
    /// session's payee scopes if it has any, and a license scope must name the manifest.
    pub fn check_payment(
        &self,
        amount: u128,
        currency: &str,
        payee: &Address,
        manifest: &[u8; 32],
    ) -> Result<(), ScopeDenied> {
        let payments: Vec<&Scope> = self.0.iter().filter(|s| matches!(s, Scope::Payments { .. })).collect();
        let in_currency: Vec<&&Scope> = payments
            .iter()
            .filter(|s| matches!(s, Scope::Payments { asset, .. } if asset.as_deref().is_none_or(|a| a == currency)))
            .collect();
        if in_currency.is_empty() && !payments.is_empty() {
            return Err(ScopeDenied::Asset {
                currency: currency.to_string(),
                granted: payments.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            });
        }
        let amount_ok = in_currency
            .iter()
            .any(|s| matches!(s, Scope::Payments { min, max, .. } if (*min..=*max).contains(&amount)));
        if !amount_ok {
            return Err(ScopeDenied::Amount(amount));
        }
        let payees: Vec<&Scope> = self.0.iter().filter(|s| matches!(s, Scope::Payee(_))).collect();
        if !payees.is_empty() && !payees.iter().any(|s| matches!(s, Scope::Payee(p) if p == payee)) {
            return Err(ScopeDenied::Payee {
                payee: payee.to_checksum(),
                granted: payees.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            });
        }
        let manifest_ok = self
            .0
            .iter()
            .any(|s| matches!(s, Scope::LicenseManifest(h) if h == manifest));
        if !manifest_ok {
            return Err(ScopeDenied::Manifest(hex::encode(manifest)));
        }
        Ok(())
    }

    /// Checks an EIP-712 document's domain.
    pub fn check_typed_data(&self, chain_id: Option<&str>, contract: Option<&str>) -> Result<(), ScopeDenied> {
        let denied = || ScopeDenied::Domain {
            chain_id: chain_id.map(str::to_string),
            contract: contract.map(str::to_string),
        };
        let chain: u64 = chain_id.and_then(|c| c.parse().ok()).ok_or_else(denied)?;
        let addr = contract.and_then(|c| Address::parse(c).ok()).ok_or_else(denied)?;
        let ok = self.0.iter().any(|s| {
            matches!(s, Scope::TypedData { chain_id, verifying_contract } if *chain_id == chain && *verifying_contract == addr)
        });
        if ok {
            Ok(())
        } else {
            Err(denied())
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
        let scopes = Scopes::parse(&["typed-data:1:0xcccccccccccccccccccccccccccccccccccccccc"]).expect("valid");
        assert!(scopes
            .check_typed_data(Some("1"), Some("0xcccccccccccccccccccccccccccccccccccccccc"))
            .is_ok());
        assert!(scopes
            .check_typed_data(Some("5"), Some("0xcccccccccccccccccccccccccccccccccccccccc"))
            .is_err());
        assert!(scopes
            .check_typed_data(Some("1"), Some("0xdddddddddddddddddddddddddddddddddddddddd"))
            .is_err());
        assert!(scopes.check_typed_data(None, None).is_err());
    }
}
