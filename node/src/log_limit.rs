//! Repeated log lines, limited with a count (docs/LOGGING.md): what a
//! remote party can repeat at will (a hostile peer's junk, a client's bad
//! handshakes, a link that keeps failing) is logged at its level once per
//! period for each reason. The lines held back go to DEBUG, and their number
//! rides on the next line let through as the field `held_back`, so an
//! operator sees how often it happened without a flood. Every occurrence is
//! also counted in `/metrics` where the caller has a counter for it.
//!
//! A reason is a [`Key`]: what happened and, where it has kinds, which
//! kind (`("link closed", "malformed")`), so one kind cannot hide another
//! for a minute. Both parts are `&'static str`, so the table is bounded by
//! the call sites. Time is an input (`now` in ms since the epoch), so tests
//! drive it.
//!
//! Not in this module: which reasons are limited (the call sites choose,
//! with [`warn_limited!`](crate::warn_limited) or
//! [`info_limited!`](crate::info_limited)).

use std::collections::BTreeMap;
use std::sync::Mutex;

/// One line per reason per period; see the module docs.
#[derive(Debug)]
pub struct LogLimit {
    period_ms: u64,
    slots: Mutex<BTreeMap<Key, Slot>>,
}

/// A reason lines are limited by: what happened, and which kind of it
/// (empty where it has no kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key(pub &'static str, pub &'static str);

impl From<&'static str> for Key {
    fn from(what: &'static str) -> Self {
        Key(what, "")
    }
}

impl From<(&'static str, &'static str)> for Key {
    fn from((what, kind): (&'static str, &'static str)) -> Self {
        Key(what, kind)
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// When the last line for this reason was let through.
    last_ms: u64,
    /// Lines held back since.
    held: u64,
}

impl LogLimit {
    /// One line per reason every `period_ms`.
    pub const fn new(period_ms: u64) -> Self {
        Self {
            period_ms,
            slots: Mutex::new(BTreeMap::new()),
        }
    }

    /// One line per reason a minute: for warnings.
    pub const fn per_minute() -> Self {
        Self::new(60_000)
    }

    /// `Some(held_back)` when a line for `reason` may be written at `now`
    /// (`held_back` lines were held back since the last one), `None` when
    /// this one is held back.
    pub fn allow(&self, reason: impl Into<Key>, now_ms: u64) -> Option<u64> {
        let reason = reason.into();
        let mut slots = self.slots.lock().expect("log limit lock");
        match slots.get_mut(&reason) {
            // A clock stepped back starts a new period (it must not hold
            // lines back for as long as it stepped).
            Some(s) if (s.last_ms..s.last_ms.saturating_add(self.period_ms)).contains(&now_ms) => {
                s.held += 1;
                None
            }
            Some(s) => {
                s.last_ms = now_ms;
                Some(std::mem::take(&mut s.held))
            }
            None => {
                slots.insert(
                    reason,
                    Slot {
                        last_ms: now_ms,
                        held: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::per_minute()
    }
}

/// A WARN line limited by a [`LogLimit`] (`$limit`) per `$reason` (a
/// [`Key`], or what makes one: `"what"` or `("what", kind)`): let through (with `held_back = N` when N lines were
/// held back since the last), else at DEBUG. The rest is what
/// `tracing::warn!` takes.
#[macro_export]
macro_rules! warn_limited {
    ($limit:expr, $reason:expr, $($arg:tt)+) => {
        match $limit.allow($reason, $crate::authority::now_ms()) {
            Some(0) => ::tracing::warn!($($arg)+),
            Some(held_back) => ::tracing::warn!(held_back, $($arg)+),
            None => ::tracing::debug!($($arg)+),
        }
    };
}

/// An INFO line limited as [`warn_limited!`](crate::warn_limited) limits
/// a WARN one.
#[macro_export]
macro_rules! info_limited {
    ($limit:expr, $reason:expr, $($arg:tt)+) => {
        match $limit.allow($reason, $crate::authority::now_ms()) {
            Some(0) => ::tracing::info!($($arg)+),
            Some(held_back) => ::tracing::info!(held_back, $($arg)+),
            None => ::tracing::debug!($($arg)+),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_reason_a_period_and_the_next_carries_the_count() {
        let l = LogLimit::per_minute();
        assert_eq!(l.allow("expired", 1_000), Some(0), "the first goes out");
        assert_eq!(l.allow("expired", 30_000), None);
        assert_eq!(l.allow("rollback", 30_000), Some(0), "reasons are separate");
        assert_eq!(
            l.allow(("expired", "late"), 30_000),
            Some(0),
            "and so are kinds"
        );
        assert_eq!(l.allow("expired", 60_999), None);
        assert_eq!(
            l.allow("expired", 61_000),
            Some(2),
            "the next line says how many were held back"
        );
        assert_eq!(
            l.allow("expired", 121_000),
            Some(0),
            "and the count starts over"
        );
    }

    #[test]
    fn a_clock_that_steps_back_starts_a_new_period() {
        let l = LogLimit::new(1_000);
        assert_eq!(l.allow("r", 10_000), Some(0));
        assert_eq!(l.allow("r", 10_500), None);
        assert_eq!(
            l.allow("r", 5),
            Some(1),
            "an hour back is not an hour of silence"
        );
        assert_eq!(l.allow("r", 6), None);
        assert_eq!(l.allow("r", u64::MAX - 10), Some(1));
        assert_eq!(
            l.allow("r", u64::MAX - 1),
            None,
            "no overflow at the end of time"
        );
    }
}
