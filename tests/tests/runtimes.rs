//! The real container runtimes (containerd 1.6 with `ctr`, podman 4.3, dockerd 20.10) pull
//! through `shoal-agent` configured the way README.md tells users to configure them.
//!
//! Each test: a real `docker-registry` upstream holding a small generated image, the agent in
//! process in front of it, and a counting [`Proxy`] between the runtime and the agent, so the
//! test sees every request the runtime sent (method, path, `?ns=`, status). The registry's
//! access log shows what reached upstream. Every runtime keeps all of its state in temp dirs.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use shoal_proto::api::{DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_V2};
use shoal_tests::http::{get_streamed, push_manifest};
use shoal_tests::runtimes::{
    CONTAINERD_BIN, CTR_BIN, Containerd, DOCKER_BIN, DOCKERD_BIN, Dockerd, HostsDir, PODMAN_BIN,
    Podman, mounts_under, processes_mentioning, require_runtimes,
};
use shoal_tests::{
    AgentOptions, CopyOptions, Fault, ImageSpec, ManifestFormat, Proxy, Registry, RequestLog,
    Skopeo, TestAgent, TestImage, require_tools,
};

const MIB: usize = 1 << 20;
const TEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Docker Hub, which test machines cannot reach (and which has no `test/app`): a client that
/// fell back from the mirror to it would fail, so a successful pull proves the mirror served it.
const DOCKER_HUB: &str = "https://registry-1.docker.io";

async fn within(test: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .context("test timed out")?
}

/// A small image: two random layers of 1 and 2 MiB.
fn small_image(seed: u64, tag: &str) -> Result<TestImage> {
    TestImage::generate(&ImageSpec::new(vec![MIB, 2 * MIB], seed), tag)
}

/// A registry holding `image` as `repo:<tag>`.
async fn registry_with(image: &TestImage, repo: &str) -> Result<Registry> {
    require_tools()?;
    let registry = Registry::start().await?;
    let dest = format!("{}/{repo}:{}", registry.host_port(), image.tag());
    Skopeo::push_image(image, &dest, &CopyOptions::default()).await?;
    Ok(registry)
}

/// An agent whose upstreams are `(host, registry)` pairs, the first being the default.
async fn agent_for(upstreams: &[(&str, &Registry)]) -> Result<TestAgent> {
    let mut opts = AgentOptions::new(&upstreams[0].1.url());
    opts.upstreams = upstreams
        .iter()
        .map(|(host, registry)| ((*host).to_owned(), registry.url()))
        .collect();
    TestAgent::start_with(opts).await
}

/// Every blob of `image` was fetched from `registry` exactly once.
fn each_blob_fetched_once(registry: &Registry, image: &TestImage) -> Result<()> {
    for blob in image.blobs() {
        let n = registry.blob_get_count(&blob.digest);
        ensure!(
            n == 1,
            "blob {} was fetched {n} times from the registry (want 1); registry log:\n{}",
            blob.digest,
            registry.log_text()
        );
    }
    Ok(())
}

/// Every request the runtime sent was answered with a success, so nothing was refused and
/// retried elsewhere behind the test's back.
fn all_succeeded(requests: &[RequestLog], who: &str) -> Result<()> {
    let failed: Vec<String> = requests
        .iter()
        .filter(|r| r.status.is_none_or(|s| !s.is_success()))
        .map(describe)
        .collect();
    ensure!(
        failed.is_empty(),
        "{who} got error answers from the agent: {failed:#?}\nall requests: {:#?}",
        requests.iter().map(describe).collect::<Vec<_>>()
    );
    Ok(())
}

fn describe(r: &RequestLog) -> String {
    let query = r
        .query
        .as_deref()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let status = r.status.map_or("-".to_owned(), |s| s.as_str().to_owned());
    format!("{} {}{query} -> {status}", r.method, r.path)
}

/// The `/v2/<name>/...` requests in `requests` (not the `/v2/` ping).
fn api_requests(requests: &[RequestLog]) -> Vec<&RequestLog> {
    requests.iter().filter(|r| r.path != "/v2/").collect()
}

