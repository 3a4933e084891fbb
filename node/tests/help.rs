//! The CLI's front door: `ferry --help` lists every command with its purpose,
//! and `ferry --version` names the version. (Building this test also builds
//! the `ferry` binary that the multi-process tests in `tests/` run.)

use std::process::Command;

#[test]
fn help_lists_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "demo",
        "init",
        "node",
        "connect",
        "peer-info",
        "status",
        "authority",
        "policy",
        "request",
        "keys",
        "paths",
    ] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(cmd)),
            "`{cmd}` missing from:\n{help}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["policy", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("sign") && help.contains("publish"), "{help}");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["authority", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for sub in ["keygen", "admit", "cosign", "revoke"] {
        assert!(help.contains(sub), "`{sub}` missing from:\n{help}");
    }
}

#[test]
fn version_is_printed() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ferry {}", env!("CARGO_PKG_VERSION"))
    );
}
