//! Control messages (agent ↔ coordinator) and peer messages (agent ↔ agent): with the
//! configuration, the only types that derive `Serialize`, so a refactor elsewhere never
//! changes the wire.
//!
//! Every message is postcard-encoded inside a [`wire`](crate::wire) frame that carries the
//! protocol version. Enums are encoded by variant index: variants are only ever appended, and
//! anything else is a new protocol version (and a new ALPN). Every collection has a bound,
//! checked by [`Message::validate`] on both encode and decode; strings that name nodes and zones
//! are parsed into [`NodeId`] and [`Zone`] during deserialisation.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::digest::Digest;
use crate::manifest::{PieceHash, PieceManifest, check_geometry};
use crate::piece::{Bitmap, MAX_PIECE_LEN, MAX_PIECES};
use crate::wire::Kind;

/// The control protocol version an agent speaks, sent in [`Hello`]. Frames carry
/// [`wire::VERSION`](crate::wire::VERSION) too; this one lets a coordinator refuse an agent
/// politely (with a log line naming both versions) rather than by a framing error.
pub const PROTOCOL_VERSION: u16 = 1;
/// Most peers in one [`LocateReply`].
pub const MAX_PEERS: usize = 64;
/// Most complete digests in one [`Announce`] or `Withdraw`; an agent with more sends several.
pub const MAX_ANNOUNCE_DIGESTS: usize = 4096;
/// Most partially downloaded blobs in one [`Announce`]. With [`MAX_ANNOUNCE_DIGESTS`] sha512
/// digests and every bitmap at [`MAX_PIECES`], an `Announce` still fits one control frame
/// (tested): an agent splitting by count never builds one it cannot send.
pub const MAX_ANNOUNCE_PARTIALS: usize = 128;
/// Longest node name (a DNS name's limit).
pub const MAX_NODE_ID: usize = 253;
/// Longest zone label.
pub const MAX_ZONE: usize = 128;
/// Largest DER certificate signing request in [`AgentMsg::Renew`].
pub const MAX_CSR_DER: usize = 8 * 1024;
/// Largest DER certificate in [`CoordMsg::Renewed`].
pub const MAX_CERT_DER: usize = 16 * 1024;
/// Most node names in one [`CoordMsg::RefusedNodes`] (2048 names of at most 253 bytes stay
/// well under the control frame bound).
pub const MAX_REFUSED_NODES: usize = 2048;
/// Most certificate serials in one [`CoordMsg::RefusedSerials`] (4096 serials of at most
/// [`MAX_SERIAL_HEX`] characters stay well under the control frame bound; tested).
pub const MAX_REFUSED_SERIALS: usize = 4096;
/// Longest certificate serial, in hex digits (32 bytes: RFC 5280 allows 20, the revocation
/// file accepts up to 32).
pub const MAX_SERIAL_HEX: usize = 64;
/// Longest reason in [`CoordMsg::Refused`] and [`CoordMsg::RenewRefused`].
pub const MAX_REASON: usize = 1024;

/// Why a message is refused after it was decoded (or before it is encoded).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MsgError {
    #[error("{what}: {found} entries, at most {max}")]
    TooMany {
        what: &'static str,
        found: usize,
        max: usize,
    },
    #[error("piece index {index} out of range (blob has {count} pieces)")]
    PieceIndex { index: u32, count: u32 },
    #[error("piece hashes are not in strictly ascending order")]
    Unordered,
    #[error("invalid geometry: {0}")]
    Geometry(#[from] crate::manifest::ManifestError),
    #[error("{0} names a different digest than the message")]
    DigestMismatch(&'static str),
}

// ---------------------------------------------------------------------------------------------
// Names

fn valid_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// Why a string is not a node name or zone label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("node name must be 1 to {MAX_NODE_ID} characters of [A-Za-z0-9._-]")]
    NodeId,
    #[error("zone label must be at most {MAX_ZONE} characters of [A-Za-z0-9._-] and '/'")]
    Zone,
    #[error("certificate serial must be 1 to {MAX_SERIAL_HEX} lower-case hex digits")]
    Serial,
}

