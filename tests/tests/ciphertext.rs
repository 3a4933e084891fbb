//! What relays read from and write to their sockets never contains the
//! payload's plaintext: every link of the mesh runs through a recording tap,
//! and a marker sent through a 3-hop circuit must appear in none of it.
//! And what someone on a link's wire changes never arrives: links seal a
//! RELAY cell's header alone (`ferry_node::link::seal`), so a changed byte
//! of its body is refused by the circuit's end, which ends that circuit
//! (its stream moves to another, every byte intact) and leaves the link
//! up.

use ferry_tests::{Mesh, Options, socks_connect, start_tap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MARKER: &[u8] = b"FERRY-PLAINTEXT-MARKER-7f3a";

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_changed_on_a_link_never_arrives() {
    // The exit IS (index 2) is dialled through a proxy that flips one bit
    // in the body of the first data cell of each link to it.
    let mesh = Mesh::start(
        &ferry_tests::THREE,
        &Options {
            advertise_tamper: vec![2],
            ..Options::default()
        },
    )
    .unwrap();
    let target = ferry_tests::echo_server().await.unwrap();
    let payload: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    let s = socks_connect(mesh.socks(), "127.0.0.1", target.port())
        .await
        .unwrap()
        .expect("SOCKS success");
    let (mut r, mut w) = s.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut back)).await;
    assert!(
        mesh.tampered.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "the proxy changed no data cell"
    );
    // Nothing changed arrived, and the stream, moved off its broken
    // circuit, carried every byte.
    let altered = back.iter().zip(&payload).position(|(a, b)| a != b);
    assert!(
        altered.is_none(),
        "a changed byte arrived: first difference at {altered:?} of {} bytes back",
        back.len()
    );
    assert!(
        matches!(ended, Ok(Ok(_))) && back.len() == payload.len(),
        "the stream ended {ended:?} with {} of {} bytes",
        back.len(),
        payload.len()
    );
    writer.await.unwrap();
    // The exit refused the cell as its circuit's protocol broken, not the
    // link as a bad record: the link stays up for its other circuits.
    let exit = &mesh.nodes[2];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let destroyed = loop {
        let n = exit
            .metric("ferry_circuits_closed_total{reason=\"protocol\"}")
            .unwrap_or(0.0);
        if n >= 1.0 || std::time::Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(destroyed >= 1.0, "the exit destroyed no circuit as broken");
    assert_eq!(
        exit.metric("ferry_links_closed_total{reason=\"error\"}"),
        Some(0.0),
        "the exit closed a link"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_carry_only_ciphertext() {
    let specs = ferry_tests::THREE;
    let mesh = Mesh::start(
        &specs,
        &Options {
            tap: true,
            ..Options::default()
        },
    )
    .unwrap();

    let target = ferry_tests::echo_server().await.unwrap();

    // The client's own leg to the entry is plaintext by design: tap it too,
    // to show the taps do see a marker where one travels.
    let client_leg = Arc::new(Mutex::new(Vec::new()));
    let socks_tap = start_tap(mesh.socks(), client_leg.clone()).unwrap();

    let mut payload = Vec::new();
    for i in 0..2000 {
        payload.extend_from_slice(MARKER);
        payload.extend_from_slice(format!("-{i:05}\n").as_bytes());
    }
    let s = socks_connect(socks_tap, "127.0.0.1", target.port())
        .await
        .unwrap()
        .expect("SOCKS success");
    let (mut r, mut w) = s.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert!(
        back == payload,
        "echo came back altered ({} of {} bytes)",
        back.len(),
        payload.len()
    );

    let links = mesh.tapped.lock().unwrap().clone();
    // Both directions of both relay links crossed the taps: at least four
    // copies of the payload's size, plus framing.
    assert!(
        links.len() > 4 * payload.len(),
        "taps saw only {} bytes",
        links.len()
    );
    assert!(
        !contains(&links, MARKER),
        "plaintext marker seen on a relay link"
    );
    assert!(
        !contains(&links, b"-00042\n"),
        "plaintext fragment seen on a relay link"
    );
    assert!(
        contains(&client_leg.lock().unwrap(), MARKER),
        "the taps must see plaintext where it travels"
    );
}
