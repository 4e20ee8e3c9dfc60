//! Misbehaving cluster members, built into the harness.
//!
//! [`BadPeer`] is a legitimate member (it enrolls with the bootstrap token and holds a real
//! node certificate from the cluster CA; its control sessions are a real
//! `shoal_agent::cluster::Cluster`) that lies: it announces that it holds every blob it is
//! told about, accepts peer connections (`shoal-peer/1`, mutual TLS with its certificate),
//! answers every session's `Have` with a full bitmap, and answers every piece request with
//! bytes of the right length that are not the blob's.
//!
//! [`Outsider`] has no place in the cluster: a node certificate from another CA (made with
//! rcgen, with the right identity URI and address), or no certificate at all. Its attempts to
//! open a peer connection or a control session report whether anything answered.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use shoal_agent::cluster::tls::{self, CertSlot, ClusterServerVerifier, Expect, RefuseNone, Trust};
use shoal_agent::cluster::{Cluster, ClusterConfig};
use shoal_proto::Digest;
use shoal_proto::msg::{
    AgentMsg, Announce, CoordMsg, Hello, NodeId, PROTOCOL_VERSION, PeerMsg, PieceData,
    RejectReason, Zone,
};
use shoal_proto::piece::{Bitmap, Geometry};
use shoal_proto::wire::{self, ALPN_CTL, ALPN_PEER, Decoder};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::cluster::free_udp_port;

/// How long one attempt of an [`Outsider`] may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a [`BadPeer`] has done so far.
#[derive(Debug, Default)]
pub struct BadPeerStats {
    /// Peer connections whose handshake completed.
    pub connections: AtomicU64,
    /// Sessions (`Have` streams) answered with a full bitmap.
    pub sessions: AtomicU64,
    /// Piece requests answered with wrong bytes.
    pub corrupt_pieces: AtomicU64,
}

type Blobs = Arc<Mutex<HashMap<Digest, u64>>>;

/// A legitimate member that serves corrupt pieces. Stops on drop.
pub struct BadPeer {
    name: NodeId,
    addr: SocketAddr,
    cluster: Cluster,
    blobs: Blobs,
    stats: Arc<BadPeerStats>,
    task: JoinHandle<()>,
    _stop: oneshot::Sender<()>,
    _state: TempDir,
}

impl std::fmt::Debug for BadPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BadPeer")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl BadPeer {
    /// Enrolls `name` on `ip` through `config` (e.g. [`crate::cluster::TestCluster::member_config`];
    /// its `peer_listen`, `advertise` and `state_dir` are replaced), opens control sessions,
    /// and starts serving corrupt pieces. Claims nothing until [`BadPeer::claim`].
    pub async fn start(mut config: ClusterConfig, ip: std::net::IpAddr) -> Result<BadPeer> {
        let state = tempfile::Builder::new()
            .prefix("shoal-bad-peer-")
            .tempdir()?;
        let addr = SocketAddr::new(ip, free_udp_port(ip)?);
        config.peer_listen = addr;
        config.advertise = addr;
        config.state_dir = state.path().join("cluster");
        let name = config.node.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let cluster = Cluster::start(config, async move {
            let _ = stopped.await;
        })
        .await
        .with_context(|| format!("the bad peer {name} could not join"))?;
        crate::net::wait_until(
            Duration::from_secs(15),
            "the bad peer has its control sessions",
            || {
                let up = !cluster.connected_coordinators().is_empty();
                async move { up }
            },
        )
        .await?;
        let endpoint = quinn::Endpoint::server(cluster.peer_server_config(), addr)
            .context("binding the bad peer's endpoint")?;
        let blobs: Blobs = Arc::default();
        let stats = Arc::new(BadPeerStats::default());
        let task = tokio::spawn(serve(endpoint, blobs.clone(), stats.clone()));
        Ok(BadPeer {
            name,
            addr,
            cluster,
            blobs,
            stats,
            task,
            _stop: stop,
            _state: state,
        })
    }

    pub fn node(&self) -> &NodeId {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its control plane handle (what the coordinators tell it, e.g. refusals).
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn stats(&self) -> &BadPeerStats {
        &self.stats
    }

    pub fn corrupt_pieces_served(&self) -> u64 {
        self.stats.corrupt_pieces.load(Ordering::Relaxed)
    }

    /// Announces `(digest, size)` blobs as complete (now and at every re-announcement), and
    /// serves wrong bytes for them.
    pub fn claim(&self, blobs: &[(Digest, u64)]) {
        let mut held = self.blobs.lock().unwrap_or_else(PoisonError::into_inner);
        for (d, size) in blobs {
            held.insert(d.clone(), *size);
        }
        let announce = Announce {
            complete: held.keys().cloned().collect(),
            partial: vec![],
        };
        drop(held);
        self.cluster
            .set_inventory(Arc::new(move || announce.clone()));
    }

    /// Whether the cluster told this node that it is refused (quarantined or revoked): the
    /// coordinators send the list to every member, this one included.
    pub fn is_refused(&self) -> bool {
        self.cluster.is_refused(&self.name)
    }
}

