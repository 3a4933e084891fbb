//! What the entry's two client protocols (SOCKS5 in `socks`, HTTP CONNECT
//! in `http_proxy`) share: the accept loop, the credential check off the
//! async threads, and opening a checked client's stream along its route
//! and carrying it. Each protocol only parses its own handshake and maps
//! refusals to its own replies.

use crate::auth::{AuthRefusal, Client};
use crate::endpoint::StreamParts;
use crate::origin::{OpenError, Origin};
use crate::routing::{ConnOptions, Policy};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, warn};

/// Accepts clients until `shutdown`, each in a tracked task inside the
/// span `span(n)` makes (so each protocol names its own), handled by
/// `handle`.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    origin: Arc<Origin>,
    shutdown: CancellationToken,
    span: fn(u64) -> tracing::Span,
    handle: F,
) where
    F: Fn(TcpStream, Arc<Origin>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut next = 0u64;
    loop {
        let (sock, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => { warn!(error = %e, "entry accept failed"); continue; }
            },
            _ = shutdown.cancelled() => return,
        };
        next += 1;
        let client = handle(sock, origin.clone());
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

/// How long a password check waits for its turn before it is refused.
pub const CHECK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Checks a client's credentials under `policy`, password checks off the
/// async threads (Argon2id is slow on purpose). Password checks (Argon2id) run at most two per core at once; others
/// wait their turn for up to [`CHECK_WAIT`] and are then refused
/// ([`AuthRefusal::Busy`]), so a flood of logins holds a bounded amount of
/// memory and CPU. Checks that verify nothing (anonymous clients, tenants
/// without a password) take no turn.
pub async fn check(
    policy: Arc<Policy>,
    creds: Option<(String, String)>,
) -> Result<Client, AuthRefusal> {
    static CHECKS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    if !policy.costly(creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))) {
        return policy.authenticate(creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str())));
    }
    let checks = CHECKS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Arc::new(tokio::sync::Semaphore::new(2 * cores))
    });
    let permit = match tokio::time::timeout(CHECK_WAIT, checks.clone().acquire_owned()).await {
        Ok(Ok(p)) => p,
        _ => return Err(AuthRefusal::Busy),
    };
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        policy.authenticate(creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str())))
    })
    .await
    .unwrap_or(Err(AuthRefusal::BadPassword))
}

/// Counts and logs a refused client.
pub fn refused_credentials(origin: &Origin, proto: &'static str, why: AuthRefusal) {
    origin
        .switch()
        .metrics
        .node
        .refusals
        .with_label_values(&["auth"])
        .inc();
    tracing::info!(reason = why.kind(), proto, "client refused: {why}");
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
        Ok(r) => origin.open_stream(host, port, &r).await,
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

/// Carries an opened stream on the client's socket until it ends, counted.
pub async fn carry(origin: &Origin, sock: TcpStream, parts: StreamParts) {
    let metrics = &origin.switch().metrics;
    metrics.stream.opened.inc();
    parts.record_ids(&tracing::Span::current());
    let why = crate::endpoint::run_stream(sock, parts).await;
    metrics.stream.closed.with_label_values(&[why]).inc();
}
