//! Upload session affinity: which replica created each blob upload, so the session's later
//! requests (PATCH, PUT, GET status, DELETE) go to the same replica whatever the balancing
//! policy, even for many clients behind one NAT address.
//!
//! The session is known by the upload id in the `Location` of the replica's `202 Accepted`
//! (`/v2/<name>/blobs/uploads/<id>`). Entries are dropped when the upload completes or is
//! cancelled, and otherwise expire; the map is bounded. Losing an entry is not fatal when the
//! replicas share storage (Distribution keeps upload state there), it only loses affinity.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Sessions remembered at most.
const MAX_SESSIONS: usize = 100_000;
/// A session untouched this long is forgotten.
const SESSION_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest upload id accepted.
const MAX_ID: usize = 128;

/// The upload id at the end of an upload path (`.../blobs/uploads/<id>`), if it is one.
/// Ids are limited to characters registries use (UUIDs, base64url), so they are safe as keys
/// and in logs.
pub fn upload_id(path: &str) -> Option<&str> {
    let (_, tail) = path.rsplit_once("/blobs/uploads/")?;
    (!tail.is_empty()
        && tail.len() <= MAX_ID
        && tail
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'=')))
    .then_some(tail)
}

/// Whether `path` is an upload path with something other than a valid id after
/// `/blobs/uploads/`.
pub fn has_bad_id(path: &str) -> bool {
    match path.rsplit_once("/blobs/uploads") {
        Some((_, "" | "/")) | None => false,
        Some(_) => upload_id(path).is_none(),
    }
}

#[derive(Debug, Default)]
pub struct UploadSessions {
    map: Mutex<HashMap<(usize, String), (usize, Instant)>>,
}

impl UploadSessions {
    /// The replica of pool `pool` holding session `id`.
    pub fn get(&self, pool: usize, id: &str, now: Instant) -> Option<usize> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = map.get_mut(&(pool, id.to_owned()))?;
        if now.duration_since(entry.1) > SESSION_TTL {
            return None;
        }
        entry.1 = now;
        Some(entry.0)
    }

    pub fn insert(&self, pool: usize, id: &str, replica: usize, now: Instant) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, (_, t)| now.duration_since(*t) <= SESSION_TTL);
            if map.len() >= MAX_SESSIONS {
                tracing::warn!("too many open upload sessions; forgetting their replicas");
                map.clear();
            }
        }
        map.insert((pool, id.to_owned()), (replica, now));
    }

    pub fn remove(&self, pool: usize, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(pool, id.to_owned()));
    }

    pub fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_parsed_strictly() {
        let id = "6f6c1ef8-5b3c-4a4e-9d2c-2b8f0f1b2c3d";
        assert_eq!(upload_id(&format!("/v2/a/b/blobs/uploads/{id}")), Some(id));
        assert_eq!(upload_id("/v2/a/blobs/uploads/"), None);
        assert_eq!(upload_id("/v2/a/blobs/uploads/x/y"), None);
        assert_eq!(upload_id("/v2/a/blobs/uploads/%2e%2e"), None);
        assert!(has_bad_id("/v2/a/blobs/uploads/x/../y"));
        assert!(!has_bad_id("/v2/a/blobs/uploads/"));
        assert!(!has_bad_id("/v2/a/blobs/uploads"));
        assert!(!has_bad_id(&format!("/v2/a/blobs/uploads/{id}")));
    }

    #[test]
    fn sessions_expire_and_are_removed() {
        let s = UploadSessions::default();
        let t0 = Instant::now();
        s.insert(0, "u1", 1, t0);
        assert_eq!(s.get(0, "u1", t0), Some(1));
        assert_eq!(s.get(1, "u1", t0), None);
        assert_eq!(
            s.get(0, "u1", t0 + SESSION_TTL + Duration::from_secs(1)),
            None
        );
        s.remove(0, "u1");
        assert!(s.is_empty());
    }
}
