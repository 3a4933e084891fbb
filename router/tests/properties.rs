//! Property tests of the router over random meshes, rulings and constraints,
//! each checked against an independent model written plainly here.

use ferry_router::*;
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// 512 cases each; failures are saved to the committed regressions file and
/// replayed first on every run.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        failure_persistence: Some(Box::new(prop::test_runner::FileFailurePersistence::Direct(
            "tests/properties.proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

const CCS: [&str; 7] = ["DE", "CH", "IS", "CA", "PK", "AE", "US"];
const REGIONS: [&str; 6] = ["PK", "AE", "GCC", "FIVE_EYES", "DE", "EU"];

fn j(s: &str) -> Jurisdiction {
    Jurisdiction([s.as_bytes()[0], s.as_bytes()[1]])
}

fn arb_node(i: usize) -> impl Strategy<Value = NodeInfo> {
    (
        prop::option::weighted(0.9, 0..CCS.len()),
        any::<bool>(),
        any::<bool>(),
        0u32..4,
        1u32..1000,
        0.0f32..1.0,
        prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
        0u64..1200,
    )
        .prop_map(
            move |(cc, relay, exit, family, capacity, load, st, until)| NodeInfo {
                id: NodeId([i as u8 + 1; 32]),
                jurisdiction: cc.map(|c| j(CCS[c])),
                roles: Roles {
                    entry: false,
                    relay,
                    exit,
                },
                family,
                capacity,
                load,
                rtt_ms: 5 + capacity % 90,
                state: match st {
                    0 => NodeState::Active,
                    1 => NodeState::Draining { until: Time(until) },
                    _ => NodeState::Exited,
                },
            },
        )
}

fn arb_mesh() -> impl Strategy<Value = Vec<NodeInfo>> {
    (0usize..9).prop_flat_map(|n| (0..n).map(arb_node).collect::<Vec<_>>())
}

fn arb_scope() -> impl Strategy<Value = Scope> {
    prop_oneof![
        Just(Scope::All),
        Just(Scope::Classes(vec!["enterprise".into()])),
        Just(Scope::Tenants(vec!["acme".into()])),
    ]
}

fn arb_rulings() -> impl Strategy<Value = Vec<Ruling>> {
    prop::collection::vec(
        (
            0..REGIONS.len(),
            0u64..1000,
            0u64..500,
            arb_scope(),
            prop::bool::weighted(0.15),
        ),
        0..4,
    )
    .prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (r, from, len, scope, lifted))| Ruling {
                id: format!("r{i}"),
                version: 1,
                region: Region::parse(REGIONS[r]).unwrap(),
                blocked_from: Time(from),
                exit_by: Time(from + len),
                scope,
                reason: "test".into(),
                lifted,
            })
            .collect()
    })
}

fn arb_regions() -> impl Strategy<Value = Vec<Region>> {
    prop::collection::vec(0..REGIONS.len(), 0..2).prop_map(|v| {
        v.into_iter()
            .map(|i| Region::parse(REGIONS[i]).unwrap())
            .collect()
    })
}

fn arb_constraints() -> impl Strategy<Value = Constraints> {
    (
        arb_regions(),
        arb_regions(),
        arb_regions(),
        1usize..5,
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(exclude, exit_in, avoid_transit, hops, u, sj, sf)| Constraints {
                exclude,
                exit_in,
                avoid_transit,
                hops: Some(hops),
                allow_unknown: u,
                allow_same_jurisdiction: sj,
                allow_same_family: sf,
            },
        )
}

fn arb_traffic() -> impl Strategy<Value = TrafficScope> {
    (prop::bool::ANY, prop::bool::ANY).prop_map(|(e, a)| TrafficScope {
        class: if e { "enterprise" } else { "consumer" }.into(),
        tenant: if a { "acme" } else { "globex" }.into(),
    })
}

fn set_of(rulings: &[Ruling]) -> RulingSet {
    let blocs = Blocs::builtin();
    let mut s = RulingSet::new();
    for r in rulings {
        s.apply(r.clone(), &blocs).unwrap();
    }
    s
}

