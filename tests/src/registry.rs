//! Runs a real CNCF Distribution 2.8 registry (`docker-registry serve`) on a free loopback port.

use std::fs::{File, OpenOptions};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http::StatusCode;
use rand::RngExt;
use rand::distr::Alphanumeric;
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::net::{POLL_INTERVAL, free_port_on, http_get};
use crate::{REGISTRY_BIN, file_tail, require};

/// How long a registry may take to answer `GET /v2/` after it is spawned.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How many fresh ports to try when the one picked by [`free_port_on`] was taken in between.
const PORT_ATTEMPTS: usize = 5;

/// Storage root of one or more registries. Replicas hold it through an `Arc`, so an owned temp
/// dir outlives every registry that uses it.
#[derive(Debug)]
struct Storage {
    dir: PathBuf,
    _owned: Option<TempDir>,
}

/// Configures a [`Registry`] before starting it. [`Registry::start`] is `builder().start()`.
#[derive(Debug, Clone)]
pub struct RegistryBuilder {
    ip: IpAddr,
    port: Option<u16>,
    storage: Option<Arc<Storage>>,
    secret: Option<String>,
    htpasswd: Option<PathBuf>,
    s3: Option<S3Storage>,
    tls: Option<RegistryTls>,
    ready_timeout: Duration,
}

/// `http.tls`: the registry serves HTTPS with this certificate (e.g. from
/// [`crate::tls::TestCerts`]).
#[derive(Debug, Clone)]
pub struct RegistryTls {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// The CA that issued it (PEM), trusted by the readiness probe.
    pub ca_pem: Vec<u8>,
}

impl RegistryTls {
    pub fn from_certs(certs: &crate::tls::TestCerts) -> RegistryTls {
        RegistryTls {
            cert_file: certs.cert_file(),
            key_file: certs.key_file(),
            ca_pem: certs.ca_pem().to_vec(),
        }
    }
}

/// `storage.s3` for a registry on S3-compatible object storage (e.g. [`crate::garage`]),
/// instead of the default filesystem storage.
#[derive(Debug, Clone)]
pub struct S3Storage {
    /// `regionendpoint`, e.g. `http://127.0.0.1:3900`. Presigned URLs name this host.
    pub region_endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    /// `rootdirectory` inside the bucket.
    pub root_directory: String,
    /// Answer blob GETs with a 307 to a presigned storage URL (`storage.redirect.disable:
    /// false`) rather than streaming the bytes through the registry.
    pub redirect: bool,
}

impl S3Storage {
    /// Storage in `bucket` reached at `region_endpoint`, under `/registry`, with redirects.
    pub fn new(region_endpoint: &str, bucket: &crate::garage::S3Bucket) -> S3Storage {
        S3Storage {
            region_endpoint: region_endpoint.to_owned(),
            bucket: bucket.bucket.clone(),
            access_key: bucket.access_key.clone(),
            secret_key: bucket.secret_key.clone(),
            region: bucket.region.clone(),
            root_directory: "/registry".to_owned(),
            redirect: true,
        }
    }
}

impl Default for RegistryBuilder {
    fn default() -> Self {
        Self {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: None,
            storage: None,
            secret: None,
            htpasswd: None,
            s3: None,
            tls: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }
}

impl RegistryBuilder {
    /// Listens on this local address instead of 127.0.0.1 (e.g. 127.0.0.2 to play another host).
    pub fn ip(mut self, ip: IpAddr) -> Self {
        self.ip = ip;
        self
    }

    /// Listens on this port instead of a free one. Start fails if the port is taken.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Stores blobs and manifests under `dir`, which the caller owns and must keep alive.
    /// Without this the registry gets its own temp dir.
    pub fn storage_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.storage = Some(Arc::new(Storage {
            dir: dir.into(),
            _owned: None,
        }));
        self
    }

