//! The admin HTTP API, bound to localhost by default:
//! `GET /v1/status` (identity, jurisdiction, state, circuits, peers by
//! jurisdiction, rulings in force, refusals, drain progress),
//! `POST /v1/rulings` (a signed ruling file, as `ferry policy sign` writes
//! it), `POST /v1/drain` (`{"exit_by": RFC 3339}` or `{"in_secs": N}`, and
//! an optional `"reason"`: the operator drains the node, persisted),
//! `DELETE /v1/drain` (cancels it), `POST /v1/revocations` (a signed
//! revocation file, as `ferry authority revoke` writes it),
//! `POST /v1/keys/rotate-noise` (`{"grace_secs": N}`: a new Noise key, the
//! old one accepted for N seconds), `GET /v1/paths?n=N` (an entry: which
//! nodes N freshly picked paths would use), `GET /v1/what-if?region=..&exit_by=..`
//! and `POST /v1/what-if` (a ruling file: what it would do before it is
//! signed, [`get_what_if`]), `GET /v1/audit?since=..` (the jurisdiction
//! trail, [`crate::audit`]), `GET /v1/audit/report?ruling=ID` (a signed
//! exit report), `GET /livez` and `GET /readyz`
//! (200 only while the node is admitted, active and has joined the mesh:
//! 503 while unadmitted, joining, draining or exited).
//!
//! POST bodies must be `Content-Type: application/json`, and on a loopback
//! listener the `Host` header must name a loopback address or `localhost`
//! ([`guard`]), so a web page cannot drive a desktop node's API (CSRF, DNS
//! rebinding). A drain may end at most a year ahead; every date printed is
//! bounded to what RFC 3339 can write, so nothing stored can fail to read
//! back.
//!
//! The metrics listener serves `GET /metrics`, `/livez` and `/readyz` and
//! nothing else, so it can face a cluster's network (probes, scrapes)
//! while the admin API, which can drain the node, stays on loopback.
//!
//! Each of the two listeners holds at most [`CONNECTIONS`] connections at
//! once (more wait in the kernel's backlog, costing the node no
//! descriptor), at most [`PER_ADDRESS`] from one address (more are closed
//! on arrival and counted, `ferry_refusals_total{reason="connections"}`),
//! and closes a connection that has had no answer written for [`IDLE`]
//! ([`Bounded`]). `axum::serve` itself accepts without limit and has no
//! read timeout, so anyone who can reach the metrics port could otherwise
//! use up the node's descriptors, and with them its links; and the timer
//! runs from the last answer, not the last byte read, so a client that
//! trickles a request a byte at a time holds its slot for [`IDLE`] at
//! most. One address cannot keep the probes (kubelet's, from another
//! address) waiting.

use crate::authority::{SignedFile, fmt_time, now_ms};
use crate::control::{Command, GossipCounters, offer_and_publish};
use crate::rulings::{Offered, Revocations, Rulings};
use crate::switch::Switch;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use prost::Message;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Connections at once on the admin listener, and on the metrics listener.
pub const CONNECTIONS: usize = 64;

/// Connections at once from one address (an IPv4 address or an IPv6
/// address), on each of the admin and metrics listeners.
pub const PER_ADDRESS: u32 = 8;

/// A connection to the admin or metrics listener with no answer written
/// for this long is closed (a scraper that keeps connections reconnects).
pub const IDLE: std::time::Duration = std::time::Duration::from_secs(10);

/// A listener for `axum::serve` with at most [`CONNECTIONS`] connections
/// open at once and [`PER_ADDRESS`] from one address, each closed once
/// [`IDLE`] passes with no answer written.
pub struct Bounded {
    inner: TcpListener,
    slots: Arc<tokio::sync::Semaphore>,
    by_address: crate::limits::Counts<std::net::IpAddr>,
    refused: prometheus::IntCounter,
}

impl Bounded {
    /// Bounds `inner`; connections refused (one address past its share)
    /// are counted in `refused`.
    pub fn new(inner: TcpListener, refused: prometheus::IntCounter) -> Self {
        Self {
            inner,
            slots: Arc::new(tokio::sync::Semaphore::new(CONNECTIONS)),
            by_address: crate::limits::Counts::default(),
            refused,
        }
    }
}

impl axum::serve::Listener for Bounded {
    type Io = Slotted;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        loop {
            let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            let Ok(place) = self.by_address.take(addr.ip(), PER_ADDRESS) else {
                // Closed on arrival: this address has its share.
                self.refused.inc();
                continue;
            };
            let idle = Box::pin(tokio::time::sleep(IDLE));
            return (
                Slotted {
                    io,
                    idle,
                    _place: place,
                    _slot: slot,
                },
                addr,
            );
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection holding one of its listener's slots, and one of its
/// address's, until it closes.
pub struct Slotted {
    io: tokio::net::TcpStream,
    /// Reset by every write (an answer going out).
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
    _place: crate::limits::Place<std::net::IpAddr>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Slotted {
    /// An answer went out: the connection has [`IDLE`] again.
    fn answered(&mut self, wrote: &std::task::Poll<std::io::Result<usize>>) {
        if matches!(wrote, std::task::Poll::Ready(Ok(n)) if *n > 0) {
            let at = tokio::time::Instant::now() + IDLE;
            self.idle.as_mut().reset(at);
        }
    }
}

impl tokio::io::AsyncRead for Slotted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let read = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if read.is_pending() && self.idle.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
        }
        read
    }
}

