//! Node configuration, in two stages: [`FileConfig`] is the TOML file as
//! written (unknown keys are errors naming the key), and [`NodeConfig`] is the
//! validated runtime form, built with `TryFrom` before any socket is bound.
//! Every key is documented in the file `ferry init` writes (see
//! [`render_template`]) and in `node/ferry.example.toml`.
//!
//! For containers, the file's text may take values from the environment
//! before it is parsed: `${NAME}` (an error naming the variable and line if
//! it is unset) and `${NAME:-default}`, as Vector's config does; `$$` is a
//! literal `$`; comment lines are left alone. List keys (`node.roles`,
//! `mesh.bootstrap`, `authority.keys`, `exit.rules`) also take one
//! comma-separated string, so a single variable can carry a list. The
//! image's own config, `deploy/docker/ferry.toml`, is built this way.

use crate::policy::ExitPolicy;
use anyhow::{Context, Result, anyhow, bail};
use ferry_router::{Jurisdiction, NodeId, Roles};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The config file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `[node]`
    pub node: FileNode,
    /// `[listen]`
    #[serde(default)]
    pub listen: FileListen,
    /// `[circuit]`
    #[serde(default)]
    pub circuit: FileCircuit,
    /// `[exit]`
    #[serde(default)]
    pub exit: FileExit,
    /// `[mesh]`
    #[serde(default)]
    pub mesh: FileMesh,
    /// `[authority]`
    #[serde(default)]
    pub authority: FileAuthority,
    /// `[admin]`
    #[serde(default)]
    pub admin: FileAdmin,
    /// `[metrics]`
    #[serde(default)]
    pub metrics: FileAdmin,
    /// `[routing]`
    #[serde(default)]
    pub routing: FileRouting,
    /// `[drain]`
    #[serde(default)]
    pub drain: FileDrain,
    /// `[[tenants]]`
    #[serde(default)]
    pub tenants: Vec<FileTenant>,
    /// `[[peers]]`
    #[serde(default)]
    pub peers: Vec<FilePeer>,
}

/// `[routing]`: constraints on every circuit this entry builds.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRouting {
    /// No hop in these regions.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// The exit in one of these (empty: anywhere).
    #[serde(default)]
    pub exit_in: Vec<String>,
    /// No relay in these.
    #[serde(default)]
    pub avoid_transit: Vec<String>,
    /// Allow nodes whose jurisdiction is unknown.
    #[serde(default)]
    pub allow_unknown: bool,
    /// Allow two hops in one jurisdiction.
    #[serde(default)]
    pub allow_same_jurisdiction: bool,
    /// Allow two hops of one operator family.
    #[serde(default)]
    pub allow_same_family: bool,
}

/// `[[tenants]]`: per-tenant class and constraints, by SOCKS5 username.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTenant {
    /// The SOCKS5 username.
    pub name: String,
    /// Traffic class.
    #[serde(default)]
    pub class: String,
    /// No hop in these regions.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// The exit in one of these.
    #[serde(default)]
    pub exit_in: Vec<String>,
    /// No relay in these.
    #[serde(default)]
    pub avoid_transit: Vec<String>,
    /// Hops, if not the node's.
    pub hops: Option<usize>,
}

/// `[drain]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDrain {
    /// SIGTERM drains this long, then exits.
    #[serde(default = "default_grace")]
    pub grace_secs: u64,
    /// Migrations finish this long before an exit date.
    #[serde(default = "default_margin")]
    pub margin_secs: u64,
    /// Time one migration is given.
    #[serde(default = "default_migration")]
    pub migration_secs: u64,
}

impl Default for FileDrain {
    fn default() -> Self {
        Self {
            grace_secs: default_grace(),
            margin_secs: default_margin(),
            migration_secs: default_migration(),
        }
    }
}

fn default_grace() -> u64 {
    30
}

fn default_margin() -> u64 {
    10
}

fn default_migration() -> u64 {
    5
}

/// Drain timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainSettings {
    /// SIGTERM drains this long, then the process exits.
    pub grace: Duration,
    /// Migrations finish this long before an exit date.
    pub margin: Duration,
    /// Time one migration is given.
    pub migration: Duration,
}

/// `[mesh]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMesh {
    /// Control-plane (libp2p) listener.
    pub listen: Option<String>,
    /// Bootstrap addresses.
    #[serde(default, deserialize_with = "string_list")]
    pub bootstrap: Vec<String>,
    /// Advert lifetime.
    #[serde(default = "default_advert_ttl")]
    pub advert_ttl_secs: u64,
}

impl Default for FileMesh {
    fn default() -> Self {
        Self {
            listen: None,
            bootstrap: Vec::new(),
            advert_ttl_secs: default_advert_ttl(),
        }
    }
}

fn default_advert_ttl() -> u64 {
    30
}

/// `[authority]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAuthority {
    /// Trusted authority public keys, hex.
    #[serde(default, deserialize_with = "string_list")]
    pub keys: Vec<String>,
    /// Signatures a ruling needs.
    #[serde(default = "default_threshold")]
    pub threshold: usize,
}

impl Default for FileAuthority {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            threshold: default_threshold(),
        }
    }
}

fn default_threshold() -> usize {
    1
}

