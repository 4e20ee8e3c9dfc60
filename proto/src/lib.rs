//! Shoal wire types and parsers.