/// The model of eligibility: active, and no ruling covering the node's
/// jurisdiction and the traffic has reached its `blocked_from`.
fn usable(n: &NodeInfo, rulings: &[Ruling], scope: &TrafficScope, t: Time) -> bool {
    let blocs = Blocs::builtin();
    n.state == NodeState::Active
        && !rulings.iter().any(|r| {
            !r.lifted
                && t >= r.blocked_from
                && r.scope.covers(scope)
                && n.jurisdiction
                    .is_some_and(|jj| blocs.resolve(&r.region).unwrap().contains(jj))
        })
}

/// The model of the constraints on one hop at position `pos` of `hops`.
fn hop_allowed(n: &NodeInfo, c: &Constraints, last: bool) -> bool {
    let blocs = Blocs::builtin();
    let in_any = |rs: &[Region]| {
        n.jurisdiction
            .is_some_and(|jj| rs.iter().any(|r| blocs.resolve(r).unwrap().contains(jj)))
    };
    let role = if last { n.roles.exit } else { n.roles.relay };
    role && (n.jurisdiction.is_some() || c.allow_unknown)
        && !in_any(&c.exclude)
        && (!last || c.exit_in.is_empty() || in_any(&c.exit_in))
        && (last || !in_any(&c.avoid_transit))
}

fn pair_ok(a: &NodeInfo, b: &NodeInfo, c: &Constraints) -> bool {
    a.id != b.id
        && (c.allow_same_jurisdiction
            || a.jurisdiction.is_none()
            || a.jurisdiction != b.jurisdiction)
        && (c.allow_same_family || a.family != b.family)
}

fn brute_force(
    nodes: &[NodeInfo],
    ok: &dyn Fn(&NodeInfo, bool) -> bool,
    c: &Constraints,
    hops: usize,
) -> bool {
    fn go(
        nodes: &[NodeInfo],
        ok: &dyn Fn(&NodeInfo, bool) -> bool,
        c: &Constraints,
        hops: usize,
        path: &mut Vec<usize>,
    ) -> bool {
        if path.len() == hops {
            return true;
        }
        let last = path.len() + 1 == hops;
        for (i, n) in nodes.iter().enumerate() {
            if !ok(n, last) || path.iter().any(|&p| !pair_ok(&nodes[p], n, c)) {
                continue;
            }
            path.push(i);
            if go(nodes, ok, c, hops, path) {
                return true;
            }
            path.pop();
        }
        false
    }
    go(nodes, ok, c, hops, &mut Vec::new())
}

proptest! {
    #![proptest_config(config())]

    /// A path comes back exactly when brute force finds one; every returned
    /// path uses only usable nodes and keeps every constraint and diversity,
    /// the fixed exit if one is asked for, and the avoid list.
    #[test]
    fn paths_are_exact_and_keep_every_rule(
        nodes in arb_mesh(), rulings in arb_rulings(), c in arb_constraints(),
        scope in arb_traffic(), t in 0u64..1200, seed: u64, origin_idx in 0usize..12,
        exit_idx in prop::option::weighted(0.3, 0usize..12),
        avoid_idx in prop::collection::vec(0usize..12, 0..3),
    ) {
        let t = Time(t);
        let view = MeshView::new(nodes.clone());
        let set = set_of(&rulings);
        let origin = nodes.get(origin_idx).map(|n| n.id);
        let resolved = c.resolve(&Blocs::builtin(), 3).unwrap();
        let hops = c.hops.unwrap();
        let exit = exit_idx.and_then(|i| nodes.get(i)).map(|n| n.id);
        let avoid: Vec<NodeId> = avoid_idx.iter().filter_map(|&i| nodes.get(i)).map(|n| n.id).collect();
        let req = PathRequest { origin, exit, avoid: avoid.clone() };
        let got = select_path(&view, &set, &scope, t, &resolved, &req, &mut StdRng::seed_from_u64(seed));
        let ok = |n: &NodeInfo, last: bool| Some(n.id) != origin
            && !avoid.contains(&n.id)
            && (!last || exit.is_none_or(|x| x == n.id))
            && usable(n, &rulings, &scope, t)
            && hop_allowed(n, &c, last);
        let exists = brute_force(&nodes, &ok, &c, hops);
        prop_assert_eq!(got.is_ok(), exists, "{:?}", got);
        match got {
            Ok(path) => {
                let hs: Vec<&NodeInfo> = path.as_slice().iter().map(|id| view.get(id).unwrap()).collect();
                prop_assert_eq!(hs.len(), hops);
                for (i, n) in hs.iter().enumerate() {
                    prop_assert!(ok(n, i + 1 == hops), "hop {} breaks a rule: {:?}", i, n);
                    for m in &hs[i + 1..] {
                        prop_assert!(pair_ok(n, m, &c));
                    }
                }
            }
            Err(e) => prop_assert!(e.to_string().contains("nodes known"), "{}", e),
        }
    }

    /// The same seed gives the same path.
    #[test]
    fn selection_is_deterministic_per_seed(nodes in arb_mesh(), rulings in arb_rulings(), seed: u64) {
        let view = MeshView::new(nodes);
        let set = set_of(&rulings);
        let c = Resolved::defaults(2);
        let sc = TrafficScope::default();
        let a = select_path(&view, &set, &sc, Time(500), &c, &PathRequest::default(), &mut StdRng::seed_from_u64(seed));
        let b = select_path(&view, &set, &sc, Time(500), &c, &PathRequest::default(), &mut StdRng::seed_from_u64(seed));
        prop_assert_eq!(a, b);
    }
}

