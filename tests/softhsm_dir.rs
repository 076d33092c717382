//! `softhsm/` as an operator runs it: `init-token.sh` (real bash, the real
//! keyward binary, real SoftHSM) makes a token and its KEK from PIN files into
//! a fresh folder, `keyward serve` runs on that token, a second run changes
//! nothing, and a PIN never shows on any process's command line or
//! environment while the script runs.

mod common;

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::Verifier as _;
use keyward::api::pb::account_service_client::AccountServiceClient;
use keyward::api::pb::signing_service_client::SigningServiceClient;
use keyward::api::pb::{CreateAccountRequest, SignMessageRequest, SignatureAlgorithm};
use keyward::testkit::SoftHsmToken;
use keyward::tls::devpki::{ensure_dev_pki, DevPki};
use keyward::tls::ClientTlsFiles;
use rand::RngCore as _;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("softhsm/init-token.sh")
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

fn write_mode(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A folder holding what an operator prepares before the script: PIN files
/// (0600), certificates and a keyward.toml naming a token that does not exist.
struct Site {
    dir: tempfile::TempDir,
    label: String,
    pin: String,
    so_pin: String,
    pki: DevPki,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = ensure_dev_pki(&dir.path().join("pki"), &["admin"]).expect("dev pki");
        let (pin, so_pin) = (random_hex(16), random_hex(16));
        let label = format!("kw-{}", random_hex(6));
        write_mode(&dir.path().join("hsm-pin"), &format!("{pin}\n"), 0o600);
        write_mode(&dir.path().join("so-pin"), &format!("{so_pin}\n"), 0o600);
        let config = format!(
            r#"[server]
listen = "127.0.0.1:0"
https_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
[tls]
cert = "pki/server.pem"
key = "pki/server-key.pem"
client_ca = "pki/ca.pem"
[hsm]
module = "{module}"
token_label = "{label}"
pin_file = "hsm-pin"
pool_size = 2
softhsm_conf = "softhsm2.conf"
[store]
url = "sqlite://{db}"
[policy]
dir = "policies"
"#,
            module = SoftHsmToken::module_path().display(),
            db = dir.path().join("keyward.db").display(),
        );
        std::fs::write(dir.path().join("keyward.toml"), config).expect("config");
        Site {
            dir,
            label,
            pin,
            so_pin,
            pki,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn token_dir(&self) -> PathBuf {
        self.path("tokens")
    }

    /// Token folders SoftHSM made (one per initialised token).
    fn tokens(&self) -> usize {
        match std::fs::read_dir(self.token_dir()) {
            Ok(entries) => entries.filter(|e| e.as_ref().is_ok_and(|e| e.path().is_dir())).count(),
            Err(_) => 0,
        }
    }

    /// Runs the script as an init job would, under `strace` (every execve's
    /// argv and environment recorded), while polling every process's argv
    /// and environment for either PIN (what `ps` shows other users).
    fn init_token(&self) -> (Output, WatchReport) {
        let trace = self.path("execve.trace");
        let child = Command::new("strace")
            .args([
                "-f",
                "-qq",
                "-v",
                "-s",
                "65536",
                "--seccomp-bpf",
                "-e",
                "trace=execve",
                "-o",
            ])
            .arg(&trace)
            .arg("bash")
            .arg(script())
            .arg("--config")
            .arg(self.path("keyward.toml"))
            .arg("--so-pin-file")
            .arg(self.path("so-pin"))
            .arg("--token-dir")
            .arg(self.token_dir())
            .arg("--softhsm-conf")
            .arg(self.path("softhsm2.conf"))
            .env("KEYWARD_BIN", env!("CARGO_BIN_EXE_keyward"))
            .env_remove("SOFTHSM2_CONF")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn init-token.sh");
        let secrets = vec![self.pin.clone(), self.so_pin.clone()];
        let watch = Watch::start(secrets.clone());
        let out = child.wait_with_output().expect("init-token.sh runs");
        let mut report = watch.stop();
        let execs = std::fs::read_to_string(&trace).expect("strace output (install Debian's strace)");
        for line in execs.lines().filter(|l| l.contains("execve(")) {
            report.execs += 1;
            report.traced_init |= line.contains("\"--init-token\"");
            if secrets.iter().any(|s| line.contains(s.as_str())) {
                report
                    .leaks
                    .push(format!("execve: {}", line.split(", [").next().unwrap_or(line)));
            }
        }
        (out, report)
    }

    fn client(&self) -> ClientTlsFiles {
        let admin = &self.pki.clients[0];
        ClientTlsFiles {
            ca: self.pki.ca_cert.clone(),
            cert: Some(admin.cert.clone()),
            key: Some(admin.key.clone()),
            domain: "localhost".into(),
        }
    }

    /// `keyward serve` on the site's config; returns it with its gRPC
    /// address, read from its JSON "serving" log line.
    fn serve(&self) -> (Child, String) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(["--log-format", "json", "serve", "--config"])
            .arg(self.path("keyward.toml"))
            .env_remove("SOFTHSM2_CONF")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keyward serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if v["fields"]["message"] == "serving" {
                    let _ = tx.send(v["fields"]["grpc"].as_str().unwrap_or_default().to_string());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(grpc) => (child, format!("https://{grpc}")),
            Err(e) => {
                let _ = child.kill();
                panic!("keyward serve did not log `serving`: {e}");
            }
        }
    }
}

/// Polls /proc/*/cmdline and /proc/*/environ until stopped.
struct Watch {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<WatchReport>,
}

#[derive(Debug, Default)]
struct WatchReport {
    /// Command lines that held a PIN.
    leaks: Vec<String>,
    /// Whether the `keyward init --init-token` process was seen (the watch
    /// really looked while the script ran).
    saw_init: bool,
    scans: u32,
    /// execve calls strace recorded, and whether one ran `keyward init --init-token`.
    execs: u32,
    traced_init: bool,
}

impl Watch {
    fn start(secrets: Vec<String>) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut report = WatchReport::default();
            loop {
                let last = flag.load(Ordering::SeqCst);
                scan_proc(&secrets, &mut report);
                report.scans += 1;
                if last {
                    return report;
                }
            }
        });
        Watch { stop, handle }
    }

    fn stop(self) -> WatchReport {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("watch thread")
    }
}

