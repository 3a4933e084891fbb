//! Path selection.
//!
//! A [`PathIndex`] is built once per (mesh view, rulings, traffic scope, `t`)
//! in O(n): it keeps the nodes that may carry that traffic at `t` (state and
//! rulings), split into exits and relays, each with prefix sums of their
//! selection weights. A pick then samples by weight (binary search, O(log n))
//! and rejects candidates that break the connection's constraints or path
//! diversity — no allocation, a few microseconds at 100k nodes. If sampling
//! keeps failing (tight constraints), an exhaustive search over the filtered
//! candidates decides exactly, so a path is returned whenever one exists, and
//! the error names what removed which nodes when none does.

use crate::geo::{Blocs, JurisdictionSet, Region};
use crate::ruling::{RulingSet, Status, TrafficScope};
use crate::{MeshView, NodeId, NodeInfo, NodeState, RouterError, Time};
use rand::Rng;
use rand::seq::SliceRandom;
use std::collections::BTreeMap;
use std::fmt::Write;

/// The most hops a path may have.
pub const MAX_HOPS: usize = 8;
/// Sampling rounds before the exact search.
const ROUNDS: usize = 24;
/// Samples per hop within a round.
const TRIES_PER_HOP: usize = 12;
/// Nodes the exact search may visit before giving up.
const SEARCH_BUDGET: usize = 200_000;

/// A tenant's or a connection's demands, as written (regions unresolved).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Constraints {
    /// No hop in these.
    pub exclude: Vec<Region>,
    /// The exit must be in one of these (empty: anywhere).
    pub exit_in: Vec<Region>,
    /// No relay (non-exit hop) in these.
    pub avoid_transit: Vec<Region>,
    /// Hops after the origin, if set.
    pub hops: Option<usize>,
    /// Allow nodes whose jurisdiction is unknown.
    pub allow_unknown: bool,
    /// Allow two hops in one jurisdiction.
    pub allow_same_jurisdiction: bool,
    /// Allow two hops of one operator family.
    pub allow_same_family: bool,
}

impl Constraints {
    /// Resolves a tenant's constraints and a connection's together:
    /// excludes add up, exit sets intersect, the connection's hop count wins,
    /// and a relaxation holds only if both allow it.
    pub fn merge(
        tenant: &Constraints,
        conn: &Constraints,
        blocs: &Blocs,
        default_hops: usize,
    ) -> Result<Resolved, RouterError> {
        let t = tenant.resolve(blocs, default_hops)?;
        let c = conn.resolve(blocs, t.hops)?;
        Ok(t.and(c))
    }

    /// Resolves regions to jurisdiction sets.
    pub fn resolve(&self, blocs: &Blocs, default_hops: usize) -> Result<Resolved, RouterError> {
        let hops = self.hops.unwrap_or(default_hops);
        if !(1..=MAX_HOPS).contains(&hops) {
            return Err(RouterError::BadConstraint(format!(
                "hops = {hops}: must be 1 to {MAX_HOPS}"
            )));
        }
        let exit_in = if self.exit_in.is_empty() {
            None
        } else {
            Some(blocs.resolve_all(&self.exit_in)?)
        };
        Ok(Resolved {
            exclude: blocs.resolve_all(&self.exclude)?,
            exit_in,
            avoid_transit: blocs.resolve_all(&self.avoid_transit)?,
            hops,
            allow_unknown: self.allow_unknown,
            diverse_jurisdiction: !self.allow_same_jurisdiction,
            diverse_family: !self.allow_same_family,
            text: self.describe(),
        })
    }

    fn describe(&self) -> String {
        let list = |v: &[Region]| {
            v.iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut parts = Vec::new();
        if !self.exclude.is_empty() {
            parts.push(format!("exclude={}", list(&self.exclude)));
        }
        if !self.exit_in.is_empty() {
            parts.push(format!("exit_in={}", list(&self.exit_in)));
        }
        if !self.avoid_transit.is_empty() {
            parts.push(format!("avoid_transit={}", list(&self.avoid_transit)));
        }
        parts.join(" ")
    }
}

/// Constraints with regions resolved: what a pick checks.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// No hop here.
    pub exclude: JurisdictionSet,
    /// Exit only here (`None`: anywhere).
    pub exit_in: Option<JurisdictionSet>,
    /// No relay here.
    pub avoid_transit: JurisdictionSet,
    /// Hops after the origin.
    pub hops: usize,
    /// Unknown jurisdictions allowed.
    pub allow_unknown: bool,
    /// No two hops in one jurisdiction.
    pub diverse_jurisdiction: bool,
    /// No two hops of one family.
    pub diverse_family: bool,
    text: String,
}

