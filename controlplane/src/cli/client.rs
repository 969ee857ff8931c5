//! Admin client built from a context: mTLS with the admin credential, the server verified as a
//! control plane of the context's trust domain.

use tonic::transport::Channel;
use trellis_proto::pb::admin_client::AdminClient;
use trellis_proto::tls::{Identity, IdentityStore, client_config};
use trellis_proto::verify::{IdMatcher, SharedBundle, TrustBundle};

use crate::context::Context;

/// Errors of CLI calls, with what to do.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("context '{context}' has unusable credentials: {reason}; re-import the admin context")]
    Credentials { context: String, reason: String },
    #[error(
        "cannot reach the control plane at {server}: {reason}. Is it running? (`trellis config get-contexts` shows the server of each context)"
    )]
    Unreachable { server: String, reason: String },
    #[error("the control plane refused: {0}")]
    Refused(String),
    #[error("the control plane cannot do this now: {0}")]
    Unavailable(String),
}

/// Maps a gRPC status to an actionable CLI error.
pub fn from_status(server: &str, s: tonic::Status) -> CliError {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown
            if ["transport", "connect", "refused", "dns"]
                .iter()
                .any(|w| s.message().to_ascii_lowercase().contains(w)) =>
        {
            CliError::Unreachable { server: server.to_string(), reason: s.message().to_string() }
        }
        tonic::Code::Unavailable => CliError::Unavailable(
            s.message().strip_prefix("the control plane cannot serve this now: ").unwrap_or(s.message()).to_string(),
        ),
        _ => CliError::Refused(s.message().to_string()),
    }
}

/// An admin client for `ctx`.
pub fn admin(ctx: &Context) -> Result<AdminClient<Channel>, CliError> {
    let bad = |reason: String| CliError::Credentials { context: ctx.name.clone(), reason };
    let bundle =
        TrustBundle::from_pem(&ctx.trust_domain, std::slice::from_ref(&ctx.ca)).map_err(|e| bad(e.to_string()))?;
    let identity = Identity::from_pem(&ctx.cert, &ctx.key).map_err(|e| bad(e.to_string()))?;
    let cfg = client_config(
        Some(IdentityStore::new(identity)),
        SharedBundle::new(bundle),
        IdMatcher::AnyControlPlane,
        &[b"h2"],
    )
    .map_err(|e| bad(e.to_string()))?;
    let channel = trellis_proto::grpc::channel(&ctx.server, cfg)
        .map_err(|e| CliError::Unreachable { server: ctx.server.clone(), reason: e.to_string() })?;
    Ok(AdminClient::new(channel))
}
