//! Serving a piece request: complete blobs from the store, verified pieces of blobs still
//! downloading from their piece ingest, with upload-slot admission and the upload limit.
//! Never a piece that is not verified: a partial blob's pieces are readable only once held
//! (verified, then written), and a complete blob matched its digest before it was committed.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use shoal_proto::Digest;
use shoal_proto::msg::{NodeId, PeerMsg, PieceData, RejectReason};
use shoal_proto::piece::{Bitmap, Geometry, MAX_PIECES};
use shoal_proto::wire;
use tracing::{debug, trace};

use super::frames::{FrameReader, write_msg, write_shaped};
use super::net::protocol_violation;
use super::session::Hub;
use super::{PeerInner, lock};

/// Where a requested blob is.
enum Holder {
    Partial(Arc<Hub>),
    Complete(u64),
}

/// Holds an upload slot (and a spreading slot) until dropped.
struct Slot<'a> {
    inner: &'a PeerInner,
    node: NodeId,
    spread: Option<Arc<Hub>>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        lock(&self.inner.uploads).release(&self.node);
        if let Some(hub) = &self.spread {
            hub.release_spread(&self.node);
        }
        self.inner.set_load();
    }
}

pub(crate) async fn serve_request(
    inner: &Arc<PeerInner>,
    node: &NodeId,
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    reader: FrameReader,
    digest: Digest,
    piece: u32,
) {
    // Nothing more may come from the requester; its half is ignored from here on.
    drop(reader);
    let reject = |reason| PeerMsg::Reject {
        digest: digest.clone(),
        piece,
        reason,
    };
    let holder = match inner.hub(&digest) {
        Some(h) => Some(Holder::Partial(h)),
        None => inner.store.blob_size(&digest).map(Holder::Complete),
    };
    let (geometry, have) = match &holder {
        None => (None, None),
        Some(Holder::Partial(h)) => (h.geometry(), Some(h.have_for_wire())),
        Some(Holder::Complete(size)) => {
            let g = Geometry::for_size(*size);
            (Some(g).filter(|g| g.count() <= MAX_PIECES), None)
        }
    };
    let answer = match (&holder, geometry) {
        (None, _) => Err(RejectReason::UnknownBlob),
        (Some(Holder::Complete(_)), None) => Err(RejectReason::UnknownBlob),
        (Some(Holder::Partial(_)), None) => Err(RejectReason::NotHave),
        (Some(_), Some(g)) if piece >= g.count() => {
            return protocol_violation(
                conn,
                node,
                &format!(
                    "piece {piece} requested of a blob with {} pieces",
                    g.count()
                ),
            );
        }
        (Some(_), Some(_)) if inner.control.is_refused(node) => Err(RejectReason::Forbidden),
        (Some(Holder::Partial(_)), Some(_)) if !have.as_ref().is_some_and(|h| h.get(piece)) => {
            Err(RejectReason::NotHave)
        }
        (Some(h), Some(g)) => admit(inner, node, h, piece, g, have.as_ref()),
    };
    let slot = match answer {
        Ok(slot) => slot,
        Err(reason) => {
            trace!(peer = %node, %digest, piece, ?reason, "request refused");
            let _ = write_msg(&mut send, &reject(reason)).await;
            let _ = send.finish();
            return;
        }
    };
    let g = geometry.expect("admitted requests have a geometry");
    let bytes = match read_piece(inner, &digest, holder.as_ref().expect("admitted"), piece, g).await
    {
        Some(b) => b,
        None => {
            drop(slot);
            let _ = write_msg(&mut send, &reject(RejectReason::NotHave)).await;
            let _ = send.finish();
            return;
        }
    };
    #[cfg(test)]
    let bytes = {
        let mut bytes = bytes;
        let fault = *lock(&inner.fault);
        match fault {
            super::Fault::None => {}
            super::Fault::Stall => {
                // Hold the slot and the stream until the requester gives up.
                inner
                    .stalled
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = send.stopped().await;
                return;
            }
            super::Fault::Corrupt => bytes[0] ^= 0xff,
        }
        bytes
    };
    let len = bytes.len();
    let frame = PieceData::new(bytes).map(|data| {
        wire::encode(&PeerMsg::Piece {
            digest: digest.clone(),
            piece,
            data,
        })
    });
    let Some(Ok(frame)) = frame else {
        // Cannot happen for a piece of a valid geometry (at most 16 MiB).
        debug!(%digest, piece, "piece does not fit a frame");
        return;
    };
    match write_shaped(&mut send, Bytes::from(frame), &inner.shaping.upload).await {
        Ok(()) => {
            let _ = send.finish();
            inner.metrics.peer_bytes_sent(len as u64);
            trace!(peer = %node, %digest, piece, len, "piece sent");
        }
        Err(error) => {
            // Cancelled by the requester, or the connection went away.
            trace!(peer = %node, %digest, piece, %error, "piece upload stopped");
        }
    }
    drop(slot);
}

/// Takes the slots to upload `piece`, or says why not.
fn admit<'a>(
    inner: &'a PeerInner,
    node: &NodeId,
    holder: &Holder,
    piece: u32,
    g: Geometry,
    have: Option<&Bitmap>,
) -> Result<Slot<'a>, RejectReason> {
    let spread = match holder {
        Holder::Partial(hub) if hub.spreading() => {
            let have = have.cloned().unwrap_or_else(|| Bitmap::new(g.count()));
            hub.admit_spread(node, piece, &have)?;
            Some(hub.clone())
        }
        _ => None,
    };
    let full = Bitmap::full(0);
    let admitted = {
        let mut uploads = lock(&inner.uploads);
        // Spreading already decided which pieces may go; here only the totals count.
        uploads.try_admit(node, piece, have.unwrap_or(&full))
    };
    if let Err(reason) = admitted {
        if let Some(hub) = &spread {
            hub.release_spread(node);
        }
        return Err(reason);
    }
    inner.set_load();
    Ok(Slot {
        inner,
        node: node.clone(),
        spread,
    })
}

/// The piece's bytes, read on a blocking thread; `None` when it is not (or no longer) held.
async fn read_piece(
    inner: &PeerInner,
    digest: &Digest,
    holder: &Holder,
    piece: u32,
    g: Geometry,
) -> Option<Vec<u8>> {
    let read = match holder {
        Holder::Partial(hub) => {
            let ingest = hub.ingest()?.clone();
            tokio::task::spawn_blocking(move || ingest.read_piece(piece).ok().flatten()).await
        }
        Holder::Complete(_) => {
            let store = inner.store.clone();
            let d = digest.clone();
            let range = g.range(piece)?;
            tokio::task::spawn_blocking(move || {
                let blob = store.open_blob(&d).ok().flatten()?;
                if blob.size != g.size() {
                    return None;
                }
                let mut buf = vec![0; (range.end - range.start) as usize];
                blob.file.read_exact_at(&mut buf, range.start).ok()?;
                Some(buf)
            })
            .await
        }
    };
    read.ok().flatten()
}
