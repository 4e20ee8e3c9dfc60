//! HTTP helpers for end-to-end tests: streamed GETs that tell a complete body from an aborted
//! one, raw requests for inputs a well-behaved client cannot send, monolithic and chunked blob
//! uploads, and manifest uploads.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::image::sha256_digest;

/// How a streamed body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The body was complete (every byte the headers announced).
    Complete,
    /// The connection broke before the body was complete: an aborted transfer.
    Aborted,
    /// No bytes arrived for the idle timeout.
    Idle,
}

/// A response read frame by frame.
#[derive(Debug)]
pub struct Streamed {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub end: End,
}

/// Sends a request and reads the body frame by frame, giving up after `idle` without data.
pub async fn request_streamed(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    idle: Duration,
) -> Result<Streamed> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(idle, client.request(req.body(Full::new(Bytes::new()))?))
        .await
        .with_context(|| format!("no response headers from {url} within {idle:?}"))??;
    let status = resp.status();
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let mut received = Vec::new();
    let end = loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => break End::Idle,
            Ok(None) => break End::Complete,
            Ok(Some(Err(_))) => break End::Aborted,
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    received.extend_from_slice(&data);
                }
            }
        }
    };
    Ok(Streamed {
        status,
        headers,
        body: received,
        end,
    })
}

/// A GET read frame by frame (see [`request_streamed`]).
pub async fn get_streamed(url: &str, headers: &[(&str, &str)], idle: Duration) -> Result<Streamed> {
    request_streamed(Method::GET, url, headers, idle).await
}

/// The answer to a raw request.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Status line and headers, as text.
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The value of a header (case-insensitive name), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Writes `request` verbatim to `addr` (it should say `Connection: close`) and reads the
/// response until the server closes the connection or the announced body is complete.
pub async fn raw_request(
    addr: SocketAddr,
    request: &[u8],
    timeout: Duration,
) -> Result<RawResponse> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(request).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = match s.read(&mut chunk).await {
                Ok(n) => n,
                // A server that closes on a bad request may reset the connection after answering.
                Err(e) if !buf.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => 0,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(resp) = parse_raw(&buf) {
                let want = resp
                    .header("content-length")
                    .and_then(|v| v.parse::<usize>().ok());
                if want.is_some_and(|w| resp.body.len() >= w) {
                    return Ok(resp);
                }
            }
        }
        parse_raw(&buf)
            .with_context(|| format!("no HTTP response: {:?}", String::from_utf8_lossy(&buf)))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .context("raw request timed out")?
}

fn parse_raw(buf: &[u8]) -> Option<RawResponse> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some(RawResponse {
        status,
        head,
        body: buf[end + 4..].to_vec(),
    })
}

