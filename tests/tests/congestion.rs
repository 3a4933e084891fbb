//! Congestion control end to end, with real processes: over a path 40 ms
//! long (a delaying proxy: this kernel has no `netem`) the entry's window
//! grows past its start to carry the path, `ferry status` shows the
//! circuit's round trip and window, and an entry with congestion control
//! off (as one built before it: it offers no probes) still carries every
//! byte, unprobed.

use ferry_tests::{Mesh, Options, Spec, pattern_server, pattern_transfer, run_ferry};
use std::time::Duration;

const MIB: usize = 1024 * 1024;

/// The entry's own circuits, from `ferry status --json`.
fn own_circuits(mesh: &Mesh) -> Vec<serde_json::Value> {
    let admin = mesh.entry.admin.to_string();
    let v: serde_json::Value =
        serde_json::from_str(&run_ferry(&["status", "--admin", &admin, "--json"]).unwrap())
            .unwrap();
    v["origin"]["circuits"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_grows_to_carry_a_long_path_and_status_shows_it() {
    let mesh = Mesh::start(
        &[Spec::new("CA", "exit")],
        &Options {
            hops: 1,
            entry_delay: vec![(0, Duration::from_millis(20))],
            ..Options::default()
        },
    )
    .unwrap();
    let (target, mut uploads) = pattern_server().await.unwrap();
    pattern_transfer(mesh.socks(), target, 7, 24 * MIB, None, None)
        .await
        .unwrap();
    let (seed, n, digest) = tokio::time::timeout(Duration::from_secs(30), uploads.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((seed, n), (7, 24 * MIB));
    assert_eq!(digest, ferry_tests::Pattern::digest(7, 24 * MIB));

    let own = own_circuits(&mesh);
    assert_eq!(own.len(), 1, "{own:?}");
    let cc = &own[0]["congestion"];
    let base = cc["base_rtt_us"].as_u64().unwrap();
    assert!(
        (40_000..400_000).contains(&base),
        "the path is 40 ms long: least round trip {base} µs ({cc})"
    );
    let window = cc["window_bytes"].as_u64().unwrap();
    assert!(
        window > ferry_circuit::congestion::INITIAL_WINDOW,
        "24 MiB over 40 ms and the window never grew: {cc}"
    );
    let admin = mesh.entry.admin.to_string();
    let text = run_ferry(&["status", "--admin", &admin]).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("streams ") && l.contains("CA"))
        .unwrap_or_else(|| panic!("no circuit line:\n{text}"));
    assert!(
        line.contains(" ms (least ") && line.contains(" KiB"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_that_offers_no_probes_still_carries_every_byte() {
    let mesh = Mesh::start(
        &ferry_tests::THREE,
        &Options {
            entry_replace: vec![(
                "congestion_control = true".into(),
                "congestion_control = false".into(),
            )],
            ..Options::default()
        },
    )
    .unwrap();
    let (target, mut uploads) = pattern_server().await.unwrap();
    let tasks: Vec<_> = (0..4u64)
        .map(|seed| ferry_tests::spawn_transfer(mesh.socks(), target, seed, 8 * MIB, None, None))
        .collect();
    ferry_tests::finish_transfers(tasks, &mut uploads, &[0, 1, 2, 3], 8 * MIB)
        .await
        .unwrap();
    let own = own_circuits(&mesh);
    assert!(!own.is_empty());
    for c in &own {
        assert!(c["congestion"].is_null(), "probed with it off: {c}");
    }
}