fn scan_proc(secrets: &[String], report: &mut WatchReport) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let pid = entry.file_name();
        if !pid.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        for file in ["cmdline", "environ"] {
            let Ok(bytes) = std::fs::read(entry.path().join(file)) else {
                continue;
            };
            let text = String::from_utf8_lossy(&bytes).replace('\0', " ");
            if file == "cmdline" && text.contains(" init ") && text.contains("--init-token") {
                report.saw_init = true;
            }
            if secrets.iter().any(|s| text.contains(s.as_str())) {
                report.leaks.push(format!("/proc/{}/{file}", pid.to_string_lossy()));
            }
        }
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits for SERVING, creates an account (wrapped under the KEK) unless one is
/// given, and has it sign (unwrapped under the KEK); the signature is checked
/// with ed25519-dalek. Returns the account id.
async fn use_daemon(site: &Site, grpc: &str, account: Option<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let channel = loop {
        if let Ok(ch) = keyward::tls::connect(grpc, &site.client()).await {
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
            let status = h
                .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                .await
                .map(|r| r.into_inner().status)
                .ok();
            if status == Some(tonic_health::pb::health_check_response::ServingStatus::Serving as i32) {
                break ch;
            }
        }
        assert!(Instant::now() < deadline, "keyward serve never became SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let id = match account {
        Some(id) => id,
        None => {
            AccountServiceClient::new(channel.clone())
                .create_account(CreateAccountRequest {
                    controller: common::CONTROLLER.into(),
                    label: "softhsm-dir".into(),
                    allow: vec![],
                })
                .await
                .expect("account created on the script's token")
                .into_inner()
                .account_id
        }
    };
    let signed = SigningServiceClient::new(channel)
        .sign_message(SignMessageRequest {
            account_id: id.clone(),
            alg: SignatureAlgorithm::Ed25519 as i32,
            data: b"hello".to_vec(),
        })
        .await
        .expect("the account signs")
        .into_inner();
    let key = ed25519_dalek::VerifyingKey::from_bytes(
        &<[u8; 32]>::try_from(signed.public_key.as_slice()).expect("32-byte key"),
    )
    .expect("public key");
    let sig = ed25519_dalek::Signature::from_slice(&signed.signature).expect("64-byte signature");
    key.verify(b"keyward signed message v1:\nhello", &sig)
        .expect("ed25519-dalek verifies the signature");
    id
}

#[test]
fn init_token_script_makes_a_token_the_daemon_serves_and_is_idempotent() {
    let site = Site::new();

    let (out, watch) = site.init_token();
    assert!(out.status.success(), "init-token.sh failed: {}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(&format!("token {:?} created", site.label)), "{text}");
    assert!(text.contains("key-encryption key version 1 created"), "{text}");
    assert_eq!(site.tokens(), 1, "one token folder");
    let conf = std::fs::read_to_string(site.path("softhsm2.conf")).expect("softhsm2.conf written");
    assert!(
        conf.contains(&format!("directories.tokendir = {}\n", site.token_dir().display())),
        "{conf}"
    );
    let mode = |p: PathBuf| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(site.path("softhsm2.conf")), 0o600);
    assert_eq!(mode(site.token_dir()), 0o700);
    assert!(
        watch.saw_init,
        "the watch saw the keyward init process ({} scans)",
        watch.scans
    );
    assert!(watch.traced_init, "strace recorded the keyward init execve: {watch:?}");
    assert!(watch.leaks.is_empty(), "a PIN was visible in {:?}", watch.leaks);

    let (mut daemon, grpc) = site.serve();
    let account = common::block_on(use_daemon(&site, &grpc, None));
    common::signal(&mut daemon, "-TERM");

    // Again: the token and the KEK are found, nothing is re-initialised.
    let (out, watch) = site.init_token();
    assert!(out.status.success(), "second run failed: {}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("already initialised"), "{text}");
    assert!(
        text.contains("key-encryption key version 1 already on the token"),
        "{text}"
    );
    assert!(text.contains("exists; kept"), "{text}");
    assert_eq!(site.tokens(), 1, "still one token folder");
    assert!(watch.leaks.is_empty(), "a PIN was visible in {:?}", watch.leaks);

    // The account made before the second run still unwraps: same token, same KEK.
    let (mut daemon, grpc) = site.serve();
    common::block_on(use_daemon(&site, &grpc, Some(account)));
    common::signal(&mut daemon, "-TERM");
}

#[test]
fn init_token_script_refuses_readable_pin_files_and_pins_as_arguments() {
    // SO PIN file readable by others: the script refuses before touching anything.
    let site = Site::new();
    std::fs::set_permissions(site.path("so-pin"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (out, _) = site.init_token();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("has mode 644"), "{}", stderr(&out));
    assert!(!site.token_dir().exists() && !site.path("softhsm2.conf").exists());

    // User PIN file readable by the group: keyward refuses before C_InitToken.
    let site = Site::new();
    std::fs::set_permissions(site.path("hsm-pin"), std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let (out, _) = site.init_token();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("hsm.pin_file") && err.contains("mode 0640"), "{err}");
    assert_eq!(site.tokens(), 0, "no token was created");
    assert!(!err.contains(&site.pin) && !err.contains(&site.so_pin), "{err}");

    // A PIN on the command line is not an option.
    let out = Command::new("bash")
        .arg(script())
        .args(["--pin", "1234"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown argument: --pin"), "{}", stderr(&out));
}

#[test]
fn init_token_script_never_puts_a_pin_on_a_command_line() {
    // Static: outside comments, the script names no PIN flag but --so-pin-file,
    // never reads a PIN file's content, and does not call softhsm2-util
    // (whose --init-token takes --pin/--so-pin as arguments).
    let text = std::fs::read_to_string(script()).expect("script");
    let code: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
    for line in &code {
        for (at, _) in line.match_indices("-pin") {
            assert!(
                line[at..].starts_with("-pin-file"),
                "a PIN flag other than --so-pin-file: {line}"
            );
        }
        assert!(!line.contains("softhsm2-util"), "{line}");
        assert!(
            !(line.contains("cat ") || line.contains("read ") || line.contains("$(<\"$so_pin")),
            "the script reads a file's content: {line}"
        );
    }
    assert!(
        code.iter()
            .any(|l| l.contains("init --config") && l.contains("--init-token")),
        "the script drives keyward init --init-token"
    );
}

#[test]
fn init_token_script_finishes_a_token_left_without_a_user_pin() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};

    // A run interrupted between C_InitToken and C_InitPIN, with its
    // softhsm2.conf already written from the template.
    let site = Site::new();
    std::fs::create_dir(site.token_dir()).expect("token dir");
    let template = std::fs::read_to_string(script().with_file_name("softhsm2.conf.template")).expect("template");
    let conf = template.replace("@TOKENDIR@", &site.token_dir().display().to_string());
    write_mode(&site.path("softhsm2.conf"), &conf, 0o600);
    std::env::set_var("SOFTHSM2_CONF", site.path("softhsm2.conf"));
    let ctx = Pkcs11::new(SoftHsmToken::module_path()).expect("module");
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = ctx.get_slots_with_token().expect("slots")[0];
    let so_pin = secrecy::SecretString::from(site.so_pin.as_str());
    ctx.init_token(slot, &so_pin, &site.label).expect("C_InitToken");
    let info = ctx.get_token_info(slot).expect("token info");
    assert!(info.token_initialized() && !info.user_pin_initialized());
    ctx.finalize().expect("C_Finalize");

    let (out, watch) = site.init_token();
    assert!(out.status.success(), "init-token.sh failed: {}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("token {:?} already initialised; user PIN set", site.label)),
        "{text}"
    );
    assert!(text.contains("key-encryption key version 1 created"), "{text}");
    assert!(watch.leaks.is_empty(), "a PIN was visible in {:?}", watch.leaks);
    assert_eq!(site.tokens(), 1);

    let (mut daemon, grpc) = site.serve();
    common::block_on(use_daemon(&site, &grpc, None));
    common::signal(&mut daemon, "-TERM");
}
