//! HTTP `Range` request headers for blob GETs: one byte range, resolved against the blob size.
//!
//! Behaviour follows RFC 9110 and the OCI conformance suite: on a 2048-byte blob, `500-1499`,
//! `500-`, `-500` and `2000-5000` are satisfiable (the last one is clamped to the end), while
//! `500-0` and `5000-10000` are not (416).

/// A satisfiable byte range, inclusive at both ends, already clamped to the blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    /// Inclusive; always `< size` of the blob it was resolved against.
    pub end: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    /// Never true: a resolved range holds at least one byte. Present for clippy's
    /// `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// `Content-Range` value for a 206 response.
    pub fn content_range(&self, size: u64) -> String {
        format!("bytes {}-{}/{}", self.start, self.end, size)
    }
}

/// `Content-Range` value for a 416 response.
pub fn unsatisfied_content_range(size: u64) -> String {
    format!("bytes */{size}")
}

/// What to do with a request's `Range` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// Serve the whole blob with 200 (no header, or several ranges, which RFC 9110 lets a
    /// server ignore).
    Full,
    /// Serve this part with 206.
    Partial(ByteRange),
}

/// Why a `Range` header cannot be served: answered with 416.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("Range header is malformed")]
    Malformed,
    #[error("Range unit must be 'bytes'")]
    Unit,
    #[error("Range is not satisfiable for a blob of {size} bytes")]
    Unsatisfiable { size: u64 },
}

/// Parses one decimal `u64` with no sign, spaces or other characters.
fn parse_u64(s: &str) -> Result<u64, RangeError> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RangeError::Malformed);
    }
    s.parse().map_err(|_| RangeError::Malformed)
}

/// Resolves a `Range` header value against a blob of `size` bytes.
pub fn parse_range(header: Option<&str>, size: u64) -> Result<RangeRequest, RangeError> {
    let Some(value) = header else {
        return Ok(RangeRequest::Full);
    };
    let value = value.trim();
    let (unit, spec) = value.split_once('=').ok_or(RangeError::Malformed)?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return Err(RangeError::Unit);
    }
    let spec = spec.trim();
    if spec.contains(',') {
        // Validate every part so garbage is still refused, then serve the whole blob.
        for part in spec.split(',') {
            resolve_one(part.trim(), u64::MAX)?;
        }
        return Ok(RangeRequest::Full);
    }
    resolve_one(spec, size).map(RangeRequest::Partial)
}

fn resolve_one(spec: &str, size: u64) -> Result<ByteRange, RangeError> {
    let (first, last) = spec.split_once('-').ok_or(RangeError::Malformed)?;
    let unsatisfiable = RangeError::Unsatisfiable { size };
    if first.is_empty() {
        // Suffix range: the last N bytes.
        let n = parse_u64(last)?;
        if n == 0 || size == 0 {
            return Err(unsatisfiable);
        }
        let n = n.min(size);
        return Ok(ByteRange {
            start: size - n,
            end: size - 1,
        });
    }
    let start = parse_u64(first)?;
    let end = if last.is_empty() {
        None
    } else {
        Some(parse_u64(last)?)
    };
    if let Some(end) = end
        && end < start
    {
        return Err(unsatisfiable);
    }
    if start >= size {
        return Err(unsatisfiable);
    }
    let end = end.map_or(size - 1, |e| e.min(size - 1));
    Ok(ByteRange { start, end })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(h: &str, size: u64) -> Result<(u64, u64), RangeError> {
        match parse_range(Some(h), size)? {
            RangeRequest::Partial(r) => Ok((r.start, r.end)),
            RangeRequest::Full => panic!("expected a partial range for {h}"),
        }
    }

    #[test]
    fn oci_conformance_cases() {
        assert_eq!(part("bytes=500-1499", 2048), Ok((500, 1499)));
        assert_eq!(part("bytes=500-", 2048), Ok((500, 2047)));
        assert_eq!(part("bytes=-500", 2048), Ok((1548, 2047)));
        assert_eq!(part("bytes=2000-5000", 2048), Ok((2000, 2047)));
        assert_eq!(
            part("bytes=500-0", 2048),
            Err(RangeError::Unsatisfiable { size: 2048 })
        );
        assert_eq!(
            part("bytes=5000-10000", 2048),
            Err(RangeError::Unsatisfiable { size: 2048 })
        );
    }

    #[test]
    fn edges() {
        assert_eq!(parse_range(None, 10), Ok(RangeRequest::Full));
        assert_eq!(part("bytes=0-0", 1), Ok((0, 0)));
        assert_eq!(part("bytes=-5000", 2048), Ok((0, 2047)));
        assert!(part("bytes=-0", 2048).is_err());
        assert!(part("bytes=0-", 0).is_err());
        assert!(part("bytes=-1", 0).is_err());
        assert_eq!(part("bytes=2047-2047", 2048), Ok((2047, 2047)));
        assert!(part("bytes=2048-", 2048).is_err());
        let r = ByteRange { start: 5, end: 9 };
        assert_eq!(r.len(), 5);
        assert_eq!(r.content_range(10), "bytes 5-9/10");
        assert_eq!(unsatisfied_content_range(10), "bytes */10");
    }

    #[test]
    fn hostile_headers() {
        for h in [
            "",
            "bytes",
            "bytes=",
            "bytes=-",
            "bytes=a-b",
            "bytes=+1-2",
            "bytes=1 -2",
            "bytes=1-2-3",
            "bytes=-1-2",
            "bytes=99999999999999999999999-",
            "bytes=18446744073709551616-",
            "bytes=0x10-",
            "bytes=1-2,x",
            "bytes=\0-1",
        ] {
            assert_eq!(
                parse_range(Some(h), 2048),
                Err(RangeError::Malformed),
                "{h:?}"
            );
        }
        assert_eq!(parse_range(Some("items=0-1"), 2048), Err(RangeError::Unit));
        assert_eq!(
            parse_range(Some("bytes=0-1,5-9"), 2048),
            Ok(RangeRequest::Full)
        );
        // u64::MAX-sized suffix is clamped, not overflowed.
        assert_eq!(part("bytes=-18446744073709551615", 10), Ok((0, 9)));
        assert_eq!(part("bytes=0-18446744073709551615", 10), Ok((0, 9)));
    }
}
