//! The HTTPS side port (server TLS, no client certificate): `/metrics` for
//! Prometheus, `/healthz`, and the public issuer key set at
//! `/.well-known/jwks.json` (`Cache-Control: public, max-age=N`, strong ETag,
//! `304` on a matching `If-None-Match`).

use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::api::Daemon;
use crate::tls::ServerTls;

/// The JWKS path on the side port.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

/// Whether an `If-None-Match` value matches `etag` (`*`, or any listed tag; weak
/// comparison, as RFC 9110 prescribes for `If-None-Match`).
fn none_match(header: &str, etag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
    header.trim() == "*" || header.split(',').any(|t| bare(t) == bare(etag))
}

async fn jwks(daemon: Arc<Daemon>, headers: http::HeaderMap) -> axum::response::Response {
    use axum::response::IntoResponse;
    let doc = daemon.jwks.document();
    let cache = format!("public, max-age={}", doc.max_age);
    let matched = headers
        .get_all(http::header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| none_match(v, &doc.etag));
    if matched {
        return (
            http::StatusCode::NOT_MODIFIED,
            [(http::header::ETAG, doc.etag), (http::header::CACHE_CONTROL, cache)],
        )
            .into_response();
    }
    (
        [
            (http::header::CONTENT_TYPE, "application/jwk-set+json".to_string()),
            (http::header::ETAG, doc.etag),
            (http::header::CACHE_CONTROL, cache),
        ],
        doc.body,
    )
        .into_response()
}

fn router(daemon: Arc<Daemon>, tls: Arc<ServerTls>) -> Router {
    let account_daemon = daemon.clone();

    let jwks_daemon = daemon.clone();
    let ready_daemon = daemon.clone();
    Router::new()
        .route(
            JWKS_PATH,
            get(move |headers: http::HeaderMap| jwks(jwks_daemon.clone(), headers)),
        )
        .route(
            "/metrics",
            get(move || {
                let d = daemon.clone();
                let t = tls.clone();
                async move {
                    let hsm = d.keys.hsm();
                    d.metrics.set_gauges(
                        hsm.pool_in_use(),
                        hsm.pool_size(),
                        d.keys.cached(),
                        t.handshake_failures(),
                    );
                    d.metrics.set_store_pool(d.keys.store().pool_stats());
                    d.metrics.sync_hsm_wait_timeouts(hsm.pool_wait_timeouts());
                    (
                        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        d.metrics.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(move || readyz(ready_daemon.clone())))
        .route("/v1/accounts/{id}/jwks.json", account_jwks_route(account_daemon))
}

/// `GET /v1/accounts/{id}/jwks.json` (issue 5): an account's public keys
/// (Ed25519 alg EdDSA, secp256k1 alg ES256K, kid = RFC 7638 thumbprint), for
/// verifiers of its attestations. Public; 404 for unknown or malformed ids.
fn account_jwks_route(daemon: Arc<Daemon>) -> axum::routing::MethodRouter {
    get(move |axum::extract::Path(id): axum::extract::Path<String>| {
        let d = daemon.clone();
        async move {
            use http::{header, StatusCode};
            let not_found = (
                StatusCode::NOT_FOUND,
                [
                    (header::CACHE_CONTROL, "no-store"),
                    (header::CONTENT_TYPE, "text/plain"),
                ],
                "not found\n".to_string(),
            );
            if uuid::Uuid::try_parse(&id).is_err() {
                return not_found;
            }
            let record = match d.keys.record(&id).await {
                Ok(r) => r,
                Err(crate::keys::KeyError::AccountNotFound(_)) => return not_found,
                Err(e) => {
                    tracing::warn!(error = %e, "account JWKS: store failed");
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [
                            (header::CACHE_CONTROL, "no-store"),
                            (header::CONTENT_TYPE, "text/plain"),
                        ],
                        "unavailable\n".to_string(),
                    );
                }
            };
            match crate::receipt::AccountPublic::of(&record, d.sessions.domain().chain_id)
                .ok()
                .and_then(|p| serde_json::to_string(&p.jwks()).ok())
            {
                // Account keys never change under an id: safe to cache.
                Some(body) => (
                    StatusCode::OK,
                    [
                        (header::CACHE_CONTROL, "public, max-age=3600"),
                        (header::CONTENT_TYPE, "application/jwk-set+json"),
                    ],
                    body,
                ),
                None => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [
                        (header::CACHE_CONTROL, "no-store"),
                        (header::CONTENT_TYPE, "text/plain"),
                    ],
                    "internal error\n".to_string(),
                ),
            }
        }
    })
}

/// What the side port holds at once and how long a client may take.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Connection slots (cap, handshake timeout, gauges).
    pub slots: crate::tls::Slots,
    /// Time a client gets to send a request's headers (HTTP/1.1).
    pub header_read_timeout: Duration,
    /// Longest a connection stays open; then it is closed gracefully.
    pub max_connection_age: Duration,
}

/// Streams one HTTP/2 client may open at once on the side port.
const MAX_STREAMS: u32 = 32;

/// Serves the side port until `stop` turns true.
///
/// Every connection holds one of the listener's slots (at the cap, accepting
/// pauses); a client that is slow to handshake, to send its headers, or that
/// stays connected past the maximum age is disconnected; a failing `accept()`
/// backs off instead of spinning.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    daemon: Arc<Daemon>,
    limits: HttpLimits,
    mut stop: watch::Receiver<bool>,
) {
    let app = router(daemon, tls.clone());
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_pending_accept_reset_streams(Some(MAX_STREAMS as usize));
    let builder = Arc::new(builder);
    let mut backoff = crate::tls::incoming::initial_backoff();
    loop {
        let slot = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            slot = limits.slots.take() => match slot {
                Some(slot) => slot,
                None => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            accepted = limits.slots.accept(&listener, &mut backoff) => accepted,
        };
        let acceptor = TlsAcceptor::from(tls.https_config());
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let handshake_timeout = limits.slots.limits().handshake_timeout;
        let max_age = limits.max_connection_age;
        tokio::spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                _ => {
                    tracing::debug!(%peer, "HTTPS handshake failed");
                    return;
                }
            };
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = tokio::time::sleep(max_age) => {
                    // Past its age: finish the request in progress, then close
                    // (bounded by the header-read timeout).
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(handshake_timeout, conn.as_mut()).await {
                        Ok(r) => r,
                        Err(_) => Ok(()),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTPS connection ended");
            }
        });
    }
}

/// `GET /readyz`: 200 `ready` while every component answers the readiness
/// probe, else 503 naming the component and the cause.
async fn readyz(d: Arc<Daemon>) -> (http::StatusCode, [(http::HeaderName, &'static str); 2], String) {
    let headers = [
        (http::header::CACHE_CONTROL, "no-store"),
        (http::header::CONTENT_TYPE, "text/plain"),
    ];
    match d.health.readiness() {
        crate::health::Readiness::Ready => (http::StatusCode::OK, headers, "ready\n".into()),
        crate::health::Readiness::NotReady { component, reason } => (
            http::StatusCode::SERVICE_UNAVAILABLE,
            headers,
            format!("not ready: {component}: {reason}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::none_match;

    #[test]
    fn if_none_match() {
        let tag = "\"abc\"";
        assert!(none_match("\"abc\"", tag));
        assert!(none_match("\"x\", \"abc\"", tag));
        assert!(none_match("W/\"abc\"", tag));
        assert!(none_match("*", tag));
        assert!(!none_match("\"abd\"", tag));
        assert!(!none_match("abc", tag));
    }
}
