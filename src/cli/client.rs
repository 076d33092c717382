//! Client commands: account create/show, sign typed-data/message.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};
use serde_json::json;
use tonic::transport::Channel;

use super::output::{emit, hex0x};
use super::ClientOpts;
use crate::api::pb::account_service_client::AccountServiceClient;
use crate::api::pb::signing_service_client::SigningServiceClient;
use crate::api::pb::{
    Account, CancelControllerChangeRequest, ChangeControllerRequest, ControllerChange, CreateAccountRequest,
    CreateImportJobRequest, DeleteAccountRequest, FreezeAccountRequest, GetAccountRequest, ImportAccountRequest,
    ListAccountsRequest, RotateAccountKeysRequest, SignMessageRequest, SignTypedDataRequest, SignatureAlgorithm,
    UnfreezeAccountRequest, UpdateAccountRequest,
};
use crate::dev::read_client_file;
use crate::metrics::code_name;
use crate::tls::ClientTlsFiles;

/// A failed RPC, printed as its gRPC status name and message.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}", code_name(.0.code()), .0.message())]
pub struct RpcError(pub tonic::Status);

/// Account commands.
#[derive(Debug, Subcommand)]
pub enum AccountCmd {
    /// Create an account (secp256k1 + Ed25519 keys generated in the HSM).
    Create {
        /// Controller wallet address (0x...).
        #[arg(long)]
        controller: String,
        /// Label.
        #[arg(long, default_value = "")]
        label: String,
        /// Further identities allowed to have the account sign (repeatable).
        #[arg(long)]
        allow: Vec<String>,
    },
    /// Create an account with an existing key (bring your own key): the key is encrypted here to
    /// a one-time transport key the daemon makes in its token (RSA-OAEP, SHA-1), never sent in
    /// the clear; the other algorithm's key is generated.
    Import {
        /// The imported key's algorithm.
        #[arg(long, value_enum)]
        alg: AlgArg,
        /// A file holding the key's 32 bytes in hex (the secp256k1 private key, or the Ed25519
        /// seed); `-` reads standard input.
        #[arg(long)]
        key_file: PathBuf,
        /// Controller wallet address (0x...).
        #[arg(long)]
        controller: String,
        /// Label.
        #[arg(long, default_value = "")]
        label: String,
        /// Further identities allowed to have the account sign (repeatable).
        #[arg(long)]
        allow: Vec<String>,
    },
    /// Show an account.
    Show {
        /// Account id.
        account_id: String,
    },
    /// List accounts, a page at a time (`--page-token` from the previous page).
    List {
        /// Only accounts with exactly this label.
        #[arg(long, default_value = "")]
        label: String,
        /// Only accounts with this controller address.
        #[arg(long, default_value = "")]
        controller: String,
        /// Only accounts created by this client identity.
        #[arg(long, default_value = "")]
        created_by: String,
        /// Accounts per page (default 100, at most 1000).
        #[arg(long, default_value_t = 0)]
        page_size: u32,
        /// Where the previous page ended.
        #[arg(long, default_value = "")]
        page_token: String,
        /// Deleted accounts too.
        #[arg(long)]
        include_deleted: bool,
    },
    /// Change an account's label and/or the identities allowed to use it.
    Update {
        /// Account id.
        account_id: String,
        /// The new label ("" clears it).
        #[arg(long)]
        label: Option<String>,
        /// Replace the allowed identities with these (repeatable).
        #[arg(long)]
        allow: Vec<String>,
        /// Remove every allowed identity.
        #[arg(long, conflicts_with = "allow")]
        clear_allow: bool,
    },
    /// Freeze an account: it signs nothing (sessions included) until unfrozen.
    Freeze {
        /// Account id.
        account_id: String,
        /// Why (kept with the account; the audit log binds it by hash).
        #[arg(long)]
        reason: String,
    },
    /// End an account's freeze.
    Unfreeze {
        /// Account id.
        account_id: String,
    },
    /// Give an account new keys (its next key version): its Ethereum address and DIDs change;
    /// the old public keys stay in its JWKS for verifiers.
    RotateKeys {
        /// Account id.
        account_id: String,
        /// Why (the audit log binds it by hash).
        #[arg(long)]
        reason: String,
    },
    /// Hand an account to another controller wallet. With `--prepare`, print the
    /// ControllerChange document for the current controller to sign (`keyward wallet
    /// sign-typed-data`); with `--signature`, submit it; with neither, an operator's change.
    /// It takes effect after the deployment's delay.
    ChangeController {
        /// Account id.
        account_id: String,
        /// The new controller's 0x address.
        #[arg(long)]
        new: String,
        /// The signed document is valid until then (unix seconds; default: an hour from now).
        #[arg(long)]
        valid_before: Option<i64>,
        /// Print the document to sign; change nothing.
        #[arg(long, conflicts_with = "signature")]
        prepare: bool,
        /// The current controller's signature over the document (0x hex, 65 bytes).
        #[arg(long)]
        signature: Option<String>,
    },
    /// Cancel an account's pending controller change: an operator's cancellation, or with
    /// `--signature` the current controller's (over the change's cancellation document).
    CancelControllerChange {
        /// Account id.
        account_id: String,
        /// The pending change (required with --signature).
        #[arg(long, default_value = "")]
        change_id: String,
        /// The current controller's signature (0x hex, 65 bytes).
        #[arg(long)]
        signature: Option<String>,
    },
    /// Delete an account: its wrapped private keys are destroyed and its open sessions
    /// revoked; its id, public keys and audit history stay. Cannot be undone.
    Delete {
        /// Account id.
        account_id: String,
        /// Why (the audit log binds it by hash).
        #[arg(long)]
        reason: String,
        /// Confirm: the keys cannot be recovered.
        #[arg(long)]
        yes: bool,
    },
}

