//! The admin API against what a hostile web page or a careless operator
//! sends, with a real node: a drain dated past what RFC 3339 can write is
//! refused (it used to panic the handler, be persisted, and panic the node
//! at every start after); a cross-origin "simple" POST (text/plain) is
//! refused (CSRF); a request for another host name is refused (DNS
//! rebinding). The node keeps serving, and restarts cleanly. Idle
//! connections to the metrics port are bounded.

use ferry_tests::{Mesh, Options, Spec};
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// POSTs `body` as `content_type` with the `Host` header `host` (the
/// listen address if `None`); the status and the JSON answer.
fn post(
    admin: &str,
    path: &str,
    content_type: &str,
    host: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let mut req = agent()
        .post(&format!("http://{admin}{path}"))
        .header("content-type", content_type);
    if let Some(h) = host {
        req = req.header("host", h);
    }
    let mut resp = req.send(body.as_bytes()).expect("the admin API answers");
    let code = resp.status().as_u16();
    let v = resp.body_mut().read_json().unwrap_or(Value::Null);
    (code, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_what_a_page_or_a_typo_sends() {
    let mut mesh = Mesh::start(
        &[Spec::new("CA", "exit")],
        &Options {
            hops: 1,
            ..Options::default()
        },
    )
    .unwrap();
    let admin = mesh.nodes[0].admin.to_string();
    let state = |mesh: &Mesh| mesh.nodes[0].status().unwrap()["state"].clone();
    // A drain ending in the year 31,000,000: refused, not persisted.
    let far = r#"{"in_secs": 1000000000000000}"#;
    let (code, v) = post(&admin, "/v1/drain", "application/json", None, far);
    assert_eq!(code, 400, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("more than a year ahead"),
        "{v}"
    );
    let (code, v) = post(
        &admin,
        "/v1/drain",
        "application/json",
        None,
        r#"{"exit_by": "9999-12-31T00:00:00Z"}"#,
    );
    assert_eq!(code, 400, "{v}");
    assert_eq!(state(&mesh), "active");
    // A page's cross-origin POST can only be a "simple" one: text/plain.
    let (code, v) = post(
        &admin,
        "/v1/drain",
        "text/plain",
        None,
        r#"{"in_secs": 60}"#,
    );
    assert_eq!(code, 415, "{v}");
    assert_eq!(v["error"], "content_type");
    assert_eq!(state(&mesh), "active", "the page did not drain the node");
    // DNS rebinding: the page's own name in Host.
    let (code, v) = post(
        &admin,
        "/v1/drain",
        "application/json",
        Some("evil.example:80"),
        r#"{"in_secs": 60}"#,
    );
    assert_eq!(code, 421, "{v}");
    let mut resp = agent()
        .get(&format!("http://{admin}/v1/status"))
        .header("host", "evil.example")
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 421, "status is not readable either");
    let _ = resp.body_mut().read_to_string();
    // The operator's own tools still work, by IP or as localhost.
    let port = mesh.nodes[0].admin.port();
    let (code, v) = post(
        &admin,
        "/v1/drain",
        "application/json",
        Some(&format!("localhost:{port}")),
        r#"{"in_secs": 600, "persist": true}"#,
    );
    assert_eq!(code, 200, "{v}");
    let node = &mut mesh.nodes[0];
    node.wait_state("draining", Duration::from_secs(5)).unwrap();
    // What was persisted can be read back: the node restarts, draining.
    node.kill9_and_restart().unwrap();
    node.wait_state("draining", Duration::from_secs(10))
        .unwrap();
    let out = ferry_tests::run_ferry(&["drain", "--admin", &admin, "--cancel"]).unwrap();
    assert!(out.contains("cancelled"), "{out}");
    node.wait_state("active", Duration::from_secs(5)).unwrap();
}

/// With `[admin] token_file`, every admin request but the probes must carry
/// the token: without it (or with another) the node answers 401 and
/// nothing changes; `ferry status` and `ferry drain` send it from
/// `--admin-token-file` or `FERRY_ADMIN_TOKEN_FILE`. (Before, anyone who
/// reached the port, another local user among them, could drain the node.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_makes_the_admin_api_ask_for_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "c0ffee00c0ffee00c0ffee00c0ffee00\n").unwrap();
    let mesh = Mesh::start(
        &[Spec::new("CA", "exit")],
        &Options {
            hops: 1,
            entry_replace: vec![(
                "# token_file = \"/etc/ferry/admin.token\"".into(),
                format!("token_file = \"{}\"", token_file.display()),
            )],
            ..Options::default()
        },
    )
    .unwrap();
    let admin = mesh.entry.admin.to_string();
    let get = |path: &str, auth: Option<&str>| {
        let mut req = agent().get(&format!("http://{admin}{path}"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let mut resp = req.call().unwrap();
        let code = resp.status().as_u16();
        (code, resp.body_mut().read_to_string().unwrap_or_default())
    };
    let (code, body) = get("/v1/status", None);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("\"error\":\"token\""), "{body}");
    let (code, _) = get(
        "/v1/status",
        Some("Bearer c0ffee00c0ffee00c0ffee00c0ffee01"),
    );
    assert_eq!(code, 401, "another token");
    let (code, _) = get("/v1/status", Some("Basic YTpi"));
    assert_eq!(code, 401, "another scheme");
    let (code, _) = get(
        "/v1/status",
        Some("Bearer c0ffee00c0ffee00c0ffee00c0ffee00"),
    );
    assert_eq!(code, 200);
    assert_eq!(get("/livez", None).0, 200, "probes need no token");
    assert_eq!(get("/readyz", None).0, 200, "probes need no token");
    let (code, v) = post(
        &admin,
        "/v1/drain",
        "application/json",
        None,
        r#"{"in_secs": 60}"#,
    );
    assert_eq!(code, 401, "{v}");

    // The CLI: refused without the token, served with it.
    let err = ferry_tests::run_ferry(&["status", "--admin", &admin]).unwrap_err();
    assert!(err.to_string().contains("refused (token)"), "{err:#}");
    let tf = token_file.to_str().unwrap();
    let out =
        ferry_tests::run_ferry(&["--admin-token-file", tf, "status", "--admin", &admin]).unwrap();
    assert!(out.contains("active"), "{out}");
    let out = std::process::Command::new(ferry_tests::ferry_bin().unwrap())
        .args(["drain", "--admin", &admin, "--in", "10m"])
        .env("FERRY_ADMIN_TOKEN_FILE", tf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("draining; exit by"), "{said}");
}

/// 300 connections to the metrics listener from one address that send
/// nothing (what anyone who reaches a cluster's metrics port can open):
/// the node keeps `admin::PER_ADDRESS` of them and closes the rest on
/// arrival, counted; a probe from another address is answered meanwhile;
/// streams go on; a request trickled and never finished is closed after
/// `admin::IDLE`; and scrapes are answered once the connections go.
/// Before, `axum::serve` accepted every one, each holding a descriptor
/// for good (no read timeout), until the node's file table was full and
/// its links could not be accepted either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_to_the_metrics_port_are_bounded() {
    let mesh = Mesh::one_exit(Vec::new()).unwrap();
    let exit = &mesh.nodes[0];
    let metrics = exit.metrics;
    let limit = ferry_node::admin::PER_ADDRESS as usize;
    let idle = exit.flood_within(metrics, 300, limit, 4).await;
    assert!(idle.len() > 100, "only {} connected", idle.len());
    // A scrape from another address is answered (this address has its
    // share), and counts the rest as refused.
    let probe = |from: &'static str, request: &'static [u8]| async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let mut s = sock.connect(metrics).await.unwrap();
        s.write_all(request).await.unwrap();
        s
    };
    let mut s = probe(
        "127.0.0.2",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let mut page = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut page))
        .await
        .expect("the scrape answered within 3 s")
        .unwrap();
    let page = String::from_utf8_lossy(&page);
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    let refused: f64 = page
        .lines()
        .find_map(|l| l.strip_prefix("ferry_refusals_total{reason=\"connections\"} "))
        .expect("the refusal series")
        .trim()
        .parse()
        .unwrap();
    assert!(refused >= 100.0, "{refused} connections counted as refused");
    // A request begun and never finished holds its place for IDLE at most.
    let mut s = probe("127.0.0.3", b"GET /livez HTTP/1.1\r\n").await;
    let started = std::time::Instant::now();
    let idle_for = ferry_node::admin::IDLE;
    let mut rest = Vec::new();
    tokio::time::timeout(idle_for + Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("a trickled request was not closed")
        .ok();
    assert!(
        started.elapsed() + Duration::from_secs(1) >= idle_for,
        "closed after {:?}, before IDLE",
        started.elapsed()
    );
    // Streams still go through.
    mesh.echo_ping().await.unwrap();
    // Once they go, scrapes are answered again.
    drop(idle);
    let scraped = tokio::task::spawn_blocking(move || {
        agent()
            .get(&format!("http://{metrics}/metrics"))
            .call()
            .map(|r| r.status().as_u16())
    })
    .await
    .unwrap();
    assert_eq!(scraped.ok(), Some(200));
}
