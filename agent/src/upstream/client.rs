//! One request to the upstream: authentication, redirects followed by hand, timeouts, and the
//! retry loop around it.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, StatusCode};
use reqwest::{Response, Url};
use shoal_proto::RepoName;

use super::error::{UpstreamError, from_body_error, from_send_error};
use super::retry::parse_retry_after;
use super::{Inner, MAX_REDIRECTS, challenge};

/// An idempotent request to the registry, relative to its base URL.
pub(super) struct Request {
    pub method: Method,
    /// Starts with `/v2/`; built only from validated names, references and digests.
    pub path: String,
    /// The repository the request is about; decides the token scope.
    pub repo: Option<RepoName>,
    pub headers: HeaderMap,
}

/// A URL fit for logs and errors: no user info, query or fragment (presigned URLs carry
/// their signature in the query).
pub(super) fn redact(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    // Both fail only for URLs that cannot have credentials, which then have none.
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.into()
}

pub(super) fn content_length(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get(CONTENT_LENGTH)?.to_str().ok()?;
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// The error for a non-success status the caller did not handle itself.
pub(super) fn status_error(resp: &Response, url: &str) -> UpstreamError {
    let url = url.to_owned();
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    match resp.status() {
        StatusCode::NOT_FOUND => UpstreamError::NotFound { url },
        StatusCode::FORBIDDEN => UpstreamError::Denied { url },
        StatusCode::UNAUTHORIZED => UpstreamError::Unauthorized {
            url,
            reason: "credentials refused".into(),
        },
        StatusCode::TOO_MANY_REQUESTS => UpstreamError::TooManyRequests { url, retry_after },
        status => UpstreamError::Status {
            url,
            status,
            retry_after,
        },
    }
}

fn is_followed_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

impl Inner {
    pub(super) fn endpoint(&self, path: &str) -> Result<Url, UpstreamError> {
        let s = format!("{}{}", self.base_prefix, path);
        let mut url =
            Url::parse(&s).map_err(|e| UpstreamError::Config(format!("cannot build URL: {e}")))?;
        if let Some(ns) = &self.ns {
            url.query_pairs_mut().append_pair("ns", ns);
        }
        Ok(url)
    }

    /// Sends one request and waits for the response headers. The client's read timeout
    /// (the idle timeout) ends a silent upstream; the outer timer is a backstop covering
    /// connect, TLS and the wait for headers together.
    pub(super) async fn execute(
        &self,
        rb: reqwest::RequestBuilder,
        shown: &str,
    ) -> Result<Response, UpstreamError> {
        let limit = self.connect_timeout + self.idle_timeout * 2;
        match tokio::time::timeout(limit, rb.send()).await {
            Err(_) => Err(UpstreamError::Timeout {
                url: shown.to_owned(),
                after: limit,
            }),
            Ok(Err(e)) if e.is_timeout() && !e.is_connect() => Err(UpstreamError::Timeout {
                url: shown.to_owned(),
                after: self.idle_timeout,
            }),
            Ok(Err(e)) => Err(from_send_error(e, shown)),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// One attempt of `req`: authenticates (answering at most one 401 challenge), follows
    /// redirects, and returns the final response whatever its status, with its redacted URL.
    /// `Authorization` goes only to the registry's own origin.
    pub(super) async fn send_once(
        &self,
        req: &Request,
    ) -> Result<(Response, String), UpstreamError> {
        let start = self.endpoint(&req.path)?;
        let mut answered_challenge = false;
        'auth: loop {
            let mut url = start.clone();
            let mut hops = 0usize;
            loop {
                let shown = redact(&url);
                let same_origin = url.origin() == self.base.origin();
                let mut rb = self
                    .client
                    .request(req.method.clone(), url.clone())
                    .headers(req.headers.clone());
                if same_origin && let Some(h) = self.authorization(req.repo.as_ref()).await? {
                    rb = rb.header(AUTHORIZATION, h);
                }
                let resp = self.execute(rb, &shown).await?;
                let status = resp.status();
                if is_followed_redirect(status) {
                    hops += 1;
                    if hops > MAX_REDIRECTS {
                        return Err(UpstreamError::BadResponse(format!(
                            "more than {MAX_REDIRECTS} redirects, last from {shown}"
                        )));
                    }
                    let next = self.redirect_target(&resp, &url, &shown)?;
                    tracing::debug!(
                        status = status.as_u16(),
                        from = %shown,
                        to = %redact(&next),
                        "following redirect"
                    );
                    url = next;
                    continue;
                }
                if status == StatusCode::UNAUTHORIZED {
                    if same_origin && !answered_challenge {
                        answered_challenge = true;
                        self.answer_challenge(resp.headers(), req.repo.as_ref(), &shown)
                            .await?;
                        continue 'auth;
                    }
                    let reason = if same_origin {
                        "credentials refused after answering the challenge"
                    } else {
                        "redirect target refused the request (it never gets our credentials)"
                    };
                    return Err(UpstreamError::Unauthorized {
                        url: shown,
                        reason: reason.into(),
                    });
                }
                return Ok((resp, shown));
            }
        }
    }

    /// Resolves a `Location` (absolute or relative) against the URL that answered it.
    pub(super) fn redirect_target(
        &self,
        resp: &Response,
        from: &Url,
        shown: &str,
    ) -> Result<Url, UpstreamError> {
        let bad =
            |what: &str| UpstreamError::BadResponse(format!("{what} (redirect from {shown})"));
        let loc = resp
            .headers()
            .get(LOCATION)
            .ok_or_else(|| bad("redirect without Location"))?
            .to_str()
            .map_err(|_| bad("Location is not visible ASCII"))?;
        let next = from
            .join(loc)
            .map_err(|_| bad("Location is not a valid URL"))?;
        match next.scheme() {
            "https" => {}
            "http" if self.insecure => {}
            "http" => return Err(bad("redirect to plain http without insecure")),
            _ => return Err(bad("redirect to a scheme other than http or https")),
        }
        if !next.username().is_empty() || next.password().is_some() {
            return Err(bad("redirect target carries credentials"));
        }
        Ok(next)
    }

    /// Runs `op` until it succeeds, fails for good, or the retry budget is spent.
    ///
    /// A URL found unreachable (every attempt of a request failed to connect) is not tried
    /// again for the upstream's `unreachable_hold` (5 s by default): requests meanwhile fail at
    /// once, so that a pull of an uncached blob fails fast, a tag is answered from the grace
    /// copy at once, and a fallback URL is used at once, instead of each request waiting out
    /// connect timeouts and backoff again. The first request after the hold tries again.
    pub(super) async fn with_retries<T, F, Fut>(&self, mut op: F) -> Result<T, UpstreamError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        if let Some(left) = self.unreachable_for() {
            return Err(UpstreamError::Unreachable {
                url: redact(&self.base),
                reason: format!(
                    "unreachable moments ago; not tried again for another {} ms",
                    left.as_millis()
                ),
            });
        }
        let result = self.retry_loop(&mut op).await;
        let mut until = self
            .unreachable_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &result {
            Err(UpstreamError::Unreachable { .. }) if !self.unreachable_hold.is_zero() => {
                if until.is_none() {
                    tracing::warn!(
                        url = %redact(&self.base),
                        hold_ms = u64::try_from(self.unreachable_hold.as_millis()).unwrap_or(u64::MAX),
                        "upstream unreachable; failing its requests at once for a while"
                    );
                }
                *until = Some(Instant::now() + self.unreachable_hold);
            }
            Ok(_) => {
                if until.take().is_some() {
                    tracing::info!(url = %redact(&self.base), "upstream reachable again");
                }
            }
            Err(_) => {}
        }
        result
    }

    /// How much longer this URL counts as unreachable, if it does.
    fn unreachable_for(&self) -> Option<Duration> {
        let until = (*self
            .unreachable_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))?;
        until.checked_duration_since(Instant::now())
    }

    async fn retry_loop<T, F, Fut>(&self, op: &mut F) -> Result<T, UpstreamError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let mut attempt = 0u32;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && attempt < self.max_retries => {
                    let delay = self.backoff.delay(attempt, e.retry_after());
                    attempt += 1;
                    tracing::warn!(
                        attempt,
                        max_retries = self.max_retries,
                        delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        error = %e,
                        "upstream request failed, retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads a whole (small) body, refusing more than `limit` bytes and stalls longer than
    /// the idle timeout.
    pub(super) async fn read_body(
        &self,
        resp: Response,
        limit: u64,
        shown: &str,
    ) -> Result<Bytes, UpstreamError> {
        let too_big = |n: u64| {
            UpstreamError::BadResponse(format!(
                "body of {n} bytes or more from {shown} exceeds the {limit}-byte limit"
            ))
        };
        if let Some(len) = content_length(resp.headers())
            && len > limit
        {
            return Err(too_big(len));
        }
        let mut buf = BytesMut::new();
        let mut body = resp.bytes_stream();
        loop {
            match tokio::time::timeout(self.idle_timeout, body.next()).await {
                Err(_) => {
                    return Err(UpstreamError::Timeout {
                        url: shown.to_owned(),
                        after: self.idle_timeout,
                    });
                }
                Ok(None) => return Ok(buf.freeze()),
                Ok(Some(Err(e))) => return Err(from_body_error(e, shown, self.idle_timeout)),
                Ok(Some(Ok(chunk))) => {
                    let n = (buf.len() + chunk.len()) as u64;
                    if n > limit {
                        return Err(too_big(n));
                    }
                    buf.extend_from_slice(&chunk);
                }
            }
        }
    }

    /// `GET /v2/` with retries. 200, or 401 with a usable challenge, means reachable.
    pub(super) async fn ping(&self) -> Result<(), UpstreamError> {
        let url = &self.endpoint("/v2/")?;
        let shown = &redact(url);
        self.with_retries(|| async move {
            let resp = self.execute(self.client.get(url.clone()), shown).await?;
            let status = resp.status();
            if status.is_success() {
                return Ok(());
            }
            if status == StatusCode::UNAUTHORIZED && resp.headers().contains_key(WWW_AUTHENTICATE) {
                let values = resp.headers().get_all(WWW_AUTHENTICATE);
                let learned = challenge::parse_all(values.iter().map(|v| v.as_bytes()))
                    .and_then(|c| challenge::select(&c, &self.base));
                match learned {
                    Ok(Some(ch)) => {
                        self.learn(&ch);
                        return Ok(());
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        return Err(UpstreamError::BadResponse(format!(
                            "unusable WWW-Authenticate from {shown}: {e}"
                        )));
                    }
                }
            }
            Err(status_error(&resp, shown))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_strips_query_and_credentials() {
        let u = Url::parse("https://u:p@bucket.s3.example:9000/a/b?X-Amz-Signature=deadbeef#x")
            .unwrap();
        assert_eq!(redact(&u), "https://bucket.s3.example:9000/a/b");
    }

    #[test]
    fn content_length_is_strict() {
        let mut h = HeaderMap::new();
        assert_eq!(content_length(&h), None);
        h.insert(CONTENT_LENGTH, "42".parse().unwrap());
        assert_eq!(content_length(&h), Some(42));
        for bad in ["-1", "+4", "4 2", "", "99999999999999999999999"] {
            h.insert(CONTENT_LENGTH, bad.parse().unwrap());
            assert_eq!(content_length(&h), None, "{bad}");
        }
    }
}
