//! The coordinator's tracker, sans IO: who holds which blob, which peers to suggest, and who
//! may fetch a blob from the origin.
//!
//! The coordinator feeds it the control messages it receives (`handle_*`, with `now`), sends
//! what [`Tracker::poll_transmit`] yields to the named agents, and calls
//! [`Tracker::poll_expire`] when [`Tracker::poll_timeout`] says so. State is soft: agents
//! re-announce periodically and everything not refreshed expires, so a restarted (or newly
//! responsible) coordinator rebuilds it from announcements alone.
//!
//! Origin protection: each blob has at most `origin_slots_per_blob` seeders, agents allowed to
//! fetch it from the origin. Everyone else that asked waits in line and downloads from the
//! seeders and each other. A seeder that makes no progress for `seeder_stall`, disconnects, or
//! is quarantined loses its slot to the next agent in line, which is told with a
//! [`CoordMsg::OriginSlot`].
//!
//! Several coordinators share the load by rendezvous hashing of the digest
//! ([`owner_coordinator`], [`coordinator_order`]); they share no state.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use sha2::Digest as _;

use crate::digest::Digest;
use crate::manifest::{PieceHash, PieceManifest, check_geometry};
use crate::msg::{
    AgentMsg, Announce, CoordMsg, Hello, LocateReply, MAX_PEERS, MsgError, NodeId,
    PROTOCOL_VERSION, PeerInfo, PieceHashes, Zone,
};
use crate::piece::Bitmap;
use crate::rng::Rng;
use crate::time::Time;

/// Holders asked in turn for a blob's manifest before the origin is read again instead.
pub const MAX_MANIFEST_ASKS: usize = 3;

/// Tracker settings; the defaults suit a cluster on one LAN.
#[derive(Clone, Debug)]
pub struct TrackerConfig {
    /// Most peers suggested in one locate reply (capped at [`MAX_PEERS`]).
    pub max_peers: usize,
    /// Agents allowed to fetch one blob from the origin at the same time.
    pub origin_slots_per_blob: usize,
    /// A seeder without progress for this long loses its slot to an agent in line.
    pub seeder_stall: Duration,
    /// A node not heard from (any message) for this long is gone, with all it held.
    pub node_ttl: Duration,
    /// An announced holding not refreshed for this long is forgotten.
    pub holding_ttl: Duration,
    /// Distinct nodes that must report a peer for bad pieces before it is quarantined. Two by
    /// default, so one lying node cannot get an honest peer quarantined on its own.
    pub reports_to_quarantine: usize,
    /// How long a quarantined node is left out of every suggestion and slot.
    pub quarantine: Duration,
    /// Anchored manifests kept (oldest dropped first).
    pub max_manifests: usize,
    /// How long a holder asked for a blob's manifest ([`CoordMsg::ManifestWanted`]) gets to
    /// answer before another holder is asked or, after [`MAX_MANIFEST_ASKS`], the origin slot
    /// is granted after all. Downloaders wait in line meanwhile.
    pub manifest_wait: Duration,
    /// Seed of the tracker's RNG (tie-breaks between equally good peers).
    pub seed: u64,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            max_peers: 16,
            origin_slots_per_blob: 1,
            seeder_stall: Duration::from_secs(5),
            node_ttl: Duration::from_secs(30),
            holding_ttl: Duration::from_secs(120),
            reports_to_quarantine: 2,
            quarantine: Duration::from_secs(600),
            max_manifests: 10_000,
            manifest_wait: Duration::from_secs(2),
            seed: 0,
        }
    }
}

/// Why the tracker refused a control message. None of these is fatal to the tracker; the
/// coordinator logs them and, for `UnknownNode` and `Version`, closes the session.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrackerError {
    #[error("node {0} has not said hello")]
    UnknownNode(NodeId),
    #[error("node {node} speaks protocol version {version}, this coordinator {PROTOCOL_VERSION}")]
    Version { node: NodeId, version: u16 },
    #[error("node {node} published hashes for {digest} without holding its origin slot")]
    NotSeeder { node: NodeId, digest: Digest },
    #[error("node {node} published hashes for {digest} that conflict with the known ones")]
    Conflict { node: NodeId, digest: Digest },
    #[error("invalid message from {node}: {error}")]
    Invalid { node: NodeId, error: MsgError },
}

struct Node {
    addr: SocketAddr,
    zone: Zone,
    /// Uploads in flight, as last reported.
    load: u32,
    /// Times suggested to other agents since the last load report: spreads a burst of
    /// simultaneous locates over several peers instead of piling onto the least loaded one.
    handed: u32,
    last_seen: Time,
    /// Distinct nodes that reported this one for bad pieces.
    reporters: BTreeSet<NodeId>,
    quarantined_until: Option<Time>,
}

impl Node {
    fn quarantined(&self, now: Time) -> bool {
        self.quarantined_until.is_some_and(|t| t > now)
    }
}

struct Holding {
    complete: bool,
    pieces: u32,
    last_seen: Time,
}

struct Seeder {
    node: NodeId,
    last_progress: Time,
    pieces: u32,
}

struct Provisional {
    size: u64,
    piece_len: u64,
    hashes: Vec<Option<PieceHash>>,
}

#[derive(Default)]
struct Blob {
    holders: BTreeMap<NodeId, Holding>,
    /// Agents downloading it (they located it and are not complete): who gets hash updates.
    interested: BTreeSet<NodeId>,
    seeders: Vec<Seeder>,
    /// Agents that asked for the origin and were not granted, oldest first.
    waiting: VecDeque<NodeId>,
    /// Agents that ever held a slot: they read the blob from the origin and may publish its
    /// anchored manifest.
    publishers: BTreeSet<NodeId>,
    provisional: Option<Provisional>,
    /// Holders asked for the manifest, and until when the last one may answer.
    manifest_asks: Vec<NodeId>,
    manifest_until: Option<Time>,
}

impl Blob {
    fn is_empty(&self) -> bool {
        self.holders.is_empty()
            && self.interested.is_empty()
            && self.seeders.is_empty()
            && self.waiting.is_empty()
    }
}

