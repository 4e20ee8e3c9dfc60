//! The swarm download of one blob: the loop that drives `proto::swarm::Swarm` with what
//! happens (peers' `Have`s, pieces, refusals, the coordinator's slots and hashes, timers) and
//! carries out what it asks (requests, cancels, origin ranges, `HavePiece`s), writing verified
//! pieces into the store's piece ingest while the flight's local clients stream the verified
//! prefix.
//!
//! Verification: a piece is hashed off the event loop, then checked by the swarm against the
//! anchored manifest or the provisional hashes; only a piece the swarm accepts is written, and
//! only a written piece is announced to peers, served, or exposed to local clients. The whole
//! blob is checked against its digest before commit (in the store). A piece that turns out
//! wrong after its bytes were streamed to a client (a provisional hash contradicted by the
//! anchored manifest) fails the download, so the client's transfer is aborted, never
//! completed with wrong bytes.
//!
//! Fallbacks: no locate answer at the start → [`SwarmOutcome::Fallback`] (the caller reads the
//! origin directly); no answer later, or no piece from anyone for `origin_fallback` → the
//! origin without a slot. A pull the origin could serve never fails because of the swarm.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use shoal_proto::manifest::{PieceHash, piece_hash};
use shoal_proto::msg::{
    AgentMsg, Announce, CoordMsg, LocateReply, NodeId, PeerMsg, PieceHashes, RejectReason,
};
use shoal_proto::piece::{Bitmap, Geometry};
use shoal_proto::swarm::{Event, PieceOutcome, Source, Swarm, SwarmConfig, Transmit};
use shoal_proto::time::Time;
use shoal_proto::{Digest, RepoName};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, trace, warn};

use super::frames::{Expect, FrameError, FrameReader, write_msg};
use super::net::{closed_as_duplicate, protocol_violation};
use super::session::{Hub, open_session};
use super::{PeerInner, lock};
use crate::fetch::{FetchError, FlightTx};
use crate::store::{PieceIngest, StoreError};
use crate::upstream::{Upstream, UpstreamError};

/// How often the tracker hears of progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Longest a batch of provisional hashes waits before it is published.
const HASH_BATCH_DELAY: Duration = Duration::from_millis(100);
/// Locate again when fewer usable peers than this, at most this often.
const FEW_PEERS: usize = 4;
const RELOCATE_EVERY: Duration = Duration::from_secs(2);
/// After the blob's swarm moved to another coordinator, how long an agent that never read
/// the origin waits before locating there: the agent that did read it asks first, so that it
/// keeps the slot and republishes its hashes there (and holders get asked for the manifest).
const RELOCATE_AFTER_MOVE: Duration = Duration::from_secs(1);
/// How long a blob whose swarm download failed verification is read from the origin
/// directly.
const DISTRUST: Duration = Duration::from_secs(600);
/// How often a slot holder republishes every hash it knows.
const REPUBLISH_EVERY: Duration = Duration::from_secs(10);
/// How many times one peer's session follows its connection to the one kept after a
/// simultaneous dial (more than once only when dials cross again in the meantime).
const MAX_SESSION_MOVES: u32 = 3;
/// Upper bound on one piece request, whatever the swarm's timers say.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Data progress is reported to the swarm at most this often per transfer.
const PROGRESS_REPORT: Duration = Duration::from_millis(500);

/// How a swarm download ended.
#[derive(Debug)]
pub(crate) enum SwarmOutcome {
    /// Verified and committed; the blob's size.
    Done(u64),
    /// Failed; the flight's clients are aborted.
    Failed(FetchError),
    /// The swarm cannot be used for this blob and nothing was exposed to clients yet: read it
    /// from the origin directly.
    Fallback(String),
}

/// What happens, fed to the download loop.
#[derive(Debug)]
pub(crate) enum Input {
    SessionUp {
        peer: NodeId,
        have: Bitmap,
        session: u64,
    },
    SessionHave {
        peer: NodeId,
        have: Bitmap,
    },
    HavePiece {
        peer: NodeId,
        piece: u32,
    },
    SessionDown {
        peer: NodeId,
        session: u64,
    },
    ConnectFailed {
        peer: NodeId,
    },
    /// A piece's bytes, hashed.
    Piece {
        source: Source<NodeId>,
        piece: u32,
        bytes: Vec<u8>,
        hash: PieceHash,
    },
    Reject {
        peer: NodeId,
        piece: u32,
        reason: RejectReason,
    },
    /// A request failed without an answer (stream or connection error).
    RequestFailed {
        peer: NodeId,
        piece: u32,
    },
    DataProgress {
        source: Source<NodeId>,
        piece: u32,
    },
    OriginDone {
        job: u64,
    },
    OriginError {
        job: u64,
        pieces: Range<u32>,
        error: String,
    },
    Written {
        piece: u32,
        result: Result<(), StoreError>,
    },
    /// A candidate piece from an earlier run, re-read from disk and hashed.
    Candidate {
        piece: u32,
        len: u64,
        hash: Option<PieceHash>,
    },
    Located(Result<LocateReply, String>),
    Size(Result<Option<u64>, String>),
}

