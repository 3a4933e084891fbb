//! The origin side: building circuits hop by hop, and the pool of circuits
//! that client streams share.
//!
//! Building is telescoping. The origin runs a Noise NK handshake with the
//! first hop inside CREATE/CREATED, then, for each further hop, sends the
//! current tip an EXTEND sealed with its session: the tip alone can read
//! which node comes next, so every relay learns only its two neighbours. The
//! session with the last hop — the exit — is the end-to-end session.
//!
//! Every path comes from the router (`ferry-router`), over the live mesh
//! view (adverts, plus what this node learnt first-hand: drain notices and
//! refusals) and the rulings in force, for the connection's traffic scope
//! and constraints (see `routing`). Streams share a circuit only if their
//! routes are equal.
//!
//! Drains: [`Origin::run_drains`] plans every 250 ms with the router's
//! `plan_drain` over this node's circuits. A circuit through a leaving relay
//! is rebuilt to the same exit around it, make-before-break, at the time the
//! plan spreads it to (kept once planned, and re-planned only when the
//! deadline moves), with retries and backoff; its streams move with no byte
//! lost (see `endpoint`), then the old circuit is destroyed. A circuit whose
//! exit is leaving cannot move (its TCP connections live there): it takes no
//! new streams and is closed at the deadline with the reason.

use crate::endpoint::{CircuitError, Endpoint, Inbound, StreamHandle, StreamParts};
use crate::link::LinkHandle;
use crate::routing::Route;
use crate::switch::Switch;
use bytes::BytesMut;
use ferry_circuit::crypto::Session;
use ferry_circuit::{Build, Hop, Side, Step, Stream};
use ferry_proto::CellCmd;
use ferry_proto::pb::{DestroyReason, EndReason};
use ferry_router::{
    Action, DrainConfig, LiveCircuit, NodeId, NodeState, PathIndex, PathRequest, RulingSet, Time,
};
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

/// How long the origin waits for the exit to connect a stream. Exits time
/// out their own connects sooner (`exit.connect_timeout_secs`, at most 300);
/// this only catches an exit that never answers.
const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(330);

/// What arrives for a circuit while it is being built.
#[derive(Debug)]
enum BuildEvent {
    Created(BytesMut),
    Control(BytesMut),
    Destroyed(DestroyReason),
}

/// Answers a build waits for at once: one per step (a hop that sends more
/// breaks the protocol).
const BUILD_EVENTS: usize = 4;

/// How long the origin tries to move the streams of a circuit it lost
/// without warning (a relay killed, a link cut) onto a new circuit to the
/// same exit; exits keep such streams parked for
/// [`crate::endpoint::PARK_MS`], longer than this.
pub const RESCUE_WINDOW: Duration = Duration::from_secs(20);

/// Streams of a lost circuit, to move onto a new circuit to its exit.
struct Rescue {
    route: Arc<Route>,
    path: Vec<NodeId>,
    orphans: Vec<(Arc<StreamHandle>, Stream)>,
}

enum State {
    Building(mpsc::Sender<BuildEvent>),
    Open(Arc<Endpoint>),
    Closed,
}

/// The circuit pool, locked.
type Pool<'a> = tokio::sync::MutexGuard<'a, Vec<Arc<OriginCircuit>>>;

/// A circuit this node originates.
pub struct OriginCircuit {
    link: Arc<LinkHandle>,
    circ: u32,
    state: Mutex<State>,
    /// The nodes on the circuit, origin side first.
    pub path: Vec<NodeId>,
    /// Its id for the drain planner.
    pub id: u64,
    /// The route its streams asked for.
    pub route: Arc<Route>,
    /// Set when the circuit is leaving: no new streams on it.
    closing: AtomicBool,
    /// Set while a migration task runs for it.
    migrating: AtomicBool,
    /// Set once the planner said it cannot move in time (warned once).
    at_risk: AtomicBool,
    /// When it was built, ms since the epoch.
    pub built_at_ms: u64,
    /// Where a lost circuit's streams go to be moved ([`Origin::run_rescues`]).
    rescue: mpsc::UnboundedSender<Rescue>,
}

/// Whether a circuit closed for `reason` was lost rather than ended: its
/// streams are worth moving to another circuit to the same exit.
fn lost(reason: DestroyReason) -> bool {
    matches!(
        reason,
        DestroyReason::LinkLost
            | DestroyReason::Protocol
            | DestroyReason::Unspecified
            | DestroyReason::Shutdown
    )
}

/// A hop sent more build answers than there are steps.
fn too_many<T>(_: mpsc::error::TrySendError<T>) -> CircuitError {
    CircuitError::Protocol("more answers than the build has steps".into())
}

impl crate::switch::OriginSlot for OriginCircuit {
    fn on_cell(&self, cmd: CellCmd, buf: BytesMut) -> Result<(), CircuitError> {
        OriginCircuit::on_cell(self, cmd, buf)
    }

    fn close(&self, reason: DestroyReason) {
        OriginCircuit::close(self, reason)
    }

    fn path(&self) -> &[NodeId] {
        &self.path
    }
}

impl OriginCircuit {
    /// Handles a cell for this circuit (called by the switch).
    pub(crate) fn on_cell(&self, cmd: CellCmd, buf: BytesMut) -> Result<(), CircuitError> {
        let st = self.state.lock().expect("state lock");
        match (&*st, cmd) {
            (State::Building(tx), CellCmd::Created) => {
                tx.try_send(BuildEvent::Created(buf)).map_err(too_many)?;
            }
            (State::Building(tx), CellCmd::Control) => {
                tx.try_send(BuildEvent::Control(buf)).map_err(too_many)?;
            }
            (State::Open(end), CellCmd::Relay) => {
                let end = end.clone();
                drop(st);
                end.on_relay(buf)?;
            }
            (State::Closed, _) => {}
            (_, cmd) => {
                return Err(CircuitError::Protocol(format!(
                    "unexpected {} cell at the origin",
                    cmd.name()
                )));
            }
        }
        Ok(())
    }

