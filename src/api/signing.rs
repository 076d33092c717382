//! SigningService: SignTypedData, SignMessage, SignPayment, SignTransaction, SignReceipt, SignAttestation.

use tonic::{Request, Response, Status};

use super::account::check_account_id;
use super::pb::signing_service_server::SigningService;
use super::pb::{
    SignAttestationRequest, SignAttestationResponse, SignMessageRequest, SignMessageResponse, SignPaymentRequest,
    SignPaymentResponse, SignReceiptRequest, SignReceiptResponse, SignTransactionRequest, SignTransactionResponse,
    SignTypedDataRequest, SignTypedDataResponse, SignatureAlgorithm,
};
use super::{ApiError, SigningApi, MAX_MESSAGE_BYTES, MAX_TYPED_DATA_BYTES};
use crate::crypto::eip712::TypedData;
use crate::crypto::eth::{personal_message_digest, Address};
use crate::keys::public_keys;
use crate::policy::{Action, MessageFacts, PaymentFacts, RequestContext, Resource, SessionFacts, TypedDataFacts};
use crate::session::{payment, Asset, Payment, SessionError, Spend};
use sha2::{Digest as _, Sha256};

/// A hash of the fields that make a request what it is, for idempotency.
fn body_hash(kind: &str, parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// What the policy knows of the session a request is made in.
fn in_session(session: &crate::store::SessionRecord) -> SessionFacts {
    SessionFacts {
        active: true,
        scopes: session.scopes.clone(),
        ..SessionFacts::default()
    }
}

fn check_currency(c: &str) -> Result<(), ApiError> {
    if c.is_empty() || c.len() > 16 || !c.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()) {
        return Err(ApiError::invalid("currency", "1-16 of [A-Z0-9]"));
    }
    Ok(())
}

fn check_license(l: &str) -> Result<(), ApiError> {
    if l.is_empty() || l.chars().count() > 128 || l.chars().any(char::is_control) {
        return Err(ApiError::invalid("license_id", "1-128 printable characters"));
    }
    Ok(())
}

fn parse_manifest(m: &str) -> Result<[u8; 32], ApiError> {
    let m = m.strip_prefix("sha256:").unwrap_or(m);
    let m = m.strip_prefix("0x").unwrap_or(m);
    let mut out = [0u8; 32];
    if m.len() != 64 || hex::decode_to_slice(m, &mut out).is_err() {
        return Err(ApiError::invalid("manifest", "expected a SHA-256: 64 hex digits"));
    }
    Ok(out)
}

/// Stores a session spend's response (the request's audit event was
/// appended with the reservation).
async fn complete<T: prost::Message>(
    d: &super::Daemon,
    session_id: &str,
    request_id: &str,
    resp: &T,
) -> Result<(), ApiError> {
    d.sessions
        .complete_spend(session_id, request_id, &resp.encode_to_vec())
        .await?;
    Ok(())
}

/// Signing failed after the spend was reserved (and the request's event
/// recorded as allowed): gives the spend back and appends the compensating
/// `ReleaseSpend` event, with the failure's decision and code, in the same
/// transaction. Returns the failure.
async fn release(
    d: &super::Daemon,
    session: &crate::store::SessionRecord,
    request_id: &str,
    failure: ApiError,
) -> ApiError {
    let code = failure.status().code();
    let event = crate::audit::context::compensating(
        crate::audit::event::RELEASE_SPEND,
        super::audit::decision(code),
        crate::metrics::code_name(code),
        crate::audit::event::spend_ref(&session.id, request_id),
    )
    .map(|mut e| {
        e.account.clone_from(&session.account_id);
        e.session.clone_from(&session.id);
        e.request_id = request_id.to_string();
        // A refusal after the reservation (a limit) names what decided it.
        if let Some(decision) = failure.decision() {
            e.policies = super::audit::decided_by(decision);
        }
        e
    });
    if let Err(e) = d.sessions.release_spend(&session.id, request_id, event.as_ref()).await {
        tracing::warn!(error = %e, "could not release a failed spend");
    }
    failure
}

/// Inside a delegated session: the token's session (the caller must be its
/// delegate, `account_id` its account), its scopes and the account's record,
/// once the decision point allowed `action` with `context` and the
/// session's facts.
async fn session_decided(
    d: &super::Daemon,
    identity: &str,
    token: &str,
    account_id: &str,
    action: Action,
    context: RequestContext,
) -> Result<
    (
        crate::store::SessionRecord,
        crate::session::Scopes,
        std::sync::Arc<crate::store::AccountRecord>,
    ),
    ApiError,
