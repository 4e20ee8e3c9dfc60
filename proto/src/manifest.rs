//! Piece manifests: the SHA-256 of every piece of a blob, anchored to the blob's digest, and
//! the incremental hasher that computes one while the blob streams past.
//!
//! # Trust
//! A manifest is worth exactly as much as the reader that computed it. It is trusted only when
//! computed by a reader of the *whole* blob whose digest matched: [`PieceHasher::finish`]
//! refuses to produce a manifest otherwise, so a [`PieceManifest`] built locally is anchored by
//! construction. Agents accept manifests from the coordinator only (never from a peer): the
//! coordinator computes one itself when the blob streams through it, or takes it from the agent
//! that held the blob's origin slot and read the blob from the origin (see `tracker`).
//! Pieces are checked against the manifest before they are written, served or streamed; the
//! whole blob is still checked against its digest before commit, so even a lying manifest
//! cannot get a wrong blob committed.
//!
//! While the first reader is still downloading, the hashes of the pieces it has read so far
//! travel as provisional [`PieceHashes`](crate::msg::PieceHashes); once it has the whole blob
//! and its digest matched, it publishes the anchored manifest and the coordinator checks the
//! two agree.

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::digest::{Algorithm, Digest, Hasher};
use crate::piece::{Geometry, MAX_PIECES};

/// SHA-256 of one piece.
pub type PieceHash = [u8; 32];

/// SHA-256 of `bytes`, as piece hashes are computed.
pub fn piece_hash(bytes: &[u8]) -> PieceHash {
    sha2::Sha256::digest(bytes).into()
}

/// Why a piece manifest is not acceptable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("piece length {piece_len} is not a power of two between 256 KiB and 16 MiB")]
    PieceLen { piece_len: u64 },
    #[error("a blob of {size} bytes has {expected} pieces, the manifest lists {found}")]
    Count {
        size: u64,
        expected: u64,
        found: usize,
    },
    #[error("blob of {size} bytes has more than {MAX_PIECES} pieces: not shared between peers")]
    TooManyPieces { size: u64 },
    #[error("read {read} bytes of a blob announced as {size} bytes")]
    SizeMismatch { size: u64, read: u64 },
    #[error("blob digest mismatch: expected {expected}, read {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
}

/// Piece length and SHA-256 of every piece of a blob. Only constructed valid: geometry within
/// the rules, one hash per piece, at most [`MAX_PIECES`] pieces (deserialisation checks too).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawManifest")]
pub struct PieceManifest {
    digest: Digest,
    size: u64,
    piece_len: u64,
    hashes: Vec<PieceHash>,
}

#[derive(Deserialize)]
struct RawManifest {
    digest: Digest,
    size: u64,
    piece_len: u64,
    hashes: Vec<PieceHash>,
}

impl TryFrom<RawManifest> for PieceManifest {
    type Error = ManifestError;
    fn try_from(r: RawManifest) -> Result<Self, ManifestError> {
        PieceManifest::new(r.digest, r.size, r.piece_len, r.hashes)
    }
}

impl std::fmt::Debug for PieceManifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PieceManifest")
            .field("digest", &self.digest)
            .field("size", &self.size)
            .field("piece_len", &self.piece_len)
            .field("pieces", &self.hashes.len())
            .finish()
    }
}

/// Checks size and piece length against the geometry rules and the piece bound.
pub(crate) fn check_geometry(size: u64, piece_len: u64) -> Result<Geometry, ManifestError> {
    let g =
        Geometry::with_piece_len(size, piece_len).ok_or(ManifestError::PieceLen { piece_len })?;
    if size.div_ceil(piece_len) > u64::from(MAX_PIECES) {
        return Err(ManifestError::TooManyPieces { size });
    }
    Ok(g)
}

