//! Request tables: named accounts and sessions, and requests with the
//! decision expected of a set (`keyward policy test`, `policies/tests/*.toml`)
//! or to be explained (`keyward policy explain`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::{
    decide, Action, Decision, MessageFacts, PaymentFacts, Policies, PolicyError, PolicyRequest, RequestContext,
    Resource, SessionFacts, TransactionFacts, TypedDataFacts,
};
use crate::store::{AccountRecord, SessionRecord};

/// A table file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    /// Accounts by name.
    #[serde(default)]
    pub accounts: BTreeMap<String, AccountSpec>,
    /// Sessions by name.
    #[serde(default)]
    pub sessions: BTreeMap<String, SessionSpec>,
    /// The requests.
    #[serde(default, rename = "case")]
    pub cases: Vec<Case>,
}

/// An account as policies see it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountSpec {
    /// Who created it.
    pub created_by: String,
    /// Clients listed at creation.
    #[serde(default)]
    pub allowed: Vec<String>,
    /// Label.
    #[serde(default)]
    pub label: Option<String>,
    /// Controller address.
    #[serde(default)]
    pub controller: String,
}

/// A session as policies see it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSpec {
    /// The account's name in this table.
    pub account: String,
    /// Its delegate.
    pub delegate: String,
    /// Its scopes.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Expiry, unix seconds.
    #[serde(default)]
    pub expires_at: i64,
}

/// One request, with what is expected of it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// What the case shows.
    pub name: String,
    /// The caller's identity.
    pub principal: String,
    /// The action (an RPC name, or ReadAudit).
    pub action: String,
    /// The account it is about (a name in `accounts`).
    #[serde(default)]
    pub account: Option<String>,
    /// The session it is about (a name in `sessions`).
    #[serde(default)]
    pub session: Option<String>,
    /// `allow` or `deny` (explain ignores it).
    #[serde(default)]
    pub expect: Option<Expect>,
    /// The policies expected to decide, when given.
    #[serde(default)]
    pub policies: Option<Vec<String>>,
    /// The request context.
    #[serde(default)]
    pub context: ContextSpec,
}

/// An expected outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// Allowed.
    Allow,
    /// Denied.
    Deny,
}

/// The request context, as written in a table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextSpec {
    /// Unix seconds (default: 0).
    #[serde(default)]
    pub now: i64,
    /// Made with a session token.
    #[serde(default)]
    pub in_session: bool,
    /// Session scopes (the session's, or those asked for).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Requested session lifetime.
    #[serde(default)]
    pub ttl_seconds: u64,
    /// Requested session cap (decimal).
    #[serde(default)]
    pub cap: Option<String>,
    /// Typed data facts.
    #[serde(default)]
    pub typed_data: Option<TypedDataSpec>,
    /// Payment facts.
    #[serde(default)]
    pub payment: Option<PaymentSpec>,
    /// Message facts.
    #[serde(default)]
    pub message: Option<MessageSpec>,
    /// Transaction facts.
    #[serde(default)]
    pub transaction: Option<TransactionSpec>,
    /// RevokeSession with the controller's signature.
    #[serde(default)]
    pub controller_signed: bool,
    /// SignAttestation's dataset.
    #[serde(default)]
    pub dataset: String,
}

/// Transaction facts.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransactionSpec {
    /// EIP-155 chain id.
    #[serde(default)]
    pub chain_id: u64,
    /// Recipient or contract called (0x address).
    #[serde(default)]
    pub to: String,
    /// Wei, decimal (default "0").
    #[serde(default)]
    pub value: Option<String>,
    /// The call's selector, 0x and 8 hex digits ("" for none).
    #[serde(default)]
    pub selector: String,
}

/// EIP-712 domain facts.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypedDataSpec {
    /// domain.name
    #[serde(default)]
    pub name: String,
    /// domain.version
    #[serde(default)]
    pub version: String,
    /// domain.chainId, decimal.
    #[serde(default)]
    pub chain_id: String,
    /// domain.verifyingContract.
    #[serde(default)]
    pub verifying_contract: String,
    /// primaryType
    #[serde(default)]
    pub primary_type: String,
}

/// Payment facts.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentSpec {
    /// Minor units, decimal.
    pub amount: String,
    /// Currency.
    #[serde(default)]
    pub currency: String,
    /// Manifest SHA-256 hex.
    #[serde(default)]
    pub manifest: String,
    /// License id.
    #[serde(default)]
    pub license: String,
}

/// Message facts.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageSpec {
    /// `secp256k1` or `ed25519`.
    pub alg: String,
    /// Payload length in bytes.
    pub length: usize,
}

/// One case's outcome.
#[derive(Debug)]
pub struct Outcome {
    /// The case's name.
    pub name: String,
    /// What the set decided.
    pub decision: Decision,
    /// Why the case failed, if it did.
    pub failure: Option<String>,
}

fn bad(path: &Path, reason: String) -> PolicyError {
    PolicyError::Invalid {
        path: path.to_path_buf(),
        reason,
    }
}