impl Resolved {
    /// Both sets of demands at once (`more` is the more specific one):
    /// excludes add up, exit sets intersect, `more`'s hop count wins, and a
    /// relaxation holds only if both allow it.
    pub fn and(self, more: Resolved) -> Resolved {
        let mut exclude = self.exclude;
        exclude.extend(&more.exclude);
        let mut avoid_transit = self.avoid_transit;
        avoid_transit.extend(&more.avoid_transit);
        let exit_in = match (self.exit_in, more.exit_in) {
            (Some(a), Some(b)) => Some(a.intersect(&b)),
            (a, b) => a.or(b),
        };
        let text = [self.text, more.text]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        Resolved {
            exclude,
            exit_in,
            avoid_transit,
            hops: more.hops,
            allow_unknown: self.allow_unknown && more.allow_unknown,
            diverse_jurisdiction: self.diverse_jurisdiction || more.diverse_jurisdiction,
            diverse_family: self.diverse_family || more.diverse_family,
            text,
        }
    }

    /// The constraints as written (`exclude=PK exit_in=CA`), for logs.
    pub fn describe(&self) -> &str {
        &self.text
    }

    /// Defaults: `hops` hops, diversity on, unknown jurisdictions excluded.
    pub fn defaults(hops: usize) -> Self {
        Constraints {
            hops: Some(hops),
            ..Constraints::default()
        }
        .resolve(&Blocs::default(), hops)
        .expect("default constraints resolve")
    }

    /// Whether `n` may be the exit.
    fn exit_ok(&self, n: &NodeInfo) -> bool {
        self.hop_ok(n)
            && self
                .exit_in
                .as_ref()
                .is_none_or(|s| n.jurisdiction.is_some_and(|j| s.contains(j)))
    }

    /// Whether `n` may be a relay.
    fn relay_ok(&self, n: &NodeInfo) -> bool {
        self.hop_ok(n)
            && n.jurisdiction
                .is_none_or(|j| !self.avoid_transit.contains(j))
    }

    fn hop_ok(&self, n: &NodeInfo) -> bool {
        match n.jurisdiction {
            None => self.allow_unknown,
            Some(j) => !self.exclude.contains(j),
        }
    }

    /// Whether `n` can join a path already holding `chosen`.
    fn diverse(&self, n: &NodeInfo, chosen: &[&NodeInfo]) -> bool {
        chosen.iter().all(|c| {
            c.id != n.id
                && !(self.diverse_jurisdiction
                    && c.jurisdiction.is_some()
                    && c.jurisdiction == n.jurisdiction)
                && !(self.diverse_family && c.family == n.family)
        })
    }
}

/// A chosen path, origin side first. Fixed size: building one allocates nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Path {
    hops: [NodeId; MAX_HOPS],
    len: u8,
}

impl Path {
    /// The hops, origin side first; the last is the exit.
    pub fn as_slice(&self) -> &[NodeId] {
        &self.hops[..self.len as usize]
    }
}

impl std::fmt::Debug for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

/// No path satisfies the request; the message says which rule removed what.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no {hops}-hop path: {why}")]
pub struct NoPath {
    /// Hops asked for.
    pub hops: usize,
    /// Which constraints and rulings removed which nodes.
    pub why: String,
}

/// What the caller wants besides its constraints.
#[derive(Clone, Debug, Default)]
pub struct PathRequest {
    /// The origin, if it is itself a mesh node: never chosen as a hop.
    pub origin: Option<NodeId>,
    /// The exit the path must end at (moving streams keeps their exit,
    /// because their TCP connections live there).
    pub exit: Option<NodeId>,
    /// Nodes no hop may be (a drain plan's avoid list).
    pub avoid: Vec<NodeId>,
}

impl PathRequest {
    fn allowed(&self, n: &NodeInfo) -> bool {
        Some(n.id) != self.origin && !self.avoid.contains(&n.id)
    }

    fn exit_allowed(&self, n: &NodeInfo) -> bool {
        self.allowed(n) && self.exit.is_none_or(|x| x == n.id)
    }
}

struct Weighted {
    idx: Vec<u32>,
    prefix: Vec<f64>,
}

impl Weighted {
    fn new(nodes: &[NodeInfo], idx: Vec<u32>) -> Self {
        let mut acc = 0.0;
        let prefix = idx
            .iter()
            .map(|&i| {
                acc += nodes[i as usize].weight();
                acc
            })
            .collect();
        Self { idx, prefix }
    }

