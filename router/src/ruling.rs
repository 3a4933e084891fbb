//! Jurisdiction rulings, their versions, and what they say at time `t`.
//!
//! A ruling blocks a region (a jurisdiction or a bloc) for a scope of
//! traffic. Its timeline: before `blocked_from` nothing changes; from
//! `blocked_from` the region's nodes are *draining* for that scope (no new
//! circuits; live ones move away); from `exit_by` they are *blocked* (they
//! carry nothing of that scope). A later version of the same ruling id
//! replaces the earlier one: it may move either date or lift the ruling.
//! Where rulings overlap, the strictest wins.

use crate::geo::{Blocs, JurisdictionSet, Region};
use crate::{Jurisdiction, RouterError, Time};
use std::collections::BTreeMap;

/// Which traffic a ruling covers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Everything.
    All,
    /// Only these service classes (for example `enterprise`).
    Classes(Vec<String>),
    /// Only these tenants.
    Tenants(Vec<String>),
}

/// The scope of one piece of traffic: its service class and tenant.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct TrafficScope {
    /// Service class, for example `enterprise` or `consumer`.
    pub class: String,
    /// Tenant name.
    pub tenant: String,
}

impl Scope {
    /// Whether this scope covers the traffic.
    pub fn covers(&self, t: &TrafficScope) -> bool {
        match self {
            Scope::All => true,
            Scope::Classes(cs) => cs.contains(&t.class),
            Scope::Tenants(ts) => ts.contains(&t.tenant),
        }
    }
}

/// One ruling, as signed by the authority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruling {
    /// Stable id across versions.
    pub id: String,
    /// Monotonic per id.
    pub version: u64,
    /// What it blocks.
    pub region: Region,
    /// Draining starts here.
    pub blocked_from: Time,
    /// Nothing of this scope may cross the region from here.
    pub exit_by: Time,
    /// Which traffic.
    pub scope: Scope,
    /// Why (for people).
    pub reason: String,
    /// This version lifts the ruling.
    pub lifted: bool,
}

/// What rulings say about a node for some traffic at some time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// Usable.
    Allowed,
    /// No new circuits; live ones must leave before `until`.
    Draining {
        /// The deadline.
        until: Time,
    },
    /// Carries nothing.
    Blocked,
}

impl Status {
    /// The stricter of two statuses (earlier deadline among drains).
    pub fn strictest(self, other: Status) -> Status {
        match (self, other) {
            (Status::Blocked, _) | (_, Status::Blocked) => Status::Blocked,
            (Status::Draining { until: a }, Status::Draining { until: b }) => {
                Status::Draining { until: a.min(b) }
            }
            (d @ Status::Draining { .. }, _) | (_, d @ Status::Draining { .. }) => d,
            _ => Status::Allowed,
        }
    }

    /// `draining` or `blocked` for a jurisdiction that is leaving; `None`
    /// when it is usable (a bounded label for metrics and status).
    pub fn leaving_label(self) -> Option<&'static str> {
        match self {
            Status::Allowed => None,
            Status::Draining { .. } => Some("draining"),
            Status::Blocked => Some("blocked"),
        }
    }
}

impl Ruling {
    /// Checks the ruling's own consistency.
    pub fn validate(&self, blocs: &Blocs) -> Result<(), RouterError> {
        if self.id.is_empty() {
            return Err(RouterError::BadRuling("empty id".into()));
        }
        if self.exit_by < self.blocked_from {
            return Err(RouterError::BadRuling(format!(
                "ruling {}: exit_by is before blocked_from",
                self.id
            )));
        }
        blocs.resolve(&self.region)?;
        Ok(())
    }

    /// The status this ruling gives at `t` (ignoring region and scope).
    pub fn status_at(&self, t: Time) -> Status {
        if self.lifted || t < self.blocked_from {
            Status::Allowed
        } else if t < self.exit_by {
            Status::Draining {
                until: self.exit_by,
            }
        } else {
            Status::Blocked
        }
    }
}

/// Why a ruling was not applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// An older or equal version of a ruling already in force.
    #[error("ruling {id}: version {got} is not newer than {have}")]
    Rollback {
        /// Ruling id.
        id: String,
        /// Version in force.
        have: u64,
        /// Version offered.
        got: u64,
    },
    /// The ruling is inconsistent.
    #[error("{0}")]
    Invalid(#[from] RouterError),
}

impl Rejected {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejected::Rollback { .. } => "rollback",
            Rejected::Invalid(_) => "invalid",
        }
    }
}

/// The rulings in force: the newest version of each id, with each region
/// resolved to its jurisdictions.
#[derive(Clone, Debug, Default)]
pub struct RulingSet {
    rulings: BTreeMap<String, (Ruling, JurisdictionSet)>,
}

