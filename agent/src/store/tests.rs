//! Unit tests for the store: round trips, verification, index rebuild, crash resume, eviction.

use std::fs;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use shoal_proto::digest::{Algorithm, Digest, Hasher};

use super::*;

const MIB: usize = 1024 * 1024;

fn config(dir: &Path) -> StoreConfig {
    StoreConfig::new(dir.join("store"))
}

fn open(dir: &Path) -> Store {
    Store::open(config(dir)).unwrap()
}

/// Deterministic, non-repeating bytes; `seed` makes blobs of equal length differ.
fn data(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn sha256(bytes: &[u8]) -> Digest {
    Digest::sha256_of(bytes)
}

fn sha512(bytes: &[u8]) -> Digest {
    let mut h = Hasher::new(Algorithm::Sha512);
    h.update(bytes);
    h.finish()
}

fn read_blob(store: &Store, d: &Digest) -> Vec<u8> {
    let mut blob = store.open_blob(d).unwrap().expect("blob present");
    let mut out = Vec::new();
    blob.file.read_to_end(&mut out).unwrap();
    assert_eq!(out.len() as u64, blob.size);
    out
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn write_all(ingest: &mut Ingest, bytes: &[u8]) {
    for chunk in bytes.chunks(MIB) {
        ingest.write(chunk).unwrap();
    }
}

/// Captures formatted log output for the duration of `f`.
fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf(Arc::default());
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let logs = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    (out, logs)
}

#[test]
fn handles_are_thread_safe() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Store>();
    send::<Ingest>();
    send::<Blob>();
}

#[test]
fn put_and_open_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bytes = data(4000, 1);
    let d = sha256(&bytes);
    assert!(!store.contains(&d));
    assert!(store.open_blob(&d).unwrap().is_none());

    store
        .put(
            &d,
            &bytes,
            Some("application/vnd.oci.image.manifest.v1+json"),
        )
        .unwrap();
    assert!(store.contains(&d));
    assert_eq!(read_blob(&store, &d), bytes);
    assert_eq!(
        store.media_type(&d).as_deref(),
        Some("application/vnd.oci.image.manifest.v1+json")
    );
    let blob = store.open_blob(&d).unwrap().unwrap();
    assert_eq!(blob.digest, d);
    assert_eq!(blob.size, 4000);
    drop(blob);
    assert_eq!(
        store.usage(),
        Usage {
            blobs: 1,
            bytes: 4000,
            cap: None
        }
    );
    let on_disk = store.root().join("blobs/sha256").join(d.hex());
    assert_eq!(fs::read(on_disk).unwrap(), bytes);

    // Idempotent, and a second put does not double-count.
    store.put(&d, &bytes, None).unwrap();
    assert_eq!(store.usage().bytes, 4000);
    // Nothing left in ingest/.
    assert!(names(&store.root().join("ingest")).is_empty());

    store.set_media_type(&d, "text/plain").unwrap();
    assert_eq!(store.media_type(&d).as_deref(), Some("text/plain"));
    let absent = sha256(b"absent");
    assert!(matches!(
        store.set_media_type(&absent, "x"),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn empty_blob_round_trips_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let empty = sha256(b"");
    let empty512 = sha512(b"");
    {
        let store = open(dir.path());
        store.put(&empty, b"", None).unwrap();
        store
            .ingest(&empty512)
            .unwrap()
            .commit(Some(0), None)
            .unwrap();
        assert_eq!(read_blob(&store, &empty), b"");
        assert_eq!(read_blob(&store, &empty512), b"");
    }
    fs::remove_file(dir.path().join("store/index.redb")).unwrap();
    let store = open(dir.path());
    // The only digest a zero-length file may have is the empty one, so these are kept.
    assert!(store.contains(&empty));
    assert!(store.contains(&empty512));
    store.maintain().unwrap();
}

#[test]
fn put_with_wrong_digest_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let d = sha256(b"right");
    let err = store.put(&d, b"wrong", None).unwrap_err();
    match &err {
        StoreError::DigestMismatch { expected, actual } => {
            assert_eq!(expected, &d);
            assert_eq!(actual, &sha256(b"wrong"));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.is_bad_content());
    assert!(!store.contains(&d));
    assert!(names(&store.root().join("blobs/sha256")).is_empty());
    assert!(names(&store.root().join("ingest")).is_empty());
}

#[test]
fn ingest_commit_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bytes = data(3 * MIB + 17, 2);
    let d = sha256(&bytes);
    let mut ing = store.ingest(&d).unwrap();
    assert_eq!(ing.offset(), 0);
    assert_eq!(ing.digest(), &d);
    assert!(ing.path().starts_with(store.root().join("ingest")));
    write_all(&mut ing, &bytes);
    assert_eq!(ing.offset(), bytes.len() as u64);
    // The ingest file is readable while being written.
    assert_eq!(fs::read(ing.path()).unwrap().len(), bytes.len());
    ing.commit(Some(bytes.len() as u64), Some("application/octet-stream"))
        .unwrap();
    assert_eq!(read_blob(&store, &d), bytes);
    assert_eq!(
        store.media_type(&d).as_deref(),
        Some("application/octet-stream")
    );
    assert!(names(&store.root().join("ingest")).is_empty());
}

