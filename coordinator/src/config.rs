//! Coordinator configuration: the TOML file (every setting is documented in
//! `deploy/coordinator.toml`), command-line overrides, and the typed, validated [`Config`]
//! built from them.
//!
//! Parse, don't validate: everything is checked here once (URLs, listen addresses, limits,
//! credentials pairs, access rules, which registry is the default), so the gateway works with
//! values that are already correct. Files that are reloaded while running (the TLS
//! certificate and the htpasswd file) are only named here; they are read by `run`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use shoal_agent::upstream::Secret;
use shoal_proto::RegistryHost;
use url::Url;

use crate::access::{AccessConfig, AccessRules, RuleConfig};
use crate::auth::AuthConfig;
use crate::cluster::ClusterSettings;

/// Why a configuration cannot be used. Always names the file or the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// How a pool spreads requests over its replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Each replica in turn; weights are ignored.
    #[default]
    RoundRobin,
    /// Smooth weighted round robin (nginx's algorithm): a replica of weight 2 gets two
    /// requests for every one of a replica of weight 1, interleaved.
    Weighted,
    /// A client address always goes to the same replica while it is available (rendezvous
    /// hashing of the IPv4 address or IPv6 /64, weighted).
    IpHash,
    /// The replica with the fewest requests in flight relative to its weight.
    LeastConn,
    /// Blob and manifest-by-digest requests go to the replica chosen by rendezvous hashing of
    /// the digest, so each replica's cache stays warm; other requests are round robin.
    DigestHash,
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::RoundRobin => "round_robin",
            Policy::Weighted => "weighted",
            Policy::IpHash => "ip_hash",
            Policy::LeastConn => "least_conn",
            Policy::DigestHash => "digest_hash",
        })
    }
}

/// What the coordinator does with an upstream redirect to another host (object storage).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RedirectMode {
    /// Hand the redirect to the client, so blob bytes go straight from storage to it.
    #[default]
    Pass,
    /// Follow it and stream the bytes through the coordinator (for storage that clients
    /// cannot reach). The request to storage never carries credentials.
    Follow,
}

