//! The switch: links by peer, and the shell around the node's circuit table.
//!
//! What a circuit is on this node, and what each cell does, is
//! `ferry_circuit::Table` (pure: a cell in, one `Dispatch` out); the switch
//! carries the dispatch out on real links and sessions. A relay maps each
//! side of a circuit to the other and forwards cells with nothing more than
//! a circuit-id rewrite. The hop at a circuit's *tip* (the last hop built so
//! far) holds a Noise session with the origin and reads CONTROL cells: an
//! EXTEND makes it dial the next hop, after which it only forwards. When the
//! circuit is complete the tip is the exit, and its session with the origin
//! is the end-to-end session that carries the streams.

use crate::authority::now_ms;
use crate::config::NodeConfig;
use crate::crypto;
use crate::directory::Directory;
use crate::directory::Peer;
use crate::endpoint::{Endpoint, ExitCtx};
use crate::identity::Keys;
use crate::link::{self, LinkHandle, LinkHost, LinkId, cell};
use anyhow::Result;
use bytes::BytesMut;
use ferry_circuit::Side;
use ferry_circuit::{Dispatch, LinkRef, Removed, Slot, Table};
use ferry_proto::pb::{self, DestroyReason, RefusalReason};
use ferry_proto::{Cell, CellCmd, cell as cellfmt};
use ferry_router::NodeId;
use prost::Message;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, warn};

/// An extend waiting for CREATED: the body, or why the next hop refused.
type Waiter = oneshot::Sender<Result<BytesMut, DestroyReason>>;

/// A circuit this node originates, as the switch sees it (the origin
/// implements it; the switch does not depend on the origin's types).
pub trait OriginSlot: Send + Sync {
    /// A cell for the circuit (CREATED, CONTROL or RELAY). An error is a
    /// protocol violation: the circuit is destroyed.
    fn on_cell(&self, cmd: CellCmd, buf: BytesMut) -> Result<(), ferry_circuit::Error>;
    /// The circuit was destroyed.
    fn close(&self, reason: DestroyReason);
    /// The nodes on the circuit, origin side first.
    fn path(&self) -> &[NodeId];
}

/// What the table keeps for an origin circuit.
type Origin = Arc<dyn OriginSlot>;

/// A link as the circuit table keeps it: the handle itself, so forwarding
/// a cell takes no second lookup.
#[derive(Clone, Debug)]
pub struct Out(pub Arc<LinkHandle>);

impl LinkRef for Out {
    fn link_id(&self) -> LinkId {
        self.0.id
    }
}

/// The node's circuit table, with what the switch keeps for each slot.
type Circuits = Table<Out, Arc<Endpoint>, Origin, Waiter>;

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
    /// The link new circuits to each peer take: the first that came up,
    /// until it closes (then another live one to that peer, if any).
    links: Mutex<HashMap<NodeId, Arc<LinkHandle>>>,
    /// Every live link by id (a second link to one peer runs beside the
    /// first, carrying the circuits made on it, but does not replace it in
    /// `links`): what revocation closes.
    all_links: Mutex<HashMap<LinkId, Arc<LinkHandle>>>,
    /// One dial at a time per peer (two builds wanting the same new link
    /// make one), and only per peer: a peer whose handshake hangs for the
    /// whole timeout holds up dials to it alone. An entry is dropped once
    /// no dial holds it, so the map holds only dials in progress.
    dial_locks: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>>,
    circuits: Mutex<Circuits>,
    next_link: AtomicU64,
    exit: Option<Arc<ExitCtx>>,
    /// Bytes written to all links (for the advertised load).
    pub(crate) bytes_out: Arc<AtomicU64>,
    /// Bytes of forwarded cells waiting in links' overflow queues.
    pub(crate) forward_queued: Arc<std::sync::atomic::AtomicUsize>,
    /// The node's metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// This node's certificate (`None`: it has no `node.cert`).
    pub certificate: Option<crate::cert::OwnCert>,
    /// Nodes quarantined on landmarks' evidence (out of path selection).
    pub quarantine: Arc<crate::plausibility::Quarantine>,
    /// Every data-plane task (links, circuits, streams, extends), so a
    /// shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Warnings a remote party can repeat at will: once a minute per
    /// reason, with a count (all are counted in metrics too).
    pub(crate) warned: Arc<crate::log_limit::LogLimit>,
    /// The jurisdiction trail ([`crate::audit`]).
    pub audit: Arc<crate::audit::Audit>,
}

