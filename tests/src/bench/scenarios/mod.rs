//! The scenarios. Those whose parts are not built yet say so and skip.

pub mod config_propagation;
pub mod join;
pub mod proxy_latency;
pub mod raft;
pub mod tcp_throughput;

/// Every scenario name, in the order `all` runs them.
pub const ALL: &[&str] =
    &["proxy-latency", "tcp-throughput", "cross-cluster", "config-propagation", "failover", "join", "raft", "scale"];

/// Why a scenario cannot run in this build, if it cannot.
pub fn not_built(name: &str) -> Option<&'static str> {
    match name {
        "cross-cluster" => Some(
            "the gateway tunnel exists (tests/tests/gateway.rs) but this scenario is not written yet; \
             `trellis demo` measures the cross-cluster path end to end",
        ),
        "failover" => Some(
            "not written yet; `trellis demo --scenario failover -o json` reports failed, failover_ms and \
             failback_ms for one run",
        ),
        "scale" => Some("100,000 endpoints across 50 clusters: the registry is built, this scenario is not yet"),
        _ => None,
    }
}
