//! The control plane: rust-libp2p on tokio. TCP with Noise and Yamux;
//! identify and Kademlia to discover the mesh from bootstrap addresses;
//! gossipsub to spread signed node adverts and signed rulings.
//!
//! The swarm runs in one task that owns it. Adverts are re-signed and
//! published every third of their lifetime, so a node that vanishes is
//! forgotten one lifetime after its last advert.
//!
//! Rulings and revocations are gossiped once, when they are new. A node
//! learns what is already in force by *sync*: on every new connection it
//! asks the peer (request-response, `/ferry/sync/1`) for its signed rulings
//! and revocations, and a node with bootstrap addresses is not ready (an
//! entry builds no circuit) until one peer has answered. So a node that
//! joins a minute or a year after a ruling was signed has it within one
//! round trip of its first connection, and nothing is re-gossiped (the
//! re-gossip of the same bytes that gossipsub drops as a duplicate is gone).
//!
//! The control listener faces the same network as the link listener, so
//! what a stranger can make it hold is bounded (libp2p's
//! `connection_limits`): [`CONTROL_PENDING`] inbound connections in their
//! Noise handshake at once (more are closed on arrival),
//! [`CONTROL_CONNECTIONS`] established in all, and [`CONTROL_PER_PEER`]
//! per peer (room for both ends dialling at once, redials, and stale
//! connections not yet found dead). Outbound dials are not bounded here:
//! this node makes them, one per known node at most. Every connection
//! refused is counted (`ferry_refusals_total{reason="control"}`), a peer's
//! connections past its limit included.

pub use crate::config::{Bootstrap, multiaddr, parse_bootstrap};
use crate::directory::{Directory, OwnAdvert};
use crate::log_limit::LogLimit;
use crate::rulings::{Offered, Revocations, Revoked, Rulings, Source};
use crate::store::{Store, cf};
use anyhow::{Context, Result, anyhow};
use futures::StreamExt;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, gossipsub, identify, identity, kad, noise, ping,
    request_response, tcp, yamux,
};
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

/// Gossip topic for node adverts.
pub const ADVERTS: &str = "ferry/adverts/1";
/// Gossip topic for rulings.
pub const RULINGS: &str = "ferry/rulings/1";
/// Gossip topic for revocations.
pub const REVOCATIONS: &str = "ferry/revocations/1";
/// Gossip topic for landmarks' measurement reports.
pub const MEASUREMENTS: &str = "ferry/measurements/1";
/// The sync protocol: what is in force, asked at each connection.
pub const SYNC: &str = "/ferry/sync/1";
/// Most rulings, and most revocations, one sync answer may carry; the rest
/// are ignored (the answer is also bounded in bytes by the codec).
pub const MAX_SYNC_ITEMS: usize = 1024;
/// Largest sync answer accepted, in bytes (its decoded form is bounded by
/// this too: at most a few dozen bytes of memory per byte).
pub const MAX_SYNC_BYTES: u64 = 512 * 1024;

/// A sync request (it asks for everything in force).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SyncRequest {}

/// A sync answer: signed rulings in force and signed revocations, as the
/// bytes that gossip carries.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SyncResponse {
    /// `SignedRuling` bytes.
    pub rulings: Vec<Vec<u8>>,
    /// `SignedRevocation` bytes.
    pub revocations: Vec<Vec<u8>>,
    /// The answering node's own signed advert (with its certificate).
    pub advert: Vec<u8>,
    /// Signed adverts of live nodes the answering node knows (at most
    /// [`MAX_SYNC_ADVERTS`], in at most [`MAX_SYNC_ADVERT_BYTES`]), each
    /// checked by the asker as if gossip had brought it: a node that joins
    /// knows the mesh at once, not only as gossip passes on each node's
    /// next advert. (Absent from older nodes' answers: empty.)
    #[serde(default)]
    pub adverts: Vec<Vec<u8>>,
}

/// Most adverts one sync answer carries.
pub const MAX_SYNC_ADVERTS: usize = 256;
/// Most bytes of adverts one sync answer carries.
pub const MAX_SYNC_ADVERT_BYTES: usize = 256 * 1024;
/// Largest gossip message libp2p accepts at all; Ferry's own bounds are lower.
pub const MAX_GOSSIP: usize = 64 * 1024;

