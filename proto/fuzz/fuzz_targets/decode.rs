//! Fuzz target: arbitrary bytes into every channel's frame decoder (see
//! `shoal_proto::wire::check_decoder_invariants` for the properties checked).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    shoal_proto::wire::check_decoder_invariants(data);
});
