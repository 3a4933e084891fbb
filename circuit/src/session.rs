//! One end of a circuit's end-to-end session, and the streams on it.
//!
//! A [`Session`] is the origin's end or the exit's end of the Noise session
//! that runs inside a circuit. It seals what it sends, opens what it
//! receives, and keeps every stream attached to it by value, in an explicit
//! [`Phase`]. It does no I/O and reads no clock: the shell feeds it cells
//! ([`Session::handle_relay`]), socket progress ([`Session::send_data`],
//! [`Session::consumed`], [`Session::finish`]) and the time
//! ([`Session::handle_timeout`]), and takes out sealed cells
//! ([`Session::poll_transmit`]) and events ([`Session::poll_event`]), as
//! quinn-proto's `Connection` does.
//!
//! # Flow control
//!
//! A sender may have at most the receiver's window unacknowledged; the
//! receiver acknowledges (WINDOW) only what its socket took, so a slow reader
//! stalls its own stream and nothing else, and no node buffers more than the
//! window per stream. A peer that sends past the window breaks the protocol.
//! A receiver acknowledges a quarter window at a time while a stream is
//! busy, and whatever else its socket took a short while after it took it
//! ([`Session::acknowledge`], at most 200 ms later in `ferry-node`), so a
//! sender holds about what a stream has in flight, not a quarter window.
//!
//! # Congestion control
//!
//! Flow control bounds what a receiver takes; [`crate::congestion`] bounds
//! what the path holds. Each end keeps a congestion window over all its
//! streams on the circuit, measured with PROBE and PONG (only with a peer
//! that said it answers them, in BEGIN, CONNECTED, RESUME or RESUMED, and
//! only when [`Config::congestion`] is on). A stream stopped for want of
//! circuit room (this window, or [`CIRCUIT_WINDOW`]) waits in line, and as
//! room comes back streams are called in the order they stopped, each whose
//! record fits the room left, a record each, so the streams of a circuit
//! take turns: a small stream's request waits behind at most one round of a
//! bulk stream's, not behind all it could queue.
//!
//! # Offsets, and moving a stream
//!
//! A [`Stream`] is not tied to one circuit. DATA carries the offset of its
//! first byte and WINDOW the absolute count consumed, so each sender keeps
//! what the peer has not consumed (at most the window) and can send it again.
//! To move a stream (make-before-break, when a relay drains) the origin
//! [detaches](Session::detach) it from the old session and
//! [attaches](Session::attach_resume) it to a session on a new circuit to the
//! same exit, which sends `Resume` with the exit's token and what the origin
//! has received; the exit finds the stream by token, detaches it from its old
//! session and [accepts](Session::accept_move) it, answering `Resumed` with
//! what it has received; each side sends again from the other's count. A
//! session drops messages for streams it does not hold, so bytes still in
//! flight on the old circuit are dropped and sent again: none is lost,
//! duplicated or reordered. Every move ends in exactly one event:
//! [`Event::Moved`], [`Event::MoveFailed`] (the stream is handed back, to be
//! attached elsewhere: a `Resume` can go on any circuit to the exit, the old
//! one included), or [`Event::Reset`] when the exit no longer has it.
//!
//! # Ending a stream
//!
//! END occupies one offset after the last byte, as TCP's FIN does: the
//! receiver's WINDOW counts it once every byte before it was consumed. A side
//! forgets a cleanly ended stream (and the exit its resume token) only when
//! it has sent END and the peer acknowledged every byte and the END, and it
//! has received the peer's END and acknowledged it: until then the stream
//! can still move, so a move in the last moments of a stream cannot cut it
//! short. An abnormal END ([`EndReason`] other than `Done`) ends the stream at
//! once, and reaches the other side's client as an error ([`Event::Reset`]),
//! never as a clean end.

use crate::congestion::{Congestion, Snapshot};
use crate::crypto::{Opener, Sealer};
use crate::error::{Error, Result};
use crate::ring::Ring;
use bytes::{BufMut, BytesMut};
use ferry_proto::pb::{self, EndReason};
use ferry_proto::stream::{self as smsg, StreamKind, StreamMsg};
use ferry_proto::{CellCmd, MAX_DATA_PAYLOAD, TAG_LEN, cell};
use prost::Message;
use std::collections::{HashMap, VecDeque};

/// Bytes in front of a DATA payload in its cell: cell header, stream
/// header, offset. [`Session::send_data`] takes a buffer with this much room
/// before the payload, so the payload is never copied to be framed.
pub const HEADROOM: usize = cell::HEADER_LEN + smsg::HEADER_LEN + smsg::DATA_OFFSET_LEN;

/// A stream's resume token: the exit's secret that moves it.
pub type Token = [u8; 16];

/// Which end of the session this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The circuit's origin: opens streams (BEGIN), moves them (RESUME).
    Origin,
    /// The circuit's tip: takes BEGIN and RESUME.
    Exit,
}

/// Bytes a sender keeps unacknowledged on one circuit, over all its
/// streams (each also within its own window).
///
/// Streams have windows of their own, but a circuit carries up to hundreds
/// of streams, and relays queue what a circuit sends faster than the next
/// link takes it (`ferry-node`'s per-circuit forwarding queues, which keep
/// one circuit from stalling the others on a link). This bound, kept by
/// every sender, is what bounds those queues: a relay holds at most about
/// this much for a circuit each way from an honest sender, and may destroy
/// a circuit that queues more than twice it. No wire change: it is each
/// sender's own discipline over the acknowledgements it already gets.
///
/// The price is head-of-line blocking between the streams of one circuit:
/// bytes a receiving socket has not read yet count until it does, so
/// sixteen streams whose clients stopped reading (2 MiB windows) hold the
/// whole window. A receiver that reported what it has *received* apart
/// from what it has consumed would let the window count only what is on
/// the way; not built yet.
pub const CIRCUIT_WINDOW: u64 = 32 << 20;

/// A session's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Our receive window per stream, in bytes.
    pub window: u32,
    /// Most streams attached at once (the exit refuses more with END).
    pub max_streams: usize,
    /// How long a move waits for `Resumed`, in ms.
    pub resume_timeout_ms: u64,
    /// Congestion control (see [`crate::congestion`]): probe the path and
    /// keep in flight what it carries. Off, the session neither probes nor
    /// says it answers probes (it still answers a peer's).
    pub congestion: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            window: 1 << 20,
            max_streams: 1024,
            resume_timeout_ms: 10_000,
            congestion: true,
        }
    }
}

