//! Single-flight blob downloads: one upstream download per digest however many clients ask,
//! every client streaming the bytes as they land on disk.
//!
//! A download writes into the store's ingest file; clients read that file (through a shared
//! read handle) up to what has been written. With a cluster, the download goes through the
//! swarm ([`Peer::download`](crate::peer::Peer)): pieces arrive out of order and are written
//! at their offsets, and clients read the contiguous verified prefix, exactly as they read an
//! append-only download; without one (or when no coordinator answers) it reads the origin. The last byte of the blob is held back until the
//! whole blob has matched its digest and been committed, so a client can never receive a
//! complete-looking blob with wrong content: on a mismatch every client's body ends in an error,
//! which makes hyper abort the connection, and nothing is stored.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use shoal_proto::{Digest, RepoName};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, warn};

use crate::metrics::Metrics;
use crate::peer::{Peer, Shaping, SwarmOutcome};
use crate::store::{Store, StoreError};
use crate::upstream::{Upstream, UpstreamError};

/// Bytes read from disk per chunk sent to a client.
pub(crate) const READ_CHUNK: usize = 1 << 20;
/// Upstream bytes gathered before a write to disk (fewer syscalls and wake-ups).
const WRITE_CHUNK: usize = 256 << 10;

/// Why a download failed. Shared by every client of the download.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("upstream sent {got} bytes for {digest}, but announced {want}")]
    ShortBody { digest: Digest, got: u64, want: u64 },
    #[error("download task failed: {0}")]
    Internal(String),
}

impl FetchError {
    /// Whether the upstream content failed verification (as opposed to a transport problem).
    pub fn is_verification_failure(&self) -> bool {
        matches!(
            self,
            FetchError::Store(StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. })
        )
    }
}

#[derive(Clone)]
enum Phase {
    /// Waiting for upstream's response headers.
    Connecting,
    /// Bytes are arriving.
    Streaming,
    /// Verified and committed to the store.
    Done,
    Failed(Arc<FetchError>),
}

/// What clients of a download can see.
#[derive(Clone)]
struct Progress {
    phase: Phase,
    /// Total blob size, once upstream told.
    size: Option<u64>,
    /// Bytes of the blob present in the ingest file, from offset 0.
    written: u64,
    /// Read handle on the ingest file (stays valid after the file is renamed into `blobs/`).
    file: Option<Arc<ReadHandle>>,
}

impl Progress {
    /// How far a client may read: everything once committed, otherwise all but the last byte
    /// written (so a blob is never complete before it is verified).
    fn readable(&self) -> u64 {
        match self.phase {
            Phase::Done => self.written,
            _ => self.written.saturating_sub(1),
        }
    }
}

/// A read handle on an ingest file, shared by the clients of a download.
struct ReadHandle(File);

impl AsRef<File> for ReadHandle {
    fn as_ref(&self) -> &File {
        &self.0
    }
}

/// What a download in another module (the swarm) tells the clients of its flight.
pub(crate) struct FlightTx<'a>(&'a watch::Sender<Progress>);

impl FlightTx<'_> {
    /// The blob's size is known and its bytes will land in `file` (from offset 0).
    pub(crate) fn streaming(&self, size: u64, file: File) {
        let file = Arc::new(ReadHandle(file));
        self.0.send_modify(|p| {
            p.phase = Phase::Streaming;
            p.size = Some(size);
            p.written = 0;
            p.file = Some(file);
        });
    }

    /// The first `written` bytes of the file are verified and in place. Never goes back.
    pub(crate) fn advance(&self, written: u64) {
        self.0.send_if_modified(|p| {
            let grew = written > p.written;
            if grew {
                p.written = written;
            }
            grew
        });
    }

    /// Bytes exposed to clients so far (all but the last are readable before the commit).
    pub(crate) fn written(&self) -> u64 {
        self.0.borrow().written
    }
}

/// The download manager: owns the in-flight map.
pub struct Downloads {
    store: Store,
    metrics: Metrics,
    flights: Mutex<HashMap<Digest, watch::Receiver<Progress>>>,
    /// The data plane, when the agent is in a cluster.
    peer: OnceLock<Peer>,
    /// Bandwidth limits for origin reads.
    shaping: OnceLock<Arc<Shaping>>,
}

impl std::fmt::Debug for Downloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downloads").finish_non_exhaustive()
    }
}

/// How a client joined a download.
#[derive(Debug)]
pub enum Join {
    /// The blob was committed to the store in the meantime: read it from there.
    Cached,
    /// This request started the download.
    Started(Subscription),
    /// A download was already running; this request shares it.
    Shared(Subscription),
}

impl Downloads {
    pub fn new(store: Store, metrics: Metrics) -> Arc<Downloads> {
        Arc::new(Downloads {
            store,
            metrics,
            flights: Mutex::new(HashMap::new()),
            peer: OnceLock::new(),
            shaping: OnceLock::new(),
        })
    }

