//! The coordinator's part of the cluster: the cluster CA ([`ca`]), enrollment on the front
//! door ([`enroll`], with [`tokens`] and the revocation list of [`revoke`]), and the control
//! channel that hosts the tracker ([`control`]).
//!
//! Several coordinators of one cluster share nothing but the CA directory (copied to each,
//! with the token file and the revocation list): tracker state is soft, sharded by rendezvous
//! hashing on the agents' side, and rebuilt from their announcements.

pub mod ca;
pub mod control;
pub mod enroll;
pub mod revoke;
pub mod tokens;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use shoal_agent::cluster::tls::{self as ctls, CertSlot, NodeClientVerifier, Trust};
use shoal_proto::msg::NodeId;
use shoal_proto::tracker::{Tracker, TrackerConfig};
use shoal_proto::wire::ALPN_CTL;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use self::ca::{CaError, ClusterCa};
use self::enroll::Enroller;
use self::revoke::{Revocations, RevokeError};
use crate::metrics::Metrics;

/// The revocation list's file name in the data directory.
pub const REVOKED_FILE: &str = "revoked";
/// Idle timeout of control sessions on the coordinator's side (agents send keep-alives).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// `[cluster]`, checked.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// This coordinator's name: the identity in its control certificate, and the name agents
    /// list it under (rendezvous hashing uses it, so it must be the same everywhere).
    pub name: NodeId,
    /// UDP address of the control channel.
    pub listen: std::net::SocketAddr,
    /// Holds `ca.crt` and `ca.key` (created at first start) and, by default, `revoked`.
    pub data_dir: PathBuf,
    /// Bootstrap tokens, one per line.
    pub tokens_file: PathBuf,
    pub revoked_file: PathBuf,
    /// Lifetime of node certificates (default 24 h).
    pub cert_lifetime: Duration,
    pub tracker: TrackerConfig,
}

/// Why the cluster part could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterStartError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Revoke(#[from] RevokeError),
    #[error(transparent)]
    Tokens(#[from] tokens::TokenFileError),
    #[error("control channel TLS: {0}")]
    Tls(String),
    #[error("control channel socket: {0}")]
    Socket(std::io::Error),
}

/// The running cluster part.
#[derive(Debug)]
pub struct ClusterHandle {
    /// For the front door's enrollment path.
    pub enroller: Arc<Enroller>,
    pub local_addr: Option<std::net::SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl ClusterHandle {
    /// Waits for the control server and the tracker to stop (after shutdown).
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Loads (or creates) the CA, starts the control channel on `socket` and the tracker task.
/// Everything stops when `shutdown` resolves.
pub fn start(
    settings: &ClusterSettings,
    socket: std::net::UdpSocket,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ClusterHandle, ClusterStartError> {
    let ca = Arc::new(ClusterCa::load_or_create(&settings.data_dir)?);
    // Fail at start, not at the first enrollment, when the token file is unusable.
    tokens::check(
        &settings.tokens_file,
        &shoal_proto::enroll::BootstrapToken::new("startup-check-not-a-token")
            .map_err(|e| ClusterStartError::Tls(e.to_string()))?,
    )?;
    let revocations = Arc::new(Revocations::load(settings.revoked_file.clone())?);

    let provider = ctls::provider();
    let trust = Arc::new(
        Trust::new(provider, ca.cert_der().clone())
            .map_err(|e| ClusterStartError::Tls(e.to_string()))?,
    );
    let slot = Arc::new(CertSlot::default());
    let (key, _) = ca
        .issue_coordinator(&settings.name)
        .map_err(|e| ClusterStartError::Tls(e.to_string()))?;
    slot.set(key);
    let verifier = Arc::new(NodeClientVerifier::new(trust.clone(), revocations.clone()));
    let tls = ctls::server_config(&trust, verifier, slot.clone(), ALPN_CTL)
        .map_err(|e| ClusterStartError::Tls(e.to_string()))?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| ClusterStartError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    server.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(ClusterStartError::Socket)?;
    let local_addr = control::describe(&endpoint);
    info!(
        name = %settings.name,
        listen = ?local_addr,
        ca = %settings.data_dir.display(),
        cert_lifetime = ?settings.cert_lifetime,
        "cluster control channel listening"
    );

    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let shutdown_task = tokio::spawn(async move {
        shutdown.await;
        c.cancel();
    });
    let (cmds_tx, cmds_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(control::Shared {
        ca: ca.clone(),
        revocations: revocations.clone(),
        cert_lifetime: settings.cert_lifetime,
        metrics: metrics.clone(),
        cmds: cmds_tx,
    });
    let enroller = Arc::new(Enroller::new(
        ca.clone(),
        settings.tokens_file.clone(),
        revocations.clone(),
        settings.cert_lifetime,
        metrics.clone(),
    ));
    let tasks = vec![
        shutdown_task,
        tokio::spawn(control::run_tracker(
            Tracker::new(settings.tracker.clone()),
            cmds_rx,
            revocations,
            metrics,
            cancel.clone(),
        )),
        tokio::spawn(control::serve(endpoint, shared, cancel.clone())),
        tokio::spawn(ca.keep_coordinator_cert(settings.name.clone(), slot, cancel)),
    ];
    Ok(ClusterHandle {
        enroller,
        local_addr,
        tasks,
    })
}
