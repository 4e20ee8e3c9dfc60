//! Deterministic simulation harness: the real `Tracker` and `Swarm` state machines driven by a
//! virtual clock, an in-memory network with per-node upload and download links, an origin of
//! limited bandwidth, and a seeded RNG. No sockets, no sleeps, no threads.
//!
//! Links: each node's uplink (and the origin's) serialises the pieces it sends, its downlink
//! the pieces it receives; a piece leaves when the uplink is free and arrives when both the
//! bytes are sent and the downlink had room for them, plus one latency. Control messages take
//! one latency. Piece content is a token (blob, index, genuine or not) and its "hash" is derived
//! from the token: hashing real bytes is the unit tests' business, not the simulator's.

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, VecDeque};
use std::ops::Range;
use std::time::Duration;

use shoal_proto::Digest;
use shoal_proto::manifest::PieceHash;
use shoal_proto::msg::{
    AgentMsg, CoordMsg, Hello, NodeId, PROTOCOL_VERSION, PieceHashes, RejectReason, Zone,
};
use shoal_proto::piece::{Bitmap, Geometry};
use shoal_proto::rng::Rng;
use shoal_proto::swarm::{Event, PieceOutcome, Source, Swarm, SwarmConfig, Transmit, UploadSlots};
use shoal_proto::time::Time;
use shoal_proto::tracker::{Tracker, TrackerConfig};

pub const MIB: u64 = 1024 * 1024;

/// One scenario.
#[derive(Clone, Debug)]
pub struct Params {
    pub nodes: usize,
    pub size: u64,
    /// Bytes per second.
    pub upload: f64,
    pub download: f64,
    pub origin_upload: f64,
    pub latency: Duration,
    pub seed: u64,
    /// Nodes start uniformly within this window.
    pub start_spread: Duration,
    /// (node, when) it dies: stops answering anything; its peers and the coordinator notice
    /// its connections closing `notice` later.
    pub kills: Vec<(usize, Duration)>,
    pub notice: Duration,
    /// Nodes that serve corrupt pieces (and download honestly).
    pub corrupt: Vec<usize>,
    /// From this moment, the origin stops sending to whichever node holds the first origin slot
    /// (its connection hangs; the node itself stays alive).
    pub hang_first_seeder_at: Option<Duration>,
    /// At this moment, whichever node holds the first origin slot dies.
    pub kill_first_seeder_at: Option<Duration>,
    /// Virtual time after which the run is declared deadlocked.
    pub horizon: Duration,
    /// Most peer sessions a node opens itself (inbound ones are always accepted).
    pub max_sessions: usize,
    pub upload_slots: (u32, u32),
    /// Print a line per virtual second (for investigating a scenario).
    pub trace: bool,
    pub swarm: SwarmConfig,
    pub tracker: TrackerConfig,
}

impl Params {
    pub fn new(nodes: usize, size: u64) -> Params {
        Params {
            nodes,
            size,
            upload: 4.0 * MIB as f64,
            download: 4.0 * MIB as f64,
            origin_upload: 8.0 * MIB as f64,
            latency: Duration::from_millis(1),
            seed: 1,
            start_spread: Duration::from_millis(100),
            kills: vec![],
            notice: Duration::from_secs(1),
            corrupt: vec![],
            hang_first_seeder_at: None,
            kill_first_seeder_at: None,
            horizon: Duration::from_secs(600),
            max_sessions: 24,
            upload_slots: (4, 2),
            trace: false,
            swarm: SwarmConfig::default(),
            tracker: TrackerConfig::default(),
        }
    }

    /// `max(S/U_origin, S/D, N·S/(U_origin + N·U))`: no schedule can beat it.
    pub fn lower_bound(&self) -> Duration {
        let s = self.size as f64;
        let n = self.nodes as f64;
        let b = (s / self.origin_upload)
            .max(s / self.download)
            .max(n * s / (self.origin_upload + n * self.upload));
        Duration::from_secs_f64(b)
    }
}

