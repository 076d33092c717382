//! The key ceremony, through the binary as an operator runs it, on a real SoftHSM token and both
//! stores: back up the KEKs under a recovery key split 3-of-5, verify the backup, destroy the
//! token folder, refuse restores from too few, mistyped or forged shares (changing nothing),
//! restore onto a new token from 3 shares, and sign again with every account: same addresses,
//! same Ed25519 keys. And on the token itself: the user PIN alone cannot take a KEK out.

mod common;

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{write_0600, Env, StoreKind, CONTROLLER, MAIL};
use ed25519_dalek::Verifier as _;
use keyward::api::pb::account_service_client::AccountServiceClient;
use keyward::api::pb::signing_service_client::SigningServiceClient;
use keyward::api::pb::{CreateAccountRequest, SignMessageRequest, SignTypedDataRequest, SignatureAlgorithm};
use keyward::config::Custody;
use keyward::crypto::eip712::TypedData;
use keyward::crypto::eth::recover_address;

fn keyward(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env("USER", "ceremony-test")
        .output()
        .expect("run keyward")
}

fn ok(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{what} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn refused(out: &Output, what: &str, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what} should fail");
    assert!(stderr.contains(needle), "{what}: expected {needle:?} in {stderr}");
}

/// `keyward kek backup` with N shares, M needed, into `out`.
fn backup(config: &str, so_pin: &str, shares: u8, threshold: u8, out: &str) -> Output {
    let (n, m) = (shares.to_string(), threshold.to_string());
    keyward(&[
        "kek",
        "backup",
        "--config",
        config,
        "--so-pin-file",
        so_pin,
        "--shares",
        &n,
        "--threshold",
        &m,
        "--out",
        out,
    ])
}

thread_local! {
    /// The metrics listener of the daemon [`serve`] started last.
    static METRICS: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    /// The HTTPS (JWKS) listener of the daemon [`serve`] started last.
    static HTTPS: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// The last served daemon's `/metrics` text (plain HTTP/1.0 GET).
fn scrape() -> String {
    use std::io::{Read as _, Write as _};
    let addr = METRICS.with(|m| m.borrow().clone());
    let mut c = std::net::TcpStream::connect(&addr).expect("metrics listener");
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut body = String::new();
    c.read_to_string(&mut body).expect("response");
    body
}

/// `keyward serve --config`, with its gRPC address read from its JSON log.
fn serve(config: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keyward serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["fields"]["message"] == "serving" {
                let grpc = v["fields"]["grpc"].as_str().unwrap_or_default().to_string();
                let metrics = v["fields"]["metrics"].as_str().unwrap_or_default().to_string();
                let https = v["fields"]["https"].as_str().unwrap_or_default().to_string();
                let _ = tx.send(Ok(format!("{grpc} {metrics} {https}")));
            } else if v["level"] == "ERROR" {
                let _ = tx.send(Err(line));
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(addrs)) => {
            let mut parts = addrs.split(' ');
            let grpc = parts.next().unwrap_or_default();
            let metrics = parts.next().unwrap_or_default();
            let https = parts.next().unwrap_or_default();
            METRICS.with(|m| *m.borrow_mut() = metrics.to_string());
            HTTPS.with(|h| *h.borrow_mut() = https.to_string());
            (child, format!("https://{grpc}"))
        }
        other => {
            let _ = child.kill();
            panic!("keyward serve did not start: {other:?}");
        }
    }
}

/// What an account signs, to compare before and after the restore.
#[derive(Debug, PartialEq, Eq)]
struct Signed {
    id: String,
    eth: String,
    ed25519: Vec<u8>,
}

