//! The Raft-replicated store, built on raft-rs's sans-IO `RawNode`.
//!
//! [`replica::Replica`] is the whole consensus-and-apply core: it owns the `RawNode` and the
//! state machine and processes each `Ready` in one place, in the documented order. It does no I/O
//! of its own: persistence goes through [`DurableLog`], messages are returned to the caller. The
//! deterministic simulation (`sim`, tests only) drives several replicas with one seeded RNG; the
//! production driver ([`node::RaftStore`]: a thread per instance, the redb log, the gRPC
//! transport in [`transport`]) plugs the same core into real I/O.

pub mod log;
pub mod node;
pub mod replica;
#[cfg(test)]
mod sim;
pub mod transport;

pub use log::RedbLog;
pub use node::{NodeStatus, RaftHandle, RaftOptions, RaftStore, Start, Transport, new_member_id_for};
pub use replica::{Applied, DurableLog, MemberChange, Output, ProposeError, Replica};

/// raft-rs logs through slog; this drain hands its records to `tracing` (target `raft`), so one
/// subscriber and one format cover the whole process.
struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        let mut kv = KvText(String::new());
        let _ = slog::KV::serialize(values, record, &mut kv);
        let _ = slog::KV::serialize(&record.kv(), record, &mut kv);
        let msg = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Debug => tracing::debug!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Trace => tracing::trace!(target: "raft", "{msg}{}", kv.0),
        }
        Ok(())
    }
}

struct KvText(String);

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        use std::fmt::Write as _;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

/// The logger given to raft-rs.
pub fn logger() -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!())
}
