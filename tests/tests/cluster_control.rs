//! The control plane in process: coordinators (front door from the harness plus the cluster
//! part on a UDP port of 127.0.0.1) and agents' `Cluster`s on 127.0.0.2, .3, .4: enrollment,
//! Hello/Announce/Locate, one origin slot, renewal (a new control session with the renewed
//! certificate), sessions and peer connections that end with the certificate they were opened
//! with, refusal of foreign, missing and revoked (by node or by serial) certificates and of
//! wrong ALPNs on the control and peer channels, bad tokens, and two coordinators sharing the
//! digests and failing over.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use shoal_agent::cluster::tls::{self, CertSlot, ClusterServerVerifier, Expect, RefuseNone, Trust};
use shoal_agent::cluster::{
    Cluster, ClusterConfig, ClusterError, ClusterTimers, CoordinatorAddr, FrontDoorTrust,
};
use shoal_agent::metrics::Metrics;
use shoal_agent::peer::{Peer, PeerConfig, Shaping};
use shoal_agent::store::{Store, StoreConfig};
use shoal_proto::Digest;
use shoal_proto::enroll::{BootstrapToken, EnrollErrorCode};
use shoal_proto::msg::{
    AgentMsg, Announce, CoordMsg, Hello, NodeId, PROTOCOL_VERSION, PeerMsg, RejectReason, Zone,
};
use shoal_proto::tracker::owner_coordinator;
use shoal_proto::wire::{self, ALPN_CTL, ALPN_PEER, Decoder};
use shoal_tests::coordinator::{CoordinatorOptions, TestCoordinator};
use shoal_tests::{free_port, poll_until, wait_until};
use tempfile::TempDir;
use tokio::sync::oneshot;

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(15);
const TOKEN: &str = "test-bootstrap-token-0123456789";

async fn within(test: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .context("test timed out")?
}

fn q(p: &Path) -> String {
    serde_json::to_string(&p.to_string_lossy()).expect("a str serialises")
}

/// A cluster's shared files: the CA directory, the token file.
struct Shared {
    dir: TempDir,
}

impl Shared {
    fn new() -> Result<Shared> {
        let dir = tempfile::Builder::new()
            .prefix("shoal-cluster-")
            .tempdir()?;
        std::fs::write(
            dir.path().join("tokens"),
            format!("# test tokens\n{TOKEN}\n"),
        )?;
        Ok(Shared { dir })
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    fn revoked(&self) -> PathBuf {
        self.data_dir().join("revoked")
    }

    async fn coordinator(&self, name: &str, lifetime: &str) -> Result<TestCoordinator> {
        let mut opts = CoordinatorOptions::new(&[format!("http://127.0.0.1:{}", free_port()?)]);
        opts.cluster_toml = Some(format!(
            "name = \"{name}\"\ndata_dir = {}\nbootstrap_tokens_file = {}\ncert_lifetime = \"{lifetime}\"\nnode_ttl = \"30s\"",
            q(&self.data_dir()),
            q(&self.dir.path().join("tokens")),
        ));
        TestCoordinator::start(opts).await
    }
}

/// An agent's control plane, stopped on drop.
/// Fields drop in order: stop first, remove the state directory last.
struct Node {
    _stop: oneshot::Sender<()>,
    cluster: Cluster,
    /// Held until the node's data plane binds the address ([`start_peer`]).
    peer_socket: Option<std::net::UdpSocket>,
    state: TempDir,
}

impl Node {
    /// The node's certificate and key as stored in its state directory, to present by hand.
    fn stored_identity(&self) -> Result<Arc<rustls::sign::CertifiedKey>> {
        let pem = std::fs::read(self.state.path().join("cluster/identity.pem"))?;
        let chain = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(&pem)?;
        Ok(tls::certified_key(chain, key, &tls::provider())?)
    }
}

/// A node's data plane (its peer endpoint, on the address its certificate names), with an
/// empty store.
struct PeerNode {
    peer: Peer,
    _store: TempDir,
}

impl Drop for PeerNode {
    fn drop(&mut self) {
        let peer = self.peer.clone();
        tokio::spawn(async move { peer.shutdown().await });
    }
}

async fn start_peer(node: &mut Node) -> Result<PeerNode> {
    let dir = tempfile::Builder::new().prefix("shoal-peer-").tempdir()?;
    let cfg = StoreConfig::new(dir.path().join("store"));
    let store = tokio::task::spawn_blocking(move || Store::open(cfg)).await??;
    // Free the address for the endpoint (UDP: nothing lingers).
    drop(node.peer_socket.take());
    let peer = Peer::start(
        Arc::new(node.cluster.clone()),
        PeerConfig::default(),
        Shaping::unlimited(),
        store,
        Metrics::new(),
    )?;
    Ok(PeerNode { peer, _store: dir })
}

/// Opens a peer connection to `addr` presenting `client` and asks for a piece of a blob the
/// other side does not have: `Ok` with the connection once it answered (`Reject`).
async fn peer_request(
    client: quinn::ClientConfig,
    from_ip: &str,
    addr: SocketAddr,
    server_name: &str,
) -> Result<(quinn::Connection, quinn::Endpoint)> {
    let ep = client_endpoint(from_ip)?;
    let attempt = async {
        let conn = ep.connect_with(client, addr, server_name)?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let request = PeerMsg::Request {
            digest: digest(99),
            piece: 0,
        };
        send.write_all(&wire::encode(&request)?).await?;
        send.finish()?;
        let mut dec = Decoder::<PeerMsg>::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = recv.read(&mut buf).await?.context("stream ended")?;
            let mut input = &buf[..n];
            if let Some(m) = dec.decode(&mut input)? {
                ensure!(
                    matches!(
                        m,
                        PeerMsg::Reject {
                            reason: RejectReason::UnknownBlob,
                            ..
                        }
                    ),
                    "unexpected answer {m:?}"
                );
                return Ok::<_, anyhow::Error>(conn);
            }
        }
    };
    let conn = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .context("peer request hung")??;
    Ok((conn, ep))
}

