//! Node-to-node links: TCP carrying Noise (IK, mutually authenticated).
//!
//! Noise proves each side holds its Noise key; the identity is proven on
//! top: the responder signs the handshake hash with its identity key in
//! message 2, the initiator in its first transport frame. The initiator
//! refuses any identity but the node it dialled; the responder accepts an
//! identity only if the directory binds the Noise key it saw to that node.
//! A node that advertises another node's Noise key (squatting) therefore
//! gets nothing: the key's holder answers as itself.
//!
//! After the handshake each link has a reader task and a writer task. The
//! writer drains a bounded queue of cells, seals each in place into one
//! reused output buffer and writes the batch with one system call; the reader
//! reads into a large buffer, splits whole frames off it, opens each in place
//! and hands the plaintext cell, still in that buffer, to the switch. A cell
//! is copied once per hop (into the writer's batch) and never allocated on
//! its own. A RELAY cell's body, which the circuit's ends sealed to each
//! other, is not sealed again: the link seals its header alone, bound to
//! the body's end-to-end tag; other cells' bodies are sealed apart from
//! their headers ([`seal`] says how, and what that keeps and gives up).
//!
//! Each end pings the other every [`KEEPALIVE`] on circuit 0 (PING, answered
//! by PONG with the body echoed) and keeps a round-trip estimate of the
//! answers ([`Rtt`]: smoothed as TCP's SRTT, RFC 6298, and the least seen).
//! Path selection weighs nodes by it, and landmarks report it. PINGs carry
//! random nonces (a peer cannot answer one early), a PING left unanswered
//! counts as a sample of its age (a peer that answers none gets no
//! flattering estimate), and PONGs are sent at most four a second. A peer
//! that keeps links alive itself (it has pinged) but sends no frame for
//! [`DEAD_AFTER`] while this end waits on its socket (a stopped process, a
//! silent middlebox) is declared dead and the link closed
//! (`ferry_links_closed_total{reason="dead"}`), so its circuits fail over in
//! seconds rather than at TCP's timeout. Time the reader spends blocked
//! forwarding is not held against the peer; a node from before keepalives
//! (it never pings) is never declared dead. Such a node does close a link
//! on an unknown cell (PING), so a mesh upgrades by restarting nodes, as
//! for any wire change (a change to how links seal also changes the
//! handshake's prologue, `crypto::LINK_PROLOGUE`, so nodes of two versions
//! refuse each other's links at once).
//!
//! The other half of a dead link is a peer that sends but does not read (a
//! hostile node, or one wedged): this end's writer then makes no progress,
//! and what waits for it (up to a quarter of the node's forwarding budget)
//! stays held. A link whose socket takes no byte for [`WRITE_STALL`] while
//! the writer has bytes for it is closed
//! (`ferry_links_closed_total{reason="stalled"}`). The kernel reports a
//! full socket writable again only once a share of its send buffer (about
//! a third) has drained, so what counts is the peer reading that much in
//! 20 s: with a 4 MiB send buffer, about 65 KB/s. A peer slower than that
//! is closed as stalled.

use crate::authority::now_ms;
use crate::crypto::{self, Session};
use crate::directory::Peer;
use crate::identity::Keys;
use crate::log_limit::LogLimit;
use crate::metrics::Metrics;
use anyhow::{Context, Result, anyhow, bail};
use bytes::{BufMut, BytesMut};
use ferry_proto::{FrameCodec, MAX_NOISE_MESSAGE, TAG_LEN};
use ferry_router::NodeId;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

/// Handshake frames: any length up to the Noise maximum.
pub const HANDSHAKE_CODEC: FrameCodec = FrameCodec::new(1, MAX_NOISE_MESSAGE);
/// Transport frames: at least a tag and a cell header, at most the Noise maximum.
pub const TRANSPORT_CODEC: FrameCodec =
    FrameCodec::new(TAG_LEN + ferry_proto::cell::HEADER_LEN, MAX_NOISE_MESSAGE);
mod queue;
pub mod seal;
use queue::CellQueue;
pub use queue::LINK_QUEUE_BYTES;

/// Circuit control cells (DESTROY, CREATED) that found the data queue full,
/// queued for one link's writer ahead of data. They are never dropped: one
/// that finds this queue full too closes the link, which ends every
/// circuit on it (what the DESTROY was to end, and more), so no circuit is
/// left open at one end only.
pub const LINK_URGENT_CELLS: usize = 1024;
/// How often each end of a link pings the other.
pub const KEEPALIVE: Duration = Duration::from_secs(1);

/// A peer silent this long is dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(4);

/// A link whose socket accepts no byte of a pending write this long is
/// closed: the peer has stopped reading.
pub const WRITE_STALL: Duration = Duration::from_secs(20);

/// PINGs awaiting their PONG that a link remembers (older ones are given
/// up: their answers, if they come, are not samples).
const PINGS_KEPT: usize = 8;

/// A link's round-trip estimate, from its PING/PONG samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rtt {
    /// Smoothed RTT (RFC 6298: 7/8 old + 1/8 sample), if sampled.
    pub srtt: Option<Duration>,
    /// Its mean deviation (RFC 6298's RTTVAR).
    pub rttvar: Duration,
    /// The least sample seen: the best bound on the path's propagation
    /// delay (queueing only adds to a sample).
    pub min: Option<Duration>,
    /// Samples taken.
    pub samples: u64,
}

impl Rtt {
    /// Takes one sample.
    pub fn sample(&mut self, r: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(s) => {
                let dev = s.abs_diff(r);
                self.rttvar = (self.rttvar * 3 + dev) / 4;
                self.srtt = Some((s * 7 + r) / 8);
            }
        }
        self.min = Some(self.min.map_or(r, |m| m.min(r)));
        self.samples += 1;
    }
}

#[cfg(test)]
mod rtt_tests {
    use super::*;

    /// RFC 6298's first sample and update; the least sample is kept.
    #[test]
    fn samples_smooth_as_tcp_does() {
        let ms = Duration::from_millis;
        let mut r = Rtt::default();
        r.sample(ms(80));
        assert_eq!(
            (r.srtt, r.rttvar, r.min),
            (Some(ms(80)), ms(40), Some(ms(80)))
        );
        r.sample(ms(40));
        assert_eq!(r.srtt, Some(ms(75)), "7/8 × 80 + 1/8 × 40");
        assert_eq!(r.rttvar, ms(40), "3/4 × 40 + 1/4 × 40");
        assert_eq!(r.min, Some(ms(40)));
        r.sample(ms(400));
        assert_eq!(r.min, Some(ms(40)), "queueing does not raise the least");
        assert_eq!(r.samples, 3);
    }
}

