//! `keyward sign receipt` and `keyward sign attestation` (issue 5).

use std::path::Path;

use clap::{Args, ValueEnum};
use serde_json::json;

use super::client::{connect, RpcError};
use super::output::emit;
use super::ClientOpts;
use crate::api::pb::signing_service_client::SigningServiceClient;
use crate::api::pb::{SignAttestationRequest, SignReceiptRequest};

/// Arguments of `sign receipt`.
#[derive(Debug, Args)]
pub struct ReceiptArgs {
    /// The seller account id.
    #[arg(long)]
    pub account: String,
    /// The buyer (a DID or an identity string).
    #[arg(long)]
    pub buyer: String,
    /// Amount in minor units (decimal). Inside a session: taken from the payment.
    #[arg(long, default_value = "")]
    pub amount: String,
    /// Currency code. Inside a session: taken from the payment.
    #[arg(long, default_value = "")]
    pub currency: String,
    /// SHA-256 of the dataset manifest (64 hex digits). Inside a session: taken from the
    /// payment.
    #[arg(long, default_value = "")]
    pub manifest: String,
    /// License id. Inside a session: taken from the payment.
    #[arg(long, default_value = "")]
    pub license: String,
    /// Issue inside a delegated session (token from `session open`).
    #[arg(long, default_value = "")]
    pub session: String,
    /// Inside a session: the request id of the payment (`sign payment`) the receipt is for.
    #[arg(long, default_value = "")]
    pub payment: String,
    /// Reference to the payment signature.
    #[arg(long, default_value = "")]
    pub payment_signature_ref: String,
    /// Idempotency key.
    #[arg(long, default_value = "")]
    pub request_id: String,
}

/// Account key for an attestation.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AttestAlg {
    /// Ed25519 key, alg EdDSA, iss did:key.
    Ed25519,
    /// secp256k1 key, alg ES256K, iss did:pkh.
    Secp256k1,
}

/// Arguments of `sign attestation`.
#[derive(Debug, Args)]
pub struct AttestationArgs {
    /// The account id.
    #[arg(long)]
    pub account: String,
    /// Which account key signs.
    #[arg(long, value_enum, default_value_t = AttestAlg::Ed25519)]
    pub alg: AttestAlg,
    /// Dataset id.
    #[arg(long)]
    pub dataset: String,
    /// sha256:<64 hex>.
    #[arg(long)]
    pub contribution_hash: String,
    /// SPDX license id.
    #[arg(long)]
    pub license: String,
    /// Purpose text (at most 512 characters).
    #[arg(long)]
    pub purpose: String,
    /// Sign inside a delegated session with an attest:<dataset> scope.
    #[arg(long, default_value = "")]
    pub session: String,
}

/// Runs `sign receipt`.
pub async fn sign_receipt(home: &Path, opts: &ClientOpts, a: ReceiptArgs) -> anyhow::Result<()> {
    let mut c = SigningServiceClient::new(connect(home, opts).await?);
    let r = c
        .sign_receipt(SignReceiptRequest {
            account_id: a.account,
            buyer: a.buyer,
            amount: a.amount,
            currency: a.currency,
            manifest: a.manifest,
            license_id: a.license,
            session_token: a.session,
            payment_signature_ref: a.payment_signature_ref,
            request_id: a.request_id,
            payment_request_id: a.payment,
        })
        .await
        .map_err(RpcError)?
        .into_inner();
    emit(
        opts.json,
        &json!({"receipt": r.receipt, "receipt_id": r.receipt_id, "audit_seq": r.audit_seq, "request_id": r.request_id}),
        &[
            ("receipt_id", r.receipt_id.clone()),
            ("audit_seq", r.audit_seq.to_string()),
            ("receipt", r.receipt.clone()),
        ],
    );
    Ok(())
}

/// Runs `sign attestation`.
pub async fn sign_attestation(home: &Path, opts: &ClientOpts, a: AttestationArgs) -> anyhow::Result<()> {
    let alg = match a.alg {
        AttestAlg::Ed25519 => "EdDSA",
        AttestAlg::Secp256k1 => "ES256K",
    };
    let mut c = SigningServiceClient::new(connect(home, opts).await?);
    let r = c
        .sign_attestation(SignAttestationRequest {
            account_id: a.account,
            alg: alg.into(),
            dataset_id: a.dataset,
            contribution_hash: a.contribution_hash,
            license: a.license,
            purpose: a.purpose,
            session_token: a.session,
        })
        .await
        .map_err(RpcError)?
        .into_inner();
    emit(
        opts.json,
        &json!({"attestation": r.attestation, "kid": r.kid, "iss": r.iss}),
        &[
            ("kid", r.kid.clone()),
            ("iss", r.iss.clone()),
            ("attestation", r.attestation.clone()),
        ],
    );
    Ok(())
}