/// Message signature algorithms.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AlgArg {
    /// Ed25519 (RFC 8032) over the raw message.
    Ed25519,
    /// secp256k1 EIP-191 personal_sign.
    Secp256k1,
}

/// Signing commands.
#[derive(Debug, Subcommand)]
pub enum SignCmd {
    /// Sign an EIP-712 document (eth_signTypedData_v4 JSON; `-` reads stdin).
    TypedData {
        /// Account id.
        #[arg(long)]
        account: String,
        /// The JSON file.
        #[arg(long)]
        file: PathBuf,
        /// Sign inside a delegated session (token from `session open`).
        #[arg(long, default_value = "")]
        session: String,
        /// Idempotency key (session signing).
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Sign a Payment inside a delegated session.
    Payment(super::session::PaymentArgs),
    /// Sign an Ethereum transaction (EIP-1559, or legacy EIP-155 with --gas-price).
    Transaction(super::session::TransactionArgs),
    /// A receipt signed by the daemon's issuer key, with its audit sequence number.
    Receipt(super::receipt::ReceiptArgs),
    /// A contribution attestation signed by the account's own key.
    Attestation(super::receipt::AttestationArgs),
    /// Sign a message.
    Message {
        /// Account id.
        #[arg(long)]
        account: String,
        /// Algorithm.
        #[arg(long, value_enum)]
        alg: AlgArg,
        /// The message as hex.
        #[arg(long, conflicts_with = "data")]
        data_hex: Option<String>,
        /// The message as UTF-8 text.
        #[arg(long)]
        data: Option<String>,
    },
}

/// TLS files and endpoint for a profile, from flags or the home's client file.
pub fn resolve(home: &Path, opts: &ClientOpts) -> anyhow::Result<(String, ClientTlsFiles)> {
    let file = match (&opts.endpoint, &opts.ca, &opts.cert) {
        (Some(_), Some(_), Some(_)) => None,
        _ => Some(read_client_file(home)?),
    };
    let endpoint = match (&opts.endpoint, &file) {
        (Some(e), _) => e.clone(),
        (None, Some(f)) => f.endpoint.clone(),
        (None, None) => anyhow::bail!("no endpoint: pass --endpoint"),
    };
    let ca = match (&opts.ca, &file) {
        (Some(c), _) => c.clone(),
        (None, Some(f)) => f.ca.clone(),
        (None, None) => anyhow::bail!("no CA: pass --ca"),
    };
    let (cert, key) = match (&opts.cert, &opts.key, &file) {
        (Some(c), Some(k), _) => (c.clone(), k.clone()),
        (_, _, Some(f)) => {
            let p = f.profiles.get(&opts.profile).with_context(|| {
                format!(
                    "no client profile {:?} (have: {})",
                    opts.profile,
                    f.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })?;
            (p.cert.clone(), p.key.clone())
        }
        _ => anyhow::bail!("no client certificate: pass --cert and --key"),
    };
    let domain = opts
        .domain
        .clone()
        .or_else(|| file.as_ref().map(|f| f.domain.clone()))
        .unwrap_or_else(|| "localhost".into());
    Ok((
        endpoint,
        ClientTlsFiles {
            ca,
            cert: Some(cert),
            key: Some(key),
            domain,
        },
    ))
}

/// Opens one mTLS channel.
pub async fn connect(home: &Path, opts: &ClientOpts) -> anyhow::Result<Channel> {
    let (endpoint, files) = resolve(home, opts)?;
    crate::tls::connect(&endpoint, &files)
        .await
        .with_context(|| format!("cannot connect to {endpoint}"))
}

fn account_json(a: &Account) -> serde_json::Value {
    json!({
        "account_id": a.account_id,
        "label": a.label,
        "controller": a.controller,
        "eth_address": a.eth_address,
        "secp256k1_public_key": hex0x(&a.secp256k1_public_key),
        "ed25519_public_key": hex0x(&a.ed25519_public_key),
        "created_by": a.created_by,
        "created_at": a.created_at,
        "allowed": a.allowed,
        "kek_version": a.kek_version,
        "key_version": a.key_version,
        "frozen": a.frozen,
        "frozen_at": a.frozen.then_some(a.frozen_at),
        "frozen_reason": a.frozen.then_some(&a.frozen_reason),
        "deleted_at": (a.deleted_at != 0).then_some(a.deleted_at),
    })
}

fn print_account(json: bool, a: &Account) {
    emit(
        json,
        &account_json(a),
        &[
            ("account_id", a.account_id.clone()),
            ("label", a.label.clone()),
            ("controller", a.controller.clone()),
            ("eth_address", a.eth_address.clone()),
            ("secp256k1", hex0x(&a.secp256k1_public_key)),
            ("ed25519", hex0x(&a.ed25519_public_key)),
            ("created_by", a.created_by.clone()),
            (
                "deleted",
                if a.deleted_at != 0 {
                    format!("at {}", a.deleted_at)
                } else {
                    "no".into()
                },
            ),
            (
                "frozen",
                if a.frozen {
                    format!("since {}: {}", a.frozen_at, a.frozen_reason)
                } else {
                    "no".into()
                },
            ),
        ],
    );
}

fn print_controller_change(json_out: bool, c: &ControllerChange) {
    emit(
        json_out,
        &json!({
            "change_id": c.change_id,
            "account_id": c.account_id,
            "old_controller": c.old_controller,
            "new_controller": c.new_controller,
            "requested_at": c.requested_at,
            "effective_at": c.effective_at,
            "state": c.state,
            "controller_signed": c.controller_signed,
        }),
        &[
            ("change_id", c.change_id.clone()),
            ("account_id", c.account_id.clone()),
            ("old_controller", c.old_controller.clone()),
            ("new_controller", c.new_controller.clone()),
            ("state", c.state.clone()),
            ("effective_at", c.effective_at.to_string()),
            (
                "signed",
                if c.controller_signed {
                    "by the controller"
                } else {
                    "no (operator)"
                }
                .to_string(),
            ),
        ],
    );
}

/// A `--signature` value (0x hex) as bytes; none is empty.
fn signature_arg(signature: Option<&str>) -> anyhow::Result<Vec<u8>> {
    match signature {
        Some(h) => hex::decode(h.trim().trim_start_matches("0x")).context("--signature is not hex"),
        None => Ok(Vec::new()),
    }
}

/// Runs an account command.
pub async fn account(home: &Path, opts: &ClientOpts, cmd: AccountCmd) -> anyhow::Result<()> {
    match cmd {
        AccountCmd::Create {
            controller,
            label,
            allow,
        } => {
            let mut c = AccountServiceClient::new(connect(home, opts).await?);
            let a = c
                .create_account(CreateAccountRequest {
                    controller,
                    label,
                    allow,
                })
                .await
                .map_err(RpcError)?
                .into_inner();
            print_account(opts.json, &a);
        }
        AccountCmd::List {
            label,
            controller,
            created_by,
            page_size,
            page_token,
            include_deleted,
        } => {
            let mut c = AccountServiceClient::new(connect(home, opts).await?);
            let r = c
                .list_accounts(ListAccountsRequest {
                    page_size,
                    page_token,
                    label,
                    controller,
                    created_by,
                    include_deleted,
                })
                .await
                .map_err(RpcError)?
                .into_inner();
            if opts.json {
                let accounts: Vec<serde_json::Value> = r.accounts.iter().map(account_json).collect();
                println!(
                    "{}",
                    json!({"accounts": accounts, "next_page_token": r.next_page_token})
                );
            } else {
                for a in &r.accounts {
                    let state = if a.deleted_at != 0 {
                        "deleted"
                    } else if a.frozen {
                        "frozen"
                    } else {
                        "active"
                    };
                    println!("{}  {}  {:<6}  {}", a.account_id, a.eth_address, state, a.label);
                }
                if !r.next_page_token.is_empty() {
                    println!("next page: --page-token {}", r.next_page_token);
                }
            }
        }
        AccountCmd::Update {
            account_id,
            label,
            allow,
            clear_allow,
        } => {
            let mut c = AccountServiceClient::new(connect(home, opts).await?);
            let set_allow = clear_allow || !allow.is_empty();
            let a = c
                .update_account(UpdateAccountRequest {
                    account_id,
                    label,
                    set_allow,
                    allow,
                })
                .await
                .map_err(RpcError)?
                .into_inner();
            print_account(opts.json, &a);
        }
        AccountCmd::Freeze { account_id, reason } => {
            let mut c = AccountServiceClient::new(connect(home, opts).await?);
            let a = c
                .freeze_account(FreezeAccountRequest { account_id, reason })
                .await
                .map_err(RpcError)?
                .into_inner();
            print_account(opts.json, &a);
        }
        AccountCmd::Delete {
            account_id,
            reason,
            yes,
        } => {
            anyhow::ensure!(
                yes,
                "deleting {account_id} destroys its private keys for good: add --yes to go on"
            );
            let mut c = AccountServiceClient::new(connect(home, opts).await?);
            let a = c
                .delete_account(DeleteAccountRequest { account_id, reason })
                .await
                .map_err(RpcError)?
                .into_inner();
            print_account(opts.json, &a);
        }
        AccountCmd::ChangeController {
            account_id,
            new,
            valid_before,
            prepare,
            signature,
        } => {
            let controller_signature = signature_arg(signature.as_deref())?;
            let valid_before = match valid_before {
                Some(t) => t,
                None if prepare || signature.is_some() => crate::clock::unix_now() + 3600,
                None => 0,
            };
            let mut c = AccountServiceClient::new(connect(home, opts).await?);
            let r = c
                .change_controller(ChangeControllerRequest {
                    account_id,
                    new_controller: new,
                    valid_before,
                    controller_signature,
                    prepare_only: prepare,
                })
                .await
                .map_err(RpcError)?
                .into_inner();
            if prepare {
                println!("{}", r.typed_data_json);
            } else {
                print_controller_change(opts.json, &r);
            }
        }
        AccountCmd::CancelControllerChange {
            account_id,
            change_id,
            signature,
        } => {
            let controller_signature = signature_arg(signature.as_deref())?;
            let mut c = AccountServiceClient::new(connect(home, opts).await?);
            let r = c
                .cancel_controller_change(CancelControllerChangeRequest {
                    account_id,
                    change_id,
                    controller_signature,
                })
                .await
                .map_err(RpcError)?
                .into_inner();
            print_controller_change(opts.json, &r);
        }
        AccountCmd::RotateKeys { account_id, reason } => {
            let mut c = AccountServiceClient::new(connect(home, opts).await?);
            let a = c
                .rotate_account_keys(RotateAccountKeysRequest { account_id, reason })
                .await
                .map_err(RpcError)?
                .into_inner();
            print_account(opts.json, &a);
        }
        AccountCmd::Unfreeze { account_id } => {
            let mut c = AccountServiceClient::new(connect(home, opts).await?);
            let a = c
                .unfreeze_account(UnfreezeAccountRequest { account_id })
                .await
                .map_err(RpcError)?
                .into_inner();
            print_account(opts.json, &a);
        }
        AccountCmd::Import {
            alg,
            key_file,
            controller,
            label,
            allow,
        } => {
            let text = zeroize::Zeroizing::new(if key_file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading stdin")?
            } else {
                std::fs::read_to_string(&key_file).with_context(|| format!("reading {}", key_file.display()))?
            });
            let key = zeroize::Zeroizing::new(
                hex::decode(text.trim().trim_start_matches("0x")).context("the key file is not hex")?,
            );
            anyhow::ensure!(
                key.len() == 32,
                "the key is {} bytes; a private key or seed is 32",
                key.len()
            );
            let mut c = AccountServiceClient::new(connect(home, opts).await?);
            let job = c
                .create_import_job(CreateImportJobRequest {})
                .await
                .map_err(RpcError)?
                .into_inner();
            use rsa::pkcs8::DecodePublicKey as _;
            let transport = rsa::RsaPublicKey::from_public_key_der(&job.public_key_der)
                .context("the daemon's transport key is not an RSA public key")?;
            let wrapped_key = transport
                .encrypt(&mut rand::rngs::OsRng, rsa::Oaep::new::<sha1::Sha1>(), &key[..])
                .context("encrypting the key to the transport key")?;
            let a = c
                .import_account(ImportAccountRequest {
                    job_id: job.job_id,
                    alg: match alg {
                        AlgArg::Ed25519 => "ed25519".into(),
                        AlgArg::Secp256k1 => "secp256k1".into(),
                    },
                    wrapped_key,
                    controller,
                    label,
                    allow,
                })
                .await
                .map_err(RpcError)?
                .into_inner();
            print_account(opts.json, &a);
        }
        AccountCmd::Show { account_id } => {
            let mut c = AccountServiceClient::new(connect(home, opts).await?);
            let a = c
                .get_account(GetAccountRequest { account_id })
                .await
                .map_err(RpcError)?
                .into_inner();
            print_account(opts.json, &a);
        }
    }
    Ok(())
}

/// Runs a signing command.
pub async fn sign(home: &Path, opts: &ClientOpts, cmd: SignCmd) -> anyhow::Result<()> {
    match cmd {
        SignCmd::Payment(args) => return super::session::sign_payment(home, opts, args).await,
        SignCmd::Transaction(args) => return super::session::sign_transaction(home, opts, args).await,
        SignCmd::Receipt(args) => return super::receipt::sign_receipt(home, opts, args).await,
        SignCmd::Attestation(args) => return super::receipt::sign_attestation(home, opts, args).await,
        SignCmd::TypedData {
            account,
            file,
            session,
            request_id,
        } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading stdin")?
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?
            };
            let mut c = SigningServiceClient::new(connect(home, opts).await?);
            let r = c
                .sign_typed_data(SignTypedDataRequest {
                    account_id: account.clone(),
                    typed_data_json: text,
                    session_token: session,
                    request_id,
                })
                .await
                .map_err(RpcError)?
                .into_inner();
            let mut rows = vec![
                ("digest", hex0x(&r.digest)),
                ("signature", hex0x(&r.signature)),
                ("signer", r.signer.clone()),
            ];
            if !r.remaining.is_empty() {
                rows.push(("remaining", r.remaining.clone()));
            }
            emit(
                opts.json,
                &json!({
                    "account_id": account,
                    "digest": hex0x(&r.digest),
                    "signature": hex0x(&r.signature),
                    "signer": r.signer,
                    "remaining": r.remaining,
                }),
                &rows,
            );
        }
        SignCmd::Message {
            account,
            alg,
            data_hex,
            data,
        } => {
            let bytes = match (data_hex, data) {
                (Some(h), None) => hex::decode(h.trim_start_matches("0x")).context("--data-hex is not hex")?,
                (None, Some(t)) => t.into_bytes(),
                _ => anyhow::bail!("pass one of --data-hex or --data"),
            };
            let alg_pb = match alg {
                AlgArg::Ed25519 => SignatureAlgorithm::Ed25519,
                AlgArg::Secp256k1 => SignatureAlgorithm::Secp256k1,
            };
            let mut c = SigningServiceClient::new(connect(home, opts).await?);
            let r = c
                .sign_message(SignMessageRequest {
                    account_id: account.clone(),
                    alg: alg_pb as i32,
                    data: bytes,
                })
                .await
                .map_err(RpcError)?
                .into_inner();
            let alg_name = match alg {
                AlgArg::Ed25519 => "ed25519",
                AlgArg::Secp256k1 => "secp256k1",
            };
            let mut v = json!({
                "account_id": account,
                "alg": alg_name,
                "signature": hex0x(&r.signature),
                "public_key": hex0x(&r.public_key),
            });
            if !r.digest.is_empty() {
                v["digest"] = json!(hex0x(&r.digest));
            }
            emit(
                opts.json,
                &v,
                &[
                    ("alg", alg_name.to_string()),
                    ("signature", hex0x(&r.signature)),
                    ("public_key", hex0x(&r.public_key)),
                ],
            );
        }
    }
    Ok(())
}