/// Where a stream is in its life, on the session that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Origin: BEGIN sent, waiting for CONNECTED or END.
    Opening,
    /// Exit: BEGIN received; the shell is connecting ([`Session::accept`]
    /// or [`Session::refuse`]).
    Connecting,
    /// Carrying data.
    Open,
    /// Origin: RESUME sent on this session; waiting for `Resumed` until
    /// `deadline` (ms). Sends wait; receives go on.
    Moving {
        /// When the move fails for want of an answer.
        deadline: u64,
    },
}

/// One stream, independent of the circuit that carries it now.
#[derive(Debug)]
pub struct Stream {
    phase: Phase,
    // Our direction.
    /// Offset of the next byte to send.
    sent: u64,
    /// Bytes the peer consumed (its WINDOW).
    acked: u64,
    /// Payload in `[acked, sent)`: what a move sends again.
    ring: Ring,
    /// The peer's receive window.
    peer_window: u64,
    /// The END this side sent, if it did.
    fin_sent: Option<(EndReason, String)>,
    /// Bytes the peer is known to have received (WINDOW or `Resumed`).
    peer_received: u64,
    /// The peer is known to have received our END.
    peer_fin: bool,
    // The peer's direction.
    /// Our receive window.
    window: u32,
    /// Offset of the next byte expected.
    received: u64,
    /// Bytes our socket took.
    consumed: u64,
    /// The peer's END arrived.
    fin_received: bool,
    /// The last acknowledgement we sent.
    ack_sent: u64,
    token: Token,
    moves: u32,
    /// Origin: moves tried. Exit: the newest move taken.
    attempt: u32,
    /// Its place in the session's line for circuit room.
    turn: Turn,
    /// While in line or called: the bytes of the record it was refused
    /// (what a call must leave it room for).
    wants: u64,
}

/// A stream's place in its session's line for circuit room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// Not in line: it may send while nobody waits.
    Free,
    /// In line.
    Waiting,
    /// Called from the line: its next record goes if there is room (and
    /// if there is none, it goes back to the front).
    Called,
}

impl Stream {
    fn new(phase: Phase, window: u32, peer_window: u32, token: Token) -> Self {
        Self {
            phase,
            sent: 0,
            acked: 0,
            ring: Ring::default(),
            peer_window: u64::from(peer_window),
            fin_sent: None,
            peer_received: 0,
            peer_fin: false,
            window,
            received: 0,
            consumed: 0,
            fin_received: false,
            ack_sent: 0,
            token,
            moves: 0,
            attempt: 0,
            turn: Turn::Free,
            wants: 0,
        }
    }

    /// Its phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The exit's resume token (zero at the origin until CONNECTED).
    pub fn token(&self) -> Token {
        self.token
    }

    /// Times it moved to another circuit.
    pub fn moves(&self) -> u32 {
        self.moves
    }

    /// Bytes sent and received so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.sent, self.received)
    }

    /// Whether this side sent END.
    pub fn fin_sent(&self) -> bool {
        self.fin_sent.is_some()
    }

    /// Bytes it may send now: the peer's window (never more than ours, so
    /// what we keep for resending is bounded by our own configuration) less
    /// what is unacknowledged; none after END or while moving.
    pub fn credit(&self) -> u64 {
        if self.fin_sent.is_some() || matches!(self.phase, Phase::Moving { .. }) {
            return 0;
        }
        let limit = self.peer_window.min(u64::from(self.window));
        (self.acked + limit).saturating_sub(self.sent)
    }

    /// What our WINDOW says: bytes consumed, plus one for the peer's END
    /// once every byte before it was consumed.
    fn ack_value(&self) -> u64 {
        self.consumed + u64::from(self.fin_received && self.consumed == self.received)
    }

    /// Both ends have everything, and know it: nothing can need sending
    /// again, so the stream can be forgotten.
    fn complete(&self) -> bool {
        matches!(&self.fin_sent, Some((EndReason::Done, _)))
            && self.peer_fin
            && self.peer_received == self.sent
            && self.fin_received
            && self.consumed == self.received
            && self.ack_sent == self.ack_value()
    }

    /// The peer acknowledged `ack` (its consumed count, plus one for our
    /// END). Returns whether credit grew.
    fn on_ack(&mut self, ack: u64) -> Result<bool> {
        let most = self.sent + u64::from(self.fin_sent.is_some());
        if ack > most {
            return Err(Error::Protocol(format!(
                "acknowledged {ack} bytes of {} sent",
                self.sent
            )));
        }
        if ack > self.sent {
            self.peer_fin = true;
        }
        let data = ack.min(self.sent);
        self.peer_received = self.peer_received.max(data);
        if data > self.acked {
            self.ring.consume((data - self.acked) as usize);
            self.acked = data;
            return Ok(true);
        }
        Ok(false)
    }

    /// Exit: whether a `Resume` with `attempt` and `received` may take
    /// this stream: newer than the last move taken, and naming a count
    /// this side can send from.
    pub fn resumable(&self, attempt: u32, received: u64) -> Result<()> {
        if attempt <= self.attempt {
            return Err(Error::Protocol(format!(
                "stale move (attempt {attempt}, already at {})",
                self.attempt
            )));
        }
        if received < self.acked || received > self.sent {
            return Err(Error::Protocol(format!(
                "peer resumes at {received}, outside [{}, {}]",
                self.acked, self.sent
            )));
        }
        Ok(())
    }

    /// The peer says it has received `received` bytes (and our END if
    /// `fin`), in `Resume` or `Resumed`.
    fn on_peer_received(&mut self, received: u64, fin: bool) -> Result<()> {
        if received < self.acked || received > self.sent {
            return Err(Error::Protocol(format!(
                "peer resumes at {received}, outside [{}, {}]",
                self.acked, self.sent
            )));
        }
        self.peer_received = self.peer_received.max(received);
        if fin && self.fin_sent.is_some() && received == self.sent {
            self.peer_fin = true;
        }
        Ok(())
    }
}