/// Inbound control connections in their handshake at once.
pub const CONTROL_PENDING: u32 = 64;
/// Control connections established at once, in all.
pub const CONTROL_CONNECTIONS: u32 = 2048;
/// Control connections established at once with one peer.
pub const CONTROL_PER_PEER: u32 = 8;

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: libp2p::connection_limits::Behaviour,
    gossipsub: gossipsub::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    sync: request_response::cbor::Behaviour<SyncRequest, SyncResponse>,
}

/// What the rest of the node asks of the control plane.
#[derive(Debug)]
pub enum Command {
    /// Publish a signed ruling that was accepted locally.
    PublishRuling(Vec<u8>),
    /// Publish a signed revocation that was accepted locally.
    PublishRevocation(Vec<u8>),
    /// Publish this landmark's signed measurement report.
    PublishMeasurement(Vec<u8>),
    /// Sign and publish this node's advert now (its state changed).
    Advertise,
    /// Dial these (bootstrap names, resolved off the swarm's task).
    Dial(Vec<Multiaddr>),
}

/// Counters of gossip dropped, by reason.
#[derive(Debug, Default)]
pub struct GossipCounters {
    adverts: Mutex<BTreeMap<&'static str, u64>>,
    warned: LogLimit,
    /// Control connections refused by the connection limits.
    denied: std::sync::atomic::AtomicU64,
}

impl GossipCounters {
    /// Fills the gossip metrics, and the control plane's refusals
    /// (`ferry_refusals_total{reason="control"}`), at scrape time.
    pub fn observe(&self, m: &crate::metrics::Metrics) {
        for (reason, n) in self.advert_rejections() {
            crate::metrics::advance(&m.control.advert_rejections.with_label_values(&[reason]), n);
        }
        let denied = self.denied.load(std::sync::atomic::Ordering::Relaxed);
        crate::metrics::advance(&m.node.refusals.with_label_values(&["control"]), denied);
    }
}

impl GossipCounters {
    /// Adverts dropped, by reason.
    pub fn advert_rejections(&self) -> BTreeMap<&'static str, u64> {
        self.adverts.lock().expect("lock").clone()
    }
}

/// The control plane's settings.
pub struct Settings {
    /// libp2p listen address.
    pub listen: Option<SocketAddr>,
    /// Bootstrap addresses (IP:port, host.name:port or multiaddr).
    pub bootstrap: Vec<String>,
    /// Advert lifetime.
    pub advert_ttl: Duration,
}

/// Resolves bootstrap addresses into dialable multiaddrs; a name that does
/// not resolve (yet: a peer still starting) is skipped this time.
pub async fn resolve_bootstrap(list: &[Bootstrap]) -> Vec<Multiaddr> {
    let mut out = Vec::new();
    for b in list {
        match b {
            Bootstrap::Addr(a) => out.push(a.clone()),
            Bootstrap::Name(host, port) => {
                let found = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::net::lookup_host((host.as_str(), *port)),
                )
                .await;
                match found {
                    Ok(Ok(addrs)) => {
                        out.extend(addrs.filter_map(|a| multiaddr(&a.to_string()).ok()));
                    }
                    Ok(Err(e)) => debug!(%host, error = %e, "bootstrap name did not resolve"),
                    Err(_) => debug!(%host, "bootstrap name resolution timed out"),
                }
            }
        }
    }
    out
}

/// Resolves the bootstrap list off the swarm's task and has it dialled.
fn dial_bootstrap(list: &Arc<Vec<Bootstrap>>, tx: &mpsc::UnboundedSender<Command>) {
    if list.is_empty() {
        return;
    }
    let (list, tx) = (list.clone(), tx.clone());
    tokio::spawn(
        async move {
            let addrs = resolve_bootstrap(&list).await;
            if addrs.is_empty() {
                debug!(
                    configured = list.len(),
                    "no bootstrap address resolved yet; trying again in 2 s"
                );
            }
            let _ = tx.send(Command::Dial(addrs));
        }
        .in_current_span(),
    );
}

/// The libp2p peer id of a node id.
pub fn peer_id(node: &ferry_router::NodeId) -> Option<PeerId> {
    let pk = identity::ed25519::PublicKey::try_from_bytes(&node.0).ok()?;
    Some(PeerId::from_public_key(&identity::PublicKey::from(pk)))
}

