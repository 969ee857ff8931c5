//! The workload certificate: a key made here (it never leaves), a CSR with the SPIFFE ID as its
//! only SAN, `Certificates.Sign` on the control plane, and renewal at half-life.
//!
//! The first certificate is paid for with the workload token. Renewal sends an empty token and
//! authenticates with the current client certificate over mTLS. A renewed certificate is installed
//! in the shared [`IdentityStore`]; every TLS configuration reads it at its next handshake, so
//! renewal needs no restart and established connections are untouched.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use tonic::Code;
use tonic::transport::Channel;
use trellis_proto::pb::certificates_client::CertificatesClient;
use trellis_proto::pb::{SignRequest, SignResponse};
use trellis_proto::tls::{Identity, IdentityStore, certs_from_pem};
use trellis_proto::verify::{SharedBundle, Usage};
use trellis_proto::{IdMatcher, SpiffeId, TrustBundle};

use crate::backoff::Backoff;
use crate::drain::Drain;
use crate::metrics::Metrics;
use crate::routes::bundle_from_proto;

/// Timeout of one `Sign` call.
const SIGN_TIMEOUT: Duration = Duration::from_secs(10);
/// Renewals are never closer together than this, whatever the certificate's dates say.
const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(1);

/// Why no certificate could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "the control plane refused the workload token: {message}; create a new one with \
         `trellis token workload create --namespace {namespace} --service-account {service_account}`"
    )]
    TokenRefused { message: String, namespace: String, service_account: String },
    #[error("the control plane refused to renew the certificate: {0}")]
    RenewalRefused(String),
    #[error("the control plane rejected the signing request: {0}")]
    Rejected(String),
    #[error(
        "the control plane at {addr} did not answer within {secs} s (last error: {last}); check \
         --control-plane and that trellis-cp is running and reachable"
    )]
    Unreachable { addr: String, secs: u64, last: String },
    #[error("the control plane returned an unusable certificate: {0}")]
    BadCertificate(String),
    #[error("cannot create a key or CSR: {0}")]
    Csr(String),
}

/// A failed `Sign` attempt: worth another try or not.
#[derive(Debug)]
enum Attempt {
    Fatal(IdentityError),
    Transient(String),
}

/// A fresh key and the PEM CSR for it.
#[derive(Debug)]
pub struct Csr {
    /// The private key, PKCS#8.
    pub key: PrivateKeyDer<'static>,
    /// The PKCS#10 request.
    pub pem: String,
}

/// Makes a P-256 key and a CSR whose only SAN is `id`.
pub fn make_csr(id: &SpiffeId) -> Result<Csr, IdentityError> {
    let err = |e: rcgen::Error| IdentityError::Csr(e.to_string());
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = CertificateParams::default();
    // rcgen's default subject is a placeholder; the CN is informative only (the SAN identifies).
    let mut dn = DistinguishedName::new();
    let cn: String = id.path().chars().take(64).collect();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    let uri = rcgen::string::Ia5String::try_from(id.to_string()).map_err(err)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let pem = params.serialize_request(&key).map_err(err)?.pem().map_err(err)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok(Csr { key, pem })
}

/// A signed identity, with the trust bundle the control plane sent along (if usable).
#[derive(Debug)]
pub struct Signed {
    /// Certificate chain and key.
    pub identity: Identity,
    /// The federation's current roots.
    pub bundle: Option<TrustBundle>,
}

/// Calls `Certificates.Sign` for one workload identity.
#[derive(Debug, Clone)]
pub struct Signer {
    client: CertificatesClient<Channel>,
    addr: String,
    id: SpiffeId,
    namespace: String,
    service_account: String,
    ttl_seconds: u32,
    bundle: SharedBundle,
    /// Asks for the gateway identity of the control plane's cluster (with a gateway token).
    gateway: bool,
}

impl Signer {
    /// A signer talking to the control plane at `addr` over `channel`.
    pub fn new(
        channel: Channel,
        addr: &str,
        id: SpiffeId,
        namespace: &str,
        service_account: &str,
        ttl_seconds: u32,
        bundle: SharedBundle,
    ) -> Self {
        Self {
            client: CertificatesClient::new(channel),
            addr: addr.to_string(),
            id,
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            ttl_seconds,
            bundle,
            gateway: false,
        }
    }

    /// The same signer asking for the east-west gateway identity (`id` must be it).
    pub fn for_gateway(self) -> Self {
        Self { gateway: true, ..self }
    }

    /// The same signer over another channel (after the first certificate, to present it).
    pub fn with_channel(&self, channel: Channel) -> Self {
        Self { client: CertificatesClient::new(channel), ..self.clone() }
    }

