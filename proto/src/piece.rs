//! Piece geometry: how a blob is cut into pieces, piece ranges, and piece bitmaps.
//!
//! Piece length depends on blob size, `clamp(next_power_of_two(ceil(size / 128)), 256 KiB,
//! 16 MiB)`, so small layers still have enough pieces to swarm and huge layers stay under
//! about a thousand pieces.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeTuple, Serializer};
use serde::{Deserialize, Serialize};

pub const MIN_PIECE_LEN: u64 = 256 * 1024;
pub const MAX_PIECE_LEN: u64 = 16 * 1024 * 1024;
/// The number of pieces a blob is cut into when the piece length is not clamped.
pub const TARGET_PIECES: u64 = 128;
/// Most pieces a blob may have to be shared between peers: 256 GiB at the largest piece length.
/// Bitmaps and piece manifests on the wire are bounded by it (a manifest is then at most
/// 512 KiB of hashes); larger blobs are fetched from the origin only.
pub const MAX_PIECES: u32 = 16 * 1024;

/// Piece length for a blob of `size` bytes.
pub fn piece_len(size: u64) -> u64 {
    let per_piece = size.div_ceil(TARGET_PIECES).max(1);
    // next_power_of_two would overflow only above 2^63 bytes; clamp first.
    per_piece
        .min(MAX_PIECE_LEN)
        .next_power_of_two()
        .clamp(MIN_PIECE_LEN, MAX_PIECE_LEN)
}

/// How a blob of a given size is cut into pieces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Geometry {
    size: u64,
    piece_len: u64,
}

impl Geometry {
    /// The geometry DESIGN.md prescribes for a blob of `size` bytes.
    pub fn for_size(size: u64) -> Geometry {
        Geometry {
            size,
            piece_len: piece_len(size),
        }
    }

    /// A geometry with an explicit piece length (as received in a piece manifest); `None`
    /// when the length is zero or not a power of two within bounds.
    pub fn with_piece_len(size: u64, piece_len: u64) -> Option<Geometry> {
        let ok =
            piece_len.is_power_of_two() && (MIN_PIECE_LEN..=MAX_PIECE_LEN).contains(&piece_len);
        ok.then_some(Geometry { size, piece_len })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn piece_len(&self) -> u64 {
        self.piece_len
    }

    /// Number of pieces; zero for an empty blob.
    pub fn count(&self) -> u32 {
        // piece_len >= 256 KiB, so even a 2^64-byte blob has fewer than 2^46 pieces; blobs in
        // practice have < 2^20. Saturate rather than wrap for absurd sizes.
        u32::try_from(self.size.div_ceil(self.piece_len)).unwrap_or(u32::MAX)
    }

    /// Byte range `[start, end)` of piece `index`, or `None` past the end.
    pub fn range(&self, index: u32) -> Option<std::ops::Range<u64>> {
        if index >= self.count() {
            return None;
        }
        let start = u64::from(index) * self.piece_len;
        let end = (start + self.piece_len).min(self.size);
        Some(start..end)
    }

    /// The piece holding byte `offset`, or `None` past the end.
    pub fn piece_at(&self, offset: u64) -> Option<u32> {
        (offset < self.size).then(|| (offset / self.piece_len) as u32)
    }
}

/// Which pieces of a blob are present.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Bitmap {
    bits: Vec<u64>,
    len: u32,
}

impl Bitmap {
    pub fn new(len: u32) -> Bitmap {
        Bitmap {
            bits: vec![0; (len as usize).div_ceil(64)],
            len,
        }
    }