#[test]
fn commit_with_wrong_digest_discards_everything() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let d = sha256(b"expected content");
    let mut ing = store.ingest(&d).unwrap();
    ing.write(b"other content").unwrap();
    ing.checkpoint().unwrap();
    let path = ing.path().to_owned();
    let err = ing.commit(None, None).unwrap_err();
    match err {
        StoreError::DigestMismatch { expected, actual } => {
            assert_eq!(expected, d);
            assert_eq!(actual, sha256(b"other content"));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!store.contains(&d));
    assert!(!path.exists());
    assert!(names(&store.root().join("blobs/sha256")).is_empty());
    assert!(names(&store.root().join("ingest")).is_empty());
    // The checkpoint went with the file: a new ingest starts at 0.
    let ing = store.ingest(&d).unwrap();
    assert_eq!(ing.offset(), 0);
}

#[test]
fn commit_with_wrong_size_discards_everything() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bytes = b"twelve bytes";
    let d = sha256(bytes);
    let mut ing = store.ingest(&d).unwrap();
    ing.write(bytes).unwrap();
    let err = ing.commit(Some(13), None).unwrap_err();
    assert!(
        matches!(err, StoreError::SizeMismatch { ref digest, expected: 13, actual: 12 } if *digest == d),
        "{err:?}"
    );
    assert!(err.to_string().contains(&d.to_string()));
    assert!(!store.contains(&d));
    assert!(names(&store.root().join("blobs/sha256")).is_empty());
    assert!(names(&store.root().join("ingest")).is_empty());
}

#[test]
fn ingest_is_exclusive_per_digest() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let d = sha256(b"x");
    let other = sha256(b"y");
    let first = store.ingest(&d).unwrap();
    let err = store.ingest(&d).unwrap_err();
    assert!(matches!(&err, StoreError::Busy(b) if *b == d), "{err:?}");
    assert!(err.is_retryable());
    // Another digest is independent.
    let _other = store.ingest(&other).unwrap();
    drop(first);
    let mut again = store.ingest(&d).unwrap();
    again.write(b"x").unwrap();
    again.commit(Some(1), None).unwrap();
    assert!(store.contains(&d));
}

#[test]
fn reset_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bytes = data(1000, 3);
    let d = sha256(&bytes);
    let mut ing = store.ingest(&d).unwrap();
    ing.write(&data(5000, 4)).unwrap();
    ing.checkpoint().unwrap();
    ing.reset().unwrap();
    assert_eq!(ing.offset(), 0);
    assert_eq!(fs::metadata(ing.path()).unwrap().len(), 0);
    ing.write(&bytes).unwrap();
    ing.commit(Some(1000), None).unwrap();
    assert_eq!(read_blob(&store, &d), bytes);
}

#[test]
fn abandon_removes_file_and_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let d = sha256(b"never finished");
    let mut ing = store.ingest(&d).unwrap();
    ing.write(b"never").unwrap();
    ing.checkpoint().unwrap();
    let path = ing.path().to_owned();
    ing.abandon();
    assert!(!path.exists());
    assert!(store.inner.index.ingest_records().unwrap().is_empty());
    assert_eq!(store.ingest(&d).unwrap().offset(), 0);
}

