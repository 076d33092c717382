//! Daemon commands: dev, serve, init (with --init-token, the token too).
//! SOFTHSM2_CONF is set here, once, before the async runtime (and so any
//! other thread) exists.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;

use super::{runtime, CustodyArg};
use crate::config::Config;
use crate::server::{self, Endpoints};

/// `keyward dev` options.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Custody mode written into the config on first run (and forced for this run when given).
    #[arg(long, value_enum)]
    custody: Option<CustodyArg>,
    /// gRPC listener (overrides the config).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// HTTPS side listener (overrides the config).
    #[arg(long)]
    https_listen: Option<SocketAddr>,
    /// Plain-HTTP metrics listener, an address or `off` (overrides the config).
    #[arg(long)]
    metrics_listen: Option<String>,
}

fn export_softhsm_conf(config: &Config) {
    if let Some(conf) = &config.hsm.softhsm_conf {
        // Sound: called from the synchronous main thread before the runtime
        // or any other thread is started.
        std::env::set_var("SOFTHSM2_CONF", conf);
    }
}

/// What must happen before the async runtime (so any other thread) starts:
/// SOFTHSM2_CONF, the PIN read once (its environment variable then removed),
/// the process made non-dumpable, and in host custody a check that key
/// memory can be locked.
pub(super) fn before_threads(config: &mut Config) -> anyhow::Result<()> {
    export_softhsm_conf(config);
    config.load_pin()?;
    crate::keys::harden_process().context("cannot make the process non-dumpable (PR_SET_DUMPABLE)")?;
    if config.keys.custody == crate::config::Custody::Host {
        crate::keys::locked::check_lockable()?;
    }
    Ok(())
}

pub(super) fn run_blocking<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    let rt = runtime().map_err(|_| anyhow::anyhow!("cannot start the async runtime"))?;
    let out = rt.block_on(f);
    // Unwrapped keys dropped with the runtime's tasks (an issuer key ring, a key cache) went
    // to the reaper thread: let it destroy them before the process exits and the PKCS#11
    // library is torn down under it.
    drop(rt);
    crate::hsm::flush_key_destroys();
    out
}

/// SIGTERM, SIGINT and SIGHUP streams. Installed before the daemon announces
/// readiness: until then the default action (terminate) would apply, so a
/// supervisor's SIGTERM or SIGHUP sent right after "ready" killed the process.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?,
        })
    }
}

async fn shutdown_signal(
    mut signals: Signals,
    tls: std::sync::Arc<crate::tls::ServerTls>,
    policy: std::sync::Arc<crate::policy::DecisionPoint>,
) {
    loop {
        tokio::select! {
            _ = signals.term.recv() => return,
            _ = signals.int.recv() => return,
            _ = signals.hup.recv() => {
                match tls.reload() {
                    Ok(()) => tracing::info!("SIGHUP: certificates reloaded"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: certificate reload failed; keeping the old ones"),
                }
                policy.reload_logged("SIGHUP");
            }
        }
    }
}

async fn run(config: Config, on_bound: impl FnOnce(Endpoints) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let mut running = server::start(&config).await?;
    let (grpc, https) = server::bind(&config).await?;
    running.metrics_listener = server::bind_metrics(&config).await?;
    let metrics = match &running.metrics_listener {
        Some(l) => Some(l.local_addr().context("metrics listener address")?),
        None => None,
    };
    let endpoints = Endpoints {
        grpc: grpc.local_addr().context("gRPC listener address")?,
        https: https.local_addr().context("HTTPS listener address")?,
        metrics,
    };
    let signals = Signals::install()?;
    on_bound(endpoints)?;
    tracing::info!(
        grpc = %endpoints.grpc,
        https = %endpoints.https,
        metrics = endpoints.metrics.map(|m| m.to_string()).unwrap_or_else(|| "off".into()),
        custody = config.keys.custody.as_str(),
        store = running.daemon.keys.store().backend(),
        "serving"
    );
    let tls = running.tls.clone();
    let policy = running.daemon.policy.clone();
    server::serve(running, grpc, https, shutdown_signal(signals, tls, policy)).await?;
    Ok(())
}

/// `keyward dev`.
pub fn dev(home: &Path, log_format: super::LogFormat, args: DevArgs) -> anyhow::Result<()> {
    let custody = args.custody.map(Into::into).unwrap_or_default();
    let prepared = crate::dev::prepare(home, custody)?;
    let mut config = Config::load(&prepared.config)?;
    if let Some(c) = args.custody {
        config.keys.custody = c.into();
    }
    if let Some(l) = args.listen {
        config.server.listen = l;
    }
    if let Some(l) = args.https_listen {
        config.server.https_listen = l;
    }
    if let Some(l) = args.metrics_listen {
        config.server.metrics_listen = crate::config::MetricsListen::try_from(l).map_err(anyhow::Error::msg)?;
    }
    before_threads(&mut config)?;
    let telemetry = super::init_logging(log_format, Some(&config.telemetry))?;
    let result = run_blocking(async move {
        let hsm = server::open_hsm(&config).await?;
        let kek = server::init_token(hsm.clone()).await?;
        tracing::info!(kek_version = kek, "key-encryption key ready");
        let report = hsm.custody_report();
        drop(hsm);
        let home = prepared.home.clone();
        let pki = prepared.pki;
        run(config, move |ep| {
            crate::dev::write_client_file(&home, &pki, ep)?;
            println!("keyward dev daemon");
            println!("  home         {}", home.display());
            println!("  gRPC (mTLS)  https://{}", ep.grpc);
            match ep.metrics {
                Some(m) => println!("  metrics      http://{m}/metrics"),
                None => println!("  metrics      off (server.metrics_listen)"),
            }
            println!("  health       https://{}/healthz", ep.https);
            println!("  jwks         https://{}{}", ep.https, crate::http::JWKS_PATH);
            println!("  clients      admin, marketplace, wallet-gateway (--as NAME)");
            print!("{report}");
            println!("ready");
            Ok(())
        })
        .await
    });
    if let Some(t) = telemetry {
        t.shutdown();
    }
    result
}

/// `keyward serve`.
pub fn serve(config_path: &Path, log_format: super::LogFormat) -> anyhow::Result<()> {
    let mut config = Config::load(config_path)?;
    before_threads(&mut config)?;
    let telemetry = super::init_logging(log_format, Some(&config.telemetry))?;
    let result = run_blocking(run(config, |_| Ok(())));
    if let Some(t) = telemetry {
        t.shutdown();
    }
    result
}

/// `keyward init` options.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The TOML config.
    #[arg(long, short)]
    config: PathBuf,
    /// First create the token `hsm.token_label` in a slot holding an
    /// uninitialised token, and set its user PIN (from `hsm.pin_file` or
    /// `hsm.pin_env`). A token that already has the label is never touched.
    #[arg(long, requires = "so_pin_file")]
    init_token: bool,
    /// File holding the security officer PIN for --init-token (mode 0600 or
    /// stricter; a file group or others may read is refused).
    #[arg(long, requires = "init_token")]
    so_pin_file: Option<PathBuf>,
}

