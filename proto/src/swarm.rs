//! The agent's download of one blob from peers and the origin, sans IO: which piece to ask of
//! whom, what to do with what arrives, when to give up on a source.
//!
//! The peer module feeds it what happens (`handle_*`, `add_peer`, `set_origin`, all with
//! `now`) and carries out what it asks: [`Swarm::poll_transmit`] yields requests, cancels,
//! origin fetches and `Have` broadcasts; [`Swarm::poll_event`] yields verified pieces (write,
//! serve, stream them), bad peers to report, hashes to publish, starvation (locate again) and
//! completion; [`Swarm::poll_timeout`] says when to call [`Swarm::handle_timeout`].
//!
//! Choice of pieces: the next `priority_window` pieces after the lowest missing one first
//! (local clients read in order), then rarest first among the peer's pieces with random
//! tie-breaks; at most `max_requests_per_peer` in flight per peer; when every missing piece is
//! in flight, a second copy may be asked of another peer (end game). Pieces no peer has are
//! fetched from the origin in ranges, only while the tracker grants an origin slot.
//!
//! Verification: a piece from a peer is accepted only if its SHA-256 matches the manifest (or
//! the provisional hashes relayed by the coordinator); a piece from the origin defines the
//! provisional hash when none is known yet (the whole-blob digest check at commit stays the
//! final word). A peer that sends `bad_pieces_to_quarantine` bad pieces is dropped and
//! reported. A request unanswered for `stall_timeout` is abandoned and asked elsewhere.
//!
//! Driving it (what the agent's peer module does, minus the sockets):
//!
//! ```
//! use shoal_proto::manifest::PieceHasher;
//! use shoal_proto::piece::Bitmap;
//! use shoal_proto::swarm::{Event, PieceOutcome, Source, Swarm, SwarmConfig, Transmit};
//! use shoal_proto::time::Time;
//! use shoal_proto::{Algorithm, Digest};
//!
//! let blob = vec![7u8; 300_000]; // two pieces of 256 KiB
//! let mut h = PieceHasher::new(blob.len() as u64, Algorithm::Sha256).unwrap();
//! h.update(&blob).unwrap();
//! let manifest = h.finish(&Digest::sha256_of(&blob)).unwrap();
//!
//! let now = Time::ZERO;
//! let mut swarm: Swarm<&str> = Swarm::new(manifest.digest().clone(), SwarmConfig::default(), now);
//! swarm.handle_manifest(&manifest); // from the coordinator's locate reply
//! swarm.handle_have(&"node-b", &Bitmap::full(2)); // node-b's `Have`
//! while let Some(t) = swarm.poll_transmit(now) {
//!     if let Transmit::Request { peer, piece } = t {
//!         // ... send PeerMsg::Request; when PeerMsg::Piece comes back:
//!         let range = manifest.geometry().range(piece).unwrap();
//!         let bytes = &blob[range.start as usize..range.end as usize];
//!         let outcome = swarm.handle_piece(Source::Peer(peer), piece, bytes, now);
//!         assert_eq!(outcome, PieceOutcome::Verified); // write it, serve it, stream it
//!     }
//! }
//! let events: Vec<_> = std::iter::from_fn(|| swarm.poll_event()).collect();
//! assert_eq!(events.last(), Some(&Event::Complete));
//! // ... and after each input: schedule a timer for swarm.poll_timeout(), call
//! // swarm.handle_timeout(now) when it fires.
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::ops::Range;
use std::time::Duration;

use crate::digest::Digest;
use crate::manifest::{PieceHash, PieceManifest, piece_hash};
use crate::msg::{PieceHashes, RejectReason};
use crate::piece::{Bitmap, Geometry, MAX_PIECES};
use crate::rng::Rng;
use crate::time::Time;

/// What identifies a peer to the swarm: the agent uses [`NodeId`](crate::msg::NodeId); a
/// simulation may use plain integers.
pub trait PeerKey: Clone + Ord + Debug {}
impl<T: Clone + Ord + Debug> PeerKey for T {}

/// Download settings; the defaults suit a LAN with pieces of 256 KiB to 16 MiB.
#[derive(Clone, Debug)]
pub struct SwarmConfig {
    pub max_requests_per_peer: u32,
    /// Requests in flight to peers in all.
    pub max_requests: u32,
    /// Pieces after the lowest missing one that go first (0: pure rarest first).
    pub priority_window: u32,
    /// A request (or origin range) with no data for this long is abandoned.
    pub stall_timeout: Duration,
    /// A peer whose requests stalled this many times in a row is dropped.
    pub stalls_to_drop: u32,
    /// Bad pieces after which a peer is quarantined and reported.
    pub bad_pieces_to_quarantine: u32,
    /// How long a peer that answered `Busy` is left alone (plus up to 100% random jitter).
    pub busy_backoff: Duration,
    /// How long a peer that answered `TryOthers` for a piece is not asked for it again.
    pub try_others_defer: Duration,
    /// Origin ranges in flight at once.
    pub origin_ranges: u32,
    /// Pieces per origin range.
    pub origin_range_pieces: u32,
    /// With pieces missing and nothing to ask of anyone for this long, emit [`Event::Starved`].
    pub starve_timeout: Duration,
    /// Whether to ask a second peer for pieces already in flight once nothing else is left.
    pub endgame: bool,
    pub seed: u64,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        SwarmConfig {
            max_requests_per_peer: 4,
            max_requests: 32,
            priority_window: 8,
            stall_timeout: Duration::from_secs(5),
            stalls_to_drop: 3,
            bad_pieces_to_quarantine: 2,
            busy_backoff: Duration::from_millis(200),
            try_others_defer: Duration::from_secs(1),
            origin_ranges: 2,
            origin_range_pieces: 4,
            starve_timeout: Duration::from_secs(3),
            endgame: true,
            seed: 0,
        }
    }
}

/// Where a piece comes from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source<P> {
    Peer(P),
    Origin,
}

/// Something to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transmit<P> {
    /// Send `PeerMsg::Request`.
    Request { peer: P, piece: u32 },
    /// Send `PeerMsg::Cancel` (the answer is no longer needed; it is still accepted if it
    /// arrives).
    Cancel { peer: P, piece: u32 },
    /// Fetch these pieces' bytes from the origin (through the coordinator or the redirect) and
    /// feed each piece back with [`Swarm::handle_piece`] as it completes, in order.
    FetchOrigin { pieces: Range<u32> },
    /// Stop the origin fetch of these pieces.
    CancelOrigin { pieces: Range<u32> },
    /// Tell every peer session on this blob that this piece is now available (`HavePiece`).
    Have { piece: u32 },
}

/// Something that happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<P> {
    /// The piece is verified: write it, serve it to peers, stream it to waiting clients.
    PieceVerified { piece: u32 },
    /// A piece failed verification and was discarded.
    PieceRejected { source: Source<P>, piece: u32 },
    /// A verified piece turned out to contradict the anchored manifest (the provisional hash
    /// it was checked against was wrong): forget its bytes.
    PieceDiscarded { piece: u32 },
    /// The peer sent too many bad pieces and is quarantined: report it to the tracker
    /// (`AgentMsg::ReportBadPeer`) and close its session.
    ReportBadPeer { peer: P, piece: u32 },
    /// Hash of a piece read from the origin that had no known hash: publish it to the
    /// coordinator (`AgentMsg::PublishHashes`), batched.
    HashComputed { piece: u32, hash: PieceHash },
    /// Pieces are missing and no known source can provide them: locate again, asking for the
    /// origin.
    Starved,
    /// Every piece is verified: check the whole digest, commit, announce.
    Complete,
}

/// What became of a piece handed to [`Swarm::handle_piece`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceOutcome {
    /// New and verified: keep the bytes.
    Verified,
    /// Already had it (end game, late answer): drop the bytes.
    Duplicate,
    /// Failed verification: drop the bytes.
    Rejected,
    /// Not checkable (no geometry or hash yet, index out of range for the origin): dropped.
    Unexpected,
}

/// Counters for logs, metrics and the simulation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwarmStats {
    pub from_peers: u32,
    pub from_origin: u32,
    pub duplicates: u32,
    pub rejected: u32,
    pub stalls: u32,
    pub busy: u32,
}

#[derive(Debug)]
struct PeerState {
    have: Bitmap,
    /// Pieces not to ask this peer for until `deferred_until` (it said `TryOthers`).
    deferred: Bitmap,
    deferred_until: Time,
    inflight: u32,
    busy_until: Time,
    bad: u32,
    stalls: u32,
    quarantined: bool,
}

