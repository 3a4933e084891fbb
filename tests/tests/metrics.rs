//! `/metrics` on every node's own listener, fetched with the real `curl`:
//! the names are there, labels carry no peer ids, and the state and drain
//! metrics move when a ruling drains a jurisdiction.

use ferry_node::authority::now_ms;
use ferry_tests::rulings::{self, Ruling};
use ferry_tests::{Mesh, Options, Proc, Spec, curl_socks_async, http_server};
use std::process::Command;
use std::time::{Duration, Instant};

fn scrape(p: &Proc) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://{}/metrics", p.metrics))
        .output()
        .expect("running curl");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The value of one sample line (`name{labels} value`), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn wait_sample(p: &Proc, series: &str, want: f64, within: Duration) -> String {
    let t = Instant::now();
    loop {
        let text = scrape(p);
        if sample(&text, series) == Some(want) {
            return text;
        }
        assert!(
            t.elapsed() < within,
            "{} never showed {series} {want}:\n{text}",
            p.jurisdiction
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The sum of every sample of `name` (all label sets).
fn total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ') | Some(b'{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `node.threads` sets how many threads a node and an entry carry
/// traffic on (`ferry_runtime_worker_threads` says so), and a mesh of
/// one-thread nodes carries a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_threads_sets_the_runtimes_workers() {
    let mesh = Mesh::start(
        &ferry_tests::THREE,
        &Options {
            node_replace: vec![("threads = 0".into(), "threads = 1".into())],
            entry_replace: vec![("threads = 1".into(), "threads = 3".into())],
            ..Options::default()
        },
    )
    .unwrap();
    mesh.echo_ping().await.unwrap();
    for n in &mesh.nodes {
        let text = scrape(n);
        assert_eq!(
            sample(&text, "ferry_runtime_worker_threads"),
            Some(1.0),
            "{}: {text}",
            n.jurisdiction
        );
    }
    let text = scrape(&mesh.entry);
    assert_eq!(
        sample(&text, "ferry_runtime_worker_threads"),
        Some(3.0),
        "entry: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_and_move_with_a_drain() {
    let keys = tempfile::tempdir().unwrap();
    let (kd, public) = rulings::authority(keys.path(), "authority");
    let specs = [Spec::new("CA", "exit"), Spec::new("PK", "relay")];
    let mesh = Mesh::start(&specs, &Options::gossip(public)).unwrap();
    let pk = &mesh.nodes[1];
    let text = wait_sample(
        pk,
        "ferry_peers{jurisdiction=\"CA\"}",
        1.0,
        Duration::from_secs(30),
    );
    for name in [
        "ferry_build_info",
        "ferry_links_active",
        "ferry_circuits_active",
        "ferry_link_bytes_total",
        "ferry_node_state",
        "ferry_node_ready",
        "ferry_node_info",
        "ferry_streams_closed_total",
        "ferry_node_exit_seconds",
        "ferry_peers",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{text}"
        );
    }
    assert_eq!(
        sample(&text, "ferry_node_state{state=\"active\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&text, "ferry_node_ready"), Some(1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "ferry_node_info{jurisdiction=\"PK\",roles=\"relay\"}"
        ),
        Some(1.0),
        "{text}"
    );
    // Labels hold jurisdictions and states, never node ids.
    for id in mesh.nodes.iter().map(|n| &n.id) {
        assert!(!text.contains(&id[..16]), "a node id in the metrics");
    }
    // Traffic and a refusal move the data-plane counters, once the entry
    // knows the mesh.
    for j in ["CA", "PK"] {
        let series = format!("ferry_peers{{jurisdiction=\"{j}\"}}");
        wait_sample(&mesh.entry, &series, 1.0, Duration::from_secs(30));
    }
    let page = http_server("counted\n").await.unwrap();
    let refused = mesh.connect(page.port(), "exit_in=JP").await.unwrap();
    assert_eq!(refused.err(), Some(2));
    let url = format!("http://127.0.0.1:{}/", page.port());
    let out = curl_socks_async(mesh.socks(), url).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("counted"),
        "curl: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        mesh.entry.log()
    );
    // The stream ends normally at both ends once curl has its page.
    let done = "ferry_streams_closed_total{reason=\"done\"}";
    let entry = wait_sample(&mesh.entry, done, 1.0, Duration::from_secs(10));
    wait_sample(&mesh.nodes[0], done, 1.0, Duration::from_secs(10));
    assert_eq!(total(&entry, "ferry_streams_closed_total"), 1.0, "{entry}");
    assert_eq!(total(&entry, "ferry_refusals_total"), 1.0, "{entry}");
    assert!(
        entry.contains("ferry_refusals_total{reason=\"constraint\"} 1"),
        "{entry}"
    );
    for name in [
        "ferry_circuits_opened_total",
        "ferry_circuit_build_seconds_count",
        "ferry_link_handshake_seconds_count",
        "ferry_streams_opened_total",
        "ferry_link_bytes_total{direction=\"sent\"}",
    ] {
        assert!(total(&entry, name) >= 1.0, "{name}:\n{entry}");
    }
    let exit = scrape(&mesh.nodes[0]);
    for name in [
        "ferry_streams_opened_total",
        "ferry_circuits_opened_total",
        "ferry_link_bytes_total{direction=\"received\"}",
    ] {
        assert!(total(&exit, name) >= 1.0, "{name}:\n{exit}");
    }
    let now = now_ms();
    let signed = rulings::sign(
        keys.path(),
        &kd,
        &Ruling::block("PK", now + 500, now + 30_000),
    );
    rulings::publish(&mesh.nodes[0], &signed).unwrap();
    let text = wait_sample(
        pk,
        "ferry_node_state{state=\"draining\"}",
        1.0,
        Duration::from_secs(10),
    );
    assert_eq!(sample(&text, "ferry_node_ready"), Some(0.0), "{text}");
    let left = sample(&text, "ferry_node_exit_seconds").unwrap();
    assert!(left > 0.0 && left <= 30.0, "exit in {left} s");
    assert_eq!(
        sample(&text, "ferry_ruling_version{ruling=\"test-PK\"}"),
        Some(1.0)
    );
    let entry = wait_sample(
        &mesh.entry,
        "ferry_ruling_version{ruling=\"test-PK\"}",
        1.0,
        Duration::from_secs(10),
    );
    assert!(
        entry.contains("# TYPE ferry_migrations_total counter"),
        "{entry}"
    );
}

/// A relay that a ruling drains refuses a new circuit and counts it as a
/// `ruling` refusal. The mesh is static (no gossip), so the entry learns of
/// the drain only from the refusal itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_circuit_refused_under_a_ruling_is_counted_as_one() {
    let keys = tempfile::tempdir().unwrap();
    let (kd, public) = rulings::authority(keys.path(), "authority");
    let specs = [Spec::new("CA", "exit"), Spec::new("PK", "relay")];
    let opts = Options {
        hops: 2,
        authority_keys: vec![public],
        ..Options::default()
    };
    let mesh = Mesh::start(&specs, &opts).unwrap();
    let pk = &mesh.nodes[1];
    let now = now_ms();
    let signed = rulings::sign(
        keys.path(),
        &kd,
        &Ruling::block("PK", now + 300, now + 60_000),
    );
    rulings::publish(pk, &signed).unwrap();
    let ruling = "ferry_refusals_total{reason=\"ruling\"}";
    let text = wait_sample(
        pk,
        "ferry_node_state{state=\"draining\"}",
        1.0,
        Duration::from_secs(10),
    );
    assert_eq!(sample(&text, ruling), Some(0.0), "{text}");
    let page = http_server("unreachable\n").await.unwrap();
    let refused = mesh.connect(page.port(), "").await.unwrap();
    assert_eq!(refused.err(), Some(2), "no path but through PK");
    let text = scrape(pk);
    assert!(sample(&text, ruling) >= Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "ferry_refusals_total{reason=\"draining\"}"),
        Some(0.0)
    );
}
