//! `shoal-coordinator`: everything is in `shoal_coordinator::cli` (parsing, tracing setup,
//! exit codes), so the binary stays a thin shell.

fn main() -> std::process::ExitCode {
    shoal_coordinator::cli::main()
}
