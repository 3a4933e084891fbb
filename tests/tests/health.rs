//! Health as a container platform sees it: a node is live at once but not
//! ready while it is joining (its bootstrap peer, given by host name, is not
//! up yet); it keeps dialling and turns ready when the peer appears; the
//! metrics listener answers the probes; a transient drain (the pre-stop
//! hook's) waits until the node is empty, and is gone after a restart.

use ferry_tests::{ferry_bin, free_port, run_ferry};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Node {
    child: Child,
    config: String,
    key: String,
    admin: SocketAddr,
    metrics: SocketAddr,
}

/// The test's authority key (made once per test folder).
fn authority(dir: &Path) -> String {
    let d = dir.join("authority");
    if !d.join("authority.key").exists() {
        run_ferry(&["authority", "keygen", "--out", d.to_str().unwrap()]).unwrap();
    }
    d.join("authority.key").to_str().unwrap().to_string()
}

impl Node {
    /// `ferry init` in `dir/name` with its control plane on `mesh`, then
    /// `ferry node`.
    /// The node trusts the test's authority and admits itself with it
    /// (`--admit-with`, as a test cluster does).
    fn init(dir: &Path, name: &str, mesh: SocketAddr, args: &[&str]) -> Node {
        let d = dir.join(name);
        let (admin, metrics) = (free_port().unwrap(), free_port().unwrap());
        let link = free_port().unwrap();
        let (admin_s, metrics_s) = (admin.to_string(), metrics.to_string());
        let (link_s, mesh_s) = (link.to_string(), mesh.to_string());
        let mut all = vec![
            "init",
            "--dir",
            d.to_str().unwrap(),
            "--listen",
            &link_s,
            "--mesh",
            &mesh_s,
            "--admin",
            &admin_s,
            "--metrics",
            &metrics_s,
        ];
        all.extend(args);
        run_ferry(&all).unwrap();
        let config = d.join("ferry.toml").to_str().unwrap().to_string();
        let key = authority(dir);
        Node {
            child: start(&config, &key),
            key,
            config,
            admin,
            metrics,
        }
    }

    fn restart_after_kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = start(&self.config, &self.key);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(config: &str, key: &str) -> Child {
    Command::new(ferry_bin().unwrap())
        .args(["node", "--config", config, "--admit-with", key])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// `curl` a probe path on the metrics listener: (HTTP status, body).
fn probe(addr: SocketAddr, path: &str) -> (u16, String) {
    let o = Command::new("curl")
        .args(["-s", "--max-time", "3", "-w", "\n%{http_code}"])
        .arg(format!("http://{addr}{path}"))
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&o.stdout).to_string();
    let (body, code) = t.rsplit_once('\n').unwrap_or(("", "0"));
    (code.parse().unwrap_or(0), body.to_string())
}

fn wait_probe(addr: SocketAddr, path: &str, code: u16, within: Duration) -> String {
    let t = Instant::now();
    loop {
        let (c, body) = probe(addr, path);
        if c == code {
            return body;
        }
        assert!(
            t.elapsed() < within,
            "{path} on {addr} answered {c} {body}, not {code}, for {within:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ferry(args: &[&str]) -> Output {
    Command::new(ferry_bin().unwrap())
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_node_is_ready_only_once_joined_and_a_transient_drain_waits_and_does_not_persist() {
    let dir = tempfile::tempdir().unwrap();
    // CH will listen for the mesh here; DE bootstraps from it by name before it exists.
    let ch_mesh = free_port().unwrap();
    let boot = format!("localhost:{}", ch_mesh.port());
    let mut de = Node::init(
        dir.path(),
        "de",
        free_port().unwrap(),
        &[
            "--jurisdiction",
            "DE",
            "--roles",
            "relay",
            "--bootstrap",
            &boot,
        ],
    );
    wait_probe(de.metrics, "/livez", 200, Duration::from_secs(20));
    let body = wait_probe(de.metrics, "/readyz", 503, Duration::from_secs(5));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"], "joining", "{body}");
    let h = ferry(&["healthcheck", "--admin", &de.admin.to_string(), "--ready"]);
    assert_eq!(h.status.code(), Some(1));
    let err = String::from_utf8_lossy(&h.stderr);
    assert!(
        err.contains("not ready: joining: no live peer known yet"),
        "{err}"
    );
    let h = ferry(&["healthcheck", "--admin", &de.admin.to_string()]);
    assert!(h.status.success(), "live while joining");
    assert!(
        probe(de.metrics, "/metrics")
            .1
            .contains("ferry_node_ready 0")
    );

    // The peer appears on that port; DE dials again and joins.
    let ch = Node::init(
        dir.path(),
        "ch",
        ch_mesh,
        &["--jurisdiction", "CH", "--roles", "exit"],
    );
    // A node with nothing to join is ready at once.
    wait_probe(ch.metrics, "/readyz", 200, Duration::from_secs(20));
    let t = Instant::now();
    wait_probe(de.metrics, "/readyz", 200, Duration::from_secs(25));
    println!("DE joined {:.1?} after CH started", t.elapsed());
    assert!(
        probe(de.metrics, "/metrics")
            .1
            .contains("ferry_node_ready 1")
    );

    // The pre-stop hook's drain: transient, waits until empty (at once here).
    let o = ferry(&[
        "drain",
        "--admin",
        &de.admin.to_string(),
        "--in",
        "60s",
        "--transient",
        "--wait",
        "--reason",
        "pod terminating",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("drained: the node carries nothing"), "{out}");
    let body = wait_probe(de.metrics, "/readyz", 503, Duration::from_secs(5));
    assert!(
        body.contains("draining") && body.contains("pod terminating"),
        "{body}"
    );
    let status = ferry(&["status", "--admin", &de.admin.to_string(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["operator_drain"]["persisted"], false, "{v}");

    // Restarted (even after kill -9), it is no longer draining: it joins again.
    de.restart_after_kill9();
    wait_probe(de.metrics, "/readyz", 200, Duration::from_secs(30));
    let v: serde_json::Value = serde_json::from_slice(
        &ferry(&["status", "--admin", &de.admin.to_string(), "--json"]).stdout,
    )
    .unwrap();
    assert_eq!(v["state"], "active", "{v}");
    assert!(v["operator_drain"].is_null(), "{v}");
    drop(ch);
}
