//! Content digests (`sha256:<64 hex>`, `sha512:<128 hex>`): parsed once at the edge, never
//! re-validated.
//!
//! Only the two algorithms the OCI image spec registers are accepted, in canonical form
//! (lower-case hex of the exact length). Anything else is a typed error, so a digest that made
//! it into a [`Digest`] is safe to use as a file name.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Digest as _;

/// A hash algorithm a [`Digest`] may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    /// The algorithm's name as written in a digest string and in the store's path.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length in bytes of the raw hash.
    pub fn output_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 32,
            Algorithm::Sha512 => 64,
        }
    }

    fn from_name(name: &str) -> Option<Algorithm> {
        match name {
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a digest.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest has no ':' separating algorithm and hex")]
    MissingSeparator,
    #[error("unsupported digest algorithm (only sha256 and sha512 are accepted)")]
    UnsupportedAlgorithm,
    #[error("{algorithm} digest must have {expected} hex characters, found {found}")]
    WrongLength {
        algorithm: Algorithm,
        expected: usize,
        found: usize,
    },
    #[error("digest hex must be lower-case 0-9a-f")]
    InvalidHex,
}

/// A validated content digest. The algorithm is part of identity: a sha512 digest never
/// equals a sha256 one, whatever the bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    /// Raw hash bytes; exactly `algorithm.output_len()` long.
    bytes: Box<[u8]>,
}

impl Digest {
    /// Parses `alg:hex` in canonical form.
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let (alg, hex_part) = s.split_once(':').ok_or(DigestError::MissingSeparator)?;
        let algorithm = Algorithm::from_name(alg).ok_or(DigestError::UnsupportedAlgorithm)?;
        let expected = algorithm.output_len() * 2;
        if hex_part.len() != expected {
            return Err(DigestError::WrongLength {
                algorithm,
                expected,
                found: hex_part.len(),
            });
        }
        if !hex_part
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::InvalidHex);
        }
        let bytes = hex::decode(hex_part).map_err(|_| DigestError::InvalidHex)?;
        Ok(Digest {
            algorithm,
            bytes: bytes.into_boxed_slice(),
        })
    }

    /// Builds a digest from raw hash bytes; `None` when the length does not fit the algorithm.
    pub fn from_bytes(algorithm: Algorithm, bytes: &[u8]) -> Option<Digest> {
        (bytes.len() == algorithm.output_len()).then(|| Digest {
            algorithm,
            bytes: bytes.into(),
        })
    }

    /// The sha256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Digest {
        let mut h = Hasher::new(Algorithm::Sha256);
        h.update(data);
        h.finish()
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Lower-case hex of the hash, without the algorithm prefix.
    pub fn hex(&self) -> String {
        hex::encode(&self.bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// A hasher for the same algorithm, to verify content against this digest.
    pub fn hasher(&self) -> Hasher {
        Hasher::new(self.algorithm)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Incremental hashing for either algorithm.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hasher::Sha256(_) => "Hasher(sha256)",
            Hasher::Sha512(_) => "Hasher(sha512)",
        })
    }
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Digest {
        let (algorithm, bytes): (Algorithm, Box<[u8]>) = match self {
            Hasher::Sha256(h) => (Algorithm::Sha256, h.finalize().as_slice().into()),
            Hasher::Sha512(h) => (Algorithm::Sha512, h.finalize().as_slice().into()),
        };
        Digest { algorithm, bytes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_canonical_sha256_and_round_trips() {
        let d = Digest::parse(EMPTY_SHA256).unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.to_string(), EMPTY_SHA256);
        assert_eq!(Digest::sha256_of(b""), d);
    }

    #[test]
    fn parses_sha512() {
        let s = format!("sha512:{}", "ab".repeat(64));
        let d = Digest::parse(&s).unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha512);
        assert_eq!(d.to_string(), s);
    }

    #[test]
    fn sha512_never_aliases_sha256() {
        // Same leading hex, different algorithms: never equal, never the same path.
        let a = Digest::parse(&format!("sha256:{}", "0".repeat(64))).unwrap();
        let b = Digest::parse(&format!("sha512:{}", "0".repeat(128))).unwrap();
        assert_ne!(a, b);
        let mut h = Hasher::new(Algorithm::Sha512);
        h.update(b"");
        let e512 = h.finish();
        assert_eq!(e512.algorithm(), Algorithm::Sha512);
        assert_ne!(e512.hex()[..64], Digest::sha256_of(b"").hex());
    }

    #[test]
    fn rejects_hostile_and_malformed_digests() {
        let cases: &[(&str, DigestError)] = &[
            ("", DigestError::MissingSeparator),
            ("sha256", DigestError::MissingSeparator),
            (
                &format!("md5:{}", "a".repeat(32)),
                DigestError::UnsupportedAlgorithm,
            ),
            (
                &format!("SHA256:{}", "a".repeat(64)),
                DigestError::UnsupportedAlgorithm,
            ),
            (
                &format!("sha256:{}", "A".repeat(64)),
                DigestError::InvalidHex,
            ),
            (
                &format!("sha256:{}", "g".repeat(64)),
                DigestError::InvalidHex,
            ),
            (
                &format!("sha256:{}/../{}", "a".repeat(30), "b".repeat(30)),
                DigestError::InvalidHex,
            ),
            (
                &format!("sha256:{}\0{}", "a".repeat(32), "b".repeat(31)),
                DigestError::InvalidHex,
            ),
            (
                &format!("sha256:{}", "a".repeat(63)),
                DigestError::WrongLength {
                    algorithm: Algorithm::Sha256,
                    expected: 64,
                    found: 63,
                },
            ),
            (
                &format!("sha256:{}", "a".repeat(65)),
                DigestError::WrongLength {
                    algorithm: Algorithm::Sha256,
                    expected: 64,
                    found: 65,
                },
            ),
            (
                &format!("sha512:{}", "a".repeat(64)),
                DigestError::WrongLength {
                    algorithm: Algorithm::Sha512,
                    expected: 128,
                    found: 64,
                },
            ),
            (
                "sha256:../../etc/passwd",
                DigestError::WrongLength {
                    algorithm: Algorithm::Sha256,
                    expected: 64,
                    found: 16,
                },
            ),
            (
                &format!("sha256+b64:{}", "a".repeat(64)),
                DigestError::UnsupportedAlgorithm,
            ),
        ];
        for (input, want) in cases {
            assert_eq!(Digest::parse(input).as_ref(), Err(want), "input {input:?}");
        }
    }

    #[test]
    fn multibyte_utf8_never_panics() {
        // 64 bytes but not 64 chars: must be rejected without slicing inside a code point.
        let s = format!("sha256:{}é", "a".repeat(62));
        assert!(Digest::parse(&s).is_err());
    }

    #[test]
    fn serde_round_trip_validates() {
        let d = Digest::parse(EMPTY_SHA256).unwrap();
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{EMPTY_SHA256}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"sha256:abc\"").is_err());
    }
}
