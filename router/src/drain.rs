//! Drain planning: given the rulings, `now` and the live circuits, what must
//! happen and when — and the same for a hypothetical ruling (what-if).
//!
//! A circuit whose relays are in a region that a ruling drains must move:
//! its owner rebuilds it around them, make-before-break. Migrations are
//! spread uniformly over the drain window, at a time derived from the seed
//! and the circuit id (deterministic, and no stampede), and each starts early
//! enough to finish `migration_ms` later, `margin_ms` before the exit date. A
//! circuit whose *exit* is in such a region cannot move (its TCP connections
//! live there): it takes no new streams and is closed at the deadline. The
//! plan is a pure function of its inputs, so an amended or lifted ruling is
//! handled by planning again.

use crate::geo::Blocs;
use crate::ruling::{Ruling, RulingSet, TrafficScope};
use crate::{Jurisdiction, MeshView, NodeId, NodeState, RouterError, Time};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A circuit as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveCircuit {
    /// Its id (unique per owner is enough if owners are distinct).
    pub id: u64,
    /// Its hops, origin side first; the last is the exit.
    pub path: Vec<NodeId>,
    /// Its traffic.
    pub scope: TrafficScope,
    /// The node that built it and must move it.
    pub owner: NodeId,
    /// Its current rate, bytes per second.
    pub rate_bps: u64,
}

/// Planner settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainConfig {
    /// Every migration finishes this long before the exit date.
    pub margin_ms: u64,
    /// Time one migration is given from start to finish.
    pub migration_ms: u64,
    /// Spreads migration times; the same seed gives the same plan.
    pub seed: u64,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            margin_ms: 10_000,
            migration_ms: 5_000,
            seed: 0,
        }
    }
}

/// One thing to do.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// The node stops taking new circuits of the ruling's scope at `from`.
    MarkDraining {
        /// The node.
        node: NodeId,
        /// The ruling (empty: the node's own drain).
        ruling: String,
        /// When draining starts.
        from: Time,
        /// Its deadline.
        until: Time,
    },
    /// The node carries nothing of the ruling's scope from `at`.
    MarkExited {
        /// The node.
        node: NodeId,
        /// The ruling (empty: the node's own drain).
        ruling: String,
        /// When.
        at: Time,
    },
    /// The owner rebuilds the circuit around `avoid`, starting at `at`.
    Migrate {
        /// The circuit.
        circuit: u64,
        /// Its owner.
        owner: NodeId,
        /// Start.
        at: Time,
        /// The migration must be complete by this time (deadline − margin).
        done_by: Time,
        /// The nodes the new path must not use.
        avoid: Vec<NodeId>,
    },
    /// The circuit's exit is leaving: no new streams, and close at `at`.
    CloseExitStreams {
        /// The circuit.
        circuit: u64,
        /// Its owner.
        owner: NodeId,
        /// When its streams are closed.
        at: Time,
    },
}

impl Action {
    /// When the action is due.
    pub fn due(&self) -> Time {
        match self {
            Action::MarkDraining { from, .. } => *from,
            Action::MarkExited { at, .. }
            | Action::Migrate { at, .. }
            | Action::CloseExitStreams { at, .. } => *at,
        }
    }
}

/// A plan: actions in due order, and the circuits that cannot meet their
/// deadline (already too late when planned).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainPlan {
    /// Actions, earliest first.
    pub actions: Vec<Action>,
    /// Circuits whose migration cannot finish by deadline − margin.
    pub at_risk: Vec<u64>,
}

/// When a node must be left, for one scope: (drain start, deadline, ruling
/// id). The drain starts with the earliest of the rulings that cover it
/// (the node takes no new circuits from then), and must be done by the
/// earliest deadline; the id is the ruling that sets the deadline.
fn leave_window(
    view_state: Option<NodeState>,
    j: Option<Jurisdiction>,
    rulings: &RulingSet,
    scope: &TrafficScope,
    now: Time,
) -> Option<(Time, Time, String)> {
    let mut best: Option<(Time, Time, String)> = match view_state {
        Some(NodeState::Draining { until }) => Some((now, until, String::new())),
        Some(NodeState::Exited) => Some((now, now, String::new())),
        _ => None,
    };
    let Some(j) = j else { return best };
    for r in rulings.iter() {
        if r.lifted
            || !r.scope.covers(scope)
            || !rulings.region_of(&r.id).is_some_and(|s| s.contains(j))
        {
            continue;
        }
        best = Some(match best {
            Some((from, by, id)) if by <= r.exit_by => (from.min(r.blocked_from), by, id),
            Some((from, ..)) => (from.min(r.blocked_from), r.exit_by, r.id.clone()),
            None => (r.blocked_from, r.exit_by, r.id.clone()),
        });
    }
    best
}

