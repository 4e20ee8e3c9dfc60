//! The local registry endpoint (pull side of the OCI distribution API) that container runtimes
//! talk to: routing, manifest revalidation, blob serving with ranges, and one log line per pull.

use std::collections::HashMap;
use std::fs::File;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use shoal_proto::api::{self, ErrorBody, ErrorCode, Route};
use shoal_proto::range::{self, RangeRequest};
use shoal_proto::{Digest, ManifestRef, RegistryHost, RepoName, Tag};
use tracing::{info, warn};

use crate::config::MirrorConfig;
use crate::fetch::{self, Downloads, Join};
use crate::metrics::{Kind, Metrics, Source};
use crate::store::{Blob, Store, TagRecord};
use crate::upstream::{Upstream, UpstreamError};

/// Response body type of the mirror.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

/// Manifests larger than this are refused (Distribution's own limit is 4 MiB).
const MAX_MANIFEST: u64 = 4 << 20;
/// Response header telling a client the manifest came from cache while upstream was down.
pub const STALE_HEADER: &str = "X-Shoal-Stale";
/// Response header telling where the bytes came from (`cache` or `upstream`).
pub const SOURCE_HEADER: &str = "X-Shoal-Source";

/// An error answered with OCI error JSON.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    /// For 416: the blob size, sent as `Content-Range: bytes */<size>`.
    unsatisfied_size: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            unsatisfied_size: None,
        }
    }
}

/// `n` and `last` of a tag list request (anything else, `ns` included, is left alone).
fn tags_query(query: Option<&str>) -> Result<(Option<u32>, Option<Tag>), ApiError> {
    let bad = |what: String| ApiError::new(ErrorCode::BadRequest, what);
    let (mut n, mut last) = (None, None);
    for pair in query.unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "n" => {
                let parsed =
                    (!v.is_empty() && v.len() <= 6 && v.bytes().all(|b| b.is_ascii_digit()))
                        .then(|| v.parse::<u32>().ok())
                        .flatten();
                n = Some(parsed.ok_or_else(|| bad("n must be a number up to 999999".into()))?);
            }
            "last" => {
                last = Some(Tag::parse(v).map_err(|e| bad(format!("last is not a tag: {e}")))?);
            }
            _ => {}
        }
    }
    Ok((n, last))
}

fn upstream_error(e: &UpstreamError, not_found: ErrorCode, what: &str) -> ApiError {
    if e.is_not_found() {
        ApiError::new(not_found, format!("{what} not found upstream"))
    } else if e.is_unreachable() {
        ApiError::new(
            ErrorCode::Unavailable,
            format!("upstream registry unreachable: {e}"),
        )
    } else {
        ApiError::new(ErrorCode::UpstreamError, format!("upstream registry: {e}"))
    }
}

/// State shared by every request of the mirror.
pub struct Mirror {
    config: MirrorConfig,
    upstreams: HashMap<RegistryHost, Upstream>,
    store: Store,
    downloads: Arc<Downloads>,
    metrics: Metrics,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror").finish_non_exhaustive()
    }
}

/// What one request did, logged once when its response body ends.
struct RequestLog {
    method: Method,
    path: String,
    upstream: Option<RegistryHost>,
    status: StatusCode,
    source: Option<Source>,
    stale: bool,
    started: Instant,
}

impl Mirror {
    pub fn new(
        config: MirrorConfig,
        upstreams: Vec<Upstream>,
        store: Store,
        downloads: Arc<Downloads>,
        metrics: Metrics,
    ) -> Mirror {
        Mirror {
            config,
            upstreams: upstreams
                .into_iter()
                .map(|u| (u.host().clone(), u))
                .collect(),
            store,
            downloads,
            metrics,
        }
    }

