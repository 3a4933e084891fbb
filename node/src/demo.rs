//! `ferry demo`: a local multi-jurisdiction mesh on loopback, with a SOCKS5
//! entry and a small page to fetch through it. Every node is configured the
//! way `ferry init` configures one (keys on disk, a commented TOML file,
//! parsed and validated), then run in this process on its own sockets.

use crate::config::{self, NodeConfig, Template};
use crate::identity::Keys;
use crate::node::{self, Listeners, Running};
use anyhow::{Context, Result};
use ferry_router::Roles;
use std::net::SocketAddr;
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
    /// The demo page.
    pub page: SocketAddr,
    /// The mesh nodes: id, jurisdiction, roles, link address.
    pub nodes: Vec<(String, String, String, SocketAddr)>,
    running: Vec<Running>,
    _dir: tempfile::TempDir,
}

fn roles_of(s: &str) -> Result<Roles> {
    config::parse_roles(&s.split(',').collect::<Vec<_>>())
}

/// Starts the demo mesh, the entry and the page server.
pub async fn start(socks: SocketAddr, shutdown: CancellationToken) -> Result<Demo> {
    let dir = tempfile::Builder::new()
        .prefix("ferry-demo-")
        .tempdir()
        .context("creating a temp dir")?;
    let socks_l = node::bind(socks, "the demo's SOCKS5 entry")
        .await
        .with_context(|| format!("pass --socks 127.0.0.1:PORT to use another port than {socks}"))?;
    let mut socks_l = Some(socks_l);
    let page_l = TcpListener::bind("127.0.0.1:0").await?;
    let page = page_l.local_addr()?;

    // Keys and link listeners first: every config lists every other node.
    let mut members = Vec::new();
    for (i, (cc, roles)) in MESH.iter().enumerate() {
        let d = dir.path().join(format!("node{i}-{cc}"));
        std::fs::create_dir_all(&d)?;
        let keys = Keys::generate();
        keys.write_new(&d)?;
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
    members.push((entry_dir, entry_keys, &"NL", roles_of("entry")?, None, None));

    let blocks: Vec<String> = members
        .iter()
        .map(|(_, k, cc, roles, addr, _)| {
            config::peer_block(&k.node_id(), &k.noise_public, *addr, cc, *roles)
        })
        .collect();
    let mut running = Vec::new();
    let mut nodes = Vec::new();
    for (i, (d, _, cc, roles, addr, listener)) in members.into_iter().enumerate() {
        let mut text = config::render_template(&Template {
            jurisdiction: cc,
            roles,
            link: addr,
            socks: roles.entry.then_some(socks),
            mesh: None,
            admin: None,
            bootstrap: &[],
            authority_keys: &[],
        });
        // The demo's exits serve the demo's own loopback page.
        text = text.replace("allow_private = false", "allow_private = true");
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
            nodes.push((keys.node_id().short(), cc.to_string(), roles.to_string(), a));
        }
        let listeners = if roles.entry {
            Listeners {
                link: None,
                socks: socks_l.take(),
                admin: None,
            }
        } else {
            Listeners {
                link: listener,
                socks: None,
                admin: None,
            }
        };
        running.push(node::start(cfg, keys, listeners, shutdown.clone()));
    }
    tokio::spawn(serve_page(page_l, shutdown.clone()));
    Ok(Demo {
        socks,
        page,
        nodes,
        running,
        _dir: dir,
    })
}

impl Demo {
    /// Stops every node.
    pub async fn stop(&self) {
        for r in &self.running {
            r.stop().await;
        }
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
        for (id, cc, roles, addr) in &self.nodes {
            s.push_str(&format!("  {id:<10}{cc:<14}{roles:<12}{addr}\n"));
        }
        s.push_str(&format!(
            "\nSOCKS5 entry: {socks}\nTry it:       curl --socks5-hostname {socks} http://localhost:{port}/\n\n\
             Each connection crosses 3 nodes in 3 different jurisdictions, end-to-end\n\
             encrypted from the entry to the exit; the log below shows each circuit's path.\n\
             Press Ctrl-C to stop.\n",
            socks = self.socks,
            port = self.page.port()
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
