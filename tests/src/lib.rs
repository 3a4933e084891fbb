//! The multi-node harness: real `ferry` processes on loopback, configured
//! with `ferry init` and `ferry peer-info` exactly as an operator would, plus
//! a SOCKS5 client, a traffic generator, and recording TCP taps.
//!
//! The `ferry` binary is found next to the test executable's folder
//! (`target/<profile>/ferry`). `cargo test --workspace` builds it (for
//! `node/tests`); `FERRY_BIN` points elsewhere.

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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

/// Two relays and an exit, each in its own jurisdiction: with 3 hops and
/// diversity, every circuit crosses all three.
pub const THREE: [Spec; 3] = [
    Spec {
        jurisdiction: "DE",
        roles: "relay",
    },
    Spec {
        jurisdiction: "CH",
        roles: "relay",
    },
    Spec {
        jurisdiction: "IS",
        roles: "exit",
    },
];

/// A TCP echo server on loopback: every connection gets back what it sends.
pub async fn echo_server() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(a)
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

    /// Waits until its log contains `needle`, up to `within`.
    pub fn wait_log(&self, needle: &str, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return Ok(log);
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} never logged {needle:?}; log:\n{log}",
                    self.jurisdiction
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of the process, in bytes (from /proc).
    pub fn rss_bytes(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .ok_or_else(|| anyhow!("no VmRSS"))?
            .parse()?;
        Ok(kb * 1024)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `GET /v1/status` from its admin API.
    pub fn status(&self) -> Result<serde_json::Value> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        let mut r = agent
            .get(&format!("http://{}/v1/status", self.admin))
            .call()?;
        Ok(r.body_mut().read_json()?)
    }

    /// Polls its status until `pred` holds, up to `within`; returns the
    /// status that satisfied it.
    pub fn wait_status(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + within;
        loop {
            let last = self.status();
            if let Ok(v) = &last
                && pred(v)
            {
                return Ok(v.clone());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} never reached: {what}; last status: {last:?}",
                    self.jurisdiction
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
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

/// Options for a mesh.
#[derive(Clone, Debug)]
pub struct Options {
    /// Hops per circuit.
    pub hops: usize,
    /// Exits may reach loopback targets.
    pub allow_private: bool,
    /// Put a recording tap in front of every node's link listener.
    pub tap: bool,
    /// Extra keys to list as entry-only peers on every node (test clients).
    pub extra_peers: Vec<String>,
    /// Discover the mesh by gossip from the first node instead of static
    /// `[[peers]]` blocks.
    pub gossip: bool,
    /// Trusted authority public keys (hex).
    pub authority_keys: Vec<String>,
    /// Advert lifetime.
    pub advert_ttl_secs: u64,
    /// Advertised capacity of every node, Mbit/s.
    pub capacity_mbps: u32,
    /// `[drain]` settings: grace, margin, migration (seconds).
    pub drain_secs: (u64, u64, u64),
    /// Specs (by index) prepared but not started: [`Mesh::start_held`]
    /// starts them later (late joiners in gossip mode).
    pub hold: Vec<usize>,
    /// Nodes log JSON (`--log-format json`) instead of text.
    pub log_json: bool,
    /// The authority key folder (from [`rulings::authority`]) that admits
    /// the nodes of a gossip mesh with `ferry authority admit`. Without
    /// one, a gossip mesh makes its own admitting authority and adds its
    /// public key to `authority_keys`.
    pub admit_with: Option<PathBuf>,
    /// Extra `ferry authority admit` arguments for some nodes, by spec
    /// index (for example `--capacity-max 100`, `--valid-for 20s`).
    pub admit_args: Vec<(usize, Vec<String>)>,
    /// Nodes (by spec index) left without a certificate.
    pub unadmitted: Vec<usize>,
    /// Advertised capacity of some nodes (by spec index), Mbit/s.
    pub capacity_of: Vec<(usize, u32)>,
}

impl Options {
    /// A gossip mesh trusting the authority key `public`: two hops (relay
    /// and exit), adverts renewed every second (ttl 3 s).
    pub fn gossip(public: String) -> Self {
        Self {
            hops: 2,
            gossip: true,
            authority_keys: vec![public],
            advert_ttl_secs: 3,
            ..Self::default()
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            hops: 3,
            allow_private: true,
            tap: false,
            extra_peers: Vec::new(),
            gossip: false,
            authority_keys: Vec::new(),
            advert_ttl_secs: 30,
            capacity_mbps: 1000,
            drain_secs: (30, 10, 5),
            hold: Vec::new(),
            log_json: false,
            admit_with: None,
            admit_args: Vec::new(),
            unadmitted: Vec::new(),
            capacity_of: Vec::new(),
        }
    }
}

/// A mesh of `ferry node` processes and one `ferry connect` entry.
pub struct Mesh {
    /// The nodes, in spec order.
    pub nodes: Vec<Proc>,
    /// The `ferry connect` entry.
    pub entry: Proc,
    /// Everything the taps saw, if tapped.
    pub tapped: Arc<Mutex<Vec<u8>>>,
    held: Vec<Held>,
    /// The first node's mesh address (everyone bootstraps from it).
    boot: SocketAddr,
    /// The options the mesh was started with (with the admitting
    /// authority's key added, in gossip mode).
    opts: Options,
    /// The key folder of the authority that admitted the nodes.
    admit_with: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

/// A node prepared but not started.
struct Held {
    dir: PathBuf,
    block: String,
    link: Option<SocketAddr>,
    admin: SocketAddr,
    mesh: SocketAddr,
    metrics: SocketAddr,
    jurisdiction: String,
}

/// Where a node listens, besides its SOCKS5 entry.
struct Ports {
    link: Option<SocketAddr>,
    admin: SocketAddr,
    mesh: SocketAddr,
    metrics: SocketAddr,
}

fn launch(
    dir: PathBuf,
    block: &str,
    ports: Ports,
    socks: Option<SocketAddr>,
    jurisdiction: String,
    json: bool,
) -> Result<Proc> {
    let Ports {
        link,
        admin,
        mesh,
        metrics,
    } = ports;
    let cfg = dir.join("ferry.toml");
    let cfg = cfg.to_str().unwrap();
    let mut args: Vec<&str> = if socks.is_some() {
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
    let id = field(block, "id")?;
    let mut noise_key = [0u8; 32];
    hex::decode_to_slice(field(block, "noise_key")?, &mut noise_key)?;
    Ok(Proc {
        id,
        noise_key,
        jurisdiction,
        link,
        socks,
        admin,
        mesh,
        metrics,
        dir,
        args,
        child,
    })
}

/// Admits the node in `dir` (its `node.request`, from `ferry init`) with
/// the authority key in `kd`, as an operator would: `ferry authority admit`
/// (ceiling 1000 Mbit/s, then `extra` arguments, which override).
fn admit(kd: &Path, dir: &Path, jurisdiction: &str, extra: &[&str]) -> Result<()> {
    let (key, req, cert) = (
        kd.join("authority.key"),
        dir.join("node.request"),
        dir.join("node.cert"),
    );
    let mut a = vec![
        "authority",
        "admit",
        "--key",
        key.to_str().unwrap(),
        "--request",
        req.to_str().unwrap(),
        "--jurisdiction",
        jurisdiction,
        "--capacity-max",
        "1000",
        "--out",
        cert.to_str().unwrap(),
    ];
    a.extend(extra);
    run_ferry(&a).map(|_| ())
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

fn spawn(dir: &Path, args: &[&str]) -> Result<Child> {
    let err = std::fs::File::create(dir.join("stderr.log"))?;
    Command::new(ferry_bin()?)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(err)
        .env("RUST_LOG", "info")
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

impl Mesh {
    /// Starts the nodes and an entry, all configured through the CLI.
    /// Must be called inside a tokio runtime when `opts.tap` is set.
    pub fn start(specs: &[Spec], opts: &Options) -> Result<Mesh> {
        let root = tempfile::Builder::new().prefix("ferry-mesh-").tempdir()?;
        let tapped = Arc::new(Mutex::new(Vec::new()));
        struct Member {
            dir: PathBuf,
            block: String,
            link: Option<SocketAddr>,
            socks: Option<SocketAddr>,
            admin: SocketAddr,
            mesh: SocketAddr,
            metrics: SocketAddr,
            jurisdiction: String,
        }
        let first_mesh = free_port()?;
        let mut members = Vec::new();
        // Every node of a gossip mesh is admitted by an authority, as an
        // operator would: `ferry init` writes the request, `ferry
        // authority admit` signs the certificate into the node's folder.
        let mut opts = opts.clone();
        let admit_with = match (&opts.admit_with, opts.gossip) {
            (Some(d), true) => Some(d.clone()),
            (None, true) => {
                let (d, public) = rulings::authority(root.path(), "admission");
                opts.authority_keys.push(public);
                Some(d)
            }
            (_, false) => None,
        };
        let opts = &opts;
        let all = specs.iter().cloned().chain([Spec {
            jurisdiction: "NL",
            roles: "entry",
        }]);
        for (i, s) in all.enumerate() {
            let dir = root.path().join(format!("n{i}-{}", s.jurisdiction));
            let link = free_port()?;
            let socks = free_port()?;
            let admin = free_port()?;
            let metrics = free_port()?;
            let mesh = if i == 0 { first_mesh } else { free_port()? };
            let (l, so, ad, me, mt) = (
                link.to_string(),
                socks.to_string(),
                admin.to_string(),
                mesh.to_string(),
                metrics.to_string(),
            );
            let boot = first_mesh.to_string();
            let mut args = vec![
                "init",
                "--dir",
                dir.to_str().unwrap(),
                "--jurisdiction",
                s.jurisdiction,
                "--roles",
                s.roles,
                "--listen",
                &l,
                "--socks",
                &so,
                "--admin",
                &ad,
                "--mesh",
                &me,
                "--metrics",
                &mt,
            ];
            if opts.gossip && i > 0 {
                args.extend(["--bootstrap", &boot]);
            }
            for k in &opts.authority_keys {
                args.extend(["--authority-key", k.as_str()]);
            }
            run_ferry(&args)?;
            if let Some(kd) = &admit_with
                && !opts.unadmitted.contains(&i)
            {
                let extra: Vec<&str> = opts
                    .admit_args
                    .iter()
                    .filter(|(j, _)| *j == i)
                    .flat_map(|(_, a)| a.iter().map(String::as_str))
                    .collect();
                admit(kd, &dir, s.jurisdiction, &extra)?;
            }
            let cfg = dir.join("ferry.toml");
            let mut block = run_ferry(&["peer-info", "--config", cfg.to_str().unwrap()])?;
            let is_entry = s.roles == "entry";
            if opts.tap && !is_entry {
                let tap = start_tap(link, tapped.clone())?;
                block = block.replace(&format!("addr = \"{link}\""), &format!("addr = \"{tap}\""));
            }
            members.push(Member {
                dir,
                block,
                link: (!is_entry).then_some(link),
                socks: is_entry.then_some(socks),
                admin,
                mesh,
                metrics,
                jurisdiction: s.jurisdiction.to_string(),
            });
        }
        for (i, m) in members.iter().enumerate() {
            let cfg = m.dir.join("ferry.toml");
            let mut text = std::fs::read_to_string(&cfg)?;
            text = text.replace("hops = 3", &format!("hops = {}", opts.hops));
            let capacity = opts
                .capacity_of
                .iter()
                .find(|(j, _)| *j == i)
                .map_or(opts.capacity_mbps, |(_, c)| *c);
            text = text.replace(
                "capacity_mbps = 1000",
                &format!("capacity_mbps = {capacity}"),
            );
            text = text.replace(
                "advert_ttl_secs = 30",
                &format!("advert_ttl_secs = {}", opts.advert_ttl_secs),
            );
            if opts.allow_private {
                text = text.replace("allow_private = false", "allow_private = true");
            }
            let (grace, margin, migration) = opts.drain_secs;
            text = text.replace("grace_secs = 30", &format!("grace_secs = {grace}"));
            text = text.replace("margin_secs = 10", &format!("margin_secs = {margin}"));
            text = text.replace(
                "migration_secs = 5",
                &format!("migration_secs = {migration}"),
            );
            for (j, o) in members.iter().enumerate() {
                if i != j && !opts.gossip {
                    text.push('\n');
                    text.push_str(&o.block);
                }
            }
            for p in &opts.extra_peers {
                text.push('\n');
                text.push_str(p);
            }
            std::fs::write(&cfg, text)?;
        }
        let mut procs = Vec::new();
        let mut held = Vec::new();
        for (i, m) in members.into_iter().enumerate() {
            if opts.hold.contains(&i) {
                held.push(Held {
                    dir: m.dir,
                    block: m.block,
                    link: m.link,
                    admin: m.admin,
                    mesh: m.mesh,
                    metrics: m.metrics,
                    jurisdiction: m.jurisdiction,
                });
                continue;
            }
            let ports = Ports {
                link: m.link,
                admin: m.admin,
                mesh: m.mesh,
                metrics: m.metrics,
            };
            procs.push(launch(
                m.dir,
                &m.block,
                ports,
                m.socks,
                m.jurisdiction,
                opts.log_json,
            )?);
        }
        let entry = procs.pop().expect("entry");
        Ok(Mesh {
            nodes: procs,
            entry,
            tapped,
            held,
            boot: first_mesh,
            opts: opts.clone(),
            admit_with,
            _dir: root,
        })
    }

    /// Starts one more `ferry connect` entry in `jurisdiction`, joining by
    /// gossip from the first node and admitted by the mesh's authority, as
    /// an operator would set one up (init, admit, connect). Does not wait
    /// for it to be ready.
    pub fn add_entry(&self, name: &str, jurisdiction: &str) -> Result<Proc> {
        let dir = self._dir.path().join(format!("late-entry-{name}"));
        let (socks, admin, mesh, metrics) =
            (free_port()?, free_port()?, free_port()?, free_port()?);
        let (so, ad, me, mt, boot) = (
            socks.to_string(),
            admin.to_string(),
            mesh.to_string(),
            metrics.to_string(),
            self.boot.to_string(),
        );
        let mut args = vec![
            "init",
            "--dir",
            dir.to_str().unwrap(),
            "--jurisdiction",
            jurisdiction,
            "--roles",
            "entry",
            "--socks",
            &so,
            "--admin",
            &ad,
            "--mesh",
            &me,
            "--metrics",
            &mt,
            "--bootstrap",
            &boot,
        ];
        for k in &self.opts.authority_keys {
            args.extend(["--authority-key", k.as_str()]);
        }
        run_ferry(&args)?;
        if let Some(kd) = &self.admit_with {
            admit(kd, &dir, jurisdiction, &[])?;
        }
        let cfg = dir.join("ferry.toml");
        let mut text = std::fs::read_to_string(&cfg)?;
        text = text.replace("hops = 3", &format!("hops = {}", self.opts.hops));
        text = text.replace(
            "advert_ttl_secs = 30",
            &format!("advert_ttl_secs = {}", self.opts.advert_ttl_secs),
        );
        std::fs::write(&cfg, text)?;
        let block = run_ferry(&["peer-info", "--config", cfg.to_str().unwrap()])?;
        launch(
            dir,
            &block,
            Ports {
                link: None,
                admin,
                mesh,
                metrics,
            },
            Some(socks),
            jurisdiction.to_string(),
            self.opts.log_json,
        )
    }

    /// Starts the held nodes; they are appended to `nodes`.
    pub fn start_held(&mut self) -> Result<()> {
        for h in std::mem::take(&mut self.held) {
            let ports = Ports {
                link: h.link,
                admin: h.admin,
                mesh: h.mesh,
                metrics: h.metrics,
            };
            let p = launch(h.dir, &h.block, ports, None, h.jurisdiction, false)?;
            self.nodes.push(p);
        }
        Ok(())
    }

    /// The first running node in `jurisdiction`.
    pub fn node(&self, jurisdiction: &str) -> &Proc {
        self.nodes
            .iter()
            .find(|p| p.jurisdiction == jurisdiction)
            .unwrap_or_else(|| panic!("no running node in {jurisdiction}"))
    }

    /// The entry's SOCKS5 address.
    pub fn socks(&self) -> SocketAddr {
        self.entry.socks.expect("entry has socks")
    }
}

/// A TCP proxy that records every byte both ways into `sink`.
pub fn start_tap(target: SocketAddr, sink: Arc<Mutex<Vec<u8>>>) -> Result<SocketAddr> {
    let std = StdListener::bind("127.0.0.1:0")?;
    std.set_nonblocking(true)?;
    let addr = std.local_addr()?;
    let listener = TcpListener::from_std(std)?;
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(target).await else {
                    return;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(copy_record(cr, sw, sink.clone()), copy_record(sr, cw, sink));
            });
        }
    });
    Ok(addr)
}

async fn copy_record(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    sink: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
                if w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = w.shutdown().await;
}

/// The real `curl` fetching `url` through the SOCKS5 entry at `socks`
/// (host names resolved by the exit), 20 s at most.
pub fn curl_socks(socks: &str, url: &str) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "20", "--socks5-hostname", socks, url])
        .output()
        .expect("running curl")
}

