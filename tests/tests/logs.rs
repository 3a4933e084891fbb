//! Logs as an SRE reads them: `--log-format json` gives one JSON object a
//! line, with the link, circuit and stream spans (short ids) around each
//! event; and at `info` no log holds payload, client target addresses or
//! key material.

use ferry_tests::{Mesh, Options, THREE, curl_socks_async, http_server};
use serde_json::Value;

/// Each line of a node's log as JSON (a line that is not JSON fails).
fn json_lines(log: &str, who: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{who}: not a JSON log line ({e}): {l}"))
        })
        .collect()
}

/// The names of the spans around an event, innermost last.
fn spans(v: &Value) -> Vec<String> {
    v["spans"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s["name"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn find<'a>(lines: &'a [Value], message: &str) -> &'a Value {
    lines
        .iter()
        .find(|v| v["fields"]["message"] == message)
        .unwrap_or_else(|| panic!("no `{message}` event in {lines:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_spans_and_no_secrets() {
    let opts = Options {
        log_json: true,
        ..Options::default()
    };
    let mesh = Mesh::start(&THREE, &opts).unwrap();
    let marker = "payload-7f3a9c-never-logged";
    let page = http_server(marker).await.unwrap();
    let url = format!("http://127.0.0.1:{}/", page.port());
    let out = curl_socks_async(mesh.socks(), url).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains(marker));
    // A target that refuses: the exit logs why, inside the stream's span.
    let refused = mesh.connect(1, "").await.unwrap();
    assert_eq!(refused.err(), Some(5), "connection refused");
    let exit = &mesh.nodes[2];
    exit.wait_log("stream refused at exit", std::time::Duration::from_secs(10))
        .unwrap();

    let entry = json_lines(&mesh.entry.log(), "entry");
    let built = find(&entry, "circuit built");
    assert_eq!(built["level"], "INFO");
    assert!(built["timestamp"].is_string());
    let s = spans(built);
    assert!(s.ends_with(&["socks".into(), "circuit".into()]), "{built}");
    let circ = &built["spans"][s.len() - 1]["circ"];
    assert!(circ.is_u64(), "the circuit span has its id: {built}");
    let path = built["fields"]["path"].as_str().unwrap();
    assert!(
        path.ends_with("-> IS") && path.split(" -> ").count() == 3,
        "{built}"
    );

    let exit_lines = json_lines(&exit.log(), "exit");
    let refusal = find(&exit_lines, "stream refused at exit");
    let s = spans(refusal);
    assert!(s.ends_with(&["link".into(), "stream".into()]), "{refusal}");
    let link = &refusal["spans"][s.len() - 2];
    assert!(
        link["id"].is_u64() && link["peer"].as_str().is_some_and(|p| p.len() <= 16),
        "{refusal}"
    );
    let stream = &refusal["spans"][s.len() - 1];
    assert!(
        stream["circ"].is_u64() && stream["stream"].is_u64(),
        "{refusal}"
    );

    // Nothing a relay must not keep: payload, the client's target, keys.
    let target = format!("127.0.0.1:{}", page.port());
    for p in mesh.all() {
        let log = p.log();
        json_lines(&log, &p.jurisdiction);
        assert!(
            !log.contains(marker),
            "{}: payload in the log",
            p.jurisdiction
        );
        assert!(
            !log.contains(&target),
            "{}: the client's target in the log",
            p.jurisdiction
        );
        for key in ["identity.key", "noise.key"] {
            let secret = std::fs::read_to_string(p.dir.join(key)).unwrap();
            assert!(
                !log.contains(secret.trim()),
                "{}: {key} in the log",
                p.jurisdiction
            );
        }
    }
}
