//! Bootstrap addresses: `IP:port`, `host.name:port` or a libp2p multiaddr,
//! checked when the config is validated and dialled by the control plane.

use anyhow::{Result, anyhow};
use libp2p::Multiaddr;
use std::net::SocketAddr;

/// Turns `IP:port` or a multiaddr into a multiaddr.
pub fn multiaddr(s: &str) -> Result<Multiaddr> {
    if s.starts_with('/') {
        return s.parse().map_err(|e| anyhow!("`{s}`: {e}"));
    }
    let a: SocketAddr = s
        .parse()
        .map_err(|e| anyhow!("`{s}`: not IP:port or a multiaddr ({e})"))?;
    let ip = match a.ip() {
        std::net::IpAddr::V4(v) => format!("/ip4/{v}"),
        std::net::IpAddr::V6(v) => format!("/ip6/{v}"),
    };
    Ok(format!("{ip}/tcp/{}", a.port()).parse()?)
}

/// A bootstrap address as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// An address to dial as it is (`IP:port` or a multiaddr).
    Addr(Multiaddr),
    /// A host name and port, resolved each time it is dialled (a
    /// Kubernetes pod's DNS name, a Compose service name).
    Name(String, u16),
}

/// Parses `IP:port`, `host.name:port` or a multiaddr.
pub fn parse_bootstrap(s: &str) -> Result<Bootstrap> {
    if s.starts_with('/') || s.parse::<SocketAddr>().is_ok() {
        return multiaddr(s).map(Bootstrap::Addr);
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("`{s}`: not IP:port, host.name:port or a multiaddr"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| anyhow!("`{s}`: port must be 1 to 65535"))?;
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(anyhow!("`{s}`: `{host}` is not a host name"));
    }
    Ok(Bootstrap::Name(host.to_string(), port))
}
