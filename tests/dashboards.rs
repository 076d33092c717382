//! The Grafana dashboard (`deploy/grafana/keyward-dashboard.json`) and the
//! Prometheus alert rules (`deploy/prometheus/keyward-alerts.yml`) name only
//! series the daemon really exports. A real daemon (SoftHSM custody, SQLite)
//! runs a workload that touches every family — accounts created and one
//! refused by a rate limit, typed data and messages signed, a request denied
//! by policy, requests shed over one client's in-flight share, a store lock
//! that makes the daemon not ready and back — then `/metrics` is scraped from
//! its metrics listener. Every PromQL expression in the dashboard (panel
//! targets and the replica variable's query) and in the rules is reduced to
//! the metric names it references, and each must be in the scrape (a
//! `# TYPE` family or a sample; `_bucket`/`_sum`/`_count` count as their
//! histogram). A panel or rule with a misspelled or missing metric fails here.
//!
//! The rules file is read line by line, without a YAML parser: every `expr:`
//! must be on one line (no `|` or `>` block scalars); the file says so too.
//!
//! With `promtool` installed, the rules, the example scrape config and the
//! rule unit tests (`keyward-alerts.test.yml`) are checked by it as well;
//! without it the check prints SKIPPED, except under `CI=true`.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use keyward::api::pb::{CreateAccountRequest, SignMessageRequest, SignTypedDataRequest, SignatureAlgorithm};
use keyward::config::Custody;
use sqlx::Connection as _;
use tonic::Code;

const DASHBOARD: &str = "deploy/grafana/keyward-dashboard.json";
const ALERTS: &str = "deploy/prometheus/keyward-alerts.yml";
const ALERT_TESTS: &str = "deploy/prometheus/keyward-alerts.test.yml";
const PROMETHEUS_CONFIG: &str = "deploy/prometheus/prometheus.yml";

/// Series Prometheus records itself for every scrape target: not in the
/// daemon's `/metrics`, and allowed in expressions.
const PROMETHEUS_SERIES: &[&str] = &["up"];

/// PromQL words that are neither functions (those are followed by `(`) nor
/// metric names: aggregation operators (which may be followed by `by`),
/// grouping and matching modifiers, set and comparison operators, literals.
const KEYWORDS: &[&str] = &[
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "stddev",
    "stdvar",
    "group",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "limitk",
    "limit_ratio",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "atan2",
    "offset",
    "inf",
    "nan",
];

