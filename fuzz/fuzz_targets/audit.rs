//! Fuzz target `audit`: the body is `keyward::fuzzing::audit`, replayed over the corpus by
//! tests/fuzz_corpus.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyward::fuzzing::audit(data));