impl tokio::io::AsyncWrite for Slotted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let wrote = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.answered(&wrote);
        wrote
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let wrote = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.answered(&wrote);
        wrote
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The counter of connections a listener closed on arrival.
fn refused_connections(st: &AdminState) -> prometheus::IntCounter {
    st.switch
        .metrics
        .node
        .refusals
        .with_label_values(&["connections"])
}

/// What the handlers need.
pub struct AdminState {
    /// The data plane (and through it, the directory).
    pub switch: Arc<Switch>,
    /// Rulings.
    pub rulings: Arc<Rulings>,
    /// Revocations.
    pub revocations: Arc<Revocations>,
    /// The store (a revoked node's advert is deleted from it).
    pub store: Arc<crate::store::Store>,
    /// Gossip refusals.
    pub counters: Arc<GossipCounters>,
    /// The control plane, to gossip accepted rulings.
    pub control: mpsc::UnboundedSender<Command>,
    /// The origin, if the node is an entry.
    pub origin: Option<Arc<crate::origin::Origin>>,
}

/// Serves `GET /metrics` (Prometheus text format) until `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
) {
    let refused = refused_connections(&state);
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    if let Err(e) = axum::serve(Bounded::new(listener, refused), app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "metrics listener stopped");
    }
}

async fn metrics(
    State(st): State<Arc<AdminState>>,
) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    // Each subsystem fills its own gauges, where its data lives.
    let m = &st.switch.metrics;
    let now = crate::authority::now_ms();
    st.switch.observe(m, now);
    if let Some(o) = &st.origin {
        o.observe(m, now).await;
    }
    st.rulings.observe(&m.control);
    st.revocations.observe(&m.control);
    st.counters.observe(m);
    let body = m.encode();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// What a web page cannot send, checked before any handler runs.
///
/// - POST bodies must say `Content-Type: application/json`: a page can send
///   a cross-origin POST without asking only as a "simple request"
///   (text/plain, forms), never as JSON, so a page a desktop user visits
///   cannot drain or rotate a loopback node (CSRF); 415 otherwise.
/// - On a loopback listener the `Host` header must name a loopback address
///   or `localhost`: a page that rebinds its own name to 127.0.0.1 (DNS
///   rebinding) sends its own name, and is refused with 421.
/// - With `[admin] token_file`, every request but the probes (`/livez`,
///   `/readyz`) must carry `Authorization: Bearer <token>` (compared in
///   constant time, by digest); 401 otherwise. Other local users (and
///   anything else that reaches the listener) then cannot drain the node.
async fn guard(
    local: Option<std::net::SocketAddr>,
    token: Option<[u8; 32]>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let refuse = |code: StatusCode, error: &str, detail: &str| {
        (code, Json(json!({ "error": error, "detail": detail }))).into_response()
    };
    if let Some(digest) = token
        && !matches!(req.uri().path(), "/livez" | "/readyz")
    {
        let given = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| {
                let (scheme, t) = h.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| t.trim())
            });
        if !given.is_some_and(|t| crate::auth::verify_token(t, &digest)) {
            return (
                StatusCode::UNAUTHORIZED,
                [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
                Json(json!({
                    "error": "token",
                    "detail": "this admin API needs Authorization: Bearer with the token in [admin] token_file (ferry: --admin-token-file or FERRY_ADMIN_TOKEN_FILE)",
                })),
            )
                .into_response();
        }
    }
    if local.is_some_and(|a| a.ip().is_loopback()) {
        let host = req
            .headers()
            .get(axum::http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let name = host
            .rsplit_once(':')
            .map_or(host, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let loopback = name.eq_ignore_ascii_case("localhost")
            || name
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return refuse(
                StatusCode::MISDIRECTED_REQUEST,
                "host",
                "this admin API answers only requests addressed to a loopback address or localhost",
            );
        }
    }
    if req.method() == axum::http::Method::POST {
        let json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            });
        if !json {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content_type",
                "send the body as Content-Type: application/json",
            );
        }
    }
    next.run(req).await
}

/// Serves until `shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let token = state.switch.cfg.admin_token;
    let refused = refused_connections(&state);
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/rulings", post(post_ruling))
        .route("/v1/drain", post(post_drain).delete(delete_drain))
        .route("/v1/revocations", post(post_revocation))
        .route("/v1/keys/rotate-noise", post(post_rotate_noise))
        .route("/v1/paths", get(get_paths))
        .route("/v1/what-if", get(get_what_if).post(post_what_if))
        .route("/v1/audit", get(get_audit))
        .route("/v1/audit/report", get(get_report))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(state);
    let local = listener.local_addr().ok();
    // Requests are served on axum's own tasks: they log in the span the
    // API was started in (the demo's `node{at=..}`).
    let span = tracing::Span::current();
    let app = app.layer(axum::middleware::from_fn(move |req, next| {
        tracing::Instrument::instrument(guard(local, token, req, next), span.clone())
    }));
    if let Err(e) = axum::serve(Bounded::new(listener, refused), app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "admin API stopped");
    }
}

