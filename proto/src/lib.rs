//! Shoal's shared vocabulary: digests, references, the registry API surface, byte ranges and
//! piece geometry. This crate does no IO: no tokio, sockets, clock or files.

pub mod api;
pub mod digest;
pub mod piece;
pub mod range;
pub mod reference;

pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use reference::{ManifestRef, Reference, ReferenceError, RegistryHost, RepoName, Tag};
