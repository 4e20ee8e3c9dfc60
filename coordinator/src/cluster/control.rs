//! The control channel's server (`shoal-ctl/1` over QUIC): one connection and one
//! bidirectional stream per agent, mutual TLS against the cluster CA, and the task that owns
//! the [`Tracker`].
//!
//! Connection tasks authenticate (the node name comes from the verified certificate; the
//! `Hello` must repeat it and announce a peer address the certificate vouches for), answer
//! `Renew` themselves, and pass every other message to the tracker task over a channel. The
//! tracker task is the only owner of the tracker: it feeds it inputs with `now`, sends what
//! `poll_transmit` yields to the named agents, runs `poll_expire` when `poll_timeout` says,
//! and calls `handle_disconnect` when a session ends. It also applies revocations (closing the
//! sessions of revoked nodes and certificates) and tells every agent whom to refuse (nodes and
//! certificate serials).
//!
//! A session lasts no longer than the certificate it was opened with. An agent that renewed
//! opens a new session before its old certificate expires; the tracker task then hands the
//! node's state over to it (no `handle_disconnect`) and still answers what arrives on the old
//! session until the agent closes it.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use shoal_agent::cluster::tls::{self, CertInfo, cert_info};
use shoal_proto::msg::{
    AgentMsg, CertDer, CoordMsg, Hello, MAX_REFUSED_NODES, MAX_REFUSED_SERIALS, NodeId, Serial,
};
use shoal_proto::time::Time;
use shoal_proto::tracker::{Tracker, TrackerError};
use shoal_proto::wire::{self, Decoder};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::ca::ClusterCa;
use super::revoke::Revocations;
use crate::metrics::Metrics;

/// Time allowed for the QUIC handshake, and then for the agent's `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest interval between two renewals on one session.
const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(1);
/// How often the revocation file is checked for changes.
const REVOCATION_POLL: Duration = Duration::from_secs(1);

static CONN_IDS: AtomicU64 = AtomicU64::new(1);

/// What the connection tasks share.
pub(super) struct Shared {
    pub ca: Arc<ClusterCa>,
    pub revocations: Arc<Revocations>,
    pub cert_lifetime: Duration,
    pub metrics: Metrics,
    pub cmds: mpsc::UnboundedSender<Cmd>,
}

/// Inputs of the tracker task.
pub(super) enum Cmd {
    Connected {
        node: NodeId,
        id: u64,
        serial: String,
        hello: Hello,
        tx: mpsc::UnboundedSender<CoordMsg>,
        conn: quinn::Connection,
    },
    Msg {
        node: NodeId,
        id: u64,
        msg: AgentMsg,
    },
    Disconnected {
        node: NodeId,
        id: u64,
    },
}

/// Accepts connections until `cancel`, then closes the endpoint.
pub(super) async fn serve(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let shared = shared.clone();
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    if let Err(e) = connection(incoming, &shared, cancel).await {
                        debug!(remote = %remote, error = %e, "control session ended");
                    }
                });
            }
            () = cancel.cancelled() => break,
        }
    }
    endpoint.close(0u32.into(), b"shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

fn verified_peer(conn: &quinn::Connection) -> Option<CertInfo> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    cert_info(chain.first()?).ok()
}

