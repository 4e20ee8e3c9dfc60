//! `bench-serve`: how fast the agent serves a cached blob, compared with a plain loopback TCP
//! copy of the same file, measured in the same run.
//!
//! ```sh
//! cargo run --release -p shoal-tests --bin bench-serve [-- --size-mib 1024 --reps 5]
//! ```
//!
//! Setup: a real registry holding one image with a single incompressible layer of `--size-mib`
//! MiB, an in-process agent in front of it, and one GET through the agent that downloads,
//! verifies and caches the blob (its digest is checked again on the client side).
//!
//! Then `--reps` rounds, each measuring two transfers of the same bytes, interleaved (ABAB...)
//! because the machines this runs on are shared and noisy:
//! - **agent**: an HTTP/1.1 GET of the blob from the agent's mirror port, a fresh connection
//!   per transfer, by a hyper client that reads the body as fast as it can and discards it;
//! - **tcp**: the agent's own store file for that blob (`<store>/blobs/sha256/<hex>`), sent
//!   over a fresh loopback TCP connection by a plain copy loop: a server thread doing blocking
//!   `read` + `write_all` with one reused 1 MiB buffer, and a client reading into a reused 1 MiB
//!   buffer and discarding. That is the straightforward way to copy a file to a socket in user
//!   space, with the same number of data copies as the agent's path (page cache -> buffer ->
//!   socket); it does not use `sendfile`/`splice`, which would measure a zero-copy kernel path
//!   the agent does not attempt.
//!
//! Everything runs in this one process: the agent on the tokio runtime (one worker per core,
//! plus its blocking pool for file reads), the plain-copy server on its own thread, and both
//! clients on the runtime. A first, unmeasured round warms up both paths. The report gives the
//! median, min and max throughput of each, the ratio of the medians against the target (the
//! agent at least 0.8x as fast as the plain copy), and the CPU time the process spent per GiB
//! on each path, which other load on the machine disturbs much less than throughput. The exit
//! code is 0 whatever the ratio: this is a benchmark, not a test.
//!
//! On the 2-core development machine, shared with other work, the two paths came out within
//! noise of each other: medians of 7 reps gave ratios from 0.85 to 1.25 between runs, so a
//! ratio above 1 is not an error, and one run says little; the CPU per GiB is steadier.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use clap::Parser;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use shoal_tests::{
    AgentOptions, CopyOptions, ImageSpec, Registry, Skopeo, TestAgent, TestImage, require_tools,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The throughput ratio (agent / plain TCP) the agent is meant to reach.
const TARGET: f64 = 0.80;
/// Buffer size of the plain-TCP copy, on both ends.
const TCP_BUF: usize = 1 << 20;
const REPO: &str = "bench/blob";
const MIB: f64 = (1 << 20) as f64;

/// Serves a cached blob through the agent to a local HTTP client and, in the same run, copies
/// the same file over a plain loopback TCP socket; prints both throughputs and their ratio.
#[derive(Debug, Parser)]
#[command()]
struct Args {
    /// Size of the blob, in MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65536))]
    size_mib: u64,
    /// Measured transfers of each kind (after one unmeasured warm-up round).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    reps: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The agent runs in this process and logs one line per request; keep the report readable
    // unless RUST_LOG asks for more.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-serve: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-serve: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<()> {
    require_tools()?;
    println!(
        "bench-serve: one cached {} MiB blob; {} agent GETs and {} plain TCP copies, interleaved\n",
        args.size_mib, args.reps, args.reps
    );

    let started = Instant::now();
    let registry = Registry::start().await?;
    let layer = args.size_mib as usize * (1 << 20);
    let image = tokio::task::spawn_blocking(move || {
        TestImage::generate(&ImageSpec::new(vec![layer], 1), "v1")
    })
    .await
    .context("image generation panicked")??;
    let blob = image.layers[0].clone();
    let push = CopyOptions::default().timeout(Duration::from_secs(1200));
    Skopeo::push_image(
        &image,
        &format!("{}/{REPO}:v1", registry.host_port()),
        &push,
    )
    .await?;
    // The registry has its own copy now; free the disk space of the generated layout.
    drop(image);
    println!(
        "  setup: registry, image ({} layer blob {}), push: {:.1} s",
        bytes_mib(blob.size),
        &blob.digest[..19],
        started.elapsed().as_secs_f64()
    );