/// Everything the control task shares with the node.
#[derive(Clone)]
pub struct Shared {
    /// Known nodes.
    pub directory: Arc<Directory>,
    /// Rulings.
    pub rulings: Arc<Rulings>,
    /// Revocations.
    pub revocations: Arc<Revocations>,
    /// Dropped gossip.
    pub counters: Arc<GossipCounters>,
    /// The store.
    pub store: Arc<Store>,
    /// Nodes quarantined on landmarks' evidence.
    pub quarantine: Arc<crate::plausibility::Quarantine>,
    /// This node's id and verified certificate (its own reports, if it is
    /// a landmark, are checked against it).
    pub own: Option<(ferry_router::NodeId, crate::cert::Cert)>,
}

/// Starts the control plane. `advert` re-signs this node's advert.
pub fn start(
    keys: &crate::identity::Keys,
    settings: Settings,
    shared: Shared,
    advert: impl Fn(Vec<String>, u64, u64) -> Vec<u8> + Send + 'static,
    shutdown: CancellationToken,
) -> Result<mpsc::UnboundedSender<Command>> {
    let mut seed = keys.identity.to_bytes();
    let kp = identity::Keypair::ed25519_from_bytes(&mut seed).context("identity key")?;
    let me = kp.public().to_peer_id();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(kp)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|key| {
            let gcfg = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(500))
                .validation_mode(gossipsub::ValidationMode::Strict)
                // Nothing is forwarded before this node has checked it
                // (`verdict`): junk and forgeries stop at the first hop.
                .validate_messages()
                .max_transmit_size(MAX_GOSSIP)
                .message_id_fn(|m: &gossipsub::Message| {
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    m.topic.hash(&mut h);
                    m.data.hash(&mut h);
                    gossipsub::MessageId::from(h.finish().to_be_bytes().to_vec())
                })
                .build()
                .map_err(|e| anyhow!("gossipsub config: {e}"))?;
            let gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gcfg,
            )
            .map_err(|e| anyhow!("gossipsub: {e}"))?;
            let mut kad = kad::Behaviour::with_config(
                me,
                kad::store::MemoryStore::new(me),
                kad::Config::new(StreamProtocol::new("/ferry/kad/1")),
            );
            kad.set_mode(Some(kad::Mode::Server));
            let identify =
                identify::Behaviour::new(identify::Config::new("/ferry/id/1".into(), key.public()));
            let sync = request_response::cbor::Behaviour::new(
                [(
                    StreamProtocol::new(SYNC),
                    request_response::ProtocolSupport::Full,
                )],
                request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
            );
            let limits = libp2p::connection_limits::ConnectionLimits::default()
                .with_max_pending_incoming(Some(CONTROL_PENDING))
                .with_max_established(Some(CONTROL_CONNECTIONS))
                .with_max_established_per_peer(Some(CONTROL_PER_PEER));
            Ok(Behaviour {
                limits: libp2p::connection_limits::Behaviour::new(limits),
                gossipsub,
                kad,
                identify,
                ping: ping::Behaviour::default(),
                sync,
            })
        })
        .map_err(|e| anyhow!("libp2p behaviour: {e}"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    let adverts = gossipsub::IdentTopic::new(ADVERTS);
    let rulings_topic = gossipsub::IdentTopic::new(RULINGS);
    let revocations_topic = gossipsub::IdentTopic::new(REVOCATIONS);
    let measurements = gossipsub::IdentTopic::new(MEASUREMENTS);
    swarm.behaviour_mut().gossipsub.subscribe(&measurements)?;
    swarm.behaviour_mut().gossipsub.subscribe(&adverts)?;
    swarm.behaviour_mut().gossipsub.subscribe(&rulings_topic)?;
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&revocations_topic)?;
    if let Some(l) = settings.listen {
        swarm
            .listen_on(multiaddr(&l.to_string())?)
            .with_context(|| format!("listening on {l} (mesh.listen)"))?;
    }
    // Dial the bootstrap nodes (resolving names off this task), and every
    // node the store remembers.
    let bootstrap = Arc::new(
        settings
            .bootstrap
            .iter()
            .map(|b| parse_bootstrap(b).context("mesh.bootstrap"))
            .collect::<Result<Vec<_>>>()?,
    );
    let (tx, mut rx) = mpsc::unbounded_channel();
    dial_bootstrap(&bootstrap, &tx);
    let mut dials: Vec<Multiaddr> = Vec::new();
    sweep_stored_adverts(&shared.store, crate::authority::now_ms());
    for (_, bytes) in shared.store.all(cf::PEERS)? {
        if let Ok((a, e)) = crate::directory::verify_advert(&bytes, 0)
            && !shared.directory.is_revoked(&e.peer.id)
        {
            dials.extend(a.p2p_addrs.iter().filter_map(|s| s.parse().ok()));
        }
    }
    for d in dials {
        if let Err(e) = swarm.dial(d) {
            debug!(error = %e, "dial failed");
        }
    }

    let own = keys.node_id();
    let redial = tx.clone();
    let ttl = settings.advert_ttl;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(ttl / 3);
        let mut kad_tick = tokio::time::interval(Duration::from_secs(10));
        let mut sweep_tick = tokio::time::interval(ADVERT_SWEEP);
        sweep_tick.tick().await;
        // While no peer is connected, the bootstrap list is resolved and
        // dialled again every 2 s (peers that start later, names that
        // resolve later); connected, nothing is dialled.
        let mut alone_tick = tokio::time::interval(Duration::from_secs(2));
        alone_tick.tick().await;
        let mut listen_addrs: Vec<String> = Vec::new();
        let mut sync_state = SyncState::default();
        let mut seq = shared
            .store
            .get(cf::STATE, b"advert_seq")
            .ok()
            .flatten()
            .and_then(|v| v.try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    let now = crate::authority::now_ms();
                    seq = (seq + 1).max(now);
                    let _ = shared.store.put(cf::STATE, b"advert_seq", &seq.to_be_bytes());
                    let bytes = advert(listen_addrs.clone(), seq, now + ttl.as_millis() as u64);
                    sync_state.own_advert = bytes.clone();
                    publish(&mut swarm, &adverts, bytes);
                    let gone = shared.directory.expire(now);
                    if gone > 0 {
                        info!(gone, "peers expired");
                    }
                }
                _ = kad_tick.tick() => {
                    let _ = swarm.behaviour_mut().kad.bootstrap();
                }
                _ = sweep_tick.tick() => {
                    let store = shared.store.clone();
                    let now = crate::authority::now_ms();
                    tokio::task::spawn_blocking(move || sweep_stored_adverts(&store, now));
                }
                _ = alone_tick.tick() => {
                    if swarm.connected_peers().next().is_none() {
                        dial_bootstrap(&bootstrap, &redial);
                    }
                }
                Some(cmd) = rx.recv() => match cmd {
                    Command::PublishRuling(bytes) => publish(&mut swarm, &rulings_topic, bytes),
                    Command::PublishRevocation(bytes) => {
                        if let Ok((id, _)) = shared.directory.authority().verify_revocation(&bytes) {
                            disconnect_revoked(&mut swarm, &id);
                        }
                        publish(&mut swarm, &revocations_topic, bytes);
                    }
                    Command::PublishMeasurement(bytes) => publish(&mut swarm, &measurements, bytes),
                    Command::Advertise => tick.reset_immediately(),
                    Command::Dial(addrs) => {
                        for a in addrs {
                            if let Err(e) = swarm.dial(a) {
                                debug!(error = %e, "bootstrap dial failed");
                            }
                        }
                    }
                },
                ev = swarm.select_next_some() => match ev {
                    SwarmEvent::NewListenAddr { address, .. } => {
                        listen_addrs.push(format!("{address}/p2p/{me}"));
                        tick.reset_immediately();
                    }
                    SwarmEvent::ConnectionEstablished { peer_id: pid, num_established, .. } => {
                        // A new neighbour: tell it who we are, and ask it
                        // what is in force.
                        tick.reset_immediately();
                        if shared.revocations.revoked().iter().any(|id| peer_id(id) == Some(pid)) {
                            let _ = swarm.disconnect_peer_id(pid);
                        } else if num_established.get() == 1 {
                            swarm.behaviour_mut().sync.send_request(&pid, SyncRequest {});
                            sync_state.pending.insert(pid);
                        }
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Sync(ev)) => on_sync(&mut swarm, &shared, &own, &mut sync_state, ev),
                    SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                        for a in info.listen_addrs {
                            swarm.behaviour_mut().kad.add_address(&peer_id, a);
                        }
                        let _ = swarm.behaviour_mut().kad.bootstrap();
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { topic, .. })) if topic == adverts.hash() => {
                        // A peer now listens for adverts (a publish at
                        // connection time can come before its subscription).
                        tick.reset_immediately();
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message { message, message_id, propagation_source })) => {
                        let now = crate::authority::now_ms();
                        let verdict = if message.topic == adverts.hash() {
                            on_advert(&mut swarm, &shared, &own, &message.data, now)
                        } else if message.topic == rulings_topic.hash() {
                            match shared.rulings.offer(&message.data, now, Source::Gossip) {
                                Ok(Offered::InForce | Offered::Cosigned) => Verdict::New,
                                Ok(_) => Verdict::Old,
                                Err(r) if matches!(r.kind, "expired" | "rollback") => Verdict::Old,
                                Err(_) => Verdict::Invalid,
                            }
                        } else if message.topic == measurements.hash() {
                            on_measurement(&shared, &message.data, now)
                        } else if message.topic == revocations_topic.hash() {
                            match on_revocation(&shared, &message.data) {
                                Ok(Revoked::New(id)) => {
                                    disconnect_revoked(&mut swarm, &id);
                                    Verdict::New
                                }
                                Ok(Revoked::Cosigned(_)) => Verdict::New,
                                Ok(Revoked::Duplicate) => Verdict::Old,
                                Err(_) => Verdict::Invalid,
                            }
                        } else {
                            Verdict::Invalid
                        };
                        let acceptance = match verdict {
                            Verdict::New => gossipsub::MessageAcceptance::Accept,
                            Verdict::Old => gossipsub::MessageAcceptance::Ignore,
                            Verdict::Invalid => gossipsub::MessageAcceptance::Reject,
                        };
                        let _ = swarm.behaviour_mut().gossipsub.report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            acceptance,
                        );
                    }
                    SwarmEvent::IncomingConnectionError { error: libp2p::swarm::ListenError::Denied { .. }, .. } => {
                        shared.counters.denied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    _ => {}
                },
            }
        }
        debug!("control plane stopped");
    }.in_current_span());
    Ok(tx)
}