/// Keywords followed by a parenthesised list of label names (not metrics).
const LABEL_LIST_KEYWORDS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read_repo_file(rel: &str) -> String {
    let path = repo_file(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The index just past the bracket closing the one at `open` (`(`, `{` or
/// `[`), skipping quoted strings.
fn skip_balanced(c: &[char], open: usize) -> usize {
    let (o, close) = match c[open] {
        '(' => ('(', ')'),
        '{' => ('{', '}'),
        _ => ('[', ']'),
    };
    let mut depth = 0usize;
    let mut i = open;
    while i < c.len() {
        match c[i] {
            '"' | '\'' | '`' => {
                i = skip_string(c, i);
                continue;
            }
            ch if ch == o => depth += 1,
            ch if ch == close => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    c.len()
}

/// The index just past the string literal starting at `start`.
fn skip_string(c: &[char], start: usize) -> usize {
    let quote = c[start];
    let mut i = start + 1;
    while i < c.len() {
        if c[i] == '\\' && quote != '`' {
            i += 2;
            continue;
        }
        if c[i] == quote {
            return i + 1;
        }
        i += 1;
    }
    c.len()
}

fn next_non_space(c: &[char], mut i: usize) -> Option<usize> {
    while i < c.len() && c[i].is_whitespace() {
        i += 1;
    }
    (i < c.len()).then_some(i)
}

/// The metric names a PromQL expression references: identifiers used bare or
/// followed by `{` or `[`. Skipped: functions (an identifier followed by
/// `(`), keywords, label matchers inside `{...}`, label lists after `by`,
/// `without`, `on`, `ignoring`, `group_left`, `group_right`, ranges and
/// durations inside `[...]`, numbers, strings and Grafana variables
/// (`$instance`, `${datasource}`, `$__rate_interval`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let c: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '"' || ch == '\'' || ch == '`' {
            i = skip_string(&c, i);
        } else if ch == '{' || ch == '[' {
            i = skip_balanced(&c, i);
        } else if ch == '$' {
            i += 1;
            if i < c.len() && c[i] == '{' {
                i = skip_balanced(&c, i);
            } else {
                while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
            }
        } else if ch.is_ascii_digit() || ch == '.' {
            // Numbers, exponents and durations (1e-3, 0.99, 5m, 1h30m).
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.' || c[i] == '_') {
                i += 1;
            }
        } else if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' {
            let start = i;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let lower = word.to_ascii_lowercase();
            let next = next_non_space(&c, i);
            if LABEL_LIST_KEYWORDS.contains(&lower.as_str()) {
                if let Some(n) = next.filter(|&n| c[n] == '(') {
                    i = skip_balanced(&c, n);
                }
            } else if KEYWORDS.contains(&lower.as_str()) || next.is_some_and(|n| c[n] == '(') {
                // A keyword, or a function: its arguments are scanned on.
            } else {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every PromQL expression in the dashboard: each `expr` (panel targets, in
/// rows or not) and the query of each query variable (`label_values(expr,
/// label)` or `query_result(expr)`).
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                        ("templating", _) => {}
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    let variables = dashboard["templating"]["list"].as_array().cloned().unwrap_or_default();
    for var in variables.iter().filter(|v| v["type"] == "query") {
        let query = match &var["query"] {
            serde_json::Value::String(s) => s.clone(),
            other => other["query"].as_str().unwrap_or_default().to_string(),
        };
        let query = query.trim();
        if let Some(args) = query.strip_prefix("label_values(").and_then(|q| q.strip_suffix(')')) {
            // label_values(label) names no metric; label_values(expr, label) does.
            if let Some((expr, _label)) = args.rsplit_once(',') {
                out.push(expr.trim().to_string());
            }
        } else if let Some(expr) = query.strip_prefix("query_result(").and_then(|q| q.strip_suffix(')')) {
            out.push(expr.to_string());
        } else {
            panic!(
                "variable {}: query form this test does not read: {query:?}",
                var["name"]
            );
        }
    }
    out
}

/// Every `expr:` of the rules file. Format restriction (stated in the file):
/// one line per expression, plain or quoted, never a `|`/`>` block scalar.
fn alert_exprs(yaml: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (n, line) in yaml.lines().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let v = rest.trim();
        assert!(
            !v.is_empty() && !v.starts_with('|') && !v.starts_with('>'),
            "{ALERTS}:{}: expr must be on one line (tests/dashboards.rs reads it line-wise): {line:?}",
            n + 1
        );
        let expr = if let Some(inner) = v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
            inner.replace("''", "'")
        } else if let Some(inner) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            inner.replace("\\\"", "\"").replace("\\\\", "\\")
        } else {
            // A plain scalar ends at a comment (" #").
            v.split(" #").next().unwrap_or(v).trim().to_string()
        };
        out.push(expr);
    }
    out
}

/// What a scrape holds: families by `# TYPE` (name → type) and sample names.
struct Scrape {
    types: HashMap<String, String>,
    samples: HashSet<String>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut types = HashMap::new();
        let mut samples = HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    types.insert(name.to_string(), kind.to_string());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                samples.insert(line[..end].to_string());
            }
        }
        Scrape { types, samples }
    }

    /// Whether `name` is exported: a family, a histogram's or summary's
    /// `_bucket`/`_sum`/`_count`, or a sample.
    fn has(&self, name: &str) -> bool {
        if self.types.contains_key(name) || self.samples.contains(name) {
            return true;
        }
        ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .and_then(|family| self.types.get(family))
                .is_some_and(|kind| kind == "histogram" || kind == "summary")
        })
    }
}

async fn scrape(d: &Daemon) -> String {
    let url = format!("http://{}/metrics", d.metrics_addr.expect("metrics listener is on"));
    let (status, body) = keyward::cli::verify::http_get(&url).await.expect("metrics answer");
    assert_eq!(status, 200, "{url}: {body}");
    body
}

