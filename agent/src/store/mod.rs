//! Content-addressed blob store: files named by digest, a redb index that is never the source of truth.
//!
//! Layout under the root:
//! - `blobs/<alg>/<hex>`: committed blobs. Invariant: a file here always hashes to its name,
//!   because bytes only arrive by a verified, fsync'ed rename from `ingest/`.
//! - `ingest/<alg>-<hex>`: a download in progress, resumable from its last checkpoint.
//!   `ingest/<alg>-<hex>.pieces`: a download written piece by piece (from peers), see
//!   [`PieceIngest`].
//!   `ingest/put-*`: temporary files of [`Store::put`].
//! - `index.redb`: sizes, media types, access times, ingest checkpoints and the mirror's tag
//!   cache. It is reconciled against `blobs/` at every open and rebuilt from it when missing or
//!   corrupt, so losing it costs access order and media types, never content.
//!
//! Methods are synchronous; callers run large IO on blocking threads. Locks are held only for
//! in-memory bookkeeping and single metadata syscalls (rename, unlink), never across a blob's
//! bytes.

mod error;
mod fsutil;
mod index;
mod ingest;
mod pieces;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_pieces;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redb::Durability;
use shoal_proto::digest::{Algorithm, Digest, Hasher};
use tracing::{debug, info, warn};

pub use error::StoreError;
pub use ingest::{CHECKPOINT_INTERVAL, Ingest};
pub use pieces::PieceIngest;

use index::{BlobRecord, Index, Opened, TagRow};

/// Where the store lives and how much of the disk it may use.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub root: PathBuf,
    /// Absolute cap on blob bytes.
    pub max_bytes: Option<u64>,
    /// Cap as a percentage (0..=100) of the size of the filesystem holding `root`.
    pub max_disk_percent: Option<f64>,
    /// Fraction of the cap at which eviction starts.
    pub high_watermark: f64,
    /// Fraction of the cap eviction brings usage down to.
    pub low_watermark: f64,
    /// An interrupted download older than this, with no live writer, is deleted.
    pub ingest_max_age: Duration,
}

impl StoreConfig {
    /// A store at `root` with no cap, watermarks 0.95/0.85 and a 24 h ingest age limit.
    pub fn new(root: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            root: root.into(),
            max_bytes: None,
            max_disk_percent: None,
            high_watermark: 0.95,
            low_watermark: 0.85,
            ingest_max_age: Duration::from_secs(24 * 60 * 60),
        }
    }

    fn validate(&self) -> Result<(), StoreError> {
        let (low, high) = (self.low_watermark, self.high_watermark);
        if !(low.is_finite() && high.is_finite() && 0.0 < low && low <= high && high <= 1.0) {
            return Err(StoreError::Config(format!(
                "watermarks must satisfy 0 < low <= high <= 1, got low {low} high {high}"
            )));
        }
        if let Some(p) = self.max_disk_percent
            && !(p.is_finite() && (0.0..=100.0).contains(&p))
        {
            return Err(StoreError::Config(format!(
                "max_disk_percent must be within 0..=100, got {p}"
            )));
        }
        Ok(())
    }
}

/// Committed blobs and the effective cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub blobs: u64,
    pub bytes: u64,
    /// The effective cap in bytes (the lower of `max_bytes` and `max_disk_percent`).
    pub cap: Option<u64>,
}

/// What one eviction pass removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvictReport {
    pub evicted: u64,
    pub freed: u64,
}

/// A cached tag resolution for the mirror.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagRecord {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub fetched_unix_ms: u64,
}

/// An open committed blob. While it lives the blob is pinned: eviction skips it.
pub struct Blob {
    pub file: fs::File,
    pub size: u64,
    pub media_type: Option<String>,
    pub digest: Digest,
    _pin: Pin,
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blob")
            .field("digest", &self.digest)
            .field("size", &self.size)
            .field("media_type", &self.media_type)
            .finish_non_exhaustive()
    }
}

/// Unpins a digest when dropped.
struct Pin {
    inner: Arc<Inner>,
    digest: Digest,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        if let Some(n) = st.pins.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                st.pins.remove(&self.digest);
            }
        }
    }
}

/// The content store. Cheap to clone; all clones share one index and one set of pins.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.inner.root)
            .field("usage", &self.usage())
            .finish()
    }
}

struct Inner {
    root: PathBuf,
    cfg: StoreConfig,
    cap: Option<u64>,
    index: Index,
    state: Mutex<State>,
    /// Sequence for `put` temp file names.
    tmp_seq: AtomicU64,
    /// Told the digests of every eviction pass that removed something.
    on_evict: std::sync::RwLock<Option<EvictListener>>,
}

