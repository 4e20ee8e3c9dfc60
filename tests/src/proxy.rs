//! A counting, fault-injecting HTTP reverse proxy to put between Shoal and a registry.
//!
//! Every request is forwarded with its method, path, query and headers; bodies stream through
//! in both directions without being buffered. Each request is recorded (method, path, Range,
//! headers, status, body bytes sent to the client), which is how tests check single-flight ("each blob
//! was fetched from upstream once") and resume ("the second request asked for a range").
//!
//! Faults are set at run time and match requests by the last segment of a
//! `/v2/<name>/blobs/<digest>` or `/v2/<name>/manifests/<reference>` path, or match everything
//! ([`Proxy::fail_all`]). A fault applies to every matching request until cleared, or to the
//! next `n` ones ([`Proxy::inject_times`]). Body faults keep the upstream `Content-Length`, so
//! the client expects the whole body: a corrupted body has the right length and only a digest
//! check catches it, a truncated one ends with a connection abort, a stalled one just stops.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context as TaskContext, Poll, Waker, ready};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

/// Largest piece a throttled body sends at once, so the rate is smooth at small scales.
const THROTTLE_PIECE: usize = 16 * 1024;

/// Headers that describe one connection rather than the message (RFC 9110 section 7.6.1);
/// hyper sets its own on each side.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A misbehaviour the proxy injects into matching requests.
///
/// `Status` and `Delay` apply to requests of any method. The body faults (`Corrupt`,
/// `StallAfter`, `TruncateAfter`, `Throttle`) apply to `GET` only, so a `HEAD` probe does not
/// use up a fault injected for a limited number of requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and an empty body without contacting upstream.
    Status(StatusCode),
    /// Wait this long before forwarding the request (a slow upstream, or a window in which a
    /// test makes concurrent requests that single-flight must merge).
    Delay(Duration),
    /// Flip all bits of one byte in the middle of the response body. Length and headers stay
    /// the same, so only the digest check can tell.
    Corrupt,
    /// Send this many body bytes, then send nothing more and keep the connection open until
    /// [`Proxy::release_stalls`] (then the rest follows) or the client gives up: a no-progress
    /// upstream.
    StallAfter(u64),
    /// Send this many body bytes, then abort the connection: an upstream that dies mid-blob.
    TruncateAfter(u64),
    /// Send the body at about this many bytes per second.
    Throttle(u64),
}

impl Fault {
    fn is_body_fault(&self) -> bool {
        !matches!(self, Fault::Status(_) | Fault::Delay(_))
    }
}

/// A snapshot of one proxied request.
#[derive(Debug, Clone)]
pub struct RequestLog {
    /// Arrival order since the proxy started (not reset by [`Proxy::reset`]).
    pub seq: u64,
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    /// The `Range` request header, for resume tests.
    pub range: Option<String>,
    /// Every request header as the proxy received it (before its own hop-by-hop stripping):
    /// what the client in front of it sent, e.g. a gateway's `X-Forwarded-*`.
    pub headers: HeaderMap,
    /// `None` while the proxy still waits for upstream's answer.
    pub status: Option<StatusCode>,
    /// Response body bytes handed to the client so far.
    pub body_bytes: u64,
    /// Whether the response body reached its end (false while streaming, stalled, after a
    /// truncation, or when the client went away first).
    pub complete: bool,
    /// Faults applied to this request.
    pub faults: Vec<Fault>,
}

impl RequestLog {
    /// The digest if this is a request for `/v2/<name>/blobs/<digest>`.
    pub fn blob_digest(&self) -> Option<&str> {
        blob_digest(&self.path)
    }
}

/// The digest in a `/v2/<name>/blobs/<digest>` path; `None` for uploads and other paths.
pub fn blob_digest(path: &str) -> Option<&str> {
    segment_after(path, "/blobs/")
}

/// The tag or digest in a `/v2/<name>/manifests/<reference>` path.
pub fn manifest_reference(path: &str) -> Option<&str> {
    segment_after(path, "/manifests/")
}

fn segment_after<'a>(path: &'a str, marker: &str) -> Option<&'a str> {
    let rest = path.strip_prefix("/v2/")?;
    let (name, reference) = rest.rsplit_once(marker)?;
    // "/blobs/uploads/<uuid>" leaves a '/' in the tail; a digest never has one.
    if name.is_empty() || reference.is_empty() || reference.contains('/') {
        return None;
    }
    if marker == "/blobs/" && !reference.contains(':') {
        return None;
    }
    Some(reference)
}

