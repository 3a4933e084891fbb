//! Measured round-trip times, with real processes: each link pings its
//! peer every second; the entry prefers a relay near it in RTT over an
//! equal-capacity one placed 50 ms away (a delaying proxy: this kernel has
//! no `netem`), measured over thousands of picks; and a peer that stops
//! answering (SIGSTOP) is declared dead within the keepalive timeout.

use ferry_tests::{Mesh, Options, Spec, echo_server, run_ferry};
use serde_json::Value;
use std::time::{Duration, Instant};

/// The entry's view of a peer by jurisdiction, from `/v1/status`.
fn peer(status: &Value, jurisdiction: &str) -> Value {
    status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["jurisdiction"] == jurisdiction)
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_entry_prefers_the_relay_nearer_in_rtt() {
    let specs = [
        Spec::new("DE", "relay"),
        Spec::new("IS", "relay"),
        Spec::new("CA", "exit"),
    ];
    let mesh = Mesh::start(
        &specs,
        &Options {
            hops: 2,
            entry_delay: vec![(1, Duration::from_millis(25))],
            ..Options::default()
        },
    )
    .unwrap();
    let target = echo_server().await.unwrap();
    // A stream through each relay, so the entry has a link to both.
    let mut held = Vec::new();
    for avoid in ["IS", "DE"] {
        let s = mesh
            .connect(target.port(), &format!("exclude={avoid}"))
            .await
            .unwrap()
            .unwrap_or_else(|code| panic!("a path avoiding {avoid}: SOCKS reply {code}"));
        held.push(s);
    }
    // Both links have a few samples.
    let status = mesh
        .entry
        .wait_status("RTT samples of both relays", Duration::from_secs(20), |v| {
            ["DE", "IS"]
                .iter()
                .all(|j| peer(v, j)["rtt"]["samples"].as_u64() >= Some(3))
        })
        .unwrap();
    let rtt = |j: &str| peer(&status, j)["rtt"]["srtt_ms"].as_f64().unwrap();
    assert!(rtt("IS") >= 45.0, "IS is 50 ms away: {}", rtt("IS"));
    assert!(rtt("DE") < 20.0, "DE is near: {}", rtt("DE"));
    assert!(
        peer(&status, "IS")["rtt"]["min_ms"].as_f64().unwrap() >= 45.0,
        "the least sample is still the distance"
    );
    // Thousands of fresh picks: the near relay carries about twice the
    // far one's share (weights 1 and 1/(1 + 50/50)).
    let paths = mesh.entry.paths(4000).unwrap();
    let on = |j: &str| {
        paths
            .iter()
            .find(|(_, pj, _)| pj == j)
            .map_or(0.0, |(.., n)| *n as f64)
    };
    let share = on("DE") / (on("DE") + on("IS"));
    println!(
        "srtt DE {:.2} ms, IS {:.2} ms; first hops DE {} IS {} (DE share {share:.3})",
        rtt("DE"),
        rtt("IS"),
        on("DE"),
        on("IS")
    );
    assert!(
        (0.6..0.75).contains(&share),
        "the near relay's share of 4000 picks is {share:.3}, not about 2/3"
    );
    // `ferry status` shows each peer's RTT.
    let admin = mesh.entry.admin.to_string();
    let text = tokio::task::spawn_blocking(move || run_ferry(&["status", "--admin", &admin]))
        .await
        .unwrap()
        .unwrap();
    let line = |j: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(j) && l.contains("rtt"))
            .unwrap_or_else(|| panic!("no RTT line for {j}:\n{text}"))
            .to_string()
    };
    assert!(line("IS").contains(" ms (min "), "{}", line("IS"));
    assert!(line("DE").contains(" ms (min "), "{}", line("DE"));
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_is_declared_dead() {
    let mesh = Mesh::start(&ferry_tests::THREE, &Options::default()).unwrap();
    let target = echo_server().await.unwrap();
    let _s = mesh.connect(target.port(), "").await.unwrap().unwrap();
    let status = mesh.entry.status().unwrap();
    let first = status["origin"]["circuits"][0]["path_ids"][0]
        .as_str()
        .unwrap()
        .to_string();
    let hop = mesh
        .nodes
        .iter()
        .find(|n| n.id == first)
        .expect("the first hop is a mesh node");
    let dead = || {
        mesh.entry
            .metric("ferry_links_closed_total{reason=\"dead\"}")
            .unwrap_or(-1.0)
    };
    assert_eq!(dead(), 0.0);
    hop.signal("STOP");
    let stopped = Instant::now();
    while dead() < 1.0 {
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "no link declared dead 10 s after its peer stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = stopped.elapsed();
    hop.signal("CONT");
    println!("declared dead {:.1} s after SIGSTOP", took.as_secs_f64());
    // DEAD_AFTER (4 s) of silence, noticed at a keepalive tick (1 s).
    assert!(
        took >= Duration::from_secs(3) && took <= Duration::from_secs(7),
        "declared dead after {took:?}"
    );
    assert!(mesh.entry.log().contains("link dead"));
}