/// `[admin]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    /// Admin HTTP listener.
    pub listen: Option<String>,
    /// Allow a non-loopback admin listener.
    #[serde(default)]
    pub allow_remote: bool,
}

/// `[node]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileNode {
    /// ISO 3166-1 alpha-2 code of where the node operates.
    pub jurisdiction: String,
    /// Any of `entry`, `relay`, `exit`.
    #[serde(deserialize_with = "string_list")]
    pub roles: Vec<String>,
    /// Folder holding `identity.key` and `noise.key`, relative to the file.
    #[serde(default = "default_key_dir")]
    pub key_dir: PathBuf,
    /// Folder of the node's RocksDB store, relative to the file.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Operator family name: nodes of one operator share it.
    #[serde(default)]
    pub family: String,
    /// Advertised capacity, Mbit/s.
    #[serde(default = "default_capacity")]
    pub capacity_mbps: u32,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}

fn default_capacity() -> u32 {
    1000
}

fn default_key_dir() -> PathBuf {
    PathBuf::from(".")
}

/// `[listen]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListen {
    /// Data-plane link listener (relay and exit roles).
    pub link: Option<String>,
    /// The link address other nodes dial, if not the listener's own.
    pub advertise_link: Option<String>,
    /// SOCKS5 entry (entry role).
    pub socks: Option<String>,
    /// Allow the SOCKS5 entry on a non-loopback address.
    #[serde(default)]
    pub socks_allow_remote: bool,
}

/// `[circuit]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCircuit {
    /// Nodes on each circuit after the origin; the last is the exit.
    #[serde(default = "default_hops")]
    pub hops: usize,
    /// Per-stream flow-control window.
    #[serde(default = "default_window")]
    pub stream_window_bytes: u32,
    /// Streams that share one circuit before another is built.
    #[serde(default = "default_streams_per_circuit")]
    pub max_streams_per_circuit: u32,
    /// Time allowed to build a circuit.
    #[serde(default = "default_build_timeout")]
    pub build_timeout_secs: u64,
}

impl Default for FileCircuit {
    fn default() -> Self {
        Self {
            hops: default_hops(),
            stream_window_bytes: default_window(),
            max_streams_per_circuit: default_streams_per_circuit(),
            build_timeout_secs: default_build_timeout(),
        }
    }
}

fn default_hops() -> usize {
    3
}
fn default_window() -> u32 {
    2 * 1024 * 1024
}
fn default_streams_per_circuit() -> u32 {
    64
}
fn default_build_timeout() -> u64 {
    10
}

/// `[exit]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileExit {
    /// Allow targets in loopback, private, link-local and other special ranges.
    #[serde(default)]
    pub allow_private: bool,
    /// Ordered `allow|deny CIDR[:PORTS]` rules; first match wins, no match denies.
    #[serde(default = "default_rules", deserialize_with = "string_list")]
    pub rules: Vec<String>,
    /// Time allowed to connect to a target.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
}

impl Default for FileExit {
    fn default() -> Self {
        Self {
            allow_private: false,
            rules: default_rules(),
            connect_timeout_secs: default_connect_timeout(),
        }
    }
}

fn default_rules() -> Vec<String> {
    vec!["allow 0.0.0.0/0".into(), "allow ::/0".into()]
}
fn default_connect_timeout() -> u64 {
    10
}

/// `[[peers]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePeer {
    /// Node id: Ed25519 public key, 64 hex digits.
    pub id: String,
    /// Noise static public key, 64 hex digits.
    pub noise_key: String,
    /// Link address; absent for entry-only clients.
    pub addr: Option<String>,
    /// ISO 3166-1 alpha-2 code.
    pub jurisdiction: String,
    /// Any of `entry`, `relay`, `exit`.
    pub roles: Vec<String>,
}

/// A peer, validated.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Identity.
    pub id: NodeId,
    /// Noise static public key.
    pub noise_key: [u8; 32],
    /// Link address, if it accepts links.
    pub addr: Option<SocketAddr>,
    /// Where it operates.
    pub jurisdiction: Jurisdiction,
    /// What it does.
    pub roles: Roles,
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where the node operates.
    pub jurisdiction: Jurisdiction,
    /// What it does.
    pub roles: Roles,
    /// Folder with the key files.
    pub key_dir: PathBuf,
    /// Link listener, for relay and exit roles.
    pub link_listen: Option<SocketAddr>,
    /// The link address this node advertises, when it is not the
    /// listener's own (a wildcard listener, NAT, a container).
    pub link_advertise: Option<SocketAddr>,
    /// SOCKS5 listener, for the entry role.
    pub socks_listen: Option<SocketAddr>,
    /// Hops per circuit.
    pub hops: usize,
    /// Per-stream window.
    pub stream_window: u32,
    /// Streams per circuit.
    pub max_streams_per_circuit: u32,
    /// Circuit build timeout.
    pub build_timeout: Duration,
    /// Exit policy.
    pub exit_policy: ExitPolicy,
    /// Exit connect timeout.
    pub connect_timeout: Duration,
    /// Static peers (a fixed mesh; the control plane adds advertised ones).
    pub peers: Vec<Peer>,
    /// Folder of the store.
    pub data_dir: PathBuf,
    /// Operator family.
    pub family: String,
    /// Advertised capacity.
    pub capacity_mbps: u32,
    /// Control-plane listener.
    pub mesh_listen: Option<SocketAddr>,
    /// Bootstrap addresses.
    pub bootstrap: Vec<String>,
    /// Advert lifetime.
    pub advert_ttl: Duration,
    /// Trusted authority keys.
    pub authority: crate::authority::Authority,
    /// Routing constraints and tenants (entries).
    pub routing: crate::routing::Policy,
    /// Drain timing.
    pub drain: DrainSettings,
    /// Admin API listener.
    pub admin_listen: Option<SocketAddr>,
    /// Prometheus metrics listener.
    pub metrics_listen: Option<SocketAddr>,
}

