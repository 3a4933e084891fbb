//! Shared parts of Ferry's benchmark programs (`src/bin`): what a process
//! spends (CPU time and resident memory, read from `/proc`), loopback load
//! sources and sinks, percentiles, and a `perf record` of one process.
//!
//! CPU time is `utime + stime` of `/proc/PID/stat`, which sums every thread
//! of the process, in clock ticks (`getconf CLK_TCK`, 100 here): 10 ms
//! resolution, so a measured transfer should cost seconds of CPU.

#![forbid(unsafe_code)]

use anyhow::{Context, Result, anyhow};
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Clock ticks per second of `/proc/PID/stat` (`getconf CLK_TCK`).
fn ticks_per_sec() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds (user and system, all threads) process `pid` has used.
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // The command name (field 2) may hold spaces: count fields after it.
    let rest = &stat[stat.rfind(')').ok_or_else(|| anyhow!("bad stat"))? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12
    // after the state (field 3).
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(ticks as f64 / ticks_per_sec())
}

pub use ferry_tests::{counting_sink, rss_of as rss_bytes};

/// Nanoseconds each thread of process `pid` has spent runnable but
/// waiting for a CPU (the run-queue delay, the second field of
/// `/proc/PID/task/TID/schedstat`), by thread id.
pub fn run_queue_ns(pid: u32) -> Result<HashMap<String, u64>> {
    let mut by_thread = HashMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("process {pid} is gone"))?
    {
        let t = t?;
        // A thread that ended meanwhile has no file left to read.
        let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) else {
            continue;
        };
        let waited = s
            .split_whitespace()
            .nth(1)
            .ok_or_else(|| anyhow!("bad schedstat"))?;
        by_thread.insert(
            t.file_name().to_string_lossy().into_owned(),
            waited.parse()?,
        );
    }
    anyhow::ensure!(
        !by_thread.is_empty(),
        "no /proc/{pid}/task/*/schedstat to read (a kernel without schedstats?)"
    );
    Ok(by_thread)
}

/// Thread-seconds waited for a CPU between two readings of
/// [`run_queue_ns`]: each thread's growth, a thread that started meanwhile
/// from zero; a thread that ended meanwhile takes its wait with it.
fn run_queue_growth(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> f64 {
    after
        .iter()
        .map(|(t, ns)| ns.saturating_sub(before.get(t).copied().unwrap_or(0)))
        .sum::<u64>() as f64
        / 1e9
}

/// Processes watched over one measured interval: CPU seconds each spent
/// in it, and thread-seconds each waited for a CPU.
pub struct CpuWatch {
    start: Vec<(String, u32, f64, HashMap<String, u64>)>,
}

impl CpuWatch {
    /// Starts watching `procs` (name, pid).
    pub fn start(procs: &[(String, u32)]) -> Result<Self> {
        let start = procs
            .iter()
            .map(|(n, p)| Ok((n.clone(), *p, cpu_secs(*p)?, run_queue_ns(*p)?)))
            .collect::<Result<_>>()?;
        Ok(Self { start })
    }

    /// CPU seconds each process spent since [`CpuWatch::start`].
    pub fn spent(&self) -> Result<Vec<(String, f64)>> {
        self.start
            .iter()
            .map(|(n, p, s, _)| Ok((n.clone(), cpu_secs(*p)? - s)))
            .collect()
    }

    /// Thread-seconds each process's threads waited for a CPU since
    /// [`CpuWatch::start`] ([`run_queue_ns`]).
    pub fn waited(&self) -> Result<Vec<f64>> {
        self.start
            .iter()
            .map(|(_, p, _, w)| Ok(run_queue_growth(w, &run_queue_ns(*p)?)))
            .collect()
    }
}

/// Writes to `s` as fast as it takes bytes until `until`, then closes it.
pub async fn blast(mut s: TcpStream, until: Instant) -> Result<()> {
    let buf = vec![0xa5u8; 256 * 1024];
    while Instant::now() < until {
        match tokio::time::timeout_at(until.into(), s.write_all(&buf)).await {
            Ok(r) => r?,
            Err(_) => break,
        }
    }
    let _ = s.shutdown().await;
    Ok(())
}

/// The send buffer of each of [`blast_all`]'s streams.
pub const MANY_SNDBUF: usize = 256 * 1024;

/// [`blast`] on every stream of `streams` at once until `until`.
///
/// Each stream's send buffer is fixed at [`MANY_SNDBUF`]: the streams
/// stand for as many client machines, each with its own kernel memory, and
/// in one process their send buffers, autotuned up to `tcp_wmem`'s most (4
/// MiB here), held 1.4 GB for 1,000 streams and passed the kernel's TCP
/// memory (`tcp_mem`). Under that pressure the kernel drops segments on
/// every socket, the mesh's links among them, and they wait out
/// retransmission timeouts (`nstat`: `TcpExtTCPMemoryPressures`,
/// `TCPRcvQDrop`, `TCPTimeouts`): 1,000 streams measured the harness's
/// memory, not Ferry (0.36 Gbit/s, against 2.63 with the buffers bounded).
pub async fn blast_all(streams: Vec<TcpStream>, until: Instant) -> Result<()> {
    for s in &streams {
        socket2::SockRef::from(s).set_send_buffer_size(MANY_SNDBUF)?;
    }
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|s| tokio::spawn(blast(s, until)))
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// The value at quantile `q` (0..=1) of `v` (sorted in place).
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Round trips of `size` bytes on `s` (which echoes them), `count` times
/// or until `until`: each round trip's time in microseconds.
pub async fn ping_pong(
    s: &mut TcpStream,
    size: usize,
    count: usize,
    until: Instant,
) -> Result<Vec<f64>> {
    s.set_nodelay(true)?;
    let out = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut rtts = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        if Instant::now() >= until {
            break;
        }
        let t0 = Instant::now();
        s.write_all(&out).await?;
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
            .await
            .context("no echo within 10 s")??;
        rtts.push(t0.elapsed().as_secs_f64() * 1e6);
        anyhow::ensure!(back == out, "the echo came back altered");
    }
    Ok(rtts)
}

