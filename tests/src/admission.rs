//! The authority's side of admission, with the CLI as an operator runs it:
//! `ferry authority keygen` for a key pair, `ferry authority admit` for a
//! node's certificate.

use crate::node::run_ferry;
use anyhow::Result;
use std::path::{Path, PathBuf};

/// An authority key pair in `dir/name`: (folder, public key hex).
pub fn authority(dir: &Path, name: &str) -> (PathBuf, String) {
    let d = dir.join(name);
    run_ferry(&["authority", "keygen", "--out", d.to_str().unwrap()]).unwrap();
    let public = std::fs::read_to_string(d.join("authority.pub")).unwrap();
    (d, public.trim().to_string())
}

/// Admits the node in `dir` (its `node.request`, from `ferry init`) with
/// the authority key in `kd`, as an operator would: `ferry authority admit`
/// (ceiling 1000 Mbit/s, then `extra` arguments, which override).
pub(crate) fn admit(kd: &Path, dir: &Path, jurisdiction: &str, extra: &[&str]) -> Result<()> {
    let (key, req, cert) = (
        kd.join("authority.key"),
        dir.join("node.request"),
        dir.join("node.cert"),
    );
    let mut a = vec![
        "authority",
        "admit",
        "--key",
        key.to_str().unwrap(),
        "--request",
        req.to_str().unwrap(),
        "--jurisdiction",
        jurisdiction,
        "--capacity-max",
        "1000",
        "--out",
        cert.to_str().unwrap(),
    ];
    a.extend(extra);
    run_ferry(&a).map(|_| ())
}
