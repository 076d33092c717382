//! Accept TCP connections and run mutual-TLS handshakes concurrently,
//! producing a connection stream for `tonic`'s `serve_with_incoming*`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;

use super::identity::identity_with;
use super::server::ServerTls;

/// Maximum time a peer gets to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes allowed in flight at once; accepting pauses beyond this.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// Established connections buffered before the server picks them up.
const READY_BACKLOG: usize = 128;

/// Pause after a failed `accept()` (e.g. out of file descriptors).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Connection facts exposed to handlers as a request extension:
/// `request.extensions().get::<ConnInfo>()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// Identity of the verified client certificate (see
    /// [`identity_with`]).
    pub identity: String,
    /// The peer's TCP address, if known.
    pub remote_addr: Option<SocketAddr>,
}

/// An established, client-authenticated TLS connection.
#[derive(Debug)]
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    info: ConnInfo,
}

impl TlsConn {
    /// The connection's identity and peer address.
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

/// Turn a listener into a stream of authenticated TLS connections.
///
/// Each accepted socket gets its own task that performs the handshake with
/// the gRPC config current at accept time (so [`ServerTls::reload`] applies
/// to new connections), under [`HANDSHAKE_TIMEOUT`]. Failed handshakes are
/// logged at debug level, counted in [`ServerTls::handshake_failures`] and
/// not yielded. `accept()` errors are logged and retried after a short pause,
/// so the stream only ends when it is dropped. Dropping the stream stops
/// accepting and closes the listener.
///
/// Must be called within a Tokio runtime (it spawns the accept task).
pub fn incoming(listener: TcpListener, tls: Arc<ServerTls>) -> impl Stream<Item = Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(READY_BACKLOG);
    tokio::spawn(accept_loop(listener, tls, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(listener: TcpListener, tls: Arc<ServerTls>, tx: mpsc::Sender<Result<TlsConn, io::Error>>) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            _ = tx.closed() => return,
            permit = pending.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let acceptor = TlsAcceptor::from(tls.grpc_config());
        let tls = tls.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let conn = handshake(acceptor, tcp, peer, &tls).await;
            drop(permit);
            if let Some(conn) = conn {
                // The receiver is gone only when the server stopped.
                let _ = tx.send(Ok(conn)).await;
            }
        });
    }
}

async fn handshake(acceptor: TlsAcceptor, tcp: TcpStream, peer: SocketAddr, tls: &ServerTls) -> Option<TlsConn> {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tls.record_handshake_failure();
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            tls.record_handshake_failure();
            tracing::debug!(%peer, "TLS handshake timed out");
            return None;
        }
    };
    let identity = {
        let (_, session) = stream.get_ref();
        match session.peer_certificates().and_then(|c| c.first()) {
            Some(leaf) => identity_with(leaf.as_ref(), tls.identity_rules()),
            None => Err(super::error::TlsError::NoIdentity),
        }
    };
    match identity {
        Ok(identity) => Some(TlsConn {
            inner: stream,
            info: ConnInfo {
                identity,
                remote_addr: Some(peer),
            },
        }),
        Err(e) => {
            tls.record_handshake_failure();
            tracing::debug!(%peer, error = %e, "client certificate carries no identity; dropping");
            None
        }
    }
}
