//! Noise handshakes and in-place transport sealing: the pure parts live in
//! `ferry_circuit::crypto` (the circuit core uses them); what needs the
//! operating system's RNG is here.

pub use ferry_circuit::crypto::*;

/// A fresh X25519 key pair: (private, public).
pub fn generate_static_keypair() -> ([u8; 32], [u8; 32]) {
    let kp = snow::Builder::new(LINK_PATTERN.parse().expect("valid built-in Noise pattern"))
        .generate_keypair()
        .expect("key generation with the OS RNG");
    let mut private = [0u8; 32];
    let mut public = [0u8; 32];
    private.copy_from_slice(&kp.private);
    public.copy_from_slice(&kp.public);
    (private, public)
}
