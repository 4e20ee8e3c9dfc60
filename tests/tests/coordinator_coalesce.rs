//! Coalescing through the coordinator: concurrent cold GETs of one blob (or manifest digest)
//! cost one upstream GET, every client gets every byte, including clients that join after
//! the body started streaming. A fault-injecting proxy between coordinator and registry
//! holds the upstream body at a known point, so "concurrent" is arranged, not hoped for.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use shoal_tests::coordinator::{CoordinatorOptions, TestCoordinator, require_coordinator_tools};
use shoal_tests::http::push_blob;
use shoal_tests::image::sha256_digest;
use shoal_tests::{CopyOptions, Fault, ImageSpec, Proxy, Registry, Skopeo, TestImage, wait_until};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const MIB: usize = 1 << 20;

async fn within(test: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .context("test timed out")?
}

/// Starts `n` GETs of `url`, each returning its whole body.
fn spawn_gets(
    client: &reqwest::Client,
    url: &str,
    n: usize,
    accept: Option<&'static str>,
) -> Vec<tokio::task::JoinHandle<Result<Vec<u8>>>> {
    (0..n)
        .map(|_| {
            let (client, url) = (client.clone(), url.to_owned());
            tokio::spawn(async move {
                let mut req = client.get(&url);
                if let Some(a) = accept {
                    req = req.header("accept", a);
                }
                let r = req.send().await?;
                ensure!(r.status() == 200, "{}", r.status());
                Ok(r.bytes().await?.to_vec())
            })
        })
        .collect()
}

/// Waits until the upstream response for `reference` has sent `bytes` and stopped there
/// (a release before the stall would be lost).
async fn stalled(proxy: &Proxy, reference: &str, bytes: u64) -> Result<()> {
    proxy
        .wait_for(
            Duration::from_secs(20),
            "the upstream body stalled",
            |reqs| {
                reqs.iter()
                    .any(|r| r.path.ends_with(reference) && r.body_bytes >= bytes)
            },
        )
        .await
}

