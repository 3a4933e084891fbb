//! One end of a circuit's end-to-end session: the origin's, or the tip
//! hop's (the exit, once the circuit is complete).
//!
//! Streams are multiplexed on the session with per-stream flow control. A
//! sender may have at most the receiver's announced window unacknowledged;
//! the receiver acknowledges (WINDOW) only what it has written to its socket,
//! so a slow reader stalls its own stream's sender and nothing else, and no
//! node ever buffers more than the window per stream. A peer that sends past
//! the window breaks the protocol and loses the circuit.

use crate::crypto::{CryptoError, Opener, Sealer, Session};
use crate::link::LinkHandle;
use crate::policy::{ExitPolicy, Verdict};
use bytes::{BufMut, BytesMut};
use ferry_proto::pb::{self, DestroyReason, EndReason};
use ferry_proto::stream::{self as smsg, StreamKind, StreamMsg};
use ferry_proto::{CellCmd, MAX_STREAM_DATA, cell};
use prost::Message;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span};

/// Bytes in front of a stream message in its cell: cell header, stream header.
const HEADROOM: usize = cell::HEADER_LEN + smsg::HEADER_LEN;
/// Most streams the exit side accepts on one circuit.
pub const MAX_STREAMS_PER_CIRCUIT: usize = 1024;

/// What an exit needs to open streams.
#[derive(Debug)]
pub struct ExitCtx {
    /// Which targets are allowed.
    pub policy: ExitPolicy,
    /// Time allowed per connect.
    pub connect_timeout: Duration,
    /// Our receive window per stream.
    pub window: u32,
}

/// Which end this is.
pub enum Side {
    /// The circuit's origin: receives CONNECTED, sends BEGIN.
    Origin,
    /// The tip hop: receives BEGIN, and connects if it is an exit.
    Exit(Option<Arc<ExitCtx>>),
}

/// A circuit-level protocol violation.
#[derive(Debug, thiserror::Error)]
pub enum CircuitError {
    /// A record did not authenticate.
    #[error("end-to-end record: {0}")]
    Crypto(#[from] CryptoError),
    /// A message did not decode.
    #[error("stream message: {0}")]
    Decode(#[from] ferry_proto::DecodeError),
    /// A message broke the stream rules.
    #[error("{0}")]
    Protocol(String),
    /// The circuit is closed.
    #[error("circuit closed")]
    Closed,
}

/// What the stream's writer gets from the circuit.
#[derive(Debug)]
pub enum Inbound {
    /// The exit connected (origin side); the exit's window.
    Connected(u32),
    /// Payload, to write to the socket.
    Data(BytesMut),
    /// The peer ended the stream.
    End(EndReason, String),
}

/// Send credit of one stream: bytes the peer will still accept.
#[derive(Debug, Default)]
pub struct Credit {
    avail: Mutex<u64>,
    closed: AtomicBool,
    notify: Notify,
}

impl Credit {
    fn add(&self, n: u64) {
        *self.avail.lock().expect("credit lock") += n;
        self.notify.notify_one();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// Waits until `n` bytes of credit are there, and takes them.
    async fn acquire(&self, n: u64) -> Result<(), CircuitError> {
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(CircuitError::Closed);
            }
            {
                let mut a = self.avail.lock().expect("credit lock");
                if *a >= n {
                    *a -= n;
                    return Ok(());
                }
            }
            // One waiter per credit: notify_one stores a permit if we are not
            // waiting yet, so no wake-up is lost between the check and here.
            self.notify.notified().await;
        }
    }
}

struct StreamSlot {
    inbound: mpsc::UnboundedSender<Inbound>,
    credit: Arc<Credit>,
    /// Bytes received and not yet acknowledged; bounded by our window.
    unacked: Arc<AtomicU64>,
}

/// What a new stream's tasks hold.
pub struct StreamParts {
    /// The stream id.
    pub id: u32,
    /// What arrives for it.
    pub inbound: mpsc::UnboundedReceiver<Inbound>,
    /// Its send credit.
    pub credit: Arc<Credit>,
    /// Its received-unacknowledged count.
    pub unacked: Arc<AtomicU64>,
}

struct Tx {
    sealer: Sealer,
}

struct Rx {
    opener: Opener,
    streams: HashMap<u32, StreamSlot>,
}

/// One end of an end-to-end session.
pub struct Endpoint {
    link: Arc<LinkHandle>,
    circ: u32,
    side: Side,
    window: u32,
    tx: tokio::sync::Mutex<Tx>,
    rx: Mutex<Rx>,
    closed: CancellationToken,
    next_stream: AtomicU32,
}

impl Endpoint {
    /// An endpoint over `link`/`circ` with a finished session.
    pub fn new(
        link: Arc<LinkHandle>,
        circ: u32,
        session: Session,
        side: Side,
        window: u32,
    ) -> Arc<Self> {
        Arc::new(Self {
            link,
            circ,
            side,
            window,
            tx: tokio::sync::Mutex::new(Tx { sealer: session.tx }),
            rx: Mutex::new(Rx {
                opener: session.rx,
                streams: HashMap::new(),
            }),
            closed: CancellationToken::new(),
            next_stream: AtomicU32::new(1),
        })
    }

