//! What a node takes on for others is bounded, with real processes: one
//! neighbour gets at most `[limits] circuits_per_link` circuits (refused
//! past it with DESTROY capacity, and counted), and circuits nobody uses
//! close by themselves at every hop while a quiet stream's circuit stays;
//! an exit's name lookups in flight are bounded; a target that never reads
//! holds about the bytes it was sent; a neighbour that stops reading loses
//! its link.

use ferry_proto::pb::DestroyReason;
use ferry_tests::raw::{RawLink, fake_entry};
use ferry_tests::{Mesh, Options};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Before, circuits per link (and in all) were unbounded: a hostile
/// neighbour could open them until the node ran out of memory, and
/// `RefusalReason::Capacity` was never used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_neighbour_gets_at_most_its_share_of_circuits() {
    let (fake, block) = fake_entry();
    let mesh = Mesh::start(
        &ferry_tests::THREE,
        &Options {
            extra_peers: vec![block],
            node_replace: vec![(
                "circuits_per_link = 4096".into(),
                "circuits_per_link = 5".into(),
            )],
            ..Options::default()
        },
    )
    .unwrap();
    let node = &mesh.nodes[0];
    let mut link = RawLink::open(node, &fake).await;
    for c in 1..=5 {
        let (built, how) = link.build(0x8000_0000 + c, &[node]).await;
        assert_eq!((built, how.as_str()), (1, "built"), "circuit {c}");
    }
    let (built, how) = link.build(0x8000_0006, &[node]).await;
    assert_eq!(
        (built, how.as_str()),
        (0, "destroyed: DESTROY_REASON_CAPACITY")
    );
    assert_eq!(
        node.metric("ferry_refusals_total{reason=\"capacity\"}"),
        Some(1.0)
    );
    node.wait_log(
        "limit of circuits ([limits] circuits_per_link)",
        Duration::from_secs(5),
    )
    .unwrap();
    // A circuit closed frees its place.
    link.send(&ferry_node::switch::destroy_cell(
        0x8000_0001,
        DestroyReason::Finished,
    ))
    .await;
    let (built, how) = link.build(0x8000_0007, &[node]).await;
    assert_eq!((built, how.as_str()), (1, "built"));
    // Other neighbours are not held back: the mesh's own entry still gets
    // its circuits through this node.
    mesh.echo_ping().await.unwrap();
}

/// With `idle_circuit_secs = 2`: a stream left quiet for three periods
/// still carries its bytes (the entry's keepalives keep its circuit), and
/// once it ends the circuits close at every hop, counted as `idle`.
/// Before, nothing closed a circuit nobody used, at relays or in the
/// entry's pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_circuits_close_and_quiet_streams_stay() {
    let idle = (
        "idle_circuit_secs = 600".to_string(),
        "idle_circuit_secs = 2".to_string(),
    );
    let mesh = Mesh::start(
        &ferry_tests::THREE,
        &Options {
            node_replace: vec![idle],
            ..Options::default()
        },
    )
    .unwrap();
    let target = ferry_tests::echo_server().await.unwrap();
    let mut s = mesh.open(target.port(), "").await.expect("SOCKS success");
    s.write_all(b"before").await.unwrap();
    let mut got = [0u8; 6];
    s.read_exact(&mut got).await.unwrap();
    // Quiet for three idle periods: what an SSH session or a mail client's
    // IDLE does.
    tokio::time::sleep(Duration::from_secs(6)).await;
    s.write_all(b"after!").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
        .await
        .expect("the quiet stream answers")
        .unwrap();
    assert_eq!(&got, b"after!");
    for n in &mesh.nodes {
        assert_eq!(
            n.metric("ferry_circuits_closed_total{reason=\"idle\"}"),
            Some(0.0),
            "{}: a circuit with a stream was closed as idle",
            n.jurisdiction
        );
    }
    drop(s);
    // Every hop closes the circuit by itself once it is unused.
    let t0 = Instant::now();
    loop {
        let active: f64 = mesh
            .nodes
            .iter()
            .filter_map(|n| n.metric("ferry_circuits_active"))
            .sum();
        if active == 0.0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{active} circuits still open at the relays"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let closed: f64 = mesh
        .nodes
        .iter()
        .chain([&mesh.entry])
        .filter_map(|n| n.metric("ferry_circuits_closed_total{reason=\"idle\"}"))
        .sum();
    assert!(closed >= 1.0, "closed as idle: {closed}");
    println!("circuits closed as idle, all nodes: {closed}");
}

