//! AccountService: CreateAccount, GetAccount, GetAccountJwks, ListAccounts, UpdateAccount,
//! FreezeAccount, UnfreezeAccount, DeleteAccount, RotateAccountKeys.

use sha2::Digest as _;
use tonic::{Request, Response, Status};

use super::pb::account_service_server::AccountService;
use super::pb::{
    Account, CancelControllerChangeRequest, ChangeControllerRequest, ControllerChange, CreateAccountRequest,
    CreateImportJobRequest, DeleteAccountRequest, FreezeAccountRequest, GetAccountJwksRequest, GetAccountJwksResponse,
    GetAccountRequest, ImportAccountRequest, ImportJob, ListAccountsRequest, ListAccountsResponse,
    RotateAccountKeysRequest, UnfreezeAccountRequest, UpdateAccountRequest,
};
use super::{AccountApi, ApiError};
use crate::crypto::eth::Address;
use crate::keys::KeyError;
use crate::keys::{public_keys, NewAccount};
use crate::policy::{Action, RequestContext, Resource};
use crate::store::{AccountChange, AccountFilter, AccountRecord, ControllerChangeRecord, Frozen};
use crate::types::KeyAlg;

const MAX_LABEL_CHARS: usize = 128;
const MAX_ALLOW: usize = 64;
const MAX_IDENTITY_BYTES: usize = 1024;
const MAX_REASON_CHARS: usize = 256;
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

fn check_label(label: &str) -> Result<(), ApiError> {
    if label.chars().count() > MAX_LABEL_CHARS {
        return Err(ApiError::invalid(
            "label",
            format!("at most {MAX_LABEL_CHARS} characters"),
        ));
    }
    if label.chars().any(char::is_control) {
        return Err(ApiError::invalid("label", "must not contain control characters"));
    }
    Ok(())
}

/// An operator's reason for a freeze or a deletion, trimmed.
fn check_reason(reason: &str) -> Result<&str, ApiError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.chars().count() > MAX_REASON_CHARS || reason.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "reason",
            format!("1 to {MAX_REASON_CHARS} characters, no control characters"),
        ));
    }
    Ok(reason)
}

fn check_allow(allow: &[String]) -> Result<(), ApiError> {
    if allow.len() > MAX_ALLOW {
        return Err(ApiError::invalid("allow", format!("at most {MAX_ALLOW} identities")));
    }
    for (i, a) in allow.iter().enumerate() {
        if a.is_empty() || a.len() > MAX_IDENTITY_BYTES || a.chars().any(char::is_control) {
            return Err(ApiError::invalid(format!("allow[{i}]"), "not a client identity"));
        }
    }
    Ok(())
}

/// The account `id` once `identity` may do `action` on it, read from the store rather than this
/// replica's cache: the change RPCs decide and check the account's state as it is now (another
/// replica may have changed it a moment ago).
async fn fresh_account(
    d: &super::Daemon,
    identity: &str,
    action: Action,
    id: &str,
    context: RequestContext,
) -> Result<std::sync::Arc<AccountRecord>, ApiError> {
    d.keys.evict(id);
    d.account_for(identity, action, id, context).await
}

/// How long an import job's transport key waits for its key.
const IMPORT_JOB_SECONDS: i64 = 3600;

/// Destroys the transport keys on this replica's token whose jobs can no longer be taken
/// (expired or used, or unknown to the store): an abandoned job leaves nothing behind past
/// its expiry once this replica makes its next job. Best effort: failures are logged.
async fn sweep_transport_keys(d: &super::Daemon) {
    let hsm = d.keys.hsm().clone();
    let jobs = match tokio::task::spawn_blocking(move || hsm.transport_jobs()).await {
        Ok(Ok(jobs)) => jobs,
        Ok(Err(e)) => return tracing::warn!(error = %e, "listing transport keys failed"),
        Err(_) => return,
    };
    let now = d.sessions.now();
    for job in jobs {
        match d.keys.store().import_job_open(&job, now).await {
            Ok(true) => {}
            Ok(false) => {
                let hsm = d.keys.hsm().clone();
                let j = job.clone();
                match tokio::task::spawn_blocking(move || hsm.destroy_transport_key(&j)).await {
                    Ok(Ok(())) => tracing::info!(job = %job, "transport key of a closed import job destroyed"),
                    Ok(Err(e)) => tracing::warn!(job = %job, error = %e, "destroying a transport key failed"),
                    Err(_) => {}
                }
            }
            Err(e) => tracing::warn!(job = %job, error = %e, "reading an import job failed"),
        }
    }
}