/// A node's name: what its certificate is bound to and how peers and the tracker call it.
/// 1 to 253 characters of `[A-Za-z0-9._-]` (host names, Kubernetes node names). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(Arc<str>);

impl NodeId {
    pub fn new(s: &str) -> Result<NodeId, NameError> {
        let ok = !s.is_empty() && s.len() <= MAX_NODE_ID && s.bytes().all(valid_name_byte);
        if ok {
            Ok(NodeId(s.into()))
        } else {
            Err(NameError::NodeId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.0)
    }
}

/// A topology label such as `eu-west-1a` or `dc1/row4/rack12`: `/`-separated segments, most
/// general first. Empty means unknown. Peers sharing more leading segments are closer
/// ([`Zone::locality`]).
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Zone(Arc<str>);

impl Zone {
    pub fn new(s: &str) -> Result<Zone, NameError> {
        let ok = s.len() <= MAX_ZONE
            && s.bytes().all(|b| valid_name_byte(b) || b == b'/')
            && (s.is_empty() || s.split('/').all(|seg| !seg.is_empty()));
        if ok {
            Ok(Zone(s.into()))
        } else {
            Err(NameError::Zone)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// How many leading segments two labels share; 0 when either is unknown.
    pub fn locality(&self, other: &Zone) -> usize {
        if self.0.is_empty() || other.0.is_empty() {
            return 0;
        }
        self.0
            .split('/')
            .zip(other.0.split('/'))
            .take_while(|(a, b)| a == b)
            .count()
    }
}

impl fmt::Debug for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Zone({})", self.0)
    }
}

/// A certificate serial number as the cluster writes it: lower-case hex without leading zero
/// bytes (what `serial_hex` in the agent's cluster TLS gives), 1 to [`MAX_SERIAL_HEX`] digits.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(Arc<str>);

impl Serial {
    pub fn new(s: &str) -> Result<Serial, NameError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_SERIAL_HEX
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(Serial(s.into()))
        } else {
            Err(NameError::Serial)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({})", self.0)
    }
}

macro_rules! string_serde {
    ($t:ident) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $t::new(&s).map_err(de::Error::custom)
            }
        }
    };
}
string_serde!(NodeId);
string_serde!(Zone);
string_serde!(Serial);

// ---------------------------------------------------------------------------------------------
// Bytes

/// A byte buffer of at most `MAX` bytes, serialised as bytes (not as a sequence of numbers),
/// refused during deserialisation when longer.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct BoundedBytes<const MAX: usize>(pub(crate) Vec<u8>);

/// The payload of a piece: at most [`MAX_PIECE_LEN`] bytes.
pub type PieceData = BoundedBytes<{ MAX_PIECE_LEN as usize }>;
/// A DER-encoded PKCS#10 certificate signing request.
pub type CsrDer = BoundedBytes<MAX_CSR_DER>;
/// A DER-encoded X.509 certificate.
pub type CertDer = BoundedBytes<MAX_CERT_DER>;

impl<const MAX: usize> BoundedBytes<MAX> {
    /// `None` when `bytes` is longer than `MAX`.
    pub fn new(bytes: Vec<u8>) -> Option<Self> {
        (bytes.len() <= MAX).then_some(BoundedBytes(bytes))
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

impl<const MAX: usize> fmt::Debug for BoundedBytes<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0.len())
    }
}

impl<const MAX: usize> Serialize for BoundedBytes<MAX> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de, const MAX: usize> Deserialize<'de> for BoundedBytes<MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const MAX: usize>;
        impl<'de, const MAX: usize> Visitor<'de> for V<MAX> {
            type Value = BoundedBytes<MAX>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "at most {MAX} bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                if v.len() > MAX {
                    return Err(E::invalid_length(v.len(), &self));
                }
                Ok(BoundedBytes(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
                if v.len() > MAX {
                    return Err(E::invalid_length(v.len(), &self));
                }
                Ok(BoundedBytes(v))
            }
            // Self-describing formats (JSON in tests and logs) write bytes as a sequence.
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX).min(4096));
                while let Some(b) = seq.next_element::<u8>()? {
                    if v.len() == MAX {
                        return Err(de::Error::invalid_length(MAX + 1, &self));
                    }
                    v.push(b);
                }
                Ok(BoundedBytes(v))
            }
        }
        d.deserialize_byte_buf(V::<MAX>)
    }
}