#[test]
fn resume_after_crash_truncates_to_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let total = 26 * MIB + 123;
    let bytes = data(total, 5);
    let d = sha256(&bytes);
    let path = {
        let store = open(dir.path());
        let mut ing = store.ingest(&d).unwrap();
        write_all(&mut ing, &bytes[..20 * MIB]);
        ing.checkpoint().unwrap();
        write_all(&mut ing, &bytes[20 * MIB..23 * MIB]);
        assert_eq!(ing.offset(), (23 * MIB) as u64);
        let path = ing.path().to_owned();
        // Dropping both loses the in-memory hasher, as a crash would.
        drop(ing);
        drop(store);
        path
    };
    // A crash may leave anything after the durable offset.
    let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(&[0xAA; 4096]).unwrap();
    drop(f);

    let store = open(dir.path());
    assert!(path.exists(), "resumable ingest file kept at open");
    let mut ing = store.ingest(&d).unwrap();
    assert_eq!(ing.offset(), (20 * MIB) as u64);
    assert_eq!(fs::metadata(&path).unwrap().len(), (20 * MIB) as u64);
    write_all(&mut ing, &bytes[20 * MIB..]);
    ing.commit(Some(total as u64), None).unwrap();
    let blob = store.open_blob(&d).unwrap().unwrap();
    assert_eq!(blob.size, total as u64);
    drop(blob);
    assert_eq!(read_blob(&store, &d), bytes);
    assert!(store.inner.index.ingest_records().unwrap().is_empty());
}

#[test]
fn garbage_in_durable_prefix_is_caught_at_commit() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = data(9 * MIB, 6);
    let d = sha256(&bytes);
    let path = {
        let store = open(dir.path());
        let mut ing = store.ingest(&d).unwrap();
        write_all(&mut ing, &bytes[..MIB]);
        ing.checkpoint().unwrap();
        ing.path().to_owned()
    };
    // Damage inside the checkpointed prefix (disk rot, a bug): resume cannot tell, the
    // final digest check must.
    let mut f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all(b"rot").unwrap();
    drop(f);
    let store = open(dir.path());
    let mut ing = store.ingest(&d).unwrap();
    assert_eq!(ing.offset(), MIB as u64);
    write_all(&mut ing, &bytes[MIB..]);
    let err = ing.commit(Some(bytes.len() as u64), None).unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err:?}");
    assert!(!store.contains(&d));
    assert!(!path.exists());
}

#[test]
fn dropped_ingest_resumes_in_process_at_full_offset() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bytes = data(3 * MIB, 7);
    let d = sha256(&bytes);
    let mut ing = store.ingest(&d).unwrap();
    write_all(&mut ing, &bytes[..2 * MIB + 5]);
    drop(ing);
    // A sweep must keep it: it is resumable from memory.
    assert_eq!(store.sweep_ingest().unwrap(), 0);
    let mut ing = store.ingest(&d).unwrap();
    assert_eq!(ing.offset(), (2 * MIB + 5) as u64);
    write_all(&mut ing, &bytes[2 * MIB + 5..]);
    ing.commit(Some(bytes.len() as u64), None).unwrap();
    assert_eq!(read_blob(&store, &d), bytes);
}

#[test]
fn checkpoint_after_in_memory_resume_syncs_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = data(3 * MIB, 13);
    let d = sha256(&bytes);
    {
        let store = open(dir.path());
        let mut ing = store.ingest(&d).unwrap();
        write_all(&mut ing, &bytes[..2 * MIB]);
        drop(ing);
        let mut ing = store.ingest(&d).unwrap();
        assert_eq!(ing.offset(), (2 * MIB) as u64);
        ing.checkpoint().unwrap();
    }
    let store = open(dir.path());
    let mut ing = store.ingest(&d).unwrap();
    assert_eq!(ing.offset(), (2 * MIB) as u64);
    write_all(&mut ing, &bytes[2 * MIB..]);
    ing.commit(Some(bytes.len() as u64), None).unwrap();
    assert_eq!(read_blob(&store, &d), bytes);
}

