//! One `ferry` process: the binary, free ports, `ferry init` and
//! `ferry peer-info` as an operator runs them, and the running [`Proc`].

use anyhow::{Context, Result, anyhow, bail};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The `ferry` binary of the current build profile.
pub fn ferry_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("FERRY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join("ferry");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "no `ferry` binary next to {}; run the tests with `cargo test --workspace` (make test), or `cargo build --bins` first",
        exe.display()
    )
}

/// A free loopback port for a node to bind later. Ports come from below the
/// kernel's ephemeral range (32768 and up on Linux), so an outgoing
/// connection can never take one between now and the node's bind, and a
/// process-wide counter keeps concurrent tests from sharing one.
pub fn free_port() -> Result<SocketAddr> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(997);
    for _ in 0..12_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (start.wrapping_add(n) % 12_000) as u16;
        if let Ok(l) = StdListener::bind(("127.0.0.1", port)) {
            return Ok(l.local_addr()?);
        }
    }
    bail!("no free loopback port in 20000..32000")
}

/// Runs `ferry` with `args` to completion; its standard output.
pub fn run_ferry(args: &[&str]) -> Result<String> {
    let out = Command::new(ferry_bin()?)
        .args(args)
        .output()
        .context("running ferry")?;
    if !out.status.success() {
        bail!(
            "ferry {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Resident memory of process `pid`, in bytes (`VmRSS` of /proc).
pub fn rss_of(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .ok_or_else(|| anyhow!("no VmRSS"))?
        .parse()?;
    Ok(kb * 1024)
}

/// One node to start.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Jurisdiction code.
    pub jurisdiction: &'static str,
    /// Roles, comma-separated.
    pub roles: &'static str,
}

impl Spec {
    /// A node in `jurisdiction` with `roles` (comma-separated).
    pub const fn new(jurisdiction: &'static str, roles: &'static str) -> Self {
        Self {
            jurisdiction,
            roles,
        }
    }
}

/// A running `ferry` process.
pub struct Proc {
    /// Its node id (hex).
    pub id: String,
    /// Its Noise static public key.
    pub noise_key: [u8; 32],
    /// Its jurisdiction.
    pub jurisdiction: String,
    /// Its link listener (nodes), if any.
    pub link: Option<SocketAddr>,
    /// Its SOCKS5 listener (the entry), if any.
    pub socks: Option<SocketAddr>,
    /// Its admin API.
    pub admin: SocketAddr,
    /// Its control-plane listener.
    pub mesh: SocketAddr,
    /// Its Prometheus metrics listener.
    pub metrics: SocketAddr,
    /// Its folder (keys, config, logs).
    pub dir: PathBuf,
    args: Vec<String>,
    child: Child,
}

impl Proc {
    /// Its standard error so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// The lines of its log at WARN or above (text format: the level
    /// follows the timestamp).
    pub fn warnings(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| {
                let mut words = l.split_whitespace();
                words.next();
                matches!(words.next(), Some("WARN" | "ERROR"))
            })
            .map(String::from)
            .collect()
    }

    /// Resident memory of the process, in bytes (from /proc).
    pub fn rss_bytes(&self) -> Result<u64> {
        rss_of(self.child.id())
    }

    /// Its process id (for profilers and /proc readers).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open file descriptors of the process (sockets, files, pipes).
    pub fn open_fds(&self) -> Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))?.count())
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `kill -9`, then start it again with the same config; waits until ready.
    /// (If it is already dead, it is just restarted.)
    pub fn kill9_and_restart(&mut self) -> Result<()> {
        let _ = self.child.kill();
        self.child.wait()?;
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let log = self.dir.join("stderr.log");
        let old = std::fs::read_to_string(&log).unwrap_or_default();
        std::fs::write(self.dir.join("stderr.before-restart.log"), old)?;
        self.child = spawn(&self.dir, &args)?;
        wait_ready(&mut self.child)
    }

    /// `kill -9`, and leave it dead.
    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Sends a signal.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args(["-s", sig, &self.child.id().to_string()])
            .status();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a node listens.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ports {
    /// Link listener (nodes), if any.
    pub(crate) link: Option<SocketAddr>,
    /// SOCKS5 listener, if any: a node with one runs as `ferry connect`.
    pub(crate) socks: Option<SocketAddr>,
    /// Admin API.
    pub(crate) admin: SocketAddr,
    /// Control-plane listener.
    pub(crate) mesh: SocketAddr,
    /// Prometheus metrics listener.
    pub(crate) metrics: SocketAddr,
}

/// A node configured but not started.
pub(crate) struct Prepared {
    /// Its folder (keys, config, logs).
    pub(crate) dir: PathBuf,
    /// Its `[[peers]]` block, from `ferry peer-info`.
    pub(crate) block: String,
    /// Where it listens.
    pub(crate) ports: Ports,
    /// Its jurisdiction.
    pub(crate) jurisdiction: String,
}

