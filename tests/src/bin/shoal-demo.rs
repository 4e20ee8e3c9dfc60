//! `shoal-demo`: Shoal's first command (`scripts/demo` builds and runs it).
//!
//! It starts a real upstream registry (Debian's `docker-registry`), pushes a generated image to
//! it, starts the real `shoal-agent` binary in front of it, pulls the image through the agent
//! twice with skopeo (cold, then warm), verifies every digest, and reports where the bytes came
//! from, from the agent's metrics and the registry's access log. Then it keeps the agent up so a
//! person can point their own runtime at it, until Ctrl-C or SIGTERM.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use shoal_tests::{
    AgentOptions, AgentProcess, CopyOptions, ImageSpec, Registry, Skopeo, TestImage, free_port,
    require_tools, verify_layout,
};
use tempfile::TempDir;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// The registry name the agent knows the demo registry by (what containerd sends in `?ns=`).
const UPSTREAM: &str = "registry.demo";
/// Repository and tag of the demo image.
const REPO: &str = "demo/app";
const TAG: &str = "v1";
/// Uncompressed sizes of the image's random layers: 24 MiB in all.
const LAYERS_MIB: [usize; 3] = [4, 8, 12];
/// Fixed, so the image (and its digests) are the same on every run: with `--store`, a second
/// run finds the layers already cached.
const SEED: u64 = 20_240_501;
const PREFERRED_MIRROR_PORT: u16 = 5050;
const PREFERRED_METRICS_PORT: u16 = 9465;

/// Shows what Shoal does on this machine: starts a registry, pushes a generated image, starts
/// `shoal-agent` in front of it, pulls the image through the agent twice with skopeo, and
/// reports where the bytes came from. Then keeps the agent running until Ctrl-C, so you can
/// pull through it with your own client.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Do the two pulls, print the report and stop, instead of waiting for Ctrl-C.
    #[arg(long)]
    once: bool,
    /// Keep the agent's content store in DIR (kept after exit) instead of a temp dir.
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Mirror port on 127.0.0.1 [default: 5050 if free, else any free port].
    #[arg(long, value_name = "PORT")]
    port: Option<u16>,
    /// Metrics port on 127.0.0.1 [default: 9465 if free, else any free port].
    #[arg(long, value_name = "PORT")]
    metrics_port: Option<u16>,
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
    let agent_bin = agent_binary()?;
    require_tools()?;
    check_ports(&args)?;
    let mut signals = Signals::install()?;
    let mut demo = Demo::default();

    println!(
        "Shoal demo: an upstream registry, shoal-agent in front of it, two pulls through it.\n"
    );
    let pulled = tokio::select! {
        r = demo.setup_and_pull(&args, &agent_bin) => Some(r),
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
            if let Some(agent) = &demo.agent {
                eprintln!("\nagent log tail:\n{}", tail(&agent.log_text(), 20));
            }
            demo.stop().await;
            return Err(e);
        }
        Some(Ok(())) if args.once => {
            println!("--once: stopping (without it, the agent keeps running for your own pulls)");
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

/// The `shoal-agent` binary next to this one (both are built into `target/<profile>/`).
fn agent_binary() -> Result<PathBuf> {
    let me = std::env::current_exe().context("finding this program's own path")?;
    let bin = me.with_file_name("shoal-agent");
    if !bin.is_file() {
        bail!(
            "{} not found: shoal-demo runs the shoal-agent binary from its own directory. \
             Build both with `cargo build --release -p shoal-agent -p shoal-tests --bins`, \
             or run `scripts/demo`, which does that",
            bin.display()
        );
    }
    Ok(bin)
}

/// SIGINT (Ctrl-C) and SIGTERM, installed once at start so that neither kills the demo before
/// it has stopped the agent and the registry and removed its temp dirs.
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

/// Everything the demo started; each part stops and removes its temp dir when dropped.
#[derive(Default)]
struct Demo {
    registry: Option<Registry>,
    image: Option<TestImage>,
    agent: Option<AgentProcess>,
    /// Where the pulls write their OCI layouts.
    work: Option<TempDir>,
    store: Option<PathBuf>,
}

/// Counters read before and after a pull.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    agent_upstream: f64,
    served_cache: f64,
    served_upstream: f64,
    registry_requests: usize,
    registry_blob_gets: usize,
    registry_bytes: u64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, before: Counters) -> Counters {
        Counters {
            agent_upstream: self.agent_upstream - before.agent_upstream,
            served_cache: self.served_cache - before.served_cache,
            served_upstream: self.served_upstream - before.served_upstream,
            registry_requests: self.registry_requests - before.registry_requests,
            registry_blob_gets: self.registry_blob_gets - before.registry_blob_gets,
            registry_bytes: self.registry_bytes - before.registry_bytes,
        }
    }
}

