//! The switch: links by peer, the circuit table, and what each cell does.
//!
//! A circuit is known on a node by `(link, circ_id)` for each side it has.
//! A relay maps each side to the other and forwards cells with nothing more
//! than a circuit-id rewrite. The hop at a circuit's *tip* (the last hop built
//! so far) holds a Noise session with the origin and reads CONTROL cells: an
//! EXTEND makes it dial the next hop, after which it only forwards. When the
//! circuit is complete the tip is the exit, and its session with the origin is
//! the end-to-end session that carries the streams.

use crate::authority::now_ms;
use crate::config::{NodeConfig, Peer};
use crate::crypto;
use crate::directory::Directory;
use crate::endpoint::{Endpoint, ExitCtx, Side};
use crate::identity::Keys;
use crate::link::{self, LinkHandle, LinkId, cell};
use crate::origin::OriginCircuit;
use anyhow::Result;
use bytes::BytesMut;
use ferry_proto::pb::{self, DestroyReason, RefusalReason};
use ferry_proto::{Cell, CellCmd, cell as cellfmt};
use ferry_router::NodeId;
use prost::Message;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

/// What one side of a circuit is on this node.
enum Slot {
    /// Forward everything to the other side.
    Forward { link: Arc<LinkHandle>, circ: u32 },
    /// We sent CREATE on this side and wait for CREATED.
    Pending(oneshot::Sender<Result<BytesMut, DestroyReason>>),
    /// We are the circuit's tip: we hold a session with its origin.
    Tip(Arc<Endpoint>),
    /// We are the circuit's origin.
    Origin(Arc<OriginCircuit>),
}

/// The node's switching core.
pub struct Switch {
    /// The node's keys.
    pub keys: Arc<Keys>,
    /// The node's config.
    pub cfg: Arc<NodeConfig>,
    /// Cancelled when the node shuts down.
    pub shutdown: CancellationToken,
    /// Known nodes: static peers and advertised ones.
    pub directory: Arc<Directory>,
    /// Rulings in force.
    pub rulings: Arc<crate::rulings::Rulings>,
    /// This node's own state (active, draining, exited).
    pub state: Arc<crate::state::NodeStateCtl>,
    links: Mutex<HashMap<NodeId, Arc<LinkHandle>>>,
    /// Every live link by id (a second link to one peer replaces the first
    /// in `links`, but both run until closed): what revocation closes.
    all_links: Mutex<HashMap<LinkId, Arc<LinkHandle>>>,
    dial_lock: tokio::sync::Mutex<()>,
    circuits: Mutex<HashMap<(LinkId, u32), Slot>>,
    next_link: AtomicU64,
    exit: Option<Arc<ExitCtx>>,
    /// Bytes written to all links (for the advertised load).
    pub(crate) bytes_out: Arc<AtomicU64>,
    /// The node's metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// This node's certificate (`None`: it has no `node.cert`).
    pub certificate: Option<crate::cert::OwnCert>,
}

/// A cell broke the link protocol: the link is closed with this reason.
#[derive(Debug, thiserror::Error)]
#[error("malformed cell: {0}")]
pub struct Malformed(#[from] ferry_proto::DecodeError);

/// What `/readyz` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    /// Takes new circuits.
    pub ready: bool,
    /// `unadmitted`, `joining`, `active`, `draining` or `exited`.
    pub state: &'static str,
    /// Why not ready (empty when ready).
    pub reason: String,
}