// ---------------------------------------------------------------------------------------------
// The file, as written by people. Every field is optional unless stated.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: FileServer,
    #[serde(default)]
    metrics: FileMetrics,
    #[serde(default)]
    log: FileLog,
    #[serde(default)]
    auth: FileAuth,
    #[serde(default)]
    coalescing: FileCoalescing,
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    access: Vec<RuleConfig>,
    #[serde(default, rename = "registry")]
    registries: Vec<FileRegistry>,
    cluster: Option<FileCluster>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCluster {
    name: Option<String>,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    bootstrap_tokens_file: Option<PathBuf>,
    revoked_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde::option")]
    cert_lifetime: Option<Duration>,
    origin_slots_per_blob: Option<usize>,
    max_peers: Option<usize>,
    #[serde(default, with = "humantime_serde::option")]
    seeder_stall: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    node_ttl: Option<Duration>,
    reports_to_quarantine: Option<usize>,
    #[serde(default, with = "humantime_serde::option")]
    quarantine: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    listen: Option<SocketAddr>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    insecure_http_listen: Option<SocketAddr>,
    external_url: Option<String>,
    realm: Option<String>,
    default_registry: Option<String>,
    max_header_bytes: Option<usize>,
    max_headers: Option<usize>,
    #[serde(default, with = "humantime_serde::option")]
    header_read_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    tls_handshake_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    drain_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    reload_poll: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetrics {
    listen: Option<SocketAddr>,
    enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLog {
    format: Option<LogFormat>,
    level: Option<String>,
    access_log: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    htpasswd: Option<PathBuf>,
    insecure_no_auth: Option<bool>,
    #[serde(default, with = "humantime_serde::option")]
    cache_ttl: Option<Duration>,
    max_failures: Option<u32>,
    #[serde(default, with = "humantime_serde::option")]
    failure_window: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCoalescing {
    enabled: Option<bool>,
    spool_dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRegistry {
    host: String,
    #[serde(default)]
    policy: Policy,
    #[serde(default)]
    redirect: RedirectMode,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    insecure_http: bool,
    #[serde(default, with = "humantime_serde::option")]
    connect_timeout: Option<Duration>,
    #[serde(default)]
    health: FileHealth,
    #[serde(default, rename = "replica")]
    replicas: Vec<FileReplica>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHealth {
    #[serde(default, with = "humantime_serde::option")]
    interval: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    timeout: Option<Duration>,
    path: Option<String>,
    max_fails: Option<u32>,
    #[serde(default, with = "humantime_serde::option")]
    fail_timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileReplica {
    url: String,
    weight: Option<u32>,
    #[serde(default)]
    down: bool,
}

// ---------------------------------------------------------------------------------------------
// Command-line overrides.
// ---------------------------------------------------------------------------------------------

/// Command-line flags of `serve`. Each one overrides the matching file setting.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// HTTPS listen address [default: 0.0.0.0:443; file: server.listen].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Server certificate chain, PEM [file: server.tls_cert].
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key, PEM [file: server.tls_key].
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Also serve plain HTTP on this address: credentials then cross the network in clear
    /// [file: server.insecure_http_listen].
    #[arg(long, value_name = "ADDR")]
    pub insecure_http_listen: Option<SocketAddr>,
    /// URL clients use to reach the coordinator, for Location headers [file: server.external_url].
    #[arg(long, value_name = "URL")]
    pub external_url: Option<String>,
    /// htpasswd file of the front door [file: auth.htpasswd].
    #[arg(long, value_name = "FILE")]
    pub htpasswd: Option<PathBuf>,
    /// Prometheus endpoint address [default: 127.0.0.1:9466; file: metrics.listen].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Turn the metrics endpoint off.
    #[arg(long)]
    pub no_metrics: bool,
    /// Access log: "stdout", "off" or a file path [default: stdout; file: log.access_log].
    #[arg(long, value_name = "TARGET")]
    pub access_log: Option<String>,
    /// Log format [default: text; file: log.format].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. info or shoal_coordinator=debug,info [default: info; file: log.level].
    /// The RUST_LOG environment variable, when set, takes precedence.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The validated configuration.
// ---------------------------------------------------------------------------------------------

pub const DEFAULT_LISTEN: &str = "0.0.0.0:443";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9466";
pub const DEFAULT_REALM: &str = "Shoal registry";
/// Largest request head by default; hyper answers 431 above it.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// hyper's HTTP/1 read buffer cannot be smaller.
pub const MIN_MAX_HEADER_BYTES: usize = 8 * 1024;
pub const MAX_MAX_HEADER_BYTES: usize = 1 << 20;
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// No-progress timeout of a transfer, like `proxy_read_timeout 900` of the classic nginx setup.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(900);

/// Everything the coordinator needs to run, checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    /// `None` when metrics are turned off.
    pub metrics_listen: Option<SocketAddr>,
    pub log: LogConfig,
    /// `None` only with `auth.insecure_no_auth = true`.
    pub auth: Option<AuthSettings>,
    pub coalescing: CoalescingConfig,
    pub registries: Vec<RegistryConfig>,
    /// Index into `registries` of the pool for requests without `?ns=`.
    pub default_registry: usize,
    /// The cluster CA, enrollment and the tracker; `None` without a `[cluster]` section.
    pub cluster: Option<ClusterSettings>,
    /// Where this configuration was read from (`None` for inline text): a reload reads the
    /// access rules from there again.
    pub source: Option<ConfigSource>,
}

/// The file and flags a [`Config`] came from.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub overrides: Overrides,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub insecure_http_listen: Option<SocketAddr>,
    /// Scheme and authority (no path) that Location headers are rewritten to; `None` uses the
    /// scheme of the listener and the request's Host.
    pub external_url: Option<Url>,
    /// The `realm` of the Basic challenge.
    pub realm: String,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    /// Longest time without progress on a request or response body, or while waiting for
    /// upstream's response headers.
    pub idle_timeout: Duration,
    /// How long in-flight requests may continue after shutdown is requested.
    pub drain_timeout: Duration,
    /// How often the certificate and htpasswd files are checked for changes; `None`: only on
    /// SIGHUP.
    pub reload_poll: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
    pub access_log: AccessLogTarget,
}

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stdout,
    File(PathBuf),
    Off,
}

#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub htpasswd: PathBuf,
    pub tuning: AuthConfig,
    pub rules: AccessRules,
}

#[derive(Debug, Clone)]
pub struct CoalescingConfig {
    pub enabled: bool,
    /// Where response bodies shared by coalesced requests are spooled (unlinked temp files).
    pub spool_dir: PathBuf,
}

/// One upstream registry: a pool of replicas serving the same content.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The registry name clients ask for with `?ns=`.
    pub host: RegistryHost,
    pub policy: Policy,
    pub redirect: RedirectMode,
    pub credentials: Option<Credentials>,
    pub ca_file: Option<PathBuf>,
    pub insecure_http: bool,
    pub connect_timeout: Duration,
    pub health: HealthConfig,
    pub replicas: Vec<ReplicaConfig>,
}

/// The coordinator's own credentials for an upstream registry.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// Period of the active check; `GET path` answering 200 or 401 means healthy.
    pub interval: Duration,
    pub timeout: Duration,
    pub path: String,
    /// Consecutive failures (connect errors, timeouts, 5xx) that eject a replica.
    pub max_fails: u32,
    /// How long an ejected replica is left out before it is tried again.
    pub fail_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Scheme and authority only.
    pub url: Url,
    pub weight: u32,
    pub down: bool,
}

