//! The scenarios. Those whose parts are not built yet say so and skip.

pub mod config_propagation;
pub mod cross_cluster;
pub mod failover;
pub mod join;
pub mod proxy_latency;
pub mod raft;
pub mod scale;
pub mod tcp_throughput;

/// Every scenario name, in the order `all` runs them.
pub const ALL: &[&str] =
    &["proxy-latency", "tcp-throughput", "cross-cluster", "config-propagation", "failover", "join", "raft", "scale"];

/// Why a scenario cannot run in this build, if it cannot (every one can now; a scenario whose
/// parts are missing from a build says so here).
pub fn not_built(_name: &str) -> Option<&'static str> {
    None
}
