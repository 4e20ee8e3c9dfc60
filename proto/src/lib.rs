//! Shoal's shared vocabulary: digests, references, the registry API surface, byte ranges,
//! piece geometry and manifests, the wire protocol, and the tracker and swarm state machines.
//! This crate does no IO: no tokio, sockets, clock or files; time and randomness come in as
//! arguments or seeds.

pub mod api;
pub mod digest;
pub mod enroll;
pub mod manifest;
pub mod msg;
pub mod piece;
pub mod range;
pub mod reference;
pub mod rng;
pub mod swarm;
pub mod time;
pub mod tracker;
pub mod wire;

pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use reference::{ManifestRef, Reference, ReferenceError, RegistryHost, RepoName, Tag};