/// How far ahead a signed ControllerChange may be valid.
const MAX_CHANGE_VALIDITY: i64 = 86_400;

fn change_to_proto(d: &super::Daemon, c: &ControllerChangeRecord, typed_data_json: String) -> ControllerChange {
    let cancellation = match (c.state.as_str(), Address::parse(&c.old_controller)) {
        ("pending", Ok(controller)) => serde_json::to_string(&crate::session::controller_change_cancellation(
            d.sessions.domain(),
            &c.account_id,
            controller,
            &c.id,
        ))
        .unwrap_or_default(),
        _ => String::new(),
    };
    ControllerChange {
        cancellation_typed_data_json: cancellation,
        change_id: c.id.clone(),
        account_id: c.account_id.clone(),
        old_controller: c.old_controller.clone(),
        new_controller: c.new_controller.clone(),
        requested_at: c.requested_at,
        effective_at: c.effective_at,
        state: c.state.clone(),
        typed_data_json,
        controller_signed: c.digest.is_some(),
    }
}

/// Applies `change` to an account the caller may change (checked already), with the request's
/// audit event in the same transaction; drops the account from this replica's cache at once
/// (the others drop it when they read the change feed) and returns it as it is now.
async fn change(d: &super::Daemon, id: &str, change: AccountChange, digest: String) -> Result<Account, ApiError> {
    let event = crate::audit::context::in_transaction(digest, String::new());
    let (found, seq) = d
        .keys
        .store()
        .change_account_audited(id, &change, crate::clock::unix_now(), event.as_ref())
        .await
        .map_err(KeyError::from)?;
    if let Some(seq) = seq {
        crate::audit::context::mark_recorded(seq);
    }
    d.keys.evict(id);
    if !found {
        return Err(KeyError::AccountNotFound(id.to_string()).into());
    }
    let record = d.keys.record(id).await?;
    to_proto(&record)
}

