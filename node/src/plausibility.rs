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
//! Light covers 300 km per millisecond in vacuum (a third less in fibre;
//! microwave and laser links come close to vacuum), so a round trip between
//! places `d` km apart takes at least `d / 150` ms. For a landmark
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
//!   than light, and queueing only adds delay, so a node cannot seem
//!   *closer* than it is.
//! - It catches misconfiguration and nodes that do not hide, not a node set
//!   on lying: a node can always seem further away, and it knows when a
//!   landmark measures it (the landmark's handshake names it), so it can
//!   delay its answers to landmarks only. Only a positive bound would hold
//!   against that (a small round trip to a landmark *inside* the claimed
//!   jurisdiction bounds the distance from above); that needs landmarks in
//!   every jurisdiction and is not built.
//! - It cannot confirm a claim. A node 50 ms from a landmark may be in any
//!   jurisdiction that far or nearer; neighbouring jurisdictions (distance
//!   0 in the table) are never told apart.
//! - Landmarks must be trusted: a landmark that lies about a measurement
//!   can quarantine any node it names. The authority vouches for
//!   landmarks as it vouches for jurisdictions, and revoking a landmark
//!   voids its reports (its certificate no longer verifies).
//! - Evidence is per landmark and node: the newest report of each pair
//!   stands (an older one replayed changes nothing), a consistent report
//!   lifts that landmark's evidence, evidence about a claim the node no
//!   longer makes does not count, and revoking a landmark or the node
//!   drops its evidence.

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

/// The least round trip possible between `a` and `b`: light in vacuum,
/// 300 km per millisecond each way.
pub fn min_rtt(a: Jurisdiction, b: Jurisdiction) -> Duration {
    Duration::from_nanos(u64::from(min_distance_km(a, b)) * 20_000 / 3)
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
    /// Expired, or made to stand longer than a report may.
    #[error("stale report")]
    Stale,
    /// Measured in the future.
    #[error("report from the future")]
    Future,
    /// The node is unknown here.
    #[error("unknown node")]
    UnknownNode,
    /// The node claims another jurisdiction now than the report names.
    #[error("the node's claim has changed")]
    ClaimChanged,
}

impl ReportError {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ReportError::Malformed => "malformed",
            ReportError::NotLandmark => "not_landmark",
            ReportError::BadSignature => "bad_signature",
            ReportError::Stale => "stale",
            ReportError::Future => "future",
            ReportError::UnknownNode => "unknown_node",
            ReportError::ClaimChanged => "claim_changed",
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
        /// When.
        measured_at_ms: u64,
    },
    /// The claim is refuted.
    Refuted(Box<Evidence>),
}

/// The bytes a report's signature covers.
pub fn signed_message(report: &[u8]) -> Vec<u8> {
    let mut msg = MEASUREMENT_CONTEXT.to_vec();
    msg.extend_from_slice(report);
    msg
}

