//! The upstream client's error type: what went wrong, at which URL (query stripped), and
//! whether trying again may help.

use std::error::Error as StdError;
use std::time::Duration;

use http::StatusCode;

/// An upstream request failed.
///
/// Every `url` field is already redacted: scheme, host, port and path only. Presigned object
/// storage URLs carry their signature in the query, so the query never reaches an error.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The configuration cannot work (bad URL, `http://` without `insecure`, unreadable CA
    /// file, ...). Not retryable.
    #[error("invalid upstream configuration: {0}")]
    Config(String),
    /// 404: the manifest, blob or repository does not exist upstream.
    #[error("not found upstream: {url}")]
    NotFound { url: String },
    /// 401 after every authentication attempt we could make.
    #[error("upstream rejected authentication at {url}: {reason}")]
    Unauthorized { url: String, reason: String },
    /// 403: authenticated, but not allowed.
    #[error("upstream denied access to {url}")]
    Denied { url: String },
    /// 429 after the retry budget was spent.
    #[error("upstream is rate limiting requests to {url}")]
    TooManyRequests {
        url: String,
        retry_after: Option<Duration>,
    },
    /// No connection could be made: DNS failure, connection refused or reset, connect timeout.
    #[error("upstream unreachable at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The upstream sent nothing (no response headers, no body bytes) for `after`.
    #[error("upstream {url} made no progress for {after:?}")]
    Timeout { url: String, after: Duration },
    /// The connection broke while a body was being received.
    #[error("connection to upstream {url} broke mid-body: {reason}")]
    Interrupted { url: String, reason: String },
    /// The TLS handshake failed (unknown CA, wrong name, ...). Not retryable.
    #[error("TLS with upstream {url} failed: {reason}")]
    Tls { url: String, reason: String },
    /// An unexpected HTTP status.
    #[error("upstream {url} answered {status}")]
    Status {
        url: String,
        status: StatusCode,
        retry_after: Option<Duration>,
    },
    /// The upstream answered, but with something that breaks the protocol: a malformed
    /// header, a digest mismatch, an oversized manifest, a bad redirect.
    #[error("bad response from upstream: {0}")]
    BadResponse(String),
}

impl UpstreamError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, UpstreamError::NotFound { .. })
    }

    /// Whether the upstream could not be talked to at all: connection refused, DNS, timeouts,
    /// a broken connection, or a gateway status (502/503/504) from a balancer in front of it.
    /// The mirror serves the last known manifest of a tag for a grace period in that case.
    pub fn is_unreachable(&self) -> bool {
        match self {
            UpstreamError::Unreachable { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::Interrupted { .. } => true,
            UpstreamError::Status { status, .. } => is_gateway_status(*status),
            _ => false,
        }
    }

    /// Whether an idempotent request that failed this way may succeed if sent again.
    pub fn is_retryable(&self) -> bool {
        match self {
            UpstreamError::Unreachable { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::Interrupted { .. }
            | UpstreamError::TooManyRequests { .. } => true,
            UpstreamError::Status { status, .. } => is_gateway_status(*status),
            _ => false,
        }
    }

    /// The delay the upstream asked for with `Retry-After`, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            UpstreamError::TooManyRequests { retry_after, .. }
            | UpstreamError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

fn is_gateway_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

/// Maps a reqwest error from sending a request (before any body byte) to our error.
pub(super) fn from_send_error(err: reqwest::Error, url: &str) -> UpstreamError {
    // reqwest puts the full URL (query included) into its Display: drop it first.
    let err = err.without_url();
    if let Some(tls) = find_tls_error(&err) {
        return UpstreamError::Tls {
            url: url.to_owned(),
            reason: tls,
        };
    }
    UpstreamError::Unreachable {
        url: url.to_owned(),
        reason: chain(&err),
    }
}

/// Maps a reqwest error while reading a body to our error. The client's read timeout is
/// the idle timeout, so a timeout here is a stalled body.
pub(super) fn from_body_error(err: reqwest::Error, url: &str, idle: Duration) -> UpstreamError {
    let err = err.without_url();
    if err.is_timeout() {
        return UpstreamError::Timeout {
            url: url.to_owned(),
            after: idle,
        };
    }
    UpstreamError::Interrupted {
        url: url.to_owned(),
        reason: chain(&err),
    }
}

/// `err: cause: cause`, the way a log reader wants it.
fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

/// Finds a rustls error in the cause chain. `io::Error::source` skips the error it wraps,
/// so wrapped io errors are unpacked by hand.
fn find_tls_error(err: &(dyn StdError + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(t) = inner.downcast_ref::<rustls::Error>() {
                return Some(t.to_string());
            }
            cur = Some(inner);
            continue;
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let u = || "http://x/v2/".to_owned();
        assert!(UpstreamError::NotFound { url: u() }.is_not_found());
        let gw = UpstreamError::Status {
            url: u(),
            status: StatusCode::SERVICE_UNAVAILABLE,
            retry_after: Some(Duration::from_secs(2)),
        };
        assert!(gw.is_retryable() && gw.is_unreachable());
        assert_eq!(gw.retry_after(), Some(Duration::from_secs(2)));
        let ise = UpstreamError::Status {
            url: u(),
            status: StatusCode::INTERNAL_SERVER_ERROR,
            retry_after: None,
        };
        assert!(!ise.is_retryable() && !ise.is_unreachable());
        assert!(!UpstreamError::Denied { url: u() }.is_retryable());
        let rl = UpstreamError::TooManyRequests {
            url: u(),
            retry_after: None,
        };
        assert!(rl.is_retryable() && !rl.is_unreachable());
        let down = UpstreamError::Unreachable {
            url: u(),
            reason: "refused".into(),
        };
        assert!(down.is_retryable() && down.is_unreachable());
    }
}