/// What the keepalive keeps per link.
#[derive(Debug, Default)]
struct Keepalive {
    rtt: Rtt,
    /// PINGs awaiting their PONG: a random nonce each (a peer cannot
    /// answer one before it has it), and when it was sent.
    pings: std::collections::VecDeque<(u64, std::time::Instant)>,
    /// When this end last answered a PING (at most one PONG per
    /// [`PONG_GAP`]).
    ponged: Option<std::time::Instant>,
    /// Whether the peer has ever pinged: only a peer that keeps links alive
    /// itself is declared dead for silence (a node from before keepalives
    /// sends nothing on an idle link).
    pinged: bool,
}

/// Least time between two PONGs this end sends: a peer's PING flood gets
/// a few answers a second, not a queue full of them.
const PONG_GAP: Duration = Duration::from_millis(250);

/// Time allowed for a link handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest batch the writer puts in one `write` call.
const WRITE_BATCH: usize = 256 * 1024;
/// Most cells in one batch (each large cell is two of the `writev` call's
/// slices, under Linux's 1,024).
const WRITE_CELLS: usize = 256;
/// Cells at least this long are sealed where they are and written from
/// there; shorter ones are copied into the batch's buffer (a slice of its
/// own costs the kernel more than copying a few hundred bytes).
const WRITE_IN_PLACE: usize = 2048;
/// Read buffer growth step.
const READ_CHUNK: usize = 256 * 1024;

/// Process-local link id.
pub type LinkId = u64;

