//! A node's circuit table and what each cell does: a pure function from an
//! input cell to one [`Dispatch`].
//!
//! A circuit is known on a node by `(link, circ_id)` for each side it has.
//! A relay maps each side to the other and forwards cells with nothing more
//! than a circuit-id rewrite. The hop at a circuit's *tip* (the last hop
//! built so far) holds a session with the origin and reads CONTROL cells;
//! after an EXTEND it [splices](Table::splice) the circuit and only
//! forwards. The table owns what a circuit *is* on this node; the shell owns
//! the links and sessions that the slots name, and does what
//! [`Table::dispatch`] says.
//!
//! The table is generic over what the shell keeps for a link (`L`: its
//! handle, so a forward needs no second lookup), a tip (`T`), an origin
//! circuit (`O`) and an extend waiting for CREATED (`P`), so it can be
//! tested with plain values.

use crate::error::Error;
use ferry_proto::CellCmd;
use ferry_proto::pb::DestroyReason;
use std::collections::HashMap;

/// The shell's id of a link.
pub type LinkId = u64;

/// What the table keeps of a link: something that knows its id (the
/// shell's link handle; plain [`LinkId`]s in tests).
pub trait LinkRef: Clone {
    /// The link's id.
    fn link_id(&self) -> LinkId;
}

impl LinkRef for LinkId {
    fn link_id(&self) -> LinkId {
        *self
    }
}

/// The most hops a circuit may have.
pub const MAX_HOPS: usize = 8;

/// CONTROL cells one side of a forwarded circuit passes on.
///
/// Only the tip reads CONTROL cells, and the only ones an origin sends are
/// EXTENDs (each answered by one CONTROL cell back). The first hop of an
/// `n`-hop circuit handles the EXTEND to hop 2 itself as the tip, and then
/// forwards the EXTENDs to hops 3 to `n`: `n - 2` of them each way. Hop 1
/// is one the origin does not control, so counting there bounds the
/// circuit: a ninth hop needs a seventh forwarded CONTROL cell, which ends
/// the circuit. This is Tor's RELAY_EARLY bound (Evans et al., 2009: a
/// circuit looping A→B→A→… makes each byte cross one link as many times as
/// the loop is long), kept without a separate cell type, because Ferry
/// never sends CONTROL cells through a relay after the build.
pub const MAX_FORWARDED_CONTROL: u8 = (MAX_HOPS - 2) as u8;

/// One side of a circuit on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot<L, T, O, P> {
    /// Forward everything to the other side.
    Forward {
        /// The other side's link.
        link: L,
        /// The circuit id there.
        circ: u32,
        /// CONTROL cells that arrived on this side and went on (at most
        /// [`MAX_FORWARDED_CONTROL`]).
        controls: u8,
        /// A cell arrived on this side since the last
        /// [`Table::sweep_forwards`].
        seen: bool,
    },
    /// We sent CREATE on this side (extending) and wait for CREATED.
    Pending(P),
    /// We are the circuit's tip: we hold a session with its origin.
    Tip(T),
    /// We are the circuit's origin.
    Origin(O),
}