impl NodeConfig {
    /// Whether this node needs a certificate: it trusts an authority and
    /// joins by gossip (a static mesh, with `[[peers]]` and no bootstrap,
    /// is vouched for by its operators' configs instead).
    pub fn needs_certificate(&self) -> bool {
        let static_only = !self.peers.is_empty() && self.bootstrap.is_empty();
        !self.authority.keys.is_empty() && !static_only
    }

    /// Reads and validates a config file. Relative paths in it are taken
    /// relative to the file's folder.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let text = interpolate(&text, |k| std::env::var(k).ok())
            .with_context(|| format!("config {}", path.display()))?;
        let file: FileConfig =
            toml::from_str(&text).map_err(|e| anyhow!("config {}: {e}", path.display()))?;
        let mut cfg =
            NodeConfig::try_from(file).with_context(|| format!("config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if cfg.key_dir.is_relative() {
            cfg.key_dir = base.join(&cfg.key_dir);
        }
        if cfg.data_dir.is_relative() {
            cfg.data_dir = base.join(&cfg.data_dir);
        }
        Ok(cfg)
    }
}

/// Expands `${NAME}` and `${NAME:-default}` from `env` in a config file's
/// text, outside comment lines; `$$` is a literal `$`. An unset variable
/// without a default is an error naming it and its line.
pub fn interpolate(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    for (n, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            if let Some(tail) = after.strip_prefix('$') {
                out.push('$');
                rest = tail;
                continue;
            }
            let Some(body) = after.strip_prefix('{') else {
                out.push('$');
                rest = after;
                continue;
            };
            let end = body
                .find('}')
                .ok_or_else(|| anyhow!("line {}: `${{` without a closing `}}`", n + 1))?;
            let (name, default) = match body[..end].split_once(":-") {
                Some((name, d)) => (name, Some(d)),
                None => (&body[..end], None),
            };
            let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                bail!(
                    "line {}: `${{{}}}` is not an environment variable name",
                    n + 1,
                    name
                );
            }
            match (env(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => bail!(
                    "line {}: environment variable {name} is not set (write ${{{name}:-DEFAULT}} for a default)",
                    n + 1
                ),
            }
            rest = &body[end + 1..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

/// A list of strings, written as a TOML array or as one comma-separated
/// string (so one environment variable can carry it); blanks are dropped.
fn string_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of strings, or one comma-separated string")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
            Ok(s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut a: A,
        ) -> Result<Self::Value, A::Error> {
            let mut v = Vec::new();
            while let Some(s) = a.next_element::<String>()? {
                v.push(s);
            }
            Ok(v)
        }
    }
    d.deserialize_any(V)
}

/// Validates an ISO 3166-1 alpha-2 code (any case) and upper-cases it.
pub fn parse_jurisdiction(s: &str) -> Result<Jurisdiction> {
    let b = s.as_bytes();
    if b.len() != 2
        || !b.iter().all(u8::is_ascii_alphabetic)
        || celes::Country::from_alpha2(s).is_err()
    {
        bail!("`{s}` is not an ISO 3166-1 alpha-2 country code (for example DE, CH, CA)");
    }
    Ok(Jurisdiction([
        b[0].to_ascii_uppercase(),
        b[1].to_ascii_uppercase(),
    ]))
}

/// Parses role names.
pub fn parse_roles<S: AsRef<str>>(names: &[S]) -> Result<Roles> {
    let mut roles = Roles::default();
    if names.is_empty() {
        bail!("roles is empty: give at least one of entry, relay, exit");
    }
    for n in names {
        match n.as_ref().trim() {
            "entry" => roles.entry = true,
            "relay" => roles.relay = true,
            "exit" => roles.exit = true,
            other => bail!("unknown role `{other}`: roles are entry, relay, exit"),
        }
    }
    Ok(roles)
}

/// A `[section] listen` address that must be loopback unless the section
/// sets `allow_remote = true`.
fn local_listener(section: &str, f: &FileAdmin) -> Result<Option<SocketAddr>> {
    let key = format!("{section}.listen");
    let addr = f
        .listen
        .as_deref()
        .map(|s| parse_addr(&key, s))
        .transpose()?;
    if let Some(a) = addr
        && !a.ip().is_loopback()
        && !f.allow_remote
    {
        bail!(
            "{key} = `{a}` is not a loopback address; set {section}.allow_remote = true to expose it on purpose"
        );
    }
    Ok(addr)
}

fn parse_addr(key: &str, s: &str) -> Result<SocketAddr> {
    s.parse()
        .map_err(|e| anyhow!("{key} = `{s}`: not an IP:port address ({e})"))
}

impl TryFrom<FileConfig> for NodeConfig {
    type Error = anyhow::Error;

    fn try_from(f: FileConfig) -> Result<Self> {
        let jurisdiction = parse_jurisdiction(&f.node.jurisdiction).context("node.jurisdiction")?;
        let roles = parse_roles(&f.node.roles).context("node.roles")?;
        let link_listen = f
            .listen
            .link
            .as_deref()
            .map(|s| parse_addr("listen.link", s))
            .transpose()?;
        let socks_listen = f
            .listen
            .socks
            .as_deref()
            .map(|s| parse_addr("listen.socks", s))
            .transpose()?;
        if (roles.relay || roles.exit) && link_listen.is_none() {
            bail!("listen.link is required for the relay and exit roles");
        }
        let link_advertise = f
            .listen
            .advertise_link
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| parse_addr("listen.advertise_link", s))
            .transpose()?;
        if let Some(a) = link_advertise
            && (a.ip().is_unspecified() || a.port() == 0)
        {
            bail!(
                "listen.advertise_link = `{a}`: give the IP:port other nodes dial, not a wildcard"
            );
        }
        if let Some(l) = link_listen
            && l.ip().is_unspecified()
            && link_advertise.is_none()
            && (roles.relay || roles.exit)
        {
            bail!(
                "listen.link = `{l}` is a wildcard address, which other nodes cannot dial: \
                 set listen.advertise_link to this node's reachable IP:port"
            );
        }
        if let Some(s) = socks_listen
            && !s.ip().is_loopback()
            && !f.listen.socks_allow_remote
        {
            bail!(
                "listen.socks = `{s}` is not a loopback address; the SOCKS5 entry has no \
                 authentication, so set listen.socks_allow_remote = true to expose it on purpose"
            );
        }
        if !(1..=8).contains(&f.circuit.hops) {
            bail!("circuit.hops = {}: must be 1 to 8", f.circuit.hops);
        }
        let window = f.circuit.stream_window_bytes;
        if !(65_536..=64 * 1024 * 1024).contains(&window) {
            bail!("circuit.stream_window_bytes = {window}: must be 65536 to 67108864");
        }
        if !(1..=1024).contains(&f.circuit.max_streams_per_circuit) {
            bail!("circuit.max_streams_per_circuit must be 1 to 1024");
        }
        if !(1..=300).contains(&f.circuit.build_timeout_secs) {
            bail!("circuit.build_timeout_secs must be 1 to 300");
        }
        if !(1..=300).contains(&f.exit.connect_timeout_secs) {
            bail!("exit.connect_timeout_secs must be 1 to 300");
        }
        let exit_policy =
            ExitPolicy::parse(&f.exit.rules, f.exit.allow_private).context("exit.rules")?;
        let mesh_listen = f
            .mesh
            .listen
            .as_deref()
            .map(|s| parse_addr("mesh.listen", s))
            .transpose()?;
        for (i, b) in f.mesh.bootstrap.iter().enumerate() {
            crate::control::parse_bootstrap(b).with_context(|| format!("mesh.bootstrap[{i}]"))?;
        }
        if !(3..=3600).contains(&f.mesh.advert_ttl_secs) {
            bail!(
                "mesh.advert_ttl_secs = {}: must be 3 to 3600",
                f.mesh.advert_ttl_secs
            );
        }
        let authority = crate::authority::Authority::new(&f.authority.keys, f.authority.threshold)
            .context("authority")?;
        let admin_listen = local_listener("admin", &f.admin)?;
        let mut peers: Vec<Peer> = Vec::new();
        for (i, p) in f.peers.iter().enumerate() {
            let ctx = || format!("peers[{i}]");
            let id = NodeId(
                crate::identity::parse_key_hex(&p.id)
                    .context("id")
                    .with_context(ctx)?,
            );
            let noise_key = crate::identity::parse_key_hex(&p.noise_key)
                .context("noise_key")
                .with_context(ctx)?;
            let addr = p
                .addr
                .as_deref()
                .map(|s| parse_addr("addr", s))
                .transpose()
                .with_context(ctx)?;
            let jurisdiction = parse_jurisdiction(&p.jurisdiction)
                .context("jurisdiction")
                .with_context(ctx)?;
            let proles = parse_roles(&p.roles).context("roles").with_context(ctx)?;
            if (proles.relay || proles.exit) && addr.is_none() {
                bail!("peers[{i}]: addr is required for a peer with the relay or exit role");
            }
            if peers.iter().any(|q| q.id == id || q.noise_key == noise_key) {
                bail!("peers[{i}]: the same id or noise_key appears twice");
            }
            peers.push(Peer {
                id,
                noise_key,
                addr,
                jurisdiction,
                roles: proles,
            });
        }
        let metrics_listen = local_listener("metrics", &f.metrics)?;
        let constraints = |ex: &[String], exit: &[String], avoid: &[String], key: &str| {
            let r = |v: &[String], k: &str| {
                crate::routing::parse_regions(v).with_context(|| format!("{key}.{k}"))
            };
            Ok::<_, anyhow::Error>(ferry_router::Constraints {
                exclude: r(ex, "exclude")?,
                exit_in: r(exit, "exit_in")?,
                avoid_transit: r(avoid, "avoid_transit")?,
                ..Default::default()
            })
        };
        let fr = &f.routing;
        let mut node_constraints =
            constraints(&fr.exclude, &fr.exit_in, &fr.avoid_transit, "routing")?;
        node_constraints.allow_unknown = fr.allow_unknown;
        node_constraints.allow_same_jurisdiction = fr.allow_same_jurisdiction;
        node_constraints.allow_same_family = fr.allow_same_family;
        let mut tenants = std::collections::HashMap::new();
        for (i, t) in f.tenants.iter().enumerate() {
            let key = format!("tenants[{i}]");
            if t.name.is_empty() || t.name.len() > 255 {
                bail!("{key}.name must be 1 to 255 characters (it is a SOCKS5 username)");
            }
            if t.hops.is_some_and(|h| !(1..=8).contains(&h)) {
                bail!("{key}.hops must be 1 to 8");
            }
            let mut c = constraints(&t.exclude, &t.exit_in, &t.avoid_transit, &key)?;
            c.hops = t.hops;
            // Relaxations come from [routing] only.
            c.allow_unknown = fr.allow_unknown;
            c.allow_same_jurisdiction = fr.allow_same_jurisdiction;
            c.allow_same_family = fr.allow_same_family;
            let tenant = crate::routing::Tenant {
                class: t.class.clone(),
                constraints: c,
            };
            if tenants.insert(t.name.clone(), tenant).is_some() {
                bail!("{key}: tenant `{}` appears twice", t.name);
            }
        }
        if !(1..=86_400).contains(&f.drain.grace_secs) {
            bail!("drain.grace_secs must be 1 to 86400");
        }
        if f.drain.margin_secs > 3600 || !(1..=600).contains(&f.drain.migration_secs) {
            bail!("drain.margin_secs must be 0 to 3600 and drain.migration_secs 1 to 600");
        }
        let drain = DrainSettings {
            grace: Duration::from_secs(f.drain.grace_secs),
            margin: Duration::from_secs(f.drain.margin_secs),
            migration: Duration::from_secs(f.drain.migration_secs),
        };
        let routing = crate::routing::Policy {
            node: node_constraints,
            tenants,
            hops: f.circuit.hops,
        };
        Ok(NodeConfig {
            routing,
            drain,
            jurisdiction,
            roles,
            key_dir: f.node.key_dir,
            link_listen,
            link_advertise,
            socks_listen,
            hops: f.circuit.hops,
            stream_window: window,
            max_streams_per_circuit: f.circuit.max_streams_per_circuit,
            build_timeout: Duration::from_secs(f.circuit.build_timeout_secs),
            exit_policy,
            connect_timeout: Duration::from_secs(f.exit.connect_timeout_secs),
            peers,
            data_dir: f.node.data_dir,
            family: f.node.family,
            capacity_mbps: f.node.capacity_mbps,
            mesh_listen,
            bootstrap: f.mesh.bootstrap,
            advert_ttl: Duration::from_secs(f.mesh.advert_ttl_secs),
            authority,
            admin_listen,
            metrics_listen,
        })
    }
}