> {
    let (session, scopes) = d.sessions.authorize(token, identity).await?;
    if session.account_id != account_id {
        return Err(ApiError::invalid("account_id", "is not the session's account"));
    }
    let record = d.keys.record(&session.account_id).await?;
    let context = RequestContext {
        session: in_session(&session),
        ..context
    };
    d.decide(identity, action, Resource::Account(&record), context).await?;
    Ok((session, scopes, record))
}

/// A spend inside a session, decided and within its scopes: what
/// [`spend_then_sign`] reserves.
struct SessionSpend<'a> {
    session: &'a crate::store::SessionRecord,
    request_id: &'a str,
    /// Tells a retry from another request reusing the id.
    body_hash: [u8; 32],
    amount: u128,
    /// What it spends (the account's daily total for it is held too); `None`: nothing.
    asset: Option<&'a Asset>,
    /// The asset's own cap, if a `cap:` scope gives it one.
    cap: Option<u128>,
    /// A second part reserved with it (a transaction's gas paid in another
    /// asset than the one it moves): the asset, the amount, its own cap.
    fee: Option<(&'a Asset, u128, Option<u128>)>,
}

/// Reserves a session spend (its audit event in the same transaction),
/// holds the account's daily total for the asset, signs with `sign` and
/// stores the response; a retry of a completed request returns the stored
/// response. Whatever fails after the reservation gives back the reservation
/// and the daily hold, and the signature is withheld.
async fn spend_then_sign<T, F, Fut>(
    d: &super::Daemon,
    identity: &str,
    spend: SessionSpend<'_>,
    digest: &(dyn Fn(u64) -> String + Send + Sync),
    sign: F,
) -> Result<T, ApiError>
where
    T: prost::Message + Default,
    F: FnOnce(crate::session::SpendResult) -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    let session = spend.session;
    let asset = spend.asset.map(ToString::to_string);
    let asset_cap = spend.cap.zip(asset.as_deref()).map(|(cap, a)| (a, cap));
    let fee_asset = spend.fee.map(|(a, _, _)| a.to_string());
    let fee = spend.fee.map(|(_, amount, cap)| crate::store::SpendPart {
        amount,
        asset_cap: cap.zip(fee_asset.as_deref()).map(|(cap, a)| (a, cap)),
    });
    let reserved = match d
        .sessions
        .begin_spend(
            session,
            spend.request_id,
            spend.body_hash,
            crate::store::SpendPart {
                amount: spend.amount,
                asset_cap,
            },
            fee,
            digest,
        )
        .await?
    {
        Spend::Replay(bytes) => {
            return T::decode(bytes.as_slice()).map_err(|_| ApiError::Internal("stored response does not decode"))
        }
        Spend::Reserved(r) => r,
    };
    let request_id = reserved.request_id.clone();
    // The account's daily caps for the assets (a retry replays above and counts once).
    let mut holds = Vec::new();
    let parts = [
        asset.as_deref().map(|a| (a, spend.amount)),
        fee_asset.as_deref().zip(spend.fee.map(|(_, amount, _)| amount)),
    ];
    for (a, amount) in parts.into_iter().flatten() {
        match d
            .policy
            .hold_daily_spend(identity, &session.account_id, a, amount)
            .await
        {
            Ok(h) => holds.extend(h),
            Err(e) => {
                for h in holds {
                    d.policy.release_daily_spend(h).await;
                }
                return Err(release(d, session, &request_id, e.into()).await);
            }
        }
    }
    let signed = match sign(reserved).await {
        Ok(resp) => complete(d, &session.id, &request_id, &resp).await.map(|()| resp),
        Err(e) => Err(e),
    };
    match signed {
        Ok(resp) => Ok(resp),
        Err(e) => {
            // The signature is withheld: give back what it held.
            for h in holds {
                d.policy.release_daily_spend(h).await;
            }
            Err(release(d, session, &request_id, e).await)
        }
    }
}

