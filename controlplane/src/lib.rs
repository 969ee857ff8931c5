//! The Trellis control plane: the store and its state machine, the discovery API that pushes
//! configuration to proxies, certificate signing, the admin API, bootstrap of a federation, and
//! the `trellis` CLI's building blocks.

pub mod admin;
pub mod app;
pub mod bootstrap;
pub mod certs;
pub mod cli;
pub mod config;
pub mod context;
pub mod convert;
pub mod discovery;
pub mod fanout;
pub mod linearizability;
pub mod membership;
pub mod metrics;
pub mod overlay;
pub mod proxies;
pub mod state;
pub mod store;
pub mod telemetry;

/// Version of this build, reported by `trellis status`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs()
}