/// A hostile origin sends 400,000 one-byte DATA cells (400 KB, well inside
/// the stream's 2 MiB window) to a target that never reads. Once the
/// socket's buffers are full the exit queues them: each used to keep its
/// frame, the read chunk it came in and a queue entry (about 100 bytes
/// for each byte); now the queue copies them into one compact buffer.
/// The exit's resident memory is measured before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_cells_to_a_target_that_never_reads_hold_about_their_bytes() {
    use ferry_circuit::{Event, HEADROOM, Outcome};
    const CELLS: usize = 400_000;
    let (fake, block) = fake_entry();
    let mesh = Mesh::one_exit(vec![block]).unwrap();
    let exit = &mesh.nodes[0];
    // Takes connections and never reads.
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = target.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut socks = Vec::new();
        while let Ok((s, _)) = target.accept().await {
            socks.push(s);
        }
    });
    let mut link = RawLink::open(exit, &fake).await;
    let mut s = link.circuit(0x8000_0001, &[exit]).await;
    let id = s.open("127.0.0.1", port).unwrap();
    link.flush(&mut s).await;
    loop {
        s.handle_relay(link.next().await, 0).unwrap();
        if std::iter::from_fn(|| s.poll_event()).any(|e| matches!(e, Event::Connected { .. })) {
            break;
        }
    }
    let before = exit.rss_bytes().unwrap();
    for i in 0..CELLS {
        let mut r = bytes::BytesMut::zeroed(HEADROOM + 1);
        r[HEADROOM] = (i % 251) as u8;
        assert!(
            matches!(s.send_data(id, r, 0).unwrap(), Outcome::Done),
            "cell {i}: no credit"
        );
        if i % 4096 == 4095 {
            link.flush(&mut s).await;
        }
    }
    link.flush(&mut s).await;
    // The exit has them all once its RESIDENT memory stops growing; give it
    // until its log says nothing more and the sample is stable.
    let mut last = 0;
    let mut after = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = exit.rss_bytes().unwrap();
        if after == last {
            break;
        }
        last = after;
    }
    let grew = after.saturating_sub(before);
    println!(
        "{CELLS} one-byte cells queued at the exit: resident memory grew by {:.1} MiB",
        grew as f64 / (1 << 20) as f64
    );
    assert!(
        grew < 6 << 20,
        "the exit holds {grew} bytes more for {CELLS} bytes of payload"
    );
    held.abort();
}

/// The names in DNS queries that reach `sock`, as they arrive.
async fn record_queries(
    sock: tokio::net::UdpSocket,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let mut buf = [0u8; 1500];
    while let Ok((n, _)) = sock.recv_from(&mut buf).await {
        // The question's name: length-prefixed labels after the 12-byte header.
        let mut labels = Vec::new();
        let mut at = 12;
        while at < n && buf[at] != 0 {
            let len = buf[at] as usize;
            let Some(label) = buf.get(at + 1..at + 1 + len) else {
                break;
            };
            labels.push(String::from_utf8_lossy(label).into_owned());
            at += 1 + len;
        }
        seen.lock().unwrap().push(labels.join("."));
    }
}

/// With `dns_lookups = 3` and a resolver that never answers (the exit runs
/// in its own mount namespace, whose `/etc/resolv.conf` names a UDP socket
/// this test holds and never answers from): three lookups wait, a fourth
/// name is refused at once and counted (`reason="dns"`) without reaching
/// the resolver, an address needing no lookup still connects, and once
/// the system resolver gives up on the three (its timeout, 12 s) names are
/// looked up again. Before, nothing bounded lookups: every BEGIN with a
/// slow name held one of tokio's blocking threads for the resolver's
/// whole timeout, after the stream itself had timed out. (Needs root, for
/// `unshare` and port 53.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_lookups_in_flight_are_bounded_at_the_exit() {
    use ferry_tests::socks_connect;
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let resolver = "127.83.0.1";
    let sock = tokio::net::UdpSocket::bind((resolver, 53))
        .await
        .expect("binding a UDP socket on port 53 (this test needs root)");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = tokio::spawn(record_queries(sock, seen.clone()));
    let conf = dir.path().join("resolv.conf");
    std::fs::write(
        &conf,
        format!("nameserver {resolver}\noptions timeout:12 attempts:1\n"),
    )
    .unwrap();
    let mount = format!(
        "mount --bind {} /etc/resolv.conf && exec \"$@\"",
        conf.display()
    );
    let mesh = Mesh::start(
        &[ferry_tests::Spec::new("CA", "exit")],
        &Options {
            hops: 1,
            node_replace: vec![("dns_lookups = 64".into(), "dns_lookups = 3".into())],
            wrap: vec![(
                0,
                ["unshare", "--mount", "sh", "-c", &mount, "sh"]
                    .map(String::from)
                    .to_vec(),
            )],
            ..Options::default()
        },
    )
    .unwrap();
    let exit = &mesh.nodes[0];
    let socks = mesh.socks();
    let asked = |name: &str| seen.lock().unwrap().iter().any(|n| n == name);
    let waiting: Vec<_> = ["slow-1.example", "slow-2.example", "slow-3.example"]
        .into_iter()
        .map(|name| tokio::spawn(async move { socks_connect(socks, name, 80).await }))
        .collect();
    let until = Instant::now() + Duration::from_secs(15);
    for name in ["slow-1.example", "slow-2.example", "slow-3.example"] {
        while !asked(name) {
            assert!(Instant::now() < until, "the resolver never saw {name}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let started = Instant::now();
    let fourth = socks_connect(socks, "slow-4.example", 80).await.unwrap();
    assert_eq!(fourth.err(), Some(1), "the fourth name: general failure");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once, not after a lookup: {:?}",
        started.elapsed()
    );
    assert!(
        !asked("slow-4.example"),
        "the fourth name reached the resolver"
    );
    assert_eq!(
        exit.metric("ferry_refusals_total{reason=\"dns\"}"),
        Some(1.0)
    );
    // An address needs no lookup, and still connects.
    mesh.echo_ping()
        .await
        .expect("an address connects while lookups wait");
    // The three streams end (the exit's connect timeout, 10 s); their
    // lookups hold their places until the resolver gives up (12 s).
    for w in waiting {
        let r = w.await.unwrap().unwrap();
        assert!(r.is_err(), "a name nobody answers did not connect");
    }
    let until = Instant::now() + Duration::from_secs(30);
    while !asked("slow-5.example") {
        assert!(Instant::now() < until, "lookups never came back");
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            socks_connect(socks, "slow-5.example", 80),
        )
        .await;
    }
    recorder.abort();
}