/// What [`Store::set_evict_listener`] installs.
pub type EvictListener = Arc<dyn Fn(&[Digest]) + Send + Sync>;

/// In-memory bookkeeping, the authority while the process runs.
#[derive(Default)]
struct State {
    blobs: HashMap<Digest, Entry>,
    bytes: u64,
    /// Logical access clock: unix ms, bumped to stay strictly increasing so that LRU order is
    /// exact even for accesses within one millisecond.
    clock: u64,
    pins: HashMap<Digest, u32>,
    /// Digests with a live `Ingest` (exclusivity, and protection from sweep and eviction).
    ingesting: HashSet<Digest>,
    /// Hasher state of ingests dropped in this process, so a resume needs no re-hash. Valid
    /// only while the file's length equals `offset`.
    stash: HashMap<Digest, Stash>,
    /// `put` temp files being written, which the sweep must leave alone.
    live_tmp: HashSet<PathBuf>,
    /// Digests whose access time changed since the last flush.
    dirty: HashSet<Digest>,
}

struct Entry {
    size: u64,
    last_access: u64,
    media_type: Option<String>,
}

struct Stash {
    offset: u64,
    hasher: Hasher,
}

impl State {
    fn tick(&mut self) -> u64 {
        self.clock = fsutil::now_ms().max(self.clock.saturating_add(1));
        self.clock
    }

    fn record(&self, d: &Digest) -> Option<BlobRecord> {
        self.blobs.get(d).map(|e| BlobRecord {
            size: e.size,
            last_access: e.last_access,
            media_type: e.media_type.clone(),
        })
    }
}

impl Store {
    /// Opens the store at `cfg.root`: creates its directories, opens the index (rebuilding it
    /// from `blobs/` when missing or corrupt), reconciles it with `blobs/`, removes stale ingest
    /// files and evicts down to the cap.
    pub fn open(cfg: StoreConfig) -> Result<Store, StoreError> {
        cfg.validate()?;
        let root = cfg.root.clone();
        for alg in fsutil::ALGORITHMS {
            let dir = root.join("blobs").join(alg.as_str());
            fsutil::create_dir(&dir).map_err(|e| StoreError::io("create directory", &dir, e))?;
        }
        let ingest_dir = root.join("ingest");
        fsutil::create_dir(&ingest_dir)
            .map_err(|e| StoreError::io("create directory", &ingest_dir, e))?;
        let cap = effective_cap(&cfg)?;

        let index_path = root.join("index.redb");
        let (index, opened, loaded) = Index::open(&index_path)?;
        let inner = Inner {
            root,
            cfg,
            cap,
            index,
            state: Mutex::new(State::default()),
            tmp_seq: AtomicU64::new(0),
            on_evict: std::sync::RwLock::new(None),
        };
        inner.reconcile(loaded.blobs, &opened)?;
        let store = Store {
            inner: Arc::new(inner),
        };
        store.sweep_ingest()?;
        store.evict_if_needed()?;
        let usage = store.usage();
        info!(
            root = %store.inner.root.display(),
            blobs = usage.blobs,
            bytes = usage.bytes,
            cap = ?usage.cap,
            "content store opened"
        );
        Ok(store)
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.inner.lock().blobs.contains_key(d)
    }