async fn read_msg(
    recv: &mut quinn::RecvStream,
    dec: &mut Decoder<AgentMsg>,
    buf: &mut Vec<u8>,
) -> Result<Option<AgentMsg>, String> {
    loop {
        if !buf.is_empty() {
            let mut input = &buf[..];
            let r = dec.decode(&mut input);
            let used = buf.len() - input.len();
            buf.drain(..used);
            match r {
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => {}
                Err(e) => return Err(format!("bad frame: {e}")),
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        match recv.read(&mut chunk).await {
            Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(None) if dec.is_idle() => return Ok(None),
            Ok(None) => return Err("stream ended inside a frame".into()),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

async fn refuse(send: &mut quinn::SendStream, conn: &quinn::Connection, reason: String) {
    warn!(remote = %conn.remote_address(), %reason, "control session refused");
    if let Ok(frame) = wire::encode(&CoordMsg::Refused { reason }) {
        let _ = send.write_all(&frame).await;
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    conn.close(1u32.into(), b"refused");
}

async fn connection(
    incoming: quinn::Incoming,
    shared: &Shared,
    cancel: CancellationToken,
) -> Result<(), String> {
    let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming)
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| format!("handshake: {e}"))?;
    // The verifier accepted the chain, so this is a node certificate of our CA, valid and not
    // revoked at handshake time.
    let info = verified_peer(&conn).ok_or("no verified node certificate")?;
    let node = info.node().cloned().ok_or("not a node certificate")?;
    {
        use shoal_agent::cluster::tls::Refusals as _;
        // The verifier checked this too; checked again in case the list changed since.
        if shared.revocations.is_refused(&node, &info.serial) {
            conn.close(2u32.into(), b"revoked");
            return Err(format!("{node}: revoked"));
        }
    }
    // The verifier's clock has whole seconds: in the second of `not_after` it still accepts
    // what a session ends with at that moment.
    if SystemTime::now() >= info.not_after {
        conn.close(3u32.into(), b"certificate expired");
        return Err(format!("{node}: certificate expired"));
    }
    let (mut send, mut recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| format!("{node}: no stream"))?
        .map_err(|e| format!("{node}: {e}"))?;
    let mut dec = Decoder::<AgentMsg>::new();
    let mut buf = Vec::new();
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_msg(&mut recv, &mut dec, &mut buf))
        .await
        .map_err(|_| format!("{node}: no hello"))??;
    let hello = match first {
        Some(AgentMsg::Hello(h)) => h,
        _ => {
            refuse(&mut send, &conn, "the session must start with Hello".into()).await;
            return Err(format!("{node}: no hello"));
        }
    };
    if hello.node != node {
        let reason = format!(
            "Hello names node {} but the certificate is node {node}",
            hello.node
        );
        refuse(&mut send, &conn, reason).await;
        return Err(format!("{node}: name mismatch"));
    }
    if !info.ips.contains(&hello.peer_addr.ip()) {
        let reason = format!(
            "peer address {} is not in node {node}'s certificate ({:?}); enroll again with advertise_addr",
            hello.peer_addr, info.ips
        );
        refuse(&mut send, &conn, reason).await;
        return Err(format!("{node}: address mismatch"));
    }

    let id = CONN_IDS.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel::<CoordMsg>();
    info!(node = %node, remote = %conn.remote_address(), zone = %hello.zone.as_str(), "agent connected");
    let _ = shared.cmds.send(Cmd::Connected {
        node: node.clone(),
        id,
        serial: info.serial.clone(),
        hello,
        tx: tx.clone(),
        conn: conn.clone(),
    });
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let end = matches!(msg, CoordMsg::Bye | CoordMsg::Refused { .. });
            match wire::encode(&msg) {
                Ok(frame) => {
                    if send.write_all(&frame).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "control message not sent: it breaks the protocol's bounds")
                }
            }
            if end {
                break;
            }
        }
        let _ = send.finish();
        // Until the agent has the last frames (a refusal says why the session ends): closing
        // the connection before that would discard them.
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    });

    let mut last_renewal: Option<Instant> = None;
    // The handshake checked the certificate's validity; the session ends with it. An agent
    // moves to its renewed certificate (a new session) before this fires.
    let expired = tls::expired(info.not_after);
    tokio::pin!(expired);
    let mut close: (u32, &[u8]) = (0, b"bye");
    let result = loop {
        let msg = tokio::select! {
            r = read_msg(&mut recv, &mut dec, &mut buf) => r,
            e = conn.closed() => break Err(format!("{node}: {e}")),
            () = &mut expired => {
                warn!(node = %node, serial = %info.serial, "closing a control session: its certificate expired");
                let _ = tx.send(CoordMsg::Refused { reason: "the certificate of this session expired".into() });
                close = (3, b"certificate expired");
                break Err(format!("{node}: certificate expired"));
            }
            () = cancel.cancelled() => {
                let _ = tx.send(CoordMsg::Bye);
                break Ok(());
            }
        };
        match msg {
            Ok(Some(AgentMsg::Bye)) | Ok(None) => break Ok(()),
            Ok(Some(AgentMsg::Hello(_))) => {}
            Ok(Some(AgentMsg::Renew { csr })) => {
                let too_soon = last_renewal.is_some_and(|t| t.elapsed() < MIN_RENEW_INTERVAL);
                last_renewal = Some(Instant::now());
                let answer = if too_soon {
                    CoordMsg::RenewRefused {
                        reason: "renewals are limited to one a second".into(),
                    }
                } else {
                    renew(shared, &node, &info, csr.as_slice())
                };
                let _ = tx.send(answer);
            }
            Ok(Some(msg)) => {
                let _ = shared.cmds.send(Cmd::Msg {
                    node: node.clone(),
                    id,
                    msg,
                });
            }
            Err(e) => break Err(format!("{node}: {e}")),
        }
    };
    let _ = shared.cmds.send(Cmd::Disconnected {
        node: node.clone(),
        id,
    });
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    conn.close(close.0.into(), close.1);
    info!(node = %node, "agent disconnected");
    result
}

