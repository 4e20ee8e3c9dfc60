//! Small file-system helpers: atomic replacement of small files.

use std::fs::{self, File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// What to do when the destination already exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Existing {
    /// Fail with `AlreadyExists`, even if the file appears while writing.
    Refuse,
    /// Replace it, keeping its permission bits and (where allowed) its owner and group, so a
    /// root-run edit does not lock out the service user that reads the file.
    ReplaceKeepingMode,
    /// Replace it and apply the new mode.
    Replace,
}

/// Writes `contents` to `path` so that readers see the old file or the new one, never a
/// mixture: a temporary file in the same directory, fsync, rename, fsync of the directory.
/// A new file gets `mode`.
pub(crate) fn write_atomic(
    path: &Path,
    contents: &[u8],
    mode: u32,
    existing: Existing,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let old = match fs::metadata(path) {
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    if old.is_some() && existing == Existing::Refuse {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "file exists"));
    }

    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    // tempfile creates the file with mode 0600, so nothing readable ever exists under the
    // temporary name; the final mode is applied before the rename.
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(contents)?;
    let file = tmp.as_file();
    match (&old, existing) {
        (Some(meta), Existing::ReplaceKeepingMode) => {
            file.set_permissions(Permissions::from_mode(meta.mode() & 0o7777))?;
            let ours = file.metadata()?;
            if (ours.uid(), ours.gid()) != (meta.uid(), meta.gid()) {
                // Only root may give a file away; anyone else keeps owning what they wrote.
                match std::os::unix::fs::fchown(file, Some(meta.uid()), Some(meta.gid())) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
                    Err(e) => return Err(e),
                }
            }
        }
        _ => file.set_permissions(Permissions::from_mode(mode))?,
    }
    file.sync_all()?;
    if existing == Existing::Refuse {
        tmp.persist_noclobber(path).map_err(|e| e.error)?;
    } else {
        tmp.persist(path).map_err(|e| e.error)?;
    }
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"one", 0o600, Existing::Refuse).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let err = write_atomic(&path, b"two", 0o600, Existing::Refuse).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"one");

        fs::set_permissions(&path, Permissions::from_mode(0o640)).unwrap();
        write_atomic(&path, b"three", 0o600, Existing::ReplaceKeepingMode).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
        write_atomic(&path, b"four", 0o644, Existing::Replace).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o644);
        assert_eq!(fs::read(&path).unwrap(), b"four");
        // No temporary files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
