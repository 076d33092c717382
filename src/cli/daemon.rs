//! Daemon commands: dev, serve, init. SOFTHSM2_CONF is set here, once, before
//! the async runtime (and so any other thread) exists.

use std::net::SocketAddr;
use std::path::Path;

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
fn before_threads(config: &mut Config) -> anyhow::Result<()> {
    export_softhsm_conf(config);
    config.load_pin()?;
    crate::keys::harden_process().context("cannot make the process non-dumpable (PR_SET_DUMPABLE)")?;
    if config.keys.custody == crate::config::Custody::Host {
        crate::keys::locked::check_lockable()?;
    }
    Ok(())
}

fn run_blocking<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    let rt = runtime().map_err(|_| anyhow::anyhow!("cannot start the async runtime"))?;
    rt.block_on(f)
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
    let running = server::start(&config).await?;
    let (grpc, https) = server::bind(&config).await?;
    let endpoints = Endpoints {
        grpc: grpc.local_addr().context("gRPC listener address")?,
        https: https.local_addr().context("HTTPS listener address")?,
    };
    let signals = Signals::install()?;
    on_bound(endpoints)?;
    tracing::info!(
        grpc = %endpoints.grpc,
        https = %endpoints.https,
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
pub fn dev(home: &Path, args: DevArgs) -> anyhow::Result<()> {
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
    before_threads(&mut config)?;
    run_blocking(async move {
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
            println!("  metrics      https://{}/metrics", ep.https);
            println!("  health       https://{}/healthz", ep.https);
            println!("  jwks         https://{}{}", ep.https, crate::http::JWKS_PATH);
            println!("  clients      admin, marketplace, wallet-gateway (--as NAME)");
            print!("{report}");
            println!("ready");
            Ok(())
        })
        .await
    })
}

/// `keyward serve`.
pub fn serve(config_path: &Path) -> anyhow::Result<()> {
    let mut config = Config::load(config_path)?;
    before_threads(&mut config)?;
    run_blocking(run(config, |_| Ok(())))
}

/// `keyward init`.
pub fn init(config_path: &Path) -> anyhow::Result<()> {
    let mut config = Config::load(config_path)?;
    before_threads(&mut config)?;
    if crate::policy::install_defaults(&config.policy.dir)? {
        println!("default policy set written to {}", config.policy.dir.display());
    }
    run_blocking(async move {
        let hsm = server::open_hsm(&config).await?;
        let kek = server::init_token(hsm.clone()).await?;
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
