//! `bench-gateway`: the coordinator against Debian's nginx configured like the classic
//! registry front door, side by side in one run, driven by the same load.
//!
//! ```sh
//! cargo run --release -p shoal-tests --bin bench-gateway [-- --duration 10 --runs 5 -c 32]
//! ```
//!
//! Setup (everything on 127.0.0.1, free ports, state in one temp dir):
//! - one `docker-registry` (filesystem storage) holding `--objects` random blobs of
//!   `--blob-kib` KiB and as many tagged OCI manifests (each names a config and one of the
//!   blobs);
//! - a CA and server certificate from `cert init`, and an htpasswd file made by the real
//!   `htpasswd` tool (`--hash`, APR1-MD5 by default: what `htpasswd -b` writes, as in the
//!   classic setup). Both front doors use the same certificate and the same file;
//! - **nginx** (Debian's, installed when missing and running as root) as its own master and
//!   `worker_processes auto` workers, configured like the classic guide: `listen ... ssl`,
//!   `auth_basic` + `auth_basic_user_file`, an `upstream` block with `keepalive`,
//!   `proxy_pass`, `client_max_body_size 0`, `chunked_transfer_encoding on`,
//!   `proxy_read_timeout 900`, the `Docker-Distribution-Api-Version` header, the forwarding
//!   headers, an access log file;
//! - **the coordinator** as its own process (this binary re-executed as `serve -c CONF`, which
//!   runs exactly `shoal_coordinator::cli::main`, the code of the `shoal-coordinator` binary)
//!   with the default settings apart from paths: coalescing on (spool in the system temp dir),
//!   an access log file.
//!
//! Load: a Rust client in this process (hyper HTTP/1.1 over tokio-rustls with the ring
//! provider, ALPN http/1.1 because the classic nginx serves no h2) opens `-c` keep-alive
//! connections, then each connection sends GETs with Basic auth back to back for
//! `--duration` seconds, each time for a random one of the workload's URLs, and reads every
//! body to its end. Workloads: `blobs` (`GET /v2/bench/app/blobs/<digest>`) and `manifests`
//! (`GET /v2/bench/app/manifests/<tag>`). Runs alternate between the two front doors (ABBA...)
//! because the machine is shared and noisy, after one unmeasured warm-up run each. A
//! connection closed by the server (nginx's `keepalive_requests 1000`) is reopened and the
//! handshake counts in that request's latency.
//!
//! Reported per front door: medians over the runs of requests/s, MiB/s, p50 and p99 latency,
//! and CPU milliseconds per request of the front door's processes, of the registry and of this
//! client (from `/proc`), then the ratios coordinator/nginx of throughput and p99 against the
//! target (≥ 1.0× and ≤ 1.0×). Everything, the client included, shares the machine's cores:
//! the CPU per request is the steadier figure when other work disturbs the throughput. The
//! exit code is 0 whatever the ratios: this is a benchmark, not a test. `--wrk` adds a
//! cross-check with `wrk` (Debian package) as the load generator.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use shoal_coordinator::certs::{CertInitOptions, cert_init};
use shoal_tests::coordinator::{HashFormat, htpasswd_add};
use shoal_tests::http::{push_blob, push_manifest};
use shoal_tests::{Registry, free_port};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_rustls::TlsConnector;

