//! Integration tests for the upstream client, against small in-test HTTP servers on
//! 127.0.0.1:0 (hyper), a rustls server with an openssl-made CA, and the real
//! `docker-registry` (CNCF Distribution 2.8).

mod registry;
mod server;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http::{Response, StatusCode};
use shoal_proto::api::{CONTENT_DIGEST_HEADER, MANIFEST_MEDIA_TYPES, OCI_MANIFEST};
use shoal_proto::{Digest, ManifestRef, RegistryHost, RepoName};
use tokio::sync::Notify;

use super::retry::Backoff;
use super::*;
use server::{Seen, Server, blob_response, empty, full, pending_after, response};

/// Longest any single test waits for the client; far above what the tests need.
const TEST_DEADLINE: Duration = Duration::from_secs(30);

fn config(url: &str) -> UpstreamConfig {
    let mut c = UpstreamConfig::new(RegistryHost::parse("test.local").unwrap(), url);
    c.insecure = true;
    c.connect_timeout = Duration::from_secs(2);
    c.idle_timeout = Duration::from_secs(5);
    c.max_retries = 3;
    c
}

fn upstream(cfg: UpstreamConfig) -> Upstream {
    Upstream::with_backoff(
        cfg,
        Backoff {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(100),
            retry_after_cap: Duration::from_secs(2),
        },
    )
    .unwrap()
}

fn repo() -> RepoName {
    RepoName::parse("team/app").unwrap()
}

fn tag(t: &str) -> ManifestRef {
    ManifestRef::parse(t).unwrap()
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::fill(&mut v[..]);
    v
}

fn manifest_bytes() -> Bytes {
    Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[]}}"#,
        Digest::sha256_of(b"{}")
    ))
}

fn manifest_response(body: &Bytes) -> Response<server::Body> {
    response(
        StatusCode::OK,
        &[
            ("content-type", OCI_MANIFEST),
            (CONTENT_DIGEST_HEADER, &Digest::sha256_of(body).to_string()),
        ],
        full(body.clone()),
    )
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {TEST_DEADLINE:?}"))
}

async fn collect(body: BlobBody) -> Result<Vec<u8>, UpstreamError> {
    let mut out = Vec::new();
    let mut s = body.stream;
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

fn basic(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

// ---------------------------------------------------------------------------------------
// (a) Bearer tokens from a token server on the registry's host.

#[tokio::test]
async fn bearer_token_is_fetched_with_basic_creds_cached_and_refreshed_on_401() {
    let manifest = manifest_bytes();
    let issued = Arc::new(AtomicUsize::new(0));
    let valid = Arc::new(AtomicUsize::new(1));
    let listener = server::bind().await;
    let realm = format!("http://{}/token", listener.local_addr().unwrap());
    let srv = Server::serve(listener, {
        let (issued, valid, manifest) = (issued.clone(), valid.clone(), manifest.clone());
        move |req: Seen| {
            let (issued, valid, manifest, realm) = (
                issued.clone(),
                valid.clone(),
                manifest.clone(),
                realm.clone(),
            );
            async move {
                if req.path == "/token" {
                    if req.header("authorization") != Some(basic("alice", "s3cret").as_str()) {
                        return response(StatusCode::UNAUTHORIZED, &[], empty());
                    }
                    let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
                    let body = format!(r#"{{"token":"tok-{n}","expires_in":300}}"#);
                    return response(StatusCode::OK, &[], full(body));
                }
                let want = format!("Bearer tok-{}", valid.load(Ordering::SeqCst));
                if req.header("authorization") == Some(want.as_str()) {
                    return manifest_response(&manifest);
                }
                let challenge = format!(
                    r#"Bearer realm="{realm}",service="test-registry",scope="repository:team/app:pull""#
                );
                response(
                    StatusCode::UNAUTHORIZED,
                    &[("www-authenticate", &challenge)],
                    empty(),
                )
            }
        }
    });

    let mut cfg = config(&srv.url());
    cfg.username = Some("alice".into());
    cfg.password = Some(Secret::new("s3cret"));
    let up = upstream(cfg);

    let m = within("get_manifest", up.get_manifest(&repo(), &tag("v1"), &[]))
        .await
        .unwrap();
    assert_eq!(m.bytes, manifest);
    assert_eq!(m.digest, Digest::sha256_of(&manifest));
    assert_eq!(m.media_type, OCI_MANIFEST);

    let seen = srv.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/v2/team/app/manifests/v1",
            "/token",
            "/v2/team/app/manifests/v1"
        ]
    );
    assert_eq!(seen[0].header("authorization"), None);
    let token_req = &seen[1];
    assert_eq!(
        token_req.header("authorization"),
        Some(basic("alice", "s3cret").as_str())
    );
    let query = token_req.query.as_deref().unwrap_or("");
    assert!(query.contains("service=test-registry"), "{query}");
    assert!(
        query.contains("scope=repository%3Ateam%2Fapp%3Apull"),
        "{query}"
    );
    assert_eq!(seen[2].header("authorization"), Some("Bearer tok-1"));
    // Accept defaults to every manifest media type.
    assert_eq!(seen[2].headers.get_all("accept").iter().count(), 4);
    for m in MANIFEST_MEDIA_TYPES {
        assert!(seen[2].headers.get_all("accept").iter().any(|v| v == m));
    }

    // The token is cached: no new token request.
    within("cached", up.head_manifest(&repo(), &tag("v1"), &[]))
        .await
        .unwrap();
    assert_eq!(issued.load(Ordering::SeqCst), 1);
    let seen = srv.seen();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[3].method, http::Method::HEAD);
    assert_eq!(seen[3].header("authorization"), Some("Bearer tok-1"));

    // The registry stops accepting tok-1: a 401 fetches a fresh token once.
    valid.store(2, Ordering::SeqCst);
    let m2 = within("refresh", up.get_manifest(&repo(), &tag("v1"), &[]))
        .await
        .unwrap();
    assert_eq!(m2.bytes, manifest);
    assert_eq!(issued.load(Ordering::SeqCst), 2);
    let last = srv.seen();
    assert_eq!(
        last.last().unwrap().header("authorization"),
        Some("Bearer tok-2")
    );

    // Wrong password: the token server refuses, the error says so without the password.
    let mut cfg = config(&srv.url());
    cfg.username = Some("alice".into());
    cfg.password = Some(Secret::new("wrong-password"));
    let err = within(
        "bad creds",
        upstream(cfg).get_manifest(&repo(), &tag("v1"), &[]),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, UpstreamError::Unauthorized { .. }), "{err}");
    assert!(!format!("{err} {err:?}").contains("wrong-password"));
}

