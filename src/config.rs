//! The daemon's TOML configuration, parsed into types once and validated at
//! load. Secrets (the HSM PIN) come from an environment variable or a file,
//! never from the file itself or the command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use secrecy::SecretString;
use serde::Deserialize;

/// A configuration that cannot be used, naming the key at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML does not parse or has an unknown or mistyped key.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml said, including the key.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// The dotted key.
        key: &'static str,
        /// Why.
        reason: String,
    },
    /// The PIN source named in `hsm.pin_env` / `hsm.pin_file` gave nothing.
    #[error("config key `{key}`: {reason}")]
    Secret {
        /// The dotted key.
        key: &'static str,
        /// Why (never the secret).
        reason: String,
    },
}

/// Where account private keys are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Custody {
    /// Keys are unwrapped into the HSM as session objects and sign there.
    #[default]
    Hsm,
    /// The HSM unwraps key material into zeroized host memory; the daemon signs in software.
    Host,
}

impl Custody {
    /// The config name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Custody::Hsm => "hsm",
            Custody::Host => "host",
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners and request limits.
    pub server: ServerConfig,
    /// Certificates.
    pub tls: TlsConfig,
    /// The PKCS#11 token.
    pub hsm: HsmSection,
    /// Account keys.
    #[serde(default)]
    pub keys: KeysConfig,
    /// Persistent state.
    pub store: StoreConfig,
    /// The policy set.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Delegated sessions.
    #[serde(default)]
    pub sessions: SessionsConfig,
    /// Logs.
    #[serde(default)]
    pub log: LogConfig,
    /// Issuer key rotation and the published JWKS.
    #[serde(default)]
    pub jwks: JwksConfig,
    /// The audit log.
    #[serde(default)]
    pub audit: crate::audit::AuditConfig,
    /// OpenTelemetry traces (off unless an OTLP endpoint is named).
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// The account lifecycle.
    #[serde(default)]
    pub accounts: AccountsConfig,
}

/// `[accounts]`: the account lifecycle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsConfig {
    /// How long a controller change waits before it takes effect (an operator can cancel it
    /// meanwhile); 0 applies it at once. At most 30 days.
    #[serde(default = "default_controller_change_delay")]
    pub controller_change_delay_seconds: u64,
}

impl Default for AccountsConfig {
    fn default() -> Self {
        AccountsConfig {
            controller_change_delay_seconds: default_controller_change_delay(),
        }
    }
}

fn default_controller_change_delay() -> u64 {
    86_400
}

/// `[telemetry]`: OpenTelemetry traces exported over OTLP/gRPC. Off by
/// default; with `otlp_endpoint` set, every RPC is a server span (child of
/// the caller's W3C `traceparent`, when it sends one) with child spans for
/// the policy decision, the HSM operations, the store transactions and the
/// audit commit. Spans carry method names, codes and timings, never account
/// ids, identities, documents or key material.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The collector, e.g. `http://127.0.0.1:4317` (OTLP over gRPC, plain: a local agent or
    /// sidecar). Absent: no traces.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Share of root traces sampled (0.0 to 1.0); a caller's sampled flag wins for its traces.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// Seconds one export to the collector may take before it is dropped.
    #[serde(default = "default_export_timeout")]
    pub export_timeout_seconds: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: default_service_name(),
            sample_ratio: default_sample_ratio(),
            export_timeout_seconds: default_export_timeout(),
        }
    }
}

fn default_service_name() -> String {
    "keyward".into()
}
fn default_sample_ratio() -> f64 {
    1.0
}
fn default_export_timeout() -> u64 {
    5
}

/// `[server]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The gRPC (mutual TLS) listener.
    pub listen: SocketAddr,
    /// The HTTPS side port (server TLS only): /metrics, /healthz.
    pub https_listen: SocketAddr,
    /// Largest gRPC message accepted, in bytes.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Concurrent requests per connection.
    #[serde(default = "default_concurrency")]
    pub max_concurrent_streams: u32,
    /// Requests the daemon works on at once, all connections together. A
    /// request runs to its end even when its client gives up (see
    /// `Daemon::handle`), so this bounds the work clients can leave behind;
    /// requests beyond it wait, before any of their work starts, for one to
    /// finish (and give up cleanly if their client does).
    #[serde(default = "default_max_in_flight")]
    pub max_requests_in_flight: usize,
    /// Requests one client identity may have in flight at once; beyond it a
    /// request is refused at once with RESOURCE_EXHAUSTED (no work, no audit
    /// event: it was shed, not decided), so one client cannot take every
    /// permit of `max_requests_in_flight` from the others.
    #[serde(default = "default_max_per_identity")]
    pub max_requests_per_identity: usize,
    /// Connections the gRPC listener holds at once (handshaking or open).
    /// At the cap it stops accepting until one closes. See README ›
    /// Security › File descriptors for the budget this is part of.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections the HTTPS side port holds at once.
    #[serde(default = "default_https_max_connections")]
    pub https_max_connections: usize,
    /// Seconds a peer gets to complete the TLS handshake (both listeners).
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_seconds: u64,
    /// Seconds an HTTPS client gets to send a request's headers.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_seconds: u64,
    /// Seconds an HTTPS connection may stay open; then it is closed
    /// gracefully (a request in progress finishes).
    #[serde(default = "default_https_connection_age")]
    pub https_max_connection_age_seconds: u64,
    /// Seconds between HTTP/2 keepalive pings on idle gRPC connections; a
    /// peer that does not answer within `http2_keepalive_timeout_seconds`
    /// is disconnected. 0 turns pings off.
    #[serde(default = "default_keepalive_interval")]
    pub http2_keepalive_interval_seconds: u64,
    /// See `http2_keepalive_interval_seconds`.
    #[serde(default = "default_keepalive_timeout")]
    pub http2_keepalive_timeout_seconds: u64,
    /// Seconds graceful shutdown gives open connections (a `StreamEvents`
    /// follower, a half-sent request) and then requests still running,
    /// before it closes them and writes the final audit checkpoint.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_seconds: u64,
    /// Seconds between SIGTERM and the start of the graceful shutdown, during
    /// which the replica reports not ready (gRPC health NOT_SERVING, `/readyz`
    /// 503) and answers every new request UNAVAILABLE while its in-flight
    /// requests finish: load balancers and clients move to another replica
    /// and retry, instead of meeting a closed connection. 0: close at once.
    #[serde(default = "default_drain")]
    pub drain_seconds: u64,
    /// Where Prometheus scrapes `/metrics`: a plain-HTTP listener of its own
    /// (default `127.0.0.1:9464`, loopback), or `"off"`. Never on the
    /// public HTTPS side port.
    #[serde(default)]
    pub metrics_listen: MetricsListen,
}

