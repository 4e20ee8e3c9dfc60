//! The HTTP client towards upstream replicas (and object storage when redirects are
//! followed), a connect timeout that includes the TLS handshake, the body types the gateway
//! moves around, and a no-progress timeout for bodies.

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{HttpConnector, capture_connection};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::time::{Instant, Sleep};

/// Errors inside bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the gateway sends or forwards.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;
/// The client to replicas and storage.
pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientError(pub String);

/// The system's trust anchors, read once per process.
fn native_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let loaded = rustls_native_certs::load_native_certs();
        for err in &loaded.errors {
            tracing::warn!(error = %err, "could not load some system root certificates");
        }
        loaded.certs
    })
}

/// rustls client configuration: system roots plus the certificates of `ca_file`, the
/// workspace's ring provider. (ALPN is left to the connector, which offers h2 and http/1.1.)
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = RootCertStore::empty();
    let _ = roots.add_parsable_certificates(native_roots().iter().cloned());
    if let Some(path) = ca_file {
        let shown = path.display();
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| ClientError(format!("cannot read CA file {shown}: {e}")))?;
        let mut added = 0usize;
        for cert in certs {
            let cert = cert.map_err(|e| ClientError(format!("bad PEM in CA file {shown}: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| ClientError(format!("bad certificate in CA file {shown}: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(ClientError(format!(
                "CA file {shown} holds no PEM certificate"
            )));
        }
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A pooled client. `allow_http` permits plain `http://` targets; https certificates are
/// verified regardless.
pub fn build_client(
    ca_file: Option<&Path>,
    connect_timeout: Duration,
    allow_http: bool,
) -> Result<HttpClient, ClientError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(30)));
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls_config(ca_file)?);
    let connector = if allow_http {
        builder.https_or_http()
    } else {
        builder.https_only()
    }
    .enable_http1()
    .enable_http2()
    .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .http2_adaptive_window(true)
        .build(connector))
}

/// Why [`request`] got no response.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No connection was ready within the connect timeout: TCP connect, TLS handshake and
    /// HTTP handshake together. Nothing was sent, so the request may go elsewhere.
    #[error("no connection within {0:?} (TCP connect and TLS handshake)")]
    NotConnected(Duration),
    #[error(transparent)]
    Client(#[from] hyper_util::client::legacy::Error),
}

impl RequestError {
    /// Whether the request never reached the server.
    pub fn is_connect(&self) -> bool {
        match self {
            RequestError::NotConnected(_) => true,
            RequestError::Client(e) => e.is_connect(),
        }
    }
}

/// Sends `req` on `client`, giving up when no connection is ready within `connect_timeout`.
///
/// The connector's own timeout covers the TCP connect only: a server that accepts and then
/// never completes the TLS handshake would hold the request forever. A connection taken from
/// the pool is ready at once; after that the caller's own timeouts apply. (A new connection
/// abandoned here is dropped with the request, unless the client had already handed it to a
/// background task because an idle pooled connection won the race: that one ends when the
/// server closes it.)
pub async fn request(
    client: &HttpClient,
    mut req: Request<Body>,
    connect_timeout: Duration,
) -> Result<Response<Incoming>, RequestError> {
    let mut captured = capture_connection(&mut req);
    let response = client.request(req);
    tokio::pin!(response);
    let connected = async {
        // `Err` only when the timeout passed; a request that failed before connecting drops
        // its end of the channel, and then `response` holds the error.
        tokio::time::timeout(connect_timeout, captured.wait_for_connection_metadata())
            .await
            .is_ok()
    };
    tokio::select! {
        biased;
        r = &mut response => return r.map_err(RequestError::from),
        ok = connected => {
            if !ok {
                return Err(RequestError::NotConnected(connect_timeout));
            }
        }
    }
    response.await.map_err(RequestError::from)
}