/// What the session tells its shell.
#[derive(Debug)]
pub enum Event {
    /// Exit: the origin asks for a stream to `host:port`. Answer with
    /// [`Session::accept`] or [`Session::refuse`].
    Begin {
        /// The stream.
        id: u32,
        /// Target name or address literal (at most 255 bytes).
        host: String,
        /// Target port.
        port: u16,
    },
    /// Exit: the origin moves a stream here. Find it by token, detach it
    /// from its session and [`Session::accept_move`] it; or
    /// [`Session::refuse_move`].
    Resume {
        /// The stream's id on this session.
        id: u32,
        /// The token it presents.
        token: Token,
        /// What the origin has received.
        received: u64,
        /// Whether the origin has received our END.
        fin: bool,
        /// The origin's move count (see [`Stream::resumable`]).
        attempt: u32,
    },
    /// Origin: the exit connected the stream.
    Connected {
        /// The stream.
        id: u32,
    },
    /// Payload for the stream's socket; report it with
    /// [`Session::consumed`] once written.
    Data {
        /// The stream.
        id: u32,
        /// The bytes, in the buffer the cell arrived in.
        data: BytesMut,
    },
    /// The stream may send more.
    Writable {
        /// The stream.
        id: u32,
    },
    /// The peer finished sending, normally: shut the socket's write side.
    Finished {
        /// The stream.
        id: u32,
    },
    /// The stream ended abnormally, and is gone: reset the socket.
    Reset {
        /// The stream.
        id: u32,
        /// Why.
        reason: EndReason,
        /// Detail for the log (no addresses, no payload).
        detail: String,
    },
    /// Origin: a move finished; the stream carries on here.
    Moved {
        /// The stream's id on this session.
        id: u32,
    },
    /// Origin: a move failed and the stream is handed back, unattached:
    /// attach it to another session (the old one included) or end it.
    MoveFailed {
        /// Its id on this session (now free).
        id: u32,
        /// The stream.
        stream: Box<Stream>,
        /// Why.
        error: Error,
    },
    /// A stream ended cleanly at both ends and was forgotten.
    Closed {
        /// The stream.
        id: u32,
        /// Its token (the exit keeps a tombstone, see
        /// [`Session::answer_completed`]).
        token: Token,
        /// Bytes received from the peer in all.
        received: u64,
    },
    /// Exit: a BEGIN was refused here without reaching the shell, for
    /// `kind` (`capacity`).
    Refused {
        /// The stream.
        id: u32,
        /// Why, as a bounded label.
        kind: &'static str,
    },
}

/// What [`Session::send_data`] and friends did.
#[derive(Debug)]
pub enum Outcome<T = ()> {
    /// Done.
    Done,
    /// The stream has no credit now (or is moving): wait for
    /// [`Event::Writable`] and try again with the buffer.
    Blocked(T),
    /// The stream is not attached here (it moved away or ended): look up
    /// where it is now.
    Elsewhere(T),
}

/// One end of a circuit's end-to-end session.
#[derive(Debug)]
pub struct Session {
    side: Side,
    circ: u32,
    sealer: Sealer,
    opener: Opener,
    cfg: Config,
    streams: HashMap<u32, Stream>,
    next_id: u32,
    transmits: VecDeque<BytesMut>,
    events: VecDeque<Event>,
    closed: bool,
    /// Streams stopped for want of circuit room, in the order they
    /// stopped (an id here may have left since: its [`Turn`] says).
    waiting: VecDeque<u32>,
    /// No stream in line wants less room than this (`u64::MAX` when none
    /// is known to): exact after [`Session::wake_waiting`] goes through
    /// the line, lowered as streams join it, never raised by one leaving,
    /// so it is a bound, not always the least.
    waiting_least: u64,
    /// Streams called from the line that have not sent yet.
    called: usize,
    /// The room they were called to (the sum of their `wants`).
    called_bytes: u64,
    /// Our congestion window (see [`crate::congestion`]).
    cc: Congestion,
    /// The peer answers PROBE: it said so, and [`Config::congestion`] is on.
    probing: bool,
    /// The latest `now` (µs) given to [`Session::send_data`] or
    /// [`Session::handle_relay`]: what a probe sent on the way (after a
    /// resend) is stamped with.
    now: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer")
    }
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Opener")
    }
}

impl Session {
    /// A session over the circuit `circ` (the link-local id its cells
    /// carry) with the keys of a finished handshake.
    pub fn new(side: Side, circ: u32, keys: crate::crypto::Session, cfg: Config) -> Self {
        Self {
            side,
            circ,
            sealer: keys.tx,
            opener: keys.rx,
            cfg,
            streams: HashMap::new(),
            next_id: 1,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            closed: false,
            waiting: VecDeque::new(),
            waiting_least: u64::MAX,
            called: 0,
            called_bytes: 0,
            cc: Congestion::default(),
            probing: false,
            now: 0,
        }
    }

    /// Takes a stream out. Its unacknowledged bytes leave the circuit
    /// window with it, so streams waiting for circuit room may go.
    fn remove_stream(&mut self, id: u32) -> Option<Stream> {
        let mut s = self.streams.remove(&id)?;
        let called = match std::mem::replace(&mut s.turn, Turn::Free) {
            Turn::Called => {
                self.called -= 1;
                self.called_bytes -= s.wants;
                true
            }
            // Out of the line, so churn on a circuit without room cannot
            // grow it.
            Turn::Waiting => {
                self.waiting.retain(|w| *w != id);
                false
            }
            Turn::Free => false,
        };
        if s.sent > s.acked || called {
            // Room it held, or a turn it was called for: the next's.
            self.wake_waiting();
        }
        Some(s)
    }

    /// Bytes sent and not yet acknowledged, over every stream here.
    pub fn in_flight(&self) -> u64 {
        self.streams.values().map(|s| s.sent - s.acked).sum()
    }

    /// Where the congestion window stands; `None` when the session does
    /// not probe (the peer does not answer, or it is off here).
    pub fn congestion(&self) -> Option<Snapshot> {
        self.probing.then(|| self.cc.snapshot())
    }

    /// The peer said it answers PROBE (`probes` in its BEGIN, CONNECTED,
    /// RESUME or RESUMED).
    fn peer_probes(&mut self, probes: bool) {
        if probes && self.cfg.congestion {
            self.probing = true;
        }
    }

