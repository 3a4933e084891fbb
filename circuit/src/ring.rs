//! The resend ring: a stream's sent, unacknowledged bytes.

/// A byte ring holding a stream's payload in `[acked, sent)`: one copy per
/// byte sent and no allocation in steady state. It grows (by doubling, rare)
/// up to the send window, which credit enforces: `sent - acked` never
/// exceeds it.
#[derive(Default)]
pub(crate) struct Ring {
    buf: Vec<u8>,
    head: usize,
    pub(crate) len: usize,
}

impl std::fmt::Debug for Ring {
    /// Lengths only: the ring holds payload, which never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ring({} of {} bytes)", self.len, self.buf.len())
    }
}

impl Ring {
    pub(crate) fn push(&mut self, data: &[u8]) {
        if self.len + data.len() > self.buf.len() {
            let cap = (self.len + data.len()).next_power_of_two().max(64 * 1024);
            let mut grown = vec![0u8; cap];
            self.copy_to(0, self.len, &mut grown[..self.len]);
            self.buf = grown;
            self.head = 0;
        }
        let cap = self.buf.len();
        let tail = (self.head + self.len) % cap;
        let first = data.len().min(cap - tail);
        self.buf[tail..tail + first].copy_from_slice(&data[..first]);
        self.buf[..data.len() - first].copy_from_slice(&data[first..]);
        self.len += data.len();
    }

    pub(crate) fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        if n > 0 {
            self.head = (self.head + n) % self.buf.len();
            self.len -= n;
        }
    }

    /// Copies bytes `[skip, skip + out.len())` of the ring into `out`.
    pub(crate) fn copy_to(&self, skip: usize, n: usize, out: &mut [u8]) {
        debug_assert!(skip + n <= self.len && out.len() == n);
        if n == 0 {
            return;
        }
        let cap = self.buf.len();
        let start = (self.head + skip) % cap;
        let first = n.min(cap - start);
        out[..first].copy_from_slice(&self.buf[start..start + first]);
        out[first..].copy_from_slice(&self.buf[..n - first]);
    }
}

#[cfg(test)]
mod tests {
    use super::Ring;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The ring holds exactly the bytes pushed and not consumed, across
        /// wrap-arounds and growth, compared with a plain Vec.
        #[test]
        fn ring_matches_a_plain_buffer(ops in proptest::collection::vec((any::<bool>(), 1usize..70_000), 1..30)) {
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
                let mut out = vec![0u8; model.len()];
                ring.copy_to(0, model.len(), &mut out);
                prop_assert!(out.iter().eq(model.iter()));
                if model.len() > 10 {
                    let mut part = vec![0u8; 7];
                    ring.copy_to(3, 7, &mut part);
                    prop_assert!(part.iter().eq(model.iter().skip(3).take(7)));
                }
            }
        }
    }
}