/// Signs typed data and a message with every account; checks each signature independently.
async fn sign_all(endpoint: &str, env: &Env, ids: &[String]) -> Vec<Signed> {
    let ch = keyward::tls::connect(endpoint, &env.client_files("admin"))
        .await
        .expect("mTLS connect");
    let mut accounts = AccountServiceClient::new(ch.clone());
    let mut signer = SigningServiceClient::new(ch);
    let digest = TypedData::from_json_str(MAIL).expect("mail").signing_hash();
    let mut out = Vec::new();
    for id in ids {
        let account = accounts
            .get_account(keyward::api::pb::GetAccountRequest { account_id: id.clone() })
            .await
            .expect("account")
            .into_inner();
        let r = signer
            .sign_typed_data(SignTypedDataRequest {
                account_id: id.clone(),
                typed_data_json: MAIL.into(),
                ..Default::default()
            })
            .await
            .expect("typed data signed")
            .into_inner();
        let recovered = recover_address(&digest, &r.signature).expect("recovers");
        assert_eq!(recovered.to_checksum(), account.eth_address, "the account's key signed");
        let m = signer
            .sign_message(SignMessageRequest {
                account_id: id.clone(),
                alg: SignatureAlgorithm::Ed25519 as i32,
                data: b"after the ceremony".to_vec(),
            })
            .await
            .expect("ed25519 signed")
            .into_inner();
        let pk: [u8; 32] = account.ed25519_public_key.as_slice().try_into().expect("32");
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&pk).expect("public key");
        let sig = ed25519_dalek::Signature::from_slice(&m.signature).expect("64 bytes");
        vk.verify(&keyward::crypto::message::ed25519_message(b"after the ceremony"), &sig)
            .expect("ed25519 verifies");
        out.push(Signed {
            id: id.clone(),
            eth: account.eth_address,
            ed25519: account.ed25519_public_key,
        });
    }
    out
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .collect();
    v.sort();
    v
}