// ---------------------------------------------------------------------------------------------
// Control channel

/// First message of an agent on the control channel. The coordinator checks `node` against
/// the name in the agent's certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub node: NodeId,
    pub zone: Zone,
    /// [`PROTOCOL_VERSION`] of the agent.
    pub version: u16,
    /// Where the agent accepts peer connections (`shoal-peer/1`).
    pub peer_addr: SocketAddr,
}

/// A blob being downloaded and the pieces of it already verified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partial {
    pub digest: Digest,
    pub have: Bitmap,
}

/// What an agent holds. Additive: entries refresh their expiry, nothing is implied about blobs
/// left out (an agent re-announces everything periodically, in several messages when needed,
/// and withdraws evicted blobs explicitly).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    pub complete: Vec<Digest>,
    pub partial: Vec<Partial>,
}

/// A peer the tracker suggests for a blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub node: NodeId,
    pub addr: SocketAddr,
    pub zone: Zone,
    /// Uploads in flight at the peer when it last reported (plus suggestions handed out since):
    /// lower is better.
    pub load: u32,
}

/// Provisional piece hashes, published by the agent that holds a blob's origin slot while it
/// reads the blob (before the anchored [`PieceManifest`] can exist), relayed by the coordinator.
/// Indices strictly ascending.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceHashes {
    pub digest: Digest,
    pub size: u64,
    pub piece_len: u64,
    pub entries: Vec<(u32, PieceHash)>,
}

impl PieceHashes {
    pub fn validate(&self) -> Result<(), MsgError> {
        let g = check_geometry(self.size, self.piece_len)?;
        let count = g.count();
        if self.entries.len() > count as usize {
            return Err(MsgError::TooMany {
                what: "piece hashes",
                found: self.entries.len(),
                max: count as usize,
            });
        }
        let mut prev: Option<u32> = None;
        for &(index, _) in &self.entries {
            if index >= count {
                return Err(MsgError::PieceIndex { index, count });
            }
            if prev.is_some_and(|p| p >= index) {
                return Err(MsgError::Unordered);
            }
            prev = Some(index);
        }
        Ok(())
    }
}

/// The coordinator's answer to [`AgentMsg::Locate`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocateReply {
    /// Echoes the request's `req`.
    pub req: u32,
    pub digest: Digest,
    /// The anchored manifest, when one exists.
    pub manifest: Option<PieceManifest>,
    /// Otherwise, the provisional hashes known so far (see [`PieceHashes`]).
    pub hashes: Option<PieceHashes>,
    pub peers: Vec<PeerInfo>,
    /// Whether the asker holds an origin slot for this blob (see [`CoordMsg::OriginSlot`]).
    pub origin: bool,
}

/// Agent → coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMsg {
    Hello(Hello),
    /// Liveness, sent every `heartbeat_ms` (from [`CoordMsg::Welcome`]).
    Heartbeat {
        load: u32,
    },
    Announce(Announce),
    /// Blobs no longer held (evicted).
    Withdraw {
        digests: Vec<Digest>,
    },
    /// Pieces of one blob verified so far; sent as the download progresses (throttled). For an
    /// origin-slot holder this is the progress that keeps its slot.
    Progress {
        digest: Digest,
        have: Bitmap,
    },
    /// Where to get a blob. `want_origin`: the agent would fetch from the origin if granted.
    Locate {
        req: u32,
        digest: Digest,
        want_origin: bool,
    },
    /// Provisional hashes of pieces read from the origin (slot holders only).
    PublishHashes(PieceHashes),
    /// The anchored manifest, after the whole blob matched its digest.
    PublishManifest(PieceManifest),
    /// The agent gives its origin slot back (finished, or gave up).
    ReleaseOrigin {
        digest: Digest,
    },
    /// `peer` sent a piece that failed verification.
    ReportBadPeer {
        peer: NodeId,
        digest: Digest,
        piece: u32,
    },
    Bye,
    /// A new certificate for the same node, for a fresh key whose CSR this is. Any coordinator
    /// of the cluster answers it (they share the CA); the names and addresses come from the
    /// certificate the session was authenticated with, never from the CSR.
    Renew {
        csr: CsrDer,
    },
}