/// The tracker state machine. See the module documentation.
pub struct Tracker {
    config: TrackerConfig,
    rng: Rng,
    nodes: BTreeMap<NodeId, Node>,
    blobs: BTreeMap<Digest, Blob>,
    manifests: BTreeMap<Digest, PieceManifest>,
    manifest_order: VecDeque<Digest>,
    out: VecDeque<(NodeId, CoordMsg)>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("nodes", &self.nodes.len())
            .field("blobs", &self.blobs.len())
            .field("manifests", &self.manifests.len())
            .finish()
    }
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl Tracker {
    pub fn new(config: TrackerConfig) -> Tracker {
        Tracker {
            rng: Rng::new(config.seed),
            config,
            nodes: BTreeMap::new(),
            blobs: BTreeMap::new(),
            manifests: BTreeMap::new(),
            manifest_order: VecDeque::new(),
            out: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &TrackerConfig {
        &self.config
    }

    /// Dispatches one control message from `node` (already authenticated by its certificate;
    /// the coordinator checked that a `Hello` names the certificate's node). Returns the direct
    /// answer, if the message has one.
    pub fn handle(
        &mut self,
        node: &NodeId,
        msg: AgentMsg,
        now: Time,
    ) -> Result<Option<CoordMsg>, TrackerError> {
        match msg {
            AgentMsg::Hello(h) => self.handle_hello(&h, now).map(Some),
            AgentMsg::Heartbeat { load } => self.handle_heartbeat(node, load, now).map(|_| None),
            AgentMsg::Announce(a) => self.handle_announce(node, &a, now).map(|_| None),
            AgentMsg::Withdraw { digests } => {
                self.handle_withdraw(node, &digests, now).map(|_| None)
            }
            AgentMsg::Progress { digest, have } => self
                .handle_progress(node, &digest, &have, now)
                .map(|_| None),
            AgentMsg::Locate {
                req,
                digest,
                want_origin,
            } => self
                .handle_locate(node, req, &digest, want_origin, now)
                .map(|r| Some(CoordMsg::LocateReply(r))),
            AgentMsg::PublishHashes(h) => self.handle_publish_hashes(node, &h, now).map(|_| None),
            AgentMsg::PublishManifest(m) => {
                self.handle_publish_manifest(node, m, now).map(|_| None)
            }
            AgentMsg::ReleaseOrigin { digest } => {
                self.handle_release_origin(node, &digest, now).map(|_| None)
            }
            AgentMsg::ReportBadPeer {
                peer,
                digest,
                piece,
            } => self
                .handle_report_bad_peer(node, &peer, &digest, piece, now)
                .map(|_| None),
            AgentMsg::Bye => {
                self.handle_disconnect(node, now);
                Ok(None)
            }
            // Renewal is the coordinator's business (its CA answers); for the tracker it is
            // only a sign of life.
            AgentMsg::Renew { .. } => self.touch(node, now).map(|_| None),
        }
    }

    /// Registers (or refreshes) a node. Returns the `Welcome` to send back.
    pub fn handle_hello(&mut self, hello: &Hello, now: Time) -> Result<CoordMsg, TrackerError> {
        if hello.version != PROTOCOL_VERSION {
            return Err(TrackerError::Version {
                node: hello.node.clone(),
                version: hello.version,
            });
        }
        let node = self
            .nodes
            .entry(hello.node.clone())
            .or_insert_with(|| Node {
                addr: hello.peer_addr,
                zone: hello.zone.clone(),
                load: 0,
                handed: 0,
                last_seen: now,
                reporters: BTreeSet::new(),
                quarantined_until: None,
            });
        node.addr = hello.peer_addr;
        node.zone = hello.zone.clone();
        node.last_seen = now;
        Ok(CoordMsg::Welcome {
            version: PROTOCOL_VERSION,
            heartbeat_ms: millis(self.config.node_ttl / 3),
            announce_ms: millis(self.config.holding_ttl / 3),
        })
    }

    fn touch(&mut self, node: &NodeId, now: Time) -> Result<&mut Node, TrackerError> {
        let n = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| TrackerError::UnknownNode(node.clone()))?;
        n.last_seen = now;
        Ok(n)
    }

    pub fn handle_heartbeat(
        &mut self,
        node: &NodeId,
        load: u32,
        now: Time,
    ) -> Result<(), TrackerError> {
        let n = self.touch(node, now)?;
        n.load = load;
        n.handed = 0;
        Ok(())
    }

    pub fn handle_announce(
        &mut self,
        node: &NodeId,
        announce: &Announce,
        now: Time,
    ) -> Result<(), TrackerError> {
        self.touch(node, now)?;
        for d in &announce.complete {
            self.mark_complete(node, d, now);
        }
        for p in &announce.partial {
            self.record_pieces(node, &p.digest, &p.have, now);
        }
        Ok(())
    }

    pub fn handle_withdraw(
        &mut self,
        node: &NodeId,
        digests: &[Digest],
        now: Time,
    ) -> Result<(), TrackerError> {
        self.touch(node, now)?;
        for d in digests {
            if let Some(b) = self.blobs.get_mut(d) {
                b.holders.remove(node);
            }
        }
        Ok(())
    }

    /// Pieces of `digest` verified by `node` so far. Growth is what keeps a seeder's slot.
    pub fn handle_progress(
        &mut self,
        node: &NodeId,
        digest: &Digest,
        have: &Bitmap,
        now: Time,
    ) -> Result<(), TrackerError> {
        self.touch(node, now)?;
        self.record_pieces(node, digest, have, now);
        Ok(())
    }

    fn record_pieces(&mut self, node: &NodeId, digest: &Digest, have: &Bitmap, now: Time) {
        if have.is_complete() {
            self.mark_complete(node, digest, now);
            return;
        }
        let pieces = have.count_ones();
        let b = self.blobs.entry(digest.clone()).or_default();
        let h = b.holders.entry(node.clone()).or_insert(Holding {
            complete: false,
            pieces: 0,
            last_seen: now,
        });
        h.pieces = pieces;
        h.last_seen = now;
        if let Some(s) = b.seeders.iter_mut().find(|s| &s.node == node)
            && pieces > s.pieces
        {
            s.pieces = pieces;
            s.last_progress = now;
        }
    }

    fn mark_complete(&mut self, node: &NodeId, digest: &Digest, now: Time) {
        let b = self.blobs.entry(digest.clone()).or_default();
        b.holders.insert(
            node.clone(),
            Holding {
                complete: true,
                pieces: u32::MAX,
                last_seen: now,
            },
        );
        b.interested.remove(node);
        b.waiting.retain(|n| n != node);
        b.seeders.retain(|s| &s.node != node);
        // A complete copy whose pieces can be checked: nobody needs the origin for this blob
        // any more. (Without the manifest, the claim proves nothing; see `handle_locate`.)
        if self.manifests.contains_key(digest) {
            b.waiting.clear();
        }
    }

    /// Answers a locate: the manifest (or provisional hashes), up to `max_peers` peers, and
    /// whether the asker may fetch from the origin.
    pub fn handle_locate(
        &mut self,
        node: &NodeId,
        req: u32,
        digest: &Digest,
        want_origin: bool,
        now: Time,
    ) -> Result<LocateReply, TrackerError> {
        self.touch(node, now)?;
        let asker_zone = self.nodes[node].zone.clone();
        let manifest_pending = self.ask_for_manifest(digest, now);
        let b = self.blobs.entry(digest.clone()).or_default();
        let complete = b.holders.get(node).is_some_and(|h| h.complete);
        if !complete {
            b.interested.insert(node.clone());
        }

        // Candidates: holders, seeders, and other downloaders (they will have pieces soon, and
        // connecting early lets their `Have`s flow).
        let mut tier: BTreeMap<&NodeId, u8> = BTreeMap::new();
        for (n, h) in &b.holders {
            tier.insert(n, if h.complete || h.pieces > 0 { 0 } else { 1 });
        }
        for s in &b.seeders {
            tier.insert(&s.node, 0);
        }
        for n in &b.interested {
            tier.entry(n).or_insert(1);
        }
        let mut ranked: Vec<(usize, u8, u64, u64, &NodeId)> = Vec::with_capacity(tier.len());
        for (n, t) in tier {
            if n == node {
                continue;
            }
            let Some(info) = self.nodes.get(n) else {
                continue;
            };
            if info.quarantined(now) {
                continue;
            }
            let load = u64::from(info.load) + u64::from(info.handed);
            ranked.push((
                asker_zone.locality(&info.zone),
                t,
                load,
                self.rng.next_u64(),
                n,
            ));
        }
        // Closest first, then useful now, then least loaded, then random.
        ranked.sort_unstable_by(|a, b| {
            b.0.cmp(&a.0)
                .then(a.1.cmp(&b.1))
                .then(a.2.cmp(&b.2))
                .then(a.3.cmp(&b.3))
        });
        let max = self.config.max_peers.min(MAX_PEERS);
        let chosen: Vec<NodeId> = ranked.iter().take(max).map(|r| r.4.clone()).collect();

        // Origin slot. A complete copy only makes the origin unnecessary when its pieces can
        // be checked, i.e. with the anchored manifest known here: a "complete" claim without
        // one (a liar, or a holder whose manifest this coordinator never saw) would otherwise
        // keep every downloader from the origin with nothing verifiable to fetch instead.
        let has_complete = self.manifests.contains_key(digest)
            && b.holders
                .iter()
                .any(|(n, h)| h.complete && self.nodes.get(n).is_some_and(|i| !i.quarantined(now)));
        let mut origin = b.seeders.iter().any(|s| &s.node == node);
        if !origin && want_origin && !complete {
            if b.seeders.len() < self.config.origin_slots_per_blob
                && !has_complete
                && !manifest_pending
            {
                b.seeders.push(Seeder {
                    node: node.clone(),
                    last_progress: now,
                    pieces: b.holders.get(node).map_or(0, |h| h.pieces),
                });
                b.publishers.insert(node.clone());
                b.waiting.retain(|n| n != node);
                origin = true;
            } else if !b.waiting.contains(node) {
                b.waiting.push_back(node.clone());
            }
        }

        let hashes = if self.manifests.contains_key(digest) {
            None
        } else {
            b.provisional.as_ref().map(|p| PieceHashes {
                digest: digest.clone(),
                size: p.size,
                piece_len: p.piece_len,
                entries: p
                    .hashes
                    .iter()
                    .enumerate()
                    .filter_map(|(i, h)| h.map(|h| (i as u32, h)))
                    .collect(),
            })
        };
        let mut peers = Vec::with_capacity(chosen.len());
        for n in chosen {
            let info = self.nodes.get_mut(&n).expect("ranked nodes exist");
            info.handed = info.handed.saturating_add(1);
            peers.push(PeerInfo {
                node: n,
                addr: info.addr,
                zone: info.zone.clone(),
                load: info.load.saturating_add(info.handed),
            });
        }
        Ok(LocateReply {
            req,
            digest: digest.clone(),
            manifest: self.manifests.get(digest).cloned(),
            hashes,
            peers,
            origin,
        })
    }

    /// Provisional hashes from a seeder. New ones are relayed to every agent downloading the
    /// blob; a hash that contradicts a known one is refused (the first stays).
    pub fn handle_publish_hashes(
        &mut self,
        node: &NodeId,
        hashes: &PieceHashes,
        now: Time,
    ) -> Result<(), TrackerError> {
        self.touch(node, now)?;
        hashes.validate().map_err(|error| TrackerError::Invalid {
            node: node.clone(),
            error,
        })?;
        let not_seeder = || TrackerError::NotSeeder {
            node: node.clone(),
            digest: hashes.digest.clone(),
        };
        let conflict = || TrackerError::Conflict {
            node: node.clone(),
            digest: hashes.digest.clone(),
        };
        if let Some(m) = self.manifests.get(&hashes.digest) {
            // Already anchored: nothing to relay, but a contradiction is still worth an error.
            let agrees = m.size() == hashes.size
                && m.piece_len() == hashes.piece_len
                && hashes.entries.iter().all(|(i, h)| m.hash(*i) == Some(h));
            return if agrees { Ok(()) } else { Err(conflict()) };
        }
        let b = self.blobs.get_mut(&hashes.digest).ok_or_else(not_seeder)?;
        let Some(seeder) = b.seeders.iter_mut().find(|s| &s.node == node) else {
            return Err(not_seeder());
        };
        seeder.last_progress = now;
        let g =
            check_geometry(hashes.size, hashes.piece_len).map_err(|e| TrackerError::Invalid {
                node: node.clone(),
                error: e.into(),
            })?;
        let p = b.provisional.get_or_insert_with(|| Provisional {
            size: hashes.size,
            piece_len: hashes.piece_len,
            hashes: vec![None; g.count() as usize],
        });
        if p.size != hashes.size || p.piece_len != hashes.piece_len {
            return Err(conflict());
        }
        let mut fresh = Vec::new();
        let mut contradicted = false;
        for &(i, h) in &hashes.entries {
            match &mut p.hashes[i as usize] {
                slot @ None => {
                    *slot = Some(h);
                    fresh.push((i, h));
                }
                Some(known) if *known == h => {}
                Some(_) => contradicted = true,
            }
        }
        if !fresh.is_empty() {
            let update = PieceHashes {
                digest: hashes.digest.clone(),
                size: hashes.size,
                piece_len: hashes.piece_len,
                entries: fresh,
            };
            for n in b.interested.iter().filter(|n| *n != node) {
                self.out
                    .push_back((n.clone(), CoordMsg::Hashes(update.clone())));
            }
        }
        if contradicted {
            Err(conflict())
        } else {
            Ok(())
        }
    }

    /// An anchored manifest from an agent that held the blob's origin slot (and so read it
    /// from the origin and checked its digest), or from an agent holding the whole blob while
    /// nothing about its pieces is known here (see below). Refused from anyone else, or when it
    /// contradicts the provisional hashes or a manifest already known.
    ///
    /// Agents keep the manifests of the blobs they hold and publish them again when a blob
    /// moves to another coordinator (its owner failed, or this one restarted): without one, a
    /// complete copy cannot be checked, so every downloader here would be sent to the origin
    /// again. Such a manifest is accepted on the terms of a first slot request (which any
    /// member may make, and whose holder publishes the hashes everyone then checks against):
    /// only while this tracker knows neither a manifest nor a provisional hash of the blob. A
    /// liar gains no more than by asking for the slot first; the whole-blob digest check at
    /// commit still catches a wrong manifest, and the agents that hit it read the origin
    /// directly next time. Once adopted, the origin is not needed any more: the slot holders
    /// (who have published nothing) lose their slots, and the downloaders here get the hashes.
    pub fn handle_publish_manifest(
        &mut self,
        node: &NodeId,
        manifest: PieceManifest,
        now: Time,
    ) -> Result<(), TrackerError> {
        self.touch(node, now)?;
        let digest = manifest.digest().clone();
        let conflict = || TrackerError::Conflict {
            node: node.clone(),
            digest: digest.clone(),
        };
        if let Some(known) = self.manifests.get(&digest) {
            return if *known == manifest {
                Ok(())
            } else {
                Err(conflict())
            };
        }
        let Some(b) = self.blobs.get(&digest) else {
            return Err(TrackerError::NotSeeder {
                node: node.clone(),
                digest,
            });
        };
        let adopted = !b.publishers.contains(node);
        if adopted && (b.provisional.is_some() || !b.holders.get(node).is_some_and(|h| h.complete))
        {
            return Err(TrackerError::NotSeeder {
                node: node.clone(),
                digest,
            });
        }
        if let Some(p) = &b.provisional {
            let agrees = p.size == manifest.size()
                && p.piece_len == manifest.piece_len()
                && p.hashes
                    .iter()
                    .zip(manifest.hashes())
                    .all(|(a, b)| a.is_none_or(|a| a == *b));
            if !agrees {
                return Err(conflict());
            }
        }
        self.insert_manifest(manifest.clone());
        if adopted {
            self.adopt_manifest(node, &manifest, now);
        }
        Ok(())
    }

    /// A manifest republished by a holder (see [`Tracker::handle_publish_manifest`]): the
    /// downloaders of the blob get its hashes, and the origin slots end.
    fn adopt_manifest(&mut self, holder: &NodeId, manifest: &PieceManifest, now: Time) {
        let digest = manifest.digest();
        let Some(b) = self.blobs.get(digest) else {
            return;
        };
        let update = PieceHashes {
            digest: digest.clone(),
            size: manifest.size(),
            piece_len: manifest.piece_len(),
            entries: (0u32..).zip(manifest.hashes().iter().copied()).collect(),
        };
        for n in b.interested.iter().filter(|n| *n != holder) {
            self.out
                .push_back((n.clone(), CoordMsg::Hashes(update.clone())));
        }
        let seeders: Vec<NodeId> = b.seeders.iter().map(|s| s.node.clone()).collect();
        // The manifest is known by now, so `revoke` hands the slots to nobody.
        for s in seeders {
            self.revoke(digest, &s, now);
        }
        if let Some(b) = self.blobs.get_mut(digest) {
            b.waiting.clear();
        }
    }

    /// Stores a manifest the coordinator computed itself (it read the whole blob from the
    /// origin and the digest matched): the most trusted source.
    pub fn insert_manifest(&mut self, manifest: PieceManifest) {
        let digest = manifest.digest().clone();
        if let Some(b) = self.blobs.get_mut(&digest) {
            b.provisional = None;
            b.manifest_asks.clear();
            b.manifest_until = None;
        }
        if self.manifests.insert(digest.clone(), manifest).is_none() {
            self.manifest_order.push_back(digest);
        }
        while self.manifests.len() > self.config.max_manifests {
            let Some(old) = self.manifest_order.pop_front() else {
                break;
            };
            self.manifests.remove(&old);
        }
    }

    pub fn manifest(&self, digest: &Digest) -> Option<&PieceManifest> {
        self.manifests.get(digest)
    }

    pub fn handle_release_origin(
        &mut self,
        node: &NodeId,
        digest: &Digest,
        now: Time,
    ) -> Result<(), TrackerError> {
        self.touch(node, now)?;
        if let Some(b) = self.blobs.get_mut(digest) {
            b.seeders.retain(|s| &s.node != node);
        }
        self.grant_waiting(digest, None, now);
        Ok(())
    }

    /// `reporter` received a piece from `peer` that failed verification. When enough distinct
    /// nodes report the same peer it is quarantined: suggested to nobody, stripped of its slots.
    pub fn handle_report_bad_peer(
        &mut self,
        reporter: &NodeId,
        peer: &NodeId,
        _digest: &Digest,
        _piece: u32,
        now: Time,
    ) -> Result<(), TrackerError> {
        self.touch(reporter, now)?;
        if reporter == peer {
            return Ok(());
        }
        let Some(p) = self.nodes.get_mut(peer) else {
            return Ok(());
        };
        p.reporters.insert(reporter.clone());
        if p.reporters.len() >= self.config.reports_to_quarantine.max(1) {
            p.reporters.clear();
            p.quarantined_until = Some(now + self.config.quarantine);
            let digests: Vec<Digest> = self
                .blobs
                .iter()
                .filter(|(_, b)| b.seeders.iter().any(|s| &s.node == peer))
                .map(|(d, _)| d.clone())
                .collect();
            for d in digests {
                self.revoke(&d, peer, now);
            }
        }
        Ok(())
    }

    pub fn is_quarantined(&self, node: &NodeId, now: Time) -> bool {
        self.nodes.get(node).is_some_and(|n| n.quarantined(now))
    }

    /// Every node quarantined at `now`, in name order (what the coordinator tells agents to
    /// refuse).
    pub fn quarantined_nodes(&self, now: Time) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.quarantined(now))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The session with `node` ended (closed, reset, timed out): forget it and everything it
    /// held; its origin slots go to the next agents in line.
    pub fn handle_disconnect(&mut self, node: &NodeId, now: Time) {
        if self.nodes.remove(node).is_none() {
            return;
        }
        let mut freed = Vec::new();
        for (d, b) in &mut self.blobs {
            b.holders.remove(node);
            b.interested.remove(node);
            b.waiting.retain(|n| n != node);
            let before = b.seeders.len();
            b.seeders.retain(|s| &s.node != node);
            if b.seeders.len() != before {
                freed.push(d.clone());
            }
        }
        for d in freed {
            self.grant_waiting(&d, None, now);
        }
    }

    /// Takes `node`'s slot for `digest` and gives it to the next agent in line.
    /// Whether a holder was asked for `digest`'s manifest and may still answer; asks one (the
    /// next not asked yet, up to [`MAX_MANIFEST_ASKS`]) when none is pending and the blob has
    /// holders but nothing here knows its pieces. See [`Tracker::handle_publish_manifest`].
    fn ask_for_manifest(&mut self, digest: &Digest, now: Time) -> bool {
        if self.manifests.contains_key(digest) {
            return false;
        }
        let Some(b) = self.blobs.get_mut(digest) else {
            return false;
        };
        if b.provisional.is_some() {
            b.manifest_until = None;
            return false;
        }
        if b.manifest_until.is_some_and(|t| now < t) {
            return true;
        }
        b.manifest_until = None;
        if b.manifest_asks.len() >= MAX_MANIFEST_ASKS {
            return false;
        }
        let nodes = &self.nodes;
        let Some(holder) = b
            .holders
            .iter()
            .filter(|(n, h)| {
                h.complete
                    && !b.manifest_asks.contains(n)
                    && nodes.get(*n).is_some_and(|i| !i.quarantined(now))
            })
            .map(|(n, _)| n.clone())
            .next()
        else {
            return false;
        };
        b.manifest_asks.push(holder.clone());
        b.manifest_until = Some(now + self.config.manifest_wait);
        self.out.push_back((
            holder,
            CoordMsg::ManifestWanted {
                digest: digest.clone(),
            },
        ));
        true
    }

    fn revoke(&mut self, digest: &Digest, node: &NodeId, now: Time) {
        let Some(b) = self.blobs.get_mut(digest) else {
            return;
        };
        let before = b.seeders.len();
        b.seeders.retain(|s| &s.node != node);
        if b.seeders.len() == before {
            return;
        }
        self.out.push_back((
            node.clone(),
            CoordMsg::OriginSlot {
                digest: digest.clone(),
                granted: false,
                lease_ms: 0,
            },
        ));
        self.grant_waiting(digest, Some(node), now);
        // Back in line: it may recover, and then it is as good a candidate as any.
        if let Some(b) = self.blobs.get_mut(digest)
            && self.nodes.contains_key(node)
            && !b.waiting.contains(node)
        {
            b.waiting.push_back(node.clone());
        }
    }

    fn eligible(&self, b: &Blob, n: &NodeId, exclude: Option<&NodeId>, now: Time) -> bool {
        Some(n) != exclude
            && self.nodes.get(n).is_some_and(|i| !i.quarantined(now))
            && !b.holders.get(n).is_some_and(|h| h.complete)
            && !b.seeders.iter().any(|s| &s.node == n)
    }

    /// Fills free slots of `digest` from the waiting line.
    fn grant_waiting(&mut self, digest: &Digest, exclude: Option<&NodeId>, now: Time) {
        let Some(b) = self.blobs.get(digest) else {
            return;
        };
        // As in `handle_locate`: only a complete copy whose pieces can be checked counts.
        let has_complete = self.manifests.contains_key(digest)
            && b.holders
                .iter()
                .any(|(n, h)| h.complete && self.nodes.get(n).is_some_and(|i| !i.quarantined(now)));
        if has_complete || b.manifest_until.is_some_and(|t| now < t) {
            return;
        }
        let mut granted = Vec::new();
        let mut free = self
            .config
            .origin_slots_per_blob
            .saturating_sub(b.seeders.len());
        for n in &b.waiting {
            if free == 0 {
                break;
            }
            if self.eligible(b, n, exclude, now) {
                granted.push(n.clone());
                free -= 1;
            }
        }
        let lease_ms = millis(self.config.seeder_stall);
        let b = self.blobs.get_mut(digest).expect("checked above");
        for n in granted {
            b.waiting.retain(|w| w != &n);
            b.seeders.push(Seeder {
                node: n.clone(),
                last_progress: now,
                pieces: b.holders.get(&n).map_or(0, |h| h.pieces),
            });
            b.publishers.insert(n.clone());
            self.out.push_back((
                n,
                CoordMsg::OriginSlot {
                    digest: digest.clone(),
                    granted: true,
                    lease_ms,
                },
            ));
        }
    }

    /// The next message to send, and to whom (slot grants and revocations, relayed hashes).
    pub fn poll_transmit(&mut self) -> Option<(NodeId, CoordMsg)> {
        self.out.pop_front()
    }

    /// Expires silent nodes, stale holdings and quarantines, and moves the slots of stalled
    /// seeders to agents in line.
    pub fn poll_expire(&mut self, now: Time) {
        let dead: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.last_seen + self.config.node_ttl <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for n in dead {
            self.handle_disconnect(&n, now);
        }
        for n in self.nodes.values_mut() {
            if n.quarantined_until.is_some_and(|t| t <= now) {
                n.quarantined_until = None;
            }
        }
        let ttl = self.config.holding_ttl;
        let mut stalled = Vec::new();
        for (d, b) in &mut self.blobs {
            b.holders.retain(|_, h| h.last_seen + ttl > now);
            for s in &b.seeders {
                if s.last_progress + self.config.seeder_stall <= now {
                    stalled.push((d.clone(), s.node.clone()));
                }
            }
        }
        let unanswered: Vec<Digest> = self
            .blobs
            .iter()
            .filter(|(_, b)| b.manifest_until.is_some_and(|t| t <= now))
            .map(|(d, _)| d.clone())
            .collect();
        for d in unanswered {
            if !self.ask_for_manifest(&d, now) {
                self.grant_waiting(&d, None, now);
            }
        }
        for (d, n) in stalled {
            // Only worth moving when someone else can take it.
            let b = &self.blobs[&d];
            if b.waiting.iter().any(|w| self.eligible(b, w, Some(&n), now)) {
                self.revoke(&d, &n, now);
            }
        }
        self.blobs.retain(|_, b| !b.is_empty());
    }

    /// When [`poll_expire`](Tracker::poll_expire) next has something to do. Scans all state;
    /// call it after a batch of inputs, not after each.
    pub fn poll_timeout(&self) -> Option<Time> {
        let nodes = self.nodes.values().flat_map(|n| {
            [
                Some(n.last_seen + self.config.node_ttl),
                n.quarantined_until,
            ]
            .into_iter()
            .flatten()
        });
        let blobs = self.blobs.values().flat_map(|b| {
            let holders = b
                .holders
                .values()
                .map(|h| h.last_seen + self.config.holding_ttl);
            let seeders = b
                .seeders
                .iter()
                .filter(|_| !b.waiting.is_empty())
                .map(|s| s.last_progress + self.config.seeder_stall);
            holders.chain(seeders).chain(b.manifest_until)
        });
        nodes.chain(blobs).min()
    }

    /// Current seeders of `digest` (for tests, metrics and logs).
    pub fn seeders(&self, digest: &Digest) -> Vec<NodeId> {
        self.blobs
            .get(digest)
            .map(|b| b.seeders.iter().map(|s| s.node.clone()).collect())
            .unwrap_or_default()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
}

/// Rendezvous weight of `coordinator` for `digest`: the first 8 bytes of
/// SHA-256(id ‖ 0x00 ‖ digest string). Stable across processes and versions.
fn rendezvous_weight(coordinator: &str, digest: &Digest) -> u64 {
    let mut h = sha2::Sha256::new();
    h.update(coordinator.as_bytes());
    h.update([0]);
    h.update(digest.to_string().as_bytes());
    let out = h.finalize();
    let mut w = [0u8; 8];
    w.copy_from_slice(&out[..8]);
    u64::from_be_bytes(w)
}

/// The coordinator that owns `digest`'s swarm: highest random weight over `coordinators`
/// (their configured ids, e.g. host names). `None` for an empty list. Removing a coordinator
/// moves only the digests it owned.
pub fn owner_coordinator<S: AsRef<str>>(digest: &Digest, coordinators: &[S]) -> Option<usize> {
    coordinator_order(digest, coordinators).first().copied()
}

/// All coordinators by decreasing weight for `digest`: where to go when the owner is
/// unreachable (the next one, and so on). Ties (practically impossible) go to the lower index.
pub fn coordinator_order<S: AsRef<str>>(digest: &Digest, coordinators: &[S]) -> Vec<usize> {
    let mut w: Vec<(u64, usize)> = coordinators
        .iter()
        .enumerate()
        .map(|(i, c)| (rendezvous_weight(c.as_ref(), digest), i))
        .collect();
    w.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    w.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::Partial;
    use crate::piece::MIN_PIECE_LEN;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn digest() -> Digest {
        Digest::sha256_of(b"layer")
    }

    fn t(ms: u64) -> Time {
        Time::from_millis(ms)
    }

    fn hello(tr: &mut Tracker, name: &str, zone: &str, now: Time) {
        let n = tr.nodes.len() as u16;
        tr.handle_hello(
            &Hello {
                node: id(name),
                zone: Zone::new(zone).unwrap(),
                version: PROTOCOL_VERSION,
                peer_addr: SocketAddr::from(([10, 0, (n >> 8) as u8, n as u8], 4433)),
            },
            now,
        )
        .unwrap();
    }

    fn drain(tr: &mut Tracker) -> Vec<(NodeId, CoordMsg)> {
        std::iter::from_fn(|| tr.poll_transmit()).collect()
    }

    #[test]
    fn unknown_nodes_and_versions_are_refused() {
        let mut tr = Tracker::new(TrackerConfig::default());
        assert_eq!(
            tr.handle_locate(&id("x"), 1, &digest(), true, t(0)),
            Err(TrackerError::UnknownNode(id("x")))
        );
        let bad = Hello {
            node: id("x"),
            zone: Zone::default(),
            version: 99,
            peer_addr: "127.0.0.1:1".parse().unwrap(),
        };
        assert!(matches!(
            tr.handle_hello(&bad, t(0)),
            Err(TrackerError::Version { .. })
        ));
    }

    #[test]
    fn one_origin_slot_then_peers() {
        let mut tr = Tracker::new(TrackerConfig::default());
        for i in 0..5 {
            hello(&mut tr, &format!("n{i}"), "", t(0));
        }
        let r0 = tr
            .handle_locate(&id("n0"), 1, &digest(), true, t(0))
            .unwrap();
        assert!(r0.origin);
        assert!(r0.peers.is_empty());
        let r1 = tr
            .handle_locate(&id("n1"), 2, &digest(), true, t(1))
            .unwrap();
        assert!(!r1.origin);
        assert_eq!(r1.req, 2);
        // The seeder comes first: it is the only one with (soon) something to give.
        assert_eq!(r1.peers[0].node, id("n0"));
        // Asking again keeps the slot with its holder.
        assert!(
            tr.handle_locate(&id("n0"), 3, &digest(), true, t(2))
                .unwrap()
                .origin
        );
        assert_eq!(tr.seeders(&digest()), vec![id("n0")]);
        // With two slots configured, a second agent gets one.
        let mut tr2 = Tracker::new(TrackerConfig {
            origin_slots_per_blob: 2,
            ..TrackerConfig::default()
        });
        for i in 0..3 {
            hello(&mut tr2, &format!("n{i}"), "", t(0));
        }
        let granted: Vec<bool> = (0..3)
            .map(|i| {
                tr2.handle_locate(&id(&format!("n{i}")), 0, &digest(), true, t(0))
                    .unwrap()
                    .origin
            })
            .collect();
        assert_eq!(granted, vec![true, true, false]);
    }

    #[test]
    fn a_complete_claim_without_a_manifest_does_not_hold_back_the_origin() {
        // A node claims a blob nobody has read yet (or whose manifest this coordinator never
        // saw): nothing it would send could be checked, so the origin slot is still granted,
        // and the line of waiting agents is not cleared by the claim.
        let mut tr = Tracker::new(TrackerConfig::default());
        for n in ["liar", "a", "b"] {
            hello(&mut tr, n, "", t(0));
        }
        let claim = Announce {
            complete: vec![digest()],
            partial: vec![],
        };
        tr.handle_announce(&id("liar"), &claim, t(0)).unwrap();
        // The claimant is asked for the manifest it should have kept; the line waits for its
        // answer, for a while.
        let r = tr
            .handle_locate(&id("a"), 0, &digest(), true, t(1))
            .unwrap();
        assert!(
            !r.origin,
            "the holder gets a chance to publish the manifest first"
        );
        assert!(r.peers.iter().any(|p| p.node == id("liar")));
        assert_eq!(
            drain(&mut tr),
            vec![(id("liar"), CoordMsg::ManifestWanted { digest: digest() })]
        );
        let wait = tr.config().manifest_wait;
        assert_eq!(tr.poll_timeout(), Some(t(1) + wait));
        tr.poll_expire(t(1) + wait);
        let granted = drain(&mut tr);
        assert!(
            granted
                .iter()
                .any(|(n, m)| *n == id("a")
                    && matches!(m, CoordMsg::OriginSlot { granted: true, .. })),
            "no answer: the slot is granted after all, {granted:?}"
        );
        // Asked once; no second holder to ask, so nothing holds the origin back any more.
        let later = t(1) + wait + Duration::from_millis(1);
        let r = tr
            .handle_locate(&id("b"), 0, &digest(), true, later)
            .unwrap();
        assert!(!r.origin);
        assert!(drain(&mut tr).is_empty());
        tr.handle_announce(&id("liar"), &claim, later).unwrap();
        // The seeder gives up: b, still in line, gets the slot.
        tr.handle_release_origin(&id("a"), &digest(), later)
            .unwrap();
        let granted: Vec<(NodeId, CoordMsg)> = std::iter::from_fn(|| tr.poll_transmit()).collect();
        assert!(
            granted
                .iter()
                .any(|(n, m)| *n == id("b")
                    && matches!(m, CoordMsg::OriginSlot { granted: true, .. })),
            "{granted:?}"
        );
        // Once the manifest is known, a complete copy does make the origin unnecessary.
        tr.insert_manifest(PieceManifest::new(digest(), 0, MIN_PIECE_LEN, vec![]).unwrap());
        hello(&mut tr, "c", "", t(4));
        let r = tr
            .handle_locate(&id("c"), 0, &digest(), true, t(4))
            .unwrap();
        assert!(!r.origin);
    }

    #[test]
    fn peers_prefer_zone_then_load_and_are_bounded() {
        let mut tr = Tracker::new(TrackerConfig {
            max_peers: 4,
            ..TrackerConfig::default()
        });
        hello(&mut tr, "asker", "dc1/r1", t(0));
        for i in 0..10 {
            let zone = if i < 2 {
                "dc1/r1"
            } else if i < 5 {
                "dc1/r2"
            } else {
                "dc2"
            };
            let name = format!("h{i}");
            hello(&mut tr, &name, zone, t(0));
            tr.handle_heartbeat(&id(&name), i, t(0)).unwrap();
            tr.handle_announce(
                &id(&name),
                &Announce {
                    complete: vec![digest()],
                    partial: vec![],
                },
                t(0),
            )
            .unwrap();
        }
        // A complete copy exists and its manifest is known: no origin for anyone.
        tr.insert_manifest(PieceManifest::new(digest(), 0, MIN_PIECE_LEN, vec![]).unwrap());
        let r = tr
            .handle_locate(&id("asker"), 0, &digest(), true, t(1))
            .unwrap();
        assert!(!r.origin);
        let names: Vec<&str> = r.peers.iter().map(|p| p.node.as_str()).collect();
        assert_eq!(names, vec!["h0", "h1", "h2", "h3"]);
        // Suggestions count as load until the next heartbeat: a second asker in dc2 is sent
        // elsewhere within its zone.
        hello(&mut tr, "asker2", "dc2", t(0));
        let r = tr
            .handle_locate(&id("asker2"), 0, &digest(), false, t(1))
            .unwrap();
        let names: Vec<&str> = r.peers.iter().take(5).map(|p| p.node.as_str()).collect();
        assert_eq!(&names[..4], &["h5", "h6", "h7", "h8"]);
        assert_eq!(r.peers.len(), 4);
    }

    #[test]
    fn random_tie_breaks_spread_suggestions() {
        let mut tr = Tracker::new(TrackerConfig {
            max_peers: 2,
            ..TrackerConfig::default()
        });
        for i in 0..20 {
            hello(&mut tr, &format!("n{i}"), "", t(0));
            tr.handle_locate(&id(&format!("n{i}")), 0, &digest(), false, t(0))
                .unwrap();
        }
        let mut seen = BTreeSet::new();
        for i in 0..20 {
            for p in tr
                .handle_locate(&id(&format!("n{i}")), 0, &digest(), false, t(0))
                .unwrap()
                .peers
            {
                seen.insert(p.node);
            }
        }
        assert!(seen.len() >= 15, "{}", seen.len());
    }

    #[test]
    fn stalled_seeder_loses_its_slot_to_the_next_in_line() {
        let cfg = TrackerConfig::default();
        let stall = cfg.seeder_stall;
        let mut tr = Tracker::new(cfg);
        for n in ["a", "b", "c"] {
            hello(&mut tr, n, "", t(0));
        }
        assert!(
            tr.handle_locate(&id("a"), 0, &digest(), true, t(0))
                .unwrap()
                .origin
        );
        assert!(
            !tr.handle_locate(&id("b"), 0, &digest(), true, t(0))
                .unwrap()
                .origin
        );
        assert!(
            !tr.handle_locate(&id("c"), 0, &digest(), true, t(0))
                .unwrap()
                .origin
        );
        // Progress keeps the slot.
        let mut have = Bitmap::new(10);
        have.set(0);
        tr.handle_progress(&id("a"), &digest(), &have, t(3000))
            .unwrap();
        tr.poll_expire(t(3000) + stall - Duration::from_millis(1));
        assert_eq!(tr.seeders(&digest()), vec![id("a")]);
        assert!(tr.poll_timeout().unwrap() <= t(3000) + stall);
        // The same bitmap again is not progress.
        tr.handle_progress(&id("a"), &digest(), &have, t(6000))
            .unwrap();
        tr.poll_expire(t(3000) + stall);
        assert_eq!(tr.seeders(&digest()), vec![id("b")]);
        let out = drain(&mut tr);
        assert!(out.contains(&(
            id("a"),
            CoordMsg::OriginSlot {
                digest: digest(),
                granted: false,
                lease_ms: 0
            }
        )));
        assert!(out.contains(&(
            id("b"),
            CoordMsg::OriginSlot {
                digest: digest(),
                granted: true,
                lease_ms: 5000
            }
        )));
        // b disconnects: c gets the slot at once.
        tr.handle_disconnect(&id("b"), t(9000));
        assert_eq!(tr.seeders(&digest()), vec![id("c")]);
        // A seeder alone in its swarm keeps its slot however slow it is.
        let mut solo = Tracker::new(TrackerConfig::default());
        hello(&mut solo, "a", "", t(0));
        solo.handle_locate(&id("a"), 0, &digest(), true, t(0))
            .unwrap();
        solo.poll_expire(t(20_000));
        assert_eq!(solo.seeders(&digest()), vec![id("a")]);
    }

    #[test]
    fn completion_releases_the_slot_and_silence_expires_nodes() {
        let mut tr = Tracker::new(TrackerConfig::default());
        for n in ["a", "b"] {
            hello(&mut tr, n, "", t(0));
        }
        tr.handle_locate(&id("a"), 0, &digest(), true, t(0))
            .unwrap();
        tr.handle_locate(&id("b"), 0, &digest(), true, t(0))
            .unwrap();
        tr.handle_progress(&id("a"), &digest(), &Bitmap::full(4), t(100))
            .unwrap();
        assert!(tr.seeders(&digest()).is_empty());
        // Nobody needs the origin now: b is not granted even though it waited.
        tr.poll_expire(t(20_000));
        assert!(tr.seeders(&digest()).is_empty());
        assert!(drain(&mut tr).is_empty());
        // b keeps talking, a goes silent and expires.
        tr.handle_heartbeat(&id("b"), 0, t(25_000)).unwrap();
        tr.poll_expire(t(31_000));
        assert_eq!(tr.node_count(), 1);
        let r = tr
            .handle_locate(&id("b"), 0, &digest(), true, t(31_000))
            .unwrap();
        assert!(r.peers.is_empty());
        assert!(r.origin, "the only complete copy is gone: b may seed");
    }

    #[test]
    fn announcements_are_soft_state() {
        let mut tr = Tracker::new(TrackerConfig::default());
        for n in ["a", "b"] {
            hello(&mut tr, n, "", t(0));
        }
        let mut have = Bitmap::new(8);
        have.set(1);
        tr.handle_announce(
            &id("a"),
            &Announce {
                complete: vec![],
                partial: vec![Partial {
                    digest: digest(),
                    have,
                }],
            },
            t(0),
        )
        .unwrap();
        let r = tr
            .handle_locate(&id("b"), 0, &digest(), false, t(1))
            .unwrap();
        assert_eq!(r.peers.len(), 1);
        // Heartbeats keep the node but not the holding.
        for s in (10..=130).step_by(10) {
            tr.handle_heartbeat(&id("a"), 0, t(s * 1000)).unwrap();
            tr.handle_heartbeat(&id("b"), 0, t(s * 1000)).unwrap();
            tr.poll_expire(t(s * 1000));
        }
        tr.handle_withdraw(&id("b"), &[], t(130_000)).unwrap();
        let r = tr
            .handle_locate(&id("b"), 0, &digest(), false, t(130_000))
            .unwrap();
        assert!(r.peers.is_empty(), "{:?}", r.peers);
    }

    #[test]
    fn hashes_come_from_the_seeder_only_and_are_relayed() {
        let mut tr = Tracker::new(TrackerConfig::default());
        for n in ["s", "x", "y"] {
            hello(&mut tr, n, "", t(0));
        }
        tr.handle_locate(&id("s"), 0, &digest(), true, t(0))
            .unwrap();
        tr.handle_locate(&id("x"), 0, &digest(), true, t(0))
            .unwrap();
        let h = |entries: Vec<(u32, PieceHash)>| PieceHashes {
            digest: digest(),
            size: 3 * MIN_PIECE_LEN,
            piece_len: MIN_PIECE_LEN,
            entries,
        };
        assert!(matches!(
            tr.handle_publish_hashes(&id("x"), &h(vec![(0, [1; 32])]), t(1)),
            Err(TrackerError::NotSeeder { .. })
        ));
        tr.handle_publish_hashes(&id("s"), &h(vec![(0, [1; 32])]), t(1))
            .unwrap();
        assert_eq!(
            drain(&mut tr),
            vec![(id("x"), CoordMsg::Hashes(h(vec![(0, [1; 32])])))]
        );
        // A contradiction is refused, the first hash stays; repeats are not relayed again.
        assert!(matches!(
            tr.handle_publish_hashes(&id("s"), &h(vec![(0, [2; 32]), (1, [3; 32])]), t(2)),
            Err(TrackerError::Conflict { .. })
        ));
        assert_eq!(
            drain(&mut tr),
            vec![(id("x"), CoordMsg::Hashes(h(vec![(1, [3; 32])])))]
        );
        // A late asker gets everything known so far.
        let r = tr
            .handle_locate(&id("y"), 0, &digest(), false, t(3))
            .unwrap();
        assert_eq!(r.hashes, Some(h(vec![(0, [1; 32]), (1, [3; 32])])));
        assert!(r.manifest.is_none());
        // The anchored manifest must agree with them, and come from a slot holder.
        let wrong =
            PieceManifest::new(digest(), 3 * MIN_PIECE_LEN, MIN_PIECE_LEN, vec![[9; 32]; 3])
                .unwrap();
        assert!(tr.handle_publish_manifest(&id("s"), wrong, t(4)).is_err());
        let right = PieceManifest::new(
            digest(),
            3 * MIN_PIECE_LEN,
            MIN_PIECE_LEN,
            vec![[1; 32], [3; 32], [4; 32]],
        )
        .unwrap();
        assert!(matches!(
            tr.handle_publish_manifest(&id("y"), right.clone(), t(4)),
            Err(TrackerError::NotSeeder { .. })
        ));
        tr.handle_publish_manifest(&id("s"), right.clone(), t(4))
            .unwrap();
        let r = tr
            .handle_locate(&id("y"), 0, &digest(), false, t(5))
            .unwrap();
        assert_eq!(r.manifest, Some(right));
        assert_eq!(r.hashes, None);
    }

    #[test]
    fn a_holder_republishes_its_manifest_where_nothing_is_known() {
        // The blob's coordinator failed; this one knows only that `h` holds it whole. `s` was
        // granted the slot and has read nothing yet, `w` waits in line.
        let mut tr = Tracker::new(TrackerConfig::default());
        for n in ["h", "s", "w"] {
            hello(&mut tr, n, "", t(0));
        }
        assert!(
            tr.handle_locate(&id("s"), 0, &digest(), true, t(0))
                .unwrap()
                .origin
        );
        assert!(
            !tr.handle_locate(&id("w"), 0, &digest(), true, t(0))
                .unwrap()
                .origin
        );
        let manifest = PieceManifest::new(
            digest(),
            2 * MIN_PIECE_LEN,
            MIN_PIECE_LEN,
            vec![[5; 32], [6; 32]],
        )
        .unwrap();
        // Only from a node holding the whole blob.
        assert!(matches!(
            tr.handle_publish_manifest(&id("w"), manifest.clone(), t(1)),
            Err(TrackerError::NotSeeder { .. })
        ));
        let complete = Announce {
            complete: vec![digest()],
            partial: vec![],
        };
        tr.handle_announce(&id("h"), &complete, t(1)).unwrap();
        drain(&mut tr);
        tr.handle_publish_manifest(&id("h"), manifest.clone(), t(2))
            .unwrap();
        let sent = drain(&mut tr);
        let hashes = CoordMsg::Hashes(PieceHashes {
            digest: digest(),
            size: 2 * MIN_PIECE_LEN,
            piece_len: MIN_PIECE_LEN,
            entries: vec![(0, [5; 32]), (1, [6; 32])],
        });
        assert!(sent.contains(&(id("w"), hashes.clone())), "{sent:?}");
        assert!(sent.contains(&(id("s"), hashes)), "{sent:?}");
        // The origin is not needed any more: the slot ends and nobody else gets it.
        assert!(
            sent.iter()
                .any(|(n, m)| *n == id("s")
                    && matches!(m, CoordMsg::OriginSlot { granted: false, .. })),
            "{sent:?}"
        );
        assert!(
            !sent
                .iter()
                .any(|(_, m)| matches!(m, CoordMsg::OriginSlot { granted: true, .. })),
            "{sent:?}"
        );
        assert!(tr.seeders(&digest()).is_empty());
        let r = tr
            .handle_locate(&id("w"), 0, &digest(), true, t(3))
            .unwrap();
        assert!(!r.origin);
        assert_eq!(r.manifest, Some(manifest.clone()));
        assert!(r.peers.iter().any(|p| p.node == id("h")));

        // Where a slot holder already published hashes, a holder's manifest is not taken: the
        // slot holder's reading is the source.
        let mut tr = Tracker::new(TrackerConfig::default());
        for n in ["h", "s"] {
            hello(&mut tr, n, "", t(0));
        }
        tr.handle_locate(&id("s"), 0, &digest(), true, t(0))
            .unwrap();
        let first = PieceHashes {
            digest: digest(),
            size: 2 * MIN_PIECE_LEN,
            piece_len: MIN_PIECE_LEN,
            entries: vec![(0, [5; 32])],
        };
        tr.handle_publish_hashes(&id("s"), &first, t(1)).unwrap();
        tr.handle_announce(&id("h"), &complete, t(1)).unwrap();
        assert!(matches!(
            tr.handle_publish_manifest(&id("h"), manifest, t(2)),
            Err(TrackerError::NotSeeder { .. })
        ));
        assert_eq!(tr.seeders(&digest()), vec![id("s")]);
    }

    #[test]
    fn a_holder_is_asked_for_the_manifest_before_anyone_reads_the_origin_again() {
        let mut tr = Tracker::new(TrackerConfig::default());
        for n in ["h1", "h2", "d"] {
            hello(&mut tr, n, "", t(0));
        }
        let complete = Announce {
            complete: vec![digest()],
            partial: vec![],
        };
        tr.handle_announce(&id("h1"), &complete, t(0)).unwrap();
        tr.handle_announce(&id("h2"), &complete, t(0)).unwrap();
        let r = tr
            .handle_locate(&id("d"), 0, &digest(), true, t(1))
            .unwrap();
        assert!(!r.origin);
        assert_eq!(
            drain(&mut tr),
            vec![(id("h1"), CoordMsg::ManifestWanted { digest: digest() })]
        );
        // h1 does not answer (it lost the manifest): h2 is asked next.
        let wait = tr.config().manifest_wait;
        tr.poll_expire(t(1) + wait);
        assert_eq!(
            drain(&mut tr),
            vec![(id("h2"), CoordMsg::ManifestWanted { digest: digest() })]
        );
        let manifest =
            PieceManifest::new(digest(), MIN_PIECE_LEN, MIN_PIECE_LEN, vec![[7; 32]]).unwrap();
        tr.handle_publish_manifest(&id("h2"), manifest.clone(), t(2) + wait)
            .unwrap();
        let sent = drain(&mut tr);
        assert_eq!(
            sent,
            vec![(
                id("d"),
                CoordMsg::Hashes(PieceHashes {
                    digest: digest(),
                    size: MIN_PIECE_LEN,
                    piece_len: MIN_PIECE_LEN,
                    entries: vec![(0, [7; 32])],
                })
            )]
        );
        // Nobody reads the origin: the whole copies can be checked now.
        tr.poll_expire(t(3) + wait * 2);
        assert!(drain(&mut tr).is_empty());
        assert!(tr.seeders(&digest()).is_empty());
        assert_eq!(tr.manifest(&digest()), Some(&manifest));
    }

    #[test]
    fn distinct_reports_quarantine_a_peer() {
        let mut tr = Tracker::new(TrackerConfig::default());
        for n in ["bad", "a", "b", "c"] {
            hello(&mut tr, n, "", t(0));
        }
        tr.handle_locate(&id("bad"), 0, &digest(), true, t(0))
            .unwrap();
        tr.handle_locate(&id("c"), 0, &digest(), true, t(0))
            .unwrap();
        let report = |tr: &mut Tracker, who: &str| {
            tr.handle_report_bad_peer(&id(who), &id("bad"), &digest(), 0, t(1))
                .unwrap()
        };
        report(&mut tr, "a");
        report(&mut tr, "a");
        assert!(!tr.is_quarantined(&id("bad"), t(1)));
        report(&mut tr, "b");
        assert!(tr.is_quarantined(&id("bad"), t(1)));
        assert_eq!(tr.quarantined_nodes(t(1)), vec![id("bad")]);
        // It lost its slot to c, and nobody is told about it any more.
        assert_eq!(tr.seeders(&digest()), vec![id("c")]);
        let r = tr
            .handle_locate(&id("a"), 0, &digest(), false, t(2))
            .unwrap();
        assert!(r.peers.iter().all(|p| p.node != id("bad")));
        // Self-reports count for nothing.
        tr.handle_report_bad_peer(&id("c"), &id("c"), &digest(), 0, t(2))
            .unwrap();
        assert!(!tr.is_quarantined(&id("c"), t(2)));
    }

    #[test]
    fn dispatch_answers_hello_and_locate() {
        let mut tr = Tracker::new(TrackerConfig::default());
        let h = Hello {
            node: id("a"),
            zone: Zone::default(),
            version: PROTOCOL_VERSION,
            peer_addr: "127.0.0.1:9".parse().unwrap(),
        };
        assert!(matches!(
            tr.handle(&id("a"), AgentMsg::Hello(h), t(0)),
            Ok(Some(CoordMsg::Welcome { .. }))
        ));
        let r = tr.handle(
            &id("a"),
            AgentMsg::Locate {
                req: 7,
                digest: digest(),
                want_origin: true,
            },
            t(0),
        );
        assert!(matches!(
            r,
            Ok(Some(CoordMsg::LocateReply(LocateReply {
                req: 7,
                origin: true,
                ..
            })))
        ));
        assert_eq!(tr.handle(&id("a"), AgentMsg::Bye, t(1)), Ok(None));
        assert_eq!(tr.node_count(), 0);
    }

    #[test]
    fn rendezvous_is_stable_and_moves_little() {
        let coords = ["coord-a", "coord-b", "coord-c"];
        let digests: Vec<Digest> = (0..300u32)
            .map(|i| Digest::sha256_of(&i.to_be_bytes()))
            .collect();
        let owners: Vec<usize> = digests
            .iter()
            .map(|d| owner_coordinator(d, &coords).unwrap())
            .collect();
        for c in 0..3 {
            let n = owners.iter().filter(|&&o| o == c).count();
            assert!((60..=140).contains(&n), "coordinator {c} owns {n}");
        }
        // Drop coord-b: only its digests move, each to its second choice.
        let fewer = ["coord-a", "coord-c"];
        for (d, &o) in digests.iter().zip(&owners) {
            let order = coordinator_order(d, &coords);
            assert_eq!(order[0], o);
            let new = fewer[owner_coordinator(d, &fewer).unwrap()];
            if o != 1 {
                assert_eq!(new, coords[o]);
            } else {
                assert_eq!(new, coords[order[1]]);
            }
        }
        assert_eq!(owner_coordinator::<&str>(&digests[0], &[]), None);
        // Pinned value: the hash is part of the protocol between coordinators and agents.
        assert_eq!(
            coordinator_order(&Digest::sha256_of(b""), &coords),
            vec![1, 0, 2]
        );
        assert_eq!(
            rendezvous_weight("coord-b", &Digest::sha256_of(b"")),
            16_595_378_269_839_014_562
        );
    }
}

#[cfg(test)]
mod robustness {
    use super::*;
    use crate::piece::MIN_PIECE_LEN;

    /// Random sequences of control messages, from known and unknown nodes, about a few blobs:
    /// the tracker never panics, never grants more slots than configured, and only ever
    /// addresses nodes it knows.
    #[test]
    fn random_messages_never_panic() {
        for seed in 0..30u64 {
            let mut rng = Rng::new(seed);
            let mut tr = Tracker::new(TrackerConfig {
                seed,
                origin_slots_per_blob: 1 + rng.below(2) as usize,
                max_peers: 1 + rng.below(8) as usize,
                ..TrackerConfig::default()
            });
            let digests: Vec<Digest> = (0..3u8).map(|i| Digest::sha256_of(&[i])).collect();
            let names: Vec<NodeId> = (0..8)
                .map(|i| NodeId::new(&format!("n{i}")).unwrap())
                .collect();
            let mut now = Time::ZERO;
            for _ in 0..800 {
                now = now + Duration::from_millis(rng.below(3000));
                let node = &names[rng.below(8) as usize];
                let d = digests[rng.below(3) as usize].clone();
                let count = 5u32;
                let mut have = Bitmap::new(count);
                for i in 0..count {
                    if rng.chance(0.4) {
                        have.set(i);
                    }
                }
                let msg = match rng.below(12) {
                    0 => AgentMsg::Hello(Hello {
                        node: node.clone(),
                        zone: Zone::new(["", "a", "a/b", "c"][rng.below(4) as usize]).unwrap(),
                        version: if rng.chance(0.95) {
                            PROTOCOL_VERSION
                        } else {
                            7
                        },
                        peer_addr: "127.0.0.1:1".parse().unwrap(),
                    }),
                    1 => AgentMsg::Heartbeat {
                        load: rng.below(10) as u32,
                    },
                    2 => AgentMsg::Announce(Announce {
                        complete: if rng.chance(0.2) {
                            vec![d.clone()]
                        } else {
                            vec![]
                        },
                        partial: vec![crate::msg::Partial {
                            digest: d.clone(),
                            have: have.clone(),
                        }],
                    }),
                    3 => AgentMsg::Withdraw {
                        digests: vec![d.clone()],
                    },
                    4 => AgentMsg::Progress {
                        digest: d.clone(),
                        have,
                    },
                    5 | 6 => AgentMsg::Locate {
                        req: 0,
                        digest: d.clone(),
                        want_origin: rng.chance(0.8),
                    },
                    7 => AgentMsg::PublishHashes(PieceHashes {
                        digest: d.clone(),
                        size: u64::from(count) * MIN_PIECE_LEN,
                        piece_len: MIN_PIECE_LEN,
                        entries: vec![(
                            rng.below(u64::from(count)) as u32,
                            [rng.below(2) as u8; 32],
                        )],
                    }),
                    8 => AgentMsg::PublishManifest(
                        PieceManifest::new(
                            d.clone(),
                            u64::from(count) * MIN_PIECE_LEN,
                            MIN_PIECE_LEN,
                            vec![[rng.below(2) as u8; 32]; count as usize],
                        )
                        .unwrap(),
                    ),
                    9 => AgentMsg::ReleaseOrigin { digest: d.clone() },
                    10 => AgentMsg::ReportBadPeer {
                        peer: names[rng.below(8) as usize].clone(),
                        digest: d.clone(),
                        piece: 0,
                    },
                    _ => AgentMsg::Bye,
                };
                let _ = tr.handle(node, msg, now);
                if rng.chance(0.1) {
                    tr.poll_expire(now);
                }
                while let Some((to, _)) = tr.poll_transmit() {
                    assert!(names.contains(&to));
                }
                for d in &digests {
                    assert!(tr.seeders(d).len() <= tr.config().origin_slots_per_blob);
                }
                let _ = tr.poll_timeout();
            }
        }
    }
}
