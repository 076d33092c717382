//! `keyward kek`: the key ceremony (backup, verification, restore) and the KEKs' status. These
//! commands work on the token and the store directly, like `keyward init`; each change is
//! recorded in the audit log as the operator (`operator:<login name>`).

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use super::daemon::{before_threads, create_token, read_pin_file, run_blocking};
use crate::audit::event::{now_ms, Decision, NewEvent};
use crate::config::Config;
use crate::store::{IssuerKeyState, KekBackupRecord};

/// `keyward kek`.
#[derive(Debug, Subcommand)]
pub enum KekCmd {
    /// The KEKs on the token, the keys each wraps, and the newest backup.
    Status(ConfigArg),
    /// Back up every KEK, wrapped under a new recovery key split M-of-N
    /// among custodians: one share file per custodian, written once.
    Backup(BackupArgs),
    /// Prove a backup restores this token's KEKs, without restoring:
    /// rebuild the recovery key from M shares and compare check values.
    VerifyBackup(SharesArgs),
    /// Recreate every KEK on a token without KEKs, from M shares and the
    /// backup in the store.
    Restore(RestoreArgs),
    /// Create the next version of every KEK this custody uses: new account
    /// keys are wrapped under it (a running daemon picks it up within 10 s);
    /// existing keys stay under their version.
    Rotate(ConfigArg),
    /// Move every account key under an older host-kind KEK to the current
    /// one, inside the token, a blob at a time (resumable: run it again after
    /// an interruption). Keys under sealed KEKs cannot move and are counted.
    Rewrap(RewrapArgs),
    /// Destroy a KEK version no account key is wrapped under any more (and
    /// that is not current). Backups made before still hold it.
    Retire(RetireArgs),
}

/// `keyward kek retire` options.
#[derive(Debug, Args)]
pub struct RetireArgs {
    /// The TOML config.
    #[arg(long, short)]
    config: PathBuf,
    /// The KEK version to destroy.
    #[arg(long)]
    version: u32,
}

/// `keyward kek rewrap` options.
#[derive(Debug, Args)]
pub struct RewrapArgs {
    /// The TOML config.
    #[arg(long, short)]
    config: PathBuf,
    /// Blobs read from the store per batch.
    #[arg(long, default_value_t = 200)]
    batch: u32,
    /// Progress as JSON lines (one per batch: KEK version, done, total, moved; then a summary
    /// line with `"done": true`) instead of a bar or text.
    #[arg(long)]
    json: bool,
}

/// The config file.
#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The TOML config.
    #[arg(long, short)]
    config: PathBuf,
}

/// `keyward kek backup` options.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The TOML config.
    #[arg(long, short)]
    config: PathBuf,
    /// File holding the security officer PIN (mode 0600 or stricter): only
    /// the SO can make the trusted key a KEK may be wrapped under.
    #[arg(long)]
    so_pin_file: PathBuf,
    /// Shares to make (N), one per custodian.
    #[arg(long, default_value_t = 5)]
    shares: u8,
    /// Shares needed to restore (M).
    #[arg(long, default_value_t = 3)]
    threshold: u8,
    /// Folder the share files are written to (created 0700; a share file
    /// is never overwritten). Hand each file to its custodian, then delete it.
    #[arg(long)]
    out: PathBuf,
}

/// Shares given to verify or restore.
#[derive(Debug, Args)]
pub struct SharesArgs {
    /// The TOML config.
    #[arg(long, short)]
    config: PathBuf,
    /// A share file (repeat, at least M times). `-` reads shares from
    /// standard input, one per line.
    #[arg(long = "share", required = true)]
    shares: Vec<PathBuf>,
}

/// `keyward kek restore` options.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    shares: SharesArgs,
    /// First create the token `hsm.token_label` (as `keyward init
    /// --init-token`), in a slot holding an uninitialised token.
    #[arg(long, requires = "so_pin_file")]
    init_token: bool,
    /// Security officer PIN file for --init-token.
    #[arg(long, requires = "init_token")]
    so_pin_file: Option<PathBuf>,
}

/// `keyward doctor` options.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The TOML config.
    #[arg(long, short)]
    config: PathBuf,
}