    let mut opts = AgentOptions::new(&registry.url());
    opts.idle_timeout = Duration::from_secs(60);
    let agent = TestAgent::start_with(opts).await?;
    let url = format!("{}/v2/{REPO}/blobs/{}", agent.url(), blob.digest);
    let addr: SocketAddr = agent.host_port().parse()?;

    // Cold GET: the agent downloads, verifies and stores the blob while streaming it.
    let cold = agent_get(addr, &url, true).await?;
    ensure!(
        cold.bytes == blob.size,
        "cold GET returned {} bytes, expected {}",
        cold.bytes,
        blob.size
    );
    let digest = format!("sha256:{}", cold.sha256.as_deref().unwrap_or_default());
    ensure!(
        digest == blob.digest,
        "cold GET returned content with digest {digest}, expected {}",
        blob.digest
    );
    let file = agent
        .store_root()
        .join("blobs/sha256")
        .join(&blob.digest["sha256:".len()..]);
    let on_disk = std::fs::metadata(&file)
        .with_context(|| format!("the cached blob should be at {}", file.display()))?
        .len();
    ensure!(on_disk == blob.size, "store file has {on_disk} bytes");
    println!(
        "  cold GET through the agent (download + verify + store): {:.0} MiB/s, digest verified",
        cold.mib_per_s()
    );
    println!("  cached file: {}", file.display());

    let tcp = TcpServer::start(file)?;
    // One unmeasured round warms up both paths (page cache, allocator, connection setup).
    agent_get(addr, &url, false).await?;
    tcp.get().await?;

    println!(
        "\n  {:>4}  {:>12}  {:>12}  {:>6}    {:>15}  {:>13}",
        "rep", "agent MiB/s", "tcp MiB/s", "ratio", "agent CPU s/GiB", "tcp CPU s/GiB"
    );
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let (mut a_cpu, mut b_cpu) = (Vec::new(), Vec::new());
    for rep in 1..=args.reps {
        let ag = agent_get(addr, &url, false).await?;
        ensure!(ag.bytes == blob.size, "agent sent {} bytes", ag.bytes);
        let tc = tcp.get().await?;
        ensure!(tc.bytes == blob.size, "tcp copy sent {} bytes", tc.bytes);
        println!(
            "  {rep:>4}  {:>12.0}  {:>12.0}  {:>6.2}    {:>15.2}  {:>13.2}",
            ag.mib_per_s(),
            tc.mib_per_s(),
            ag.mib_per_s() / tc.mib_per_s(),
            ag.cpu_s_per_gib(),
            tc.cpu_s_per_gib(),
        );
        a.push(ag.mib_per_s());
        b.push(tc.mib_per_s());
        a_cpu.push(ag.cpu_s_per_gib());
        b_cpu.push(tc.cpu_s_per_gib());
    }
    agent.stop().await?;
    drop(registry);

    let (ma, mb) = (median(&mut a), median(&mut b));
    let ratio = ma / mb;
    println!();
    println!("agent: {ma:.0} MiB/s  tcp: {mb:.0} MiB/s  ratio: {ratio:.2} (target >= {TARGET:.2})");
    println!(
        "       agent min/max {:.0}/{:.0} MiB/s, tcp min/max {:.0}/{:.0} MiB/s, {} reps of {}",
        a[0],
        a[a.len() - 1],
        b[0],
        b[b.len() - 1],
        args.reps,
        bytes_mib(blob.size),
    );
    let (ca, cb) = (median(&mut a_cpu), median(&mut b_cpu));
    println!(
        "       CPU per GiB moved (this whole process: server and client): agent {ca:.2} s, \
         tcp {cb:.2} s ({:.2}x)",
        ca / cb
    );
    println!(
        "{}",
        if ratio >= TARGET {
            "PASS"
        } else {
            "BELOW TARGET"
        }
    );
    Ok(())
}

