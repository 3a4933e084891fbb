//! Noise handshakes (snow) and in-place transport sealing (ring).
//!
//! Handshakes use snow. After a handshake, the two transport keys are taken
//! with snow's `risky-raw-split` and used with ring's AES-256-GCM directly:
//! ring seals and opens *in place*, so a record is never copied to be
//! encrypted. The nonce is Noise's AESGCM nonce (32 zero bits, then the
//! big-endian 64-bit counter) and the associated data is empty, so every
//! record is a standard Noise transport message.
//!
//! snow is given Ferry's own resolver: ring for hashing and AES-GCM, as
//! snow's `ring-accelerated` gives, and aws-lc's X25519 ([`X25519`]) in
//! place of curve25519-dalek's, which made most of a CREATE's cost; a
//! node's static key is parsed once ([`StaticKey`]), not per handshake.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};

/// The link handshake: both sides know each other's static key.
pub const LINK_PATTERN: &str = "Noise_IK_25519_AESGCM_SHA256";
/// Prologue binding link handshakes to this protocol version. Version 2
/// seals a RELAY cell's header alone on each link (its body is sealed end
/// to end already; see `ferry_node::link::seal`), so a node of version 1
/// and one of version 2 refuse each other's handshake rather than each
/// other's first data cell.
pub const LINK_PROLOGUE: &[u8] = b"ferry/link/2";
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
        let tag = self.seal_ahead(0, buf, &[])?;
        self.n += 1;
        Ok(tag)
    }

    /// Encrypts `buf` in place under the nonce `ahead` places past the
    /// next, its tag also covering `aad` (not encrypted; the opener must
    /// present it as it is), and returns the tag. Uses no nonce up: the
    /// caller seals each of the nonces it uses once, then [`Self::skip`]s
    /// them, as the opener does (a record in two parts, as a link's cells
    /// are).
    pub fn seal_ahead(&self, ahead: u64, buf: &mut [u8], aad: &[u8]) -> Result<Tag, CryptoError> {
        let n = self
            .n
            .checked_add(ahead)
            .filter(|n| *n < u64::MAX)
            .ok_or(CryptoError::NonceExhausted)?;
        self.key
            .seal_in_place_separate_tag(nonce(n), Aad::from(aad), buf)
            .map_err(|_| CryptoError::NonceExhausted)
    }

    /// Uses up the next `k` nonces (sealed with [`Self::seal_ahead`]).
    pub fn skip(&mut self, k: u64) {
        self.n = self.n.saturating_add(k);
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
        let len = self.open_ahead(0, buf, &[])?;
        self.n += 1;
        Ok(len)
    }

    /// Opens `buf` (ciphertext then tag) in place as sealed with
    /// [`Sealer::seal_ahead`]`(ahead, _, aad)`; returns the plaintext
    /// length. Uses no nonce up: [`Self::skip`] does, once the record's
    /// parts are open.
    pub fn open_ahead(&self, ahead: u64, buf: &mut [u8], aad: &[u8]) -> Result<usize, CryptoError> {
        let n = self
            .n
            .checked_add(ahead)
            .filter(|n| *n < u64::MAX)
            .ok_or(CryptoError::NonceExhausted)?;
        Ok(self
            .key
            .open_in_place(nonce(n), Aad::from(aad), buf)
            .map_err(|_| CryptoError::BadRecord)?
            .len())
    }

    /// Uses up the next `k` nonces (opened with [`Self::open_ahead`]).
    pub fn skip(&mut self, k: u64) {
        self.n = self.n.saturating_add(k);
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
    builder(LINK_PATTERN, None)
        .local_private_key(local_private)
        .and_then(|b| b.remote_public_key(remote_public))
        .and_then(|b| b.prologue(LINK_PROLOGUE))
        .and_then(|b| b.build_initiator())
        .map_err(hs_err)
}

/// Starts a link handshake as the listener.
pub fn link_responder(local_private: &[u8; 32]) -> Result<snow::HandshakeState, CryptoError> {
    builder(LINK_PATTERN, None)
        .local_private_key(local_private)
        .and_then(|b| b.prologue(LINK_PROLOGUE))
        .and_then(|b| b.build_responder())
        .map_err(hs_err)
}

