//! The `shoal-agent` command line: parse flags, load the config, set up logging, bind the
//! listeners, run until SIGTERM or Ctrl-C. Exit codes: 0 after a clean stop, 2 for a bad
//! configuration, 1 for any other failure.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{Config, LogFormat, Overrides};
use clap::Parser;
use tokio::net::TcpListener;

/// Shoal node agent: a local pull-through registry mirror for docker, containerd, podman and
/// skopeo, with a verified content-addressed cache on local disk.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// TOML configuration file (see deploy/agent.toml for every setting).
    #[arg(short, long, value_name = "FILE", env = "SHOAL_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Check the configuration, print the result, and exit.
    #[arg(long)]
    check_config: bool,
    #[command(flatten)]
    overrides: Overrides,
}

/// Runs the agent as the `shoal-agent` binary does.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref(), &cli.overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shoal-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        println!("configuration is valid: {config:#?}");
        return ExitCode::SUCCESS;
    }
    init_tracing(config.log.format, &config.log.level);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shoal-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("shoal-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mirror = TcpListener::bind(config.mirror.listen)
        .await
        .with_context(|| format!("cannot listen on {} (mirror.listen)", config.mirror.listen))?;
    let metrics = match config.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (metrics.listen)"))?,
        ),
        None => None,
    };
    let listeners = crate::Listeners { mirror, metrics };
    crate::run(config, listeners, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: shutting down"),
    }
}

fn init_tracing(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