/// Coordinator → agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoordMsg {
    /// Answer to [`Hello`]: the coordinator's protocol version and the agent's timers.
    Welcome {
        version: u16,
        heartbeat_ms: u32,
        announce_ms: u32,
    },
    LocateReply(LocateReply),
    /// An origin slot granted (possibly long after the `Locate` that asked, when a stalled
    /// seeder lost it) or revoked. `lease_ms`: how long the slot lasts without progress.
    OriginSlot {
        digest: Digest,
        granted: bool,
        lease_ms: u32,
    },
    /// Provisional hashes relayed to the agents downloading the blob.
    Hashes(PieceHashes),
    /// The coordinator refuses the session (unsupported version, name not matching the
    /// certificate); it closes the connection after sending it.
    Refused {
        reason: String,
    },
    Bye,
    /// Answer to [`AgentMsg::Renew`]: the new leaf certificate and the cluster CA that signed it.
    Renewed {
        leaf: CertDer,
        ca: CertDer,
    },
    /// Answer to [`AgentMsg::Renew`] when no certificate is issued (bad CSR, node revoked,
    /// asked too often). The session stays open; the agent retries later.
    RenewRefused {
        reason: String,
    },
    /// Nodes whose connections and pieces agents must refuse: revoked certificates and nodes the
    /// tracker quarantined. The whole list each time (not a change), sent after `Welcome` and
    /// whenever it changes.
    RefusedNodes {
        nodes: Vec<NodeId>,
    },
    /// Certificates (by serial) whose connections agents must refuse, whatever node they name:
    /// revoked by serial. The whole list each time, sent with `RefusedNodes` after `Welcome`
    /// and whenever it changes.
    RefusedSerials {
        serials: Vec<Serial>,
    },
    /// Asks an agent holding the whole blob for the anchored manifest it kept (computed when
    /// it committed the blob). Sent when the blob's swarm moved to this coordinator (another
    /// one failed, or this one restarted) and nothing here knows its pieces; the agent answers
    /// with [`AgentMsg::PublishManifest`] if it still has it, and says nothing otherwise.
    ManifestWanted {
        digest: Digest,
    },
}

/// Why a peer does not serve a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RejectReason {
    /// The peer does not hold that piece (any more).
    NotHave,
    /// Upload slots are full; ask someone else or later.
    Busy,
    /// The peer does not know the blob.
    UnknownBlob,
    /// The asking node may not pull this content.
    Forbidden,
    ShuttingDown,
    /// The peer is still spreading pieces nobody else has (it read them from the origin) and
    /// has already sent this one out: ask the peers that got it, or ask this peer for another.
    TryOthers,
}

/// Agent ↔ agent, on a `shoal-peer/1` connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMsg {
    /// Every piece of `digest` the sender has verified; sent when a session on that blob starts.
    Have {
        digest: Digest,
        have: Bitmap,
    },
    /// One more verified piece.
    HavePiece {
        digest: Digest,
        piece: u32,
    },
    Request {
        digest: Digest,
        piece: u32,
    },
    /// A whole piece. Travels in a [`Kind::PieceData`] frame with the larger bound.
    Piece {
        digest: Digest,
        piece: u32,
        data: PieceData,
    },
    Reject {
        digest: Digest,
        piece: u32,
        reason: RejectReason,
    },
    Cancel {
        digest: Digest,
        piece: u32,
    },
}

// ---------------------------------------------------------------------------------------------
// Framing glue

/// A message type that travels in [`wire`](crate::wire) frames.
pub trait Message: Serialize + for<'de> Deserialize<'de> {
    /// The frame kind this value travels in.
    fn kind(&self) -> Kind;
    /// Whether frames of `kind` carry this type.
    fn accepts(kind: Kind) -> bool;
    /// Bounds that the types alone do not enforce.
    fn validate(&self) -> Result<(), MsgError>;
}

