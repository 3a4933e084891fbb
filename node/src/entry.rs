//! What the entry's two client protocols (SOCKS5 in `socks`, HTTP CONNECT
//! in `http_proxy`) share: the accept loop, the credential check off the
//! async threads, and opening a checked client's stream along its route
//! and carrying it. Each protocol only parses its own handshake and maps
//! refusals to its own replies.

use crate::auth::{AuthRefusal, Client, Credentials};
use crate::endpoint::StreamParts;
use crate::limits::{Limited, Pass};
use crate::origin::{OpenError, Origin};
use crate::routing::{ConnOptions, Policy};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, warn};

/// An accepted connection's place: its listener slot and its client's
/// pass (which may say it is to be refused, see
/// [`crate::limits::Pass::refused`]).
pub struct Admission {
    _slot: tokio::sync::OwnedSemaphorePermit,
    /// The client's pass.
    pub pass: Pass,
}

/// Accepts clients until `shutdown`, each in a tracked task inside the
/// span `span(n)` makes (so each protocol names its own), handled by
/// `handle`. At most `[limits] connections` are served at once; a
/// connection over that, or from a client with as many streams open as it
/// may have, is closed at once after `full` had its non-blocking say (an
/// HTTP status; SOCKS5 has nothing to say before a handshake). Both are
/// counted and logged.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    origin: Arc<Origin>,
    shutdown: CancellationToken,
    proto: &'static str,
    span: fn(u64) -> tracing::Span,
    full: fn(&TcpStream, Refusal),
    handle: F,
) where
    F: Fn(TcpStream, Arc<Origin>, Admission) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = origin.limits().listener(proto);
    // Accepted sockets take the listener's receive buffer.
    let rcvbuf = crate::endpoint::STREAM_RCVBUF;
    if let Err(e) = socket2::SockRef::from(&listener).set_recv_buffer_size(rcvbuf) {
        warn!(error = %e, "could not bound the entry's client receive buffers");
    }
    let mut next = 0u64;
    loop {
        let (sock, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors (EMFILE) fails every accept until
                    // some close: pause rather than spin.
                    crate::warn_limited!(origin.warned, "entry accept failed", error = %e, "entry accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        next += 1;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused(
                &origin,
                proto,
                "connections",
                "the listener is at its connection limit",
            );
            close_now(sock, full, Refusal::Full);
            continue;
        };
        let pass = match origin.limits().admit_client(peer.ip()) {
            Ok(p) => p,
            Err(l) => {
                refused(&origin, proto, l.kind(), &l.to_string());
                close_now(sock, full, Refusal::Limited(l));
                continue;
            }
        };
        if let Some(l) = pass.refused() {
            refused(&origin, proto, l.kind(), &l.to_string());
        }
        // Boxed: the task's block would hold the future twice, once as
        // captured and once where `select!` keeps it (rust-lang/rust#62958).
        let client = Box::pin(handle(
            sock,
            origin.clone(),
            Admission { _slot: slot, pass },
        ));
        let stop = shutdown.clone();
        origin.switch().tasks.spawn(
            async move {
                tokio::select! {
                    _ = client => {},
                    _ = stop.cancelled() => {},
                }
            }
            .instrument(span(next)),
        );
    }
}

/// Why a connection is closed as soon as it is accepted.
#[derive(Debug, Clone, Copy)]
pub enum Refusal {
    /// The listener is at `[limits] connections`.
    Full,
    /// The client is over a limit.
    Limited(Limited),
}

