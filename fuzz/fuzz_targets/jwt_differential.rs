//! Fuzz target `jwt_differential`: the body is `keyward::fuzzing::jwt_differential`, replayed over the corpus by
//! tests/fuzz_corpus.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyward::fuzzing::jwt_differential(data));
