//! Loopback goodput: one TCP stream sent directly, through a 1-hop circuit
//! and through a 3-hop circuit of separate release `ferry` processes, in one
//! run; prints goodput and the ratio of each to direct TCP.
//!
//! ```text
//! cargo build --release --bins
//! cargo run --release -p ferry-bench --bin goodput [-- MIB RUNS]
//! ```

use anyhow::{Context, Result, bail};
use ferry_tests::{Mesh, Options, Spec, socks_connect};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A sink that reads each connection to EOF and reports (bytes, seconds
/// from first byte to EOF).
async fn sink() -> Result<(SocketAddr, tokio::sync::mpsc::UnboundedReceiver<(u64, f64)>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                let mut start = None;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            start.get_or_insert_with(Instant::now);
                            total += n as u64;
                        }
                    }
                }
                let secs = start.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0);
                let _ = tx.send((total, secs));
            });
        }
    });
    Ok((a, rx))
}

async fn send(mut s: TcpStream, bytes: u64) -> Result<()> {
    let buf = vec![0xa5u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    Ok(())
}

/// One measured transfer; returns Gbit/s.
async fn measure(socks: Option<SocketAddr>, bytes: u64) -> Result<f64> {
    let (target, mut done) = sink().await?;
    let s = match socks {
        None => TcpStream::connect(target).await?,
        Some(socks) => match socks_connect(socks, "127.0.0.1", target.port()).await? {
            Ok(s) => s,
            Err(code) => bail!("SOCKS reply {code}"),
        },
    };
    s.set_nodelay(true)?;
    tokio::time::timeout(Duration::from_secs(120), send(s, bytes))
        .await
        .context("send timed out")??;
    let (got, secs) = tokio::time::timeout(Duration::from_secs(120), done.recv())
        .await?
        .context("sink")?;
    if got != bytes {
        bail!("sink got {got} of {bytes} bytes");
    }
    Ok(bytes as f64 * 8.0 / secs / 1e9)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let runs: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let bytes = mib * 1024 * 1024;
    let bin = ferry_tests::ferry_bin()?;
    eprintln!(
        "goodput: {mib} MiB per transfer, median of {runs}; ferry = {}",
        bin.display()
    );

    let one = Mesh::start(
        &[Spec {
            jurisdiction: "IS",
            roles: "exit",
        }],
        &Options {
            hops: 1,
            ..Options::default()
        },
    )?;
    let three = Mesh::start(&ferry_tests::THREE, &Options::default())?;
    // Warm up: build the circuits before timing.
    measure(Some(one.socks()), 1 << 20).await?;
    measure(Some(three.socks()), 1 << 20).await?;

    let mut results = Vec::new();
    for (name, socks) in [
        ("direct TCP", None),
        ("1-hop circuit", Some(one.socks())),
        ("3-hop circuit", Some(three.socks())),
    ] {
        let mut v = Vec::new();
        for r in 0..runs {
            let g = measure(socks, bytes).await?;
            eprintln!("  {name}: run {} of {runs}: {g:.2} Gbit/s", r + 1);
            v.push(g);
        }
        results.push((name, median(v)));
    }
    let direct = results[0].1;
    println!("{:<16}{:>14}{:>12}", "path", "Gbit/s", "vs direct");
    for (name, g) in &results {
        println!("{name:<16}{g:>14.2}{:>12.3}", g / direct);
    }
    Ok(())
}
