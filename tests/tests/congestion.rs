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

/// Round trips of 64 bytes on `s` (an echo), each answered within 10 s.
async fn ping_pong(s: &mut tokio::net::TcpStream, n: usize) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut back = [0u8; 64];
    for i in 0..n {
        s.write_all(&[i as u8; 64]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
            .await
            .map_err(|_| format!("round trip {i}: no echo within 10 s"))?
            .unwrap();
        assert_eq!(back, [i as u8; 64]);
    }
    Ok(())
}

/// Requests are answered while a bulk stream fills the same links: on a
/// circuit of their own (the entry puts one stream on each) and on the
/// bulk stream's own circuit. Each stream stopped for circuit room is
/// called in its turn, and the probe that brings the room back goes out
/// when a stream stops (a probe left queued once froze both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_beside_a_bulk_stream() {
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncWriteExt;
    for per_circuit in [1, 64] {
        let mesh = Mesh::start(
            &[Spec::new("DE", "relay"), Spec::new("IS", "exit")],
            &Options {
                hops: 2,
                entry_replace: vec![(
                    "max_streams_per_circuit = 64".into(),
                    format!("max_streams_per_circuit = {per_circuit}"),
                )],
                log_filter: Some("ferry_node=debug".into()),
                ..Options::default()
            },
        )
        .unwrap();
        let echo = ferry_tests::echo_server().await.unwrap();
        let mut s = mesh.open(echo.port(), "").await.unwrap();
        ping_pong(&mut s, 20).await.unwrap();
        drop(s);
        let (sink, count) = ferry_tests::counting_sink().await.unwrap();
        let mut bulk = mesh.open(sink.port(), "").await.unwrap();
        let blast = tokio::spawn(async move {
            let buf = vec![7u8; 64 * 1024];
            // Bounded: 8 GiB or 120 s, whichever comes first.
            let until = std::time::Instant::now() + Duration::from_secs(120);
            for _ in 0..(128 * 1024) {
                if std::time::Instant::now() > until || bulk.write_all(&buf).await.is_err() {
                    break;
                }
            }
        });
        while count.load(Ordering::Relaxed) < 64 * MIB as u64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(
                !blast.is_finished(),
                "the bulk stream ended early after {} bytes: {:#?}",
                count.load(Ordering::Relaxed),
                own_circuits(&mesh)
            );
        }
        let mut s = mesh.open(echo.port(), "").await.unwrap();
        if let Err(e) = ping_pong(&mut s, 200).await {
            panic!(
                "{e}, streams per circuit {per_circuit}: {:#?}",
                own_circuits(&mesh)
            );
        }
        let moved = count.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            count.load(Ordering::Relaxed) > moved,
            "the bulk stream stopped (streams per circuit {per_circuit})"
        );
        blast.abort();
    }
}
