//! Control sessions (`shoal-ctl/1`): one task per configured coordinator keeps a QUIC
//! connection up (reconnecting with backoff), sends `Hello`, heartbeats and periodic
//! announcements, and routes what the coordinator sends; one task keeps the node's
//! certificate valid (renewal over any control session, enrollment when there is none).
//!
//! Each session is one bidirectional stream: `AgentMsg` frames up, `CoordMsg` frames down,
//! decoded with the bounded [`wire::Decoder`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use shoal_proto::msg::{
    AgentMsg, Announce, CoordMsg, CsrDer, Hello, MAX_ANNOUNCE_DIGESTS, MAX_ANNOUNCE_PARTIALS,
    PROTOCOL_VERSION,
};
use shoal_proto::wire::{self, Decoder};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::config::ClusterConfig;
use super::identity::{self, Loaded};
use super::{ClusterError, Inner, Session, tls};

/// How long a renewal waits for the coordinator's answer.
const RENEW_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a control session replaced after a renewal is still read (for answers to requests
/// sent on it before the switch).
const HANDOVER_DRAIN: Duration = Duration::from_secs(5);

static SESSION_IDS: AtomicU64 = AtomicU64::new(1);

/// `d` plus up to a quarter of it, so agents restarted together do not reconnect in step.
pub(super) fn jitter(d: Duration) -> Duration {
    d + d.mul_f64(rand::random::<f64>() / 4.0)
}

/// Splits an announcement into messages within the protocol's bounds.
pub(super) fn chunk_announce(a: Announce) -> Vec<Announce> {
    let mut out = Vec::new();
    let mut complete = a.complete.into_iter().peekable();
    let mut partial = a.partial.into_iter().peekable();
    while complete.peek().is_some() || partial.peek().is_some() {
        out.push(Announce {
            complete: complete.by_ref().take(MAX_ANNOUNCE_DIGESTS).collect(),
            partial: partial.by_ref().take(MAX_ANNOUNCE_PARTIALS).collect(),
        });
    }
    out
}

/// The client endpoint of the control sessions, bound to the advertised address's IP when it
/// is local (so coordinators see the node's own address), else to the wildcard.
pub(super) fn client_endpoint(cfg: &ClusterConfig) -> Result<quinn::Endpoint, ClusterError> {
    let ip = cfg.advertise.ip();
    let wildcard = match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    quinn::Endpoint::client(SocketAddr::new(ip, 0))
        .or_else(|_| quinn::Endpoint::client(SocketAddr::new(wildcard, 0)))
        .map_err(|e| ClusterError::Internal(format!("cannot bind the control endpoint: {e}")))
}

async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{addr} resolves to no address"))
}

