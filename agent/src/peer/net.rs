//! Connections: accepting peers (identity and refusal checks), connecting to them (one
//! connection per peer, reused), and dispatching each incoming stream by its first frame.
//!
//! When two peers dial each other at once, the connection the lower node id opened is kept
//! and the other closed with [`code::DUPLICATE`] (see [`keep_incoming`]).
//!
//! A connection lives no longer than the certificate the other side authenticated with: it is
//! closed when that certificate's `not_after` passes, and as soon as the cluster refuses the
//! certificate (its node, or its serial), whichever side opened it. A connection opened with a
//! certificate that was renewed since lasts until that one expires; the next use then opens a
//! new one (a new handshake, with the renewed certificate).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use shoal_proto::msg::{NodeId, PeerMsg};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::cluster::tls::{self, CertInfo};

use super::frames::{Expect, FrameError, FrameReader};
use super::{PeerInner, code, lock, serve, session};

/// How long a peer may take to send the first frame of a stream it opened.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Why no connection to a peer could be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("the cluster refuses {0}")]
    Refused(NodeId),
    #[error("connect to {node} at {addr}: {reason}")]
    Failed {
        node: NodeId,
        addr: SocketAddr,
        reason: String,
    },
    #[error("shutting down")]
    ShuttingDown,
}