/// Stored adverts of nodes not heard from for this long (since their last
/// advert expired) are deleted: the store keeps the peers a restart redials,
/// not every node that ever passed through.
pub const ADVERT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// How often stored adverts are swept (and once at start).
const ADVERT_SWEEP: Duration = Duration::from_secs(3600);

/// Deletes stored adverts older than [`ADVERT_RETENTION`] (and any that no
/// longer decode); returns how many.
pub fn sweep_stored_adverts(store: &crate::store::Store, now: u64) -> usize {
    let Ok(all) = store.all(cf::PEERS) else {
        return 0;
    };
    let retention = ADVERT_RETENTION.as_millis() as u64;
    let mut gone = 0;
    for (k, bytes) in all {
        let old = match crate::directory::verify_advert(&bytes, 0) {
            Ok((a, _)) => a.expires_at_ms.saturating_add(retention) < now,
            Err(_) => true,
        };
        if old && store.delete(cf::PEERS, &k).is_ok() {
            gone += 1;
        }
    }
    if gone > 0 {
        info!(gone, "stored adverts of nodes long gone deleted");
    }
    gone
}

/// What this node made of a gossip message, which decides whether gossip
/// carries it on: only what checks out and is news goes further; what is
/// old is dropped quietly; what is invalid is dropped and its sender
/// penalised (gossipsub's Reject).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Valid and new here: forwarded.
    New,
    /// Valid but nothing new (a duplicate, out of date, about a node this
    /// node does not know yet): not forwarded.
    Old,
    /// Malformed, forged, or from no one entitled to say it: not forwarded.
    Invalid,
}