impl std::ops::Deref for Node {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

fn node_config(
    name: &str,
    coordinators: &[(&str, &TestCoordinator)],
    token: &str,
    state: &Path,
    peer: SocketAddr,
) -> Result<ClusterConfig> {
    // One bundle with every front door's CA (each test coordinator made its own).
    let bundle = state.join("front-door-ca.pem");
    let mut pem = Vec::new();
    for (_, c) in coordinators {
        pem.extend_from_slice(c.ca_pem());
    }
    std::fs::write(&bundle, pem)?;
    Ok(ClusterConfig {
        node: NodeId::new(name)?,
        zone: Zone::new("dc1/row1")?,
        peer_listen: peer,
        advertise: peer,
        coordinators: coordinators
            .iter()
            .map(|(n, c)| {
                Ok(CoordinatorAddr {
                    name: NodeId::new(n)?,
                    enroll_url: format!("https://127.0.0.1:{}", c.https_addr().port()),
                    ctl_addr: c.cluster_addr().context("no cluster port")?.to_string(),
                })
            })
            .collect::<Result<_>>()?,
        bootstrap_token: Some(BootstrapToken::new(token)?),
        front_door: FrontDoorTrust::CaFile(bundle),
        state_dir: state.join("cluster"),
        timers: ClusterTimers::default(),
    })
}

async fn start_node_with(
    ip: &str,
    name: &str,
    coordinators: &[(&str, &TestCoordinator)],
    token: &str,
) -> Result<std::result::Result<Node, ClusterError>> {
    let state = tempfile::Builder::new().prefix("shoal-node-").tempdir()?;
    // The peer port is only advertised here (the data plane binds it); hold it so nothing
    // else takes it.
    let peer_socket = std::net::UdpSocket::bind(format!("{ip}:0"))?;
    let cfg = node_config(
        name,
        coordinators,
        token,
        state.path(),
        peer_socket.local_addr()?,
    )?;
    let (stop, stopped) = oneshot::channel::<()>();
    Ok(Cluster::start(cfg, async move {
        let _ = stopped.await;
    })
    .await
    .map(|cluster| Node {
        cluster,
        peer_socket: Some(peer_socket),
        state,
        _stop: stop,
    }))
}

async fn start_node(
    ip: &str,
    name: &str,
    coordinators: &[(&str, &TestCoordinator)],
) -> Result<Node> {
    let node = start_node_with(ip, name, coordinators, TOKEN)
        .await?
        .with_context(|| format!("starting node {name}"))?;
    wait_until(
        WAIT,
        &format!("{name} is connected to every coordinator"),
        || {
            let n = node.connected_coordinators().len();
            async move { n == coordinators.len() }
        },
    )
    .await?;
    Ok(node)
}

fn digest(i: u32) -> Digest {
    Digest::sha256_of(format!("blob {i}").as_bytes())
}

fn id(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

/// A quinn endpoint on `ip` with `client` as its default client configuration.
fn client_endpoint(ip: &str) -> Result<quinn::Endpoint> {
    Ok(quinn::Endpoint::client(format!("{ip}:0").parse()?)?)
}

/// Opens a control session by hand: handshake, Hello, first answer. `Err` when anything
/// along the way is refused.
async fn ctl_attempt(
    client: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
    hello: Hello,
) -> Result<CoordMsg> {
    let ep = client_endpoint("127.0.0.5")?;
    let attempt = async {
        let conn = ep.connect_with(client, addr, server_name)?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&wire::encode(&AgentMsg::Hello(hello))?)
            .await?;
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
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .context("control attempt hung")?
}

fn hello(name: &str, peer: SocketAddr) -> Hello {
    Hello {
        node: id(name),
        zone: Zone::default(),
        version: PROTOCOL_VERSION,
        peer_addr: peer,
    }
}

fn quic_client(cfg: rustls::ClientConfig) -> Result<quinn::ClientConfig> {
    Ok(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(cfg)?,
    )))
}

/// A node certificate for `name` (with the right identity URI and address) from a CA that is
/// not the cluster's.
fn foreign_identity(name: &str, ip: &str) -> Result<Arc<rustls::sign::CertifiedKey>> {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![name.to_owned()])?;
    params.subject_alt_names.push(SanType::URI(
        shoal_proto::enroll::node_uri(&id(name)).try_into()?,
    ));
    params
        .subject_alt_names
        .push(SanType::IpAddress(ip.parse()?));
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &issuer)?;
    let chain = vec![cert.der().clone(), ca.der().clone()];
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())?;
    Ok(tls::certified_key(chain, key, &tls::provider())?)
}

/// A client configuration that trusts the real cluster CA for the server (so only the
/// server's verdict on the client matters) and presents `identity` (or nothing).
fn client_presenting(
    cluster_ca: &[u8],
    expect: Expect,
    identity: Option<Arc<rustls::sign::CertifiedKey>>,
    alpn: &[u8],
) -> Result<quinn::ClientConfig> {
    let trust = Arc::new(Trust::new(
        tls::provider(),
        CertificateDer::from(cluster_ca.to_vec()),
    )?);
    let slot = Arc::new(CertSlot::default());
    if let Some(k) = identity {
        slot.set(k);
    }
    let verifier = Arc::new(ClusterServerVerifier::new(
        trust.clone(),
        expect,
        Arc::new(RefuseNone),
    ));
    quic_client(tls::client_config(&trust, verifier, slot, alpn)?)
}

