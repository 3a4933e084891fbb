//! A link's queue for the cells of the circuits this node ends (and for
//! circuit builds and link upkeep): bounded in bytes, and fair between the
//! circuits that wait for room in it.
//!
//! Every sender waits its turn for room (tokio's [`Semaphore`] serves
//! waiters in the order they asked, a large request blocking smaller ones
//! behind it), and a circuit's sender ([`crate::endpoint`]'s flush) holds
//! one reservation at a time. So circuits that all have cells to send
//! enter the queue a cell each in turn, and a busy circuit delays another
//! circuit's next cell by at most what the queue holds
//! ([`LINK_QUEUE_BYTES`]) and one cell of each circuit that asked first.
//! Forwarded cells do not come here: they wait per circuit in the link's
//! overflow, which takes turns with this queue.
//!
//! Bounded in bytes, the queue holds about what the writer puts in one
//! `write` call. A reservation takes the room of the largest cell until its
//! cell is known (then gives back the rest), so a caller may reserve first
//! and take the cell from its session only once there is room (nothing is
//! lost to a cancelled wait).
//!
//! Small best-effort cells (keepalive PING and PONG, notices, circuit
//! control that should follow its circuit's data) do not wait for room,
//! nor take it from senders that do: the room freed on a busy link goes to
//! the waiting senders first, so such a cell would almost never find any.
//! They go in the same order on a room of their own
//! ([`CONTROL_BYTES`]).

use super::{LinkClosed, QUEUED_CELL_OVERHEAD as OVERHEAD};
use bytes::BytesMut;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

/// Bytes of cells the queue holds before senders wait: about one of the
/// writer's batches, so the writer has the next batch ready while the
/// kernel takes the last, and no more.
pub const LINK_QUEUE_BYTES: usize = 256 * 1024;

/// Bytes of small best-effort cells the queue holds besides
/// ([`CellQueue::try_send_control`]): a few hundred PINGs or DESTROYs.
pub const CONTROL_BYTES: usize = 16 * 1024;

/// The room a reservation holds until its cell is known: the largest cell.
pub(crate) const MAX_COST: usize = ferry_proto::MAX_NOISE_MESSAGE + OVERHEAD;

/// Why [`CellQueue::try_send`] did not queue a cell.
#[derive(Debug)]
pub enum TrySendError {
    /// Not enough room now (the cell is handed back).
    Full(BytesMut),
    /// The link is gone (the cell is dropped).
    Closed,
}

/// Cells in order, with the room each holds.
#[derive(Debug)]
pub struct CellQueue {
    state: Mutex<State>,
    room: Semaphore,
    ready: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Cells in order, each with the room it holds ([`cost`] bytes of it).
    cells: VecDeque<(BytesMut, Room)>,
    /// Bytes of the control room in use.
    control: usize,
}

/// Whose room a queued cell holds.
#[derive(Debug, Clone, Copy)]
enum Room {
    /// The semaphore's.
    Shared,
    /// The control room.
    Control,
}

/// Room for one cell ([`CellQueue::reserve`]); sending on it cannot fail or
/// wait, and dropping it gives the room back.
#[derive(Debug)]
pub struct Permit<'a> {
    queue: &'a CellQueue,
    room: SemaphorePermit<'a>,
}

impl Permit<'_> {
    /// Queues `cell` in the room reserved.
    pub fn send(self, cell: BytesMut) {
        self.queue.push(self.room, cell);
    }
}

fn cost(cell: &BytesMut) -> u32 {
    (cell.len() + OVERHEAD).min(MAX_COST) as u32
}

