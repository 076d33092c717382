//! `keyward jwks show | rotate [--alg] | revoke <kid>`.

use std::path::Path;

use clap::Subcommand;
use serde_json::json;

use super::client::{connect, RpcError};
use super::output::emit;
use super::ClientOpts;
use crate::api::pb::jwks_service_client::JwksServiceClient;
use crate::api::pb::{
    GetJwksRequest, IssuerKey, ListIssuerKeysRequest, RevokeIssuerKeyRequest, RotateIssuerKeyRequest,
};

/// Issuer key commands.
#[derive(Debug, Subcommand)]
pub enum JwksCmd {
    /// Show the published JWKS and (for admins) every issuer key with its state.
    Show,
    /// Promote the next key (published at least max-age ago) and publish a fresh next key.
    Rotate {
        /// Only this algorithm (EdDSA, ES256, ES256K); default: every configured one.
        #[arg(long)]
        alg: Option<String>,
    },
    /// Remove a key from the JWKS at once (compromise); the next key signs immediately.
    Revoke {
        /// The key id. Key ids are base64url thumbprints and may begin with `-`.
        #[arg(allow_hyphen_values = true)]
        kid: String,
    },
}

fn key_json(k: &IssuerKey) -> serde_json::Value {
    let t = |v: i64| if v == 0 { serde_json::Value::Null } else { json!(v) };
    json!({
        "kid": k.kid,
        "alg": k.alg,
        "state": k.state,
        "created_at": t(k.created_at),
        "activated_at": t(k.activated_at),
        "retired_at": t(k.retired_at),
        "revoked_at": t(k.revoked_at),
    })
}

/// Runs a jwks command.
pub async fn jwks(home: &Path, opts: &ClientOpts, cmd: JwksCmd) -> anyhow::Result<()> {
    let mut c = JwksServiceClient::new(connect(home, opts).await?);
    match cmd {
        JwksCmd::Show => {
            let doc = c.get_jwks(GetJwksRequest {}).await.map_err(RpcError)?.into_inner();
            let jwks: serde_json::Value = serde_json::from_str(&doc.jwks_json)?;
            // The key list needs an admin; others see the published set only.
            let keys = match c.list_issuer_keys(ListIssuerKeysRequest {}).await {
                Ok(r) => Some(r.into_inner().keys),
                Err(s) if s.code() == tonic::Code::PermissionDenied => None,
                Err(s) => return Err(RpcError(s).into()),
            };
            let mut v = json!({ "jwks": jwks, "etag": doc.etag, "max_age_seconds": doc.max_age_seconds });
            let mut human = vec![
                ("etag", doc.etag.clone()),
                ("max_age", format!("{} s", doc.max_age_seconds)),
            ];
            let lines: Vec<String>;
            if let Some(keys) = &keys {
                v["issuer_keys"] = keys.iter().map(key_json).collect();
                lines = keys
                    .iter()
                    .map(|k| format!("{:<7} {:<8} {}", k.alg, k.state, k.kid))
                    .collect();
                for l in &lines {
                    human.push(("key", l.clone()));
                }
            } else {
                let published = jwks["keys"].as_array().cloned().unwrap_or_default();
                for k in published {
                    human.push((
                        "key",
                        format!(
                            "{:<7} {}",
                            k["alg"].as_str().unwrap_or("?"),
                            k["kid"].as_str().unwrap_or("?")
                        ),
                    ));
                }
            }
            emit(opts.json, &v, &human);
        }
        JwksCmd::Rotate { alg } => {
            let r = c
                .rotate_issuer_key(RotateIssuerKeyRequest {
                    alg: alg.unwrap_or_default(),
                })
                .await
                .map_err(RpcError)?
                .into_inner();
            let rotations: Vec<serde_json::Value> = r
                .rotations
                .iter()
                .map(|r| {
                    json!({
                        "alg": r.alg,
                        "activated": r.activated_kid,
                        "retired": r.retired_kid,
                        "next": r.next_kid,
                    })
                })
                .collect();
            let human: Vec<(&str, String)> = r
                .rotations
                .iter()
                .map(|r| {
                    (
                        "rotated",
                        format!("{} active {} (next {})", r.alg, r.activated_kid, r.next_kid),
                    )
                })
                .collect();
            emit(opts.json, &json!({ "rotations": rotations }), &human);
        }
        JwksCmd::Revoke { kid } => {
            let r = c
                .revoke_issuer_key(RevokeIssuerKeyRequest { kid: kid.clone() })
                .await
                .map_err(RpcError)?
                .into_inner();
            let before = r.revoked.as_ref().map(key_json).unwrap_or_default();
            emit(
                opts.json,
                &json!({ "revoked": kid, "before": before, "promoted": r.promoted_kid }),
                &[("revoked", kid.clone()), ("promoted", r.promoted_kid.clone())],
            );
        }
    }
    Ok(())
}
