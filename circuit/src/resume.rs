//! The exit's streams by resume token: where a `Resume` finds its stream.
//!
//! A token names a stream that is *live* (attached to a session), *parked*
//! (its circuit closed before the stream ended: kept for a while for the
//! origin to move it), or *completed* (ended cleanly at both ends: a
//! tombstone, so an origin whose last acknowledgement was lost hears that it
//! has everything instead of "no such stream"). Parked streams and
//! tombstones expire. Live and parked streams are bounded by `max` (the
//! exit refuses new streams past it); tombstones are bounded by `max` on
//! their own, the oldest making room, so clean short streams never crowd
//! out new ones.

use crate::session::{Stream, Token};
use std::collections::{HashMap, VecDeque};

/// What a token names.
#[derive(Debug)]
pub enum Found<H> {
    /// A stream attached to a session; `H` says which (the shell's handle).
    Live(H),
    /// A stream whose circuit closed; it is the caller's now.
    Parked(H, Box<Stream>),
    /// A stream that ended cleanly, having received this many bytes.
    Completed(u64),
    /// Nothing (never issued, expired, or the all-zero token).
    Unknown,
}

#[derive(Debug)]
enum Entry<H> {
    Live(H),
    Parked(H, Box<Stream>, u64),
}

/// The registry.
#[derive(Debug)]
pub struct Resumables<H> {
    streams: HashMap<Token, Entry<H>>,
    /// Tombstones: bytes received, and until when.
    done: HashMap<Token, (u64, u64)>,
    /// Tombstones oldest first (a token may appear again after a newer
    /// tombstone replaced it: only the entry whose time matches counts).
    done_order: VecDeque<(Token, u64)>,
    /// How long parked streams and tombstones are kept (ms).
    keep_ms: u64,
    max: usize,
}

impl<H: Clone> Resumables<H> {
    /// A registry keeping parked streams and tombstones `keep_ms`, with at
    /// most `max` live or parked streams and `max` tombstones.
    pub fn new(keep_ms: u64, max: usize) -> Self {
        Self {
            streams: HashMap::new(),
            done: HashMap::new(),
            done_order: VecDeque::new(),
            keep_ms,
            max,
        }
    }

    /// Live and parked streams held.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Whether it holds no stream.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Tombstones held.
    pub fn tombstones(&self) -> usize {
        self.done.len()
    }

    /// Whether another live stream fits.
    pub fn has_room(&self) -> bool {
        self.streams.len() < self.max
    }

    /// A stream went live (connected, or moved here).
    pub fn live(&mut self, token: Token, handle: H) {
        self.done.remove(&token);
        self.streams.insert(token, Entry::Live(handle));
    }

    /// What `token` names; a parked stream is taken out (to be attached,
    /// after which the caller makes it [live](Resumables::live) again).
    pub fn find(&mut self, token: &Token) -> Found<H> {
        if *token == [0; 16] {
            return Found::Unknown;
        }
        match self.streams.get(token) {
            Some(Entry::Live(h)) => Found::Live(h.clone()),
            Some(Entry::Parked(..)) => match self.streams.remove(token) {
                Some(Entry::Parked(h, s, _)) => Found::Parked(h, s),
                _ => unreachable!("checked just above"),
            },
            None => match self.done.get(token) {
                Some((received, _)) => Found::Completed(*received),
                None => Found::Unknown,
            },
        }
    }

    /// The stream's circuit closed before it ended: keep it until
    /// `now + keep` for a move.
    pub fn park(&mut self, handle: H, stream: Stream, now: u64) {
        let token = stream.token();
        self.streams.insert(
            token,
            Entry::Parked(handle, Box::new(stream), now.saturating_add(self.keep_ms)),
        );
    }

    /// The stream ended cleanly at both ends: keep a tombstone (the oldest
    /// goes if there are `max`).
    pub fn completed(&mut self, token: Token, received: u64, now: u64) {
        self.streams.remove(&token);
        while self.done.len() >= self.max {
            let Some((t, until)) = self.done_order.pop_front() else {
                break;
            };
            if self.done.get(&t).is_some_and(|(_, u)| *u == until) {
                self.done.remove(&t);
            }
        }
        let until = now.saturating_add(self.keep_ms);
        self.done.insert(token, (received, until));
        self.done_order.push_back((token, until));
    }

    /// The stream ended abnormally or its socket side is gone for good:
    /// forget the token, unless it is parked (a move may still come).
    pub fn forget(&mut self, token: &Token) {
        if matches!(self.streams.get(token), Some(Entry::Live(_))) {
            self.streams.remove(token);
        }
    }

    /// When [`Resumables::handle_timeout`] should next run (ms).
    pub fn poll_timeout(&self) -> Option<u64> {
        let parked = self.streams.values().filter_map(|e| match e {
            Entry::Live(_) => None,
            Entry::Parked(_, _, t) => Some(*t),
        });
        parked.chain(self.done_order.front().map(|(_, t)| *t)).min()
    }

    /// Drops expired tombstones; returns the parked streams that expired
    /// (the shell resets their sockets).
    pub fn handle_timeout(&mut self, now: u64) -> Vec<(H, Box<Stream>)> {
        while let Some((t, until)) = self.done_order.front().copied() {
            if until > now {
                break;
            }
            self.done_order.pop_front();
            if self.done.get(&t).is_some_and(|(_, u)| *u == until) {
                self.done.remove(&t);
            }
        }
        let expired: Vec<Token> = self
            .streams
            .iter()
            .filter(|(_, e)| matches!(e, Entry::Parked(_, _, t) if *t <= now))
            .map(|(k, _)| *k)
            .collect();
        let mut out = Vec::new();
        for k in expired {
            if let Some(Entry::Parked(h, s, _)) = self.streams.remove(&k) {
                out.push((h, s));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tombstones_make_room_for_themselves_and_never_block_live_streams() {
        let mut r: Resumables<u8> = Resumables::new(1_000, 2);
        for i in 1..=5u8 {
            r.completed([i; 16], u64::from(i), 0);
        }
        assert_eq!(r.tombstones(), 2, "the oldest went");
        assert!(matches!(r.find(&[5; 16]), Found::Completed(5)));
        assert!(matches!(r.find(&[1; 16]), Found::Unknown));
        assert!(r.has_room(), "tombstones do not count against streams");
        r.live([9; 16], 9);
        r.live([8; 16], 8);
        assert!(!r.has_room());
        r.forget(&[9; 16]);
        assert!(r.has_room());
        assert!(r.handle_timeout(1_000).is_empty());
        assert_eq!(r.tombstones(), 0, "expired");
        assert!(
            matches!(r.find(&[0; 16]), Found::Unknown),
            "never the zero token"
        );
    }
}
