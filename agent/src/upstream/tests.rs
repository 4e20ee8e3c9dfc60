//! Integration tests for the upstream client.