fn drill(custody: Custody, store: StoreKind) {
    let Some(env) = Env::new(custody, store) else { return };
    let config = env.config_path.to_str().expect("utf-8 path").to_string();
    let so_pin = env.dir.path().join("so-pin");
    write_0600(&so_pin, &format!("{}\n", env.token.so_pin));
    let so_pin = so_pin.to_str().expect("utf-8").to_string();
    ok(&keyward(&["init", "--config", &config]), "init");

    // Accounts made and used before the backup.
    let (mut daemon, endpoint) = serve(&env.config_path);
    let before = common::block_on(async {
        let mut ids = Vec::new();
        for i in 0..4 {
            ids.push(new_account(&endpoint, &env, &format!("ceremony-{i}")).await);
        }
        sign_all(&endpoint, &env, &ids).await
    });
    common::signal(&mut daemon, "-TERM");
    let issuer_keys = || {
        common::block_on(async {
            let store = keyward::store::open(&env.store_url).await.expect("store");
            let mut keys: Vec<(String, String, String)> = store
                .list_issuer_keys()
                .await
                .expect("issuer keys")
                .into_iter()
                .map(|k| (k.alg, k.state.as_str().to_string(), k.jwk))
                .collect();
            keys.sort();
            keys
        })
    };
    let issuers_before = issuer_keys();
    assert_eq!(issuers_before.len(), 4, "{issuers_before:?}");

    // The backup: five share files, one KEK set in the store.
    let shares_dir = env.dir.path().join("shares");
    let out = ok(
        &backup(&config, &so_pin, 5, 3, shares_dir.to_str().expect("utf-8")),
        "kek backup",
    );
    assert!(out.contains("wrapped under a new recovery key"), "{out}");
    let shares = files_in(&shares_dir);
    assert_eq!(shares.len(), 5, "{shares:?}");
    for s in &shares {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(s).expect("share").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "share files are the owner's alone");
    }
    let arg = |i: usize| shares[i].to_str().expect("utf-8").to_string();
    let status = ok(&keyward(&["kek", "status", "--config", &config]), "kek status");
    assert!(
        status.contains("backed up") && !status.contains("not in the newest backup"),
        "{status}"
    );

    // Verified without restoring, from any three.
    let out = ok(
        &keyward(&[
            "kek",
            "verify-backup",
            "--config",
            &config,
            "--share",
            &arg(0),
            "--share",
            &arg(2),
            "--share",
            &arg(4),
        ]),
        "verify-backup",
    );
    assert!(out.contains("verified with 3 shares"), "{out}");

    // The token is lost.
    let token_dir = env.token.token_dir();
    for entry in files_in(&token_dir) {
        std::fs::remove_dir_all(&entry)
            .or_else(|_| std::fs::remove_file(&entry))
            .expect("remove");
    }
    assert!(files_in(&token_dir).is_empty());

    // Two shares, a mistyped one, a forged one: refused before anything is touched.
    let restore = |extra: &[String]| {
        let mut args: Vec<String> = [
            "kek",
            "restore",
            "--config",
            &config,
            "--init-token",
            "--so-pin-file",
            &so_pin,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for s in extra {
            args.push("--share".into());
            args.push(s.clone());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        keyward(&refs)
    };
    refused(
        &restore(&[arg(0), arg(1)]),
        "restore from 2 shares",
        "needs 3 shares; 2 given",
    );
    let text = std::fs::read_to_string(&shares[1]).expect("share");
    let mut typo = text.trim().to_string();
    let pos = typo.len() - 20;
    let c = if &typo[pos..=pos] == "a" { "b" } else { "a" };
    typo.replace_range(pos..=pos, c);
    let typo_file = env.dir.path().join("typo.txt");
    std::fs::write(&typo_file, &typo).expect("write");
    refused(
        &restore(&[arg(0), typo_file.to_str().expect("utf-8").into(), arg(2)]),
        "restore with a mistyped share",
        "checksum mismatch",
    );
    // A share whose value was altered and its checksum recomputed: only the recovery check catches it.
    let (body, _) = text.trim().rsplit_once('-').expect("checksum");
    let (head, value) = body.rsplit_once('-').expect("value");
    let mut v = hex::decode(value).expect("hex");
    v[3] ^= 0x40;
    let forged_body = format!("{head}-{}", hex::encode(&v));
    use sha2::Digest as _;
    let sum = sha2::Sha256::new()
        .chain_update(b"keyward share")
        .chain_update(forged_body.as_bytes())
        .finalize();
    let forged_file = env.dir.path().join("forged.txt");
    std::fs::write(&forged_file, format!("{forged_body}-{}", hex::encode(&sum[..4]))).expect("write");
    refused(
        &restore(&[arg(0), forged_file.to_str().expect("utf-8").into(), arg(2)]),
        "restore with a forged share",
        "do not rebuild the recovery key",
    );
    assert!(files_in(&token_dir).is_empty(), "refused restores created nothing");

    // The restore, from three other shares, onto a new token.
    let out = ok(&restore(&[arg(1), arg(3), arg(4)]), "kek restore");
    assert!(out.contains("restored onto token"), "{out}");
    assert!(
        out.contains("4 issuer keys are stored wrapped under these KEKs"),
        "{out}"
    );
    refused(
        &restore(&[arg(1), arg(3), arg(4)]),
        "a second restore",
        "already holds KEK version",
    );

    // Every account signs exactly as before.
    let (mut daemon, endpoint) = serve(&env.config_path);
    let ids: Vec<String> = before.iter().map(|s| s.id.clone()).collect();
    let after = common::block_on(sign_all(&endpoint, &env, &ids));
    assert_eq!(before, after);
    // The issuer keys sign again from their stored blobs: the same keys in the same states.
    assert_eq!(issuer_keys(), issuers_before);
    common::signal(&mut daemon, "-TERM");
    let out = ok(&keyward(&["doctor", "--config", &config]), "doctor after the restore");
    assert!(out.contains("checked 4 accounts: 4 ok, 0 failed"), "{out}");
    // EdDSA and ES256, each an active and a next key.
    assert!(out.contains("checked 4 stored issuer keys: 4 ok, 0 failed"), "{out}");

    // The ceremony is in the audit log, and the chain holds.
    let events = common::block_on(async {
        let store = keyward::store::open(&env.store_url).await.expect("store");
        store.audit().events_after(0, 100_000).await.expect("events")
    });
    let actions: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.body.action.as_str(), e.body.identity.as_str()))
        .collect();
    assert!(
        actions.contains(&("KekBackup", "operator:ceremony-test")),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("KekRestore", "operator:ceremony-test")),
        "{actions:?}"
    );
    // The issuer keys came back with the KEKs: none was lost, none made anew after the restore.
    assert!(!actions.iter().any(|(a, _)| *a == "IssuerKeyLost"), "{actions:?}");
    let restored_at = actions
        .iter()
        .position(|(a, _)| *a == "KekRestore")
        .expect("restore event");
    assert!(
        !actions[restored_at..].iter().any(|(a, _)| *a == "IssuerKeyPublished"),
        "{actions:?}"
    );
    let out = keyward(&["audit", "verify", "--config", &config]);
    ok(&out, "audit verify");
}

#[test]
fn restore_drill_hsm_custody_sqlite() {
    drill(Custody::Hsm, StoreKind::Sqlite);
}

#[test]
fn restore_drill_host_custody_postgres() {
    drill(Custody::Host, StoreKind::Postgres);
}

