//! `shoal-demo`: Shoal's main job on this machine, every part a real process (`scripts/demo`
//! builds and runs it).
//!
//! It starts an upstream registry (Debian's `docker-registry`), one `shoal-coordinator` (the
//! registry front door, with its `[cluster]` section: the cluster CA in its data dir, a
//! bootstrap token made with `shoal-coordinator cluster token`, the control channel on a UDP
//! port), and N `shoal-agent`s (`--agents`, 3 by default) on 127.0.0.2, 127.0.0.3, ..., each
//! with its own store, enrolled with the bootstrap token, peer sharing on, and the
//! coordinator's front door as its upstream, as the README deploys them (agent, coordinator,
//! registry). It pushes a generated image to the registry, pulls it through every agent at the
//! same moment (one skopeo per agent), verifies every digest, and reports where the bytes came
//! from: the registry's access log, and each agent's metrics (bytes from the origin, from its
//! peers, sent to its peers). A second pull through agent 1 is then served from its cache.
//!
//! Then it keeps everything running so a person can point their own runtime at agent 1, until
//! Ctrl-C or SIGTERM (`--once` stops after the report), and stops every process it started:
//! the agents, then the coordinator (SIGTERM, so they drain), then the registry; its temp dirs
//! are removed (`--store DIR` keeps the agents' stores).

use std::ffi::OsStr;
use std::future::Future;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use shoal_tests::cluster::free_udp_port;
use shoal_tests::{
    CopyOptions, ImageSpec, Registry, Skopeo, TestImage, free_port_on, http_get, metric_value,
    require_tools, verify_layout,
};
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// The registry name agents and the coordinator know the demo registry by (what containerd
/// sends in `?ns=`).
const UPSTREAM: &str = "registry.demo";
/// Repository and tag of the demo image.
const REPO: &str = "demo/app";
const TAG: &str = "v1";
/// Uncompressed sizes of the image's random layers: 24 MiB in all.
const LAYERS_MIB: [usize; 3] = [4, 8, 12];
/// Fixed, so the image (and its digests) are the same on every run: with `--store`, a second
/// run finds the layers already cached.
const SEED: u64 = 20_240_501;
/// The coordinator's `[cluster] name`, as the agents list it.
const COORDINATOR_NAME: &str = "coord-demo";
/// The agents' topology label (all on one host here).
const ZONE: &str = "demo/host1";
/// Agent `i` (from 1) runs on 127.0.0.(1 + i): 127.0.0.2, 127.0.0.3, ...
const FIRST_AGENT_IP: u8 = 2;
/// The agents' default ports; each agent has an address of its own, so all can have them.
const PREFERRED_MIRROR_PORT: u16 = 5050;
const PREFERRED_METRICS_PORT: u16 = 9465;
const PREFERRED_PEER_PORT: u16 = 7470;
/// How long a process may take to answer after it started (an agent enrolls first).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may take to exit after SIGTERM (the agent drains for up to 30 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(40);
/// Lines of a process's log shown when it failed.
const LOG_TAIL_LINES: usize = 20;

/// Shows what Shoal does, with every part a real process on this machine.
///
/// Starts an upstream registry (docker-registry), one shoal-coordinator (the registry front
/// door, with the cluster CA, enrollment and the tracker), and N shoal-agents on 127.0.0.2,
/// 127.0.0.3, ..., each with its own store, enrolled in the cluster with a bootstrap token,
/// sharing pieces with each other over QUIC, and reading the registry through the
/// coordinator's front door. Pushes a generated 24 MiB image, pulls it through all agents at
/// the same moment (one skopeo per agent), verifies every digest, and reports the bytes the
/// registry served against the image size and, per agent, the bytes from the origin and from
/// its peers. Then pulls it once more through agent 1, from its cache.
///
/// Then everything keeps running until Ctrl-C or SIGTERM, so you can pull through agent 1
/// (127.0.0.2:5050) with your own docker, containerd, podman or skopeo; the instructions are
/// printed. Stopping ends every process it started and removes its temp dirs.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Do the pulls, print the report and stop, instead of waiting for Ctrl-C.
    #[arg(long)]
    once: bool,
    /// Number of agents, on 127.0.0.2, 127.0.0.3, ... (1 to 8).
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u8).range(1..=8))]
    agents: u8,
    /// Keep the agents' content stores in DIR/agent-1, DIR/agent-2, ... (kept after exit)
    /// instead of temp dirs; a second run then finds the image cached.
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Mirror port of every agent, each on its own address [default: 5050 if free, else any
    /// free port].
    #[arg(long, value_name = "PORT")]
    port: Option<u16>,
    /// Metrics port of every agent [default: 9465 if free, else any free port].
    #[arg(long, value_name = "PORT")]
    metrics_port: Option<u16>,
}

