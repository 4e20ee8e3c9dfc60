//! Unit tests for piece ingest: out-of-order writes, readers, crash resume, verification at
//! commit, sweep.

use std::fs;
use std::os::unix::fs::FileExt;

use shoal_proto::digest::Digest;
use shoal_proto::manifest::{PieceHasher, piece_hash};
use shoal_proto::piece::Geometry;

use super::*;

const KIB: usize = 1024;
const PL: usize = 256 * KIB;

fn open(dir: &Path) -> Store {
    Store::open(StoreConfig::new(dir.join("store"))).unwrap()
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut r = shoal_proto::rng::Rng::new(seed);
    (0..len).map(|_| r.next_u64() as u8).collect()
}

struct Blob {
    bytes: Vec<u8>,
    digest: Digest,
    g: Geometry,
}

impl Blob {
    fn new(len: usize, seed: u64) -> Blob {
        let bytes = data(len, seed);
        Blob {
            digest: Digest::sha256_of(&bytes),
            g: Geometry::for_size(len as u64),
            bytes,
        }
    }
    fn piece(&self, i: u32) -> &[u8] {
        let r = self.g.range(i).unwrap();
        &self.bytes[r.start as usize..r.end as usize]
    }
}

fn read_blob(store: &Store, d: &Digest) -> Vec<u8> {
    let blob = store.open_blob(d).unwrap().expect("blob present");
    let mut out = vec![0; blob.size as usize];
    blob.file.read_exact_at(&mut out, 0).unwrap();
    out
}

#[test]
fn piece_ingest_is_thread_safe() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<PieceIngest>();
}

