//! One download into the store: append, hash as bytes arrive, checkpoint for crash resume,
//! verify and commit.
//!
//! Resume protocol: every [`CHECKPOINT_INTERVAL`] bytes (and at [`Ingest::checkpoint`]) the
//! file is fsync'ed and then its length is recorded in the index. After a crash the file may
//! hold an unsynced tail of any content, so a resume truncates to the recorded offset and
//! re-hashes that prefix from disk. The final digest check at commit covers every byte, so a
//! damaged prefix can cost a download but never commit bad content.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use shoal_proto::digest::{Digest, Hasher};
use tracing::{debug, info, warn};

use super::error::StoreError;
use super::{Inner, Stash, fsutil};

/// Bytes written between automatic checkpoints. A crash loses at most this much progress;
/// each checkpoint costs one fsync of the file and one durable index commit.
pub const CHECKPOINT_INTERVAL: u64 = 8 * 1024 * 1024;

/// Buffer for re-hashing a durable prefix on resume.
const REHASH_BUF: usize = 1024 * 1024;

/// An exclusive writer for one digest.
///
/// Dropping it without [`commit`](Ingest::commit) or [`abandon`](Ingest::abandon) keeps the
/// file and its last checkpoint, so a later [`Store::ingest`](super::Store::ingest) resumes;
/// within the same process it resumes at the full written length without re-hashing.
pub struct Ingest {
    inner: Arc<Inner>,
    digest: Digest,
    path: PathBuf,
    /// `None` once a write or sync failed: the file's content past `durable` is then unknown.
    file: Option<File>,
    hasher: Hasher,
    offset: u64,
    /// Offset recorded in the index (0 when there is no record).
    durable: u64,
    /// Offset at the last fsync; drives the automatic checkpoints even when recording in the
    /// index fails.
    synced: u64,
    /// Set by `commit` and `abandon`, which dispose of the file themselves.
    finished: bool,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("digest", &self.digest)
            .field("offset", &self.offset)
            .field("durable", &self.durable)
            .finish_non_exhaustive()
    }
}

impl Ingest {
    /// Claims `d` and opens its ingest file, resuming when possible.
    pub(super) fn start(inner: Arc<Inner>, d: &Digest) -> Result<Ingest, StoreError> {
        let stash = {
            let mut st = inner.lock();
            if !st.ingesting.insert(d.clone()) {
                return Err(StoreError::Busy(d.clone()));
            }
            st.stash.remove(d)
        };
        // One partial copy per digest: a piece download of it is given up.
        inner.remove_piece_ingest(d);
        // From here on, dropping `ingest` releases the claim, including on the error paths.
        let mut ingest = Ingest {
            path: inner.ingest_path(d),
            inner,
            digest: d.clone(),
            file: None,
            hasher: d.hasher(),
            offset: 0,
            durable: 0,
            synced: 0,
            finished: false,
        };
        ingest.open(stash)?;
        Ok(ingest)
    }

