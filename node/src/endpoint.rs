//! The async shell of one end of a circuit's end-to-end session.
//!
//! The protocol — sealing, streams and their phases, flow control, offsets,
//! moves, half-close — is `ferry_circuit::Session`, which does no I/O. This
//! module moves bytes between it and the world: cells in from the switch,
//! sealed cells out to the circuit's link, bytes between a stream and its
//! TCP socket, and the exit's connects. One lock guards each session (with
//! the stream handles attached to it); each stream has a small pointer to
//! the session that holds it now ([`StreamHandle`]). Locks are taken
//! stream pointer first, session second, never across an `.await`; events
//! are acted on after both are released.
//!
//! Sending keeps the session's order without holding its lock across the
//! link's backpressure: the first task to find sealed cells waiting takes
//! them all and sends them (one at a time, in order), and others leave
//! theirs for it (see [`Endpoint::flush`]).
//!
//! Moving a stream (make-before-break, when a relay drains) is
//! [`Endpoint::move_stream`]: detach from the old session, attach to the
//! new, wait for the session's one outcome. A move that fails hands the
//! stream back, and it is attached to the old circuit again if that lives
//! (a `Resume` works on any circuit to the exit, the old one included). An
//! exit keeps a stream whose circuit closed *parked* for [`PARK_MS`], so an
//! origin can still move it, and remembers streams that ended cleanly for as
//! long, so a lost last acknowledgement does not turn a finished stream into
//! an error.
//!
//! A stream that ends abnormally — a reset socket, a broken circuit, an
//! exit that left — reaches the client as a TCP reset, never as a clean
//! close, so a client can tell truncation from completion (invariant I10).

use crate::limits::{Pace, Way};
use crate::link::LinkHandle;
use crate::policy::{ExitPolicy, Verdict};
use bytes::{BufMut, BytesMut};
use ferry_circuit::{
    Config, Error as CoreError, Event, Found, HEADROOM, Outcome, Phase, Resumables, Session, Side,
    Stream, Token,
};
use ferry_proto::MAX_DATA_PAYLOAD;
use ferry_proto::pb::{DestroyReason, EndReason};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span};

/// A circuit-level failure: the circuit core's error.
pub type CircuitError = CoreError;

/// Time the origin waits for `Resumed` when moving a stream.
pub const RESUME_TIMEOUT: Duration = Duration::from_secs(10);
/// Most streams an origin's session keeps on one circuit (the entry opens
/// fewer: `[circuit] max_streams_per_circuit`; exits take
/// `[limits] streams_per_circuit`).
pub const ORIGIN_MAX_STREAMS: usize = 1024;
/// How long an exit keeps a stream whose circuit closed (for a move), and a
/// tombstone of a stream that ended cleanly (ms).
pub const PARK_MS: u64 = 30_000;
/// Most resume tokens an exit holds (live, parked and tombstones).
pub const MAX_RESUMABLE: usize = 65_536;

/// Milliseconds on a monotonic clock (the session core's `now` for moves):
/// a wall clock stepped back must not stall a move's timeout.
fn now_ms() -> u64 {
    now_us() / 1000
}

/// Microseconds on the same clock (congestion control times its probes
/// with it).
fn now_us() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_micros() as u64
}

/// How long a stream whose socket directions both ended stays attached,
/// waiting for the peer's last acknowledgement (then it is dropped).
const LINGER: Duration = Duration::from_millis(PARK_MS);

/// What an exit needs to open streams.
#[derive(Debug)]
pub struct ExitCtx {
    /// Which targets are allowed.
    pub policy: ExitPolicy,
    /// Time allowed per connect.
    pub connect_timeout: Duration,
    /// Streams by resume token.
    pub resumables: Mutex<Resumables<Arc<StreamHandle>>>,
    /// The node's metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Name lookups in flight (`[limits] dns_lookups`): a permit is held
    /// by the resolver thread until the system resolver answers, so slow
    /// names cannot take every blocking thread.
    dns: Arc<tokio::sync::Semaphore>,
}

impl ExitCtx {
    /// An exit with this policy, resolving at most `dns_lookups` names at
    /// once.
    pub fn new(
        policy: ExitPolicy,
        connect_timeout: Duration,
        dns_lookups: usize,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            policy,
            connect_timeout,
            resumables: Mutex::new(Resumables::new(PARK_MS, MAX_RESUMABLE)),
            metrics,
            dns: Arc::new(tokio::sync::Semaphore::new(dns_lookups)),
        }
    }

    /// Resolves `host` (an address literal needs no lookup). A lookup runs
    /// on a blocking thread that holds one of [`Self::dns`]'s permits until
    /// the resolver answers, even if the stream stopped waiting for it;
    /// with none free, the BEGIN ends at once with `capacity`.
    async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, (EndReason, String)> {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let Ok(permit) = self.dns.clone().try_acquire_owned() else {
            self.metrics.node.refusals.with_label_values(&["dns"]).inc();
            return Err((
                EndReason::Capacity,
                "the exit is resolving as many names as it may".into(),
            ));
        };
        let name = host.to_string();
        let lookup = tokio::task::spawn_blocking(move || {
            let _held = permit;
            std::net::ToSocketAddrs::to_socket_addrs(&(name.as_str(), port))
                .map(|a| a.collect::<Vec<_>>())
        });
        match tokio::time::timeout(self.connect_timeout, lookup).await {
            Ok(Ok(Ok(a))) => Ok(a),
            Ok(_) => Err((EndReason::HostUnreachable, "name did not resolve".into())),
            Err(_) => Err((EndReason::Timeout, "name resolution timed out".into())),
        }
    }

    fn registry(&self) -> MutexGuard<'_, Resumables<Arc<StreamHandle>>> {
        self.resumables.lock().expect("resumables lock")
    }

    /// Resets the sockets of parked streams nobody moved in time, once a
    /// second, until `shutdown`.
    pub async fn sweep_parked(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let expired = self.registry().handle_timeout(now_ms());
            for (h, _stream) in expired {
                debug!("parked stream expired: no move came for it");
                h.end(
                    EndReason::CircuitClosed,
                    "the circuit closed and the stream was not moved in time".into(),
                );
            }
        }
    }
}

/// What a stream's socket writer gets.
#[derive(Debug)]
pub enum Inbound {
    /// The exit connected (origin side).
    Connected,
    /// Payload, to write to the socket.
    Data(BytesMut),
    /// The peer finished sending, normally.
    Finished,
    /// The stream ended abnormally.
    Reset(EndReason, String),
}

/// Bytes a compact buffer of a stream's queue starts with.
const COMPACT_CHUNK: usize = 16 * 1024;

/// What waits for a stream's socket writer: a queue that holds about the
/// payload it carries, whatever the cells were like.
///
/// Payload arrives as slices of the link's read buffer, one per DATA cell,
/// and each slice keeps its whole frame (and the read chunk it came in)
/// alive. While the writer keeps up, each slice goes to it as is (no
/// copy); once something waits in the queue, new payload is copied onto
/// the end of one compact buffer instead. So a peer that sends a window's
/// worth of one-byte cells to a socket that does not read makes the queue
/// hold about a window of bytes, not a frame (and an allocation) per byte,
/// which was about a hundred times more.
pub struct InboundQueue {
    state: Mutex<Queued>,
    ready: Notify,
}

#[derive(Default)]
struct Queued {
    items: std::collections::VecDeque<Inbound>,
    /// The last item is a compact buffer this queue made (payload may be
    /// appended to it).
    compact_tail: bool,
    /// The sender (the stream's handle) is gone.
    closed: bool,
    /// The receiver (the socket writer) is gone: take nothing more.
    deaf: bool,
}