/// What `ferry init` needs to write a config.
pub struct Template<'a> {
    /// Jurisdiction code.
    pub jurisdiction: &'a str,
    /// Roles.
    pub roles: Roles,
    /// Link listener, if any.
    pub link: Option<SocketAddr>,
    /// SOCKS listener, if any.
    pub socks: Option<SocketAddr>,
    /// Control-plane listener, if any.
    pub mesh: Option<SocketAddr>,
    /// Admin API listener, if any.
    pub admin: Option<SocketAddr>,
    /// Metrics listener.
    pub metrics: Option<SocketAddr>,
    /// Bootstrap addresses.
    pub bootstrap: &'a [String],
    /// Trusted authority keys, hex.
    pub authority_keys: &'a [String],
}

fn roles_toml(r: Roles) -> String {
    let names: Vec<String> = r
        .to_string()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| format!("\"{s}\""))
        .collect();
    format!("[{}]", names.join(", "))
}

/// The `[[peers]]` block describing a node, for other nodes' configs.
pub fn peer_block(
    id: &NodeId,
    noise_public: &[u8; 32],
    addr: Option<SocketAddr>,
    jurisdiction: &str,
    roles: Roles,
) -> String {
    let addr_line = match addr {
        Some(a) => format!("addr = \"{a}\"\n"),
        None => "# no addr: this node accepts no links (entry only)\n".into(),
    };
    format!(
        "[[peers]]\nid = \"{}\"\nnoise_key = \"{}\"\n{addr_line}jurisdiction = \"{jurisdiction}\"\nroles = {}\n",
        hex::encode(id.0),
        hex::encode(noise_public),
        roles_toml(roles)
    )
}