impl Switch {
    /// A switch for this node.
    pub fn new(
        keys: Arc<Keys>,
        cfg: Arc<NodeConfig>,
        directory: Arc<Directory>,
        rulings: Arc<crate::rulings::Rulings>,
        state: Arc<crate::state::NodeStateCtl>,
        certificate: Option<crate::cert::OwnCert>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let exit = cfg.roles.exit.then(|| {
            Arc::new(ExitCtx {
                policy: cfg.exit_policy.clone(),
                connect_timeout: cfg.connect_timeout,
                window: cfg.stream_window,
                resumables: Default::default(),
                metrics: metrics.clone(),
            })
        });
        Arc::new(Self {
            keys,
            cfg,
            shutdown,
            directory,
            rulings,
            state,
            links: Mutex::new(HashMap::new()),
            all_links: Mutex::new(HashMap::new()),
            dial_lock: tokio::sync::Mutex::new(()),
            circuits: Mutex::new(HashMap::new()),
            next_link: AtomicU64::new(1),
            exit,
            bytes_out: Arc::new(AtomicU64::new(0)),
            metrics,
            certificate,
        })
    }

    /// A live known node.
    pub fn peer(&self, id: &NodeId) -> Option<Peer> {
        self.directory.get(id, now_ms()).map(|e| e.peer)
    }

    /// Whether the live, admitted node `id` holds the Noise key `key`
    /// (by config, or by its advert: current or retiring).
    pub fn binds(&self, id: &NodeId, key: &[u8; 32]) -> bool {
        self.directory.binds(id, key, now_ms())
    }

