//! rustls configurations for the mesh: SPIFFE verifiers on both sides and certificates that can
//! be replaced at any time (renewal, root rotation) without touching established connections.

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::SpiffeId;
use crate::verify::{IdMatcher, SharedBundle, Usage, VerifyError, spiffe_id_of};

/// Errors building TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid PEM: {0}")]
    Pem(String),
    #[error("no certificate found in the PEM input")]
    NoCertificate,
    #[error("the private key cannot be used: {0}")]
    Key(String),
    #[error("the certificate is not usable: {0}")]
    Cert(#[from] VerifyError),
    #[error("TLS configuration failed: {0}")]
    Config(#[from] rustls::Error),
}

/// The crypto provider of every Trellis process (ring; one provider avoids rustls' ambiguity).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate of a PEM text.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

/// Parses one private key from PEM (PKCS#8, SEC1 or PKCS#1).
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem(e.to_string()))
}

/// Encodes a DER certificate as PEM.
pub fn cert_to_pem(cert: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Validity window of a certificate.
pub fn validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), TlsError> {
    let (_, x509) =
        X509Certificate::from_der(cert).map_err(|e| TlsError::Cert(VerifyError::Malformed(e.to_string())))?;
    let to_sys = |t: i64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64);
    Ok((to_sys(x509.validity().not_before.timestamp()), to_sys(x509.validity().not_after.timestamp())))
}

/// A certificate chain with its key and what it says about itself.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The SPIFFE ID of the leaf.
    pub id: SpiffeId,
    /// rustls' form: chain (leaf first) and signing key.
    pub key: Arc<CertifiedKey>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl Identity {
    /// Builds an identity from a chain (leaf first) and its private key.
    pub fn new(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Self, TlsError> {
        let leaf = chain.first().ok_or(TlsError::NoCertificate)?;
        let id = spiffe_id_of(leaf)?;
        let (not_before, not_after) = validity(leaf)?;
        let signing = provider().key_provider.load_private_key(key).map_err(|e| TlsError::Key(e.to_string()))?;
        let key = Arc::new(CertifiedKey::new(chain, signing));
        key.keys_match().map_err(|e| TlsError::Key(format!("it does not match the certificate: {e}")))?;
        Ok(Self { id, key, not_before, not_after })
    }

    /// Builds an identity from PEM chain and PEM key.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        Self::new(certs_from_pem(chain_pem)?, key_from_pem(key_pem)?)
    }

    /// When this certificate should be renewed: at half of its lifetime.
    pub fn renew_at(&self) -> SystemTime {
        let life = self.not_after.duration_since(self.not_before).unwrap_or_default();
        self.not_before + life / 2
    }
}

/// Holds the current certificate of a process. Replacing it affects new handshakes only, so
/// renewal never drops a connection.
#[derive(Debug, Default)]
pub struct IdentityStore(RwLock<Option<Identity>>);

impl IdentityStore {
    /// A store holding `identity`.
    pub fn new(identity: Identity) -> Arc<Self> {
        Arc::new(Self(RwLock::new(Some(identity))))
    }

    /// An empty store (no certificate yet).
    pub fn empty() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The current identity.
    pub fn current(&self) -> Option<Identity> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Installs a new identity.
    pub fn replace(&self, identity: Identity) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(identity);
    }

    fn key(&self) -> Option<Arc<CertifiedKey>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|i| i.key.clone())
    }
}

impl rustls::server::ResolvesServerCert for IdentityStore {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.key()
    }
}

impl rustls::client::ResolvesClientCert for IdentityStore {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.key()
    }

    fn has_certs(&self) -> bool {
        self.key().is_some()
    }
}

