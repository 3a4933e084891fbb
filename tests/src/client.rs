//! The client's side of an entry: SOCKS5 CONNECT (with RFC 1929
//! credentials for per-connection options) and the real `curl`.

use anyhow::{Result, bail};
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The real `curl` fetching `url` through the SOCKS5 entry at `socks`
/// (host names resolved by the exit), 20 s at most.
pub fn curl_socks(socks: &str, url: &str) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "20", "--socks5-hostname", socks, url])
        .output()
        .expect("running curl")
}

/// [`curl_socks`] from async code, off the runtime's threads.
pub async fn curl_socks_async(socks: SocketAddr, url: String) -> std::process::Output {
    tokio::task::spawn_blocking(move || curl_socks(&socks.to_string(), &url))
        .await
        .expect("curl task")
}

/// Opens a SOCKS5 CONNECT; `Err(code)` carries the server's reply code.
pub async fn socks_connect(
    socks: SocketAddr,
    host: &str,
    port: u16,
) -> Result<std::result::Result<TcpStream, u8>> {
    socks_connect_as(socks, host, port, None).await
}

/// [`socks_connect`] with RFC 1929 credentials: (tenant, options).
pub async fn socks_connect_as(
    socks: SocketAddr,
    host: &str,
    port: u16,
    auth: Option<(&str, &str)>,
) -> Result<std::result::Result<TcpStream, u8>> {
    socks_connect_from(socks, None, host, port, auth).await
}

/// [`socks_connect_as`] from the source address `from` (for example
/// another 127.0.0.0/8 address, to be another client to the entry).
pub async fn socks_connect_from(
    socks: SocketAddr,
    from: Option<std::net::IpAddr>,
    host: &str,
    port: u16,
    auth: Option<(&str, &str)>,
) -> Result<std::result::Result<TcpStream, u8>> {
    let mut s = match from {
        None => TcpStream::connect(socks).await?,
        Some(ip) => {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(SocketAddr::new(ip, 0))?;
            sock.connect(socks).await?
        }
    };
    s.set_nodelay(true)?;
    let method = if auth.is_some() { 2 } else { 0 };
    s.write_all(&[5, 1, method]).await?;
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await?;
    if m != [5, method] {
        bail!("method selection answered {m:?}");
    }
    if let Some((u, p)) = auth {
        let mut a = vec![1, u.len() as u8];
        a.extend_from_slice(u.as_bytes());
        a.push(p.len() as u8);
        a.extend_from_slice(p.as_bytes());
        s.write_all(&a).await?;
        let mut r = [0u8; 2];
        s.read_exact(&mut r).await?;
        if r != [1, 0] {
            bail!("authentication answered {r:?}");
        }
    }
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await?;
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await?;
    if rep[0] != 5 {
        bail!("bad reply version {}", rep[0]);
    }
    Ok(if rep[1] == 0 { Ok(s) } else { Err(rep[1]) })
}

/// `ferry tenant add NAME --class CLASS`, the password on stdin.
pub fn tenant_block(name: &str, class: &str, password: &str) -> String {
    let mut child = Command::new(crate::ferry_bin().unwrap())
        .args(["tenant", "add", name, "--class", class])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let block = String::from_utf8(out.stdout).unwrap();
    assert!(block.contains("password_hash = \"$argon2id$"), "{block}");
    assert!(!block.contains(password), "the block holds no password");
    block
}