#[test]
fn out_of_order_pieces_commit_with_an_anchored_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let blob = Blob::new(5 * PL - 777, 1);
    let ing = store.piece_ingest(&blob.digest).unwrap();
    ing.set_geometry(blob.g).unwrap();
    assert!(ing.set_geometry(blob.g).is_ok(), "idempotent");
    assert!(
        ing.set_geometry(Geometry::for_size(1)).is_err(),
        "a contradicting geometry is refused"
    );
    assert_eq!(ing.prefix_bytes(), 0);
    for i in [4, 2, 0] {
        ing.write_piece(i, blob.piece(i)).unwrap();
    }
    // Readers: peers see every held piece, local clients the contiguous prefix only.
    assert_eq!(ing.prefix_bytes(), PL as u64);
    assert_eq!(ing.read_piece(2).unwrap().as_deref(), Some(blob.piece(2)));
    assert_eq!(ing.read_piece(1).unwrap(), None, "not held: not readable");
    assert_eq!(ing.hash_prefix().unwrap(), PL as u64);
    // Missing pieces: no commit, nothing lost.
    assert!(matches!(
        ing.commit(None),
        Err(StoreError::SizeMismatch { .. })
    ));
    ing.write_piece(3, blob.piece(3)).unwrap();
    ing.write_piece(1, blob.piece(1)).unwrap();
    assert_eq!(ing.prefix_bytes(), blob.bytes.len() as u64);
    assert!(ing.held().is_complete());
    // Wrong length and out-of-range indexes are refused without touching the file.
    assert!(ing.write_piece(1, &blob.piece(1)[1..]).is_err());
    assert!(ing.write_piece(9, b"x").is_err());
    let manifest = ing.commit(Some("application/x")).unwrap();
    let mut want = PieceHasher::new(blob.bytes.len() as u64, blob.digest.algorithm()).unwrap();
    want.update(&blob.bytes).unwrap();
    assert_eq!(manifest, want.finish(&blob.digest).unwrap());
    assert_eq!(manifest.hash(3), Some(&piece_hash(blob.piece(3))));
    drop(ing);
    assert_eq!(read_blob(&store, &blob.digest), blob.bytes);
    assert_eq!(
        store.media_type(&blob.digest).as_deref(),
        Some("application/x")
    );
    assert!(store.inner.index.piece_keys().unwrap().is_empty());
    assert!(
        fs::read_dir(store.root().join("ingest"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn a_bad_piece_is_never_committed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let blob = Blob::new(3 * PL, 2);
    let ing = store.piece_ingest(&blob.digest).unwrap();
    ing.set_geometry(blob.g).unwrap();
    ing.write_piece(0, blob.piece(0)).unwrap();
    // A caller that failed to verify: bytes of the right length, wrong content.
    let mut bad = blob.piece(1).to_vec();
    bad[100] ^= 1;
    ing.write_piece(1, &bad).unwrap();
    ing.write_piece(2, blob.piece(2)).unwrap();
    assert!(matches!(
        ing.commit(None),
        Err(StoreError::DigestMismatch { .. })
    ));
    assert!(!store.contains(&blob.digest));
    assert_eq!(
        ing.read_piece(0).unwrap(),
        None,
        "discarded: nothing readable"
    );
    assert!(ing.write_piece(0, blob.piece(0)).is_err(), "finished");
    drop(ing);
    assert!(
        fs::read_dir(store.root().join("ingest"))
            .unwrap()
            .next()
            .is_none()
    );
    // The next attempt starts clean and succeeds.
    let ing = store.piece_ingest(&blob.digest).unwrap();
    ing.set_geometry(blob.g).unwrap();
    assert!(ing.candidates().is_empty());
    for i in 0..3 {
        ing.write_piece(i, blob.piece(i)).unwrap();
    }
    ing.commit(None).unwrap();
    assert_eq!(read_blob(&store, &blob.digest), blob.bytes);
}

#[test]
fn a_discarded_piece_rewinds_the_prefix_hash() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let blob = Blob::new(3 * PL + 5, 3);
    let ing = store.piece_ingest(&blob.digest).unwrap();
    ing.set_geometry(blob.g).unwrap();
    // Piece 0 first arrives wrong (it matched a lying provisional hash) and is hashed into
    // the prefix.
    ing.write_piece(0, &vec![0u8; PL]).unwrap();
    ing.write_piece(1, blob.piece(1)).unwrap();
    assert_eq!(ing.hash_prefix().unwrap(), 2 * PL as u64);
    ing.discard_piece(0);
    assert!(!ing.is_held(0));
    assert_eq!(ing.prefix_bytes(), 0);
    assert_eq!(ing.read_piece(0).unwrap(), None);
    for i in [0, 2, 3] {
        ing.write_piece(i, blob.piece(i)).unwrap();
    }
    ing.commit(None).unwrap();
    assert_eq!(read_blob(&store, &blob.digest), blob.bytes);
}

#[test]
fn crash_resume_offers_recorded_pieces_as_candidates_only() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::new(6 * PL - 1, 4);
    let path = {
        let store = open(dir.path());
        let ing = store.piece_ingest(&blob.digest).unwrap();
        ing.set_geometry(blob.g).unwrap();
        ing.write_piece(1, blob.piece(1)).unwrap();
        ing.write_piece(4, blob.piece(4)).unwrap();
        ing.checkpoint().unwrap();
        // Written after the checkpoint: not recorded, so fetched again after a crash.
        ing.write_piece(2, blob.piece(2)).unwrap();
        let path = ing.path().to_owned();
        drop(ing);
        drop(store);
        path
    };
    // A crash may corrupt what was on disk (here: a recorded piece, and an unrecorded one).
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"garbage", 4 * PL as u64).unwrap();
    drop(f);

    let store = open(dir.path());
    assert!(
        path.exists(),
        "a recorded piece file survives the open sweep"
    );
    assert_eq!(store.sweep_ingest().unwrap(), 0);
    let ing = store.piece_ingest(&blob.digest).unwrap();
    assert!(ing.candidates().is_empty(), "nothing before the geometry");
    ing.set_geometry(blob.g).unwrap();
    assert_eq!(ing.candidates(), vec![1, 4]);
    assert_eq!(ing.read_piece(1).unwrap(), None, "candidates are not held");
    // The caller re-verifies candidates against hashes it trusts.
    for i in ing.candidates() {
        let on_disk = ing.read_unverified(i).unwrap();
        if on_disk == blob.piece(i) {
            ing.accept_candidate(i);
        }
    }
    assert!(ing.is_held(1) && !ing.is_held(4) && !ing.is_held(2));
    for i in [0, 2, 3, 4, 5] {
        ing.write_piece(i, blob.piece(i)).unwrap();
    }
    ing.commit(None).unwrap();
    drop(ing);
    assert_eq!(read_blob(&store, &blob.digest), blob.bytes);
    assert!(store.inner.index.piece_keys().unwrap().is_empty());
}