impl Args {
    fn agent_count(&self) -> usize {
        usize::from(self.agents)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shoal-demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Interrupted) => ExitCode::from(130),
        Err(e) => {
            eprintln!("\nshoal-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

enum Outcome {
    /// Ran to the end (`--once`), or was stopped by a signal while waiting, as intended.
    Done,
    /// Stopped by a signal before the pulls were done.
    Interrupted,
}

async fn run(args: Args) -> Result<Outcome> {
    let bins = Binaries::find()?;
    require_tools()?;
    check_ports(&args)?;
    let mut signals = Signals::install()?;
    let mut demo = Demo::default();

    let n = args.agent_count();
    println!(
        "Shoal demo: an upstream registry, shoal-coordinator in front of it, {n} shoal-agent{} \
         in its cluster,\nand one pull through all of them at once.\n",
        plural(n)
    );
    let pulled = tokio::select! {
        r = demo.setup_and_pull(&args, &bins) => Some(r),
        name = signals.recv() => {
            Step::fail();
            println!("{name}: stopping before the demo finished");
            None
        }
    };
    let outcome = match pulled {
        None => Outcome::Interrupted,
        Some(Err(e)) => {
            Step::fail();
            demo.print_logs_after_failure(&e);
            demo.stop().await;
            return Err(e);
        }
        Some(Ok(())) if args.once => {
            println!("--once: stopping (without it, everything keeps running for your own pulls)");
            Outcome::Done
        }
        Some(Ok(())) => {
            demo.print_usage();
            if let Err(e) = demo.wait(&mut signals).await {
                demo.stop().await;
                return Err(e);
            }
            Outcome::Done
        }
    };
    demo.stop().await;
    Ok(outcome)
}

/// The `shoal-agent` and `shoal-coordinator` binaries next to this one (all are built into
/// `target/<profile>/`).
struct Binaries {
    agent: PathBuf,
    coordinator: PathBuf,
}

impl Binaries {
    fn find() -> Result<Binaries> {
        let me = std::env::current_exe().context("finding this program's own path")?;
        let find = |name: &str| {
            let bin = me.with_file_name(name);
            if !bin.is_file() {
                bail!(
                    "{} not found: shoal-demo runs the {name} binary from its own directory. \
                     Build them with `cargo build --release -p shoal-agent -p shoal-coordinator \
                     -p shoal-tests --bin shoal-agent --bin shoal-coordinator --bin shoal-demo`, \
                     or run `scripts/demo`, which does that",
                    bin.display()
                );
            }
            Ok(bin)
        };
        Ok(Binaries {
            agent: find("shoal-agent")?,
            coordinator: find("shoal-coordinator")?,
        })
    }
}

/// SIGINT (Ctrl-C) and SIGTERM, installed once at start so that neither kills the demo before
/// it has stopped its processes and removed its temp dirs.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "interrupt",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

/// One process the demo started, its standard error (and output) going to a log file.
///
/// It stays in the demo's process group: a Ctrl-C in the terminal reaches it too (the agent
/// and the coordinator take it as a request to drain and stop, like SIGTERM), and a terminal
/// that hangs up takes it along, so nothing outlives the demo. Dropped while running, it is
/// killed.
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    /// Whether the end of its log was already shown in an error.
    log_shown: std::cell::Cell<bool>,
}

impl Proc {
    fn spawn(name: &str, bin: &Path, args: &[&OsStr], log: PathBuf) -> Result<Proc> {
        let file = std::fs::File::create(&log)
            .with_context(|| format!("creating the log file {}", log.display()))?;
        let child = Command::new(bin)
            .args(args)
            // Plain text in the log files (tracing colours its output otherwise).
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            log,
            log_shown: std::cell::Cell::new(false),
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().and_then(Child::id).unwrap_or(0)
    }

    /// The exit status if the process has exited on its own.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Whether it has exited and an error showed the end of its log.
    fn exit_reported(&mut self) -> bool {
        self.log_shown.get() && self.exited().is_some()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The end of its log, indented, for an error message.
    fn log_tail(&self) -> String {
        self.log_tail_lines(LOG_TAIL_LINES)
    }

    fn log_tail_lines(&self, lines: usize) -> String {
        self.log_shown.set(true);
        let text = tail(&self.log_text(), lines);
        if text.trim().is_empty() {
            return "    <empty>".to_owned();
        }
        text.lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Polls `ready` until it holds; fails at once, with the end of the log, if the process
    /// exits, and after `timeout` otherwise.
    async fn wait_ready<F, Fut>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut ready: F,
    ) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Err(ProcessFailed(format!(
                    "{} exited ({status}) before it could {what}; the end of its log:\n{}",
                    self.name,
                    self.log_tail()
                ))
                .into());
            }
            if tokio::time::timeout_at(deadline, ready())
                .await
                .unwrap_or(false)
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ProcessFailed(format!(
                    "{} did not {what} within {timeout:?}; the end of its log:\n{}",
                    self.name,
                    self.log_tail()
                ))
                .into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then waits for the exit (agents and coordinators drain in-flight transfers
    /// first); SIGKILL after `timeout`. Returns the exit status.
    async fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("{} is not running", self.name);
        };
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        let pid = child.id().context("no pid")?;
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await
            .context("running kill")?;
        if !sent.success()
            && let Some(status) = child.try_wait()?
        {
            // It exited between the two checks.
            return Ok(status);
        }
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                child.kill().await.ok();
                bail!(
                    "{} did not exit within {timeout:?} of SIGTERM; killed",
                    self.name
                )
            }
        }
    }
}

/// A process failed, and the message shows the end of its log already.
#[derive(Debug)]
struct ProcessFailed(String);

impl std::fmt::Display for ProcessFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProcessFailed {}

/// Runs a one-shot command (`shoal-coordinator cert init`, ...) and returns its output.
async fn run_tool(bin: &Path, args: &[&OsStr], what: &str) -> Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("{what}: no answer within 30 s"))?
    .with_context(|| format!("{what}: running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), LOG_TAIL_LINES)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A string as a TOML basic string (JSON's escapes are TOML's).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a str serialises")
}

fn toml_path(p: &Path) -> String {
    toml_str(&p.to_string_lossy())
}

/// The running `shoal-coordinator serve`, and the files agents need to join its cluster.
struct Coordinator {
    proc: Proc,
    dir: PathBuf,
    https: SocketAddr,
    ctl: SocketAddr,
    metrics: SocketAddr,
    /// `ca_pin` for the agents: the front door CA's key, from `shoal-coordinator cluster pin`.
    pin: String,
    /// The bootstrap token for the agents (`bootstrap_token_file`).
    agent_token: PathBuf,
}