/// A cell broke the link protocol: the link is closed with this reason.
#[derive(Debug, thiserror::Error)]
#[error("malformed cell: {0}")]
pub struct Malformed(#[from] ferry_proto::DecodeError);

/// Why a link's reader stopped.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A frame's length prefix was out of bounds.
    #[error("bad frame: {0}")]
    Frame(#[from] ferry_proto::FrameError),
    /// A record did not authenticate (or the nonce ran out).
    #[error("link record: {0}")]
    Record(#[from] crypto::CryptoError),
    /// A cell did not parse.
    #[error("{0}")]
    Cell(#[from] Malformed),
    /// The socket failed.
    #[error("link read: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection in the middle of a frame.
    #[error("peer closed the link mid-frame")]
    Truncated,
}

impl LinkError {
    /// A bounded label: `malformed` (the peer broke the protocol), `io`
    /// or `truncated`.
    pub fn kind(&self) -> &'static str {
        match self {
            LinkError::Frame(_) | LinkError::Record(_) | LinkError::Cell(_) => "malformed",
            LinkError::Io(_) => "io",
            LinkError::Truncated => "truncated",
        }
    }
}

/// What a link needs from the node that runs it. The switch implements it;
/// the link calls nothing else of the node, so it does not depend on the
/// switch's types.
pub trait LinkHost: Send + Sync + 'static {
    /// The node's keys.
    fn keys(&self) -> &Keys;
    /// A live known node (where to dial, its Noise key).
    fn peer(&self, id: &NodeId) -> Option<Peer>;
    /// Whether the live, admitted node `id` holds the Noise key `key`.
    fn binds(&self, id: &NodeId, key: &[u8; 32]) -> bool;
    /// The node's metrics.
    fn metrics(&self) -> &Metrics;
    /// Cancelled when the node shuts down (closes every link).
    fn shutdown(&self) -> &CancellationToken;
    /// A fresh local link id.
    fn next_link_id(&self) -> LinkId;
    /// The counter of bytes written to links.
    fn bytes_out(&self) -> Arc<std::sync::atomic::AtomicU64>;
    /// The bytes waiting in every link's overflow, and the most there may
    /// be (`[limits] forward_queue_mb`).
    fn forward_queue(&self) -> (Arc<std::sync::atomic::AtomicUsize>, usize);
    /// A link finished its handshake.
    fn link_up(&self, link: Arc<LinkHandle>);
    /// A link closed.
    fn link_down(&self, link: &Arc<LinkHandle>);
    /// Where the link's tasks are tracked.
    fn tasks(&self) -> &TaskTracker;
    /// What limits the links' repeated warnings (a peer can cause them at
    /// will).
    fn log_limit(&self) -> Arc<LogLimit>;
    /// A cell arrived on `link`; an error closes the link.
    fn on_cell(
        this: &Arc<Self>,
        link: &Arc<LinkHandle>,
        cell: BytesMut,
    ) -> impl std::future::Future<Output = Result<(), Malformed>> + Send;
}

/// Bytes one circuit may have waiting in a link's queues; past it the
/// circuit is destroyed (`capacity`). Honest senders keep at most
/// [`ferry_circuit::CIRCUIT_WINDOW`] in flight on a circuit, so only a
/// sender that ignores it gets here.
pub const CIRCUIT_QUEUE_MAX: usize = 2 * ferry_circuit::CIRCUIT_WINDOW as usize;

/// The cells a relay forwards onto a link, one queue per circuit, written
/// round-robin (a circuit at a time, a cell at a time), so that a circuit
/// whose cells pile up does not hold up the others: the reader of the link
/// they came from never waits for this one. Bounded per circuit
/// ([`CIRCUIT_QUEUE_MAX`]) and per node (`[limits] forward_queue_mb`);
/// senders keep within their streams' windows, so the bounds are met only
/// by a sender that ignores them or a link that has stopped.
#[derive(Debug, Default)]
struct Overflow {
    state: std::sync::Mutex<OverflowState>,
    ready: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct OverflowState {
    /// Cells and their bytes, by circuit id on this link.
    queues: std::collections::HashMap<u32, (std::collections::VecDeque<BytesMut>, usize)>,
    /// Circuits with cells, in turn.
    order: std::collections::VecDeque<u32>,
    /// Bytes counted for this link (cells and their overhead).
    bytes: usize,
}

/// What a queued cell counts for beyond its bytes (its queue entry).
const QUEUED_CELL_OVERHEAD: usize = 64;

/// Why a forwarded cell was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// The link is gone.
    #[error("link closed")]
    Closed,
    /// The circuit, or all circuits of this node, have as much waiting as
    /// they may ([`CIRCUIT_QUEUE_MAX`], `[limits] forward_queue_mb`).
    #[error("too much queued for a congested link")]
    TooMuch,
}

/// A live link, as the rest of the node sees it.
#[derive(Debug)]
pub struct LinkHandle {
    /// Local id (for the circuit table).
    pub id: LinkId,
    /// The node at the other end.
    pub peer: NodeId,
    /// Cells of the circuits this node ends, builds and upkeep
    /// ([`queue`]: bounded in bytes, circuits in turn).
    tx: Arc<CellQueue>,
    /// Circuit control cells, written before data ([`LINK_URGENT_CELLS`]).
    urgent: mpsc::Sender<BytesMut>,
    /// Forwarded cells waiting, by circuit.
    overflow: Arc<Overflow>,
    /// Bytes waiting in every link's overflow on this node, and the most
    /// there may be.
    held: Arc<std::sync::atomic::AtomicUsize>,
    held_max: usize,
    next_circ: AtomicU32,
    initiator: bool,
    closed: CancellationToken,
    keepalive: std::sync::Mutex<Keepalive>,
    /// Reads that returned bytes: the keepalive's sign of life.
    heard: std::sync::atomic::AtomicU64,
    /// Set while the reader waits on the socket (not while it forwards).
    waiting: std::sync::atomic::AtomicBool,
    /// Set when the keepalive declared the peer dead.
    dead: std::sync::atomic::AtomicBool,
    /// Set when the writer gave up on a peer that stopped reading.
    stalled: std::sync::atomic::AtomicBool,
    /// The node's limit on repeated warnings.
    warned: Arc<LogLimit>,
}

/// The link is gone.
#[derive(Debug, thiserror::Error)]
#[error("link closed")]
pub struct LinkClosed;

impl LinkHandle {
    /// Queues one plaintext cell; waits, in turn, while the queue is full.
    pub async fn send(&self, cell: BytesMut) -> Result<(), LinkClosed> {
        self.tx.send(cell).await
    }

    /// Waits, in turn with the other senders, for room for one cell of any
    /// size in the queue; sending on the permit cannot fail or wait.
    /// Cancel-safe: nothing is queued until then.
    pub async fn reserve(&self) -> Result<queue::Permit<'_>, LinkClosed> {
        self.tx.reserve().await
    }

    /// Queues a small best-effort cell (PING, PONG, a notice) behind what
    /// is queued if the queue's control room has room now
    /// ([`queue::CONTROL_BYTES`]); senders waiting for room do not keep it
    /// out.
    pub fn try_send(&self, cell: BytesMut) -> bool {
        self.tx.try_send_control(cell).is_ok()
    }

    /// Queues a cell a relay forwards onto this link, without waiting, in
    /// its circuit's queue ([`Overflow`]): the circuits a link forwards
    /// take turns with each other and with the cells of the circuits this
    /// node ends (which use the link's queue), and a circuit's cells keep
    /// their order.
    pub fn forward(&self, circ: u32, cell: BytesMut) -> Result<(), ForwardError> {
        let mut o = self.overflow.state.lock().expect("overflow lock");
        if self.tx.is_closed() {
            return Err(ForwardError::Closed);
        }
        let len = cell.len() + QUEUED_CELL_OVERHEAD;
        let held = self.held.load(Ordering::Relaxed);
        // A cell is a slice of the read buffer it came in, and keeps all of
        // it alive: once cells wait here, each is copied out, so what is
        // held is what is counted.
        let cell = if o.bytes > 0 {
            // With room for the tags the link's writer appends.
            let mut c = BytesMut::with_capacity(seal::sealed_len(&cell));
            c.extend_from_slice(&cell);
            c
        } else {
            cell
        };
        let link_bytes = o.bytes;
        let (q, bytes) = o.queues.entry(circ).or_default();
        if *bytes + len > CIRCUIT_QUEUE_MAX
            || link_bytes + len > self.held_max / 4
            || held + len > self.held_max
        {
            if q.is_empty() {
                o.queues.remove(&circ);
            }
            return Err(ForwardError::TooMuch);
        }
        let first = q.is_empty();
        q.push_back(cell);
        *bytes += len;
        o.bytes += len;
        if first {
            o.order.push_back(circ);
        }
        self.held.fetch_add(len, Ordering::Relaxed);
        drop(o);
        self.overflow.ready.notify_one();
        Ok(())
    }

    /// Drops what waits in this link's overflow for `circ` (the circuit is
    /// being destroyed).
    pub fn purge(&self, circ: u32) {
        let mut o = self.overflow.state.lock().expect("overflow lock");
        if let Some((_, bytes)) = o.queues.remove(&circ) {
            o.bytes -= bytes;
            o.order.retain(|c| *c != circ);
            self.held.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// Queues a circuit control cell (DESTROY, CREATED) without waiting:
    /// behind the data queued before it if there is room (a DESTROY then
    /// follows the circuit's last cells), else ahead of data. It is never
    /// dropped: if the peer has also left [`LINK_URGENT_CELLS`] of them
    /// unread, the link is closed instead (which ends every circuit on it
    /// at both ends). `false` if the link is closed.
    pub fn send_urgent(&self, cell: BytesMut) -> bool {
        let cell = match self.tx.try_send_control(cell) {
            Ok(()) => return true,
            Err(queue::TrySendError::Closed) => return false,
            Err(queue::TrySendError::Full(c)) => c,
        };
        match self.urgent.try_send(cell) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                crate::warn_limited!(
                    self.warned,
                    "link urgent full",
                    peer = %self.peer.short(),
                    "link closed: the peer left {LINK_URGENT_CELLS} circuit control cells unread"
                );
                self.close();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// A fresh circuit id for a circuit this side creates on the link. The
    /// dialer's ids have the top bit set, the listener's don't, so the two
    /// ends never collide.
    pub fn alloc_circ_id(&self) -> u32 {
        let n = self.next_circ.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
        let n = n.max(1);
        if self.initiator { n | 0x8000_0000 } else { n }
    }

    /// Whether the link has closed.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled() || self.tx.is_closed()
    }

    /// Closes the link.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// The link's round-trip estimate.
    pub fn rtt(&self) -> Rtt {
        self.keepalive.lock().expect("keepalive lock").rtt
    }

    /// Answers a link-level cell (PING, PONG); `false` if `frame` is not
    /// one.
    fn link_level(&self, frame: &[u8]) -> bool {
        use ferry_proto::CellCmd;
        let Ok(c) = ferry_proto::Cell::parse(frame) else {
            return false;
        };
        if !matches!(c.cmd, CellCmd::Ping | CellCmd::Pong) {
            return false;
        }
        // Only 8-byte nonces are answered or matched; anything else on
        // circuit 0 is dropped here.
        let Ok(nonce) = <[u8; 8]>::try_from(c.body).map(u64::from_be_bytes) else {
            return true;
        };
        let now = std::time::Instant::now();
        let mut k = self.keepalive.lock().expect("keepalive lock");
        if c.cmd == CellCmd::Ping {
            k.pinged = true;
            if k.ponged.is_none_or(|t| now.duration_since(t) >= PONG_GAP) {
                k.ponged = Some(now);
                drop(k);
                // Best effort: a full queue is busy sending anyway, and
                // any cell tells the peer this end is alive.
                self.try_send(cell(0, CellCmd::Pong, c.body));
            }
        } else if let Some(i) = k.pings.iter().position(|(s, _)| *s == nonce) {
            let (_, sent) = k.pings.remove(i).expect("found");
            k.rtt.sample(now.duration_since(sent));
        }
        true
    }
}

/// Pings the peer every [`KEEPALIVE`] and declares it dead after
/// [`DEAD_AFTER`] of silence while the reader waits on it.
async fn keepalive(link: Arc<LinkHandle>, closed: CancellationToken) {
    let mut tick = tokio::time::interval(KEEPALIVE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = link.heard.load(Ordering::Relaxed);
    // Ticks in a row with nothing heard (counted, not timed, so a tick a
    // little early does not cost a whole extra one).
    let mut silent = 0u32;
    let dead_after = DEAD_AFTER.as_millis().div_ceil(KEEPALIVE.as_millis()) as u32;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = closed.cancelled() => return,
        }
        let now = std::time::Instant::now();
        let h = link.heard.load(Ordering::Relaxed);
        if h != heard || !link.waiting.load(Ordering::Relaxed) {
            heard = h;
            silent = 0;
        } else {
            silent += 1;
        }
        let pinged = link.keepalive.lock().expect("keepalive lock").pinged;
        if silent >= dead_after && pinged {
            crate::warn_limited!(
                link.warned,
                "link dead",
                silent_secs = (KEEPALIVE * silent).as_secs(),
                "link dead: the peer sent nothing; closing"
            );
            link.dead.store(true, Ordering::Relaxed);
            closed.cancel();
            return;
        }
        let nonce: u64 = rand::random();
        {
            let mut k = link.keepalive.lock().expect("keepalive lock");
            // A PING unanswered for twice the smoothed RTT (and at least a
            // second) counts as a sample of its age: a peer that answers
            // nothing does not keep a flattering estimate (or none).
            let late = k.rtt.srtt.map_or(KEEPALIVE, |s| (s * 2).max(KEEPALIVE));
            if let Some(&(_, sent)) = k.pings.front()
                && now.duration_since(sent) > late
            {
                k.pings.pop_front();
                k.rtt.sample(now.duration_since(sent));
            }
            if k.pings.len() == PINGS_KEPT {
                k.pings.pop_front();
            }
            k.pings.push_back((nonce, now));
        }
        // Recorded first (the answer may come at once); a PING the queue
        // had no room for was never sent, and its age is no sample.
        if !link.try_send(cell(0, ferry_proto::CellCmd::Ping, &nonce.to_be_bytes())) {
            let mut k = link.keepalive.lock().expect("keepalive lock");
            k.pings.retain(|(n, _)| *n != nonce);
        }
    }
}

async fn read_frame(
    sock: &mut TcpStream,
    buf: &mut BytesMut,
    codec: FrameCodec,
) -> Result<BytesMut> {
    loop {
        if let Some(f) = codec.decode(buf)? {
            return Ok(f);
        }
        if sock.read_buf(buf).await? == 0 {
            bail!("peer closed the connection during the handshake");
        }
    }
}

async fn write_frame(sock: &mut TcpStream, msg: &[u8]) -> Result<()> {
    let mut out = Vec::with_capacity(msg.len() + 4);
    HANDSHAKE_CODEC.encode(msg, &mut out);
    sock.write_all(&out).await?;
    Ok(())
}

/// Dials a peer and runs the initiator side of the link handshake.
pub async fn dial<H: LinkHost>(switch: &Arc<H>, peer: NodeId) -> Result<Arc<LinkHandle>> {
    let info = switch
        .peer(&peer)
        .ok_or_else(|| anyhow!("unknown node {peer}"))?;
    let addr = info
        .addr
        .ok_or_else(|| anyhow!("node {peer} accepts no links"))?;
    let started = std::time::Instant::now();
    let fut = async {
        let mut sock = TcpStream::connect(addr).await.context("connecting")?;
        sock.set_nodelay(true)?;
        let mut hs =
            crypto::link_initiator(&switch.keys().noise.dial_private(now_ms()), &info.noise_key)?;
        write_frame(&mut sock, &crypto::write_hs(&mut hs)?).await?;
        let h1 = crypto::handshake_hash(&hs);
        let mut buf = BytesMut::with_capacity(1024);
        let m2 = read_frame(&mut sock, &mut buf, HANDSHAKE_CODEC).await?;
        let proof = crypto::read_hs(&mut hs, &m2)?;
        crypto::check_proof(&proof, crypto::LINK_RESPONDER_PROOF, &h1, Some(&peer))?;
        let mine = crypto::prove(
            &switch.keys().identity,
            crypto::LINK_INITIATOR_PROOF,
            &crypto::handshake_hash(&hs),
        );
        let mut session = Session::from_handshake(hs)?;
        let mut out = Vec::with_capacity(mine.len() + 32);
        TRANSPORT_CODEC.put_prefix(mine.len() + TAG_LEN, &mut out);
        let start = out.len();
        out.extend_from_slice(&mine);
        session.tx.seal_tail(&mut out, start)?;
        sock.write_all(&out).await?;
        Ok::<_, anyhow::Error>((sock, session, buf))
    };
    let (sock, session, buf) = tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| anyhow!("link handshake with {peer} timed out"))??;
    switch
        .metrics()
        .link
        .handshake_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(start(switch, sock, session, buf, peer, true))
}

