//! Fixtures for the peer module's tests: a test CA and node certificates (rcgen), quinn
//! configurations with mutual TLS and ALPN `shoal-peer/1`, an in-process tracker (`proto`'s
//! `Tracker` behind a mutex) with a [`Control`] per node that talks to it directly, a small
//! origin registry that counts the blob bytes it serves, and test nodes (store, peer
//! endpoint, single-flight downloads) on 127.0.0.x.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use shoal_proto::manifest::{PieceHasher, PieceManifest};
use shoal_proto::msg::{AgentMsg, Announce, CoordMsg, Hello, LocateReply, NodeId, Zone};
use shoal_proto::range::{RangeRequest, parse_range};
use shoal_proto::time::Time;
use shoal_proto::tracker::{Tracker, TrackerConfig};
use shoal_proto::wire::ALPN_PEER;
use shoal_proto::{Digest, RegistryHost, RepoName};
use tempfile::TempDir;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::{Control, LocateError, Peer, PeerConfig, Shaping};
use crate::fetch::{Downloads, Join};
use crate::metrics::Metrics;
use crate::store::{Store, StoreConfig};
use crate::upstream::{Upstream, UpstreamConfig};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority for one test cluster.
pub(crate) struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    der: CertificateDer<'static>,
    /// Node certificates issued, to tell a connection's identity.
    issued: Mutex<HashMap<Vec<u8>, NodeId>>,
}

