//! See `ferry_tests::decoders::signed`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_tests::decoders::signed(data));