    /// The circuit was destroyed.
    pub(crate) fn close(&self, reason: DestroyReason) {
        let prev = std::mem::replace(&mut *self.state.lock().expect("state lock"), State::Closed);
        match prev {
            State::Building(tx) => {
                let _ = tx.try_send(BuildEvent::Destroyed(reason));
            }
            // Lost without warning (a hop died, a link was cut, a hop
            // broke the protocol): the open streams move to a new circuit
            // to the same exit, which parked them.
            State::Open(end) if lost(reason) => {
                let orphans = end.close_rescuing(reason);
                if !orphans.is_empty() {
                    let rescue = Rescue {
                        route: self.route.clone(),
                        path: self.path.clone(),
                        orphans,
                    };
                    if let Err(e) = self.rescue.send(rescue) {
                        for (h, _) in e.0.orphans {
                            h.end(
                                EndReason::CircuitClosed,
                                "circuit lost while the entry stops".into(),
                            );
                        }
                    }
                }
            }
            State::Open(end) => end.close(reason),
            State::Closed => {}
        }
    }

    /// The path by jurisdiction, for logs and status.
    pub fn jurisdictions(&self, sw: &Switch) -> Vec<String> {
        self.path
            .iter()
            .map(|id| {
                sw.peer(id)
                    .map(|p| p.jurisdiction.to_string())
                    .unwrap_or_else(|| "??".into())
            })
            .collect()
    }

    /// Streams on it.
    pub fn stream_count(&self) -> usize {
        self.endpoint().map_or(0, |e| e.stream_count())
    }

    /// Where its congestion window stands (`None` when it does not probe).
    pub fn congestion(&self) -> Option<ferry_circuit::congestion::Snapshot> {
        self.endpoint().and_then(|e| e.congestion())
    }

    fn endpoint(&self) -> Option<Arc<Endpoint>> {
        match &*self.state.lock().expect("state lock") {
            State::Open(e) if !e.is_closed() => Some(e.clone()),
            _ => None,
        }
    }
}

/// How long a stream waits for a joining entry to learn the rulings in force.
pub const JOIN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A pooled circuit with room for a stream: its session, and the circuit.
type Chosen = (Arc<Endpoint>, Arc<OriginCircuit>);

/// Why a stream could not be opened: maps to a SOCKS5 reply.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No path satisfies the constraints.
    #[error("{0}")]
    NoPath(#[from] ferry_router::NoPath),
    /// Building the circuit failed.
    #[error("circuit build failed: {0}")]
    Build(String),
    /// The connection's routing options are malformed.
    #[error("routing options: {0}")]
    Options(String),
    /// The entry cannot route yet: it has not received the rulings in
    /// force from any peer (or it is not admitted).
    #[error("entry not ready: {0}")]
    NotReady(String),
    /// The exit refused or failed the stream.
    #[error("exit refused the stream: {} {detail}", reason.as_str_name())]
    Refused {
        /// Why.
        reason: EndReason,
        /// Detail from the exit.
        detail: String,
    },
}

/// The origin: circuits for client streams.
pub struct Origin {
    switch: Arc<Switch>,
    rng: Mutex<StdRng>,
    pool: tokio::sync::Mutex<Vec<Arc<OriginCircuit>>>,
    /// Builds in progress, one lock per route key (dropped once no open
    /// holds it).
    building: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    next_id: AtomicU64,
    /// Migrations planned: circuit → (start, done by). Kept once planned so
    /// the spread holds; replaced when the deadline moves.
    scheduled: Mutex<HashMap<u64, (Time, Time)>>,
    /// Counters for status.
    pub stats: OriginStats,
    /// The routing policy and tenants in force (the config's, until a
    /// reload replaces them).
    policy: std::sync::RwLock<Arc<crate::routing::Policy>>,
    /// The entry's fair limits.
    limits: crate::limits::Limits,
    /// Lost circuits' streams, to move ([`Origin::run_rescues`]).
    rescues: mpsc::UnboundedSender<Rescue>,
    rescues_rx: Mutex<Option<mpsc::UnboundedReceiver<Rescue>>>,
    /// Client refusals: one INFO line a second per reason, with a count.
    pub(crate) refusals_logged: crate::log_limit::LogLimit,
    /// Warnings a client or the mesh can repeat (bad handshakes, failed
    /// builds): one a minute per reason, with a count.
    pub(crate) warned: crate::log_limit::LogLimit,
}

/// What the origin has done about drains.
#[derive(Debug, Default)]
pub struct OriginStats {
    /// Migrations started.
    pub migrations_started: AtomicU64,
    /// Migrations finished (every stream moved).
    pub migrations_done: AtomicU64,
    /// Migration attempts that failed (retried).
    pub migrations_failed: AtomicU64,
    /// Circuits closed because their exit left.
    pub exit_closed: AtomicU64,
    /// Streams moved.
    pub streams_moved: AtomicU64,
    /// Streams of lost circuits moved to a new circuit to their exit.
    pub streams_rescued: AtomicU64,
    /// Streams of lost circuits that no new circuit took back in time.
    pub streams_lost: AtomicU64,
}

/// Tries per stream open when a hop turns out to be leaving.
const BUILD_TRIES: usize = 3;

