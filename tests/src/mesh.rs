//! A mesh of `ferry node` processes and one `ferry connect` entry, all
//! configured through the CLI, and the [`Options`] that shape it.

use crate::admission::{admit, authority};
use crate::client::socks_connect_as;
use crate::node::{Ports, Prepared, Proc, Spec, free_port, init, launch, run_ferry};
use crate::tap::start_tap;
use anyhow::{Result, anyhow};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::net::TcpStream;

/// Two relays and an exit, each in its own jurisdiction: with 3 hops and
/// diversity, every circuit crosses all three.
pub const THREE: [Spec; 3] = [
    Spec::new("DE", "relay"),
    Spec::new("CH", "relay"),
    Spec::new("IS", "exit"),
];

/// An exit in CA and relays in PK and DE: the rulings of the tests block
/// PK, and DE is the way around it.
pub const CA_PK_DE: [Spec; 3] = [
    Spec::new("CA", "exit"),
    Spec::new("PK", "relay"),
    Spec::new("DE", "relay"),
];

/// Options for a mesh.
#[derive(Clone, Debug)]
pub struct Options {
    /// Hops per circuit.
    pub hops: usize,
    /// Exits may reach loopback targets.
    pub allow_private: bool,
    /// A private mesh (`[mesh] private`, which `ferry init` sets for nodes
    /// on loopback): `false` makes relays extend to public addresses only.
    pub mesh_private: bool,
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
    /// The authority key folder (from [`crate::rulings::authority`]) that
    /// admits the nodes of a gossip mesh with `ferry authority admit`.
    /// Without one, a gossip mesh makes its own admitting authority and
    /// adds its public key to `authority_keys`.
    pub admit_with: Option<PathBuf>,
    /// Extra `ferry authority admit` arguments for some nodes, by spec
    /// index (for example `--capacity-max 100`, `--valid-for 20s`).
    pub admit_args: Vec<(usize, Vec<String>)>,
    /// Nodes (by spec index) left without a certificate.
    pub unadmitted: Vec<usize>,
    /// Advertised capacity of some nodes (by spec index), Mbit/s.
    pub capacity_of: Vec<(usize, u32)>,
    /// TOML appended to the entry's config (for example `[[tenants]]`).
    pub entry_toml: String,
    /// An HTTP CONNECT listener for the entry (`listen.http`).
    pub entry_http: Option<std::net::SocketAddr>,
    /// Replacements in the entry's config text (for example a `[limits]`
    /// line of the template with another value).
    pub entry_replace: Vec<(String, String)>,
    /// Replacements in every node's config text, the entry's too (before
    /// `entry_replace`).
    pub node_replace: Vec<(String, String)>,
    /// Nodes (by spec index) the entry reaches through a delaying proxy,
    /// with the delay each way ([`crate::tap::start_delay`]): further
    /// away in round-trip time from the entry only. Must be set inside a
    /// tokio runtime.
    pub entry_delay: Vec<(usize, std::time::Duration)>,
    /// Nodes (by spec index) that advertise a delaying proxy as their link
    /// address: every node dialling them reaches them that much further
    /// away, each way. Gossip meshes; must be set inside a tokio runtime.
    pub advertise_delay: Vec<(usize, std::time::Duration)>,
    /// Nodes (by spec index) whose peer-info block (a static mesh) names a
    /// tampering proxy as their link address ([`crate::tap::start_tamper`]):
    /// every link dialled to them has one bit of its first data cell
    /// changed on the way in, counted in [`Mesh::tampered`]. Must be set
    /// inside a tokio runtime.
    pub advertise_tamper: Vec<usize>,
    /// Nodes (by spec index) started under another command: its words,
    /// then `ferry` and its arguments (for example `unshare --mount` to
    /// give an exit its own `/etc/resolv.conf`).
    pub wrap: Vec<(usize, Vec<String>)>,
    /// The nodes' log filter (`RUST_LOG`), instead of `FERRY_TEST_LOG`'s or
    /// `info`: for a test that reads what a node logs at DEBUG.
    pub log_filter: Option<String>,
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
            mesh_private: true,
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
            entry_toml: String::new(),
            entry_http: None,
            entry_replace: Vec::new(),
            node_replace: Vec::new(),
            entry_delay: Vec::new(),
            advertise_delay: Vec::new(),
            advertise_tamper: Vec::new(),
            wrap: Vec::new(),
            log_filter: None,
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
    /// Bits the tampering proxies changed ([`Options::advertise_tamper`]).
    pub tampered: Arc<std::sync::atomic::AtomicUsize>,
    /// Nodes prepared but not started ([`Options::hold`]).
    held: Vec<Prepared>,
    /// The first node's mesh address (everyone bootstraps from it).
    boot: SocketAddr,
    /// The options the mesh was started with (with the admitting
    /// authority's key added, in gossip mode).
    opts: Options,
    /// The key folder of the authority that admitted the nodes.
    admit_with: Option<PathBuf>,
    /// The mesh's folder, removed once the processes are gone.
    root: tempfile::TempDir,
}

