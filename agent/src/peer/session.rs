//! Sessions: per blob and connection, the stream on which two peers tell each other which
//! pieces they hold (`Have` first, then `HavePiece` as pieces get verified). And the [`Hub`]
//! of a download in progress, through which its sessions, the requests it serves and the
//! download loop meet.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use shoal_proto::Digest;
use shoal_proto::msg::{NodeId, PeerMsg, RejectReason};
use shoal_proto::piece::{Bitmap, Geometry, MAX_PIECES};
use shoal_proto::swarm::UploadSlots;
use tokio::sync::{broadcast, mpsc};
use tracing::{debug, trace};

use super::download::Input;
use super::frames::{Expect, FrameError, FrameReader, write_msg};
use super::net::{kind_name, protocol_violation};
use super::{PeerInner, lock};
use crate::store::PieceIngest;

/// How long the other side may take to answer a session's opening `Have`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// `HavePiece` announcements buffered per session before it falls back to a full `Have`.
const ANNOUNCE_BUFFER: usize = 1024;

/// A download in progress as the rest of the peer module sees it.
pub(crate) struct Hub {
    digest: Digest,
    /// Set once the geometry is known (the store claim is taken then).
    ingest: OnceLock<Arc<PieceIngest>>,
    inputs: mpsc::UnboundedSender<Input>,
    /// Newly held pieces, for every session; `None` once the download is over.
    announce: Mutex<Option<broadcast::Sender<u32>>>,
    /// Spreading state while this agent holds the blob's origin slot.
    spread: Mutex<Option<UploadSlots<NodeId>>>,
}

impl Hub {
    pub(crate) fn new(digest: Digest, inputs: mpsc::UnboundedSender<Input>) -> Hub {
        Hub {
            digest,
            ingest: OnceLock::new(),
            inputs,
            announce: Mutex::new(Some(broadcast::channel(ANNOUNCE_BUFFER).0)),
            spread: Mutex::new(None),
        }
    }

    pub(crate) fn digest(&self) -> &Digest {
        &self.digest
    }

    pub(crate) fn set_ingest(&self, ingest: Arc<PieceIngest>) {
        let _ = self.ingest.set(ingest);
    }

    pub(crate) fn ingest(&self) -> Option<&Arc<PieceIngest>> {
        self.ingest.get()
    }

    pub(crate) fn geometry(&self) -> Option<Geometry> {
        self.ingest.get().and_then(|i| i.geometry())
    }

    /// The held pieces as a `Have` bitmap (empty while the geometry is unknown).
    pub(crate) fn have_for_wire(&self) -> Bitmap {
        match (self.ingest.get(), self.geometry()) {
            (Some(i), Some(g)) if g.count() <= MAX_PIECES => i.held(),
            _ => Bitmap::new(0),
        }
    }

