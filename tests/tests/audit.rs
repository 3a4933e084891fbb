//! The entry's jurisdiction trail, as a compliance officer reads it:
//! `ferry audit export` after a class-scoped ruling drained a relay shows
//! each stream with its tenant, class, bytes and end, and every circuit it
//! used with each hop's jurisdiction, the enterprise stream's move off the
//! ruled region before the exit date included; a restart keeps the trail,
//! and the retention deletes it.

use ferry_node::authority::now_ms;
use ferry_tests::rulings::{self, Ruling};
use ferry_tests::{Mesh, Options, Spec, echo_server, run_ferry, socks_connect_as, tenant_block};
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `ferry audit export` of the entry since `since`, one record a line.
fn export(admin: &str, since: &str, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["audit", "export", "--admin", admin, "--since", since];
    args.extend(extra);
    run_ferry(&args)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Sends `n` bytes and reads them back from the echo server.
async fn echo(s: &mut TcpStream, n: usize, seed: u8) {
    let data: Vec<u8> = (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    s.write_all(&data).await.unwrap();
    let mut got = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(got == data, "the echo came back intact");
}

/// The jurisdictions of each circuit a record lists, in order.
fn paths(r: &Value) -> Vec<Vec<String>> {
    r["circuits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["hops"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h["jurisdiction"].as_str().unwrap().to_string())
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trail_shows_every_stream_and_its_move_and_outlives_a_restart() {
    let keys = tempfile::tempdir().unwrap();
    let (kd, public) = rulings::authority(keys.path(), "authority");
    let mut tenants = tenant_block("acme", "enterprise", "acme pw");
    tenants.push_str(&tenant_block("globex", "consumer", "globex pw"));
    let opts = Options {
        drain_secs: (30, 2, 2),
        hold: vec![2],
        entry_toml: tenants,
        entry_replace: vec![(
            "retention_secs = 7776000".into(),
            "retention_secs = 60".into(),
        )],
        ..Options::gossip(public)
    };
    // PK is the only relay at first; DE joins later, the way around it.
    let specs = [
        Spec::new("CA", "exit"),
        Spec::new("PK", "relay"),
        Spec::new("DE", "relay"),
    ];
    let mut mesh = Mesh::start(&specs, &opts).unwrap();
    mesh.wait_entry_knows_all().unwrap();
    let since = ferry_node::authority::fmt_time(now_ms() - 1_000);
    let target = echo_server().await.unwrap();
    let mut streams = Vec::new();
    for (tenant, pw) in [("acme", "acme pw"), ("globex", "globex pw")] {
        let mut s = socks_connect_as(mesh.socks(), "127.0.0.1", target.port(), Some((tenant, pw)))
            .await
            .unwrap()
            .unwrap_or_else(|code| panic!("{tenant}: SOCKS reply {code}"));
        echo(&mut s, 100_000, 1).await;
        streams.push(s);
    }
    mesh.start_held().unwrap();
    mesh.wait_entry_knows_all().unwrap();

    // Enterprise traffic out of PK: draining in a second, out in eight.
    let now = now_ms();
    let (from, exit) = (now + 1_000, now + 8_000);
    let mut ruling = Ruling::block("PK", from, exit);
    ruling.classes = &["enterprise"];
    rulings::publish(&mesh.entry, &rulings::sign(keys.path(), &kd, &ruling)).unwrap();
    tokio::time::sleep(Duration::from_millis((exit + 500).saturating_sub(now_ms()))).await;
    // Past the exit date, no enterprise session crosses PK (the metric a
    // dashboard watches), though both streams are still open.
    assert_eq!(
        mesh.entry
            .metric("ferry_ruled_region_sessions{phase=\"after_exit\",region=\"PK\"}"),
        Some(0.0)
    );
    for (i, s) in streams.iter_mut().enumerate() {
        echo(s, 50_000, 2 + i as u8).await;
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert!(rest.is_empty());
    }
    drop(streams);

    let admin = mesh.entry.admin.to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    let records = loop {
        let r = export(&admin, &since, &[]);
        if r.len() >= 2 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(records.len(), 2, "one record a stream: {records:#?}");
    let of = |t: &str| records.iter().find(|r| r["tenant"] == t).unwrap().clone();
    let acme = of("acme");
    assert_eq!(acme["class"], "enterprise");
    assert_eq!(
        (acme["bytes_up"].as_u64(), acme["bytes_down"].as_u64()),
        (Some(150_000), Some(150_000))
    );
    assert_eq!(acme["end"], "done", "{acme:#}");
    assert!(
        acme.get("target").is_none(),
        "no target unless record_targets: {acme:#}"
    );
    let p = paths(&acme);
    assert_eq!(
        p.first().unwrap(),
        &["NL", "PK", "CA"],
        "the entry, then each hop: {acme:#}"
    );
    assert_eq!(
        p.last().unwrap(),
        &["NL", "DE", "CA"],
        "moved around PK: {acme:#}"
    );
    let moved = acme["circuits"].as_array().unwrap().last().unwrap().clone();
    assert!(
        moved["why"]
            .as_str()
            .unwrap()
            .starts_with("moved: off leaving")
            && moved["why"].as_str().unwrap().contains("(PK)"),
        "{moved:#}"
    );
    let at = humantime::parse_rfc3339(moved["at"].as_str().unwrap()).unwrap();
    let at_ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        (from..exit).contains(&at_ms),
        "moved while draining, before the exit date ({from}..{exit}, at {at_ms}): {moved:#}"
    );
    // The consumer stream was not the ruling's: it stayed on its circuit.
    let globex = of("globex");
    assert_eq!(paths(&globex), [["NL", "PK", "CA"]], "{globex:#}");

    let only = export(&admin, &since, &["--tenant", "acme"]);
    assert_eq!(only.len(), 1);
    let csv = run_ferry(&[
        "audit", "export", "--admin", &admin, "--since", &since, "--format", "csv",
    ])
    .unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "a header and a row a stream:\n{csv}");
    assert!(
        lines[0].starts_with("tenant,class,target,started,ended"),
        "{csv}"
    );
    assert!(
        csv.contains("opened NL:") && csv.contains(">PK:") && csv.contains("moved: off leaving"),
        "{csv}"
    );

    // The exit report: the enterprise session crossed PK before the
    // ruling and while it drained, and moved out; none after the exit date.
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    run_ferry(&[
        "audit",
        "report",
        "--admin",
        &admin,
        "--ruling",
        "test-PK",
        "--out",
        report.to_str().unwrap(),
    ])
    .unwrap();
    let signed: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let body: Value = serde_json::from_str(signed["body"].as_str().unwrap()).unwrap();
    let body = &body;
    assert_eq!(
        body["sessions"], 1,
        "only the enterprise session is in scope: {body:#}"
    );
    assert_eq!(body["crossed"]["before"], 1, "{body:#}");
    assert_eq!(body["crossed"]["draining"], 1, "{body:#}");
    assert_eq!(body["crossed"]["after_exit"], 0, "{body:#}");
    assert_eq!(
        (body["moved_out"].as_u64(), body["closed"].as_u64()),
        (Some(1), Some(0))
    );
    let ok = run_ferry(&[
        "audit",
        "verify",
        report.to_str().unwrap(),
        "--node",
        &mesh.entry.id,
    ])
    .unwrap();
    assert!(
        ok.contains(&format!("valid: signed by node {}", mesh.entry.id)),
        "{ok}"
    );
    assert!(ok.contains("0 after the exit date"), "{ok}");
    // Changed by one digit, it no longer verifies; nor under another node.
    let text = std::fs::read_to_string(&report).unwrap();
    let tampered = dir.path().join("tampered.json");
    std::fs::write(
        &tampered,
        text.replacen(r#"\"draining\": 1"#, r#"\"draining\": 0"#, 1),
    )
    .unwrap();
    assert_ne!(
        std::fs::read_to_string(&tampered).unwrap(),
        text,
        "the edit took"
    );
    let err = run_ferry(&["audit", "verify", tampered.to_str().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("NOT VALID") && err.contains("was changed"),
        "{err}"
    );
    let other = mesh.nodes[0].id.clone();
    let err = run_ferry(&[
        "audit",
        "verify",
        report.to_str().unwrap(),
        "--node",
        &other,
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("not by"), "{err}");

    // A restart keeps the trail.
    mesh.entry.kill9_and_restart().unwrap();
    assert_eq!(
        export(&admin, &since, &[]),
        records,
        "the same records after kill -9"
    );

    // Retention (60 s here): once they are older, they are deleted.
    let deadline = Instant::now() + Duration::from_secs(100);
    while !export(&admin, &since, &[]).is_empty() {
        assert!(
            Instant::now() < deadline,
            "records older than the retention are kept"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// A stream still open when the entry stops (SIGINT) is recorded too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_open_at_a_stop_is_recorded() {
    let mut mesh = Mesh::one_exit(vec![]).unwrap();
    let since = ferry_node::authority::fmt_time(now_ms() - 1_000);
    let target = echo_server().await.unwrap();
    let mut s = mesh.open(target.port(), "").await.unwrap();
    echo(&mut s, 10_000, 7).await;
    mesh.entry.signal("INT");
    let deadline = Instant::now() + Duration::from_secs(20);
    while mesh.entry.alive() {
        assert!(Instant::now() < deadline, "the entry did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(s);
    mesh.entry.kill9_and_restart().unwrap();
    let admin = mesh.entry.admin.to_string();
    let records = export(&admin, &since, &[]);
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["bytes_up"], 10_000, "{:#}", records[0]);
    assert_eq!(paths(&records[0]), [["NL", "CA"]]);
}
