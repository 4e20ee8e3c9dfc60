//! Coalescing: identical concurrent GETs for one blob or manifest digest become one upstream
//! request whose response is shared by every waiter.
//!
//! The first request starts a *flight*: a task that makes the upstream request and spools
//! the response body into an unlinked temporary file. A waiter that joined late reads that file
//! from byte 0 up to what has been written so far (the way the agent's `fetch.rs` streams an
//! ingest file), so nobody waits for the whole body and nobody misses its start. Waiters that
//! were there before the first byte (the one that started the flight, usually alone) get the
//! upstream frames handed over as they come instead, sparing them the spool round trip, for as
//! long as they keep up: one that falls `DIRECT_FRAMES` frames behind continues from the
//! spool where it got to. If the upstream body breaks, every waiter's body ends in an error and hyper aborts
//! its connection: a client never receives a truncated body that looks complete. When the
//! last waiter goes away the flight stops. A flight is forgotten as soon as it ends: the
//! coordinator shares in-flight requests, it does not cache.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use http::{HeaderMap, StatusCode};
use http_body::{Body as _, Frame};
use http_body_util::BodyExt;
use shoal_proto::{Digest, RepoName};
use tokio::sync::{mpsc, watch};

use super::ApiError;
use super::client::{Body, BoxError};
use crate::metrics::Metrics;

/// Bytes read from the spool per chunk sent to a client.
const READ_CHUNK: usize = 1 << 20;
/// Upstream bytes gathered before a write to the spool.
const WRITE_CHUNK: usize = 128 << 10;
/// Upstream frames queued for a direct waiter; one further behind reads the spool instead.
/// The queues share the frames, so a flight holds at most this many in memory.
const DIRECT_FRAMES: usize = 16;

/// What a flight hands its direct waiters.
enum Direct {
    Data(Bytes),
    /// The upstream body ended cleanly after the data sent before.
    End,
}

/// What a flight is for. Requests for the same digest in different repositories are not
/// merged: the registry decides per repository whether the blob is linked there.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FlightKey {
    pub pool: usize,
    pub repo: RepoName,
    pub digest: Digest,
    pub manifest: bool,
    /// HEADs share a flight of their own (a HEAD answer has no body to give a GET).
    pub head: bool,
    /// For manifests, the client's `Accept` as [`accept_key`] normalises it: a registry
    /// answers a manifest by digest according to it (an OCI manifest or index asked for
    /// without its media type accepted is a 404 from Distribution), so only requests that
    /// accept the same types may share an answer. `None` for blobs, whose bytes do not
    /// depend on it.
    pub accept: Option<String>,
}

/// The media ranges of every `Accept` header in `headers`, in order, each with its type
/// lowercased and the spaces around its parameters removed, joined by `,`. Equal keys come
/// only from requests a registry cannot tell apart by `Accept`; requests that differ in
/// spelling alone (case, spaces, one header or several) share a key. Order and parameters
/// (`q=`) are kept, since a registry may use them to choose.
pub fn accept_key(headers: &HeaderMap) -> String {
    let mut ranges: Vec<String> = Vec::new();
    for value in headers.get_all(http::header::ACCEPT) {
        let text = String::from_utf8_lossy(value.as_bytes());
        for range in text.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let params: Vec<&str> = parts.filter(|p| !p.is_empty()).collect();
            if media.is_empty() && params.is_empty() {
                continue;
            }
            let mut range = media;
            for p in params {
                range.push(';');
                range.push_str(p);
            }
            ranges.push(range);
        }
    }
    ranges.join(",")
}

/// The status and headers of the shared upstream response.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// Label of the replica (or storage) that answered, for logs and metrics.
    pub upstream: String,
    /// The replica's URL, for rewriting `Location`.
    pub replica_url: Option<url::Url>,
}

/// What the flight's starter returns: the upstream head and body.
pub struct Upstreamed {
    pub head: Head,
    pub body: Body,
}

#[derive(Clone)]
enum Phase {
    Connecting,
    Streaming,
    Done,
    Failed(Arc<str>),
}

#[derive(Clone)]
struct Progress {
    phase: Phase,
    head: Option<Result<Arc<Head>, ApiError>>,
    written: u64,
    file: Option<Arc<File>>,
}

struct Flight {
    tx: watch::Sender<Progress>,
    /// Channels of the waiters that joined before the first byte; `None` once the flight has
    /// taken them.
    direct: Mutex<Option<Vec<mpsc::Sender<Direct>>>>,
}