impl Coordinator {
    /// Does what the README's "Joining agents to a cluster" says, with the real binary: a
    /// front door certificate (`cert init`), a bootstrap token (`cluster token`), the pin
    /// (`cluster pin`), a config with `[cluster]`, then `serve`, which creates the cluster CA.
    async fn start(bin: &Path, dir: &Path, registry_url: &str) -> Result<Coordinator> {
        std::fs::create_dir_all(dir.join("spool"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let tls = dir.join("tls");
        run_tool(
            bin,
            &[
                "cert".as_ref(),
                "init".as_ref(),
                "--host".as_ref(),
                "localhost".as_ref(),
                "--ip".as_ref(),
                "127.0.0.1".as_ref(),
                "--out".as_ref(),
                tls.as_os_str(),
            ],
            "shoal-coordinator cert init",
        )
        .await?;
        let tokens = dir.join("bootstrap-tokens");
        let token = run_tool(
            bin,
            &[
                "cluster".as_ref(),
                "token".as_ref(),
                "--file".as_ref(),
                tokens.as_os_str(),
            ],
            "shoal-coordinator cluster token",
        )
        .await?;
        let agent_token = dir.join("agent-bootstrap-token");
        write_private(&agent_token, token.trim().as_bytes())?;
        let pin = run_tool(
            bin,
            &[
                "cluster".as_ref(),
                "pin".as_ref(),
                tls.join("ca.crt").as_os_str(),
            ],
            "shoal-coordinator cluster pin",
        )
        .await?
        .trim()
        .to_owned();

        // Ports are found free, then bound by the coordinator: if one was taken in between,
        // the coordinator says so and exits, and a second attempt takes other ports.
        let mut first_error = None;
        for _attempt in 0..2 {
            let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let https = SocketAddr::new(lo, free_port_on(lo)?);
            let metrics = SocketAddr::new(lo, free_port_on(lo)?);
            let ctl = SocketAddr::new(lo, free_udp_port(lo)?);
            let config = dir.join("coordinator.toml");
            std::fs::write(
                &config,
                coordinator_toml(dir, https, metrics, ctl, &tokens, registry_url),
            )
            .with_context(|| format!("writing {}", config.display()))?;
            let mut proc = Proc::spawn(
                "shoal-coordinator",
                bin,
                &["serve".as_ref(), "-c".as_ref(), config.as_os_str()],
                dir.join("coordinator.log"),
            )?;
            let ca = dir.join("cluster").join("ca.crt");
            let ready = proc
                .wait_ready(READY_TIMEOUT, "answer and create the cluster CA", || {
                    let ca = ca.clone();
                    async move {
                        ca.is_file()
                            && http_get(
                                &format!("http://{metrics}/healthz"),
                                Duration::from_secs(2),
                            )
                            .await
                            .is_ok_and(|r| r.status == 200)
                    }
                })
                .await;
            match ready {
                Ok(()) => {
                    return Ok(Coordinator {
                        proc,
                        dir: dir.to_owned(),
                        https,
                        ctl,
                        metrics,
                        pin,
                        agent_token,
                    });
                }
                Err(e) if first_error.is_none() && proc.log_text().contains("in use") => {
                    first_error = Some(e);
                }
                Err(e) => return Err(with_first(e, first_error)),
            }
        }
        Err(first_error.expect("the loop only ends after a first error"))
    }

    /// The front door's CA certificate (`cert init`'s `ca.crt`): what the agents trust for
    /// their upstream.
    fn front_door_ca(&self) -> PathBuf {
        self.dir.join("tls").join("ca.crt")
    }

    /// The cluster CA certificate, created by the coordinator at first start.
    fn cluster_ca(&self) -> PathBuf {
        self.dir.join("cluster").join("ca.crt")
    }

    async fn metrics_text(&self) -> Result<String> {
        let r = http_get(
            &format!("http://{}/metrics", self.metrics),
            Duration::from_secs(5),
        )
        .await
        .context("reading the coordinator's metrics")?;
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }

    /// Waits until `n` agents hold a control session (the coordinator's own count).
    async fn wait_connected(&mut self, n: usize) -> Result<()> {
        let url = format!("http://{}/metrics", self.metrics);
        self.proc
            .wait_ready(
                READY_TIMEOUT,
                &format!("see {n} agents connected on its control channel"),
                || {
                    let url = url.clone();
                    async move {
                        let Ok(r) = http_get(&url, Duration::from_secs(2)).await else {
                            return false;
                        };
                        let text = String::from_utf8_lossy(&r.body);
                        metric_value(&text, "shoal_coordinator_cluster_nodes_connected") == n as f64
                    }
                },
            )
            .await
    }
}

fn coordinator_toml(
    dir: &Path,
    https: SocketAddr,
    metrics: SocketAddr,
    ctl: SocketAddr,
    tokens: &Path,
    registry_url: &str,
) -> String {
    format!(
        "# shoal-coordinator of the Shoal demo (written by shoal-demo; deploy/coordinator.toml
# documents every setting).
[server]
listen = \"{https}\"
tls_cert = {cert}
tls_key = {key}
drain_timeout = \"10s\"

[metrics]
listen = \"{metrics}\"

[log]
access_log = {access}

[auth]
# The demo's front door listens on loopback only; a real one has an htpasswd file.
insecure_no_auth = true

[coalescing]
spool_dir = {spool}

[cluster]
name = \"{COORDINATOR_NAME}\"
listen = \"{ctl}\"
data_dir = {data}
bootstrap_tokens_file = {tokens}

[[registry]]
host = \"{UPSTREAM}\"
insecure_http = true

[[registry.replica]]
url = {registry}
",
        cert = toml_path(&dir.join("tls").join("server.crt")),
        key = toml_path(&dir.join("tls").join("server.key")),
        access = toml_path(&dir.join("access.log")),
        spool = toml_path(&dir.join("spool")),
        data = toml_path(&dir.join("cluster")),
        tokens = toml_path(tokens),
        registry = toml_str(registry_url),
    )
}

/// Writes a file only its owner can read (a bootstrap token).
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// `e`, with the error of an earlier attempt attached.
fn with_first(e: anyhow::Error, first: Option<anyhow::Error>) -> anyhow::Error {
    match first {
        Some(first) => e.context(format!("first attempt: {first:#}")),
        None => e,
    }
}

/// One running `shoal-agent`.
struct Agent {
    /// From 1.
    index: usize,
    ip: Ipv4Addr,
    mirror: SocketAddr,
    metrics: SocketAddr,
    peer: SocketAddr,
    config: PathBuf,
    proc: Proc,
}

fn agent_ip(index: usize) -> Ipv4Addr {
    let last = u8::try_from(index).expect("at most 8 agents") + FIRST_AGENT_IP - 1;
    Ipv4Addr::new(127, 0, 0, last)
}

impl Agent {
    /// Starts agent `index` (from 1) with its config, log and cluster state in `dir` and its
    /// store in `store`, and waits until it has enrolled and answers its mirror port.
    async fn start(
        bin: &Path,
        index: usize,
        dir: &Path,
        store: &Path,
        coordinator: &Coordinator,
        args: &Args,
    ) -> Result<Agent> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ip = agent_ip(index);
        let ipa = IpAddr::V4(ip);
        let mut first_error = None;
        for attempt in 0..2 {
            // First the well-known ports (each agent has an address of its own), then, if one
            // was taken, any free ones.
            let pick = |given: Option<u16>, preferred: u16| -> Result<u16> {
                match given {
                    Some(port) => Ok(port),
                    None if attempt == 0 && tcp_free(ipa, preferred) => Ok(preferred),
                    None => free_port_on(ipa),
                }
            };
            let mirror = SocketAddr::new(ipa, pick(args.port, PREFERRED_MIRROR_PORT)?);
            let metrics = SocketAddr::new(ipa, pick(args.metrics_port, PREFERRED_METRICS_PORT)?);
            let peer_port = if attempt == 0 && udp_free(ipa, PREFERRED_PEER_PORT) {
                PREFERRED_PEER_PORT
            } else {
                free_udp_port(ipa)?
            };
            let peer = SocketAddr::new(ipa, peer_port);
            let config = dir.join("agent.toml");
            let text = agent_toml(index, dir, store, mirror, metrics, peer, coordinator);
            std::fs::write(&config, text)
                .with_context(|| format!("writing {}", config.display()))?;
            let mut proc = Proc::spawn(
                &format!("shoal-agent {index}"),
                bin,
                &["--config".as_ref(), config.as_os_str()],
                dir.join("agent.log"),
            )?;
            let url = format!("http://{mirror}/v2/");
            let ready = proc
                .wait_ready(READY_TIMEOUT, "enroll and answer /v2/", || {
                    let url = url.clone();
                    async move {
                        http_get(&url, Duration::from_secs(2))
                            .await
                            .is_ok_and(|r| r.status == 200)
                    }
                })
                .await;
            match ready {
                Ok(()) => {
                    return Ok(Agent {
                        index,
                        ip,
                        mirror,
                        metrics,
                        peer,
                        config,
                        proc,
                    });
                }
                Err(e)
                    if first_error.is_none()
                        && args.port.is_none()
                        && args.metrics_port.is_none()
                        && proc.log_text().contains("in use") =>
                {
                    first_error = Some(e);
                }
                Err(e) => return Err(with_first(e, first_error)),
            }
        }
        Err(first_error.expect("the loop only ends after a first error"))
    }

    fn name(&self) -> String {
        format!("agent {}", self.index)
    }

    async fn metrics_text(&self) -> Result<String> {
        let r = http_get(
            &format!("http://{}/metrics", self.metrics),
            Duration::from_secs(5),
        )
        .await
        .with_context(|| format!("reading the metrics of {}", self.name()))?;
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }
}

fn agent_toml(
    index: usize,
    dir: &Path,
    store: &Path,
    mirror: SocketAddr,
    metrics: SocketAddr,
    peer: SocketAddr,
    coordinator: &Coordinator,
) -> String {
    format!(
        "# shoal-agent {index} of the Shoal demo (written by shoal-demo; deploy/agent.toml
# documents every setting).
[mirror]
listen = \"{mirror}\"
default_upstream = \"{UPSTREAM}\"

[metrics]
listen = \"{metrics}\"

[store]
root = {store}

# The registry, through the coordinator's front door (agent, coordinator, registry).
[[upstream]]
host = \"{UPSTREAM}\"
url = \"https://{https}\"
ca_file = {front_door_ca}

[cluster]
node_name = \"agent-{index}\"
zone = \"{ZONE}\"
peer_listen = \"{peer}\"
# Key and certificate, fresh for every run (the cluster CA is too).
state_dir = {state}
bootstrap_token_file = {token}
ca_pin = \"{pin}\"

[[cluster.coordinator]]
name = \"{COORDINATOR_NAME}\"
enroll_url = \"https://{https}\"
ctl_addr = \"{ctl}\"

[peer]
enabled = true
",
        store = toml_path(store),
        https = coordinator.https,
        front_door_ca = toml_path(&coordinator.front_door_ca()),
        state = toml_path(&dir.join("cluster")),
        token = toml_path(&coordinator.agent_token),
        pin = coordinator.pin,
        ctl = coordinator.ctl,
    )
}

/// Everything the demo started; each part stops and removes its temp dir when dropped.
#[derive(Default)]
struct Demo {
    registry: Option<Registry>,
    image: Option<TestImage>,
    coordinator: Option<Coordinator>,
    agents: Vec<Agent>,
    /// Configs, logs, the coordinator's files, the agents' state and stores (without
    /// `--store`), and the pulls' OCI layouts.
    work: Option<TempDir>,
    /// `--store DIR`, absolute.
    store: Option<PathBuf>,
}

/// One agent's counters (its metrics).
#[derive(Clone, Copy, Debug, Default)]
struct AgentCounters {
    /// Blob and manifest bytes from upstream (the origin, through the coordinator).
    origin: f64,
    peers_in: f64,
    peers_out: f64,
    served_cache: f64,
    served_upstream: f64,
    store_blobs: f64,
}

impl std::ops::Sub for AgentCounters {
    type Output = AgentCounters;
    fn sub(self, before: AgentCounters) -> AgentCounters {
        AgentCounters {
            origin: self.origin - before.origin,
            peers_in: self.peers_in - before.peers_in,
            peers_out: self.peers_out - before.peers_out,
            served_cache: self.served_cache - before.served_cache,
            served_upstream: self.served_upstream - before.served_upstream,
            store_blobs: self.store_blobs - before.store_blobs,
        }
    }
}

impl std::ops::Add for AgentCounters {
    type Output = AgentCounters;
    fn add(self, other: AgentCounters) -> AgentCounters {
        AgentCounters {
            origin: self.origin + other.origin,
            peers_in: self.peers_in + other.peers_in,
            peers_out: self.peers_out + other.peers_out,
            served_cache: self.served_cache + other.served_cache,
            served_upstream: self.served_upstream + other.served_upstream,
            store_blobs: self.store_blobs + other.store_blobs,
        }
    }
}

/// What the registry answered, from its access log.
#[derive(Clone, Copy, Debug, Default)]
struct OriginCounters {
    requests: usize,
    blob_gets: usize,
    bytes: u64,
    blob_bytes: u64,
}

impl std::ops::Sub for OriginCounters {
    type Output = OriginCounters;
    fn sub(self, before: OriginCounters) -> OriginCounters {
        OriginCounters {
            requests: self.requests - before.requests,
            blob_gets: self.blob_gets - before.blob_gets,
            bytes: self.bytes - before.bytes,
            blob_bytes: self.blob_bytes - before.blob_bytes,
        }
    }
}

/// The coordinator's tracker counters.
#[derive(Clone, Copy, Debug, Default)]
struct TrackerCounters {
    locates: f64,
    origin_slots: f64,
}

impl std::ops::Sub for TrackerCounters {
    type Output = TrackerCounters;
    fn sub(self, before: TrackerCounters) -> TrackerCounters {
        TrackerCounters {
            locates: self.locates - before.locates,
            origin_slots: self.origin_slots - before.origin_slots,
        }
    }
}

/// Every counter at one moment.
#[derive(Clone, Debug, Default)]
struct Snapshot {
    agents: Vec<AgentCounters>,
    origin: OriginCounters,
    tracker: TrackerCounters,
}

impl Snapshot {
    async fn take(
        registry: &Registry,
        coordinator: &Coordinator,
        agents: &[Agent],
    ) -> Result<Snapshot> {
        let mut counters = Vec::new();
        for a in agents {
            let text = a.metrics_text().await?;
            let m = |sample| metric_value(&text, sample);
            counters.push(AgentCounters {
                origin: m("shoal_agent_upstream_bytes_total"),
                peers_in: m("shoal_agent_peer_received_bytes_total"),
                peers_out: m("shoal_agent_peer_sent_bytes_total"),
                served_cache: m("shoal_agent_served_bytes_total{source=\"cache\"}"),
                served_upstream: m("shoal_agent_served_bytes_total{source=\"upstream\"}"),
                store_blobs: m("shoal_agent_store_blobs"),
            });
        }
        let text = coordinator.metrics_text().await?;
        // Readiness probes and the coordinator's health checks (GET /v2/ with no user agent)
        // are not pulls.
        let log: Vec<_> = registry
            .access_log()
            .into_iter()
            .filter(|e| !(e.path == "/v2/" && e.user_agent.is_empty()))
            .collect();
        let blob_gets: Vec<_> = log
            .iter()
            .filter(|e| e.method == "GET" && shoal_tests::proxy::blob_digest(&e.path).is_some())
            .collect();
        Ok(Snapshot {
            agents: counters,
            origin: OriginCounters {
                requests: log.len(),
                blob_gets: blob_gets.len(),
                bytes: log.iter().map(|e| e.bytes).sum(),
                blob_bytes: blob_gets.iter().map(|e| e.bytes).sum(),
            },
            tracker: TrackerCounters {
                locates: metric_value(&text, "shoal_coordinator_cluster_locates_total"),
                origin_slots: metric_value(
                    &text,
                    "shoal_coordinator_cluster_origin_slots_granted_total",
                ),
            },
        })
    }

