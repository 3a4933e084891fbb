//! See `ferry_tests::decoders::http_connect`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_tests::decoders::http_connect(data));
