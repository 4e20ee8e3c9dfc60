//! Checks the harness itself against the real registry and skopeo: if these fail, end-to-end
//! test failures say nothing about Shoal.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use shoal_tests::image::sha256_digest;
use shoal_tests::{
    CopyOptions, Fault, ImageSpec, ManifestFormat, Proxy, Registry, Skopeo, TestImage, http_get,
    verify_layout,
};

const MIB: usize = 1 << 20;
/// Upper bound for a whole test; each step inside has its own, shorter timeout.
const TEST_TIMEOUT: Duration = Duration::from_secs(180);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a test body with an overall deadline, so a hang fails instead of blocking CI.
async fn within(test: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .context("test timed out")?
}

/// A registry holding `image` as `selftest/app:<tag>`.
async fn registry_with(image: &TestImage) -> Result<Registry> {
    let registry = Registry::start().await?;
    let dest = format!("{}/selftest/app:{}", registry.host_port(), image.tag());
    Skopeo::push_image(image, &dest, &CopyOptions::default()).await?;
    Ok(registry)
}

fn blob_url(base: &str, digest: &str) -> String {
    format!("{base}/v2/selftest/app/blobs/{digest}")
}

/// How a streamed GET ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Complete,
    /// The connection broke before the body was complete.
    Error,
    /// No bytes arrived for the idle timeout.
    Idle,
}

#[derive(Debug)]
struct Streamed {
    status: StatusCode,
    body: Vec<u8>,
    end: End,
}

/// GETs `url` and reads the body frame by frame, giving up after `idle` without data.
async fn get_streamed(url: &str, range: Option<&str>, idle: Duration) -> Result<Streamed> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut request = Request::get(url);
    if let Some(range) = range {
        request = request.header(http::header::RANGE, range);
    }
    let response = tokio::time::timeout(HTTP_TIMEOUT, client.request(request.body(Empty::new())?))
        .await
        .context("response headers timed out")??;
    let status = response.status();
    let mut body = response.into_body();
    let mut received = Vec::new();
    let end = loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => break End::Idle,
            Ok(None) => break End::Complete,
            Ok(Some(Err(_))) => break End::Error,
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    received.extend_from_slice(&data);
                }
            }
        }
    };
    Ok(Streamed {
        status,
        body: received,
        end,
    })
}

#[test]
fn tools_are_installed() {
    shoal_tests::require_tools().unwrap();
}

#[test]
fn generates_a_64_mib_layer_quickly() {
    let started = Instant::now();
    let image = TestImage::generate(&ImageSpec::new(vec![64 * MIB], 1), "big").unwrap();
    let elapsed = started.elapsed();
    verify_layout(image.dir(), &image).unwrap();
    // About 0.7 s on the 2-core machine; the bound only catches a slide back to real deflate
    // or sha2 in debug builds (10 s and more).
    assert!(elapsed < Duration::from_secs(8), "took {elapsed:?}");
    assert!(image.total_size > 64 * MIB as u64);
}

#[tokio::test]
async fn push_then_pull_through_proxy_gets_each_layer_once() -> Result<()> {
    within(async {
        let image = TestImage::generate(&ImageSpec::new(vec![MIB, 2 * MIB, 3 * MIB], 11), "v1")?;
        let registry = registry_with(&image).await?;
        let proxy = Proxy::start(&registry.url()).await?;

        let out = tempfile::tempdir()?;
        let layout = out.path().join("oci");
        let src = format!("{}/selftest/app:v1", proxy.host_port());
        let pulled = Skopeo::pull(&src, &layout, &CopyOptions::default()).await?;
        verify_layout(&layout, &image)?;
        // An OCI image pulled into an oci: layout is not converted, so even the manifest
        // digest survives.
        assert_eq!(
            pulled.digest.as_deref(),
            Some(image.manifest_digest.as_str())
        );

        let gets = proxy.blob_gets();
        for layer in &image.layers {
            assert_eq!(
                gets.get(&layer.digest),
                Some(&1),
                "layer {}: {gets:?}",
                layer.digest
            );
        }
        assert_eq!(gets.get(&image.config_digest), Some(&1), "{gets:?}");
        assert_eq!(gets.len(), image.layers.len() + 1, "{gets:?}");
        let expected_bytes: u64 = image.blobs().iter().map(|blob| blob.size).sum();
        assert_eq!(proxy.bytes_served_for_blobs(), expected_bytes);
        assert!(
            proxy
                .requests()
                .iter()
                .all(|r| r.complete && r.status.is_some())
        );
        assert_eq!(
            proxy.count(&Method::GET, |path| path.ends_with("/manifests/v1")),
            1
        );

        // The registry's access log saw the same blob GETs.
        for layer in &image.layers {
            assert_eq!(
                registry.blob_get_count(&layer.digest),
                1,
                "{}",
                registry.log_text()
            );
        }

        proxy.reset();
        assert!(proxy.requests().is_empty());
        Ok(())
    })
    .await
}