/// What to do with one cell.
#[derive(Debug, PartialEq, Eq)]
pub enum Dispatch<L, T, O, P> {
    /// Rewrite the cell's circuit id to `circ` and send it on `link`.
    Forward {
        /// Where to.
        link: L,
        /// The circuit id there.
        circ: u32,
    },
    /// A CREATE for a free circuit id: answer it (the hop handshake) and
    /// [`Table::add_tip`], or refuse it with a DESTROY.
    Create,
    /// A CREATE for a circuit id already in use on this link: refuse it.
    CreateInUse,
    /// The CREATED an extend was waiting for: its slot is removed; hand
    /// the cell to `P`.
    Created(P),
    /// A CONTROL or RELAY cell for the tip's session.
    Tip(T),
    /// A CREATED, CONTROL or RELAY cell for an origin circuit.
    Origin(O),
    /// A drain NOTICE reached the origin of the circuit.
    Notice(O),
    /// A DESTROY: the slot was removed. Close what it held, and send a
    /// DESTROY with `reason` to `notify` (the other side of a forward).
    Destroyed {
        /// The removed slot.
        slot: Slot<L, T, O, P>,
        /// The other side to tell, if the slot forwarded.
        notify: Option<(L, u32)>,
        /// The reason the DESTROY carried.
        reason: DestroyReason,
    },
    /// Nothing to do: `why`, for a debug log.
    Drop(&'static str),
    /// A CONTROL cell past [`MAX_FORWARDED_CONTROL`] on a forwarded side:
    /// the origin is building past [`MAX_HOPS`]. Destroy the circuit (a
    /// protocol violation); the cell goes no further.
    TooLong,
}

/// What removing a slot leaves to do: the slot's contents to close, and
/// the other side of a forward to tell.
#[derive(Debug, PartialEq, Eq)]
pub struct Removed<L, T, O, P> {
    /// The circuit id the slot had on its link.
    pub circ: u32,
    /// The slot.
    pub slot: Slot<L, T, O, P>,
    /// The other side of a forward: send it a DESTROY.
    pub notify: Option<(L, u32)>,
}

/// Circuits by `(link, circuit id)`.
#[derive(Debug)]
pub struct Table<L, T, O, P> {
    slots: HashMap<(LinkId, u32), Slot<L, T, O, P>>,
    /// Circuit sides on each link (what the per-link limit counts).
    per_link: HashMap<LinkId, usize>,
}

impl<L, T, O, P> Default for Table<L, T, O, P> {
    fn default() -> Self {
        Self {
            slots: HashMap::new(),
            per_link: HashMap::new(),
        }
    }
}

impl<L: LinkRef, T: Clone, O: Clone, P> Table<L, T, O, P> {
    /// What to do with a cell `cmd` that arrived on `link` for `circ`. For
    /// DESTROY, `reason` is what it carried (ignored otherwise).
    pub fn dispatch(
        &mut self,
        link: LinkId,
        circ: u32,
        cmd: CellCmd,
        reason: DestroyReason,
    ) -> Dispatch<L, T, O, P> {
        let key = (link, circ);
        match cmd {
            CellCmd::Create => {
                if self.slots.contains_key(&key) {
                    Dispatch::CreateInUse
                } else {
                    Dispatch::Create
                }
            }
            CellCmd::Destroy => match self.take(key) {
                Some(slot) => {
                    let notify = self.unlink(&slot);
                    Dispatch::Destroyed {
                        slot,
                        notify,
                        reason,
                    }
                }
                None => Dispatch::Drop("destroy for an unknown circuit"),
            },
            CellCmd::Created => match self.slots.get(&key) {
                Some(Slot::Pending(_)) => match self.take(key) {
                    Some(Slot::Pending(p)) => Dispatch::Created(p),
                    _ => unreachable!("checked just above"),
                },
                Some(Slot::Origin(o)) => Dispatch::Origin(o.clone()),
                Some(_) => Dispatch::Drop("CREATED for a circuit that is not waiting for one"),
                None => Dispatch::Drop("cell for an unknown circuit"),
            },
            CellCmd::Control | CellCmd::Relay | CellCmd::Notice => match self.slots.get_mut(&key) {
                Some(Slot::Forward {
                    link,
                    circ,
                    controls,
                    seen,
                }) => {
                    *seen = true;
                    if cmd == CellCmd::Control {
                        if *controls >= MAX_FORWARDED_CONTROL {
                            return Dispatch::TooLong;
                        }
                        *controls += 1;
                    }
                    Dispatch::Forward {
                        link: link.clone(),
                        circ: *circ,
                    }
                }
                Some(Slot::Tip(_)) if cmd == CellCmd::Notice => {
                    // The origin owns the circuit; the tip needs no notice.
                    Dispatch::Drop("drain notice at the tip")
                }
                Some(Slot::Tip(t)) => Dispatch::Tip(t.clone()),
                Some(Slot::Origin(o)) if cmd == CellCmd::Notice => Dispatch::Notice(o.clone()),
                Some(Slot::Origin(o)) => Dispatch::Origin(o.clone()),
                Some(Slot::Pending(_)) => Dispatch::Drop("cell for a circuit still being created"),
                None => Dispatch::Drop("cell for an unknown circuit"),
            },
            // The link answers these itself; one here went astray.
            CellCmd::Ping | CellCmd::Pong => Dispatch::Drop("link-level cell"),
        }
    }
}

impl<L: LinkRef, T, O, P> Table<L, T, O, P> {
    /// Puts a slot in (every insertion goes through here, for the counts).
    fn put(&mut self, key: (LinkId, u32), slot: Slot<L, T, O, P>) -> Option<Slot<L, T, O, P>> {
        let old = self.slots.insert(key, slot);
        if old.is_none() {
            *self.per_link.entry(key.0).or_default() += 1;
        }
        old
    }

