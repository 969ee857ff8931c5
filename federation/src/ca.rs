//! Certificate authorities with rcgen: a federation root (ECDSA P-256), one intermediate per
//! cluster that may only sign leaves, and leaves carrying exactly one URI SAN, the SPIFFE ID.
//!
//! A leaf's contents are decided here, never taken from the CSR: the CSR only proves possession
//! of the key. A CSR asking for another identity is refused rather than silently rewritten, so a
//! misconfigured workload learns what is wrong.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;
use trellis_proto::SpiffeId;

/// Lifetime of a federation root.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of a cluster intermediate.
pub const INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default lifetime of a leaf certificate.
pub const LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest leaf lifetime a CA grants.
pub const MAX_LEAF_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Backdating of `notBefore`, for clocks slightly behind.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// The name of root number `generation` of `trust_domain` (the first has no number).
pub fn root_name(trust_domain: &str, generation: u32) -> String {
    if generation <= 1 {
        format!("Trellis root CA {trust_domain}")
    } else {
        format!("Trellis root CA {trust_domain} #{generation}")
    }
}

/// The P-256 public key of a certificate, to issue another certificate for the same key.
struct CertPublicKey(Vec<u8>);

impl CertPublicKey {
    fn of(cert_pem: &str) -> Result<Self, CaError> {
        use x509_parser::prelude::FromDer;
        let der = trellis_proto::tls::certs_from_pem(cert_pem).map_err(|e| CaError::BadCa(e.to_string()))?;
        let first = der.first().ok_or_else(|| CaError::BadCa("no certificate".into()))?;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(first)
            .map_err(|e| CaError::BadCa(format!("certificate: {e}")))?;
        let spki = &cert.tbs_certificate.subject_pki;
        // id-ecPublicKey on prime256v1: the only keys Trellis makes.
        let ec = spki.algorithm.algorithm.to_id_string() == "1.2.840.10045.2.1";
        let p256 = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|o| o.to_id_string())
            == Some("1.2.840.10045.3.1.7".to_string());
        if !(ec && p256) {
            return Err(CaError::BadCa("the certificate's key is not ECDSA P-256".into()));
        }
        Ok(Self(spki.subject_public_key.data.to_vec()))
    }
}

impl rcgen::PublicKeyData for CertPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Errors of certificate issuance.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the CSR cannot be parsed or its signature is invalid: {0}")]
    BadCsr(String),
    #[error("the CSR asks for identity {asked} but the caller is {allowed}; request {allowed}")]
    CsrIdentity { asked: String, allowed: String },
    #[error("the CA material is invalid: {0}")]
    BadCa(String),
    #[error("the CA certificate has expired or expires before the leaf could be useful; rotate it")]
    CaExpired,
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// A leaf certificate and the chain that leads to the root (excluding the root).
#[derive(Debug, Clone)]
pub struct SignedLeaf {
    /// The leaf, PEM.
    pub cert_pem: String,
    /// Intermediates, issuer first, PEM.
    pub chain_pem: Vec<String>,
    /// End of validity.
    pub not_after: SystemTime,
}

/// A certificate authority: its certificate, key and the chain above it (excluding the root).
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    chain_pem: Vec<String>,
    not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

fn new_key() -> Result<KeyPair, CaError> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // `ring`'s system RNG; a failure here means the OS has no entropy source at all.
    let rng = ring::rand::SystemRandom::new();
    if ring::rand::SecureRandom::fill(&rng, &mut bytes).is_err() {
        bytes = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos().to_be_bytes();
    }
    bytes[0] &= 0x7f; // positive INTEGER
    SerialNumber::from_slice(&bytes)
}