pub(crate) async fn accept_loop(inner: Arc<PeerInner>) {
    loop {
        let incoming = tokio::select! {
            i = inner.endpoint.accept() => i,
            () = inner.closing.cancelled() => None,
        };
        let Some(incoming) = incoming else {
            return;
        };
        let inner = inner.clone();
        let remote = incoming.remote_address();
        tokio::spawn(
            async move {
                let connecting = match incoming.accept() {
                    Ok(c) => c,
                    Err(error) => {
                        debug!(%error, "incoming peer connection failed");
                        return;
                    }
                };
                let conn =
                    match tokio::time::timeout(inner.config.connect_timeout, connecting).await {
                        Ok(Ok(c)) => c,
                        Ok(Err(error)) => {
                            debug!(%error, "peer handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!("peer handshake timed out");
                            return;
                        }
                    };
                let (Some(node), Some(cert)) = (
                    inner.control.peer_identity(&conn),
                    tls::peer_cert_info(&conn),
                ) else {
                    warn!("peer connection without a node identity; closed");
                    conn.close(code::IDENTITY, b"no node identity");
                    return;
                };
                if inner.control.is_refused_certificate(&node, &cert.serial) {
                    warn!(peer = %node, serial = %cert.serial, "refused node connected; closed");
                    conn.close(code::REFUSED, b"refused");
                    return;
                }
                // The verifier's clock has whole seconds: it accepts a certificate during the
                // second of its `not_after`, when connections with it end.
                if SystemTime::now() >= cert.not_after {
                    debug!(peer = %node, "peer certificate at its end; closed");
                    conn.close(code::EXPIRED, b"certificate expired");
                    return;
                }
                if !keep_incoming(&inner, &node, &cert, &conn).await {
                    debug!(peer = %node, "both sides dialed; the peer's connection closed");
                    conn.close(code::DUPLICATE, b"duplicate connection");
                    return;
                }
                debug!(peer = %node, "peer connected");
                serve_connection(inner, node, cert, conn).await;
            }
            .instrument(info_span!("peer_conn", peer.addr = %remote)),
        );
    }
}

/// Records `conn`, just accepted from `node`, as the connection in use with it, or says that
/// it is a duplicate to close.
///
/// One connection per peer: an accepted connection becomes the one in use, unless the one in
/// use is authenticated by a certificate that lasts at least as long. When both peers dialed
/// each other at once, each holds its own dial and accepts the other's: the connection opened
/// by the lower node id is kept on both sides. That side closes the other's dial here, before
/// anything of its own used it; the other side switches to it here, and its sessions on its
/// own dial move over when the close arrives (see `download`). A dial of ours in progress is
/// waited for (its handshake is bounded), so that the choice sees it.
async fn keep_incoming(
    inner: &PeerInner,
    node: &NodeId,
    cert: &CertInfo,
    conn: &quinn::Connection,
) -> bool {
    let gate = inner.gate(node);
    // Past the bound, the choice is made without the dial's outcome.
    let _one = tokio::time::timeout(
        inner.config.connect_timeout + Duration::from_secs(1),
        gate.lock(),
    )
    .await;
    let mut conns = lock(&inner.conns);
    let lasts = |c: &quinn::Connection| {
        tls::peer_cert_info(c).is_some_and(|i| i.not_after >= cert.not_after)
    };
    match conns.get(node).filter(|c| c.close_reason().is_none()) {
        // Our own dial is the one kept: this one is the duplicate.
        Some(mine) if mine.side() == quinn::Side::Client && inner.node < *node && lasts(mine) => {
            return false;
        }
        // The peer's dial is the one kept (or ours is about to expire): ours serves what
        // already runs on it until the peer closes it.
        Some(mine) if mine.side() == quinn::Side::Client => {}
        // The peer dialed again while its earlier connection is still up here.
        Some(current) if lasts(current) => return true,
        _ => {}
    }
    conns.insert(node.clone(), conn.clone());
    true
}

impl PeerInner {
    /// The lock that one dial to `node` at a time holds.
    fn gate(&self, node: &NodeId) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.connecting)
            .entry(node.clone())
            .or_default()
            .clone()
    }

    /// The live connection to `node`, if any.
    pub(crate) fn connection(&self, node: &NodeId) -> Option<quinn::Connection> {
        lock(&self.conns)
            .get(node)
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    /// The connection to `node`, connecting to `addr` when there is none. Concurrent calls
    /// for one peer share one attempt.
    pub(crate) async fn connect(
        self: &Arc<Self>,
        node: &NodeId,
        addr: SocketAddr,
    ) -> Result<quinn::Connection, ConnectError> {
        if let Some(c) = self.connection(node) {
            return Ok(c);
        }
        if self.control.is_refused(node) {
            return Err(ConnectError::Refused(node.clone()));
        }
        let gate = self.gate(node);
        let _one = gate.lock().await;
        if let Some(c) = self.connection(node) {
            return Ok(c);
        }
        if self.closing.is_cancelled() {
            return Err(ConnectError::ShuttingDown);
        }
        let failed = |reason: String| ConnectError::Failed {
            node: node.clone(),
            addr,
            reason,
        };
        let mut cfg = self.control.peer_client_config();
        cfg.transport_config(self.transport.clone());
        let connecting = self
            .endpoint
            .connect_with(cfg, addr, node.as_str())
            .map_err(|e| failed(e.to_string()))?;
        let conn = match tokio::time::timeout(self.config.connect_timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(failed(e.to_string())),
            Err(_) => return Err(failed("handshake timed out".into())),
        };
        let cert = match tls::peer_cert_info(&conn) {
            Some(cert) if self.control.peer_identity(&conn).as_ref() == Some(node) => cert,
            _ => {
                conn.close(code::IDENTITY, b"unexpected identity");
                return Err(failed("the certificate names another node".into()));
            }
        };
        if self.control.is_refused_certificate(node, &cert.serial) {
            conn.close(code::REFUSED, b"refused");
            return Err(ConnectError::Refused(node.clone()));
        }
        if SystemTime::now() >= cert.not_after {
            conn.close(code::EXPIRED, b"certificate expired");
            return Err(failed("the peer's certificate expired".into()));
        }
        lock(&self.conns).insert(node.clone(), conn.clone());
        debug!(peer = %node, %addr, "connected to peer");
        let inner = self.clone();
        let (n, c) = (node.clone(), conn.clone());
        tokio::spawn(
            async move { serve_connection(inner, n, cert, c).await }
                // Its own root span: the connection outlives the download that opened it.
                .instrument(info_span!(parent: None, "peer_conn", peer = %node, peer.addr = %addr)),
        );
        Ok(conn)
    }
}