    fn since(&self, before: &Snapshot) -> Snapshot {
        Snapshot {
            agents: self
                .agents
                .iter()
                .zip(&before.agents)
                .map(|(a, b)| *a - *b)
                .collect(),
            origin: self.origin - before.origin,
            tracker: self.tracker - before.tracker,
        }
    }

    fn all_agents(&self) -> AgentCounters {
        self.agents
            .iter()
            .fold(AgentCounters::default(), |sum, a| sum + *a)
    }
}

/// One pull, through one or several agents at once.
struct Pull {
    label: String,
    /// Each skopeo's time, by agent (index into `Demo::agents`).
    times: Vec<(usize, Duration)>,
    delta: Snapshot,
}

impl Pull {
    fn slowest(&self) -> Duration {
        self.times.iter().map(|(_, t)| *t).max().unwrap_or_default()
    }
}

impl Demo {
    async fn setup_and_pull(&mut self, args: &Args, bins: &Binaries) -> Result<()> {
        let n = args.agent_count();
        let work = tempfile::Builder::new()
            .prefix("shoal-demo-")
            .tempdir()
            .context("creating the demo's temp dir")?;
        let work_dir = work.path().to_owned();
        self.work = Some(work);

        let step = Step::start("starting the upstream registry (docker-registry)");
        let registry = Registry::start().await?;
        step.done(&registry.url());
        let registry: &Registry = self.registry.insert(registry);

        let sizes: Vec<usize> = LAYERS_MIB.iter().map(|m| m << 20).collect();
        let step = Step::start(&format!(
            "generating {REPO}:{TAG} ({} random layers, {} MiB)",
            sizes.len(),
            LAYERS_MIB.iter().sum::<usize>()
        ));
        let image = tokio::task::spawn_blocking(move || {
            TestImage::generate(&ImageSpec::new(sizes, SEED), TAG)
        })
        .await
        .context("image generation panicked")??;
        step.done(&format!("{} in layers", bytes(image.total_size)));
        let image: &TestImage = self.image.insert(image);

        let step = Step::start(&format!("pushing it with skopeo as {REPO}:{TAG}"));
        let dest = format!("{}/{REPO}:{TAG}", registry.host_port());
        Skopeo::push_image(image, &dest, &CopyOptions::default()).await?;
        step.done("");

        let step = Step::start("starting shoal-coordinator (front door, cluster CA, tracker)");
        let coordinator = Coordinator::start(
            &bins.coordinator,
            &work_dir.join("coordinator"),
            &registry.url(),
        )
        .await?;
        step.done(&format!(
            "https://{}, control channel udp {}, pid {}",
            coordinator.https,
            coordinator.ctl,
            coordinator.proc.pid()
        ));
        println!(
            "    cluster CA created in {}; bootstrap token from `cluster token`",
            coordinator
                .cluster_ca()
                .parent()
                .unwrap_or(Path::new("?"))
                .display()
        );
        let coordinator = self.coordinator.insert(coordinator);

        let step = Step::start(&format!(
            "starting {n} shoal-agent{} on {}, enrolling with the token",
            plural(n),
            ip_range(n)
        ));
        if let Some(dir) = &args.store {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the store directory {}", dir.display()))?;
            self.store = Some(std::path::absolute(dir)?);
        }
        let (shared, store_root, agents_dir): (&Coordinator, _, _) =
            (coordinator, self.store.as_deref(), &work_dir);
        let starts = (1..=n).map(move |i| {
            let dir = agents_dir.join(format!("agent-{i}"));
            let store = match store_root {
                Some(root) => root.join(format!("agent-{i}")),
                None => dir.join("store"),
            };
            async move { Agent::start(&bins.agent, i, &dir, &store, shared, args).await }
        });
        let mut first_error = None;
        for started in futures::future::join_all(starts).await {
            match started {
                Ok(agent) => self.agents.push(agent),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        coordinator.wait_connected(n).await?;
        step.done(&format!("{n} enrolled and connected"));
        for a in &self.agents {
            println!(
                "    agent {}  mirror {}  peers udp {}  pid {}",
                a.index,
                a.mirror,
                a.peer,
                a.proc.pid()
            );
        }
        println!(
            "    upstream {UPSTREAM}: the coordinator's front door, which forwards to the registry\n    \
             (agent -> coordinator -> registry, as the README deploys them); peer sharing on"
        );
        let coordinator: &Coordinator = coordinator;
        let agents = &self.agents;

        let pulls_dir = work_dir.join("pulls");
        std::fs::create_dir_all(&pulls_dir)
            .with_context(|| format!("creating {}", pulls_dir.display()))?;
        let before = Snapshot::take(registry, coordinator, agents).await?;
        let kept_blobs = before.all_agents().store_blobs;
        let label = if kept_blobs > 0.0 {
            "stores kept"
        } else {
            "cold"
        };
        let step = Step::start(&if n > 1 {
            format!("pull 1 ({label}): through all {n} agents at once, one skopeo each")
        } else {
            format!("pull 1 ({label}): through agent 1")
        });
        let copies = agents.iter().map(|a| {
            let src = format!("{}/{REPO}:{TAG}", a.mirror);
            let out = pulls_dir.join(format!("pull-1-agent-{}", a.index));
            async move {
                let copied = Skopeo::pull(&src, &out, &CopyOptions::default())
                    .await
                    .with_context(|| format!("pull 1 through agent {} ({src})", a.index))?;
                Ok::<_, anyhow::Error>((out, copied.elapsed))
            }
        });
        let copied = futures::future::join_all(copies).await;
        let after = Snapshot::take(registry, coordinator, agents).await?;
        let mut times = Vec::new();
        for (i, c) in copied.into_iter().enumerate() {
            let (out, elapsed) = c?;
            tokio::task::block_in_place(|| verify_layout(&out, image))
                .with_context(|| format!("verifying pull 1 through agent {}", i + 1))?;
            times.push((i, elapsed));
        }
        step.done(&format!(
            "{n} image{} with every digest verified",
            plural(n)
        ));
        let cold = Pull {
            label: if n > 1 {
                format!("pull 1 ({n} at once)")
            } else {
                "pull 1 (agent 1)".to_owned()
            },
            times,
            delta: after.since(&before),
        };

        let step = Step::start("pull 2 (warm): through agent 1 again");
        let before = Snapshot::take(registry, coordinator, agents).await?;
        let out = pulls_dir.join("pull-2-agent-1");
        let src = format!("{}/{REPO}:{TAG}", agents[0].mirror);
        let copied = Skopeo::pull(&src, &out, &CopyOptions::default())
            .await
            .context("pull 2 through agent 1")?;
        let after = Snapshot::take(registry, coordinator, agents).await?;
        tokio::task::block_in_place(|| verify_layout(&out, image)).context("verifying pull 2")?;
        step.done("every digest verified");
        let warm = Pull {
            label: "pull 2 (agent 1)".to_owned(),
            times: vec![(0, copied.elapsed)],
            delta: after.since(&before),
        };

        println!();
        if kept_blobs > 0.0 {
            println!(
                "The stores in {} already held {kept_blobs} blobs from an earlier run,\n\
                 so even pull 1 could be served from them.\n",
                self.store.as_deref().unwrap_or(Path::new("?")).display()
            );
        }
        report(image, agents, &cold, &warm);
        Ok(())
    }

    fn print_usage(&self) {
        let (Some(registry), Some(coordinator), Some(agent)) =
            (&self.registry, &self.coordinator, self.agents.first())
        else {
            return;
        };
        let mirror = agent.mirror;
        let url = format!("http://{mirror}");
        let reg = registry.host_port();
        let others = self.agents[1..]
            .iter()
            .map(|a| format!("http://{}", a.mirror))
            .collect::<Vec<_>>()
            .join(", ");
        let others = if others.is_empty() {
            String::new()
        } else {
            format!("  other agents {others}\n")
        };
        let work = self
            .work
            .as_ref()
            .map(|w| w.path().display().to_string())
            .unwrap_or_default();
        let stores = match &self.store {
            Some(dir) => format!("{}/agent-N (kept)", dir.display()),
            None => format!("{work}/agent-N/store (--store DIR keeps them)"),
        };
        println!(
            "\
Ready: the registry, shoal-coordinator and {n} shoal-agent{s} keep running. Point a client
at agent 1:

  mirror       {url}   (agent 1; upstream {UPSTREAM}, the default)
  metrics      http://{metrics}/metrics
  config, log  {config}, agent.log beside it
{others}  coordinator  https://{https} (front door), metrics http://{coord_metrics}/metrics
               its CA certificate: {ca}
  registry     {reg_url} (the origin)
  files        {work}/ (configs, logs, the cluster CA; removed at exit)
  stores       {stores}

  skopeo (naming the mirror; the default upstream answers):
    skopeo copy --src-tls-verify=false docker://{mirror}/{REPO}:{TAG} oci:/tmp/x:{TAG}

  docker (/etc/docker/daemon.json, then restart dockerd; docker sends no registry name, so
  the default upstream {UPSTREAM} answers `docker pull {REPO}:{TAG}`):
    {{ \"registry-mirrors\": [\"{url}\"] }}

  containerd (config_path = \"/etc/containerd/certs.d\"; containerd adds ?ns={UPSTREAM} to
  every request and the agent picks the upstream by it):
    # /etc/containerd/certs.d/{UPSTREAM}/hosts.toml
    server = \"http://{reg}\"
    [host.\"{url}\"]
      capabilities = [\"pull\", \"resolve\"]
    ctr images pull --hosts-dir /etc/containerd/certs.d {UPSTREAM}/{REPO}:{TAG}

  podman / CRI-O (/etc/containers/registries.conf):
    [[registry]]
    prefix = \"{UPSTREAM}\"
    location = \"{reg}\"
    insecure = true
    [[registry.mirror]]
    location = \"{mirror}\"
    insecure = true
    podman pull {UPSTREAM}/{REPO}:{TAG}

Press Ctrl-C to stop (the agents, then the coordinator, get SIGTERM and drain; the registry
and temp dirs go away).",
            n = self.agents.len(),
            s = plural(self.agents.len()),
            metrics = agent.metrics,
            config = agent.config.display(),
            https = coordinator.https,
            ca = coordinator.front_door_ca().display(),
            coord_metrics = coordinator.metrics,
            reg_url = registry.url(),
        );
    }

    /// Waits for Ctrl-C or SIGTERM; fails if a process exits on its own first.
    async fn wait(&mut self, signals: &mut Signals) -> Result<()> {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                name = signals.recv() => {
                    println!("\n{name}: stopping");
                    return Ok(());
                }
                _ = tick.tick() => {
                    for proc in self.procs() {
                        if let Some(status) = proc.exited() {
                            bail!(
                                "{} exited on its own ({status}); the end of its log:\n{}",
                                proc.name,
                                proc.log_tail()
                            );
                        }
                    }
                }
            }
        }
    }

    fn procs(&mut self) -> impl Iterator<Item = &mut Proc> {
        self.coordinator
            .iter_mut()
            .map(|c| &mut c.proc)
            .chain(self.agents.iter_mut().map(|a| &mut a.proc))
    }

    /// After `error`: the end of the log of every process that exited (unless an error
    /// showed it already), or, if none did and `error` is not about a process, of every
    /// process (a failed pull is best explained by the agents' logs).
    fn print_logs_after_failure(&mut self, error: &anyhow::Error) {
        let about_a_process = error.chain().any(|c| c.is::<ProcessFailed>());
        let mut any_exited = false;
        for proc in self.procs() {
            if let Some(status) = proc.exited() {
                any_exited = true;
                if !proc.log_shown.get() {
                    eprintln!(
                        "\n{} exited ({status}); the end of its log:\n{}",
                        proc.name,
                        proc.log_tail()
                    );
                }
            }
        }
        if !any_exited && !about_a_process {
            for proc in self.procs() {
                eprintln!(
                    "\nthe end of the log of {}:\n{}",
                    proc.name,
                    proc.log_tail()
                );
            }
        }
    }

    /// Stops the agents (SIGTERM, all at once; each drains its transfers), then the
    /// coordinator, then the registry, and removes every temp dir. Problems are reported, not
    /// returned: cleanup goes on regardless.
    async fn stop(&mut self) {
        // A process whose exit an error reported already has nothing left to stop.
        let mut agents = std::mem::take(&mut self.agents);
        agents.retain_mut(|a| !a.proc.exit_reported());
        let n = agents.len();
        let stops = agents.iter_mut().map(|a| async move {
            let r = a.proc.terminate(STOP_TIMEOUT).await;
            (a, r)
        });
        let mut clean = 0;
        for (agent, result) in futures::future::join_all(stops).await {
            match result {
                Ok(status) if status.success() => clean += 1,
                Ok(status) => eprintln!(
                    "{} exited with {status}; the end of its log:\n{}",
                    agent.proc.name,
                    agent.proc.log_tail()
                ),
                Err(e) => eprintln!("stopping {}: {e:#}", agent.proc.name),
            }
        }
        if n > 0 && clean == n {
            println!("{n} shoal-agent{} stopped cleanly", plural(n));
        } else if n > 0 {
            println!("{clean} of {n} shoal-agents stopped cleanly");
        }
        drop(agents);
        let mut coordinator = self.coordinator.take();
        if let Some(c) = &mut coordinator
            && c.proc.exit_reported()
        {
            coordinator = None;
        }
        if let Some(mut coordinator) = coordinator {
            match coordinator.proc.terminate(STOP_TIMEOUT).await {
                Ok(status) if status.success() => println!("shoal-coordinator stopped cleanly"),
                Ok(status) => eprintln!(
                    "shoal-coordinator exited with {status}; the end of its log:\n{}",
                    coordinator.proc.log_tail()
                ),
                Err(e) => eprintln!("stopping shoal-coordinator: {e:#}"),
            }
        }
        if let Some(mut registry) = self.registry.take()
            && let Err(e) = registry.stop().await
        {
            eprintln!("stopping docker-registry: {e:#}");
        }
        self.image = None;
        self.work = None;
        println!("registry stopped, temp dirs removed");
    }
}

/// Fails if a port given on the command line is taken on an agent's address (there is no
/// fallback for those).
fn check_ports(args: &Args) -> Result<()> {
    for i in 1..=args.agent_count() {
        let ip = IpAddr::V4(agent_ip(i));
        for (port, flag) in [(args.port, "--port"), (args.metrics_port, "--metrics-port")] {
            if let Some(port) = port
                && !tcp_free(ip, port)
            {
                bail!("{ip}:{port} ({flag}, agent {i}) is already in use");
            }
        }
    }
    if args.port.is_some() && args.port == args.metrics_port {
        bail!("--port and --metrics-port must differ");
    }
    Ok(())
}

/// Whether nothing listens on TCP `ip:port` right now.
fn tcp_free(ip: IpAddr, port: u16) -> bool {
    TcpListener::bind((ip, port)).is_ok()
}

/// Whether nothing is bound to UDP `ip:port` right now.
fn udp_free(ip: IpAddr, port: u16) -> bool {
    UdpSocket::bind((ip, port)).is_ok()
}

/// "127.0.0.2" or "127.0.0.2 to 127.0.0.4".
fn ip_range(n: usize) -> String {
    if n == 1 {
        agent_ip(1).to_string()
    } else {
        format!("{} to {}", agent_ip(1), agent_ip(n))
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn report(image: &TestImage, agents: &[Agent], cold: &Pull, warm: &Pull) {
    let pulls = [cold, warm];
    let image_blobs = image.total_size + image.config_size;
    let row = |name: &str, cells: Vec<String>| {
        let mut line = format!("  {name:<34}");
        for c in cells {
            line.push_str(&format!("{c:>20}"));
        }
        println!("{line}");
    };
    let each = |f: &dyn Fn(&Pull) -> String| pulls.iter().map(|p| f(p)).collect::<Vec<_>>();
    row("", each(&|p| p.label.clone()));
    row(
        "time (skopeo copy; the slowest)",
        each(&|p| format!("{:.2} s", p.slowest().as_secs_f64())),
    );
    row(
        "registry: requests / blob GETs",
        each(&|p| format!("{} / {}", p.delta.origin.requests, p.delta.origin.blob_gets)),
    );
    row(
        "registry: bytes sent",
        each(&|p| bytes(p.delta.origin.bytes)),
    );
    row(
        "registry: blob bytes / image size",
        each(&|p| {
            format!(
                "{:.2}x",
                p.delta.origin.blob_bytes as f64 / image_blobs as f64
            )
        }),
    );
    row(
        "coordinator: locates / origin slots",
        each(&|p| {
            format!(
                "{} / {}",
                p.delta.tracker.locates, p.delta.tracker.origin_slots
            )
        }),
    );
    row(
        "agents: fetched from the origin",
        each(&|p| bytes(p.delta.all_agents().origin as u64)),
    );
    row(
        "agents: received from peers",
        each(&|p| bytes(p.delta.all_agents().peers_in as u64)),
    );
    row(
        "agents: served from their caches",
        each(&|p| bytes(p.delta.all_agents().served_cache as u64)),
    );
    row(
        "agents: served while downloading",
        each(&|p| bytes(p.delta.all_agents().served_upstream as u64)),
    );
    println!();

    // Pull 1, agent by agent.
    let cell = |c: &str| format!("{c:>15}");
    println!(
        "  {:<22}{}{}{}{}",
        "pull 1, per agent",
        cell("time"),
        cell("from origin"),
        cell("from peers"),
        cell("sent to peers")
    );
    for (i, t) in &cold.times {
        let (Some(a), Some(c)) = (agents.get(*i), cold.delta.agents.get(*i)) else {
            continue;
        };
        println!(
            "  {:<22}{}{}{}{}",
            format!("agent {} ({})", a.index, a.ip),
            cell(&format!("{:.2} s", t.as_secs_f64())),
            cell(&bytes(c.origin as u64)),
            cell(&bytes(c.peers_in as u64)),
            cell(&bytes(c.peers_out as u64)),
        );
    }
    println!();

    let n = cold.times.len();
    let sum = cold.delta.all_agents();
    let ratio = cold.delta.origin.blob_bytes as f64 / image_blobs as f64;
    let mut text = if n > 1 {
        format!(
            "Pull 1 asked {n} agents for the {} image at the same moment. ",
            bytes(image_blobs)
        )
    } else {
        format!(
            "Pull 1 asked agent 1 for the {} image. ",
            bytes(image_blobs)
        )
    };
    text.push_str(&format!(
        "The registry sent {} of blobs, {ratio:.2}x the image. ",
        bytes(cold.delta.origin.blob_bytes),
    ));
    if cold.delta.origin.blob_bytes == 0 && sum.served_cache > 0.0 {
        text.push_str("Every agent answered from its kept store, with nothing from the origin.");
    } else if n > 1 {
        text.push_str(&format!(
            "Without peers, {n} mirrors would have read it {n} times ({n}.00x). The agents read \
             {} from the origin (through the coordinator) and {} from each other (QUIC, mutual \
             TLS with the cluster CA); the coordinator's tracker granted {} origin slots for \
             the image's {} blobs.",
            bytes(sum.origin as u64),
            bytes(sum.peers_in as u64),
            cold.delta.tracker.origin_slots,
            image.layers.len() + 1,
        ));
    } else {
        text.push_str(
            "With one agent there is no peer to share with; run with --agents 3 (up to 8) to \
             see agents pull at the same moment from each other.",
        );
    }
    print_wrapped(&text);
    println!();
    let w = warm.delta.all_agents();
    let served = w.served_cache + w.served_upstream;
    let share = if served > 0.0 {
        100.0 * w.served_cache / served
    } else {
        0.0
    };
    print_wrapped(&format!(
        "Pull 2 through agent 1 fetched {} from the origin and {} from peers: {share:.0} % of \
         the {} it served came from its cache. It took {:.2} s, against {:.2} s for pull 1. \
         Everything runs on this machine, so the times say little about a real network, \
         where the bytes kept off the origin's link are the gain.",
        bytes(w.origin as u64),
        bytes(w.peers_in as u64),
        bytes(served as u64),
        warm.slowest().as_secs_f64(),
        cold.slowest().as_secs_f64(),
    ));
    println!();
}

/// Prints `text` as a paragraph of lines of at most 90 columns (words are never split, nor
/// a number from its unit).
fn print_wrapped(text: &str) {
    const WIDTH: usize = 90;
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "s", "%"];
    let mut words: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match words.last_mut() {
            Some(last)
                if UNITS
                    .iter()
                    .any(|u| word.trim_end_matches([',', '.', ';', ':', ')']) == *u) =>
            {
                last.push(' ');
                last.push_str(word);
            }
            _ => words.push(word.to_owned()),
        }
    }
    let mut line = String::new();
    for word in &words {
        if !line.is_empty() && line.len() + 1 + word.len() > WIDTH {
            println!("{line}");
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        println!("{line}");
    }
}

/// Prints "  what ... " now and "result (time)" when done, so a slow step shows what it waits on.
struct Step {
    started: Instant,
}

/// Whether a step's line is open (printed without its result yet).
static STEP_OPEN: AtomicBool = AtomicBool::new(false);

impl Step {
    fn start(what: &str) -> Step {
        print!("  {what} ... ");
        let _ = std::io::stdout().flush();
        STEP_OPEN.store(true, Ordering::Relaxed);
        Step {
            started: Instant::now(),
        }
    }

    fn done(self, result: &str) {
        STEP_OPEN.store(false, Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64();
        if result.is_empty() {
            println!("done ({secs:.1} s)");
        } else {
            println!("{result} ({secs:.1} s)");
        }
    }

    /// Ends the open step's line, if any, when the demo stops in the middle of it.
    fn fail() {
        if STEP_OPEN.swap(false, Ordering::Relaxed) {
            println!("stopped");
        }
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
