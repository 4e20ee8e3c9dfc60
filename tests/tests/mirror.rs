//! End-to-end tests of `shoal-agent` as a pull-through mirror: real `docker-registry` upstream,
//! real `skopeo` client, the agent in process on a loopback port.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use shoal_agent::mirror::STALE_HEADER;
use shoal_proto::api::{DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_V2, ErrorBody, ErrorCode, OCI_INDEX};
use shoal_tests::http::{
    End, get_streamed, push_blob, push_manifest, raw_request, request_streamed,
};
use shoal_tests::{
    AgentOptions, CopyOptions, ImageSpec, ManifestFormat, Proxy, Registry, Skopeo, TestAgent,
    TestImage, http_get, require_tools, verify_layout,
};

const MIB: usize = 1 << 20;

/// (Range header, expected status, expected inclusive byte span).
type RangeCase = (&'static str, u16, Option<(usize, usize)>);
/// (request line, extra headers, expected status, expected OCI error code).
type HostileCase = (String, Vec<(&'static str, String)>, u16, &'static str);
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
        // Each layer missed once (first pull) and hit once (second); nothing is in flight.
        let layers = image.layers.len() as f64;
        let hits = agent
            .metric("shoal_agent_cache_hits_total{kind=\"blob\"}")
            .await?;
        let misses = agent
            .metric("shoal_agent_cache_misses_total{kind=\"blob\"}")
            .await?;
        ensure!(
            hits >= layers && misses >= layers,
            "blob hits {hits}, misses {misses} for {layers} layers pulled twice"
        );
        ensure!(agent.metric("shoal_agent_downloads_in_flight").await? == 0.0);

        // A cached blob's answer carries its digest, length and a binary content type.
        let layer = &image.layers[0];
        let url = format!("{}/v2/shoal/app/blobs/{}", agent.url(), layer.digest);
        let r = get_streamed(&url, &[], Duration::from_secs(10)).await?;
        let header = |name: &str| r.headers.get(name).and_then(|v| v.to_str().ok());
        ensure!(r.status == 200 && r.end == End::Complete);
        ensure!(header("docker-content-digest") == Some(layer.digest.as_str()));
        ensure!(header("content-length") == Some(layer.size.to_string().as_str()));
        ensure!(
            header("content-type") == Some("application/octet-stream"),
            "blob content-type {:?}",
            header("content-type")
        );
        // A layer (or config) in the store is not a manifest: asked for as one, the question
        // goes upstream, whose error comes back (Distribution 2.8 answers 500 UNKNOWN, passed
        // on as 502), not the layer's bytes.
        let url = format!("{}/v2/shoal/app/manifests/{}", agent.url(), layer.digest);
        let r = get_streamed(&url, &[], Duration::from_secs(10)).await?;
        ensure!(
            matches!(r.status.as_u16(), 404 | 502),
            "a layer asked for as a manifest: {}",
            r.status
        );
        let body: ErrorBody = serde_json::from_slice(&r.body)?;
        ensure!(!body.errors.is_empty());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_down_cached_digests_and_tags_in_grace_still_pull_uncached_fails_fast()
-> Result<()> {
    within(async {
        let image = three_layers(3)?;
        let mut registry = registry_with(&image).await?;
        // tag_cache_ttl 0: every tag pull revalidates, so the grace path is what serves it.
        let mut opts = AgentOptions::new(&registry.url());
        opts.tag_cache_ttl = Duration::ZERO;
        let agent = TestAgent::start_with(opts).await?;
        let mut no_grace = AgentOptions::new(&registry.url());
        no_grace.tag_cache_ttl = Duration::ZERO;
        no_grace.offline_grace = Duration::ZERO;
        let strict = TestAgent::start_with(no_grace).await?;
        pull(&agent, "shoal/app:v1").await?;
        pull(&strict, "shoal/app:v1").await?;

        registry.stop().await?;

        let by_digest = format!("shoal/app@{}", image.manifest_digest);
        let out = pull(&agent, &by_digest).await?;
        verify_layout(&out.path().join("oci"), &image)?;

        let out = pull(&agent, "shoal/app:v1").await?;
        verify_layout(&out.path().join("oci"), &image)?;
        let r = get_streamed(
            &format!("{}/v2/shoal/app/manifests/v1", agent.url()),
            &[],
            Duration::from_secs(10),
        )
        .await?;
        ensure!(r.status == 200, "stale tag: {}", r.status);
        ensure!(
            r.headers.get(STALE_HEADER).is_some(),
            "a stale manifest must say so"
        );
        ensure!(
            agent
                .metric("shoal_agent_stale_manifests_served_total")
                .await?
                >= 1.0
        );

        // Beyond the grace period the tag is refused with a clear error.
        let r = get_streamed(
            &format!("{}/v2/shoal/app/manifests/v1", strict.url()),
            &[],
            Duration::from_secs(10),
        )
        .await?;
        ensure!(r.status == 503, "tag beyond grace: {}", r.status);
        let body: ErrorBody = serde_json::from_slice(&r.body)?;
        ensure!(body.errors[0].code == ErrorCode::Unavailable);

        // An uncached blob fails fast with an OCI error naming the cause, not a hang.
        let missing = format!("sha256:{}", "ab".repeat(32));
        let started = Instant::now();
        let r = get_streamed(
            &format!("{}/v2/shoal/app/blobs/{missing}", agent.url()),
            &[],
            Duration::from_secs(20),
        )
        .await?;
        let took = started.elapsed();
        ensure!(r.status == 503, "uncached blob: {}", r.status);
        let body: ErrorBody = serde_json::from_slice(&r.body)?;
        ensure!(
            body.errors[0].message.contains("unreachable"),
            "{:?}",
            body.errors[0].message
        );
        ensure!(took < Duration::from_secs(10), "took {took:?} to fail");
        agent.stop().await?;
        strict.stop().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_upstream_blob_aborts_clients_and_is_never_stored() -> Result<()> {
    within(async {
        let image = three_layers(4)?;
        let registry = registry_with(&image).await?;
        let proxy = Proxy::start(&registry.url()).await?;
        let bad = image.layers[1].digest.clone();
        proxy.corrupt_blob(&bad);
        let agent = TestAgent::start(&proxy.url()).await?;

        let url = format!("{}/v2/shoal/app/blobs/{bad}", agent.url());
        // A range of the cold blob that ends before the blob does must not complete either:
        // its last byte waits for the digest check, which fails.
        let r = get_streamed(&url, &[("Range", "bytes=0-99")], Duration::from_secs(20)).await?;
        ensure!(r.status == 206, "range status {}", r.status);
        ensure!(
            r.end == End::Aborted && r.body.len() < 100,
            "a range of a blob that fails verification must be aborted, got {:?} after {} bytes",
            r.end,
            r.body.len()
        );
        let r = get_streamed(&url, &[], Duration::from_secs(20)).await?;
        ensure!(r.status == 200, "status {}", r.status);
        ensure!(
            r.end == End::Aborted,
            "a blob that fails verification must end in an aborted transfer, got {:?} after {} bytes",
            r.end,
            r.body.len()
        );
        ensure!((r.body.len() as u64) < image.layers[1].size);

        // skopeo sees an error too.
        let out = tempfile::tempdir()?;
        let src = format!("{}/shoal/app:v1", agent.host_port());
        ensure!(
            Skopeo::pull(&src, &out.path().join("oci"), &CopyOptions::default())
                .await
                .is_err(),
            "skopeo must fail while upstream is corrupt"
        );

        let hex = bad.trim_start_matches("sha256:");
        let committed = agent.store_root().join("blobs/sha256").join(hex);
        ensure!(!committed.exists(), "corrupt blob was committed");
        let leftovers: Vec<_> = std::fs::read_dir(agent.store_root().join("ingest"))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(hex))
            .collect();
        ensure!(leftovers.is_empty(), "partial corrupt data left: {leftovers:?}");
        ensure!(
            agent.metric("shoal_agent_verification_failures_total").await? >= 1.0,
            "verification failure not counted"
        );

        // Once upstream is healthy, the same agent pulls fine.
        proxy.clear_faults();
        let out = pull(&agent, "shoal/app:v1").await?;
        verify_layout(&out.path().join("oci"), &image)?;
        ensure!(committed.exists());
        agent.stop().await
    })
    .await
}

/// Clients of a cold blob receive its bytes while upstream is still sending them, not after
/// the whole blob arrived: with the upstream body stopped after 1 MiB, each of three
/// concurrent clients (of one upstream GET) already holds most of that MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_of_a_cold_blob_receive_bytes_as_upstream_sends_them() -> Result<()> {
    within(async {
        require_tools()?;
        let registry = Registry::start().await?;
        let data: Vec<u8> = (0..6 * MIB).map(|i| (i * 13 % 251) as u8).collect();
        let digest = push_blob(&registry.url(), "shoal/stream", &data).await?;
        let proxy = Proxy::start(&registry.url()).await?;
        proxy.stall_blob_after(&digest, MIB as u64);
        let agent = TestAgent::start(&proxy.url()).await?;
        let url = format!("{}/v2/shoal/stream/blobs/{digest}", agent.url());

        let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut clients = Vec::new();
        for i in 0..3 {
            let (url, got_tx) = (url.clone(), got_tx.clone());
            clients.push(tokio::spawn(async move {
                use http_body_util::BodyExt as _;
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
                let resp = client.get(url.parse()?).await?;
                ensure!(resp.status() == 200, "status {}", resp.status());
                let mut body = Vec::new();
                let mut told = false;
                let mut stream = resp.into_body();
                while let Some(frame) = stream.frame().await {
                    if let Ok(data) = frame?.into_data() {
                        body.extend_from_slice(&data);
                    }
                    if !told && body.len() >= MIB / 2 {
                        told = true;
                        let _ = got_tx.send((i, body.len()));
                    }
                }
                anyhow::Ok(body)
            }));
        }
        drop(got_tx);
        let mut early = Vec::new();
        while early.len() < 3 {
            let (i, len) = tokio::time::timeout(Duration::from_secs(30), got_rx.recv())
                .await
                .context("a client received nothing while upstream was stalled")?
                .context("a client ended before receiving half a MiB")?;
            early.push((i, len));
        }
        ensure!(
            proxy.blob_get_count(&digest) == 1,
            "{} upstream GETs for one blob",
            proxy.blob_get_count(&digest)
        );
        ensure!(
            !agent
                .store_root()
                .join("blobs/sha256")
                .join(&digest[7..])
                .exists(),
            "the blob was committed before upstream sent it all"
        );
        proxy.release_stalls();
        proxy.clear_faults();
        for c in clients {
            let body = c.await??;
            ensure!(
                body == data,
                "a client got {} bytes, not the blob",
                body.len()
            );
        }
        println!("bytes each client held while upstream was stalled at 1 MiB: {early:?}");
        agent.stop().await
    })
    .await
}

/// The OCI conformance suite's range cases, on a cold blob (served while downloading) and on a
/// cached one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_requests_follow_the_oci_conformance_cases() -> Result<()> {
    within(async {
        require_tools()?;
        let registry = Registry::start().await?;
        let data: Vec<u8> = (0..2048u32).map(|i| (i * 7 % 251) as u8).collect();
        let digest = push_blob(&registry.url(), "shoal/raw", &data).await?;
        let agent = TestAgent::start(&registry.url()).await?;
        let url = format!("{}/v2/shoal/raw/blobs/{digest}", agent.url());
        // A HEAD of an uncached blob answers from upstream without downloading it.
        let r = request_streamed(http::Method::HEAD, &url, &[], Duration::from_secs(10)).await?;
        ensure!(r.status == 200, "HEAD: {}", r.status);
        ensure!(
            r.headers.get("content-length").is_some_and(|v| v == "2048"),
            "HEAD content-length {:?}",
            r.headers.get("content-length")
        );
        ensure!(
            registry.blob_get_count(&digest) == 0,
            "HEAD must not download"
        );
        let cases: [RangeCase; 6] = [
            ("bytes=500-1499", 206, Some((500, 1499))),
            ("bytes=500-", 206, Some((500, 2047))),
            ("bytes=-500", 206, Some((1548, 2047))),
            ("bytes=2000-5000", 206, Some((2000, 2047))),
            ("bytes=500-0", 416, None),
            ("bytes=5000-10000", 416, None),
        ];
        for round in ["cold", "cached"] {
            for (range, status, want) in cases {
                let r = get_streamed(&url, &[("Range", range)], Duration::from_secs(10)).await?;
                ensure!(
                    r.status.as_u16() == status,
                    "{round} {range}: status {} want {status}",
                    r.status
                );
                match want {
                    Some((a, b)) => {
                        ensure!(r.end == End::Complete, "{round} {range}: {:?}", r.end);
                        ensure!(r.body == data[a..=b], "{round} {range}: wrong bytes");
                        let cr = format!("bytes {a}-{b}/2048");
                        ensure!(
                            r.headers
                                .get("content-range")
                                .is_some_and(|v| v == cr.as_str()),
                            "{round} {range}: content-range {:?}",
                            r.headers.get("content-range")
                        );
                    }
                    None => {
                        ensure!(
                            r.headers
                                .get("content-range")
                                .is_some_and(|v| v == "bytes */2048"),
                            "{round} {range}: 416 needs Content-Range: bytes */2048"
                        );
                        let body: ErrorBody = serde_json::from_slice(&r.body)?;
                        ensure!(body.errors[0].code == ErrorCode::RangeInvalid);
                    }
                }
            }
        }
        ensure!(registry.blob_get_count(&digest) == 1);
        agent.stop().await
    })
    .await
}

/// Hostile paths, digests, ranges, query strings and headers get 4xx answers with OCI error
/// JSON (or hyper's bare 400/431 for requests that are not valid HTTP), and nothing reaches
/// upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_clear_errors_and_never_reach_upstream() -> Result<()> {
    within(async {
        require_tools()?;
        let registry = Registry::start().await?;
        let proxy = Proxy::start(&registry.url()).await?;
        let agent = TestAgent::start(&proxy.url()).await?;
        let addr: std::net::SocketAddr = agent.host_port().parse()?;
        let hex = "ab".repeat(32);
        let json_cases: Vec<HostileCase> = vec![
            ("GET /v2/../../etc/passwd".into(), vec![], 404, "NOT_FOUND"),
            (
                "GET /v2/%2e%2e/%2e%2e/etc/manifests/passwd".into(),
                vec![],
                400,
                "NAME_INVALID",
            ),
            (
                "GET /v2/a/b/../../../x/manifests/v1".into(),
                vec![],
                400,
                "NAME_INVALID",
            ),
            (
                "GET /v2/a%00b/manifests/v1".into(),
                vec![],
                400,
                "NAME_INVALID",
            ),
            (
                "GET /v2/a%5Cb/manifests/v1".into(),
                vec![],
                400,
                "NAME_INVALID",
            ),
            (
                "GET /v2/a/manifests/v1%00".into(),
                vec![],
                400,
                "MANIFEST_INVALID",
            ),
            (
                "GET /v2/a/manifests/..%2f..%2fetc".into(),
                vec![],
                400,
                "MANIFEST_INVALID",
            ),
            (
                "GET /v2/a/blobs/sha256:../../../../etc/passwd".into(),
                vec![],
                400,
                "DIGEST_INVALID",
            ),
            (
                format!("GET /v2/a/blobs/sha256:{}", hex.to_uppercase()),
                vec![],
                400,
                "DIGEST_INVALID",
            ),
            (
                format!("GET /v2/a/blobs/sha256:{}", &hex[..63]),
                vec![],
                400,
                "DIGEST_INVALID",
            ),
            (
                format!("GET /v2/a/blobs/sha256:{hex}0"),
                vec![],
                400,
                "DIGEST_INVALID",
            ),
            (
                "GET /v2/a/blobs/md5:d41d8cd98f00b204e9800998ecf8427e".into(),
                vec![],
                400,
                "DIGEST_INVALID",
            ),
            (
                format!("GET /v2/{}/manifests/v1", "a".repeat(300)),
                vec![],
                400,
                "NAME_INVALID",
            ),
            (
                format!("GET /v2/a/manifests/{}", "t".repeat(129)),
                vec![],
                400,
                "MANIFEST_INVALID",
            ),
            (
                "GET /v2/a/manifests/v1?ns=evil.example@attacker".into(),
                vec![],
                400,
                "BAD_REQUEST",
            ),
            (
                "GET /v2/a/manifests/v1?ns=../../x".into(),
                vec![],
                400,
                "BAD_REQUEST",
            ),
            (
                "GET /v2/a/manifests/v1?ns=unknown.example".into(),
                vec![],
                404,
                "NAME_UNKNOWN",
            ),
            (
                "GET /v2/a/manifests/v1?ns=registry.test&ns=x.io".into(),
                vec![],
                400,
                "BAD_REQUEST",
            ),
            (
                format!("GET /v2/a/blobs/sha256:{hex}"),
                vec![("Range", "bytes=abc".into())],
                416,
                "RANGE_INVALID",
            ),
            (
                format!("GET /v2/a/blobs/sha256:{hex}"),
                vec![("Range", "items=0-1".into())],
                416,
                "RANGE_INVALID",
            ),
            (
                "GET /v2/a/manifests/v1".into(),
                vec![("Accept", "text/html\"<script>".into())],
                400,
                "BAD_REQUEST",
            ),
            ("PUT /v2/a/manifests/v1".into(), vec![], 405, "UNSUPPORTED"),
            (
                "POST /v2/a/blobs/uploads/".into(),
                vec![],
                405,
                "UNSUPPORTED",
            ),
            (
                "DELETE /v2/a/manifests/v1".into(),
                vec![],
                405,
                "UNSUPPORTED",
            ),
            (
                "PATCH /v2/a/blobs/uploads/123".into(),
                vec![],
                405,
                "UNSUPPORTED",
            ),
            ("GET /v2/_catalog".into(), vec![], 405, "UNSUPPORTED"),
        ];
        for (line, headers, status, code) in &json_cases {
            let mut req = format!("{line} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
            for (k, v) in headers {
                req.push_str(&format!("{k}: {v}\r\n"));
            }
            if line.starts_with("PUT") || line.starts_with("POST") || line.starts_with("PATCH") {
                req.push_str("Content-Length: 0\r\n");
            }
            req.push_str("\r\n");
            let r = raw_request(addr, req.as_bytes(), Duration::from_secs(10)).await?;
            ensure!(
                r.status == *status,
                "{line}: status {} want {status}\n{}",
                r.status,
                r.head
            );
            let body: ErrorBody = serde_json::from_slice(&r.body).with_context(|| {
                format!(
                    "{line}: body is not OCI error JSON: {:?}",
                    String::from_utf8_lossy(&r.body)
                )
            })?;
            let got = serde_json::to_value(body.errors[0].code)?;
            ensure!(got == *code, "{line}: code {got} want {code}");
            ensure!(
                r.header("docker-distribution-api-version") == Some("registry/2.0"),
                "{line}: no API version header"
            );
        }

        // Requests that are not valid HTTP are refused by the parser, and headers over the
        // limit get 431.
        let bare_cases: Vec<(Vec<u8>, u16)> = vec![
            (
                b"GET /v2/a\0b/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
                400,
            ),
            (
                b"GET /v2/a\\b/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
                400,
            ),
            (
                b"GET /v2/ HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n".to_vec(),
                400,
            ),
            (
                format!(
                    "GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                    "a".repeat(1024 * 1024)
                )
                .into_bytes(),
                431,
            ),
            (
                format!(
                    "GET /v2/ HTTP/1.1\r\nHost: x\r\n{}\r\n",
                    (0..200)
                        .map(|i| format!("X-H{i}: v\r\n"))
                        .collect::<String>()
                )
                .into_bytes(),
                431,
            ),
        ];
        for (req, status) in &bare_cases {
            let r = raw_request(addr, req, Duration::from_secs(10)).await?;
            ensure!(
                r.status == *status,
                "{:?}: status {} want {status}",
                String::from_utf8_lossy(&req[..req.len().min(60)]),
                r.status
            );
        }

        let forwarded = proxy.requests();
        ensure!(
            forwarded.is_empty(),
            "hostile requests reached upstream: {:?}",
            forwarded.iter().map(|r| &r.path).collect::<Vec<_>>()
        );
        // The agent is still healthy.
        let r = http_get(&format!("{}/v2/", agent.url()), Duration::from_secs(5)).await?;
        ensure!(r.status == 200);
        agent.stop().await
    })
    .await
}

/// containerd's `?ns=` picks the upstream; without it the default is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ns_parameter_selects_the_upstream() -> Result<()> {
    within(async {
        require_tools()?;
        let a = Registry::start().await?;
        let b = Registry::start().await?;
        let blob_a = push_blob(&a.url(), "shoal/x", b"only in registry a").await?;
        let blob_b = push_blob(&b.url(), "shoal/x", b"only in registry b").await?;
        let mut opts = AgentOptions::new(&a.url());
        opts.upstreams.push(("b.example:5000".to_owned(), b.url()));
        let agent = TestAgent::start_with(opts).await?;
        let get = |digest: &str, ns: Option<&str>| {
            let q = ns.map(|n| format!("?ns={n}")).unwrap_or_default();
            let url = format!("{}/v2/shoal/x/blobs/{digest}{q}", agent.url());
            async move { get_streamed(&url, &[], Duration::from_secs(10)).await }
        };
        ensure!(get(&blob_a, None).await?.body == b"only in registry a");
        ensure!(get(&blob_a, Some("registry.test")).await?.body == b"only in registry a");
        ensure!(get(&blob_b, Some("b.example%3A5000")).await?.body == b"only in registry b");
        ensure!(get(&blob_b, Some("b.example:5000")).await?.body == b"only in registry b");
        ensure!(b.blob_get_count(&blob_b) == 1, "second get of b is local");
        let missing = format!("sha256:{}", "cd".repeat(32));
        let r = get(&missing, Some("b.example:5000")).await?;
        ensure!(r.status == 404, "missing blob upstream: {}", r.status);
        let body: ErrorBody = serde_json::from_slice(&r.body)?;
        ensure!(body.errors[0].code == ErrorCode::BlobUnknown);
        agent.stop().await
    })
    .await
}

/// A tag is revalidated with a HEAD (no GET while its digest is unchanged) and a moved tag is
/// seen on the next pull.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tags_are_revalidated_with_head_and_moves_are_seen() -> Result<()> {
    within(async {
        let v1 = TestImage::generate(&ImageSpec::new(vec![MIB], 21), "latest")?;
        let v2 = TestImage::generate(&ImageSpec::new(vec![MIB + 17], 22), "latest")?;
        require_tools()?;
        let registry = Registry::start().await?;
        let dest = format!("{}/shoal/app:latest", registry.host_port());
        Skopeo::push_image(&v1, &dest, &CopyOptions::default()).await?;
        let proxy = Proxy::start(&registry.url()).await?;
        let mut opts = AgentOptions::new(&proxy.url());
        opts.tag_cache_ttl = Duration::ZERO;
        let agent = TestAgent::start_with(opts).await?;
        let is_tag = |p: &str| p.ends_with("/manifests/latest");

        verify_layout(
            &pull(&agent, "shoal/app:latest").await?.path().join("oci"),
            &v1,
        )?;
        proxy.reset();
        verify_layout(
            &pull(&agent, "shoal/app:latest").await?.path().join("oci"),
            &v1,
        )?;
        ensure!(
            proxy.count(&http::Method::GET, is_tag) == 0,
            "unchanged tag was downloaded again"
        );
        ensure!(
            proxy.count(&http::Method::HEAD, is_tag) >= 1,
            "tag was not revalidated"
        );

        Skopeo::push_image(&v2, &dest, &CopyOptions::default()).await?;
        proxy.reset();
        verify_layout(
            &pull(&agent, "shoal/app:latest").await?.path().join("oci"),
            &v2,
        )?;
        ensure!(
            proxy.count(&http::Method::GET, is_tag) == 1,
            "moved tag must be fetched once"
        );
        agent.stop().await?;

        // Within the tag cache's lifetime a tag is answered without asking upstream at all.
        let mut opts = AgentOptions::new(&proxy.url());
        opts.tag_cache_ttl = Duration::from_secs(600);
        let agent = TestAgent::start_with(opts).await?;
        pull(&agent, "shoal/app:latest").await?;
        proxy.reset();
        verify_layout(
            &pull(&agent, "shoal/app:latest").await?.path().join("oci"),
            &v2,
        )?;
        let asked =
            proxy.count(&http::Method::HEAD, is_tag) + proxy.count(&http::Method::GET, is_tag);
        ensure!(
            asked == 0,
            "a cached tag was asked upstream {asked} times within its TTL"
        );
        agent.stop().await
    })
    .await
}

