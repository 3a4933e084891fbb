//! The validated runtime config, [`NodeConfig`], built from the file schema
//! with `TryFrom`; its errors name the key.

use super::env::interpolate;
use super::schema::{FileAdmin, FileConfig};
use crate::policy::ExitPolicy;
use anyhow::{Context, Result, anyhow, bail};
use ferry_router::{Jurisdiction, NodeId, Roles};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// The jurisdiction trail's settings (`[audit]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditSettings {
    /// Records older than this are deleted.
    pub retention: Duration,
    /// Records name each stream's target.
    pub record_targets: bool,
}

pub use crate::directory::Peer;

/// The most worker threads a node may ask for (`node.threads`): far more
/// than any machine's CPUs, and each thread takes a stack.
pub const MAX_THREADS: u32 = 1024;

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
    /// HTTP CONNECT entry (entry role).
    pub http_listen: Option<SocketAddr>,
    /// Hops per circuit.
    pub hops: usize,
    /// Per-stream window.
    pub stream_window: u32,
    /// Congestion control on circuits this node ends.
    pub congestion_control: bool,
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
    /// The async runtime's worker threads (`None`: one per CPU).
    pub threads: Option<usize>,
    /// Control-plane listener.
    pub mesh_listen: Option<SocketAddr>,
    /// Bootstrap addresses.
    pub bootstrap: Vec<String>,
    /// Advert lifetime.
    pub advert_ttl: Duration,
    /// A private mesh: relays extend to nodes on non-public addresses.
    pub mesh_private: bool,
    /// Trusted authority keys.
    pub authority: crate::authority::Authority,
    /// Routing constraints and tenants (entries).
    pub routing: crate::routing::Policy,
    /// What one client or tenant of the entry may take.
    pub limits: crate::limits::Settings,
    /// What the node takes on for others (relay, exit).
    pub carry: crate::limits::Carry,
    /// Drain timing.
    pub drain: DrainSettings,
    /// `[audit]`: how long the trail is kept, and whether it names targets.
    pub audit: AuditSettings,
    /// Admin API listener.
    pub admin_listen: Option<SocketAddr>,
    /// The digest of the admin API's bearer token (`[admin] token_file`).
    pub admin_token: Option<[u8; 32]>,
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

/// Validates an ISO 3166-1 alpha-2 code (any case) and upper-cases it.
pub fn parse_jurisdiction(s: &str) -> Result<Jurisdiction> {
    Ok(Jurisdiction::parse(s)?)
}

/// Parses role names (the router's [`Roles::parse`]).
pub fn parse_roles<S: AsRef<str>>(names: &[S]) -> Result<Roles> {
    Ok(Roles::parse(names)?)
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

/// The digest of the admin token in `path` (surrounding white space
/// trimmed; at least [`MIN_ADMIN_TOKEN`] characters).
fn read_admin_token(path: &str) -> Result<[u8; 32]> {
    use std::io::Read;
    let mut t = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(4096).read_to_string(&mut t))
        .with_context(|| format!("admin.token_file = `{path}`: cannot read it"))?;
    let t = t.trim();
    if t.len() < MIN_ADMIN_TOKEN || t.contains(char::is_whitespace) {
        bail!(
            "admin.token_file = `{path}`: the token must be at least {MIN_ADMIN_TOKEN} characters with no white space (for example `openssl rand -hex 32 > {path}`)"
        );
    }
    Ok(crate::auth::token_digest(t))
}

/// The shortest admin token taken.
pub const MIN_ADMIN_TOKEN: usize = 16;

fn parse_addr(key: &str, s: &str) -> Result<SocketAddr> {
    s.parse()
        .map_err(|e| anyhow!("{key} = `{s}`: not an IP:port address ({e})"))
}

impl TryFrom<FileConfig> for NodeConfig {
    type Error = anyhow::Error;