impl Config {
    /// Reads `path`, applies `overrides`, and validates the result. Relative paths in the
    /// file resolve against the file's directory.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file = parse_file(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        let mut config = build(file, overrides, path.parent())?;
        config.source = Some(ConfigSource {
            path: path.to_owned(),
            overrides: overrides.clone(),
        });
        Ok(config)
    }

    /// Parses a config from TOML text (relative paths resolve against `base_dir`).
    pub fn from_toml(
        text: &str,
        overrides: &Overrides,
        base_dir: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        let file = parse_file(text).map_err(|message| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            message,
        })?;
        build(file, overrides, base_dir)
    }
}

fn parse_file(text: &str) -> Result<FileConfig, String> {
    toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
}

fn resolve(base: Option<&Path>, p: PathBuf) -> PathBuf {
    match base {
        Some(b) if p.is_relative() => b.join(p),
        _ => p,
    }
}

fn positive(name: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(invalid(format!("{name} must be greater than zero")));
    }
    Ok(d)
}

fn build(file: FileConfig, ov: &Overrides, base: Option<&Path>) -> Result<Config, ConfigError> {
    let server = build_server(file.server, ov, base)?;

    let metrics_listen = if ov.no_metrics || file.metrics.enabled == Some(false) {
        None
    } else {
        Some(
            ov.metrics_listen
                .or(file.metrics.listen)
                .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.parse().expect("constant parses")),
        )
    };

    let log = LogConfig {
        format: ov.log_format.or(file.log.format).unwrap_or_default(),
        level: ov
            .log_level
            .clone()
            .or(file.log.level)
            .unwrap_or_else(|| "info".to_owned()),
        access_log: match ov.access_log.clone().or(file.log.access_log).as_deref() {
            None | Some("stdout") => AccessLogTarget::Stdout,
            Some("off") => AccessLogTarget::Off,
            Some("") => return Err(invalid("log.access_log must not be empty")),
            Some(path) => AccessLogTarget::File(resolve(base, PathBuf::from(path))),
        },
    };
    if tracing_subscriber::EnvFilter::try_new(&log.level).is_err() {
        return Err(invalid(format!(
            "log.level {:?} is not a valid filter",
            log.level
        )));
    }

    let access = AccessConfig {
        groups: file.groups,
        access: file.access,
    };
    let rules = AccessRules::from_config(&access).map_err(|e| invalid(e.to_string()))?;
    let auth = build_auth(file.auth, ov, base, rules)?;

    let coalescing = CoalescingConfig {
        enabled: file.coalescing.enabled.unwrap_or(true),
        spool_dir: file
            .coalescing
            .spool_dir
            .map(|p| resolve(base, p))
            .unwrap_or_else(std::env::temp_dir),
    };

    let mut registries = Vec::new();
    for (i, r) in file.registries.into_iter().enumerate() {
        registries.push(
            build_registry(r, base)
                .map_err(|e| invalid(format!("[[registry]] entry {}: {e}", i + 1)))?,
        );
    }
    if registries.is_empty() {
        return Err(invalid(
            "no upstream registry configured: add a [[registry]] section with at least one [[registry.replica]]",
        ));
    }
    let mut seen = BTreeSet::new();
    for r in &registries {
        if !seen.insert(r.host.clone()) {
            return Err(invalid(format!("registry {} is configured twice", r.host)));
        }
    }
    let default_registry = match &server.default_registry {
        None if registries.len() == 1 => 0,
        None => {
            return Err(invalid(
                "several [[registry]] sections: set server.default_registry to the one used for \
                 requests without ?ns=",
            ));
        }
        Some(name) => {
            let host = RegistryHost::parse(name)
                .map_err(|e| invalid(format!("server.default_registry {name:?}: {e}")))?;
            registries
                .iter()
                .position(|r| r.host == host)
                .ok_or_else(|| {
                    invalid(format!(
                        "server.default_registry {host} is not one of the configured registries ({})",
                        registries
                            .iter()
                            .map(|r| r.host.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?
        }
    };

    let cluster = file
        .cluster
        .map(|c| build_cluster(c, base))
        .transpose()
        .map_err(|e| invalid(format!("[cluster] {e}")))?;

    Ok(Config {
        server: server.config,
        metrics_listen,
        log,
        auth,
        coalescing,
        registries,
        default_registry,
        cluster,
        source: None,
    })
}

/// UDP address of the control channel by default.
pub const DEFAULT_CLUSTER_LISTEN: &str = "0.0.0.0:7471";
pub const DEFAULT_CLUSTER_DATA_DIR: &str = "/var/lib/shoal/coordinator/cluster";

fn build_cluster(c: FileCluster, base: Option<&Path>) -> Result<ClusterSettings, String> {
    use shoal_proto::enroll::is_dns_compatible;
    use shoal_proto::msg::NodeId;

    let name = c
        .name
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .ok_or("name is not set and the host name cannot be read")?;
    let name = NodeId::new(&name)
        .ok()
        .filter(|n| is_dns_compatible(n.as_str()))
        .ok_or_else(|| {
            format!("name {name:?} must be a DNS-style name (letters, digits, '-', '_', dots)")
        })?;
    let data_dir = c
        .data_dir
        .map(|p| resolve(base, p))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CLUSTER_DATA_DIR));
    let tokens = c
        .bootstrap_tokens_file
        .map(|p| resolve(base, p))
        .ok_or("bootstrap_tokens_file is required (one bootstrap token per line)")?;
    let revoked_file = c
        .revoked_file
        .map(|p| resolve(base, p))
        .unwrap_or_else(|| data_dir.join(crate::cluster::REVOKED_FILE));
    let cert_lifetime = c.cert_lifetime.unwrap_or(Duration::from_secs(24 * 3600));
    if cert_lifetime < Duration::from_secs(2) || cert_lifetime > Duration::from_secs(366 * 86400) {
        return Err(format!(
            "cert_lifetime {cert_lifetime:?} must be within 2s..=366d"
        ));
    }
    let mut tracker = shoal_proto::tracker::TrackerConfig::default();
    if let Some(n) = c.origin_slots_per_blob {
        if n == 0 {
            return Err("origin_slots_per_blob must be at least 1".into());
        }
        tracker.origin_slots_per_blob = n;
    }
    if let Some(n) = c.max_peers {
        if !(1..=shoal_proto::msg::MAX_PEERS).contains(&n) {
            return Err(format!(
                "max_peers must be within 1..={}",
                shoal_proto::msg::MAX_PEERS
            ));
        }
        tracker.max_peers = n;
    }
    if let Some(n) = c.reports_to_quarantine {
        if n == 0 {
            return Err("reports_to_quarantine must be at least 1".into());
        }
        tracker.reports_to_quarantine = n;
    }
    for (field, value, slot) in [
        ("seeder_stall", c.seeder_stall, &mut tracker.seeder_stall),
        ("node_ttl", c.node_ttl, &mut tracker.node_ttl),
        ("quarantine", c.quarantine, &mut tracker.quarantine),
    ] {
        if let Some(v) = value {
            if v.is_zero() {
                return Err(format!("{field} must be greater than zero"));
            }
            *slot = v;
        }
    }
    tracker.seed = rand::random();
    Ok(ClusterSettings {
        name,
        listen: c
            .listen
            .unwrap_or_else(|| DEFAULT_CLUSTER_LISTEN.parse().expect("constant parses")),
        data_dir,
        tokens_file: tokens,
        revoked_file,
        cert_lifetime,
        tracker,
    })
}

struct BuiltServer {
    config: ServerConfig,
    default_registry: Option<String>,
}

fn build_server(
    s: FileServer,
    ov: &Overrides,
    base: Option<&Path>,
) -> Result<BuiltServer, ConfigError> {
    let listen = ov
        .listen
        .or(s.listen)
        .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("constant parses"));
    let tls_cert = ov
        .tls_cert
        .clone()
        .or_else(|| s.tls_cert.map(|p| resolve(base, p)))
        .ok_or_else(|| invalid("server.tls_cert is required (the HTTPS certificate chain, PEM)"))?;
    let tls_key = ov
        .tls_key
        .clone()
        .or_else(|| s.tls_key.map(|p| resolve(base, p)))
        .ok_or_else(|| invalid("server.tls_key is required (the HTTPS private key, PEM)"))?;
    let insecure_http_listen = ov.insecure_http_listen.or(s.insecure_http_listen);
    let external_url = match ov.external_url.clone().or(s.external_url) {
        None => None,
        Some(text) => Some(
            parse_origin(&text)
                .map_err(|e| invalid(format!("server.external_url {text:?}: {e}")))?,
        ),
    };
    let realm = s.realm.unwrap_or_else(|| DEFAULT_REALM.to_owned());
    if realm.is_empty()
        || realm.len() > 200
        || realm
            .chars()
            .any(|c| c == '"' || c == '\\' || c.is_control() || !c.is_ascii())
    {
        return Err(invalid(
            "server.realm must be 1 to 200 printable ASCII characters without '\"' or '\\'",
        ));
    }
    let max_header_bytes = s.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES);
    if !(MIN_MAX_HEADER_BYTES..=MAX_MAX_HEADER_BYTES).contains(&max_header_bytes) {
        return Err(invalid(format!(
            "server.max_header_bytes = {max_header_bytes} must be within {MIN_MAX_HEADER_BYTES}..={MAX_MAX_HEADER_BYTES}"
        )));
    }
    let max_headers = s.max_headers.unwrap_or(DEFAULT_MAX_HEADERS);
    if !(16..=1000).contains(&max_headers) {
        return Err(invalid(format!(
            "server.max_headers = {max_headers} must be within 16..=1000"
        )));
    }
    let reload_poll = match s.reload_poll {
        None => Some(Duration::from_secs(5)),
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
    };
    Ok(BuiltServer {
        config: ServerConfig {
            listen,
            tls_cert,
            tls_key,
            insecure_http_listen,
            external_url,
            realm,
            max_header_bytes,
            max_headers,
            header_read_timeout: positive(
                "server.header_read_timeout",
                s.header_read_timeout.unwrap_or(Duration::from_secs(30)),
            )?,
            tls_handshake_timeout: positive(
                "server.tls_handshake_timeout",
                s.tls_handshake_timeout.unwrap_or(Duration::from_secs(10)),
            )?,
            idle_timeout: positive(
                "server.idle_timeout",
                s.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT),
            )?,
            drain_timeout: s.drain_timeout.unwrap_or(Duration::from_secs(30)),
            reload_poll,
        },
        default_registry: s.default_registry,
    })
}

