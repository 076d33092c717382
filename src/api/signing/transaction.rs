//! SignTransaction: EIP-1559 and legacy EIP-155 transactions, under policy
//! outside sessions, within the session's tx, payments and payee scopes inside one.

use num_bigint::BigUint;

use super::super::pb::{SignTransactionRequest, SignTransactionResponse};
use super::super::{ApiError, Daemon};
use super::{body_hash, session_decided, spend_then_sign, SessionSpend};
use crate::api::account::check_account_id;
use crate::crypto::eth::Address;
use crate::crypto::tx::{Erc20Call, Fees, Transaction, ERC20_VALUE_FUNCTIONS};
use crate::keys::AccountKeys;
use crate::policy::{Action, RequestContext, TransactionFacts};
use crate::session::{Asset, ScopeDenied, SessionError};

/// Most call data signed: the 128 KiB a node accepts in one transaction.
const MAX_DATA_BYTES: usize = 128 * 1024;

/// A decimal amount of wei per gas (u128).
fn wei(field: &'static str, s: &str) -> Result<u128, ApiError> {
    if s.is_empty() {
        return Err(ApiError::invalid(field, "required"));
    }
    crate::session::parse_amount(field, s).map_err(ApiError::from)
}

/// The request as a transaction to sign, each field checked.
fn parse(req: &SignTransactionRequest) -> Result<Transaction, ApiError> {
    if req.to.is_empty() {
        return Err(ApiError::invalid("to", "required: contract creation is not signed"));
    }
    let to = Address::parse(&req.to).map_err(|e| ApiError::invalid("to", e.to_string()))?;
    let value = if req.value.is_empty() {
        BigUint::default()
    } else {
        if req.value.len() > 78
            || !req.value.bytes().all(|b| b.is_ascii_digit())
            || (req.value.len() > 1 && req.value.starts_with('0'))
        {
            return Err(ApiError::invalid(
                "value",
                "expected wei as a canonical decimal integer",
            ));
        }
        req.value
            .parse::<BigUint>()
            .map_err(|_| ApiError::invalid("value", "expected wei as a decimal integer"))?
    };
    let bytes = value.to_bytes_be();
    if bytes.len() > 32 {
        return Err(ApiError::invalid("value", "above 2^256 - 1"));
    }
    let mut value32 = [0u8; 32];
    value32[32 - bytes.len()..].copy_from_slice(&bytes);
    if req.data.len() > MAX_DATA_BYTES {
        return Err(ApiError::invalid("data", format!("at most {MAX_DATA_BYTES} bytes")));
    }
    let fees = if req.legacy {
        if !req.max_fee_per_gas.is_empty() || !req.max_priority_fee_per_gas.is_empty() {
            return Err(ApiError::invalid(
                "max_fee_per_gas",
                "a legacy transaction has a gas_price only",
            ));
        }
        Fees::Legacy {
            gas_price: wei("gas_price", &req.gas_price)?,
        }
    } else {
        if !req.gas_price.is_empty() {
            return Err(ApiError::invalid(
                "gas_price",
                "an EIP-1559 transaction has max_fee_per_gas and max_priority_fee_per_gas (legacy: set legacy)",
            ));
        }
        Fees::Eip1559 {
            max_fee_per_gas: wei("max_fee_per_gas", &req.max_fee_per_gas)?,
            max_priority_fee_per_gas: wei("max_priority_fee_per_gas", &req.max_priority_fee_per_gas)?,
        }
    };
    let tx = Transaction {
        chain_id: req.chain_id,
        nonce: req.nonce,
        gas_limit: req.gas_limit,
        fees,
        to,
        value: value32,
        data: req.data.clone(),
    };
    tx.check().map_err(|e| ApiError::invalid(e.field, e.reason))?;
    Ok(tx)
}

fn facts(tx: &Transaction) -> TransactionFacts {
    TransactionFacts {
        chain_id: tx.chain_id,
        to: format!("0x{}", hex::encode(tx.to.0)),
        value: tx.value().to_string(),
        selector: tx
            .selector()
            .map(|s| format!("0x{}", hex::encode(s)))
            .unwrap_or_default(),
    }
}

fn signed(
    tx: &Transaction,
    signing_hash: [u8; 32],
    keys: &AccountKeys,
    signature: &[u8; 65],
    remaining: String,
) -> Result<SignTransactionResponse, ApiError> {
    let (raw, hash) = tx
        .encode_signed(signature)
        .map_err(|_| ApiError::Internal("signed transaction encoding"))?;
    Ok(SignTransactionResponse {
        raw_transaction: raw,
        transaction_hash: hash.to_vec(),
        signing_hash: signing_hash.to_vec(),
        signer: keys.eth_checksum().to_string(),
        remaining,
    })
}

fn amount(v: &BigUint) -> Result<u128, SessionError> {
    u128::try_from(v).map_err(|_| SessionError::from(ScopeDenied::TooLarge(v.to_string())))
}

/// What a transaction inside a session spends.
struct TxSpend {
    /// What it moves: the token of an ERC-20 transfer or approve, else the
    /// chain's native asset (its value and its gas).
    asset: Asset,
    amount: u128,
    /// Who receives it or may spend it, when it moves value to someone.
    payee: Option<Address>,
    /// Its gas, when paid in another asset than `asset` (the native asset's amount).
    fee: Option<u128>,
}

