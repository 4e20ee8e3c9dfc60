//! `bench-swarm`: N agents pull one image at the same moment, once through the swarm and once
//! with peers disabled (every agent from the origin), in the same run; the times are compared
//! with the lower bound that the bandwidth caps allow.
//!
//! ```sh
//! cargo run --release -p shoal-tests --bin bench-swarm [-- --nodes 20 --node-mib-s 4 \
//!     --origin-mib-s 8 --image-mib 32 --layers 3]
//! ```
//!
//! Setup, twice (a fresh cluster and registry per run, so nothing is cached): a real
//! `docker-registry` as the origin behind a TCP relay that shapes everything it sends to
//! `--origin-mib-s` in all (the origin's upload capacity, shared by every connection), a
//! counting proxy, one coordinator, and `--nodes` agents on 127.0.0.2, 127.0.0.3, ..., each
//! with `[peer] upload_limit` and `download_limit` set to `--node-mib-s` (the download cap
//! covers peers and the origin together). The image has `--layers` random layers of
//! `--image-mib` MiB in all. Every agent is then asked for the image at once by an in-process
//! client (manifest by tag, then every blob in parallel, each checked against its digest as
//! it streams), or by `skopeo` with `--skopeo` (heavier on a 2-core machine: twenty Go
//! processes starting together take CPU from the agents).
//!
//! Report, for each run: the origin's blob bytes (the registry's own access log) over the
//! image size; the slowest and median node's time over the lower bound
//! `max(S/U_origin, S/D, N*S/(U_origin + N*U))` for the swarm, `max(S/D, N*S/U_origin)` without
//! peers; and the speedup of the swarm over the no-peer run against the bounds' ratio (the
//! ideal speedup). Targets: origin bytes / size <= 1.05, slowest / bound <= 1.5, speedup >=
//! 0.7x the ideal. The exit code is 0 whatever the figures: this is a benchmark, not a test.
//!
//! Everything runs on this machine: keep N * node rate + origin rate under ~100 MiB/s (the
//! default is 20 * 4 + 8 = 88), or the CPU, not the caps, sets the times.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use clap::Parser;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest as _, Sha256};
use shoal_tests::cluster::{ClusterOptions, TestCluster};
use shoal_tests::{CopyOptions, ImageSpec, TestImage, require_tools};

const MIB: f64 = (1 << 20) as f64;
const REPO: &str = "bench/swarm";
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
                      application/vnd.docker.distribution.manifest.v2+json";

/// Pulls one image on N agents at once, through the swarm and with peers disabled; prints the
/// origin's bytes and the times against the bandwidth lower bound.
#[derive(Debug, Parser)]
#[command()]
struct Args {
    /// Agents.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(2..=200))]
    nodes: u64,
    /// Each agent's download and upload cap, MiB/s (D and U).
    #[arg(long, default_value_t = 4.0)]
    node_mib_s: f64,
    /// Each agent's upload cap, MiB/s, when it differs from the download cap.
    #[arg(long)]
    upload_mib_s: Option<f64>,
    /// The origin's upload capacity, MiB/s, shared by all (U_origin).
    #[arg(long, default_value_t = 8.0)]
    origin_mib_s: f64,
    /// Size of the image's layers in all, MiB (S, besides a small config blob).
    #[arg(long, default_value_t = 32)]
    image_mib: u64,
    /// Layers of the image.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=16))]
    layers: u64,
    /// Pull with skopeo instead of the in-process client.
    #[arg(long)]
    skopeo: bool,
    /// Only the swarm run (no baseline, no speedup).
    #[arg(long)]
    no_baseline: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench-swarm: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-swarm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What one run measured.
struct Run {
    /// Each node's time from the common start to its last verified byte, sorted.
    times: Vec<Duration>,
    origin_bytes: u64,
    origin_gets: usize,
    /// Piece bytes received from peers, all nodes.
    peer_bytes: f64,
}

impl Run {
    fn slowest(&self) -> Duration {
        self.times.last().copied().unwrap_or_default()
    }

