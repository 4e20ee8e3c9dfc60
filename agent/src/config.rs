//! Agent configuration: the TOML file (every field documented in `deploy/agent.toml`, the
//! configuration reference), command-line overrides, and the typed, validated [`Config`] built from them.
//!
//! Parse, don't validate: everything is checked here once, so the rest of the agent works with
//! values that are already correct (a loopback-or-explicit listen address, an existing default
//! upstream, watermarks in order, secrets wrapped so they cannot be logged).

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use shoal_proto::RegistryHost;

use crate::cluster::{ClusterConfig, ClusterTimers, CoordinatorAddr, FrontDoorTrust};
use crate::store::StoreConfig;
use crate::upstream::{Secret, UpstreamConfig};

/// Why a configuration cannot be used. Always names the file and the field.
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

/// A byte size written as an integer (`1073741824`) or with a unit (`50GiB`, `500MB`, `1.5TiB`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "m" | "mb" => 1000_u64.pow(2),
            "g" | "gb" => 1000_u64.pow(3),
            "t" | "tb" => 1000_u64.pow(4),
            "ki" | "kib" => 1 << 10,
            "mi" | "mib" => 1 << 20,
            "gi" | "gib" => 1 << 30,
            "ti" | "tib" => 1 << 40,
            other => return Err(format!("unknown size unit {other:?} in {s:?}")),
        };
        let value: f64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?} (examples: 500MiB, 50GiB, 1073741824)"))?;
        let bytes = value * mult as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(format!("size {s:?} is out of range"));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
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

