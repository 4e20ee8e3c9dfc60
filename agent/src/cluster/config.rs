//! The agent's `[cluster]` settings, typed and checked (the TOML side is in
//! [`crate::config`]).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use shoal_proto::enroll::BootstrapToken;
use shoal_proto::msg::{NodeId, Zone};

/// One coordinator of the cluster, as every agent lists it (the same names everywhere: they
/// decide which coordinator owns which digest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoordinatorAddr {
    /// The coordinator's name: its `[cluster] name`, the identity in its control certificate.
    pub name: NodeId,
    /// `https://host[:port]` of its front door, where agents enroll.
    pub enroll_url: String,
    /// `host:port` (UDP) of its control channel; resolved at each connection attempt.
    pub ctl_addr: String,
}

/// How the agent authenticates the coordinator's HTTPS front door when it enrolls.
#[derive(Clone, PartialEq, Eq)]
pub enum FrontDoorTrust {
    /// CA certificates (PEM) that the front door's certificate must chain to, e.g. the
    /// `ca.crt` of `shoal-coordinator cert init`.
    CaFile(PathBuf),
    /// SHA-256 of the SubjectPublicKeyInfo of a CA certificate in the chain the front door
    /// presents (like kubeadm's discovery hash); the chain must verify up to that certificate
    /// and name the host of `enroll_url`. `shoal-coordinator cluster pin` prints it.
    Pin([u8; 32]),
    /// The system's trust store (a front door with a publicly trusted certificate).
    System,
}

impl fmt::Debug for FrontDoorTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrontDoorTrust::CaFile(p) => write!(f, "CaFile({})", p.display()),
            FrontDoorTrust::Pin(h) => write!(f, "Pin(sha256:{})", hex::encode(h)),
            FrontDoorTrust::System => f.write_str("System"),
        }
    }
}

impl FrontDoorTrust {
    /// Parses `sha256:<64 hex digits>`.
    pub fn parse_pin(s: &str) -> Result<FrontDoorTrust, String> {
        let hex_part = s
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("ca_pin {s:?} must look like sha256:<64 hex digits>"))?;
        let mut pin = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut pin)
            .map_err(|_| format!("ca_pin {s:?} must look like sha256:<64 hex digits>"))?;
        Ok(FrontDoorTrust::Pin(pin))
    }
}

/// Timers of the control plane; the defaults suit a LAN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterTimers {
    /// The longest a `locate` takes before giving up with `Unavailable` (the data plane then
    /// falls back to the origin).
    pub locate_timeout: Duration,
    /// The longest one control connection attempt (QUIC handshake and `Hello`) takes.
    pub connect_timeout: Duration,
    /// A control connection silent for this long is dead (QUIC keep-alives run at a third).
    pub idle_timeout: Duration,
    /// Reconnection backoff: first delay and cap (doubling, with jitter).
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// How long `Cluster::start` waits for a first enrollment when no valid certificate is
    /// stored; enrollment goes on in the background after that.
    pub enroll_wait: Duration,
}

impl Default for ClusterTimers {
    fn default() -> Self {
        ClusterTimers {
            locate_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(6),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            enroll_wait: Duration::from_secs(10),
        }
    }
}

/// Everything [`Cluster::start`](super::Cluster::start) needs.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// This node's name (default: the host name); what its certificate is bound to.
    pub node: NodeId,
    pub zone: Zone,
    /// UDP address the peer endpoint (`shoal-peer/1`) listens on.
    pub peer_listen: std::net::SocketAddr,
    /// Where peers reach this node: `peer_listen` unless that is a wildcard address. Its IP
    /// goes into the certificate and the coordinator holds the node to it.
    pub advertise: std::net::SocketAddr,
    /// At least one; the same list, with the same names, on every agent.
    pub coordinators: Vec<CoordinatorAddr>,
    /// Needed only to enroll (no valid certificate stored, or it expired unrenewed).
    pub bootstrap_token: Option<BootstrapToken>,
    pub front_door: FrontDoorTrust,
    /// Where the node's key, certificate and the cluster CA are kept (mode 0700).
    pub state_dir: PathBuf,
    pub timers: ClusterTimers,
}