fn certificate_status(sw: &Switch, now: u64) -> Value {
    let Some(c) = &sw.certificate else {
        return json!({
            "present": false,
            "needed": sw.needs_certificate(),
            "problem": sw.admission_problem(now),
        });
    };
    match &c.verified {
        Ok(cert) => json!({
            "present": true,
            "needed": sw.needs_certificate(),
            "jurisdiction": cert.jurisdiction.to_string(),
            "family": cert.family,
            "roles": cert.roles.to_string(),
            "capacity_max_mbps": cert.capacity_max_mbps,
            "not_before": fmt_time(cert.not_before_ms),
            "not_after": fmt_time(cert.not_after_ms),
            "expires_in_secs": cert.not_after_ms.saturating_sub(now) / 1000,
            "problem": c.problem(now),
        }),
        Err(e) => json!({
            "present": true,
            "needed": sw.needs_certificate(),
            "problem": format!("its certificate is refused: {e}"),
        }),
    }
}

/// `POST /v1/revocations`: a signed revocation file. Applied here (the node
/// leaves the directory, its links close), then gossiped.
async fn post_revocation(
    State(st): State<Arc<AdminState>>,
    body: String,
) -> (StatusCode, Json<Value>) {
    let file: crate::cert::RevocationFile = match serde_json::from_str(&body) {
        Ok(f) => f,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(
                    json!({ "error": "malformed", "detail": format!("not a revocation file: {e}") }),
                ),
            );
        }
    };
    let bytes = match file.to_signed() {
        Ok(s) => s.encode_to_vec(),
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({ "error": "malformed", "detail": format!("{e:#}") })),
            );
        }
    };
    match crate::control::apply_revocation(
        &st.revocations,
        &st.switch.directory,
        &st.switch.quarantine,
        &st.store,
        &bytes,
    ) {
        Ok(r) => {
            let news = matches!(r, crate::rulings::Revoked::New(_));
            if news {
                st.switch.close_revoked();
            }
            if r != crate::rulings::Revoked::Duplicate {
                let _ = st.control.send(Command::PublishRevocation(bytes));
            }
            (
                StatusCode::OK,
                Json(json!({
                    "revoked": file.revocation.node_id,
                    "new": news,
                    "cosigned": matches!(r, crate::rulings::Revoked::Cosigned(_)),
                })),
            )
        }
        Err(e) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "error": e.kind, "detail": e.detail })),
        ),
    }
}

/// `POST /v1/keys/rotate-noise` body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateReq {
    grace_secs: u64,
}

/// Switches the node to a new Noise key; the old one answers handshakes for
/// `grace_secs` more, then is erased. A fresh advert carries both.
async fn post_rotate_noise(
    State(st): State<Arc<AdminState>>,
    Json(req): Json<RotateReq>,
) -> (StatusCode, Json<Value>) {
    if !(1..=30 * 86_400).contains(&req.grace_secs) {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({ "error": "invalid", "detail": "grace_secs must be 1 to 2592000 (30 days)" }),
            ),
        );
    }
    let now = now_ms();
    match st
        .switch
        .keys
        .noise
        .rotate(std::time::Duration::from_secs(req.grace_secs), now)
    {
        Ok(public) => {
            let _ = st.control.send(Command::Advertise);
            tracing::info!(
                grace_secs = req.grace_secs,
                "Noise key rotated; the old one is being retired"
            );
            (
                StatusCode::OK,
                Json(json!({
                    "noise_key": hex::encode(public),
                    "old_key_until": fmt_time(now + req.grace_secs * 1000),
                })),
            )
        }
        Err(e) => (
            StatusCode::CONFLICT,
            Json(json!({ "error": "rotating", "detail": format!("{e:#}") })),
        ),
    }
}

/// An error answer: `{"error": kind, "detail": why}` with `code`.
fn refusal(code: StatusCode, error: &str, detail: impl Into<String>) -> (StatusCode, Json<Value>) {
    (
        code,
        Json(json!({ "error": error, "detail": detail.into() })),
    )
}

/// A query key that is not one of `known`, named with them: refused, so a
/// typo cannot silently drop a filter or widen a scope.
fn unknown_key(q: &BTreeMap<String, String>, known: &[&str]) -> Option<String> {
    q.keys()
        .find(|k| !known.contains(&k.as_str()))
        .map(|k| format!("unknown key `{k}` (known: {})", known.join(", ")))
}

/// `GET /v1/what-if?region=GB&exit_by=DATE[&from=DATE][&class=C|&tenant=T]`:
/// what a ruling on `region` (a country or a bloc) draining from `from`
/// (default now) to `exit_by` would do, before anyone signs it. Unknown
/// keys are refused, so a typo cannot silently widen the scope.
async fn get_what_if(
    State(st): State<Arc<AdminState>>,
    axum::extract::Query(q): axum::extract::Query<BTreeMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    let now = now_ms();
    let bad = |detail: String| refusal(StatusCode::BAD_REQUEST, "bad_what_if", detail);
    if let Some(why) = unknown_key(&q, &["region", "from", "exit_by", "class", "tenant"]) {
        return bad(why);
    }
    let (Some(region), Some(exit_by)) = (q.get("region"), q.get("exit_by")) else {
        return bad("give region and exit_by".into());
    };
    let file = crate::authority::RulingFile {
        id: "what-if".into(),
        version: 1,
        region: region.clone(),
        blocked_from: q.get("from").cloned().unwrap_or_else(|| fmt_time(now)),
        exit_by: exit_by.clone(),
        classes: q.get("class").into_iter().cloned().collect(),
        tenants: q.get("tenant").into_iter().cloned().collect(),
        reason: "what if".into(),
        lifted: false,
    };
    what_if(&st, &file, now).await
}