#[tonic::async_trait]
impl SigningService for SigningApi {
    async fn sign_typed_data(
        &self,
        request: Request<SignTypedDataRequest>,
    ) -> Result<Response<SignTypedDataResponse>, Status> {
        self.0
            .handle("SignTypedData", request, |d, identity, req| async move {
                check_account_id(&req.account_id)?;
                if req.typed_data_json.len() > MAX_TYPED_DATA_BYTES {
                    return Err(ApiError::invalid(
                        "typed_data_json",
                        format!(
                            "document is {} bytes; at most {MAX_TYPED_DATA_BYTES}",
                            req.typed_data_json.len()
                        ),
                    ));
                }
                let typed = TypedData::from_slice(req.typed_data_json.as_bytes()).map_err(|e| {
                    let path = e.path();
                    let field = if path.is_empty() {
                        "typed_data_json".to_string()
                    } else {
                        format!("typed_data_json.{path}")
                    };
                    ApiError::invalid(field, e.to_string())
                })?;
                let digest = typed.signing_hash();
                let facts = TypedDataFacts::of(&typed);
                if req.session_token.is_empty() {
                    let context = RequestContext {
                        typed_data: Some(facts),
                        ..RequestContext::default()
                    };
                    d.account_for(&identity, Action::SignTypedData, &req.account_id, context)
                        .await?;
                    let (keys, signature) = d.keys.sign_eth_digest(&req.account_id, digest).await?;
                    return Ok(SignTypedDataResponse {
                        digest: digest.to_vec(),
                        signature: signature.to_vec(),
                        signer: keys.eth_checksum().to_string(),
                        remaining: String::new(),
                    });
                }
                // Inside a delegated session: the delegate, a covering scope, one
                // recorded use (amount 0), idempotent per request_id.
                let context = RequestContext {
                    typed_data: Some(facts),
                    ..RequestContext::default()
                };
                let (session, scopes, record) = session_decided(
                    &d,
                    &identity,
                    &req.session_token,
                    &req.account_id,
                    Action::SignTypedData,
                    context,
                )
                .await?;
                // A transfer keyward recognises (EIP-3009, EIP-2612, Permit2) is
                // bounded by its asset's scopes and reserved against its cap; any
                // other document needs an unbounded typed-data scope.
                let transfer = crate::session::transfer::recognise(&typed).map_err(SessionError::from)?;
                scopes
                    .check_typed_data(
                        typed.domain_chain_id().as_deref(),
                        typed.domain_verifying_contract().as_deref(),
                        typed.primary_type(),
                        transfer.is_some(),
                        session.scope_grammar,
                    )
                    .map_err(SessionError::from)?;
                let amount = match &transfer {
                    Some(t) => {
                        let (secp, _) = public_keys(&record)?;
                        t.check(&Address::from_public_key(&secp), session.expires_at)
                            .map_err(SessionError::from)?;
                        scopes
                            .check_spend(&t.asset, t.amount, &t.payee)
                            .map_err(SessionError::from)?;
                        t.amount
                    }
                    None => 0,
                };
                let hash = body_hash("typed-data", &[session.id.as_bytes(), &digest]);
                let digest_hex = hex::encode(digest);
                let spend = SessionSpend {
                    session: &session,
                    request_id: &req.request_id,
                    body_hash: hash,
                    amount,
                    asset: transfer.as_ref().map(|t| &t.asset),
                    cap: transfer.as_ref().and_then(|t| scopes.cap_for(&t.asset)),
                    fee: None,
                };
                let (d, account_id) = (&d, &session.account_id);
                spend_then_sign(d, &identity, spend, &|_| digest_hex.clone(), |reserved| async move {
                    let (keys, signature) = d.keys.sign_eth_digest(account_id, digest).await?;
                    Ok(SignTypedDataResponse {
                        digest: digest.to_vec(),
                        signature: signature.to_vec(),
                        signer: keys.eth_checksum().to_string(),
                        remaining: reserved.remaining.to_string(),
                    })
                })
                .await
            })
            .await
    }

