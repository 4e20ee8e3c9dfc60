//! The registry gateway: the front door every client and agent talks to.
//!
//! One request goes through [`Gateway::handle`]:
//! 1. HTTP/1 framing verdict from [`h1guard`] (ambiguous framing → 400, connection closed);
//! 2. `/_ping`, `/v1/_ping`, `/healthz` → 200 without credentials; anything outside `/v2` → 404;
//! 3. authentication (`Authorization: Basic` against the htpasswd file; 401 with a Basic
//!    challenge, 429 when rate-limited);
//! 4. route and authorisation per repository and action (403 `DENIED`);
//! 5. pool selection by `?ns=` (the default pool without it);
//! 6. the request body's first frame is read before anything goes upstream, so a body that
//!    is malformed from the start (a bad chunk size) is refused without reaching a replica;
//! 7. forwarding ([`forward`]): coalesced for GETs and HEADs of a blob or manifest digest
//!    ([`coalesce`]; for a manifest only among requests with the same `Accept`, which
//!    decides the registry's answer), pinned to the session's replica for uploads ([`uploads`]), balanced and
//!    retried otherwise; the response's `Location` is rewritten to the coordinator (with the
//!    request's `ns`, so an upload's next request reaches the same pool);
//! 8. every response gets `Docker-Distribution-Api-Version: registry/2.0`, an access log line
//!    and metrics when its body ends.

pub mod accesslog;
pub mod balance;
pub mod client;
pub mod coalesce;
pub mod forward;
pub mod h1guard;
pub mod health;
pub mod pool;
pub mod server;
pub mod uploads;
pub mod upstream_auth;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use futures::FutureExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use shoal_proto::api::{API_VERSION, API_VERSION_HEADER, ErrorBody, ErrorCode, Route};
use shoal_proto::reference::ManifestRef;
use shoal_proto::{RegistryHost, RepoName};

use self::accesslog::{AccessLog, Entry};
use self::client::{Body, ClientBodyFault, IdleTimeout, Observed};
use self::coalesce::{Coalescer, FlightKey, Head, Upstreamed};
use self::forward::{AffinityKey, Outgoing, PublicBase};
use self::h1guard::{SharedTracker, Verdict};
use self::pool::Pool;
use self::uploads::UploadSessions;
use self::upstream_auth::Scope;
use crate::access::Action;
use crate::auth::{AuthFailure, Authenticator, parse_basic_authorization};
use crate::config::{Config, Policy, ServerConfig};
use crate::metrics::Metrics;

/// Largest catalog response filtered by access rules.
const MAX_CATALOG_BYTES: usize = 8 << 20;

/// An error answered to the client as OCI error JSON.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    /// Close the connection after answering (framing errors).
    pub close: bool,
    /// Add the Basic challenge (401).
    pub challenge: bool,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError::new_status(
            StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            message,
        )
    }

    pub fn new_status(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            close: false,
            challenge: false,
            retry_after: None,
        }
    }

    pub fn upstream(message: String) -> ApiError {
        ApiError::new(ErrorCode::UpstreamError, message)
    }

    pub fn internal(message: &str) -> ApiError {
        ApiError::new(ErrorCode::Internal, message)
    }

    fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError {
            challenge: true,
            ..ApiError::new(ErrorCode::Unauthorized, message)
        }
    }

    /// The answer to a request whose body failed (`Gone` is answered only for the log: the
    /// client is not there to read it). The connection is closed either way: its framing
    /// can no longer be followed.
    fn client_body(fault: ClientBodyFault) -> ApiError {
        match fault {
            ClientBodyFault::Malformed => ApiError::framing("invalid request body"),
            ClientBodyFault::Stalled(after) => ApiError {
                close: true,
                ..ApiError::new_status(
                    StatusCode::REQUEST_TIMEOUT,
                    ErrorCode::BadRequest,
                    format!("no request body data for {after:?}"),
                )
            },
            ClientBodyFault::Gone => ApiError {
                close: true,
                ..ApiError::new(ErrorCode::BadRequest, "the request body ended early")
            },
        }
    }

    fn framing(reason: &str) -> ApiError {
        ApiError {
            close: true,
            ..ApiError::new(
                ErrorCode::BadRequest,
                format!("malformed request: {reason}"),
            )
        }
    }
}

