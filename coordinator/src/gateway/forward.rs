//! Sending a client's request to a replica: picking one, the coordinator's own upstream
//! authentication, retries of idempotent requests on another replica, passive failure
//! accounting, following redirects to object storage when configured, and rewriting what
//! comes back (`Location`, hop-by-hop headers) for the client.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use shoal_proto::RegistryHost;
use url::Url;

use super::ApiError;
use super::balance::{Affinity, InFlight};
use super::client::{self, Body, ClientBody, ClientBodyFault, IdleTimeout, Observed};
use super::pool::Pool;
use super::upstream_auth::Scope;
use crate::config::RedirectMode;
use crate::metrics::Metrics;

/// Most redirects followed for one request in `follow` mode.
const MAX_REDIRECTS: usize = 5;
/// Most attempts of one idempotent request (on different replicas).
const MAX_ATTEMPTS: usize = 3;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the ones the
/// coordinator sets itself or must never pass on.
const NOT_FORWARDED: [&str; 14] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "host",
    "authorization",
    "proxy-authorization",
    "x-forwarded-host",
    "x-forwarded-proto",
    "forwarded",
];

/// Response headers never passed back to the client.
const NOT_RETURNED: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "www-authenticate",
    "docker-distribution-api-version",
    "alt-svc",
];

/// Removes hop-by-hop headers, including any named in `Connection`.
fn strip(headers: &mut HeaderMap, names: &[&str]) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in names {
        headers.remove(*name);
    }
}

/// What hashing policies can use, owned.
#[derive(Clone, Debug)]
pub enum AffinityKey {
    None,
    Client(IpAddr),
    Digest(String),
}

impl AffinityKey {
    fn as_affinity(&self) -> Affinity<'_> {
        match self {
            AffinityKey::None => Affinity::None,
            AffinityKey::Client(ip) => Affinity::Client(*ip),
            AffinityKey::Digest(d) => Affinity::Digest(d),
        }
    }
}

/// A client request prepared for upstream, independent of the replica it goes to.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub method: Method,
    /// Path and query, `ns` removed.
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub scope: Scope,
    pub affinity: AffinityKey,
    /// The `Range` header, for requests to object storage in follow mode.
    pub range: Option<HeaderValue>,
}

/// What the `X-Forwarded-*` headers say about the client's request.
#[derive(Clone, Copy, Debug)]
pub struct Forwarded<'a> {
    pub client: IpAddr,
    /// `https` or `http`: the listener the request came in on.
    pub proto: &'static str,
    /// The `Host` (or HTTP/2 `:authority`) the client used.
    pub host: Option<&'a str>,
}

impl Outgoing {
    /// Copies the client's end-to-end headers and adds the `X-Forwarded-*` ones.
    pub fn new(
        method: Method,
        path_and_query: String,
        client_headers: &HeaderMap,
        fwd: Forwarded<'_>,
        scope: Scope,
        affinity: AffinityKey,
    ) -> Outgoing {
        let Forwarded {
            client: client_ip,
            proto,
            host,
        } = fwd;
        let mut headers = client_headers.clone();
        strip(&mut headers, &NOT_FORWARDED);
        let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) if !prev.trim().is_empty() => format!("{prev}, {client_ip}"),
            _ => client_ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            headers.insert("x-forwarded-for", v);
        }
        headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
        if let Some(h) = host.and_then(|h| HeaderValue::from_str(h).ok()) {
            headers.insert("x-forwarded-host", h);
        }
        let range = headers.get(header::RANGE).cloned();
        Outgoing {
            method,
            path_and_query,
            headers,
            scope,
            affinity,
            range,
        }
    }

    fn idempotent(&self) -> bool {
        matches!(self.method, Method::GET | Method::HEAD)
    }
}