/// Starts a hop handshake as the circuit's origin.
pub fn hop_initiator(remote_public: &[u8; 32]) -> Result<snow::HandshakeState, CryptoError> {
    builder(HOP_PATTERN, None)
        .remote_public_key(remote_public)
        .and_then(|b| b.prologue(HOP_PROLOGUE))
        .and_then(|b| b.build_initiator())
        .map_err(hs_err)
}

/// A node's Noise static key, parsed once: its public half and aws-lc's
/// key are made when the key is loaded, not for every handshake (snow's
/// stock X25519 derives the public half again each time a handshake is
/// built with the private key: a base-point multiplication per CREATE).
/// Cheap to clone.
#[derive(Clone)]
pub struct StaticKey(std::sync::Arc<StaticInner>);

struct StaticInner {
    private: [u8; KEY_LEN],
    public: [u8; KEY_LEN],
    key: aws_lc_rs::agreement::PrivateKey,
}

impl StaticKey {
    /// The key pair of an X25519 private key.
    pub fn new(private: [u8; KEY_LEN]) -> Self {
        let key = aws_lc_rs::agreement::PrivateKey::from_private_key(
            &aws_lc_rs::agreement::X25519,
            &private,
        )
        .expect("any 32 bytes are an X25519 private key");
        let public = public_of(&key).expect("an X25519 key has a public half");
        Self(std::sync::Arc::new(StaticInner {
            private,
            public,
            key,
        }))
    }

    /// The public half.
    pub fn public(&self) -> [u8; KEY_LEN] {
        self.0.public
    }

    /// The private half.
    pub fn private(&self) -> [u8; KEY_LEN] {
        self.0.private
    }
}

/// Keys are equal when their public halves are (the private halves are
/// never compared).
impl PartialEq for StaticKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.public == other.0.public
    }
}

impl Eq for StaticKey {}

impl std::fmt::Debug for StaticKey {
    /// The public half only: a private key never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let public: String = self.0.public[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        write!(f, "StaticKey({public}…)")
    }
}

fn public_of(key: &aws_lc_rs::agreement::PrivateKey) -> Option<[u8; KEY_LEN]> {
    key.compute_public_key().ok()?.as_ref().try_into().ok()
}

/// snow's primitives for Ferry's handshakes: ring's, as snow's
/// `ring-accelerated` gives them, for hashing, AES-GCM and randomness, and
/// [`X25519`] for Diffie-Hellman. `local` is the node's static key when it
/// has one parsed ([`StaticKey`]).
struct Resolver {
    local: Option<StaticKey>,
}