impl Flight {
    /// A direct channel for a new waiter, if no byte has gone out yet.
    fn direct_waiter(&self) -> Option<mpsc::Receiver<Direct>> {
        let mut direct = self.direct.lock().unwrap_or_else(PoisonError::into_inner);
        let senders = direct.as_mut()?;
        let (tx, rx) = mpsc::channel(DIRECT_FRAMES);
        senders.push(tx);
        Some(rx)
    }

    /// Closes the list of direct waiters and returns it.
    fn take_direct(&self) -> Vec<mpsc::Sender<Direct>> {
        self.direct
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_default()
    }
}

/// The in-flight map.
pub struct Coalescer {
    flights: Mutex<HashMap<FlightKey, Arc<Flight>>>,
    spool_dir: PathBuf,
    metrics: Metrics,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("in_flight", &self.lock().len())
            .finish_non_exhaustive()
    }
}

impl Coalescer {
    pub fn new(spool_dir: PathBuf, metrics: Metrics) -> Arc<Coalescer> {
        Arc::new(Coalescer {
            flights: Mutex::new(HashMap::new()),
            spool_dir,
            metrics,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<FlightKey, Arc<Flight>>> {
        // Every update is one insert or remove; the map is consistent after a panic.
        self.flights.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn in_flight(&self) -> usize {
        self.lock().len()
    }

    /// Joins the flight for `key`, or starts one with `start`. Returns the subscription and
    /// whether an existing flight was joined.
    pub fn join(
        self: &Arc<Self>,
        key: FlightKey,
        start: impl FnOnce() -> BoxFuture<'static, Result<Upstreamed, ApiError>>,
    ) -> (Subscription, bool) {
        let mut flights = self.lock();
        // A flight that already failed is about to leave the map; start afresh rather than
        // inherit its failure.
        if let Some(f) = flights.get(&key)
            && !matches!(f.tx.borrow().phase, Phase::Failed(_))
        {
            self.metrics.coalesced();
            return (
                Subscription {
                    rx: f.tx.subscribe(),
                    direct: f.direct_waiter(),
                },
                true,
            );
        }
        let (tx, rx) = watch::channel(Progress {
            phase: Phase::Connecting,
            head: None,
            written: 0,
            file: None,
        });
        let (direct_tx, direct_rx) = mpsc::channel(DIRECT_FRAMES);
        let flight = Arc::new(Flight {
            tx,
            direct: Mutex::new(Some(vec![direct_tx])),
        });
        flights.insert(key.clone(), Arc::clone(&flight));
        drop(flights);
        self.metrics.flight();
        let this = Arc::clone(self);
        let fut = start();
        tokio::spawn(async move {
            let outcome = this.fly(&flight, fut).await;
            if let Err(reason) = outcome {
                tracing::debug!(digest = %key.digest, %reason, "coalesced request ended early");
                flight.tx.send_modify(|p| {
                    if p.head.is_none() {
                        p.head = Some(Err(ApiError::upstream(reason.to_string())));
                    }
                    p.phase = Phase::Failed(reason);
                });
            }
            let mut flights = this.lock();
            if flights.get(&key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
                flights.remove(&key);
            }
        });
        (
            Subscription {
                rx,
                direct: Some(direct_rx),
            },
            false,
        )
    }

    /// Runs one flight. `Err` carries the reason every waiter's body fails with.
    async fn fly(
        self: &Arc<Self>,
        flight: &Arc<Flight>,
        fut: BoxFuture<'static, Result<Upstreamed, ApiError>>,
    ) -> Result<(), Arc<str>> {
        let up = match fut.await {
            Ok(up) => up,
            Err(e) => {
                flight.tx.send_modify(|p| p.head = Some(Err(e)));
                return Err("upstream request failed".into());
            }
        };
        if up.body.is_end_stream() {
            // A HEAD's answer (or an empty body): nothing to spool.
            for d in flight.take_direct() {
                let _ = d.try_send(Direct::End);
            }
            flight.tx.send_modify(|p| {
                p.head = Some(Ok(Arc::new(up.head)));
                p.phase = Phase::Done;
            });
            return Ok(());
        }
        let dir = self.spool_dir.clone();
        let file = tokio::task::spawn_blocking(move || tempfile::tempfile_in(dir))
            .await
            .map_err(|e| Arc::<str>::from(format!("spool task: {e}")))?
            .map_err(|e| {
                tracing::warn!(dir = %self.spool_dir.display(), error = %e, "cannot create a spool file");
                Arc::<str>::from(format!("cannot create a spool file: {e}"))
            })?;
        let file = Arc::new(file);
        flight.tx.send_modify(|p| {
            p.phase = Phase::Streaming;
            p.head = Some(Ok(Arc::new(up.head)));
            p.file = Some(Arc::clone(&file));
        });

        // Spool writes run on a blocking thread behind a bounded channel, so a slow disk
        // pushes back on the upstream connection instead of buffering without limit.
        let (chunks_tx, mut chunks_rx) = mpsc::channel::<Bytes>(8);
        let progress = flight.tx.clone();
        let writer_file = Arc::clone(&file);
        let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut offset = 0u64;
            while let Some(chunk) = chunks_rx.blocking_recv() {
                writer_file.write_all_at(&chunk, offset)?;
                offset += chunk.len() as u64;
                progress.send_modify(|p| p.written = offset);
            }
            Ok(())
        });

        // Direct waiters get each frame as it comes; one whose queue is full (or that went
        // away) is dropped from the list and, if still there, continues from the spool.
        let mut direct: Option<Vec<mpsc::Sender<Direct>>> = None;
        let mut body = up.body;
        let mut buf = BytesMut::new();
        let mut failure: Option<Arc<str>> = None;
        loop {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        direct
                            .get_or_insert_with(|| flight.take_direct())
                            .retain(|d| d.try_send(Direct::Data(data.clone())).is_ok());
                        buf.extend_from_slice(&data);
                    }
                    if buf.len() >= WRITE_CHUNK {
                        if chunks_tx.send(buf.split().freeze()).await.is_err() {
                            break;
                        }
                        if self.abandoned(flight) {
                            failure = Some("every client went away".into());
                            break;
                        }
                    }
                }
                Some(Err(e)) => {
                    failure = Some(format!("upstream body failed: {e}").into());
                    break;
                }
            }
        }
        let direct = direct.unwrap_or_else(|| flight.take_direct());
        if failure.is_none() {
            for d in &direct {
                let _ = d.try_send(Direct::End);
            }
            if !buf.is_empty() {
                let _ = chunks_tx.send(buf.freeze()).await;
            }
        }
        // After a failure the direct channels close without `End`: those waiters turn to the
        // spool, which reports the failure.
        drop(direct);
        drop(chunks_tx);
        match writer.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("spool write failed: {e}").into()),
            Err(e) => return Err(format!("spool task: {e}").into()),
        }
        if let Some(f) = failure {
            return Err(f);
        }
        flight.tx.send_modify(|p| p.phase = Phase::Done);
        Ok(())
    }

    /// Whether nobody waits for the flight any more; if so it leaves the map, so that a new
    /// request starts afresh instead of joining a flight that is about to stop.
    fn abandoned(&self, flight: &Arc<Flight>) -> bool {
        let mut flights = self.lock();
        if flight.tx.receiver_count() > 0 {
            return false;
        }
        flights.retain(|_, f| !Arc::ptr_eq(f, flight));
        true
    }
}

