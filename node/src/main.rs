//! `ferry`: the Ferry node and its tools.

mod admin_client;
mod admission_cli;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use ferry_node::authority::{RulingFile, SignedFile, now_ms, sign};
use ferry_node::config::{self, NodeConfig, Template};
use ferry_node::identity::{Keys, parse_key_hex};
use ferry_node::node::{self, Listeners};
use ferry_proto::pb;
use prost::Message;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    args_override_self = true,
    about = "Ferry: a relay mesh for end-to-end encrypted traffic that leaves a jurisdiction cleanly."
)]
struct Cli {
    /// Log format on standard error: text, or json (one object a line,
    /// with the link, circuit and stream spans around each event).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "FERRY_LOG_FORMAT"
    )]
    log_format: LogFormat,
    /// Log filter (tracing's env-filter syntax); RUST_LOG overrides it.
    /// Payload, keys and client addresses appear only at debug.
    #[arg(long, global = true, default_value = "info", env = "FERRY_LOG")]
    log: String,
    /// A file holding the admin API's bearer token ([admin] token_file),
    /// sent by the commands that call a node's admin API.
    #[arg(long, global = true, env = "FERRY_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a local mesh of 6 nodes in 6 jurisdictions with a SOCKS5 and an
    /// HTTP CONNECT entry, until Ctrl-C.
    Demo {
        /// Address of the demo's SOCKS5 entry.
        #[arg(long, default_value = "127.0.0.1:1080")]
        socks: SocketAddr,
        /// Address of the demo's HTTP CONNECT entry.
        #[arg(long, default_value = "127.0.0.1:3128")]
        http: SocketAddr,
        #[command(subcommand)]
        cmd: Option<DemoCmd>,
    },
    /// Create a node: its keys (mode 0600) and a fully commented config file.
    Init {
        /// Folder for the node's keys, store and ferry.toml (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Where the node operates: ISO 3166-1 alpha-2 code (DE, CH, CA, ...).
        #[arg(long)]
        jurisdiction: String,
        /// Comma-separated roles: entry, relay, exit.
        #[arg(long, default_value = "relay")]
        roles: String,
        /// Data-plane link listen address (relay and exit roles).
        #[arg(long, default_value = "127.0.0.1:7000")]
        listen: SocketAddr,
        /// SOCKS5 listen address (entry role).
        #[arg(long, default_value = "127.0.0.1:1080")]
        socks: SocketAddr,
        /// HTTP CONNECT listen address (entry role), for example
        /// 127.0.0.1:3128; none if omitted.
        #[arg(long)]
        http: Option<SocketAddr>,
        /// Control-plane (libp2p) listen address.
        #[arg(long, default_value = "127.0.0.1:7100")]
        mesh: SocketAddr,
        /// Admin API listen address.
        #[arg(long, default_value = "127.0.0.1:7200")]
        admin: SocketAddr,
        /// Prometheus metrics listen address (GET /metrics); none if omitted.
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// A node to join the mesh through (IP:port or host.name:port of its mesh listener); repeatable.
        #[arg(long)]
        bootstrap: Vec<String>,
        /// A trusted authority public key (hex, or a .pub file); repeatable.
        #[arg(long = "authority-key")]
        authority_keys: Vec<String>,
    },
    /// Write (or rewrite) a node's admission request for the mesh's
    /// authority: node id, Noise key, proposed jurisdiction, family, roles.
    Request {
        /// The node's ferry.toml.
        #[arg(long)]
        config: PathBuf,
        /// Create the node's keys in its key_dir if neither key file exists.
        #[arg(long)]
        create_keys: bool,
        /// How the authority reaches the operator (free text).
        #[arg(long, default_value = "")]
        contact: String,
        /// Where to write it (default: node.request in the key dir).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The node's keys.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// How N freshly picked paths would spread over the mesh (an entry's
    /// admin API): each node's share, capacity and jurisdiction.
    Paths {
        /// The entry's admin address.
        #[arg(long, default_value = "127.0.0.1:7200")]
        admin: SocketAddr,
        /// How many paths to pick.
        #[arg(long, default_value_t = 1000)]
        n: usize,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a node from its config file, until SIGINT or SIGTERM.
    Node {
        /// The node's ferry.toml.
        #[arg(long)]
        config: PathBuf,
        /// Create the node's keys in its key_dir if neither key file exists
        /// (a container's first start on an empty volume).
        #[arg(long)]
        create_keys: bool,
        /// Test clusters only: an authority PRIVATE key file. The node
        /// trusts its public half too, and without a valid certificate
        /// admits itself (its configured jurisdiction, roles, family and
        /// capacity, for 30 days). Production nodes are admitted with
        /// `ferry authority admit`, the key kept offline.
        #[arg(long, value_name = "FILE")]
        admit_with: Option<PathBuf>,
    },
    /// Run a local SOCKS5 entry into the mesh (no link listener), until SIGINT or SIGTERM.
    Connect {
        /// The client's ferry.toml (from `ferry init --roles entry`).
        #[arg(long)]
        config: PathBuf,
        /// SOCKS5 listen address; overrides listen.socks.
        #[arg(long)]
        socks: Option<SocketAddr>,
        /// Test clusters only: as for `ferry node`.
        #[arg(long, value_name = "FILE")]
        admit_with: Option<PathBuf>,
    },
    /// Print this node's [[peers]] block, for a static mesh without gossip.
    PeerInfo {
        /// The node's ferry.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Show a running node's status through its admin API.
    Status {
        /// The node's admin address.
        #[arg(long, default_value = "127.0.0.1:7200")]
        admin: SocketAddr,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// Refresh in place every EVERY (2s if not given) until Ctrl-C;
        /// with --json, one line of JSON a refresh.
        #[arg(long, value_name = "EVERY", num_args = 0..=1, default_missing_value = "2s",
              value_parser = parse_watch)]
        watch: Option<Duration>,
    },
    /// Drain a running node: it takes no new circuits, its circuits move
    /// away, and at the exit date it carries nothing. Persisted: a restart
    /// keeps draining. `--cancel` makes it active again.
    Drain {
        /// The node's admin address.
        #[arg(long, default_value = "127.0.0.1:7200")]
        admin: SocketAddr,
        /// The exit date, RFC 3339 (2026-12-01T00:00:00Z).
        #[arg(long, conflicts_with_all = ["within", "cancel"], required_unless_present_any = ["within", "cancel"])]
        exit_by: Option<String>,
        /// The exit date as a time from now (90s, 10m, 2h).
        #[arg(long = "in", value_parser = humantime::parse_duration, conflicts_with = "cancel")]
        within: Option<Duration>,
        /// Why (shown in status and logs).
        #[arg(long, default_value = "")]
        reason: String,
        /// Cancel the operator's drain.
        #[arg(long)]
        cancel: bool,
        /// Do not keep the drain across a restart (for a container's
        /// pre-stop hook: the restarted node comes back active).
        #[arg(long, conflicts_with = "cancel")]
        transient: bool,
        /// Wait until the node carries nothing (or its exit date passes),
        /// printing progress; exit 0 once it is empty, 1 if the date passed first.
        #[arg(long, conflicts_with = "cancel")]
        wait: bool,
    },
    /// Check a running node for a container health check: exit 0 if it is
    /// alive (or, with --ready, active and taking circuits), else 1 with why.
    Healthcheck {
        /// The node's admin address.
        #[arg(long, default_value = "127.0.0.1:7200")]
        admin: SocketAddr,
        /// Require readiness (/readyz: not draining or exited), not only liveness.
        #[arg(long)]
        ready: bool,
    },
    /// Authority keys, which sign jurisdiction rulings.
    Authority {
        #[command(subcommand)]
        cmd: AuthorityCmd,
    },
    /// Jurisdiction rulings: sign and publish.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Entry tenants: credentials and scope.
    Tenant {
        #[command(subcommand)]
        cmd: TenantCmd,
    },
    /// The jurisdiction trail an entry keeps of every stream.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Every stream that ended since a date: tenant, class, times, bytes,
    /// how it ended, and each circuit it used (every hop's node and
    /// jurisdiction) with each move.
    Export {
        /// The entry's admin address.
        #[arg(long, default_value = "127.0.0.1:7200")]
        admin: SocketAddr,
        /// Streams that ended at or after this time (RFC 3339).
        #[arg(long)]
        since: String,
        /// Only this tenant's streams.
        #[arg(long)]
        tenant: Option<String>,
        /// One JSON record a line, or CSV (a row a stream, its circuits in
        /// one column).
        #[arg(long, value_enum, default_value = "jsonl")]
        format: admin_client::AuditFormat,
    },
    /// A ruling's exit report from the entry's trail: every session of its
    /// scope that crossed its region, before it was blocked, while it
    /// drained and after its exit date (which must be none), with the
    /// moves made and the sessions closed; signed by the entry.
    Report {
        /// The entry's admin address.
        #[arg(long, default_value = "127.0.0.1:7200")]
        admin: SocketAddr,
        /// The ruling's id.
        #[arg(long)]
        ruling: String,
        /// Where to write the signed report (JSON); standard output if not
        /// given.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Checks a signed exit report: exits non-zero if it was changed or
    /// is not signed by the node it names (or by --node).
    Verify {
        /// The report file.
        report: PathBuf,
        /// The node that must have signed it (64 hex digits).
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(Subcommand)]
enum TenantCmd {
    /// Print a `[[tenants]]` block with an Argon2id hash of the tenant's
    /// password, to paste into an entry's ferry.toml. The password is read
    /// from a prompt (on a terminal) or from the first line of stdin. With
    /// --token, a new bearer token is made instead: it is printed once, on
    /// stderr, and the block holds only its SHA-256.
    Add {
        /// The tenant's name (its SOCKS5 username).
        name: String,
        /// Its traffic class (rulings may be scoped to classes).
        #[arg(long, default_value = "")]
        class: String,
        /// No hop in these regions (comma-separated codes or blocs).
        #[arg(long, default_value = "")]
        exclude: String,
        /// The exit in one of these.
        #[arg(long, default_value = "")]
        exit_in: String,
        /// Hops after the entry, if not the entry's own.
        #[arg(long)]
        hops: Option<usize>,
        /// Make a bearer token (HTTP `Proxy-Authorization: Bearer`, or the
        /// SOCKS5 password) instead of reading a password.
        #[arg(long)]
        token: bool,
    },
}

#[derive(Subcommand)]
enum DemoCmd {
    /// Apply a ruling to the running demo (signed with the demo's authority key).
    Ruling {
        /// block or lift.
        #[arg(value_parser = ["block", "lift"])]
        action: String,
        /// Country code or bloc (PK, GCC, ...).
        region: String,
        /// Blocked from this long from now.
        #[arg(long = "in", default_value = "20s", value_parser = humantime::parse_duration)]
        start: Duration,
        /// Exit date: this long after the block starts.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        exit_in: Duration,
        /// Only this traffic class (repeatable); default all traffic.
        #[arg(long)]
        class: Vec<String>,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Switch a running node to a new Noise key. Links and circuits made on
    /// the old key carry on; new ones use the new key; the old key still
    /// answers handshakes for the grace, then is erased.
    RotateNoise {
        /// The node's admin address.
        #[arg(long, default_value = "127.0.0.1:7200")]
        admin: SocketAddr,
        /// How long the old key is still accepted (peers learn the new one
        /// from the next advert: a few advert lifetimes is plenty).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        grace: Duration,
    },
}

#[derive(Subcommand)]
enum AuthorityCmd {
    /// Create an authority key pair: authority.key (mode 0600) and authority.pub.
    Keygen {
        /// Folder for the key files.
        #[arg(long)]
        out: PathBuf,
    },
    /// Admit a node: sign a certificate for its request (k of n: give
    /// --key once per key held here, or `cosign` the file elsewhere).
    Admit(admission_cli::AdmitArgs),
    /// Add this key's signature to a certificate or revocation file, in place.
    Cosign {
        /// The authority private key file.
        #[arg(long)]
        key: PathBuf,
        /// The certificate or revocation file.
        file: PathBuf,
    },
    /// Revoke a node: every node stops routing through it, closes its links
    /// and refuses its adverts. Publish the file with `ferry policy publish`.
    Revoke {
        /// An authority private key file; repeatable.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// The node id (64 hex digits, as `ferry status` shows it).
        #[arg(long)]
        node: String,
        /// Why (kept with the revocation).
        #[arg(long, default_value = "")]
        reason: String,
        /// Where to write the signed revocation (JSON).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Sign a ruling file (TOML or JSON), or add a signature to a signed one (k of n).
    Sign {
        /// The authority's private key file.
        #[arg(long)]
        key: PathBuf,
        /// A ruling file, or a signed ruling file.
        #[arg(long = "in")]
        input: PathBuf,
        /// Where to write the signed ruling (JSON).
        #[arg(long)]
        out: PathBuf,
        /// How long nodes accept it for the first time (e.g. 30d, 12h).
        #[arg(long, default_value = "30d")]
        valid_for: humantime::Duration,
    },
    /// What a ruling would do before it is signed: the nodes and capacity
    /// that would leave, the circuits that would move or close, the
    /// tenants hit, and what cannot move in time. Asked of one node: an
    /// entry answers for its own circuits (ask every entry for the mesh).
    #[command(group(clap::ArgGroup::new("what").required(true).args(["region", "file"])))]
    WhatIf {
        /// The node's admin address.
        #[arg(long, default_value = "127.0.0.1:7200")]
        admin: SocketAddr,
        /// A country code or a bloc (EU, EEA, FIVE_EYES, FOURTEEN_EYES, GCC).
        #[arg(long, requires = "exit_by")]
        region: Option<String>,
        /// Draining from (RFC 3339); now if not given.
        #[arg(long, conflicts_with = "file")]
        from: Option<String>,
        /// Out by (RFC 3339).
        #[arg(long, conflicts_with = "file")]
        exit_by: Option<String>,
        /// Only this service class.
        #[arg(long, conflicts_with_all = ["tenant", "file"])]
        class: Option<String>,
        /// Only this tenant.
        #[arg(long, conflicts_with = "file")]
        tenant: Option<String>,
        /// A ruling file (TOML or JSON, as `policy sign` takes it), or a
        /// signed one.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a signed ruling (or revocation) to a node, which verifies it
    /// and gossips it on.
    Publish {
        /// The node's admin address.
        #[arg(long, default_value = "127.0.0.1:7200")]
        admin: SocketAddr,
        /// The signed ruling file.
        file: PathBuf,
    },
}

/// `ferry status --watch EVERY`: a duration of 100 ms to a day (a node
/// asked more often than ten times a second is asked for nothing).
fn parse_watch(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if (Duration::from_millis(100)..=Duration::from_secs(86_400)).contains(&d) {
        Ok(d)
    } else {
        Err(format!("{s}: give 100ms to 1day"))
    }
}

/// The log filter from `--log` (`FERRY_LOG`): libp2p's crates held to
/// the node's bar unless the filter names them (docs/LOGGING.md): WARN,
/// and gossipsub ERROR (its warnings are about messages already
/// published, which the node republishes on purpose).
fn log_filter(log: &str) -> String {
    if log.contains("libp2p") {
        log.to_string()
    } else {
        format!("{log},libp2p=warn,libp2p_gossipsub=error")
    }
}

/// Standard error for the log, or held back: the demo holds its nodes'
/// log lines until its banner is out, so a newcomer reads the banner first.
/// Once open (every other command starts so) a write is one atomic load
/// and the write to standard error.
#[derive(Clone)]
struct LogGate(std::sync::Arc<Gate>);

struct Gate {
    open: std::sync::atomic::AtomicBool,
    /// What was logged while closed.
    held: std::sync::Mutex<Vec<u8>>,
}

/// Most log bytes a closed gate holds; past it, it opens (the log matters
/// more than the order).
const LOG_GATE_HOLD: usize = 4 << 20;

impl LogGate {
    /// A gate that is open (`true`) or holds what is logged until
    /// [`LogGate::open`].
    fn new(open: bool) -> Self {
        Self(std::sync::Arc::new(Gate {
            open: std::sync::atomic::AtomicBool::new(open),
            held: std::sync::Mutex::new(Vec::new()),
        }))
    }

    /// Writes what was held to standard error, and lets the rest through.
    /// The flag is set under the lock, after what was held is out, so a
    /// line held meanwhile is never left behind nor written ahead.
    fn open(&self) {
        let mut held = self.0.held.lock().expect("log gate lock");
        let _ = std::io::Write::write_all(&mut std::io::stderr(), &held);
        *held = Vec::new();
        self.0
            .open
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

impl std::io::Write for LogGate {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use std::sync::atomic::Ordering::Acquire;
        if !self.0.open.load(Acquire) {
            let mut held = self.0.held.lock().expect("log gate lock");
            if !self.0.open.load(Acquire) && held.len() + buf.len() <= LOG_GATE_HOLD {
                held.extend_from_slice(buf);
                return Ok(buf.len());
            }
            drop(held);
            // Past the most it holds: open (the log matters more).
            self.open();
        }
        std::io::stderr().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn init_logs(cli: &Cli, gate: LogGate) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_filter(&cli.log)));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || gate.clone())
        .with_ansi(std::io::stderr().is_terminal());
    match cli.log_format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The demo's banner comes before its nodes' log lines.
    let gate = LogGate::new(!matches!(&cli.cmd, Cmd::Demo { cmd: None, .. }));
    init_logs(&cli, gate.clone());
    if let Some(f) = &cli.admin_token_file {
        let t = std::fs::read_to_string(f)
            .with_context(|| format!("--admin-token-file {}", f.display()))?;
        ferry_node::admin::client::use_token(t.trim().to_string());
    }
    match cli.cmd {
        Cmd::Init {
            dir,
            jurisdiction,
            roles,
            listen,
            socks,
            http,
            mesh,
            admin,
            metrics,
            bootstrap,
            authority_keys,
        } => init(
            &dir,
            &jurisdiction,
            &roles,
            listen,
            (socks, http),
            mesh,
            admin,
            metrics,
            &bootstrap,
            &authority_keys,
        ),
        Cmd::PeerInfo { config } => {
            let cfg = NodeConfig::load(&config)?;
            let keys = Keys::load(&cfg.key_dir)?;
            print!(
                "{}",
                config::peer_block(
                    &keys.node_id(),
                    &keys.noise_public(),
                    cfg.link_listen,
                    cfg.jurisdiction.as_str(),
                    cfg.roles
                )
            );
            Ok(())
        }
        Cmd::Status { admin, json, watch } => admin_client::status(admin, json, watch),
        Cmd::Healthcheck { admin, ready } => admin_client::healthcheck(admin, ready),
        Cmd::Drain {
            admin,
            exit_by,
            within,
            reason,
            cancel,
            transient,
            wait,
        } => admin_client::drain(admin, exit_by, within, &reason, cancel, transient, wait),
        Cmd::Authority {
            cmd: AuthorityCmd::Keygen { out },
        } => keygen(&out),
        Cmd::Authority {
            cmd: AuthorityCmd::Admit(args),
        } => admission_cli::admit(args),
        Cmd::Authority {
            cmd: AuthorityCmd::Cosign { key, file },
        } => admission_cli::cosign(&key, &file),
        Cmd::Authority {
            cmd:
                AuthorityCmd::Revoke {
                    keys,
                    node,
                    reason,
                    out,
                },
        } => admission_cli::revoke(&keys, &node, &reason, &out),
        Cmd::Request {
            config,
            create_keys,
            contact,
            out,
        } => admission_cli::request(&config, create_keys, &contact, out),
        Cmd::Keys {
            cmd: KeysCmd::RotateNoise { admin, grace },
        } => admission_cli::rotate_noise(admin, grace),
        Cmd::Paths { admin, n, json } => admission_cli::paths(admin, n, json),
        Cmd::Tenant {
            cmd:
                TenantCmd::Add {
                    name,
                    class,
                    exclude,
                    exit_in,
                    hops,
                    token,
                },
        } => tenant_add(&name, &class, &exclude, &exit_in, hops, token),
        Cmd::Policy {
            cmd:
                PolicyCmd::Sign {
                    key,
                    input,
                    out,
                    valid_for,
                },
        } => policy_sign(&key, &input, &out, valid_for.into()),
        Cmd::Policy {
            cmd: PolicyCmd::Publish { admin, file },
        } => admin_client::policy_publish(admin, &file),
        Cmd::Audit {
            cmd:
                AuditCmd::Export {
                    admin,
                    since,
                    tenant,
                    format,
                },
        } => admin_client::audit_export(admin, &since, tenant.as_deref(), format),
        Cmd::Audit {
            cmd: AuditCmd::Report { admin, ruling, out },
        } => admin_client::audit_report(admin, &ruling, out.as_deref()),
        Cmd::Audit {
            cmd: AuditCmd::Verify { report, node },
        } => admin_client::audit_verify(&report, node.as_deref()),
        Cmd::Policy {
            cmd:
                PolicyCmd::WhatIf {
                    admin,
                    region,
                    from,
                    exit_by,
                    class,
                    tenant,
                    file,
                    json,
                },
        } => {
            let ask = match (file, region, exit_by) {
                (Some(f), ..) => admin_client::WhatIf::File(f),
                (None, Some(region), Some(exit_by)) => admin_client::WhatIf::Flags {
                    region,
                    from,
                    exit_by,
                    class,
                    tenant,
                },
                _ => anyhow::bail!("give --region and --exit-by, or --file"),
            };
            admin_client::what_if(admin, ask, json)
        }
        Cmd::Demo {
            cmd:
                Some(DemoCmd::Ruling {
                    action,
                    region,
                    start,
                    exit_in,
                    class,
                }),
            ..
        } => {
            let msg = ferry_node::demo::apply_ruling(&ferry_node::demo::DemoRuling {
                lift: action == "lift",
                region,
                start,
                exit_in,
                classes: class,
            })?;
            println!("{msg}");
            Ok(())
        }
        Cmd::Demo {
            socks,
            http,
            cmd: None,
        } => {
            let r = runtime(None)?.block_on(demo(socks, http, gate.clone()));
            // Held lines of a demo that failed to start explain why.
            gate.open();
            r
        }
        Cmd::Node {
            config,
            create_keys,
            admit_with,
        } => {
            // Read first: the config says how many threads to start.
            let cfg = NodeConfig::load(&config)?;
            runtime(cfg.threads)?.block_on(run_node(
                cfg,
                &config,
                None,
                true,
                create_keys,
                admit_with.as_deref(),
            ))
        }
        Cmd::Connect {
            config,
            socks,
            admit_with,
        } => {
            let cfg = NodeConfig::load(&config)?;
            runtime(cfg.threads)?.block_on(run_node(
                cfg,
                &config,
                Some(socks),
                false,
                false,
                admit_with.as_deref(),
            ))
        }
    }
}

/// The async runtime, with `threads` workers (`None`: tokio's default, one
/// per CPU, or `TOKIO_WORKER_THREADS`).
fn runtime(threads: Option<usize>) -> Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        b.worker_threads(n);
    }
    Ok(b.enable_all().build()?)
}

/// A hex key given directly, or read from a file.
fn key_arg(s: &str) -> Result<String> {
    let text = if Path::new(s).is_file() {
        std::fs::read_to_string(s)?
    } else {
        s.to_string()
    };
    let text = text.trim().to_string();
    parse_key_hex(&text).with_context(|| format!("authority key `{s}`"))?;
    Ok(text)
}

#[allow(clippy::too_many_arguments)]
fn init(
    dir: &Path,
    jurisdiction: &str,
    roles: &str,
    listen: SocketAddr,
    (socks, http): (SocketAddr, Option<SocketAddr>),
    mesh: SocketAddr,
    admin: SocketAddr,
    metrics: Option<SocketAddr>,
    bootstrap: &[String],
    authority_keys: &[String],
) -> Result<()> {
    let j = config::parse_jurisdiction(jurisdiction).context("--jurisdiction")?;
    let roles = config::parse_roles(&roles.split(',').collect::<Vec<_>>()).context("--roles")?;
    for b in bootstrap {
        ferry_node::control::parse_bootstrap(b).context("--bootstrap")?;
    }
    let authority_keys = authority_keys
        .iter()
        .map(|k| key_arg(k))
        .collect::<Result<Vec<_>>>()?;
    let cfg_path = dir.join("ferry.toml");
    if cfg_path.exists() {
        bail!(
            "{} already exists; refusing to overwrite it",
            cfg_path.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let keys = Keys::generate();
    keys.write_new(dir)?;
    let link = (roles.relay || roles.exit).then_some(listen);
    let text = config::render_template(&Template {
        jurisdiction: j.as_str(),
        roles,
        link,
        socks: roles.entry.then_some(socks),
        http: http.filter(|_| roles.entry),
        mesh: Some(mesh),
        admin: Some(admin),
        metrics,
        bootstrap,
        authority_keys: &authority_keys,
    });
    std::fs::write(&cfg_path, text).with_context(|| format!("writing {}", cfg_path.display()))?;
    println!(
        "Created node {} ({j}, {roles}) in {}",
        keys.node_id().short(),
        dir.display()
    );
    println!(
        "  keys:   {0}/identity.key, {0}/noise.key (mode 0600)",
        dir.display()
    );
    println!("  config: {}", cfg_path.display());
    admission_cli::write_request(
        &keys,
        &ferry_node::cert::Proposal {
            jurisdiction: j,
            family: "",
            roles,
            contact: "",
        },
        &dir.join(ferry_node::cert::REQUEST_FILE),
    )?;
    println!("  mesh:   {mesh} (others bootstrap from it), admin API on {admin}");
    println!(
        "\nFor a static mesh without gossip, paste this block into the other nodes' configs:\n"
    );
    print!(
        "{}",
        config::peer_block(
            &keys.node_id(),
            &keys.noise_public(),
            link,
            j.as_str(),
            roles
        )
    );
    Ok(())
}

fn keygen(out: &Path) -> Result<()> {
    let (key, kp, pp) = ferry_node::authority::write_keypair(out)?;
    println!(
        "authority public key: {}",
        hex::encode(key.verifying_key().as_bytes())
    );
    println!("  private: {} (mode 0600; keep it offline)", kp.display());
    println!(
        "  public:  {} (goes in every node's [authority] keys)",
        pp.display()
    );
    Ok(())
}

fn policy_sign(key: &Path, input: &Path, out: &Path, valid_for: Duration) -> Result<()> {
    let sk = ferry_node::authority::load_key(key)?;
    let text =
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let mut signed = match serde_json::from_str::<SignedFile>(&text) {
        Ok(f) => {
            let s = f.to_signed()?;
            ferry_node::authority::check_readable(
                "ruling",
                &f.ruling,
                &SignedFile::from_signed(&s)?.ruling,
            )?;
            s
        }
        Err(_) => {
            let file = RulingFile::parse(&text)
                .with_context(|| format!("ruling file {}", input.display()))?;
            pb::SignedRuling {
                body: file.to_body(now_ms(), valid_for)?.encode_to_vec(),
                signatures: vec![],
            }
        }
    };
    sign(&mut signed, &sk);
    let file = SignedFile::from_signed(&signed)?;
    std::fs::write(out, serde_json::to_string_pretty(&file)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "signed ruling {} v{} ({} signature{}) -> {}",
        file.ruling.id,
        file.ruling.version,
        file.signatures.len(),
        if file.signatures.len() == 1 { "" } else { "s" },
        out.display()
    );
    Ok(())
}

/// SIGINT stops at once. The first SIGTERM drains the node for
/// `drain.grace_secs` (no new circuits; owners move theirs; an entry waits
/// for its streams) and stops when nothing is left or the grace ends; a
/// second SIGTERM stops at once.
fn on_signals(token: CancellationToken, running: &node::Running) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let switch = running.switch.clone();
    let origin = running.origin.clone();
    tokio::spawn(async move {
        let mut draining = false;
        loop {
            tokio::select! {
                _ = int.recv() => break,
                _ = term.recv() => {
                    if draining {
                        tracing::info!("second SIGTERM: stopping now");
                        break;
                    }
                    draining = true;
                    let grace = switch.cfg.drain.grace;
                    let until = now_ms() + grace.as_millis() as u64;
                    if let Err(e) = switch.state.drain(until, "SIGTERM", false) {
                        tracing::warn!(error = %format!("{e:#}"), "could not start the drain");
                        break;
                    }
                    tracing::info!(grace_secs = grace.as_secs(), "SIGTERM: draining; send SIGTERM again to stop at once");
                    let (sw, or, tok) = (switch.clone(), origin.clone(), token.clone());
                    tokio::spawn(async move {
                        let mut tick = tokio::time::interval(Duration::from_millis(200));
                        // Let the state watcher send its notices first.
                        tick.tick().await;
                        tick.tick().await;
                        loop {
                            tick.tick().await;
                            let streams = match &or {
                                Some(o) => o.stream_count().await,
                                None => 0,
                            };
                            let left = sw.circuit_count() + streams;
                            if left == 0 || now_ms() >= until {
                                tracing::info!(left, "drain finished; stopping");
                                tok.cancel();
                                return;
                            }
                        }
                    });
                }
            }
        }
        token.cancel();
    });
    Ok(())
}

/// Cancels `token` on SIGINT or SIGTERM.
fn on_signal(token: CancellationToken) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        token.cancel();
    });
    Ok(())
}