impl Origin {
    /// An origin over this node's switch.
    pub fn new(switch: Arc<Switch>) -> Arc<Self> {
        let switch_policy = switch.cfg.routing.clone();
        let limits = crate::limits::Limits::new(switch.cfg.limits.clone());
        let (rescues, rescues_rx) = mpsc::unbounded_channel();
        Arc::new(Self {
            rescues,
            rescues_rx: Mutex::new(Some(rescues_rx)),
            switch,
            rng: Mutex::new(StdRng::from_entropy()),
            pool: tokio::sync::Mutex::new(Vec::new()),
            building: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            scheduled: Mutex::new(HashMap::new()),
            stats: OriginStats::default(),
            limits,
            policy: std::sync::RwLock::new(Arc::new(switch_policy.clone())),
            refusals_logged: crate::log_limit::LogLimit::new(1_000),
            warned: crate::log_limit::LogLimit::per_minute(),
        })
    }

    /// The routing policy and tenants in force.
    pub fn policy(&self) -> Arc<crate::routing::Policy> {
        self.policy.read().expect("policy lock").clone()
    }

    /// The entry's fair limits.
    pub fn limits(&self) -> &crate::limits::Limits {
        &self.limits
    }

    /// Replaces the routing policy and tenants (a reload); connections
    /// already open keep the routes they were given.
    pub fn set_policy(&self, policy: crate::routing::Policy) {
        *self.policy.write().expect("policy lock") = Arc::new(policy);
    }

    /// The circuits, for status.
    pub async fn circuits(&self) -> Vec<Arc<OriginCircuit>> {
        let pool = self.pool.lock().await;
        pool.iter()
            .filter(|c| c.endpoint().is_some())
            .cloned()
            .collect()
    }

    /// The switch under it.
    pub fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    /// Opens a stream to `host:port` through the mesh along `route`;
    /// returns it connected.
    pub async fn open_stream(
        &self,
        host: &str,
        port: u16,
        route: &Arc<Route>,
    ) -> Result<StreamParts, OpenError> {
        // No circuit before the rulings in force are known: routing
        // without them could cross a blocked jurisdiction.
        if !self.switch.cfg.bootstrap.is_empty()
            && !self.switch.rulings.wait_synced(JOIN_WAIT).await
        {
            return Err(OpenError::NotReady(format!(
                "joining: no peer has sent the rulings in force within {}s",
                JOIN_WAIT.as_secs()
            )));
        }
        // The stream is registered on its circuit while the pool is held,
        // so the drain planner (which closes idle circuits under the same
        // lock) never closes a circuit a stream is joining.
        let mut parts = {
            let ((end, oc), _pool) = self.circuit(route).await?;
            let parts = end
                .begin(host, port)
                .await
                .map_err(|e| OpenError::Build(e.to_string()))?;
            let now = crate::authority::now_ms();
            parts.handle.set_trail(crate::audit::Trail {
                tenant: route.scope.tenant.clone(),
                class: route.scope.class.clone(),
                target: self
                    .switch
                    .audit
                    .records_targets()
                    .then(|| format!("{host}:{port}")),
                started_ms: now,
                legs: vec![self.leg(&oc.path, Arc::from("opened"), now)],
                legs_left_out: 0,
            });
            parts
        };
        match tokio::time::timeout(OPEN_TIMEOUT, parts.inbound.recv()).await {
            Ok(Some(Inbound::Connected)) => Ok(parts),
            // The exit refused: the stream is already gone from its circuit.
            Ok(Some(Inbound::Reset(reason, detail))) => Err(OpenError::Refused { reason, detail }),
            Ok(Some(Inbound::Data(_) | Inbound::Finished) | None) => {
                parts
                    .handle
                    .abandon(EndReason::Protocol, "stream closed before it connected")
                    .await;
                Err(OpenError::Build("stream closed before it connected".into()))
            }
            Err(_) => {
                parts
                    .handle
                    .abandon(EndReason::Timeout, "origin gave up waiting")
                    .await;
                Err(OpenError::Refused {
                    reason: EndReason::Timeout,
                    detail: format!("the exit did not answer within {}s", OPEN_TIMEOUT.as_secs()),
                })
            }
        }
    }

    /// A circuit a stream was put on at `now`, for its trail: this entry
    /// first (the stream crosses its jurisdiction too), then each hop with
    /// its jurisdiction as this node knows it (formatted later, by the
    /// trail's writer).
    fn leg(&self, path: &[NodeId], why: Arc<str>, now: u64) -> crate::audit::RawLeg {
        let me = (
            self.switch.keys.node_id(),
            Some(self.switch.cfg.jurisdiction),
        );
        crate::audit::RawLeg {
            at_ms: now,
            why,
            hops: std::iter::once(me)
                .chain(
                    path.iter()
                        .map(|id| (*id, self.switch.directory.jurisdiction(id, now))),
                )
                .collect(),
        }
    }

    /// Whether every node on `path` may carry `route`'s traffic now (the
    /// router's rule, over this node's view of each).
    fn usable(&self, set: &RulingSet, path: &[NodeId], route: &Route, now: u64) -> bool {
        path.iter().all(|id| {
            let info = self.switch.directory.get(id, now).map(|e| e.info());
            ferry_router::may_carry(info.as_ref(), set, &route.scope, Time(now))
        })
    }

    /// A circuit in the pool with room for one more stream on `route`, and
    /// the pool, still held.
    async fn pooled(&self, route: &Route) -> (Option<Chosen>, Pool<'_>) {
        let mut pool = self.pool.lock().await;
        pool.retain(|c| c.endpoint().is_some());
        let max = self.switch.cfg.max_streams_per_circuit as usize;
        let now = crate::authority::now_ms();
        let set = self.switch.rulings.snapshot();
        let chosen = pool
            .iter()
            .filter(|c| {
                c.route.key == route.key
                    && !c.closing.load(Ordering::Acquire)
                    && self.usable(&set, &c.path, route, now)
            })
            .find_map(|c| {
                c.endpoint()
                    .filter(|e| e.stream_count() < max)
                    .map(|e| (e, c.clone()))
            });
        (chosen, pool)
    }