    /// Answers one request. Never fails: errors become OCI error responses.
    pub async fn handle<B>(self: Arc<Self>, req: Request<B>) -> Response<Body> {
        let started = Instant::now();
        let mut log = RequestLog {
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            upstream: None,
            status: StatusCode::OK,
            source: None,
            stale: false,
            started,
        };
        let result = self.route(&req, &mut log).await;
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => error_response(&e),
        };
        resp.headers_mut().insert(
            api::API_VERSION_HEADER,
            HeaderValue::from_static(api::API_VERSION),
        );
        log.status = resp.status();
        self.metrics.response(log.status.as_u16());
        let (parts, body) = resp.into_parts();
        // hyper stops polling a body once Content-Length bytes are written, so "complete"
        // means that many bytes went out.
        let expected = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = LoggedBody {
            inner: body,
            bytes: 0,
            expected: if log.method == Method::HEAD {
                Some(0)
            } else {
                expected
            },
            complete: false,
            log: Some(log),
            metrics: self.metrics.clone(),
        };
        Response::from_parts(parts, body.boxed_unsync())
    }

    async fn route<B>(
        &self,
        req: &Request<B>,
        log: &mut RequestLog,
    ) -> Result<Response<Body>, ApiError> {
        let head = match *req.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => {
                return Err(ApiError::new(
                    ErrorCode::Unsupported,
                    "this is a pull-through mirror: only GET and HEAD are supported",
                ));
            }
        };
        let route =
            Route::parse(req.uri().path()).map_err(|e| ApiError::new(e.code(), e.to_string()))?;
        let upstream = self.pick_upstream(req.uri().query())?;
        log.upstream = Some(upstream.host().clone());
        match route {
            Route::Base => Ok(json_response(StatusCode::OK, "{}")),
            Route::Manifest { name, reference } => {
                let accept = accept_list(req.headers())?;
                self.manifest(head, upstream, &name, &reference, &accept, log)
                    .await
            }
            Route::Blob { name, digest } => {
                let range = req
                    .headers()
                    .get(header::RANGE)
                    .map(|v| {
                        v.to_str().map_err(|_| {
                            ApiError::new(ErrorCode::RangeInvalid, "Range header is not ASCII")
                        })
                    })
                    .transpose()?;
                // Refuse a malformed header before touching the store or upstream; whether
                // the range fits is decided once the size is known.
                if let Err(e @ (range::RangeError::Malformed | range::RangeError::Unit)) =
                    range::parse_range(range, u64::MAX)
                {
                    return Err(ApiError::new(ErrorCode::RangeInvalid, e.to_string()));
                }
                self.blob(head, upstream, &name, &digest, range, log).await
            }
            Route::BlobUpload { .. } => Err(ApiError::new(
                ErrorCode::Unsupported,
                "this is a pull-through mirror: pushes are not supported",
            )),
            Route::TagsList { name } => {
                let (n, last) = tags_query(req.uri().query())?;
                let page = upstream
                    .tags_list(&name, n, last.as_ref())
                    .await
                    .map_err(|e| upstream_error(&e, ErrorCode::NameUnknown, "repository"))?;
                log.source = Some(Source::Upstream);
                let mut resp = Response::builder()
                    .status(StatusCode::OK)
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(header::CONTENT_LENGTH, page.body.len());
                if let Some(next) = page.next {
                    resp = resp.header(header::LINK, next);
                }
                let body = if head {
                    full(Bytes::new())
                } else {
                    full(page.body)
                };
                Ok(resp.body(body).expect("valid response"))
            }
            Route::Catalog => Err(ApiError::new(
                ErrorCode::Unsupported,
                "this mirror does not list the upstream's catalog",
            )),
        }
    }

    /// Chooses the upstream from containerd's `?ns=<host>`, or the default.
    fn pick_upstream(&self, query: Option<&str>) -> Result<&Upstream, ApiError> {
        let mut ns = None;
        for pair in query.unwrap_or("").split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k != "ns" {
                continue;
            }
            if ns.is_some() {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    "the ns query parameter is given more than once",
                ));
            }
            let decoded = percent_encoding::percent_decode_str(v)
                .decode_utf8()
                .map_err(|_| ApiError::new(ErrorCode::BadRequest, "ns is not valid UTF-8"))?;
            let host = RegistryHost::parse(&decoded).map_err(|e| {
                ApiError::new(ErrorCode::BadRequest, format!("invalid ns parameter: {e}"))
            })?;
            ns = Some(host);
        }
        let host = ns.as_ref().unwrap_or(&self.config.default_upstream);
        self.upstreams.get(host).ok_or_else(|| {
            ApiError::new(
                ErrorCode::NameUnknown,
                format!("registry {host} is not configured on this mirror"),
            )
        })
    }

    // ------------------------------------------------------------------------------------
    // Manifests
    // ------------------------------------------------------------------------------------

    async fn manifest(
        &self,
        head: bool,
        upstream: &Upstream,
        name: &RepoName,
        reference: &ManifestRef,
        accept: &[String],
        log: &mut RequestLog,
    ) -> Result<Response<Body>, ApiError> {
        match reference {
            ManifestRef::Digest(d) => {
                if let Some((bytes, mt)) = self.local_manifest(d).await? {
                    self.metrics.hit(Kind::Manifest);
                    log.source = Some(Source::Cache);
                    return Ok(manifest_response(head, d, &mt, bytes));
                }
                self.metrics.miss(Kind::Manifest);
                log.source = Some(Source::Upstream);
                let m = upstream
                    .get_manifest(name, reference, accept)
                    .await
                    .map_err(|e| upstream_error(&e, ErrorCode::ManifestUnknown, "manifest"))?;
                self.metrics.upstream_bytes(m.bytes.len() as u64);
                self.store_manifest(&m.digest, &m.bytes, &m.media_type)
                    .await?;
                Ok(manifest_response(head, &m.digest, &m.media_type, m.bytes))
            }
            ManifestRef::Tag(tag) => {
                self.manifest_by_tag(head, upstream, name, tag, accept, log)
                    .await
            }
        }
    }

    async fn manifest_by_tag(
        &self,
        head: bool,
        upstream: &Upstream,
        name: &RepoName,
        tag: &Tag,
        accept: &[String],
        log: &mut RequestLog,
    ) -> Result<Response<Body>, ApiError> {
        let host = upstream.host().as_str().to_owned();
        let cached = {
            let store = self.store.clone();
            let (h, n, t) = (host.clone(), name.to_string(), tag.to_string());
            blocking(move || store.tag_get(&h, &n, &t))
                .await?
                .ok()
                .flatten()
        };
        let now = unix_ms();
        let acceptable = |rec: &TagRecord| accepts(accept, &rec.media_type);

        // Fresh enough to skip upstream entirely.
        if let Some(rec) = &cached
            && acceptable(rec)
            && now.saturating_sub(rec.fetched_unix_ms)
                < self.config.tag_cache_ttl.as_millis() as u64
            && let Some((bytes, _)) = self.local_manifest(&rec.digest).await?
        {
            self.metrics.hit(Kind::Manifest);
            log.source = Some(Source::Cache);
            return Ok(manifest_response(head, &rec.digest, &rec.media_type, bytes));
        }

        let reference = ManifestRef::Tag(tag.clone());
        // Revalidate with a HEAD; download only when the digest is new to us.
        let revalidated = match upstream.head_manifest(name, &reference, accept).await {
            Ok(h) => match h.digest {
                Some(d) if accepts(accept, &h.media_type) => self
                    .local_manifest(&d)
                    .await?
                    .map(|(bytes, _)| (d, h.media_type, bytes)),
                _ => None,
            },
            Err(e) => {
                return self
                    .stale_or_error(head, e, cached, name, tag, accept, log)
                    .await;
            }
        };
        let (digest, media_type, bytes, source) = match revalidated {
            Some((d, mt, bytes)) => (d, mt, bytes, Source::Cache),
            None => match upstream.get_manifest(name, &reference, accept).await {
                Ok(m) => {
                    self.metrics.upstream_bytes(m.bytes.len() as u64);
                    self.store_manifest(&m.digest, &m.bytes, &m.media_type)
                        .await?;
                    (m.digest, m.media_type, m.bytes, Source::Upstream)
                }
                Err(e) => {
                    return self
                        .stale_or_error(head, e, cached, name, tag, accept, log)
                        .await;
                }
            },
        };
        match source {
            Source::Cache => self.metrics.hit(Kind::Manifest),
            Source::Upstream => self.metrics.miss(Kind::Manifest),
        }
        log.source = Some(source);
        let rec = TagRecord {
            digest: digest.clone(),
            media_type: media_type.clone(),
            size: bytes.len() as u64,
            fetched_unix_ms: now,
        };
        let store = self.store.clone();
        let (n, t) = (name.to_string(), tag.to_string());
        if let Err(e) = blocking(move || store.tag_put(&host, &n, &t, &rec)).await? {
            warn!(error = %e, "cannot record tag in the index; serving anyway");
        }
        Ok(manifest_response(head, &digest, &media_type, bytes))
    }

    /// When upstream cannot answer for a tag: the last known manifest within the grace
    /// period if upstream is unreachable, the upstream's error otherwise.
    #[allow(clippy::too_many_arguments)]
    async fn stale_or_error(
        &self,
        head: bool,
        err: UpstreamError,
        cached: Option<TagRecord>,
        name: &RepoName,
        tag: &Tag,
        accept: &[String],
        log: &mut RequestLog,
    ) -> Result<Response<Body>, ApiError> {
        let unavailable = err.is_unreachable();
        if unavailable
            && let Some(rec) = cached
            && accepts(accept, &rec.media_type)
        {
            let age = Duration::from_millis(unix_ms().saturating_sub(rec.fetched_unix_ms));
            if age <= self.config.offline_grace
                && let Some((bytes, _)) = self.local_manifest(&rec.digest).await?
            {
                warn!(
                    repo = %name, %tag, digest = %rec.digest, age_s = age.as_secs(), error = %err,
                    "upstream unreachable: serving the last known manifest for this tag"
                );
                self.metrics.stale_manifest();
                self.metrics.hit(Kind::Manifest);
                log.source = Some(Source::Cache);
                log.stale = true;
                let mut resp = manifest_response(head, &rec.digest, &rec.media_type, bytes);
                resp.headers_mut().insert(
                    STALE_HEADER,
                    HeaderValue::from_static("upstream-unreachable"),
                );
                resp.headers_mut().insert(
                    header::WARNING,
                    HeaderValue::from_static("110 shoal \"Response is Stale\""),
                );
                return Ok(resp);
            }
        }
        Err(upstream_error(&err, ErrorCode::ManifestUnknown, "manifest"))
    }

    /// A manifest from the store, with its media type (from the index, or sniffed from the
    /// JSON when the index was rebuilt and lost it).
    async fn local_manifest(&self, d: &Digest) -> Result<Option<(Bytes, String)>, ApiError> {
        let store = self.store.clone();
        let d = d.clone();
        blocking(move || -> Result<Option<(Bytes, String)>, ApiError> {
            let Some(blob) = store.open_blob(&d).map_err(internal)? else {
                return Ok(None);
            };
            if blob.size > MAX_MANIFEST {
                return Err(ApiError::new(
                    ErrorCode::ManifestInvalid,
                    format!("{d} is {} bytes, too large for a manifest", blob.size),
                ));
            }
            let mut buf = vec![0; blob.size as usize];
            std::os::unix::fs::FileExt::read_exact_at(&blob.file, &mut buf, 0).map_err(internal)?;
            // Manifests and blobs share the store: a layer or a config asked for as a manifest
            // is not one (the upstream gets to say `MANIFEST_UNKNOWN`).
            if !looks_like_manifest(&buf) {
                return Ok(None);
            }
            let mt = blob
                .media_type
                .clone()
                .unwrap_or_else(|| sniff_media_type(&buf));
            Ok(Some((Bytes::from(buf), mt)))
        })
        .await?
    }

    async fn store_manifest(&self, d: &Digest, bytes: &Bytes, mt: &str) -> Result<(), ApiError> {
        let store = self.store.clone();
        let (d, bytes, mt) = (d.clone(), bytes.clone(), mt.to_owned());
        blocking(move || store.put(&d, &bytes, Some(&mt)))
            .await?
            .map_err(internal)
    }

    // ------------------------------------------------------------------------------------
    // Blobs
    // ------------------------------------------------------------------------------------

    async fn blob(
        &self,
        head: bool,
        upstream: &Upstream,
        name: &RepoName,
        digest: &Digest,
        range_header: Option<&str>,
        log: &mut RequestLog,
    ) -> Result<Response<Body>, ApiError> {
        if let Some(resp) = self.local_blob(head, digest, range_header, log).await? {
            return Ok(resp);
        }
        if head {
            // A HEAD asks whether the blob exists and how big it is: answer from upstream
            // without downloading anything.
            self.metrics.miss(Kind::Blob);
            log.source = Some(Source::Upstream);
            let size = upstream
                .blob_size(name, digest)
                .await
                .map_err(|e| upstream_error(&e, ErrorCode::BlobUnknown, "blob"))?;
            let mut b = Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(api::CONTENT_DIGEST_HEADER, digest.to_string())
                .header(header::ACCEPT_RANGES, "bytes")
                .header(SOURCE_HEADER, "upstream");
            if let Some(size) = size {
                b = b.header(header::CONTENT_LENGTH, size);
            }
            return Ok(b.body(empty()).expect("valid response"));
        }
        let mut sub = match self.downloads.join(upstream, name, digest) {
            Join::Cached => {
                return self
                    .local_blob(head, digest, range_header, log)
                    .await?
                    .ok_or_else(|| {
                        ApiError::new(ErrorCode::BlobUnknown, "blob was evicted while requested")
                    });
            }
            Join::Started(sub) | Join::Shared(sub) => sub,
        };
        self.metrics.miss(Kind::Blob);
        log.source = Some(Source::Upstream);
        let size = sub.started().await.map_err(|e| match &*e {
            fetch::FetchError::Upstream(u) => upstream_error(u, ErrorCode::BlobUnknown, "blob"),
            other => ApiError::new(ErrorCode::Internal, other.to_string()),
        })?;
        let Some(size) = size else {
            // Upstream sent no length: ranges and Content-Length need the whole blob first.
            sub.finished()
                .await
                .map_err(|e| ApiError::new(ErrorCode::UpstreamError, e.to_string()))?;
            return self
                .local_blob(head, digest, range_header, log)
                .await?
                .ok_or_else(|| ApiError::new(ErrorCode::BlobUnknown, "blob was evicted"));
        };
        let (status, start, end) = resolve_range(range_header, size)?;
        let resp = blob_headers(status, digest, size, start, end).header(SOURCE_HEADER, "upstream");
        let stream = sub.into_stream(start, Some(end));
        Ok(resp.body(stream_body(stream)).expect("valid response"))
    }

    async fn local_blob(
        &self,
        head: bool,
        digest: &Digest,
        range_header: Option<&str>,
        log: &mut RequestLog,
    ) -> Result<Option<Response<Body>>, ApiError> {
        let store = self.store.clone();
        let d = digest.clone();
        let Some(blob) = blocking(move || store.open_blob(&d))
            .await?
            .map_err(internal)?
        else {
            return Ok(None);
        };
        self.metrics.hit(Kind::Blob);
        log.source = Some(Source::Cache);
        let size = blob.size;
        let (status, start, end) = resolve_range(range_header, size)?;
        let resp = blob_headers(status, digest, size, start, end).header(SOURCE_HEADER, "cache");
        if head || size == 0 {
            return Ok(Some(resp.body(empty()).expect("valid response")));
        }
        let stream = file_stream(Arc::new(blob), start, end);
        Ok(Some(
            resp.body(stream_body(stream)).expect("valid response"),
        ))
    }
}