/// What a transaction inside a session spends: an ERC-20 `transfer` or
/// `approve` spends that token (to its recipient or spender), carrying no
/// ether, and its gas in the chain's native asset; anything else spends its
/// value and its gas (gas limit × fee cap) in the native asset. A call to a
/// token the session's payments scopes name must be one of those two, and
/// any call of a token function that moves or allows value must be exactly
/// one of them (selector and two clean ABI words: a token's decoder may
/// ignore trailing bytes).
fn spend_of(tx: &Transaction, scopes: &crate::session::Scopes) -> Result<TxSpend, SessionError> {
    let value = tx.value();
    let gas = tx
        .max_fee()
        .ok_or_else(|| SessionError::from(ScopeDenied::TooLarge("gas limit × fee per gas".into())))?;
    let token = Asset::Erc20 {
        chain_id: tx.chain_id,
        token: tx.to,
    };
    let names_token = scopes
        .iter()
        .any(|s| matches!(s, crate::session::Scope::Payments { asset: Some(a), .. } if *a == token));
    let value_function = tx.selector().is_some_and(|s| ERC20_VALUE_FUNCTIONS.contains(&s));
    if tx.erc20_call().is_none() && (names_token || value_function) {
        return Err(ScopeDenied::Transfer(format!(
            "a call to {} that moves tokens must be exactly transfer(address,uint256) or \
             approve(address,uint256) (selector and two ABI words)",
            tx.to.to_checksum()
        ))
        .into());
    }
    match tx.erc20_call() {
        Some(call) => {
            if value != BigUint::default() {
                return Err(ScopeDenied::Transfer("an ERC-20 transfer or approve carries no ether".into()).into());
            }
            let (payee, amount32) = match call {
                Erc20Call::Transfer { to, amount } => (to, amount),
                Erc20Call::Approve { spender, amount } => (spender, amount),
            };
            Ok(TxSpend {
                asset: token,
                amount: amount(&BigUint::from_bytes_be(&amount32))?,
                payee: Some(payee),
                fee: (gas > 0).then_some(gas),
            })
        }
        None => Ok(TxSpend {
            asset: Asset::Native { chain_id: tx.chain_id },
            amount: amount(&(value.clone() + gas))?,
            payee: (value != BigUint::default()).then_some(tx.to),
            fee: None,
        }),
    }
}

pub(super) async fn sign_transaction(
    d: &Daemon,
    identity: String,
    req: SignTransactionRequest,
) -> Result<SignTransactionResponse, ApiError> {
    check_account_id(&req.account_id)?;
    let tx = parse(&req)?;
    let signing_hash = tx.signing_hash();
    if req.session_token.is_empty() {
        let context = RequestContext {
            transaction: Some(facts(&tx)),
            ..RequestContext::default()
        };
        d.account_for(&identity, Action::SignTransaction, &req.account_id, context)
            .await?;
        let (keys, signature) = d.keys.sign_eth_digest(&req.account_id, signing_hash).await?;
        return signed(&tx, signing_hash, &keys, &signature, String::new());
    }
    // Inside a delegated session: the delegate, a tx scope naming the call, and
    // what it moves bounded and reserved like a payment.
    let context = RequestContext {
        transaction: Some(facts(&tx)),
        ..RequestContext::default()
    };
    let (session, scopes, _) = session_decided(
        d,
        &identity,
        &req.session_token,
        &req.account_id,
        Action::SignTransaction,
        context,
    )
    .await?;
    scopes
        .check_tx(tx.chain_id, &tx.to, tx.selector())
        .map_err(SessionError::from)?;
    let spent = spend_of(&tx, &scopes)?;
    let native = Asset::Native { chain_id: tx.chain_id };
    // A call that moves nothing needs no payments scope; one that moves value does.
    if spent.amount > 0 || tx.erc20_call().is_some() {
        scopes
            .check_amount(&spent.asset, spent.amount)
            .map_err(SessionError::from)?;
    }
    if let Some(payee) = &spent.payee {
        scopes.check_payee(payee).map_err(SessionError::from)?;
    }
    if let Some(gas) = spent.fee {
        scopes.check_amount(&native, gas).map_err(SessionError::from)?;
    }
    let hash = body_hash("transaction", &[session.id.as_bytes(), &signing_hash]);
    let digest_hex = hex::encode(signing_hash);
    let spend = SessionSpend {
        session: &session,
        request_id: &req.request_id,
        body_hash: hash,
        amount: spent.amount,
        asset: Some(&spent.asset),
        cap: scopes.cap_for(&spent.asset),
        fee: spent.fee.map(|gas| (&native, gas, scopes.cap_for(&native))),
    };
    let (account_id, tx) = (&session.account_id, &tx);
    spend_then_sign(d, &identity, spend, &|_| digest_hex.clone(), |reserved| async move {
        let (keys, signature) = d.keys.sign_eth_digest(account_id, signing_hash).await?;
        signed(tx, signing_hash, &keys, &signature, reserved.remaining.to_string())
    })
    .await
}
