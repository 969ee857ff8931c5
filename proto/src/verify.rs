//! The one place where a peer's certificate chain is judged.
//!
//! Order matters: the chain must lead to a root of the trust bundle (with validity times and key
//! usage checked by webpki) before anything in the leaf is believed; only then is the leaf's single
//! URI SAN read as a SPIFFE ID and compared with what the caller expected.

use std::sync::{Arc, RwLock};

use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::identity::{Principal, SpiffeId};

/// Why a peer certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the peer certificate cannot be parsed: {0}")]
    Malformed(String),
    #[error("the peer certificate has expired")]
    Expired,
    #[error("the peer certificate is not valid yet (check the clocks of both hosts)")]
    NotYetValid,
    #[error("the peer certificate does not chain to a trusted root of this federation")]
    UnknownRoot,
    #[error("the peer presented a CA certificate as its leaf")]
    CaAsLeaf,
    #[error("the peer certificate chain is invalid: {0}")]
    Chain(String),
    #[error("the peer certificate has {0} URI SANs; exactly one SPIFFE ID is required")]
    UriSanCount(usize),
    #[error("the peer certificate's URI SAN is not a SPIFFE ID: {0}")]
    BadSpiffeId(String),
    #[error("the peer belongs to trust domain '{got}', expected '{expected}'")]
    WrongTrustDomain { got: String, expected: String },
    #[error("the peer is {got}, expected {expected}")]
    UnexpectedIdentity { got: String, expected: String },
    #[error("the trust bundle is invalid: {0}")]
    Bundle(String),
}

/// What identity a peer must have, checked after the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdMatcher {
    /// Exactly this identity.
    Exact(SpiffeId),
    /// Any identity of the bundle's trust domain.
    AnyInTrustDomain,
    /// Any workload (`ns/<ns>/sa/<sa>`) of the trust domain.
    AnyWorkload,
    /// Any control-plane instance of the trust domain.
    AnyControlPlane,
    /// Any east-west gateway of the trust domain.
    AnyGateway,
    /// Any of these matchers.
    AnyOf(Vec<IdMatcher>),
}

impl IdMatcher {
    /// Does `id` satisfy this matcher? (The trust domain is checked separately.)
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            IdMatcher::Exact(want) => want == id,
            IdMatcher::AnyInTrustDomain => true,
            IdMatcher::AnyWorkload => id.is_workload(),
            IdMatcher::AnyControlPlane => matches!(id.principal(), Principal::ControlPlane { .. }),
            IdMatcher::AnyGateway => matches!(id.principal(), Principal::Gateway { .. }),
            IdMatcher::AnyOf(ms) => ms.iter().any(|m| m.matches(id)),
        }
    }

    fn describe(&self) -> String {
        match self {
            IdMatcher::Exact(id) => id.to_string(),
            IdMatcher::AnyInTrustDomain => "any identity of the trust domain".into(),
            IdMatcher::AnyWorkload => "a workload identity".into(),
            IdMatcher::AnyControlPlane => "a control-plane identity".into(),
            IdMatcher::AnyGateway => "an east-west gateway identity".into(),
            IdMatcher::AnyOf(ms) => ms.iter().map(Self::describe).collect::<Vec<_>>().join(" or "),
        }
    }
}

/// Which side of a TLS handshake the verified certificate belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// The peer is a server (extended key usage serverAuth).
    Server,
    /// The peer is a client (extended key usage clientAuth).
    Client,
}

/// The roots a federation trusts, for one trust domain. During a root rotation it holds both.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    trust_domain: String,
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<rustls_pki_types::TrustAnchor<'static>>,
}

