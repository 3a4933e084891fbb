//! The SOCKS5 entry (RFC 1928, CONNECT only). RFC 1929 username/password
//! names the tenant (`[[tenants]]`; empty or `-` for none) and carries its
//! password and the connection's options (see [`crate::auth`] and
//! `routing`). Credentials are checked before the request is read: a wrong
//! password or an unknown tenant gets RFC 1929's failure status, and a
//! client without credentials at an entry that requires them gets "no
//! acceptable methods"; both are logged without the password and counted
//! (`ferry_refusals_total{reason="auth"}`). A connection whose constraints
//! leave no path, or whose options are malformed or would widen what its
//! tenant allows, gets reply 0x02 and a log line naming why; so does a
//! client over its rate, or a tenant over its rate or its streams at once.
//! A client with as many streams open as it may have, or one that finds
//! the listener full, is closed at once (see [`crate::limits`]).
//! Every read is bounded by the protocol's own one-byte lengths;
//! a client that sends anything else is told why (where SOCKS has a reply for
//! it) and closed, and only that connection is affected.

use crate::auth::{AuthRefusal, Client, Credentials};
use crate::entry::Admission;
use crate::origin::{OpenError, Origin};
use ferry_proto::pb::EndReason;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Time a client has to finish the SOCKS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// RFC 1928 reply codes.
pub mod reply {
    /// Succeeded.
    pub const SUCCEEDED: u8 = 0x00;
    /// General SOCKS server failure.
    pub const GENERAL_FAILURE: u8 = 0x01;
    /// Connection not allowed by ruleset.
    pub const NOT_ALLOWED: u8 = 0x02;
    /// Network unreachable.
    pub const NETWORK_UNREACHABLE: u8 = 0x03;
    /// Host unreachable.
    pub const HOST_UNREACHABLE: u8 = 0x04;
    /// Connection refused.
    pub const CONNECTION_REFUSED: u8 = 0x05;
    /// TTL expired.
    pub const TTL_EXPIRED: u8 = 0x06;
    /// Command not supported.
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x07;
    /// Address type not supported.
    pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;
}

/// A parsed CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Domain name or IP literal, resolved at the exit.
    pub host: String,
    /// Target port.
    pub port: u16,
    /// The checked client.
    pub client: Client,
}

/// Why a SOCKS handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum SocksError {
    /// Not SOCKS5 at all.
    #[error("not SOCKS5: version byte {0:#04x}")]
    Version(u8),
    /// No acceptable authentication method offered.
    #[error("client offered no acceptable authentication method")]
    NoMethod,
    /// Bad username/password sub-negotiation.
    #[error("malformed username/password negotiation")]
    Auth,
    /// A command other than CONNECT.
    #[error("command {0:#04x} not supported (only CONNECT)")]
    Command(u8),
    /// Unknown address type.
    #[error("address type {0:#04x} not supported")]
    AddressType(u8),
    /// A domain name that is empty or not UTF-8.
    #[error("malformed domain name")]
    Domain,
    /// The credentials were refused (and the client told so).
    #[error("credentials refused: {0}")]
    Refused(AuthRefusal),
    /// Socket error or early close.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the greeting and request; answers method selection and auth,
/// asking `check` about the credentials (`None`: the client offered none).
/// Unsupported commands and address types get their reply before the error.
pub async fn handshake<S, F, Fut>(s: &mut S, check: F) -> Result<Request, SocksError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(Option<(String, String)>) -> Fut,
    Fut: std::future::Future<Output = Result<Client, AuthRefusal>>,
{
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(SocksError::Version(head[0]));
    }
    let mut methods = [0u8; 255];
    let methods = &mut methods[..head[1] as usize];
    s.read_exact(methods).await?;
    let method = if methods.contains(&0x02) {
        0x02
    } else if methods.contains(&0x00) {
        0x00
    } else {
        s.write_all(&[5, 0xff]).await?;
        return Err(SocksError::NoMethod);
    };
    if method == 0x00 {
        // No credentials offered: served only if anonymous clients are.
        return match check(None).await {
            Ok(client) => {
                s.write_all(&[5, 0x00]).await?;
                request(s, client).await
            }
            Err(why) => {
                s.write_all(&[5, 0xff]).await?;
                Err(SocksError::Refused(why))
            }
        };
    }
    s.write_all(&[5, method]).await?;
    let client = {
        let mut ver = [0u8; 2];
        s.read_exact(&mut ver).await?;
        if ver[0] != 1 {
            return Err(SocksError::Auth);
        }
        let mut user = vec![0u8; ver[1] as usize];
        s.read_exact(&mut user).await?;
        let mut plen = [0u8; 1];
        s.read_exact(&mut plen).await?;
        let mut pass = vec![0u8; plen[0] as usize];
        s.read_exact(&mut pass).await?;
        let text = |b: Vec<u8>| String::from_utf8(b).map_err(|_| SocksError::Auth);
        let creds = match (text(user), text(pass)) {
            (Ok(u), Ok(p)) => (u, p),
            _ => {
                s.write_all(&[1, 1]).await?;
                return Err(SocksError::Auth);
            }
        };
        match check(Some(creds)).await {
            Ok(client) => {
                s.write_all(&[1, 0]).await?;
                client
            }
            Err(why) => {
                // RFC 1929: any non-zero status is a failure; close.
                s.write_all(&[1, 1]).await?;
                return Err(SocksError::Refused(why));
            }
        }
    };
    request(s, client).await
}