    async fn sign_message(
        &self,
        request: Request<SignMessageRequest>,
    ) -> Result<Response<SignMessageResponse>, Status> {
        self.0
            .handle("SignMessage", request, |d, identity, req| async move {
                check_account_id(&req.account_id)?;
                if req.data.len() > MAX_MESSAGE_BYTES {
                    return Err(ApiError::invalid("data", format!("at most {MAX_MESSAGE_BYTES} bytes")));
                }
                let alg = SignatureAlgorithm::try_from(req.alg).unwrap_or(SignatureAlgorithm::Unspecified);
                if alg == SignatureAlgorithm::Unspecified {
                    return Err(ApiError::invalid("alg", "must be SECP256K1 or ED25519"));
                }
                let context = RequestContext {
                    message: Some(MessageFacts {
                        alg: if alg == SignatureAlgorithm::Ed25519 {
                            "ed25519"
                        } else {
                            "secp256k1"
                        },
                        length: req.data.len(),
                    }),
                    ..RequestContext::default()
                };
                d.account_for(&identity, Action::SignMessage, &req.account_id, context)
                    .await?;
                match alg {
                    SignatureAlgorithm::Ed25519 => {
                        let (keys, sig) = d.keys.sign_ed25519_message(&req.account_id, &req.data).await?;
                        Ok(SignMessageResponse {
                            signature: sig.to_vec(),
                            public_key: keys.ed25519_public().to_vec(),
                            digest: Vec::new(),
                        })
                    }
                    _ => {
                        let digest = personal_message_digest(&req.data);
                        let (keys, sig) = d.keys.sign_eth_digest(&req.account_id, digest).await?;
                        Ok(SignMessageResponse {
                            signature: sig.to_vec(),
                            public_key: keys.secp256k1_public_compressed(),
                            digest: digest.to_vec(),
                        })
                    }
                }
            })
            .await
    }

    async fn sign_payment(
        &self,
        request: Request<SignPaymentRequest>,
    ) -> Result<Response<SignPaymentResponse>, Status> {
        self.0
            .handle("SignPayment", request, |d, identity, req| async move {
                let amount = crate::session::parse_amount("amount", &req.amount)?;
                check_currency(&req.currency)?;
                check_license(&req.license_id)?;
                let manifest = parse_manifest(&req.manifest)?;
                let payee = if req.payee.is_empty() {
                    Address([0u8; 20])
                } else {
                    Address::parse(&req.payee).map_err(|e| ApiError::invalid("payee", e.to_string()))?
                };
                let (session, scopes) = d.sessions.authorize(&req.session_token, &identity).await?;
                let account = d.keys.record(&session.account_id).await?;
                let context = RequestContext {
                    session: in_session(&session),
                    payment: Some(PaymentFacts {
                        amount,
                        currency: req.currency.clone(),
                        manifest: hex::encode(manifest),
                        license: req.license_id.clone(),
                    }),
                    ..RequestContext::default()
                };
                d.decide(&identity, Action::SignPayment, Resource::Account(&account), context)
                    .await?;
                scopes
                    .check_payment(amount, &req.currency, &payee, &manifest)
                    .map_err(crate::session::SessionError::from)?;
                let asset = Asset::Currency(req.currency.clone());
                let hash = body_hash(
                    "payment",
                    &[
                        session.id.as_bytes(),
                        &amount.to_be_bytes(),
                        req.currency.as_bytes(),
                        &manifest,
                        req.license_id.as_bytes(),
                        &payee.0,
                    ],
                );
                let (secp, _) = public_keys(&account)?;
                let payer = Address::from_public_key(&secp);
                // The signed document names the spend's nonce, given by the reservation.
                let document = |nonce: u64| {
                    payment(
                        d.sessions.domain(),
                        &Payment {
                            session_id: &session.id,
                            payer_account: &session.account_id,
                            payer,
                            payee,
                            amount,
                            currency: &req.currency,
                            manifest,
                            license_id: &req.license_id,
                            nonce,
                        },
                    )
                };
                let digest_of = |nonce: u64| {
                    TypedData::from_value(&document(nonce))
                        .map(|t| hex::encode(t.signing_hash()))
                        .unwrap_or_default()
                };
                let spend = SessionSpend {
                    session: &session,
                    request_id: &req.request_id,
                    body_hash: hash,
                    amount,
                    asset: Some(&asset),
                    cap: scopes.cap_for(&asset),
                    fee: None,
                };
                let (document, d, session) = (&document, &d, &session);
                spend_then_sign(d, &identity, spend, &digest_of, |reserved| async move {
                    let doc = document(reserved.nonce);
                    let typed = TypedData::from_value(&doc).map_err(|_| ApiError::Internal("payment document"))?;
                    let digest = typed.signing_hash();
                    let (keys, signature) = d.keys.sign_eth_digest(&session.account_id, digest).await?;
                    Ok(SignPaymentResponse {
                        session_id: session.id.clone(),
                        typed_data_json: doc.to_string(),
                        digest: digest.to_vec(),
                        signature: signature.to_vec(),
                        signer: keys.eth_checksum().to_string(),
                        remaining: reserved.remaining.to_string(),
                        nonce: reserved.nonce,
                        request_id: reserved.request_id,
                    })
                })
                .await
            })
            .await
    }

