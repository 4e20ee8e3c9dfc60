//! The revocation list: a text file (by default `revoked` in the cluster data directory) of
//! lines `node NAME` (every certificate of that node, and it may not enroll again) or
//! `serial HEX` (one certificate), with `#` comments. `shoal-coordinator node revoke` edits it;
//! the running coordinator notices changes within a second, refuses new handshakes and closes
//! the sessions of what was revoked. Coordinators of one cluster need the same list: copy the
//! file, or keep the data directory on shared storage.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};
use std::time::SystemTime;

use shoal_agent::cluster::tls::Refusals;
use shoal_proto::msg::NodeId;

use crate::fsutil::{Existing, write_atomic};

/// What is revoked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevokedSet {
    pub nodes: BTreeSet<NodeId>,
    /// Lower-case hex without leading zero bytes.
    pub serials: BTreeSet<String>,
}

/// Why the revocation file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("revocation list {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("revocation list {}, line {line}: {reason}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

fn normalize_serial(s: &str) -> Option<String> {
    let s = s.trim_start_matches("0x").to_ascii_lowercase();
    if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let bytes = hex::decode(if s.len() % 2 == 1 { format!("0{s}") } else { s }).ok()?;
    Some(shoal_agent::cluster::tls::serial_hex(&bytes))
}

impl RevokedSet {
    pub fn parse(text: &str, path: &Path) -> Result<RevokedSet, RevokeError> {
        let mut set = RevokedSet::default();
        for (i, line) in text.lines().enumerate() {
            let syntax = |reason: &str| RevokeError::Syntax {
                path: path.to_owned(),
                line: i + 1,
                reason: reason.to_owned(),
            };
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            match line.split_whitespace().collect::<Vec<_>>().as_slice() {
                ["node", name] => {
                    set.nodes
                        .insert(NodeId::new(name).map_err(|_| syntax("invalid node name"))?);
                }
                ["serial", hex] => {
                    set.serials.insert(
                        normalize_serial(hex).ok_or_else(|| syntax("invalid serial number"))?,
                    );
                }
                _ => return Err(syntax("expected `node NAME` or `serial HEX`")),
            }
        }
        Ok(set)
    }

    /// Reads `path`; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<RevokedSet, RevokeError> {
        match std::fs::read_to_string(path) {
            Ok(text) => RevokedSet::parse(&text, path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(RevokedSet::default()),
            Err(source) => Err(RevokeError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    pub fn contains(&self, node: &NodeId, serial: &str) -> bool {
        self.nodes.contains(node) || self.serials.contains(serial)
    }

    fn render(&self) -> String {
        let mut s = String::from(
            "# Revoked cluster nodes and certificates (shoal-coordinator node revoke).\n",
        );
        for n in &self.nodes {
            let _ = writeln!(s, "node {n}");
        }
        for x in &self.serials {
            let _ = writeln!(s, "serial {x}");
        }
        s
    }
}

/// Adds (`revoke = true`) or removes a node name or serial in the file at `path`. Returns
/// whether the file changed.
pub fn edit(
    path: &Path,
    node: Option<&NodeId>,
    serial: Option<&str>,
    revoke: bool,
) -> Result<bool, RevokeError> {
    let mut set = RevokedSet::load(path)?;
    let before = set.clone();
    if let Some(n) = node {
        if revoke {
            set.nodes.insert(n.clone());
        } else {
            set.nodes.remove(n);
        }
    }
    if let Some(s) = serial {
        let s = normalize_serial(s).ok_or_else(|| RevokeError::Syntax {
            path: path.to_owned(),
            line: 0,
            reason: format!("{s:?} is not a hexadecimal serial number"),
        })?;
        if revoke {
            set.serials.insert(s);
        } else {
            set.serials.remove(&s);
        }
    }
    if set == before {
        return Ok(false);
    }
    write_atomic(
        path,
        set.render().as_bytes(),
        0o644,
        Existing::ReplaceKeepingMode,
    )
    .map_err(|source| RevokeError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(true)
}

/// The list in force, reloaded when its file changes.
#[derive(Debug)]
pub struct Revocations {
    path: PathBuf,
    state: RwLock<(RevokedSet, Option<(SystemTime, u64)>)>,
}

impl Revocations {
    pub fn load(path: PathBuf) -> Result<Revocations, RevokeError> {
        let stamp = stamp(&path);
        let set = RevokedSet::load(&path)?;
        Ok(Revocations {
            path,
            state: RwLock::new((set, stamp)),
        })
    }

    pub fn current(&self) -> RevokedSet {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .clone()
    }

    /// Re-reads the file if it changed. `Some(set)` when the list in force changed; a file that
    /// does not parse leaves the previous list in force (and is logged).
    pub fn reload_if_changed(&self) -> Option<RevokedSet> {
        let now = stamp(&self.path);
        if self.state.read().unwrap_or_else(PoisonError::into_inner).1 == now {
            return None;
        }
        match RevokedSet::load(&self.path) {
            Ok(set) => {
                let mut st = self.state.write().unwrap_or_else(PoisonError::into_inner);
                st.1 = now;
                if st.0 == set {
                    return None;
                }
                tracing::info!(
                    nodes = set.nodes.len(),
                    serials = set.serials.len(),
                    "revocation list reloaded"
                );
                st.0 = set.clone();
                Some(set)
            }
            Err(e) => {
                tracing::warn!(error = %e, "revocation list not reloaded; the previous one stays");
                self.state.write().unwrap_or_else(PoisonError::into_inner).1 = now;
                None
            }
        }
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Refusals for Revocations {
    fn is_refused(&self, node: &NodeId, serial: &str) -> bool {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .contains(node, serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    #[test]
    fn parse_edit_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked");
        let r = Revocations::load(path.clone()).unwrap();
        assert!(!r.is_refused(&id("n1"), "ab"));

        assert!(edit(&path, Some(&id("n1")), None, true).unwrap());
        assert!(!edit(&path, Some(&id("n1")), None, true).unwrap());
        assert!(edit(&path, None, Some("00AB01"), true).unwrap());
        let set = r.reload_if_changed().expect("changed");
        assert!(set.nodes.contains(&id("n1")));
        assert!(r.is_refused(&id("n1"), "ff"));
        assert!(r.is_refused(&id("n2"), "ab01"));
        assert!(!r.is_refused(&id("n2"), "ab02"));

        assert!(edit(&path, Some(&id("n1")), None, false).unwrap());
        r.reload_if_changed().expect("changed");
        assert!(!r.is_refused(&id("n1"), "ff"));

        // A broken file keeps the previous list.
        std::fs::write(&path, "serial ab01\nbogus line here\n").unwrap();
        assert!(r.reload_if_changed().is_none());
        assert!(r.is_refused(&id("x"), "ab01"));
        let err = RevokedSet::load(&path).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(edit(&path, None, Some("zz"), true).is_err());
    }
}
