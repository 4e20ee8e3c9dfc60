//! Small network helpers for tests: free loopback ports, bounded polling, and a plain-HTTP GET.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

/// How often [`wait_until`] and [`poll_until`] re-check their condition. Short enough that tests
/// stay fast, long enough that polling a process or a socket does not eat a core.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is found by binding port 0 and releasing it, so another process may take it before
/// the caller binds it; callers that spawn a server on it should retry on "address in use".
/// Prefer binding `127.0.0.1:0` directly whenever the server runs in this process.
pub fn free_port() -> Result<u16> {
    free_port_on(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// Like [`free_port`], on a given local address (127.0.0.2, 127.0.0.3, ... need no setup on
/// Linux, which is how one machine plays several hosts).
pub fn free_port_on(ip: IpAddr) -> Result<u16> {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))
        .with_context(|| format!("binding {ip}:0 to find a free port"))?;
    Ok(listener.local_addr()?.port())
}

/// Polls `condition` every [`POLL_INTERVAL`] until it returns `true`, or fails after `timeout`.
///
/// `what` names the condition in the timeout error, e.g. "registry answers GET /v2/".
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll_until(timeout, what, || {
        let fut = condition();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Polls `probe` every [`POLL_INTERVAL`] until it returns `Some`, or fails after `timeout`.
///
/// A probe that hangs is cut off at the deadline too, so a stuck connection cannot stretch the
/// wait beyond `timeout`.
pub async fn poll_until<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, probe()).await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(_elapsed) => break,
        }
        if Instant::now() + POLL_INTERVAL >= deadline {
            break;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    bail!("timed out after {timeout:?} waiting until {what}")
}

/// The answer to [`http_get`], with the whole body read.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Sends a plain-HTTP GET and reads the whole answer, failing after `timeout`.
///
/// This uses hyper directly rather than reqwest so that it needs no TLS crypto provider: the
/// harness only ever speaks plain HTTP to loopback servers.
pub async fn http_get(url: &str, timeout: Duration) -> Result<HttpResponse> {
    let uri: Uri = url.parse().with_context(|| format!("parsing url {url}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("http_get only speaks plain http, got {url}");
    }
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let request = Request::get(uri)
        .body(Empty::new())
        .context("building GET request")?;
    let exchange = async {
        let response = client.request(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok::<_, anyhow::Error>(HttpResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| anyhow!("GET {url} timed out after {timeout:?}"))?
        .with_context(|| format!("GET {url}"))
}