    /// Opens a committed blob and pins it against eviction until the [`Blob`] is dropped.
    /// Marks the access in memory only; [`Store::flush`] persists access times.
    pub fn open_blob(&self, d: &Digest) -> Result<Option<Blob>, StoreError> {
        let (size, media_type) = {
            let mut st = self.inner.lock();
            let now = st.tick();
            let Some(entry) = st.blobs.get_mut(d) else {
                return Ok(None);
            };
            entry.last_access = now;
            let found = (entry.size, entry.media_type.clone());
            st.dirty.insert(d.clone());
            *st.pins.entry(d.clone()).or_insert(0) += 1;
            found
        };
        let pin = Pin {
            inner: self.inner.clone(),
            digest: d.clone(),
        };
        let path = self.inner.blob_path(d);
        let file = match fsutil::open_no_follow(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                warn!(digest = %d, path = %path.display(), "blob file vanished from the store; forgetting it");
                drop(pin);
                self.inner.forget(d, false);
                return Ok(None);
            }
            Err(e) => return Err(StoreError::io("open blob", path, e)),
        };
        let len = file
            .metadata()
            .map_err(|e| StoreError::io("stat blob", &path, e))?
            .len();
        if len != size {
            // Something outside the store changed the file; it can no longer be trusted to
            // hash to its name. Dropping it makes the next request refetch.
            warn!(digest = %d, path = %path.display(), expected = size, actual = len, "blob file changed size; removing it");
            drop(pin);
            self.inner.forget(d, true);
            return Ok(None);
        }
        Ok(Some(Blob {
            file,
            size,
            media_type,
            digest: d.clone(),
            _pin: pin,
        }))
    }

    /// Starts or resumes writing `d`. Only one `Ingest` per digest may be alive in the process;
    /// a second call gets [`StoreError::Busy`]. Resuming after a crash re-hashes the durable
    /// prefix from disk, so run this on a blocking thread.
    pub fn ingest(&self, d: &Digest) -> Result<Ingest, StoreError> {
        Ingest::start(self.inner.clone(), d)
    }

    /// Starts or resumes writing `d` piece by piece (see [`PieceIngest`]). Exclusive with
    /// [`Store::ingest`] for the same digest.
    pub fn piece_ingest(&self, d: &Digest) -> Result<PieceIngest, StoreError> {
        PieceIngest::start(self.inner.clone(), d)
    }

    /// Up to `limit` committed digests, most recently used first (what to announce).
    pub fn digests(&self, limit: usize) -> Vec<Digest> {
        let st = self.inner.lock();
        let mut all: Vec<(u64, &Digest)> =
            st.blobs.iter().map(|(d, e)| (e.last_access, d)).collect();
        all.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        all.into_iter()
            .take(limit)
            .map(|(_, d)| d.clone())
            .collect()
    }

    /// The size of a committed blob.
    pub fn blob_size(&self, d: &Digest) -> Option<u64> {
        self.inner.lock().blobs.get(d).map(|e| e.size)
    }

    /// Stores a small blob (a manifest, a config) in one call: verify, write, fsync, rename.
    pub fn put(
        &self,
        d: &Digest,
        bytes: &[u8],
        media_type: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut hasher = d.hasher();
        hasher.update(bytes);
        let actual = hasher.finish();
        if actual != *d {
            return Err(StoreError::DigestMismatch {
                expected: d.clone(),
                actual,
            });
        }
        if self.contains(d) {
            if let Some(mt) = media_type {
                self.inner.fill_media_type(d, mt)?;
            }
            return Ok(());
        }
        let tmp = self.inner.new_tmp(d, bytes)?;
        let result = self
            .inner
            .install(d, &tmp, bytes.len() as u64, media_type, false);
        self.inner.lock().live_tmp.remove(&tmp);
        result
    }

    pub fn media_type(&self, d: &Digest) -> Option<String> {
        self.inner.lock().blobs.get(d)?.media_type.clone()
    }

    /// Sets the media type of a committed blob; [`StoreError::NotFound`] if it is absent.
    pub fn set_media_type(&self, d: &Digest, mt: &str) -> Result<(), StoreError> {
        let record = {
            let mut st = self.inner.lock();
            let entry = st
                .blobs
                .get_mut(d)
                .ok_or_else(|| StoreError::NotFound(d.clone()))?;
            if entry.media_type.as_deref() == Some(mt) {
                return Ok(());
            }
            entry.media_type = Some(mt.to_owned());
            st.record(d)
        };
        if let Some(r) = record {
            self.inner
                .index
                .put_blobs(&[(d.clone(), r)], false, Durability::Immediate)?;
        }
        Ok(())
    }

    pub fn usage(&self) -> Usage {
        let st = self.inner.lock();
        Usage {
            blobs: st.blobs.len() as u64,
            bytes: st.bytes,
            cap: self.inner.cap,
        }
    }

    /// When usage is above the high watermark, removes least recently used blobs until it is
    /// at or below the low watermark. Pinned blobs and digests being ingested are skipped.
    pub fn evict_if_needed(&self) -> Result<EvictReport, StoreError> {
        self.inner.evict_if_needed()
    }

    /// Calls `f` with the digests each eviction pass removed, after they are gone (the peer
    /// data plane withdraws them from the tracker). Replaces any earlier listener. `f` runs on
    /// the evicting thread, outside the store's locks, and must be quick.
    pub fn set_evict_listener(&self, f: EvictListener) {
        *self
            .inner
            .on_evict
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(f);
    }

    /// Removes ingest files that no live writer holds and that are either older than
    /// `ingest_max_age` or not resumable, plus `put` temp files left by a crash and ingest
    /// records without a file. Returns how many files were removed.
    pub fn sweep_ingest(&self) -> Result<usize, StoreError> {
        self.inner.sweep_ingest()
    }

    /// Persists access times (one durable index commit for all blobs touched since the last
    /// flush). Call it periodically and at shutdown; dropping the last clone also flushes.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }

    /// The periodic housekeeping in one call: flush access times, sweep stale ingest files,
    /// evict over the cap. Every step runs even if an earlier one fails; the first error is
    /// returned.
    pub fn maintain(&self) -> Result<(), StoreError> {
        let flushed = self.flush();
        let swept = self.sweep_ingest().map(drop);
        let evicted = self.evict_if_needed().map(drop);
        flushed.and(swept).and(evicted)
    }

    /// A cached tag resolution. Entries whose digest no longer parses are treated as absent.
    pub fn tag_get(
        &self,
        upstream: &str,
        repo: &str,
        tag: &str,
    ) -> Result<Option<TagRecord>, StoreError> {
        let Some(row) = self.inner.index.tag_get(upstream, repo, tag)? else {
            return Ok(None);
        };
        match Digest::parse(&row.digest) {
            Ok(digest) => Ok(Some(TagRecord {
                digest,
                media_type: row.media_type,
                size: row.size,
                fetched_unix_ms: row.fetched_unix_ms,
            })),
            Err(error) => {
                warn!(upstream, repo, tag, %error, "ignoring tag cache entry with a bad digest");
                Ok(None)
            }
        }
    }

    pub fn tag_put(
        &self,
        upstream: &str,
        repo: &str,
        tag: &str,
        rec: &TagRecord,
    ) -> Result<(), StoreError> {
        let row = TagRow {
            digest: rec.digest.to_string(),
            media_type: rec.media_type.clone(),
            size: rec.size,
            fetched_unix_ms: rec.fetched_unix_ms,
        };
        self.inner.index.tag_put(upstream, repo, tag, &row)
    }
}