struct Pull {
    label: &'static str,
    elapsed: Duration,
    delta: Counters,
}

impl Demo {
    async fn setup_and_pull(&mut self, args: &Args, agent_bin: &Path) -> Result<()> {
        let step = Step::start("starting the upstream registry (docker-registry)");
        let registry = Registry::start().await?;
        step.done(&registry.url());
        let registry = self.registry.insert(registry);

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
        let image = self.image.insert(image);

        let step = Step::start(&format!("pushing it with skopeo as {REPO}:{TAG}"));
        let dest = format!("{}/{REPO}:{TAG}", registry.host_port());
        Skopeo::push_image(image, &dest, &CopyOptions::default()).await?;
        step.done("");

        let step = Step::start("starting shoal-agent");
        let mut opts = AgentOptions::new(&registry.url());
        opts.upstreams = vec![(UPSTREAM.to_owned(), registry.url())];
        // The agent's production defaults, not the harness's fail-fast test timeouts.
        opts.connect_timeout = Duration::from_secs(5);
        opts.idle_timeout = Duration::from_secs(30);
        opts.max_retries = 4;
        if let Some(dir) = &args.store {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the store directory {}", dir.display()))?;
            let dir = std::path::absolute(dir)?;
            opts.store_dir = Some(dir.clone());
            self.store = Some(dir);
        }
        let agent = start_agent(agent_bin, &opts, args).await?;
        let taken = if args.port.is_none() && !agent.url().ends_with(":5050") {
            " (5050 is in use)"
        } else {
            ""
        };
        step.done(&format!(
            "mirror {}{taken}, pid {}",
            agent.url(),
            agent.pid().unwrap_or(0)
        ));
        println!("    its log: {}", agent.log_path().display());
        let agent = self.agent.insert(agent);
        let cached_blobs = agent.metric("shoal_agent_store_blobs").await?;

        let work = self.work.insert(
            tempfile::Builder::new()
                .prefix("shoal-demo-")
                .tempdir()
                .context("creating a temp dir for the pulls")?,
        );
        let src = format!("{}/{REPO}:{TAG}", agent.host_port());
        let mut pulls = Vec::new();
        for (n, label) in [(1, "cold"), (2, "warm")] {
            let label = if n == 1 && cached_blobs > 0.0 {
                "store kept"
            } else {
                label
            };
            let step = Step::start(&format!("pull {n} ({label}) of {src} with skopeo"));
            let before = counters(agent, registry).await?;
            let out = work.path().join(format!("pull-{n}"));
            let copied = Skopeo::pull(&src, &out, &CopyOptions::default()).await?;
            let after = counters(agent, registry).await?;
            let image: &TestImage = image;
            tokio::task::block_in_place(|| verify_layout(&out, image))
                .with_context(|| format!("verifying pull {n}"))?;
            step.done("every digest verified");
            pulls.push(Pull {
                label,
                elapsed: copied.elapsed,
                delta: after - before,
            });
        }
        println!();
        if cached_blobs > 0.0 {
            println!(
                "The store in {} already held {cached_blobs} blobs from an earlier run,\n\
                 so even pull 1 could be served from it.\n",
                self.store.as_deref().unwrap_or(Path::new("?")).display()
            );
        }
        report(&pulls, image.total_size);
        Ok(())
    }

