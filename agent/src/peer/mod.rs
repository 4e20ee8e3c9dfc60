//! The data plane: one QUIC endpoint (`shoal-peer/1`, mutual TLS) through which this agent
//! downloads pieces of blobs from other agents and serves them its own; the swarm download
//! that drives `proto::swarm`; bandwidth limits. No protocol decisions are made here: which
//! piece to ask of whom, when to give up on a source, whom to refuse are the state machines'
//! (`proto::swarm`, `UploadSlots`) and the tracker's.
//!
//! On the wire (all frames are `proto::wire` frames of `PeerMsg`):
//! - one connection per pair of peers, reused by every blob and request;
//! - a *session* per blob and connection: a bidirectional stream that starts with `Have`
//!   (the opener's verified pieces), is answered with `Have` (or `Reject { UnknownBlob }`),
//!   then carries `HavePiece` both ways as pieces get verified;
//! - a *request* per piece: a bidirectional stream with one `Request`, answered with one
//!   `Piece` or `Reject`. Cancelling a request stops the stream. Several are in flight per
//!   peer; quinn multiplexes them.
//!
//! Anything else (a first frame that is neither `Have` nor `Request`, a frame too large for
//! its place, a piece index past the blob's end, an answer to another question) closes the
//! connection. Connections without a verified node identity, or from a refused node, are
//! closed at once.

mod bucket;
mod config;
mod control;
mod download;
mod frames;
mod net;
mod serve;
mod session;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use shoal_proto::msg::{
    AgentMsg, Announce, MAX_ANNOUNCE_DIGESTS, MAX_ANNOUNCE_PARTIALS, NodeId, Partial,
};
use shoal_proto::swarm::UploadSlots;
use shoal_proto::{Digest, RepoName};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

pub use bucket::TokenBucket;
pub use config::{FilePeer, PeerConfig};
pub use control::{Control, LocateError};
pub(crate) use download::SwarmOutcome;

use crate::fetch::FlightTx;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::upstream::Upstream;
use session::Hub;

/// QUIC application error codes this side closes connections with.
pub(crate) mod code {
    use quinn::VarInt;
    /// The peer broke the protocol.
    pub const PROTOCOL: VarInt = VarInt::from_u32(1);
    /// The peer's certificate names no node, or not the expected one.
    pub const IDENTITY: VarInt = VarInt::from_u32(2);
    /// The cluster refuses the peer.
    pub const REFUSED: VarInt = VarInt::from_u32(3);
    pub const SHUTDOWN: VarInt = VarInt::from_u32(4);
    /// The peer's certificate expired (it reconnects with its renewed one).
    pub const EXPIRED: VarInt = VarInt::from_u32(5);
    /// Both peers dialed at once and this is the connection not kept: the one the higher
    /// node id opened. Sessions on it move to the other.
    pub const DUPLICATE: VarInt = VarInt::from_u32(6);
}

/// Why the peer endpoint cannot start.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot bind the peer endpoint on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The agent's bandwidth limits, shared by every transfer.
#[derive(Debug)]
pub struct Shaping {
    /// Piece data sent to peers.
    pub upload: TokenBucket,
    /// Blob data received, from peers and from the origin.
    pub download: TokenBucket,
    /// Blob data read from the origin.
    pub origin: TokenBucket,
}

impl Shaping {
    pub fn new(c: &PeerConfig) -> Arc<Shaping> {
        let bucket = |rate: Option<u64>| TokenBucket::new(rate, rate.map_or(0, burst));
        Arc::new(Shaping {
            upload: bucket(c.upload_limit),
            download: bucket(c.download_limit),
            origin: bucket(c.origin_limit),
        })
    }

    pub fn unlimited() -> Arc<Shaping> {
        Shaping::new(&PeerConfig::default())
    }
}

/// The peer endpoint and the downloads it serves. Cheap to clone.
#[derive(Clone)]
pub struct Peer {
    inner: Arc<PeerInner>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("node", &self.inner.node)
            .field("addr", &self.local_addr())
            .finish_non_exhaustive()
    }
}

