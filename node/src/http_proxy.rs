//! The HTTP CONNECT entry (RFC 9110 §9.3.6): tunnels only, for clients that
//! speak HTTP proxies rather than SOCKS5 (browsers' system proxy settings,
//! `git`, package managers, Java and .NET HTTP stacks).
//!
//! `CONNECT host:port HTTP/1.1` opens a stream through the mesh exactly as a
//! SOCKS5 CONNECT does. Tenants authenticate with `Proxy-Authorization:
//! Basic` (the same username and password as for SOCKS5, see
//! [`crate::auth`]) or `Proxy-Authorization: Bearer` with a tenant's token;
//! routing options come in a `Ferry-Options` header, or after `|` in the
//! password. Anything but CONNECT is answered 405 with a hint (plain
//! `GET http://…` proxying is not offered: it would hand the entry
//! plaintext). Refusals carry a status and a one-line reason: 400
//! malformed, 403 not allowed (policy, constraints, options), 407
//! credentials, 429 a client or tenant over its limits (with
//! `Retry-After`), 502 the target or the mesh could not be reached, 503
//! the entry is not ready, busy checking credentials, or at its connection
//! limit, 504 a timeout. The request head is read with a hard limit of
//! [`HEAD_LIMIT`] bytes; `base64` (the maintained crate) decodes the
//! credentials.

use crate::auth::{AuthRefusal, Client, Credentials};
use crate::entry::{Admission, Refusal};
use crate::origin::{OpenError, Origin};
use base64::Engine;
use ferry_proto::pb::EndReason;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// The most bytes a request head may have.
pub const HEAD_LIMIT: usize = 8192;

/// The header that goes with a 429 or 503 for a limit: try again in a
/// second.
const RETRY: &str = "Retry-After: 1\r\n";

/// A parsed CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Target host (name or address literal).
    pub host: String,
    /// Target port.
    pub port: u16,
    /// `Proxy-Authorization` credentials (Basic or Bearer).
    pub credentials: Option<Credentials>,
    /// The `Ferry-Options` header.
    pub options: Option<String>,
}

/// Why a request could not be taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HttpError {
    /// The head is longer than [`HEAD_LIMIT`].
    #[error("request head over {HEAD_LIMIT} bytes")]
    TooLong,
    /// Not a well-formed HTTP/1.x request head.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// A method other than CONNECT.
    #[error("method {0} is not offered: this proxy only tunnels (CONNECT)")]
    Method(String),
}

impl HttpError {
    /// The status this answers with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::TooLong => 431,
            HttpError::Malformed(_) => 400,
            HttpError::Method(_) => 405,
        }
    }
}

/// Parses a request head (up to and including its blank line).
pub fn parse_head(head: &[u8]) -> Result<Connect, HttpError> {
    if head.len() > HEAD_LIMIT {
        return Err(HttpError::TooLong);
    }
    let text = std::str::from_utf8(head).map_err(|_| HttpError::Malformed("not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let first = lines.next().ok_or(HttpError::Malformed("empty"))?;
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed("request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed("version"));
    }
    if method != "CONNECT" {
        if method.len() > 16 || !method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(HttpError::Malformed("method"));
        }
        return Err(HttpError::Method(method.to_string()));
    }
    let (host, port) = target
        .rsplit_once(':')
        .ok_or(HttpError::Malformed("target is not host:port"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or(HttpError::Malformed("port"))?;
    if host.is_empty() || host.len() > 255 {
        return Err(HttpError::Malformed("host"));
    }
    let mut c = Connect {
        host: host.to_string(),
        port,
        credentials: None,
        options: None,
    };
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or(HttpError::Malformed("header line"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("proxy-authorization") {
            if c.credentials.is_some() {
                return Err(HttpError::Malformed("Proxy-Authorization twice"));
            }
            // Another scheme (Negotiate, NTLM) is no credentials: the 407
            // that follows asks for Basic (RFC 9110 §11: schemes ignore case).
            let scheme = |name: &str| {
                value
                    .get(..name.len())
                    .filter(|s| s.eq_ignore_ascii_case(name))
                    .map(|_| value[name.len()..].trim())
            };
            if value.eq_ignore_ascii_case("bearer") {
                return Err(HttpError::Malformed("empty Bearer token"));
            }
            if let Some(token) = scheme("bearer ") {
                c.credentials = Some(Credentials::Bearer(token.to_string()));
                continue;
            }
            let Some(b64) = scheme("basic ") else {
                continue;
            };
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| HttpError::Malformed("Proxy-Authorization is not base64"))?;
            let raw = String::from_utf8(raw)
                .map_err(|_| HttpError::Malformed("credentials are not UTF-8"))?;
            let (u, p) = raw
                .split_once(':')
                .ok_or(HttpError::Malformed("credentials are not user:password"))?;
            c.credentials = Some(Credentials::Basic(u.to_string(), p.to_string()));
        } else if name.eq_ignore_ascii_case("ferry-options") {
            if c.options.is_some() {
                return Err(HttpError::Malformed("Ferry-Options twice"));
            }
            c.options = Some(value.to_string());
        }
    }
    Ok(c)
}

/// Reads a request head, byte by byte up to its blank line (so nothing the
/// client sends after it is taken), at most [`HEAD_LIMIT`] bytes.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(512);
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= HEAD_LIMIT {
            return Ok(None);
        }
        if s.read(&mut b).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(b[0]);
    }
    Ok(Some(head))
}

/// Sends a response with a one-line reason as its body.
async fn respond<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: u16,
    reason: &str,
    extra: &str,
) -> std::io::Result<()> {
    s.write_all(response(status, reason, extra).as_bytes())
        .await
}

