//! The admin HTTP API, bound to localhost by default:
//! `GET /v1/status` (identity, jurisdiction, state, peers by jurisdiction,
//! rulings in force, refusals) and `POST /v1/rulings` (a signed ruling file,
//! as `ferry policy sign` writes it).

use crate::authority::{SignedFile, fmt_time, now_ms};
use crate::control::{Command, GossipCounters, offer_and_publish};
use crate::rulings::{Offered, Rulings};
use crate::switch::Switch;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_router::{Scope, Status, Time, TrafficScope};
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
}

/// Serves until `shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/rulings", post(post_ruling))
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
    let j = Some(sw.cfg.jurisdiction);
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
    let here = match set.status(j, &TrafficScope::default(), Time(now)).0 {
        Status::Allowed => "active",
        Status::Draining { .. } => "draining",
        Status::Blocked => "exited",
    };
    Json(json!({
        "node_id": hex::encode(sw.keys.node_id().0),
        "jurisdiction": sw.cfg.jurisdiction.to_string(),
        "roles": sw.cfg.roles.to_string(),
        "state": here,
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
