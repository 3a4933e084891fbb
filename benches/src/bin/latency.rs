//! Round trips of 64 bytes, direct, through one socat relay, and through
//! 1-hop and 3-hop Ferry circuits, in one run; then through the 3-hop
//! circuit again while a bulk stream shares it (the same entry, route and
//! circuit, so the same links at every hop); then through 2-hop circuits
//! of their own, unloaded and while a bulk stream on another circuit
//! shares all their links (an entry that puts one stream on a circuit, a
//! mesh of one relay and one exit, so every circuit takes the same links).
//!
//! ```text
//! apt-get install socat                         # Debian
//! cargo build --release --workspace --bins
//! cargo run --release -p ferry-bench --bin latency [-- ROUND_TRIPS RUNS]
//! ```
//!
//! Prints p50 and p99 of each (median over RUNS, 3 by default, of
//! ROUND_TRIPS, 5,000 by default), the time each process adds at p50
//! (Ferry with h hops has h + 1 processes between client and server: the
//! entry too), and each loaded p99 over its unloaded one.
//!
//! `LATENCY_CONFIG="FROM=>TO;..."` replaces text in every node's config of
//! the Ferry meshes, for experiments (a window, for example).

use anyhow::{Context, Result, bail};
use ferry_bench::{blast, counting_sink, ping_pong, quantile, unlimited_entry};
use ferry_tests::{Mesh, Options, Spec, THREE};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

struct Bg(Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// p50 and p99 (µs) of `n` round trips on streams from `open`, median
/// over `runs` streams.
async fn measure<F, Fut>(name: &str, n: usize, runs: usize, open: F) -> Result<(f64, f64)>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<TcpStream>>,
{
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut s = open().await?;
        // Warm: the first round trips pay for connection setup.
        ping_pong(&mut s, 64, 50, Instant::now() + Duration::from_secs(30)).await?;
        let mut v = ping_pong(&mut s, 64, n, Instant::now() + Duration::from_secs(120)).await?;
        if v.len() < n {
            bail!("{name}: only {} round trips in 120 s", v.len());
        }
        p50.push(quantile(&mut v, 0.5));
        p99.push(quantile(&mut v, 0.99));
    }
    let r = (quantile(&mut p50, 0.5), quantile(&mut p99, 0.5));
    eprintln!("  {name}: p50 {:.0} µs, p99 {:.0} µs", r.0, r.1);
    Ok(r)
}