/// A `perf record` of one process, with call graphs unwound from DWARF
/// (release builds keep line tables; Rust omits frame pointers), sampling
/// CPU time (this machine's virtual CPUs count no cycles).
pub struct Perf(Child);

impl Perf {
    /// Starts recording process `pid` into `out`.
    pub fn record(pid: u32, out: &std::path::Path) -> Result<Self> {
        let child = Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", "499"])
            .args(["--call-graph", "dwarf,32768", "-p", &pid.to_string(), "-o"])
            .arg(out)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("perf record (Debian: linux-perf)")?;
        // perf attaches to the running process within a few milliseconds;
        // a short wait keeps the measured interval's start in the profile.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self(child))
    }

    /// Stops recording (SIGINT, as at a terminal) and waits for the file.
    pub fn stop(mut self) -> Result<()> {
        Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status()?;
        let st = self.0.wait()?;
        anyhow::ensure!(
            st.success() || st.code().is_none(),
            "perf record failed: {st}"
        );
        Ok(())
    }
}

/// Gbit/s of `bytes` in `secs`.
pub fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 * 8.0 / secs / 1e9
}

/// Replacements in every node's config from the environment variable
/// `var`, for experiments: `FROM=>TO;FROM=>TO` (for example
/// `stream_window_bytes = 2097152=>stream_window_bytes = 262144`).
pub fn config_from_env(var: &str) -> Result<Vec<(String, String)>> {
    std::env::var(var)
        .unwrap_or_default()
        .split(';')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once("=>") {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => anyhow::bail!("{var}: {p:?} is not FROM=>TO"),
        })
        .collect()
}

/// Replacements for an entry's config (`Options::entry_replace`) that
/// raise its per-client and per-tenant limits far above any load here, so
/// that loads measure forwarding, not the fair-share limits (which refuse
/// one client's thousandth stream, as they should); with `per_circuit`,
/// also the streams the entry puts on one circuit.
pub fn unlimited_entry(per_circuit: Option<usize>) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = [
        ("connections = 4096", "connections = 16384"),
        ("client_streams = 512", "client_streams = 100000"),
        (
            "client_streams_per_sec = 100",
            "client_streams_per_sec = 100000",
        ),
        ("client_burst = 300", "client_burst = 100000"),
        ("tenant_streams = 2048", "tenant_streams = 100000"),
        (
            "tenant_streams_per_sec = 1000",
            "tenant_streams_per_sec = 100000",
        ),
        ("tenant_burst = 2000", "tenant_burst = 100000"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    if let Some(n) = per_circuit {
        v.push((
            "max_streams_per_circuit = 64".into(),
            format!("max_streams_per_circuit = {n}"),
        ));
    }
    v
}

/// Builds circuits along `path` on `link` as a test origin, 64 builds in
/// flight, with ids from `first` up: `count` of them, or as many as fit
/// before `until`. With `destroy`, each is destroyed once built (else
/// they stay open, idle). Returns the circuits built.
pub async fn build_circuits(
    link: &mut ferry_tests::raw::RawLink,
    path: &[ferry_circuit::Hop],
    first: u32,
    count: usize,
    until: Instant,
    destroy: bool,
) -> Result<usize> {
    use ferry_circuit::{Build, Step};
    use ferry_proto::{Cell, CellCmd};
    let mut building = std::collections::HashMap::new();
    let (mut next, mut started, mut built) = (first, 0usize, 0usize);
    loop {
        while building.len() < 64 && started < count && Instant::now() < until {
            let (b, create) = Build::start(next, path.to_vec(), u64::MAX)?;
            building.insert(next, b);
            link.send(&create).await;
            next += 1;
            started += 1;
        }
        if building.is_empty() {
            return Ok(built);
        }
        let cell = link.next().await;
        let c = Cell::parse(&cell)?;
        let circ = c.circ_id;
        let Some(b) = building.get_mut(&circ) else {
            continue;
        };
        let step = match c.cmd {
            CellCmd::Created => b.handle_created(&cell),
            CellCmd::Control => b.handle_control(cell),
            other => anyhow::bail!("circuit {circ}: {other:?} while building"),
        };
        match step.with_context(|| format!("circuit {circ}"))? {
            Step::Send(next) => link.send(&next).await,
            Step::Done(_) => {
                building.remove(&circ);
                built += 1;
                if destroy {
                    link.send(&ferry_node::switch::destroy_cell(
                        circ,
                        ferry_proto::pb::DestroyReason::Finished,
                    ))
                    .await;
                }
            }
        }
    }
}

/// Prints the last lines of every process's log of `mesh` (after a load
/// failed).
pub fn dump_logs(mesh: &ferry_tests::Mesh) {
    for p in std::iter::once(&mesh.entry).chain(&mesh.nodes) {
        let log = p.log();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        eprintln!("--- {} (last lines)", p.jurisdiction);
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
    }
}
