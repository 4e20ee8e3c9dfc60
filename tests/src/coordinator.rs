//! Runs `shoal-coordinator` in process for tests: a certificate from `cert init`, an htpasswd
//! file made by the real `htpasswd` tool, TLS clients that trust the test CA, and raw TLS
//! exchanges for requests a well-behaved client cannot send.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use shoal_tests::coordinator::{CoordinatorOptions, HashFormat, TestCoordinator, htpasswd_add};
//! use shoal_tests::Registry;
//! let registry = Registry::start().await?;
//! let dir = tempfile::tempdir()?;
//! let users = dir.path().join("htpasswd");
//! htpasswd_add(&users, "alice", "s3cret", HashFormat::Bcrypt)?;
//! let mut opts = CoordinatorOptions::new(&[registry.url()]);
//! opts.htpasswd = Some(users);
//! let coordinator = TestCoordinator::start(opts).await?;
//! let resp = coordinator.client()?.get(coordinator.url("/v2/")).basic_auth("alice", Some("s3cret")).send().await?;
//! assert_eq!(resp.status(), 200);
//! # Ok(()) }
//! ```

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use shoal_coordinator::certs::{CertInitOptions, cert_init};
use shoal_coordinator::{Config, Listeners, Overrides};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::{REGISTRY_BIN, SKOPEO_BIN, find_in_path};

/// The packages every coordinator test needs.
pub const COORDINATOR_INSTALL_HINT: &str =
    "apt-get install -y docker-registry skopeo apache2-utils";
/// The htpasswd binary of apache2-utils.
pub const HTPASSWD_BIN: &str = "htpasswd";

