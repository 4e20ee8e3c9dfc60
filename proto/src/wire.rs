//! Frames: how [`msg`](crate::msg) values travel on a QUIC stream. Versioned, length-prefixed,
//! bounded before anything is allocated, and decoded by a streaming [`Decoder`] that never
//! panics on any input.
//!
//! ```text
//! +---------+------+-------------------+------------------------------+
//! | version | kind | payload length    | payload: one postcard value  |
//! |   u8    |  u8  | u32, big-endian   | (AgentMsg, CoordMsg, PeerMsg)|
//! +---------+------+-------------------+------------------------------+
//! ```
//!
//! `kind` says which message type the payload is and so which bound applies: control frames
//! (either direction) and peer control frames are small, piece-data frames hold at most one
//! piece ([`MAX_PIECE_LEN`]) plus a little header. A decoder for one channel refuses the
//! other channels' kinds, so a message can never be read as a different type.

use std::marker::PhantomData;

use crate::msg::{Message, MsgError};
use crate::piece::MAX_PIECE_LEN;

/// The frame format version this crate writes and reads.
pub const VERSION: u8 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 6;
/// ALPN of the control channel (agent ↔ coordinator).
pub const ALPN_CTL: &[u8] = b"shoal-ctl/1";
/// ALPN of the peer channel (agent ↔ agent).
pub const ALPN_PEER: &[u8] = b"shoal-peer/1";
/// Largest control payload: a locate reply with a full manifest ([`MAX_PIECES`](crate::piece::MAX_PIECES)
/// hashes, 512 KiB) fits with room to spare.
pub const MAX_CONTROL_PAYLOAD: u32 = 1024 * 1024;
/// Largest peer payload other than piece data: a `Have` bitmap is at most 2 KiB.
pub const MAX_PEER_PAYLOAD: u32 = 16 * 1024;
/// Largest piece-data payload: one piece and its small header (digest, index, length).
pub const MAX_PIECE_PAYLOAD: u32 = MAX_PIECE_LEN as u32 + 1024;

/// What a frame's payload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// [`AgentMsg`](crate::msg::AgentMsg).
    AgentToCoordinator = 1,
    /// [`CoordMsg`](crate::msg::CoordMsg).
    CoordinatorToAgent = 2,
    /// [`PeerMsg`](crate::msg::PeerMsg) other than `Piece`.
    Peer = 3,
    /// `PeerMsg::Piece`.
    PieceData = 4,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::AgentToCoordinator),
            2 => Some(Kind::CoordinatorToAgent),
            3 => Some(Kind::Peer),
            4 => Some(Kind::PieceData),
            _ => None,
        }
    }

    /// The largest payload a frame of this kind may carry.
    pub fn max_payload(self) -> u32 {
        match self {
            Kind::AgentToCoordinator | Kind::CoordinatorToAgent => MAX_CONTROL_PAYLOAD,
            Kind::Peer => MAX_PEER_PAYLOAD,
            Kind::PieceData => MAX_PIECE_PAYLOAD,
        }
    }
}

