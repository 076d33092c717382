//! `limits.toml`: token-bucket rate limits per client or per account, daily
//! spend caps per account and currency, and session limits. Applied after the
//! Cedar policies allowed a request; the counters live in the store.

use std::path::Path;

use serde::Deserialize;

use super::{Action, PolicyError};
use crate::store::limits::Bucket;

/// The limits file's name in a policy folder.
pub const LIMITS_FILE: &str = "limits.toml";

/// What a bucket is kept per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    /// One bucket per client identity.
    Identity,
    /// One bucket per account (requests about no account are not counted).
    Account,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateSpec {
    name: String,
    per: Per,
    #[serde(default)]
    actions: Vec<String>,
    capacity: u64,
    refill_per_second: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DailySpendSpec {
    name: String,
    currency: String,
    cap: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionSpec {
    max_ttl_seconds: Option<u64>,
    max_cap: Option<String>,
    #[serde(default)]
    max_asset_cap: std::collections::BTreeMap<String, String>,
    max_open_per_account: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    #[serde(default)]
    rate: Vec<RateSpec>,
    #[serde(default)]
    daily_spend: Vec<DailySpendSpec>,
    #[serde(default)]
    sessions: SessionSpec,
}

/// One token-bucket rate limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// Its name (in refusals and metrics).
    pub name: String,
    /// Kept per client or per account.
    pub per: Per,
    /// The actions it counts (empty: all).
    pub actions: Vec<Action>,
    /// The bucket.
    pub bucket: Bucket,
}

/// One daily spend cap (UTC days), per account, on what sessions spend in one
/// asset: payments in a currency, or a token's recognised transfers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailySpend {
    /// Its name.
    pub name: String,
    /// The asset it caps (a currency code or `eip155:<chainId>/erc20:<address>`).
    pub currency: String,
    /// Minor units per account per day.
    pub cap: u128,
}

/// Session limits, checked when a challenge is created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionLimits {
    /// Longest session a challenge may ask for.
    pub max_ttl_seconds: Option<u64>,
    /// Largest cap a challenge may ask for.
    pub max_cap: Option<u128>,
    /// Largest `cap:<asset>:` an asset may be given, by canonical asset
    /// (`max_cap` for an asset not named here).
    pub max_asset_cap: Vec<(String, u128)>,
    /// Most sessions open (not revoked, not expired) per account.
    pub max_open_per_account: Option<u64>,
}

/// The parsed limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Rate limits.
    pub rates: Vec<RateLimit>,
    /// Daily spend caps.
    pub daily_spend: Vec<DailySpend>,
    /// Session limits.
    pub sessions: SessionLimits,
}

fn invalid(path: &Path, reason: String) -> PolicyError {
    PolicyError::Invalid {
        path: path.to_path_buf(),
        reason,
    }
}

fn amount(path: &Path, what: &str, s: &str) -> Result<u128, PolicyError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(path, format!("{what}: {s:?} is not a decimal amount")));
    }
    s.parse()
        .map_err(|_| invalid(path, format!("{what}: {s:?} does not fit in u128")))
}

impl Limits {
    /// Parses `limits.toml` text.
    pub fn parse(path: &Path, text: &str) -> Result<Limits, PolicyError> {
        let file: LimitsFile = toml::from_str(text).map_err(|e| invalid(path, e.to_string()))?;
        let mut names = std::collections::HashSet::new();
        let mut unique = |name: &str| {
            if name.is_empty() || name.chars().any(|c| c.is_control() || c == ':') || !names.insert(name.to_string()) {
                Err(invalid(
                    path,
                    format!("limit name {name:?} is empty, has ':' or is used twice"),
                ))
            } else {
                Ok(())
            }
        };
        let mut rates = Vec::new();
        for r in file.rate {
            unique(&r.name)?;
            if r.capacity == 0 || !(r.refill_per_second.is_finite() && r.refill_per_second >= 0.001) {
                return Err(invalid(
                    path,
                    format!(
                        "rate {}: capacity must be at least 1 and refill_per_second at least 0.001",
                        r.name
                    ),
                ));
            }
            let mut actions = Vec::new();
            for a in &r.actions {
                let matched = Action::ALL
                    .into_iter()
                    .filter(|x| x.name() == a || x.group() == Some(a.as_str()))
                    .collect::<Vec<_>>();
                if matched.is_empty() {
                    return Err(invalid(path, format!("rate {}: unknown action or group {a:?}", r.name)));
                }
                actions.extend(matched);
            }
            rates.push(RateLimit {
                name: r.name,
                per: r.per,
                actions,
                bucket: Bucket {
                    capacity: r.capacity,
                    // Saturating float to integer conversion, at least 1 (checked above).
                    refill_milli_per_second: (r.refill_per_second * 1000.0).round() as u64,
                },
            });
        }
        let mut daily_spend = Vec::new();
        for d in file.daily_spend {
            unique(&d.name)?;
            // The asset's canonical form, as spends name it (token addresses lower-case).
            let currency = crate::session::Asset::parse(&d.currency)
                .ok_or_else(|| {
                    invalid(
                        path,
                        format!(
                            "daily_spend {}: currency {:?} is neither a currency code (1-16 of [A-Z0-9]) \
                             nor eip155:<chainId>/erc20:<address>",
                            d.name, d.currency
                        ),
                    )
                })?
                .to_string();
            daily_spend.push(DailySpend {
                cap: amount(path, &format!("daily_spend {}", d.name), &d.cap)?,
                name: d.name,
                currency,
            });
        }
        let s = file.sessions;
        let sessions = SessionLimits {
            max_ttl_seconds: s.max_ttl_seconds,
            max_cap: s
                .max_cap
                .as_deref()
                .map(|c| amount(path, "sessions.max_cap", c))
                .transpose()?,
            max_asset_cap: s
                .max_asset_cap
                .iter()
                .map(|(asset, cap)| {
                    let canonical = crate::session::Asset::parse(asset)
                        .ok_or_else(|| invalid(path, format!("sessions.max_asset_cap: {asset:?} is not an asset")))?
                        .to_string();
                    Ok((
                        canonical,
                        amount(path, &format!("sessions.max_asset_cap {asset}"), cap)?,
                    ))
                })
                .collect::<Result<_, PolicyError>>()?,
            max_open_per_account: s.max_open_per_account,
        };
        Ok(Limits {
            rates,
            daily_spend,
            sessions,
        })
    }

    /// The rate limits that count `action`.
    pub fn rates_for(&self, action: Action) -> impl Iterator<Item = &RateLimit> {
        self.rates
            .iter()
            .filter(move |r| r.actions.is_empty() || r.actions.contains(&action))
    }

    /// The daily cap on `currency`, if any.
    pub fn daily_cap(&self, currency: &str) -> Option<&DailySpend> {
        self.daily_spend.iter().find(|d| d.currency == currency)
    }
}
