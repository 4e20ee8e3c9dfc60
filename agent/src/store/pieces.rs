//! One download written piece by piece, at any offset: the swarm's counterpart of
//! [`Ingest`](super::Ingest), which only appends.
//!
//! The caller verifies each piece (against the piece manifest or the provisional hashes) before
//! handing it to [`PieceIngest::write_piece`]; from then on the piece is *held*: peers may read
//! it ([`PieceIngest::read_piece`]) and local clients may read the contiguous held prefix
//! ([`PieceIngest::prefix_bytes`]). Nothing that was not handed in as verified is ever readable
//! through this API.
//!
//! Commit: the whole file is hashed in order, incrementally as the held prefix grows
//! ([`PieceIngest::hash_prefix`]), with a [`PieceHasher`] that builds the anchored piece manifest
//! on the way. [`PieceIngest::commit`] finishes it and renames the file into `blobs/` only when
//! the whole blob matches its digest, so a file under `blobs/` still always hashes to its name.
//!
//! Resume protocol: the file is `ingest/<alg>-<hex>.pieces`, sized to the blob (sparse). Every
//! [`CHECKPOINT_INTERVAL`] bytes (and at [`PieceIngest::checkpoint`]) it is fsync'ed and then
//! the held bitmap as it was before the fsync is recorded in the index. After a crash, the
//! recorded pieces are *candidates*: on disk, but not held until the caller re-verifies them
//! ([`PieceIngest::read_unverified`], then [`PieceIngest::accept_candidate`]) against hashes it
//! trusts. Pieces without a record are simply fetched again.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use shoal_proto::digest::Digest;
use shoal_proto::manifest::{ManifestError, PieceHasher, PieceManifest};
use shoal_proto::piece::{Bitmap, Geometry};
use tracing::{debug, info, warn};

use super::error::StoreError;
use super::index::PieceRecord;
use super::{CHECKPOINT_INTERVAL, Inner, fsutil};

/// Bytes read per call while hashing the prefix.
const HASH_CHUNK: usize = 1024 * 1024;

/// An exclusive, piece-addressed writer for one digest. Shareable (`&self` everywhere), so the
/// download, the peers it serves and the prefix hasher can use it from several threads.
///
/// Dropping it without [`commit`](PieceIngest::commit) or [`abandon`](PieceIngest::abandon)
/// keeps the file and its last checkpoint for a later resume.
pub struct PieceIngest {
    inner: Arc<Inner>,
    digest: Digest,
    path: PathBuf,
    file: File,
    state: Mutex<State>,
    hash: Mutex<PrefixHash>,
    /// Serialises checkpoints (fsync + record) without blocking writers.
    checkpointing: Mutex<()>,
    /// Bumped whenever a held piece is dropped, so a reader can tell that the bytes it read
    /// may belong to a piece that is no longer held.
    discards: AtomicU64,
}

struct State {
    geometry: Option<Geometry>,
    /// Verified pieces on disk: the only readable ones.
    held: Bitmap,
    /// Pieces recorded by an earlier run, not yet re-verified.
    candidates: Bitmap,
    /// What the previous run recorded, until the geometry confirms it.
    resumed: Option<PieceRecord>,
    /// Bytes of held pieces written since the last fsync.
    unsynced: u64,
    /// Whether a record exists in the index for this digest.
    recorded: bool,
    /// A write failed: the content of the file is unknown past the last checkpoint.
    failed: bool,
    /// Committed or abandoned.
    finished: bool,
}

struct PrefixHash {
    hasher: Option<PieceHasher>,
    /// Pieces fed to `hasher` so far, in order.
    pieces: u32,
}

impl std::fmt::Debug for PieceIngest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("PieceIngest")
            .field("digest", &self.digest)
            .field("geometry", &st.geometry)
            .field("held", &st.held)
            .finish_non_exhaustive()
    }
}

