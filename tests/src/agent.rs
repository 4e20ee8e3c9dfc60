//! Shoal agents for tests: in-process ([`TestAgent`], started with `shoal_agent::run` on
//! listeners bound to port 0) and as a real process ([`AgentProcess`], for `kill -9` and
//! restarts).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use shoal_agent::{Config, Listeners, Overrides};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::net::{free_port_on, http_get, wait_until};

/// The registry host name tests give their upstream (what `?ns=` would carry).
pub const UPSTREAM_HOST: &str = "registry.test";

/// How to configure a test agent.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// `(host, url)` of each upstream; the first is the default.
    pub upstreams: Vec<(String, String)>,
    pub ip: IpAddr,
    /// Store directory; a fresh temp dir when `None`.
    pub store_dir: Option<PathBuf>,
    pub tag_cache_ttl: Duration,
    pub offline_grace: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_retries: u32,
    /// Extra lines for the `[mirror]` section, e.g. `drain_timeout = "1s"`.
    pub mirror_extra: String,
    /// Extra lines for the `[store]` section, e.g. `max_size = "10MiB"`.
    pub store_extra: String,
    /// Whole sections appended to the config, e.g. `[cluster]` and `[peer]` tables.
    pub extra_toml: String,
    /// Extra lines for every `[[upstream]]` table (e.g. `ca_file`, `fallback_urls`).
    pub upstream_toml: String,
    /// How long [`TestAgent::start_with`] waits for the mirror to answer (a cluster member
    /// enrolls first).
    pub ready_timeout: Duration,
    /// Run the agent on a runtime of its own (one worker thread), so that
    /// [`TestAgent::kill`] can end every task it spawned at once, like a crash.
    pub own_runtime: bool,
}

impl AgentOptions {
    /// One plain-HTTP upstream named [`UPSTREAM_HOST`], with short timeouts so failures show fast.
    pub fn new(upstream_url: &str) -> AgentOptions {
        AgentOptions {
            upstreams: vec![(UPSTREAM_HOST.to_owned(), upstream_url.to_owned())],
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            store_dir: None,
            tag_cache_ttl: Duration::from_secs(30),
            offline_grace: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5),
            max_retries: 2,
            mirror_extra: String::new(),
            store_extra: String::new(),
            extra_toml: String::new(),
            upstream_toml: String::new(),
            ready_timeout: Duration::from_secs(10),
            own_runtime: false,
        }
    }

    /// The TOML config text for these options, with the store under `store_root`.
    pub fn toml(&self, store_root: &Path, listen: SocketAddr, metrics: SocketAddr) -> String {
        let mut t = format!(
            "[mirror]\nlisten = \"{listen}\"\ndefault_upstream = \"{}\"\n\
             tag_cache_ttl = \"{}ms\"\noffline_grace = \"{}ms\"\n{}\n\
             [metrics]\nlisten = \"{metrics}\"\n\
             [store]\nroot = \"{}\"\n{}\n",
            self.upstreams[0].0,
            self.tag_cache_ttl.as_millis(),
            self.offline_grace.as_millis(),
            self.mirror_extra,
            store_root.display(),
            self.store_extra,
        );
        for (host, url) in &self.upstreams {
            t.push_str(&format!(
                "[[upstream]]\nhost = \"{host}\"\nurl = \"{url}\"\ninsecure_http = true\n\
                 connect_timeout = \"{}ms\"\nidle_timeout = \"{}ms\"\nmax_retries = {}\n{}\n",
                self.connect_timeout.as_millis(),
                self.idle_timeout.as_millis(),
                self.max_retries,
                self.upstream_toml,
            ));
        }
        if !self.extra_toml.is_empty() {
            t.push('\n');
            t.push_str(&self.extra_toml);
            t.push('\n');
        }
        t
    }
}

/// An agent running inside the test process.
pub struct TestAgent {
    mirror: SocketAddr,
    metrics: SocketAddr,
    store_root: PathBuf,
    _store_dir: Option<TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), shoal_agent::AgentError>>>,
    /// The agent's own runtime, with [`AgentOptions::own_runtime`] (taken by a kill).
    runtime: std::sync::Mutex<Option<tokio::runtime::Runtime>>,
}

impl TestAgent {
    /// An agent in front of `upstream_url` with default test options.
    pub async fn start(upstream_url: &str) -> Result<TestAgent> {
        TestAgent::start_with(AgentOptions::new(upstream_url)).await
    }