/// Signs a landmark's report.
pub fn sign(keys: &Keys, report: &pb::MeasurementReport) -> Vec<u8> {
    let report = report.encode_to_vec();
    let signature = keys.identity.sign(&signed_message(&report));
    pb::SignedMeasurement {
        report,
        signature: signature.to_bytes().to_vec(),
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
    key.verify(&signed_message(&s.report), &sig)
        .map_err(|_| ReportError::BadSignature)?;
    if r.measured_at_ms > now + 60_000 {
        return Err(ReportError::Future);
    }
    if r.expires_at_ms <= now
        || r.expires_at_ms > r.measured_at_ms + REPORT_LIFETIME.as_millis() as u64
    {
        return Err(ReportError::Stale);
    }
    let n = directory.get(&node, now).ok_or(ReportError::UnknownNode)?;
    let claimed = n.peer.jurisdiction;
    if claimed.to_string() != r.claimed {
        return Err(ReportError::ClaimChanged);
    }
    let measured = Duration::from_micros(r.min_rtt_us);
    let minimum = min_rtt(cert.jurisdiction, claimed);
    if !refutes(measured, minimum) {
        return Ok(Verdict::Plausible {
            landmark,
            node,
            measured_at_ms: r.measured_at_ms,
        });
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

/// A (node, landmark) pair.
type Pair = (NodeId, NodeId);

/// The evidence this node holds, by quarantined node.
#[derive(Debug, Default)]
pub struct Quarantine {
    /// The newest verdict of each (node, landmark) pair: its time, and the
    /// evidence if it refuted. Bounded by known nodes × known landmarks
    /// (both checked against the directory before a verdict is taken).
    pairs: Mutex<HashMap<Pair, (u64, Option<Evidence>)>>,
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

    /// Takes a checked verdict, if it is the newest of its (node,
    /// landmark) pair: evidence quarantines the node; a plausible report
    /// lifts that landmark's evidence (the node moved, or the landmark's
    /// earlier view was wrong). An older report, replayed, changes nothing.
    /// Returns whether the node is newly quarantined.
    pub fn take(&self, verdict: Verdict) -> bool {
        let (key, at, evidence) = match verdict {
            Verdict::Refuted(e) => ((e.node, e.landmark), e.measured_at_ms, Some(*e)),
            Verdict::Plausible {
                landmark,
                node,
                measured_at_ms,
            } => ((node, landmark), measured_at_ms, None),
        };
        let mut q = self.pairs.lock().expect("quarantine lock");
        if q.get(&key).is_some_and(|(t, _)| *t >= at) {
            return false;
        }
        let was = q.iter().any(|((n, _), (_, e))| *n == key.0 && e.is_some());
        let refuted = evidence.is_some();
        q.insert(key, (at, evidence));
        refuted && !was
    }

    /// Forgets what `id` said as a landmark, and what was said of it (it
    /// was revoked).
    pub fn forget(&self, id: &NodeId) {
        self.pairs
            .lock()
            .expect("quarantine lock")
            .retain(|(node, landmark), _| node != id && landmark != id);
    }

    /// Drops lapsed verdicts; returns the evidence in force (one per pair).
    pub fn in_force(&self, now: u64) -> Vec<Evidence> {
        let mut q = self.pairs.lock().expect("quarantine lock");
        q.retain(|_, (at, e)| match e {
            Some(e) => e.expires_at_ms > now,
            None => *at + REPORT_LIFETIME.as_millis() as u64 > now,
        });
        let mut v: Vec<Evidence> = q.values().filter_map(|(_, e)| e.clone()).collect();
        v.sort_by_key(|e| (e.node, e.landmark));
        v
    }

    /// Whether `node`, claiming `claimed` now, is quarantined at `now`
    /// (evidence about a claim it no longer makes does not count).
    pub fn contains(&self, node: &NodeId, claimed: Jurisdiction, now: u64) -> bool {
        self.pairs
            .lock()
            .expect("quarantine lock")
            .iter()
            .any(|((n, _), (_, e))| {
                n == node
                    && e.as_ref()
                        .is_some_and(|e| e.expires_at_ms > now && e.claimed == claimed)
            })
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
        // Places fill in what 1:110m leaves out: Singapore; islands near
        // another country (Nicobar, 150 km from Sumatra; the Canaries,
        // 1,400 km from Dakar; Yonaguni, 110 km from Taiwan); overseas
        // France (Saint-Pierre off Newfoundland, Mayotte off Madagascar,
        // New Caledonia 750 km from Norfolk Island); San Marino inside
        // Italy's 1:110m polygon.
        assert!(min_distance_km(j("SG"), j("PK")) > 3_000);
        for (a, b, at_most) in [
            ("ID", "IN", 150),
            ("ES", "SN", 1_400),
            ("JP", "TW", 110),
            ("CA", "FR", 20),
            ("FR", "MG", 300),
            ("AU", "FR", 750),
            ("IT", "SM", 0),
        ] {
            let km = min_distance_km(j(a), j(b));
            assert!(km <= at_most, "{a}-{b}: {km} km, truly at most {at_most}");
        }
        // 300 km per ms each way: d km take 2d/300 ms there and back.
        let rtt = min_rtt(j("CH"), j("PK")).as_secs_f64() * 1e3;
        assert!((rtt - f64::from(ch_pk) / 150.0).abs() < 1e-3, "{rtt}");
        let ca_au = min_distance_km(j("CA"), j("AU"));
        assert!(ca_au > 9_000, "{ca_au}");
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
        let at = |ms: u64, claimed: &str, when: u64| {
            let r = report(me, node, j(claimed), measured(ms), when).unwrap();
            sign(&lk, &r)
        };
        let make = |ms: u64, claimed: &str| at(ms, claimed, now);
        let ch = j("CH");
        let q = Quarantine::default();
        let old = make(1, "CH");
        let e = q.offer(&old, &dir, own, now).unwrap().expect("refuted");
        assert_eq!((e.claimed, e.landmark_jurisdiction), (ch, j("PK")));
        assert!(e.minimum > Duration::from_millis(25));
        assert!(q.contains(&node, ch, now));
        assert!(
            !q.contains(&node, j("DE"), now),
            "not once it claims otherwise"
        );
        let again = at(1, "CH", now + 1);
        assert!(
            q.offer(&again, &dir, own, now + 1).unwrap().is_none(),
            "not news"
        );
        // Consistent now (the node moved): lifted; the old report, replayed,
        // changes nothing.
        let moved = at(90, "CH", now + 2);
        assert!(q.offer(&moved, &dir, own, now + 2).unwrap().is_none());
        assert!(!q.contains(&node, ch, now + 2));
        assert!(q.offer(&old, &dir, own, now + 3).unwrap().is_none());
        assert!(
            !q.contains(&node, ch, now + 3),
            "a replay does not quarantine"
        );
        // Evidence again; revoking the landmark drops it.
        let back = at(1, "CH", now + 4);
        assert!(q.offer(&back, &dir, own, now + 4).unwrap().is_some());
        q.forget(&me);
        assert!(!q.contains(&node, ch, now + 4));
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
        assert_eq!(err(&make(1, "DE"), own), ReportError::ClaimChanged);
        assert_eq!(err(&at(1, "CH", now + 3_600_000), own), ReportError::Future);
        assert_eq!(err(&[0xff; 2000], own), ReportError::Malformed);
        assert_eq!(
            q.results().iter().find(|(k, _)| *k == "refuted").unwrap().1,
            4
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
