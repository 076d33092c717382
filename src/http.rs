//! The HTTPS side port (server TLS, no client certificate): `/healthz`,
//! `/readyz`, the public issuer key set at `/.well-known/jwks.json` and
//! the issuer key history at `/.well-known/keyward/issuer-key-history.json`
//! (both `Cache-Control: public, max-age=N`, strong ETag, `304` on a matching
//! `If-None-Match`). And the metrics listener: `/metrics` for Prometheus, in
//! plain HTTP on an address of its own (`server.metrics_listen`, loopback by
//! default), never on the public side port.

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
    public_document(daemon.jwks.document(), "application/jwk-set+json", &headers)
}

/// `GET` [`crate::jwks::history::HISTORY_PATH`]: every issuer public key with its lifecycle
/// times, as last loaded with the ring (same caching rules as the JWKS).
async fn issuer_history(daemon: Arc<Daemon>, headers: http::HeaderMap) -> axum::response::Response {
    public_document(
        crate::jwks::JwksDocument::clone(&daemon.jwks.history_document()),
        "application/json",
        &headers,
    )
}

/// A public document with `Cache-Control`, a strong ETag and `304` on a matching `If-None-Match`.
fn public_document(
    doc: crate::jwks::JwksDocument,
    content_type: &str,
    headers: &http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
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
            (http::header::CONTENT_TYPE, content_type.to_string()),
            (http::header::ETAG, doc.etag),
            (http::header::CACHE_CONTROL, cache),
        ],
        doc.body,
    )
        .into_response()
}

fn router(daemon: Arc<Daemon>) -> Router {
    let account_daemon = daemon.clone();
    let jwks_daemon = daemon.clone();
    let history_daemon = daemon.clone();
    let ready_daemon = daemon;
    Router::new()
        .route(
            JWKS_PATH,
            get(move |headers: http::HeaderMap| jwks(jwks_daemon.clone(), headers)),
        )
        .route(
            crate::jwks::history::HISTORY_PATH,
            get(move |headers: http::HeaderMap| issuer_history(history_daemon.clone(), headers)),
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

/// The metrics listener's one route.
fn metrics_router(daemon: Arc<Daemon>, tls: Arc<ServerTls>) -> Router {
    Router::new().route(
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
                d.metrics.set_audit_and_issuer(&audit_and_issuer(&d).await);
                (
                    [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    d.metrics.render(),
                )
            }
        }),
    )
}

/// The audit log's and the issuer's state for the metrics: the queue and
/// committed head of this replica's appender, its last checkpoint, and when
/// each algorithm's active issuer key became active (from the store, so a
/// rotation by another replica shows too; a store that fails leaves the
/// issuer series as they were).
async fn audit_and_issuer(d: &Daemon) -> crate::metrics::AuditIssuerSample {
    let issuer_activated = match d.jwks.list().await {
        Ok(keys) => keys
            .into_iter()
            .filter(|k| k.state == crate::store::IssuerKeyState::Active)
            .filter_map(|k| Some((k.alg, k.activated_at?)))
            .collect(),
        Err(_) => Vec::new(),
    };
    crate::metrics::AuditIssuerSample {
        audit_queue: d.audit.backlog(),
        audit_committed: *d.audit.committed().borrow(),
        last_checkpoint: d.audit.last_checkpoint(),
        issuer_activated,
        issuer_rotation: d.jwks.settings().rotation,
    }
}

/// Connections the metrics listener serves at once; more are closed at once.
const METRICS_CONNECTIONS: usize = 16;
/// The longest a metrics connection stays open.
const METRICS_CONNECTION_TIME: Duration = Duration::from_secs(30);

/// Binds the metrics listener of `server.metrics_listen` (`None` when it is
/// `"off"`); warns when the address is not loopback (plain HTTP).
pub async fn bind_metrics(at: crate::config::MetricsListen) -> std::io::Result<Option<TcpListener>> {
    let crate::config::MetricsListen::At(addr) = at else {
        return Ok(None);
    };
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "metrics are served in plain HTTP on a non-loopback address");
    }
    TcpListener::bind(addr).await.map(Some)
}

/// Serves `/metrics` (plain HTTP, every other path 404) until `stop` turns
/// true: at most [`METRICS_CONNECTIONS`] connections, each for at most
/// [`METRICS_CONNECTION_TIME`].
pub async fn serve_metrics(
    listener: Arc<TcpListener>,
    tls: Arc<ServerTls>,
    daemon: Arc<Daemon>,
    mut stop: watch::Receiver<bool>,
) {
    let app = metrics_router(daemon, tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    while let Some((tcp, peer)) = next_connection(&listener, &mut stop, "metrics").await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics connection refused: too many open");
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let served = builder.serve_connection(TokioIo::new(tcp), service);
            match tokio::time::timeout(METRICS_CONNECTION_TIME, served).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics connection ended"),
                Err(_) => tracing::debug!(%peer, "metrics connection closed: open too long"),
            }
        });
    }
}

/// The next connection `listener` accepts, or `None` once `stop` turns
/// true; a failed accept is logged (`what` names the listener) and followed
/// by a pause that doubles while accepting keeps failing (out of file
/// descriptors, say), instead of a spin.
async fn next_connection(
    listener: &TcpListener,
    stop: &mut watch::Receiver<bool>,
    what: &'static str,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    let mut backoff = crate::tls::incoming::initial_backoff();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return None,
            a = listener.accept() => a,
        };
        match accepted {
            Ok(v) => return Some(v),
            Err(e) => {
                tracing::debug!(error = %e, listener = what, "accept failed");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return None,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
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
    let app = router(daemon);
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
    if *d.stopping.borrow() {
        return (
            http::StatusCode::SERVICE_UNAVAILABLE,
            headers,
            "not ready: shutting down\n".into(),
        );
    }
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
