//! What the authority signs and the mesh passes around: adverts (with the
//! certificate inside), certificates, revocations and rulings, checked as a
//! node checks them (decoding, bounds, signatures, terms).
#![no_main]

use ferry_node::authority::Authority;
use ferry_router::NodeId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let public = hex::encode(key.verifying_key().to_bytes());
    let authority = Authority::new(&[public], 1).unwrap();
    let now = 1_800_000_000_000;
    let _ = ferry_node::directory::verify_advert(data, now);
    let _ = authority.verify_cert(data, &NodeId([1; 32]), now);
    let _ = authority.verify_revocation(data);
    let _ = authority.verify(data, Some(now));
});
