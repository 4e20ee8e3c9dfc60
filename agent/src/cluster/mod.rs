//! The agent's side of the control plane: its cluster identity (enrollment, storage,
//! renewal), one control connection (`shoal-ctl/1`, QUIC, mutual TLS) to every configured
//! coordinator, and the TLS configurations of the peer channel (`shoal-peer/1`) for the data
//! plane.
//!
//! Which coordinator answers for a digest is decided by rendezvous hashing over the configured
//! names ([`coordinator_order`]): requests go to the first one whose connection is up. When a
//! connection goes down or comes back, ownership moves and the agent re-announces its
//! inventory (from [`Cluster::set_inventory`]) to the new owners. With no coordinator up,
//! [`Cluster::locate`] fails at once with [`ClusterError::Unavailable`] and the data plane
//! falls back to the origin; connections are retried with backoff in the background.
//!
//! Trust: the node's key never leaves it. The first certificate comes from enrollment over
//! the coordinator's HTTPS front door (bootstrap token, CSR); renewals go over the control
//! channel at two thirds of the certificate's life, after which every control session is
//! replaced by one opened with the new certificate (coordinators close sessions whose
//! certificate expired). Every cluster channel verifies both sides against the cluster CA
//! ([`tls`]).

pub mod config;
mod control;
mod enroll;
mod identity;
mod manifests;
pub mod tls;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use shoal_proto::Digest;
use shoal_proto::enroll::EnrollErrorCode;
use shoal_proto::msg::{AgentMsg, Announce, CoordMsg, LocateReply, NodeId, Serial, Zone};
use shoal_proto::tracker::coordinator_order;
use shoal_proto::wire::ALPN_PEER;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use self::config::{ClusterConfig, ClusterTimers, CoordinatorAddr, FrontDoorTrust};
pub use self::enroll::spki_pin;
use self::identity::Loaded;
use self::tls::{CertSlot, ClusterServerVerifier, Expect, NodeClientVerifier, Refusals, Trust};

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No coordinator answered in time: fall back to the origin.
    #[error("no coordinator is reachable")]
    Unavailable,
    #[error("enrollment refused by coordinator {coordinator}: {message}")]
    EnrollRefused {
        coordinator: String,
        code: EnrollErrorCode,
        message: String,
    },
    #[error("enrollment at coordinator {coordinator} failed: {reason}")]
    Enroll { coordinator: String, reason: String },
    #[error(
        "no valid certificate and no bootstrap token to enroll with: set [cluster] \
         bootstrap_token_file or SHOAL_BOOTSTRAP_TOKEN"
    )]
    NoToken,
    #[error("cluster state {}: {source}", path.display())]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cluster certificate: {0}")]
    Cert(#[from] tls::CertError),
    #[error("cluster configuration: {0}")]
    Config(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl ClusterError {
    /// Whether trying again later may succeed (as opposed to a refusal or a bad setup that
    /// needs an operator).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClusterError::Unavailable | ClusterError::Enroll { .. } => true,
            ClusterError::EnrollRefused { code, .. } => code.is_retryable(),
            _ => false,
        }
    }
}

/// What `is_refused` consults: the union of every coordinator's latest `RefusedNodes` and
/// `RefusedSerials` lists. Every change is signalled on `changes`, so open peer connections
/// are checked again at once rather than at their next stream.
struct RefusedSet {
    per_coordinator: RwLock<Vec<Refused>>,
    changes: watch::Sender<()>,
}

#[derive(Default)]
struct Refused {
    nodes: HashSet<NodeId>,
    serials: HashSet<Serial>,
}

impl Default for RefusedSet {
    fn default() -> Self {
        RefusedSet {
            per_coordinator: RwLock::new(Vec::new()),
            changes: watch::Sender::new(()),
        }
    }
}

