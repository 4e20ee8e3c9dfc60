//! A whole Shoal cluster in one test process: an origin registry (Debian's `docker-registry`)
//! behind a counting [`Proxy`], one or two coordinators (front door and cluster control
//! channel, sharing one cluster CA directory and one token file), and N agents, each on its
//! own loopback address 127.0.0.(2+i) with its own store, enrolled with the bootstrap token.
//!
//! What the origin serves is measured at the origin: the registry's own access log
//! ([`TestCluster::origin_served`], the authoritative figure) and the proxy in front of it
//! (a cross-check). Agents read the origin directly through the proxy; coordinators are
//! reached on their control channel through a [`UdpRelay`] each, so that
//! [`TestCluster::kill_coordinator`] is a host that goes silent (no close, no reset), not a
//! polite goodbye. Agents run on runtimes of their own, so [`TestCluster::kill_agent`] ends
//! every task of an agent at once, like a crash.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use shoal_tests::cluster::{ClusterOptions, TestCluster};
//! use shoal_tests::{ImageSpec, TestImage, verify_layout};
//! let cluster = TestCluster::start(ClusterOptions::new(4)).await?;
//! let image = TestImage::generate(&ImageSpec::new(vec![4 << 20, 4 << 20], 1), "v1")?;
//! let name = cluster.push(&image, "demo/app").await?;
//! let out = tempfile::tempdir()?;
//! cluster.pull(0, &name, &out.path().join("oci")).await?;
//! verify_layout(&out.path().join("oci"), &image)?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use http::Method;
use shoal_agent::cluster::{
    Cluster, ClusterConfig, ClusterTimers, CoordinatorAddr, FrontDoorTrust,
};
use shoal_proto::enroll::BootstrapToken;
use shoal_proto::msg::{NodeId, Zone};
use tempfile::TempDir;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::agent::{AgentOptions, TestAgent};
use crate::coordinator::{CoordinatorOptions, TestCoordinator};
use crate::image::{TestImage, sha256_file};
use crate::net::wait_until;
use crate::proxy::{Proxy, blob_digest};
use crate::registry::Registry;
use crate::skopeo::{CopyOptions, CopyOutput, Skopeo};

/// The bootstrap token every member of a test cluster enrolls with.
pub const BOOTSTRAP_TOKEN: &str = "shoal-swarm-test-bootstrap-token-0123456789";

/// How a test cluster is made.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Agents to start, on 127.0.0.`first_ip`, 127.0.0.`first_ip + 1`, ...
    pub agents: usize,
    pub first_ip: u8,
    /// Coordinator names (one or two; every agent lists them all, in this order).
    pub coordinators: Vec<String>,
    /// Extra lines for every coordinator's `[cluster]` table (tracker settings).
    pub tracker_toml: String,
    /// Lines of every agent's `[peer]` table (bandwidth limits, timers).
    pub peer_toml: String,
    /// Extra lines for every agent's `[cluster]` table.
    pub agent_cluster_toml: String,
    /// The agents' zone label.
    pub zone: String,
    /// How long one agent may take to enroll and answer its mirror.
    pub agent_ready_timeout: Duration,
    /// The agents' upstream timeouts (their origin is the proxy).
    pub upstream_idle_timeout: Duration,
    /// The origin's upload capacity in bytes per second, shared by every connection to it
    /// (a [`ShapedRelay`] between the counting proxy and the registry); `None`: unshaped.
    pub origin_rate: Option<u64>,
}

impl ClusterOptions {
    /// `agents` agents and one coordinator with default tracker and peer settings.
    pub fn new(agents: usize) -> ClusterOptions {
        ClusterOptions {
            agents,
            first_ip: 2,
            coordinators: vec!["coord-a".into()],
            tracker_toml: String::new(),
            peer_toml: String::new(),
            agent_cluster_toml: String::new(),
            zone: "dc1/row1".into(),
            agent_ready_timeout: Duration::from_secs(60),
            upstream_idle_timeout: Duration::from_secs(10),
            origin_rate: None,
        }
    }

    /// Two coordinators with these names.
    pub fn two_coordinators(mut self, a: &str, b: &str) -> ClusterOptions {
        self.coordinators = vec![a.to_owned(), b.to_owned()];
        self
    }