    pub fn full(len: u32) -> Bitmap {
        let mut b = Bitmap::new(len);
        for i in 0..len {
            b.set(i);
        }
        b
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether piece `i` is present; `false` past the end.
    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Marks piece `i` present; ignored past the end.
    pub fn set(&mut self, i: u32) {
        if i < self.len {
            self.bits[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    pub fn clear(&mut self, i: u32) {
        if i < self.len {
            self.bits[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }

    pub fn count_ones(&self) -> u32 {
        self.bits.iter().map(|w| w.count_ones()).sum()
    }

    pub fn is_complete(&self) -> bool {
        self.count_ones() == self.len
    }

    /// Indexes of the present pieces, ascending.
    pub fn ones(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|&i| self.get(i))
    }

    /// Number of leading present pieces: how far a sequential reader can go.
    pub fn prefix_len(&self) -> u32 {
        self.next_missing(0)
    }

    /// The first absent piece at or after `from`, or `len()` when there is none.
    pub fn next_missing(&self, from: u32) -> u32 {
        let mut i = from;
        while i < self.len {
            let word = self.bits[(i / 64) as usize] | ((1u64 << (i % 64)) - 1);
            if word != u64::MAX {
                return ((i / 64) * 64 + (!word).trailing_zeros()).min(self.len);
            }
            i = (i / 64 + 1) * 64;
        }
        self.len
    }

    /// The bits as 64-bit words, piece `i` at bit `i % 64` of word `i / 64`; bits past `len`
    /// are zero. For word-at-a-time set operations.
    pub fn words(&self) -> &[u64] {
        &self.bits
    }

    /// Little-endian bit order, `ceil(len / 8)` bytes: bit `i` is `bytes[i / 8] >> (i % 8)`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = (self.len as usize).div_ceil(8);
        self.bits
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .take(n)
            .collect()
    }

    /// The inverse of [`Bitmap::to_bytes`]. `None` unless `bytes` has exactly `ceil(len / 8)`
    /// bytes, `len <= MAX_PIECES`, and the padding bits past `len` are zero (so every bitmap
    /// has one encoding and `count_ones` never counts phantom pieces).
    pub fn from_bytes(len: u32, bytes: &[u8]) -> Option<Bitmap> {
        if len > MAX_PIECES || bytes.len() != (len as usize).div_ceil(8) {
            return None;
        }
        let mut b = Bitmap::new(len);
        for (w, chunk) in b.bits.iter_mut().zip(bytes.chunks(8)) {
            let mut le = [0u8; 8];
            le[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_le_bytes(le);
        }
        let tail = len % 64;
        if tail != 0 && b.bits.last().is_some_and(|&w| w >> tail != 0) {
            return None;
        }
        Some(b)
    }
}

/// On the wire: `(len: u32, bytes)` as [`Bitmap::to_bytes`] lays them out.
impl Serialize for Bitmap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Raw<'a>(&'a [u8]);
        impl Serialize for Raw<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(self.0)
            }
        }
        let mut t = s.serialize_tuple(2)?;
        t.serialize_element(&self.len)?;
        t.serialize_element(&Raw(&self.to_bytes()))?;
        t.end()
    }
}

impl<'de> Deserialize<'de> for Bitmap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct BitmapVisitor;
        impl<'de> Visitor<'de> for BitmapVisitor {
            type Value = Bitmap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a piece bitmap (length, bytes)")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bitmap, A::Error> {
                let len: u32 = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                if len > MAX_PIECES {
                    return Err(de::Error::custom("bitmap longer than MAX_PIECES"));
                }
                let bytes: crate::msg::BoundedBytes<{ MAX_PIECES as usize / 8 }> = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                Bitmap::from_bytes(len, &bytes.0)
                    .ok_or_else(|| de::Error::custom("bitmap bytes do not match its length"))
            }
        }
        d.deserialize_tuple(2, BitmapVisitor)
    }
}