async fn new_account(endpoint: &str, env: &Env, label: &str) -> String {
    let ch = keyward::tls::connect(endpoint, &env.client_files("admin"))
        .await
        .expect("connect");
    AccountServiceClient::new(ch)
        .create_account(CreateAccountRequest {
            controller: CONTROLLER.into(),
            label: label.into(),
            allow: vec![],
        })
        .await
        .expect("account created")
        .into_inner()
        .account_id
}

/// `keyward kek rotate` beside a running daemon: the daemon wraps the next account's keys under
/// the new versions within its reload interval, older accounts keep signing, and the next
/// backup covers every version.
#[test]
fn a_rotation_reaches_the_running_daemon_and_the_next_backup() {
    let Some(env) = Env::new(Custody::Hsm, StoreKind::Sqlite) else {
        return;
    };
    let config = env.config_path.to_str().expect("utf-8 path").to_string();
    let so_pin = env.dir.path().join("so-pin");
    write_0600(&so_pin, &format!("{}\n", env.token.so_pin));
    ok(&keyward(&["init", "--config", &config]), "init");
    let (mut daemon, endpoint) = serve(&env.config_path);
    let first = common::block_on(new_account(&endpoint, &env, "before"));
    let out = ok(&keyward(&["kek", "rotate", "--config", &config]), "kek rotate");
    assert!(
        out.contains("KEK v3 created") && out.contains("is now current"),
        "{out}"
    );
    // Empty but current: never retired.
    refused(
        &keyward(&["kek", "retire", "--config", &config, "--version", "3"]),
        "retiring the current KEK",
        "KEK v3 is current",
    );
    std::thread::sleep(keyward::hsm::KEK_RELOAD + Duration::from_secs(1));
    let second = common::block_on(new_account(&endpoint, &env, "after"));
    let signed = common::block_on(sign_all(&endpoint, &env, &[first, second]));
    assert_eq!(signed.len(), 2);
    common::signal(&mut daemon, "-TERM");
    let status = ok(&keyward(&["kek", "status", "--config", &config]), "kek status");
    // hsm custody on SoftHSM: secp256k1 under the sealed KEK, Ed25519 under the host KEK.
    for line in [
        "KEK v1: 1 account keys",
        "KEK v2: 1 account keys",
        "KEK v3: 1 account keys",
        "KEK v4: 1 account keys",
    ] {
        assert!(status.contains(line), "{line:?} in {status}");
    }
    let out = ok(&keyward(&["doctor", "--config", &config]), "doctor");
    assert!(out.contains("checked 2 accounts: 2 ok"), "{out}");
    // The host-kind KEK's keys move to the current host KEK; the sealed one's stay.
    let out = ok(
        &keyward(&["kek", "rewrap", "--config", &config, "--batch", "1"]),
        "kek rewrap",
    );
    assert!(
        out.contains("rewrap: 1 keys moved to v4, 0 already moved by another run, 0 failed, 2 under sealed KEKs stay"),
        "{out}"
    );
    let status = ok(&keyward(&["kek", "status", "--config", &config]), "kek status");
    for line in [
        "KEK v1: 1 account keys",
        "KEK v2: 0 account keys",
        "KEK v3: 1 account keys",
        "KEK v4: 2 account keys",
    ] {
        assert!(status.contains(line), "{line:?} in {status}");
    }
    let out = ok(&keyward(&["kek", "rewrap", "--config", &config]), "kek rewrap again");
    assert!(out.contains("rewrap: 0 keys moved"), "nothing left to move: {out}");
    let out = ok(
        &keyward(&["kek", "retire", "--config", &config, "--version", "2"]),
        "kek retire v2",
    );
    assert!(out.contains("KEK v2 (keyward-kek-host-v2) destroyed"), "{out}");
    let out = ok(&keyward(&["doctor", "--config", &config]), "doctor after the rewrap");
    assert!(out.contains("checked 2 accounts: 2 ok"), "{out}");
    let out = ok(
        &backup(
            &config,
            so_pin.to_str().expect("utf-8"),
            3,
            2,
            env.dir.path().join("shares").to_str().expect("utf-8"),
        ),
        "kek backup",
    );
    assert!(out.contains("KEKs v1, v3, v4 wrapped"), "the retired v2 is gone: {out}");
}

