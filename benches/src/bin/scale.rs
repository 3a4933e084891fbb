//! Scale on a loopback mesh of release `ferry` processes (relays DE and
//! CH, exit IS, an entry; 3 hops), in one run:
//!
//! 1. Goodput of one stream, then of 1,000 streams at once, for SECS each.
//! 2. Memory per open, slow stream: STREAMS streams (5,000 by default),
//!    each carrying 2 KB a second, opened in batches; the growth of each
//!    process's resident memory over the streams.
//! 3. Memory per idle circuit at a relay, and circuit setup rate:
//!    CIRCUITS (10,000) 2-hop circuits through relay DE to exit IS, built
//!    by a test origin (this process, with a key the nodes list), 64
//!    builds in flight, then held open and idle. Setup rate is circuits
//!    over the CPU seconds each node spent building them (CREATE
//!    handshakes per second per core).
//! 4. Memory per idle circuit at the entry: a second entry that puts one
//!    stream on each circuit, and 1,000 idle streams through it. With
//!    `SCALE_HOLD_SECS=N`, the phase waits N seconds before it opens the
//!    streams and N seconds after, printing the entry's pid, so a heap
//!    profiler can attach (`heaptrack -p PID`).
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p ferry-bench --bin scale [-- STREAMS CIRCUITS SECS]
//! ```
//!
//! Needs an open-file limit above twice STREAMS (this process holds both
//! ends of every stream).

use anyhow::{Context, Result};
use ferry_bench::{
    CpuWatch, blast, blast_all, build_circuits, counting_sink, gbps, rss_bytes, unlimited_entry,
};
use ferry_tests::raw::{RawLink, fake_entry, hop};
use ferry_tests::{Mesh, Options, Proc, THREE};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// Streams of the aggregate-goodput phase.
const MANY: usize = 1000;
/// Idle streams (one circuit each) at the second entry.
const ENTRY_CIRCUITS: usize = 1000;
/// Bytes a second each slow stream carries.
const SLOW_RATE: usize = 2000;

/// Each process's resident memory, MiB, after allocators settle.
async fn rss(procs: &[(&str, &Proc)]) -> Result<Vec<f64>> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    procs
        .iter()
        .map(|(_, p)| Ok(rss_bytes(p.pid())? as f64 / (1 << 20) as f64))
        .collect()
}

fn print_growth(what: &str, n: usize, procs: &[(&str, &Proc)], before: &[f64], after: &[f64]) {
    println!("{what}: {n}");
    println!(
        "  {:<10}{:>12}{:>12}{:>14}",
        "process", "before MiB", "after MiB", "KiB per one"
    );
    for (((name, _), b), a) in procs.iter().zip(before).zip(after) {
        println!(
            "  {name:<10}{b:>12.1}{a:>12.1}{:>14.1}",
            (a - b) * 1024.0 / n as f64
        );
    }
}

/// Phase 1: one stream, then [`MANY`]; Gbit/s of each.
async fn goodput(mesh: &Mesh, secs: f64) -> Result<(f64, f64)> {
    let (sink, count) = counting_sink().await?;
    let one = mesh.open(sink.port(), "").await?;
    let t0 = Instant::now();
    blast(one, t0 + Duration::from_secs_f64(secs)).await?;
    let single = gbps(count.swap(0, Ordering::Relaxed), t0.elapsed().as_secs_f64());
    let mut streams = Vec::new();
    for _ in 0..MANY {
        streams.push(mesh.open(sink.port(), "").await?);
    }
    count.store(0, Ordering::Relaxed);
    let t0 = Instant::now();
    blast_all(streams, t0 + Duration::from_secs_f64(secs)).await?;
    let many = gbps(count.load(Ordering::Relaxed), t0.elapsed().as_secs_f64());
    Ok((single, many))
}