    /// Tells every session that `piece` is now held.
    pub(crate) fn announce(&self, piece: u32) {
        if let Some(tx) = lock(&self.announce).as_ref() {
            let _ = tx.send(piece);
        }
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<u32>> {
        lock(&self.announce)
            .as_ref()
            .map(broadcast::Sender::subscribe)
    }

    /// The download is over: sessions finish.
    pub(crate) fn close(&self) {
        lock(&self.announce).take();
    }

    fn input(&self, i: Input) {
        // The download may have ended; then nobody needs to know.
        let _ = self.inputs.send(i);
    }

    /// Turns spreading on (holding the origin slot: pieces leave this agent about once each
    /// while others are unsent) or off.
    pub(crate) fn set_spreading(&self, on: bool) {
        let count = self.geometry().map(|g| g.count());
        let mut spread = lock(&self.spread);
        match (on, count) {
            (true, Some(n)) => {
                let s = spread.get_or_insert_with(|| UploadSlots::new(u32::MAX, u32::MAX));
                s.spread(Some(n));
            }
            _ => *spread = None,
        }
    }

    pub(crate) fn spreading(&self) -> bool {
        lock(&self.spread).is_some()
    }

    pub(crate) fn admit_spread(
        &self,
        node: &NodeId,
        piece: u32,
        have: &Bitmap,
    ) -> Result<(), RejectReason> {
        match lock(&self.spread).as_mut() {
            Some(s) => s.try_admit(node, piece, have),
            None => Ok(()),
        }
    }

    pub(crate) fn release_spread(&self, node: &NodeId) {
        if let Some(s) = lock(&self.spread).as_mut() {
            s.release(node);
        }
    }
}

/// Opens a session on `hub`'s blob with `node` over `conn` and runs it until either side
/// ends it. The download loop hears `SessionUp` (with the peer's pieces) and `SessionDown`.
pub(crate) async fn open_session(
    inner: Arc<PeerInner>,
    hub: Arc<Hub>,
    node: NodeId,
    conn: quinn::Connection,
) {
    let id = inner.sessions.fetch_add(1, Ordering::Relaxed);
    let opened = async {
        let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let updates = hub.subscribe().ok_or("download over")?;
        let have = PeerMsg::Have {
            digest: hub.digest.clone(),
            have: hub.have_for_wire(),
        };
        write_msg(&mut send, &have)
            .await
            .map_err(|e| e.to_string())?;
        let mut reader = FrameReader::new(recv);
        let answer = tokio::time::timeout(
            ANSWER_TIMEOUT,
            reader.next(Expect::CONTROL, None, &mut |_| {}),
        )
        .await
        .map_err(|_| "no answer to Have".to_owned())?;
        match answer {
            Ok(Some(PeerMsg::Have { digest, have })) if digest == hub.digest => {
                Ok(Some((send, reader, updates, have)))
            }
            Ok(Some(PeerMsg::Reject {
                digest,
                reason:
                    RejectReason::UnknownBlob | RejectReason::ShuttingDown | RejectReason::Forbidden,
                ..
            })) if digest == hub.digest => Ok(None),
            Ok(Some(other)) => {
                protocol_violation(
                    &conn,
                    &node,
                    &format!("{} in answer to Have", kind_name(&other)),
                );
                Err("protocol violation".to_owned())
            }
            Ok(None) => Err("session closed before its answer".to_owned()),
            Err(FrameError::Protocol(what)) => {
                protocol_violation(&conn, &node, &what);
                Err(what)
            }
            Err(e) => Err(e.to_string()),
        }
    };
    match opened.await {
        Ok(Some((send, reader, updates, have))) => {
            hub.input(Input::SessionUp {
                peer: node.clone(),
                have: have.clone(),
                session: id,
            });
            let s = Session {
                inner: &inner,
                hub: Some(&hub),
                digest: &hub.digest,
                node: &node,
                conn: &conn,
            };
            s.run(send, reader, Some(updates), have).await;
            hub.input(Input::SessionDown {
                peer: node,
                session: id,
            });
        }
        Ok(None) => {
            trace!(peer = %node, digest = %hub.digest, "peer does not know the blob (yet)");
            hub.input(Input::SessionDown {
                peer: node,
                session: id,
            });
        }
        Err(error) => {
            debug!(peer = %node, digest = %hub.digest, %error, "session failed to open");
            hub.input(Input::SessionDown {
                peer: node,
                session: id,
            });
        }
    }
}

/// A session `node` opened with `Have { digest, have }`.
pub(crate) async fn accept_session(
    inner: &Arc<PeerInner>,
    node: NodeId,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    reader: FrameReader,
    digest: Digest,
    have: Bitmap,
) {
    if let Some(hub) = inner.hub(&digest)
        && let Some(updates) = hub.subscribe()
    {
        let id = inner.sessions.fetch_add(1, Ordering::Relaxed);
        let mine = PeerMsg::Have {
            digest,
            have: hub.have_for_wire(),
        };
        if write_msg(&mut send, &mine).await.is_err() {
            return;
        }
        hub.input(Input::SessionUp {
            peer: node.clone(),
            have: have.clone(),
            session: id,
        });
        let s = Session {
            inner,
            hub: Some(&hub),
            digest: &hub.digest,
            node: &node,
            conn: &conn,
        };
        s.run(send, reader, Some(updates), have).await;
        hub.input(Input::SessionDown {
            peer: node,
            session: id,
        });
        return;
    }
    let Some(g) = complete_geometry(inner, &digest) else {
        let reject = PeerMsg::Reject {
            digest,
            piece: 0,
            reason: RejectReason::UnknownBlob,
        };
        let _ = write_msg(&mut send, &reject).await;
        let _ = send.finish();
        return;
    };
    let mine = PeerMsg::Have {
        digest: digest.clone(),
        have: Bitmap::full(g.count()),
    };
    if write_msg(&mut send, &mine).await.is_err() {
        return;
    }
    let s = Session {
        inner,
        hub: None,
        digest: &digest,
        node: &node,
        conn: &conn,
    };
    s.run(send, reader, None, have).await;
}

/// The geometry of `digest` when the store holds it whole and it can be shared.
fn complete_geometry(inner: &PeerInner, digest: &Digest) -> Option<Geometry> {
    inner
        .store
        .blob_size(digest)
        .map(Geometry::for_size)
        .filter(|g| g.count() <= MAX_PIECES)
}

/// One established session, from either side.
struct Session<'a> {
    inner: &'a PeerInner,
    /// The download of the blob, while it runs here.
    hub: Option<&'a Hub>,
    digest: &'a Digest,
    node: &'a NodeId,
    conn: &'a quinn::Connection,
}

