//! Bad input closes only the connection that carried it, with a logged
//! reason; a circuit carrying data across the same nodes keeps going and its
//! bytes arrive intact.

use ferry_node::config::peer_block;
use ferry_node::crypto::{self, Session};
use ferry_node::identity::Keys;
use ferry_node::link::{HANDSHAKE_CODEC, TRANSPORT_CODEC};
use ferry_router::Roles;
use ferry_tests::{Mesh, Options, Proc};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// Runs a link handshake with `node` as the test's fake peer, including
/// the initiator's identity proof (its first transport frame).
async fn handshake(node: &Proc, keys: &Keys) -> (TcpStream, Session) {
    let mut s = TcpStream::connect(node.link.unwrap()).await.unwrap();
    let mut hs = crypto::link_initiator(&keys.noise_private(), &node.noise_key).unwrap();
    let mut out = Vec::new();
    HANDSHAKE_CODEC.encode(&crypto::write_hs(&mut hs).unwrap(), &mut out);
    s.write_all(&out).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let m2 = loop {
        if let Some(f) = HANDSHAKE_CODEC.decode(&mut buf).unwrap() {
            break f;
        }
        assert!(
            s.read_buf(&mut buf).await.unwrap() > 0,
            "node closed the handshake"
        );
    };
    crypto::read_hs(&mut hs, &m2).unwrap();
    let proof = crypto::prove(
        &keys.identity,
        crypto::LINK_INITIATOR_PROOF,
        &crypto::handshake_hash(&hs),
    );
    let mut session = Session::from_handshake(hs).unwrap();
    let first = frame(&mut session, &proof);
    s.write_all(&first).await.unwrap();
    (s, session)
}

/// Seals `plain` as one transport frame.
fn frame(session: &mut Session, plain: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    TRANSPORT_CODEC.put_prefix(plain.len() + 16, &mut out);
    let start = out.len();
    out.extend_from_slice(plain);
    session.tx.seal_tail(&mut out, start).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_only_its_connection() {
    let fake = Keys::generate();
    let fake_block = peer_block(
        &fake.node_id(),
        &fake.noise_public(),
        None,
        "NL",
        Roles {
            entry: true,
            ..Roles::default()
        },
    );
    let specs = ferry_tests::THREE;
    let mut mesh = Mesh::start(
        &specs,
        &Options {
            extra_peers: vec![fake_block],
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

    // Junk on the SOCKS5 entry.
    let s = TcpStream::connect(mesh.socks()).await.unwrap();
    let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    refused(&mesh.entry, s, http, "not SOCKS5: version byte 0x47").await;

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
