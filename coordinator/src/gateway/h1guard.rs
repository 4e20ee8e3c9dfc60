//! A second, stricter reading of HTTP/1 request framing, so that ambiguous requests are
//! refused instead of normalised and forwarded.
//!
//! hyper already refuses most framing attacks (differing duplicate `Content-Length`, a
//! `Transfer-Encoding` other than chunked, malformed chunk sizes), but it accepts a request with
//! both `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.3 lets a server do so: chunked
//! wins, the connection closes afterwards) and identical duplicate `Content-Length` lines, and
//! its service never sees that those were there. A gateway in front of other HTTP
//! implementations should not pass either on, however it re-frames them.
//!
//! [`Guarded`] wraps the connection's IO and feeds every byte hyper reads to a [`Tracker`],
//! which follows request boundaries (heads, fixed-length and chunked bodies, exactly as hyper
//! decodes them) and records one [`Verdict`] per request head in arrival order. The gateway
//! takes the next verdict for each request hyper hands it. Since hyper can only parse bytes
//! it has read through the wrapper, a request's verdict always exists before the request.
//! When the tracker cannot follow the stream any more it fails closed: every later request
//! on that connection is refused.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Whether a request head may be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Refuse with 400 and close the connection; the reason is for the log.
    Reject(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between requests or inside a head.
    Head,
    /// Inside a body of known length: bytes left.
    Fixed(u64),
    Chunked(Chunk),
    /// Framing can no longer be followed; everything after is refused.
    Lost,
}

/// Mirrors hyper's chunked decoder (`proto/h1/decode.rs`), which requires CRLF everywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Expecting the first hex digit of a size.
    Start,
    Size(u64),
    SizeLws(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk, at the start of a trailer line or the final CRLF.
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
}

/// Follows request framing on one connection.
#[derive(Debug)]
pub struct Tracker {
    state: State,
    /// The head being accumulated.
    head: Vec<u8>,
    /// Longest head followed; hyper refuses (431) well before this.
    max_head: usize,
    verdicts: VecDeque<Verdict>,
}

impl Tracker {
    /// `max_head` should exceed hyper's own head limit, so the tracker never gives up on a
    /// head hyper would still accept.
    pub fn new(max_head: usize) -> Tracker {
        Tracker {
            state: State::Head,
            head: Vec::new(),
            max_head,
            verdicts: VecDeque::new(),
        }
    }

    /// The verdict on the next request, in order. Refuses when none is known, which only
    /// happens once framing was lost.
    pub fn next_verdict(&mut self) -> Verdict {
        self.verdicts
            .pop_front()
            .unwrap_or(Verdict::Reject("request framing could not be followed"))
    }

    /// Feeds bytes read from the client.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Lost => return,
                State::Head => {
                    // Empty lines before a request line are skipped, as httparse does.
                    if self.head.is_empty() {
                        let skip = data
                            .iter()
                            .position(|&b| b != b'\r' && b != b'\n')
                            .unwrap_or(data.len());
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                    }
                    let scan_from = self.head.len().saturating_sub(3);
                    let room = (self.max_head + 1).saturating_sub(self.head.len());
                    let take = data.len().min(room);
                    self.head.extend_from_slice(&data[..take]);
                    match head_end(&self.head, scan_from) {
                        Some(end) => {
                            // Bytes after the head belong to the body or the next request.
                            let extra = self.head.len() - end;
                            data = &data[take - extra..];
                            let head = std::mem::take(&mut self.head);
                            self.finish_head(&head[..end]);
                        }
                        None if self.head.len() > self.max_head => {
                            self.state = State::Lost;
                            return;
                        }
                        None => return,
                    }
                }
                State::Fixed(left) => {
                    let n = (data.len() as u64).min(left);
                    data = &data[n as usize..];
                    self.state = if left == n {
                        State::Head
                    } else {
                        State::Fixed(left - n)
                    };
                }
                State::Chunked(Chunk::Data(left)) => {
                    let n = (data.len() as u64).min(left);
                    data = &data[n as usize..];
                    self.state = State::Chunked(if left == n {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left - n)
                    });
                }
                State::Chunked(chunk) => {
                    let b = data[0];
                    data = &data[1..];
                    self.state = match step_chunk(chunk, b) {
                        Some(Some(next)) => State::Chunked(next),
                        Some(None) => State::Head,
                        None => State::Lost,
                    };
                }
            }
        }
    }

    fn finish_head(&mut self, head: &[u8]) {
        let (verdict, framing) = judge_head(head);
        self.verdicts.push_back(verdict);
        self.state = match (verdict, framing) {
            (Verdict::Accept, Framing::None) => State::Head,
            (Verdict::Accept, Framing::Length(0)) => State::Head,
            (Verdict::Accept, Framing::Length(n)) => State::Fixed(n),
            (Verdict::Accept, Framing::Chunked) => State::Chunked(Chunk::Start),
            // The connection is closed after the refusal; nothing after it is served.
            (Verdict::Reject(_), _) => State::Lost,
        };
    }
}