/// Closes a connection refused as soon as it was accepted, after `full`
/// had its say; what the client already sent is read first (non-blocking),
/// since closing a socket with unread bytes resets it and the client might
/// lose the answer.
fn close_now(sock: TcpStream, full: fn(&TcpStream, Refusal), why: Refusal) {
    full(&sock, why);
    let mut sink = [0u8; 1024];
    for _ in 0..8 {
        if !matches!(sock.try_read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
}

/// Counts and logs a connection refused by a limit. The log holds no
/// address, and at most one line per reason a second at `info` (the rest
/// at `debug`, and counted in the next line), so a flood of refusals is
/// not a flood of log lines.
pub fn refused(origin: &Origin, proto: &'static str, reason: &'static str, why: &str) {
    origin
        .switch()
        .metrics
        .node
        .refusals
        .with_label_values(&[reason])
        .inc();
    log_refusal(origin, reason, proto, why);
}

/// Logs a refusal: at most one line per `reason` a second at `info`
/// (with `held_back`, how many went to `debug` since), so a hostile client
/// cannot flood the log.
fn log_refusal(origin: &Origin, reason: &'static str, proto: &'static str, why: &str) {
    crate::info_limited!(
        origin.refusals_logged,
        reason,
        reason,
        proto,
        "client refused: {why}"
    );
}

/// Raises this process's soft limit on open files to its hard limit (each
/// client connection is a descriptor), and warns when the entry's
/// listeners could take more connections than that allows.
pub fn raise_fd_limit(listeners: u32, connections: u32) {
    let need = u64::from(listeners) * u64::from(connections) + 256;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < need => warn!(
            limit,
            need,
            "the open-file limit is below what the entry's listeners may take \
             ([limits] connections per listener); raise it (ulimit -n) or lower connections"
        ),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not read the open-file limit"),
    }
}

/// Checks the tenant's limits for `client`'s stream: counted and logged
/// when refused.
pub fn admit_tenant(
    origin: &Origin,
    proto: &'static str,
    pass: &mut Pass,
    client: &Client,
) -> Result<(), Limited> {
    origin
        .limits()
        .admit_tenant(pass, &client.tenant)
        .inspect_err(|l| {
            refused(origin, proto, l.kind(), &l.to_string());
        })
}

/// How long a password check waits for its turn before it is refused.
pub const CHECK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Checks a client's credentials under `policy`, password checks off the
/// async threads (Argon2id is slow on purpose). Password checks run at
/// most two per core at once, and at most [`crate::limits::CHECKS`] of one
/// client's; others wait their turn for up to [`CHECK_WAIT`] or are
/// refused at once if their client's is taken ([`AuthRefusal::Busy`]), so
/// a flood of logins holds a bounded amount of memory and CPU and one
/// client cannot take it all. Checks that verify no password (anonymous
/// clients, tenants without one, tokens) take no turn.
pub async fn check(
    origin: &Origin,
    pass: &Pass,
    policy: Arc<Policy>,
    creds: Option<Credentials>,
) -> Result<Client, AuthRefusal> {
    static CHECKS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    let creds = match creds {
        Some(Credentials::Bearer(token)) => return policy.authenticate_bearer(&token),
        Some(Credentials::Basic(u, p)) => Some((u, p)),
        None => None,
    };
    if !policy.costly(creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))) {
        return policy.authenticate(creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str())));
    }
    // One check of each client's at a time: wrong passwords from one
    // address cannot fill the pool for everyone.
    let Some(mine) = origin.limits().hold_check(pass) else {
        return Err(AuthRefusal::Busy);
    };
    let checks = CHECKS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Arc::new(tokio::sync::Semaphore::new(2 * cores))
    });
    let permit = match tokio::time::timeout(CHECK_WAIT, checks.clone().acquire_owned()).await {
        Ok(Ok(p)) => p,
        _ => return Err(AuthRefusal::Busy),
    };
    tokio::task::spawn_blocking(move || {
        let _permit = (permit, mine);
        policy.authenticate(creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str())))
    })
    .await
    .unwrap_or(Err(AuthRefusal::BadPassword))
}

/// Counts and logs a refused client (the log throttled as
/// [`refused`]'s).
pub fn refused_credentials(origin: &Origin, proto: &'static str, why: AuthRefusal) {
    origin
        .switch()
        .metrics
        .node
        .refusals
        .with_label_values(&["auth"])
        .inc();
    log_refusal(origin, why.kind(), proto, &why.to_string());
}

/// Opens `client`'s stream to `host:port` along the route its tenant and
/// `options` give; a refusal of the options or the constraints is counted.
pub async fn open(
    origin: &Origin,
    policy: &Policy,
    client: &Client,
    options: &str,
    host: &str,
    port: u16,
) -> Result<StreamParts, OpenError> {
    let route = ConnOptions::parse(options)
        .and_then(|o| policy.route(&client.tenant, &o))
        .map(Arc::new)
        .map_err(|e| OpenError::Options(format!("{e:#}")));
    let opened = match route {
        // Boxed, as the stream's run is in `carry`: a task takes the room
        // of its largest state for its whole life, and a front end's
        // states do not share room (a SOCKS client's task was 11.1 KiB,
        // the open 3.5 of it), so what is only alive while a stream opens
        // lives on the heap while it does.
        Ok(r) => Box::pin(origin.open_stream(host, port, &r)).await,
        Err(e) => Err(e),
    };
    if let Err(OpenError::NoPath(_) | OpenError::Options(_)) = &opened {
        origin
            .switch()
            .metrics
            .node
            .refusals
            .with_label_values(&["constraint"])
            .inc();
    }
    opened
}

/// Carries an opened stream on the client's socket until it ends, counted,
/// its bytes paced by the client's and tenant's byte rates.
pub async fn carry(origin: &Origin, sock: TcpStream, parts: StreamParts, pass: &Pass) {
    let metrics = &origin.switch().metrics;
    metrics.stream.opened.inc();
    parts.record_ids(&tracing::Span::current());
    // Recorded however it ends: also when a shutdown drops this task
    // (as `stopped`).
    let mut record = Recorder {
        handle: parts.handle.clone(),
        audit: origin.switch().audit.clone(),
        end: "stopped",
    };
    // Boxed: the client's task keeps only what it needs while the stream
    // runs (see `open`).
    let why = Box::pin(crate::endpoint::run_stream(sock, parts, pass.pace())).await;
    metrics.stream.closed.with_label_values(&[why]).inc();
    record.end = why;
}

/// Hands a stream's trail to the audit writer when it is dropped.
struct Recorder {
    handle: std::sync::Arc<crate::endpoint::StreamHandle>,
    audit: std::sync::Arc<crate::audit::Audit>,
    end: &'static str,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Some(trail) = self.handle.take_trail() {
            self.audit.submit(crate::audit::Ended {
                trail,
                ended_ms: crate::authority::now_ms(),
                bytes: self.handle.bytes(),
                end: self.end,
            });
        }
    }
}