fn build_auth(
    a: FileAuth,
    ov: &Overrides,
    base: Option<&Path>,
    rules: AccessRules,
) -> Result<Option<AuthSettings>, ConfigError> {
    let htpasswd = ov
        .htpasswd
        .clone()
        .or_else(|| a.htpasswd.map(|p| resolve(base, p)));
    let no_auth = a.insecure_no_auth.unwrap_or(false);
    let htpasswd = match (htpasswd, no_auth) {
        (Some(_), true) => {
            return Err(invalid(
                "auth.htpasswd and auth.insecure_no_auth = true contradict each other; keep one",
            ));
        }
        (None, true) => {
            if rules.is_enabled() {
                return Err(invalid(
                    "[[access]] rules need authenticated users, but auth.insecure_no_auth = true",
                ));
            }
            return Ok(None);
        }
        (None, false) => {
            return Err(invalid(
                "auth.htpasswd is required; set auth.insecure_no_auth = true to let anyone who \
                 reaches the coordinator pull and push without credentials",
            ));
        }
        (Some(p), false) => p,
    };
    let defaults = AuthConfig::default();
    let tuning = AuthConfig {
        cache_ttl: a.cache_ttl.unwrap_or(defaults.cache_ttl),
        max_failures: a.max_failures.unwrap_or(defaults.max_failures),
        failure_window: positive(
            "auth.failure_window",
            a.failure_window.unwrap_or(defaults.failure_window),
        )?,
        ..defaults
    };
    if tuning.max_failures == 0 {
        return Err(invalid("auth.max_failures must be at least 1"));
    }
    Ok(Some(AuthSettings {
        htpasswd,
        tuning,
        rules,
    }))
}