    pub async fn start_with(opts: AgentOptions) -> Result<TestAgent> {
        crate::init_tracing();
        let (store_root, temp) = match &opts.store_dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::tempdir().context("creating the store temp dir")?;
                (t.path().join("store"), Some(t))
            }
        };
        // Bound here (std), registered with whichever runtime runs the agent.
        let bind = |ip: IpAddr| -> Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind((ip, 0))?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let (mirror, metrics) = (bind(opts.ip)?, bind(opts.ip)?);
        let (mirror_addr, metrics_addr) = (mirror.local_addr()?, metrics.local_addr()?);
        let text = opts.toml(&store_root, mirror_addr, metrics_addr);
        let config = Config::from_toml(&text, &Overrides::default(), None)
            .with_context(|| format!("test agent config:\n{text}"))?;
        let (tx, rx) = oneshot::channel::<()>();
        let run = async move {
            let listeners = Listeners {
                mirror: TcpListener::from_std(mirror)
                    .map_err(|e| shoal_agent::AgentError::Internal(e.to_string()))?,
                metrics: Some(
                    TcpListener::from_std(metrics)
                        .map_err(|e| shoal_agent::AgentError::Internal(e.to_string()))?,
                ),
            };
            shoal_agent::run(config, listeners, async move {
                let _ = rx.await;
            })
            .await
        };
        let (task, runtime) = if opts.own_runtime {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(format!("agent-{}", opts.ip))
                .enable_all()
                .build()
                .context("building the agent's runtime")?;
            (rt.spawn(run), Some(rt))
        } else {
            (tokio::spawn(run), None)
        };
        let mut agent = TestAgent {
            mirror: mirror_addr,
            metrics: metrics_addr,
            store_root,
            _store_dir: temp,
            shutdown: Some(tx),
            task: Some(task),
            runtime: std::sync::Mutex::new(runtime),
        };
        let url = format!("{}/v2/", agent.url());
        let ready = wait_until(opts.ready_timeout, "test agent answers /v2/", || {
            let url = url.clone();
            let finished = agent.task.as_ref().is_some_and(JoinHandle::is_finished);
            async move {
                finished
                    || http_get(&url, Duration::from_secs(2))
                        .await
                        .is_ok_and(|r| r.status == 200)
            }
        })
        .await;
        // Fail with the agent's own error if it stopped (bad config, enrollment refused).
        if let Some(task) = agent.task.take_if(|t| t.is_finished()) {
            return match task.await {
                Ok(Ok(())) => Err(anyhow::anyhow!("test agent stopped right after starting")),
                Ok(Err(e)) => Err(anyhow::Error::from(e).context("test agent failed to start")),
                Err(e) => Err(anyhow::anyhow!("test agent panicked at start: {e}")),
            };
        }
        ready?;
        Ok(agent)
    }

    /// `http://ip:port` of the mirror.
    pub fn url(&self) -> String {
        format!("http://{}", self.mirror)
    }

    /// `ip:port` of the mirror, as skopeo and image names want it.
    pub fn host_port(&self) -> String {
        self.mirror.to_string()
    }

    pub fn store_root(&self) -> &Path {
        &self.store_root
    }

    /// The metrics exposition text.
    pub async fn metrics_text(&self) -> Result<String> {
        let r = http_get(
            &format!("http://{}/metrics", self.metrics),
            Duration::from_secs(5),
        )
        .await?;
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }

    /// The value of one sample (`name` includes labels, e.g. `shoal_agent_cache_hits_total{kind="blob"}`);
    /// 0 when absent.
    pub async fn metric(&self, sample: &str) -> Result<f64> {
        Ok(metric_value(&self.metrics_text().await?, sample))
    }

    /// Asks the agent to shut down and waits for it to finish draining.
    pub async fn stop(mut self) -> Result<()> {
        self.stop_inner().await
    }

    /// Ends the agent at once, like a crash: every task it spawned (mirror, peer endpoint,
    /// control sessions, downloads) is dropped without a goodbye, and its sockets close
    /// without sending anything. The store stays on disk. Needs [`AgentOptions::own_runtime`]
    /// (without it, tasks the agent spawned on the shared runtime would live on).
    pub fn kill(&self) -> Result<()> {
        let Some(rt) = self.take_runtime() else {
            bail!("kill needs a running agent started with own_runtime");
        };
        // Keep the shutdown sender: dropping it would start a graceful shutdown.
        if let Some(task) = &self.task {
            task.abort();
        }
        rt.shutdown_background();
        Ok(())
    }

    fn take_runtime(&self) -> Option<tokio::runtime::Runtime> {
        self.runtime
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Whether the agent's main task is still running.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    async fn stop_inner(&mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(40), task)
                .await
                .context("agent did not stop within 40 s")?
                .context("agent task panicked")??;
        }
        if let Some(rt) = self.take_runtime() {
            rt.shutdown_background();
        }
        Ok(())
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
        // Not a plain drop: dropping a runtime from async code panics.
        if let Some(rt) = self.take_runtime() {
            rt.shutdown_background();
        }
    }
}