/// Every layer blob of `image` was fetched from the agent (through the proxy) at least once.
fn layers_fetched(proxy: &Proxy, image: &TestImage) -> Result<()> {
    for layer in &image.layers {
        let n = proxy.blob_get_count(&layer.digest);
        ensure!(
            n >= 1,
            "layer {} was never fetched from the agent",
            layer.digest
        );
    }
    Ok(())
}

fn diff_ids(inspect: &serde_json::Value) -> Vec<String> {
    inspect["RootFS"]["Layers"]
        .as_array()
        .map(|layers| {
            layers
                .iter()
                .filter_map(|l| l.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// `ctr images pull` through the agent for `docker.io` (containerd adds `?ns=docker.io` to
/// every request), then a second, fresh containerd pulls the same image from the agent's cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_docker_io_through_the_agent_and_a_fresh_containerd_hits_the_cache()
-> Result<()> {
    within(async {
        require_runtimes(&[CONTAINERD_BIN, CTR_BIN])?;
        let started = Instant::now();
        let image = small_image(101, "v1")?;
        let registry = registry_with(&image, "test/app").await?;
        let agent = agent_for(&[("docker.io", &registry)]).await?;
        let proxy = Proxy::start(&agent.url()).await?;
        let hosts = HostsDir::new()?;
        hosts.add_mirror("docker.io", DOCKER_HUB, &proxy.url())?;
        let reference = "docker.io/test/app:v1";

        let first = Containerd::start().await?;
        let out = first
            .pull(reference, &hosts)
            .await
            .with_context(|| format!("containerd log:\n{}", first.log_text()))?;
        let pull_time = out.elapsed;
        ensure!(first.image_digest(reference).await? == image.manifest_digest);
        let content = first.content_digests().await?;
        for blob in image.blobs() {
            ensure!(
                content.contains(&blob.digest),
                "{} is missing from containerd's content store: {content:?}",
                blob.digest
            );
        }
        let requests = proxy.requests();
        all_succeeded(&requests, "containerd")?;
        let api = api_requests(&requests);
        ensure!(!api.is_empty());
        for r in &api {
            ensure!(
                r.query.as_deref() == Some("ns=docker.io"),
                "containerd should name the registry in every request: {}",
                describe(r)
            );
        }
        layers_fetched(&proxy, &image)?;
        each_blob_fetched_once(&registry, &image)?;
        ensure!(
            agent
                .metric("shoal_agent_cache_misses_total{kind=\"blob\"}")
                .await?
                >= image.blobs().len() as f64
        );
        first.stop().await?;

        // A new node: nothing in its content store, everything in the agent's.
        proxy.reset();
        let upstream_before = agent.metric("shoal_agent_upstream_bytes_total").await?;
        let second = Containerd::start().await?;
        let out2 = second
            .pull(reference, &hosts)
            .await
            .with_context(|| format!("containerd log:\n{}", second.log_text()))?;
        ensure!(second.image_digest(reference).await? == image.manifest_digest);
        all_succeeded(&proxy.requests(), "the second containerd")?;
        layers_fetched(&proxy, &image)?;
        each_blob_fetched_once(&registry, &image)?;
        let upstream_after = agent.metric("shoal_agent_upstream_bytes_total").await?;
        ensure!(
            upstream_after == upstream_before,
            "the second pull read {} bytes from upstream",
            upstream_after - upstream_before
        );
        ensure!(
            agent
                .metric("shoal_agent_served_bytes_total{source=\"cache\"}")
                .await?
                >= image.total_size as f64
        );
        second.stop().await?;
        eprintln!(
            "containerd: cold pull {pull_time:.2?}, warm pull {:.2?}, test {:.2?}",
            out2.elapsed,
            started.elapsed()
        );
        agent.stop().await
    })
    .await
}

/// One agent mirrors two registries for containerd: `?ns=registry.example:5000` picks the
/// second upstream. A registry the agent does not know gets a 404, and containerd falls back to
/// the registry itself (README: "a node never loses the ability to pull").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_a_second_registry_by_ns_and_falls_back_past_an_unknown_one() -> Result<()>
{
    within(async {
        require_runtimes(&[CONTAINERD_BIN, CTR_BIN])?;
        let hub_image = small_image(102, "v1")?;
        let team_image = small_image(103, "v2")?;
        let hub = registry_with(&hub_image, "test/app").await?;
        let team = registry_with(&team_image, "team/tool").await?;
        let agent = agent_for(&[("docker.io", &hub), ("registry.example:5000", &team)]).await?;
        let proxy = Proxy::start(&agent.url()).await?;
        let hosts = HostsDir::new()?;
        hosts.add_mirror("docker.io", DOCKER_HUB, &proxy.url())?;
        hosts.add_mirror(
            "registry.example:5000",
            "https://registry.example:5000",
            &proxy.url(),
        )?;
        // The team registry under its loopback address, which the agent is not configured for.
        hosts.add_mirror(&team.host_port(), &team.url(), &proxy.url())?;
        let containerd = Containerd::start().await?;

        let reference = "registry.example:5000/team/tool:v2";
        containerd
            .pull(reference, &hosts)
            .await
            .with_context(|| format!("containerd log:\n{}", containerd.log_text()))?;
        ensure!(containerd.image_digest(reference).await? == team_image.manifest_digest);
        let requests = proxy.requests();
        all_succeeded(&requests, "containerd")?;
        for r in api_requests(&requests) {
            // Go's url.Values encodes the colon.
            ensure!(
                matches!(
                    r.query.as_deref(),
                    Some("ns=registry.example%3A5000" | "ns=registry.example:5000")
                ),
                "unexpected request: {}",
                describe(r)
            );
        }
        each_blob_fetched_once(&team, &team_image)?;
        ensure!(
            hub.access_log()
                .iter()
                .all(|e| !e.path.contains("team/tool")),
            "the docker.io upstream was asked for the team image"
        );

        // docker.io through the same agent, by ns, after the other registry.
        containerd
            .pull("docker.io/test/app:v1", &hosts)
            .await
            .with_context(|| format!("containerd log:\n{}", containerd.log_text()))?;
        each_blob_fetched_once(&hub, &hub_image)?;

        // Unknown registry: the agent answers 404 NAME_UNKNOWN without asking any upstream,
        // and containerd goes on to the registry itself.
        proxy.reset();
        let direct = format!("{}/team/tool:v2", team.host_port());
        let team_log_before = team.access_log().len();
        let fresh = Containerd::start().await?;
        fresh
            .pull(&direct, &hosts)
            .await
            .with_context(|| format!("containerd log:\n{}", fresh.log_text()))?;
        ensure!(fresh.image_digest(&direct).await? == team_image.manifest_digest);
        let to_agent = proxy.requests();
        let to_agent_api = api_requests(&to_agent);
        ensure!(
            !to_agent_api.is_empty()
                && to_agent_api
                    .iter()
                    .all(|r| r.status.is_some_and(|s| s.as_u16() == 404)),
            "the agent should refuse a registry it does not mirror: {:#?}",
            to_agent.iter().map(describe).collect::<Vec<_>>()
        );
        let direct_gets = team.access_log()[team_log_before..]
            .iter()
            .filter(|e| e.method == "GET" && e.path.contains("/blobs/"))
            .filter(|e| e.user_agent.starts_with("containerd"))
            .count();
        ensure!(
            direct_gets >= team_image.layers.len(),
            "containerd should have fetched the layers from the registry itself; log:\n{}",
            team.log_text()
        );
        fresh.stop().await?;
        containerd.stop().await?;
        agent.stop().await
    })
    .await
}

/// `podman pull` with a `registries.conf` mirror for docker.io (no `ns`: the agent's default
/// upstream is docker.io), then a fresh podman store pulls it from the agent's cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_through_the_agent_and_a_fresh_store_hits_the_cache() -> Result<()> {
    within(async {
        require_runtimes(&[PODMAN_BIN])?;
        let started = Instant::now();
        let image = small_image(104, "v1")?;
        let registry = registry_with(&image, "test/app").await?;
        let agent = agent_for(&[("docker.io", &registry)]).await?;
        let proxy = Proxy::start(&agent.url()).await?;
        let reference = "docker.io/test/app:v1";

        let first = Podman::with_mirror("docker.io", "registry-1.docker.io", &proxy.host_port())?;
        let out = first.pull(reference).await?;
        let inspect = first.inspect(reference).await?;
        ensure!(
            diff_ids(&inspect) == image.diff_ids,
            "podman unpacked other layers: {inspect:#}"
        );
        ensure!(
            inspect["Digest"].as_str() == Some(image.manifest_digest.as_str()),
            "podman stored another manifest: {inspect:#}"
        );
        let requests = proxy.requests();
        all_succeeded(&requests, "podman")?;
        ensure!(
            requests.iter().all(|r| r.query.is_none()),
            "podman sends no ns: {:#?}",
            requests.iter().map(describe).collect::<Vec<_>>()
        );
        layers_fetched(&proxy, &image)?;
        each_blob_fetched_once(&registry, &image)?;

        proxy.reset();
        let upstream_before = agent.metric("shoal_agent_upstream_bytes_total").await?;
        let second = Podman::with_mirror("docker.io", "registry-1.docker.io", &proxy.host_port())?;
        let out2 = second.pull(reference).await?;
        ensure!(diff_ids(&second.inspect(reference).await?) == image.diff_ids);
        all_succeeded(&proxy.requests(), "the second podman")?;
        layers_fetched(&proxy, &image)?;
        each_blob_fetched_once(&registry, &image)?;
        ensure!(agent.metric("shoal_agent_upstream_bytes_total").await? == upstream_before);
        eprintln!(
            "podman: cold pull {:.2?}, warm pull {:.2?}, test {:.2?}",
            out.elapsed,
            out2.elapsed,
            started.elapsed()
        );
        agent.stop().await
    })
    .await
}

/// dockerd with `--registry-mirror` pulls `test/app:v1` (Docker Hub implied, no `ns`) through
/// the agent, then a fresh dockerd pulls it from the agent's cache. Nothing of either daemon
/// (dockerd or the containerd it starts) is left running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_pulls_through_the_agent_as_registry_mirror_and_a_fresh_daemon_hits_the_cache()
-> Result<()> {
    within(async {
        require_runtimes(&[DOCKERD_BIN, DOCKER_BIN])?;
        let started = Instant::now();
        let image = small_image(105, "v1")?;
        let registry = registry_with(&image, "test/app").await?;
        let agent = agent_for(&[("docker.io", &registry)]).await?;
        let proxy = Proxy::start(&agent.url()).await?;

        let first = Dockerd::start(&proxy.url()).await?;
        let first_dir = first.dir().to_owned();
        let out = first
            .pull("test/app:v1")
            .await
            .with_context(|| format!("dockerd log:\n{}", first.log_text()))?;
        let inspect = first.inspect("test/app:v1").await?;
        ensure!(
            diff_ids(&inspect) == image.diff_ids,
            "docker unpacked other layers: {inspect:#}"
        );
        let repo_digest = format!("test/app@{}", image.manifest_digest);
        ensure!(
            inspect["RepoDigests"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d.as_str() == Some(&repo_digest))),
            "docker stored another manifest: {inspect:#}"
        );
        let requests = proxy.requests();
        all_succeeded(&requests, "docker")?;
        ensure!(
            requests.iter().all(|r| r.query.is_none()),
            "docker sends no ns: {:#?}",
            requests.iter().map(describe).collect::<Vec<_>>()
        );
        layers_fetched(&proxy, &image)?;
        each_blob_fetched_once(&registry, &image)?;
        first.stop().await?;
        ensure!(
            processes_mentioning(&first_dir).is_empty(),
            "left running: {:?}",
            processes_mentioning(&first_dir)
        );

        proxy.reset();
        let upstream_before = agent.metric("shoal_agent_upstream_bytes_total").await?;
        let second = Dockerd::start(&proxy.url()).await?;
        let second_dir = second.dir().to_owned();
        let out2 = second
            .pull("test/app:v1")
            .await
            .with_context(|| format!("dockerd log:\n{}", second.log_text()))?;
        ensure!(diff_ids(&second.inspect("test/app:v1").await?) == image.diff_ids);
        all_succeeded(&proxy.requests(), "the second docker")?;
        layers_fetched(&proxy, &image)?;
        each_blob_fetched_once(&registry, &image)?;
        ensure!(agent.metric("shoal_agent_upstream_bytes_total").await? == upstream_before);
        // Dropped, not stopped: the drop path must not leave dockerd or its containerd behind.
        drop(second);
        ensure!(
            processes_mentioning(&second_dir).is_empty(),
            "left running after drop: {:?}",
            processes_mentioning(&second_dir)
        );
        ensure!(
            mounts_under(&second_dir).is_empty() && !second_dir.exists(),
            "left behind after drop: mounts {:?}",
            mounts_under(&second_dir)
        );
        eprintln!(
            "docker: cold pull {:.2?}, warm pull {:.2?}, test {:.2?}",
            out.elapsed,
            out2.elapsed,
            started.elapsed()
        );
        agent.stop().await
    })
    .await
}

/// The platform name of this machine in image indexes.
fn native_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// containerd, podman and docker, one after the other, pull the same multi-platform image (a
/// Docker manifest list of Docker v2s2 images, as on Docker Hub) through one agent: each picks
/// this machine's platform, and upstream sends each of its layers once in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_runtime_pulls_a_multi_platform_image_and_upstream_sends_each_layer_once()
-> Result<()> {
    within(async {
        require_runtimes(&[CONTAINERD_BIN, CTR_BIN, PODMAN_BIN, DOCKERD_BIN, DOCKER_BIN])?;
        let native = small_image(106, "native")?;
        let foreign = small_image(107, "foreign")?;
        require_tools()?;
        let registry = Registry::start().await?;
        let v2s2 = CopyOptions::default().format(ManifestFormat::V2s2);
        let mut entries = Vec::new();
        for (image, arch) in [(&native, native_arch()), (&foreign, "s390x")] {
            let dest = format!("{}/test/multi:{}", registry.host_port(), image.tag());
            let pushed = Skopeo::push_image(image, &dest, &v2s2).await?;
            let digest = pushed.digest.context("skopeo reported no digest")?;
            let manifest = get_streamed(
                &format!("{}/v2/test/multi/manifests/{digest}", registry.url()),
                &[("Accept", DOCKER_MANIFEST_V2)],
                Duration::from_secs(10),
            )
            .await?;
            ensure!(
                manifest.status == 200,
                "manifest {digest}: {}",
                manifest.status
            );
            entries.push(serde_json::json!({
                "mediaType": DOCKER_MANIFEST_V2,
                "digest": digest,
                "size": manifest.body.len(),
                "platform": { "architecture": arch, "os": "linux" },
            }));
        }
        let list = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST_LIST,
            "manifests": entries,
        })
        .to_string();
        let list_digest = push_manifest(
            &registry.url(),
            "test/multi",
            "v1",
            DOCKER_MANIFEST_LIST,
            list.as_bytes(),
        )
        .await?;
        let agent = agent_for(&[("docker.io", &registry)]).await?;
        let proxy = Proxy::start(&agent.url()).await?;

        let hosts = HostsDir::new()?;
        hosts.add_mirror("docker.io", DOCKER_HUB, &proxy.url())?;
        let containerd = Containerd::start().await?;
        containerd
            .pull("docker.io/test/multi:v1", &hosts)
            .await
            .with_context(|| format!("containerd log:\n{}", containerd.log_text()))?;
        ensure!(containerd.image_digest("docker.io/test/multi:v1").await? == list_digest);
        containerd.stop().await?;

        let podman = Podman::with_mirror("docker.io", "registry-1.docker.io", &proxy.host_port())?;
        podman.pull("docker.io/test/multi:v1").await?;
        ensure!(diff_ids(&podman.inspect("docker.io/test/multi:v1").await?) == native.diff_ids);

        let dockerd = Dockerd::start(&proxy.url()).await?;
        dockerd
            .pull("test/multi:v1")
            .await
            .with_context(|| format!("dockerd log:\n{}", dockerd.log_text()))?;
        ensure!(diff_ids(&dockerd.inspect("test/multi:v1").await?) == native.diff_ids);
        dockerd.stop().await?;

        let requests = proxy.requests();
        all_succeeded(&requests, "the runtimes")?;
        for layer in &native.layers {
            ensure!(
                proxy.blob_get_count(&layer.digest) == 3,
                "each runtime should have fetched layer {} from the agent once",
                layer.digest
            );
            ensure!(
                registry.blob_get_count(&layer.digest) == 1,
                "layer {} fetched {} times from upstream",
                layer.digest,
                registry.blob_get_count(&layer.digest)
            );
        }
        for layer in &foreign.layers {
            ensure!(
                registry.blob_get_count(&layer.digest) == 0,
                "a layer of the other platform was fetched"
            );
        }
        agent.stop().await
    })
    .await
}

