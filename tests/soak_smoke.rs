//! Short smoke runs of the load tools; the 10-minute soak (README › Soak)
//! and the benchmarks are run by hand. `keyward soak`: the shipped binary
//! against a `keyward dev` it starts on a fresh home, mixed load with a fifth
//! of the calls cancelled, sampled every second; it must end PASS (no failed
//! request, readiness never dropped, no growth). `keyward bench`: it must
//! pace itself to a small account-creation limit and report.

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

/// A short `keyward bench` run against a daemon whose account-creation
/// bucket is small: the bench paces itself to the limit (counts the
/// refusals, never stops on one) and reports its figures.
#[test]
fn a_short_bench_paces_itself_to_the_creation_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    // First start writes the default policies; then a small bucket.
    let mut dev = start_dev(&home, &["--custody", "host"]);
    signal(&mut dev, "-TERM");
    let limits = home.join("policies/limits.toml");
    let text = std::fs::read_to_string(&limits).expect("limits.toml");
    let text = text.replace(
        "capacity = 100\nrefill_per_second = 10.0",
        "capacity = 5\nrefill_per_second = 40.0",
    );
    assert!(
        text.contains("capacity = 5\n"),
        "the default creation bucket is where the test expects it"
    );
    std::fs::write(&limits, text).expect("limits.toml");
    let mut dev = start_dev(&home, &[]);
    let out = keyward(&home)
        .args([
            "--json",
            "bench",
            "--accounts",
            "30",
            "--concurrency",
            "8",
            "--duration",
            "1",
            "--no-tonic-baseline",
            "--no-audit-baseline",
        ])
        .output()
        .expect("keyward bench");
    signal(&mut dev, "-TERM");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["accounts"], 30);
    assert!(report["account_create_refused"].as_u64().unwrap_or(0) > 0, "{report}");
    assert!(report["daemon"]["ok"].as_u64().unwrap_or(0) > 0, "{report}");
    assert!(stderr.contains("client-account-creation"), "{stderr}");
}