    /// Routes new downloads through the swarm (unless `[peer] enabled = false`) and applies
    /// the bandwidth limits to origin reads. Set once, at start.
    pub fn set_peer(&self, peer: Peer) {
        let _ = self.shaping.set(peer.shaping().clone());
        let _ = self.peer.set(peer);
    }

    /// Applies bandwidth limits to origin reads without a data plane.
    pub fn set_shaping(&self, shaping: Arc<Shaping>) {
        let _ = self.shaping.set(shaping);
    }

    /// Number of downloads in progress.
    pub fn in_flight(&self) -> usize {
        self.flights.lock().expect("flights lock").len()
    }

    /// Joins the download of `digest`, starting it from `upstream` if none is running.
    pub fn join(self: &Arc<Self>, upstream: &Upstream, name: &RepoName, digest: &Digest) -> Join {
        let mut flights = self.flights.lock().expect("flights lock");
        if let Some(rx) = flights.get(digest) {
            return Join::Shared(Subscription {
                rx: rx.clone(),
                digest: digest.clone(),
            });
        }
        // A download commits before it leaves the map, so checking the store under the lock
        // closes the window in which a finished blob would be fetched a second time.
        if self.store.contains(digest) {
            return Join::Cached;
        }
        let (tx, rx) = watch::channel(Progress {
            phase: Phase::Connecting,
            size: None,
            written: 0,
            file: None,
        });
        flights.insert(digest.clone(), rx.clone());
        drop(flights);

        let this = Arc::clone(self);
        let upstream = upstream.clone();
        let (name, d) = (name.clone(), digest.clone());
        let span =
            tracing::info_span!("download", digest = %d, repo = %name, upstream = %upstream.host());
        tokio::spawn(
            async move {
                this.metrics.download_started();
                let started = std::time::Instant::now();
                let swarm = this.peer.get().filter(|p| p.config().enabled);
                let result = match swarm {
                    None => this.download(&tx, &upstream, &name, &d).await,
                    Some(peer) => match peer.download(&FlightTx(&tx), &upstream, &name, &d).await {
                        SwarmOutcome::Done(n) => Ok(n),
                        SwarmOutcome::Failed(e) => Err(e),
                        SwarmOutcome::Fallback(reason) => {
                            info!(%reason, "swarm unavailable; downloading from the origin");
                            this.download(&tx, &upstream, &name, &d).await
                        }
                    },
                };
                match result {
                    Ok(bytes) => {
                        info!(
                            bytes,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "blob downloaded and verified"
                        );
                        tx.send_modify(|p| p.phase = Phase::Done);
                    }
                    Err(e) => {
                        if e.is_verification_failure() {
                            this.metrics.verification_failure();
                            warn!(error = %e, "blob failed verification: discarded, clients aborted");
                        } else {
                            warn!(error = %e, "blob download failed");
                        }
                        tx.send_modify(|p| p.phase = Phase::Failed(Arc::new(e)));
                    }
                }
                this.flights.lock().expect("flights lock").remove(&d);
                this.metrics.download_finished();
            }
            .instrument(span),
        );
        Join::Started(Subscription {
            rx,
            digest: digest.clone(),
        })
    }

    /// Downloads the blob into the store. Returns the blob size.
    async fn download(
        &self,
        tx: &watch::Sender<Progress>,
        upstream: &Upstream,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<u64, FetchError> {
        let store = self.store.clone();
        let d = digest.clone();
        let mut ingest = blocking(move || store.ingest(&d)).await??;
        let file = Arc::new(ReadHandle(File::open(ingest.path()).map_err(|e| {
            FetchError::Internal(format!("cannot open ingest file for reading: {e}"))
        })?));
        let resume_at = ingest.offset();
        if resume_at > 0 {
            info!(offset = resume_at, "resuming an interrupted download");
        }
        let body = upstream.get_blob(name, digest, resume_at).await?;
        if body.offset != resume_at {
            debug!(
                asked = resume_at,
                got = body.offset,
                "upstream ignored the range, starting over"
            );
            ingest = blocking(move || ingest.reset().map(|()| ingest)).await??;
        }
        let size = body.size;
        let start = body.offset;
        tx.send_modify(|p| {
            p.phase = Phase::Streaming;
            p.size = size;
            p.written = start;
            p.file = Some(Arc::clone(&file));
        });

        // Disk writes happen on a blocking thread fed by a bounded channel, so a slow disk
        // pushes back on the upstream connection instead of buffering without limit.
        let (chunks_tx, mut chunks_rx) = mpsc::channel::<Bytes>(16);
        let progress = tx.clone();
        let writer = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            while let Some(chunk) = chunks_rx.blocking_recv() {
                ingest.write(&chunk)?;
                progress.send_modify(|p| p.written += chunk.len() as u64);
            }
            Ok(ingest)
        });