/// The connection a request arrived on.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// The HTTP/1 framing tracker of the connection; `None` for HTTP/2.
    pub guard: Option<SharedTracker>,
}

/// What a request needs from the access rules.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Need {
    /// `/v2/`: any authenticated user.
    Base,
    Catalog,
    Repo {
        name: RepoName,
        action: Action,
    },
}

/// Maps a method and route to what it needs. Methods a registry does not serve → 405.
fn need_of(method: &Method, route: &Route) -> Result<Need, ApiError> {
    let repo = |name: &RepoName, action| Need::Repo {
        name: name.clone(),
        action,
    };
    let need = match (route, method) {
        (Route::Base, &Method::GET | &Method::HEAD) => Need::Base,
        (Route::Catalog, &Method::GET) => Need::Catalog,
        (Route::Manifest { name, .. }, &Method::GET | &Method::HEAD) => repo(name, Action::Pull),
        (Route::Manifest { name, .. }, &Method::PUT) => repo(name, Action::Push),
        (Route::Manifest { name, .. }, &Method::DELETE) => repo(name, Action::Delete),
        (Route::Blob { name, .. }, &Method::GET | &Method::HEAD) => repo(name, Action::Pull),
        (Route::Blob { name, .. }, &Method::DELETE) => repo(name, Action::Delete),
        (
            Route::BlobUpload { name },
            &Method::POST
            | &Method::PATCH
            | &Method::PUT
            | &Method::GET
            | &Method::HEAD
            | &Method::DELETE,
        ) => repo(name, Action::Push),
        (Route::TagsList { name }, &Method::GET | &Method::HEAD) => repo(name, Action::Pull),
        _ => {
            return Err(ApiError::new(
                ErrorCode::Unsupported,
                format!("{method} is not supported on this path"),
            ));
        }
    };
    Ok(need)
}

/// The token scope the coordinator asks an upstream token server for.
fn scope_of(need: &Need, mount_from: Option<&RepoName>) -> Scope {
    match need {
        Need::Base => Scope::none(),
        Need::Catalog => Scope::new(["registry:catalog:*".to_owned()]),
        Need::Repo { name, action } => {
            let actions = match action {
                Action::Pull => "pull",
                Action::Push => "pull,push",
                Action::Delete => "delete",
            };
            let mut s = vec![format!("repository:{name}:{actions}")];
            if let Some(from) = mount_from {
                s.push(format!("repository:{from}:pull"));
            }
            Scope::new(s)
        }
    }
}

/// Splits `ns` off a query string: the registry host asked for, and the rest to forward.
fn split_ns(query: Option<&str>) -> Result<(Option<RegistryHost>, String), ApiError> {
    let mut ns = None;
    let mut rest: Vec<&str> = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != "ns" {
            rest.push(pair);
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
        ns = Some(RegistryHost::parse(&decoded).map_err(|e| {
            ApiError::new(ErrorCode::BadRequest, format!("invalid ns parameter: {e}"))
        })?);
    }
    Ok((ns, rest.join("&")))
}

/// The repository named by a cross-repository mount (`POST ...?mount=<digest>&from=<repo>`).
fn mount_from(query: &str) -> Result<Option<RepoName>, ApiError> {
    let mut from = None;
    for pair in query.split('&') {
        if let Some(v) = pair.strip_prefix("from=") {
            let decoded = percent_encoding::percent_decode_str(v)
                .decode_utf8()
                .map_err(|_| ApiError::new(ErrorCode::NameInvalid, "from is not valid UTF-8"))?;
            from = Some(RepoName::parse(&decoded).map_err(|e| {
                ApiError::new(
                    ErrorCode::NameInvalid,
                    format!("invalid from parameter: {e}"),
                )
            })?);
        }
    }
    Ok(from)
}

/// Per-request facts for the access log, filled in as the request is handled.
struct LogCtx {
    started: Instant,
    time: SystemTime,
    remote: IpAddr,
    user: Option<String>,
    method: String,
    uri: String,
    version: &'static str,
    referer: Option<String>,
    user_agent: Option<String>,
    upstream: Option<String>,
}

