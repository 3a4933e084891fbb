//! `ferry demo`: a local multi-jurisdiction mesh on loopback, with a SOCKS5
//! entry and a small page to fetch through it. Every node is configured the
//! way `ferry init` configures one (keys on disk, a commented TOML file,
//! parsed and validated, a RocksDB store), then run in this process on its
//! own sockets: links, gossip (bootstrapped from the first node) and an
//! admin API each.
//!
//! The demo makes its own authority key and writes where it is, with the
//! entry's admin address, to `ferry-demo.json` in the temp dir, so
//! `ferry demo ruling block PK --in 20s --exit-in 60s` can sign a ruling
//! and publish it to the running demo: gossip carries it to every node and
//! the log shows the drain. The same authority admits every node (a
//! certificate in each node's key dir), as an operator would with
//! `ferry authority admit`.

use crate::config::{self, NodeConfig, Template};
use crate::identity::Keys;
use crate::node::{self, Listeners, Running};
use anyhow::{Context, Result};
use ferry_router::Roles;
use std::net::SocketAddr;
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The demo mesh: jurisdiction and roles of each node.
pub const MESH: &[(&str, &str)] = &[
    ("CH", "relay,exit"),
    ("DE", "relay"),
    ("IS", "relay,exit"),
    ("CA", "relay,exit"),
    ("SG", "relay"),
    ("PK", "relay"),
];

/// What the demo prints and what tests need.
pub struct Demo {
    /// The SOCKS5 entry.
    pub socks: SocketAddr,
    /// The HTTP CONNECT entry.
    pub http: SocketAddr,
    /// The demo page.
    pub page: SocketAddr,
    /// The mesh nodes: id, jurisdiction, roles, link address, admin address.
    pub nodes: Vec<(String, String, String, SocketAddr, SocketAddr)>,
    /// The entry's admin API.
    pub admin: SocketAddr,
    running: Vec<Running>,
    _dir: tempfile::TempDir,
}

fn roles_of(s: &str) -> Result<Roles> {
    config::parse_roles(&s.split(',').collect::<Vec<_>>())
}

/// Admits a demo node for 30 days with the demo's authority key.
fn admit(
    dir: &Path,
    keys: &Keys,
    cc: &str,
    roles: Roles,
    authority: &ed25519_dalek::SigningKey,
) -> Result<()> {
    let now = crate::authority::now_ms();
    crate::cert::admit_into(
        dir,
        keys,
        &crate::cert::Admission {
            jurisdiction: config::parse_jurisdiction(cc)?,
            family: format!("demo-{cc}"),
            roles,
            capacity_max_mbps: 1000,
            not_before_ms: now.saturating_sub(60_000),
            not_after_ms: now + 30 * 86_400_000,
            landmark: None,
        },
        std::slice::from_ref(authority),
    )
}