    fn open(&mut self, stash: Option<Stash>) -> Result<(), StoreError> {
        let path = self.path.clone();
        let path = path.as_path();
        let mut file = fsutil::open_ingest_file(path)
            .map_err(|e| StoreError::io("open ingest file", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| StoreError::io("stat ingest file", path, e))?
            .len();
        let record = match self.inner.index.ingest_record(&self.digest) {
            Ok(r) => r,
            Err(error) => {
                // The index is a cache: without it the download starts over rather than
                // failing.
                warn!(digest = %self.digest, %error, "cannot read ingest checkpoint; starting over");
                None
            }
        };
        self.durable = record.unwrap_or(0);

        if let Some(stash) = stash.filter(|s| s.offset == len) {
            // Same process, file untouched since the last writer dropped: its bytes are in
            // the page cache exactly as hashed.
            self.hasher = stash.hasher;
            self.offset = len;
            self.durable = self.durable.min(len);
            debug!(digest = %self.digest, offset = len, "resuming ingest from memory");
        } else if let Some(r) = record.filter(|&r| r > 0 && r <= len) {
            file.set_len(r)
                .map_err(|e| StoreError::io("truncate ingest file", path, e))?;
            file.seek(SeekFrom::Start(0))
                .map_err(|e| StoreError::io("seek ingest file", path, e))?;
            let mut hasher = self.digest.hasher();
            let hashed = rehash(&mut file, r, &mut hasher)
                .map_err(|e| StoreError::io("re-hash ingest file", path, e))?;
            if hashed == r {
                self.hasher = hasher;
                self.offset = r;
                info!(digest = %self.digest, offset = r, discarded = len - r, "resuming ingest from checkpoint");
            } else {
                // Shorter than recorded despite set_len: something else is writing it.
                warn!(digest = %self.digest, path = %path.display(), "ingest file shrank while re-hashing; starting over");
                self.start_over(&mut file)?;
            }
        } else {
            if len > 0 || record.is_some() {
                debug!(digest = %self.digest, len, ?record, "ingest file not resumable; starting over");
            }
            self.start_over(&mut file)?;
        }
        file.seek(SeekFrom::Start(self.offset))
            .map_err(|e| StoreError::io("seek ingest file", path, e))?;
        // Only the recorded prefix is known to be on disk; bytes past it (resumed from memory)
        // are synced by the next checkpoint.
        self.synced = self.durable;
        self.file = Some(file);
        Ok(())
    }

    /// Empties the file and forgets its checkpoint.
    fn start_over(&mut self, file: &mut File) -> Result<(), StoreError> {
        file.set_len(0)
            .map_err(|e| StoreError::io("truncate ingest file", &self.path, e))?;
        self.hasher = self.digest.hasher();
        self.offset = 0;
        self.synced = 0;
        if self.durable > 0 {
            self.inner
                .index
                .remove_ingest_keys(&[self.digest.to_string()])?;
            self.durable = 0;
        }
        Ok(())
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Bytes written so far: where the next [`write`](Ingest::write) appends, and the
    /// offset to request from the source on resume.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The ingest file. Readers may open it to stream bytes as they arrive. The name
    /// disappears at commit (renamed into `blobs/`) or abandon, but an already open
    /// descriptor keeps reading the same inode; [`reset`](Ingest::reset) truncates it under
    /// such readers.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file(&mut self) -> Result<&mut File, StoreError> {
        self.file
            .as_mut()
            .ok_or_else(|| StoreError::IngestFailed(self.digest.clone()))
    }

    /// Appends `buf`, updates the hash, and checkpoints every [`CHECKPOINT_INTERVAL`] bytes.
    pub fn write(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        let file = self.file()?;
        if let Err(e) = file.write_all(buf) {
            return Err(self.fail("write ingest file", e));
        }
        self.hasher.update(buf);
        self.offset += buf.len() as u64;
        if self.offset - self.synced >= CHECKPOINT_INTERVAL {
            match self.checkpoint() {
                // Only the resume point is lost; the download itself can still complete.
                Err(error @ StoreError::Index { .. }) => {
                    warn!(digest = %self.digest, offset = self.offset, %error, "cannot record ingest checkpoint");
                }
                other => other?,
            }
        }
        Ok(())
    }

    /// Truncates to zero and starts a fresh hash, for a source that ignored a Range request.
    pub fn reset(&mut self) -> Result<(), StoreError> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| StoreError::IngestFailed(self.digest.clone()))?;
        let result = self.start_over(&mut file).and_then(|()| {
            file.seek(SeekFrom::Start(0))
                .map(|_| ())
                .map_err(|e| StoreError::io("seek ingest file", &self.path, e))
        });
        if result.is_ok() {
            self.file = Some(file);
        }
        result
    }

    /// Makes everything written so far durable and records it as the resume point.
    pub fn checkpoint(&mut self) -> Result<(), StoreError> {
        let needs_sync = self.offset != self.synced;
        let file = self.file()?;
        if needs_sync {
            if let Err(e) = file.sync_data() {
                return Err(self.fail("fsync ingest file", e));
            }
            self.synced = self.offset;
        }
        if self.offset == self.durable {
            return Ok(());
        }
        if self.durable == 0 {
            // The first record makes the file worth finding after a power loss, so its
            // directory entry must be durable too. (A kill -9 alone loses neither.)
            let dir = self.inner.ingest_dir();
            fsutil::fsync_dir(&dir)
                .map_err(|e| StoreError::io("fsync ingest directory", &dir, e))?;
        }
        // Recorded only after the fsync, so the record never claims bytes a crash could lose.
        self.inner.index.set_ingest(&self.digest, self.offset)?;
        self.durable = self.offset;
        debug!(digest = %self.digest, offset = self.offset, "ingest checkpoint");
        Ok(())
    }

    /// Verifies size and digest and moves the file into `blobs/`. On a mismatch the file and
    /// its checkpoint are deleted, so the next attempt starts clean.
    pub fn commit(
        mut self,
        expected_size: Option<u64>,
        media_type: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| StoreError::IngestFailed(self.digest.clone()))?;
        if let Some(expected) = expected_size
            && expected != self.offset
        {
            drop(file);
            self.discard();
            return Err(StoreError::SizeMismatch {
                digest: self.digest.clone(),
                expected,
                actual: self.offset,
            });
        }
        let hasher = std::mem::replace(&mut self.hasher, self.digest.hasher());
        let actual = hasher.finish();
        if actual != self.digest {
            drop(file);
            self.discard();
            warn!(expected = %self.digest, %actual, size = self.offset, "ingest failed verification; discarded");
            return Err(StoreError::DigestMismatch {
                expected: self.digest.clone(),
                actual,
            });
        }
        if let Err(e) = file.flush().and_then(|()| file.sync_all()) {
            drop(file);
            let err = self
                .inner
                .write_error(&self.digest, "fsync ingest file", &self.path, e);
            // After a failed fsync the page cache may have dropped the data, so this file can
            // no longer be trusted, not even as a resume point.
            self.discard();
            return Err(err);
        }
        drop(file);
        self.finished = true;
        self.inner
            .install(&self.digest, &self.path, self.offset, media_type, true)
    }

    /// Deletes the file and its checkpoint: the data is bad or the download is given up.
    pub fn abandon(mut self) {
        self.file = None;
        self.discard();
    }

    /// Removes file, record and stash; marks the ingest finished.
    fn discard(&mut self) {
        self.finished = true;
        if let Err(error) = fsutil::remove_if_exists(&self.path) {
            warn!(digest = %self.digest, path = %self.path.display(), %error, "cannot remove ingest file");
        }
        self.inner.lock().stash.remove(&self.digest);
        if self.durable == 0 {
            // No record was written (or it could not be read, and the sweep drops it).
            return;
        }
        if let Err(error) = self
            .inner
            .index
            .remove_ingest_keys(&[self.digest.to_string()])
        {
            // A record without a file is dropped by the next sweep.
            warn!(digest = %self.digest, %error, "cannot remove ingest record");
        }
    }

    /// Handles a failed write or fsync: out of space removes everything (nothing partial may
    /// remain); anything else keeps the last checkpoint for a later resume. Either way this
    /// ingest can no longer be used.
    pub(super) fn fail(&mut self, op: &'static str, e: io::Error) -> StoreError {
        self.file = None;
        let err = self.inner.write_error(&self.digest, op, &self.path, e);
        if err.is_full() {
            self.discard();
        }
        err
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        if !self.finished && self.file.is_some() {
            st.stash.insert(
                self.digest.clone(),
                Stash {
                    offset: self.offset,
                    hasher: self.hasher.clone(),
                },
            );
        }
        st.ingesting.remove(&self.digest);
    }
}

/// Feeds up to `len` bytes from `file` (positioned at 0) into `hasher`; returns how many were
/// read, which is less than `len` only if the file is shorter.
fn rehash(file: &mut File, len: u64, hasher: &mut Hasher) -> io::Result<u64> {
    let mut buf = vec![0u8; REHASH_BUF];
    let mut limited = Read::by_ref(file).take(len);
    let mut total = 0u64;
    loop {
        let n = match limited.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}
