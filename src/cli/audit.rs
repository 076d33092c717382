//! `keyward audit`: verify, export, prove, archive (straight against the
//! configured store; the daemon may be stopped) and tail (live, over mTLS).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use super::ClientOpts;
use crate::audit::verify::{store_keys, verify_export, verify_store, Report};
use crate::config::Config;
use crate::store::Store;

/// Which store the offline commands read.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The daemon's TOML config (default: the dev home's keyward.toml).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

/// Export formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    /// One event per line, JSON.
    Jsonl,
}

/// `keyward audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Recompute the chain and every checkpoint and check the checkpoint
    /// signatures; exit 0 if the log verifies, 1 naming the first bad seq.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        /// Verify an export or archive file (and FILE.checkpoints.jsonl) instead of the store.
        #[arg(long)]
        from_export: Option<PathBuf>,
        /// JWKS (https URL or file) for checkpoint signatures (default: the
        /// store's issuer key history).
        #[arg(long)]
        jwks: Option<String>,
        /// The issuer key history (https URL or file; the daemon serves it at
        /// /.well-known/keyward/issuer-key-history.json): every issuer key ever
        /// published, retired and revoked ones with their times.
        #[arg(long)]
        history: Option<String>,
    },
    /// Print the events after --since as JSON Lines.
    Export {
        #[command(flatten)]
        store: StoreArgs,
        /// Events with seq greater than this.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
        /// Write to this file instead of stdout (with FILE.checkpoints.jsonl).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The inclusion proof of one event in the signed checkpoint covering it.
    Prove {
        #[command(flatten)]
        store: StoreArgs,
        /// The event's sequence number.
        seq: u64,
    },
    /// Move the events through --through (the end of a checkpoint) to a
    /// JSONL archive with their checkpoints, then prune them from the store.
    Archive {
        #[command(flatten)]
        store: StoreArgs,
        /// The last event to archive: must end a checkpoint.
        #[arg(long)]
        through: u64,
        /// The archive file (must not exist); checkpoints go to FILE.checkpoints.jsonl.
        #[arg(long)]
        out: PathBuf,
    },
    /// Replay the events after --since from the daemon (admin), then follow
    /// live ones until interrupted.
    Tail {
        /// Events with seq greater than this.
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
}

async fn open_store(home: &Path, args: &StoreArgs) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    let path = args.config.clone().unwrap_or_else(|| home.join("keyward.toml"));
    let config = Config::load(&path)?;
    Ok(crate::store::open(&config.store.url).await?)
}

fn print_report(json_out: bool, r: &Report) {
    if json_out {
        println!("{}", json!({"ok": r.ok(), "report": r}));
    } else if let (Some(seq), Some(reason)) = (r.first_bad_seq, &r.reason) {
        println!("FAILED at seq {seq}: {reason}");
        println!("events read {} ({}..={})", r.events, r.first_seq, r.last_seq);
    } else {
        println!(
            "ok: {} events ({}..={}), {} checkpoints verified",
            r.events, r.first_seq, r.last_seq, r.checkpoints_verified
        );
    }
}