/// One transfer: how many bytes, how long from connect to the last byte, and how much CPU
/// time the whole process used meanwhile.
struct Transfer {
    bytes: u64,
    elapsed: Duration,
    cpu: Duration,
    /// Hex SHA-256 of the body, when asked for.
    sha256: Option<String>,
}

impl Transfer {
    fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / MIB / self.elapsed.as_secs_f64()
    }

    /// CPU seconds per GiB: less sensitive than throughput to other load on a shared machine,
    /// since time spent waiting for a core does not count.
    fn cpu_s_per_gib(&self) -> f64 {
        self.cpu.as_secs_f64() / (self.bytes as f64 / (MIB * 1024.0))
    }
}

/// CPU time (user + system, all threads) this process has used so far, from `/proc/self/stat`,
/// in clock ticks (10 ms on Linux, so a 1 GiB transfer is measured to about 1 %).
fn process_cpu() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // Fields after the command name, which is in parentheses and may hold spaces:
            // state is the first, utime (14th of the line) the 12th, stime the 13th.
            let (_, rest) = stat.rsplit_once(')')?;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second())
}

/// `getconf CLK_TCK`: the unit of `/proc/self/stat` times (100 on every common Linux).
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t: &f64| t > 0.0)
            .unwrap_or(100.0)
    })
}

/// GET `url` from the agent at `addr` over a fresh HTTP/1.1 connection, reading the body as
/// fast as it comes; hashes it when `hash` (only for the verification GET: hashing would slow
/// the client down).
async fn agent_get(addr: SocketAddr, url: &str, hash: bool) -> Result<Transfer> {
    let cpu = process_cpu();
    let started = Instant::now();
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let request = Request::get(url)
        .header(header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    if response.status() != StatusCode::OK {
        bail!("GET {url}: status {}", response.status());
    }
    if !hash {
        // Measured GETs must come from the cache, not from a download.
        let source = response.headers().get("x-shoal-source");
        ensure!(
            source.is_some_and(|s| s == "cache"),
            "GET {url} was not served from the cache (X-Shoal-Source: {source:?})"
        );
    }
    let mut body = response.into_body();
    let mut hasher = hash.then(|| ring::digest::Context::new(&ring::digest::SHA256));
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            n += data.len() as u64;
            if let Some(h) = &mut hasher {
                h.update(&data);
            }
        }
    }
    let elapsed = started.elapsed();
    drop(sender);
    let _ = conn.await;
    Ok(Transfer {
        bytes: n,
        elapsed,
        cpu: process_cpu().saturating_sub(cpu),
        sha256: hasher.map(|h| hex::encode(h.finish())),
    })
}

/// The plain-TCP baseline: a thread that accepts loopback connections one at a time and writes
/// the whole file to each with blocking `read` + `write_all` and a reused 1 MiB buffer.
struct TcpServer {
    addr: SocketAddr,
}

impl TcpServer {
    fn start(file: PathBuf) -> Result<TcpServer> {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = listener.local_addr()?;
        // The thread ends with the process; it holds nothing that needs cleaning up.
        std::thread::Builder::new()
            .name("tcp-baseline".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let r = stream.and_then(|s| send_file(&file, s));
                    if let Err(e) = r {
                        eprintln!("bench-serve: tcp baseline server: {e}");
                    }
                }
            })?;
        Ok(TcpServer { addr })
    }

    /// Connects, reads until the server closes, discards.
    async fn get(&self) -> Result<Transfer> {
        let cpu = process_cpu();
        let started = Instant::now();
        let mut stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        let mut buf = vec![0u8; TCP_BUF];
        let mut n = 0u64;
        loop {
            let got = stream.read(&mut buf).await?;
            if got == 0 {
                break;
            }
            n += got as u64;
        }
        let elapsed = started.elapsed();
        Ok(Transfer {
            bytes: n,
            elapsed,
            cpu: process_cpu().saturating_sub(cpu),
            sha256: None,
        })
    }
}

fn send_file(path: &Path, mut socket: std::net::TcpStream) -> std::io::Result<()> {
    socket.set_nodelay(true)?;
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; TCP_BUF];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        socket.write_all(&buf[..n])?;
    }
}

/// Sorts `v` and returns its median.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

fn bytes_mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / MIB)
}