impl TrustBundle {
    /// Builds a bundle from DER root certificates.
    pub fn new(trust_domain: &str, roots: Vec<CertificateDer<'static>>) -> Result<Self, VerifyError> {
        if roots.is_empty() {
            return Err(VerifyError::Bundle("it holds no root certificate".into()));
        }
        let anchors = roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| VerifyError::Bundle(format!("a root cannot be used as trust anchor: {e}")))?;
        Ok(Self { trust_domain: trust_domain.to_string(), roots, anchors })
    }

    /// A bundle that trusts nothing yet (until the real one is stored).
    pub fn empty(trust_domain: &str) -> Self {
        Self { trust_domain: trust_domain.to_string(), roots: Vec::new(), anchors: Vec::new() }
    }

    /// Builds a bundle from PEM text (one or more certificates per string).
    pub fn from_pem(trust_domain: &str, pems: &[String]) -> Result<Self, VerifyError> {
        let mut roots = Vec::new();
        for pem in pems {
            roots.extend(crate::tls::certs_from_pem(pem).map_err(|e| VerifyError::Bundle(e.to_string()))?);
        }
        Self::new(trust_domain, roots)
    }

    /// Converts a wire bundle.
    pub fn from_proto(pb: &crate::pb::TrustBundle) -> Result<Self, VerifyError> {
        Self::from_pem(&pb.trust_domain, &pb.roots_pem)
    }

    /// The wire form.
    pub fn to_proto(&self) -> crate::pb::TrustBundle {
        crate::pb::TrustBundle { trust_domain: self.trust_domain.clone(), roots_pem: self.to_pem() }
    }

    /// The roots as PEM strings.
    pub fn to_pem(&self) -> Vec<String> {
        self.roots.iter().map(|r| crate::tls::cert_to_pem(r)).collect()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The roots, DER.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Verifies a peer's chain (leaf first) and returns its SPIFFE ID if it satisfies `expected`.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        usage: Usage,
        expected: &IdMatcher,
        now: UnixTime,
    ) -> Result<SpiffeId, VerifyError> {
        let leaf = chain.first().ok_or(VerifyError::NoCertificate)?;
        // 1. The chain, before anything in the leaf is believed.
        let ee = EndEntityCert::try_from(leaf).map_err(|e| VerifyError::Malformed(e.to_string()))?;
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms.all;
        let ku = match usage {
            Usage::Server => KeyUsage::server_auth(),
            Usage::Client => KeyUsage::client_auth(),
        };
        ee.verify_for_usage(algs, &self.anchors, &chain[1..], now, ku, None, None).map_err(map_webpki)?;
        // 2. The leaf's shape: not a CA, exactly one URI SAN.
        let id = spiffe_id_of(leaf)?;
        // 3. The identity.
        if id.trust_domain() != self.trust_domain {
            return Err(VerifyError::WrongTrustDomain {
                got: id.trust_domain().to_string(),
                expected: self.trust_domain.clone(),
            });
        }
        if !expected.matches(&id) {
            return Err(VerifyError::UnexpectedIdentity { got: id.to_string(), expected: expected.describe() });
        }
        Ok(id)
    }
}

fn map_webpki(e: webpki::Error) -> VerifyError {
    use webpki::Error as E;
    match e {
        E::CertExpired { .. } => VerifyError::Expired,
        E::CertNotValidYet { .. } => VerifyError::NotYetValid,
        E::UnknownIssuer => VerifyError::UnknownRoot,
        E::CaUsedAsEndEntity => VerifyError::CaAsLeaf,
        other => VerifyError::Chain(format!("{other:?}")),
    }
}

/// Reads the single SPIFFE ID of a leaf certificate. Does not verify the chain: use
/// [`TrustBundle::verify`] for peers; this is for certificates already verified or our own.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, VerifyError> {
    let (_, x509) = X509Certificate::from_der(cert).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    if x509.is_ca() {
        return Err(VerifyError::CaAsLeaf);
    }
    let uris: Vec<&str> = match x509.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(VerifyError::Malformed(e.to_string())),
    };
    if uris.len() != 1 {
        return Err(VerifyError::UriSanCount(uris.len()));
    }
    uris[0].parse().map_err(|e: crate::IdentityError| VerifyError::BadSpiffeId(e.to_string()))
}

/// A trust bundle that can be replaced while connections use it (root rotation).
#[derive(Debug, Clone)]
pub struct SharedBundle(Arc<(RwLock<Arc<TrustBundle>>, tokio::sync::watch::Sender<u64>)>);

impl SharedBundle {
    /// Wraps a bundle.
    pub fn new(bundle: TrustBundle) -> Self {
        Self(Arc::new((RwLock::new(Arc::new(bundle)), tokio::sync::watch::channel(0).0)))
    }

    /// The current bundle.
    pub fn load(&self) -> Arc<TrustBundle> {
        self.0.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the bundle; handshakes from now on use the new one. Subscribers hear of it when
    /// its roots differ from the previous ones.
    pub fn store(&self, bundle: TrustBundle) {
        let changed = {
            let mut current = self.0.0.write().unwrap_or_else(|p| p.into_inner());
            let changed = current.roots() != bundle.roots();
            *current = Arc::new(bundle);
            changed
        };
        if changed {
            self.0.1.send_modify(|v| *v += 1);
        }
    }

    /// Changes whenever the set of roots changes (a root rotation began or ended).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.1.subscribe()
    }
}