        let mut stream = body.stream;
        let mut buf = BytesMut::new();
        let mut received = start;
        let mut stream_error = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => {
                    if let Some(s) = self.shaping.get() {
                        s.origin.take(chunk.len() as u64).await;
                        s.download.take(chunk.len() as u64).await;
                    }
                    self.metrics.upstream_bytes(chunk.len() as u64);
                    received += chunk.len() as u64;
                    buf.extend_from_slice(&chunk);
                    if buf.len() >= WRITE_CHUNK
                        && chunks_tx.send(buf.split().freeze()).await.is_err()
                    {
                        break; // the writer failed; its error is reported below
                    }
                }
                Err(e) => {
                    stream_error = Some(e);
                    break;
                }
            }
        }
        if !buf.is_empty() && stream_error.is_none() {
            let _ = chunks_tx.send(buf.freeze()).await;
        }
        drop(chunks_tx);
        let ingest = writer
            .await
            .map_err(|e| FetchError::Internal(format!("writer task: {e}")))??;
        if let Some(e) = stream_error {
            // The ingest is dropped without commit: what was written stays for a resume.
            return Err(e.into());
        }
        if let Some(want) = size
            && received != want
        {
            return Err(FetchError::ShortBody {
                digest: digest.clone(),
                got: received,
                want,
            });
        }
        blocking(move || ingest.commit(size, None)).await??;
        Ok(received)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, FetchError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FetchError::Internal(format!("blocking task: {e}")))
}

/// A client's view of one download.
pub struct Subscription {
    rx: watch::Receiver<Progress>,
    digest: Digest,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// Waits until upstream has answered (the blob size is then known if upstream sent it),
    /// or the download failed before any byte arrived.
    pub async fn started(&mut self) -> Result<Option<u64>, Arc<FetchError>> {
        loop {
            {
                let p = self.rx.borrow_and_update();
                match &p.phase {
                    Phase::Connecting => {}
                    Phase::Streaming | Phase::Done => return Ok(p.size),
                    Phase::Failed(e) => return Err(Arc::clone(e)),
                }
            }
            if self.rx.changed().await.is_err() {
                return Err(Arc::new(FetchError::Internal(
                    "download task vanished".into(),
                )));
            }
        }
    }

    /// Waits for the end of the download.
    pub async fn finished(&mut self) -> Result<u64, Arc<FetchError>> {
        loop {
            {
                let p = self.rx.borrow_and_update();
                match &p.phase {
                    Phase::Done => return Ok(p.written),
                    Phase::Failed(e) => return Err(Arc::clone(e)),
                    _ => {}
                }
            }
            if self.rx.changed().await.is_err() {
                return Err(Arc::new(FetchError::Internal(
                    "download task vanished".into(),
                )));
            }
        }
    }

    /// The bytes `start..=end` (`end` = `None`: to the end of the blob) as they become readable.
    /// The stream ends in an error if the download fails, so the client's transfer is aborted.
    pub fn into_stream(
        self,
        start: u64,
        end: Option<u64>,
    ) -> BoxStream<'static, Result<Bytes, std::io::Error>> {
        let state = (self.rx, start);
        futures::stream::try_unfold(state, move |(mut rx, pos)| async move {
            loop {
                let (phase, readable, size, file) = {
                    let p = rx.borrow_and_update();
                    (p.phase.clone(), p.readable(), p.size, p.file.clone())
                };
                if let Phase::Failed(e) = &phase {
                    return Err(std::io::Error::other(format!("download failed: {e}")));
                }
                let stop = match (end, size) {
                    (Some(e), _) => Some(e + 1),
                    (None, Some(s)) => Some(s),
                    (None, None) if matches!(phase, Phase::Done) => Some(readable),
                    (None, None) => None,
                };
                if stop.is_some_and(|s| pos >= s) {
                    return Ok(None);
                }
                let mut limit = stop.map_or(readable, |s| s.min(readable));
                // Until the commit, the last byte a client asked for is held back: a range that
                // ends before the blob does must not complete with bytes the final check may
                // still reject (the whole blob's last byte is held back by `readable`).
                if !matches!(phase, Phase::Done)
                    && let Some(s) = stop
                {
                    limit = limit.min(s - 1);
                }
                if pos < limit
                    && let Some(file) = file
                {
                    let len = (limit - pos).min(READ_CHUNK as u64) as usize;
                    let chunk = read_at(file, pos, len).await?;
                    let next = pos + chunk.len() as u64;
                    return Ok(Some((chunk, (rx, next))));
                }
                if matches!(phase, Phase::Done) {
                    // Committed, but shorter than the client asked for: the blob ended early.
                    return Err(std::io::Error::other(
                        "blob ended before the requested range",
                    ));
                }
                if rx.changed().await.is_err() {
                    return Err(std::io::Error::other("download task vanished"));
                }
            }
        })
        .boxed()
    }
}

/// Reads exactly `len` bytes at `offset` on a blocking thread.
pub(crate) async fn read_at<F>(file: Arc<F>, offset: u64, len: usize) -> std::io::Result<Bytes>
where
    F: AsRef<File> + Send + Sync + 'static,
{
    tokio::task::spawn_blocking(move || {
        let mut buf = BytesMut::zeroed(len);
        AsRef::<File>::as_ref(&*file).read_exact_at(&mut buf, offset)?;
        Ok(buf.freeze())
    })
    .await
    .map_err(std::io::Error::other)?
}
