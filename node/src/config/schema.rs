//! The config file as written: serde structs with `deny_unknown_fields`, one
//! per section, and their defaults.

use serde::Deserialize;
use std::path::PathBuf;

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
    /// `[limits]`
    #[serde(default)]
    pub limits: FileLimits,
    /// `[audit]`
    #[serde(default)]
    pub audit: FileAudit,
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
    /// Serve clients without a tenant's credentials even when tenants have
    /// passwords.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// The traffic class of anonymous clients.
    #[serde(default)]
    pub anonymous_class: String,
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
    /// Argon2id hash of the tenant's password (PHC string; `ferry tenant
    /// add` prints one).
    pub password_hash: Option<String>,
    /// SHA-256 of the tenant's bearer token (`sha256:` and 64 hex digits;
    /// `ferry tenant add --token` prints one).
    pub token_hash: Option<String>,
    /// Streams open at once, if not `[limits] tenant_streams`.
    pub streams: Option<u32>,
    /// New streams per second, if not `[limits] tenant_streams_per_sec`
    /// (its burst is twice this).
    pub streams_per_sec: Option<u32>,
    /// Bytes per second each way, if not `[limits] tenant_bytes_per_sec`.
    pub bytes_per_sec: Option<u32>,
}

/// `[limits]`: what one client or one tenant of the entry may take (0: no
/// limit). See `limits`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileLimits {
    /// Connections at once on each listener.
    pub connections: u32,
    /// Streams open at once, per client address.
    pub client_streams: u32,
    /// New streams per second, per client address.
    pub client_streams_per_sec: u32,
    /// New streams at once, per client address.
    pub client_burst: u32,
    /// Bytes per second each way, per client address.
    pub client_bytes_per_sec: u32,
    /// Streams open at once, per tenant.
    pub tenant_streams: u32,
    /// New streams per second, per tenant.
    pub tenant_streams_per_sec: u32,
    /// New streams at once, per tenant.
    pub tenant_burst: u32,
    /// Bytes per second each way, per tenant.
    pub tenant_bytes_per_sec: u32,
    /// Links at once.
    pub links: u32,
    /// Inbound link handshakes at once.
    pub link_handshakes: u32,
    /// Circuit sides at once, in all.
    pub circuits: u32,
    /// Circuit sides at once on one link.
    pub circuits_per_link: u32,
    /// Streams at once on one circuit (exit).
    pub streams_per_circuit: u32,
    /// Names resolved at once (exit).
    pub dns_lookups: u32,
    /// Idle circuits close after this many seconds (0: never).
    pub idle_circuit_secs: u32,
    /// MiB of forwarded cells waiting for congested links, in all.
    pub forward_queue_mb: u32,
}

impl Default for FileLimits {
    fn default() -> Self {
        let d = crate::limits::Settings::default();
        let c = crate::limits::Carry::default();
        Self {
            links: c.links,
            link_handshakes: c.link_handshakes,
            circuits: c.circuits,
            circuits_per_link: c.circuits_per_link,
            streams_per_circuit: c.streams_per_circuit,
            dns_lookups: c.dns_lookups,
            idle_circuit_secs: c.idle_circuit_secs,
            forward_queue_mb: c.forward_queue_mb,
            connections: d.connections,
            client_streams: d.client.streams,
            client_streams_per_sec: d.client.streams_per_sec,
            client_burst: d.client.burst,
            client_bytes_per_sec: d.client.bytes_per_sec,
            tenant_streams: d.tenant.streams,
            tenant_streams_per_sec: d.tenant.streams_per_sec,
            tenant_burst: d.tenant.burst,
            tenant_bytes_per_sec: d.tenant.bytes_per_sec,
        }
    }
}

/// `[audit]`: the entry's jurisdiction trail of every stream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileAudit {
    /// Records older than this are deleted.
    pub retention_secs: u64,
    /// Also record each stream's target host and port.
    pub record_targets: bool,
}

impl Default for FileAudit {
    fn default() -> Self {
        Self {
            retention_secs: 90 * 86_400,
            record_targets: false,
        }
    }
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
    /// Links on non-public addresses are fine (a test bed, one site).
    #[serde(default)]
    pub private: bool,
}

impl Default for FileMesh {
    fn default() -> Self {
        Self {
            listen: None,
            bootstrap: Vec::new(),
            advert_ttl_secs: default_advert_ttl(),
            private: false,
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
    /// A file holding the bearer token every admin request but the probes
    /// must carry (`[admin]` only).
    pub token_file: Option<String>,
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
    /// Threads that carry traffic (the async runtime's workers); 0: one
    /// per CPU the process may use.
    #[serde(default)]
    pub threads: u32,
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
    /// HTTP CONNECT entry (entry role).
    pub http: Option<String>,
    /// Allow the HTTP CONNECT entry on a non-loopback address.
    #[serde(default)]
    pub http_allow_remote: bool,
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
    /// Congestion control on the circuits this node ends (as origin or
    /// exit): keep in flight what the path carries, not a whole window.
    #[serde(default = "default_true")]
    pub congestion_control: bool,
}

impl Default for FileCircuit {
    fn default() -> Self {
        Self {
            hops: default_hops(),
            stream_window_bytes: default_window(),
            max_streams_per_circuit: default_streams_per_circuit(),
            build_timeout_secs: default_build_timeout(),
            congestion_control: true,
        }
    }
}

fn default_true() -> bool {
    true
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

#[cfg(test)]
mod tests {
    use crate::config::tests::parse;

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
    fn lists_take_a_comma_separated_string() {
        let cfg = parse("[node]\njurisdiction = \"DE\"\nroles = \"relay, exit\"\n[listen]\nlink = \"127.0.0.1:7000\"\n[mesh]\nbootstrap = \"ferry-0.ferry:7100,10.1.2.3:7100,\"\n[exit]\nrules = \"deny 10.0.0.0/8, allow 0.0.0.0/0:443\"\n").unwrap();
        assert!(cfg.roles.relay && cfg.roles.exit && !cfg.roles.entry);
        assert_eq!(cfg.bootstrap, ["ferry-0.ferry:7100", "10.1.2.3:7100"]);
        let err = parse("[node]\njurisdiction = \"DE\"\nroles = 7\n").unwrap_err();
        assert!(err.to_string().contains("comma-separated string"), "{err}");
        let err = parse("[node]\njurisdiction = \"DE\"\nroles = \"entry\"\n[mesh]\nbootstrap = \"bad_name:7100\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("mesh.bootstrap[0]"), "{err:#}");
    }
}