/// The upstream answer, ready to be turned into the client's response.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Body,
    /// The replica that answered (for upload session affinity).
    pub replica: usize,
    /// Replica label, or the storage origin when a redirect was followed.
    pub upstream: String,
    /// Keeps the replica's in-flight count up while the body streams.
    pub in_flight: Option<InFlight>,
}

/// Why one attempt failed.
enum Failure {
    /// The request never reached the replica: safe to send elsewhere, whatever its method.
    Connect(String),
    Timeout(Duration),
    Other(String),
    Auth(String),
}

/// Sends `out` to `pool`. `body` is `None` for requests without a body, which are
/// replayable: they are retried on another replica after a connect error, and idempotent
/// ones (GET, HEAD) also after a timeout or a 500/502/503/504. `pinned` sends to one replica
/// first (an upload session's).
pub async fn forward(
    pool: &Pool,
    out: &Outgoing,
    mut body: Option<Body>,
    pinned: Option<usize>,
    idle: Duration,
    metrics: &Metrics,
) -> Result<Answer, ApiError> {
    let replayable = body.is_none();
    let attempts = if replayable {
        pool.replicas.len().min(MAX_ATTEMPTS)
    } else {
        1
    };
    if !replayable && pool.auth.has_credentials() && !pool.auth.has_learned() {
        // A request with a body cannot answer a 401 by sending it again: learn the scheme
        // before, from the registry's `/v2/`.
        let i = pinned.or_else(|| pool.pick(Affinity::None, &[]));
        if let Some(i) = i {
            learn_scheme(pool, i).await;
        }
    }
    let mut tried: Vec<usize> = Vec::new();
    let mut last_error = ApiError::upstream(format!("no replica of {} is usable", pool.host));
    for attempt in 0..attempts {
        let pick = match (attempt, pinned) {
            (0, Some(p)) => Some(p),
            _ => pool.pick(out.affinity.as_affinity(), &tried),
        };
        let Some(i) = pick else { break };
        tried.push(i);
        if attempt > 0 {
            metrics.upstream_retry(pool.host.as_str());
        }
        let in_flight = pool.balancer.begin(i);
        let client_fault = Arc::new(OnceLock::new());
        let this_body = match body.take() {
            Some(b) => ClientBody::new(b, Arc::clone(&client_fault)).boxed_unsync(),
            None => client::empty(),
        };
        let has_more = attempt + 1 < attempts;
        let sent = send(pool, i, out, this_body, replayable, idle).await;
        // A client body that failed mid-way (a bad chunk size after the first frame, a
        // stall, a hang-up) makes hyper abort the upstream request without its last chunk,
        // so the replica never takes the truncated body for a whole one. The failure is the
        // client's: the replica is not charged with it, and the client gets the 4xx.
        if sent.is_err()
            && let Some(&fault) = client_fault.get()
        {
            if fault == ClientBodyFault::Malformed {
                metrics.framing_rejection();
            }
            tracing::warn!(replica = %pool.replicas[i].label, ?fault, "request body failed; upstream request aborted");
            return Err(ApiError::client_body(fault));
        }
        match sent {
            Ok(resp) => {
                let status = resp.status();
                if is_server_failure(status) && client_fault.get().is_none() {
                    pool.record_failure(i);
                    if out.idempotent() && has_more {
                        tracing::info!(replica = %pool.replicas[i].label, %status, "retrying on another replica");
                        continue;
                    }
                } else {
                    pool.record_success(i);
                }
                if status == StatusCode::UNAUTHORIZED {
                    tracing::warn!(replica = %pool.replicas[i].label, "replica refused the coordinator's credentials");
                    return Err(ApiError::upstream(format!(
                        "upstream registry {} refused the coordinator's credentials",
                        pool.host
                    )));
                }
                let (parts, incoming) = resp.into_parts();
                let mut answer = Answer {
                    status,
                    headers: parts.headers,
                    body: IdleTimeout::new(incoming, idle).boxed_unsync(),
                    replica: i,
                    upstream: pool.replicas[i].label.clone(),
                    in_flight: Some(in_flight),
                };
                if pool.redirect == RedirectMode::Follow
                    && out.idempotent()
                    && is_redirect(status)
                    && let Some(target) = external_target(&answer.headers, &pool.replicas[i].url)
                {
                    answer = follow(pool, out, answer, target, idle).await?;
                }
                return Ok(answer);
            }
            Err(Failure::Connect(e)) => {
                pool.record_failure(i);
                tracing::info!(replica = %pool.replicas[i].label, error = %e, "cannot reach replica");
                last_error =
                    ApiError::upstream(format!("cannot reach any replica of {}", pool.host));
                if replayable && has_more {
                    continue;
                }
            }
            Err(Failure::Timeout(after)) => {
                pool.record_failure(i);
                last_error = ApiError::new_status(
                    StatusCode::GATEWAY_TIMEOUT,
                    shoal_proto::api::ErrorCode::UpstreamError,
                    format!("upstream {} sent no response for {after:?}", pool.host),
                );
                if out.idempotent() && has_more {
                    continue;
                }
            }
            Err(Failure::Other(e)) => {
                pool.record_failure(i);
                tracing::info!(replica = %pool.replicas[i].label, error = %e, "upstream request failed");
                last_error = ApiError::upstream(format!("upstream {} failed", pool.host));
                if out.idempotent() && has_more {
                    continue;
                }
            }
            Err(Failure::Auth(e)) => {
                tracing::warn!(replica = %pool.replicas[i].label, error = %e, "upstream authentication failed");
                return Err(ApiError::upstream(format!(
                    "cannot authenticate to upstream {}: {e}",
                    pool.host
                )));
            }
        }
        break;
    }
    Err(last_error)
}

