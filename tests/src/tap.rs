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