/// A node's certificate and key.
pub(crate) struct NodeCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl TestCa {
    pub(crate) fn new() -> Arc<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "shoal test cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().clone();
        Arc::new(TestCa {
            params,
            key,
            der,
            issued: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn issue(&self, node: &str) -> NodeCert {
        let params = CertificateParams::new(vec![node.to_owned()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        self.issued
            .lock()
            .unwrap()
            .insert(cert.der().to_vec(), NodeId::new(node).unwrap());
        NodeCert {
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        Arc::new(roots)
    }

    pub(crate) fn server_config(&self, cert: &NodeCert) -> quinn::ServerConfig {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots(), provider())
            .build()
            .unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                cert.chain.clone(),
                PrivateKeyDer::Pkcs8(cert.key.clone_key()),
            )
            .unwrap();
        tls.alpn_protocols = vec![ALPN_PEER.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        quinn::ServerConfig::with_crypto(Arc::new(quic))
    }

    pub(crate) fn client_config(&self, cert: &NodeCert) -> quinn::ClientConfig {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(self.roots())
            .with_client_auth_cert(
                cert.chain.clone(),
                PrivateKeyDer::Pkcs8(cert.key.clone_key()),
            )
            .unwrap();
        tls.alpn_protocols = vec![ALPN_PEER.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        quinn::ClientConfig::new(Arc::new(quic))
    }

    /// The node a connection's peer certificate was issued to by this CA.
    pub(crate) fn identity(&self, conn: &quinn::Connection) -> Option<NodeId> {
        let any = conn.peer_identity()?;
        let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
        let first = chain.first()?;
        self.issued.lock().unwrap().get(first.as_ref()).cloned()
    }
}

// ---------------------------------------------------------------------------------------------
// Tracker

struct TrackerState {
    tracker: Tracker,
    subs: Vec<(NodeId, Digest, UnboundedSender<CoordMsg>)>,
    /// Every message agents sent, in order.
    log: Vec<(NodeId, AgentMsg)>,
}

/// `proto`'s tracker in process, answering every node's control messages at once.
pub(crate) struct TestTracker {
    state: Mutex<TrackerState>,
    t0: std::time::Instant,
    req: AtomicU32,
    /// When false, every locate fails (no coordinator reachable).
    pub available: AtomicBool,
    pub refused: Mutex<HashSet<NodeId>>,
}

impl TestTracker {
    pub(crate) fn new(config: TrackerConfig) -> Arc<TestTracker> {
        let t = Arc::new(TestTracker {
            state: Mutex::new(TrackerState {
                tracker: Tracker::new(config),
                subs: Vec::new(),
                log: Vec::new(),
            }),
            t0: std::time::Instant::now(),
            req: AtomicU32::new(0),
            available: AtomicBool::new(true),
            refused: Mutex::new(HashSet::new()),
        });
        // Expiry (stalled seeders lose their slot, silent nodes go).
        let weak = Arc::downgrade(&t);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Some(t) = weak.upgrade() else { return };
                let now = t.now();
                let mut st = t.state.lock().unwrap();
                st.tracker.poll_expire(now);
                route(&mut st);
            }
        });
        t
    }

    fn now(&self) -> Time {
        Time::from_micros(self.t0.elapsed().as_micros() as u64)
    }

    fn handle(&self, node: &NodeId, msg: AgentMsg) -> Option<CoordMsg> {
        let now = self.now();
        let mut st = self.state.lock().unwrap();
        st.log.push((node.clone(), msg.clone()));
        let r = st.tracker.handle(node, msg, now).ok().flatten();
        route(&mut st);
        r
    }

    pub(crate) fn hello(&self, node: &NodeId, addr: SocketAddr) {
        let hello = Hello {
            node: node.clone(),
            zone: Zone::default(),
            version: shoal_proto::msg::PROTOCOL_VERSION,
            peer_addr: addr,
        };
        self.handle(node, AgentMsg::Hello(hello));
    }

    /// Messages of one kind sent so far, by whom.
    pub(crate) fn sent(&self, pick: impl Fn(&AgentMsg) -> bool) -> Vec<(NodeId, AgentMsg)> {
        let st = self.state.lock().unwrap();
        st.log.iter().filter(|(_, m)| pick(m)).cloned().collect()
    }

    /// The coordinator learns an anchored manifest (as when it read the blob itself).
    pub(crate) fn insert_manifest(&self, m: PieceManifest) {
        self.state.lock().unwrap().tracker.insert_manifest(m);
    }
}

fn route(st: &mut TrackerState) {
    while let Some((node, msg)) = st.tracker.poll_transmit() {
        let digest = match &msg {
            CoordMsg::OriginSlot { digest, .. } => digest.clone(),
            CoordMsg::Hashes(h) => h.digest.clone(),
            _ => continue,
        };
        st.subs.retain(|(n, d, tx)| {
            if n == &node && d == &digest {
                tx.send(msg.clone()).is_ok()
            } else {
                !tx.is_closed()
            }
        });
    }
}

/// One node's view of the test cluster.
pub(crate) struct TestControl {
    node: NodeId,
    listen: SocketAddr,
    tracker: Arc<TestTracker>,
    ca: Arc<TestCa>,
    cert: NodeCert,
    pub load: AtomicU32,
    pub inventory: Mutex<Option<Arc<dyn Fn() -> Announce + Send + Sync>>>,
}

impl TestControl {
    pub(crate) fn new(
        tracker: &Arc<TestTracker>,
        ca: &Arc<TestCa>,
        name: &str,
        listen: SocketAddr,
    ) -> Arc<TestControl> {
        Arc::new(TestControl {
            node: NodeId::new(name).unwrap(),
            listen,
            tracker: tracker.clone(),
            ca: ca.clone(),
            cert: ca.issue(name),
            load: AtomicU32::new(0),
            inventory: Mutex::new(None),
        })
    }
}

impl Control for TestControl {
    fn node(&self) -> &NodeId {
        &self.node
    }
    fn peer_listen(&self) -> SocketAddr {
        self.listen
    }
    fn peer_server_config(&self) -> quinn::ServerConfig {
        self.ca.server_config(&self.cert)
    }
    fn peer_client_config(&self) -> quinn::ClientConfig {
        self.ca.client_config(&self.cert)
    }
    fn peer_identity(&self, conn: &quinn::Connection) -> Option<NodeId> {
        self.ca.identity(conn)
    }
    fn is_refused(&self, node: &NodeId) -> bool {
        self.tracker.refused.lock().unwrap().contains(node)
    }
    fn locate(
        &self,
        digest: &Digest,
        want_origin: bool,
    ) -> BoxFuture<'_, Result<LocateReply, LocateError>> {
        let digest = digest.clone();
        Box::pin(async move {
            if !self.tracker.available.load(Ordering::SeqCst) {
                return Err(LocateError("no coordinator reachable".into()));
            }
            let req = self.tracker.req.fetch_add(1, Ordering::Relaxed);
            let msg = AgentMsg::Locate {
                req,
                digest,
                want_origin,
            };
            match self.tracker.handle(&self.node, msg) {
                Some(CoordMsg::LocateReply(r)) => Ok(r),
                other => Err(LocateError(format!("unexpected answer {other:?}"))),
            }
        })
    }
    fn send(&self, _digest: &Digest, msg: AgentMsg) {
        if self.tracker.available.load(Ordering::SeqCst) {
            self.tracker.handle(&self.node, msg);
        }
    }
    fn subscribe(&self, digest: &Digest) -> UnboundedReceiver<CoordMsg> {
        let (tx, rx) = unbounded_channel();
        self.tracker
            .state
            .lock()
            .unwrap()
            .subs
            .push((self.node.clone(), digest.clone(), tx));
        rx
    }
    fn set_load(&self, load: u32) {
        self.load.store(load, Ordering::Relaxed);
    }
    fn set_inventory(&self, f: Arc<dyn Fn() -> Announce + Send + Sync>) {
        *self.inventory.lock().unwrap() = Some(f);
    }
}

// ---------------------------------------------------------------------------------------------
// Origin

/// A registry that serves blobs (HEAD, GET, Range) and counts the blob bytes it sends.
pub(crate) struct Origin {
    pub addr: SocketAddr,
    pub served: Arc<AtomicU64>,
    blobs: Arc<Mutex<HashMap<Digest, Bytes>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    pub(crate) async fn start() -> Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let blobs: Arc<Mutex<HashMap<Digest, Bytes>>> = Arc::default();
        let (s, b) = (served.clone(), blobs.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (s, b) = (s.clone(), b.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let r = answer(&req, &b, &s);
                        async move { Ok::<_, Infallible>(r) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Origin {
            addr,
            served,
            blobs,
            task,
        }
    }

    pub(crate) fn add(&self, bytes: &[u8]) -> Digest {
        let d = Digest::sha256_of(bytes);
        self.blobs
            .lock()
            .unwrap()
            .insert(d.clone(), Bytes::copy_from_slice(bytes));
        d
    }

    /// Serves `bytes` under `digest`, whatever they hash to (a corrupt origin).
    pub(crate) fn put(&self, digest: &Digest, bytes: &[u8]) {
        self.blobs
            .lock()
            .unwrap()
            .insert(digest.clone(), Bytes::copy_from_slice(bytes));
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn answer(
    req: &Request<Incoming>,
    blobs: &Mutex<HashMap<Digest, Bytes>>,
    served: &AtomicU64,
) -> Response<Body> {
    let status = |s: StatusCode| {
        Response::builder()
            .status(s)
            .body(Full::new(Bytes::new()).boxed())
            .unwrap()
    };
    let path = req.uri().path();
    if path == "/v2/" {
        return status(StatusCode::OK);
    }
    let Some((_, digest)) = path.rsplit_once("/blobs/") else {
        return status(StatusCode::NOT_FOUND);
    };
    let Some(blob) = Digest::parse(digest)
        .ok()
        .and_then(|d| blobs.lock().unwrap().get(&d).cloned())
    else {
        return status(StatusCode::NOT_FOUND);
    };
    let size = blob.len() as u64;
    if req.method() == hyper::Method::HEAD {
        return Response::builder()
            .header("content-length", size)
            .body(Full::new(Bytes::new()).boxed())
            .unwrap();
    }
    let range = req.headers().get("range").and_then(|v| v.to_str().ok());
    match parse_range(range, size) {
        Ok(RangeRequest::Full) => {
            served.fetch_add(size, Ordering::SeqCst);
            Response::new(Full::new(blob).boxed())
        }
        Ok(RangeRequest::Partial(r)) => {
            let part = blob.slice(r.start as usize..=r.end as usize);
            served.fetch_add(part.len() as u64, Ordering::SeqCst);
            Response::builder()
                .status(StatusCode::PARTIAL_CONTENT)
                .header("content-range", r.content_range(size))
                .body(Full::new(part).boxed())
                .unwrap()
        }
        Err(_) => status(StatusCode::RANGE_NOT_SATISFIABLE),
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes

pub(crate) const REPO: &str = "test/blob";

/// A node of a test cluster: store, peer endpoint and single-flight downloads.
pub(crate) struct TestNode {
    pub control: Arc<TestControl>,
    pub peer: Peer,
    pub store: Store,
    pub downloads: Arc<Downloads>,
    pub upstream: Upstream,
    pub metrics: Metrics,
    _dir: TempDir,
}

impl TestNode {
    /// A node named `name` on 127.0.0.`ip` (port 0), registered with `tracker`, whose
    /// upstream is `origin`.
    pub(crate) async fn start(
        tracker: &Arc<TestTracker>,
        ca: &Arc<TestCa>,
        name: &str,
        ip: u8,
        origin: &str,
        config: PeerConfig,
    ) -> TestNode {
        TestNode::start_capped(tracker, ca, name, ip, origin, config, None).await
    }

    /// [`TestNode::start`] with the default peer configuration.
    pub(crate) async fn plain(
        tracker: &Arc<TestTracker>,
        ca: &Arc<TestCa>,
        name: &str,
        ip: u8,
        origin: &str,
    ) -> TestNode {
        TestNode::start(tracker, ca, name, ip, origin, PeerConfig::default()).await
    }

    /// [`TestNode::start`] with a store capped at `max_bytes`.
    pub(crate) async fn start_capped(
        tracker: &Arc<TestTracker>,
        ca: &Arc<TestCa>,
        name: &str,
        ip: u8,
        origin: &str,
        config: PeerConfig,
        max_bytes: Option<u64>,
    ) -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        let mut store_cfg = StoreConfig::new(dir.path().join("store"));
        store_cfg.max_bytes = max_bytes;
        let store = tokio::task::spawn_blocking(move || Store::open(store_cfg))
            .await
            .unwrap()
            .unwrap();
        let metrics = Metrics::new();
        let listen = SocketAddr::from((Ipv4Addr::new(127, 0, 0, ip), 0));
        let control = TestControl::new(tracker, ca, name, listen);
        let shaping = Shaping::new(&config);
        let peer = Peer::start(
            control.clone(),
            config,
            shaping,
            store.clone(),
            metrics.clone(),
        )
        .unwrap();
        tracker.hello(control.node(), peer.local_addr());
        let downloads = Downloads::new(store.clone(), metrics.clone());
        downloads.set_peer(peer.clone());
        let mut up = UpstreamConfig::new(RegistryHost::parse("origin.test").unwrap(), origin);
        up.insecure = true;
        up.connect_timeout = Duration::from_secs(2);
        up.idle_timeout = Duration::from_secs(5);
        up.max_retries = 1;
        let upstream = Upstream::new(up).unwrap();
        TestNode {
            control,
            peer,
            store,
            downloads,
            upstream,
            metrics,
            _dir: dir,
        }
    }

    pub(crate) fn node(&self) -> &NodeId {
        self.control.node()
    }

    /// Locates `digest` as a download would, asking for the origin.
    pub(crate) async fn control_locate(&self, digest: &Digest) -> LocateReply {
        self.control.locate(digest, true).await.unwrap()
    }

    /// Puts a complete blob in the store and announces it; the tracker knows its manifest,
    /// as it would after the download that brought it.
    pub(crate) async fn seed(&self, bytes: &[u8]) -> Digest {
        let d = Digest::sha256_of(bytes);
        let (store, dd, b) = (self.store.clone(), d.clone(), bytes.to_vec());
        tokio::task::spawn_blocking(move || store.put(&dd, &b, None))
            .await
            .unwrap()
            .unwrap();
        self.control.send(
            &d,
            AgentMsg::Announce(Announce {
                complete: vec![d.clone()],
                partial: vec![],
            }),
        );
        let mut h = PieceHasher::new(bytes.len() as u64, d.algorithm()).unwrap();
        h.update(bytes).unwrap();
        self.control.tracker.insert_manifest(h.finish(&d).unwrap());
        d
    }

    /// Pulls `digest` as a local client would (through the single-flight download) and
    /// returns the bytes, or the error that aborted the transfer.
    pub(crate) async fn pull(&self, digest: &Digest) -> Result<Vec<u8>, String> {
        let name = RepoName::parse(REPO).unwrap();
        let sub = match self.downloads.join(&self.upstream, &name, digest) {
            Join::Cached => {
                let (store, d) = (self.store.clone(), digest.clone());
                return tokio::task::spawn_blocking(move || {
                    let blob = store.open_blob(&d).unwrap().unwrap();
                    let mut buf = vec![0; blob.size as usize];
                    std::os::unix::fs::FileExt::read_exact_at(&blob.file, &mut buf, 0).unwrap();
                    buf
                })
                .await
                .map_err(|e| e.to_string());
            }
            Join::Started(s) | Join::Shared(s) => s,
        };
        let mut stream = sub.into_stream(0, None);
        let mut out = Vec::new();
        while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
            out.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
        }
        Ok(out)
    }
}

/// Random (incompressible) bytes.
pub(crate) fn random_blob(len: usize, seed: u64) -> Vec<u8> {
    let mut r = shoal_proto::rng::Rng::new(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&r.next_u64().to_le_bytes());
    }
    v.truncate(len);
    v
}