fn header_string(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

/// A request ready to go upstream.
struct Prepared {
    route: Route,
    method: Method,
    path: String,
    need: Need,
    user: Option<String>,
    pool_index: usize,
    pool: Arc<Pool>,
    out: Outgoing,
    body: Option<Body>,
    /// Where `Location` headers are rewritten to.
    public: Option<PublicBase>,
    /// The digest of a coalescable GET or HEAD.
    digest: Option<shoal_proto::Digest>,
}

impl Prepared {
    fn coalesce_key(&self) -> Option<FlightKey> {
        let digest = self.digest.clone()?;
        let (name, manifest) = match &self.route {
            Route::Blob { name, .. } => (name, false),
            Route::Manifest { name, .. } => (name, true),
            _ => return None,
        };
        Some(FlightKey {
            pool: self.pool_index,
            repo: name.clone(),
            digest,
            manifest,
            head: self.method == Method::HEAD,
            accept: manifest.then(|| coalesce::accept_key(&self.out.headers)),
        })
    }
}

/// The gateway's shared state.
pub struct Gateway {
    server: ServerConfig,
    auth: Option<Arc<Authenticator>>,
    pools: Vec<Arc<Pool>>,
    default_pool: usize,
    coalescer: Option<Arc<Coalescer>>,
    uploads: UploadSessions,
    metrics: Metrics,
    access_log: AccessLog,
    /// `POST /shoal/v1/enroll`, when the cluster part runs.
    enroll: Option<Arc<crate::cluster::enroll::Enroller>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("pools", &self.pools.len())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    pub fn new(
        config: &Config,
        auth: Option<Arc<Authenticator>>,
        pools: Vec<Arc<Pool>>,
        metrics: Metrics,
        access_log: AccessLog,
    ) -> Gateway {
        let coalescer = config
            .coalescing
            .enabled
            .then(|| Coalescer::new(config.coalescing.spool_dir.clone(), metrics.clone()));
        Gateway {
            server: config.server.clone(),
            auth,
            pools,
            default_pool: config.default_registry,
            coalescer,
            uploads: UploadSessions::default(),
            metrics,
            access_log,
            enroll: None,
        }
    }

    /// Serves agent enrollment on [`ENROLL_PATH`](shoal_proto::enroll::ENROLL_PATH) (no
    /// front-door credentials: the bootstrap token in the body authenticates).
    pub fn with_enrollment(mut self, enroller: Arc<crate::cluster::enroll::Enroller>) -> Gateway {
        self.enroll = Some(enroller);
        self
    }

    /// Answers one request.
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Response<Body> {
        let mut log = LogCtx {
            started: Instant::now(),
            time: SystemTime::now(),
            remote: conn.peer.ip(),
            user: None,
            method: req.method().to_string(),
            uri: req
                .uri()
                .path_and_query()
                .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned()),
            version: version_str(req.version()),
            referer: header_string(req.headers(), header::REFERER),
            user_agent: header_string(req.headers(), header::USER_AGENT),
            upstream: None,
        };
        let h1 = req.version() < Version::HTTP_2;
        let mut resp = match self.dispatch(req, conn, &mut log).await {
            Ok(resp) => resp,
            Err(e) => self.error_response(&e, h1),
        };
        resp.headers_mut()
            .insert(API_VERSION_HEADER, HeaderValue::from_static(API_VERSION));
        let status = resp.status().as_u16();
        let gateway = Arc::clone(self);
        let (parts, body) = resp.into_parts();
        let head_only = log.method == "HEAD";
        let observed = Observed::new(body, move |bytes, complete| {
            let upstream = log.upstream.as_deref().unwrap_or("-").to_owned();
            gateway.metrics.request(status, &upstream, bytes);
            if !complete && !head_only {
                tracing::debug!(uri = %log.uri, bytes, "response body ended before completion");
            }
            gateway.access_log.log(&Entry {
                remote: log.remote,
                user: log.user,
                time: log.time,
                method: log.method,
                uri: log.uri,
                version: log.version,
                status,
                bytes,
                referer: log.referer,
                user_agent: log.user_agent,
                upstream: log.upstream,
                request_time: log.started.elapsed(),
            });
        });
        Response::from_parts(parts, observed.boxed_unsync())
    }

    fn error_response(&self, e: &ApiError, h1: bool) -> Response<Body> {
        let body = ErrorBody::new(e.code, e.message.clone()).to_json();
        let mut resp = Response::new(client::full(body));
        *resp.status_mut() = e.status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if e.challenge {
            // The realm was checked at load: printable ASCII without quotes or backslashes.
            if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{}\"", self.server.realm))
            {
                h.insert(header::WWW_AUTHENTICATE, v);
            }
        }
        if let Some(secs) = e.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if e.close && h1 {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    async fn dispatch(
        self: &Arc<Self>,
        req: Request<Incoming>,
        conn: &ConnInfo,
        log: &mut LogCtx,
    ) -> Result<Response<Body>, ApiError> {
        if let Some(guard) = &conn.guard
            && let Verdict::Reject(reason) = h1guard::next_verdict(guard)
        {
            self.metrics.framing_rejection();
            tracing::warn!(peer = %conn.peer, reason, "refusing a request with ambiguous framing");
            return Err(ApiError::framing(reason));
        }
        let path = req.uri().path();
        if matches!(path, "/_ping" | "/v1/_ping" | "/healthz") {
            let mut resp = Response::new(client::full("ok\n"));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            return Ok(resp);
        }
        if path == shoal_proto::enroll::ENROLL_PATH
            && let Some(enroller) = &self.enroll
        {
            return Ok(enroller.handle(req, conn.peer).await);
        }
        if path != "/v2" && !path.starts_with("/v2/") {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                "not a registry API path",
            ));
        }
        let user = self.authenticate(req.headers(), conn.peer.ip()).await?;
        log.user = user.clone();
        let p = self.prepare(req, conn, user).await?;
        match (&self.coalescer, p.coalesce_key()) {
            (Some(coalescer), Some(key)) => self.coalesced(coalescer, key, p, log).await,
            _ => self.forwarded(p, log).await,
        }
    }

    /// Everything about a request that is decided before it goes upstream: route and
    /// authorisation, pool, the first body frame, and the outgoing request.
    async fn prepare(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
        user: Option<String>,
    ) -> Result<Prepared, ApiError> {
        let path = req.uri().path().to_owned();
        let route = Route::parse(&path).map_err(|e| ApiError::new(e.code(), e.to_string()))?;
        if uploads::has_bad_id(&path) {
            return Err(ApiError::new(
                ErrorCode::BlobUploadUnknown,
                "invalid upload id",
            ));
        }
        let method = req.method().clone();
        let need = need_of(&method, &route)?;
        let (ns, query) = split_ns(req.uri().query())?;
        let from = if method == Method::POST && matches!(route, Route::BlobUpload { .. }) {
            mount_from(&query)?
        } else {
            None
        };
        self.authorize(user.as_deref(), &need, from.as_ref())?;
        let pool_index = match &ns {
            None => self.default_pool,
            Some(host) => self
                .pools
                .iter()
                .position(|p| p.host == *host)
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::NameUnknown,
                        format!("registry {host} is not served by this coordinator"),
                    )
                })?,
        };
        let pool = Arc::clone(&self.pools[pool_index]);

        let (parts, body) = req.into_parts();
        let body = if body.is_end_stream() {
            None
        } else {
            self.first_frame(body).await?
        };

        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| parts.uri.authority().map(|a| a.as_str().to_owned()));
        let scheme = if conn.tls { "https" } else { "http" };
        let public = match (&self.server.external_url, &host) {
            (Some(url), _) => Some(PublicBase {
                base: url.as_str().trim_end_matches('/').to_owned(),
                client_authority: host.clone(),
                ns: ns.clone(),
            }),
            (None, Some(h)) => Some(PublicBase {
                base: format!("{scheme}://{h}"),
                client_authority: Some(h.clone()),
                ns: ns.clone(),
            }),
            (None, None) => None,
        };
        let digest = match &route {
            Route::Blob { digest, .. } => Some(digest.clone()),
            Route::Manifest {
                reference: ManifestRef::Digest(d),
                ..
            } => Some(d.clone()),
            _ => None,
        };
        let affinity = match (pool.policy, &digest) {
            (Policy::IpHash, _) => AffinityKey::Client(conn.peer.ip()),
            (Policy::DigestHash, Some(d)) => AffinityKey::Digest(d.to_string()),
            _ => AffinityKey::None,
        };
        // Plain GETs (and HEADs: many agents check a blob at once before taking it from
        // peers) of content-addressed objects may share one upstream request.
        let coalescable = (method == Method::GET || method == Method::HEAD)
            && body.is_none()
            && !parts.headers.contains_key(header::RANGE)
            && !parts.headers.keys().any(|k| k.as_str().starts_with("if-"));
        let path_and_query = if query.is_empty() {
            path.clone()
        } else {
            format!("{path}?{query}")
        };
        let out = Outgoing::new(
            method.clone(),
            path_and_query,
            &parts.headers,
            forward::Forwarded {
                client: conn.peer.ip(),
                proto: scheme,
                host: host.as_deref(),
            },
            scope_of(&need, from.as_ref()),
            affinity,
        );
        Ok(Prepared {
            route,
            method,
            path,
            need,
            user,
            pool_index,
            pool,
            out,
            body,
            public,
            digest: digest.filter(|_| coalescable),
        })
    }

    /// Joins (or starts) the shared upstream request for a content-addressed GET.
    async fn coalesced(
        &self,
        coalescer: &Arc<Coalescer>,
        key: FlightKey,
        p: Prepared,
        log: &mut LogCtx,
    ) -> Result<Response<Body>, ApiError> {
        let idle = self.server.idle_timeout;
        let metrics = self.metrics.clone();
        let Prepared {
            pool, out, public, ..
        } = p;
        let (mut sub, _shared) = coalescer.join(key, move || {
            async move {
                let a = forward::forward(&pool, &out, None, None, idle, &metrics).await?;
                let in_flight = a.in_flight;
                let body = Observed::new(a.body, move |_, _| drop(in_flight)).boxed_unsync();
                Ok(Upstreamed {
                    head: Head {
                        status: a.status,
                        headers: a.headers,
                        upstream: a.upstream,
                        replica_url: Some(pool.replicas[a.replica].url.clone()),
                    },
                    body,
                })
            }
            .boxed()
        });
        let head = sub.head().await?;
        log.upstream = Some(head.upstream.clone());
        Ok(forward::respond(
            head.status,
            &head.headers,
            sub.into_body(),
            head.replica_url.as_ref(),
            public.as_ref(),
        ))
    }

    /// Sends a request upstream on its own: balanced and retried, or pinned to its upload
    /// session's replica.
    async fn forwarded(&self, p: Prepared, log: &mut LogCtx) -> Result<Response<Body>, ApiError> {
        let session = uploads::upload_id(&p.path).map(str::to_owned);
        let pinned = session
            .as_deref()
            .and_then(|id| self.uploads.get(p.pool_index, id, Instant::now()));
        let answer = forward::forward(
            &p.pool,
            &p.out,
            p.body,
            pinned,
            self.server.idle_timeout,
            &self.metrics,
        )
        .await?;
        log.upstream = Some(answer.upstream.clone());
        if matches!(p.route, Route::BlobUpload { .. }) {
            self.track_upload(p.pool_index, &p.method, session.as_deref(), &answer);
        }
        let in_flight = answer.in_flight;
        let mut body = Observed::new(answer.body, move |_, _| drop(in_flight)).boxed_unsync();
        let mut headers = answer.headers;
        if p.need == Need::Catalog
            && answer.status == StatusCode::OK
            && let (Some(auth), Some(user)) = (&self.auth, p.user.as_deref())
            && auth.rules_enabled()
        {
            let bytes = read_limited(body, MAX_CATALOG_BYTES)
                .await
                .map_err(|e| ApiError::upstream(format!("cannot read the catalog: {e}")))?;
            body = client::full(filter_catalog(&bytes, |name| {
                auth.authorize(user, name, Action::Pull)
            })?);
            headers.remove(header::CONTENT_LENGTH);
        }
        Ok(forward::respond(
            answer.status,
            &headers,
            body,
            Some(&p.pool.replicas[answer.replica].url),
            p.public.as_ref(),
        ))
    }

    /// Records which replica holds an upload session, or forgets a finished one.
    fn track_upload(
        &self,
        pool: usize,
        method: &Method,
        session: Option<&str>,
        answer: &forward::Answer,
    ) {
        let now = Instant::now();
        match (method, session) {
            (&Method::POST, _) if answer.status == StatusCode::ACCEPTED => {
                let id = answer
                    .headers
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .map(|loc| loc.split('?').next().unwrap_or(loc))
                    .and_then(|path| uploads::upload_id(path).map(str::to_owned));
                if let Some(id) = id {
                    self.uploads.insert(pool, &id, answer.replica, now);
                }
            }
            (&Method::PUT | &Method::DELETE, Some(id))
                if answer.status.is_success() || answer.status == StatusCode::NOT_FOUND =>
            {
                self.uploads.remove(pool, id);
            }
            _ => {}
        }
    }

    /// Reads the first frame of a request body before anything is sent upstream: a body that
    /// is malformed from its first byte (a bad chunk size) is refused here, and an empty
    /// chunked body becomes no body. Returns the body with that frame put back in front. (A
    /// body that fails later aborts the upstream request: see [`forward::forward`].)
    async fn first_frame(&self, body: Incoming) -> Result<Option<Body>, ApiError> {
        let mut timed = IdleTimeout::new(body, self.server.idle_timeout);
        let first = match timed.frame().await {
            None => return Ok(None),
            Some(Err(e)) => {
                let fault = ClientBodyFault::of(e.as_ref());
                if fault == ClientBodyFault::Malformed {
                    tracing::warn!(error = %e, "refusing a request whose body is malformed");
                    self.metrics.framing_rejection();
                } else {
                    tracing::info!(error = %e, "request body failed before it was forwarded");
                }
                return Err(ApiError::client_body(fault));
            }
            Some(Ok(frame)) => frame,
        };
        let metrics = self.metrics.clone();
        let rest = http_body_util::BodyStream::new(timed);
        let stream =
            futures::StreamExt::chain(futures::stream::once(async move { Ok(first) }), rest);
        let body = http_body_util::StreamBody::new(stream).boxed_unsync();
        Ok(Some(
            Observed::new(body, move |bytes, _| metrics.request_bytes(bytes)).boxed_unsync(),
        ))
    }

    async fn authenticate(
        &self,
        headers: &HeaderMap,
        ip: IpAddr,
    ) -> Result<Option<String>, ApiError> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            self.metrics.auth_failure("missing");
            return Err(ApiError::unauthorized("authentication required"));
        };
        let credentials = parse_basic_authorization(value.as_bytes()).map_err(|e| {
            self.metrics.auth_failure("malformed");
            ApiError::unauthorized(format!("authentication required: {e}"))
        })?;
        match auth.verify_async(ip, &credentials).await {
            Ok(()) => Ok(Some(credentials.user)),
            Err(AuthFailure::BadCredentials) => {
                self.metrics.auth_failure("bad_credentials");
                tracing::info!(client = %ip, user = %credentials.user, "authentication failed");
                Err(ApiError::unauthorized("invalid user name or password"))
            }
            Err(e @ AuthFailure::RateLimited { retry_after }) => {
                self.metrics.auth_failure("rate_limited");
                Err(ApiError {
                    retry_after: Some(retry_after.as_secs().max(1)),
                    ..ApiError::new(ErrorCode::TooManyRequests, e.to_string())
                })
            }
        }
    }

    fn authorize(
        &self,
        user: Option<&str>,
        need: &Need,
        from: Option<&RepoName>,
    ) -> Result<(), ApiError> {
        let (Some(auth), Some(user)) = (&self.auth, user) else {
            return Ok(());
        };
        let deny =
            |what: String| ApiError::new(ErrorCode::Denied, format!("user {user} may not {what}"));
        match need {
            Need::Base | Need::Catalog => Ok(()),
            Need::Repo { name, action } => {
                if !auth.authorize(user, name, *action) {
                    return Err(deny(format!("{action} {name}")));
                }
                if let Some(from) = from
                    && !auth.authorize(user, from, Action::Pull)
                {
                    return Err(deny(format!("pull {from}")));
                }
                Ok(())
            }
        }
    }
}

