//! Link frames: the length-prefixed records a peer sends before and after
//! the handshake, however its bytes are cut into reads.
#![no_main]

use bytes::BytesMut;
use ferry_node::link::{HANDSHAKE_CODEC, TRANSPORT_CODEC};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte says how the rest is cut into reads.
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(cut).max(1);
    for codec in [HANDSHAKE_CODEC, TRANSPORT_CODEC] {
        let mut buf = BytesMut::new();
        for chunk in rest.chunks(step) {
            buf.extend_from_slice(chunk);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
        }
    }
});