/// Why bytes are not a frame, or a value cannot become one. Every decode error is fatal to
/// the stream: framing is lost, so the connection should be closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("unsupported frame version {0} (this side speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame kind {0:?} is not expected on this channel")]
    UnexpectedKind(Kind),
    #[error("{kind:?} frame of {len} bytes exceeds the bound of {max}")]
    TooLarge { kind: Kind, len: u64, max: u32 },
    #[error("malformed payload: {0}")]
    Malformed(#[from] postcard::Error),
    #[error("{0} bytes left over after the payload's value")]
    TrailingBytes(usize),
    #[error("invalid message: {0}")]
    Invalid(#[from] MsgError),
    #[error("the stream already failed")]
    Failed,
}

impl WireError {
    /// Whether the fault lies with the remote side (as opposed to a value this side tried to
    /// encode). Remote faults count against the peer.
    pub fn is_remote(&self) -> bool {
        !matches!(self, WireError::Failed)
    }
}

/// Encodes `msg` as one frame. Fails when the value breaks its bounds or is larger than its
/// kind allows (the receiver would refuse it anyway).
pub fn encode<M: Message>(msg: &M) -> Result<Vec<u8>, WireError> {
    msg.validate()?;
    let kind = msg.kind();
    let out = vec![VERSION, kind as u8, 0, 0, 0, 0];
    let mut out = postcard::to_extend(msg, out)?;
    let len = out.len() - HEADER_LEN;
    if len as u64 > u64::from(kind.max_payload()) {
        return Err(WireError::TooLarge {
            kind,
            len: len as u64,
            max: kind.max_payload(),
        });
    }
    // Fits: len <= max_payload < u32::MAX.
    out[2..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

enum State {
    /// Reading the header; holds the bytes read so far.
    Header {
        buf: [u8; HEADER_LEN],
        have: usize,
    },
    /// Reading a payload of `len` bytes.
    Payload {
        kind: Kind,
        len: usize,
        buf: Vec<u8>,
    },
    Failed,
}

/// Streaming frame decoder for one channel's message type `M`.
///
/// Feed it bytes as they arrive with [`decode`](Decoder::decode); it consumes at most one
/// frame per call and buffers at most one payload, whose length it checks against the kind's
/// bound before reserving memory, and grows as bytes actually arrive (a peer announcing 16 MiB
/// and sending one byte costs one byte).
pub struct Decoder<M> {
    state: State,
    _msg: PhantomData<fn() -> M>,
}

impl<M> std::fmt::Debug for Decoder<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match &self.state {
            State::Header { have, .. } => format!("header ({have} bytes)"),
            State::Payload { kind, len, buf } => format!("{kind:?} payload {}/{len}", buf.len()),
            State::Failed => "failed".into(),
        };
        write!(f, "Decoder({s})")
    }
}

impl<M: Message> Default for Decoder<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: Message> Decoder<M> {
    pub fn new() -> Self {
        Decoder {
            state: State::Header {
                buf: [0; HEADER_LEN],
                have: 0,
            },
            _msg: PhantomData,
        }
    }

    /// Whether the decoder sits between frames (a stream may end cleanly only here).
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Header { have: 0, .. })
    }

    /// Bytes of the current frame's payload buffered so far (for tests and metrics).
    pub fn buffered(&self) -> usize {
        match &self.state {
            State::Header { have, .. } => *have,
            State::Payload { buf, .. } => buf.len(),
            State::Failed => 0,
        }
    }

    /// Consumes bytes from the front of `input` up to the end of the next frame.
    /// `Ok(Some(msg))`: a frame completed (more may follow in `input`: call again).
    /// `Ok(None)`: `input` is exhausted and the frame is incomplete; feed more bytes.
    /// `Err(_)`: the stream is unusable; every later call returns [`WireError::Failed`].
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<M>, WireError> {
        let r = self.step(input);
        if r.is_err() {
            self.state = State::Failed;
        }
        r
    }

    fn step(&mut self, input: &mut &[u8]) -> Result<Option<M>, WireError> {
        loop {
            match &mut self.state {
                State::Failed => return Err(WireError::Failed),
                State::Header { buf, have } => {
                    let take = (HEADER_LEN - *have).min(input.len());
                    buf[*have..*have + take].copy_from_slice(&input[..take]);
                    *have += take;
                    *input = &input[take..];
                    // Check version and kind as soon as they arrive, not after the length.
                    if *have >= 1 && buf[0] != VERSION {
                        return Err(WireError::UnsupportedVersion(buf[0]));
                    }
                    let kind = if *have >= 2 {
                        let kind = Kind::from_u8(buf[1]).ok_or(WireError::UnknownKind(buf[1]))?;
                        if !M::accepts(kind) {
                            return Err(WireError::UnexpectedKind(kind));
                        }
                        kind
                    } else {
                        return Ok(None);
                    };
                    if *have < HEADER_LEN {
                        return Ok(None);
                    }
                    let len = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]);
                    if len > kind.max_payload() {
                        return Err(WireError::TooLarge {
                            kind,
                            len: u64::from(len),
                            max: kind.max_payload(),
                        });
                    }
                    self.state = State::Payload {
                        kind,
                        len: len as usize,
                        buf: Vec::new(),
                    };
                }
                State::Payload { kind, len, buf } => {
                    let take = (*len - buf.len()).min(input.len());
                    if take > 0 {
                        // Grow geometrically but never past the frame's length.
                        let want = buf.len() + take;
                        if want > buf.capacity() {
                            let target = (buf.capacity() * 2).max(want).min(*len);
                            buf.reserve_exact(target - buf.len());
                        }
                        buf.extend_from_slice(&input[..take]);
                        *input = &input[take..];
                    }
                    if buf.len() < *len {
                        return Ok(None);
                    }
                    let kind = *kind;
                    let payload = std::mem::take(buf);
                    self.state = State::Header {
                        buf: [0; HEADER_LEN],
                        have: 0,
                    };
                    return decode_payload::<M>(kind, &payload).map(Some);
                }
            }
        }
    }
}