    fn print_usage(&self) {
        let (Some(agent), Some(registry)) = (&self.agent, &self.registry) else {
            return;
        };
        let mirror = agent.host_port();
        let reg = registry.host_port();
        let store = match &self.store {
            Some(dir) => format!("{} (kept)", dir.display()),
            None => "a temp dir, removed at exit (--store DIR keeps it)".to_owned(),
        };
        println!(
            "\
The agent is still running. Point a client at it:

  mirror    {url}   (upstream {UPSTREAM} = {reg_url}, the default)
  metrics   {metrics}/metrics
  agent log {log}
  config    {config}
  store     {store}

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

Press Ctrl-C to stop (the agent gets SIGTERM and drains; the registry and temp dirs go away).",
            url = agent.url(),
            reg_url = registry.url(),
            metrics = agent.metrics_url(),
            log = agent.log_path().display(),
            config = agent.config_path().display(),
        );
    }

    /// Waits for Ctrl-C or SIGTERM; fails if the agent exits on its own first.
    async fn wait(&mut self, signals: &mut Signals) -> Result<()> {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                name = signals.recv() => {
                    println!("\n{name}: stopping");
                    return Ok(());
                }
                _ = tick.tick() => {
                    if let Some(agent) = &mut self.agent
                        && let Some(status) = agent.try_wait()?
                    {
                        let log = tail(&agent.log_text(), 20);
                        // Reaped already: nothing left for stop() to signal.
                        self.agent = None;
                        bail!("shoal-agent exited on its own ({status}); log tail:\n{log}");
                    }
                }
            }
        }
    }

    /// Stops the agent with SIGTERM (it drains in-flight transfers), then the registry, and
    /// removes every temp dir. Problems are reported, not returned: cleanup goes on regardless.
    async fn stop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            match agent.terminate().await {
                Ok(status) if status.success() => println!("shoal-agent stopped cleanly"),
                Ok(status) => eprintln!(
                    "shoal-agent exited with {status}; log tail:\n{}",
                    tail(&agent.log_text(), 20)
                ),
                // Already gone (e.g. it crashed): dropping it below still reaps it.
                Err(e) => eprintln!("stopping shoal-agent: {e:#}"),
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

/// Starts the agent on the requested ports, or on the well-known ones when free, or else on
/// free ones (also when a well-known port was taken between the check and the agent's bind).
async fn start_agent(bin: &Path, opts: &AgentOptions, args: &Args) -> Result<AgentProcess> {
    let mirror = match args.port {
        Some(port) => port,
        None => free_or_any(PREFERRED_MIRROR_PORT)?,
    };
    let metrics = match args.metrics_port {
        Some(port) => port,
        None => free_or_any(PREFERRED_METRICS_PORT)?,
    };
    let at = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match AgentProcess::start_at(bin, opts, at(mirror), at(metrics)).await {
        Ok(agent) => Ok(agent),
        Err(e) if args.port.is_none() && args.metrics_port.is_none() => {
            let (mirror, metrics) = (free_port()?, free_port()?);
            AgentProcess::start_at(bin, opts, at(mirror), at(metrics))
                .await
                .with_context(|| format!("first attempt: {e:#}"))
        }
        Err(e) => Err(e),
    }
}

/// Fails if a port given on the command line is taken (there is no fallback for those).
fn check_ports(args: &Args) -> Result<()> {
    for (port, flag) in [(args.port, "--port"), (args.metrics_port, "--metrics-port")] {
        if let Some(port) = port
            && !is_free(port)
        {
            bail!("127.0.0.1:{port} ({flag}) is already in use");
        }
    }
    Ok(())
}

/// Whether nothing listens on 127.0.0.1:`port` right now.
fn is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// `preferred` if it is free, else any free port.
fn free_or_any(preferred: u16) -> Result<u16> {
    if is_free(preferred) {
        Ok(preferred)
    } else {
        free_port()
    }
}

async fn counters(agent: &AgentProcess, registry: &Registry) -> Result<Counters> {
    let text = agent.metrics_text().await?;
    let metric = |sample| shoal_tests::metric_value(&text, sample);
    // The harness's readiness probes (GET /v2/ with an empty user agent) are not pulls.
    let log: Vec<_> = registry
        .access_log()
        .into_iter()
        .filter(|e| !(e.path == "/v2/" && e.user_agent.is_empty()))
        .collect();
    Ok(Counters {
        agent_upstream: metric("shoal_agent_upstream_bytes_total"),
        served_cache: metric("shoal_agent_served_bytes_total{source=\"cache\"}"),
        served_upstream: metric("shoal_agent_served_bytes_total{source=\"upstream\"}"),
        registry_requests: log.len(),
        registry_blob_gets: log
            .iter()
            .filter(|e| e.method == "GET" && shoal_tests::proxy::blob_digest(&e.path).is_some())
            .count(),
        registry_bytes: log.iter().map(|e| e.bytes).sum(),
    })
}

fn report(pulls: &[Pull], image_bytes: u64) {
    let header: Vec<String> = pulls
        .iter()
        .enumerate()
        .map(|(i, p)| format!("pull {} ({})", i + 1, p.label))
        .collect();
    let row = |name: &str, cells: Vec<String>| {
        let mut line = format!("  {name:<34}");
        for c in cells {
            line.push_str(&format!("{c:>20}"));
        }
        println!("{line}");
    };
    row("", header);
    row(
        "time (skopeo copy)",
        pulls
            .iter()
            .map(|p| format!("{:.2} s", p.elapsed.as_secs_f64()))
            .collect(),
    );
    row(
        "agent: fetched from upstream",
        pulls
            .iter()
            .map(|p| bytes(p.delta.agent_upstream as u64))
            .collect(),
    );
    row(
        "registry: requests / blob GETs",
        pulls
            .iter()
            .map(|p| {
                format!(
                    "{} / {}",
                    p.delta.registry_requests, p.delta.registry_blob_gets
                )
            })
            .collect(),
    );
    row(
        "registry: bytes sent",
        pulls
            .iter()
            .map(|p| bytes(p.delta.registry_bytes))
            .collect(),
    );
    row(
        "agent: served from its cache",
        pulls
            .iter()
            .map(|p| bytes(p.delta.served_cache as u64))
            .collect(),
    );
    row(
        "agent: served while downloading",
        pulls
            .iter()
            .map(|p| bytes(p.delta.served_upstream as u64))
            .collect(),
    );
    row(
        "share served from cache",
        pulls
            .iter()
            .map(|p| {
                let total = p.delta.served_cache + p.delta.served_upstream;
                if total > 0.0 {
                    format!("{:.0} %", 100.0 * p.delta.served_cache / total)
                } else {
                    "-".to_owned()
                }
            })
            .collect(),
    );
    println!();
    if let [cold, warm] = pulls {
        let served = warm.delta.served_cache + warm.delta.served_upstream;
        let share = if served > 0.0 {
            100.0 * warm.delta.served_cache / served
        } else {
            0.0
        };
        println!(
            "Pull 2 fetched {} from upstream ({} registry requests): {share:.0} % of the {} it \
             served\ncame from the agent's cache ({} of layers in the image). It took {:.2} s \
             against {:.2} s;\nthe registry runs on this machine, so times differ little \
             here. Across a network,\nthe bytes kept off the upstream link are the gain.\n",
            bytes(warm.delta.agent_upstream as u64),
            warm.delta.registry_requests,
            bytes(served as u64),
            bytes(image_bytes),
            warm.elapsed.as_secs_f64(),
            cold.elapsed.as_secs_f64(),
        );
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