/// What a fault rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// A blob digest or manifest reference.
    Reference(String),
    Everything,
}

#[derive(Debug)]
struct Rule {
    target: Target,
    fault: Fault,
    /// How many more requests it applies to; `None` for all.
    remaining: Option<usize>,
}

/// The live record behind a [`RequestLog`]; the response body updates it as bytes flow.
#[derive(Debug)]
struct RecordCell {
    seq: u64,
    method: Method,
    path: String,
    query: Option<String>,
    range: Option<String>,
    headers: HeaderMap,
    faults: Vec<Fault>,
    /// 0 until upstream answers.
    status: AtomicU16,
    body_bytes: AtomicU64,
    complete: AtomicBool,
}

impl RecordCell {
    fn snapshot(&self) -> RequestLog {
        RequestLog {
            seq: self.seq,
            method: self.method.clone(),
            path: self.path.clone(),
            query: self.query.clone(),
            range: self.range.clone(),
            headers: self.headers.clone(),
            status: StatusCode::from_u16(self.status.load(Ordering::Acquire)).ok(),
            body_bytes: self.body_bytes.load(Ordering::Acquire),
            complete: self.complete.load(Ordering::Acquire),
            faults: self.faults.clone(),
        }
    }

    fn set_status(&self, status: StatusCode) {
        self.status.store(status.as_u16(), Ordering::Release);
    }
}

#[derive(Debug)]
struct Shared {
    upstream: Mutex<Uri>,
    client: Client<HttpConnector, Incoming>,
    rules: Mutex<Vec<Rule>>,
    records: Mutex<Vec<Arc<RecordCell>>>,
    next_seq: AtomicU64,
    /// Bumped by `release_stalls`; stalled bodies wait for a change.
    release: watch::Sender<u64>,
}

/// Locks a mutex, ignoring poisoning: the data is plain records and rules, still consistent
/// after a panic elsewhere, and a test should report its own failure, not a poison error.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The task running the listener and its connections.
#[derive(Debug)]
struct ServerTask {
    handle: Option<JoinHandle<()>>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl ServerTask {
    fn spawn(listener: TcpListener, shared: Arc<Shared>) -> ServerTask {
        let (shutdown, shutdown_rx) = oneshot::channel();
        ServerTask {
            handle: Some(tokio::spawn(serve(listener, shared, shutdown_rx))),
            shutdown: Some(shutdown),
        }
    }

    /// Closes the listener and every connection, and waits until they are closed.
    async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
    }
}

impl Drop for ServerTask {
    fn drop(&mut self) {
        // Dropping the task drops the listener and the JoinSet, which aborts every connection.
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

/// A reverse proxy on 127.0.0.1 in front of one upstream. Dropping it closes the listener
/// and every connection. Methods take `&self`; wrap it in an `Arc` to share it across tasks.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Mutex<Option<ServerTask>>,
}

impl Proxy {
    /// Starts a proxy on 127.0.0.1:0 forwarding to `upstream_url` (`http://HOST:PORT`).
    pub async fn start(upstream_url: &str) -> Result<Proxy> {
        Self::start_on(
            "127.0.0.1:0".parse().expect("a valid socket address"),
            upstream_url,
        )
        .await
    }

