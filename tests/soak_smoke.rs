//! A short smoke run of `keyward soak` (the 10-minute soak is run by hand,
//! README › Soak): the shipped binary against a `keyward dev`
//! it starts on a fresh home, mixed load with a fifth of the calls cancelled,
//! sampled every second. It must end PASS: no failed request, readiness
//! never dropped, no growth.

mod common;

use std::path::Path;
use std::process::Command;

use common::{signal, start_dev};

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
    let mut dev = start_dev(&home, &["--custody", "host"]);
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
    signal(&mut dev, "-TERM");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "soak failed:\n{text}");
    assert!(text.contains("verdict: PASS"), "{text}");
    assert!(text.contains("failed 0 {}"), "{text}");
}
