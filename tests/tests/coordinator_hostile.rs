//! Malformed and smuggling requests sent to the coordinator over raw sockets (TLS and the
//! plain listener): each gets 400 or 431, the connection is closed, and the upstream never
//! sees it. A counting proxy sits between the coordinator and the registry to prove the last
//! part. Every request carries valid credentials, so nothing is refused merely for lack of
//! them.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine as _;
use shoal_tests::coordinator::{
    CoordinatorOptions, HashFormat, RawExchange, TestCoordinator, htpasswd_add,
    require_coordinator_tools,
};
use shoal_tests::{Proxy, Registry};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const RAW_TIMEOUT: Duration = Duration::from_secs(10);

async fn within(test: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .context("test timed out")?
}

/// (what, raw request, expected status)
type Case = (&'static str, Vec<u8>, u16);

fn cases(auth: &str) -> Vec<Case> {
    let post = format!(
        "POST /v2/hostile/app/blobs/uploads/ HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\n"
    );
    let patch = format!(
        "PATCH /v2/hostile/app/blobs/uploads/0f9c1e2a-1111-4222-8333-944455556666 HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\n"
    );
    let smuggled = "0\r\n\r\nGET /v2/smuggled/app/tags/list HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let many_headers: String = (0..150).map(|i| format!("X-Filler-{i}: x\r\n")).collect();
    vec![
        (
            "duplicate Content-Length, different values",
            format!("{post}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello").into_bytes(),
            400,
        ),
        (
            "duplicate Content-Length, same value",
            format!("{post}Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello").into_bytes(),
            400,
        ),
        (
            "Content-Length then Transfer-Encoding",
            format!("{patch}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
                .into_bytes(),
            400,
        ),
        (
            "Transfer-Encoding then Content-Length",
            format!("{patch}Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
                .into_bytes(),
            400,
        ),
        (
            "CL.TE smuggling a second request",
            format!(
                "{post}Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{smuggled}",
                smuggled.len()
            )
            .into_bytes(),
            400,
        ),
        (
            "Transfer-Encoding other than chunked",
            format!("{patch}Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").into_bytes(),
            400,
        ),
        (
            "invalid chunk size",
            format!("{patch}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n").into_bytes(),
            400,
        ),
        (
            "chunk size overflowing 64 bits",
            format!("{patch}Transfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nhello\r\n0\r\n\r\n")
                .into_bytes(),
            400,
        ),
        (
            "invalid Content-Length",
            format!("{post}Content-Length: 5x\r\n\r\nhello").into_bytes(),
            400,
        ),
        (
            "one header over the limit",
            format!("{post}X-Big: {}\r\nContent-Length: 0\r\n\r\n", "a".repeat(70 * 1024)).into_bytes(),
            431,
        ),
        (
            "too many headers",
            format!("{post}{many_headers}Content-Length: 0\r\n\r\n").into_bytes(),
            431,
        ),
    ]
}

fn check(what: &str, x: &RawExchange, want: u16) -> Result<()> {
    ensure!(
        x.status() == Some(want),
        "{what}: expected {want}, got {:?}:\n{}",
        x.status(),
        x.text()
    );
    ensure!(x.closed, "{what}: the connection stayed open");
    ensure!(
        x.responses() == 1,
        "{what}: {} responses:\n{}",
        x.responses(),
        x.text()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_refuses_malformed_and_smuggling_requests_before_upstream() -> Result<()> {
    within(async {
        require_coordinator_tools()?;
        let dir = tempfile::tempdir()?;
        let users = dir.path().join("htpasswd");
        htpasswd_add(&users, "alice", "alice-pw", HashFormat::Bcrypt)?;
        let registry = Registry::start().await?;
        let proxy = Proxy::start(&registry.url()).await?;
        let mut opts = CoordinatorOptions::new(&[proxy.url()]);
        opts.htpasswd = Some(users);
        opts.insecure_http = true;
        // Health checks would show up at the proxy too; keep them rare.
        opts.health_interval = Duration::from_secs(3600);
        let c = TestCoordinator::start(opts).await?;
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice:alice-pw")
        );

        // Controls: well-formed requests, pipelined on one connection, go through in order.
        let good = format!(
            "GET /v2/ HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\n\r\n\
             POST /v2/hostile/app/blobs/uploads/ HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\nContent-Length: 0\r\n\r\n\
             GET /v2/ HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"
        );
        let x = c.raw_tls(good.as_bytes(), RAW_TIMEOUT).await?;
        ensure!(x.responses() == 3, "pipelined control:\n{}", x.text());
        let statuses = x.statuses();
        ensure!(statuses == [200, 202, 200], "pipelined control: {statuses:?}\n{}", x.text());
        ensure!(
            proxy.count(&http::Method::POST, |p| p.contains("/hostile/")) == 1,
            "the control upload did not reach upstream"
        );

        // Control: a chunked upload over one HTTP/1.1 keep-alive connection.
        let h1 = c.client_http1()?;
        let blob: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let digest = shoal_tests::image::sha256_digest(&blob);
        let r = h1
            .post(c.url("/v2/hostile/app/blobs/uploads/"))
            .header("authorization", &auth)
            .header("content-length", "0")
            .send()
            .await?;
        ensure!(r.status() == 202, "start upload: {}", r.status());
        ensure!(r.version() == reqwest::Version::HTTP_11);
        let location = r.headers()["location"].to_str()?.to_owned();
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            blob.chunks(100_000).map(|c| Ok(c.to_vec())).collect();
        let r = h1
            .patch(&location)
            .header("authorization", &auth)
            .header("content-type", "application/octet-stream")
            .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
            .send()
            .await?;
        ensure!(r.status() == 202, "chunked PATCH: {}", r.status());
        let location = r.headers()["location"].to_str()?.to_owned();
        let sep = if location.contains('?') { '&' } else { '?' };
        let r = h1
            .put(format!("{location}{sep}digest={digest}"))
            .header("authorization", &auth)
            .header("content-length", "0")
            .send()
            .await?;
        ensure!(r.status() == 201, "finish upload: {}", r.status());
        let got = h1
            .get(c.url(&format!("/v2/hostile/app/blobs/{digest}")))
            .header("authorization", &auth)
            .send()
            .await?
            .bytes()
            .await?;
        ensure!(got.len() == blob.len() && shoal_tests::image::sha256_digest(&got) == digest);

        // Control: a monolithic upload (POST, then PUT with the whole body).
        let mono = vec![7u8; 200_000];
        let mono_digest = shoal_tests::image::sha256_digest(&mono);
        let r = h1
            .post(c.url("/v2/hostile/app/blobs/uploads/"))
            .header("authorization", &auth)
            .header("content-length", "0")
            .send()
            .await?;
        ensure!(r.status() == 202, "start upload: {}", r.status());
        let location = r.headers()["location"].to_str()?.to_owned();
        let sep = if location.contains('?') { '&' } else { '?' };
        let r = h1
            .put(format!("{location}{sep}digest={mono_digest}"))
            .header("authorization", &auth)
            .header("content-type", "application/octet-stream")
            .body(mono)
            .send()
            .await?;
        ensure!(r.status() == 201, "monolithic PUT: {}", r.status());
        proxy.reset();

        for (what, request, want) in cases(&auth) {
            let x = c.raw_tls(&request, RAW_TIMEOUT).await?;
            check(&format!("TLS: {what}"), &x, want)?;
            let x = c.raw_http(&request, RAW_TIMEOUT).await?;
            check(&format!("plain: {what}"), &x, want)?;
        }
        let reached: Vec<_> = proxy
            .requests()
            .into_iter()
            .filter(|r| r.path.contains("/hostile/") || r.path.contains("/smuggled/"))
            .collect();
        ensure!(reached.is_empty(), "hostile requests reached upstream: {reached:#?}");
        let refused = c
            .metric_sum("shoal_coordinator_framing_rejections_total", &[])
            .await?;
        println!("framing rejections counted by the coordinator's own checks: {refused}");
        ensure!(refused >= 12.0, "{refused} framing rejections counted");
        c.stop().await
    })
    .await
}

/// A chunked `PUT` that finishes an upload whose body turns malformed after its first chunk,
/// so the coordinator's check of the first frame passes and the request is already on its way
/// to the replica when the bad chunk size arrives. The `digest` is that of the first chunk:
/// had the coordinator ended the upstream body cleanly at the error, the registry would have
/// committed the truncated body as a valid blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_aborts_the_upstream_request_when_a_chunk_size_goes_bad_mid_body() -> Result<()>
{
    within(async {
        require_coordinator_tools()?;
        let registry = Registry::start().await?;
        let proxy = Proxy::start(&registry.url()).await?;
        let mut opts = CoordinatorOptions::new(&[proxy.url()]);
        // One failure charged to the replica would eject it.
        opts.max_fails = 1;
        opts.fail_timeout = Duration::from_secs(60);
        opts.health_interval = Duration::from_secs(3600);
        let c = TestCoordinator::start(opts).await?;
        let client = c.client_http1()?;

        let prefix: Vec<u8> = (0..50_000u32).map(|i| (i % 241) as u8).collect();
        let digest = shoal_tests::image::sha256_digest(&prefix);
        let r = client
            .post(c.url("/v2/hostile/mid/blobs/uploads/"))
            .header("content-length", "0")
            .send()
            .await?;
        ensure!(r.status() == 202, "start upload: {}", r.status());
        let location = r.headers()["location"].to_str()?.to_owned();
        let sep = if location.contains('?') { '&' } else { '?' };
        let target = format!("{location}{sep}digest={digest}");
        let path = target
            .strip_prefix(&c.url(""))
            .with_context(|| format!("Location {location} is not on the coordinator"))?;

        let head = format!(
            "PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            prefix.len()
        );
        let cfg = std::sync::Arc::new(c.tls_client_config(&[b"http/1.1"])?);
        let tcp = tokio::net::TcpStream::connect(c.https_addr()).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost")?;
        let mut tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await?;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(&prefix).await?;
        tls.write_all(b"\r\n").await?;
        tls.flush().await?;
        // The first chunk is good: the request goes upstream with its body streaming.
        proxy
            .wait_for(
                Duration::from_secs(20),
                "the PUT reached the replica",
                |reqs| {
                    reqs.iter()
                        .any(|r| r.method == http::Method::PUT && r.path.contains("/hostile/mid/"))
                },
            )
            .await?;
        // Then a chunk size that is not hex.
        tls.write_all(b"zz\r\nhello\r\n0\r\n\r\n").await?;
        tls.flush().await?;
        let mut bytes = Vec::new();
        // Ok: EOF, a reset, or a TLS close without close_notify; all are a close.
        let closed = tokio::time::timeout(RAW_TIMEOUT, tls.read_to_end(&mut bytes))
            .await
            .is_ok();
        let x = RawExchange { bytes, closed };
        println!(
            "mid-body bad chunk size: {}",
            x.text().lines().next().unwrap_or("(nothing)")
        );
        check("bad chunk size mid-body", &x, 400)?;

        // Nothing was committed: the registry itself does not have the blob.
        let r = client
            .head(format!("{}/v2/hostile/mid/blobs/{digest}", registry.url()))
            .send()
            .await?;
        ensure!(
            r.status() == 404,
            "the truncated body was committed: HEAD {}",
            r.status()
        );
        let put = proxy
            .requests()
            .into_iter()
            .find(|r| r.method == http::Method::PUT && r.path.contains("/hostile/mid/"))
            .context("the PUT record")?;
        ensure!(
            put.status.is_none_or(|s| !s.is_success()),
            "the replica answered the aborted PUT with {:?}",
            put.status
        );
        // The client's fault, not the replica's: it was not charged, so it is still up.
        let failures = c
            .metric_sum("shoal_coordinator_upstream_failures_total", &[])
            .await?;
        ensure!(
            failures == 0.0,
            "{failures} upstream failures charged to the replica"
        );
        let up = c.metric_sum("shoal_coordinator_upstream_up", &[]).await?;
        ensure!(
            up == 1.0,
            "the replica is reported down after a client's bad body"
        );
        ensure!(
            c.metric_sum("shoal_coordinator_framing_rejections_total", &[])
                .await?
                >= 1.0,
            "the bad chunk size was not counted as a framing rejection"
        );
        // A new upload of the same bytes, sent whole, is committed. (The registry dropped the
        // aborted upload session.)
        let r = client
            .post(c.url("/v2/hostile/mid/blobs/uploads/"))
            .header("content-length", "0")
            .send()
            .await?;
        ensure!(r.status() == 202, "start upload: {}", r.status());
        let location = r.headers()["location"].to_str()?.to_owned();
        let sep = if location.contains('?') { '&' } else { '?' };
        let r = client
            .put(format!("{location}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(prefix)
            .send()
            .await?;
        ensure!(
            r.status() == 201,
            "the upload after the bad body: {}",
            r.status()
        );
        c.stop().await
    })
    .await
}
