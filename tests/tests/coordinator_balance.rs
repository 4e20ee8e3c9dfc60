//! Load balancing over two real `docker-registry` replicas sharing one storage directory and
//! `http.secret`: the weighted split, ip_hash stickiness, digest_hash, `down`, failover when
//! a replica is killed mid-loop, and upload sessions that stay on their replica while the
//! other replica serves pulls. Requests are counted where they land: in the replicas' own
//! access logs.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use shoal_tests::coordinator::{
    CoordinatorOptions, ReplicaOption, TestCoordinator, require_coordinator_tools,
};
use shoal_tests::http::push_blob;
use shoal_tests::{
    AccessLogEntry, CopyOptions, ImageSpec, Registry, Skopeo, TestImage, free_port, verify_layout,
    wait_until,
};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

async fn within(test: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .context("test timed out")?
}

async fn two_replicas() -> Result<(Registry, Registry)> {
    require_coordinator_tools()?;
    let a = Registry::start().await?;
    let b = a.start_replica().await?;
    Ok((a, b))
}

/// Requests of `method` whose path contains `marker`, as logged by the replica.
fn landed(r: &Registry, method: &str, marker: &str) -> Vec<AccessLogEntry> {
    r.access_log()
        .into_iter()
        .filter(|e| e.method == method && e.path.contains(marker))
        .collect()
}

/// Waits until the replicas together logged `total` matching requests (they log when the
/// response is complete, a moment after the client has it), then returns each one's count.
async fn counts(rs: &[&Registry], method: &str, marker: &str, total: usize) -> Result<Vec<usize>> {
    wait_until(
        Duration::from_secs(10),
        "replicas logged every request",
        || async {
            rs.iter()
                .map(|r| landed(r, method, marker).len())
                .sum::<usize>()
                >= total
        },
    )
    .await?;
    Ok(rs.iter().map(|r| landed(r, method, marker).len()).collect())
}

/// Pulls `image` (pushed as `repo:tag`) through the coordinator with plain GETs, checking
/// every digest.
async fn pull_http(
    client: &reqwest::Client,
    c: &TestCoordinator,
    repo: &str,
    image: &TestImage,
) -> Result<()> {
    let r = client
        .get(c.url(&format!("/v2/{repo}/manifests/{}", image.tag())))
        .header("accept", OCI_MANIFEST)
        .send()
        .await?;
    ensure!(r.status() == 200, "manifest: {}", r.status());
    let digest = r.headers()["docker-content-digest"].to_str()?.to_owned();
    ensure!(digest == image.manifest_digest, "manifest digest {digest}");
    for blob in image.blobs() {
        let r = client
            .get(c.url(&format!("/v2/{repo}/blobs/{}", blob.digest)))
            .send()
            .await?;
        ensure!(r.status() == 200, "blob {}: {}", blob.digest, r.status());
        let bytes = r.bytes().await?;
        ensure!(
            shoal_tests::image::sha256_digest(&bytes) == blob.digest,
            "blob {} arrived corrupt or short ({} bytes)",
            blob.digest,
            bytes.len()
        );
    }
    Ok(())
}