fn default_shutdown_grace() -> u64 {
    5
}
fn default_drain() -> u64 {
    2
}

fn default_max_per_identity() -> usize {
    256
}
fn default_max_connections() -> usize {
    1024
}
fn default_https_max_connections() -> usize {
    256
}
fn default_handshake_timeout() -> u64 {
    10
}
fn default_header_read_timeout() -> u64 {
    5
}
fn default_https_connection_age() -> u64 {
    60
}
fn default_keepalive_interval() -> u64 {
    30
}
fn default_keepalive_timeout() -> u64 {
    10
}

/// `server.metrics_listen`: an address, or `"off"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum MetricsListen {
    /// No metrics listener.
    Off,
    /// Serve `/metrics` in plain HTTP here.
    At(SocketAddr),
}

impl Default for MetricsListen {
    fn default() -> Self {
        MetricsListen::At(SocketAddr::from(([127, 0, 0, 1], 9464)))
    }
}

impl TryFrom<String> for MetricsListen {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s == "off" {
            return Ok(MetricsListen::Off);
        }
        s.parse()
            .map(MetricsListen::At)
            .map_err(|_| format!("server.metrics_listen: {s:?} is neither an address (host:port) nor \"off\""))
    }
}

fn default_max_in_flight() -> usize {
    512
}

/// What real requests need: a typed-data document is at most 256 KiB, a
/// message 64 KiB, a session token 16 KiB; 1 MiB leaves room for all of it
/// with its fields, and bounds what a client can make the daemon buffer.
fn default_max_message() -> usize {
    1024 * 1024
}
fn default_concurrency() -> u32 {
    256
}

/// `[tls]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA that client certificates must chain to (PEM).
    pub client_ca: PathBuf,
    /// What else than the one URI SAN may name a client, in order: `"dns"`
    /// (its one DNS SAN, as `dns:<name>`), `"cn"` (its one CN, as
    /// `cn:<name>`). Empty by default: a certificate without exactly one URI
    /// SAN is refused at the handshake.
    #[serde(default)]
    pub identity_fallback: Vec<crate::tls::IdentityFallback>,
    /// PEM certificate revocation lists of the client CAs, read at start and
    /// reloaded with the certificates (SIGHUP). A revoked client certificate
    /// is refused at the handshake.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// Seconds between checks of the certificate, key, client CA and CRL
    /// files; a change of their contents reloads them (as SIGHUP does), so a
    /// rotation by cert-manager or a mounted Secret needs no signal. A new
    /// set that does not load is refused once, and the current one stays.
    /// 0 turns the check off.
    #[serde(default = "default_tls_watch")]
    pub watch_seconds: u64,
}

fn default_tls_watch() -> u64 {
    10
}