fn to_rustls(e: VerifyError) -> rustls::Error {
    let ce = match e {
        VerifyError::Expired => CertificateError::Expired,
        VerifyError::NotYetValid => CertificateError::NotValidYet,
        VerifyError::UnknownRoot => CertificateError::UnknownIssuer,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(ce)
}

fn chain<'a>(ee: &CertificateDer<'a>, intermediates: &[CertificateDer<'a>]) -> Vec<CertificateDer<'a>> {
    let mut c = Vec::with_capacity(1 + intermediates.len());
    c.push(ee.clone());
    c.extend(intermediates.iter().cloned());
    c
}

/// Verifies servers by chain and SPIFFE ID; the DNS name is ignored (identities are SPIFFE IDs).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: SharedBundle,
    expected: IdMatcher,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    /// A verifier expecting servers that satisfy `expected`.
    pub fn new(bundle: SharedBundle, expected: IdMatcher) -> Arc<Self> {
        Arc::new(Self { bundle, expected, provider: provider() })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.bundle
            .load()
            .verify(&chain(end_entity, intermediates), Usage::Server, &self.expected, now)
            .map_err(to_rustls)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Verifies clients by chain and SPIFFE ID.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: SharedBundle,
    expected: IdMatcher,
    mandatory: bool,
    provider: Arc<CryptoProvider>,
}

impl SpiffeClientVerifier {
    /// A verifier for clients that satisfy `expected`; `mandatory = false` lets clients without a
    /// certificate in (the handler then decides, e.g. certificate signing with a workload token).
    pub fn new(bundle: SharedBundle, expected: IdMatcher, mandatory: bool) -> Arc<Self> {
        Arc::new(Self { bundle, expected, mandatory, provider: provider() })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.bundle
            .load()
            .verify(&chain(end_entity, intermediates), Usage::Client, &self.expected, now)
            .map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A server configuration presenting `identity` and verifying clients against `expected_clients`.
pub fn server_config(
    identity: Arc<IdentityStore>,
    bundle: SharedBundle,
    expected_clients: IdMatcher,
    client_cert_mandatory: bool,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(SpiffeClientVerifier::new(bundle, expected_clients, client_cert_mandatory))
        .with_cert_resolver(identity);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// A client configuration presenting `identity` (if any) and verifying servers against `expected`.
pub fn client_config(
    identity: Option<Arc<IdentityStore>>,
    bundle: SharedBundle,
    expected_server: IdMatcher,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(bundle, expected_server));
    let mut cfg = match identity {
        Some(store) => builder.with_client_cert_resolver(store),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // A resumed TLS 1.3 session keeps the client identity of the session it resumes: after the
    // first certificate (or a renewal) the peer would still see the old identity, or none. Mesh
    // connections are long-lived and pooled, so a full handshake each time costs little.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The common name of every cluster intermediate CA is this prefix and the cluster's name; the
/// root signs intermediates with names it chooses, so a verified leaf's issuer names its cluster.
pub const INTERMEDIATE_CN_PREFIX: &str = "Trellis intermediate CA ";

/// The cluster whose intermediate CA issued the leaf of a verified chain.
pub fn issuer_cluster(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let leaf = certs?.first()?;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).ok()?;
    let cn = cert.issuer().iter_common_name().next()?.as_str().ok()?.to_string();
    cn.strip_prefix(INTERMEDIATE_CN_PREFIX).map(str::to_string)
}

/// The SPIFFE ID of the peer of an established TLS connection (already verified by the handshake).
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    certs.and_then(|c| c.first()).and_then(|leaf| spiffe_id_of(leaf).ok())
}

/// The server name sent in SNI. Verification ignores it: identities are SPIFFE IDs.
pub fn mesh_server_name() -> ServerName<'static> {
    ServerName::try_from("trellis.mesh").expect("static name is valid")
}

/// SHA-256 of a certificate's DER, lowercase hex: the pin of a trust anchor in join tokens.
pub fn cert_pin(cert: &CertificateDer<'_>) -> String {
    ring::digest::digest(&ring::digest::SHA256, cert.as_ref()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Verifies a server that has no bundle on this side yet: the server presents its root along
/// with its chain, the root must hash to `pin` (carried by a join token), and the chain must
/// verify to that root with a SPIFFE ID that satisfies `expected`.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    pin: String,
    trust_domain: String,
    expected: IdMatcher,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let root = intermediates.iter().find(|c| cert_pin(c) == self.pin).ok_or_else(|| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(VerifyError::Bundle(
                "the server did not present the trust anchor pinned by the join token; the token belongs \
                 to another federation, or the address is not a Trellis control plane"
                    .into(),
            )))))
        })?;
        let bundle =
            crate::verify::TrustBundle::new(&self.trust_domain, vec![root.clone().into_owned()]).map_err(to_rustls)?;
        bundle.verify(&chain(end_entity, intermediates), Usage::Server, &self.expected, now).map_err(to_rustls)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A client configuration without a client certificate that trusts only a server whose root
/// hashes to `pin` (see [`PinnedServerVerifier`]).
pub fn pinned_client_config(
    pin: &str,
    trust_domain: &str,
    expected_server: IdMatcher,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let verifier = Arc::new(PinnedServerVerifier {
        pin: pin.to_ascii_lowercase(),
        trust_domain: trust_domain.to_string(),
        expected: expected_server,
        provider: provider(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}
