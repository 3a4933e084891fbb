//! See `ferry_tests::decoders::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_tests::decoders::config(data));
