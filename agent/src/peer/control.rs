//! What the data plane needs from the control plane: the node's identity and peer TLS, the
//! tracker (locate, messages in both directions), and refusals. [`Cluster`](crate::cluster)
//! provides it in the agent; tests provide an in-process tracker.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use shoal_proto::Digest;
use shoal_proto::manifest::PieceManifest;
use shoal_proto::msg::{AgentMsg, Announce, CoordMsg, LocateReply, NodeId};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::watch;

/// A locate that got no answer: no coordinator reachable (or it refused). The download falls
/// back to the origin.
#[derive(Debug, thiserror::Error)]
#[error("locate failed: {0}")]
pub struct LocateError(pub String);

/// The control plane as the data plane sees it. Mirrors the methods of `Cluster` it uses, so
/// the peer module can be tested with an in-process tracker and no coordinator.
pub trait Control: Send + Sync + 'static {
    /// This node's name (what its certificate is bound to).
    fn node(&self) -> &NodeId;
    /// The UDP address the peer endpoint binds.
    fn peer_listen(&self) -> SocketAddr;
    /// mTLS server configuration with ALPN `shoal-peer/1` (current certificate across
    /// renewals).
    fn peer_server_config(&self) -> quinn::ServerConfig;
    /// mTLS client configuration; the server name to connect with is the peer's node name.
    fn peer_client_config(&self) -> quinn::ClientConfig;
    /// The node a connection's verified certificate names; `None` without one.
    fn peer_identity(&self, conn: &quinn::Connection) -> Option<NodeId>;
    /// Whether the cluster refuses this node (revoked or quarantined).
    fn is_refused(&self, node: &NodeId) -> bool;
    /// Whether the cluster refuses a peer's certificate: its node, or the certificate itself
    /// (its serial revoked). `serial` as `cluster::tls::serial_hex` writes it.
    fn is_refused_certificate(&self, node: &NodeId, serial: &str) -> bool {
        let _ = serial;
        self.is_refused(node)
    }
    /// Changes whenever the refusal lists do, so that open connections are checked again at
    /// once; `None` when they are checked only as streams arrive.
    fn refusal_changes(&self) -> Option<watch::Receiver<()>> {
        None
    }
    /// Asks the tracker where to get `digest`. Fails fast (a couple of seconds) when no
    /// coordinator answers.
    fn locate(
        &self,
        digest: &Digest,
        want_origin: bool,
    ) -> BoxFuture<'_, Result<LocateReply, LocateError>>;
    /// Sends a message about `digest` to the coordinator responsible for it (best effort).
    fn send(&self, digest: &Digest, msg: AgentMsg);
    /// The coordinator's messages about `digest` (origin slots, provisional hashes), from now
    /// until the receiver is dropped.
    fn subscribe(&self, digest: &Digest) -> UnboundedReceiver<CoordMsg>;
    /// Uploads in flight, reported in heartbeats.
    fn set_load(&self, load: u32);
    /// What to announce when (re-)announcing.
    fn set_inventory(&self, f: Arc<dyn Fn() -> Announce + Send + Sync>);
    /// Keeps the anchored manifest of a committed blob for coordinators that ask for it.
    fn keep_manifest(&self, manifest: PieceManifest) {
        let _ = manifest;
    }
    /// Which coordinator answers for `digest` now (an index; it changes when coordinators go
    /// down or come back). `None` when unknown or none is up.
    fn owner_of(&self, digest: &Digest) -> Option<usize> {
        let _ = digest;
        None
    }
}

impl Control for crate::cluster::Cluster {
    fn node(&self) -> &NodeId {
        crate::cluster::Cluster::node(self)
    }
    fn peer_listen(&self) -> SocketAddr {
        crate::cluster::Cluster::peer_listen(self)
    }
    fn peer_server_config(&self) -> quinn::ServerConfig {
        crate::cluster::Cluster::peer_server_config(self)
    }
    fn peer_client_config(&self) -> quinn::ClientConfig {
        crate::cluster::Cluster::peer_client_config(self)
    }
    fn peer_identity(&self, conn: &quinn::Connection) -> Option<NodeId> {
        crate::cluster::Cluster::peer_identity(conn)
    }
    fn is_refused(&self, node: &NodeId) -> bool {
        crate::cluster::Cluster::is_refused(self, node)
    }
    fn is_refused_certificate(&self, node: &NodeId, serial: &str) -> bool {
        crate::cluster::Cluster::is_refused_certificate(self, node, serial)
    }
    fn refusal_changes(&self) -> Option<watch::Receiver<()>> {
        Some(crate::cluster::Cluster::refusal_changes(self))
    }
    fn locate(
        &self,
        digest: &Digest,
        want_origin: bool,
    ) -> BoxFuture<'_, Result<LocateReply, LocateError>> {
        let digest = digest.clone();
        Box::pin(async move {
            crate::cluster::Cluster::locate(self, &digest, want_origin)
                .await
                .map_err(|e| LocateError(e.to_string()))
        })
    }
    fn send(&self, digest: &Digest, msg: AgentMsg) {
        crate::cluster::Cluster::send(self, digest, msg);
    }
    fn subscribe(&self, digest: &Digest) -> UnboundedReceiver<CoordMsg> {
        crate::cluster::Cluster::subscribe(self, digest)
    }
    fn set_load(&self, load: u32) {
        crate::cluster::Cluster::set_load(self, load);
    }
    fn set_inventory(&self, f: Arc<dyn Fn() -> Announce + Send + Sync>) {
        crate::cluster::Cluster::set_inventory(self, f);
    }
    fn keep_manifest(&self, manifest: PieceManifest) {
        crate::cluster::Cluster::keep_manifest(self, manifest);
    }
    fn owner_of(&self, digest: &Digest) -> Option<usize> {
        crate::cluster::Cluster::owner_of(self, digest)
    }
}