/// Uploads `bytes` as a blob of `repo` to a registry with a monolithic upload (POST, then PUT
/// with the digest). Returns the digest.
pub async fn push_blob(registry_url: &str, repo: &str, bytes: &[u8]) -> Result<String> {
    let digest = sha256_digest(bytes);
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let start = Request::post(format!("{registry_url}/v2/{repo}/blobs/uploads/"))
        .header(header::CONTENT_LENGTH, "0")
        .body(Full::new(Bytes::new()))?;
    let resp = client.request(start).await?;
    ensure!(
        resp.status() == StatusCode::ACCEPTED,
        "starting an upload: {}",
        resp.status()
    );
    let location = resp
        .headers()
        .get(header::LOCATION)
        .context("upload has no Location")?
        .to_str()?
        .to_owned();
    let location = if location.starts_with('/') {
        format!("{registry_url}{location}")
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let put = Request::put(format!("{location}{sep}digest={digest}"))
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, bytes.len())
        .body(Full::new(Bytes::copy_from_slice(bytes)))?;
    let resp = client.request(put).await?;
    if resp.status() != StatusCode::CREATED {
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        bail!(
            "finishing the upload: {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(digest)
}

/// What a chunked upload saw.
#[derive(Debug, Clone)]
pub struct ChunkedUpload {
    pub digest: String,
    /// Every `Location` the server answered with (POST, then each PATCH), as sent.
    pub locations: Vec<String>,
}

/// Uploads `bytes` as a blob of `repo` in chunks of `chunk` bytes: `POST` to
/// `{base}/v2/{repo}/blobs/uploads/?{query}`, one `PATCH` per chunk, then the closing `PUT`
/// with the digest, each sent to the `Location` of the answer before it, as a registry client
/// does. `query` (e.g. `ns=b.test`) is added to the `POST` only; whether it reaches the later
/// requests is up to the `Location`s.
pub async fn push_blob_chunked(
    base: &str,
    repo: &str,
    bytes: &[u8],
    chunk: usize,
    query: &str,
) -> Result<ChunkedUpload> {
    ensure!(chunk > 0, "chunk size must be positive");
    let digest = sha256_digest(bytes);
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let absolute = |loc: &str| {
        if loc.starts_with('/') {
            format!("{base}{loc}")
        } else {
            loc.to_owned()
        }
    };
    let sep = if query.is_empty() { "" } else { "?" };
    let start = Request::post(format!("{base}/v2/{repo}/blobs/uploads/{sep}{query}"))
        .header(header::CONTENT_LENGTH, "0")
        .body(Full::new(Bytes::new()))?;
    let mut locations = Vec::new();
    let mut location =
        expect_location(client.request(start).await?, StatusCode::ACCEPTED, "POST").await?;
    locations.push(location.clone());
    for (i, piece) in bytes.chunks(chunk).enumerate() {
        let from = i * chunk;
        let patch = Request::patch(absolute(&location))
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, piece.len())
            .header(
                header::CONTENT_RANGE,
                format!("{from}-{}", from + piece.len() - 1),
            )
            .body(Full::new(Bytes::copy_from_slice(piece)))?;
        location = expect_location(
            client.request(patch).await?,
            StatusCode::ACCEPTED,
            &format!("PATCH #{}", i + 1),
        )
        .await?;
        locations.push(location.clone());
    }
    let url = absolute(&location);
    let sep = if url.contains('?') { '&' } else { '?' };
    let put = Request::put(format!("{url}{sep}digest={digest}"))
        .header(header::CONTENT_LENGTH, "0")
        .body(Full::new(Bytes::new()))?;
    let resp = client.request(put).await?;
    if resp.status() != StatusCode::CREATED {
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        bail!(
            "closing PUT to {url}: {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(ChunkedUpload { digest, locations })
}

/// The `Location` of a response that must have status `want`.
async fn expect_location(
    resp: http::Response<hyper::body::Incoming>,
    want: StatusCode,
    what: &str,
) -> Result<String> {
    let status = resp.status();
    let location = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if status != want {
        let body = resp.into_body().collect().await?.to_bytes();
        bail!("{what}: {status}: {}", String::from_utf8_lossy(&body));
    }
    location.with_context(|| format!("{what}: {status} without Location"))
}

/// `PUT` of a manifest to a full URL (which may carry a query, e.g. `?ns=`). Returns the
/// digest the server reports.
pub async fn put_manifest(url: &str, media_type: &str, bytes: &[u8]) -> Result<String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let put = Request::put(url)
        .header(header::CONTENT_TYPE, media_type)
        .header(header::CONTENT_LENGTH, bytes.len())
        .body(Full::new(Bytes::copy_from_slice(bytes)))?;
    let resp = client.request(put).await?;
    let status = resp.status();
    let digest = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if status != StatusCode::CREATED {
        let body = resp.into_body().collect().await?.to_bytes();
        bail!("PUT {url}: {status}: {}", String::from_utf8_lossy(&body));
    }
    digest.context("no Docker-Content-Digest in the answer")
}

/// Uploads a manifest (`PUT /v2/<repo>/manifests/<reference>`). Returns the digest the
/// registry reports.
pub async fn push_manifest(
    registry_url: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) -> Result<String> {
    put_manifest(
        &format!("{registry_url}/v2/{repo}/manifests/{reference}"),
        media_type,
        bytes,
    )
    .await
}
