//! One circuit whose next link stalls does not stall the other circuits
//! that share a link with it. A relay forwards each cell without waiting:
//! when the next link's queue is full, the cell waits with its circuit and
//! circuits take turns (before, the relay's reader waited for room, so
//! every circuit on the link the cell came from stopped with it).
//!
//! Real processes: a relay (CH) and two exits (DE, IS), circuits of two
//! hops. 32 bulk uploads go through CH to DE, and a paced, checked
//! download comes through CH from IS; both circuits share the entry's link
//! to CH. DE is frozen (SIGSTOP: its sockets stay open and stop reading,
//! so CH's link to it fills) for three seconds; the download must keep its
//! pace meanwhile.

use ferry_tests::{Mesh, Options, Spec};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const RATE: usize = 1 << 20;
const CHUNK: usize = 16 * 1024;

/// Accepts connections and reads everything sent to them.
async fn sink() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    port
}

/// Sends each connection the byte pattern `i % 251` at [`RATE`], for 30 s.
async fn paced_source() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut tick =
                    tokio::time::interval(Duration::from_secs_f64(CHUNK as f64 / RATE as f64));
                let mut at = 0usize;
                for _ in 0..(30 * RATE / CHUNK) {
                    tick.tick().await;
                    let chunk: Vec<u8> = (at..at + CHUNK).map(|i| (i % 251) as u8).collect();
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                    at += CHUNK;
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_next_link_does_not_stall_other_circuits() {
    let mut mesh = Mesh::start(
        &[
            Spec::new("CH", "relay"),
            Spec::new("DE", "exit"),
            Spec::new("IS", "exit"),
        ],
        &Options {
            hops: 2,
            ..Options::default()
        },
    )
    .unwrap();
    let (sink, source) = (sink().await, paced_source().await);
    // The checked, paced download, through CH and IS.
    let mut down = match mesh.open(source, "exit_in=IS").await {
        Ok(s) => s,
        Err(e) => panic!("{e:#}\n{}", mesh.entry.log()),
    };
    // Bulk uploads through CH and DE, as fast as they go: 32 of them, so
    // their windows (2 MiB each) hold more than the kernel buffers on the
    // way to DE (up to 32 MiB to receive on loopback here).
    let mut bulk = Vec::new();
    for _ in 0..32 {
        let mut s = match mesh.open(sink, "exit_in=DE").await {
            Ok(s) => s,
            Err(e) => panic!(
                "{e:#}\n{}\n{}",
                mesh.entry.log(),
                mesh.nodes
                    .iter()
                    .map(|n| n.log())
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        };
        bulk.push(tokio::spawn(async move {
            let buf = vec![7u8; 64 * 1024];
            while s.write_all(&buf).await.is_ok() {}
        }));
    }
    // Reads the download for `d`: the bytes, each checked.
    let mut at = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let mut read_for = async |down: &mut tokio::net::TcpStream, d: Duration| {
        let t0 = Instant::now();
        let mut got = 0;
        while t0.elapsed() < d {
            let left = d.saturating_sub(t0.elapsed());
            match tokio::time::timeout(left, down.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => panic!("the download ended"),
                Ok(Ok(n)) => {
                    for (i, b) in buf[..n].iter().enumerate() {
                        assert_eq!(*b, ((at + i) % 251) as u8, "byte {} altered", at + i);
                    }
                    at += n;
                    got += n;
                }
                Err(_) => break,
            }
        }
        got
    };
    let before = read_for(&mut down, Duration::from_secs(2)).await;
    let de = mesh.nodes.iter().find(|n| n.jurisdiction == "DE").unwrap();
    de.signal("STOP");
    // The way to DE fills (its socket buffers take tens of MiB); then 1.5 s
    // of the stall, ending before CH would give DE up for dead (4 s).
    let _ = read_for(&mut down, Duration::from_millis(1500)).await;
    let during = read_for(&mut down, Duration::from_millis(1500)).await;
    de.signal("CONT");
    println!(
        "download through CH: {before} bytes in 2 s before, {during} bytes in 1.5 s while CH's link to DE was stalled"
    );
    assert!(
        during >= RATE,
        "the download slowed to {during} bytes in 1.5 s (expected about {})",
        RATE * 3 / 2
    );
    for b in bulk {
        b.abort();
    }
    let ch = mesh
        .nodes
        .iter_mut()
        .find(|n| n.jurisdiction == "CH")
        .unwrap();
    assert!(ch.alive());
}
