//! Fuzz target `jws`: the body is `keyward::fuzzing::jws`, replayed over the corpus by
//! tests/fuzz_corpus.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyward::fuzzing::jws(data));