fn to_proto(record: &AccountRecord) -> Result<Account, ApiError> {
    let (secp, ed) = public_keys(record)?;
    let (kek_version, key_version) = record
        .keys
        .iter()
        .filter(|k| k.alg == KeyAlg::Secp256k1)
        .max_by_key(|k| k.key_version)
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
        frozen: record.frozen.is_some(),
        frozen_at: record.frozen.as_ref().map_or(0, |f| f.at),
        frozen_reason: record.frozen.as_ref().map(|f| f.reason.clone()).unwrap_or_default(),
        deleted_at: record.deleted_at.unwrap_or(0),
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
                check_label(&req.label)?;
                check_allow(&req.allow)?;
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

    // ----- issue 13 §5: the account lifecycle ---------------------------------

    async fn list_accounts(
        &self,
        request: Request<ListAccountsRequest>,
    ) -> Result<Response<ListAccountsResponse>, Status> {
        self.0
            .handle("ListAccounts", request, |d, identity, req| async move {
                let limit = match req.page_size {
                    0 => DEFAULT_PAGE,
                    n if n > MAX_PAGE => {
                        return Err(ApiError::invalid("page_size", format!("at most {MAX_PAGE}")));
                    }
                    n => n,
                };
                if !req.page_token.is_empty() && uuid::Uuid::parse_str(&req.page_token).is_err() {
                    return Err(ApiError::invalid("page_token", "is not a page token of this list"));
                }
                if !req.controller.is_empty() {
                    Address::parse(req.controller.trim())
                        .map_err(|e| ApiError::invalid("controller", e.to_string()))?;
                }
                d.decide(
                    &identity,
                    Action::ListAccounts,
                    Resource::Service,
                    RequestContext::default(),
                )
                .await?;
                let some = |s: String| (!s.is_empty()).then_some(s);
                let filter = AccountFilter {
                    label: some(req.label),
                    controller: some(req.controller.trim().to_string()),
                    created_by: some(req.created_by),
                    include_deleted: req.include_deleted,
                };
                let after = some(req.page_token);
                let ids = d
                    .keys
                    .store()
                    .list_account_ids(&filter, after.as_deref(), limit)
                    .await
                    .map_err(KeyError::from)?;
                let mut accounts = Vec::with_capacity(ids.len());
                // From the store, not this replica's cache: a list shows every change made
                // anywhere before it.
                for id in &ids {
                    let record = d.keys.store().get_account(id).await.map_err(KeyError::from)?;
                    if let Some(r) = record {
                        accounts.push(to_proto(&r)?);
                    }
                }
                let full = u32::try_from(ids.len()).unwrap_or(u32::MAX) >= limit;
                Ok(ListAccountsResponse {
                    accounts,
                    next_page_token: if full {
                        ids.last().cloned().unwrap_or_default()
                    } else {
                        String::new()
                    },
                })
            })
            .await
    }

    async fn update_account(&self, request: Request<UpdateAccountRequest>) -> Result<Response<Account>, Status> {
        self.0
            .handle("UpdateAccount", request, |d, identity, req| async move {
                check_account_id(&req.account_id)?;
                if let Some(label) = &req.label {
                    check_label(label)?;
                }
                if req.set_allow {
                    check_allow(&req.allow)?;
                } else if !req.allow.is_empty() {
                    return Err(ApiError::invalid("allow", "is given without set_allow"));
                }
                if req.label.is_none() && !req.set_allow {
                    return Err(ApiError::invalid(
                        "label",
                        "nothing to change: give label and/or set_allow",
                    ));
                }
                fresh_account(
                    &d,
                    &identity,
                    Action::UpdateAccount,
                    &req.account_id,
                    RequestContext::default(),
                )
                .await?;
                let update = AccountChange {
                    label: req.label.map(|l| (!l.is_empty()).then_some(l)),
                    allowed: req.set_allow.then_some(req.allow),
                    ..AccountChange::default()
                };
                change(&d, &req.account_id, update, String::new()).await
            })
            .await
    }

    async fn freeze_account(&self, request: Request<FreezeAccountRequest>) -> Result<Response<Account>, Status> {
        self.0
            .handle("FreezeAccount", request, |d, identity, req| async move {
                check_account_id(&req.account_id)?;
                let reason = check_reason(&req.reason)?;
                let record = fresh_account(
                    &d,
                    &identity,
                    Action::FreezeAccount,
                    &req.account_id,
                    RequestContext::default(),
                )
                .await?;
                if record.frozen.is_some() {
                    // Already frozen: the first freeze's time and reason stay.
                    return to_proto(&record);
                }
                let frozen = Frozen {
                    at: d.sessions.now(),
                    reason: reason.to_string(),
                };
                let account = change(
                    &d,
                    &req.account_id,
                    AccountChange {
                        frozen: Some(Some(frozen)),
                        ..AccountChange::default()
                    },
                    hex::encode(sha2::Sha256::digest(reason.as_bytes())),
                )
                .await?;
                tracing::warn!(account = %req.account_id, by = %identity, "account frozen");
                Ok(account)
            })
            .await
    }

    async fn unfreeze_account(&self, request: Request<UnfreezeAccountRequest>) -> Result<Response<Account>, Status> {
        self.0
            .handle("UnfreezeAccount", request, |d, identity, req| async move {
                check_account_id(&req.account_id)?;
                let record = fresh_account(
                    &d,
                    &identity,
                    Action::UnfreezeAccount,
                    &req.account_id,
                    RequestContext::default(),
                )
                .await?;
                if record.frozen.is_none() {
                    return to_proto(&record);
                }
                let account = change(
                    &d,
                    &req.account_id,
                    AccountChange {
                        frozen: Some(None),
                        ..AccountChange::default()
                    },
                    String::new(),
                )
                .await?;
                tracing::warn!(account = %req.account_id, by = %identity, "account unfrozen");
                Ok(account)
            })
            .await
    }

    async fn delete_account(&self, request: Request<DeleteAccountRequest>) -> Result<Response<Account>, Status> {
        self.0
            .handle("DeleteAccount", request, |d, identity, req| async move {
                check_account_id(&req.account_id)?;
                let reason = check_reason(&req.reason)?;
                let record = fresh_account(&d, &identity, Action::DeleteAccount, &req.account_id, RequestContext::default())
                    .await?;
                if record.deleted_at.is_some() {
                    // Already deleted: nothing more to destroy.
                    return to_proto(&record);
                }
                let account = change(
                    &d,
                    &req.account_id,
                    AccountChange {
                        deleted_at: Some(d.sessions.now()),
                        ..AccountChange::default()
                    },
                    hex::encode(sha2::Sha256::digest(reason.as_bytes())),
                )
                .await?;
                tracing::warn!(account = %req.account_id, by = %identity, "account deleted: its private keys are destroyed");
                Ok(account)
            })
            .await
    }

    async fn rotate_account_keys(
        &self,
        request: Request<RotateAccountKeysRequest>,
    ) -> Result<Response<Account>, Status> {
        self.0
            .handle("RotateAccountKeys", request, |d, identity, req| async move {
                check_account_id(&req.account_id)?;
                let reason = check_reason(&req.reason)?;
                let record = fresh_account(
                    &d,
                    &identity,
                    Action::RotateAccountKeys,
                    &req.account_id,
                    RequestContext::default(),
                )
                .await?;
                let version = record.keys.iter().map(|k| k.key_version).max().unwrap_or(0);
                let next = version
                    .checked_add(1)
                    .ok_or(ApiError::Internal("key version overflow"))?;
                let keys = d.keys.generate(next).await?;
                // A concurrent rotation stored this version first: CONFLICT, answered ABORTED,
                // and the keys made here are never stored.
                let account = change(
                    &d,
                    &req.account_id,
                    AccountChange {
                        new_keys: Some(keys),
                        ..AccountChange::default()
                    },
                    hex::encode(sha2::Sha256::digest(reason.as_bytes())),
                )
                .await?;
                tracing::warn!(account = %req.account_id, by = %identity, key_version = next, "account keys rotated");
                Ok(account)
            })
            .await
    }

    async fn change_controller(
        &self,
        request: Request<ChangeControllerRequest>,
    ) -> Result<Response<ControllerChange>, Status> {
        self.0
            .handle("ChangeController", request, |d, identity, req| async move {
                check_account_id(&req.account_id)?;
                let new = Address::parse(req.new_controller.trim())
                    .map_err(|e| ApiError::invalid("new_controller", e.to_string()))?;
                // A document to sign (prepare_only) is for a controller-signed change.
                let signed = !req.controller_signature.is_empty() || req.prepare_only;
                let context = RequestContext {
                    controller_signed: signed,
                    ..RequestContext::default()
                };
                let record = fresh_account(&d, &identity, Action::ChangeController, &req.account_id, context)
                    .await?;
                let current = Address::parse(&record.controller)
                    .map_err(|_| ApiError::Internal("stored controller does not parse"))?;
                if new == current {
                    return Err(ApiError::invalid("new_controller", "is the current controller"));
                }
                let now = d.sessions.now();
                if signed && (req.valid_before <= now || req.valid_before > now.saturating_add(MAX_CHANGE_VALIDITY)) {
                    return Err(ApiError::invalid(
                        "valid_before",
                        format!("must be after now ({now}) and at most {MAX_CHANGE_VALIDITY} s ahead"),
                    ));
                }
                let doc = crate::session::controller_change(
                    d.sessions.domain(),
                    &record.id,
                    current,
                    new,
                    req.valid_before,
                );
                let typed_data_json =
                    serde_json::to_string(&doc).map_err(|_| ApiError::Internal("document does not encode"))?;
                let unsigned = ControllerChangeRecord {
                    id: String::new(),
                    account_id: record.id.clone(),
                    old_controller: current.to_checksum(),
                    new_controller: new.to_checksum(),
                    requested_by: identity.clone(),
                    requested_at: now,
                    effective_at: now.saturating_add(d.controller_change_delay),
                    digest: None,
                    state: "unsigned".into(),
                    settled_at: None,
                };
                if req.prepare_only {
                    return Ok(change_to_proto(&d, &unsigned, typed_data_json));
                }
                let digest = if signed {
                    let hash = crate::session::check_controller_signature(&doc, current, &req.controller_signature)?;
                    Some(hex::encode(hash))
                } else {
                    None
                };
                let rec = ControllerChangeRecord {
                    id: uuid::Uuid::new_v4().to_string(),
                    digest,
                    state: "pending".into(),
                    ..unsigned
                };
                let event = crate::audit::context::in_transaction(
                    rec.digest.clone().unwrap_or_default(),
                    format!("controller-change:{}", rec.id),
                );
                let seq = d
                    .keys
                    .store()
                    .request_controller_change_audited(&rec, crate::clock::unix_now(), event.as_ref())
                    .await
                    .map_err(|e| match e {
                        crate::store::StoreError::Conflict { what } => ApiError::Key(KeyError::Conflict(what)),
                        other => KeyError::from(other).into(),
                    })?;
                if let Some(seq) = seq {
                    crate::audit::context::mark_recorded(seq);
                }
                let mut rec = rec;
                if rec.effective_at <= rec.requested_at {
                    d.keys.evict(&rec.account_id);
                    rec.state = "applied".into();
                    rec.settled_at = Some(now);
                }
                tracing::warn!(account = %rec.account_id, by = %identity, effective_at = rec.effective_at, "controller change requested");
                Ok(change_to_proto(&d, &rec, typed_data_json))
            })
            .await
    }

    async fn cancel_controller_change(
        &self,
        request: Request<CancelControllerChangeRequest>,
    ) -> Result<Response<ControllerChange>, Status> {
        self.0
            .handle("CancelControllerChange", request, |d, identity, req| async move {
                check_account_id(&req.account_id)?;
                let signed = !req.controller_signature.is_empty();
                if signed && uuid::Uuid::parse_str(&req.change_id).is_err() {
                    return Err(ApiError::invalid("change_id", "is required with controller_signature"));
                }
                let record = fresh_account(
                    &d,
                    &identity,
                    Action::CancelControllerChange,
                    &req.account_id,
                    RequestContext {
                        controller_signed: signed,
                        ..RequestContext::default()
                    },
                )
                .await?;
                if signed {
                    let controller = Address::parse(&record.controller)
                        .map_err(|_| ApiError::Internal("stored controller does not parse"))?;
                    let doc = crate::session::controller_change_cancellation(
                        d.sessions.domain(),
                        &record.id,
                        controller,
                        &req.change_id,
                    );
                    crate::session::check_controller_signature(&doc, controller, &req.controller_signature)?;
                }
                let only = (!req.change_id.is_empty()).then_some(req.change_id.as_str());
                let event = crate::audit::context::in_transaction(String::new(), String::new());
                let (cancelled, seq) = d
                    .keys
                    .store()
                    .cancel_controller_change_audited(&req.account_id, only, d.sessions.now(), event.as_ref())
                    .await
                    .map_err(KeyError::from)?;
                if let Some(seq) = seq {
                    crate::audit::context::mark_recorded(seq);
                }
                let cancelled =
                    cancelled.ok_or_else(|| ApiError::Key(KeyError::NoPendingChange(req.account_id.clone())))?;
                tracing::warn!(account = %req.account_id, by = %identity, "controller change cancelled");
                Ok(change_to_proto(&d, &cancelled, String::new()))
            })
            .await
    }

    async fn create_import_job(&self, request: Request<CreateImportJobRequest>) -> Result<Response<ImportJob>, Status> {
        self.0
            .handle("CreateImportJob", request, |d, identity, _req| async move {
                d.decide(
                    &identity,
                    Action::CreateImportJob,
                    Resource::Service,
                    RequestContext::default(),
                )
                .await?;
                sweep_transport_keys(&d).await;
                let job = uuid::Uuid::new_v4().to_string();
                let hsm = d.keys.hsm().clone();
                let id = job.clone();
                let key = tokio::task::spawn_blocking(move || hsm.create_transport_key(&id))
                    .await
                    .map_err(|_| ApiError::Internal("transport key task failed"))?
                    .map_err(KeyError::from)?;
                use rsa::pkcs8::EncodePublicKey as _;
                let public_key_der = rsa::RsaPublicKey::new(
                    rsa::BigUint::from_bytes_be(&key.modulus),
                    rsa::BigUint::from_bytes_be(&key.exponent),
                )
                .and_then(|k| k.to_public_key_der().map_err(|e| rsa::Error::Pkcs8(e.into())))
                .map_err(|_| ApiError::Internal("the transport key does not encode"))?
                .into_vec();
                let now = d.sessions.now();
                let expires_at = now.saturating_add(IMPORT_JOB_SECONDS);
                let event = crate::audit::context::in_transaction(String::new(), format!("import-job:{job}"));
                let seq = d
                    .keys
                    .store()
                    .create_import_job_audited(&job, &identity, now, expires_at, event.as_ref())
                    .await
                    .map_err(KeyError::from)?;
                if let Some(seq) = seq {
                    crate::audit::context::mark_recorded(seq);
                }
                Ok(ImportJob {
                    job_id: job,
                    public_key_der,
                    expires_at,
                })
            })
            .await
    }

    async fn import_account(&self, request: Request<ImportAccountRequest>) -> Result<Response<Account>, Status> {
        self.0
            .handle("ImportAccount", request, |d, identity, req| async move {
                if uuid::Uuid::parse_str(&req.job_id).is_err() {
                    return Err(ApiError::invalid("job_id", "is not an import job id"));
                }
                let alg = match req.alg.as_str() {
                    "secp256k1" => KeyAlg::Secp256k1,
                    "ed25519" => KeyAlg::Ed25519,
                    _ => return Err(ApiError::invalid("alg", "must be secp256k1 or ed25519")),
                };
                if req.wrapped_key.is_empty() || req.wrapped_key.len() > 1024 {
                    return Err(ApiError::invalid("wrapped_key", "is not an RSA-OAEP ciphertext"));
                }
                let controller = Address::parse(req.controller.trim())
                    .map_err(|e| ApiError::invalid("controller", e.to_string()))?;
                check_label(&req.label)?;
                check_allow(&req.allow)?;
                d.decide(
                    &identity,
                    Action::ImportAccount,
                    Resource::Service,
                    RequestContext::default(),
                )
                .await?;
                if let Some(why) = d
                    .keys
                    .store()
                    .take_import_job(&req.job_id, d.sessions.now())
                    .await
                    .map_err(KeyError::from)?
                {
                    return Err(KeyError::Conflict(why).into());
                }
                let event = crate::audit::context::in_transaction(String::new(), format!("import-job:{}", req.job_id));
                let (record, seq) = d
                    .keys
                    .import_account_audited(
                        NewAccount {
                            controller,
                            label: (!req.label.is_empty()).then_some(req.label),
                            created_by: identity,
                            allowed: req.allow,
                        },
                        req.job_id,
                        alg,
                        req.wrapped_key,
                        event,
                    )
                    .await?;
                if let Some(seq) = seq {
                    crate::audit::context::mark_recorded(seq);
                }
                to_proto(&record)
            })
            .await
    }
}
