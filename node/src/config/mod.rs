//! Node configuration, in two stages: [`FileConfig`] is the TOML file as
//! written (unknown keys are errors naming the key), and [`NodeConfig`] is the
//! validated runtime form, built with `TryFrom` before any socket is bound.
//! Every key is documented in the file `ferry init` writes (see
//! [`render_template`]) and in `node/ferry.example.toml`.
//!
//! For containers, the file's text may take values from the environment
//! before it is parsed: `${NAME}` (an error naming the variable and line if
//! it is unset) and `${NAME:-default}`, as Vector's config does; `$$` is a
//! literal `$`; comment lines are left alone. List keys (`node.roles`,
//! `mesh.bootstrap`, `authority.keys`, `exit.rules`) also take one
//! comma-separated string, so a single variable can carry a list. The
//! image's own config, `deploy/docker/ferry.toml`, is built this way.

mod bootstrap;
mod env;
mod schema;
mod template;
mod validate;

pub use bootstrap::{Bootstrap, multiaddr, parse_bootstrap};
pub use env::interpolate;
pub use schema::{
    FileAdmin, FileAuthority, FileCircuit, FileConfig, FileDrain, FileExit, FileListen, FileMesh,
    FileNode, FilePeer, FileRouting, FileTenant,
};
pub use template::{Template, peer_block, render_template};
pub use validate::{
    AuditSettings, DrainSettings, NodeConfig, Peer, parse_jurisdiction, parse_roles,
};

/// Helpers the submodules' tests share, and the tests that cross them.
#[cfg(test)]
mod tests {
    use super::{FileConfig, NodeConfig, interpolate};
    use anyhow::{Result, anyhow};
    use std::path::PathBuf;
    use std::time::Duration;

    pub(super) fn parse(text: &str) -> Result<NodeConfig> {
        let file: FileConfig = toml::from_str(text).map_err(|e| anyhow!("{e}"))?;
        NodeConfig::try_from(file)
    }

    pub(super) fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    /// The image's config (`deploy/docker/ferry.toml`) is valid with only
    /// the required variables set, honours the others, and names a missing
    /// jurisdiction.
    #[test]
    fn the_image_config_builds_from_the_environment() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/docker/ferry.toml"
        ))
        .unwrap();
        let load = |vars: &[(&str, &str)]| {
            let t = interpolate(&text, env(vars))?;
            let file: FileConfig = toml::from_str(&t).map_err(|e| anyhow!("{e}"))?;
            NodeConfig::try_from(file)
        };
        let cfg = load(&[
            ("FERRY_JURISDICTION", "CH"),
            ("FERRY_ADVERTISE_LINK", "172.28.5.11:7000"),
        ])
        .unwrap();
        assert!(cfg.roles.relay && !cfg.roles.exit);
        assert_eq!(cfg.metrics_listen, Some("0.0.0.0:9300".parse().unwrap()));
        assert!(cfg.admin_listen.unwrap().ip().is_loopback());
        assert_eq!(cfg.key_dir, PathBuf::from("/var/lib/ferry"));
        let authority = hex::encode(
            ed25519_dalek::SigningKey::from_bytes(&[7; 32])
                .verifying_key()
                .as_bytes(),
        );
        let cfg = load(&[
            ("FERRY_JURISDICTION", "PK"),
            ("FERRY_ROLES", "entry"),
            ("FERRY_SOCKS", "0.0.0.0:1080"),
            ("FERRY_SOCKS_ALLOW_REMOTE", "true"),
            ("FERRY_BOOTSTRAP", "ch:7100,de:7100"),
            ("FERRY_AUTHORITY_KEYS", &authority),
            ("FERRY_DRAIN_GRACE_SECS", "7"),
        ])
        .unwrap();
        assert!(cfg.roles.entry && !cfg.roles.relay);
        assert_eq!(cfg.bootstrap.len(), 2);
        assert_eq!(cfg.drain.grace, Duration::from_secs(7));
        let err = load(&[]).unwrap_err();
        assert!(
            err.to_string().contains("FERRY_JURISDICTION is not set"),
            "{err}"
        );
        let err = load(&[("FERRY_JURISDICTION", "CH")]).unwrap_err();
        assert!(err.to_string().contains("advertise_link"), "{err}");
    }
}