/// A renewal: the same node and addresses as the certificate the session was opened with.
fn renew(shared: &Shared, node: &NodeId, info: &CertInfo, csr: &[u8]) -> CoordMsg {
    use shoal_agent::cluster::tls::Refusals as _;
    if shared.revocations.is_refused(node, &info.serial) {
        shared.metrics.renewal("refused");
        return CoordMsg::RenewRefused {
            reason: format!("node {node} is revoked"),
        };
    }
    // The session is closed when its certificate expires; this covers the moments before.
    if SystemTime::now() >= info.not_after {
        shared.metrics.renewal("refused");
        return CoordMsg::RenewRefused {
            reason: "the certificate of this session expired: enroll again".into(),
        };
    }
    match shared
        .ca
        .issue_node(csr, node, &info.ips, shared.cert_lifetime)
    {
        Ok(issued) => {
            let leaf = CertDer::new(issued.der.to_vec());
            let ca = CertDer::new(shared.ca.cert_der().to_vec());
            match (leaf, ca) {
                (Some(leaf), Some(ca)) => {
                    info!(node = %node, serial = %issued.serial, "certificate renewed");
                    shared.metrics.renewal("issued");
                    CoordMsg::Renewed { leaf, ca }
                }
                _ => {
                    shared.metrics.renewal("refused");
                    CoordMsg::RenewRefused {
                        reason: "certificate too large".into(),
                    }
                }
            }
        }
        Err(e) => {
            shared.metrics.renewal("refused");
            CoordMsg::RenewRefused {
                reason: e.to_string(),
            }
        }
    }
}

struct Session {
    id: u64,
    serial: String,
    hello: Hello,
    tx: mpsc::UnboundedSender<CoordMsg>,
    conn: quinn::Connection,
}

