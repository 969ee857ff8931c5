//! The Raft-replicated store, built on raft-rs's sans-IO `RawNode`.
//!
//! [`replica::Replica`] is the whole consensus-and-apply core: it owns the `RawNode` and the
//! state machine and processes each `Ready` in one place, in the documented order. It does no I/O
//! of its own: persistence goes through [`DurableLog`], messages are returned to the caller. The
//! deterministic simulation (`sim`, tests only) drives several replicas with one seeded RNG; the
//! production driver (a task per instance, gRPC transport, redb log) plugs the same core into
//! real I/O.

pub mod log;
pub mod replica;
#[cfg(test)]
mod sim;

pub use log::RedbLog;
pub use replica::{Applied, DurableLog, Output, ProposeError, Replica};