const REPO: &str = "bench/app";
const USER: &str = "bench";
const PASSWORD: &str = "bench-pw";
const MIB: f64 = (1 << 20) as f64;
/// How long a front door may take to answer after it is spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Linux reports process CPU times in these ticks per second (`USER_HZ`).
const CLOCK_TICKS: f64 = 100.0;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// The coordinator against nginx configured like the classic registry front door: same
/// registry, certificate, htpasswd file and load; prints throughput, latency and the ratios.
#[derive(Debug, Parser)]
#[command()]
struct Args {
    /// Seconds per measured run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    duration: u64,
    /// Measured runs per front door and workload (after one warm-up run each).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
    runs: u64,
    /// Concurrent keep-alive connections.
    #[arg(short = 'c', long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    concurrency: u64,
    /// Size of each blob, in KiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1048576))]
    blob_kib: u64,
    /// Distinct blobs (and as many manifests) the load picks from at random.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    objects: u64,
    /// Workloads to run, in order.
    #[arg(long, value_delimiter = ',', default_value = "blobs,manifests")]
    workloads: Vec<Workload>,
    /// Hash of the user's htpasswd line (made by `htpasswd`; apr1 is what `htpasswd -b` writes).
    #[arg(long, value_enum, default_value_t = Hash::Apr1)]
    hash: Hash,
    /// Coordinator coalescing (on by default, as configured by default).
    #[arg(long, value_enum, default_value_t = Switch::On)]
    coalescing: Switch,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    client_threads: u64,
    /// Also drive both front doors with `wrk` (installed when missing and running as root).
    #[arg(long)]
    wrk: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    Blobs,
    Manifests,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Hash {
    Apr1,
    Bcrypt,
    Sha1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Switch {
    On,
    Off,
}

fn main() -> ExitCode {
    // `bench-gateway serve -c CONF` is the coordinator process of a run: the code of the
    // `shoal-coordinator` binary, which cargo does not build for this package.
    if std::env::args().nth(1).as_deref() == Some("serve") {
        return shoal_coordinator::cli::main();
    }
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads as usize)
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-gateway: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // On Ctrl-C or SIGTERM the run is dropped, which stops nginx, the coordinator and the
    // registry (they would outlive an abrupt exit).
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = run(&args) => r,
            () = interrupted() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn run(args: &Args) -> Result<()> {
    shoal_tests::coordinator::require_coordinator_tools()?;
    let nginx_bin = ensure_installed("nginx", "/usr/sbin/nginx", "nginx")?;
    let wrk_bin = if args.wrk {
        Some(ensure_installed("wrk", "/usr/bin/wrk", "wrk")?)
    } else {
        None
    };
    let started = Instant::now();
    let work = tempfile::Builder::new()
        .prefix("shoal-bench-gateway-")
        .tempdir()?;
    let dir = work.path();

    // Registry and content.
    let registry = Registry::start().await?;
    let content = Content::push(&registry, args.objects, args.blob_kib << 10).await?;

    // Certificate and users, shared by both front doors.
    cert_init(&CertInitOptions {
        hosts: vec!["localhost".into()],
        ips: vec![Ipv4Addr::LOCALHOST.into()],
        out_dir: dir.join("tls"),
        server_days: 30,
        ca_days: 30,
        force: false,
        reuse_ca: false,
    })
    .context("cert init")?;
    let htpasswd = dir.join("htpasswd");
    let format = match args.hash {
        Hash::Apr1 => HashFormat::Apr1,
        Hash::Bcrypt => HashFormat::Bcrypt,
        Hash::Sha1 => HashFormat::Sha1,
    };
    htpasswd_add(&htpasswd, USER, PASSWORD, format)?;
    let ca = std::fs::read(dir.join("tls/ca.crt")).context("reading the CA certificate")?;
    let tls = Arc::new(shoal_tests::tls::client_config(&ca, &[b"http/1.1"])?);

    let nginx = Nginx::start(&nginx_bin, dir, &registry, &htpasswd).await?;
    let coordinator =
        Coordinator::start(dir, &registry, &htpasswd, args.coalescing == Switch::On).await?;
    let doors: [&dyn FrontDoor; 2] = [&nginx, &coordinator];
    for door in doors {
        wait_ready(door.addr(), &tls).await.with_context(|| {
            format!(
                "{} did not come up; its log:\n{}",
                door.name(),
                door.log_tail()
            )
        })?;
    }
    let auth = HeaderValue::from_str(&format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
    ))?;
    let cipher = content.check(&doors, &tls, &auth).await?;

    println!(
        "bench-gateway: nginx {} vs shoal-coordinator, same registry, certificate and htpasswd ({:?})",
        nginx.version, args.hash
    );
    println!(
        "  {} blobs of {} KiB and {} manifests in one docker-registry; setup {:.1} s",
        args.objects,
        args.blob_kib,
        args.objects,
        started.elapsed().as_secs_f64()
    );
    println!(
        "  load: {} keep-alive connections, HTTP/1.1 over {cipher}, Basic auth, random URL per request; \
         {} x {} s per front door and workload, interleaved, after a warm-up run",
        args.concurrency, args.runs, args.duration
    );
    println!(
        "  the load generator runs in this process ({} runtime thread{}) on the same cores as \
         everything else; coordinator coalescing {:?}; {} cores",
        args.client_threads,
        if args.client_threads == 1 { "" } else { "s" },
        args.coalescing,
        std::thread::available_parallelism().map_or(0, usize::from),
    );

    let load = Load {
        tls,
        auth,
        concurrency: args.concurrency as usize,
        duration: Duration::from_secs(args.duration),
    };
    let registry_pid = registry.pid().context("the registry is not running")?;
    for workload in &args.workloads {
        let paths = Arc::new(content.paths(*workload));
        println!("\n== {workload:?}: GET {} ==", paths[0].path);
        let mut results: [Vec<RunResult>; 2] = [Vec::new(), Vec::new()];
        let coalesced_before = coordinator.coalesced().await.unwrap_or(0.0);
        let warm = Load {
            duration: Duration::from_secs(2).min(load.duration),
            ..load.clone()
        };
        for door in doors {
            warm.run(door, &paths, registry_pid).await?;
        }
        println!(
            "  {:>3}  {:<12} {:>9} {:>9} {:>8} {:>8}   {:>24}  {:>6} {:>5}",
            "run",
            "front door",
            "req/s",
            "MiB/s",
            "p50 ms",
            "p99 ms",
            "CPU ms/req: door/reg/cli",
            "errors",
            "reconn"
        );
        for run in 0..args.runs {
            // ABBA: each front door goes first as often as the other.
            let order: [usize; 2] = if run % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let r = load.run(doors[i], &paths, registry_pid).await?;
                println!(
                    "  {:>3}  {:<12} {:>9.0} {:>9.1} {:>8.2} {:>8.2}   {:>8.3} {:>7.3} {:>7.3}  {:>6} {:>5}",
                    run + 1,
                    doors[i].name(),
                    r.rps(),
                    r.mib_s(),
                    r.p50_ms,
                    r.p99_ms,
                    r.cpu_ms_per_req(r.door_cpu),
                    r.cpu_ms_per_req(r.registry_cpu),
                    r.cpu_ms_per_req(r.client_cpu),
                    r.errors,
                    r.reconnects
                );
                results[i].push(r);
            }
        }
        let coalesced = coordinator.coalesced().await.unwrap_or(0.0) - coalesced_before;
        let summary: Vec<Summary> = results.iter().map(|r| Summary::of(r)).collect();
        println!("  medians:");
        for (door, s) in doors.iter().zip(&summary) {
            println!(
                "       {:<12} {:>9.0} {:>9.1} {:>8.2} {:>8.2}   {:>8.3} {:>7.3} {:>7.3}",
                door.name(),
                s.rps,
                s.mib_s,
                s.p50_ms,
                s.p99_ms,
                s.door_cpu,
                s.registry_cpu,
                s.client_cpu
            );
        }
        let (n, c) = (&summary[0], &summary[1]);
        let served: u64 = results[1].iter().map(|r| r.requests).sum();
        println!(
            "  coordinator/nginx: throughput {:.2}x (target >= 1.0), p99 {:.2}x (target <= 1.0), \
             CPU per request {:.2}x; coalesced {:.0} of {} coordinator requests (incl. warm-up)",
            c.rps / n.rps,
            c.p99_ms / n.p99_ms,
            c.door_cpu / n.door_cpu,
            coalesced,
            served
        );
        if let Some(wrk) = &wrk_bin {
            run_wrk(wrk, dir, &doors, &paths, &load, args.runs).await?;
        }
    }
    drop(coordinator);
    drop(nginx);
    Ok(())
}