    /// The address of agent `i`.
    pub fn agent_ip(&self, i: usize) -> Ipv4Addr {
        agent_ip(self.first_ip, i)
    }
}

fn agent_ip(first: u8, i: usize) -> Ipv4Addr {
    let last = usize::from(first) + i;
    assert!(last < 255, "too many agents for 127.0.0.0/24");
    Ipv4Addr::new(127, 0, 0, last as u8)
}

fn q(p: &Path) -> String {
    serde_json::to_string(&p.to_string_lossy()).expect("a str serialises")
}

/// A UDP port on `ip` that was free a moment ago (for a QUIC endpoint the code under test
/// binds itself).
pub fn free_udp_port(ip: IpAddr) -> Result<u16> {
    let s = std::net::UdpSocket::bind((ip, 0)).with_context(|| format!("binding UDP {ip}:0"))?;
    Ok(s.local_addr()?.port())
}

/// A UDP relay in front of one address (a coordinator's control port) that can go silent,
/// like a host that lost power: from then on nothing passes either way, and nobody is told.
pub struct UdpRelay {
    addr: SocketAddr,
    dead: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for UdpRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpRelay")
            .field("addr", &self.addr)
            .field("dead", &self.dead.load(Ordering::Relaxed))
            .finish()
    }
}

impl UdpRelay {
    /// Relays datagrams between clients of 127.0.0.1:PORT (returned by [`UdpRelay::addr`])
    /// and `target`, with one back socket per client.
    pub async fn start(target: SocketAddr) -> Result<UdpRelay> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let dead = Arc::new(AtomicBool::new(false));
        let d = dead.clone();
        let task = tokio::spawn(async move {
            let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut children = Vec::new();
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                if d.load(Ordering::Relaxed) {
                    continue;
                }
                let back = match backs.get(&from) {
                    Some(b) => b.clone(),
                    None => {
                        let Ok(b) = UdpSocket::bind("127.0.0.1:0").await else {
                            continue;
                        };
                        if b.connect(target).await.is_err() {
                            continue;
                        }
                        let b = Arc::new(b);
                        let (b2, f2, d2) = (b.clone(), front.clone(), d.clone());
                        children.push(AbortOnDrop(tokio::spawn(async move {
                            let mut buf = vec![0u8; 65536];
                            while let Ok(n) = b2.recv(&mut buf).await {
                                if !d2.load(Ordering::Relaxed) {
                                    let _ = f2.send_to(&buf[..n], from).await;
                                }
                            }
                        })));
                        backs.insert(from, b.clone());
                        b
                    }
                };
                let _ = back.send(&buf[..n]).await;
            }
        });
        Ok(UdpRelay { addr, dead, task })
    }

    /// Where clients send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on nothing passes.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::Relaxed);
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP relay in front of one address whose downstream direction (target to clients) is
/// limited to `rate` bytes per second in all, shared first come, first served by every
/// connection: an origin with that much upload capacity. Upstream (requests) is not shaped.
pub struct ShapedRelay {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for ShapedRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShapedRelay")
            .field("addr", &self.addr)
            .finish()
    }
}

/// The time at which the shared link is next free; each chunk books its transmission time.
struct Link {
    rate: f64,
    next: std::sync::Mutex<tokio::time::Instant>,
}

impl Link {
    /// Books `n` bytes on the link; returns when they may go.
    fn book(&self, n: usize) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let mut next = self
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // An idle link does not bank more than a few milliseconds of credit.
        let start = (*next).max(now - Duration::from_millis(5));
        *next = start + Duration::from_secs_f64(n as f64 / self.rate);
        start
    }
}

