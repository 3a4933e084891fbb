//! Bad input closes only the connection that carried it, with a logged
//! reason; a circuit carrying data across the same nodes keeps going and its
//! bytes arrive intact.

use ferry_node::config::peer_block;
use ferry_node::identity::Keys;
use ferry_router::Roles;
use ferry_tests::raw::{RawLink, fake_entry, frame, handshake, handshake_recorded};
use ferry_tests::{Mesh, Options, Proc};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The three-node mesh with a hostile client's keys admitted as an entry.
fn fake_mesh() -> (Keys, Mesh) {
    let (fake, block) = fake_entry();
    let mesh = Mesh::start(
        &ferry_tests::THREE,
        &Options {
            extra_peers: vec![block],
            ..Options::default()
        },
    )
    .unwrap();
    (fake, mesh)
}

/// Waits until the node closes `s` (EOF or reset), failing after 10 s.
async fn closed_by_peer(mut s: TcpStream) {
    let mut buf = [0u8; 1024];
    let res = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(res.is_ok(), "node kept the bad connection open");
}

/// Sends `bytes` on `s`; `node` must close the connection and log `reason`.
async fn refused(node: &Proc, mut s: TcpStream, bytes: &[u8], reason: &str) {
    s.write_all(bytes).await.unwrap();
    closed_by_peer(s).await;
    node.wait_log(reason, Duration::from_secs(10)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_only_its_connection() {
    let (fake, fake_block) = fake_entry();
    let specs = ferry_tests::THREE;
    let mut mesh = Mesh::start(
        &specs,
        &Options {
            extra_peers: vec![fake_block],
            // What a WARN line held back goes to (docs/LOGGING.md).
            log_filter: Some("info,ferry_node=debug".into()),
            ..Options::default()
        },
    )
    .unwrap();

    // A circuit carrying data through all three nodes, open across the attacks.
    let target = ferry_tests::echo_server().await.unwrap();
    let s = mesh.open(target.port(), "").await.expect("SOCKS success");
    let (mut r, mut w) = s.into_split();
    let half: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    w.write_all(&half).await.unwrap();
    let mut got = vec![0u8; half.len()];
    r.read_exact(&mut got).await.unwrap();
    assert!(got == half);

    for node in &mesh.nodes {
        // Garbage Noise handshake.
        let s = TcpStream::connect(node.link.unwrap()).await.unwrap();
        let mut junk = vec![0, 0, 0, 96];
        junk.extend((0..96u8).map(|i| i.wrapping_mul(37)));
        let reason = "link refused reason=noise handshake failed";
        refused(node, s, &junk, reason).await;

        // Oversized length prefix before the handshake.
        let s = TcpStream::connect(node.link.unwrap()).await.unwrap();
        let reason = "frame length 4294967295 exceeds the maximum of 65535";
        refused(node, s, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3], reason).await;

        // An authenticated peer sending an oversized length prefix.
        let (s, _) = handshake(node, &fake).await;
        let reason = "frame length 2147483647 exceeds the maximum of 65535";
        refused(node, s, &0x7fff_ffffu32.to_be_bytes(), reason).await;

        // An authenticated peer sending a well-sealed but malformed cell.
        let (s, mut session) = handshake(node, &fake).await;
        let f = frame(&mut session, &[0, 0, 0, 1, 99, 1, 2, 3]);
        refused(node, s, &f, "malformed cell: unknown cell command code 99").await;

        // An authenticated peer sending a frame that does not authenticate.
        let (s, mut session) = handshake(node, &fake).await;
        let mut f = frame(&mut session, &[0, 0, 0, 1, 4, 0, 0]);
        let last = f.len() - 1;
        f[last] ^= 0x55;
        refused(node, s, &f, "record failed to authenticate").await;

        // An unknown node: a correct handshake and identity proof, but no
        // config or certificate vouches for it (it sends nothing more).
        let stranger = Keys::generate();
        let (s, _) = handshake(node, &stranger).await;
        refused(node, s, &[], "is not admitted here").await;
    }

    // A peer repeating an attack cannot flood the log: one WARN line a
    // minute per reason and kind, the rest at DEBUG (each was found above):
    // two malformed handshakes and a stranger's are two refused kinds, and
    // three malformed streams one.
    for node in &mesh.nodes {
        let warned = node.warnings();
        for (what, lines) in [("link refused", 2), ("link closed", 1)] {
            let n = warned.iter().filter(|l| l.contains(what)).count();
            assert_eq!(
                n, lines,
                "{}: {n} WARN lines {what:?}: {warned:#?}",
                node.jurisdiction
            );
        }
    }

    // Junk on the SOCKS5 entry, again and again.
    for _ in 0..20 {
        let s = TcpStream::connect(mesh.socks()).await.unwrap();
        let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        refused(&mesh.entry, s, http, "not SOCKS5: version byte 0x47").await;
    }
    let why = "not SOCKS5: version byte 0x47";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while mesh.entry.log().matches(why).count() < 20 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(mesh.entry.log().matches(why).count(), 20, "each one logged");
    let warned = mesh.entry.warnings();
    let n = warned.iter().filter(|l| l.contains(why)).count();
    assert_eq!(
        n, 1,
        "{n} WARN lines for 20 bad SOCKS5 handshakes: {warned:#?}"
    );

    // The circuit survived all of it: the second half arrives intact.
    w.write_all(&half).await.unwrap();
    w.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(
        rest == half,
        "second half came back altered ({} bytes)",
        rest.len()
    );
    for node in &mut mesh.nodes {
        assert!(node.alive(), "node {} died", node.jurisdiction);
    }
    assert!(mesh.entry.alive());
}

/// A relay that cannot reach the next hop says so to the origin, but not
/// why in the operating system's words: echoed, a connect error would tell
/// a hostile origin (through an advert naming any address) whether a port
/// is open. (Before, "Connection refused (os error 111)" and the address
/// reached the entry.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extend_failure_does_not_echo_the_connect_error() {
    let mut mesh = Mesh::start(&ferry_tests::THREE, &Options::default()).unwrap();
    let target = ferry_tests::echo_server().await.unwrap();
    let gone = mesh.nodes[0].link.unwrap();
    mesh.nodes[0].kill9().unwrap();
    // Paths through CH then DE fail at CH, which cannot connect to DE.
    let mut told = false;
    for _ in 0..20 {
        let r = mesh.connect(target.port(), "").await.unwrap();
        assert!(r.is_err(), "no path avoids DE with 3 hops");
        if mesh.entry.log().contains("could not be reached") {
            told = true;
            break;
        }
    }
    assert!(
        told,
        "an extend failure reached the entry:\n{}",
        mesh.entry.log()
    );
    let log = mesh.entry.log();
    for l in log.lines().filter(|l| l.contains("could not be reached")) {
        assert!(!l.contains("os error") && !l.contains("refused ("), "{l}");
    }
    assert!(!log.contains(&gone.to_string()), "DE's address: {log}");
    let relay = mesh.nodes[1].log();
    let warned: Vec<&str> = relay
        .lines()
        .filter(|l| l.contains("extend failed"))
        .collect();
    assert!(!warned.is_empty(), "{relay}");
    for l in warned {
        assert!(
            !l.contains(&gone.to_string()),
            "no address above debug: {l}"
        );
    }
}

