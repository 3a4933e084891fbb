#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod cell;
pub mod codec;
pub mod stream;

/// Protobuf control messages, generated from `proto/ferry.proto`.
pub mod pb {
    #![allow(missing_docs, clippy::doc_markdown, clippy::enum_variant_names)]
    include!(concat!(env!("OUT_DIR"), "/ferry.v1.rs"));
}

pub use cell::{Cell, CellCmd};
pub use codec::{FrameCodec, FrameError};
pub use stream::{StreamKind, StreamMsg};

/// The largest Noise message: the hard cap on any frame Ferry reads.
pub const MAX_NOISE_MESSAGE: usize = 65535;
/// Bytes an AEAD tag adds to every sealed record.
pub const TAG_LEN: usize = 16;
/// Largest plaintext of one link record (one cell).
pub const MAX_CELL: usize = MAX_NOISE_MESSAGE - TAG_LEN;
/// Largest body of one cell.
pub const MAX_CELL_BODY: usize = MAX_CELL - cell::HEADER_LEN;
/// Largest plaintext inside the end-to-end session (one stream message).
pub const MAX_STREAM_MSG: usize = MAX_CELL_BODY - TAG_LEN;
/// Largest body of one stream message.
pub const MAX_STREAM_DATA: usize = MAX_STREAM_MSG - stream::HEADER_LEN;
/// Largest payload of one DATA message (its body less the offset).
pub const MAX_DATA_PAYLOAD: usize = MAX_STREAM_DATA - stream::DATA_OFFSET_LEN;

/// Decoding failure of a cell, stream message or protobuf body.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the fixed header needs.
    #[error("truncated {what}: {len} bytes, header needs {need}")]
    Truncated {
        /// Which structure was truncated.
        what: &'static str,
        /// Bytes present.
        len: usize,
        /// Bytes the header needs.
        need: usize,
    },
    /// A command or kind byte this version does not know.
    #[error("unknown {what} code {code}")]
    UnknownCode {
        /// Which structure carried the code.
        what: &'static str,
        /// The code seen.
        code: u8,
    },
    /// A body longer than its structure allows.
    #[error("{what} body of {len} bytes exceeds {max}")]
    TooLong {
        /// Which structure.
        what: &'static str,
        /// Length seen.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A protobuf body did not decode.
    #[error("bad protobuf in {what}: {source}")]
    Protobuf {
        /// Which message.
        what: &'static str,
        /// prost's error.
        source: prost::DecodeError,
    },
}

impl DecodeError {
    /// A short, bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Truncated { .. } => "truncated",
            DecodeError::UnknownCode { .. } => "unknown_code",
            DecodeError::TooLong { .. } => "too_long",
            DecodeError::Protobuf { .. } => "protobuf",
        }
    }
}

/// Decode a protobuf body, naming the message in the error.
pub fn decode_pb<M: prost::Message + Default>(
    what: &'static str,
    body: &[u8],
) -> Result<M, DecodeError> {
    M::decode(body).map_err(|source| DecodeError::Protobuf { what, source })
}