/// Takes a landmark's report from gossip (or this landmark's own): checked
/// here (the landmark's certificate and signature, not the gossip), and a
/// refuted claim quarantines its node.
pub fn on_measurement(shared: &Shared, bytes: &[u8], now: u64) -> Verdict {
    use crate::plausibility::ReportError;
    let own = shared.own.as_ref().map(|(id, c)| (*id, c));
    match shared.quarantine.offer(bytes, &shared.directory, own, now) {
        Ok(Some(e)) => {
            crate::warn_limited!(
            shared.counters.warned,
            "node quarantined",
            node = %e.node.short(),
            claimed = %e.claimed,
            landmark = %e.landmark.short(),
            landmark_at = %e.landmark_place,
            measured_ms = e.measured.as_secs_f64() * 1e3,
            minimum_ms = e.minimum.as_secs_f64() * 1e3,
            "node quarantined: a landmark's round trip refutes its jurisdiction"
            );
            Verdict::New
        }
        Ok(None) => Verdict::New,
        Err(e) => {
            debug!(reason = e.kind(), "measurement report refused");
            match e {
                ReportError::Malformed | ReportError::NotLandmark | ReportError::BadSignature => {
                    Verdict::Invalid
                }
                _ => Verdict::Old,
            }
        }
    }
}