/// `keyward doctor`: every account's keys unwrapped (nothing cached) and checked against the
/// account's public keys; false (exit 1) if any fails.
pub fn doctor(a: DoctorArgs) -> anyhow::Result<bool> {
    let config = load(&a.config)?;
    let custody = config.keys.custody;
    let failed = run_blocking_value(async move {
        let store = crate::store::open(&config.store.url).await?;
        let hsm = crate::server::open_hsm(&config).await?;
        let arena = crate::keys::SecretArena::new();
        let (mut checked, mut failed, mut deleted) = (0u64, Vec::new(), 0u64);
        let mut after: Option<String> = None;
        loop {
            let page = store.account_ids_page(after.as_deref(), 500).await?;
            let Some(last) = page.last().cloned() else { break };
            for id in page {
                let outcome = match store.get_account(&id).await? {
                    None => Err("deleted while checked".to_string()),
                    // Crypto-shredded: no key left to check.
                    Some(record) if record.deleted_at.is_some() => {
                        deleted += 1;
                        continue;
                    }
                    Some(record) => {
                        let (hsm, arena) = (hsm.clone(), arena.clone());
                        tokio::task::spawn_blocking(move || {
                            // Unwrapped, proven to sign under the stored public keys, and dropped
                            // (session objects destroyed, host bytes zeroized): nothing is cached.
                            let out = crate::keys::AccountKeys::unwrap(&hsm, custody, &arena, record).map(drop);
                            crate::keys::scrub_stack::<{ 128 * 1024 }>();
                            out
                        })
                        .await
                        .map_err(|_| anyhow::anyhow!("check task failed"))?
                        .map_err(|e| e.to_string())
                    }
                };
                checked += 1;
                if let Err(reason) = outcome {
                    println!("FAIL account {id}: {reason}");
                    failed.push(id);
                }
            }
            after = Some(last);
        }
        println!(
            "checked {checked} accounts: {} ok, {} failed ({deleted} deleted accounts have no keys to check)",
            checked - failed.len() as u64,
            failed.len()
        );
        let (mut issuers, mut issuer_failed) = (0u64, 0usize);
        for rec in store.list_issuer_keys().await? {
            if rec.wrapped.is_none() {
                continue;
            }
            issuers += 1;
            let (h, r) = (hsm.clone(), rec.clone());
            let out = tokio::task::spawn_blocking(move || crate::issuer::Issuer::check_stored(&h, &r))
                .await
                .map_err(|_| anyhow::anyhow!("check task failed"))?;
            if let Err(e) = out {
                println!("FAIL issuer key {} ({}): {e}", rec.kid, rec.alg);
                issuer_failed += 1;
            }
        }
        println!(
            "checked {issuers} stored issuer keys: {} ok, {issuer_failed} failed",
            issuers - issuer_failed as u64
        );
        Ok(failed.len() + issuer_failed)
    })?;
    Ok(failed == 0)
}

/// Who the audit log names for these commands.
fn operator() -> String {
    let name = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("operator:{name}")
}

fn event(action: &str, signature_ref: String, digest: String) -> NewEvent {
    NewEvent {
        time_ms: now_ms(),
        identity: operator(),
        action: action.into(),
        decision: Decision::Allow.as_str().into(),
        code: "OK".into(),
        digest,
        signature_ref,
        ..NewEvent::default()
    }
}

fn load(config: &Path) -> anyhow::Result<Config> {
    let mut config = Config::load(config)?;
    before_threads(&mut config)?;
    Ok(config)
}

/// Runs a `keyward kek` command.
pub fn run(cmd: KekCmd) -> anyhow::Result<()> {
    match cmd {
        KekCmd::Status(a) => status(&a.config),
        KekCmd::Backup(a) => backup(a),
        KekCmd::VerifyBackup(a) => verify(&a),
        KekCmd::Restore(a) => restore(a),
        KekCmd::Rotate(a) => rotate(&a.config),
        KekCmd::Rewrap(a) => rewrap(a),
        KekCmd::Retire(a) => retire(&a.config, a.version),
    }
}

