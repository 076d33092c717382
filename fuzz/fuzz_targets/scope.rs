//! Fuzz target `scope`: the body is `keyward::fuzzing::scope`, replayed over the corpus by
//! tests/fuzz_corpus.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyward::fuzzing::scope(data));