/// After one pull, the registry goes away: fresh containerd, podman and docker instances still
/// pull the tag, which the agent answers from its last known manifest (offline grace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_runtime_pulls_a_cached_tag_while_the_registry_is_down() -> Result<()> {
    within(async {
        require_runtimes(&[CONTAINERD_BIN, CTR_BIN, PODMAN_BIN, DOCKERD_BIN, DOCKER_BIN])?;
        let image = small_image(108, "v1")?;
        let mut registry = registry_with(&image, "test/app").await?;
        let mut opts = AgentOptions::new(&registry.url());
        opts.upstreams = vec![("docker.io".to_owned(), registry.url())];
        // Every tag request goes upstream first, so the grace path is what answers.
        opts.tag_cache_ttl = Duration::ZERO;
        let agent = TestAgent::start_with(opts).await?;
        let proxy = Proxy::start(&agent.url()).await?;
        let hosts = HostsDir::new()?;
        hosts.add_mirror("docker.io", DOCKER_HUB, &proxy.url())?;

        let warm = Containerd::start().await?;
        warm.pull("docker.io/test/app:v1", &hosts).await?;
        warm.stop().await?;
        registry.stop().await?;
        proxy.reset();

        let started = Instant::now();
        let containerd = Containerd::start().await?;
        containerd
            .pull("docker.io/test/app:v1", &hosts)
            .await
            .with_context(|| format!("containerd log:\n{}", containerd.log_text()))?;
        ensure!(containerd.image_digest("docker.io/test/app:v1").await? == image.manifest_digest);
        containerd.stop().await?;
        let containerd_time = started.elapsed();

        let started = Instant::now();
        let podman = Podman::with_mirror("docker.io", "registry-1.docker.io", &proxy.host_port())?;
        podman.pull("docker.io/test/app:v1").await?;
        ensure!(diff_ids(&podman.inspect("docker.io/test/app:v1").await?) == image.diff_ids);
        let podman_time = started.elapsed();

        let started = Instant::now();
        let dockerd = Dockerd::start(&proxy.url()).await?;
        dockerd
            .pull("test/app:v1")
            .await
            .with_context(|| format!("dockerd log:\n{}", dockerd.log_text()))?;
        ensure!(diff_ids(&dockerd.inspect("test/app:v1").await?) == image.diff_ids);
        dockerd.stop().await?;
        let docker_time = started.elapsed();

        let requests = proxy.requests();
        all_succeeded(&requests, "the runtimes")?;
        ensure!(
            agent
                .metric("shoal_agent_stale_manifests_served_total")
                .await?
                >= 3.0
        );
        eprintln!(
            "registry down: containerd {containerd_time:.2?}, podman {podman_time:.2?}, \
             docker {docker_time:.2?}"
        );
        agent.stop().await
    })
    .await
}

