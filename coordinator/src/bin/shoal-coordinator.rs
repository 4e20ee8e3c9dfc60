//! `shoal-coordinator`: parses the command line, sets up logging, runs the command from
//! `shoal_coordinator::cli` and turns its result into an exit code (0 success, 1 failure,
//! 2 usage error from clap).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use shoal_coordinator::cli::{self, Cli};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let mut stdout = std::io::stdout().lock();
    let result = cli::run(cli, &mut stdout);
    let _ = stdout.flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("shoal-coordinator: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