#[test]
fn a_record_for_another_geometry_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::new(2 * PL, 5);
    let store = open(dir.path());
    {
        let ing = store.piece_ingest(&blob.digest).unwrap();
        ing.set_geometry(Geometry::for_size(3 * PL as u64)).unwrap();
        ing.write_piece(0, blob.piece(0)).unwrap();
        ing.checkpoint().unwrap();
    }
    let ing = store.piece_ingest(&blob.digest).unwrap();
    ing.set_geometry(blob.g).unwrap();
    assert!(ing.candidates().is_empty());
    assert_eq!(
        fs::metadata(ing.path()).unwrap().len(),
        2 * PL as u64,
        "resized to the blob"
    );
    assert!(
        store
            .inner
            .index
            .piece_record(&blob.digest)
            .unwrap()
            .is_none()
    );
}

#[test]
fn piece_and_append_ingest_are_exclusive_and_replace_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let blob = Blob::new(2 * PL, 6);
    {
        let mut ing = store.ingest(&blob.digest).unwrap();
        ing.write(&blob.bytes[..1000]).unwrap();
        ing.checkpoint().unwrap();
        let p = store.piece_ingest(&blob.digest);
        assert!(matches!(p, Err(StoreError::Busy(_))));
    }
    let ing = store.piece_ingest(&blob.digest).unwrap();
    assert!(matches!(
        store.ingest(&blob.digest),
        Err(StoreError::Busy(_))
    ));
    ing.set_geometry(blob.g).unwrap();
    ing.write_piece(1, blob.piece(1)).unwrap();
    ing.checkpoint().unwrap();
    // The append-mode partial is gone: one partial copy per digest.
    let names: Vec<String> = fs::read_dir(store.root().join("ingest"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![format!("sha256-{}.pieces", blob.digest.hex())]);
    assert!(store.inner.index.ingest_records().unwrap().is_empty());
    drop(ing);
    // And the other way round.
    let ing = store.ingest(&blob.digest).unwrap();
    assert_eq!(ing.offset(), 0);
    assert!(store.inner.index.piece_keys().unwrap().is_empty());
    assert!(
        !store
            .root()
            .join("ingest")
            .join(format!("sha256-{}.pieces", blob.digest.hex()))
            .exists()
    );
}

#[test]
fn sweep_removes_unrecorded_and_expired_piece_files_but_not_live_ones() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::new(2 * PL, 7);
    let other = Blob::new(PL, 8);
    let store = open(dir.path());
    let live = store.piece_ingest(&blob.digest).unwrap();
    live.set_geometry(blob.g).unwrap();
    {
        // Written but never checkpointed: not resumable.
        let ing = store.piece_ingest(&other.digest).unwrap();
        ing.set_geometry(other.g).unwrap();
        ing.write_piece(0, other.piece(0)).unwrap();
    }
    // A stray record without a file.
    store
        .inner
        .index
        .set_piece_record(
            &Digest::sha256_of(b"gone"),
            &index::PieceRecord {
                size: 1,
                piece_len: PL as u64,
                bitmap: vec![1],
            },
        )
        .unwrap();
    assert_eq!(store.sweep_ingest().unwrap(), 1);
    assert!(live.path().exists());
    assert!(store.inner.index.piece_keys().unwrap().is_empty());
    live.abandon();
    assert!(!live.path().exists());
}

#[test]
fn the_empty_blob_commits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let d = Digest::sha256_of(b"");
    let ing = store.piece_ingest(&d).unwrap();
    ing.set_geometry(Geometry::for_size(0)).unwrap();
    assert!(ing.held().is_complete());
    let m = ing.commit(None).unwrap();
    assert_eq!(m.count(), 0);
    drop(ing);
    assert!(store.contains(&d));
}