    fn try_from(f: FileConfig) -> Result<Self> {
        let jurisdiction = parse_jurisdiction(&f.node.jurisdiction).context("node.jurisdiction")?;
        if f.node.threads > MAX_THREADS {
            bail!(
                "node.threads = {}: at most {MAX_THREADS} (0 is one per CPU)",
                f.node.threads
            );
        }
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
        let http_listen = f
            .listen
            .http
            .as_deref()
            .map(|s| parse_addr("listen.http", s))
            .transpose()?;
        if let Some(s) = http_listen
            && !s.ip().is_loopback()
            && !f.listen.http_allow_remote
        {
            bail!(
                "listen.http = `{s}` is not a loopback address; set listen.http_allow_remote = true \
                 to expose the HTTP CONNECT entry on purpose"
            );
        }
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
        if !(1..=ferry_circuit::MAX_HOPS).contains(&f.circuit.hops) {
            bail!(
                "circuit.hops = {}: must be 1 to {}",
                f.circuit.hops,
                ferry_circuit::MAX_HOPS
            );
        }
        let window = f.circuit.stream_window_bytes;
        if !(65_536..=64 * 1024 * 1024).contains(&window) {
            bail!("circuit.stream_window_bytes = {window}: must be 65536 to 67108864");
        }
        if !(1..=512).contains(&f.circuit.max_streams_per_circuit) {
            bail!(
                "circuit.max_streams_per_circuit must be 1 to 512 (exits take 512 by default: [limits] streams_per_circuit)"
            );
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
            super::parse_bootstrap(b).with_context(|| format!("mesh.bootstrap[{i}]"))?;
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
        if f.metrics.token_file.is_some() {
            bail!("metrics.token_file: only [admin] takes a token file");
        }
        let admin_token = f
            .admin
            .token_file
            .as_deref()
            .map(read_admin_token)
            .transpose()?;
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
        let fl = &f.limits;
        if fl.connections == 0 {
            bail!("limits.connections must be at least 1");
        }
        for (k, v) in [
            ("links", fl.links),
            ("link_handshakes", fl.link_handshakes),
            ("circuits", fl.circuits),
            ("circuits_per_link", fl.circuits_per_link),
            ("streams_per_circuit", fl.streams_per_circuit),
            ("dns_lookups", fl.dns_lookups),
            ("forward_queue_mb", fl.forward_queue_mb),
        ] {
            if !(1..=1_000_000).contains(&v) {
                bail!("limits.{k} = {v}: must be 1 to 1000000");
            }
        }
        let carry = crate::limits::Carry {
            links: fl.links,
            link_handshakes: fl.link_handshakes,
            circuits: fl.circuits,
            circuits_per_link: fl.circuits_per_link,
            streams_per_circuit: fl.streams_per_circuit,
            dns_lookups: fl.dns_lookups,
            idle_circuit_secs: fl.idle_circuit_secs,
            forward_queue_mb: fl.forward_queue_mb,
        };
        for (k, v) in [
            ("client_streams_per_sec", fl.client_streams_per_sec),
            ("client_burst", fl.client_burst),
            ("tenant_streams_per_sec", fl.tenant_streams_per_sec),
            ("tenant_burst", fl.tenant_burst),
        ] {
            if v > crate::limits::MAX_RATE {
                bail!("limits.{k} must be at most {}", crate::limits::MAX_RATE);
            }
        }
        let mut limits = crate::limits::Settings {
            connections: fl.connections,
            client: crate::limits::Share {
                streams: fl.client_streams,
                streams_per_sec: fl.client_streams_per_sec,
                burst: fl.client_burst,
                bytes_per_sec: fl.client_bytes_per_sec,
            },
            tenant: crate::limits::Share {
                streams: fl.tenant_streams,
                streams_per_sec: fl.tenant_streams_per_sec,
                burst: fl.tenant_burst,
                bytes_per_sec: fl.tenant_bytes_per_sec,
            },
            tenants: std::collections::HashMap::new(),
        };
        let mut tenants = std::collections::HashMap::new();
        let mut tokens = std::collections::HashSet::new();
        for (i, t) in f.tenants.iter().enumerate() {
            let key = format!("tenants[{i}]");
            if t.name.is_empty() || t.name.len() > 255 {
                bail!("{key}.name must be 1 to 255 characters (it is a SOCKS5 username)");
            }
            if t.hops
                .is_some_and(|h| !(1..=ferry_circuit::MAX_HOPS).contains(&h))
            {
                bail!("{key}.hops must be 1 to {}", ferry_circuit::MAX_HOPS);
            }
            let mut c = constraints(&t.exclude, &t.exit_in, &t.avoid_transit, &key)?;
            c.hops = t.hops;
            // Relaxations come from [routing] only.
            c.allow_unknown = fr.allow_unknown;
            c.allow_same_jurisdiction = fr.allow_same_jurisdiction;
            c.allow_same_family = fr.allow_same_family;
            if t.name == "-" || t.name.contains(':') {
                bail!(
                    "{key}.name `{}`: `-` means no tenant, and `:` cannot be sent in HTTP Basic credentials",
                    t.name
                );
            }
            if let Some(h) = &t.password_hash {
                crate::auth::check_hash(h).with_context(|| format!("{key}.password_hash"))?;
            }
            let token_hash = t
                .token_hash
                .as_deref()
                .map(crate::auth::parse_token_hash)
                .transpose()
                .with_context(|| format!("{key}.token_hash"))?;
            if let Some(h) = token_hash
                && !tokens.insert(h)
            {
                bail!("{key}.token_hash: another tenant has the same token");
            }
            if t.streams_per_sec
                .is_some_and(|r| r > crate::limits::MAX_RATE)
            {
                bail!(
                    "{key}.streams_per_sec must be at most {}",
                    crate::limits::MAX_RATE
                );
            }
            if t.streams.is_some() || t.streams_per_sec.is_some() || t.bytes_per_sec.is_some() {
                let d = limits.tenant;
                let rate = t.streams_per_sec.unwrap_or(d.streams_per_sec);
                let share = crate::limits::Share {
                    streams: t.streams.unwrap_or(d.streams),
                    streams_per_sec: rate,
                    burst: if t.streams_per_sec.is_some() {
                        rate.saturating_mul(2)
                    } else {
                        d.burst
                    },
                    bytes_per_sec: t.bytes_per_sec.unwrap_or(d.bytes_per_sec),
                };
                limits.tenants.insert(t.name.clone(), share);
            }
            let tenant = crate::routing::Tenant {
                class: t.class.clone(),
                constraints: c,
                password_hash: t.password_hash.clone(),
                token_hash,
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
        if !(60..=10 * 365 * 86_400).contains(&f.audit.retention_secs) {
            bail!("audit.retention_secs must be 60 (a minute) to 315360000 (ten years)");
        }
        let audit = AuditSettings {
            retention: Duration::from_secs(f.audit.retention_secs),
            record_targets: f.audit.record_targets,
        };
        if fr.anonymous_class.len() > 64 {
            bail!("routing.anonymous_class must be at most 64 characters");
        }
        // Entries whose tenants have passwords serve only them, unless
        // anonymous clients are allowed in so many words.
        let passwords = tenants.values().any(|t| t.has_credentials());
        if passwords && let Some(open) = tenants.iter().find(|(_, t)| !t.has_credentials()) {
            bail!(
                "tenant `{}` has neither password_hash nor token_hash while others have one: an \
                 entry that requires credentials cannot serve a tenant by name alone (ferry \
                 tenant add prints one)",
                open.0
            );
        }
        let routing = crate::routing::Policy {
            node: node_constraints,
            tenants,
            hops: f.circuit.hops,
            anonymous: (!passwords || fr.allow_anonymous).then(|| fr.anonymous_class.clone()),
        };
        Ok(NodeConfig {
            routing,
            limits,
            carry,
            drain,
            audit,
            jurisdiction,
            roles,
            key_dir: f.node.key_dir,
            link_listen,
            link_advertise,
            socks_listen,
            http_listen,
            hops: f.circuit.hops,
            stream_window: window,
            congestion_control: f.circuit.congestion_control,
            max_streams_per_circuit: f.circuit.max_streams_per_circuit,
            build_timeout: Duration::from_secs(f.circuit.build_timeout_secs),
            exit_policy,
            connect_timeout: Duration::from_secs(f.exit.connect_timeout_secs),
            peers,
            data_dir: f.node.data_dir,
            family: f.node.family,
            capacity_mbps: f.node.capacity_mbps,
            threads: (f.node.threads > 0).then_some(f.node.threads as usize),
            mesh_listen,
            bootstrap: f.mesh.bootstrap,
            advert_ttl: Duration::from_secs(f.mesh.advert_ttl_secs),
            mesh_private: f.mesh.private,
            authority,
            admin_listen,
            admin_token,
            metrics_listen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse;

    /// Tenants' names and credentials are checked: `-` and `:` are refused,
    /// a hash must be Argon2id, and an entry that requires credentials
    /// cannot also serve a tenant without a password.
    #[test]
    fn tenant_credentials_are_validated() {
        let hash = crate::auth::hash_password("pw").unwrap();
        let entry = "[node]\njurisdiction = \"DE\"\nroles = [\"entry\"]\n";
        let with = |tenants: &str| parse(&format!("{entry}{tenants}"));
        let err = |tenants: &str| format!("{:#}", with(tenants).unwrap_err());
        assert!(err("[[tenants]]\nname = \"-\"\n").contains("`-` means no tenant"));
        assert!(err("[[tenants]]\nname = \"a:b\"\n").contains("HTTP Basic"));
        assert!(
            err("[[tenants]]\nname = \"a\"\npassword_hash = \"x\"\n")
                .contains("tenants[0].password_hash")
        );
        let mixed = format!(
            "[[tenants]]\nname = \"a\"\npassword_hash = \"{hash}\"\n[[tenants]]\nname = \"b\"\n"
        );
        assert!(
            err(&mixed).contains("tenant `b` has neither password_hash nor token_hash"),
            "{}",
            err(&mixed)
        );
        assert!(
            err("[[tenants]]\nname = \"a\"\ntoken_hash = \"md5:00\"\n")
                .contains("tenants[0].token_hash")
        );
        // Argon2 parameters above what a login may cost are refused.
        let heavy = "$argon2id$v=19$m=1048576,t=2,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let e = err(&format!(
            "[[tenants]]\nname = \"a\"\npassword_hash = \"{heavy}\"\n"
        ));
        assert!(e.contains("above m=65536"), "{e}");
        let (_, token_hash) = crate::auth::new_token();
        let tokens = with(&format!(
            "[[tenants]]\nname = \"a\"\npassword_hash = \"{hash}\"\n[[tenants]]\nname = \"bot\"\ntoken_hash = \"{token_hash}\"\nstreams = 5\nbytes_per_sec = 1000\n"
        ))
        .unwrap();
        assert!(tokens.routing.tenants["bot"].token_hash.is_some());
        let twice = format!(
            "[[tenants]]\nname = \"a\"\ntoken_hash = \"{token_hash}\"\n[[tenants]]\nname = \"b\"\ntoken_hash = \"{token_hash}\"\n"
        );
        assert!(err(&twice).contains("the same token"), "{}", err(&twice));
        let bot = tokens.limits.tenants["bot"];
        assert_eq!((bot.streams, bot.bytes_per_sec), (5, 1000));
        assert_eq!(bot.streams_per_sec, tokens.limits.tenant.streams_per_sec);
        assert!(
            !tokens.limits.tenants.contains_key("a"),
            "a has no limits of its own"
        );
        assert!(err("[limits]\nconnections = 0\n").contains("limits.connections"));
        assert!(err("[limits]\nclient_burst = 2000000\n").contains("limits.client_burst"));
        assert!(err("[limits]\nclients = 1\n").contains("unknown field"));
        let ok = with(&format!(
            "[[tenants]]\nname = \"a\"\npassword_hash = \"{hash}\"\n"
        ))
        .unwrap();
        assert!(ok.routing.anonymous.is_none(), "credentials required");
        let open = with(&format!(
            "[routing]\nallow_anonymous = true\nanonymous_class = \"guest\"\n[[tenants]]\nname = \"a\"\npassword_hash = \"{hash}\"\n"
        ))
        .unwrap();
        assert_eq!(open.routing.anonymous.as_deref(), Some("guest"));
    }

    #[test]
    fn threads_default_to_one_per_cpu_and_are_bounded() {
        let base = "[node]\njurisdiction = \"DE\"\nroles = [\"entry\"]\n";
        assert_eq!(parse(base).unwrap().threads, None);
        assert_eq!(
            parse(&format!("{base}threads = 0\n")).unwrap().threads,
            None
        );
        assert_eq!(
            parse(&format!("{base}threads = 1\n")).unwrap().threads,
            Some(1)
        );
        let err = parse(&format!("{base}threads = 5000\n")).unwrap_err();
        assert!(
            format!("{err:#}").contains("node.threads = 5000: at most 1024"),
            "{err:#}"
        );
        // TOML's own error, at the line that holds the key.
        let err = parse(&format!("{base}threads = -1\n")).unwrap_err();
        assert!(format!("{err:#}").contains("threads = -1"), "{err:#}");
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
}