fn at_most(what: &'static str, found: usize, max: usize) -> Result<(), MsgError> {
    if found > max {
        Err(MsgError::TooMany { what, found, max })
    } else {
        Ok(())
    }
}

fn piece_index(index: u32) -> Result<(), MsgError> {
    if index >= MAX_PIECES {
        Err(MsgError::PieceIndex {
            index,
            count: MAX_PIECES,
        })
    } else {
        Ok(())
    }
}

impl Message for AgentMsg {
    fn kind(&self) -> Kind {
        Kind::AgentToCoordinator
    }
    fn accepts(kind: Kind) -> bool {
        kind == Kind::AgentToCoordinator
    }
    fn validate(&self) -> Result<(), MsgError> {
        match self {
            AgentMsg::Announce(a) => {
                at_most("complete digests", a.complete.len(), MAX_ANNOUNCE_DIGESTS)?;
                at_most("partial blobs", a.partial.len(), MAX_ANNOUNCE_PARTIALS)
            }
            AgentMsg::Withdraw { digests } => {
                at_most("withdrawn digests", digests.len(), MAX_ANNOUNCE_DIGESTS)
            }
            AgentMsg::PublishHashes(h) => h.validate(),
            AgentMsg::ReportBadPeer { piece, .. } => piece_index(*piece),
            AgentMsg::Hello(_)
            | AgentMsg::Heartbeat { .. }
            | AgentMsg::Progress { .. }
            | AgentMsg::Locate { .. }
            | AgentMsg::PublishManifest(_)
            | AgentMsg::ReleaseOrigin { .. }
            | AgentMsg::Bye
            | AgentMsg::Renew { .. } => Ok(()),
        }
    }
}

impl Message for CoordMsg {
    fn kind(&self) -> Kind {
        Kind::CoordinatorToAgent
    }
    fn accepts(kind: Kind) -> bool {
        kind == Kind::CoordinatorToAgent
    }
    fn validate(&self) -> Result<(), MsgError> {
        match self {
            CoordMsg::LocateReply(r) => {
                at_most("peers", r.peers.len(), MAX_PEERS)?;
                if r.manifest.as_ref().is_some_and(|m| m.digest() != &r.digest) {
                    return Err(MsgError::DigestMismatch("manifest"));
                }
                if let Some(h) = &r.hashes {
                    if h.digest != r.digest {
                        return Err(MsgError::DigestMismatch("piece hashes"));
                    }
                    h.validate()?;
                }
                Ok(())
            }
            CoordMsg::Hashes(h) => h.validate(),
            CoordMsg::Refused { reason } | CoordMsg::RenewRefused { reason } => {
                at_most("refusal reason bytes", reason.len(), MAX_REASON)
            }
            CoordMsg::RefusedNodes { nodes } => {
                at_most("refused nodes", nodes.len(), MAX_REFUSED_NODES)
            }
            CoordMsg::RefusedSerials { serials } => {
                at_most("refused serials", serials.len(), MAX_REFUSED_SERIALS)
            }
            CoordMsg::Welcome { .. }
            | CoordMsg::ManifestWanted { .. }
            | CoordMsg::OriginSlot { .. }
            | CoordMsg::Bye
            | CoordMsg::Renewed { .. } => Ok(()),
        }
    }
}

