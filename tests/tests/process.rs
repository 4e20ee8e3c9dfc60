//! Process-level tests of the `shoal-agent` binary: `kill -9` in the middle of a download,
//! SIGTERM draining, and configuration errors.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use shoal_tests::http::{End, get_streamed};
use shoal_tests::{
    AgentOptions, AgentProcess, CopyOptions, ImageSpec, Proxy, Registry, Skopeo, TestImage,
    require_tools, verify_layout,
};

const MIB: usize = 1 << 20;
const TEST_TIMEOUT: Duration = Duration::from_secs(240);
const AGENT_BIN: &str = env!("CARGO_BIN_EXE_agent-under-test");

async fn within(test: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .context("test timed out")?
}

async fn registry_with(image: &TestImage) -> Result<Registry> {
    require_tools()?;
    let registry = Registry::start().await?;
    let dest = format!("{}/shoal/app:{}", registry.host_port(), image.tag());
    Skopeo::push_image(image, &dest, &CopyOptions::default()).await?;
    Ok(registry)
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_a_download_leaves_no_partial_blob_and_the_next_pull_resumes() -> Result<()> {
    within(async {
        let image = TestImage::generate(&ImageSpec::new(vec![40 * MIB], 11), "v1")?;
        let registry = registry_with(&image).await?;
        let proxy = Proxy::start(&registry.url()).await?;
        let layer = image.layers[0].clone();
        proxy.throttle_blob(&layer.digest, 8 * MIB as u64);

        let store = tempfile::tempdir()?;
        let mut opts = AgentOptions::new(&proxy.url());
        opts.store_dir = Some(store.path().join("store"));
        let mut agent = AgentProcess::start(Path::new(AGENT_BIN), &opts).await?;

        // A client starts the download; kill the agent once well past the first checkpoint.
        let url = format!("{}/v2/shoal/app/blobs/{}", agent.url(), layer.digest);
        let client =
            tokio::spawn(async move { get_streamed(&url, &[], Duration::from_secs(30)).await });
        proxy
            .wait_for(
                Duration::from_secs(30),
                "20 MiB of the layer sent",
                |reqs| {
                    reqs.iter()
                        .any(|r| r.path.ends_with(&layer.digest) && r.body_bytes >= 20 * MIB as u64)
                },
            )
            .await?;
        agent.kill9().await?;
        let r = client.await??;
        ensure!(
            r.end != End::Complete,
            "the client must not see a complete blob"
        );

        let hex = layer.digest.trim_start_matches("sha256:");
        let blobs = opts.store_dir.as_ref().unwrap().join("blobs/sha256");
        ensure!(
            !files_in(&blobs).iter().any(|f| f == hex),
            "a partial blob is in blobs/ after kill -9"
        );

        // Restart on the same store: the download resumes with a Range request and completes.
        proxy.clear_faults();
        proxy.reset();
        agent.restart().await?;
        let out = tempfile::tempdir()?;
        let src = format!("{}/shoal/app:v1", agent.host_port());
        Skopeo::pull(&src, &out.path().join("oci"), &CopyOptions::default())
            .await
            .with_context(|| format!("pull after restart; agent log:\n{}", agent.log_text()))?;
        verify_layout(&out.path().join("oci"), &image)?;
        let resumed = proxy
            .requests()
            .into_iter()
            .filter(|r| r.path.ends_with(&layer.digest) && r.method == http::Method::GET)
            .collect::<Vec<_>>();
        ensure!(
            resumed
                .iter()
                .any(|r| r.range.as_deref().is_some_and(|h| h != "bytes=0-")),
            "the download after restart should resume with a Range request: {resumed:?}"
        );
        ensure!(files_in(&blobs).iter().any(|f| f == hex));
        let status = agent.terminate().await?;
        ensure!(status.success(), "agent exit status {status}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_an_in_flight_transfer_finish_then_exits_cleanly() -> Result<()> {
    within(async {
        let image = TestImage::generate(&ImageSpec::new(vec![8 * MIB], 12), "v1")?;
        let registry = registry_with(&image).await?;
        let proxy = Proxy::start(&registry.url()).await?;
        let layer = image.layers[0].clone();
        proxy.throttle_blob(&layer.digest, 4 * MIB as u64);
        let mut agent =
            AgentProcess::start(Path::new(AGENT_BIN), &AgentOptions::new(&proxy.url())).await?;

        let url = format!("{}/v2/shoal/app/blobs/{}", agent.url(), layer.digest);
        let client =
            tokio::spawn(async move { get_streamed(&url, &[], Duration::from_secs(30)).await });
        proxy
            .wait_for(Duration::from_secs(30), "1 MiB of the layer sent", |reqs| {
                reqs.iter()
                    .any(|r| r.path.ends_with(&layer.digest) && r.body_bytes >= MIB as u64)
            })
            .await?;
        let status = agent.terminate().await?;
        ensure!(status.success(), "exit status after SIGTERM: {status}");
        let r = client.await??;
        ensure!(
            r.end == End::Complete,
            "in-flight transfer was cut: {:?}",
            r.end
        );
        ensure!(
            shoal_tests::image::sha256_digest(&r.body) == layer.digest,
            "drained transfer has wrong bytes"
        );
        ensure!(
            agent.log_text().contains("draining"),
            "log should say it drained:\n{}",
            agent.log_text()
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn bad_config_is_one_clear_message_and_exit_code_2() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases = [
        ("listen = 1\n", "unknown field"),
        (
            "[mirror]\nlisten = \"0.0.0.0:5050\"\n[[upstream]]\nhost = \"r.io\"\nurl = \"https://r.io\"\n",
            "not a loopback address",
        ),
        ("[[upstream]]\nhost = \"r.io\"\n", "missing field `url`"),
        ("[store\n", "invalid config file"),
    ];
    for (text, want) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text)?;
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::process::Command::new(AGENT_BIN)
                .arg("--config")
                .arg(&path)
                .kill_on_drop(true)
                .output(),
        )
        .await??;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2),
            "{text:?}: exit {:?}",
            out.status
        );
        ensure!(stderr.contains(want), "{text:?}: stderr {stderr:?}");
        ensure!(
            stderr.starts_with("shoal-agent: "),
            "{text:?}: message should name the program: {stderr:?}"
        );
    }
    let out = tokio::process::Command::new(AGENT_BIN)
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .await?;
    ensure!(out.status.code() == Some(2));
    ensure!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleted_index_is_rebuilt_from_blobs_at_start() -> Result<()> {
    within(async {
        let image = TestImage::generate(&ImageSpec::new(vec![MIB, 2 * MIB], 13), "v1")?;
        let mut registry = registry_with(&image).await?;
        let store = tempfile::tempdir()?;
        let mut opts = AgentOptions::new(&registry.url());
        opts.store_dir = Some(store.path().join("store"));
        let mut agent = AgentProcess::start(Path::new(AGENT_BIN), &opts).await?;
        let out = tempfile::tempdir()?;
        let src = format!("{}/shoal/app@{}", agent.host_port(), image.manifest_digest);
        Skopeo::pull(&src, &out.path().join("a"), &CopyOptions::default()).await?;
        ensure!(agent.terminate().await?.success());

        std::fs::remove_file(store.path().join("store/index.redb"))?;
        registry.stop().await?;
        agent.restart().await?;
        // Upstream is gone: everything must come from the rebuilt store.
        Skopeo::pull(&src, &out.path().join("b"), &CopyOptions::default())
            .await
            .with_context(|| format!("pull from the rebuilt store; log:\n{}", agent.log_text()))?;
        verify_layout(&out.path().join("b"), &image)?;
        ensure!(
            agent.log_text().contains("rebuil"),
            "the log should say the index was rebuilt:\n{}",
            agent.log_text()
        );
        ensure!(agent.terminate().await?.success());
        Ok(())
    })
    .await
}

/// `[log] format = "json"`: every line of the agent's log is one JSON object, and each request
/// is one `pull` line that says where the bytes came from (upstream on the first pull, the
/// store on the second).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_logs_have_one_pull_line_per_request_with_its_source() -> Result<()> {
    within(async {
        let image = TestImage::generate(&ImageSpec::new(vec![MIB, 2 * MIB], 13), "v1")?;
        let registry = registry_with(&image).await?;
        let mut opts = AgentOptions::new(&registry.url());
        opts.extra_toml = "[log]\nformat = \"json\"\n".into();
        let mut agent = AgentProcess::start(Path::new(AGENT_BIN), &opts).await?;
        for round in ["upstream", "cache"] {
            let out = tempfile::tempdir()?;
            let src = format!("{}/shoal/app:v1", agent.host_port());
            Skopeo::pull(&src, &out.path().join("oci"), &CopyOptions::default())
                .await
                .with_context(|| format!("{round} pull; agent log:\n{}", agent.log_text()))?;
            verify_layout(&out.path().join("oci"), &image)?;
        }
        let status = agent.terminate().await?;
        ensure!(status.success(), "exit status after SIGTERM: {status}");

        let log = std::fs::read_to_string(agent.log_path())?;
        let mut lines = Vec::new();
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("a log line is not JSON: {line}"))?;
            lines.push(v);
        }
        for layer in &image.layers {
            let sources: Vec<&str> = lines
                .iter()
                .filter(|v| {
                    v["message"] == "pull"
                        && v["method"] == "GET"
                        && v["path"]
                            .as_str()
                            .is_some_and(|p| p.ends_with(&layer.digest))
                })
                .filter_map(|v| v["source"].as_str())
                .collect();
            ensure!(
                sources == ["upstream", "cache"],
                "pull lines of {} say {sources:?}; log:\n{log}",
                layer.digest
            );
        }
        Ok(())
    })
    .await
}