impl Session<'_> {
    /// Both directions until the session ends: when either side ends it, when this side's
    /// download fails, or once both sides hold the whole blob (neither needs the other's
    /// announcements any more). While only one side is complete the session stays open, so
    /// the other keeps it as a source.
    async fn run(
        &self,
        mut send: quinn::SendStream,
        mut reader: FrameReader,
        mut updates: Option<broadcast::Receiver<u32>>,
        their_first: Bitmap,
    ) {
        let digest = self.digest;
        let mut theirs = (!their_first.is_empty()).then_some(their_first);
        let mut mine_complete = self.hub.is_none();
        let mut ignore = |_: usize| {};
        loop {
            let their_complete = theirs.as_ref().is_some_and(Bitmap::is_complete);
            if mine_complete && their_complete {
                break;
            }
            tokio::select! {
                frame = reader.next(Expect::CONTROL, None, &mut ignore) => match frame {
                    Ok(Some(PeerMsg::HavePiece { digest: d, piece })) if &d == digest => {
                        if theirs.as_ref().is_none_or(Bitmap::is_empty)
                            && let Some(g) = self.geometry()
                        {
                            theirs = Some(Bitmap::new(g.count()));
                        }
                        if let Some(t) = theirs.as_mut() {
                            t.set(piece);
                        }
                        if let Some(hub) = self.hub {
                            hub.input(Input::HavePiece { peer: self.node.clone(), piece });
                        }
                    }
                    Ok(Some(PeerMsg::Have { digest: d, have })) if &d == digest => {
                        if let Some(hub) = self.hub {
                            hub.input(Input::SessionHave { peer: self.node.clone(), have: have.clone() });
                        }
                        theirs = (!have.is_empty()).then_some(have);
                    }
                    Ok(Some(other)) => {
                        let what = format!("{} on a session", kind_name(&other));
                        return protocol_violation(self.conn, self.node, &what);
                    }
                    Ok(None) => break,
                    Err(FrameError::Protocol(what)) => {
                        return protocol_violation(self.conn, self.node, &what);
                    }
                    Err(_) => return,
                },
                update = recv_update(&mut updates) => {
                    let msg = match update {
                        Ok(piece) => PeerMsg::HavePiece { digest: digest.clone(), piece },
                        Err(broadcast::error::RecvError::Lagged(_)) => PeerMsg::Have {
                            digest: digest.clone(),
                            have: self.hub.map_or_else(|| Bitmap::new(0), Hub::have_for_wire),
                        },
                        Err(broadcast::error::RecvError::Closed) => {
                            updates = None;
                            // The download here is over: committed, or failed.
                            let Some(g) = complete_geometry(self.inner, digest) else {
                                break;
                            };
                            mine_complete = true;
                            PeerMsg::Have { digest: digest.clone(), have: Bitmap::full(g.count()) }
                        }
                    };
                    if write_msg(&mut send, &msg).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = send.finish();
        trace!(peer = %self.node, %digest, "session ended");
    }

    fn geometry(&self) -> Option<Geometry> {
        match self.hub {
            Some(h) => h.geometry(),
            None => complete_geometry(self.inner, self.digest),
        }
    }
}

/// The next announcement, or never when there is no download here any more.
async fn recv_update(
    updates: &mut Option<broadcast::Receiver<u32>>,
) -> Result<u32, broadcast::error::RecvError> {
    match updates {
        Some(u) => u.recv().await,
        None => std::future::pending().await,
    }
}