#[derive(Debug)]
pub struct Report {
    pub pieces: u32,
    /// Completion time of each node; `None` for nodes that did not finish (dead ones).
    pub completed: Vec<Option<Time>>,
    pub origin_pieces: u64,
    /// Each node's stored pieces were all genuine (nothing corrupt was ever accepted).
    pub all_genuine: bool,
    /// Every node that completed stores every piece, each genuine.
    pub completed_whole: bool,
    pub rejected: u64,
    pub quarantined_at_tracker: Vec<usize>,
    /// Nodes that held an origin slot, in the order they got it.
    pub seeders: Vec<usize>,
    pub revoked: Vec<usize>,
    pub end: Time,
    pub events: u64,
    pub dead: BTreeSet<usize>,
}

impl Report {
    /// Completion times of the nodes that finished, sorted.
    pub fn times(&self) -> Vec<Duration> {
        let mut v: Vec<Duration> = self
            .completed
            .iter()
            .flatten()
            .map(|t| t.since(Time::ZERO))
            .collect();
        v.sort();
        v
    }

    pub fn slowest(&self) -> Duration {
        self.times().last().copied().unwrap_or_default()
    }

    pub fn median(&self) -> Duration {
        let t = self.times();
        t.get(t.len() / 2).copied().unwrap_or_default()
    }
}

#[derive(Debug)]
enum PeerEv {
    Connect(Bitmap),
    Have(Bitmap),
    HavePiece(u32),
    Request(u32),
    Reject(u32, RejectReason),
    Cancel(u32),
}

#[derive(Debug)]
enum Ev {
    Start(usize),
    ToTracker(usize, AgentMsg),
    ToNode(usize, CoordMsg),
    Peer {
        from: usize,
        to: usize,
        msg: PeerEv,
    },
    UploadStart {
        from: usize,
        to: usize,
        piece: u32,
    },
    UploadDone {
        from: usize,
        to: usize,
    },
    Arrive {
        from: Option<usize>,
        to: usize,
        piece: u32,
        genuine: bool,
    },
    OriginReq {
        to: usize,
        job: u64,
        pieces: Range<u32>,
    },
    OriginStart {
        to: usize,
        job: u64,
        piece: u32,
    },
    Timer(usize, Time),
    Tick,
    Kill(usize),
    Gone(usize),
}

struct NodeSim {
    id: NodeId,
    swarm: Swarm<usize>,
    uploads: UploadSlots<usize>,
    alive: bool,
    started: bool,
    corrupt: bool,
    sessions: BTreeSet<usize>,
    up_free: Time,
    down_free: Time,
    timer: Option<Time>,
    /// Genuineness of each stored piece.
    store: Vec<Option<bool>>,
    done: Option<Time>,
    origin_jobs: Vec<(u64, Range<u32>)>,
    last_locate: Time,
    req: u32,
}

pub struct Sim {
    p: Params,
    geometry: Geometry,
    digest: Digest,
    now: Time,
    seq: u64,
    heap: BinaryHeap<Reverse<(Time, u64, usize)>>,
    slots: Vec<Option<Ev>>,
    free_slots: Vec<usize>,
    /// Events exactly one latency away arrive in the order they were sent: a FIFO is enough.
    lat_q: VecDeque<(Time, u64, Ev)>,
    nodes: Vec<NodeSim>,
    tracker: Tracker,
    origin_free: Time,
    next_job: u64,
    cancelled_jobs: BTreeSet<u64>,
    origin_pieces: u64,
    hung: Option<usize>,
    seeders: Vec<usize>,
    revoked: Vec<usize>,
    rejected: u64,
    events: u64,
    /// Live nodes not complete yet.
    remaining: usize,
    rng: Rng,
}

fn token_hash(piece: u32, genuine: bool) -> PieceHash {
    let mut h = [0u8; 32];
    h[..4].copy_from_slice(&piece.to_le_bytes());
    h[4] = 0x5a;
    h[31] = u8::from(!genuine);
    h
}

fn micros(bytes: u64, rate: f64) -> Duration {
    Duration::from_micros((bytes as f64 / rate * 1e6).ceil() as u64)
}