/// Why an inbound link handshake failed: `auth` (a key or identity that is
/// not admitted here, or a proof that does not verify), `malformed`, or
/// `timeout` (no handshake within [`HANDSHAKE_TIMEOUT`]).
#[derive(Debug, thiserror::Error)]
#[error("{detail}")]
pub struct Refused {
    /// `auth`, `malformed` or `timeout` (the refusal metric's label).
    pub kind: &'static str,
    detail: String,
}

fn refused(kind: &'static str, e: impl std::fmt::Display) -> Refused {
    Refused {
        kind,
        detail: e.to_string(),
    }
}

/// Runs the listener side of the link handshake on an accepted socket, then
/// the link itself. Returns when the handshake fails (with the reason).
pub async fn accept<H: LinkHost>(switch: Arc<H>, mut sock: TcpStream) -> Result<Arc<LinkHandle>> {
    sock.set_nodelay(true)?;
    let started = std::time::Instant::now();
    let fut = async {
        let malformed = |e: anyhow::Error| refused("malformed", format!("{e:#}"));
        let mut buf = BytesMut::with_capacity(1024);
        let m1 = read_frame(&mut sock, &mut buf, HANDSHAKE_CODEC)
            .await
            .map_err(malformed)?;
        // The current key, then one being retired (peers that have not
        // seen the rotation's advert yet).
        let mut opened = Err(refused("malformed", "no local Noise key"));
        for key in switch.keys().noise.responder_keys(now_ms()) {
            let mut hs =
                crypto::link_responder(&key.private()).map_err(|e| refused("malformed", e))?;
            match crypto::read_hs(&mut hs, &m1) {
                Ok(_) => {
                    opened = Ok(hs);
                    break;
                }
                Err(e) => opened = Err(refused("malformed", e)),
            }
        }
        let mut hs = opened?;
        let remote: [u8; 32] = hs
            .get_remote_static()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| refused("malformed", "handshake carried no static key"))?;
        let h1 = crypto::handshake_hash(&hs);
        let proof = crypto::prove(&switch.keys().identity, crypto::LINK_RESPONDER_PROOF, &h1);
        write_frame(
            &mut sock,
            &crypto::write_hs_with(&mut hs, &proof).map_err(|e| refused("malformed", e))?,
        )
        .await
        .map_err(malformed)?;
        let h2 = crypto::handshake_hash(&hs);
        let mut session = Session::from_handshake(hs).map_err(|e| refused("malformed", e))?;
        // The initiator's identity proof: its first transport frame.
        let mut frame = loop {
            if let Some(f) = TRANSPORT_CODEC
                .decode(&mut buf)
                .map_err(|e| refused("malformed", e))?
            {
                break f;
            }
            if sock
                .read_buf(&mut buf)
                .await
                .map_err(|e| refused("malformed", e))?
                == 0
            {
                return Err(refused(
                    "malformed",
                    "peer closed the connection during the handshake",
                ));
            }
        };
        let n = session
            .rx
            .open_in_place(&mut frame)
            .map_err(|e| refused("malformed", e))?;
        let peer = crypto::check_proof(&frame[..n], crypto::LINK_INITIATOR_PROOF, &h2, None)
            .map_err(|e| refused("auth", e))?;
        if !switch.binds(&peer, &remote) {
            debug!(key = %hex::encode(remote), node = %peer.short(), "refused static key");
            return Err(refused(
                "auth",
                format!(
                    "node {} is not admitted here, or does not hold that Noise key",
                    peer.short()
                ),
            ));
        }
        Ok::<_, Refused>((session, buf, peer))
    };
    let res = tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| refused("timeout", "link handshake timed out"))
        .and_then(|r| r);
    let (session, buf, peer) = match res {
        Ok(x) => x,
        Err(e) => {
            switch
                .metrics()
                .node
                .refusals
                .with_label_values(&[e.kind])
                .inc();
            return Err(e.into());
        }
    };
    switch
        .metrics()
        .link
        .handshake_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(start(&switch, sock, session, buf, peer, false))
}