async fn wait_for_series(d: &Daemon, what: &str, limit: Duration, found: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let body = scrape(d).await;
        if found(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {limit:?}; last scrape:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rewrites `text` in the file at `path`, which must hold it.
fn edit_file(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert!(text.contains(from), "{} no longer holds {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Runs the workload and returns the scrape that follows it.
fn scrape_after_workload() -> String {
    let env = Env::new(Custody::Hsm, StoreKind::Sqlite).expect("env");
    // One request in flight per client: concurrent requests are shed.
    edit_file(
        &env.config_path,
        "[server]\n",
        "[server]\nmax_requests_per_identity = 1\n",
    );
    // One account per client, then the creation limit refuses.
    edit_file(
        &env.dir.path().join("policies/limits.toml"),
        "capacity = 100\nrefill_per_second = 10.0",
        "capacity = 1\nrefill_per_second = 0.001",
    );
    block_on(async {
        env.init().await;
        let d = env.start().await;

        let account = create_account(&d, &env, &[]).await;
        let refused = d
            .accounts(&env, "admin")
            .await
            .create_account(CreateAccountRequest {
                controller: CONTROLLER.into(),
                label: "bob".into(),
                allow: vec![],
            })
            .await
            .expect_err("second account over the creation limit");
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

        let mut signer = d.signing(&env, "admin").await;
        signer
            .sign_typed_data(SignTypedDataRequest {
                account_id: account.account_id.clone(),
                typed_data_json: MAIL.into(),
                ..Default::default()
            })
            .await
            .expect("typed data signed");
        for alg in [SignatureAlgorithm::Secp256k1, SignatureAlgorithm::Ed25519] {
            signer
                .sign_message(SignMessageRequest {
                    account_id: account.account_id.clone(),
                    alg: alg as i32,
                    data: b"hello".to_vec(),
                })
                .await
                .expect("message signed");
        }
        // Exactly 32 bytes: a bare digest, denied by policy.
        let denied = signer
            .sign_message(SignMessageRequest {
                account_id: account.account_id.clone(),
                alg: SignatureAlgorithm::Secp256k1 as i32,
                data: vec![7; 32],
            })
            .await
            .expect_err("raw digest denied");
        assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

        // Many requests at once from one client: those over its share are shed.
        let mut shed = false;
        for _ in 0..50 {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..16u8 {
                let mut s = signer.clone();
                let id = account.account_id.clone();
                tasks.spawn(async move {
                    s.sign_message(SignMessageRequest {
                        account_id: id,
                        alg: SignatureAlgorithm::Ed25519 as i32,
                        data: vec![i; 8],
                    })
                    .await
                });
            }
            while let Some(r) = tasks.join_next().await {
                match r.expect("request task") {
                    Ok(_) => {}
                    Err(e) if e.code() == Code::ResourceExhausted => shed = true,
                    Err(e) => panic!("unexpected refusal: {e:?}"),
                }
            }
            if shed {
                break;
            }
        }
        assert!(shed, "no request was shed with max_requests_per_identity = 1");

        // Another holder of the store's write lock: not ready, then ready again.
        let mut other = sqlx::SqliteConnection::connect(&env.store_url)
            .await
            .expect("second SQLite connection");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut other)
            .await
            .expect("take the write lock");
        wait_for_series(&d, "a not-ready transition", Duration::from_secs(20), |m| {
            m.contains("keyward_not_ready_total{component=\"store\"}")
        })
        .await;
        sqlx::query("ROLLBACK")
            .execute(&mut other)
            .await
            .expect("release the lock");
        drop(other);
        let body = wait_for_series(&d, "ready again", Duration::from_secs(20), |m| {
            m.lines().any(|l| l == "keyward_ready 1")
        })
        .await;
        d.stop().await;
        body
    })
}

#[test]
fn extractor_reads_names_and_skips_functions_labels_and_variables() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (instance, method, le) (rate(keyward_grpc_request_duration_seconds_bucket{method=~"Sign.*", instance=~"$instance"}[$__rate_interval]))) > 0.5"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["keyward_grpc_request_duration_seconds_bucket"]
    );
    let names = metric_names(
        "sum without (code) (rate(a_total[5m] offset 1h)) / on (instance) group_left (x) b / max(c) * 1e-3 + up{job=\"k\"} or vector(0)",
    );
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["a_total", "b", "c", "up"]);
    let names = metric_names(r#"count_values("code", keyward_misspelled{code=~"a|b"}) and bool ignoring(le) d"#);
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["d", "keyward_misspelled"]);

    let scrape = Scrape::parse(
        "# TYPE keyward_h histogram\nkeyward_h_bucket{le=\"+Inf\"} 1\nkeyward_h_sum 1\nkeyward_h_count 1\n# TYPE keyward_c counter\nkeyward_c 3\n",
    );
    for present in ["keyward_h", "keyward_h_bucket", "keyward_h_count", "keyward_c"] {
        assert!(scrape.has(present), "{present}");
    }
    for absent in ["keyward_c_count", "keyward_hh", "keyward"] {
        assert!(!scrape.has(absent), "{absent}");
    }

    let exprs = alert_exprs("  - alert: A\n    expr: a > 0\n  - alert: B\n    expr: 'b{x=''y''} > 0'\n");
    assert_eq!(exprs, ["a > 0", "b{x='y'} > 0"]);
}