async fn via(socks: SocketAddr, port: u16) -> Result<TcpStream> {
    ferry_tests::socks_connect(socks, "127.0.0.1", port)
        .await?
        .map_err(|c| anyhow::anyhow!("SOCKS reply {c}"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.first().map(|s| s.parse()).transpose()?.unwrap_or(5000);
    let runs: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let echo = ferry_tests::echo_server().await?;
    let relay = ferry_tests::free_port()?;
    let _socat = Bg(Command::new("socat")
        .args([
            "-b",
            "131072",
            &format!("TCP-LISTEN:{},bind=127.0.0.1,reuseaddr,fork", relay.port()),
            &format!("TCP:{echo},nodelay"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("socat (Debian: apt-get install socat)")?);
    let node_replace = ferry_bench::config_from_env("LATENCY_CONFIG")?;
    let one = Mesh::start(
        &[Spec::new("IS", "exit")],
        &Options {
            hops: 1,
            node_replace: node_replace.clone(),
            ..Options::default()
        },
    )?;
    let three = Mesh::start(
        &THREE,
        &Options {
            node_replace: node_replace.clone(),
            ..Options::default()
        },
    )?;
    // One stream per circuit, and one way through the mesh.
    let apart = Mesh::start(
        &[Spec::new("DE", "relay"), Spec::new("IS", "exit")],
        &Options {
            hops: 2,
            entry_replace: unlimited_entry(Some(1)),
            node_replace,
            ..Options::default()
        },
    )?;
    one.echo_ping().await?;
    three.echo_ping().await?;
    apart.echo_ping().await?;
    let t0 = Instant::now();
    while TcpStream::connect(relay).await.is_err() {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(10),
            "socat never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("latency: {n} round trips of 64 bytes, median of {runs} runs");
    let direct = measure("direct", n, runs, || async move {
        Ok(TcpStream::connect(echo).await?)
    })
    .await?;
    let socat = measure("socat, 1 relay", n, runs, || async move {
        Ok(TcpStream::connect(relay).await?)
    })
    .await?;
    let (s1, s3) = (one.socks(), three.socks());
    let f1 = measure("ferry, 1 hop", n, runs, || via(s1, echo.port())).await?;
    let f3 = measure("ferry, 3 hops", n, runs, || via(s3, echo.port())).await?;

    let s2 = apart.socks();
    let f2 = measure("ferry, 2 hops, a circuit of its own", n, runs, || {
        via(s2, echo.port())
    })
    .await?;

    // The same 3-hop circuit with a bulk stream on it. The entry puts
    // streams of one route on one circuit (up to its stream limit), so
    // both streams cross the same links.
    let loaded = beside_bulk(
        "ferry, 3 hops, with a bulk stream on the circuit",
        s3,
        echo.port(),
        (n, runs),
    )
    .await?;
    // A 2-hop circuit of its own beside a bulk stream's circuit: the same
    // links, so only the links' queues and the processes are shared.
    let beside = beside_bulk(
        "ferry, 2 hops, with a bulk stream on another circuit",
        s2,
        echo.port(),
        (n, runs),
    )
    .await?;

    let per = |x: (f64, f64), procs: f64| (x.0 - direct.0) / procs;
    println!(
        "{:<44}{:>10}{:>10}{:>18}",
        "path", "p50 µs", "p99 µs", "added/process µs"
    );
    for (name, r, procs) in [
        ("direct", direct, 0.0),
        ("socat, 1 relay", socat, 1.0),
        ("ferry, 1 hop (entry, exit)", f1, 2.0),
        ("ferry, 3 hops (entry, 2 relays, exit)", f3, 4.0),
        ("ferry, 2 hops, one stream per circuit", f2, 3.0),
    ] {
        let added = if procs > 0.0 {
            format!("{:.1}", per(r, procs))
        } else {
            "-".into()
        };
        println!("{name:<44}{:>10.0}{:>10.0}{added:>18}", r.0, r.1);
    }
    for (path, place, ((p50, p99), gbps)) in
        [("3 hops", "on it", loaded), ("2 hops", "beside", beside)]
    {
        let name = format!("ferry, {path}, bulk at {gbps:.2} Gbit/s {place}");
        println!("{name:<44}{p50:>10.0}{p99:>10.0}");
    }
    println!(
        "ferry per process at p50 over socat's: 1 hop {:.2}x, 3 hops {:.2}x; loaded p99 over unloaded: same circuit {:.2}x, another circuit {:.2}x",
        per(f1, 2.0) / per(socat, 1.0),
        per(f3, 4.0) / per(socat, 1.0),
        loaded.0.1 / f3.1,
        beside.0.1 / f2.1
    );
    Ok(())
}

/// Round trips ([`measure`]) through `socks` to the echo server on
/// `echo_port` while a bulk stream through `socks` to a sink of its own
/// sends at full speed; returns p50 and p99 and the bulk stream's Gbit/s
/// meanwhile.
async fn beside_bulk(
    name: &str,
    socks: SocketAddr,
    echo_port: u16,
    (n, runs): (usize, usize),
) -> Result<((f64, f64), f64)> {
    let (sink, count) = counting_sink().await?;
    let bulk = via(socks, sink.port()).await?;
    let load = tokio::spawn(blast(bulk, Instant::now() + Duration::from_secs(600)));
    // Let the bulk stream reach full speed first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = count.load(Ordering::Relaxed);
    let t = Instant::now();
    let r = measure(name, n, runs, || via(socks, echo_port)).await;
    let gbps =
        (count.load(Ordering::Relaxed) - before) as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9;
    load.abort();
    Ok((r?, gbps))
}