/// [`curl_socks`] from async code, off the runtime's threads.
pub async fn curl_socks_async(socks: SocketAddr, url: String) -> std::process::Output {
    tokio::task::spawn_blocking(move || curl_socks(&socks.to_string(), &url))
        .await
        .expect("curl task")
}

/// Opens a SOCKS5 CONNECT; `Err(code)` carries the server's reply code.
pub async fn socks_connect(
    socks: SocketAddr,
    host: &str,
    port: u16,
) -> Result<std::result::Result<TcpStream, u8>> {
    socks_connect_as(socks, host, port, None).await
}

/// [`socks_connect`] with RFC 1929 credentials: (tenant, options).
pub async fn socks_connect_as(
    socks: SocketAddr,
    host: &str,
    port: u16,
    auth: Option<(&str, &str)>,
) -> Result<std::result::Result<TcpStream, u8>> {
    let mut s = TcpStream::connect(socks).await?;
    s.set_nodelay(true)?;
    let method = if auth.is_some() { 2 } else { 0 };
    s.write_all(&[5, 1, method]).await?;
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await?;
    if m != [5, method] {
        bail!("method selection answered {m:?}");
    }
    if let Some((u, p)) = auth {
        let mut a = vec![1, u.len() as u8];
        a.extend_from_slice(u.as_bytes());
        a.push(p.len() as u8);
        a.extend_from_slice(p.as_bytes());
        s.write_all(&a).await?;
        let mut r = [0u8; 2];
        s.read_exact(&mut r).await?;
        if r != [1, 0] {
            bail!("authentication answered {r:?}");
        }
    }
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await?;
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await?;
    if rep[0] != 5 {
        bail!("bad reply version {}", rep[0]);
    }
    Ok(if rep[1] == 0 { Ok(s) } else { Err(rep[1]) })
}