impl ShapedRelay {
    pub async fn start(target: SocketAddr, rate: u64) -> Result<ShapedRelay> {
        ensure!(rate > 0, "a shaped relay needs a positive rate");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let link = Arc::new(Link {
            rate: rate as f64,
            next: std::sync::Mutex::new(tokio::time::Instant::now()),
        });
        let task = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((client, _)) = listener.accept().await {
                let link = link.clone();
                conns.retain(|c: &AbortOnDrop| !c.0.is_finished());
                conns.push(AbortOnDrop(tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut sw).await;
                    };
                    let down = async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            tokio::time::sleep_until(link.book(n)).await;
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                })));
            }
        });
        Ok(ShapedRelay { addr, task })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ShapedRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A member with a control plane only (a `shoal_agent::cluster::Cluster`, no agent around
/// it): enrolled, with control sessions, and the peer TLS configurations every agent uses.
/// Stops on drop.
pub struct Member {
    cluster: Cluster,
    ip: IpAddr,
    _stop: oneshot::Sender<()>,
    _state: TempDir,
}

impl std::ops::Deref for Member {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl Member {
    pub fn ip(&self) -> IpAddr {
        self.ip
    }
}

/// One coordinator of the cluster.
struct Coord {
    name: String,
    relay: UdpRelay,
    coordinator: TestCoordinator,
    killed: AtomicBool,
}

impl Coord {
    fn alive(&self) -> Option<&TestCoordinator> {
        (!self.killed.load(Ordering::Relaxed)).then_some(&self.coordinator)
    }
}

/// One agent of the cluster.
pub struct ClusterAgent {
    pub index: usize,
    pub name: String,
    pub ip: Ipv4Addr,
    /// Where its peer endpoint listens (and what it advertises).
    pub peer_addr: SocketAddr,
    agent: TestAgent,
    killed: AtomicBool,
}

impl std::fmt::Debug for ClusterAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterAgent")
            .field("name", &self.name)
            .field("mirror", &self.agent.host_port())
            .field("killed", &self.is_killed())
            .finish()
    }
}

impl ClusterAgent {
    pub fn agent(&self) -> &TestAgent {
        &self.agent
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Relaxed)
    }

    pub fn node(&self) -> NodeId {
        NodeId::new(&self.name).expect("harness node names are valid")
    }
}

/// What the origin served to blob GETs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginServed {
    /// Body bytes of blob GETs, as the registry's access log counts them.
    pub bytes: u64,
    /// Blob GETs answered (200 or 206).
    pub gets: usize,
}

impl std::ops::Sub for OriginServed {
    type Output = OriginServed;
    fn sub(self, before: OriginServed) -> OriginServed {
        OriginServed {
            bytes: self.bytes.saturating_sub(before.bytes),
            gets: self.gets.saturating_sub(before.gets),
        }
    }
}

/// Origin, coordinators and agents; everything stops and is removed on drop.
pub struct TestCluster {
    opts: ClusterOptions,
    registry: Registry,
    _shaper: Option<ShapedRelay>,
    origin: Proxy,
    shared: TempDir,
    coords: Vec<Coord>,
    agents: Vec<ClusterAgent>,
}

impl std::fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCluster")
            .field("origin", &self.origin.url())
            .field("coordinators", &self.coordinator_names())
            .field("agents", &self.agents)
            .finish_non_exhaustive()
    }
}

impl TestCluster {
    /// Starts the origin, the coordinators (one after the other: the first creates the
    /// cluster CA), then every agent at once, and waits until every agent has a control
    /// session with every coordinator.
    pub async fn start(opts: ClusterOptions) -> Result<TestCluster> {
        crate::init_tracing();
        crate::require_tools()?;
        ensure!(
            !opts.coordinators.is_empty() && opts.coordinators.len() <= 8,
            "one to eight coordinators"
        );
        let registry = Registry::start().await?;
        let shaper = match opts.origin_rate {
            Some(rate) => Some(ShapedRelay::start(registry.addr(), rate).await?),
            None => None,
        };
        let origin = match &shaper {
            Some(s) => Proxy::start(&format!("http://{}", s.addr())).await?,
            None => Proxy::start(&registry.url()).await?,
        };
        let shared = tempfile::Builder::new()
            .prefix("shoal-cluster-")
            .tempdir()?;
        std::fs::write(
            shared.path().join("tokens"),
            format!("# test bootstrap tokens\n{BOOTSTRAP_TOKEN}\n"),
        )?;
        std::fs::write(shared.path().join("agent-token"), BOOTSTRAP_TOKEN)?;

        let mut coords = Vec::new();
        let mut bundle = Vec::new();
        for name in &opts.coordinators {
            let mut c = CoordinatorOptions::new(&[origin.url()]);
            c.cluster_toml = Some(format!(
                "name = \"{name}\"\ndata_dir = {}\nbootstrap_tokens_file = {}\n\
                 cert_lifetime = \"1h\"\nnode_ttl = \"30s\"\n{}",
                q(&shared.path().join("ca")),
                q(&shared.path().join("tokens")),
                opts.tracker_toml,
            ));
            let coordinator = TestCoordinator::start(c)
                .await
                .with_context(|| format!("starting coordinator {name}"))?;
            bundle.extend_from_slice(coordinator.ca_pem());
            let relay =
                UdpRelay::start(coordinator.cluster_addr().context("no cluster port")?).await?;
            coords.push(Coord {
                name: name.clone(),
                relay,
                coordinator,
                killed: AtomicBool::new(false),
            });
        }
        // One bundle with every front door's CA (each test coordinator made its own).
        std::fs::write(shared.path().join("front-door-ca.pem"), bundle)?;

        let mut cluster = TestCluster {
            opts,
            registry,
            _shaper: shaper,
            origin,
            shared,
            coords,
            agents: Vec::new(),
        };
        let starts: Vec<_> = (0..cluster.opts.agents)
            .map(|i| cluster.start_agent(i))
            .collect();
        for r in futures::future::join_all(starts).await {
            cluster.agents.push(r?);
        }
        cluster.wait_connected(cluster.opts.agents).await?;
        Ok(cluster)
    }