/// `POST /v1/what-if`: the same for a ruling file (JSON), signed or not
/// yet: its own id and version, so a new version of a ruling in force is
/// weighed as replacing it.
async fn post_what_if(
    State(st): State<Arc<AdminState>>,
    body: String,
) -> (StatusCode, Json<Value>) {
    match crate::authority::RulingFile::parse(&body) {
        Ok(file) => what_if(&st, &file, now_ms()).await,
        Err(e) => refusal(StatusCode::BAD_REQUEST, "bad_what_if", format!("{e:#}")),
    }
}

/// The what-if's answer. An entry weighs its own circuits; any node
/// weighs the nodes and capacity it sees. Only an entry knows whose
/// circuits it carries, so the mesh's whole answer is every entry's
/// (`circuits_seen: "own"` says so).
async fn what_if(
    st: &AdminState,
    file: &crate::authority::RulingFile,
    now: u64,
) -> (StatusCode, Json<Value>) {
    let bad = |detail: String| refusal(StatusCode::BAD_REQUEST, "bad_what_if", detail);
    let ruling = match file
        .to_body(now, std::time::Duration::ZERO)
        .and_then(|b| crate::authority::to_ruling(&b))
    {
        Ok(r) => r,
        Err(e) => return bad(format!("{e:#}")),
    };
    let sw = &st.switch;
    let blocs = ferry_router::Blocs::builtin();
    let region = match blocs.resolve(&ruling.region) {
        Ok(r) => r,
        Err(e) => return bad(e.to_string()),
    };
    let view = sw.view(now);
    let result = match &st.origin {
        Some(o) => o.what_if(&ruling, now).await,
        None => ferry_router::what_if(
            &view,
            &st.rulings.snapshot(),
            &ruling,
            &blocs,
            ferry_router::Time(now),
            &[],
            &ferry_router::DrainConfig::default(),
        )
        .map(|i| (i, Vec::new())),
    };
    let (impact, circuits) = match result {
        Ok(x) => x,
        Err(e) => return bad(e.to_string()),
    };
    let mesh_capacity: u64 = view
        .nodes()
        .iter()
        .filter(|n| n.roles.relay || n.roles.exit)
        .map(|n| u64::from(n.capacity))
        .sum();
    let mut leaving_capacity = 0u64;
    let mut by_role: BTreeMap<&str, usize> = BTreeMap::new();
    let nodes: Vec<Value> = impact
        .nodes
        .iter()
        .filter_map(|id| view.get(id))
        .map(|n| {
            if n.roles.relay || n.roles.exit {
                leaving_capacity += u64::from(n.capacity);
            }
            for (role, on) in [
                ("entry", n.roles.entry),
                ("relay", n.roles.relay),
                ("exit", n.roles.exit),
            ] {
                if on {
                    *by_role.entry(role).or_default() += 1;
                }
            }
            json!({
                "id": hex::encode(n.id.0),
                "jurisdiction": n.jurisdiction.map(|j| j.to_string()),
                "roles": n.roles.to_string(),
                "capacity_mbps": n.capacity,
            })
        })
        .collect();
    let by_jurisdiction: BTreeMap<String, Value> = impact
        .by_jurisdiction
        .iter()
        .map(|(j, i)| {
            (
                j.to_string(),
                json!({ "nodes": i.nodes, "capacity_mbps": i.capacity, "circuits": i.circuits }),
            )
        })
        .collect();
    let at = |id: u64| {
        impact.plan.actions.iter().find_map(|a| match a {
            ferry_router::Action::Migrate {
                circuit,
                at,
                done_by,
                ..
            } if *circuit == id => Some((at.0, Some(done_by.0))),
            ferry_router::Action::CloseExitStreams { circuit, at, .. } if *circuit == id => {
                Some((at.0, None))
            }
            _ => None,
        })
    };
    let mut listed = Vec::new();
    for (action, ids) in [
        ("move", &impact.migrate),
        ("close", &impact.close),
        ("released", &impact.released),
    ] {
        for id in ids {
            let Some(c) = circuits.iter().find(|c| c.id == *id) else {
                continue;
            };
            let (when, done_by) = at(*id).unwrap_or((now, None));
            let risk = impact.at_risk.contains(id).then(|| {
                format!(
                    "a move takes up to {} s ([drain] migration_secs) and must end {} s ([drain] margin_secs) before the exit date: too late already",
                    sw.cfg.drain.migration.as_secs(),
                    sw.cfg.drain.margin.as_secs()
                )
            });
            listed.push(json!({
                "id": id,
                "path": c.jurisdictions(sw),
                "tenant": c.route.scope.tenant,
                "class": c.route.scope.class,
                "streams": c.stream_count(),
                "action": action,
                "at": fmt_time(when),
                "done_by": done_by.map(fmt_time),
                "at_risk": risk,
            }));
        }
    }
    let members: Vec<String> = region.iter().map(|j| j.to_string()).collect();
    let scope = crate::rulings::scope_json(&ruling.scope);
    (
        StatusCode::OK,
        Json(json!({
            "ruling": {
                "id": ruling.id,
                "version": ruling.version,
                "region": ruling.region.to_string(),
                "jurisdictions": members,
                "blocked_from": fmt_time(ruling.blocked_from.0),
                "exit_by": fmt_time(ruling.exit_by.0),
                "scope": scope,
                "lifted": ruling.lifted,
            },
            "nodes": nodes,
            "nodes_by_role": by_role,
            "by_jurisdiction": by_jurisdiction,
            "capacity_mbps": {
                "leaving": leaving_capacity,
                "mesh": mesh_capacity,
                "share": if mesh_capacity == 0 { 0.0 } else { leaving_capacity as f64 / mesh_capacity as f64 },
            },
            "circuits": listed,
            "migrate": impact.migrate.len(),
            "close": impact.close.len(),
            "at_risk": impact.at_risk.len(),
            "released": impact.released.len(),
            "tenants": impact.tenants,
            "circuits_seen": if st.origin.is_some() { "own" } else { "none" },
        })),
    )
}

