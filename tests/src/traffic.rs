//! Targets behind the exit and traffic a test can check: an echo server,
//! an HTTP server, and a pattern server that sends deterministic
//! pseudo-random bytes and hashes what its clients send; checked transfers
//! through an entry to it.

use crate::client::socks_connect_as;
use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A sink on loopback that reads every connection to its end and counts
/// the bytes, over all connections.
pub async fn counting_sink() -> Result<(SocketAddr, Arc<AtomicU64>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    c.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    Ok((a, count))
}

/// A TCP echo server on loopback: every connection gets back what it sends.
pub async fn echo_server() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(a)
}

/// A minimal HTTP server answering every request with `body`.
pub async fn http_server(body: &'static str) -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16384 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Deterministic pseudo-random bytes (xorshift64*), for checkable traffic.
pub struct Pattern(u64);

impl Pattern {
    /// A pattern from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Fills `buf`.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// SHA-256 of the first `len` bytes of the pattern for `seed`.
    pub fn digest(seed: u64, len: usize) -> [u8; 32] {
        let mut p = Pattern::new(seed);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            p.fill(&mut buf[..n]);
            h.update(&buf[..n]);
            left -= n;
        }
        h.finalize().into()
    }
}

/// Writes `len` pattern bytes for `seed`, then half-closes.
pub async fn send_pattern<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    seed: u64,
    len: usize,
) -> Result<()> {
    send_pattern_paced(w, seed, len, None).await
}

/// [`send_pattern`] at about `rate` bytes per second, if given: 64 KiB
/// every tick of a tokio interval (a bounded loop: `len` bytes).
pub async fn send_pattern_paced<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    seed: u64,
    len: usize,
    rate: Option<u64>,
) -> Result<()> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut tick = rate.map(|r| {
        let per = Duration::from_secs_f64(buf.len() as f64 / r.max(1) as f64);
        let mut t = tokio::time::interval(per);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut left = len;
    while left > 0 {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let n = left.min(buf.len());
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        left -= n;
    }
    w.shutdown().await?;
    Ok(())
}

/// Reads to EOF; returns (bytes, SHA-256).
pub async fn read_digest<R: AsyncReadExt + Unpin>(r: &mut R) -> Result<(usize, [u8; 32])> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, h.finalize().into()));
        }
        total += n;
        h.update(&buf[..n]);
    }
}

/// Reads until the stream ends; returns the bytes read and how it ended:
/// `Ok(())` for a clean end of file, the error (a reset) otherwise.
pub async fn read_until_end<R: AsyncReadExt + Unpin>(r: &mut R) -> (usize, std::io::Result<()>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match r.read(&mut buf).await {
            Ok(0) => return (total, Ok(())),
            Ok(n) => total += n,
            Err(e) => return (total, Err(e)),
        }
    }
}

/// What a [`pattern_server`] hashed of each connection's upload: (seed,
/// bytes, SHA-256).
pub type Uploads = tokio::sync::mpsc::UnboundedReceiver<(u64, usize, [u8; 32])>;

/// A target server: each connection sends an 8-byte seed and a length; the
/// server answers with that many pattern bytes for seed+1 while it hashes
/// what the client sends. Each connection's (bytes, digest) of the client's
/// upload comes out of the returned channel.
pub async fn pattern_server() -> Result<(SocketAddr, Uploads)> {
    pattern_server_paced(None).await
}

/// [`pattern_server`] sending at about `rate` bytes per second.
pub async fn pattern_server_paced(rate: Option<u64>) -> Result<(SocketAddr, Uploads)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let mut head = [0u8; 16];
                if r.read_exact(&mut head).await.is_err() {
                    return;
                }
                let seed = u64::from_be_bytes(head[..8].try_into().unwrap());
                let len = u64::from_be_bytes(head[8..].try_into().unwrap()) as usize;
                let (up, down) = tokio::join!(
                    read_digest(&mut r),
                    send_pattern_paced(&mut w, seed + 1, len, rate)
                );
                if let (Ok((n, d)), Ok(())) = (up, down) {
                    let _ = tx.send((seed, n, d));
                }
            });
        }
    });
    Ok((addr, rx))
}

/// A checksummed transfer both ways through the SOCKS5 entry at `socks`
/// (with RFC 1929 credentials `auth`, if given) to the [`pattern_server`]
/// at `target`: `len` pattern bytes for `seed` go up while the server's
/// `len` bytes for `seed + 1` come down, both at about `rate` bytes per
/// second if given. `Err` unless the entry connects and the download
/// arrives whole and intact; the server reports the upload
/// ([`finish_transfers`] checks it).
pub async fn pattern_transfer(
    socks: SocketAddr,
    target: SocketAddr,
    seed: u64,
    len: usize,
    rate: Option<u64>,
    auth: Option<(&str, &str)>,
) -> Result<()> {
    let s = socks_connect_as(socks, "127.0.0.1", target.port(), auth)
        .await?
        .map_err(|code| anyhow!("stream {seed}: SOCKS reply {code}"))?;
    let (mut r, mut w) = s.into_split();
    let mut head = seed.to_be_bytes().to_vec();
    head.extend_from_slice(&(len as u64).to_be_bytes());
    w.write_all(&head).await?;
    let (down, up) = tokio::join!(
        read_digest(&mut r),
        send_pattern_paced(&mut w, seed, len, rate)
    );
    up?;
    let (n, digest) = down?;
    if n != len {
        bail!("stream {seed}: download length {n}, not {len}");
    }
    if digest != Pattern::digest(seed + 1, len) {
        bail!("stream {seed}: download corrupted");
    }
    Ok(())
}

/// [`pattern_transfer`] as a task of its own, which panics if the
/// transfer fails.
pub fn spawn_transfer(
    socks: SocketAddr,
    target: SocketAddr,
    seed: u64,
    len: usize,
    rate: Option<u64>,
    auth: Option<(&'static str, &'static str)>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = pattern_transfer(socks, target, seed, len, rate, auth).await {
            panic!("{e:#}");
        }
    })
}

/// Waits for the transfer `tasks` (120 s at most each), then checks the
/// upload the [`pattern_server`] hashed for each of `seeds`: `len` bytes of
/// the pattern for that seed (other transfers' uploads may come first, and
/// are passed over).
pub async fn finish_transfers(
    tasks: Vec<JoinHandle<()>>,
    uploads: &mut Uploads,
    seeds: &[u64],
    len: usize,
) -> Result<()> {
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .context("a transfer did not finish within 120 s")??;
    }
    let mut left: Vec<u64> = seeds.to_vec();
    while !left.is_empty() {
        let (seed, got, digest) = tokio::time::timeout(Duration::from_secs(30), uploads.recv())
            .await
            .with_context(|| format!("no upload of streams {left:?} within 30 s"))?
            .context("the pattern server stopped")?;
        if let Some(i) = left.iter().position(|s| *s == seed) {
            left.remove(i);
            if got != len {
                bail!("stream {seed}: upload length {got}, not {len}");
            }
            if digest != Pattern::digest(seed, len) {
                bail!("stream {seed}: upload corrupted");
            }
        }
    }
    Ok(())
}