    /// Whether the circuit under it is gone.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled() || self.link.is_closed()
    }

    /// Open streams.
    pub fn stream_count(&self) -> usize {
        self.rx.lock().expect("rx lock").streams.len()
    }

    /// Ends every stream; the switch has forgotten the circuit.
    pub fn close(&self, reason: DestroyReason) {
        self.closed.cancel();
        let streams: Vec<StreamSlot> = self
            .rx
            .lock()
            .expect("rx lock")
            .streams
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in streams {
            let _ = s.inbound.send(Inbound::End(
                EndReason::CircuitClosed,
                format!("circuit closed: {}", reason.as_str_name()),
            ));
            s.credit.close();
        }
    }

    /// Seals `buf[cell::HEADER_LEN..]` end to end and sends it as a cell.
    /// `buf` starts with room for the cell header.
    async fn send_sealed(&self, cmd: CellCmd, mut buf: BytesMut) -> Result<(), CircuitError> {
        if self.is_closed() {
            return Err(CircuitError::Closed);
        }
        buf[..cell::HEADER_LEN].copy_from_slice(&cell::header(self.circ, cmd));
        let mut tx = self.tx.lock().await;
        tx.sealer.seal_tail_bytes(&mut buf, cell::HEADER_LEN)?;
        // Sent under the lock, so records leave in nonce order.
        self.link.send(buf).await.map_err(|_| CircuitError::Closed)
    }

    /// Sends a control reply (sealed for the origin).
    pub async fn send_control(&self, body: &[u8]) -> Result<(), CircuitError> {
        let mut buf = BytesMut::with_capacity(cell::HEADER_LEN + body.len() + 16);
        buf.put_bytes(0, cell::HEADER_LEN);
        buf.put_slice(body);
        self.send_sealed(CellCmd::Control, buf).await
    }

    /// Sends a small stream message.
    async fn send_msg(&self, kind: StreamKind, id: u32, body: &[u8]) -> Result<(), CircuitError> {
        let mut buf = BytesMut::with_capacity(HEADROOM + body.len() + 16);
        buf.put_bytes(0, cell::HEADER_LEN);
        buf.put_slice(&smsg::header(kind, id));
        buf.put_slice(body);
        self.send_sealed(CellCmd::Relay, buf).await
    }

    /// Sends END for a stream.
    pub async fn send_end(
        &self,
        id: u32,
        reason: EndReason,
        detail: &str,
    ) -> Result<(), CircuitError> {
        let body = pb::End {
            reason: reason as i32,
            detail: detail.to_string(),
        }
        .encode_to_vec();
        self.send_msg(StreamKind::End, id, &body).await
    }

