//! Filesystem helpers for the store: directory fsync, store-relative names, clock readings.

use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use shoal_proto::digest::{Algorithm, Digest};

pub(super) const ALGORITHMS: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::Sha512];

/// Milliseconds since the Unix epoch; 0 if the clock is before 1970.
pub(super) fn now_ms() -> u64 {
    system_time_ms(SystemTime::now())
}

pub(super) fn system_time_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(super) fn create_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o755).create(path)
}

/// Makes renames and unlinks in `dir` durable.
pub(super) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Opens a committed blob read-only without following a symlink, so a link planted under
/// `blobs/` cannot make the store serve a file from elsewhere.
pub(super) fn open_no_follow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

/// Opens (creating if needed) an ingest file for reading and writing, without truncating.
pub(super) fn open_ingest_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

/// Creates a new file that must not exist yet.
pub(super) fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
}

/// Removes a file, treating "already gone" as success.
pub(super) fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The name of the ingest file for `d`: `<alg>-<hex>`.
pub(super) fn ingest_name(d: &Digest) -> String {
    format!("{}-{}", d.algorithm(), d.hex())
}

/// Parses an ingest file name back into its digest; `None` for anything else (temp files of
/// `put`, piece files, strays).
pub(super) fn parse_ingest_name(name: &OsStr) -> Option<Digest> {
    let (alg, hex) = name.to_str()?.split_once('-')?;
    Digest::parse(&format!("{alg}:{hex}")).ok()
}

/// Suffix of a piece ingest file: `<alg>-<hex>.pieces`.
const PIECES_SUFFIX: &str = ".pieces";

/// The name of the piece ingest file for `d`.
pub(super) fn piece_ingest_name(d: &Digest) -> String {
    format!("{}{PIECES_SUFFIX}", ingest_name(d))
}

/// Parses a piece ingest file name back into its digest.
pub(super) fn parse_piece_ingest_name(name: &OsStr) -> Option<Digest> {
    let stem = name.to_str()?.strip_suffix(PIECES_SUFFIX)?;
    parse_ingest_name(OsStr::new(stem))
}

/// Parses a file name in `blobs/<alg>/` into its digest; `None` when it is not the canonical
/// hex of that algorithm.
pub(super) fn parse_blob_name(alg: Algorithm, name: &OsStr) -> Option<Digest> {
    let hex = name.to_str()?;
    Digest::parse(&format!("{alg}:{hex}")).ok()
}

/// The digest of the empty blob, the only digest a zero-length file may have.
pub(super) fn empty_digest(alg: Algorithm) -> Digest {
    shoal_proto::digest::Hasher::new(alg).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_reject_strays() {
        let d = Digest::sha256_of(b"x");
        assert_eq!(
            parse_ingest_name(OsStr::new(&ingest_name(&d))),
            Some(d.clone())
        );
        assert_eq!(
            parse_blob_name(Algorithm::Sha256, OsStr::new(&d.hex())),
            Some(d.clone())
        );
        assert_eq!(
            parse_blob_name(Algorithm::Sha512, OsStr::new(&d.hex())),
            None
        );
        assert_eq!(parse_ingest_name(OsStr::new("put-1-2.tmp")), None);
        let p = piece_ingest_name(&d);
        assert_eq!(parse_piece_ingest_name(OsStr::new(&p)), Some(d.clone()));
        assert_eq!(parse_ingest_name(OsStr::new(&p)), None);
        assert_eq!(parse_piece_ingest_name(OsStr::new(&ingest_name(&d))), None);
        assert_eq!(parse_blob_name(Algorithm::Sha256, OsStr::new("..")), None);
        assert_eq!(
            parse_blob_name(Algorithm::Sha256, OsStr::new(&d.hex().to_uppercase())),
            None
        );
    }
}
