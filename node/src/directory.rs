//! The directory of known nodes: static peers from the config, and nodes
//! learned from signed adverts, each with an expiry. It answers the data
//! plane's questions — where do I reach that node, with which Noise key, and
//! does this Noise key belong to it — and gives the router its mesh view. An
//! advert that is not renewed expires, and its node leaves path selection.
//!
//! An advert is the node's own word, so it is not enough: every advert must
//! carry a certificate valid under this node's `[authority]`
//! ([`crate::cert`]). Jurisdiction and family come from the certificate
//! only, roles are the intersection of certificate and advert, capacity the
//! lower of advert and ceiling, and the advert's lifetime is capped (a few
//! advert lifetimes, and never past the certificate's end). Revoked nodes
//! are dropped and their adverts refused. A Noise key is no longer "owned"
//! by the first node that claims it: a node proves its identity key in every
//! handshake, and the directory only answers whether the node a caller
//! meant to reach binds the key it saw.

use crate::authority::Authority;
use crate::cert::{Cert, roles_bits, roles_of};
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use ferry_proto::pb;
use ferry_router::{Jurisdiction, NodeId, NodeInfo, NodeState, Roles, Time};
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::RwLock;

/// A known node, as routing and links see it: from a static `[[peers]]`
/// entry, or from a certificate-vouched advert.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Identity.
    pub id: NodeId,
    /// Noise static public key.
    pub noise_key: [u8; 32],
    /// Link address, if it accepts links.
    pub addr: Option<SocketAddr>,
    /// Where it operates.
    pub jurisdiction: Jurisdiction,
    /// What it does.
    pub roles: Roles,
}

/// Domain separation for advert signatures.
pub const ADVERT_CONTEXT: &[u8] = b"ferry/advert/1";
/// The largest signed advert a node accepts, in bytes.
pub const MAX_SIGNED_ADVERT: usize = 4096;
/// Most retiring Noise keys one advert may list.
pub const MAX_RETIRING_KEYS: usize = 2;
/// An advert is kept at most this many of this node's advert lifetimes
/// from its receipt, whatever expiry it claims.
pub const ADVERT_LIFETIME_CAP: u64 = 3;

/// One known node.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Identity, keys, address, jurisdiction, roles.
    pub peer: Peer,
    /// Operator family, from its advert.
    pub family: String,
    /// Capacity, Mbit/s.
    pub capacity: u32,
    /// Load, 0..1.
    pub load: f32,
    /// Its advertised state.
    pub state: NodeState,
    /// Control-plane addresses.
    pub p2p_addrs: Vec<String>,
    /// Advert sequence number (0 for static peers).
    pub seq: u64,
    /// Expiry, ms since the epoch (`None`: static, never expires).
    pub expires_at_ms: Option<u64>,
    /// What the authority vouches for (`None` for static peers, which the
    /// operator's own config vouches for).
    pub cert: Option<Cert>,
    /// Capacity as the node advertised it (before the ceiling).
    pub advertised_capacity: u32,
    /// Older Noise keys the node still answers handshakes with, until
    /// `retiring_until_ms` (a key rotation in progress).
    pub retiring_keys: Vec<[u8; 32]>,
    /// When the retiring keys stop being accepted, ms.
    pub retiring_until_ms: u64,
}

impl Entry {
    fn live(&self, now: u64) -> bool {
        self.expires_at_ms.is_none_or(|e| e > now)
    }

    /// Whether `key` is one of this node's Noise keys at `now`: its current
    /// key, or a retiring one within its grace.
    pub fn binds(&self, key: &[u8; 32], now: u64) -> bool {
        self.peer.noise_key == *key
            || (now < self.retiring_until_ms && self.retiring_keys.contains(key))
    }

    /// The router's view of the node.
    pub fn info(&self) -> NodeInfo {
        let mut n = NodeInfo::new(self.peer.id, Some(self.peer.jurisdiction), self.peer.roles);
        if !self.family.is_empty() {
            n.family = family_id(&self.family);
        }
        n.capacity = self.capacity;
        n.load = self.load;
        n.state = self.state;
        n
    }
}