    async fn sign_transaction(
        &self,
        request: Request<SignTransactionRequest>,
    ) -> Result<Response<SignTransactionResponse>, Status> {
        self.0
            .handle("SignTransaction", request, |d, identity, req| async move {
                transaction::sign_transaction(&d, identity, req).await
            })
            .await
    }

    // ----- issue 5: receipts and attestations -------------------------------

    async fn sign_receipt(
        &self,
        request: Request<SignReceiptRequest>,
    ) -> Result<Response<SignReceiptResponse>, Status> {
        self.0
            .handle("SignReceipt", request, |d, identity, req| async move {
                receipts::sign_receipt(&d, identity, req).await
            })
            .await
    }

    async fn sign_attestation(
        &self,
        request: Request<SignAttestationRequest>,
    ) -> Result<Response<SignAttestationResponse>, Status> {
        self.0
            .handle("SignAttestation", request, |d, identity, req| async move {
                receipts::sign_attestation(&d, identity, req).await
            })
            .await
    }
}

mod transaction;

/// Receipts and attestations (issue 5): validation, authorization, signing.
mod receipts {
    use std::sync::Arc;

    use super::super::pb::{
        SignAttestationRequest, SignAttestationResponse, SignPaymentResponse, SignReceiptRequest, SignReceiptResponse,
    };
    use super::super::{ApiError, Daemon};
    use super::{body_hash, check_currency, check_license, parse_manifest};
    use crate::crypto::eip712::TypedData;
    use crate::crypto::eth::Address;
    use crate::crypto::jws::JwsAlg;
    use crate::hsm::IssuerAlg;
    use crate::policy::{Action, PaymentFacts, RequestContext, Resource};
    use crate::receipt::{
        self, AccountPublic, AttestError, AttestationClaims, ReceiptClaims, Seller, ATTESTATION_CLAIM_TYP, RECEIPT_TYP,
    };
    use crate::session::{payment, Payment, Scope, SessionError};
    use crate::store::{NewReceipt, ReceiptOutcome, ReceiptRecord, ReceiptSigner, SessionRecord, SignerError};
    use prost::Message as _;

    /// The longest a receipt's issuer signature may take (the HSM session
    /// wait included); past it the receipt is withdrawn and the caller gets
    /// UNAVAILABLE.
    const RECEIPT_SIGN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

    fn field((field, reason): receipt::FieldError) -> ApiError {
        ApiError::invalid(field, reason)
    }

    fn response(r: ReceiptRecord) -> SignReceiptResponse {
        SignReceiptResponse {
            receipt: r.jws,
            receipt_id: r.receipt_id,
            audit_seq: r.seq,
            request_id: r.request_id,
        }
    }

    /// The payment a receipt inside a session is for, read back from the session's spends:
    /// what `SignPayment` signed under `request_id`, rebuilt and checked against its stored
    /// document, digest and reserved amount.
    struct Paid {
        amount: u128,
        currency: String,
        manifest: [u8; 32],
        license_id: String,
        payee: Address,
        digest: [u8; 32],
    }