impl PieceIngest {
    /// Claims `d` and opens its piece file. A record from an earlier run becomes the candidate
    /// set once [`set_geometry`](PieceIngest::set_geometry) confirms the same geometry. An
    /// append-mode ingest file of the same digest is removed: one partial copy per digest.
    pub(super) fn start(inner: Arc<Inner>, d: &Digest) -> Result<PieceIngest, StoreError> {
        {
            let mut st = inner.lock();
            if !st.ingesting.insert(d.clone()) {
                return Err(StoreError::Busy(d.clone()));
            }
            st.stash.remove(d);
        }
        let release = |inner: &Inner| {
            inner.lock().ingesting.remove(d);
        };
        let path = inner.piece_ingest_path(d);
        let opened = (|| {
            inner.remove_append_ingest(d);
            let file = fsutil::open_ingest_file(&path)
                .map_err(|e| StoreError::io("open piece ingest file", &path, e))?;
            let record = match inner.index.piece_record(d) {
                Ok(r) => r,
                Err(error) => {
                    warn!(digest = %d, %error, "cannot read piece checkpoint; starting over");
                    None
                }
            };
            Ok::<_, StoreError>((file, record))
        })();
        let (file, record) = match opened {
            Ok(x) => x,
            Err(e) => {
                release(&inner);
                return Err(e);
            }
        };
        let recorded = record.is_some();
        Ok(PieceIngest {
            path,
            digest: d.clone(),
            file,
            state: Mutex::new(State {
                geometry: None,
                held: Bitmap::new(0),
                candidates: Bitmap::new(0),
                resumed: record,
                unsynced: 0,
                recorded,
                failed: false,
                finished: false,
            }),
            hash: Mutex::new(PrefixHash {
                hasher: None,
                pieces: 0,
            }),
            checkpointing: Mutex::new(()),
            discards: AtomicU64::new(0),
            inner,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Each update is a few field writes; a panic between them leaves nothing worse than
        // a piece that must be fetched again.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_hash(&self) -> MutexGuard<'_, PrefixHash> {
        self.hash.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The piece file. Readers may open it to stream the held prefix; an open descriptor keeps
    /// reading the same inode after the commit renames it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn geometry(&self) -> Option<Geometry> {
        self.lock().geometry
    }

    /// Fixes the blob's geometry, once. Sizes the file; resumes the previous run's pieces as
    /// candidates when its record has the same geometry, and starts over otherwise. Fails when
    /// a different geometry was set before or the blob has too many pieces to be cut.
    pub fn set_geometry(&self, g: Geometry) -> Result<(), StoreError> {
        // Lock order everywhere: the prefix hash, then the state.
        let mut h = self.lock_hash();
        let mut st = self.lock();
        if let Some(known) = st.geometry {
            return if known == g {
                Ok(())
            } else {
                Err(self.bad_geometry(format!(
                    "geometry {}/{} contradicts the known {}/{}",
                    g.size(),
                    g.piece_len(),
                    known.size(),
                    known.piece_len()
                )))
            };
        }
        let hasher = PieceHasher::new(g.size(), self.digest.algorithm())
            .map_err(|e| self.bad_geometry(e.to_string()))?;
        let n = g.count();
        let resumed = st.resumed.take().and_then(|r| {
            let same = r.size == g.size() && r.piece_len == g.piece_len();
            same.then(|| Bitmap::from_bytes(n, &r.bitmap)).flatten()
        });
        let len = self
            .file
            .metadata()
            .map_err(|e| StoreError::io("stat piece ingest file", &self.path, e))?
            .len();
        let candidates = match resumed {
            Some(b) if len == g.size() => b,
            _ => {
                if st.recorded || len > 0 {
                    debug!(digest = %self.digest, len, "piece ingest not resumable; starting over");
                }
                self.file
                    .set_len(0)
                    .map_err(|e| StoreError::io("truncate piece ingest file", &self.path, e))?;
                if st.recorded {
                    self.inner
                        .index
                        .remove_piece_keys(&[self.digest.to_string()])?;
                    st.recorded = false;
                }
                Bitmap::new(n)
            }
        };
        // Sparse: blocks are allocated as pieces land.
        self.file
            .set_len(g.size())
            .map_err(|e| StoreError::io("size piece ingest file", &self.path, e))?;
        if candidates.count_ones() > 0 {
            info!(digest = %self.digest, pieces = candidates.count_ones(), of = n,
                "resuming piece ingest: recorded pieces await re-verification");
        }
        st.geometry = Some(g);
        st.held = Bitmap::new(n);
        st.candidates = candidates;
        *h = PrefixHash {
            hasher: Some(hasher),
            pieces: 0,
        };
        Ok(())
    }

    fn bad_geometry(&self, reason: String) -> StoreError {
        StoreError::Geometry {
            digest: self.digest.clone(),
            reason,
        }
    }

    fn range(&self, st: &State, index: u32) -> Result<std::ops::Range<u64>, StoreError> {
        let g = st
            .geometry
            .ok_or_else(|| self.bad_geometry("no geometry set yet".into()))?;
        g.range(index).ok_or_else(|| {
            self.bad_geometry(format!("piece {index} out of range ({} pieces)", g.count()))
        })
    }

    /// Pieces of an earlier run still on disk, waiting to be re-verified.
    pub fn candidates(&self) -> Vec<u32> {
        self.lock().candidates.ones().collect()
    }

    /// The bytes on disk where `index` lies, whether held or not: for re-verifying candidates.
    /// Never serve these before [`accept_candidate`](PieceIngest::accept_candidate).
    pub fn read_unverified(&self, index: u32) -> Result<Vec<u8>, StoreError> {
        let range = self.range(&self.lock(), index)?;
        self.read_range(range)
    }

    fn read_range(&self, range: std::ops::Range<u64>) -> Result<Vec<u8>, StoreError> {
        let mut buf = vec![0; (range.end - range.start) as usize];
        self.file
            .read_exact_at(&mut buf, range.start)
            .map_err(|e| StoreError::io("read piece ingest file", &self.path, e))?;
        Ok(buf)
    }

    /// A candidate's bytes on disk were verified by the caller: the piece is held.
    pub fn accept_candidate(&self, index: u32) {
        let mut st = self.lock();
        if st.candidates.get(index) {
            st.candidates.clear(index);
            st.held.set(index);
        }
    }

    /// Writes a verified piece at its offset; it is held once this returns. The caller must
    /// have checked the bytes against the piece's hash: the store cannot.
    pub fn write_piece(&self, index: u32, bytes: &[u8]) -> Result<(), StoreError> {
        let range = {
            let st = self.lock();
            if st.failed || st.finished {
                return Err(StoreError::IngestFailed(self.digest.clone()));
            }
            self.range(&st, index)?
        };
        if range.end - range.start != bytes.len() as u64 {
            return Err(self.bad_geometry(format!(
                "piece {index} is {} bytes, {} given",
                range.end - range.start,
                bytes.len()
            )));
        }
        if let Err(e) = self.file.write_all_at(bytes, range.start) {
            return Err(self.fail("write piece ingest file", e));
        }
        let checkpoint = {
            let mut st = self.lock();
            st.candidates.clear(index);
            st.held.set(index);
            st.unsynced += bytes.len() as u64;
            st.unsynced >= CHECKPOINT_INTERVAL
        };
        if checkpoint {
            match self.checkpoint() {
                // Only the resume point is lost; the download itself can still complete.
                Err(error @ StoreError::Index { .. }) => {
                    warn!(digest = %self.digest, %error, "cannot record piece checkpoint");
                }
                other => other?,
            }
        }
        Ok(())
    }

    /// Forgets a held piece (its hash turned out wrong): it is no longer readable and must be
    /// written again. Rewinds the prefix hash if it had consumed the piece.
    pub fn discard_piece(&self, index: u32) {
        {
            let mut st = self.lock();
            st.held.clear(index);
            st.candidates.clear(index);
        }
        self.discards.fetch_add(1, Ordering::SeqCst);
        let size = self.lock().geometry.map(|g| g.size());
        let mut h = self.lock_hash();
        if index < h.pieces {
            h.hasher = size.and_then(|s| PieceHasher::new(s, self.digest.algorithm()).ok());
            h.pieces = 0;
        }
    }

    /// The held pieces.
    pub fn held(&self) -> Bitmap {
        self.lock().held.clone()
    }

    pub fn is_held(&self, index: u32) -> bool {
        self.lock().held.get(index)
    }

    /// Bytes from offset 0 that are held: how far a sequential reader may go.
    pub fn prefix_bytes(&self) -> u64 {
        let st = self.lock();
        held_prefix_bytes(&st)
    }

    /// A held piece's bytes; `None` when the piece is not held (or was dropped while being
    /// read).
    pub fn read_piece(&self, index: u32) -> Result<Option<Vec<u8>>, StoreError> {
        let before = self.discards.load(Ordering::SeqCst);
        let range = {
            let st = self.lock();
            if !st.held.get(index) {
                return Ok(None);
            }
            self.range(&st, index)?
        };
        let bytes = self.read_range(range)?;
        if self.discards.load(Ordering::SeqCst) != before && !self.is_held(index) {
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// Feeds the held prefix not hashed yet to the whole-blob hasher (reading it back from
    /// the file, normally the page cache). Returns the bytes hashed so far. Call it as the
    /// prefix grows, on a blocking thread, so the commit has little left to do.
    pub fn hash_prefix(&self) -> Result<u64, StoreError> {
        let mut h = self.lock_hash();
        let (g, prefix) = {
            let st = self.lock();
            let Some(g) = st.geometry else {
                return Ok(0);
            };
            (g, st.held.prefix_len())
        };
        let alg = self.digest.algorithm();
        if h.hasher.is_none() {
            h.hasher = Some(
                PieceHasher::new(g.size(), alg).map_err(|e| self.bad_geometry(e.to_string()))?,
            );
            h.pieces = 0;
        }
        while h.pieces < prefix {
            let range = self.range(&self.lock(), h.pieces)?;
            let mut at = range.start;
            while at < range.end {
                let len = ((range.end - at) as usize).min(HASH_CHUNK);
                let bytes = self.read_range(at..at + len as u64)?;
                let hasher = h.hasher.as_mut().expect("set above");
                if let Err(e) = hasher.update(&bytes) {
                    return Err(self.bad_geometry(e.to_string()));
                }
                at += len as u64;
            }
            h.pieces += 1;
        }
        Ok(h.hasher.as_ref().map_or(0, PieceHasher::position))
    }

    /// Makes every held piece durable and records them as the resume point.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let _one = self
            .checkpointing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (g, snapshot, first) = {
            let mut st = self.lock();
            if st.failed || st.finished {
                return Err(StoreError::IngestFailed(self.digest.clone()));
            }
            let Some(g) = st.geometry else {
                return Ok(());
            };
            // Recorded pieces are those held before the fsync below: a piece written after
            // this snapshot is not claimed until the next checkpoint.
            let snapshot = st.held.clone();
            st.unsynced = 0;
            (g, snapshot, !st.recorded)
        };
        if let Err(e) = self.file.sync_data() {
            return Err(self.fail("fsync piece ingest file", e));
        }
        if first {
            // The first record makes the file worth finding after a power loss.
            let dir = self.inner.ingest_dir();
            fsutil::fsync_dir(&dir)
                .map_err(|e| StoreError::io("fsync ingest directory", &dir, e))?;
        }
        self.inner.index.set_piece_record(
            &self.digest,
            &PieceRecord {
                size: g.size(),
                piece_len: g.piece_len(),
                bitmap: snapshot.to_bytes(),
            },
        )?;
        self.lock().recorded = true;
        debug!(digest = %self.digest, pieces = snapshot.count_ones(), "piece checkpoint");
        Ok(())
    }

    /// Verifies the whole blob against its digest (finishing the prefix hash), and moves the
    /// file into `blobs/`. Returns the anchored piece manifest built on the way. Fails, keeping
    /// the file, while pieces are missing; on a digest mismatch the file and its record are
    /// deleted, so the next attempt starts clean.
    pub fn commit(&self, media_type: Option<&str>) -> Result<PieceManifest, StoreError> {
        {
            let st = self.lock();
            if st.failed || st.finished {
                return Err(StoreError::IngestFailed(self.digest.clone()));
            }
            let g = st
                .geometry
                .ok_or_else(|| self.bad_geometry("no geometry set yet".into()))?;
            if !st.held.is_complete() {
                return Err(StoreError::SizeMismatch {
                    digest: self.digest.clone(),
                    expected: g.size(),
                    actual: held_prefix_bytes(&st),
                });
            }
        }
        self.hash_prefix()?;
        let hasher = self.lock_hash().hasher.take();
        let Some(hasher) = hasher else {
            return Err(self.bad_geometry("no geometry set yet".into()));
        };
        let size = hasher.geometry().size();
        let manifest = match hasher.finish(&self.digest) {
            Ok(m) => m,
            Err(e) => {
                self.discard();
                return Err(match e {
                    ManifestError::DigestMismatch { expected, actual } => {
                        warn!(%expected, %actual, size, "piece ingest failed verification; discarded");
                        StoreError::DigestMismatch { expected, actual }
                    }
                    ManifestError::SizeMismatch { size, read } => StoreError::SizeMismatch {
                        digest: self.digest.clone(),
                        expected: size,
                        actual: read,
                    },
                    other => self.bad_geometry(other.to_string()),
                });
            }
        };
        if let Err(e) = self.file.sync_all() {
            let err =
                self.inner
                    .write_error(&self.digest, "fsync piece ingest file", &self.path, e);
            // After a failed fsync the page cache may have dropped the data.
            self.discard();
            return Err(err);
        }
        self.lock().finished = true;
        self.inner
            .install(&self.digest, &self.path, size, media_type, true)?;
        Ok(manifest)
    }

    /// Deletes the file and its record: the data is bad or the download is given up.
    pub fn abandon(&self) {
        self.discard();
    }

    fn discard(&self) {
        let recorded = {
            let mut st = self.lock();
            st.finished = true;
            st.held = Bitmap::new(st.held.len());
            std::mem::take(&mut st.recorded)
        };
        self.discards.fetch_add(1, Ordering::SeqCst);
        if let Err(error) = fsutil::remove_if_exists(&self.path) {
            warn!(digest = %self.digest, path = %self.path.display(), %error, "cannot remove piece ingest file");
        }
        if recorded
            && let Err(error) = self
                .inner
                .index
                .remove_piece_keys(&[self.digest.to_string()])
        {
            // A record without a file is dropped by the next sweep.
            warn!(digest = %self.digest, %error, "cannot remove piece ingest record");
        }
    }

    /// A failed write or fsync: out of space removes everything; anything else keeps the last
    /// checkpoint for a later resume. Either way this ingest takes no more writes.
    fn fail(&self, op: &'static str, e: io::Error) -> StoreError {
        let err = self.inner.write_error(&self.digest, op, &self.path, e);
        self.lock().failed = true;
        if err.is_full() {
            self.discard();
        }
        err
    }
}

fn held_prefix_bytes(st: &State) -> u64 {
    let Some(g) = st.geometry else {
        return 0;
    };
    let n = st.held.prefix_len();
    if n >= g.count() {
        g.size()
    } else {
        u64::from(n) * g.piece_len()
    }
}

impl Drop for PieceIngest {
    fn drop(&mut self) {
        self.inner.lock().ingesting.remove(&self.digest);
    }
}