impl AsRef<File> for Blob {
    fn as_ref(&self) -> &File {
        &self.file
    }
}

/// Resolves the `Range` header: (status, first byte, last byte inclusive).
fn resolve_range(header: Option<&str>, size: u64) -> Result<(StatusCode, u64, u64), ApiError> {
    match range::parse_range(header, size) {
        Ok(RangeRequest::Full) => Ok((StatusCode::OK, 0, size.saturating_sub(1))),
        Ok(RangeRequest::Partial(r)) => Ok((StatusCode::PARTIAL_CONTENT, r.start, r.end)),
        Err(e) => Err(ApiError {
            unsatisfied_size: Some(size),
            ..ApiError::new(ErrorCode::RangeInvalid, e.to_string())
        }),
    }
}

fn blob_headers(
    status: StatusCode,
    digest: &Digest,
    size: u64,
    start: u64,
    end: u64,
) -> http::response::Builder {
    let len = if size == 0 { 0 } else { end - start + 1 };
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .header(api::CONTENT_DIGEST_HEADER, digest.to_string())
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{digest}\""))
        .header(header::CACHE_CONTROL, "max-age=31536000");
    if status == StatusCode::PARTIAL_CONTENT {
        b = b.header(
            header::CONTENT_RANGE,
            range::ByteRange { start, end }.content_range(size),
        );
    }
    b
}