/// Keeps the session with coordinator `idx` up until shutdown. `first` is told when the first
/// attempt is over, whatever its outcome.
pub(super) async fn run_link(
    inner: Arc<Inner>,
    endpoint: quinn::Endpoint,
    idx: usize,
    first: oneshot::Sender<()>,
) {
    let mut first = Some(first);
    let timers = inner.cfg.timers.clone();
    let name = inner.links[idx].addr.name.clone();
    let mut delay = timers.reconnect_min;
    let mut retiring: Option<Retiring> = None;
    loop {
        if inner.cancel.is_cancelled() {
            break;
        }
        if inner.current().is_none() {
            // Nothing to authenticate with yet: wait for enrollment.
            if let Some(f) = first.take() {
                let _ = f.send(());
            }
            tokio::select! {
                () = inner.identity_changed.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = inner.cancel.cancelled() => break,
            }
            continue;
        }
        let result = session(&inner, &endpoint, idx, &mut first, retiring.take()).await;
        if let Some(f) = first.take() {
            let _ = f.send(());
        }
        match result {
            // A new session takes over at once; the old one stays up meanwhile.
            Ok(Ended::Renewed(old)) => {
                retiring = Some(old);
                delay = timers.reconnect_min;
                continue;
            }
            Ok(Ended::Down) => delay = timers.reconnect_min,
            Ok(Ended::NotUp) => {}
            Err(e) => debug!(coordinator = %name, error = %e, "control connection attempt failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(jitter(delay)) => {}
            () = inner.cancel.cancelled() => break,
        }
        delay = (delay * 2).min(timers.reconnect_max);
    }
    if let Some(old) = retiring {
        old.abandon(&inner, idx);
    }
    endpoint.wait_idle().await;
}

async fn read_msg(
    recv: &mut quinn::RecvStream,
    dec: &mut Decoder<CoordMsg>,
    buf: &mut Vec<u8>,
) -> Result<CoordMsg, String> {
    loop {
        if !buf.is_empty() {
            let mut input = &buf[..];
            let r = dec.decode(&mut input);
            let used = buf.len() - input.len();
            buf.drain(..used);
            match r {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(e) => return Err(format!("bad frame: {e}")),
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        match recv.read(&mut chunk).await {
            Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(None) => return Err("the coordinator closed the stream".into()),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// How a session ended.
enum Ended {
    /// Shutdown before it came up.
    NotUp,
    /// It was up and went down.
    Down,
    /// It was up when this node's certificate was renewed: a new session (a new handshake,
    /// with the new certificate) is to take over from this one, which stays registered on its
    /// link meanwhile so requests keep flowing.
    Renewed(Retiring),
}

/// A session being replaced after a renewal: still the link's session until its successor
/// is up, then drained (answers to requests sent before the switch) and closed.
struct Retiring {
    sid: u64,
    conn: quinn::Connection,
    recv: quinn::RecvStream,
    dec: Decoder<CoordMsg>,
    buf: Vec<u8>,
    writer: JoinHandle<()>,
}

impl Retiring {
    /// No successor came up: the session ends like any other (and the digests it owned move).
    fn abandon(self, inner: &Inner, idx: usize) {
        let link = &inner.links[idx];
        let was_current = {
            let mut s = link.session();
            let current = s.as_ref().is_some_and(|s| s.id == self.sid);
            if current {
                *s = None;
            }
            current
        };
        self.writer.abort();
        self.conn.close(0u32.into(), b"bye");
        if was_current && !inner.cancel.is_cancelled() {
            warn!(coordinator = %link.addr.name, "control channel down (no new session after the certificate renewal)");
            inner.reannounce_all();
        }
    }

    /// After the successor took over (and with it the waiters of this session's requests):
    /// reads what the coordinator still sends here until it ends the stream, then closes.
    async fn drain(mut self, inner: Arc<Inner>, idx: usize) {
        let read = async {
            loop {
                match read_msg(&mut self.recv, &mut self.dec, &mut self.buf).await {
                    // The successor has the current lists; an older one must not replace them.
                    Ok(CoordMsg::RefusedNodes { .. } | CoordMsg::RefusedSerials { .. }) => {}
                    Ok(CoordMsg::Bye | CoordMsg::Refused { .. }) | Err(_) => break,
                    Ok(msg) => {
                        handle(&inner, idx, msg);
                    }
                }
            }
        };
        let _ = tokio::time::timeout(HANDOVER_DRAIN, read).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.writer).await;
        self.conn.close(0u32.into(), b"renewed");
        debug!(coordinator = %inner.links[idx].addr.name, "control session opened with the previous certificate closed");
    }
}

/// One session. `Ok(Ended::Down)`: it was up and ended; `Ok(Ended::NotUp)`: shutdown before it
/// came up; `Ok(Ended::Renewed)`: see [`Ended`]; `Err`: it never came up. With `old`, this
/// session replaces that one once up (or ends it, if it cannot come up).
async fn session(
    inner: &Arc<Inner>,
    endpoint: &quinn::Endpoint,
    idx: usize,
    first: &mut Option<oneshot::Sender<()>>,
    mut old: Option<Retiring>,
) -> Result<Ended, String> {
    let link = &inner.links[idx];
    let name = link.addr.name.clone();
    let timers = &inner.cfg.timers;
    let deadline = tokio::time::Instant::now() + timers.connect_timeout;
    // The certificate the handshake presents (the slot is read during the handshake; a renewal
    // in between only costs one more switch).
    let mut serial_rx = inner.serial.subscribe();
    let serial = serial_rx.borrow_and_update().clone().unwrap_or_default();
    let setup = async {
        let addr = resolve(&link.addr.ctl_addr).await?;
        let conn = endpoint
            .connect_with(inner.ctl_client.clone(), addr, name.as_str())
            .map_err(|e| format!("connect to {addr}: {e}"))?
            .await
            .map_err(|e| format!("handshake with {addr}: {e}"))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("stream: {e}"))?;
        let hello = AgentMsg::Hello(Hello {
            node: inner.cfg.node.clone(),
            zone: inner.cfg.zone.clone(),
            version: PROTOCOL_VERSION,
            peer_addr: inner.cfg.advertise,
        });
        let frame = wire::encode(&hello).map_err(|e| e.to_string())?;
        send.write_all(&frame)
            .await
            .map_err(|e| format!("send hello: {e}"))?;
        let mut dec = Decoder::<CoordMsg>::new();
        let mut buf = Vec::new();
        let welcome = read_msg(&mut recv, &mut dec, &mut buf).await?;
        Ok::<_, String>((conn, send, recv, dec, buf, welcome))
    };
    let setup = tokio::select! {
        r = tokio::time::timeout_at(deadline, setup) => r.unwrap_or_else(|_| Err("timed out".to_owned())),
        () = inner.cancel.cancelled() => {
            if let Some(o) = old.take() {
                o.abandon(inner, idx);
            }
            return Ok(Ended::NotUp);
        }
    };
    let (conn, mut send, mut recv, mut dec, mut buf, welcome) = match setup {
        Ok(up) => up,
        Err(e) => {
            if let Some(o) = old.take() {
                o.abandon(inner, idx);
            }
            return Err(e);
        }
    };
    let (heartbeat, announce) = match welcome {
        CoordMsg::Welcome {
            heartbeat_ms,
            announce_ms,
            ..
        } => (
            Duration::from_millis(u64::from(heartbeat_ms).max(100)),
            Duration::from_millis(u64::from(announce_ms).max(1000)),
        ),
        other => {
            if let Some(o) = old.take() {
                o.abandon(inner, idx);
            }
            if let CoordMsg::Refused { reason } = other {
                warn!(coordinator = %name, %reason, "the coordinator refused the control session");
                conn.close(0u32.into(), b"refused");
                return Err(format!("refused: {reason}"));
            }
            return Err(format!("expected Welcome, got {other:?}"));
        }
    };
    // The coordinator's certificate was verified in the handshake; the session ends with it.
    let coordinator_not_after = tls::peer_cert_info(&conn).map(|i| i.not_after);

    // Up. A session that replaces one takes over the waiters of its requests: their answers
    // still arrive on the old stream, which is drained.
    let sid = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel::<AgentMsg>();
    {
        let mut s = link.session();
        let pending = s.take().map(|prev| prev.pending).unwrap_or_default();
        *s = Some(Session {
            id: sid,
            serial: serial.clone(),
            tx,
            pending,
            conn: conn.clone(),
        });
    }
    info!(coordinator = %name, remote = %conn.remote_address(), serial = %serial, "control channel up");
    if let Some(f) = first.take() {
        let _ = f.send(());
    }
    match old.take() {
        None => inner.reannounce_all(),
        Some(o) => {
            // Who owns which digest did not change (the link stayed up): only this
            // coordinator hears the inventory again, in case it did not keep its state.
            if let Some(part) = inner.inventory_for(idx) {
                for a in chunk_announce(part) {
                    link.send(AgentMsg::Announce(a));
                }
            }
            tokio::spawn(o.drain(inner.clone(), idx));
        }
    }
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let bye = matches!(msg, AgentMsg::Bye);
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
            if bye {
                break;
            }
        }
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    });

    let coordinator_expired = async {
        match coordinator_not_after {
            Some(t) => tls::expired(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(coordinator_expired);
    let mut hb = tokio::time::interval(heartbeat);
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    hb.tick().await;
    let mut ann = tokio::time::interval(announce);
    ann.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ann.tick().await;
    let mut renewed = false;
    let reason = loop {
        tokio::select! {
            r = read_msg(&mut recv, &mut dec, &mut buf) => match r {
                Ok(msg) => {
                    if let Some(end) = handle(inner, idx, msg) {
                        break end;
                    }
                }
                Err(e) => break e,
            },
            _ = hb.tick() => {
                link.send(AgentMsg::Heartbeat { load: inner.load.load(Ordering::Relaxed) });
            }
            _ = ann.tick() => {
                if let Some(part) = inner.inventory_for(idx) {
                    for a in chunk_announce(part) {
                        link.send(AgentMsg::Announce(a));
                    }
                }
            }
            r = serial_rx.changed() => {
                let now = serial_rx.borrow_and_update().clone();
                if r.is_ok() && now.is_some_and(|s| s != serial) {
                    renewed = true;
                    break "renewed".to_owned();
                }
            }
            () = &mut coordinator_expired => {
                break "the coordinator's certificate expired".to_owned();
            }
            () = inner.cancel.cancelled() => {
                link.send(AgentMsg::Bye);
                break "shutting down".to_owned();
            }
        }
    };

    if renewed {
        // The coordinator ends sessions whose certificate expired: move to the new one now,
        // without a gap (this session stays the link's until the next one is up).
        debug!(coordinator = %name, "certificate renewed: opening a control session with it");
        return Ok(Ended::Renewed(Retiring {
            sid,
            conn,
            recv,
            dec,
            buf,
            writer,
        }));
    }
    // Down.
    {
        let mut s = link.session();
        if s.as_ref().is_some_and(|s| s.id == sid) {
            *s = None;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    conn.close(0u32.into(), b"bye");
    if inner.cancel.is_cancelled() {
        info!(coordinator = %name, "control channel closed");
    } else {
        warn!(coordinator = %name, %reason, "control channel down");
        inner.reannounce_all();
    }
    Ok(Ended::Down)
}

/// Routes one message; `Some(reason)` ends the session.
fn handle(inner: &Inner, idx: usize, msg: CoordMsg) -> Option<String> {
    match msg {
        CoordMsg::LocateReply(r) => {
            let waiter = inner.links[idx]
                .session()
                .as_mut()
                .and_then(|s| s.pending.remove(&r.req));
            if let Some(w) = waiter {
                let _ = w.send(r);
            }
        }
        CoordMsg::OriginSlot { ref digest, .. } => inner.dispatch(&digest.clone(), msg),
        CoordMsg::Hashes(ref h) => inner.dispatch(&h.digest.clone(), msg),
        CoordMsg::ManifestWanted { digest } => inner.answer_manifest(idx, &digest),
        CoordMsg::RefusedNodes { nodes } => {
            debug!(coordinator = %inner.links[idx].addr.name, count = nodes.len(), "refused nodes updated");
            inner.refused.set_nodes(idx, nodes);
        }
        CoordMsg::RefusedSerials { serials } => {
            debug!(coordinator = %inner.links[idx].addr.name, count = serials.len(), "refused certificates updated");
            inner.refused.set_serials(idx, serials);
        }
        CoordMsg::Renewed { .. } | CoordMsg::RenewRefused { .. } => {
            if let Some(tx) = inner
                .renewals
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
            {
                let _ = tx.send(msg);
            }
        }
        CoordMsg::Welcome { .. } => {}
        CoordMsg::Bye => return Some("the coordinator said bye".into()),
        CoordMsg::Refused { reason } => {
            warn!(coordinator = %inner.links[idx].addr.name, %reason, "the coordinator ended the session");
            return Some(format!("refused: {reason}"));
        }
    }
    None
}

/// Keeps the node's certificate valid: enrolls while there is none, renews at two thirds of
/// its life over any control session, and enrolls again if it expires unrenewed.
pub(super) async fn keep_identity(
    inner: Arc<Inner>,
    mut answers: mpsc::UnboundedReceiver<CoordMsg>,
) {
    let mut retry = Duration::from_secs(1);
    loop {
        if inner.cancel.is_cancelled() {
            return;
        }
        let Some(id) = inner.current() else {
            match inner.enroll_until_done().await {
                Ok(()) => continue,
                Err(e) => {
                    if inner.cancel.is_cancelled() {
                        return;
                    }
                    tracing::error!(error = %e, "cannot enroll in the cluster; peer sharing is off until it succeeds");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(60)) => {}
                        () = inner.cancel.cancelled() => return,
                    }
                    continue;
                }
            }
        };
        let wait = id
            .info
            .renew_at()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if !wait.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = inner.identity_changed.notified() => continue,
                () = inner.cancel.cancelled() => return,
            }
        }
        match renew(&inner, &mut answers).await {
            Ok(new) => {
                info!(
                    serial = %new.info.serial,
                    not_after = ?new.info.not_after,
                    "cluster certificate renewed"
                );
                if let Err(e) = inner.install(new, true) {
                    warn!(error = %e, "cannot store the renewed certificate");
                }
                retry = Duration::from_secs(1);
                continue;
            }
            Err(e) => warn!(error = %e, "certificate renewal failed"),
        }
        let now = SystemTime::now();
        let slack = inner.cfg.timers.connect_timeout * 2;
        if !id.info.is_valid_at(now, slack) && inner.cfg.bootstrap_token.is_some() {
            // About to expire with no coordinator to renew it: enroll again.
            match inner.enroll_until_done().await {
                Ok(()) => continue,
                Err(e) => warn!(error = %e, "enrolling again failed"),
            }
        }
        // Retry well before expiry: at most a tenth of what is left, at least a second.
        let left = id.info.not_after.duration_since(now).unwrap_or_default();
        let pause = retry.min(left / 10).max(Duration::from_millis(500));
        retry = (retry * 2).min(Duration::from_secs(60));
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = inner.cancel.cancelled() => return,
        }
    }
}

/// Asks any coordinator with a session up for a certificate for a fresh key.
async fn renew(
    inner: &Inner,
    answers: &mut mpsc::UnboundedReceiver<CoordMsg>,
) -> Result<Loaded, String> {
    while answers.try_recv().is_ok() {}
    let key = identity::new_key(&inner.cfg.node).map_err(|e| e.to_string())?;
    let csr = CsrDer::new(key.csr_der.clone()).ok_or("the CSR is too large")?;
    let sent = inner
        .links
        .iter()
        .any(|l| l.send(AgentMsg::Renew { csr: csr.clone() }));
    if !sent {
        return Err("no coordinator is connected".into());
    }
    let answer = tokio::time::timeout(RENEW_TIMEOUT, answers.recv())
        .await
        .map_err(|_| "no answer from the coordinator".to_owned())?
        .ok_or("shutting down")?;
    match answer {
        CoordMsg::Renewed { leaf, ca } => {
            let ca = CertificateDer::from(ca.into_vec());
            if inner.trust.ca().as_ref() != Some(&ca) {
                return Err("the renewed certificate comes from another CA".into());
            }
            Loaded::from_new(
                &inner.cfg.node,
                &key,
                CertificateDer::from(leaf.into_vec()),
                ca,
                inner.trust.provider(),
            )
            .map_err(|e| e.to_string())
        }
        CoordMsg::RenewRefused { reason } => Err(format!("refused: {reason}")),
        other => Err(format!("unexpected answer {other:?}")),
    }
}
