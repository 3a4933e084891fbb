//! Jurisdiction claims checked against physics: landmarks' signed round-trip
//! measurements refute claims of being far away.
//!
//! A node's jurisdiction is what its operator told the authority. A
//! *landmark* is a node whose location the authority knows (its
//! certificate carries coordinates, `ferry authority admit --landmark`). It
//! links to the nodes it knows, measures the round trip on each link
//! (`link::Rtt::min`, the least of its PING/PONG samples), and signs a
//! [`pb::MeasurementReport`] per node, gossiped on `ferry/measurements/1`.
//!
//! Light in fibre covers about 200 km per millisecond, so a round trip
//! between places `d` km apart takes at least `d / 100` ms. For a landmark
//! in jurisdiction L and a node claiming J, `node/data/min-distance-km.csv`
//! (Natural Earth, `scripts/gen-distances.py`) gives a lower bound on the
//! distance between any point of L and any point of J, so a lower bound on
//! the round trip. A measurement below it by more than [`margin`] refutes
//! the claim: the node is *quarantined* at every node that has the report.
//! It leaves path selection there, its state shows `quarantined` with the
//! evidence (landmark, measured and minimum round trip), and
//! `ferry_quarantined_nodes` and the `FerryNodeQuarantined` alert fire.
//! Nodes check the landmark's signature and certificate themselves; gossip
//! is not trusted.
//!
//! What this can and cannot prove:
//! - It can refute a claim of being far from a landmark: no path is faster
//!   than light in fibre, and queueing only adds delay, so a node cannot
//!   fake being *closer* than it is (it can always seem further away).
//! - It cannot confirm a claim. A node 50 ms from a landmark may be in any
//!   jurisdiction that far or nearer; neighbouring jurisdictions (distance
//!   0 in the table) are never told apart.
//! - Landmarks must be trusted: a landmark that lies about a measurement
//!   can quarantine any node it names. The authority vouches for
//!   landmarks as it vouches for jurisdictions, and revoking a landmark
//!   voids its reports (its certificate no longer verifies).
//! - A node can present a nearby proxy to a landmark only by being near it:
//!   the measurement is of the node that answers the link's Noise
//!   handshake with its key.

use crate::directory::Directory;
use crate::identity::Keys;
use ed25519_dalek::{Signature, Signer, Verifier, VerifyingKey};
use ferry_proto::pb;
use ferry_router::{Jurisdiction, NodeId};
use prost::Message;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Context of a report's signature.
pub const MEASUREMENT_CONTEXT: &[u8] = b"ferry/measurement/1";

/// Largest signed report accepted, in bytes.
pub const MAX_REPORT: usize = 1024;

/// How long a report stands (a landmark renews its reports well before).
pub const REPORT_LIFETIME: Duration = Duration::from_secs(600);

/// The table: lower bounds on distances between jurisdictions, km.
fn table() -> &'static HashMap<(String, String), u32> {
    static TABLE: std::sync::OnceLock<HashMap<(String, String), u32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        include_str!("../data/min-distance-km.csv")
            .lines()
            .skip(1)
            .filter_map(|l| {
                let mut f = l.split(',');
                let (a, b, km) = (f.next()?, f.next()?, f.next()?.parse().ok()?);
                Some(((a.to_string(), b.to_string()), km))
            })
            .collect()
    })
}

/// A lower bound on the distance between any point of `a` and any of `b`,
/// in km (0 when they touch, are close, or either is not in the table).
pub fn min_distance_km(a: Jurisdiction, b: Jurisdiction) -> u32 {
    let (a, b) = (a.to_string(), b.to_string());
    let key = if a < b { (a, b) } else { (b, a) };
    table().get(&key).copied().unwrap_or(0)
}

/// The least round trip possible between `a` and `b`: light in fibre,
/// about 200 km per millisecond each way.
pub fn min_rtt(a: Jurisdiction, b: Jurisdiction) -> Duration {
    Duration::from_micros(u64::from(min_distance_km(a, b)) * 10)
}

/// How far below the minimum a measurement must be to refute a claim: a
/// tenth of it, and at least 2 ms (clock granularity, the data's
/// coarseness).
pub fn margin(min: Duration) -> Duration {
    (min / 10).max(Duration::from_millis(2))
}

/// Whether `measured` refutes a claim whose minimum round trip is `min`.
pub fn refutes(measured: Duration, min: Duration) -> bool {
    measured + margin(min) < min
}

