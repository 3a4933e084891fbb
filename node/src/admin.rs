//! The admin HTTP API, bound to localhost by default:
//! `GET /v1/status` (identity, jurisdiction, state, circuits, peers by
//! jurisdiction, rulings in force, refusals, drain progress),
//! `POST /v1/rulings` (a signed ruling file, as `ferry policy sign` writes
//! it), `POST /v1/drain` (`{"exit_by": RFC 3339}` or `{"in_secs": N}`, and
//! an optional `"reason"`: the operator drains the node, persisted),
//! `DELETE /v1/drain` (cancels it), `GET /livez` and `GET /readyz` (200
//! only while the node is active and has joined the mesh: 503 while
//! joining, draining or exited).
//!
//! The metrics listener serves `GET /metrics`, `/livez` and `/readyz` and
//! nothing else, so it can face a cluster's network (probes, scrapes)
//! while the admin API, which can drain the node, stays on loopback.

use crate::authority::{SignedFile, fmt_time, now_ms};
use crate::control::{Command, GossipCounters, offer_and_publish};
use crate::rulings::{Offered, Rulings};
use crate::switch::Switch;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_router::Scope;
use prost::Message;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the handlers need.
pub struct AdminState {
    /// The data plane (and through it, the directory).
    pub switch: Arc<Switch>,
    /// Rulings.
    pub rulings: Arc<Rulings>,
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
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "metrics listener stopped");
    }
}

async fn metrics(
    State(st): State<Arc<AdminState>>,
) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    let body = st
        .switch
        .metrics
        .render(&st.switch, st.origin.as_deref(), &st.rulings, &st.counters)
        .await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// Serves until `shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/rulings", post(post_ruling))
        .route("/v1/drain", post(post_drain).delete(delete_drain))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "admin API stopped");
    }
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
                ferry_router::NodeState::Active => "active",
                ferry_router::NodeState::Draining { .. } => "draining",
                ferry_router::NodeState::Exited => "exited",
            },
            "load": e.load,
            "capacity_mbps": e.capacity,
            "expires_in_secs": e.expires_at_ms.map(|x| x.saturating_sub(now) / 1000),
        }));
    }
    let set = st.rulings.snapshot();
    let rulings: Vec<Value> = set
        .iter()
        .map(|r| {
            let scope = match &r.scope {
                Scope::All => json!("all"),
                Scope::Classes(c) => json!({ "classes": c }),
                Scope::Tenants(t) => json!({ "tenants": t }),
            };
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
        "rulings": rulings,
        "ruling_rejections": st.rulings.rejections(),
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
            Json(
                json!({ "status": if o == Offered::InForce { "in force" } else { "already in force" } }),
            ),
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
        (None, Some(s)) => now + s.saturating_mul(1000),
        _ => return bad("give exactly one of exit_by (RFC 3339) and in_secs".into()),
    };
    if until <= now {
        return bad(format!("exit_by {} is not in the future", fmt_time(until)));
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

    /// An HTTP agent that hands back error statuses as answers (the API
    /// explains its refusals in the body).
    pub fn agent(timeout: Duration) -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
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

    /// Posts a signed ruling file (JSON) to `/v1/rulings`.
    pub fn publish_ruling(admin: &str, body: &str) -> Result<Value> {
        let resp = agent(Duration::from_secs(10))
            .post(&format!("http://{admin}/v1/rulings"))
            .header("content-type", "application/json")
            .send(body.as_bytes());
        answer(admin, resp)
    }
}
