//! AccountService: CreateAccount, GetAccount.

use tonic::{Request, Response, Status};

use super::pb::account_service_server::AccountService;
use super::pb::{Account, CreateAccountRequest, GetAccountJwksRequest, GetAccountJwksResponse, GetAccountRequest};
use super::{AccountApi, ApiError};
use crate::crypto::eth::Address;
use crate::keys::{public_keys, NewAccount};
use crate::policy::{Action, RequestContext, Resource};
use crate::store::AccountRecord;
use crate::types::KeyAlg;

const MAX_LABEL_CHARS: usize = 128;
const MAX_ALLOW: usize = 64;
const MAX_IDENTITY_BYTES: usize = 1024;

fn to_proto(record: &AccountRecord) -> Result<Account, ApiError> {
    let (secp, ed) = public_keys(record)?;
    let (kek_version, key_version) = record
        .keys
        .iter()
        .find(|k| k.alg == KeyAlg::Secp256k1)
        .map(|k| (k.kek_version, k.key_version))
        .unwrap_or_default();
    Ok(Account {
        account_id: record.id.clone(),
        label: record.label.clone().unwrap_or_default(),
        controller: record.controller.clone(),
        eth_address: Address::from_public_key(&secp).to_checksum(),
        secp256k1_public_key: secp.to_encoded_point(true).as_bytes().to_vec(),
        ed25519_public_key: ed.to_bytes().to_vec(),
        created_by: record.created_by.clone(),
        created_at: record.created_at,
        allowed: record.allowed.clone(),
        kek_version,
        key_version,
    })
}

/// Checks an account id's shape before it reaches the store.
pub(super) fn check_account_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() {
        return Err(ApiError::invalid("account_id", "is required"));
    }
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(ApiError::invalid("account_id", "is not an account id (UUID)"));
    }
    Ok(())
}

#[tonic::async_trait]
impl AccountService for AccountApi {
    async fn create_account(&self, request: Request<CreateAccountRequest>) -> Result<Response<Account>, Status> {
        self.0
            .handle("CreateAccount", request, |d, identity, req| async move {
                let controller = Address::parse(req.controller.trim())
                    .map_err(|e| ApiError::invalid("controller", e.to_string()))?;
                if req.label.chars().count() > MAX_LABEL_CHARS {
                    return Err(ApiError::invalid(
                        "label",
                        format!("at most {MAX_LABEL_CHARS} characters"),
                    ));
                }
                if req.label.chars().any(char::is_control) {
                    return Err(ApiError::invalid("label", "must not contain control characters"));
                }
                if req.allow.len() > MAX_ALLOW {
                    return Err(ApiError::invalid("allow", format!("at most {MAX_ALLOW} identities")));
                }
                for (i, a) in req.allow.iter().enumerate() {
                    if a.is_empty() || a.len() > MAX_IDENTITY_BYTES || a.chars().any(char::is_control) {
                        return Err(ApiError::invalid(format!("allow[{i}]"), "not a client identity"));
                    }
                }
                d.decide(
                    &identity,
                    Action::CreateAccount,
                    Resource::Service,
                    RequestContext::default(),
                )
                .await?;
                // The request's audit event is appended in the account's
                // insert transaction: no account exists without its event.
                let event = crate::audit::context::in_transaction(String::new(), String::new());
                let (record, seq) = d
                    .keys
                    .create_account_audited(
                        NewAccount {
                            controller,
                            label: (!req.label.is_empty()).then_some(req.label),
                            created_by: identity,
                            allowed: req.allow,
                        },
                        event,
                    )
                    .await?;
                if let Some(seq) = seq {
                    crate::audit::context::mark_recorded(seq);
                }
                if d.log_details {
                    tracing::info!(account = %record.id, "account created");
                }
                to_proto(&record)
            })
            .await
    }

    async fn get_account(&self, request: Request<GetAccountRequest>) -> Result<Response<Account>, Status> {
        self.0
            .handle("GetAccount", request, |d, identity, req| async move {
                check_account_id(&req.account_id)?;
                let record = d
                    .account_for(
                        &identity,
                        Action::GetAccount,
                        &req.account_id,
                        RequestContext::default(),
                    )
                    .await?;
                to_proto(&record)
            })
            .await
    }

    // ----- issue 5: per-account public keys -----------------------------------

    async fn get_account_jwks(
        &self,
        request: Request<GetAccountJwksRequest>,
    ) -> Result<Response<GetAccountJwksResponse>, Status> {
        self.0
            .handle("GetAccountJwks", request, |d, identity, req| async move {
                // Public information (also served without a client certificate);
                // the default policy `public-keys` permits it to every client.
                check_account_id(&req.account_id)?;
                let record = d
                    .account_for(
                        &identity,
                        Action::GetAccountJwks,
                        &req.account_id,
                        RequestContext::default(),
                    )
                    .await?;
                let public = crate::receipt::AccountPublic::of(&record, d.sessions.domain().chain_id)?;
                Ok(GetAccountJwksResponse {
                    jwks_json: serde_json::to_string(&public.jwks())
                        .map_err(|_| ApiError::Internal("JWKS does not encode"))?,
                    did_key: public.did_key,
                    did_pkh: public.did_pkh,
                })
            })
            .await
    }
}