impl RulingSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies a ruling: a new id, or a newer version of one in force.
    /// Refused rulings leave the set unchanged.
    pub fn apply(&mut self, r: Ruling, blocs: &Blocs) -> Result<(), Rejected> {
        r.validate(blocs)?;
        if let Some((have, _)) = self.rulings.get(&r.id)
            && r.version <= have.version
        {
            return Err(Rejected::Rollback {
                id: r.id,
                have: have.version,
                got: r.version,
            });
        }
        let set = blocs.resolve(&r.region)?;
        self.rulings.insert(r.id.clone(), (r, set));
        Ok(())
    }

    /// The rulings in force, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Ruling> {
        self.rulings.values().map(|(r, _)| r)
    }

    /// One ruling by id.
    pub fn get(&self, id: &str) -> Option<&Ruling> {
        self.rulings.get(id).map(|(r, _)| r)
    }

    /// The jurisdictions a ruling covers.
    pub fn region_of(&self, id: &str) -> Option<&JurisdictionSet> {
        self.rulings.get(id).map(|(_, s)| s)
    }

    /// The strictest status for a node in `j` carrying `scope` at `t`, and
    /// the ruling responsible (none when allowed).
    pub fn status(
        &self,
        j: Option<Jurisdiction>,
        scope: &TrafficScope,
        t: Time,
    ) -> (Status, Option<&Ruling>) {
        let Some(j) = j else {
            return (Status::Allowed, None);
        };
        let mut best = (Status::Allowed, None);
        for (r, set) in self.rulings.values() {
            if !set.contains(j) || !r.scope.covers(scope) {
                continue;
            }
            let s = r.status_at(t);
            if s != Status::Allowed && s.strictest(best.0) != best.0 {
                best = (s.strictest(best.0), Some(r));
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ruling(id: &str, version: u64, cc: &str, from: u64, exit: u64) -> Ruling {
        Ruling {
            id: id.into(),
            version,
            region: Region::parse(cc).unwrap(),
            blocked_from: Time(from),
            exit_by: Time(exit),
            scope: Scope::All,
            reason: "test".into(),
            lifted: false,
        }
    }

    fn pk() -> Option<Jurisdiction> {
        Some(Jurisdiction(*b"PK"))
    }

    #[test]
    fn timeline_allowed_draining_blocked() {
        let mut set = RulingSet::new();
        set.apply(ruling("r1", 1, "PK", 100, 200), &Blocs::builtin())
            .unwrap();
        let sc = TrafficScope::default();
        assert_eq!(set.status(pk(), &sc, Time(99)).0, Status::Allowed);
        assert_eq!(
            set.status(pk(), &sc, Time(100)).0,
            Status::Draining { until: Time(200) }
        );
        assert_eq!(set.status(pk(), &sc, Time(200)).0, Status::Blocked);
        assert_eq!(
            set.status(Some(Jurisdiction(*b"DE")), &sc, Time(300)).0,
            Status::Allowed
        );
        assert_eq!(set.status(None, &sc, Time(300)).0, Status::Allowed);
    }

    #[test]
    fn versions_amend_lift_and_refuse_rollback() {
        let blocs = Blocs::builtin();
        let mut set = RulingSet::new();
        let sc = TrafficScope::default();
        set.apply(ruling("r1", 1, "PK", 100, 200), &blocs).unwrap();
        set.apply(ruling("r1", 2, "PK", 100, 150), &blocs).unwrap();
        assert_eq!(set.status(pk(), &sc, Time(160)).0, Status::Blocked);
        let err = set.apply(ruling("r1", 2, "PK", 0, 0), &blocs).unwrap_err();
        assert_eq!(err.kind(), "rollback");
        let err = set.apply(ruling("r1", 1, "PK", 0, 0), &blocs).unwrap_err();
        assert!(err.to_string().contains("not newer"), "{err}");
        let mut lift = ruling("r1", 3, "PK", 100, 150);
        lift.lifted = true;
        set.apply(lift, &blocs).unwrap();
        assert_eq!(set.status(pk(), &sc, Time(160)).0, Status::Allowed);
    }

    #[test]
    fn overlaps_resolve_to_the_strictest_and_scopes_apply() {
        let blocs = Blocs::builtin();
        let mut set = RulingSet::new();
        set.apply(ruling("a", 1, "PK", 100, 300), &blocs).unwrap();
        set.apply(ruling("b", 1, "PK", 150, 250), &blocs).unwrap();
        let sc = TrafficScope::default();
        assert_eq!(
            set.status(pk(), &sc, Time(160)).0,
            Status::Draining { until: Time(250) }
        );
        let mut ent = ruling("c", 1, "GCC", 0, 10);
        ent.scope = Scope::Classes(vec!["enterprise".into()]);
        set.apply(ent, &blocs).unwrap();
        let ae = Some(Jurisdiction(*b"AE"));
        let enterprise = TrafficScope {
            class: "enterprise".into(),
            tenant: "acme".into(),
        };
        let consumer = TrafficScope {
            class: "consumer".into(),
            tenant: "acme".into(),
        };
        assert_eq!(set.status(ae, &enterprise, Time(20)).0, Status::Blocked);
        assert_eq!(set.status(ae, &consumer, Time(20)).0, Status::Allowed);
    }

    #[test]
    fn bad_rulings_are_refused() {
        let blocs = Blocs::builtin();
        let mut set = RulingSet::new();
        assert!(set.apply(ruling("x", 1, "PK", 200, 100), &blocs).is_err());
        assert!(
            set.apply(ruling("x", 1, "NOT_A_BLOC", 1, 2), &blocs)
                .is_err()
        );
        assert_eq!(set.iter().count(), 0);
    }
}