#[tokio::test]
async fn push_through_proxy_streams_uploads() -> Result<()> {
    within(async {
        let image = TestImage::generate(&ImageSpec::new(vec![2 * MIB], 12), "up")?;
        let registry = Registry::start().await?;
        let proxy = Proxy::start(&registry.url()).await?;
        let dest = format!("{}/selftest/app:up", proxy.host_port());
        Skopeo::push_image(&image, &dest, &CopyOptions::default()).await?;
        // The registry builds upload URLs from the Host header the proxy passed through, so
        // every upload step went through the proxy.
        assert!(proxy.count(&Method::PUT, |path| path.contains("/blobs/uploads/")) >= 2);
        let blob = http_get(
            &blob_url(&registry.url(), &image.layers[0].digest),
            HTTP_TIMEOUT,
        )
        .await?;
        assert_eq!(blob.status, StatusCode::OK);
        assert_eq!(sha256_digest(&blob.body), image.layers[0].digest);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn v2s2_push_keeps_layer_digests() -> Result<()> {
    within(async {
        let image = TestImage::generate(&ImageSpec::new(vec![MIB, MIB], 13), "docker")?;
        let registry = Registry::start().await?;
        let dest = format!("{}/selftest/app:docker", registry.host_port());
        let opts = CopyOptions::default().format(ManifestFormat::V2s2);
        let pushed = Skopeo::push_image(&image, &dest, &opts).await?;
        assert_ne!(
            pushed.digest.as_deref(),
            Some(image.manifest_digest.as_str())
        );

        let out = tempfile::tempdir()?;
        let layout = out.path().join("oci");
        Skopeo::pull(&dest, &layout, &CopyOptions::default()).await?;
        // Converting the manifest back to OCI changes its digest, but never the layer blobs.
        verify_layout(&layout, &image)?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn corrupt_blob_makes_skopeo_pull_fail() -> Result<()> {
    within(async {
        let image = TestImage::generate(&ImageSpec::new(vec![MIB, MIB], 14), "v1")?;
        let registry = registry_with(&image).await?;
        let proxy = Proxy::start(&registry.url()).await?;
        let victim = &image.layers[1];
        proxy.corrupt_blob(&victim.digest);

        // Directly: same length, one byte different, so only the digest tells.
        let streamed =
            get_streamed(&blob_url(&proxy.url(), &victim.digest), None, HTTP_TIMEOUT).await?;
        assert_eq!(streamed.end, End::Complete);
        assert_eq!(streamed.body.len() as u64, victim.size);
        let original = std::fs::read(image.blob_path(&victim.digest)?)?;
        let differing = original
            .iter()
            .zip(&streamed.body)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(differing, 1);

        let out = tempfile::tempdir()?;
        let src = format!("{}/selftest/app:v1", proxy.host_port());
        let err = Skopeo::pull(&src, &out.path().join("oci"), &CopyOptions::default())
            .await
            .expect_err("skopeo must reject a corrupted layer");
        let message = format!("{err:#}");
        assert!(message.to_lowercase().contains("digest"), "{message}");
        assert!(
            proxy
                .requests()
                .iter()
                .any(|r| r.faults == [Fault::Corrupt]),
            "{:?}",
            proxy.requests()
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn proxy_truncate_stall_throttle_and_delay() -> Result<()> {
    within(async {
        let image = TestImage::generate(&ImageSpec::new(vec![MIB], 15), "v1")?;
        let registry = registry_with(&image).await?;
        let proxy = Proxy::start(&registry.url()).await?;
        let layer = &image.layers[0];
        let url = blob_url(&proxy.url(), &layer.digest);
        let original = std::fs::read(image.blob_path(&layer.digest)?)?;

        // Truncate once: the first GET breaks after exactly N bytes, a ranged retry resumes.
        proxy.inject_times(&layer.digest, Fault::TruncateAfter(100_000), 1);
        let first = get_streamed(&url, None, HTTP_TIMEOUT).await?;
        assert_eq!(first.status, StatusCode::OK);
        assert_eq!(first.end, End::Error);
        assert_eq!(first.body.len(), 100_000);
        let resumed = get_streamed(&url, Some("bytes=100000-"), HTTP_TIMEOUT).await?;
        assert_eq!(resumed.status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(resumed.end, End::Complete);
        let mut whole = first.body;
        whole.extend_from_slice(&resumed.body);
        assert_eq!(sha256_digest(&whole), layer.digest);
        let records = proxy.requests();
        assert_eq!(records.len(), 2);
        assert_eq!(
            (records[0].body_bytes, records[0].complete),
            (100_000, false)
        );
        assert_eq!(records[1].range.as_deref(), Some("bytes=100000-"));
        assert!(records[1].complete);

        // Stall: N bytes, then silence until released, then the rest.
        proxy.reset();
        proxy.stall_blob_after(&layer.digest, 200_000);
        let stalled = get_streamed(&url, None, Duration::from_millis(500)).await?;
        assert_eq!((stalled.end, stalled.body.len()), (End::Idle, 200_000));
        proxy.clear_faults();
        let reader = tokio::spawn({
            let url = url.clone();
            async move { get_streamed(&url, None, HTTP_TIMEOUT).await }
        });
        // The second GET has no fault: it completes on its own.
        let unfaulted = reader.await??;
        assert_eq!(
            (unfaulted.end, unfaulted.body.len() as u64),
            (End::Complete, layer.size)
        );

        proxy.stall_blob_after(&layer.digest, 300_000);
        let reader = tokio::spawn({
            let url = url.clone();
            async move { get_streamed(&url, None, HTTP_TIMEOUT).await }
        });
        proxy
            .wait_for(
                HTTP_TIMEOUT,
                "the stalled GET sent 300000 bytes",
                |requests| {
                    requests.iter().any(|r| {
                        r.body_bytes == 300_000 && r.faults == [Fault::StallAfter(300_000)]
                    })
                },
            )
            .await?;
        proxy.release_stalls();
        let released = reader.await??;
        assert_eq!(released.end, End::Complete);
        assert_eq!(released.body, original);
        proxy.clear_faults();

        // Throttle: 128 KiB at 256 KiB/s in 16 KiB pieces; the first goes out at once, each
        // further one after a 62.5 ms pause, so the client has it all after 437.5 ms.
        proxy.throttle_blob(&layer.digest, 256 * 1024);
        let started = Instant::now();
        let throttled = get_streamed(&url, Some("bytes=0-131071"), HTTP_TIMEOUT).await?;
        assert_eq!(
            (throttled.end, throttled.body.len()),
            (End::Complete, 131_072)
        );
        assert!(
            started.elapsed() >= Duration::from_millis(430),
            "{:?}",
            started.elapsed()
        );
        proxy.clear_faults();

        // Delay applies before the request is forwarded, to manifests too.
        proxy.inject("v1", Fault::Delay(Duration::from_millis(300)));
        let started = Instant::now();
        let manifest = get_streamed(
            &format!("{}/v2/selftest/app/manifests/v1", proxy.url()),
            None,
            HTTP_TIMEOUT,
        )
        .await?;
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_ne!(manifest.status, StatusCode::BAD_GATEWAY);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn proxy_fail_all_stop_and_resume() -> Result<()> {
    within(async {
        let registry = Registry::start().await?;
        let proxy = Proxy::start(&registry.url()).await?;
        let v2 = format!("{}/v2/", proxy.url());
        assert_eq!(http_get(&v2, HTTP_TIMEOUT).await?.status, StatusCode::OK);

        proxy.fail_all(StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            http_get(&v2, HTTP_TIMEOUT).await?.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        proxy.clear_faults();
        assert_eq!(http_get(&v2, HTTP_TIMEOUT).await?.status, StatusCode::OK);

        proxy.stop().await;
        assert!(!proxy.is_running());
        let err = http_get(&v2, HTTP_TIMEOUT)
            .await
            .expect_err("stopped proxy answered");
        assert!(format!("{err:#}").contains("onnection refused"), "{err:#}");
        proxy.resume().await?;
        assert_eq!(http_get(&v2, HTTP_TIMEOUT).await?.status, StatusCode::OK);

        // An upstream that is down shows up as 502 from the proxy.
        let mut registry = registry;
        registry.stop().await?;
        assert_eq!(
            http_get(&v2, HTTP_TIMEOUT).await?.status,
            StatusCode::BAD_GATEWAY
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn registry_stop_and_restart_keeps_port_and_data() -> Result<()> {
    within(async {
        let image = TestImage::generate(&ImageSpec::new(vec![MIB], 16), "v1")?;
        let mut registry = registry_with(&image).await?;
        let port = registry.addr().port();
        let v2 = format!("{}/v2/", registry.url());
        let blob = blob_url(&registry.url(), &image.layers[0].digest);

        registry.stop().await?;
        ensure!(
            http_get(&v2, HTTP_TIMEOUT).await.is_err(),
            "stopped registry answered"
        );

        registry.restart().await?;
        assert_eq!(registry.addr().port(), port);
        assert_eq!(http_get(&v2, HTTP_TIMEOUT).await?.status, StatusCode::OK);
        let fetched = http_get(&blob, HTTP_TIMEOUT).await?;
        assert_eq!(fetched.status, StatusCode::OK);
        assert_eq!(sha256_digest(&fetched.body), image.layers[0].digest);

        // The app log has one "response completed" line per request, across restarts.
        let log = registry.log_text();
        assert!(log.contains("listening on"), "{log}");
        assert!(log.contains("http.request.method=GET"), "{log}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn replicas_share_storage() -> Result<()> {
    within(async {
        let image = TestImage::generate(&ImageSpec::new(vec![MIB], 17), "v1")?;
        let first = registry_with(&image).await?;
        let second = first.start_replica().await?;
        assert_ne!(first.addr(), second.addr());
        assert_eq!(first.storage_dir(), second.storage_dir());
        drop(first);
        // The storage outlives the registry that created it while a replica uses it.
        let fetched = http_get(
            &blob_url(&second.url(), &image.layers[0].digest),
            HTTP_TIMEOUT,
        )
        .await?;
        assert_eq!(fetched.status, StatusCode::OK);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn htpasswd_registry_needs_credentials() -> Result<()> {
    within(async {
        let dir = tempfile::tempdir()?;
        let htpasswd = dir.path().join("htpasswd");
        // bcrypt for "s3cret", made by Debian's `htpasswd -nbB`; Distribution 2.8 takes no
        // other hash format.
        std::fs::write(
            &htpasswd,
            "alice:$2y$05$f4z0o4pQsCscEHjhu7mqoulxC48ysE2KcfQ5pCngbf1oWhHMgb0Li\n",
        )?;
        let registry = Registry::builder().htpasswd(&htpasswd).start().await?;
        let v2 = http_get(&format!("{}/v2/", registry.url()), HTTP_TIMEOUT).await?;
        assert_eq!(v2.status, StatusCode::UNAUTHORIZED);

        let image = TestImage::generate(&ImageSpec::new(vec![64 * 1024], 18), "v1")?;
        let dest = format!("{}/selftest/app:v1", registry.host_port());
        Skopeo::push_image(&image, &dest, &CopyOptions::default().creds("alice:s3cret")).await?;
        let out = tempfile::tempdir()?;
        let denied = Skopeo::pull(&dest, &out.path().join("anon"), &CopyOptions::default()).await;
        let Err(err) = denied else {
            bail!("anonymous pull from an htpasswd registry succeeded");
        };
        assert!(format!("{err:#}").contains("unauthorized"), "{err:#}");
        Skopeo::pull(
            &dest,
            &out.path().join("ok"),
            &CopyOptions::default().creds("alice:s3cret"),
        )
        .await?;
        verify_layout(&out.path().join("ok"), &image)?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn skopeo_timeout_kills_a_stuck_pull() -> Result<()> {
    within(async {
        let image = TestImage::generate(&ImageSpec::new(vec![MIB], 19), "v1")?;
        let registry = registry_with(&image).await?;
        let proxy = Proxy::start(&registry.url()).await?;
        proxy.stall_blob_after(&image.layers[0].digest, 1000);
        let out = tempfile::tempdir()?;
        let src = format!("{}/selftest/app:v1", proxy.host_port());
        let started = Instant::now();
        let opts = CopyOptions::default().timeout(Duration::from_secs(3));
        let err = Skopeo::pull(&src, &out.path().join("oci"), &opts)
            .await
            .expect_err("a stalled pull cannot succeed");
        assert!(format!("{err:#}").contains("timed out"), "{err:#}");
        assert!(started.elapsed() < Duration::from_secs(10));
        Ok(())
    })
    .await
}