fn start<H: LinkHost>(
    switch: &Arc<H>,
    sock: TcpStream,
    session: Session,
    leftover: BytesMut,
    peer: NodeId,
    initiator: bool,
) -> Arc<LinkHandle> {
    let tx = Arc::new(CellQueue::new(LINK_QUEUE_BYTES));
    let (urgent, urgent_rx) = mpsc::channel(LINK_URGENT_CELLS);
    let closed = switch.shutdown().child_token();
    let overflow = Arc::new(Overflow::default());
    let (held, held_max) = switch.forward_queue();
    let link = Arc::new(LinkHandle {
        id: switch.next_link_id(),
        peer,
        tx: tx.clone(),
        urgent,
        overflow: overflow.clone(),
        held: held.clone(),
        held_max,
        next_circ: AtomicU32::new(1),
        initiator,
        closed: closed.clone(),
        keepalive: std::sync::Mutex::new(Keepalive::default()),
        heard: std::sync::atomic::AtomicU64::new(0),
        waiting: std::sync::atomic::AtomicBool::new(false),
        dead: std::sync::atomic::AtomicBool::new(false),
        stalled: std::sync::atomic::AtomicBool::new(false),
        warned: switch.log_limit(),
    });
    let span = tracing::info_span!("link", id = link.id, peer = %peer.short());
    let (r, w) = sock.into_split();
    let Session {
        tx: sealer,
        rx: opener,
    } = session;
    switch.tasks().spawn(
        write_loop(
            w,
            Queues {
                urgent: urgent_rx,
                data: tx,
                overflow,
                held,
                overflow_turn: false,
            },
            sealer,
            link.clone(),
            switch.bytes_out(),
        )
        .instrument(span.clone()),
    );
    switch
        .tasks()
        .spawn(keepalive(link.clone(), closed.clone()).instrument(span.clone()));
    let sw = switch.clone();
    let l2 = link.clone();
    switch.tasks().spawn(
        async move {
            let reason = tokio::select! {
                r = read_loop(&sw, &l2, r, opener, leftover) => r.err(),
                _ = closed.cancelled() => None,
            };
            match &reason {
                Some(r) => {
                    if r.kind() == "malformed" {
                        sw.metrics()
                            .node
                            .refusals
                            .with_label_values(&["malformed"])
                            .inc();
                    }
                    match r.kind() {
                        // A peer that went away (reset, closed mid-record):
                        // expected, and counted in ferry_links_closed_total.
                        kind @ ("io" | "truncated") => {
                            debug!(reason = %r, kind, "link closed")
                        }
                        kind => crate::warn_limited!(
                            l2.warned,
                            ("link closed", kind),
                            reason = %r,
                            kind,
                            "link closed"
                        ),
                    }
                }
                None => debug!("link closed"),
            }
            let label = if l2.dead.load(Ordering::Relaxed) {
                "dead"
            } else if l2.stalled.load(Ordering::Relaxed) {
                "stalled"
            } else if reason.is_some() {
                "error"
            } else {
                "normal"
            };
            sw.metrics().link.closed.with_label_values(&[label]).inc();
            l2.close();
            sw.link_down(&l2);
        }
        .instrument(span),
    );
    switch.link_up(link.clone());
    switch.metrics().link.opened.inc();
    debug!(link = link.id, peer = %peer.short(), initiator, "link up");
    link
}

/// A link writer's queues: circuit control cells first, then the link's
/// queue and the circuits' overflow queues in turn.
struct Queues {
    urgent: mpsc::Receiver<BytesMut>,
    data: Arc<CellQueue>,
    overflow: Arc<Overflow>,
    held: Arc<std::sync::atomic::AtomicUsize>,
    /// Whether the overflow goes first next time (they alternate).
    overflow_turn: bool,
}

impl Queues {
    /// The next cell queued now: urgent ones first, then the link's queue
    /// and the overflow alternately.
    fn try_next(&mut self) -> Option<BytesMut> {
        if let Ok(c) = self.urgent.try_recv() {
            return Some(c);
        }
        self.overflow_turn = !self.overflow_turn;
        if self.overflow_turn {
            self.pop_overflow().or_else(|| self.data.try_pop())
        } else {
            self.data.try_pop().or_else(|| self.pop_overflow())
        }
    }