fn status(config: &Path) -> anyhow::Result<()> {
    let config = load(config)?;
    let pin = config.hsm_pin()?;
    let prefix = config.hsm.kek_label_prefix.clone();
    let live = crate::hsm::live_check_values(&config.hsm.module, &config.hsm.token_label, &pin, &prefix)?;
    run_blocking(async move {
        let store = crate::store::open(&config.store.url).await?;
        let per = store.keys_per_kek().await?;
        let issuers = store.issuer_keys_per_kek().await?;
        let last = store.get_kek_backup(None).await?;
        println!("token {:?}", config.hsm.token_label);
        for v in live.keys() {
            let keys = per.iter().find(|(k, _)| k == v).map_or(0, |(_, n)| *n);
            let backed = last
                .as_ref()
                .and_then(|b| b.keks.iter().find(|k| k.version == *v))
                .map(|k| {
                    if Some(&k.check_value) == live.get(v) {
                        "backed up"
                    } else {
                        "DIFFERS from the backup"
                    }
                })
                .unwrap_or("not in the newest backup");
            let issuer = issuers.iter().find(|(k, _)| k == v).map_or(0, |(_, n)| *n);
            println!("  KEK v{v}: {keys} account keys, {issuer} issuer keys; {backed}");
        }
        let mut missing: std::collections::BTreeMap<u32, (u64, u64)> = Default::default();
        for (v, n) in per.iter().filter(|(v, _)| !live.contains_key(v)) {
            missing.entry(*v).or_default().0 = *n;
        }
        for (v, n) in issuers.iter().filter(|(v, _)| !live.contains_key(v)) {
            missing.entry(*v).or_default().1 = *n;
        }
        for (v, (n, i)) in missing {
            println!("  KEK v{v}: {n} account keys, {i} issuer keys, NOT ON THE TOKEN");
        }
        match last {
            Some(b) => println!(
                "newest backup {} ({} of {} shares), made at {} by {}",
                b.id, b.threshold, b.shares, b.created_at, b.created_by
            ),
            None => println!("no backup: run `keyward kek backup`"),
        }
        Ok(())
    })
}

fn rotate(config: &Path) -> anyhow::Result<()> {
    let config = load(config)?;
    run_blocking(async move {
        let hsm = crate::server::open_hsm(&config).await?;
        let before: Vec<u32> = hsm.keks().iter().map(|k| k.0).collect();
        let h = hsm.clone();
        let current = tokio::task::spawn_blocking(move || h.rotate_kek())
            .await
            .map_err(|_| anyhow::anyhow!("rotation task failed"))??;
        let made: Vec<(u32, String)> = hsm
            .keks()
            .into_iter()
            .filter(|k| !before.contains(&k.0))
            .map(|k| (k.0, k.1))
            .collect();
        let store = crate::store::open(&config.store.url).await?;
        let names: Vec<String> = made.iter().map(|(v, _)| format!("v{v}")).collect();
        let seq = store
            .append_event(&event("KekRotate", format!("kek:{}", names.join(",")), String::new()))
            .await?;
        for (v, label) in &made {
            println!("  KEK v{v} created: {label}");
        }
        println!(
            "KEK v{current} is now current (audit event {seq}); new account keys are wrapped under it, \
             existing ones stay under their version. Back up again: `keyward kek backup`"
        );
        Ok(())
    })
}

/// How `kek rewrap` shows its progress: a bar on a terminal, a line per batch otherwise, or
/// JSON lines (`--json`) for scripts.
enum Progress {
    Bar,
    Lines,
    Json,
}

impl Progress {
    fn new(json: bool) -> Progress {
        use std::io::IsTerminal as _;
        if json {
            Progress::Json
        } else if std::io::stdout().is_terminal() {
            Progress::Bar
        } else {
            Progress::Lines
        }
    }

    /// A human line (nothing in JSON mode; the bar's line is ended first).
    fn say(&self, line: &str) {
        match self {
            Progress::Json => {}
            Progress::Bar => println!("\r\x1b[2K{line}"),
            Progress::Lines => println!("{line}"),
        }
    }

    /// A JSON line (JSON mode only).
    fn json(&self, value: serde_json::Value) {
        if let Progress::Json = self {
            println!("{value}");
        }
    }

