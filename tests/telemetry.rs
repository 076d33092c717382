//! OpenTelemetry traces end to end: the `keyward` binary (`dev`, HSM
//! custody, SQLite) exports over OTLP/gRPC to a collector this test serves
//! (the OTLP trace service from `opentelemetry-proto`). Requests that carry
//! a W3C `traceparent` become server spans in the caller's trace, with child
//! spans for the policy decision, the HSM operations, the store transaction
//! and the audit commit; the audit events of those requests record the trace
//! id, and the chain still verifies. Spans carry no account id or identity.
//! Without a collector configured, the caller's trace id still reaches the
//! audit event.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use keyward::api::pb::account_service_client::AccountServiceClient;
use keyward::api::pb::signing_service_client::SigningServiceClient;
use keyward::api::pb::{CreateAccountRequest, SignTypedDataRequest};
use keyward::config::Custody;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::trace::v1::Span;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

/// What the collector received: (service.name, span).
#[derive(Default, Clone)]
struct Collector(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().expect("lock");
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push((service.clone(), s));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn traceparent<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_SPAN}-01").parse().expect("ascii"),
    );
    r
}

/// (trace_id, action) of every audit event in the dev home's SQLite file.
async fn audit_trace_ids(home: &Path) -> Vec<(String, String)> {
    let db = format!("sqlite://{}", home.join("keyward.db").display());
    let pool = sqlx::SqlitePool::connect(&db).await.expect("sqlite");
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT trace_id, action FROM audit_events ORDER BY seq")
        .fetch_all(&pool)
        .await
        .expect("audit events");
    pool.close().await;
    rows
}