/// `GET /v1/audit?since=DATE[&tenant=T][&limit=N]`, then
/// `GET /v1/audit?after=CURSOR[&tenant=T][&limit=N]`: the jurisdiction
/// trail of the streams that ended since `since` (RFC 3339), oldest first,
/// a page of at most `limit` records (default and most
/// [`crate::audit::MAX_EXPORT`]); `next` is the cursor of the page after,
/// or null at the end.
async fn get_audit(
    State(st): State<Arc<AdminState>>,
    axum::extract::Query(q): axum::extract::Query<BTreeMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    let bad = |detail: String| refusal(StatusCode::BAD_REQUEST, "bad_audit_query", detail);
    if let Some(why) = unknown_key(&q, &["since", "after", "tenant", "limit"]) {
        return bad(why);
    }
    let from = match (q.get("since"), q.get("after")) {
        (_, Some(cursor)) => match hex::decode(cursor) {
            Ok(k) if k.len() == 16 => k,
            _ => return bad(format!("after = `{cursor}`: not a cursor this API gave")),
        },
        (Some(since), None) => match humantime::parse_rfc3339_weak(since) {
            Ok(t) => (t
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64))
            .to_be_bytes()
            .to_vec(),
            Err(e) => return bad(format!("since = `{since}`: not an RFC 3339 time ({e})")),
        },
        (None, None) => return bad("give since (RFC 3339), or after (a cursor)".into()),
    };
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => crate::audit::MAX_EXPORT,
        Some(Ok(n)) if (1..=crate::audit::MAX_EXPORT).contains(&n) => n,
        Some(_) => return bad(format!("limit must be 1 to {}", crate::audit::MAX_EXPORT)),
    };
    let audit = st.switch.audit.clone();
    let tenant = q.get("tenant").cloned();
    let read =
        tokio::task::spawn_blocking(move || audit.page(&from, tenant.as_deref(), limit)).await;
    match read {
        Ok(Ok((records, next))) => (
            StatusCode::OK,
            Json(json!({ "records": records, "next": next.map(hex::encode) })),
        ),
        Ok(Err(e)) => refusal(StatusCode::INTERNAL_SERVER_ERROR, "store", format!("{e:#}")),
        Err(e) => refusal(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()),
    }
}

/// `GET /v1/audit/report?ruling=ID`: the exit report of a ruling this node
/// knows (in force or lifted), from its trail, signed with its identity
/// key ([`crate::audit::ExitReport`]).
async fn get_report(
    State(st): State<Arc<AdminState>>,
    axum::extract::Query(q): axum::extract::Query<BTreeMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    if let Some(why) = unknown_key(&q, &["ruling"]) {
        return refusal(StatusCode::BAD_REQUEST, "bad_report_query", why);
    }
    let Some(id) = q.get("ruling") else {
        return refusal(
            StatusCode::BAD_REQUEST,
            "bad_report_query",
            "give ruling (its id)",
        );
    };
    let set = st.rulings.snapshot();
    let (Some(ruling), Some(region)) = (set.get(id), set.region_of(id)) else {
        return refusal(
            StatusCode::NOT_FOUND,
            "unknown_ruling",
            format!("this node holds no ruling `{id}`"),
        );
    };
    if ruling.lifted {
        return refusal(
            StatusCode::CONFLICT,
            "ruling_lifted",
            format!(
                "ruling `{id}` is lifted: its exit date no longer binds, and a report would count lawful traffic as crossing after it"
            ),
        );
    }
    let mut report = crate::audit::ExitReport::new(ruling.clone(), *region);
    let audit = st.switch.audit.clone();
    let now = now_ms();
    let built = tokio::task::spawn_blocking(move || {
        audit.each(|r| report.add(r)).map(|()| report.finish(now))
    })
    .await;
    match built {
        Ok(Ok(mut body)) => {
            // What the trail cannot show yet: streams still open (recorded
            // when they end), and any the writer had no room for.
            let open = match &st.origin {
                Some(o) => o.crossing(ruling, region, now).await,
                None => 0,
            };
            body["open_sessions_crossing_now"] = json!(open);
            body["records_dropped_since_start"] = json!(st.switch.audit.dropped());
            (
                StatusCode::OK,
                Json(crate::audit::sign_report(&body, &st.switch.keys.identity)),
            )
        }
        Ok(Err(e)) => refusal(StatusCode::INTERNAL_SERVER_ERROR, "store", format!("{e:#}")),
        Err(e) => refusal(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()),
    }
}

/// Most paths one `GET /v1/paths` picks.
pub const MAX_SAMPLED_PATHS: usize = 20_000;

/// `GET /v1/paths?n=N` query.
#[derive(serde::Deserialize)]
struct PathsQuery {
    n: Option<usize>,
}