    /// One cell of the next circuit in turn.
    fn pop_overflow(&mut self) -> Option<BytesMut> {
        let mut o = self.overflow.state.lock().expect("overflow lock");
        while let Some(circ) = o.order.pop_front() {
            let Some((q, bytes)) = o.queues.get_mut(&circ) else {
                continue; // purged
            };
            let Some(c) = q.pop_front() else {
                o.queues.remove(&circ);
                continue;
            };
            let len = c.len() + QUEUED_CELL_OVERHEAD;
            *bytes -= len;
            if q.is_empty() {
                o.queues.remove(&circ);
            } else {
                o.order.push_back(circ);
            }
            o.bytes -= len;
            self.held.fetch_sub(len, Ordering::Relaxed);
            return Some(c);
        }
        None
    }

    /// Waits for the next cell (`None`: the link is gone).
    async fn next(&mut self) -> Option<BytesMut> {
        loop {
            if let Some(c) = self.try_next() {
                return Some(c);
            }
            tokio::select! {
                biased;
                Some(c) = self.urgent.recv() => return Some(c),
                _ = self.data.ready() => {}
                _ = self.overflow.ready.notified() => {}
            }
        }
    }
}

impl Drop for Queues {
    /// A closed link's overflow no longer counts against the node's.
    fn drop(&mut self) {
        // Closed first: a forward after this sees it and queues nothing.
        self.data.close();
        let mut o = self.overflow.state.lock().expect("overflow lock");
        let bytes = std::mem::take(&mut o.bytes);
        o.queues.clear();
        o.order.clear();
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// One batch of frames for one `writev` call: the length prefixes and the
/// short cells, sealed, in one buffer, and the long cells sealed where they
/// are (a forwarded cell is still in the buffer its link read it into, with
/// the room of the tag it came with), so the writer copies no payload.
///
/// A batch keeps its long cells until the write ends (at most
/// [`WRITE_STALL`]). Those a relay forwards are its own buffers once they
/// waited in the link's overflow (which copies each cell queued behind
/// another: see [`LinkHandle::forward`]); only a cell that found the
/// overflow empty is still a slice of the read buffer it came in, and keeps
/// that buffer alive, as it did while it waited there. A batch is taken
/// from the queues at once, so it holds about one of them.
struct Batch {
    /// Prefixes and short cells.
    out: Vec<u8>,
    /// The long cells, in order.
    cells: Vec<BytesMut>,
    /// The batch in order: a range of `out`, or a long cell.
    parts: Vec<Part>,
    /// Where the part of `out` being added to starts.
    open: usize,
    /// Bytes in the batch.
    len: usize,
}

/// A slice of a [`Batch`].
#[derive(Clone, Copy)]
enum Part {
    /// Bytes of `out`, from and to.
    Out(usize, usize),
    /// The long cell of `cells` at this index.
    Cell(usize),
}

impl Batch {
    fn new() -> Self {
        Self {
            out: Vec::with_capacity(WRITE_BATCH + MAX_NOISE_MESSAGE + 4),
            cells: Vec::with_capacity(WRITE_CELLS),
            parts: Vec::with_capacity(2 * WRITE_CELLS + 1),
            open: 0,
            len: 0,
        }
    }

    fn clear(&mut self) {
        self.out.clear();
        self.cells.clear();
        self.parts.clear();
        self.open = 0;
        self.len = 0;
    }

    fn full(&self) -> bool {
        self.len >= WRITE_BATCH || self.cells.len() >= WRITE_CELLS
    }

    /// Seals `cell` ([`seal::seal`]) and adds it as a frame; returns the
    /// frame's length.
    fn push(
        &mut self,
        sealer: &mut crypto::Sealer,
        mut cell: BytesMut,
    ) -> Result<usize, seal::SealError> {
        let sealed = seal::sealed_len(&cell);
        if sealed > MAX_NOISE_MESSAGE {
            return Err(seal::SealError::TooLong(cell.len()));
        }
        let frame = 4 + sealed;
        TRANSPORT_CODEC.put_prefix(sealed, &mut self.out);
        if cell.len() < WRITE_IN_PLACE {
            let start = self.out.len();
            self.out.extend_from_slice(&cell);
            seal::seal(sealer, &mut self.out, start)?;
        } else {
            // In place when the cell has the room for its tag (forwarded
            // RELAY cells and the ends' records do); else this copies it
            // once.
            seal::seal(sealer, &mut cell, 0)?;
            if self.open < self.out.len() {
                self.parts.push(Part::Out(self.open, self.out.len()));
            }
            self.open = self.out.len();
            self.parts.push(Part::Cell(self.cells.len()));
            self.cells.push(cell);
        }
        self.len += frame;
        Ok(frame)
    }

    /// The batch as slices, in order.
    fn slices(&mut self) -> Vec<std::io::IoSlice<'_>> {
        if self.open < self.out.len() {
            self.parts.push(Part::Out(self.open, self.out.len()));
            self.open = self.out.len();
        }
        self.parts
            .iter()
            .map(|p| match *p {
                Part::Out(a, b) => std::io::IoSlice::new(&self.out[a..b]),
                Part::Cell(i) => std::io::IoSlice::new(&self.cells[i]),
            })
            .collect()
    }
}

async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(
    mut w: W,
    mut q: Queues,
    mut sealer: crypto::Sealer,
    link: Arc<LinkHandle>,
    written: Arc<std::sync::atomic::AtomicU64>,
) {
    let closed = link.closed.clone();
    let mut batch = Batch::new();
    // Bytes of link-level cells (keepalive) in the batch: link upkeep, not
    // traffic, so not in `written` (the advertised load, and what an exited
    // node must keep at zero).
    let mut upkeep;
    loop {
        let first = tokio::select! {
            c = q.next() => c,
            _ = closed.cancelled() => None,
        };
        let Some(first) = first else { break };
        batch.clear();
        upkeep = 0;
        let mut next = Some(first);
        while let Some(cell) = next {
            let link_level = cell.starts_with(&[0; 4]);
            match batch.push(&mut sealer, cell) {
                Ok(n) if link_level => upkeep += n,
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "link cannot seal a cell; closing");
                    closed.cancel();
                    return;
                }
            }
            next = if batch.full() { None } else { q.try_next() };
        }
        written.fetch_add((batch.len - upkeep) as u64, Ordering::Relaxed);
        let mut slices = batch.slices();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            // A link closed elsewhere (its reader, the keepalive) stops a
            // blocked write at once, and frees what waits with it.
            let wrote = tokio::select! {
                // Biased: a close interrupts only a write that is blocked,
                // not one the socket can take (no frame cut in half).
                biased;
                r = tokio::time::timeout(WRITE_STALL, w.write_vectored(rest)) => r,
                _ = closed.cancelled() => return,
            };
            match wrote {
                Ok(Ok(n)) if n > 0 => std::io::IoSlice::advance_slices(&mut rest, n),
                Ok(r) => {
                    debug!(result = ?r, "link write failed");
                    closed.cancel();
                    return;
                }
                Err(_) => {
                    crate::warn_limited!(
                        link.warned,
                        "link stalled",
                        stalled_secs = WRITE_STALL.as_secs(),
                        "link stalled: the peer has read nothing; closing"
                    );
                    link.stalled.store(true, Ordering::Relaxed);
                    closed.cancel();
                    return;
                }
            }
        }
    }
    let _ = w.shutdown().await;
}

