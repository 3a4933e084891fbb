#![doc = include_str!("../README.md")]

mod path;

pub use path::{NoPath, PathRequest, select_path};

use std::fmt;

/// A node's identity: its Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// The first 8 hex digits: enough to tell nodes apart in logs.
    pub fn short(&self) -> String {
        self.0[..4].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

/// An ISO 3166-1 alpha-2 country code, upper case. Validated by the caller
/// that builds it from user input (the node's config).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Jurisdiction(pub [u8; 2]);

impl Jurisdiction {
    /// The code as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl fmt::Debug for Jurisdiction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Jurisdiction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a node does for the mesh.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct Roles {
    /// Accepts client connections (SOCKS5) and originates circuits.
    pub entry: bool,
    /// Forwards circuits.
    pub relay: bool,
    /// Connects streams to their targets.
    pub exit: bool,
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (self.entry, "entry"),
            (self.relay, "relay"),
            (self.exit, "exit"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
        f.write_str(&names.join(","))
    }
}

/// What the router knows of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// Identity.
    pub id: NodeId,
    /// Where it operates.
    pub jurisdiction: Jurisdiction,
    /// What it does.
    pub roles: Roles,
}

/// All nodes the router may choose from.
#[derive(Clone, Debug, Default)]
pub struct MeshView {
    nodes: Vec<NodeInfo>,
}

impl MeshView {
    /// A view of these nodes. Duplicate ids keep the first.
    pub fn new(nodes: impl IntoIterator<Item = NodeInfo>) -> Self {
        let mut out: Vec<NodeInfo> = Vec::new();
        for n in nodes {
            if !out.iter().any(|o| o.id == n.id) {
                out.push(n);
            }
        }
        Self { nodes: out }
    }

    /// The nodes.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// One node by id.
    pub fn get(&self, id: &NodeId) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| &n.id == id)
    }
}