/// Reads the CONNECT request after authentication.
async fn request<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    client: Client,
) -> Result<Request, SocksError> {
    let mut req = [0u8; 4];
    s.read_exact(&mut req).await?;
    if req[0] != 5 {
        return Err(SocksError::Version(req[0]));
    }
    let host = match req[3] {
        0x01 => {
            let mut a = [0u8; 4];
            s.read_exact(&mut a).await?;
            Ipv4Addr::from(a).to_string()
        }
        0x04 => {
            let mut a = [0u8; 16];
            s.read_exact(&mut a).await?;
            Ipv6Addr::from(a).to_string()
        }
        0x03 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await?;
            let mut name = vec![0u8; len[0] as usize];
            s.read_exact(&mut name).await?;
            match String::from_utf8(name) {
                Ok(n) if !n.is_empty() => n,
                _ => {
                    send_reply(s, reply::HOST_UNREACHABLE).await?;
                    return Err(SocksError::Domain);
                }
            }
        }
        t => {
            send_reply(s, reply::ADDRESS_TYPE_NOT_SUPPORTED).await?;
            return Err(SocksError::AddressType(t));
        }
    };
    let mut port = [0u8; 2];
    s.read_exact(&mut port).await?;
    if req[1] != 0x01 {
        send_reply(s, reply::COMMAND_NOT_SUPPORTED).await?;
        return Err(SocksError::Command(req[1]));
    }
    Ok(Request {
        host,
        port: u16::from_be_bytes(port),
        client,
    })
}

/// Sends a reply with an all-zero bound address.
pub async fn send_reply<S: AsyncWrite + Unpin>(s: &mut S, code: u8) -> std::io::Result<()> {
    s.write_all(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0]).await
}

/// The SOCKS reply for a stream that could not be opened.
pub fn reply_for(err: &OpenError) -> u8 {
    match err {
        OpenError::NoPath(_) | OpenError::Options(_) => reply::NOT_ALLOWED,
        OpenError::Build(_) | OpenError::NotReady(_) => reply::GENERAL_FAILURE,
        OpenError::Refused { reason, .. } => match reason {
            EndReason::Policy => reply::NOT_ALLOWED,
            EndReason::NetworkUnreachable => reply::NETWORK_UNREACHABLE,
            EndReason::HostUnreachable => reply::HOST_UNREACHABLE,
            EndReason::ConnectionRefused => reply::CONNECTION_REFUSED,
            EndReason::Timeout => reply::TTL_EXPIRED,
            EndReason::AddressType => reply::ADDRESS_TYPE_NOT_SUPPORTED,
            _ => reply::GENERAL_FAILURE,
        },
    }
}

/// Serves SOCKS5 clients until `shutdown`.
pub async fn serve(listener: TcpListener, origin: Arc<Origin>, shutdown: CancellationToken) {
    // One SOCKS connection is one stream: its span gets the stream's
    // circuit and id once open (recorded, not a nested span, so the
    // forwarding path enters one span per poll, not two).
    let span = |n: u64| {
        tracing::info_span!(
            "socks",
            conn = n,
            circ = tracing::field::Empty,
            stream = tracing::field::Empty
        )
    };
    crate::entry::serve(listener, origin, shutdown, "socks", span, |_, _| {}, client).await
}