/// Reads a whole body of at most `limit` bytes. (Not `http_body_util::Limited`: its
/// `Into<BoxError>` bound on an already boxed error makes the handler future fail the
/// compiler's `Send` check.)
async fn read_limited(mut body: Body, limit: usize) -> Result<Bytes, String> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Some(data) = frame.data_ref() {
            if buf.len() + data.len() > limit {
                return Err(format!("longer than {limit} bytes"));
            }
            buf.extend_from_slice(data);
        }
    }
    Ok(buf.freeze())
}

/// Keeps the repositories of a `_catalog` answer that `allowed` accepts.
fn filter_catalog(bytes: &[u8], allowed: impl Fn(&RepoName) -> bool) -> Result<Bytes, ApiError> {
    let mut doc: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|_| ApiError::upstream("upstream catalog is not JSON".into()))?;
    if let Some(list) = doc
        .get_mut("repositories")
        .and_then(serde_json::Value::as_array_mut)
    {
        list.retain(|v| {
            v.as_str()
                .and_then(|s| RepoName::parse(s).ok())
                .is_some_and(|name| allowed(&name))
        });
    }
    Ok(Bytes::from(doc.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(p: &str) -> Route {
        Route::parse(p).unwrap()
    }

    #[test]
    fn actions_per_method_and_route() {
        let d = format!("sha256:{}", "a".repeat(64));
        let cases = [
            ("GET", "/v2/".to_owned(), Some(None)),
            ("GET", "/v2/_catalog".to_owned(), Some(None)),
            (
                "HEAD",
                "/v2/a/manifests/v1".to_owned(),
                Some(Some(Action::Pull)),
            ),
            (
                "PUT",
                "/v2/a/manifests/v1".to_owned(),
                Some(Some(Action::Push)),
            ),
            (
                "DELETE",
                "/v2/a/manifests/v1".to_owned(),
                Some(Some(Action::Delete)),
            ),
            ("GET", format!("/v2/a/blobs/{d}"), Some(Some(Action::Pull))),
            (
                "DELETE",
                format!("/v2/a/blobs/{d}"),
                Some(Some(Action::Delete)),
            ),
            (
                "POST",
                "/v2/a/blobs/uploads/".to_owned(),
                Some(Some(Action::Push)),
            ),
            (
                "PATCH",
                "/v2/a/blobs/uploads/u1".to_owned(),
                Some(Some(Action::Push)),
            ),
            (
                "GET",
                "/v2/a/blobs/uploads/u1".to_owned(),
                Some(Some(Action::Push)),
            ),
            (
                "GET",
                "/v2/a/tags/list".to_owned(),
                Some(Some(Action::Pull)),
            ),
            ("PUT", format!("/v2/a/blobs/{d}"), None),
            ("POST", "/v2/a/manifests/v1".to_owned(), None),
            ("DELETE", "/v2/".to_owned(), None),
        ];
        for (m, p, want) in cases {
            let method = Method::from_bytes(m.as_bytes()).unwrap();
            let got = need_of(&method, &route(&p));
            match want {
                None => assert_eq!(
                    got.unwrap_err().status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{m} {p}"
                ),
                Some(None) => assert!(
                    matches!(got.unwrap(), Need::Base | Need::Catalog),
                    "{m} {p}"
                ),
                Some(Some(a)) => match got.unwrap() {
                    Need::Repo { action, .. } => assert_eq!(action, a, "{m} {p}"),
                    other => panic!("{m} {p}: {other:?}"),
                },
            }
        }
    }

    #[test]
    fn ns_is_split_off_and_checked() {
        let (ns, rest) = split_ns(Some("n=10&ns=docker.io&last=x")).unwrap();
        assert_eq!(ns.unwrap().as_str(), "docker.io");
        assert_eq!(rest, "n=10&last=x");
        let (ns, rest) = split_ns(None).unwrap();
        assert!(ns.is_none() && rest.is_empty());
        assert!(split_ns(Some("ns=a.io&ns=b.io")).is_err());
        assert!(split_ns(Some("ns=..%2f")).is_err());
        let (ns, _) = split_ns(Some("ns=registry.local%3A5000")).unwrap();
        assert_eq!(ns.unwrap().as_str(), "registry.local:5000");
    }

    #[test]
    fn mount_sources_are_parsed_and_scoped() {
        assert_eq!(
            mount_from("mount=sha256:x&from=team%2Fbase")
                .unwrap()
                .unwrap()
                .as_str(),
            "team/base"
        );
        assert!(mount_from("from=..").is_err());
        assert!(mount_from("digest=x").unwrap().is_none());
        let need = Need::Repo {
            name: RepoName::parse("team/app").unwrap(),
            action: Action::Push,
        };
        let from = RepoName::parse("team/base").unwrap();
        assert_eq!(
            scope_of(&need, Some(&from)),
            Scope::new([
                "repository:team/app:pull,push".to_owned(),
                "repository:team/base:pull".to_owned()
            ])
        );
    }

    #[test]
    fn catalog_is_filtered_by_rules() {
        let body = br#"{"repositories":["team/a","secret/b","team/c","Bad Name"]}"#;
        let out = filter_catalog(body, |n| n.as_str().starts_with("team/")).unwrap();
        assert_eq!(&out[..], br#"{"repositories":["team/a","team/c"]}"#);
    }
}
