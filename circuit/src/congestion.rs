//! A circuit's congestion control: how much one end of a session keeps in
//! flight on its circuit, from the delay its cells meet on the way (TCP
//! Vegas, as Tor's proposal 324 applies it to circuits).
//!
//! # Why flow control is not enough
//!
//! A stream's window (acknowledged as the receiving socket consumes) says
//! how much a receiver will take; it says nothing of how much the path
//! holds. Where the window is far beyond the path's bandwidth-delay product
//! (loopback, a LAN, any fast path with a 2 MiB window), a sender that keeps
//! its window in flight keeps the excess as a *standing queue* in the
//! slowest process's socket buffers, which are FIFO and out of reach of any
//! scheduler of ours: every other circuit on those links waits behind it.
//! A 64-byte request beside a bulk stream waited 20 times its unloaded p99;
//! a thousand bulk streams at one entry kept a gigabyte in flight and
//! filled relays' forwarding queues until they destroyed honest circuits.
//! This keeps in flight what the path carries, plus a small queue.
//!
//! # Measuring
//!
//! The sender sends PROBE (stream 0, body: the session's count of DATA
//! bytes sent) after every [`Congestion::probe_every`] bytes of DATA, and
//! whenever it stops for want of room with bytes not yet probed. The
//! receiver answers at once with PONG carrying the same count; it is queued
//! behind nothing but the receiver's own cells. A circuit is in order, so a
//! PONG says the peer has received every byte before the count: what is in
//! flight is `sent − delivered`, whatever the receiving sockets consumed
//! (the streams' windows still bound that). Its round trip includes every
//! queue on the way, at every hop, in both directions.
//!
//! # Deciding
//!
//! Once a round trip (when a PONG answers a probe sent after the last
//! decision), with `rtt` the least round trip of the round and `base` the
//! least ever seen on the circuit (its path does not change: a circuit's
//! hops are fixed), the bytes standing in queues are estimated as
//! `queued = cwnd × (rtt − base) / rtt`. In slow start the window doubles
//! each round until `queued` passes [`GAMMA`], then drops by what is
//! queued; after that it grows by a sixteenth while `queued` is under
//! [`ALPHA`] and shrinks by as much while it is over [`BETA`]. It grows
//! only in rounds where it limited the sender, so an idle or
//! application-limited circuit does not inflate it.
//!
//! The least of a round, not the mean, is the sample: on shared cores a
//! round trip also waits for processes to be scheduled, and the least of a
//! round is the one that waited least for that. The bounds are bytes, not
//! time: ALPHA–BETA (192–384 KiB) is 0.4–0.8 ms at 4 Gbit/s and 16–31 ms
//! at 100 Mbit/s.
//!
//! Those bounds are a trade between a request's wait beside a bulk stream
//! and the bulk stream's speed, measured on loopback (`benches/README.md`,
//! "Congestion control"): with 64–160 KiB a request's p99 beside a bulk
//! stream was 2.7× its unloaded p99 but one stream lost a quarter of its
//! goodput (on two shared cores a round trip also waits for processes to be
//! scheduled, which the window reads as queue); with 192–384 KiB it is
//! 5.4×, against 11× without congestion control, and goodput is within
//! the noise at three hops and 12% lower at one.
//!
//! Nothing here trusts the peer more than flow control does: a peer that
//! never answers stalls its own circuit (as it could by never
//! acknowledging), outstanding probes are bounded ([`MAX_PROBES`]), and a
//! PONG that answers no probe is a protocol error.

use std::collections::VecDeque;

/// The window a circuit starts with, in bytes.
pub const INITIAL_WINDOW: u64 = 512 << 10;
/// The least window: what a circuit may always have in flight.
pub const MIN_WINDOW: u64 = 256 << 10;
/// The most (the consumption-based circuit window bounds it anyway).
pub const MAX_WINDOW: u64 = crate::session::CIRCUIT_WINDOW;
/// Grow while fewer bytes than this stand in queues.
pub const ALPHA: u64 = 192 << 10;
/// Shrink while more bytes than this stand in queues.
pub const BETA: u64 = 384 << 10;
/// Leave slow start once more bytes than this stand in queues.
pub const GAMMA: u64 = 256 << 10;
/// Most probes unanswered at once; past it no more are sent (and the
/// window, which probes free, soon stops the sender).
pub const MAX_PROBES: usize = 4096;

/// Where a circuit's window stands, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// The window: bytes it may have in flight, in bytes.
    pub window: u64,
    /// Bytes sent that no PONG has covered yet.
    pub in_flight: u64,
    /// The least round trip seen, in µs (0 before the first).
    pub base_rtt_us: u64,
    /// The last round's least round trip, in µs (0 before the first).
    pub rtt_us: u64,
    /// Still doubling.
    pub slow_start: bool,
}

