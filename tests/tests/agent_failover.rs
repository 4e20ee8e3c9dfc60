//! An agent whose upstream is a coordinator's front door, with a second coordinator in
//! `fallback_urls`: when the first one goes away, pulls go on through the second (real
//! `docker-registry`, two real coordinators over TLS, `skopeo`).

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use shoal_tests::coordinator::{CoordinatorOptions, TestCoordinator};
use shoal_tests::{
    AgentOptions, CopyOptions, ImageSpec, Registry, Skopeo, TestAgent, TestImage, require_tools,
    verify_layout,
};

const MIB: usize = 1 << 20;
const TEST_TIMEOUT: Duration = Duration::from_secs(180);

async fn within(test: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .context("test timed out")?
}

/// Access log lines of a coordinator that asked for a blob or manifest of `repo`.
fn v2_requests(c: &TestCoordinator, repo: &str) -> usize {
    let needle = format!("/v2/{repo}/");
    c.access_log()
        .iter()
        .filter(|l| l.contains(&needle))
        .count()
}

async fn pull(agent: &TestAgent, reference: &str, image: &TestImage) -> Result<()> {
    let out = tempfile::tempdir()?;
    let src = format!("{}/{reference}", agent.host_port());
    Skopeo::pull(&src, &out.path().join("oci"), &CopyOptions::default())
        .await
        .with_context(|| format!("pulling {src}"))?;
    verify_layout(&out.path().join("oci"), image)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_go_on_through_the_fallback_coordinator_when_the_first_is_gone() -> Result<()> {
    within(async {
        require_tools()?;
        let registry = Registry::start().await?;
        let first = TestImage::generate(&ImageSpec::new(vec![2 * MIB, MIB], 71), "v1")?;
        let second = TestImage::generate(&ImageSpec::new(vec![3 * MIB], 72), "v1")?;
        for (image, repo) in [(&first, "fo/one"), (&second, "fo/two")] {
            let dest = format!("{}/{repo}:v1", registry.host_port());
            Skopeo::push_image(image, &dest, &CopyOptions::default()).await?;
        }
        let a = TestCoordinator::start(CoordinatorOptions::new(&[registry.url()])).await?;
        let b = TestCoordinator::start(CoordinatorOptions::new(&[registry.url()])).await?;
        // Each test coordinator made its own CA: the agent trusts both.
        let dir = tempfile::tempdir()?;
        let bundle = dir.path().join("front-doors.pem");
        std::fs::write(&bundle, [a.ca_pem(), b.ca_pem()].concat())?;

        let mut opts = AgentOptions::new(&a.url(""));
        // Tags are revalidated upstream on every pull.
        opts.tag_cache_ttl = Duration::from_millis(1);
        opts.upstream_toml = format!(
            "ca_file = {:?}\nfallback_urls = [{:?}]\n",
            bundle.display().to_string(),
            b.url("")
        );
        let agent = TestAgent::start_with(opts).await?;

        pull(&agent, "fo/one:v1", &first).await?;
        ensure!(
            v2_requests(&a, "fo/one") > 0,
            "the first coordinator was not used"
        );
        ensure!(
            v2_requests(&b, "fo/one") == 0,
            "the fallback was used while the first coordinator was up"
        );

        a.stop().await?;
        // An image the agent never saw: every manifest and blob through the fallback.
        pull(&agent, "fo/two:v1", &second).await?;
        let through_b = v2_requests(&b, "fo/two");
        ensure!(
            through_b >= second.layers.len() + 2,
            "only {through_b} requests for fo/two reached the fallback coordinator"
        );
        // The tag of the first image is revalidated through the fallback too.
        pull(&agent, "fo/one:v1", &first).await?;
        ensure!(
            v2_requests(&b, "fo/one") > 0,
            "the tag was not revalidated through the fallback"
        );
        Ok(())
    })
    .await
}