/// A verified report that refutes a node's claim.
#[derive(Clone, Debug, PartialEq)]
pub struct Evidence {
    /// The landmark.
    pub landmark: NodeId,
    /// Its jurisdiction and location, from its certificate.
    pub landmark_jurisdiction: Jurisdiction,
    /// Where it is, for people.
    pub landmark_place: String,
    /// The node and what it claims.
    pub node: NodeId,
    /// Its claimed jurisdiction.
    pub claimed: Jurisdiction,
    /// The least round trip the landmark measured.
    pub measured: Duration,
    /// The least possible for the claim.
    pub minimum: Duration,
    /// When it was measured and when it lapses (ms since the epoch).
    pub measured_at_ms: u64,
    /// When it lapses.
    pub expires_at_ms: u64,
    /// The signed report, as gossiped (anyone can check it again).
    pub signed: Vec<u8>,
}

/// Why a report was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// Over [`MAX_REPORT`] bytes, or not a report.
    #[error("malformed or oversized report")]
    Malformed,
    /// The landmark is unknown, or its certificate makes it no landmark.
    #[error("not from a known landmark")]
    NotLandmark,
    /// The signature does not verify under the landmark's key.
    #[error("bad signature")]
    BadSignature,
    /// Expired, or measured in the future.
    #[error("stale or future report")]
    Stale,
    /// The node is unknown here, or claims another jurisdiction now.
    #[error("unknown node or another claim")]
    UnknownNode,
}

impl ReportError {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ReportError::Malformed => "malformed",
            ReportError::NotLandmark => "not_landmark",
            ReportError::BadSignature => "bad_signature",
            ReportError::Stale => "stale",
            ReportError::UnknownNode => "unknown_node",
        }
    }
}

/// What a report said, once checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Consistent with the claim: `landmark`'s measurement of `node`.
    Plausible {
        /// The landmark.
        landmark: NodeId,
        /// The node measured.
        node: NodeId,
    },
    /// The claim is refuted.
    Refuted(Box<Evidence>),
}

/// Signs a landmark's report.
pub fn sign(keys: &Keys, report: &pb::MeasurementReport) -> Vec<u8> {
    let report = report.encode_to_vec();
    let mut msg = MEASUREMENT_CONTEXT.to_vec();
    msg.extend_from_slice(&report);
    pb::SignedMeasurement {
        report,
        signature: keys.identity.sign(&msg).to_bytes().to_vec(),
    }
    .encode_to_vec()
}

/// Checks a signed report: the landmark's certificate (a landmark, in
/// force, as the directory holds it, or `own` when the landmark is this
/// node), its signature, its times, and the node's current claim; then
/// judges it.
pub fn check(
    signed: &[u8],
    directory: &Directory,
    own: Option<(NodeId, &crate::cert::Cert)>,
    now: u64,
) -> Result<Verdict, ReportError> {
    if signed.len() > MAX_REPORT {
        return Err(ReportError::Malformed);
    }
    let s = pb::SignedMeasurement::decode(signed).map_err(|_| ReportError::Malformed)?;
    let r =
        pb::MeasurementReport::decode(s.report.as_slice()).map_err(|_| ReportError::Malformed)?;
    let id = |b: &[u8]| -> Result<NodeId, ReportError> {
        Ok(NodeId(b.try_into().map_err(|_| ReportError::Malformed)?))
    };
    let (landmark, node) = (id(&r.landmark_id)?, id(&r.node_id)?);
    let known = directory.get(&landmark, now);
    let cert = match own {
        Some((me, c)) if me == landmark => c,
        _ => known
            .as_ref()
            .and_then(|l| l.cert.as_ref())
            .ok_or(ReportError::NotLandmark)?,
    };
    let place = cert.landmark.as_ref().ok_or(ReportError::NotLandmark)?;
    let key = VerifyingKey::from_bytes(&landmark.0).map_err(|_| ReportError::BadSignature)?;
    let sig = Signature::from_slice(&s.signature).map_err(|_| ReportError::BadSignature)?;
    let mut msg = MEASUREMENT_CONTEXT.to_vec();
    msg.extend_from_slice(&s.report);
    key.verify(&msg, &sig)
        .map_err(|_| ReportError::BadSignature)?;
    if r.expires_at_ms <= now
        || r.measured_at_ms > now + 60_000
        || r.expires_at_ms > r.measured_at_ms + 2 * REPORT_LIFETIME.as_millis() as u64
    {
        return Err(ReportError::Stale);
    }
    let n = directory.get(&node, now).ok_or(ReportError::UnknownNode)?;
    let claimed = n.peer.jurisdiction;
    if claimed.to_string() != r.claimed {
        return Err(ReportError::UnknownNode);
    }
    let measured = Duration::from_micros(r.min_rtt_us);
    let minimum = min_rtt(cert.jurisdiction, claimed);
    if !refutes(measured, minimum) {
        return Ok(Verdict::Plausible { landmark, node });
    }
    Ok(Verdict::Refuted(Box::new(Evidence {
        landmark,
        landmark_jurisdiction: cert.jurisdiction,
        landmark_place: place.to_string(),
        node,
        claimed,
        measured,
        minimum,
        measured_at_ms: r.measured_at_ms,
        expires_at_ms: r.expires_at_ms,
        signed: signed.to_vec(),
    })))
}

