//! Fuzz target `eip712`: the body is `keyward::fuzzing::eip712`, replayed over the corpus by
//! tests/fuzz_corpus.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyward::fuzzing::eip712(data));