#[tokio::test]
async fn token_realm_on_another_host_gets_no_credentials() {
    // A token server that must never be contacted: it is named `localhost`, not the
    // registry's `127.0.0.1`, and plain http.
    let evil = Server::start(|_req| async { response(StatusCode::OK, &[], full("{}")) }).await;
    let realm = format!("http://localhost:{}/token", evil.addr().port());
    let srv = Server::start(move |_req| {
        let challenge = format!(r#"Bearer realm="{realm}",service="s""#);
        async move {
            response(
                StatusCode::UNAUTHORIZED,
                &[("www-authenticate", &challenge)],
                empty(),
            )
        }
    })
    .await;
    let mut cfg = config(&srv.url());
    cfg.username = Some("alice".into());
    cfg.password = Some(Secret::new("s3cret"));
    let err = within(
        "evil realm",
        upstream(cfg).get_manifest(&repo(), &tag("v1"), &[]),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, UpstreamError::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("realm"), "{err}");
    assert!(evil.seen().is_empty(), "credentials went to another host");
}

#[tokio::test]
async fn malformed_challenge_is_refused() {
    let srv = Server::start(|_req| async {
        response(
            StatusCode::UNAUTHORIZED,
            &[(
                "www-authenticate",
                r#"Bearer realm="http://127.0.0.1/token"#,
            )],
            empty(),
        )
    })
    .await;
    let err = within(
        "bad challenge",
        upstream(config(&srv.url())).get_manifest(&repo(), &tag("v1"), &[]),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, UpstreamError::Unauthorized { .. }), "{err}");
    // Parsed once, refused, not retried.
    assert_eq!(srv.seen().len(), 1);
}

// ---------------------------------------------------------------------------------------
// (b) Redirects to object storage.

