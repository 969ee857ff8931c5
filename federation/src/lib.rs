//! Trust and linking for a Trellis federation: the certificate authorities (root, per-cluster
//! intermediates, leaf issuance from CSRs) and the secret tokens that let a workload or a cluster
//! prove it may join. Pure logic: storage and transport belong to the control plane.

pub mod ca;
pub mod placement;
pub mod token;

pub use ca::{Ca, CaError, SignedLeaf};
pub use token::{TokenError, TokenParts};