/// What one circuit must do about its leaving hops, as [`plan_drain`]
/// decides it: move off them, or close its streams when its exit leaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leave {
    /// The hop with the earliest deadline.
    pub node: NodeId,
    /// Which ruling sets that deadline (none: the node drains itself or
    /// has exited).
    pub ruling: Option<String>,
    /// The earliest time a leaving hop starts to drain.
    pub from: Time,
    /// The deadline: the earliest among the leaving hops.
    pub by: Time,
    /// The exit is leaving: the streams close at `by` (a stream cannot
    /// change its exit); otherwise the circuit moves before it.
    pub close: bool,
    /// The leaving relays (what a new path avoids).
    pub relays: Vec<NodeId>,
}

/// One hop of a circuit as the view knows it: its id, and its
/// jurisdiction and state (`None` for a node the view does not know).
pub type Hop = (NodeId, Option<(Option<Jurisdiction>, NodeState)>);

/// What the circuit along `path` (entry side first, exit last) must do for `scope` at `now`: `None` when no hop
/// is leaving. Rulings announced for later count too (their `from` is
/// still to come). The one rule for [`plan_drain`] and for status.
pub fn must_leave(
    path: &[Hop],
    rulings: &RulingSet,
    scope: &TrafficScope,
    now: Time,
) -> Option<Leave> {
    let ((exit, exit_info), relays) = path.split_last()?;
    let window = |info: &Option<(Option<Jurisdiction>, NodeState)>| {
        let (j, st) = info.unwrap_or((None, NodeState::Active));
        leave_window(Some(st), j, rulings, scope, now)
    };
    let leaving: Vec<(NodeId, (Time, Time, String))> = relays
        .iter()
        .filter_map(|(id, info)| window(info).map(|w| (*id, w)))
        .collect();
    let exit_window = window(exit_info);
    let close = exit_window.is_some();
    let relays = leaving.iter().map(|(id, _)| *id).collect();
    let all = leaving.into_iter().chain(exit_window.map(|w| (*exit, w)));
    let from = all.clone().map(|(_, w)| w.0).min()?;
    let (node, (_, by, ruling)) = all.min_by_key(|(_, w)| w.1)?;
    Some(Leave {
        node,
        ruling: (!ruling.is_empty()).then_some(ruling),
        from,
        by,
        close,
        relays,
    })
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Plans the drain at `now`.
pub fn plan_drain(
    view: &MeshView,
    rulings: &RulingSet,
    now: Time,
    circuits: &[LiveCircuit],
    cfg: &DrainConfig,
) -> DrainPlan {
    let mut plan = DrainPlan::default();
    let info: HashMap<NodeId, (Option<Jurisdiction>, NodeState)> = view
        .nodes()
        .iter()
        .map(|n| (n.id, (n.jurisdiction, n.state)))
        .collect();

    // Node states.
    for n in view.nodes() {
        if let NodeState::Draining { until } = n.state {
            plan.actions.push(Action::MarkExited {
                node: n.id,
                ruling: String::new(),
                at: until.max(now),
            });
        }
        let Some(j) = n.jurisdiction else { continue };
        for r in rulings.iter() {
            if r.lifted || !rulings.region_of(&r.id).is_some_and(|s| s.contains(j)) {
                continue;
            }
            plan.actions.push(Action::MarkDraining {
                node: n.id,
                ruling: r.id.clone(),
                from: r.blocked_from,
                until: r.exit_by,
            });
            plan.actions.push(Action::MarkExited {
                node: n.id,
                ruling: r.id.clone(),
                at: r.exit_by,
            });
        }
    }

    // Circuits.
    for c in circuits {
        let hops: Vec<_> = c
            .path
            .iter()
            .map(|id| (*id, info.get(id).copied()))
            .collect();
        let Some(leave) = must_leave(&hops, rulings, &c.scope, now) else {
            continue;
        };
        if leave.close {
            plan.actions.push(Action::CloseExitStreams {
                circuit: c.id,
                owner: c.owner,
                at: leave.by.max(now),
            });
            continue;
        }
        let (start, deadline) = (leave.from, leave.by);
        let done_by = deadline.minus_ms(cfg.margin_ms);
        let latest = done_by.minus_ms(cfg.migration_ms);
        // Feasible only if a migration started now ends by `done_by`
        // (checked directly: the subtractions above saturate at zero).
        let lo = start.min(latest).max(now);
        let at = if now.plus_ms(cfg.migration_ms) <= done_by {
            let span = latest.0 - lo.0 + 1;
            Time(lo.0 + splitmix(cfg.seed ^ splitmix(c.id)) % span)
        } else {
            plan.at_risk.push(c.id);
            now
        };
        plan.actions.push(Action::Migrate {
            circuit: c.id,
            owner: c.owner,
            at,
            done_by,
            avoid: leave.relays,
        });
    }
    plan.actions
        .sort_by(|a, b| a.due().cmp(&b.due()).then_with(|| a.cmp(b)));
    plan
}

/// What a ruling would touch in one jurisdiction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JurisdictionImpact {
    /// Nodes there.
    pub nodes: usize,
    /// Their capacity, Mbit/s.
    pub capacity: u64,
    /// Circuits with a hop there.
    pub circuits: usize,
}