    /// Sends BEGIN for a new stream (origin side).
    pub async fn send_begin(&self, id: u32, host: &str, port: u16) -> Result<(), CircuitError> {
        let body = pb::Begin {
            host: host.to_string(),
            port: port.into(),
            window: self.window,
        }
        .encode_to_vec();
        self.send_msg(StreamKind::Begin, id, &body).await
    }

    fn register(&self, id: u32, initial_credit: u64) -> Result<StreamParts, CircuitError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let credit = Arc::new(Credit::default());
        credit.add(initial_credit);
        let unacked = Arc::new(AtomicU64::new(0));
        let mut r = self.rx.lock().expect("rx lock");
        if r.streams.contains_key(&id) {
            return Err(CircuitError::Protocol(format!("stream {id} opened twice")));
        }
        if r.streams.len() >= MAX_STREAMS_PER_CIRCUIT {
            return Err(CircuitError::Protocol(
                "too many streams on one circuit".into(),
            ));
        }
        r.streams.insert(
            id,
            StreamSlot {
                inbound: tx,
                credit: credit.clone(),
                unacked: unacked.clone(),
            },
        );
        Ok(StreamParts {
            id,
            inbound: rx,
            credit,
            unacked,
        })
    }

    /// Registers a new stream opened by this (origin) side.
    pub fn open_stream(&self) -> Result<StreamParts, CircuitError> {
        if self.is_closed() {
            return Err(CircuitError::Closed);
        }
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        // Credit arrives with CONNECTED, carrying the exit's window.
        self.register(id, 0)
    }

    fn forget_stream(&self, id: u32) {
        self.rx.lock().expect("rx lock").streams.remove(&id);
    }

    /// Opens a CONTROL cell from the origin; returns an EXTEND to act on.
    pub fn on_control(&self, mut buf: BytesMut) -> Result<Option<pb::Extend>, CircuitError> {
        let body = &mut buf[cell::HEADER_LEN..];
        let n = self
            .rx
            .lock()
            .expect("rx lock")
            .opener
            .open_in_place(body)?;
        let ctl: pb::Control = ferry_proto::decode_pb("control", &body[..n])?;
        match ctl.msg {
            Some(pb::control::Msg::Extend(e)) => Ok(Some(e)),
            None => Err(CircuitError::Protocol("empty control message".into())),
        }
    }

    /// Opens a RELAY cell and dispatches its stream message.
    pub fn on_relay(self: &Arc<Self>, mut buf: BytesMut) -> Result<(), CircuitError> {
        let mut r = self.rx.lock().expect("rx lock");
        let n = r.opener.open_in_place(&mut buf[cell::HEADER_LEN..])?;
        buf.truncate(cell::HEADER_LEN + n);
        let msg = StreamMsg::parse(&buf[cell::HEADER_LEN..])?;
        let (kind, id) = (msg.kind, msg.stream_id);
        match kind {
            StreamKind::Begin => {
                let Side::Exit(exit) = &self.side else {
                    return Err(CircuitError::Protocol("BEGIN sent to the origin".into()));
                };
                let begin: pb::Begin = ferry_proto::decode_pb("begin", msg.body)?;
                drop(r);
                let parts = self.register(id, u64::from(begin.window))?;
                let me = self.clone();
                let exit = exit.clone();
                let span = info_span!("stream", circ = self.circ, stream = id);
                tokio::spawn(
                    async move { me.exit_stream(exit, begin, parts).await }.instrument(span),
                );
            }
            StreamKind::Connected => {
                if !matches!(self.side, Side::Origin) {
                    return Err(CircuitError::Protocol("CONNECTED sent to the exit".into()));
                }
                let c: pb::Connected = ferry_proto::decode_pb("connected", msg.body)?;
                if let Some(s) = r.streams.get(&id) {
                    s.credit.add(u64::from(c.window));
                    let _ = s.inbound.send(Inbound::Connected(c.window));
                }
            }
            StreamKind::Data => {
                if let Some(s) = r.streams.get(&id) {
                    let len = msg.body.len() as u64;
                    let held = s.unacked.fetch_add(len, Ordering::AcqRel) + len;
                    if held > u64::from(self.window) {
                        return Err(CircuitError::Protocol(format!(
                            "stream {id} sent {held} bytes against a window of {}",
                            self.window
                        )));
                    }
                    let _ = buf.split_to(HEADROOM);
                    let _ = s.inbound.send(Inbound::Data(buf));
                }
            }
            StreamKind::Window => {
                let credit = msg.window_credit()?;
                if let Some(s) = r.streams.get(&id) {
                    s.credit.add(u64::from(credit));
                }
            }
            StreamKind::End => {
                let end: pb::End = ferry_proto::decode_pb("end", msg.body)?;
                if let Some(s) = r.streams.get(&id) {
                    let _ = s.inbound.send(Inbound::End(end.reason(), end.detail));
                }
            }
        }
        Ok(())
    }

    async fn exit_stream(
        self: Arc<Self>,
        exit: Option<Arc<ExitCtx>>,
        begin: pb::Begin,
        parts: StreamParts,
    ) {
        let id = parts.id;
        let Some(exit) = exit else {
            let _ = self
                .send_end(id, EndReason::Policy, "this node is not an exit")
                .await;
            return self.forget_stream(id);
        };
        let sock = match connect_target(&exit, &begin).await {
            Ok(s) => s,
            Err((reason, detail)) => {
                tracing::info!(reason = reason.as_str_name(), %detail, "stream refused at exit");
                let _ = self.send_end(id, reason, &detail).await;
                return self.forget_stream(id);
            }
        };
        let body = pb::Connected {
            window: self.window,
        }
        .encode_to_vec();
        if self
            .send_msg(StreamKind::Connected, id, &body)
            .await
            .is_err()
        {
            return self.forget_stream(id);
        }
        self.run_stream(sock, parts).await;
    }

    /// Carries a connected stream both ways until both directions end.
    pub async fn run_stream(self: Arc<Self>, sock: TcpStream, parts: StreamParts) {
        let StreamParts {
            id,
            inbound,
            credit,
            unacked,
        } = parts;
        let (r, w) = sock.into_split();
        let stop = self.closed.child_token();
        let up = self.clone().pump_up(id, r, credit, stop.clone());
        let down = self
            .clone()
            .pump_down(id, w, inbound, unacked, stop.clone());
        tokio::join!(up, down);
        self.forget_stream(id);
        debug!(stream = id, "stream closed");
    }

    /// Socket → circuit.
    async fn pump_up(
        self: Arc<Self>,
        id: u32,
        mut r: tokio::net::tcp::OwnedReadHalf,
        credit: Arc<Credit>,
        stop: CancellationToken,
    ) {
        let mut buf = BytesMut::with_capacity(4 * (HEADROOM + MAX_STREAM_DATA + 16));
        loop {
            buf.reserve(HEADROOM + MAX_STREAM_DATA + 16);
            buf.put_bytes(0, HEADROOM);
            let mut room = (&mut buf).limit(MAX_STREAM_DATA);
            let read = tokio::select! {
                r = r.read_buf(&mut room) => r,
                _ = stop.cancelled() => return,
            };
            let n = match read {
                Ok(0) => {
                    let _ = self.send_end(id, EndReason::Done, "").await;
                    return;
                }
                Ok(n) => n,
                Err(e) => {
                    debug!(error = %e, "stream read failed");
                    let _ = self
                        .send_end(id, EndReason::Reset, "connection reset")
                        .await;
                    stop.cancel();
                    return;
                }
            };
            tokio::select! {
                r = credit.acquire(n as u64) => if r.is_err() { return },
                _ = stop.cancelled() => return,
            }
            buf[cell::HEADER_LEN..HEADROOM].copy_from_slice(&smsg::header(StreamKind::Data, id));
            let rec = buf.split();
            if self.send_sealed(CellCmd::Relay, rec).await.is_err() {
                stop.cancel();
                return;
            }
        }
    }

    /// Circuit → socket.
    async fn pump_down(
        self: Arc<Self>,
        id: u32,
        mut w: tokio::net::tcp::OwnedWriteHalf,
        mut inbound: mpsc::UnboundedReceiver<Inbound>,
        unacked: Arc<AtomicU64>,
        stop: CancellationToken,
    ) {
        let threshold = u64::from(self.window / 4);
        let mut consumed = 0u64;
        loop {
            let m = tokio::select! {
                m = inbound.recv() => m,
                _ = stop.cancelled() => return,
            };
            match m {
                Some(Inbound::Data(b)) => {
                    let wrote = tokio::select! {
                        r = w.write_all(&b) => r,
                        _ = stop.cancelled() => return,
                    };
                    if let Err(e) = wrote {
                        debug!(error = %e, "stream write failed");
                        let _ = self
                            .send_end(id, EndReason::Reset, "connection reset")
                            .await;
                        stop.cancel();
                        return;
                    }
                    consumed += b.len() as u64;
                    if consumed >= threshold {
                        unacked.fetch_sub(consumed, Ordering::AcqRel);
                        let credit = (consumed as u32).to_be_bytes();
                        if self
                            .send_msg(StreamKind::Window, id, &credit)
                            .await
                            .is_err()
                        {
                            stop.cancel();
                            return;
                        }
                        consumed = 0;
                    }
                }
                Some(Inbound::Connected(_)) => {}
                Some(Inbound::End(EndReason::Done, _)) => {
                    let _ = w.shutdown().await;
                    return;
                }
                Some(Inbound::End(reason, detail)) => {
                    debug!(reason = reason.as_str_name(), %detail, "stream ended by peer");
                    stop.cancel();
                    return;
                }
                None => {
                    stop.cancel();
                    return;
                }
            }
        }
    }
}