/// Fails with the install command unless `docker-registry`, `skopeo` and `htpasswd` are
/// installed.
pub fn require_coordinator_tools() -> Result<()> {
    let missing: Vec<&str> = [REGISTRY_BIN, SKOPEO_BIN, HTPASSWD_BIN]
        .into_iter()
        .filter(|p| find_in_path(p).is_none())
        .collect();
    if !missing.is_empty() {
        bail!(
            "required test tool(s) not found on PATH: {}; install them with `{COORDINATOR_INSTALL_HINT}` \
             (or run scripts/install-test-deps as root)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Hash formats of `htpasswd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashFormat {
    /// `-B`
    Bcrypt,
    /// `-m` (APR1-MD5, the default of `htpasswd -b`)
    Apr1,
    /// `-s`
    Sha1,
}

/// Adds (or replaces) `user` in `file` with the real `htpasswd` tool, creating the file if
/// needed.
pub fn htpasswd_add(file: &Path, user: &str, password: &str, format: HashFormat) -> Result<()> {
    if find_in_path(HTPASSWD_BIN).is_none() {
        bail!("htpasswd not found on PATH; install it with `{COORDINATOR_INSTALL_HINT}`");
    }
    let mut cmd = std::process::Command::new(HTPASSWD_BIN);
    cmd.arg("-b");
    if !file.exists() {
        cmd.arg("-c");
    }
    cmd.arg(match format {
        HashFormat::Bcrypt => "-B",
        HashFormat::Apr1 => "-m",
        HashFormat::Sha1 => "-s",
    });
    let out = cmd
        .arg(file)
        .arg(user)
        .arg(password)
        .output()
        .context("running htpasswd")?;
    if !out.status.success() {
        bail!(
            "htpasswd failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// One `[[registry.replica]]`.
#[derive(Clone, Debug)]
pub struct ReplicaOption {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub weight: u32,
    pub down: bool,
}

/// The `host` of the pool that [`CoordinatorOptions::new`] configures.
pub const MAIN_POOL: &str = "registry.test";

/// Another `[[registry]]` pool, chosen by clients with `?ns=<host>`. Its health settings are
/// the main pool's.
#[derive(Clone, Debug)]
pub struct PoolOption {
    pub host: String,
    pub replicas: Vec<ReplicaOption>,
    pub policy: String,
    /// `ca_file`: PEM certificates trusted for `https://` replicas.
    pub ca_file: Option<PathBuf>,
    /// Allow `http://` replicas (the harness's registries are plain HTTP unless made with TLS).
    pub insecure_http: bool,
    pub connect_timeout: Duration,
}

impl PoolOption {
    /// A round-robin pool of plain-HTTP replicas.
    pub fn new(host: &str, replica_urls: &[String]) -> PoolOption {
        PoolOption {
            host: host.to_owned(),
            replicas: replica_urls.iter().map(|u| ReplicaOption::new(u)).collect(),
            policy: "round_robin".into(),
            ca_file: None,
            insecure_http: true,
            connect_timeout: Duration::from_secs(2),
        }
    }
}

impl ReplicaOption {
    /// Weight 1, not down.
    pub fn new(url: &str) -> ReplicaOption {
        ReplicaOption {
            url: url.to_owned(),
            weight: 1,
            down: false,
        }
    }
}

/// What the test coordinator is configured with. Everything becomes a TOML config parsed by
/// `Config::from_toml`, so tests exercise the real config path.
#[derive(Clone, Debug)]
pub struct CoordinatorOptions {
    /// The main pool's `host` ([`MAIN_POOL`] by default).
    pub host: String,
    pub replicas: Vec<ReplicaOption>,
    /// `round_robin`, `weighted`, `ip_hash`, `least_conn` or `digest_hash`.
    pub policy: String,
    /// `pass` or `follow`.
    pub redirect: String,
    /// Front-door users; `None` runs with `insecure_no_auth`.
    pub htpasswd: Option<PathBuf>,
    /// The coordinator's own credentials for the replicas.
    pub upstream_credentials: Option<(String, String)>,
    /// Extra top-level TOML: `[groups]`, `[[access]]`.
    pub access_toml: String,
    /// Extra lines for the `[auth]` table, e.g. `max_failures = 3`.
    pub auth_toml: String,
    /// Extra lines for the `[server]` table.
    pub server_toml: String,
    /// The main pool's `ca_file`: PEM certificates trusted for `https://` replicas.
    pub ca_file: Option<PathBuf>,
    /// Allow `http://` replicas in the main pool (true by default).
    pub upstream_insecure_http: bool,
    /// The main pool's `connect_timeout` (TCP connect and TLS handshake).
    pub connect_timeout: Duration,
    pub health_interval: Duration,
    /// How long one active health check may take.
    pub health_timeout: Duration,
    pub max_fails: u32,
    pub fail_timeout: Duration,
    /// More pools after the main one, chosen with `?ns=<host>`.
    pub pools: Vec<PoolOption>,
    /// `server.default_registry`; `None` leaves the main pool the default.
    pub default_registry: Option<String>,
    /// Also listen on plain HTTP.
    pub insecure_http: bool,
    pub coalescing: bool,
    /// Lines of a `[cluster]` table (name, data_dir, bootstrap_tokens_file, ...); with it the
    /// coordinator also serves the control channel on a UDP port of 127.0.0.1 chosen by the OS
    /// ([`TestCoordinator::cluster_addr`]).
    pub cluster_toml: Option<String>,
}

impl CoordinatorOptions {
    /// One pool of plain-HTTP replicas, round robin, no front-door auth.
    pub fn new(replica_urls: &[String]) -> CoordinatorOptions {
        CoordinatorOptions {
            host: MAIN_POOL.into(),
            replicas: replica_urls.iter().map(|u| ReplicaOption::new(u)).collect(),
            policy: "round_robin".into(),
            redirect: "pass".into(),
            htpasswd: None,
            upstream_credentials: None,
            access_toml: String::new(),
            auth_toml: String::new(),
            server_toml: String::new(),
            ca_file: None,
            upstream_insecure_http: true,
            connect_timeout: Duration::from_secs(2),
            health_interval: Duration::from_secs(1),
            health_timeout: Duration::from_secs(1),
            max_fails: 1,
            fail_timeout: Duration::from_secs(5),
            pools: Vec::new(),
            default_registry: None,
            insecure_http: false,
            coalescing: true,
            cluster_toml: None,
        }
    }

    fn toml(&self, dir: &Path) -> Result<String> {
        let q = |s: &str| serde_json::to_string(s).expect("a str serialises");
        let p = |p: &Path| q(&p.to_string_lossy());
        let mut t = String::new();
        let default = match (&self.default_registry, self.pools.is_empty()) {
            (Some(host), _) => format!("default_registry = {}\n", q(host)),
            (None, false) => format!("default_registry = {}\n", q(&self.host)),
            (None, true) => String::new(),
        };
        writeln!(
            t,
            "[server]\ntls_cert = {}\ntls_key = {}\nreload_poll = \"200ms\"\ndrain_timeout = \"5s\"\n{default}{}",
            p(&dir.join("tls/server.crt")),
            p(&dir.join("tls/server.key")),
            self.server_toml
        )?;
        writeln!(t, "[log]\naccess_log = {}\n", p(&dir.join("access.log")))?;
        match &self.htpasswd {
            Some(f) => writeln!(t, "[auth]\nhtpasswd = {}\n{}", p(f), self.auth_toml)?,
            None => writeln!(t, "[auth]\ninsecure_no_auth = true\n{}", self.auth_toml)?,
        }
        writeln!(
            t,
            "[coalescing]\nenabled = {}\nspool_dir = {}\n",
            self.coalescing,
            p(&dir.join("spool"))
        )?;
        if let Some(c) = &self.cluster_toml {
            writeln!(t, "[cluster]\n{c}\n")?;
        }
        t.push_str(&self.access_toml);
        let main = PoolOption {
            host: self.host.clone(),
            replicas: self.replicas.clone(),
            policy: self.policy.clone(),
            ca_file: self.ca_file.clone(),
            insecure_http: self.upstream_insecure_http,
            connect_timeout: self.connect_timeout,
        };
        for (i, pool) in std::iter::once(&main).chain(&self.pools).enumerate() {
            writeln!(
                t,
                "\n[[registry]]\nhost = {}\npolicy = {}\nredirect = {}\ninsecure_http = {}\nconnect_timeout = \"{}ms\"",
                q(&pool.host),
                q(&pool.policy),
                q(&self.redirect),
                pool.insecure_http,
                pool.connect_timeout.as_millis()
            )?;
            if let Some(ca) = &pool.ca_file {
                writeln!(t, "ca_file = {}", p(ca))?;
            }
            if let Some((user, pass)) = &self.upstream_credentials {
                let file = dir.join(format!("upstream-{i}.password"));
                std::fs::write(&file, format!("{pass}\n"))?;
                writeln!(t, "username = {}\npassword_file = {}", q(user), p(&file))?;
            }
            writeln!(
                t,
                "[registry.health]\ninterval = \"{}ms\"\ntimeout = \"{}ms\"\nmax_fails = {}\nfail_timeout = \"{}ms\"",
                self.health_interval.as_millis(),
                self.health_timeout.as_millis(),
                self.max_fails,
                self.fail_timeout.as_millis()
            )?;
            for r in &pool.replicas {
                writeln!(
                    t,
                    "[[registry.replica]]\nurl = {}\nweight = {}\ndown = {}",
                    q(&r.url),
                    r.weight,
                    r.down
                )?;
            }
        }
        Ok(t)
    }
}

/// A coordinator running in this process on 127.0.0.1 ports chosen by the OS. Dropping it
/// stops it.
pub struct TestCoordinator {
    dir: TempDir,
    https: SocketAddr,
    http: Option<SocketAddr>,
    metrics: SocketAddr,
    cluster: Option<SocketAddr>,
    client_cert_dir: PathBuf,
    ca_pem: Vec<u8>,
    shutdown: Option<oneshot::Sender<()>>,
    reload: mpsc::UnboundedSender<()>,
    task: Option<JoinHandle<Result<()>>>,
}

impl std::fmt::Debug for TestCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCoordinator")
            .field("https", &self.https)
            .finish_non_exhaustive()
    }
}

impl TestCoordinator {
    /// Makes a CA and server certificate (for `localhost` and 127.0.0.1) with `cert init`,
    /// writes the config, binds the listeners and starts the coordinator.
    pub async fn start(opts: CoordinatorOptions) -> Result<TestCoordinator> {
        crate::init_tracing();
        let dir = tempfile::Builder::new()
            .prefix("shoal-coordinator-")
            .tempdir()?;
        cert_init(&CertInitOptions {
            hosts: vec!["localhost".into()],
            ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            out_dir: dir.path().join("tls"),
            server_days: 30,
            ca_days: 30,
            force: false,
            reuse_ca: false,
        })
        .context("cert init")?;
        // Clients get a directory with only ca.crt: containers/image treats any *.key there
        // as half of a client certificate.
        let client_cert_dir = dir.path().join("client-certs");
        std::fs::create_dir(&client_cert_dir)?;
        let ca_pem = std::fs::read(dir.path().join("tls/ca.crt"))?;
        std::fs::write(client_cert_dir.join("ca.crt"), &ca_pem)?;

        let text = opts.toml(dir.path())?;
        // A file, as in production: a reload reads the access rules from it again.
        let config_path = dir.path().join("coordinator.toml");
        std::fs::write(&config_path, &text)?;
        let config = Config::load(&config_path, &Overrides::default())
            .with_context(|| format!("test config:\n{text}"))?;
        let https = TcpListener::bind("127.0.0.1:0").await?;
        let http = if opts.insecure_http {
            Some(TcpListener::bind("127.0.0.1:0").await?)
        } else {
            None
        };
        let metrics = TcpListener::bind("127.0.0.1:0").await?;
        let cluster = match opts.cluster_toml {
            Some(_) => Some(std::net::UdpSocket::bind("127.0.0.1:0")?),
            None => None,
        };
        let cluster_addr = cluster.as_ref().map(|s| s.local_addr()).transpose()?;
        let https_addr = https.local_addr()?;
        let http_addr = http.as_ref().map(|l| l.local_addr()).transpose()?;
        let metrics_addr = metrics.local_addr()?;
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let (reload_tx, reload_rx) = mpsc::unbounded_channel::<()>();
        let reloads = futures::stream::unfold(reload_rx, |mut rx| async move {
            rx.recv().await.map(|()| ((), rx))
        });
        let task = tokio::spawn(async move {
            shoal_coordinator::run_with_reload(
                config,
                Listeners {
                    https,
                    http,
                    metrics: Some(metrics),
                    cluster,
                },
                async move {
                    let _ = shutdown_rx.await;
                },
                Box::pin(reloads),
            )
            .await
            .map_err(anyhow::Error::from)
        });
        let mut coordinator = TestCoordinator {
            dir,
            https: https_addr,
            http: http_addr,
            metrics: metrics_addr,
            cluster: cluster_addr,
            client_cert_dir,
            ca_pem,
            shutdown: Some(shutdown_tx),
            reload: reload_tx,
            task: Some(task),
        };
        // The listeners are bound, so requests queue until the accept loop runs; still, fail
        // here with the coordinator's own error if it did not start.
        let ready = crate::net::wait_until(
            Duration::from_secs(10),
            "coordinator answers /_ping",
            || async {
                if coordinator
                    .task
                    .as_ref()
                    .is_some_and(JoinHandle::is_finished)
                {
                    return true;
                }
                match coordinator.client() {
                    Ok(c) => c
                        .get(coordinator.url("/_ping"))
                        .send()
                        .await
                        .is_ok_and(|r| r.status() == 200),
                    Err(_) => false,
                }
            },
        )
        .await;
        if let Some(task) = coordinator.task.take_if(|t| t.is_finished()) {
            return match task.await {
                Ok(Ok(())) => Err(anyhow::anyhow!("coordinator stopped right after starting")),
                Ok(Err(e)) => Err(e.context("coordinator failed to start")),
                Err(e) => Err(anyhow::anyhow!("coordinator panicked at start: {e}")),
            };
        }
        ready.context("coordinator did not start")?;
        Ok(coordinator)
    }

    pub fn https_addr(&self) -> SocketAddr {
        self.https
    }

    /// The control channel's UDP address, if `cluster_toml` was set.
    pub fn cluster_addr(&self) -> Option<SocketAddr> {
        self.cluster
    }

    /// The front door CA certificate (PEM): what agents trust when they enroll (`ca_file`).
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// The plain-HTTP listener, if `insecure_http` was set.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    /// `127.0.0.1:PORT` of the HTTPS listener, the form image references use.
    pub fn host_port(&self) -> String {
        self.https.to_string()
    }

    /// `https://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.https)
    }

    /// A directory with only `ca.crt`, for skopeo's `--src-cert-dir` / `--dest-cert-dir`.
    pub fn cert_dir(&self) -> &Path {
        &self.client_cert_dir
    }

    /// The server certificate and key files (for reload tests).
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.path().join("tls")
    }

    /// The config file the coordinator was started from (edit it, then [`Self::reload`]).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("coordinator.toml")
    }

    pub fn access_log_path(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    /// Access log lines written so far.
    pub fn access_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.access_log_path())
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The rustls client configuration trusting the test CA (ring provider, ALPN as given).
    pub fn tls_client_config(&self, alpn: &[&[u8]]) -> Result<rustls::ClientConfig> {
        crate::tls::client_config(&self.ca_pem, alpn)
    }

    /// An HTTPS client trusting the test CA.
    pub fn client(&self) -> Result<reqwest::Client> {
        self.client_builder()?.build().context("building client")
    }

    /// An HTTPS client trusting the test CA that speaks HTTP/1.1 only (ALPN http/1.1).
    pub fn client_http1(&self) -> Result<reqwest::Client> {
        reqwest::Client::builder()
            .tls_backend_preconfigured(self.tls_client_config(&[b"http/1.1"])?)
            .http1_only()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .context("building client")
    }

    /// An HTTPS client trusting the test CA whose connections come from `ip` (127.0.0.2,
    /// 127.0.0.3, ... play other hosts).
    pub fn client_from(&self, ip: IpAddr) -> Result<reqwest::Client> {
        self.client_builder()?
            .local_address(ip)
            .build()
            .context("building client")
    }

    fn client_builder(&self) -> Result<reqwest::ClientBuilder> {
        Ok(reqwest::Client::builder()
            .tls_backend_preconfigured(self.tls_client_config(&[b"h2", b"http/1.1"])?)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30)))
    }

    /// Sends `request` verbatim over TLS (ALPN http/1.1) and reads until the server closes
    /// the connection or `timeout` passes.
    pub async fn raw_tls(&self, request: &[u8], timeout: Duration) -> Result<RawExchange> {
        let cfg = Arc::new(self.tls_client_config(&[b"http/1.1"])?);
        let connector = tokio_rustls::TlsConnector::from(cfg);
        let tcp = TcpStream::connect(self.https).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost")?;
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(request).await?;
        tls.flush().await?;
        read_until_closed(&mut tls, timeout).await
    }

    /// Sends `request` verbatim over the plain-HTTP listener.
    pub async fn raw_http(&self, request: &[u8], timeout: Duration) -> Result<RawExchange> {
        let addr = self
            .http
            .context("the coordinator has no plain-HTTP listener")?;
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(request).await?;
        read_until_closed(&mut tcp, timeout).await
    }

    /// The OpenMetrics text of the metrics endpoint.
    pub async fn metrics_text(&self) -> Result<String> {
        let r = crate::http_get(
            &format!("http://{}/metrics", self.metrics),
            Duration::from_secs(5),
        )
        .await?;
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }

    /// Sum of every sample of metric `name` whose labels contain all of `labels`
    /// (`key="value"` strings).
    pub async fn metric_sum(&self, name: &str, labels: &[&str]) -> Result<f64> {
        let text = self.metrics_text().await?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next().is_some_and(|n| n == name))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Asks the coordinator to reload its certificate, htpasswd file and access log (what
    /// SIGHUP does for the binary).
    pub fn reload(&self) {
        let _ = self.reload.send(());
    }

    /// Stops the coordinator (graceful drain) and returns its result.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().context("already stopped")?;
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .context("coordinator did not stop within 20 s")?
            .context("coordinator task panicked")?
    }
}

