//! The resend ring: a stream's sent, unacknowledged bytes.

use std::collections::VecDeque;

/// Bytes per chunk of a ring.
const CHUNK: usize = 8 * 1024;

/// Emptied chunks a ring keeps for its next bytes while it holds any: a
/// quarter window's worth, what one acknowledgement of a busy stream
/// frees at once.
const SPARES: usize = 64;

/// A stream's payload in `[acked, sent)`, what a move sends again: one copy
/// per byte sent, in chunks of [`CHUNK`] bytes taken as bytes arrive and
/// given up as acknowledgements pass them. A ring holds what is
/// unacknowledged in chunks (the first and last partly used), as many
/// spares again at most, and nothing once everything is acknowledged.
///
/// It used to be one buffer that doubled as it filled and never shrank:
/// each stream held the most it ever had in flight (up to its window, 2
/// MiB), so 1,000 bulk streams on one entry held about 1.4 GB, and an
/// entry spent more than half its CPU time faulting in the fresh pages of
/// buffers as they doubled (`benches/profile.sh streams entry`).
/// Emptied chunks wait as spares (up to [`SPARES`]) while the stream has
/// bytes in flight, so a busy stream reuses its chunks and allocates
/// nothing in steady state.
#[derive(Default)]
pub(crate) struct Ring {
    /// Each chunk's length is the bytes written into it (all but the last
    /// are full).
    chunks: VecDeque<Vec<u8>>,
    /// Offset of the first byte in the first chunk.
    head: usize,
    pub(crate) len: usize,
    spares: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Ring {
    /// Lengths only: the ring holds payload, which never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Ring({} bytes in {} chunks)",
            self.len,
            self.chunks.len()
        )
    }
}

impl Ring {
    pub(crate) fn push(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let end = self.head + self.len;
            let (at, off) = (end / CHUNK, end % CHUNK);
            if at == self.chunks.len() {
                // Filled by appending: a new chunk is never zeroed first.
                let chunk = self
                    .spares
                    .pop()
                    .unwrap_or_else(|| Vec::with_capacity(CHUNK));
                self.chunks.push_back(chunk);
            }
            let n = data.len().min(CHUNK - off);
            debug_assert_eq!(self.chunks[at].len(), off);
            self.chunks[at].extend_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
        }
    }

    pub(crate) fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        self.head += n;
        self.len -= n;
        if self.len == 0 {
            // Everything is acknowledged: a quiet stream holds nothing.
            self.chunks.clear();
            self.spares.clear();
            self.head = 0;
            return;
        }
        while self.head >= CHUNK {
            let mut done = self.chunks.pop_front().expect("a chunk under the head");
            if self.spares.len() < SPARES {
                done.clear();
                self.spares.push(done);
            }
            self.head -= CHUNK;
        }
        // Spares never outnumber the chunks in use: a stream that bursts
        // and then trickles does not keep its burst's chunks.
        self.spares.truncate(self.chunks.len());
    }

    /// Copies bytes `[skip, skip + out.len())` of the ring into `out`.
    pub(crate) fn copy_to(&self, skip: usize, n: usize, out: &mut [u8]) {
        debug_assert!(skip + n <= self.len && out.len() == n);
        let (mut pos, mut done) = (self.head + skip, 0);
        while done < n {
            let (at, off) = (pos / CHUNK, pos % CHUNK);
            let k = (n - done).min(CHUNK - off);
            out[done..done + k].copy_from_slice(&self.chunks[at][off..off + k]);
            done += k;
            pos += k;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Ring;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The ring holds exactly the bytes pushed and not consumed, across
        /// chunk boundaries, spares and emptying, compared with a plain
        /// Vec; an empty ring holds no chunk.
        #[test]
        fn ring_matches_a_plain_buffer(ops in proptest::collection::vec((any::<bool>(), prop_oneof![1usize..70_000, (1usize..9).prop_map(|k| k * super::CHUNK)]), 1..30), skip in 0usize..20_000) {
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
                prop_assert!(ring.chunks.len() <= model.len().div_ceil(super::CHUNK) + 1);
                prop_assert!(ring.spares.len() <= super::SPARES.min(ring.chunks.len()));
                if model.is_empty() {
                    prop_assert!(ring.chunks.is_empty() && ring.spares.is_empty());
                }
                let mut out = vec![0u8; model.len()];
                ring.copy_to(0, model.len(), &mut out);
                prop_assert!(out.iter().eq(model.iter()));
                if model.len() > 10 {
                    let mut part = vec![0u8; 7];
                    ring.copy_to(3, 7, &mut part);
                    prop_assert!(part.iter().eq(model.iter().skip(3).take(7)));
                    // A span across chunk boundaries, from anywhere.
                    let from = skip % model.len();
                    let n = (model.len() - from).min(3 * super::CHUNK);
                    let mut span = vec![0u8; n];
                    ring.copy_to(from, n, &mut span);
                    prop_assert!(span.iter().eq(model.iter().skip(from).take(n)));
                }
            }
        }
    }
}