/// Accepts the streams `node` opens on `conn` until the connection ends, which is at the latest
/// when `cert` (the peer's) expires or is refused.
async fn serve_connection(
    inner: Arc<PeerInner>,
    node: NodeId,
    cert: CertInfo,
    conn: quinn::Connection,
) {
    let expired = tls::expired(cert.not_after);
    tokio::pin!(expired);
    let mut changes = inner.control.refusal_changes();
    loop {
        let stream = tokio::select! {
            s = conn.accept_bi() => s,
            () = &mut expired => {
                info!(peer = %node, serial = %cert.serial, "the peer's certificate expired; connection closed");
                conn.close(code::EXPIRED, b"certificate expired");
                break;
            }
            () = refusals_changed(&mut changes) => {
                if inner.control.is_refused_certificate(&node, &cert.serial) {
                    warn!(peer = %node, serial = %cert.serial, "the cluster now refuses this peer; closing");
                    conn.close(code::REFUSED, b"refused");
                    break;
                }
                continue;
            }
            () = inner.closing.cancelled() => break,
        };
        let (send, recv) = match stream {
            Ok(s) => s,
            Err(error) => {
                debug!(peer = %node, %error, "peer connection ended");
                break;
            }
        };
        if inner.control.is_refused_certificate(&node, &cert.serial) {
            warn!(peer = %node, serial = %cert.serial, "the cluster now refuses this peer; closing");
            conn.close(code::REFUSED, b"refused");
            break;
        }
        tokio::spawn(handle_stream(
            inner.clone(),
            node.clone(),
            conn.clone(),
            send,
            recv,
        ));
    }
    let mut conns = lock(&inner.conns);
    if conns
        .get(&node)
        .is_some_and(|c| c.stable_id() == conn.stable_id())
    {
        conns.remove(&node);
    }
}

/// Resolves when the refusal lists change; never without a source of changes (or once it is
/// gone).
async fn refusals_changed(changes: &mut Option<watch::Receiver<()>>) {
    if let Some(rx) = changes.as_mut()
        && rx.changed().await.is_ok()
    {
        return;
    }
    *changes = None;
    std::future::pending().await
}

/// Whether the peer closed `conn` as the duplicate of a simultaneous dial.
pub(crate) fn closed_as_duplicate(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == code::DUPLICATE
    )
}

/// Closes `conn` for a protocol violation, with a log line naming it.
pub(crate) fn protocol_violation(conn: &quinn::Connection, node: &NodeId, what: &str) {
    warn!(peer = %node, reason = what, "peer broke the protocol; connection closed");
    conn.close(code::PROTOCOL, b"protocol violation");
}

async fn handle_stream(
    inner: Arc<PeerInner>,
    node: NodeId,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let mut reader = FrameReader::new(recv);
    let first = tokio::time::timeout(
        FIRST_FRAME_TIMEOUT,
        reader.next(Expect::CONTROL, None, &mut |_| {}),
    )
    .await;
    let first = match first {
        Err(_) => {
            debug!(peer = %node, "stream without a first frame; dropped");
            return;
        }
        Ok(Err(FrameError::Protocol(what))) => return protocol_violation(&conn, &node, &what),
        Ok(Err(error)) => {
            debug!(peer = %node, %error, "stream failed before its first frame");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Ok(Some(m))) => m,
    };
    match first {
        PeerMsg::Request { digest, piece } => {
            serve::serve_request(&inner, &node, &conn, send, reader, digest, piece).await;
        }
        PeerMsg::Have { digest, have } => {
            session::accept_session(&inner, node, conn, send, reader, digest, have).await;
        }
        other => protocol_violation(
            &conn,
            &node,
            &format!(
                "a stream must start with Have or Request, not {}",
                kind_name(&other)
            ),
        ),
    }
}

pub(crate) fn kind_name(m: &PeerMsg) -> &'static str {
    match m {
        PeerMsg::Have { .. } => "Have",
        PeerMsg::HavePiece { .. } => "HavePiece",
        PeerMsg::Request { .. } => "Request",
        PeerMsg::Piece { .. } => "Piece",
        PeerMsg::Reject { .. } => "Reject",
        PeerMsg::Cancel { .. } => "Cancel",
    }
}
