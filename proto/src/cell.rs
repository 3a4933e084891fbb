//! Cells: the plaintext of one link record.
//!
//! Layout: `circ_id: u32 BE | command: u8 | body`. The circuit id is local to
//! the link; a relay rewrites it in place when it forwards.

use crate::{DecodeError, MAX_CELL_BODY};

/// Bytes of the cell header.
pub const HEADER_LEN: usize = 5;

/// What a cell asks of the hop that receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CellCmd {
    /// Origin → first hop: open a circuit. Body: Noise NK message 1.
    Create = 1,
    /// Hop → origin: circuit opened. Body: Noise NK message 2.
    Created = 2,
    /// Origin ↔ tip hop: a `pb::Control` / `pb::ControlReply`, sealed with
    /// the origin's session with that hop. Only the tip reads it.
    Control = 3,
    /// Origin ↔ exit: a stream message sealed end to end. Relays forward it.
    Relay = 4,
    /// Either way: tear the circuit down. Body: plaintext `pb::Destroy`.
    Destroy = 5,
    /// Hop → neighbours: the hop is draining. Body: plaintext
    /// `pb::DrainNotice`. Relays forward it like RELAY cells.
    Notice = 6,
    /// Link-level (circuit 0), either way: are you there? Body: 8 bytes
    /// the answer echoes. Sent every second: keepalive and RTT probe.
    Ping = 7,
    /// Link-level (circuit 0): the answer to a PING, its body echoed.
    Pong = 8,
}

impl CellCmd {
    /// The command for a wire byte.
    pub fn from_u8(code: u8) -> Result<Self, DecodeError> {
        Ok(match code {
            1 => CellCmd::Create,
            2 => CellCmd::Created,
            3 => CellCmd::Control,
            4 => CellCmd::Relay,
            5 => CellCmd::Destroy,
            6 => CellCmd::Notice,
            7 => CellCmd::Ping,
            8 => CellCmd::Pong,
            code => {
                return Err(DecodeError::UnknownCode {
                    what: "cell command",
                    code,
                });
            }
        })
    }

    /// Short name for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            CellCmd::Create => "create",
            CellCmd::Created => "created",
            CellCmd::Control => "control",
            CellCmd::Relay => "relay",
            CellCmd::Destroy => "destroy",
            CellCmd::Notice => "notice",
            CellCmd::Ping => "ping",
            CellCmd::Pong => "pong",
        }
    }
}

/// A parsed cell borrowing its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cell<'a> {
    /// Link-local circuit id.
    pub circ_id: u32,
    /// What to do.
    pub cmd: CellCmd,
    /// The command's body.
    pub body: &'a [u8],
}

impl<'a> Cell<'a> {
    /// Parses a cell from one record's plaintext.
    pub fn parse(buf: &'a [u8]) -> Result<Self, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Err(DecodeError::Truncated {
                what: "cell",
                len: buf.len(),
                need: HEADER_LEN,
            });
        }
        let body = &buf[HEADER_LEN..];
        if body.len() > MAX_CELL_BODY {
            return Err(DecodeError::TooLong {
                what: "cell",
                len: body.len(),
                max: MAX_CELL_BODY,
            });
        }
        Ok(Cell {
            circ_id: u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]),
            cmd: CellCmd::from_u8(buf[4])?,
            body,
        })
    }

    /// Appends the cell to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.reserve(HEADER_LEN + self.body.len());
        out.extend_from_slice(&header(self.circ_id, self.cmd));
        out.extend_from_slice(self.body);
    }
}

/// The header bytes of a cell.
pub fn header(circ_id: u32, cmd: CellCmd) -> [u8; HEADER_LEN] {
    let c = circ_id.to_be_bytes();
    [c[0], c[1], c[2], c[3], cmd as u8]
}

/// Rewrites the circuit id of an encoded cell in place (for forwarding).
///
/// # Panics
/// If `cell` is shorter than a header: callers forward only parsed cells.
pub fn set_circ_id(cell: &mut [u8], circ_id: u32) {
    cell[..4].copy_from_slice(&circ_id.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_cmd() -> impl Strategy<Value = CellCmd> {
        prop_oneof![
            Just(CellCmd::Create),
            Just(CellCmd::Created),
            Just(CellCmd::Control),
            Just(CellCmd::Relay),
            Just(CellCmd::Destroy),
            Just(CellCmd::Notice),
            Just(CellCmd::Ping),
            Just(CellCmd::Pong),
        ]
    }

    proptest! {
        #[test]
        fn cells_round_trip(circ_id: u32, cmd in any_cmd(), body in proptest::collection::vec(any::<u8>(), 0..2000), new_id: u32) {
            let mut buf = Vec::new();
            Cell { circ_id, cmd, body: &body }.write(&mut buf);
            let cell = Cell::parse(&buf).unwrap();
            prop_assert_eq!(cell, Cell { circ_id, cmd, body: &body });
            set_circ_id(&mut buf, new_id);
            prop_assert_eq!(Cell::parse(&buf).unwrap().circ_id, new_id);
        }

        /// Arbitrary bytes never panic the parser; junk is an error, not a cell.
        #[test]
        fn junk_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..64)) {
            match Cell::parse(&buf) {
                Ok(cell) => prop_assert!((1..=8).contains(&(cell.cmd as u8))),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }

    #[test]
    fn short_and_unknown_cells_are_errors() {
        assert_eq!(
            Cell::parse(&[0, 0, 1]),
            Err(DecodeError::Truncated {
                what: "cell",
                len: 3,
                need: 5
            })
        );
        assert_eq!(
            Cell::parse(&[0, 0, 0, 1, 99]),
            Err(DecodeError::UnknownCode {
                what: "cell command",
                code: 99
            })
        );
    }
}