// ---- drain planning -----------------------------------------------------

fn arb_circuits(n_nodes: usize) -> impl Strategy<Value = Vec<LiveCircuit>> {
    let n = n_nodes.max(1);
    prop::collection::vec((prop::collection::vec(0..n, 1..4), arb_traffic()), 0..12).prop_map(
        move |v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (path, scope))| LiveCircuit {
                    id: i as u64,
                    path: path
                        .into_iter()
                        .map(|p| NodeId([p as u8 + 1; 32]))
                        .collect(),
                    scope,
                    owner: NodeId([200; 32]),
                    rate_bps: 1000,
                })
                .collect()
        },
    )
}

/// The model deadline of a hop for a circuit: its own drain, or the earliest
/// exit date of a ruling in force covering it and the traffic.
fn deadline(
    n: Option<&NodeInfo>,
    rulings: &[Ruling],
    scope: &TrafficScope,
    now: Time,
) -> Option<Time> {
    let n = n?;
    let blocs = Blocs::builtin();
    let own = match n.state {
        NodeState::Active => None,
        NodeState::Draining { until } => Some(until),
        NodeState::Exited => Some(now),
    };
    let ruled = rulings
        .iter()
        .filter(|r| {
            !r.lifted
                && r.scope.covers(scope)
                && n.jurisdiction
                    .is_some_and(|jj| blocs.resolve(&r.region).unwrap().contains(jj))
        })
        .map(|r| r.exit_by)
        .min();
    own.into_iter().chain(ruled).min()
}

