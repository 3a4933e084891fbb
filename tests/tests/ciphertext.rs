//! What relays read from and write to their sockets never contains the
//! payload's plaintext: every link of the mesh runs through a recording tap,
//! and a marker sent through a 3-hop circuit must appear in none of it.

use ferry_tests::{Mesh, Options, socks_connect, start_tap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MARKER: &[u8] = b"FERRY-PLAINTEXT-MARKER-7f3a";

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
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