/// A response with a one-line reason as its body (none for 200).
fn response(status: u16, reason: &str, extra: &str) -> String {
    let phrase = match status {
        200 => return "HTTP/1.1 200 Connection Established\r\n\r\n".to_string(),
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    let body = format!("{reason}\n");
    format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    )
}

/// The status for a stream that could not be opened.
pub fn status_for(err: &OpenError) -> u16 {
    match err {
        OpenError::NoPath(_) | OpenError::Options(_) => 403,
        OpenError::NotReady(_) => 503,
        OpenError::Build(_) => 502,
        OpenError::Refused { reason, .. } => match reason {
            EndReason::Policy => 403,
            EndReason::Timeout => 504,
            _ => 502,
        },
    }
}

/// Serves HTTP CONNECT clients until `shutdown`.
pub async fn serve(listener: TcpListener, origin: Arc<Origin>, shutdown: CancellationToken) {
    let span = |n: u64| {
        tracing::info_span!(
            "http",
            conn = n,
            circ = tracing::field::Empty,
            stream = tracing::field::Empty
        )
    };
    crate::entry::serve(listener, origin, shutdown, "http", span, full, client).await
}

/// Answers a connection closed as soon as it is accepted: a fixed
/// response written without waiting (a full socket buffer drops it).
fn full(sock: &TcpStream, why: Refusal) {
    let text = match why {
        Refusal::Full => response(503, "the entry is at its connection limit", RETRY),
        Refusal::Limited(l) => response(429, &l.to_string(), RETRY),
    };
    let _ = sock.try_write(text.as_bytes());
}