    async fn paid(d: &Daemon, session: &SessionRecord, request_id: &str) -> Result<Paid, ApiError> {
        let spend = d
            .keys
            .store()
            .get_spend(&session.id, request_id)
            .await
            .map_err(SessionError::from)?
            .ok_or_else(|| SessionError::PaymentNotFound(request_id.to_string()))?;
        let bytes = spend
            .response
            .ok_or_else(|| SessionError::PaymentPending(request_id.to_string()))?;
        let not_payment = || {
            ApiError::invalid(
                "payment_request_id",
                "names a request of this session that is not a payment",
            )
        };
        let resp = SignPaymentResponse::decode(bytes.as_slice()).map_err(|_| not_payment())?;
        let doc: serde_json::Value = serde_json::from_str(&resp.typed_data_json).map_err(|_| not_payment())?;
        let m = &doc["message"];
        let text = |k: &str| m[k].as_str().ok_or_else(not_payment);
        let address = |k: &str| text(k).and_then(|a| Address::parse(a).map_err(|_| not_payment()));
        let amount: u128 = text("amount")?.parse().map_err(|_| not_payment())?;
        let mut manifest = [0u8; 32];
        hex::decode_to_slice(text("manifest")?.trim_start_matches("0x"), &mut manifest).map_err(|_| not_payment())?;
        let (payer, payee) = (address("payer")?, address("payee")?);
        let nonce = m["nonce"].as_u64().ok_or_else(not_payment)?;
        let (currency, license_id) = (text("currency")?.to_string(), text("licenseId")?.to_string());
        let rebuilt = payment(
            d.sessions.domain(),
            &Payment {
                session_id: &session.id,
                payer_account: &session.account_id,
                payer,
                payee,
                amount,
                currency: &currency,
                manifest,
                license_id: &license_id,
                nonce,
            },
        );
        if rebuilt != doc || amount != spend.amount {
            return Err(not_payment());
        }
        let digest = TypedData::from_value(&rebuilt)
            .map_err(|_| not_payment())?
            .signing_hash();
        if digest.as_slice() != resp.digest.as_slice() {
            return Err(not_payment());
        }
        Ok(Paid {
            amount,
            currency,
            manifest,
            license_id,
            payee,
            digest,
        })
    }

    /// A fact the caller may leave out inside a session (the payment's is taken) but must
    /// give outside one; given inside one, it must equal the payment's.
    fn same<T: PartialEq>(field: &'static str, given: Option<T>, paid: &T) -> Result<(), ApiError> {
        match given {
            Some(g) if &g != paid => Err(ApiError::invalid(field, "differs from the payment's")),
            _ => Ok(()),
        }
    }

