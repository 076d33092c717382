//! The `keyward` command line: daemon commands (dev, serve, init) and client
//! commands that talk to a daemon over mutual TLS.

mod audit;
pub(crate) mod client;
mod daemon;
mod jwks;
mod kek;
mod output;
mod policy;
mod receipt;
mod session;
pub mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::Custody;

/// keyward: custodial key management and signing.
#[derive(Debug, Parser)]
#[command(name = "keyward", version, about)]
pub struct Cli {
    /// Home folder of the dev daemon and of the CLI's client profiles.
    #[arg(long, global = true, env = "KEYWARD_HOME", default_value = ".keyward")]
    pub home: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// How client commands reach the daemon.
    #[command(flatten)]
    pub client: ClientOpts,
    #[command(subcommand)]
    command: Command,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// How client commands reach the daemon.
#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// Client profile in the home folder: admin, marketplace, wallet-gateway.
    #[arg(long = "as", global = true, default_value = "admin")]
    pub profile: String,
    /// gRPC endpoint (default: the one `dev` wrote into the home folder).
    #[arg(long, global = true)]
    pub endpoint: Option<String>,
    /// CA certificate that signed the server's certificate.
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, global = true, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, global = true, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Server name to verify.
    #[arg(long, global = true)]
    pub domain: Option<String>,
    /// Print one JSON object on stdout.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a development daemon: SoftHSM token, SQLite file and dev
    /// certificates under --home, created on first run.
    Dev(daemon::DevArgs),
    /// Start the daemon from a config file.
    Serve {
        /// The TOML config.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Create the key-encryption key on the token and the store's schema
    /// (and, with --init-token, the token itself).
    Init(daemon::InitArgs),
    /// Key-encryption keys: backup, verification and restore (the key
    /// ceremony), and their status. Works on the token and the store directly.
    #[command(subcommand)]
    Kek(kek::KekCmd),
    /// Unwrap every account's keys (nothing cached) and check each against
    /// the account's public keys: exit 1, naming the accounts, on any failure.
    Doctor(kek::DoctorArgs),
    /// Accounts.
    #[command(subcommand)]
    Account(client::AccountCmd),
    /// Signing.
    #[command(subcommand)]
    Sign(client::SignCmd),
    /// Delegated sessions.
    #[command(subcommand)]
    Session(session::SessionCmd),
    /// Issuer keys and the published JWKS.
    #[command(subcommand)]
    Jwks(jwks::JwksCmd),
    /// A software wallet for development and demos (the key sits in a file).
    #[command(subcommand)]
    Wallet(session::WalletCmd),
    /// Verify a compact JWS against the issuer key history and/or a JWKS
    /// (file or https URL): exit 0 with the claims, or 1 with the reason.
    Verify(verify::VerifyArgs),
    /// The tamper-evident audit log: verify, export, prove, archive, tail.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Check, test and explain a Cedar policy set (files only; no daemon).
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Load generator over real mTLS, with raw-crypto baselines measured in the same run.
    Bench(crate::bench::BenchArgs),
    /// A long mixed load with client-cancelled requests against a running
    /// daemon, sampled from its /metrics: PASS, or FAIL (exit 1) on any
    /// failed request, a readiness drop, or memory or fds that keep growing.
    Soak(crate::soak::SoakArgs),
}

/// Custody as a CLI value.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CustodyArg {
    /// Keys stay in the HSM.
    Hsm,
    /// Keys are unwrapped into host memory.
    Host,
}

impl From<CustodyArg> for Custody {
    fn from(c: CustodyArg) -> Custody {
        match c {
            CustodyArg::Hsm => Custody::Hsm,
            CustodyArg::Host => Custody::Host,
        }
    }
}