fn check_plan(
    nodes: &[NodeInfo],
    rulings: &[Ruling],
    circuits: &[LiveCircuit],
    now: Time,
    cfg: &DrainConfig,
    plan: &DrainPlan,
) -> Result<(), TestCaseError> {
    let view = MeshView::new(nodes.to_vec());
    for c in circuits {
        let (exit, relays) = c.path.split_last().unwrap();
        let exit_d = deadline(view.get(exit), rulings, &c.scope, now);
        let relay_d = relays
            .iter()
            .filter_map(|r| deadline(view.get(r), rulings, &c.scope, now))
            .min();
        let acts: Vec<&Action> = plan
            .actions
            .iter()
            .filter(|a| matches!(a, Action::Migrate { circuit, .. } | Action::CloseExitStreams { circuit, .. } if *circuit == c.id))
            .collect();
        match (exit_d, relay_d) {
            (Some(_), _) => {
                prop_assert_eq!(acts.len(), 1);
                prop_assert!(
                    matches!(acts[0], Action::CloseExitStreams { .. }),
                    "exit in a ruled region must close, not move"
                );
            }
            (None, Some(d)) => {
                prop_assert_eq!(
                    acts.len(),
                    1,
                    "circuit {} through a ruled relay needs one migration",
                    c.id
                );
                let Action::Migrate { at, done_by, .. } = acts[0] else {
                    panic!("expected a migration")
                };
                prop_assert_eq!(*done_by, d.minus_ms(cfg.margin_ms));
                prop_assert!(*at >= now);
                let feasible = now.plus_ms(cfg.migration_ms) <= d.minus_ms(cfg.margin_ms);
                prop_assert_eq!(plan.at_risk.contains(&c.id), !feasible);
                if feasible {
                    prop_assert!(
                        at.plus_ms(cfg.migration_ms) <= *done_by,
                        "migration at {:?} misses {:?}",
                        at,
                        done_by
                    );
                }
            }
            (None, None) => prop_assert!(
                acts.is_empty(),
                "untouched circuit {} was planned for",
                c.id
            ),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// Every feasible migration finishes before exit_by − margin; circuits
    /// with a ruled exit are closed, untouched ones are left alone; the same
    /// seed gives the same plan.
    #[test]
    fn drain_plans_meet_their_deadlines_and_are_deterministic(
        (nodes, circuits) in arb_mesh().prop_flat_map(|n| { let k = n.len(); (Just(n), arb_circuits(k)) }),
        rulings in arb_rulings(), now in 0u64..1200, seed: u64, margin in 0u64..50, mig in 1u64..100,
    ) {
        let cfg = DrainConfig { margin_ms: margin, migration_ms: mig, seed };
        let set = set_of(&rulings);
        let view = MeshView::new(nodes.clone());
        let plan = plan_drain(&view, &set, Time(now), &circuits, &cfg);
        check_plan(&nodes, &rulings, &circuits, Time(now), &cfg, &plan)?;
        prop_assert_eq!(&plan, &plan_drain(&view, &set, Time(now), &circuits, &cfg));
        let mut sorted = plan.actions.clone();
        sorted.sort_by_key(|a| a.due());
        prop_assert_eq!(plan.actions.iter().map(|a| a.due()).collect::<Vec<_>>(), sorted.iter().map(|a| a.due()).collect::<Vec<_>>());
    }

    /// Amending a ruling to an earlier exit date never yields a plan that
    /// misses the new date (where it can still be met).
    #[test]
    fn amending_to_an_earlier_exit_date_replans_in_time(
        (nodes, circuits) in arb_mesh().prop_flat_map(|n| { let k = n.len(); (Just(n), arb_circuits(k)) }),
        rulings in arb_rulings().prop_filter("one ruling", |r| !r.is_empty()),
        now in 0u64..1200, seed: u64, cut in 0u64..500,
    ) {
        let cfg = DrainConfig { margin_ms: 10, migration_ms: 20, seed };
        let blocs = Blocs::builtin();
        let mut set = set_of(&rulings);
        let view = MeshView::new(nodes.clone());
        let _before = plan_drain(&view, &set, Time(now), &circuits, &cfg);
        let mut amended = rulings[0].clone();
        amended.version += 1;
        amended.exit_by = Time(amended.exit_by.0.saturating_sub(cut).max(amended.blocked_from.0));
        set.apply(amended.clone(), &blocs).unwrap();
        let mut model = rulings.clone();
        model[0] = amended;
        let after = plan_drain(&view, &set, Time(now), &circuits, &cfg);
        check_plan(&nodes, &model, &circuits, Time(now), &cfg, &after)?;
    }
}

#[test]
fn migrations_are_spread_over_the_window() {
    let nodes: Vec<NodeInfo> = [
        ("PK", true, false),
        ("DE", true, false),
        ("CA", false, true),
    ]
    .iter()
    .enumerate()
    .map(|(i, (cc, relay, exit))| {
        NodeInfo::new(
            NodeId([i as u8 + 1; 32]),
            Some(j(cc)),
            Roles {
                entry: false,
                relay: *relay,
                exit: *exit,
            },
        )
    })
    .collect();
    let view = MeshView::new(nodes);
    let set = set_of(&[Ruling {
        id: "pk".into(),
        version: 1,
        region: Region::parse("PK").unwrap(),
        blocked_from: Time(1_000),
        exit_by: Time(101_000),
        scope: Scope::All,
        reason: "order".into(),
        lifted: false,
    }]);
    let circuits: Vec<LiveCircuit> = (0..10_000)
        .map(|i| LiveCircuit {
            id: i,
            path: vec![NodeId([1; 32]), NodeId([2; 32]), NodeId([3; 32])],
            scope: TrafficScope::default(),
            owner: NodeId([9; 32]),
            rate_bps: 1,
        })
        .collect();
    let cfg = DrainConfig {
        margin_ms: 10_000,
        migration_ms: 5_000,
        seed: 42,
    };
    let plan = plan_drain(&view, &set, Time(0), &circuits, &cfg);
    let mut buckets = [0usize; 10];
    for a in &plan.actions {
        if let Action::Migrate { at, .. } = a {
            assert!(at.0 >= 1_000 && at.0 <= 86_000, "{at:?} outside the window");
            buckets[((at.0 - 1_000) * 10 / 85_001) as usize] += 1;
        }
    }
    // Uniform: each tenth of the window gets about 1000 of the 10000.
    for b in buckets {
        assert!(
            (800..1200).contains(&b),
            "no stampede, but buckets are {buckets:?}"
        );
    }
}

#[test]
fn what_if_counts_nodes_circuits_and_tenants() {
    let mk = |i: u8, cc: &str, relay: bool, exit: bool| {
        NodeInfo::new(
            NodeId([i; 32]),
            Some(j(cc)),
            Roles {
                entry: false,
                relay,
                exit,
            },
        )
    };
    let view = MeshView::new([
        mk(1, "AE", true, false),
        mk(2, "SA", true, false),
        mk(3, "DE", true, false),
        mk(4, "CA", false, true),
        mk(5, "QA", false, true),
    ]);
    let circ = |id, path: &[u8], tenant: &str| LiveCircuit {
        id,
        path: path.iter().map(|b| NodeId([*b; 32])).collect(),
        scope: TrafficScope {
            class: "enterprise".into(),
            tenant: tenant.into(),
        },
        owner: NodeId([9; 32]),
        rate_bps: 1,
    };
    let circuits = [
        circ(1, &[1, 3, 4], "acme"),
        circ(2, &[3, 2, 4], "globex"),
        circ(3, &[3, 5], "initech"),
        circ(4, &[3, 4], "hooli"),
    ];
    let gcc = Ruling {
        id: "gcc".into(),
        version: 1,
        region: Region::parse("GCC").unwrap(),
        blocked_from: Time(100),
        exit_by: Time(1_000_000),
        scope: Scope::All,
        reason: "what if".into(),
        lifted: false,
    };
    let impact = what_if(
        &view,
        &RulingSet::new(),
        &gcc,
        &Blocs::builtin(),
        Time(0),
        &circuits,
        &DrainConfig::default(),
    )
    .unwrap();
    assert_eq!(impact.migrate, [1, 2]);
    assert_eq!(impact.close, [3]);
    assert!(impact.at_risk.is_empty(), "a million ms is time enough");
    assert_eq!(
        impact.nodes,
        [NodeId([1; 32]), NodeId([2; 32]), NodeId([5; 32])]
    );
    assert_eq!(
        impact
            .tenants
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        ["acme", "globex", "initech"]
    );
    assert_eq!(impact.by_jurisdiction[&j("AE")].nodes, 1);
    assert_eq!(impact.by_jurisdiction[&j("AE")].capacity, 100);
    assert_eq!(impact.by_jurisdiction[&j("QA")].circuits, 1);
    assert!(!impact.by_jurisdiction.contains_key(&j("DE")));
    // Out in a moment: the migrations cannot finish in time.
    let soon = Ruling {
        exit_by: Time(101),
        ..gcc.clone()
    };
    let cfg = DrainConfig::default();
    let impact = what_if(
        &view,
        &RulingSet::new(),
        &soon,
        &Blocs::builtin(),
        Time(0),
        &circuits,
        &cfg,
    )
    .unwrap();
    assert_eq!(impact.at_risk, [1, 2]);
    // With gcc in force: a new version with the same dates changes
    // nothing, one that brings the exit date forward moves the same
    // circuits sooner, and a lift releases them.
    let mut set = RulingSet::new();
    set.apply(gcc.clone(), &Blocs::builtin()).unwrap();
    let v2 = |exit: u64, lifted: bool| Ruling {
        version: 2,
        exit_by: Time(exit),
        lifted,
        ..gcc.clone()
    };
    let ask =
        |r: &Ruling| what_if(&view, &set, r, &Blocs::builtin(), Time(0), &circuits, &cfg).unwrap();
    let same = ask(&v2(1_000_000, false));
    assert!(same.migrate.is_empty() && same.close.is_empty(), "{same:?}");
    let sooner = ask(&v2(500_000, false));
    assert_eq!(
        (sooner.migrate.as_slice(), sooner.close.as_slice()),
        (&[1, 2][..], &[3][..])
    );
    let lift = ask(&v2(1_000_000, true));
    assert_eq!(lift.released, [1, 2, 3]);
    assert!(lift.migrate.is_empty() && lift.nodes.is_empty());
}

#[test]
fn no_path_names_the_ruling_and_the_constraint() {
    let mk = |i: u8, cc: &str| {
        NodeInfo::new(
            NodeId([i; 32]),
            Some(j(cc)),
            Roles {
                entry: false,
                relay: true,
                exit: true,
            },
        )
    };
    let view = MeshView::new([mk(1, "PK"), mk(2, "AE"), mk(3, "DE")]);
    let set = set_of(&[Ruling {
        id: "pk-exit".into(),
        version: 1,
        region: Region::parse("PK").unwrap(),
        blocked_from: Time(0),
        exit_by: Time(10),
        scope: Scope::All,
        reason: "order".into(),
        lifted: false,
    }]);
    let c = Constraints {
        exclude: vec![Region::parse("AE").unwrap()],
        hops: Some(2),
        ..Constraints::default()
    };
    let err = select_path(
        &view,
        &set,
        &TrafficScope::default(),
        Time(20),
        &c.resolve(&Blocs::builtin(), 3).unwrap(),
        &PathRequest::default(),
        &mut StdRng::seed_from_u64(1),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("blocked by ruling pk-exit: 01010101"), "{msg}");
    assert!(msg.contains("excluded by constraint: 02020202"), "{msg}");
    assert!(msg.contains("exclude=AE"), "{msg}");
}

#[test]
fn tenant_and_connection_constraints_merge() {
    let blocs = Blocs::builtin();
    let tenant = Constraints {
        exclude: vec![Region::parse("PK").unwrap()],
        exit_in: vec![Region::parse("EU").unwrap()],
        hops: Some(3),
        ..Constraints::default()
    };
    let conn = Constraints {
        exclude: vec![Region::parse("AE").unwrap()],
        exit_in: vec![Region::parse("DE").unwrap(), Region::parse("CA").unwrap()],
        hops: Some(2),
        ..Constraints::default()
    };
    let r = Constraints::merge(&tenant, &conn, &blocs, 3).unwrap();
    assert!(r.exclude.contains(j("PK")) && r.exclude.contains(j("AE")));
    let exits = r.exit_in.unwrap();
    assert!(exits.contains(j("DE")) && !exits.contains(j("CA")) && !exits.contains(j("FR")));
    assert_eq!(r.hops, 2);
    assert!(
        Constraints {
            hops: Some(9),
            ..Constraints::default()
        }
        .resolve(&blocs, 3)
        .is_err()
    );
}

/// Regression (found by `drain_plans_meet_their_deadlines_and_are_deterministic`):
/// a node draining on its own whose jurisdiction is unknown was ignored.
#[test]
fn regression_own_drain_of_a_node_with_unknown_jurisdiction_counts() {
    let mut n = NodeInfo::new(NodeId([4; 32]), None, Roles::default());
    n.state = NodeState::Draining { until: Time(500) };
    let exit = NodeInfo::new(
        NodeId([5; 32]),
        Some(j("CA")),
        Roles {
            entry: false,
            relay: false,
            exit: true,
        },
    );
    let view = MeshView::new([n, exit]);
    let c = LiveCircuit {
        id: 1,
        path: vec![NodeId([4; 32]), NodeId([5; 32])],
        scope: TrafficScope::default(),
        owner: NodeId([9; 32]),
        rate_bps: 1,
    };
    let plan = plan_drain(
        &view,
        &RulingSet::new(),
        Time(0),
        &[c],
        &DrainConfig {
            margin_ms: 10,
            migration_ms: 20,
            seed: 1,
        },
    );
    assert!(
        plan.actions.iter().any(|a| matches!(
            a,
            Action::Migrate {
                circuit: 1,
                done_by: Time(490),
                ..
            }
        )),
        "{plan:?}"
    );
}

/// Regression (found by `tenant_and_connection_constraints_merge`): `EU` is a
/// bloc, not a two-letter country.
#[test]
fn regression_two_letter_bloc_names_resolve_as_blocs() {
    let eu = Blocs::builtin()
        .resolve(&Region::parse("EU").unwrap())
        .unwrap();
    assert!(eu.contains(j("DE")) && eu.contains(j("FR")) && !eu.contains(j("CH")));
}
