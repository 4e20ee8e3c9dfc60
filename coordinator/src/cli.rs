//! The command line: `user add|remove|list` and `cert init`. The binary parses, sets up
//! tracing and maps [`CliError`] to an exit code; everything else is here.

use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use rustix::termios::{LocalModes, OptionalActions, Termios, tcgetattr, tcsetattr};

use crate::certs::{self, CertError, CertInitOptions};
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
    /// Manage users of an htpasswd file.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage TLS certificates.
    #[command(subcommand)]
    Cert(CertCommand),
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
    #[error("standard input is not a terminal: pass --password-stdin and write the password to it")]
    NoTerminal,
    #[error("passwords do not match")]
    PasswordMismatch,
    #[error("cannot read the password: {0}")]
    ReadPassword(io::Error),
    #[error("cannot write output: {0}")]
    Output(io::Error),
}

impl CliError {
    /// 1 for every failure; clap uses 2 for usage errors before we get here.
    pub fn exit_code(&self) -> u8 {
        1
    }
}

/// Runs a parsed command, writing its report to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<(), CliError> {
    match cli.command {
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
    }
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
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
