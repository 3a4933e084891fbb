//! The circuit core's one error type.

use crate::crypto::CryptoError;
use ferry_proto::DecodeError;
use ferry_proto::pb::{DestroyReason, EndReason, RefusalReason};
use ferry_router::NodeId;

/// Why a circuit, a stream or a build failed.
///
/// Callers branch and label metrics on [`Error::kind`], never on the text.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A record did not authenticate, or a handshake or identity proof failed.
    #[error("end-to-end record: {0}")]
    Crypto(#[from] CryptoError),
    /// A cell, stream message or protobuf body did not decode.
    #[error("stream message: {0}")]
    Decode(#[from] DecodeError),
    /// A message broke the stream or circuit rules (what, in the text).
    #[error("{0}")]
    Protocol(String),
    /// The peer sent past the receive window it was given.
    #[error("stream {stream} sent {held} bytes against a window of {window}")]
    WindowExceeded {
        /// The stream.
        stream: u32,
        /// Bytes it would have us hold.
        held: u64,
        /// Our window.
        window: u32,
    },
    /// The session already holds its most streams.
    #[error("too many streams on one circuit (limit {0})")]
    TooManyStreams(usize),
    /// No stream with this id is attached to the session (it moved, or ended).
    #[error("no stream {0} on this circuit")]
    NoStream(u32),
    /// The session is closed: its circuit is gone.
    #[error("circuit closed")]
    Closed,
    /// The exit answered a move with "no such stream": it can never move.
    #[error("the exit no longer has this stream")]
    UnknownStream,
    /// The exit refused to take a moved stream (with its reason).
    #[error("the exit refused the move: {} {detail}", reason.as_str_name())]
    MoveRefused {
        /// The END reason the exit gave.
        reason: EndReason,
        /// Its detail.
        detail: String,
    },
    /// No answer to an operation in time (what, and after how long).
    #[error("no answer to {what} within {after_ms} ms")]
    Timeout {
        /// What went unanswered.
        what: &'static str,
        /// How long it was given.
        after_ms: u64,
    },
    /// A hop refused to extend the circuit.
    #[error("extending to {next} failed: {} {detail}", reason.as_str_name())]
    ExtendRefused {
        /// The node that could not be reached.
        next: NodeId,
        /// Why, as the hop said.
        reason: RefusalReason,
        /// The hop's detail.
        detail: String,
    },
    /// A hop destroyed the circuit while it was being built.
    #[error("hop {hop} destroyed the circuit: {}", reason.as_str_name())]
    Destroyed {
        /// The hop being built to.
        hop: NodeId,
        /// The DESTROY reason.
        reason: DestroyReason,
    },
}

impl Error {
    /// A short, bounded label for metrics and retry logic.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Crypto(_) => "crypto",
            Error::Decode(_) => "malformed",
            Error::Protocol(_) => "protocol",
            Error::WindowExceeded { .. } => "window",
            Error::TooManyStreams(_) => "capacity",
            Error::NoStream(_) => "no_stream",
            Error::Closed => "closed",
            Error::UnknownStream => "unknown_stream",
            Error::MoveRefused { .. } => "move_refused",
            Error::Timeout { .. } => "timeout",
            Error::ExtendRefused { .. } => "extend_refused",
            Error::Destroyed { .. } => "destroyed",
        }
    }

    /// Whether the failure was a hop leaving the mesh (draining or exited):
    /// the builder learns it and routes around that hop.
    pub fn hop_leaving(&self) -> Option<NodeId> {
        match self {
            Error::ExtendRefused {
                next,
                reason: RefusalReason::Draining,
                ..
            } => Some(*next),
            Error::Destroyed {
                hop,
                reason: DestroyReason::Draining | DestroyReason::Exited,
            } => Some(*hop),
            _ => None,
        }
    }

    /// Whether this breaks the peer's protocol, so the circuit must go.
    pub fn is_violation(&self) -> bool {
        matches!(
            self,
            Error::Crypto(_) | Error::Decode(_) | Error::Protocol(_) | Error::WindowExceeded { .. }
        )
    }
}

/// A result with the circuit core's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
