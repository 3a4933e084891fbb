//! One end of a circuit's end-to-end session: the origin's, or the tip
//! hop's (the exit, once the circuit is complete).
//!
//! Streams are multiplexed on the session with per-stream flow control. A
//! sender may have at most the receiver's announced window unacknowledged;
//! the receiver acknowledges (WINDOW) only what it has written to its socket,
//! so a slow reader stalls its own stream's sender and nothing else, and no
//! node ever buffers more than the window per stream. A peer that sends past
//! the window breaks the protocol and loses the circuit.
//!
//! A stream ([`StreamCore`]) is not tied to one circuit. Every DATA message
//! carries the stream offset of its first byte and WINDOW carries the
//! absolute count consumed, so each sender keeps what it sent and the peer
//! has not consumed (at most the window) and can send it again. To move a
//! stream (make-before-break, when a relay drains), the origin builds a new
//! circuit to the same exit, attaches the stream there, and sends `Resume`
//! with the exit's secret token and how much it has received; the exit
//! attaches the stream to the new circuit, answers `Resumed` with how much
//! it has received, and each side resends from the other's count. Both
//! sides stop accepting the stream's messages from the old circuit at the
//! moment they switch, so bytes still in flight there are dropped and sent
//! again: none is lost, duplicated or reordered. A DATA offset below what
//! was received is trimmed; one above is a protocol error.

use crate::crypto::{CryptoError, Opener, Sealer, Session};
use crate::link::LinkHandle;
use crate::policy::{ExitPolicy, Verdict};
use bytes::{BufMut, BytesMut};
use ferry_proto::pb::{self, DestroyReason, EndReason};
use ferry_proto::stream::{self as smsg, StreamKind, StreamMsg};
use ferry_proto::{CellCmd, MAX_DATA_PAYLOAD, cell};
use prost::Message;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span};

/// Bytes in front of a DATA payload in its cell: cell header, stream
/// header, offset.
const HEADROOM: usize = cell::HEADER_LEN + smsg::HEADER_LEN + smsg::DATA_OFFSET_LEN;
/// Time the origin waits for `Resumed` when moving a stream.
const RESUME_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// Streams that can be moved here from another circuit.
    pub resumables: Arc<Resumables>,
    /// The node's metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// The exit's streams by resume token.
#[derive(Default)]
pub struct Resumables(Mutex<HashMap<[u8; 16], Weak<StreamCore>>>);

impl std::fmt::Debug for Resumables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|m| m.len()).unwrap_or(0);
        write!(f, "Resumables({n} streams)")
    }
}

impl Resumables {
    fn insert(&self, token: [u8; 16], core: &Arc<StreamCore>) {
        self.0
            .lock()
            .expect("resumables lock")
            .insert(token, Arc::downgrade(core));
    }

    fn remove(&self, token: &[u8; 16]) {
        self.0.lock().expect("resumables lock").remove(token);
    }

    fn get(&self, token: &[u8]) -> Option<Arc<StreamCore>> {
        let token: [u8; 16] = token.try_into().ok()?;
        self.0
            .lock()
            .expect("resumables lock")
            .get(&token)
            .and_then(Weak::upgrade)
    }
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
    /// The exit answered a move with "no such stream": the stream has
    /// ended there, so it can never move; the origin ends it too.
    #[error("the exit no longer has this stream")]
    UnknownStream,
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

/// A byte ring holding a stream's payload in `[acked, sent)`: one copy per
/// byte sent and no allocation in steady state. It grows (by doubling, rare)
/// up to the send window, which credit enforces: `sent - acked` never
/// exceeds it.
#[derive(Default)]
struct Ring {
    buf: Vec<u8>,
    head: usize,
    len: usize,
}

impl Ring {
    fn push(&mut self, data: &[u8]) {
        if self.len + data.len() > self.buf.len() {
            let cap = (self.len + data.len()).next_power_of_two().max(64 * 1024);
            let mut grown = vec![0u8; cap];
            self.copy_to(0, self.len, &mut grown[..self.len]);
            self.buf = grown;
            self.head = 0;
        }
        let cap = self.buf.len();
        let tail = (self.head + self.len) % cap;
        let first = data.len().min(cap - tail);
        self.buf[tail..tail + first].copy_from_slice(&data[..first]);
        self.buf[..data.len() - first].copy_from_slice(&data[first..]);
        self.len += data.len();
    }

    fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        if n > 0 {
            self.head = (self.head + n) % self.buf.len();
            self.len -= n;
        }
    }

    /// Copies bytes `[skip, skip + out.len())` of the ring into `out`.
    fn copy_to(&self, skip: usize, n: usize, out: &mut [u8]) {
        debug_assert!(skip + n <= self.len && out.len() == n);
        if n == 0 {
            return;
        }
        let cap = self.buf.len();
        let start = (self.head + skip) % cap;
        let first = n.min(cap - start);
        out[..first].copy_from_slice(&self.buf[start..start + first]);
        out[first..].copy_from_slice(&self.buf[..n - first]);
    }
}

/// What this side sent and the peer has not consumed yet.
#[derive(Default)]
struct TxState {
    /// Offset of the next byte to send.
    sent: u64,
    /// Bytes the peer has consumed (its absolute acknowledgement).
    acked: u64,
    /// Payload in `[acked, sent)`: what a move sends again.
    resend: Ring,
    /// The END this side sent, if it did.
    fin: Option<(EndReason, String)>,
}

/// Where a pending move hears back: `Resumed` (received, fin) or why not.
type ResumeReply = oneshot::Sender<Result<(u64, bool), CircuitError>>;

/// Where a stream lives now.
struct Attach {
    end: Arc<Endpoint>,
    id: u32,
}

/// One stream, independent of the circuit that carries it now.
pub struct StreamCore {
    attach: Mutex<Attach>,
    /// Serialises DATA/END sends and moves, so a move sees a settled `sent`.
    send_lock: tokio::sync::Mutex<()>,
    tx: Mutex<TxState>,
    credit: Credit,
    /// Our receive window.
    window: u32,
    /// Offset of the next byte expected from the peer.
    received: AtomicU64,
    /// Bytes written to our socket (what WINDOW acknowledges).
    consumed: AtomicU64,
    fin_received: AtomicBool,
    inbound: mpsc::UnboundedSender<Inbound>,
    /// The exit's resume token (learnt from CONNECTED at the origin).
    token: Mutex<[u8; 16]>,
    /// A move waiting for `Resumed`.
    resumed: Mutex<Option<ResumeReply>>,
    /// Bytes moved between circuits (for status).
    moves: AtomicU32,
}

impl StreamCore {
    fn new(
        end: &Arc<Endpoint>,
        id: u32,
        credit: u64,
        token: [u8; 16],
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Inbound>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let core = Arc::new(Self {
            attach: Mutex::new(Attach {
                end: end.clone(),
                id,
            }),
            send_lock: tokio::sync::Mutex::new(()),
            tx: Mutex::new(TxState::default()),
            credit: Credit::default(),
            window: end.window,
            received: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            fin_received: AtomicBool::new(false),
            inbound: tx,
            token: Mutex::new(token),
            resumed: Mutex::new(None),
            moves: AtomicU32::new(0),
        });
        // The peer's window, but never more than ours: what we keep for
        // resending is bounded by our own configuration, not by the peer.
        core.credit.add(credit.min(u64::from(end.window)));
        (core, rx)
    }

    /// The circuit and stream id carrying the stream now.
    fn current(&self) -> (Arc<Endpoint>, u32) {
        let a = self.attach.lock().expect("attach lock");
        (a.end.clone(), a.id)
    }

    /// Times the stream moved to another circuit.
    pub fn moves(&self) -> u32 {
        self.moves.load(Ordering::Relaxed)
    }