/// Reads one sample from an OpenMetrics text; 0 when absent.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(sample))
        .filter_map(|rest| rest.strip_prefix(' '))
        .filter_map(|v| v.trim().parse().ok())
        .next()
        .unwrap_or(0.0)
}

/// A `shoal-agent` running as its own process.
pub struct AgentProcess {
    bin: PathBuf,
    config: PathBuf,
    mirror: SocketAddr,
    metrics: SocketAddr,
    child: Option<Child>,
    log: PathBuf,
    _dir: TempDir,
}

impl AgentProcess {
    /// Starts `bin` (the agent binary) with `opts`; the store lives in `opts.store_dir` (so a
    /// restarted process finds it) or a temp dir.
    pub async fn start(bin: &Path, opts: &AgentOptions) -> Result<AgentProcess> {
        let mirror = SocketAddr::new(opts.ip, free_port_on(opts.ip)?);
        let metrics = SocketAddr::new(opts.ip, free_port_on(opts.ip)?);
        AgentProcess::start_at(bin, opts, mirror, metrics).await
    }

    /// Like [`AgentProcess::start`], with the mirror and metrics on the given addresses (which
    /// must be free), e.g. the well-known 127.0.0.1:5050 for a demo. `opts.ip` is not used.
    pub async fn start_at(
        bin: &Path,
        opts: &AgentOptions,
        mirror: SocketAddr,
        metrics: SocketAddr,
    ) -> Result<AgentProcess> {
        let dir = tempfile::tempdir()?;
        let store = opts
            .store_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("store"));
        let config = dir.path().join("agent.toml");
        std::fs::write(&config, opts.toml(&store, mirror, metrics))?;
        let mut p = AgentProcess {
            bin: bin.to_owned(),
            config,
            mirror,
            metrics,
            child: None,
            log: dir.path().join("agent.log"),
            _dir: dir,
        };
        p.spawn().await?;
        Ok(p)
    }

    async fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        // Poll readiness, but stop at once if the process exits (port taken, bad config).
        let url = format!("{}/v2/", self.url());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "agent exited with {status} before answering /v2/; agent log:\n{}",
                    self.log_text()
                );
            }
            if http_get(&url, Duration::from_secs(2))
                .await
                .is_ok_and(|r| r.status == 200)
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "agent process did not answer /v2/ within 20 s; agent log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(crate::net::POLL_INTERVAL).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.mirror)
    }

    pub fn host_port(&self) -> String {
        self.mirror.to_string()
    }

    pub fn log_text(&self) -> String {
        crate::file_tail(&self.log, 64 * 1024)
    }

    /// The file the agent's stderr (its log) goes to; removed with the process's temp dir.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The generated configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The process id, while the process runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// `http://ip:port` of the metrics listener (`/metrics`, `/healthz`).
    pub fn metrics_url(&self) -> String {
        format!("http://{}", self.metrics)
    }

    /// The metrics exposition text.
    pub async fn metrics_text(&self) -> Result<String> {
        let r = http_get(
            &format!("{}/metrics", self.metrics_url()),
            Duration::from_secs(5),
        )
        .await?;
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }

    /// The value of one sample, as [`TestAgent::metric`]; 0 when absent.
    pub async fn metric(&self, sample: &str) -> Result<f64> {
        Ok(metric_value(&self.metrics_text().await?, sample))
    }

    /// The exit status if the process has exited on its own (crashed, or was stopped by a
    /// signal that did not come from this handle); `None` while it runs or after
    /// [`AgentProcess::kill9`] or [`AgentProcess::terminate`].
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match &mut self.child {
            Some(c) => Ok(c.try_wait()?),
            None => Ok(None),
        }
    }

    /// SIGKILL: no chance to clean up, as in a crash or an OOM kill.
    pub async fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.start_kill()?;
            tokio::time::timeout(Duration::from_secs(10), c.wait())
                .await
                .context("agent did not die")??;
        }
        Ok(())
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub async fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let Some(mut c) = self.child.take() else {
            bail!("agent is not running")
        };
        let pid = c.id().context("agent has no pid")?;
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        Ok(tokio::time::timeout(Duration::from_secs(40), c.wait())
            .await
            .context("agent did not exit within 40 s of SIGTERM")??)
    }

    /// Starts the process again with the same config and store.
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("agent is still running");
        }
        self.spawn().await
    }
}