/// A stable number for an operator family name.
pub fn family_id(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Why an advert was dropped: a bounded label, and a detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {detail}")]
pub struct Dropped {
    /// `oversized`, `undecodable`, `bad_signature`, `expired`, `invalid`,
    /// `stale`, `revoked`, or a certificate refusal (`no_certificate`,
    /// `cert_expired`, `cert_unknown_key`, ... see
    /// [`Authority::verify_cert`]).
    pub kind: &'static str,
    /// Detail for the log (no addresses or keys).
    pub detail: String,
}

fn drop_(kind: &'static str, detail: impl Into<String>) -> Dropped {
    Dropped {
        kind,
        detail: detail.into(),
    }
}

/// The directory.
#[derive(Debug, Default)]
pub struct Directory {
    inner: RwLock<Inner>,
    authority: Authority,
    /// Longest an advert is kept from its receipt, ms.
    max_lifetime_ms: u64,
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<NodeId, Entry>,
    /// Nodes the authority revoked: dropped, and their adverts refused.
    revoked: HashSet<NodeId>,
    /// What this node learnt first-hand (a drain notice on a circuit, a
    /// refusal while building): node → (state, forget at, learnt at; ms).
    /// Stricter than the advert until an advert signed later arrives (an
    /// advert's sequence number is its signing time in ms).
    learnt: HashMap<NodeId, (NodeState, u64, u64)>,
}

impl Inner {
    fn with_learnt(&self, mut e: Entry, now: u64) -> Entry {
        if let Some((st, until, _)) = self.learnt.get(&e.peer.id)
            && *until > now
        {
            e.state = e.state.stricter(*st);
        }
        e
    }
}

impl Directory {
    /// A directory holding the config's static peers, admitting advertised
    /// nodes whose certificates verify under `authority`, keeping each
    /// advert at most [`ADVERT_LIFETIME_CAP`] × `advert_ttl`.
    pub fn new(authority: Authority, advert_ttl: std::time::Duration, peers: &[Peer]) -> Self {
        let d = Self {
            inner: RwLock::default(),
            authority,
            max_lifetime_ms: ADVERT_LIFETIME_CAP * advert_ttl.as_millis() as u64,
        };
        for p in peers {
            d.insert(Entry {
                peer: p.clone(),
                family: String::new(),
                capacity: 100,
                load: 0.0,
                state: NodeState::Active,
                p2p_addrs: Vec::new(),
                seq: 0,
                expires_at_ms: None,
                cert: None,
                advertised_capacity: 100,
                retiring_keys: Vec::new(),
                retiring_until_ms: 0,
            });
        }
        d
    }

    fn insert(&self, e: Entry) {
        let mut g = self.inner.write().expect("directory lock");
        g.by_id.insert(e.peer.id, e);
    }

    /// The authority this directory admits nodes under.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Drops a revoked node and refuses its adverts from now on. Returns
    /// whether it was news.
    pub fn revoke(&self, id: NodeId) -> bool {
        let mut g = self.inner.write().expect("directory lock");
        g.by_id.remove(&id);
        g.learnt.remove(&id);
        g.revoked.insert(id)
    }

    /// Whether the authority revoked `id`.
    pub fn is_revoked(&self, id: &NodeId) -> bool {
        self.inner
            .read()
            .expect("directory lock")
            .revoked
            .contains(id)
    }

    /// A live node's jurisdiction, without copying its entry.
    pub fn jurisdiction(&self, id: &NodeId, now: u64) -> Option<Jurisdiction> {
        let g = self.inner.read().expect("directory lock");
        g.by_id
            .get(id)
            .filter(|e| e.live(now))
            .map(|e| e.peer.jurisdiction)
    }

    /// A live node by id.
    pub fn get(&self, id: &NodeId, now: u64) -> Option<Entry> {
        let g = self.inner.read().expect("directory lock");
        g.by_id
            .get(id)
            .filter(|e| e.live(now))
            .cloned()
            .map(|e| g.with_learnt(e, now))
    }

    /// Records a state learnt first-hand, kept until `forget_at` (ms).
    pub fn learn(&self, id: NodeId, state: NodeState, forget_at: u64, now: u64) {
        let mut g = self.inner.write().expect("directory lock");
        let prev = g.learnt.get(&id).map(|(s, ..)| *s).unwrap_or_default();
        g.learnt.insert(id, (prev.stricter(state), forget_at, now));
    }

    /// Whether the live node `id` binds the Noise key `key` (its current
    /// key or one it is retiring).
    pub fn binds(&self, id: &NodeId, key: &[u8; 32], now: u64) -> bool {
        let g = self.inner.read().expect("directory lock");
        g.by_id
            .get(id)
            .is_some_and(|e| e.live(now) && e.binds(key, now))
    }

    /// Every live node.
    pub fn live(&self, now: u64) -> Vec<Entry> {
        let g = self.inner.read().expect("directory lock");
        g.by_id
            .values()
            .filter(|e| e.live(now))
            .cloned()
            .map(|e| g.with_learnt(e, now))
            .collect()
    }

    /// Forgets expired adverts; returns how many.
    pub fn expire(&self, now: u64) -> usize {
        let mut g = self.inner.write().expect("directory lock");
        let dead: Vec<NodeId> = g
            .by_id
            .values()
            .filter(|e| !e.live(now))
            .map(|e| e.peer.id)
            .collect();
        for id in &dead {
            g.by_id.remove(id);
        }
        g.learnt.retain(|_, (_, until, _)| *until > now);
        dead.len()
    }

    /// Verifies and records a signed advert; the entry if it was news.
    pub fn accept(&self, bytes: &[u8], own: &NodeId, now: u64) -> Result<Option<Entry>, Dropped> {
        let (advert, mut entry) = verify_advert(bytes, now)?;
        if entry.peer.id == *own {
            return Ok(None);
        }
        {
            let g = self.inner.read().expect("directory lock");
            if g.revoked.contains(&entry.peer.id) {
                return Err(drop_("revoked", "the authority revoked this node"));
            }
            if let Some(old) = g.by_id.get(&entry.peer.id)
                && old.seq >= advert.seq
            {
                return if old.seq == advert.seq {
                    Ok(None)
                } else {
                    Err(drop_("stale", "older sequence number"))
                };
            }
        }
        let cert = self
            .authority
            .verify_cert(&advert.certificate, &entry.peer.id, now)
            .map_err(|r| drop_(r.kind, r.detail))?;
        vouch(&mut entry, cert, now, self.max_lifetime_ms);
        let mut g = self.inner.write().expect("directory lock");
        // Checked again under the write lock: a revocation or a newer
        // advert may have landed while the certificate was verified.
        if g.revoked.contains(&entry.peer.id) {
            return Err(drop_("revoked", "the authority revoked this node"));
        }
        if g.by_id
            .get(&entry.peer.id)
            .is_some_and(|o| o.seq >= advert.seq)
        {
            return Ok(None);
        }
        g.by_id.insert(entry.peer.id, entry.clone());
        if g.learnt
            .get(&entry.peer.id)
            .is_some_and(|(.., at)| advert.seq > *at)
        {
            g.learnt.remove(&entry.peer.id);
        }
        Ok(Some(entry))
    }
}

/// Checks a signed advert and turns it into an entry.
pub fn verify_advert(bytes: &[u8], now: u64) -> Result<(pb::NodeAdvert, Entry), Dropped> {
    if bytes.len() > MAX_SIGNED_ADVERT {
        return Err(drop_(
            "oversized",
            format!("{} bytes, the limit is {MAX_SIGNED_ADVERT}", bytes.len()),
        ));
    }
    let signed =
        pb::SignedAdvert::decode(bytes).map_err(|e| drop_("undecodable", e.to_string()))?;
    let a = pb::NodeAdvert::decode(signed.advert.as_slice())
        .map_err(|e| drop_("undecodable", e.to_string()))?;
    let id: [u8; 32] = a
        .node_id
        .as_slice()
        .try_into()
        .map_err(|_| drop_("invalid", "node id is not 32 bytes"))?;
    let vk = VerifyingKey::from_bytes(&id)
        .map_err(|_| drop_("invalid", "node id is not an Ed25519 key"))?;
    let sig = ed25519_dalek::Signature::from_slice(&signed.signature)
        .map_err(|_| drop_("bad_signature", "malformed signature"))?;
    let mut msg = ADVERT_CONTEXT.to_vec();
    msg.extend_from_slice(&signed.advert);
    vk.verify(&msg, &sig)
        .map_err(|_| drop_("bad_signature", "signature does not verify"))?;
    if a.expires_at_ms <= now {
        return Err(drop_("expired", "advert expired"));
    }
    let noise_key: [u8; 32] = a
        .noise_key
        .as_slice()
        .try_into()
        .map_err(|_| drop_("invalid", "noise key is not 32 bytes"))?;
    let jurisdiction =
        Jurisdiction::parse(&a.jurisdiction).map_err(|e| drop_("invalid", e.to_string()))?;
    let roles = roles_of(a.roles);
    if a.retiring_noise_keys.len() > MAX_RETIRING_KEYS {
        return Err(drop_("invalid", "too many retiring noise keys"));
    }
    let retiring_keys = a
        .retiring_noise_keys
        .iter()
        .map(|k| {
            k.as_slice()
                .try_into()
                .map_err(|_| drop_("invalid", "retiring noise key is not 32 bytes"))
        })
        .collect::<Result<Vec<[u8; 32]>, _>>()?;
    let addr: Option<SocketAddr> = a
        .link_addrs
        .first()
        .map(|s| s.parse())
        .transpose()
        .map_err(|_| drop_("invalid", "bad link address"))?;
    if (roles.relay || roles.exit) && addr.is_none() {
        return Err(drop_("invalid", "relay or exit without a link address"));
    }
    let state = match a.state() {
        pb::NodeState::Draining => NodeState::Draining {
            until: Time(a.exit_by_ms),
        },
        pb::NodeState::Exited => NodeState::Exited,
        _ => NodeState::Active,
    };
    let entry = Entry {
        peer: Peer {
            id: NodeId(id),
            noise_key,
            addr,
            jurisdiction,
            roles,
        },
        family: a.family.clone(),
        capacity: a.capacity_mbps,
        load: a.load.clamp(0.0, 1.0),
        state,
        p2p_addrs: a.p2p_addrs.clone(),
        seq: a.seq,
        expires_at_ms: Some(a.expires_at_ms),
        cert: None,
        advertised_capacity: a.capacity_mbps,
        retiring_keys,
        retiring_until_ms: a.retiring_until_ms,
    };
    Ok((a, entry))
}

/// Replaces an advert's claims with what its certificate vouches for:
/// jurisdiction and family from the certificate, roles as the intersection,
/// capacity at most the ceiling, lifetime capped at `max_lifetime_ms` from
/// `now` and at the certificate's end.
fn vouch(e: &mut Entry, cert: Cert, now: u64, max_lifetime_ms: u64) {
    e.peer.jurisdiction = cert.jurisdiction;
    e.family = cert.family.clone();
    e.peer.roles = roles_of(roles_bits(e.peer.roles) & roles_bits(cert.roles));
    e.capacity = e.advertised_capacity.min(cert.capacity_max_mbps);
    let claimed = e.expires_at_ms.unwrap_or(u64::MAX);
    e.expires_at_ms = Some(
        claimed
            .min(now.saturating_add(max_lifetime_ms))
            .min(cert.not_after_ms),
    );
    e.retiring_until_ms = e.retiring_until_ms.min(now.saturating_add(max_lifetime_ms));
    e.cert = Some(cert);
}

/// What a node advertises about itself.
pub struct OwnAdvert<'a> {
    /// Identity key.
    pub key: &'a SigningKey,
    /// Noise static public key.
    pub noise_public: [u8; 32],
    /// Link listener.
    pub link: Option<SocketAddr>,
    /// libp2p listen addresses.
    pub p2p_addrs: Vec<String>,
    /// Jurisdiction.
    pub jurisdiction: Jurisdiction,
    /// Roles.
    pub roles: Roles,
    /// Operator family.
    pub family: String,
    /// Capacity.
    pub capacity_mbps: u32,
    /// Measured load, 0.0 to 1.0.
    pub load: f32,
    /// State.
    pub state: NodeState,
    /// The node's certificate (encoded), empty if it has none.
    pub certificate: Vec<u8>,
    /// Noise keys being retired, and until when (ms).
    pub retiring: (Vec<[u8; 32]>, u64),
}