    /// Bytes written to links since start.
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.load(Ordering::Relaxed)
    }

    pub(crate) fn next_link_id(&self) -> LinkId {
        self.next_link.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn link_up(&self, link: Arc<LinkHandle>) {
        self.all_links
            .lock()
            .expect("links lock")
            .insert(link.id, link.clone());
        self.links
            .lock()
            .expect("links lock")
            .insert(link.peer, link);
    }

    /// The link to `peer`, dialing it if there is none.
    pub async fn link_to(self: &Arc<Self>, peer: NodeId) -> Result<Arc<LinkHandle>> {
        if let Some(l) = self.live_link(&peer) {
            return Ok(l);
        }
        let _guard = self.dial_lock.lock().await;
        if let Some(l) = self.live_link(&peer) {
            return Ok(l);
        }
        link::dial(self, peer).await
    }

    fn live_link(&self, peer: &NodeId) -> Option<Arc<LinkHandle>> {
        self.links
            .lock()
            .expect("links lock")
            .get(peer)
            .filter(|l| !l.is_closed())
            .cloned()
    }

    /// Registers a circuit this node originates.
    pub(crate) fn add_origin(&self, link: &LinkHandle, circ: u32, oc: Arc<OriginCircuit>) {
        self.circuits
            .lock()
            .expect("circuits lock")
            .insert((link.id, circ), Slot::Origin(oc));
    }

    /// Forgets one side of a circuit (no cells sent).
    pub(crate) fn remove(&self, link: LinkId, circ: u32) {
        self.circuits
            .lock()
            .expect("circuits lock")
            .remove(&(link, circ));
    }

    /// A link went down: every circuit on it is destroyed, and the other side
    /// of each forwarded circuit is told.
    pub(crate) fn link_down(&self, link: &Arc<LinkHandle>) {
        {
            let mut links = self.links.lock().expect("links lock");
            if links.get(&link.peer).is_some_and(|l| l.id == link.id) {
                links.remove(&link.peer);
            }
        }
        self.all_links.lock().expect("links lock").remove(&link.id);
        let gone: Vec<(u32, Slot)> = {
            let mut c = self.circuits.lock().expect("circuits lock");
            let keys: Vec<_> = c.keys().filter(|(l, _)| *l == link.id).copied().collect();
            keys.into_iter()
                .filter_map(|k| c.remove(&k).map(|s| (k.1, s)))
                .collect()
        };
        for (_, slot) in gone {
            self.drop_slot(slot, DestroyReason::LinkLost);
        }
    }

    /// Ends what a removed slot holds; tells the other side of a forward.
    fn drop_slot(&self, slot: Slot, reason: DestroyReason) {
        if !matches!(slot, Slot::Pending(_)) {
            self.metrics
                .circuits_closed
                .with_label_values(&[&crate::metrics::destroy_label(reason)])
                .inc();
        }
        match slot {
            Slot::Forward { link, circ } => {
                self.remove(link.id, circ);
                link.try_send(destroy_cell(circ, reason));
            }
            Slot::Pending(tx) => {
                let _ = tx.send(Err(reason));
            }
            Slot::Tip(end) => end.close(reason),
            Slot::Origin(oc) => oc.close(reason),
        }
    }

    /// Destroys a circuit from one side: forgets it and tells both neighbours.
    pub(crate) fn destroy(&self, link: &LinkHandle, circ: u32, reason: DestroyReason) {
        let slot = self
            .circuits
            .lock()
            .expect("circuits lock")
            .remove(&(link.id, circ));
        link.try_send(destroy_cell(circ, reason));
        if let Some(slot) = slot {
            self.drop_slot(slot, reason);
        }
    }

    /// Handles one cell that arrived on `link`. An error closes the link.
    pub async fn on_cell(
        self: &Arc<Self>,
        link: &Arc<LinkHandle>,
        mut buf: BytesMut,
    ) -> Result<(), Malformed> {
        let c = Cell::parse(&buf)?;
        let (circ, cmd) = (c.circ_id, c.cmd);
        let key = (link.id, circ);
        match cmd {
            CellCmd::Create => self.on_create(link, circ, c.body),
            CellCmd::Destroy => {
                let reason = pb::Destroy::decode(c.body)
                    .map(|d| d.reason())
                    .unwrap_or_default();
                debug!(circ, reason = reason.as_str_name(), "destroy received");
                let slot = self.circuits.lock().expect("circuits lock").remove(&key);
                if let Some(slot) = slot {
                    self.drop_slot(slot, reason);
                }
            }
            CellCmd::Created | CellCmd::Control | CellCmd::Relay | CellCmd::Notice => {
                enum Next {
                    Forward(Arc<LinkHandle>, u32),
                    Created(oneshot::Sender<Result<BytesMut, DestroyReason>>),
                    Tip(Arc<Endpoint>),
                    Origin(Arc<OriginCircuit>),
                    None,
                }
                let next = {
                    let mut c = self.circuits.lock().expect("circuits lock");
                    match c.get(&key) {
                        Some(Slot::Forward { link, circ }) if cmd != CellCmd::Created => {
                            Next::Forward(link.clone(), *circ)
                        }
                        Some(Slot::Pending(_)) if cmd == CellCmd::Created => match c.remove(&key) {
                            Some(Slot::Pending(tx)) => Next::Created(tx),
                            _ => Next::None,
                        },
                        Some(Slot::Tip(end)) if cmd != CellCmd::Created => Next::Tip(end.clone()),
                        Some(Slot::Origin(oc)) => Next::Origin(oc.clone()),
                        _ => Next::None,
                    }
                };
                match next {
                    Next::Forward(out, out_circ) => {
                        cellfmt::set_circ_id(&mut buf, out_circ);
                        if out.send(buf).await.is_err() {
                            self.destroy(link, circ, DestroyReason::LinkLost);
                        }
                    }
                    Next::Created(tx) => {
                        let mut body = buf;
                        let _ = body.split_to(cellfmt::HEADER_LEN);
                        let _ = tx.send(Ok(body));
                    }
                    Next::Tip(_) if cmd == CellCmd::Notice => {
                        // The origin owns the circuit; the exit needs no notice.
                    }
                    Next::Origin(oc) if cmd == CellCmd::Notice => self.on_notice(&buf, &oc.path),
                    Next::Tip(end) => {
                        let res = if cmd == CellCmd::Relay {
                            end.on_relay(buf)
                        } else {
                            end.on_control(buf).map(|extend| {
                                if let Some(ext) = extend {
                                    tokio::spawn(
                                        self.clone()
                                            .extend(link.clone(), circ, end.clone(), ext)
                                            .instrument(tracing::info_span!("circuit", circ)),
                                    );
                                }
                            })
                        };
                        if let Err(e) = res {
                            warn!(circ, error = %e, "circuit protocol error; destroying circuit");
                            self.destroy(link, circ, DestroyReason::Protocol);
                        }
                    }
                    Next::Origin(oc) => {
                        if let Err(e) = oc.on_cell(cmd, buf) {
                            warn!(circ, error = %e, "circuit protocol error; destroying circuit");
                            self.destroy(link, circ, DestroyReason::Protocol);
                        }
                    }
                    Next::None => {
                        debug!(circ, cmd = cmd.name(), "cell for unknown circuit dropped")
                    }
                }
            }
        }
        Ok(())
    }

    /// A hop on one of our circuits says it is draining: remember it until
    /// its deadline, so the drain planner moves the circuit.
    ///
    /// A notice is plaintext from a link neighbour, so any relay on the path
    /// could forge one. It is taken only for a relay on this circuit's own
    /// path (which that relay could cut anyway), never for the exit (whose
    /// streams cannot move: only its signed advert may close them early),
    /// and it lasts until the named node's next signed advert.
    fn on_notice(&self, buf: &[u8], path: &[NodeId]) {
        let Ok(n) = pb::DrainNotice::decode(&buf[cellfmt::HEADER_LEN..]) else {
            return debug!("undecodable drain notice dropped");
        };
        let Ok(id) = <[u8; 32]>::try_from(n.node_id.as_slice()) else {
            return debug!("drain notice without a node id dropped");
        };
        let relays = &path[..path.len().saturating_sub(1)];
        if !relays.contains(&NodeId(id)) {
            return debug!("drain notice for a node that is not a relay of this circuit dropped");
        }
        let now = now_ms();
        let state = if n.until_ms > now {
            ferry_router::NodeState::Draining {
                until: ferry_router::Time(n.until_ms),
            }
        } else {
            ferry_router::NodeState::Exited
        };
        debug!(node = %NodeId(id).short(), "drain notice received");
        self.directory
            .learn(NodeId(id), state, n.until_ms.max(now) + 60_000, now);
    }

    /// Tells the neighbours on every circuit this node relays that it is
    /// draining until `until_ms` (they pass it on to the owner). As an exit
    /// it sends none: owners take an exit's drain from its signed advert.
    pub fn notify_drain(&self, until_ms: u64, reason: &str) {
        let body = pb::DrainNotice {
            node_id: self.keys.node_id().0.to_vec(),
            until_ms,
            reason: reason.to_string(),
        }
        .encode_to_vec();
        let targets: Vec<(Arc<LinkHandle>, u32)> = {
            let c = self.circuits.lock().expect("circuits lock");
            let links = self.links.lock().expect("links lock");
            c.iter()
                .filter(|(_, s)| matches!(s, Slot::Forward { .. }))
                .filter_map(|((lid, circ), _)| {
                    links
                        .values()
                        .find(|l| l.id == *lid)
                        .map(|l| (l.clone(), *circ))
                })
                .collect()
        };
        for (link, circ) in &targets {
            link.try_send(cell(*circ, CellCmd::Notice, &body));
        }
        debug!(circuits = targets.len(), "drain notices sent");
    }

    /// Live links.
    pub fn link_count(&self) -> usize {
        self.links
            .lock()
            .expect("links lock")
            .values()
            .filter(|l| !l.is_closed())
            .count()
    }

    /// Whether this node needs a certificate
    /// ([`NodeConfig::needs_certificate`]).
    pub fn needs_certificate(&self) -> bool {
        self.cfg.needs_certificate()
    }

    /// Why peers will refuse this node's adverts, if they will.
    pub fn admission_problem(&self, now: u64) -> Option<String> {
        if !self.needs_certificate() {
            return None;
        }
        match &self.certificate {
            None => Some(format!(
                "no certificate ({}): send {} to the mesh's authority (ferry authority admit) and put the answer there",
                self.cfg.key_dir.join(crate::cert::CERT_FILE).display(),
                self.cfg.key_dir.join(crate::cert::REQUEST_FILE).display(),
            )),
            Some(c) => c.problem(now),
        }
    }

    /// Closes every link to a node the authority revoked (their circuits
    /// end with them). Returns how many.
    pub fn close_revoked(&self) -> usize {
        let links = self.all_links.lock().expect("links lock");
        let mut n = 0;
        for l in links.values() {
            if !l.is_closed() && self.directory.is_revoked(&l.peer) {
                warn!(peer = %l.peer.short(), "closing the link to a revoked node");
                l.close();
                n += 1;
            }
        }
        n
    }

    /// Whether the node takes new circuits, and if not why: `draining` or
    /// `exited` as its state says; `unadmitted` while peers will refuse its
    /// adverts (it needs a certificate and has none valid); `joining` while
    /// it knows no live peer (unless it has nothing to join: no bootstrap
    /// address and no static peer), or, with bootstrap addresses, until
    /// admitted peers have sent the rulings and revocations in force.
    pub fn readiness(&self, now: u64) -> Readiness {
        let cur = self.state.current();
        if cur.state != ferry_router::NodeState::Active {
            return Readiness {
                ready: false,
                state: cur.name(),
                reason: cur.reason,
            };
        }
        if let Some(why) = self.admission_problem(now) {
            return Readiness {
                ready: false,
                state: "unadmitted",
                reason: why,
            };
        }
        let alone = self.cfg.bootstrap.is_empty() && self.cfg.peers.is_empty();
        if !alone && self.directory.live(now).is_empty() {
            return Readiness {
                ready: false,
                state: "joining",
                reason: format!(
                    "no live peer known yet ({} bootstrap address(es))",
                    self.cfg.bootstrap.len()
                ),
            };
        }
        if !self.cfg.bootstrap.is_empty() && !self.rulings.synced() {
            return Readiness {
                ready: false,
                state: "joining",
                reason: "no peer has sent the rulings in force yet".into(),
            };
        }
        Readiness {
            ready: true,
            state: cur.name(),
            reason: String::new(),
        }
    }

    /// Circuits this node carries for others.
    pub fn circuit_count(&self) -> usize {
        let c = self.circuits.lock().expect("circuits lock");
        let forwards = c
            .values()
            .filter(|s| matches!(s, Slot::Forward { .. }))
            .count();
        let tips = c.values().filter(|s| matches!(s, Slot::Tip(_))).count();
        forwards / 2 + tips
    }

    /// Circuit sides on this node by the neighbour's jurisdiction.
    pub fn circuit_neighbours(&self) -> std::collections::BTreeMap<String, usize> {
        let links: HashMap<LinkId, NodeId> = self
            .links
            .lock()
            .expect("links lock")
            .values()
            .map(|l| (l.id, l.peer))
            .collect();
        let keys: Vec<LinkId> = self
            .circuits
            .lock()
            .expect("circuits lock")
            .keys()
            .map(|(l, _)| *l)
            .collect();
        let mut out = std::collections::BTreeMap::new();
        for l in keys {
            let j = links
                .get(&l)
                .and_then(|p| self.peer(p))
                .map(|p| p.jurisdiction.to_string())
                .unwrap_or_else(|| "unknown".into());
            *out.entry(j).or_insert(0) += 1;
        }
        out
    }

    /// Destroys every circuit (the node reached its exit date); links stay.
    pub fn destroy_all(&self, reason: DestroyReason) -> usize {
        let all: Vec<((LinkId, u32), Slot)> = self
            .circuits
            .lock()
            .expect("circuits lock")
            .drain()
            .collect();
        let links: HashMap<LinkId, Arc<LinkHandle>> = self
            .links
            .lock()
            .expect("links lock")
            .values()
            .map(|l| (l.id, l.clone()))
            .collect();
        let n = all.len();
        let forwards = all
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Forward { .. }))
            .count();
        let others = all
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Tip(_) | Slot::Origin(_)))
            .count();
        self.metrics
            .circuits_closed
            .with_label_values(&[&crate::metrics::destroy_label(reason)])
            .inc_by((forwards / 2 + others) as u64);
        for ((lid, circ), slot) in all {
            if let Some(l) = links.get(&lid) {
                l.try_send(destroy_cell(circ, reason));
            }
            match slot {
                Slot::Tip(end) => end.close(reason),
                Slot::Origin(oc) => oc.close(reason),
                Slot::Pending(tx) => {
                    let _ = tx.send(Err(reason));
                }
                Slot::Forward { .. } => {}
            }
        }
        n
    }

    fn on_create(self: &Arc<Self>, link: &Arc<LinkHandle>, circ: u32, msg1: &[u8]) {
        let _span = tracing::info_span!("circuit", circ).entered();
        let refuse = |why: &str| {
            warn!(circ, reason = why, "circuit refused");
            link.try_send(destroy_cell(circ, DestroyReason::BuildFailed));
        };
        let st = self.state.current();
        if st.state != ferry_router::NodeState::Active {
            let reason = if st.state == ferry_router::NodeState::Exited {
                DestroyReason::Exited
            } else {
                DestroyReason::Draining
            };
            debug!(
                circ,
                state = st.name(),
                "new circuit refused: node is leaving"
            );
            let why = if st.by_ruling { "ruling" } else { "draining" };
            self.metrics.refusals.with_label_values(&[why]).inc();
            link.try_send(destroy_cell(circ, reason));
            return;
        }
        if !(self.cfg.roles.relay || self.cfg.roles.exit) {
            return refuse("this node has neither the relay nor the exit role");
        }
        // A link outlives what admitted its peer: no new circuit from a
        // node that is revoked, or whose certificate or advert lapsed.
        if self.directory.get(&link.peer, now_ms()).is_none() {
            self.metrics.refusals.with_label_values(&["auth"]).inc();
            return refuse("the node on this link is not admitted here any more");
        }
        if self
            .circuits
            .lock()
            .expect("circuits lock")
            .contains_key(&(link.id, circ))
        {
            return refuse("circuit id already in use on this link");
        }
        let (session, msg2) = match crypto::hop_respond(
            &self.keys.noise.responder_keys(now_ms()),
            &self.keys.identity,
            msg1,
        ) {
            Ok(x) => x,
            Err(e) => return refuse(&e.to_string()),
        };
        let end = Endpoint::new(
            link.clone(),
            circ,
            session,
            Side::Exit(self.exit.clone()),
            self.cfg.stream_window,
        );
        self.circuits
            .lock()
            .expect("circuits lock")
            .insert((link.id, circ), Slot::Tip(end));
        if !link.try_send(cell(circ, CellCmd::Created, &msg2)) {
            self.destroy(link, circ, DestroyReason::Shutdown);
            return;
        }
        self.metrics.circuits_opened.inc();
        debug!(circ, "circuit created");
    }

    async fn extend(
        self: Arc<Self>,
        in_link: Arc<LinkHandle>,
        in_circ: u32,
        end: Arc<Endpoint>,
        ext: pb::Extend,
    ) {
        let reply = match self.try_extend(&in_link, in_circ, &end, ext).await {
            Ok(msg2) => pb::control_reply::Msg::Extended(pb::Extended { handshake: msg2 }),
            Err((reason, detail)) => {
                warn!(circ = in_circ, reason = reason.as_str_name(), %detail, "extend failed");
                pb::control_reply::Msg::ExtendFailed(pb::ExtendFailed {
                    reason: reason as i32,
                    detail,
                })
            }
        };
        let reply = pb::ControlReply { msg: Some(reply) };
        if end.send_control(&reply.encode_to_vec()).await.is_err() {
            self.destroy(&in_link, in_circ, DestroyReason::LinkLost);
        }
    }

    async fn try_extend(
        self: &Arc<Self>,
        in_link: &Arc<LinkHandle>,
        in_circ: u32,
        end: &Arc<Endpoint>,
        ext: pb::Extend,
    ) -> Result<Vec<u8>, (RefusalReason, String)> {
        let id: [u8; 32] = ext.node_id.as_slice().try_into().map_err(|_| {
            (
                RefusalReason::Malformed,
                "node id is not 32 bytes".to_string(),
            )
        })?;
        let next = NodeId(id);
        let peer = self.peer(&next).ok_or((
            RefusalReason::UnknownNode,
            format!("node {next} is not known here"),
        ))?;
        if !(peer.roles.relay || peer.roles.exit) || peer.addr.is_none() {
            return Err((
                RefusalReason::Role,
                format!("node {next} is neither relay nor exit"),
            ));
        }
        let out = self
            .link_to(next)
            .await
            .map_err(|e| (RefusalReason::Unreachable, format!("node {next}: {e:#}")))?;
        let out_circ = out.alloc_circ_id();
        let (tx, rx) = oneshot::channel();
        self.circuits
            .lock()
            .expect("circuits lock")
            .insert((out.id, out_circ), Slot::Pending(tx));
        if out
            .send(cell(out_circ, CellCmd::Create, &ext.handshake))
            .await
            .is_err()
        {
            self.remove(out.id, out_circ);
            return Err((RefusalReason::Unreachable, format!("link to {next} closed")));
        }
        let answer = tokio::time::timeout(self.cfg.build_timeout, rx).await;
        let msg2 = match answer {
            Ok(Ok(Ok(msg2))) => msg2,
            Ok(Ok(Err(why @ (DestroyReason::Draining | DestroyReason::Exited)))) => {
                return Err((
                    RefusalReason::Draining,
                    format!("node {next} is leaving: {}", why.as_str_name()),
                ));
            }
            Ok(Ok(Err(why))) => {
                return Err((
                    RefusalReason::Unreachable,
                    format!("node {next} refused: {}", why.as_str_name()),
                ));
            }
            Ok(Err(_)) | Err(_) => {
                self.remove(out.id, out_circ);
                return Err((
                    RefusalReason::Unreachable,
                    format!("node {next} did not answer"),
                ));
            }
        };
        // Splice: from now on this node only forwards this circuit.
        let mut c = self.circuits.lock().expect("circuits lock");
        match c.get(&(in_link.id, in_circ)) {
            Some(Slot::Tip(e)) if Arc::ptr_eq(e, end) => {
                c.insert(
                    (in_link.id, in_circ),
                    Slot::Forward {
                        link: out.clone(),
                        circ: out_circ,
                    },
                );
                c.insert(
                    (out.id, out_circ),
                    Slot::Forward {
                        link: in_link.clone(),
                        circ: in_circ,
                    },
                );
            }
            _ => {
                drop(c);
                out.try_send(destroy_cell(out_circ, DestroyReason::Finished));
                return Err((
                    RefusalReason::Unspecified,
                    "circuit closed while extending".into(),
                ));
            }
        }
        drop(c);
        debug!(circ = in_circ, next = %next.short(), "circuit extended");
        Ok(msg2.to_vec())
    }

    /// Closes every link and circuit.
    pub fn shutdown_all(&self) {
        let slots: Vec<Slot> = self
            .circuits
            .lock()
            .expect("circuits lock")
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in slots {
            self.drop_slot(s, DestroyReason::Shutdown);
        }
        for l in self.links.lock().expect("links lock").values() {
            l.close();
        }
    }
}

/// A DESTROY cell.
pub fn destroy_cell(circ: u32, reason: DestroyReason) -> BytesMut {
    cell(
        circ,
        CellCmd::Destroy,
        &pb::Destroy {
            reason: reason as i32,
        }
        .encode_to_vec(),
    )
}
