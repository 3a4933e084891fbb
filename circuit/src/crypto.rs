//! Noise handshakes (snow) and in-place transport sealing (ring).
//!
//! Handshakes use snow. After a handshake, the two transport keys are taken
//! with snow's `risky-raw-split` and used with ring's AES-256-GCM directly:
//! ring seals and opens *in place*, so a record is never copied to be
//! encrypted. The nonce is Noise's AESGCM nonce (32 zero bits, then the
//! big-endian 64-bit counter) and the associated data is empty, so every
//! record is a standard Noise transport message.
//!
//! A hop answers each CREATE with its own resolver for snow ([`HopDh`]):
//! its static key's public half is derived once, not per handshake as
//! snow's stock X25519 does, and its one-use ephemeral key is ring's, whose
//! X25519 runs BoringSSL's fiat-crypto code with ADX/BMI2 assembly where
//! the CPU has them: faster than curve25519-dalek's portable field
//! arithmetic, which snow uses (the figures are in `benches/README.md`,
//! "Circuit setup").

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};

/// The link handshake: both sides know each other's static key.
pub const LINK_PATTERN: &str = "Noise_IK_25519_AESGCM_SHA256";
/// Prologue binding link handshakes to this protocol version.
pub const LINK_PROLOGUE: &[u8] = b"ferry/link/1";
/// The per-hop circuit handshake: the origin knows the hop's static key and
/// stays anonymous to it (the link below authenticates the neighbour).
pub const HOP_PATTERN: &str = "Noise_NK_25519_AESGCM_SHA256";
/// Prologue binding circuit handshakes to this protocol version.
pub const HOP_PROLOGUE: &[u8] = b"ferry/circuit/1";
/// Length of a Noise X25519 key.
pub const KEY_LEN: usize = 32;
/// Context of the link responder's identity proof (in handshake message 2).
pub const LINK_RESPONDER_PROOF: &[u8] = b"ferry/link-responder-proof/1";
/// Context of the link initiator's identity proof (its first transport frame).
pub const LINK_INITIATOR_PROOF: &[u8] = b"ferry/link-initiator-proof/1";
/// Context of a circuit hop's identity proof (in handshake message 2).
pub const HOP_PROOF: &[u8] = b"ferry/hop-proof/1";
/// The largest encoded identity proof accepted.
pub const MAX_PROOF: usize = 128;

/// A record failed to authenticate, or the nonce ran out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// The tag did not verify: corrupted, forged, or out of order.
    #[error("record failed to authenticate")]
    BadRecord,
    /// The 64-bit nonce is exhausted; the session must end.
    #[error("nonce exhausted")]
    NonceExhausted,
    /// The handshake failed.
    #[error("noise handshake failed: {0}")]
    Handshake(String),
    /// The other side did not prove the identity it had to: no proof, a
    /// signature that does not verify, or another node's identity (a
    /// squatted Noise key).
    #[error("identity proof refused: {0}")]
    Identity(String),
}

/// Signs `context` then the handshake hash with the node's identity key:
/// proof that the holder of that key took part in this very handshake (the
/// Noise key is proven by the handshake itself). An encoded
/// `HandshakeProof`.
pub fn prove(identity: &ed25519_dalek::SigningKey, context: &[u8], hash: &[u8]) -> Vec<u8> {
    use ed25519_dalek::Signer;
    use prost::Message;
    let mut msg = context.to_vec();
    msg.extend_from_slice(hash);
    ferry_proto::pb::HandshakeProof {
        node_id: identity.verifying_key().to_bytes().to_vec(),
        signature: identity.sign(&msg).to_bytes().to_vec(),
    }
    .encode_to_vec()
}