/// A fresh token and SQLite store (`keyward init`) with `n` accounts made through `keyward
/// serve`, which is stopped again: the env, its config path and the account ids.
fn with_accounts(custody: Custody, n: usize) -> Option<(Env, String, Vec<String>)> {
    let env = Env::new(custody, StoreKind::Sqlite)?;
    let config = env.config_path.to_str().expect("utf-8 path").to_string();
    ok(&keyward(&["init", "--config", &config]), "init");
    let (mut daemon, endpoint) = serve(&env.config_path);
    let ids: Vec<String> = common::block_on(async {
        let mut ids = Vec::new();
        for i in 0..n {
            ids.push(new_account(&endpoint, &env, &format!("account-{i}")).await);
        }
        ids
    });
    common::signal(&mut daemon, "-TERM");
    Some((env, config, ids))
}

/// A rewrap killed (SIGKILL) part-way loses nothing and moves nothing twice: the next run moves
/// the rest, and every account still signs; the emptied version can then be retired (not
/// before, and never the current one), and the daemon signs without it.
#[test]
fn a_rewrap_killed_mid_run_is_finished_by_the_next() {
    let Some((env, config, ids)) = with_accounts(Custody::Host, 24) else {
        return;
    };
    // Host custody: one host KEK, v1, wraps both keys of every account.
    ok(&keyward(&["kek", "rotate", "--config", &config]), "kek rotate");
    let mut run = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["kek", "rewrap", "--config", &config, "--batch", "1", "--json"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn rewrap");
    let stdout = run.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    // Killed once a few blobs have moved: progress comes as one JSON line per batch.
    let mut batches = 0;
    for line in lines.by_ref().map_while(Result::ok) {
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON progress line");
        assert_eq!(v["kek"], 1, "{v}");
        assert_eq!(v["total"], 48, "{v}");
        batches += 1;
        assert_eq!(v["done"], batches, "one blob per batch: {v}");
        if v["moved"] == 5 {
            break;
        }
    }
    common::signal(&mut run, "-KILL");
    let out = keyward(&["kek", "retire", "--config", &config, "--version", "1"]);
    refused(
        &out,
        "retiring a KEK keys are still under",
        "still wrapped under KEK v1",
    );
    let status = ok(&keyward(&["kek", "status", "--config", &config]), "kek status");
    let count = |v: u32| -> u64 {
        status
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("KEK v{v}: ")))
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let (left, moved) = (count(1), count(2));
    assert_eq!(left + moved, 48, "every key is under one version: {status}");
    assert!(moved >= 5 && left > 0, "killed part-way: {status}");
    eprintln!("killed with {moved} moved and {left} left");
    let out = ok(
        &keyward(&["kek", "rewrap", "--config", &config, "--json"]),
        "kek rewrap again",
    );
    let summary: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("a summary line")).expect("JSON summary");
    assert_eq!(summary["done"], true, "{out}");
    assert_eq!(summary["moved"], left, "the rest moved, none twice: {out}");
    assert_eq!(summary["raced"], 0, "{out}");
    assert_eq!(summary["failed"], 0, "{out}");
    assert_eq!(summary["to"], 2, "{out}");
    let status = ok(&keyward(&["kek", "status", "--config", &config]), "kek status");
    assert!(
        status.contains("KEK v1: 0 account keys") && status.contains("KEK v2: 48 account keys"),
        "{status}"
    );
    let out = ok(&keyward(&["doctor", "--config", &config]), "doctor");
    assert!(out.contains("checked 24 accounts: 24 ok, 0 failed"), "{out}");
    refused(
        &keyward(&["kek", "retire", "--config", &config, "--version", "2"]),
        "retiring the KEK every key is under",
        "48 account keys are still wrapped under KEK v2",
    );
    let out = ok(
        &keyward(&["kek", "retire", "--config", &config, "--version", "1"]),
        "kek retire v1",
    );
    assert!(out.contains("KEK v1 (keyward-kek-host-v1) destroyed"), "{out}");
    let status = ok(&keyward(&["kek", "status", "--config", &config]), "kek status");
    assert!(
        !status.contains("KEK v1") && status.contains("KEK v2: 48 account keys"),
        "{status}"
    );
    let (mut daemon, endpoint) = serve(&env.config_path);
    let signed = common::block_on(sign_all(&endpoint, &env, &ids));
    assert_eq!(signed.len(), 24);
    // The metric counts keys per KEK version: all under v2, none left under v1.
    let metrics = scrape();
    assert!(
        metrics.contains("keyward_account_keys{kek_version=\"2\"} 48"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("keyward_account_keys{kek_version=\"1\"}"),
        "{metrics}"
    );
    common::signal(&mut daemon, "-TERM");
}

