//! Path selection: `hops` distinct nodes, the last an exit, the others relays,
//! no two in the same jurisdiction.

use crate::{MeshView, NodeId, NodeInfo};
use rand::Rng;
use rand::seq::SliceRandom;

/// What the caller wants.
#[derive(Clone, Debug)]
pub struct PathRequest {
    /// Nodes on the path after the origin (the last is the exit). At least 1.
    pub hops: usize,
    /// The origin, if it is itself a mesh node: never chosen as a hop.
    pub origin: Option<NodeId>,
}

/// No path satisfies the request; the message says which rule removed what.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no {hops}-hop path: {why}")]
pub struct NoPath {
    /// Hops asked for.
    pub hops: usize,
    /// Which constraints removed which nodes.
    pub why: String,
}

/// Chooses a path uniformly at random among those that satisfy the request,
/// using `rng` for every choice (so a seed fixes the result).
pub fn select_path<R: Rng>(
    view: &MeshView,
    req: &PathRequest,
    rng: &mut R,
) -> Result<Vec<NodeId>, NoPath> {
    let no_path = |why: String| NoPath {
        hops: req.hops,
        why,
    };
    if req.hops == 0 {
        return Err(no_path("a path needs at least one hop".into()));
    }
    let usable: Vec<&NodeInfo> = view
        .nodes()
        .iter()
        .filter(|n| Some(n.id) != req.origin)
        .collect();
    let mut exits: Vec<&NodeInfo> = usable.iter().copied().filter(|n| n.roles.exit).collect();
    let mut relays: Vec<&NodeInfo> = usable.iter().copied().filter(|n| n.roles.relay).collect();
    if exits.is_empty() {
        return Err(no_path(format!(
            "{} known nodes besides the origin, none has the exit role",
            usable.len()
        )));
    }
    exits.shuffle(rng);
    relays.shuffle(rng);
    for exit in &exits {
        let mut path = vec![*exit];
        if extend(&mut path, &relays, req.hops) {
            // `path` is exit-first; the wire order is origin-side first.
            return Ok(path.iter().rev().map(|n| n.id).collect());
        }
    }
    let jurisdictions = {
        let mut j: Vec<_> = usable.iter().map(|n| n.jurisdiction).collect();
        j.sort();
        j.dedup();
        j.len()
    };
    Err(no_path(format!(
        "{} exits and {} relays besides the origin, in {} jurisdictions; \
         a path needs {} distinct nodes in distinct jurisdictions",
        exits.len(),
        relays.len(),
        jurisdictions,
        req.hops
    )))
}

/// Depth-first: add relays (in the shuffled order) until the path is long
/// enough, keeping nodes and jurisdictions distinct.
fn extend<'a>(path: &mut Vec<&'a NodeInfo>, relays: &[&'a NodeInfo], hops: usize) -> bool {
    if path.len() == hops {
        return true;
    }
    for r in relays {
        if path
            .iter()
            .any(|p| p.id == r.id || p.jurisdiction == r.jurisdiction)
        {
            continue;
        }
        path.push(r);
        if extend(path, relays, hops) {
            return true;
        }
        path.pop();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Jurisdiction, Roles};
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn node(i: u8, cc: &str, relay: bool, exit: bool) -> NodeInfo {
        let b = cc.as_bytes();
        NodeInfo {
            id: NodeId([i; 32]),
            jurisdiction: Jurisdiction([b[0], b[1]]),
            roles: Roles {
                entry: false,
                relay,
                exit,
            },
        }
    }

    fn arb_mesh() -> impl Strategy<Value = Vec<NodeInfo>> {
        proptest::collection::vec((0usize..5, any::<bool>(), any::<bool>()), 0..9).prop_map(|v| {
            const CC: [&str; 5] = ["DE", "CH", "IS", "CA", "PK"];
            v.into_iter()
                .enumerate()
                .map(|(i, (j, relay, exit))| node(i as u8, CC[j], relay, exit))
                .collect()
        })
    }

    /// Brute force: does any ordered choice of distinct nodes satisfy the rules?
    fn brute_force_exists(nodes: &[NodeInfo], req: &PathRequest) -> bool {
        fn go(nodes: &[NodeInfo], req: &PathRequest, path: &mut Vec<usize>) -> bool {
            if path.len() == req.hops {
                return true;
            }
            let last = path.len() + 1 == req.hops;
            for (i, n) in nodes.iter().enumerate() {
                let ok_role = if last { n.roles.exit } else { n.roles.relay };
                if !ok_role
                    || Some(n.id) == req.origin
                    || path
                        .iter()
                        .any(|&p| p == i || nodes[p].jurisdiction == n.jurisdiction)
                {
                    continue;
                }
                path.push(i);
                if go(nodes, req, path) {
                    return true;
                }
                path.pop();
            }
            false
        }
        req.hops > 0 && go(nodes, req, &mut Vec::new())
    }

    proptest! {
        /// A path comes back exactly when brute force finds one, and every
        /// returned path keeps every rule.
        #[test]
        fn path_exists_iff_brute_force_finds_one(nodes in arb_mesh(), hops in 1usize..5, seed: u64, origin_idx in 0usize..10) {
            let origin = nodes.get(origin_idx).map(|n| n.id);
            let view = MeshView::new(nodes.clone());
            let req = PathRequest { hops, origin };
            let got = select_path(&view, &req, &mut StdRng::seed_from_u64(seed));
            prop_assert_eq!(got.is_ok(), brute_force_exists(view.nodes(), &req), "{:?}", got);
            if let Ok(path) = got {
                prop_assert_eq!(path.len(), hops);
                let infos: Vec<_> = path.iter().map(|id| view.get(id).unwrap()).collect();
                prop_assert!(infos.last().unwrap().roles.exit);
                for (i, n) in infos.iter().enumerate() {
                    prop_assert!(Some(n.id) != origin);
                    if i + 1 < infos.len() { prop_assert!(n.roles.relay); }
                    for m in &infos[i + 1..] {
                        prop_assert!(n.jurisdiction != m.jurisdiction);
                    }
                }
            }
        }

        /// The same seed gives the same path.
        #[test]
        fn deterministic_per_seed(nodes in arb_mesh(), seed: u64) {
            let view = MeshView::new(nodes);
            let req = PathRequest { hops: 2, origin: None };
            let a = select_path(&view, &req, &mut StdRng::seed_from_u64(seed));
            let b = select_path(&view, &req, &mut StdRng::seed_from_u64(seed));
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn no_exit_says_so() {
        let view = MeshView::new([node(1, "DE", true, false), node(2, "CH", true, false)]);
        let err = select_path(
            &view,
            &PathRequest {
                hops: 2,
                origin: None,
            },
            &mut StdRng::seed_from_u64(1),
        )
        .unwrap_err();
        assert!(err.to_string().contains("none has the exit role"), "{err}");
    }

    #[test]
    fn spreads_over_exits() {
        let view = MeshView::new([
            node(1, "DE", true, true),
            node(2, "CH", true, true),
            node(3, "IS", true, true),
        ]);
        let mut rng = StdRng::seed_from_u64(7);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let p = select_path(
                &view,
                &PathRequest {
                    hops: 1,
                    origin: None,
                },
                &mut rng,
            )
            .unwrap();
            seen.insert(p[0]);
        }
        assert_eq!(seen.len(), 3);
    }
}