/// Finds `bin` on PATH (or at `fallback`), installing Debian `package` when missing and
/// running as root.
fn ensure_installed(bin: &str, fallback: &str, package: &str) -> Result<PathBuf> {
    let find = || {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(|d| d.join(bin))
            .chain(std::iter::once(PathBuf::from(fallback)))
            .find(|p| p.is_file())
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        bail!("{bin} not found; install it as root with `apt-get install -y {package}`");
    }
    eprintln!("bench-gateway: installing {package} (apt-get install -y {package})");
    let status = std::process::Command::new("apt-get")
        .args(["install", "-y", "-q", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .context("running apt-get")?;
    ensure!(
        status.success(),
        "apt-get install -y {package} failed ({status})"
    );
    find().with_context(|| format!("{bin} still missing after installing {package}"))
}

/// The blobs and manifests in the registry.
struct Content {
    blobs: Vec<(String, u64)>,
    manifests: Vec<(String, u64)>,
}

#[derive(Clone, Debug)]
struct Target {
    path: String,
    len: u64,
}

impl Content {
    async fn push(registry: &Registry, objects: u64, blob_len: u64) -> Result<Content> {
        let url = registry.url();
        let mut blobs = Vec::new();
        let mut manifests = Vec::new();
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let config_digest = push_blob(&url, REPO, config).await?;
        for i in 0..objects {
            let bytes: Vec<u8> = (0..blob_len).map(|_| rand::random::<u8>()).collect();
            let digest = push_blob(&url, REPO, &bytes).await?;
            let manifest = format!(
                r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{digest}","size":{blob_len}}}],"annotations":{{"bench":"{i}"}}}}"#,
                config.len()
            );
            let tag = format!("t{i}");
            push_manifest(&url, REPO, &tag, OCI_MANIFEST, manifest.as_bytes()).await?;
            blobs.push((digest, blob_len));
            manifests.push((tag, manifest.len() as u64));
        }
        Ok(Content { blobs, manifests })
    }

    fn paths(&self, workload: Workload) -> Vec<Target> {
        match workload {
            Workload::Blobs => self
                .blobs
                .iter()
                .map(|(d, len)| Target {
                    path: format!("/v2/{REPO}/blobs/{d}"),
                    len: *len,
                })
                .collect(),
            Workload::Manifests => self
                .manifests
                .iter()
                .map(|(t, len)| Target {
                    path: format!("/v2/{REPO}/manifests/{t}"),
                    len: *len,
                })
                .collect(),
        }
    }

    /// One GET of a blob and a manifest through each front door: right status, bytes and API
    /// version header. Returns the negotiated TLS version and cipher suite.
    async fn check(
        &self,
        doors: &[&dyn FrontDoor],
        tls: &Arc<rustls::ClientConfig>,
        auth: &HeaderValue,
    ) -> Result<String> {
        let mut cipher = String::new();
        for door in doors {
            let mut conn = Conn::open(door.addr(), tls).await?;
            cipher = conn.cipher.clone();
            for w in [Workload::Blobs, Workload::Manifests] {
                let t = &self.paths(w)[0];
                let req = request(&t.path, door.addr(), auth)?;
                conn.send.ready().await?;
                let resp = conn.send.send_request(req).await?;
                let status = resp.status();
                let version = resp
                    .headers()
                    .get("docker-distribution-api-version")
                    .cloned();
                let body = resp.into_body().collect().await?.to_bytes();
                ensure!(
                    status == StatusCode::OK,
                    "{}: GET {} answered {status}: {}",
                    door.name(),
                    t.path,
                    String::from_utf8_lossy(&body)
                );
                ensure!(
                    body.len() as u64 == t.len,
                    "{}: GET {} sent {} bytes",
                    door.name(),
                    t.path,
                    body.len()
                );
                if w == Workload::Blobs {
                    let digest = shoal_tests::image::sha256_digest(&body);
                    ensure!(
                        t.path.ends_with(&digest),
                        "{}: wrong blob content",
                        door.name()
                    );
                }
                ensure!(
                    version.as_ref().is_some_and(|v| v == "registry/2.0"),
                    "{}: Docker-Distribution-Api-Version is {version:?}",
                    door.name()
                );
            }
        }
        Ok(cipher)
    }
}

fn request(path: &str, addr: SocketAddr, auth: &HeaderValue) -> Result<Request<Empty<Bytes>>> {
    Ok(Request::get(path)
        .header(header::HOST, format!("localhost:{}", addr.port()))
        .header(header::AUTHORIZATION, auth.clone())
        .header(header::USER_AGENT, "shoal-bench-gateway")
        // Distribution answers 404 for an OCI manifest the client does not say it accepts.
        .header(header::ACCEPT, OCI_MANIFEST)
        .body(Empty::new())?)
}

/// One keep-alive HTTP/1.1 connection over TLS.
struct Conn {
    send: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    cipher: String,
}

impl Conn {
    async fn open(addr: SocketAddr, tls: &Arc<rustls::ClientConfig>) -> Result<Conn> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let stream = TlsConnector::from(Arc::clone(tls))
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?;
        let (_, session) = stream.get_ref();
        let cipher = format!(
            "{:?} {:?}",
            session.protocol_version().context("no TLS version")?,
            session
                .negotiated_cipher_suite()
                .context("no cipher suite")?
                .suite()
        );
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { send, cipher })
    }
}