/// What this node's own sync has gathered so far.
#[derive(Default)]
struct SyncState {
    /// Admitted peers that answered.
    answered: std::collections::HashSet<PeerId>,
    /// Peers asked that have not answered or failed yet.
    pending: std::collections::HashSet<PeerId>,
    /// The advert this node last published (sent with its answers, so the
    /// asker can tell an admitted peer's answer from anyone's).
    own_advert: Vec<u8>,
    /// The live adverts sync answers carry, and when they were gathered:
    /// gathered at most once every [`SYNC_ADVERTS_FOR`], so that askers
    /// (anyone can ask) cannot make this node scan its store at will.
    adverts: Option<(std::time::Instant, Vec<Vec<u8>>)>,
}

/// How long the adverts gathered for sync answers are reused.
const SYNC_ADVERTS_FOR: Duration = Duration::from_secs(5);

/// The stored adverts of live nodes, for a sync answer (bounded by
/// [`MAX_SYNC_ADVERTS`] and [`MAX_SYNC_ADVERT_BYTES`]).
fn live_adverts(shared: &Shared) -> Vec<Vec<u8>> {
    let now = crate::authority::now_ms();
    let mut adverts = Vec::new();
    let mut bytes = 0;
    for (k, v) in shared.store.all(cf::PEERS).unwrap_or_default() {
        let live = <[u8; 32]>::try_from(k.as_slice()).is_ok_and(|id| {
            shared
                .directory
                .get(&ferry_router::NodeId(id), now)
                .is_some()
        });
        if !live {
            continue;
        }
        if adverts.len() == MAX_SYNC_ADVERTS || bytes + v.len() > MAX_SYNC_ADVERT_BYTES {
            break;
        }
        bytes += v.len();
        adverts.push(v);
    }
    adverts
}

/// The version of a signed ruling, decoded without checking signatures
/// (for ordering only; `offer` checks them).
fn ruling_version(bytes: &[u8]) -> u64 {
    use prost::Message;
    ferry_proto::pb::SignedRuling::decode(bytes)
        .ok()
        .and_then(|s| ferry_proto::pb::RulingBody::decode(s.body.as_slice()).ok())
        .map_or(0, |b| b.version)
}

