//! Invariant I10: an abnormal end of a stream reaches the client as an
//! error — a TCP reset — never as a clean close, so a client can tell a
//! truncated download from a complete one. A normal end stays a clean close.

use ferry_tests::{Mesh, Options};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const SENT: usize = 100_000;

/// A target that sends `SENT` bytes, waits for the client's one-byte
/// answer (so the bytes are known to have arrived), then ends the
/// connection: with a reset if `reset`, else with a normal close.
async fn target(reset: bool) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(&[7u8; SENT]).await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();
        if reset {
            s.set_zero_linger().unwrap();
        } else {
            s.shutdown().await.unwrap();
        }
        drop(s);
    });
    port
}

/// Reads the bytes, answers, and returns how the stream ended.
async fn ending(mesh: &Mesh, port: u16) -> std::io::Result<usize> {
    let mut c = mesh.open(port, "").await.unwrap();
    let mut buf = vec![0u8; SENT];
    c.read_exact(&mut buf).await.unwrap();
    assert!(buf.iter().all(|b| *b == 7), "bytes arrive intact");
    c.write_all(b"x").await.unwrap();
    let mut more = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(30), c.read(&mut more))
        .await
        .expect("the stream ends within 30 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_at_the_target_reaches_the_client_as_a_reset() {
    let mesh = Mesh::start(&ferry_tests::THREE, &Options::default()).unwrap();
    let reset = ending(&mesh, target(true).await).await;
    match reset {
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "a reset, not {e}"
        ),
        Ok(n) => panic!(
            "the target reset the connection, but the client saw a clean end (read {n} bytes)"
        ),
    }
    // A normal close at the target stays a normal close at the client.
    let clean = ending(&mesh, target(false).await).await;
    assert_eq!(clean.unwrap(), 0, "a clean end reads as end of file");
}
