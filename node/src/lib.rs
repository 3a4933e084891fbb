//! The Ferry node (binary `ferry`): identity, config, Noise links, circuits,
//! the SOCKS5 entry and the exit.
//!
//! Crates chosen for what is not Ferry's own job:
//! - `snow` for Noise handshakes (the reference Rust implementation); its
//!   `risky-raw-split` hands the transport keys to `ring`, whose AES-GCM seals
//!   and opens records in place (see [`crypto`]); its X25519 is
//!   `aws-lc-rs`'s (ferry-circuit's `crypto`: twice curve25519-dalek's
//!   speed, and unlike ring's it holds a static key).
//! - `ed25519-dalek` / `x25519-dalek` for the identity and Noise static keys.
//! - `celes` for the ISO 3166-1 country table; `ipnet` for exit-policy CIDRs.
//! - `libp2p` for the control plane (identify, Kademlia, gossipsub);
//!   `rocksdb` for the node's store.
//! - `axum` for the admin API, `ureq` for the CLI's calls to it,
//!   `humantime` for RFC 3339 dates in ruling files.
//! - `csv` for `ferry audit export --format csv` (RFC 4180 quoting of
//!   tenant names and reasons, which may hold commas and quotes).
//! - `tokio` for I/O, `clap` for the CLI (its `env` feature reads
//!   `FERRY_LOG_FORMAT`/`FERRY_LOG`), `toml`/`serde` for config,
//!   `tracing` for logs, `prometheus` for metrics.
//! - Config values from the environment (`${VAR}`, `${VAR:-default}`) are
//!   expanded by a few lines of our own ([`config::interpolate`]) rather
//!   than `shellexpand`: that crate also expands a bare `$NAME`, so any `$`
//!   in a value (a password, a tenant name) would silently become a
//!   lookup, and its errors carry no line; ours expands only `${...}`,
//!   leaves comment lines alone and names the variable and line.
//!
//! Not in this crate: routing decisions (they live in `ferry-router`), wire
//! layouts (`ferry-proto`).
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod auth;
pub mod authority;
pub mod cert;
pub mod config;
pub mod control;
pub mod crypto;
pub mod demo;
pub mod directory;
pub mod endpoint;
pub mod entry;
pub mod http_proxy;
pub mod identity;
pub mod landmark;
pub mod limits;
pub mod link;
pub mod log_limit;
pub mod metrics;
pub mod node;
pub mod origin;
pub mod plausibility;
pub mod policy;
pub mod routing;
pub mod rulings;
pub mod socks;
pub mod state;
pub mod store;
pub mod switch;
