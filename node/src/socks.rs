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
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

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

impl SocksError {
    /// A bounded label (logs are limited per kind).
    pub fn kind(&self) -> &'static str {
        match self {
            SocksError::Version(_) => "version",
            SocksError::NoMethod => "no_method",
            SocksError::Auth => "auth",
            SocksError::Command(_) => "command",
            SocksError::AddressType(_) => "address_type",
            SocksError::Domain => "domain",
            SocksError::Refused(_) => "refused",
            SocksError::Io(_) => "io",
        }
    }
}

/// SOCKS5 messages as pure functions over the bytes read so far (no I/O),
/// as arti's `tor-socksproto` does: each says how many more bytes it needs
/// at least, or what it parsed and how many bytes that took, or what is
/// wrong (and the reply the client is owed, if any). [`handshake`] only
/// reads exactly what they ask for, calls them, and writes; the fuzzers
/// call them directly.
pub mod wire {
    use super::{SocksError, reply};
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// What a parse made of the bytes so far.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Parsed<T> {
        /// At least this many more bytes are needed.
        More(usize),
        /// Parsed, from this many bytes.
        Done(T, usize),
    }

    /// The authentication method the server picks from a greeting.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Method {
        /// RFC 1929 username/password.
        UserPass,
        /// No authentication.
        NoAuth,
        /// Neither was offered.
        NoAcceptable,
    }

    fn need<T>(b: &[u8], n: usize) -> Option<Parsed<T>> {
        (b.len() < n).then(|| Parsed::More(n - b.len()))
    }

    /// The greeting: version 5, then the methods offered.
    pub fn greeting(b: &[u8]) -> Result<Parsed<Method>, SocksError> {
        if let Some(m) = need(b, 2) {
            return Ok(m);
        }
        if b[0] != 5 {
            return Err(SocksError::Version(b[0]));
        }
        let len = 2 + b[1] as usize;
        if let Some(m) = need(b, len) {
            return Ok(m);
        }
        let methods = &b[2..len];
        let method = if methods.contains(&0x02) {
            Method::UserPass
        } else if methods.contains(&0x00) {
            Method::NoAuth
        } else {
            Method::NoAcceptable
        };
        Ok(Parsed::Done(method, len))
    }

    /// RFC 1929's sub-negotiation: the username and password. `Err` with
    /// `true`: the client is owed the failure status.
    pub fn userpass(b: &[u8]) -> Result<Parsed<(String, String)>, (SocksError, bool)> {
        if let Some(m) = need(b, 2) {
            return Ok(m);
        }
        if b[0] != 1 {
            return Err((SocksError::Auth, false));
        }
        let ulen = b[1] as usize;
        if let Some(m) = need(b, 3 + ulen) {
            return Ok(m);
        }
        let plen = b[2 + ulen] as usize;
        let len = 3 + ulen + plen;
        if let Some(m) = need(b, len) {
            return Ok(m);
        }
        let text = |x: &[u8]| String::from_utf8(x.to_vec()).map_err(|_| (SocksError::Auth, true));
        Ok(Parsed::Done(
            (text(&b[2..2 + ulen])?, text(&b[3 + ulen..len])?),
            len,
        ))
    }

    /// Why a request was refused, and the reply the client is owed, if any.
    pub type Refused = (SocksError, Option<u8>);

    /// The request: CONNECT to a domain name or an IP literal, and a port.
    pub fn request(b: &[u8]) -> Result<Parsed<(String, u16)>, Refused> {
        if let Some(m) = need(b, 4) {
            return Ok(m);
        }
        if b[0] != 5 {
            return Err((SocksError::Version(b[0]), None));
        }
        let (start, len) = match b[3] {
            0x01 => (4, 4),
            0x04 => (4, 16),
            0x03 => {
                if let Some(m) = need(b, 5) {
                    return Ok(m);
                }
                (5, b[4] as usize)
            }
            t => {
                return Err((
                    SocksError::AddressType(t),
                    Some(reply::ADDRESS_TYPE_NOT_SUPPORTED),
                ));
            }
        };
        let end = start + len + 2;
        if let Some(m) = need(b, end) {
            return Ok(m);
        }
        let addr = &b[start..start + len];
        let host = match b[3] {
            0x01 => Ipv4Addr::from(<[u8; 4]>::try_from(addr).expect("4 bytes")).to_string(),
            0x04 => Ipv6Addr::from(<[u8; 16]>::try_from(addr).expect("16 bytes")).to_string(),
            _ => match std::str::from_utf8(addr) {
                Ok(n) if !n.is_empty() => n.to_string(),
                _ => return Err((SocksError::Domain, Some(reply::HOST_UNREACHABLE))),
            },
        };
        if b[1] != 0x01 {
            return Err((
                SocksError::Command(b[1]),
                Some(reply::COMMAND_NOT_SUPPORTED),
            ));
        }
        let port = u16::from_be_bytes([b[end - 2], b[end - 1]]);
        Ok(Parsed::Done((host, port), end))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Every message parses the same however it is cut: byte by byte
        /// it asks for exactly what is missing, and never for more.
        #[test]
        fn messages_parse_whole_or_ask_for_the_rest() {
            let greet = [5, 2, 0, 2];
            for i in 0..greet.len() {
                assert!(
                    matches!(greeting(&greet[..i]), Ok(Parsed::More(n)) if n >= 1 && i + n <= greet.len())
                );
            }
            assert_eq!(greeting(&greet).unwrap(), Parsed::Done(Method::UserPass, 4));
            assert_eq!(
                greeting(&[5, 1, 0]).unwrap(),
                Parsed::Done(Method::NoAuth, 3)
            );
            assert_eq!(
                greeting(&[5, 1, 1]).unwrap(),
                Parsed::Done(Method::NoAcceptable, 3)
            );
            assert!(matches!(greeting(&[4, 1]), Err(SocksError::Version(4))));
            let auth = [1, 3, b'a', b'c', b'm', 2, b'p', b'w'];
            for i in 0..auth.len() {
                assert!(matches!(userpass(&auth[..i]), Ok(Parsed::More(n)) if i + n <= auth.len()));
            }
            assert_eq!(
                userpass(&auth).unwrap(),
                Parsed::Done(("acm".into(), "pw".into()), auth.len())
            );
            assert!(matches!(
                userpass(&[1, 1, 0xff, 0]),
                Err((SocksError::Auth, true))
            ));
            let req = [5, 1, 0, 3, 4, b'h', b'o', b's', b't', 1, 187];
            for i in 0..req.len() {
                assert!(matches!(request(&req[..i]), Ok(Parsed::More(n)) if i + n <= req.len()));
            }
            assert_eq!(
                request(&req).unwrap(),
                Parsed::Done(("host".into(), 443), req.len())
            );
            let v6 = [[5, 1, 0, 4].as_slice(), &[0; 15], &[1], &[0, 80]].concat();
            assert_eq!(request(&v6).unwrap(), Parsed::Done(("::1".into(), 80), 22));
            assert!(matches!(
                request(&[5, 2, 0, 1, 1, 2, 3, 4, 0, 80]),
                Err((SocksError::Command(2), Some(reply::COMMAND_NOT_SUPPORTED)))
            ));
            assert!(matches!(
                request(&[5, 1, 0, 9]),
                Err((
                    SocksError::AddressType(9),
                    Some(reply::ADDRESS_TYPE_NOT_SUPPORTED)
                ))
            ));
            assert!(matches!(
                request(&[5, 1, 0, 3, 0, 0, 80]),
                Err((SocksError::Domain, Some(reply::HOST_UNREACHABLE)))
            ));
        }
    }
}