    /// After a batch of KEK `version`: `done` of the `total` blobs it held at the start.
    fn batch(&self, label: &str, version: u32, done: u64, total: u64, moved: u64) {
        match self {
            Progress::Json => self.json(
                serde_json::json!({"kek": version, "label": label, "done": done, "total": total, "moved": moved}),
            ),
            Progress::Lines => println!("  {label}: {moved} moved so far"),
            Progress::Bar => {
                const WIDTH: u64 = 30;
                let filled = (done.min(total) * WIDTH).checked_div(total).unwrap_or(WIDTH);
                let bar: String = (0..WIDTH).map(|i| if i < filled { '#' } else { '-' }).collect();
                print!("\r\x1b[2K  {label} [{bar}] {done}/{total}");
                let _ = std::io::stdout().flush();
            }
        }
    }

    /// The end of a KEK version's batches.
    fn end_version(&self) {
        if let Progress::Bar = self {
            println!();
        }
    }
}

fn rewrap(a: RewrapArgs) -> anyhow::Result<()> {
    let config = load(&a.config)?;
    let progress = Progress::new(a.json);
    run_blocking(async move {
        let hsm = crate::server::open_hsm(&config).await?;
        let store = crate::store::open(&config.store.url).await?;
        let (mut moved, mut raced, mut failed, mut stay) = (0u64, 0u64, 0u64, 0u64);
        let mut target = None;
        for (version, label, kind) in hsm.keks() {
            let total = store
                .keys_per_kek()
                .await?
                .iter()
                .find(|(v, _)| *v == version)
                .map_or(0, |(_, n)| *n);
            if kind == crate::hsm::KekKind::Sealed {
                stay += total;
                if total > 0 {
                    progress.say(&format!(
                        "  {label}: {total} keys stay (a sealed KEK's keys cannot leave the token, not even rewrapped)"
                    ));
                    progress.json(serde_json::json!({"kek": version, "label": label, "stay": total}));
                }
                continue;
            }
            let mut after: Option<crate::store::KeyBlob> = None;
            let mut done = 0u64;
            'pages: loop {
                let page = store.key_blobs_under(version, after.as_ref(), a.batch.max(1)).await?;
                let Some(last) = page.last().cloned() else { break };
                for blob in page {
                    let (h, w) = (hsm.clone(), blob.wrapped.clone());
                    let out = tokio::task::spawn_blocking(move || h.rewrap_host_blob(&w, version))
                        .await
                        .map_err(|_| anyhow::anyhow!("rewrap task failed"))?;
                    match out {
                        // This version is the current one: nothing to move.
                        Ok(None) => break 'pages,
                        Ok(Some((wrapped, to))) => {
                            target = Some(to);
                            if store.replace_key_blob(&blob, &wrapped, to).await? {
                                moved += 1;
                            } else {
                                raced += 1;
                            }
                        }
                        Err(e) => {
                            failed += 1;
                            progress.say(&format!("FAIL account {} {}: {e}", blob.account_id, blob.alg));
                            progress.json(serde_json::json!({
                                "failed": "account", "account_id": blob.account_id, "alg": blob.alg, "error": e.to_string(),
                            }));
                        }
                    }
                    done += 1;
                }
                progress.batch(&label, version, done, total, moved);
                after = Some(last);
            }
            if done > 0 {
                progress.end_version();
            }
        }
        // Issuer keys: a stored `next` or `active` key's blob under an older host-kind KEK.
        let (mut i_moved, mut i_stay, mut i_failed) = (0u64, 0u64, 0u64);
        let kinds: std::collections::BTreeMap<u32, crate::hsm::KekKind> =
            hsm.keks().into_iter().map(|(v, _, kind)| (v, kind)).collect();
        for k in store.list_issuer_keys().await? {
            let (Some(blob), Some(version)) = (k.wrapped.clone(), k.kek_version) else {
                continue;
            };
            if kinds.get(&version) == Some(&crate::hsm::KekKind::Sealed) {
                if hsm.kek_version() != version {
                    i_stay += 1;
                    progress.say(&format!(
                        "  issuer key {} ({}) stays under sealed KEK v{version} until it is rotated out",
                        k.kid, k.alg
                    ));
                }
                continue;
            }
            let h = hsm.clone();
            let out = tokio::task::spawn_blocking(move || h.rewrap_host_blob(&blob, version))
                .await
                .map_err(|_| anyhow::anyhow!("rewrap task failed"))?;
            match out {
                Ok(None) => {}
                Ok(Some((wrapped, to))) => {
                    target = Some(to);
                    if store.replace_issuer_blob(&k.kid, version, &wrapped, to).await? {
                        i_moved += 1;
                        progress.say(&format!("  issuer key {} ({}) moved to KEK v{to}", k.kid, k.alg));
                    }
                }
                Err(e) => {
                    i_failed += 1;
                    progress.say(&format!("FAIL issuer key {} {}: {e}", k.kid, k.alg));
                    progress.json(serde_json::json!({
                        "failed": "issuer key", "kid": k.kid, "alg": k.alg, "error": e.to_string(),
                    }));
                }
            }
        }
        let to = target.map_or_else(|| "-".to_string(), |v| format!("v{v}"));
        let seq = store
            .append_event(&event(
                "KekRewrap",
                format!(
                    "kek-rewrap:{to}:moved={moved},failed={failed},issuer-moved={i_moved},issuer-failed={i_failed}"
                ),
                String::new(),
            ))
            .await?;
        progress.say(&format!(
            "issuer keys: {i_moved} moved, {i_failed} failed, {i_stay} under sealed KEKs stay until rotated out"
        ));
        progress.say(&format!(
            "rewrap: {moved} keys moved to {to}, {raced} already moved by another run, {failed} failed, \
             {stay} under sealed KEKs stay (audit event {seq})"
        ));
        progress.json(serde_json::json!({
            "done": true, "to": target, "moved": moved, "raced": raced, "failed": failed, "stay": stay,
            "issuer_moved": i_moved, "issuer_failed": i_failed, "issuer_stay": i_stay, "audit_event": seq,
        }));
        if failed + i_failed > 0 {
            anyhow::bail!(
                "{} keys could not be rewrapped; they stay under their KEK",
                failed + i_failed
            );
        }
        Ok(())
    })
}

