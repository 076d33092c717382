//! The daemon as a value: `start` builds it from config, `serve` runs it on
//! listeners it is given until the shutdown future resolves, then finishes
//! in-flight requests and destroys every unwrapped key.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::Server;

use crate::api::pb::account_service_server::AccountServiceServer;
use crate::api::pb::jwks_service_server::JwksServiceServer;
use crate::api::pb::session_service_server::SessionServiceServer;
use crate::api::pb::signing_service_server::SigningServiceServer;
use crate::api::{AccountApi, Daemon, JwksApi, SessionApi, SigningApi};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, ConfigError};
use crate::hsm::{Hsm, HsmError};
use crate::keys::KeyService;
use crate::metrics::Metrics;
use crate::session::{Domain, SessionSettings, Sessions};
use crate::store::StoreError;
use crate::tls::{ServerTls, TlsError, TlsPaths};

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HSM could not be opened.
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Certificates could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The token has no key-encryption key yet.
    #[error("the token has no key-encryption key: run `keyward init` first")]
    NoKek,
    /// A listener failed.
    #[error("{what}: {source}")]
    Io {
        /// Which listener.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// gRPC server failure.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Metrics registry failure.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The issuer key ring could not be loaded.
    #[error("issuer keys: {0}")]
    Issuer(String),
    /// The policy set does not load.
    #[error("{0}")]
    Policy(#[from] crate::policy::PolicyError),
    /// A background task failed.
    #[error("internal: {0}")]
    Internal(&'static str),
}

/// A daemon ready to serve.
#[derive(Debug, Clone)]
pub struct Running {
    /// Shared handler state.
    pub daemon: Arc<Daemon>,
    /// Reloadable certificates.
    pub tls: Arc<ServerTls>,
    /// Largest gRPC message.
    pub max_message_bytes: usize,
    /// Streams per connection.
    pub max_concurrent_streams: u32,
    /// Requests worked on at once.
    pub max_requests_in_flight: usize,
    /// Connection limits and timeouts of both listeners.
    pub net: NetSettings,
    /// The metrics listener ([`bind_metrics`]); none until the caller binds it.
    pub metrics_listener: Option<Arc<TcpListener>>,
    /// How often the certificate files are checked for changes (zero: never).
    pub tls_watch: std::time::Duration,
}

/// Connection limits and timeouts of both listeners (`[server]`).
#[derive(Debug, Clone, Copy)]
pub struct NetSettings {
    /// gRPC connections held at once.
    pub max_connections: usize,
    /// HTTPS connections held at once.
    pub https_max_connections: usize,
    /// Time a peer gets to finish the TLS handshake.
    pub handshake_timeout: std::time::Duration,
    /// Time an HTTPS client gets to send a request's headers.
    pub header_read_timeout: std::time::Duration,
    /// Longest an HTTPS connection stays open.
    pub https_max_connection_age: std::time::Duration,
    /// HTTP/2 keepalive ping interval on gRPC connections (`None`: off).
    pub keepalive_interval: Option<std::time::Duration>,
    /// How long a keepalive ping may go unanswered.
    pub keepalive_timeout: std::time::Duration,
    /// How long graceful shutdown waits for connections, then for requests.
    pub shutdown_grace: std::time::Duration,
    /// How long a stopping replica refuses new requests (UNAVAILABLE) before it closes.
    pub drain: std::time::Duration,
}

impl NetSettings {
    fn from_config(server: &crate::config::ServerConfig) -> NetSettings {
        let secs = std::time::Duration::from_secs;
        NetSettings {
            max_connections: server.max_connections,
            https_max_connections: server.https_max_connections,
            handshake_timeout: secs(server.handshake_timeout_seconds),
            header_read_timeout: secs(server.header_read_timeout_seconds),
            https_max_connection_age: secs(server.https_max_connection_age_seconds),
            keepalive_interval: (server.http2_keepalive_interval_seconds > 0)
                .then(|| secs(server.http2_keepalive_interval_seconds)),
            keepalive_timeout: secs(server.http2_keepalive_timeout_seconds),
            shutdown_grace: secs(server.shutdown_grace_seconds),
            drain: secs(server.drain_seconds),
        }
    }

    /// The slots of a listener, counted in the daemon's metrics.
    pub fn slots(&self, metrics: &Metrics, name: &'static str, max_connections: usize) -> crate::tls::Slots {
        let (open, accept_errors) = metrics.listener(name);
        crate::tls::Slots::new(crate::tls::ListenerLimits {
            name,
            max_connections,
            handshake_timeout: self.handshake_timeout,
            open,
            accept_errors,
        })
    }
}

/// Opens the HSM (PIN from its configured source) with blocking calls.
pub async fn open_hsm(config: &Config) -> Result<Hsm, ServeError> {
    let hsm_config = config.hsm_config()?;
    let hsm = tokio::task::spawn_blocking(move || Hsm::open(&hsm_config))
        .await
        .map_err(|_| ServeError::Internal("HSM open task failed"))??;
    hsm.set_acquire_timeout(std::time::Duration::from_millis(config.hsm.acquire_timeout_ms));
    Ok(hsm)
}

/// Creates what the token must hold (`keyward init`, and `dev` on first run):
/// the key-encryption key. Idempotent. Issuer keys are made by the daemon's
/// key lifecycle at start, wrapped under this KEK and kept in the store.
pub async fn init_token(hsm: Hsm) -> Result<u32, ServeError> {
    tokio::task::spawn_blocking(move || -> Result<u32, ServeError> {
        let kek = hsm.ensure_kek()?;
        Ok(kek)
    })
    .await
    .map_err(|_| ServeError::Internal("token initialisation task failed"))?
}

/// Builds the daemon from config: HSM, KEK check, store, certificates.
pub async fn start(config: &Config) -> Result<Running, ServeError> {
    start_with_clock(config, Arc::new(SystemClock)).await
}

/// As `start`, with a clock of the caller's (tests drive time with it).
pub async fn start_with_clock(config: &Config, clock: Arc<dyn Clock>) -> Result<Running, ServeError> {
    let tls = ServerTls::load_with(
        TlsPaths {
            cert: config.tls.cert.clone(),
            key: config.tls.key.clone(),
            client_ca: config.tls.client_ca.clone(),
        },
        crate::tls::TlsOptions {
            identity: crate::tls::IdentityRules {
                fallback: config.tls.identity_fallback.clone(),
            },
            crls: config.tls.crls.clone(),
        },
    )?;
    let hsm = open_hsm(config).await?;
    if hsm.kek_version() == 0 {
        return Err(ServeError::NoKek);
    }
    let store = crate::store::open(&config.store.url).await?;
    let jwks = Arc::new(
        crate::jwks::KeyLifecycle::start(
            store.clone(),
            hsm.clone(),
            clock.clone(),
            crate::jwks::JwksSettings::from_config(&config.jwks),
        )
        .await
        .map_err(|e| ServeError::Issuer(e.to_string()))?,
    );
    let issuer = jwks.issuer().clone();
    let audit = Arc::new(crate::audit::Appender::start(
        store.clone(),
        crate::audit::AppenderSettings {
            max_batch: config.audit.group_commit_max_batch,
            wait: std::time::Duration::from_micros(config.audit.group_commit_wait_micros),
            ..Default::default()
        },
        Some(Arc::new(crate::audit::checkpoint::Checkpointer::new(
            store.clone(),
            issuer.clone(),
            clock.clone(),
            config.audit.checkpoint_every_events,
            std::time::Duration::from_secs(config.audit.checkpoint_every_seconds),
        ))),
    ));
    let metrics = Arc::new(Metrics::new()?);
    metrics.register(Box::new(store.tx_stats().begin_wait.clone()))?;
    metrics.register(Box::new(store.tx_stats().begin_failures.clone()))?;
    if let Some(s) = audit.stats() {
        metrics.register(Box::new(s.group_events.clone()))?;
        metrics.register(Box::new(s.commit_seconds.clone()))?;
    }
    // Refuses to start on a set that does not parse or validate.
    let policy = Arc::new(
        crate::policy::DecisionPoint::load(&config.policy.dir, &metrics, clock.clone())?
            .with_watch_interval(config.policy.watch_seconds)
            // Every account the key cache holds keeps its decisions (two
            // each: an account signs more than one kind of request, and
            // accounts come and go): at 100,000 accounts signing round robin
            // a smaller map would be emptied before any decision in it was
            // asked for again.
            .with_kept_decisions(
                config
                    .keys
                    .cache_capacity
                    .saturating_mul(2)
                    .max(crate::policy::KEPT_DECISIONS),
            )
            .with_store(store.clone()),
    );
    let verifying_contract = match &config.sessions.verifying_contract {
        Some(c) => Some(crate::crypto::eth::Address::parse(c).map_err(|_| {
            ServeError::Config(ConfigError::Invalid {
                key: "sessions.verifying_contract",
                reason: "must be a 0x address".into(),
            })
        })?),
        None => None,
    };
    let secs = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let clock_for_health = clock.clone();
    let sessions = Arc::new(Sessions::new(
        store.clone(),
        issuer,
        clock,
        SessionSettings {
            domain: Domain {
                chain_id: config.sessions.chain_id,
                verifying_contract,
            },
            challenge_ttl: secs(config.sessions.challenge_ttl_seconds),
            max_ttl: secs(config.sessions.max_ttl_seconds),
            clock_skew: secs(config.sessions.clock_skew_seconds),
            pending_spend_timeout: secs(config.sessions.pending_spend_timeout_seconds),
            retention: config.sessions.retention_seconds(),
        },
    ));
    let health = Arc::new(crate::health::Health::new(
        store.clone(),
        crate::health::Components {
            hsm: Some(hsm.clone()),
            audit: Some(audit.clone()),
            issuer: Some((jwks.issuer().clone(), jwks.settings().algorithms.clone())),
        },
        clock_for_health,
        &metrics,
        crate::health::HealthSettings::default(),
    )?);
    // Serving starts with a known answer.
    health.probe().await;
    let keys = KeyService::new(
        hsm,
        store,
        config.keys.custody,
        config.keys.cache_capacity,
        metrics.clone(),
    );
    let daemon = Arc::new(Daemon {
        keys,
        policy,
        metrics,
        log_details: config.log.log_request_details,
        controller_change_delay: i64::try_from(config.accounts.controller_change_delay_seconds).unwrap_or(i64::MAX),
        sessions,
        jwks,
        audit,
        health,
        in_flight: Arc::new(tokio::sync::Semaphore::new(config.server.max_requests_in_flight)),
        per_identity: Arc::new(crate::api::PerIdentity::new(config.server.max_requests_per_identity)),
        stopping: tokio::sync::watch::channel(false).0,
        refusing: std::sync::atomic::AtomicBool::new(false),
    });
    Ok(Running {
        daemon,
        tls,
        max_message_bytes: config.server.max_message_bytes,
        max_concurrent_streams: config.server.max_concurrent_streams,
        max_requests_in_flight: config.server.max_requests_in_flight,
        net: NetSettings::from_config(&config.server),
        metrics_listener: None,
        tls_watch: std::time::Duration::from_secs(config.tls.watch_seconds),
    })
}

/// Binds both listeners of a config.
pub async fn bind(config: &Config) -> Result<(TcpListener, TcpListener), ServeError> {
    let grpc = TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| ServeError::Io {
            what: "gRPC listener",
            source,
        })?;
    let https = TcpListener::bind(config.server.https_listen)
        .await
        .map_err(|source| ServeError::Io {
            what: "HTTPS listener",
            source,
        })?;
    Ok((grpc, https))
}

/// Binds the metrics listener of a config (`server.metrics_listen`), for
/// [`Running::metrics_listener`]; `None` when it is `"off"`.
pub async fn bind_metrics(config: &Config) -> Result<Option<Arc<TcpListener>>, ServeError> {
    let listener = crate::http::bind_metrics(config.server.metrics_listen)
        .await
        .map_err(|source| ServeError::Io {
            what: "metrics listener",
            source,
        })?;
    Ok(listener.map(Arc::new))
}

/// Serves `/metrics` on the bound metrics listener, if any, until `stop`.
fn serve_metrics(running: &Running, stop: tokio::sync::watch::Receiver<bool>) -> Option<tokio::task::JoinHandle<()>> {
    let listener = running.metrics_listener.clone()?;
    let (tls, daemon) = (running.tls.clone(), running.daemon.clone());
    Some(tokio::spawn(crate::http::serve_metrics(listener, tls, daemon, stop)))
}

/// Addresses a serving daemon listens on.
#[derive(Debug, Clone, Copy)]
pub struct Endpoints {
    /// gRPC over mutual TLS.
    pub grpc: SocketAddr,
    /// HTTPS side port.
    pub https: SocketAddr,
    /// Plain-HTTP metrics listener, if any.
    pub metrics: Option<SocketAddr>,
}

/// Serves until `shutdown` resolves, then drains in-flight requests, writes
/// a final audit checkpoint and destroys cached keys.
pub async fn serve<S>(running: Running, grpc: TcpListener, https: TcpListener, shutdown: S) -> Result<(), ServeError>
where
    S: Future<Output = ()> + Send + 'static,
{
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&health_reporter, d_ready(&running)).await;

    let d = running.daemon.clone();
    let max = running.max_message_bytes;
    let net = running.net;
    let grpc_server = Server::builder()
        .max_concurrent_streams(running.max_concurrent_streams)
        .http2_keepalive_interval(net.keepalive_interval)
        .http2_keepalive_timeout(Some(net.keepalive_timeout))
        // Bounds the HTTP/2 "rapid reset" pattern: streams opened and reset
        // before the server accepted them.
        .http2_max_pending_accept_reset_streams(Some(64))
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(AccountServiceServer::new(AccountApi(d.clone())).max_decoding_message_size(max))
        .add_service(SigningServiceServer::new(SigningApi(d.clone())).max_decoding_message_size(max))
        .add_service(SessionServiceServer::new(SessionApi(d.clone())).max_decoding_message_size(max))
        .add_service(JwksServiceServer::new(JwksApi(d.clone())).max_decoding_message_size(max))
        .add_service(
            crate::api::pb::audit_service_server::AuditServiceServer::new(crate::api::AuditApi(d.clone()))
                .max_decoding_message_size(max),
        );

    let mut grpc_stop = stop_rx.clone();
    let grpc_task = tokio::spawn(grpc_server.serve_with_incoming_shutdown(
        crate::tls::incoming(
            grpc,
            running.tls.clone(),
            net.slots(&d.metrics, "grpc", net.max_connections),
        ),
        async move {
            let _ = grpc_stop.wait_for(|s| *s).await;
        },
    ));
    let jwks_task = tokio::spawn(d.jwks.clone().run(stop_rx.clone()));
    let policy_task = tokio::spawn(d.policy.clone().watch(stop_rx.clone()));
    let tls_task = tokio::spawn(running.tls.clone().watch(running.tls_watch, stop_rx.clone()));
    let kek_task = tokio::spawn(count_keys_per_kek(d.clone(), stop_rx.clone()));
    let changes_task = tokio::spawn(follow_account_changes(d.clone(), stop_rx.clone()));
    let controller_task = tokio::spawn(apply_controller_changes(d.clone(), stop_rx.clone()));
    let prune_task = tokio::spawn(
        d.policy
            .clone()
            .prune(std::time::Duration::from_secs(3600), stop_rx.clone()),
    );
    let health_task = tokio::spawn(d.health.clone().run(stop_rx.clone()));
    let reporter_task = tokio::spawn(report_health(
        d.health.subscribe(),
        d.stopping.subscribe(),
        health_reporter,
        stop_rx.clone(),
    ));
    let sweep_every = std::time::Duration::from_secs(
        u64::try_from(d.sessions.settings().pending_spend_timeout / 4)
            .unwrap_or(1)
            .max(1),
    );
    let sweep_task = tokio::spawn(d.sessions.clone().sweep(sweep_every, stop_rx.clone()));
    let metrics_task = serve_metrics(&running, stop_rx.clone());
    let https_task = tokio::spawn(crate::http::serve(
        https,
        running.tls.clone(),
        d.clone(),
        crate::http::HttpLimits {
            slots: net.slots(&d.metrics, "https", net.https_max_connections),
            header_read_timeout: net.header_read_timeout,
            max_connection_age: net.https_max_connection_age,
        },
        stop_rx,
    ));

    shutdown.await;
    // Not ready from here on: health says NOT_SERVING, followers of
    // StreamEvents end. For `drain`, connections stay open and new requests
    // are answered UNAVAILABLE (see `Daemon::handle`), so that what reaches
    // this replica is refused cleanly and retried elsewhere; requests it
    // already runs finish.
    d.stopping.send_replace(true);
    if !net.drain.is_zero() {
        d.refusing.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            drain_seconds = net.drain.as_secs(),
            "shutting down: not ready, refusing new requests while clients move away"
        );
        tokio::time::sleep(net.drain).await;
    }
    tracing::info!("shutting down: finishing in-flight requests");
    let _ = stop_tx.send(true);
    // Connections get the grace period to finish (GOAWAY sent, new streams
    // refused); a follower of StreamEvents or a client that never finishes
    // its request would hold them open for ever, so then they are closed.
    let deadline = tokio::time::Instant::now() + net.shutdown_grace;
    let mut grpc_task = grpc_task;
    let grpc_result = match tokio::time::timeout_at(deadline, &mut grpc_task).await {
        Ok(joined) => joined.map_err(|_| ServeError::Internal("gRPC task failed"))?,
        Err(_) => {
            tracing::warn!(
                grace_seconds = net.shutdown_grace.as_secs(),
                "connections still open at the end of the shutdown grace: closing them"
            );
            grpc_task.abort();
            let _ = grpc_task.await;
            Ok(())
        }
    };
    let _ = https_task.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    let _ = jwks_task.await;
    let _ = policy_task.await;
    let _ = tls_task.await;
    let _ = prune_task.await;
    let _ = kek_task.await;
    let _ = changes_task.await;
    let _ = controller_task.await;
    // Requests whose clients left still run to their end: wait for them
    // (bounded) before the audit log is closed under them.
    let all = u32::try_from(running.max_requests_in_flight).unwrap_or(u32::MAX);
    let drain_until = deadline.max(tokio::time::Instant::now() + std::time::Duration::from_secs(1));
    match tokio::time::timeout_at(drain_until, d.in_flight.acquire_many(all)).await {
        Ok(Ok(permits)) => drop(permits),
        Ok(Err(_)) => {}
        Err(_) => tracing::warn!(
            in_flight = d.metrics.in_flight().get(),
            "requests still running at shutdown after the drain deadline"
        ),
    }
    let _ = health_task.await;
    let _ = reporter_task.await;
    let _ = sweep_task.await;
    // Nothing appends any more: write what is queued, then a final
    // checkpoint over the events since the last one.
    match d.audit.finish().await {
        Ok(Some(cp)) => tracing::info!(
            first_seq = cp.first_seq,
            last_seq = cp.last_seq,
            "final audit checkpoint"
        ),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "final audit checkpoint failed"),
    }
    d.keys.clear_cache();
    d.jwks.issuer().release_keys();
    // The keys were handed to the reaper thread: wait until they are gone.
    let _ = tokio::task::spawn_blocking(crate::hsm::flush_key_destroys).await;
    tracing::info!("stopped");
    grpc_result.map_err(ServeError::from)
}