/// `[hsm]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmSection {
    /// The PKCS#11 module.
    pub module: PathBuf,
    /// The token, chosen by label.
    pub token_label: String,
    /// Environment variable that holds the user PIN.
    pub pin_env: Option<String>,
    /// File that holds the user PIN; refused at start if group or others
    /// may read or write it (mode 0600 or 0400).
    pub pin_file: Option<PathBuf>,
    /// PKCS#11 sessions in the pool.
    #[serde(default = "default_pool")]
    pub pool_size: usize,
    /// SoftHSM only: the softhsm2.conf to use (sets SOFTHSM2_CONF at start-up).
    pub softhsm_conf: Option<PathBuf>,
    /// Label prefix of the key-encryption keys.
    #[serde(default = "default_kek_prefix")]
    pub kek_label_prefix: String,
    /// Longest wait, in milliseconds, for a free PKCS#11 session of the pool;
    /// an operation that waits longer fails as UNAVAILABLE (counted in
    /// `keyward_hsm_pool_wait_timeouts_total`).
    #[serde(default = "default_acquire_timeout")]
    pub acquire_timeout_ms: u64,
    /// hsm custody: start even if a KEK does not enforce its unwrap template
    /// (the token cannot, or the KEK predates sealed KEKs). Whoever holds the
    /// PIN can then read the keys such a KEK wraps. Off by default.
    #[serde(default)]
    pub allow_unenforced_kek: bool,
    /// hsm custody: refuse Ed25519 account keys (account creation and
    /// Ed25519 signing answer FAILED_PRECONDITION) on tokens that cannot
    /// unwrap EdDSA keys natively (SoftHSM 2.6.1), where the Ed25519 seed
    /// passes through host memory. Off by default.
    #[serde(default)]
    pub refuse_host_ed25519: bool,
    /// The PIN, once [`Config::load_pin`] has read it.
    #[serde(skip)]
    pub pin: Option<SecretString>,
}

fn default_acquire_timeout() -> u64 {
    5_000
}

fn default_pool() -> usize {
    4
}
fn default_kek_prefix() -> String {
    "keyward-kek".to_string()
}

/// `[keys]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// Custody mode.
    #[serde(default)]
    pub custody: Custody,
    /// Unwrapped keys kept ready, at most.
    #[serde(default = "default_cache")]
    pub cache_capacity: usize,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            custody: Custody::Hsm,
            cache_capacity: default_cache(),
        }
    }
}

fn default_cache() -> usize {
    100_000
}

/// `[store]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://PATH` or `postgres://...`.
    pub url: String,
}

/// `[policy]`: where the Cedar policy set lives.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Folder holding schema.cedarschema, clients.toml, limits.toml and *.cedar
    /// (relative to the config file's folder).
    #[serde(default = "default_policy_dir")]
    pub dir: PathBuf,
    /// Seconds between two checks of the folder for changes (0: reload on SIGHUP only).
    #[serde(default = "default_policy_watch")]
    pub watch_seconds: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            dir: default_policy_dir(),
            watch_seconds: default_policy_watch(),
        }
    }
}

fn default_policy_dir() -> PathBuf {
    PathBuf::from("policies")
}
fn default_policy_watch() -> u64 {
    5
}

/// `[sessions]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsConfig {
    /// EIP-155 chain id of the SessionGrant domain.
    #[serde(default = "default_chain_id")]
    pub chain_id: u64,
    /// Optional verifyingContract of the domain (0x address).
    pub verifying_contract: Option<String>,
    /// Seconds a challenge can be opened.
    #[serde(default = "default_challenge_ttl")]
    pub challenge_ttl_seconds: u64,
    /// Longest session, seconds.
    #[serde(default = "default_max_session_ttl")]
    pub max_ttl_seconds: u64,
    /// Tolerated clock difference between replicas, seconds.
    #[serde(default = "default_skew")]
    pub clock_skew_seconds: u64,
    /// The recovery bound: a session spend still pending this many seconds
    /// after its reservation (its request died between reserving and
    /// completing: a crash, a failed store) is released, with its audit
    /// event, by a sweep that runs every quarter of it. Must exceed the
    /// longest signing a request can take.
    #[serde(default = "default_pending_spend_timeout")]
    pub pending_spend_timeout_seconds: u64,
    /// Days ended sessions (expired, or revoked and expired) and expired
    /// challenges are kept before an hourly prune deletes them; 0 keeps them
    /// for ever. Their audit events stay.
    #[serde(default = "default_retention_days")]
    pub retention_days: u64,
}

impl SessionsConfig {
    /// The retention in seconds, `None` for ever.
    pub fn retention_seconds(&self) -> Option<i64> {
        (self.retention_days > 0).then(|| i64::try_from(self.retention_days.saturating_mul(86_400)).unwrap_or(i64::MAX))
    }
}

fn default_retention_days() -> u64 {
    30
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            chain_id: default_chain_id(),
            verifying_contract: None,
            challenge_ttl_seconds: default_challenge_ttl(),
            max_ttl_seconds: default_max_session_ttl(),
            clock_skew_seconds: default_skew(),
            pending_spend_timeout_seconds: default_pending_spend_timeout(),
            retention_days: default_retention_days(),
        }
    }
}

fn default_pending_spend_timeout() -> u64 {
    60
}

fn default_chain_id() -> u64 {
    1
}
fn default_challenge_ttl() -> u64 {
    300
}
fn default_max_session_ttl() -> u64 {
    86_400
}
fn default_skew() -> u64 {
    30
}

/// `[log]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Log account ids and request details (off by default: private logs).
    #[serde(default)]
    pub log_request_details: bool,
}