impl PieceManifest {
    /// Validates a manifest received or rebuilt from parts. This does not make it trusted:
    /// see the module documentation for where manifests may come from.
    pub fn new(
        digest: Digest,
        size: u64,
        piece_len: u64,
        hashes: Vec<PieceHash>,
    ) -> Result<PieceManifest, ManifestError> {
        let m = PieceManifest {
            digest,
            size,
            piece_len,
            hashes,
        };
        m.validate()?;
        Ok(m)
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn piece_len(&self) -> u64 {
        self.piece_len
    }

    pub fn geometry(&self) -> Geometry {
        // Checked at construction; with_piece_len cannot fail here.
        Geometry::with_piece_len(self.size, self.piece_len).expect("validated geometry")
    }

    pub fn count(&self) -> u32 {
        self.hashes.len() as u32
    }

    pub fn hashes(&self) -> &[PieceHash] {
        &self.hashes
    }

    /// Expected hash of piece `index`; `None` past the end.
    pub fn hash(&self, index: u32) -> Option<&PieceHash> {
        self.hashes.get(index as usize)
    }

    /// Whether `bytes` is exactly piece `index`: the right length and the right SHA-256.
    pub fn verify_piece(&self, index: u32, bytes: &[u8]) -> bool {
        let Some(range) = self.geometry().range(index) else {
            return false;
        };
        range.end - range.start == bytes.len() as u64
            && self.hash(index) == Some(&piece_hash(bytes))
    }

    /// Checks the invariants: geometry within the rules and the piece bound, one hash per
    /// piece. Always `Ok` for a constructed value; [`PieceManifest::new`] runs it.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let g = check_geometry(self.size, self.piece_len)?;
        if self.hashes.len() != g.count() as usize {
            return Err(ManifestError::Count {
                size: self.size,
                expected: u64::from(g.count()),
                found: self.hashes.len(),
            });
        }
        Ok(())
    }
}

/// Builds a piece manifest while a blob streams past, in order, together with its digest.
///
/// Pure and incremental: the caller feeds whatever chunks it reads (from the origin, from the
/// store) and calls [`finish`](PieceHasher::finish) with the digest it expected.
#[derive(Debug, Clone)]
pub struct PieceHasher {
    geometry: Geometry,
    blob: Hasher,
    piece: sha2::Sha256,
    in_piece: u64,
    read: u64,
    hashes: Vec<PieceHash>,
}

impl PieceHasher {
    /// A hasher for a blob of `size` bytes cut as the design prescribes, hashing the whole
    /// blob with `algorithm` (the algorithm of the digest it will be checked against).
    pub fn new(size: u64, algorithm: Algorithm) -> Result<PieceHasher, ManifestError> {
        let g = Geometry::for_size(size);
        check_geometry(size, g.piece_len())?;
        Ok(PieceHasher {
            geometry: g,
            blob: Hasher::new(algorithm),
            piece: sha2::Sha256::new(),
            in_piece: 0,
            read: 0,
            hashes: Vec::with_capacity(g.count() as usize),
        })
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.read
    }

    /// Hashes of the pieces completed so far, in order (the provisional hashes a seeder may
    /// publish before the blob is complete).
    pub fn completed(&self) -> &[PieceHash] {
        &self.hashes
    }

    /// Feeds the next bytes of the blob. Fails, consuming nothing, when they would run past
    /// the announced size.
    pub fn update(&mut self, mut bytes: &[u8]) -> Result<(), ManifestError> {
        let size = self.geometry.size();
        if bytes.len() as u64 > size - self.read {
            return Err(ManifestError::SizeMismatch {
                size,
                read: self.read.saturating_add(bytes.len() as u64),
            });
        }
        self.blob.update(bytes);
        let plen = self.geometry.piece_len();
        while !bytes.is_empty() {
            let take = ((plen - self.in_piece).min(bytes.len() as u64)) as usize;
            self.piece.update(&bytes[..take]);
            self.in_piece += take as u64;
            self.read += take as u64;
            bytes = &bytes[take..];
            if self.in_piece == plen || self.read == size {
                let h = std::mem::take(&mut self.piece).finalize();
                self.hashes.push(h.into());
                self.in_piece = 0;
            }
        }
        Ok(())
    }