/// One waiter of a flight.
pub struct Subscription {
    rx: watch::Receiver<Progress>,
    /// The flight's frames as they come, for a waiter that joined before the first byte.
    direct: Option<mpsc::Receiver<Direct>>,
}

impl Subscription {
    /// Waits for the upstream response head.
    pub async fn head(&mut self) -> Result<Arc<Head>, ApiError> {
        loop {
            if let Some(head) = self.rx.borrow_and_update().head.clone() {
                return head;
            }
            if self.rx.changed().await.is_err() {
                return Err(ApiError::internal("coalesced request vanished"));
            }
        }
    }

    /// The response body: the flight's frames as they come while this waiter has a direct
    /// channel, then (or from the start, for a late joiner) read from the spool as it is
    /// written, from where the waiter got to.
    pub fn into_body(self) -> Body {
        let state = (self.rx, self.direct, 0u64);
        let stream = futures::stream::try_unfold(state, |(mut rx, direct, pos)| async move {
            if let Some(mut d) = direct {
                match d.recv().await {
                    Some(Direct::Data(data)) => {
                        let next = pos + data.len() as u64;
                        return Ok(Some((Frame::data(data), (rx, Some(d), next))));
                    }
                    Some(Direct::End) => return Ok(None),
                    // Left behind, or the upstream body failed: the spool knows which.
                    None => {}
                }
            }
            loop {
                let (phase, written, file) = {
                    let p = rx.borrow_and_update();
                    (p.phase.clone(), p.written, p.file.clone())
                };
                if let Phase::Failed(reason) = &phase {
                    return Err(BoxError::from(format!(
                        "shared upstream response failed: {reason}"
                    )));
                }
                if pos < written
                    && let Some(file) = file
                {
                    let len = (written - pos).min(READ_CHUNK as u64) as usize;
                    let chunk = read_at(file, pos, len).await?;
                    let next = pos + chunk.len() as u64;
                    return Ok(Some((Frame::data(chunk), (rx, None, next))));
                }
                if matches!(phase, Phase::Done) {
                    return Ok(None);
                }
                if rx.changed().await.is_err() {
                    return Err(BoxError::from("coalesced request vanished"));
                }
            }
        });
        http_body_util::StreamBody::new(stream).boxed_unsync()
    }
}

