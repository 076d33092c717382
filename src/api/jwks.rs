//! JwksService: the published key set (any client) and the issuer key lifecycle
//! (admins, by the default policy set).

use std::str::FromStr;

use tonic::{Request, Response, Status};

use super::pb::jwks_service_server::JwksService;
use super::pb::{
    GetJwksRequest, GetJwksResponse, IssuerKey, ListIssuerKeysRequest, ListIssuerKeysResponse, RevokeIssuerKeyRequest,
    RevokeIssuerKeyResponse, RotateIssuerKeyRequest, RotateIssuerKeyResponse, Rotation,
};
use super::{ApiError, Daemon, JwksApi};
use crate::hsm::IssuerAlg;
use crate::policy::{Action, RequestContext, Resource};
use crate::store::IssuerKeyRecord;

fn key_proto(r: &IssuerKeyRecord) -> IssuerKey {
    IssuerKey {
        kid: r.kid.clone(),
        alg: r.alg.clone(),
        state: r.state.as_str().into(),
        created_at: r.created_at,
        activated_at: r.activated_at.unwrap_or_default(),
        retired_at: r.retired_at.unwrap_or_default(),
        revoked_at: r.revoked_at.unwrap_or_default(),
        jwk_json: r.jwk.clone(),
    }
}

impl Daemon {
    async fn require(&self, identity: &str, action: Action) -> Result<(), ApiError> {
        self.decide(identity, action, Resource::Service, RequestContext::default())
            .await
            .map(|_| ())
    }
}

#[tonic::async_trait]
impl JwksService for JwksApi {
    async fn get_jwks(&self, request: Request<GetJwksRequest>) -> Result<Response<GetJwksResponse>, Status> {
        self.0
            .handle("GetJwks", request, |d, identity, _req| async move {
                // Public (the default policy `public-keys`), still decided.
                d.require(&identity, Action::GetJwks).await?;
                let doc = d.jwks.document();
                Ok(GetJwksResponse {
                    jwks_json: doc.body,
                    etag: doc.etag,
                    max_age_seconds: u64::try_from(doc.max_age).unwrap_or_default(),
                })
            })
            .await
    }

    async fn list_issuer_keys(
        &self,
        request: Request<ListIssuerKeysRequest>,
    ) -> Result<Response<ListIssuerKeysResponse>, Status> {
        self.0
            .handle("ListIssuerKeys", request, |d, identity, _req| async move {
                d.require(&identity, Action::ListIssuerKeys).await?;
                let keys = d.jwks.list().await?;
                Ok(ListIssuerKeysResponse {
                    keys: keys.iter().map(key_proto).collect(),
                })
            })
            .await
    }

    async fn rotate_issuer_key(
        &self,
        request: Request<RotateIssuerKeyRequest>,
    ) -> Result<Response<RotateIssuerKeyResponse>, Status> {
        self.0
            .handle("RotateIssuerKey", request, |d, identity, req| async move {
                d.require(&identity, Action::RotateIssuerKey).await?;
                let alg = match req.alg.as_str() {
                    "" => None,
                    a => Some(IssuerAlg::from_str(a).map_err(|e| ApiError::invalid("alg", e.to_string()))?),
                };
                let rotations = d.jwks.rotate(alg).await?;
                Ok(RotateIssuerKeyResponse {
                    rotations: rotations
                        .into_iter()
                        .map(|r| Rotation {
                            alg: r.alg.as_str().into(),
                            activated_kid: r.activated,
                            retired_kid: r.retired.unwrap_or_default(),
                            next_kid: r.next.unwrap_or_default(),
                        })
                        .collect(),
                })
            })
            .await
    }

    async fn revoke_issuer_key(
        &self,
        request: Request<RevokeIssuerKeyRequest>,
    ) -> Result<Response<RevokeIssuerKeyResponse>, Status> {
        self.0
            .handle("RevokeIssuerKey", request, |d, identity, req| async move {
                d.require(&identity, Action::RevokeIssuerKey).await?;
                if req.kid.is_empty() || req.kid.len() > 64 {
                    return Err(ApiError::invalid("kid", "must be 1 to 64 characters"));
                }
                let outcome = d.jwks.revoke(&req.kid).await?;
                Ok(RevokeIssuerKeyResponse {
                    revoked: Some(key_proto(&outcome.before)),
                    promoted_kid: outcome.promoted.unwrap_or_default(),
                })
            })
            .await
    }
}
