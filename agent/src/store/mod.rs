//! Content-addressed blob store: files named by digest, a redb index that is never the source of truth.
