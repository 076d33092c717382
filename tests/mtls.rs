//! Mutual TLS at the daemon's front door: who is refused at the handshake,
//! and how an authenticated but unknown identity is treated.

mod common;

use common::*;
use keyward::api::pb::account_service_client::AccountServiceClient;
use keyward::api::pb::CreateAccountRequest;
use keyward::config::Custody;
use keyward::tls::devpki::{issue, new_ca, write_private, CertSpec};
use keyward::tls::ClientTlsFiles;
use time::{Duration, OffsetDateTime};
use tonic::Code;

fn spec(name: &str, not_before: OffsetDateTime, not_after: OffsetDateTime) -> CertSpec {
    CertSpec {
        common_name: name.into(),
        uri_sans: vec![format!("spiffe://example.org/{name}")],
        dns_sans: vec![],
        not_before,
        not_after,
        client: true,
        server: false,
    }
}

/// Writes a client cert issued by (ca_cert, ca_key) and returns its files.
fn client_files(
    env: &Env,
    name: &str,
    ca: (&str, &str),
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> ClientTlsFiles {
    let (cert, key) = issue(ca.0, ca.1, &spec(name, not_before, not_after)).expect("issue");
    let cert_path = env.dir.path().join(format!("{name}.pem"));
    let key_path = env.dir.path().join(format!("{name}-key.pem"));
    std::fs::write(&cert_path, cert).expect("write cert");
    write_private(&key_path, key.as_bytes()).expect("write key");
    ClientTlsFiles {
        ca: env.pki.ca_cert.clone(),
        cert: Some(cert_path),
        key: Some(key_path),
        domain: "localhost".into(),
    }
}

async fn create(d: &Daemon, files: &ClientTlsFiles) -> Result<(), tonic::Status> {
    let ch = match keyward::tls::connect(&d.grpc, files).await {
        Ok(ch) => ch,
        Err(e) => return Err(tonic::Status::unavailable(format!("connect: {e}"))),
    };
    AccountServiceClient::new(ch)
        .create_account(CreateAccountRequest {
            controller: CONTROLLER.into(),
            label: String::new(),
            allow: vec![],
        })
        .await
        .map(|_| ())
}

#[test]
fn handshake_refuses_bad_client_certificates() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let ca_cert = std::fs::read_to_string(&env.pki.ca_cert).expect("ca");
        let ca_key = std::fs::read_to_string(&env.pki.ca_key).expect("ca key");
        let now = OffsetDateTime::now_utc();
        let before = d.tls.handshake_failures();

        // No client certificate at all.
        let none = ClientTlsFiles {
            ca: env.pki.ca_cert.clone(),
            cert: None,
            key: None,
            domain: "localhost".into(),
        };
        // A certificate from another CA, for an admin-looking identity.
        let (other_ca, other_key) = new_ca("some other CA").expect("ca");
        let foreign = client_files(
            &env,
            "admin",
            (&other_ca, &other_key),
            now - Duration::hours(1),
            now + Duration::days(1),
        );
        let expired = client_files(
            &env,
            "expired",
            (&ca_cert, &ca_key),
            now - Duration::days(10),
            now - Duration::days(1),
        );
        let future = client_files(
            &env,
            "future",
            (&ca_cert, &ca_key),
            now + Duration::days(1),
            now + Duration::days(10),
        );
        let mut expected = before;
        for (what, files) in [
            ("no cert", &none),
            ("other CA", &foreign),
            ("expired", &expired),
            ("not yet valid", &future),
        ] {
            let err = create(&d, files).await.expect_err(what);
            // TLS 1.3 lets the client finish its side before the server checks
            // the certificate, so the client sees a transport error (tonic says
            // UNAVAILABLE, UNKNOWN or CANCELLED); the server's counter proves the
            // handshake itself was refused, before any RPC was read.
            assert!(
                matches!(err.code(), Code::Unavailable | Code::Unknown | Code::Cancelled),
                "{what}: refused at the transport, got {err:?}"
            );
            expected += 1;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while d.tls.handshake_failures() < expected {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{what}: handshake refusal not counted"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }

        // A valid certificate whose identity is known to no rule.
        let stranger = client_files(
            &env,
            "stranger",
            (&ca_cert, &ca_key),
            now - Duration::hours(1),
            now + Duration::days(1),
        );
        let err = create(&d, &stranger).await.expect_err("unknown identity");
        assert_eq!(err.code(), Code::PermissionDenied);
        // And the admin still gets in.
        create(&d, &env.client_files("admin")).await.expect("admin creates");
        d.stop().await;
    });
}