#[test]
fn no_space_removes_partial_data() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let d = sha256(b"does not fit");
    let mut ing = store.ingest(&d).unwrap();
    ing.write(b"does not").unwrap();
    ing.checkpoint().unwrap();
    let path = ing.path().to_owned();
    // What write(2) returns on a full filesystem.
    let err = ing.fail("write ingest file", std::io::Error::from_raw_os_error(28));
    assert!(
        matches!(&err, StoreError::Full { digest, path: p } if *digest == d && *p == path),
        "{err:?}"
    );
    assert!(err.is_full());
    assert!(err.to_string().contains(&d.to_string()));
    assert!(!path.exists());
    assert!(store.inner.index.ingest_records().unwrap().is_empty());
    assert!(matches!(
        ing.write(b" fit"),
        Err(StoreError::IngestFailed(_))
    ));
    assert!(matches!(
        ing.commit(None, None),
        Err(StoreError::IngestFailed(_))
    ));
    assert_eq!(store.ingest(&d).unwrap().offset(), 0);
    assert!(!store.contains(&d));

    // Any other IO error keeps the checkpoint for a later resume.
    let mut ing = store.ingest(&d).unwrap();
    ing.write(b"does not").unwrap();
    ing.checkpoint().unwrap();
    let err = ing.fail("write ingest file", std::io::Error::from_raw_os_error(5));
    assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
    drop(ing);
    assert_eq!(store.ingest(&d).unwrap().offset(), 8);
}

#[test]
fn unresumable_and_stray_ingest_files_are_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = data(2 * MIB, 8);
    let d = sha256(&bytes);
    let ingest_dir = {
        let store = open(dir.path());
        let mut ing = store.ingest(&d).unwrap();
        // Below the checkpoint interval: no record, nothing to resume after a restart.
        write_all(&mut ing, &bytes[..MIB]);
        drop(ing);
        store.root().join("ingest")
    };
    fs::write(ingest_dir.join("put-1-1.tmp"), b"half a manifest").unwrap();
    fs::write(ingest_dir.join("junk"), b"?").unwrap();
    fs::write(
        ingest_dir.join(fsutil::ingest_name(&sha256(b"no record"))),
        b"abc",
    )
    .unwrap();
    assert_eq!(names(&ingest_dir).len(), 4);

    let store = open(dir.path());
    assert!(names(&ingest_dir).is_empty(), "{:?}", names(&ingest_dir));
    assert_eq!(store.ingest(&d).unwrap().offset(), 0);
}

#[test]
fn expired_ingest_files_are_removed_even_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d_old = sha256(b"old");
    let d_new = sha256(b"new");
    let (old_path, new_path) = {
        let store = open(dir.path());
        let mut old = store.ingest(&d_old).unwrap();
        old.write(b"ol").unwrap();
        old.checkpoint().unwrap();
        let mut new = store.ingest(&d_new).unwrap();
        new.write(b"ne").unwrap();
        new.checkpoint().unwrap();
        (old.path().to_owned(), new.path().to_owned())
    };
    let two_days_ago = SystemTime::now() - Duration::from_secs(2 * 24 * 3600);
    fs::File::options()
        .write(true)
        .open(&old_path)
        .unwrap()
        .set_modified(two_days_ago)
        .unwrap();
    let store = open(dir.path());
    assert!(!old_path.exists());
    assert!(new_path.exists());
    assert_eq!(store.ingest(&d_new).unwrap().offset(), 2);
    assert_eq!(store.ingest(&d_old).unwrap().offset(), 0);
    let records = store.inner.index.ingest_records().unwrap();
    assert!(!records.contains_key(&d_old.to_string()));
}

#[test]
fn sweep_skips_live_writers_and_expires_abandoned_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.ingest_max_age = Duration::from_secs(3600);
    let store = Store::open(cfg).unwrap();
    let d = sha256(b"live");
    let mut live = store.ingest(&d).unwrap();
    live.write(b"li").unwrap();
    // Live, no record, no stash: still kept.
    assert_eq!(store.sweep_ingest().unwrap(), 0);
    assert!(live.path().exists());
    let path = live.path().to_owned();
    drop(live);
    fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(7200))
        .unwrap();
    assert_eq!(store.sweep_ingest().unwrap(), 1);
    assert!(!path.exists());
    assert_eq!(store.ingest(&d).unwrap().offset(), 0);
}

