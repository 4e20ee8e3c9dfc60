//! Registry client for upstream registries: auth challenges, redirects to object storage, retries, resumable blob downloads.
//!
//! One [`Upstream`] talks to one registry (one base URL) with one set of credentials. It
//! speaks only the pull side of the distribution API: `GET /v2/`, manifests (HEAD and GET)
//! and blobs (HEAD and GET, with ranges).
//!
//! Behaviour worth knowing:
//! - **Auth.** Anonymous until the registry answers 401; then the `WWW-Authenticate`
//!   challenge (parsed strictly, see [`challenge`]) decides: Basic sends the configured
//!   credentials to the registry, Bearer fetches a token from the realm (with the credentials
//!   as Basic, if any) and caches it per repository scope until ~90 % of `expires_in`. A 401
//!   with a cached token fetches a fresh one once. The realm must be https (plain http only
//!   on the registry's own host when the registry is plain http).
//! - **Credentials never leave the registry's origin.** Redirects are followed by hand (at
//!   most [`MAX_REDIRECTS`] hops); `Authorization` is attached only to requests whose origin
//!   (scheme, host, port) is the registry's, never to object storage. Tokens and passwords
//!   are [`Secret`]s; URLs in logs and errors have their query (presigned signatures)
//!   stripped.
//! - **Retries.** Idempotent requests are retried on connect errors, timeouts, broken
//!   bodies, 429 and 502/503/504, with exponential backoff and jitter, honouring
//!   `Retry-After` up to 30 s; never on other 4xx or 5xx.
//! - **Timeouts.** `connect_timeout` per connection; `idle_timeout` bounds the wait for
//!   response headers and for each body chunk, so a stalled upstream is abandoned (and, for
//!   blobs, resumed) instead of hanging.
//! - **Blob resume.** See [`BlobBody`]: the stream re-requests `Range: bytes=<received>-`
//!   after a break or stall, through auth and redirects again. If the upstream ignores the
//!   range and answers 200, the stream discards the prefix it already delivered, so it always
//!   yields the bytes from the requested offset, in order, exactly once.
//! - **TLS.** rustls with the ring provider, system roots plus an optional CA file. Plain
//!   `http://` URLs (for the registry and for redirect targets) need `insecure`; it never
//!   turns off certificate verification. HTTP(S) proxies from the environment are honoured,
//!   as by every other registry client.

mod auth;
mod blob;
pub mod challenge;
mod client;
mod error;
mod manifest;
mod retry;
mod secret;
mod tags;
mod tls;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Url;
use shoal_proto::RegistryHost;

pub use blob::BlobBody;
pub use error::UpstreamError;
pub use manifest::{Manifest, ManifestHead};
pub use secret::Secret;
pub use tags::{MAX_TAGS_PAGE, TagsPage};

use auth::{AuthState, Credentials};
use retry::Backoff;

/// Default for [`UpstreamConfig::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for [`UpstreamConfig::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`UpstreamConfig::max_retries`].
pub const DEFAULT_MAX_RETRIES: u32 = 4;
/// Largest manifest accepted; a larger body is an error rather than an allocation.
pub const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;
/// Most redirects followed for one request.
pub const MAX_REDIRECTS: usize = 5;
/// How long a URL whose request could not connect at all (every attempt) is not tried again;
/// its requests fail at once meanwhile.
pub const UNREACHABLE_HOLD: Duration = Duration::from_secs(5);

const USER_AGENT: &str = concat!("shoal-agent/", env!("CARGO_PKG_VERSION"));