    /// A circuit with room for one more stream on `route`, built if needed,
    /// and the pool, still held. Builds run without the pool held (one
    /// hanging build must not stop streams on other routes), one at a time
    /// per route (a burst of streams on a new route shares one circuit).
    async fn circuit(&self, route: &Arc<Route>) -> Result<(Chosen, Pool<'_>), OpenError> {
        if let (Some(chosen), pool) = self.pooled(route).await {
            return Ok((chosen, pool));
        }
        let lock = self
            .building
            .lock()
            .expect("building lock")
            .entry(route.key.clone())
            .or_default()
            .clone();
        let built = self.build_for(route, &lock).await;
        let mut building = self.building.lock().expect("building lock");
        if Arc::strong_count(&lock) == 2 {
            building.remove(&route.key);
        }
        drop(building);
        built
    }

    async fn build_for(
        &self,
        route: &Arc<Route>,
        lock: &tokio::sync::Mutex<()>,
    ) -> Result<(Chosen, Pool<'_>), OpenError> {
        let _turn = lock.lock().await;
        // Another open on this route may have built one meanwhile.
        if let (Some(chosen), pool) = self.pooled(route).await {
            return Ok((chosen, pool));
        }
        let mut last = None;
        for _ in 0..BUILD_TRIES {
            match self.build(route, None, &[]).await {
                Ok(oc) => {
                    let end = oc
                        .endpoint()
                        .ok_or_else(|| OpenError::Build("circuit closed".into()))?;
                    let mut pool = self.pool.lock().await;
                    pool.push(oc.clone());
                    return Ok(((end, oc), pool));
                }
                // A hop refused because it is leaving: it is now known
                // here, so the next pick avoids it.
                Err(Failed { err, leaving: true }) => last = Some(err),
                Err(Failed { err, .. }) => return Err(err),
            }
        }
        Err(last.unwrap_or_else(|| OpenError::Build("no circuit".into())))
    }

    /// The router's index of usable paths for `route` at `now`.
    fn path_index(&self, route: &Route, now: u64) -> PathIndex {
        PathIndex::build(
            &self.switch.view(now),
            &self.switch.rulings.snapshot(),
            &route.scope,
            Time(now),
        )
    }

    /// Picks `n` paths for the default route (no tenant, no connection
    /// options) exactly as circuit builds do, without building them: how
    /// new circuits would spread over the mesh now. Returns how many paths
    /// each node was on, and how many picks failed.
    pub fn sample_paths(&self, n: usize) -> (std::collections::BTreeMap<NodeId, usize>, usize) {
        let mut counts = std::collections::BTreeMap::new();
        let Ok(route) = self
            .policy()
            .route("", &crate::routing::ConnOptions::default())
        else {
            return (counts, n);
        };
        let now = crate::authority::now_ms();
        let index = self.path_index(&route, now);
        let req = PathRequest {
            origin: Some(self.switch.keys.node_id()),
            exit: None,
            avoid: Vec::new(),
        };
        let mut failed = 0;
        let mut rng = self.rng.lock().expect("rng lock");
        for _ in 0..n {
            match index.pick(&route.constraints, &req, &mut *rng) {
                Ok(p) => {
                    for id in p.as_slice() {
                        *counts.entry(*id).or_default() += 1;
                    }
                }
                Err(_) => failed += 1,
            }
        }
        (counts, failed)
    }

    /// Builds a new circuit for `route`, ending at `exit` if given, around
    /// `avoid`.
    async fn build(
        &self,
        route: &Arc<Route>,
        exit: Option<NodeId>,
        avoid: &[NodeId],
    ) -> Result<Arc<OriginCircuit>, Failed> {
        let req = PathRequest {
            origin: Some(self.switch.keys.node_id()),
            exit,
            avoid: avoid.to_vec(),
        };
        let now = crate::authority::now_ms();
        let index = self.path_index(route, now);
        let path = {
            let mut rng = self.rng.lock().expect("rng lock");
            index
                .pick(&route.constraints, &req, &mut *rng)
                .map_err(|e| Failed::from(OpenError::NoPath(e)))?
                .as_slice()
                .to_vec()
        };
        let first = path[0];
        let link = self
            .switch
            .link_to(first)
            .await
            .map_err(|e| Failed::from(OpenError::Build(format!("{e:#}"))))?;
        let circ = link.alloc_circ_id();
        let (tx, rx) = mpsc::channel(BUILD_EVENTS);
        let oc = Arc::new(OriginCircuit {
            rescue: self.rescues.clone(),
            link: link.clone(),
            circ,
            state: Mutex::new(State::Building(tx)),
            path: path.clone(),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            route: route.clone(),
            closing: AtomicBool::new(false),
            migrating: AtomicBool::new(false),
            at_risk: AtomicBool::new(false),
            built_at_ms: now,
        });
        self.switch.add_origin(&link, circ, oc.clone());
        let timeout = self.switch.cfg.build_timeout;
        let started = std::time::Instant::now();
        let span = tracing::info_span!("circuit", circ);
        let built = tokio::time::timeout(timeout, self.handshake_path(&link, circ, &path, rx))
            .instrument(span.clone())
            .await;
        let _span = span.enter();
        match built {
            Ok(Ok(session)) => {
                let end = Endpoint::new(
                    link.clone(),
                    circ,
                    session,
                    Side::Origin,
                    Endpoint::config(
                        self.switch.cfg.stream_window,
                        crate::endpoint::ORIGIN_MAX_STREAMS,
                        self.switch.cfg.congestion_control,
                    ),
                    None,
                    self.switch.tasks.clone(),
                );
                let mut st = oc.state.lock().expect("state lock");
                if matches!(*st, State::Closed) {
                    return Err(OpenError::Build("circuit destroyed while building".into()).into());
                }
                *st = State::Open(end);
                drop(st);
                let m = &self.switch.metrics;
                m.circuit
                    .build_seconds
                    .observe(started.elapsed().as_secs_f64());
                m.circuit.opened.inc();
                info!(path = %oc.jurisdictions(&self.switch).join(" -> "), "circuit built");
                Ok(oc)
            }
            Ok(Err(e)) => {
                self.switch.destroy(&link, circ, DestroyReason::BuildFailed);
                Err(e)
            }
            Err(_) => {
                self.switch.destroy(&link, circ, DestroyReason::BuildFailed);
                Err(OpenError::Build(format!("no answer within {}s", timeout.as_secs())).into())
            }
        }
    }