async fn run_node(
    mut cfg: NodeConfig,
    path: &Path,
    socks: Option<Option<SocketAddr>>,
    links: bool,
    create_keys: bool,
    admit_with: Option<&Path>,
) -> Result<()> {
    if let Some(s) = socks {
        cfg.roles.entry = true;
        cfg.roles.relay = false;
        cfg.roles.exit = false;
        if let Some(s) = s {
            cfg.socks_listen = Some(s);
        }
        if cfg.socks_listen.is_none() {
            bail!(
                "config {}: listen.socks is not set; pass --socks 127.0.0.1:PORT",
                path.display()
            );
        }
    }
    let keys = if create_keys {
        let (keys, created) = Keys::load_or_create(&cfg.key_dir)?;
        if created {
            tracing::info!(node = %keys.node_id().short(), "created the node's keys");
        }
        keys
    } else {
        Keys::load(&cfg.key_dir)?
    };
    if let Some(key) = admit_with {
        admission_cli::self_admit(&mut cfg, &keys, key)?;
    }
    let store = std::sync::Arc::new(ferry_node::store::Store::open(&cfg.data_dir)?);
    let listeners = Listeners::bind_config(&cfg, links).await?;
    let shutdown = CancellationToken::new();
    let id = keys.node_id();
    let link = listeners
        .link
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?;
    let socks = listeners
        .socks
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?;
    let (j, roles) = (cfg.jurisdiction, cfg.roles);
    let running = node::start_full(cfg, keys, store, listeners, shutdown.clone())?;
    on_signals(shutdown.clone(), &running)?;
    on_sighup(path.to_path_buf(), &running)?;
    let fmt = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
    println!(
        "ready: node {} ({j}, {roles}) link {} socks {}",
        id.short(),
        fmt(link),
        fmt(socks)
    );
    shutdown.cancelled().await;
    running.stop().await;
    println!("stopped");
    Ok(())
}

