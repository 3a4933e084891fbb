//! What the authority says that a node holds: rulings (verified, versioned,
//! persisted, counted when refused; the last good state always stays in
//! force) and revocations of nodes (verified, persisted, never expiring).
//!
//! Where a ruling comes from decides what is checked ([`Source`]): one an
//! operator publishes through the admin API must be inside its signature's
//! receipt window; one a peer passes on (gossip, or the sync a node runs at
//! each connection) is taken at any age, so a node that joins long after a
//! ruling was signed still learns it. Replays are caught by version: the
//! same version again is a duplicate (never a refusal, never a warning), an
//! older one is a rollback (refused and counted when gossiped; quietly
//! ignored in a sync answer from a peer that is behind).

use crate::authority::{Authority, Refusal};
use crate::log_limit::LogLimit;
use crate::store::{Store, cf};
use ferry_proto::pb;
use ferry_router::{Blocs, NodeId, Rejected, RulingSet};
use prost::Message;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use tracing::{info, warn};

/// A ruling's scope as the admin API, the what-if and the exit report
/// show it: `"all"`, `{"classes": [..]}` or `{"tenants": [..]}`.
pub fn scope_json(s: &ferry_router::Scope) -> serde_json::Value {
    match s {
        ferry_router::Scope::All => serde_json::json!("all"),
        ferry_router::Scope::Classes(c) => serde_json::json!({ "classes": c }),
        ferry_router::Scope::Tenants(t) => serde_json::json!({ "tenants": t }),
    }
}

/// Refusals counted by reason, each logged as [`Log`] says.
#[derive(Debug, Default)]
struct Refusals {
    counts: Mutex<BTreeMap<&'static str, u64>>,
    warned: LogLimit,
}

/// How a refusal is logged.
enum Log {
    /// WARN (an operator sent it and is told).
    Warn,
    /// WARN as [`LogLimit`] allows at this time (ms), else DEBUG: what a
    /// remote party can repeat.
    Limited(u64),
    /// DEBUG (counted, and summed by the caller).
    Debug,
}

impl Refusals {
    fn record(&self, e: &Refusal, what: &str, log: Log) {
        *self.counts.lock().expect("lock").entry(e.kind).or_default() += 1;
        let warn = match log {
            Log::Warn => Some(0),
            Log::Limited(now) => self.warned.allow(e.kind, now),
            Log::Debug => None,
        };
        match warn {
            Some(0) => warn!(reason = e.kind, detail = %e.detail, "{what} refused"),
            Some(held_back) => {
                warn!(reason = e.kind, detail = %e.detail, held_back, "{what} refused")
            }
            None => tracing::debug!(reason = e.kind, detail = %e.detail, "{what} refused"),
        }
    }

    fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.counts.lock().expect("lock").clone()
    }
}

/// Where a signed ruling came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// An operator, through the admin API: the receipt window applies.
    Operator,
    /// A peer's gossip: any age; a rollback is refused and counted.
    Gossip,
    /// A peer's answer to this node's sync: any age; held and older
    /// versions are ignored (the peer may simply be behind).
    Sync,
}

/// What offering a ruling did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// It is now in force (new, or a newer version).
    InForce,
    /// The same signed body was already in force.
    Duplicate,
    /// The same body, with signatures by further trusted keys: kept (and
    /// gossiped on), so the ruling outlives the retirement of a key.
    Cosigned,
    /// A sync answer carried a version older than the one in force.
    Behind,
}

/// A node's rulings.
pub struct Rulings {
    authority: Authority,
    store: Option<Arc<Store>>,
    blocs: Blocs,
    set: RwLock<RulingSet>,
    signed: Mutex<BTreeMap<String, Vec<u8>>>,
    bodies: Mutex<BTreeMap<String, Vec<u8>>>,
    rejected: Refusals,
    synced: std::sync::atomic::AtomicBool,
    synced_notify: tokio::sync::Notify,
}

impl Rulings {
    /// Records that a peer answered this node's sync; true the first time.
    pub fn mark_synced(&self) -> bool {
        let first = !self.synced.swap(true, std::sync::atomic::Ordering::SeqCst);
        self.synced_notify.notify_waiters();
        first
    }

    /// Waits until a peer has answered this node's sync, at most `limit`;
    /// whether it has.
    pub async fn wait_synced(&self, limit: std::time::Duration) -> bool {
        let notified = self.synced_notify.notified();
        if self.synced() {
            return true;
        }
        let _ = tokio::time::timeout(limit, notified).await;
        self.synced()
    }