    /// Starts a proxy on a given local address (port 0 picks a free one).
    pub async fn start_on(bind: SocketAddr, upstream_url: &str) -> Result<Proxy> {
        let upstream = parse_upstream(upstream_url)?;
        let listener = TcpListener::bind(bind)
            .await
            .with_context(|| format!("binding proxy on {bind}"))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            client: Client::builder(TokioExecutor::new()).build_http(),
            rules: Mutex::new(Vec::new()),
            records: Mutex::new(Vec::new()),
            next_seq: AtomicU64::new(0),
            release: watch::Sender::new(0),
        });
        let server = ServerTask::spawn(listener, shared.clone());
        tracing::debug!(%addr, upstream = upstream_url, "proxy started");
        Ok(Proxy {
            shared,
            addr,
            server: Mutex::new(Some(server)),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT`, the form skopeo and image references use.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// Sends later requests to another upstream (e.g. a replica after a failover).
    pub fn set_upstream(&self, upstream_url: &str) -> Result<()> {
        *lock(&self.shared.upstream) = parse_upstream(upstream_url)?;
        Ok(())
    }

    // ----- faults -----

    /// Applies `fault` to every request for blob digest or manifest reference `target`.
    pub fn inject(&self, target: &str, fault: Fault) {
        self.add_rule(Target::Reference(target.to_owned()), fault, None);
    }

    /// Applies `fault` to the next `times` requests for `target` only (e.g. truncate once,
    /// then let the resumed request through).
    pub fn inject_times(&self, target: &str, fault: Fault, times: usize) {
        self.add_rule(Target::Reference(target.to_owned()), fault, Some(times));
    }

    /// Applies `fault` to every request, whatever its path.
    pub fn inject_all(&self, fault: Fault) {
        self.add_rule(Target::Everything, fault, None);
    }

    pub fn corrupt_blob(&self, digest: &str) {
        self.inject(digest, Fault::Corrupt);
    }

    pub fn delay_blob(&self, digest: &str, delay: Duration) {
        self.inject(digest, Fault::Delay(delay));
    }

    pub fn stall_blob_after(&self, digest: &str, bytes: u64) {
        self.inject(digest, Fault::StallAfter(bytes));
    }

    pub fn truncate_blob_after(&self, digest: &str, bytes: u64) {
        self.inject(digest, Fault::TruncateAfter(bytes));
    }

    pub fn throttle_blob(&self, digest: &str, bytes_per_second: u64) {
        self.inject(digest, Fault::Throttle(bytes_per_second));
    }

    /// Answers every request with `status` without contacting upstream (an upstream that is
    /// up but broken). [`Proxy::stop`] is the upstream that is down.
    pub fn fail_all(&self, status: StatusCode) {
        self.inject_all(Fault::Status(status));
    }

    /// Removes every fault. Bodies already stalled stay stalled until [`Proxy::release_stalls`].
    pub fn clear_faults(&self) {
        lock(&self.shared.rules).clear();
    }

    /// Lets every currently stalled body continue.
    pub fn release_stalls(&self) {
        self.shared
            .release
            .send_modify(|generation| *generation += 1);
    }

    fn add_rule(&self, target: Target, fault: Fault, remaining: Option<usize>) {
        lock(&self.shared.rules).push(Rule {
            target,
            fault,
            remaining,
        });
    }

    // ----- stop and resume -----

    /// Closes the listener and drops every open connection: new connections are refused and
    /// transfers in flight end abruptly, like an upstream that went down.
    pub async fn stop(&self) {
        let server = lock(&self.server).take();
        if let Some(server) = server {
            server.stop().await;
        }
    }

    /// Listens again on the same address after [`Proxy::stop`]. Records and faults are kept.
    pub async fn resume(&self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let listener = TcpListener::bind(self.addr)
            .await
            .with_context(|| format!("re-binding proxy on {}", self.addr))?;
        let server = ServerTask::spawn(listener, self.shared.clone());
        *lock(&self.server) = Some(server);
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        lock(&self.server).is_some()
    }

    // ----- records -----

    /// Every request since the start or the last [`Proxy::reset`], in arrival order.
    pub fn requests(&self) -> Vec<RequestLog> {
        lock(&self.shared.records)
            .iter()
            .map(|record| record.snapshot())
            .collect()
    }

    /// Forgets recorded requests (faults stay). Requests in flight keep streaming but are no
    /// longer counted.
    pub fn reset(&self) {
        lock(&self.shared.records).clear();
    }

    /// How many requests had this method and a path for which `path_matches` holds.
    pub fn count(&self, method: &Method, path_matches: impl Fn(&str) -> bool) -> usize {
        lock(&self.shared.records)
            .iter()
            .filter(|record| record.method == *method && path_matches(&record.path))
            .count()
    }

    /// `GET /v2/<name>/blobs/<digest>` requests per digest, whatever their outcome.
    pub fn blob_gets(&self) -> HashMap<String, usize> {
        let mut gets = HashMap::new();
        for record in lock(&self.shared.records).iter() {
            if record.method == Method::GET
                && let Some(digest) = blob_digest(&record.path)
            {
                *gets.entry(digest.to_owned()).or_default() += 1;
            }
        }
        gets
    }

    /// `GET` requests for one blob.
    pub fn blob_get_count(&self, digest: &str) -> usize {
        self.count(&Method::GET, |path| blob_digest(path) == Some(digest))
    }

    /// Body bytes sent to clients for blob `GET`s: what the upstream link carried for blobs.
    pub fn bytes_served_for_blobs(&self) -> u64 {
        lock(&self.shared.records)
            .iter()
            .filter(|record| record.method == Method::GET && blob_digest(&record.path).is_some())
            .map(|record| record.body_bytes.load(Ordering::Acquire))
            .sum()
    }

    /// Polls until `condition` holds for the recorded requests, failing after `timeout`.
    /// Useful to act while a transfer is in flight, e.g. "once the first blob GET has started".
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        condition: impl Fn(&[RequestLog]) -> bool,
    ) -> Result<()> {
        crate::net::wait_until(timeout, what, || {
            let holds = condition(&self.requests());
            async move { holds }
        })
        .await
    }
}

fn parse_upstream(url: &str) -> Result<Uri> {
    let uri: Uri = url
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("parsing upstream url {url}"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        bail!("proxy upstream must be http://HOST:PORT, got {url}");
    }
    Ok(uri)
}

/// Accepts connections until told to shut down (then closes every connection before
/// returning) or aborted. Connections live in a `JoinSet` owned by this task, so aborting it
/// also drops every connection.
async fn serve(listener: TcpListener, shared: Arc<Shared>, mut shutdown: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                drop(listener);
                connections.shutdown().await;
                return;
            }
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Typically EMFILE; back off instead of spinning on the error.
                        tracing::warn!(?error, "proxy accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let shared = shared.clone();
                connections.spawn(async move {
                    let state = Arc::new(ConnState::default());
                    let io = ConnIo { stream, state: state.clone() };
                    let service =
                        service_fn(move |request| handle(shared.clone(), state.clone(), request));
                    let builder = auto::Builder::new(TokioExecutor::new());
                    if let Err(error) = builder.serve_connection(TokioIo::new(io), service).await {
                        // Clients hanging up mid-body and injected truncations end up here.
                        tracing::debug!(%peer, error = %error, "proxy connection ended with error");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Per-connection state shared by the connection's IO and its response bodies.
#[derive(Debug, Default)]
struct ConnState {
    /// Completed flushes of the socket. hyper flushes the socket only after its own write
    /// buffer is empty, so a flush that completes after a body started waiting means every
    /// byte that body handed over has reached the kernel.
    flushes: AtomicU64,
    flush_waiters: Mutex<Vec<Waker>>,
}

/// The TCP stream of one proxied connection, counting completed flushes.
struct ConnIo {
    stream: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.stream).poll_flush(cx))?;
        this.state.flushes.fetch_add(1, Ordering::AcqRel);
        for waker in lock(&this.state.flush_waiters).drain(..) {
            waker.wake();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// What faults to apply to one request.
#[derive(Debug, Default)]
struct Plan {
    status: Option<StatusCode>,
    delay: Duration,
    body: BodyFaults,
}

#[derive(Debug, Default, Clone)]
struct BodyFaults {
    corrupt: bool,
    stall_after: Option<u64>,
    truncate_after: Option<u64>,
    throttle: Option<u64>,
}

impl Shared {
    /// Collects every rule matching the request, using up counted rules.
    fn plan(&self, method: &Method, path: &str) -> (Plan, Vec<Fault>) {
        let reference = blob_digest(path).or_else(|| manifest_reference(path));
        let mut plan = Plan::default();
        let mut applied = Vec::new();
        let mut rules = lock(&self.rules);
        for rule in rules.iter_mut() {
            let matches = match &rule.target {
                Target::Everything => true,
                Target::Reference(target) => reference == Some(target.as_str()),
            };
            if !matches
                || rule.remaining == Some(0)
                || (rule.fault.is_body_fault() && method != Method::GET)
            {
                continue;
            }
            if let Some(remaining) = &mut rule.remaining {
                *remaining -= 1;
            }
            match &rule.fault {
                Fault::Status(status) => plan.status = plan.status.or(Some(*status)),
                Fault::Delay(delay) => plan.delay += *delay,
                Fault::Corrupt => plan.body.corrupt = true,
                Fault::StallAfter(n) => plan.body.stall_after = Some(*n),
                Fault::TruncateAfter(n) => plan.body.truncate_after = Some(*n),
                Fault::Throttle(rate) => plan.body.throttle = Some((*rate).max(1)),
            }
            applied.push(rule.fault.clone());
        }
        rules.retain(|rule| rule.remaining != Some(0));
        (plan, applied)
    }

    fn record(&self, request: &Request<Incoming>, faults: Vec<Fault>) -> Arc<RecordCell> {
        let record = Arc::new(RecordCell {
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            method: request.method().clone(),
            path: request.uri().path().to_owned(),
            query: request.uri().query().map(str::to_owned),
            range: request
                .headers()
                .get(header::RANGE)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned),
            headers: request.headers().clone(),
            faults,
            status: AtomicU16::new(0),
            body_bytes: AtomicU64::new(0),
            complete: AtomicBool::new(false),
        });
        lock(&self.records).push(record.clone());
        record
    }
}

async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnState>,
    mut request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let (plan, faults) = shared.plan(request.method(), request.uri().path());
    // HTTP/2 streams share the connection: a truncation resets the stream at once instead of
    // waiting for a flush of the whole connection.
    let conn = (request.version() < Version::HTTP_2).then_some(conn);
    let record = shared.record(&request, faults);
    tracing::debug!(method = %request.method(), uri = %request.uri(), "proxy request");

    if !plan.delay.is_zero() {
        tokio::time::sleep(plan.delay).await;
    }
    if let Some(status) = plan.status {
        return Ok(fixed_response(&shared, record, status, Bytes::new()));
    }

    let upstream = lock(&shared.upstream).clone();
    let path_and_query = request
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    // Keep the client's Host, so the registry builds upload Location URLs that point back at
    // the proxy. HTTP/2 clients send :authority instead; turn it into a Host header.
    if !request.headers().contains_key(header::HOST)
        && let Some(authority) = request.uri().authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        request.headers_mut().insert(header::HOST, host);
    }
    let uri = Uri::builder()
        .scheme("http")
        .authority(
            upstream
                .authority()
                .expect("parse_upstream checked the authority")
                .clone(),
        )
        .path_and_query(path_and_query)
        .build();
    let uri = match uri {
        Ok(uri) => uri,
        Err(error) => {
            let message = format!("shoal-tests proxy: bad upstream uri: {error}");
            return Ok(fixed_response(
                &shared,
                record,
                StatusCode::BAD_GATEWAY,
                message.into(),
            ));
        }
    };
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    strip_hop_by_hop(request.headers_mut());

    match shared.client.request(request).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            record.set_status(parts.status);
            strip_hop_by_hop(&mut parts.headers);
            let content_length = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse::<u64>().ok());
            let mut body = ProxyBody::new(
                Inner::Upstream(body),
                record,
                plan.body,
                content_length,
                shared.release.subscribe(),
            );
            body.conn = conn;
            Ok(Response::from_parts(parts, body))
        }
        Err(error) => {
            let message = format!("shoal-tests proxy: upstream request failed: {error:?}");
            tracing::debug!(%message);
            Ok(fixed_response(
                &shared,
                record,
                StatusCode::BAD_GATEWAY,
                message.into(),
            ))
        }
    }
}

fn fixed_response(
    shared: &Shared,
    record: Arc<RecordCell>,
    status: StatusCode,
    body: Bytes,
) -> Response<ProxyBody> {
    record.set_status(status);
    let length = body.len();
    let body = ProxyBody::new(
        Inner::Fixed(Some(body)),
        record,
        BodyFaults::default(),
        Some(length as u64),
        shared.release.subscribe(),
    );
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    response
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(HeaderName::from_static(name));
    }
}

enum Inner {
    Upstream(Incoming),
    Fixed(Option<Bytes>),
}

type Wait = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The response body the proxy sends: the upstream body (or a fixed one) with faults applied,
/// counting bytes into the request's record.
struct ProxyBody {
    inner: Inner,
    record: Arc<RecordCell>,
    faults: BodyFaults,
    /// Body offset at which to corrupt one byte.
    corrupt_at: Option<u64>,
    /// Bytes handed to the client so far.
    sent: u64,
    /// Data read from upstream but not yet sent (split off at a stall or throttle boundary).
    held: Option<Bytes>,
    /// A stall or throttle pause to finish before sending more.
    wait: Option<Wait>,
    release: watch::Receiver<u64>,
    /// The HTTP/1 connection, to abort only once the bytes before a truncation are flushed.
    conn: Option<Arc<ConnState>>,
    /// The connection's flush count when the truncation point was reached.
    truncating_since: Option<u64>,
}

impl ProxyBody {
    fn new(
        inner: Inner,
        record: Arc<RecordCell>,
        faults: BodyFaults,
        content_length: Option<u64>,
        release: watch::Receiver<u64>,
    ) -> Self {
        let corrupt_at = faults
            .corrupt
            .then(|| content_length.map_or(0, |length| length / 2));
        Self {
            inner,
            record,
            faults,
            corrupt_at,
            sent: 0,
            held: None,
            wait: None,
            release,
            conn: None,
            truncating_since: None,
        }
    }

    fn poll_data(
        &mut self,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if let Some(wait) = &mut self.wait {
            ready!(wait.as_mut().poll(cx));
            self.wait = None;
        }

        if let Some(limit) = self.faults.truncate_after
            && self.sent >= limit
        {
            // An error from the body makes hyper drop the connection at once, discarding what
            // it still buffers; so first wait until everything sent so far is flushed.
            if let Some(conn) = &self.conn {
                let flushes = conn.flushes.load(Ordering::Acquire);
                let since = *self.truncating_since.get_or_insert(flushes);
                if flushes == since {
                    lock(&conn.flush_waiters).push(cx.waker().clone());
                    // Re-check: a flush between the load and the registration would not wake us.
                    if conn.flushes.load(Ordering::Acquire) == since {
                        return Poll::Pending;
                    }
                }
            }
            tracing::debug!(path = %self.record.path, sent = self.sent, "proxy truncating body");
            return Poll::Ready(Some(Err(io::Error::other(
                "shoal-tests proxy: injected truncation",
            ))));
        }

        let mut data = match self.held.take() {
            Some(data) => data,
            None => match ready!(self.poll_inner(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(data) => data,
                    // Trailers pass through untouched.
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Some(Err(error)) => return Poll::Ready(Some(Err(io::Error::other(error)))),
                None => {
                    self.record.complete.store(true, Ordering::Release);
                    return Poll::Ready(None);
                }
            },
        };

        if let Some(limit) = self.faults.stall_after
            && self.sent >= limit
        {
            tracing::debug!(path = %self.record.path, sent = self.sent, "proxy stalling body");
            // Stall once: after a release the rest of the body flows.
            self.faults.stall_after = None;
            self.held = Some(data);
            let mut release = self.release.clone();
            release.mark_unchanged();
            let mut wait: Wait = Box::pin(async move {
                // An error means the proxy is gone; then the connection is going away too.
                let _ = release.changed().await;
            });
            // Poll once so the release registers this task's waker.
            if wait.as_mut().poll(cx).is_ready() {
                return self.poll_data(cx);
            }
            self.wait = Some(wait);
            return Poll::Pending;
        }

        // Cut the piece at the next boundary where a fault acts, and hold the rest back.
        let mut piece_len = data.len() as u64;
        for limit in [self.faults.stall_after, self.faults.truncate_after]
            .into_iter()
            .flatten()
        {
            if limit > self.sent {
                piece_len = piece_len.min(limit - self.sent);
            }
        }
        if self.faults.throttle.is_some() {
            piece_len = piece_len.min(THROTTLE_PIECE as u64);
        }
        if piece_len < data.len() as u64 {
            // piece_len < data.len() <= usize::MAX, so the cast is lossless.
            self.held = Some(data.split_off(piece_len as usize));
        }

        if let Some(at) = self.corrupt_at
            && at >= self.sent
            && at < self.sent + data.len() as u64
        {
            let mut bytes = BytesMut::from(&data[..]);
            bytes[(at - self.sent) as usize] ^= 0xff;
            data = bytes.freeze();
            self.corrupt_at = None;
        }

        if let Some(rate) = self.faults.throttle {
            let pause = Duration::from_secs_f64(data.len() as f64 / rate as f64);
            self.wait = Some(Box::pin(tokio::time::sleep(pause)));
        }

        self.sent += data.len() as u64;
        self.record
            .body_bytes
            .fetch_add(data.len() as u64, Ordering::AcqRel);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn poll_inner(
        &mut self,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.inner {
            Inner::Upstream(body) => Pin::new(body).poll_frame(cx),
            Inner::Fixed(data) => Poll::Ready(data.take().map(|data| Ok(Frame::data(data)))),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.get_mut().poll_data(cx)
    }

    fn is_end_stream(&self) -> bool {
        let inner_done = match &self.inner {
            Inner::Upstream(body) => body.is_end_stream(),
            Inner::Fixed(data) => data.is_none(),
        };
        // Mark empty bodies (HEAD, 204) complete here: hyper may never poll them.
        if inner_done && self.held.is_none() {
            self.record.complete.store(true, Ordering::Release);
        }
        inner_done && self.held.is_none() && self.wait.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            // The forwarded Content-Length header states the length; a hint from the upstream
            // body would be wrong once data is held back or truncated.
            Inner::Upstream(_) => SizeHint::default(),
            Inner::Fixed(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}