    /// The `[cluster]` table of a member named `name` with its peer endpoint on `peer` (its
    /// state directory is the default, `cluster/` in its store).
    pub fn member_toml(&self, name: &str, peer: SocketAddr) -> String {
        let mut t = format!(
            "[cluster]\nnode_name = \"{name}\"\nzone = \"{}\"\npeer_listen = \"{peer}\"\n\
             bootstrap_token_file = {}\nca_file = {}\n{}\n",
            self.opts.zone,
            q(&self.shared.path().join("agent-token")),
            q(&self.front_door_ca_file()),
            self.opts.agent_cluster_toml,
        );
        for c in &self.coords {
            let https = c.coordinator.https_addr().port();
            t.push_str(&format!(
                "[[cluster.coordinator]]\nname = \"{}\"\nenroll_url = \"https://127.0.0.1:{https}\"\nctl_addr = \"{}\"\n",
                c.name,
                c.relay.addr()
            ));
        }
        t
    }

    /// The same membership as a [`ClusterConfig`], for a `shoal_agent::cluster::Cluster`
    /// started by a test (the misbehaving peer of [`crate::bad_peer`]).
    pub fn member_config(
        &self,
        name: &str,
        peer: SocketAddr,
        state_dir: &Path,
    ) -> Result<ClusterConfig> {
        Ok(ClusterConfig {
            node: NodeId::new(name)?,
            zone: Zone::new(&self.opts.zone)?,
            peer_listen: peer,
            advertise: peer,
            coordinators: self
                .coords
                .iter()
                .map(|c| {
                    let https = c.coordinator.https_addr().port();
                    Ok(CoordinatorAddr {
                        name: NodeId::new(&c.name)?,
                        enroll_url: format!("https://127.0.0.1:{https}"),
                        ctl_addr: c.relay.addr().to_string(),
                    })
                })
                .collect::<Result<_>>()?,
            bootstrap_token: Some(BootstrapToken::new(BOOTSTRAP_TOKEN)?),
            front_door: FrontDoorTrust::CaFile(self.front_door_ca_file()),
            state_dir: state_dir.to_owned(),
            timers: ClusterTimers::default(),
        })
    }

    /// Enrolls a control-plane-only member `name` on `ip` and waits for its control sessions.
    pub async fn start_member(&self, name: &str, ip: Ipv4Addr) -> Result<Member> {
        let ipa = IpAddr::V4(ip);
        let state = tempfile::Builder::new().prefix("shoal-member-").tempdir()?;
        let peer = SocketAddr::new(ipa, free_udp_port(ipa)?);
        let cfg = self.member_config(name, peer, &state.path().join("cluster"))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let cluster = Cluster::start(cfg, async move {
            let _ = stopped.await;
        })
        .await
        .with_context(|| format!("member {name} could not join"))?;
        let want = self.coords.iter().filter(|c| c.alive().is_some()).count();
        wait_until(
            Duration::from_secs(15),
            &format!("{name} has its control sessions"),
            || {
                let n = cluster.connected_coordinators().len();
                async move { n == want }
            },
        )
        .await?;
        Ok(Member {
            cluster,
            ip: ipa,
            _stop: stop,
            _state: state,
        })
    }

