//! The `[peer]` section: the data plane's settings (bandwidth limits, upload slots, how many
//! peers a download uses, how long before giving up on peers). Parsed once into
//! [`PeerConfig`]; every field has a default, and the defaults need no tuning on a LAN.

use std::time::Duration;

use serde::Deserialize;

use crate::config::ByteSize;

/// `[peer]` as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePeer {
    enabled: Option<bool>,
    upload_limit: Option<ByteSize>,
    download_limit: Option<ByteSize>,
    origin_limit: Option<ByteSize>,
    max_uploads: Option<u32>,
    max_uploads_per_peer: Option<u32>,
    max_peers: Option<usize>,
    max_requests_per_peer: Option<u32>,
    max_requests: Option<u32>,
    #[serde(default, with = "humantime_serde::option")]
    stall_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    origin_fallback: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    idle_timeout: Option<Duration>,
}

/// The data plane's settings, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// Download blobs through the swarm when a cluster is configured. Off: every download goes
    /// to the origin directly (the agent still serves its blobs to peers).
    pub enabled: bool,
    /// Bytes per second served to peers; `None`: unlimited.
    pub upload_limit: Option<u64>,
    /// Bytes per second of blob data received, from peers and from the origin.
    pub download_limit: Option<u64>,
    /// Bytes per second read from the origin (also counted in `download_limit`).
    pub origin_limit: Option<u64>,
    /// Pieces uploaded at once, to all peers.
    pub max_uploads: u32,
    /// Pieces uploaded at once to one peer.
    pub max_uploads_per_peer: u32,
    /// Peers one download connects to (peers that connect to it are always accepted).
    pub max_peers: usize,
    /// Piece requests in flight to one peer.
    pub max_requests_per_peer: u32,
    /// Piece requests in flight for one download, to all peers.
    pub max_requests: u32,
    /// A request (or origin range) without data for this long is given up and asked elsewhere.
    pub stall_timeout: Duration,
    /// With pieces missing, no peer able to give them and no origin slot for this long, the
    /// agent reads the origin anyway: a pull never fails because of the swarm.
    pub origin_fallback: Duration,
    /// Longest QUIC handshake with a peer.
    pub connect_timeout: Duration,
    /// A peer connection silent for this long is closed (keep-alives go out at a third of it).
    pub idle_timeout: Duration,
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            enabled: true,
            upload_limit: None,
            download_limit: None,
            origin_limit: None,
            max_uploads: 8,
            max_uploads_per_peer: 4,
            max_peers: 16,
            max_requests_per_peer: 4,
            max_requests: 32,
            stall_timeout: Duration::from_secs(5),
            origin_fallback: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(6),
        }
    }
}

fn rate(name: &str, v: Option<ByteSize>) -> Result<Option<u64>, String> {
    match v {
        None | Some(ByteSize(0)) => Ok(None),
        Some(ByteSize(n)) if n < 1024 => Err(format!(
            "{name} = {n} bytes per second is too low to move a piece (at least 1KiB, or 0 for unlimited)"
        )),
        Some(ByteSize(n)) => Ok(Some(n)),
    }
}

fn positive<T: PartialOrd + Default + Copy + std::fmt::Debug>(
    name: &str,
    v: Option<T>,
    default: T,
) -> Result<T, String> {
    match v {
        Some(x) if x <= T::default() => Err(format!("{name} must be greater than zero")),
        Some(x) => Ok(x),
        None => Ok(default),
    }
}

impl PeerConfig {
    /// Checks the file's `[peer]` section; errors name the field.
    pub fn from_file(f: FilePeer) -> Result<PeerConfig, String> {
        let d = PeerConfig::default();
        let seconds =
            |name: &str, v: Option<Duration>, default: Duration| positive(name, v, default);
        let c = PeerConfig {
            enabled: f.enabled.unwrap_or(d.enabled),
            upload_limit: rate("upload_limit", f.upload_limit)?,
            download_limit: rate("download_limit", f.download_limit)?,
            origin_limit: rate("origin_limit", f.origin_limit)?,
            max_uploads: positive("max_uploads", f.max_uploads, d.max_uploads)?,
            max_uploads_per_peer: positive(
                "max_uploads_per_peer",
                f.max_uploads_per_peer,
                d.max_uploads_per_peer,
            )?,
            max_peers: positive("max_peers", f.max_peers, d.max_peers)?,
            max_requests_per_peer: positive(
                "max_requests_per_peer",
                f.max_requests_per_peer,
                d.max_requests_per_peer,
            )?,
            max_requests: positive("max_requests", f.max_requests, d.max_requests)?,
            stall_timeout: seconds("stall_timeout", f.stall_timeout, d.stall_timeout)?,
            origin_fallback: seconds("origin_fallback", f.origin_fallback, d.origin_fallback)?,
            connect_timeout: seconds("connect_timeout", f.connect_timeout, d.connect_timeout)?,
            idle_timeout: seconds("idle_timeout", f.idle_timeout, d.idle_timeout)?,
        };
        if c.max_uploads_per_peer > c.max_uploads {
            return Err(format!(
                "max_uploads_per_peer ({}) cannot exceed max_uploads ({})",
                c.max_uploads_per_peer, c.max_uploads
            ));
        }
        if c.max_requests_per_peer > c.max_requests {
            return Err(format!(
                "max_requests_per_peer ({}) cannot exceed max_requests ({})",
                c.max_requests_per_peer, c.max_requests
            ));
        }
        if c.max_requests_per_peer > 255 || c.max_requests > 4096 {
            return Err(
                "max_requests_per_peer is at most 255 and max_requests at most 4096".into(),
            );
        }
        if c.idle_timeout < Duration::from_secs(1) {
            return Err("idle_timeout must be at least 1s".into());
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PeerConfig, String> {
        let f: FilePeer = toml::from_str(text).map_err(|e| e.to_string())?;
        PeerConfig::from_file(f)
    }

    #[test]
    fn defaults_and_overrides() {
        assert_eq!(parse("").unwrap(), PeerConfig::default());
        let c = parse(
            "upload_limit = \"4MiB\"\ndownload_limit = 0\norigin_limit = \"8MiB\"\n\
             max_uploads = 2\nmax_uploads_per_peer = 1\nstall_timeout = \"2s\"\nenabled = false\n",
        )
        .unwrap();
        assert_eq!(c.upload_limit, Some(4 << 20));
        assert_eq!(c.download_limit, None);
        assert_eq!(c.origin_limit, Some(8 << 20));
        assert_eq!(c.stall_timeout, Duration::from_secs(2));
        assert!(!c.enabled);
    }

    #[test]
    fn bad_values_are_named() {
        for (text, want) in [
            ("upload_limit = 10", "upload_limit"),
            ("max_uploads = 0", "max_uploads"),
            ("max_uploads = 2\nmax_uploads_per_peer = 3", "cannot exceed"),
            ("stall_timeout = \"0s\"", "stall_timeout"),
            (
                "max_requests_per_peer = 300\nmax_requests = 400",
                "at most 255",
            ),
            ("bogus = 1", "unknown field"),
        ] {
            let e = parse(text).expect_err(text);
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
