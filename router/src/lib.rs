#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod drain;
pub mod geo;
mod path;
pub mod ruling;

pub use drain::{
    Action, DrainConfig, DrainPlan, Hop, Impact, JurisdictionImpact, Leave, LiveCircuit,
    must_leave, plan_drain, what_if,
};
pub use geo::{Blocs, JurisdictionSet, Region};
pub use path::{
    Constraints, MAX_HOPS, NoPath, Path, PathIndex, PathRequest, Resolved, select_path,
};
pub use ruling::{Rejected, Ruling, RulingSet, Scope, Status, TrafficScope};

use std::fmt;

/// A point in time: milliseconds since the UNIX epoch. The router never reads
/// a clock; every decision takes `now` as an input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(pub u64);

impl Time {
    /// `self + ms`, saturating.
    pub fn plus_ms(self, ms: u64) -> Time {
        Time(self.0.saturating_add(ms))
    }

    /// `self - ms`, saturating at zero.
    pub fn minus_ms(self, ms: u64) -> Time {
        Time(self.0.saturating_sub(ms))
    }
}

/// Errors of the router's inputs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    /// A region that is neither a country code nor a bloc name.
    #[error("`{0}` is neither a country code nor a bloc name")]
    BadRegion(String),
    /// A bloc name not in the bloc table.
    #[error("unknown bloc `{0}`")]
    UnknownBloc(String),
    /// The bloc file is malformed.
    #[error("bloc file: {0}")]
    BadBlocs(String),
    /// A ruling is inconsistent.
    #[error("{0}")]
    BadRuling(String),
    /// A constraint is inconsistent.
    #[error("constraint: {0}")]
    BadConstraint(String),
    /// Not an ISO 3166-1 alpha-2 country code.
    #[error("`{0}` is not an ISO 3166-1 alpha-2 country code (for example DE, CH, CA)")]
    BadJurisdiction(String),
    /// A role list that is empty or names an unknown role.
    #[error("{0}")]
    BadRoles(String),
}

impl RouterError {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            RouterError::BadRegion(_) => "bad_region",
            RouterError::UnknownBloc(_) => "unknown_bloc",
            RouterError::BadBlocs(_) => "bad_blocs",
            RouterError::BadRuling(_) => "bad_ruling",
            RouterError::BadConstraint(_) => "bad_constraint",
            RouterError::BadJurisdiction(_) => "bad_jurisdiction",
            RouterError::BadRoles(_) => "bad_roles",
        }
    }
}

