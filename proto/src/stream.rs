//! Stream messages: the plaintext inside the end-to-end session.
//!
//! Layout: `kind: u8 | stream_id: u32 BE | body`. DATA bodies are the
//! stream offset of their first byte (`u64` BE) and then raw bytes; WINDOW
//! bodies are the absolute count of bytes the receiver has consumed (`u64`
//! BE); the others are protobuf. Offsets and absolute acknowledgements make a
//! stream independent of the circuit under it: after a move, each side
//! resends exactly what the other has not received (see `pb::Resume`).

use crate::{DecodeError, MAX_STREAM_MSG};

/// Bytes of the stream message header.
pub const HEADER_LEN: usize = 5;
/// Bytes of a DATA message's offset, before its payload.
pub const DATA_OFFSET_LEN: usize = 8;

/// What a stream message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StreamKind {
    /// Origin → exit: open a stream. Body: `pb::Begin`.
    Begin = 1,
    /// Exit → origin: connected. Body: `pb::Connected`.
    Connected = 2,
    /// Either way: payload bytes, after their stream offset (`u64` BE).
    Data = 3,
    /// Either way: the receiver has consumed this many bytes in all (`u64` BE).
    Window = 4,
    /// Either way: no more data, and why. Body: `pb::End`.
    End = 5,
    /// Origin → exit: move a stream onto this circuit. Body: `pb::Resume`.
    Resume = 6,
    /// Exit → origin: moved. Body: `pb::Resumed`.
    Resumed = 7,
    /// Either way, stream 0: the sender's count of DATA bytes sent on the
    /// session so far (`u64` BE); answer at once with PONG. Only to a peer
    /// that said it takes them (`probes` in BEGIN, CONNECTED, RESUME or
    /// RESUMED).
    Probe = 8,
    /// Either way, stream 0: a PROBE's count, echoed.
    Pong = 9,
}

impl StreamKind {
    /// The kind for a wire byte.
    pub fn from_u8(code: u8) -> Result<Self, DecodeError> {
        Ok(match code {
            1 => StreamKind::Begin,
            2 => StreamKind::Connected,
            3 => StreamKind::Data,
            4 => StreamKind::Window,
            5 => StreamKind::End,
            6 => StreamKind::Resume,
            7 => StreamKind::Resumed,
            8 => StreamKind::Probe,
            9 => StreamKind::Pong,
            code => {
                return Err(DecodeError::UnknownCode {
                    what: "stream message",
                    code,
                });
            }
        })
    }
}

/// A parsed stream message borrowing its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamMsg<'a> {
    /// What it carries.
    pub kind: StreamKind,
    /// The stream, unique within its circuit.
    pub stream_id: u32,
    /// The body.
    pub body: &'a [u8],
}

impl<'a> StreamMsg<'a> {
    /// Parses one stream message.
    pub fn parse(buf: &'a [u8]) -> Result<Self, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Err(DecodeError::Truncated {
                what: "stream message",
                len: buf.len(),
                need: HEADER_LEN,
            });
        }
        if buf.len() > MAX_STREAM_MSG {
            return Err(DecodeError::TooLong {
                what: "stream message",
                len: buf.len(),
                max: MAX_STREAM_MSG,
            });
        }
        Ok(StreamMsg {
            kind: StreamKind::from_u8(buf[0])?,
            stream_id: u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]),
            body: &buf[HEADER_LEN..],
        })
    }

    /// The WINDOW acknowledgement (bytes consumed in all), if this is a
    /// well-formed WINDOW message.
    pub fn window_ack(&self) -> Result<u64, DecodeError> {
        self.count("window acknowledgement")
    }

    /// The count a PROBE or PONG carries, if its body is one `u64`.
    pub fn probe_count(&self) -> Result<u64, DecodeError> {
        self.count("probe count")
    }

    fn count(&self, what: &'static str) -> Result<u64, DecodeError> {
        match <[u8; 8]>::try_from(self.body) {
            Ok(b) => Ok(u64::from_be_bytes(b)),
            Err(_) => Err(DecodeError::Truncated {
                what,
                len: self.body.len(),
                need: 8,
            }),
        }
    }

    /// A DATA message's offset and payload.
    pub fn data(&self) -> Result<(u64, &'a [u8]), DecodeError> {
        if self.body.len() < DATA_OFFSET_LEN {
            return Err(DecodeError::Truncated {
                what: "data offset",
                len: self.body.len(),
                need: DATA_OFFSET_LEN,
            });
        }
        let (off, payload) = self.body.split_at(DATA_OFFSET_LEN);
        let off: [u8; 8] = off.try_into().expect("8 bytes");
        Ok((u64::from_be_bytes(off), payload))
    }

    /// Appends the message to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&header(self.kind, self.stream_id));
        out.extend_from_slice(self.body);
    }
}