impl Sim {
    pub fn new(p: Params) -> Sim {
        let digest = Digest::sha256_of(format!("blob-{}", p.seed).as_bytes());
        let geometry = Geometry::for_size(p.size);
        let mut rng = Rng::new(p.seed);
        let mut nodes = Vec::with_capacity(p.nodes);
        for i in 0..p.nodes {
            let cfg = SwarmConfig {
                seed: rng.next_u64(),
                ..p.swarm.clone()
            };
            nodes.push(NodeSim {
                id: NodeId::new(&format!("n{i}")).unwrap(),
                swarm: Swarm::new(digest.clone(), cfg, Time::ZERO),
                uploads: UploadSlots::new(p.upload_slots.0, p.upload_slots.1),
                alive: true,
                started: false,
                corrupt: p.corrupt.contains(&i),
                sessions: BTreeSet::new(),
                up_free: Time::ZERO,
                down_free: Time::ZERO,
                timer: None,
                store: vec![None; geometry.count() as usize],
                done: None,
                origin_jobs: vec![],
                last_locate: Time::ZERO,
                req: 0,
            });
        }
        let tracker = Tracker::new(TrackerConfig {
            seed: rng.next_u64(),
            ..p.tracker.clone()
        });
        let mut sim = Sim {
            geometry,
            digest,
            now: Time::ZERO,
            seq: 0,
            heap: BinaryHeap::new(),
            slots: vec![],
            free_slots: vec![],
            lat_q: VecDeque::new(),
            nodes,
            tracker,
            origin_free: Time::ZERO,
            next_job: 0,
            cancelled_jobs: BTreeSet::new(),
            origin_pieces: 0,
            hung: None,
            seeders: vec![],
            revoked: vec![],
            rejected: 0,
            events: 0,
            remaining: p.nodes,
            rng,
            p,
        };
        for i in 0..sim.p.nodes {
            let at = Time::ZERO
                + Duration::from_micros(sim.rng.below(sim.p.start_spread.as_micros() as u64 + 1));
            sim.at(at, Ev::Start(i));
        }
        for (i, when) in sim.p.kills.clone() {
            sim.at(Time::ZERO + when, Ev::Kill(i));
        }
        sim.at(Time::ZERO + Duration::from_millis(500), Ev::Tick);
        sim
    }