async fn read_loop<H: LinkHost>(
    switch: &Arc<H>,
    link: &Arc<LinkHandle>,
    mut r: OwnedReadHalf,
    mut opener: crypto::Opener,
    mut buf: BytesMut,
) -> Result<(), LinkError> {
    loop {
        let mut opened = false;
        while let Some(mut frame) = TRANSPORT_CODEC.decode(&mut buf)? {
            switch
                .metrics()
                .link
                .received
                .inc_by(frame.len() as u64 + 4);
            let len = seal::open(&mut opener, &mut frame)?;
            frame.truncate(len);
            opened = true;
            if frame.starts_with(&[0; 4]) && link.link_level(&frame) {
                continue;
            }
            H::on_cell(switch, link, frame).await?;
        }
        // Frames opened: the peer is alive (bytes of a frame that never
        // completes are not). Once per read, not per frame.
        if opened {
            link.heard.fetch_add(1, Ordering::Relaxed);
        }
        if buf.capacity() - buf.len() < MAX_NOISE_MESSAGE {
            buf.reserve(READ_CHUNK);
        }
        link.waiting.store(true, Ordering::Relaxed);
        let n = r.read_buf(&mut buf).await;
        link.waiting.store(false, Ordering::Relaxed);
        if n? == 0 {
            if buf.is_empty() {
                info!("link closed by peer");
                return Ok(());
            }
            return Err(LinkError::Truncated);
        }
    }
}

/// Builds a cell with the given header and body into a fresh buffer.
pub fn cell(circ_id: u32, cmd: ferry_proto::CellCmd, body: &[u8]) -> BytesMut {
    let mut b = BytesMut::with_capacity(ferry_proto::cell::HEADER_LEN + body.len());
    b.put_slice(&ferry_proto::cell::header(circ_id, cmd));
    b.put_slice(body);
    b
}

#[cfg(test)]
mod queue_tests {
    use super::*;

    /// A link's two ends with `data` bytes of queue (at least a largest
    /// cell's room) and `urgent` cells of urgent queue.
    pub(super) fn handle(data: usize, urgent: usize) -> (LinkHandle, Queues) {
        let tx = Arc::new(CellQueue::new(data));
        let (utx, urgent_rx) = mpsc::channel(urgent);
        let overflow = Arc::new(Overflow::default());
        let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = LinkHandle {
            id: 1,
            peer: NodeId([7; 32]),
            tx: tx.clone(),
            urgent: utx,
            overflow: overflow.clone(),
            held: held.clone(),
            held_max: 1 << 20,
            next_circ: AtomicU32::new(1),
            initiator: true,
            closed: CancellationToken::new(),
            keepalive: Default::default(),
            heard: Default::default(),
            waiting: Default::default(),
            dead: Default::default(),
            stalled: Default::default(),
            warned: Default::default(),
        };
        let q = Queues {
            urgent: urgent_rx,
            data: tx,
            overflow,
            held,
            overflow_turn: false,
        };
        (h, q)
    }

    /// Forwarded cells wait per circuit and are written a circuit at a
    /// time: a circuit with a thousand cells waiting does not hold up one
    /// with a single cell (it used to: the reader of the link they came
    /// from waited for room in one queue, for every circuit on it). A
    /// circuit's cells keep their order, its queue and the node's are
    /// bounded, and a purge drops what a destroyed circuit left.
    #[test]
    fn forwarded_cells_wait_per_circuit_and_take_turns() {
        use ferry_proto::CellCmd;
        let (h, mut q) = handle(1, 4);
        assert!(h.try_send(cell(9, CellCmd::Relay, &[0, 0])));
        for i in 1..1000u16 {
            h.forward(1, cell(1, CellCmd::Relay, &i.to_be_bytes()))
                .unwrap();
        }
        h.forward(2, cell(2, CellCmd::Relay, b"x")).unwrap();
        assert_eq!(
            h.held.load(Ordering::Relaxed),
            999 * (7 + QUEUED_CELL_OVERHEAD) + 6 + QUEUED_CELL_OVERHEAD
        );
        let first: Vec<u32> = std::iter::from_fn(|| q.try_next())
            .take(4)
            .map(|c| u32::from_be_bytes(c[..4].try_into().unwrap()))
            .collect();
        assert!(
            first.contains(&2),
            "circuit 2 within the first turns: {first:?}"
        );
        // Circuit 1's cells in order.
        let rest: Vec<u16> = std::iter::from_fn(|| q.try_next())
            .filter(|c| c[3] == 1)
            .map(|c| u16::from_be_bytes(c[5..7].try_into().unwrap()))
            .collect();
        assert!(rest.windows(2).all(|w| w[0] + 1 == w[1]), "in order");
        assert_eq!(h.held.load(Ordering::Relaxed), 0);
        // Bounds: the link's quarter of the node's (1 MiB here), then a
        // purge frees it.
        let big = BytesMut::zeroed(60_000);
        let mut n = 0;
        while h.forward(3, big.clone()).is_ok() {
            n += 1;
        }
        assert_eq!(n, (1 << 20) / 4 / (60_000 + QUEUED_CELL_OVERHEAD));
        assert_eq!(h.forward(4, big.clone()), Err(ForwardError::TooMuch));
        h.purge(3);
        assert_eq!(h.held.load(Ordering::Relaxed), 0);
        assert!(h.forward(4, big).is_ok());
        drop(q);
        assert_eq!(
            h.held.load(Ordering::Relaxed),
            0,
            "a closed link holds nothing"
        );
        assert_eq!(
            h.forward(4, cell(4, CellCmd::Relay, b"late")),
            Err(ForwardError::Closed)
        );
    }

