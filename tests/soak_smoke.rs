//! A short smoke run of `keyward soak` (the 10-minute soak is run by hand,
//! README › Soak): the shipped binary against a `keyward dev`
//! it starts on a fresh home, mixed load with a fifth of the calls cancelled,
//! sampled every second. It must end PASS: no failed request, readiness
//! never dropped, no growth.

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn keyward(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keyward"));
    c.arg("--home")
        .arg(home)
        .env_remove("SOFTHSM2_CONF")
        .env("RUST_LOG", "warn");
    c
}

#[test]
fn a_short_soak_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let mut dev = keyward(&home)
        .args([
            "dev",
            "--custody",
            "host",
            "--listen",
            "127.0.0.1:0",
            "--https-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn keyward dev");
    let stdout = dev.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) if l == "ready" => break,
            Ok(_) => {}
            Err(e) => {
                let _ = dev.kill();
                panic!("keyward dev did not print ready: {e}");
            }
        }
    }
    let out = keyward(&home)
        .args([
            "soak",
            "--duration",
            "8",
            "--concurrency",
            "8",
            "--cancel-fraction",
            "0.2",
            "--sample-every",
            "1",
            "--accounts",
            "3",
        ])
        .output()
        .expect("keyward soak");
    let pid = dev.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let _ = dev.wait();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "soak failed:\n{text}");
    assert!(text.contains("verdict: PASS"), "{text}");
    assert!(text.contains("failed 0 {}"), "{text}");
}