async fn client(mut sock: TcpStream, origin: Arc<Origin>, mut adm: Admission) {
    let _ = sock.set_nodelay(true);
    let metrics = origin.switch().metrics.clone();
    let head =
        // Boxed, as the open and the stream's run are (`entry::open`): a
        // task is as large as its largest state for its whole life.
        match tokio::time::timeout(crate::socks::HANDSHAKE_TIMEOUT, Box::pin(read_head(&mut sock)))
            .await
        {
            Ok(Ok(Some(h))) => h,
            Ok(Ok(None)) => {
                let _ = respond(&mut sock, 431, "request head too long", "").await;
                return crate::warn_limited!(
                    origin.warned,
                    "http head too long",
                    reason = "request head too long",
                    "http connection closed"
                );
            }
            Ok(Err(e)) => return debug!(error = %e, "http connection closed"),
            Err(_) => {
                return crate::warn_limited!(
                    origin.warned,
                    "http timed out",
                    reason = "request timed out",
                    "http connection closed"
                );
            }
        };
    if let Some(l) = adm.pass.refused() {
        // Over its rate: told so, its credentials not even checked.
        let _ = respond(&mut sock, 429, &l.to_string(), RETRY).await;
        return;
    }
    let req = match parse_head(&head) {
        Ok(r) => r,
        Err(e) => {
            let extra = if matches!(e, HttpError::Method(_)) {
                "Allow: CONNECT\r\n"
            } else {
                ""
            };
            let hint = if matches!(e, HttpError::Method(_)) {
                format!("{e}; use CONNECT, for example curl -p -x http://127.0.0.1:3128 URL")
            } else {
                e.to_string()
            };
            metrics
                .node
                .refusals
                .with_label_values(&["malformed"])
                .inc();
            info!(status = e.status(), reason = %e, "http request refused");
            let _ = respond(&mut sock, e.status(), &hint, extra).await;
            return;
        }
    };
    // What the stream needs is taken out; the head and the credentials go
    // before the stream opens, not when it ends.
    drop(head);
    let Connect {
        host,
        port,
        credentials,
        options: asked,
    } = req;
    let policy = origin.policy();
    let checked = crate::entry::check(&origin, &adm.pass, policy.clone(), credentials);
    let client: Client = match Box::pin(checked).await {
        Ok(c) => c,
        Err(why) => {
            crate::entry::refused_credentials(&origin, "http", why);
            // One answer for every refusal: the reason is for the log.
            let (status, body) = match why {
                AuthRefusal::Busy => (503, "busy: try again"),
                _ => (407, "credentials refused"),
            };
            let _ = respond(
                &mut sock,
                status,
                body,
                "Proxy-Authenticate: Basic realm=\"ferry\", Bearer realm=\"ferry\"\r\n",
            )
            .await;
            return;
        }
    };
    adm.pass.handshake_done();
    if let Err(l) = crate::entry::admit_tenant(&origin, "http", &mut adm.pass, &client) {
        let _ = respond(&mut sock, 429, &l.to_string(), RETRY).await;
        return;
    }
    let options = match (&asked, client.options.is_empty()) {
        (Some(h), true) => h.clone(),
        (Some(h), false) => format!("{};{h}", client.options),
        (None, _) => client.options.clone(),
    };
    debug!(%host, port, "http connect");
    let opened = crate::entry::open(&origin, &policy, &client, &options, &host, port).await;
    match opened {
        Ok(parts) => {
            if respond(&mut sock, 200, "", "").await.is_ok() {
                crate::entry::carry(&origin, sock, parts, &adm.pass).await;
            }
        }
        Err(e) => {
            let status = status_for(&e);
            info!(status, reason = %e, "http request refused");
            let _ = respond(&mut sock, status, &e.to_string(), "").await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_heads_parse_and_others_are_refused_with_a_status() {
        let c = parse_head(
            b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\nProxy-Authorization: Basic YWNtZTpzM2NyZXQ=\r\nFerry-Options: exclude=PK\r\n\r\n",
        )
        .unwrap();
        assert_eq!(c.host, "example.org");
        assert_eq!(c.port, 443);
        assert_eq!(
            c.credentials,
            Some(Credentials::Basic("acme".into(), "s3cret".into()))
        );
        assert_eq!(c.options.as_deref(), Some("exclude=PK"));
        let v6 = parse_head(b"CONNECT [::1]:8443 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 8443));
        let status = |h: &[u8]| parse_head(h).unwrap_err().status();
        assert_eq!(status(b"GET http://example.org/ HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status(b"CONNECT example.org HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"CONNECT example.org:0 HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"CONNECT a:1 SPDY/3\r\n\r\n"), 400);
        let other = parse_head(b"CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: Negotiate x\r\n\r\n");
        assert_eq!(
            other.unwrap().credentials,
            None,
            "another scheme: no credentials"
        );
        let lower = parse_head(b"CONNECT a:1 HTTP/1.1\r\nproxy-authorization: basic YTpi\r\n\r\n");
        assert_eq!(
            lower.unwrap().credentials,
            Some(Credentials::Basic("a".into(), "b".into()))
        );
        let bearer =
            parse_head(b"CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: bearer ferry_x\r\n\r\n");
        assert_eq!(
            bearer.unwrap().credentials,
            Some(Credentials::Bearer("ferry_x".into()))
        );
        assert_eq!(
            status(b"CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: Bearer \r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"CONNECT a:1 HTTP/1.1\r\nFerry-Options: a=b\r\nFerry-Options: c=d\r\n\r\n"),
            400
        );
        assert_eq!(status(b"\xff\xfe\r\n\r\n"), 400);
        assert_eq!(status(&vec![b'a'; HEAD_LIMIT + 1]), 431);
    }
}