fn d_ready(running: &Running) -> bool {
    running.daemon.health.readiness().is_ready()
}

/// Sets the gRPC health status of the whole server (`""`) and of each service.
async fn set_health(reporter: &tonic_health::server::HealthReporter, ready: bool) {
    use tonic_health::ServingStatus;
    let status = if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(
            <AccountServiceServer<AccountApi> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    reporter
        .set_service_status(
            <SigningServiceServer<SigningApi> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    reporter
        .set_service_status(
            <SessionServiceServer<SessionApi> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

/// Mirrors readiness into the gRPC health service until `stop` turns true.
async fn report_health(
    mut readiness: tokio::sync::watch::Receiver<crate::health::Readiness>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    reporter: tonic_health::server::HealthReporter,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let ready = readiness.borrow_and_update().is_ready() && !*stopping.borrow_and_update();
        set_health(&reporter, ready).await;
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            changed = readiness.changed() => if changed.is_err() { return },
            changed = stopping.changed() => if changed.is_err() { return },
        }
    }
}

/// Keeps `keyward_account_keys{kek_version}` current: the store's counts, now and every minute.
/// How often a replica reads the account change feed.
pub const ACCOUNT_CHANGES_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
/// How far back each read looks (wall-clock seconds): a change whose transaction commits this
/// much later than it was stamped is still seen.
const ACCOUNT_CHANGES_WINDOW: i64 = 30;

/// Drops from this replica's cache every account another replica (or this one) changed: a
/// freeze, a new label or new grants reach every replica's next request within
/// [`ACCOUNT_CHANGES_EVERY`] (plus the store's round trip). Each change is applied once.
async fn follow_account_changes(d: Arc<Daemon>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut seen: std::collections::BTreeMap<i64, i64> = std::collections::BTreeMap::new();
    let mut first = true;
    // The last read that answered: after the store was away, read back from there (the
    // changes made meanwhile are older than the window by then).
    let mut last_ok: Option<i64> = None;
    let mut pruned_at = 0i64;
    loop {
        let now = crate::clock::unix_now();
        // Once an hour: the feed's rows older than a day go (replicas read its last seconds).
        if now - pruned_at >= 3600 {
            pruned_at = now;
            if let Err(e) = d.keys.store().prune_account_changes(now - 86_400).await {
                tracing::debug!(error = %e, "pruning the account change feed failed");
            }
        }
        let since = last_ok.unwrap_or(now).min(now) - ACCOUNT_CHANGES_WINDOW;
        match d.keys.store().account_changes_since(since).await {
            Ok(changes) => {
                for (seq, account) in changes {
                    if seen.insert(seq, now).is_none() && !first {
                        d.keys.evict(&account);
                        tracing::debug!(account = %account, seq, "account changed: dropped from the cache");
                    }
                }
                first = false;
                last_ok = Some(now);
                seen.retain(|_, at| *at >= now - 2 * ACCOUNT_CHANGES_WINDOW);
            }
            Err(e) => tracing::debug!(error = %e, "reading the account change feed failed"),
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(ACCOUNT_CHANGES_EVERY) => {}
        }
    }
}

/// Applies the controller changes that are due (on every replica; each change once, in its
/// own transaction) and drops their accounts from this replica's cache.
async fn apply_controller_changes(d: Arc<Daemon>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let event = crate::audit::event::daemon_event(crate::audit::event::CONTROLLER_CHANGED, String::new());
    loop {
        match d
            .keys
            .store()
            .apply_due_controller_changes(d.sessions.now(), crate::clock::unix_now(), &event)
            .await
        {
            Ok(applied) => {
                for c in applied {
                    d.keys.evict(&c.account_id);
                    tracing::warn!(account = %c.account_id, controller = %c.new_controller, "controller change applied");
                }
            }
            Err(e) => tracing::debug!(error = %e, "applying due controller changes failed"),
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(ACCOUNT_CHANGES_EVERY) => {}
        }
    }
}

async fn count_keys_per_kek(d: Arc<Daemon>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        match d.keys.store().keys_per_kek().await {
            Ok(counts) => d.metrics.set_keys_per_kek(&counts),
            Err(e) => tracing::debug!(error = %e, "counting keys per KEK version failed"),
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
        }
    }
}
