//! A real Prometheus server (Debian's `prometheus`, installed by
//! `scripts/ensure-deps.sh test`) scrapes a running mesh; the alert rules in
//! `deploy/prometheus/` load and evaluate, every query of the Grafana
//! dashboard in `deploy/grafana/` returns data, and the drain metrics move
//! when a ruling drains PK. Every alert rule fires when it should and stays
//! silent when it should not (`promtool test rules`, the same package).

use ferry_node::authority::now_ms;
use ferry_tests::rulings::{self, Ruling};
use ferry_tests::{CA_PK_DE, Mesh, Options, free_port, http_server};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Kills Prometheus when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn query(base: &str, expr: &str) -> Value {
    let mut resp = ureq::get(&format!("{base}/api/v1/query"))
        .query("query", expr)
        .call()
        .unwrap_or_else(|e| panic!("query {expr}: {e}"));
    resp.body_mut().read_json().unwrap()
}

/// Waits until `expr` returns at least one series; returns the answer.
fn wait_data(base: &str, expr: &str, within: Duration) -> Value {
    let t = Instant::now();
    loop {
        let v = query(base, expr);
        assert_eq!(v["status"], "success", "{expr}: {v}");
        if v["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
        {
            return v;
        }
        assert!(t.elapsed() < within, "no data for {expr}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn value(v: &Value) -> f64 {
    v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_mesh_and_every_query_returns_data() {
    let bin = Command::new("prometheus").arg("--version").output();
    assert!(
        bin.is_ok_and(|o| o.status.success()),
        "prometheus is not installed: run scripts/ensure-deps.sh test"
    );
    let keys = tempfile::tempdir().unwrap();
    let (kd, public) = rulings::authority(keys.path(), "authority");
    let mesh = Mesh::start(&CA_PK_DE, &Options::gossip(public)).unwrap();
    mesh.wait_entry_knows_all().unwrap();

    // Prometheus on loopback, scraping every node each second.
    let dir = tempfile::tempdir().unwrap();
    let targets: Vec<String> = mesh
        .all()
        .iter()
        .map(|p| format!("\"{}\"", p.metrics))
        .collect();
    let rules = repo().join("deploy/prometheus/ferry-rules.yml");
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: ferry\n    static_configs:\n      - targets: [{}]\n",
            rules.display(),
            targets.join(", ")
        ),
    )
    .unwrap();
    let web = free_port().unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _server = Server(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting prometheus"),
    );
    let base = format!("http://{web}");
    let t = Instant::now();
    while ureq::get(&format!("{base}/-/ready")).call().is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "prometheus not ready: {}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Traffic: a held stream through PK (DE excluded), a fetch, a refusal,
    // and a ruling signed by a key nobody trusts (a counted rejection).
    let page = http_server("scraped\n").await.unwrap();
    let _held = mesh
        .open(page.port(), "exclude=DE")
        .await
        .expect("a stream through PK");
    let refused = mesh.connect(page.port(), "exit_in=JP").await.unwrap();
    assert_eq!(refused.err(), Some(2));
    let (stranger, _) = rulings::authority(keys.path(), "stranger");
    let now = now_ms();
    let pk_ruling = Ruling::block("PK", now + 500, now + 600_000);
    let forged = rulings::sign(keys.path(), &stranger, &pk_ruling);
    assert!(rulings::publish(&mesh.entry, &forged).is_err());

    // Before the ruling: PK active.
    let pk = mesh.node("PK").metrics.to_string();
    let active = wait_data(
        &base,
        &format!("ferry_node_state{{instance=\"{pk}\",state=\"active\"}} == 1"),
        Duration::from_secs(20),
    );
    assert_eq!(value(&active), 1.0);
    // The ruling: PK drains; the drain metrics move.
    let signed = rulings::sign(keys.path(), &kd, &pk_ruling);
    rulings::publish(&mesh.nodes[0], &signed).unwrap();
    wait_data(
        &base,
        &format!("ferry_node_state{{instance=\"{pk}\",state=\"draining\"}} == 1"),
        Duration::from_secs(20),
    );
    let left = wait_data(
        &base,
        "sum(ferry_blocked_jurisdiction_circuits{jurisdiction=\"PK\",status=\"draining\"})",
        Duration::from_secs(20),
    );
    assert!(value(&left) >= 1.0, "{left}");
    // The held stream crosses PK while it drains (it cannot move: DE is
    // excluded), and nothing crosses it after an exit date.
    let crossing = wait_data(
        &base,
        "sum(ferry_ruled_region_sessions{region=\"PK\",phase=\"draining\"}) == 1",
        Duration::from_secs(20),
    );
    assert_eq!(value(&crossing), 1.0, "{crossing}");
    let secs = wait_data(
        &base,
        &format!("ferry_node_exit_seconds{{instance=\"{pk}\"}} > 0"),
        Duration::from_secs(20),
    );
    assert!(value(&secs) <= 600.0, "{secs}");

    // Every dashboard query returns data.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/ferry-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut n = 0;
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            wait_data(&base, expr, Duration::from_secs(30));
            n += 1;
        }
    }
    assert!(n >= 15, "only {n} queries in the dashboard");

    // Every rule loaded, evaluates without error, and its expression runs.
    let mut resp = ureq::get(&format!("{base}/api/v1/rules")).call().unwrap();
    let rules: Value = resp.body_mut().read_json().unwrap();
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    let in_file = std::fs::read_to_string(repo().join("deploy/prometheus/ferry-rules.yml"))
        .unwrap()
        .matches("- alert: ")
        .count();
    assert!(in_file >= 5, "{in_file} rules in the file");
    assert_eq!(loaded.len(), in_file, "{rules}");
    for r in loaded {
        let q = query(&base, r["query"].as_str().unwrap());
        assert_eq!(q["status"], "success", "{}: {q}", r["name"]);
    }
    // Evaluated by Prometheus itself (every second) without error.
    let t = Instant::now();
    loop {
        let mut resp = ureq::get(&format!("{base}/api/v1/rules")).call().unwrap();
        let rules: Value = resp.body_mut().read_json().unwrap();
        let bad: Vec<String> = rules["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{} {} {}", r["name"], r["health"], r["lastError"]))
            .collect();
        if bad.is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "rules not healthy: {bad:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The selectors the rules alert on exist, so the alerts can fire.
    for series in [
        "up{job=\"ferry\"}",
        "ferry_node_state",
        "ferry_node_ready",
        "ferry_circuits_active",
        "ferry_node_exit_seconds",
        "ferry_certificate_expiry_seconds > 86400",
        "ferry_certificate_required == 1",
        "ferry_ruling_rejections_total{reason=\"unknown_key\"} > 0",
        "ferry_quarantined_nodes",
    ] {
        wait_data(&base, series, Duration::from_secs(20));
    }
}

