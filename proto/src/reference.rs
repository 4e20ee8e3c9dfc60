//! Repository names, tags, registry hosts and image references, per the OCI distribution
//! spec grammar and its length limits.
//!
//! Grammar (distribution-spec "Pulling manifests"):
//! - name component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, components joined by `/`;
//! - tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`;
//! - registry host: DNS labels (or an IPv4 address, or a bracketed IPv6 address), optional
//!   `:port`.
//!
//! A value that parses into one of these types contains no `..`, `%`, NUL, backslash or other
//! byte that could escape a path or confuse a URL, so it can be put into an upstream URL as is.

use std::fmt;
use std::str::FromStr;

use crate::digest::{Digest, DigestError};

/// Longest `host/name` the spec lets clients rely on.
pub const MAX_NAME_WITH_HOST: usize = 255;
/// Longest tag.
pub const MAX_TAG: usize = 128;

/// Why a string is not a valid name, tag, host or reference.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("repository name is empty")]
    EmptyName,
    #[error("repository name is longer than {MAX_NAME_WITH_HOST} characters (with registry host)")]
    NameTooLong,
    #[error(
        "repository name component {0:?} is invalid (lower-case letters, digits, and single '.', '_', '__' or '-' runs between them)"
    )]
    InvalidNameComponent(String),
    #[error("tag is empty")]
    EmptyTag,
    #[error("tag is longer than {MAX_TAG} characters")]
    TagTooLong,
    #[error("tag contains characters outside [A-Za-z0-9._-] or starts with '.' or '-'")]
    InvalidTag,
    #[error("registry host is invalid")]
    InvalidHost,
    #[error("invalid digest in reference: {0}")]
    Digest(#[from] DigestError),
}

fn is_lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// Checks one path component against `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_lower_alnum(b[0]) || !is_lower_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_lower_alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: exactly ".", "_", "__", or one or more "-".
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        // The separator must be followed by an alphanumeric (also rules out "a.-b", "a___b").
        if i >= b.len() || !is_lower_alnum(b[i]) || i == start {
            return false;
        }
    }
    true
}

/// A repository name such as `library/ubuntu`, without the registry host.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    /// Parses a repository name (no host). The length limit is applied to the name alone; use
    /// [`Reference::parse`] to check it together with a host.
    pub fn parse(s: &str) -> Result<RepoName, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError::EmptyName);
        }
        if s.len() > MAX_NAME_WITH_HOST {
            return Err(ReferenceError::NameTooLong);
        }
        for c in s.split('/') {
            if !valid_component(c) {
                return Err(ReferenceError::InvalidNameComponent(truncate_for_error(c)));
            }
        }
        Ok(RepoName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Error messages quote the offending input, but never more than a screenful of it.
fn truncate_for_error(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RepoName({})", self.0)
    }
}

impl FromStr for RepoName {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RepoName::parse(s)
    }
}

/// A tag such as `v1.2.3` or `latest`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &str) -> Result<Tag, ReferenceError> {
        let b = s.as_bytes();
        if b.is_empty() {
            return Err(ReferenceError::EmptyTag);
        }
        if b.len() > MAX_TAG {
            return Err(ReferenceError::TagTooLong);
        }
        let first_ok = b[0].is_ascii_alphanumeric() || b[0] == b'_';
        let rest_ok = b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if first_ok && rest_ok {
            Ok(Tag(s.to_owned()))
        } else {
            Err(ReferenceError::InvalidTag)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tag({})", self.0)
    }
}

impl FromStr for Tag {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tag::parse(s)
    }
}

/// A registry host as clients write it in image names: `docker.io`, `registry.local:5000`,
/// `127.0.0.1:5000`, `[::1]:5000`. Stored lower-cased (host names are case-insensitive).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegistryHost(String);