/// A node's identity: its Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// The first 8 hex digits: enough to tell nodes apart in logs.
    pub fn short(&self) -> String {
        self.0[..4].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

/// An ISO 3166-1 alpha-2 country code, upper case. Built from user input
/// with [`Jurisdiction::parse`], which checks the code against ISO 3166
/// (the `celes` crate's table).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Jurisdiction(pub [u8; 2]);

impl Jurisdiction {
    /// Parses a two-letter ISO 3166-1 alpha-2 code, in either case.
    pub fn parse(s: &str) -> Result<Self, RouterError> {
        let b = s.as_bytes();
        if b.len() != 2
            || !b.iter().all(u8::is_ascii_alphabetic)
            || celes::Country::from_alpha2(s).is_err()
        {
            return Err(RouterError::BadJurisdiction(s.to_string()));
        }
        Ok(Jurisdiction([
            b[0].to_ascii_uppercase(),
            b[1].to_ascii_uppercase(),
        ]))
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl fmt::Debug for Jurisdiction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Jurisdiction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a node does for the mesh.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct Roles {
    /// Accepts client connections (SOCKS5) and originates circuits.
    pub entry: bool,
    /// Forwards circuits.
    pub relay: bool,
    /// Connects streams to their targets.
    pub exit: bool,
}

impl Roles {
    /// Parses role names (`entry`, `relay`, `exit`); at least one.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Self, RouterError> {
        let mut roles = Roles::default();
        if names.is_empty() {
            return Err(RouterError::BadRoles(
                "roles is empty: give at least one of entry, relay, exit".into(),
            ));
        }
        for n in names {
            match n.as_ref().trim() {
                "entry" => roles.entry = true,
                "relay" => roles.relay = true,
                "exit" => roles.exit = true,
                other => {
                    return Err(RouterError::BadRoles(format!(
                        "unknown role `{other}`: roles are entry, relay, exit"
                    )));
                }
            }
        }
        Ok(roles)
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (self.entry, "entry"),
            (self.relay, "relay"),
            (self.exit, "exit"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
        f.write_str(&names.join(","))
    }
}

/// A node's own operating state, as it advertises it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NodeState {
    /// Serving.
    #[default]
    Active,
    /// Leaving: no new circuits; live ones must be gone by `until`.
    Draining {
        /// The deadline.
        until: Time,
    },
    /// Gone: carries nothing.
    Exited,
}

impl NodeState {
    /// The stricter of two states: exited, then the earlier drain
    /// deadline, then active (what a node learnt first-hand against what
    /// an advert says; a ruling's drain against an operator's).
    pub fn stricter(self, other: NodeState) -> NodeState {
        match (self, other) {
            (NodeState::Exited, _) | (_, NodeState::Exited) => NodeState::Exited,
            (NodeState::Draining { until: x }, NodeState::Draining { until: y }) => {
                NodeState::Draining { until: x.min(y) }
            }
            (d @ NodeState::Draining { .. }, _) | (_, d @ NodeState::Draining { .. }) => d,
            _ => NodeState::Active,
        }
    }
}

/// Whether a node may carry new streams of `scope` at `t`: it is known,
/// active, and no ruling in force drains or blocks its jurisdiction for
/// that scope. (Path selection applies the same rule to whole meshes; this
/// is the check for a circuit that already exists.)
pub fn may_carry(
    node: Option<&NodeInfo>,
    rulings: &RulingSet,
    scope: &TrafficScope,
    t: Time,
) -> bool {
    match node {
        Some(n) => {
            n.state == NodeState::Active
                && rulings.status(n.jurisdiction, scope, t).0 == Status::Allowed
        }
        None => false,
    }
}

/// What the router knows of one node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeInfo {
    /// Identity.
    pub id: NodeId,
    /// Where it operates; `None` if unknown (excluded unless a constraint
    /// allows unknown jurisdictions: fail closed).
    pub jurisdiction: Option<Jurisdiction>,
    /// What it does.
    pub roles: Roles,
    /// Operator family: nodes run by one operator share it.
    pub family: u32,
    /// Capacity in Mbit/s.
    pub capacity: u32,
    /// Measured load, 0.0 (idle) to 1.0 (full).
    pub load: f32,
    /// Measured round-trip time from here, in milliseconds: the choosing
    /// node's own link estimate (SRTT) where it has a link to the node, a
    /// neutral 10 ms where it has none.
    pub rtt_ms: u32,
    /// Its own state.
    pub state: NodeState,
}

impl NodeInfo {
    /// A node with neutral measurements (capacity 100, idle, 10 ms).
    pub fn new(id: NodeId, jurisdiction: Option<Jurisdiction>, roles: Roles) -> Self {
        Self {
            id,
            jurisdiction,
            roles,
            family: u32::from_le_bytes([id.0[0], id.0[1], id.0[2], id.0[3]]),
            capacity: 100,
            load: 0.0,
            rtt_ms: 10,
            state: NodeState::Active,
        }
    }

    /// Selection weight: capacity, discounted by load and by round-trip
    /// time; never zero, so every eligible node can be chosen.
    pub fn weight(&self) -> f64 {
        let free = (1.0 - f64::from(self.load)).clamp(0.05, 1.0);
        let rtt = 1.0 / (1.0 + f64::from(self.rtt_ms) / 50.0);
        (f64::from(self.capacity) * free * rtt).max(1e-6)
    }
}

/// All nodes the router may choose from.
#[derive(Clone, Debug, Default)]
pub struct MeshView {
    nodes: Vec<NodeInfo>,
}

impl MeshView {
    /// A view of these nodes. Duplicate ids keep the first.
    pub fn new(nodes: impl IntoIterator<Item = NodeInfo>) -> Self {
        let mut seen = std::collections::HashSet::new();
        Self {
            nodes: nodes.into_iter().filter(|n| seen.insert(n.id)).collect(),
        }
    }

    /// The nodes.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// One node by id.
    pub fn get(&self, id: &NodeId) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| &n.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stricter_state_wins_in_either_order() {
        let d = |t| NodeState::Draining { until: Time(t) };
        for (a, b, want) in [
            (NodeState::Active, NodeState::Active, NodeState::Active),
            (NodeState::Active, d(5), d(5)),
            (d(9), d(5), d(5)),
            (d(5), NodeState::Exited, NodeState::Exited),
        ] {
            assert_eq!(a.stricter(b), want);
            assert_eq!(b.stricter(a), want);
        }
    }

    #[test]
    fn a_node_carries_only_while_known_active_and_allowed() {
        let pk = Jurisdiction::parse("pk").unwrap();
        let node = NodeInfo::new(NodeId([1; 32]), Some(pk), Roles::default());
        let mut set = RulingSet::new();
        let scope = TrafficScope::default();
        assert!(may_carry(Some(&node), &set, &scope, Time(0)));
        assert!(!may_carry(None, &set, &scope, Time(0)), "unknown: no");
        let draining = NodeInfo {
            state: NodeState::Draining { until: Time(9) },
            ..node.clone()
        };
        assert!(!may_carry(Some(&draining), &set, &scope, Time(0)));
        set.apply(
            Ruling {
                id: "pk".into(),
                version: 1,
                region: Region::parse("PK").unwrap(),
                blocked_from: Time(10),
                exit_by: Time(20),
                scope: Scope::All,
                reason: "test".into(),
                lifted: false,
            },
            &Blocs::builtin(),
        )
        .unwrap();
        assert!(may_carry(Some(&node), &set, &scope, Time(9)));
        assert!(
            !may_carry(Some(&node), &set, &scope, Time(10)),
            "draining by ruling"
        );
        assert!(Jurisdiction::parse("XX").is_err() && Jurisdiction::parse("DEU").is_err());
        assert_eq!(
            Roles::parse(&["relay", "exit"]).unwrap().to_string(),
            "relay,exit"
        );
        assert!(Roles::parse::<&str>(&[]).is_err() && Roles::parse(&["boss"]).is_err());
    }
}