pub use crate::link::Malformed;

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

/// What a switch is built from: the node's parts, made at start-up.
pub struct Parts {
    /// The node's keys.
    pub keys: Arc<Keys>,
    /// The node's config.
    pub cfg: Arc<NodeConfig>,
    /// Known nodes.
    pub directory: Arc<Directory>,
    /// Rulings in force.
    pub rulings: Arc<crate::rulings::Rulings>,
    /// The node's own state.
    pub state: Arc<crate::state::NodeStateCtl>,
    /// The node's certificate, if it has one.
    pub certificate: Option<crate::cert::OwnCert>,
    /// The node's metrics (the registry start-up built).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Cancelled when the node shuts down.
    pub shutdown: CancellationToken,
    /// The jurisdiction trail (an entry records its streams in it).
    pub audit: Arc<crate::audit::Audit>,
}

impl Switch {
    /// A switch for this node.
    pub fn new(parts: Parts) -> Arc<Self> {
        let Parts {
            keys,
            cfg,
            directory,
            rulings,
            state,
            certificate,
            metrics,
            shutdown,
            audit,
        } = parts;
        let exit = cfg.roles.exit.then(|| {
            Arc::new(ExitCtx::new(
                cfg.exit_policy.clone(),
                cfg.connect_timeout,
                cfg.carry.dns_lookups as usize,
                metrics.clone(),
            ))
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
            dial_locks: Mutex::new(HashMap::new()),
            circuits: Mutex::new(Table::default()),
            next_link: AtomicU64::new(1),
            exit,
            bytes_out: Arc::new(AtomicU64::new(0)),
            forward_queued: Arc::default(),
            metrics,
            certificate,
            quarantine: Arc::default(),
            tasks: TaskTracker::new(),
            warned: Default::default(),
            audit,
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

    /// A link finished its handshake (the peer proved itself). A second
    /// link from a peer that has a live one (both dialled at once, or the
    /// peer restarted and the old link is not yet found dead) never
    /// replaces it: the first stays the one new circuits take until it
    /// closes.
    pub(crate) fn link_up(&self, link: Arc<LinkHandle>) {
        self.all_links
            .lock()
            .expect("links lock")
            .insert(link.id, link.clone());
        let mut links = self.links.lock().expect("links lock");
        match links.get(&link.peer) {
            Some(l) if !l.is_closed() => {
                debug!(
                    peer = %link.peer.short(),
                    first = l.id,
                    second = link.id,
                    "a second link to this peer; the first stays in use until it closes"
                );
            }
            _ => {
                links.insert(link.peer, link);
            }
        }
    }

    /// Links open, in all (inbound and outbound, live or closing).
    pub fn link_total(&self) -> usize {
        self.all_links.lock().expect("links lock").len()
    }

    /// Counts and logs a link refused at the limit.
    pub(crate) fn refused_link(&self, what: &str) {
        self.refused("capacity", 0, what);
    }

    /// The link to `peer`, dialing it if there is none (and this node may
    /// have one more: `[limits] links`).
    pub async fn link_to(self: &Arc<Self>, peer: NodeId) -> Result<Arc<LinkHandle>> {
        if let Some(l) = self.live_link(&peer) {
            return Ok(l);
        }
        if self.link_total() >= self.cfg.carry.links as usize {
            self.refused_link("dial refused: this node holds its limit of links ([limits] links)");
            anyhow::bail!("this node holds its limit of links");
        }
        let lock = self
            .dial_locks
            .lock()
            .expect("dial locks")
            .entry(peer)
            .or_default()
            .clone();
        let dialled = {
            let _guard = lock.lock().await;
            match self.live_link(&peer) {
                Some(l) => Ok(l),
                None => link::dial(self, peer).await,
            }
        };
        // The last dial out forgets the lock (the map's and ours are the
        // only references then).
        let mut locks = self.dial_locks.lock().expect("dial locks");
        if Arc::strong_count(&lock) == 2 {
            locks.remove(&peer);
        }
        drop(locks);
        dialled
    }

    /// The mesh as path selection and drain planning see it: the live
    /// nodes, less the quarantined, with this node's own RTT measurement
    /// where it has a link.
    pub fn view(&self, now: u64) -> ferry_router::MeshView {
        let live = self.directory.live(now);
        // Quarantined nodes leave path selection here.
        let quarantine = &self.quarantine;
        ferry_router::MeshView::new(
            live.iter()
                .filter(|e| !quarantine.contains(&e.peer.id, e.peer.jurisdiction, now))
                .map(|e| {
                    let mut info = e.info();
                    // This node's own measurement, where it has a link; the
                    // router's default otherwise (adverts carry no RTT).
                    if let Some(srtt) = self.link_rtt(&info.id).and_then(|r| r.srtt) {
                        info.rtt_ms = srtt.as_millis().try_into().unwrap_or(u32::MAX);
                    }
                    info
                }),
        )
    }

    /// The round-trip estimate of the live link to `peer`, if there is one.
    pub fn link_rtt(&self, peer: &NodeId) -> Option<crate::link::Rtt> {
        self.live_link(peer).map(|l| l.rtt())
    }

    fn live_link(&self, peer: &NodeId) -> Option<Arc<LinkHandle>> {
        self.links
            .lock()
            .expect("links lock")
            .get(peer)
            .filter(|l| !l.is_closed())
            .cloned()
    }

    /// The exit's context, if this node is an exit.
    pub fn exit(&self) -> Option<Arc<ExitCtx>> {
        self.exit.clone()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Circuits> {
        self.circuits.lock().expect("circuits lock")
    }

    fn link_by_id(&self, id: LinkId) -> Option<Arc<LinkHandle>> {
        self.all_links.lock().expect("links lock").get(&id).cloned()
    }

    /// Registers a circuit this node originates.
    pub(crate) fn add_origin(&self, link: &LinkHandle, circ: u32, oc: Origin) {
        self.table().add_origin(link.id, circ, oc);
    }

    /// Forgets one side of a circuit (no cells sent).
    pub(crate) fn remove(&self, link: LinkId, circ: u32) {
        self.table().remove(link, circ);
    }

    /// A link went down: every circuit on it is destroyed, and the other side
    /// of each forwarded circuit is told.
    pub(crate) fn link_down(&self, link: &Arc<LinkHandle>) {
        {
            let mut all = self.all_links.lock().expect("links lock");
            all.remove(&link.id);
            let mut links = self.links.lock().expect("links lock");
            if links.get(&link.peer).is_some_and(|l| l.id == link.id) {
                links.remove(&link.peer);
                // Another live link to the peer takes over.
                if let Some(next) = all.values().find(|l| l.peer == link.peer && !l.is_closed()) {
                    links.insert(link.peer, next.clone());
                }
            }
        }
        let gone = self.table().link_down(link.id);
        for r in gone {
            self.finish_removed(r.slot, r.notify, DestroyReason::LinkLost);
        }
    }

    /// Ends what a removed slot held; tells the other side of a forward.
    fn finish_removed(
        &self,
        slot: Slot<Out, Arc<Endpoint>, Origin, Waiter>,
        notify: Option<(Out, u32)>,
        reason: DestroyReason,
    ) {
        if !matches!(slot, Slot::Pending(_)) {
            self.metrics
                .circuit
                .closed
                .with_label_values(&[&crate::metrics::destroy_label(reason)])
                .inc();
        }
        if let Some((Out(link), c)) = notify {
            link.purge(c);
            link.send_urgent(destroy_cell(c, reason));
        }
        match slot {
            Slot::Forward { .. } => {}
            Slot::Pending(tx) => {
                let _ = tx.send(Err(reason));
            }
            Slot::Tip(end) => end.close(reason),
            Slot::Origin(oc) => oc.close(reason),
        }
    }

    /// Destroys a circuit from one side: forgets it and tells both neighbours.
    pub(crate) fn destroy(&self, link: &LinkHandle, circ: u32, reason: DestroyReason) {
        let removed = self.table().destroy(link.id, circ);
        link.purge(circ);
        link.send_urgent(destroy_cell(circ, reason));
        if let Some(Removed { slot, notify, .. }) = removed {
            self.finish_removed(slot, notify, reason);
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
        let reason = if cmd == CellCmd::Destroy {
            pb::Destroy::decode(c.body)
                .map(|d| d.reason())
                .unwrap_or_default()
        } else {
            DestroyReason::Unspecified
        };
        let dispatch = self.table().dispatch(link.id, circ, cmd, reason);
        match dispatch {
            Dispatch::Create => self.on_create(link, circ, c.body),
            Dispatch::CreateInUse => {
                crate::warn_limited!(
                    self.warned,
                    "circuit id in use",
                    circ,
                    reason = "circuit id already in use on this link",
                    "circuit refused"
                );
                link.send_urgent(destroy_cell(circ, DestroyReason::BuildFailed));
            }
            Dispatch::Destroyed {
                slot,
                notify,
                reason,
            } => {
                debug!(circ, reason = reason.as_str_name(), "destroy received");
                // What waits on this link for the circuit goes nowhere now.
                link.purge(circ);
                self.finish_removed(slot, notify, reason);
            }
            Dispatch::Forward {
                link: Out(out),
                circ: out_circ,
            } => {
                // Never waits: a congested next link queues the cell with
                // its circuit, so this link's other circuits go on.
                cellfmt::set_circ_id(&mut buf, out_circ);
                match out.forward(out_circ, buf) {
                    Ok(()) => {}
                    Err(link::ForwardError::Closed) => {
                        self.destroy(link, circ, DestroyReason::LinkLost);
                    }
                    Err(link::ForwardError::TooMuch) => {
                        self.refused(
                            "capacity",
                            circ,
                            "circuit destroyed: its cells waiting for a congested link passed the limit",
                        );
                        self.destroy(link, circ, DestroyReason::Capacity);
                    }
                }
            }
            Dispatch::Created(tx) => {
                let mut body = buf;
                let _ = body.split_to(cellfmt::HEADER_LEN);
                let _ = tx.send(Ok(body));
            }
            Dispatch::Notice(oc) => self.on_notice(&buf, oc.path()),
            Dispatch::Tip(end) => {
                let res = if cmd == CellCmd::Relay {
                    end.on_relay(buf)
                } else {
                    end.on_control(buf).and_then(|extend| {
                        let Some(ext) = extend else { return Ok(()) };
                        if !end.start_extend() {
                            return Err(ferry_circuit::Error::Protocol(
                                "a second EXTEND while one runs".into(),
                            ));
                        }
                        self.tasks.spawn(
                            self.clone()
                                .extend(link.clone(), circ, end.clone(), ext)
                                .instrument(tracing::info_span!("circuit", circ)),
                        );
                        Ok(())
                    })
                };
                if let Err(e) = res {
                    crate::warn_limited!(self.warned, ("circuit protocol error", e.kind()), circ, error = %e, kind = e.kind(), "circuit protocol error; destroying circuit");
                    self.destroy(link, circ, DestroyReason::Protocol);
                }
            }
            Dispatch::Origin(oc) => {
                if let Err(e) = oc.on_cell(cmd, buf) {
                    crate::warn_limited!(self.warned, ("circuit protocol error", e.kind()), circ, error = %e, kind = e.kind(), "circuit protocol error; destroying circuit");
                    self.destroy(link, circ, DestroyReason::Protocol);
                }
            }
            Dispatch::Drop(why) => debug!(circ, cmd = cmd.name(), why, "cell dropped"),
            Dispatch::TooLong => {
                self.refused(
                    "loop",
                    circ,
                    "circuit destroyed: its origin builds past the hop limit (a loop through relays)",
                );
                self.destroy(link, circ, DestroyReason::Protocol);
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
        let targets = self.table().forwarding();
        for (Out(link), circ) in &targets {
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
        self.table().carried()
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
        let keys: Vec<LinkId> = self.table().links();
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
        let all = self.table().drain_all();
        let n = all.len();
        let forwards = all
            .iter()
            .filter(|(_, r)| matches!(r.slot, Slot::Forward { .. }))
            .count();
        let others = all
            .iter()
            .filter(|(_, r)| matches!(r.slot, Slot::Tip(_) | Slot::Origin(_)))
            .count();
        self.metrics
            .circuit
            .closed
            .with_label_values(&[&crate::metrics::destroy_label(reason)])
            .inc_by((forwards / 2 + others) as u64);
        for (lid, Removed { circ, slot, .. }) in all {
            if let Some(l) = self.link_by_id(lid) {
                l.purge(circ);
                l.send_urgent(destroy_cell(circ, reason));
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

    /// Closes idle circuits until shutdown: every `[limits]
    /// idle_circuit_secs`, each circuit no cell crossed (either way) since
    /// the last sweep, so one goes after between one and two periods of
    /// quiet. Origins keep circuits with streams alive with keepalives
    /// (`Origin::run_idle`); an origin that sends none loses its circuits
    /// here, at every relay and at the exit.
    pub async fn sweep_idle(self: Arc<Self>) {
        let secs = u64::from(self.cfg.carry.idle_circuit_secs);
        if secs == 0 {
            return;
        }
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(secs));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            let n = self.close_idle();
            if n > 0 {
                debug!(closed = n, "idle circuits closed");
            }
        }
    }

    /// One idle sweep: destroys what was quiet for the whole period.
    fn close_idle(&self) -> usize {
        let (forwards, tips) = {
            let mut t = self.table();
            (t.sweep_forwards(), t.tips())
        };
        let quiet_tips = tips
            .into_iter()
            .filter(|(.., end)| end.quiet())
            .map(|(l, c, _)| (l, c));
        let mut n = 0;
        for (l, c) in forwards.into_iter().chain(quiet_tips) {
            if let Some(link) = self.link_by_id(l) {
                self.destroy(&link, c, DestroyReason::Idle);
                n += 1;
            }
        }
        n
    }

    /// Counts a refusal a remote party caused, and logs it (WARN once a
    /// minute per kind, else DEBUG).
    fn refused(&self, kind: &'static str, circ: u32, what: &str) {
        self.metrics.node.refusals.with_label_values(&[kind]).inc();
        crate::warn_limited!(
            self.warned,
            ("refused", kind),
            circ,
            reason = kind,
            "{what}"
        );
    }

    /// Why this node cannot take one more circuit side on `link`, if it
    /// cannot (`[limits] circuits`, `circuits_per_link`).
    fn at_capacity(&self, link: LinkId) -> Option<&'static str> {
        let t = self.table();
        let c = &self.cfg.carry;
        if t.len() >= c.circuits as usize {
            Some("circuit refused: this node holds its limit of circuits ([limits] circuits)")
        } else if t.on_link(link) >= c.circuits_per_link as usize {
            Some(
                "circuit refused: the link holds its limit of circuits ([limits] circuits_per_link)",
            )
        } else {
            None
        }
    }

    fn on_create(self: &Arc<Self>, link: &Arc<LinkHandle>, circ: u32, msg1: &[u8]) {
        let _span = tracing::info_span!("circuit", circ).entered();
        let refuse = |kind: &'static str, why: &str| {
            crate::warn_limited!(
                self.warned,
                ("circuit refused", kind),
                circ,
                reason = why,
                "circuit refused"
            );
            link.send_urgent(destroy_cell(circ, DestroyReason::BuildFailed));
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
            self.metrics.node.refusals.with_label_values(&[why]).inc();
            link.send_urgent(destroy_cell(circ, reason));
            return;
        }
        if !(self.cfg.roles.relay || self.cfg.roles.exit) {
            return refuse("role", "this node has neither the relay nor the exit role");
        }
        if let Some(why) = self.at_capacity(link.id) {
            self.refused("capacity", circ, why);
            link.send_urgent(destroy_cell(circ, DestroyReason::Capacity));
            return;
        }
        // A link outlives what admitted its peer: no new circuit from a
        // node that is revoked, or whose certificate or advert lapsed.
        if self.directory.get(&link.peer, now_ms()).is_none() {
            self.metrics
                .node
                .refusals
                .with_label_values(&["auth"])
                .inc();
            return refuse(
                "auth",
                "the node on this link is not admitted here any more",
            );
        }
        let (session, msg2) = match crypto::hop_respond(
            &self.keys.noise.responder_keys(now_ms()),
            &self.keys.identity,
            msg1,
        ) {
            Ok(x) => x,
            Err(e) => return refuse("handshake", &e.to_string()),
        };
        let end = Endpoint::new(
            link.clone(),
            circ,
            session,
            Side::Exit,
            Endpoint::config(
                self.cfg.stream_window,
                self.cfg.carry.streams_per_circuit as usize,
                self.cfg.congestion_control,
            ),
            self.exit.clone(),
            self.tasks.clone(),
        );
        self.table().add_tip(link.id, circ, end);
        if !link.send_urgent(cell(circ, CellCmd::Created, &msg2)) {
            self.destroy(link, circ, DestroyReason::Shutdown);
            return;
        }
        self.metrics.circuit.opened.inc();
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
                end.end_extend();
                crate::warn_limited!(self.warned, ("extend failed", reason.as_str_name()), circ = in_circ, reason = reason.as_str_name(), %detail, "extend failed");
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
        // Back to the node it came from, or to this node: a loop, never a
        // path a real origin picks (no two hops share a jurisdiction).
        if next == in_link.peer || next == self.keys.node_id() {
            self.refused(
                "loop",
                in_circ,
                "extend refused: the next hop is this node or the previous one",
            );
            return Err((
                RefusalReason::Malformed,
                "the next hop is this node or the previous one".into(),
            ));
        }
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
        // A public mesh dials public addresses only: an advert (or a
        // static peer) naming a loopback or private address must not make
        // relays connect into their own networks for an origin.
        if !self.cfg.mesh_private
            && let Some(range) = peer.addr.and_then(|a| crate::policy::non_public(a.ip()))
        {
            self.refused(
                "policy",
                in_circ,
                "extend refused: the next hop's link address is not public ([mesh] private = false)",
            );
            return Err((
                RefusalReason::Unreachable,
                format!(
                    "node {next} has a {range} link address, which relays of a public mesh do not dial"
                ),
            ));
        }
        // The connect error's text stays here (debug): echoed to the origin
        // it would tell a hostile origin, through an advert naming any
        // address, whether that address's port is open (a port scanner).
        let out = self.link_to(next).await.map_err(|e| {
            debug!(next = %next.short(), error = %format!("{e:#}"), "extend: no link to the next hop");
            (
                RefusalReason::Unreachable,
                format!("node {next} could not be reached"),
            )
        })?;
        if let Some(why) = self.at_capacity(out.id) {
            self.refused("capacity", in_circ, why);
            return Err((
                RefusalReason::Capacity,
                "this hop is at its circuit limit".into(),
            ));
        }
        let out_circ = out.alloc_circ_id();
        let (tx, rx) = oneshot::channel();
        self.table().add_pending(out.id, out_circ, tx);
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
        let spliced = self.table().splice(
            (Out(in_link.clone()), in_circ),
            (Out(out.clone()), out_circ),
            |e| Arc::ptr_eq(e, end),
        );
        if spliced.is_err() {
            out.send_urgent(destroy_cell(out_circ, DestroyReason::Finished));
            return Err((
                RefusalReason::Unspecified,
                "circuit closed while extending".into(),
            ));
        }
        debug!(circ = in_circ, next = %next.short(), "circuit extended");
        Ok(msg2.to_vec())
    }

    /// Fills the node's, links' and circuits' metrics from the live state
    /// (at scrape time).
    pub fn observe(&self, m: &crate::metrics::Metrics, now: u64) {
        use crate::metrics::advance;
        let n = &m.node;
        n.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        n.info
            .with_label_values(&[self.cfg.jurisdiction.as_str(), &self.cfg.roles.to_string()])
            .set(1);
        m.link.active.set(self.link_count() as i64);
        m.link
            .queued
            .set(self.forward_queued.load(Ordering::Relaxed) as i64);
        m.control
            .quarantined
            .set(self.quarantine.in_force(now).len() as i64);
        for (result, n) in self.quarantine.results() {
            advance(&m.control.reports.with_label_values(&[result]), n);
        }
        advance(&m.link.sent, self.bytes_out());
        m.circuit.active.set(self.circuit_count() as i64);
        n.ready.set(i64::from(self.readiness(now).ready));
        n.cert_required.set(i64::from(self.needs_certificate()));
        n.cert_expiry.set(match &self.certificate {
            Some(c) if c.problem(now).is_none() => c
                .verified
                .as_ref()
                .map_or(0, |c| (c.not_after_ms.saturating_sub(now) / 1000) as i64),
            _ => 0,
        });
        let cur = self.state.current();
        for name in ["active", "draining", "exited"] {
            n.state
                .with_label_values(&[name])
                .set(i64::from(cur.name() == name));
        }
        n.exit_seconds.set(match cur.state {
            ferry_router::NodeState::Draining { until } => {
                (until.0.saturating_sub(now) / 1000) as i64
            }
            _ => 0,
        });
        m.circuit.blocked.reset();
        for (j, count) in self.circuit_neighbours() {
            if let Some(st) = self.leaving(&j, now) {
                m.circuit
                    .blocked
                    .with_label_values(&[&j, st])
                    .add(count as i64);
            }
        }
        n.peers.reset();
        for e in self.directory.live(now) {
            n.peers
                .with_label_values(&[&e.peer.jurisdiction.to_string()])
                .inc();
        }
    }

    /// `draining` or `blocked` if a ruling covers jurisdiction `j` now.
    pub fn leaving(&self, j: &str, now: u64) -> Option<&'static str> {
        let j = ferry_router::Jurisdiction::parse(j).ok()?;
        self.rulings
            .snapshot()
            .status(
                Some(j),
                &ferry_router::TrafficScope::default(),
                ferry_router::Time(now),
            )
            .0
            .leaving_label()
    }

    /// Closes every link and circuit.
    pub fn shutdown_all(&self) {
        let all = self.table().drain_all();
        for (_, Removed { slot, .. }) in all {
            self.finish_removed(slot, None, DestroyReason::Shutdown);
        }
        for l in self.all_links.lock().expect("links lock").values() {
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

impl LinkHost for Switch {
    fn keys(&self) -> &Keys {
        &self.keys
    }

    fn peer(&self, id: &NodeId) -> Option<Peer> {
        Switch::peer(self, id)
    }

    fn binds(&self, id: &NodeId, key: &[u8; 32]) -> bool {
        Switch::binds(self, id, key)
    }

    fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    fn next_link_id(&self) -> LinkId {
        Switch::next_link_id(self)
    }

    fn bytes_out(&self) -> Arc<AtomicU64> {
        self.bytes_out.clone()
    }

    fn forward_queue(&self) -> (Arc<std::sync::atomic::AtomicUsize>, usize) {
        (
            self.forward_queued.clone(),
            self.cfg.carry.forward_queue_mb as usize * (1 << 20),
        )
    }

    fn link_up(&self, link: Arc<LinkHandle>) {
        Switch::link_up(self, link)
    }

    fn link_down(&self, link: &Arc<LinkHandle>) {
        Switch::link_down(self, link)
    }

    fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    fn log_limit(&self) -> Arc<crate::log_limit::LogLimit> {
        self.warned.clone()
    }

    fn on_cell(
        this: &Arc<Self>,
        link: &Arc<LinkHandle>,
        cell: BytesMut,
    ) -> impl std::future::Future<Output = Result<(), Malformed>> + Send {
        Switch::on_cell(this, link, cell)
    }
}