    /// Notes that `node` refused to carry a new circuit because it is
    /// leaving: path selection avoids it until its advert says otherwise.
    fn learn_leaving(&self, node: NodeId) {
        let now = crate::authority::now_ms();
        let until = now + self.switch.cfg.drain.grace.as_millis() as u64;
        self.switch.directory.learn(
            node,
            NodeState::Draining { until: Time(until) },
            until + 60_000,
            now,
        );
        info!(node = %node.short(), "hop is leaving; building around it");
    }

    /// Runs the telescoping build (`ferry_circuit::Build`) over `link`:
    /// sends what the step machine says, feeds it the answers the switch
    /// hands over, until the end-to-end session with the exit.
    async fn handshake_path(
        &self,
        link: &LinkHandle,
        circ: u32,
        path: &[NodeId],
        mut rx: mpsc::Receiver<BuildEvent>,
    ) -> Result<Session, Failed> {
        let hops = path
            .iter()
            .map(|id| {
                self.switch
                    .peer(id)
                    .map(|p| Hop {
                        node: *id,
                        noise_key: p.noise_key,
                    })
                    .ok_or_else(|| Failed::from(OpenError::Build(format!("unknown node {id}"))))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let deadline = crate::authority::now_ms()
            .saturating_add(self.switch.cfg.build_timeout.as_millis() as u64);
        let (mut build, create) = Build::start(circ, hops, deadline).map_err(|e| self.failed(e))?;
        let closed = || Failed::from(OpenError::Build("link closed".into()));
        link.send(create).await.map_err(|_| closed())?;
        loop {
            let step = match rx.recv().await {
                Some(BuildEvent::Created(b)) => build.handle_created(&b),
                Some(BuildEvent::Control(b)) => build.handle_control(b),
                Some(BuildEvent::Destroyed(r)) => Err(build.handle_destroy(r)),
                None => Err(CircuitError::Closed),
            };
            match step.map_err(|e| self.failed(e))? {
                Step::Send(cell) => {
                    debug!(circ, "extending");
                    link.send(cell).await.map_err(|_| closed())?;
                }
                Step::Done(session) => return Ok(*session),
            }
        }
    }

    /// A build failure; a hop that refused because it is leaving is learnt,
    /// so the next pick avoids it.
    fn failed(&self, e: CircuitError) -> Failed {
        let leaving = e.hop_leaving();
        if let Some(hop) = leaving {
            self.learn_leaving(hop);
        } else {
            crate::warn_limited!(self.warned, "circuit build failed", error = %e, kind = e.kind(), "circuit build failed");
        }
        Failed {
            err: OpenError::Build(e.to_string()),
            leaving: leaving.is_some(),
        }
    }

    /// Moves the streams of circuits lost without warning, until
    /// `shutdown`: for each lost circuit, a new circuit to the same exit
    /// (avoiding the lost circuit's relays at first, as one of them is
    /// likely dead; then any), and each stream resumed on it as a planned
    /// move is (the exit parked it, and both ends send again what the
    /// other lacks: no byte lost, none twice). Tried with backoff for
    /// [`RESCUE_WINDOW`]; a stream no circuit took back by then ends.
    pub async fn run_rescues(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(mut rx) = self.rescues_rx.lock().expect("rescue lock").take() else {
            return;
        };
        loop {
            let r = tokio::select! {
                r = rx.recv() => r,
                _ = shutdown.cancelled() => None,
            };
            let Some(r) = r else { break };
            let me = self.clone();
            let span = tracing::info_span!("rescue");
            self.switch
                .tasks
                .spawn(async move { me.rescue(r).await }.instrument(span));
        }
        // Stopping: what is still waiting ends.
        rx.close();
        while let Ok(r) = rx.try_recv() {
            for (h, _) in r.orphans {
                h.end(
                    EndReason::CircuitClosed,
                    "circuit lost while the entry stops".into(),
                );
            }
        }
    }

    async fn rescue(self: Arc<Self>, r: Rescue) {
        let started = std::time::Instant::now();
        let exit = *r.path.last().expect("a path has an exit");
        let relays = r.path[..r.path.len() - 1].to_vec();
        let total = r.orphans.len();
        info!(
            streams = total,
            "circuit lost; moving its streams to a new circuit to the same exit"
        );
        let mut left = r.orphans;
        let mut delay = Duration::from_millis(100);
        let mut attempt = 0u32;
        while !left.is_empty() && started.elapsed() < RESCUE_WINDOW {
            if self.switch.shutdown.is_cancelled() {
                break;
            }
            attempt += 1;
            let avoid = if attempt <= 2 { relays.as_slice() } else { &[] };
            match self.build(&r.route, Some(exit), avoid).await {
                Ok(new) => {
                    if let Some(end) = new.endpoint() {
                        self.pool.lock().await.push(new.clone());
                        let mut failed = Vec::new();
                        for (h, s) in left.drain(..) {
                            match Endpoint::adopt(&h, &end, s).await {
                                Ok(()) => {
                                    self.stats.streams_rescued.fetch_add(1, Ordering::Relaxed);
                                    let now = crate::authority::now_ms();
                                    h.add_leg(self.leg(
                                        &new.path,
                                        "rescued: its circuit was lost".into(),
                                        now,
                                    ));
                                }
                                Err((_, Some(s))) => failed.push((h, *s)),
                                Err((e, None)) => {
                                    self.stats.streams_lost.fetch_add(1, Ordering::Relaxed);
                                    debug!(error = %e, "a lost circuit's stream could not be moved");
                                    h.end(
                                        EndReason::CircuitClosed,
                                        format!("circuit lost, and the exit did not take the stream back: {e}"),
                                    );
                                }
                            }
                        }
                        left = failed;
                    }
                }
                Err(f) => debug!(attempt, error = %f.err, "rescue: no circuit to the exit yet"),
            }
            if !left.is_empty() {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
        let lost = left.len();
        for (h, _) in left {
            self.stats.streams_lost.fetch_add(1, Ordering::Relaxed);
            h.end(
                EndReason::CircuitClosed,
                format!(
                    "circuit lost, and no new circuit to its exit took the stream back within {}s",
                    RESCUE_WINDOW.as_secs()
                ),
            );
        }
        if lost == 0 {
            info!(
                streams = total,
                attempt,
                took_ms = started.elapsed().as_millis() as u64,
                "a lost circuit's streams moved"
            );
        } else {
            crate::warn_limited!(
                self.warned,
                "lost streams",
                moved = total - lost,
                lost,
                "a lost circuit's streams could not all be moved"
            );
        }
    }

    /// Keeps quiet circuits alive and closes unused ones, until
    /// `shutdown`: every third of `[limits] idle_circuit_secs`, a circuit
    /// with streams sends a keepalive (so relays, which close circuits no
    /// cell crossed for that long, keep it while its streams are quiet,
    /// an SSH session or a mail client's IDLE); every whole period, a
    /// circuit with no stream and no cell from its exit since the last
    /// one leaves the pool and is destroyed.
    pub async fn run_idle(self: Arc<Self>, shutdown: CancellationToken) {
        // With no idle timeout here, unused circuits stay, but keepalives
        // still go (relays may have one): as often as the default wants.
        let configured = u64::from(self.switch.cfg.carry.idle_circuit_secs);
        let secs = if configured == 0 {
            u64::from(crate::limits::Carry::default().idle_circuit_secs)
        } else {
            configured
        };
        let mut tick = tokio::time::interval(Duration::from_secs(secs) / 3);
        tick.tick().await;
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            ticks += 1;
            let (busy, idle) = {
                let mut pool = self.pool.lock().await;
                let mut idle = Vec::new();
                if configured != 0 && ticks % 3 == 0 {
                    pool.retain(|c| {
                        let quiet = c.endpoint().is_some_and(|e| e.quiet());
                        let unused =
                            quiet && c.stream_count() == 0 && !c.migrating.load(Ordering::Acquire);
                        if unused {
                            c.closing.store(true, Ordering::Release);
                            idle.push(c.clone());
                        }
                        !unused
                    });
                }
                let busy: Vec<Arc<Endpoint>> = pool
                    .iter()
                    .filter(|c| c.stream_count() > 0)
                    .filter_map(|c| c.endpoint())
                    .collect();
                (busy, idle)
            };
            for c in &idle {
                debug!(circ = c.circ, "idle circuit closed");
                self.switch.destroy(&c.link, c.circ, DestroyReason::Idle);
            }
            for end in busy {
                let _ = end.keepalive().await;
            }
        }
    }

    /// Closes every circuit.
    pub async fn close_all(&self) {
        for c in self.pool.lock().await.drain(..) {
            self.switch
                .destroy(&c.link, c.circ, DestroyReason::Finished);
        }
    }

    /// Streams this origin carries.
    pub async fn stream_count(&self) -> usize {
        self.pool
            .lock()
            .await
            .iter()
            .map(|c| c.stream_count())
            .sum()
    }

    /// Streams open now that cross `region` (this entry's own jurisdiction
    /// included) for `r`'s scope.
    pub async fn crossing(
        &self,
        r: &ferry_router::Ruling,
        region: &ferry_router::JurisdictionSet,
        now: u64,
    ) -> usize {
        self.crossing_in(&self.circuits().await, r, region, now)
    }

    fn crossing_in(
        &self,
        circuits: &[Arc<OriginCircuit>],
        r: &ferry_router::Ruling,
        region: &ferry_router::JurisdictionSet,
        now: u64,
    ) -> usize {
        let here = region.contains(self.switch.cfg.jurisdiction);
        circuits
            .iter()
            .filter(|c| {
                r.scope.covers(&c.route.scope)
                    && (here
                        || c.path.iter().any(|id| {
                            self.switch
                                .directory
                                .jurisdiction(id, now)
                                .is_some_and(|j| region.contains(j))
                        }))
            })
            .map(|c| c.stream_count())
            .sum()
    }

    /// Fills the entry's circuit and stream metrics (at scrape time, after
    /// [`Switch::observe`], whose `blocked` gauge it adds to).
    pub async fn observe(&self, m: &crate::metrics::Metrics, now: u64) {
        use crate::metrics::advance;
        let circuits = self.circuits().await;
        m.circuit.origin_active.set(circuits.len() as i64);
        m.stream
            .active
            .set(circuits.iter().map(|c| c.stream_count()).sum::<usize>() as i64);
        for c in &circuits {
            for j in c.jurisdictions(&self.switch) {
                if let Some(st) = self.switch.leaving(&j, now) {
                    m.circuit.blocked.with_label_values(&[&j, st]).inc();
                }
            }
        }
        // Sessions crossing each ruled region, by the ruling's phase.
        m.stream.ruled.reset();
        let set = self.switch.rulings.snapshot();
        for r in set.iter().filter(|r| !r.lifted) {
            let Some(region) = set.region_of(&r.id) else {
                continue;
            };
            let phase = match r.status_at(Time(now)) {
                ferry_router::Status::Allowed => "before",
                ferry_router::Status::Draining { .. } => "draining",
                ferry_router::Status::Blocked => "after_exit",
            };
            let crossing = self.crossing_in(&circuits, r, region, now);
            m.stream
                .ruled
                .with_label_values(&[&r.region.to_string(), phase])
                .add(crossing as i64);
        }
        advance(&m.stream.audit_dropped, self.switch.audit.dropped());
        let s = &self.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (result, v) in [
            ("started", get(&s.migrations_started)),
            ("succeeded", get(&s.migrations_done)),
            ("failed", get(&s.migrations_failed)),
        ] {
            advance(&m.circuit.migrations.with_label_values(&[result]), v);
        }
        advance(&m.circuit.streams_moved, get(&s.streams_moved));
        for (result, v) in [
            ("moved", get(&s.streams_rescued)),
            ("lost", get(&s.streams_lost)),
        ] {
            advance(&m.circuit.rescued.with_label_values(&[result]), v);
        }
        let paced = self.limits.paced_seconds() - m.stream.paced.get();
        if paced > 0.0 {
            m.stream.paced.inc_by(paced);
        }
        for (listener, n) in self.limits.connections() {
            m.stream
                .connections
                .with_label_values(&[listener])
                .set(n.into());
        }
        advance(&m.circuit.exit_closed, get(&s.exit_closed));
    }

    /// Plans and carries out drains until `shutdown`.
    pub async fn run_drains(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            self.drain_tick().await;
        }
    }

    /// The circuits as the drain planner sees them.
    fn live(&self, circuits: &[Arc<OriginCircuit>]) -> Vec<LiveCircuit> {
        let me = self.switch.keys.node_id();
        circuits
            .iter()
            .map(|c| LiveCircuit {
                id: c.id,
                path: c.path.clone(),
                scope: c.route.scope.clone(),
                owner: me,
                rate_bps: 0,
            })
            .collect()
    }

    /// The drain planner's settings (`[drain]`), seeded by this node's id.
    fn drain_config(&self) -> DrainConfig {
        let d = &self.switch.cfg.drain;
        let me = self.switch.keys.node_id();
        DrainConfig {
            margin_ms: d.margin.as_millis() as u64,
            migration_ms: d.migration.as_millis() as u64,
            seed: u64::from_be_bytes(me.0[..8].try_into().expect("8 bytes")),
        }
    }

    /// What the ruling `r` would do, were it in force now: against this
    /// node's view of the mesh and the rulings in force, and this entry's
    /// own circuits (the ones it knows the tenants of), planned exactly
    /// as its drains are. The circuits are returned beside the impact,
    /// by id.
    pub async fn what_if(
        &self,
        r: &ferry_router::Ruling,
        now: u64,
    ) -> Result<(ferry_router::Impact, Vec<Arc<OriginCircuit>>), ferry_router::RouterError> {
        let circuits = self.circuits().await;
        let impact = ferry_router::what_if(
            &self.switch.view(now),
            &self.switch.rulings.snapshot(),
            r,
            &ferry_router::Blocs::builtin(),
            Time(now),
            &self.live(&circuits),
            &self.drain_config(),
        )?;
        Ok((impact, circuits))
    }

    async fn drain_tick(self: &Arc<Self>) {
        let now = crate::authority::now_ms();
        // A stream open holds the pool while it builds; plan at the next
        // tick rather than wait behind it.
        let circuits: Vec<Arc<OriginCircuit>> = {
            let Ok(mut pool) = self.pool.try_lock() else {
                return;
            };
            pool.retain(|c| c.endpoint().is_some());
            pool.clone()
        };
        if circuits.is_empty() {
            return;
        }
        let live = self.live(&circuits);
        let cfg = self.drain_config();
        let plan = ferry_router::plan_drain(
            &self.switch.view(now),
            &self.switch.rulings.snapshot(),
            Time(now),
            &live,
            &cfg,
        );
        let by_id: HashMap<u64, &Arc<OriginCircuit>> = circuits.iter().map(|c| (c.id, c)).collect();
        for id in &plan.at_risk {
            if let Some(c) = by_id.get(id)
                && !c.at_risk.swap(true, Ordering::AcqRel)
            {
                warn!(
                    circ = c.circ,
                    path = %c.jurisdictions(&self.switch).join(" -> "),
                    "circuit cannot be moved by its deadline minus the margin; moving it now"
                );
            }
        }
        let mut planned = std::collections::HashSet::new();
        // Circuits through a leaving node that carry no stream: nothing to
        // move or wait for, so they close now and the node empties sooner.
        let mut idle: Vec<Arc<OriginCircuit>> = Vec::new();
        for action in plan.actions {
            match action {
                Action::Migrate {
                    circuit,
                    at,
                    done_by,
                    avoid,
                    ..
                } => {
                    let Some(c) = by_id.get(&circuit) else {
                        continue;
                    };
                    planned.insert(circuit);
                    c.closing.store(true, Ordering::Release);
                    if c.stream_count() == 0 && !c.migrating.load(Ordering::Acquire) {
                        idle.push((*c).clone());
                        continue;
                    }
                    let start = {
                        let mut s = self.scheduled.lock().expect("schedule lock");
                        let e = s.entry(circuit).or_insert((at, done_by));
                        if e.1 != done_by {
                            // The deadline moved (an amended ruling): re-plan.
                            *e = (at, done_by);
                        }
                        e.0
                    };
                    if start.0 <= now && !c.migrating.swap(true, Ordering::AcqRel) {
                        let me = self.clone();
                        let c = (*c).clone();
                        let span = tracing::info_span!("circuit", circ = c.circ);
                        self.switch.tasks.spawn(
                            async move { me.migrate(c, done_by, avoid).await }.instrument(span),
                        );
                    }
                }
                Action::CloseExitStreams { circuit, at, .. } => {
                    let Some(c) = by_id.get(&circuit) else {
                        continue;
                    };
                    planned.insert(circuit);
                    c.closing.store(true, Ordering::Release);
                    if c.stream_count() == 0 {
                        idle.push((*c).clone());
                    } else if at.0 <= now {
                        info!(
                            circ = c.circ,
                            path = %c.jurisdictions(&self.switch).join(" -> "),
                            streams = c.stream_count(),
                            "closing circuit: its exit is leaving the mesh and its streams cannot move"
                        );
                        self.stats.exit_closed.fetch_add(1, Ordering::Relaxed);
                        self.switch.destroy(&c.link, c.circ, DestroyReason::Exited);
                    }
                }
                _ => {}
            }
        }
        if !idle.is_empty()
            && let Ok(_pool) = self.pool.try_lock()
        {
            for c in idle.iter().filter(|c| c.stream_count() == 0) {
                debug!(circ = c.circ, "idle circuit through a leaving node closed");
                self.switch
                    .destroy(&c.link, c.circ, DestroyReason::Finished);
            }
        }
        // Lifted rulings and cancelled drains: the circuit may serve again.
        for c in &circuits {
            if !planned.contains(&c.id) && !c.migrating.load(Ordering::Acquire) {
                c.closing.store(false, Ordering::Release);
                self.scheduled.lock().expect("schedule lock").remove(&c.id);
            }
        }
    }

    /// Moves `old`'s streams onto a new circuit to the same exit around
    /// `avoid`, retrying with backoff while the old circuit lives.
    async fn migrate(self: Arc<Self>, old: Arc<OriginCircuit>, done_by: Time, avoid: Vec<NodeId>) {
        self.stats
            .migrations_started
            .fetch_add(1, Ordering::Relaxed);
        let mut delay = Duration::from_millis(200);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.try_migrate(&old, &avoid).await {
                Ok(moved) => {
                    self.stats.migrations_done.fetch_add(1, Ordering::Relaxed);
                    let late = crate::authority::now_ms() > done_by.0;
                    info!(
                        circ = old.circ,
                        streams = moved,
                        attempt,
                        late,
                        "circuit moved off a leaving node"
                    );
                    break;
                }
                Err(e) => {
                    self.stats.migrations_failed.fetch_add(1, Ordering::Relaxed);
                    if old.endpoint().is_none() {
                        crate::warn_limited!(self.warned, ("migration failed", "gone"), circ = old.circ, error = %e, "migration failed and the circuit is gone");
                        break;
                    }
                    crate::warn_limited!(self.warned, ("migration failed", "retrying"), circ = old.circ, attempt, error = %e, retry_in_ms = delay.as_millis() as u64, "migration failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        self.scheduled
            .lock()
            .expect("schedule lock")
            .remove(&old.id);
        old.migrating.store(false, Ordering::Release);
    }

    async fn try_migrate(
        &self,
        old: &Arc<OriginCircuit>,
        avoid: &[NodeId],
    ) -> Result<usize, String> {
        let Some(old_end) = old.endpoint() else {
            return Err("circuit closed".into());
        };
        let streams = old_end.streams();
        if streams.is_empty() {
            // Nothing to move: close it; the next stream builds afresh.
            self.switch
                .destroy(&old.link, old.circ, DestroyReason::Finished);
            return Ok(0);
        }
        let exit = *old.path.last().expect("a path has an exit");
        let started = std::time::Instant::now();
        let new = self
            .build(&old.route, Some(exit), avoid)
            .await
            .map_err(|f| f.err.to_string())?;
        let new_end = new.endpoint().ok_or("new circuit closed")?;
        self.pool.lock().await.push(new.clone());
        let mut failed = None;
        let mut moved = 0;
        let why: Arc<str> = match avoid {
            [] => Arc::from("moved"),
            _ => format!(
                "moved: off leaving {}",
                avoid
                    .iter()
                    .map(|id| {
                        self.switch.peer(id).map_or_else(
                            || id.short(),
                            |p| format!("{} ({})", id.short(), p.jurisdiction),
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            )
            .into(),
        };
        for s in streams {
            match Endpoint::move_stream(&s, &new_end).await {
                Ok(()) => {
                    moved += 1;
                    s.add_leg(self.leg(&new.path, why.clone(), crate::authority::now_ms()));
                }
                // Ended at the exit already: nothing left to move.
                Err(CircuitError::UnknownStream) => {
                    crate::warn_limited!(
                        self.warned,
                        "stream unknown at exit",
                        "a stream the exit no longer had was ended instead of moved"
                    );
                }
                Err(e) => failed = Some(e.to_string()),
            }
        }
        self.stats
            .streams_moved
            .fetch_add(moved as u64, Ordering::Relaxed);
        if let Some(e) = failed {
            return Err(format!("{moved} streams moved, one failed: {e}"));
        }
        info!(
            from = %old.jurisdictions(&self.switch).join(" -> "),
            to = %new.jurisdictions(&self.switch).join(" -> "),
            streams = moved,
            took_ms = started.elapsed().as_millis() as u64,
            "streams moved to a new circuit"
        );
        self.switch
            .destroy(&old.link, old.circ, DestroyReason::Finished);
        Ok(moved)
    }
}

/// A failed build, and whether a hop refused because it is leaving.
pub(crate) struct Failed {
    err: OpenError,
    leaving: bool,
}

impl From<OpenError> for Failed {
    fn from(err: OpenError) -> Self {
        Self {
            err,
            leaving: false,
        }
    }
}