impl CellQueue {
    /// A queue of at most `bytes` (at least one largest cell's room).
    pub fn new(bytes: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            room: Semaphore::new(bytes.max(MAX_COST)),
            ready: Notify::new(),
        }
    }

    /// Waits, in turn, for room for a cell of any size. Cancel-safe.
    pub async fn reserve(&self) -> Result<Permit<'_>, LinkClosed> {
        let room = self
            .room
            .acquire_many(MAX_COST as u32)
            .await
            .map_err(|_| LinkClosed)?;
        Ok(Permit { queue: self, room })
    }

    /// Waits, in turn, for room for `cell` and queues it.
    pub async fn send(&self, cell: BytesMut) -> Result<(), LinkClosed> {
        let room = self
            .room
            .acquire_many(cost(&cell))
            .await
            .map_err(|_| LinkClosed)?;
        self.push(room, cell);
        Ok(())
    }

    /// Queues a small best-effort cell behind what is queued, in the
    /// control room ([`CONTROL_BYTES`]) if it has room now: it neither
    /// waits for senders nor takes their room.
    pub fn try_send_control(&self, cell: BytesMut) -> Result<(), TrySendError> {
        let cost = cost(&cell);
        let mut s = self.state.lock().expect("queue lock");
        if self.room.is_closed() {
            return Err(TrySendError::Closed);
        }
        if s.control + cost as usize > CONTROL_BYTES {
            return Err(TrySendError::Full(cell));
        }
        s.control += cost as usize;
        s.cells.push_back((cell, Room::Control));
        drop(s);
        self.ready.notify_one();
        Ok(())
    }

    /// Queues `cell` if there is room now (the tests fill queues with it;
    /// the node's best-effort cells take [`CellQueue::try_send_control`]).
    #[cfg(test)]
    pub fn try_send(&self, cell: BytesMut) -> Result<(), TrySendError> {
        match self.room.try_acquire_many(cost(&cell)) {
            Ok(room) => {
                self.push(room, cell);
                Ok(())
            }
            Err(tokio::sync::TryAcquireError::Closed) => Err(TrySendError::Closed),
            Err(tokio::sync::TryAcquireError::NoPermits) => Err(TrySendError::Full(cell)),
        }
    }

    /// Queues `cell` in `room`, giving back what it does not need.
    fn push(&self, room: SemaphorePermit<'_>, cell: BytesMut) {
        let cost = cost(&cell);
        let held = room.num_permits() as u32;
        room.forget();
        let mut s = self.state.lock().expect("queue lock");
        if self.room.is_closed() {
            // Closed after the room was taken: the cell goes nowhere.
            return;
        }
        s.cells.push_back((cell, Room::Shared));
        drop(s);
        if held > cost {
            self.room.add_permits((held - cost) as usize);
        }
        self.ready.notify_one();
    }

    /// The next cell, if any; its room goes to the next sender in turn.
    pub fn try_pop(&self) -> Option<BytesMut> {
        let mut s = self.state.lock().expect("queue lock");
        let (cell, room) = s.cells.pop_front()?;
        let n = cost(&cell) as usize;
        match room {
            Room::Shared => {
                drop(s);
                self.room.add_permits(n);
            }
            Room::Control => s.control -= n,
        }
        Some(cell)
    }

    /// Completes once a cell has been queued since the last time it
    /// completed (or at once, if one has): poll [`CellQueue::try_pop`]
    /// first, then wait on this.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Closes the queue: waiting and later senders fail, and what waits is
    /// dropped.
    pub fn close(&self) {
        self.room.close();
        let mut s = self.state.lock().expect("queue lock");
        s.cells.clear();
        s.control = 0;
    }

    /// Whether [`CellQueue::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.room.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn cell(circ: u8, len: usize) -> BytesMut {
        let mut b = BytesMut::zeroed(len);
        b[0] = circ;
        b
    }

    /// Two circuits' senders, one with a long backlog and one with a single
    /// small cell that asks after the queue is full: the small cell is
    /// queued after at most the queue's bytes and one cell of the busy
    /// circuit, not after its backlog.
    #[tokio::test]
    async fn a_busy_circuit_delays_another_by_the_queue_at_most() {
        let q = Arc::new(CellQueue::new(LINK_QUEUE_BYTES));
        let big = 60_000;
        // The busy circuit's sender: one reservation at a time, as a flush.
        let busy = {
            let q = q.clone();
            tokio::spawn(async move {
                for _ in 0..100 {
                    let p = q.reserve().await.unwrap();
                    p.send(cell(1, big));
                }
            })
        };
        // Let it fill the queue and wait for room.
        while q.room.available_permits() >= MAX_COST {
            tokio::task::yield_now().await;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let small = {
            let q = q.clone();
            tokio::spawn(async move { q.send(cell(2, 64)).await.unwrap() })
        };
        tokio::task::yield_now().await;
        // The writer: takes cells one at a time, letting senders run, for
        // at most the busy circuit's whole backlog.
        let (mut ahead, mut got) = (0usize, false);
        for _ in 0..10_000 {
            let Some(c) = q.try_pop() else {
                tokio::task::yield_now().await;
                continue;
            };
            if c[0] == 2 {
                got = true;
                break;
            }
            ahead += c.len();
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        }
        assert!(got, "the small cell was never queued");
        assert!(
            ahead <= LINK_QUEUE_BYTES + 2 * big,
            "{ahead} bytes of the busy circuit went first"
        );
        small.await.unwrap();
        busy.abort();
    }

    /// Room comes back as cells leave; a reservation gives back what its
    /// cell does not need; closing fails waiting senders and drops what
    /// waits.
    #[tokio::test]
    async fn room_is_counted_in_bytes_and_closing_frees_it() {
        let q = CellQueue::new(LINK_QUEUE_BYTES);
        let p = q.reserve().await.unwrap();
        p.send(cell(1, 100));
        assert_eq!(
            q.room.available_permits(),
            LINK_QUEUE_BYTES - 100 - OVERHEAD
        );
        let mut n = 1;
        while q.try_send(cell(1, 1000)).is_ok() {
            n += 1;
        }
        assert_eq!(n, 1 + (LINK_QUEUE_BYTES - 164) / 1064);
        assert_eq!(q.try_pop().unwrap().len(), 100);
        assert_eq!(q.try_pop().unwrap().len(), 1000);
        assert!(q.try_send(cell(1, 1000)).is_ok(), "room came back");
        let waiting = q.send(cell(3, 50_000));
        tokio::pin!(waiting);
        assert!(
            futures::poll!(waiting.as_mut()).is_pending(),
            "the queue is full"
        );
        q.close();
        assert!(matches!(waiting.await, Err(LinkClosed)));
        assert!(q.try_pop().is_none(), "what waited is dropped");
        assert!(matches!(q.try_send(cell(1, 1)), Err(TrySendError::Closed)));
    }

    /// A reservation that outlives its link queues nothing and frees
    /// nothing twice.
    #[tokio::test]
    async fn a_permit_sent_after_close_is_dropped() {
        let q = CellQueue::new(LINK_QUEUE_BYTES);
        let p = q.reserve().await.unwrap();
        q.close();
        p.send(cell(1, 100));
        assert!(q.try_pop().is_none());
        assert!(matches!(q.reserve().await, Err(LinkClosed)));
    }

    /// Small best-effort cells get in while senders wait for room on a
    /// full queue, behind what is queued, up to their own room; the cells
    /// leaving give it back.
    #[tokio::test]
    async fn control_cells_get_in_on_a_full_queue_in_order() {
        let q = CellQueue::new(MAX_COST);
        q.try_send(cell(1, MAX_COST - OVERHEAD)).unwrap();
        let waiting = q.send(cell(2, 100));
        tokio::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        assert!(matches!(
            q.try_send(cell(3, 72)),
            Err(TrySendError::Full(_))
        ));
        let mut n = 0;
        while q.try_send_control(cell(3, 72)).is_ok() {
            n += 1;
        }
        assert_eq!(n, CONTROL_BYTES / (72 + OVERHEAD));
        let order: Vec<u8> = std::iter::from_fn(|| q.try_pop()).map(|c| c[0]).collect();
        assert_eq!(order[0], 1, "behind what was queued");
        assert_eq!(order.len(), 1 + n);
        assert!(q.try_send_control(cell(3, 72)).is_ok(), "room came back");
        waiting.await.unwrap();
    }
}