impl RefusedSet {
    fn contains(&self, node: &NodeId) -> bool {
        self.per_coordinator
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|s| s.nodes.contains(node))
    }

    fn contains_certificate(&self, node: &NodeId, serial: &str) -> bool {
        // A serial that does not parse cannot be on a list (lists hold parsed serials only).
        let serial = Serial::new(serial).ok();
        self.per_coordinator
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|s| {
                s.nodes.contains(node) || serial.as_ref().is_some_and(|x| s.serials.contains(x))
            })
    }

    fn update(&self, idx: usize, f: impl FnOnce(&mut Refused)) {
        {
            let mut all = self
                .per_coordinator
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if all.len() <= idx {
                all.resize_with(idx + 1, Refused::default);
            }
            f(&mut all[idx]);
        }
        self.changes.send_replace(());
    }

    fn set_nodes(&self, idx: usize, nodes: Vec<NodeId>) {
        self.update(idx, |r| r.nodes = nodes.into_iter().collect());
    }

    fn set_serials(&self, idx: usize, serials: Vec<Serial>) {
        self.update(idx, |r| r.serials = serials.into_iter().collect());
    }
}

impl Refusals for RefusedSet {
    fn is_refused(&self, node: &NodeId, serial: &str) -> bool {
        self.contains_certificate(node, serial)
    }
}

/// A control session that is up, as [`Cluster::control_sessions`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlSession {
    pub coordinator: NodeId,
    /// Unique within the process: a new connection has a new id.
    pub id: u64,
    /// Serial of the certificate this node presented in the session's handshake.
    pub serial: String,
}

type Inventory = Arc<dyn Fn() -> Announce + Send + Sync>;

/// A live control session with one coordinator.
struct Session {
    id: u64,
    /// Serial of the certificate this side presented when the session was opened.
    serial: String,
    tx: mpsc::UnboundedSender<AgentMsg>,
    pending: HashMap<u32, oneshot::Sender<LocateReply>>,
    /// The session's connection: its datagram count tells a silent coordinator from a slow one.
    conn: quinn::Connection,
}

/// A locate unanswered for this long, over a connection that received no datagram at all
/// meanwhile (not even the acknowledgement of the request), means the coordinator is gone.
const SILENT_COORDINATOR: Duration = Duration::from_millis(500);

/// One configured coordinator and the session with it, if up.
struct Link {
    addr: CoordinatorAddr,
    session: Mutex<Option<Session>>,
}

impl Link {
    fn session(&self) -> std::sync::MutexGuard<'_, Option<Session>> {
        self.session.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_up(&self) -> bool {
        self.session().is_some()
    }

    fn send(&self, msg: AgentMsg) -> bool {
        self.session()
            .as_ref()
            .is_some_and(|s| s.tx.send(msg).is_ok())
    }
}

pub(crate) struct Inner {
    cfg: ClusterConfig,
    names: Vec<String>,
    trust: Arc<Trust>,
    slot: Arc<CertSlot>,
    identity: Mutex<Option<Loaded>>,
    /// Wakes the renewal task when the identity changes (or is needed).
    identity_changed: Notify,
    /// The serial of the certificate in use: control sessions opened with an older one move
    /// to the new one (see `control::session`).
    serial: watch::Sender<Option<String>>,
    refused: Arc<RefusedSet>,
    links: Vec<Link>,
    subs: Mutex<HashMap<Digest, Vec<mpsc::UnboundedSender<CoordMsg>>>>,
    load: AtomicU32,
    inventory: RwLock<Option<Inventory>>,
    /// Manifests of blobs committed from the swarm, for coordinators that ask.
    kept: Mutex<manifests::KeptManifests>,
    next_req: AtomicU32,
    /// Answers to `Renew`, from whichever session received them.
    renewals: Mutex<Option<mpsc::UnboundedSender<CoordMsg>>>,
    cancel: CancellationToken,
    peer_server: quinn::ServerConfig,
    peer_client: quinn::ClientConfig,
    ctl_client: quinn::ClientConfig,
    http: reqwest::Client,
}