/// One sender's congestion window on a circuit. Time is an input, in µs
/// on any monotonic clock.
#[derive(Debug, Clone)]
pub struct Congestion {
    /// DATA payload bytes sealed on the session (new and sent again).
    sent: u64,
    /// `sent` at the newest answered probe: what the peer has.
    delivered: u64,
    /// `sent` at the newest probe.
    probed: u64,
    /// Unanswered probes: their count and when they went.
    probes: VecDeque<(u64, u64)>,
    window: u64,
    base_rtt: u64,
    last_rtt: u64,
    /// The round ends with the PONG of a probe at or past this count.
    round_end: u64,
    /// The least round trip seen this round.
    round_min: u64,
    slow_start: bool,
    /// The window limited the sender this round.
    limited: bool,
}

impl Default for Congestion {
    fn default() -> Self {
        Self {
            sent: 0,
            delivered: 0,
            probed: 0,
            probes: VecDeque::new(),
            window: INITIAL_WINDOW,
            base_rtt: u64::MAX,
            last_rtt: 0,
            round_end: 0,
            round_min: u64::MAX,
            slow_start: true,
            limited: false,
        }
    }
}

impl Congestion {
    /// Bytes sent that no PONG has covered.
    pub fn in_flight(&self) -> u64 {
        self.sent - self.delivered
    }

    /// Bytes it may send now (at least one record once nothing is in
    /// flight: see [`Congestion::allows`]).
    pub fn room(&self) -> u64 {
        self.window.saturating_sub(self.in_flight())
    }

    /// Whether `n` more bytes may go now. With nothing in flight anything
    /// may, so a window below one record cannot stall a circuit.
    pub fn allows(&mut self, n: u64) -> bool {
        let ok = self.in_flight() == 0 || self.in_flight() + n <= self.window;
        if !ok {
            self.limited = true;
        }
        ok
    }

    /// A probe every this many bytes: about eight a window, so a window's
    /// bytes are freed in eighths as they arrive.
    pub fn probe_every(&self) -> u64 {
        (self.window / 8).clamp(16 << 10, 256 << 10)
    }

    /// `n` bytes of DATA were sealed. Returns the count of a PROBE to send
    /// after them, if one is due.
    pub fn on_sent(&mut self, n: u64, now: u64) -> Option<u64> {
        self.sent += n;
        if self.in_flight() * 4 >= self.window * 3 {
            self.limited = true;
        }
        if self.sent - self.probed >= self.probe_every() {
            return self.probe(now);
        }
        None
    }

    /// `n` bytes were sent again (a moved stream's): counted in flight,
    /// and covered by the next probe.
    pub fn on_resent(&mut self, n: u64) {
        self.sent += n;
    }

    /// The sender stopped for want of room: probe the bytes no probe
    /// covers yet, or their room would never come back.
    pub fn on_blocked(&mut self, now: u64) -> Option<u64> {
        self.probe(now)
    }

    /// Streams wait and no room is left: if no probe is out, probe what
    /// none covers, or no PONG would ever bring room back.
    pub fn on_stalled(&mut self, now: u64) -> Option<u64> {
        if self.probes.is_empty() {
            return self.probe(now);
        }
        None
    }

    fn probe(&mut self, now: u64) -> Option<u64> {
        if self.sent == self.probed || self.probes.len() >= MAX_PROBES {
            return None;
        }
        self.probed = self.sent;
        self.probes.push_back((self.sent, now));
        Some(self.sent)
    }

    /// A PONG with `count` arrived. Returns whether the room grew; an
    /// error if it answers no probe (probes are answered in order).
    pub fn on_pong(&mut self, count: u64, now: u64) -> Result<bool, String> {
        let Some(&(expected, at)) = self.probes.front() else {
            return Err(format!("PONG {count} answers no probe"));
        };
        if count != expected {
            return Err(format!("PONG {count} where {expected} was due"));
        }
        self.probes.pop_front();
        let before = self.room();
        self.delivered = count;
        let rtt = now.saturating_sub(at).max(1);
        self.base_rtt = self.base_rtt.min(rtt);
        self.round_min = self.round_min.min(rtt);
        if count >= self.round_end {
            self.decide();
            self.round_end = self.sent;
            self.round_min = u64::MAX;
            self.limited = false;
        }
        Ok(self.room() > before)
    }

    /// The once-a-round decision (see the module's docs).
    fn decide(&mut self) {
        let (rtt, base) = (self.round_min, self.base_rtt);
        self.last_rtt = rtt;
        let queued = (u128::from(self.window) * u128::from(rtt - base) / u128::from(rtt)) as u64;
        let step = (self.window / 16).max(16 << 10);
        if self.slow_start {
            if queued > GAMMA {
                self.slow_start = false;
                self.window = self.window.saturating_sub(queued).max(MIN_WINDOW);
            } else if self.limited {
                self.window = (self.window * 2).min(MAX_WINDOW);
            }
        } else if queued > BETA {
            self.window = self.window.saturating_sub(step).max(MIN_WINDOW);
        } else if queued < ALPHA && self.limited {
            self.window = (self.window + step).min(MAX_WINDOW);
        }
    }