/// Runs the download of `digest`. See the module documentation.
pub(crate) async fn run(
    inner: &Arc<PeerInner>,
    flight: &FlightTx<'_>,
    upstream: &Upstream,
    name: &RepoName,
    digest: &Digest,
) -> SwarmOutcome {
    let control = &inner.control;
    if let Some(when) = lock(&inner.distrusted).get(digest)
        && when.elapsed() < DISTRUST
    {
        return SwarmOutcome::Fallback(
            "the last swarm download of this blob failed verification".into(),
        );
    }
    // Peers serve any blob to any cluster member, so the upstream's word on whether this node
    // may read the blob from this repository is asked first (a HEAD, no body). A definite no
    // ends the pull as it would without peers; an upstream that cannot answer does not stop
    // the swarm (enrolled nodes are trusted with cluster content, and the swarm is what keeps
    // pulls going while the origin is down). The size it tells saves the slot holder a HEAD.
    let size = match upstream.blob_size(name, digest).await {
        Ok(size) => size,
        Err(
            e @ (UpstreamError::NotFound { .. }
            | UpstreamError::Unauthorized { .. }
            | UpstreamError::Denied { .. }),
        ) => {
            info!(error = %e, "the upstream refuses this blob here; not asking peers");
            return SwarmOutcome::Failed(FetchError::Upstream(e));
        }
        Err(error) => {
            warn!(%error, "cannot confirm access to the blob upstream; sharing with peers anyway");
            None
        }
    };
    // Subscribed before the locate, so no slot or hash sent in between is missed.
    let coord = control.subscribe(digest);
    let reply = match control.locate(digest, true).await {
        Ok(r) => r,
        Err(e) => return SwarmOutcome::Fallback(e.to_string()),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let hub = Arc::new(Hub::new(digest.clone(), tx.clone()));
    lock(&inner.hubs).insert(digest.clone(), hub.clone());
    let config = SwarmConfig {
        max_requests_per_peer: inner.config.max_requests_per_peer,
        max_requests: inner.config.max_requests,
        stall_timeout: inner.config.stall_timeout,
        seed: rand::random(),
        ..SwarmConfig::default()
    };
    let t0 = Instant::now();
    let mut dl = Download {
        inner: inner.clone(),
        flight,
        upstream: upstream.clone(),
        name: name.clone(),
        digest: digest.clone(),
        swarm: Swarm::new(digest.clone(), config, Time::ZERO),
        hub: hub.clone(),
        ingest: None,
        tx,
        rx,
        coord,
        t0,
        geometry: None,
        requests: HashMap::new(),
        origin_jobs: Vec::new(),
        next_job: 0,
        sessions: HashMap::new(),
        early: HashMap::new(),
        connecting: HashSet::new(),
        writing: HashSet::new(),
        held_back: Vec::new(),
        hash_batch: Vec::new(),
        hash_batch_since: None,
        candidates: Vec::new(),
        candidates_checking: 0,
        hash_kick: None,
        contradicted: false,
        republished: None,
        slot: false,
        ever_slot: false,
        forced_origin: false,
        size_asked: false,
        locating: false,
        last_locate: t0,
        owner: control.owner_of(digest),
        relocate_at: None,
        last_progress: None,
        last_have: 0,
        stuck_since: t0,
    };
    if let Some(size) = size {
        dl.size_asked = true;
        let _ = dl.tx.send(Input::Size(Ok(Some(size))));
    }
    dl.apply_reply(reply);
    let result = dl.run().await;
    let outcome = match result {
        Ok(size) => SwarmOutcome::Done(size),
        Err(Stop::Fallback(reason)) => SwarmOutcome::Fallback(reason),
        Err(Stop::Failed(e)) => {
            if e.is_verification_failure() || dl.contradicted {
                // Hashes from the swarm let a wrong blob through to the final check: the next
                // attempt reads the origin directly, so a lying cluster cannot fail a pull
                // twice.
                let mut d = lock(&inner.distrusted);
                d.retain(|_, t| t.elapsed() < DISTRUST);
                d.insert(digest.clone(), Instant::now());
            }
            SwarmOutcome::Failed(e)
        }
    };
    dl.cleanup(matches!(outcome, SwarmOutcome::Done(_))).await;
    {
        let mut hubs = lock(&inner.hubs);
        if hubs.get(digest).is_some_and(|h| Arc::ptr_eq(h, &hub)) {
            hubs.remove(digest);
        }
    }
    hub.close();
    outcome
}

enum Stop {
    Fallback(String),
    Failed(FetchError),
}

impl From<FetchError> for Stop {
    fn from(e: FetchError) -> Self {
        Stop::Failed(e)
    }
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Stop::Failed(FetchError::Store(e))
    }
}

struct Download<'a> {
    inner: Arc<PeerInner>,
    flight: &'a FlightTx<'a>,
    upstream: Upstream,
    name: RepoName,
    digest: Digest,
    swarm: Swarm<NodeId>,
    hub: Arc<Hub>,
    /// Claimed in the store once the geometry is known: before that nothing can be written,
    /// and a fallback to the direct download finds the digest unclaimed.
    ingest: Option<Arc<PieceIngest>>,
    tx: mpsc::UnboundedSender<Input>,
    rx: mpsc::UnboundedReceiver<Input>,
    coord: mpsc::UnboundedReceiver<CoordMsg>,
    t0: Instant,
    /// Set once the swarm knows it and the ingest file is sized.
    geometry: Option<Geometry>,
    requests: HashMap<(NodeId, u32), AbortHandle>,
    origin_jobs: Vec<(u64, Range<u32>, AbortHandle)>,
    next_job: u64,
    /// Open sessions per peer.
    sessions: HashMap<NodeId, HashSet<u64>>,
    /// What peers said they hold while the geometry was unknown (the swarm cannot keep
    /// `HavePiece`s before it knows how many pieces there are): replayed once it is known.
    early: HashMap<NodeId, (Option<Bitmap>, Vec<u32>)>,
    connecting: HashSet<NodeId>,
    /// Verified pieces being written.
    writing: HashSet<u32>,
    /// `Have`s the swarm emitted for pieces still being written.
    held_back: Vec<u32>,
    hash_batch: Vec<(u32, PieceHash)>,
    hash_batch_since: Option<Instant>,
    /// Pieces of an earlier run awaiting their hash to be re-verified.
    candidates: Vec<u32>,
    candidates_checking: usize,
    /// Wakes the prefix hasher thread.
    hash_kick: Option<std::sync::mpsc::Sender<()>>,
    /// A piece already streamed to clients was contradicted by the anchored manifest.
    contradicted: bool,
    /// When hashes were last republished (see `republish_hashes`).
    republished: Option<Instant>,
    /// Whether the tracker grants this agent the origin slot now; whether it ever did.
    slot: bool,
    ever_slot: bool,
    /// Reading the origin without a slot (no coordinator, or starved for too long).
    forced_origin: bool,
    size_asked: bool,
    locating: bool,
    last_locate: Instant,
    /// The coordinator that answered for the blob at the last locate.
    owner: Option<usize>,
    /// When to locate at the blob's new coordinator (see [`RELOCATE_AFTER_MOVE`]).
    relocate_at: Option<Instant>,
    last_progress: Option<Instant>,
    last_have: u32,
    /// Since when no piece arrived while pieces are missing.
    stuck_since: Instant,
}