/// `Some(Some(next))`, `Some(None)` at the end of the body, `None` on a framing error.
fn step_chunk(state: Chunk, b: u8) -> Option<Option<Chunk>> {
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(u64::from(b - b'0')),
        b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u64::from(b - b'A' + 10)),
        _ => None,
    };
    let next = match state {
        Chunk::Start => Chunk::Size(hex(b)?),
        Chunk::Size(n) => match (b, hex(b)) {
            (_, Some(d)) => Chunk::Size(n.checked_mul(16)?.checked_add(d)?),
            (b'\t' | b' ', _) => Chunk::SizeLws(n),
            (b';', _) => Chunk::Extension(n),
            (b'\r', _) => Chunk::SizeLf(n),
            _ => return None,
        },
        Chunk::SizeLws(n) => match b {
            b'\t' | b' ' => Chunk::SizeLws(n),
            b';' => Chunk::Extension(n),
            b'\r' => Chunk::SizeLf(n),
            _ => return None,
        },
        Chunk::Extension(n) => match b {
            b'\r' => Chunk::SizeLf(n),
            b'\n' => return None,
            _ => Chunk::Extension(n),
        },
        Chunk::SizeLf(n) => match (b, n) {
            (b'\n', 0) => Chunk::EndCr,
            (b'\n', n) => Chunk::Data(n),
            _ => return None,
        },
        // Data is consumed in bulk by the caller.
        Chunk::Data(_) => return None,
        Chunk::DataCr => match b {
            b'\r' => Chunk::DataLf,
            _ => return None,
        },
        Chunk::DataLf => match b {
            b'\n' => Chunk::Start,
            _ => return None,
        },
        Chunk::EndCr => match b {
            b'\r' => Chunk::EndLf,
            _ => Chunk::Trailer,
        },
        Chunk::Trailer => match b {
            b'\r' => Chunk::TrailerLf,
            _ => Chunk::Trailer,
        },
        Chunk::TrailerLf => match b {
            b'\n' => Chunk::EndCr,
            _ => return None,
        },
        Chunk::EndLf => match b {
            b'\n' => return Some(None),
            _ => return None,
        },
    };
    Some(Some(next))
}

/// The end (exclusive) of a head: the first empty line, where lines end in LF or CRLF.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        if buf[i] == b'\n' {
            let mut j = i + 1;
            if buf.get(j) == Some(&b'\r') {
                j += 1;
            }
            if buf.get(j) == Some(&b'\n') {
                return Some(j + 1);
            }
        }
        i += 1;
    }
    None
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Judges one request head (request line and header lines, ending with the empty line).
fn judge_head(head: &[u8]) -> (Verdict, Framing) {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    if request_line
        .split(|&b| b == b' ')
        .next()
        .is_some_and(|m| m.eq_ignore_ascii_case(b"CONNECT"))
    {
        return (Verdict::Reject("CONNECT is not supported"), Framing::None);
    }
    let mut lengths: Vec<&[u8]> = Vec::new();
    let mut encodings: Vec<&[u8]> = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return (Verdict::Reject("obsolete line folding"), Framing::None);
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return (Verdict::Reject("header line without ':'"), Framing::None);
        };
        let name = &line[..colon];
        let value = line[colon + 1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths.push(value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            encodings.push(value);
        }
    }
    match (lengths.as_slice(), encodings.as_slice()) {
        ([], []) => (Verdict::Accept, Framing::None),
        ([_, ..], [_, ..]) => (
            Verdict::Reject("both Content-Length and Transfer-Encoding"),
            Framing::None,
        ),
        ([_, _, ..], []) => (Verdict::Reject("duplicate Content-Length"), Framing::None),
        ([len], []) => {
            let parsed = (!len.is_empty() && len.len() <= 19 && len.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(len).ok()?.parse::<u64>().ok())
                .flatten();
            match parsed {
                Some(n) => (Verdict::Accept, Framing::Length(n)),
                None => (Verdict::Reject("invalid Content-Length"), Framing::None),
            }
        }
        ([], [te]) if te.eq_ignore_ascii_case(b"chunked") => (Verdict::Accept, Framing::Chunked),
        ([], [_]) => (
            Verdict::Reject("Transfer-Encoding other than chunked"),
            Framing::None,
        ),
        ([], _) => (
            Verdict::Reject("duplicate Transfer-Encoding"),
            Framing::None,
        ),
    }
}