/// The alerts of `ferry-rules.yml`, by name.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("- alert:")
                .or_else(|| l.strip_prefix("alert:"))
        })
        .map(|n| n.trim().to_string())
        .collect()
}

/// A line of YAML without its indentation and trailing comment.
fn bare(line: &str) -> &str {
    let l = line.trim();
    match l.find(" #") {
        Some(i) => l[..i].trim_end(),
        None if l.starts_with('#') => "",
        None => l,
    }
}

/// The alerts a promtool test file expects to fire, and those it expects
/// silent, at some evaluation (each `alertname:` followed by its
/// `exp_alerts:`).
fn tested(tests: &str) -> (Vec<String>, Vec<String>) {
    let (mut fires, mut silent) = (Vec::new(), Vec::new());
    let lines: Vec<&str> = tests.lines().map(bare).filter(|l| !l.is_empty()).collect();
    for (i, &l) in lines.iter().enumerate() {
        let l = l.strip_prefix("- ").unwrap_or(l);
        let Some(name) = l.strip_prefix("alertname:").map(|n| n.trim().to_string()) else {
            continue;
        };
        match (lines.get(i + 1), lines.get(i + 2)) {
            (Some(&"exp_alerts: []"), _) => silent.push(name),
            (Some(&"exp_alerts:"), Some(next)) if next.starts_with("- exp_labels:") => {
                fires.push(name)
            }
            other => panic!("{name}: its exp_alerts must follow it: {other:?}"),
        }
    }
    (fires, silent)
}

/// What is wrong with the test file's coverage of the rules: alerts with
/// no case that fires them or none that keeps them silent, and cases for
/// alerts the rules do not have (promtool passes a silent case of a
/// misspelt name).
fn coverage_faults(rules: &str, tests: &str) -> Vec<String> {
    let names = alert_names(rules);
    let (fires, silent) = tested(tests);
    let mut faults = Vec::new();
    for n in &names {
        if !fires.contains(n) {
            faults.push(format!("{n}: no promtool case fires it"));
        }
        if !silent.contains(n) {
            faults.push(format!("{n}: no promtool case keeps it silent"));
        }
    }
    for n in fires.iter().chain(&silent) {
        if !names.contains(n) {
            faults.push(format!("{n}: tested, but no such alert"));
        }
    }
    faults.dedup();
    faults
}

/// `promtool test rules` passes for `deploy/prometheus/ferry-rules.test.yml`,
/// and every alert of `ferry-rules.yml` has a case there that fires it (with
/// its labels and summary) and one that keeps it silent: a rule added
/// without both fails here.
#[test]
fn every_alert_rule_fires_when_it_should_and_only_then() {
    let dir = repo().join("deploy/prometheus");
    let rules = std::fs::read_to_string(dir.join("ferry-rules.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("ferry-rules.test.yml")).unwrap();
    let names = alert_names(&rules);
    assert!(names.len() >= 7, "alerts found: {names:?}");
    assert_eq!(coverage_faults(&rules, &tests), Vec::<String>::new());
    let out = Command::new("promtool")
        .args(["test", "rules", "ferry-rules.test.yml"])
        .current_dir(&dir)
        .output()
        .expect("promtool (Debian: apt-get install prometheus; scripts/ensure-deps.sh test)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool test rules failed:\n{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

/// The coverage check finds an alert with only a firing case, one with
/// only a silent case, and a case of an alert that does not exist, through
/// comments and either key order of a rule.
#[test]
fn the_coverage_check_finds_untested_and_unknown_alerts() {
    let rules = "rules:\n  - alert: A\n    expr: x\n  - expr: y\n    alert: B\n  - alert: C\n";
    let tests = "tests:\n  - alert_rule_test:\n      # A fires\n      - eval_time: 1m\n        alertname: A  # here\n        exp_alerts:  # one\n          - exp_labels: {x: y}\n      - eval_time: 2m\n        alertname: B\n\n        exp_alerts: []\n      - alertname: C\n        exp_alerts: []\n      - alertname: C\n        exp_alerts:\n          - exp_labels:\n              x: y\n      - alertname: Z\n        exp_alerts: []\n";
    assert_eq!(alert_names(rules), ["A", "B", "C"]);
    assert_eq!(
        coverage_faults(rules, tests),
        [
            "A: no promtool case keeps it silent",
            "B: no promtool case fires it",
            "Z: tested, but no such alert",
        ]
    );
}
