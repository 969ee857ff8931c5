//! The east-west gateway: an mTLS HTTP/2 listener that accepts one `CONNECT` per tunnelled
//! connection from proxies of other clusters and splices it to a healthy local endpoint, without
//! terminating the inner mTLS. It is built from `trellis-proxy`'s TLS, pool and tunnel parts.
//!
//! This crate holds the gateway's configuration surface; the data path lands with the
//! east-west gateway work and reuses the proxy library rather than a second implementation.

/// What a gateway serves, as it will be configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// `host:port` of the local control plane.
    pub control_plane: String,
    /// Name of the gateway's cluster.
    pub cluster: String,
}

/// Why the gateway cannot run in this build.
pub const NOT_AVAILABLE: &str = "east-west gateways are not part of this build yet: clusters are linked \
     by the federation work, and cross-cluster traffic through gateways arrives after it";
