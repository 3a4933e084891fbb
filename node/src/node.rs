//! Running a node: bind, serve links and the SOCKS5 entry, stop on a signal.

use crate::config::NodeConfig;
use crate::identity::Keys;
use crate::link;
use crate::origin::Origin;
use crate::socks;
use crate::switch::Switch;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, warn};

/// Bound listeners for a node. Binding happens before `run`, so a caller
/// (a test, the demo) can bind port 0 and learn the address first.
#[derive(Default)]
pub struct Listeners {
    /// Data-plane links.
    pub link: Option<TcpListener>,
    /// SOCKS5 entry.
    pub socks: Option<TcpListener>,
}

/// Binds a listener, naming the address and the config key on failure.
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {what} on {addr} (is another process using it?)"))
}

impl Listeners {
    /// Binds what the config asks for. `links` false skips the link listener
    /// (for `ferry connect`).
    pub async fn bind_config(cfg: &NodeConfig, links: bool) -> Result<Self> {
        let link = match (links, cfg.link_listen) {
            (true, Some(a)) => Some(bind(a, "listen.link").await?),
            _ => None,
        };
        let socks = match cfg.socks_listen {
            Some(a) if cfg.roles.entry => Some(bind(a, "listen.socks").await?),
            _ => None,
        };
        Ok(Self { link, socks })
    }
}

/// A running node's handle.
pub struct Running {
    /// The switch (for status and tests).
    pub switch: Arc<Switch>,
    /// The origin, if the node is an entry.
    pub origin: Option<Arc<Origin>>,
}

/// Starts the node's tasks; they stop when `shutdown` is cancelled.
pub fn start(
    cfg: NodeConfig,
    keys: Keys,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Running {
    let switch = Switch::new(Arc::new(keys), Arc::new(cfg), shutdown.clone());
    if let Some(l) = listeners.link {
        tokio::spawn(accept_links(l, switch.clone(), shutdown.clone()));
    }
    let origin = listeners.socks.map(|l| {
        let origin = Origin::new(switch.clone());
        tokio::spawn(socks::serve(l, origin.clone(), shutdown.clone()));
        origin
    });
    Running { switch, origin }
}

impl Running {
    /// Tears everything down (after `shutdown` was cancelled).
    pub async fn stop(&self) {
        if let Some(o) = &self.origin {
            o.close_all().await;
        }
        self.switch.shutdown_all();
    }
}

async fn accept_links(listener: TcpListener, switch: Arc<Switch>, shutdown: CancellationToken) {
    let mut n = 0u64;
    loop {
        let sock = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => { warn!(error = %e, "link accept failed"); continue; }
            },
            _ = shutdown.cancelled() => return,
        };
        n += 1;
        let sw = switch.clone();
        let span = tracing::info_span!("inbound", n);
        tokio::spawn(
            async move {
                if let Err(e) = link::accept(sw, sock).await {
                    warn!(reason = %format!("{e:#}"), "link refused");
                }
            }
            .instrument(span),
        );
    }
}
