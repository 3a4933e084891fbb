//! Handshake messages a stranger can send: a link's message 1 (Noise IK,
//! with the current key and a retiring one), a hop's CREATE (Noise NK),
//! and identity proofs.
#![no_main]

use ferry_node::crypto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let identity = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let private = [7u8; 32];
    if let Ok(mut hs) = crypto::link_responder(&private) {
        let _ = crypto::read_hs(&mut hs, data);
    }
    let _ = crypto::hop_respond(&[private, [8; 32]], &identity, data);
    let _ = crypto::check_proof(data, crypto::LINK_INITIATOR_PROOF, &[1; 32], None);
});
