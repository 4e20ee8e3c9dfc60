//! The redb index: a rebuildable cache of blob sizes, media types, access times, ingest
//! checkpoints and mirror tags. `blobs/` is the truth; nothing here is trusted over it.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use redb::{
    Builder, Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, StorageError,
    TableDefinition, WriteTransaction,
};
use shoal_proto::digest::Digest;

use super::error::StoreError;
use super::fsutil;

/// Digest string -> (size, last access in unix ms, media type).
const BLOBS: TableDefinition<&str, (u64, u64, Option<&str>)> = TableDefinition::new("blobs");
/// Digest string -> (durable offset, unix ms of the checkpoint).
const INGEST: TableDefinition<&str, (u64, u64)> = TableDefinition::new("ingest");
/// Digest string -> (blob size, piece length, bitmap of the pieces fsync'ed, unix ms of the
/// checkpoint): the resume point of a piece ingest.
const PIECES: TableDefinition<&str, (u64, u64, &[u8], u64)> = TableDefinition::new("pieces");
/// (upstream, repository, tag).
type TagKey<'a> = (&'a str, &'a str, &'a str);
/// (digest string, media type, size, fetched unix ms).
type TagValue<'a> = (&'a str, &'a str, u64, u64);
const TAGS: TableDefinition<TagKey, TagValue> = TableDefinition::new("tags");
/// Schema bookkeeping; a file with another version is rebuilt rather than migrated, since
/// everything in it can be recomputed or refetched.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SCHEMA_KEY: &str = "schema";
const SCHEMA_VERSION: u64 = 1;

/// redb's default page cache is 1 GiB; the index holds a few hundred bytes per blob.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// What the index knows about a committed blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct BlobRecord {
    pub size: u64,
    pub last_access: u64,
    pub media_type: Option<String>,
}

/// The resume point of a piece ingest: its geometry and the pieces known to be on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PieceRecord {
    pub size: u64,
    pub piece_len: u64,
    /// `Bitmap::to_bytes` of the recorded pieces.
    pub bitmap: Vec<u8>,
}

/// A tag cache entry as stored (the digest is parsed by the caller).
pub(super) struct TagRow {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    pub fetched_unix_ms: u64,
}

/// How the index file came to be open.
#[derive(Debug)]
pub(super) enum Opened {
    /// An existing, valid index.
    Existing,
    /// No index file was there; a new one was created.
    Created,
    /// The file was unreadable; it was moved aside and a new one created.
    Recreated { moved_to: PathBuf, reason: String },
}

/// Contents read at open, which also proves the file is readable end to end.
pub(super) struct Loaded {
    pub blobs: HashMap<Digest, BlobRecord>,
}

pub(super) struct Index {
    db: Database,
}

impl Index {
    /// Opens `path`, or moves a corrupt or foreign file aside and starts empty.
    pub fn open(path: &Path) -> Result<(Index, Opened, Loaded), StoreError> {
        let existed = match std::fs::symlink_metadata(path) {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(StoreError::io("stat index", path, e)),
        };
        let reason = match try_open(path) {
            Ok(db) => {
                let index = Index { db };
                match index.init_and_load() {
                    Ok(loaded) => {
                        let opened = if existed {
                            Opened::Existing
                        } else {
                            Opened::Created
                        };
                        return Ok((index, opened, loaded));
                    }
                    Err(e) => e.to_string(),
                }
            }
            Err(e) if is_corruption(&e) => e.to_string(),
            Err(e) => {
                return Err(StoreError::Index {
                    op: "open index",
                    source: Box::new(e.into()),
                });
            }
        };
        // The failed Database (if any) was dropped above, releasing its file lock, so the file
        // can be renamed.
        let moved_to = move_aside(path)?;
        let db = try_open(path).map_err(|e| StoreError::Index {
            op: "create index",
            source: Box::new(e.into()),
        })?;
        let index = Index { db };
        let loaded = index
            .init_and_load()
            .map_err(StoreError::index("initialize index"))?;
        Ok((index, Opened::Recreated { moved_to, reason }, loaded))
    }

    /// Creates the tables, checks the schema version and reads the blob table.
    fn init_and_load(&self) -> Result<Loaded, redb::Error> {
        let tx = self.db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let version = meta.get(SCHEMA_KEY)?.map(|v| v.value());
            match version {
                None => {
                    meta.insert(SCHEMA_KEY, SCHEMA_VERSION)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(other) => {
                    return Err(redb::Error::Corrupted(format!(
                        "index schema version {other}, expected {SCHEMA_VERSION}"
                    )));
                }
            }
            tx.open_table(BLOBS)?;
            tx.open_table(INGEST)?;
            // Added after schema 1 without a version bump: opening creates it when absent.
            tx.open_table(PIECES)?;
            tx.open_table(TAGS)?;
        }
        tx.commit()?;

        let rx = self.db.begin_read()?;
        let table = rx.open_table(BLOBS)?;
        let mut blobs = HashMap::new();
        for item in table.iter()? {
            let (key, value) = item?;
            let (size, last_access, media_type) = value.value();
            // Keys are written from `Digest`s; a key that does not parse is left for the
            // reconcile pass to drop.
            if let Ok(digest) = Digest::parse(key.value()) {
                blobs.insert(
                    digest,
                    BlobRecord {
                        size,
                        last_access,
                        media_type: media_type.map(str::to_owned),
                    },
                );
            }
        }
        Ok(Loaded { blobs })
    }

