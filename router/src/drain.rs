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

/// When a node must be left, for one scope: (drain start, deadline, ruling id).
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
        if best.as_ref().is_none_or(|b| r.exit_by < b.1) {
            best = Some((r.blocked_from, r.exit_by, r.id.clone()));
        }
    }
    best
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
        let Some((&exit, relays)) = c.path.split_last() else {
            continue;
        };
        let window = |id: &NodeId| {
            let (j, st) = info.get(id).copied().unwrap_or((None, NodeState::Active));
            leave_window(Some(st), j, rulings, &c.scope, now)
        };
        if let Some((_, deadline, _)) = window(&exit) {
            let relay_deadline = relays.iter().filter_map(|r| window(r).map(|w| w.1)).min();
            let at = relay_deadline
                .map_or(deadline, |d| d.min(deadline))
                .max(now);
            plan.actions.push(Action::CloseExitStreams {
                circuit: c.id,
                owner: c.owner,
                at,
            });
            continue;
        }
        let affected: Vec<(NodeId, (Time, Time, String))> = relays
            .iter()
            .filter_map(|r| window(r).map(|w| (*r, w)))
            .collect();
        if affected.is_empty() {
            continue;
        }
        let start = affected.iter().map(|(_, w)| w.0).min().unwrap_or(now);
        let deadline = affected.iter().map(|(_, w)| w.1).min().unwrap_or(now);
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
            avoid: affected.into_iter().map(|(n, _)| n).collect(),
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
    /// Circuits that would migrate.
    pub migrate: usize,
    /// Circuits whose exit streams would close at the deadline.
    pub close: usize,
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
    let already: BTreeSet<u64> = before.actions.iter().filter_map(touched).collect();
    for a in &plan.actions {
        let Some(id) = touched(a) else { continue };
        if already.contains(&id) {
            continue;
        }
        match a {
            Action::Migrate { .. } => impact.migrate += 1,
            _ => impact.close += 1,
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
    impact.plan = plan;
    Ok(impact)
}