    /// Whether a peer has answered this node's sync yet.
    pub fn synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Rulings trusted under `authority`, restored from `store`.
    pub fn load(authority: Authority, store: Option<Arc<Store>>) -> anyhow::Result<Self> {
        let r = Self {
            authority,
            store,
            blocs: Blocs::builtin(),
            set: RwLock::new(RulingSet::new()),
            signed: Mutex::new(BTreeMap::new()),
            bodies: Mutex::new(BTreeMap::new()),
            rejected: Refusals::default(),
            synced: Default::default(),
            synced_notify: tokio::sync::Notify::new(),
        };
        if let Some(store) = &r.store {
            for (_, bytes) in store.all(cf::RULINGS)? {
                // Stored rulings were valid when accepted; their signatures
                // are checked again, their receipt window is not.
                match r.authority.verify(&bytes, None) {
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
    pub fn offer(&self, bytes: &[u8], now: u64, from: Source) -> Result<Offered, Refusal> {
        let res = self.offer_inner(bytes, now, from);
        if from == Source::Sync
            && let Err(Refusal {
                kind: "rollback", ..
            }) = &res
        {
            return Ok(Offered::Behind);
        }
        if let Err(e) = &res {
            // A peer's sync answer can carry many: the caller sums them.
            let log = match from {
                Source::Operator => Log::Warn,
                Source::Gossip => Log::Limited(now),
                Source::Sync => Log::Debug,
            };
            self.rejected.record(e, "ruling", log);
        }
        res
    }

    fn offer_inner(&self, bytes: &[u8], now: u64, from: Source) -> Result<Offered, Refusal> {
        let (signed, body, ruling) = self.authority.verify(bytes, None)?;
        if self.bodies.lock().expect("lock").get(&ruling.id) == Some(&signed.body) {
            return Ok(if self.merge_signatures(&ruling.id, signed.signatures) {
                Offered::Cosigned
            } else {
                Offered::Duplicate
            });
        }
        // A body not held yet is an introduction when an operator publishes
        // it or gossip brings it (gossip carries only what is new): its
        // window applies. A sync answer passes on what is in force.
        if from != Source::Sync && body.expires_at_ms < now {
            return Err(Refusal {
                kind: "expired",
                detail: format!(
                    "ruling {} v{}: its signature's window to be published has passed; sign a new version",
                    body.id, body.version
                ),
            });
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

    /// Keeps signatures by further keys on a ruling already held (the same
    /// body, cosigned later; see [`Authority::merge_signatures`]).
    fn merge_signatures(&self, id: &str, more: Vec<pb::AuthoritySignature>) -> bool {
        let mut signed = self.signed.lock().expect("lock");
        let Some(held) = signed.get(id) else {
            return false;
        };
        let Ok(mut held_pb) = pb::SignedRuling::decode(held.as_slice()) else {
            return false;
        };
        let body = held_pb.body.clone();
        if !self.authority.merge_signatures(
            crate::authority::RULING_CONTEXT,
            &body,
            &mut held_pb.signatures,
            more,
        ) {
            return false;
        }
        let bytes = held_pb.encode_to_vec();
        if let Some(store) = &self.store
            && let Err(e) = store.put(cf::RULINGS, id.as_bytes(), &bytes)
        {
            warn!(error = %format!("{e:#}"), "could not persist a ruling's new signatures");
        }
        info!(id, signatures = held_pb.signatures.len(), "ruling cosigned");
        signed.insert(id.to_string(), bytes);
        true
    }

    /// The rulings in force.
    pub fn snapshot(&self) -> RulingSet {
        self.set.read().expect("rulings lock").clone()
    }

    /// The signed form of every ruling in force (for a peer's sync).
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
        self.rejected.snapshot()
    }
}

/// What offering a revocation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// The node is revoked from now on.
    New(NodeId),
    /// Already held; signatures by further trusted keys were kept.
    Cosigned(NodeId),
    /// Already held, as it is.
    Duplicate,
}

/// The revocations a node holds: node ids the authority withdrew, with the
/// signed statements (persisted, passed on in syncs; they never expire).
pub struct Revocations {
    authority: Authority,
    store: Option<Arc<Store>>,
    signed: Mutex<BTreeMap<NodeId, Vec<u8>>>,
    rejected: Refusals,
}

impl Revocations {
    /// Revocations trusted under `authority`, restored from `store`.
    pub fn load(authority: Authority, store: Option<Arc<Store>>) -> anyhow::Result<Self> {
        let r = Self {
            authority,
            store,
            signed: Mutex::new(BTreeMap::new()),
            rejected: Refusals::default(),
        };
        if let Some(store) = &r.store {
            for (_, bytes) in store.all(cf::REVOCATIONS)? {
                match r.authority.verify_revocation(&bytes) {
                    Ok((id, _)) => {
                        r.signed.lock().expect("lock").insert(id, bytes);
                    }
                    Err(e) => warn!(reason = %e, "stored revocation no longer verifies; ignored"),
                }
            }
        }
        Ok(r)
    }

    /// Verifies a signed revocation and applies it here. A refusal is
    /// counted and logged; a revocation already held is not, but a held one
    /// with signatures by further trusted keys keeps them (so it outlives
    /// the retirement of an authority key, like a cosigned ruling).
    pub fn offer(&self, bytes: &[u8]) -> Result<Revoked, Refusal> {
        let (id, body) = match self.authority.verify_revocation(bytes) {
            Ok(x) => x,
            Err(e) => {
                self.rejected
                    .record(&e, "revocation", Log::Limited(crate::authority::now_ms()));
                return Err(e);
            }
        };
        let mut g = self.signed.lock().expect("lock");
        if let Some(held) = g.get(&id) {
            let (Ok(mut held), Ok(more)) = (
                pb::SignedRevocation::decode(held.as_slice()),
                pb::SignedRevocation::decode(bytes),
            ) else {
                return Ok(Revoked::Duplicate);
            };
            if held.body != more.body
                || !self.authority.merge_signatures(
                    crate::cert::REVOCATION_CONTEXT,
                    &more.body,
                    &mut held.signatures,
                    more.signatures,
                )
            {
                return Ok(Revoked::Duplicate);
            }
            let merged = held.encode_to_vec();
            self.persist(&id, &merged);
            g.insert(id, merged);
            return Ok(Revoked::Cosigned(id));
        }
        self.persist(&id, bytes);
        g.insert(id, bytes.to_vec());
        info!(node = %id.short(), reason = %body.reason, "node revoked by the authority");
        Ok(Revoked::New(id))
    }

    fn persist(&self, id: &NodeId, bytes: &[u8]) {
        if let Some(store) = &self.store
            && let Err(e) = store.put(cf::REVOCATIONS, &id.0, bytes)
        {
            warn!(error = %format!("{e:#}"), "could not persist a revocation");
        }
    }

    /// The revoked nodes.
    pub fn revoked(&self) -> Vec<NodeId> {
        self.signed.lock().expect("lock").keys().copied().collect()
    }

    /// The signed form of every revocation (for a peer's sync).
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
        self.rejected.snapshot()
    }
}

impl Rulings {
    /// Fills the rulings' metrics (at scrape time).
    pub fn observe(&self, m: &crate::metrics::ControlMetrics) {
        m.ruling_version.reset();
        for r in self.snapshot().iter().filter(|r| !r.lifted) {
            m.ruling_version
                .with_label_values(&[&r.id])
                .set(r.version.min(i64::MAX as u64) as i64);
        }
        for (reason, n) in self.rejections() {
            crate::metrics::advance(&m.ruling_rejections.with_label_values(&[reason]), n);
        }
    }
}

impl Revocations {
    /// Fills the revocations' metrics (at scrape time).
    pub fn observe(&self, m: &crate::metrics::ControlMetrics) {
        m.revoked.set(self.revoked().len() as i64);
        for (reason, n) in self.rejections() {
            crate::metrics::advance(&m.revocation_rejections.with_label_values(&[reason]), n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::{RulingFile, now_ms, sign};
    use ed25519_dalek::SigningKey;
    use rand::rngs::OsRng;
    use std::time::Duration;

    fn authority(keys: &[&SigningKey]) -> Authority {
        let hexes: Vec<String> = keys
            .iter()
            .map(|k| hex::encode(k.verifying_key().as_bytes()))
            .collect();
        Authority::new(&hexes, 1).unwrap()
    }

    fn ruling(version: u64, valid_for: Duration) -> pb::SignedRuling {
        let f = RulingFile {
            id: "pk".into(),
            version,
            region: "PK".into(),
            blocked_from: "2030-01-01T00:00:00Z".into(),
            exit_by: "2030-01-15T00:00:00Z".into(),
            classes: vec![],
            tenants: vec![],
            reason: "order".into(),
            lifted: false,
        };
        pb::SignedRuling {
            body: f.to_body(now_ms(), valid_for).unwrap().encode_to_vec(),
            signatures: vec![],
        }
    }

    #[test]
    fn the_window_bounds_introduction_only_and_replays_are_caught_by_version() {
        let k = SigningKey::generate(&mut OsRng);
        let r = Rulings::load(authority(&[&k]), None).unwrap();
        let mut v1 = ruling(1, Duration::from_secs(60));
        sign(&mut v1, &k);
        let mut v2 = ruling(2, Duration::from_secs(60));
        sign(&mut v2, &k);
        let (v1, v2) = (v1.encode_to_vec(), v2.encode_to_vec());
        let later = now_ms() + 86_400_000;
        // Past its window an operator cannot introduce it...
        let e = r.offer(&v1, later, Source::Operator).unwrap_err();
        assert_eq!(e.kind, "expired");
        // ...but peers pass it on at any age.
        assert_eq!(r.offer(&v1, later, Source::Sync), Ok(Offered::InForce));
        // Gossip carries only what is new: a stale introduction is refused.
        assert_eq!(
            r.offer(&v2, later, Source::Gossip).unwrap_err().kind,
            "expired"
        );
        assert_eq!(r.offer(&v2, later, Source::Sync), Ok(Offered::InForce));
        // The same version again is a duplicate, never a refusal.
        assert_eq!(r.offer(&v2, later, Source::Gossip), Ok(Offered::Duplicate));
        assert_eq!(r.offer(&v2, later, Source::Sync), Ok(Offered::Duplicate));
        // An older one: quietly behind in a sync answer, a refused rollback
        // when gossiped.
        assert_eq!(r.offer(&v1, later, Source::Sync), Ok(Offered::Behind));
        assert_eq!(r.rejections().get("rollback"), None);
        assert_eq!(
            r.offer(&v1, now_ms(), Source::Gossip).unwrap_err().kind,
            "rollback"
        );
        assert_eq!(r.rejections().get("rollback"), Some(&1));
        assert_eq!(r.rejections().get("expired"), Some(&2));
    }

    #[test]
    fn the_authority_rotates_its_key_and_rulings_in_force_survive_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let (old, new) = (
            SigningKey::generate(&mut OsRng),
            SigningKey::generate(&mut OsRng),
        );
        let mut signed = ruling(1, Duration::from_secs(3600));
        sign(&mut signed, &old);
        let r = Rulings::load(authority(&[&old]), Some(store.clone())).unwrap();
        let now = now_ms();
        assert_eq!(
            r.offer(&signed.encode_to_vec(), now, Source::Operator),
            Ok(Offered::InForce)
        );
        drop(r);
        // 1. The new key is added everywhere (a rolling restart).
        let r = Rulings::load(authority(&[&old, &new]), Some(store.clone())).unwrap();
        assert_eq!(r.snapshot().iter().count(), 1);
        // 2. The rulings in force are cosigned with it and published again,
        // even after their window (a ruling in force for months).
        sign(&mut signed, &new);
        assert_eq!(
            r.offer(&signed.encode_to_vec(), now + 7_200_000, Source::Operator),
            Ok(Offered::Cosigned)
        );
        assert_eq!(
            r.offer(&signed.encode_to_vec(), now, Source::Gossip),
            Ok(Offered::Duplicate)
        );
        drop(r);
        // Revocations in force likewise.
        let node = NodeId([7; 32]);
        let old_only =
            crate::cert::RevocationFile::new(&node, "key lost", now, std::slice::from_ref(&old))
                .unwrap()
                .to_signed()
                .unwrap();
        let revs = Revocations::load(authority(&[&old, &new]), Some(store.clone())).unwrap();
        assert_eq!(
            revs.offer(&old_only.encode_to_vec()),
            Ok(Revoked::New(node))
        );
        let mut both = old_only.clone();
        crate::authority::sign_with(
            crate::cert::REVOCATION_CONTEXT,
            &both.body.clone(),
            &mut both.signatures,
            &new,
        );
        assert_eq!(
            revs.offer(&both.encode_to_vec()),
            Ok(Revoked::Cosigned(node))
        );
        assert_eq!(revs.offer(&both.encode_to_vec()), Ok(Revoked::Duplicate));
        drop(revs);
        // 3. The old key is removed: the stored ruling still verifies, and
        // the revocation still holds.
        let r = Rulings::load(authority(&[&new]), Some(store.clone())).unwrap();
        assert_eq!(r.snapshot().iter().count(), 1, "the ruling survived");
        drop(r);
        let revs = Revocations::load(authority(&[&new]), Some(store.clone())).unwrap();
        assert_eq!(revs.revoked(), vec![node], "the revocation survived");
        drop(revs);
        // Without step 2 it would not have: signed by the old key only.
        let dir2 = tempfile::tempdir().unwrap();
        let store2 = Arc::new(Store::open(dir2.path()).unwrap());
        let mut only_old = ruling(1, Duration::from_secs(3600));
        sign(&mut only_old, &old);
        let r = Rulings::load(authority(&[&old, &new]), Some(store2.clone())).unwrap();
        r.offer(&only_old.encode_to_vec(), now, Source::Operator)
            .unwrap();
        drop(r);
        let r = Rulings::load(authority(&[&new]), Some(store2)).unwrap();
        assert_eq!(r.snapshot().iter().count(), 0);
    }
}