    /// A DESTROY follows the data queued before it, on the queue's
    /// control room, even when senders wait for room; with that full it
    /// goes ahead of the data instead of being dropped; with both full, the
    /// link closes, which ends every circuit on it.
    #[test]
    fn a_destroy_is_never_dropped() {
        use ferry_proto::CellCmd;
        use ferry_proto::cell::HEADER_LEN;
        // A cell that fills the queue (of a largest cell's room).
        let filler = || {
            let body = vec![0; queue::MAX_COST - QUEUED_CELL_OVERHEAD - HEADER_LEN];
            cell(5, CellCmd::Relay, &body)
        };
        let fill_control = |h: &LinkHandle| {
            while h.try_send(cell(7, CellCmd::Notice, b"")) {}
        };
        let (h, mut q) = handle(0, 1);
        assert!(h.tx.try_send(filler()).is_ok());
        assert!(
            h.tx.try_send(cell(6, CellCmd::Relay, b"b")).is_err(),
            "full"
        );
        assert!(h.send_urgent(cell(5, CellCmd::Destroy, b"")));
        fill_control(&h);
        assert!(h.send_urgent(cell(6, CellCmd::Destroy, b"")), "goes ahead");
        let order: Vec<u8> = std::iter::from_fn(|| q.try_next())
            .map(|c| c[HEADER_LEN - 1])
            .filter(|c| *c != CellCmd::Notice as u8)
            .collect();
        assert_eq!(
            order,
            [
                CellCmd::Destroy as u8,
                CellCmd::Relay as u8,
                CellCmd::Destroy as u8
            ],
            "the urgent DESTROY first, then the queue in order"
        );
        let (h, _q) = handle(0, 1);
        fill_control(&h);
        assert!(h.send_urgent(cell(5, CellCmd::Destroy, b"")));
        assert!(!h.is_closed());
        assert!(!h.send_urgent(cell(6, CellCmd::Destroy, b"")));
        assert!(h.is_closed(), "a peer that reads nothing loses the link");
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;
    use ferry_proto::CellCmd;
    use proptest::prelude::*;

    proptest! {
        /// Whatever mix of short and long cells, RELAY cells (their
        /// headers sealed alone) or not (sealed in two parts), with or
        /// without room for their tags, a batch's slices read back as the
        /// same cells in order, each a frame sealed under the link's
        /// nonces, and the lengths it reports add up to what it writes.
        #[test]
        fn a_batch_reads_back_as_its_cells(
            lens in proptest::collection::vec(
                prop_oneof![ferry_proto::cell::HEADER_LEN..WRITE_IN_PLACE, WRITE_IN_PLACE..MAX_NOISE_MESSAGE - TAG_LEN],
                1..40,
            ),
            room in proptest::collection::vec(any::<bool>(), 40),
            relay in proptest::collection::vec(any::<bool>(), 40),
        ) {
            let key = [3u8; 32];
            let mut sealer = crypto::Sealer::new(&key);
            let mut opener = crypto::Opener::new(&key);
            let mut batch = Batch::new();
            let mut sent = Vec::new();
            let mut reported = 0;
            for (i, len) in lens.iter().enumerate() {
                let mut body: Vec<u8> = (0..*len).map(|j| (i * 31 + j) as u8).collect();
                body[4] = if relay[i] { CellCmd::Relay } else { CellCmd::Control } as u8;
                let tags = seal::sealed_len(&body) - len;
                let mut cell = BytesMut::with_capacity(len + if room[i] { tags } else { 0 });
                cell.extend_from_slice(&body);
                sent.push(body);
                let at = cell.as_ptr();
                reported += batch.push(&mut sealer, cell).unwrap();
                if *len >= WRITE_IN_PLACE && room[i] {
                    prop_assert_eq!(batch.cells.last().unwrap().as_ptr(), at, "sealed in place");
                }
            }
            let mut wire = BytesMut::new();
            for s in batch.slices() {
                wire.extend_from_slice(&s);
            }
            prop_assert_eq!(wire.len(), reported);
            prop_assert_eq!(batch.len, reported);
            let mut got = Vec::new();
            while let Some(mut frame) = TRANSPORT_CODEC.decode(&mut wire).unwrap() {
                let n = seal::open(&mut opener, &mut frame).unwrap();
                got.push(frame[..n].to_vec());
            }
            prop_assert!(wire.is_empty());
            prop_assert_eq!(got, sent);
        }
    }

    /// A socket that takes a few bytes of a write at a time (at most
    /// `step`, varying), as a busy kernel may.
    struct Trickle {
        got: Arc<std::sync::Mutex<Vec<u8>>>,
        step: usize,
        calls: usize,
    }

    impl tokio::io::AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.calls += 1;
            let n = buf.len().min(1 + self.calls * 7919 % self.step);
            self.got.lock().unwrap().extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.calls += 1;
            let mut left = 1 + self.calls * 7919 % self.step;
            let mut got = self.got.lock().unwrap();
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(left);
                got.extend_from_slice(&b[..take]);
                (left, n) = (left - take, n + take);
                if left == 0 {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// The link's writer, through a socket that takes a few bytes at a
    /// time, writes every cell as one sealed frame, in order, short and
    /// long alike (partial writes resume where they stopped, mid-slice).
    #[tokio::test]
    async fn partial_writes_keep_the_frames_whole() {
        use ferry_proto::CellCmd;
        let key = [5u8; 32];
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (h, q) = super::queue_tests::handle(0, 4);
        let h = Arc::new(h);
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writer = tokio::spawn(write_loop(
            Trickle {
                got: got.clone(),
                step: 3000,
                calls: 0,
            },
            q,
            crypto::Sealer::new(&key),
            h.clone(),
            written.clone(),
        ));
        let mut sent = Vec::new();
        for i in 0..300usize {
            let len = [40, 1500, 2047, 2048, 9000, 60_000][i % 6] + i;
            let body: Vec<u8> = (0..len).map(|j| (i + j) as u8).collect();
            let c = cell(9, CellCmd::Relay, &body);
            sent.push(c.to_vec());
            h.send(c).await.unwrap();
        }
        let total: usize = sent.iter().map(|c| 4 + seal::sealed_len(c)).sum();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while got.lock().unwrap().len() < total {
            assert!(std::time::Instant::now() < deadline, "the writer stopped");
            tokio::task::yield_now().await;
        }
        assert_eq!(written.load(Ordering::Relaxed) as usize, total);
        h.close();
        writer.await.unwrap();
        let mut wire = BytesMut::from(&got.lock().unwrap()[..]);
        let mut opener = crypto::Opener::new(&key);
        let mut frames = Vec::new();
        while let Some(mut f) = TRANSPORT_CODEC.decode(&mut wire).unwrap() {
            let n = seal::open(&mut opener, &mut f).unwrap();
            frames.push(f[..n].to_vec());
        }
        assert!(wire.is_empty(), "no frame cut short");
        assert!(frames == sent, "every cell, whole and in order");
    }
}
