//! Accept loops: TLS (HTTP/1.1 or HTTP/2 by ALPN) and the optional plain HTTP listener, the
//! hyper connection limits, graceful draining on shutdown, and the metrics endpoint.

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::client;
use super::h1guard::{Guarded, Tracker};
use super::{ConnInfo, Gateway};
use crate::config::ServerConfig;
use crate::metrics::Metrics;

/// hyper's default HTTP/1 read buffer; raised only when the header limit needs more.
const DEFAULT_MAX_BUF: usize = 8192 + 4096 * 100;
/// Concurrent HTTP/2 streams per connection.
const MAX_H2_STREAMS: u32 = 256;

/// Connection settings shared by the listeners.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub tls_handshake_timeout: Duration,
}

impl From<&ServerConfig> for Limits {
    fn from(s: &ServerConfig) -> Limits {
        Limits {
            max_header_bytes: s.max_header_bytes,
            max_headers: s.max_headers,
            header_read_timeout: s.header_read_timeout,
            tls_handshake_timeout: s.tls_handshake_timeout,
        }
    }
}

fn http1(limits: &Limits) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(DEFAULT_MAX_BUF.max(limits.max_header_bytes + 8192))
        .max_headers(limits.max_headers)
        .keep_alive(true);
    b
}

fn http2(limits: &Limits) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(MAX_H2_STREAMS)
        // Window sizes follow the bandwidth-delay product, or 64 KiB windows cap uploads.
        .adaptive_window(true)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// How a listener's connections start.
#[derive(Clone)]
pub enum Transport {
    Tls(TlsAcceptor),
    /// Plain HTTP/1.1 (`insecure_http_listen`).
    Plain,
}

/// Serves `listeners` until `shutdown` resolves, then stops accepting and lets in-flight
/// requests finish for up to `drain`; whatever is still running after that is aborted (an
/// unfinished body is an aborted transfer, never a short one).
pub async fn serve(
    listeners: Vec<(TcpListener, Transport)>,
    gateway: Arc<Gateway>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    let (abort_tx, abort_rx) = watch::channel(false);
    {
        let loops = listeners.into_iter().map(|(listener, transport)| {
            accept_loop(
                listener,
                transport,
                Arc::clone(&gateway),
                limits.clone(),
                &graceful,
                abort_rx.clone(),
            )
        });
        tokio::select! {
            _ = futures::future::join_all(loops) => {}
            () = shutdown => {}
        }
    }
    info!("stopped accepting; draining in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => info!("all connections drained"),
        () = tokio::time::sleep(drain) => {
            warn!(drain_s = drain.as_secs(), "drain timeout: aborting remaining connections");
            let _ = abort_tx.send(true);
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    transport: Transport,
    gateway: Arc<Gateway>,
    limits: Limits,
    graceful: &GracefulShutdown,
    abort: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        let gateway = Arc::clone(&gateway);
        let limits = limits.clone();
        let transport = transport.clone();
        let mut abort = abort.clone();
        tokio::spawn(async move {
            let conn = connection(stream, peer, transport, gateway, limits, watcher);
            tokio::select! {
                () = conn => {}
                _ = abort.wait_for(|a| *a) => debug!(%peer, "connection aborted at the end of the drain"),
            }
        });
    }
}

async fn connection(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    transport: Transport,
    gateway: Arc<Gateway>,
    limits: Limits,
    watcher: Watcher,
) {
    match transport {
        Transport::Plain => {
            let info = ConnInfo {
                peer,
                tls: false,
                guard: None,
            };
            serve_io(stream, false, info, gateway, &limits, watcher).await;
        }
        Transport::Tls(acceptor) => {
            let tls =
                match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let info = ConnInfo {
                peer,
                tls: true,
                guard: None,
            };
            serve_io(tls, h2, info, gateway, &limits, watcher).await;
        }
    }
}

async fn serve_io<IO>(
    io: IO,
    h2: bool,
    mut info: ConnInfo,
    gateway: Arc<Gateway>,
    limits: &Limits,
    watcher: Watcher,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = info.peer;
    let result = if h2 {
        let info = Arc::new(info);
        let svc = service_fn(move |req: Request<Incoming>| {
            let gateway = Arc::clone(&gateway);
            let info = Arc::clone(&info);
            async move { Ok::<_, Infallible>(gateway.handle(req, &info).await) }
        });
        watcher
            .watch(http2(limits).serve_connection(TokioIo::new(io), svc))
            .await
    } else {
        // The tracker may look a little past hyper's limit, so it never gives up first.
        let tracker = Arc::new(Mutex::new(Tracker::new(limits.max_header_bytes + 1024)));
        info.guard = Some(Arc::clone(&tracker));
        let info = Arc::new(info);
        let svc = service_fn(move |req: Request<Incoming>| {
            let gateway = Arc::clone(&gateway);
            let info = Arc::clone(&info);
            async move { Ok::<_, Infallible>(gateway.handle(req, &info).await) }
        });
        let io = Guarded::new(io, tracker);
        watcher
            .watch(http1(limits).serve_connection(TokioIo::new(io), svc))
            .await
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Serves `GET /metrics` (OpenMetrics text) and `GET /healthz` until `shutdown` resolves.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let metrics = metrics.clone();
                let svc = service_fn(move |req: Request<Incoming>| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(metrics_response(&req, &metrics)) }
                });
                let limits = Limits {
                    max_header_bytes: 16 * 1024,
                    max_headers: 64,
                    header_read_timeout: Duration::from_secs(10),
                    tls_handshake_timeout: Duration::from_secs(10),
                };
                tokio::spawn(async move {
                    let _ = http1(&limits).serve_connection(TokioIo::new(stream), svc).await;
                });
            }
            () = &mut shutdown => break,
        }
    }
}

fn metrics_response(req: &Request<Incoming>, metrics: &Metrics) -> Response<client::Body> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(client::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static(ctype));
    resp
}