impl Mesh {
    /// Starts the nodes and an entry, all configured through the CLI.
    /// Must be called inside a tokio runtime when `opts.tap` is set.
    pub fn start(specs: &[Spec], opts: &Options) -> Result<Mesh> {
        let root = tempfile::Builder::new().prefix("ferry-mesh-").tempdir()?;
        let tapped = Arc::new(Mutex::new(Vec::new()));
        let tampered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let first_mesh = free_port()?;
        let mut members = Vec::new();
        // Every node of a gossip mesh is admitted by an authority, as an
        // operator would: `ferry init` writes the request, `ferry
        // authority admit` signs the certificate into the node's folder.
        let mut opts = opts.clone();
        let admit_with = match (&opts.admit_with, opts.gossip) {
            (Some(d), true) => Some(d.clone()),
            (None, true) => {
                let (d, public) = authority(root.path(), "admission");
                opts.authority_keys.push(public);
                Some(d)
            }
            (_, false) => None,
        };
        let opts = &opts;
        let all = specs.iter().cloned().chain([Spec::new("NL", "entry")]);
        for (i, s) in all.enumerate() {
            let dir = root.path().join(format!("n{i}-{}", s.jurisdiction));
            let (link, socks) = (free_port()?, free_port()?);
            let ports = Ports {
                link: Some(link),
                socks: Some(socks),
                admin: free_port()?,
                metrics: free_port()?,
                mesh: if i == 0 { first_mesh } else { free_port()? },
            };
            let bootstrap = (opts.gossip && i > 0).then_some(first_mesh);
            init(
                &dir,
                s.jurisdiction,
                s.roles,
                &ports,
                bootstrap,
                &opts.authority_keys,
            )?;
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
            if opts.advertise_tamper.contains(&i) {
                anyhow::ensure!(
                    !opts.tap,
                    "a tap and a tampering proxy cannot both front a link"
                );
                let proxy = crate::tap::start_tamper(link, tampered.clone())?;
                block = block.replace(
                    &format!("addr = \"{link}\""),
                    &format!("addr = \"{proxy}\""),
                );
            }
            members.push(Prepared {
                dir,
                block,
                ports: Ports {
                    link: (!is_entry).then_some(link),
                    socks: is_entry.then_some(socks),
                    ..ports
                },
                jurisdiction: s.jurisdiction.to_string(),
            });
        }
        for (i, m) in members.iter().enumerate() {
            let cfg = m.dir.join("ferry.toml");
            let mut text = std::fs::read_to_string(&cfg)?;
            text = text.replace("hops = 3", &format!("hops = {}", opts.hops));
            if let Some((_, delay)) = opts.advertise_delay.iter().find(|(j, _)| *j == i) {
                let link = m.ports.link.expect("a delayed node has a link");
                let proxy = crate::tap::start_delay(link, *delay)?;
                text = text.replace(
                    "# advertise_link = \"203.0.113.7:7000\"",
                    &format!("advertise_link = \"{proxy}\""),
                );
            }

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
            if !opts.mesh_private {
                text = text.replace("\nprivate = true", "\nprivate = false");
            }
            text = replace_all(text, &opts.node_replace)?;
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
            if let (true, Some(a)) = (i + 1 == members.len(), opts.entry_http) {
                text = text.replace(
                    "http_allow_remote = false",
                    &format!("http = \"{a}\"\nhttp_allow_remote = false"),
                );
            }
            if i + 1 == members.len() {
                text = replace_all(text, &opts.entry_replace)?;
                for (j, delay) in &opts.entry_delay {
                    let link = members[*j].ports.link.expect("a delayed node has a link");
                    let proxy = crate::tap::start_delay(link, *delay)?;
                    text = text.replace(
                        &format!("addr = \"{link}\""),
                        &format!("addr = \"{proxy}\""),
                    );
                }
                if !opts.entry_toml.is_empty() {
                    text.push('\n');
                    text.push_str(&opts.entry_toml);
                }
            }
            std::fs::write(&cfg, text)?;
            if let Some((_, words)) = opts.wrap.iter().find(|(j, _)| *j == i) {
                std::fs::write(m.dir.join("wrap"), words.join("\n"))?;
            }
            if let Some(f) = &opts.log_filter {
                std::fs::write(m.dir.join("log-filter"), f)?;
            }
        }
        let mut procs = Vec::new();
        let mut held = Vec::new();
        for (i, m) in members.into_iter().enumerate() {
            if opts.hold.contains(&i) {
                held.push(m);
            } else {
                procs.push(launch(m, opts.log_json)?);
            }
        }
        let entry = procs.pop().expect("entry");
        Ok(Mesh {
            nodes: procs,
            entry,
            tapped,
            tampered,
            held,
            boot: first_mesh,
            opts: opts.clone(),
            admit_with,
            root,
        })
    }