/// `ferry init` of a node in `dir`, as an operator would: its
/// jurisdiction and roles, the listeners `ports` names, the address it
/// bootstraps from (gossip meshes), and the authority keys it trusts.
pub(crate) fn init(
    dir: &Path,
    jurisdiction: &str,
    roles: &str,
    ports: &Ports,
    bootstrap: Option<SocketAddr>,
    authority_keys: &[String],
) -> Result<()> {
    let dir = dir.to_str().context("the node's folder is not UTF-8")?;
    let mut args: Vec<String> = vec![
        "init".into(),
        "--dir".into(),
        dir.into(),
        "--jurisdiction".into(),
        jurisdiction.into(),
        "--roles".into(),
        roles.into(),
    ];
    let listeners = [
        ("--listen", ports.link),
        ("--socks", ports.socks),
        ("--admin", Some(ports.admin)),
        ("--mesh", Some(ports.mesh)),
        ("--metrics", Some(ports.metrics)),
        ("--bootstrap", bootstrap),
    ];
    for (flag, addr) in listeners {
        if let Some(addr) = addr {
            args.extend([flag.to_string(), addr.to_string()]);
        }
    }
    for k in authority_keys {
        args.extend(["--authority-key".to_string(), k.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ferry(&args).map(|_| ())
}

/// Starts a prepared node (`ferry connect` if it has a SOCKS5 listener,
/// else `ferry node`), logging JSON if `json`; waits until it is ready.
pub(crate) fn launch(node: Prepared, json: bool) -> Result<Proc> {
    let Prepared {
        dir,
        block,
        ports,
        jurisdiction,
    } = node;
    let cfg = dir.join("ferry.toml");
    let cfg = cfg.to_str().unwrap();
    let mut args: Vec<&str> = if ports.socks.is_some() {
        vec!["connect", "--config", cfg]
    } else {
        vec!["node", "--config", cfg]
    };
    if json {
        args.extend(["--log-format", "json"]);
    }
    let mut child = spawn(&dir, &args)?;
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    wait_ready(&mut child).with_context(|| {
        format!(
            "starting {}: {}",
            jurisdiction,
            std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
        )
    })?;
    let id = field(&block, "id")?;
    let mut noise_key = [0u8; 32];
    hex::decode_to_slice(field(&block, "noise_key")?, &mut noise_key)?;
    Ok(Proc {
        id,
        noise_key,
        jurisdiction,
        link: ports.link,
        socks: ports.socks,
        admin: ports.admin,
        mesh: ports.mesh,
        metrics: ports.metrics,
        dir,
        args,
        child,
    })
}

/// Parses `key = "value"` out of a peer block.
fn field(block: &str, key: &str) -> Result<String> {
    block
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key} = \""))
                .map(|v| v.trim_end_matches('"').to_string())
        })
        .ok_or_else(|| anyhow!("no {key} in peer block:\n{block}"))
}

/// Starts `ferry args` in the node's folder `dir`, logging to
/// `stderr.log` there. If the folder holds a `wrap` file (written from
/// [`crate::Options::wrap`]), its lines are a command the node is started
/// under, one argument a line (for example `unshare --mount …`). A
/// `log-filter` file there ([`crate::Options::log_filter`]) is its
/// `RUST_LOG`.
fn spawn(dir: &Path, args: &[&str]) -> Result<Child> {
    let err = std::fs::File::create(dir.join("stderr.log"))?;
    let mut cmd = match std::fs::read_to_string(dir.join("wrap")) {
        Ok(wrap) => {
            let mut words = wrap.lines();
            let mut cmd = Command::new(words.next().context("an empty wrap file")?);
            cmd.args(words).arg(ferry_bin()?);
            cmd
        }
        Err(_) => Command::new(ferry_bin()?),
    };
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(err)
        // FERRY_TEST_LOG: another filter for the nodes of a test run (for
        // example `info,ferry_node=debug` to see why a test failed).
        .env(
            "RUST_LOG",
            std::fs::read_to_string(dir.join("log-filter"))
                .or_else(|_| std::env::var("FERRY_TEST_LOG"))
                .unwrap_or_else(|_| "info".into()),
        )
        .spawn()
        .context("spawning ferry")
}

/// Waits for the `ready:` line a node prints once it listens.
fn wait_ready(child: &mut Child) -> Result<()> {
    let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        // Keep draining so the child never blocks on a full pipe.
        for _ in lines {}
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(l) if l.starts_with("ready:") => Ok(()),
        Ok(l) => bail!("unexpected first line: {l}"),
        Err(_) => bail!("node did not become ready within 20 s"),
    }
}