/// `[jwks]`: issuer key lifecycle and the published key set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwksConfig {
    /// Issuer algorithms with an active key (JOSE names; EdDSA is required: sessions use it).
    #[serde(default = "default_jwks_algorithms")]
    pub algorithms: Vec<String>,
    /// Days an active key signs before the scheduled rotation.
    #[serde(default = "default_rotation_days")]
    pub rotation_days: u64,
    /// Hours before the rotation the next key is published.
    #[serde(default = "default_prepublish_hours")]
    pub prepublish_hours: u64,
    /// Days a retired key stays published before it is removed and destroyed.
    #[serde(default = "default_grace_days")]
    pub grace_days: u64,
    /// `Cache-Control: max-age` of the JWKS; must be shorter than the pre-publication window.
    #[serde(default = "default_jwks_max_age")]
    pub max_age_seconds: u64,
    /// Seconds between two runs of the rotation scheduler; must be shorter than
    /// `max_age_seconds`. (Other replicas see lifecycle changes within `jwks::WATCH`, 1 s.)
    #[serde(default = "default_jwks_tick")]
    pub tick_seconds: u64,
}

impl Default for JwksConfig {
    fn default() -> Self {
        JwksConfig {
            algorithms: default_jwks_algorithms(),
            rotation_days: default_rotation_days(),
            prepublish_hours: default_prepublish_hours(),
            grace_days: default_grace_days(),
            max_age_seconds: default_jwks_max_age(),
            tick_seconds: default_jwks_tick(),
        }
    }
}

fn default_jwks_algorithms() -> Vec<String> {
    vec!["EdDSA".into(), "ES256".into()]
}
fn default_rotation_days() -> u64 {
    30
}
fn default_prepublish_hours() -> u64 {
    24
}
fn default_grace_days() -> u64 {
    90
}
fn default_jwks_max_age() -> u64 {
    3600
}
fn default_jwks_tick() -> u64 {
    60
}

