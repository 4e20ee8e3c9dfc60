//! The coordinator as a client of its upstream: the Bearer token dance against the realm a
//! registry names (tokens cached per scope), client credentials never forwarded, and 307
//! redirects to object storage passed to the client or followed without credentials.
//!
//! The upstream here is a small in-process mock (a registry that wants Bearer tokens, its
//! token server and a storage endpoint), because Distribution's token auth needs a signed-JWT
//! token server. Redirects against real S3 storage (garage) are covered by their own test.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use shoal_tests::coordinator::{CoordinatorOptions, HashFormat, TestCoordinator, htpasswd_add};
use shoal_tests::image::sha256_digest;
use tokio::net::TcpListener;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);
const BLOB: &[u8] = b"0123456789 blob bytes served by object storage";
const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},"layers":[]}"#;
/// `shoal:pw` as Basic credentials.
const UPSTREAM_BASIC: &str = "Basic c2hvYWw6cHc=";

async fn within(test: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .context("test timed out")?
}

/// What the mock endpoints saw.
#[derive(Debug, Default)]
struct Seen {
    /// (endpoint, path and query, Authorization header) of every request.
    requests: Vec<(&'static str, String, Option<String>)>,
    /// Range headers that reached storage.
    ranges: Vec<String>,
}

type Handler = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

/// Serves `handler` on 127.0.0.1:0 until the test ends.
async fn serve(name: &'static str, seen: Arc<Mutex<Seen>>, handler: Handler) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (seen, handler) = (Arc::clone(&seen), Arc::clone(&handler));
            let svc = service_fn(move |req: Request<Incoming>| {
                let auth = req
                    .headers()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap_or("?").to_owned());
                {
                    let mut s = seen.lock().unwrap();
                    let pq = req
                        .uri()
                        .path_and_query()
                        .map_or("", |p| p.as_str())
                        .to_owned();
                    s.requests.push((name, pq, auth));
                    if let Some(r) = req.headers().get("range") {
                        s.ranges.push(r.to_str().unwrap_or("?").to_owned());
                    }
                }
                let resp = handler(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn respond(
    status: StatusCode,
    headers: &[(&str, String)],
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    for (k, v) in headers {
        r.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    r
}

fn query(req: &Request<Incoming>) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for pair in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        out.entry(k.to_owned()).or_default().push(v);
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = s
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A token registry, its token server and storage. Returns (registry URL, seen).
async fn mock_upstream() -> Result<(String, Arc<Mutex<Seen>>)> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let storage = serve(
        "storage",
        Arc::clone(&seen),
        Arc::new(|req| {
            if req.uri().path() != "/bucket/blob"
                || !req.uri().query().unwrap_or("").contains("sig=")
            {
                return respond(StatusCode::FORBIDDEN, &[], "bad signature");
            }
            match req.headers().get("range").and_then(|v| v.to_str().ok()) {
                Some("bytes=0-9") => respond(
                    StatusCode::PARTIAL_CONTENT,
                    &[("content-range", format!("bytes 0-9/{}", BLOB.len()))],
                    &BLOB[..10],
                ),
                _ => respond(StatusCode::OK, &[], BLOB),
            }
        }),
    )
    .await?;
    let token = serve(
        "token",
        Arc::clone(&seen),
        Arc::new(|req| {
            if req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                != Some(UPSTREAM_BASIC)
            {
                return respond(StatusCode::UNAUTHORIZED, &[], "who are you");
            }
            let q = query(req);
            let scope = q.get("scope").map(|s| s.join(" ")).unwrap_or_default();
            respond(
                StatusCode::OK,
                &[("content-type", "application/json".into())],
                format!(r#"{{"token":"tok[{scope}]","expires_in":300}}"#),
            )
        }),
    )
    .await?;
    let digest = sha256_digest(BLOB);
    let registry = serve(
        "registry",
        Arc::clone(&seen),
        Arc::new(move |req| {
            let path = req.uri().path();
            let needed = match path {
                "/v2/" => "tok[]".to_owned(),
                p if p.starts_with("/v2/team/app/") => "tok[repository:team/app:pull]".to_owned(),
                _ => return respond(StatusCode::NOT_FOUND, &[], "{}"),
            };
            let scope = needed.trim_start_matches("tok[").trim_end_matches(']');
            let challenge = if scope.is_empty() {
                format!(r#"Bearer realm="http://{token}/token",service="mock""#)
            } else {
                format!(r#"Bearer realm="http://{token}/token",service="mock",scope="{scope}""#)
            };
            let got = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            if got != Some(&format!("Bearer {needed}")) {
                return respond(
                    StatusCode::UNAUTHORIZED,
                    &[("www-authenticate", challenge)],
                    "{}",
                );
            }
            if path == "/v2/" {
                return respond(StatusCode::OK, &[], "{}");
            }
            if path.ends_with("/manifests/v1") {
                return respond(
                    StatusCode::OK,
                    &[(
                        "content-type",
                        "application/vnd.oci.image.manifest.v1+json".into(),
                    )],
                    MANIFEST,
                );
            }
            if path == format!("/v2/team/app/blobs/{digest}") {
                return respond(
                    StatusCode::TEMPORARY_REDIRECT,
                    &[(
                        "location",
                        format!("http://{storage}/bucket/blob?sig=s3cr3t-signature"),
                    )],
                    "",
                );
            }
            respond(StatusCode::NOT_FOUND, &[], "{}")
        }),
    )
    .await?;
    Ok((format!("http://{registry}"), seen))
}

async fn coordinator(
    registry: &str,
    redirect: &str,
) -> Result<(TestCoordinator, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let users = dir.path().join("htpasswd");
    htpasswd_add(&users, "alice", "alice-pw", HashFormat::Bcrypt)?;
    let mut opts = CoordinatorOptions::new(&[registry.to_owned()]);
    opts.htpasswd = Some(users);
    opts.upstream_credentials = Some(("shoal".into(), "pw".into()));
    opts.redirect = redirect.into();
    Ok((TestCoordinator::start(opts).await?, dir))
}

fn check_no_client_credentials(seen: &Seen) -> Result<()> {
    for (endpoint, pq, auth) in &seen.requests {
        let auth = auth.as_deref().unwrap_or("");
        ensure!(
            !auth.contains("YWxpY2U"),
            "{endpoint} {pq} got alice's credentials"
        );
        match *endpoint {
            "registry" => ensure!(
                auth.is_empty() || auth.starts_with("Bearer "),
                "registry got {auth:?}"
            ),
            "token" => ensure!(auth == UPSTREAM_BASIC, "token server got {auth:?}"),
            _ => ensure!(auth.is_empty(), "storage got credentials: {auth:?}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_does_the_bearer_dance_and_passes_storage_redirects() -> Result<()> {
    within(async {
        let (registry, seen) = mock_upstream().await?;
        let (c, _dir) = coordinator(&registry, "pass").await?;
        let http = c.client()?;
        for _ in 0..3 {
            let r = http
                .get(c.url("/v2/team/app/manifests/v1"))
                .basic_auth("alice", Some("alice-pw"))
                .send()
                .await?;
            ensure!(r.status() == 200, "{}", r.status());
            ensure!(r.bytes().await? == MANIFEST.as_bytes());
        }
        let digest = sha256_digest(BLOB);
        let r = http
            .get(c.url(&format!("/v2/team/app/blobs/{digest}")))
            .basic_auth("alice", Some("alice-pw"))
            .send()
            .await?;
        ensure!(r.status() == 307, "{}", r.status());
        let location = r.headers()["location"].to_str()?;
        ensure!(
            location.contains("/bucket/blob?sig=s3cr3t-signature"),
            "{location}"
        );
        {
            let seen = seen.lock().unwrap();
            check_no_client_credentials(&seen)?;
            let pull_tokens = seen
                .requests
                .iter()
                .filter(|(e, pq, _)| *e == "token" && pq.contains("repository%3Ateam%2Fapp%3Apull"))
                .count();
            ensure!(
                pull_tokens == 1,
                "{pull_tokens} token fetches for one scope (cache): {:#?}",
                seen.requests
            );
            ensure!(
                !seen.requests.iter().any(|r| r.0 == "storage"),
                "the coordinator followed a redirect in pass mode"
            );
        }
        c.stop().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_follows_storage_redirects_without_credentials() -> Result<()> {
    within(async {
        let (registry, seen) = mock_upstream().await?;
        let (c, _dir) = coordinator(&registry, "follow").await?;
        let http = c.client()?;
        let url = c.url(&format!("/v2/team/app/blobs/{}", sha256_digest(BLOB)));
        let r = http
            .get(&url)
            .basic_auth("alice", Some("alice-pw"))
            .send()
            .await?;
        ensure!(r.status() == 200, "{}", r.status());
        ensure!(r.bytes().await? == BLOB);
        let r = http
            .get(&url)
            .basic_auth("alice", Some("alice-pw"))
            .header("range", "bytes=0-9")
            .send()
            .await?;
        ensure!(r.status() == 206, "{}", r.status());
        ensure!(r.bytes().await? == &BLOB[..10]);
        {
            let seen = seen.lock().unwrap();
            check_no_client_credentials(&seen)?;
            ensure!(
                seen.ranges.iter().any(|r| r == "bytes=0-9"),
                "storage never saw the Range: {:?}",
                seen.ranges
            );
            ensure!(seen.requests.iter().filter(|r| r.0 == "storage").count() == 2);
        }
        // The signature of the presigned URL never reaches the access log.
        ensure!(!c.access_log().iter().any(|l| l.contains("s3cr3t")));
        c.stop().await
    })
    .await
}
