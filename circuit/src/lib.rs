#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod build;
pub mod congestion;
pub mod crypto;
pub mod error;
pub mod resume;
mod ring;
pub mod session;
pub mod table;

pub use build::{Build, Hop, Step};
pub use error::{Error, Result};
pub use resume::{Found, Resumables};
pub use session::{
    CIRCUIT_WINDOW, Config, Event, HEADROOM, Outcome, Phase, Session, Side, Stream, Token,
};
pub use table::{Dispatch, LinkId, LinkRef, MAX_FORWARDED_CONTROL, MAX_HOPS, Removed, Slot, Table};