impl fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bitmap({}/{})", self.count_ones(), self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn piece_len_follows_design() {
        assert_eq!(piece_len(0), MIN_PIECE_LEN);
        assert_eq!(piece_len(1), MIN_PIECE_LEN);
        assert_eq!(piece_len(32 * MIB), MIN_PIECE_LEN); // 32 MiB / 128 = 256 KiB
        assert_eq!(piece_len(32 * MIB + 1), 512 * 1024);
        assert_eq!(piece_len(100 * MIB), MIB); // ceil(100/128 MiB) -> 1 MiB
        assert_eq!(piece_len(2048 * MIB), MAX_PIECE_LEN);
        assert_eq!(piece_len(100 * 1024 * MIB), MAX_PIECE_LEN);
        assert_eq!(piece_len(u64::MAX), MAX_PIECE_LEN);
        for size in [1, 1000, 5 * MIB, 77 * MIB + 3, 3000 * MIB] {
            let g = Geometry::for_size(size);
            assert!(g.piece_len().is_power_of_two());
            assert!(g.count() <= 1024 || g.piece_len() == MAX_PIECE_LEN);
        }
    }

    #[test]
    fn ranges_cover_the_blob_exactly() {
        for size in [0, 1, MIN_PIECE_LEN, MIN_PIECE_LEN + 1, 100 * MIB + 7] {
            let g = Geometry::for_size(size);
            let mut next = 0;
            for i in 0..g.count() {
                let r = g.range(i).unwrap();
                assert_eq!(r.start, next);
                assert!(r.end > r.start);
                assert_eq!(g.piece_at(r.start), Some(i));
                assert_eq!(g.piece_at(r.end - 1), Some(i));
                next = r.end;
            }
            assert_eq!(next, size);
            assert_eq!(g.range(g.count()), None);
            assert_eq!(g.piece_at(size), None);
        }
    }

    #[test]
    fn explicit_piece_len_is_checked() {
        assert!(Geometry::with_piece_len(10, MIN_PIECE_LEN).is_some());
        assert!(Geometry::with_piece_len(10, 0).is_none());
        assert!(Geometry::with_piece_len(10, 3 * MIN_PIECE_LEN).is_none());
        assert!(Geometry::with_piece_len(10, MAX_PIECE_LEN * 2).is_none());
    }

    #[test]
    fn bitmap() {
        let mut b = Bitmap::new(130);
        assert_eq!(b.count_ones(), 0);
        b.set(0);
        b.set(1);
        b.set(129);
        b.set(500); // ignored
        assert!(b.get(129) && !b.get(128) && !b.get(500));
        assert_eq!(b.prefix_len(), 2);
        assert_eq!(b.ones().collect::<Vec<_>>(), vec![0, 1, 129]);
        b.clear(1);
        assert_eq!(b.prefix_len(), 1);
        assert!(Bitmap::full(130).is_complete());
        assert!(Bitmap::new(0).is_complete());
    }

    #[test]
    fn next_missing_crosses_words() {
        let mut b = Bitmap::full(200);
        assert_eq!(b.next_missing(0), 200);
        b.clear(150);
        assert_eq!(b.prefix_len(), 150);
        assert_eq!(b.next_missing(151), 200);
        assert_eq!(b.next_missing(150), 150);
        assert_eq!(b.next_missing(500), 200);
        let e = Bitmap::new(70);
        assert_eq!(e.next_missing(3), 3);
        assert_eq!(e.next_missing(69), 69);
        assert_eq!(Bitmap::full(64).next_missing(0), 64);
    }

    #[test]
    fn bitmap_bytes_are_canonical() {
        let mut b = Bitmap::new(13);
        b.set(0);
        b.set(9);
        b.set(12);
        let bytes = b.to_bytes();
        assert_eq!(bytes, vec![0b0000_0001, 0b0001_0010]);
        assert_eq!(Bitmap::from_bytes(13, &bytes), Some(b));
        // Padding bit 13 set: rejected, as are wrong lengths and oversize bitmaps.
        assert_eq!(Bitmap::from_bytes(13, &[1, 0b0010_0000]), None);
        assert_eq!(Bitmap::from_bytes(13, &[1]), None);
        assert_eq!(Bitmap::from_bytes(13, &[1, 0, 0]), None);
        assert_eq!(Bitmap::from_bytes(MAX_PIECES + 1, &vec![0; 2049]), None);
        assert_eq!(Bitmap::from_bytes(0, &[]), Some(Bitmap::new(0)));
        let full = Bitmap::full(MAX_PIECES);
        assert_eq!(Bitmap::from_bytes(MAX_PIECES, &full.to_bytes()), Some(full));
    }

    #[test]
    fn bitmap_serde_round_trips_and_validates() {
        let mut b = Bitmap::new(100);
        b.set(3);
        b.set(99);
        let bytes = postcard::to_allocvec(&b).unwrap();
        assert_eq!(postcard::from_bytes::<Bitmap>(&bytes).unwrap(), b);
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<Bitmap>(&json).unwrap(), b);
        // A length beyond MAX_PIECES is refused before the bytes are read.
        let huge = postcard::to_allocvec(&(u32::MAX, 0u8)).unwrap();
        assert!(postcard::from_bytes::<Bitmap>(&huge).is_err());
        // A byte count that does not match the length.
        let bad = postcard::to_allocvec(&(16u32, 1u8, 0xffu8)).unwrap();
        assert!(postcard::from_bytes::<Bitmap>(&bad).is_err());
    }
}