fn retire(config: &Path, version: u32) -> anyhow::Result<()> {
    let config = load(config)?;
    run_blocking(async move {
        let store = crate::store::open(&config.store.url).await?;
        let left = store
            .keys_per_kek()
            .await?
            .iter()
            .find(|(v, _)| *v == version)
            .map_or(0, |(_, n)| *n);
        if left > 0 {
            anyhow::bail!(
                "{left} account keys are still wrapped under KEK v{version}: move them first (`keyward kek \
                 rewrap`; keys under a sealed KEK move only when their accounts' keys are rotated); nothing changed"
            );
        }
        let issuers = store
            .issuer_keys_per_kek()
            .await?
            .iter()
            .find(|(v, _)| *v == version)
            .map_or(0, |(_, n)| *n);
        if issuers > 0 {
            anyhow::bail!(
                "{issuers} issuer keys are still wrapped under KEK v{version}: move them first (`keyward kek \
                 rewrap`; under a sealed KEK they leave it with the next issuer key rotation, `keyward jwks \
                 rotate`, as a retired key's blob is destroyed); nothing changed"
            );
        }
        let hsm = crate::server::open_hsm(&config).await?;
        let h = hsm.clone();
        let label = tokio::task::spawn_blocking(move || h.destroy_kek(version))
            .await
            .map_err(|_| anyhow::anyhow!("retire task failed"))??;
        let seq = store
            .append_event(&event("KekRetire", format!("kek:v{version}"), String::new()))
            .await?;
        println!(
            "KEK v{version} ({label}) destroyed on the token (audit event {seq}); backups made before still hold it"
        );
        Ok(())
    })
}