/// Reads `start..=end` of a store file in chunks on blocking threads, keeping the next chunk's
/// read in flight while the current one is being sent.
fn file_stream(
    file: Arc<Blob>,
    start: u64,
    end: u64,
) -> BoxStream<'static, Result<Bytes, std::io::Error>> {
    let stop = end + 1;
    futures::stream::iter((start..stop).step_by(fetch::READ_CHUNK))
        .map(move |pos| {
            let len = (stop - pos).min(fetch::READ_CHUNK as u64) as usize;
            fetch::read_at(Arc::clone(&file), pos, len)
        })
        .buffered(2)
        .boxed()
}

fn stream_body(stream: BoxStream<'static, Result<Bytes, std::io::Error>>) -> Body {
    BodyExt::boxed_unsync(StreamBody::new(stream.map(|r| r.map(Frame::data))))
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn json_response(status: StatusCode, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len())
        .body(full(body))
        .expect("valid response")
}

fn manifest_response(
    head: bool,
    digest: &Digest,
    media_type: &str,
    bytes: Bytes,
) -> Response<Body> {
    let b = Response::builder()
        .status(StatusCode::OK)
        .header(
            header::CONTENT_TYPE,
            HeaderValue::from_str(media_type)
                .unwrap_or(HeaderValue::from_static(api::OCI_MANIFEST)),
        )
        .header(header::CONTENT_LENGTH, bytes.len())
        .header(api::CONTENT_DIGEST_HEADER, digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""));
    b.body(if head { empty() } else { full(bytes) })
        .expect("valid response")
}