/// The agent's handle on the cluster. Cheap to clone; background tasks stop when the
/// shutdown future given to [`Cluster::start`] resolves.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.inner.cfg.node)
            .field("coordinators", &self.inner.names)
            .finish_non_exhaustive()
    }
}

/// Keep-alive and idle timeout of cluster connections.
fn transport(idle: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(idle / 3));
    // An idle timeout above quinn's bound (2^62 ms) cannot be configured from a config file.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    Arc::new(t)
}

fn quic_server(
    cfg: rustls::ServerConfig,
    idle: Duration,
) -> Result<quinn::ServerConfig, ClusterError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(cfg)
        .map_err(|e| ClusterError::Internal(format!("QUIC server TLS: {e}")))?;
    let mut c = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    c.transport_config(transport(idle));
    Ok(c)
}

fn quic_client(
    cfg: rustls::ClientConfig,
    idle: Duration,
) -> Result<quinn::ClientConfig, ClusterError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)
        .map_err(|e| ClusterError::Internal(format!("QUIC client TLS: {e}")))?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(transport(idle));
    Ok(c)
}

impl Cluster {
    /// Loads a still-valid certificate from `state_dir` or enrolls (waiting up to
    /// `timers.enroll_wait`, then going on in the background); connects the control channels;
    /// renews the certificate before it expires. Fails only for what needs an operator: no
    /// token to enroll with, a refused token or node, an unusable state directory.
    pub async fn start(
        cfg: ClusterConfig,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Cluster, ClusterError> {
        if cfg.coordinators.is_empty() {
            return Err(ClusterError::Config("no coordinator configured".into()));
        }
        identity::ensure_dir(&cfg.state_dir)?;
        let provider = tls::provider();
        let trust = Arc::new(Trust::empty(provider.clone()));
        let slot = Arc::new(CertSlot::default());
        let refused = Arc::new(RefusedSet::default());

        let peer_server = tls::server_config(
            &trust,
            Arc::new(NodeClientVerifier::new(trust.clone(), refused.clone())),
            slot.clone(),
            ALPN_PEER,
        )
        .map_err(|e| ClusterError::Internal(e.to_string()))?;
        let peer_client = tls::client_config(
            &trust,
            Arc::new(ClusterServerVerifier::new(
                trust.clone(),
                Expect::Node,
                refused.clone(),
            )),
            slot.clone(),
            ALPN_PEER,
        )
        .map_err(|e| ClusterError::Internal(e.to_string()))?;
        let ctl_client = tls::client_config(
            &trust,
            Arc::new(ClusterServerVerifier::new(
                trust.clone(),
                Expect::Coordinator,
                Arc::new(tls::RefuseNone),
            )),
            slot.clone(),
            shoal_proto::wire::ALPN_CTL,
        )
        .map_err(|e| ClusterError::Internal(e.to_string()))?;
        let idle = cfg.timers.idle_timeout;
        let inner = Arc::new(Inner {
            names: cfg
                .coordinators
                .iter()
                .map(|c| c.name.to_string())
                .collect(),
            links: cfg
                .coordinators
                .iter()
                .map(|c| Link {
                    addr: c.clone(),
                    session: Mutex::new(None),
                })
                .collect(),
            http: enroll::client(&cfg.front_door)?,
            peer_server: quic_server(peer_server, idle)?,
            peer_client: quic_client(peer_client, idle)?,
            ctl_client: quic_client(ctl_client, idle)?,
            cfg,
            trust,
            slot,
            identity: Mutex::new(None),
            identity_changed: Notify::new(),
            serial: watch::Sender::new(None),
            refused,
            subs: Mutex::new(HashMap::new()),
            load: AtomicU32::new(0),
            inventory: RwLock::new(None),
            kept: Mutex::new(manifests::KeptManifests::new(manifests::MAX_KEPT_HASHES)),
            next_req: AtomicU32::new(1),
            renewals: Mutex::new(None),
            cancel: CancellationToken::new(),
        });
        let cancel = inner.cancel.clone();
        tokio::spawn(async move {
            shutdown.await;
            cancel.cancel();
        });

        let now = std::time::SystemTime::now();
        match identity::load(
            &inner.cfg.state_dir,
            &inner.cfg.node,
            inner.trust.provider(),
        ) {
            Ok(Some(id)) if id.info.is_valid_at(now, Duration::from_secs(1)) => {
                info!(
                    node = %inner.cfg.node,
                    serial = %id.info.serial,
                    not_after = ?id.info.not_after,
                    "cluster certificate loaded"
                );
                inner.install(id, false)?;
            }
            Ok(Some(_)) => info!("stored cluster certificate expired: enrolling again"),
            Ok(None) => info!(node = %inner.cfg.node, "no cluster certificate yet: enrolling"),
            Err(e) => warn!(error = %e, "stored cluster identity unusable: enrolling again"),
        }
        if inner.current().is_none() {
            if inner.cfg.bootstrap_token.is_none() {
                return Err(ClusterError::NoToken);
            }
            let wait = inner.cfg.timers.enroll_wait;
            match tokio::time::timeout(wait, inner.enroll_until_done()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => warn!(
                    waited = ?wait,
                    "no coordinator enrolled this node yet; going on in the background (peer sharing waits for it)"
                ),
            }
        }

        let (renew_tx, renew_rx) = mpsc::unbounded_channel();
        *inner
            .renewals
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(renew_tx);
        tokio::spawn(control::keep_identity(inner.clone(), renew_rx));
        let endpoint = control::client_endpoint(&inner.cfg)?;
        let mut first = Vec::new();
        for idx in 0..inner.links.len() {
            let (tx, rx) = oneshot::channel();
            first.push(rx);
            tokio::spawn(control::run_link(inner.clone(), endpoint.clone(), idx, tx));
        }
        // A freshly started agent should find its coordinators on its first pull: wait for
        // the first attempt on each (bounded by the connect timeout).
        let _ = tokio::time::timeout(
            inner.cfg.timers.connect_timeout + Duration::from_millis(500),
            futures::future::join_all(first),
        )
        .await;
        Ok(Cluster { inner })
    }

    pub fn node(&self) -> &NodeId {
        &self.inner.cfg.node
    }

    pub fn zone(&self) -> &Zone {
        &self.inner.cfg.zone
    }

    pub fn peer_listen(&self) -> SocketAddr {
        self.inner.cfg.peer_listen
    }

    /// Where peers are told to reach this node.
    pub fn advertise(&self) -> SocketAddr {
        self.inner.cfg.advertise
    }

    /// The quinn server configuration of the peer channel (ALPN `shoal-peer/1`): mutual TLS
    /// against the cluster CA, refusing nodes the coordinators refuse, presenting the current
    /// certificate (renewals apply to new connections without rebuilding anything).
    pub fn peer_server_config(&self) -> quinn::ServerConfig {
        self.inner.peer_server.clone()
    }

    /// The quinn client configuration of the peer channel. Connect with the peer's node name
    /// as the server name: its certificate must name exactly that node.
    pub fn peer_client_config(&self) -> quinn::ClientConfig {
        self.inner.peer_client.clone()
    }

    /// The verified node name of the other side of a peer connection.
    pub fn peer_identity(conn: &quinn::Connection) -> Option<NodeId> {
        let chain = conn
            .peer_identity()?
            .downcast::<Vec<CertificateDer<'static>>>()
            .ok()?;
        tls::node_of_chain(&chain)
    }

    /// Whether a node is revoked or quarantined (refuse its connections and pieces).
    pub fn is_refused(&self, node: &NodeId) -> bool {
        self.inner.refused.contains(node)
    }

    /// Whether a peer's certificate is refused: its node (as [`is_refused`](Self::is_refused))
    /// or the certificate itself (its serial revoked). `serial` as
    /// [`tls::serial_hex`] writes it.
    pub fn is_refused_certificate(&self, node: &NodeId, serial: &str) -> bool {
        self.inner.refused.contains_certificate(node, serial)
    }

    /// Changes whenever a coordinator sends a new refusal list, so that open peer connections
    /// can be checked again.
    pub fn refusal_changes(&self) -> watch::Receiver<()> {
        self.inner.refused.changes.subscribe()
    }

    /// Asks the digest's owner coordinator where to get it; on an unreachable one, the next.
    /// Fails with `Unavailable` within `locate_timeout` when no coordinator answers.
    pub async fn locate(
        &self,
        digest: &Digest,
        want_origin: bool,
    ) -> Result<LocateReply, ClusterError> {
        self.inner.locate(digest, want_origin).await
    }

    /// Sends `msg` about `digest` to its owner coordinator, if one is up (fire and forget).
    pub fn send(&self, digest: &Digest, msg: AgentMsg) {
        if !self.inner.send_for(digest, msg) {
            tracing::debug!(%digest, "no coordinator up; control message dropped");
        }
    }

    /// Keeps the anchored manifest of a blob this node committed, so that a coordinator taking
    /// the blob's swarm over can ask for it.
    pub fn keep_manifest(&self, manifest: shoal_proto::manifest::PieceManifest) {
        self.inner
            .kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(manifest);
    }

    /// Index (in the configured list) of the coordinator that answers for `digest` now: the
    /// first in its rendezvous order whose session is up.
    pub fn owner_of(&self, digest: &Digest) -> Option<usize> {
        self.inner.owner(digest)
    }

    /// Coordinator messages about `digest` (`OriginSlot`, `Hashes`) from now on.
    pub fn subscribe(&self, digest: &Digest) -> mpsc::UnboundedReceiver<CoordMsg> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut subs = self
            .inner
            .subs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let list = subs.entry(digest.clone()).or_default();
        list.retain(|s| !s.is_closed());
        list.push(tx);
        rx
    }