/// How `n` freshly picked paths (default 1000, at most 20000) spread over
/// the nodes: what an SRE checks after a capacity change.
async fn get_paths(
    State(st): State<Arc<AdminState>>,
    axum::extract::Query(q): axum::extract::Query<PathsQuery>,
) -> (StatusCode, Json<Value>) {
    let Some(o) = &st.origin else {
        return (
            StatusCode::CONFLICT,
            Json(
                json!({ "error": "not_entry", "detail": "this node is not an entry: it picks no paths" }),
            ),
        );
    };
    let n = q.n.unwrap_or(1000).clamp(1, MAX_SAMPLED_PATHS);
    // Off the async workers: picking is CPU work under the origin's RNG.
    let origin = o.clone();
    let Ok((counts, failed)) = tokio::task::spawn_blocking(move || origin.sample_paths(n)).await
    else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": "internal", "detail": "path sampling failed" })),
        );
    };
    let now = now_ms();
    let nodes: Vec<Value> = counts
        .iter()
        .map(|(id, c)| {
            let e = st.switch.directory.get(id, now);
            json!({
                "id": hex::encode(id.0),
                "jurisdiction": e.as_ref().map(|e| e.peer.jurisdiction.to_string()),
                "capacity_mbps": e.as_ref().map(|e| e.info().capacity),
                "paths": c,
            })
        })
        .collect();
    (
        StatusCode::OK,
        Json(json!({ "picked": n - failed, "failed": failed, "nodes": nodes })),
    )
}

/// By when an own circuit must be off its path, and why, as the entry's
/// drain planner decides it ([`ferry_router::must_leave`]): the earliest
/// deadline among its leaving hops (rulings in force, announced ones too,
/// over their jurisdictions for its traffic; their own drains), and
/// whether it moves or, its exit leaving, closes its streams. A hop this
/// node no longer knows (its advert lapsed, it was revoked) takes no new
/// streams but is not drained: it is reported as `hop_unknown`. Null when
/// nothing asks it to move.
fn must_leave(
    sw: &Switch,
    set: &ferry_router::RulingSet,
    c: &crate::origin::OriginCircuit,
    now: u64,
) -> Value {
    let hops: Vec<_> = c
        .path
        .iter()
        .map(|id| {
            let info = sw
                .directory
                .get(id, now)
                .map(|e| (Some(e.peer.jurisdiction), e.state));
            (*id, info)
        })
        .collect();
    let jurisdiction = |id: &ferry_router::NodeId| {
        sw.peer(id)
            .map_or_else(|| "??".to_string(), |p| p.jurisdiction.to_string())
    };
    let t = ferry_router::Time(now);
    let Some(l) = ferry_router::must_leave(&hops, set, &c.route.scope, t) else {
        return match hops.iter().find(|(_, info)| info.is_none()) {
            Some((id, _)) => json!({
                "by": fmt_time(now),
                "in_secs": 0,
                "jurisdiction": jurisdiction(id),
                "hop_unknown": hex::encode(id.0),
                "action": "move",
            }),
            None => Value::Null,
        };
    };
    let phase = if t < l.from {
        "announced"
    } else if t < l.by {
        "draining"
    } else {
        "overdue"
    };
    let ruling = l.ruling.as_deref().and_then(|id| set.get(id));
    json!({
        "by": fmt_time(l.by.0),
        "in_secs": l.by.0.saturating_sub(now) / 1000,
        "jurisdiction": jurisdiction(&l.node),
        "node": hex::encode(l.node.0),
        "action": if l.close { "close" } else { "move" },
        "phase": phase,
        "from": fmt_time(l.from.0),
        "ruling": ruling.map(|r| r.id.clone()),
        "version": ruling.map(|r| r.version),
        "region": ruling.map(|r| r.region.to_string()),
    })
}

