//! Shoal node agent: a local pull-through registry mirror with a content-addressed store.

pub mod store;
pub mod upstream;