    /// Puts `id` in line for circuit room for a record of `n` bytes: at
    /// the back, or at the front if it was called and found the room
    /// taken.
    fn wait_for_room(&mut self, id: u32, n: u64) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        match s.turn {
            Turn::Waiting => {}
            Turn::Free => {
                s.turn = Turn::Waiting;
                self.waiting.push_back(id);
            }
            Turn::Called => {
                s.turn = Turn::Waiting;
                self.called -= 1;
                self.called_bytes -= s.wants;
                self.waiting.push_front(id);
            }
        }
        s.wants = n;
        self.waiting_least = self.waiting_least.min(n);
    }

    /// A called stream gives its turn up (it sent, or its own window
    /// stopped it).
    fn end_turn(&mut self, id: u32) {
        if let Some(s) = self.streams.get_mut(&id)
            && s.turn == Turn::Called
        {
            s.turn = Turn::Free;
            self.called -= 1;
            self.called_bytes -= s.wants;
        }
    }

    /// Calls streams from the line, in order, each whose record fits the
    /// circuit room left (less what those called and not yet sent were
    /// called to); one that does not fit keeps its place, so a small
    /// request is not held behind a large record that cannot go. Into an
    /// idle circuit the first goes whatever it holds. A called stream
    /// sends its record, then queues again while others wait; one that
    /// finds the room taken after all (a move's resend took it) goes back
    /// to the front. Whoever sends and leaves room calls the next, so room
    /// never sits unused while a stream that fits waits. A stream is only
    /// ever called to room that fits its record: called to less, it would
    /// go back to the line and be called again at once, round and round.
    /// While the room is below the least any stream in line wants, it
    /// returns at once.
    fn wake_waiting(&mut self) {
        if self.waiting.is_empty() {
            return;
        }
        debug_assert!(
            self.waiting.iter().all(|id| self
                .streams
                .get(id)
                .is_none_or(|s| s.turn != Turn::Waiting || s.wants >= self.waiting_least)),
            "a stream in line wants less than the bound"
        );
        if self.probing && self.cc.room() < MAX_DATA_PAYLOAD as u64 {
            // Streams wait for room only a PONG can bring (less than a
            // record calls nobody): make sure one will come (bytes sent
            // again after a move, bytes sent by streams that took turns
            // and so never stopped, or a window that shrank below what was
            // sent, may be covered by no probe).
            let probe = self.cc.on_stalled(self.now);
            // A session that cannot seal is closed or broken, and its next
            // send says so.
            let _ = self.queue_probe(probe);
        }
        // Circuit room: what both [`CIRCUIT_WINDOW`] and the congestion
        // window allow now, less what called streams were called to.
        let in_flight = self.in_flight();
        let mut room = CIRCUIT_WINDOW.saturating_sub(in_flight);
        if self.probing {
            room = room.min(self.cc.room());
        }
        room = room.saturating_sub(self.called_bytes);
        let mut idle =
            self.called == 0 && (in_flight == 0 || (self.probing && self.cc.in_flight() == 0));
        if !idle && room < self.waiting_least {
            // Nobody in line fits: on a busy circuit this is most calls
            // (every record sent and every acknowledgement makes one), and
            // going through a line of sixty streams each time was 5% of an
            // entry's CPU with 1,000 streams (`profile.sh streams entry`).
            return;
        }
        // Through the line once, in place: the called leave it, the rest
        // keep their order.
        let mut least = u64::MAX;
        for _ in 0..self.waiting.len() {
            let id = self.waiting.pop_front().expect("counted");
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            if s.turn != Turn::Waiting {
                continue;
            }
            if s.wants <= room || idle {
                s.turn = Turn::Called;
                room = room.saturating_sub(s.wants);
                self.called += 1;
                self.called_bytes += s.wants;
                self.events.push_back(Event::Writable { id });
            } else {
                least = least.min(s.wants);
                self.waiting.push_back(id);
            }
            idle = false;
        }
        self.waiting_least = least;
    }

    /// Queues a PROBE with `count` (stream 0).
    fn queue_probe(&mut self, count: Option<u64>) -> Result<()> {
        match count {
            Some(c) => self.queue_msg(StreamKind::Probe, 0, &c.to_be_bytes()),
            None => Ok(()),
        }
    }

    /// `n` bytes of DATA were sealed: counted, and probed when due.
    fn on_data_sent(&mut self, n: usize) -> Result<()> {
        if !self.probing {
            return Ok(());
        }
        let probe = self.cc.on_sent(n as u64, self.now);
        self.queue_probe(probe)
    }

    /// Which end this is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// The circuit id its cells carry.
    pub fn circ(&self) -> u32 {
        self.circ
    }

    /// Whether it was closed.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Streams attached.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// The ids of the streams attached.
    pub fn stream_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.streams.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// A stream attached here.
    pub fn stream(&self, id: u32) -> Option<&Stream> {
        self.streams.get(&id)
    }

    /// The next sealed cell to send on the circuit's link, in order.
    pub fn poll_transmit(&mut self) -> Option<BytesMut> {
        self.transmits.pop_front()
    }

    /// Whether cells wait to be sent.
    pub fn has_transmits(&self) -> bool {
        !self.transmits.is_empty()
    }

    /// The next event for the shell.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Session::handle_timeout`] should next be called (ms).
    pub fn poll_timeout(&self) -> Option<u64> {
        self.streams
            .values()
            .filter_map(|s| match s.phase {
                Phase::Moving { deadline } => Some(deadline),
                _ => None,
            })
            .min()
    }

    /// Time passed: moves unanswered by their deadline fail, and their
    /// streams are handed back ([`Event::MoveFailed`]).
    pub fn handle_timeout(&mut self, now: u64) {
        let mut late: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| matches!(s.phase, Phase::Moving { deadline } if deadline <= now))
            .map(|(id, _)| *id)
            .collect();
        late.sort_unstable();
        for id in late {
            if let Some(mut stream) = self.remove_stream(id) {
                stream.phase = Phase::Open;
                self.events.push_back(Event::MoveFailed {
                    id,
                    stream: Box::new(stream),
                    error: Error::Timeout {
                        what: "resume",
                        after_ms: self.cfg.resume_timeout_ms,
                    },
                });
            }
        }
    }

    /// The circuit is gone: every stream is handed back (the shell ends
    /// them, falls back, or parks them for a move), and nothing more is
    /// sent or received.
    pub fn close(&mut self) -> Vec<(u32, Stream)> {
        self.closed = true;
        self.transmits.clear();
        self.waiting.clear();
        self.waiting_least = u64::MAX;
        self.called = 0;
        self.called_bytes = 0;
        let mut all: Vec<(u32, Stream)> = self
            .streams
            .drain()
            .map(|(id, mut s)| {
                // Its place in this session's line means nothing elsewhere.
                s.turn = Turn::Free;
                (id, s)
            })
            .collect();
        all.sort_unstable_by_key(|(id, _)| *id);
        all
    }

    fn check_open(&self) -> Result<()> {
        if self.closed {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Stamps the cell header on `buf`, seals what follows it, queues it.
    fn seal_push(&mut self, cmd: CellCmd, mut buf: BytesMut) -> Result<()> {
        self.check_open()?;
        buf[..cell::HEADER_LEN].copy_from_slice(&cell::header(self.circ, cmd));
        self.sealer.seal_tail_bytes(&mut buf, cell::HEADER_LEN)?;
        self.transmits.push_back(buf);
        Ok(())
    }

    fn queue_msg(&mut self, kind: StreamKind, id: u32, body: &[u8]) -> Result<()> {
        let mut buf =
            BytesMut::with_capacity(cell::HEADER_LEN + smsg::HEADER_LEN + body.len() + TAG_LEN);
        buf.put_bytes(0, cell::HEADER_LEN);
        buf.put_slice(&smsg::header(kind, id));
        buf.put_slice(body);
        self.seal_push(CellCmd::Relay, buf)
    }

    fn queue_end(&mut self, id: u32, reason: EndReason, detail: &str) -> Result<()> {
        let body = pb::End {
            reason: reason as i32,
            detail: detail.to_string(),
        }
        .encode_to_vec();
        self.queue_msg(StreamKind::End, id, &body)
    }

    fn queue_ack(&mut self, id: u32) -> Result<()> {
        let Some(s) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        let ack = s.ack_value();
        s.ack_sent = ack;
        self.queue_msg(StreamKind::Window, id, &ack.to_be_bytes())
    }

    /// Sends again what the peer lacks of stream `id` from `from`, then END
    /// if the peer lacks it, then our acknowledgement.
    fn resend(&mut self, id: u32, from: u64, peer_fin: bool) -> Result<()> {
        let mut off = from;
        loop {
            let Some(s) = self.streams.get(&id) else {
                return Ok(());
            };
            let n = ((s.sent - off) as usize).min(MAX_DATA_PAYLOAD);
            if n == 0 {
                break;
            }
            let mut buf = BytesMut::with_capacity(HEADROOM + n + TAG_LEN);
            buf.put_bytes(0, cell::HEADER_LEN);
            buf.put_slice(&smsg::header(StreamKind::Data, id));
            buf.put_slice(&off.to_be_bytes());
            buf.put_bytes(0, n);
            s.ring
                .copy_to((off - s.acked) as usize, n, &mut buf[HEADROOM..]);
            off += n as u64;
            self.seal_push(CellCmd::Relay, buf)?;
            if self.probing {
                self.cc.on_resent(n as u64);
            }
        }
        if self.probing {
            // Probed at once: nothing else may send on this circuit soon.
            let probe = self.cc.on_blocked(self.now);
            self.queue_probe(probe)?;
        }
        let fin = self.streams.get(&id).and_then(|s| s.fin_sent.clone());
        if let (false, Some((reason, detail))) = (peer_fin, fin) {
            self.queue_end(id, reason, &detail)?;
        }
        self.queue_ack(id)
    }

    /// Forgets stream `id` if it is complete at both ends.
    fn settle(&mut self, id: u32) {
        if self.streams.get(&id).is_some_and(Stream::complete)
            && let Some(s) = self.remove_stream(id)
        {
            self.events.push_back(Event::Closed {
                id,
                token: s.token,
                received: s.received,
            });
        }
    }

    fn fresh_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.streams.contains_key(&id) {
                return id;
            }
        }
    }

    fn room(&self) -> Result<()> {
        if self.streams.len() >= self.cfg.max_streams {
            return Err(Error::TooManyStreams(self.cfg.max_streams));
        }
        Ok(())
    }

    // ---- Origin ------------------------------------------------------------

    /// Origin: opens a stream to `host:port` (BEGIN). [`Event::Connected`]
    /// or [`Event::Reset`] answers it.
    pub fn open(&mut self, host: &str, port: u16) -> Result<u32> {
        self.check_open()?;
        self.room()?;
        let id = self.fresh_id();
        let body = pb::Begin {
            host: host.to_string(),
            port: port.into(),
            window: self.cfg.window,
            probes: self.cfg.congestion,
        }
        .encode_to_vec();
        self.queue_msg(StreamKind::Begin, id, &body)?;
        self.streams
            .insert(id, Stream::new(Phase::Opening, self.cfg.window, 0, [0; 16]));
        Ok(id)
    }

    /// Origin: attaches a stream detached from another session to this one
    /// and asks the exit for it (RESUME). Returns its id here; the move ends
    /// in [`Event::Moved`], [`Event::MoveFailed`] or [`Event::Reset`].
    pub fn attach_resume(
        &mut self,
        mut stream: Stream,
        now: u64,
    ) -> Result<u32, (Error, Box<Stream>)> {
        if let Err(e) = self.check_open().and_then(|()| self.room()) {
            return Err((e, Box::new(stream)));
        }
        let id = self.fresh_id();
        stream.turn = Turn::Free;
        let body = pb::Resume {
            token: stream.token.to_vec(),
            received: stream.received,
            fin: stream.fin_received,
            attempt: stream.attempt + 1,
            probes: self.cfg.congestion,
        }
        .encode_to_vec();
        if let Err(e) = self.queue_msg(StreamKind::Resume, id, &body) {
            return Err((e, Box::new(stream)));
        }
        stream.attempt += 1;
        stream.phase = Phase::Moving {
            deadline: now.saturating_add(self.cfg.resume_timeout_ms),
        };
        self.streams.insert(id, stream);
        Ok(id)
    }

    // ---- Exit --------------------------------------------------------------

    /// Exit: the target is connected; sends CONNECTED with `token`.
    pub fn accept(&mut self, id: u32, token: Token) -> Result<Outcome> {
        self.check_open()?;
        let window = self.cfg.window;
        let Some(s) = self.streams.get_mut(&id) else {
            return Ok(Outcome::Elsewhere(()));
        };
        if s.phase != Phase::Connecting {
            return Err(Error::Protocol(format!("stream {id} is not connecting")));
        }
        s.phase = Phase::Open;
        s.token = token;
        let body = pb::Connected {
            window,
            resume_token: token.to_vec(),
            probes: self.cfg.congestion,
        }
        .encode_to_vec();
        self.queue_msg(StreamKind::Connected, id, &body)?;
        self.events.push_back(Event::Writable { id });
        Ok(Outcome::Done)
    }

    /// Exit: the stream could not be opened; sends END and forgets it.
    pub fn refuse(&mut self, id: u32, reason: EndReason, detail: &str) -> Result<()> {
        self.remove_stream(id);
        self.queue_end(id, reason, detail)
    }

    /// Exit: takes stream `id` off this session for a move that
    /// [`Stream::resumable`] allows; otherwise leaves it where it is.
    pub fn take_for_move(&mut self, id: u32, attempt: u32, received: u64) -> Result<Stream> {
        let s = self.streams.get(&id).ok_or(Error::NoStream(id))?;
        s.resumable(attempt, received)?;
        Ok(self.remove_stream(id).expect("checked just above"))
    }

    /// Exit: takes a stream the origin moved here as `id` (after
    /// [`Event::Resume`]; `attempt`/`received`/`fin` as the event said).
    /// Answers `Resumed` and sends again what the origin lacks. A move the
    /// stream refuses ([`Stream::resumable`]) hands it back unchanged.
    pub fn accept_move(
        &mut self,
        id: u32,
        mut stream: Stream,
        attempt: u32,
        received: u64,
        fin: bool,
    ) -> Result<(), (Error, Box<Stream>)> {
        if let Err(e) = self.check_open() {
            return Err((e, Box::new(stream)));
        }
        if self.streams.contains_key(&id) {
            return Err((
                Error::Protocol(format!("stream {id} opened twice")),
                Box::new(stream),
            ));
        }
        if let Err(e) = stream
            .resumable(attempt, received)
            .and_then(|()| stream.on_peer_received(received, fin))
        {
            return Err((e, Box::new(stream)));
        }
        stream.attempt = attempt;
        stream.turn = Turn::Free;
        let body = pb::Resumed {
            received: stream.received,
            fin: stream.fin_received,
            probes: self.cfg.congestion,
        }
        .encode_to_vec();
        if let Err(e) = self.queue_msg(StreamKind::Resumed, id, &body) {
            return Err((e, Box::new(stream)));
        }
        stream.phase = Phase::Open;
        stream.moves += 1;
        self.streams.insert(id, stream);
        self.resend(id, received, fin).map_err(|e| {
            let s = self.remove_stream(id).expect("just inserted");
            (e, Box::new(s))
        })?;
        self.events.push_back(Event::Writable { id });
        self.settle(id);
        Ok(())
    }

    /// Exit: no stream holds the token; tells the origin (END
    /// `UNKNOWN_STREAM`).
    pub fn refuse_move(&mut self, id: u32) -> Result<()> {
        self.queue_end(id, EndReason::UnknownStream, "no such stream at this exit")
    }

    /// Exit: the token names a stream that ended cleanly here, after which
    /// the origin's last acknowledgement was lost; tells it it has
    /// everything (`Resumed` with what this side received, and our END).
    pub fn answer_completed(&mut self, id: u32, received: u64) -> Result<()> {
        let body = pb::Resumed {
            received,
            fin: true,
            probes: self.cfg.congestion,
        }
        .encode_to_vec();
        self.queue_msg(StreamKind::Resumed, id, &body)
    }

    // ---- Both --------------------------------------------------------------

    /// Takes a stream off this session, for a move: its messages here are
    /// dropped from now on.
    pub fn detach(&mut self, id: u32) -> Option<Stream> {
        self.remove_stream(id)
    }

    /// Sends one DATA record: `buf` is [`HEADROOM`] bytes, then at most
    /// [`MAX_DATA_PAYLOAD`] bytes of payload. `now` is in µs, on the clock
    /// [`Session::handle_relay`] is given.
    pub fn send_data(&mut self, id: u32, mut buf: BytesMut, now: u64) -> Result<Outcome<BytesMut>> {
        self.check_open()?;
        self.now = self.now.max(now);
        let n = buf.len().saturating_sub(HEADROOM);
        if buf.len() < HEADROOM || n > MAX_DATA_PAYLOAD {
            return Err(Error::Protocol(format!("a DATA record of {n} bytes")));
        }
        let Some(s) = self.streams.get_mut(&id) else {
            return Ok(Outcome::Elsewhere(buf));
        };
        if s.fin_sent.is_some() {
            return Err(Error::Protocol(format!("stream {id}: DATA after END")));
        }
        let turn = s.turn;
        if s.credit() < n as u64 {
            // Its own window, not the circuit's: a turn it was called for
            // goes to whoever waits.
            if turn == Turn::Called {
                self.end_turn(id);
                self.wake_waiting();
            }
            return Ok(Outcome::Blocked(buf));
        }
        if turn == Turn::Waiting {
            // In line: its turn comes.
            return Ok(Outcome::Blocked(buf));
        }
        if turn == Turn::Free && self.waiting.len() + self.called > 0 {
            // Others wait for room: in line, behind them.
            self.wait_for_room(id, n as u64);
            self.wake_waiting();
            return Ok(Outcome::Blocked(buf));
        }
        if self.in_flight() + n as u64 > CIRCUIT_WINDOW
            || (self.probing && !self.cc.allows(n as u64))
        {
            self.wait_for_room(id, n as u64);
            if self.probing {
                let probe = self.cc.on_blocked(self.now);
                self.queue_probe(probe)?;
            }
            return Ok(Outcome::Blocked(buf));
        }
        self.end_turn(id);
        let s = self.streams.get_mut(&id).expect("checked above");
        let off = s.sent;
        s.ring.push(&buf[HEADROOM..]);
        s.sent += n as u64;
        buf[cell::HEADER_LEN..cell::HEADER_LEN + smsg::HEADER_LEN]
            .copy_from_slice(&smsg::header(StreamKind::Data, id));
        buf[HEADROOM - smsg::DATA_OFFSET_LEN..HEADROOM].copy_from_slice(&off.to_be_bytes());
        self.seal_push(CellCmd::Relay, buf)?;
        self.on_data_sent(n)?;
        self.wake_waiting();
        Ok(Outcome::Done)
    }

    /// The stream's socket took `n` more bytes; acknowledges them when a
    /// quarter of the window has gathered, or everything once the peer's
    /// END is reached.
    pub fn consumed(&mut self, id: u32, n: u64) -> Result<Outcome> {
        self.check_open()?;
        let Some(s) = self.streams.get_mut(&id) else {
            return Ok(Outcome::Elsewhere(()));
        };
        if s.consumed + n > s.received {
            return Err(Error::Protocol(format!(
                "stream {id}: consumed more than received"
            )));
        }
        s.consumed += n;
        let due = s.ack_value() - s.ack_sent >= u64::from(s.window / 4).max(1)
            || (s.fin_received && s.consumed == s.received);
        if due && s.ack_value() != s.ack_sent {
            self.queue_ack(id)?;
            self.settle(id);
        }
        // The sender's circuit window (`CIRCUIT_WINDOW`) counts what every
        // stream has not acknowledged: once a quarter of it is consumed
        // here and unacknowledged, over all streams, every stream with
        // something to acknowledge does, or many streams each below their
        // own threshold could hold the whole window and stop the circuit.
        let unacked: u64 = self
            .streams
            .values()
            .map(|s| s.ack_value() - s.ack_sent)
            .sum();
        if unacked >= CIRCUIT_WINDOW / 4 {
            let owed: Vec<u32> = self
                .streams
                .iter()
                .filter(|(_, s)| s.ack_value() != s.ack_sent)
                .map(|(id, _)| *id)
                .collect();
            for id in owed {
                self.queue_ack(id)?;
                self.settle(id);
            }
        }
        Ok(Outcome::Done)
    }

    /// Acknowledges whatever stream `id`'s socket has taken and no WINDOW
    /// has said yet. [`Session::consumed`] acknowledges a quarter window at
    /// a time, which keeps WINDOW cells rare on a busy stream but would
    /// leave a slow one's bytes in the sender's resend ring for minutes (2
    /// KB a second takes over four minutes to fill a quarter of 2 MiB): the
    /// shell calls this a short while after the socket took the first byte
    /// not yet acknowledged, so a sender holds about what a stream carries
    /// in that while, not a quarter window.
    pub fn acknowledge(&mut self, id: u32) -> Result<Outcome> {
        self.check_open()?;
        let Some(s) = self.streams.get(&id) else {
            return Ok(Outcome::Elsewhere(()));
        };
        if s.ack_value() != s.ack_sent {
            self.queue_ack(id)?;
            self.settle(id);
        }
        Ok(Outcome::Done)
    }

    /// This side is done sending on stream `id`: END with `reason`. A clean
    /// end (`Done`) keeps the stream until both ends have everything; any
    /// other ends it here at once.
    pub fn finish(&mut self, id: u32, reason: EndReason, detail: &str) -> Result<Outcome> {
        self.check_open()?;
        let Some(s) = self.streams.get_mut(&id) else {
            return Ok(Outcome::Elsewhere(()));
        };
        if s.fin_sent.is_some() {
            return Ok(Outcome::Done);
        }
        s.fin_sent = Some((reason, detail.to_string()));
        if reason != EndReason::Done {
            self.remove_stream(id);
        }
        self.queue_end(id, reason, detail)?;
        self.settle(id);
        Ok(Outcome::Done)
    }

    /// Queues a keepalive: one open stream's current acknowledgement (the
    /// peer takes one it already has as a no-op, a newer one as credit),
    /// so the relays see the circuit in use while its streams are quiet.
    /// `false` if no stream is open to carry it.
    pub fn keepalive(&mut self) -> Result<bool> {
        self.check_open()?;
        let Some(id) = self
            .streams
            .iter()
            .filter(|(_, s)| s.phase == Phase::Open)
            .map(|(id, _)| *id)
            .min()
        else {
            return Ok(false);
        };
        self.queue_ack(id)?;
        Ok(true)
    }

    /// Sends a CONTROL cell (sealed for the origin: the tip's reply to an
    /// EXTEND).
    pub fn send_control(&mut self, body: &[u8]) -> Result<()> {
        let mut buf = BytesMut::with_capacity(cell::HEADER_LEN + body.len() + TAG_LEN);
        buf.put_bytes(0, cell::HEADER_LEN);
        buf.put_slice(body);
        self.seal_push(CellCmd::Control, buf)
    }

    /// Opens a CONTROL cell from the origin (the tip reads EXTEND).
    pub fn handle_control(&mut self, mut buf: BytesMut) -> Result<pb::Control> {
        self.check_open()?;
        let body = &mut buf[cell::HEADER_LEN..];
        let n = self.opener.open_in_place(body)?;
        let ctl: pb::Control = ferry_proto::decode_pb("control", &body[..n])?;
        if ctl.msg.is_none() {
            return Err(Error::Protocol("empty control message".into()));
        }
        Ok(ctl)
    }

    /// Opens a RELAY cell (`buf` is the whole cell) and acts on its stream
    /// message, at `now` (µs, on any monotonic clock: congestion control
    /// times its probes with it). An error is the peer breaking the
    /// protocol: the circuit must be destroyed.
    pub fn handle_relay(&mut self, mut buf: BytesMut, now: u64) -> Result<()> {
        self.check_open()?;
        self.now = self.now.max(now);
        let n = self.opener.open_in_place(&mut buf[cell::HEADER_LEN..])?;
        buf.truncate(cell::HEADER_LEN + n);
        let msg = StreamMsg::parse(&buf[cell::HEADER_LEN..])?;
        let (kind, id) = (msg.kind, msg.stream_id);
        let wrong_side = |what: &str| {
            Err(Error::Protocol(format!(
                "{what} sent to the {what_side}",
                what_side = match self.side {
                    Side::Origin => "origin",
                    Side::Exit => "exit",
                }
            )))
        };
        match kind {
            StreamKind::Begin => {
                if self.side != Side::Exit {
                    return wrong_side("BEGIN");
                }
                let begin: pb::Begin = ferry_proto::decode_pb("begin", msg.body)?;
                self.peer_probes(begin.probes);
                if self.streams.contains_key(&id) {
                    return Err(Error::Protocol(format!("stream {id} opened twice")));
                }
                if self.room().is_err() {
                    self.events.push_back(Event::Refused {
                        id,
                        kind: "capacity",
                    });
                    let detail = format!(
                        "this exit takes at most {} streams per circuit",
                        self.cfg.max_streams
                    );
                    return self.queue_end(id, EndReason::Capacity, &detail);
                }
                let stream = Stream::new(Phase::Connecting, self.cfg.window, begin.window, [0; 16]);
                self.streams.insert(id, stream);
                // An out-of-range port reaches the shell as 0, which it refuses.
                let port = u16::try_from(begin.port).unwrap_or(0);
                self.events.push_back(Event::Begin {
                    id,
                    host: begin.host,
                    port,
                });
            }
            StreamKind::Resume => {
                if self.side != Side::Exit {
                    return wrong_side("RESUME");
                }
                let r: pb::Resume = ferry_proto::decode_pb("resume", msg.body)?;
                self.peer_probes(r.probes);
                if self.streams.contains_key(&id) {
                    return Err(Error::Protocol(format!("stream {id} opened twice")));
                }
                let token = match Token::try_from(r.token.as_slice()) {
                    Ok(t) if t != [0; 16] => t,
                    _ => return self.refuse_move(id),
                };
                self.events.push_back(Event::Resume {
                    id,
                    token,
                    received: r.received,
                    fin: r.fin,
                    attempt: r.attempt,
                });
            }
            StreamKind::Connected => {
                if self.side != Side::Origin {
                    return wrong_side("CONNECTED");
                }
                let c: pb::Connected = ferry_proto::decode_pb("connected", msg.body)?;
                self.peer_probes(c.probes);
                if let Some(s) = self.streams.get_mut(&id) {
                    if s.phase != Phase::Opening {
                        return Err(Error::Protocol(format!("stream {id} connected twice")));
                    }
                    let Ok(token) = Token::try_from(c.resume_token.as_slice()) else {
                        return Err(Error::Protocol("resume token is not 16 bytes".into()));
                    };
                    s.token = token;
                    s.peer_window = u64::from(c.window);
                    s.phase = Phase::Open;
                    self.events.push_back(Event::Connected { id });
                    self.events.push_back(Event::Writable { id });
                }
            }
            StreamKind::Resumed => {
                if self.side != Side::Origin {
                    return wrong_side("RESUMED");
                }
                let m: pb::Resumed = ferry_proto::decode_pb("resumed", msg.body)?;
                self.peer_probes(m.probes);
                let Some(s) = self.streams.get_mut(&id) else {
                    return Ok(());
                };
                if !matches!(s.phase, Phase::Moving { .. }) {
                    return Err(Error::Protocol(format!("stream {id}: RESUMED unasked")));
                }
                s.on_peer_received(m.received, m.fin)?;
                s.phase = Phase::Open;
                s.moves += 1;
                self.resend(id, m.received, m.fin)?;
                self.events.push_back(Event::Moved { id });
                self.events.push_back(Event::Writable { id });
                self.settle(id);
            }
            StreamKind::Data => {
                let (off, payload) = msg.data()?;
                let len = payload.len() as u64;
                let Some(s) = self.streams.get_mut(&id) else {
                    return Ok(());
                };
                if s.fin_received {
                    return Err(Error::Protocol(format!("stream {id}: DATA after END")));
                }
                if off > s.received {
                    return Err(Error::Protocol(format!(
                        "stream {id}: data at offset {off}, expected {}",
                        s.received
                    )));
                }
                let skip = s.received - off;
                if skip >= len {
                    return Ok(());
                }
                let end = off + len;
                let held = end - s.consumed;
                if held > u64::from(s.window) {
                    return Err(Error::WindowExceeded {
                        stream: id,
                        held,
                        window: s.window,
                    });
                }
                s.received = end;
                let mut data = buf.split_off(cell::HEADER_LEN + smsg::HEADER_LEN);
                let _ = data.split_to(smsg::DATA_OFFSET_LEN + skip as usize);
                self.events.push_back(Event::Data { id, data });
            }
            StreamKind::Window => {
                let ack = msg.window_ack()?;
                if let Some(s) = self.streams.get_mut(&id) {
                    if s.on_ack(ack)? {
                        if s.turn == Turn::Free {
                            // Its own credit grew; in line, its turn comes.
                            self.events.push_back(Event::Writable { id });
                        }
                        // Circuit room freed, too.
                        self.wake_waiting();
                    }
                    self.settle(id);
                }
            }
            StreamKind::Probe => {
                if id != 0 {
                    return Err(Error::Protocol(format!("PROBE on stream {id}")));
                }
                let count = msg.probe_count()?;
                self.queue_msg(StreamKind::Pong, 0, &count.to_be_bytes())?;
            }
            StreamKind::Pong => {
                if id != 0 {
                    return Err(Error::Protocol(format!("PONG on stream {id}")));
                }
                let count = msg.probe_count()?;
                if !self.probing {
                    return Err(Error::Protocol("PONG unasked".into()));
                }
                // The session's own `now`, never behind a probe's stamp: two
                // threads may read the clock and take the lock in either
                // order, and a round trip of 0 would become the least.
                self.cc.on_pong(count, self.now).map_err(Error::Protocol)?;
                self.wake_waiting();
            }
            StreamKind::End => {
                let end: pb::End = ferry_proto::decode_pb("end", msg.body)?;
                let reason = end.reason();
                let Some(s) = self.streams.get_mut(&id) else {
                    return Ok(());
                };
                if let Phase::Moving { .. } = s.phase {
                    if reason == EndReason::UnknownStream {
                        self.remove_stream(id);
                        self.events.push_back(Event::Reset {
                            id,
                            reason,
                            detail: "the exit no longer has this stream".into(),
                        });
                    } else if let Some(mut stream) = self.remove_stream(id) {
                        stream.phase = Phase::Open;
                        self.events.push_back(Event::MoveFailed {
                            id,
                            stream: Box::new(stream),
                            error: Error::MoveRefused {
                                reason,
                                detail: end.detail,
                            },
                        });
                    }
                    return Ok(());
                }
                if s.fin_received {
                    return Err(Error::Protocol(format!("stream {id}: END twice")));
                }
                if reason == EndReason::Done {
                    s.fin_received = true;
                    let ack_now = s.consumed == s.received;
                    self.events.push_back(Event::Finished { id });
                    if ack_now {
                        self.queue_ack(id)?;
                    }
                    self.settle(id);
                } else {
                    self.remove_stream(id);
                    self.events.push_back(Event::Reset {
                        id,
                        reason,
                        detail: end.detail,
                    });
                }
            }
        }
        Ok(())
    }
}