impl JwksConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_string(),
            })
        };
        if self.algorithms.is_empty() {
            return invalid("jwks.algorithms", "must name at least EdDSA");
        }
        for a in &self.algorithms {
            if crate::hsm::IssuerAlg::from_str(a).is_err() {
                return invalid(
                    "jwks.algorithms",
                    &format!("unknown algorithm {a:?} (EdDSA, ES256, ES256K)"),
                );
            }
        }
        if !self.algorithms.iter().any(|a| a == "EdDSA") {
            return invalid("jwks.algorithms", "must include EdDSA (session tokens use it)");
        }
        if self.rotation_days == 0 || self.rotation_days > 3650 {
            return invalid("jwks.rotation_days", "must be between 1 and 3650");
        }
        if self.prepublish_hours == 0 || self.prepublish_hours >= self.rotation_days * 24 {
            return invalid(
                "jwks.prepublish_hours",
                "must be at least 1 and shorter than jwks.rotation_days",
            );
        }
        if self.grace_days == 0 || self.grace_days > 3650 {
            return invalid("jwks.grace_days", "must be between 1 and 3650");
        }
        if self.max_age_seconds == 0 || self.max_age_seconds >= self.prepublish_hours * 3600 {
            return invalid(
                "jwks.max_age_seconds",
                "must be at least 1 and shorter than the pre-publication window (jwks.prepublish_hours)",
            );
        }
        if self.tick_seconds == 0 || self.tick_seconds >= self.max_age_seconds {
            // Replicas learn of a new next key on their tick: it must come well within max-age.
            return invalid(
                "jwks.tick_seconds",
                "must be at least 1 and shorter than jwks.max_age_seconds",
            );
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses and validates a config file; relative paths are taken
    /// relative to the file's folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let cfg = Config::parse(&text, base).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        cfg.check_secret_files()?;
        Ok(cfg)
    }

    /// Parses and validates TOML text; `base` anchors relative paths.
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        cfg.resolve_paths(base);
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        fix(&mut self.tls.client_ca);
        for crl in &mut self.tls.crls {
            fix(crl);
        }
        fix(&mut self.policy.dir);
        if let Some(p) = self.hsm.pin_file.as_mut() {
            fix(p);
        }
        if let Some(p) = self.hsm.softhsm_conf.as_mut() {
            fix(p);
        }
        if let Some(rest) = self.store.url.strip_prefix("sqlite://") {
            let p = Path::new(rest);
            if p.is_relative() && !rest.starts_with(':') {
                self.store.url = format!("sqlite://{}", base.join(p).display());
            }
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let t = &self.telemetry;
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return Err(ConfigError::Invalid {
                key: "telemetry.sample_ratio",
                reason: "must be between 0.0 and 1.0".into(),
            });
        }
        if t.export_timeout_seconds == 0 || t.export_timeout_seconds > 300 {
            return Err(ConfigError::Invalid {
                key: "telemetry.export_timeout_seconds",
                reason: "must be between 1 and 300".into(),
            });
        }
        if let Some(e) = &t.otlp_endpoint {
            if !e.starts_with("http://") || e.parse::<http::Uri>().is_err() {
                return Err(ConfigError::Invalid {
                    key: "telemetry.otlp_endpoint",
                    reason: "must be the http:// URL of an OTLP/gRPC collector (a local agent or sidecar; \
                             TLS to the collector is not built in)"
                        .into(),
                });
            }
        }
        if t.service_name.is_empty() {
            return Err(ConfigError::Invalid {
                key: "telemetry.service_name",
                reason: "must not be empty".into(),
            });
        }
        if self.server.max_message_bytes < 64 * 1024 || self.server.max_message_bytes > 64 * 1024 * 1024 {
            return Err(ConfigError::Invalid {
                key: "server.max_message_bytes",
                reason: "must be between 65536 and 67108864".into(),
            });
        }
        if self.sessions.pending_spend_timeout_seconds == 0 || self.sessions.pending_spend_timeout_seconds > 86_400 {
            return Err(ConfigError::Invalid {
                key: "sessions.pending_spend_timeout_seconds",
                reason: "must be between 1 and 86400".into(),
            });
        }
        if self.server.max_requests_in_flight == 0 || self.server.max_requests_in_flight > 1 << 20 {
            return Err(ConfigError::Invalid {
                key: "server.max_requests_in_flight",
                reason: "must be between 1 and 1048576".into(),
            });
        }
        let server = &self.server;
        for (key, value, lo, hi) in [
            (
                "server.max_requests_per_identity",
                server.max_requests_per_identity as u64,
                1,
                1 << 20,
            ),
            ("server.max_connections", server.max_connections as u64, 1, 1 << 20),
            (
                "server.https_max_connections",
                server.https_max_connections as u64,
                1,
                1 << 20,
            ),
            (
                "server.handshake_timeout_seconds",
                server.handshake_timeout_seconds,
                1,
                300,
            ),
            (
                "server.header_read_timeout_seconds",
                server.header_read_timeout_seconds,
                1,
                300,
            ),
            (
                "server.https_max_connection_age_seconds",
                server.https_max_connection_age_seconds,
                1,
                86_400,
            ),
            (
                "server.http2_keepalive_interval_seconds",
                server.http2_keepalive_interval_seconds,
                0,
                86_400,
            ),
            (
                "server.http2_keepalive_timeout_seconds",
                server.http2_keepalive_timeout_seconds,
                1,
                3_600,
            ),
            ("server.shutdown_grace_seconds", server.shutdown_grace_seconds, 1, 300),
            ("server.drain_seconds", server.drain_seconds, 0, 300),
            ("hsm.acquire_timeout_ms", self.hsm.acquire_timeout_ms, 1, 600_000),
        ] {
            if !(lo..=hi).contains(&value) {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("must be between {lo} and {hi}"),
                });
            }
        }
        if self.server.max_concurrent_streams == 0 {
            return Err(ConfigError::Invalid {
                key: "server.max_concurrent_streams",
                reason: "must be at least 1".into(),
            });
        }
        if self.hsm.pool_size == 0 || self.hsm.pool_size > 256 {
            return Err(ConfigError::Invalid {
                key: "hsm.pool_size",
                reason: "must be between 1 and 256".into(),
            });
        }
        if self.hsm.token_label.is_empty() || self.hsm.token_label.len() > 32 {
            return Err(ConfigError::Invalid {
                key: "hsm.token_label",
                reason: "must be 1 to 32 characters (PKCS#11 label)".into(),
            });
        }
        match (&self.hsm.pin_env, &self.hsm.pin_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid {
                    key: "hsm.pin_env",
                    reason: "set either hsm.pin_env or hsm.pin_file, not both".into(),
                })
            }
            (None, None) => {
                return Err(ConfigError::Invalid {
                    key: "hsm.pin_env",
                    reason: "one of hsm.pin_env or hsm.pin_file is required".into(),
                })
            }
            _ => {}
        }
        self.jwks.validate()?;
        self.audit.validate()?;
        if self.accounts.controller_change_delay_seconds > 30 * 86_400 {
            return Err(ConfigError::Invalid {
                key: "accounts.controller_change_delay_seconds",
                reason: "at most 30 days (2592000)".into(),
            });
        }
        if self.keys.cache_capacity == 0 {
            return Err(ConfigError::Invalid {
                key: "keys.cache_capacity",
                reason: "must be at least 1".into(),
            });
        }
        let url = &self.store.url;
        if !(url.starts_with("sqlite://") || url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::Invalid {
                key: "store.url",
                reason: "must start with sqlite://, postgres:// or postgresql://".into(),
            });
        }
        let s = &self.sessions;
        if s.challenge_ttl_seconds == 0 || s.challenge_ttl_seconds > 86_400 {
            return Err(ConfigError::Invalid {
                key: "sessions.challenge_ttl_seconds",
                reason: "must be between 1 and 86400".into(),
            });
        }
        if s.max_ttl_seconds == 0 || s.max_ttl_seconds > 31 * 86_400 {
            return Err(ConfigError::Invalid {
                key: "sessions.max_ttl_seconds",
                reason: "must be between 1 and 2678400 (31 days)".into(),
            });
        }
        if s.retention_days > 36_500 {
            return Err(ConfigError::Invalid {
                key: "sessions.retention_days",
                reason: "must be at most 36500 (0 keeps ended sessions for ever)".into(),
            });
        }
        if s.clock_skew_seconds > 600 {
            return Err(ConfigError::Invalid {
                key: "sessions.clock_skew_seconds",
                reason: "must be at most 600".into(),
            });
        }
        if let Some(c) = &s.verifying_contract {
            if crate::crypto::eth::Address::parse(c).is_err() {
                return Err(ConfigError::Invalid {
                    key: "sessions.verifying_contract",
                    reason: "must be a 0x address".into(),
                });
            }
        }
        if self.policy.watch_seconds > 86_400 {
            return Err(ConfigError::Invalid {
                key: "policy.watch_seconds",
                reason: "must be at most 86400".into(),
            });
        }
        Ok(())
    }

    /// The HSM PIN: the one [`Config::load_pin`] kept, else read from its
    /// source now (see there).
    pub fn hsm_pin(&self) -> Result<SecretString, ConfigError> {
        match &self.hsm.pin {
            Some(pin) => Ok(pin.clone()),
            None => self.read_pin(),
        }
    }

    /// Reads the PIN from its source and keeps it. Call it before any other
    /// thread exists (the daemon's commands do, on the main thread before the
    /// async runtime starts): with `hsm.pin_env` it removes the variable from
    /// the environment, and `std::env::remove_var` races any other thread's
    /// reading of the environment (glibc's getenv is not synchronised with
    /// unsetenv). Once removed, the PIN is gone from /proc/PID/environ's
    /// live copy and from child processes.
    pub fn load_pin(&mut self) -> Result<(), ConfigError> {
        self.hsm.pin = Some(self.read_pin()?);
        Ok(())
    }

    fn read_pin(&self) -> Result<SecretString, ConfigError> {
        if let Some(var) = &self.hsm.pin_env {
            let value = std::env::var(var).map_err(|_| ConfigError::Secret {
                key: "hsm.pin_env",
                reason: format!("environment variable {var} is not set"),
            })?;
            // See `load_pin` for why this should run before other threads exist.
            std::env::remove_var(var);
            return non_empty(value, "hsm.pin_env");
        }
        if let Some(path) = &self.hsm.pin_file {
            let value = zeroize::Zeroizing::new(read_secret_file(path, "hsm.pin_file")?);
            return non_empty(value.trim_end_matches(['\n', '\r']).to_string(), "hsm.pin_file");
        }
        Err(ConfigError::Secret {
            key: "hsm.pin_env",
            reason: "no PIN source configured".into(),
        })
    }

    /// Refuses secret files that group or others may read or write: the PIN
    /// file and the TLS private key. Runs at load; a file that does not exist
    /// yet is left to the code that reads it.
    pub fn check_secret_files(&self) -> Result<(), ConfigError> {
        if let Some(p) = &self.hsm.pin_file {
            check_private_mode(p, "hsm.pin_file")?;
        }
        check_private_mode(&self.tls.key, "tls.key")
    }

    /// The HSM connection this config describes (PIN from [`Config::hsm_pin`]).
    pub fn hsm_config(&self) -> Result<crate::hsm::HsmConfig, ConfigError> {
        Ok(crate::hsm::HsmConfig {
            module: self.hsm.module.clone(),
            token_label: self.hsm.token_label.clone(),
            pin: self.hsm_pin()?,
            pool_size: self.hsm.pool_size,
            kek_label_prefix: self.hsm.kek_label_prefix.clone(),
            custody: crate::hsm::CustodyPolicy {
                mode: self.keys.custody,
                allow_unenforced_kek: self.hsm.allow_unenforced_kek,
                refuse_host_ed25519: self.hsm.refuse_host_ed25519,
            },
        })
    }
}