/// A body that fails when no frame arrives for `idle`: a stalled peer is abandoned (and the
/// transfer aborted) instead of holding a connection forever.
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> IdleTimeout<B> {
        IdleTimeout {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

/// The error a stalled body ends with.
#[derive(Debug, thiserror::Error)]
#[error("no data for {0:?}")]
pub struct Stalled(pub Duration);

impl<B> HttpBody for IdleTimeout<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(item) => {
                this.timer.as_mut().reset(Instant::now() + this.idle);
                Poll::Ready(item.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                ready!(this.timer.as_mut().poll(cx));
                Poll::Ready(Some(Err(Box::new(Stalled(this.idle)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a client's request body failed while it was being forwarded. A client's fault, never
/// the replica's: the upstream request is aborted (hyper closes its connection without the
/// last chunk), so the replica never sees a complete body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientBodyFault {
    /// Framing hyper could not decode (a bad chunk size or chunk delimiter).
    Malformed,
    /// No data for this long.
    Stalled(Duration),
    /// The client closed or reset its connection mid-body.
    Gone,
}

impl ClientBodyFault {
    /// Tells the faults apart by the error's chain: hyper reports decoding errors as
    /// `InvalidInput`/`InvalidData` IO errors, an early end as `UnexpectedEof` or an
    /// incomplete message.
    pub fn of(error: &(dyn std::error::Error + 'static)) -> ClientBodyFault {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(s) = e.downcast_ref::<Stalled>() {
                return ClientBodyFault::Stalled(s.0);
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && matches!(
                    io.kind(),
                    std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
                )
            {
                return ClientBodyFault::Malformed;
            }
            next = e.source();
        }
        ClientBodyFault::Gone
    }
}

/// A client's request body on its way upstream that remembers why it failed, if it does, so
/// that the failed upstream request is put down to the client rather than the replica.
pub struct ClientBody<B> {
    inner: B,
    fault: Arc<OnceLock<ClientBodyFault>>,
}

impl<B> ClientBody<B> {
    pub fn new(inner: B, fault: Arc<OnceLock<ClientBodyFault>>) -> ClientBody<B> {
        ClientBody { inner, fault }
    }
}

impl<B> HttpBody for ClientBody<B>
where
    B: HttpBody<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(e))) = &r {
            let _ = this.fault.set(ClientBodyFault::of(e.as_ref()));
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body that runs `on_end` once, when it is dropped, with the bytes that went through and
/// whether it reached its end.
pub struct Observed<B> {
    inner: B,
    bytes: u64,
    complete: bool,
    on_end: Option<Box<dyn FnOnce(u64, bool) + Send>>,
}

impl<B: HttpBody> Observed<B> {
    pub fn new(inner: B, on_end: impl FnOnce(u64, bool) + Send + 'static) -> Observed<B> {
        Observed {
            inner,
            bytes: 0,
            complete: false,
            on_end: Some(Box::new(on_end)),
        }
    }
}

impl<B> HttpBody for Observed<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => this.complete = true,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(self.bytes, self.complete);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_fires_only_without_progress() {
        let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let body = http_body_util::StreamBody::new(rx);
        let mut body = IdleTimeout::new(body, Duration::from_secs(10));
        let sender = tokio::spawn(async move {
            use futures::SinkExt;
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(8)).await;
                tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
                    .await
                    .unwrap();
            }
            // Then stall while keeping the sender alive.
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(tx);
        });
        for _ in 0..3 {
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "x");
        }
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<Stalled>(), "{err}");
        sender.abort();
    }

    #[tokio::test]
    async fn client_body_faults_are_told_apart_and_remembered() {
        let io = |kind| -> BoxError { Box::new(std::io::Error::new(kind, "x")) };
        assert_eq!(
            ClientBodyFault::of(io(std::io::ErrorKind::InvalidInput).as_ref()),
            ClientBodyFault::Malformed
        );
        assert_eq!(
            ClientBodyFault::of(io(std::io::ErrorKind::UnexpectedEof).as_ref()),
            ClientBodyFault::Gone
        );
        let stalled: BoxError = Box::new(Stalled(Duration::from_secs(3)));
        assert_eq!(
            ClientBodyFault::of(stalled.as_ref()),
            ClientBodyFault::Stalled(Duration::from_secs(3))
        );

        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ok"))),
            Err(io(std::io::ErrorKind::InvalidData)),
        ];
        let fault = Arc::new(OnceLock::new());
        let mut body = ClientBody::new(
            http_body_util::StreamBody::new(futures::stream::iter(frames)),
            Arc::clone(&fault),
        );
        assert!(body.frame().await.unwrap().is_ok());
        assert_eq!(fault.get(), None);
        assert!(body.frame().await.unwrap().is_err());
        assert_eq!(fault.get(), Some(&ClientBodyFault::Malformed));
    }

    #[test]
    fn clients_build_with_and_without_plain_http() {
        build_client(None, Duration::from_secs(1), true).unwrap();
        build_client(None, Duration::from_secs(1), false).unwrap();
    }

    #[test]
    fn ca_file_errors_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.crt");
        std::fs::write(&empty, "nothing here\n").unwrap();
        let err = tls_config(Some(&empty)).unwrap_err();
        assert!(err.0.contains("no PEM certificate"), "{err}");
        assert!(tls_config(Some(&dir.path().join("missing"))).is_err());
        assert!(tls_config(None).is_ok());
    }
}