/// The fully commented config file `ferry init` writes.
pub fn render_template(t: &Template<'_>) -> String {
    let link = match t.link {
        Some(a) => format!("link = \"{a}\""),
        None => "# link = \"127.0.0.1:7000\"".into(),
    };
    let socks = match t.socks {
        Some(a) => format!("socks = \"{a}\""),
        None => "# socks = \"127.0.0.1:1080\"".into(),
    };
    let opt = |key: &str, a: Option<SocketAddr>, example: &str| match a {
        Some(a) => format!("{key} = \"{a}\""),
        None => format!("# {key} = \"{example}\""),
    };
    let list = |v: &[String]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mesh = opt("listen", t.mesh, "127.0.0.1:7100");
    let admin = opt("listen", t.admin, "127.0.0.1:7200");
    let metrics = opt("listen", t.metrics, "127.0.0.1:9300");
    let bootstrap = list(t.bootstrap);
    let authority_keys = list(t.authority_keys);
    format!(
        r#"# Ferry node configuration.
#
# Unknown keys are errors. Sizes end in _bytes, durations in _secs.
# Relative paths are relative to this file's folder.

[node]
# Where this node operates: an ISO 3166-1 alpha-2 country code. Rulings that
# block a jurisdiction apply to the nodes that declare it.
jurisdiction = "{jurisdiction}"
# What this node does for the mesh, any of:
#   entry  - listens for SOCKS5 clients on localhost and builds circuits
#   relay  - forwards circuits between other nodes
#   exit   - connects streams to their targets, under the [exit] policy
roles = {roles}
# Folder holding identity.key (Ed25519) and noise.key (X25519), mode 0600.
key_dir = "."
# Folder of the node's RocksDB store: peers, rulings, node and drain state.
data_dir = "data"
# Operator family: path selection keeps two nodes of one family off a circuit.
family = ""
# Capacity advertised to path selection, Mbit/s.
capacity_mbps = 1000

[listen]
# Data-plane link listener (TCP, Noise). Required for the relay and exit roles.
{link}
# The link address other nodes dial, when it is not the listener's own: a
# wildcard listener (0.0.0.0), NAT, or a container (in the image's config:
# "${{FERRY_ADVERTISE_LINK}}"). Required when listen.link is a wildcard.
# advertise_link = "203.0.113.7:7000"
# SOCKS5 entry (RFC 1928, CONNECT). Required for the entry role. It has no
# authentication of its own, so it must be a loopback address unless
# socks_allow_remote = true.
{socks}
socks_allow_remote = false

[mesh]
# Control-plane listener (libp2p over TCP, Noise, Yamux): gossip of signed
# node adverts and rulings, Kademlia discovery. Omit to only dial out.
{mesh}
# Any one reachable node is enough: "IP:port", "host.name:port" (resolved at
# each dial, and dialled again every 2 s while no peer is connected), or a
# libp2p multiaddr. A list, or one comma-separated string.
bootstrap = [{bootstrap}]
# Lifetime of this node's signed advert; it is renewed every third of it. A
# node that vanishes leaves every peer's path selection within this time.
advert_ttl_secs = 30

[authority]
# Public keys (64 hex digits, from `ferry authority keygen`) whose signatures
# make a ruling, a node certificate or a revocation valid. Anything signed
# otherwise is refused and counted. Every node of a gossip mesh needs a
# certificate from this authority in its key dir (`node.cert`, from
# `ferry authority admit` for the `node.request` that `ferry init` wrote);
# peers refuse adverts without one, and take jurisdiction, family, roles and
# capacity ceiling from it. To rotate the authority's keys: add the new key
# here on every node (a rolling restart), cosign the rulings and revocations
# in force with it and publish them again, re-admit nodes with it, then
# remove the old key.
keys = [{authority_keys}]
# Signatures from distinct keys a ruling, certificate or revocation needs
# (k of n).
threshold = 1

[admin]
# Admin HTTP API: GET /v1/status, POST /v1/rulings. Loopback unless
# allow_remote = true.
{admin}
allow_remote = false

[metrics]
# Prometheus metrics: GET /metrics on its own listener. Loopback unless
# allow_remote = true. Omit to serve none.
{metrics}
allow_remote = false

[circuit]
# Nodes on each circuit after the origin; the last one is the exit. 1 to 8.
hops = 3
# Per-stream flow-control window: the most a sender may have unacknowledged.
# The receiving end never buffers more than this per stream. 65536 to 67108864.
stream_window_bytes = 2097152
# Streams that share one circuit before another circuit is built. 1 to 1024.
max_streams_per_circuit = 64
# Time allowed to build a circuit, hop by hop. 1 to 300.
build_timeout_secs = 10

[exit]
# Allow targets in loopback, private (RFC 1918, ULA), link-local, CGNAT,
# multicast and other special ranges. Leave false unless the exit serves a
# private network on purpose.
allow_private = false
# Ordered rules, "allow|deny CIDR[:PORTS]", PORTS as N, N-M or * (the default).
# The first rule matching the target's resolved address wins; no match denies.
rules = ["allow 0.0.0.0/0", "allow ::/0"]
# Time allowed to connect to a target. 1 to 300.
connect_timeout_secs = 10

[routing]
# Constraints on every circuit this entry builds; tenants and per-connection
# options (in the SOCKS5 password, see the README) add to them. Regions are
# ISO 3166-1 alpha-2 codes or blocs: EU, EEA, FIVE_EYES, FOURTEEN_EYES, GCC.
# No hop in these:
exclude = []
# The exit in one of these (empty: anywhere):
exit_in = []
# No relay (non-exit hop) in these:
avoid_transit = []
# Relaxations (off: unknown jurisdictions are never used, and no two hops
# share a jurisdiction or an operator family):
allow_unknown = false
allow_same_jurisdiction = false
allow_same_family = false

[drain]
# SIGTERM drains the node for this long (no new circuits; owners move theirs
# away), then the process exits; a second SIGTERM exits at once. 1 to 86400.
grace_secs = 30
# Entries finish moving circuits off a leaving node this long before its
# exit date. 0 to 3600.
margin_secs = 10
# Time one circuit move is given (build, move streams, retries). 1 to 600.
migration_secs = 5

# Tenants, by SOCKS5 username: a traffic class (rulings can be scoped to
# classes or tenants) and constraints added to [routing].
#
# [[tenants]]
# name = "acme"
# class = "enterprise"
# exclude = ["PK"]
# exit_in = ["CA", "CH"]
# avoid_transit = ["FIVE_EYES"]
# hops = 3

# Known peers. A node accepts links only from Noise keys listed here, and
# builds circuits only through these nodes. `ferry peer-info --config FILE`
# prints a node's block to paste here.
#
# [[peers]]
# id = "<64 hex digits: Ed25519 identity public key>"
# noise_key = "<64 hex digits: X25519 Noise static public key>"
# addr = "127.0.0.1:7001"      # omit for an entry-only client
# jurisdiction = "CH"
# roles = ["relay", "exit"]
"#,
        jurisdiction = t.jurisdiction,
        roles = roles_toml(t.roles),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig> {
        let file: FileConfig = toml::from_str(text).map_err(|e| anyhow!("{e}"))?;
        NodeConfig::try_from(file)
    }

    #[test]
    fn template_parses_and_validates() {
        let t = Template {
            jurisdiction: "DE",
            roles: Roles {
                entry: true,
                relay: true,
                exit: true,
            },
            link: Some("127.0.0.1:7000".parse().unwrap()),
            socks: Some("127.0.0.1:1080".parse().unwrap()),
            mesh: Some("127.0.0.1:7100".parse().unwrap()),
            admin: Some("127.0.0.1:7200".parse().unwrap()),
            metrics: None,
            bootstrap: &["127.0.0.1:7101".to_string()],
            authority_keys: &[],
        };
        let cfg = parse(&render_template(&t)).unwrap();
        assert_eq!(cfg.jurisdiction.as_str(), "DE");
        assert!(cfg.roles.exit && cfg.roles.entry);
        assert_eq!(cfg.hops, 3);
    }

    /// `node/ferry.example.toml` documents every key; it is the template
    /// itself, so the two cannot drift. `FERRY_UPDATE_EXAMPLE=1` rewrites it.
    #[test]
    fn example_file_is_the_template() {
        let t = render_template(&Template {
            jurisdiction: "DE",
            roles: Roles {
                entry: false,
                relay: true,
                exit: true,
            },
            link: Some("127.0.0.1:7000".parse().unwrap()),
            socks: None,
            mesh: Some("127.0.0.1:7100".parse().unwrap()),
            admin: Some("127.0.0.1:7200".parse().unwrap()),
            metrics: None,
            bootstrap: &["127.0.0.1:7101".to_string()],
            authority_keys: &[],
        });
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/ferry.example.toml");
        if std::env::var_os("FERRY_UPDATE_EXAMPLE").is_some() {
            std::fs::write(path, &t).unwrap();
        }
        let on_disk = std::fs::read_to_string(path).unwrap();
        assert_eq!(
            on_disk, t,
            "ferry.example.toml is stale: run with FERRY_UPDATE_EXAMPLE=1"
        );
        parse(&t).unwrap();
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("[node]\njurisdiction = \"DE\"\nroles = [\"relay\"]\ncolour = 1\n[listen]\nlink=\"127.0.0.1:1\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
        let err = parse("[node]\njurisdiction = \"DE\"\nroles = [\"relay\"]\n[listen]\nlink=\"127.0.0.1:1\"\n[exit]\nallow_privat = true\n")
            .unwrap_err();
        assert!(err.to_string().contains("allow_privat"), "{err}");
    }

    #[test]
    fn bad_country_code_is_refused() {
        for bad in ["XX", "DEU", "D", "12", ""] {
            let err = parse_jurisdiction(bad).unwrap_err();
            assert!(err.to_string().contains("ISO 3166-1"), "{bad}: {err}");
        }
        assert_eq!(parse_jurisdiction("pk").unwrap().as_str(), "PK");
        let err = parse("[node]\njurisdiction = \"ZZ\"\nroles = [\"entry\"]\n").unwrap_err();
        assert!(format!("{err:#}").contains("node.jurisdiction"), "{err:#}");
    }

    #[test]
    fn relay_without_link_and_public_socks_are_refused() {
        let err = parse("[node]\njurisdiction = \"DE\"\nroles = [\"relay\"]\n").unwrap_err();
        assert!(err.to_string().contains("listen.link is required"), "{err}");
        let err = parse("[node]\njurisdiction = \"DE\"\nroles = [\"entry\"]\n[listen]\nsocks = \"0.0.0.0:1080\"\n").unwrap_err();
        assert!(err.to_string().contains("socks_allow_remote"), "{err}");
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn interpolation_fills_defaults_and_names_what_is_missing() {
        let e = env(&[("J", "DE"), ("EMPTY", "")]);
        let out = interpolate(
            "a = \"${J}\"\nb = ${N:-3}\nc = \"${EMPTY:-x}\"\n# ${NOPE}\nd = \"$$ $x\"\n",
            &e,
        )
        .unwrap();
        assert_eq!(
            out,
            "a = \"DE\"\nb = 3\nc = \"\"\n# ${NOPE}\nd = \"$ $x\"\n"
        );
        let err = interpolate("a = 1\nb = \"${MISSING}\"\n", &e).unwrap_err();
        assert!(
            err.to_string()
                .contains("line 2: environment variable MISSING is not set"),
            "{err}"
        );
        let err = interpolate("b = \"${OPEN\"\n", &e).unwrap_err();
        assert!(err.to_string().contains("without a closing"), "{err}");
        let err = interpolate("b = \"${1X}\"\n", &e).unwrap_err();
        assert!(
            err.to_string().contains("not an environment variable name"),
            "{err}"
        );
    }

    #[test]
    fn lists_take_a_comma_separated_string() {
        let cfg = parse("[node]\njurisdiction = \"DE\"\nroles = \"relay, exit\"\n[listen]\nlink = \"127.0.0.1:7000\"\n[mesh]\nbootstrap = \"ferry-0.ferry:7100,10.1.2.3:7100,\"\n[exit]\nrules = \"deny 10.0.0.0/8, allow 0.0.0.0/0:443\"\n").unwrap();
        assert!(cfg.roles.relay && cfg.roles.exit && !cfg.roles.entry);
        assert_eq!(cfg.bootstrap, ["ferry-0.ferry:7100", "10.1.2.3:7100"]);
        let err = parse("[node]\njurisdiction = \"DE\"\nroles = 7\n").unwrap_err();
        assert!(err.to_string().contains("comma-separated string"), "{err}");
        let err = parse("[node]\njurisdiction = \"DE\"\nroles = \"entry\"\n[mesh]\nbootstrap = \"bad_name:7100\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("mesh.bootstrap[0]"), "{err:#}");
    }

    #[test]
    fn a_wildcard_link_listener_needs_an_advertised_address() {
        let base = "[node]\njurisdiction = \"DE\"\nroles = [\"relay\"]\n[listen]\nlink = \"0.0.0.0:7000\"\n";
        let err = parse(base).unwrap_err();
        assert!(
            err.to_string().contains("set listen.advertise_link"),
            "{err}"
        );
        let cfg = parse(&format!("{base}advertise_link = \"10.0.0.5:7000\"\n")).unwrap();
        assert_eq!(cfg.link_advertise, Some("10.0.0.5:7000".parse().unwrap()));
        let err = parse(&format!("{base}advertise_link = \"0.0.0.0:7000\"\n")).unwrap_err();
        assert!(err.to_string().contains("not a wildcard"), "{err}");
    }

    /// The image's config (`deploy/docker/ferry.toml`) is valid with only
    /// the required variables set, honours the others, and names a missing
    /// jurisdiction.
    #[test]
    fn the_image_config_builds_from_the_environment() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/docker/ferry.toml"
        ))
        .unwrap();
        let load = |vars: &[(&str, &str)]| {
            let t = interpolate(&text, env(vars))?;
            let file: FileConfig = toml::from_str(&t).map_err(|e| anyhow!("{e}"))?;
            NodeConfig::try_from(file)
        };
        let cfg = load(&[
            ("FERRY_JURISDICTION", "CH"),
            ("FERRY_ADVERTISE_LINK", "172.28.5.11:7000"),
        ])
        .unwrap();
        assert!(cfg.roles.relay && !cfg.roles.exit);
        assert_eq!(cfg.metrics_listen, Some("0.0.0.0:9300".parse().unwrap()));
        assert!(cfg.admin_listen.unwrap().ip().is_loopback());
        assert_eq!(cfg.key_dir, PathBuf::from("/var/lib/ferry"));
        let authority = hex::encode(
            ed25519_dalek::SigningKey::from_bytes(&[7; 32])
                .verifying_key()
                .as_bytes(),
        );
        let cfg = load(&[
            ("FERRY_JURISDICTION", "PK"),
            ("FERRY_ROLES", "entry"),
            ("FERRY_SOCKS", "0.0.0.0:1080"),
            ("FERRY_SOCKS_ALLOW_REMOTE", "true"),
            ("FERRY_BOOTSTRAP", "ch:7100,de:7100"),
            ("FERRY_AUTHORITY_KEYS", &authority),
            ("FERRY_DRAIN_GRACE_SECS", "7"),
        ])
        .unwrap();
        assert!(cfg.roles.entry && !cfg.roles.relay);
        assert_eq!(cfg.bootstrap.len(), 2);
        assert_eq!(cfg.drain.grace, Duration::from_secs(7));
        let err = load(&[]).unwrap_err();
        assert!(
            err.to_string().contains("FERRY_JURISDICTION is not set"),
            "{err}"
        );
        let err = load(&[("FERRY_JURISDICTION", "CH")]).unwrap_err();
        assert!(err.to_string().contains("advertise_link"), "{err}");
    }
}