/// As [`client_presenting`], offering exactly `alpns` (none, or names the server does not
/// speak).
fn client_offering(
    cluster_ca: &[u8],
    expect: Expect,
    identity: Arc<rustls::sign::CertifiedKey>,
    alpns: &[&[u8]],
) -> Result<quinn::ClientConfig> {
    let trust = Arc::new(Trust::new(
        tls::provider(),
        CertificateDer::from(cluster_ca.to_vec()),
    )?);
    let slot = Arc::new(CertSlot::default());
    slot.set(identity);
    let verifier = Arc::new(ClusterServerVerifier::new(
        trust.clone(),
        expect,
        Arc::new(RefuseNone),
    ));
    let mut cfg = tls::client_config(&trust, verifier, slot, b"unused")?;
    cfg.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    quic_client(cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_announce_locate_and_one_origin_slot() -> Result<()> {
    within(async {
        let shared = Shared::new()?;
        let coord = shared.coordinator("coord-a", "1h").await?;
        let coords = [("coord-a", &coord)];
        let a = start_node("127.0.0.2", "node-a", &coords).await?;
        let b = start_node("127.0.0.3", "node-b", &coords).await?;
        let c = start_node("127.0.0.4", "node-c", &coords).await?;
        // The CA was created in the data directory, its key private.
        let key_mode = std::fs::metadata(shared.data_dir().join("ca.key"))?;
        use std::os::unix::fs::PermissionsExt as _;
        ensure!(key_mode.permissions().mode() & 0o777 == 0o600);
        ensure!(a.ca_certificate() == b.ca_certificate() && a.ca_certificate().is_some());

        // Everyone wants blob 1 from the origin at once: exactly one gets the slot.
        let d = digest(1);
        let mut subs = [a.subscribe(&d), b.subscribe(&d), c.subscribe(&d)];
        let (ra, rb, rc) = tokio::join!(a.locate(&d, true), b.locate(&d, true), c.locate(&d, true));
        let replies = [ra?, rb?, rc?];
        let slots = replies.iter().filter(|r| r.origin).count();
        ensure!(slots == 1, "{slots} origin slots granted: {replies:?}");
        // The seeder gives the slot back: one of the others is granted it, by message.
        let seeder = replies.iter().position(|r| r.origin).unwrap_or_default();
        let nodes = [&a, &b, &c];
        nodes[seeder].send(&d, AgentMsg::ReleaseOrigin { digest: d.clone() });
        let mut granted = Vec::new();
        for (i, sub) in subs.iter_mut().enumerate() {
            if i == seeder {
                continue;
            }
            if let Ok(Some(CoordMsg::OriginSlot {
                granted: true,
                digest,
                ..
            })) = tokio::time::timeout(Duration::from_secs(3), sub.recv()).await
            {
                ensure!(digest == d);
                granted.push(i);
            }
        }
        ensure!(granted.len() == 1, "slot passed to {granted:?}");
        // A later locate by a suggests the two others (interested downloaders) as peers.
        let again = a.locate(&d, false).await?;
        let mut peers: Vec<String> = again.peers.iter().map(|p| p.node.to_string()).collect();
        peers.sort();
        ensure!(peers == ["node-b", "node-c"], "peers {peers:?}");
        ensure!(
            again
                .peers
                .iter()
                .all(|p| p.addr.ip().to_string().starts_with("127.0.0.")),
            "{again:?}"
        );

        // Announce: c read blob 2 from the origin (with the slot), published its manifest and
        // holds it; a finds it there.
        let d2 = digest(2);
        ensure!(c.locate(&d2, true).await?.origin, "c gets blob 2's slot");
        let mut hasher = shoal_proto::manifest::PieceHasher::new(
            b"blob 2".len() as u64,
            shoal_proto::Algorithm::Sha256,
        )?;
        hasher.update(b"blob 2")?;
        c.send(&d2, AgentMsg::PublishManifest(hasher.finish(&d2)?));
        c.send(
            &d2,
            AgentMsg::Announce(Announce {
                complete: vec![d2.clone()],
                partial: vec![],
            }),
        );
        poll_until(WAIT, "a finds node-c holding blob 2", || async {
            let r = a.locate(&d2, false).await.ok()?;
            r.peers.iter().any(|p| p.node == id("node-c")).then_some(r)
        })
        .await?;
        let reply = b.locate(&d2, true).await?;
        ensure!(!reply.origin, "a complete copy exists: no origin slot");
        ensure!(reply.peers.iter().any(|p| p.node == id("node-c")));

        // Metrics.
        let m = |name: &'static str| coord.metric_sum(name, &[]);
        ensure!(m("shoal_coordinator_cluster_nodes_connected").await? == 3.0);
        ensure!(m("shoal_coordinator_cluster_origin_slots_granted_total").await? == 3.0);
        ensure!(m("shoal_coordinator_cluster_locates_total").await? >= 5.0);
        ensure!(
            coord
                .metric_sum(
                    "shoal_coordinator_cluster_enrollments_total",
                    &["result=\"issued\""]
                )
                .await?
                == 3.0
        );

        // The peer channel with the configurations the data plane gets: b connects to a by
        // name; both sides learn who the other is; the wrong name is refused.
        let server = quinn::Endpoint::server(a.peer_server_config(), "127.0.0.2:0".parse()?)?;
        let server_addr = server.local_addr()?;
        // Accept whatever comes (the client decides on the name).
        let accept = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Some(incoming) = server.accept().await {
                conns.push(incoming.await);
            }
        });
        let ep = client_endpoint("127.0.0.3")?;
        let conn = ep
            .connect_with(b.peer_client_config(), server_addr, "node-a")?
            .await?;
        ensure!(Cluster::peer_identity(&conn) == Some(id("node-a")));
        let wrong = ep
            .connect_with(b.peer_client_config(), server_addr, "node-c")?
            .await;
        ensure!(wrong.is_err(), "a certificate of node-a accepted as node-c");
        accept.abort();
        // The server side learns the client's name.
        let server2 = quinn::Endpoint::server(a.peer_server_config(), "127.0.0.2:0".parse()?)?;
        let addr2 = server2.local_addr()?;
        let accept2 = tokio::spawn(async move {
            let conn = server2.accept().await.context("endpoint closed")?.await?;
            Ok::<_, anyhow::Error>((Cluster::peer_identity(&conn), server2))
        });
        let _conn2 = ep
            .connect_with(b.peer_client_config(), addr2, "node-a")?
            .await?;
        let (who, _server2) = tokio::time::timeout(WAIT, accept2).await???;
        ensure!(who == Some(id("node-b")), "server saw {who:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_replaces_the_certificate_before_expiry() -> Result<()> {
    within(async {
        let shared = Shared::new()?;
        let coord = shared.coordinator("coord-a", "6s").await?;
        let coords = [("coord-a", &coord)];
        let a = start_node("127.0.0.2", "node-a", &coords).await?;
        let (serial, not_after) = a.certificate().context("no certificate")?;
        let first = a.control_sessions();
        ensure!(
            first.len() == 1 && first[0].serial == serial,
            "sessions {first:?}, certificate {serial}"
        );
        let renewed = poll_until(WAIT, "the certificate is renewed", || async {
            a.certificate().filter(|(s, _)| *s != serial)
        })
        .await?;
        ensure!(
            SystemTime::now() < not_after,
            "renewed only after the old certificate expired"
        );
        ensure!(renewed.1 > not_after);
        // A new control session (a new handshake, presenting the renewed certificate, answered
        // with Welcome) replaces the one opened with the old certificate before that expires.
        let second = poll_until(
            WAIT,
            "a control session with the renewed certificate",
            || {
                let s = a.control_sessions();
                let want = renewed.0.clone();
                async move { s.into_iter().find(|s| s.serial == want) }
            },
        )
        .await?;
        ensure!(second.id != first[0].id, "the same session: {second:?}");
        ensure!(
            SystemTime::now() < not_after,
            "the control session moved only after the old certificate expired"
        );
        // Past the first certificate's end (the coordinator closes sessions whose certificate
        // expired: `a_control_session_ends_when_its_certificate_expires`), the control channel
        // works, over sessions opened with a later certificate.
        wait_until(WAIT, "the first certificate expired", || async {
            SystemTime::now() > not_after
        })
        .await?;
        let r = poll_until(
            WAIT,
            "locate works after the first certificate expired",
            || async { a.locate(&digest(7), false).await.ok() },
        )
        .await?;
        ensure!(r.digest == digest(7));
        let now = a.control_sessions();
        ensure!(
            !now.is_empty() && now.iter().all(|s| s.serial != serial),
            "sessions after expiry: {now:?}"
        );
        // Renewed over the control channel, not by enrolling again.
        ensure!(
            coord
                .metric_sum(
                    "shoal_coordinator_cluster_renewals_total",
                    &["result=\"issued\""]
                )
                .await?
                >= 1.0
        );
        ensure!(
            coord
                .metric_sum("shoal_coordinator_cluster_enrollments_total", &[])
                .await?
                == 1.0
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_session_ends_when_its_certificate_expires() -> Result<()> {
    within(async {
        let shared = Shared::new()?;
        let coord = shared.coordinator("coord-a", "4s").await?;
        let coords = [("coord-a", &coord)];
        let ctl = coord.cluster_addr().context("no cluster port")?;
        // Enroll a node, keep its certificate, stop it: this certificate is never renewed.
        let c = start_node("127.0.0.4", "node-c", &coords).await?;
        let identity = c.stored_identity()?;
        let ca = c.ca_certificate().context("no cluster CA")?;
        let advertise = c.advertise();
        drop(c);
        let info = tls::cert_info(&identity.cert[0])?;
        ensure!(SystemTime::now() < info.not_after, "expired already");

        let cfg = client_presenting(&ca, Expect::Coordinator, Some(identity.clone()), ALPN_CTL)?;
        let ep = client_endpoint("127.0.0.4")?;
        let conn = ep.connect_with(cfg, ctl, "coord-a")?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&wire::encode(&AgentMsg::Hello(hello("node-c", advertise)))?)
            .await?;
        // Read until the coordinator ends the session.
        let session = async {
            let mut dec = Decoder::<CoordMsg>::new();
            let mut buf = [0u8; 4096];
            let mut got = Vec::new();
            loop {
                match recv.read(&mut buf).await {
                    Ok(Some(n)) => {
                        let mut input = &buf[..n];
                        while let Some(m) = dec.decode(&mut input)? {
                            got.push(m);
                        }
                    }
                    Ok(None) | Err(_) => return Ok::<_, anyhow::Error>(got),
                }
            }
        };
        let got = tokio::time::timeout(WAIT, session)
            .await
            .context("the session outlived its certificate")??;
        let ended = SystemTime::now();
        ensure!(
            matches!(got.first(), Some(CoordMsg::Welcome { .. })),
            "the session was not accepted: {got:?}"
        );
        ensure!(
            got.iter().any(
                |m| matches!(m, CoordMsg::Refused { reason } if reason.contains("expired"))
            ),
            "no refusal naming expiry: {got:?}"
        );
        ensure!(
            ended >= info.not_after,
            "closed {:?} before the certificate's end",
            info.not_after.duration_since(ended).unwrap_or_default()
        );
        let closed = tokio::time::timeout(WAIT, conn.closed()).await?;
        ensure!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.reason.as_ref() == b"certificate expired"),
            "{closed:?}"
        );
        // And it cannot come back with that certificate.
        let cfg = client_presenting(&ca, Expect::Coordinator, Some(identity), ALPN_CTL)?;
        let r = ctl_attempt(cfg, ctl, "coord-a", hello("node-c", advertise)).await;
        ensure!(r.is_err(), "an expired certificate got a session: {r:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_connections_end_with_the_peer_certificate_and_resume_with_the_renewed_one()
-> Result<()> {
    within(async {
        let shared = Shared::new()?;
        let coord = shared.coordinator("coord-a", "6s").await?;
        let coords = [("coord-a", &coord)];
        let mut a = start_node("127.0.0.2", "node-a", &coords).await?;
        let b = start_node("127.0.0.3", "node-b", &coords).await?;
        let a_peer = start_peer(&mut a).await?;
        let addr = a_peer.peer.local_addr();
        let (serial, not_after) = b.certificate().context("no certificate")?;
        let (conn, _ep) = peer_request(b.peer_client_config(), "127.0.0.3", addr, "node-a").await?;
        // a closes the connection when b's certificate (the one b presented) expires.
        let closed = tokio::time::timeout(WAIT, conn.closed())
            .await
            .context("the peer connection outlived the certificate")?;
        let ended = SystemTime::now();
        ensure!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.reason.as_ref() == b"certificate expired"),
            "{closed:?}"
        );
        ensure!(ended >= not_after, "closed before the certificate's end");
        // b renewed meanwhile; a new connection presents the new certificate and works.
        let (renewed, _) = b.certificate().context("no certificate")?;
        ensure!(renewed != serial, "b did not renew");
        let (conn, _ep) = peer_request(b.peer_client_config(), "127.0.0.3", addr, "node-a").await?;
        ensure!(conn.close_reason().is_none());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_by_serial_is_refused_between_peers() -> Result<()> {
    within(async {
        let shared = Shared::new()?;
        let coord = shared.coordinator("coord-a", "1h").await?;
        let coords = [("coord-a", &coord)];
        let mut a = start_node("127.0.0.2", "node-a", &coords).await?;
        let b = start_node("127.0.0.3", "node-b", &coords).await?;
        let a_peer = start_peer(&mut a).await?;
        let addr = a_peer.peer.local_addr();
        let (serial, _) = b.certificate().context("no certificate")?;
        // b can ask a for pieces.
        let (conn, _ep) = peer_request(b.peer_client_config(), "127.0.0.3", addr, "node-a").await?;

        // Revoke that one certificate of b (not the node).
        ensure!(shoal_coordinator::cluster::revoke::edit(
            &shared.revoked(),
            None,
            Some(&serial),
            true,
        )?);
        // a closes the open connection as soon as the list arrives...
        let closed = tokio::time::timeout(WAIT, conn.closed())
            .await
            .context("the connection of a revoked certificate stayed open")?;
        ensure!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.reason.as_ref() == b"refused"),
            "{closed:?}"
        );
        ensure!(a.is_refused_certificate(&id("node-b"), &serial));
        ensure!(
            !a.is_refused(&id("node-b")),
            "the node itself is not revoked (a new certificate would do)"
        );
        // ... and refuses new handshakes with it.
        let again = peer_request(b.peer_client_config(), "127.0.0.3", addr, "node-a").await;
        ensure!(again.is_err(), "a accepted a revoked certificate again");
        ensure!(a_peer.peer.connected_peers().is_empty());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_alpn_is_refused_on_both_channels() -> Result<()> {
    within(async {
        let shared = Shared::new()?;
        let coord = shared.coordinator("coord-a", "1h").await?;
        let coords = [("coord-a", &coord)];
        let ctl = coord.cluster_addr().context("no cluster port")?;
        let a = start_node("127.0.0.2", "node-a", &coords).await?;
        let ca = a.ca_certificate().context("no cluster CA")?;
        // A valid cluster certificate, so that only the ALPN is wrong.
        let identity = a.stored_identity()?;
        let wrong: [&[&[u8]]; 3] = [&[], &[b"shoal-ctl/2"], &[b"h3"]];

        for alpns in wrong.iter().copied().chain([&[ALPN_PEER][..]]) {
            let cfg = client_offering(&ca, Expect::Coordinator, identity.clone(), alpns)?;
            let r = ctl_attempt(cfg, ctl, "coord-a", hello("node-a", a.advertise())).await;
            ensure!(r.is_err(), "control channel with ALPN {alpns:?}: {r:?}");
        }
        let cfg = client_offering(&ca, Expect::Coordinator, identity.clone(), &[ALPN_CTL])?;
        let r = ctl_attempt(cfg, ctl, "coord-a", hello("node-a", a.advertise())).await?;
        ensure!(matches!(r, CoordMsg::Welcome { .. }), "{r:?}");

        let server = quinn::Endpoint::server(a.peer_server_config(), "127.0.0.2:0".parse()?)?;
        let addr = server.local_addr()?;
        let ep = client_endpoint("127.0.0.2")?;
        // Whether the agent's peer endpoint accepted a handshake offering `alpns`, and what
        // the dialling side saw.
        let attempt = |alpns: &[&[u8]]| {
            let cfg = client_offering(&ca, Expect::Node, identity.clone(), alpns);
            let (server, ep) = (&server, &ep);
            async move {
                let accept = async {
                    match server.accept().await {
                        Some(i) => i.await.is_ok(),
                        None => false,
                    }
                };
                let connect = async {
                    ep.connect_with(cfg?, addr, "node-a")?
                        .await
                        .map_err(anyhow::Error::from)
                };
                anyhow::Ok(
                    tokio::time::timeout(WAIT, async { tokio::join!(accept, connect) }).await?,
                )
            }
        };
        for alpns in wrong.iter().copied().chain([&[ALPN_CTL][..]]) {
            let (accepted, connected) = attempt(alpns).await?;
            ensure!(
                !accepted && connected.is_err(),
                "peer channel with ALPN {alpns:?}: accepted {accepted}, {connected:?}"
            );
        }
        let (accepted, connected) = attempt(&[ALPN_PEER]).await?;
        ensure!(
            accepted && connected.is_ok(),
            "the right ALPN: {connected:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_missing_and_revoked_certificates_are_refused() -> Result<()> {
    within(async {
        let shared = Shared::new()?;
        let coord = shared.coordinator("coord-a", "1h").await?;
        let coords = [("coord-a", &coord)];
        let ctl = coord.cluster_addr().context("no cluster port")?;
        let a = start_node("127.0.0.2", "node-a", &coords).await?;
        let b = start_node("127.0.0.3", "node-b", &coords).await?;
        let ca = a.ca_certificate().context("no cluster CA")?;
        let peer: SocketAddr = "127.0.0.5:7000".parse()?;

        // Control channel: a certificate from another CA, or none, gets no session.
        let foreign = foreign_identity("node-x", "127.0.0.5")?;
        for (what, identity) in [
            ("foreign CA", Some(foreign.clone())),
            ("no certificate", None),
        ] {
            let cfg = client_presenting(&ca, Expect::Coordinator, identity, ALPN_CTL)?;
            let r = ctl_attempt(cfg, ctl, "coord-a", hello("node-x", peer)).await;
            ensure!(r.is_err(), "{what}: the control channel answered {r:?}");
        }
        // A client that does not trust the cluster CA refuses the coordinator too.
        let mut other_ca = Vec::new();
        let fk = foreign_identity("node-y", "127.0.0.5")?;
        other_ca.extend_from_slice(fk.cert[1].as_ref());
        let cfg = client_presenting(&other_ca, Expect::Coordinator, Some(fk), ALPN_CTL)?;
        ensure!(
            ctl_attempt(cfg, ctl, "coord-a", hello("node-y", peer))
                .await
                .is_err()
        );

        // Peer channel: a's peer server refuses a foreign certificate and no certificate.
        let server = quinn::Endpoint::server(a.peer_server_config(), "127.0.0.2:0".parse()?)?;
        let server_addr = server.local_addr()?;
        let accepting = tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for _ in 0..2 {
                let Some(incoming) = server.accept().await else {
                    break;
                };
                outcomes.push(incoming.await.is_ok());
            }
            outcomes
        });
        for identity in [Some(foreign.clone()), None] {
            let cfg = client_presenting(&ca, Expect::Node, identity, ALPN_PEER)?;
            let ep = client_endpoint("127.0.0.5")?;
            let attempt = async {
                let conn = ep.connect_with(cfg, server_addr, "node-a")?.await?;
                let (mut s, mut r) = conn.open_bi().await?;
                s.write_all(b"x").await?;
                let mut buf = [0u8; 1];
                r.read(&mut buf).await?;
                Ok::<_, anyhow::Error>(())
            };
            let r = tokio::time::timeout(Duration::from_secs(10), attempt).await;
            ensure!(!matches!(r, Ok(Ok(()))), "a peer accepted a bad client");
        }
        let outcomes = tokio::time::timeout(WAIT, accepting).await??;
        ensure!(
            outcomes.iter().all(|ok| !ok),
            "server accepted: {outcomes:?}"
        );

        // Revocation: b's session is closed, b cannot come back, and a is told to refuse b.
        let revoked = shoal_coordinator::cluster::revoke::edit(
            &shared.revoked(),
            Some(&id("node-b")),
            None,
            true,
        )?;
        ensure!(revoked);
        wait_until(WAIT, "a refuses node-b", || async {
            a.is_refused(&id("node-b"))
        })
        .await?;
        wait_until(WAIT, "node-b is disconnected", || async {
            b.connected_coordinators().is_empty()
        })
        .await?;
        ensure!(b.locate(&digest(3), false).await.is_err());
        // ... and stays out: its certificate is refused at the handshake (what its
        // reconnection attempts present).
        let cfg = client_presenting(
            &ca,
            Expect::Coordinator,
            Some(b.stored_identity()?),
            ALPN_CTL,
        )?;
        let r = ctl_attempt(cfg, ctl, "coord-a", hello("node-b", b.advertise())).await;
        ensure!(r.is_err(), "the revoked certificate got a session: {r:?}");
        ensure!(b.connected_coordinators().is_empty());
        // A revoked node may not enroll again either.
        let again = start_node_with("127.0.0.3", "node-b", &coords, TOKEN).await?;
        match again {
            Err(ClusterError::EnrollRefused { code, .. }) => {
                ensure!(code == EnrollErrorCode::Revoked, "{code:?}")
            }
            other => bail!("a revoked node enrolled again: {:?}", other.map(|_| ())),
        }
        // a's peer server now refuses b's (still unexpired) certificate.
        let server = quinn::Endpoint::server(a.peer_server_config(), "127.0.0.2:0".parse()?)?;
        let server_addr = server.local_addr()?;
        let accept = tokio::spawn(async move {
            let r = match server.accept().await {
                Some(i) => i.await.is_ok(),
                None => false,
            };
            (r, server)
        });
        let ep = client_endpoint("127.0.0.3")?;
        let attempt = async {
            let conn = ep
                .connect_with(b.peer_client_config(), server_addr, "node-a")?
                .await?;
            let (mut s, mut r) = conn.open_bi().await?;
            s.write_all(b"x").await?;
            let mut buf = [0u8; 1];
            r.read(&mut buf).await?;
            Ok::<_, anyhow::Error>(())
        };
        let r = tokio::time::timeout(Duration::from_secs(10), attempt).await;
        ensure!(!matches!(r, Ok(Ok(()))), "a revoked peer was accepted");
        let (accepted, _server) = tokio::time::timeout(WAIT, accept).await??;
        ensure!(!accepted, "the peer server accepted a revoked node");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_and_never_logged() -> Result<()> {
    within(async {
        let shared = Shared::new()?;
        let coord = shared.coordinator("coord-a", "1h").await?;
        let coords = [("coord-a", &coord)];
        let wrong = "wrong-token-do-not-log-me-42";
        match start_node_with("127.0.0.2", "node-a", &coords, wrong).await? {
            Err(e @ ClusterError::EnrollRefused { code, .. }) => {
                ensure!(code == EnrollErrorCode::Unauthorized, "{code:?}");
                ensure!(!e.to_string().contains(wrong), "{e}");
            }
            other => bail!("enrolled with a wrong token: {:?}", other.map(|_| ())),
        }
        // By hand: 401 with a JSON error, 400 for garbage, 405 for GET.
        let http = coord.client()?;
        let body = serde_json::json!({
            "token": wrong, "node": "node-z", "zone": "", "addrs": ["127.0.0.9"],
            "csr_pem": "-----BEGIN CERTIFICATE REQUEST-----\nAA==\n-----END CERTIFICATE REQUEST-----",
        });
        let r = http
            .post(coord.url(shoal_proto::enroll::ENROLL_PATH))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        ensure!(r.status() == 401, "{}", r.status());
        let text = r.text().await?;
        ensure!(text.contains("unauthorized") && !text.contains(wrong), "{text}");
        let r = http
            .post(coord.url(shoal_proto::enroll::ENROLL_PATH))
            .body("{not json")
            .send()
            .await?;
        ensure!(r.status() == 400, "{}", r.status());
        let r = http
            .get(coord.url(shoal_proto::enroll::ENROLL_PATH))
            .send()
            .await?;
        ensure!(r.status() == 405, "{}", r.status());
        // The access log names the path, never the token.
        wait_until(WAIT, "the access log has the enrollment lines", || async {
            coord
                .access_log()
                .iter()
                .filter(|l| l.contains("/shoal/v1/enroll"))
                .count()
                >= 3
        })
        .await?;
        let log = coord.access_log().join("\n");
        ensure!(!log.contains(wrong), "token in the access log");
        ensure!(
            coord
                .metric_sum("shoal_coordinator_cluster_enrollments_total", &["result=\"bad_token\""])
                .await?
                >= 2.0
        );
        // The right token still works.
        let a = start_node("127.0.0.2", "node-a", &coords).await?;
        ensure!(a.certificate().is_some());
        Ok(())
    })
    .await
}

async fn locates(c: &TestCoordinator) -> Result<f64> {
    c.metric_sum("shoal_coordinator_cluster_locates_total", &[])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_split_digests_and_fail_over() -> Result<()> {
    within(async {
        let shared = Shared::new()?;
        let coord_a = shared.coordinator("coord-a", "1h").await?;
        // Same data directory: the same CA, created by the first.
        let coord_b = shared.coordinator("coord-b", "1h").await?;
        let names = ["coord-a", "coord-b"];
        let coords = [("coord-a", &coord_a), ("coord-b", &coord_b)];
        let x = start_node("127.0.0.2", "node-x", &coords).await?;
        let y = start_node("127.0.0.3", "node-y", &coords).await?;

        // A digest owned by each coordinator.
        let find = |want: usize| {
            (0..1000)
                .map(digest)
                .find(|d| owner_coordinator(d, &names) == Some(want))
                .context("no digest for that coordinator")
        };
        let (da, db) = (find(0)?, find(1)?);
        let inventory = Announce {
            complete: vec![da.clone(), db.clone()],
            partial: vec![],
        };
        y.set_inventory(Arc::new(move || inventory.clone()));

        let holds = |d: Digest| {
            let x = &x;
            async move {
                x.locate(&d, false)
                    .await
                    .ok()
                    .filter(|r| r.peers.iter().any(|p| p.node == id("node-y")))
            }
        };
        poll_until(WAIT, "x finds y for coord-a's digest", || holds(da.clone())).await?;
        poll_until(WAIT, "x finds y for coord-b's digest", || holds(db.clone())).await?;
        let (la, lb) = (locates(&coord_a).await?, locates(&coord_b).await?);
        ensure!(la >= 1.0 && lb >= 1.0, "locates a={la} b={lb}");
        // Each digest went to its owner only.
        x.locate(&da, false).await?;
        ensure!(locates(&coord_a).await? == la + 1.0);
        ensure!(locates(&coord_b).await? == lb);

        // coord-a goes away: its digests move to coord-b, where y re-announced them.
        let killed = Instant::now();
        coord_a.stop().await?;
        let r = poll_until(WAIT, "x finds y for coord-a's digest at coord-b", || {
            holds(da.clone())
        })
        .await?;
        let took = killed.elapsed();
        ensure!(took < Duration::from_secs(10), "failover took {took:?}");
        ensure!(r.digest == da);
        ensure!(locates(&coord_b).await? > lb);
        ensure!(x.connected_coordinators() == vec![id("coord-b")]);
        // With no coordinator at all, locate fails fast.
        coord_b.stop().await?;
        wait_until(WAIT, "x sees no coordinator", || async {
            x.connected_coordinators().is_empty()
        })
        .await?;
        let t = Instant::now();
        let r = x.locate(&db, true).await;
        ensure!(matches!(r, Err(ClusterError::Unavailable)), "{r:?}");
        ensure!(
            t.elapsed() <= Duration::from_secs(2),
            "took {:?}",
            t.elapsed()
        );
        Ok(())
    })
    .await
}

/// A UDP relay in front of a coordinator's control port that can go silent, like a host that
/// lost power: no close, no reset, just nothing.
struct Blackhole {
    addr: SocketAddr,
    dead: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    async fn start(target: SocketAddr) -> Result<Blackhole> {
        use std::collections::HashMap;
        use std::sync::atomic::Ordering;
        let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let dead = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = dead.clone();
        let task = tokio::spawn(async move {
            let mut backs: HashMap<SocketAddr, Arc<tokio::net::UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                if d.load(Ordering::Relaxed) {
                    continue;
                }
                let back = match backs.get(&from) {
                    Some(b) => b.clone(),
                    None => {
                        let Ok(b) = tokio::net::UdpSocket::bind("127.0.0.1:0").await else {
                            continue;
                        };
                        if b.connect(target).await.is_err() {
                            continue;
                        }
                        let b = Arc::new(b);
                        let (b2, f2, d2) = (b.clone(), front.clone(), d.clone());
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 65536];
                            while let Ok(n) = b2.recv(&mut buf).await {
                                if !d2.load(Ordering::Relaxed) {
                                    let _ = f2.send_to(&buf[..n], from).await;
                                }
                            }
                        });
                        backs.insert(from, b.clone());
                        b
                    }
                };
                let _ = back.send(&buf[..n]).await;
            }
        });
        Ok(Blackhole { addr, dead, task })
    }

    fn kill(&self) {
        self.dead.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_coordinator_is_abandoned_within_seconds() -> Result<()> {
    within(async {
        let shared = Shared::new()?;
        let coord_a = shared.coordinator("coord-a", "1h").await?;
        let coord_b = shared.coordinator("coord-b", "1h").await?;
        let hole = Blackhole::start(coord_a.cluster_addr().context("no cluster port")?).await?;
        let names = ["coord-a", "coord-b"];
        let coords = [("coord-a", &coord_a), ("coord-b", &coord_b)];
        let start = |ip: &'static str, name: &'static str| {
            let hole = hole.addr;
            let coords = &coords;
            async move {
                let state = tempfile::Builder::new().prefix("shoal-node-").tempdir()?;
                let peer_socket = std::net::UdpSocket::bind(format!("{ip}:0"))?;
                let mut cfg =
                    node_config(name, coords, TOKEN, state.path(), peer_socket.local_addr()?)?;
                // coord-a is reached through the relay that will go silent.
                cfg.coordinators[0].ctl_addr = hole.to_string();
                let (stop, stopped) = oneshot::channel::<()>();
                let cluster = Cluster::start(cfg, async move {
                    let _ = stopped.await;
                })
                .await?;
                wait_until(WAIT, "connected to both coordinators", || {
                    let n = cluster.connected_coordinators().len();
                    async move { n == 2 }
                })
                .await?;
                Ok::<_, anyhow::Error>(Node {
                    _stop: stop,
                    cluster,
                    peer_socket: Some(peer_socket),
                    state,
                })
            }
        };
        let x = start("127.0.0.2", "node-x").await?;
        let y = start("127.0.0.3", "node-y").await?;
        let da = (0..1000)
            .map(digest)
            .find(|d| owner_coordinator(d, &names) == Some(0))
            .context("no digest for coord-a")?;
        let inventory = Announce {
            complete: vec![da.clone()],
            partial: vec![],
        };
        y.set_inventory(Arc::new(move || inventory.clone()));
        let holds = || {
            let (x, da) = (&x, da.clone());
            async move {
                x.locate(&da, false)
                    .await
                    .ok()
                    .filter(|r| r.peers.iter().any(|p| p.node == id("node-y")))
            }
        };
        poll_until(WAIT, "x finds y through coord-a", holds).await?;

        hole.kill();
        let killed = Instant::now();
        // Meanwhile every locate still answers within its bound (from coord-b).
        let t = Instant::now();
        let r = x.locate(&da, true).await;
        ensure!(
            t.elapsed() <= Duration::from_millis(2500),
            "locate took {:?}",
            t.elapsed()
        );
        ensure!(r.is_ok(), "coord-b should answer: {r:?}");
        poll_until(WAIT, "x finds y through coord-b", holds).await?;
        let took = killed.elapsed();
        ensure!(took < Duration::from_secs(12), "failover took {took:?}");
        ensure!(x.connected_coordinators() == vec![id("coord-b")]);
        Ok(())
    })
    .await
}
