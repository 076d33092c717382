//! The HTTPS side port (server TLS, no client certificate): `/metrics` for
//! Prometheus and `/healthz`. Later: the public JWKS.

use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::api::Daemon;
use crate::tls::ServerTls;

fn router(daemon: Arc<Daemon>, tls: Arc<ServerTls>) -> Router {
    Router::new()
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
                    (
                        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        d.metrics.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
}

/// Serves the side port until `stop` turns true.
pub async fn serve(listener: TcpListener, tls: Arc<ServerTls>, daemon: Arc<Daemon>, mut stop: watch::Receiver<bool>) {
    let app = router(daemon, tls.clone());
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "HTTPS accept failed");
                continue;
            }
        };
        let acceptor = TlsAcceptor::from(tls.https_config());
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                _ => {
                    tracing::debug!(%peer, "HTTPS handshake failed");
                    return;
                }
            };
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(%peer, error = %e, "HTTPS connection ended");
            }
        });
    }
}