/// Refuses a PIN file that group or others may read or write (symbolic links
/// are followed: the mode of the file read is what counts).
fn check_owner_only(path: &Path, what: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("{what} {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "{what} {} has mode {:04o}: group or others may access it; chmod 600 it",
            path.display(),
            mode & 0o7777
        );
    }
    Ok(())
}

/// Reads a PIN from a file the owner alone may access (trailing newline dropped).
pub(super) fn read_pin_file(path: &Path, what: &str) -> anyhow::Result<secrecy::SecretString> {
    check_owner_only(path, what)?;
    let text =
        zeroize::Zeroizing::new(std::fs::read_to_string(path).with_context(|| format!("{what} {}", path.display()))?);
    let pin = text.trim_end_matches(['\n', '\r']);
    if pin.is_empty() {
        anyhow::bail!("{what} {} is empty", path.display());
    }
    Ok(secrecy::SecretString::from(pin))
}

/// `--init-token`: creates the token unless it exists. Before the runtime
/// starts (the PKCS#11 calls block).
pub(super) fn create_token(config: &Config, so_pin_file: &Path) -> anyhow::Result<()> {
    let so_pin = read_pin_file(so_pin_file, "--so-pin-file")?;
    if let Some(pin_file) = &config.hsm.pin_file {
        check_owner_only(pin_file, "hsm.pin_file")?;
    }
    let pin = config.hsm_pin()?;
    let label = &config.hsm.token_label;
    let done = crate::hsm::create_token(&config.hsm.module, label, &so_pin, &pin)
        .with_context(|| format!("creating token {label:?} (security officer PIN from --so-pin-file)"))?;
    match done {
        crate::hsm::TokenInit::Created => println!("token {label:?} created"),
        crate::hsm::TokenInit::PinSet => println!("token {label:?} already initialised; user PIN set"),
        crate::hsm::TokenInit::Existed => println!("token {label:?} already initialised"),
    }
    Ok(())
}

/// `keyward init`.
pub fn init(args: InitArgs) -> anyhow::Result<()> {
    let mut config = Config::load(&args.config)?;
    before_threads(&mut config)?;
    if let (true, Some(so_pin_file)) = (args.init_token, &args.so_pin_file) {
        create_token(&config, so_pin_file)?;
    }
    if crate::policy::install_defaults(&config.policy.dir)? {
        println!("default policy set written to {}", config.policy.dir.display());
    }
    run_blocking(async move {
        let hsm = server::open_hsm(&config).await?;
        let existing = hsm.kek_version();
        let kek = server::init_token(hsm.clone()).await?;
        if existing == 0 {
            println!("key-encryption key version {kek} created");
        } else {
            println!("key-encryption key version {kek} already on the token");
        }
        let report = hsm.custody_report();
        let store = crate::store::open(&config.store.url).await?;
        // Each configured issuer algorithm: an active and a published next key.
        crate::jwks::KeyLifecycle::start(
            store.clone(),
            hsm,
            std::sync::Arc::new(crate::clock::SystemClock),
            crate::jwks::JwksSettings::from_config(&config.jwks),
        )
        .await?;
        println!(
            "key-encryption key version {kek} ready; store ({}) migrated",
            store.backend()
        );
        print!("{report}");
        Ok(())
    })
}

/// Before the runtime starts: `bench --hsm-baseline` opens the dev token too.
pub fn prepare_bench(home: &Path, args: &crate::bench::BenchArgs) -> anyhow::Result<()> {
    if args.hsm_baseline {
        let config = Config::load(&home.join("keyward.toml"))?;
        export_softhsm_conf(&config);
    }
    Ok(())
}