fn error_response(e: &ApiError) -> Response<Body> {
    let body = ErrorBody::new(e.code, e.message.clone()).to_json();
    let status = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len());
    if e.code == ErrorCode::Unsupported {
        b = b.header(header::ALLOW, "GET, HEAD");
    }
    if let Some(size) = e.unsatisfied_size {
        b = b.header(
            header::CONTENT_RANGE,
            range::unsatisfied_content_range(size),
        );
    }
    b.body(full(body)).expect("valid response")
}

/// The media types a client accepts, from every `Accept` header, without parameters.
fn accept_list(headers: &HeaderMap) -> Result<Vec<String>, ApiError> {
    let mut out = Vec::new();
    for v in headers.get_all(header::ACCEPT) {
        let s = v
            .to_str()
            .map_err(|_| ApiError::new(ErrorCode::BadRequest, "Accept header is not ASCII"))?;
        for item in s.split(',') {
            let media = item.split(';').next().unwrap_or("").trim();
            if media.is_empty() {
                continue;
            }
            let valid = media.len() <= 255
                && media.split_once('/').is_some_and(|(t, s)| {
                    !t.is_empty()
                        && !s.is_empty()
                        && media
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"/+-._*".contains(&b))
                });
            if !valid {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    "Accept header holds an invalid media type",
                ));
            }
            if out.len() >= 32 {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    "too many Accept values",
                ));
            }
            out.push(media.to_owned());
        }
    }
    Ok(out)
}