    pub(super) async fn sign_receipt(
        d: &Daemon,
        identity: String,
        req: SignReceiptRequest,
    ) -> Result<SignReceiptResponse, ApiError> {
        super::check_account_id(&req.account_id)?;
        receipt::check_text("buyer", &req.buyer, true).map_err(field)?;
        let in_session = !req.session_token.is_empty();
        // Inside a session amount, currency, manifest and license come from the payment.
        let optional = |v: &str| !(in_session && v.is_empty());
        let given_amount = optional(&req.amount)
            .then(|| crate::session::parse_amount("amount", &req.amount))
            .transpose()?;
        if optional(&req.currency) {
            check_currency(&req.currency)?;
        }
        if optional(&req.license_id) {
            check_license(&req.license_id)?;
        }
        let given_manifest = optional(&req.manifest)
            .then(|| parse_manifest(&req.manifest))
            .transpose()?;
        receipt::check_text("payment_signature_ref", &req.payment_signature_ref, false).map_err(field)?;
        if req.request_id.len() > 128 || req.request_id.chars().any(char::is_control) {
            return Err(ApiError::invalid("request_id", "at most 128 printable characters"));
        }
        if req.payment_request_id.len() > 128 || req.payment_request_id.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                "payment_request_id",
                "at most 128 printable characters",
            ));
        }
        let facts = |amount: u128, currency: &str, manifest: &[u8; 32], license: &str| PaymentFacts {
            amount,
            currency: currency.to_string(),
            manifest: hex::encode(manifest),
            license: license.to_string(),
        };
        let (record, session_id, paid) = if !in_session {
            if !req.payment_request_id.is_empty() {
                return Err(ApiError::invalid(
                    "payment_request_id",
                    "names a session's payment: only inside that session",
                ));
            }
            let (Some(amount), Some(manifest)) = (given_amount, given_manifest) else {
                return Err(ApiError::Internal("receipt facts checked above"));
            };
            let context = RequestContext {
                payment: Some(facts(amount, &req.currency, &manifest, &req.license_id)),
                ..RequestContext::default()
            };
            let record = d
                .account_for(&identity, Action::SignReceipt, &req.account_id, context)
                .await?;
            (record, None, None)
        } else {
            // The token first: its holder knows the account exists.
            let (session, scopes) = d.sessions.authorize(&req.session_token, &identity).await?;
            if session.account_id != req.account_id {
                return Err(ApiError::invalid("account_id", "is not the session's account"));
            }
            if req.payment_request_id.is_empty() {
                return Err(ApiError::invalid(
                    "payment_request_id",
                    "required inside a session: the request_id of the SignPayment this receipt is for",
                ));
            }
            let paid = paid(d, &session, &req.payment_request_id).await?;
            same("amount", given_amount, &paid.amount)?;
            same(
                "currency",
                optional(&req.currency).then(|| req.currency.clone()),
                &paid.currency,
            )?;
            same("manifest", given_manifest, &paid.manifest)?;
            same(
                "license_id",
                optional(&req.license_id).then(|| req.license_id.clone()),
                &paid.license_id,
            )?;
            let record = d.keys.record(&req.account_id).await?;
            let context = RequestContext {
                payment: Some(facts(paid.amount, &paid.currency, &paid.manifest, &paid.license_id)),
                session: super::in_session(&session),
                ..RequestContext::default()
            };
            d.decide(&identity, Action::SignReceipt, Resource::Account(&record), context)
                .await?;
            scopes
                .check_payment(paid.amount, &paid.currency, &paid.payee, &paid.manifest)
                .map_err(SessionError::from)?;
            (record, Some(session.id), Some(paid))
        };
        let (amount, currency, manifest, license_id) = match &paid {
            Some(p) => (p.amount, p.currency.clone(), p.manifest, p.license_id.clone()),
            None => (
                given_amount.unwrap_or_default(),
                req.currency.clone(),
                given_manifest.unwrap_or_default(),
                req.license_id.clone(),
            ),
        };
        let public = AccountPublic::of(&record, d.sessions.domain().chain_id)?;
        let manifest_hex = hex::encode(manifest);
        let hash = body_hash(
            "receipt",
            &[
                req.account_id.as_bytes(),
                req.buyer.as_bytes(),
                &amount.to_be_bytes(),
                currency.as_bytes(),
                &manifest,
                license_id.as_bytes(),
                session_id.as_deref().unwrap_or("").as_bytes(),
                req.payment_signature_ref.as_bytes(),
            ],
        );
        // Inside a session a payment has at most one receipt: its idempotency key is the
        // payment's, whatever request_id the caller gave.
        let request_id = match (&session_id, &paid) {
            (Some(session), Some(_)) => format!("payment:{session}:{}", req.payment_request_id),
            _ if req.request_id.is_empty() => uuid::Uuid::new_v4().to_string(),
            _ => req.request_id.clone(),
        };
        let receipt_id = uuid::Uuid::new_v4().to_string();
        let now = d.sessions.now();
        let mut claims = ReceiptClaims {
            receipt_id: receipt_id.clone(),
            audit_seq: 0,
            iat: now,
            buyer: req.buyer.clone(),
            seller: Seller {
                account_id: req.account_id.clone(),
                did: public.did_key.clone(),
            },
            amount: amount.to_string(),
            currency,
            manifest: manifest_hex,
            license_id,
            session_id: session_id.clone(),
            payment_signature_ref: (!req.payment_signature_ref.is_empty()).then(|| req.payment_signature_ref.clone()),
            payee: paid.as_ref().map(|p| p.payee.to_checksum()),
            payment_request_id: paid.as_ref().map(|_| req.payment_request_id.clone()),
            payment_digest: paid.as_ref().map(|p| format!("0x{}", hex::encode(p.digest))),
        };
        let issuer = Arc::clone(d.sessions.issuer());
        // Signs once the row and its audit event are committed, with no
        // store lock held (see `Store::record_receipt`); the facts are the
        // recorded ones (a retry completing a pending receipt signs those).
        let sign: ReceiptSigner = Box::new(move |facts| {
            claims.receipt_id = facts.receipt_id;
            claims.iat = facts.created_at;
            claims.audit_seq = facts.audit_seq;
            Box::pin(async move {
                let value = serde_json::to_value(&claims).map_err(|e| Box::new(e) as SignerError)?;
                let signing = tokio::task::spawn_blocking(crate::telemetry::in_span("hsm.sign_jws", move || {
                    issuer.sign_jws(IssuerAlg::EdDSA, RECEIPT_TYP, &value)
                }));
                match tokio::time::timeout(RECEIPT_SIGN_DEADLINE, signing).await {
                    Ok(joined) => joined
                        .map_err(|_| SignerError::from("receipt signing task failed"))?
                        .map_err(|e| Box::new(e) as SignerError),
                    Err(_) => Err(SignerError::from("receipt signing took longer than its deadline")),
                }
            })
        });
        let new = NewReceipt {
            receipt_id: &receipt_id,
            account_id: &req.account_id,
            caller: &identity,
            request_id: &request_id,
            body_hash: hash,
            session_id: session_id.as_deref(),
            created_at: now,
            audit: crate::audit::context::in_transaction(hex::encode(hash), format!("receipt:{receipt_id}")).map(
                |mut e| {
                    e.request_id.clone_from(&request_id);
                    e.session = session_id.clone().unwrap_or_default();
                    e
                },
            ),
            abandon: crate::audit::context::compensating(
                "WithdrawReceipt",
                crate::audit::Decision::Error,
                "UNAVAILABLE",
                format!("receipt:{receipt_id}"),
            )
            .map(|mut e| {
                e.request_id.clone_from(&request_id);
                e.session = session_id.clone().unwrap_or_default();
                e
            }),
        };
        let outcome = d
            .keys
            .store()
            .record_receipt(&new, sign)
            .await
            .map_err(crate::keys::KeyError::from)?;
        match outcome {
            ReceiptOutcome::Recorded(r) => {
                if new.audit.is_some() {
                    crate::audit::context::mark_recorded(r.seq);
                }
                Ok(response(r))
            }
            ReceiptOutcome::Replay(r) | ReceiptOutcome::Completed(r) => Ok(response(r)),
            ReceiptOutcome::BodyMismatch if paid.is_some() => Err(ApiError::invalid(
                "payment_request_id",
                "this payment already has a receipt, for another buyer or payment reference",
            )),
            ReceiptOutcome::BodyMismatch => Err(SessionError::IdempotencyMismatch.into()),
            ReceiptOutcome::SignFailed(e) => Err(SessionError::Issuer(e.to_string()).into()),
        }
    }

    pub(super) async fn sign_attestation(
        d: &Daemon,
        identity: String,
        req: SignAttestationRequest,
    ) -> Result<SignAttestationResponse, ApiError> {
        super::check_account_id(&req.account_id)?;
        let alg = match req.alg.as_str() {
            "" | "EdDSA" => JwsAlg::EdDSA,
            "ES256K" => JwsAlg::ES256K,
            _ => return Err(ApiError::invalid("alg", "EdDSA or ES256K")),
        };
        receipt::check_dataset_id(&req.dataset_id).map_err(field)?;
        receipt::check_contribution_hash(&req.contribution_hash).map_err(field)?;
        receipt::check_spdx(&req.license).map_err(field)?;
        receipt::check_purpose(&req.purpose).map_err(field)?;
        let mut context = RequestContext {
            dataset: req.dataset_id.clone(),
            ..RequestContext::default()
        };
        let record = if req.session_token.is_empty() {
            d.account_for(&identity, Action::SignAttestation, &req.account_id, context)
                .await?
        } else {
            // The token first: its holder knows the account exists.
            let (session, scopes) = d.sessions.authorize(&req.session_token, &identity).await?;
            if session.account_id != req.account_id {
                return Err(ApiError::invalid("account_id", "is not the session's account"));
            }
            let record = d.keys.record(&req.account_id).await?;
            context.session = super::in_session(&session);
            d.decide(&identity, Action::SignAttestation, Resource::Account(&record), context)
                .await?;
            if !scopes
                .iter()
                .any(|s| matches!(s, Scope::Attest(id) if *id == req.dataset_id))
            {
                return Err(SessionError::Forbidden(format!(
                    "dataset {} is not covered by an attest scope of the session",
                    req.dataset_id
                ))
                .into());
            }
            record
        };
        let public = AccountPublic::of(&record, d.sessions.domain().chain_id)?;
        let claims = AttestationClaims {
            iss: public.did(alg).to_string(),
            sub: req.dataset_id,
            typ: ATTESTATION_CLAIM_TYP,
            iat: d.sessions.now(),
            contribution_hash: req.contribution_hash,
            license: req.license,
            purpose: req.purpose,
        };
        let token = receipt::sign_attestation(&d.keys, &public, &req.account_id, alg, &claims)
            .await
            .map_err(|e| match e {
                AttestError::Key(k) => ApiError::Key(k),
                _ => ApiError::Internal("attestation does not verify under the account key"),
            })?;
        Ok(SignAttestationResponse {
            attestation: token,
            kid: public.jwk(alg).kid.clone(),
            iss: claims.iss,
        })
    }
}
