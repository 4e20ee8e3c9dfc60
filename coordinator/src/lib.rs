//! Shoal coordinator: the registry front door (TLS, authentication, access rules), and later
//! the upstream pool, the cluster CA and the tracker.
//!
//! Built so far, as building blocks for the server:
//! - [`htpasswd`]: reads and verifies apache2-utils htpasswd files (bcrypt, APR1-MD5, SHA1);
//! - [`auth`]: the [`auth::Authenticator`] (dummy hash for unknown users, success cache,
//!   per-client failure limit, atomic reload) and `Authorization: Basic` parsing;
//! - [`access`]: per-repository pull/push/delete rules for users and groups;
//! - [`users`]: the `user add|remove|list` editor of htpasswd files;
//! - [`certs`]: `cert init`, a CA and a server certificate made with rcgen;
//! - [`tls`]: the rustls server configuration with a reloadable certificate;
//! - [`config`]: the configuration file and flags of `serve`, validated;
//! - [`cli`]: the command line, so that the binary stays a thin shell.

pub mod access;
pub mod auth;
pub mod certs;
pub mod cli;
pub mod config;
pub mod htpasswd;
pub mod tls;
pub mod users;

mod fsutil;
