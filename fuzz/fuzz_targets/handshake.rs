//! See `ferry_tests::decoders::handshake`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_tests::decoders::handshake(data));