/// The tracker task. See the module documentation.
pub(super) async fn run_tracker(
    mut tracker: Tracker,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    revocations: Arc<Revocations>,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let start = Instant::now();
    let now = || Time::from_micros(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX));
    let to_instant = |t: Time| start + Duration::from_micros(t.as_micros());
    let mut sessions: HashMap<NodeId, Session> = HashMap::new();
    let mut refused: Vec<NodeId> = Vec::new();
    let mut refused_serials: Vec<Serial> = Vec::new();
    // Sessions replaced after a renewal, until they end: answers to what was sent on them.
    let mut retiring: HashMap<u64, mpsc::UnboundedSender<CoordMsg>> = HashMap::new();
    let mut revocation_poll = tokio::time::interval(REVOCATION_POLL);
    revocation_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let far = Duration::from_secs(3600);
    loop {
        let deadline = tracker
            .poll_timeout()
            .map(to_instant)
            .unwrap_or_else(|| Instant::now() + far);
        let mut recheck_refused = false;
        tokio::select! {
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { break };
                match cmd {
                    Cmd::Connected { node, id, serial, hello, tx, conn } => {
                        if let Some(old) = sessions.remove(&node) {
                            if old.serial != serial {
                                // The agent moves to a renewed certificate: the node's tracker
                                // state carries over, and the old session ends when the agent
                                // closes it (answers to what it sent there still reach it).
                                debug!(node = %node, old = %old.serial, new = %serial, "control session replaced after a renewal");
                                retiring.insert(old.id, old.tx);
                            } else {
                                // A reconnect before the old session was noticed dead: the new
                                // one wins, and the node starts over.
                                old.conn.close(0u32.into(), b"replaced by a newer session");
                                tracker.handle_disconnect(&node, now());
                            }
                        }
                        match tracker.handle_hello(&hello, now()) {
                            Ok(welcome) => {
                                let _ = tx.send(welcome);
                                let _ = tx.send(CoordMsg::RefusedNodes { nodes: refused.clone() });
                                let _ = tx.send(CoordMsg::RefusedSerials { serials: refused_serials.clone() });
                                sessions.insert(node, Session { id, serial, hello, tx, conn });
                            }
                            Err(e) => {
                                warn!(node = %node, error = %e, "hello refused");
                                let _ = tx.send(CoordMsg::Refused { reason: e.to_string() });
                            }
                        }
                    }
                    Cmd::Msg { node, id, msg } => {
                        // The node's current session, or the one it is leaving after a renewal.
                        let Some((s_tx, hello)) = sessions
                            .get(&node)
                            .filter(|s| s.id == id)
                            .map(|s| (s.tx.clone(), s.hello.clone()))
                            .or_else(|| {
                                let current = sessions.get(&node)?;
                                Some((retiring.get(&id)?.clone(), current.hello.clone()))
                            })
                        else {
                            continue;
                        };
                        match &msg {
                            AgentMsg::Locate { .. } => metrics.cluster_locate(),
                            AgentMsg::ReportBadPeer { peer, .. } => {
                                metrics.cluster_bad_peer_report();
                                info!(reporter = %node, peer = %peer, "bad peer reported");
                                recheck_refused = true;
                            }
                            _ => {}
                        }
                        // Count slots granted, not answers that repeat a slot already held.
                        let held_slot = match &msg {
                            AgentMsg::Locate { digest, .. } => tracker.seeders(digest).contains(&node),
                            _ => false,
                        };
                        let t = now();
                        let mut result = tracker.handle(&node, msg.clone(), t);
                        if let Err(TrackerError::UnknownNode(_)) = result {
                            // The tracker expired the node while its session lived on (a long
                            // stall): register it again and retry.
                            let _ = tracker.handle_hello(&hello, t);
                            result = tracker.handle(&node, msg, t);
                        }
                        match result {
                            Ok(Some(reply)) => {
                                if let CoordMsg::LocateReply(r) = &reply
                                    && r.origin
                                    && !held_slot
                                {
                                    metrics.cluster_origin_slot();
                                }
                                let _ = s_tx.send(reply);
                            }
                            Ok(None) => {}
                            Err(e) => debug!(node = %node, error = %e, "control message refused by the tracker"),
                        }
                    }
                    Cmd::Disconnected { node, id } => {
                        retiring.remove(&id);
                        if sessions.get(&node).is_some_and(|s| s.id == id) {
                            sessions.remove(&node);
                            tracker.handle_disconnect(&node, now());
                        }
                    }
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                tracker.poll_expire(now());
                recheck_refused = true;
            }
            _ = revocation_poll.tick() => {
                // A stat, and a read of a small file when it changed.
                if let Some(set) = revocations.reload_if_changed() {
                    let revoked: Vec<NodeId> = sessions
                        .iter()
                        .filter(|(n, s)| set.contains(n, &s.serial))
                        .map(|(n, _)| n.clone())
                        .collect();
                    for n in revoked {
                        if let Some(s) = sessions.remove(&n) {
                            warn!(node = %n, "closing the session of a revoked node");
                            let _ = s.tx.send(CoordMsg::Refused { reason: format!("node {n} is revoked") });
                            let conn = s.conn.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                conn.close(2u32.into(), b"revoked");
                            });
                            tracker.handle_disconnect(&n, now());
                        }
                    }
                    recheck_refused = true;
                }
            }
            () = cancel.cancelled() => break,
        }
        while let Some((node, msg)) = tracker.poll_transmit() {
            match &msg {
                CoordMsg::OriginSlot { granted: true, .. } => metrics.cluster_origin_slot(),
                CoordMsg::ManifestWanted { digest } => {
                    debug!(node = %node, %digest, "asking a holder for the blob's manifest");
                    metrics.cluster_manifest_asked();
                }
                _ => {}
            }
            if let Some(s) = sessions.get(&node) {
                let _ = s.tx.send(msg);
            }
        }
        if recheck_refused {
            let revoked = revocations.current();
            let lists = refusal_lists(revoked, tracker.quarantined_nodes(now()));
            let (nodes, serials) = (lists.nodes, lists.serials);
            if nodes != refused {
                if lists.nodes_left_out > 0 {
                    warn!(
                        sent = nodes.len(),
                        left_out = lists.nodes_left_out,
                        "too many refused nodes for one list: agents are not told about the rest"
                    );
                }
                refused = nodes;
                for s in sessions.values() {
                    let _ = s.tx.send(CoordMsg::RefusedNodes {
                        nodes: refused.clone(),
                    });
                }
            }
            if serials != refused_serials {
                if lists.serials_left_out > 0 {
                    warn!(
                        sent = serials.len(),
                        left_out = lists.serials_left_out,
                        "too many revoked serials for one list: agents are not told about the rest"
                    );
                }
                refused_serials = serials;
                for s in sessions.values() {
                    let _ = s.tx.send(CoordMsg::RefusedSerials {
                        serials: refused_serials.clone(),
                    });
                }
            }
        }
        metrics.cluster_nodes(sessions.len());
    }
    for s in sessions.values() {
        let _ = s.tx.send(CoordMsg::Bye);
    }
}

