//! A recording TCP tap: a proxy in front of a listener that keeps a copy
//! of every byte it carries, both ways.

use anyhow::Result;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy that records every byte both ways into `sink`.
pub fn start_tap(target: SocketAddr, sink: Arc<Mutex<Vec<u8>>>) -> Result<SocketAddr> {
    let std = StdListener::bind("127.0.0.1:0")?;
    std.set_nonblocking(true)?;
    let addr = std.local_addr()?;
    let listener = TcpListener::from_std(std)?;
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(target).await else {
                    return;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(copy_record(cr, sw, sink.clone()), copy_record(sr, cw, sink));
            });
        }
    });
    Ok(addr)
}

async fn copy_record(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    sink: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
                if w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = w.shutdown().await;
}

/// A TCP proxy in front of `target` that holds every chunk for `one_way`
/// before passing it on, each way: a peer `2 × one_way` further away in
/// round-trip time (the kernel here has no `netem`). Order is kept; at most
/// 1024 chunks wait per direction.
pub fn start_delay(target: SocketAddr, one_way: std::time::Duration) -> Result<SocketAddr> {
    let std = StdListener::bind("127.0.0.1:0")?;
    std.set_nonblocking(true)?;
    let addr = std.local_addr()?;
    let listener = TcpListener::from_std(std)?;
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(copy_delayed(cr, sw, one_way), copy_delayed(sr, cw, one_way));
            });
        }
    });
    Ok(addr)
}

async fn copy_delayed(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    one_way: std::time::Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(1024);
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let due = tokio::time::Instant::now() + one_way;
                    if tx.send((due, buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if w.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// Frames at least this long (after the handshake's, which are shorter)
/// are data cells: [`start_tamper`] changes the first of them.
pub const TAMPER_AT: usize = 1024;

/// A TCP proxy in front of a node's link listener that changes one bit on
/// each connection's way in (from the node that dialled): in the first
/// frame of [`TAMPER_AT`] bytes or more, the bit is 10 bytes into the body
/// (past the 4-byte prefix and the 5-byte cell header), where a RELAY
/// cell's end-to-end ciphertext lies. Each change is counted in `flips`.
/// Frames are read whole by their prefix; the other way is copied as it
/// comes.
pub fn start_tamper(
    target: SocketAddr,
    flips: Arc<std::sync::atomic::AtomicUsize>,
) -> Result<SocketAddr> {
    let std = StdListener::bind("127.0.0.1:0")?;
    std.set_nonblocking(true)?;
    let addr = std.local_addr()?;
    let listener = TcpListener::from_std(std)?;
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let flips = flips.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (mut cr, cw) = client.into_split();
                let (sr, mut sw) = server.into_split();
                let back = async move {
                    let (mut sr, mut cw) = (sr, cw);
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    let _ = cw.shutdown().await;
                };
                let on = async move {
                    let _ = copy_tampered(&mut cr, &mut sw, &flips).await;
                    let _ = sw.shutdown().await;
                };
                tokio::join!(on, back);
            });
        }
    });
    Ok(addr)
}

async fn copy_tampered(
    r: &mut tokio::net::tcp::OwnedReadHalf,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    flips: &std::sync::atomic::AtomicUsize,
) -> std::io::Result<()> {
    // The link's frames are at most 64 KiB.
    const MAX: usize = 1 << 16;
    let mut buf = bytes::BytesMut::with_capacity(MAX + 4);
    let mut done = false;
    loop {
        while buf.len() >= 4 {
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if len > MAX {
                // Not a link frame: pass the rest on untouched.
                w.write_all(&buf).await?;
                tokio::io::copy(r, w).await?;
                return Ok(());
            }
            if buf.len() < 4 + len {
                break;
            }
            let mut frame = buf.split_to(4 + len);
            if !done && len >= TAMPER_AT {
                frame[4 + 5 + 10] ^= 1;
                done = true;
                flips.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            w.write_all(&frame).await?;
        }
        if buf.capacity() - buf.len() < MAX {
            buf.reserve(MAX + 4);
        }
        if r.read_buf(&mut buf).await? == 0 {
            w.write_all(&buf).await?;
            return Ok(());
        }
    }
}
