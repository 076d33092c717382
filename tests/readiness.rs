//! Readiness that tells the truth about the store and the token: while another holder
//! keeps the SQLite file's write lock (an operator's shell, a stuck process),
//! `/readyz` answers 503 naming the store, gRPC health says NOT_SERVING, the
//! transition is counted once however many probes fail; when the lock goes,
//! the daemon is ready again by itself and writes succeed.

mod common;

use std::time::{Duration, Instant};

use common::*;
use keyward::config::Custody;
use sqlx::Connection as _;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn grpc_health(d: &Daemon, env: &Env, service: &str) -> ServingStatus {
    let mut h = HealthClient::new(d.channel(env, "admin").await);
    let r = h
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health answers")
        .into_inner();
    ServingStatus::try_from(r.status).expect("known status")
}

async fn readyz(d: &Daemon, env: &Env) -> (u16, String) {
    let url = format!("https://{}/readyz", d.https_addr);
    keyward::cli::verify::https_get(&url, &env.pki.ca_cert, "localhost")
        .await
        .expect("readyz answers")
}

/// The value of a series in the metrics text.
async fn metric(d: &Daemon, series: &str) -> Option<f64> {
    let url = format!("http://{}/metrics", d.metrics_addr.expect("metrics listener"));
    let (_, body) = keyward::cli::verify::http_get(&url).await.expect("metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_held_store_lock_makes_the_daemon_not_ready_until_it_goes() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let account = create_account(&d, &env, &[]).await;
        assert_eq!(readyz(&d, &env).await, (200, "ready\n".to_string()));
        assert_eq!(grpc_health(&d, &env, "").await, ServingStatus::Serving);
        assert_eq!(
            grpc_health(&d, &env, "keyward.v1.SigningService").await,
            ServingStatus::Serving
        );
        assert_eq!(metric(&d, "keyward_ready").await, Some(1.0));

        // Another process takes the write lock and keeps it.
        let mut other = sqlx::SqliteConnection::connect(&env.store_url).await.expect("connect");
        sqlx::query("BEGIN IMMEDIATE").execute(&mut other).await.expect("lock");

        wait_until("not ready", Duration::from_secs(15), || async {
            readyz(&d, &env).await.0 == 503
        })
        .await;
        let (_, body) = readyz(&d, &env).await;
        assert!(body.starts_with("not ready: store: "), "{body}");
        assert_eq!(grpc_health(&d, &env, "").await, ServingStatus::NotServing);
        assert_eq!(
            grpc_health(&d, &env, "keyward.v1.SigningService").await,
            ServingStatus::NotServing
        );
        assert_eq!(metric(&d, "keyward_ready").await, Some(0.0));
        // Several probes fail while it lasts; the transition counts once.
        wait_until("a second failed probe", Duration::from_secs(15), || async {
            metric(&d, "keyward_store_probe_failures_total").await.unwrap_or(0.0) >= 2.0
        })
        .await;
        assert_eq!(
            metric(&d, "keyward_not_ready_total{component=\"store\"}").await,
            Some(1.0)
        );

        // The lock goes: ready again without a restart, and writes work.
        sqlx::query("ROLLBACK").execute(&mut other).await.expect("unlock");
        drop(other);
        wait_until("ready again", Duration::from_secs(15), || async {
            readyz(&d, &env).await.0 == 200
        })
        .await;
        assert_eq!(grpc_health(&d, &env, "").await, ServingStatus::Serving);
        assert_eq!(metric(&d, "keyward_ready").await, Some(1.0));
        d.signing(&env, "admin")
            .await
            .sign_typed_data(keyward::api::pb::SignTypedDataRequest {
                account_id: account.account_id,
                typed_data_json: MAIL.into(),
                ..Default::default()
            })
            .await
            .expect("signs once ready again");
        create_account(&d, &env, &[]).await;
        d.stop().await;
    });
}

/// The token goes away under a running daemon (its directory moved aside, as
/// when a volume is lost or an HSM is unplugged): the HSM probe fails,
/// `/readyz` names the HSM, gRPC health says NOT_SERVING, and the
/// transition is counted for `hsm`. The token comes back: ready again without
/// a restart, and the account signs with its old key.
#[test]
fn a_lost_token_makes_the_daemon_not_ready_until_it_is_back() {
    let env = Env::new(Custody::Hsm, StoreKind::Sqlite).expect("env");
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let account = create_account(&d, &env, &[]).await;
        let sign = || async {
            d.signing(&env, "admin")
                .await
                .sign_typed_data(keyward::api::pb::SignTypedDataRequest {
                    account_id: account.account_id.clone(),
                    typed_data_json: MAIL.into(),
                    ..Default::default()
                })
                .await
        };
        let before = sign().await.expect("signs").into_inner().signature;
        wait_until("ready", Duration::from_secs(15), || async {
            readyz(&d, &env).await.0 == 200
        })
        .await;

        let tokens = env.token.token_dir();
        let away = tokens.with_extension("away");
        std::fs::rename(&tokens, &away).expect("move the token away");
        std::fs::create_dir(&tokens).expect("an empty token directory");
        wait_until("not ready", Duration::from_secs(15), || async {
            readyz(&d, &env).await.0 == 503
        })
        .await;
        let (_, body) = readyz(&d, &env).await;
        assert!(body.starts_with("not ready: hsm: "), "{body}");
        assert_eq!(grpc_health(&d, &env, "").await, ServingStatus::NotServing);
        assert_eq!(metric(&d, "keyward_ready").await, Some(0.0));
        assert_eq!(
            metric(&d, "keyward_not_ready_total{component=\"hsm\"}").await,
            Some(1.0)
        );

        std::fs::remove_dir(&tokens).expect("remove the empty directory");
        std::fs::rename(&away, &tokens).expect("the token comes back");
        wait_until("ready again", Duration::from_secs(20), || async {
            readyz(&d, &env).await.0 == 200
        })
        .await;
        assert_eq!(grpc_health(&d, &env, "").await, ServingStatus::Serving);
        let after = sign()
            .await
            .expect("signs once the token is back")
            .into_inner()
            .signature;
        // The token's ECDSA is randomised: both signatures must recover to the account's address.
        let digest = keyward::crypto::eip712::TypedData::from_json_str(MAIL)
            .expect("mail")
            .signing_hash();
        for sig in [&before, &after] {
            let signer = keyward::crypto::eth::recover_address(&digest, sig).expect("recovers");
            assert_eq!(
                signer.to_string().to_lowercase(),
                account.eth_address.to_lowercase(),
                "the account signs with its old key"
            );
        }
        d.stop().await;
    });
}