/// What agents are told to refuse (see [`refusal_lists`]).
#[derive(Debug, Default)]
struct RefusalLists {
    nodes: Vec<NodeId>,
    serials: Vec<Serial>,
    /// Refused nodes and revoked serials that did not fit.
    nodes_left_out: usize,
    serials_left_out: usize,
}

/// What agents are told to refuse, within the protocol's bounds: revoked nodes first, then
/// quarantined ones; revoked serials. What does not fit is left out (and counted): peers may
/// then accept those, while coordinators still refuse every revoked certificate.
fn refusal_lists(revoked: super::revoke::RevokedSet, quarantined: Vec<NodeId>) -> RefusalLists {
    let quarantined: BTreeSet<NodeId> = quarantined
        .into_iter()
        .filter(|n| !revoked.nodes.contains(n))
        .collect();
    let total = revoked.nodes.len() + quarantined.len();
    let mut nodes: Vec<NodeId> = revoked
        .nodes
        .into_iter()
        .chain(quarantined)
        .take(MAX_REFUSED_NODES)
        .collect();
    nodes.sort();
    // The revocation file's serials are normalised and at most 32 bytes, so every one parses.
    let parsed: Vec<Serial> = revoked
        .serials
        .iter()
        .filter_map(|s| Serial::new(s).ok())
        .collect();
    RefusalLists {
        nodes_left_out: total - nodes.len(),
        serials_left_out: parsed.len().saturating_sub(MAX_REFUSED_SERIALS),
        serials: parsed.into_iter().take(MAX_REFUSED_SERIALS).collect(),
        nodes,
    }
}

/// The bound address, for logs.
pub(super) fn describe(endpoint: &quinn::Endpoint) -> Option<SocketAddr> {
    endpoint.local_addr().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::revoke::RevokedSet;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    #[test]
    fn refusal_lists_put_revocations_first_and_count_what_does_not_fit() {
        let mut revoked = RevokedSet::default();
        revoked.nodes.insert(id("zz-revoked"));
        revoked.serials.insert("0a1b".into());
        let lists = refusal_lists(revoked.clone(), vec![id("a-quarantined"), id("zz-revoked")]);
        assert_eq!(lists.nodes, vec![id("a-quarantined"), id("zz-revoked")]);
        assert_eq!(lists.serials, vec![Serial::new("0a1b").unwrap()]);
        assert_eq!((lists.nodes_left_out, lists.serials_left_out), (0, 0));

        // Over the bound: every revoked node is kept, quarantined ones are left out first.
        let quarantined: Vec<NodeId> = (0..MAX_REFUSED_NODES)
            .map(|i| id(&format!("q{i:05}")))
            .collect();
        for i in 0..MAX_REFUSED_SERIALS + 3 {
            revoked.serials.insert(format!("{:08x}", i + 1));
        }
        let lists = refusal_lists(revoked, quarantined);
        assert_eq!(lists.nodes.len(), MAX_REFUSED_NODES);
        assert!(lists.nodes.contains(&id("zz-revoked")));
        assert_eq!(lists.nodes_left_out, 1);
        assert_eq!(lists.serials.len(), MAX_REFUSED_SERIALS);
        assert_eq!(lists.serials_left_out, 4);
        assert!(
            wire::encode(&CoordMsg::RefusedSerials {
                serials: lists.serials
            })
            .is_ok()
        );
    }

    #[test]
    fn renewal_is_refused_once_the_session_certificate_expired() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(ClusterCa::load_or_create(&dir.path().join("ca")).unwrap());
        let revocations = Arc::new(Revocations::load(dir.path().join("revoked")).unwrap());
        let (cmds, _rx) = mpsc::unbounded_channel();
        let shared = Shared {
            ca,
            revocations,
            cert_lifetime: Duration::from_secs(60),
            metrics: Metrics::new(),
            cmds,
        };
        let csr = || {
            let key = rcgen::KeyPair::generate().unwrap();
            rcgen::CertificateParams::new(Vec::<String>::new())
                .unwrap()
                .serialize_request(&key)
                .unwrap()
                .der()
                .to_vec()
        };
        let now = SystemTime::now();
        let mut info = CertInfo {
            identity: None,
            serial: "0a".into(),
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(60),
            ips: vec!["10.0.0.1".parse().unwrap()],
        };
        let node = id("node-1");
        assert!(matches!(
            renew(&shared, &node, &info, &csr()),
            CoordMsg::Renewed { .. }
        ));
        info.not_after = now - Duration::from_secs(1);
        match renew(&shared, &node, &info, &csr()) {
            CoordMsg::RenewRefused { reason } => assert!(reason.contains("expired"), "{reason}"),
            other => panic!("renewed with an expired certificate: {other:?}"),
        }
    }
}
