//! Blob downloads as a stream that resumes itself with `Range` requests after a broken or
//! stalled connection.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use http::header::{CONTENT_RANGE, RANGE};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use shoal_proto::{Digest, RepoName};
use tracing::Instrument as _;

use super::client::{Request, content_length, status_error};
use super::error::from_body_error;
use super::{Inner, Upstream, UpstreamError};

/// A blob body being received.
///
/// `stream` yields the blob's bytes from `offset` on, in order, each byte exactly once, and
/// never more than `size - offset` bytes (or the requested range). It is fail-stop: after an
/// `Err` it ends.
///
/// Resume semantics: when the connection breaks, the body ends early, or no byte arrives for
/// the idle timeout, the stream sends a new request for `Range: bytes=<next byte>-` (going
/// through authentication and redirects again, since presigned URLs expire) and continues.
/// If the upstream ignores the range and answers 200 with the whole blob, the stream itself
/// discards the prefix it has already delivered, so the consumer never has to reset; the
/// cost is re-downloading that prefix. The same holds for the first request: `offset` is
/// always the offset that was asked for. The retry budget (`max_retries`) counts consecutive
/// attempts that delivered no new byte; any progress refills it, so a long download over a
/// flaky link finishes while a dead upstream fails within
/// `max_retries * (connect + idle timeout + backoff)`.
///
/// The bytes are not verified here: the caller checks them against the digest.
pub struct BlobBody {
    /// Total blob size: `Content-Length` of a 200, the total of `Content-Range` of a 206.
    /// `None` only if the upstream sent neither.
    pub size: Option<u64>,
    /// Blob offset of the first byte of `stream`: always the requested offset.
    pub offset: u64,
    pub stream: BoxStream<'static, Result<Bytes, UpstreamError>>,
}

impl fmt::Debug for BlobBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobBody")
            .field("size", &self.size)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

/// `Content-Range: bytes <first>-<last>/<total|*>` of a 206.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ContentRange {
    first: u64,
    last: u64,
    total: Option<u64>,
}

fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_content_range(v: &str) -> Option<ContentRange> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let total = match total {
        "*" => None,
        t => Some(parse_u64(t)?),
    };
    let (first, last) = range.split_once('-')?;
    let (first, last) = (parse_u64(first)?, parse_u64(last)?);
    if first > last || total.is_some_and(|t| last >= t) {
        return None;
    }
    Some(ContentRange { first, last, total })
}

/// `Content-Range: bytes */<total>` of a 416.
fn parse_unsatisfied_range(v: &str) -> Option<u64> {
    parse_u64(v.trim().strip_prefix("bytes */")?)
}

/// A response positioned in the blob.
struct Opened {
    /// `None` when there is nothing left to read (416 at the very end).
    body: Option<BoxStream<'static, reqwest::Result<Bytes>>>,
    /// Blob offset of the body's first byte.
    at: u64,
    total: Option<u64>,
    shown: String,
}

fn blob_request(name: &RepoName, digest: &Digest, start: u64, end: Option<u64>) -> Request {
    let mut headers = HeaderMap::new();
    let range = match end {
        Some(end) => Some(format!("bytes={start}-{}", end - 1)),
        None if start > 0 => Some(format!("bytes={start}-")),
        None => None,
    };
    if let Some(r) = range {
        // Digits and punctuation only.
        headers.insert(
            RANGE,
            HeaderValue::from_str(&r).expect("ASCII range header"),
        );
    }
    Request {
        method: Method::GET,
        path: format!("/v2/{name}/blobs/{digest}"),
        repo: Some(name.clone()),
        headers,
    }
}

impl Inner {
    /// One attempt to open the blob at `start` (up to `end`, exclusive).
    async fn open_blob(
        &self,
        name: &RepoName,
        digest: &Digest,
        start: u64,
        end: Option<u64>,
    ) -> Result<Opened, UpstreamError> {
        let req = blob_request(name, digest, start, end);
        let (resp, shown) = self.send_once(&req).await?;
        let bad = |what: String| UpstreamError::BadResponse(format!("{what} from {shown}"));
        match resp.status() {
            StatusCode::OK => {
                let total = content_length(resp.headers());
                if start > 0 || end.is_some() {
                    tracing::debug!(url = %shown, start, "upstream ignored Range; the prefix will be discarded");
                }
                Ok(Opened {
                    body: Some(resp.bytes_stream().boxed()),
                    at: 0,
                    total,
                    shown,
                })
            }
            StatusCode::PARTIAL_CONTENT => {
                let cr = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range)
                    .ok_or_else(|| bad("206 without a valid Content-Range".into()))?;
                if cr.first > start {
                    return Err(bad(format!(
                        "206 starting at byte {} for a request from byte {start}",
                        cr.first
                    )));
                }
                if let Some(len) = content_length(resp.headers())
                    && len != cr.last - cr.first + 1
                {
                    return Err(bad(
                        "206 whose Content-Length disagrees with Content-Range".into()
                    ));
                }
                Ok(Opened {
                    body: Some(resp.bytes_stream().boxed()),
                    at: cr.first,
                    total: cr.total,
                    shown,
                })
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                // Asking for `bytes=<size>-` is how a resume at the very end looks.
                let total = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_unsatisfied_range);
                match total {
                    Some(t) if t == start => Ok(Opened {
                        body: None,
                        at: start,
                        total: Some(t),
                        shown,
                    }),
                    _ => Err(status_error(&resp, &shown)),
                }
            }
            _ => Err(status_error(&resp, &shown)),
        }
    }
}

