//! The `keyward` binary as a user runs it: `dev` on a fresh home, the client
//! commands from the README, start-up refusals, SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn keyward(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keyward"));
    c.arg("--home")
        .arg(home)
        .env_remove("SOFTHSM2_CONF")
        .env("RUST_LOG", "warn");
    c
}

/// Starts `keyward dev` and waits for its "ready" line.
fn start_dev(home: &Path, extra: &[&str]) -> (Child, Vec<String>) {
    let mut child = keyward(home)
        .args(["dev", "--listen", "127.0.0.1:0", "--https-listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn keyward dev");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l == "ready" => return (child, lines),
            Ok(l) => lines.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!("keyward dev did not print ready: {lines:?}");
            }
        }
    }
}

fn run_json(home: &Path, args: &[&str]) -> serde_json::Value {
    let out = keyward(home).args(args).output().expect("run keyward");
    assert!(
        out.status.success(),
        "keyward {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn sigterm(child: &mut Child) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn readme_walkthrough_works_and_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let (mut child, lines) = start_dev(&home, &[]);
    assert!(
        lines.iter().any(|l| l.contains("gRPC (mTLS)")),
        "prints its endpoints: {lines:?}"
    );
    for f in [
        "hsm-pin",
        "pki/ca-key.pem",
        "pki/server-key.pem",
        "pki/clients/admin-key.pem",
        "keyward.db",
    ] {
        let meta = std::fs::metadata(home.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o077, 0, "{f} is private");
    }
    let created = run_json(
        &home,
        &[
            "account",
            "create",
            "--controller",
            "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826",
            "--label",
            "alice",
            "--json",
        ],
    );
    let id = created["account_id"].as_str().expect("account_id").to_string();
    for k in [
        "eth_address",
        "secp256k1_public_key",
        "ed25519_public_key",
        "controller",
    ] {
        assert!(created[k].is_string(), "{k} in {created}");
    }
    let shown = run_json(&home, &["account", "show", &id, "--json"]);
    assert_eq!(shown["eth_address"], created["eth_address"]);

    let mail = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mail.json");
    let signed = run_json(
        &home,
        &[
            "sign",
            "typed-data",
            "--account",
            &id,
            "--file",
            mail.to_str().expect("utf-8"),
            "--json",
        ],
    );
    assert_eq!(
        signed["digest"],
        "0xbe609aee343fb3c4b28e1df9e632fca64fcfaede20f02e86244efddf30957bd2"
    );
    let sig = hex::decode(signed["signature"].as_str().expect("sig").trim_start_matches("0x")).expect("hex");
    let digest: [u8; 32] = hex::decode("be609aee343fb3c4b28e1df9e632fca64fcfaede20f02e86244efddf30957bd2")
        .expect("hex")
        .try_into()
        .expect("32");
    let signer = keyward::crypto::eth::recover_address(&digest, &sig).expect("recovers");
    assert_eq!(Some(signer.to_checksum().as_str()), created["eth_address"].as_str());

    let ed = run_json(
        &home,
        &[
            "sign",
            "message",
            "--account",
            &id,
            "--alg",
            "ed25519",
            "--data-hex",
            "68656c6c6f",
            "--json",
        ],
    );
    let pk: [u8; 32] = hex::decode(
        created["ed25519_public_key"]
            .as_str()
            .expect("pk")
            .trim_start_matches("0x"),
    )
    .expect("hex")
    .try_into()
    .expect("32");
    let sig = hex::decode(ed["signature"].as_str().expect("sig").trim_start_matches("0x")).expect("hex");
    use ed25519_dalek::Verifier as _;
    ed25519_dalek::VerifyingKey::from_bytes(&pk)
        .expect("pk")
        .verify(
            &keyward::crypto::message::ed25519_message(b"hello"),
            &ed25519_dalek::Signature::from_slice(&sig).expect("64"),
        )
        .expect("verifies");

    // Errors: stderr names the gRPC status, non-zero exit.
    let out = keyward(&home)
        .args([
            "--as",
            "wallet-gateway",
            "account",
            "create",
            "--controller",
            "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PERMISSION_DENIED"));

    assert!(sigterm(&mut child).success(), "graceful exit on SIGTERM");

    // Second run reuses the home: same token, same store, same account.
    let (mut child, _) = start_dev(&home, &[]);
    let again = run_json(
        &home,
        &[
            "sign",
            "message",
            "--account",
            &id,
            "--alg",
            "ed25519",
            "--data-hex",
            "68656c6c6f",
            "--json",
        ],
    );
    assert_eq!(again["public_key"], created["ed25519_public_key"]);
    assert!(sigterm(&mut child).success());
}

fn serve_with_config(dir: &Path, edit: impl Fn(String) -> String) -> std::process::Output {
    // Prepare a real dev home first (token, PKI, config), then break one thing.
    let home = dir.join("home");
    let (mut child, _) = start_dev(&home, &[]);
    assert!(sigterm(&mut child).success());
    let config = std::fs::read_to_string(home.join("keyward.toml")).expect("config");
    let broken = home.join("broken.toml");
    std::fs::write(&broken, edit(config)).expect("write");
    let mut cmd = keyward(&home);
    cmd.args(["serve", "--config"]).arg(&broken);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("daemon with a broken HSM config did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn wrong_pin_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let out = serve_with_config(dir.path(), |c| {
        // 0600: a readable file would be refused for its mode before the PIN is tried.
        std::fs::write(home.join("wrong-pin"), "000000\n").expect("pin");
        std::fs::set_permissions(
            home.join("wrong-pin"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod");
        c.replace("pin_file = \"hsm-pin\"", "pin_file = \"wrong-pin\"")
    });
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("pin"), "clear message: {err}");
    assert!(!err.contains("000000"), "never prints the PIN: {err}");
}

#[test]
fn missing_token_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = serve_with_config(dir.path(), |c| {
        c.replace("token_label = \"keyward-dev\"", "token_label = \"no-such-token\"")
    });
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-token"), "names the token: {err}");
}