/// A neighbour that keeps its link alive (a PING every second) but reads
/// nothing: once the exit's socket has taken no byte for
/// `link::WRITE_STALL` (20 s), the exit closes the link, counted as
/// `stalled`, and goes on serving others. Before, such a link stayed open
/// for good, holding what waited for it (up to a quarter of the node's
/// forwarding budget) and its circuits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neighbour_that_stops_reading_loses_its_link() {
    let (fake, block) = fake_entry();
    let mesh = Mesh::one_exit(vec![block]).unwrap();
    let exit = &mesh.nodes[0];
    // Sends 16 MiB to every connection, then holds it.
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = target.local_addr().unwrap().port();
    let sender = tokio::spawn(async move {
        while let Ok((mut s, _)) = target.accept().await {
            tokio::spawn(async move {
                let chunk = vec![0x5a_u8; 64 << 10];
                for _ in 0..256 {
                    if s.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_secs(120)).await;
            });
        }
    });
    let mut link = RawLink::open(exit, &fake).await;
    let mut s = link.circuit(0x8000_0001, &[exit]).await;
    // Six streams with a 2 MiB window each: more than the sockets buffer.
    for _ in 0..6 {
        s.open("127.0.0.1", port).unwrap();
    }
    link.flush(&mut s).await;
    let started = Instant::now();
    let stalled = "ferry_links_closed_total{reason=\"stalled\"}";
    assert_eq!(exit.metric(stalled), Some(0.0));
    while exit.metric(stalled) != Some(1.0) {
        assert!(
            started.elapsed() < Duration::from_secs(45),
            "the link that reads nothing is still open after 45 s"
        );
        let mut ping = ferry_proto::cell::header(0, ferry_proto::CellCmd::Ping).to_vec();
        ping.extend_from_slice(&rand_nonce(started));
        let f = ferry_tests::raw::frame(&mut link.session, &ping);
        let _ = link.s.write_all(&f).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        started.elapsed() >= ferry_node::link::WRITE_STALL,
        "closed after {:?}, before the writer could have stalled that long",
        started.elapsed()
    );
    exit.wait_log("link stalled", Duration::from_secs(5))
        .unwrap();
    assert_eq!(
        exit.metric("ferry_links_closed_total{reason=\"dead\"}"),
        Some(0.0)
    );
    // The exit goes on serving the mesh's own entry.
    mesh.echo_ping().await.unwrap();
    sender.abort();
}

/// Eight bytes that differ from one PING to the next.
fn rand_nonce(since: Instant) -> [u8; 8] {
    (since.elapsed().as_nanos() as u64).to_be_bytes()
}

/// 300 connections to a node's control (libp2p) port that never finish
/// their handshake: it holds at most `control::CONTROL_PENDING` of them
/// (the rest are closed on arrival) and keeps carrying streams. Before,
/// the control plane had no connection limit at all: each stranger's
/// connection held a descriptor and an upgrade task until its handshake
/// timed out, and established ones were unbounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_the_control_port_are_bounded() {
    let mesh = Mesh::one_exit(Vec::new()).unwrap();
    let exit = &mesh.nodes[0];
    let limit = ferry_node::control::CONTROL_PENDING as usize;
    let idle = exit.flood_within(exit.mesh, 300, limit, 8).await;
    // Refusals are counted as the node gets to them.
    let past = idle.len().saturating_sub(limit + 8) as f64;
    let until = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let n = exit
            .metric("ferry_refusals_total{reason=\"control\"}")
            .unwrap_or(0.0);
        if n >= past || Instant::now() > until {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        refused >= past,
        "{refused} control connections counted as refused of {} past the limit",
        idle.len().saturating_sub(limit)
    );
    mesh.echo_ping().await.unwrap();
    drop(idle);
}