// ---------------------------------------------------------------------------------------------
// The file, as written by people. Every field is optional and has a documented default.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    mirror: FileMirror,
    #[serde(default)]
    metrics: FileMetrics,
    #[serde(default)]
    log: FileLog,
    #[serde(default)]
    store: FileStore,
    #[serde(default, rename = "upstream")]
    upstreams: Vec<FileUpstream>,
    cluster: Option<FileCluster>,
    #[serde(default)]
    peer: crate::peer::FilePeer,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMirror {
    listen: Option<SocketAddr>,
    insecure_listen_any: Option<bool>,
    default_upstream: Option<String>,
    #[serde(default, with = "humantime_serde::option")]
    tag_cache_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    offline_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    drain_timeout: Option<Duration>,
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStore {
    root: Option<PathBuf>,
    max_size: Option<ByteSize>,
    max_disk_percent: Option<f64>,
    high_watermark: Option<f64>,
    low_watermark: Option<f64>,
    #[serde(default, with = "humantime_serde::option")]
    ingest_max_age: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    maintenance_interval: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    host: String,
    url: String,
    #[serde(default)]
    fallback_urls: Vec<String>,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    insecure_http: bool,
    #[serde(default, with = "humantime_serde::option")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    idle_timeout: Option<Duration>,
    max_retries: Option<u32>,
    #[serde(default, with = "humantime_serde::option")]
    unreachable_hold: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCluster {
    node_name: Option<String>,
    zone: Option<String>,
    peer_listen: Option<SocketAddr>,
    advertise_addr: Option<SocketAddr>,
    state_dir: Option<PathBuf>,
    bootstrap_token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    ca_pin: Option<String>,
    #[serde(default, with = "humantime_serde::option")]
    locate_timeout: Option<Duration>,
    #[serde(default, rename = "coordinator")]
    coordinators: Vec<FileCoordinator>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCoordinator {
    name: String,
    enroll_url: String,
    ctl_addr: String,
}

// ---------------------------------------------------------------------------------------------
// Command-line overrides.
// ---------------------------------------------------------------------------------------------

/// Command-line flags. Each one overrides the matching file setting.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// Address the registry mirror listens on [default: 127.0.0.1:5050; file: mirror.listen].
    /// A non-loopback address also needs --insecure-listen-any.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Allow the mirror to listen on a non-loopback address. Anyone who can reach it can then
    /// pull whatever the agent's upstream credentials allow.
    #[arg(long)]
    pub insecure_listen_any: bool,
    /// Address of the Prometheus metrics endpoint [default: 127.0.0.1:9465; file: metrics.listen].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Turn the metrics endpoint off.
    #[arg(long)]
    pub no_metrics: bool,
    /// Content store directory [default: /var/lib/shoal/agent; file: store.root].
    #[arg(long, value_name = "DIR")]
    pub store_root: Option<PathBuf>,
    /// Largest total size of cached blobs, e.g. 50GiB [file: store.max_size].
    #[arg(long, value_name = "SIZE")]
    pub max_size: Option<ByteSize>,
    /// An upstream registry as HOST=URL, e.g. docker.io=https://registry-1.docker.io.
    /// Further URLs after commas are fallbacks, tried in order when the one in use is
    /// unreachable (HOST=URL,URL2,...). Repeatable; adds to (or replaces, by HOST) the
    /// file's [[upstream]] entries.
    #[arg(long = "upstream", value_name = "HOST=URL[,URL...]")]
    pub upstreams: Vec<String>,
    /// Allow plain-HTTP URLs for upstreams given with --upstream.
    #[arg(long)]
    pub insecure_http_upstream: bool,
    /// Registry used when a request names none (docker's registry-mirrors sends none)
    /// [default: the only upstream, or docker.io; file: mirror.default_upstream].
    #[arg(long, value_name = "HOST")]
    pub default_upstream: Option<String>,
    /// Log format [default: text; file: log.format].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. info or shoal_agent=debug,info [default: info; file: log.level].
    /// The RUST_LOG environment variable, when set, takes precedence.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The validated configuration the agent runs with.
// ---------------------------------------------------------------------------------------------

pub const DEFAULT_LISTEN: &str = "127.0.0.1:5050";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9465";
pub const DEFAULT_STORE_ROOT: &str = "/var/lib/shoal/agent";
/// UDP port of the peer endpoint by default.
pub const DEFAULT_PEER_LISTEN: &str = "0.0.0.0:7470";
/// Environment variable holding the bootstrap token when no `bootstrap_token_file` is set.
pub const BOOTSTRAP_TOKEN_ENV: &str = "SHOAL_BOOTSTRAP_TOKEN";

/// Everything the agent needs to run, checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub mirror: MirrorConfig,
    /// `None` when metrics are turned off.
    pub metrics_listen: Option<SocketAddr>,
    pub log: LogConfig,
    pub store: StoreConfig,
    /// How often eviction and the stale-ingest sweep run.
    pub maintenance_interval: Duration,
    pub upstreams: Vec<UpstreamConfig>,
    /// Peer sharing and the control channel; `None` without a `[cluster]` section.
    pub cluster: Option<ClusterConfig>,
    /// The data plane: bandwidth limits, upload slots, swarm settings (`[peer]`).
    pub peer: crate::peer::PeerConfig,
}

#[derive(Debug, Clone)]
pub struct MirrorConfig {
    pub listen: SocketAddr,
    /// Registry for requests without `?ns=`; always one of the configured upstreams.
    pub default_upstream: RegistryHost,
    /// How long a tag's digest is used without asking upstream again.
    pub tag_cache_ttl: Duration,
    /// How long after the last successful check a tag may still be served from cache while
    /// the upstream is unreachable.
    pub offline_grace: Duration,
    /// On SIGTERM, how long responses in flight may take to finish before they are aborted.
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Config {
    /// Reads `path` (if given), applies `overrides`, and validates the result.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let file = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                parse_file(&text).map_err(|message| ConfigError::Parse {
                    path: p.to_owned(),
                    message,
                })?
            }
            None => FileConfig::default(),
        };
        build(file, overrides, path.and_then(Path::parent))
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