impl InboundQueue {
    fn new() -> (Arc<Self>, InboundRx) {
        let q = Arc::new(Self {
            state: Mutex::new(Queued::default()),
            ready: Notify::new(),
        });
        (q.clone(), InboundRx(q))
    }

    fn lock(&self) -> MutexGuard<'_, Queued> {
        self.state.lock().expect("inbound lock")
    }

    /// Queues `m` for the socket writer (dropped if it is gone).
    fn send(&self, m: Inbound) {
        let mut q = self.lock();
        if q.deaf {
            return;
        }
        match m {
            Inbound::Data(d) if !q.items.is_empty() => {
                if q.compact_tail
                    && let Some(Inbound::Data(last)) = q.items.back_mut()
                {
                    last.extend_from_slice(&d);
                } else {
                    let mut c = BytesMut::with_capacity(d.len().max(COMPACT_CHUNK));
                    c.extend_from_slice(&d);
                    q.items.push_back(Inbound::Data(c));
                    q.compact_tail = true;
                }
            }
            m => {
                q.items.push_back(m);
                q.compact_tail = false;
            }
        }
        drop(q);
        self.ready.notify_one();
    }

    /// Payload bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.lock()
            .items
            .iter()
            .map(|m| match m {
                Inbound::Data(d) => d.len(),
                _ => 0,
            })
            .sum()
    }

    /// The sender is done: the receiver gets `None` once the queue is empty.
    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }
}

/// The socket writer's end of a stream's [`InboundQueue`].
pub struct InboundRx(Arc<InboundQueue>);

impl InboundRx {
    /// The next item, waiting for one; `None` once the stream's handle is
    /// gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<Inbound> {
        loop {
            let ready = self.0.ready.notified();
            {
                let mut q = self.0.lock();
                if let Some(m) = q.items.pop_front() {
                    if q.items.is_empty() {
                        q.compact_tail = false;
                    }
                    return Some(m);
                }
                if q.closed {
                    return None;
                }
            }
            ready.await;
        }
    }
}

impl Drop for InboundRx {
    fn drop(&mut self) {
        let mut q = self.0.lock();
        q.deaf = true;
        q.items.clear();
    }
}

/// Where a stream is attached now.
#[derive(Default)]
struct At {
    loc: Option<(Arc<Endpoint>, u32)>,
    /// Bytes the socket took that the session has not been told of (the
    /// stream was between sessions).
    pending: u64,
    /// The stream is over here: its tasks stop.
    ended: bool,
}

/// Where a move hears how it ended.
type MoveReply = oneshot::Sender<Result<(), (CoreError, Option<Box<Stream>>)>>;

/// One stream as its socket tasks see it: a pointer to the session that
/// holds it now.
pub struct StreamHandle {
    at: Mutex<At>,
    inbound: Arc<InboundQueue>,
    writable: Notify,
    moved: Mutex<Option<MoveReply>>,
    moves: AtomicU32,
    /// The exit's resume token (exit side).
    token: Token,
    /// The entry's trail of where the stream went ([`crate::audit`]);
    /// none at the exit.
    trail: Mutex<Option<crate::audit::Trail>>,
    /// Bytes its socket read (client to mesh) and wrote (mesh to client).
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        self.inbound.close();
    }
}

impl std::fmt::Debug for StreamHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StreamHandle(moves {})", self.moves())
    }
}

/// What handing a record to a stream's session did.
enum Send {
    /// Queued on this session: flush it.
    Sent(Arc<Endpoint>),
    /// No credit, or between circuits: wait for `writable`.
    Wait(BytesMut),
    /// The stream is over.
    Over,
}

/// The result of one operation on the session holding a stream.
enum Op<R> {
    Done(R, Arc<Endpoint>),
    /// Between sessions (moving, or parked): wait.
    Detached,
    /// Over.
    Ended,
}

impl StreamHandle {
    fn new(token: Token) -> (Arc<Self>, InboundRx) {
        let (tx, rx) = InboundQueue::new();
        let h = Arc::new(Self {
            at: Mutex::new(At::default()),
            inbound: tx,
            writable: Notify::new(),
            moved: Mutex::new(None),
            moves: AtomicU32::new(0),
            token,
            trail: Mutex::new(None),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
        });
        (h, rx)
    }

    /// Starts the entry's trail of this stream.
    pub fn set_trail(&self, trail: crate::audit::Trail) {
        *self.trail.lock().expect("trail lock") = Some(trail);
    }

    /// Adds a circuit the stream was put on to its trail (if it has one).
    pub fn add_leg(&self, leg: crate::audit::RawLeg) {
        if let Some(t) = self.trail.lock().expect("trail lock").as_mut() {
            t.push(leg);
        }
    }

    /// Takes the trail, once the stream is over.
    pub fn take_trail(&self) -> Option<crate::audit::Trail> {
        self.trail.lock().expect("trail lock").take()
    }