/// Starts the demo mesh, the entry and the page server.
pub async fn start(
    socks: SocketAddr,
    http: SocketAddr,
    shutdown: CancellationToken,
) -> Result<Demo> {
    let dir = tempfile::Builder::new()
        .prefix("ferry-demo-")
        .tempdir()
        .context("creating a temp dir")?;
    let socks_l = node::bind(socks, "the demo's SOCKS5 entry")
        .await
        .with_context(|| format!("pass --socks 127.0.0.1:PORT to use another port than {socks}"))?;
    let mut socks_l = Some(socks_l);
    let http_l = node::bind(http, "the demo's HTTP CONNECT entry")
        .await
        .with_context(|| format!("pass --http 127.0.0.1:PORT to use another port than {http}"))?;
    let mut http_l = Some(http_l);
    let page_l = TcpListener::bind("127.0.0.1:0").await?;
    let page = page_l.local_addr()?;
    let auth_dir = dir.path().join("authority");
    let (auth_key, _, _) = crate::authority::write_keypair(&auth_dir)?;
    let auth_pub = hex::encode(auth_key.verifying_key().as_bytes());
    // Gossip ports: libp2p binds them itself, so pick free ones here, below
    // the kernel's ephemeral range (32768 and up on Linux), where an
    // outgoing connection could take a port between our check and
    // libp2p's bind.
    let mut mesh_ports = Vec::new();
    let mut candidate = 20_000 + (std::process::id() % 1000) as u16 * 10;
    while mesh_ports.len() <= MESH.len() {
        candidate = if candidate >= 32_000 {
            20_000
        } else {
            candidate + 1
        };
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", candidate)) {
            mesh_ports.push(l.local_addr()?);
        }
    }
    let boot = [mesh_ports[0].to_string()];

    // Keys and link listeners first: every config lists every other node.
    let mut members = Vec::new();
    for (i, (cc, roles)) in MESH.iter().enumerate() {
        let d = dir.path().join(format!("node{i}-{cc}"));
        std::fs::create_dir_all(&d)?;
        let keys = Keys::generate();
        keys.write_new(&d)?;
        admit(&d, &keys, cc, roles_of(roles)?, &auth_key)?;
        let l = TcpListener::bind("127.0.0.1:0").await?;
        members.push((
            d,
            keys,
            cc,
            roles_of(roles)?,
            Some(l.local_addr()?),
            Some(l),
        ));
    }
    let entry_dir = dir.path().join("entry");
    std::fs::create_dir_all(&entry_dir)?;
    let entry_keys = Keys::generate();
    entry_keys.write_new(&entry_dir)?;
    admit(&entry_dir, &entry_keys, "NL", roles_of("entry")?, &auth_key)?;
    members.push((entry_dir, entry_keys, &"NL", roles_of("entry")?, None, None));

    let blocks: Vec<String> = members
        .iter()
        .map(|(_, k, cc, roles, addr, _)| {
            config::peer_block(&k.node_id(), &k.noise_public(), *addr, cc, *roles)
        })
        .collect();
    let mut running = Vec::new();
    let mut nodes = Vec::new();
    let mut entry_admin = None;
    for (i, (d, _, cc, roles, addr, listener)) in members.into_iter().enumerate() {
        let admin_l = TcpListener::bind("127.0.0.1:0").await?;
        let admin = admin_l.local_addr()?;
        let mut text = config::render_template(&Template {
            http: roles.entry.then_some(http),
            jurisdiction: cc,
            roles,
            link: addr,
            socks: roles.entry.then_some(socks),
            mesh: Some(mesh_ports[i]),
            admin: Some(admin),
            metrics: None,
            bootstrap: if i == 0 { &[] } else { &boot },
            authority_keys: std::slice::from_ref(&auth_pub),
        });
        // The demo's exits serve the demo's own loopback page; its drains
        // are short, so keep the margins short too.
        text = text.replace("allow_private = false", "allow_private = true");
        text = text.replace("advert_ttl_secs = 30", "advert_ttl_secs = 6");
        text = text.replace("margin_secs = 10", "margin_secs = 5");
        text = text.replace("migration_secs = 5", "migration_secs = 3");
        for (j, b) in blocks.iter().enumerate() {
            if j != i {
                text.push('\n');
                text.push_str(b);
            }
        }
        let path = d.join("ferry.toml");
        std::fs::write(&path, &text)?;
        let cfg = NodeConfig::load(&path)?;
        let keys = Keys::load(&cfg.key_dir)?;
        if let Some(a) = addr {
            nodes.push((
                keys.node_id().short(),
                cc.to_string(),
                roles.to_string(),
                a,
                admin,
            ));
        } else {
            entry_admin = Some(admin);
        }
        let listeners = if roles.entry {
            Listeners {
                link: None,
                socks: socks_l.take(),
                http: http_l.take(),
                admin: Some(admin_l),
                metrics: None,
            }
        } else {
            Listeners {
                link: listener,
                socks: None,
                http: None,
                admin: Some(admin_l),
                metrics: None,
            }
        };
        let store = std::sync::Arc::new(crate::store::Store::open(&cfg.data_dir)?);
        // Seven nodes log into one stream: each line names its node
        // (`node{at=PK}`), its tasks started inside this span.
        let span = tracing::info_span!("node", at = %cc);
        let _in = span.enter();
        running.push(node::start_full(
            cfg,
            keys,
            store,
            listeners,
            shutdown.clone(),
        )?);
    }
    let admin = entry_admin.context("the demo has an entry")?;
    let state = serde_json::json!({
        "admin": admin.to_string(),
        "authority_key": auth_dir.join("authority.key"),
        "pid": std::process::id(),
    });
    std::fs::write(state_file(), serde_json::to_string_pretty(&state)?)?;
    tokio::spawn(serve_page(page_l, shutdown.clone()));
    Ok(Demo {
        socks,
        http,
        page,
        nodes,
        admin,
        running,
        _dir: dir,
    })
}

/// Where a running demo says how to reach it.
pub fn state_file() -> std::path::PathBuf {
    std::env::temp_dir().join("ferry-demo.json")
}

/// A ruling for the running demo: `block` REGION from `start` for
/// `exit_in`, or `lift` it.
pub struct DemoRuling {
    /// Lift instead of block.
    pub lift: bool,
    /// Country code or bloc.
    pub region: String,
    /// Blocked from now + this.
    pub start: std::time::Duration,
    /// Exit by blocked_from + this.
    pub exit_in: std::time::Duration,
    /// Classes it covers (empty: all traffic).
    pub classes: Vec<String>,
}