fn populate(store: &Store, n: u32, len: usize) -> Vec<(Digest, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let bytes = data(len, 100 + i);
            let d = sha256(&bytes);
            store
                .put(&d, &bytes, Some("application/octet-stream"))
                .unwrap();
            (d, bytes)
        })
        .collect()
}

#[test]
fn index_deleted_is_rebuilt_from_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let (usage, digests) = {
        let store = open(dir.path());
        let blobs = populate(&store, 5, 1000);
        let big = sha512(&data(70_000, 9));
        store.put(&big, &data(70_000, 9), None).unwrap();
        (store.usage(), blobs)
    };
    fs::remove_file(dir.path().join("store/index.redb")).unwrap();
    let (store, logs) = capture_logs(|| open(dir.path()));
    assert_eq!(store.usage(), usage);
    assert_eq!(usage.blobs, 6);
    for (d, bytes) in &digests {
        assert_eq!(&read_blob(&store, d), bytes);
        // Media types live only in the index.
        assert_eq!(store.media_type(d), None);
    }
    assert!(logs.contains("index not found; rebuilt"), "{logs}");
    assert!(logs.contains("blobs=6"), "{logs}");
}

#[test]
fn index_corrupted_is_moved_aside_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let usage = {
        let store = open(dir.path());
        populate(&store, 4, 3000);
        store.usage()
    };
    let index = dir.path().join("store/index.redb");
    let len = fs::metadata(&index).unwrap().len() as usize;
    fs::write(&index, data(len.max(8192), 10)).unwrap();
    let (store, logs) = capture_logs(|| open(dir.path()));
    assert_eq!(store.usage(), usage);
    assert!(logs.contains("WARN"), "{logs}");
    assert!(logs.contains("moved it aside and rebuilt"), "{logs}");
    let aside: Vec<String> = names(&dir.path().join("store"))
        .into_iter()
        .filter(|n| n.starts_with("index.redb.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");

    // A short garbage file, too.
    drop(store);
    fs::write(&index, b"not a database").unwrap();
    let store = open(dir.path());
    assert_eq!(store.usage(), usage);

    // And a valid header over damaged pages, which only the integrity check notices.
    drop(store);
    let mut bytes = fs::read(&index).unwrap();
    let len = bytes.len();
    assert!(len > 8192, "index is {len} bytes");
    bytes[4096..].copy_from_slice(&data(len - 4096, 11));
    fs::write(&index, bytes).unwrap();
    let (store, logs) = capture_logs(|| open(dir.path()));
    assert_eq!(store.usage(), usage);
    assert!(logs.contains("moved it aside and rebuilt"), "{logs}");
}

#[test]
fn reconcile_adopts_new_files_drops_missing_and_ignores_strays() {
    let dir = tempfile::tempdir().unwrap();
    let (kept, gone) = {
        let store = open(dir.path());
        let mut blobs = populate(&store, 2, 500);
        (blobs.pop().unwrap(), blobs.pop().unwrap())
    };
    let root = dir.path().join("store");
    fs::remove_file(root.join("blobs/sha256").join(gone.0.hex())).unwrap();
    let adopted = data(321, 11);
    let adopted_d = sha256(&adopted);
    fs::write(root.join("blobs/sha256").join(adopted_d.hex()), &adopted).unwrap();
    fs::write(root.join("blobs/sha256/not-a-digest"), b"?").unwrap();
    fs::create_dir(root.join("blobs/md5")).unwrap();
    fs::write(root.join("blobs/md5/0123"), b"?").unwrap();
    // A valid name in the wrong algorithm's directory is not a blob either.
    fs::write(root.join("blobs/sha512").join(adopted_d.hex()), &adopted).unwrap();
    // Nor is a symlink, which could point outside the root.
    std::os::unix::fs::symlink(
        "/etc/passwd",
        root.join("blobs/sha256").join(sha256(b"l").hex()),
    )
    .unwrap();

    let (store, logs) = capture_logs(|| open(dir.path()));
    assert!(store.contains(&kept.0));
    assert!(!store.contains(&gone.0));
    assert!(store.contains(&adopted_d));
    assert!(!store.contains(&sha256(b"l")));
    assert_eq!(store.usage().blobs, 2);
    assert_eq!(store.usage().bytes, 500 + 321);
    assert_eq!(read_blob(&store, &adopted_d), adopted);
    // Strays are left alone.
    assert!(root.join("blobs/sha256/not-a-digest").exists());
    assert!(root.join("blobs/sha512").join(adopted_d.hex()).exists());
    assert!(root.join("blobs/md5/0123").exists());
    assert!(logs.contains("unknown=4"), "{logs}");
    assert!(logs.contains("ignoring unknown entry"), "{logs}");
    assert!(logs.contains("index reconciled"), "{logs}");
}