/// `keyward doctor` unwraps every account's keys and names each account whose blob is damaged
/// or belongs to another account.
#[test]
fn doctor_names_damaged_and_swapped_keys() {
    let Some((env, config, ids)) = with_accounts(Custody::Hsm, 3) else {
        return;
    };
    let out = ok(&keyward(&["doctor", "--config", &config]), "doctor");
    assert!(out.contains("checked 3 accounts: 3 ok, 0 failed"), "{out}");

    // Account 0 and 1 swap their secp256k1 blobs; account 2's Ed25519 blob loses a bit.
    common::block_on(async {
        let pool = sqlx::SqlitePool::connect(&env.store_url).await.expect("sqlite");
        let blob = |id: &str, alg: &str| {
            sqlx::query_scalar::<_, Vec<u8>>("SELECT wrapped FROM account_keys WHERE account_id = ?1 AND alg = ?2")
                .bind(id.to_string())
                .bind(alg.to_string())
                .fetch_one(&pool)
        };
        let a = blob(&ids[0], "secp256k1").await.expect("blob");
        let b = blob(&ids[1], "secp256k1").await.expect("blob");
        let mut c = blob(&ids[2], "ed25519").await.expect("blob");
        c[10] ^= 1;
        for (id, alg, w) in [
            (&ids[0], "secp256k1", b),
            (&ids[1], "secp256k1", a),
            (&ids[2], "ed25519", c),
        ] {
            sqlx::query("UPDATE account_keys SET wrapped = ?1 WHERE account_id = ?2 AND alg = ?3")
                .bind(w)
                .bind(id.to_string())
                .bind(alg)
                .execute(&pool)
                .await
                .expect("update");
        }
        pool.close().await;
    });
    let out = keyward(&["doctor", "--config", &config]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "doctor must fail: {stdout}");
    for id in &ids {
        assert!(stdout.contains(&format!("FAIL account {id}")), "{id} named: {stdout}");
    }
    assert!(stdout.contains("checked 3 accounts: 0 ok, 3 failed"), "{stdout}");
}

/// Holding the user PIN is not enough to take a KEK out: it wraps only under a key the security
/// officer marked trusted, and a user session cannot mark one.
#[test]
fn the_user_pin_alone_cannot_export_a_kek() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    use cryptoki::session::UserType;

    let Some(env) = Env::new(Custody::Hsm, StoreKind::Sqlite) else {
        return;
    };
    common::block_on(env.init());
    let ctx = Pkcs11::new(keyward::testkit::SoftHsmToken::module_path()).expect("module");
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("initialize");
    let slot = ctx
        .get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|i| i.label().trim_end() == env.token.label)
                .unwrap_or(false)
        })
        .expect("token");
    let s = ctx.open_rw_session(slot).expect("session");
    s.login(
        UserType::User,
        Some(&secrecy::SecretString::from(env.token.pin.clone())),
    )
    .expect("login");
    let keks = s
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Token(true)])
        .expect("find");
    assert!(!keks.is_empty(), "init made KEKs");
    let mine = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32u64.into()),
                Attribute::Token(false),
                Attribute::Wrap(true),
            ],
        )
        .expect("a wrapping key of the user's own");
    for kek in keks {
        let attrs = s
            .get_attributes(kek, &[cryptoki::object::AttributeType::WrapWithTrusted])
            .expect("attributes");
        assert!(attrs.contains(&Attribute::WrapWithTrusted(true)), "{attrs:?}");
        let e = s
            .wrap_key(&Mechanism::AesKeyWrapPad, mine, kek)
            .expect_err("a KEK must not wrap under an untrusted key");
        assert!(
            matches!(
                e,
                cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::KeyNotWrappable, _)
            ),
            "{e:?}"
        );
    }
    let e = s
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Value(vec![7; 32]),
            Attribute::Token(false),
            Attribute::Trusted(true),
            Attribute::Wrap(true),
        ])
        .expect_err("only the security officer marks a key trusted");
    assert!(
        matches!(
            e,
            cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::AttributeReadOnly, _)
        ),
        "{e:?}"
    );
}