impl Message for PeerMsg {
    fn kind(&self) -> Kind {
        match self {
            PeerMsg::Piece { .. } => Kind::PieceData,
            _ => Kind::Peer,
        }
    }
    fn accepts(kind: Kind) -> bool {
        matches!(kind, Kind::Peer | Kind::PieceData)
    }
    fn validate(&self) -> Result<(), MsgError> {
        match self {
            PeerMsg::Have { .. } => Ok(()),
            PeerMsg::HavePiece { piece, .. }
            | PeerMsg::Request { piece, .. }
            | PeerMsg::Piece { piece, .. }
            | PeerMsg::Reject { piece, .. }
            | PeerMsg::Cancel { piece, .. } => piece_index(*piece),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_valid_announce_fits_one_control_frame() {
        let digest =
            |i: usize| Digest::parse(&format!("sha512:{i:0128x}")).expect("a valid sha512 digest");
        let mut full = Bitmap::new(MAX_PIECES);
        for p in 0..MAX_PIECES {
            full.set(p);
        }
        let announce = Announce {
            complete: (0..MAX_ANNOUNCE_DIGESTS).map(digest).collect(),
            partial: (0..MAX_ANNOUNCE_PARTIALS)
                .map(|i| Partial {
                    digest: digest(MAX_ANNOUNCE_DIGESTS + i),
                    have: full.clone(),
                })
                .collect(),
        };
        let frame = crate::wire::encode(&AgentMsg::Announce(announce))
            .expect("the largest valid Announce encodes within the control bound");
        assert!(frame.len() <= crate::wire::MAX_CONTROL_PAYLOAD as usize + 16);
    }

    fn digest() -> Digest {
        Digest::sha256_of(b"blob")
    }

    #[test]
    fn node_ids_and_zones_are_parsed() {
        assert!(NodeId::new("node-1.example_a").is_ok());
        for bad in ["", "a b", "a/b", "é", "a\0", &"a".repeat(254)] {
            assert_eq!(NodeId::new(bad), Err(NameError::NodeId), "{bad:?}");
        }
        assert!(NodeId::new(&"a".repeat(253)).is_ok());
        assert!(Zone::new("").is_ok());
        assert!(Zone::new("dc1/row-4/rack.12").is_ok());
        for bad in ["/", "a//b", "a/", "/a", "a b", &"a".repeat(129)] {
            assert_eq!(Zone::new(bad), Err(NameError::Zone), "{bad:?}");
        }
        let z = |s| Zone::new(s).unwrap();
        assert_eq!(z("dc1/r1/k1").locality(&z("dc1/r1/k2")), 2);
        assert_eq!(z("dc1/r1").locality(&z("dc1/r1")), 2);
        assert_eq!(z("dc1").locality(&z("dc2")), 0);
        assert_eq!(z("").locality(&z("")), 0);
        // Deserialisation parses.
        assert!(serde_json::from_str::<NodeId>("\"bad name\"").is_err());
        assert!(serde_json::from_str::<Zone>("\"a//b\"").is_err());
        let n: NodeId = serde_json::from_str("\"n1\"").unwrap();
        assert_eq!(n.as_str(), "n1");
    }

    #[test]
    fn bounded_bytes() {
        type Small = BoundedBytes<4>;
        assert!(Small::new(vec![0; 5]).is_none());
        let b = Small::new(vec![1, 2, 3]).unwrap();
        let enc = postcard::to_allocvec(&b).unwrap();
        assert_eq!(enc, vec![3, 1, 2, 3]);
        assert_eq!(postcard::from_bytes::<Small>(&enc).unwrap(), b);
        assert!(postcard::from_bytes::<Small>(&[5, 1, 2, 3, 4, 5]).is_err());
        assert!(serde_json::from_str::<Small>("[1,2,3,4,5]").is_err());
        assert_eq!(
            serde_json::from_str::<Small>("[1,2]").unwrap().as_slice(),
            &[1, 2]
        );
    }

    #[test]
    fn piece_hashes_validate() {
        let mut h = PieceHashes {
            digest: digest(),
            size: 3 * crate::piece::MIN_PIECE_LEN,
            piece_len: crate::piece::MIN_PIECE_LEN,
            entries: vec![(0, [0; 32]), (2, [1; 32])],
        };
        assert_eq!(h.validate(), Ok(()));
        h.entries = vec![(2, [0; 32]), (1, [0; 32])];
        assert_eq!(h.validate(), Err(MsgError::Unordered));
        h.entries = vec![(1, [0; 32]), (1, [0; 32])];
        assert_eq!(h.validate(), Err(MsgError::Unordered));
        h.entries = vec![(3, [0; 32])];
        assert_eq!(
            h.validate(),
            Err(MsgError::PieceIndex { index: 3, count: 3 })
        );
        h.entries = vec![];
        h.piece_len = 12345;
        assert!(matches!(h.validate(), Err(MsgError::Geometry(_))));
    }

    #[test]
    fn messages_check_their_bounds() {
        let many = vec![digest(); MAX_ANNOUNCE_DIGESTS + 1];
        assert!(
            AgentMsg::Withdraw {
                digests: many.clone()
            }
            .validate()
            .is_err()
        );
        let a = Announce {
            complete: many,
            partial: vec![],
        };
        assert!(AgentMsg::Announce(a).validate().is_err());
        let peer = PeerInfo {
            node: NodeId::new("n").unwrap(),
            addr: "127.0.0.1:1".parse().unwrap(),
            zone: Zone::default(),
            load: 0,
        };
        let mut reply = LocateReply {
            req: 1,
            digest: digest(),
            manifest: None,
            hashes: None,
            peers: vec![peer; MAX_PEERS],
            origin: false,
        };
        assert_eq!(CoordMsg::LocateReply(reply.clone()).validate(), Ok(()));
        reply.peers.push(reply.peers[0].clone());
        assert!(CoordMsg::LocateReply(reply.clone()).validate().is_err());
        reply.peers.clear();
        reply.manifest = Some(
            PieceManifest::new(
                Digest::sha256_of(b"other"),
                0,
                crate::piece::MIN_PIECE_LEN,
                vec![],
            )
            .unwrap(),
        );
        assert_eq!(
            CoordMsg::LocateReply(reply).validate(),
            Err(MsgError::DigestMismatch("manifest"))
        );
        let refused = |n: usize| CoordMsg::RefusedNodes {
            nodes: vec![NodeId::new("n").unwrap(); n],
        };
        assert_eq!(refused(MAX_REFUSED_NODES).validate(), Ok(()));
        assert!(refused(MAX_REFUSED_NODES + 1).validate().is_err());
        // The largest refusal list still fits a control frame.
        let longest = NodeId::new(&"n".repeat(MAX_NODE_ID)).unwrap();
        let big = CoordMsg::RefusedNodes {
            nodes: vec![longest; MAX_REFUSED_NODES],
        };
        assert!(crate::wire::encode(&big).is_ok());
        let serials = |n: usize| CoordMsg::RefusedSerials {
            serials: vec![Serial::new(&"f".repeat(MAX_SERIAL_HEX)).unwrap(); n],
        };
        assert_eq!(serials(MAX_REFUSED_SERIALS).validate(), Ok(()));
        assert!(serials(MAX_REFUSED_SERIALS + 1).validate().is_err());
        assert!(crate::wire::encode(&serials(MAX_REFUSED_SERIALS)).is_ok());
        // The decoder refuses a list over the bound (encoded here by hand: `encode` would not).
        let payload = postcard::to_allocvec(&serials(MAX_REFUSED_SERIALS + 1)).unwrap();
        let mut frame = vec![crate::wire::VERSION, Kind::CoordinatorToAgent as u8];
        frame.extend((payload.len() as u32).to_be_bytes());
        frame.extend(payload);
        assert!(matches!(
            crate::wire::decode_one::<CoordMsg>(&frame),
            Err(crate::wire::WireError::Invalid(_))
        ));
        for bad in ["", "AB", "0x1", "g", &"a".repeat(MAX_SERIAL_HEX + 1)] {
            assert_eq!(Serial::new(bad), Err(NameError::Serial), "{bad:?}");
        }
        assert!(serde_json::from_str::<Serial>("\"AB\"").is_err());
        assert!(CsrDer::new(vec![0; MAX_CSR_DER + 1]).is_none());
        let req = PeerMsg::Request {
            digest: digest(),
            piece: MAX_PIECES,
        };
        assert!(req.validate().is_err());
        assert_eq!(req.kind(), Kind::Peer);
        let piece = PeerMsg::Piece {
            digest: digest(),
            piece: 0,
            data: PieceData::default(),
        };
        assert_eq!(piece.kind(), Kind::PieceData);
        assert!(PeerMsg::accepts(Kind::PieceData) && !AgentMsg::accepts(Kind::Peer));
    }
}
