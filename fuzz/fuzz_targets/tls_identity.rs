//! Fuzz target `tls_identity`: the body is `keyward::fuzzing::tls_identity`, replayed over the corpus by
//! tests/fuzz_corpus.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyward::fuzzing::tls_identity(data));