/// The JWKS the last daemon [`serve`] started serves, and the kids in it.
fn served_kids(https: &str, env: &Env) -> Vec<String> {
    let (status, body) = common::block_on(keyward::cli::verify::https_get(
        &format!("https://{https}/.well-known/jwks.json"),
        &env.pki.ca_cert,
        "localhost",
    ))
    .expect("JWKS fetched");
    assert_eq!(status, 200, "{body}");
    let jwks: keyward::crypto::jwk::Jwks = serde_json::from_str(&body).expect("JWKS JSON");
    let mut kids: Vec<String> = jwks.keys.into_iter().map(|k| k.kid).collect();
    kids.sort();
    kids
}

/// A session token opened at `endpoint` for an account `wallet` controls: a JWS signed with the
/// daemon's active EdDSA issuer key. Returns its kid and the token.
async fn session_token(endpoint: &str, env: &Env, account_id: &str, wallet: &common::Wallet) -> (String, String) {
    use keyward::api::pb::session_service_client::SessionServiceClient;
    let ch = keyward::tls::connect(endpoint, &env.client_files("wallet-gateway"))
        .await
        .expect("connect");
    let mut s = SessionServiceClient::new(ch);
    let c = s
        .create_session_challenge(keyward::api::pb::CreateSessionChallengeRequest {
            account_id: account_id.into(),
            delegate: "spiffe://example.org/marketplace".into(),
            scopes: vec!["payments:0-100".into()],
            cap: "100".into(),
            ttl_seconds: 600,
        })
        .await
        .expect("challenge")
        .into_inner();
    let token = s
        .open_session(keyward::api::pb::OpenSessionRequest {
            challenge_id: c.challenge_id,
            signature: wallet.sign(&c.typed_data_json),
        })
        .await
        .expect("session opened")
        .into_inner()
        .token;
    use base64::Engine as _;
    let head = token.split('.').next().expect("header");
    let header: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(head)
            .expect("base64url"),
    )
    .expect("header JSON");
    (header["kid"].as_str().expect("kid").to_string(), token)
}