/// Deterministic pseudo-random bytes (xorshift64*), for checkable traffic.
pub struct Pattern(u64);

impl Pattern {
    /// A pattern from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Fills `buf`.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// SHA-256 of the first `len` bytes of the pattern for `seed`.
    pub fn digest(seed: u64, len: usize) -> [u8; 32] {
        let mut p = Pattern::new(seed);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            p.fill(&mut buf[..n]);
            h.update(&buf[..n]);
            left -= n;
        }
        h.finalize().into()
    }
}

/// Writes `len` pattern bytes for `seed`, then half-closes.
pub async fn send_pattern<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    seed: u64,
    len: usize,
) -> Result<()> {
    send_pattern_paced(w, seed, len, None).await
}

/// [`send_pattern`] at about `rate` bytes per second, if given: 64 KiB
/// every tick of a tokio interval (a bounded loop: `len` bytes).
pub async fn send_pattern_paced<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    seed: u64,
    len: usize,
    rate: Option<u64>,
) -> Result<()> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut tick = rate.map(|r| {
        let per = Duration::from_secs_f64(buf.len() as f64 / r.max(1) as f64);
        let mut t = tokio::time::interval(per);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut left = len;
    while left > 0 {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let n = left.min(buf.len());
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        left -= n;
    }
    w.shutdown().await?;
    Ok(())
}

/// Reads to EOF; returns (bytes, SHA-256).
pub async fn read_digest<R: AsyncReadExt + Unpin>(r: &mut R) -> Result<(usize, [u8; 32])> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, h.finalize().into()));
        }
        total += n;
        h.update(&buf[..n]);
    }
}

