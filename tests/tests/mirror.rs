//! End-to-end tests of `shoal-agent` as a pull-through mirror: real `docker-registry` upstream,
//! real `skopeo` client, the agent in process on a loopback port.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use shoal_tests::{
    AgentOptions, CopyOptions, ImageSpec, Proxy, Registry, Skopeo, TestAgent, TestImage, http_get,
    require_tools, verify_layout,
};

const MIB: usize = 1 << 20;
const TEST_TIMEOUT: Duration = Duration::from_secs(240);

async fn within(test: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .context("test timed out")?
}

/// A registry holding `image` as `shoal/app:<tag>`.
async fn registry_with(image: &TestImage) -> Result<Registry> {
    require_tools()?;
    let registry = Registry::start().await?;
    let dest = format!("{}/shoal/app:{}", registry.host_port(), image.tag());
    Skopeo::push_image(image, &dest, &CopyOptions::default()).await?;
    Ok(registry)
}

fn three_layers(seed: u64) -> Result<TestImage> {
    TestImage::generate(&ImageSpec::new(vec![3 * MIB, 2 * MIB, 5 * MIB], seed), "v1")
}

async fn pull(agent: &TestAgent, reference: &str) -> Result<tempfile::TempDir> {
    let out = tempfile::tempdir()?;
    let src = format!("{}/{reference}", agent.host_port());
    Skopeo::pull(&src, &out.path().join("oci"), &CopyOptions::default())
        .await
        .with_context(|| format!("pulling {src}"))?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pull_through_agent_matches_every_digest_and_second_pull_is_local() -> Result<()> {
    within(async {
        let image = three_layers(1)?;
        let registry = registry_with(&image).await?;
        let agent = TestAgent::start(&registry.url()).await?;

        let out = pull(&agent, "shoal/app:v1").await?;
        verify_layout(&out.path().join("oci"), &image)?;
        for layer in &image.layers {
            ensure!(
                registry.blob_get_count(&layer.digest) == 1,
                "layer {} fetched {} times from upstream",
                layer.digest,
                registry.blob_get_count(&layer.digest)
            );
        }

        // Second pull: every blob from the store, none from upstream.
        let upstream_before = agent.metric("shoal_agent_upstream_bytes_total").await?;
        let out = pull(&agent, "shoal/app:v1").await?;
        verify_layout(&out.path().join("oci"), &image)?;
        let upstream_after = agent.metric("shoal_agent_upstream_bytes_total").await?;
        ensure!(
            upstream_after == upstream_before,
            "second pull read {} bytes from upstream",
            upstream_after - upstream_before
        );
        for layer in &image.layers {
            ensure!(registry.blob_get_count(&layer.digest) == 1);
        }
        let cached = agent
            .metric("shoal_agent_served_bytes_total{source=\"cache\"}")
            .await?;
        ensure!(
            cached >= image.total_size as f64,
            "served from cache {cached} < image size {}",
            image.total_size
        );
        agent.stop().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_cold_pulls_fetch_each_blob_once() -> Result<()> {
    within(async {
        let image = three_layers(2)?;
        let registry = registry_with(&image).await?;
        // Slow the layers down so the pulls really overlap while the download runs.
        let proxy = Proxy::start(&registry.url()).await?;
        for layer in &image.layers {
            proxy.throttle_blob(&layer.digest, 8 * MIB as u64);
        }
        let agent = TestAgent::start(&proxy.url()).await?;

        let pulls = (0..20).map(|_| pull(&agent, "shoal/app:v1"));
        let outs = futures::future::try_join_all(pulls).await?;
        for out in &outs {
            verify_layout(&out.path().join("oci"), &image)?;
        }
        for blob in image.blobs() {
            let n = registry.blob_get_count(&blob.digest);
            ensure!(
                n == 1,
                "blob {} fetched {n} times from upstream",
                blob.digest
            );
        }
        let shared = agent
            .metric("shoal_agent_served_bytes_total{source=\"upstream\"}")
            .await?;
        ensure!(
            shared > image.total_size as f64,
            "more than one client should have streamed from the running downloads ({shared} bytes)"
        );
        agent.stop().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_endpoint_and_api_version_header() -> Result<()> {
    within(async {
        require_tools()?;
        let registry = Registry::start().await?;
        let agent = TestAgent::start_with(AgentOptions::new(&registry.url())).await?;
        let r = http_get(&format!("{}/v2/", agent.url()), Duration::from_secs(5)).await?;
        ensure!(r.status == 200);
        ensure!(
            r.headers
                .get("docker-distribution-api-version")
                .is_some_and(|v| v == "registry/2.0")
        );
        agent.stop().await
    })
    .await
}