/// What a hypothetical ruling would do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Impact {
    /// Per jurisdiction the ruling covers, where nodes or circuits are affected.
    pub by_jurisdiction: BTreeMap<Jurisdiction, JurisdictionImpact>,
    /// The nodes in the region (they leave for the ruling's scope).
    pub nodes: Vec<NodeId>,
    /// Circuits that would migrate (ids).
    pub migrate: Vec<u64>,
    /// Circuits whose exit streams would close at the deadline (ids).
    pub close: Vec<u64>,
    /// Circuits that would migrate but cannot finish by the exit date less
    /// the margin (already too late when planned).
    pub at_risk: Vec<u64>,
    /// Circuits the rulings in force move or close and this one would not
    /// (a lift).
    pub released: Vec<u64>,
    /// Tenants with an affected circuit.
    pub tenants: BTreeSet<String>,
    /// The plan with the ruling in force.
    pub plan: DrainPlan,
}

/// Evaluates a hypothetical ruling (a new one, or a new version of one in
/// force) against the mesh and its circuits, without changing `rulings`.
pub fn what_if(
    view: &MeshView,
    rulings: &RulingSet,
    hypothetical: &Ruling,
    blocs: &Blocs,
    now: Time,
    circuits: &[LiveCircuit],
    cfg: &DrainConfig,
) -> Result<Impact, RouterError> {
    let mut set = rulings.clone();
    set.apply(hypothetical.clone(), blocs)
        .map_err(|e| RouterError::BadRuling(e.to_string()))?;
    let region = blocs.resolve(&hypothetical.region)?;
    let plan = plan_drain(view, &set, now, circuits, cfg);
    let before = plan_drain(view, rulings, now, circuits, cfg);
    let mut impact = Impact::default();
    let juris: HashMap<NodeId, Option<Jurisdiction>> = view
        .nodes()
        .iter()
        .map(|n| (n.id, n.jurisdiction))
        .collect();
    if !hypothetical.lifted {
        for n in view.nodes() {
            if let Some(j) = n.jurisdiction.filter(|j| region.contains(*j)) {
                impact.nodes.push(n.id);
                let e = impact.by_jurisdiction.entry(j).or_default();
                e.nodes += 1;
                e.capacity += u64::from(n.capacity);
            }
        }
    }
    let touched = |a: &Action| match a {
        Action::Migrate { circuit, .. } | Action::CloseExitStreams { circuit, .. } => {
            Some(*circuit)
        }
        _ => None,
    };
    // A circuit the rulings in force already move or close the same way,
    // by the same time, is not this ruling's doing; one it moves sooner (an
    // amendment that brings the exit date forward) or puts at risk is.
    let planned: BTreeSet<&Action> = before.actions.iter().collect();
    for a in &plan.actions {
        let Some(id) = touched(a) else { continue };
        if planned.contains(a) && (before.at_risk.contains(&id) || !plan.at_risk.contains(&id)) {
            continue;
        }
        match a {
            Action::Migrate { .. } => {
                impact.migrate.push(id);
                if plan.at_risk.contains(&id) {
                    impact.at_risk.push(id);
                }
            }
            _ => impact.close.push(id),
        }
        if let Some(c) = circuits.iter().find(|c| c.id == id) {
            impact.tenants.insert(c.scope.tenant.clone());
            let js: BTreeSet<Jurisdiction> = c
                .path
                .iter()
                .filter_map(|h| juris.get(h).copied().flatten())
                .filter(|j| region.contains(*j))
                .collect();
            for j in js {
                impact.by_jurisdiction.entry(j).or_default().circuits += 1;
            }
        }
    }
    // And what it releases (a lift, a later exit date for a closing exit):
    // circuits the rulings in force touch and it does not.
    let after: BTreeSet<u64> = plan.actions.iter().filter_map(touched).collect();
    impact.released = before
        .actions
        .iter()
        .filter_map(touched)
        .filter(|id| !after.contains(id))
        .collect::<BTreeSet<u64>>()
        .into_iter()
        .collect();
    impact.migrate.sort_unstable();
    impact.migrate.dedup();
    impact.close.sort_unstable();
    impact.close.dedup();
    impact.at_risk.sort_unstable();
    impact.at_risk.dedup();
    impact.plan = plan;
    Ok(impact)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geo::{Blocs, Region};
    use crate::{Ruling, Scope};

    fn ruling(id: &str, cc: &str, from: u64, exit: u64, scope: Scope) -> Ruling {
        Ruling {
            id: id.into(),
            version: 1,
            region: Region::parse(cc).unwrap(),
            blocked_from: Time(from),
            exit_by: Time(exit),
            scope,
            reason: "test".into(),
            lifted: false,
        }
    }

    fn hop(
        n: u8,
        cc: &[u8; 2],
        state: NodeState,
    ) -> (NodeId, Option<(Option<Jurisdiction>, NodeState)>) {
        (NodeId([n; 32]), Some((Some(Jurisdiction(*cc)), state)))
    }

    #[test]
    fn a_circuit_moves_off_a_leaving_relay_and_closes_when_its_exit_leaves() {
        let blocs = Blocs::builtin();
        let acme = TrafficScope {
            class: "enterprise".into(),
            tenant: "acme".into(),
        };
        let mut set = RulingSet::new();
        let path = [
            hop(1, b"PK", NodeState::Active),
            hop(2, b"CA", NodeState::Active),
        ];
        assert_eq!(must_leave(&path, &set, &acme, Time(50)), None, "no ruling");
        let other = Scope::Tenants(vec!["globex".into()]);
        set.apply(ruling("g", "PK", 0, 10, other), &blocs).unwrap();
        assert_eq!(
            must_leave(&path, &set, &acme, Time(50)),
            None,
            "another tenant's"
        );
        // Announced: PK from 100, out by 900; a nearer one at 600.
        set.apply(ruling("late", "PK", 100, 900, Scope::All), &blocs)
            .unwrap();
        set.apply(ruling("soon", "PK", 500, 600, Scope::All), &blocs)
            .unwrap();
        let l = must_leave(&path, &set, &acme, Time(50)).unwrap();
        assert_eq!(
            l,
            Leave {
                node: NodeId([1; 32]),
                ruling: Some("soon".into()),
                from: Time(100),
                by: Time(600),
                close: false,
                relays: vec![NodeId([1; 32])],
            }
        );
        // The exit drains itself earlier: the streams close then.
        let exit_drains = [
            hop(1, b"PK", NodeState::Active),
            hop(2, b"CA", NodeState::Draining { until: Time(300) }),
        ];
        let l = must_leave(&exit_drains, &set, &acme, Time(50)).unwrap();
        assert!(l.close && l.by == Time(300) && l.ruling.is_none(), "{l:?}");
        assert_eq!(l.node, NodeId([2; 32]));
        // A hop the view does not know is not drained (it takes no new
        // streams: `may_carry`).
        let unknown = [(NodeId([1; 32]), None), hop(2, b"CA", NodeState::Active)];
        assert_eq!(must_leave(&unknown, &set, &acme, Time(50)), None);
        // A bloc covers its members; a lift ends it.
        set.apply(ruling("eu", "EU", 0, 700, Scope::All), &blocs)
            .unwrap();
        let via_de = [
            hop(3, b"DE", NodeState::Active),
            hop(2, b"CA", NodeState::Active),
        ];
        assert_eq!(
            must_leave(&via_de, &set, &acme, Time(50))
                .unwrap()
                .ruling
                .as_deref(),
            Some("eu")
        );
        let mut lift = ruling("eu", "EU", 0, 700, Scope::All);
        lift.version = 2;
        lift.lifted = true;
        set.apply(lift, &blocs).unwrap();
        assert_eq!(must_leave(&via_de, &set, &acme, Time(50)), None);
    }
}