/// Checks an identity proof over `context` then `hash`; returns the node
/// that made it. With `expected`, any other node is refused.
pub fn check_proof(
    proof: &[u8],
    context: &[u8],
    hash: &[u8],
    expected: Option<&ferry_router::NodeId>,
) -> Result<ferry_router::NodeId, CryptoError> {
    use ed25519_dalek::Verifier;
    use prost::Message;
    let bad = |s: &str| CryptoError::Identity(s.to_string());
    if proof.is_empty() {
        return Err(bad("the handshake carried no identity proof"));
    }
    if proof.len() > MAX_PROOF {
        return Err(bad("identity proof too long"));
    }
    let p = ferry_proto::pb::HandshakeProof::decode(proof)
        .map_err(|_| bad("undecodable identity proof"))?;
    let id: [u8; 32] = p
        .node_id
        .as_slice()
        .try_into()
        .map_err(|_| bad("node id is not 32 bytes"))?;
    let node = ferry_router::NodeId(id);
    if let Some(want) = expected
        && *want != node
    {
        return Err(CryptoError::Identity(format!(
            "expected node {}, the key's holder is node {}",
            want.short(),
            node.short()
        )));
    }
    let vk =
        ed25519_dalek::VerifyingKey::from_bytes(&id).map_err(|_| bad("node id is not a key"))?;
    let sig = ed25519_dalek::Signature::from_slice(&p.signature)
        .map_err(|_| bad("malformed signature"))?;
    let mut msg = context.to_vec();
    msg.extend_from_slice(hash);
    vk.verify(&msg, &sig)
        .map_err(|_| bad("the identity signature does not verify"))?;
    Ok(node)
}

fn key(raw: &[u8; 32]) -> LessSafeKey {
    // AES-256 takes any 32-byte key; this cannot fail.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, raw).expect("32-byte AES-256 key"))
}

fn nonce(n: u64) -> Nonce {
    let mut b = [0u8; 12];
    b[4..].copy_from_slice(&n.to_be_bytes());
    Nonce::assume_unique_for_key(b)
}

/// The sending half of a transport session.
pub struct Sealer {
    key: LessSafeKey,
    n: u64,
}

impl Sealer {
    /// A sealer from a raw transport key.
    pub fn new(raw: &[u8; 32]) -> Self {
        Self {
            key: key(raw),
            n: 0,
        }
    }

