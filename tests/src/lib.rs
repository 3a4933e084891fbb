//! The multi-node harness: real `ferry` processes on loopback, configured
//! with `ferry init` and `ferry peer-info` exactly as an operator would, plus
//! a SOCKS5 client, a traffic generator, and recording TCP taps.
//!
//! The `ferry` binary is found next to the test executable's folder
//! (`target/<profile>/ferry`). `cargo test --workspace` builds it (for
//! `node/tests`); `FERRY_BIN` points elsewhere.
//!
//! By concern, all re-exported here: one process, its ports and its
//! `ferry init` (`node`); a mesh of them and its [`Options`] (`mesh`);
//! status, logs and the waits on them (`observe`); the authority's key
//! pairs and certificates (`admission`); the client's SOCKS5 and `curl`
//! (`client`); targets and checkable traffic (`traffic`); recording taps
//! (`tap`); and, as modules of their own, [`rulings`], a raw [`gossip`]
//! peer and a [`raw`] link peer.
#![forbid(unsafe_code)]

mod admission;
mod client;
pub mod decoders;
pub mod gossip;
mod mesh;
mod node;
mod observe;
pub mod raw;
pub mod rulings;
mod tap;
mod traffic;

pub use client::{
    curl_socks, curl_socks_async, socks_connect, socks_connect_as, socks_connect_from, tenant_block,
};
pub use mesh::{CA_PK_DE, Mesh, Options, THREE};
pub use node::{Proc, Spec, ferry_bin, free_port, rss_of, run_ferry};
pub use observe::{entry_circuits, peer};
pub use tap::start_tap;
pub use traffic::{
    Pattern, Uploads, counting_sink, echo_server, finish_transfers, http_server, pattern_server,
    pattern_server_paced, pattern_transfer, read_digest, read_until_end, send_pattern,
    send_pattern_paced, spawn_transfer,
};