#[tokio::test]
async fn blob_redirect_to_object_storage_carries_no_authorization() {
    let blob = Bytes::from(random_bytes(100_000));
    let digest = Digest::sha256_of(&blob);
    let storage = Server::start({
        let blob = blob.clone();
        move |req: Seen| {
            let blob = blob.clone();
            async move { blob_response(&req, &blob) }
        }
    })
    .await;
    let storage_url = storage.url();
    let srv = Server::start(move |req: Seen| {
        let storage_url = storage_url.clone();
        async move {
            if req.header("authorization") != Some(basic("bob", "pw").as_str()) {
                return response(
                    StatusCode::UNAUTHORIZED,
                    &[("www-authenticate", r#"Basic realm="registry""#)],
                    empty(),
                );
            }
            let location =
                format!("{storage_url}/bucket/blob?X-Amz-Signature=SECRETSIG&X-Amz-Expires=60");
            response(
                StatusCode::TEMPORARY_REDIRECT,
                &[("location", &location)],
                empty(),
            )
        }
    })
    .await;
    let mut cfg = config(&srv.url());
    cfg.username = Some("bob".into());
    cfg.password = Some(Secret::new("pw"));
    let up = upstream(cfg);

    let body = within("get_blob", up.get_blob(&repo(), &digest, 0))
        .await
        .unwrap();
    assert_eq!(body.size, Some(blob.len() as u64));
    assert_eq!(body.offset, 0);
    assert_eq!(within("collect", collect(body)).await.unwrap(), blob);

    let reg = srv.seen();
    assert_eq!(reg.len(), 2, "401, then the authenticated request");
    assert_eq!(
        reg[1].header("authorization"),
        Some(basic("bob", "pw").as_str())
    );
    let st = storage.seen();
    assert_eq!(st.len(), 1);
    assert_eq!(
        st[0].query.as_deref(),
        Some("X-Amz-Signature=SECRETSIG&X-Amz-Expires=60")
    );
    assert!(
        st[0].headers.get("authorization").is_none(),
        "Authorization leaked to object storage"
    );
}

#[tokio::test]
async fn presigned_signatures_never_reach_errors() {
    let storage =
        Server::start(|_req| async { response(StatusCode::FORBIDDEN, &[], empty()) }).await;
    let storage_url = storage.url();
    let srv = Server::start(move |_req| {
        let location = format!("{storage_url}/bucket/obj?X-Amz-Signature=SECRETSIG");
        async move { response(StatusCode::FOUND, &[("location", &location)], empty()) }
    })
    .await;
    let err = within(
        "denied",
        upstream(config(&srv.url())).get_blob(&repo(), &Digest::sha256_of(b"x"), 0),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, UpstreamError::Denied { .. }), "{err}");
    let shown = format!("{err} {err:?}");
    assert!(shown.contains("/bucket/obj"), "{shown}");
    assert!(!shown.contains("SECRETSIG"), "{shown}");
}

#[tokio::test]
async fn relative_redirects_are_followed_and_loops_are_cut() {
    let blob = Bytes::from_static(b"hello, relative world");
    let digest = Digest::sha256_of(&blob);
    let srv = Server::start({
        let blob = blob.clone();
        move |req: Seen| {
            let blob = blob.clone();
            async move {
                if req.path.starts_with("/_storage/") {
                    return blob_response(&req, &blob);
                }
                if req.path.starts_with("/loop") || req.path.contains("/blobs/sha256:0000") {
                    return response(
                        StatusCode::MOVED_PERMANENTLY,
                        &[("location", "/loop")],
                        empty(),
                    );
                }
                response(
                    StatusCode::SEE_OTHER,
                    &[("location", "/_storage/obj?sig=1")],
                    empty(),
                )
            }
        }
    })
    .await;
    let up = upstream(config(&srv.url()));
    let body = within("relative", up.get_blob(&repo(), &digest, 0))
        .await
        .unwrap();
    assert_eq!(within("collect", collect(body)).await.unwrap(), blob);

    let looping = Digest::parse(&format!("sha256:{}", "0".repeat(64))).unwrap();
    let err = within("loop", up.get_blob(&repo(), &looping, 0))
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::BadResponse(_)), "{err}");
    assert!(err.to_string().contains("redirects"), "{err}");
}

#[tokio::test]
async fn redirect_to_plain_http_needs_insecure() {
    // An https registry cannot be served here without a CA, so check the rule directly on
    // the redirect resolver of a client that is not insecure.
    let cfg = UpstreamConfig::new(
        RegistryHost::parse("r.example").unwrap(),
        "https://r.example",
    );
    let up = Upstream::new(cfg).unwrap();
    let from = reqwest::Url::parse("https://r.example/v2/a/blobs/x").unwrap();
    let resp: reqwest::Response = http::Response::builder()
        .status(307)
        .header("location", "http://bucket.example/obj?sig=1")
        .body(Vec::<u8>::new())
        .unwrap()
        .into();
    let err = up.eps.list[0]
        .redirect_target(&resp, &from, "https://r.example/v2/a/blobs/x")
        .unwrap_err();
    assert!(err.to_string().contains("plain http"), "{err}");
}

// ---------------------------------------------------------------------------------------
// (c) and (d): broken and stalled bodies are resumed with Range requests.

#[tokio::test]
async fn cut_connection_is_resumed_with_a_range_request() {
    const CUT: usize = 64 * 1024;
    let blob = Bytes::from(random_bytes(256 * 1024));
    let digest = Digest::sha256_of(&blob);
    let cut_now = Arc::new(Notify::new());
    let srv = Server::start({
        let (blob, cut_now) = (blob.clone(), cut_now.clone());
        move |req: Seen| {
            let (blob, cut_now) = (blob.clone(), cut_now.clone());
            async move {
                if req.header("range").is_some() {
                    return blob_response(&req, &blob);
                }
                // First request: the prefix, then (once the client has it) a broken body.
                let prefix = blob.slice(..CUT);
                let rest = futures::stream::once(async move {
                    cut_now.notified().await;
                    Err(std::io::Error::other("connection cut by test"))
                });
                let body = futures::stream::once(async move { Ok(prefix) }).chain(rest);
                response(
                    StatusCode::OK,
                    &[("content-length", &blob.len().to_string())],
                    server::stream_body(body),
                )
            }
        }
    })
    .await;
    let up = upstream(config(&srv.url()));
    let body = within("get_blob", up.get_blob(&repo(), &digest, 0))
        .await
        .unwrap();
    assert_eq!(body.size, Some(blob.len() as u64));
    let got = within("read", async {
        let mut out = Vec::new();
        let mut s = body.stream;
        let mut cut = false;
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk.unwrap());
            if !cut && out.len() >= CUT {
                cut = true;
                cut_now.notify_one();
            }
        }
        out
    })
    .await;
    assert_eq!(got.len(), blob.len());
    assert!(got == blob, "resumed bytes differ");
    let seen = srv.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[1].header("range"),
        Some(format!("bytes={CUT}-").as_str())
    );
}

