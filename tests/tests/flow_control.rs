//! A client that does not read must not make any node buffer without bound:
//! per-stream flow control stalls the sender once the window and the socket
//! buffers are full, every process's memory stays small, and once the client
//! reads, every byte arrives intact.

use ferry_tests::{Mesh, Options, Pattern, read_digest, send_pattern};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

const MIB: u64 = 1024 * 1024;
const TOTAL: u64 = 128 * MIB;

/// Counts bytes as they are written.
struct Counting<W> {
    inner: W,
    written: Arc<AtomicU64>,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counting<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_stalls_its_sender_with_bounded_memory() {
    let specs = ferry_tests::THREE;
    let mesh = Mesh::start(&specs, &Options::default()).unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = l.local_addr().unwrap();
    let w2 = written.clone();
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let mut w = Counting {
            inner: s,
            written: w2,
        };
        send_pattern(&mut w, 9, TOTAL as usize).await.unwrap();
        w.flush().await.unwrap();
    });

    let mut client = mesh.open(target.port(), "").await.expect("SOCKS success");

    // Wait until the sender stalls: no progress for a full second.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut last, mut since) = (0, Instant::now());
    let stalled_at = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = written.load(Ordering::Relaxed);
        assert!(
            now < TOTAL,
            "the target wrote all {TOTAL} bytes to a client that reads nothing"
        );
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_secs(1) && now > 0 {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "sender never stalled (at {now} bytes)"
        );
    };
    // Window (2 MiB) plus the kernel's socket buffers at both ends of the path.
    assert!(
        stalled_at < 64 * MIB,
        "sender stalled only after {} MiB",
        stalled_at / MIB
    );
    for p in mesh.all() {
        let rss = p.rss_bytes().unwrap();
        eprintln!(
            "stalled at {:.1} MiB; {} rss {:.1} MiB",
            stalled_at as f64 / MIB as f64,
            p.jurisdiction,
            rss as f64 / MIB as f64
        );
        assert!(
            rss < 64 * MIB,
            "{} holds {} MiB while its stream is stalled",
            p.jurisdiction,
            rss / MIB
        );
    }

    // Now read: everything arrives, once and in order.
    let (n, digest) = tokio::time::timeout(Duration::from_secs(120), read_digest(&mut client))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n as u64, TOTAL);
    assert!(
        digest == Pattern::digest(9, TOTAL as usize),
        "stream corrupted"
    );
}
