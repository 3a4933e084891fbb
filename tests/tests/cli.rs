//! The `ferry` command line as a user meets it: `init`, config errors,
//! and `ferry demo` — the README's first command — end to end with curl and
//! Ctrl-C.

use ferry_tests::{Mesh, Options, ferry_bin, free_port};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn ferry(args: &[&str]) -> std::process::Output {
    Command::new(ferry_bin().unwrap())
        .args(args)
        .output()
        .unwrap()
}

/// `ferry init --dir d`, then `args`.
fn init(d: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["init", "--dir", d.to_str().unwrap()];
    all.extend(args);
    ferry(&all)
}

/// `ferry authority admit` of `request` with the authority key `key` as
/// `jurisdiction`, then `more` arguments.
fn admit(key: &Path, request: &Path, jurisdiction: &str, more: &[&str]) -> std::process::Output {
    let mut args = vec![
        "authority",
        "admit",
        "--key",
        key.to_str().unwrap(),
        "--request",
        request.to_str().unwrap(),
        "--jurisdiction",
        jurisdiction,
    ];
    args.extend(more);
    ferry(&args)
}

#[test]
fn init_writes_private_keys_and_a_config_that_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("n1");
    let out = init(&d, &["--jurisdiction", "ch", "--roles", "relay,exit"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("[[peers]]") && stdout.contains("jurisdiction = \"CH\""),
        "{stdout}"
    );
    for key in ["identity.key", "noise.key"] {
        let mode = std::fs::metadata(d.join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    let cfg = std::fs::read_to_string(d.join("ferry.toml")).unwrap();
    assert!(cfg.contains("roles = [\"relay\", \"exit\"]"), "{cfg}");
    // Running init again must not replace the node's identity.
    let again = init(&d, &["--jurisdiction", "CH"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
}

#[test]
fn bad_input_to_init_and_node_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("x");
    let out = init(&d, &["--jurisdiction", "XK1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an ISO 3166-1 alpha-2 country code")
    );
    assert!(!d.exists(), "a refused init must leave nothing behind");
    let out = init(&d, &["--jurisdiction", "DE", "--roles", "relay,mirror"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown role `mirror`"));

    let out = init(&d, &["--jurisdiction", "DE"]);
    assert!(out.status.success());
    let cfg = d.join("ferry.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("hops = 3", "hops = 3\nhop_count = 4");
    std::fs::write(&cfg, text).unwrap();
    let out = ferry(&["node", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `hop_count`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_port_answers_connection_refused() {
    let specs = ferry_tests::THREE;
    let mesh = Mesh::start(&specs, &Options::default()).unwrap();
    let closed = free_port().unwrap();
    let reply = mesh.connect(closed.port(), "").await.unwrap();
    assert_eq!(
        reply.err(),
        Some(0x05),
        "a closed port is SOCKS 'connection refused'"
    );
}

#[test]
fn demo_serves_its_page_through_the_mesh_and_stops_on_ctrl_c() {
    let socks = free_port().unwrap().to_string();
    let http = free_port().unwrap().to_string();
    // Its own temp dir: the demo says where it is in TMPDIR/ferry-demo.json.
    let tmp = tempfile::tempdir().unwrap();
    let log_path = tmp.path().join("demo.log");
    let mut child = Command::new(ferry_bin().unwrap())
        .args(["demo", "--socks", &socks, "--http", &http])
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut banner = Vec::new();
    while !banner.iter().any(|l: &String| l.contains("Press Ctrl-C")) {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => banner.push(l),
            Err(e) => panic!(
                "no demo banner ({e}):\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            ),
        }
    }
    let text = banner.join("\n");
    assert!(text.contains("6 nodes in 6 jurisdictions"), "{text}");
    // Each curl line the banner prints fetches the demo's page: through the
    // SOCKS5 entry and through the HTTP CONNECT entry.
    for (needle, port) in [("curl --socks5-hostname", &socks), ("curl -p -x", &http)] {
        let line = banner
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no `{needle}` line:\n{text}"));
        assert!(line.contains(port.as_str()), "{line}");
        let args: Vec<&str> = line
            .split_whitespace()
            .skip_while(|w| *w != "curl")
            .skip(1)
            .collect();
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20"])
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("Hello through Ferry"),
            "{line}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A ruling applied to the running demo drains PK, and lifting it
    // brings PK back.
    let ruling = |args: &[&str]| {
        let out = Command::new(ferry_bin().unwrap())
            .args(["demo", "ruling"])
            .args(args)
            .env("TMPDIR", tmp.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "demo ruling {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let wait_log = |needle: &str| {
        let t = std::time::Instant::now();
        loop {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if log.contains(needle) {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no `{needle}` in the demo's log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let said = ruling(&["block", "PK", "--in", "1s", "--exit-in", "3s"]);
    assert!(said.contains("PK blocked from"), "{said}");
    wait_log("node draining");
    wait_log("node exited");
    let said = ruling(&["lift", "PK"]);
    assert!(said.contains("lifted"), "{said}");
    wait_log("node is active again");

    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "demo exited with {status}");
    let mut rest = Vec::new();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
        rest.push(l);
    }
    assert!(rest.iter().any(|l| l == "Stopped."), "{rest:?}");
}

/// A newcomer reads the demo's banner first: with its output and its log
/// on one terminal (one pipe here), no node's log line comes before the
/// banner ends, and the lines held meanwhile follow it.
#[test]
fn the_demo_banner_comes_before_its_nodes_logs() {
    let socks = free_port().unwrap().to_string();
    let http = free_port().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    // The shell joins standard error to the pipe, then is the demo (exec).
    let bin = ferry_bin().unwrap();
    let mut child = Command::new("sh")
        .args(["-c", "exec \"$0\" demo --socks \"$1\" --http \"$2\" 2>&1"])
        .arg(&bin)
        .args([&socks, &http])
        .env("TMPDIR", tmp.path())
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let reader = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(reader).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut lines: Vec<String> = Vec::new();
    while !lines.iter().any(|l| l.contains("Press Ctrl-C")) {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => lines.push(l),
            Err(e) => panic!("no demo banner ({e}):\n{}", lines.join("\n")),
        }
    }
    // A log line: a timestamp, then a level.
    let logged = |l: &str| {
        let mut w = l.split_whitespace();
        w.next()
            .is_some_and(|t| t.starts_with("20") && t.contains('T'))
            && matches!(w.next(), Some("INFO" | "WARN" | "ERROR" | "DEBUG"))
    };
    let first = lines.iter().find(|l| !l.trim().is_empty()).unwrap();
    assert!(first.starts_with("Ferry demo:"), "first line: {first}");
    assert!(
        !lines.iter().any(|l| logged(l)),
        "log lines inside the banner:\n{}",
        lines.join("\n")
    );
    // The nodes' lines held while the banner was written come after it.
    let after = std::iter::from_fn(|| rx.recv_timeout(Duration::from_secs(30)).ok())
        .find(|l| !l.trim().is_empty())
        .expect("the nodes' log after the banner");
    assert!(logged(&after), "after the banner: {after}");
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
}

#[test]
fn admission_on_the_command_line_checks_the_request_and_signs_k_of_n() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("n1");
    let ok = |out: &std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let said = ok(&init(&d, &["--jurisdiction", "PK", "--roles", "relay"]));
    assert!(said.contains("node.request"), "{said}");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for k in [&a, &b] {
        ok(&ferry(&[
            "authority",
            "keygen",
            "--out",
            k.to_str().unwrap(),
        ]));
    }
    let req = d.join("node.request");
    let cert = d.join("node.cert");
    let ka = a.join("authority.key");
    let said = ok(&admit(&ka, &req, "CH", &["--capacity-max", "200"]));
    // The authority decides, and says where it differs from the request.
    assert!(
        said.contains("proposed PK") && said.contains("(CH, family ``, relay, at most 200 Mbit/s)"),
        "{said}"
    );
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cert).unwrap()).unwrap();
    assert_eq!(c["certificate"]["jurisdiction"], "CH");
    assert_eq!(c["signatures"].as_array().unwrap().len(), 1);
    // A second key holder cosigns.
    let said = ok(&ferry(&[
        "authority",
        "cosign",
        "--key",
        b.join("authority.key").to_str().unwrap(),
        cert.to_str().unwrap(),
    ]));
    assert!(said.contains("2 signatures"), "{said}");
    // A request changed after the node signed it is refused.
    let mut tampered: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&req).unwrap()).unwrap();
    let mut hex = tampered["request_hex"].as_str().unwrap().to_string();
    let last = hex.pop().unwrap();
    hex.push(if last == '0' { '1' } else { '0' });
    tampered["request_hex"] = hex.into();
    let bad = dir.path().join("tampered.request");
    std::fs::write(&bad, tampered.to_string()).unwrap();
    let x = dir.path().join("x.cert");
    let out = admit(&ka, &bad, "CH", &["--out", x.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not verify"), "{err}");
    // A jurisdiction that is not a country is named.
    let y = dir.path().join("y.cert");
    let out = admit(&ka, &req, "XX", &["--out", y.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--jurisdiction"), "{err}");
}