/// Decodes one payload of a frame whose kind is already known to be accepted.
fn decode_payload<M: Message>(kind: Kind, payload: &[u8]) -> Result<M, WireError> {
    let (msg, rest) = postcard::take_from_bytes::<M>(payload)?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes(rest.len()));
    }
    // The kind byte must match the value: a `Piece` smuggled in a small-bound frame kind (or
    // the reverse) is refused, so bounds cannot be traded between kinds.
    if msg.kind() != kind {
        return Err(WireError::UnexpectedKind(kind));
    }
    msg.validate()?;
    Ok(msg)
}

/// Decodes exactly one whole frame from `bytes` (a datagram, a test vector). Fails on a short
/// frame as on a bad one.
pub fn decode_one<M: Message>(bytes: &[u8]) -> Result<M, WireError> {
    let mut d = Decoder::<M>::new();
    let mut input = bytes;
    match d.decode(&mut input)? {
        Some(m) if input.is_empty() => Ok(m),
        Some(_) => Err(WireError::TrailingBytes(input.len())),
        None => Err(WireError::Malformed(
            postcard::Error::DeserializeUnexpectedEnd,
        )),
    }
}

/// The properties the fuzz target (`proto/fuzz`) checks on arbitrary bytes, for each channel's
/// message type: decoding never panics; after every call the decoder holds at most one
/// partial frame, of a kind its channel accepts and within that kind's bound, with no more
/// memory reserved than the frame's announced length or twice the bytes that arrived;
/// `Ok(None)` means the input was used up; the messages, the error and the bytes left buffered
/// are the same whatever the chunking; and every decoded value re-encodes and decodes to itself.
/// Panics when a property fails.
#[doc(hidden)]
pub fn check_decoder_invariants(data: &[u8]) {
    check_one::<crate::msg::AgentMsg>(data);
    check_one::<crate::msg::CoordMsg>(data);
    check_one::<crate::msg::PeerMsg>(data);
}

fn check_one<M: Message + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let whole = decode_all::<M>(data, data.len().max(1));
    // A chunk size derived from the data, so the fuzzer explores splits too.
    let step = 1 + data.first().map_or(0, |&b| usize::from(b) % 7);
    let split = decode_all::<M>(data, step);
    assert_eq!(whole, split, "chunking changed the outcome");
    for m in whole.0 {
        let frame = encode(&m).expect("a decoded value re-encodes");
        assert_eq!(decode_one::<M>(&frame).as_ref(), Ok(&m), "round trip");
    }
}

/// What decoding a whole input gave: the messages, the error that ended it if any, and the
/// bytes of an incomplete frame still buffered at the end.
type Outcome<M> = (Vec<M>, Option<WireError>, usize);