impl Drop for BadPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(endpoint: quinn::Endpoint, blobs: Blobs, stats: Arc<BadPeerStats>) {
    while let Some(incoming) = endpoint.accept().await {
        let (blobs, stats) = (blobs.clone(), stats.clone());
        tokio::spawn(async move {
            let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(10), incoming).await else {
                return;
            };
            stats.connections.fetch_add(1, Ordering::Relaxed);
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(answer(send, recv, blobs.clone(), stats.clone()));
            }
        });
    }
}

async fn read_frame(
    recv: &mut quinn::RecvStream,
    dec: &mut Decoder<PeerMsg>,
    buf: &mut Vec<u8>,
) -> Option<PeerMsg> {
    loop {
        if !buf.is_empty() {
            let mut input = &buf[..];
            let r = dec.decode(&mut input);
            let used = buf.len() - input.len();
            buf.drain(..used);
            match r {
                Ok(Some(m)) => return Some(m),
                Ok(None) => {}
                Err(_) => return None,
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        match recv.read(&mut chunk).await {
            Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// Wrong bytes for a piece: deterministic, never the blob's (a blob piece equal to this
/// pattern is not going to happen with random test layers).
fn garbage(digest: &Digest, piece: u32, len: usize) -> Vec<u8> {
    let seed = Digest::sha256_of(format!("{digest} {piece}").as_bytes());
    seed.as_bytes().iter().copied().cycle().take(len).collect()
}

async fn answer(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    blobs: Blobs,
    stats: Arc<BadPeerStats>,
) {
    let mut dec = Decoder::<PeerMsg>::new();
    let mut buf = Vec::new();
    let Some(first) = read_frame(&mut recv, &mut dec, &mut buf).await else {
        return;
    };
    let size_of = |d: &Digest| {
        blobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(d)
            .copied()
    };
    match first {
        PeerMsg::Have { digest, .. } => {
            let msg = match size_of(&digest) {
                Some(size) => PeerMsg::Have {
                    have: Bitmap::full(Geometry::for_size(size).count()),
                    digest,
                },
                None => PeerMsg::Reject {
                    digest,
                    piece: 0,
                    reason: RejectReason::UnknownBlob,
                },
            };
            if let Ok(frame) = wire::encode(&msg)
                && send.write_all(&frame).await.is_ok()
            {
                stats.sessions.fetch_add(1, Ordering::Relaxed);
            }
            // Keep the session open, ignoring the other side's `HavePiece`s, until it ends.
            while read_frame(&mut recv, &mut dec, &mut buf).await.is_some() {}
            let _ = send.finish();
        }
        PeerMsg::Request { digest, piece } => {
            let range = size_of(&digest).and_then(|s| Geometry::for_size(s).range(piece));
            let msg = match range {
                Some(r) => {
                    let data = garbage(&digest, piece, (r.end - r.start) as usize);
                    match PieceData::new(data) {
                        Some(data) => PeerMsg::Piece {
                            digest,
                            piece,
                            data,
                        },
                        None => return,
                    }
                }
                None => PeerMsg::Reject {
                    digest,
                    piece,
                    reason: RejectReason::UnknownBlob,
                },
            };
            let corrupt = matches!(msg, PeerMsg::Piece { .. });
            if let Ok(frame) = wire::encode(&msg)
                && send.write_all(&frame).await.is_ok()
            {
                let _ = send.finish();
                if corrupt {
                    stats.corrupt_pieces.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        _ => {}
    }
}

/// Asks the peer `server` at `addr` for one piece over a fresh connection from `from`:
/// handshake, a `Request` stream, the first answer (`Piece` or `Reject`). Any refusal along the
/// way (handshake, closed connection or stream) is an `Err`.
pub async fn request_piece(
    client: quinn::ClientConfig,
    from: std::net::IpAddr,
    addr: SocketAddr,
    server: &NodeId,
    digest: &Digest,
    piece: u32,
) -> Result<PeerMsg> {
    let ep = quinn::Endpoint::client(SocketAddr::new(from, 0))?;
    let attempt = async {
        let conn = ep.connect_with(client, addr, server.as_str())?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&wire::encode(&PeerMsg::Request {
            digest: digest.clone(),
            piece,
        })?)
        .await?;
        let _ = send.finish();
        let mut dec = Decoder::<PeerMsg>::new();
        let mut buf = Vec::new();
        let answer = read_frame(&mut recv, &mut dec, &mut buf)
            .await
            .context("no answer (stream or connection closed)");
        conn.close(0u32.into(), b"done");
        answer
    };
    let r = tokio::time::timeout(ATTEMPT_TIMEOUT, attempt)
        .await
        .context("peer attempt hung")?;
    ep.wait_idle().await;
    r
}

/// Who an [`Outsider`] claims to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutsiderKind {
    /// A node certificate from a CA that is not the cluster's.
    ForeignCa,
    /// No client certificate at all.
    NoCertificate,
}

/// A would-be member without a cluster certificate.
pub struct Outsider {
    kind: OutsiderKind,
    name: NodeId,
    ip: std::net::IpAddr,
    identity: Option<Arc<rustls::sign::CertifiedKey>>,
    /// The foreign CA (DER), for [`OutsiderKind::ForeignCa`].
    foreign_ca: Option<CertificateDer<'static>>,
    /// The foreign leaf and key in the agent's `identity.pem` format.
    identity_pem: Option<String>,
}

impl std::fmt::Debug for Outsider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outsider")
            .field("kind", &self.kind)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Outsider {
    /// An outsider named `name` on `ip`.
    pub fn new(kind: OutsiderKind, name: &str, ip: std::net::IpAddr) -> Result<Outsider> {
        let name = NodeId::new(name)?;
        let mut o = Outsider {
            kind,
            name: name.clone(),
            ip,
            identity: None,
            foreign_ca: None,
            identity_pem: None,
        };
        if kind == OutsiderKind::ForeignCa {
            let (key, ca, pem) = foreign_identity(&name, ip)?;
            o.identity = Some(key);
            o.foreign_ca = Some(ca);
            o.identity_pem = Some(pem);
        }
        Ok(o)
    }

    pub fn kind(&self) -> OutsiderKind {
        self.kind
    }

    pub fn node(&self) -> &NodeId {
        &self.name
    }

    /// The foreign certificate, CA and key as an agent's `identity.pem` (leaf, CA, PKCS#8
    /// key): write it to an agent's cluster state directory to make a whole agent that holds
    /// a certificate from another CA.
    pub fn identity_pem(&self) -> Option<&str> {
        self.identity_pem.as_deref()
    }

    fn client(
        &self,
        trusted_ca: &[u8],
        expect: Expect,
        alpn: &[u8],
    ) -> Result<quinn::ClientConfig> {
        let trust = Arc::new(Trust::new(
            tls::provider(),
            CertificateDer::from(trusted_ca.to_vec()),
        )?);
        let slot = Arc::new(CertSlot::default());
        if let Some(k) = &self.identity {
            slot.set(k.clone());
        }
        let verifier = Arc::new(ClusterServerVerifier::new(
            trust.clone(),
            expect,
            Arc::new(RefuseNone),
        ));
        let cfg = tls::client_config(&trust, verifier, slot, alpn)?;
        Ok(quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(cfg)?,
        )))
    }

    /// Tries to get piece 0 of `digest` from the peer `server` at `addr` (see
    /// [`request_piece`]). Trusts `cluster_ca` for the server's certificate, so only the
    /// server's verdict on this client matters. `Ok(answer)` means the server talked to it.
    pub async fn try_peer(
        &self,
        cluster_ca: &[u8],
        addr: SocketAddr,
        server: &NodeId,
        digest: &Digest,
    ) -> Result<PeerMsg> {
        let cfg = self.client(cluster_ca, Expect::Node, ALPN_PEER)?;
        request_piece(cfg, self.ip, addr, server, digest, 0).await
    }

    /// Tries to open a control session with coordinator `name` at `addr`: handshake, `Hello`,
    /// and the first answer. `Ok(msg)` means the coordinator answered (a `Welcome` would mean
    /// it let the outsider in).
    pub async fn try_control(
        &self,
        cluster_ca: &[u8],
        addr: SocketAddr,
        name: &str,
        peer_addr: SocketAddr,
    ) -> Result<CoordMsg> {
        let cfg = self.client(cluster_ca, Expect::Coordinator, ALPN_CTL)?;
        let ep = quinn::Endpoint::client(SocketAddr::new(self.ip, 0))?;
        let hello = AgentMsg::Hello(Hello {
            node: self.name.clone(),
            zone: Zone::default(),
            version: PROTOCOL_VERSION,
            peer_addr,
        });
        let attempt = async {
            let conn = ep.connect_with(cfg, addr, name)?.await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&wire::encode(&hello)?).await?;
            let mut dec = Decoder::<CoordMsg>::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = recv.read(&mut buf).await?.context("stream ended")?;
                let mut input = &buf[..n];
                if let Some(m) = dec.decode(&mut input)? {
                    return Ok::<_, anyhow::Error>(m);
                }
            }
        };
        let r = tokio::time::timeout(ATTEMPT_TIMEOUT, attempt)
            .await
            .context("control attempt hung")?;
        ep.close(0u32.into(), b"done");
        r
    }

    /// Serves `shoal-peer/1` on `ip:0` with the foreign certificate (a peer that members
    /// would have to trust to fetch from it), accepting any client. Returns its address and
    /// a receiver that says whether a handshake completed.
    pub fn serve_foreign(&self) -> Result<(SocketAddr, oneshot::Receiver<bool>, quinn::Endpoint)> {
        let (Some(key), Some(ca)) = (&self.identity, &self.foreign_ca) else {
            bail!("only an outsider with a foreign certificate can serve");
        };
        let trust = Arc::new(Trust::new(tls::provider(), ca.clone())?);
        let slot = Arc::new(CertSlot::default());
        slot.set(key.clone());
        let verifier = Arc::new(tls::NodeClientVerifier::new(
            trust.clone(),
            Arc::new(RefuseNone),
        ));
        let cfg = tls::server_config(&trust, verifier, slot, ALPN_PEER)?;
        let server = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(cfg)?,
        ));
        let ep = quinn::Endpoint::server(server, SocketAddr::new(self.ip, 0))?;
        let addr = ep.local_addr()?;
        let (tx, rx) = oneshot::channel();
        let accept = ep.clone();
        tokio::spawn(async move {
            let ok = match tokio::time::timeout(ATTEMPT_TIMEOUT, accept.accept()).await {
                Ok(Some(incoming)) => incoming.await.is_ok(),
                _ => false,
            };
            let _ = tx.send(ok);
        });
        Ok((addr, rx, ep))
    }
}

/// A node certificate for `name` (identity URI and IP address as the cluster CA would write
/// them) from a fresh CA that is not the cluster's; also as `identity.pem` text.
fn foreign_identity(
    name: &NodeId,
    ip: std::net::IpAddr,
) -> Result<(
    Arc<rustls::sign::CertifiedKey>,
    CertificateDer<'static>,
    String,
)> {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    params.subject_alt_names.push(SanType::URI(
        shoal_proto::enroll::node_uri(name).try_into()?,
    ));
    params.subject_alt_names.push(SanType::IpAddress(ip));
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &issuer)?;
    let key_pem = key.serialize_pem();
    let pem = format!("{}{}{}", cert.pem(), ca.pem(), key_pem);
    let chain = vec![cert.der().clone(), ca.der().clone()];
    let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let certified = tls::certified_key(chain, key_der, &tls::provider())?;
    Ok((certified, ca.der().clone(), pem))
}