async fn small_image(seed: u64, tag: &str) -> Result<TestImage> {
    let tag = tag.to_owned();
    tokio::task::spawn_blocking(move || {
        TestImage::generate(&ImageSpec::new(vec![64 << 10, 96 << 10], seed), &tag)
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_weighted_split_holds_and_down_replicas_get_nothing() -> Result<()> {
    within(async {
        let (a, b) = two_replicas().await?;
        let digest = push_blob(&a.url(), "bal/app", b"weighted split").await?;
        // A third replica on a port nobody listens on, marked down: never tried.
        let dead = format!("http://127.0.0.1:{}", free_port()?);
        let mut opts = CoordinatorOptions::new(&[a.url(), b.url()]);
        opts.policy = "weighted".into();
        // Every request must reach a replica to be counted: concurrent HEADs of one blob
        // would otherwise share one upstream request.
        opts.coalescing = false;
        opts.replicas[0].weight = 2;
        opts.replicas.push(ReplicaOption {
            url: dead.clone(),
            weight: 5,
            down: true,
        });
        let c = TestCoordinator::start(opts).await?;
        let client = c.client()?;
        let path = format!("/v2/bal/app/blobs/{digest}");
        let failures = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (client, url, failures) = (client.clone(), c.url(&path), Arc::clone(&failures));
                tokio::spawn(async move {
                    for _ in 0..250 {
                        match client.head(&url).send().await {
                            Ok(r) if r.status() == 200 => {}
                            _ => {
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.await?;
        }
        ensure!(
            failures.load(Ordering::Relaxed) == 0,
            "{} requests failed",
            failures.load(Ordering::Relaxed)
        );
        let n = counts(&[&a, &b], "HEAD", "/bal/app/blobs/", 1000).await?;
        let ratio = n[0] as f64 / n[1] as f64;
        println!(
            "weighted 2:1 over 1000 requests: replica A {} / replica B {} = {ratio:.3}",
            n[0], n[1]
        );
        ensure!(n[0] + n[1] == 1000, "{n:?}: requests were retried or lost");
        ensure!(
            (1.8..=2.2).contains(&ratio),
            "split {n:?} is not 2:1 within 10%"
        );
        let to_dead = c
            .metric_sum(
                "shoal_coordinator_requests_total",
                &[&format!("upstream=\"{dead}\"")],
            )
            .await?;
        ensure!(
            to_dead == 0.0,
            "the down replica answered {to_dead} requests"
        );
        c.stop().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_ip_hash_keeps_each_client_on_one_replica() -> Result<()> {
    within(async {
        let (a, b) = two_replicas().await?;
        let digest = push_blob(&a.url(), "sticky/app", b"ip hash").await?;
        let mut opts = CoordinatorOptions::new(&[a.url(), b.url()]);
        opts.policy = "ip_hash".into();
        // Counted at the replicas: a HEAD that arrives while the previous one's flight is
        // ending would share it.
        opts.coalescing = false;
        let c = TestCoordinator::start(opts).await?;
        let path = format!("/v2/sticky/app/blobs/{digest}");
        let mut prev = [0usize; 2];
        let mut homes = Vec::new();
        for last in 2..=17u8 {
            let ip = IpAddr::from([127, 0, 0, last]);
            let client = c.client_from(ip)?;
            for _ in 0..10 {
                let r = client.head(c.url(&path)).send().await?;
                ensure!(r.status() == 200, "{ip}: {}", r.status());
            }
            let n = counts(&[&a, &b], "HEAD", "/sticky/app/", prev[0] + prev[1] + 10).await?;
            let delta = [n[0] - prev[0], n[1] - prev[1]];
            ensure!(
                delta == [10, 0] || delta == [0, 10],
                "client {ip} was spread: {delta:?}"
            );
            homes.push((ip, usize::from(delta[1] == 10)));
            prev = [n[0], n[1]];
        }
        let replicas: HashSet<usize> = homes.iter().map(|h| h.1).collect();
        println!("ip_hash: 16 clients of 10 requests each, each on one replica; homes {homes:?}");
        ensure!(replicas.len() == 2, "16 clients all hashed to one replica");
        c.stop().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_digest_hash_sends_each_digest_to_one_replica() -> Result<()> {
    within(async {
        let (a, b) = two_replicas().await?;
        let mut digests = Vec::new();
        for i in 0..24 {
            digests.push(push_blob(&a.url(), "hashed/app", format!("blob {i}").as_bytes()).await?);
        }
        let mut opts = CoordinatorOptions::new(&[a.url(), b.url()]);
        opts.policy = "digest_hash".into();
        let c = TestCoordinator::start(opts).await?;
        let client = c.client()?;
        for _ in 0..3 {
            for d in &digests {
                let r = client
                    .get(c.url(&format!("/v2/hashed/app/blobs/{d}")))
                    .send()
                    .await?;
                ensure!(r.status() == 200, "{d}: {}", r.status());
                r.bytes().await?;
            }
        }
        counts(&[&a, &b], "GET", "/hashed/app/blobs/", 72).await?;
        let mut home: HashMap<String, HashSet<usize>> = HashMap::new();
        for (i, r) in [&a, &b].into_iter().enumerate() {
            for e in landed(r, "GET", "/hashed/app/blobs/") {
                let d = e.path.rsplit('/').next().unwrap_or_default().to_owned();
                home.entry(d).or_default().insert(i);
            }
        }
        ensure!(
            home.values().all(|s| s.len() == 1),
            "a digest was served by both replicas: {home:?}"
        );
        let on_a = home.values().filter(|s| s.contains(&0)).count();
        println!(
            "digest_hash: {on_a} of 24 digests on replica A, {} on B",
            24 - on_a
        );
        ensure!(on_a > 0 && on_a < 24, "every digest hashed to one replica");
        c.stop().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_killing_a_replica_mid_loop_fails_no_pull() -> Result<()> {
    within(async {
        let (a, mut b) = two_replicas().await?;
        let image = small_image(21, "v1").await?;
        Skopeo::push_image(&image, &format!("{}/fail/app:v1", a.host_port()), &CopyOptions::default()).await?;
        let mut opts = CoordinatorOptions::new(&[a.url(), b.url()]);
        opts.health_interval = Duration::from_millis(200);
        opts.max_fails = 1;
        opts.fail_timeout = Duration::from_secs(30);
        let c = Arc::new(TestCoordinator::start(opts).await?);
        let image = Arc::new(image);
        let killed = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let failed_before = Arc::new(AtomicUsize::new(0));
        let failed_after = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let (c, image, killed, done) = (Arc::clone(&c), Arc::clone(&image), Arc::clone(&killed), Arc::clone(&done));
                let (fb, fa) = (Arc::clone(&failed_before), Arc::clone(&failed_after));
                tokio::spawn(async move {
                    let client = c.client()?;
                    for _ in 0..100 {
                        let after_kill = killed.load(Ordering::SeqCst);
                        if let Err(e) = pull_http(&client, &c, "fail/app", &image).await {
                            eprintln!("pull failed (replica killed before it started: {after_kill}): {e:#}");
                            if after_kill { &fa } else { &fb }.fetch_add(1, Ordering::Relaxed);
                        }
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok::<_, anyhow::Error>(())
                })
            })
            .collect();
        wait_until(Duration::from_secs(60), "50 pulls done", || async { done.load(Ordering::SeqCst) >= 50 }).await?;
        b.stop().await?;
        killed.store(true, Ordering::SeqCst);
        for w in workers {
            w.await??;
        }
        let (fb, fa) = (failed_before.load(Ordering::Relaxed), failed_after.load(Ordering::Relaxed));
        println!("200 pulls, replica B killed after 50: {fb} failed while it died, {fa} after");
        ensure!(fa == 0, "{fa} pulls failed after the replica was gone");
        ensure!(fb <= 2, "{fb} pulls failed around the kill (at most the two in flight may)");
        let b_label = b.url();
        wait_until(Duration::from_secs(10), "the dead replica is reported down", || async {
            c.metric_sum("shoal_coordinator_upstream_up", &[&format!("replica=\"{b_label}\"")]).await.ok() == Some(0.0)
        })
        .await?;
        let served_by_a = landed(&a, "GET", "/fail/app/").len();
        ensure!(served_by_a > 0, "replica A served nothing");
        Arc::try_unwrap(c).map_err(|_| anyhow::anyhow!("coordinator still shared"))?.stop().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_uploads_stay_on_their_replica_while_the_other_serves_pulls() -> Result<()> {
    within(async {
        let (a, b) = two_replicas().await?;
        let base = small_image(31, "v1").await?;
        Skopeo::push_image(&base, &format!("{}/served/app:v1", a.host_port()), &CopyOptions::default()).await?;
        let c = Arc::new(TestCoordinator::start(CoordinatorOptions::new(&[a.url(), b.url()])).await?);

        // A pull loop keeps both replicas busy (round robin) for the whole push.
        let stop = Arc::new(AtomicBool::new(false));
        let puller = {
            let (c, stop, base) = (Arc::clone(&c), Arc::clone(&stop), base);
            tokio::spawn(async move {
                let client = c.client()?;
                let mut pulls = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    pull_http(&client, &c, "served/app", &base).await?;
                    pulls += 1;
                }
                Ok::<_, anyhow::Error>(pulls)
            })
        };
        // Three concurrent pushes from one address (like clients behind one NAT), each with
        // chunked PATCH uploads from skopeo.
        let mut pushes = Vec::new();
        for i in 0..3u64 {
            let c = Arc::clone(&c);
            pushes.push(tokio::spawn(async move {
                let image = tokio::task::spawn_blocking(move || {
                    TestImage::generate(&ImageSpec::new(vec![1 << 20, 2 << 20], 40 + i), "v1")
                })
                .await??;
                let reference = format!("{}/pushed/app{i}:v1", c.host_port());
                let opts = CopyOptions::default().tls(c.cert_dir());
                Skopeo::push_image(&image, &reference, &opts).await?;
                let out = tempfile::tempdir()?;
                Skopeo::pull(&reference, &out.path().join("oci"), &opts).await?;
                verify_layout(&out.path().join("oci"), &image)?;
                Ok::<_, anyhow::Error>(())
            }));
        }
        for p in pushes {
            p.await??;
        }
        stop.store(true, Ordering::SeqCst);
        let pulls = puller.await??;

        // Every upload session's requests landed on a single replica.
        let mut sessions: HashMap<String, HashSet<usize>> = HashMap::new();
        for (i, r) in [&a, &b].into_iter().enumerate() {
            for e in r.access_log() {
                if let Some((_, id)) = e.path.split_once("/blobs/uploads/")
                    && !id.is_empty()
                {
                    sessions.entry(id.to_owned()).or_default().insert(i);
                }
            }
        }
        ensure!(!sessions.is_empty(), "no upload session seen at the replicas");
        let split: Vec<_> = sessions.iter().filter(|(_, s)| s.len() > 1).collect();
        ensure!(split.is_empty(), "upload sessions split across replicas: {split:?}");
        let per_replica: Vec<usize> = (0..2)
            .map(|i| sessions.values().filter(|s| s.contains(&i)).count())
            .collect();
        let patches: usize = [&a, &b].iter().map(|r| landed(r, "PATCH", "/pushed/").len()).sum();
        println!(
            "{} upload sessions (per replica {per_replica:?}), {patches} PATCHes, {pulls} pulls meanwhile",
            sessions.len()
        );
        ensure!(patches > 0, "skopeo sent no PATCH");
        ensure!(per_replica.iter().all(|&n| n > 0), "all sessions on one replica: {per_replica:?}");
        for r in [&a, &b] {
            ensure!(!landed(r, "GET", "/served/app/").is_empty(), "a replica served no pull");
        }
        match Arc::try_unwrap(c) {
            Ok(c) => c.stop().await,
            Err(_) => bail!("coordinator still shared"),
        }
    })
    .await
}

/// `upstream_up` of one replica, or -1 when the metric cannot be read.
async fn up(c: &TestCoordinator, replica: &Registry) -> f64 {
    c.metric_sum(
        "shoal_coordinator_upstream_up",
        &[&format!("replica=\"{}\"", replica.url())],
    )
    .await
    .unwrap_or(-1.0)
}

async fn failures(c: &TestCoordinator, replica: &Registry) -> Result<f64> {
    c.metric_sum(
        "shoal_coordinator_upstream_failures_total",
        &[&format!("replica=\"{}\"", replica.url())],
    )
    .await
}

/// Sends `HEAD`s of `url` until `replica` has logged more than `before` of them. Returns how
/// long that took.
async fn until_reached(
    client: &reqwest::Client,
    url: &str,
    replica: &Registry,
    before: usize,
    within: Duration,
) -> Result<Duration> {
    let started = std::time::Instant::now();
    wait_until(within, "requests reach the restarted replica", || async {
        match client.head(url).send().await {
            Ok(r) if r.status() == 200 => {}
            _ => return false,
        }
        landed(replica, "HEAD", "/back/app/").len() > before
    })
    .await?;
    Ok(started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_takes_a_restarted_replica_back() -> Result<()> {
    within(async {
        let (a, mut b) = two_replicas().await?;
        let digest = push_blob(&a.url(), "back/app", b"comes back").await?;
        let path = format!("/v2/back/app/blobs/{digest}");

        // Active checks: every 200 ms. A passive ejection would last a minute, so only a
        // health check can bring the replica back within the bound below.
        let mut opts = CoordinatorOptions::new(&[a.url(), b.url()]);
        opts.coalescing = false;
        opts.health_interval = Duration::from_millis(200);
        opts.max_fails = 1;
        opts.fail_timeout = Duration::from_secs(60);
        let c = TestCoordinator::start(opts).await?;
        let client = c.client()?;
        until_reached(&client, &c.url(&path), &b, 0, Duration::from_secs(10)).await?;

        b.stop().await?;
        wait_until(Duration::from_secs(10), "the stopped replica fails its health check", || async {
            up(&c, &b).await == 0.0
        })
        .await?;
        // Out of rotation: requests go to the other replica only, none is even tried on it.
        for _ in 0..10 {
            let r = client.head(c.url(&path)).send().await?;
            ensure!(r.status() == 200, "while one replica is down: {}", r.status());
        }
        ensure!(
            failures(&c, &b).await? == 0.0,
            "a request was sent to the replica its health check had taken out"
        );
        let before = landed(&b, "HEAD", "/back/app/").len();

        b.restart().await?;
        let restarted = std::time::Instant::now();
        wait_until(Duration::from_secs(5), "the restarted replica passes its health check", || async {
            up(&c, &b).await == 1.0
        })
        .await?;
        let healthy = restarted.elapsed();
        until_reached(&client, &c.url(&path), &b, before, Duration::from_secs(5)).await?;
        println!(
            "active checks every 200 ms: the restarted replica is up {healthy:?} after it answers, serving requests after {:?}",
            restarted.elapsed()
        );
        c.stop().await?;

        // Passive ejection only (no active check after the first round): the replica is
        // ejected by the first request that fails on it (and that request is retried on the
        // other), then tried again once fail_timeout has passed.
        let mut opts = CoordinatorOptions::new(&[a.url(), b.url()]);
        opts.coalescing = false;
        opts.health_interval = Duration::from_secs(3600);
        opts.max_fails = 1;
        opts.fail_timeout = Duration::from_secs(2);
        let checks = || landed(&b, "GET", "/v2/").len();
        let checked = checks();
        let c = TestCoordinator::start(opts).await?;
        let client = c.client()?;
        // Stopped only after the first (and last) round of active checks found it up.
        wait_until(Duration::from_secs(10), "the first health check reached the replica", || async {
            checks() > checked
        })
        .await?;
        b.stop().await?;
        for _ in 0..4 {
            let r = client.head(c.url(&path)).send().await?;
            ensure!(r.status() == 200, "while one replica is down: {}", r.status());
        }
        ensure!(failures(&c, &b).await? >= 1.0, "no request was tried on the stopped replica");
        ensure!(up(&c, &b).await == 0.0, "the stopped replica was not ejected");
        let before = landed(&b, "HEAD", "/back/app/").len();
        b.restart().await?;
        let took = until_reached(&client, &c.url(&path), &b, before, Duration::from_secs(10)).await?;
        println!("passive ejection for 2 s: the restarted replica serves requests again after {took:?}");
        wait_until(Duration::from_secs(5), "the replica is reported up again", || async {
            up(&c, &b).await == 1.0
        })
        .await?;
        c.stop().await
    })
    .await
}