/// A peer whose link handshake never answers holds up dials to it alone:
/// a stream through another relay is built while the dial to it hangs for
/// its whole timeout (10 s). (Before, one dial lock for all peers made the
/// second stream wait out the first dial.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_peer_does_not_hold_up_dials_to_others() {
    // Takes connections (the kernel's backlog) and never answers one.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    silent.set_nonblocking(true).unwrap();
    let fake = Keys::generate();
    let block = peer_block(
        &fake.node_id(),
        &fake.noise_public(),
        Some(silent.local_addr().unwrap()),
        "FR",
        Roles {
            relay: true,
            ..Roles::default()
        },
    );
    let mesh = Mesh::start(
        &ferry_tests::THREE,
        &Options {
            hops: 2,
            extra_peers: vec![block],
            ..Options::default()
        },
    )
    .unwrap();
    let target = ferry_tests::echo_server().await.unwrap();
    // A stream that must go through the silent FR "relay".
    let socks = mesh.socks();
    let hung = tokio::spawn(async move {
        let auth = Some(("", "exclude=DE,CH"));
        ferry_tests::socks_connect_as(socks, "127.0.0.1", target.port(), auth).await
    });
    // The entry is dialling it: the connection is in the silent backlog.
    let t = std::time::Instant::now();
    let _held = loop {
        match silent.accept() {
            Ok((s, _)) => break s,
            Err(_) => {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "the entry never dialled FR"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // Meanwhile a stream through the real relays is built at once.
    let started = std::time::Instant::now();
    let s = mesh.connect(target.port(), "exclude=FR").await.unwrap();
    let took = started.elapsed();
    assert!(s.is_ok(), "a path avoiding FR: {:?}", s.err());
    assert!(
        took < Duration::from_secs(5),
        "the second stream waited {took:?} behind the hanging dial"
    );
    // The first one fails in its own time.
    let r = hung.await.unwrap().unwrap();
    assert!(r.is_err(), "no circuit through a peer that never answers");
}

/// In a public mesh (`[mesh] private = false`), a relay extends circuits
/// only to nodes with public link addresses: an advert or a peer naming a
/// loopback or private address cannot make it connect into its own
/// network for an origin. (Before, relays dialled whatever address they
/// were given.) Here every node links on loopback, so every extend is
/// refused, with the reason in the entry's log and the refusal counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_mesh_does_not_extend_to_private_addresses() {
    let mesh = Mesh::start(
        &ferry_tests::THREE,
        &Options {
            mesh_private: false,
            ..Options::default()
        },
    )
    .unwrap();
    let target = ferry_tests::echo_server().await.unwrap();
    let r = mesh.connect(target.port(), "").await.unwrap();
    assert!(r.is_err(), "a 3-hop circuit needs an extend");
    mesh.entry
        .wait_log("loopback link address", Duration::from_secs(10))
        .unwrap();
    let refused: f64 = mesh
        .nodes
        .iter()
        .filter_map(|n| n.metric("ferry_refusals_total{reason=\"policy\"}"))
        .sum();
    assert!(refused >= 1.0, "refusals counted: {refused}");
}

/// A circuit cannot be longer than eight hops: a hostile origin building
/// around a loop of relays (A→B→C→A→…, each byte it sends then crossing
/// every link of the loop again and again) is cut at the first hop when
/// it asks for a ninth, and a relay refuses to extend back to the node it
/// came from (A→B→A). Before, a 100-hop loop was built in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_through_relays_is_cut_at_eight_hops() {
    let (fake, mesh) = fake_mesh();
    let n = &mesh.nodes;
    let mut link = RawLink::open(&n[0], &fake).await;
    // An honest circuit first: three hops build.
    let (built, how) = link.build(0x8000_0001, &[&n[0], &n[1], &n[2]]).await;
    assert_eq!((built, how.as_str()), (3, "built"));

    let cycle: Vec<&Proc> = (0..100).map(|i| &n[i % 3]).collect();
    let (built, how) = link.build(0x8000_0002, &cycle).await;
    println!("a 100-hop loop: {built} hops built, then {how}");
    assert_eq!(built, ferry_circuit::MAX_HOPS, "{how}");
    assert_eq!(how, "destroyed: DESTROY_REASON_PROTOCOL");
    n[0].wait_log("builds past the hop limit", Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        n[0].metric("ferry_refusals_total{reason=\"loop\"}"),
        Some(1.0)
    );

    let bounce: Vec<&Proc> = (0..100).map(|i| &n[i % 2]).collect();
    let (built, how) = link.build(0x8000_0003, &bounce).await;
    println!("a 100-hop A/B bounce: {built} hops built, then {how}");
    assert_eq!(built, 2, "{how}");
    assert!(
        how.contains("the next hop is this node or the previous one"),
        "{how}"
    );

    // The link and the nodes carry on.
    let (built, how) = link.build(0x8000_0004, &[&n[0], &n[1], &n[2]]).await;
    assert_eq!((built, how.as_str()), (3, "built"));
}