    /// Agent options for a member on `ip` named `name`, as the harness starts them
    /// (`extra_toml` holds `[cluster]` and `[peer]`).
    pub fn agent_options(&self, name: &str, ip: Ipv4Addr) -> Result<AgentOptions> {
        let ipa = IpAddr::V4(ip);
        let peer = SocketAddr::new(ipa, free_udp_port(ipa)?);
        let mut a = AgentOptions::new(&self.origin.url());
        a.ip = ipa;
        a.idle_timeout = self.opts.upstream_idle_timeout;
        a.own_runtime = true;
        a.ready_timeout = self.opts.agent_ready_timeout;
        a.extra_toml = format!(
            "{}\n[peer]\n{}\n",
            self.member_toml(name, peer),
            self.opts.peer_toml
        );
        Ok(a)
    }

    async fn start_agent(&self, index: usize) -> Result<ClusterAgent> {
        let name = format!("node-{index}");
        let ip = self.opts.agent_ip(index);
        let opts = self.agent_options(&name, ip)?;
        let peer_addr = peer_listen_of(&opts.extra_toml)?;
        let agent = TestAgent::start_with(opts)
            .await
            .with_context(|| format!("starting agent {name} on {ip}"))?;
        Ok(ClusterAgent {
            index,
            name,
            ip,
            peer_addr,
            agent,
            killed: AtomicBool::new(false),
        })
    }

    /// Waits until every coordinator still running reports `n` connected nodes.
    pub async fn wait_connected(&self, n: usize) -> Result<()> {
        for c in self.coords.iter().filter_map(Coord::alive) {
            wait_until(
                Duration::from_secs(30),
                &format!("{n} nodes connected to a coordinator"),
                || async move { connected_nodes(c).await == Some(n) },
            )
            .await?;
        }
        Ok(())
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The counting proxy in front of the registry: what agents use as their upstream.
    pub fn origin(&self) -> &Proxy {
        &self.origin
    }

    pub fn coordinator_names(&self) -> Vec<String> {
        self.coords.iter().map(|c| c.name.clone()).collect()
    }

    /// Coordinator `j`, unless it was killed.
    pub fn coordinator(&self, j: usize) -> Option<&TestCoordinator> {
        self.coords.get(j)?.alive()
    }

    /// The front doors' CA certificates (PEM), what members trust when they enroll.
    pub fn front_door_ca_file(&self) -> PathBuf {
        self.shared.path().join("front-door-ca.pem")
    }

    /// The cluster CA certificate (DER), created by the first coordinator.
    pub fn cluster_ca_der(&self) -> Result<Vec<u8>> {
        use rustls_pki_types::pem::PemObject;
        let path = self.shared.path().join("ca").join("ca.crt");
        let pem = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem)
            .with_context(|| format!("parsing {}", path.display()))?;
        Ok(der.as_ref().to_vec())
    }

    /// The control channel address agents use for coordinator `j` (its relay).
    pub fn ctl_addr(&self, j: usize) -> Option<SocketAddr> {
        Some(self.coords.get(j)?.relay.addr())
    }

    pub fn agents(&self) -> &[ClusterAgent] {
        &self.agents
    }

    pub fn agent(&self, i: usize) -> &ClusterAgent {
        &self.agents[i]
    }

    /// Pushes `image` to the registry directly (not through the counting proxy) as
    /// `repo:TAG`; returns `repo:TAG`.
    pub async fn push(&self, image: &TestImage, repo: &str) -> Result<String> {
        let name = format!("{repo}:{}", image.tag());
        let dest = format!("{}/{name}", self.registry.host_port());
        Skopeo::push(image.dir(), image.tag(), &dest, &CopyOptions::default()).await?;
        Ok(name)
    }

    /// Pulls `name` (`repo:tag`) through agent `i` with skopeo into the OCI layout `out`.
    pub async fn pull(&self, i: usize, name: &str, out: &Path) -> Result<CopyOutput> {
        self.pull_with(i, name, out, &CopyOptions::default()).await
    }

    pub async fn pull_with(
        &self,
        i: usize,
        name: &str,
        out: &Path,
        opts: &CopyOptions,
    ) -> Result<CopyOutput> {
        let a = &self.agents[i];
        ensure!(!a.is_killed(), "agent {} was killed", a.name);
        let src = format!("{}/{name}", a.agent.host_port());
        Skopeo::pull(&src, out, opts)
            .await
            .with_context(|| format!("pulling {name} through {}", a.name))
    }