    fn on_ack(&self, ack: u64) -> Result<(), CircuitError> {
        let mut tx = self.tx.lock().expect("tx lock");
        if ack > tx.sent {
            return Err(CircuitError::Protocol(format!(
                "acknowledged {ack} bytes of {} sent",
                tx.sent
            )));
        }
        if ack > tx.acked {
            self.credit.add(ack - tx.acked);
            let n = (ack - tx.acked) as usize;
            tx.resend.consume(n);
            tx.acked = ack;
        }
        Ok(())
    }

    /// Sends one DATA record: `buf` is `HEADROOM` bytes, then the payload.
    async fn send_data(&self, mut buf: BytesMut) -> Result<(), CircuitError> {
        let _order = self.send_lock.lock().await;
        let off = {
            let mut tx = self.tx.lock().expect("tx lock");
            let off = tx.sent;
            tx.resend.push(&buf[HEADROOM..]);
            tx.sent += (buf.len() - HEADROOM) as u64;
            off
        };
        let (end, id) = self.current();
        buf[cell::HEADER_LEN..cell::HEADER_LEN + smsg::HEADER_LEN]
            .copy_from_slice(&smsg::header(StreamKind::Data, id));
        buf[HEADROOM - smsg::DATA_OFFSET_LEN..HEADROOM].copy_from_slice(&off.to_be_bytes());
        end.send_sealed(CellCmd::Relay, buf).await
    }

    /// Sends END (and remembers it, to send again after a move).
    pub async fn send_end(&self, reason: EndReason, detail: &str) -> Result<(), CircuitError> {
        let _order = self.send_lock.lock().await;
        self.tx.lock().expect("tx lock").fin = Some((reason, detail.to_string()));
        let (end, id) = self.current();
        end.send_end(id, reason, detail).await
    }

    async fn send_ack(&self) -> Result<(), CircuitError> {
        let (end, id) = self.current();
        let ack = self.consumed.load(Ordering::Acquire).to_be_bytes();
        end.send_msg(StreamKind::Window, id, &ack).await
    }

