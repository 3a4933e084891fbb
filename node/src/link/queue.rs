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
//! The queue used to be a channel of 128 cells: behind a bulk stream, that
//! is up to 8 MiB (22 ms at 3 Gbit/s) ahead of another circuit's 64-byte
//! request. Bounded in bytes it holds what the writer puts in one `write`
//! call, and a reservation takes the room of the largest cell until its
//! cell is known (then gives back the rest), so a caller may reserve first
//! and take the cell from its session only once there is room (nothing is
//! lost to a cancelled wait).

use bytes::BytesMut;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

/// Bytes of cells the queue holds before senders wait: about one of the
/// writer's batches, so the writer has the next batch ready while the
/// kernel takes the last, and no more.
pub const LINK_QUEUE_BYTES: usize = 256 * 1024;

/// What a queued cell counts for beyond its bytes (its queue entry).
pub(crate) const OVERHEAD: usize = 64;

/// The room a reservation holds until its cell is known: the largest cell.
pub(crate) const MAX_COST: usize = ferry_proto::MAX_NOISE_MESSAGE + OVERHEAD;

/// The queue is closed: the link is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("link closed")]
pub struct Closed;

/// Why [`CellQueue::try_send`] did not queue a cell.
#[derive(Debug)]
pub enum TrySendError {
    /// Not enough room now.
    Full(BytesMut),
    /// The link is gone (the cell is dropped).
    Closed,
}

/// Cells in order, with the room each holds.
#[derive(Debug)]
pub struct CellQueue {
    cells: Mutex<VecDeque<(BytesMut, u32)>>,
    room: Semaphore,
    ready: Notify,
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
            cells: Mutex::new(VecDeque::new()),
            room: Semaphore::new(bytes.max(MAX_COST)),
            ready: Notify::new(),
        }
    }

    /// Waits, in turn, for room for a cell of any size. Cancel-safe.
    pub async fn reserve(&self) -> Result<Permit<'_>, Closed> {
        let room = self
            .room
            .acquire_many(MAX_COST as u32)
            .await
            .map_err(|_| Closed)?;
        Ok(Permit { queue: self, room })
    }

    /// Waits, in turn, for room for `cell` and queues it.
    pub async fn send(&self, cell: BytesMut) -> Result<(), Closed> {
        let room = self
            .room
            .acquire_many(cost(&cell))
            .await
            .map_err(|_| Closed)?;
        self.push(room, cell);
        Ok(())
    }

    /// Queues `cell` if there is room now.
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
        let mut cells = self.cells.lock().expect("queue lock");
        if self.room.is_closed() {
            // Closed after the room was taken: the cell goes nowhere.
            return;
        }
        cells.push_back((cell, cost));
        drop(cells);
        if held > cost {
            self.room.add_permits((held - cost) as usize);
        }
        self.ready.notify_one();
    }

    /// The next cell, if any; its room goes to the next sender in turn.
    pub fn try_pop(&self) -> Option<BytesMut> {
        let (cell, cost) = self.cells.lock().expect("queue lock").pop_front()?;
        self.room.add_permits(cost as usize);
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
        self.cells.lock().expect("queue lock").clear();
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
    /// circuit, not after its backlog (a queue bounded in cells held 128 of
    /// them ahead of it).
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
        // The writer: takes cells one at a time, letting senders run.
        let mut ahead = 0usize;
        loop {
            let Some(c) = q.try_pop() else {
                tokio::task::yield_now().await;
                continue;
            };
            if c[0] == 2 {
                break;
            }
            ahead += c.len();
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        }
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
        assert_eq!(waiting.await, Err(Closed));
        assert!(q.try_pop().is_none(), "what waited is dropped");
        assert!(matches!(q.try_send(cell(1, 1)), Err(TrySendError::Closed)));
    }
}
