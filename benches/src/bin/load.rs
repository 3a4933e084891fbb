//! Load on a loopback mesh of release `ferry` processes (relays DE and CH,
//! exit IS, an entry; 3 hops, so every circuit crosses all three), with
//! the CPU each process spent on it; with a role named, a `perf record` of
//! that process for the load's length, which `benches/profile.sh` turns
//! into a flamegraph.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p ferry-bench --bin load -- LOAD [SECS [ROLE PERF_DATA]]
//! ```
//!
//! - `bulk`: one stream, as fast as it goes.
//! - `streams`: 1,000 streams at once, each as fast as it goes.
//! - `small`: 24 clients each opening a stream, sending 1 KiB to an echo
//!   server, reading it back and closing, over and over.
//! - `circuits`: a test origin (this process, with a key the nodes list)
//!   building 2-hop circuits through relay DE to exit IS, 64 builds in
//!   flight, destroying each once built.
//! - `mix`: `bulk` and `small` at once.
//! - `pingpong`: one stream, 64-byte round trips to an echo server one
//!   after another (what a round trip costs each process; p50 and p99).
//! - `pingbulk`: `pingpong` while `bulk` runs on another stream, as fast
//!   as it goes or, with `LOAD_PACE_MBIT=N`, at N Mbit/s (latency under
//!   load with and without CPU to spare).
//!
//! ROLE is `entry`, `relay` (DE) or `exit` (IS). SECS defaults to 10.
//! Besides CPU, each process's row has the thread-seconds its threads
//! waited for a CPU while runnable (`/proc/PID/task/*/schedstat`, summed
//! over threads, so two threads waiting for 1 s are 2): on two cores
//! shared by the mesh and the load, contention shows there. The load's
//! own process has a row too.
//! `LOAD_CONFIG="FROM=>TO;..."` replaces text in every node's config, for
//! experiments (`stream_window_bytes = 2097152=>stream_window_bytes =
//! 8388608`).

use anyhow::{Context, Result, bail};
use ferry_bench::{
    CpuWatch, Perf, blast, blast_all, build_circuits, counting_sink, gbps, rss_bytes,
    unlimited_entry,
};
use ferry_tests::raw::{RawLink, fake_entry, hop};
use ferry_tests::{Mesh, Options, Proc, THREE};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Streams of the `streams` load.
const STREAMS: usize = 1000;
/// Clients of the `small` load (the entry lets one client address have 32
/// connections in their handshake at once).
const SMALL_CLIENTS: usize = 24;

fn role<'a>(mesh: &'a Mesh, name: &str) -> Result<&'a Proc> {
    Ok(match name {
        "entry" => &mesh.entry,
        "relay" => mesh.node("DE"),
        "exit" => mesh.node("IS"),
        other => bail!("no role {other:?} (entry, relay or exit)"),
    })
}

/// `bulk`: one stream for `secs`, at `pace` bits a second if given (as
/// fast as it goes if not); bytes delivered.
async fn bulk(mesh: &Mesh, secs: f64, pace: Option<f64>) -> Result<u64> {
    let (sink, count) = counting_sink().await?;
    let mut s = mesh.open(sink.port(), "").await?;
    let until = Instant::now() + Duration::from_secs_f64(secs);
    match pace {
        None => blast(s, until).await?,
        Some(bps) => {
            // 64 KiB a tick, as `ferry_tests::send_pattern_paced` paces;
            // after a stall the ticks start again from now (no burst to
            // catch up).
            let buf = vec![0xa5u8; 64 * 1024];
            let gap = Duration::from_secs_f64(buf.len() as f64 * 8.0 / bps);
            let mut tick = tokio::time::interval(gap);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while tokio::time::timeout_at(until.into(), tick.tick())
                .await
                .is_ok()
            {
                match tokio::time::timeout_at(until.into(), s.write_all(&buf)).await {
                    Ok(r) => r?,
                    Err(_) => break,
                }
            }
            s.shutdown().await?;
        }
    }
    Ok(count.load(Ordering::Relaxed))
}

