//! The origin side: building circuits hop by hop, and the pool of circuits
//! that client streams share.
//!
//! Building is telescoping. The origin runs a Noise NK handshake with the
//! first hop inside CREATE/CREATED, then, for each further hop, sends the
//! current tip an EXTEND sealed with its session: the tip alone can read
//! which node comes next, so every relay learns only its two neighbours. The
//! session with the last hop — the exit — is the end-to-end session.

use crate::crypto::{self, Session};
use crate::endpoint::{CircuitError, Endpoint, Inbound, Side, StreamParts};
use crate::link::{LinkHandle, cell};
use crate::switch::Switch;
use bytes::{BufMut, BytesMut};
use ferry_proto::pb::{self, DestroyReason, EndReason};
use ferry_proto::{CellCmd, cell as cellfmt};
use ferry_router::{
    MeshView, NodeId, PathIndex, PathRequest, Resolved, RulingSet, Time, TrafficScope,
};
use prost::Message;
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

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

enum State {
    Building(mpsc::UnboundedSender<BuildEvent>),
    Open(Arc<Endpoint>),
    Closed,
}

/// A circuit this node originates.
pub struct OriginCircuit {
    link: Arc<LinkHandle>,
    circ: u32,
    state: Mutex<State>,
    /// The nodes on the circuit, origin side first.
    pub path: Vec<NodeId>,
}

impl OriginCircuit {
    /// Handles a cell for this circuit (called by the switch).
    pub(crate) fn on_cell(&self, cmd: CellCmd, buf: BytesMut) -> Result<(), CircuitError> {
        let st = self.state.lock().expect("state lock");
        match (&*st, cmd) {
            (State::Building(tx), CellCmd::Created) => {
                let _ = tx.send(BuildEvent::Created(buf));
            }
            (State::Building(tx), CellCmd::Control) => {
                let _ = tx.send(BuildEvent::Control(buf));
            }
            (State::Open(end), CellCmd::Relay) => {
                let end = end.clone();
                drop(st);
                end.on_relay(buf)?;
            }
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
                let _ = tx.send(BuildEvent::Destroyed(reason));
            }
            State::Open(end) => end.close(reason),
            State::Closed => {}
        }
    }

    fn endpoint(&self) -> Option<Arc<Endpoint>> {
        match &*self.state.lock().expect("state lock") {
            State::Open(e) if !e.is_closed() => Some(e.clone()),
            _ => None,
        }
    }
}

/// Why a stream could not be opened: maps to a SOCKS5 reply.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No path satisfies the constraints.
    #[error("{0}")]
    NoPath(#[from] ferry_router::NoPath),
    /// Building the circuit failed.
    #[error("circuit build failed: {0}")]
    Build(String),
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
}

impl Origin {
    /// An origin over this node's switch.
    pub fn new(switch: Arc<Switch>) -> Arc<Self> {
        Arc::new(Self {
            switch,
            rng: Mutex::new(StdRng::from_entropy()),
            pool: tokio::sync::Mutex::new(Vec::new()),
        })
    }

    fn view(&self) -> MeshView {
        let now = crate::authority::now_ms();
        MeshView::new(self.switch.directory.live(now).iter().map(|e| e.info()))
    }

    /// Opens a stream to `host:port` through the mesh; returns it connected.
    pub async fn open_stream(
        &self,
        host: &str,
        port: u16,
    ) -> Result<(Arc<Endpoint>, StreamParts), OpenError> {
        let end = self.circuit().await?;
        let mut parts = end
            .open_stream()
            .map_err(|e| OpenError::Build(e.to_string()))?;
        if end.send_begin(parts.id, host, port).await.is_err() {
            return Err(OpenError::Build("circuit closed".into()));
        }
        match tokio::time::timeout(OPEN_TIMEOUT, parts.inbound.recv()).await {
            Ok(Some(Inbound::Connected(_))) => Ok((end, parts)),
            Ok(Some(Inbound::End(reason, detail))) => Err(OpenError::Refused { reason, detail }),
            Ok(Some(Inbound::Data(_)) | None) => {
                Err(OpenError::Build("stream closed before it connected".into()))
            }
            Err(_) => {
                let _ = end
                    .send_end(parts.id, EndReason::Timeout, "origin gave up waiting")
                    .await;
                Err(OpenError::Refused {
                    reason: EndReason::Timeout,
                    detail: format!("the exit did not answer within {}s", OPEN_TIMEOUT.as_secs()),
                })
            }
        }
    }

    /// A circuit with room for one more stream, built if needed.
    async fn circuit(&self) -> Result<Arc<Endpoint>, OpenError> {
        let mut pool = self.pool.lock().await;
        pool.retain(|c| c.endpoint().is_some());
        let max = self.switch.cfg.max_streams_per_circuit as usize;
        if let Some(end) = pool
            .iter()
            .filter_map(|c| c.endpoint())
            .find(|e| e.stream_count() < max)
        {
            return Ok(end);
        }
        let oc = self.build().await?;
        let end = oc
            .endpoint()
            .ok_or_else(|| OpenError::Build("circuit closed".into()))?;
        pool.push(oc);
        Ok(end)
    }