    /// Uploads in flight, reported in heartbeats.
    pub fn set_load(&self, load: u32) {
        self.inner.load.store(load, Ordering::Relaxed);
    }

    /// What this node holds, asked whenever the agent (re-)announces. Must be quick.
    pub fn set_inventory(&self, f: Arc<dyn Fn() -> Announce + Send + Sync>) {
        *self
            .inner
            .inventory
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(f);
        self.inner.reannounce_all();
    }

    /// Names of the coordinators whose control connection is up (for tests and logs).
    pub fn connected_coordinators(&self) -> Vec<NodeId> {
        self.inner
            .links
            .iter()
            .filter(|l| l.is_up())
            .map(|l| l.addr.name.clone())
            .collect()
    }

    /// The control sessions that are up, with the certificate each was opened with (for tests
    /// and logs).
    pub fn control_sessions(&self) -> Vec<ControlSession> {
        self.inner
            .links
            .iter()
            .filter_map(|l| {
                l.session().as_ref().map(|s| ControlSession {
                    coordinator: l.addr.name.clone(),
                    id: s.id,
                    serial: s.serial.clone(),
                })
            })
            .collect()
    }

    /// The serial and end of validity of the certificate in use (for tests and logs).
    pub fn certificate(&self) -> Option<(String, std::time::SystemTime)> {
        self.inner
            .current()
            .map(|id| (id.info.serial.clone(), id.info.not_after))
    }