#[derive(Debug)]
struct Outstanding<P> {
    source: Source<P>,
    pieces: Range<u32>,
    deadline: Time,
}

/// Peers in a vector (fast to scan, addressed by position while scheduling) with an index by
/// key.
#[derive(Debug)]
struct PeerTable<P> {
    entries: Vec<(P, PeerState)>,
    index: BTreeMap<P, usize>,
}

impl<P: PeerKey> PeerTable<P> {
    fn new() -> Self {
        PeerTable {
            entries: Vec::new(),
            index: BTreeMap::new(),
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn position(&self, k: &P) -> Option<usize> {
        self.index.get(k).copied()
    }

    fn contains_key(&self, k: &P) -> bool {
        self.index.contains_key(k)
    }

    fn get_mut(&mut self, k: &P) -> Option<&mut PeerState> {
        let i = self.position(k)?;
        Some(&mut self.entries[i].1)
    }

    fn insert_with(&mut self, k: P, f: impl FnOnce() -> PeerState) -> &mut PeerState {
        let i = match self.index.get(&k) {
            Some(&i) => i,
            None => {
                self.entries.push((k.clone(), f()));
                self.index.insert(k, self.entries.len() - 1);
                self.entries.len() - 1
            }
        };
        &mut self.entries[i].1
    }

    fn remove(&mut self, k: &P) -> Option<PeerState> {
        let i = self.index.remove(k)?;
        let (_, st) = self.entries.swap_remove(i);
        if let Some((moved, _)) = self.entries.get(i) {
            self.index.insert(moved.clone(), i);
        }
        Some(st)
    }

    fn values(&self) -> impl Iterator<Item = &PeerState> {
        self.entries.iter().map(|(_, st)| st)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut PeerState> {
        self.entries.iter_mut().map(|(_, st)| st)
    }
}

/// The download state machine for one blob. See the module documentation.
pub struct Swarm<P: PeerKey> {
    digest: Digest,
    config: SwarmConfig,
    rng: Rng,
    geometry: Option<Geometry>,
    hashes: Vec<Option<PieceHash>>,
    anchored: bool,
    have: Bitmap,
    /// Lowest missing piece (== count when complete).
    next_missing: u32,
    /// Usable peers holding each piece.
    avail: Vec<u32>,
    /// Requests in flight for each piece (peers and origin).
    inflight: Vec<u8>,
    /// Pieces with at least one request in flight.
    pieces_in_flight: u32,
    /// Pieces that may be asked for now: missing, none in flight, hash known.
    want: Bitmap,
    peers: PeerTable<P>,
    outstanding: Vec<Outstanding<P>>,
    origin_allowed: bool,
    origin_retry_at: Time,
    /// Earliest `busy_until` among peers backing off (`Time::ZERO`: none), so that
    /// `poll_timeout` need not scan every peer.
    busy_wake: Time,
    /// Something changed that may allow requests to any peer.
    dirty: bool,
    /// Peers that may take a request (new pieces announced) though nothing else changed.
    dirty_peers: Vec<P>,
    idle_since: Option<Time>,
    last_now: Time,
    complete: bool,
    transmits: VecDeque<Transmit<P>>,
    events: VecDeque<Event<P>>,
    stats: SwarmStats,
}

impl<P: PeerKey> Debug for Swarm<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swarm")
            .field("digest", &self.digest)
            .field("have", &self.have)
            .field("peers", &self.peers.len())
            .field("outstanding", &self.outstanding.len())
            .field("origin", &self.origin_allowed)
            .finish()
    }
}

impl<P: PeerKey> Swarm<P> {
    pub fn new(digest: Digest, config: SwarmConfig, now: Time) -> Swarm<P> {
        Swarm {
            digest,
            rng: Rng::new(config.seed),
            config,
            geometry: None,
            hashes: Vec::new(),
            anchored: false,
            have: Bitmap::new(0),
            next_missing: 0,
            avail: Vec::new(),
            inflight: Vec::new(),
            pieces_in_flight: 0,
            want: Bitmap::new(0),
            peers: PeerTable::new(),
            outstanding: Vec::new(),
            origin_allowed: false,
            origin_retry_at: Time::ZERO,
            busy_wake: Time::ZERO,
            dirty: true,
            dirty_peers: Vec::new(),
            idle_since: Some(now),
            last_now: now,
            complete: false,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: SwarmStats::default(),
        }
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn geometry(&self) -> Option<Geometry> {
        self.geometry
    }

    /// Verified pieces: what to announce, and what may be served to peers.
    pub fn have(&self) -> &Bitmap {
        &self.have
    }

    pub fn is_complete(&self) -> bool {
        self.complete
    }

    pub fn stats(&self) -> SwarmStats {
        self.stats
    }

    /// Expected hash of `piece`, when known.
    pub fn hash(&self, piece: u32) -> Option<&PieceHash> {
        self.hashes.get(piece as usize).and_then(|h| h.as_ref())
    }

    pub fn origin_allowed(&self) -> bool {
        self.origin_allowed
    }

    /// Peers still usable (not quarantined).
    pub fn usable_peers(&self) -> usize {
        self.peers.values().filter(|p| !p.quarantined).count()
    }

    pub fn knows_peer(&self, peer: &P) -> bool {
        self.peers.contains_key(peer)
    }

    // -----------------------------------------------------------------------------------------
    // Geometry and hashes

    /// Sets the blob's size (from the registry, for an agent that will read the origin) when
    /// no hashes told it yet. `false` when it contradicts the known geometry or has too many
    /// pieces to swarm.
    pub fn set_size(&mut self, size: u64) -> bool {
        self.set_geometry(Geometry::for_size(size))
    }

    fn set_geometry(&mut self, g: Geometry) -> bool {
        if let Some(known) = self.geometry {
            return known == g;
        }
        if g.size().div_ceil(g.piece_len()) > u64::from(MAX_PIECES) {
            return false;
        }
        let n = g.count();
        self.geometry = Some(g);
        self.hashes = vec![None; n as usize];
        self.have = Bitmap::new(n);
        self.avail = vec![0; n as usize];
        self.inflight = vec![0; n as usize];
        self.pieces_in_flight = 0;
        self.want = Bitmap::new(n);
        self.next_missing = 0;
        for p in self.peers.values_mut() {
            if p.have.len() != n {
                p.have = Bitmap::new(n);
            }
            p.deferred = Bitmap::new(n);
            if !p.quarantined {
                for i in p.have.ones() {
                    self.avail[i as usize] += 1;
                }
            }
        }
        self.dirty = true;
        if n == 0 {
            self.finish();
        }
        true
    }

    /// The anchored manifest from the coordinator. Pieces verified against a provisional hash
    /// that it contradicts are discarded ([`Event::PieceDiscarded`]) and fetched again.
    /// `false` (and ignored) when it is for another digest or another geometry.
    pub fn handle_manifest(&mut self, manifest: &PieceManifest) -> bool {
        if manifest.digest() != &self.digest || !self.set_geometry(manifest.geometry()) {
            return false;
        }
        for (i, h) in manifest.hashes().iter().enumerate() {
            let slot = &mut self.hashes[i];
            if slot.is_some_and(|known| known != *h) && self.have.get(i as u32) {
                self.have.clear(i as u32);
                self.want.set(i as u32);
                self.complete = false;
                self.events
                    .push_back(Event::PieceDiscarded { piece: i as u32 });
                self.next_missing = self.next_missing.min(i as u32);
            }
            *slot = Some(*h);
            self.refresh(i as u32);
        }
        self.anchored = true;
        self.dirty = true;
        true
    }

    /// Provisional hashes relayed by the coordinator. The first hash known for a piece stays
    /// (until an anchored manifest says otherwise). `false` when they are for another blob or
    /// geometry.
    pub fn handle_hashes(&mut self, hashes: &PieceHashes) -> bool {
        if hashes.digest != self.digest || hashes.validate().is_err() {
            return false;
        }
        let Some(g) = Geometry::with_piece_len(hashes.size, hashes.piece_len) else {
            return false;
        };
        if !self.set_geometry(g) {
            return false;
        }
        for &(i, h) in &hashes.entries {
            let slot = &mut self.hashes[i as usize];
            if slot.is_none() {
                *slot = Some(h);
                self.refresh(i);
                if !self.have.get(i) {
                    self.dirty = true;
                }
            }
        }
        true
    }

    /// Recomputes whether piece `i` may be asked for.
    fn refresh(&mut self, i: u32) {
        let ok = !self.have.get(i)
            && self.inflight[i as usize] == 0
            && self.hashes[i as usize].is_some();
        if ok {
            self.want.set(i);
        } else {
            self.want.clear(i);
        }
    }

    fn note_busy(&mut self, until: Time) {
        if self.busy_wake == Time::ZERO || until < self.busy_wake {
            self.busy_wake = until;
        }
    }

    fn inc_inflight(&mut self, i: u32) {
        if self.inflight[i as usize] == 0 {
            self.pieces_in_flight += 1;
        }
        self.inflight[i as usize] += 1;
        self.refresh(i);
    }

    fn dec_inflight(&mut self, i: u32) {
        self.inflight[i as usize] -= 1;
        if self.inflight[i as usize] == 0 {
            self.pieces_in_flight -= 1;
        }
        self.refresh(i);
    }

    // -----------------------------------------------------------------------------------------
    // Peers

    /// A peer session on this blob (from a locate reply, or one that connected to us).
    /// Idempotent.
    pub fn add_peer(&mut self, peer: P) {
        let n = self.have.len();
        self.peers.insert_with(peer, || PeerState {
            have: Bitmap::new(n),
            deferred: Bitmap::new(n),
            deferred_until: Time::ZERO,
            inflight: 0,
            busy_until: Time::ZERO,
            bad: 0,
            stalls: 0,
            quarantined: false,
        });
    }

    /// The session ended: its requests go elsewhere.
    pub fn remove_peer(&mut self, peer: &P) {
        let Some(p) = self.peers.remove(peer) else {
            return;
        };
        // Availability counts only usable peers, and only once the geometry is known.
        if !p.quarantined && self.geometry.is_some() {
            for i in p.have.ones() {
                self.avail[i as usize] -= 1;
            }
        }
        self.drop_requests_of(&Source::Peer(peer.clone()), false);
        self.dirty = true;
    }

    /// A peer's full bitmap. Ignored when its length does not match the blob.
    pub fn handle_have(&mut self, peer: &P, have: &Bitmap) {
        self.add_peer(peer.clone());
        let p = self.peers.get_mut(peer).expect("just added");
        if self.geometry.is_none() {
            // Kept until the geometry is known, then checked against it.
            p.have = have.clone();
            return;
        }
        if have.len() != self.have.len() {
            return;
        }
        if !p.quarantined {
            for i in p.have.ones() {
                self.avail[i as usize] -= 1;
            }
            for i in have.ones() {
                self.avail[i as usize] += 1;
            }
        }
        p.have = have.clone();
        self.dirty = true;
    }

    /// One more piece at a peer.
    pub fn handle_have_piece(&mut self, peer: &P, piece: u32) {
        self.add_peer(peer.clone());
        let p = self.peers.get_mut(peer).expect("just added");
        if piece >= p.have.len() || p.have.get(piece) {
            return;
        }
        p.have.set(piece);
        if p.quarantined || self.geometry.is_none() {
            return;
        }
        self.avail[piece as usize] += 1;
        if self.want.get(piece) && p.inflight < self.config.max_requests_per_peer {
            self.dirty_peers.push(peer.clone());
        }
    }

    /// The peer refused a request.
    pub fn handle_reject(&mut self, peer: &P, piece: u32, reason: RejectReason, now: Time) {
        self.last_now = now;
        let src = Source::Peer(peer.clone());
        if !self.take_request(&src, piece) {
            return;
        }
        let jitter = self
            .rng
            .below(self.config.busy_backoff.as_micros() as u64 + 1);
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        match reason {
            RejectReason::Busy => {
                self.stats.busy += 1;
                p.busy_until = now + self.config.busy_backoff + Duration::from_micros(jitter);
                let until = p.busy_until;
                self.note_busy(until);
            }
            RejectReason::NotHave => {
                if p.have.get(piece) {
                    p.have.clear(piece);
                    if !p.quarantined {
                        self.avail[piece as usize] -= 1;
                    }
                }
            }
            RejectReason::TryOthers => {
                if p.deferred_until <= now {
                    p.deferred = Bitmap::new(p.have.len());
                    p.deferred_until = now + self.config.try_others_defer;
                }
                p.deferred.set(piece);
                let until = p.deferred_until;
                self.note_busy(until);
            }
            RejectReason::UnknownBlob | RejectReason::Forbidden | RejectReason::ShuttingDown => {
                self.remove_peer(peer);
            }
        }
        self.dirty = true;
    }

    // -----------------------------------------------------------------------------------------
    // Origin

    /// Whether the tracker grants this agent an origin slot (or, with no coordinator
    /// reachable, whether the agent falls back to the origin). Revoking cancels origin
    /// fetches in flight.
    pub fn set_origin(&mut self, allowed: bool, now: Time) {
        self.last_now = now;
        if self.origin_allowed == allowed {
            return;
        }
        self.origin_allowed = allowed;
        if !allowed {
            self.drop_requests_of(&Source::Origin, true);
        }
        self.dirty = true;
    }

    /// The origin fetch of `pieces` failed: what it had not delivered is asked again after a
    /// pause.
    pub fn handle_origin_error(&mut self, pieces: Range<u32>, now: Time) {
        self.last_now = now;
        let mut freed = Vec::new();
        self.outstanding.retain(|o| {
            let hit = o.source == Source::Origin
                && o.pieces.start < pieces.end
                && pieces.start < o.pieces.end;
            if hit {
                freed.push(o.pieces.clone());
            }
            !hit
        });
        for r in freed {
            for i in r {
                self.dec_inflight(i);
            }
        }
        self.origin_retry_at = now + self.config.busy_backoff * 5;
        self.dirty = true;
    }

    // -----------------------------------------------------------------------------------------
    // Pieces

    /// Bytes of `piece` arrived from `source`: hashes them and checks them.
    pub fn handle_piece(
        &mut self,
        source: Source<P>,
        piece: u32,
        bytes: &[u8],
        now: Time,
    ) -> PieceOutcome {
        let hash = piece_hash(bytes);
        self.handle_piece_hashed(source, piece, bytes.len() as u64, hash, now)
    }

    /// As [`handle_piece`](Swarm::handle_piece), for a caller that hashed the bytes itself
    /// (off the event loop) with [`piece_hash`]: `len` and `hash` are the received bytes'.
    pub fn handle_piece_hashed(
        &mut self,
        source: Source<P>,
        piece: u32,
        len: u64,
        hash: PieceHash,
        now: Time,
    ) -> PieceOutcome {
        self.last_now = now;
        let Some(g) = self.geometry else {
            return PieceOutcome::Unexpected;
        };
        self.take_request(&source, piece);
        if let Source::Peer(p) = &source
            && !self.peers.contains_key(p)
        {
            return PieceOutcome::Unexpected;
        }
        let Some(range) = g.range(piece) else {
            return self.bad_piece(source, piece);
        };
        let right_len = range.end - range.start == len;
        let expected = self.hashes[piece as usize];
        match (&source, expected) {
            (_, Some(h)) if h == hash && right_len => {}
            (Source::Origin, None) if right_len => {
                // Read from the origin with no hash known yet: this defines the provisional
                // hash; the whole-blob digest check at commit is the final word.
                self.hashes[piece as usize] = Some(hash);
                self.events.push_back(Event::HashComputed { piece, hash });
            }
            // Never requested without a hash: a stray answer, not a lie.
            (Source::Peer(_), None) => return PieceOutcome::Unexpected,
            _ => return self.bad_piece(source, piece),
        }
        if let Source::Peer(p) = &source
            && let Some(st) = self.peers.get_mut(p)
        {
            st.stalls = 0;
        }
        if self.have.get(piece) {
            self.stats.duplicates += 1;
            return PieceOutcome::Duplicate;
        }
        match source {
            Source::Origin => self.stats.from_origin += 1,
            Source::Peer(_) => self.stats.from_peers += 1,
        }
        self.have.set(piece);
        self.refresh(piece);
        self.events.push_back(Event::PieceVerified { piece });
        self.transmits.push_back(Transmit::Have { piece });
        // Other copies in flight (end game) are no longer needed.
        if self.inflight[piece as usize] > 0 {
            let mut cancel = Vec::new();
            self.outstanding.retain(|o| match &o.source {
                Source::Peer(p) if o.pieces.start == piece => {
                    cancel.push(p.clone());
                    false
                }
                _ => true,
            });
            for p in cancel {
                self.dec_inflight(piece);
                if let Some(st) = self.peers.get_mut(&p) {
                    st.inflight -= 1;
                }
                self.transmits
                    .push_back(Transmit::Cancel { peer: p, piece });
            }
        }
        if piece == self.next_missing {
            self.next_missing = self.have.next_missing(piece);
        }
        if self.next_missing >= self.have.len() && self.have.is_complete() {
            self.finish();
        }
        self.dirty = true;
        PieceOutcome::Verified
    }

    /// Data of `piece` is still arriving from `source` (call it as bytes flow, throttled):
    /// pushes the stall deadline back. Large pieces on slow links take longer than
    /// `stall_timeout` without being stalled.
    pub fn handle_data_progress(&mut self, source: &Source<P>, piece: u32, now: Time) {
        self.last_now = now;
        let deadline = now + self.config.stall_timeout;
        for o in &mut self.outstanding {
            if &o.source == source && o.pieces.contains(&piece) {
                o.deadline = deadline;
            }
        }
    }

    fn bad_piece(&mut self, source: Source<P>, piece: u32) -> PieceOutcome {
        self.stats.rejected += 1;
        self.events.push_back(Event::PieceRejected {
            source: source.clone(),
            piece,
        });
        if let Source::Peer(peer) = source
            && let Some(p) = self.peers.get_mut(&peer)
        {
            p.bad += 1;
            if p.bad >= self.config.bad_pieces_to_quarantine && !p.quarantined {
                p.quarantined = true;
                let have: Vec<u32> = p.have.ones().collect();
                for i in have {
                    self.avail[i as usize] -= 1;
                }
                self.drop_requests_of(&Source::Peer(peer.clone()), true);
                self.events.push_back(Event::ReportBadPeer { peer, piece });
            }
        }
        self.dirty = true;
        PieceOutcome::Rejected
    }

    /// Removes the outstanding request for `piece` from `source`; `true` if there was one.
    fn take_request(&mut self, source: &Source<P>, piece: u32) -> bool {
        let Some(pos) = self
            .outstanding
            .iter()
            .position(|o| &o.source == source && o.pieces.contains(&piece))
        else {
            return false;
        };
        let o = &mut self.outstanding[pos];
        if o.pieces.start == piece {
            o.pieces.start += 1;
        } else if o.pieces.end == piece + 1 {
            o.pieces.end -= 1;
        } else {
            // Out of order inside an origin range: split it.
            let tail = Outstanding {
                source: o.source.clone(),
                pieces: piece + 1..o.pieces.end,
                deadline: o.deadline,
            };
            o.pieces.end = piece;
            self.outstanding.push(tail);
        }
        if self.outstanding[pos].pieces.is_empty() {
            self.outstanding.swap_remove(pos);
        } else if *source == Source::Origin {
            // The origin stream is alive: its remaining pieces get a fresh deadline.
            self.outstanding[pos].deadline = self.last_now + self.config.stall_timeout;
        }
        self.dec_inflight(piece);
        if let Source::Peer(p) = source
            && let Some(st) = self.peers.get_mut(p)
        {
            st.inflight -= 1;
        }
        self.dirty = true;
        true
    }

    /// Forgets every request to `source`, telling it when `cancel`.
    fn drop_requests_of(&mut self, source: &Source<P>, cancel: bool) {
        let mut dropped = Vec::new();
        self.outstanding.retain(|o| {
            let hit = &o.source == source;
            if hit {
                dropped.push(o.pieces.clone());
            }
            !hit
        });
        for r in dropped {
            for i in r.clone() {
                self.dec_inflight(i);
            }
            if cancel {
                self.transmits.push_back(match source {
                    Source::Peer(p) => Transmit::Cancel {
                        peer: p.clone(),
                        piece: r.start,
                    },
                    Source::Origin => Transmit::CancelOrigin { pieces: r },
                });
            }
        }
        if let Source::Peer(p) = source
            && let Some(st) = self.peers.get_mut(p)
        {
            st.inflight = 0;
        }
        self.dirty = true;
    }

    fn finish(&mut self) {
        if !self.complete {
            self.complete = true;
            self.idle_since = None;
            self.events.push_back(Event::Complete);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Time

    /// Abandons stalled requests, ends peer back-offs, and reports starvation.
    pub fn handle_timeout(&mut self, now: Time) {
        self.last_now = now;
        let mut stalled = Vec::new();
        self.outstanding.retain(|o| {
            let late = o.deadline <= now;
            if late {
                stalled.push((o.source.clone(), o.pieces.clone()));
            }
            !late
        });
        for (source, pieces) in stalled {
            self.stats.stalls += 1;
            for i in pieces.clone() {
                self.dec_inflight(i);
            }
            match source {
                Source::Origin => {
                    self.transmits.push_back(Transmit::CancelOrigin { pieces });
                }
                Source::Peer(peer) => {
                    self.transmits.push_back(Transmit::Cancel {
                        peer: peer.clone(),
                        piece: pieces.start,
                    });
                    let until = now + self.config.stall_timeout;
                    let drop = self.peers.get_mut(&peer).is_some_and(|p| {
                        p.inflight -= 1;
                        p.stalls += 1;
                        // Leave it alone for a while; drop it if it keeps stalling.
                        p.busy_until = until;
                        p.stalls >= self.config.stalls_to_drop
                    });
                    self.note_busy(until);
                    if drop {
                        self.remove_peer(&peer);
                    }
                }
            }
            self.dirty = true;
        }
        if self.busy_wake > Time::ZERO && self.busy_wake <= now {
            let mut next = Time::ZERO;
            let mut later = |t: Time| {
                if next == Time::ZERO || t < next {
                    next = t;
                }
            };
            for p in self.peers.values_mut() {
                if p.busy_until > now {
                    later(p.busy_until);
                } else {
                    p.busy_until = Time::ZERO;
                }
                if p.deferred_until > now {
                    later(p.deferred_until);
                } else if p.deferred_until > Time::ZERO {
                    p.deferred_until = Time::ZERO;
                    p.deferred = Bitmap::new(p.have.len());
                }
            }
            self.busy_wake = next;
            self.dirty = true;
        }
        if self.origin_retry_at > Time::ZERO && self.origin_retry_at <= now {
            self.origin_retry_at = Time::ZERO;
            self.dirty = true;
        }
        self.schedule(now);
        if let Some(since) = self.idle_since
            && since + self.config.starve_timeout <= now
        {
            self.events.push_back(Event::Starved);
            self.idle_since = Some(now);
        }
    }

    /// When to call [`handle_timeout`](Swarm::handle_timeout) next.
    pub fn poll_timeout(&self) -> Option<Time> {
        let deadlines = self.outstanding.iter().map(|o| o.deadline);
        let busy = (self.busy_wake > Time::ZERO).then_some(self.busy_wake);
        let idle = self.idle_since.map(|t| t + self.config.starve_timeout);
        let origin = (self.origin_retry_at > Time::ZERO).then_some(self.origin_retry_at);
        deadlines.chain(busy).chain(idle).chain(origin).min()
    }

    // -----------------------------------------------------------------------------------------
    // Output

    /// The next message to send. Decides new requests when something changed since the last
    /// call.
    pub fn poll_transmit(&mut self, now: Time) -> Option<Transmit<P>> {
        if self.transmits.is_empty() {
            self.schedule(now);
        }
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event<P>> {
        self.events.pop_front()
    }

    /// The piece to ask of the peer at `pos` next, if any.
    fn pick(&mut self, pos: usize, endgame: bool) -> Option<u32> {
        let (key, p) = &self.peers.entries[pos];
        let n = self.have.len();
        // Rarest first; ties go to a random one of them (reservoir sampling).
        let mut best: Option<(u32, u32)> = None;
        let mut ties = 0u64;
        let deferred = p.deferred.words();
        for (k, (w, h)) in self.want.words().iter().zip(p.have.words()).enumerate() {
            let mut bits = w & h & !deferred.get(k).copied().unwrap_or(0);
            while bits != 0 {
                let i = k as u32 * 64 + bits.trailing_zeros();
                bits &= bits - 1;
                let a = self.avail[i as usize];
                match best {
                    Some((_, b)) if a > b => {}
                    Some((_, b)) if a == b => {
                        ties += 1;
                        if self.rng.below(ties) == 0 {
                            best = Some((i, a));
                        }
                    }
                    _ => {
                        best = Some((i, a));
                        ties = 1;
                    }
                }
            }
        }
        // A piece only this peer has comes first: its upload is best spent on what nobody
        // else can give (early on, the seeder's newest pieces).
        if let Some((i, 1)) = best {
            return Some(i);
        }
        // Then what local clients read next, from peers that are not its sole source.
        let window_end = self
            .next_missing
            .saturating_add(self.config.priority_window)
            .min(n);
        let mut i = self.next_missing;
        while i < window_end {
            if self.want.get(i)
                && p.have.get(i)
                && !p.deferred.get(i)
                && self.avail[i as usize] >= 2
            {
                return Some(i);
            }
            i = self.have.next_missing(i + 1);
        }
        if let Some((i, _)) = best {
            return Some(i);
        }
        if !endgame {
            return None;
        }
        // End game: a second copy of a piece in flight elsewhere, lowest first.
        for (k, (w, h)) in self.have.words().iter().zip(p.have.words()).enumerate() {
            let mut bits = !w & h & !deferred.get(k).copied().unwrap_or(0);
            while bits != 0 {
                let i = k as u32 * 64 + bits.trailing_zeros();
                bits &= bits - 1;
                if i < n
                    && self.inflight[i as usize] == 1
                    && self.hashes[i as usize].is_some()
                    && !self.outstanding.iter().any(|o| {
                        o.pieces.contains(&i) && matches!(&o.source, Source::Peer(q) if q == key)
                    })
                {
                    return Some(i);
                }
            }
        }
        None
    }

    fn schedule(&mut self, now: Time) {
        if (!self.dirty && self.dirty_peers.is_empty()) || self.complete || self.geometry.is_none()
        {
            return;
        }
        let all = std::mem::take(&mut self.dirty);
        let mut only = std::mem::take(&mut self.dirty_peers);
        let n = self.have.len();
        let mut peer_requests: u32 = self
            .outstanding
            .iter()
            .filter(|o| o.source != Source::Origin)
            .count() as u32;
        let usable = |p: &PeerState| {
            !p.quarantined && p.busy_until <= now && p.inflight < self.config.max_requests_per_peer
        };
        let mut candidates: Vec<usize> = if all {
            (0..self.peers.len())
                .filter(|&k| usable(&self.peers.entries[k].1))
                .collect()
        } else {
            let mut v: Vec<usize> = only
                .drain(..)
                .filter_map(|k| self.peers.position(&k))
                .filter(|&k| usable(&self.peers.entries[k].1))
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        // A random rotation, so that no peer is always asked first.
        if !candidates.is_empty() {
            let r = self.rng.below(candidates.len() as u64) as usize;
            candidates.rotate_left(r);
        }
        let missing = n - self.have.count_ones();
        let endgame_possible = self.config.endgame && self.pieces_in_flight >= missing;
        if self.want.words().iter().all(|&w| w == 0) && !endgame_possible {
            // Nothing can be asked of anyone (early on, the seeder knows no hash it lacks).
            candidates.clear();
        }
        // Round-robin, one request per peer per turn, so that the rarest pieces spread over
        // several peers rather than all going to the first one. A peer with nothing to give
        // leaves the round: what may be asked only shrinks while requests are made.
        while !candidates.is_empty() && peer_requests < self.config.max_requests {
            let endgame = self.config.endgame && self.pieces_in_flight >= missing;
            let mut k = 0;
            while k < candidates.len() {
                if peer_requests >= self.config.max_requests {
                    break;
                }
                let pos = candidates[k];
                let Some(i) = self.pick(pos, endgame) else {
                    candidates.remove(k);
                    continue;
                };
                self.inc_inflight(i);
                let (peer, st) = &mut self.peers.entries[pos];
                st.inflight += 1;
                if st.inflight >= self.config.max_requests_per_peer {
                    candidates.remove(k);
                } else {
                    k += 1;
                }
                let peer = peer.clone();
                self.outstanding.push(Outstanding {
                    source: Source::Peer(peer.clone()),
                    pieces: i..i + 1,
                    deadline: now + self.config.stall_timeout,
                });
                self.transmits
                    .push_back(Transmit::Request { peer, piece: i });
                peer_requests += 1;
            }
        }
        // The origin: pieces no usable peer has, in order, in ranges.
        if self.origin_allowed && self.origin_retry_at <= now {
            let mut ranges = self
                .outstanding
                .iter()
                .filter(|o| o.source == Source::Origin)
                .count() as u32;
            let mut i = self.next_missing;
            while ranges < self.config.origin_ranges && i < n {
                // A piece whose hash is unknown is never asked of a peer (nothing could check
                // it), so a peer claiming it is no source: only the origin is.
                let fetchable = |s: &Self, i: u32| {
                    !s.have.get(i)
                        && s.inflight[i as usize] == 0
                        && (s.avail[i as usize] == 0 || s.hashes[i as usize].is_none())
                };
                if !fetchable(self, i) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < n && i - start < self.config.origin_range_pieces && fetchable(self, i) {
                    self.inc_inflight(i);
                    i += 1;
                }
                self.outstanding.push(Outstanding {
                    source: Source::Origin,
                    pieces: start..i,
                    deadline: now + self.config.stall_timeout,
                });
                self.transmits
                    .push_back(Transmit::FetchOrigin { pieces: start..i });
                ranges += 1;
            }
        }
        if self.outstanding.is_empty() {
            self.idle_since.get_or_insert(now);
        } else {
            self.idle_since = None;
        }
    }
}

/// Admission of pieces to upload: bounds the uploads in flight in all and per peer, so a
/// popular node answers `Busy` quickly instead of queueing requests until they stall.
///
/// With [`spread`](UploadSlots::spread) on (while the agent holds the blob's origin slot and so
/// has pieces nobody else has), a piece already sent once is refused with `TryOthers` while the
/// uplink is in use and some held piece has not been sent yet: the seeder's upload then goes to
/// new pieces, each leaving it about once, and the swarm copies them onwards ("super-seeding").
#[derive(Debug)]
pub struct UploadSlots<P: PeerKey> {
    max_total: u32,
    max_per_peer: u32,
    total: u32,
    per_peer: BTreeMap<P, u32>,
    /// Pieces sent at least once, when spreading.
    sent: Option<Bitmap>,
}

impl<P: PeerKey> UploadSlots<P> {
    pub fn new(max_total: u32, max_per_peer: u32) -> UploadSlots<P> {
        UploadSlots {
            max_total,
            max_per_peer,
            total: 0,
            per_peer: BTreeMap::new(),
            sent: None,
        }
    }

    /// Turns spreading on for a blob of `pieces` pieces (keeping what was sent so far), or off.
    pub fn spread(&mut self, pieces: Option<u32>) {
        match pieces {
            Some(n) if self.sent.as_ref().is_some_and(|s| s.len() == n) => {}
            Some(n) => self.sent = Some(Bitmap::new(n)),
            None => self.sent = None,
        }
    }

    /// Takes a slot to upload `piece` to `peer`, or says why not. `have`: the pieces this
    /// agent holds (the caller has checked it holds `piece`).
    pub fn try_admit(&mut self, peer: &P, piece: u32, have: &Bitmap) -> Result<(), RejectReason> {
        let n = self.per_peer.get(peer).copied().unwrap_or(0);
        if self.total >= self.max_total || n >= self.max_per_peer {
            return Err(RejectReason::Busy);
        }
        if let Some(sent) = &mut self.sent {
            let unsent_held = have
                .words()
                .iter()
                .zip(sent.words())
                .any(|(h, s)| h & !s != 0);
            if sent.get(piece) && self.total > 0 && unsent_held {
                return Err(RejectReason::TryOthers);
            }
            sent.set(piece);
        }
        self.total += 1;
        self.per_peer.insert(peer.clone(), n + 1);
        Ok(())
    }

    /// The upload finished (sent, cancelled, or failed).
    pub fn release(&mut self, peer: &P) {
        if let Some(n) = self.per_peer.get_mut(peer) {
            *n -= 1;
            self.total -= 1;
            if *n == 0 {
                self.per_peer.remove(peer);
            }
        }
    }

    /// Uploads in flight: the load an agent reports to the tracker.
    pub fn load(&self) -> u32 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Algorithm;
    use crate::manifest::PieceHasher;
    use crate::piece::MIN_PIECE_LEN;

    const PL: usize = MIN_PIECE_LEN as usize;

    struct Blob {
        data: Vec<u8>,
        manifest: PieceManifest,
    }

    impl Blob {
        fn new(pieces: usize) -> Blob {
            let mut r = Rng::new(pieces as u64);
            // Last piece short.
            let data: Vec<u8> = (0..pieces * PL - 100).map(|_| r.next_u64() as u8).collect();
            let mut h = PieceHasher::new(data.len() as u64, Algorithm::Sha256).unwrap();
            h.update(&data).unwrap();
            let manifest = h.finish(&Digest::sha256_of(&data)).unwrap();
            Blob { data, manifest }
        }
        fn piece(&self, i: u32) -> &[u8] {
            let r = self.manifest.geometry().range(i).unwrap();
            &self.data[r.start as usize..r.end as usize]
        }
    }

    fn t(ms: u64) -> Time {
        Time::from_millis(ms)
    }

    fn swarm(blob: &Blob, config: SwarmConfig) -> Swarm<u32> {
        let mut s = Swarm::new(blob.manifest.digest().clone(), config, t(0));
        assert!(s.handle_manifest(&blob.manifest));
        s
    }

    fn transmits(s: &mut Swarm<u32>, now: Time) -> Vec<Transmit<u32>> {
        std::iter::from_fn(|| s.poll_transmit(now)).collect()
    }

    fn events(s: &mut Swarm<u32>) -> Vec<Event<u32>> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    fn requests(tx: &[Transmit<u32>]) -> Vec<(u32, u32)> {
        tx.iter()
            .filter_map(|t| match t {
                Transmit::Request { peer, piece } => Some((*peer, *piece)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn downloads_from_several_peers_and_verifies_real_pieces() {
        let blob = Blob::new(6);
        let mut s = swarm(
            &blob,
            SwarmConfig {
                max_requests_per_peer: 2,
                ..SwarmConfig::default()
            },
        );
        s.handle_have(&1, &Bitmap::full(6));
        s.handle_have(&2, &Bitmap::full(6));
        let mut now = t(0);
        while !s.is_complete() {
            let tx = transmits(&mut s, now);
            let reqs = requests(&tx);
            assert!(!reqs.is_empty(), "stuck at {:?}", s.have());
            for peer in [1, 2] {
                assert!(reqs.iter().filter(|r| r.0 == peer).count() <= 2);
            }
            for (peer, piece) in reqs {
                // End game may have asked both peers for the last pieces.
                let out = s.handle_piece(Source::Peer(peer), piece, blob.piece(piece), now);
                assert!(matches!(
                    out,
                    PieceOutcome::Verified | PieceOutcome::Duplicate
                ));
            }
            now = now + Duration::from_millis(10);
        }
        let ev = events(&mut s);
        assert_eq!(
            ev.iter()
                .filter(|e| matches!(e, Event::PieceVerified { .. }))
                .count(),
            6
        );
        assert_eq!(ev.last(), Some(&Event::Complete));
        assert_eq!(s.stats().from_peers, 6);
        assert!(s.poll_timeout().is_none());
        // Both peers were used.
        assert_eq!(s.stats().from_origin, 0);
    }

    #[test]
    fn priority_window_then_rarest_first() {
        let blob = Blob::new(20);
        let mut s = swarm(
            &blob,
            SwarmConfig {
                priority_window: 3,
                max_requests_per_peer: 5,
                ..SwarmConfig::default()
            },
        );
        // Peer 1 has everything; peer 2 has 0..3 as well, so the window (0, 1, 2) has two
        // sources; peers 2..=4 have 10..20, so 3..10 (only at peer 1) are the rarest.
        s.handle_have(&1, &Bitmap::full(20));
        let mut common = Bitmap::new(20);
        for i in 10..20 {
            common.set(i);
        }
        let mut two = common.clone();
        for i in 0..3 {
            two.set(i);
        }
        s.handle_have(&2, &two);
        s.handle_have(&3, &common);
        s.handle_have(&4, &common);
        let reqs = requests(&transmits(&mut s, t(0)));
        let mut window: Vec<u32> = reqs.iter().map(|r| r.1).filter(|&i| i < 3).collect();
        window.sort();
        assert_eq!(window, vec![0, 1, 2]);
        let from1: Vec<u32> = reqs.iter().filter(|r| r.0 == 1).map(|r| r.1).collect();
        assert!(from1.iter().all(|&i| i < 10), "{from1:?}");
        assert!(from1.iter().filter(|&&i| i >= 3).count() >= 2, "{from1:?}");
        assert!(
            reqs.iter()
                .filter(|r| r.0 != 1)
                .all(|r| r.1 >= 10 || r.1 < 3)
        );
    }

    #[test]
    fn the_window_skips_pieces_with_a_single_source() {
        let blob = Blob::new(10);
        let mut s = swarm(&blob, SwarmConfig::default());
        let mut tail = Bitmap::new(10);
        for i in 5..10 {
            tail.set(i);
        }
        // Only peer 1 has 0..5; pieces 5..10 are everywhere.
        s.handle_have(&1, &Bitmap::full(10));
        s.handle_have(&2, &tail);
        s.handle_have(&3, &tail);
        let reqs = requests(&transmits(&mut s, t(0)));
        // Peer 1 is asked for its rare pieces, not for everyone's next ones.
        assert!(
            reqs.iter().filter(|r| r.0 == 1).all(|r| r.1 < 5),
            "{reqs:?}"
        );
    }

    #[test]
    fn bad_pieces_get_a_peer_quarantined_and_reported() {
        let blob = Blob::new(4);
        let mut s = swarm(
            &blob,
            SwarmConfig {
                max_requests_per_peer: 4,
                priority_window: 0,
                ..SwarmConfig::default()
            },
        );
        s.handle_have(&66, &Bitmap::full(4));
        let reqs = requests(&transmits(&mut s, t(0)));
        assert_eq!(reqs.len(), 4);
        let mut junk = blob.piece(reqs[0].1).to_vec();
        junk[7] ^= 0x40;
        assert_eq!(
            s.handle_piece(Source::Peer(66), reqs[0].1, &junk, t(1)),
            PieceOutcome::Rejected
        );
        // Wrong length is as bad as a wrong hash.
        assert_eq!(
            s.handle_piece(Source::Peer(66), reqs[1].1, &junk[..10], t(1)),
            PieceOutcome::Rejected
        );
        let ev = events(&mut s);
        assert!(ev.contains(&Event::ReportBadPeer {
            peer: 66,
            piece: reqs[1].1
        }));
        assert!(!s.have().get(reqs[0].1));
        // Its other requests are cancelled and nothing more is asked of it.
        let tx = transmits(&mut s, t(1));
        assert_eq!(
            tx.iter()
                .filter(|t| matches!(t, Transmit::Cancel { peer: 66, .. }))
                .count(),
            2
        );
        assert!(requests(&tx).is_empty());
        // An honest peer gets everything asked again.
        s.handle_have(&7, &Bitmap::full(4));
        let reqs = requests(&transmits(&mut s, t(2)));
        assert_eq!(reqs.len(), 4);
        assert!(reqs.iter().all(|r| r.0 == 7));
        assert_eq!(s.usable_peers(), 1);
    }

    #[test]
    fn stalled_requests_move_to_another_peer_then_to_the_origin() {
        let blob = Blob::new(2);
        let cfg = SwarmConfig {
            priority_window: 0,
            max_requests_per_peer: 1,
            ..SwarmConfig::default()
        };
        let stall = cfg.stall_timeout;
        let mut s = swarm(&blob, cfg);
        let mut only0 = Bitmap::new(2);
        only0.set(0);
        s.handle_have(&1, &only0);
        assert_eq!(requests(&transmits(&mut s, t(0))), vec![(1, 0)]);
        assert_eq!(s.poll_timeout(), Some(t(0) + stall));
        // Peer 2 appears; after the stall, piece 0 goes to it.
        s.handle_have(&2, &Bitmap::full(2));
        let tx = transmits(&mut s, t(10));
        assert_eq!(requests(&tx), vec![(2, 1)]);
        let late = t(10) + stall;
        s.handle_timeout(late);
        let tx = transmits(&mut s, late);
        assert!(tx.contains(&Transmit::Cancel { peer: 1, piece: 0 }));
        assert!(tx.contains(&Transmit::Cancel { peer: 2, piece: 1 }));
        assert_eq!(s.stats().stalls, 2);
        // Both peers are backing off; the origin slot comes: pieces no peer has go there.
        // Here every piece is at some peer, so nothing goes to the origin yet.
        s.set_origin(true, late);
        assert!(
            !transmits(&mut s, late)
                .iter()
                .any(|t| matches!(t, Transmit::FetchOrigin { .. }))
        );
        // The peers vanish: the origin gets both pieces as one range.
        s.remove_peer(&1);
        s.remove_peer(&2);
        let tx = transmits(&mut s, t(6000));
        assert_eq!(tx, vec![Transmit::FetchOrigin { pieces: 0..2 }]);
        for i in 0..2 {
            assert_eq!(
                s.handle_piece(Source::Origin, i, blob.piece(i), t(6100)),
                PieceOutcome::Verified
            );
        }
        assert!(s.is_complete());
        assert_eq!(s.stats().from_origin, 2);
    }

    #[test]
    fn a_seeder_reads_the_origin_and_computes_hashes() {
        let blob = Blob::new(10);
        let mut s: Swarm<u32> = Swarm::new(
            blob.manifest.digest().clone(),
            SwarmConfig {
                origin_ranges: 2,
                origin_range_pieces: 3,
                ..SwarmConfig::default()
            },
            t(0),
        );
        // Nothing to do without a size.
        s.set_origin(true, t(0));
        assert!(transmits(&mut s, t(0)).is_empty());
        assert!(s.set_size(blob.data.len() as u64));
        assert!(!s.set_size(1));
        let tx = transmits(&mut s, t(0));
        assert_eq!(
            tx,
            vec![
                Transmit::FetchOrigin { pieces: 0..3 },
                Transmit::FetchOrigin { pieces: 3..6 }
            ]
        );
        for i in 0..3 {
            s.handle_piece(Source::Origin, i, blob.piece(i), t(100));
        }
        let ev = events(&mut s);
        assert!(ev.contains(&Event::HashComputed {
            piece: 1,
            hash: *blob.manifest.hash(1).unwrap()
        }));
        // The finished range makes room for the next one.
        let tx = transmits(&mut s, t(100));
        assert!(tx.contains(&Transmit::FetchOrigin { pieces: 6..9 }));
        assert!(tx.contains(&Transmit::Have { piece: 0 }));
        // The origin stream for 3..6 stalls: cancelled, asked again.
        s.handle_timeout(t(100) + Duration::from_secs(5));
        let tx = transmits(&mut s, t(5100));
        assert!(tx.contains(&Transmit::CancelOrigin { pieces: 3..6 }));
        assert!(tx.contains(&Transmit::FetchOrigin { pieces: 3..6 }));
        // Losing the slot cancels what is in flight.
        s.set_origin(false, t(5200));
        let tx = transmits(&mut s, t(5200));
        assert!(
            tx.iter()
                .all(|t| matches!(t, Transmit::CancelOrigin { .. }))
        );
        assert_eq!(tx.len(), 2);
        // The anchored manifest agrees: nothing discarded.
        assert!(s.handle_manifest(&blob.manifest));
        assert!(
            !events(&mut s)
                .iter()
                .any(|e| matches!(e, Event::PieceDiscarded { .. }))
        );
    }

    #[test]
    fn pieces_peers_claim_without_a_known_hash_come_from_the_origin() {
        // A peer claims the whole blob before any hash is known (a liar, or a holder whose
        // manifest the tracker lost): nothing can be asked of it, so the origin must be.
        let blob = Blob::new(6);
        let mut s: Swarm<u32> = Swarm::new(
            blob.manifest.digest().clone(),
            SwarmConfig {
                origin_ranges: 2,
                origin_range_pieces: 3,
                ..SwarmConfig::default()
            },
            t(0),
        );
        s.add_peer(7);
        assert!(s.set_size(blob.data.len() as u64));
        s.handle_have(&7, &Bitmap::full(6));
        s.set_origin(true, t(0));
        let tx = transmits(&mut s, t(0));
        assert!(requests(&tx).is_empty(), "{tx:?}");
        assert_eq!(
            tx,
            vec![
                Transmit::FetchOrigin { pieces: 0..3 },
                Transmit::FetchOrigin { pieces: 3..6 }
            ]
        );
        // Once a piece's hash is known, the peer is a source for it again.
        let mut s = swarm(&blob, SwarmConfig::default());
        s.add_peer(7);
        s.handle_have(&7, &Bitmap::full(6));
        s.set_origin(true, t(0));
        let tx = transmits(&mut s, t(0));
        assert_eq!(requests(&tx).len(), 4, "{tx:?}");
        assert!(
            !tx.iter()
                .any(|t| matches!(t, Transmit::FetchOrigin { pieces } if pieces.start < 4)),
            "{tx:?}"
        );
    }

    #[test]
    fn pieces_wait_for_their_hash_and_bad_provisional_hashes_are_undone() {
        let blob = Blob::new(3);
        let d = blob.manifest.digest().clone();
        let mut s: Swarm<u32> = Swarm::new(d.clone(), SwarmConfig::default(), t(0));
        s.handle_have(&1, &Bitmap::full(3));
        let hashes = |entries| PieceHashes {
            digest: d.clone(),
            size: blob.manifest.size(),
            piece_len: blob.manifest.piece_len(),
            entries,
        };
        // A wrong provisional hash for piece 0, the right one for piece 1, none for piece 2.
        assert!(s.handle_hashes(&hashes(vec![
            (0, piece_hash(b"lie")),
            (1, *blob.manifest.hash(1).unwrap())
        ])));
        let mut reqs = requests(&transmits(&mut s, t(0)));
        reqs.sort();
        assert_eq!(reqs, vec![(1, 0), (1, 1)]);
        // Bytes that match the lie, fed through the hashed entry point.
        let len0 = blob.piece(0).len() as u64;
        assert_eq!(
            s.handle_piece_hashed(Source::Peer(1), 0, len0, piece_hash(b"lie"), t(1)),
            PieceOutcome::Verified
        );
        s.handle_piece(Source::Peer(1), 1, blob.piece(1), t(1));
        // The anchored manifest contradicts piece 0: discarded and asked again, with piece 2.
        assert!(s.handle_manifest(&blob.manifest));
        assert!(events(&mut s).contains(&Event::PieceDiscarded { piece: 0 }));
        assert!(!s.have().get(0));
        let mut reqs = requests(&transmits(&mut s, t(2)));
        reqs.sort();
        assert_eq!(reqs, vec![(1, 0), (1, 2)]);
        // Wrong digest or geometry is ignored.
        let other =
            PieceManifest::new(Digest::sha256_of(b"o"), 1, MIN_PIECE_LEN, vec![[0; 32]]).unwrap();
        assert!(!s.handle_manifest(&other));
    }

    #[test]
    fn busy_peers_back_off_and_endgame_duplicates_are_cancelled() {
        let blob = Blob::new(2);
        let mut s = swarm(
            &blob,
            SwarmConfig {
                max_requests_per_peer: 2,
                ..SwarmConfig::default()
            },
        );
        s.handle_have(&1, &Bitmap::full(2));
        let mut reqs = requests(&transmits(&mut s, t(0)));
        reqs.sort();
        assert_eq!(reqs, vec![(1, 0), (1, 1)]);
        s.handle_reject(&1, 0, RejectReason::Busy, t(1));
        assert!(requests(&transmits(&mut s, t(1))).is_empty());
        let wake = s.poll_timeout().unwrap();
        assert!(wake > t(1) && wake <= t(1) + Duration::from_millis(400));
        s.handle_timeout(wake);
        assert_eq!(requests(&transmits(&mut s, wake)), vec![(1, 0)]);
        // A second peer: everything missing is in flight, so it gets duplicates.
        s.handle_have(&2, &Bitmap::full(2));
        let mut reqs = requests(&transmits(&mut s, wake));
        reqs.sort();
        assert_eq!(reqs, vec![(2, 0), (2, 1)]);
        s.handle_piece(Source::Peer(2), 0, blob.piece(0), wake);
        let tx = transmits(&mut s, wake);
        assert!(tx.contains(&Transmit::Cancel { peer: 1, piece: 0 }));
        // A late copy is a harmless duplicate.
        assert_eq!(
            s.handle_piece(Source::Peer(1), 0, blob.piece(0), wake),
            PieceOutcome::Duplicate
        );
        // NotHave: the peer's bitmap is corrected.
        s.handle_reject(&1, 1, RejectReason::NotHave, wake);
        assert_eq!(s.avail[1], 1);
    }

    #[test]
    fn starvation_is_reported_and_repeats() {
        let blob = Blob::new(2);
        let cfg = SwarmConfig::default();
        let starve = cfg.starve_timeout;
        let mut s = swarm(&blob, cfg);
        assert!(transmits(&mut s, t(0)).is_empty());
        assert_eq!(s.poll_timeout(), Some(t(0) + starve));
        s.handle_timeout(t(0) + starve);
        assert_eq!(events(&mut s), vec![Event::Starved]);
        assert_eq!(s.poll_timeout(), Some(t(0) + starve * 2));
        // A peer with pieces ends it.
        s.handle_have(&1, &Bitmap::full(2));
        transmits(&mut s, t(0) + starve);
        assert_eq!(s.poll_timeout(), Some(t(0) + starve + cfg_stall()));
    }

    fn cfg_stall() -> Duration {
        SwarmConfig::default().stall_timeout
    }

    #[test]
    fn hostile_inputs_are_ignored() {
        let blob = Blob::new(2);
        let mut s = swarm(&blob, SwarmConfig::default());
        // Bitmaps of the wrong length, pieces out of range, unknown peers, stray answers.
        s.handle_have(&1, &Bitmap::full(5));
        assert_eq!(s.avail, vec![0, 0]);
        s.handle_have_piece(&1, 99);
        assert_eq!(
            s.handle_piece(Source::Peer(9), 0, blob.piece(0), t(0)),
            PieceOutcome::Unexpected
        );
        assert_eq!(
            s.handle_piece(Source::Peer(1), 7, b"x", t(0)),
            PieceOutcome::Rejected
        );
        s.handle_reject(&1, 0, RejectReason::Busy, t(0));
        s.handle_origin_error(0..100, t(0));
        // An unsolicited but correct piece is welcome.
        assert_eq!(
            s.handle_piece(Source::Peer(1), 0, blob.piece(0), t(0)),
            PieceOutcome::Verified
        );
        // Empty blob: complete at once.
        let mut e: Swarm<u32> = Swarm::new(Digest::sha256_of(b""), SwarmConfig::default(), t(0));
        assert!(e.set_size(0));
        assert!(e.is_complete());
        assert_eq!(events(&mut e), vec![Event::Complete]);
        // Too big to swarm.
        let mut big: Swarm<u32> = Swarm::new(Digest::sha256_of(b"b"), SwarmConfig::default(), t(0));
        assert!(!big.set_size(u64::MAX));
    }

    #[test]
    fn upload_slots_bound_total_and_per_peer() {
        let have = Bitmap::full(4);
        let mut u = UploadSlots::new(3, 2);
        assert_eq!(u.try_admit(&1, 0, &have), Ok(()));
        assert_eq!(u.try_admit(&1, 0, &have), Ok(()));
        assert_eq!(u.try_admit(&1, 0, &have), Err(RejectReason::Busy));
        assert_eq!(u.try_admit(&2, 0, &have), Ok(()));
        assert_eq!(u.try_admit(&3, 0, &have), Err(RejectReason::Busy));
        assert_eq!(u.load(), 3);
        u.release(&1);
        u.release(&9); // unknown: ignored
        assert_eq!(u.try_admit(&3, 0, &have), Ok(()));
        assert_eq!(u.load(), 3);
    }

    #[test]
    fn spreading_sends_each_piece_once_while_others_are_unsent() {
        let mut have = Bitmap::new(4);
        have.set(0);
        have.set(1);
        let mut u = UploadSlots::new(8, 8);
        u.spread(Some(4));
        assert_eq!(u.try_admit(&1, 0, &have), Ok(()));
        // Piece 1 was never sent: piece 0 goes elsewhere.
        assert_eq!(u.try_admit(&2, 0, &have), Err(RejectReason::TryOthers));
        assert_eq!(u.try_admit(&2, 1, &have), Ok(()));
        // Everything held was sent once: no more refusals.
        assert_eq!(u.try_admit(&3, 0, &have), Ok(()));
        // A new piece arrives: the old ones wait again, but an idle uplink serves anything.
        have.set(2);
        assert_eq!(u.try_admit(&3, 1, &have), Err(RejectReason::TryOthers));
        for p in [1, 2, 3] {
            u.release(&p);
        }
        assert_eq!(u.load(), 0);
        assert_eq!(u.try_admit(&4, 1, &have), Ok(()));
        u.spread(None);
        assert_eq!(u.try_admit(&4, 1, &have), Ok(()));
    }

    #[test]
    fn try_others_defers_one_piece_at_one_peer() {
        let blob = Blob::new(2);
        let mut s = swarm(&blob, SwarmConfig::default());
        s.handle_have(&1, &Bitmap::full(2));
        let mut reqs = requests(&transmits(&mut s, t(0)));
        reqs.sort();
        assert_eq!(reqs, vec![(1, 0), (1, 1)]);
        s.handle_reject(&1, 0, RejectReason::TryOthers, t(1));
        // Not asked again at once, but another peer may be.
        assert!(requests(&transmits(&mut s, t(1))).is_empty());
        s.handle_have(&2, &Bitmap::full(2));
        let reqs = requests(&transmits(&mut s, t(1)));
        assert!(reqs.contains(&(2, 0)), "{reqs:?}");
        // After the deferral, peer 1 may be asked for it again.
        let mut s = swarm(&blob, SwarmConfig::default());
        s.handle_have(&1, &Bitmap::full(2));
        transmits(&mut s, t(0));
        s.handle_reject(&1, 0, RejectReason::TryOthers, t(1));
        let wake = s.poll_timeout().unwrap();
        assert_eq!(wake, t(1) + Duration::from_secs(1));
        s.handle_timeout(wake);
        assert_eq!(requests(&transmits(&mut s, wake)), vec![(1, 0)]);
    }
}

#[cfg(test)]
mod robustness {
    use super::*;
    use crate::piece::MIN_PIECE_LEN;

    /// Random, partly hostile sequences of inputs (wrong lengths, unknown peers, out-of-range
    /// pieces, stray answers, lies): the swarm never panics and its bookkeeping stays
    /// consistent (debug builds would panic on any counter underflow).
    #[test]
    fn random_inputs_never_panic() {
        for seed in 0..40u64 {
            let mut rng = Rng::new(seed);
            let count = 1 + rng.below(70) as u32;
            let size = u64::from(count) * MIN_PIECE_LEN - rng.below(1000);
            let digest = Digest::sha256_of(&seed.to_be_bytes());
            let hashes: Vec<PieceHash> = (0..count)
                .map(|i| piece_hash(&[i as u8, seed as u8]))
                .collect();
            let g = Geometry::for_size(size);
            let mut s: Swarm<u8> = Swarm::new(
                digest.clone(),
                SwarmConfig {
                    seed,
                    ..SwarmConfig::default()
                },
                Time::ZERO,
            );
            let mut now = Time::ZERO;
            for _ in 0..600 {
                now = now + Duration::from_millis(rng.below(700));
                let peer = rng.below(6) as u8;
                let piece = rng.below(u64::from(count) + 3) as u32;
                match rng.below(14) {
                    0 => {
                        s.set_size(if rng.chance(0.9) { size } else { size / 2 });
                    }
                    1 => {
                        let entries = (0..count)
                            .filter(|_| rng.chance(0.3))
                            .map(|i| (i, hashes[i as usize]))
                            .collect();
                        s.handle_hashes(&PieceHashes {
                            digest: digest.clone(),
                            size,
                            piece_len: g.piece_len(),
                            entries,
                        });
                    }
                    2 => {
                        let mut b = Bitmap::new(if rng.chance(0.9) { count } else { count + 1 });
                        for i in 0..count {
                            if rng.chance(0.5) {
                                b.set(i);
                            }
                        }
                        s.handle_have(&peer, &b);
                    }
                    3 => s.handle_have_piece(&peer, piece),
                    4 => s.remove_peer(&peer),
                    5 => {
                        let reason = [
                            RejectReason::Busy,
                            RejectReason::NotHave,
                            RejectReason::TryOthers,
                            RejectReason::UnknownBlob,
                        ][rng.below(4) as usize];
                        s.handle_reject(&peer, piece, reason, now);
                    }
                    6 | 7 => {
                        let good = rng.chance(0.7);
                        let hash = match hashes.get(piece as usize) {
                            Some(h) if good => *h,
                            _ => piece_hash(b"junk"),
                        };
                        let len = g.range(piece).map_or(7, |r| r.end - r.start);
                        let source = if rng.chance(0.2) {
                            Source::Origin
                        } else {
                            Source::Peer(peer)
                        };
                        s.handle_piece_hashed(source, piece, len, hash, now);
                    }
                    8 => s.set_origin(rng.chance(0.5), now),
                    9 => s.handle_origin_error(piece..piece + 3, now),
                    10 => s.handle_data_progress(&Source::Peer(peer), piece, now),
                    11 => {
                        if let Ok(m) =
                            PieceManifest::new(digest.clone(), size, g.piece_len(), hashes.clone())
                        {
                            s.handle_manifest(&m);
                        }
                    }
                    _ => s.handle_timeout(now),
                }
                while s.poll_transmit(now).is_some() {}
                while s.poll_event().is_some() {}
                // Bookkeeping: requests in flight match the outstanding list.
                let outstanding: u32 = s.outstanding.iter().map(|o| o.pieces.len() as u32).sum();
                let inflight: u32 = s.inflight.iter().map(|&c| u32::from(c)).sum();
                assert_eq!(outstanding, inflight, "seed {seed}");
                let per_peer: u32 = s.peers.values().map(|p| p.inflight).sum();
                let peer_out = s
                    .outstanding
                    .iter()
                    .filter(|o| o.source != Source::Origin)
                    .count() as u32;
                assert_eq!(per_peer, peer_out, "seed {seed}");
            }
        }
    }
}