/// Resolves and connects to a BEGIN's target under the exit policy.
async fn connect_target(
    exit: &ExitCtx,
    begin: &pb::Begin,
) -> Result<TcpStream, (EndReason, String)> {
    let port = u16::try_from(begin.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or((EndReason::HostUnreachable, "port out of range".to_string()))?;
    if begin.host.is_empty() || begin.host.len() > 255 {
        return Err((EndReason::HostUnreachable, "bad host name length".into()));
    }
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(
        exit.connect_timeout,
        tokio::net::lookup_host((begin.host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(_)) => return Err((EndReason::HostUnreachable, "name did not resolve".into())),
        Err(_) => return Err((EndReason::Timeout, "name resolution timed out".into())),
    };
    let mut refusals = Vec::new();
    let allowed: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| match exit.policy.check(*a) {
            Verdict::Allow => true,
            Verdict::Deny(why) => {
                refusals.push(why);
                false
            }
        })
        .collect();
    if allowed.is_empty() {
        let why = refusals
            .into_iter()
            .next()
            .unwrap_or_else(|| "name has no addresses".into());
        return Err((EndReason::Policy, format!("exit policy: {why}")));
    }
    let mut last = (
        EndReason::HostUnreachable,
        "no address answered".to_string(),
    );
    for a in allowed {
        match tokio::time::timeout(exit.connect_timeout, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = (io_reason(&e), e.kind().to_string()),
            Err(_) => last = (EndReason::Timeout, "connect timed out".into()),
        }
    }
    Err(last)
}

fn io_reason(e: &std::io::Error) -> EndReason {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => EndReason::ConnectionRefused,
        NetworkUnreachable => EndReason::NetworkUnreachable,
        HostUnreachable => EndReason::HostUnreachable,
        TimedOut => EndReason::Timeout,
        _ => EndReason::HostUnreachable,
    }
}