impl Table {
    /// Reads a table file.
    pub fn load(path: &Path) -> Result<Table, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| bad(path, e.to_string()))
    }

    fn account(&self, path: &Path, name: &str) -> Result<AccountRecord, PolicyError> {
        let a = self
            .accounts
            .get(name)
            .ok_or_else(|| bad(path, format!("no account named {name:?}")))?;
        Ok(AccountRecord {
            id: name.to_string(),
            label: a.label.clone(),
            controller: a.controller.clone(),
            created_by: a.created_by.clone(),
            created_at: 0,
            allowed: a.allowed.clone(),
            keys: Vec::new(),
            frozen: None,
            deleted_at: None,
        })
    }

    /// Decides every case with `policies`; a case fails when its decision or
    /// deciding policies differ from what it expects.
    pub fn run(&self, path: &Path, policies: &Policies) -> Result<Vec<Outcome>, PolicyError> {
        let mut out = Vec::new();
        for case in &self.cases {
            let action = Action::from_name(&case.action)
                .ok_or_else(|| bad(path, format!("case {:?}: unknown action {:?}", case.name, case.action)))?;
            let (account, session) = match (&case.account, &case.session) {
                (Some(_), Some(_)) => {
                    return Err(bad(
                        path,
                        format!("case {:?}: give an account or a session, not both", case.name),
                    ))
                }
                (Some(a), None) => (Some(self.account(path, a)?), None),
                (None, Some(s)) => {
                    let spec = self
                        .sessions
                        .get(s)
                        .ok_or_else(|| bad(path, format!("case {:?}: no session named {s:?}", case.name)))?;
                    let account = self.account(path, &spec.account)?;
                    let record = SessionRecord {
                        id: s.clone(),
                        account_id: account.id.clone(),
                        delegate: spec.delegate.clone(),
                        scopes: spec.scopes.clone(),
                        cap: 0,
                        remaining: 0,
                        uses: 0,
                        issued_at: 0,
                        expires_at: spec.expires_at,
                        challenge_id: String::new(),
                        jti: String::new(),
                        revoked_at: None,
                        revoked_by: None,
                        scope_grammar: crate::session::SCOPE_GRAMMAR,
                    };
                    (Some(account), Some(record))
                }
                (None, None) => (None, None),
            };
            let resource = match (&account, &session) {
                (Some(a), Some(s)) => Resource::Session(s, a),
                (Some(a), None) => Resource::Account(a),
                _ => Resource::Service,
            };
            let context = context(path, case)?;
            let decision = decide(
                &PolicyRequest {
                    principal: &case.principal,
                    action,
                    resource,
                    context,
                },
                policies,
            );
            let mut failure = None;
            if let Some(expect) = case.expect {
                if decision.allowed != (expect == Expect::Allow) {
                    failure = Some(format!(
                        "expected {expect:?}, got {} by {}",
                        if decision.allowed { "allow" } else { "deny" },
                        decision.decided_by()
                    ));
                }
            }
            if let Some(ids) = &case.policies {
                let mut want = ids.clone();
                want.sort();
                if failure.is_none() && want != decision.policy_ids {
                    failure = Some(format!(
                        "expected policies {want:?}, decided by {:?}",
                        decision.policy_ids
                    ));
                }
            }
            out.push(Outcome {
                name: case.name.clone(),
                decision,
                failure,
            });
        }
        Ok(out)
    }
}

fn context(path: &Path, case: &Case) -> Result<RequestContext, PolicyError> {
    let c = &case.context;
    let amount = |s: &str| {
        s.parse::<u128>()
            .map_err(|_| bad(path, format!("case {:?}: {s:?} is not an amount", case.name)))
    };
    let alg = |s: &str| match s {
        "secp256k1" => Ok("secp256k1"),
        "ed25519" => Ok("ed25519"),
        _ => Err(bad(
            path,
            format!("case {:?}: message alg is secp256k1 or ed25519", case.name),
        )),
    };
    Ok(RequestContext {
        now: c.now,
        session: SessionFacts {
            active: c.in_session,
            scopes: c.scopes.clone(),
            ttl_seconds: c.ttl_seconds,
            cap: c.cap.as_deref().map(amount).transpose()?.unwrap_or(0),
        },
        typed_data: c.typed_data.as_ref().map(|t| TypedDataFacts {
            name: t.name.clone(),
            version: t.version.clone(),
            chain_id: t.chain_id.clone(),
            verifying_contract: t.verifying_contract.to_ascii_lowercase(),
            primary_type: t.primary_type.clone(),
        }),
        payment: c
            .payment
            .as_ref()
            .map(|p| {
                Ok::<_, PolicyError>(PaymentFacts {
                    amount: amount(&p.amount)?,
                    currency: p.currency.clone(),
                    manifest: p.manifest.clone(),
                    license: p.license.clone(),
                })
            })
            .transpose()?,
        message: c
            .message
            .as_ref()
            .map(|m| {
                Ok::<_, PolicyError>(MessageFacts {
                    alg: alg(&m.alg)?,
                    length: m.length,
                })
            })
            .transpose()?,
        transaction: c.transaction.as_ref().map(|t| TransactionFacts {
            chain_id: t.chain_id,
            to: t.to.to_ascii_lowercase(),
            value: t.value.clone().unwrap_or_else(|| "0".into()),
            selector: t.selector.to_ascii_lowercase(),
        }),
        controller_signed: c.controller_signed,
        dataset: c.dataset.clone(),
    })
}
