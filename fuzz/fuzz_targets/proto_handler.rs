//! Fuzz target `proto_handler`: the body is `keyward::fuzzing::proto_handler` (request bytes
//! through the real gRPC services of a daemon started in-process), replayed over the corpus by
//! tests/fuzz_corpus.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyward::fuzzing::proto_handler(data));