fn backup(a: BackupArgs) -> anyhow::Result<()> {
    let config = load(&a.config)?;
    let so_pin = read_pin_file(&a.so_pin_file, "--so-pin-file")?;
    let pin = config.hsm_pin()?;
    let id = crate::hsm::new_backup_id();
    let key = crate::hsm::RecoveryKey::generate();
    let shares = crate::hsm::split_recovery_key(&key, &id, a.threshold, a.shares)?;
    // The share files' folder first: nothing leaves the token if they cannot be written.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&a.out)
        .with_context(|| format!("--out {}", a.out.display()))?;
    let files: Vec<PathBuf> = (1..=shares.len())
        .map(|i| a.out.join(format!("kek-backup-{id}-share-{i}-of-{}.txt", shares.len())))
        .collect();
    // Every share file is created (empty, 0600, never over another) before anything leaves
    // the token, so a backup is never stored without somewhere to put its shares.
    let mut handles = Vec::with_capacity(files.len());
    for file in &files {
        handles.push(
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(file)
                .with_context(|| format!("share file {}", file.display()))?,
        );
    }
    let keks = crate::hsm::export_keks(
        &config.hsm.module,
        &config.hsm.token_label,
        &so_pin,
        &pin,
        &config.hsm.kek_label_prefix,
        &key,
    )
    .context("wrapping the KEKs under the recovery key")?;
    let rec = KekBackupRecord {
        id: id.clone(),
        created_at: now_ms() / 1000,
        created_by: operator(),
        threshold: a.threshold,
        shares: a.shares,
        recovery_check: key.check(&id),
        keks,
    };
    drop(key);
    let digest = hex::encode(Sha256::digest(serde_json::to_vec(&rec.keks)?));
    let versions: Vec<String> = rec.keks.iter().map(|k| format!("v{}", k.version)).collect();
    run_blocking(async {
        let store = crate::store::open(&config.store.url).await?;
        let seq = store
            .add_kek_backup_audited(&rec, &event("KekBackup", format!("kek-backup:{id}"), digest))
            .await?;
        println!(
            "backup {id}: KEKs {} wrapped under a new recovery key; stored in the {} store (audit event {seq})",
            versions.join(", "),
            store.backend()
        );
        Ok(())
    })?;
    for ((share, file), mut f) in shares.iter().zip(&files).zip(handles) {
        f.write_all(share.as_bytes())
            .and_then(|()| f.write_all(b"\n"))
            .and_then(|()| f.sync_all())
            .with_context(|| format!("share file {}", file.display()))?;
        println!("  share written: {}", file.display());
    }
    println!(
        "any {} of these {} shares and the store restore every KEK (`keyward kek restore`); \
         give each share to one custodian and delete the files here",
        a.threshold, a.shares
    );
    Ok(())
}

/// Reads the share files (or standard input for `-`).
fn read_shares(paths: &[PathBuf]) -> anyhow::Result<Vec<(String, Zeroizing<String>)>> {
    let mut out = Vec::new();
    for p in paths {
        if p.as_os_str() == "-" {
            let mut text = Zeroizing::new(String::new());
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("reading shares from stdin")?;
            for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
                out.push((format!("stdin line {}", i + 1), Zeroizing::new(line.to_string())));
            }
        } else {
            let text =
                Zeroizing::new(std::fs::read_to_string(p).with_context(|| format!("share file {}", p.display()))?);
            out.push((p.display().to_string(), Zeroizing::new(text.trim().to_string())));
        }
    }
    Ok(out)
}

/// The recovery key from the shares, checked against its backup in the store.
async fn rebuild(
    store: &dyn crate::store::Store,
    shares: &[(String, Zeroizing<String>)],
) -> anyhow::Result<(KekBackupRecord, crate::hsm::RecoveryKey)> {
    let (id, key) = crate::hsm::combine_shares(shares)?;
    let rec = store
        .get_kek_backup(Some(&id))
        .await?
        .ok_or_else(|| anyhow::anyhow!("backup {id} is not in this store; nothing was done"))?;
    if key.check(&id) != rec.recovery_check {
        return Err(crate::hsm::ShareError::WrongKey(id).into());
    }
    Ok((rec, key))
}