/// Reads one message with `parse`, exactly the bytes it asks for (so none
/// of what a client sends after its request is taken here).
async fn read_msg<S, T, E>(
    s: &mut S,
    parse: impl Fn(&[u8]) -> Result<wire::Parsed<T>, E>,
) -> Result<Result<T, E>, std::io::Error>
where
    S: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(64);
    loop {
        match parse(&buf) {
            Ok(wire::Parsed::More(n)) => {
                let at = buf.len();
                buf.resize(at + n, 0);
                s.read_exact(&mut buf[at..]).await?;
            }
            Ok(wire::Parsed::Done(t, _)) => return Ok(Ok(t)),
            Err(e) => return Ok(Err(e)),
        }
    }
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
    let method = read_msg(s, wire::greeting).await??;
    let client = match method {
        wire::Method::NoAcceptable => {
            s.write_all(&[5, 0xff]).await?;
            return Err(SocksError::NoMethod);
        }
        // No credentials offered: served only if anonymous clients are.
        wire::Method::NoAuth => match check(None).await {
            Ok(client) => {
                s.write_all(&[5, 0x00]).await?;
                client
            }
            Err(why) => {
                s.write_all(&[5, 0xff]).await?;
                return Err(SocksError::Refused(why));
            }
        },
        wire::Method::UserPass => {
            s.write_all(&[5, 0x02]).await?;
            let creds = match read_msg(s, wire::userpass).await? {
                Ok(c) => c,
                Err((e, owed)) => {
                    if owed {
                        s.write_all(&[1, 1]).await?;
                    }
                    return Err(e);
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
        }
    };
    match read_msg(s, wire::request).await? {
        Ok((host, port)) => Ok(Request { host, port, client }),
        Err((e, owed)) => {
            if let Some(code) = owed {
                send_reply(s, code).await?;
            }
            Err(e)
        }
    }
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
            tokio::time::timeout(HANDSHAKE_TIMEOUT, Box::pin(handshake(&mut sock, unchecked))).await
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
    // Boxed, as the open and the stream's run are (`entry::open`): a task
    // is as large as its largest state for its whole life.
    let shake = Box::pin(handshake(&mut sock, check));
    let req = match tokio::time::timeout(HANDSHAKE_TIMEOUT, shake).await {
        Ok(Ok(r)) => r,
        Ok(Err(SocksError::Refused(why))) => {
            return crate::entry::refused_credentials(&origin, "socks", why);
        }
        // A client that goes away mid-handshake (a port scan, a client
        // that gave up) is nothing to look at.
        Ok(Err(SocksError::Io(e))) => return debug!(reason = %e, "socks connection closed"),
        Ok(Err(e)) => {
            return crate::warn_limited!(origin.warned, ("socks handshake", e.kind()), reason = %e, "socks connection closed");
        }
        Err(_) => {
            return crate::warn_limited!(
                origin.warned,
                "socks timed out",
                reason = "handshake timed out",
                "socks connection closed"
            );
        }
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
    use std::net::Ipv6Addr;

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