async fn wait_ready(addr: SocketAddr, tls: &Arc<rustls::ClientConfig>) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let attempt = async {
            let mut conn = Conn::open(addr, tls).await?;
            let req = Request::get("/v2/")
                .header(header::HOST, "localhost")
                .body(Empty::new())?;
            let status = conn.send.send_request(req).await?.status();
            ensure!(
                status == StatusCode::UNAUTHORIZED,
                "GET /v2/ answered {status}"
            );
            Ok(())
        };
        let last = match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "no answer within 2 s".to_owned(),
        };
        if Instant::now() >= deadline {
            bail!("not ready after {READY_TIMEOUT:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CPU seconds (user + system) used so far by a process, all its threads included.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name may contain spaces; fields after its closing parenthesis are fixed.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / CLOCK_TICKS
}

/// Direct children of a process (nginx's workers).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

trait FrontDoor: Sync {
    fn name(&self) -> &'static str;
    fn addr(&self) -> SocketAddr;
    /// CPU seconds used by every process of the front door so far.
    fn cpu(&self) -> f64;
    fn log_tail(&self) -> String;
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(3000);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[start..].to_owned()
}

/// Sends SIGTERM to `pid` (by id, with the `kill` tool).
fn terminate(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Waits (bounded) for a child to exit, then kills it.
fn reap(child: &mut Child, within: Duration) {
    let deadline = Instant::now() + within;
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.start_kill();
}

/// nginx configured like the classic registry front door.
struct Nginx {
    addr: SocketAddr,
    child: Child,
    prefix: PathBuf,
    version: String,
}

impl Nginx {
    async fn start(bin: &Path, dir: &Path, registry: &Registry, htpasswd: &Path) -> Result<Nginx> {
        let version = std::process::Command::new(bin)
            .arg("-v")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stderr)
                    .trim()
                    .trim_start_matches("nginx version: nginx/")
                    .to_owned()
            })
            .unwrap_or_default();
        let prefix = dir.join("nginx");
        std::fs::create_dir_all(&prefix)?;
        let mut last = None;
        for attempt in 0..5 {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
            let conf = prefix.join("nginx.conf");
            std::fs::write(
                &conf,
                nginx_conf(&prefix, addr, registry.addr(), dir, htpasswd),
            )?;
            let log = std::fs::File::create(prefix.join("stderr.log"))?;
            let mut child = Command::new(bin)
                .arg("-c")
                .arg(&conf)
                .arg("-p")
                .arg(&prefix)
                .arg("-e")
                .arg(prefix.join("error.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            // nginx binds at start and exits at once if it cannot.
            tokio::time::sleep(Duration::from_millis(300)).await;
            if let Some(status) = child.try_wait()? {
                let log = tail(&prefix.join("error.log")) + &tail(&prefix.join("stderr.log"));
                if log.contains("Address already in use") && attempt < 4 {
                    last = Some(log);
                    continue;
                }
                bail!("nginx exited with {status}:\n{log}");
            }
            return Ok(Nginx {
                addr,
                child,
                prefix,
                version,
            });
        }
        bail!("nginx found no free port: {}", last.unwrap_or_default())
    }
}

impl FrontDoor for Nginx {
    fn name(&self) -> &'static str {
        "nginx"
    }
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn cpu(&self) -> f64 {
        let Some(pid) = self.child.id() else {
            return 0.0;
        };
        cpu_seconds(pid) + children(pid).into_iter().map(cpu_seconds).sum::<f64>()
    }
    fn log_tail(&self) -> String {
        tail(&self.prefix.join("error.log"))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM makes the master stop its workers; SIGKILL would orphan them.
        if let Some(pid) = self.child.id() {
            let workers = children(pid);
            terminate(pid);
            reap(&mut self.child, Duration::from_secs(5));
            for w in workers {
                if std::path::Path::new(&format!("/proc/{w}")).exists() {
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", &w.to_string()])
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
    }
}

/// The classic guide's configuration, with the upstream kept alive and paths in `prefix`.
fn nginx_conf(
    prefix: &Path,
    listen: SocketAddr,
    registry: SocketAddr,
    dir: &Path,
    htpasswd: &Path,
) -> String {
    let p = |p: &Path| p.display().to_string();
    // As root, workers would run as `nobody` and could not read the temp dir; stay root.
    let user = if std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
    {
        "user root;\n"
    } else {
        ""
    };
    format!(
        r#"{user}worker_processes auto;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
    sendfile on;
    tcp_nopush on;

    upstream docker-registry {{
        server {registry};
        keepalive 64;
    }}

    ## The registry sets Docker-Distribution-Api-Version itself; nginx adds it only to its
    ## own answers (401s), as in the classic guide.
    map $upstream_http_docker_distribution_api_version $docker_distribution_api_version {{
        '' 'registry/2.0';
    }}

    server {{
        listen {listen} ssl;
        server_name localhost;

        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;

        # disable any limits to avoid HTTP 413 for large image uploads
        client_max_body_size 0;
        # required to avoid HTTP 411
        chunked_transfer_encoding on;

        location /v2/ {{
            # Do not allow connections from docker 1.5 and earlier
            if ($http_user_agent ~ "^(docker\/1\.(3|4|5(?!\.[0-9]-dev))|Go ).*$" ) {{
                return 404;
            }}
            auth_basic "Registry realm";
            auth_basic_user_file {htpasswd};
            add_header 'Docker-Distribution-Api-Version' $docker_distribution_api_version always;

            proxy_pass                          http://docker-registry;
            proxy_http_version                  1.1;
            proxy_set_header  Connection        "";
            proxy_set_header  Host              $http_host;
            proxy_set_header  X-Real-IP         $remote_addr;
            proxy_set_header  X-Forwarded-For   $proxy_add_x_forwarded_for;
            proxy_set_header  X-Forwarded-Proto $scheme;
            proxy_read_timeout                  900;
        }}
    }}
}}
"#,
        prefix = p(prefix),
        cert = p(&dir.join("tls/server.crt")),
        key = p(&dir.join("tls/server.key")),
        htpasswd = p(htpasswd),
    )
}

/// The coordinator as its own process: this binary re-executed as `serve -c CONF`.
struct Coordinator {
    addr: SocketAddr,
    metrics: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl Coordinator {
    async fn start(
        dir: &Path,
        registry: &Registry,
        htpasswd: &Path,
        coalescing: bool,
    ) -> Result<Coordinator> {
        let exe = std::env::current_exe().context("locating this binary")?;
        let log = dir.join("coordinator.log");
        let q = |s: &str| serde_json::to_string(s).expect("a str serialises");
        let p = |p: &Path| q(&p.to_string_lossy());
        let mut last = String::new();
        for _ in 0..5 {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
            let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
            let conf = dir.join("coordinator.toml");
            std::fs::write(
                &conf,
                format!(
                    "[server]\nlisten = \"{addr}\"\ntls_cert = {}\ntls_key = {}\ndrain_timeout = \"1s\"\n\
                     [metrics]\nlisten = \"{metrics}\"\n\
                     [log]\naccess_log = {}\n\
                     [auth]\nhtpasswd = {}\n\
                     [coalescing]\nenabled = {coalescing}\n\
                     [[registry]]\nhost = \"registry.bench\"\ninsecure_http = true\n\
                     [[registry.replica]]\nurl = {}\n",
                    p(&dir.join("tls/server.crt")),
                    p(&dir.join("tls/server.key")),
                    p(&dir.join("coordinator-access.log")),
                    p(htpasswd),
                    q(&registry.url()),
                ),
            )?;
            let stderr = std::fs::File::create(&log)?;
            let mut child = Command::new(&exe)
                .arg("serve")
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {} serve", exe.display()))?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            if let Some(status) = child.try_wait()? {
                last = tail(&log);
                if last.contains("in use") {
                    continue;
                }
                bail!("the coordinator exited with {status}:\n{last}");
            }
            return Ok(Coordinator {
                addr,
                metrics,
                child,
                log,
            });
        }
        bail!("the coordinator found no free port: {last}")
    }

    /// `shoal_coordinator_coalesced_requests_total`.
    async fn coalesced(&self) -> Result<f64> {
        let r = shoal_tests::http_get(
            &format!("http://{}/metrics", self.metrics),
            Duration::from_secs(5),
        )
        .await?;
        let text = String::from_utf8_lossy(&r.body);
        Ok(text
            .lines()
            .filter(|l| l.starts_with("shoal_coordinator_coalesced_requests_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

impl FrontDoor for Coordinator {
    fn name(&self) -> &'static str {
        "coordinator"
    }
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn cpu(&self) -> f64 {
        self.child.id().map_or(0.0, cpu_seconds)
    }
    fn log_tail(&self) -> String {
        tail(&self.log)
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            terminate(pid);
        }
        reap(&mut self.child, Duration::from_secs(5));
    }
}

/// One load run's settings.
#[derive(Clone)]
struct Load {
    tls: Arc<rustls::ClientConfig>,
    auth: HeaderValue,
    concurrency: usize,
    duration: Duration,
}

/// What one run measured.
#[derive(Debug, Default)]
struct RunResult {
    requests: u64,
    bytes: u64,
    errors: u64,
    reconnects: u64,
    elapsed: f64,
    p50_ms: f64,
    p99_ms: f64,
    door_cpu: f64,
    registry_cpu: f64,
    client_cpu: f64,
}

impl RunResult {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed
    }
    fn mib_s(&self) -> f64 {
        self.bytes as f64 / MIB / self.elapsed
    }
    fn cpu_ms_per_req(&self, cpu: f64) -> f64 {
        cpu * 1000.0 / self.requests.max(1) as f64
    }
}

/// What one connection measured.
#[derive(Default)]
struct ConnStats {
    latencies_us: Vec<u32>,
    bytes: u64,
    errors: u64,
    reconnects: u64,
}

impl Load {
    async fn run(
        &self,
        door: &dyn FrontDoor,
        paths: &Arc<Vec<Target>>,
        registry: u32,
    ) -> Result<RunResult> {
        // Connections first, so the clock measures requests, not handshakes.
        let mut conns = Vec::with_capacity(self.concurrency);
        for _ in 0..self.concurrency {
            conns.push(Conn::open(door.addr(), &self.tls).await?);
        }
        let before = (
            door.cpu(),
            cpu_seconds(registry),
            cpu_seconds(std::process::id()),
        );
        let start = Instant::now();
        let deadline = start + self.duration;
        let mut tasks = tokio::task::JoinSet::new();
        for (i, conn) in conns.into_iter().enumerate() {
            let paths = Arc::clone(paths);
            let auth = self.auth.clone();
            let tls = Arc::clone(&self.tls);
            let addr = door.addr();
            tasks.spawn(drive(conn, addr, tls, paths, auth, deadline, i as u64));
        }
        let mut all = ConnStats::default();
        while let Some(r) = tasks.join_next().await {
            let s = r.context("a load task panicked")?;
            all.latencies_us.extend_from_slice(&s.latencies_us);
            all.bytes += s.bytes;
            all.errors += s.errors;
            all.reconnects += s.reconnects;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let after = (
            door.cpu(),
            cpu_seconds(registry),
            cpu_seconds(std::process::id()),
        );
        all.latencies_us.sort_unstable();
        let pct = |q: f64| -> f64 {
            let v = &all.latencies_us;
            if v.is_empty() {
                return f64::NAN;
            }
            let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
            f64::from(v[i]) / 1000.0
        };
        Ok(RunResult {
            requests: all.latencies_us.len() as u64,
            bytes: all.bytes,
            errors: all.errors,
            reconnects: all.reconnects,
            elapsed,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            door_cpu: after.0 - before.0,
            registry_cpu: after.1 - before.1,
            client_cpu: after.2 - before.2,
        })
    }
}

/// One connection's loop: random URL, GET, read the body, record the latency; reopen the
/// connection when the server closed it.
async fn drive(
    conn: Conn,
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    paths: Arc<Vec<Target>>,
    auth: HeaderValue,
    deadline: Instant,
    seed: u64,
) -> ConnStats {
    let mut stats = ConnStats::default();
    let mut send = Some(conn.send);
    // xorshift64*: cheap and good enough to spread requests over the URLs.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    while Instant::now() < deadline {
        let target = &paths[(next() % paths.len() as u64) as usize];
        let t0 = Instant::now();
        let outcome = async {
            let mut s = match send.take() {
                Some(s) if !s.is_closed() => s,
                _ => {
                    stats.reconnects += 1;
                    Conn::open(addr, &tls).await?.send
                }
            };
            s.ready().await?;
            let resp = s.send_request(request(&target.path, addr, &auth)?).await?;
            let status = resp.status();
            let mut body = resp.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                if let Some(d) = frame?.data_ref() {
                    n += d.len() as u64;
                }
            }
            send = Some(s);
            ensure!(status == StatusCode::OK, "status {status}");
            ensure!(n == target.len, "{n} bytes instead of {}", target.len);
            Ok::<u64, anyhow::Error>(n)
        }
        .await;
        match outcome {
            Ok(n) => {
                stats
                    .latencies_us
                    .push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
                stats.bytes += n;
            }
            Err(e) => {
                stats.errors += 1;
                if stats.errors <= 3 {
                    tracing::warn!(error = %format!("{e:#}"), path = %target.path, "request failed");
                }
            }
        }
    }
    stats
}

/// Medians over runs.
struct Summary {
    rps: f64,
    mib_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    door_cpu: f64,
    registry_cpu: f64,
    client_cpu: f64,
}

impl Summary {
    fn of(runs: &[RunResult]) -> Summary {
        let m = |f: &dyn Fn(&RunResult) -> f64| median(runs.iter().map(f).collect());
        Summary {
            rps: m(&|r| r.rps()),
            mib_s: m(&|r| r.mib_s()),
            p50_ms: m(&|r| r.p50_ms),
            p99_ms: m(&|r| r.p99_ms),
            door_cpu: m(&|r| r.cpu_ms_per_req(r.door_cpu)),
            registry_cpu: m(&|r| r.cpu_ms_per_req(r.registry_cpu)),
            client_cpu: m(&|r| r.cpu_ms_per_req(r.client_cpu)),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Cross-check with wrk: same connections, duration and URLs (a Lua script picks one at
/// random per request and adds the Basic auth header), one wrk thread.
async fn run_wrk(
    wrk: &Path,
    dir: &Path,
    doors: &[&dyn FrontDoor],
    paths: &[Target],
    load: &Load,
    runs: u64,
) -> Result<()> {
    let script = dir.join("bench.lua");
    let mut lua = String::from("local paths = {\n");
    for t in paths {
        let _ = writeln!(lua, "  \"{}\",", t.path);
    }
    let _ = write!(
        lua,
        "}}\nmath.randomseed(os.time())\nwrk.headers[\"Authorization\"] = \"{}\"\n\
         wrk.headers[\"User-Agent\"] = \"shoal-bench-gateway-wrk\"\n\
         wrk.headers[\"Accept\"] = \"{OCI_MANIFEST}\"\n\
         request = function()\n  return wrk.format(\"GET\", paths[math.random(#paths)])\nend\n",
        load.auth.to_str()?
    );
    std::fs::write(&script, lua)?;
    println!(
        "  wrk cross-check (wrk -t1 -c{} -d{}s --latency):",
        load.concurrency,
        load.duration.as_secs()
    );
    let mut rps: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut p99: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for run in 0..runs {
        let order: [usize; 2] = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let door = doors[i];
            let out = Command::new(wrk)
                .args(["-t1", &format!("-c{}", load.concurrency)])
                .arg(format!("-d{}s", load.duration.as_secs()))
                .arg("--latency")
                .arg("-s")
                .arg(&script)
                .arg(format!("https://localhost:{}/", door.addr().port()))
                .kill_on_drop(true)
                .output();
            let out = tokio::time::timeout(load.duration + Duration::from_secs(30), out)
                .await
                .context("wrk did not finish")??;
            let text = String::from_utf8_lossy(&out.stdout);
            let r = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
                .and_then(|v| v.trim().parse::<f64>().ok());
            let l99 = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("99%"))
                .and_then(|v| parse_wrk_duration(v.trim()));
            let non2xx = text
                .lines()
                .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
                .unwrap_or("");
            match (r, l99) {
                (Some(r), Some(l)) => {
                    println!(
                        "    {:>3}  {:<12} {:>9.0} req/s  p99 {:>8.2} ms  {non2xx}",
                        run + 1,
                        door.name(),
                        r,
                        l
                    );
                    rps[i].push(r);
                    p99[i].push(l);
                }
                _ => println!("    wrk output not understood:\n{text}"),
            }
        }
    }
    let (rn, rc) = (median(rps[0].clone()), median(rps[1].clone()));
    let (ln, lc) = (median(p99[0].clone()), median(p99[1].clone()));
    println!(
        "    wrk medians: nginx {rn:.0} req/s p99 {ln:.2} ms; coordinator {rc:.0} req/s p99 {lc:.2} ms; \
         ratios: throughput {:.2}x, p99 {:.2}x",
        rc / rn,
        lc / ln
    );
    Ok(())
}

/// `1.23ms`, `850.00us`, `2.01s` → milliseconds.
fn parse_wrk_duration(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}
