//! CPU seconds per GB forwarded, per process, for Ferry's entry, relays and
//! exit and, in the same run, for an haproxy relay and a stunnel relay that
//! decrypts and re-encrypts (TLS 1.3, AES-256-GCM), with the AEAD floor of
//! this machine from `openssl speed`.
//!
//! ```text
//! apt-get install haproxy stunnel4 openssl     # Debian
//! cargo build --release --workspace --bins
//! cargo run --release -p ferry-bench --bin cpu [-- SECS RUNS]
//! ```
//!
//! Each chain carries one TCP stream, sent as fast as it goes for SECS
//! (10) seconds, RUNS (3) times; each process's CPU time over a run
//! (`/proc/PID/stat`) over the bytes the sink got is its CPU per GB, and
//! the median of the runs is printed. The chains:
//!
//! - haproxy, one relay (`mode tcp`, one thread): what moving bytes
//!   between two sockets costs.
//! - stunnel, three processes: an entry (plain in, TLS out), a relay (TLS
//!   in, decrypted, re-encrypted, TLS out; stunnel does this as two
//!   services joined by a loopback connection, as `../shared/peers` runs
//!   it) and an exit (TLS in, plain out).
//! - Ferry, 3 hops: the entry, relays DE and CH, and exit IS.
//!
//! The floor for a relay that opens one AEAD record stream and seals
//! another is haproxy's relay plus two AEAD passes over each byte.

use anyhow::{Context, Result, bail};
use ferry_bench::{CpuWatch, blast, counting_sink, gbps};
use ferry_tests::{Mesh, Options, THREE};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// A child process killed when dropped.
struct Bg(Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &str, args: &[&str]) -> Result<Bg> {
    Ok(Bg(Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| {
            format!("{cmd} (Debian: apt-get install haproxy stunnel4 openssl)")
        })?))
}

fn free_port() -> Result<u16> {
    Ok(ferry_tests::free_port()?.port())
}