/// `streams`: [`STREAMS`] streams at once for `secs`; bytes delivered.
async fn streams(mesh: &Mesh, secs: f64) -> Result<u64> {
    let (sink, count) = counting_sink().await?;
    let mut open = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        open.push(mesh.open(sink.port(), "").await?);
    }
    // Counted from here: every stream is open.
    let before = count.load(Ordering::Relaxed);
    blast_all(open, Instant::now() + Duration::from_secs_f64(secs)).await?;
    Ok(count.load(Ordering::Relaxed) - before)
}

/// `small`: [`SMALL_CLIENTS`] clients opening, using and closing streams
/// for `secs`; streams completed.
async fn small(mesh: &Mesh, secs: f64) -> Result<u64> {
    let echo = ferry_tests::echo_server().await?;
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let socks = mesh.socks();
    let tasks: Vec<_> = (0..SMALL_CLIENTS)
        .map(|_| {
            let done = done.clone();
            tokio::spawn(async move {
                let out = vec![0x3cu8; 1024];
                let mut back = vec![0u8; 1024];
                while Instant::now() < until {
                    let mut s = ferry_tests::socks_connect(socks, "127.0.0.1", echo.port())
                        .await
                        .context("SOCKS handshake")?
                        .map_err(|c| anyhow::anyhow!("SOCKS reply {c}"))?;
                    s.write_all(&out).await?;
                    s.read_exact(&mut back).await.context("echo")?;
                    anyhow::ensure!(back == out, "the echo came back altered");
                    done.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed))
}

/// `pingpong`: 64-byte round trips on one stream, one after another, for
/// `secs`; round trips made. Prints their p50 and p99.
async fn pingpong(mesh: &Mesh, secs: f64) -> Result<u64> {
    let echo = ferry_tests::echo_server().await?;
    let mut s = mesh.open(echo.port(), "").await?;
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut v = ferry_bench::ping_pong(&mut s, 64, usize::MAX, until).await?;
    let n = v.len() as u64;
    println!(
        "pingpong: p50 {:.0} µs, p99 {:.0} µs",
        ferry_bench::quantile(&mut v, 0.5),
        ferry_bench::quantile(&mut v, 0.99)
    );
    Ok(n)
}

/// `circuits`: 2-hop circuits through `relay` to `exit` built (and
/// destroyed) for `secs`, 64 builds in flight; circuits built.
async fn circuits(
    relay: &Proc,
    exit: &Proc,
    keys: &ferry_node::identity::Keys,
    secs: f64,
) -> Result<u64> {
    let mut link = RawLink::open(relay, keys).await;
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let built = build_circuits(
        &mut link,
        &[hop(relay), hop(exit)],
        1,
        usize::MAX,
        until,
        true,
    )
    .await?;
    Ok(built as u64)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let load = args.first().map(String::as_str).unwrap_or("bulk");
    let secs: f64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(10.0);
    let profile = match (args.get(2), args.get(3)) {
        (Some(r), Some(f)) => Some((r.clone(), std::path::PathBuf::from(f))),
        (None, None) => None,
        _ => bail!("usage: load LOAD [SECS [ROLE PERF_DATA]]"),
    };
    if ![
        "bulk", "streams", "small", "circuits", "mix", "pingpong", "pingbulk",
    ]
    .contains(&load)
    {
        bail!("no load {load:?} (bulk, streams, small, circuits, mix, pingpong or pingbulk)");
    }
    let pace = match std::env::var("LOAD_PACE_MBIT") {
        Ok(v) => Some(
            v.parse::<f64>()
                .ok()
                .filter(|m| (1.0..=1e6).contains(m))
                .with_context(|| format!("LOAD_PACE_MBIT={v:?}: not a rate of 1 to 1000000"))?
                * 1e6,
        ),
        Err(_) => None,
    };
    let (keys, block) = fake_entry();
    // Experiments: LOAD_CONFIG="from=>to;from=>to" replaces text in every
    // node's config (for example a window or a limit).
    let node_replace = ferry_bench::config_from_env("LOAD_CONFIG")?;
    let mesh = Mesh::start(
        &THREE,
        &Options {
            extra_peers: vec![block],
            entry_replace: unlimited_entry(None),
            node_replace,
            ..Options::default()
        },
    )?;
    eprintln!(
        "load {load}: {secs} s on relays DE, CH, exit IS and an entry (ferry = {})",
        ferry_tests::ferry_bin()?.display()
    );
    // Warm: every circuit the entry needs is built before the clock starts.
    mesh.echo_ping().await?;
    let procs: Vec<(String, u32)> = [("entry", "entry"), ("relay DE", "relay")]
        .iter()
        .map(|(n, r)| Ok((n.to_string(), role(&mesh, r)?.pid())))
        .chain([
            Ok(("relay CH".to_string(), mesh.node("CH").pid())),
            Ok(("exit IS".to_string(), mesh.node("IS").pid())),
            Ok(("load".to_string(), std::process::id())),
        ])
        .collect::<Result<_>>()?;
    let perf = match &profile {
        Some((r, f)) => Some(Perf::record(role(&mesh, r)?.pid(), f)?),
        None => None,
    };
    let watch = CpuWatch::start(&procs)?;
    let t0 = Instant::now();
    let ran: Result<(u64, u64)> = async {
        Ok(match load {
            "bulk" => (bulk(&mesh, secs, pace).await?, 0),
            "streams" => (streams(&mesh, secs).await?, 0),
            "small" => (0, small(&mesh, secs).await?),
            "pingpong" => (0, pingpong(&mesh, secs).await?),
            "pingbulk" => {
                let (b, p) = tokio::join!(bulk(&mesh, secs, pace), pingpong(&mesh, secs));
                (b?, p?)
            }
            "circuits" => (
                0,
                circuits(mesh.node("DE"), mesh.node("IS"), &keys, secs).await?,
            ),
            _ => {
                let (b, s) = tokio::join!(bulk(&mesh, secs, pace), small(&mesh, secs));
                (b?, s?)
            }
        })
    }
    .await;
    let (bytes, ops) = match ran {
        Ok(r) => r,
        Err(e) => {
            ferry_bench::dump_logs(&mesh);
            return Err(e);
        }
    };
    let took = t0.elapsed().as_secs_f64();
    let spent = watch.spent()?;
    let waited = watch.waited()?;
    if let Some(p) = perf {
        p.stop()?;
    }
    let what = match load {
        "bulk" | "streams" => format!("{:.2} Gbit/s", gbps(bytes, took)),
        "circuits" => format!("{ops} circuits built, {:.0} per second", ops as f64 / took),
        "small" => format!("{ops} streams, {:.0} per second", ops as f64 / took),
        "pingpong" => format!("{ops} round trips, {:.0} per second", ops as f64 / took),
        "pingbulk" => format!(
            "bulk {:.2} Gbit/s, {ops} round trips ({:.0} per second)",
            gbps(bytes, took),
            ops as f64 / took
        ),
        _ => format!(
            "bulk {:.2} Gbit/s, {ops} small streams ({:.0} per second)",
            gbps(bytes, took),
            ops as f64 / took
        ),
    };
    println!("load {load}, {took:.1} s: {what}");
    println!(
        "{:<10}{:>10}{:>12}{:>14}{:>10}{:>12}",
        "process", "CPU s", "CPU s/GB", "per op, µs", "RSS MiB", "waited s"
    );
    for (((name, pid), (_, cpu)), wait) in procs.iter().zip(&spent).zip(&waited) {
        let per_gb = if bytes > 0 {
            format!("{:.2}", cpu / (bytes as f64 / 1e9))
        } else {
            "-".into()
        };
        let per_op = if ops > 0 {
            format!("{:.1}", cpu / ops as f64 * 1e6)
        } else {
            "-".into()
        };
        println!(
            "{name:<10}{cpu:>10.2}{per_gb:>12}{per_op:>14}{:>10.1}{wait:>12.2}",
            rss_bytes(*pid)? as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}