#[test]
fn every_metric_in_the_dashboard_and_the_alert_rules_is_exported() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read_repo_file(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"));
    let alerts = read_repo_file(ALERTS);

    let mut exprs: Vec<(&str, String)> = dashboard_exprs(&dashboard)
        .into_iter()
        .map(|e| (DASHBOARD, e))
        .collect();
    let dashboard_count = exprs.len();
    assert!(
        dashboard_count >= 20,
        "{DASHBOARD}: only {dashboard_count} expressions found"
    );
    let rules = alert_exprs(&alerts);
    let alert_count = alerts
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:") || l.trim_start().starts_with("- record:"))
        .count();
    assert_eq!(
        rules.len(),
        alert_count,
        "{ALERTS}: one single-line expr per rule (found {} exprs for {alert_count} rules)",
        rules.len()
    );
    exprs.extend(rules.into_iter().map(|e| (ALERTS, e)));

    let body = scrape_after_workload();
    // The audit and issuer gauges carry real values, not only names.
    let value = |series: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no sample of {series}"))
    };
    assert!(value("keyward_audit_committed_seq") >= 5.0, "events were committed");
    assert!(value("keyward_audit_queue_depth") >= 0.0, "the appender runs");
    assert!(
        value("keyward_issuer_key_activated_timestamp_seconds{alg=\"EdDSA\"}") > 1.0e9,
        "the active EdDSA key's activation time"
    );
    assert!(value("keyward_issuer_key_rotation_seconds") >= 86_400.0);
    let scrape = Scrape::parse(&body);
    let mut missing = Vec::new();
    let mut used = BTreeSet::new();
    for (file, expr) in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{file}: no metric found in {expr:?}");
        for name in names {
            if !PROMETHEUS_SERIES.contains(&name.as_str()) && !scrape.has(&name) {
                missing.push(format!("{file}: {name} (in {expr})"));
            }
            used.insert(name);
        }
    }
    assert!(
        missing.is_empty(),
        "metrics not exported after the workload:\n{}",
        missing.join("\n")
    );
    eprintln!(
        "checked {} expressions ({dashboard_count} in the dashboard); metrics used: {}",
        exprs.len(),
        used.into_iter().collect::<Vec<_>>().join(" ")
    );
}

#[test]
fn promtool_accepts_the_rules_config_and_rule_tests() {
    let probe = std::process::Command::new("promtool").arg("--version").output();
    if probe.is_err() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "promtool is required under CI=true (Debian package prometheus; scripts/deps.sh --test)"
        );
        eprintln!("SKIPPED promtool checks: promtool is not installed (apt-get install prometheus)");
        return;
    }
    for args in [
        vec!["check", "rules", ALERTS],
        vec!["check", "config", PROMETHEUS_CONFIG],
        vec!["test", "rules", ALERT_TESTS],
    ] {
        let out = std::process::Command::new("promtool")
            .args(&args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run promtool {args:?}: {e}"));
        assert!(
            out.status.success(),
            "promtool {}: {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