    /// Where it stands.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            window: self.window,
            in_flight: self.in_flight(),
            base_rtt_us: if self.base_rtt == u64::MAX {
                0
            } else {
                self.base_rtt
            },
            rtt_us: self.last_rtt,
            slow_start: self.slow_start,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a sender over a path of `rate` bytes per µs with a base
    /// round trip of `base` µs, sending whenever allowed, for `rounds`
    /// windows; returns the window at the end and the most bytes that
    /// stood in the path's queue.
    fn run(rate: u64, base: u64, rounds: usize) -> (u64, u64) {
        let mut cc = Congestion::default();
        let mut now = 0u64;
        // Bytes in the bottleneck's queue, and when it last drained.
        let mut queue = 0u64;
        let mut pongs: VecDeque<(u64, u64)> = VecDeque::new();
        let mut most = 0;
        let chunk = 16 << 10;
        let end = rounds as u64 * 1_000 * base;
        while now < end {
            // Send what the window allows, one chunk at a time.
            while cc.allows(chunk) {
                let probe = cc.on_sent(chunk, now);
                queue += chunk;
                most = most.max(queue);
                // A probe waits behind the queue, then the base round trip.
                if let Some(c) = probe {
                    pongs.push_back((c, now + queue / rate + base));
                }
            }
            if let Some(c) = cc.on_blocked(now) {
                pongs.push_back((c, now + queue / rate + base));
            }
            // Time passes to the next PONG.
            let (c, at) = pongs.pop_front().expect("a probe is out");
            let dt = at.saturating_sub(now);
            queue = queue.saturating_sub(dt * rate);
            now = now.max(at);
            cc.on_pong(c, now).unwrap();
        }
        (cc.window, most)
    }

    #[test]
    fn the_window_settles_near_the_path_and_keeps_its_queue_small() {
        // 4 Gbit/s (500 bytes/µs) and 300 µs: 150 KB in the path.
        let (window, _) = run(500, 300, 200);
        let bdp = 500 * 300;
        assert!(
            window >= bdp && window <= bdp + 2 * BETA,
            "window {window} against a path of {bdp}"
        );
        // 100 Mbit/s (12.5 bytes/µs → 12) and 50 ms: 600 KB in the path.
        let (window, _) = run(12, 50_000, 10);
        let bdp = 12 * 50_000;
        assert!(
            window >= bdp && window <= bdp + 2 * BETA,
            "window {window} against a path of {bdp}"
        );
    }

    #[test]
    fn a_queue_that_builds_shrinks_the_window() {
        let mut cc = Congestion {
            slow_start: false,
            window: 4 << 20,
            ..Congestion::default()
        };
        // The first round trip is the base; then every round trip doubles.
        let mut now = 0;
        let mut shrank = 0;
        for round in 0..40 {
            let rtt = if round == 0 { 100 } else { 200 };
            assert!(cc.allows(64 << 10));
            let c = cc
                .on_sent(1 << 20, now)
                .or_else(|| cc.on_blocked(now))
                .unwrap();
            now += rtt;
            let before = cc.window;
            cc.on_pong(c, now).unwrap();
            if cc.window < before {
                shrank += 1;
            }
        }
        assert!(shrank > 20, "the window shrank in {shrank} rounds");
        assert!(cc.window < 4 << 20);
        assert!(cc.window >= MIN_WINDOW);
    }

    #[test]
    fn an_idle_circuit_does_not_grow_its_window() {
        let mut cc = Congestion::default();
        let mut now = 0;
        for _ in 0..50 {
            // A request of 1 KiB a round trip: far under the window.
            cc.on_sent(1024, now);
            let c = cc.on_blocked(now).unwrap();
            now += 100;
            cc.on_pong(c, now).unwrap();
        }
        assert_eq!(cc.window, INITIAL_WINDOW);
    }

    #[test]
    fn pongs_must_answer_probes_in_order() {
        let mut cc = Congestion::default();
        assert!(cc.on_pong(0, 5).is_err(), "no probe out");
        cc.on_sent(100, 0);
        let a = cc.on_blocked(0).unwrap();
        cc.on_sent(100, 1);
        let b = cc.on_blocked(1).unwrap();
        assert_eq!(cc.on_blocked(2), None, "nothing new to probe");
        assert!(cc.on_pong(b, 3).is_err(), "out of order");
        assert!(cc.on_pong(a, 3).is_ok());
        assert_eq!(cc.in_flight(), 100);
        assert!(cc.on_pong(b, 4).is_ok());
        assert_eq!(cc.in_flight(), 0);
    }

    #[test]
    fn probes_outstanding_are_bounded() {
        let mut cc = Congestion::default();
        for i in 0..(MAX_PROBES as u64 + 10) {
            cc.on_sent(1, i);
            cc.on_blocked(i);
        }
        assert_eq!(cc.probes.len(), MAX_PROBES);
    }
}