impl Drop for TestCoordinator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// What came back from a raw exchange.
#[derive(Debug)]
pub struct RawExchange {
    /// Everything the server sent.
    pub bytes: Vec<u8>,
    /// Whether the server closed the connection (EOF or reset) before the timeout.
    pub closed: bool,
}

impl RawExchange {
    /// The status code of the first response, if any arrived.
    pub fn status(&self) -> Option<u16> {
        let text = String::from_utf8_lossy(&self.bytes);
        text.lines().next()?.split_whitespace().nth(1)?.parse().ok()
    }

    /// The status of every response that arrived, in order. (Status lines are found
    /// anywhere: a body without a trailing newline runs into the next status line.)
    pub fn statuses(&self) -> Vec<u16> {
        let text = self.text();
        text.match_indices("HTTP/1.1 ")
            .filter_map(|(i, m)| text.get(i + m.len()..i + m.len() + 3)?.parse().ok())
            .collect()
    }

    /// How many responses arrived.
    pub fn responses(&self) -> usize {
        self.statuses().len()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

async fn read_until_closed<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    timeout: Duration,
) -> Result<RawExchange> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + timeout;
    let closed = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) => break true,
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            // A reset after the response, or a TLS close without close_notify, is a close.
            Ok(Err(_)) => break true,
        }
    };
    Ok(RawExchange { bytes, closed })
}