/// Parses an `http(s)://host[:port]` URL with nothing else (a trailing `/` is allowed).
fn parse_origin(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("not a valid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("scheme {:?} is not http or https", url.scheme()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain credentials".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    if url.path() != "/" {
        return Err("must not have a path (serving under a path prefix is not supported)".into());
    }
    Ok(url)
}

fn build_registry(r: FileRegistry, base: Option<&Path>) -> Result<RegistryConfig, String> {
    let host = RegistryHost::parse(&r.host).map_err(|e| format!("host {:?}: {e}", r.host))?;
    if r.replicas.is_empty() {
        return Err(format!(
            "registry {host} has no [[registry.replica]] (each needs a url)"
        ));
    }
    let mut replicas = Vec::new();
    for (i, rep) in r.replicas.into_iter().enumerate() {
        let n = i + 1;
        let url =
            parse_origin(&rep.url).map_err(|e| format!("replica {n} url {:?}: {e}", rep.url))?;
        if url.scheme() == "http" && !r.insecure_http {
            return Err(format!(
                "replica {n} url {:?} is plain HTTP; set insecure_http = true on the registry to allow it",
                rep.url
            ));
        }
        let weight = rep.weight.unwrap_or(1);
        if !(1..=1000).contains(&weight) {
            return Err(format!(
                "replica {n} weight {weight} must be within 1..=1000"
            ));
        }
        if replicas.iter().any(|x: &ReplicaConfig| x.url == url) {
            return Err(format!("replica url {url} is listed twice"));
        }
        replicas.push(ReplicaConfig {
            url,
            weight,
            down: rep.down,
        });
    }
    if replicas.iter().all(|x| x.down) {
        return Err(format!("every replica of registry {host} is marked down"));
    }
    let password = match (r.password, r.password_file) {
        (Some(_), Some(_)) => return Err("set either password or password_file, not both".into()),
        (Some(p), None) => Some(Secret::new(p)),
        (None, Some(f)) => {
            let f = resolve(base, f);
            let text = std::fs::read_to_string(&f)
                .map_err(|e| format!("cannot read password_file {}: {e}", f.display()))?;
            Some(Secret::new(text.trim_end_matches(['\r', '\n']).to_owned()))
        }
        (None, None) => None,
    };
    let credentials = match (r.username, password) {
        (None, None) => None,
        (Some(username), Some(password)) => {
            if username.is_empty()
                || username.contains(':')
                || username.chars().any(char::is_control)
            {
                return Err("username must be non-empty, without ':' or control characters".into());
            }
            Some(Credentials { username, password })
        }
        (Some(_), None) => return Err("a username needs a password or password_file".into()),
        (None, Some(_)) => return Err("a password needs a username".into()),
    };
    let ca_file = r.ca_file.map(|p| resolve(base, p));
    if let Some(ca) = &ca_file
        && !ca.is_file()
    {
        return Err(format!("ca_file {} does not exist", ca.display()));
    }
    let h = r.health;
    let path = h.path.unwrap_or_else(|| "/v2/".to_owned());
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("health.path {path:?} must be an absolute path"));
    }
    let dur = |name: &str, d: Option<Duration>, default: u64| {
        let d = d.unwrap_or(Duration::from_secs(default));
        if d.is_zero() {
            Err(format!("{name} must be greater than zero"))
        } else {
            Ok(d)
        }
    };
    let health = HealthConfig {
        interval: dur("health.interval", h.interval, 5)?,
        timeout: dur("health.timeout", h.timeout, 2)?,
        path,
        max_fails: match h.max_fails.unwrap_or(3) {
            0 => return Err("health.max_fails must be at least 1".into()),
            n => n,
        },
        fail_timeout: dur("health.fail_timeout", h.fail_timeout, 10)?,
    };
    Ok(RegistryConfig {
        host,
        policy: r.policy,
        redirect: r.redirect,
        credentials,
        ca_file,
        insecure_http: r.insecure_http,
        connect_timeout: dur("connect_timeout", r.connect_timeout, 5)?,
        health,
        replicas,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, &Overrides::default(), None)
    }

    const MINIMAL: &str = r#"
        [server]
        tls_cert = "/etc/shoal/server.crt"
        tls_key = "/etc/shoal/server.key"
        [auth]
        htpasswd = "/etc/shoal/htpasswd"
        [[registry]]
        host = "registry.example.com"
        [[registry.replica]]
        url = "https://10.0.0.1:5000"
    "#;

    #[test]
    fn minimal_config_has_safe_defaults() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(c.server.listen.to_string(), DEFAULT_LISTEN);
        assert!(c.server.insecure_http_listen.is_none());
        assert_eq!(c.server.idle_timeout, Duration::from_secs(900));
        assert_eq!(c.server.max_header_bytes, DEFAULT_MAX_HEADER_BYTES);
        assert_eq!(
            c.metrics_listen.unwrap().to_string(),
            DEFAULT_METRICS_LISTEN
        );
        assert_eq!(c.log.access_log, AccessLogTarget::Stdout);
        assert!(c.auth.is_some());
        assert!(c.coalescing.enabled);
        let r = &c.registries[0];
        assert_eq!(r.policy, Policy::RoundRobin);
        assert_eq!(r.redirect, RedirectMode::Pass);
        assert_eq!(r.health.path, "/v2/");
        assert_eq!(r.replicas[0].weight, 1);
        assert_eq!(c.default_registry, 0);
    }

    #[test]
    fn rejects_bad_configs_with_a_clear_message() {
        let registry =
            "[[registry]]\nhost = \"r.io\"\n[[registry.replica]]\nurl = \"https://r.io\"\n";
        let tls = "[server]\ntls_cert = \"c\"\ntls_key = \"k\"\n";
        let auth = "[auth]\nhtpasswd = \"h\"\n";
        let cases: Vec<(String, &str)> = vec![
            (format!("{tls}{auth}"), "no upstream registry"),
            (format!("{auth}{registry}"), "server.tls_cert is required"),
            (format!("{tls}{registry}"), "auth.htpasswd is required"),
            (
                format!("{tls}[auth]\nhtpasswd = \"h\"\ninsecure_no_auth = true\n{registry}"),
                "contradict",
            ),
            (
                format!(
                    "{tls}[auth]\ninsecure_no_auth = true\n[[access]]\nusers = [\"a\"]\nrepositories = [\"*\"]\nactions = [\"pull\"]\n{registry}"
                ),
                "need authenticated users",
            ),
            (format!("{tls}{auth}{registry}bogus = 1\n"), "unknown field"),
            (
                format!(
                    "{tls}{auth}[[registry]]\nhost = \"r.io\"\n[[registry.replica]]\nurl = \"http://r.io\"\n"
                ),
                "plain HTTP",
            ),
            (
                format!("{tls}{auth}[[registry]]\nhost = \"r.io\"\n"),
                "has no [[registry.replica]]",
            ),
            (
                format!(
                    "{tls}{auth}[[registry]]\nhost = \"r.io\"\npolicy = \"random\"\n[[registry.replica]]\nurl = \"https://r.io\"\n"
                ),
                "unknown variant",
            ),
            (
                format!(
                    "{tls}{auth}[[registry]]\nhost = \"r.io\"\n[[registry.replica]]\nurl = \"https://r.io/prefix\"\n"
                ),
                "must not have a path",
            ),
            (
                format!(
                    "{tls}{auth}[[registry]]\nhost = \"r.io\"\n[[registry.replica]]\nurl = \"https://r.io\"\ndown = true\n"
                ),
                "marked down",
            ),
            (
                format!(
                    "{tls}{auth}[[registry]]\nhost = \"r.io\"\n[[registry.replica]]\nurl = \"https://r.io\"\nweight = 0\n"
                ),
                "weight 0",
            ),
            (
                format!(
                    "{tls}{auth}[[registry]]\nhost = \"r.io\"\npassword = \"hunter2\"\n[[registry.replica]]\nurl = \"https://r.io\"\n"
                ),
                "needs a username",
            ),
            (
                format!("{tls}{auth}{registry}{registry}"),
                "configured twice",
            ),
            (
                format!(
                    "{tls}{auth}{registry}[[registry]]\nhost = \"s.io\"\n[[registry.replica]]\nurl = \"https://s.io\"\n"
                ),
                "set server.default_registry",
            ),
            (
                format!(
                    "[server]\ntls_cert = \"c\"\ntls_key = \"k\"\nmax_header_bytes = 100\n{auth}{registry}"
                ),
                "max_header_bytes",
            ),
            (
                format!(
                    "[server]\ntls_cert = \"c\"\ntls_key = \"k\"\nexternal_url = \"ftp://x\"\n{auth}{registry}"
                ),
                "external_url",
            ),
            (
                format!(
                    "[server]\ntls_cert = \"c\"\ntls_key = \"k\"\nidle_timeout = \"soon\"\n{auth}{registry}"
                ),
                "idle_timeout",
            ),
            (
                format!(
                    "{tls}{auth}[[access]]\ngroups = [\"ops\"]\nrepositories = [\"*\"]\nactions = [\"pull\"]\n{registry}"
                ),
                "not defined under [groups]",
            ),
        ];
        for (text, want) in cases {
            let err = load(&text).expect_err(&text).to_string();
            assert!(err.contains(want), "{text:?}: got {err:?}, want {want:?}");
            assert!(!err.contains("hunter2"), "secret leaked: {err}");
        }
    }

    #[test]
    fn flags_override_the_file() {
        let ov = Overrides {
            listen: Some("127.0.0.2:8443".parse().unwrap()),
            insecure_http_listen: Some("127.0.0.1:8080".parse().unwrap()),
            external_url: Some("https://reg.example:8443".into()),
            no_metrics: true,
            access_log: Some("off".into()),
            ..Overrides::default()
        };
        let c = Config::from_toml(MINIMAL, &ov, None).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.2:8443");
        assert_eq!(
            c.server.insecure_http_listen.unwrap().to_string(),
            "127.0.0.1:8080"
        );
        assert_eq!(
            c.server.external_url.unwrap().as_str(),
            "https://reg.example:8443/"
        );
        assert!(c.metrics_listen.is_none());
        assert_eq!(c.log.access_log, AccessLogTarget::Off);
    }

    #[test]
    fn the_deploy_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/coordinator.toml");
        let c = Config::load(&path, &Overrides::default()).unwrap();
        assert_eq!(c.registries.len(), 2);
        assert_eq!(
            c.registries[c.default_registry].host.as_str(),
            "registry.example.com"
        );
        let pool = &c.registries[0];
        assert_eq!(pool.policy, Policy::Weighted);
        assert_eq!(pool.replicas.len(), 3);
        assert_eq!(pool.replicas[0].weight, 2);
        assert!(pool.replicas[2].down);
        assert_eq!(c.registries[1].policy, Policy::DigestHash);
        assert_eq!(c.registries[1].redirect, RedirectMode::Follow);
        assert!(c.auth.as_ref().unwrap().rules.is_enabled());
    }

    #[test]
    fn cluster_section_parses_and_is_checked() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/coordinator.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let start = text.find("# --- [cluster] example begin").unwrap();
        let end = text.find("# --- [cluster] example end").unwrap();
        let example: String = text[start..end]
            .lines()
            .skip(1)
            .map(|l| format!("{}\n", l.strip_prefix("# ").unwrap_or(l)))
            .collect();
        let c = load(&format!("{MINIMAL}\n{example}")).unwrap();
        let cl = c.cluster.expect("cluster configured");
        assert_eq!(cl.name.as_str(), "coord-a");
        assert_eq!(cl.listen.to_string(), "0.0.0.0:7471");
        assert_eq!(cl.cert_lifetime, Duration::from_secs(24 * 3600));
        assert_eq!(
            cl.revoked_file,
            PathBuf::from("/var/lib/shoal/coordinator/cluster/revoked")
        );
        assert_eq!(cl.tracker.origin_slots_per_blob, 1);
        assert_eq!(cl.tracker.quarantine, Duration::from_secs(600));
        assert!(load(MINIMAL).unwrap().cluster.is_none());

        let base = format!("{MINIMAL}\n[cluster]\nname = \"c1\"\n");
        let tokens = "bootstrap_tokens_file = \"/etc/t\"\n";
        let cases = [
            (base.clone(), "bootstrap_tokens_file is required"),
            (
                format!("{base}{tokens}cert_lifetime = \"1s\"\n"),
                "cert_lifetime",
            ),
            (
                format!("{base}{tokens}origin_slots_per_blob = 0\n"),
                "origin_slots_per_blob",
            ),
            (format!("{base}{tokens}max_peers = 1000\n"), "max_peers"),
            (
                format!("{base}{tokens}seeder_stall = \"0s\"\n"),
                "seeder_stall",
            ),
            (base.replace("c1", "bad name") + tokens, "DNS-style"),
            (format!("{base}{tokens}bogus = 1\n"), "unknown field"),
        ];
        for (text, want) in cases {
            let err = load(&text).expect_err(&text).to_string();
            assert!(err.contains(want), "got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn password_is_not_in_debug_output() {
        let c = load(&MINIMAL.replace(
            "host = \"registry.example.com\"",
            "host = \"registry.example.com\"\nusername = \"u\"\npassword = \"hunter2\"",
        ))
        .unwrap();
        assert!(c.registries[0].credentials.is_some());
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