#[test]
fn vanished_blob_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let blobs = populate(&store, 1, 100);
    let d = &blobs[0].0;
    fs::remove_file(store.root().join("blobs/sha256").join(d.hex())).unwrap();
    assert!(store.open_blob(d).unwrap().is_none());
    assert!(!store.contains(d));
    assert_eq!(store.usage().bytes, 0);
}

#[test]
fn sha512_blobs_live_under_their_own_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bytes = data(2 * MIB, 12);
    let d = sha512(&bytes);
    let mut ing = store.ingest(&d).unwrap();
    assert!(ing.path().ends_with(format!("ingest/sha512-{}", d.hex())));
    write_all(&mut ing, &bytes);
    ing.commit(Some(bytes.len() as u64), None).unwrap();
    assert!(store.root().join("blobs/sha512").join(d.hex()).is_file());
    assert!(names(&store.root().join("blobs/sha256")).is_empty());
    assert_eq!(read_blob(&store, &d), bytes);

    let small = b"small sha512";
    let ds = sha512(small);
    store.put(&ds, small, None).unwrap();
    assert!(store.root().join("blobs/sha512").join(ds.hex()).is_file());
}

fn capped(dir: &Path, max_bytes: u64) -> Store {
    let mut cfg = config(dir);
    cfg.max_bytes = Some(max_bytes);
    Store::open(cfg).unwrap()
}

#[test]
fn eviction_follows_lru_order() {
    let dir = tempfile::tempdir().unwrap();
    // High 9.5 MiB, low 8.5 MiB.
    let store = capped(dir.path(), 10 * MIB as u64);
    let blobs = populate(&store, 4, 2 * MIB);
    // Touch the oldest so the second becomes least recent.
    drop(store.open_blob(&blobs[0].0).unwrap());
    assert_eq!(store.evict_if_needed().unwrap(), EvictReport::default());

    let extra = data(2 * MIB, 200);
    let de = sha256(&extra);
    store.put(&de, &extra, None).unwrap();
    // 10 MiB > 9.5 MiB: evict the least recent (blob 1) to reach 8 MiB <= 8.5 MiB.
    assert!(store.contains(&blobs[0].0));
    assert!(!store.contains(&blobs[1].0));
    assert!(store.contains(&blobs[2].0));
    assert!(store.contains(&blobs[3].0));
    assert!(store.contains(&de));
    assert_eq!(store.usage().bytes, 8 * MIB as u64);
    assert!(
        !store
            .root()
            .join("blobs/sha256")
            .join(blobs[1].0.hex())
            .exists()
    );
}

#[test]
fn eviction_skips_pinned_and_ingesting_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = capped(dir.path(), 10 * MIB as u64);
    let blobs = populate(&store, 4, 2 * MIB);
    let (a, b, c, d) = (&blobs[0].0, &blobs[1].0, &blobs[2].0, &blobs[3].0);
    // Access order a, b, c, d; a stays pinned and b gets a live ingest.
    let pinned = store.open_blob(a).unwrap().unwrap();
    for x in [b, c, d] {
        drop(store.open_blob(x).unwrap());
    }
    let live = store.ingest(b).unwrap();

    let e = data(2 * MIB, 300);
    store.put(&sha256(&e), &e, None).unwrap();
    assert!(store.contains(a), "pinned blob evicted");
    assert!(store.contains(b), "blob being ingested evicted");
    assert!(!store.contains(c), "least recent evictable blob kept");
    assert!(store.contains(d));
    // The pinned file is still readable.
    let mut buf = Vec::new();
    let mut f = &pinned.file;
    f.read_to_end(&mut buf).unwrap();
    assert_eq!(buf, blobs[0].1);

    drop(pinned);
    drop(live);
    let f_bytes = data(2 * MIB, 301);
    store.put(&sha256(&f_bytes), &f_bytes, None).unwrap();
    // a is now the least recent and no longer pinned.
    assert!(!store.contains(a));
    assert!(store.contains(b));
}

