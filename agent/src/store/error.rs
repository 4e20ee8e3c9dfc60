//! The store's error type: what failed, on which digest or path, and whether retrying can help.

use std::io;
use std::path::PathBuf;

use shoal_proto::digest::Digest;

/// An error from the content store.
///
/// Messages name the digest and path involved, never credentials (the store never sees any).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("store: {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The redb index failed. The index is a cache, so the caller may carry on; the blobs are
    /// unaffected.
    #[error("store index: {op}: {source}")]
    Index {
        op: &'static str,
        source: Box<redb::Error>,
    },
    /// Another [`Ingest`](super::Ingest) for this digest is alive in this process.
    #[error("{0} is already being written to the store")]
    Busy(Digest),
    /// The bytes do not hash to the digest they were supposed to have; nothing was committed.
    #[error("content does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    /// The number of bytes written differs from the announced size; nothing was committed.
    #[error("size mismatch for {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    /// The filesystem holding the store is full (ENOSPC or quota). The partial file was
    /// removed, so nothing half-written remains.
    #[error("no space left for {digest} at {}; partial data removed", path.display())]
    Full { digest: Digest, path: PathBuf },
    /// The digest is not in the store.
    #[error("{0} is not in the store")]
    NotFound(Digest),
    /// An earlier write or sync of this ingest failed, so its file no longer matches its hasher.
    /// Drop it and start a new ingest, which resumes from the last checkpoint.
    #[error("ingest of {0} failed earlier and cannot continue")]
    IngestFailed(Digest),
    /// A piece ingest was given a geometry or piece that does not fit the blob.
    #[error("piece ingest of {digest}: {reason}")]
    Geometry { digest: Digest, reason: String },
    /// The store configuration is out of range.
    #[error("invalid store config: {0}")]
    Config(String),
}

impl StoreError {
    pub(super) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> StoreError {
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(super) fn index(op: &'static str) -> impl FnOnce(redb::Error) -> StoreError {
        move |e| StoreError::Index {
            op,
            source: Box::new(e),
        }
    }

    /// The data handed to the store was wrong (digest or size). The source that produced it
    /// is at fault, not the store: fetch from another source.
    pub fn is_bad_content(&self) -> bool {
        matches!(
            self,
            StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. }
        )
    }

    /// Trying the same operation again later may succeed without any change to the store:
    /// the digest was busy, the source sent bad bytes (another source may not), or an ingest
    /// broke and a new one can resume from its checkpoint.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Busy(_)
                | StoreError::DigestMismatch { .. }
                | StoreError::SizeMismatch { .. }
                | StoreError::IngestFailed(_)
        )
    }

    /// The filesystem is out of space; evicting or waiting is needed before a retry.
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Full { .. })
    }
}

/// ENOSPC and EDQUOT: the filesystem refused to grow a file.
pub(super) fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}