fn decode_all<M: Message>(data: &[u8], step: usize) -> Outcome<M> {
    let mut dec = Decoder::<M>::new();
    let mut out = Vec::new();
    for chunk in data.chunks(step) {
        let mut chunk = chunk;
        loop {
            let r = dec.decode(&mut chunk);
            check_held(&dec);
            match r {
                Ok(Some(m)) => out.push(m),
                Ok(None) => {
                    assert!(chunk.is_empty(), "Ok(None) with {} bytes left", chunk.len());
                    break;
                }
                Err(e) => return (out, Some(e), dec.buffered()),
            }
        }
    }
    let held = dec.buffered();
    (out, None, held)
}

/// What a decoder may hold between calls: part of a header, or part of one accepted frame's
/// payload within its kind's bound, with memory reserved only for bytes that arrived.
fn check_held<M: Message>(dec: &Decoder<M>) {
    match &dec.state {
        State::Failed => {}
        State::Header { have, .. } => assert!(*have < HEADER_LEN, "a whole header left unread"),
        State::Payload { kind, len, buf } => {
            assert!(
                M::accepts(*kind),
                "holds a {kind:?} payload on the wrong channel"
            );
            assert!(
                *len <= kind.max_payload() as usize,
                "holds a {kind:?} payload of {len} bytes, over its bound"
            );
            assert!(buf.len() < *len, "a complete payload left undecoded");
            assert!(
                buf.capacity() <= *len && buf.capacity() <= 2 * buf.len(),
                "preallocated {} bytes for {} received of {len} announced",
                buf.capacity(),
                buf.len()
            );
        }
    }
}

/// One value of every message variant, shared by the unit tests and the fuzz corpus seeds
/// (`proto/fuzz/examples/seeds.rs`), so the fuzzer starts from frames that decode.
#[doc(hidden)]
pub mod samples {
    use crate::digest::Digest;
    use crate::manifest::PieceManifest;
    use crate::msg::{
        AgentMsg, Announce, CertDer, CoordMsg, CsrDer, Hello, LocateReply, NodeId, Partial,
        PeerInfo, PeerMsg, PieceData, PieceHashes, RejectReason, Serial, Zone,
    };
    use crate::piece::{Bitmap, MIN_PIECE_LEN};

    // The `unwrap`s below are on constant, valid names, addresses and sizes.

    fn d(s: &[u8]) -> Digest {
        Digest::sha256_of(s)
    }

    fn hashes() -> PieceHashes {
        PieceHashes {
            digest: d(b"c"),
            size: 3 * MIN_PIECE_LEN,
            piece_len: MIN_PIECE_LEN,
            entries: vec![(0, [1; 32]), (1, [2; 32])],
        }
    }

    fn manifest() -> PieceManifest {
        PieceManifest::new(
            d(b"c"),
            3 * MIN_PIECE_LEN - 7,
            MIN_PIECE_LEN,
            vec![[1; 32], [2; 32], [3; 32]],
        )
        .unwrap()
    }

    /// Every `AgentMsg` variant.
    pub fn agent() -> Vec<AgentMsg> {
        let mut bm = Bitmap::new(300);
        bm.set(0);
        bm.set(299);
        vec![
            AgentMsg::Hello(Hello {
                node: NodeId::new("node-a").unwrap(),
                zone: Zone::new("dc1/rack2").unwrap(),
                version: crate::msg::PROTOCOL_VERSION,
                peer_addr: "[::1]:4433".parse().unwrap(),
            }),
            AgentMsg::Heartbeat { load: 3 },
            AgentMsg::Announce(Announce {
                complete: vec![d(b"a"), d(b"b")],
                partial: vec![Partial {
                    digest: d(b"c"),
                    have: bm.clone(),
                }],
            }),
            AgentMsg::Withdraw {
                digests: vec![d(b"a")],
            },
            AgentMsg::Progress {
                digest: d(b"c"),
                have: bm,
            },
            AgentMsg::Locate {
                req: 9,
                digest: d(b"c"),
                want_origin: true,
            },
            AgentMsg::PublishHashes(hashes()),
            AgentMsg::PublishManifest(manifest()),
            AgentMsg::ReleaseOrigin { digest: d(b"c") },
            AgentMsg::ReportBadPeer {
                peer: NodeId::new("evil").unwrap(),
                digest: d(b"c"),
                piece: 2,
            },
            AgentMsg::Bye,
            AgentMsg::Renew {
                csr: CsrDer::new(vec![0x30, 0x82, 1, 2]).unwrap(),
            },
        ]
    }