#[tokio::test]
async fn resume_answered_with_200_skips_the_delivered_prefix() {
    const CUT: usize = 10_000;
    let blob = Bytes::from(random_bytes(50_000));
    let digest = Digest::sha256_of(&blob);
    let cut_now = Arc::new(Notify::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let srv = Server::start({
        let (blob, cut_now, calls) = (blob.clone(), cut_now.clone(), calls.clone());
        move |_req: Seen| {
            let (blob, cut_now) = (blob.clone(), cut_now.clone());
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if !first {
                    // Ignores Range: the whole blob again, with 200.
                    return response(StatusCode::OK, &[], full(blob));
                }
                let prefix = blob.slice(..CUT);
                let rest = futures::stream::once(async move {
                    cut_now.notified().await;
                    Err(std::io::Error::other("cut"))
                });
                response(
                    StatusCode::OK,
                    &[("content-length", &blob.len().to_string())],
                    server::stream_body(
                        futures::stream::once(async move { Ok(prefix) }).chain(rest),
                    ),
                )
            }
        }
    })
    .await;
    let up = upstream(config(&srv.url()));
    let body = within("get_blob", up.get_blob(&repo(), &digest, 0))
        .await
        .unwrap();
    let got = within("read", async {
        let mut out = Vec::new();
        let mut s = body.stream;
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk.unwrap());
            if out.len() >= CUT {
                cut_now.notify_one();
            }
        }
        out
    })
    .await;
    assert!(
        got == blob,
        "got {} bytes, prefix must not repeat",
        got.len()
    );
    assert_eq!(
        srv.seen()[1].header("range"),
        Some(format!("bytes={CUT}-").as_str())
    );
}

#[tokio::test]
async fn stalled_body_is_abandoned_and_resumed_within_the_idle_timeout() {
    const CUT: usize = 20_000;
    let blob = Bytes::from(random_bytes(80_000));
    let digest = Digest::sha256_of(&blob);
    let srv = Server::start({
        let blob = blob.clone();
        move |req: Seen| {
            let blob = blob.clone();
            async move {
                if req.header("range").is_some() {
                    return blob_response(&req, &blob);
                }
                response(
                    StatusCode::OK,
                    &[("content-length", &blob.len().to_string())],
                    pending_after(blob.slice(..CUT)),
                )
            }
        }
    })
    .await;
    let mut cfg = config(&srv.url());
    cfg.idle_timeout = Duration::from_millis(300);
    let up = upstream(cfg);
    let started = Instant::now();
    let body = within("get_blob", up.get_blob(&repo(), &digest, 0))
        .await
        .unwrap();
    let got = within("stalled read", collect(body)).await.unwrap();
    assert!(got == blob);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let seen = srv.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[1].header("range"),
        Some(format!("bytes={CUT}-").as_str())
    );
}

#[tokio::test]
async fn upstream_that_always_stalls_fails_in_bounded_time() {
    const PREFIX: usize = 1000;
    let blob = Bytes::from(random_bytes(10_000));
    let digest = Digest::sha256_of(&blob);
    // The first response sends a prefix and goes silent; every resume gets its headers and
    // then silence: no progress, so the budget runs out.
    let srv = Server::start({
        let blob = blob.clone();
        move |req: Seen| {
            let blob = blob.clone();
            async move {
                let (parts, _) = blob_response(&req, &blob).into_parts();
                let sent = if req.header("range").is_some() {
                    Bytes::new()
                } else {
                    blob.slice(..PREFIX)
                };
                Response::from_parts(parts, pending_after(sent))
            }
        }
    })
    .await;
    let mut cfg = config(&srv.url());
    cfg.idle_timeout = Duration::from_millis(200);
    cfg.max_retries = 2;
    let up = upstream(cfg);
    let started = Instant::now();
    let body = within("get_blob", up.get_blob(&repo(), &digest, 0))
        .await
        .unwrap();
    let mut s = body.stream;
    let first = within("prefix", s.next()).await.unwrap().unwrap();
    assert_eq!(first.len(), PREFIX);
    let err = within("stalled forever", s.next())
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Timeout { .. }), "{err}");
    assert!(err.is_unreachable());
    // Fail-stop: nothing after the error.
    assert!(within("end", s.next()).await.is_none());
    // The first request plus two resumes, each abandoned after the idle timeout.
    let seen = srv.seen();
    assert_eq!(seen.len(), 3);
    for r in &seen[1..] {
        assert_eq!(r.header("range"), Some(format!("bytes={PREFIX}-").as_str()));
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn silent_upstream_times_out_without_hanging() {
    // Accepts the request and never answers.
    let srv = Server::start(|_req| futures::future::pending::<Response<server::Body>>()).await;
    let mut cfg = config(&srv.url());
    cfg.idle_timeout = Duration::from_millis(200);
    cfg.max_retries = 1;
    let up = upstream(cfg);
    let started = Instant::now();
    let err = within("silent", up.get_blob(&repo(), &Digest::sha256_of(b"x"), 0))
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Timeout { .. }), "{err}");
    assert_eq!(srv.seen().len(), 2, "one retry");
    // The idle timeout (not connect + idle) per attempt, twice, plus a short backoff.
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// (e) Retries.

