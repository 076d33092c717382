//! Fuzz target `eth_recover`: the body is `keyward::fuzzing::eth_recover`, replayed over the corpus by
//! tests/fuzz_corpus.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyward::fuzzing::eth_recover(data));