/// The lower of the absolute cap and the percentage of the filesystem.
fn effective_cap(cfg: &StoreConfig) -> Result<Option<u64>, StoreError> {
    let by_percent = match cfg.max_disk_percent {
        None => None,
        Some(p) => {
            let vfs = rustix::fs::statvfs(&cfg.root)
                .map_err(|e| StoreError::io("statvfs", &cfg.root, e.into()))?;
            let fs_bytes = vfs.f_blocks.saturating_mul(vfs.f_frsize);
            Some(fraction(fs_bytes, p / 100.0))
        }
    };
    Ok(match (cfg.max_bytes, by_percent) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

fn fraction(bytes: u64, f: f64) -> u64 {
    // Precision loss above 2^53 bytes (8 PiB) is irrelevant for a cap.
    (bytes as f64 * f) as u64
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the bookkeeping as consistent as the last
        // completed update (each update is a few field writes), so keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn blob_dir(&self, alg: Algorithm) -> PathBuf {
        self.root.join("blobs").join(alg.as_str())
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.blob_dir(d.algorithm()).join(d.hex())
    }

    fn ingest_dir(&self) -> PathBuf {
        self.root.join("ingest")
    }

    fn ingest_path(&self, d: &Digest) -> PathBuf {
        self.ingest_dir().join(fsutil::ingest_name(d))
    }

    fn piece_ingest_path(&self, d: &Digest) -> PathBuf {
        self.ingest_dir().join(fsutil::piece_ingest_name(d))
    }

    /// Removes the append-mode ingest file of `d` and its record, when a piece ingest of the
    /// same digest starts (the caller holds the digest's claim): one partial copy per digest.
    fn remove_append_ingest(&self, d: &Digest) {
        let path = self.ingest_path(d);
        if !path.exists() {
            return;
        }
        debug!(digest = %d, "dropping an append-mode partial download for a piece download");
        if let Err(error) = fsutil::remove_if_exists(&path) {
            warn!(digest = %d, path = %path.display(), %error, "cannot remove ingest file");
        }
        self.lock().stash.remove(d);
        if let Err(error) = self.index.remove_ingest_keys(&[d.to_string()]) {
            warn!(digest = %d, %error, "cannot remove ingest record");
        }
    }

    /// Removes the piece ingest file of `d` and its record, when an append-mode ingest of the
    /// same digest starts (the caller holds the digest's claim).
    fn remove_piece_ingest(&self, d: &Digest) {
        let path = self.piece_ingest_path(d);
        if !path.exists() {
            return;
        }
        debug!(digest = %d, "dropping a piece-mode partial download for an append download");
        if let Err(error) = fsutil::remove_if_exists(&path) {
            warn!(digest = %d, path = %path.display(), %error, "cannot remove piece ingest file");
        }
        if let Err(error) = self.index.remove_piece_keys(&[d.to_string()]) {
            warn!(digest = %d, %error, "cannot remove piece ingest record");
        }
    }

    /// Brings the in-memory state and the index in line with the files in `blobs/`.
    fn reconcile(
        &self,
        mut indexed: HashMap<Digest, BlobRecord>,
        opened: &Opened,
    ) -> Result<(), StoreError> {
        let mut blobs = HashMap::new();
        let (mut added, mut removed, mut unknown) = (0u64, 0u64, 0u64);
        let top = self.root.join("blobs");
        let entries = fs::read_dir(&top).map_err(|e| StoreError::io("list blobs", &top, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("list blobs", &top, e))?;
            let name = entry.file_name();
            if !fsutil::ALGORITHMS.iter().any(|a| name == a.as_str()) {
                warn!(path = %entry.path().display(), "ignoring unknown entry in the blob directory");
                unknown += 1;
            }
        }
        for alg in fsutil::ALGORITHMS {
            let dir = self.blob_dir(alg);
            let empty = fsutil::empty_digest(alg);
            let entries = fs::read_dir(&dir).map_err(|e| StoreError::io("list blobs", &dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| StoreError::io("list blobs", &dir, e))?;
                let path = entry.path();
                let meta = entry
                    .metadata()
                    .map_err(|e| StoreError::io("stat blob", &path, e))?;
                let digest = fsutil::parse_blob_name(alg, &entry.file_name());
                let Some(digest) = digest.filter(|_| meta.is_file()) else {
                    // Never indexed, never served, never deleted: it is not ours.
                    warn!(path = %path.display(), "ignoring unknown entry in the blob directory");
                    unknown += 1;
                    continue;
                };
                let size = meta.len();
                let entry = match indexed.remove(&digest) {
                    Some(rec) if rec.size == size => Entry {
                        size,
                        last_access: rec.last_access,
                        media_type: rec.media_type,
                    },
                    Some(rec) => {
                        warn!(digest = %digest, path = %path.display(), indexed = rec.size, actual = size,
                            "blob file size differs from the index; removing it");
                        self.remove_bad_blob(&path)?;
                        removed += 1;
                        continue;
                    }
                    None if size == 0 && digest != empty => {
                        // Commits are fsync'ed before the rename, so this is filesystem damage.
                        warn!(digest = %digest, path = %path.display(), "removing empty file named as a non-empty blob");
                        self.remove_bad_blob(&path)?;
                        removed += 1;
                        continue;
                    }
                    None => {
                        added += 1;
                        Entry {
                            size,
                            // File mtime approximates the commit time: a fair LRU guess.
                            last_access: meta.modified().map(fsutil::system_time_ms).unwrap_or(0),
                            media_type: None,
                        }
                    }
                };
                blobs.insert(digest, entry);
            }
        }
        let stale = indexed.len() as u64;
        let bytes: u64 = blobs.values().map(|e| e.size).sum();
        let clock = blobs.values().map(|e| e.last_access).max().unwrap_or(0);
        let records: HashMap<Digest, BlobRecord> = blobs
            .iter()
            .map(|(d, e)| {
                (
                    d.clone(),
                    BlobRecord {
                        size: e.size,
                        last_access: e.last_access,
                        media_type: e.media_type.clone(),
                    },
                )
            })
            .collect();
        let count = blobs.len();
        {
            let mut st = self.lock();
            st.blobs = blobs;
            st.bytes = bytes;
            st.clock = clock;
        }
        if added > 0 || removed > 0 || stale > 0 || !matches!(opened, Opened::Existing) {
            self.index.replace_blobs(&records)?;
        }
        match opened {
            Opened::Existing => {
                if added > 0 || removed > 0 || stale > 0 {
                    info!(
                        added,
                        removed, stale, "index reconciled with blob directory"
                    );
                }
            }
            Opened::Created if count == 0 => debug!("created a new index"),
            Opened::Created => {
                info!(
                    blobs = count,
                    bytes, "index not found; rebuilt from blob directory"
                );
            }
            Opened::Recreated { moved_to, reason } => {
                warn!(moved_to = %moved_to.display(), %reason, blobs = count, bytes,
                    "index was unreadable; moved it aside and rebuilt from blob directory");
            }
        }
        if unknown > 0 {
            warn!(
                unknown,
                "blob directory holds entries that are not blobs; they are ignored"
            );
        }
        Ok(())
    }

    fn remove_bad_blob(&self, path: &Path) -> Result<(), StoreError> {
        fsutil::remove_if_exists(path).map_err(|e| StoreError::io("remove bad blob", path, e))
    }

    /// Drops a blob from memory and the index after its file vanished or changed; removes
    /// the file too when `unlink` and nobody else has it open.
    fn forget(&self, d: &Digest, unlink: bool) {
        {
            let mut st = self.lock();
            if unlink && st.pins.contains_key(d) {
                // Other readers hold it; they will find the same mismatch and retry.
                return;
            }
            if let Some(e) = st.blobs.remove(d) {
                st.bytes -= e.size;
            }
            st.dirty.remove(d);
            if unlink {
                let path = self.blob_path(d);
                if let Err(error) = fsutil::remove_if_exists(&path) {
                    warn!(digest = %d, path = %path.display(), %error, "cannot remove bad blob");
                }
            }
        }
        if let Err(error) = self.index.remove_blobs(std::slice::from_ref(d)) {
            warn!(digest = %d, %error, "cannot remove blob from index");
        }
    }

    /// Sets the media type of a present blob if it has none yet.
    fn fill_media_type(&self, d: &Digest, mt: &str) -> Result<(), StoreError> {
        let record = {
            let mut st = self.lock();
            match st.blobs.get_mut(d) {
                Some(e) if e.media_type.is_none() => e.media_type = Some(mt.to_owned()),
                _ => return Ok(()),
            }
            st.record(d)
        };
        if let Some(r) = record {
            self.index
                .put_blobs(&[(d.clone(), r)], false, Durability::Immediate)?;
        }
        Ok(())
    }

    /// Writes `bytes` to a fresh, fsync'ed temp file in `ingest/` and returns its path, which
    /// stays registered in `live_tmp` until the caller removes it.
    fn new_tmp(&self, d: &Digest, bytes: &[u8]) -> Result<PathBuf, StoreError> {
        use std::io::Write;
        let (path, mut file) = loop {
            let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
            let path = self
                .ingest_dir()
                .join(format!("put-{}-{seq}.tmp", std::process::id()));
            // Registered before the file exists, so a concurrent sweep never sees it unowned.
            self.lock().live_tmp.insert(path.clone());
            match fsutil::create_new(&path) {
                Ok(file) => break (path, file),
                Err(e) => {
                    self.lock().live_tmp.remove(&path);
                    if e.kind() != io::ErrorKind::AlreadyExists {
                        return Err(self.write_error(d, "create temp file", &path, e));
                    }
                }
            }
        };
        let written = file.write_all(bytes).and_then(|()| file.sync_all());
        if let Err(e) = written {
            let err = self.write_error(d, "write temp file", &path, e);
            if let Err(error) = fsutil::remove_if_exists(&path) {
                warn!(path = %path.display(), %error, "cannot remove temp file");
            }
            self.lock().live_tmp.remove(&path);
            return Err(err);
        }
        Ok(path)
    }

    /// Maps a write-side IO error, turning ENOSPC/EDQUOT into [`StoreError::Full`].
    fn write_error(&self, d: &Digest, op: &'static str, path: &Path, e: io::Error) -> StoreError {
        if error::is_no_space(&e) {
            warn!(digest = %d, path = %path.display(), "store filesystem is full");
            StoreError::Full {
                digest: d.clone(),
                path: path.to_owned(),
            }
        } else {
            StoreError::io(op, path, e)
        }
    }

    /// Moves a verified, fsync'ed file into `blobs/`, makes the rename durable, indexes the
    /// blob and evicts if over the cap. When the blob is already there another writer won and
    /// `src` is simply removed.
    fn install(
        &self,
        d: &Digest,
        src: &Path,
        size: u64,
        media_type: Option<&str>,
        clear_ingest: bool,
    ) -> Result<(), StoreError> {
        let dest = self.blob_path(d);
        let renamed = {
            let mut st = self.lock();
            // The rename happens under the lock so eviction (which unlinks under the same
            // lock) never races with it on the same name.
            let exists = match fs::symlink_metadata(&dest) {
                Ok(_) => true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(StoreError::io("stat blob", &dest, e)),
            };
            if exists {
                if let Err(error) = fsutil::remove_if_exists(src) {
                    warn!(path = %src.display(), %error, "cannot remove redundant file");
                }
            } else if let Err(e) = fs::rename(src, &dest) {
                drop(st);
                let err = self.write_error(d, "rename into blobs", &dest, e);
                if let Err(error) = fsutil::remove_if_exists(src) {
                    warn!(path = %src.display(), %error, "cannot remove file after failed rename");
                }
                return Err(err);
            }
            let now = st.tick();
            let mut added = false;
            let entry = st.blobs.entry(d.clone()).or_insert_with(|| {
                added = true;
                Entry {
                    size,
                    last_access: now,
                    media_type: None,
                }
            });
            entry.last_access = now;
            if entry.media_type.is_none() {
                entry.media_type = media_type.map(str::to_owned);
            }
            if added {
                st.bytes += size;
            }
            st.dirty.remove(d);
            !exists
        };
        if renamed {
            let dir = self.blob_dir(d.algorithm());
            if let Err(error) = fsutil::fsync_dir(&dir) {
                // The blob is in place and verified; a crash may lose the rename, which only
                // loses the blob (its bytes reappear under ingest/), never corrupts it.
                warn!(digest = %d, dir = %dir.display(), %error, "cannot fsync blob directory");
            }
            debug!(digest = %d, size, "blob committed");
        } else {
            debug!(digest = %d, "blob already present; dropped the duplicate");
        }
        let record = self.lock().record(d);
        if let Some(r) = record
            && let Err(error) =
                self.index
                    .put_blobs(&[(d.clone(), r)], clear_ingest, Durability::Immediate)
        {
            // The blob is durable in blobs/, which is the truth; the next open re-indexes it.
            warn!(digest = %d, %error, "blob committed but not indexed");
        }
        if let Err(error) = self.evict_if_needed() {
            warn!(%error, "eviction after commit failed");
        }
        Ok(())
    }

    fn evict_if_needed(&self) -> Result<EvictReport, StoreError> {
        let Some(cap) = self.cap else {
            return Ok(EvictReport::default());
        };
        let high = fraction(cap, self.cfg.high_watermark);
        let low = fraction(cap, self.cfg.low_watermark);
        let (mut candidates, mut remaining): (Vec<(u64, Digest)>, u64) = {
            let st = self.lock();
            if st.bytes <= high {
                return Ok(EvictReport::default());
            }
            let candidates = st
                .blobs
                .iter()
                .filter(|(d, _)| !st.pins.contains_key(*d) && !st.ingesting.contains(*d))
                .map(|(d, e)| (e.last_access, d.clone()))
                .collect();
            (candidates, st.bytes)
        };
        candidates.sort_unstable();
        let mut report = EvictReport::default();
        let mut evicted = Vec::new();
        for (access, d) in candidates {
            let mut st = self.lock();
            remaining = st.bytes;
            if st.bytes <= low {
                break;
            }
            // Re-check under the lock: it may have been opened, pinned or removed meanwhile.
            let Some(entry) = st.blobs.get(&d) else {
                continue;
            };
            if entry.last_access != access || st.pins.contains_key(&d) || st.ingesting.contains(&d)
            {
                continue;
            }
            let size = entry.size;
            let path = self.blob_path(&d);
            if let Err(error) = fsutil::remove_if_exists(&path) {
                warn!(digest = %d, path = %path.display(), %error, "cannot evict blob");
                continue;
            }
            st.blobs.remove(&d);
            st.dirty.remove(&d);
            st.bytes -= size;
            remaining = st.bytes;
            drop(st);
            debug!(digest = %d, size, "evicted blob");
            report.evicted += 1;
            report.freed += size;
            evicted.push(d);
        }
        if let Err(error) = self.index.remove_blobs(&evicted) {
            // Files are gone; the next open drops the stale records.
            warn!(%error, "evicted blobs but could not update the index");
        }
        if !evicted.is_empty() {
            let listener = self
                .on_evict
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let Some(f) = listener {
                f(&evicted);
            }
        }
        if report.evicted > 0 {
            info!(
                evicted = report.evicted,
                freed = report.freed,
                bytes = remaining,
                cap,
                "evicted least recently used blobs"
            );
        }
        if remaining > low {
            warn!(
                bytes = remaining,
                low_watermark = low,
                "store still above its low watermark: the remaining blobs are in use"
            );
        }
        Ok(report)
    }

    fn sweep_ingest(&self) -> Result<usize, StoreError> {
        let records = self.index.ingest_records()?;
        let piece_records: HashSet<String> = self.index.piece_keys()?.into_iter().collect();
        let mut dead_pieces = Vec::new();
        let mut seen_pieces = HashSet::new();
        let dir = self.ingest_dir();
        let max_age = self.cfg.ingest_max_age;
        let now = std::time::SystemTime::now();
        let mut removed = 0;
        let mut dead_records = Vec::new();
        let mut seen = HashSet::new();
        let entries = fs::read_dir(&dir).map_err(|e| StoreError::io("list ingest", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("list ingest", &dir, e))?;
            let path = entry.path();
            let meta = match entry.metadata() {
                Ok(m) => m,
                // Raced with a commit or abandon that removed it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io("stat ingest file", &path, e)),
            };
            if meta.is_dir() {
                warn!(path = %path.display(), "ignoring directory in the ingest directory");
                continue;
            }
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            if let Some(d) = fsutil::parse_piece_ingest_name(&entry.file_name()) {
                let key = d.to_string();
                seen_pieces.insert(key.clone());
                let st = self.lock();
                let reason = if st.ingesting.contains(&d) {
                    continue;
                } else if age > max_age {
                    "expired"
                } else if piece_records.contains(&key) {
                    continue;
                } else {
                    "not resumable"
                };
                match fsutil::remove_if_exists(&path) {
                    Ok(()) => {
                        removed += 1;
                        debug!(path = %path.display(), reason, "removed stale piece ingest file");
                        if piece_records.contains(&key) {
                            dead_pieces.push(key);
                        }
                    }
                    Err(error) => {
                        warn!(path = %path.display(), %error, "cannot remove stale piece ingest file")
                    }
                }
                continue;
            }
            let digest = fsutil::parse_ingest_name(&entry.file_name());
            let key = digest.as_ref().map(Digest::to_string);
            let mut st = self.lock();
            let reason = match &digest {
                None if st.live_tmp.contains(&path) => continue,
                None => "stray or temp file",
                Some(d) => {
                    seen.insert(d.to_string());
                    let record = key.as_ref().and_then(|k| records.get(k)).copied();
                    if st.ingesting.contains(d) {
                        continue;
                    } else if age > max_age {
                        "expired"
                    } else if st.stash.get(d).is_some_and(|s| s.offset == meta.len())
                        || record.is_some_and(|r| r > 0 && r <= meta.len())
                    {
                        continue;
                    } else {
                        "not resumable"
                    }
                }
            };
            match fsutil::remove_if_exists(&path) {
                Ok(()) => {
                    removed += 1;
                    debug!(path = %path.display(), reason, "removed stale ingest file");
                    if let Some(d) = &digest {
                        st.stash.remove(d);
                    }
                    if let Some(k) = key.filter(|k| records.contains_key(k)) {
                        dead_records.push(k);
                    }
                }
                Err(error) => {
                    warn!(path = %path.display(), %error, "cannot remove stale ingest file")
                }
            }
        }
        {
            let st = self.lock();
            for k in records.keys() {
                if seen.contains(k) {
                    continue;
                }
                let live = Digest::parse(k).is_ok_and(|d| st.ingesting.contains(&d));
                if !live {
                    dead_records.push(k.clone());
                }
            }
        }
        {
            let st = self.lock();
            for k in &piece_records {
                let live = Digest::parse(k).is_ok_and(|d| st.ingesting.contains(&d));
                if !seen_pieces.contains(k) && !live {
                    dead_pieces.push(k.clone());
                }
            }
        }
        self.index.remove_ingest_keys(&dead_records)?;
        self.index.remove_piece_keys(&dead_pieces)?;
        if removed > 0 {
            info!(removed, "removed stale ingest files");
        }
        Ok(removed)
    }

    fn flush(&self) -> Result<(), StoreError> {
        let (dirty, batch): (HashSet<Digest>, Vec<(Digest, BlobRecord)>) = {
            let mut st = self.lock();
            let dirty = std::mem::take(&mut st.dirty);
            let batch = dirty
                .iter()
                .filter_map(|d| st.record(d).map(|r| (d.clone(), r)))
                .collect();
            (dirty, batch)
        };
        if batch.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.index.put_blobs(&batch, false, Durability::Immediate) {
            // Keep them dirty so the next flush retries.
            self.lock().dirty.extend(dirty);
            return Err(e);
        }
        debug!(blobs = batch.len(), "flushed access times");
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(error) = self.flush() {
            warn!(%error, "cannot persist access times at close");
        }
    }
}