#[test]
fn eviction_with_everything_in_use_stays_over_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    // High 2.85 MiB, low 2.55 MiB: one 2 MiB blob fits, two do not.
    let store = capped(dir.path(), 3 * MIB as u64);
    let blobs = populate(&store, 1, 2 * MIB);
    let _pin = store.open_blob(&blobs[0].0).unwrap().unwrap();

    // A put over the cap evicts the only unpinned blob: itself.
    let more = data(2 * MIB, 400);
    let dm = sha256(&more);
    store.put(&dm, &more, None).unwrap();
    assert!(store.contains(&blobs[0].0));
    assert!(!store.contains(&dm));

    // A committing ingest protects its own blob until it returns.
    let mut ing = store.ingest(&dm).unwrap();
    ing.write(&more).unwrap();
    let ((), logs) = capture_logs(|| ing.commit(None, None).unwrap());
    assert!(store.contains(&blobs[0].0));
    assert!(store.contains(&dm));
    assert!(logs.contains("still above its low watermark"), "{logs}");
    // Once released, the next pass brings usage down.
    drop(_pin);
    let report = store.evict_if_needed().unwrap();
    assert_eq!(report.evicted, 1);
    assert_eq!(report.freed, 2 * MIB as u64);
}

#[test]
fn access_times_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = {
        let store = open(dir.path());
        let blobs = populate(&store, 2, 2 * MIB);
        drop(store.open_blob(&blobs[0].0).unwrap());
        store.flush().unwrap();
        blobs
    };
    // Reopen with a cap that holds one blob: the least recent (blob 1) goes.
    let store = capped(dir.path(), 3 * MIB as u64);
    assert!(store.contains(&blobs[0].0));
    assert!(!store.contains(&blobs[1].0));
}

#[test]
fn disk_percent_cap_and_config_validation() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.max_disk_percent = Some(50.0);
    let store = Store::open(cfg.clone()).unwrap();
    let cap = store.usage().cap.expect("cap from filesystem size");
    assert!(cap > 0);
    drop(store);
    cfg.max_bytes = Some(1234);
    assert_eq!(Store::open(cfg.clone()).unwrap().usage().cap, Some(1234));

    for (low, high) in [(0.9, 0.8), (0.0, 0.5), (0.5, 1.5), (f64::NAN, 0.9)] {
        let mut bad = config(dir.path());
        bad.low_watermark = low;
        bad.high_watermark = high;
        assert!(matches!(Store::open(bad), Err(StoreError::Config(_))));
    }
    let mut bad = config(dir.path());
    bad.max_disk_percent = Some(101.0);
    assert!(matches!(Store::open(bad), Err(StoreError::Config(_))));
}

#[test]
fn second_store_on_same_root_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let err = Store::open(config(dir.path())).unwrap_err();
    assert!(matches!(err, StoreError::Index { .. }), "{err:?}");
    // The live index was not moved aside.
    assert!(store.root().join("index.redb").exists());
    drop(store);
}

#[test]
fn tag_cache_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(
        store.tag_get("docker.io", "library/alpine", "3").unwrap(),
        None
    );
    let rec = TagRecord {
        digest: sha256(b"manifest"),
        media_type: "application/vnd.oci.image.index.v1+json".into(),
        size: 8,
        fetched_unix_ms: 1_700_000_000_000,
    };
    store
        .tag_put("docker.io", "library/alpine", "3", &rec)
        .unwrap();
    assert_eq!(
        store.tag_get("docker.io", "library/alpine", "3").unwrap(),
        Some(rec.clone())
    );
    assert_eq!(
        store.tag_get("docker.io", "library/alpine", "4").unwrap(),
        None
    );
    assert_eq!(
        store.tag_get("ghcr.io", "library/alpine", "3").unwrap(),
        None
    );
    store.flush().unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(
        store.tag_get("docker.io", "library/alpine", "3").unwrap(),
        Some(rec)
    );
}