#[tokio::test]
async fn gateway_errors_and_rate_limits_are_retried_other_errors_are_not() {
    let manifest = manifest_bytes();
    let calls = Arc::new(AtomicUsize::new(0));
    let srv = Server::start({
        let (manifest, calls) = (manifest.clone(), calls.clone());
        move |req: Seen| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let manifest = manifest.clone();
            async move {
                match (req.path.as_str(), n) {
                    ("/v2/team/app/manifests/flaky", 0) => response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &[("retry-after", "0")],
                        empty(),
                    ),
                    ("/v2/team/app/manifests/flaky", 1) => response(
                        StatusCode::TOO_MANY_REQUESTS,
                        &[("retry-after", "0")],
                        empty(),
                    ),
                    ("/v2/team/app/manifests/flaky", 2) => {
                        response(StatusCode::BAD_GATEWAY, &[], empty())
                    }
                    ("/v2/team/app/manifests/flaky", _) => manifest_response(&manifest),
                    ("/v2/team/app/manifests/missing", _) => {
                        response(StatusCode::NOT_FOUND, &[], full(r#"{"errors":[]}"#))
                    }
                    ("/v2/team/app/manifests/broken", _) => {
                        response(StatusCode::INTERNAL_SERVER_ERROR, &[], empty())
                    }
                    ("/v2/team/app/manifests/forbidden", _) => {
                        response(StatusCode::FORBIDDEN, &[], empty())
                    }
                    _ => response(StatusCode::SERVICE_UNAVAILABLE, &[], empty()),
                }
            }
        }
    })
    .await;
    let up = upstream(config(&srv.url()));

    let m = within("flaky", up.get_manifest(&repo(), &tag("flaky"), &[]))
        .await
        .unwrap();
    assert_eq!(m.bytes, manifest);
    assert_eq!(calls.load(Ordering::SeqCst), 4, "503, 429, 502, then 200");

    let before = calls.load(Ordering::SeqCst);
    let err = within("missing", up.get_manifest(&repo(), &tag("missing"), &[]))
        .await
        .unwrap_err();
    assert!(err.is_not_found() && !err.is_unreachable(), "{err}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before + 1,
        "404 is not retried"
    );

    let before = calls.load(Ordering::SeqCst);
    let err = within("500", up.head_manifest(&repo(), &tag("broken"), &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, UpstreamError::Status { status, .. } if status == StatusCode::INTERNAL_SERVER_ERROR),
        "{err}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before + 1,
        "500 is not retried"
    );

    let err = within("403", up.get_manifest(&repo(), &tag("forbidden"), &[]))
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Denied { .. }), "{err}");

    // Always 503: the budget (3 retries) is spent, and the error says unreachable.
    let before = calls.load(Ordering::SeqCst);
    let err = within("down", up.get_manifest(&repo(), &tag("down"), &[]))
        .await
        .unwrap_err();
    assert!(err.is_unreachable(), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), before + 4);
}