    /// Every `CoordMsg` variant (`LocateReply` three times: peers only, with the anchored
    /// manifest, with provisional hashes).
    pub fn coord() -> Vec<CoordMsg> {
        let reply = LocateReply {
            req: 9,
            digest: d(b"c"),
            manifest: None,
            hashes: None,
            peers: vec![PeerInfo {
                node: NodeId::new("b").unwrap(),
                addr: "10.0.0.2:4433".parse().unwrap(),
                zone: Zone::default(),
                load: 1,
            }],
            origin: true,
        };
        vec![
            CoordMsg::Welcome {
                version: crate::msg::PROTOCOL_VERSION,
                heartbeat_ms: 5000,
                announce_ms: 60_000,
            },
            CoordMsg::LocateReply(reply.clone()),
            CoordMsg::LocateReply(LocateReply {
                manifest: Some(manifest()),
                origin: false,
                ..reply.clone()
            }),
            CoordMsg::LocateReply(LocateReply {
                hashes: Some(hashes()),
                peers: vec![],
                ..reply
            }),
            CoordMsg::OriginSlot {
                digest: d(b"c"),
                granted: true,
                lease_ms: 30_000,
            },
            CoordMsg::Hashes(hashes()),
            CoordMsg::Refused {
                reason: "unsupported version".into(),
            },
            CoordMsg::Bye,
            CoordMsg::ManifestWanted {
                digest: Digest::sha256_of(b"wanted"),
            },
            CoordMsg::Renewed {
                leaf: CertDer::new(vec![1; 600]).unwrap(),
                ca: CertDer::new(vec![2; 500]).unwrap(),
            },
            CoordMsg::RenewRefused {
                reason: "node revoked".into(),
            },
            CoordMsg::RefusedNodes {
                nodes: vec![NodeId::new("x").unwrap(), NodeId::new("y").unwrap()],
            },
            CoordMsg::RefusedSerials {
                serials: vec![Serial::new("0a1b").unwrap(), Serial::new("ff").unwrap()],
            },
        ]
    }

    /// Every `PeerMsg` variant.
    pub fn peer() -> Vec<PeerMsg> {
        vec![
            PeerMsg::Have {
                digest: d(b"x"),
                have: Bitmap::full(17),
            },
            PeerMsg::HavePiece {
                digest: d(b"x"),
                piece: 16,
            },
            PeerMsg::Request {
                digest: d(b"x"),
                piece: 3,
            },
            PeerMsg::Piece {
                digest: d(b"x"),
                piece: 3,
                data: PieceData::new(vec![0xab; 1000]).unwrap(),
            },
            PeerMsg::Reject {
                digest: d(b"x"),
                piece: 3,
                reason: RejectReason::Busy,
            },
            PeerMsg::Cancel {
                digest: d(b"x"),
                piece: 3,
            },
        ]
    }