pub(crate) struct PeerInner {
    node: NodeId,
    config: PeerConfig,
    control: Arc<dyn Control>,
    store: Store,
    metrics: Metrics,
    shaping: Arc<Shaping>,
    endpoint: quinn::Endpoint,
    transport: Arc<quinn::TransportConfig>,
    /// The connection in use with each peer.
    conns: Mutex<HashMap<NodeId, quinn::Connection>>,
    /// One connect at a time per peer.
    connecting: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>>,
    /// Blobs being downloaded, whose verified pieces are served.
    hubs: Mutex<HashMap<Digest, Arc<Hub>>>,
    uploads: Mutex<UploadSlots<NodeId>>,
    /// Blobs whose last swarm download failed verification, and when: read from the origin
    /// directly for a while.
    distrusted: Mutex<HashMap<Digest, tokio::time::Instant>>,
    sessions: AtomicU64,
    closing: CancellationToken,
    /// Misbehaviour injected by tests.
    #[cfg(test)]
    fault: Mutex<Fault>,
    /// Requests admitted and then never answered because of [`Fault::Stall`].
    #[cfg(test)]
    stalled: AtomicU64,
}

/// How a test makes a node misbehave when it serves pieces.
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Fault {
    #[default]
    None,
    /// Admit requests, then never answer.
    Stall,
    /// Flip a byte of every piece served.
    Corrupt,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a few map operations; a panic inside one leaves the map
    // usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn transport_config(c: &PeerConfig) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Within quinn's bound (2^62 ms); the config checked it is at least a second.
    if let Ok(idle) = quinn::IdleTimeout::try_from(c.idle_timeout) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(Some(c.idle_timeout / 3));
    // Requests and sessions are streams: room for every download's requests at once.
    t.max_concurrent_bidi_streams(1024u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Whole pieces in flight on a LAN without waiting for window updates.
    let (mut stream_window, mut conn_window) = (8u64 << 20, 64u64 << 20);
    // The download limit is applied as the data is read, and a peer sends as far as these
    // windows allow ahead of the reads: unbounded, every request in flight (up to
    // `max_requests` whole pieces) would arrive at the link's full speed before the limit
    // bites. With a window of the bucket's burst per connection, the data on the wire runs
    // ahead of the limit by at most that much per peer; the window is still a quarter of a
    // second at the limited rate, far above a LAN's round trip.
    if let Some(limit) = c.download_limit {
        conn_window = conn_window.min(burst(limit));
        stream_window = stream_window.min(conn_window);
    }
    // Both fit a VarInt (at most 64 MiB).
    t.stream_receive_window(quinn::VarInt::from_u64(stream_window).unwrap_or(quinn::VarInt::MAX));
    t.receive_window(quinn::VarInt::from_u64(conn_window).unwrap_or(quinn::VarInt::MAX));
    t.send_window(64 << 20);
    t
}

/// The burst of a bucket limited to `rate` bytes per second: a quarter of a second's worth,
/// so an idle link does not send a long burst, and at least 64 KiB (a chunk of a transfer).
fn burst(rate: u64) -> u64 {
    (rate / 4).max(64 * 1024)
}

impl Peer {
    /// Binds the endpoint on `control.peer_listen()` and starts accepting peers. Needs a
    /// tokio runtime.
    pub fn start(
        control: Arc<dyn Control>,
        config: PeerConfig,
        shaping: Arc<Shaping>,
        store: Store,
        metrics: Metrics,
    ) -> Result<Peer, PeerError> {
        let addr = control.peer_listen();
        let socket =
            std::net::UdpSocket::bind(addr).map_err(|source| PeerError::Bind { addr, source })?;
        let transport = Arc::new(transport_config(&config));
        let mut server = control.peer_server_config();
        server.transport_config(transport.clone());
        let runtime = Arc::new(quinn::TokioRuntime);
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            runtime,
        )
        .map_err(|source| PeerError::Bind { addr, source })?;
        let uploads = UploadSlots::new(config.max_uploads, config.max_uploads_per_peer);
        let inner = Arc::new(PeerInner {
            node: control.node().clone(),
            config,
            control,
            store,
            metrics,
            shaping,
            endpoint,
            transport,
            conns: Mutex::new(HashMap::new()),
            connecting: Mutex::new(HashMap::new()),
            hubs: Mutex::new(HashMap::new()),
            uploads: Mutex::new(uploads),
            distrusted: Mutex::new(HashMap::new()),
            sessions: AtomicU64::new(0),
            closing: CancellationToken::new(),
            #[cfg(test)]
            fault: Mutex::new(Fault::None),
            #[cfg(test)]
            stalled: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&inner);
        inner
            .control
            .set_inventory(Arc::new(move || inventory(&weak)));
        // Evicted blobs leave the tracker at once rather than when their announcement expires,
        // so nobody is sent here for them meanwhile.
        let weak = Arc::downgrade(&inner);
        inner.store.set_evict_listener(Arc::new(move |digests| {
            if let Some(inner) = weak.upgrade() {
                for d in digests {
                    inner.control.send(
                        d,
                        AgentMsg::Withdraw {
                            digests: vec![d.clone()],
                        },
                    );
                }
            }
        }));
        tokio::spawn(net::accept_loop(inner.clone()));
        let peer = Peer { inner };
        info!(node = %peer.inner.node, listen = %peer.local_addr(), "peer endpoint listening");
        Ok(peer)
    }

    /// The bound UDP address (the configured one, with the port filled in when it was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner
            .endpoint
            .local_addr()
            .unwrap_or_else(|_| self.inner.control.peer_listen())
    }

    pub fn node(&self) -> &NodeId {
        &self.inner.node
    }

    pub fn config(&self) -> &PeerConfig {
        &self.inner.config
    }

    pub fn shaping(&self) -> &Arc<Shaping> {
        &self.inner.shaping
    }

    #[cfg(test)]
    pub(crate) fn set_fault(&self, f: Fault) {
        *lock(&self.inner.fault) = f;
    }

    #[cfg(test)]
    pub(crate) fn stalled_requests(&self) -> u64 {
        self.inner.stalled.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Peers connected right now.
    pub fn connected_peers(&self) -> Vec<NodeId> {
        let conns = lock(&self.inner.conns);
        conns
            .iter()
            .filter(|(_, c)| c.close_reason().is_none())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Stops accepting, closes every connection, and waits (briefly) for the closes to be
    /// sent.
    pub async fn shutdown(&self) {
        self.inner.closing.cancel();
        self.inner.endpoint.close(code::SHUTDOWN, b"shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.endpoint.wait_idle()).await;
        debug!("peer endpoint closed");
    }

    /// Downloads `digest` through the swarm into the store, telling the flight's clients as
    /// the verified prefix grows. See [`download`].
    pub(crate) async fn download(
        &self,
        flight: &FlightTx<'_>,
        upstream: &Upstream,
        name: &RepoName,
        digest: &Digest,
    ) -> SwarmOutcome {
        download::run(&self.inner, flight, upstream, name, digest).await
    }
}

impl PeerInner {
    fn hub(&self, d: &Digest) -> Option<Arc<Hub>> {
        lock(&self.hubs).get(d).cloned()
    }

    fn set_load(&self) {
        let load = lock(&self.uploads).load();
        self.control.set_load(load);
    }
}

/// What this agent holds, for the tracker: complete blobs (most recently used first) and the
/// verified pieces of downloads in progress.
fn inventory(weak: &Weak<PeerInner>) -> Announce {
    let Some(inner) = weak.upgrade() else {
        return Announce::default();
    };
    let complete = inner.store.digests(MAX_ANNOUNCE_DIGESTS);
    let hubs: Vec<Arc<Hub>> = lock(&inner.hubs).values().cloned().collect();
    let partial = hubs
        .iter()
        .filter_map(|h| {
            let have = h.have_for_wire();
            (have.count_ones() > 0).then(|| Partial {
                digest: h.digest().clone(),
                have,
            })
        })
        .take(MAX_ANNOUNCE_PARTIALS)
        .collect();
    Announce { complete, partial }
}