/// Phase 2: `n` slow streams, held while memory is read.
async fn slow_streams(mesh: &Mesh, n: usize, procs: &[(&str, &Proc)]) -> Result<()> {
    let (sink, count) = counting_sink().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = rss(procs).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = mesh
            .open(sink.port(), "")
            .await
            .with_context(|| format!("stream {i}"))?;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            // 2 KB a second, in one write, at a phase of its own.
            let chunk = vec![0x42u8; SLOW_RATE];
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + Duration::from_millis((i % 1000) as u64),
                Duration::from_secs(1),
            );
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return anyhow::Ok(()),
                }
                s.write_all(&chunk).await?;
            }
        }));
        if (i + 1) % 1000 == 0 {
            eprintln!("  {} slow streams open", i + 1);
        }
    }
    // Every stream has carried a few seconds of its rate.
    let c0 = count.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let moved = count.load(Ordering::Relaxed) - c0;
    let after = rss(procs).await?;
    print_growth("open, slow streams", n, procs, &before, &after);
    println!(
        "  carrying {:.0} KB/s together (expected {} KB/s)",
        moved as f64 / 5.0 / 1000.0,
        n * SLOW_RATE / 1000
    );
    stop.cancel();
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Phase 3: `n` idle 2-hop circuits through DE to IS, built 64 at a time.
async fn idle_circuits(
    mesh: &Mesh,
    keys: &ferry_node::identity::Keys,
    n: usize,
    procs: &[(&str, &Proc)],
) -> Result<Vec<RawLink>> {
    let (relay, exit) = (mesh.node("DE"), mesh.node("IS"));
    let path = [hop(relay), hop(exit)];
    let before = rss(procs).await?;
    let watch = CpuWatch::start(&[
        ("relay DE".into(), relay.pid()),
        ("exit IS".into(), exit.pid()),
    ])?;
    let t0 = Instant::now();
    // A relay takes at most 4,096 circuits on one link: one link per
    // 4,000 circuits.
    let mut links = Vec::new();
    let mut left = n;
    while left > 0 {
        let take = left.min(4000);
        let mut link = RawLink::open(relay, keys).await;
        let far = Instant::now() + Duration::from_secs(3600);
        let built = build_circuits(&mut link, &path, 1, take, far, false).await?;
        anyhow::ensure!(built == take, "{built} of {take} circuits built");
        links.push(link);
        left -= take;
        eprintln!("  {} idle circuits built", n - left);
    }
    let took = t0.elapsed().as_secs_f64();
    let spent = watch.spent()?;
    let after = rss(procs).await?;
    print_growth(
        "idle 2-hop circuits through relay DE",
        n,
        procs,
        &before,
        &after,
    );
    println!(
        "  built in {took:.1} s ({:.0} a second); per CPU second: {}",
        n as f64 / took,
        spent
            .iter()
            .map(|(name, c)| format!("{name} {:.0}", n as f64 / c))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(links)
}

/// With `SCALE_HOLD_SECS` set, waits that long, saying so with the entry's
/// pid: time to attach a heap profiler to it (`heaptrack -p PID`), whose
/// view of what the idle circuits hold is finer than their RSS.
async fn hold(when: &str, entry: &Proc) -> Result<()> {
    let Ok(secs) = std::env::var("SCALE_HOLD_SECS") else {
        return Ok(());
    };
    let secs: u64 = secs
        .parse()
        .with_context(|| format!("SCALE_HOLD_SECS={secs:?} is not a number of seconds"))?;
    eprintln!("scale: holding {secs} s {when} (entry pid {})", entry.pid());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    Ok(())
}

/// Phase 4: idle circuits at an entry with one stream per circuit.
async fn entry_circuits() -> Result<()> {
    let mesh = Mesh::start(
        &[ferry_tests::Spec::new("IS", "exit")],
        &Options {
            hops: 1,
            entry_replace: unlimited_entry(Some(1)),
            ..Options::default()
        },
    )?;
    mesh.echo_ping().await?;
    let procs = [("entry", &mesh.entry), ("exit IS", mesh.node("IS"))];
    let (sink, _) = counting_sink().await?;
    hold("before opening the streams", &mesh.entry).await?;
    let before = rss(&procs).await?;
    let mut held = Vec::with_capacity(ENTRY_CIRCUITS);
    for i in 0..ENTRY_CIRCUITS {
        held.push(
            mesh.open(sink.port(), "")
                .await
                .with_context(|| format!("stream {i}"))?,
        );
    }
    // Memory first: building the status answer takes memory the
    // allocator keeps, which the idle circuits do not hold.
    let after = rss(&procs).await?;
    let circuits = ferry_tests::entry_circuits(&mesh.entry.status()?).len();
    hold("with the streams open", &mesh.entry).await?;
    print_growth(
        "idle 1-hop circuits at an entry, one idle stream on each",
        ENTRY_CIRCUITS,
        &procs,
        &before,
        &after,
    );
    println!("  the entry lists {circuits} circuits");
    Ok(())
}

/// A fresh mesh for one phase (what an earlier phase freed stays in the
/// processes' allocators and would hide what the next one costs).
fn mesh(extra_peers: Vec<String>) -> Result<Mesh> {
    let mesh = Mesh::start(
        &THREE,
        &Options {
            extra_peers,
            entry_replace: unlimited_entry(None),
            // Idle circuits are kept for the whole run, and all of them
            // cross one link from relay DE to exit IS.
            node_replace: vec![
                (
                    "idle_circuit_secs = 600".into(),
                    "idle_circuit_secs = 3600".into(),
                ),
                (
                    "circuits_per_link = 4096".into(),
                    "circuits_per_link = 16384".into(),
                ),
                // Counted per side: a circuit through a relay is two.
                ("circuits = 20000".into(), "circuits = 40000".into()),
            ],
            ..Options::default()
        },
    )?;
    Ok(mesh)
}

fn procs(mesh: &Mesh) -> [(&'static str, &Proc); 4] {
    [
        ("entry", &mesh.entry),
        ("relay DE", mesh.node("DE")),
        ("relay CH", mesh.node("CH")),
        ("exit IS", mesh.node("IS")),
    ]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let streams: usize = args.first().map(|s| s.parse()).transpose()?.unwrap_or(5000);
    let circuits: usize = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10_000);
    let secs: f64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(10.0);

    // A phase of 0 is left out.
    if streams > 0 {
        eprintln!("scale: {streams} slow streams");
        let m = mesh(Vec::new())?;
        m.echo_ping().await?;
        slow_streams(&m, streams, &procs(&m)).await?;
    }
    if circuits > 0 {
        eprintln!("scale: {circuits} idle circuits");
        let (keys, block) = fake_entry();
        let m = mesh(vec![block])?;
        m.echo_ping().await?;
        let _held = idle_circuits(&m, &keys, circuits, &procs(&m)).await?;
    }

    eprintln!("scale: {ENTRY_CIRCUITS} idle circuits at an entry");
    entry_circuits().await?;

    eprintln!("scale: goodput of 1 and {MANY} streams, {secs} s each");
    let m = mesh(Vec::new())?;
    m.echo_ping().await?;
    let (one, many) = match goodput(&m, secs).await {
        Ok(r) => r,
        Err(e) => {
            ferry_bench::dump_logs(&m);
            return Err(e);
        }
    };
    println!(
        "goodput: 1 stream {one:.2} Gbit/s, {MANY} streams {many:.2} Gbit/s together ({:.2}x)",
        many / one
    );
    Ok(())
}