/// Upstream breaks mid-layer while containerd pulls through the agent. When upstream dies, the
/// agent resumes with a Range request and containerd notices nothing. When upstream sends
/// corrupt bytes, the agent aborts the download: containerd never commits a wrong blob, the
/// agent never stores one, and a fresh containerd then pulls the image.
///
/// (containerd 1.6 itself resumes the aborted body with `Range: bytes=<size-1>-`, gets the
/// last byte from the agent's next, verified, download, and then fails its commit with
/// "unexpected commit digest"; its full-size ingest stays, so that containerd fails every later
/// pull of the image until the ingest is removed or its lease expires. Docker 20.10 recovers on
/// its own, re-downloading after its retry delay.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pull_survives_an_upstream_that_breaks_mid_layer() -> Result<()> {
    within(async {
        require_runtimes(&[CONTAINERD_BIN, CTR_BIN])?;
        let cut = small_image(109, "v1")?;
        let bad = small_image(110, "v1")?;
        let registry = registry_with(&cut, "test/cut").await?;
        let dest = format!("{}/test/bad:v1", registry.host_port());
        Skopeo::push_image(&bad, &dest, &CopyOptions::default()).await?;
        let upstream = Proxy::start(&registry.url()).await?;
        let mut opts = AgentOptions::new(&upstream.url());
        opts.upstreams = vec![("docker.io".to_owned(), upstream.url())];
        let agent = TestAgent::start_with(opts).await?;
        let proxy = Proxy::start(&agent.url()).await?;
        let hosts = HostsDir::new()?;
        hosts.add_mirror("docker.io", DOCKER_HUB, &proxy.url())?;
        let containerd = Containerd::start().await?;

        let cut_layer = &cut.layers[1].digest;
        upstream.inject_times(cut_layer, Fault::TruncateAfter(MIB as u64 / 2), 1);
        containerd
            .pull("docker.io/test/cut:v1", &hosts)
            .await
            .with_context(|| format!("containerd log:\n{}", containerd.log_text()))?;
        ensure!(containerd.image_digest("docker.io/test/cut:v1").await? == cut.manifest_digest);
        let requests = proxy.requests();
        all_succeeded(&requests, "containerd")?;
        ensure!(
            requests.iter().all(|r| r.complete && r.range.is_none()),
            "containerd should have seen one whole answer per request: {:#?}",
            requests.iter().map(describe).collect::<Vec<_>>()
        );
        ensure!(
            upstream
                .requests()
                .iter()
                .any(|r| r.blob_digest() == Some(cut_layer) && r.range.is_some()),
            "the agent should have resumed the cut layer with a Range request"
        );

        let bad_layer = &bad.layers[1].digest;
        upstream.inject_times(bad_layer, Fault::Corrupt, 1);
        let first = containerd.pull("docker.io/test/bad:v1", &hosts).await;
        ensure!(
            agent
                .metric("shoal_agent_verification_failures_total")
                .await?
                >= 1.0
        );
        match first {
            Ok(_) => ensure!(
                containerd.image_digest("docker.io/test/bad:v1").await? == bad.manifest_digest
            ),
            Err(e) => ensure!(
                format!("{e:#}").contains("unexpected commit digest"),
                "containerd should refuse the blob for its digest: {e:#}"
            ),
        }
        let fresh = Containerd::start().await?;
        fresh
            .pull("docker.io/test/bad:v1", &hosts)
            .await
            .with_context(|| format!("containerd log:\n{}", fresh.log_text()))?;
        ensure!(fresh.image_digest("docker.io/test/bad:v1").await? == bad.manifest_digest);
        let content = fresh.content_digests().await?;
        ensure!(content.contains(bad_layer));
        fresh.stop().await?;
        containerd.stop().await?;
        agent.stop().await
    })
    .await
}
