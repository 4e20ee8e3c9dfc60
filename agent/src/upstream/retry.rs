//! When to try again: exponential backoff with jitter, and `Retry-After`.

use std::time::{Duration, SystemTime};

use http::HeaderValue;

/// Delays between attempts of an idempotent request.
#[derive(Clone, Copy, Debug)]
pub(super) struct Backoff {
    /// Delay before the first retry, before jitter.
    pub base: Duration,
    /// Longest computed delay.
    pub cap: Duration,
    /// Longest delay honoured from a `Retry-After` header; an upstream asking for more gets
    /// retried after this anyway (and fails again if it meant it).
    pub retry_after_cap: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            base: Duration::from_millis(200),
            cap: Duration::from_secs(10),
            retry_after_cap: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// Delay before retry number `attempt` (0 for the first retry). A `Retry-After` from the
    /// upstream wins over the computed delay, up to `retry_after_cap`. The computed delay is
    /// `base * 2^attempt`, capped, then drawn uniformly from its upper half, so that many
    /// agents failing at the same moment do not come back at the same moment.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(ra) = retry_after {
            return ra.min(self.retry_after_cap);
        }
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.cap);
        let half = exp / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rand::random_range(0..=jitter_ms))
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date (a date in the past means now).
pub(super) fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let s = value.to_str().ok()?.trim();
    if !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().ok().map(Duration::from_secs);
    }
    let at = httpdate::parse_http_date(s).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_jittered_and_capped() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
            retry_after_cap: Duration::from_secs(5),
        };
        for _ in 0..50 {
            let d0 = b.delay(0, None);
            assert!(d0 >= Duration::from_millis(50) && d0 <= Duration::from_millis(100));
            let d2 = b.delay(2, None);
            assert!(d2 >= Duration::from_millis(200) && d2 <= Duration::from_millis(400));
            let big = b.delay(1000, None);
            assert!(big >= Duration::from_millis(500) && big <= Duration::from_secs(1));
        }
        assert_eq!(
            b.delay(0, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(
            b.delay(0, Some(Duration::from_secs(3600))),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let hv = HeaderValue::from_static;
        assert_eq!(
            parse_retry_after(&hv("7"), now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(parse_retry_after(&hv("0"), now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&HeaderValue::from_str(&later).unwrap(), now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&HeaderValue::from_str(&past).unwrap(), now),
            Some(Duration::ZERO)
        );
        for bad in ["-1", "1.5", "soon", "", "99999999999999999999"] {
            assert_eq!(parse_retry_after(&hv(bad), now), None, "{bad}");
        }
    }
}