/// Answers a peer's sync, or applies a peer's answer to ours. A node is
/// synced (ready, as far as rulings go) once two admitted peers answered,
/// or one did and no other request is outstanding: one hostile peer that
/// answers first with nothing cannot make it ready alone while an honest
/// one is being asked. Whoever answers, every ruling and revocation in the
/// answer is verified against the authority before it counts.
fn on_sync(
    swarm: &mut libp2p::Swarm<Behaviour>,
    shared: &Shared,
    own: &ferry_router::NodeId,
    state: &mut SyncState,
    ev: request_response::Event<SyncRequest, SyncResponse>,
) {
    use request_response::{Event, Message};
    let peer = match ev {
        Event::Message {
            message: Message::Request { channel, .. },
            ..
        } => {
            let fresh = state
                .adverts
                .as_ref()
                .is_some_and(|(at, _)| at.elapsed() < SYNC_ADVERTS_FOR);
            if !fresh {
                state.adverts = Some((std::time::Instant::now(), live_adverts(shared)));
            }
            let adverts = state
                .adverts
                .as_ref()
                .map(|(_, a)| a.clone())
                .unwrap_or_default();
            let answer = SyncResponse {
                rulings: shared.rulings.signed(),
                revocations: shared.revocations.signed(),
                advert: state.own_advert.clone(),
                adverts,
            };
            let _ = swarm.behaviour_mut().sync.send_response(channel, answer);
            return;
        }
        Event::Message {
            peer,
            message: Message::Response { response, .. },
            ..
        } => {
            let now = crate::authority::now_ms();
            let (mut new, mut revoked) = (0, 0);
            let before = shared.rulings.rejections().values().sum::<u64>()
                + shared.revocations.rejections().values().sum::<u64>();
            for r in response.revocations.iter().take(MAX_SYNC_ITEMS) {
                if let Ok(Revoked::New(id)) = on_revocation(shared, r) {
                    revoked += 1;
                    disconnect_revoked(swarm, &id);
                }
            }
            // In version order, so a peer's history applies in order.
            let mut rulings: Vec<&Vec<u8>> = response.rulings.iter().take(MAX_SYNC_ITEMS).collect();
            rulings.sort_by_cached_key(|b| ruling_version(b));
            for r in rulings {
                if shared.rulings.offer(r, now, Source::Sync) == Ok(Offered::InForce) {
                    new += 1;
                }
            }
            let refused = shared.rulings.rejections().values().sum::<u64>()
                + shared.revocations.rejections().values().sum::<u64>()
                - before;
            if refused > 0 {
                crate::warn_limited!(
                    shared.counters.warned,
                    "sync refused",
                    refused,
                    "a peer's sync answer carried statements that do not verify"
                );
            }
            // Admitted: its own advert verifies (certificate included) and
            // names this very peer.
            let admitted = match crate::directory::verify_advert(&response.advert, now) {
                Ok((_, e)) if peer_id(&e.peer.id) == Some(peer) => {
                    let _ = shared.directory.accept(&response.advert, own, now);
                    shared.directory.get(&e.peer.id, now).is_some()
                }
                _ => false,
            };
            if admitted {
                state.answered.insert(peer);
                // What the peer knows of the mesh, checked one by one.
                for a in response.adverts.iter().take(MAX_SYNC_ADVERTS) {
                    let _ = on_advert(swarm, shared, own, a, now);
                }
            }
            debug!(%peer, admitted, rulings = response.rulings.len(), new, revoked, "sync answer");
            peer
        }
        Event::OutboundFailure { peer, error, .. } => {
            debug!(%error, "sync request failed");
            peer
        }
        Event::InboundFailure { error, .. } => {
            debug!(%error, "sync answer failed");
            return;
        }
        Event::ResponseSent { .. } => return,
    };
    state.pending.remove(&peer);
    let enough =
        state.answered.len() >= 2 || (!state.answered.is_empty() && state.pending.is_empty());
    if enough && shared.rulings.mark_synced() {
        info!(
            rulings = shared.rulings.snapshot().iter().count(),
            revocations = shared.revocations.revoked().len(),
            peers = state.answered.len(),
            "rulings and revocations in force received from the mesh"
        );
    }
}

/// Drops the control-plane connections of a revoked node.
fn disconnect_revoked(swarm: &mut libp2p::Swarm<Behaviour>, id: &ferry_router::NodeId) {
    if let Some(pid) = peer_id(id) {
        let _ = swarm.disconnect_peer_id(pid);
    }
}

/// Applies a signed revocation: the node leaves the directory (so every
/// path selection), its stored advert is deleted, and the data plane closes
/// its links (within one state tick).
fn on_revocation(shared: &Shared, bytes: &[u8]) -> Result<Revoked, crate::authority::Refusal> {
    apply_revocation(
        &shared.revocations,
        &shared.directory,
        &shared.quarantine,
        &shared.store,
        bytes,
    )
}

/// Verifies and applies a signed revocation (see [`on_revocation`]).
pub fn apply_revocation(
    revocations: &Revocations,
    directory: &Directory,
    quarantine: &crate::plausibility::Quarantine,
    store: &Store,
    bytes: &[u8],
) -> Result<Revoked, crate::authority::Refusal> {
    let r = revocations.offer(bytes)?;
    if let Revoked::New(id) = r {
        directory.revoke(id);
        // A revoked landmark's reports, and reports of a revoked node,
        // stand no more.
        quarantine.forget(&id);
        let _ = store.delete(cf::PEERS, &id.0);
    }
    Ok(r)
}