/// Manifest lists / OCI indexes pass through byte for byte, the client's Accept is honoured,
/// and Docker schema 2 images pull as well as OCI ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn indexes_pass_through_unchanged_and_docker_v2s2_images_pull() -> Result<()> {
    within(async {
        let image = TestImage::generate(&ImageSpec::new(vec![MIB, 2 * MIB], 23), "v2s2")?;
        require_tools()?;
        let registry = Registry::start().await?;
        let dest = format!("{}/shoal/docker:v2s2", registry.host_port());
        let opts = CopyOptions::default().format(ManifestFormat::V2s2);
        let pushed = Skopeo::push_image(&image, &dest, &opts).await?;
        let manifest_digest = pushed.digest.context("skopeo reported no digest")?;

        // An index with unusual (but valid) formatting: any re-serialisation would change it.
        let index = format!(
            "{{\n  \"schemaVersion\": 2,\n  \"mediaType\": \"{}\",\n  \"manifests\": [ {{\"mediaType\": \"{}\", \"digest\": \"{}\", \"size\": {}, \"platform\": {{\"architecture\": \"amd64\", \"os\": \"linux\"}}}} ]   \n}}\n",
            OCI_INDEX,
            DOCKER_MANIFEST_V2,
            manifest_digest,
            pushed_manifest_size(&registry, &manifest_digest).await?,
        );
        let index_digest =
            push_manifest(&registry.url(), "shoal/docker", "multi", OCI_INDEX, index.as_bytes())
                .await?;
        let agent = TestAgent::start(&registry.url()).await?;
        for round in ["cold", "cached"] {
            let r = get_streamed(
                &format!("{}/v2/shoal/docker/manifests/multi", agent.url()),
                &[("Accept", &format!("{OCI_INDEX}, {DOCKER_MANIFEST_LIST}"))],
                Duration::from_secs(10),
            )
            .await?;
            ensure!(r.status == 200, "{round}: {}", r.status);
            ensure!(r.body == index.as_bytes(), "{round}: index bytes changed");
            ensure!(
                r.headers.get("content-type").is_some_and(|v| v == OCI_INDEX),
                "{round}: content-type {:?}",
                r.headers.get("content-type")
            );
            ensure!(
                r.headers
                    .get("docker-content-digest")
                    .is_some_and(|v| v == index_digest.as_str()),
                "{round}: digest header"
            );
        }

        let out = pull(&agent, "shoal/docker:v2s2").await?;
        for layer in &image.layers {
            let hex = layer.digest.trim_start_matches("sha256:");
            ensure!(
                out.path().join("oci/blobs/sha256").join(hex).exists(),
                "layer {} missing from the v2s2 pull",
                layer.digest
            );
        }
        agent.stop().await
    })
    .await
}

