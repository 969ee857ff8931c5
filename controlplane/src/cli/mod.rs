//! Building blocks of the `trellis` CLI: contexts and the admin client, kubectl-style output,
//! the sample application and the `trellis demo` orchestrator.

pub mod client;
pub mod demo;
pub mod demo_app;
pub mod failover;
pub mod join;
pub mod output;
pub mod procs;
pub mod transparent;