    /// Bytes its socket read (up) and wrote (down).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.bytes_up.load(Ordering::Relaxed),
            self.bytes_down.load(Ordering::Relaxed),
        )
    }

    fn at(&self) -> MutexGuard<'_, At> {
        self.at.lock().expect("stream pointer lock")
    }

    /// Wakes every task waiting on the stream (the socket reader, and a
    /// writer finishing), and leaves a permit for one about to wait.
    fn wake(&self) {
        self.writable.notify_waiters();
        self.writable.notify_one();
    }

    /// A wait for [`StreamHandle::wake`], registered now: create it before
    /// checking the state it waits on, so no wake-up is lost.
    fn waiter(&self) -> std::pin::Pin<Box<tokio::sync::futures::Notified<'_>>> {
        let mut n = Box::pin(self.writable.notified());
        n.as_mut().enable();
        n
    }

    /// Whether the stream is over here.
    fn is_ended(&self) -> bool {
        self.at().ended
    }

    /// Times the stream moved to another circuit.
    pub fn moves(&self) -> u32 {
        self.moves.load(Ordering::Relaxed)
    }

    /// The circuit id and stream id carrying it now, for logs.
    pub fn ids(&self) -> Option<(u32, u32)> {
        self.at().loc.as_ref().map(|(e, id)| (e.circ, *id))
    }

    /// Runs `f` on the session holding the stream (the caller sends what
    /// it queued).
    fn op<R>(&self, f: impl FnOnce(&mut Inner, u32) -> R) -> Op<R> {
        let at = self.at();
        if at.ended {
            return Op::Ended;
        }
        let Some((end, id)) = at.loc.clone() else {
            return Op::Detached;
        };
        let (r, todo) = end.run(|g| f(g, id));
        drop(at);
        end.act(todo);
        // What the op queued and nobody sends otherwise (a probe, when it
        // left streams waiting for room) goes now.
        end.kick();
        Op::Done(r, end)
    }

    /// The stream is over here: its tasks stop, the client is reset.
    pub(crate) fn end(&self, reason: EndReason, detail: String) {
        {
            let mut at = self.at();
            at.ended = true;
            at.loc = None;
        }
        self.inbound.send(Inbound::Reset(reason, detail));
        self.wake();
        if let Some(w) = self.moved.lock().expect("move lock").take() {
            let _ = w.send(Err((CoreError::Closed, None)));
        }
    }

    /// Acknowledges what the socket took and no WINDOW said yet
    /// ([`ferry_circuit::Session::acknowledge`]).
    fn acknowledge(&self) -> Op<Result<Outcome, CoreError>> {
        self.op(|g, id| g.core.acknowledge(id))
    }

    /// The socket took `n` bytes: tell the session (now, or when the stream
    /// is attached again).
    fn consumed(&self, n: u64) -> Op<()> {
        let mut at = self.at();
        if at.ended {
            return Op::Ended;
        }
        at.pending += n;
        let Some((end, id)) = at.loc.clone() else {
            return Op::Detached;
        };
        let pending = at.pending;
        let (r, todo) = end.run(|g| g.core.consumed(id, pending));
        if matches!(r, Ok(Outcome::Done)) {
            at.pending = 0;
        }
        drop(at);
        end.act(todo);
        Op::Done((), end)
    }

    /// Hands one DATA record to the session holding the stream.
    fn send(&self, rec: BytesMut) -> Send {
        let at = self.at();
        if at.ended {
            return Send::Over;
        }
        let Some((end, id)) = at.loc.clone() else {
            return Send::Wait(rec);
        };
        let (r, todo) = end.run(|g| g.core.send_data(id, rec, now_us()));
        drop(at);
        end.act(todo);
        match r {
            Ok(Outcome::Done) => Send::Sent(end),
            Ok(Outcome::Blocked(b) | Outcome::Elsewhere(b)) => {
                // A stream stopped for circuit room leaves a probe queued,
                // whose answer brings the room back: it must go out now.
                end.kick();
                Send::Wait(b)
            }
            Err(_) => Send::Over,
        }
    }

    /// This side is done sending: END with `reason`. A stream between
    /// circuits sends it once it is attached again.
    async fn finish(&self, reason: EndReason, detail: &str) {
        loop {
            let wait = self.waiter();
            match self.op(|g, id| {
                let r = g.core.finish(id, reason, detail);
                if reason != EndReason::Done {
                    g.handles.remove(&id);
                }
                r
            }) {
                Op::Done(Ok(Outcome::Elsewhere(())), _) | Op::Detached => wait.await,
                Op::Done(_, end) => {
                    if reason != EndReason::Done {
                        // Gone from the session: gone here too.
                        self.gone(&end);
                    }
                    let _ = end.flush().await;
                    return;
                }
                Op::Ended => return,
            }
        }
    }

    /// The session no longer holds the stream: it is over here, and an
    /// exit forgets its token (unless it is parked or a tombstone).
    fn gone(&self, end: &Endpoint) {
        {
            let mut at = self.at();
            at.ended = true;
            at.loc = None;
        }
        if let Some(x) = &end.exit {
            x.registry().forget(&self.token);
        }
        self.wake();
    }

    /// After both socket directions ended: a stream still attached waits
    /// for the peer's last acknowledgement, for at most [`LINGER`]; then it
    /// is dropped (a peer that never acknowledges cannot hold a slot).
    fn linger(self: &Arc<Self>) {
        let tasks = match &self.at().loc {
            Some((end, _)) => end.tasks.clone(),
            None => return,
        };
        let h = self.clone();
        tasks.spawn(
            async move {
                let deadline = tokio::time::Instant::now() + LINGER;
                loop {
                    let wait = h.waiter();
                    if h.is_ended() {
                        return;
                    }
                    tokio::select! {
                        _ = wait => {}
                        _ = tokio::time::sleep_until(deadline) => break,
                    }
                }
                if let Op::Done(Some(_), end) = h.op(|g, id| {
                    g.handles.remove(&id);
                    g.core.detach(id)
                }) {
                    debug!("stream dropped: its peer never acknowledged the end");
                    h.gone(&end);
                }
            }
            .instrument(tracing::Span::current()),
        );
    }

    /// Gives up a stream that never opened (or that this side abandons):
    /// END with `reason`, and its tasks stop.
    pub async fn abandon(&self, reason: EndReason, detail: &str) {
        self.finish(reason, detail).await;
        let mut at = self.at();
        at.ended = true;
        at.loc = None;
    }
}

/// What a new stream's tasks hold.
pub struct StreamParts {
    /// The stream.
    pub handle: Arc<StreamHandle>,
    /// What arrives for it.
    pub inbound: InboundRx,
}

impl StreamParts {
    /// Records the short ids of the stream's circuit and of the stream on
    /// it in `span` (declared with `circ` and `stream` fields).
    pub fn record_ids(&self, span: &tracing::Span) {
        if let Some((circ, id)) = self.handle.ids() {
            span.record("circ", circ);
            span.record("stream", id);
        }
    }
}

/// A session, the handles of the streams on it, and whether a task is
/// sending its cells.
struct Inner {
    core: Session,
    handles: HashMap<u32, Arc<StreamHandle>>,
    flushing: bool,
}

/// A new stream's receiving end, made with its handle for a BEGIN.
type Begun = Option<InboundRx>;

/// Events taken out of the session, with their streams' handles (and a
/// BEGIN's new receiver), to act on once its lock is released.
type Todo = Vec<(Event, Option<Arc<StreamHandle>>, Begun)>;

/// One end of an end-to-end session.
pub struct Endpoint {
    link: Arc<LinkHandle>,
    circ: u32,
    /// An exit's context at the tip of an exit node.
    exit: Option<Arc<ExitCtx>>,
    inner: Mutex<Inner>,
    closed: AtomicBool,
    /// Set while this tip extends the circuit: one EXTEND at a time (an
    /// origin that sends many would make the tip dial for each).
    extending: AtomicBool,
    /// A cell arrived since the last [`Endpoint::quiet`].
    heard: AtomicBool,
    /// Where its tasks (and its streams') are tracked.
    tasks: TaskTracker,
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

/// Resets `h` to its waiting mover or ends it.
fn resolve_move(h: &StreamHandle, r: Result<(), (CoreError, Option<Box<Stream>>)>) {
    if let Some(w) = h.moved.lock().expect("move lock").take() {
        let _ = w.send(r);
    } else if let Err((e, _)) = r {
        h.end(EndReason::CircuitClosed, format!("stream move failed: {e}"));
    }
}

/// A guard that clears `flushing` if a flush ends early (an error, or
/// cancelled); a flush that drained the queue clears it itself.
struct Flushing<'a>(&'a Endpoint, bool);

impl Drop for Flushing<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.lock().flushing = false;
        }
    }
}

impl Endpoint {
    /// A session's settings: our window per stream, the most streams it
    /// takes, and whether it runs congestion control.
    pub fn config(window: u32, max_streams: usize, congestion: bool) -> Config {
        Config {
            window,
            max_streams,
            resume_timeout_ms: RESUME_TIMEOUT.as_millis() as u64,
            congestion,
        }
    }

    /// An endpoint over `link`/`circ` with a finished session (settings
    /// from [`Endpoint::config`]). `exit` is the node's exit context at a
    /// tip (`None` at the origin, and at the tip of a node that is not an
    /// exit).
    pub fn new(
        link: Arc<LinkHandle>,
        circ: u32,
        keys: ferry_circuit::crypto::Session,
        side: Side,
        cfg: Config,
        exit: Option<Arc<ExitCtx>>,
        tasks: TaskTracker,
    ) -> Arc<Self> {
        Arc::new(Self {
            link,
            circ,
            exit,
            inner: Mutex::new(Inner {
                core: Session::new(side, circ, keys, cfg),
                handles: HashMap::new(),
                flushing: false,
            }),
            closed: AtomicBool::new(false),
            extending: AtomicBool::new(false),
            heard: AtomicBool::new(true),
            tasks,
        })
    }

    /// Whether no cell arrived since the last call (the idle sweeps ask
    /// once a period).
    pub fn quiet(&self) -> bool {
        !self.heard.swap(false, Ordering::Relaxed)
    }