fn build(file: FileConfig, ov: &Overrides, base: Option<&Path>) -> Result<Config, ConfigError> {
    // Mirror listener: loopback unless explicitly opened up.
    let listen = ov
        .listen
        .or(file.mirror.listen)
        .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("constant parses"));
    let listen_any = ov.insecure_listen_any || file.mirror.insecure_listen_any.unwrap_or(false);
    if !listen.ip().is_loopback() && !listen_any {
        return Err(invalid(format!(
            "mirror.listen = {listen} is not a loopback address; set mirror.insecure_listen_any = true \
             (or --insecure-listen-any) if every host that can reach it may pull through it"
        )));
    }

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
    };
    if tracing_subscriber::EnvFilter::try_new(&log.level).is_err() {
        return Err(invalid(format!(
            "log.level {:?} is not a valid filter",
            log.level
        )));
    }

    let store = build_store(&file.store, ov, base)?;
    let maintenance_interval = file
        .store
        .maintenance_interval
        .unwrap_or(Duration::from_secs(60));
    if maintenance_interval.is_zero() {
        return Err(invalid(
            "store.maintenance_interval must be greater than zero",
        ));
    }

    let mut upstreams = Vec::new();
    for (i, u) in file.upstreams.into_iter().enumerate() {
        upstreams.push(
            build_upstream(u, base)
                .map_err(|e| invalid(format!("[[upstream]] entry {}: {e}", i + 1)))?,
        );
    }
    for spec in &ov.upstreams {
        let (host, url) = spec
            .split_once('=')
            .ok_or_else(|| invalid(format!("--upstream {spec:?}: expected HOST=URL")))?;
        // HOST=URL[,FALLBACK_URL...]
        let mut urls = url.split(',').map(str::to_owned);
        let u = FileUpstream {
            host: host.to_owned(),
            url: urls.next().unwrap_or_default(),
            fallback_urls: urls.collect(),
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            insecure_http: ov.insecure_http_upstream,
            connect_timeout: None,
            idle_timeout: None,
            max_retries: None,
            unreachable_hold: None,
        };
        let u =
            build_upstream(u, base).map_err(|e| invalid(format!("--upstream {spec:?}: {e}")))?;
        upstreams.retain(|x: &UpstreamConfig| x.host != u.host);
        upstreams.push(u);
    }
    if upstreams.is_empty() {
        return Err(invalid(
            "no upstream registry configured: add an [[upstream]] section or --upstream HOST=URL",
        ));
    }
    let mut seen = BTreeSet::new();
    for u in &upstreams {
        if !seen.insert(u.host.clone()) {
            return Err(invalid(format!("upstream {} is configured twice", u.host)));
        }
    }

    let default_upstream = match ov.default_upstream.clone().or(file.mirror.default_upstream) {
        Some(h) => RegistryHost::parse(&h)
            .map_err(|e| invalid(format!("mirror.default_upstream {h:?}: {e}")))?,
        None if upstreams.len() == 1 => upstreams[0].host.clone(),
        None => RegistryHost::parse("docker.io").expect("constant parses"),
    };
    if !upstreams.iter().any(|u| u.host == default_upstream) {
        return Err(invalid(format!(
            "mirror.default_upstream {default_upstream} is not one of the configured upstreams ({})",
            upstreams
                .iter()
                .map(|u| u.host.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }

    let peer = crate::peer::PeerConfig::from_file(file.peer)
        .map_err(|e| invalid(format!("[peer] {e}")))?;
    let cluster = match file.cluster {
        None => None,
        Some(c) => Some(
            build_cluster(c, &store.root, base).map_err(|e| invalid(format!("[cluster] {e}")))?,
        ),
    };

    let tag_cache_ttl = file.mirror.tag_cache_ttl.unwrap_or(Duration::from_secs(30));
    let offline_grace = file
        .mirror
        .offline_grace
        .unwrap_or(Duration::from_secs(24 * 3600));

    Ok(Config {
        mirror: MirrorConfig {
            listen,
            default_upstream,
            tag_cache_ttl,
            offline_grace,
            drain_timeout: file.mirror.drain_timeout.unwrap_or(crate::DRAIN_TIMEOUT),
        },
        metrics_listen,
        log,
        store,
        maintenance_interval,
        upstreams,
        cluster,
        peer,
    })
}

/// This machine's host name, as the default node name.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

fn build_cluster(
    c: FileCluster,
    store_root: &Path,
    base: Option<&Path>,
) -> Result<ClusterConfig, String> {
    use shoal_proto::enroll::{BootstrapToken, is_dns_compatible};
    use shoal_proto::msg::{NodeId, Zone};

    let name = c
        .node_name
        .or_else(host_name)
        .ok_or("node_name is not set and the host name cannot be read")?;
    let node = NodeId::new(&name)
        .ok()
        .filter(|n| is_dns_compatible(n.as_str()))
        .ok_or_else(|| {
            format!("node_name {name:?} must be a DNS-style name (letters, digits, '-', '_', dots)")
        })?;
    let zone_text = c.zone.unwrap_or_default();
    let zone = Zone::new(&zone_text).map_err(|e| format!("zone {zone_text:?}: {e}"))?;
    let peer_listen = c
        .peer_listen
        .unwrap_or_else(|| DEFAULT_PEER_LISTEN.parse().expect("constant parses"));
    let advertise = match c.advertise_addr {
        Some(a) if a.ip().is_unspecified() || a.port() == 0 => {
            return Err(format!(
                "advertise_addr {a} must be a specific address and port"
            ));
        }
        Some(a) => a,
        None if peer_listen.ip().is_unspecified() || peer_listen.port() == 0 => {
            return Err(format!(
                "peer_listen {peer_listen} is a wildcard address: set advertise_addr to the address peers reach this node at"
            ));
        }
        None => peer_listen,
    };
    if c.coordinators.is_empty() {
        return Err(
            "needs at least one [[cluster.coordinator]] (name, enroll_url, ctl_addr)".into(),
        );
    }
    let mut coordinators = Vec::new();
    for (i, f) in c.coordinators.into_iter().enumerate() {
        let n = i + 1;
        let name = NodeId::new(&f.name)
            .ok()
            .filter(|n| is_dns_compatible(n.as_str()))
            .ok_or_else(|| {
                format!(
                    "coordinator {n}: name {:?} must be a DNS-style name",
                    f.name
                )
            })?;
        if coordinators
            .iter()
            .any(|x: &CoordinatorAddr| x.name == name)
        {
            return Err(format!("coordinator {name} is listed twice"));
        }
        let url = url_origin(&f.enroll_url)
            .map_err(|e| format!("coordinator {name}: enroll_url {:?}: {e}", f.enroll_url))?;
        if f.ctl_addr
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(format!(
                "coordinator {name}: ctl_addr {:?} must be host:port",
                f.ctl_addr
            ));
        }
        coordinators.push(CoordinatorAddr {
            name,
            enroll_url: url,
            ctl_addr: f.ctl_addr,
        });
    }
    let token_text = match c.bootstrap_token_file {
        Some(f) => {
            let f = resolve(base, f);
            let text = std::fs::read_to_string(&f)
                .map_err(|e| format!("cannot read bootstrap_token_file {}: {e}", f.display()))?;
            Some(text.trim().to_owned())
        }
        None => std::env::var(BOOTSTRAP_TOKEN_ENV)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty()),
    };
    let bootstrap_token = token_text
        .map(|t| BootstrapToken::new(&t))
        .transpose()
        .map_err(|e| format!("bootstrap token: {e}"))?;
    let front_door = match (c.ca_file, c.ca_pin) {
        (Some(_), Some(_)) => return Err("set either ca_file or ca_pin, not both".into()),
        (Some(f), None) => {
            let f = resolve(base, f);
            if !f.is_file() {
                return Err(format!("ca_file {} does not exist", f.display()));
            }
            FrontDoorTrust::CaFile(f)
        }
        (None, Some(pin)) => FrontDoorTrust::parse_pin(&pin)?,
        (None, None) => FrontDoorTrust::System,
    };
    let state_dir = c
        .state_dir
        .map(|p| resolve(base, p))
        .unwrap_or_else(|| store_root.join("cluster"));
    let mut timers = ClusterTimers::default();
    if let Some(t) = c.locate_timeout {
        if t.is_zero() {
            return Err("locate_timeout must be greater than zero".into());
        }
        timers.locate_timeout = t;
    }
    Ok(ClusterConfig {
        node,
        zone,
        peer_listen,
        advertise,
        coordinators,
        bootstrap_token,
        front_door,
        state_dir,
        timers,
    })
}

/// Checks an `https://host[:port]` URL (nothing after the authority but an optional `/`) and
/// returns it without the trailing slash.
fn url_origin(text: &str) -> Result<String, String> {
    let rest = text
        .strip_prefix("https://")
        .ok_or("must start with https://")?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty()
        || authority.contains(['/', '?', '#', '@'])
        || authority.contains(char::is_whitespace)
    {
        return Err("must be https://host[:port] with nothing after it".into());
    }
    Ok(format!("https://{authority}"))
}

fn build_store(
    s: &FileStore,
    ov: &Overrides,
    base: Option<&Path>,
) -> Result<StoreConfig, ConfigError> {
    let root = ov
        .store_root
        .clone()
        .or_else(|| s.root.clone().map(|p| resolve(base, p)))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STORE_ROOT));
    let max_bytes = ov.max_size.or(s.max_size).map(|b| b.0);
    if max_bytes == Some(0) {
        return Err(invalid("store.max_size must be greater than zero"));
    }
    if let Some(p) = s.max_disk_percent
        && !(p > 0.0 && p <= 100.0)
    {
        return Err(invalid(format!(
            "store.max_disk_percent = {p} must be in (0, 100]"
        )));
    }
    let high = s.high_watermark.unwrap_or(0.95);
    let low = s.low_watermark.unwrap_or(0.85);
    if !(low > 0.0 && low < high && high <= 1.0) {
        return Err(invalid(format!(
            "store watermarks must satisfy 0 < low_watermark ({low}) < high_watermark ({high}) <= 1"
        )));
    }
    Ok(StoreConfig {
        root,
        max_bytes,
        max_disk_percent: s.max_disk_percent,
        high_watermark: high,
        low_watermark: low,
        ingest_max_age: s.ingest_max_age.unwrap_or(Duration::from_secs(24 * 3600)),
    })
}

