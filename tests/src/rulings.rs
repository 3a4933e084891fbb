//! Rulings made and published with the CLI, as an operator would.

pub use crate::admission::authority;

use crate::node::{Proc, ferry_bin, run_ferry};
use ferry_node::authority::fmt_time;
use std::path::{Path, PathBuf};

/// A ruling on `region` from `from_ms` to `exit_ms` (ms since the
/// epoch); id `test-REGION`.
#[derive(Clone, Copy)]
pub struct Ruling<'a> {
    /// Its version.
    pub version: u64,
    /// Country code or bloc.
    pub region: &'a str,
    /// Blocked from.
    pub from_ms: u64,
    /// Exit date.
    pub exit_ms: u64,
    /// Classes it covers (empty: all traffic).
    pub classes: &'a [&'a str],
    /// Lifts the ruling.
    pub lifted: bool,
}

impl<'a> Ruling<'a> {
    /// Version 1, all traffic.
    pub fn block(region: &'a str, from_ms: u64, exit_ms: u64) -> Self {
        Self {
            version: 1,
            region,
            from_ms,
            exit_ms,
            classes: &[],
            lifted: false,
        }
    }
}

/// Writes `r` as a TOML ruling file in `dir` and signs it with the key
/// in `key_dir`; returns the signed file.
pub fn sign(dir: &Path, key_dir: &Path, r: &Ruling<'_>) -> PathBuf {
    let name = format!(
        "{}-v{}-{}",
        r.region,
        r.version,
        key_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("key")
    );
    let src = dir.join(format!("{name}.toml"));
    let classes: Vec<String> = r.classes.iter().map(|c| format!("\"{c}\"")).collect();
    std::fs::write(
        &src,
        format!(
            "id = \"test-{region}\"\nversion = {v}\nregion = \"{region}\"\nblocked_from = \"{from}\"\n\
             exit_by = \"{exit}\"\nclasses = [{classes}]\nreason = \"test order\"\nlifted = {lifted}\n",
            region = r.region,
            v = r.version,
            from = fmt_time(r.from_ms),
            exit = fmt_time(r.exit_ms),
            classes = classes.join(", "),
            lifted = r.lifted,
        ),
    )
    .unwrap();
    let out = dir.join(format!("{name}.signed.json"));
    sign_file(key_dir, &src, &out, &[]);
    out
}

/// `ferry policy sign` of `src` (a ruling file, or a signed one to add a
/// signature to) into `out` with the key in `key_dir`, then `extra`
/// arguments (for example `--valid-for 3s`).
pub fn sign_file(key_dir: &Path, src: &Path, out: &Path, extra: &[&str]) {
    let key = key_dir.join("authority.key");
    let mut args = vec![
        "policy",
        "sign",
        "--key",
        key.to_str().unwrap(),
        "--in",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    run_ferry(&args).unwrap();
}

/// Publishes a signed ruling through `node`'s admin API: the CLI's
/// answer, or its error.
pub fn publish(node: &Proc, file: &Path) -> Result<String, String> {
    let out = std::process::Command::new(ferry_bin().unwrap())
        .args(["policy", "publish", "--admin", &node.admin.to_string()])
        .arg(file)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into())
    }
}