/// The mode bits that must be clear on a file holding a secret.
const NOT_FOR_OTHERS: u32 = 0o077;

fn mode_error(path: &Path, key: &'static str, mode: u32) -> ConfigError {
    ConfigError::Secret {
        key,
        reason: format!(
            "{} has mode {:04o}: group or others may read or write it; a file holding a secret \
             must be 0600 or 0400 (chmod 600 {})",
            path.display(),
            mode & 0o7777,
            path.display()
        ),
    }
}

fn check_private_mode(path: &Path, key: &'static str) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt as _;
    match std::fs::metadata(path) {
        Ok(m) if m.permissions().mode() & NOT_FOR_OTHERS != 0 => Err(mode_error(path, key, m.permissions().mode())),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ConfigError::Secret {
            key,
            reason: format!("cannot read {}: {e}", path.display()),
        }),
    }
}

/// Reads a secret file, checking the mode of the file it opened (not of a
/// path that could be swapped in between).
fn read_secret_file(path: &Path, key: &'static str) -> Result<String, ConfigError> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;
    let cannot = |e: std::io::Error| ConfigError::Secret {
        key,
        reason: format!("cannot read {}: {e}", path.display()),
    };
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    let mode = meta.permissions().mode();
    if mode & NOT_FOR_OTHERS != 0 {
        return Err(mode_error(path, key, mode));
    }
    // Sized up front so reading never reallocates (and leaves a copy behind).
    let mut value = String::with_capacity(usize::try_from(meta.len()).unwrap_or(0).saturating_add(1));
    file.read_to_string(&mut value).map_err(cannot)?;
    Ok(value)
}