impl Upstream {
    /// `GET /v2/<name>/blobs/<digest>` from byte `offset` to the end, as a stream that
    /// resumes itself (see [`BlobBody`]).
    pub async fn get_blob(
        &self,
        name: &RepoName,
        digest: &Digest,
        offset: u64,
    ) -> Result<BlobBody, UpstreamError> {
        self.open(name, digest, offset, None).await
    }

    /// Like [`Upstream::get_blob`] for the bytes `range` of the blob only (a piece). A range
    /// reaching past the end of the blob is clamped to it.
    pub async fn get_blob_range(
        &self,
        name: &RepoName,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<BlobBody, UpstreamError> {
        if range.is_empty() {
            return Ok(BlobBody {
                size: None,
                offset: range.start,
                stream: futures::stream::empty().boxed(),
            });
        }
        self.open(name, digest, range.start, Some(range.end)).await
    }

    /// `HEAD /v2/<name>/blobs/<digest>`: the blob's size, if the upstream says.
    #[tracing::instrument(level = "debug", skip_all, fields(upstream = %self.eps.host, repo = %name, digest = %digest))]
    pub async fn blob_size(
        &self,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, UpstreamError> {
        let req = &Request {
            method: Method::HEAD,
            ..blob_request(name, digest, 0, None)
        };
        self.failover(|inner| async move {
            let inner = &inner;
            inner
                .with_retries(|| async move {
                    let (resp, shown) = inner.send_once(req).await?;
                    if !resp.status().is_success() {
                        return Err(status_error(&resp, &shown));
                    }
                    Ok(content_length(resp.headers()))
                })
                .await
        })
        .await
    }

    async fn open(
        &self,
        name: &RepoName,
        digest: &Digest,
        start: u64,
        end: Option<u64>,
    ) -> Result<BlobBody, UpstreamError> {
        let span = tracing::info_span!(
            "upstream_blob",
            upstream = %self.eps.host,
            repo = %name,
            digest = %digest,
        );
        // The stream resumes on the URL that answered.
        let (inner, opened) = self
            .failover(|inner| async move {
                let opened = inner
                    .with_retries(|| inner.open_blob(name, digest, start, end))
                    .await?;
                Ok((inner, opened))
            })
            .instrument(span.clone())
            .await?;
        let mut state = Resumable {
            inner,
            name: name.clone(),
            digest: digest.clone(),
            pos: start,
            end,
            total: None,
            body: None,
            failures: 0,
            done: false,
        };
        state.adopt(opened)?;
        let size = state.total;
        let stream = futures::stream::unfold(state, move |mut s| {
            let span = span.clone();
            async move { s.next_chunk().await.map(|item| (item, s)) }.instrument(span)
        });
        Ok(BlobBody {
            size,
            offset: start,
            stream: stream.boxed(),
        })
    }
}

struct Body {
    stream: BoxStream<'static, reqwest::Result<Bytes>>,
    /// Blob offset of the next byte this body will produce.
    at: u64,
    shown: String,
}

/// The state behind a [`BlobBody`] stream.
struct Resumable {
    inner: Arc<Inner>,
    name: RepoName,
    digest: Digest,
    /// Blob offset of the next byte to yield.
    pos: u64,
    /// Exclusive end asked for by the caller.
    end: Option<u64>,
    /// Blob size, once an upstream response said.
    total: Option<u64>,
    body: Option<Body>,
    /// Consecutive attempts that delivered no new byte.
    failures: u32,
    done: bool,
}

impl Resumable {
    /// Offset at which the stream is complete, when known.
    fn target(&self) -> Option<u64> {
        match (self.end, self.total) {
            (Some(e), Some(t)) => Some(e.min(t)),
            (e, t) => e.or(t),
        }
    }

    /// Takes over a fresh response.
    fn adopt(&mut self, o: Opened) -> Result<(), UpstreamError> {
        match (self.total, o.total) {
            (Some(a), Some(b)) if a != b => {
                return Err(UpstreamError::BadResponse(format!(
                    "blob size changed from {a} to {b} between requests to {}",
                    o.shown
                )));
            }
            (None, Some(b)) => self.total = Some(b),
            _ => {}
        }
        if let Some(t) = self.total
            && self.pos > t
        {
            return Err(UpstreamError::BadResponse(format!(
                "offset {} is past the end of the {t}-byte blob at {}",
                self.pos, o.shown
            )));
        }
        if o.at < self.pos {
            tracing::debug!(
                discard = self.pos - o.at,
                "skipping bytes already delivered"
            );
        }
        self.body = o.body.map(|stream| Body {
            stream,
            at: o.at,
            shown: o.shown,
        });
        Ok(())
    }

    async fn next_chunk(&mut self) -> Option<Result<Bytes, UpstreamError>> {
        match self.advance().await {
            Ok(Some(chunk)) => Some(Ok(chunk)),
            Ok(None) => {
                self.done = true;
                self.body = None;
                None
            }
            Err(e) => {
                self.done = true;
                self.body = None;
                tracing::warn!(pos = self.pos, error = %e, "blob download failed");
                Some(Err(e))
            }
        }
    }

    async fn advance(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        let idle = self.inner.idle_timeout;
        loop {
            let target = self.target();
            if self.done || target == Some(self.pos) {
                return Ok(None);
            }
            let Some(body) = self.body.as_mut() else {
                self.reopen().await?;
                continue;
            };
            let broken = match tokio::time::timeout(idle, body.stream.next()).await {
                Err(_) => UpstreamError::Timeout {
                    url: body.shown.clone(),
                    after: idle,
                },
                Ok(Some(Err(e))) => from_body_error(e, &body.shown, idle),
                Ok(None) if target.is_none() => return Ok(None),
                Ok(None) => UpstreamError::Interrupted {
                    url: body.shown.clone(),
                    reason: format!("body ended at byte {} of {target:?}", body.at),
                },
                Ok(Some(Ok(chunk))) => {
                    let chunk_start = body.at;
                    body.at += chunk.len() as u64;
                    if body.at <= self.pos {
                        // Entirely a prefix we already delivered.
                        continue;
                    }
                    let mut chunk = chunk;
                    if chunk_start < self.pos {
                        chunk = chunk.slice(usize::try_from(self.pos - chunk_start).unwrap_or(0)..);
                    }
                    if let Some(t) = target {
                        let room = t - self.pos;
                        if chunk.len() as u64 > room {
                            if self
                                .end
                                .is_none_or(|e| self.total.is_some_and(|tot| tot < e))
                            {
                                return Err(UpstreamError::BadResponse(format!(
                                    "{} sent more than the {}-byte blob size it declared",
                                    body.shown,
                                    self.total.unwrap_or(0)
                                )));
                            }
                            // A 200 to a ranged request: stop at the caller's end.
                            chunk.truncate(usize::try_from(room).unwrap_or(usize::MAX));
                        }
                    }
                    self.pos += chunk.len() as u64;
                    self.failures = 0;
                    return Ok(Some(chunk));
                }
            };
            self.body = None;
            if self.failures >= self.inner.max_retries {
                return Err(broken);
            }
            self.failures += 1;
            tracing::warn!(
                pos = self.pos,
                attempt = self.failures,
                error = %broken,
                "blob download interrupted, resuming with a range request"
            );
        }
    }

    /// Opens a new response at `pos`, retrying failed opens within the same budget.
    async fn reopen(&mut self) -> Result<(), UpstreamError> {
        let mut retry_after: Option<Duration> = None;
        loop {
            if self.failures > 0 {
                let delay = self.inner.backoff.delay(self.failures - 1, retry_after);
                tokio::time::sleep(delay).await;
            }
            match self
                .inner
                .open_blob(&self.name, &self.digest, self.pos, self.end)
                .await
            {
                Ok(o) => return self.adopt(o),
                Err(e) if e.is_retryable() && self.failures < self.inner.max_retries => {
                    self.failures += 1;
                    retry_after = e.retry_after();
                    tracing::warn!(pos = self.pos, attempt = self.failures, error = %e, "resuming blob download failed, retrying");
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_forms() {
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some(ContentRange {
                first: 100,
                last: 199,
                total: Some(1000)
            })
        );
        assert_eq!(
            parse_content_range("bytes 0-0/*"),
            Some(ContentRange {
                first: 0,
                last: 0,
                total: None
            })
        );
        for bad in [
            "bytes 200-100/1000",
            "bytes 0-1000/1000",
            "bytes -1-5/10",
            "bytes 1-5",
            "items 1-5/10",
            "bytes */10",
            "bytes 1-+5/10",
            "",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
        assert_eq!(parse_unsatisfied_range("bytes */1000"), Some(1000));
        assert_eq!(parse_unsatisfied_range("bytes 1-2/1000"), None);
    }

    #[test]
    fn range_headers() {
        let name = RepoName::parse("a/b").unwrap();
        let d = Digest::sha256_of(b"x");
        assert!(
            blob_request(&name, &d, 0, None)
                .headers
                .get(RANGE)
                .is_none()
        );
        assert_eq!(
            blob_request(&name, &d, 10, None).headers[RANGE],
            "bytes=10-"
        );
        assert_eq!(
            blob_request(&name, &d, 0, Some(10)).headers[RANGE],
            "bytes=0-9"
        );
        assert_eq!(
            blob_request(&name, &d, 0, None).path,
            format!("/v2/a/b/blobs/{d}")
        );
    }
}
