//! `ferry`: the Ferry node and its tools.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use ferry_node::config::{self, NodeConfig, Template};
use ferry_node::identity::Keys;
use ferry_node::node::{self, Listeners};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: a relay mesh for end-to-end encrypted traffic that leaves a jurisdiction cleanly."
)]
struct Cli {
    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log filter (tracing's env-filter syntax); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log: String,
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
    /// Run a local mesh of 6 nodes in 6 jurisdictions with a SOCKS5 entry, until Ctrl-C.
    Demo {
        /// Address of the demo's SOCKS5 entry.
        #[arg(long, default_value = "127.0.0.1:1080")]
        socks: SocketAddr,
    },
    /// Create a node: its keys (mode 0600) and a fully commented config file.
    Init {
        /// Folder for the node's keys and ferry.toml (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Where the node operates: ISO 3166-1 alpha-2 code (DE, CH, CA, ...).
        #[arg(long)]
        jurisdiction: String,
        /// Comma-separated roles: entry, relay, exit.
        #[arg(long, default_value = "relay")]
        roles: String,
        /// Link listen address (relay and exit roles).
        #[arg(long, default_value = "127.0.0.1:7000")]
        listen: SocketAddr,
        /// SOCKS5 listen address (entry role).
        #[arg(long, default_value = "127.0.0.1:1080")]
        socks: SocketAddr,
    },
    /// Run a node from its config file, until SIGINT or SIGTERM.
    Node {
        /// The node's ferry.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a local SOCKS5 entry into the mesh (no link listener), until SIGINT or SIGTERM.
    Connect {
        /// The client's ferry.toml (from `ferry init --roles entry`).
        #[arg(long)]
        config: PathBuf,
        /// SOCKS5 listen address; overrides listen.socks.
        #[arg(long)]
        socks: Option<SocketAddr>,
    },
    /// Print this node's [[peers]] block, to paste into other nodes' configs.
    PeerInfo {
        /// The node's ferry.toml.
        #[arg(long)]
        config: PathBuf,
    },
}

fn init_logs(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cli.log_format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logs(&cli);
    match cli.cmd {
        Cmd::Init {
            dir,
            jurisdiction,
            roles,
            listen,
            socks,
        } => init(dir, &jurisdiction, &roles, listen, socks),
        Cmd::PeerInfo { config } => {
            let cfg = NodeConfig::load(&config)?;
            let keys = Keys::load(&cfg.key_dir)?;
            print!(
                "{}",
                config::peer_block(
                    &keys.node_id(),
                    &keys.noise_public,
                    cfg.link_listen,
                    cfg.jurisdiction.as_str(),
                    cfg.roles
                )
            );
            Ok(())
        }
        Cmd::Demo { socks } => runtime()?.block_on(demo(socks)),
        Cmd::Node { config } => runtime()?.block_on(run_node(config, None, true)),
        Cmd::Connect { config, socks } => runtime()?.block_on(run_node(config, Some(socks), false)),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn init(
    dir: PathBuf,
    jurisdiction: &str,
    roles: &str,
    listen: SocketAddr,
    socks: SocketAddr,
) -> Result<()> {
    let j = config::parse_jurisdiction(jurisdiction).context("--jurisdiction")?;
    let roles = config::parse_roles(&roles.split(',').collect::<Vec<_>>()).context("--roles")?;
    let cfg_path = dir.join("ferry.toml");
    if cfg_path.exists() {
        bail!(
            "{} already exists; refusing to overwrite it",
            cfg_path.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let keys = Keys::generate();
    keys.write_new(&dir)?;
    let link = (roles.relay || roles.exit).then_some(listen);
    let text = config::render_template(&Template {
        jurisdiction: j.as_str(),
        roles,
        link,
        socks: roles.entry.then_some(socks),
    });
    std::fs::write(&cfg_path, text).with_context(|| format!("writing {}", cfg_path.display()))?;
    println!(
        "Created node {} ({j}, {roles}) in {}",
        keys.node_id().short(),
        dir.display()
    );
    println!(
        "  keys:   {}/identity.key, {}/noise.key (mode 0600)",
        dir.display(),
        dir.display()
    );
    println!("  config: {}", cfg_path.display());
    println!("\nPaste this block into the other nodes' configs:\n");
    print!(
        "{}",
        config::peer_block(&keys.node_id(), &keys.noise_public, link, j.as_str(), roles)
    );
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

async fn run_node(path: PathBuf, socks: Option<Option<SocketAddr>>, links: bool) -> Result<()> {
    let mut cfg = NodeConfig::load(&path)?;
    if let Some(s) = socks {
        cfg.roles.entry = true;
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
    let keys = Keys::load(&cfg.key_dir)?;
    let listeners = Listeners::bind_config(&cfg, links).await?;
    let shutdown = CancellationToken::new();
    on_signal(shutdown.clone())?;
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
    let running = node::start(cfg, keys, listeners, shutdown.clone());
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

async fn demo(socks: SocketAddr) -> Result<()> {
    let shutdown = CancellationToken::new();
    on_signal(shutdown.clone())?;
    let demo = ferry_node::demo::start(socks, shutdown.clone()).await?;
    println!("{}", demo.banner());
    shutdown.cancelled().await;
    println!("\nStopping the demo mesh...");
    demo.stop().await;
    println!("Stopped.");
    Ok(())
}