    fn sample<R: Rng>(&self, rng: &mut R) -> Option<u32> {
        let total = *self.prefix.last()?;
        let x = rng.r#gen::<f64>() * total;
        let i = self
            .prefix
            .partition_point(|p| *p <= x)
            .min(self.idx.len() - 1);
        Some(self.idx[i])
    }
}

/// Why a node cannot carry the index's traffic at all.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Gone {
    Advertised(&'static str),
    Ruling(String, &'static str),
}

/// The nodes that may carry one scope of traffic at one time, ready to pick from.
pub struct PathIndex {
    nodes: Vec<NodeInfo>,
    exits: Weighted,
    relays: Weighted,
    gone: Vec<(u32, Gone)>,
}

impl PathIndex {
    /// Indexes `view` for traffic of `scope` at `t` under `rulings`.
    pub fn build(view: &MeshView, rulings: &RulingSet, scope: &TrafficScope, t: Time) -> Self {
        let nodes = view.nodes().to_vec();
        let (mut exits, mut relays, mut gone) = (Vec::new(), Vec::new(), Vec::new());
        for (i, n) in nodes.iter().enumerate() {
            let i = i as u32;
            match n.state {
                NodeState::Draining { .. } => {
                    gone.push((i, Gone::Advertised("draining")));
                    continue;
                }
                NodeState::Exited => {
                    gone.push((i, Gone::Advertised("exited")));
                    continue;
                }
                NodeState::Active => {}
            }
            match rulings.status(n.jurisdiction, scope, t) {
                (Status::Allowed, _) => {}
                (s, r) => {
                    let what = if s == Status::Blocked {
                        "blocked"
                    } else {
                        "draining"
                    };
                    gone.push((
                        i,
                        Gone::Ruling(r.map(|r| r.id.clone()).unwrap_or_default(), what),
                    ));
                    continue;
                }
            }
            if n.roles.exit {
                exits.push(i);
            }
            if n.roles.relay {
                relays.push(i);
            }
        }
        Self {
            exits: Weighted::new(&nodes, exits),
            relays: Weighted::new(&nodes, relays),
            nodes,
            gone,
        }
    }

    /// Nodes indexed.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node is indexed.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Picks a path satisfying `c`, randomised by `rng`, weighted by
    /// capacity, load and RTT.
    pub fn pick<R: Rng>(
        &self,
        c: &Resolved,
        req: &PathRequest,
        rng: &mut R,
    ) -> Result<Path, NoPath> {
        if let Some(p) = self.sample(c, req, rng) {
            return Ok(p);
        }
        self.search(c, req, rng)
    }

    /// The fast path: weighted sampling with rejection; no allocation.
    fn sample<R: Rng>(&self, c: &Resolved, req: &PathRequest, rng: &mut R) -> Option<Path> {
        let mut chosen: [&NodeInfo; MAX_HOPS] = [self.nodes.first()?; MAX_HOPS];
        let fixed_exit = match req.exit {
            Some(x) => Some(
                self.exits
                    .idx
                    .iter()
                    .map(|&i| &self.nodes[i as usize])
                    .find(|n| n.id == x && req.exit_allowed(n) && c.exit_ok(n))?,
            ),
            None => None,
        };
        'round: for _ in 0..ROUNDS {
            let exit = match fixed_exit {
                Some(n) => n,
                None => (0..TRIES_PER_HOP).find_map(|_| {
                    let n = &self.nodes[self.exits.sample(rng)? as usize];
                    (req.exit_allowed(n) && c.exit_ok(n)).then_some(n)
                })?,
            };
            chosen[c.hops - 1] = exit;
            for h in (0..c.hops - 1).rev() {
                let placed = &chosen[h + 1..c.hops];
                let relay = (0..TRIES_PER_HOP).find_map(|_| {
                    let n = &self.nodes[self.relays.sample(rng)? as usize];
                    (req.allowed(n) && c.relay_ok(n) && c.diverse(n, placed)).then_some(n)
                });
                match relay {
                    Some(n) => chosen[h] = n,
                    None => continue 'round,
                }
            }
            let mut p = Path {
                hops: [NodeId([0; 32]); MAX_HOPS],
                len: c.hops as u8,
            };
            for (slot, n) in p.hops.iter_mut().zip(&chosen[..c.hops]) {
                *slot = n.id;
            }
            return Some(p);
        }
        None
    }

    /// The exact path: depth-first over every candidate, in random order.
    fn search<R: Rng>(&self, c: &Resolved, req: &PathRequest, rng: &mut R) -> Result<Path, NoPath> {
        let mut exits: Vec<&NodeInfo> = self
            .exits
            .idx
            .iter()
            .map(|&i| &self.nodes[i as usize])
            .filter(|n| req.exit_allowed(n) && c.exit_ok(n))
            .collect();
        let mut relays: Vec<&NodeInfo> = self
            .relays
            .idx
            .iter()
            .map(|&i| &self.nodes[i as usize])
            .filter(|n| req.allowed(n) && c.relay_ok(n))
            .collect();
        exits.shuffle(rng);
        relays.shuffle(rng);
        let mut budget = SEARCH_BUDGET;
        for exit in &exits {
            let mut path = vec![*exit];
            if extend(&mut path, &relays, c, &mut budget) {
                let mut p = Path {
                    hops: [NodeId([0; 32]); MAX_HOPS],
                    len: c.hops as u8,
                };
                for (slot, n) in p.hops.iter_mut().zip(path.iter().rev()) {
                    *slot = n.id;
                }
                return Ok(p);
            }
            if budget == 0 {
                break;
            }
        }
        Err(self.explain(c, req, exits.len(), relays.len(), budget == 0))
    }

    fn explain(
        &self,
        c: &Resolved,
        req: &PathRequest,
        exits: usize,
        relays: usize,
        out_of_budget: bool,
    ) -> NoPath {
        let mut removed: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut note =
            |why: String, n: &NodeInfo| removed.entry(why).or_default().push(n.id.short());
        for (i, g) in &self.gone {
            let n = &self.nodes[*i as usize];
            match g {
                Gone::Advertised(s) => note(format!("{s} (advertised)"), n),
                Gone::Ruling(id, s) => note(format!("{s} by ruling {id}"), n),
            }
        }
        for n in &self.nodes {
            if self
                .gone
                .iter()
                .any(|(i, _)| self.nodes[*i as usize].id == n.id)
            {
                continue;
            }
            if Some(n.id) == req.origin {
                note("the origin itself".into(), n);
            } else if req.avoid.contains(&n.id) {
                note("avoided (draining)".into(), n);
            } else if n.jurisdiction.is_none() && !c.allow_unknown {
                note("unknown jurisdiction (fail closed)".into(), n);
            } else if n.jurisdiction.is_some_and(|j| c.exclude.contains(j)) {
                note("excluded by constraint".into(), n);
            } else if !n.roles.exit && !n.roles.relay {
                note("neither relay nor exit".into(), n);
            }
        }
        let mut why = format!("{} nodes known", self.nodes.len());
        if let Some(x) = req.exit {
            let _ = write!(why, "; exit fixed to {}", x.short());
        }
        for (reason, ids) in &removed {
            let shown: Vec<&str> = ids.iter().take(5).map(String::as_str).collect();
            let more = if ids.len() > 5 {
                format!(" and {} more", ids.len() - 5)
            } else {
                String::new()
            };
            let _ = write!(why, "; {} {reason}: {}{more}", ids.len(), shown.join(" "));
        }
        if !c.text.is_empty() {
            let _ = write!(why, "; constraints {}", c.text);
        }
        let _ = write!(
            why,
            "; {exits} usable exits and {relays} usable relays remain"
        );
        if c.diverse_jurisdiction || c.diverse_family {
            let _ = write!(
                why,
                ", and no two hops may share a jurisdiction or operator family"
            );
        }
        if out_of_budget {
            why.push_str(" (search budget exhausted)");
        }
        NoPath { hops: c.hops, why }
    }
}

fn extend<'a>(
    path: &mut Vec<&'a NodeInfo>,
    relays: &[&'a NodeInfo],
    c: &Resolved,
    budget: &mut usize,
) -> bool {
    if path.len() == c.hops {
        return true;
    }
    for r in relays {
        if *budget == 0 {
            return false;
        }
        *budget -= 1;
        if !c.diverse(r, path) {
            continue;
        }
        path.push(r);
        if extend(path, relays, c, budget) {
            return true;
        }
        path.pop();
    }
    false
}

/// One-shot selection: indexes the view (O(n)) and picks. Callers that pick
/// often keep a [`PathIndex`] instead.
#[allow(clippy::too_many_arguments)]
pub fn select_path<R: Rng>(
    view: &MeshView,
    rulings: &RulingSet,
    scope: &TrafficScope,
    t: Time,
    c: &Resolved,
    req: &PathRequest,
    rng: &mut R,
) -> Result<Path, NoPath> {
    PathIndex::build(view, rulings, scope, t).pick(c, req, rng)
}