    /// Sends a keepalive if a stream is open ([`Session::keepalive`]);
    /// whether one went.
    pub async fn keepalive(self: &Arc<Self>) -> Result<bool, CircuitError> {
        let (r, todo) = self.run(|g| g.core.keepalive());
        self.act(todo);
        if r? {
            self.flush().await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Claims this tip's one extend; `false` if one is running.
    pub fn start_extend(&self) -> bool {
        !self.extending.swap(true, Ordering::AcqRel)
    }

    /// The extend ended without splicing: the origin may ask again.
    pub fn end_extend(&self) {
        self.extending.store(false, Ordering::Release);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("session lock")
    }

    /// Runs `f` under the session's lock; returns its result and the
    /// events it raised, with their handles (act on them with
    /// [`Endpoint::act`] once every lock is released).
    fn run<R>(self: &Arc<Self>, f: impl FnOnce(&mut Inner) -> R) -> (R, Todo) {
        let mut g = self.lock();
        let r = f(&mut g);
        let mut todo = Vec::new();
        while let Some(ev) = g.core.poll_event() {
            let mut begun = None;
            let h = match &ev {
                Event::Begin { id, .. } => {
                    let (h, rx) = StreamHandle::new(rand::random());
                    h.at().loc = Some((self.clone(), *id));
                    g.handles.insert(*id, h.clone());
                    begun = Some(rx);
                    Some(h)
                }
                Event::Resume { .. } | Event::Refused { .. } => None,
                Event::Reset { id, .. }
                | Event::Closed { id, .. }
                | Event::MoveFailed { id, .. } => g.handles.remove(id),
                Event::Connected { id }
                | Event::Data { id, .. }
                | Event::Writable { id }
                | Event::Finished { id }
                | Event::Moved { id } => g.handles.get(id).cloned(),
            };
            todo.push((ev, h, begun));
        }
        (r, todo)
    }

    /// Acts on events taken out of the session. Whoever queued cells
    /// sends them: async callers [`Endpoint::flush`], the link's reader
    /// [`Endpoint::kick`]s.
    fn act(self: &Arc<Self>, todo: Todo) {
        for (ev, h, begun) in todo {
            self.on_event(ev, h, begun);
        }
    }

    fn on_event(self: &Arc<Self>, ev: Event, h: Option<Arc<StreamHandle>>, begun: Begun) {
        match (ev, h) {
            (Event::Data { data, .. }, Some(h)) => {
                h.inbound.send(Inbound::Data(data));
            }
            (Event::Connected { .. }, Some(h)) => {
                h.inbound.send(Inbound::Connected);
            }
            (Event::Writable { .. }, Some(h)) => h.wake(),
            (Event::Finished { .. }, Some(h)) => {
                h.inbound.send(Inbound::Finished);
            }
            (Event::Reset { reason, detail, .. }, Some(h)) => {
                if let Some(x) = &self.exit {
                    x.registry().forget(&h.token);
                }
                if reason == EndReason::UnknownStream {
                    resolve_move(&h, Err((CoreError::UnknownStream, None)));
                }
                h.end(reason, detail);
            }
            (Event::Moved { .. }, Some(h)) => {
                h.moves.fetch_add(1, Ordering::Relaxed);
                resolve_move(&h, Ok(()));
                h.wake();
            }
            (Event::MoveFailed { stream, error, .. }, Some(h)) => {
                h.at().loc = None;
                resolve_move(&h, Err((error, Some(stream))));
            }
            (
                Event::Closed {
                    token, received, ..
                },
                Some(h),
            ) => {
                if let Some(x) = &self.exit {
                    x.registry().completed(token, received, now_ms());
                }
                let mut at = h.at();
                at.ended = true;
                at.loc = None;
            }
            (Event::Begin { id, host, port }, Some(h)) => {
                if let Some(inbound) = begun {
                    self.begin_at_exit(id, host, port, StreamParts { handle: h, inbound });
                }
            }
            (
                Event::Resume {
                    id,
                    token,
                    received,
                    fin,
                    attempt,
                },
                None,
            ) => self.resume_here(id, token, received, fin, attempt),
            (Event::Refused { kind, .. }, None) => {
                if let Some(x) = &self.exit {
                    x.metrics.node.refusals.with_label_values(&[kind]).inc();
                }
            }
            (ev, None) => {
                debug!(event = ?std::mem::discriminant(&ev), "event for a stream without a handle")
            }
            (_, Some(_)) => {}
        }
    }

    /// Starts a task that sends the queued cells, if any wait and no task
    /// is sending them already.
    fn kick(self: &Arc<Self>) {
        {
            let g = self.lock();
            if g.flushing || !g.core.has_transmits() {
                return;
            }
        }
        let me = self.clone();
        self.tasks.spawn(
            async move {
                let _ = me.flush().await;
            }
            .instrument(tracing::Span::current()),
        );
    }

    /// Sends the queued cells on the link, in order. If another task is
    /// sending already, it will send ours too. A cell leaves the session
    /// only once the link has room for it, so a cancelled flush loses
    /// nothing (a lost cell would break the session's nonce order).
    pub async fn flush(&self) -> Result<(), CircuitError> {
        {
            let mut g = self.lock();
            if g.flushing || !g.core.has_transmits() {
                return Ok(());
            }
            g.flushing = true;
        }
        let mut guard = Flushing(self, true);
        loop {
            let permit = self.link.reserve().await.map_err(|_| CoreError::Closed)?;
            let cell = {
                let mut g = self.lock();
                match g.core.poll_transmit() {
                    Some(c) => c,
                    None => {
                        // Cleared under the lock that saw the queue empty:
                        // a cell queued after this finds no sender and
                        // starts one.
                        g.flushing = false;
                        guard.1 = false;
                        return Ok(());
                    }
                }
            };
            permit.send(cell);
        }
    }

    /// The circuit id on its first link.
    pub fn circ(&self) -> u32 {
        self.circ
    }

    /// Whether the circuit under it is gone.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.link.is_closed()
    }

    /// Streams attached.
    pub fn stream_count(&self) -> usize {
        self.lock().core.stream_count()
    }

    /// Where the session's congestion window stands (`None` when it does
    /// not probe).
    pub fn congestion(&self) -> Option<ferry_circuit::congestion::Snapshot> {
        self.lock().core.congestion()
    }

    /// The streams attached here.
    pub fn streams(&self) -> Vec<Arc<StreamHandle>> {
        self.lock().handles.values().cloned().collect()
    }

    /// The circuit is gone. At the origin its streams end (a move under
    /// way falls back); at an exit open streams are parked for a move.
    /// Each stream is taken off under its own pointer's lock, so a
    /// `Resume` or a socket task never sees it half gone.
    pub fn close(self: &Arc<Self>, reason: DestroyReason) {
        self.close_inner(reason, false);
    }

    /// Closes the circuit at its origin, handing back the streams that
    /// were open, detached (their clients wait), instead of ending them:
    /// the caller moves them onto a new circuit to the same exit with
    /// [`Endpoint::adopt`], or ends them.
    pub fn close_rescuing(
        self: &Arc<Self>,
        reason: DestroyReason,
    ) -> Vec<(Arc<StreamHandle>, Stream)> {
        self.close_inner(reason, true)
    }

    fn close_inner(
        self: &Arc<Self>,
        reason: DestroyReason,
        rescue: bool,
    ) -> Vec<(Arc<StreamHandle>, Stream)> {
        let mut orphans = Vec::new();
        self.closed.store(true, Ordering::Release);
        let handles: Vec<(u32, Arc<StreamHandle>)> = self.lock().handles.drain().collect();
        let (why, detail) = closed_reason(reason);
        let now = now_ms();
        for (id, h) in handles {
            let mut at = h.at();
            if !matches!(&at.loc, Some((e, i)) if Arc::ptr_eq(e, self) && *i == id) {
                continue;
            }
            let (stream, todo) = self.run(|g| g.core.detach(id));
            at.loc = None;
            match stream {
                // Parked for a move, unless this node is going away.
                Some(stream)
                    if self.exit.is_some()
                        && reason != DestroyReason::Shutdown
                        && stream.phase() == Phase::Open =>
                {
                    if let Some(x) = &self.exit {
                        x.registry().park(h.clone(), stream, now);
                    }
                    drop(at);
                }
                Some(stream) if matches!(stream.phase(), Phase::Moving { .. }) => {
                    drop(at);
                    resolve_move(&h, Err((CoreError::Closed, Some(Box::new(stream)))));
                }
                // Taken out for a move to another circuit (the origin's
                // rescue after a lost circuit).
                Some(stream) if rescue && stream.phase() == Phase::Open => {
                    drop(at);
                    orphans.push((h, stream));
                }
                other => {
                    drop(at);
                    debug!(
                        stream = id,
                        phase = ?other.as_ref().map(|s| s.phase()),
                        "stream ended with its circuit"
                    );
                    h.end(why, detail.clone());
                }
            }
            self.act(todo);
        }
        let (_, todo) = self.run(|g| g.core.close());
        self.act(todo);
        orphans
    }

    /// Attaches a stream taken from a lost circuit to `new` (another
    /// circuit to the same exit) with a `Resume`, and waits for the exit's
    /// answer. On failure the stream comes back, to try elsewhere.
    pub async fn adopt(
        h: &Arc<StreamHandle>,
        new: &Arc<Endpoint>,
        stream: Stream,
    ) -> Result<(), (CoreError, Option<Box<Stream>>)> {
        Self::reattach(h, new, stream).await
    }

    /// Sends a control reply (sealed for the origin).
    pub async fn send_control(self: &Arc<Self>, body: &[u8]) -> Result<(), CircuitError> {
        let (r, todo) = self.run(|g| g.core.send_control(body));
        self.act(todo);
        r?;
        self.flush().await
    }

    /// Opens a CONTROL cell from the origin; returns the EXTEND in it.
    pub fn on_control(
        self: &Arc<Self>,
        buf: BytesMut,
    ) -> Result<Option<ferry_proto::pb::Extend>, CircuitError> {
        // Opening a CONTROL cell queues nothing: no flush to start.
        self.heard.store(true, Ordering::Relaxed);
        let (r, todo) = self.run(|g| g.core.handle_control(buf));
        self.act(todo);
        match r?.msg {
            Some(ferry_proto::pb::control::Msg::Extend(e)) => Ok(Some(e)),
            None => Ok(None),
        }
    }

    /// Opens a RELAY cell and acts on its stream message.
    pub fn on_relay(self: &Arc<Self>, buf: BytesMut) -> Result<(), CircuitError> {
        // Whether the cell queued an answer is read under the same lock, so
        // a DATA cell (which queues nothing) costs no second lock; a RESUME
        // queues its answer while it is acted on.
        self.heard.store(true, Ordering::Relaxed);
        let ((r, queued), todo) = self.run(|g| {
            let r = g.core.handle_relay(buf, now_us());
            (r, g.core.has_transmits())
        });
        let resumes = todo.iter().any(|(e, ..)| matches!(e, Event::Resume { .. }));
        self.act(todo);
        if queued || resumes {
            self.kick();
        }
        r
    }

    /// Opens a stream to `host:port` from this (origin) side: BEGIN.
    /// CONNECTED or an end arrives on the parts' inbound.
    pub async fn begin(
        self: &Arc<Self>,
        host: &str,
        port: u16,
    ) -> Result<StreamParts, CircuitError> {
        if self.is_closed() {
            return Err(CoreError::Closed);
        }
        let (h, inbound) = StreamHandle::new([0; 16]);
        let (r, todo) = self.run(|g| {
            let id = g.core.open(host, port)?;
            g.handles.insert(id, h.clone());
            Ok::<_, CoreError>(id)
        });
        // Nobody else knows the handle yet: pointing it here after the
        // session's lock is released keeps the lock order.
        if let Ok(id) = &r {
            h.at().loc = Some((self.clone(), *id));
        }
        self.act(todo);
        r?;
        self.flush().await?;
        Ok(StreamParts { handle: h, inbound })
    }

    /// Origin: moves `h` onto `new` (a circuit to the same exit). If the
    /// move fails the stream goes back to its old circuit, if that lives;
    /// if the exit no longer has it, it ends.
    pub async fn move_stream(
        h: &Arc<StreamHandle>,
        new: &Arc<Endpoint>,
    ) -> Result<(), CircuitError> {
        let old = {
            let at = h.at();
            match &at.loc {
                Some((old, _)) if !at.ended => old.clone(),
                _ => return Err(CoreError::Closed),
            }
        };
        match Self::resume_on(h, new).await {
            Ok(()) => Ok(()),
            Err((CoreError::UnknownStream, _)) => Err(CoreError::UnknownStream),
            Err((e, Some(stream))) => {
                // Back to the old circuit, if it lives; else again to the
                // new one (the exit may have taken it there after all).
                let back = if !old.is_closed() { &old } else { new };
                if !back.is_closed() {
                    match Self::reattach(h, back, *stream).await {
                        Ok(()) => {
                            debug!("move failed; the stream carries on");
                            return if Arc::ptr_eq(back, new) {
                                Ok(())
                            } else {
                                Err(e)
                            };
                        }
                        Err((CoreError::UnknownStream, _)) => return Err(CoreError::UnknownStream),
                        Err(_) => {}
                    }
                }
                h.end(
                    EndReason::CircuitClosed,
                    format!("stream move failed and its circuit is gone: {e}"),
                );
                Err(e)
            }
            Err((e, None)) => Err(e),
        }
    }

    /// Detaches `h` from its session and attaches it to `new`, then waits
    /// for the move's outcome.
    async fn resume_on(
        h: &Arc<StreamHandle>,
        new: &Arc<Endpoint>,
    ) -> Result<(), (CoreError, Option<Box<Stream>>)> {
        let stream = {
            let mut at = h.at();
            let Some((old, oid)) = at.loc.clone() else {
                return Err((CoreError::Closed, None));
            };
            let (s, todo) = old.run(|g| {
                g.handles.remove(&oid);
                g.core.detach(oid)
            });
            at.loc = None;
            drop(at);
            old.act(todo);
            old.kick();
            s.ok_or((CoreError::Closed, None))?
        };
        Self::reattach(h, new, stream).await
    }

    /// Attaches a detached stream to `end` with a `Resume`, and waits for
    /// the outcome (the session's timeout is driven from here).
    async fn reattach(
        h: &Arc<StreamHandle>,
        end: &Arc<Endpoint>,
        stream: Stream,
    ) -> Result<(), (CoreError, Option<Box<Stream>>)> {
        let (tx, mut rx) = oneshot::channel();
        *h.moved.lock().expect("move lock") = Some(tx);
        {
            let mut at = h.at();
            let (r, todo) = end.run(|g| match g.core.attach_resume(stream, now_ms()) {
                Ok(id) => {
                    g.handles.insert(id, h.clone());
                    if at.pending > 0 && g.core.consumed(id, at.pending).is_ok() {
                        at.pending = 0;
                    }
                    Ok(id)
                }
                Err(e) => Err(e),
            });
            match r {
                Ok(id) => at.loc = Some((end.clone(), id)),
                Err((e, s)) => {
                    at.loc = None;
                    drop(at);
                    end.act(todo);
                    h.moved.lock().expect("move lock").take();
                    return Err((e, Some(s)));
                }
            }
            drop(at);
            end.act(todo);
        }
        // A closed link closes the circuit, and the close hands the stream
        // back here; so a failed send needs no handling of its own.
        let _ = end.flush().await;
        let deadline = tokio::time::sleep(RESUME_TIMEOUT + Duration::from_millis(50));
        tokio::select! {
            r = &mut rx => return r.unwrap_or(Err((CoreError::Closed, None))),
            _ = deadline => {}
        }
        let (_, todo) = end.run(|g| g.core.handle_timeout(now_ms()));
        end.act(todo);
        end.kick();
        rx.await.unwrap_or(Err((CoreError::Closed, None)))
    }

    /// Exit: BEGIN for `id`: connect, then carry the stream.
    fn begin_at_exit(self: &Arc<Self>, id: u32, host: String, port: u16, parts: StreamParts) {
        let me = self.clone();
        let span = info_span!("stream", circ = self.circ, stream = id);
        self.tasks
            .spawn(async move { me.exit_stream(id, host, port, parts).await }.instrument(span));
    }

    async fn exit_stream(self: Arc<Self>, id: u32, host: String, port: u16, parts: StreamParts) {
        let h = parts.handle.clone();
        let refuse = |reason: EndReason, detail: String| {
            let (_, todo) = self.run(|g| {
                g.handles.remove(&id);
                g.core.refuse(id, reason, &detail)
            });
            self.act(todo);
        };
        let Some(exit) = self.exit.clone() else {
            refuse(EndReason::Policy, "this node is not an exit".into());
            return;
        };
        if !exit.registry().has_room() {
            exit.metrics
                .node
                .refusals
                .with_label_values(&["capacity"])
                .inc();
            refuse(
                EndReason::Capacity,
                "this exit holds its most streams".into(),
            );
            return;
        }
        let sock = match connect_target(&exit, &host, port).await {
            Ok(s) => s,
            Err((reason, detail)) => {
                info!(reason = reason.as_str_name(), %detail, "stream refused at exit");
                refuse(reason, detail);
                let _ = self.flush().await;
                return;
            }
        };
        if h.is_ended() {
            // The origin gave up (or the circuit went) while we connected.
            return;
        }
        // Known by its token before the origin can present it.
        exit.registry().live(h.token, h.clone());
        let (r, todo) = self.run(|g| g.core.accept(id, h.token));
        self.act(todo);
        if !matches!(r, Ok(Outcome::Done)) || self.flush().await.is_err() {
            exit.registry().forget(&h.token);
            h.gone(&self);
            return;
        }
        exit.metrics.stream.opened.inc();
        let why = run_stream(sock, parts, &crate::limits::Pace::none()).await;
        exit.metrics.stream.closed.with_label_values(&[why]).inc();
    }

    /// Exit: the origin moves a stream onto this circuit as `id`.
    fn resume_here(
        self: &Arc<Self>,
        id: u32,
        token: Token,
        received: u64,
        fin: bool,
        attempt: u32,
    ) {
        let Some(exit) = self.exit.clone() else {
            let (_, todo) = self.run(|g| g.core.refuse_move(id));
            return self.act(todo);
        };
        let mut found = exit.registry().find(&token);
        let mut retried = false;
        loop {
            match found {
                Found::Live(h) => {
                    let mut at = h.at();
                    let Some((old, oid)) = at.loc.clone() else {
                        drop(at);
                        if !retried {
                            // Its circuit is closing right now: it is
                            // about to be parked.
                            retried = true;
                            found = exit.registry().find(&token);
                            continue;
                        }
                        info!(reason = "stream not attached", "stream move refused");
                        let (_, todo) = self.run(|g| g.core.refuse_move(id));
                        return self.act(todo);
                    };
                    let (taken, todo) = old.run(|g| {
                        let r = g.core.take_for_move(oid, attempt, received);
                        if r.is_ok() {
                            g.handles.remove(&oid);
                        }
                        r
                    });
                    let stream = match taken {
                        Ok(s) => s,
                        Err(e) => {
                            drop(at);
                            old.act(todo);
                            debug!(error = %e, "stale stream move refused");
                            let (_, todo) = self.run(|g| g.core.refuse_move(id));
                            return self.act(todo);
                        }
                    };
                    at.loc = None;
                    drop(at);
                    old.act(todo);
                    // A probe the stream's leaving queued there goes too.
                    old.kick();
                    return self.accept_here(&exit, h, id, stream, attempt, received, fin);
                }
                Found::Parked(h, stream) => {
                    return self.accept_here(&exit, h, id, *stream, attempt, received, fin);
                }
                Found::Completed(r) => {
                    let (_, todo) = self.run(|g| g.core.answer_completed(id, r));
                    return self.act(todo);
                }
                Found::Unknown => {
                    info!(reason = "unknown resume token", "stream move refused");
                    let (_, todo) = self.run(|g| g.core.refuse_move(id));
                    return self.act(todo);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn accept_here(
        self: &Arc<Self>,
        exit: &ExitCtx,
        h: Arc<StreamHandle>,
        id: u32,
        stream: Stream,
        attempt: u32,
        received: u64,
        fin: bool,
    ) {
        let mut at = h.at();
        let (r, todo) =
            self.run(
                |g| match g.core.accept_move(id, stream, attempt, received, fin) {
                    Ok(()) => {
                        g.handles.insert(id, h.clone());
                        if at.pending > 0 && g.core.consumed(id, at.pending).is_ok() {
                            at.pending = 0;
                        }
                        Ok(())
                    }
                    Err((e, s)) => {
                        let _ = g.core.refuse_move(id);
                        Err((e, s))
                    }
                },
            );
        match r {
            Ok(()) => {
                at.loc = Some((self.clone(), id));
                h.moves.fetch_add(1, Ordering::Relaxed);
                drop(at);
                exit.registry().live(h.token, h.clone());
                debug!(stream = id, "stream moved onto this circuit");
            }
            Err((e, s)) => {
                drop(at);
                debug!(error = %e, "stream move refused; the stream stays parked");
                exit.registry().park(h.clone(), *s, now_ms());
            }
        }
        h.wake();
        self.act(todo);
    }
}

pub use crate::metrics::{CLOSE_REASONS, CloseReason};

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

/// `stopped`: this direction was stopped because the other one failed.
const STOPPED: CloseReason = "stopped";

/// Carries a connected stream both ways until both directions end, and
/// says why it ended. An abnormal end resets the socket (RST), so the
/// client can tell it from a clean close.
pub async fn run_stream(mut sock: TcpStream, parts: StreamParts, pace: &Pace) -> CloseReason {
    let StreamParts { handle, inbound } = parts;
    let stop = CancellationToken::new();
    let (r, w) = sock.split();
    let up = pump_up(&handle, r, pace, stop.clone());
    let down = pump_down(&handle, w, inbound, pace, stop.clone());
    let (up, down) = tokio::join!(up, down);
    let reason = [down, up]
        .into_iter()
        .find(|r| *r != "done" && *r != STOPPED)
        .unwrap_or("done");
    if reason != "done" {
        let _ = sock.set_zero_linger();
    }
    handle.linger();
    debug!(moves = handle.moves(), reason, "stream closed");
    reason
}

/// The least room a stream's socket reader takes for one read.
const READ_MIN: usize = 4 * 1024;

/// The longest a stream's socket writer leaves what its socket took
/// unacknowledged ([`ferry_circuit::Session::acknowledge`]): TCP's delayed
/// acknowledgement, at its usual bound. A busy stream also acknowledges by
/// the quarter window, sooner.
const ACK_DELAY: Duration = Duration::from_millis(200);

/// Room for the next read of a stream's socket, after one of `last` bytes
/// into `size` bytes of room: doubled after a read that filled it (up to a
/// record), halved after one that used under a quarter (down to
/// [`READ_MIN`]). A stream holds room for about what it carries: 1,000
/// slow streams hold 4 KiB each, not a record each.
fn next_read_size(size: usize, last: usize) -> usize {
    if last >= size {
        (size * 2).min(MAX_DATA_PAYLOAD)
    } else if last < size / 4 {
        (size / 2).max(READ_MIN)
    } else {
        size
    }
}

/// One read of at most `size` bytes into `buf`, from a socket that said it
/// is readable, without waiting: `WouldBlock` if it has nothing after all,
/// or if the task's cooperative budget is spent (tokio's `poll_read` takes
/// a unit of it; the caller must then yield, as [`pump_up`] does).
///
/// It reads through tokio's `poll_read`: a read that fills less than the
/// room it was offered drained the socket, and `poll_read` then clears the
/// socket's readiness (tokio does so on epoll and kqueue), so the stream's
/// next wait goes to the reactor at once. `try_read_buf`, used before,
/// keeps the readiness, and the next turn made a `recv` that could only
/// say "would block": one more system call a record at each end, and on
/// the record's way, since the link's writer runs only once the stream's
/// task yields (`perf trace -s` of an entry under `load pingpong`: three
/// `recvfrom` a round trip, one of them failing; now two).
fn read_ready(
    r: &mut tokio::net::tcp::ReadHalf<'_>,
    buf: &mut BytesMut,
    size: usize,
) -> std::io::Result<usize> {
    // Pending: the socket was empty after all (its readiness is cleared
    // now), or the budget is spent. Either way the waker the read left is
    // a no-op one, in the slot that only `poll_read` uses: `readable()`,
    // which the stream waits on, keeps its own.
    futures::FutureExt::now_or_never(r.read_buf(&mut (&mut *buf).limit(size)))
        .unwrap_or_else(|| Err(std::io::ErrorKind::WouldBlock.into()))
}

/// Socket → circuit.
async fn pump_up(
    h: &StreamHandle,
    mut r: tokio::net::tcp::ReadHalf<'_>,
    pace: &Pace,
    stop: CancellationToken,
) -> CloseReason {
    let mut size = READ_MIN;
    let mut buf = BytesMut::new();
    loop {
        // Room is taken once bytes are there, sized for them, and a stream
        // that waits for its client holds none: what is left of the last
        // read's room goes before the wait (a busy socket is readable at
        // once, and keeps its room for the next read). So a stream that
        // reads, waits and reads again (request and response) allocates
        // its room once a read, where it used to take its buffer back;
        // `load small` measured no difference (benches/README, Scale).
        if stop.is_cancelled() {
            return STOPPED;
        }
        let ready = match futures::FutureExt::now_or_never(r.readable()) {
            Some(ready) => ready,
            None => {
                buf = BytesMut::new();
                tokio::select! {
                    r = r.readable() => r,
                    _ = stop.cancelled() => return STOPPED,
                }
            }
        };
        let read = ready.and_then(|()| {
            buf.reserve(HEADROOM + size + 2 * ferry_proto::TAG_LEN);
            buf.put_bytes(0, HEADROOM);
            read_ready(&mut r, &mut buf, size)
        });
        let shrink = match read {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                buf.clear();
                // `read_ready` also says "would block" when this task's
                // budget (tokio's cooperative scheduling) is spent and the
                // socket is still readable: the loop would find it readable
                // and fail again, never yielding. This yields when the
                // budget is spent, and the task comes back with a fresh one.
                tokio::task::coop::consume_budget().await;
                continue;
            }
            Ok(0) => {
                h.finish(EndReason::Done, "").await;
                return "done";
            }
            Ok(n) => {
                h.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
                if pace.is_active() {
                    tokio::select! {
                        _ = pace.take(Way::Up, n) => {}
                        _ = stop.cancelled() => return STOPPED,
                    }
                }
                let next = next_read_size(size, n);
                std::mem::replace(&mut size, next) > next
            }
            Err(e) => {
                debug!(error = %e, "stream read failed");
                h.finish(EndReason::Reset, "connection reset").await;
                stop.cancel();
                return "reset";
            }
        };
        // Room for the tag the seal appends, inside the record's own
        // capacity: a split record has none past its length, and the seal
        // would copy the whole record into a larger buffer to add 16 bytes.
        // And for the link's tag, appended by the link's writer.
        buf.put_bytes(0, 2 * ferry_proto::TAG_LEN);
        let mut rec = buf.split();
        rec.truncate(rec.len() - 2 * ferry_proto::TAG_LEN);
        if shrink {
            // Smaller records from here: the next allocation is sized for
            // them (the buffer kept would stay a record's size).
            buf = BytesMut::new();
        }
        loop {
            let wait = h.waiter();
            match h.send(rec) {
                Send::Sent(end) => {
                    // The record is in the stream's resend ring: if the
                    // circuit closed meanwhile, it goes again wherever the
                    // stream moves (or the close ends the stream, and the
                    // next send says so).
                    let _ = end.flush().await;
                    break;
                }
                Send::Wait(b) => {
                    rec = b;
                    tokio::select! {
                        _ = wait => {}
                        _ = stop.cancelled() => return STOPPED,
                    }
                }
                Send::Over => {
                    stop.cancel();
                    return "circuit_closed";
                }
            }
        }
    }
}

/// Circuit → socket.
async fn pump_down(
    h: &StreamHandle,
    mut w: tokio::net::tcp::WriteHalf<'_>,
    mut inbound: InboundRx,
    pace: &Pace,
    stop: CancellationToken,
) -> CloseReason {
    // When to acknowledge what the socket took: ACK_DELAY after the first
    // byte taken since the last acknowledgement (a deadline that later
    // bytes do not push back, so a stream that trickles is acknowledged
    // too, as TCP's delayed ACK is). One timer for the stream's life,
    // armed while bytes wait: it stays registered with the runtime across
    // records, where a new sleep each turn registered a timer and removed
    // it again for every record received.
    let ack = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(ack);
    let mut armed = false;
    loop {
        let m = tokio::select! {
            m = inbound.recv() => m,
            () = &mut ack, if armed => {
                armed = false;
                if let Op::Done(_, end) = h.acknowledge() {
                    let _ = end.flush().await;
                }
                continue;
            }
            _ = stop.cancelled() => return STOPPED,
        };
        match m {
            Some(Inbound::Data(b)) => {
                if pace.is_active() {
                    tokio::select! {
                        _ = pace.take(Way::Down, b.len()) => {}
                        _ = stop.cancelled() => return STOPPED,
                    }
                }
                let wrote = tokio::select! {
                    r = w.write_all(&b) => r,
                    _ = stop.cancelled() => return STOPPED,
                };
                if let Err(e) = wrote {
                    debug!(error = %e, "stream write failed");
                    h.finish(EndReason::Reset, "connection reset").await;
                    stop.cancel();
                    return "reset";
                }
                h.bytes_down.fetch_add(b.len() as u64, Ordering::Relaxed);
                // A circuit that closed meanwhile loses the acknowledgement
                // only: a move carries what was received, and a close that
                // ends the stream says so on `inbound`.
                if let Op::Done((), end) = h.consumed(b.len() as u64) {
                    let _ = end.flush().await;
                }
                if !armed {
                    ack.as_mut().reset(tokio::time::Instant::now() + ACK_DELAY);
                    armed = true;
                }
            }
            Some(Inbound::Connected) => {}
            Some(Inbound::Finished) => {
                let _ = w.shutdown().await;
                return "done";
            }
            Some(Inbound::Reset(reason, detail)) => {
                if matches!(reason, EndReason::ExitLeft | EndReason::CircuitClosed) {
                    // The detail is the peer's text: debug only.
                    info!(reason = reason.as_str_name(), "stream closed");
                    debug!(%detail, "stream close detail");
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
    host: &str,
    port: u16,
) -> Result<TcpStream, (EndReason, String)> {
    if port == 0 {
        return Err((EndReason::HostUnreachable, "port out of range".to_string()));
    }
    if host.is_empty() || host.len() > 255 {
        return Err((EndReason::HostUnreachable, "bad host name length".into()));
    }
    let addrs = exit.resolve(host, port).await?;
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
        match tokio::time::timeout(exit.connect_timeout, connect_bounded(a)).await {
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

/// The receive buffer of a stream's socket at either end: a client's at
/// the entry, a target's at the exit (the kernel doubles it for its own
/// overhead). An end reads the socket only as fast as its stream goes, so
/// a peer that sends faster parks its bytes in this node's kernel:
/// autotuned, a client's buffer grew to 2.5 MB and a target's to 1.26 MB
/// (`tests/tests/memory.rs`), so a few hundred such streams put the host
/// past its TCP memory (`tcp_mem`), where the kernel drops segments on
/// every socket, the mesh's links among them. The stream's own window (2
/// MiB) is what carries it; this is only the slack in front of it.
pub const STREAM_RCVBUF: usize = 256 * 1024;

/// Connects to `a` with a receive buffer of [`STREAM_RCVBUF`], set before
/// the connect so the window it offers fits it.
async fn connect_bounded(a: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    let s = if a.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    s.set_recv_buffer_size(STREAM_RCVBUF as u32)?;
    s.connect(a).await
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
mod inbound_tests {
    use super::*;

    /// Tiny payloads queued behind a busy writer are copied into one
    /// compact buffer: 100,000 one-byte cells cut from big read chunks
    /// hold about 100 KB, not a chunk (or a frame) each; order is kept,
    /// and an end still comes after the data.
    #[tokio::test]
    async fn tiny_cells_queue_compactly_and_in_order() {
        let (tx, mut rx) = InboundQueue::new();
        // A read chunk as the link reads it; each cell a slice of it.
        let mut chunk = BytesMut::with_capacity(256 * 1024);
        chunk.resize(256 * 1024, 0);
        let first = chunk.split_to(10);
        tx.send(Inbound::Data(first));
        for i in 0..100_000u32 {
            if chunk.len() < 2 {
                chunk = BytesMut::zeroed(256 * 1024);
            }
            let mut one = chunk.split_to(1);
            one[0] = (i % 251) as u8;
            tx.send(Inbound::Data(one));
        }
        tx.send(Inbound::Finished);
        assert_eq!(tx.queued_bytes(), 100_010);
        // Three items: the first slice as it came, one compact buffer, the end.
        assert_eq!(tx.lock().items.len(), 3);
        let Some(Inbound::Data(a)) = rx.recv().await else {
            panic!("data first")
        };
        assert_eq!(a.len(), 10);
        let Some(Inbound::Data(b)) = rx.recv().await else {
            panic!("then the compact buffer")
        };
        assert_eq!(b.len(), 100_000);
        assert!(
            b.capacity() < 2 * 100_000 + COMPACT_CHUNK,
            "{}",
            b.capacity()
        );
        assert!(b.iter().enumerate().all(|(i, x)| *x == (i % 251) as u8));
        assert!(matches!(rx.recv().await, Some(Inbound::Finished)));
        tx.close();
        assert!(rx.recv().await.is_none());
    }

    /// Once the writer is gone, nothing more is held.
    #[tokio::test]
    async fn a_gone_writer_holds_nothing() {
        let (tx, rx) = InboundQueue::new();
        drop(rx);
        tx.send(Inbound::Data(BytesMut::from(&b"lost"[..])));
        assert_eq!(tx.queued_bytes(), 0);
    }
}

#[cfg(test)]
mod read_tests {
    use super::*;
    use futures::FutureExt;
    use tokio::net::TcpListener;

    const WAIT: Duration = Duration::from_secs(5);

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Waits until `n` bytes wait in `r`'s socket (an accepted socket
    /// starts out as readable, whatever it holds).
    async fn arrived(r: &mut tokio::net::tcp::ReadHalf<'_>, n: usize) {
        let mut peek = vec![0u8; n + 1];
        tokio::time::timeout(WAIT, async {
            while r.peek(&mut peek).await.unwrap() < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the bytes arrived");
    }

    /// A read made with the task's budget spent says "would block" though
    /// bytes wait, and leaves them there: yielding for a fresh budget (as
    /// `pump_up` does on "would block") reads them. Without that yield the
    /// stream's reader spun: readable, "would block", readable...
    #[tokio::test]
    async fn a_read_without_budget_waits_for_a_fresh_one() {
        let (mut a, mut b) = pair().await;
        let (mut r, _w) = b.split();
        a.write_all(b"ping").await.unwrap();
        arrived(&mut r, 4).await;
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        for _ in 0..1024 {
            tx.try_send(()).unwrap();
        }
        while tokio::task::coop::has_budget_remaining() {
            rx.recv().await.unwrap();
        }
        let mut buf = BytesMut::with_capacity(4096);
        let e = read_ready(&mut r, &mut buf, 4096).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        assert!(buf.is_empty());
        assert!(
            r.readable().now_or_never().is_some(),
            "the bytes still wait"
        );
        tokio::task::coop::consume_budget().await;
        assert_eq!(read_ready(&mut r, &mut buf, 4096).unwrap(), 4);
        assert_eq!(&buf[..], b"ping");
    }

    /// Reads `r` until its peer's close, each read as the stream's reader
    /// does it (wait for readable, then one read): what it read.
    async fn read_to_end(r: &mut tokio::net::tcp::ReadHalf<'_>, buf: &mut BytesMut) {
        loop {
            tokio::time::timeout(WAIT, r.readable())
                .await
                .expect("the socket woke its reader")
                .unwrap();
            buf.reserve(4096);
            match read_ready(r, buf, 4096) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::task::coop::consume_budget().await
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// A read that takes less than its room drained the socket: the next
    /// wait goes to the reactor (no `recv` that can only fail), and what
    /// comes later, the peer's close included, still wakes it. A read that
    /// fills its room leaves the socket readable, so nothing is stranded.
    #[tokio::test]
    async fn a_draining_read_waits_and_a_full_one_reads_on() {
        let (mut a, mut b) = pair().await;
        let (mut r, _w) = b.split();
        let mut buf = BytesMut::with_capacity(16 * 1024);

        a.write_all(b"ping").await.unwrap();
        arrived(&mut r, 4).await;
        assert_eq!(read_ready(&mut r, &mut buf, 4096).unwrap(), 4);
        // Tokio clears readiness on a short read where the poller is
        // edge-triggered (epoll here); elsewhere the next turn's `recv`
        // says "would block", as before.
        if cfg!(target_os = "linux") {
            assert!(
                r.readable().now_or_never().is_none(),
                "the socket still says readable after a read that drained it"
            );
        }

        // 8,000 bytes queued, read 4,096 at a time: the first read fills
        // its room and the socket stays readable.
        let block: Vec<u8> = (0..8000u32).map(|i| (i % 251) as u8).collect();
        a.write_all(&block).await.unwrap();
        arrived(&mut r, block.len()).await;
        buf.clear();
        assert_eq!(read_ready(&mut r, &mut buf, 4096).unwrap(), 4096);
        assert!(
            r.readable().now_or_never().is_some(),
            "a read that filled its room left the rest stranded"
        );
        assert_eq!(read_ready(&mut r, &mut buf, 4096).unwrap(), 8000 - 4096);
        assert_eq!(&buf[..], &block[..]);

        // Bytes and then the close, after a draining read.
        a.write_all(b"the end").await.unwrap();
        a.shutdown().await.unwrap();
        buf.clear();
        read_to_end(&mut r, &mut buf).await;
        assert_eq!(&buf[..], b"the end");
    }
}