    /// The cluster CA certificate (DER), once enrolled.
    pub fn ca_certificate(&self) -> Option<Vec<u8>> {
        self.inner.trust.ca().map(|c| c.to_vec())
    }
}

impl Inner {
    fn current(&self) -> Option<Loaded> {
        self.identity
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Starts presenting `id` (and trusting its CA); with `persist`, stores it too. A
    /// certificate that cannot be stored is still used (and enrolling again after a restart
    /// costs little), so a full or read-only disk does not cut the node off.
    fn install(&self, id: Loaded, persist: bool) -> Result<(), ClusterError> {
        if persist && let Err(e) = identity::save(&self.cfg.state_dir, &id) {
            warn!(error = %e, "cannot store the cluster certificate; using it from memory");
        }
        self.trust.set_ca(id.ca.clone())?;
        self.slot.set(id.certified.clone());
        // The serial before the identity: a session that sees the new identity also sees it.
        self.serial.send_replace(Some(id.info.serial.clone()));
        *self.identity.lock().unwrap_or_else(PoisonError::into_inner) = Some(id);
        self.identity_changed.notify_waiters();
        Ok(())
    }

    /// Enrolls over HTTPS, trying the coordinators in turn with backoff, until one issues a
    /// certificate or refuses for good.
    async fn enroll_until_done(&self) -> Result<(), ClusterError> {
        let token = self
            .cfg
            .bootstrap_token
            .clone()
            .ok_or(ClusterError::NoToken)?;
        let mut delay = self.cfg.timers.reconnect_min;
        loop {
            let key = identity::new_key(&self.cfg.node)?;
            let mut refusal = None;
            for c in &self.cfg.coordinators {
                match enroll::enroll_at(&self.http, &self.cfg, &token, c, &key).await {
                    Ok(id) => {
                        info!(
                            coordinator = %c.name,
                            serial = %id.info.serial,
                            not_after = ?id.info.not_after,
                            "enrolled in the cluster"
                        );
                        return self.install(id, true);
                    }
                    Err(e) if e.is_retryable() => {
                        warn!(coordinator = %c.name, error = %e, "enrollment attempt failed")
                    }
                    Err(e) => {
                        warn!(coordinator = %c.name, error = %e, "enrollment refused");
                        refusal = Some(e);
                    }
                }
            }
            if let Some(e) = refusal {
                return Err(e);
            }
            tokio::select! {
                () = tokio::time::sleep(control::jitter(delay)) => {}
                () = self.cancel.cancelled() => return Err(ClusterError::Unavailable),
            }
            delay = (delay * 2).min(self.cfg.timers.reconnect_max);
        }
    }

    fn order(&self, digest: &Digest) -> Vec<usize> {
        coordinator_order(digest, &self.names)
    }

    /// The first coordinator in `digest`'s order whose session is up.
    fn owner(&self, digest: &Digest) -> Option<usize> {
        self.order(digest)
            .into_iter()
            .find(|&i| self.links[i].is_up())
    }

    fn send_for(&self, digest: &Digest, msg: AgentMsg) -> bool {
        self.owner(digest).is_some_and(|i| self.links[i].send(msg))
    }

    async fn locate(
        &self,
        digest: &Digest,
        want_origin: bool,
    ) -> Result<LocateReply, ClusterError> {
        let deadline = tokio::time::Instant::now() + self.cfg.timers.locate_timeout;
        let order: Vec<usize> = self
            .order(digest)
            .into_iter()
            .filter(|&i| self.links[i].is_up())
            .collect();
        let mut left = order.len();
        for (attempt, idx) in order.into_iter().enumerate() {
            // A coordinator asked because the blob's owner did not answer knows nothing of the
            // blob yet (its holders still announce to the owner): an origin slot from it would
            // send a second reader to the origin. The slot is asked for again once the owner's
            // session is down and this coordinator owns the blob.
            let want_origin = want_origin && attempt == 0;
            let req = self.next_req.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            let sent_at = tokio::time::Instant::now();
            let sent = {
                let mut s = self.links[idx].session();
                match s.as_mut() {
                    Some(s) => {
                        s.pending.insert(req, tx);
                        let ok =
                            s.tx.send(AgentMsg::Locate {
                                req,
                                digest: digest.clone(),
                                want_origin,
                            })
                            .is_ok();
                        ok.then(|| (s.conn.clone(), s.conn.stats().udp_rx.datagrams))
                    }
                    None => None,
                }
            };
            left -= 1;
            let Some((conn, received)) = sent else {
                continue;
            };
            // Share what is left of the budget with the coordinators still to try, so a
            // silent owner cannot use it all.
            let now = tokio::time::Instant::now();
            let share = deadline
                .saturating_duration_since(now)
                .checked_div(left as u32 + 1)
                .unwrap_or_default()
                .max(Duration::from_millis(300));
            let until = (now + share).min(deadline);
            match tokio::time::timeout_at(until, rx).await {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(_)) => {
                    tracing::debug!(coordinator = %self.links[idx].addr.name, %digest, "session ended during locate; trying the next coordinator");
                }
                Err(_) => {
                    if let Some(s) = self.links[idx].session().as_mut() {
                        s.pending.remove(&req);
                    }
                    tracing::debug!(coordinator = %self.links[idx].addr.name, %digest, "locate timed out; trying the next coordinator");
                    // Silence, rather than slowness: a coordinator that is up acknowledges the
                    // request within a round trip. Ending the session now moves its blobs (and
                    // this node's inventory) to the next coordinators at once, instead of
                    // after the idle timeout, while other nodes still announce to it.
                    let silent_for = tokio::time::Instant::now() - sent_at;
                    if silent_for >= SILENT_COORDINATOR && conn.stats().udp_rx.datagrams == received
                    {
                        tracing::warn!(coordinator = %self.links[idx].addr.name, ?silent_for, "coordinator silent; ending its session");
                        conn.close(0u32.into(), b"silent");
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        Err(ClusterError::Unavailable)
    }

    /// Sends each up coordinator the part of the inventory it now owns.
    fn reannounce_all(&self) {
        let Some(inv) = self
            .inventory
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return;
        };
        let announce = inv();
        let mut parts: Vec<Announce> = vec![Announce::default(); self.links.len()];
        for d in announce.complete {
            if let Some(i) = self.owner(&d) {
                parts[i].complete.push(d);
            }
        }
        for p in announce.partial {
            if let Some(i) = self.owner(&p.digest) {
                parts[i].partial.push(p);
            }
        }
        for (i, part) in parts.into_iter().enumerate() {
            for msg in control::chunk_announce(part) {
                self.links[i].send(AgentMsg::Announce(msg));
            }
        }
    }

    /// The part of the inventory owned by coordinator `idx`.
    fn inventory_for(&self, idx: usize) -> Option<Announce> {
        let inv = self
            .inventory
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        let mut a = inv();
        a.complete.retain(|d| self.owner(d) == Some(idx));
        a.partial.retain(|p| self.owner(&p.digest) == Some(idx));
        Some(a)
    }

    /// Answers a coordinator's [`CoordMsg::ManifestWanted`] with the kept manifest, if any.
    fn answer_manifest(&self, idx: usize, digest: &Digest) {
        let kept = self
            .kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(digest)
            .cloned();
        match kept {
            Some(m) => {
                tracing::debug!(coordinator = %self.links[idx].addr.name, %digest, "manifest asked for and sent");
                self.links[idx].send(AgentMsg::PublishManifest(m));
            }
            None => {
                tracing::debug!(coordinator = %self.links[idx].addr.name, %digest, "manifest asked for, not kept");
            }
        }
    }

    fn dispatch(&self, digest: &Digest, msg: CoordMsg) {
        let mut subs = self.subs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(list) = subs.get_mut(digest) {
            list.retain(|s| s.send(msg.clone()).is_ok());
            if list.is_empty() {
                subs.remove(digest);
            }
        }
    }
}