impl Download<'_> {
    fn now(&self) -> Time {
        Time::from_micros(u64::try_from(self.t0.elapsed().as_micros()).unwrap_or(u64::MAX))
    }

    fn instant(&self, t: Time) -> Instant {
        self.t0 + Duration::from_micros(t.as_micros())
    }

    async fn run(&mut self) -> Result<u64, Stop> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.settle().await?;
            if self.swarm.is_complete()
                && self.writing.is_empty()
                && self.candidates_checking == 0
                && self.geometry.is_some()
            {
                return self.finish().await;
            }
            let deadline = self.swarm.poll_timeout().map(|t| self.instant(t));
            let batch_due = self.hash_batch_since.map(|s| s + HASH_BATCH_DELAY);
            tokio::select! {
                input = self.rx.recv() => {
                    // The loop holds a sender itself, so the channel never closes.
                    if let Some(input) = input {
                        self.handle(input)?;
                    }
                }
                msg = self.coord.recv() => match msg {
                    Some(msg) => self.handle_coord(msg),
                    None => {
                        // The control plane dropped the subscription (shutting down): carry
                        // on from the origin.
                        self.coord = mpsc::unbounded_channel().1;
                        self.force_origin("the control plane stopped");
                    }
                },
                () = sleep_until(deadline) => {
                    let now = self.now();
                    self.swarm.handle_timeout(now);
                }
                () = sleep_until(batch_due) => self.publish_hashes(),
                _ = tick.tick() => self.tick(),
                () = self.inner.closing.cancelled() => {
                    return Err(Stop::Failed(FetchError::Internal("agent shutting down".into())));
                }
            }
        }
    }

    /// After any input: sets up what a newly known geometry allows, then carries out what the
    /// swarm asks until it has nothing more to say.
    async fn settle(&mut self) -> Result<(), Stop> {
        if self.geometry.is_none()
            && let Some(g) = self.swarm.geometry()
        {
            self.set_geometry(g).await?;
            for (peer, (full, pieces)) in std::mem::take(&mut self.early) {
                if !self.sessions.contains_key(&peer) {
                    continue;
                }
                let mut have = full
                    .filter(|b| b.len() == g.count())
                    .unwrap_or_else(|| Bitmap::new(g.count()));
                for p in pieces {
                    have.set(p);
                }
                self.swarm.handle_have(&peer, &have);
            }
        }
        self.check_candidates();
        self.want_size();
        let now = self.now();
        loop {
            let mut any = false;
            while let Some(t) = self.swarm.poll_transmit(now) {
                any = true;
                self.transmit(t);
            }
            while let Some(e) = self.swarm.poll_event() {
                any = true;
                self.event(e)?;
            }
            if !any {
                break;
            }
        }
        Ok(())
    }

    async fn set_geometry(&mut self, g: Geometry) -> Result<(), Stop> {
        let ingest = Arc::new(self.claim().await?);
        self.ingest = Some(ingest.clone());
        self.hub.set_ingest(ingest.clone());
        let opened = tokio::task::spawn_blocking(move || {
            ingest.set_geometry(g)?;
            let file = File::open(ingest.path()).map_err(|e| StoreError::Io {
                op: "open piece ingest for reading",
                path: ingest.path().to_owned(),
                source: e,
            })?;
            Ok::<_, StoreError>((file, ingest.candidates()))
        })
        .await
        .map_err(|e| FetchError::Internal(e.to_string()))?;
        let (file, candidates) = opened?;
        self.geometry = Some(g);
        self.candidates = candidates;
        self.flight.streaming(g.size(), file);
        self.hub.set_spreading(self.slot);
        debug!(
            size = g.size(),
            piece_len = g.piece_len(),
            pieces = g.count(),
            "geometry known"
        );
        // The prefix hasher: reads back the verified prefix as it grows, so the commit has
        // little left to hash.
        let (kick, woken) = std::sync::mpsc::channel::<()>();
        let ingest = self.ingest().clone();
        tokio::task::spawn_blocking(move || {
            while woken.recv().is_ok() {
                while woken.try_recv().is_ok() {}
                if let Err(error) = ingest.hash_prefix() {
                    debug!(%error, "prefix hashing stopped; the commit hashes what is left");
                    return;
                }
            }
        });
        self.hash_kick = Some(kick);
        Ok(())
    }

    /// Claims the digest in the store for piece ingest. An earlier download of the same digest
    /// may still be letting go of it (its last uploads and sessions winding down): wait a
    /// little for that.
    async fn claim(&self) -> Result<PieceIngest, Stop> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (store, d) = (self.inner.store.clone(), self.digest.clone());
            let r = tokio::task::spawn_blocking(move || store.piece_ingest(&d))
                .await
                .map_err(|e| FetchError::Internal(e.to_string()))?;
            match r {
                Err(StoreError::Busy(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return Ok(other?),
            }
        }
    }

    /// The piece ingest; only called once the geometry is set.
    fn ingest(&self) -> &Arc<PieceIngest> {
        self.ingest
            .as_ref()
            .expect("piece ingest claimed with the geometry")
    }

    /// Re-verifies pieces of an earlier run whose hash is now known.
    fn check_candidates(&mut self) {
        if self.candidates.is_empty() {
            return;
        }
        let known: Vec<u32> = self
            .candidates
            .iter()
            .copied()
            .filter(|&i| self.swarm.hash(i).is_some())
            .collect();
        if known.is_empty() {
            return;
        }
        self.candidates.retain(|i| !known.contains(i));
        self.candidates_checking += known.len();
        let ingest = self.ingest().clone();
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            for piece in known {
                let read = ingest.read_unverified(piece);
                let (len, hash) = match &read {
                    Ok(b) => (b.len() as u64, Some(piece_hash(b))),
                    Err(_) => (0, None),
                };
                let _ = tx.send(Input::Candidate { piece, len, hash });
            }
        });
    }

    /// Asks the origin for the blob's size when the origin is to be read and nothing else told
    /// the geometry.
    fn want_size(&mut self) {
        if self.geometry.is_some() || self.size_asked || !(self.slot || self.forced_origin) {
            return;
        }
        self.size_asked = true;
        let (upstream, name, digest, tx) = (
            self.upstream.clone(),
            self.name.clone(),
            self.digest.clone(),
            self.tx.clone(),
        );
        tokio::spawn(async move {
            let r = upstream.blob_size(&name, &digest).await;
            let _ = tx.send(Input::Size(r.map_err(|e| e.to_string())));
        });
    }

    fn apply_reply(&mut self, r: LocateReply) {
        if r.digest != self.digest {
            return;
        }
        if let Some(m) = &r.manifest
            && !self.swarm.handle_manifest(m)
        {
            warn!("the coordinator's manifest does not fit this blob; ignored");
        }
        if let Some(h) = &r.hashes {
            self.swarm.handle_hashes(h);
        }
        self.set_slot(r.origin);
        debug!(
            peers = r.peers.len(),
            manifest = r.manifest.is_some(),
            hashes = r.hashes.as_ref().map_or(0, |h| h.entries.len()),
            origin = r.origin,
            "located"
        );
        for p in r.peers {
            self.connect(p.node, p.addr);
        }
    }

    fn set_slot(&mut self, granted: bool) {
        if granted && !self.slot {
            info!("holding the origin slot");
        }
        if granted {
            self.republish_hashes();
        }
        self.slot = granted;
        self.ever_slot |= granted;
        let now = self.now();
        self.swarm.set_origin(granted || self.forced_origin, now);
        if self.geometry.is_some() {
            self.hub.set_spreading(granted);
        }
    }

    /// Queues every hash this agent read from the origin so far. A coordinator that took the
    /// blob over from a failed one, or that granted the slot again, knows none of them; the
    /// tracker keeps the first hash it hears and ignores repeats. At most every few seconds.
    fn republish_hashes(&mut self) {
        let now = Instant::now();
        if self.republished.is_some_and(|t| now - t < REPUBLISH_EVERY) {
            return;
        }
        self.republished = Some(now);
        if self.swarm.geometry().is_none() {
            return;
        }
        let have = self.swarm.have().clone();
        for piece in have.ones() {
            if let Some(h) = self.swarm.hash(piece) {
                self.hash_batch.push((piece, *h));
            }
        }
        if !self.hash_batch.is_empty() {
            self.hash_batch_since.get_or_insert(now);
        }
    }

    fn force_origin(&mut self, why: &str) {
        if self.forced_origin || self.swarm.is_complete() {
            return;
        }
        warn!(reason = why, "reading the origin without a slot");
        self.forced_origin = true;
        let now = self.now();
        self.swarm.set_origin(true, now);
    }

    fn connect(&mut self, node: NodeId, addr: std::net::SocketAddr) {
        if node == self.inner.node
            || self.sessions.contains_key(&node)
            || self.connecting.contains(&node)
            || self.sessions.len() + self.connecting.len() >= self.inner.config.max_peers
            || self.inner.control.is_refused(&node)
        {
            return;
        }
        self.connecting.insert(node.clone());
        let (inner, hub, tx) = (self.inner.clone(), self.hub.clone(), self.tx.clone());
        tokio::spawn(
            async move {
                let mut moves = 0;
                loop {
                    match inner.connect(&node, addr).await {
                        Ok(conn) => {
                            open_session(inner.clone(), hub.clone(), node.clone(), conn.clone())
                                .await;
                            // The peer closed this connection as the duplicate of a
                            // simultaneous dial: the session goes on over the one kept.
                            if moves < MAX_SESSION_MOVES && closed_as_duplicate(&conn) {
                                moves += 1;
                                debug!(peer = %node, "session moves to the connection kept");
                                continue;
                            }
                        }
                        Err(error) => {
                            debug!(%error, "cannot reach peer");
                            let _ = tx.send(Input::ConnectFailed { peer: node });
                        }
                    }
                    break;
                }
            }
            .in_current_span(),
        );
    }

    fn locate(&mut self) {
        if self.locating {
            return;
        }
        self.locating = true;
        self.last_locate = Instant::now();
        self.owner = self.inner.control.owner_of(&self.digest);
        self.relocate_at = None;
        let (inner, digest, tx) = (self.inner.clone(), self.digest.clone(), self.tx.clone());
        tokio::spawn(async move {
            let r = inner.control.locate(&digest, true).await;
            let _ = tx.send(Input::Located(r.map_err(|e| e.to_string())));
        });
    }

    fn handle(&mut self, input: Input) -> Result<(), Stop> {
        let now = self.now();
        match input {
            Input::SessionUp {
                peer,
                have,
                session,
            } => {
                self.connecting.remove(&peer);
                if self.inner.control.is_refused(&peer) {
                    return Ok(());
                }
                self.sessions
                    .entry(peer.clone())
                    .or_default()
                    .insert(session);
                self.note_have(&peer, have);
            }
            Input::SessionHave { peer, have } => {
                if self.sessions.contains_key(&peer) {
                    self.note_have(&peer, have);
                }
            }
            Input::HavePiece { peer, piece } => {
                if self.sessions.contains_key(&peer) {
                    if self.swarm.geometry().is_none() {
                        self.early.entry(peer.clone()).or_default().1.push(piece);
                    }
                    self.swarm.handle_have_piece(&peer, piece);
                }
            }
            Input::SessionDown { peer, session } => {
                self.connecting.remove(&peer);
                let gone = match self.sessions.get_mut(&peer) {
                    Some(s) => {
                        s.remove(&session);
                        s.is_empty()
                    }
                    None => false,
                };
                if gone {
                    self.sessions.remove(&peer);
                    self.early.remove(&peer);
                    self.swarm.remove_peer(&peer);
                    self.requests.retain(|(p, _), h| {
                        if p == &peer {
                            h.abort();
                        }
                        p != &peer
                    });
                }
            }
            Input::ConnectFailed { peer } => {
                self.connecting.remove(&peer);
            }
            Input::Piece {
                source,
                piece,
                bytes,
                hash,
            } => {
                if let Source::Peer(p) = &source {
                    self.requests.remove(&(p.clone(), piece));
                    self.inner.metrics.peer_bytes_received(bytes.len() as u64);
                }
                let len = bytes.len() as u64;
                match self
                    .swarm
                    .handle_piece_hashed(source.clone(), piece, len, hash, now)
                {
                    PieceOutcome::Verified => self.write(piece, bytes),
                    PieceOutcome::Rejected => {
                        self.inner.metrics.bad_piece();
                    }
                    PieceOutcome::Duplicate | PieceOutcome::Unexpected => {
                        trace!(?source, piece, "piece not needed");
                    }
                }
            }
            Input::Reject {
                peer,
                piece,
                reason,
            } => {
                self.requests.remove(&(peer.clone(), piece));
                self.swarm.handle_reject(&peer, piece, reason, now);
            }
            Input::RequestFailed { peer, piece } => {
                if self.requests.remove(&(peer.clone(), piece)).is_some() {
                    // Not an answer: leave the peer alone for a moment and ask elsewhere. A
                    // dead connection ends the sessions too, which removes the peer.
                    self.swarm
                        .handle_reject(&peer, piece, RejectReason::Busy, now);
                }
            }
            Input::DataProgress { source, piece } => {
                self.swarm.handle_data_progress(&source, piece, now);
            }
            Input::OriginDone { job } => {
                self.origin_jobs.retain(|(j, _, _)| *j != job);
            }
            Input::OriginError { job, pieces, error } => {
                if self.origin_jobs.iter().any(|(j, _, _)| *j == job) {
                    self.origin_jobs.retain(|(j, _, _)| *j != job);
                    warn!(pieces = ?pieces, %error, "origin range failed");
                    self.swarm.handle_origin_error(pieces, now);
                }
            }
            Input::Written { piece, result } => {
                self.writing.remove(&piece);
                result?;
                self.stuck_since = Instant::now();
                if let Some(pos) = self.held_back.iter().position(|&p| p == piece) {
                    self.held_back.swap_remove(pos);
                    self.hub.announce(piece);
                }
                self.exposed_grew();
            }
            Input::Candidate { piece, len, hash } => {
                self.candidates_checking -= 1;
                let Some(hash) = hash else {
                    return Ok(());
                };
                let known = self.swarm.hash(piece).copied();
                if known == Some(hash) {
                    let outcome =
                        self.swarm
                            .handle_piece_hashed(Source::Origin, piece, len, hash, now);
                    if outcome == PieceOutcome::Verified {
                        self.ingest().accept_candidate(piece);
                        self.release_have(piece);
                        self.exposed_grew();
                    }
                }
            }
            Input::Located(r) => {
                self.locating = false;
                match r {
                    Ok(reply) => self.apply_reply(reply),
                    Err(error) => self.force_origin(&format!("no coordinator: {error}")),
                }
            }
            Input::Size(r) => match r {
                Ok(Some(size)) => {
                    if !self.swarm.set_size(size) {
                        if self.geometry.is_none() {
                            return Err(Stop::Fallback(format!(
                                "a blob of {size} bytes is not shared between peers"
                            )));
                        }
                        warn!(size, "the origin's size contradicts the known geometry");
                    }
                }
                Ok(None) if self.geometry.is_none() => {
                    return Err(Stop::Fallback(
                        "the origin did not tell the blob's size".into(),
                    ));
                }
                Err(error) if self.geometry.is_none() => {
                    return Err(Stop::Fallback(format!(
                        "cannot ask the origin for the size: {error}"
                    )));
                }
                _ => self.size_asked = false,
            },
        }
        Ok(())
    }

    /// A peer's full bitmap (also noted for replay while the geometry is unknown).
    fn note_have(&mut self, peer: &NodeId, have: Bitmap) {
        if self.swarm.geometry().is_none() {
            let e = self.early.entry(peer.clone()).or_default();
            if !have.is_empty() {
                e.0 = Some(have.clone());
                e.1.clear();
            }
        }
        self.swarm.handle_have(peer, &have);
    }

    fn handle_coord(&mut self, msg: CoordMsg) {
        match msg {
            CoordMsg::OriginSlot {
                digest, granted, ..
            } if digest == self.digest => {
                if !granted && self.slot {
                    info!("origin slot revoked");
                }
                self.set_slot(granted);
            }
            CoordMsg::Hashes(h) if h.digest == self.digest => {
                self.swarm.handle_hashes(&h);
            }
            CoordMsg::LocateReply(r) => self.apply_reply(r),
            _ => {}
        }
    }

    /// Writes a verified piece on a blocking thread; `Written` comes back.
    fn write(&mut self, piece: u32, bytes: Vec<u8>) {
        self.writing.insert(piece);
        let (ingest, tx) = (self.ingest().clone(), self.tx.clone());
        tokio::task::spawn_blocking(move || {
            let result = ingest.write_piece(piece, &bytes);
            let _ = tx.send(Input::Written { piece, result });
        });
    }

    fn release_have(&mut self, piece: u32) {
        if let Some(pos) = self.held_back.iter().position(|&p| p == piece) {
            self.held_back.swap_remove(pos);
            self.hub.announce(piece);
        }
    }

    /// The held prefix may have grown: local clients may read further, the hasher may go on.
    fn exposed_grew(&mut self) {
        let prefix = self.ingest().prefix_bytes();
        if prefix > self.flight.written() {
            self.flight.advance(prefix);
            if let Some(k) = &self.hash_kick {
                let _ = k.send(());
            }
        }
    }

    fn transmit(&mut self, t: Transmit<NodeId>) {
        match t {
            Transmit::Request { peer, piece } => self.request(peer, piece),
            Transmit::Cancel { peer, piece } => {
                if let Some(h) = self.requests.remove(&(peer, piece)) {
                    h.abort();
                }
            }
            Transmit::FetchOrigin { pieces } => self.fetch_origin(pieces),
            Transmit::CancelOrigin { pieces } => {
                self.origin_jobs.retain(|(_, r, h)| {
                    let hit = r.start < pieces.end && pieces.start < r.end;
                    if hit {
                        h.abort();
                    }
                    !hit
                });
            }
            Transmit::Have { piece } => {
                if self.writing.contains(&piece) {
                    self.held_back.push(piece);
                } else if self.ingest().is_held(piece) {
                    self.hub.announce(piece);
                } else {
                    // Verified from disk (a candidate) and not marked yet: announced when it is.
                    self.held_back.push(piece);
                }
            }
        }
    }

    fn event(&mut self, e: Event<NodeId>) -> Result<(), Stop> {
        match e {
            Event::PieceVerified { .. } | Event::Complete => {}
            Event::PieceRejected { source, piece } => {
                warn!(?source, piece, "piece failed verification; discarded");
            }
            Event::PieceDiscarded { piece } => {
                let start = self
                    .geometry
                    .and_then(|g| g.range(piece))
                    .map_or(0, |r| r.start);
                if start < self.flight.written() {
                    self.contradicted = true;
                    return Err(Stop::Failed(FetchError::Internal(format!(
                        "piece {piece} was streamed to clients and then contradicted by the anchored manifest"
                    ))));
                }
                warn!(
                    piece,
                    "piece contradicted by the anchored manifest; fetching it again"
                );
                self.ingest().discard_piece(piece);
            }
            Event::ReportBadPeer { peer, piece } => {
                warn!(peer = %peer, piece, "peer sent bad pieces: quarantined and reported");
                self.inner.control.send(
                    &self.digest,
                    AgentMsg::ReportBadPeer {
                        peer: peer.clone(),
                        digest: self.digest.clone(),
                        piece,
                    },
                );
                self.requests.retain(|(p, _), h| {
                    if p == &peer {
                        h.abort();
                    }
                    p != &peer
                });
            }
            Event::HashComputed { piece, hash } => {
                self.hash_batch.push((piece, hash));
                self.hash_batch_since.get_or_insert_with(Instant::now);
                if self.hash_batch.len() >= 64 {
                    self.publish_hashes();
                }
            }
            Event::Starved => {
                if self.inner.config.origin_fallback <= self.stuck_since.elapsed() {
                    self.force_origin("no peer has the missing pieces and no origin slot came");
                }
                self.locate();
            }
        }
        Ok(())
    }

    fn publish_hashes(&mut self) {
        self.hash_batch_since = None;
        if self.hash_batch.is_empty() {
            return;
        }
        let Some(g) = self.geometry.or(self.swarm.geometry()) else {
            return;
        };
        let mut entries = std::mem::take(&mut self.hash_batch);
        entries.sort_unstable_by_key(|e| e.0);
        entries.dedup_by_key(|e| e.0);
        let msg = AgentMsg::PublishHashes(PieceHashes {
            digest: self.digest.clone(),
            size: g.size(),
            piece_len: g.piece_len(),
            entries,
        });
        // Only the slot holder's hashes count; a forced reader keeps its own.
        if self.ever_slot {
            self.inner.control.send(&self.digest, msg);
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if let Some(g) = self.geometry {
            let have = self.swarm.have();
            let count = have.count_ones();
            let since = self.last_progress.map(|t| now - t);
            let due = match since {
                None => true,
                Some(s) => {
                    (s >= PROGRESS_EVERY && count != self.last_have) || s >= 5 * PROGRESS_EVERY
                }
            };
            if due && g.count() > 0 {
                self.inner.control.send(
                    &self.digest,
                    AgentMsg::Progress {
                        digest: self.digest.clone(),
                        have: have.clone(),
                    },
                );
                self.last_progress = Some(now);
                self.last_have = count;
            }
        }
        let refused: Vec<NodeId> = self
            .sessions
            .keys()
            .filter(|p| self.inner.control.is_refused(p))
            .cloned()
            .collect();
        for peer in refused {
            warn!(peer = %peer, "the cluster refuses this peer now; dropped");
            self.sessions.remove(&peer);
            self.swarm.remove_peer(&peer);
            if let Some(c) = self.inner.connection(&peer) {
                c.close(super::code::REFUSED, b"refused");
            }
        }
        if !self.swarm.is_complete() {
            let owner = self.inner.control.owner_of(&self.digest);
            if owner.is_none() || owner == self.owner {
                // Back where it was located last (or no coordinator up): nothing moved.
                self.relocate_at = None;
            } else if !self.locating {
                let read_origin = self.slot || self.ever_slot;
                let due = *self.relocate_at.get_or_insert_with(|| {
                    info!(
                        read_origin,
                        "the blob's coordinator changed; locating there"
                    );
                    if read_origin {
                        now
                    } else {
                        now + RELOCATE_AFTER_MOVE
                    }
                });
                if now >= due {
                    self.locate();
                }
            }
            if self.relocate_at.is_none()
                && self.swarm.usable_peers() < FEW_PEERS
                && now - self.last_locate >= RELOCATE_EVERY
            {
                self.locate();
            }
            let stuck = now - self.stuck_since;
            if stuck >= self.inner.config.origin_fallback && !self.slot {
                self.force_origin("no piece arrived for too long");
            }
        }
    }

    fn request(&mut self, peer: NodeId, piece: u32) {
        let now = self.now();
        let Some(len) = self
            .geometry
            .and_then(|g| g.range(piece))
            .map(|r| r.end - r.start)
        else {
            self.swarm
                .handle_reject(&peer, piece, RejectReason::NotHave, now);
            return;
        };
        let Some(conn) = self.inner.connection(&peer) else {
            self.swarm
                .handle_reject(&peer, piece, RejectReason::Busy, now);
            return;
        };
        let (inner, digest, tx) = (self.inner.clone(), self.digest.clone(), self.tx.clone());
        let key = (peer.clone(), piece);
        let task = tokio::spawn(
            async move {
                let asked = tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    ask(&inner, &conn, &peer, &digest, piece, len, &tx),
                )
                .await;
                let input = match asked {
                    Ok(Ok(Answer::Piece(bytes))) => {
                        let hashed = tokio::task::spawn_blocking(move || {
                            let hash = piece_hash(&bytes);
                            (bytes, hash)
                        })
                        .await;
                        match hashed {
                            Ok((bytes, hash)) => Input::Piece {
                                source: Source::Peer(peer),
                                piece,
                                bytes,
                                hash,
                            },
                            Err(_) => Input::RequestFailed { peer, piece },
                        }
                    }
                    Ok(Ok(Answer::Reject(reason))) => Input::Reject {
                        peer,
                        piece,
                        reason,
                    },
                    Ok(Err(FrameError::Protocol(what))) => {
                        protocol_violation(&conn, &peer, &what);
                        Input::RequestFailed { peer, piece }
                    }
                    Ok(Err(error)) => {
                        trace!(peer = %peer, piece, %error, "request failed");
                        Input::RequestFailed { peer, piece }
                    }
                    Err(_) => Input::RequestFailed { peer, piece },
                };
                let _ = tx.send(input);
            }
            .in_current_span(),
        );
        if let Some(old) = self.requests.insert(key, task.abort_handle()) {
            old.abort();
        }
    }

    fn fetch_origin(&mut self, pieces: Range<u32>) {
        let Some(g) = self.geometry else {
            let now = self.now();
            self.swarm.handle_origin_error(pieces, now);
            return;
        };
        self.next_job += 1;
        let job = self.next_job;
        let (inner, upstream, name, digest, tx) = (
            self.inner.clone(),
            self.upstream.clone(),
            self.name.clone(),
            self.digest.clone(),
            self.tx.clone(),
        );
        let range = pieces.clone();
        let task = tokio::spawn(
            async move {
                let input =
                    match read_origin(&inner, &upstream, &name, &digest, g, range.clone(), &tx)
                        .await
                    {
                        Ok(()) => Input::OriginDone { job },
                        Err((next, error)) => Input::OriginError {
                            job,
                            pieces: next..range.end,
                            error,
                        },
                    };
                let _ = tx.send(input);
            }
            .in_current_span(),
        );
        self.origin_jobs.push((job, pieces, task.abort_handle()));
    }

    async fn finish(&mut self) -> Result<u64, Stop> {
        self.abort_tasks();
        self.publish_hashes();
        self.hash_kick = None;
        let ingest = self.ingest().clone();
        let manifest = tokio::task::spawn_blocking(move || ingest.commit(None))
            .await
            .map_err(|e| FetchError::Internal(e.to_string()))??;
        let size = manifest.size();
        self.flight.advance(size);
        let stats = self.swarm.stats();
        info!(
            size,
            from_peers = stats.from_peers,
            from_origin = stats.from_origin,
            rejected = stats.rejected,
            stalls = stats.stalls,
            "blob assembled from the swarm and verified"
        );
        let control = &self.inner.control;
        if manifest.count() > 0 {
            control.send(
                &self.digest,
                AgentMsg::Progress {
                    digest: self.digest.clone(),
                    have: Bitmap::full(manifest.count()),
                },
            );
        }
        control.send(
            &self.digest,
            AgentMsg::Announce(Announce {
                complete: vec![self.digest.clone()],
                partial: vec![],
            }),
        );
        control.keep_manifest(manifest.clone());
        if self.ever_slot {
            control.send(&self.digest, AgentMsg::PublishManifest(manifest));
        }
        Ok(size)
    }

    fn abort_tasks(&mut self) {
        for (_, h) in self.requests.drain() {
            h.abort();
        }
        for (_, _, h) in self.origin_jobs.drain(..) {
            h.abort();
        }
    }

    /// Stops everything this download started; keeps what was written for a resume unless it
    /// was committed.
    async fn cleanup(&mut self, done: bool) {
        self.abort_tasks();
        self.hash_kick = None;
        if self.slot || self.ever_slot {
            self.inner.control.send(
                &self.digest,
                AgentMsg::ReleaseOrigin {
                    digest: self.digest.clone(),
                },
            );
        }
        if !done && let Some(ingest) = self.ingest.clone() {
            let _ = tokio::task::spawn_blocking(move || ingest.checkpoint()).await;
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

enum Answer {
    Piece(Vec<u8>),
    Reject(RejectReason),
}

/// One request on its own stream: `Request`, then one `Piece` or `Reject` for exactly that
/// piece. Reading is shaped by the download limit and reported to the swarm as progress.
async fn ask(
    inner: &PeerInner,
    conn: &quinn::Connection,
    peer: &NodeId,
    digest: &Digest,
    piece: u32,
    len: u64,
    tx: &mpsc::UnboundedSender<Input>,
) -> Result<Answer, FrameError> {
    let (mut send, recv) = conn.open_bi().await?;
    write_msg(
        &mut send,
        &PeerMsg::Request {
            digest: digest.clone(),
            piece,
        },
    )
    .await?;
    send.finish()?;
    let mut reader = FrameReader::new(recv);
    let mut last = Instant::now();
    let mut progress = |_n: usize| {
        let now = Instant::now();
        if now - last >= PROGRESS_REPORT {
            last = now;
            let _ = tx.send(Input::DataProgress {
                source: Source::Peer(peer.clone()),
                piece,
            });
        }
    };
    let answer = reader
        .next(
            Expect::answer(len),
            Some(&inner.shaping.download),
            &mut progress,
        )
        .await?;
    match answer {
        Some(PeerMsg::Piece {
            digest: d,
            piece: p,
            data,
        }) if &d == digest && p == piece => Ok(Answer::Piece(data.into_vec())),
        Some(PeerMsg::Reject {
            digest: d,
            piece: p,
            reason,
        }) if &d == digest && p == piece => Ok(Answer::Reject(reason)),
        Some(_) => Err(FrameError::Protocol("an answer to another request".into())),
        None => Err(FrameError::Protocol(
            "request closed without an answer".into(),
        )),
    }
}

/// Reads `pieces` from the origin in one ranged GET, handing each piece (hashed) to the loop
/// as it completes, in order. On failure, returns the first piece not delivered.
async fn read_origin(
    inner: &PeerInner,
    upstream: &Upstream,
    name: &RepoName,
    digest: &Digest,
    g: Geometry,
    pieces: Range<u32>,
    tx: &mpsc::UnboundedSender<Input>,
) -> Result<(), (u32, String)> {
    let first = g
        .range(pieces.start)
        .ok_or((pieces.start, "no such piece".to_owned()))?;
    let last = g
        .range(pieces.end - 1)
        .ok_or((pieces.start, "no such piece".to_owned()))?;
    let body = upstream
        .get_blob_range(name, digest, first.start..last.end)
        .await
        .map_err(|e| (pieces.start, e.to_string()))?;
    let mut stream = body.stream;
    let mut piece = pieces.start;
    let piece_bytes = |i: u32| g.range(i).map_or(0, |r| (r.end - r.start) as usize);
    let mut buf = Vec::with_capacity(piece_bytes(piece));
    let mut last_report = Instant::now();
    while piece < pieces.end {
        let chunk = match stream.next().await {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err((piece, e.to_string())),
            None => return Err((piece, "the origin ended the range early".into())),
        };
        inner.shaping.origin.take(chunk.len() as u64).await;
        inner.shaping.download.take(chunk.len() as u64).await;
        inner.metrics.upstream_bytes(chunk.len() as u64);
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            if piece >= pieces.end {
                return Err((piece, "the origin sent more than the range".into()));
            }
            let want = piece_bytes(piece) - buf.len();
            let take = want.min(rest.len());
            buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if buf.len() == piece_bytes(piece) {
                let bytes = std::mem::take(&mut buf);
                let hashed = tokio::task::spawn_blocking(move || {
                    let hash = piece_hash(&bytes);
                    (bytes, hash)
                })
                .await
                .map_err(|e| (piece, e.to_string()))?;
                let _ = tx.send(Input::Piece {
                    source: Source::Origin,
                    piece,
                    bytes: hashed.0,
                    hash: hashed.1,
                });
                piece += 1;
                buf = Vec::with_capacity(piece_bytes(piece));
                last_report = Instant::now();
            }
        }
        if last_report.elapsed() >= PROGRESS_REPORT {
            last_report = Instant::now();
            let _ = tx.send(Input::DataProgress {
                source: Source::Origin,
                piece,
            });
        }
    }
    Ok(())
}