    /// Sends what the peer has not received, from offset `from`, on the
    /// circuit the stream is attached to; then END if the peer lacks it.
    async fn resend(&self, from: u64, peer_fin: bool) -> Result<(), CircuitError> {
        let (end, id) = self.current();
        let mut off = from;
        loop {
            // One record at a time, copied out under the lock.
            let (buf, fin) = {
                let tx = self.tx.lock().expect("tx lock");
                if off < tx.acked || off > tx.sent {
                    return Err(CircuitError::Protocol(format!(
                        "peer resumes at {off}, outside [{}, {}]",
                        tx.acked, tx.sent
                    )));
                }
                let n = ((tx.sent - off) as usize).min(MAX_DATA_PAYLOAD);
                if n == 0 {
                    (None, tx.fin.clone())
                } else {
                    let mut buf = BytesMut::with_capacity(HEADROOM + n + 16);
                    buf.put_bytes(0, cell::HEADER_LEN);
                    buf.put_slice(&smsg::header(StreamKind::Data, id));
                    buf.put_slice(&off.to_be_bytes());
                    buf.put_bytes(0, n);
                    tx.resend
                        .copy_to((off - tx.acked) as usize, n, &mut buf[HEADROOM..]);
                    off += n as u64;
                    (Some(buf), None)
                }
            };
            match buf {
                Some(b) => end.send_sealed(CellCmd::Relay, b).await?,
                None => {
                    if let (false, Some((reason, detail))) = (peer_fin, fin) {
                        end.send_end(id, reason, &detail).await?;
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Origin side: moves the stream onto `new` (a circuit to the same
    /// exit). On failure the stream stays where it was, if that circuit is
    /// still open.
    pub async fn move_to(self: &Arc<Self>, new: &Arc<Endpoint>) -> Result<(), CircuitError> {
        let _order = self.send_lock.lock().await;
        let (old, old_id) = self.current();
        match self.resume_on(new).await {
            Ok(()) => {
                self.moves.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(CircuitError::UnknownStream) => {
                // Gone at the exit: no circuit can carry it again.
                Endpoint::forget(self);
                self.circuit_closed(
                    EndReason::UnknownStream,
                    "the exit no longer has this stream".into(),
                );
                Err(CircuitError::UnknownStream)
            }
            Err(e) => {
                if !old.is_closed() && self.resume_on(&old).await.is_ok() {
                    debug!(stream = old_id, "move failed; stream stays on its circuit");
                }
                Err(e)
            }
        }
    }

    /// Attaches to `new`, sends `Resume`, waits for `Resumed`, resends.
    /// Called with `send_lock` held.
    async fn resume_on(self: &Arc<Self>, new: &Arc<Endpoint>) -> Result<(), CircuitError> {
        let (old, old_id) = self.current();
        let new_id = new.next_stream.fetch_add(1, Ordering::Relaxed);
        new.register(new_id, self.clone())?;
        // From here the old circuit's messages for this stream are dropped,
        // so `received` is final for it.
        old.forget_stream(old_id);
        *self.attach.lock().expect("attach lock") = Attach {
            end: new.clone(),
            id: new_id,
        };
        let (tx, rx) = oneshot::channel();
        *self.resumed.lock().expect("resumed lock") = Some(tx);
        let body = pb::Resume {
            token: self.token.lock().expect("token lock").to_vec(),
            received: self.received.load(Ordering::Acquire),
            fin: self.fin_received.load(Ordering::Acquire),
        }
        .encode_to_vec();
        new.send_msg(StreamKind::Resume, new_id, &body).await?;
        let answer = tokio::time::timeout(RESUME_TIMEOUT, rx).await;
        let (peer_received, peer_fin) = match answer {
            Ok(Ok(Ok(r))) => r,
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Err(_)) => return Err(CircuitError::Closed),
            Err(_) => {
                return Err(CircuitError::Protocol(format!(
                    "no answer to resume within {}s",
                    RESUME_TIMEOUT.as_secs()
                )));
            }
        };
        self.resend(peer_received, peer_fin).await?;
        self.send_ack().await
    }

    /// Exit side: the origin moved the stream onto `new` as `new_id`.
    async fn accept_move(
        self: Arc<Self>,
        new: Arc<Endpoint>,
        new_id: u32,
        resume: pb::Resume,
    ) -> Result<(), CircuitError> {
        let _order = self.send_lock.lock().await;
        let (old, old_id) = self.current();
        new.register(new_id, self.clone())?;
        old.forget_stream(old_id);
        *self.attach.lock().expect("attach lock") = Attach {
            end: new.clone(),
            id: new_id,
        };
        let body = pb::Resumed {
            received: self.received.load(Ordering::Acquire),
            fin: self.fin_received.load(Ordering::Acquire),
        }
        .encode_to_vec();
        new.send_msg(StreamKind::Resumed, new_id, &body).await?;
        self.resend(resume.received, resume.fin).await?;
        self.send_ack().await?;
        self.moves.fetch_add(1, Ordering::Relaxed);
        debug!(stream = new_id, "stream moved onto this circuit");
        Ok(())
    }

    /// The circuit under the stream closed: end it locally.
    fn circuit_closed(&self, reason: EndReason, detail: String) {
        if let Some(w) = self.resumed.lock().expect("resumed lock").take() {
            let _ = w.send(Err(CircuitError::Protocol(detail)));
            return;
        }
        let _ = self.inbound.send(Inbound::End(reason, detail));
        self.credit.close();
    }
}

/// What a new stream's tasks hold.
pub struct StreamParts {
    /// The stream.
    pub core: Arc<StreamCore>,
    /// What arrives for it.
    pub inbound: mpsc::UnboundedReceiver<Inbound>,
}

impl StreamParts {
    /// Records the short ids of the stream's circuit (as first attached)
    /// and of the stream on it in `span` (declared with `circ` and
    /// `stream` fields).
    pub fn record_ids(&self, span: &tracing::Span) {
        let (end, id) = self.core.current();
        span.record("circ", end.circ);
        span.record("stream", id);
    }
}

struct Tx {
    sealer: Sealer,
}

struct Rx {
    opener: Opener,
    streams: HashMap<u32, Arc<StreamCore>>,
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

/// The stream end reason and text for a circuit destroyed for `reason`.
pub fn closed_reason(reason: DestroyReason) -> (EndReason, String) {
    match reason {
        DestroyReason::Exited => (
            EndReason::ExitLeft,
            "a node on the circuit reached its exit date (jurisdiction ruling or operator drain)"
                .into(),
        ),
        DestroyReason::Draining => (
            EndReason::ExitLeft,
            "a node on the circuit is draining and the stream could not move".into(),
        ),
        r => (
            EndReason::CircuitClosed,
            format!("circuit closed: {}", r.as_str_name()),
        ),
    }
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

    /// The streams attached here.
    pub fn streams(&self) -> Vec<Arc<StreamCore>> {
        self.rx
            .lock()
            .expect("rx lock")
            .streams
            .values()
            .cloned()
            .collect()
    }

    /// Ends every stream attached here; the switch has forgotten the circuit.
    pub fn close(&self, reason: DestroyReason) {
        self.closed.cancel();
        let streams: Vec<Arc<StreamCore>> = self
            .rx
            .lock()
            .expect("rx lock")
            .streams
            .drain()
            .map(|(_, s)| s)
            .collect();
        let (why, detail) = closed_reason(reason);
        for s in streams {
            s.circuit_closed(why, detail.clone());
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
        let mut buf =
            BytesMut::with_capacity(cell::HEADER_LEN + smsg::HEADER_LEN + body.len() + 16);
        buf.put_bytes(0, cell::HEADER_LEN);
        buf.put_slice(&smsg::header(kind, id));
        buf.put_slice(body);
        self.send_sealed(CellCmd::Relay, buf).await
    }

    /// Sends END for a stream id on this circuit.
    async fn send_end(&self, id: u32, reason: EndReason, detail: &str) -> Result<(), CircuitError> {
        let body = pb::End {
            reason: reason as i32,
            detail: detail.to_string(),
        }
        .encode_to_vec();
        self.send_msg(StreamKind::End, id, &body).await
    }

    fn register(&self, id: u32, core: Arc<StreamCore>) -> Result<(), CircuitError> {
        let mut r = self.rx.lock().expect("rx lock");
        if r.streams.contains_key(&id) {
            return Err(CircuitError::Protocol(format!("stream {id} opened twice")));
        }
        if r.streams.len() >= MAX_STREAMS_PER_CIRCUIT {
            return Err(CircuitError::Protocol(
                "too many streams on one circuit".into(),
            ));
        }
        r.streams.insert(id, core);
        Ok(())
    }

    /// Opens a stream to `host:port` from this (origin) side: registers it
    /// and sends BEGIN. CONNECTED or END arrives on the parts' inbound.
    pub async fn begin(
        self: &Arc<Self>,
        host: &str,
        port: u16,
    ) -> Result<StreamParts, CircuitError> {
        if self.is_closed() {
            return Err(CircuitError::Closed);
        }
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        // Credit arrives with CONNECTED, carrying the exit's window.
        let (core, inbound) = StreamCore::new(self, id, 0, [0; 16]);
        self.register(id, core.clone())?;
        let body = pb::Begin {
            host: host.to_string(),
            port: port.into(),
            window: self.window,
        }
        .encode_to_vec();
        if let Err(e) = self.send_msg(StreamKind::Begin, id, &body).await {
            self.forget_stream(id);
            return Err(e);
        }
        Ok(StreamParts { core, inbound })
    }

    fn forget_stream(&self, id: u32) {
        self.rx.lock().expect("rx lock").streams.remove(&id);
    }

    /// Forgets a stream wherever it is attached now.
    pub(crate) fn forget(core: &StreamCore) {
        let (end, id) = core.current();
        let mut r = end.rx.lock().expect("rx lock");
        if r.streams.get(&id).is_some_and(|s| std::ptr::eq(&**s, core)) {
            r.streams.remove(&id);
        }
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
                let token: [u8; 16] = rand::random();
                let (core, inbound) = StreamCore::new(self, id, u64::from(begin.window), token);
                if let Err(e) = self.register(id, core.clone()) {
                    if let Some(x) = exit {
                        x.metrics.refusals.with_label_values(&["capacity"]).inc();
                    }
                    return Err(e);
                }
                let me = self.clone();
                let exit = exit.clone();
                let span = info_span!("stream", circ = self.circ, stream = id);
                tokio::spawn(
                    async move {
                        me.exit_stream(exit, begin, StreamParts { core, inbound })
                            .await
                    }
                    .instrument(span),
                );
            }
            StreamKind::Resume => {
                let Side::Exit(exit) = &self.side else {
                    return Err(CircuitError::Protocol("RESUME sent to the origin".into()));
                };
                let resume: pb::Resume = ferry_proto::decode_pb("resume", msg.body)?;
                drop(r);
                let core = exit.as_ref().and_then(|x| x.resumables.get(&resume.token));
                let me = self.clone();
                let span = info_span!("stream", circ = self.circ, stream = id);
                tokio::spawn(
                    async move {
                        let Some(core) = core else {
                            info!(reason = "unknown resume token", "stream move refused");
                            let _ = me
                                .send_end(
                                    id,
                                    EndReason::UnknownStream,
                                    "no such stream at this exit",
                                )
                                .await;
                            return;
                        };
                        if let Err(e) = core.accept_move(me, id, resume).await {
                            info!(error = %e, "stream move failed");
                        }
                    }
                    .instrument(span),
                );
            }
            StreamKind::Connected => {
                if !matches!(self.side, Side::Origin) {
                    return Err(CircuitError::Protocol("CONNECTED sent to the exit".into()));
                }
                let c: pb::Connected = ferry_proto::decode_pb("connected", msg.body)?;
                if let Some(s) = r.streams.get(&id) {
                    if let Ok(t) = <[u8; 16]>::try_from(c.resume_token.as_slice()) {
                        *s.token.lock().expect("token lock") = t;
                    }
                    s.credit.add(u64::from(c.window.min(self.window)));
                    let _ = s.inbound.send(Inbound::Connected(c.window));
                }
            }
            StreamKind::Resumed => {
                if !matches!(self.side, Side::Origin) {
                    return Err(CircuitError::Protocol("RESUMED sent to the exit".into()));
                }
                let m: pb::Resumed = ferry_proto::decode_pb("resumed", msg.body)?;
                if let Some(s) = r.streams.get(&id)
                    && let Some(w) = s.resumed.lock().expect("resumed lock").take()
                {
                    let _ = w.send(Ok((m.received, m.fin)));
                }
            }
            StreamKind::Data => {
                let (off, payload) = msg.data()?;
                let len = payload.len() as u64;
                if let Some(s) = r.streams.get(&id) {
                    let expect = s.received.load(Ordering::Acquire);
                    if off > expect {
                        return Err(CircuitError::Protocol(format!(
                            "stream {id}: data at offset {off}, expected {expect}"
                        )));
                    }
                    let skip = expect - off;
                    if skip >= len {
                        return Ok(());
                    }
                    let end = off + len;
                    let held = end - s.consumed.load(Ordering::Acquire);
                    if held > u64::from(self.window) {
                        return Err(CircuitError::Protocol(format!(
                            "stream {id} sent {held} bytes against a window of {}",
                            self.window
                        )));
                    }
                    s.received.store(end, Ordering::Release);
                    let _ = buf.split_to(HEADROOM + skip as usize);
                    let _ = s.inbound.send(Inbound::Data(buf));
                }
            }
            StreamKind::Window => {
                let ack = msg.window_ack()?;
                if let Some(s) = r.streams.get(&id) {
                    s.on_ack(ack)?;
                }
            }
            StreamKind::End => {
                let end: pb::End = ferry_proto::decode_pb("end", msg.body)?;
                if let Some(s) = r.streams.get(&id) {
                    if let Some(w) = s.resumed.lock().expect("resumed lock").take() {
                        let _ = w.send(Err(if end.reason() == EndReason::UnknownStream {
                            CircuitError::UnknownStream
                        } else {
                            CircuitError::Protocol(format!(
                                "exit refused the move: {} {}",
                                end.reason().as_str_name(),
                                end.detail
                            ))
                        }));
                        return Ok(());
                    }
                    s.fin_received.store(true, Ordering::Release);
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
        let core = parts.core.clone();
        let Some(exit) = exit else {
            let _ = core
                .send_end(EndReason::Policy, "this node is not an exit")
                .await;
            return Endpoint::forget(&core);
        };
        let sock = match connect_target(&exit, &begin).await {
            Ok(s) => s,
            Err((reason, detail)) => {
                tracing::info!(reason = reason.as_str_name(), %detail, "stream refused at exit");
                let _ = core.send_end(reason, &detail).await;
                return Endpoint::forget(&core);
            }
        };
        let token = *core.token.lock().expect("token lock");
        let body = pb::Connected {
            window: self.window,
            resume_token: token.to_vec(),
        }
        .encode_to_vec();
        let (end, id) = core.current();
        if end
            .send_msg(StreamKind::Connected, id, &body)
            .await
            .is_err()
        {
            return Endpoint::forget(&core);
        }
        exit.resumables.insert(token, &core);
        exit.metrics.streams_opened.inc();
        let why = run_stream(sock, parts).await;
        exit.metrics.streams_closed.with_label_values(&[why]).inc();
        exit.resumables.remove(&token);
    }
}

/// Why a stream ended, as a metric label: `done` when both directions
/// finished normally, else the first cause seen (the peer's END reason,
/// `reset` for a failed socket, `circuit_closed` when the circuit went).
pub type CloseReason = &'static str;

/// The label of an END reason: `END_REASON_EXIT_LEFT` → `exit_left`.
pub fn end_label(r: EndReason) -> CloseReason {
    match r {
        EndReason::Done => "done",
        EndReason::Reset => "reset",
        EndReason::CircuitClosed => "circuit_closed",
        EndReason::ExitLeft => "exit_left",
        EndReason::Protocol => "protocol",
        _ => "other",
    }
}

/// Every value [`end_label`] and [`run_stream`] give.
pub const CLOSE_REASONS: [CloseReason; 6] = [
    "done",
    "reset",
    "circuit_closed",
    "exit_left",
    "protocol",
    "other",
];

/// `stopped`: this direction was stopped because the other one failed.
const STOPPED: CloseReason = "stopped";

/// Carries a connected stream both ways until both directions end, and
/// says why it ended.
pub async fn run_stream(sock: TcpStream, parts: StreamParts) -> CloseReason {
    let StreamParts { core, inbound } = parts;
    let (r, w) = sock.into_split();
    let stop = CancellationToken::new();
    let up = pump_up(core.clone(), r, stop.clone());
    let down = pump_down(core.clone(), w, inbound, stop.clone());
    let (up, down) = tokio::join!(up, down);
    Endpoint::forget(&core);
    let reason = [down, up]
        .into_iter()
        .find(|r| *r != "done" && *r != STOPPED)
        .unwrap_or("done");
    debug!(moves = core.moves(), reason, "stream closed");
    reason
}

/// Socket → circuit.
async fn pump_up(
    core: Arc<StreamCore>,
    mut r: tokio::net::tcp::OwnedReadHalf,
    stop: CancellationToken,
) -> CloseReason {
    let mut buf = BytesMut::with_capacity(4 * (HEADROOM + MAX_DATA_PAYLOAD + 16));
    loop {
        buf.reserve(HEADROOM + MAX_DATA_PAYLOAD + 16);
        buf.put_bytes(0, HEADROOM);
        let mut room = (&mut buf).limit(MAX_DATA_PAYLOAD);
        let read = tokio::select! {
            r = r.read_buf(&mut room) => r,
            _ = stop.cancelled() => return STOPPED,
        };
        let n = match read {
            Ok(0) => {
                let _ = core.send_end(EndReason::Done, "").await;
                return "done";
            }
            Ok(n) => n,
            Err(e) => {
                debug!(error = %e, "stream read failed");
                let _ = core.send_end(EndReason::Reset, "connection reset").await;
                stop.cancel();
                return "reset";
            }
        };
        tokio::select! {
            r = core.credit.acquire(n as u64) => if r.is_err() { return "circuit_closed" },
            _ = stop.cancelled() => return STOPPED,
        }
        let rec = buf.split();
        if core.send_data(rec).await.is_err() {
            stop.cancel();
            return "circuit_closed";
        }
    }
}

/// Circuit → socket.
async fn pump_down(
    core: Arc<StreamCore>,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut inbound: mpsc::UnboundedReceiver<Inbound>,
    stop: CancellationToken,
) -> CloseReason {
    let threshold = u64::from(core.window / 4);
    let mut acked = 0u64;
    loop {
        let m = tokio::select! {
            m = inbound.recv() => m,
            _ = stop.cancelled() => return STOPPED,
        };
        match m {
            Some(Inbound::Data(b)) => {
                let wrote = tokio::select! {
                    r = w.write_all(&b) => r,
                    _ = stop.cancelled() => return STOPPED,
                };
                if let Err(e) = wrote {
                    debug!(error = %e, "stream write failed");
                    let _ = core.send_end(EndReason::Reset, "connection reset").await;
                    stop.cancel();
                    return "reset";
                }
                let consumed =
                    core.consumed.fetch_add(b.len() as u64, Ordering::AcqRel) + b.len() as u64;
                if consumed - acked >= threshold {
                    if core.send_ack().await.is_err() {
                        stop.cancel();
                        return "circuit_closed";
                    }
                    acked = consumed;
                }
            }
            Some(Inbound::Connected(_)) => {}
            Some(Inbound::End(EndReason::Done, _)) => {
                let _ = w.shutdown().await;
                return "done";
            }
            Some(Inbound::End(reason, detail)) => {
                if matches!(reason, EndReason::ExitLeft | EndReason::CircuitClosed) {
                    info!(reason = reason.as_str_name(), %detail, "stream closed");
                } else {
                    debug!(reason = reason.as_str_name(), %detail, "stream ended by peer");
                }
                stop.cancel();
                return end_label(reason);
            }
            None => {
                stop.cancel();
                return "circuit_closed";
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

#[cfg(test)]
mod tests {
    use super::Ring;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The ring holds exactly the bytes pushed and not consumed, across
        /// wrap-arounds and growth, compared with a plain Vec.
        #[test]
        fn ring_matches_a_plain_buffer(ops in proptest::collection::vec((any::<bool>(), 1usize..70_000), 1..30)) {
            let mut ring = Ring::default();
            let mut model: std::collections::VecDeque<u8> = Default::default();
            let mut next = 0u8;
            for (push, n) in ops {
                if push {
                    let data: Vec<u8> = (0..n).map(|_| { next = next.wrapping_add(1); next }).collect();
                    ring.push(&data);
                    model.extend(&data);
                } else {
                    let n = n.min(model.len());
                    ring.consume(n);
                    model.drain(..n);
                }
                prop_assert_eq!(ring.len, model.len());
                let mut out = vec![0u8; model.len()];
                ring.copy_to(0, model.len(), &mut out);
                prop_assert!(out.iter().eq(model.iter()));
                if model.len() > 10 {
                    let mut part = vec![0u8; 7];
                    ring.copy_to(3, 7, &mut part);
                    prop_assert!(part.iter().eq(model.iter().skip(3).take(7)));
                }
            }
        }
    }
}