/// The header bytes of a stream message.
pub fn header(kind: StreamKind, stream_id: u32) -> [u8; HEADER_LEN] {
    let s = stream_id.to_be_bytes();
    [kind as u8, s[0], s[1], s[2], s[3]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use proptest::prelude::*;
    use prost::Message;

    fn any_kind() -> impl Strategy<Value = StreamKind> {
        prop_oneof![
            Just(StreamKind::Begin),
            Just(StreamKind::Connected),
            Just(StreamKind::Data),
            Just(StreamKind::Window),
            Just(StreamKind::End),
            Just(StreamKind::Resume),
            Just(StreamKind::Resumed),
            Just(StreamKind::Probe),
            Just(StreamKind::Pong),
        ]
    }

    proptest! {
        #[test]
        fn stream_messages_round_trip(kind in any_kind(), stream_id: u32, body in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut buf = Vec::new();
            StreamMsg { kind, stream_id, body: &body }.write(&mut buf);
            prop_assert_eq!(StreamMsg::parse(&buf).unwrap(), StreamMsg { kind, stream_id, body: &body });
        }

        #[test]
        fn begin_round_trips(host in "[a-z0-9.-]{0,255}", port: u16) {
            let begin = pb::Begin { host, port: port.into(), window: 1 << 20, probes: true };
            let decoded: pb::Begin = crate::decode_pb("begin", &begin.encode_to_vec()).unwrap();
            prop_assert_eq!(decoded, begin);
        }

        #[test]
        fn control_round_trips(node_id in proptest::collection::vec(any::<u8>(), 32), hs in proptest::collection::vec(any::<u8>(), 0..100)) {
            let msg = pb::Control { msg: Some(pb::control::Msg::Extend(pb::Extend { node_id, handshake: hs })) };
            let decoded: pb::Control = crate::decode_pb("control", &msg.encode_to_vec()).unwrap();
            prop_assert_eq!(decoded, msg);
        }

        #[test]
        fn end_round_trips(reason in 0i32..11, detail in ".{0,40}") {
            let end = pb::End { reason, detail };
            let decoded: pb::End = crate::decode_pb("end", &end.encode_to_vec()).unwrap();
            prop_assert_eq!(decoded, end);
        }
    }

    #[test]
    fn window_ack_needs_eight_bytes() {
        let msg = StreamMsg {
            kind: StreamKind::Window,
            stream_id: 1,
            body: &[0, 0, 0, 1, 0, 0, 0, 0],
        };
        assert_eq!(msg.window_ack(), Ok(1 << 32));
        let bad = StreamMsg {
            kind: StreamKind::Window,
            stream_id: 1,
            body: &[0, 1, 0, 0],
        };
        assert!(bad.window_ack().is_err());
    }

    #[test]
    fn data_carries_its_offset() {
        let mut body = 77u64.to_be_bytes().to_vec();
        body.extend_from_slice(b"abc");
        let msg = StreamMsg {
            kind: StreamKind::Data,
            stream_id: 9,
            body: &body,
        };
        assert_eq!(msg.data(), Ok((77, &b"abc"[..])));
        let short = StreamMsg {
            kind: StreamKind::Data,
            stream_id: 9,
            body: &body[..7],
        };
        assert!(short.data().is_err());
    }

    #[test]
    fn sizes_fit_the_noise_maximum() {
        use crate::*;
        assert_eq!(
            MAX_STREAM_DATA + HEADER_LEN + TAG_LEN + cell::HEADER_LEN + TAG_LEN,
            MAX_NOISE_MESSAGE
        );
    }
}