async fn demo(socks: SocketAddr, http: SocketAddr, gate: LogGate) -> Result<()> {
    let shutdown = CancellationToken::new();
    on_signal(shutdown.clone())?;
    let demo = ferry_node::demo::start(socks, http, shutdown.clone()).await?;
    println!("{}", demo.banner());
    gate.open();
    shutdown.cancelled().await;
    println!("\nStopping the demo mesh...");
    demo.stop().await;
    println!("Stopped.");
    Ok(())
}

/// `ferry tenant add`: reads the password, prints the block.
fn tenant_add(
    name: &str,
    class: &str,
    exclude: &str,
    exit_in: &str,
    hops: Option<usize>,
    token: bool,
) -> Result<()> {
    if name.is_empty() || name.len() > 255 || name == "-" || name.contains(':') {
        bail!(
            "the tenant name must be 1 to 255 characters, not `-` and without `:` (it is a SOCKS5 and HTTP Basic username)"
        );
    }
    if class.len() > 64 {
        bail!("--class must be at most 64 characters");
    }
    if hops.is_some_and(|h| !(1..=8).contains(&h)) {
        bail!("--hops must be 1 to 8");
    }
    let list = |s: &str| -> Result<Vec<String>> {
        let items: Vec<String> = s
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(str::to_string)
            .collect();
        ferry_node::routing::parse_regions(&items)?;
        Ok(items)
    };
    let (exclude, exit_in) = (
        list(exclude).context("--exclude")?,
        list(exit_in).context("--exit-in")?,
    );
    let secret = if token {
        let (token, hash) = ferry_node::auth::new_token();
        eprintln!(
            "bearer token for {name} (shown once; the entry keeps only its hash):\n{token}\n"
        );
        format!("token_hash = {hash:?}")
    } else {
        format!("password_hash = {:?}", read_password(name)?)
    };
    let quoted = |v: &[String]| {
        v.iter()
            .map(|x| format!("{x:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("[[tenants]]");
    println!("name = {name:?}");
    println!("class = {class:?}");
    if !exclude.is_empty() {
        println!("exclude = [{}]", quoted(&exclude));
    }
    if !exit_in.is_empty() {
        println!("exit_in = [{}]", quoted(&exit_in));
    }
    if let Some(h) = hops {
        println!("hops = {h}");
    }
    println!("{secret}");
    Ok(())
}

/// Reads a tenant's password (prompted twice on a terminal, else the first
/// line of stdin) and returns its Argon2id hash.
fn read_password(name: &str) -> Result<String> {
    use std::io::IsTerminal;
    let password = if std::io::stdin().is_terminal() {
        let p = rpassword::prompt_password(format!("password for {name}: "))?;
        if p != rpassword::prompt_password("again: ")? {
            bail!("the two passwords differ");
        }
        p
    } else {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    // The SOCKS5 password carries it (at most 255 bytes with the options).
    if password.is_empty() || password.len() > 200 || password.contains('|') {
        bail!("the password must be 1 to 200 bytes, without `|` (it separates the options)");
    }
    ferry_node::auth::hash_password(&password)
}

/// SIGHUP reloads the entry's tenants, routing policy and limits from the
/// config file, without a restart: a file that does not validate is
/// refused with the reason, and the tenants in force stay. Other settings
/// (and `[limits] connections`) need a restart.
fn on_sighup(path: PathBuf, running: &node::Running) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let Some(origin) = running.origin.clone() else {
        return Ok(());
    };
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match NodeConfig::load(&path) {
                Ok(cfg) => {
                    let n = cfg.routing.tenants.len();
                    origin.set_policy(cfg.routing);
                    origin.limits().configure(cfg.limits);
                    tracing::info!(tenants = n, "SIGHUP: tenants, routing and limits reloaded");
                }
                Err(e) => tracing::warn!(
                    error = %format!("{e:#}"),
                    "SIGHUP: the config does not validate; the tenants in force stay"
                ),
            }
        }
    });
    Ok(())
}
