//! Stream messages: the plaintext inside the end-to-end session.
//!
//! Layout: `kind: u8 | stream_id: u32 BE | body`. DATA bodies are raw bytes;
//! WINDOW bodies are a `u32` BE credit in bytes; the others are protobuf.

use crate::{DecodeError, MAX_STREAM_MSG};

/// Bytes of the stream message header.
pub const HEADER_LEN: usize = 5;

/// What a stream message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StreamKind {
    /// Origin → exit: open a stream. Body: `pb::Begin`.
    Begin = 1,
    /// Exit → origin: connected. Body: `pb::Connected`.
    Connected = 2,
    /// Either way: payload bytes.
    Data = 3,
    /// Either way: the receiver consumed this many more bytes (`u32` BE).
    Window = 4,
    /// Either way: no more data, and why. Body: `pb::End`.
    End = 5,
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

    /// The WINDOW credit, if this is a well-formed WINDOW message.
    pub fn window_credit(&self) -> Result<u32, DecodeError> {
        match self.body {
            [a, b, c, d] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
            body => Err(DecodeError::Truncated {
                what: "window credit",
                len: body.len(),
                need: 4,
            }),
        }
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
            let begin = pb::Begin { host, port: port.into(), window: 1 << 20 };
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
    fn window_credit_needs_four_bytes() {
        let msg = StreamMsg {
            kind: StreamKind::Window,
            stream_id: 1,
            body: &[0, 1, 0, 0],
        };
        assert_eq!(msg.window_credit(), Ok(65536));
        let bad = StreamMsg {
            kind: StreamKind::Window,
            stream_id: 1,
            body: &[1],
        };
        assert!(bad.window_credit().is_err());
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