async fn coalesced(c: &TestCoordinator) -> f64 {
    c.metric_sum("shoal_coordinator_coalesced_requests_total", &[])
        .await
        .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_coalesces_twenty_cold_gets_of_one_blob_into_one_upstream_get() -> Result<()> {
    within(async {
        require_coordinator_tools()?;
        let registry = Registry::start().await?;
        let blob: Vec<u8> = (0..8 * MIB).map(|i| (i * 7 % 251) as u8).collect();
        let digest = push_blob(&registry.url(), "cold/app", &blob).await?;
        let proxy = Proxy::start(&registry.url()).await?;
        let c = TestCoordinator::start(CoordinatorOptions::new(&[proxy.url()])).await?;
        let client = c.client()?;
        let url = c.url(&format!("/v2/cold/app/blobs/{digest}"));

        // The upstream body stops after 1 MiB until released.
        proxy.stall_blob_after(&digest, MIB as u64);
        let mut gets = spawn_gets(&client, &url, 10, None);
        wait_until(Duration::from_secs(20), "10 clients share one flight", || async {
            coalesced(&c).await >= 9.0
        })
        .await?;
        proxy
            .wait_for(Duration::from_secs(20), "1 MiB of the blob streamed", |reqs| {
                reqs.iter()
                    .any(|r| r.blob_digest() == Some(digest.as_str()) && r.body_bytes >= MIB as u64)
            })
            .await?;
        // Late joiners: the body is half-way through; they must still get byte 0 onwards.
        gets.extend(spawn_gets(&client, &url, 10, None));
        wait_until(Duration::from_secs(20), "the late clients joined", || async {
            coalesced(&c).await >= 19.0
        })
        .await?;
        proxy.release_stalls();
        for g in gets {
            let body = g.await??;
            ensure!(body.len() == blob.len(), "a client got {} bytes", body.len());
            ensure!(sha256_digest(&body) == digest, "a client got corrupt bytes");
        }
        let at_proxy = proxy.blob_get_count(&digest);
        let at_registry = registry.blob_get_count(&digest);
        println!(
            "20 concurrent GETs of an 8 MiB blob: {at_proxy} upstream GET (proxy), {at_registry} (registry log), {} coalesced",
            coalesced(&c).await
        );
        ensure!(at_proxy == 1, "{at_proxy} upstream GETs at the proxy");
        ensure!(at_registry == 1, "{at_registry} upstream GETs in the registry log");
        ensure!(coalesced(&c).await == 19.0);

        // Once the flight is over, the next GET goes upstream again: nothing is cached.
        proxy.clear_faults();
        let again = spawn_gets(&client, &url, 1, None).pop().context("one get")?.await??;
        ensure!(sha256_digest(&again) == digest);
        ensure!(proxy.blob_get_count(&digest) == 2);
        c.stop().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_coalesces_manifest_gets_by_digest_but_not_by_tag() -> Result<()> {
    within(async {
        require_coordinator_tools()?;
        let registry = Registry::start().await?;
        let image = TestImage::generate(&ImageSpec::new(vec![4096], 5), "v1")?;
        Skopeo::push_image(
            &image,
            &format!("{}/man/app:v1", registry.host_port()),
            &CopyOptions::default(),
        )
        .await?;
        let proxy = Proxy::start(&registry.url()).await?;
        let c = TestCoordinator::start(CoordinatorOptions::new(&[proxy.url()])).await?;
        let client = c.client()?;
        let oci = Some("application/vnd.oci.image.manifest.v1+json");

        // One byte of the manifest gets through, then the upstream body stops until released.
        proxy.inject(&image.manifest_digest, Fault::StallAfter(1));
        let by_digest = c.url(&format!("/v2/man/app/manifests/{}", image.manifest_digest));
        let gets = spawn_gets(&client, &by_digest, 10, oci);
        wait_until(
            Duration::from_secs(20),
            "10 manifest GETs share one flight",
            || async { coalesced(&c).await >= 9.0 },
        )
        .await?;
        stalled(&proxy, &image.manifest_digest, 1).await?;
        proxy.release_stalls();
        for g in gets {
            ensure!(sha256_digest(&g.await??) == image.manifest_digest);
        }
        let upstream = proxy.count(&http::Method::GET, |p| p.ends_with(&image.manifest_digest));
        ensure!(
            upstream == 1,
            "{upstream} upstream GETs for the manifest digest"
        );
        proxy.clear_faults();

        // Tags are mutable: each GET by tag goes upstream.
        for g in spawn_gets(&client, &c.url("/v2/man/app/manifests/v1"), 5, oci) {
            ensure!(sha256_digest(&g.await??) == image.manifest_digest);
        }
        let by_tag = proxy.count(&http::Method::GET, |p| p.ends_with("/manifests/v1"));
        ensure!(by_tag == 5, "{by_tag} upstream GETs for 5 GETs by tag");
        c.stop().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_aborts_every_waiter_when_the_shared_upstream_body_breaks() -> Result<()> {
    within(async {
        require_coordinator_tools()?;
        let registry = Registry::start().await?;
        let blob = vec![42u8; 3 * MIB];
        let digest = push_blob(&registry.url(), "broken/app", &blob).await?;
        let proxy = Proxy::start(&registry.url()).await?;
        let c = TestCoordinator::start(CoordinatorOptions::new(&[proxy.url()])).await?;
        let url = c.url(&format!("/v2/broken/app/blobs/{digest}"));

        proxy.inject_times(&digest, Fault::StallAfter(MIB as u64), 1);
        proxy.inject_times(&digest, Fault::TruncateAfter(MIB as u64 + 65536), 1);
        let client = c.client()?;
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move {
                    let r = client.get(&url).send().await?;
                    ensure!(r.status() == 200, "{}", r.status());
                    // Err: the transfer was aborted, which is what must happen.
                    Ok(r.bytes().await.map(|b| b.len()))
                })
            })
            .collect();
        wait_until(
            Duration::from_secs(20),
            "5 clients share one flight",
            || async { coalesced(&c).await >= 4.0 },
        )
        .await?;
        stalled(&proxy, &digest, MIB as u64).await?;
        proxy.release_stalls();
        for w in waiters {
            match w.await?? {
                Err(_) => {}
                Ok(n) => anyhow::bail!("a client received a complete-looking body of {n} bytes"),
            }
        }
        // The next request starts a fresh flight and succeeds.
        let body = client.get(&url).send().await?.bytes().await?;
        ensure!(sha256_digest(&body) == digest);
        c.stop().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_coalesces_concurrent_heads_of_one_blob_apart_from_gets() -> Result<()> {
    within(async {
        require_coordinator_tools()?;
        let registry = Registry::start().await?;
        let blob: Vec<u8> = (0..MIB).map(|i| (i * 13 % 251) as u8).collect();
        let digest = push_blob(&registry.url(), "heads/app", &blob).await?;
        let proxy = Proxy::start(&registry.url()).await?;
        let c = TestCoordinator::start(CoordinatorOptions::new(&[proxy.url()])).await?;
        let client = c.client()?;
        let url = c.url(&format!("/v2/heads/app/blobs/{digest}"));

        // A slow upstream: every request for the blob waits before it is forwarded, the
        // window in which the HEADs arrive (each is answered when the shared one is).
        proxy.inject(&digest, Fault::Delay(Duration::from_secs(5)));
        let heads: Vec<_> = (0..10)
            .map(|_| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move {
                    let r = client.head(&url).send().await?;
                    ensure!(r.status() == 200, "{}", r.status());
                    let len = r
                        .headers()
                        .get("content-length")
                        .context("no Content-Length")?
                        .to_str()?
                        .parse::<usize>()?;
                    Ok::<_, anyhow::Error>(len)
                })
            })
            .collect();
        // A GET at the same time has a flight of its own: it needs the body.
        let get = spawn_gets(&client, &url, 1, None)
            .pop()
            .context("one get")?;
        wait_until(
            Duration::from_secs(20),
            "10 HEADs share one flight",
            || async { coalesced(&c).await >= 9.0 },
        )
        .await?;
        for h in heads {
            let len = h.await??;
            ensure!(len == blob.len(), "a HEAD said {len} bytes");
        }
        let upstream_heads = proxy.count(&http::Method::HEAD, |p| p.ends_with(&digest));
        ensure!(
            upstream_heads == 1,
            "{upstream_heads} upstream HEADs for 10 clients"
        );
        let body = get.await??;
        ensure!(proxy.blob_get_count(&digest) == 1);
        ensure!(
            coalesced(&c).await == 9.0,
            "the GET joined the HEADs' flight"
        );
        ensure!(
            sha256_digest(&body) == digest,
            "the GET got {} bytes",
            body.len()
        );
        c.stop().await
    })
    .await
}

/// What a client saw of one answer: status, the headers that describe the manifest, body.
#[derive(PartialEq, Eq)]
struct Seen {
    status: u16,
    content_type: Option<String>,
    digest: Option<String>,
    body: Vec<u8>,
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seen")
            .field("status", &self.status)
            .field("content_type", &self.content_type)
            .field("digest", &self.digest)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

async fn seen(client: &reqwest::Client, url: &str, accept: Option<&str>) -> Result<Seen> {
    let mut req = client.get(url);
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let r = req.send().await?;
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (content_type, digest) = (header("content-type"), header("docker-content-digest"));
    Ok(Seen {
        status: r.status().as_u16(),
        content_type,
        digest,
        body: r.bytes().await?.to_vec(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_coalesces_manifest_gets_only_with_the_same_accept() -> Result<()> {
    within(async {
        require_coordinator_tools()?;
        let registry = Registry::start().await?;
        let image = TestImage::generate(&ImageSpec::new(vec![4096], 7), "v1")?;
        Skopeo::push_image(
            &image,
            &format!("{}/accept/app:v1", registry.host_port()),
            &CopyOptions::default(),
        )
        .await?;
        let layer = image.layer_digests().first().cloned().context("a layer")?;
        let proxy = Proxy::start(&registry.url()).await?;
        let c = TestCoordinator::start(CoordinatorOptions::new(&[proxy.url()])).await?;
        let client = c.client()?;
        let oci = "application/vnd.oci.image.manifest.v1+json";
        let docker = "application/vnd.docker.distribution.manifest.v2+json";
        let path = format!("/v2/accept/app/manifests/{}", image.manifest_digest);

        // What the registry itself answers for each Accept: the OCI manifest is only served
        // to a client that accepts OCI manifests.
        // (The coordinator's client speaks plain HTTP to the registry just as well.)
        let direct = &client;
        let want_oci = seen(direct, &format!("{}{path}", registry.url()), Some(oci)).await?;
        let want_docker = seen(direct, &format!("{}{path}", registry.url()), Some(docker)).await?;
        ensure!(want_oci.status == 200, "direct, OCI accepted: {want_oci:?}");
        ensure!(
            want_oci != want_docker,
            "the registry answers both Accepts alike, so this test shows nothing: {want_docker:?}"
        );

        // One byte of each answer gets through, then the upstream bodies stop until released:
        // every request below arrives while its flight is still open.
        proxy.inject(&image.manifest_digest, Fault::StallAfter(1));
        proxy.inject(&layer, Fault::StallAfter(1));
        let url = c.url(&path);
        let mut gets = Vec::new();
        for i in 0..10 {
            let (client, url) = (client.clone(), url.clone());
            let accept = if i % 2 == 0 { oci } else { docker };
            gets.push((
                accept,
                tokio::spawn(async move { seen(&client, &url, Some(accept)).await }),
            ));
        }
        // Blobs do not depend on Accept: GETs with different ones still share one flight.
        let blob_url = c.url(&format!("/v2/accept/app/blobs/{layer}"));
        let blob_gets: Vec<_> = [
            None,
            Some("application/octet-stream"),
            Some(oci),
            Some("*/*"),
        ]
        .into_iter()
        .map(|accept| {
            let (client, url) = (client.clone(), blob_url.clone());
            tokio::spawn(async move { seen(&client, &url, accept).await })
        })
        .collect();
        // 5 + 5 manifest GETs in two flights (8 joined), 4 blob GETs in one (3 joined).
        wait_until(
            Duration::from_secs(20),
            "every GET joined a flight",
            || async { coalesced(&c).await >= 11.0 },
        )
        .await?;
        proxy
            .wait_for(
                Duration::from_secs(20),
                "the upstream bodies stalled",
                |reqs| {
                    let ours: Vec<_> = reqs
                        .iter()
                        .filter(|r| r.path.contains("/accept/app/"))
                        .collect();
                    ours.len() >= 2 && ours.iter().all(|r| r.body_bytes >= 1)
                },
            )
            .await?;
        proxy.release_stalls();
        for (accept, g) in gets {
            let got = g.await??;
            let want = if accept == oci {
                &want_oci
            } else {
                &want_docker
            };
            ensure!(
                got == *want,
                "Accept {accept}: the coordinator answered {got:?}, the registry {want:?}"
            );
        }
        for g in blob_gets {
            let got = g.await??;
            ensure!(
                got.status == 200 && sha256_digest(&got.body) == layer,
                "blob: {got:?}"
            );
        }
        let manifest_gets =
            proxy.count(&http::Method::GET, |p| p.ends_with(&image.manifest_digest));
        ensure!(
            manifest_gets == 2,
            "{manifest_gets} upstream GETs for 10 manifest GETs with 2 different Accepts"
        );
        ensure!(
            proxy.blob_get_count(&layer) == 1,
            "the blob GETs did not share a flight"
        );
        let n = coalesced(&c).await;
        ensure!(n == 11.0, "{n} requests coalesced, 11 expected");
        c.stop().await
    })
    .await
}
