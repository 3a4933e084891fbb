//! Router speed: 3-hop path picks from a prepared index on meshes of 1k, 10k
//! and 100k nodes (with a one-shot index-and-pick as the same-run baseline),
//! per-pick p50/p99 with an allocation count, and drain planning for 100k
//! live circuits.

use criterion::{BenchmarkId, Criterion};
use ferry_router::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Counts allocations, to show the pick path makes none.
struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A mesh of `n` nodes over 200 jurisdictions and n/20 operator families.
fn mesh(n: usize, seed: u64) -> MeshView {
    let mut rng = StdRng::seed_from_u64(seed);
    MeshView::new((0..n).map(|i| {
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&(i as u64).to_le_bytes());
        id[8..16].copy_from_slice(&rng.r#gen::<u64>().to_le_bytes());
        let c = rng.gen_range(0..200u32);
        NodeInfo {
            id: NodeId(id),
            jurisdiction: Some(Jurisdiction([b'A' + (c / 26) as u8, b'A' + (c % 26) as u8])),
            roles: Roles {
                entry: false,
                relay: rng.gen_bool(0.8),
                exit: rng.gen_bool(0.4),
            },
            family: rng.gen_range(0..(n as u32 / 20).max(4)),
            capacity: rng.gen_range(10..10_000),
            load: rng.r#gen::<f32>(),
            rtt_ms: rng.gen_range(1..300),
            state: NodeState::Active,
        }
    }))
}

/// Rulings draining five jurisdictions and blocking five more.
fn rulings() -> RulingSet {
    let blocs = Blocs::builtin();
    let mut set = RulingSet::new();
    for k in 0..10u8 {
        let r = Ruling {
            id: format!("r{k}"),
            version: 1,
            region: Region::Jurisdiction(Jurisdiction([b'A', b'A' + k])),
            blocked_from: Time(1_000),
            exit_by: Time(if k < 5 { 1_000_000 } else { 2_000 }),
            scope: Scope::All,
            reason: "bench".into(),
            lifted: false,
        };
        set.apply(r, &blocs).expect("bench ruling");
    }
    set
}

const NOW: Time = Time(10_000);

fn percentiles(n: usize) {
    let view = mesh(n, 1);
    let set = rulings();
    let index = PathIndex::build(&view, &set, &TrafficScope::default(), NOW);
    let c = Constraints {
        exclude: vec![Region::parse("FIVE_EYES").unwrap()],
        hops: Some(3),
        ..Constraints::default()
    }
    .resolve(&Blocs::builtin(), 3)
    .unwrap();
    let req = PathRequest::default();
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..10_000 {
        black_box(index.pick(&c, &req, &mut rng).unwrap());
    }
    let picks = 200_000;
    let mut times = Vec::with_capacity(picks);
    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..picks {
        let t = Instant::now();
        black_box(index.pick(&c, &req, &mut rng).unwrap());
        times.push(t.elapsed().as_nanos() as u64);
    }
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    times.sort_unstable();
    let p =
        |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)] as f64 / 1000.0;
    println!(
        "pick 3 hops, {n:>6} nodes: p50 {:.2} us, p99 {:.2} us, p99.9 {:.2} us, allocations in {picks} picks: {allocs}",
        p(0.5),
        p(0.99),
        p(0.999)
    );
}

fn bench(c: &mut Criterion) {
    let set = rulings();
    let cons = Resolved::defaults(3);
    let req = PathRequest::default();
    let mut g = c.benchmark_group("path_pick_3_hops");
    for n in [1_000usize, 10_000, 100_000] {
        let view = mesh(n, 1);
        let index = PathIndex::build(&view, &set, &TrafficScope::default(), NOW);
        let mut rng = StdRng::seed_from_u64(3);
        g.bench_with_input(BenchmarkId::new("indexed", n), &n, |b, _| {
            b.iter(|| black_box(index.pick(&cons, &req, &mut rng).unwrap()));
        });
        g.bench_with_input(BenchmarkId::new("one_shot_baseline", n), &n, |b, _| {
            b.iter(|| {
                black_box(
                    select_path(
                        &view,
                        &set,
                        &TrafficScope::default(),
                        NOW,
                        &cons,
                        &req,
                        &mut rng,
                    )
                    .unwrap(),
                )
            });
        });
    }
    g.finish();

    let mut g = c.benchmark_group("drain_plan");
    g.sample_size(10);
    let view = mesh(100_000, 1);
    let index = PathIndex::build(&view, &RulingSet::new(), &TrafficScope::default(), Time(0));
    let mut rng = StdRng::seed_from_u64(5);
    let circuits: Vec<LiveCircuit> = (0..100_000u64)
        .map(|i| LiveCircuit {
            id: i,
            path: index
                .pick(&cons, &req, &mut rng)
                .unwrap()
                .as_slice()
                .to_vec(),
            scope: TrafficScope::default(),
            owner: NodeId([9; 32]),
            rate_bps: 1_000_000,
        })
        .collect();
    let cfg = DrainConfig::default();
    g.bench_function("100k_circuits_100k_nodes", |b| {
        b.iter(|| black_box(plan_drain(&view, &set, Time(0), &circuits, &cfg)));
    });
    g.finish();
}

fn main() {
    for n in [1_000, 10_000, 100_000] {
        percentiles(n);
    }
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