impl snow::resolvers::CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn snow::types::Random>> {
        snow::resolvers::RingResolver.resolve_rng()
    }

    fn resolve_dh(&self, choice: &snow::params::DHChoice) -> Option<Box<dyn snow::types::Dh>> {
        match choice {
            snow::params::DHChoice::Curve25519 => Some(Box::new(X25519 {
                local: self.local.clone(),
                public: [0; KEY_LEN],
                secret: Secret::Unset,
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

/// A snow builder for `pattern` with Ferry's primitives ([`Resolver`]).
fn builder(pattern: &str, local: Option<StaticKey>) -> snow::Builder<'static> {
    snow::Builder::with_resolver(params(pattern), Box::new(Resolver { local }))
}

/// X25519 by aws-lc (`aws-lc-rs`), for snow.
///
/// snow's stock X25519 is curve25519-dalek's portable field arithmetic;
/// ring's is faster but agrees only with a key it generated, once, so it
/// cannot hold a static key. aws-lc's runs s2n-bignum's verified assembly
/// (ADX/BMI2 where the CPU has them) for any key: an agreement takes about
/// half of curve25519-dalek's time and a key pair about half as well
/// (`benches/benches/circuit.rs`, `circuit_setup`; figures in
/// `benches/README.md`). A CREATE makes a key pair and two agreements.
///
/// - A static key (`set`) that is the node's own takes the [`StaticKey`]
///   parsed when it was loaded; any other is parsed here.
/// - An ephemeral key (`generate`) is aws-lc's, from aws-lc's generator
///   rather than snow's `rng` (aws-lc makes keys only from its own): key
///   generation is the one randomness the circuit core does not take as an
///   input, as with snow's stock resolver.
/// - An agreement whose result is all zeros (a peer's small-order point)
///   is refused, where snow's stock X25519 goes on: a hostile origin's
///   message 1 fails at its first agreement, before the hop signs
///   anything.
///
/// snow's errors carry no reason, so every refusal here (a small-order
/// point, a key of the wrong length) is `snow::Error::Dh`.
struct X25519 {
    local: Option<StaticKey>,
    public: [u8; KEY_LEN],
    secret: Secret,
}

enum Secret {
    Unset,
    /// A static key: the node's own, or another parsed by `set`.
    Static(StaticKey),
    /// A key generated here.
    Ephemeral(aws_lc_rs::agreement::PrivateKey),
}

impl snow::types::Dh for X25519 {
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
        if let Some(local) = &self.local
            && bool::from(private.ct_eq(&local.0.private))
        {
            self.public = local.0.public;
            self.secret = Secret::Static(local.clone());
            return;
        }
        let key = StaticKey::new(private);
        self.public = key.0.public;
        self.secret = Secret::Static(key);
    }

    fn generate(&mut self, _rng: &mut dyn snow::types::Random) -> Result<(), snow::Error> {
        let key = aws_lc_rs::agreement::PrivateKey::generate(&aws_lc_rs::agreement::X25519)
            .map_err(|_| snow::Error::Rng)?;
        self.public = public_of(&key).ok_or(snow::Error::Dh)?;
        self.secret = Secret::Ephemeral(key);
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    /// A static private key; nothing for an ephemeral key, whose private
    /// half aws-lc keeps. snow asks only in `Builder::generate_keypair`,
    /// which would panic with this resolver; Ferry makes its key pairs
    /// with x25519-dalek.
    fn privkey(&self) -> &[u8] {
        match &self.secret {
            Secret::Static(k) => &k.0.private,
            _ => &[],
        }
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let key = match &self.secret {
            Secret::Unset => return Err(snow::Error::Dh),
            Secret::Static(k) => &k.0.key,
            Secret::Ephemeral(k) => k,
        };
        let peer = pubkey.get(..KEY_LEN).ok_or(snow::Error::Dh)?;
        let out = out.get_mut(..KEY_LEN).ok_or(snow::Error::Dh)?;
        let peer =
            aws_lc_rs::agreement::UnparsedPublicKey::new(&aws_lc_rs::agreement::X25519, peer);
        // aws-lc refuses an all-zero result itself; checked again here, in
        // constant time, so the refusal does not rest on its internals.
        aws_lc_rs::agreement::agree(key, peer, snow::Error::Dh, |s| {
            use subtle::ConstantTimeEq;
            if bool::from(s.ct_eq(&[0u8; KEY_LEN])) {
                return Err(snow::Error::Dh);
            }
            out.copy_from_slice(s);
            Ok(())
        })
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
        let private = key.private();
        let mut hs = builder(HOP_PATTERN, Some(key.clone()))
            .local_private_key(&private)
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

    /// A static key as [`StaticKey::new`] makes it, but with `public` for
    /// its public half.
    fn with_public(private: [u8; 32], public: [u8; 32]) -> StaticKey {
        StaticKey(std::sync::Arc::new(StaticInner {
            private,
            public,
            key: aws_lc_rs::agreement::PrivateKey::from_private_key(
                &aws_lc_rs::agreement::X25519,
                &private,
            )
            .unwrap(),
        }))
    }

    #[test]
    fn x25519_agrees_with_curve25519_dalek_and_refuses_small_order_points() {
        use snow::resolvers::CryptoResolver;
        let (h_priv, h_pub) = generate_static_keypair();
        assert_eq!(StaticKey::new(h_priv).public(), h_pub);
        // The node's key, with a public half no derivation gives: what
        // `set` returns for it is the one the node holds.
        let local = with_public(h_priv, [7; 32]);
        let dh = || {
            Resolver {
                local: Some(local.clone()),
            }
            .resolve_dh(&snow::params::DHChoice::Curve25519)
            .unwrap()
        };
        let mut rng = snow::resolvers::RingResolver.resolve_rng().unwrap();
        let mut e = dh();
        e.generate(&mut *rng).unwrap();
        let mut out = [0u8; KEY_LEN];
        e.dh(&h_pub, &mut out).unwrap();
        let mut again = [0u8; KEY_LEN];
        e.dh(&h_pub, &mut again).unwrap();
        assert_eq!(out, again, "an ephemeral key agrees more than once");
        let pe: [u8; 32] = e.pubkey().try_into().unwrap();
        assert_eq!(out, x25519_dalek::x25519(h_priv, pe), "as curve25519-dalek");
        let mut s = dh();
        s.set(&h_priv);
        assert_eq!(
            s.pubkey(),
            &[7; KEY_LEN][..],
            "the public half given, not derived"
        );
        let mut theirs = [0u8; KEY_LEN];
        s.dh(e.pubkey(), &mut theirs).unwrap();
        assert_eq!(out, theirs);
        // Points of order 2 (u = 0) and 4 (u = 1) give all zeros: refused
        // by a static key and an ephemeral one alike.
        for low in [[0u8; 32], {
            let mut one = [0u8; 32];
            one[0] = 1;
            one
        }] {
            assert!(s.dh(&low, &mut theirs).is_err());
            assert!(e.dh(&low, &mut theirs).is_err());
        }
        assert!(s.dh(&[1; 31], &mut theirs).is_err(), "a short key");
        // Another key set on the same resolver derives its own public half.
        let (o_priv, o_pub) = generate_static_keypair();
        let mut s = dh();
        s.set(&o_priv);
        assert_eq!(s.pubkey(), &o_pub[..]);
    }

    #[test]
    fn handshakes_interoperate_with_snows_stock_primitives() {
        let (h_priv, h_pub) = generate_static_keypair();
        let id = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let stock = |pattern: &str| snow::Builder::new(params(pattern));
        // A stock origin against a hop here.
        let mut i = stock(HOP_PATTERN)
            .remote_public_key(&h_pub)
            .and_then(|b| b.prologue(HOP_PROLOGUE))
            .and_then(|b| b.build_initiator())
            .unwrap();
        let m1 = write_hs(&mut i).unwrap();
        let (mut hop, m2) = hop_respond(&[StaticKey::new(h_priv)], &id, &m1).unwrap();
        read_hs(&mut i, &m2).unwrap();
        let mut origin = Session::from_handshake(i).unwrap();
        let mut rec = b"stock".to_vec();
        origin.tx.seal_tail(&mut rec, 0).unwrap();
        let len = hop.rx.open_in_place(&mut rec).unwrap();
        assert_eq!(&rec[..len], b"stock");
        // An origin here against a stock hop.
        let mut i = hop_initiator(&h_pub).unwrap();
        let m1 = write_hs(&mut i).unwrap();
        let mut r = stock(HOP_PATTERN)
            .local_private_key(&h_priv)
            .and_then(|b| b.prologue(HOP_PROLOGUE))
            .and_then(|b| b.build_responder())
            .unwrap();
        read_hs(&mut r, &m1).unwrap();
        let m2 = write_hs(&mut r).unwrap();
        read_hs(&mut i, &m2).unwrap();
        // A link dialled here to a stock listener, both keys known.
        let (a_priv, a_pub) = generate_static_keypair();
        let mut i = link_initiator(&a_priv, &h_pub).unwrap();
        let mut r = stock(LINK_PATTERN)
            .local_private_key(&h_priv)
            .and_then(|b| b.prologue(LINK_PROLOGUE))
            .and_then(|b| b.build_responder())
            .unwrap();
        read_hs(&mut r, &write_hs(&mut i).unwrap()).unwrap();
        assert_eq!(r.get_remote_static().unwrap(), &a_pub);
        read_hs(&mut i, &write_hs(&mut r).unwrap()).unwrap();
        let mut si = Session::from_handshake(i).unwrap();
        let mut sr = Session::from_handshake(r).unwrap();
        let mut rec = b"link".to_vec();
        si.tx.seal_tail(&mut rec, 0).unwrap();
        let len = sr.rx.open_in_place(&mut rec).unwrap();
        assert_eq!(&rec[..len], b"link");
    }

    #[test]
    fn a_hop_key_with_the_wrong_public_half_opens_no_handshake() {
        let (h_priv, h_pub) = generate_static_keypair();
        let id = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let mut i = hop_initiator(&h_pub).unwrap();
        let m1 = write_hs(&mut i).unwrap();
        let wrong = with_public(h_priv, [7; KEY_LEN]);
        assert!(hop_respond(&[wrong], &id, &m1).is_err());
        assert!(hop_respond(&[StaticKey::new(h_priv)], &id, &m1).is_ok());
    }
}