fn is_server_failure(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// One attempt on replica `i`, answering at most one 401 challenge for replayable requests.
async fn send(
    pool: &Pool,
    i: usize,
    out: &Outgoing,
    body: Body,
    replayable: bool,
    idle: Duration,
) -> Result<Response<Incoming>, Failure> {
    let replica = &pool.replicas[i];
    let url = format!("{}{}", replica.label, out.path_and_query);
    let mut body = Some(body);
    let mut answered = false;
    loop {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let this_body = body.take().unwrap_or_else(client::empty);
        let watched = Observed::new(this_body, move |_, _| {
            let _ = done_tx.send(());
        })
        .boxed_unsync();
        let mut req = Request::builder()
            .method(out.method.clone())
            .uri(&url)
            .body(watched)
            .map_err(|e| Failure::Other(format!("cannot build the request: {e}")))?;
        *req.headers_mut() = out.headers.clone();
        req.headers_mut()
            .insert(header::HOST, replica.host_header.clone());
        match pool.auth.header(&out.scope, &pool.client).await {
            Ok(Some(h)) => {
                req.headers_mut().insert(header::AUTHORIZATION, h);
            }
            Ok(None) => {}
            Err(e) => return Err(Failure::Auth(e.to_string())),
        }
        // The wait for response headers starts when the request body has been sent, so a
        // long upload is not cut, but a replica that then says nothing is.
        let header_wait = async {
            let _ = done_rx.await;
            tokio::time::sleep(idle).await;
        };
        let resp = tokio::select! {
            r = client::request(&pool.client, req, pool.connect_timeout) => r,
            () = header_wait => return Err(Failure::Timeout(idle)),
        };
        let resp = match resp {
            Ok(r) => r,
            Err(e) if e.is_connect() => return Err(Failure::Connect(error_chain(&e))),
            Err(e) => return Err(Failure::Other(error_chain(&e))),
        };
        if resp.status() == StatusCode::UNAUTHORIZED && replayable && !answered {
            answered = true;
            if let Err(e) = pool
                .auth
                .answer(resp.headers(), &replica.url, &out.scope, &pool.client)
                .await
            {
                return Err(Failure::Auth(e.to_string()));
            }
            continue;
        }
        return Ok(resp);
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// `GET /v2/` on replica `i` to learn its auth scheme from the 401.
async fn learn_scheme(pool: &Pool, i: usize) {
    let replica = &pool.replicas[i];
    let Ok(req) = Request::get(format!("{}/v2/", replica.label))
        .header(header::HOST, replica.host_header.clone())
        .body(client::empty())
    else {
        return;
    };
    if let Ok(Ok(resp)) = tokio::time::timeout(pool.health.timeout, pool.client.request(req)).await
        && resp.status() == StatusCode::UNAUTHORIZED
        && let Err(e) = pool.auth.learn(resp.headers(), &replica.url)
    {
        tracing::warn!(replica = %replica.label, error = %e, "replica sends an unusable auth challenge");
    }
}

/// The redirect target if it leaves the replica's origin (object storage); redirects within
/// the replica are passed on like any other response.
fn external_target(headers: &HeaderMap, replica: &Url) -> Option<Url> {
    let loc = headers.get(header::LOCATION)?.to_str().ok()?;
    let target = replica.join(loc).ok()?;
    (target.origin() != replica.origin()).then_some(target)
}

/// A URL for logs: no credentials, query or fragment (presigned URLs carry signatures there).
fn redact(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

/// Follows a redirect to storage: the same method, the client's `Range`, no credentials.
async fn follow(
    pool: &Pool,
    out: &Outgoing,
    first: Answer,
    mut target: Url,
    idle: Duration,
) -> Result<Answer, ApiError> {
    let replica = first.replica;
    let in_flight = first.in_flight;
    drop(first.body);
    for _ in 0..MAX_REDIRECTS {
        let shown = redact(&target);
        match target.scheme() {
            "https" => {}
            "http" if pool.insecure_http => {}
            _ => {
                return Err(ApiError::upstream(format!(
                    "upstream redirected to {shown}, which is not https"
                )));
            }
        }
        if !target.username().is_empty() || target.password().is_some() {
            return Err(ApiError::upstream(
                "upstream redirect carries credentials".into(),
            ));
        }
        let mut req = Request::builder()
            .method(out.method.clone())
            .uri(target.as_str())
            .body(client::empty())
            .map_err(|e| ApiError::upstream(format!("bad redirect target {shown}: {e}")))?;
        if let Some(r) = &out.range {
            req.headers_mut().insert(header::RANGE, r.clone());
        }
        if let Some(ua) = out.headers.get(header::USER_AGENT) {
            req.headers_mut().insert(header::USER_AGENT, ua.clone());
        }
        tracing::debug!(to = %shown, "following redirect to storage");
        let resp = tokio::time::timeout(
            idle,
            client::request(&pool.client, req, pool.connect_timeout),
        )
        .await
        .map_err(|_| ApiError::upstream(format!("{shown} sent no response for {idle:?}")))?
        .map_err(|e| ApiError::upstream(format!("{shown}: {}", error_chain(&e))))?;
        let status = resp.status();
        if is_redirect(status) {
            let loc = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    ApiError::upstream(format!("redirect from {shown} without Location"))
                })?;
            target = target
                .join(loc)
                .map_err(|_| ApiError::upstream(format!("bad Location from {shown}")))?;
            continue;
        }
        let (parts, incoming) = resp.into_parts();
        let mut origin = target.clone();
        origin.set_path("");
        return Ok(Answer {
            status,
            headers: parts.headers,
            body: IdleTimeout::new(incoming, idle).boxed_unsync(),
            replica,
            upstream: redact(&origin).trim_end_matches('/').to_owned(),
            in_flight,
        });
    }
    Err(ApiError::upstream(format!(
        "more than {MAX_REDIRECTS} redirects from storage"
    )))
}

/// Where `Location` headers that point at a replica are rewritten to.
#[derive(Clone, Debug)]
pub struct PublicBase {
    /// `scheme://authority`, no trailing slash.
    pub base: String,
    /// The authority the client used, which registries also build URLs from (through
    /// `X-Forwarded-Host`).
    pub client_authority: Option<String>,
    /// The `?ns=` the request chose its pool with. `ns` is not forwarded, so the replica's
    /// `Location` lacks it; it is put back, or the upload's next PATCH or PUT would reach the
    /// default pool, where the session does not exist.
    pub ns: Option<RegistryHost>,
}

/// What stays unencoded of an `ns` value in a query: host names, ports and the colons of
/// IPv6 literals; brackets are encoded (not allowed in a query), and decoded again by the
/// gateway's `ns` parser.
const NS_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'.')
    .remove(b'-')
    .remove(b'_')
    .remove(b':');

/// Adds `ns=<host>` to the query of `url` unless it already names one.
fn with_ns(url: String, ns: Option<&RegistryHost>) -> String {
    let Some(ns) = ns else { return url };
    let (head, fragment) = url.split_at(url.find('#').unwrap_or(url.len()));
    let sep = match head.split_once('?') {
        Some((_, q)) if q.split('&').any(|p| p.split('=').next() == Some("ns")) => None,
        None => Some("?"),
        Some((_, "")) => Some(""),
        Some(_) => Some("&"),
    };
    match sep {
        None => url,
        Some(sep) => format!(
            "{head}{sep}ns={}{fragment}",
            utf8_percent_encode(ns.as_str(), NS_VALUE)
        ),
    }
}

/// Rewrites a `Location` from replica `replica` for the client: absolute URLs on the replica
/// (or on the forwarded host, which registries build URLs from) move to the public base, with
/// the request's `ns` added back; relative ones are made absolute on it; anything else (object
/// storage) is left alone.
pub fn rewrite_location(value: &str, replica: &Url, public: &PublicBase) -> Option<String> {
    on_public_base(value, replica, public).map(|url| with_ns(url, public.ns.as_ref()))
}

fn on_public_base(value: &str, replica: &Url, public: &PublicBase) -> Option<String> {
    if value.starts_with('/') && !value.starts_with("//") {
        return Some(format!("{}{value}", public.base));
    }
    let url = Url::parse(value).ok()?;
    let authority = match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        (None, _) => return None,
    };
    let on_replica = url.origin() == replica.origin();
    let on_forwarded = public
        .client_authority
        .as_deref()
        .is_some_and(|a| a.eq_ignore_ascii_case(&authority));
    if !(on_replica || on_forwarded) {
        return None;
    }
    let mut out = public.base.clone();
    out.push_str(url.path());
    if let Some(q) = url.query() {
        out.push('?');
        out.push_str(q);
    }
    Some(out)
}