/// Waits until `addr` accepts connections (at most 10 s).
async fn wait_listening(addr: SocketAddr) -> Result<()> {
    let t0 = Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("nothing listens on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// One core's AES-256-GCM speed on 16 KiB records, bytes per second.
fn openssl_aead_rate() -> Result<f64> {
    let out = Command::new("openssl")
        .args([
            "speed",
            "-evp",
            "aes-256-gcm",
            "-bytes",
            "16384",
            "-seconds",
            "3",
        ])
        .output()
        .context("openssl speed")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.to_ascii_lowercase().starts_with("aes-256-gcm"))
        .context("no aes-256-gcm line from openssl speed")?;
    let kb: f64 = line
        .split_whitespace()
        .last()
        .and_then(|v| v.strip_suffix('k'))
        .context("no rate")?
        .parse()?;
    Ok(kb * 1000.0)
}

/// One timed stream into `into` (which leads to the sink counting into
/// `count`): bytes delivered, seconds, and each watched process's CPU
/// seconds.
async fn run(
    into: impl std::future::Future<Output = Result<TcpStream>>,
    count: &std::sync::atomic::AtomicU64,
    procs: &[(String, u32)],
    secs: f64,
) -> Result<(u64, f64, Vec<f64>)> {
    let s = into.await?;
    s.set_nodelay(true)?;
    let before = count.load(Ordering::Relaxed);
    let watch = CpuWatch::start(procs)?;
    let t0 = Instant::now();
    blast(s, t0 + Duration::from_secs_f64(secs)).await?;
    // The chain drains what it holds into the sink.
    let mut last = u64::MAX;
    while count.load(Ordering::Relaxed) != last {
        last = count.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = t0.elapsed().as_secs_f64() - 0.2;
    let spent = watch.spent()?.into_iter().map(|(_, c)| c).collect();
    Ok((last - before, took, spent))
}

fn median(mut v: Vec<f64>) -> f64 {
    ferry_bench::quantile(&mut v, 0.5)
}

/// The chain's rows: (process, CPU s/GB median), and its goodput median.
struct Chain {
    name: &'static str,
    gbps: f64,
    rows: Vec<(String, f64)>,
}

async fn measure<F, Fut>(
    name: &'static str,
    procs: &[(String, u32)],
    runs: usize,
    secs: f64,
    count: &std::sync::atomic::AtomicU64,
    connect: F,
) -> Result<Chain>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<TcpStream>>,
{
    let mut per = vec![Vec::new(); procs.len()];
    let mut rates = Vec::new();
    for r in 0..runs {
        let (bytes, took, cpu) = run(connect(), count, procs, secs).await?;
        let gb = bytes as f64 / 1e9;
        eprintln!(
            "  {name}, run {} of {runs}: {:.2} Gbit/s; CPU s/GB: {}",
            r + 1,
            gbps(bytes, took),
            cpu.iter()
                .zip(procs)
                .map(|(c, (n, _))| format!("{n} {:.2}", c / gb))
                .collect::<Vec<_>>()
                .join(", ")
        );
        rates.push(gbps(bytes, took));
        for (i, c) in cpu.iter().enumerate() {
            per[i].push(c / gb);
        }
    }
    Ok(Chain {
        name,
        gbps: median(rates),
        rows: procs
            .iter()
            .zip(per)
            .map(|((n, _), v)| (n.clone(), median(v)))
            .collect(),
    })
}

fn haproxy_config(dir: &Path, listen: u16, to: SocketAddr) -> Result<std::path::PathBuf> {
    let p = dir.join("haproxy.cfg");
    std::fs::write(
        &p,
        format!(
            "global\n  nbthread 1\n  maxconn 64\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 60s\n  timeout server 60s\nlisten relay\n  bind 127.0.0.1:{listen}\n  \
             server s {to}\n"
        ),
    )?;
    Ok(p)
}

/// The stunnel chain's three configs (entry, relay, exit); the entry
/// listens on `entry`, the exit connects to `to`.
fn stunnel_configs(dir: &Path, entry: u16, to: SocketAddr) -> Result<[std::path::PathBuf; 3]> {
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=ferry-bench"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stderr(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "openssl req failed");
    let (relay_in, relay_mid, exit_in) = (free_port()?, free_port()?, free_port()?);
    let head = "foreground = yes\npid =\ndebug = 3\nsslVersionMin = TLSv1.3\n\
                ciphersuites = TLS_AES_256_GCM_SHA384\n";
    let cert = format!(
        "cert = {}\nkey = {}\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    );
    let files = [
        (
            "entry.conf",
            format!(
                "{head}[e]\nclient = yes\naccept = 127.0.0.1:{entry}\nconnect = 127.0.0.1:{relay_in}\n"
            ),
        ),
        (
            "relay.conf",
            format!(
                "{head}[in]\naccept = 127.0.0.1:{relay_in}\nconnect = 127.0.0.1:{relay_mid}\n{cert}\
                 [out]\nclient = yes\naccept = 127.0.0.1:{relay_mid}\nconnect = 127.0.0.1:{exit_in}\n"
            ),
        ),
        (
            "exit.conf",
            format!("{head}[x]\naccept = 127.0.0.1:{exit_in}\nconnect = {to}\n{cert}"),
        ),
    ];
    let mut out = Vec::new();
    for (name, text) in files {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        out.push(p);
    }
    Ok(out.try_into().expect("three"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let secs: f64 = args.first().map(|s| s.parse()).transpose()?.unwrap_or(10.0);
    let runs: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let dir = tempfile::Builder::new().prefix("ferry-cpu-").tempdir()?;
    let (sink, count) = counting_sink().await?;

    eprintln!("cpu: openssl speed (AES-256-GCM, 16 KiB records, one core)");
    let aead = openssl_aead_rate()?;
    let aead_s_per_gb = 1e9 / aead;

    let mut chains = Vec::new();

    // haproxy, one relay.
    let hp = free_port()?;
    let cfg = haproxy_config(dir.path(), hp, sink)?;
    let haproxy = spawn("haproxy", &["-db", "-f", cfg.to_str().context("path")?])?;
    let hp_addr: SocketAddr = ([127, 0, 0, 1], hp).into();
    wait_listening(hp_addr).await?;
    chains.push(
        measure(
            "haproxy",
            &[("haproxy relay".into(), haproxy.0.id())],
            runs,
            secs,
            &count,
            || async move { Ok(TcpStream::connect(hp_addr).await?) },
        )
        .await?,
    );
    drop(haproxy);

    // stunnel, entry + re-encrypting relay + exit.
    let st = free_port()?;
    let [e, r, x] = stunnel_configs(dir.path(), st, sink)?;
    let mut stunnels = Vec::new();
    for c in [&x, &r, &e] {
        stunnels.push(spawn("stunnel4", &[c.to_str().context("path")?])?);
    }
    let st_addr: SocketAddr = ([127, 0, 0, 1], st).into();
    wait_listening(st_addr).await?;
    chains.push(
        measure(
            "stunnel",
            &[
                ("stunnel entry".into(), stunnels[2].0.id()),
                ("stunnel relay".into(), stunnels[1].0.id()),
                ("stunnel exit".into(), stunnels[0].0.id()),
            ],
            runs,
            secs,
            &count,
            || async move { Ok(TcpStream::connect(st_addr).await?) },
        )
        .await?,
    );
    drop(stunnels);

    // Ferry, 3 hops.
    let mesh = Mesh::start(&THREE, &Options::default())?;
    mesh.echo_ping().await?;
    let socks = mesh.socks();
    chains.push(
        measure(
            "ferry",
            &[
                ("ferry entry".into(), mesh.entry.pid()),
                ("ferry relay DE".into(), mesh.node("DE").pid()),
                ("ferry relay CH".into(), mesh.node("CH").pid()),
                ("ferry exit IS".into(), mesh.node("IS").pid()),
            ],
            runs,
            secs,
            &count,
            || async move {
                ferry_tests::socks_connect(socks, "127.0.0.1", sink.port())
                    .await?
                    .map_err(|c| anyhow::anyhow!("SOCKS reply {c}"))
            },
        )
        .await?,
    );

    let haproxy_relay = chains[0].rows[0].1;
    let stunnel_relay = chains[1].rows[1].1;
    let floor = haproxy_relay + 2.0 * aead_s_per_gb;
    println!(
        "AES-256-GCM, one core (openssl speed, 16 KiB): {:.2} GB/s = {aead_s_per_gb:.3} CPU s/GB per pass",
        aead / 1e9
    );
    println!(
        "relay floor (haproxy relay + two AEAD passes): {floor:.3} CPU s/GB\n\n\
         {:<18}{:>12}{:>14}{:>14}{:>12}",
        "process", "CPU s/GB", "vs haproxy", "vs stunnel", "vs floor"
    );
    for c in &chains {
        println!("{} chain: {:.2} Gbit/s (median of {runs})", c.name, c.gbps);
        for (n, v) in &c.rows {
            println!(
                "  {n:<16}{v:>12.3}{:>14.2}{:>14.2}{:>12.2}",
                v / haproxy_relay,
                v / stunnel_relay,
                v / floor
            );
        }
    }
    Ok(())
}