fn verify(a: &SharesArgs) -> anyhow::Result<()> {
    let config = load(&a.config)?;
    let pin = config.hsm_pin()?;
    let shares = read_shares(&a.shares)?;
    let (rec, key) = run_blocking_value(async {
        let store = crate::store::open(&config.store.url).await?;
        rebuild(store.as_ref(), &shares).await
    })?;
    let (module, label, prefix) = (
        &config.hsm.module,
        &config.hsm.token_label,
        &config.hsm.kek_label_prefix,
    );
    // The backup's KEKs unwrap under the rebuilt key and reproduce their check values ...
    crate::hsm::import_keks(module, label, &pin, prefix, &key, &rec.keks, false)?;
    drop(key);
    // ... which are the token's own KEKs.
    let live = crate::hsm::live_check_values(module, label, &pin, prefix)?;
    let mut ok = true;
    for k in &rec.keks {
        match live.get(&k.version) {
            Some(cv) if *cv == k.check_value => println!("  KEK v{}: restorable, equal to the token's", k.version),
            Some(_) => {
                ok = false;
                println!(
                    "  KEK v{}: restorable, but the token's v{} is another key",
                    k.version, k.version
                )
            }
            None => println!("  KEK v{}: restorable (not on this token)", k.version),
        }
    }
    for v in live.keys().filter(|v| !rec.keks.iter().any(|k| k.version == **v)) {
        ok = false;
        println!("  KEK v{v}: on the token but NOT in backup {}", rec.id);
    }
    if !ok {
        anyhow::bail!("backup {} does not cover this token's KEKs", rec.id);
    }
    println!(
        "backup {}: verified with {} shares, nothing changed",
        rec.id,
        shares.len()
    );
    Ok(())
}

fn run_blocking_value<T, F: std::future::Future<Output = anyhow::Result<T>>>(f: F) -> anyhow::Result<T> {
    let mut out = None;
    run_blocking(async {
        out = Some(f.await?);
        Ok(())
    })?;
    out.ok_or_else(|| anyhow::anyhow!("no result"))
}

fn restore(a: RestoreArgs) -> anyhow::Result<()> {
    let config = load(&a.shares.config)?;
    let pin = config.hsm_pin()?;
    let shares = read_shares(&a.shares.shares)?;
    let (rec, key) = run_blocking_value(async {
        let store = crate::store::open(&config.store.url).await?;
        rebuild(store.as_ref(), &shares).await
    })?;
    if let (true, Some(so_pin_file)) = (a.init_token, &a.so_pin_file) {
        create_token(&config, so_pin_file)?;
    }
    let restored = crate::hsm::import_keks(
        &config.hsm.module,
        &config.hsm.token_label,
        &pin,
        &config.hsm.kek_label_prefix,
        &key,
        &rec.keks,
        true,
    )?;
    drop(key);
    let digest = hex::encode(Sha256::digest(serde_json::to_vec(&rec.keks)?));
    run_blocking(async move {
        let store = crate::store::open(&config.store.url).await?;
        let seq = store
            .append_event(&event("KekRestore", format!("kek-backup:{}", rec.id), digest))
            .await?;
        for r in &restored {
            println!("  KEK v{} restored as {}", r.version, r.label);
        }
        println!(
            "backup {} restored onto token {:?} (audit event {seq}): every account key wrapped under these KEKs signs again",
            rec.id, config.hsm.token_label
        );
        // Issuer keys in the store are wrapped under these KEKs: they sign
        // again as they are. Keys made as token objects only (before issuer
        // keys were stored, or EdDSA in hsm custody with refuse_host_ed25519)
        // are gone with the old token: retire them (they stay published and
        // verify what they signed); the daemon makes new ones at its next start.
        let now = now_ms() / 1000;
        let stored = store
            .list_issuer_keys()
            .await?
            .iter()
            .filter(|k| k.wrapped.is_some())
            .count();
        if stored > 0 {
            println!("  {stored} issuer keys are stored wrapped under these KEKs: they sign again as before");
        }
        for k in store.list_issuer_keys().await? {
            if matches!(k.state, IssuerKeyState::Next | IssuerKeyState::Active) && k.kek_version.is_none() {
                let e = event("IssuerKeyLost", format!("kid:{}", k.kid), String::new());
                if store.retire_issuer_key_audited(&k.kid, now, &e).await? {
                    println!(
                        "  issuer key {} ({}) was on the lost token only: retired (it still verifies what it signed); \
                         the daemon publishes a new one at start",
                        k.kid, k.alg
                    );
                }
            }
        }
        Ok(())
    })
}