    /// Sets `http.secret`. Replicas behind one balancer need the same secret, because upload
    /// state is signed with it and an upload may continue on another replica.
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = Some(secret.into());
        self
    }

    /// Requires basic auth checked against this htpasswd file. Distribution 2.8 accepts only
    /// bcrypt lines (`htpasswd -nbB user pass`); APR1 and SHA lines always answer 401.
    pub fn htpasswd(mut self, file: impl Into<PathBuf>) -> Self {
        self.htpasswd = Some(file.into());
        self
    }

    /// Stores blobs and manifests in S3-compatible object storage instead of a directory.
    pub fn s3(mut self, storage: S3Storage) -> Self {
        self.s3 = Some(storage);
        self
    }

    /// Serves HTTPS (`http.tls`) instead of plain HTTP; [`Registry::url`] is then `https://`.
    pub fn tls(mut self, tls: RegistryTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Overrides how long start and restart wait for `GET /v2/` (default 20 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Writes the config, spawns `docker-registry serve`, and waits until it answers.
    pub async fn start(self) -> Result<Registry> {
        require(&[REGISTRY_BIN])?;
        let work = tempfile::Builder::new()
            .prefix("shoal-registry-")
            .tempdir()
            .context("creating registry temp dir")?;
        let storage = match self.storage {
            Some(storage) => storage,
            None => {
                let owned = tempfile::Builder::new()
                    .prefix("shoal-registry-data-")
                    .tempdir()
                    .context("creating registry storage dir")?;
                Arc::new(Storage {
                    dir: owned.path().to_path_buf(),
                    _owned: Some(owned),
                })
            }
        };
        let secret = self.secret.unwrap_or_else(random_secret);
        let mut registry = Registry {
            config_path: work.path().join("config.yml"),
            stdout_path: work.path().join("access.log"),
            stderr_path: work.path().join("registry.log"),
            work,
            storage,
            secret,
            htpasswd: self.htpasswd,
            s3: self.s3,
            tls: self.tls,
            addr: SocketAddr::new(self.ip, 0),
            ready_timeout: self.ready_timeout,
            child: None,
        };

        let attempts = if self.port.is_some() {
            1
        } else {
            PORT_ATTEMPTS
        };
        for attempt in 1..=attempts {
            let port = match self.port {
                Some(port) => port,
                None => free_port_on(self.ip)?,
            };
            registry.addr = SocketAddr::new(self.ip, port);
            registry.write_config()?;
            match registry.spawn_and_wait().await {
                Ok(()) => return Ok(registry),
                // Another process took the port between `free_port_on` and the registry's bind.
                Err(err)
                    if attempt < attempts
                        && format!("{err:#}").contains("address already in use") =>
                {
                    tracing::debug!(port, "registry port taken, retrying with another");
                }
                Err(err) => return Err(err),
            }
        }
        unreachable!("the last attempt returns")
    }
}

/// A running `docker-registry` process with its config, logs and storage in temp dirs.
///
/// Dropping it kills the process and removes its temp dirs (storage only once no replica uses
/// it any more).
#[derive(Debug)]
pub struct Registry {
    work: TempDir,
    storage: Arc<Storage>,
    secret: String,
    htpasswd: Option<PathBuf>,
    s3: Option<S3Storage>,
    tls: Option<RegistryTls>,
    addr: SocketAddr,
    config_path: PathBuf,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    ready_timeout: Duration,
    child: Option<Child>,
}

impl Registry {
    /// Starts a registry with its own storage on a free 127.0.0.1 port.
    pub async fn start() -> Result<Registry> {
        RegistryBuilder::default().start().await
    }

    pub fn builder() -> RegistryBuilder {
        RegistryBuilder::default()
    }

    /// Starts a second registry on a new port with the same storage, secret and auth, as two
    /// replicas behind a load balancer. The storage stays alive while either one does.
    pub async fn start_replica(&self) -> Result<Registry> {
        RegistryBuilder {
            ip: self.addr.ip(),
            port: None,
            storage: Some(self.storage.clone()),
            secret: Some(self.secret.clone()),
            htpasswd: self.htpasswd.clone(),
            s3: self.s3.clone(),
            tls: self.tls.clone(),
            ready_timeout: self.ready_timeout,
        }
        .start()
        .await
    }

    /// `http://127.0.0.1:PORT` (`https://` with [`RegistryBuilder::tls`]), without a
    /// trailing slash.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, the form skopeo and image references use.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    pub fn storage_dir(&self) -> &Path {
        &self.storage.dir
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The process id while it runs (e.g. to read its CPU time from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Whether the process has been started and not stopped. A crashed process still counts
    /// as running until [`Registry::stop`]; use `GET /v2/` to check liveness.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the process and waits for it to exit. Storage, config and logs are kept, so
    /// [`Registry::restart`] brings the same registry back.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // SIGKILL, like a crash: Distribution 2.8 has no drain unless `http.draintimeout`
            // is configured, so SIGTERM would not be gentler anyway.
            child.kill().await.context("killing docker-registry")?;
        }
        Ok(())
    }

    /// Stops the registry if it runs, then starts it again on the same port with the same
    /// storage, and waits until it answers.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.spawn_and_wait().await
    }

    /// The registry's own log (logfmt lines on stderr, one `response completed` line per
    /// request with `http.request.method`, `http.request.uri` and `http.response.status`)
    /// followed by the access log (Apache combined format on stdout). Both accumulate over
    /// restarts, and both include the harness's own readiness probes (`GET /v2/` with an empty
    /// user agent).
    pub fn log_text(&self) -> String {
        let app = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let access = std::fs::read_to_string(&self.stdout_path).unwrap_or_default();
        format!("{app}{access}")
    }

    /// The access log as parsed entries, one per request the registry answered, in order.
    pub fn access_log(&self) -> Vec<AccessLogEntry> {
        std::fs::read_to_string(&self.stdout_path)
            .unwrap_or_default()
            .lines()
            .filter_map(AccessLogEntry::parse)
            .collect()
    }

    /// How many `GET` requests for blob `digest` (any repository) the registry answered.
    pub fn blob_get_count(&self, digest: &str) -> usize {
        self.access_log()
            .iter()
            .filter(|entry| {
                entry.method == "GET" && crate::proxy::blob_digest(&entry.path) == Some(digest)
            })
            .count()
    }

    fn write_config(&self) -> Result<()> {
        let quote = |s: &str| serde_json::to_string(s).expect("a str always serializes");
        let root = self
            .storage
            .dir
            .to_str()
            .context("registry storage path is not UTF-8")?;
        let driver = match &self.s3 {
            None => format!("  filesystem:\n    rootdirectory: {}\n", quote(root)),
            // Every value quoted: an all-digit secret would otherwise become a YAML number and
            // every signature would be wrong (403 `Invalid signature`).
            Some(s3) => format!(
                "  s3:\n    accesskey: {}\n    secretkey: {}\n    region: {}\n    \
                 regionendpoint: {}\n    bucket: {}\n    rootdirectory: {}\n    \
                 secure: {}\n    v4auth: true\n  redirect:\n    disable: {}\n",
                quote(&s3.access_key),
                quote(&s3.secret_key),
                quote(&s3.region),
                quote(&s3.region_endpoint),
                quote(&s3.bucket),
                quote(&s3.root_directory),
                s3.region_endpoint.starts_with("https://"),
                !s3.redirect,
            ),
        };
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
             storage:\n{driver}  delete:\n    enabled: true\n\
             \x20 maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: {addr}\n  secret: {secret}\n",
            addr = quote(&self.addr.to_string()),
            // Quoted: an all-digit secret would otherwise become a YAML number.
            secret = quote(&self.secret),
        );
        if let Some(tls) = &self.tls {
            let path = |p: &Path| {
                p.to_str()
                    .map(quote)
                    .with_context(|| format!("{} is not UTF-8", p.display()))
            };
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                path(&tls.cert_file)?,
                path(&tls.key_file)?
            ));
        }
        if let Some(htpasswd) = &self.htpasswd {
            let path = htpasswd.to_str().context("htpasswd path is not UTF-8")?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: shoal-test\n    path: {}\n",
                quote(path)
            ));
        }
        std::fs::write(&self.config_path, config)
            .with_context(|| format!("writing {}", self.config_path.display()))
    }

    async fn spawn_and_wait(&mut self) -> Result<()> {
        let stdout = append(&self.stdout_path)?;
        let stderr = append(&self.stderr_path)?;
        let mut command = Command::new(REGISTRY_BIN);
        command
            .arg("serve")
            .arg(&self.config_path)
            .current_dir(self.work.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            // With AWS_CA_BUNDLE set the registry's AWS SDK panics at start
            // (LoadCustomCABundleError), and this environment sets it.
            .env_remove("AWS_CA_BUNDLE");
        // Distribution overrides config keys from REGISTRY_* variables (REGISTRY_HTTP_ADDR,
        // ...), so a stray one in the host environment would silently change the test setup.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REGISTRY_") {
                command.env_remove(key);
            }
        }
        let child = command.spawn().with_context(|| {
            format!(
                "spawning {REGISTRY_BIN} serve; install with `{}`",
                crate::INSTALL_HINT
            )
        })?;
        self.child = Some(child);
        if let Err(err) = self.wait_ready().await {
            // Do not leave a half-started process behind; the error already has its log tail.
            let _ = self.stop().await;
            return Err(err);
        }
        tracing::debug!(addr = %self.addr, "registry ready");
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let url = format!("{}/v2/", self.url());
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            let child = self.child.as_mut().context("registry is not running")?;
            if let Some(status) = child.try_wait().context("polling docker-registry")? {
                self.child = None;
                bail!(
                    "docker-registry exited with {status} before answering on {}; log tail:\n{}",
                    self.addr,
                    file_tail(&self.stderr_path, 2048)
                );
            }
            let probe = match &self.tls {
                None => http_get(&url, Duration::from_secs(2)).await,
                Some(tls) => https_get(&url, &tls.ca_pem, Duration::from_secs(2)).await,
            };
            let last_error = match probe {
                Ok(response) if response.status == StatusCode::OK => return Ok(()),
                // With htpasswd auth, an anonymous GET /v2/ answers 401 once the server is up.
                Ok(response)
                    if self.htpasswd.is_some() && response.status == StatusCode::UNAUTHORIZED =>
                {
                    return Ok(());
                }
                Ok(response) => format!("status {}", response.status),
                Err(err) => format!("{err:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "docker-registry on {} not ready after {:?} (last: {last_error}); log tail:\n{}",
                    self.addr,
                    self.ready_timeout,
                    file_tail(&self.stderr_path, 2048)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // kill_on_drop alone sends SIGKILL without waiting, and the temp dirs are removed right
        // after this; a registry still writing into them could leave files behind. SIGKILL
        // takes effect at once, so this bounded wait is short.
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// `GET` over HTTPS trusting only `ca_pem`, for the readiness probe of a TLS registry.
async fn https_get(
    url: &str,
    ca_pem: &[u8],
    timeout: Duration,
) -> Result<crate::net::HttpResponse> {
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(crate::tls::client_config(ca_pem, &[b"http/1.1"])?)
        .timeout(timeout)
        .build()?;
    let resp = client.get(url).send().await?;
    Ok(crate::net::HttpResponse {
        status: resp.status(),
        headers: resp.headers().clone(),
        body: resp.bytes().await?,
    })
}

fn append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

fn random_secret() -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

/// One line of the registry's access log (Apache combined format), e.g.
/// `127.0.0.1 - - [29/Nov/2026:10:01:51 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    pub method: String,
    /// Path and query as requested.
    pub uri: String,
    /// The path without the query.
    pub path: String,
    pub status: u16,
    /// Response body bytes written.
    pub bytes: u64,
    pub user_agent: String,
}

impl AccessLogEntry {
    /// Parses one access log line; `None` for anything else.
    pub fn parse(line: &str) -> Option<AccessLogEntry> {
        let (_, rest) = line.split_once("] \"")?;
        let (request, rest) = rest.split_once("\" ")?;
        let mut request = request.split(' ');
        let method = request.next()?.to_owned();
        let uri = request.next()?.to_owned();
        let mut fields = rest.splitn(3, ' ');
        let status = fields.next()?.parse().ok()?;
        // Gorilla's handler writes "-" for an empty body.
        let bytes = fields.next()?.parse().unwrap_or(0);
        let user_agent = fields
            .next()
            .and_then(|tail| tail.rsplit_once(" \""))
            .map(|(_, agent)| agent.trim_end_matches('"').to_owned())
            .unwrap_or_default();
        let path = uri.split('?').next().unwrap_or_default().to_owned();
        Some(AccessLogEntry {
            method,
            uri,
            path,
            status,
            bytes,
            user_agent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_access_log_line() {
        let line = r#"127.0.0.1 - - [29/Nov/2026:10:01:51 +0000] "GET /v2/x/blobs/sha256:00?a=b HTTP/1.1" 404 157 "" "curl/7.88.1""#;
        let entry = AccessLogEntry::parse(line).unwrap();
        assert_eq!(entry.method, "GET");
        assert_eq!(entry.uri, "/v2/x/blobs/sha256:00?a=b");
        assert_eq!(entry.path, "/v2/x/blobs/sha256:00");
        assert_eq!(entry.status, 404);
        assert_eq!(entry.bytes, 157);
        assert_eq!(entry.user_agent, "curl/7.88.1");
        assert!(AccessLogEntry::parse("time=\"...\" level=info msg=x").is_none());
    }
}