/// How to reach one upstream registry.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// The registry name clients use in image names, e.g. `docker.io`.
    pub host: RegistryHost,
    /// Base URL, e.g. `https://registry-1.docker.io` or `http://127.0.0.1:5000`. No query,
    /// fragment or credentials.
    pub url: String,
    /// Further base URLs of the same registry (other coordinators' front doors, or the
    /// registry itself), tried in order when the one in use is unreachable. Same
    /// credentials, CA file and `insecure` flag; each URL keeps its own tokens.
    pub fallback_urls: Vec<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// PEM file of extra CA certificates to trust for this upstream.
    pub ca_file: Option<PathBuf>,
    /// Allow a plain `http://` URL (and redirects to plain http). Certificates of https
    /// URLs are verified regardless.
    pub insecure: bool,
    pub connect_timeout: Duration,
    /// No-progress timeout: longest wait for response headers, and between body chunks.
    pub idle_timeout: Duration,
    /// Retries after the first attempt of a request, and consecutive resume attempts without
    /// progress of a blob stream.
    pub max_retries: u32,
    /// After a request could not connect at all, how long the URL's requests fail at once
    /// (zero: never).
    pub unreachable_hold: Duration,
}

impl UpstreamConfig {
    /// A configuration with default timeouts and retries, anonymous, system roots only.
    pub fn new(host: RegistryHost, url: impl Into<String>) -> UpstreamConfig {
        UpstreamConfig {
            host,
            url: url.into(),
            fallback_urls: Vec::new(),
            username: None,
            password: None,
            ca_file: None,
            insecure: false,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_retries: DEFAULT_MAX_RETRIES,
            unreachable_hold: UNREACHABLE_HOLD,
        }
    }
}

/// A client for one upstream registry. Cheap to clone; clones share connections and tokens.
#[derive(Clone)]
pub struct Upstream {
    eps: Arc<Endpoints>,
}

/// The registry's base URLs, in the configured order, and the one in use.
struct Endpoints {
    host: RegistryHost,
    list: Vec<Arc<Inner>>,
    /// Index into `list` of the URL requests go to first. It moves on when that URL is
    /// unreachable and stays where a request last succeeded.
    active: AtomicUsize,
}

/// One base URL of the registry.
struct Inner {
    /// Parsed base URL; its origin decides where credentials may go.
    base: Url,
    /// `base` as a string without trailing slash, for appending `/v2/...`.
    base_prefix: String,
    /// The registry's name, sent as containerd's `ns` query parameter when this URL is a
    /// mirror of it (another host): a coordinator in front of several registries picks the
    /// pool by it, and registries ignore it.
    ns: Option<String>,
    client: reqwest::Client,
    creds: Option<Credentials>,
    auth: Mutex<AuthState>,
    insecure: bool,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_retries: u32,
    backoff: Backoff,
    /// Until when requests to this URL fail at once (see `Inner::with_retries`).
    unreachable_until: Mutex<Option<Instant>>,
    unreachable_hold: Duration,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<&str> = self
            .eps
            .list
            .iter()
            .map(|i| i.base_prefix.as_str())
            .collect();
        f.debug_struct("Upstream")
            .field("host", &self.eps.host)
            .field("urls", &urls)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Validates the configuration (URL scheme, credentials, CA file) and builds the client.
    /// Makes no request.
    pub fn new(cfg: UpstreamConfig) -> Result<Upstream, UpstreamError> {
        Upstream::with_backoff(cfg, Backoff::default())
    }

    fn with_backoff(cfg: UpstreamConfig, backoff: Backoff) -> Result<Upstream, UpstreamError> {
        let mut list = Vec::with_capacity(1 + cfg.fallback_urls.len());
        for url in std::iter::once(&cfg.url).chain(&cfg.fallback_urls) {
            list.push(Arc::new(Inner::new(&cfg, url, backoff)?));
        }
        Ok(Upstream {
            eps: Arc::new(Endpoints {
                host: cfg.host,
                list,
                active: AtomicUsize::new(0),
            }),
        })
    }

    pub fn host(&self) -> &RegistryHost {
        &self.eps.host
    }

    /// `GET /v2/`: whether the registry is there. A 401 with a parseable challenge counts as
    /// reachable (and teaches the client which auth scheme to use); no credentials are sent.
    #[tracing::instrument(level = "debug", skip_all, fields(upstream = %self.eps.host))]
    pub async fn ping(&self) -> Result<(), UpstreamError> {
        self.failover(|inner| async move { inner.ping().await })
            .await
    }