/// Installs the log subscriber: log lines on stderr (filtered by
/// `RUST_LOG`, default `info`) and, when `telemetry` names a collector,
/// OpenTelemetry spans (their own filter: keyward's DEBUG spans, whatever the
/// log level). Returns the trace pipeline to shut down at exit.
pub(crate) fn init_logging(
    format: LogFormat,
    telemetry: Option<&crate::config::TelemetryConfig>,
) -> Result<Option<crate::telemetry::Telemetry>, crate::telemetry::TelemetryError> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    type Boxed = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let log: Boxed = match format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let mut layers = vec![log];
    let mut pipeline = None;
    if let Some(config) = telemetry {
        if let Some((t, layer)) = crate::telemetry::Telemetry::start::<tracing_subscriber::Registry>(config)? {
            let spans = tracing_subscriber::filter::Targets::new()
                .with_target("keyward", tracing::level_filters::LevelFilter::DEBUG);
            layers.push(layer.with_filter(spans).boxed());
            pipeline = Some(t);
        }
    }
    let _ = tracing_subscriber::registry().with(layers).try_init();
    Ok(pipeline)
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })
}

/// Entry point: parses arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon commands install logging once their config is read (it
    // may name a trace collector).
    if !matches!(cli.command, Command::Dev(_) | Command::Serve { .. }) {
        let _ = init_logging(cli.log_format, None);
    }
    let result = match cli.command {
        Command::Dev(args) => daemon::dev(&cli.home, cli.log_format, args),
        Command::Serve { config } => daemon::serve(&config, cli.log_format),
        Command::Init(args) => daemon::init(args),
        Command::Kek(cmd) => kek::run(cmd),
        Command::Doctor(args) => match kek::doctor(args) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Account(cmd) => match runtime() {
            Ok(rt) => rt.block_on(client::account(&cli.home, &cli.client, cmd)),
            Err(code) => return code,
        },
        Command::Sign(cmd) => match runtime() {
            Ok(rt) => rt.block_on(client::sign(&cli.home, &cli.client, cmd)),
            Err(code) => return code,
        },
        Command::Session(cmd) => match runtime() {
            Ok(rt) => rt.block_on(session::session(&cli.home, &cli.client, cmd)),
            Err(code) => return code,
        },
        Command::Jwks(cmd) => match runtime() {
            Ok(rt) => rt.block_on(jwks::jwks(&cli.home, &cli.client, cmd)),
            Err(code) => return code,
        },
        Command::Wallet(cmd) => session::wallet(&cli.client, cmd),
        Command::Policy(cmd) => match policy::policy(cmd) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Verify(args) => match runtime() {
            Ok(rt) => match rt.block_on(verify::verify(&cli.home, &cli.client, args)) {
                Ok(true) => Ok(()),
                Ok(false) => return ExitCode::FAILURE,
                Err(e) => Err(e),
            },
            Err(code) => return code,
        },
        Command::Audit(cmd) => match runtime() {
            Ok(rt) => match rt.block_on(audit::audit(&cli.home, &cli.client, cmd)) {
                Ok(true) => Ok(()),
                Ok(false) => return ExitCode::FAILURE,
                Err(e) => Err(e),
            },
            Err(code) => return code,
        },
        Command::Soak(args) => match runtime() {
            Ok(rt) => match rt.block_on(crate::soak::run(&cli.home, &cli.client, args)) {
                Ok(true) => Ok(()),
                Ok(false) => return ExitCode::FAILURE,
                Err(e) => Err(e),
            },
            Err(code) => return code,
        },
        Command::Bench(args) => {
            match daemon::prepare_bench(&cli.home, &args).and(runtime().map_err(|_| anyhow::anyhow!("runtime"))) {
                Ok(rt) => rt.block_on(crate::bench::run(&cli.home, &cli.client, args)),
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Key ids are base64url thumbprints: about one in 32 begins with `-`.
    #[test]
    fn a_kid_that_begins_with_a_hyphen_is_a_kid() {
        for kid in ["-B3xg", "--x", "_a-b", "abc"] {
            let cli = Cli::try_parse_from(["keyward", "jwks", "revoke", kid, "--json"])
                .unwrap_or_else(|e| panic!("{kid}: {e}"));
            match cli.command {
                Command::Jwks(jwks::JwksCmd::Revoke { kid: parsed }) => assert_eq!(parsed, kid),
                _ => panic!("{kid}: not jwks revoke"),
            }
            assert!(cli.client.json, "{kid}: --json after the kid is still the flag");
        }
    }
}