fn non_empty(value: String, key: &'static str) -> Result<SecretString, ConfigError> {
    if value.is_empty() {
        return Err(ConfigError::Secret {
            key,
            reason: "the PIN is empty".into(),
        });
    }
    Ok(SecretString::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_names_only_real_keys_and_validates() {
        let text = include_str!("../deploy/keyward.example.toml");
        let cfg = Config::parse(text, Path::new("/etc/keyward")).expect("the example config loads");
        assert_eq!(cfg.server.max_requests_in_flight, 512);
        assert_eq!(cfg.sessions.pending_spend_timeout_seconds, 60);
    }

    #[test]
    fn recovery_bound_and_in_flight_limit_are_bounded() {
        let base = include_str!("../deploy/keyward.example.toml");
        for (from, to, key) in [
            (
                "max_requests_in_flight = 512",
                "max_requests_in_flight = 0",
                "server.max_requests_in_flight",
            ),
            (
                "pending_spend_timeout_seconds = 60",
                "pending_spend_timeout_seconds = 0",
                "sessions.pending_spend_timeout_seconds",
            ),
            (
                "max_connections = 1024",
                "max_connections = 0",
                "server.max_connections",
            ),
            (
                "max_requests_per_identity = 256",
                "max_requests_per_identity = 0",
                "server.max_requests_per_identity",
            ),
            (
                "header_read_timeout_seconds = 5",
                "header_read_timeout_seconds = 0",
                "server.header_read_timeout_seconds",
            ),
        ] {
            match Config::parse(&base.replace(from, to), Path::new("/etc/keyward")) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{to}: {other:?}"),
            }
        }
    }

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:7443"
https_listen = "127.0.0.1:7444"
[tls]
cert = "pki/server.pem"
key = "pki/server-key.pem"
client_ca = "/abs/ca.pem"
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "keyward"
pin_file = "hsm-pin"
[store]
url = "sqlite://keyward.db"
[policy]
dir = "policies"
"#;

    #[test]
    fn parses_and_resolves_relative_paths() {
        let cfg = Config::parse(GOOD, Path::new("/home/k")).expect("valid");
        assert_eq!(cfg.tls.cert, PathBuf::from("/home/k/pki/server.pem"));
        assert_eq!(cfg.tls.client_ca, PathBuf::from("/abs/ca.pem"));
        assert_eq!(cfg.store.url, "sqlite:///home/k/keyward.db");
        assert_eq!(cfg.keys.custody, Custody::Hsm);
        assert_eq!(cfg.hsm.pool_size, 4);
        assert_eq!(cfg.policy.dir, PathBuf::from("/home/k/policies"));
    }

    #[test]
    fn unknown_key_is_named() {
        let text = GOOD.replace("[store]", "[store]\nurll = 1");
        match Config::parse(&text, Path::new("/")) {
            Err(ConfigError::Parse { message, .. }) => assert!(message.contains("urll"), "{message}"),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn jwks_section_defaults_and_validation() {
        let cfg = Config::parse(GOOD, Path::new("/")).expect("valid");
        assert_eq!(cfg.jwks.algorithms, vec!["EdDSA".to_string(), "ES256".to_string()]);
        assert_eq!(
            (
                cfg.jwks.rotation_days,
                cfg.jwks.prepublish_hours,
                cfg.jwks.grace_days,
                cfg.jwks.max_age_seconds
            ),
            (30, 24, 90, 3600)
        );
        let with = |extra: &str| format!("{GOOD}[jwks]\n{extra}\n");
        let cases = [
            ("max_age_seconds = 86400", "jwks.max_age_seconds"),
            ("prepublish_hours = 1\nmax_age_seconds = 3600", "jwks.max_age_seconds"),
            ("algorithms = [\"ES256\"]", "jwks.algorithms"),
            ("algorithms = [\"EdDSA\", \"HS256\"]", "jwks.algorithms"),
            ("rotation_days = 1\nprepublish_hours = 24", "jwks.prepublish_hours"),
            ("max_age_seconds = 60\ntick_seconds = 60", "jwks.tick_seconds"),
        ];
        for (extra, key) in cases {
            match Config::parse(&with(extra), Path::new("/")) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{extra}"),
                other => panic!("expected invalid {key} for {extra}, got {other:?}"),
            }
        }
        let ok = Config::parse(
            &with("algorithms = [\"EdDSA\", \"ES256K\"]\nmax_age_seconds = 300\ntick_seconds = 30"),
            Path::new("/"),
        )
        .expect("valid");
        assert_eq!(ok.jwks.max_age_seconds, 300);
    }

    #[test]
    fn invalid_values_name_their_key() {
        let cases = [
            (GOOD.replace("pin_file = \"hsm-pin\"", ""), "hsm.pin_env"),
            (GOOD.replace("[hsm]", "[hsm]\npool_size = 0"), "hsm.pool_size"),
            (GOOD.replace("sqlite://keyward.db", "mysql://x"), "store.url"),
            (
                GOOD.replace("pin_file = \"hsm-pin\"", "pin_file = \"a\"\npin_env = \"B\""),
                "hsm.pin_env",
            ),
        ];
        for (text, key) in cases {
            match Config::parse(&text, Path::new("/")) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key),
                other => panic!("expected invalid {key}, got {other:?}"),
            }
        }
    }

    fn chmod(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn secret_files_open_to_others_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("pki")).expect("pki");
        let pin = dir.path().join("hsm-pin");
        let key = dir.path().join("pki/server-key.pem");
        std::fs::write(&pin, "s3cret-pin\n").expect("write");
        std::fs::write(&key, "key").expect("write");
        std::fs::write(dir.path().join("keyward.toml"), GOOD).expect("write");
        for (path, mode, name) in [
            (&pin, 0o640, "hsm.pin_file"),
            (&pin, 0o604, "hsm.pin_file"),
            (&key, 0o644, "tls.key"),
        ] {
            chmod(&pin, 0o600);
            chmod(&key, 0o600);
            chmod(path, mode);
            match Config::load(&dir.path().join("keyward.toml")) {
                Err(ConfigError::Secret { key: k, reason }) => {
                    assert_eq!(k, name);
                    assert!(reason.contains(&path.display().to_string()), "names the file: {reason}");
                    assert!(reason.contains(&format!("{mode:04o}")), "names the mode: {reason}");
                }
                other => panic!("{name} {mode:o}: expected a refusal, got {other:?}"),
            }
        }
        // Reading the PIN checks the mode of the file it opened, too.
        chmod(&key, 0o600);
        chmod(&pin, 0o600);
        let cfg = Config::load(&dir.path().join("keyward.toml")).expect("0600 files load");
        chmod(&pin, 0o644);
        assert!(matches!(
            cfg.hsm_pin(),
            Err(ConfigError::Secret {
                key: "hsm.pin_file",
                ..
            })
        ));
        chmod(&pin, 0o400);
        assert!(cfg.hsm_pin().is_ok());
    }

    #[test]
    fn the_pin_variable_is_removed_once_read() {
        let var = "KEYWARD_TEST_PIN_REMOVED";
        // Sound: nextest runs this test alone in its process, before any other thread.
        std::env::set_var(var, "env-pin-1234");
        let text = GOOD.replace("pin_file = \"hsm-pin\"", &format!("pin_env = \"{var}\""));
        let mut cfg = Config::parse(&text, Path::new("/")).expect("valid");
        cfg.load_pin().expect("pin");
        assert!(std::env::var_os(var).is_none(), "the PIN variable is gone");
        use secrecy::ExposeSecret;
        assert_eq!(cfg.hsm_pin().expect("kept").expose_secret(), "env-pin-1234");
        assert_eq!(
            cfg.hsm_config().expect("config").pin.expose_secret(),
            "env-pin-1234",
            "the HSM gets the kept PIN"
        );
        assert!(!format!("{cfg:?}").contains("env-pin"));
    }

    #[test]
    fn custody_switches_reach_the_hsm_config() {
        let mut cfg = Config::parse(
            &GOOD.replace(
                "[hsm]",
                "[hsm]\nallow_unenforced_kek = true\nrefuse_host_ed25519 = true",
            ),
            Path::new("/"),
        )
        .expect("valid");
        cfg.hsm.pin = Some(SecretString::from("p"));
        let h = cfg.hsm_config().expect("config").custody;
        assert!(h.allow_unenforced_kek && h.refuse_host_ed25519);
        assert_eq!(h.mode, Custody::Hsm);
        let d = Config::parse(GOOD, Path::new("/")).expect("valid");
        assert!(!d.hsm.allow_unenforced_kek && !d.hsm.refuse_host_ed25519);
    }

    #[test]
    fn metrics_listener_and_session_retention() {
        let cfg = Config::parse(GOOD, Path::new("/")).expect("valid");
        assert_eq!(
            cfg.server.metrics_listen,
            MetricsListen::At("127.0.0.1:9464".parse().expect("addr"))
        );
        assert_eq!(cfg.sessions.retention_seconds(), Some(30 * 86_400));
        let with = |server: &str, sessions: &str| {
            let text = GOOD.replace("[server]", &format!("[server]\n{server}"));
            Config::parse(&format!("{text}[sessions]\n{sessions}\n"), Path::new("/"))
        };
        let cfg = with("metrics_listen = \"off\"", "retention_days = 0").expect("valid");
        assert_eq!(cfg.server.metrics_listen, MetricsListen::Off);
        assert_eq!(cfg.sessions.retention_seconds(), None, "0 keeps for ever");
        let cfg = with("metrics_listen = \"[::1]:0\"", "retention_days = 7").expect("valid");
        assert_eq!(
            cfg.server.metrics_listen,
            MetricsListen::At("[::1]:0".parse().expect("addr"))
        );
        assert_eq!(cfg.sessions.retention_seconds(), Some(7 * 86_400));
        match with("metrics_listen = \"localhost\"", "") {
            Err(ConfigError::Parse { message, .. }) => assert!(message.contains("metrics_listen"), "{message}"),
            other => panic!("expected a parse error, got {other:?}"),
        }
        match with("", "retention_days = 36501") {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "sessions.retention_days"),
            other => panic!("expected invalid sessions.retention_days, got {other:?}"),
        }
    }

    #[test]
    fn pin_from_file_and_debug_hides_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("hsm-pin"), "s3cret-pin\n").expect("write");
        chmod(&dir.path().join("hsm-pin"), 0o600);
        let cfg = Config::parse(GOOD, dir.path()).expect("valid");
        let pin = cfg.hsm_pin().expect("pin");
        use secrecy::ExposeSecret;
        assert_eq!(pin.expose_secret(), "s3cret-pin");
        assert!(!format!("{pin:?}").contains("s3cret"));
    }
}