/// Builds the client's response from an upstream status, headers and body.
pub fn respond(
    status: StatusCode,
    upstream_headers: &HeaderMap,
    body: Body,
    replica: Option<&Url>,
    public: Option<&PublicBase>,
) -> Response<Body> {
    let mut headers = upstream_headers.clone();
    strip(&mut headers, &NOT_RETURNED);
    if let (Some(replica), Some(public)) = (replica, public)
        && let Some(loc) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok())
        && let Some(new) = rewrite_location(loc, replica, public)
        && let Ok(v) = HeaderValue::from_str(&new)
    {
        headers.insert(header::LOCATION, v);
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn public() -> PublicBase {
        PublicBase {
            base: "https://registry.example".into(),
            client_authority: Some("registry.example".into()),
            ns: None,
        }
    }

    #[test]
    fn locations_on_the_replica_move_to_the_public_url() {
        let replica = Url::parse("http://10.0.0.1:5000").unwrap();
        let up = "http://10.0.0.1:5000/v2/a/blobs/uploads/u-1?_state=xyz";
        assert_eq!(
            rewrite_location(up, &replica, &public()).unwrap(),
            "https://registry.example/v2/a/blobs/uploads/u-1?_state=xyz"
        );
        // Built from X-Forwarded-Host by the registry, but with its own scheme.
        let fwd = "http://registry.example/v2/a/blobs/uploads/u-2";
        assert_eq!(
            rewrite_location(fwd, &replica, &public()).unwrap(),
            "https://registry.example/v2/a/blobs/uploads/u-2"
        );
        assert_eq!(
            rewrite_location("/v2/a/blobs/uploads/u-3", &replica, &public()).unwrap(),
            "https://registry.example/v2/a/blobs/uploads/u-3"
        );
        // Object storage stays as it is.
        let s3 = "https://bucket.s3.example/blobs/x?X-Amz-Signature=abc";
        assert_eq!(rewrite_location(s3, &replica, &public()), None);
        assert_eq!(
            rewrite_location("//evil.example/x", &replica, &public()),
            None
        );
    }

    #[test]
    fn locations_keep_the_pool_chosen_by_ns() {
        let replica = Url::parse("http://10.0.0.1:5000").unwrap();
        let with = |ns: &str| PublicBase {
            ns: Some(RegistryHost::parse(ns).unwrap()),
            ..public()
        };
        let b = with("b.example");
        let up = "http://10.0.0.1:5000/v2/a/blobs/uploads/u-1?_state=xyz";
        assert_eq!(
            rewrite_location(up, &replica, &b).unwrap(),
            "https://registry.example/v2/a/blobs/uploads/u-1?_state=xyz&ns=b.example"
        );
        assert_eq!(
            rewrite_location("/v2/a/blobs/uploads/u-3", &replica, &b).unwrap(),
            "https://registry.example/v2/a/blobs/uploads/u-3?ns=b.example"
        );
        assert_eq!(
            rewrite_location("/v2/a/blobs/uploads/u-4?", &replica, &b).unwrap(),
            "https://registry.example/v2/a/blobs/uploads/u-4?ns=b.example"
        );
        // A port keeps its colon; IPv6 brackets are encoded, which the ns parser decodes.
        assert_eq!(
            rewrite_location("/v2/x", &replica, &with("registry.local:5000")).unwrap(),
            "https://registry.example/v2/x?ns=registry.local:5000"
        );
        let v6 = rewrite_location("/v2/x", &replica, &with("[::1]:5000")).unwrap();
        assert_eq!(v6, "https://registry.example/v2/x?ns=%5B::1%5D:5000");
        let (ns, _) = super::super::split_ns(v6.split_once('?').map(|(_, q)| q)).unwrap();
        assert_eq!(ns.unwrap().as_str(), "[::1]:5000");
        // Never twice, and never onto object storage.
        assert_eq!(
            rewrite_location("/v2/x?ns=b.example", &replica, &b).unwrap(),
            "https://registry.example/v2/x?ns=b.example"
        );
        let s3 = "https://bucket.s3.example/blobs/x?X-Amz-Signature=abc";
        assert_eq!(rewrite_location(s3, &replica, &b), None);
        // The response to the client carries it.
        let mut h = HeaderMap::new();
        h.insert(
            header::LOCATION,
            HeaderValue::from_static("/v2/a/blobs/uploads/u-5?_state=s"),
        );
        let resp = respond(
            StatusCode::ACCEPTED,
            &h,
            client::empty(),
            Some(&replica),
            Some(&b),
        );
        assert_eq!(
            resp.headers()[header::LOCATION],
            "https://registry.example/v2/a/blobs/uploads/u-5?_state=s&ns=b.example"
        );
    }

    /// Serves `GET` with `200 {}` on 127.0.0.1 until the test ends.
    async fn tiny_registry() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(client::full("{}")))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
                );
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_replica_that_never_finishes_tls_fails_within_the_connect_timeout() {
        use crate::config::{HealthConfig, Policy, RegistryConfig, ReplicaConfig};
        // Bound and never accepted: the kernel completes the TCP handshake from the backlog,
        // then the ClientHello goes unanswered.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let good = tiny_registry().await;
        let replica = |url: String| ReplicaConfig {
            url: Url::parse(&url).unwrap(),
            weight: 1,
            down: false,
        };
        let connect_timeout = Duration::from_millis(300);
        let cfg = RegistryConfig {
            host: RegistryHost::parse("registry.test").unwrap(),
            policy: Policy::RoundRobin,
            redirect: RedirectMode::Pass,
            credentials: None,
            ca_file: None,
            insecure_http: true,
            connect_timeout,
            health: HealthConfig {
                interval: Duration::from_secs(60),
                timeout: Duration::from_secs(1),
                path: "/v2/".into(),
                max_fails: 1,
                fail_timeout: Duration::from_secs(60),
            },
            replicas: vec![
                replica(format!("https://{}", silent.local_addr().unwrap())),
                replica(format!("http://{good}")),
            ],
        };
        let metrics = Metrics::new();
        let pool = Pool::new(0, &cfg, Duration::from_secs(5), metrics.clone()).unwrap();
        let out = Outgoing::new(
            Method::GET,
            "/v2/".into(),
            &HeaderMap::new(),
            Forwarded {
                client: "10.1.1.1".parse().unwrap(),
                proto: "https",
                host: None,
            },
            Scope::none(),
            AffinityKey::None,
        );
        // Round robin sends one of the two requests to the silent replica first.
        for _ in 0..2 {
            let started = std::time::Instant::now();
            let answer = tokio::time::timeout(
                Duration::from_secs(10),
                forward(&pool, &out, None, None, Duration::from_secs(60), &metrics),
            )
            .await
            .expect("a stalled TLS handshake holds the request")
            .unwrap();
            assert_eq!(answer.status, StatusCode::OK);
            assert_eq!(answer.replica, 1);
            assert!(
                started.elapsed() < connect_timeout * 5,
                "{:?}",
                started.elapsed()
            );
        }
        // A failure of the replica: ejected (max_fails = 1).
        assert!(!pool.balancer.is_available(0, std::time::Instant::now()));
        assert!(pool.balancer.is_available(1, std::time::Instant::now()));
    }

    #[tokio::test]
    async fn the_connect_bound_ends_a_silent_tls_server() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let http = client::build_client(None, Duration::from_secs(5), false).unwrap();
        let req = Request::get(format!("https://{}/v2/", silent.local_addr().unwrap()))
            .body(client::empty())
            .unwrap();
        let started = std::time::Instant::now();
        let err = tokio::time::timeout(
            Duration::from_secs(10),
            client::request(&http, req, Duration::from_millis(200)),
        )
        .await
        .expect("bounded")
        .unwrap_err();
        assert!(
            matches!(err, client::RequestError::NotConnected(_)),
            "{err}"
        );
        assert!(err.is_connect());
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[test]
    fn hop_by_hop_and_credentials_are_not_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic eA=="),
        );
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        h.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.1"));
        h.insert("x-forwarded-host", HeaderValue::from_static("spoofed"));
        let out = Outgoing::new(
            Method::GET,
            "/v2/".into(),
            &h,
            Forwarded {
                client: "10.1.1.1".parse().unwrap(),
                proto: "https",
                host: Some("registry.example"),
            },
            Scope::none(),
            AffinityKey::None,
        );
        assert!(out.headers.get(header::AUTHORIZATION).is_none());
        assert!(out.headers.get("x-secret").is_none());
        assert!(out.headers.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(out.headers[header::ACCEPT], "application/json");
        assert_eq!(out.headers["x-forwarded-for"], "192.0.2.1, 10.1.1.1");
        assert_eq!(out.headers["x-forwarded-proto"], "https");
        assert_eq!(out.headers["x-forwarded-host"], "registry.example");
    }
}