async fn status(State(st): State<Arc<AdminState>>) -> Json<Value> {
    let now = now_ms();
    let sw = &st.switch;
    let mut by_j: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut peers = Vec::new();
    let mut live = sw.directory.live(now);
    live.sort_by_key(|e| (e.peer.jurisdiction, e.peer.id));
    for e in &live {
        by_j.entry(e.peer.jurisdiction.to_string())
            .or_default()
            .push(hex::encode(e.peer.id.0));
        peers.push(json!({
            "id": hex::encode(e.peer.id.0),
            "jurisdiction": e.peer.jurisdiction.to_string(),
            "roles": e.peer.roles.to_string(),
            "state": match e.state {
                _ if sw.quarantine.contains(&e.peer.id, e.peer.jurisdiction, now) => "quarantined",
                ferry_router::NodeState::Active => "active",
                ferry_router::NodeState::Draining { .. } => "draining",
                ferry_router::NodeState::Exited => "exited",
            },
            "load": e.load,
            "capacity_mbps": e.capacity,
            "noise_key": hex::encode(e.peer.noise_key),
            "expires_in_secs": e.expires_at_ms.map(|x| x.saturating_sub(now) / 1000),
            "rtt": sw.link_rtt(&e.peer.id).map(|r| json!({
                "srtt_ms": r.srtt.map(|d| d.as_secs_f64() * 1e3),
                "rttvar_ms": r.rttvar.as_secs_f64() * 1e3,
                "min_ms": r.min.map(|d| d.as_secs_f64() * 1e3),
                "samples": r.samples,
            })),
        }));
    }
    let set = st.rulings.snapshot();
    let rulings: Vec<Value> = set
        .iter()
        .map(|r| {
            let scope = crate::rulings::scope_json(&r.scope);
            json!({
                "id": r.id,
                "version": r.version,
                "region": r.region.to_string(),
                "blocked_from": fmt_time(r.blocked_from.0),
                "exit_by": fmt_time(r.exit_by.0),
                "scope": scope,
                "lifted": r.lifted,
                "reason": r.reason,
            })
        })
        .collect();
    let cur = sw.state.current();
    let until = match cur.state {
        ferry_router::NodeState::Draining { until } => Some(fmt_time(until.0)),
        _ => None,
    };
    let origin = match &st.origin {
        Some(o) => {
            let mut circuits = Vec::new();
            for c in o.circuits().await {
                circuits.push(json!({
                    "path": c.jurisdictions(sw),
                    "path_ids": c.path.iter().map(|p| hex::encode(p.0)).collect::<Vec<_>>(),
                    "streams": c.stream_count(),
                    "built_at_ms": c.built_at_ms,
                    "tenant": c.route.scope.tenant,
                    "class": c.route.scope.class,
                    "constraints": c.route.constraints.describe(),
                    "must_leave": must_leave(sw, &set, &c, now),
                    "congestion": c.congestion().map(|s| json!({
                        "window_bytes": s.window,
                        "in_flight_bytes": s.in_flight,
                        "rtt_us": s.rtt_us,
                        "base_rtt_us": s.base_rtt_us,
                        "slow_start": s.slow_start,
                    })),
                }));
            }
            let s = &o.stats;
            let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            json!({
                "circuits": circuits,
                "migrations_started": n(&s.migrations_started),
                "migrations_done": n(&s.migrations_done),
                "migrations_failed": n(&s.migrations_failed),
                "streams_moved": n(&s.streams_moved),
                "streams_rescued": n(&s.streams_rescued),
                "streams_lost": n(&s.streams_lost),
                "exit_circuits_closed": n(&s.exit_closed),
            })
        }
        None => Value::Null,
    };
    Json(json!({
        "node_id": hex::encode(sw.keys.node_id().0),
        "jurisdiction": sw.cfg.jurisdiction.to_string(),
        "roles": sw.cfg.roles.to_string(),
        "state": cur.name(),
        "state_reason": cur.reason,
        "ready": sw.readiness(now).ready,
        "draining_until": until,
        "operator_drain": sw.state.operator().map(|d| json!({
            "exit_by": fmt_time(d.until_ms),
            "reason": d.reason,
            "persisted": d.persisted,
        })),
        "circuits": sw.circuit_count(),
        "circuit_neighbours": sw.circuit_neighbours(),
        "link_bytes_out": sw.bytes_out(),
        "origin": origin,
        "peers": peers,
        "peers_by_jurisdiction": by_j,
        "quarantine": sw.quarantine.in_force(now).iter().map(|e| json!({
            "node_id": hex::encode(e.node.0),
            "claimed": e.claimed.to_string(),
            "landmark_id": hex::encode(e.landmark.0),
            "landmark_jurisdiction": e.landmark_jurisdiction.to_string(),
            "landmark_at": e.landmark_place,
            "measured_rtt_ms": e.measured.as_secs_f64() * 1e3,
            "minimum_rtt_ms": e.minimum.as_secs_f64() * 1e3,
            "measured_at": fmt_time(e.measured_at_ms),
            "expires_at": fmt_time(e.expires_at_ms),
            "signed_report_hex": hex::encode(&e.signed),
        })).collect::<Vec<_>>(),
        "rulings": rulings,
        "ruling_rejections": st.rulings.rejections(),
        "revoked": st.revocations.revoked().iter().map(|id| hex::encode(id.0)).collect::<Vec<_>>(),
        "revocation_rejections": st.revocations.rejections(),
        "certificate": certificate_status(sw, now),
        "noise_key": hex::encode(sw.keys.noise_public()),
        "retiring_noise_key_until": match sw.keys.noise.retiring(now) {
            (k, until) if !k.is_empty() => Some(fmt_time(until)),
            _ => None,
        },
        "advert_rejections": st.counters.advert_rejections(),
    }))
}

async fn post_ruling(State(st): State<Arc<AdminState>>, body: String) -> (StatusCode, Json<Value>) {
    let signed = match serde_json::from_str::<SignedFile>(&body)
        .map_err(anyhow::Error::from)
        .and_then(|f| f.to_signed())
    {
        Ok(s) => s,
        Err(e) => {
            let reason = json!({ "error": "malformed", "detail": format!("{e:#}") });
            return (StatusCode::BAD_REQUEST, Json(reason));
        }
    };
    match offer_and_publish(&st.rulings, &st.control, signed.encode_to_vec()) {
        Ok(o) => (
            StatusCode::OK,
            Json(json!({ "status": match o {
                    Offered::InForce => "in force",
                    Offered::Cosigned => "already in force; its new signatures kept",
                    Offered::Duplicate | Offered::Behind => "already in force",
                } })),
        ),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": e.kind, "detail": e.detail })),
        ),
    }
}

async fn readyz(State(st): State<Arc<AdminState>>) -> (StatusCode, Json<Value>) {
    let r = st.switch.readiness(now_ms());
    let code = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({ "ready": r.ready, "state": r.state, "reason": r.reason })),
    )
}

/// How far ahead an operator drain may end: a year.
const MAX_DRAIN_MS: u64 = 366 * 86_400_000;

/// `POST /v1/drain` body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainRequest {
    exit_by: Option<String>,
    in_secs: Option<u64>,
    #[serde(default)]
    reason: String,
    /// false: not kept across a restart (a pre-stop drain).
    #[serde(default = "yes")]
    persist: bool,
}