    fn write(
        &self,
        op: &'static str,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        let run = || -> Result<(), redb::Error> {
            let mut tx = self.db.begin_write()?;
            tx.set_durability(durability)?;
            f(&tx)?;
            tx.commit()?;
            Ok(())
        };
        run().map_err(StoreError::index(op))
    }

    /// Replaces the whole blob table with `records` (after a rebuild or reconcile).
    pub fn replace_blobs(&self, records: &HashMap<Digest, BlobRecord>) -> Result<(), StoreError> {
        self.write("rewrite blob table", Durability::Immediate, |tx| {
            tx.delete_table(BLOBS)?;
            let mut t = tx.open_table(BLOBS)?;
            for (d, r) in records {
                t.insert(
                    d.to_string().as_str(),
                    (r.size, r.last_access, r.media_type.as_deref()),
                )?;
            }
            Ok(())
        })
    }

    /// Inserts or updates blob records, and drops the ingest records (append and piece) of the
    /// same digests when `clear_ingest` (a committed blob needs no resume point).
    pub fn put_blobs(
        &self,
        records: &[(Digest, BlobRecord)],
        clear_ingest: bool,
        durability: Durability,
    ) -> Result<(), StoreError> {
        self.write("write blob records", durability, |tx| {
            let mut t = tx.open_table(BLOBS)?;
            let mut ingest = tx.open_table(INGEST)?;
            let mut pieces = tx.open_table(PIECES)?;
            for (d, r) in records {
                let key = d.to_string();
                t.insert(
                    key.as_str(),
                    (r.size, r.last_access, r.media_type.as_deref()),
                )?;
                if clear_ingest {
                    ingest.remove(key.as_str())?;
                    pieces.remove(key.as_str())?;
                }
            }
            Ok(())
        })
    }

    pub fn remove_blobs(&self, digests: &[Digest]) -> Result<(), StoreError> {
        if digests.is_empty() {
            return Ok(());
        }
        self.write("remove blob records", Durability::Immediate, |tx| {
            let mut t = tx.open_table(BLOBS)?;
            for d in digests {
                t.remove(d.to_string().as_str())?;
            }
            Ok(())
        })
    }

    /// The durable offset recorded for an interrupted ingest.
    pub fn ingest_record(&self, d: &Digest) -> Result<Option<u64>, StoreError> {
        let read = || -> Result<Option<u64>, redb::Error> {
            let rx = self.db.begin_read()?;
            let t = rx.open_table(INGEST)?;
            Ok(t.get(d.to_string().as_str())?.map(|v| v.value().0))
        };
        read().map_err(StoreError::index("read ingest record"))
    }

    /// All ingest records, keyed by the stored digest string.
    pub fn ingest_records(&self) -> Result<HashMap<String, u64>, StoreError> {
        let read = || -> Result<HashMap<String, u64>, redb::Error> {
            let rx = self.db.begin_read()?;
            let t = rx.open_table(INGEST)?;
            let mut out = HashMap::new();
            for item in t.iter()? {
                let (k, v) = item?;
                out.insert(k.value().to_owned(), v.value().0);
            }
            Ok(out)
        };
        read().map_err(StoreError::index("read ingest records"))
    }

    /// Records that `offset` bytes of `d` are fsync'ed. Immediate durability: after a kill -9
    /// this record is the only way to resume, and it must never claim more than the file
    /// holds, which is why the file is synced first.
    pub fn set_ingest(&self, d: &Digest, offset: u64) -> Result<(), StoreError> {
        self.write("record ingest checkpoint", Durability::Immediate, |tx| {
            let mut t = tx.open_table(INGEST)?;
            t.insert(d.to_string().as_str(), (offset, fsutil::now_ms()))?;
            Ok(())
        })
    }

    /// Removes ingest records by their stored key.
    pub fn remove_ingest_keys(&self, keys: &[String]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.write("remove ingest records", Durability::Immediate, |tx| {
            let mut t = tx.open_table(INGEST)?;
            for k in keys {
                t.remove(k.as_str())?;
            }
            Ok(())
        })
    }

    /// The resume point of a piece ingest.
    pub fn piece_record(&self, d: &Digest) -> Result<Option<PieceRecord>, StoreError> {
        let read = || -> Result<Option<PieceRecord>, redb::Error> {
            let rx = self.db.begin_read()?;
            let t = rx.open_table(PIECES)?;
            Ok(t.get(d.to_string().as_str())?.map(|v| {
                let (size, piece_len, bitmap, _) = v.value();
                PieceRecord {
                    size,
                    piece_len,
                    bitmap: bitmap.to_vec(),
                }
            }))
        };
        read().map_err(StoreError::index("read piece record"))
    }

    /// Keys (digest strings) of every piece ingest record.
    pub fn piece_keys(&self) -> Result<Vec<String>, StoreError> {
        let read = || -> Result<Vec<String>, redb::Error> {
            let rx = self.db.begin_read()?;
            let t = rx.open_table(PIECES)?;
            let mut out = Vec::new();
            for item in t.iter()? {
                out.push(item?.0.value().to_owned());
            }
            Ok(out)
        };
        read().map_err(StoreError::index("read piece records"))
    }

    /// Records which pieces of `d` are fsync'ed. Immediate durability, written only after the
    /// fsync, for the same reason as [`Index::set_ingest`].
    pub fn set_piece_record(&self, d: &Digest, r: &PieceRecord) -> Result<(), StoreError> {
        self.write("record piece checkpoint", Durability::Immediate, |tx| {
            let mut t = tx.open_table(PIECES)?;
            t.insert(
                d.to_string().as_str(),
                (r.size, r.piece_len, r.bitmap.as_slice(), fsutil::now_ms()),
            )?;
            Ok(())
        })
    }

    pub fn remove_piece_keys(&self, keys: &[String]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.write("remove piece records", Durability::Immediate, |tx| {
            let mut t = tx.open_table(PIECES)?;
            for k in keys {
                t.remove(k.as_str())?;
            }
            Ok(())
        })
    }

    pub fn tag_get(
        &self,
        upstream: &str,
        repo: &str,
        tag: &str,
    ) -> Result<Option<TagRow>, StoreError> {
        let read = || -> Result<Option<TagRow>, redb::Error> {
            let rx = self.db.begin_read()?;
            let t = rx.open_table(TAGS)?;
            Ok(t.get((upstream, repo, tag))?.map(|v| {
                let (digest, media_type, size, fetched_unix_ms) = v.value();
                TagRow {
                    digest: digest.to_owned(),
                    media_type: media_type.to_owned(),
                    size,
                    fetched_unix_ms,
                }
            }))
        };
        read().map_err(StoreError::index("read tag"))
    }

    /// Tags are a cache that may be lost, so they are committed without an fsync; the next
    /// durable commit (a blob commit, checkpoint or access-time flush) or a clean close
    /// persists them.
    pub fn tag_put(
        &self,
        upstream: &str,
        repo: &str,
        tag: &str,
        row: &TagRow,
    ) -> Result<(), StoreError> {
        self.write("write tag", Durability::None, |tx| {
            let mut t = tx.open_table(TAGS)?;
            t.insert(
                (upstream, repo, tag),
                (
                    row.digest.as_str(),
                    row.media_type.as_str(),
                    row.size,
                    row.fetched_unix_ms,
                ),
            )?;
            Ok(())
        })
    }
}

