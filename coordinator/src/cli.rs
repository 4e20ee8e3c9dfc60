//! The command line: `serve`, `user add|remove|list`, `cert init`, `node revoke|unrevoke|
//! list-revoked` and `cluster token|pin`. The binary calls
//! [`main`]; everything else is here. Exit codes: 0 success, 1 failure, 2 bad configuration
//! or usage.

use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use rustix::termios::{LocalModes, OptionalActions, Termios, tcgetattr, tcsetattr};

use crate::certs::{self, CertError, CertInitOptions};
use crate::config::{Config, ConfigError, LogFormat, Overrides};
use crate::htpasswd::Scheme;
use crate::users::{self, AddOutcome, UsersError};

/// Longest password line read.
const MAX_PASSWORD_LINE: u64 = 4096;

#[derive(Debug, Parser)]
#[command(
    name = "shoal-coordinator",
    version,
    about = "Shoal coordinator: registry front door, cluster CA and tracker"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the registry front door until SIGTERM (SIGHUP reloads certificate and users).
    Serve(ServeArgs),
    /// Manage users of an htpasswd file.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage TLS certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Revoke and list cluster nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Cluster enrollment helpers: bootstrap tokens, the front door pin.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Revoke a node (all its certificates; it may not enroll again) or one certificate by
    /// serial. Running coordinators apply it within a second; copy the file to every
    /// coordinator of the cluster.
    Revoke(RevokeArgs),
    /// Undo a revocation.
    Unrevoke(RevokeArgs),
    /// Print the revocation list.
    ListRevoked {
        /// Revocation list file [default: revoked in the cluster data directory].
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The revocation list (the `[cluster] revoked_file`, by default `revoked` in the
    /// cluster data directory).
    #[arg(long, value_name = "FILE")]
    pub file: PathBuf,
    /// The node name.
    #[arg(required_unless_present = "serial")]
    pub name: Option<String>,
    /// One certificate's serial number (hex) instead of a whole node.
    #[arg(long, value_name = "HEX")]
    pub serial: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Generate a bootstrap token and append it to the token file (created with mode 0600).
    Token {
        /// The `[cluster] bootstrap_tokens_file`.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
    /// Print the `ca_pin` agents can use to trust the front door when enrolling: the
    /// SHA-256 of the public key of a CA certificate (e.g. the `ca.crt` of `cert init`).
    Pin {
        /// CA certificate, PEM.
        #[arg(value_name = "CA_CERT")]
        cert: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file (deploy/coordinator.toml documents every setting).
    #[arg(short, long, value_name = "FILE", env = "SHOAL_COORDINATOR_CONFIG")]
    pub config: PathBuf,
    /// Check the configuration, print the result, and exit.
    #[arg(long)]
    pub check_config: bool,
    #[command(flatten)]
    pub overrides: Overrides,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user, or replace an existing user's password (bcrypt). Creates the file
    /// (mode 0600) if needed.
    Add(UserAddArgs),
    /// Remove a user.
    Remove {
        #[arg(long)]
        file: PathBuf,
        user: String,
    },
    /// List users and their hash formats (tab-separated).
    List {
        #[arg(long)]
        file: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct UserAddArgs {
    #[arg(long)]
    pub file: PathBuf,
    pub user: String,
    /// bcrypt cost (4 to 17).
    #[arg(long, default_value_t = users::DEFAULT_COST)]
    pub cost: u32,
    /// Read the password from the first line of standard input instead of prompting.
    #[arg(long)]
    pub password_stdin: bool,
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Create a CA and a server certificate signed by it, and print what clients need.
    Init(CertInitArgs),
}

#[derive(Debug, Args)]
pub struct CertInitArgs {
    /// DNS name of the coordinator (repeatable).
    #[arg(long = "host", value_name = "NAME")]
    pub hosts: Vec<String>,
    /// IP address of the coordinator (repeatable).
    #[arg(long = "ip", value_name = "ADDR")]
    pub ips: Vec<IpAddr>,
    /// Directory for ca.crt, ca.key, server.crt and server.key.
    #[arg(long)]
    pub out: PathBuf,
    /// Validity of the server certificate in days.
    #[arg(long, default_value_t = certs::DEFAULT_SERVER_DAYS)]
    pub days: u32,
    /// Validity of the CA certificate in days.
    #[arg(long, default_value_t = certs::DEFAULT_CA_DAYS)]
    pub ca_days: u32,
    /// HTTPS port clients will use; only changes the printed instructions.
    #[arg(long, default_value_t = 443)]
    pub port: u16,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
    /// Sign the server certificate with the CA already in --out (renewal, new names).
    #[arg(long)]
    pub reuse_ca: bool,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Users(#[from] UsersError),
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0:#}")]
    Serve(anyhow::Error),
    #[error("standard input is not a terminal: pass --password-stdin and write the password to it")]
    NoTerminal,
    #[error("passwords do not match")]
    PasswordMismatch,
    #[error("cannot read the password: {0}")]
    ReadPassword(io::Error),
    #[error("cannot write output: {0}")]
    Output(io::Error),
    #[error(transparent)]
    Revoke(#[from] crate::cluster::revoke::RevokeError),
    #[error("{0}")]
    Cluster(String),
}

impl CliError {
    /// 2 for a bad configuration (like clap's usage errors), 1 for any other failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) => 2,
            _ => 1,
        }
    }
}

/// Runs `shoal-coordinator` as the binary does: parse, set up tracing, run, exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        command => {
            init_tracing(LogFormat::Text, "info");
            let mut stdout = io::stdout().lock();
            let result = run(Cli { command }, &mut stdout);
            let _ = stdout.flush();
            result
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("shoal-coordinator: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

fn init_tracing(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// `serve`: load and check the config, bind, run until SIGTERM or Ctrl-C.
fn serve(args: ServeArgs) -> Result<(), CliError> {
    let config = Config::load(&args.config, &args.overrides)?;
    if args.check_config {
        println!("configuration is valid: {config:#?}");
        return Ok(());
    }
    init_tracing(config.log.format, &config.log.level);
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| CliError::Serve(anyhow::anyhow!("cannot start the async runtime: {e}")))?;
    runtime
        .block_on(async {
            use anyhow::Context as _;
            let bind = |addr: std::net::SocketAddr, what: &'static str| async move {
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} ({what})"))
            };
            let https = bind(config.server.listen, "server.listen").await?;
            let http = match config.server.insecure_http_listen {
                Some(a) => Some(bind(a, "server.insecure_http_listen").await?),
                None => None,
            };
            let metrics = match config.metrics_listen {
                Some(a) => Some(bind(a, "metrics.listen").await?),
                None => None,
            };
            let cluster = match &config.cluster {
                Some(c) => Some(std::net::UdpSocket::bind(c.listen).with_context(|| {
                    format!("cannot listen on {} (cluster.listen, UDP)", c.listen)
                })?),
                None => None,
            };
            let listeners = crate::Listeners {
                https,
                http,
                metrics,
                cluster,
            };
            crate::run(config, listeners, shutdown_signal()).await?;
            Ok::<(), anyhow::Error>(())
        })
        .map_err(CliError::Serve)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: shutting down"),
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot install a SIGTERM handler; only Ctrl-C stops");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs a parsed `user` or `cert` command, writing its report to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<(), CliError> {
    match cli.command {
        Command::Serve(_) => Err(CliError::Serve(anyhow::anyhow!(
            "serve runs through cli::main, not cli::run"
        ))),
        Command::User(UserCommand::Add(args)) => {
            users::validate_user_name(&args.user)?;
            let password = read_password(args.password_stdin)?;
            let outcome = users::add_user(&args.file, &args.user, &password, args.cost)?;
            let verb = match outcome {
                AddOutcome::Added => "added user",
                AddOutcome::Replaced => "replaced the password of user",
            };
            writeln!(out, "{verb} {} in {}", args.user, args.file.display())
                .map_err(CliError::Output)
        }
        Command::User(UserCommand::Remove { file, user }) => {
            users::remove_user(&file, &user)?;
            writeln!(out, "removed user {user} from {}", file.display()).map_err(CliError::Output)
        }
        Command::User(UserCommand::List { file }) => {
            for info in users::list_users(&file)? {
                let note = match info.scheme {
                    Scheme::Bcrypt { .. } => "",
                    Scheme::Apr1Md5 | Scheme::Sha1 => "\tweak: re-add with `user add` for bcrypt",
                };
                writeln!(out, "{}\t{}{note}", info.user, info.scheme).map_err(CliError::Output)?;
            }
            Ok(())
        }
        Command::Cert(CertCommand::Init(args)) => {
            let report = certs::cert_init(&CertInitOptions {
                hosts: args.hosts,
                ips: args.ips,
                out_dir: args.out,
                server_days: args.days,
                ca_days: args.ca_days,
                force: args.force,
                reuse_ca: args.reuse_ca,
            })?;
            out.write_all(certs::client_instructions(&report, args.port).as_bytes())
                .map_err(CliError::Output)
        }
        Command::Node(NodeCommand::Revoke(args)) => revoke(args, true, out),
        Command::Node(NodeCommand::Unrevoke(args)) => revoke(args, false, out),
        Command::Node(NodeCommand::ListRevoked { file }) => {
            let set = crate::cluster::revoke::RevokedSet::load(&file)?;
            for n in &set.nodes {
                writeln!(out, "node\t{n}").map_err(CliError::Output)?;
            }
            for s in &set.serials {
                writeln!(out, "serial\t{s}").map_err(CliError::Output)?;
            }
            Ok(())
        }
        Command::Cluster(ClusterCommand::Token { file }) => {
            use std::os::unix::fs::OpenOptionsExt as _;
            let token = crate::cluster::tokens::generate();
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&file)
                .map_err(|e| CliError::Cluster(format!("{}: {e}", file.display())))?;
            writeln!(f, "{token}")
                .map_err(|e| CliError::Cluster(format!("{}: {e}", file.display())))?;
            // Printed once, for the operator to hand to new nodes.
            writeln!(out, "{token}").map_err(CliError::Output)
        }
        Command::Cluster(ClusterCommand::Pin { cert }) => {
            use rustls_pki_types::pem::PemObject as _;
            let der = rustls_pki_types::CertificateDer::from_pem_file(&cert)
                .map_err(|e| CliError::Cluster(format!("{}: {e}", cert.display())))?;
            let pin = shoal_agent::cluster::spki_pin(&der)
                .map_err(|e| CliError::Cluster(format!("{}: {e}", cert.display())))?;
            writeln!(out, "sha256:{}", hex::encode(pin)).map_err(CliError::Output)
        }
    }
}

fn revoke(args: RevokeArgs, revoke: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let node = args
        .name
        .as_deref()
        .map(|n| {
            shoal_proto::msg::NodeId::new(n)
                .map_err(|e| CliError::Cluster(format!("node name {n:?}: {e}")))
        })
        .transpose()?;
    let changed =
        crate::cluster::revoke::edit(&args.file, node.as_ref(), args.serial.as_deref(), revoke)?;
    let what = match (&node, &args.serial) {
        (Some(n), Some(s)) => format!("node {n} and serial {s}"),
        (Some(n), None) => format!("node {n}"),
        (None, Some(s)) => format!("serial {s}"),
        (None, None) => String::new(),
    };
    let verb = match (revoke, changed) {
        (true, true) => "revoked",
        (false, true) => "no longer revoked:",
        (true, false) => "already revoked:",
        (false, false) => "was not revoked:",
    };
    writeln!(out, "{verb} {what} ({})", args.file.display()).map_err(CliError::Output)
}

/// From stdin's first line with `--password-stdin`, else from a no-echo prompt on a terminal.
fn read_password(from_stdin: bool) -> Result<Vec<u8>, CliError> {
    let stdin = io::stdin();
    if from_stdin {
        return read_line(&mut stdin.lock()).map_err(CliError::ReadPassword);
    }
    if !stdin.is_terminal() {
        return Err(CliError::NoTerminal);
    }
    let first = prompt(stdin.as_fd(), "Password: ")?;
    let second = prompt(stdin.as_fd(), "Retype password: ")?;
    if first != second {
        return Err(CliError::PasswordMismatch);
    }
    Ok(first)
}

fn prompt(fd: BorrowedFd<'_>, text: &str) -> Result<Vec<u8>, CliError> {
    let mut stderr = io::stderr();
    stderr
        .write_all(text.as_bytes())
        .and_then(|()| stderr.flush())
        .map_err(CliError::Output)?;
    let _echo_off = EchoOff::new(fd).map_err(CliError::ReadPassword)?;
    read_line(&mut io::stdin().lock()).map_err(CliError::ReadPassword)
}

/// Reads one line, without its `\n` or `\r\n`.
fn read_line(input: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    input
        .take(MAX_PASSWORD_LINE + 1)
        .read_until(b'\n', &mut line)?;
    if line.len() as u64 > MAX_PASSWORD_LINE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "password line is too long",
        ));
    }
    if line.ends_with(b"\n") {
        line.pop();
        if line.ends_with(b"\r") {
            line.pop();
        }
    }
    Ok(line)
}