/// Whether a client with this Accept list takes a manifest of `media_type`.
fn accepts(accept: &[String], media_type: &str) -> bool {
    accept.is_empty()
        || accept
            .iter()
            .any(|a| a == "*/*" || a.eq_ignore_ascii_case(media_type))
}

/// Whether `bytes` is a JSON object with a `schemaVersion`, as every image manifest and index
/// (Docker schema 1 and 2, OCI) is; layers and image configs are not.
fn looks_like_manifest(bytes: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "schemaVersion")]
        _schema_version: u32,
    }
    // An object: serde would also read a struct from a JSON array.
    bytes.trim_ascii_start().first() == Some(&b'{')
        && serde_json::from_slice::<Probe>(bytes).is_ok()
}

fn sniff_media_type(bytes: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Probe>(bytes) {
        Ok(Probe {
            media_type: Some(mt),
            ..
        }) => mt,
        Ok(Probe {
            manifests: Some(_), ..
        }) => api::OCI_INDEX.to_owned(),
        _ => api::OCI_MANIFEST.to_owned(),
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Internal, e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(internal)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A response body that counts what it sends and writes the request's log line when it ends
/// (or is dropped because the client went away or the transfer was aborted).
struct LoggedBody {
    inner: Body,
    bytes: u64,
    /// Content-Length of the response, if it has one.
    expected: Option<u64>,
    complete: bool,
    log: Option<RequestLog>,
    metrics: Metrics,
}

impl HttpBody for LoggedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => this.complete = true,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let Some(log) = self.log.take() else { return };
        let complete = self.complete
            || self.inner.is_end_stream()
            || self.expected.is_some_and(|n| self.bytes >= n);
        if let Some(source) = log.source {
            self.metrics.served(source, self.bytes);
        }
        let upstream = log.upstream.as_ref().map(|h| h.as_str()).unwrap_or("-");
        let source = log.source.map(Source::as_str).unwrap_or("-");
        let elapsed_ms = log.started.elapsed().as_millis() as u64;
        if complete {
            info!(
                method = %log.method, path = %log.path, status = log.status.as_u16(), upstream,
                source, stale = log.stale, bytes = self.bytes, elapsed_ms, "pull"
            );
        } else {
            warn!(
                method = %log.method, path = %log.path, status = log.status.as_u16(), upstream,
                source, bytes = self.bytes, elapsed_ms, "pull aborted before the body was complete"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_manifests_look_like_manifests() {
        assert!(looks_like_manifest(br#"{"schemaVersion":2,"layers":[]}"#));
        assert!(looks_like_manifest(b" {\n \"schemaVersion\": 1 }"));
        assert!(!looks_like_manifest(
            br#"{"architecture":"amd64","rootfs":{}}"#
        ));
        assert!(!looks_like_manifest(&[0x1f, 0x8b, 8, 0]));
        assert!(!looks_like_manifest(b"[2]"));
    }

    #[test]
    fn accept_parsing() {
        let mut h = HeaderMap::new();
        h.append(
            header::ACCEPT,
            HeaderValue::from_static(
                "application/vnd.oci.image.index.v1+json; q=0.9, application/vnd.docker.distribution.manifest.v2+json",
            ),
        );
        h.append(header::ACCEPT, HeaderValue::from_static("*/*"));
        let list = accept_list(&h).unwrap();
        assert_eq!(list.len(), 3);
        assert!(accepts(&list, api::OCI_MANIFEST)); // via */*
        let list = &list[..2];
        assert!(accepts(list, api::OCI_INDEX));
        assert!(!accepts(list, api::OCI_MANIFEST));

        let mut bad = HeaderMap::new();
        bad.append(header::ACCEPT, HeaderValue::from_static("text/html\"<x>"));
        assert!(accept_list(&bad).is_err());
    }

    #[test]
    fn sniffing() {
        assert_eq!(
            sniff_media_type(
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#
            ),
            api::DOCKER_MANIFEST_V2
        );
        assert_eq!(sniff_media_type(br#"{"manifests":[]}"#), api::OCI_INDEX);
        assert_eq!(sniff_media_type(b"not json"), api::OCI_MANIFEST);
    }
}
