//! What a request is about, as plain data: the handler fills it from parsed,
//! validated input; the engine turns it into Cedar entities and context.

use crate::crypto::eip712::TypedData;
use crate::store::{AccountRecord, SessionRecord};

use super::Action;

/// The resource a request is about.
#[derive(Debug, Clone, Copy)]
pub enum Resource<'a> {
    /// The daemon itself (`Keyward::Service::"keyward"`).
    Service,
    /// An account.
    Account(&'a AccountRecord),
    /// A session, with its account.
    Session(&'a SessionRecord, &'a AccountRecord),
}

/// One question to the decision point.
#[derive(Debug, Clone)]
pub struct PolicyRequest<'a> {
    /// The caller's mTLS identity.
    pub principal: &'a str,
    /// What it asks.
    pub action: Action,
    /// About what.
    pub resource: Resource<'a>,
    /// With which facts.
    pub context: RequestContext,
}

/// The request context (`Keyward::RequestContext` in the schema).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestContext {
    /// Unix seconds, from the daemon's clock.
    pub now: i64,
    /// The session the request is made in, or asked for.
    pub session: SessionFacts,
    /// EIP-712 facts, when the request carries typed data.
    pub typed_data: Option<TypedDataFacts>,
    /// Value facts, when the request moves or records value.
    pub payment: Option<PaymentFacts>,
    /// Message facts (SignMessage).
    pub message: Option<MessageFacts>,
    /// Transaction facts (SignTransaction).
    pub transaction: Option<TransactionFacts>,
    /// RevokeSession carries the controller's signature.
    pub controller_signed: bool,
    /// SignAttestation: the dataset.
    pub dataset: String,
}

/// Session facts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFacts {
    /// The request is made with a verified session token of the caller's.
    pub active: bool,
    /// The session's scopes, or those asked for.
    pub scopes: Vec<String>,
    /// Requested lifetime (challenges), seconds.
    pub ttl_seconds: u64,
    /// Requested cap (challenges), minor units.
    pub cap: u128,
}

/// EIP-712 facts, from the parsed document (never re-parsed here).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypedDataFacts {
    /// domain.name
    pub name: String,
    /// domain.version
    pub version: String,
    /// domain.chainId, decimal ("" when absent).
    pub chain_id: String,
    /// domain.verifyingContract, 0x lowercase ("" when absent).
    pub verifying_contract: String,
    /// primaryType
    pub primary_type: String,
}

impl TypedDataFacts {
    /// The facts of a parsed document.
    pub fn of(typed: &TypedData) -> TypedDataFacts {
        TypedDataFacts {
            name: typed.domain_name().unwrap_or_default().to_string(),
            version: typed.domain_version().unwrap_or_default().to_string(),
            chain_id: typed.domain_chain_id().unwrap_or_default(),
            verifying_contract: typed.domain_verifying_contract().unwrap_or_default(),
            primary_type: typed.primary_type().to_string(),
        }
    }

    /// `eip155:<chainId>:<verifyingContract>`, each part as the domain has it.
    pub fn domain_id(&self) -> String {
        format!("eip155:{}:{}", self.chain_id, self.verifying_contract)
    }
}

/// Value facts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PaymentFacts {
    /// Minor units.
    pub amount: u128,
    /// Currency code.
    pub currency: String,
    /// Manifest SHA-256, lowercase hex.
    pub manifest: String,
    /// License id.
    pub license: String,
}

/// Transaction facts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransactionFacts {
    /// EIP-155 chain id.
    pub chain_id: u64,
    /// Recipient or contract called, 0x lower-case.
    pub to: String,
    /// Wei, decimal.
    pub value: String,
    /// The call data's first four bytes, 0x and 8 lower-case hex digits; "" for none.
    pub selector: String,
}

/// Message facts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageFacts {
    /// `secp256k1` or `ed25519`.
    pub alg: &'static str,
    /// Payload length in bytes.
    pub length: usize,
}

impl MessageFacts {
    /// A bare 32-byte digest rather than a message.
    pub fn raw_digest(&self) -> bool {
        self.length == 32
    }
}
