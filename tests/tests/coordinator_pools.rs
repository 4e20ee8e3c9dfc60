//! Upstream pools end to end, against real `docker-registry` processes: pools chosen by
//! `?ns=<host>` (each its own registry, one default, unknown names refused), a chunked push
//! through a pool that is not the default (every `Location` keeps the `ns`), the idle timeout
//! on downloads that are slow or stalled (through the fault-injecting proxy), and replicas over
//! HTTPS (a pool `ca_file`), one of them a listener that never completes a TLS handshake.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use shoal_tests::coordinator::{
    CoordinatorOptions, PoolOption, ReplicaOption, TestCoordinator, require_coordinator_tools,
};
use shoal_tests::http::{End, Streamed, get_streamed, push_blob, push_blob_chunked, put_manifest};
use shoal_tests::image::sha256_digest;
use shoal_tests::registry::RegistryTls;
use shoal_tests::tls::{SilentListener, TestCerts};
use shoal_tests::{CopyOptions, ImageSpec, Proxy, Registry, Skopeo, TestImage, verify_layout};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Idle wait of the test's own client: longer than any idle timeout configured here, so a
/// transfer that ends is ended by the coordinator.
const CLIENT_IDLE: Duration = Duration::from_secs(20);

async fn within(test: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .context("test timed out")?
}

/// `len` bytes that differ with `seed` (xorshift; contents only need to be distinct).
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// An OCI manifest of one config and one layer (both must be in the repository already).
fn manifest(config: &[u8], layer: &[u8]) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{}}}]}}"#,
        sha256_digest(config),
        config.len(),
        sha256_digest(layer),
        layer.len()
    )
}

/// Pushes a one-layer image as `repo:tag` straight to a registry; returns the manifest.
async fn push_image(registry: &str, repo: &str, tag: &str, seed: u64) -> Result<String> {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#);
    let layer = bytes(4096, seed);
    push_blob(registry, repo, config.as_bytes()).await?;
    push_blob(registry, repo, &layer).await?;
    let m = manifest(config.as_bytes(), &layer);
    put_manifest(
        &format!("{registry}/v2/{repo}/manifests/{tag}"),
        OCI_MANIFEST,
        m.as_bytes(),
    )
    .await?;
    Ok(m)
}

async fn get(url: &str) -> Result<Streamed> {
    get_streamed(url, &[("accept", OCI_MANIFEST)], CLIENT_IDLE).await
}

