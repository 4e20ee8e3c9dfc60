//! The `shoal-agent` binary, built inside the test package so process-level tests can find it
//! through `CARGO_BIN_EXE_agent-under-test` (cargo only sets that for a package's own binaries).

fn main() -> std::process::ExitCode {
    shoal_agent::cli::main()
}
