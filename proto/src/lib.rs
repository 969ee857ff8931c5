//! The Trellis contract: everything two components must agree on.
//!
//! - [`pb`]: the generated gRPC APIs (discovery, certificate signing, administration).
//! - [`identity`]: SPIFFE identities and the shapes Trellis gives them.
//! - [`verify`]: the single place where peer certificates are judged (chain first, then identity).
//! - [`tls`]: rustls configurations built on those verifiers, with hot-reloadable certificates.
//! - [`grpc`]: mTLS plumbing for tonic servers and channels.

pub mod grpc;
pub mod identity;
pub mod tls;
pub mod verify;

/// Generated protobuf and gRPC types of package `trellis.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("trellis.v1");
}

pub use identity::{IdentityError, SpiffeId};
pub use verify::{IdMatcher, TrustBundle, VerifyError};

/// Default trust domain of a federation.
pub const DEFAULT_TRUST_DOMAIN: &str = "trellis.local";

/// Header carrying the verified caller identity from the server proxy to its application.
/// Proxies strip any value a client sent before setting it.
pub const PEER_IDENTITY_HEADER: &str = "x-trellis-peer-identity";

/// ALPN protocol between proxies for HTTP (HTTP/1.1 and HTTP/2 requests multiplexed over HTTP/2).
pub const ALPN_MESH_HTTP: &[u8] = b"trellis/h2";
/// ALPN protocol between proxies for opaque TCP streams.
pub const ALPN_MESH_TCP: &[u8] = b"trellis/tcp";