fn yes() -> bool {
    true
}

async fn post_drain(State(st): State<Arc<AdminState>>, body: String) -> (StatusCode, Json<Value>) {
    let bad = |detail: String| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "malformed", "detail": detail })),
        )
    };
    let req: DrainRequest = match serde_json::from_str(&body) {
        Ok(r) => r,
        Err(e) => return bad(e.to_string()),
    };
    let now = now_ms();
    let until = match (req.exit_by, req.in_secs) {
        (Some(t), None) => match humantime::parse_rfc3339_weak(&t) {
            Ok(t) => t
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            Err(e) => {
                return bad(format!(
                    "exit_by `{t}`: {e} (use RFC 3339, e.g. 2026-12-01T00:00:00Z)"
                ));
            }
        },
        (None, Some(s)) => now.saturating_add(s.saturating_mul(1000)),
        _ => return bad("give exactly one of exit_by (RFC 3339) and in_secs".into()),
    };
    if until <= now {
        return bad(format!("exit_by {} is not in the future", fmt_time(until)));
    }
    // A drain is days or weeks; a date past a year is a mistake, and one
    // past year 9999 could not be written back (refused, never stored).
    if until > now + MAX_DRAIN_MS {
        return bad(format!(
            "exit_by {} is more than a year ahead",
            fmt_time(until)
        ));
    }
    if req.reason.len() > 200 {
        return bad("reason is longer than 200 characters".into());
    }
    match st.switch.state.drain(until, &req.reason, req.persist) {
        Ok(d) => {
            tracing::info!(exit_by = %fmt_time(d.until_ms), persist = req.persist, "operator drain requested");
            (
                StatusCode::OK,
                Json(json!({ "status": "draining", "exit_by": fmt_time(d.until_ms) })),
            )
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": "store", "detail": format!("{e:#}") })),
        ),
    }
}

async fn delete_drain(State(st): State<Arc<AdminState>>) -> (StatusCode, Json<Value>) {
    match st.switch.state.undrain() {
        Ok(had) => {
            tracing::info!(had, "operator drain cancelled");
            (
                StatusCode::OK,
                Json(json!({ "status": if had { "cancelled" } else { "no operator drain" } })),
            )
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": "store", "detail": format!("{e:#}") })),
        ),
    }
}

/// The admin API's client side, for the CLI and `ferry demo ruling`.
pub mod client {
    use anyhow::{Context, Result, bail};
    use serde_json::Value;
    use std::time::Duration;

    /// The admin token this process sends ([`use_token`]).
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

    /// Makes every request of this process's [`agent`]s carry `token`
    /// (`Authorization: Bearer`). Set once; later calls change nothing.
    pub fn use_token(token: String) {
        let _ = TOKEN.set(token);
    }

    fn with_token(
        mut req: ureq::http::Request<ureq::SendBody>,
        next: ureq::middleware::MiddlewareNext,
    ) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        if let Some(t) = TOKEN.get()
            && let Ok(v) = ureq::http::HeaderValue::from_str(&format!("Bearer {t}"))
        {
            req.headers_mut()
                .insert(ureq::http::header::AUTHORIZATION, v);
        }
        next.handle(req)
    }

    /// An HTTP agent that hands back error statuses as answers (the API
    /// explains its refusals in the body), and sends the admin token if
    /// this process has one.
    pub fn agent(timeout: Duration) -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .middleware(with_token)
            .build()
            .into()
    }

    /// An admin API answer: its JSON on success; otherwise an error with
    /// the API's reason (`refused (kind): detail`).
    pub fn answer(
        admin: &str,
        resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value> {
        let mut resp = resp.with_context(|| format!("reaching the admin API at {admin}"))?;
        let code = resp.status();
        let v: Value = resp.body_mut().read_json().context("admin API answer")?;
        if !code.is_success() {
            bail!(
                "refused ({}): {}",
                v["error"].as_str().unwrap_or("?"),
                v["detail"].as_str().unwrap_or("")
            );
        }
        Ok(v)
    }

    /// Posts a signed revocation file (JSON) to `/v1/revocations`.
    pub fn publish_revocation(admin: &str, body: &str) -> Result<Value> {
        let resp = agent(Duration::from_secs(10))
            .post(&format!("http://{admin}/v1/revocations"))
            .header("content-type", "application/json")
            .send(body.as_bytes());
        answer(admin, resp)
    }

    /// Asks the node to rotate its Noise key, the old one accepted for
    /// `grace_secs`.
    pub fn rotate_noise(admin: &str, grace_secs: u64) -> Result<Value> {
        let resp = agent(Duration::from_secs(10))
            .post(&format!("http://{admin}/v1/keys/rotate-noise"))
            .send_json(serde_json::json!({ "grace_secs": grace_secs }));
        answer(admin, resp)
    }

    /// How `n` freshly picked paths would spread over the nodes.
    pub fn paths(admin: &str, n: usize) -> Result<Value> {
        let resp = agent(Duration::from_secs(30))
            .get(&format!("http://{admin}/v1/paths?n={n}"))
            .call();
        answer(admin, resp)
    }

    /// Posts a signed ruling file (JSON) to `/v1/rulings`.
    pub fn publish_ruling(admin: &str, body: &str) -> Result<Value> {
        let resp = agent(Duration::from_secs(10))
            .post(&format!("http://{admin}/v1/rulings"))
            .header("content-type", "application/json")
            .send(body.as_bytes());
        answer(admin, resp)
    }
}