    /// Starts one more `ferry connect` entry in `jurisdiction`, joining by
    /// gossip from the first node and admitted by the mesh's authority, as
    /// an operator would set one up (init, admit, connect). Does not wait
    /// for it to be ready. Its config takes `node_replace` and then
    /// `entry_replace`, as the mesh's own entry does.
    pub fn add_entry(&self, name: &str, jurisdiction: &str) -> Result<Proc> {
        let dir = self.root.path().join(format!("late-entry-{name}"));
        let ports = Ports {
            link: None,
            socks: Some(free_port()?),
            admin: free_port()?,
            mesh: free_port()?,
            metrics: free_port()?,
        };
        init(
            &dir,
            jurisdiction,
            "entry",
            &ports,
            Some(self.boot),
            &self.opts.authority_keys,
        )?;
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
        text = replace_all(text, &self.opts.node_replace)?;
        text = replace_all(text, &self.opts.entry_replace)?;
        if !self.opts.entry_toml.is_empty() {
            text.push('\n');
            text.push_str(&self.opts.entry_toml);
        }
        std::fs::write(&cfg, text)?;
        let block = run_ferry(&["peer-info", "--config", cfg.to_str().unwrap()])?;
        let entry = Prepared {
            dir,
            block,
            ports,
            jurisdiction: jurisdiction.to_string(),
        };
        launch(entry, self.opts.log_json)
    }

    /// Starts the held nodes; they are appended to `nodes`.
    pub fn start_held(&mut self) -> Result<()> {
        for h in std::mem::take(&mut self.held) {
            self.nodes.push(launch(h, false)?);
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

    /// Every running process: the nodes, then the entry.
    pub fn all(&self) -> Vec<&Proc> {
        self.nodes.iter().chain([&self.entry]).collect()
    }

    /// The entry's SOCKS5 address.
    pub fn socks(&self) -> SocketAddr {
        self.entry.socks.expect("entry has socks")
    }

    /// Opens a SOCKS5 CONNECT through the entry to `127.0.0.1:port`, with
    /// the per-connection `options` (the RFC 1929 password, tenant "")
    /// unless they are empty; `Err(code)` carries the entry's reply code.
    pub async fn connect(
        &self,
        port: u16,
        options: &str,
    ) -> Result<std::result::Result<TcpStream, u8>> {
        let auth = (!options.is_empty()).then_some(("", options));
        socks_connect_as(self.socks(), "127.0.0.1", port, auth).await
    }

    /// [`Mesh::connect`] that must succeed: the stream, or an error that
    /// names the entry's reply code.
    pub async fn open(&self, port: u16, options: &str) -> Result<TcpStream> {
        self.connect(port, options)
            .await?
            .map_err(|code| anyhow!("the entry refused the stream: SOCKS reply {code}"))
    }

    /// A mesh of one exit in CA and the entry (1 hop), with `extra_peers`
    /// listed on both (test clients' keys).
    pub fn one_exit(extra_peers: Vec<String>) -> Result<Mesh> {
        Mesh::start(
            &[Spec::new("CA", "exit")],
            &Options {
                hops: 1,
                extra_peers,
                ..Options::default()
            },
        )
    }

    /// A stream through the entry to an echo server carries `ping` there
    /// and back: the mesh still serves.
    pub async fn echo_ping(&self) -> Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let echo = crate::traffic::echo_server().await?;
        let mut s = self.open(echo.port(), "").await?;
        s.write_all(b"ping").await?;
        let mut got = [0u8; 4];
        s.read_exact(&mut got).await?;
        anyhow::ensure!(&got == b"ping", "the echo came back as {got:?}");
        Ok(())
    }
}

/// Applies `(from, to)` replacements to a config text; a `from` that is not
/// in it is an error (the template changed under the test).
fn replace_all(mut text: String, pairs: &[(String, String)]) -> Result<String> {
    for (from, to) in pairs {
        if !text.contains(from.as_str()) {
            anyhow::bail!("`{from}` is not in the config");
        }
        text = text.replace(from.as_str(), to);
    }
    Ok(text)
}
