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

/// Established connections buffered before the server picks them up.
const READY_BACKLOG: usize = 128;

/// First pause after a failed `accept()` (e.g. out of file descriptors);
/// it doubles while accepting keeps failing, up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause after failed `accept()`s.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long a listener stays quiet about its cap after saying it is at it.
const CAP_LOG_EVERY: Duration = Duration::from_secs(60);

/// What one listener holds at once, and for how long a peer may handshake.
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    /// The listener's name in logs and metrics (`grpc`, `https`).
    pub name: &'static str,
    /// Connections held at once, handshaking or open.
    pub max_connections: usize,
    /// Time a peer gets to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Connections held now (the `keyward_connections{listener}` gauge).
    pub open: prometheus::IntGauge,
    /// Failed `accept()` calls (`keyward_accept_errors_total{listener}`).
    pub accept_errors: prometheus::IntCounter,
}

impl ListenerLimits {
    /// Limits whose gauge and counter are not registered anywhere (a bench
    /// server, tests).
    pub fn standalone(
        name: &'static str,
        max_connections: usize,
        handshake_timeout: Duration,
    ) -> Result<ListenerLimits, prometheus::Error> {
        Ok(ListenerLimits {
            name,
            max_connections,
            handshake_timeout,
            open: prometheus::IntGauge::new("connections", "connections held")?,
            accept_errors: prometheus::IntCounter::new("accept_errors_total", "failed accept() calls")?,
        })
    }
}

/// A listener's connection slots: taking one pauses at the cap; each slot
/// is held by its connection until it closes, however it closes.
#[derive(Debug, Clone)]
pub struct Slots {
    limits: ListenerLimits,
    permits: Arc<Semaphore>,
    last_cap_log: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// One held connection slot.
#[derive(Debug)]
pub struct Slot {
    open: prometheus::IntGauge,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Slots {
    /// Slots for a listener with these limits.
    pub fn new(limits: ListenerLimits) -> Slots {
        Slots {
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            last_cap_log: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// The listener's limits.
    pub fn limits(&self) -> &ListenerLimits {
        &self.limits
    }

    /// A free slot, waiting (and saying so, once a minute at most) while the
    /// listener is at its cap. `None` only if the slots were closed.
    pub async fn take(&self) -> Option<Slot> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return None,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                self.log_at_cap();
                self.permits.clone().acquire_owned().await.ok()?
            }
        };
        self.limits.open.inc();
        Some(Slot {
            open: self.limits.open.clone(),
            _permit: permit,
        })
    }

    fn log_at_cap(&self) {
        let now = std::time::Instant::now();
        let Ok(mut last) = self.last_cap_log.lock() else {
            return;
        };
        if last.is_none_or(|t| now.duration_since(t) >= CAP_LOG_EVERY) {
            *last = Some(now);
            tracing::warn!(
                listener = self.limits.name,
                max_connections = self.limits.max_connections,
                "listener at its connection cap: not accepting until a connection closes"
            );
        }
    }

    /// Accepts one socket, backing off while `accept()` fails (out of file
    /// descriptors, say) instead of spinning on the error.
    pub async fn accept(&self, listener: &TcpListener, backoff: &mut Duration) -> (TcpStream, SocketAddr) {
        loop {
            match listener.accept().await {
                Ok(pair) => {
                    *backoff = ACCEPT_BACKOFF_MIN;
                    return pair;
                }
                Err(e) => {
                    self.limits.accept_errors.inc();
                    tracing::warn!(listener = self.limits.name, error = %e, pause_ms = backoff.as_millis() as u64, "accept failed");
                    tokio::time::sleep(*backoff).await;
                    *backoff = (*backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
    }
}

/// The first pause after a failed `accept()`.
pub fn initial_backoff() -> Duration {
    ACCEPT_BACKOFF_MIN
}

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
    _slot: Slot,
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
/// to new connections), under the listener's handshake timeout. Each
/// connection holds one of the listener's [`Slots`] from accept to close. Failed handshakes are
/// logged at debug level, counted in [`ServerTls::handshake_failures`] and
/// not yielded. `accept()` errors are logged and retried after a short pause,
/// so the stream only ends when it is dropped. Dropping the stream stops
/// accepting and closes the listener.
///
/// Must be called within a Tokio runtime (it spawns the accept task).
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    slots: Slots,
) -> impl Stream<Item = Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(READY_BACKLOG);
    tokio::spawn(accept_loop(listener, tls, slots, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    slots: Slots,
    tx: mpsc::Sender<Result<TlsConn, io::Error>>,
) {
    let mut backoff = initial_backoff();
    loop {
        // A slot first: at the cap the listener stops accepting, so what a
        // flood of sockets can hold is bounded by the cap, not by the
        // process's file-descriptor limit.
        let slot = tokio::select! {
            _ = tx.closed() => return,
            slot = slots.take() => match slot {
                Some(slot) => slot,
                None => return,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = tx.closed() => return,
            accepted = slots.accept(&listener, &mut backoff) => accepted,
        };
        let acceptor = TlsAcceptor::from(tls.grpc_config());
        let tls = tls.clone();
        let tx = tx.clone();
        let timeout = slots.limits().handshake_timeout;
        tokio::spawn(async move {
            if let Some(conn) = handshake(acceptor, tcp, peer, &tls, timeout, slot).await {
                // The receiver is gone only when the server stopped.
                let _ = tx.send(Ok(conn)).await;
            }
        });
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: &ServerTls,
    timeout: Duration,
    slot: Slot,
) -> Option<TlsConn> {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
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
            _slot: slot,
        }),
        Err(e) => {
            tls.record_handshake_failure();
            tracing::debug!(%peer, error = %e, "client certificate carries no identity; dropping");
            None
        }
    }
}