/// The evidence this node holds, by quarantined node.
#[derive(Debug, Default)]
pub struct Quarantine {
    by_node: Mutex<HashMap<NodeId, Evidence>>,
    results: Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl Quarantine {
    /// Counts a report's result (`plausible`, `refuted`, or a
    /// [`ReportError::kind`]).
    pub fn count(&self, result: &'static str) {
        *self
            .results
            .lock()
            .expect("results lock")
            .entry(result)
            .or_default() += 1;
    }

    /// Reports taken so far, by result.
    pub fn results(&self) -> Vec<(&'static str, u64)> {
        let r = self.results.lock().expect("results lock");
        r.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// Checks a signed report and takes its verdict; returns the evidence
    /// when it newly quarantines a node. Counted by result.
    pub fn offer(
        &self,
        signed: &[u8],
        directory: &Directory,
        own: Option<(NodeId, &crate::cert::Cert)>,
        now: u64,
    ) -> Result<Option<Evidence>, ReportError> {
        let verdict = check(signed, directory, own, now).inspect_err(|e| self.count(e.kind()))?;
        let evidence = match &verdict {
            Verdict::Refuted(e) => Some((**e).clone()),
            Verdict::Plausible { .. } => None,
        };
        self.count(if evidence.is_some() {
            "refuted"
        } else {
            "plausible"
        });
        Ok(self.take(verdict).then_some(evidence).flatten())
    }

    /// Takes a checked verdict: evidence quarantines the node; a plausible
    /// report from the same landmark lifts that landmark's evidence (the
    /// node moved, or the landmark's earlier view was wrong). Returns
    /// whether the node is newly quarantined.
    pub fn take(&self, verdict: Verdict) -> bool {
        let mut q = self.by_node.lock().expect("quarantine lock");
        match verdict {
            Verdict::Refuted(e) => q.insert(e.node, *e).is_none(),
            Verdict::Plausible { landmark, node } => {
                if q.get(&node).is_some_and(|e| e.landmark == landmark) {
                    q.remove(&node);
                }
                false
            }
        }
    }

    /// Drops lapsed evidence; returns the evidence in force.
    pub fn in_force(&self, now: u64) -> Vec<Evidence> {
        let mut q = self.by_node.lock().expect("quarantine lock");
        q.retain(|_, e| e.expires_at_ms > now);
        let mut v: Vec<Evidence> = q.values().cloned().collect();
        v.sort_by_key(|e| e.node);
        v
    }

    /// Whether `node` is quarantined at `now`.
    pub fn contains(&self, node: &NodeId, now: u64) -> bool {
        self.by_node
            .lock()
            .expect("quarantine lock")
            .get(node)
            .is_some_and(|e| e.expires_at_ms > now)
    }
}

/// The report a landmark makes of its link to `node` (claiming
/// `claimed`), from the link's least round trip.
pub fn report(
    landmark: NodeId,
    node: NodeId,
    claimed: Jurisdiction,
    rtt: crate::link::Rtt,
    now: u64,
) -> Option<pb::MeasurementReport> {
    let min = rtt.min?;
    Some(pb::MeasurementReport {
        landmark_id: landmark.0.to_vec(),
        node_id: node.0.to_vec(),
        claimed: claimed.to_string(),
        min_rtt_us: min.as_micros().try_into().unwrap_or(u64::MAX),
        samples: rtt.samples,
        measured_at_ms: now,
        expires_at_ms: now + REPORT_LIFETIME.as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(s: &str) -> Jurisdiction {
        Jurisdiction::parse(s).unwrap()
    }

    /// The table's bounds are symmetric and plausible: far pairs are far,
    /// neighbours and unknowns are 0.
    #[test]
    fn the_table_bounds_distances() {
        let ch_pk = min_distance_km(j("CH"), j("PK"));
        assert_eq!(ch_pk, min_distance_km(j("PK"), j("CH")));
        // Zurich to Karachi is about 5,000 km; the nearest points of the
        // two countries are somewhat nearer.
        assert!((4_000..5_200).contains(&ch_pk), "{ch_pk}");
        assert_eq!(min_distance_km(j("DE"), j("CH")), 0, "neighbours");
        assert_eq!(min_distance_km(j("SG"), j("PK")), 0, "not in 1:110m");
        assert_eq!(
            min_rtt(j("CH"), j("PK")),
            Duration::from_micros(u64::from(ch_pk) * 10)
        );
        let ca_au = min_distance_km(j("CA"), j("AU"));
        assert!(ca_au > 10_000, "{ca_au}");
    }

    /// A landmark in PK, a node claiming CH in the directory; reports of
    /// it checked as gossip would bring them.
    fn setup() -> (Keys, crate::cert::Cert, Directory, NodeId) {
        let landmark = Keys::generate();
        let cert = crate::cert::Admission {
            jurisdiction: j("PK"),
            family: "lm".into(),
            roles: crate::cert::parse_role_list("relay").unwrap(),
            capacity_max_mbps: 100,
            not_before_ms: 0,
            not_after_ms: u64::MAX,
            landmark: Some(crate::cert::Location::parse("24.86,67.01,Karachi").unwrap()),
        };
        let node = NodeId([7; 32]);
        let peer = crate::directory::Peer {
            id: node,
            noise_key: [1; 32],
            addr: Some("127.0.0.1:1".parse().unwrap()),
            jurisdiction: j("CH"),
            roles: crate::cert::parse_role_list("relay").unwrap(),
        };
        let authority = crate::authority::Authority::new::<&str>(&[], 0).unwrap();
        let dir = Directory::new(authority, Duration::from_secs(30), &[peer]);
        (landmark, cert, dir, node)
    }

    fn measured(ms: u64) -> crate::link::Rtt {
        let mut r = crate::link::Rtt::default();
        r.sample(Duration::from_millis(ms));
        r
    }

    /// Reports are checked, not trusted: a refuting one quarantines, a
    /// consistent one from the same landmark lifts it, and a forged,
    /// stale, misdirected or non-landmark one is refused with the reason.
    #[test]
    fn reports_are_checked_then_judged() {
        let (lk, cert, dir, node) = setup();
        let me = lk.node_id();
        let now = 1_000_000;
        let own = Some((me, &cert));
        let make = |ms: u64, claimed: &str| {
            let r = report(me, node, j(claimed), measured(ms), now).unwrap();
            sign(&lk, &r)
        };
        let q = Quarantine::default();
        let e = q
            .offer(&make(1, "CH"), &dir, own, now)
            .unwrap()
            .expect("refuted");
        assert_eq!((e.claimed, e.landmark_jurisdiction), (j("CH"), j("PK")));
        assert!(e.minimum > Duration::from_millis(40));
        assert!(q.contains(&node, now));
        assert!(
            q.offer(&make(1, "CH"), &dir, own, now).unwrap().is_none(),
            "not news"
        );
        // Consistent now (the node moved): lifted.
        assert!(q.offer(&make(90, "CH"), &dir, own, now).unwrap().is_none());
        assert!(!q.contains(&node, now));
        // Forged: one byte of the signature changed.
        let mut forged = pb::SignedMeasurement::decode(make(1, "CH").as_slice()).unwrap();
        forged.signature[0] ^= 1;
        let err = |b: &[u8], own| check(b, &dir, own, now).unwrap_err();
        assert_eq!(err(&forged.encode_to_vec(), own), ReportError::BadSignature);
        // Signed by another key than the landmark's.
        let other = Keys::generate();
        let r = report(me, node, j("CH"), measured(1), now).unwrap();
        assert_eq!(err(&sign(&other, &r), own), ReportError::BadSignature);
        // Not a landmark's (unknown here, or a certificate without one).
        assert_eq!(err(&make(1, "CH"), None), ReportError::NotLandmark);
        let plain = crate::cert::Admission {
            landmark: None,
            ..cert.clone()
        };
        assert_eq!(
            err(&make(1, "CH"), Some((me, &plain))),
            ReportError::NotLandmark
        );
        // Lapsed, or about another claim than the node's.
        assert_eq!(
            check(
                &make(1, "CH"),
                &dir,
                own,
                now + REPORT_LIFETIME.as_millis() as u64
            )
            .unwrap_err(),
            ReportError::Stale
        );
        assert_eq!(err(&make(1, "DE"), own), ReportError::UnknownNode);
        assert_eq!(err(&[0xff; 2000], own), ReportError::Malformed);
        assert_eq!(
            q.results().iter().find(|(k, _)| *k == "refuted").unwrap().1,
            2
        );
        assert!(
            q.in_force(now + REPORT_LIFETIME.as_millis() as u64)
                .is_empty()
        );
    }

    #[test]
    fn only_a_round_trip_well_below_the_minimum_refutes() {
        let min = Duration::from_millis(45);
        assert!(refutes(Duration::from_millis(1), min));
        assert!(refutes(Duration::from_millis(40), min));
        assert!(
            !refutes(Duration::from_millis(41), min),
            "within the margin"
        );
        assert!(!refutes(Duration::from_millis(90), min));
        // A small minimum has a 2 ms margin: 0 ms is never refuted.
        assert!(!refutes(Duration::ZERO, Duration::from_millis(1)));
        assert!(!refutes(Duration::ZERO, Duration::ZERO));
    }
}