fn build_upstream(u: FileUpstream, base: Option<&Path>) -> Result<UpstreamConfig, String> {
    let host = RegistryHost::parse(&u.host).map_err(|e| format!("host {:?}: {e}", u.host))?;
    for url in std::iter::once(&u.url).chain(&u.fallback_urls) {
        let scheme = url
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase())
            .ok_or_else(|| format!("url {url:?} must start with https:// (or http://)"))?;
        match scheme.as_str() {
            "https" => {}
            "http" if u.insecure_http => {}
            "http" => {
                return Err(format!(
                    "url {url:?} is plain HTTP; set insecure_http = true (or --insecure-http-upstream) to allow it"
                ));
            }
            other => return Err(format!("url scheme {other:?} is not supported")),
        }
    }
    let password = match (u.password, u.password_file) {
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
    if password.is_some() && u.username.is_none() {
        return Err("a password needs a username".into());
    }
    let ca_file = u.ca_file.map(|p| resolve(base, p));
    if let Some(ca) = &ca_file
        && !ca.is_file()
    {
        return Err(format!("ca_file {} does not exist", ca.display()));
    }
    Ok(UpstreamConfig {
        host,
        url: u.url.trim_end_matches('/').to_owned(),
        fallback_urls: u
            .fallback_urls
            .iter()
            .map(|f| f.trim_end_matches('/').to_owned())
            .collect(),
        username: u.username,
        password,
        ca_file,
        insecure: u.insecure_http,
        connect_timeout: u.connect_timeout.unwrap_or(Duration::from_secs(5)),
        idle_timeout: u.idle_timeout.unwrap_or(Duration::from_secs(30)),
        max_retries: u.max_retries.unwrap_or(4),
        unreachable_hold: u
            .unreachable_hold
            .unwrap_or(crate::upstream::UNREACHABLE_HOLD),
    })
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, &Overrides::default(), None)
    }

    const MINIMAL: &str = r#"
        [[upstream]]
        host = "docker.io"
        url = "https://registry-1.docker.io"
    "#;

    #[test]
    fn minimal_config_has_safe_defaults() {
        let c = load(MINIMAL).unwrap();
        assert!(c.mirror.listen.ip().is_loopback());
        assert_eq!(c.mirror.default_upstream.as_str(), "docker.io");
        assert_eq!(
            c.metrics_listen.unwrap().to_string(),
            DEFAULT_METRICS_LISTEN
        );
        assert_eq!(c.store.root, PathBuf::from(DEFAULT_STORE_ROOT));
        assert_eq!(c.upstreams[0].max_retries, 4);
    }

    #[test]
    fn rejects_bad_configs_with_a_clear_message() {
        let cases = [
            ("", "no upstream registry configured"),
            (
                "[mirror]\nlisten = \"0.0.0.0:5050\"\n",
                "not a loopback address",
            ),
            ("bogus = 1\n", "unknown field"),
            (
                "[[upstream]]\nhost = \"r.io\"\nurl = \"http://r.io\"\n",
                "plain HTTP",
            ),
            (
                "[[upstream]]\nhost = \"../x\"\nurl = \"https://r.io\"\n",
                "host",
            ),
            (
                &format!("{MINIMAL}\n[store]\nmax_size = \"12 parsecs\"\n"),
                "unknown size unit",
            ),
            (
                &format!("{MINIMAL}\n[store]\nhigh_watermark = 0.5\nlow_watermark = 0.9\n"),
                "watermarks",
            ),
            (
                &format!("{MINIMAL}\n[mirror]\ndefault_upstream = \"quay.io\"\n"),
                "not one of the configured upstreams",
            ),
            (
                &format!("{MINIMAL}\n[mirror]\ntag_cache_ttl = \"soon\"\n"),
                "tag_cache_ttl",
            ),
            (&format!("{MINIMAL}{MINIMAL}"), "configured twice"),
            (
                "[[upstream]]\nhost = \"r.io\"\nurl = \"https://r.io\"\npassword = \"hunter2\"\n",
                "needs a username",
            ),
        ];
        for (text, want) in cases {
            let err = load(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: got {err:?}, want {want:?}");
            assert!(!err.contains("hunter2"), "secret leaked: {err}");
        }
    }

    #[test]
    fn flags_override_the_file() {
        let ov = Overrides {
            listen: Some("127.0.0.2:6000".parse().unwrap()),
            upstreams: vec!["local.test:5000=http://127.0.0.1:5000".into()],
            insecure_http_upstream: true,
            default_upstream: Some("local.test:5000".into()),
            no_metrics: true,
            max_size: Some("1GiB".parse().unwrap()),
            ..Overrides::default()
        };
        let c = Config::from_toml(MINIMAL, &ov, None).unwrap();
        assert_eq!(c.mirror.listen.to_string(), "127.0.0.2:6000");
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.mirror.default_upstream.as_str(), "local.test:5000");
        assert!(c.metrics_listen.is_none());
        assert_eq!(c.store.max_bytes, Some(1 << 30));
    }

    #[test]
    fn byte_sizes() {
        assert_eq!("1024".parse::<ByteSize>().unwrap().0, 1024);
        assert_eq!("50GiB".parse::<ByteSize>().unwrap().0, 50 << 30);
        assert_eq!("1.5 KiB".parse::<ByteSize>().unwrap().0, 1536);
        assert_eq!("2MB".parse::<ByteSize>().unwrap().0, 2_000_000);
        assert!("-1".parse::<ByteSize>().is_err());
        assert!("1e400".parse::<ByteSize>().is_err());
        assert!("GiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn fallback_urls_from_the_file_and_the_flag_are_checked_like_the_url() {
        let file = |fallbacks: &str| {
            format!(
                "[store]\nroot = \"/tmp/x\"\n[[upstream]]\nhost = \"r.test\"\nurl = \"https://a.test\"\nfallback_urls = {fallbacks}\n"
            )
        };
        let c = Config::from_toml(
            &file(r#"["https://b.test/", "https://c.test"]"#),
            &Overrides::default(),
            None,
        )
        .unwrap();
        assert_eq!(
            c.upstreams[0].fallback_urls,
            ["https://b.test", "https://c.test"]
        );
        let err = Config::from_toml(&file(r#"["http://b.test"]"#), &Overrides::default(), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("http://b.test") && err.contains("insecure_http"),
            "{err}"
        );

        let ov = Overrides {
            store_root: Some("/tmp/x".into()),
            upstreams: vec!["r.test=https://a.test,https://b.test".into()],
            ..Overrides::default()
        };
        let c = Config::from_toml("", &ov, None).unwrap();
        assert_eq!(c.upstreams[0].url, "https://a.test");
        assert_eq!(c.upstreams[0].fallback_urls, ["https://b.test"]);
    }

    #[test]
    fn the_deploy_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
        let c = Config::load(Some(&path), &Overrides::default()).unwrap();
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.mirror.default_upstream.as_str(), "docker.io");
        assert_eq!(c.store.max_bytes, Some(50 << 30));
        assert_eq!(c.upstreams[1].url, "https://gw1.example.com");
        assert_eq!(c.upstreams[1].fallback_urls, ["https://gw2.example.com"]);
        // The k8s DaemonSet embeds a config too.
        let k8s = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s/shoal-agent-daemonset.yaml"),
        )
        .unwrap();
        let start = k8s.find("agent.toml: |").unwrap();
        let embedded: String = k8s[start..]
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with("    ") || l.is_empty())
            .map(|l| format!("{}\n", l.trim_start()))
            .collect();
        Config::from_toml(&embedded, &Overrides::default(), None).unwrap();
    }

    /// The commented `[cluster]` example of a deploy file, uncommented.
    pub(crate) fn cluster_example(file: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy")
            .join(file);
        let text = std::fs::read_to_string(path).unwrap();
        let start = text.find("# --- [cluster] example begin").unwrap();
        let end = text.find("# --- [cluster] example end").unwrap();
        text[start..end]
            .lines()
            .skip(1)
            .map(|l| format!("{}\n", l.strip_prefix("# ").unwrap_or(l)))
            .collect()
    }

    #[test]
    fn cluster_section_parses_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret-bootstrap-token-xyz\n").unwrap();
        let example = cluster_example("agent.toml")
            .replace("/etc/shoal/bootstrap-token", &token.display().to_string());
        let c = load(&format!("{MINIMAL}\n{example}")).unwrap();
        let cl = c.cluster.expect("cluster configured");
        assert_eq!(cl.node.as_str(), "node-17");
        assert_eq!(cl.zone.as_str(), "dc1/row4/rack12");
        assert_eq!(cl.advertise.to_string(), "10.0.4.17:7470");
        assert_eq!(cl.coordinators.len(), 2);
        assert_eq!(cl.coordinators[1].ctl_addr, "registry-b.example.com:7471");
        assert!(matches!(cl.front_door, FrontDoorTrust::Pin(_)));
        assert_eq!(cl.timers.locate_timeout, Duration::from_secs(2));
        assert!(load(MINIMAL).unwrap().cluster.is_none());

        let base = format!(
            "{MINIMAL}\n[cluster]\nnode_name = \"n1\"\npeer_listen = \"127.0.0.2:7470\"\nbootstrap_token_file = {:?}\n",
            token.display()
        );
        let coord = "[[cluster.coordinator]]\nname = \"c1\"\nenroll_url = \"https://c1.example\"\nctl_addr = \"c1.example:7471\"\n";
        let c = load(&format!("{base}{coord}")).unwrap().cluster.unwrap();
        assert_eq!(c.advertise.to_string(), "127.0.0.2:7470");
        assert_eq!(
            c.state_dir,
            PathBuf::from(DEFAULT_STORE_ROOT).join("cluster")
        );
        assert!(c.bootstrap_token.is_some());
        assert!(!format!("{c:?}").contains("s3cret"));
        let cases = [
            (base.clone(), "at least one [[cluster.coordinator]]"),
            (base.replace("n1", "-bad"), "DNS-style"),
            (
                base.replace("127.0.0.2:7470", "0.0.0.0:7470") + coord,
                "advertise_addr",
            ),
            (format!("{base}{coord}{coord}"), "listed twice"),
            (
                format!("{base}{}", coord.replace("https://", "http://")),
                "https://",
            ),
            (
                format!("{base}{}", coord.replace("c1.example:7471", "c1.example")),
                "host:port",
            ),
            (format!("{base}ca_pin = \"sha256:abc\"\n{coord}"), "ca_pin"),
            (format!("{base}zone = \"a//b\"\n{coord}"), "zone"),
        ];
        for (text, want) in cases {
            let err = load(&text).expect_err(&text).to_string();
            assert!(err.contains(want), "got {err:?}, want {want:?}");
            assert!(!err.contains("s3cret"), "{err}");
        }
        std::fs::write(&token, "short\n").unwrap();
        let err = load(&format!("{base}{coord}")).unwrap_err().to_string();
        assert!(
            err.contains("bootstrap token") && !err.contains("short"),
            "{err}"
        );
    }

    #[test]
    fn password_is_not_in_debug_output() {
        let c = load(
            "[[upstream]]\nhost = \"r.io\"\nurl = \"https://r.io\"\nusername = \"u\"\npassword = \"hunter2\"\n",
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
