//! The anchored piece manifests of the blobs this node committed from the swarm, kept so that
//! a coordinator that takes a blob's swarm over (its owner failed, or it restarted) can ask for
//! one ([`CoordMsg::ManifestWanted`](shoal_proto::msg::CoordMsg::ManifestWanted)) instead of
//! sending every downloader to the origin again. In memory only, bounded by the number of piece
//! hashes held (32 bytes each); the oldest go first.

use std::collections::{HashMap, VecDeque};

use shoal_proto::Digest;
use shoal_proto::manifest::PieceManifest;

/// Piece hashes kept at most (8 MiB of hashes).
pub(crate) const MAX_KEPT_HASHES: usize = 256 * 1024;

pub(crate) struct KeptManifests {
    by_digest: HashMap<Digest, PieceManifest>,
    order: VecDeque<Digest>,
    hashes: usize,
    max_hashes: usize,
}

impl KeptManifests {
    pub(crate) fn new(max_hashes: usize) -> KeptManifests {
        KeptManifests {
            by_digest: HashMap::new(),
            order: VecDeque::new(),
            hashes: 0,
            max_hashes,
        }
    }

    pub(crate) fn insert(&mut self, manifest: PieceManifest) {
        let n = manifest.hashes().len();
        if n > self.max_hashes {
            return;
        }
        let digest = manifest.digest().clone();
        if let Some(old) = self.by_digest.insert(digest.clone(), manifest) {
            self.hashes -= old.hashes().len();
            self.order.retain(|d| d != &digest);
        }
        self.order.push_back(digest);
        self.hashes += n;
        while self.hashes > self.max_hashes {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(m) = self.by_digest.remove(&oldest) {
                self.hashes -= m.hashes().len();
            }
        }
    }

    pub(crate) fn get(&self, digest: &Digest) -> Option<&PieceManifest> {
        self.by_digest.get(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::piece::MIN_PIECE_LEN;

    fn manifest(seed: &[u8], pieces: usize) -> PieceManifest {
        let len = MIN_PIECE_LEN;
        PieceManifest::new(
            Digest::sha256_of(seed),
            len * pieces as u64,
            len,
            vec![[1; 32]; pieces],
        )
        .unwrap()
    }

    #[test]
    fn keeps_the_newest_within_the_hash_bound() {
        let mut kept = KeptManifests::new(8);
        let big = 4;
        kept.insert(manifest(b"a", big));
        kept.insert(manifest(b"b", big));
        assert!(kept.get(&Digest::sha256_of(b"a")).is_some());
        // Re-inserting does not count twice.
        kept.insert(manifest(b"b", big));
        assert!(kept.get(&Digest::sha256_of(b"a")).is_some());
        kept.insert(manifest(b"c", 1));
        assert!(kept.get(&Digest::sha256_of(b"a")).is_none());
        assert!(kept.get(&Digest::sha256_of(b"b")).is_some());
        assert!(kept.get(&Digest::sha256_of(b"c")).is_some());
        assert_eq!(kept.hashes, big + 1);
        // One larger than the bound is not kept at all.
        kept.insert(manifest(b"d", 9));
        assert!(kept.get(&Digest::sha256_of(b"d")).is_none());
        assert!(kept.get(&Digest::sha256_of(b"c")).is_some());
    }
}