    /// Completes the blob: the manifest, only if exactly `size` bytes were fed and they hash
    /// to `expected`. This check is what anchors the manifest.
    pub fn finish(self, expected: &Digest) -> Result<PieceManifest, ManifestError> {
        let size = self.geometry.size();
        if self.read != size {
            return Err(ManifestError::SizeMismatch {
                size,
                read: self.read,
            });
        }
        let actual = self.blob.finish();
        if &actual != expected {
            return Err(ManifestError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        PieceManifest::new(actual, size, self.geometry.piece_len(), self.hashes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::piece::MIN_PIECE_LEN;

    fn blob(len: usize) -> Vec<u8> {
        let mut r = crate::rng::Rng::new(len as u64);
        (0..len).map(|_| r.next_u64() as u8).collect()
    }

    fn build(data: &[u8], chunk: usize) -> PieceManifest {
        let mut h = PieceHasher::new(data.len() as u64, Algorithm::Sha256).unwrap();
        for c in data.chunks(chunk.max(1)) {
            h.update(c).unwrap();
        }
        h.finish(&Digest::sha256_of(data)).unwrap()
    }

    #[test]
    fn hashes_every_piece_whatever_the_chunking() {
        let len = 3 * MIN_PIECE_LEN as usize + 1234;
        let data = blob(len);
        let m = build(&data, 7919);
        assert_eq!(m.count(), 4);
        assert_eq!(m, build(&data, len));
        assert_eq!(m, build(&data, MIN_PIECE_LEN as usize));
        assert_eq!(m.digest(), &Digest::sha256_of(&data));
        let g = m.geometry();
        for i in 0..m.count() {
            let r = g.range(i).unwrap();
            let piece = &data[r.start as usize..r.end as usize];
            assert_eq!(m.hash(i), Some(&piece_hash(piece)));
            assert!(m.verify_piece(i, piece));
            let mut bad = piece.to_vec();
            bad[0] ^= 1;
            assert!(!m.verify_piece(i, &bad));
            assert!(!m.verify_piece(i, &piece[1..]));
        }
        assert!(!m.verify_piece(4, b""));
        assert!(m.validate().is_ok());
    }

    #[test]
    fn empty_and_exact_multiple_blobs() {
        let m = build(b"", 1);
        assert_eq!(m.count(), 0);
        let data = blob(2 * MIN_PIECE_LEN as usize);
        let m = build(&data, 4096);
        assert_eq!(m.count(), 2);
        assert!(m.verify_piece(1, &data[MIN_PIECE_LEN as usize..]));
    }

    #[test]
    fn finish_anchors_to_the_digest() {
        let data = blob(1000);
        let mut h = PieceHasher::new(1000, Algorithm::Sha256).unwrap();
        h.update(&data).unwrap();
        let other = Digest::sha256_of(b"other");
        assert!(matches!(
            h.clone().finish(&other),
            Err(ManifestError::DigestMismatch { .. })
        ));
        // Overrun is refused without consuming; short input cannot finish.
        assert!(matches!(
            h.update(b"x"),
            Err(ManifestError::SizeMismatch { .. })
        ));
        let mut short = PieceHasher::new(1001, Algorithm::Sha256).unwrap();
        short.update(&data).unwrap();
        assert!(matches!(
            short.finish(&Digest::sha256_of(&data)),
            Err(ManifestError::SizeMismatch {
                size: 1001,
                read: 1000
            })
        ));
        // sha512 blobs: pieces are still SHA-256.
        let mut h = PieceHasher::new(1000, Algorithm::Sha512).unwrap();
        h.update(&data).unwrap();
        let mut want = Hasher::new(Algorithm::Sha512);
        want.update(&data);
        let m = h.finish(&want.finish()).unwrap();
        assert!(m.verify_piece(0, &data));
    }

    #[test]
    fn new_and_deserialisation_validate() {
        let d = Digest::sha256_of(b"x");
        let size = 2 * MIN_PIECE_LEN + 1;
        assert!(PieceManifest::new(d.clone(), size, MIN_PIECE_LEN, vec![[0; 32]; 3]).is_ok());
        assert!(matches!(
            PieceManifest::new(d.clone(), size, MIN_PIECE_LEN, vec![[0; 32]; 2]),
            Err(ManifestError::Count { .. })
        ));
        assert!(matches!(
            PieceManifest::new(d.clone(), size, 1000, vec![]),
            Err(ManifestError::PieceLen { .. })
        ));
        assert!(matches!(
            PieceManifest::new(d.clone(), u64::MAX, crate::piece::MAX_PIECE_LEN, vec![]),
            Err(ManifestError::TooManyPieces { .. })
        ));
        assert!(PieceHasher::new(u64::MAX, Algorithm::Sha256).is_err());
        let m = PieceManifest::new(d.clone(), size, MIN_PIECE_LEN, vec![[7; 32]; 3]).unwrap();
        let bytes = postcard::to_allocvec(&m).unwrap();
        assert_eq!(postcard::from_bytes::<PieceManifest>(&bytes).unwrap(), m);
        let forged =
            postcard::to_allocvec(&(d.clone(), size, MIN_PIECE_LEN, vec![[7u8; 32]; 4])).unwrap();
        assert!(postcard::from_bytes::<PieceManifest>(&forged).is_err());
    }
}