async fn read_at(file: Arc<File>, offset: u64, len: usize) -> Result<Bytes, BoxError> {
    let r = tokio::task::spawn_blocking(move || {
        let mut buf = BytesMut::zeroed(len);
        file.read_exact_at(&mut buf, offset)?;
        Ok::<_, std::io::Error>(buf.freeze())
    })
    .await;
    match r {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => Err(Box::new(e)),
        Err(e) => Err(Box::new(e)),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::FutureExt;
    use http_body_util::StreamBody;

    use super::*;

    fn key() -> FlightKey {
        FlightKey {
            pool: 0,
            repo: RepoName::parse("a/b").unwrap(),
            digest: Digest::sha256_of(b"x"),
            manifest: false,
            head: false,
            accept: None,
        }
    }

    #[test]
    fn accept_keys_ignore_spelling_but_not_content() {
        let key = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(http::header::ACCEPT, v.parse().unwrap());
            }
            accept_key(&h)
        };
        let oci = "application/vnd.oci.image.manifest.v1+json";
        let docker = "application/vnd.docker.distribution.manifest.v2+json";
        assert_eq!(key(&[]), "");
        assert_eq!(key(&[oci]), oci);
        assert_eq!(
            key(&[&format!("{oci}, {docker}")]),
            key(&[oci, &format!(" {} ", docker.to_ascii_uppercase())])
        );
        assert_eq!(key(&[&format!("{oci} ; q=0.5,,")]), format!("{oci};q=0.5"));
        assert_ne!(key(&[oci]), key(&[docker]));
        assert_ne!(key(&[oci]), key(&[]));
        assert_ne!(key(&[oci, docker]), key(&[oci]));
        assert_ne!(key(&[&format!("{oci};q=0.1")]), key(&[oci]));
    }

    type Sender = futures::channel::mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

    /// A starter whose body is fed by the returned sender; counts how often it ran.
    fn starter(
        calls: &Arc<std::sync::atomic::AtomicUsize>,
    ) -> (
        impl FnOnce() -> BoxFuture<'static, Result<Upstreamed, ApiError>> + use<>,
        Sender,
    ) {
        let (tx, rx) = futures::channel::mpsc::channel(16);
        let calls = Arc::clone(calls);
        let start = move || {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                Ok(Upstreamed {
                    head: Head {
                        status: StatusCode::OK,
                        headers: HeaderMap::new(),
                        upstream: "r1".into(),
                        replica_url: None,
                    },
                    body: StreamBody::new(rx).boxed_unsync(),
                })
            }
            .boxed()
        };
        (start, tx)
    }

    async fn collect(body: Body) -> Result<Vec<u8>, BoxError> {
        Ok(body.collect().await?.to_bytes().to_vec())
    }

    #[tokio::test]
    async fn waiters_share_one_request_and_late_joiners_get_every_byte() {
        use futures::SinkExt;
        let c = Coalescer::new(std::env::temp_dir(), Metrics::new());
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (start, mut tx) = starter(&calls);
        let (mut first, shared) = c.join(key(), start);
        assert!(!shared);
        let head = first.head().await.unwrap();
        assert_eq!(head.status, StatusCode::OK);
        let first = tokio::spawn(collect(first.into_body()));

        let big = vec![7u8; 300 << 10];
        tx.send(Ok(Frame::data(Bytes::from(big.clone()))))
            .await
            .unwrap();
        // Join once the first bytes are spooled: the joiner must still get them.
        let (unused, _) = starter(&calls);
        let (mut late, shared) = c.join(key(), unused);
        assert!(shared);
        late.head().await.unwrap();
        let late = tokio::spawn(collect(late.into_body()));
        tx.send(Ok(Frame::data(Bytes::from_static(b"tail"))))
            .await
            .unwrap();
        drop(tx);

        let mut want = big;
        want.extend_from_slice(b"tail");
        assert_eq!(first.await.unwrap().unwrap(), want);
        assert_eq!(late.await.unwrap().unwrap(), want);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        // The flight is forgotten once done.
        tokio::time::timeout(Duration::from_secs(5), async {
            while c.in_flight() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn waiters_from_before_the_first_byte_get_frames_before_they_are_spooled() {
        use futures::SinkExt;
        let c = Coalescer::new(std::env::temp_dir(), Metrics::new());
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (start, mut tx) = starter(&calls);
        let (mut first, _) = c.join(key(), start);
        let (unused, _) = starter(&calls);
        let (mut second, shared) = c.join(key(), unused);
        assert!(shared);
        first.head().await.unwrap();
        second.head().await.unwrap();
        let mut bodies = [first.into_body(), second.into_body()];
        // Far below WRITE_CHUNK: nothing reaches the spool before the body ends, so these
        // bytes can only have come straight from the flight.
        tx.send(Ok(Frame::data(Bytes::from_static(b"abc"))))
            .await
            .unwrap();
        for body in &mut bodies {
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .expect("a direct waiter gets the frame while upstream is still open")
                .unwrap()
                .unwrap();
            assert_eq!(frame.into_data().unwrap(), "abc");
        }
        tx.send(Ok(Frame::data(Bytes::from_static(b"def"))))
            .await
            .unwrap();
        drop(tx);
        for body in bodies {
            assert_eq!(collect(body).await.unwrap(), b"def");
        }
    }

    #[tokio::test]
    async fn a_waiter_that_falls_behind_continues_from_the_spool() {
        use futures::SinkExt;
        let c = Coalescer::new(std::env::temp_dir(), Metrics::new());
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (start, mut tx) = starter(&calls);
        let (mut first, _) = c.join(key(), start);
        first.head().await.unwrap();
        let body = first.into_body();
        // Nobody reads while four times the direct queue's worth of frames go by: the flight
        // must not wait for this waiter.
        let mut want = Vec::new();
        let feed = async {
            for i in 0..4 * DIRECT_FRAMES {
                let frame = vec![i as u8; 1000 + i];
                want.extend_from_slice(&frame);
                tx.send(Ok(Frame::data(Bytes::from(frame)))).await.unwrap();
            }
            drop(tx);
        };
        tokio::time::timeout(Duration::from_secs(10), feed)
            .await
            .expect("the flight went on without the waiter");
        let got = tokio::time::timeout(Duration::from_secs(10), collect(body))
            .await
            .expect("the waiter caught up from the spool");
        assert_eq!(got.unwrap(), want);
    }

    #[tokio::test]
    async fn a_broken_upstream_body_aborts_every_waiter() {
        use futures::SinkExt;
        let c = Coalescer::new(std::env::temp_dir(), Metrics::new());
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (start, mut tx) = starter(&calls);
        let (mut a, _) = c.join(key(), start);
        let (unused, _) = starter(&calls);
        let (mut b, _) = c.join(key(), unused);
        a.head().await.unwrap();
        b.head().await.unwrap();
        let a = tokio::spawn(collect(a.into_body()));
        let b = tokio::spawn(collect(b.into_body()));
        tx.send(Ok(Frame::data(Bytes::from_static(b"partial"))))
            .await
            .unwrap();
        tx.send(Err("connection reset".into())).await.unwrap();
        assert!(a.await.unwrap().is_err());
        assert!(b.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn an_upstream_error_reaches_every_waiter() {
        let c = Coalescer::new(std::env::temp_dir(), Metrics::new());
        let (mut a, _) = c.join(key(), || {
            async { Err(ApiError::upstream("no replica answered".into())) }.boxed()
        });
        let err = a.head().await.unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_GATEWAY);
    }
}