/// A target server: each connection sends an 8-byte seed and a length; the
/// server answers with that many pattern bytes for seed+1 while it hashes
/// what the client sends. Each connection's (bytes, digest) of the client's
/// upload comes out of the returned channel.
pub async fn pattern_server() -> Result<(
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(u64, usize, [u8; 32])>,
)> {
    pattern_server_paced(None).await
}

/// [`pattern_server`] sending at about `rate` bytes per second.
pub async fn pattern_server_paced(
    rate: Option<u64>,
) -> Result<(
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(u64, usize, [u8; 32])>,
)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let mut head = [0u8; 16];
                if r.read_exact(&mut head).await.is_err() {
                    return;
                }
                let seed = u64::from_be_bytes(head[..8].try_into().unwrap());
                let len = u64::from_be_bytes(head[8..].try_into().unwrap()) as usize;
                let (up, down) = tokio::join!(
                    read_digest(&mut r),
                    send_pattern_paced(&mut w, seed + 1, len, rate)
                );
                if let (Ok((n, d)), Ok(())) = (up, down) {
                    let _ = tx.send((seed, n, d));
                }
            });
        }
    });
    Ok((addr, rx))
}

/// A minimal HTTP server answering every request with `body`.
pub async fn http_server(body: &'static str) -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16384 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Rulings made and published with the CLI, as an operator would.
pub mod rulings {
    use super::{Proc, run_ferry};
    use ferry_node::authority::fmt_time;
    use std::path::{Path, PathBuf};

    /// An authority key pair in `dir/name`: (folder, public key hex).
    pub fn authority(dir: &Path, name: &str) -> (PathBuf, String) {
        let d = dir.join(name);
        run_ferry(&["authority", "keygen", "--out", d.to_str().unwrap()]).unwrap();
        let public = std::fs::read_to_string(d.join("authority.pub")).unwrap();
        (d, public.trim().to_string())
    }

    /// A ruling on `region` from `from_ms` to `exit_ms` (ms since the
    /// epoch); id `test-REGION`.
    #[derive(Clone, Copy)]
    pub struct Ruling<'a> {
        /// Its version.
        pub version: u64,
        /// Country code or bloc.
        pub region: &'a str,
        /// Blocked from.
        pub from_ms: u64,
        /// Exit date.
        pub exit_ms: u64,
        /// Classes it covers (empty: all traffic).
        pub classes: &'a [&'a str],
        /// Lifts the ruling.
        pub lifted: bool,
    }

    impl<'a> Ruling<'a> {
        /// Version 1, all traffic.
        pub fn block(region: &'a str, from_ms: u64, exit_ms: u64) -> Self {
            Self {
                version: 1,
                region,
                from_ms,
                exit_ms,
                classes: &[],
                lifted: false,
            }
        }
    }

    /// Writes `r` as a TOML ruling file in `dir` and signs it with the key
    /// in `key_dir`; returns the signed file.
    pub fn sign(dir: &Path, key_dir: &Path, r: &Ruling<'_>) -> PathBuf {
        let name = format!(
            "{}-v{}-{}",
            r.region,
            r.version,
            key_dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("key")
        );
        let src = dir.join(format!("{name}.toml"));
        let classes: Vec<String> = r.classes.iter().map(|c| format!("\"{c}\"")).collect();
        std::fs::write(
            &src,
            format!(
                "id = \"test-{region}\"\nversion = {v}\nregion = \"{region}\"\nblocked_from = \"{from}\"\n\
                 exit_by = \"{exit}\"\nclasses = [{classes}]\nreason = \"test order\"\nlifted = {lifted}\n",
                region = r.region,
                v = r.version,
                from = fmt_time(r.from_ms),
                exit = fmt_time(r.exit_ms),
                classes = classes.join(", "),
                lifted = r.lifted,
            ),
        )
        .unwrap();
        let out = dir.join(format!("{name}.signed.json"));
        run_ferry(&[
            "policy",
            "sign",
            "--key",
            key_dir.join("authority.key").to_str().unwrap(),
            "--in",
            src.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .unwrap();
        out
    }

    /// Publishes a signed ruling through `node`'s admin API: the CLI's
    /// answer, or its error.
    pub fn publish(node: &Proc, file: &Path) -> Result<String, String> {
        let out = std::process::Command::new(super::ferry_bin().unwrap())
            .args(["policy", "publish", "--admin", &node.admin.to_string()])
            .arg(file)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into())
        }
    }
}