    /// Gets the first certificate with `token`, retrying while the control plane is unreachable
    /// until `deadline`; refusals end at once.
    pub async fn first(&self, token: &str, deadline: Duration) -> Result<Signed, IdentityError> {
        let until = tokio::time::Instant::now() + deadline;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(3));
        loop {
            match self.attempt(token).await {
                Ok(s) => return Ok(s),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Transient(last)) => {
                    let wait = backoff.next_delay();
                    if tokio::time::Instant::now() + wait >= until {
                        return Err(IdentityError::Unreachable {
                            addr: self.addr.clone(),
                            secs: deadline.as_secs(),
                            last,
                        });
                    }
                    tracing::info!(error = %last, retry_in = ?wait, "control plane not answering; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// One signing attempt; an empty `token` means renewal over mTLS.
    async fn attempt(&self, token: &str) -> Result<Signed, Attempt> {
        let csr = make_csr(&self.id).map_err(Attempt::Fatal)?;
        let mut req = tonic::Request::new(SignRequest {
            csr_pem: csr.pem,
            workload_token: token.to_string(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            ttl_seconds: self.ttl_seconds,
            gateway: self.gateway,
        });
        req.set_timeout(SIGN_TIMEOUT);
        let resp = match self.client.clone().sign(req).await {
            Ok(r) => r.into_inner(),
            Err(status) => return Err(self.classify(&status, token.is_empty())),
        };
        self.accept(resp, csr.key).map_err(Attempt::Fatal)
    }

    fn classify(&self, status: &tonic::Status, renewal: bool) -> Attempt {
        let message =
            if status.message().is_empty() { format!("{:?}", status.code()) } else { status.message().to_string() };
        match status.code() {
            Code::Unauthenticated | Code::PermissionDenied if renewal => {
                Attempt::Fatal(IdentityError::RenewalRefused(message))
            }
            Code::Unauthenticated | Code::PermissionDenied => Attempt::Fatal(IdentityError::TokenRefused {
                message,
                namespace: self.namespace.clone(),
                service_account: self.service_account.clone(),
            }),
            Code::InvalidArgument | Code::Unimplemented => Attempt::Fatal(IdentityError::Rejected(message)),
            // Unavailable, deadline, transport errors (Unknown), a control plane without a leader
            // yet: all may pass.
            _ => Attempt::Transient(format!("{:?}: {message}", status.code())),
        }
    }

    /// Checks what came back before anything is installed: our identity, a chain to the roots.
    fn accept(&self, resp: SignResponse, key: PrivateKeyDer<'static>) -> Result<Signed, IdentityError> {
        let bad = |m: String| IdentityError::BadCertificate(m);
        let mut chain = certs_from_pem(&resp.certificate_pem).map_err(|e| bad(e.to_string()))?;
        for pem in &resp.chain_pem {
            chain.extend(certs_from_pem(pem).map_err(|e| bad(e.to_string()))?);
        }
        let bundle = match &resp.trust_bundle {
            Some(pb) => match bundle_from_proto(pb, self.id.trust_domain()) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring the trust bundle of the signing response");
                    None
                }
            },
            None => None,
        };
        let roots = bundle.clone().map(Arc::new).unwrap_or_else(|| self.bundle.load());
        let want = IdMatcher::Exact(self.id.clone());
        for usage in [Usage::Client, Usage::Server] {
            roots.verify(&chain, usage, &want, UnixTime::now()).map_err(|e| bad(e.to_string()))?;
        }
        let identity = Identity::new(chain, key).map_err(|e| bad(e.to_string()))?;
        Ok(Signed { identity, bundle })
    }
}

/// Installs a signed identity and its bundle.
pub fn install(signed: Signed, store: &IdentityStore, bundle: &SharedBundle, metrics: &Metrics) {
    if let Some(b) = signed.bundle {
        bundle.store(b);
    }
    metrics.set_cert_expiry(signed.identity.not_after);
    tracing::info!(
        identity = %signed.identity.id,
        expires = ?signed.identity.not_after,
        "certificate installed"
    );
    store.replace(signed.identity);
}

/// Renews the certificate at half-life until the drain starts. Failures are retried with a
/// jittered backoff; once the certificate has expired the workload token (if any) is used again.
pub async fn renew_forever(
    signer: Signer,
    store: Arc<IdentityStore>,
    bundle: SharedBundle,
    metrics: Arc<Metrics>,
    token: String,
    drain: Drain,
) {
    let mut roots = bundle.subscribe();
    loop {
        let Some(current) = store.current() else { return };
        let wait = current.renew_at().duration_since(SystemTime::now()).unwrap_or_default().max(MIN_RENEW_INTERVAL);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // A root rotation: the control plane now issues under the new root; take a
            // certificate with the new chain at once (hot reload, nothing restarts).
            changed = roots.changed() => {
                if changed.is_ok() {
                    tracing::info!("the trust bundle's roots changed; renewing the certificate now");
                }
            }
            _ = drain.signaled() => return,
        }
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            let expired = SystemTime::now() >= current.not_after;
            let credential = if expired { token.as_str() } else { "" };
            match signer.attempt(credential).await {
                Ok(signed) => {
                    install(signed, &store, &bundle, &metrics);
                    break;
                }
                Err(Attempt::Fatal(e)) => tracing::warn!(error = %e, "certificate renewal refused"),
                Err(Attempt::Transient(e)) => tracing::warn!(error = %e, "certificate renewal failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = drain.signaled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_carries_exactly_the_spiffe_id() {
        let id = SpiffeId::workload("trellis.local", "default", "web").unwrap();
        let csr = make_csr(&id).unwrap();
        let params = rcgen::CertificateSigningRequestParams::from_pem(&csr.pem).unwrap();
        let sans = &params.params.subject_alt_names;
        assert_eq!(sans.len(), 1);
        match &sans[0] {
            SanType::URI(u) => assert_eq!(u.as_str(), "spiffe://trellis.local/ns/default/sa/web"),
            other => panic!("unexpected SAN {other:?}"),
        }
        assert!(matches!(csr.key, PrivateKeyDer::Pkcs8(_)));
    }
}
