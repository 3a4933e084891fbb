//! What the circuit core's integration tests share.

use ferry_circuit::crypto;

/// A pair of matching transport sessions, from a real NK handshake.
pub fn keys() -> (crypto::Session, crypto::Session) {
    let kp = snow::Builder::new(crypto::HOP_PATTERN.parse().unwrap())
        .generate_keypair()
        .unwrap();
    let private: [u8; 32] = kp.private.try_into().unwrap();
    let public: [u8; 32] = kp.public.try_into().unwrap();
    let id = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let mut i = crypto::hop_initiator(&public).unwrap();
    let m1 = crypto::write_hs(&mut i).unwrap();
    let (exit, m2) = crypto::hop_respond(&[crypto::StaticKey::new(private)], &id, &m1).unwrap();
    crypto::read_hs(&mut i, &m2).unwrap();
    (crypto::Session::from_handshake(i).unwrap(), exit)
}
