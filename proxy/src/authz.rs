//! Authorization of inbound callers: the hook where policy will plug in.
//!
//! The inbound side asks an [`Authorizer`] once per HTTP request and once per TCP connection, with
//! the verified caller identity. Until `AuthorizationPolicy` arrives, [`AllowTrustDomain`] lets in
//! every identity of our trust domain (the TLS layer already refused everything else).

use http::Method;
use trellis_proto::SpiffeId;

/// What kind of inbound traffic is being authorized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundKind {
    /// One HTTP request.
    Http,
    /// One opaque TCP connection.
    Tcp,
}

/// What is known about the request being authorized.
#[derive(Debug, Clone, Copy)]
pub struct RequestMeta<'a> {
    /// HTTP request or TCP connection.
    pub kind: InboundKind,
    /// The HTTP method (HTTP only).
    pub method: Option<&'a Method>,
    /// The request path (HTTP only).
    pub path: Option<&'a str>,
}

/// The outcome of an authorization check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let the request through.
    Allow,
    /// Refuse it, with the reason shown to the caller.
    Deny(String),
}

/// Decides whether a verified caller may make a request.
pub trait Authorizer: Send + Sync + 'static {
    /// Checks one request (or TCP connection) of `caller`.
    fn check(&self, caller: &SpiffeId, request: &RequestMeta<'_>) -> Decision;
}

/// The default: every identity of one trust domain is allowed.
#[derive(Debug, Clone)]
pub struct AllowTrustDomain {
    trust_domain: String,
}

impl AllowTrustDomain {
    /// Allows identities of `trust_domain`.
    pub fn new(trust_domain: &str) -> Self {
        Self { trust_domain: trust_domain.to_string() }
    }
}

impl Authorizer for AllowTrustDomain {
    fn check(&self, caller: &SpiffeId, _request: &RequestMeta<'_>) -> Decision {
        if caller.trust_domain() == self.trust_domain {
            Decision::Allow
        } else {
            Decision::Deny(format!("{caller} is not in trust domain {}", self.trust_domain))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_allows_the_trust_domain_only() {
        let a = AllowTrustDomain::new("trellis.local");
        let meta = RequestMeta { kind: InboundKind::Http, method: Some(&Method::GET), path: Some("/") };
        let cases = [
            ("spiffe://trellis.local/ns/default/sa/web", true),
            ("spiffe://trellis.local/trellis/cluster/a/gateway", true),
            ("spiffe://other.local/ns/default/sa/web", false),
        ];
        for (id, allowed) in cases {
            let id: SpiffeId = id.parse().unwrap();
            assert_eq!(a.check(&id, &meta) == Decision::Allow, allowed, "{id}");
        }
    }
}