    fn median(&self) -> Duration {
        let n = self.times.len();
        if n == 0 {
            return Duration::ZERO;
        }
        if n % 2 == 1 {
            self.times[n / 2]
        } else {
            (self.times[n / 2 - 1] + self.times[n / 2]) / 2
        }
    }
}

async fn run(args: &Args) -> Result<()> {
    require_tools()?;
    ensure!(
        args.node_mib_s > 0.0 && args.origin_mib_s > 0.0,
        "rates must be positive"
    );
    let n = args.nodes as usize;
    let d = args.node_mib_s * MIB;
    let u = args.upload_mib_s.unwrap_or(args.node_mib_s) * MIB;
    let uo = args.origin_mib_s * MIB;
    let layer = (args.image_mib << 20) / args.layers;
    let spec = ImageSpec::new(vec![layer as usize; args.layers as usize], 2026);
    let image = TestImage::generate(&spec, "v1")?;
    let s = image.blobs().iter().map(|b| b.size).sum::<u64>() as f64;
    let nf = n as f64;
    let bound = (s / uo).max(s / d).max(nf * s / (uo + nf * u));
    let bound_nopeer = (s / d).max(nf * s / uo);
    println!(
        "bench-swarm: N={n}, D={:.1} MiB/s, U={:.1} MiB/s, U_origin={:.1} MiB/s, image S={:.1} MiB \
         ({} layers + config), client={}",
        d / MIB,
        u / MIB,
        uo / MIB,
        s / MIB,
        args.layers,
        if args.skopeo { "skopeo" } else { "in-process" }
    );
    println!(
        "lower bounds: swarm max(S/U_origin, S/D, N*S/(U_origin+N*U)) = max({:.2}, {:.2}, {:.2}) = {bound:.2} s; \
         no peers max(S/D, N*S/U_origin) = {bound_nopeer:.2} s; ideal speedup {:.2}x",
        s / uo,
        s / d,
        nf * s / (uo + nf * u),
        bound_nopeer / bound
    );

    let swarm = measure(args, &image, true).await?;
    report("swarm", &swarm, s, bound);
    if args.no_baseline {
        return Ok(());
    }
    let nopeer = measure(args, &image, false).await?;
    report("no peers", &nopeer, s, bound_nopeer);

    let speedup = nopeer.slowest().as_secs_f64() / swarm.slowest().as_secs_f64();
    let ideal = bound_nopeer / bound;
    println!();
    println!("targets:");
    let origin_ratio = swarm.origin_bytes as f64 / s;
    verdict(
        "origin bytes / image size (swarm)",
        origin_ratio,
        "<=",
        1.05,
        origin_ratio <= 1.05,
    );
    let slow = swarm.slowest().as_secs_f64() / bound;
    verdict("slowest / bound (swarm)", slow, "<=", 1.5, slow <= 1.5);
    println!(
        "  median / bound (swarm)                 {:.3}",
        swarm.median().as_secs_f64() / bound
    );
    verdict(
        "speedup over no peers / ideal speedup",
        speedup / ideal,
        ">=",
        0.7,
        speedup / ideal >= 0.7,
    );
    println!("  (speedup {speedup:.2}x, ideal {ideal:.2}x)");
    Ok(())
}

fn verdict(what: &str, value: f64, op: &str, target: f64, ok: bool) {
    println!(
        "  {what:<38} {value:.3} (target {op} {target}) {}",
        if ok { "ok" } else { "MISSED" }
    );
}

fn report(what: &str, r: &Run, s: f64, bound: f64) {
    println!();
    println!("{what}:");
    println!(
        "  origin served {:.1} MiB in {} blob GETs = {:.3}x the image; {:.1} MiB came from peers",
        r.origin_bytes as f64 / MIB,
        r.origin_gets,
        r.origin_bytes as f64 / s,
        r.peer_bytes / MIB
    );
    println!(
        "  slowest {:.2} s ({:.3}x the bound {bound:.2} s), median {:.2} s ({:.3}x), fastest {:.2} s",
        r.slowest().as_secs_f64(),
        r.slowest().as_secs_f64() / bound,
        r.median().as_secs_f64(),
        r.median().as_secs_f64() / bound,
        r.times.first().copied().unwrap_or_default().as_secs_f64()
    );
}

async fn measure(args: &Args, image: &TestImage, peers: bool) -> Result<Run> {
    let n = args.nodes as usize;
    let rate = |mib_s: f64| (mib_s * MIB) as u64;
    let mut opts = ClusterOptions::new(n);
    opts.origin_rate = Some(rate(args.origin_mib_s));
    opts.peer_toml = format!(
        "enabled = {peers}\nupload_limit = {}\ndownload_limit = {}\n",
        rate(args.upload_mib_s.unwrap_or(args.node_mib_s)),
        rate(args.node_mib_s)
    );
    opts.agent_ready_timeout = Duration::from_secs(120);
    // A shaped origin shared by N agents sends each of them little at a time.
    opts.upstream_idle_timeout = Duration::from_secs(60);
    eprintln!(
        "starting a cluster of {n} agents ({})...",
        if peers { "swarm" } else { "peers disabled" }
    );
    let cluster = TestCluster::start(opts).await?;
    let name = cluster.push(image, REPO).await?;
    let before = cluster.origin_served();
    eprintln!("pulling on {n} agents at once...");
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let out = tempfile::tempdir()?;
    let start = Instant::now();
    let pulls = (0..n).map(|i| {
        let (client, cluster, name, out) = (&client, &cluster, &name, &out);
        async move {
            if args.skopeo {
                let opts = CopyOptions::default().timeout(Duration::from_secs(1800));
                cluster
                    .pull_with(i, name, &out.path().join(format!("n{i}")), &opts)
                    .await?;
            } else {
                let host = cluster.agent(i).agent().host_port();
                pull(client, &host, REPO, image.tag()).await?;
            }
            Ok::<_, anyhow::Error>(start.elapsed())
        }
    });
    let results = futures::future::join_all(pulls).await;
    let mut times = Vec::with_capacity(n);
    for (i, r) in results.into_iter().enumerate() {
        times.push(r.with_context(|| format!("pull through agent {i}"))?);
    }
    times.sort();
    let served = cluster.origin_served() - before;
    let mut peer_bytes = 0.0;
    for i in 0..n {
        peer_bytes += cluster
            .metric(i, "shoal_agent_peer_received_bytes_total")
            .await?;
    }
    let checked = cluster.check_stores()?;
    ensure!(
        checked >= n * (image.layers.len() + 1),
        "only {checked} blobs committed"
    );
    Ok(Run {
        times,
        origin_bytes: served.bytes,
        origin_gets: served.gets,
        peer_bytes,
    })
}

/// Pulls `repo:tag` from the registry at `host` like a runtime: the manifest, then every blob
/// at once, each streamed and checked against its digest.
async fn pull(
    client: &Client<HttpConnector, Empty<Bytes>>,
    host: &str,
    repo: &str,
    tag: &str,
) -> Result<()> {
    let manifest = get(
        client,
        &format!("http://{host}/v2/{repo}/manifests/{tag}"),
        None,
    )
    .await?;
    let m: serde_json::Value = serde_json::from_slice(&manifest).context("manifest JSON")?;
    let mut digests = vec![
        m["config"]["digest"]
            .as_str()
            .context("manifest without config")?
            .to_owned(),
    ];
    for l in m["layers"].as_array().context("manifest without layers")? {
        digests.push(l["digest"].as_str().context("layer digest")?.to_owned());
    }
    let blobs = digests.iter().map(|d| {
        let url = format!("http://{host}/v2/{repo}/blobs/{d}");
        async move { get(client, &url, Some(d)).await.map(|_| ()) }
    });
    for r in futures::future::join_all(blobs).await {
        r?;
    }
    Ok(())
}

/// One GET; with `digest`, the body is hashed as it streams (and not kept) and must match.
async fn get(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: &str,
    digest: Option<&str>,
) -> Result<Vec<u8>> {
    let req = Request::get(url)
        .header(header::ACCEPT, ACCEPT)
        .body(Empty::new())?;
    let resp = client
        .request(req)
        .await
        .with_context(|| format!("GET {url}"))?;
    if resp.status() != StatusCode::OK {
        bail!("GET {url}: {}", resp.status());
    }
    let mut body = resp.into_body();
    let mut kept = Vec::new();
    let mut hasher = Sha256::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.with_context(|| format!("GET {url}: body"))?;
        if let Ok(data) = frame.into_data() {
            match digest {
                Some(_) => hasher.update(&data),
                None => kept.extend_from_slice(&data),
            }
        }
    }
    if let Some(d) = digest {
        let got = format!("sha256:{}", hex::encode(hasher.finalize()));
        ensure!(got == d, "GET {url}: body hashes to {got}");
    }
    Ok(kept)
}
