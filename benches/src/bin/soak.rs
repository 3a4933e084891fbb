//! Soak: a mesh of `ferry` processes under churn for a long while, its
//! resident memory and open file descriptors sampled every minute. What it
//! looks for is growth that does not stop after warm-up: a leak of memory,
//! sockets, tasks' buffers or circuits.
//!
//! ```text
//! cargo build --workspace --bins          # or --release, with --release below
//! cargo run -p ferry-bench --bin soak [-- MINUTES WORKERS]   # 30 and 16
//! ```
//!
//! The mesh is [`ferry_tests::THREE`] (two relays and an exit) and an
//! entry, with `idle_circuit_secs = 10` everywhere. `WORKERS` clients each
//! open streams one after another through the entry's SOCKS5 port, send
//! 1 KiB to 256 KiB of pseudo-random bytes to an echo server and check
//! every byte that comes back; together they open at most 80 streams a
//! second (the entry allows a client 100). Each stream asks for 1, 2 or 3 hops and
//! excludes a country with no node; the excluded countries change every
//! minute, so every minute a dozen new circuits are built and the last
//! minute's close once idle. A line per minute gives each process's RSS
//! and descriptors and the streams that finished and failed; at the end,
//! each process's growth from the end of warm-up (the first 5 minutes, or
//! a sixth of a shorter run) to the end, in all and per minute.

use anyhow::{Context, Result, bail};
use ferry_tests::{Mesh, Options, Proc, socks_connect_as};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Countries with no node in the mesh: excluding one changes a stream's
/// circuit (a pool key of its own) but not where it can go.
const ABSENT: [&str; 16] = [
    "FR", "IT", "ES", "PT", "BE", "AT", "SE", "NO", "FI", "DK", "PL", "CZ", "IE", "GR", "HU", "RO",
];

/// One stream: `len` pseudo-random bytes from `seed` through the entry to
/// the echo server and back, every byte compared.
async fn stream(
    socks: std::net::SocketAddr,
    echo: std::net::SocketAddr,
    options: &str,
    seed: u64,
    len: usize,
) -> Result<()> {
    let s = socks_connect_as(socks, "127.0.0.1", echo.port(), Some(("-", options)))
        .await?
        .map_err(|code| anyhow::anyhow!("SOCKS reply {code}"))?;
    let (mut r, mut w) = s.into_split();
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut data[..]);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await?;
        w.shutdown().await
    });
    let mut back = Vec::with_capacity(len);
    r.read_to_end(&mut back).await?;
    writer.await??;
    if back != data {
        bail!("{} of {len} bytes came back, not all as sent", back.len());
    }
    Ok(())
}

/// A process's resident MiB and open descriptors.
fn sample(p: &Proc) -> (f64, usize) {
    let rss = p
        .rss_bytes()
        .map_or(f64::NAN, |b| b as f64 / (1 << 20) as f64);
    (rss, p.open_fds().unwrap_or(0))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let minutes: u64 = args
        .next()
        .map_or(Ok(30), |a| a.parse())
        .context("MINUTES")?;
    let workers: u64 = args
        .next()
        .map_or(Ok(16), |a| a.parse())
        .context("WORKERS")?;
    if minutes == 0 || workers == 0 {
        bail!("usage: soak [MINUTES WORKERS], both at least 1");
    }
    let mesh = Mesh::start(
        &ferry_tests::THREE,
        &Options {
            hops: 1,
            node_replace: vec![(
                "idle_circuit_secs = 600".into(),
                "idle_circuit_secs = 10".into(),
            )],
            ..Options::default()
        },
    )?;
    let echo = ferry_tests::echo_server().await?;
    let socks = mesh.socks();
    let start = Instant::now();
    let end = start + Duration::from_secs(minutes * 60);
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let bytes = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (ok, failed, bytes) = (ok.clone(), failed.clone(), bytes.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(w);
            let mut n = 0u64;
            // Together the workers open at most 80 streams a second, under
            // the entry's limit per client (100).
            let mut pace = tokio::time::interval(Duration::from_micros(12_500 * workers));
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while Instant::now() < end {
                pace.tick().await;
                let minute = start.elapsed().as_secs() / 60;
                let hops = 1 + w % 3;
                let absent = ABSENT[((minute * 4 + w % 4) % ABSENT.len() as u64) as usize];
                let options = format!("hops={hops};exclude={absent}");
                let len = rng.gen_range(1024..=256 * 1024);
                let seed = (w << 32) | n;
                n += 1;
                let done = tokio::time::timeout(
                    Duration::from_secs(60),
                    stream(socks, echo, &options, seed, len),
                )
                .await;
                match done {
                    Ok(Ok(())) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        bytes.fetch_add(2 * len as u64, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("worker {w}, stream {n}: {e:#}");
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("worker {w}, stream {n}: no end within 60 s");
                    }
                }
            }
        }));
    }
    let procs: Vec<(&str, &Proc)> = [("entry", &mesh.entry)]
        .into_iter()
        .chain(
            ["relay DE", "relay CH", "exit IS"]
                .into_iter()
                .zip(&mesh.nodes),
        )
        .collect();
    let names: Vec<String> = procs
        .iter()
        .map(|(n, _)| format!("{n} MiB / fds"))
        .collect();
    println!(
        "soak: {minutes} min, {workers} workers, idle_circuit_secs = 10, binary {}",
        ferry_tests::ferry_bin()?.display()
    );
    let exit = &mesh.nodes[2];
    println!(
        "| min | streams ok | failed | MB moved | circuits opened / open at the exit | {} |",
        names.join(" | ")
    );
    println!(
        "| ---: | ---: | ---: | ---: | ---: |{}",
        " ---: |".repeat(names.len())
    );
    let mut history: Vec<Vec<(f64, usize)>> = Vec::new();
    let mut line = |minute: u64| {
        let row: Vec<(f64, usize)> = procs.iter().map(|(_, p)| sample(p)).collect();
        let cells: Vec<String> = row.iter().map(|(m, f)| format!("{m:.1} / {f}")).collect();
        let circuits = |m: &str| exit.metric(m).map_or("?".into(), |v| v.to_string());
        println!(
            "| {minute} | {} | {} | {:.0} | {} / {} | {} |",
            ok.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
            bytes.load(Ordering::Relaxed) as f64 / 1e6,
            circuits("ferry_circuits_opened_total"),
            circuits("ferry_circuits_active"),
            cells.join(" | ")
        );
        history.push(row);
    };
    line(0);
    for minute in 1..=minutes {
        tokio::time::sleep_until((start + Duration::from_secs(minute * 60)).into()).await;
        line(minute);
    }
    for t in tasks {
        t.await?;
    }
    let warm = (minutes / 6).clamp(1, 5) as usize;
    let span = (history.len() - 1 - warm).max(1) as f64;
    println!("after warm-up (minute {warm} to {minutes}):");
    for (i, (name, _)) in procs.iter().enumerate() {
        let (m0, f0) = history[warm][i];
        let (m1, f1) = history[history.len() - 1][i];
        let peak = history[warm..].iter().map(|r| r[i].0).fold(0.0, f64::max);
        println!(
            "  {name}: RSS {m0:.1} -> {m1:.1} MiB ({:+.2} MiB/min, peak {peak:.1}), fds {f0} -> {f1}",
            (m1 - m0) / span
        );
    }
    let failed = failed.load(Ordering::Relaxed);
    println!(
        "{} streams intact, {failed} failed, {:.0} MB moved",
        ok.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed) as f64 / 1e6
    );
    if failed > 0 {
        bail!("{failed} streams failed");
    }
    Ok(())
}