/// Signs `r` with the running demo's authority key and publishes it to the
/// demo's entry; returns what to print.
pub fn apply_ruling(r: &DemoRuling) -> Result<String> {
    use crate::authority::{RulingFile, SignedFile, fmt_time, now_ms, sign};
    use prost::Message;
    let path = state_file();
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no running demo found ({} is missing): start `ferry demo` in another terminal first",
            path.display()
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let admin = v["admin"]
        .as_str()
        .context("demo state: admin")?
        .to_string();
    let key_path = v["authority_key"]
        .as_str()
        .context("demo state: authority_key")?;
    let sk = crate::authority::load_key(Path::new(key_path))
        .with_context(|| format!("is the demo still running? ({key_path})"))?;
    let region = r.region.trim().to_ascii_uppercase();
    crate::routing::parse_regions(&[region.as_str()])?;
    let now = now_ms();
    let from = now + r.start.as_millis() as u64;
    let exit = from + r.exit_in.as_millis() as u64;
    let file = RulingFile {
        id: format!("demo-{region}"),
        version: now,
        region: region.clone(),
        blocked_from: fmt_time(from),
        exit_by: fmt_time(exit),
        classes: r.classes.clone(),
        tenants: Vec::new(),
        reason: "applied with `ferry demo ruling`".into(),
        lifted: r.lift,
    };
    let mut signed = ferry_proto::pb::SignedRuling {
        body: file
            .to_body(now, std::time::Duration::from_secs(86_400))?
            .encode_to_vec(),
        signatures: vec![],
    };
    sign(&mut signed, &sk);
    let body = serde_json::to_string(&SignedFile::from_signed(&signed)?)?;
    crate::admin::client::publish_ruling(&admin, &body)
        .context("the demo refused the ruling, or is no longer running")?;
    Ok(if r.lift {
        format!("ruling demo-{region} lifted: {region} nodes return to service")
    } else {
        format!(
            "ruling demo-{region}: {region} blocked from {} and exit by {}.\n             Watch the demo's log: {region} nodes drain, circuits through them move, and at the exit date\n             they carry nothing. `ferry status --admin {admin}` shows the entry's circuits.",
            fmt_time(from),
            fmt_time(exit)
        )
    })
}

impl Demo {
    /// Stops every node.
    pub async fn stop(&self) {
        for r in &self.running {
            r.stop().await;
        }
        let _ = std::fs::remove_file(state_file());
    }

    /// The lines `ferry demo` prints.
    pub fn banner(&self) -> String {
        let jurisdictions: std::collections::BTreeSet<_> =
            self.nodes.iter().map(|n| n.1.clone()).collect();
        let mut s = format!(
            "Ferry demo: a mesh of {} nodes in {} jurisdictions, on loopback only.\n\n  {:<10}{:<14}{:<12}{}\n",
            self.nodes.len(),
            jurisdictions.len(),
            "node",
            "jurisdiction",
            "roles",
            "link"
        );
        for (id, cc, roles, addr, _) in &self.nodes {
            s.push_str(&format!("  {id:<10}{cc:<14}{roles:<12}{addr}\n"));
        }
        s.push_str(&format!(
            "\nSOCKS5 entry: {socks}\nTry it:       curl --socks5-hostname {socks} http://localhost:{port}/\n             HTTP entry:   {http}\nOr:           curl -p -x http://{http} http://localhost:{port}/\n\n\
             Each connection crosses 3 nodes in 3 different jurisdictions, end-to-end\n\
             encrypted from the entry to the exit; the log below shows each circuit's path.\n\n\
             Watch a drain: in another terminal, block PK (its relay drains, live circuits move):\n\
             \x20 ferry demo ruling block PK --in 20s --exit-in 60s\n\
             \x20 ferry demo ruling lift PK\n\
             Entry status: ferry status --admin {admin}\n\n\
             Press Ctrl-C to stop.\n",
            socks = self.socks,
            http = self.http,
            port = self.page.port(),
            admin = self.admin,
        ));
        s
    }
}

/// The demo page.
pub const PAGE: &str = "<!doctype html>\n<title>Ferry demo</title>\n<h1>Hello through Ferry</h1>\n\
<p>This page crossed a three-hop circuit of the local demo mesh. Every relay saw only ciphertext:\n\
the payload was sealed end to end between the entry and the exit.</p>\n";

async fn serve_page(l: TcpListener, shutdown: CancellationToken) {
    loop {
        let mut sock = tokio::select! {
            a = l.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
            _ = shutdown.cancelled() => return,
        };
        tokio::spawn(async move {
            let mut req = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&chunk[..n]),
                }
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{PAGE}",
                PAGE.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