/// Issuer keys survive the token: two daemons on one PostgreSQL database, each with its own
/// SoftHSM token, the second token holding the same KEKs by `keyward kek restore` from the
/// first's backup. Both sign with the stored issuer keys; a rotation made through the first is
/// served by the second and used by it for the next session token, without a restart.
#[test]
fn a_restored_second_token_serves_and_uses_the_first_ones_issuer_rotation() {
    let Some(env) = Env::new(Custody::Hsm, StoreKind::Postgres) else {
        return;
    };
    let mut text = std::fs::read_to_string(&env.config_path).expect("config");
    // A next key may be promoted after 2 s of publication; every replica refreshes each second.
    text.push_str("[jwks]\nmax_age_seconds = 2\ntick_seconds = 1\n");
    std::fs::write(&env.config_path, &text).expect("config");
    let config = env.config_path.to_str().expect("utf-8 path").to_string();
    let so_pin = env.dir.path().join("so-pin");
    write_0600(&so_pin, &format!("{}\n", env.token.so_pin));
    let so_pin = so_pin.to_str().expect("utf-8").to_string();
    ok(&keyward(&["init", "--config", &config]), "init");
    let (mut a, _) = serve(&env.config_path);
    common::signal(&mut a, "-TERM");

    // The second token: empty, then given the first one's KEKs from a 2-of-3 backup.
    let shares_dir = env.dir.path().join("shares");
    ok(
        &backup(&config, &so_pin, 3, 2, shares_dir.to_str().expect("utf-8")),
        "kek backup",
    );
    let shares = files_in(&shares_dir);
    let token_b = keyward::testkit::SoftHsmToken::new().expect("second SoftHSM token");
    write_0600(&env.dir.path().join("hsm-pin-b"), &format!("{}\n", token_b.pin));
    let text_b = text
        .replace(&env.token.label, &token_b.label)
        .replace(
            &env.token.conf_path.display().to_string(),
            &token_b.conf_path.display().to_string(),
        )
        .replace("pin_file = \"hsm-pin\"", "pin_file = \"hsm-pin-b\"");
    assert_ne!(text_b, text);
    let config_b_path = env.dir.path().join("keyward-b.toml");
    std::fs::write(&config_b_path, &text_b).expect("config b");
    let config_b = config_b_path.to_str().expect("utf-8").to_string();
    let out = ok(
        &keyward(&[
            "kek",
            "restore",
            "--config",
            &config_b,
            "--share",
            shares[0].to_str().expect("utf-8"),
            "--share",
            shares[2].to_str().expect("utf-8"),
        ]),
        "kek restore onto the second token",
    );
    assert!(
        out.contains("4 issuer keys are stored wrapped under these KEKs"),
        "{out}"
    );

    let (mut a, a_grpc) = serve(&env.config_path);
    let a_https = HTTPS.with(|h| h.borrow().clone());
    let (mut b, b_grpc) = serve(&config_b_path);
    let b_https = HTTPS.with(|h| h.borrow().clone());
    let wallet = common::Wallet::new(0x5a);
    let account_id = common::block_on(async {
        let ch = keyward::tls::connect(&a_grpc, &env.client_files("admin"))
            .await
            .expect("connect");
        AccountServiceClient::new(ch)
            .create_account(CreateAccountRequest {
                controller: wallet.address().to_checksum(),
                label: "two-tokens".into(),
                allow: vec![],
            })
            .await
            .expect("account created")
            .into_inner()
            .account_id
    });

    // Both publish the same keys and sign with the same active key.
    let before = served_kids(&a_https, &env);
    assert_eq!(before.len(), 4, "EdDSA and ES256, active and next: {before:?}");
    assert_eq!(served_kids(&b_https, &env), before);
    let (kid_a, _) = common::block_on(session_token(&a_grpc, &env, &account_id, &wallet));
    let (kid_b, token_b_signed) = common::block_on(session_token(&b_grpc, &env, &account_id, &wallet));
    assert_eq!(kid_a, kid_b);
    let jwks_a: keyward::crypto::jwk::Jwks = {
        let (_, body) = common::block_on(keyward::cli::verify::https_get(
            &format!("https://{a_https}/.well-known/jwks.json"),
            &env.pki.ca_cert,
            "localhost",
        ))
        .expect("JWKS");
        serde_json::from_str(&body).expect("JWKS JSON")
    };
    keyward::crypto::jws::verify_compact(&token_b_signed, &jwks_a.keys).expect("B's token verifies under A's JWKS");

    // The rotation, through the first daemon, once the next key has been published long enough.
    std::thread::sleep(Duration::from_millis(2500));
    let rotated = common::block_on(async {
        use keyward::api::pb::jwks_service_client::JwksServiceClient;
        let ch = keyward::tls::connect(&a_grpc, &env.client_files("admin"))
            .await
            .expect("connect");
        JwksServiceClient::new(ch)
            .rotate_issuer_key(keyward::api::pb::RotateIssuerKeyRequest { alg: "EdDSA".into() })
            .await
            .expect("rotation")
            .into_inner()
            .rotations
    });
    assert_eq!(rotated.len(), 1);
    let (new_kid, fresh_next) = (rotated[0].activated_kid.clone(), rotated[0].next_kid.clone());
    assert_eq!(rotated[0].retired_kid, kid_a);
    assert!(!fresh_next.is_empty() && new_kid != kid_a);

    // The second daemon serves the new key set and signs with the new key, without a restart.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let kids = served_kids(&b_https, &env);
        let (kid, token) = common::block_on(session_token(&b_grpc, &env, &account_id, &wallet));
        if kids.contains(&fresh_next) && kid == new_kid {
            assert_eq!(kids, served_kids(&a_https, &env), "both serve one key set");
            keyward::crypto::jws::verify_compact(
                &token,
                &serde_json::from_str::<keyward::crypto::jwk::Jwks>(
                    &common::block_on(keyward::cli::verify::https_get(
                        &format!("https://{a_https}/.well-known/jwks.json"),
                        &env.pki.ca_cert,
                        "localhost",
                    ))
                    .expect("JWKS")
                    .1,
                )
                .expect("JWKS JSON")
                .keys,
            )
            .expect("B's token under the new key verifies under A's JWKS");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second daemon did not take up the rotation: serves {kids:?}, signs with {kid}, expected {new_kid}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // Each token unwraps every stored issuer key blob and it signs under its published key.
    for cfg in [&config, &config_b] {
        let out = ok(&keyward(&["doctor", "--config", cfg]), "doctor");
        assert!(out.contains("checked 4 stored issuer keys: 4 ok, 0 failed"), "{out}");
    }
    common::signal(&mut a, "-TERM");
    common::signal(&mut b, "-TERM");
}