    fn at(&mut self, t: Time, ev: Ev) {
        let t = t.max(self.now);
        self.seq += 1;
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.slots[s] = Some(ev);
                s
            }
            None => {
                self.slots.push(Some(ev));
                self.slots.len() - 1
            }
        };
        self.heap.push(Reverse((t, self.seq, slot)));
    }

    /// Sends after exactly one latency.
    fn later(&mut self, ev: Ev) {
        self.seq += 1;
        self.lat_q
            .push_back((self.now + self.p.latency, self.seq, ev));
    }

    fn pop(&mut self) -> Option<(Time, Ev)> {
        let heap_head = self.heap.peek().map(|Reverse((t, s, _))| (*t, *s));
        let fifo_head = self.lat_q.front().map(|(t, s, _)| (*t, *s));
        match (heap_head, fifo_head) {
            (None, None) => None,
            (Some(h), Some(f)) if f < h => self.lat_q.pop_front().map(|(t, _, e)| (t, e)),
            (Some(_), _) => {
                let Reverse((t, _, slot)) = self.heap.pop().expect("peeked");
                self.free_slots.push(slot);
                Some((t, self.slots[slot].take().expect("live slot")))
            }
            (None, Some(_)) => self.lat_q.pop_front().map(|(t, _, e)| (t, e)),
        }
    }

    pub fn run(mut self) -> Report {
        let horizon = Time::ZERO + self.p.horizon;
        let (mut same_t, mut same_n) = (Time::ZERO, 0u64);
        while let Some((t, ev)) = self.pop() {
            if t > horizon {
                break;
            }
            if t == same_t {
                same_n += 1;
                assert!(same_n < 1_000_000, "livelock at {t:?}: {ev:?}");
            } else {
                (same_t, same_n) = (t, 0);
            }
            self.now = t;
            self.events += 1;
            self.handle(ev);
            if self.remaining == 0 {
                break;
            }
        }
        let pieces = self.geometry.count();
        let all_genuine = self
            .nodes
            .iter()
            .all(|n| n.store.iter().all(|s| *s != Some(false)));
        let completed_whole = self
            .nodes
            .iter()
            .filter(|n| n.done.is_some())
            .all(|n| n.store.iter().all(|s| *s == Some(true)));
        let quarantined_at_tracker = (0..self.nodes.len())
            .filter(|&i| self.tracker.is_quarantined(&self.nodes[i].id, self.now))
            .collect();
        Report {
            pieces,
            completed: self.nodes.iter().map(|n| n.done).collect(),
            origin_pieces: self.origin_pieces,
            all_genuine,
            completed_whole,
            rejected: self.rejected,
            quarantined_at_tracker,
            seeders: self.seeders,
            revoked: self.revoked,
            end: self.now,
            events: self.events,
            dead: (0..self.nodes.len())
                .filter(|&i| !self.nodes[i].alive)
                .collect(),
        }
    }

    fn send_tracker(&mut self, from: usize, msg: AgentMsg) {
        self.later(Ev::ToTracker(from, msg));
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Start(i) => {
                let n = &mut self.nodes[i];
                n.started = true;
                // The agent learns the size from the registry (HEAD) before asking.
                n.swarm.set_size(self.p.size);
                let hello = Hello {
                    node: n.id.clone(),
                    zone: Zone::default(),
                    version: PROTOCOL_VERSION,
                    peer_addr: ([10, 0, (i >> 8) as u8, i as u8], 4433).into(),
                };
                self.send_tracker(i, AgentMsg::Hello(hello));
                self.locate(i);
                self.drive(i);
            }
            Ev::ToTracker(i, msg) => {
                if !self.nodes[i].alive {
                    return;
                }
                let id = self.nodes[i].id.clone();
                if let Ok(Some(reply)) = self.tracker.handle(&id, msg, self.now) {
                    self.later(Ev::ToNode(i, reply));
                }
                self.drain_tracker();
            }
            Ev::ToNode(i, msg) => self.node_ctl(i, msg),
            Ev::Peer { from, to, msg } => self.peer_msg(from, to, msg),
            Ev::UploadStart { from, to, piece } => {
                let len = self.piece_len(piece);
                let send_end = self.now + micros(len, self.p.upload);
                let dl_start = (self.now + self.p.latency).max(self.nodes[to].down_free);
                let dl_end = dl_start + micros(len, self.p.download);
                self.nodes[to].down_free = dl_end;
                let arrive = dl_end.max(send_end + self.p.latency);
                let genuine = !self.nodes[from].corrupt;
                self.at(
                    arrive,
                    Ev::Arrive {
                        from: Some(from),
                        to,
                        piece,
                        genuine,
                    },
                );
                self.at(send_end, Ev::UploadDone { from, to });
            }
            Ev::UploadDone { from, to } => self.nodes[from].uploads.release(&to),
            Ev::Arrive {
                from,
                to,
                piece,
                genuine,
            } => {
                if !self.nodes[to].alive || from.is_some_and(|f| !self.nodes[f].alive) {
                    return;
                }
                let source = match from {
                    Some(f) => Source::Peer(f),
                    None => Source::Origin,
                };
                let len = self.piece_len(piece);
                let now = self.now;
                let n = &mut self.nodes[to];
                let out = n.swarm.handle_piece_hashed(
                    source,
                    piece,
                    len,
                    token_hash(piece, genuine),
                    now,
                );
                match out {
                    PieceOutcome::Verified => n.store[piece as usize] = Some(genuine),
                    PieceOutcome::Rejected => self.rejected += 1,
                    PieceOutcome::Duplicate | PieceOutcome::Unexpected => {}
                }
                self.drive(to);
            }
            Ev::OriginReq { to, job, pieces } => {
                if self.hung == Some(to) {
                    return;
                }
                // The origin streams the range in order over its own uplink.
                let mut t = self.now.max(self.origin_free);
                for piece in pieces {
                    self.at(t, Ev::OriginStart { to, job, piece });
                    t = t + micros(self.piece_len(piece), self.p.origin_upload);
                }
                self.origin_free = t;
            }
            Ev::OriginStart { to, job, piece } => {
                if self.cancelled_jobs.contains(&job) || !self.nodes[to].alive {
                    // Not sent: the origin's uplink time is wasted only up to here.
                    return;
                }
                if self.hung == Some(to) {
                    return;
                }
                self.origin_pieces += 1;
                let len = self.piece_len(piece);
                let send_end = self.now + micros(len, self.p.origin_upload);
                let dl_start = (self.now + self.p.latency).max(self.nodes[to].down_free);
                let dl_end = dl_start + micros(len, self.p.download);
                self.nodes[to].down_free = dl_end;
                self.at(
                    dl_end.max(send_end + self.p.latency),
                    Ev::Arrive {
                        from: None,
                        to,
                        piece,
                        genuine: true,
                    },
                );
            }
            Ev::Timer(i, t) => {
                let n = &mut self.nodes[i];
                if !n.alive || n.timer != Some(t) {
                    return;
                }
                n.timer = None;
                n.swarm.handle_timeout(self.now);
                self.drive(i);
            }
            Ev::Tick => self.tick(),
            Ev::Kill(i) => {
                if self.nodes[i].done.is_none() {
                    self.remaining -= 1;
                }
                self.nodes[i].alive = false;
                self.at(self.now + self.p.notice, Ev::Gone(i));
            }
            Ev::Gone(i) => {
                let id = self.nodes[i].id.clone();
                self.tracker.handle_disconnect(&id, self.now);
                self.drain_tracker();
                let sessions: Vec<usize> = self.nodes[i].sessions.iter().copied().collect();
                for s in sessions {
                    if self.nodes[s].alive {
                        self.nodes[s].sessions.remove(&i);
                        self.nodes[s].swarm.remove_peer(&i);
                        self.drive(s);
                    }
                }
            }
        }
    }

    fn piece_len(&self, piece: u32) -> u64 {
        let r = self.geometry.range(piece).expect("piece in range");
        r.end - r.start
    }

    fn locate(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.req += 1;
        n.last_locate = self.now;
        let msg = AgentMsg::Locate {
            req: n.req,
            digest: self.digest.clone(),
            want_origin: true,
        };
        self.send_tracker(i, msg);
    }

    fn drain_tracker(&mut self) {
        while let Some((node, msg)) = self.tracker.poll_transmit() {
            let i: usize = node.as_str()[1..].parse().expect("sim node names");
            if let CoordMsg::OriginSlot { granted, .. } = &msg {
                if *granted {
                    self.seeders.push(i);
                } else {
                    self.revoked.push(i);
                }
            }
            self.later(Ev::ToNode(i, msg));
        }
    }

    fn node_ctl(&mut self, i: usize, msg: CoordMsg) {
        if !self.nodes[i].alive {
            return;
        }
        let now = self.now;
        match msg {
            CoordMsg::LocateReply(r) => {
                let n = &mut self.nodes[i];
                if let Some(m) = &r.manifest {
                    n.swarm.handle_manifest(m);
                }
                if let Some(h) = &r.hashes {
                    n.swarm.handle_hashes(h);
                }
                if r.origin && !n.swarm.origin_allowed() {
                    self.seeders.push(i);
                }
                let n = &mut self.nodes[i];
                n.swarm.set_origin(r.origin, now);
                for peer in r.peers {
                    let j: usize = peer.node.as_str()[1..].parse().expect("sim node names");
                    if j != i
                        && !self.nodes[i].sessions.contains(&j)
                        && self.nodes[i].sessions.len() < self.p.max_sessions
                    {
                        self.connect(i, j);
                    }
                }
            }
            CoordMsg::OriginSlot { granted, .. } => {
                self.nodes[i].swarm.set_origin(granted, now);
            }
            CoordMsg::Hashes(h) => {
                self.nodes[i].swarm.handle_hashes(&h);
            }
            CoordMsg::Welcome { .. }
            | CoordMsg::Refused { .. }
            | CoordMsg::Bye
            | CoordMsg::Renewed { .. }
            | CoordMsg::RenewRefused { .. }
            | CoordMsg::RefusedNodes { .. }
            | CoordMsg::RefusedSerials { .. }
            | CoordMsg::ManifestWanted { .. } => {}
        }
        self.drive(i);
    }

    fn connect(&mut self, i: usize, j: usize) {
        let n = &mut self.nodes[i];
        n.sessions.insert(j);
        n.swarm.add_peer(j);
        let have = n.swarm.have().clone();
        self.later(Ev::Peer {
            from: i,
            to: j,
            msg: PeerEv::Connect(have),
        });
    }

    fn peer_msg(&mut self, from: usize, to: usize, msg: PeerEv) {
        if !self.nodes[to].alive || !self.nodes[from].alive {
            return;
        }
        let now = self.now;
        match msg {
            PeerEv::Connect(have) => {
                let n = &mut self.nodes[to];
                n.sessions.insert(from);
                n.swarm.handle_have(&from, &have);
                let mine = n.swarm.have().clone();
                self.later(Ev::Peer {
                    from: to,
                    to: from,
                    msg: PeerEv::Have(mine),
                });
            }
            PeerEv::Have(have) => self.nodes[to].swarm.handle_have(&from, &have),
            PeerEv::HavePiece(piece) => self.nodes[to].swarm.handle_have_piece(&from, piece),
            PeerEv::Request(piece) => {
                let dur = micros(self.piece_len(piece), self.p.upload);
                let n = &mut self.nodes[to];
                // Spread while holding the origin slot, as the agent does.
                let spread = n.swarm.origin_allowed().then(|| n.swarm.have().len());
                n.uploads.spread(spread);
                let answer = if !n.swarm.have().get(piece) {
                    Err(RejectReason::NotHave)
                } else {
                    n.uploads.try_admit(&from, piece, n.swarm.have())
                };
                match answer {
                    Err(reason) => self.later(Ev::Peer {
                        from: to,
                        to: from,
                        msg: PeerEv::Reject(piece, reason),
                    }),
                    Ok(()) => {
                        let start = now.max(n.up_free);
                        n.up_free = start + dur;
                        self.at(
                            start,
                            Ev::UploadStart {
                                from: to,
                                to: from,
                                piece,
                            },
                        );
                    }
                }
                return;
            }
            PeerEv::Reject(piece, reason) => self.nodes[to]
                .swarm
                .handle_reject(&from, piece, reason, now),
            // Uploads already admitted run to the end; the receiver drops what it no longer
            // needs.
            PeerEv::Cancel(_) => return,
        }
        self.drive(to);
    }

    fn tick(&mut self) {
        let now = self.now;
        self.tracker.poll_expire(now);
        self.drain_tracker();
        if let Some(at) = self.p.hang_first_seeder_at
            && self.hung.is_none()
            && now >= Time::ZERO + at
        {
            self.hung = self.seeders.first().copied();
        }
        if let Some(at) = self.p.kill_first_seeder_at
            && now >= Time::ZERO + at
            && let Some(&s) = self.seeders.first()
            && self.nodes[s].alive
        {
            self.handle(Ev::Kill(s));
        }
        let whole_second = now.as_micros().is_multiple_of(1_000_000);
        if whole_second && self.p.trace {
            let mut haves: Vec<u32> = self
                .nodes
                .iter()
                .map(|n| n.swarm.have().count_ones())
                .collect();
            haves.sort();
            let seeder = self.seeders.first().map(|&s| {
                (
                    s,
                    self.nodes[s].swarm.have().count_ones(),
                    self.nodes[s].swarm.stats(),
                )
            });
            let busy: u32 = self.nodes.iter().map(|n| n.swarm.stats().busy).sum();
            let stalls: u32 = self.nodes.iter().map(|n| n.swarm.stats().stalls).sum();
            let dups: u32 = self.nodes.iter().map(|n| n.swarm.stats().duplicates).sum();
            println!("  busy={busy} stalls={stalls} dups={dups}");
            println!(
                "{now:?} origin={} seeder={seeder:?} have min={} med={} max={} events={}",
                self.origin_pieces,
                haves[0],
                haves[haves.len() / 2],
                haves[haves.len() - 1],
                self.events
            );
        }
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            if !n.alive || !n.started {
                continue;
            }
            if whole_second {
                let load = n.uploads.load();
                let done = n.done.is_some();
                let have = n.swarm.have().clone();
                self.send_tracker(i, AgentMsg::Heartbeat { load });
                if !done {
                    self.send_tracker(
                        i,
                        AgentMsg::Progress {
                            digest: self.digest.clone(),
                            have,
                        },
                    );
                }
            }
            let n = &self.nodes[i];
            // Too few useful peers: ask the tracker for more.
            if n.done.is_none()
                && n.swarm.usable_peers() < 4
                && now.since(n.last_locate) >= Duration::from_secs(2)
            {
                self.locate(i);
            }
        }
        self.at(now + Duration::from_millis(500), Ev::Tick);
    }

    /// Carries out what node `i`'s swarm asks, until it has nothing more to say.
    fn drive(&mut self, i: usize) {
        let now = self.now;
        loop {
            let n = &mut self.nodes[i];
            if !n.alive {
                return;
            }
            let mut tx = Vec::new();
            while let Some(t) = n.swarm.poll_transmit(now) {
                tx.push(t);
            }
            let mut evs = Vec::new();
            while let Some(e) = n.swarm.poll_event() {
                evs.push(e);
            }
            if tx.is_empty() && evs.is_empty() {
                break;
            }
            for t in tx {
                self.transmit(i, t);
            }
            for e in evs {
                self.event(i, e);
            }
        }
        let n = &mut self.nodes[i];
        match n.swarm.poll_timeout() {
            Some(t) => {
                let t = t.max(now);
                if n.timer != Some(t) {
                    n.timer = Some(t);
                    self.at(t, Ev::Timer(i, t));
                }
            }
            None => n.timer = None,
        }
    }

    fn transmit(&mut self, i: usize, t: Transmit<usize>) {
        match t {
            Transmit::Request { peer, piece } => self.later(Ev::Peer {
                from: i,
                to: peer,
                msg: PeerEv::Request(piece),
            }),
            Transmit::Cancel { peer, piece } => self.later(Ev::Peer {
                from: i,
                to: peer,
                msg: PeerEv::Cancel(piece),
            }),
            Transmit::FetchOrigin { pieces } => {
                self.next_job += 1;
                let job = self.next_job;
                self.nodes[i].origin_jobs.push((job, pieces.clone()));
                self.later(Ev::OriginReq { to: i, job, pieces });
            }
            Transmit::CancelOrigin { pieces } => {
                let jobs = &mut self.nodes[i].origin_jobs;
                jobs.retain(|(job, r)| {
                    let hit = r.start < pieces.end && pieces.start < r.end;
                    if hit {
                        self.cancelled_jobs.insert(*job);
                    }
                    !hit
                });
            }
            Transmit::Have { piece } => {
                let sessions: Vec<usize> = self.nodes[i].sessions.iter().copied().collect();
                for s in sessions {
                    self.later(Ev::Peer {
                        from: i,
                        to: s,
                        msg: PeerEv::HavePiece(piece),
                    });
                }
            }
        }
    }

    fn event(&mut self, i: usize, e: Event<usize>) {
        match e {
            Event::PieceVerified { .. } | Event::PieceRejected { .. } => {}
            Event::PieceDiscarded { piece } => self.nodes[i].store[piece as usize] = None,
            Event::ReportBadPeer { peer, piece } => {
                let msg = AgentMsg::ReportBadPeer {
                    peer: self.nodes[peer].id.clone(),
                    digest: self.digest.clone(),
                    piece,
                };
                self.send_tracker(i, msg);
                self.nodes[i].sessions.remove(&peer);
            }
            Event::HashComputed { piece, hash } => {
                let msg = AgentMsg::PublishHashes(PieceHashes {
                    digest: self.digest.clone(),
                    size: self.geometry.size(),
                    piece_len: self.geometry.piece_len(),
                    entries: vec![(piece, hash)],
                });
                self.send_tracker(i, msg);
            }
            Event::Starved => self.locate(i),
            Event::Complete => {
                self.remaining -= 1;
                let n = &mut self.nodes[i];
                n.done = Some(self.now);
                let have = n.swarm.have().clone();
                let msg = AgentMsg::Progress {
                    digest: self.digest.clone(),
                    have,
                };
                self.send_tracker(i, msg);
            }
        }
    }
}