    /// Ends agent `i` like a crash (see [`TestAgent::kill`]); its store stays for inspection.
    pub fn kill_agent(&self, i: usize) -> Result<()> {
        let a = &self.agents[i];
        a.agent.kill()?;
        a.killed.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Kills coordinator `j` like a host losing power: its control channel goes silent (the
    /// agents hear nothing from it again, not even a close). It is stopped with the cluster.
    pub fn kill_coordinator(&self, j: usize) -> Result<()> {
        let c = self.coords.get(j).context("no such coordinator")?;
        c.relay.kill();
        if c.killed.swap(true, Ordering::Relaxed) {
            bail!("coordinator {} was already killed", c.name);
        }
        Ok(())
    }

    /// What the origin has served to blob GETs so far, from the registry's access log.
    pub fn origin_served(&self) -> OriginServed {
        let mut s = OriginServed::default();
        for e in self.registry.access_log() {
            if e.method == "GET" && matches!(e.status, 200 | 206) && blob_digest(&e.path).is_some()
            {
                s.bytes += e.bytes;
                s.gets += 1;
            }
        }
        s
    }

    /// Blob bytes the proxy in front of the origin passed on (a cross-check of
    /// [`TestCluster::origin_served`]), and its blob GETs.
    pub fn proxy_served(&self) -> OriginServed {
        OriginServed {
            bytes: self.origin.bytes_served_for_blobs(),
            gets: self
                .origin
                .count(&Method::GET, |p| blob_digest(p).is_some()),
        }
    }

    /// One metric sample of agent `i` (0 when absent).
    pub async fn metric(&self, i: usize, sample: &str) -> Result<f64> {
        self.agents[i].agent.metric(sample).await
    }

    /// Checks every agent's store (killed ones too): every file under `blobs/` hashes to its
    /// name. Returns how many blobs were checked.
    pub fn check_stores(&self) -> Result<usize> {
        let mut checked = 0;
        for a in &self.agents {
            checked += check_store(a.agent.store_root())
                .with_context(|| format!("store of {}", a.name))?;
        }
        Ok(checked)
    }

    /// Digests committed in agent `i`'s store.
    pub fn stored_digests(&self, i: usize) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let blobs = self.agents[i].agent.store_root().join("blobs");
        if !blobs.exists() {
            return Ok(out);
        }
        for alg in std::fs::read_dir(&blobs)? {
            let alg = alg?;
            for f in std::fs::read_dir(alg.path())? {
                let f = f?;
                out.push(format!(
                    "{}:{}",
                    alg.file_name().to_string_lossy(),
                    f.file_name().to_string_lossy()
                ));
            }
        }
        Ok(out)
    }
}

fn peer_listen_of(toml: &str) -> Result<SocketAddr> {
    toml.lines()
        .find_map(|l| l.strip_prefix("peer_listen = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .context("no peer_listen in the member config")?
        .parse()
        .context("peer_listen")
}

/// `shoal_coordinator_cluster_nodes_connected` of a coordinator, if it answers.
pub async fn connected_nodes(c: &TestCoordinator) -> Option<usize> {
    let text = c.metrics_text().await.ok()?;
    let v = crate::agent::metric_value(&text, "shoal_coordinator_cluster_nodes_connected");
    Some(v as usize)
}

/// Checks one store: every file under `blobs/<alg>/` hashes to its name (sha256 only).
pub fn check_store(root: &Path) -> Result<usize> {
    let blobs = root.join("blobs");
    if !blobs.exists() {
        return Ok(0);
    }
    let mut checked = 0;
    for alg in std::fs::read_dir(&blobs)? {
        let alg = alg?;
        let alg_name = alg.file_name().to_string_lossy().into_owned();
        for f in std::fs::read_dir(alg.path())? {
            let f = f?;
            let name = f.file_name().to_string_lossy().into_owned();
            ensure!(
                alg_name == "sha256",
                "blob {alg_name}:{name} of an algorithm the harness cannot check"
            );
            let actual = sha256_file(&f.path())?;
            ensure!(
                actual == name,
                "CORRUPT BLOB COMMITTED: {} hashes to sha256:{actual}",
                f.path().display()
            );
            checked += 1;
        }
    }
    Ok(checked)
}
