//! The HTTP CONNECT entry's request head.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferry_node::http_proxy::parse_head(data);
});
