//! Length-delimited frames: `u32` big-endian length, then that many bytes.
//!
//! The length is checked against the codec's maximum before the buffer is
//! allowed to grow, so a peer announcing a 4 GiB frame costs nothing but its
//! connection.

use bytes::{Buf, BufMut, BytesMut};

/// Bytes of the length prefix.
pub const PREFIX_LEN: usize = 4;

/// A frame that can't be accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix announces more than the maximum.
    #[error("frame length {len} exceeds the maximum of {max}")]
    TooLong {
        /// Announced length.
        len: usize,
        /// The codec's maximum.
        max: usize,
    },
    /// The length prefix announces less than the minimum.
    #[error("frame length {len} is below the minimum of {min}")]
    TooShort {
        /// Announced length.
        len: usize,
        /// The codec's minimum.
        min: usize,
    },
}

/// Splits a byte stream into frames of bounded length.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    min: usize,
    max: usize,
}

impl FrameCodec {
    /// A codec accepting frames of `min..=max` bytes.
    pub const fn new(min: usize, max: usize) -> Self {
        Self { min, max }
    }

    /// The largest frame this codec accepts.
    pub const fn max(&self) -> usize {
        self.max
    }

    /// Takes one whole frame off the front of `buf`.
    ///
    /// `Ok(None)` means more bytes are needed; the caller should read and call
    /// again. On `Ok(None)` the buffer has been reserved for the rest of the
    /// frame, which is within the bound.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        if buf.len() < PREFIX_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > self.max {
            return Err(FrameError::TooLong { len, max: self.max });
        }
        if len < self.min {
            return Err(FrameError::TooShort { len, min: self.min });
        }
        if buf.len() < PREFIX_LEN + len {
            buf.reserve(PREFIX_LEN + len - buf.len());
            return Ok(None);
        }
        buf.advance(PREFIX_LEN);
        Ok(Some(buf.split_to(len)))
    }

    /// Appends the length prefix for a frame of `len` bytes.
    ///
    /// # Panics
    /// If `len` is outside the codec's bounds: that is a bug in the caller.
    pub fn put_prefix(&self, len: usize, out: &mut impl BufMut) {
        assert!(
            (self.min..=self.max).contains(&len),
            "frame of {len} bytes outside {}..={}",
            self.min,
            self.max
        );
        out.put_u32(len as u32);
    }

    /// Appends a whole frame.
    pub fn encode(&self, frame: &[u8], out: &mut impl BufMut) {
        self.put_prefix(frame.len(), out);
        out.put_slice(frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CODEC: FrameCodec = FrameCodec::new(0, crate::MAX_NOISE_MESSAGE);

    #[test]
    fn oversized_prefix_is_refused_before_allocating() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3][..]);
        let cap = buf.capacity();
        let err = CODEC.decode(&mut buf).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLong {
                len: u32::MAX as usize,
                max: 65535
            }
        );
        assert_eq!(buf.capacity(), cap, "buffer grew for a refused frame");
    }

    #[test]
    fn short_frame_is_refused() {
        let codec = FrameCodec::new(16, 100);
        let mut buf = BytesMut::from(&[0, 0, 0, 3, 1, 2, 3][..]);
        assert_eq!(
            codec.decode(&mut buf),
            Err(FrameError::TooShort { len: 3, min: 16 })
        );
    }

    #[test]
    fn partial_frame_waits() {
        let mut buf = BytesMut::from(&[0, 0, 0, 5, 1, 2][..]);
        assert_eq!(CODEC.decode(&mut buf), Ok(None));
        buf.extend_from_slice(&[3, 4, 5]);
        assert_eq!(
            CODEC.decode(&mut buf).unwrap().unwrap().as_ref(),
            &[1, 2, 3, 4, 5]
        );
        assert!(buf.is_empty());
    }

    proptest! {
        /// Any sequence of frames, fed in any chunking, comes back unchanged.
        #[test]
        fn frames_round_trip_in_any_chunking(
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 0..8),
            chunk in 1usize..5000,
        ) {
            let mut wire = BytesMut::new();
            for f in &frames {
                CODEC.encode(f, &mut wire);
            }
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(f) = CODEC.decode(&mut buf).unwrap() {
                    out.push(f.to_vec());
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(out, frames);
        }

        /// Any prefix above the maximum is refused, whatever follows it.
        #[test]
        fn any_oversized_prefix_is_refused(len in 65536u32.., tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = BytesMut::new();
            buf.put_u32(len);
            buf.extend_from_slice(&tail);
            let refused = matches!(CODEC.decode(&mut buf), Err(FrameError::TooLong { .. }));
            prop_assert!(refused);
        }
    }
}