impl RegistryHost {
    pub fn parse(s: &str) -> Result<RegistryHost, ReferenceError> {
        if s.is_empty() || s.len() > MAX_NAME_WITH_HOST {
            return Err(ReferenceError::InvalidHost);
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            // Bracketed IPv6 literal.
            let (addr, after) = rest.split_once(']').ok_or(ReferenceError::InvalidHost)?;
            if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
                return Err(ReferenceError::InvalidHost);
            }
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or(ReferenceError::InvalidHost)?),
            };
            (None, port)
        } else {
            match s.split_once(':') {
                Some((h, p)) => (Some(h), Some(p)),
                None => (Some(s), None),
            }
        };
        if let Some(port) = port {
            let ok = !port.is_empty()
                && port.len() <= 5
                && port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u16>().is_ok_and(|p| p != 0);
            if !ok {
                return Err(ReferenceError::InvalidHost);
            }
        }
        if let Some(host) = host {
            let labels_ok = !host.is_empty()
                && host.split('.').all(|l| {
                    let b = l.as_bytes();
                    !b.is_empty()
                        && b.len() <= 63
                        && b[0].is_ascii_alphanumeric()
                        && b[b.len() - 1].is_ascii_alphanumeric()
                        && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
                });
            if !labels_ok {
                return Err(ReferenceError::InvalidHost);
            }
        }
        Ok(RegistryHost(s.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether a leading reference component looks like a host rather than a repository
    /// component: it contains `.` or `:`, is `localhost`, or has upper-case letters (the rule
    /// docker and containerd use).
    fn looks_like_host(component: &str) -> bool {
        component.contains(['.', ':'])
            || component == "localhost"
            || component.starts_with('[')
            || component.bytes().any(|b| b.is_ascii_uppercase())
    }
}

impl fmt::Display for RegistryHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RegistryHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegistryHost({})", self.0)
    }
}

impl FromStr for RegistryHost {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RegistryHost::parse(s)
    }
}

/// What a manifest request names: a mutable tag or an immutable digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ManifestRef {
    Tag(Tag),
    Digest(Digest),
}

impl ManifestRef {
    /// Parses the `<reference>` path segment of `/v2/<name>/manifests/<reference>`: a digest
    /// when it contains `:`, a tag otherwise.
    pub fn parse(s: &str) -> Result<ManifestRef, ReferenceError> {
        if s.contains(':') {
            Ok(ManifestRef::Digest(Digest::parse(s)?))
        } else {
            Ok(ManifestRef::Tag(Tag::parse(s)?))
        }
    }

    pub fn digest(&self) -> Option<&Digest> {
        match self {
            ManifestRef::Digest(d) => Some(d),
            ManifestRef::Tag(_) => None,
        }
    }
}

impl fmt::Display for ManifestRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestRef::Tag(t) => t.fmt(f),
            ManifestRef::Digest(d) => d.fmt(f),
        }
    }
}

