//! The fully commented config file `ferry init` writes, which is also
//! `node/ferry.example.toml`, and the `[[peers]]` block of a node.

use ferry_router::{NodeId, Roles};
use std::net::SocketAddr;

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
    /// HTTP CONNECT listen address (entry role).
    pub http: Option<SocketAddr>,
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
    let http = match t.http {
        Some(a) => format!("http = \"{a}\""),
        None => "# http = \"127.0.0.1:3128\"".into(),
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
    // A node made to link on a loopback or private address is in a
    // private mesh (a test bed, one site).
    let private = t
        .link
        .is_some_and(|a| crate::policy::non_public(a.ip()).is_some());
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
# Threads that carry traffic (the async runtime's workers); 0 is one per CPU
# this process may use (or TOKIO_WORKER_THREADS, if set). On a machine
# shared with other busy processes, fewer threads than CPUs wait less for a
# CPU: one thread a node carried more on two cores shared by five nodes,
# with round trips no faster (benches/README.md). Read at start only.
threads = 0

[listen]
# Data-plane link listener (TCP, Noise). Required for the relay and exit roles.
{link}
# The link address other nodes dial, when it is not the listener's own: a
# wildcard listener (0.0.0.0), NAT, or a container (in the image's config:
# "${{FERRY_ADVERTISE_LINK}}"). Required when listen.link is a wildcard.
# advertise_link = "203.0.113.7:7000"
# SOCKS5 entry (RFC 1928, CONNECT). Required for the entry role. It serves
# anyone who reaches it unless [[tenants]] have passwords, so it must be a
# loopback address unless socks_allow_remote = true.
{socks}
socks_allow_remote = false
# HTTP CONNECT entry (RFC 9110; tunnels only), for clients that speak HTTP
# proxies: curl -p -x http://127.0.0.1:3128, git's http.proxy, browsers.
# Tenants authenticate with Proxy-Authorization: Basic; options come in a
# Ferry-Options header. Loopback unless http_allow_remote = true.
{http}
http_allow_remote = false

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
# A private mesh, whose nodes link over loopback, private, link-local or
# other non-public addresses (a test bed, one site, a Docker or Kubernetes
# network). Off, a relay extends circuits only to nodes whose link address
# is public, so that no origin can make it connect into its own network
# through an advert naming such an address.
private = {private}

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
# A file holding a bearer token (at least 16 characters: `openssl rand -hex
# 32`) that every request but /livez and /readyz must carry; ferry status,
# drain and policy publish send it with --admin-token-file (or
# FERRY_ADMIN_TOKEN_FILE). Set it wherever other local users, or web pages
# in a desktop user's browser, could reach the listener.
# token_file = "/etc/ferry/admin.token"

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
# Streams that share one circuit before another circuit is built. 1 to 512.
max_streams_per_circuit = 64
# Time allowed to build a circuit, hop by hop. 1 to 300.
build_timeout_secs = 10
# Congestion control on the circuits this node ends: each end times probes
# through the circuit and keeps in flight what the path carries plus a small
# queue, instead of every stream's whole window, so a bulk stream does not
# stand in line ahead of everything else on its links. Used with peers that
# take it; off, this node neither probes nor offers to.
congestion_control = true

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
# Clients without a tenant's credentials (SOCKS5 username empty or `-`).
# Served by default while no tenant has a password; once one has, only if
# allow_anonymous = true, with this traffic class:
allow_anonymous = false
anonymous_class = ""

[limits]
# What one client or tenant of this entry may take, so one that misbehaves
# cannot starve the others (0: no limit). A client is an IPv4 address or an
# IPv6 /64; anonymous clients count as one tenant. SIGHUP reloads these
# (connections needs a restart).
# Connections at once on each listener (socks, http); more are closed.
connections = 4096
# Per client: streams open at once (more are closed at once), new streams
# per second and at once (more are refused: SOCKS 0x02, HTTP 429), and
# bytes per second each way (paced, not refused).
client_streams = 512
client_streams_per_sec = 100
client_burst = 300
client_bytes_per_sec = 0
# Per tenant, unless its [[tenants]] entry sets streams, streams_per_sec or
# bytes_per_sec:
tenant_streams = 2048
tenant_streams_per_sec = 1000
tenant_burst = 2000
tenant_bytes_per_sec = 0
# What this node takes on for others as a relay and exit (a restart changes
# these; refusals are counted as capacity). Links at once, and inbound link
# handshakes at once (each may take up to 10 s):
links = 2048
link_handshakes = 64
# Circuit sides held at once, in all and on one link (a relay holds two
# per circuit): one neighbour cannot take them all.
circuits = 20000
circuits_per_link = 4096
# Streams at once on one circuit, at the exit, and names the exit resolves
# at once (a BEGIN past either ends with capacity).
streams_per_circuit = 512
dns_lookups = 64
# Circuits with no cell either way for this long are closed, at relays,
# exits and the entry's pool (0: never).
idle_circuit_secs = 600
# MiB of forwarded cells that may wait for congested links, in all: cells
# wait with their circuit (circuits take turns), and a circuit whose cell
# finds this full (or its own 64 MiB, or its link's quarter) is destroyed.
forward_queue_mb = 512

[drain]
# SIGTERM drains the node for this long (no new circuits; owners move theirs
# away), then the process exits; a second SIGTERM exits at once. 1 to 86400.
grace_secs = 30
# Entries finish moving circuits off a leaving node this long before its
# exit date. 0 to 3600.
margin_secs = 10
# Time one circuit move is given (build, move streams, retries). 1 to 600.
migration_secs = 5

[audit]
# An entry records every stream it carries: tenant, class, start and end,
# bytes each way, how it ended, and each circuit it used (every hop's node
# id and jurisdiction) and each move, with time and reason (`ferry audit
# export`, `GET /v1/audit`). Kept in the node's store this long, in
# seconds (60 to 315360000; 7776000 is 90 days).
retention_secs = 7776000
# Also record each stream's target host and port (off: the trail says
# where traffic went through, not where it went).
record_targets = false

# Tenants, by SOCKS5 username: a traffic class (rulings can be scoped to
# classes or tenants; a connection cannot change it) and constraints added
# to [routing]. With password_hash (an Argon2id PHC string: `ferry tenant
# add NAME --class CLASS` prints the block), the SOCKS5 password is the
# tenant's password, then optionally `|` and the connection's options
# (`s3cret|exclude=PK`); an unknown username is refused. With token_hash
# (`ferry tenant add NAME --token` makes a token and prints the block), an
# HTTP client sends `Proxy-Authorization: Bearer TOKEN`, and a SOCKS5 client
# the name and the token as its password.
#
# [[tenants]]
# name = "acme"
# class = "enterprise"
# exclude = ["PK"]
# exit_in = ["CA", "CH"]
# avoid_transit = ["FIVE_EYES"]
# hops = 3
# password_hash = "$argon2id$v=19$m=19456,t=2,p=1$..."
# token_hash = "sha256:<64 hex digits>"
# streams = 2048              # its own limits, if not [limits] tenant_*
# streams_per_sec = 1000      # its burst is twice this
# bytes_per_sec = 0

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
    use crate::config::tests::parse;

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
            http: None,
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
            http: None,
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
}
