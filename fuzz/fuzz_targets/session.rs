//! See `ferry_tests::decoders::session`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_tests::decoders::session(data));