impl OwnAdvert<'_> {
    /// Signs an advert with this sequence number and expiry.
    pub fn sign(&self, seq: u64, expires_at_ms: u64) -> Vec<u8> {
        let roles = roles_bits(self.roles);
        let (state, exit_by_ms) = match self.state {
            NodeState::Active => (pb::NodeState::Active, 0),
            NodeState::Draining { until } => (pb::NodeState::Draining, until.0),
            NodeState::Exited => (pb::NodeState::Exited, 0),
        };
        let a = pb::NodeAdvert {
            node_id: self.key.verifying_key().to_bytes().to_vec(),
            noise_key: self.noise_public.to_vec(),
            link_addrs: self.link.iter().map(|a| a.to_string()).collect(),
            p2p_addrs: self.p2p_addrs.clone(),
            jurisdiction: self.jurisdiction.to_string(),
            roles,
            family: self.family.clone(),
            capacity_mbps: self.capacity_mbps,
            load: self.load.clamp(0.0, 1.0),
            state: state as i32,
            exit_by_ms,
            seq,
            expires_at_ms,
            certificate: self.certificate.clone(),
            retiring_noise_keys: self.retiring.0.iter().map(|k| k.to_vec()).collect(),
            retiring_until_ms: self.retiring.1,
        }
        .encode_to_vec();
        let mut msg = ADVERT_CONTEXT.to_vec();
        msg.extend_from_slice(&a);
        let signature = self.key.sign(&msg).to_bytes().to_vec();
        pb::SignedAdvert {
            advert: a,
            signature,
        }
        .encode_to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::{Admission, admit, parse_role_list};
    use crate::identity::Keys;
    use rand::rngs::OsRng;
    use std::time::Duration;

    /// An authority and a certificate for `k` (CH, relay, ceiling 100,
    /// valid until `not_after`).
    fn admitted(k: &Keys, not_after: u64) -> (Authority, Vec<u8>) {
        let a = SigningKey::generate(&mut OsRng);
        let auth = Authority::new(&[hex::encode(a.verifying_key().as_bytes())], 1).unwrap();
        (auth, cert_for(k, &a, not_after))
    }

    fn cert_for(k: &Keys, a: &SigningKey, not_after: u64) -> Vec<u8> {
        let terms = Admission {
            jurisdiction: Jurisdiction(*b"CH"),
            family: "vouched".into(),
            roles: parse_role_list("relay").unwrap(),
            capacity_max_mbps: 100,
            not_before_ms: 0,
            not_after_ms: not_after,
            landmark: None,
        };
        admit(k, &terms, std::slice::from_ref(a))
            .unwrap()
            .encode_to_vec()
    }

    fn own(k: &Keys, cert: Vec<u8>) -> OwnAdvert<'_> {
        OwnAdvert {
            key: &k.identity,
            noise_public: k.noise_public(),
            link: Some("127.0.0.1:7001".parse().unwrap()),
            p2p_addrs: vec![],
            jurisdiction: Jurisdiction(*b"DE"),
            roles: Roles {
                entry: false,
                relay: true,
                exit: true,
            },
            family: "op".into(),
            capacity_mbps: 100,
            load: 0.25,
            state: NodeState::Active,
            certificate: cert,
            retiring: (Vec::new(), 0),
        }
    }

    #[test]
    fn adverts_are_verified_sequenced_and_expire() {
        let k = Keys::generate();
        let (auth, cert) = admitted(&k, 1_000_000);
        let d = Directory::new(auth, Duration::from_secs(1), &[]);
        let me = NodeId([0; 32]);
        let a1 = own(&k, cert.clone()).sign(1, 1_000);
        assert!(d.accept(&a1, &me, 500).unwrap().is_some());
        assert!(d.accept(&a1, &me, 500).unwrap().is_none());
        assert!(d.binds(&k.node_id(), &k.noise_public(), 500));
        assert_eq!(d.get(&k.node_id(), 500).unwrap().load, 0.25);
        let a2 = own(&k, cert.clone()).sign(2, 2_000);
        assert!(d.accept(&a2, &me, 600).unwrap().is_some());
        assert_eq!(d.accept(&a1, &me, 600).unwrap_err().kind, "stale");
        assert!(d.get(&k.node_id(), 1_999).is_some());
        assert!(
            d.get(&k.node_id(), 2_000).is_none(),
            "expired adverts leave the directory's answers"
        );
        assert_eq!(d.expire(2_000), 1);
        let mut forged = a2.clone();
        let n = forged.len();
        forged[n - 70] ^= 1;
        assert!(d.accept(&forged, &me, 600).is_err());
        assert_eq!(
            d.accept(&[1, 2, 3], &me, 600).unwrap_err().kind,
            "undecodable"
        );
        assert_eq!(
            d.accept(&vec![0; 5000], &me, 600).unwrap_err().kind,
            "oversized"
        );
        assert_eq!(
            d.accept(&own(&k, cert).sign(3, 100), &me, 600)
                .unwrap_err()
                .kind,
            "expired"
        );
    }

    /// The store keeps the adverts a restart redials, not every node that
    /// ever passed: one whose last advert expired more than a week ago is
    /// deleted, as is anything that no longer decodes.
    #[test]
    fn stored_adverts_of_nodes_long_gone_are_swept() {
        use crate::store::{Store, cf};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let day = 86_400_000u64;
        let (recent, gone) = (Keys::generate(), Keys::generate());
        let (_, c1) = admitted(&recent, 100 * day);
        let (_, c2) = admitted(&gone, 100 * day);
        let put = |k: &Keys, v: &[u8]| store.put_cache(cf::PEERS, &k.node_id().0, v).unwrap();
        put(&recent, &own(&recent, c1).sign(1, 5 * day));
        put(&gone, &own(&gone, c2).sign(1, 2 * day));
        store.put_cache(cf::PEERS, b"junk", &[1, 2, 3]).unwrap();
        assert_eq!(crate::control::sweep_stored_adverts(&store, 10 * day), 2);
        let left: Vec<Vec<u8>> = store
            .all(cf::PEERS)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(left, vec![recent.node_id().0.to_vec()]);
        assert_eq!(crate::control::sweep_stored_adverts(&store, 10 * day), 0);
    }

    #[test]
    fn claims_come_from_the_certificate_and_are_capped() {
        let k = Keys::generate();
        let (auth, cert) = admitted(&k, 50_000);
        let d = Directory::new(auth.clone(), Duration::from_secs(3), &[]);
        let me = NodeId([0; 32]);
        // No certificate, and a certificate under another authority.
        let kind = |d: &Directory, bytes: &[u8]| d.accept(bytes, &me, 1_000).unwrap_err().kind;
        assert_eq!(kind(&d, &own(&k, vec![]).sign(1, 5_000)), "no_certificate");
        let (_, foreign) = admitted(&k, 50_000);
        assert_eq!(
            kind(&d, &own(&k, foreign).sign(1, 5_000)),
            "cert_unknown_key"
        );
        // Another node's certificate.
        let other = Keys::generate();
        assert_eq!(
            kind(&d, &own(&other, cert.clone()).sign(1, 5_000)),
            "cert_mismatch"
        );
        // Claims 100x the ceiling, DE, relay+exit and a lifetime forever.
        let mut greedy = own(&k, cert.clone());
        greedy.capacity_mbps = u32::MAX;
        let e = d
            .accept(&greedy.sign(1, u64::MAX), &me, 1_000)
            .unwrap()
            .unwrap();
        assert_eq!(e.peer.jurisdiction, Jurisdiction(*b"CH"));
        assert_eq!(e.family, "vouched");
        assert!(
            e.peer.roles.relay && !e.peer.roles.exit,
            "roles: the intersection"
        );
        assert_eq!(e.info().capacity, 100, "capacity: at most the ceiling");
        assert_eq!(
            e.expires_at_ms,
            Some(1_000 + 9_000),
            "three advert lifetimes"
        );
        // Never past the certificate's end, and an expired one is refused.
        let e = d
            .accept(&own(&k, cert.clone()).sign(2, u64::MAX), &me, 45_000)
            .unwrap()
            .unwrap();
        assert_eq!(e.expires_at_ms, Some(50_000));
        assert_eq!(
            d.accept(&own(&k, cert.clone()).sign(3, u64::MAX), &me, 50_000)
                .unwrap_err()
                .kind,
            "cert_expired"
        );
        // Revoked: dropped, and refused from then on.
        assert!(d.revoke(k.node_id()));
        assert!(d.get(&k.node_id(), 45_000).is_none());
        assert_eq!(
            d.accept(&own(&k, cert).sign(4, 60_000), &me, 45_000)
                .unwrap_err()
                .kind,
            "revoked"
        );
    }

    #[test]
    fn a_noise_key_claimed_by_two_nodes_binds_only_to_each_one_who_advertises_it() {
        // Y advertises X's Noise key: both adverts are kept (neither is
        // refused as a conflict), and each handshake proves which identity
        // answered, so Y gains nothing (tested end to end in the trust tests).
        let (x, y) = (Keys::generate(), Keys::generate());
        let a = SigningKey::generate(&mut OsRng);
        let auth = Authority::new(&[hex::encode(a.verifying_key().as_bytes())], 1).unwrap();
        let d = Directory::new(auth, Duration::from_secs(30), &[]);
        let me = NodeId([0; 32]);
        let mut squat = own(&y, cert_for(&y, &a, 1_000_000));
        squat.noise_public = x.noise_public();
        assert!(
            d.accept(&squat.sign(1, 5_000), &me, 1_000)
                .unwrap()
                .is_some()
        );
        assert!(
            d.accept(
                &own(&x, cert_for(&x, &a, 1_000_000)).sign(1, 5_000),
                &me,
                1_000
            )
            .unwrap()
            .is_some(),
            "the victim's advert is not refused"
        );
        assert!(d.binds(&x.node_id(), &x.noise_public(), 1_000));
        assert!(!d.binds(&x.node_id(), &y.noise_public(), 1_000));
    }

    mod vouching {
        use super::*;
        use proptest::prelude::*;

        const PLACES: [&[u8; 2]; 4] = [b"CH", b"PK", b"DE", b"CA"];

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            /// Whatever an advert claims, what the directory hands the
            /// router comes from the certificate: jurisdiction and family
            /// as vouched, roles within both, capacity within both, and a
            /// lifetime within the cap and the certificate.
            #[test]
            fn every_claim_the_router_reads_is_vouched_for(
                claimed_place in 0usize..4,
                vouched_place in 0usize..4,
                claimed_roles in 0u32..8,
                vouched_roles in 1u32..8,
                claimed_capacity in any::<u32>(),
                ceiling in 1u32..=u32::MAX,
                claimed_expiry in 2_000u64..=u64::MAX,
                not_after in 2_000u64..10_000_000,
                ttl_secs in 3u64..3600,
            ) {
                let k = Keys::generate();
                let a = SigningKey::from_bytes(&[5; 32]);
                let auth = Authority::new(&[hex::encode(a.verifying_key().as_bytes())], 1).unwrap();
                let terms = Admission {
                    jurisdiction: Jurisdiction(*PLACES[vouched_place]),
                    family: "vouched".into(),
                    roles: crate::cert::roles_of(vouched_roles),
                    capacity_max_mbps: ceiling,
                    not_before_ms: 0,
                    not_after_ms: not_after,
                    landmark: None,
                };
                let cert = admit(&k, &terms, std::slice::from_ref(&a))
                    .unwrap()
                    .encode_to_vec();
                let mut ad = own(&k, cert);
                ad.jurisdiction = Jurisdiction(*PLACES[claimed_place]);
                ad.roles = crate::cert::roles_of(claimed_roles);
                ad.family = "claimed".into();
                ad.capacity_mbps = claimed_capacity;
                let now = 1_000;
                let d = Directory::new(auth, Duration::from_secs(ttl_secs), &[]);
                let e = d
                    .accept(&ad.sign(1, claimed_expiry), &NodeId([0; 32]), now)
                    .unwrap()
                    .unwrap();
                let info = e.info();
                prop_assert_eq!(e.peer.jurisdiction, Jurisdiction(*PLACES[vouched_place]));
                prop_assert_eq!(e.family.as_str(), "vouched");
                let bits = roles_bits(e.peer.roles);
                prop_assert_eq!(bits & !vouched_roles, 0);
                prop_assert_eq!(bits & !claimed_roles, 0);
                prop_assert!(info.capacity <= ceiling && info.capacity <= claimed_capacity);
                let until = e.expires_at_ms.unwrap();
                prop_assert!(until <= now + ADVERT_LIFETIME_CAP * ttl_secs * 1000);
                prop_assert!(until <= not_after);
            }
        }
    }
}