/// The shared tracker of one connection.
pub type SharedTracker = Arc<Mutex<Tracker>>;

/// Takes the verdict for the next request of a connection.
pub fn next_verdict(tracker: &SharedTracker) -> Verdict {
    tracker
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .next_verdict()
}

/// Connection IO whose reads are also fed to a [`Tracker`].
#[derive(Debug)]
pub struct Guarded<IO> {
    io: IO,
    tracker: SharedTracker,
}

impl<IO> Guarded<IO> {
    pub fn new(io: IO, tracker: SharedTracker) -> Guarded<IO> {
        Guarded { io, tracker }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if !new.is_empty() {
            this.tracker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .feed(new);
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(input: &[u8]) -> Vec<Verdict> {
        // Every split of the input must give the same answer: bytes arrive in any pieces.
        let mut whole = Tracker::new(1 << 16);
        whole.feed(input);
        let expected: Vec<Verdict> = whole.verdicts.iter().copied().collect();
        for step in [1, 2, 3, 7] {
            let mut t = Tracker::new(1 << 16);
            for piece in input.chunks(step) {
                t.feed(piece);
            }
            let got: Vec<Verdict> = t.verdicts.iter().copied().collect();
            assert_eq!(got, expected, "split by {step}");
        }
        expected
    }

    const OK: Verdict = Verdict::Accept;

    #[test]
    fn pipelined_requests_with_every_framing_are_followed() {
        let input = b"\r\nGET /v2/ HTTP/1.1\r\nHost: a\r\n\r\n\
            PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
            PATCH /y HTTP/1.1\r\ntransfer-encoding: Chunked\r\n\r\n\
            5;ext=1\r\nhello\r\nA  \r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n\
            GET /z HTTP/1.1\nHost: lf-only\n\n\
            HEAD /w HTTP/1.1\r\n\r\n";
        assert_eq!(verdicts(input), [OK, OK, OK, OK, OK]);
    }

    #[test]
    fn body_bytes_that_look_like_requests_are_not_heads() {
        let body = b"GET /evil HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut input =
            format!("POST /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        input.extend_from_slice(body);
        input.extend_from_slice(b"GET /ok HTTP/1.1\r\n\r\n");
        assert_eq!(verdicts(&input), [OK, OK]);
    }

    #[test]
    fn ambiguous_framing_is_refused_and_the_connection_is_lost() {
        let cases: &[&[u8]] = &[
            b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /x HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\n\r\n",
        ];
        for case in cases {
            let mut input = case.to_vec();
            input.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
            let mut t = Tracker::new(1 << 16);
            t.feed(&input);
            assert!(
                matches!(t.next_verdict(), Verdict::Reject(_)),
                "{}",
                String::from_utf8_lossy(case)
            );
            // Nothing after a refusal is served.
            assert!(matches!(t.next_verdict(), Verdict::Reject(_)));
        }
    }

    #[test]
    fn bad_chunk_framing_loses_the_connection() {
        for body in [
            &b"zz\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5;ext\nhello",
            b"ffffffffffffffffff\r\n",
            b"\r\n",
        ] {
            let mut input = b"PATCH /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            input.extend_from_slice(body);
            input.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
            let mut t = Tracker::new(1 << 16);
            t.feed(&input);
            assert_eq!(t.next_verdict(), OK);
            assert!(
                matches!(t.next_verdict(), Verdict::Reject(_)),
                "{}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(t.state, State::Lost);
        }
    }

    #[test]
    fn oversized_heads_stop_tracking() {
        let mut t = Tracker::new(100);
        t.feed(b"GET / HTTP/1.1\r\n");
        t.feed(&[b'a'; 200]);
        assert_eq!(t.state, State::Lost);
        assert!(matches!(t.next_verdict(), Verdict::Reject(_)));
    }
}