/// A transfer still stalled when `[mirror] drain_timeout` runs out is aborted (the client sees
/// a broken transfer, never a short complete body) and the agent exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_aborts_what_outlives_the_drain_timeout_and_exits_cleanly() -> Result<()> {
    within(async {
        let image = TestImage::generate(&ImageSpec::new(vec![2 * MIB], 14), "v1")?;
        let registry = registry_with(&image).await?;
        let proxy = Proxy::start(&registry.url()).await?;
        let layer = image.layers[0].clone();
        proxy.stall_blob_after(&layer.digest, MIB as u64 / 2);
        let mut opts = AgentOptions::new(&proxy.url());
        opts.mirror_extra = "drain_timeout = \"1s\"\n".into();
        let mut agent = AgentProcess::start(Path::new(AGENT_BIN), &opts).await?;

        let url = format!("{}/v2/shoal/app/blobs/{}", agent.url(), layer.digest);
        let client =
            tokio::spawn(async move { get_streamed(&url, &[], Duration::from_secs(30)).await });
        proxy
            .wait_for(
                Duration::from_secs(30),
                "half a MiB of the layer sent",
                |reqs| {
                    reqs.iter()
                        .any(|r| r.path.ends_with(&layer.digest) && r.body_bytes >= MIB as u64 / 2)
                },
            )
            .await?;
        let status = agent.terminate().await?;
        ensure!(status.success(), "exit status after SIGTERM: {status}");
        let r = client.await??;
        ensure!(
            r.end == End::Aborted && (r.body.len() as u64) < layer.size,
            "a transfer cut by the drain timeout must be aborted: {:?} after {} bytes",
            r.end,
            r.body.len()
        );
        ensure!(
            agent.log_text().contains("drain timeout"),
            "the log should say the drain timed out:\n{}",
            agent.log_text()
        );
        proxy.release_stalls();
        Ok(())
    })
    .await
}