/// A recorded link handshake replayed on a new connection gains nothing:
/// the node answers message 1, but the recorded proof that follows is
/// sealed for the first connection's keys, so the replay is refused and
/// never registered; the live link keeps carrying circuits. (The node
/// registers a link only once the initiator has proved itself in its
/// first transport frame.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_link_handshake_is_refused_and_the_live_link_stays() {
    let (fake, mesh) = fake_mesh();
    let n = &mesh.nodes;
    let (s, session, recorded) = handshake_recorded(&n[0], &fake).await;
    let mut live = RawLink {
        s,
        session,
        buf: bytes::BytesMut::new(),
    };
    let (built, how) = live.build(0x8000_0001, &[&n[0], &n[1]]).await;
    assert_eq!((built, how.as_str()), (2, "built"));

    let malformed = "ferry_refusals_total{reason=\"malformed\"}";
    let before = n[0].metric(malformed).unwrap();
    let mut replay = TcpStream::connect(n[0].link.unwrap()).await.unwrap();
    replay.write_all(&recorded).await.unwrap();
    closed_by_peer(replay).await;
    n[0].wait_log("record failed to authenticate", Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        n[0].metric(malformed),
        Some(before + 1.0),
        "the replay is refused as a handshake that does not check out"
    );

    let (built, how) = live.build(0x8000_0002, &[&n[0], &n[1], &n[2]]).await;
    assert_eq!(
        (built, how.as_str()),
        (3, "built"),
        "the live link still carries new circuits"
    );
}