/// Turns terminal echo off (keeping the newline echo) until dropped.
struct EchoOff<'a> {
    fd: BorrowedFd<'a>,
    saved: Termios,
}

impl<'a> EchoOff<'a> {
    fn new(fd: BorrowedFd<'a>) -> io::Result<EchoOff<'a>> {
        let saved = tcgetattr(fd)?;
        let mut quiet = saved.clone();
        quiet.local_modes.remove(LocalModes::ECHO);
        quiet.local_modes.insert(LocalModes::ECHONL);
        tcsetattr(fd, OptionalActions::Now, &quiet)?;
        Ok(EchoOff { fd, saved })
    }
}

impl Drop for EchoOff<'_> {
    fn drop(&mut self) {
        // Nothing sensible to do if restoring fails; the shell's `reset` fixes the terminal.
        let _ = tcsetattr(self.fd, OptionalActions::Now, &self.saved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_line_strips_endings_and_bounds_length() {
        assert_eq!(read_line(&mut &b"pw\r\nrest"[..]).unwrap(), b"pw");
        assert_eq!(read_line(&mut &b"pw"[..]).unwrap(), b"pw");
        assert_eq!(read_line(&mut &b""[..]).unwrap(), b"");
        let long = vec![b'x'; 5000];
        assert!(read_line(&mut &long[..]).is_err());
    }

    #[test]
    fn node_revoke_and_cluster_helpers() {
        let dir = tempfile::tempdir().unwrap();
        let revoked = dir.path().join("revoked");
        let file = revoked.to_str().unwrap();
        let run_args = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).unwrap();
            let mut out = Vec::new();
            run(cli, &mut out).map(|()| String::from_utf8(out).unwrap())
        };
        let out = run_args(&["c", "node", "revoke", "--file", file, "node-7"]).unwrap();
        assert!(out.starts_with("revoked node node-7"), "{out}");
        let out = run_args(&["c", "node", "revoke", "--file", file, "--serial", "0aBc"]).unwrap();
        assert!(out.starts_with("revoked serial"), "{out}");
        let out = run_args(&["c", "node", "list-revoked", "--file", file]).unwrap();
        assert_eq!(out, "node\tnode-7\nserial\tabc\n".replace("abc", "0abc"));
        let out = run_args(&["c", "node", "unrevoke", "--file", file, "node-7"]).unwrap();
        assert!(out.starts_with("no longer revoked"), "{out}");
        assert!(run_args(&["c", "node", "revoke", "--file", file, "bad name"]).is_err());

        let tokens = dir.path().join("tokens");
        let t = run_args(&["c", "cluster", "token", "--file", tokens.to_str().unwrap()]).unwrap();
        let t = t.trim();
        assert_eq!(t.len(), 64);
        let token = shoal_proto::enroll::BootstrapToken::new(t).unwrap();
        assert!(crate::cluster::tokens::check(&tokens, &token).unwrap());

        let tls = dir.path().join("tls");
        certs::cert_init(&CertInitOptions {
            hosts: vec!["reg.example".into()],
            ips: vec![],
            out_dir: tls.clone(),
            server_days: 1,
            ca_days: 1,
            force: false,
            reuse_ca: false,
        })
        .unwrap();
        let pin = run_args(&["c", "cluster", "pin", tls.join("ca.crt").to_str().unwrap()]).unwrap();
        assert!(
            pin.starts_with("sha256:") && pin.trim().len() == 7 + 64,
            "{pin}"
        );
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