    /// Runs `op` (one request with its retries) against the URL in use; when that URL is
    /// unreachable, against the next ones in turn. The first URL that answers becomes the one
    /// in use. An answer that is an error (401, 404, a bad body) is returned as is: another
    /// URL of the same registry would say the same.
    async fn failover<T, F, Fut>(&self, op: F) -> Result<T, UpstreamError>
    where
        F: Fn(Arc<Inner>) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let n = self.eps.list.len();
        let first = self.eps.active.load(Ordering::Relaxed) % n;
        let mut k = 0;
        loop {
            let i = (first + k) % n;
            let inner = &self.eps.list[i];
            match op(Arc::clone(inner)).await {
                Err(e) if e.is_unreachable() && k + 1 < n => {
                    let next = &self.eps.list[(i + 1) % n];
                    tracing::warn!(
                        upstream = %self.eps.host,
                        from = %client::redact(&inner.base),
                        to = %client::redact(&next.base),
                        error = %e,
                        "upstream URL unreachable; trying the next one"
                    );
                    k += 1;
                }
                r => {
                    if k > 0 && r.is_ok() {
                        self.eps.active.store(i, Ordering::Relaxed);
                    }
                    return r;
                }
            }
        }
    }
}

impl Inner {
    /// Validates one base URL with the rest of the configuration and builds its client.
    fn new(cfg: &UpstreamConfig, url: &str, backoff: Backoff) -> Result<Inner, UpstreamError> {
        let host = &cfg.host;
        // The raw string is not echoed: it might hold credentials.
        let base = Url::parse(url).map_err(|e| {
            UpstreamError::Config(format!("URL of upstream {host} is not a valid URL: {e}"))
        })?;
        if !base.username().is_empty() || base.password().is_some() {
            return Err(UpstreamError::Config(format!(
                "URL of upstream {host} must not contain credentials; use username and password"
            )));
        }
        let shown = client::redact(&base);
        match base.scheme() {
            "https" => {}
            "http" if cfg.insecure => {}
            "http" => {
                return Err(UpstreamError::Config(format!(
                    "upstream {host} URL {shown} is plain http; set insecure to allow it"
                )));
            }
            other => {
                return Err(UpstreamError::Config(format!(
                    "upstream {host} URL scheme {other:?} is not http or https"
                )));
            }
        }
        if base.host_str().is_none_or(str::is_empty) {
            return Err(UpstreamError::Config(format!(
                "upstream {host} URL {shown} has no host"
            )));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(UpstreamError::Config(format!(
                "upstream {host} URL {shown} must not have a query or fragment"
            )));
        }
        let creds = match (&cfg.username, &cfg.password) {
            (None, None) => None,
            (Some(username), Some(password)) => {
                Some(Credentials::new(username.clone(), password.clone())?)
            }
            _ => {
                return Err(UpstreamError::Config(format!(
                    "upstream {host}: username and password must be given together"
                )));
            }
        };
        if cfg.connect_timeout.is_zero() || cfg.idle_timeout.is_zero() {
            return Err(UpstreamError::Config(format!(
                "upstream {host}: timeouts must be greater than zero"
            )));
        }
        let tls = tls::client_config(cfg.ca_file.as_deref())?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .referer(false)
            .https_only(!cfg.insecure)
            .connect_timeout(cfg.connect_timeout)
            // Per read on the connection, response headers included: the no-progress timer.
            .read_timeout(cfg.idle_timeout)
            .tcp_keepalive(Duration::from_secs(30))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| {
                UpstreamError::Config(format!("upstream {host}: cannot build HTTP client: {e}"))
            })?;
        let base_prefix = base.as_str().trim_end_matches('/').to_owned();
        let authority = match (base.host_str(), base.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (h, None) => h.unwrap_or_default().to_owned(),
            (None, Some(_)) => String::new(),
        };
        let ns = (!authority.eq_ignore_ascii_case(host.as_str())).then(|| host.to_string());
        Ok(Inner {
            base,
            base_prefix,
            ns,
            client,
            creds,
            auth: Mutex::new(AuthState::default()),
            insecure: cfg.insecure,
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            max_retries: cfg.max_retries,
            backoff,
            unreachable_until: Mutex::new(None),
            unreachable_hold: cfg.unreachable_hold,
        })
    }
}