/// The `code` and `message` of the first entry of an OCI error body.
fn oci_error(body: &[u8]) -> Result<(String, String)> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .with_context(|| format!("not JSON: {}", String::from_utf8_lossy(body)))?;
    let e = &v["errors"][0];
    Ok((
        e["code"].as_str().context("no errors[0].code")?.to_owned(),
        e["message"].as_str().unwrap_or_default().to_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ns_picks_the_pool_and_an_upload_stays_in_its_pool() -> Result<()> {
    within(async {
        require_coordinator_tools()?;
        let a = Registry::start().await?;
        let b = Registry::start().await?;
        let mut opts = CoordinatorOptions::new(&[a.url()]);
        opts.host = "a.test".into();
        opts.pools = vec![PoolOption::new("b.test", &[b.url()])];
        opts.default_registry = Some("a.test".into());
        opts.insecure_http = true;
        let c = TestCoordinator::start(opts).await?;
        let base = format!("http://{}", c.http_addr().context("no plain listener")?);

        let in_a = push_image(&a.url(), "team/app", "v1", 1).await?;
        let in_b = push_image(&b.url(), "team/app", "v1", 2).await?;
        ensure!(in_a != in_b);
        for (query, want) in [("?ns=a.test", &in_a), ("?ns=b.test", &in_b), ("", &in_a)] {
            let r = get(&format!("{base}/v2/team/app/manifests/v1{query}")).await?;
            ensure!(
                r.status == 200 && r.end == End::Complete,
                "{query:?}: {} {:?}",
                r.status,
                r.end
            );
            ensure!(
                r.body == want.as_bytes(),
                "{query:?} reached the wrong registry: {}",
                String::from_utf8_lossy(&r.body)
            );
        }

        // A registry the coordinator does not serve: 404 NAME_UNKNOWN naming it; a malformed
        // name: 400. Neither reaches a registry.
        let r = get(&format!(
            "{base}/v2/team/refused/manifests/v1?ns=elsewhere.test"
        ))
        .await?;
        ensure!(r.status == 404, "unknown ns: {}", r.status);
        let (code, message) = oci_error(&r.body)?;
        ensure!(code == "NAME_UNKNOWN", "{code}: {message}");
        ensure!(message.contains("elsewhere.test"), "{message}");
        let r = get(&format!("{base}/v2/team/refused/manifests/v1?ns=bad%2F..")).await?;
        ensure!(r.status == 400, "malformed ns: {}", r.status);
        oci_error(&r.body)?;
        for registry in [&a, &b] {
            ensure!(
                !registry
                    .access_log()
                    .iter()
                    .any(|e| e.path.contains("team/refused")),
                "a refused ns reached {}",
                registry.url()
            );
        }

        // A chunked push through b: POST with ?ns=b.test, then PATCHes and the PUT where each
        // Location says, which must keep the ns (the default pool does not know the upload).
        let layer = bytes(300 * 1024, 3);
        let config = br#"{"architecture":"amd64","os":"linux","pushed":"through b"}"#;
        let up = push_blob_chunked(&base, "team/pushed", &layer, 100 * 1024, "ns=b.test").await?;
        for loc in &up.locations {
            ensure!(loc.contains("ns=b.test"), "Location without ns: {loc}");
            ensure!(
                loc.starts_with(&base),
                "Location not on the coordinator: {loc}"
            );
        }
        ensure!(up.locations.len() == 4, "{:?}", up.locations);
        push_blob_chunked(&base, "team/pushed", config, 1 << 20, "ns=b.test").await?;
        let m = manifest(config, &layer);
        put_manifest(
            &format!("{base}/v2/team/pushed/manifests/v1?ns=b.test"),
            OCI_MANIFEST,
            m.as_bytes(),
        )
        .await?;
        // In b, not in a.
        let r = get(&format!("{}/v2/team/pushed/blobs/{}", b.url(), up.digest)).await?;
        ensure!(r.status == 200 && r.body == layer, "b: {}", r.status);
        let r = get(&format!("{}/v2/team/pushed/blobs/{}", a.url(), up.digest)).await?;
        ensure!(r.status == 404, "a has the blob pushed to b: {}", r.status);
        let r = get(&format!("{base}/v2/team/pushed/manifests/v1?ns=b.test")).await?;
        ensure!(r.status == 200 && r.body == m.as_bytes(), "{}", r.status);
        let r = get(&format!("{base}/v2/team/pushed/manifests/v1")).await?;
        ensure!(
            r.status == 404,
            "the default pool has b's manifest: {}",
            r.status
        );
        // b's registry saw every PATCH: three of the layer, one of the config.
        let patches = b
            .access_log()
            .iter()
            .filter(|e| e.method == "PATCH" && e.path.starts_with("/v2/team/pushed/blobs/uploads/"))
            .count();
        ensure!(patches == 4, "{patches} PATCHes reached b");
        c.stop().await
    })
    .await
}

/// The main pool behind a proxy that can slow or stall a blob, with a 2 s idle timeout.
async fn idle_setup() -> Result<(Registry, Proxy, TestCoordinator)> {
    require_coordinator_tools()?;
    let registry = Registry::start().await?;
    let proxy = Proxy::start(&registry.url()).await?;
    let mut opts = CoordinatorOptions::new(&[proxy.url()]);
    opts.server_toml = "idle_timeout = \"2s\"\n".into();
    opts.insecure_http = true;
    // The health checks go through the proxy too; keep them out of the way.
    opts.health_interval = Duration::from_secs(600);
    let c = TestCoordinator::start(opts).await?;
    Ok((registry, proxy, c))
}

const IDLE: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_download_outlives_the_idle_timeout_and_a_stalled_one_is_cut() -> Result<()> {
    within(async {
        let (registry, proxy, c) = idle_setup().await?;
        let base = format!("http://{}", c.http_addr().context("no plain listener")?);
        let slow = bytes(640 * 1024, 10);
        let stalled = bytes(256 * 1024, 11);
        let slow_digest = push_blob(&registry.url(), "idle/app", &slow).await?;
        let stalled_digest = push_blob(&registry.url(), "idle/app", &stalled).await?;
        // 160 KiB/s: about 4 s for the slow blob, in 16 KiB pieces (one every 0.1 s).
        proxy.throttle_blob(&slow_digest, 160 * 1024);
        proxy.stall_blob_after(&stalled_digest, 64 * 1024);

        let timed = |url: String, range: Option<&'static str>| async move {
            let started = Instant::now();
            let headers: Vec<(&str, &str)> = range.map(|r| ("range", r)).into_iter().collect();
            let r = get_streamed(&url, &headers, CLIENT_IDLE).await;
            (r, started.elapsed())
        };
        let blob = |d: &str| format!("{base}/v2/idle/app/blobs/{d}");
        // The plain GET is shared through coalescing; the Range one goes upstream on its own.
        let ((slow_r, slow_t), (stall_r, stall_t), (range_r, range_t)) = tokio::join!(
            timed(blob(&slow_digest), None),
            timed(blob(&stalled_digest), None),
            timed(blob(&stalled_digest), Some("bytes=1000-")),
        );

        let slow_r = slow_r?;
        ensure!(slow_r.status == 200, "slow: {}", slow_r.status);
        ensure!(
            slow_r.end == End::Complete,
            "slow blob: {:?} after {} bytes, {slow_t:?}",
            slow_r.end,
            slow_r.body.len()
        );
        ensure!(
            sha256_digest(&slow_r.body) == slow_digest,
            "slow blob corrupted"
        );
        ensure!(
            slow_t > IDLE + Duration::from_secs(1),
            "the slow download took only {slow_t:?}: it proves nothing about the idle timeout"
        );

        for (what, r, t, status, len) in [
            ("stalled", stall_r, stall_t, 200, stalled.len()),
            ("stalled range", range_r, range_t, 206, stalled.len() - 1000),
        ] {
            let r = r?;
            ensure!(r.status == status, "{what}: {}", r.status);
            ensure!(
                r.end == End::Aborted,
                "{what}: {:?} after {} bytes, {t:?}",
                r.end,
                r.body.len()
            );
            ensure!(r.body.len() < len, "{what}: the whole body arrived");
            // Cut by the coordinator's timer, not earlier and not much later.
            ensure!(
                t >= IDLE && t < IDLE + Duration::from_secs(6),
                "{what}: aborted after {t:?}"
            );
        }
        proxy.release_stalls();
        c.stop().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_replicas_with_a_ca_file_and_one_that_never_finishes_tls() -> Result<()> {
    within(async {
        require_coordinator_tools()?;
        let certs = TestCerts::generate()?;
        let registry = Registry::builder()
            .tls(RegistryTls::from_certs(&certs))
            .start()
            .await?;
        ensure!(registry.url().starts_with("https://"));
        let silent = SilentListener::start().await?;
        let connect_timeout = Duration::from_secs(1);
        let mut opts = CoordinatorOptions::new(&[]);
        opts.replicas = vec![
            ReplicaOption::new(&silent.https_url()),
            ReplicaOption::new(&registry.url()),
        ];
        opts.ca_file = Some(certs.ca_file());
        opts.upstream_insecure_http = false;
        opts.connect_timeout = connect_timeout;
        // Requests, not the health checks, are what must find the silent replica: the first
        // check of it hangs for health_timeout and the next round is far away.
        opts.health_interval = Duration::from_secs(600);
        opts.health_timeout = Duration::from_secs(60);
        opts.max_fails = 1;
        opts.fail_timeout = Duration::from_secs(60);
        let c = TestCoordinator::start(opts).await?;
        let http = c.client()?;

        // Round robin sends one of these to the silent replica first: it is given up after
        // connect_timeout and the other replica answers.
        for i in 0..2 {
            let started = Instant::now();
            let r = tokio::time::timeout(connect_timeout * 5, http.get(c.url("/v2/")).send())
                .await
                .with_context(|| format!("GET /v2/ #{i} held by the silent replica"))??;
            ensure!(r.status() == 200, "GET /v2/ #{i}: {}", r.status());
            tracing::info!(elapsed = ?started.elapsed(), "GET /v2/ #{i}");
        }
        ensure!(
            silent.accepted() >= 1,
            "no request went to the silent replica"
        );
        let silent_label = format!("replica=\"{}\"", silent.https_url());
        let failures = c
            .metric_sum(
                "shoal_coordinator_upstream_failures_total",
                &[&silent_label],
            )
            .await?;
        ensure!(failures >= 1.0, "the silent replica's failures: {failures}");
        let retries = c
            .metric_sum("shoal_coordinator_upstream_retries_total", &[])
            .await?;
        ensure!(retries >= 1.0, "retries: {retries}");

        // Push and pull through the coordinator; it verifies the replica with the pool's CA.
        let image = TestImage::generate(&ImageSpec::new(vec![256 * 1024, 64 * 1024], 21), "v1")?;
        let dest = format!("{}/tls/app:v1", c.host_port());
        let copy = CopyOptions::default().tls(c.cert_dir());
        Skopeo::push(image.dir(), image.tag(), &dest, &copy).await?;
        let out = tempfile::tempdir()?;
        Skopeo::pull(&dest, &out.path().join("oci"), &copy).await?;
        verify_layout(&out.path().join("oci"), &image)?;
        // It is in the TLS registry itself.
        ensure!(
            registry
                .access_log()
                .iter()
                .any(|e| e.method == "PUT" && e.path == "/v2/tls/app/manifests/v1"),
            "the TLS registry never saw the manifest"
        );

        // Closing the silent listener ends the health check still waiting on it.
        drop(silent);
        c.stop().await
    })
    .await
}
