//! The Trellis per-workload proxy, as a library.
//!
//! The binary (`trellis-proxy`) is a thin shell around [`app::build`]. The parts below are also
//! what the east-west gateway is built from: TLS dialing and pooling ([`pool`]), protocol
//! detection ([`detect`]), endpoint choice ([`balance`]), retries ([`retry`]), the discovery
//! client ([`discovery`]) and certificate management ([`identity`]).
//!
//! Decisions (which endpoint, whether to retry, which protocol, how to apply a config push) are
//! pure functions over in-memory state with table tests; the I/O around them stays thin.

pub mod admin;
pub mod app;
pub mod apppool;
pub mod authz;
pub mod backoff;
pub mod balance;
pub mod body;
pub mod coalesce;
pub mod config;
pub mod detect;
pub mod discovery;
pub mod drain;
pub mod gateways;
pub mod h2body;
pub mod headers;
pub mod identity;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod pool;
pub mod retry;
pub mod routes;

pub use app::{App, AppError, build};

/// The Tokio runtime of a proxy or gateway process: one thread for `threads == 1`, otherwise a
/// work-stealing pool of `threads` workers (0: one per core).
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b.enable_all().build()
    }
}
pub use config::Config;