    /// Encrypts `buf` in place and returns the tag to append.
    pub fn seal_in_place(&mut self, buf: &mut [u8]) -> Result<Tag, CryptoError> {
        if self.n == u64::MAX {
            return Err(CryptoError::NonceExhausted);
        }
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(self.n), Aad::empty(), buf)
            .map_err(|_| CryptoError::NonceExhausted)?;
        self.n += 1;
        Ok(tag)
    }

    /// Encrypts the bytes of `buf` from `start` on, and appends the tag.
    pub fn seal_tail(&mut self, buf: &mut Vec<u8>, start: usize) -> Result<(), CryptoError> {
        let tag = self.seal_in_place(&mut buf[start..])?;
        buf.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Encrypts the bytes of `buf` from `start` on, and appends the tag.
    pub fn seal_tail_bytes(
        &mut self,
        buf: &mut bytes::BytesMut,
        start: usize,
    ) -> Result<(), CryptoError> {
        let tag = self.seal_in_place(&mut buf[start..])?;
        buf.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// The receiving half of a transport session.
pub struct Opener {
    key: LessSafeKey,
    n: u64,
}

impl Opener {
    /// An opener from a raw transport key.
    pub fn new(raw: &[u8; 32]) -> Self {
        Self {
            key: key(raw),
            n: 0,
        }
    }

    /// Decrypts `buf` (ciphertext then tag) in place; returns the plaintext
    /// length. The plaintext is `buf[..len]`.
    pub fn open_in_place(&mut self, buf: &mut [u8]) -> Result<usize, CryptoError> {
        if self.n == u64::MAX {
            return Err(CryptoError::NonceExhausted);
        }
        let len = self
            .key
            .open_in_place(nonce(self.n), Aad::empty(), buf)
            .map_err(|_| CryptoError::BadRecord)?
            .len();
        self.n += 1;
        Ok(len)
    }
}

/// Both halves of a finished handshake.
pub struct Session {
    /// Seals what we send.
    pub tx: Sealer,
    /// Opens what we receive.
    pub rx: Opener,
}

impl Session {
    /// Splits a finished handshake into transport halves.
    pub fn from_handshake(mut hs: snow::HandshakeState) -> Result<Self, CryptoError> {
        if !hs.is_handshake_finished() {
            return Err(CryptoError::Handshake("handshake not finished".into()));
        }
        let initiator = hs.is_initiator();
        let (i2r, r2i) = hs.dangerously_get_raw_split();
        let (tx, rx) = if initiator { (i2r, r2i) } else { (r2i, i2r) };
        Ok(Self {
            tx: Sealer::new(&tx),
            rx: Opener::new(&rx),
        })
    }
}

fn params(pattern: &str) -> snow::params::NoiseParams {
    pattern.parse().expect("valid built-in Noise pattern")
}

fn hs_err(e: snow::Error) -> CryptoError {
    CryptoError::Handshake(e.to_string())
}

/// Starts a link handshake as the dialer.
pub fn link_initiator(
    local_private: &[u8; 32],
    remote_public: &[u8; 32],
) -> Result<snow::HandshakeState, CryptoError> {
    snow::Builder::new(params(LINK_PATTERN))
        .local_private_key(local_private)
        .and_then(|b| b.remote_public_key(remote_public))
        .and_then(|b| b.prologue(LINK_PROLOGUE))
        .and_then(|b| b.build_initiator())
        .map_err(hs_err)
}

/// Starts a link handshake as the listener.
pub fn link_responder(local_private: &[u8; 32]) -> Result<snow::HandshakeState, CryptoError> {
    snow::Builder::new(params(LINK_PATTERN))
        .local_private_key(local_private)
        .and_then(|b| b.prologue(LINK_PROLOGUE))
        .and_then(|b| b.build_responder())
        .map_err(hs_err)
}

/// Starts a hop handshake as the circuit's origin.
pub fn hop_initiator(remote_public: &[u8; 32]) -> Result<snow::HandshakeState, CryptoError> {
    snow::Builder::new(params(HOP_PATTERN))
        .remote_public_key(remote_public)
        .and_then(|b| b.prologue(HOP_PROLOGUE))
        .and_then(|b| b.build_initiator())
        .map_err(hs_err)
}

/// A node's Noise static key with its public half, derived once (snow
/// derives it again for every handshake built with the private key alone:
/// a base-point multiplication per CREATE).
#[derive(Clone)]
pub struct StaticKey {
    private: [u8; KEY_LEN],
    public: [u8; KEY_LEN],
}

impl StaticKey {
    /// The key pair of an X25519 private key.
    pub fn new(private: [u8; KEY_LEN]) -> Self {
        let secret = x25519_dalek::StaticSecret::from(private);
        Self {
            private,
            public: x25519_dalek::PublicKey::from(&secret).to_bytes(),
        }
    }

    /// The public half.
    pub fn public(&self) -> [u8; KEY_LEN] {
        self.public
    }

    /// The private half.
    pub fn private(&self) -> [u8; KEY_LEN] {
        self.private
    }
}

/// Keys are equal when their public halves are (the private halves are
/// never compared).
impl PartialEq for StaticKey {
    fn eq(&self, other: &Self) -> bool {
        self.public == other.public
    }
}

impl Eq for StaticKey {}

impl std::fmt::Debug for StaticKey {
    /// The public half only: a private key never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let public: String = self.public[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        write!(f, "StaticKey({public}…)")
    }
}

/// snow's primitives for a hop's handshake: ring's, as snow's
/// `ring-accelerated` gives them, for hashing, AES-GCM and randomness, and
/// [`HopDh`] for X25519.
struct HopResolver {
    local: std::sync::Arc<StaticKey>,
}

impl snow::resolvers::CryptoResolver for HopResolver {
    fn resolve_rng(&self) -> Option<Box<dyn snow::types::Random>> {
        snow::resolvers::RingResolver.resolve_rng()
    }

    fn resolve_dh(&self, choice: &snow::params::DHChoice) -> Option<Box<dyn snow::types::Dh>> {
        match choice {
            snow::params::DHChoice::Curve25519 => Some(Box::new(HopDh {
                local: self.local.clone(),
                public: [0; KEY_LEN],
                secret: HopSecret::Unset,
            })),
            _ => None,
        }
    }

    fn resolve_hash(
        &self,
        choice: &snow::params::HashChoice,
    ) -> Option<Box<dyn snow::types::Hash>> {
        snow::resolvers::RingResolver.resolve_hash(choice)
    }

    fn resolve_cipher(
        &self,
        choice: &snow::params::CipherChoice,
    ) -> Option<Box<dyn snow::types::Cipher>> {
        snow::resolvers::RingResolver.resolve_cipher(choice)
    }
}

/// X25519 for a hop answering a CREATE (Noise NK as responder).
///
/// - Its static key (`set`): the node's own key takes the public half the
///   node derived once ([`StaticKey`]); its multiplication is
///   curve25519-dalek's, as snow's.
/// - Its ephemeral key (`generate`): ring's, made and multiplied by ring.
///   ring's key agrees once and is spent, and so is this one: a second
///   agreement is an error. An NK responder's ephemeral key meets one key
///   (`ee`), so a hop never makes a second; any other pattern would fail
///   its handshake, not reuse a key.
/// - Either refuses an agreement whose result is all zeros (a peer's
///   small-order point), where snow's stock X25519 goes on: a hostile
///   origin's message 1 fails at `es`, before the hop signs anything.
///
/// snow's errors carry no reason, so every refusal here (a spent key, a
/// small-order point, a key of the wrong length) is `snow::Error::Dh`.
struct HopDh {
    local: std::sync::Arc<StaticKey>,
    public: [u8; KEY_LEN],
    secret: HopSecret,
}

enum HopSecret {
    Unset,
    Static(x25519_dalek::StaticSecret),
    /// ring's key until its one agreement takes it.
    Ephemeral(std::sync::Mutex<Option<ring::agreement::EphemeralPrivateKey>>),
}

impl snow::types::Dh for HopDh {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        KEY_LEN
    }

    fn priv_len(&self) -> usize {
        KEY_LEN
    }

    fn set(&mut self, privkey: &[u8]) {
        use subtle::ConstantTimeEq;
        let mut private = [0u8; KEY_LEN];
        let n = privkey.len().min(KEY_LEN);
        private[..n].copy_from_slice(&privkey[..n]);
        self.public = if bool::from(private.ct_eq(&self.local.private)) {
            self.local.public
        } else {
            StaticKey::new(private).public
        };
        self.secret = HopSecret::Static(x25519_dalek::StaticSecret::from(private));
    }

    /// ring's generator, not snow's `rng` (ring makes its keys only from
    /// its own `SecureRandom`, which cannot be implemented outside ring).
    fn generate(&mut self, _rng: &mut dyn snow::types::Random) -> Result<(), snow::Error> {
        let rng = ring::rand::SystemRandom::new();
        let key = ring::agreement::EphemeralPrivateKey::generate(&ring::agreement::X25519, &rng)
            .map_err(|_| snow::Error::Rng)?;
        let public = key.compute_public_key().map_err(|_| snow::Error::Dh)?;
        self.public
            .copy_from_slice(public.as_ref().get(..KEY_LEN).ok_or(snow::Error::Dh)?);
        self.secret = HopSecret::Ephemeral(std::sync::Mutex::new(Some(key)));
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    /// The static private key; nothing for an ephemeral key, whose private
    /// half ring never shows. snow asks only in `Builder::generate_keypair`,
    /// which would panic with this resolver; a hop never calls it.
    fn privkey(&self) -> &[u8] {
        match &self.secret {
            HopSecret::Static(k) => k.as_bytes(),
            _ => &[],
        }
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let peer: [u8; KEY_LEN] = pubkey
            .get(..KEY_LEN)
            .and_then(|p| p.try_into().ok())
            .ok_or(snow::Error::Dh)?;
        let out = out.get_mut(..KEY_LEN).ok_or(snow::Error::Dh)?;
        match &self.secret {
            HopSecret::Unset => Err(snow::Error::Dh),
            HopSecret::Static(k) => {
                let shared = k.diffie_hellman(&x25519_dalek::PublicKey::from(peer));
                if !shared.was_contributory() {
                    return Err(snow::Error::Dh);
                }
                out.copy_from_slice(shared.as_bytes());
                Ok(())
            }
            HopSecret::Ephemeral(key) => {
                let key = key
                    .lock()
                    .map_err(|_| snow::Error::Dh)?
                    .take()
                    .ok_or(snow::Error::Dh)?;
                let peer = ring::agreement::UnparsedPublicKey::new(&ring::agreement::X25519, peer);
                ring::agreement::agree_ephemeral(key, &peer, |s| out.copy_from_slice(s))
                    .map_err(|_| snow::Error::Dh)
            }
        }
    }
}

/// Answers an origin's hop handshake: reads message 1 with the first of
/// `local` that opens it (the current Noise key, then any key being
/// retired), writes message 2 carrying this node's identity proof.
pub fn hop_respond(
    local: &[StaticKey],
    identity: &ed25519_dalek::SigningKey,
    msg1: &[u8],
) -> Result<(Session, Vec<u8>), CryptoError> {
    if msg1.len() > 256 {
        return Err(CryptoError::Handshake(format!(
            "message 1 of {} bytes is too long",
            msg1.len()
        )));
    }
    let mut last = CryptoError::Handshake("no local key".into());
    for key in local {
        let resolver = Box::new(HopResolver {
            local: std::sync::Arc::new(key.clone()),
        });
        let mut hs = snow::Builder::with_resolver(params(HOP_PATTERN), resolver)
            .local_private_key(&key.private)
            .and_then(|b| b.prologue(HOP_PROLOGUE))
            .and_then(|b| b.build_responder())
            .map_err(hs_err)?;
        let mut scratch = [0u8; 256];
        if let Err(e) = hs.read_message(msg1, &mut scratch) {
            last = hs_err(e);
            continue;
        }
        let proof = prove(identity, HOP_PROOF, hs.get_handshake_hash());
        let msg2 = write_hs_with(&mut hs, &proof)?;
        return Ok((Session::from_handshake(hs)?, msg2));
    }
    Err(last)
}

/// Writes the next handshake message into a fresh buffer.
pub fn write_hs(hs: &mut snow::HandshakeState) -> Result<Vec<u8>, CryptoError> {
    write_hs_with(hs, &[])
}

/// Writes the next handshake message with `payload` into a fresh buffer.
pub fn write_hs_with(
    hs: &mut snow::HandshakeState,
    payload: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut out = vec![0u8; 256 + payload.len()];
    let n = hs.write_message(payload, &mut out).map_err(hs_err)?;
    out.truncate(n);
    Ok(out)
}

/// Reads a handshake message; returns its payload (at most 256 bytes).
pub fn read_hs(hs: &mut snow::HandshakeState, msg: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut scratch = [0u8; 512];
    if msg.len() > scratch.len() {
        return Err(CryptoError::Handshake("handshake message too long".into()));
    }
    let n = hs.read_message(msg, &mut scratch).map_err(hs_err)?;
    Ok(scratch[..n].to_vec())
}

/// The handshake hash so far (what identity proofs sign).
pub fn handshake_hash(hs: &snow::HandshakeState) -> Vec<u8> {
    hs.get_handshake_hash().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generate_static_keypair() -> ([u8; 32], [u8; 32]) {
        let kp = snow::Builder::new(params(LINK_PATTERN))
            .generate_keypair()
            .unwrap();
        (
            kp.private.try_into().unwrap(),
            kp.public.try_into().unwrap(),
        )
    }

    #[test]
    fn link_handshake_and_in_place_transport_interoperate_with_snow() {
        let (a_priv, a_pub) = generate_static_keypair();
        let (b_priv, b_pub) = generate_static_keypair();
        let mut i = link_initiator(&a_priv, &b_pub).unwrap();
        let mut r = link_responder(&b_priv).unwrap();
        let m1 = write_hs(&mut i).unwrap();
        read_hs(&mut r, &m1).unwrap();
        assert_eq!(r.get_remote_static().unwrap(), &a_pub);
        let m2 = write_hs(&mut r).unwrap();
        read_hs(&mut i, &m2).unwrap();
        let mut si = Session::from_handshake(i).unwrap();
        let mut sr = Session::from_handshake(r).unwrap();
        for n in 0..3u8 {
            let mut rec = vec![n; 1000];
            si.tx.seal_tail(&mut rec, 0).unwrap();
            assert_ne!(&rec[..1000], &[n; 1000][..]);
            let len = sr.rx.open_in_place(&mut rec).unwrap();
            assert_eq!(&rec[..len], &[n; 1000][..]);
        }
        // A flipped bit is refused.
        let mut rec = vec![7u8; 10];
        sr.tx.seal_tail(&mut rec, 0).unwrap();
        rec[3] ^= 1;
        assert_eq!(si.rx.open_in_place(&mut rec), Err(CryptoError::BadRecord));
    }

    #[test]
    fn hop_handshake_gives_matching_sessions() {
        let (h_priv, h_pub) = generate_static_keypair();
        let id = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let mut i = hop_initiator(&h_pub).unwrap();
        let m1 = write_hs(&mut i).unwrap();
        let h1 = handshake_hash(&i);
        let (mut hop, m2) = hop_respond(&[StaticKey::new(h_priv)], &id, &m1).unwrap();
        let proof = read_hs(&mut i, &m2).unwrap();
        let me = ferry_router::NodeId(id.verifying_key().to_bytes());
        assert_eq!(check_proof(&proof, HOP_PROOF, &h1, Some(&me)), Ok(me));
        let other = ferry_router::NodeId([1; 32]);
        assert!(matches!(
            check_proof(&proof, HOP_PROOF, &h1, Some(&other)),
            Err(CryptoError::Identity(_))
        ));
        assert!(
            check_proof(&proof, LINK_RESPONDER_PROOF, &h1, None).is_err(),
            "a proof is bound to its context"
        );
        assert!(
            check_proof(&proof, HOP_PROOF, &[0; 32], None).is_err(),
            "and to its handshake"
        );
        let mut origin = Session::from_handshake(i).unwrap();
        let mut rec = b"extend".to_vec();
        origin.tx.seal_tail(&mut rec, 0).unwrap();
        let len = hop.rx.open_in_place(&mut rec).unwrap();
        assert_eq!(&rec[..len], b"extend");
    }

    #[test]
    fn wrong_hop_key_fails_and_a_retiring_key_still_answers() {
        let (h_priv, h_pub) = generate_static_keypair();
        let (other_priv, _) = generate_static_keypair();
        let id = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let mut i = hop_initiator(&h_pub).unwrap();
        let m1 = write_hs(&mut i).unwrap();
        // NK message 1 carries a payload tag under es: the wrong key can't read it.
        assert!(hop_respond(&[StaticKey::new(other_priv)], &id, &m1).is_err());
        // A node that rotated to `other` still answers a handshake made to
        // its old key while it retires it.
        let (mut hop, m2) = hop_respond(
            &[StaticKey::new(other_priv), StaticKey::new(h_priv)],
            &id,
            &m1,
        )
        .unwrap();
        read_hs(&mut i, &m2).unwrap();
        let mut origin = Session::from_handshake(i).unwrap();
        let mut rec = b"old key".to_vec();
        origin.tx.seal_tail(&mut rec, 0).unwrap();
        let len = hop.rx.open_in_place(&mut rec).unwrap();
        assert_eq!(&rec[..len], b"old key");
    }

    #[test]
    fn a_hop_ephemeral_agrees_once_and_refuses_a_small_order_point() {
        use snow::resolvers::CryptoResolver;
        use snow::types::Dh;
        let (h_priv, h_pub) = generate_static_keypair();
        // The node's key, with a public half no derivation gives: what
        // `set` returns for it is the one the node holds.
        let local = std::sync::Arc::new(StaticKey {
            private: h_priv,
            public: [7; KEY_LEN],
        });
        let fresh = || HopDh {
            local: local.clone(),
            public: [0; KEY_LEN],
            secret: HopSecret::Unset,
        };
        let mut rng = snow::resolvers::RingResolver.resolve_rng().unwrap();
        let mut e = fresh();
        e.generate(&mut *rng).unwrap();
        let mut out = [0u8; KEY_LEN];
        e.dh(&h_pub, &mut out).unwrap();
        // The peer (the static key's holder) computes the same secret.
        let mut s = fresh();
        s.set(&h_priv);
        assert_eq!(
            s.pubkey(),
            &[7; KEY_LEN][..],
            "the public half given, not derived"
        );
        let mut theirs = [0u8; KEY_LEN];
        s.dh(e.pubkey(), &mut theirs).unwrap();
        assert_eq!(out, theirs);
        assert!(
            s.dh(&[0; KEY_LEN], &mut theirs).is_err(),
            "the static key refuses a small-order point too"
        );
        assert!(e.dh(&h_pub, &mut out).is_err(), "spent after one agreement");
        // A point of order 1 (u = 0) gives all zeros: refused.
        let mut e = fresh();
        e.generate(&mut *rng).unwrap();
        assert!(e.dh(&[0; KEY_LEN], &mut out).is_err());
        // Another key set on the same resolver derives its own public half.
        let (o_priv, o_pub) = generate_static_keypair();
        let mut s = fresh();
        s.set(&o_priv);
        assert_eq!(s.pubkey(), &o_pub[..]);
    }

    #[test]
    fn a_hop_key_with_the_wrong_public_half_opens_no_handshake() {
        let (h_priv, h_pub) = generate_static_keypair();
        let id = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let mut i = hop_initiator(&h_pub).unwrap();
        let m1 = write_hs(&mut i).unwrap();
        let wrong = StaticKey {
            private: h_priv,
            public: [7; KEY_LEN],
        };
        assert!(hop_respond(&[wrong], &id, &m1).is_err());
        assert!(hop_respond(&[StaticKey::new(h_priv)], &id, &m1).is_ok());
    }
}