/// A full image reference: `[host[:port]/]name[:tag][@digest]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    pub host: Option<RegistryHost>,
    pub name: RepoName,
    pub tag: Option<Tag>,
    pub digest: Option<Digest>,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(Digest::parse(d)?)),
            None => (s, None),
        };
        // The host, if any, is the first component and is recognised by its shape.
        let (host, path) = match rest.split_once('/') {
            Some((first, path)) if RegistryHost::looks_like_host(first) => {
                (Some(RegistryHost::parse(first)?), path)
            }
            _ => (None, rest),
        };
        // A ':' after the last '/' separates the tag (a port can only be in the host part).
        let (name, tag) = match path.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(Tag::parse(t)?)),
            _ => (path, None),
        };
        let name = RepoName::parse(name)?;
        let host_len = host.as_ref().map_or(0, |h| h.as_str().len() + 1);
        if host_len + name.as_str().len() > MAX_NAME_WITH_HOST {
            return Err(ReferenceError::NameTooLong);
        }
        Ok(Reference {
            host,
            name,
            tag,
            digest,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(h) = &self.host {
            write!(f, "{h}/")?;
        }
        f.write_str(self.name.as_str())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_spec_names() {
        for ok in [
            "a",
            "library/ubuntu",
            "a/b/c/d",
            "foo.bar_baz__qux---quux",
            "0",
            "my-org/my.app",
            "a__b",
        ] {
            assert!(RepoName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_hostile_names() {
        for bad in [
            "",
            "../etc/passwd",
            "a/../b",
            "a/./b",
            "..",
            "%2e%2e/x",
            "a%2fb",
            "a\0b",
            "a\\b",
            "/a",
            "a/",
            "a//b",
            "UPPER",
            "a___b",
            "a..b",
            "a.-b",
            "-a",
            "a-",
            "_a",
            "a b",
            "a\nb",
            "ä",
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn name_length_limit_includes_host() {
        let name = "a".repeat(255);
        assert!(RepoName::parse(&name).is_ok());
        assert_eq!(
            RepoName::parse(&"a".repeat(256)),
            Err(ReferenceError::NameTooLong)
        );
        let with_host = format!("registry.local/{}", "a".repeat(250));
        assert_eq!(
            Reference::parse(&with_host),
            Err(ReferenceError::NameTooLong)
        );
        let fits = format!("r.io/{}", "a".repeat(250));
        assert!(Reference::parse(&fits).is_ok());
    }

    #[test]
    fn tags() {
        assert!(Tag::parse("latest").is_ok());
        assert!(Tag::parse("_x.Y-1").is_ok());
        assert!(Tag::parse(&"t".repeat(128)).is_ok());
        assert_eq!(
            Tag::parse(&"t".repeat(129)),
            Err(ReferenceError::TagTooLong)
        );
        for bad in [
            "", ".hidden", "-x", "a/b", "a:b", "a\0", "a%20", "..", "ü", "a\\b", "%2e%2e", "a\nb",
        ] {
            assert!(Tag::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hosts() {
        for ok in [
            "docker.io",
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "Registry.Example.COM",
            "[::1]:5000",
            "[fe80::1]",
            "a-b.c",
        ] {
            assert!(RegistryHost::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            RegistryHost::parse("Registry.Example.COM")
                .unwrap()
                .as_str(),
            "registry.example.com"
        );
        for bad in [
            "",
            "a:",
            "a:0",
            "a:65536",
            "a:+1",
            "-a.com",
            "a..b",
            "a/b",
            "a_b.com",
            "evil.com@x",
            "[::1",
            "[zz]",
            "a:1:2",
            "a\0.com",
            "..",
            "%2e%2e",
            "a%2e.com",
            "a\\b.com",
            "a.com\\",
            "a.com:50\0",
            &"a".repeat(256),
        ] {
            assert!(RegistryHost::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn references() {
        let r = Reference::parse("registry.local:5000/team/app:v1").unwrap();
        assert_eq!(r.host.unwrap().as_str(), "registry.local:5000");
        assert_eq!(r.name.as_str(), "team/app");
        assert_eq!(r.tag.unwrap().as_str(), "v1");

        let r = Reference::parse("ubuntu").unwrap();
        assert!(r.host.is_none() && r.tag.is_none() && r.digest.is_none());

        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("localhost/x/y:t@{d}")).unwrap();
        assert_eq!(r.host.as_ref().unwrap().as_str(), "localhost");
        assert_eq!(r.digest.as_ref().unwrap().to_string(), d);
        assert_eq!(r.to_string(), format!("localhost/x/y:t@{d}"));

        assert!(Reference::parse("x@sha256:abc").is_err());
        assert!(Reference::parse("host.io/../x").is_err());
        assert!(Reference::parse("a:b:c").is_err());
        for bad in [
            "host.io/%2e%2e/x",
            "host.io/a/%2e%2e",
            "host.io/a\\b",
            "host.io\\a/b",
            "host.io/a\0b",
            "a/b\0:t",
            "a/b:t\0",
            "../a",
            "a/./b",
            "a//b",
            "/a",
            "a/",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn manifest_ref() {
        assert!(matches!(ManifestRef::parse("v1"), Ok(ManifestRef::Tag(_))));
        let d = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(ManifestRef::parse(&d), Ok(ManifestRef::Digest(_))));
        assert!(ManifestRef::parse("sha256:XYZ").is_err());
        assert!(ManifestRef::parse("..").is_err());
    }
}