async fn pushed_manifest_size(registry: &Registry, digest: &str) -> Result<usize> {
    let r = get_streamed(
        &format!("{}/v2/shoal/docker/manifests/{digest}", registry.url()),
        &[("Accept", DOCKER_MANIFEST_V2)],
        Duration::from_secs(10),
    )
    .await?;
    ensure!(r.status == 200, "manifest {digest}: {}", r.status);
    Ok(r.body.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_lists_pass_through_with_their_paging_and_bad_parameters_are_refused() -> Result<()> {
    within(async {
        let image = TestImage::generate(&ImageSpec::new(vec![64 * 1024], 81), "v1")?;
        let registry = registry_with(&image).await?;
        for tag in ["v2", "v3"] {
            let dest = format!("{}/shoal/app:{tag}", registry.host_port());
            Skopeo::push_image(&image, &dest, &CopyOptions::default()).await?;
        }
        let agent = TestAgent::start(&registry.url()).await?;

        // The real client: skopeo list-tags through the mirror.
        let out = tokio::process::Command::new("skopeo")
            .args(["list-tags", "--tls-verify=false"])
            .arg(format!("docker://{}/shoal/app", agent.host_port()))
            .kill_on_drop(true)
            .output()
            .await
            .context("running skopeo list-tags")?;
        ensure!(
            out.status.success(),
            "skopeo list-tags failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        ensure!(
            listed["Tags"] == serde_json::json!(["v1", "v2", "v3"]),
            "skopeo listed {listed}"
        );

        // Paging parameters reach the registry as given (Distribution 2.8 answers every tag
        // regardless; the agent's handling of a `Link` to the next page is unit-tested), with
        // the registry's name as `ns` (the agent's upstream URL is another host, a mirror).
        let base = format!("http://{}/v2/shoal/app/tags/list", agent.host_port());
        let page = http_get(&format!("{base}?n=2&last=v1"), Duration::from_secs(10)).await?;
        ensure!(page.status == 200, "tags list: {}", page.status);
        let tags: serde_json::Value = serde_json::from_slice(&page.body)?;
        ensure!(tags["name"] == "shoal/app", "{tags}");
        ensure!(
            registry
                .access_log()
                .iter()
                .any(|e| e.uri == "/v2/shoal/app/tags/list?n=2&last=v1&ns=registry.test"),
            "the registry never saw the paging parameters"
        );
        let before = registry.access_log().len();

        // Hostile parameters never reach the registry; unknown repositories are 404.
        for (query, status) in [
            ("n=abc", 400),
            ("n=-1", 400),
            ("last=%2e%2e", 400),
            ("last=a/b", 400),
        ] {
            let r = http_get(&format!("{base}?{query}"), Duration::from_secs(10)).await?;
            ensure!(r.status == status, "?{query}: {} {:?}", r.status, r.body);
            let e: ErrorBody = serde_json::from_slice(&r.body)?;
            ensure!(e.errors[0].code == ErrorCode::BadRequest, "?{query}: {e:?}");
        }
        let r = http_get(
            &format!("http://{}/v2/no/such/tags/list", agent.host_port()),
            Duration::from_secs(10),
        )
        .await?;
        ensure!(r.status == 404, "unknown repository: {}", r.status);
        let tag_requests = registry.access_log()[before..]
            .iter()
            .filter(|e| e.path.ends_with("/tags/list"))
            .count();
        ensure!(
            tag_requests == 1,
            "{tag_requests} tag list requests after the checks (want only the unknown repository's)"
        );
        Ok(())
    })
    .await
}