#[tokio::test]
async fn refused_connection_is_unreachable() {
    // A port that was free a moment ago and has no listener now.
    let addr = server::bind().await.local_addr().unwrap();
    let mut cfg = config(&format!("http://{addr}"));
    cfg.max_retries = 1;
    let up = upstream(cfg);
    let err = within("ping", up.ping()).await.unwrap_err();
    assert!(
        matches!(err, UpstreamError::Unreachable { .. }) && err.is_unreachable(),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_unreachable_url_fails_at_once_for_its_hold_then_is_tried_again() {
    let addr = server::bind().await.local_addr().unwrap();
    let mut cfg = config(&format!("http://{addr}"));
    cfg.max_retries = 2;
    cfg.unreachable_hold = Duration::from_millis(1500);
    let up = upstream(cfg);
    let err = within("first ping", up.ping()).await.unwrap_err();
    assert!(err.is_unreachable(), "{err:?}");
    // Something listens there now, but within the hold nobody asks it.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let srv = Server::serve(listener, |_req: Seen| async move {
        response(StatusCode::OK, &[], empty())
    });
    let started = Instant::now();
    let err = within("ping within the hold", up.ping()).await.unwrap_err();
    assert!(
        err.is_unreachable() && err.to_string().contains("moments ago"),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(500));
    assert!(srv.seen().is_empty());
    // After the hold, the URL is tried again, and it answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match within("ping after the hold", up.ping()).await {
            Ok(()) => break,
            Err(e) => assert!(
                Instant::now() < deadline && e.to_string().contains("moments ago"),
                "{e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(srv.seen().len(), 1);
    // A hold of zero turns it off: every request tries.
    let dead = server::bind().await.local_addr().unwrap();
    let mut cfg = config(&format!("http://{dead}"));
    cfg.max_retries = 0;
    cfg.unreachable_hold = Duration::ZERO;
    let up = upstream(cfg);
    for _ in 0..2 {
        let e = within("ping without hold", up.ping()).await.unwrap_err();
        assert!(!e.to_string().contains("moments ago"), "{e:?}");
    }
}

#[tokio::test]
async fn an_unreachable_url_fails_over_to_the_next_and_stays_there() {
    let dead = server::bind().await.local_addr().unwrap();
    let blob = Bytes::from(random_bytes(100_000));
    let d = Digest::sha256_of(&blob);
    let manifest = manifest_bytes();
    let srv = Server::start({
        let (blob, manifest) = (blob.clone(), manifest.clone());
        move |req: Seen| {
            let (blob, manifest) = (blob.clone(), manifest.clone());
            async move {
                if req.path.contains("/blobs/") {
                    blob_response(&req, &blob)
                } else {
                    manifest_response(&manifest)
                }
            }
        }
    })
    .await;
    let mut cfg = config(&format!("http://{dead}"));
    cfg.fallback_urls = vec![srv.url()];
    cfg.max_retries = 1;
    let up = upstream(cfg);

    let m = within("manifest", up.get_manifest(&repo(), &tag("v1"), &[]))
        .await
        .unwrap();
    assert_eq!(m.bytes, manifest);
    // The fallback is now the URL in use: the next requests go there first.
    let started = Instant::now();
    assert_eq!(
        within("size", up.blob_size(&repo(), &d)).await.unwrap(),
        Some(blob.len() as u64)
    );
    let got = collect(within("blob", up.get_blob(&repo(), &d, 0)).await.unwrap())
        .await
        .unwrap();
    assert!(got == blob[..]);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "went back to the dead URL first ({:?})",
        started.elapsed()
    );
    assert_eq!(srv.seen().len(), 3);

    // An answer that is an error is not a reason to try elsewhere.
    let srv404 =
        Server::start(|_req: Seen| async { response(StatusCode::NOT_FOUND, &[], empty()) }).await;
    let mut cfg = config(&srv404.url());
    cfg.fallback_urls = vec![srv.url()];
    let up = upstream(cfg);
    let err = within("404", up.blob_size(&repo(), &d)).await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert_eq!(srv.seen().len(), 3, "the fallback was asked after a 404");

    // A fallback URL is validated like the first.
    let mut cfg = config(&srv.url());
    cfg.insecure = false;
    cfg.url = "https://registry.test".into();
    cfg.fallback_urls = vec!["http://plain.test".into()];
    let err = Upstream::new(cfg).unwrap_err();
    assert!(err.to_string().contains("plain http"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Manifests.

#[tokio::test]
async fn manifests_are_verified_and_passed_through() {
    let manifest = manifest_bytes();
    let good = Digest::sha256_of(&manifest);
    let srv = Server::start({
        let manifest = manifest.clone();
        move |req: Seen| {
            let manifest = manifest.clone();
            async move {
                let wrong = Digest::sha256_of(b"something else").to_string();
                match req.path.rsplit('/').next().unwrap_or("") {
                    "lying" => response(
                        StatusCode::OK,
                        &[
                            ("content-type", OCI_MANIFEST),
                            (CONTENT_DIGEST_HEADER, &wrong),
                        ],
                        full(manifest),
                    ),
                    "huge" => response(
                        StatusCode::OK,
                        &[("content-type", OCI_MANIFEST)],
                        full(vec![b' '; (MAX_MANIFEST_SIZE + 1) as usize]),
                    ),
                    "untyped" => response(StatusCode::OK, &[], full(manifest)),
                    _ => manifest_response(&manifest),
                }
            }
        }
    })
    .await;
    let up = upstream(config(&srv.url()));

    let head = within("head", up.head_manifest(&repo(), &tag("v1"), &[]))
        .await
        .unwrap();
    assert_eq!(
        head,
        ManifestHead {
            digest: Some(good.clone()),
            media_type: OCI_MANIFEST.into(),
            size: Some(manifest.len() as u64),
        }
    );

    // The client's Accept values are passed through as given.
    let accept = vec!["application/vnd.oci.image.index.v1+json".to_owned()];
    let by_digest = within(
        "by digest",
        up.get_manifest(&repo(), &ManifestRef::Digest(good.clone()), &accept),
    )
    .await
    .unwrap();
    assert_eq!(by_digest.digest, good);
    assert_eq!(by_digest.bytes, manifest);
    let last = srv.seen().pop().unwrap();
    assert_eq!(last.path, format!("/v2/team/app/manifests/{good}"));
    let sent: Vec<_> = last.headers.get_all("accept").iter().collect();
    assert_eq!(sent, [accept[0].as_str()]);

    let err = within("lying", up.get_manifest(&repo(), &tag("lying"), &[]))
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::BadResponse(_)), "{err}");

    // A by-digest request whose body is something else.
    let other = Digest::sha256_of(b"not this");
    let err = within(
        "wrong body",
        up.get_manifest(&repo(), &ManifestRef::Digest(other), &[]),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("requested digest"), "{err}");

    let err = within("huge", up.get_manifest(&repo(), &tag("huge"), &[]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");

    // No Content-Type: the body's mediaType is used.
    let m = within("untyped", up.get_manifest(&repo(), &tag("untyped"), &[]))
        .await
        .unwrap();
    assert_eq!(m.media_type, OCI_MANIFEST);
}

// ---------------------------------------------------------------------------------------
// Ranges.

#[tokio::test]
async fn offsets_and_ranges() {
    let blob = Bytes::from(random_bytes(30_000));
    let digest = Digest::sha256_of(&blob);
    let srv = Server::start({
        let blob = blob.clone();
        move |req: Seen| {
            let blob = blob.clone();
            async move {
                if req.path.starts_with("/v2/ignores/") {
                    return response(StatusCode::OK, &[], full(blob));
                }
                blob_response(&req, &blob)
            }
        }
    })
    .await;
    let up = upstream(config(&srv.url()));
    let ignores = RepoName::parse("ignores/range").unwrap();
    for name in [repo(), ignores] {
        let body = within("offset", up.get_blob(&name, &digest, 1234))
            .await
            .unwrap();
        assert_eq!((body.size, body.offset), (Some(30_000), 1234));
        assert!(within("collect", collect(body)).await.unwrap() == blob[1234..]);

        let body = within("range", up.get_blob_range(&name, &digest, 100..2100))
            .await
            .unwrap();
        assert_eq!(body.offset, 100);
        assert!(within("collect", collect(body)).await.unwrap() == blob[100..2100]);

        // A range past the end is clamped.
        let body = within("clamped", up.get_blob_range(&name, &digest, 29_000..40_000))
            .await
            .unwrap();
        assert!(within("collect", collect(body)).await.unwrap() == blob[29_000..]);
    }
    // An offset at the very end: 416 with the size, an empty stream.
    let body = within("end", up.get_blob(&repo(), &digest, 30_000))
        .await
        .unwrap();
    assert_eq!(body.size, Some(30_000));
    assert!(within("collect", collect(body)).await.unwrap().is_empty());
    assert_eq!(
        within("size", up.blob_size(&repo(), &digest))
            .await
            .unwrap(),
        Some(30_000)
    );
}

// ---------------------------------------------------------------------------------------
// Configuration and secrets.

#[test]
fn configuration_is_validated() {
    let host = || RegistryHost::parse("r.example").unwrap();
    let err = Upstream::new(UpstreamConfig::new(host(), "http://r.example")).unwrap_err();
    assert!(err.to_string().contains("insecure"), "{err}");
    for bad in [
        "ftp://r.example",
        "r.example",
        "https://r.example/?x=1",
        "https://r.example/#f",
    ] {
        let err = Upstream::new(UpstreamConfig::new(host(), bad)).unwrap_err();
        assert!(matches!(err, UpstreamError::Config(_)), "{bad}: {err}");
    }
    let err =
        Upstream::new(UpstreamConfig::new(host(), "https://u:hunter2@r.example")).unwrap_err();
    assert!(!format!("{err} {err:?}").contains("hunter2"), "{err}");

    let mut cfg = UpstreamConfig::new(host(), "https://r.example");
    cfg.username = Some("u".into());
    assert!(
        Upstream::new(cfg.clone()).is_err(),
        "username without password"
    );
    cfg.password = Some(Secret::new("hunter2"));
    let dbg = format!("{cfg:?}");
    assert!(!dbg.contains("hunter2") && dbg.contains("***"), "{dbg}");
    let up = Upstream::new(cfg).unwrap();
    assert_eq!(up.host().as_str(), "r.example");
    assert!(!format!("{up:?}").contains("hunter2"));

    let mut cfg = UpstreamConfig::new(host(), "https://r.example");
    cfg.idle_timeout = Duration::ZERO;
    assert!(Upstream::new(cfg).is_err());
    // A base path is kept (registries behind a path prefix).
    let up = Upstream::new(UpstreamConfig::new(host(), "https://r.example/mirror/")).unwrap();
    assert_eq!(
        up.eps.list[0].endpoint("/v2/").unwrap().as_str(),
        "https://r.example/mirror/v2/"
    );
    // A URL on another host is a mirror of the registry: it is told which one (containerd's
    // `ns`), after any query of the request's own.
    let up = Upstream::new(UpstreamConfig::new(host(), "https://gw.example:5000")).unwrap();
    assert_eq!(
        up.eps.list[0]
            .endpoint("/v2/a/tags/list?n=2")
            .unwrap()
            .as_str(),
        "https://gw.example:5000/v2/a/tags/list?n=2&ns=r.example"
    );
    let named = RegistryHost::parse("gw.example:5000").unwrap();
    let up = Upstream::new(UpstreamConfig::new(named, "https://GW.example:5000")).unwrap();
    assert_eq!(
        up.eps.list[0].endpoint("/v2/").unwrap().as_str(),
        "https://gw.example:5000/v2/"
    );
}

#[tokio::test]
async fn ping_counts_a_challenge_as_reachable() {
    let srv = Server::start(|req: Seen| async move {
        if req.path != "/v2/" {
            return response(StatusCode::NOT_FOUND, &[], empty());
        }
        response(
            StatusCode::UNAUTHORIZED,
            &[("www-authenticate", r#"Basic realm="r""#)],
            empty(),
        )
    })
    .await;
    let up = upstream(config(&srv.url()));
    within("ping", up.ping()).await.unwrap();
    assert_eq!(srv.seen()[0].header("authorization"), None);
}

// ---------------------------------------------------------------------------------------
// TLS with a per-upstream CA file.

#[tokio::test]
async fn tls_upstream_is_trusted_through_its_ca_file_only() {
    let dir = tempfile::tempdir().unwrap();
    let pki = server::make_pki(dir.path());
    let addr = server::tls_server(&pki);
    let url = format!("https://127.0.0.1:{}", addr.port());

    let mut cfg = UpstreamConfig::new(RegistryHost::parse("secure.local").unwrap(), &url);
    cfg.max_retries = 1;
    cfg.ca_file = Some(pki.ca_cert.clone());
    within("ping with CA", upstream(cfg.clone()).ping())
        .await
        .unwrap();

    cfg.ca_file = None;
    let err = within("ping without CA", upstream(cfg).ping())
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Tls { .. }), "{err:?}");
    assert!(!err.is_retryable());
}

// ---------------------------------------------------------------------------------------
// The real registry.

#[tokio::test]
async fn real_registry_with_htpasswd_basic_auth() {
    let reg = registry::Registry::start("carol", "pa55word").await;
    let name = RepoName::parse("shoal/test").unwrap();
    let blob = random_bytes(1024 * 1024 + 17);
    let digest = within("push blob", reg.push_blob(&name, &blob)).await;
    let config_blob =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = within("push config", reg.push_blob(&name, config_blob)).await;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{digest}","size":{}}}]}}"#,
        config_blob.len(),
        blob.len()
    );
    within(
        "push manifest",
        reg.push_manifest(&name, "v1", OCI_MANIFEST, manifest.as_bytes()),
    )
    .await;

    let mut cfg = UpstreamConfig::new(RegistryHost::parse("real.local").unwrap(), reg.url());
    cfg.insecure = true;
    cfg.username = Some("carol".into());
    cfg.password = Some(Secret::new("pa55word"));
    let up = Upstream::new(cfg.clone()).unwrap();
    within("ping", up.ping()).await.unwrap();

    let body = within("get_blob", up.get_blob(&name, &digest, 0))
        .await
        .unwrap();
    assert_eq!(body.size, Some(blob.len() as u64));
    let got = within("collect", collect(body)).await.unwrap();
    assert_eq!(Digest::sha256_of(&got), digest);

    let body = within("get_blob offset", up.get_blob(&name, &digest, 500_000))
        .await
        .unwrap();
    assert_eq!((body.size, body.offset), (Some(blob.len() as u64), 500_000));
    assert!(within("collect", collect(body)).await.unwrap() == blob[500_000..]);

    let body = within("range", up.get_blob_range(&name, &digest, 10..20))
        .await
        .unwrap();
    assert!(within("collect", collect(body)).await.unwrap() == blob[10..20]);

    let head = within("head", up.head_manifest(&name, &tag("v1"), &[]))
        .await
        .unwrap();
    let want = Digest::sha256_of(manifest.as_bytes());
    assert_eq!(head.digest.as_ref(), Some(&want));
    assert_eq!(head.media_type, OCI_MANIFEST);
    let m = within(
        "get",
        up.get_manifest(&name, &ManifestRef::Digest(want.clone()), &[]),
    )
    .await
    .unwrap();
    assert_eq!(m.bytes, manifest.as_bytes());

    let missing = Digest::sha256_of(b"never pushed");
    let err = within("missing", up.get_blob(&name, &missing, 0))
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");

    cfg.password = Some(Secret::new("not-the-password"));
    let err = within(
        "bad password",
        Upstream::new(cfg.clone())
            .unwrap()
            .get_blob(&name, &digest, 0),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, UpstreamError::Unauthorized { .. }), "{err}");
    cfg.username = None;
    cfg.password = None;
    let err = within(
        "anonymous",
        Upstream::new(cfg).unwrap().get_blob(&name, &digest, 0),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, UpstreamError::Unauthorized { .. }), "{err}");
}