fn to_offset(t: SystemTime) -> OffsetDateTime {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
    OffsetDateTime::from_unix_timestamp(secs as i64).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn ca_params(cn: &str, ttl: Duration, path_len: Option<u8>) -> CertificateParams {
    let now = SystemTime::now();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Trellis");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = to_offset(now - CLOCK_SKEW);
    p.not_after = to_offset(now + ttl);
    p.serial_number = Some(random_serial());
    p.use_authority_key_identifier_extension = true;
    p
}

impl Ca {
    /// Creates a new self-signed federation root.
    pub fn new_root(trust_domain: &str, ttl: Duration) -> Result<Self, CaError> {
        let key = new_key()?;
        let params = ca_params(&root_name(trust_domain, 1), ttl, None);
        let cert = params.self_signed(&key)?;
        let not_after = SystemTime::now() + ttl;
        let key_pem = key.serialize_pem();
        Ok(Self { cert_pem: cert.pem(), key_pem, chain_pem: Vec::new(), not_after, issuer: Issuer::new(params, key) })
    }

    /// Loads a CA from its certificate, key and the chain above it (excluding the root).
    pub fn from_pem(cert_pem: &str, key_pem: &str, chain_pem: Vec<String>) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::BadCa(format!("key: {e}")))?;
        let certs = trellis_proto::tls::certs_from_pem(cert_pem).map_err(|e| CaError::BadCa(e.to_string()))?;
        let (_, not_after) = trellis_proto::tls::validity(&certs[0]).map_err(|e| CaError::BadCa(e.to_string()))?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| CaError::BadCa(format!("certificate: {e}")))?;
        Ok(Self { cert_pem: cert_pem.to_string(), key_pem: key_pem.to_string(), chain_pem, not_after, issuer })
    }

    /// Issues an intermediate CA for a cluster; it may sign leaves only (path length 0).
    pub fn issue_intermediate(&self, cluster: &str, ttl: Duration) -> Result<Self, CaError> {
        let key = new_key()?;
        let ttl = self.cap_ttl(ttl)?;
        let params = ca_params(&format!("{}{cluster}", trellis_proto::tls::INTERMEDIATE_CN_PREFIX), ttl, Some(0));
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain_pem = vec![cert.pem()];
        chain_pem.extend(self.chain_pem.iter().cloned());
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            chain_pem,
            not_after: SystemTime::now() + ttl,
            issuer: Issuer::new(params, key),
        })
    }

    /// Creates root number `generation` (2, 3, ...) of a federation whose first root was made by
    /// [`Ca::new_root`]: its own name, so that chains to either root are unambiguous.
    pub fn new_root_generation(trust_domain: &str, generation: u32, ttl: Duration) -> Result<Self, CaError> {
        let key = new_key()?;
        let params = ca_params(&root_name(trust_domain, generation), ttl, None);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            chain_pem: Vec::new(),
            not_after: SystemTime::now() + ttl,
            issuer: Issuer::new(params, key),
        })
    }

    /// Cross-signs another root (`root_pem`, named `name`): a certificate for its key and name,
    /// issued by this root. A verifier that trusts only this root accepts chains that end in the
    /// other one when this certificate rides along. Returns it, PEM.
    pub fn cross_sign(&self, root_pem: &str, name: &str) -> Result<String, CaError> {
        let key = CertPublicKey::of(root_pem)?;
        let ttl = self.cap_ttl(ROOT_TTL)?;
        Ok(ca_params(name, ttl, None).signed_by(&key, &self.issuer)?.pem())
    }

    /// Issues a new certificate for a cluster's existing intermediate CA key (taken from its
    /// current certificate `intermediate_pem`), under this root: the key never moves.
    pub fn resign_intermediate(&self, intermediate_pem: &str, cluster: &str) -> Result<String, CaError> {
        let key = CertPublicKey::of(intermediate_pem)?;
        let ttl = self.cap_ttl(INTERMEDIATE_TTL)?;
        let params = ca_params(&format!("{}{cluster}", trellis_proto::tls::INTERMEDIATE_CN_PREFIX), ttl, Some(0));
        Ok(params.signed_by(&key, &self.issuer)?.pem())
    }

    /// Signs a new cluster's intermediate CA from its CSR: only the public key is taken from the
    /// request (its key stays in the new cluster); name, path length 0 and lifetime are ours.
    /// Returns the certificate, PEM.
    pub fn sign_intermediate_csr(&self, csr_pem: &str, cluster: &str, ttl: Duration) -> Result<String, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CaError::BadCsr(e.to_string()))?;
        let ttl = self.cap_ttl(ttl)?;
        let params = ca_params(&format!("{}{cluster}", trellis_proto::tls::INTERMEDIATE_CN_PREFIX), ttl, Some(0));
        Ok(params.signed_by(&csr.public_key, &self.issuer)?.pem())
    }

    /// Signs a CSR for `id`. The CSR must not ask for any other identity.
    pub fn sign_csr(&self, csr_pem: &str, id: &SpiffeId, ttl: Duration) -> Result<SignedLeaf, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CaError::BadCsr(e.to_string()))?;
        for san in &csr.params.subject_alt_names {
            let asked = match san {
                SanType::URI(u) => u.as_str().to_string(),
                SanType::DnsName(d) => d.as_str().to_string(),
                other => format!("{other:?}"),
            };
            if asked != id.to_string() {
                return Err(CaError::CsrIdentity { asked, allowed: id.to_string() });
            }
        }
        self.sign_key(&csr.public_key, id, ttl)
    }

    /// Issues a leaf for `id` with a key generated here. Only for identities whose key is created
    /// by the control plane itself (its own serving identity, admin credentials at bootstrap).
    pub fn issue_leaf(&self, id: &SpiffeId, ttl: Duration) -> Result<(SignedLeaf, String), CaError> {
        let key = new_key()?;
        let leaf = self.sign_key(&key, id, ttl)?;
        Ok((leaf, key.serialize_pem()))
    }

    fn sign_key(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<SignedLeaf, CaError> {
        let ttl = self.cap_ttl(ttl.min(MAX_LEAF_TTL))?;
        let now = SystemTime::now();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        dn.push(DnType::CommonName, id.path());
        p.distinguished_name = dn;
        let uri = id.to_string().try_into().map_err(|e: rcgen::Error| CaError::BadCsr(e.to_string()))?;
        p.subject_alt_names = vec![SanType::URI(uri)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.not_before = to_offset(now - CLOCK_SKEW.min(Duration::from_secs(60)));
        p.not_after = to_offset(now + ttl);
        p.serial_number = Some(random_serial());
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(public_key, &self.issuer)?;
        let mut chain_pem = Vec::new();
        if !self.chain_pem.is_empty() {
            chain_pem.extend(self.chain_pem.iter().cloned());
        }
        Ok(SignedLeaf { cert_pem: cert.pem(), chain_pem, not_after: now + ttl })
    }

    /// A lifetime that ends no later than this CA's own.
    fn cap_ttl(&self, ttl: Duration) -> Result<Duration, CaError> {
        let left = self.not_after.duration_since(SystemTime::now()).map_err(|_| CaError::CaExpired)?;
        if left < Duration::from_secs(60) {
            return Err(CaError::CaExpired);
        }
        Ok(ttl.min(left))
    }

    /// This CA's certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// This CA's private key, PEM. Handle as a secret.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Certificates between this CA and the root, this CA first (empty for a root).
    pub fn chain_pem(&self) -> &[String] {
        &self.chain_pem
    }

    /// End of validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// Generates a P-256 key and a CSR for `id`; returns (csr_pem, key_pem). For workloads and tools
/// that request certificates; the key never leaves the caller.
pub fn new_csr(id: &SpiffeId) -> Result<(String, String), CaError> {
    let key = new_key()?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id.path());
    p.distinguished_name = dn;
    p.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    let csr = p.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// Whether the certificate `cert_pem` was issued for the key that signed `csr_pem`.
pub fn csr_key_matches_cert(csr_pem: &str, cert_pem: &str) -> Result<bool, CaError> {
    use rcgen::PublicKeyData as _;
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CaError::BadCsr(e.to_string()))?;
    let der = trellis_proto::tls::certs_from_pem(cert_pem).map_err(|e| CaError::BadCa(e.to_string()))?;
    let first = der.first().ok_or_else(|| CaError::BadCa("no certificate".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(first.as_ref()).map_err(|e| CaError::BadCa(e.to_string()))?;
    Ok(cert.public_key().subject_public_key.data.as_ref() == csr.public_key.der_bytes())
}

/// SHA-256 (hex) of the public key a CSR asks to certify; the CSR's signature is checked.
pub fn csr_key_pin(csr_pem: &str) -> Result<String, CaError> {
    use rcgen::PublicKeyData as _;
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CaError::BadCsr(e.to_string()))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, csr.public_key.der_bytes());
    Ok(digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// Generates a P-256 key and a CSR for a cluster's intermediate CA; returns (csr_pem, key_pem).
/// The key stays with the cluster that asks.
pub fn new_ca_csr(cluster: &str) -> Result<(String, String), CaError> {
    let key = new_key()?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Trellis");
    dn.push(DnType::CommonName, format!("{}{cluster}", trellis_proto::tls::INTERMEDIATE_CN_PREFIX));
    p.distinguished_name = dn;
    let csr = p.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::tls::{Identity, certs_from_pem};

    #[test]
    fn an_intermediate_from_a_csr_signs_leaves_that_verify() {
        let root = Ca::new_root("trellis.local", ROOT_TTL).unwrap();
        let (csr, key) = new_ca_csr("b").unwrap();
        let cert = root.sign_intermediate_csr(&csr, "b", INTERMEDIATE_TTL).unwrap();
        let inter = Ca::from_pem(&cert, &key, vec![cert.clone()]).unwrap();
        let id = SpiffeId::workload("trellis.local", "default", "web").unwrap();
        let (leaf, _) = inter.issue_leaf(&id, LEAF_TTL).unwrap();
        let mut chain = certs_from_pem(&leaf.cert_pem).unwrap();
        for c in &leaf.chain_pem {
            chain.extend(certs_from_pem(c).unwrap());
        }
        let bundle = TrustBundle::from_pem("trellis.local", &[root.cert_pem().to_string()]).unwrap();
        assert_eq!(bundle.verify(&chain, Usage::Client, &IdMatcher::Exact(id.clone()), now()).unwrap(), id);
        assert_eq!(
            trellis_proto::tls::issuer_cluster(Some(&chain)).as_deref(),
            Some("b"),
            "the leaf names its cluster"
        );
        assert!(root.sign_intermediate_csr("garbage", "b", INTERMEDIATE_TTL).is_err());
        assert!(csr_key_matches_cert(&csr, &cert).unwrap());
        let (other, _) = new_ca_csr("b").unwrap();
        assert!(!csr_key_matches_cert(&other, &cert).unwrap());
    }
    use trellis_proto::verify::{IdMatcher, TrustBundle, Usage, VerifyError};

    fn now() -> rustls_pki_types::UnixTime {
        rustls_pki_types::UnixTime::now()
    }

    #[test]
    fn a_new_root_cross_signed_by_the_old_is_trusted_by_either_bundle() {
        let td = "trellis.local";
        let old = Ca::new_root(td, ROOT_TTL).unwrap();
        let (csr, inter_key) = new_ca_csr("b").unwrap();
        let inter_old = old.sign_intermediate_csr(&csr, "b", INTERMEDIATE_TTL).unwrap();
        let new = Ca::new_root_generation(td, 2, ROOT_TTL).unwrap();
        let cross = old.cross_sign(new.cert_pem(), &root_name(td, 2)).unwrap();
        // The cluster's key does not move: only its certificate is issued again, by the new root.
        let inter_new = new.resign_intermediate(&inter_old, "b").unwrap();
        assert!(csr_key_matches_cert(&csr, &inter_new).unwrap());
        let id = SpiffeId::workload(td, "default", "web").unwrap();
        let chain_of = |inter: &str, extra: &[&str]| {
            let ca = Ca::from_pem(inter, &inter_key, vec![inter.to_string()]).unwrap();
            let (leaf, _) = ca.issue_leaf(&id, LEAF_TTL).unwrap();
            let mut chain = certs_from_pem(&leaf.cert_pem).unwrap();
            for c in leaf.chain_pem.iter().map(String::as_str).chain(extra.iter().copied()) {
                chain.extend(certs_from_pem(c).unwrap());
            }
            chain
        };
        let bundle = |roots: &[&Ca]| {
            TrustBundle::from_pem(td, &roots.iter().map(|r| r.cert_pem().to_string()).collect::<Vec<_>>()).unwrap()
        };
        let matcher = IdMatcher::Exact(id.clone());
        let reissued = chain_of(&inter_new, &[&cross]);
        // A peer that has not heard of the new root yet, one that has both, one with only the new.
        for b in [bundle(&[&old]), bundle(&[&old, &new]), bundle(&[&new])] {
            assert_eq!(b.verify(&reissued, Usage::Client, &matcher, now()).unwrap(), id);
        }
        // Leaves issued before the rotation stay valid while the old root is in the bundle.
        let before = chain_of(&inter_old, &[]);
        bundle(&[&old, &new]).verify(&before, Usage::Server, &matcher, now()).unwrap();
        assert!(bundle(&[&new]).verify(&before, Usage::Server, &matcher, now()).is_err());
        // Without the cross-signed certificate, the old bundle cannot place the new chain.
        assert!(bundle(&[&old]).verify(&chain_of(&inter_new, &[]), Usage::Client, &matcher, now()).is_err());
    }

    #[test]
    fn a_csr_key_pin_names_the_key_not_the_request() {
        let id = SpiffeId::control_plane("trellis.local", "b", "cp-2").unwrap();
        let (csr, key) = new_csr(&id).unwrap();
        let (other, _) = new_csr(&id).unwrap();
        let pin = csr_key_pin(&csr).unwrap();
        assert_eq!(pin.len(), 64);
        assert_eq!(pin, csr_key_pin(&csr).unwrap());
        assert_ne!(pin, csr_key_pin(&other).unwrap(), "another key, another pin");
        // A second request signed with the same key has the same pin.
        let params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let again = params.serialize_request(&rcgen::KeyPair::from_pem(&key).unwrap()).unwrap().pem().unwrap();
        assert_eq!(pin, csr_key_pin(&again).unwrap());
        assert!(csr_key_pin("garbage").is_err());
    }

    #[test]
    fn leaf_from_csr_verifies_against_root() {
        let root = Ca::new_root("trellis.local", ROOT_TTL).unwrap();
        let inter = root.issue_intermediate("a", INTERMEDIATE_TTL).unwrap();
        let id = SpiffeId::workload("trellis.local", "default", "web").unwrap();
        let (csr, key) = new_csr(&id).unwrap();
        let leaf = inter.sign_csr(&csr, &id, LEAF_TTL).unwrap();
        let mut chain = certs_from_pem(&leaf.cert_pem).unwrap();
        for c in &leaf.chain_pem {
            chain.extend(certs_from_pem(c).unwrap());
        }
        let bundle = TrustBundle::from_pem("trellis.local", &[root.cert_pem().to_string()]).unwrap();
        let got = bundle.verify(&chain, Usage::Client, &IdMatcher::Exact(id.clone()), now()).unwrap();
        assert_eq!(got, id);
        bundle.verify(&chain, Usage::Server, &IdMatcher::AnyWorkload, now()).unwrap();
        // The key stays with the requester and matches the certificate.
        let pem_chain: String = std::iter::once(leaf.cert_pem.clone()).chain(leaf.chain_pem.clone()).collect();
        Identity::from_pem(&pem_chain, &key).unwrap();
    }

    #[test]
    fn csr_for_another_identity_is_refused() {
        let root = Ca::new_root("trellis.local", ROOT_TTL).unwrap();
        let asked = SpiffeId::workload("trellis.local", "default", "admin").unwrap();
        let allowed = SpiffeId::workload("trellis.local", "default", "web").unwrap();
        let (csr, _) = new_csr(&asked).unwrap();
        let err = root.sign_csr(&csr, &allowed, LEAF_TTL).unwrap_err();
        assert!(matches!(err, CaError::CsrIdentity { .. }), "{err}");
        assert!(matches!(root.sign_csr("garbage", &allowed, LEAF_TTL), Err(CaError::BadCsr(_))));
    }

    #[test]
    fn intermediate_cannot_sign_cas_and_roundtrips_through_pem() {
        let root = Ca::new_root("trellis.local", ROOT_TTL).unwrap();
        let inter = root.issue_intermediate("a", INTERMEDIATE_TTL).unwrap();
        let loaded = Ca::from_pem(inter.cert_pem(), inter.key_pem(), inter.chain_pem().to_vec()).unwrap();
        // A CA issued under a path-length-0 intermediate does not verify as a chain.
        let sub = loaded.issue_intermediate("evil", INTERMEDIATE_TTL).unwrap();
        let id = SpiffeId::workload("trellis.local", "default", "web").unwrap();
        let (leaf, _) = sub.issue_leaf(&id, LEAF_TTL).unwrap();
        let mut chain = certs_from_pem(&leaf.cert_pem).unwrap();
        for c in &leaf.chain_pem {
            chain.extend(certs_from_pem(c).unwrap());
        }
        let bundle = TrustBundle::from_pem("trellis.local", &[root.cert_pem().to_string()]).unwrap();
        let err = bundle.verify(&chain, Usage::Client, &IdMatcher::AnyWorkload, now()).unwrap_err();
        assert!(matches!(err, VerifyError::Chain(_) | VerifyError::UnknownRoot), "{err}");
    }

    #[test]
    fn leaf_ttl_is_capped_by_the_ca() {
        let root = Ca::new_root("trellis.local", Duration::from_secs(3600)).unwrap();
        let id = SpiffeId::workload("trellis.local", "default", "web").unwrap();
        let (leaf, _) = root.issue_leaf(&id, Duration::from_secs(7 * 24 * 3600)).unwrap();
        let (_, not_after) = trellis_proto::tls::validity(&certs_from_pem(&leaf.cert_pem).unwrap()[0]).unwrap();
        assert!(not_after <= SystemTime::now() + Duration::from_secs(3601));
    }
}