fn publish(swarm: &mut libp2p::Swarm<Behaviour>, topic: &gossipsub::IdentTopic, bytes: Vec<u8>) {
    if let Err(e) = swarm
        .behaviour_mut()
        .gossipsub
        .publish(topic.clone(), bytes)
    {
        debug!(error = %e, "gossip publish");
    }
}

fn on_advert(
    swarm: &mut libp2p::Swarm<Behaviour>,
    shared: &Shared,
    own: &ferry_router::NodeId,
    data: &[u8],
    now: u64,
) -> Verdict {
    match shared.directory.accept(data, own, now) {
        Ok(Some(e)) => {
            let _ = shared.store.put_cache(cf::PEERS, &e.peer.id.0, data);
            if let Some(pid) = peer_id(&e.peer.id)
                && !swarm.is_connected(&pid)
            {
                for addr in e
                    .p2p_addrs
                    .iter()
                    .filter_map(|s| s.parse::<Multiaddr>().ok())
                {
                    let _ = swarm.dial(addr);
                }
            }
            debug!(node = %e.peer.id.short(), jurisdiction = %e.peer.jurisdiction, "advert accepted");
            Verdict::New
        }
        Ok(None) => Verdict::Old,
        Err(d) => {
            *shared
                .counters
                .adverts
                .lock()
                .expect("lock")
                .entry(d.kind)
                .or_default() += 1;
            // A stale advert is gossip arriving out of order (a newer one
            // came first): expected, so never a warning.
            let warn = match d.kind {
                "stale" => None,
                kind => shared.counters.warned.allow(kind, now),
            };
            match warn {
                // The detail may quote the advert (a claimed jurisdiction):
                // escaped, so it cannot forge log lines.
                Some(0) => warn!(reason = d.kind, detail = ?d.detail, "advert dropped"),
                Some(held_back) => {
                    warn!(reason = d.kind, detail = ?d.detail, held_back, "advert dropped")
                }
                None => debug!(reason = d.kind, detail = %d.detail, "advert dropped"),
            }
            // Out of order: valid, not news.
            if d.kind == "stale" {
                Verdict::Old
            } else {
                Verdict::Invalid
            }
        }
    }
}

/// Offers a ruling from the admin API, and gossips it if it took.
pub fn offer_and_publish(
    rulings: &Rulings,
    tx: &mpsc::UnboundedSender<Command>,
    bytes: Vec<u8>,
) -> Result<Offered, crate::authority::Refusal> {
    let r = rulings.offer(&bytes, crate::authority::now_ms(), Source::Operator)?;
    if matches!(r, Offered::InForce | Offered::Cosigned) {
        let _ = tx.send(Command::PublishRuling(bytes));
    }
    Ok(r)
}

/// Builds this node's advert signer. Its load is what the links wrote since
/// the previous advert, as a share of the advertised capacity.
pub fn advert_signer(
    keys: Arc<crate::identity::Keys>,
    cfg: Arc<crate::config::NodeConfig>,
    link: Option<SocketAddr>,
    switch: Arc<crate::switch::Switch>,
) -> impl Fn(Vec<String>, u64, u64) -> Vec<u8> + Send + 'static {
    let certificate = switch
        .certificate
        .as_ref()
        .map(|c| c.bytes.clone())
        .unwrap_or_default();
    let last = Mutex::new((crate::authority::now_ms(), switch.bytes_out()));
    move |p2p, seq, expires| {
        let (t1, b1) = (crate::authority::now_ms(), switch.bytes_out());
        let (t0, b0) = std::mem::replace(&mut *last.lock().expect("lock"), (t1, b1));
        let secs = (t1.saturating_sub(t0) as f64 / 1000.0).max(0.001);
        let bits_per_sec = b1.saturating_sub(b0) as f64 * 8.0 / secs;
        let load =
            (bits_per_sec / (f64::from(cfg.capacity_mbps.max(1)) * 1e6)).clamp(0.0, 1.0) as f32;
        OwnAdvert {
            key: &keys.identity,
            noise_public: keys.noise_public(),
            link,
            p2p_addrs: p2p,
            jurisdiction: cfg.jurisdiction,
            roles: cfg.roles,
            family: cfg.family.clone(),
            capacity_mbps: cfg.capacity_mbps,
            load,
            state: switch.state.current().state,
            certificate: certificate.clone(),
            retiring: keys.noise.retiring(t1),
        }
        .sign(seq, expires)
    }
}