    /// Each sample as one encoded frame, named `<channel>-<index>-<variant>`.
    pub fn frames() -> Vec<(String, Vec<u8>)> {
        fn named<M: crate::msg::Message + std::fmt::Debug>(
            channel: &str,
            msgs: Vec<M>,
        ) -> Vec<(String, Vec<u8>)> {
            msgs.iter()
                .enumerate()
                .map(|(i, m)| {
                    let debug = format!("{m:?}");
                    let variant = debug
                        .split(|c: char| !c.is_ascii_alphanumeric())
                        .next()
                        .unwrap_or_default()
                        .to_ascii_lowercase();
                    // Samples are valid by construction.
                    let frame = super::encode(m).expect("sample encodes");
                    (format!("{channel}-{i:02}-{variant}"), frame)
                })
                .collect()
        }
        let mut out = named("agent", agent());
        out.extend(named("coord", coord()));
        out.extend(named("peer", peer()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::samples::{agent as agent_samples, coord as coord_samples, peer as peer_samples};
    use super::*;
    use crate::digest::Digest;
    use crate::msg::{AgentMsg, CoordMsg, PeerMsg, PieceData};
    use crate::rng::Rng;

    fn d(s: &[u8]) -> Digest {
        Digest::sha256_of(s)
    }

    #[test]
    fn frames_round_trip_byte_by_byte_and_in_one_chunk() {
        let msgs = agent_samples();
        let mut stream = Vec::new();
        for m in &msgs {
            stream.extend(encode(m).unwrap());
        }
        // One chunk.
        let mut dec = Decoder::<AgentMsg>::new();
        let mut input = &stream[..];
        let mut out = Vec::new();
        while let Some(m) = dec.decode(&mut input).unwrap() {
            out.push(m);
        }
        assert!(input.is_empty() && dec.is_idle());
        assert_eq!(out, msgs);
        // Byte by byte.
        let mut dec = Decoder::<AgentMsg>::new();
        let mut out = Vec::new();
        for b in &stream {
            let mut one = std::slice::from_ref(b);
            if let Some(m) = dec.decode(&mut one).unwrap() {
                out.push(m);
            }
            assert!(one.is_empty());
        }
        assert_eq!(out, msgs);

        for m in peer_samples() {
            assert_eq!(decode_one::<PeerMsg>(&encode(&m).unwrap()).unwrap(), m);
        }
        for m in coord_samples() {
            assert_eq!(decode_one::<CoordMsg>(&encode(&m).unwrap()).unwrap(), m);
        }
    }

    /// The seeds cover every variant of every channel: the variant index is the payload's
    /// first byte, and the counts are the enums' variant counts.
    #[test]
    fn samples_cover_every_variant() {
        let frames = samples::frames();
        for (kinds, variants) in [
            (&[Kind::AgentToCoordinator][..], 12),
            (&[Kind::CoordinatorToAgent][..], 11),
            (&[Kind::Peer, Kind::PieceData][..], 6),
        ] {
            let seen: std::collections::BTreeSet<u8> = frames
                .iter()
                .filter(|(_, f)| kinds.iter().any(|&k| f[1] == k as u8))
                .map(|(_, f)| f[HEADER_LEN])
                .collect();
            assert_eq!(seen, (0..variants).collect(), "{kinds:?}");
        }
        let names: std::collections::BTreeSet<&str> =
            frames.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.len(), frames.len());
        assert!(names.contains("agent-07-publishmanifest"), "{names:?}");
    }

    #[test]
    fn header_layout_is_stable() {
        let f = encode(&AgentMsg::Bye).unwrap();
        // version 1, kind 1, length 1, variant index 10 (Bye).
        assert_eq!(f, vec![1, 1, 0, 0, 0, 1, 10]);
        let f = encode(&PeerMsg::Piece {
            digest: d(b"x"),
            piece: 0,
            data: PieceData::default(),
        })
        .unwrap();
        assert_eq!(&f[..2], &[1, 4]);
    }

    #[test]
    fn hostile_headers_fail_before_allocation() {
        let cases: Vec<(Vec<u8>, WireError)> = vec![
            (vec![2], WireError::UnsupportedVersion(2)),
            (vec![0, 1, 0, 0, 0, 0], WireError::UnsupportedVersion(0)),
            (vec![1, 0], WireError::UnknownKind(0)),
            (vec![1, 99, 0, 0], WireError::UnknownKind(99)),
            (vec![1, 3], WireError::UnexpectedKind(Kind::Peer)),
            (
                vec![1, 2],
                WireError::UnexpectedKind(Kind::CoordinatorToAgent),
            ),
            (
                vec![1, 1, 0xff, 0xff, 0xff, 0xff],
                WireError::TooLarge {
                    kind: Kind::AgentToCoordinator,
                    len: u64::from(u32::MAX),
                    max: MAX_CONTROL_PAYLOAD,
                },
            ),
            (
                [&[1u8, 1][..], &(MAX_CONTROL_PAYLOAD + 1).to_be_bytes()].concat(),
                WireError::TooLarge {
                    kind: Kind::AgentToCoordinator,
                    len: u64::from(MAX_CONTROL_PAYLOAD) + 1,
                    max: MAX_CONTROL_PAYLOAD,
                },
            ),
        ];
        for (bytes, want) in cases {
            let mut dec = Decoder::<AgentMsg>::new();
            let mut input = &bytes[..];
            assert_eq!(dec.decode(&mut input), Err(want), "{bytes:?}");
            assert_eq!(dec.buffered(), 0);
            // Poisoned afterwards.
            assert_eq!(dec.decode(&mut &[1u8][..]), Err(WireError::Failed));
        }
        // A piece-data frame may be large on the peer channel but not larger than its bound.
        let mut dec = Decoder::<PeerMsg>::new();
        let hdr = [&[1u8, 4][..], &MAX_PIECE_PAYLOAD.to_be_bytes()].concat();
        assert_eq!(dec.decode(&mut &hdr[..]), Ok(None));
        let mut dec = Decoder::<PeerMsg>::new();
        let hdr = [&[1u8, 3][..], &(MAX_PEER_PAYLOAD + 1).to_be_bytes()].concat();
        assert!(matches!(
            dec.decode(&mut &hdr[..]),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn announced_length_is_not_preallocated() {
        let mut dec = Decoder::<PeerMsg>::new();
        let hdr = [&[1u8, 4][..], &MAX_PIECE_PAYLOAD.to_be_bytes(), &[0u8; 10]].concat();
        assert_eq!(dec.decode(&mut &hdr[..]), Ok(None));
        assert_eq!(dec.buffered(), 10);
        match &dec.state {
            State::Payload { buf, .. } => assert!(buf.capacity() < 1024),
            _ => panic!("expected payload state"),
        }
    }

    /// The fuzz target's check of what a decoder holds is not vacuous: it sees a buffer
    /// reserved for the announced length rather than for the bytes that arrived. (It used to
    /// run only after a completed frame, when the buffer is always empty.)
    #[test]
    #[should_panic(expected = "preallocated")]
    fn held_bytes_check_catches_preallocation() {
        let mut buf = Vec::with_capacity(1 << 20);
        buf.push(0);
        let mut dec = Decoder::<PeerMsg>::new();
        dec.state = State::Payload {
            kind: Kind::PieceData,
            len: 1 << 20,
            buf,
        };
        check_held(&dec);
    }

    #[test]
    fn bad_payloads_are_typed_errors() {
        // Truncated: needs more, then a complete-but-bad value.
        let frame = encode(&AgentMsg::Heartbeat { load: 1 }).unwrap();
        let mut dec = Decoder::<AgentMsg>::new();
        assert_eq!(dec.decode(&mut &frame[..frame.len() - 1]), Ok(None));
        // Unknown variant index.
        let bad = [1u8, 1, 0, 0, 0, 1, 200];
        assert!(matches!(
            decode_one::<AgentMsg>(&bad),
            Err(WireError::Malformed(_))
        ));
        // Trailing bytes inside the payload.
        let mut f = encode(&AgentMsg::Bye).unwrap();
        f[5] = 2;
        f.push(0);
        assert_eq!(decode_one::<AgentMsg>(&f), Err(WireError::TrailingBytes(1)));
        // A Piece inside a Peer-kind frame.
        let mut f = encode(&PeerMsg::Piece {
            digest: d(b"x"),
            piece: 0,
            data: PieceData::new(vec![1; 10]).unwrap(),
        })
        .unwrap();
        f[1] = Kind::Peer as u8;
        assert_eq!(
            decode_one::<PeerMsg>(&f),
            Err(WireError::UnexpectedKind(Kind::Peer))
        );
        // A decoded value that breaks its bounds.
        let mut f = encode(&PeerMsg::Request {
            digest: d(b"x"),
            piece: 1,
        })
        .unwrap();
        let n = f.len();
        // The piece index is the last varint; make it 16384 (0x80 0x80 0x01).
        f.truncate(n - 1);
        f.extend([0x80, 0x80, 0x01]);
        let len = (f.len() - HEADER_LEN) as u32;
        f[2..6].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            decode_one::<PeerMsg>(&f),
            Err(WireError::Invalid(_))
        ));
        // Invalid digest string inside.
        let mut f = encode(&AgentMsg::ReleaseOrigin { digest: d(b"x") }).unwrap();
        let last = f.len() - 1;
        f[last] = b'Z';
        assert!(matches!(
            decode_one::<AgentMsg>(&f),
            Err(WireError::Malformed(_))
        ));
        // Short input is not a frame.
        assert!(decode_one::<AgentMsg>(&frame[..3]).is_err());
    }

    #[test]
    fn encode_refuses_what_decode_would_refuse() {
        let big = PeerMsg::Piece {
            digest: d(b"x"),
            piece: 0,
            data: PieceData::new(vec![0; MAX_PIECE_LEN as usize]).unwrap(),
        };
        let f = encode(&big).unwrap();
        assert!(f.len() <= HEADER_LEN + MAX_PIECE_PAYLOAD as usize);
        assert_eq!(decode_one::<PeerMsg>(&f).unwrap(), big);
        let refused = CoordMsg::Refused {
            reason: "x".repeat(2000),
        };
        assert!(matches!(encode(&refused), Err(WireError::Invalid(_))));
    }

    /// Seeded random inputs: raw noise, valid frames with random corruptions, and random
    /// splits. The decoder must never panic, never buffer more than the bound, and agree with
    /// itself whatever the chunking.
    #[test]
    fn random_inputs_never_panic() {
        let mut rng = Rng::new(0x0051_40a1);
        let valid: Vec<Vec<u8>> = samples::frames().into_iter().map(|(_, f)| f).collect();
        for round in 0..3000 {
            let mut bytes = match round % 2 {
                0 => (0..rng.below(64)).map(|_| rng.next_u64() as u8).collect(),
                _ => valid[rng.below(valid.len() as u64) as usize].clone(),
            };
            // Flip, insert or drop a few bytes, keeping the version byte most of the time.
            for _ in 0..rng.below(4) {
                if bytes.is_empty() {
                    break;
                }
                let i = rng.below(bytes.len() as u64) as usize;
                match rng.below(3) {
                    0 => bytes[i] ^= 1 << rng.below(8),
                    1 => bytes.insert(i, rng.next_u64() as u8),
                    _ => {
                        bytes.remove(i);
                    }
                }
            }
            if rng.chance(0.7) && !bytes.is_empty() {
                bytes[0] = VERSION;
            }
            check_decoder_invariants(&bytes);
            let whole_a = run_chunks::<AgentMsg>(&bytes, &mut rng, usize::MAX);
            let split_a = run_chunks::<AgentMsg>(&bytes, &mut rng, 3);
            assert_eq!(whole_a, split_a, "{bytes:?}");
            let whole_p = run_chunks::<PeerMsg>(&bytes, &mut rng, usize::MAX);
            let split_p = run_chunks::<PeerMsg>(&bytes, &mut rng, 5);
            assert_eq!(whole_p, split_p, "{bytes:?}");
        }
    }

    /// Decodes `bytes` in random chunks of at most `max_chunk`; returns messages and the first
    /// error (as text, so different message types compare).
    fn run_chunks<M: Message + std::fmt::Debug>(
        bytes: &[u8],
        rng: &mut Rng,
        max_chunk: usize,
    ) -> (Vec<String>, Option<WireError>) {
        let mut dec = Decoder::<M>::new();
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = if max_chunk == usize::MAX {
                rest.len()
            } else {
                1 + rng.below(max_chunk as u64) as usize
            }
            .min(rest.len());
            let mut chunk = &rest[..n];
            rest = &rest[n..];
            loop {
                match dec.decode(&mut chunk) {
                    Ok(Some(m)) => out.push(format!("{m:?}")),
                    Ok(None) => break,
                    Err(e) => return (out, Some(e)),
                }
                assert!(dec.buffered() <= MAX_PIECE_PAYLOAD as usize);
            }
        }
        (out, None)
    }
}