/// Runs `keyward audit`; Ok(false) means verification failed (exit 1).
pub async fn audit(home: &Path, opts: &ClientOpts, cmd: AuditCmd) -> anyhow::Result<bool> {
    match cmd {
        AuditCmd::Verify {
            store,
            from_export,
            jwks,
            history,
        } => {
            let keys = match (&history, &jwks) {
                (None, None) if from_export.is_some() && store.config.is_none() => {
                    anyhow::bail!(
                        "--from-export needs --history or --jwks (or --config to use the store's issuer key history)"
                    )
                }
                (None, None) => {
                    let s = open_store(home, &store).await?;
                    let keys = store_keys(s.as_ref()).await?;
                    s.close().await;
                    keys
                }
                (h, j) => super::verify::read_keys(home, opts, h.as_deref(), j.as_deref(), opts.ca.clone()).await?,
            };
            let report = match &from_export {
                Some(file) => {
                    let (events, checkpoints) = crate::audit::export::read_export(file)?;
                    verify_export(&events, &checkpoints, &keys)
                }
                None => {
                    let s = open_store(home, &store).await?;
                    let r = verify_store(s.as_ref(), &keys).await?;
                    s.close().await;
                    r
                }
            };
            print_report(opts.json, &report);
            Ok(report.ok())
        }
        AuditCmd::Export {
            store,
            since,
            format: Format::Jsonl,
            out,
        } => {
            let s = open_store(home, &store).await?;
            let n = match &out {
                Some(path) => {
                    let mut buf = Vec::new();
                    let n = crate::audit::export::export(s.as_ref(), since, None, &mut buf).await?;
                    std::fs::write(path, &buf).with_context(|| format!("writing {}", path.display()))?;
                    let cps: Vec<String> = s
                        .audit()
                        .checkpoints()
                        .await?
                        .iter()
                        .filter(|c| c.first_seq > since)
                        .map(serde_json::to_string)
                        .collect::<Result<_, _>>()?;
                    let mut text = cps.join("\n");
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    let cp_path = crate::audit::export::checkpoints_path(path);
                    std::fs::write(&cp_path, text).with_context(|| format!("writing {}", cp_path.display()))?;
                    n
                }
                None => {
                    let mut stdout = std::io::stdout().lock();
                    crate::audit::export::export(s.as_ref(), since, None, &mut stdout).await?
                }
            };
            s.close().await;
            if out.is_some() {
                eprintln!("exported {n} events");
            }
            Ok(true)
        }
        AuditCmd::Prove { store, seq } => {
            let s = open_store(home, &store).await?;
            let proof = crate::audit::checkpoint::prove(s.as_ref(), seq).await;
            s.close().await;
            let proof = proof?;
            if opts.json {
                println!("{}", serde_json::to_string(&proof)?);
            } else {
                println!("seq         {}", proof.event.seq);
                println!("event hash  {}", hex::encode(proof.event.hash));
                println!(
                    "checkpoint  {}..={} root {}",
                    proof.checkpoint.first_seq,
                    proof.checkpoint.last_seq,
                    hex::encode(proof.checkpoint.root)
                );
                println!("leaf index  {} of {}", proof.index, proof.tree_size);
                for (i, p) in proof.path.iter().enumerate() {
                    println!("path[{i}]     {p}");
                }
                println!("jws         {}", proof.checkpoint.jws);
            }
            Ok(true)
        }
        AuditCmd::Archive { store, through, out } => {
            let s = open_store(home, &store).await?;
            let n = crate::audit::export::archive(s.as_ref(), through, &out).await;
            s.close().await;
            let n = n?;
            super::output::emit(
                opts.json,
                &json!({"archived": n, "through": through, "file": out}),
                &[
                    ("archived", format!("{n} events through seq {through}")),
                    ("file", out.display().to_string()),
                ],
            );
            Ok(true)
        }
        AuditCmd::Tail { since } => tail(home, opts, since).await,
    }
}

async fn tail(home: &Path, opts: &ClientOpts, since: u64) -> anyhow::Result<bool> {
    use crate::api::pb::audit_service_client::AuditServiceClient;
    let mut c = AuditServiceClient::new(super::client::connect(home, opts).await?);
    let mut stream = c
        .stream_events(crate::api::pb::StreamEventsRequest { since_seq: since })
        .await
        .map_err(super::client::RpcError)?
        .into_inner();
    while let Some(e) = stream.message().await.map_err(super::client::RpcError)? {
        if opts.json {
            println!(
                "{}",
                json!({
                    "seq": e.seq, "time_ms": e.time_ms, "identity": e.identity, "action": e.action,
                    "account": e.account, "session": e.session, "request_id": e.request_id,
                    "decision": e.decision, "policies": e.policies, "code": e.code, "digest": e.digest,
                    "signature_ref": e.signature_ref, "prev_hash": e.prev_hash, "hash": e.hash,
                    "trace_id": e.trace_id,
                })
            );
        } else {
            println!(
                "{:>8} {} {:<22} {:<5} {:<18} {}",
                e.seq, e.time_ms, e.action, e.decision, e.code, e.identity
            );
        }
    }
    Ok(true)
}
