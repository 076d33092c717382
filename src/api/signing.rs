//! SigningService: SignTypedData, SignMessage.

use tonic::{Request, Response, Status};

use super::account::check_account_id;
use super::pb::signing_service_server::SigningService;
use super::pb::{
    SignMessageRequest, SignMessageResponse, SignTypedDataRequest, SignTypedDataResponse, SignatureAlgorithm,
};
use super::{ApiError, SigningApi, MAX_MESSAGE_BYTES, MAX_TYPED_DATA_BYTES};
use crate::authz::Action;
use crate::crypto::eip712::TypedData;
use crate::crypto::eth::personal_message_digest;

#[tonic::async_trait]
impl SigningService for SigningApi {
    async fn sign_typed_data(
        &self,
        request: Request<SignTypedDataRequest>,
    ) -> Result<Response<SignTypedDataResponse>, Status> {
        let d = &self.0;
        d.handle("SignTypedData", request, |identity, req| async move {
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
            let record = d.keys.record(&req.account_id).await?;
            d.authz.decide(&identity, Action::Sign, Some(&record))?;
            let digest = typed.signing_hash();
            let (keys, signature) = d.keys.sign_eth_digest(&req.account_id, digest).await?;
            Ok(SignTypedDataResponse {
                digest: digest.to_vec(),
                signature: signature.to_vec(),
                signer: keys.eth_address().to_checksum(),
            })
        })
        .await
    }

    async fn sign_message(
        &self,
        request: Request<SignMessageRequest>,
    ) -> Result<Response<SignMessageResponse>, Status> {
        let d = &self.0;
        d.handle("SignMessage", request, |identity, req| async move {
            check_account_id(&req.account_id)?;
            if req.data.len() > MAX_MESSAGE_BYTES {
                return Err(ApiError::invalid("data", format!("at most {MAX_MESSAGE_BYTES} bytes")));
            }
            let alg = SignatureAlgorithm::try_from(req.alg).unwrap_or(SignatureAlgorithm::Unspecified);
            if alg == SignatureAlgorithm::Unspecified {
                return Err(ApiError::invalid("alg", "must be SECP256K1 or ED25519"));
            }
            let record = d.keys.record(&req.account_id).await?;
            d.authz.decide(&identity, Action::Sign, Some(&record))?;
            match alg {
                SignatureAlgorithm::Ed25519 => {
                    let (keys, sig) = d.keys.sign_ed25519(&req.account_id, req.data).await?;
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
}