/// A bare libp2p gossipsub peer, for publishing what a ferry node never would.
pub mod gossip {
    use anyhow::{Result, bail};
    use futures::StreamExt;
    use libp2p::swarm::SwarmEvent;
    use libp2p::{gossipsub, noise, tcp, yamux};
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    /// Connects to `node`, subscribes to `topic`, and publishes every message
    /// of `msgs` once a second until `done()` holds or `within` passes.
    pub async fn publish_until(
        node: SocketAddr,
        topic: &str,
        msgs: &[Vec<u8>],
        within: Duration,
        done: impl Fn() -> bool,
    ) -> Result<()> {
        let mut swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_behaviour(|key| {
                let cfg = gossipsub::ConfigBuilder::default()
                    .heartbeat_interval(Duration::from_millis(500))
                    .max_transmit_size(64 * 1024)
                    .build()
                    .expect("gossipsub config");
                gossipsub::Behaviour::<
                    gossipsub::IdentityTransform,
                    gossipsub::AllowAllSubscriptionFilter,
                >::new(gossipsub::MessageAuthenticity::Signed(key.clone()), cfg)
                .expect("gossipsub")
            })?
            .build();
        let t = gossipsub::IdentTopic::new(topic);
        swarm.behaviour_mut().subscribe(&t)?;
        swarm.dial(
            format!("/ip4/{}/tcp/{}", node.ip(), node.port()).parse::<libp2p::Multiaddr>()?,
        )?;
        let deadline = Instant::now() + within;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if done() {
                        return Ok(());
                    }
                    if Instant::now() > deadline {
                        bail!("the nodes never counted the garbage");
                    }
                    // Until the node has us in its mesh, publishing fails;
                    // after that, nodes drop repeats by content.
                    for m in msgs {
                        let _ = swarm.behaviour_mut().publish(t.clone(), m.clone());
                    }
                }
                ev = swarm.select_next_some() => {
                    if let SwarmEvent::OutgoingConnectionError { error, .. } = ev {
                        bail!("could not reach the node: {error}");
                    }
                }
            }
        }
    }
}