async fn client(mut sock: TcpStream, origin: Arc<Origin>, mut adm: Admission) {
    let _ = sock.set_nodelay(true);
    if adm.pass.refused().is_some() {
        // Over its rate: told so in SOCKS terms (reply 0x02 to its
        // request), its credentials not even checked, so a flood costs no
        // Argon2 (nor tells anything about the password: every such
        // sub-negotiation "succeeds", and every request is refused).
        let unchecked = |_| async {
            Ok(Client {
                tenant: String::new(),
                options: String::new(),
            })
        };
        if let Ok(Ok(_)) =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut sock, unchecked)).await
        {
            let _ = send_reply(&mut sock, reply::NOT_ALLOWED).await;
        }
        return;
    }
    let policy = origin.policy();
    let check = |creds: Option<(String, String)>| {
        crate::entry::check(
            &origin,
            &adm.pass,
            policy.clone(),
            creds.map(|(u, p)| Credentials::Basic(u, p)),
        )
    };
    let req = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut sock, check)).await {
        Ok(Ok(r)) => r,
        Ok(Err(SocksError::Refused(why))) => {
            return crate::entry::refused_credentials(&origin, "socks", why);
        }
        Ok(Err(e)) => return warn!(reason = %e, "socks connection closed"),
        Err(_) => return warn!(reason = "handshake timed out", "socks connection closed"),
    };
    adm.pass.handshake_done();
    if crate::entry::admit_tenant(&origin, "socks", &mut adm.pass, &req.client).is_err() {
        let _ = send_reply(&mut sock, reply::NOT_ALLOWED).await;
        return;
    }
    debug!(host = %req.host, port = req.port, "socks connect");
    let opened = crate::entry::open(
        &origin,
        &policy,
        &req.client,
        &req.client.options,
        &req.host,
        req.port,
    )
    .await;
    match opened {
        Ok(parts) => {
            if send_reply(&mut sock, reply::SUCCEEDED).await.is_ok() {
                crate::entry::carry(&origin, sock, parts, &adm.pass).await;
            }
        }
        Err(e) => {
            let code = reply_for(&e);
            info!(reply = code, reason = %e, "socks request refused");
            let _ = send_reply(&mut sock, code).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checker that admits anyone, taking the username as the tenant
    /// and the password as the options; and refuses the user `bad`.
    async fn check(creds: Option<(String, String)>) -> Result<Client, AuthRefusal> {
        match creds {
            Some((u, _)) if u == "bad" => Err(AuthRefusal::BadPassword),
            Some((tenant, options)) => Ok(Client { tenant, options }),
            None => Ok(Client {
                tenant: String::new(),
                options: String::new(),
            }),
        }
    }

    async fn run(client_bytes: Vec<u8>) -> (Result<Request, SocksError>, Vec<u8>) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let h = tokio::spawn(async move { handshake(&mut b, check).await });
        a.write_all(&client_bytes).await.unwrap();
        let res = h.await.unwrap();
        drop(a.shutdown().await);
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_millis(200), a.read_to_end(&mut out)).await;
        (res, out)
    }

    #[tokio::test]
    async fn domain_connect_parses() {
        let mut b = vec![5, 1, 0, 5, 1, 0, 3, 11];
        b.extend_from_slice(b"example.org");
        b.extend_from_slice(&443u16.to_be_bytes());
        let (res, out) = run(b).await;
        assert_eq!(
            res.unwrap(),
            Request {
                host: "example.org".into(),
                port: 443,
                client: Client {
                    tenant: String::new(),
                    options: String::new()
                }
            }
        );
        assert_eq!(out, [5, 0]);
    }

    #[tokio::test]
    async fn ipv6_with_credentials_parses() {
        let mut b = vec![5, 2, 0, 2, 1, 1, b'u', 2, b'p', b'w', 5, 1, 0, 4];
        b.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        b.extend_from_slice(&80u16.to_be_bytes());
        let (res, out) = run(b).await;
        assert_eq!(
            res.unwrap(),
            Request {
                host: "::1".into(),
                port: 80,
                client: Client {
                    tenant: "u".into(),
                    options: "pw".into()
                }
            }
        );
        assert_eq!(out, [5, 2, 1, 0]);
    }

    /// Refused credentials get RFC 1929's failure status, and the request
    /// is never read.
    #[tokio::test]
    async fn refused_credentials_fail_the_subnegotiation() {
        let mut b = vec![5, 1, 2, 1, 3, b'b', b'a', b'd', 2, b'p', b'w', 5, 1, 0, 1];
        b.extend_from_slice(&[127, 0, 0, 1, 0, 80]);
        let (res, out) = run(b).await;
        assert!(matches!(
            res,
            Err(SocksError::Refused(AuthRefusal::BadPassword))
        ));
        assert_eq!(out, [5, 2, 1, 1]);
    }

    #[tokio::test]
    async fn junk_and_unsupported_requests_are_refused_with_reasons() {
        let (res, _) = run(b"GET / HTTP/1.1\r\n\r\n".to_vec()).await;
        assert_eq!(
            res.unwrap_err().to_string(),
            "not SOCKS5: version byte 0x47"
        );
        let (res, out) = run(vec![5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 80]).await;
        assert!(matches!(res, Err(SocksError::Command(2))));
        assert_eq!(out[2..4], [5, reply::COMMAND_NOT_SUPPORTED]);
        let (res, out) = run(vec![5, 1, 0, 5, 1, 0, 9]).await;
        assert!(matches!(res, Err(SocksError::AddressType(9))));
        assert_eq!(out[2..4], [5, reply::ADDRESS_TYPE_NOT_SUPPORTED]);
        let (res, out) = run(vec![5, 1, 0x80]).await;
        assert!(matches!(res, Err(SocksError::NoMethod)));
        assert_eq!(out, [5, 0xff]);
    }
}