fn try_open(path: &Path) -> Result<Database, DatabaseError> {
    let mut builder = Builder::new();
    builder.set_cache_size(CACHE_BYTES);
    // Without the check a file damaged outside redb may make a plain open panic; with it the
    // damage is an error and the index is rebuilt. The file is small, so reading it all at
    // open is cheap.
    builder.set_check_integrity_on_open(true);
    // Belt and braces: a panic inside redb on a garbage file must not stop the agent from
    // starting, since the index can always be rebuilt.
    catch_unwind(AssertUnwindSafe(|| builder.create(path))).unwrap_or_else(|_| {
        Err(DatabaseError::Storage(StorageError::Corrupted(
            "redb panicked while opening the file".to_owned(),
        )))
    })
}

/// Whether an open failure means the file is bad (rebuild) rather than the environment
/// (another process holds it, permissions): only the former may be moved aside.
fn is_corruption(e: &DatabaseError) -> bool {
    match e {
        DatabaseError::DatabaseAlreadyOpen
        | DatabaseError::LockProtocolMismatch
        | DatabaseError::TransactionInProgress => false,
        DatabaseError::Storage(StorageError::Io(io)) => matches!(
            io.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
        ),
        _ => true,
    }
}

/// Renames a bad index to `index.redb.corrupt-<unix ms>` for post-mortem, removing older
/// such copies so repeated corruption cannot fill the disk.
fn move_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("index.redb");
    let prefix = format!("{name}.corrupt-");
    if let Some(dir) = path.parent()
        && let Ok(entries) = std::fs::read_dir(dir)
    {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                // Best effort: an old post-mortem copy that cannot be removed is harmless.
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let target = path.with_file_name(format!("{prefix}{}", fsutil::now_ms()));
    std::fs::rename(path, &target).map_err(|e| StoreError::io("move corrupt index", path, e))?;
    Ok(target)
}