    /// Builds a new circuit along a fresh path.
    pub async fn build(&self) -> Result<Arc<OriginCircuit>, OpenError> {
        let req = PathRequest {
            origin: Some(self.switch.keys.node_id()),
        };
        let constraints = Resolved::defaults(self.switch.cfg.hops);
        // Rulings and per-connection constraints reach the data plane with
        // the routing issue; until then the index holds every configured peer.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let index = PathIndex::build(
            &self.view(),
            &RulingSet::new(),
            &TrafficScope::default(),
            Time(now),
        );
        let path = {
            let mut rng = self.rng.lock().expect("rng lock");
            index
                .pick(&constraints, &req, &mut *rng)?
                .as_slice()
                .to_vec()
        };
        let first = path[0];
        let link = self
            .switch
            .link_to(first)
            .await
            .map_err(|e| OpenError::Build(format!("{e:#}")))?;
        let circ = link.alloc_circ_id();
        let (tx, rx) = mpsc::unbounded_channel();
        let oc = Arc::new(OriginCircuit {
            link: link.clone(),
            circ,
            state: Mutex::new(State::Building(tx)),
            path: path.clone(),
        });
        self.switch.add_origin(&link, circ, oc.clone());
        let timeout = self.switch.cfg.build_timeout;
        match tokio::time::timeout(timeout, self.handshake_path(&link, circ, &path, rx)).await {
            Ok(Ok(session)) => {
                let end = Endpoint::new(
                    link.clone(),
                    circ,
                    session,
                    Side::Origin,
                    self.switch.cfg.stream_window,
                );
                let mut st = oc.state.lock().expect("state lock");
                if matches!(*st, State::Closed) {
                    return Err(OpenError::Build("circuit destroyed while building".into()));
                }
                *st = State::Open(end);
                drop(st);
                let names: Vec<String> = path
                    .iter()
                    .map(|id| {
                        self.switch
                            .peer(id)
                            .map(|p| p.jurisdiction.to_string())
                            .unwrap_or_default()
                    })
                    .collect();
                info!(circ, path = %names.join(" -> "), "circuit built");
                Ok(oc)
            }
            Ok(Err(e)) => {
                self.switch.destroy(&link, circ, DestroyReason::BuildFailed);
                Err(e)
            }
            Err(_) => {
                self.switch.destroy(&link, circ, DestroyReason::BuildFailed);
                Err(OpenError::Build(format!(
                    "no answer within {}s",
                    timeout.as_secs()
                )))
            }
        }
    }

    async fn handshake_path(
        &self,
        link: &LinkHandle,
        circ: u32,
        path: &[NodeId],
        mut rx: mpsc::UnboundedReceiver<BuildEvent>,
    ) -> Result<Session, OpenError> {
        let key = |id: &NodeId| {
            self.switch
                .peer(id)
                .map(|p| p.noise_key)
                .ok_or_else(|| OpenError::Build(format!("unknown node {id}")))
        };
        let err = |e: crypto::CryptoError| OpenError::Build(e.to_string());
        let mut hs = crypto::hop_initiator(&key(&path[0])?).map_err(err)?;
        let m1 = crypto::write_hs(&mut hs).map_err(err)?;
        link.send(cell(circ, CellCmd::Create, &m1))
            .await
            .map_err(|_| OpenError::Build("link closed".into()))?;
        let m2 = match rx.recv().await {
            Some(BuildEvent::Created(mut b)) => b.split_off(cellfmt::HEADER_LEN),
            other => return Err(build_failure(path[0], other)),
        };
        crypto::read_hs(&mut hs, &m2).map_err(err)?;
        let mut session = Session::from_handshake(hs).map_err(err)?;
        for next in &path[1..] {
            let mut hs = crypto::hop_initiator(&key(next)?).map_err(err)?;
            let m1 = crypto::write_hs(&mut hs).map_err(err)?;
            let ctl = pb::Control {
                msg: Some(pb::control::Msg::Extend(pb::Extend {
                    node_id: next.0.to_vec(),
                    handshake: m1,
                })),
            };
            let mut buf = BytesMut::new();
            buf.put_slice(&cellfmt::header(circ, CellCmd::Control));
            buf.put_slice(&ctl.encode_to_vec());
            session
                .tx
                .seal_tail_bytes(&mut buf, cellfmt::HEADER_LEN)
                .map_err(err)?;
            link.send(buf)
                .await
                .map_err(|_| OpenError::Build("link closed".into()))?;
            let mut reply = match rx.recv().await {
                Some(BuildEvent::Control(b)) => b,
                other => return Err(build_failure(*next, other)),
            };
            let body = &mut reply[cellfmt::HEADER_LEN..];
            let n = session.rx.open_in_place(body).map_err(err)?;
            let reply: pb::ControlReply = ferry_proto::decode_pb("control reply", &body[..n])
                .map_err(|e| OpenError::Build(e.to_string()))?;
            match reply.msg {
                Some(pb::control_reply::Msg::Extended(ext)) => {
                    crypto::read_hs(&mut hs, &ext.handshake).map_err(err)?;
                    session = Session::from_handshake(hs).map_err(err)?;
                    debug!(circ, hop = %next.short(), "extended");
                }
                Some(pb::control_reply::Msg::ExtendFailed(f)) => {
                    return Err(OpenError::Build(format!(
                        "extending to {next} failed: {} {}",
                        f.reason().as_str_name(),
                        f.detail
                    )));
                }
                None => return Err(OpenError::Build("empty control reply".into())),
            }
        }
        Ok(session)
    }

    /// Closes every circuit.
    pub async fn close_all(&self) {
        for c in self.pool.lock().await.drain(..) {
            self.switch
                .destroy(&c.link, c.circ, DestroyReason::Finished);
        }
    }
}

fn build_failure(hop: NodeId, ev: Option<BuildEvent>) -> OpenError {
    let why = match ev {
        Some(BuildEvent::Destroyed(r)) => {
            format!("hop {hop} destroyed the circuit: {}", r.as_str_name())
        }
        Some(other) => format!("hop {hop} answered out of turn: {other:?}"),
        None => format!("hop {hop}: circuit closed"),
    };
    warn!(%why, "circuit build failed");
    OpenError::Build(why)
}
