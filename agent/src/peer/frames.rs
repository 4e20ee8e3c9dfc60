//! `PeerMsg` frames on quinn streams: a reader that enforces, per stream, which frame kinds
//! and lengths may come (checked from the header, before the payload is buffered), with
//! optional shaping of the bytes read; and a writer for whole frames.

use bytes::{Buf, Bytes};
use shoal_proto::msg::PeerMsg;
use shoal_proto::wire::{self, Decoder, HEADER_LEN, Kind, WireError};

use super::bucket::TokenBucket;

/// Bytes asked of quinn per read.
const READ_CHUNK: usize = 64 * 1024;
/// Piece data written per call (and per token-bucket take).
pub(crate) const WRITE_CHUNK: usize = 64 * 1024;

/// Why a stream cannot go on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    /// The remote broke the protocol: close its connection.
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("stream: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream closed")]
    Closed(#[from] quinn::ClosedStream),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
}

impl From<WireError> for FrameError {
    fn from(e: WireError) -> Self {
        FrameError::Protocol(e.to_string())
    }
}

/// What the next frame on a stream may be.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Expect {
    /// Whether a `Piece` frame (the large kind) may come.
    pub piece: bool,
    /// Largest payload accepted.
    pub max_payload: u32,
}

impl Expect {
    /// Small control frames only (`Have`, `Request`, `Reject`, ...).
    pub(crate) const CONTROL: Expect = Expect {
        piece: false,
        max_payload: wire::MAX_PEER_PAYLOAD,
    };

    /// The answer to a request for a piece of `len` bytes: the piece (its frame carries the
    /// digest, index and length besides the data) or a refusal.
    pub(crate) fn answer(len: u64) -> Expect {
        let max = (len + 1024).min(u64::from(wire::MAX_PIECE_PAYLOAD));
        Expect {
            piece: true,
            max_payload: max as u32,
        }
    }
}

/// Reads frames from one stream.
pub(crate) struct FrameReader {
    recv: quinn::RecvStream,
    dec: Decoder<PeerMsg>,
    pending: Bytes,
    header: Vec<u8>,
}

impl FrameReader {
    pub(crate) fn new(recv: quinn::RecvStream) -> FrameReader {
        FrameReader {
            recv,
            dec: Decoder::new(),
            pending: Bytes::new(),
            header: Vec::with_capacity(HEADER_LEN),
        }
    }

    /// The next frame; `Ok(None)` when the stream ended cleanly between frames. Each chunk
    /// read takes its size from `bucket` and is reported to `progress`.
    pub(crate) async fn next(
        &mut self,
        expect: Expect,
        bucket: Option<&TokenBucket>,
        progress: &mut (dyn FnMut(usize) + Send),
    ) -> Result<Option<PeerMsg>, FrameError> {
        loop {
            if self.pending.is_empty() {
                match self.recv.read_chunk(READ_CHUNK, true).await? {
                    None if self.dec.is_idle() && self.header.is_empty() => return Ok(None),
                    None => {
                        return Err(FrameError::Protocol("stream ended inside a frame".into()));
                    }
                    Some(chunk) => {
                        self.pending = chunk.bytes;
                        progress(self.pending.len());
                        if let Some(b) = bucket {
                            b.take(self.pending.len() as u64).await;
                        }
                    }
                }
                continue;
            }
            if self.dec.is_idle() {
                // Stage the header to check kind and length before the decoder commits to
                // buffering a payload.
                let take = (HEADER_LEN - self.header.len()).min(self.pending.len());
                self.header.extend_from_slice(&self.pending[..take]);
                self.pending.advance(take);
                if self.header.len() < HEADER_LEN {
                    continue;
                }
                let kind = Kind::from_u8(self.header[1]);
                if kind == Some(Kind::PieceData) && !expect.piece {
                    return Err(FrameError::Protocol("unexpected piece data frame".into()));
                }
                let len = u32::from_be_bytes([
                    self.header[2],
                    self.header[3],
                    self.header[4],
                    self.header[5],
                ]);
                if len > expect.max_payload {
                    return Err(FrameError::Protocol(format!(
                        "frame of {len} bytes where at most {} are expected",
                        expect.max_payload
                    )));
                }
                let header = std::mem::take(&mut self.header);
                let mut input = &header[..];
                let r = self.dec.decode(&mut input);
                self.header = header;
                self.header.clear();
                if let Some(m) = r? {
                    return Ok(Some(m));
                }
            } else {
                let mut input = &self.pending[..];
                let r = self.dec.decode(&mut input);
                let used = self.pending.len() - input.len();
                self.pending.advance(used);
                if let Some(m) = r? {
                    return Ok(Some(m));
                }
            }
        }
    }
}

/// Encodes and writes one control frame.
pub(crate) async fn write_msg(
    send: &mut quinn::SendStream,
    msg: &PeerMsg,
) -> Result<(), FrameError> {
    let frame = wire::encode(msg)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Writes an encoded frame in chunks, each taking its size from `bucket` first.
pub(crate) async fn write_shaped(
    send: &mut quinn::SendStream,
    frame: Bytes,
    bucket: &TokenBucket,
) -> Result<(), FrameError> {
    let mut frame = frame;
    while !frame.is_empty() {
        let n = frame.len().min(WRITE_CHUNK);
        let chunk = frame.split_to(n);
        bucket.take(n as u64).await;
        send.write_chunk(chunk).await?;
    }
    Ok(())
}