    /// Takes a slot out (every removal goes through here, for the counts).
    fn take(&mut self, key: (LinkId, u32)) -> Option<Slot<L, T, O, P>> {
        let old = self.slots.remove(&key)?;
        if let std::collections::hash_map::Entry::Occupied(mut n) = self.per_link.entry(key.0) {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
        Some(old)
    }

    /// For a removed forward slot, removes its other side too and returns
    /// where to send DESTROY.
    fn unlink(&mut self, slot: &Slot<L, T, O, P>) -> Option<(L, u32)> {
        match slot {
            Slot::Forward { link, circ, .. } => {
                self.take((link.link_id(), *circ));
                Some((link.clone(), *circ))
            }
            _ => None,
        }
    }

    /// Circuit sides on `link` (forwards, tips, origins and pending
    /// extends alike).
    pub fn on_link(&self, link: LinkId) -> usize {
        self.per_link.get(&link).copied().unwrap_or(0)
    }

    /// Whether `(link, circ)` is in use.
    pub fn contains(&self, link: LinkId, circ: u32) -> bool {
        self.slots.contains_key(&(link, circ))
    }

    /// The slot at `(link, circ)`.
    pub fn get(&self, link: LinkId, circ: u32) -> Option<&Slot<L, T, O, P>> {
        self.slots.get(&(link, circ))
    }

    /// Adds a tip (a CREATE this node answered).
    pub fn add_tip(&mut self, link: LinkId, circ: u32, tip: T) {
        self.put((link, circ), Slot::Tip(tip));
    }

    /// Adds a circuit this node originates.
    pub fn add_origin(&mut self, link: LinkId, circ: u32, origin: O) {
        self.put((link, circ), Slot::Origin(origin));
    }

    /// Adds an extend waiting for CREATED on `(link, circ)`.
    pub fn add_pending(&mut self, link: LinkId, circ: u32, pending: P) {
        self.put((link, circ), Slot::Pending(pending));
    }

    /// Forgets one side of a circuit, sending nothing.
    pub fn remove(&mut self, link: LinkId, circ: u32) -> Option<Slot<L, T, O, P>> {
        self.take((link, circ))
    }

    /// Removes a circuit from one side (the shell sends DESTROY on that
    /// side itself) and returns what is left to do.
    pub fn destroy(&mut self, link: LinkId, circ: u32) -> Option<Removed<L, T, O, P>> {
        let slot = self.take((link, circ))?;
        let notify = self.unlink(&slot);
        Some(Removed { circ, slot, notify })
    }

    /// After an EXTEND: the tip at `inward` is now a relay between `inward`
    /// and `outward` (where CREATED came back). Fails, changing nothing,
    /// unless `inward` is still a tip for which `is_ours` holds (the
    /// circuit could have closed while the extend waited).
    pub fn splice(
        &mut self,
        (in_link, in_circ): (L, u32),
        (out_link, out_circ): (L, u32),
        is_ours: impl FnOnce(&T) -> bool,
    ) -> Result<T, Error> {
        let inward = (in_link.link_id(), in_circ);
        let outward = (out_link.link_id(), out_circ);
        match self.slots.get(&inward) {
            Some(Slot::Tip(t)) if is_ours(t) => {}
            _ => return Err(Error::Closed),
        }
        if self.slots.contains_key(&outward) {
            return Err(Error::Protocol(
                "the outward circuit id is already in use".into(),
            ));
        }
        let Some(Slot::Tip(tip)) = self.put(
            inward,
            Slot::Forward {
                link: out_link,
                circ: out_circ,
                controls: 0,
                seen: true,
            },
        ) else {
            unreachable!("checked just above")
        };
        self.put(
            outward,
            Slot::Forward {
                link: in_link,
                circ: in_circ,
                controls: 0,
                seen: true,
            },
        );
        Ok(tip)
    }

    /// A link went down: every circuit side on it is removed; returns what
    /// is left to do for each (the other side of forwards to tell).
    pub fn link_down(&mut self, link: LinkId) -> Vec<Removed<L, T, O, P>> {
        let mut keys: Vec<u32> = self
            .slots
            .keys()
            .filter(|(l, _)| *l == link)
            .map(|(_, c)| *c)
            .collect();
        keys.sort_unstable();
        keys.into_iter()
            .filter_map(|c| self.destroy(link, c))
            .collect()
    }

    /// Removes every circuit; returns each side as `(link, Removed)`.
    pub fn drain_all(&mut self) -> Vec<(LinkId, Removed<L, T, O, P>)> {
        self.per_link.clear();
        let mut all: Vec<_> = self.slots.drain().collect();
        all.sort_unstable_by_key(|(k, _)| *k);
        all.into_iter()
            .map(|((link, circ), slot)| {
                (
                    link,
                    Removed {
                        circ,
                        slot,
                        notify: None,
                    },
                )
            })
            .collect()
    }

    /// Circuits this node carries for others: forwards count once per
    /// circuit (two sides each), tips once.
    pub fn carried(&self) -> usize {
        let forwards = self
            .slots
            .values()
            .filter(|s| matches!(s, Slot::Forward { .. }))
            .count();
        let tips = self
            .slots
            .values()
            .filter(|s| matches!(s, Slot::Tip(_)))
            .count();
        forwards / 2 + tips
    }

    /// Every side of every circuit this node forwards, as `(link, circ)`
    /// (where a drain notice goes).
    pub fn forwarding(&self) -> Vec<(L, u32)> {
        let mut v: Vec<(L, u32)> = self
            .slots
            .values()
            .filter_map(|s| match s {
                Slot::Forward { link, circ, .. } => Some((link.clone(), *circ)),
                _ => None,
            })
            .collect();
        v.sort_unstable_by_key(|(l, c)| (l.link_id(), *c));
        v
    }

    /// Forwarded circuits no cell crossed, either way, since the last
    /// sweep: one side of each, to destroy (both sides go). Starts the next
    /// period.
    pub fn sweep_forwards(&mut self) -> Vec<(LinkId, u32)> {
        let mut idle = Vec::new();
        for (key, slot) in &self.slots {
            if let Slot::Forward {
                link, circ, seen, ..
            } = slot
            {
                let other = (link.link_id(), *circ);
                let other_seen = matches!(
                    self.slots.get(&other),
                    Some(Slot::Forward { seen: true, .. })
                );
                if !seen && !other_seen && *key < other {
                    idle.push(*key);
                }
            }
        }
        for slot in self.slots.values_mut() {
            if let Slot::Forward { seen, .. } = slot {
                *seen = false;
            }
        }
        idle.sort_unstable();
        idle
    }

    /// Every tip, with where it is (the shell checks each for quiet).
    pub fn tips(&self) -> Vec<(LinkId, u32, T)>
    where
        T: Clone,
    {
        self.slots
            .iter()
            .filter_map(|(k, s)| match s {
                Slot::Tip(t) => Some((k.0, k.1, t.clone())),
                _ => None,
            })
            .collect()
    }

    /// The link of every circuit side (for counting by neighbour).
    pub fn links(&self) -> Vec<LinkId> {
        self.slots.keys().map(|(l, _)| *l).collect()
    }

    /// Circuit sides in the table.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DestroyReason as R;

    type T = Table<LinkId, &'static str, &'static str, &'static str>;

    fn relay() -> T {
        // Circuit 7 on link 1 is spliced to circuit 9 on link 2.
        let mut t = T::default();
        t.add_tip(1, 7, "tip");
        t.add_pending(2, 9, "waiting");
        assert_eq!(
            t.dispatch(2, 9, CellCmd::Created, R::Unspecified),
            Dispatch::Created("waiting")
        );
        assert_eq!(t.splice((1, 7), (2, 9), |t| *t == "tip").unwrap(), "tip");
        t
    }

    #[test]
    fn forward_maps_each_side_to_the_other() {
        let mut t = relay();
        for cmd in [CellCmd::Relay, CellCmd::Control, CellCmd::Notice] {
            assert_eq!(
                t.dispatch(1, 7, cmd, R::Unspecified),
                Dispatch::Forward { link: 2, circ: 9 }
            );
            assert_eq!(
                t.dispatch(2, 9, cmd, R::Unspecified),
                Dispatch::Forward { link: 1, circ: 7 }
            );
        }
        assert_eq!(t.carried(), 1);
        assert_eq!(
            t.dispatch(2, 9, CellCmd::Created, R::Unspecified),
            Dispatch::Drop("CREATED for a circuit that is not waiting for one"),
            "a second CREATED is not forwarded"
        );
        assert_eq!(
            t.dispatch(3, 7, CellCmd::Relay, R::Unspecified),
            Dispatch::Drop("cell for an unknown circuit"),
            "the same id on another link is another circuit"
        );
    }

    /// A relay passes on the CONTROL cells of an 8-hop build (six each
    /// way at the first hop), and the seventh ends the circuit: no loop
    /// through relays builds past [`MAX_HOPS`].
    #[test]
    fn a_build_past_eight_hops_is_cut_at_the_first_hop() {
        let mut t = relay();
        for _ in 0..MAX_FORWARDED_CONTROL {
            assert_eq!(
                t.dispatch(1, 7, CellCmd::Control, R::Unspecified),
                Dispatch::Forward { link: 2, circ: 9 }
            );
            assert_eq!(
                t.dispatch(2, 9, CellCmd::Control, R::Unspecified),
                Dispatch::Forward { link: 1, circ: 7 }
            );
        }
        for _ in 0..100 {
            assert_eq!(
                t.dispatch(1, 7, CellCmd::Relay, R::Unspecified),
                Dispatch::Forward { link: 2, circ: 9 },
                "RELAY cells are not counted"
            );
        }
        assert_eq!(
            t.dispatch(1, 7, CellCmd::Control, R::Unspecified),
            Dispatch::TooLong
        );
        assert_eq!(
            t.dispatch(2, 9, CellCmd::Control, R::Unspecified),
            Dispatch::TooLong,
            "each side is bounded"
        );
    }

    /// A forwarded circuit is idle after a whole period with no cell
    /// either way; a cell on either side keeps both.
    #[test]
    fn idle_forwards_are_found_by_sweeps() {
        let mut t = relay();
        assert!(t.sweep_forwards().is_empty(), "new: seen");
        t.dispatch(2, 9, CellCmd::Relay, R::Unspecified);
        assert!(t.sweep_forwards().is_empty(), "a cell one way keeps it");
        assert_eq!(t.sweep_forwards(), vec![(1, 7)], "one side of the pair");
        t.dispatch(1, 7, CellCmd::Relay, R::Unspecified);
        assert!(t.sweep_forwards().is_empty());
    }

    #[test]
    fn sides_are_counted_per_link() {
        let mut t = relay();
        t.add_tip(1, 8, "tip2");
        t.add_origin(3, 1, "mine");
        t.add_pending(3, 2, "w");
        assert_eq!((t.on_link(1), t.on_link(2), t.on_link(3)), (2, 1, 2));
        t.dispatch(3, 2, CellCmd::Created, R::Unspecified);
        assert_eq!(t.on_link(3), 1, "a CREATED takes its pending slot");
        t.destroy(2, 9);
        assert_eq!(
            (t.on_link(1), t.on_link(2)),
            (1, 0),
            "both sides of the forward"
        );
        t.link_down(1);
        assert_eq!(t.on_link(1), 0);
        t.drain_all();
        assert_eq!(t.on_link(3), 0);
        assert!(t.is_empty());
    }

    #[test]
    fn destroy_removes_both_sides_and_names_the_other() {
        for (from, other) in [((1, 7), (2, 9)), ((2, 9), (1, 7))] {
            let mut t = relay();
            match t.dispatch(from.0, from.1, CellCmd::Destroy, R::LinkLost) {
                Dispatch::Destroyed { notify, reason, .. } => {
                    assert_eq!(notify, Some(other));
                    assert_eq!(reason, R::LinkLost);
                }
                d => panic!("{d:?}"),
            }
            assert!(t.is_empty(), "both sides gone");
            assert_eq!(
                t.dispatch(other.0, other.1, CellCmd::Relay, R::Unspecified),
                Dispatch::Drop("cell for an unknown circuit")
            );
        }
    }

    #[test]
    fn a_lost_link_destroys_every_circuit_on_it_and_tells_the_far_sides() {
        let mut t = relay();
        t.add_tip(1, 8, "tip2");
        t.add_origin(3, 1, "mine");
        let gone = t.link_down(1);
        assert_eq!(gone.len(), 2);
        assert_eq!(gone[0].notify, Some((2, 9)));
        assert_eq!(gone[1].slot, Slot::Tip("tip2"));
        assert_eq!(gone[1].notify, None);
        assert_eq!(t.len(), 1, "only the circuit on link 3 is left");
        assert!(t.contains(3, 1));
    }

    #[test]
    fn a_pending_created_goes_to_its_waiter_once() {
        let mut t = T::default();
        t.add_pending(2, 5, "w");
        assert_eq!(
            t.dispatch(2, 5, CellCmd::Relay, R::Unspecified),
            Dispatch::Drop("cell for a circuit still being created")
        );
        assert_eq!(
            t.dispatch(2, 5, CellCmd::Created, R::Unspecified),
            Dispatch::Created("w")
        );
        assert_eq!(
            t.dispatch(2, 5, CellCmd::Created, R::Unspecified),
            Dispatch::Drop("cell for an unknown circuit")
        );
        // A pending create destroyed by the next hop: its waiter hears why.
        t.add_pending(2, 6, "w2");
        assert_eq!(
            t.dispatch(2, 6, CellCmd::Destroy, R::Draining),
            Dispatch::Destroyed {
                slot: Slot::Pending("w2"),
                notify: None,
                reason: R::Draining
            }
        );
    }

    #[test]
    fn splice_fails_when_the_tip_closed_meanwhile() {
        let mut t = T::default();
        t.add_tip(1, 7, "tip");
        assert!(matches!(
            t.splice((1, 7), (2, 9), |t| *t == "other"),
            Err(Error::Closed)
        ));
        t.remove(1, 7);
        assert!(matches!(
            t.splice((1, 7), (2, 9), |_| true),
            Err(Error::Closed)
        ));
        assert!(t.is_empty(), "nothing changed");
    }

    #[test]
    fn create_is_answered_once_per_id() {
        let mut t = T::default();
        assert_eq!(
            t.dispatch(1, 3, CellCmd::Create, R::Unspecified),
            Dispatch::Create
        );
        t.add_tip(1, 3, "tip");
        assert_eq!(
            t.dispatch(1, 3, CellCmd::Create, R::Unspecified),
            Dispatch::CreateInUse
        );
        assert_eq!(
            t.dispatch(1, 3, CellCmd::Relay, R::Unspecified),
            Dispatch::Tip("tip")
        );
        assert_eq!(
            t.dispatch(1, 3, CellCmd::Notice, R::Unspecified),
            Dispatch::Drop("drain notice at the tip")
        );
    }

    #[test]
    fn origin_cells_and_notices() {
        let mut t = T::default();
        t.add_origin(4, 2, "o");
        assert_eq!(
            t.dispatch(4, 2, CellCmd::Created, R::Unspecified),
            Dispatch::Origin("o")
        );
        assert_eq!(
            t.dispatch(4, 2, CellCmd::Relay, R::Unspecified),
            Dispatch::Origin("o")
        );
        assert_eq!(
            t.dispatch(4, 2, CellCmd::Notice, R::Unspecified),
            Dispatch::Notice("o")
        );
        assert_eq!(
            t.carried(),
            0,
            "an origin circuit is not carried for others"
        );
    }
}