#[test]
fn requests_are_traced_into_the_callers_trace_and_their_audit_events() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let collector = Collector::default();
    let addr = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let svc = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    });

    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    // First run writes the config; the second runs with a collector.
    let mut child = start_dev(&home, &["--custody", "hsm"]);
    signal(&mut child, "-TERM");
    let config = home.join("keyward.toml");
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str(&format!(
        "\n[telemetry]\notlp_endpoint = \"http://{addr}\"\nservice_name = \"keyward-test\"\n"
    ));
    std::fs::write(&config, text).expect("config");
    let mut child = start_dev(&home, &["--custody", "hsm"]);

    let (account_id, own_trace) = rt.block_on(async {
        let admin = dev_channel(&home, "admin").await;
        let account = AccountServiceClient::new(admin.clone())
            .create_account(traceparent(CreateAccountRequest {
                controller: CONTROLLER.into(),
                label: "traced".into(),
                allow: vec![],
            }))
            .await
            .expect("account")
            .into_inner();
        SigningServiceClient::new(admin.clone())
            .sign_typed_data(traceparent(SignTypedDataRequest {
                account_id: account.account_id.clone(),
                typed_data_json: MAIL.into(),
                ..Default::default()
            }))
            .await
            .expect("typed data signed");
        // No traceparent: a root trace of the daemon's own.
        SigningServiceClient::new(admin)
            .sign_typed_data(SignTypedDataRequest {
                account_id: account.account_id.clone(),
                typed_data_json: MAIL.into(),
                ..Default::default()
            })
            .await
            .expect("typed data signed");
        let events = audit_trace_ids(&home).await;
        let traced: Vec<&str> = events
            .iter()
            .filter(|(t, _)| t == TRACE_ID)
            .map(|(_, a)| a.as_str())
            .collect();
        assert_eq!(
            traced,
            ["CreateAccount", "SignTypedData"],
            "the caller's trace id is in its requests' audit events: {events:?}"
        );
        let last = events.last().expect("events");
        assert_eq!(last.1, "SignTypedData");
        assert!(
            last.0.len() == 32 && last.0 != TRACE_ID && last.0.bytes().all(|b| b.is_ascii_hexdigit()),
            "a request without traceparent records the daemon's own trace id: {last:?}"
        );
        (account.account_id, last.0.clone())
    });

    // The batch exporter sends within its schedule (5 s by default).
    let deadline = Instant::now() + Duration::from_secs(20);
    let names = |trace: &str| -> BTreeSet<String> {
        let want = hex::decode(trace).expect("hex");
        collector
            .0
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, s)| s.trace_id == want)
            .map(|(_, s)| s.name.clone())
            .collect()
    };
    let expected: BTreeSet<String> = [
        "CreateAccount",
        "SignTypedData",
        "policy.decide",
        "hsm.generate_wrapped",
        "hsm.unwrap",
        "hsm.sign",
        "store.transaction",
        "audit.commit",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    loop {
        let got = names(TRACE_ID);
        if expected.is_subset(&got) && names(&own_trace).contains("SignTypedData") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spans missing from the caller's trace: got {got:?}, want {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let spans = collector.0.lock().expect("lock").clone();
    let parent = hex::decode(PARENT_SPAN).expect("hex");
    let want = hex::decode(TRACE_ID).expect("hex");
    for (service, s) in spans.iter().filter(|(_, s)| s.trace_id == want) {
        assert!(service.contains("keyward-test"), "service.name: {service}");
        if s.name == "CreateAccount" || s.name == "SignTypedData" {
            assert_eq!(s.parent_span_id, parent, "{} is not the caller's child", s.name);
            assert_eq!(s.kind, 2, "{} is not a server span", s.name);
        }
        // Nothing that identifies an account or a caller rides on a span.
        let attrs = format!("{:?}", s.attributes);
        assert!(!attrs.contains(&account_id), "{}: account id in {attrs}", s.name);
        assert!(!attrs.contains("spiffe://"), "{}: identity in {attrs}", s.name);
    }
    signal(&mut child, "-TERM");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
        .arg("--home")
        .arg(&home)
        .args(["audit", "verify"])
        .env_remove("SOFTHSM2_CONF")
        .output()
        .expect("keyward audit verify");
    assert!(
        out.status.success(),
        "the chain with trace ids does not verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Without a collector the daemon exports nothing, but a caller's trace id
/// still reaches its audit event (and a malformed `traceparent` is ignored).
#[test]
fn without_a_collector_the_callers_trace_id_is_still_audited() {
    let env = Env::new(Custody::Hsm, StoreKind::Sqlite).expect("env");
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let account = create_account(&d, &env, &[]).await;
        let mut signing = d.signing(&env, "admin").await;
        signing
            .sign_typed_data(traceparent(SignTypedDataRequest {
                account_id: account.account_id.clone(),
                typed_data_json: MAIL.into(),
                ..Default::default()
            }))
            .await
            .expect("signed");
        let mut bad = tonic::Request::new(SignTypedDataRequest {
            account_id: account.account_id.clone(),
            typed_data_json: MAIL.into(),
            ..Default::default()
        });
        bad.metadata_mut()
            .insert("traceparent", "00-zzzz-00f067aa0ba902b7-01".parse().expect("ascii"));
        signing
            .sign_typed_data(bad)
            .await
            .expect("a bad traceparent is ignored");
        d.stop().await;
        let pool = sqlx::SqlitePool::connect(&env.store_url).await.expect("sqlite");
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT trace_id, action FROM audit_events WHERE action = 'SignTypedData' ORDER BY seq")
                .fetch_all(&pool)
                .await
                .expect("events");
        assert_eq!(
            rows,
            [
                (TRACE_ID.to_string(), "SignTypedData".to_string()),
                (String::new(), "SignTypedData".to_string())
            ]
        );
    });
}

/// A collector that does not answer costs spans, never requests: the daemon
/// signs as usual and says once that spans are not exported.
#[test]
fn a_collector_that_is_down_costs_spans_not_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let mut child = start_dev(&home, &["--custody", "host"]);
    signal(&mut child, "-TERM");
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let config = home.join("keyward.toml");
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str(&format!(
        "\n[telemetry]\notlp_endpoint = \"http://{closed}\"\nexport_timeout_seconds = 1\n"
    ));
    std::fs::write(&config, text).expect("config");
    let log = dir.path().join("daemon.log");
    let mut child = start_dev_logging(&home, &["--custody", "host"], &log);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let admin = dev_channel(&home, "admin").await;
        let account = AccountServiceClient::new(admin.clone())
            .create_account(CreateAccountRequest {
                controller: CONTROLLER.into(),
                label: "no-collector".into(),
                allow: vec![],
            })
            .await
            .expect("account")
            .into_inner();
        let mut signing = SigningServiceClient::new(admin);
        for _ in 0..20 {
            let t0 = Instant::now();
            signing
                .sign_typed_data(traceparent(SignTypedDataRequest {
                    account_id: account.account_id.clone(),
                    typed_data_json: MAIL.into(),
                    ..Default::default()
                }))
                .await
                .expect("signed while the collector is down");
            assert!(
                t0.elapsed() < Duration::from_secs(1),
                "a request waited for the collector"
            );
        }
    });
    // The batch exporter's schedule is 5 s; the export then fails at once
    // (connection refused) or after its 1 s timeout.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("spans not exported") {
            assert_eq!(
                text.matches("spans not exported").count(),
                1,
                "the warning repeats instead of being said once: {text}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no warning about unexported spans: {text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    signal(&mut child, "-TERM");
}
