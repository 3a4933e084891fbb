//! The rulings a node holds: verified, versioned, persisted, and counted
//! when refused. The last good state always stays in force.

use crate::authority::{Authority, Refusal};
use crate::store::{Store, cf};
use ferry_proto::pb;
use ferry_router::{Blocs, Rejected, RulingSet};
use prost::Message;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use tracing::{info, warn};

/// What offering a ruling did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// It is now in force (new, or a newer version).
    InForce,
    /// The same signed body was already in force.
    Duplicate,
}

/// A node's rulings.
pub struct Rulings {
    authority: Authority,
    store: Option<Arc<Store>>,
    blocs: Blocs,
    set: RwLock<RulingSet>,
    signed: Mutex<BTreeMap<String, Vec<u8>>>,
    bodies: Mutex<BTreeMap<String, Vec<u8>>>,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
}

impl Rulings {
    /// Rulings trusted under `authority`, restored from `store`.
    pub fn load(authority: Authority, store: Option<Arc<Store>>) -> anyhow::Result<Self> {
        let r = Self {
            authority,
            store,
            blocs: Blocs::builtin(),
            set: RwLock::new(RulingSet::new()),
            signed: Mutex::new(BTreeMap::new()),
            bodies: Mutex::new(BTreeMap::new()),
            rejected: Mutex::new(BTreeMap::new()),
        };
        if let Some(store) = &r.store {
            for (_, bytes) in store.all(cf::RULINGS)? {
                // Stored rulings were valid when accepted; their signatures
                // are checked again, their receipt window is not.
                match r.authority.verify(&bytes, 0) {
                    Ok((signed, _, ruling)) => {
                        let _ = r
                            .set
                            .write()
                            .expect("rulings lock")
                            .apply(ruling.clone(), &r.blocs);
                        r.signed
                            .lock()
                            .expect("lock")
                            .insert(ruling.id.clone(), bytes.clone());
                        r.bodies
                            .lock()
                            .expect("lock")
                            .insert(ruling.id, signed.body);
                    }
                    Err(e) => warn!(reason = %e, "stored ruling no longer verifies; ignored"),
                }
            }
        }
        Ok(r)
    }

    /// Verifies and applies a signed ruling; counts a refusal.
    pub fn offer(&self, bytes: &[u8], now: u64) -> Result<Offered, Refusal> {
        let res = self.offer_inner(bytes, now);
        if let Err(e) = &res {
            *self
                .rejected
                .lock()
                .expect("lock")
                .entry(e.kind)
                .or_default() += 1;
            warn!(reason = e.kind, detail = %e.detail, "ruling refused");
        }
        res
    }

    fn offer_inner(&self, bytes: &[u8], now: u64) -> Result<Offered, Refusal> {
        let (signed, body, ruling) = self.authority.verify(bytes, now)?;
        if self.bodies.lock().expect("lock").get(&ruling.id) == Some(&signed.body) {
            return Ok(Offered::Duplicate);
        }
        let mut set = self.set.write().expect("rulings lock");
        set.apply(ruling.clone(), &self.blocs)
            .map_err(|e| Refusal {
                kind: match e {
                    Rejected::Rollback { .. } => "rollback",
                    Rejected::Invalid(_) => "invalid",
                },
                detail: e.to_string(),
            })?;
        drop(set);
        let canonical = pb::SignedRuling {
            body: signed.body.clone(),
            signatures: signed.signatures,
        }
        .encode_to_vec();
        if let Some(store) = &self.store
            && let Err(e) = store.put(cf::RULINGS, ruling.id.as_bytes(), &canonical)
        {
            warn!(error = %format!("{e:#}"), "could not persist a ruling");
        }
        self.signed
            .lock()
            .expect("lock")
            .insert(ruling.id.clone(), canonical);
        self.bodies
            .lock()
            .expect("lock")
            .insert(ruling.id.clone(), signed.body);
        info!(id = %ruling.id, version = body.version, region = %ruling.region, lifted = ruling.lifted, "ruling in force");
        Ok(Offered::InForce)
    }

    /// The rulings in force.
    pub fn snapshot(&self) -> RulingSet {
        self.set.read().expect("rulings lock").clone()
    }

    /// The signed form of every ruling in force (for re-gossip).
    pub fn signed(&self) -> Vec<Vec<u8>> {
        self.signed
            .lock()
            .expect("lock")
            .values()
            .cloned()
            .collect()
    }

    /// Refusals so far, by reason.
    pub fn rejections(&self) -> BTreeMap<&'static str, u64> {
        self.rejected.lock().expect("lock").clone()
    }
}
