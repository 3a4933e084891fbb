//! The directory of known nodes: static peers from the config, and nodes
//! learned from signed adverts, each with an expiry. It answers the data
//! plane's two questions — which node does this Noise key belong to, and
//! where do I reach that node — and gives the router its mesh view. An advert
//! that is not renewed expires, and its node leaves path selection.

use crate::config::Peer;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use ferry_proto::pb;
use ferry_router::{Jurisdiction, NodeId, NodeInfo, NodeState, Roles, Time};
use prost::Message;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::RwLock;

/// Domain separation for advert signatures.
pub const ADVERT_CONTEXT: &[u8] = b"ferry/advert/1";
/// The largest signed advert a node accepts, in bytes.
pub const MAX_SIGNED_ADVERT: usize = 4096;

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
}

impl Entry {
    fn live(&self, now: u64) -> bool {
        self.expires_at_ms.is_none_or(|e| e > now)
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
    /// `stale`, `key_conflict`.
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
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<NodeId, Entry>,
    by_key: HashMap<[u8; 32], NodeId>,
    /// What this node learnt first-hand (a drain notice on a circuit, a
    /// refusal while building): node → (state, forget at, learnt at; ms).
    /// Stricter than the advert until an advert signed later arrives (an
    /// advert's sequence number is its signing time in ms).
    learnt: HashMap<NodeId, (NodeState, u64, u64)>,
}

/// The stricter of two states (exited, then the earlier drain deadline).
pub fn stricter(a: NodeState, b: NodeState) -> NodeState {
    match (a, b) {
        (NodeState::Exited, _) | (_, NodeState::Exited) => NodeState::Exited,
        (NodeState::Draining { until: x }, NodeState::Draining { until: y }) => {
            NodeState::Draining { until: x.min(y) }
        }
        (d @ NodeState::Draining { .. }, _) | (_, d @ NodeState::Draining { .. }) => d,
        _ => NodeState::Active,
    }
}

impl Inner {
    fn with_learnt(&self, mut e: Entry, now: u64) -> Entry {
        if let Some((st, until, _)) = self.learnt.get(&e.peer.id)
            && *until > now
        {
            e.state = stricter(e.state, *st);
        }
        e
    }
}

impl Directory {
    /// A directory holding the config's static peers.
    pub fn with_static(peers: &[Peer]) -> Self {
        let d = Self::default();
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
            });
        }
        d
    }

    fn insert(&self, e: Entry) {
        let mut g = self.inner.write().expect("directory lock");
        if let Some(old) = g.by_id.get(&e.peer.id) {
            let k = old.peer.noise_key;
            g.by_key.remove(&k);
        }
        g.by_key.insert(e.peer.noise_key, e.peer.id);
        g.by_id.insert(e.peer.id, e);
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
        g.learnt.insert(id, (stricter(prev, state), forget_at, now));
    }

    /// The live node a Noise static key is bound to.
    pub fn by_noise_key(&self, key: &[u8; 32], now: u64) -> Option<NodeId> {
        let g = self.inner.read().expect("directory lock");
        g.by_key
            .get(key)
            .filter(|id| g.by_id.get(id).is_some_and(|e| e.live(now)))
            .copied()
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
            if let Some(e) = g.by_id.remove(id) {
                g.by_key.remove(&e.peer.noise_key);
            }
        }
        g.learnt.retain(|_, (_, until, _)| *until > now);
        dead.len()
    }

    /// Verifies and records a signed advert; the entry if it was news.
    pub fn accept(&self, bytes: &[u8], own: &NodeId, now: u64) -> Result<Option<Entry>, Dropped> {
        let (advert, entry) = verify_advert(bytes, now)?;
        if entry.peer.id == *own {
            return Ok(None);
        }
        {
            let g = self.inner.read().expect("directory lock");
            if let Some(old) = g.by_id.get(&entry.peer.id) {
                if old.seq >= advert.seq {
                    return if old.seq == advert.seq {
                        Ok(None)
                    } else {
                        Err(drop_("stale", "older sequence number"))
                    };
                }
            }
            if let Some(holder) = g.by_key.get(&entry.peer.noise_key)
                && *holder != entry.peer.id
                && g.by_id.get(holder).is_some_and(|e| e.live(now))
            {
                return Err(drop_(
                    "key_conflict",
                    format!("noise key already bound to node {holder}"),
                ));
            }
        }
        self.insert(entry.clone());
        let mut g = self.inner.write().expect("directory lock");
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
    let jurisdiction = crate::config::parse_jurisdiction(&a.jurisdiction)
        .map_err(|e| drop_("invalid", e.to_string()))?;
    let roles = Roles {
        entry: a.roles & 1 != 0,
        relay: a.roles & 2 != 0,
        exit: a.roles & 4 != 0,
    };
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
    };
    Ok((a, entry))
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
}

impl OwnAdvert<'_> {
    /// Signs an advert with this sequence number and expiry.
    pub fn sign(&self, seq: u64, expires_at_ms: u64) -> Vec<u8> {
        let roles = u32::from(self.roles.entry)
            | u32::from(self.roles.relay) << 1
            | u32::from(self.roles.exit) << 2;
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
    use crate::identity::Keys;

    fn own(k: &Keys) -> OwnAdvert<'_> {
        OwnAdvert {
            key: &k.identity,
            noise_public: k.noise_public,
            link: Some("127.0.0.1:7001".parse().unwrap()),
            p2p_addrs: vec![],
            jurisdiction: Jurisdiction(*b"DE"),
            roles: Roles {
                entry: false,
                relay: true,
                exit: false,
            },
            family: "op".into(),
            capacity_mbps: 100,
            load: 0.25,
            state: NodeState::Active,
        }
    }

    #[test]
    fn adverts_are_verified_sequenced_and_expire() {
        let k = Keys::generate();
        let d = Directory::default();
        let me = NodeId([0; 32]);
        let a1 = own(&k).sign(1, 1_000);
        assert!(d.accept(&a1, &me, 500).unwrap().is_some());
        assert!(d.accept(&a1, &me, 500).unwrap().is_none());
        assert_eq!(d.by_noise_key(&k.noise_public, 500), Some(k.node_id()));
        assert_eq!(d.get(&k.node_id(), 500).unwrap().load, 0.25);
        let a2 = own(&k).sign(2, 2_000);
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
            d.accept(&own(&k).sign(3, 100), &me, 600).unwrap_err().kind,
            "expired"
        );
    }
}
