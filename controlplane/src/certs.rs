//! Certificate signing: a workload proves who it is (a workload token for its first certificate,
//! its current certificate for renewals) and gets a leaf signed by its cluster's intermediate CA.
//! Failed attempts are rate limited per source address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};
use trellis_federation::ca::{Ca, LEAF_TTL};
use trellis_federation::token::{TokenParts, WORKLOAD_PREFIX};
use trellis_proto::identity::Principal;
use trellis_proto::{SpiffeId, grpc, pb};

use crate::convert::bundle_to_pb;
use crate::metrics::Metrics;
use crate::state::State;
use crate::store::Store;
use crate::unix_now;

/// Failed attempts allowed per source address and window.
const MAX_FAILURES: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Keeps the parsed intermediate CA of this instance's cluster, reloaded when the store's copy
/// changes (rotation), so signing does not parse PEM keys on every request.
pub struct Signer {
    cluster: String,
    /// Where this instance keeps its cluster's CA key when the federation does not hold it (a
    /// cluster that joined keeps its key to itself).
    key_file: Option<std::path::PathBuf>,
    cached: Mutex<Option<(String, Arc<Ca>)>>,
}

impl Signer {
    /// A signer for `cluster`.
    pub fn new(cluster: &str) -> Self {
        Self { cluster: cluster.to_string(), key_file: None, cached: Mutex::new(None) }
    }

    /// A signer for `cluster` whose CA key may be in `key_file`.
    pub fn with_key_file(cluster: &str, key_file: std::path::PathBuf) -> Self {
        Self { cluster: cluster.to_string(), key_file: Some(key_file), cached: Mutex::new(None) }
    }

    /// The cluster this signer signs for.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The cluster's CA key as kept on this instance, when the federation's state does not hold
    /// it (a cluster that joined); what a new instance of the same cluster is handed.
    pub fn local_key_pem(&self, state: &State) -> Option<String> {
        let cluster = state.clusters.get(&self.cluster)?;
        if !cluster.intermediate_key_pem.is_empty() {
            return None;
        }
        std::fs::read_to_string(self.key_file.as_ref()?).ok()
    }

    /// The cluster's CA at `state`.
    pub fn ca(&self, state: &State) -> Result<Arc<Ca>, Status> {
        let cluster = state.clusters.get(&self.cluster).ok_or_else(|| {
            Status::failed_precondition(format!("cluster '{}' is not registered in the federation", self.cluster))
        })?;
        // During a root rotation the new root's certificate cross-signed by the old one rides
        // in every chain, so that peers which do not trust the new root yet accept it.
        let mut chain = vec![cluster.intermediate_cert_pem.clone()];
        if let Some(cross) = state.roots.first().map(|r| &r.cross_cert_pem).filter(|c| !c.is_empty()) {
            chain.push(cross.clone());
        }
        let id: String = chain.concat();
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((pem, ca)) = cached.as_ref()
            && *pem == id
        {
            return Ok(ca.clone());
        }
        let local;
        let key_pem = if cluster.intermediate_key_pem.is_empty() {
            let path = self.key_file.as_ref().ok_or_else(|| {
                Status::failed_precondition(format!("the CA key of cluster '{}' is not on this instance", self.cluster))
            })?;
            local = std::fs::read_to_string(path).map_err(|e| {
                Status::failed_precondition(format!(
                    "the CA key of cluster '{}' cannot be read from {}: {e}",
                    self.cluster,
                    path.display()
                ))
            })?;
            &local
        } else {
            &cluster.intermediate_key_pem
        };
        let ca = Ca::from_pem(&cluster.intermediate_cert_pem, key_pem, chain)
            .map_err(|e| Status::internal(format!("the cluster CA cannot be loaded: {e}")))?;
        let ca = Arc::new(ca);
        *cached = Some((id, ca.clone()));
        Ok(ca)
    }
}

/// When `cluster`'s intermediate CA expires, if the cluster and a readable certificate exist.
pub fn ca_not_after(state: &State, cluster: &str) -> Option<std::time::SystemTime> {
    let c = state.clusters.get(cluster)?;
    let certs = trellis_proto::tls::certs_from_pem(&c.intermediate_cert_pem).ok()?;
    trellis_proto::tls::validity(certs.first()?).ok().map(|(_, not_after)| not_after)
}

/// Counts failed attempts per source address.
#[derive(Default)]
pub struct FailureLimiter(Mutex<HashMap<IpAddr, (u32, Instant)>>);

impl FailureLimiter {
    /// Refuses when `ip` has failed too often recently.
    pub fn check(&self, ip: Option<IpAddr>) -> Result<(), Status> {
        let Some(ip) = ip else { return Ok(()) };
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, since)) = map.get(&ip)
            && *n >= MAX_FAILURES
            && since.elapsed() < FAILURE_WINDOW
        {
            let wait = FAILURE_WINDOW.saturating_sub(since.elapsed()).as_secs() + 1;
            return Err(Status::resource_exhausted(format!(
                "too many failed signing attempts from {ip}; wait {wait} s and check the workload token"
            )));
        }
        Ok(())
    }

    /// Records a failure of `ip`.
    pub fn failed(&self, ip: Option<IpAddr>) {
        let Some(ip) = ip else { return };
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let e = map.entry(ip).or_insert((0, Instant::now()));
        if e.1.elapsed() >= FAILURE_WINDOW {
            *e = (0, Instant::now());
        }
        e.0 += 1;
    }
}

/// The Certificates gRPC service.
pub struct CertificateService {
    pub store: Arc<dyn Store>,
    pub signer: Arc<Signer>,
    pub limiter: FailureLimiter,
    pub metrics: Arc<Metrics>,
}

/// Checks a workload token against the store for `ns`/`sa`. Pure over the state and `now`.
pub fn check_token(state: &State, token: &str, ns: &str, sa: &str, now: u64) -> Result<(), Status> {
    check_any_token(state, token, Some((ns, sa)), now)
}

/// Checks a gateway token (`trellis token gateway create`) for a gateway of `cluster`.
pub fn check_gateway_token(state: &State, token: &str, cluster: &str, now: u64) -> Result<(), Status> {
    check_any_token(state, token, None, now)?;
    let id = TokenParts::parse(token, WORKLOAD_PREFIX).map(|p| p.id).unwrap_or_default();
    match state.workload_tokens.get(&id) {
        Some(t) if t.cluster == cluster => Ok(()),
        Some(t) => Err(Status::permission_denied(format!(
            "gateway token {id} is for a gateway of cluster '{}', and this control plane serves cluster '{cluster}'; \
             create one against a control plane of '{cluster}'",
            t.cluster
        ))),
        None => Err(Status::unauthenticated(format!("gateway token {id} is unknown"))),
    }
}

/// A workload token for `who` (namespace, service account), or a gateway token when `None`.
fn check_any_token(state: &State, token: &str, who: Option<(&str, &str)>, now: u64) -> Result<(), Status> {
    let create = match who {
        Some((ns, sa)) => {
            format!("create one with `trellis token workload create --namespace {ns} --service-account {sa}`")
        }
        None => {
            "create one with `trellis token gateway create` against a control plane of the gateway's cluster".into()
        }
    };
    let parts = TokenParts::parse(token, WORKLOAD_PREFIX)
        .map_err(|e| Status::unauthenticated(format!("workload token refused: {e}; {create}")))?;
    let stored = state
        .workload_tokens
        .get(&parts.id)
        .ok_or_else(|| Status::unauthenticated(format!("workload token {} is unknown; {create}", parts.id)))?;
    if !parts.matches(&stored.secret_hash) {
        return Err(Status::unauthenticated(format!(
            "workload token {} has a wrong secret (mistyped or tampered); {create}",
            parts.id
        )));
    }
    if stored.revoked {
        return Err(Status::unauthenticated(format!("workload token {} was revoked; {create}", parts.id)));
    }
    if stored.expires_at <= now {
        return Err(Status::unauthenticated(format!(
            "workload token {} expired {} s ago; {create}",
            parts.id,
            now - stored.expires_at
        )));
    }
    match who {
        None if !stored.gateway => Err(Status::permission_denied(format!(
            "token {} is a workload token, not a gateway token; {create}",
            parts.id
        ))),
        None => Ok(()),
        Some(_) if stored.gateway => Err(Status::permission_denied(format!(
            "token {} is a gateway token; a workload needs a workload token",
            parts.id
        ))),
        Some((ns, sa)) if stored.namespace != ns || stored.service_account != sa => {
            Err(Status::permission_denied(format!(
                "workload token {} is for namespace '{}' service account '{}', not '{ns}'/'{sa}'",
                parts.id, stored.namespace, stored.service_account
            )))
        }
        Some(_) => Ok(()),
    }
}

#[tonic::async_trait]
impl pb::certificates_server::Certificates for CertificateService {
    async fn sign(&self, req: Request<pb::SignRequest>) -> Result<Response<pb::SignResponse>, Status> {
        let ip = grpc::peer_addr(&req).map(|a| a.ip());
        self.limiter.check(ip)?;
        let peer = grpc::peer_identity(&req);
        let r = req.into_inner();
        let result = self.sign_inner(peer, &r);
        match &result {
            Ok(_) => self.metrics.certs_signed.get_or_create(&vec![("result".into(), "ok".into())]).inc(),
            Err(s) => {
                if matches!(s.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) {
                    self.limiter.failed(ip);
                }
                tracing::info!(namespace = %r.namespace, service_account = %r.service_account, reason = %s.message(), "signing refused");
                self.metrics.certs_signed.get_or_create(&vec![("result".into(), "refused".into())]).inc()
            }
        };
        result.map(Response::new)
    }
}

impl CertificateService {
    fn sign_inner(&self, peer: Option<SpiffeId>, r: &pb::SignRequest) -> Result<pb::SignResponse, Status> {
        let state = self.store.current();
        let td = state.trust_domain().ok_or_else(|| Status::unavailable("the federation is not bootstrapped yet"))?;
        let id = if r.gateway {
            SpiffeId::gateway(td, self.signer.cluster()).map_err(|e| Status::internal(e.to_string()))?
        } else {
            SpiffeId::workload(td, &r.namespace, &r.service_account)
                .map_err(|e| Status::invalid_argument(format!("namespace/service account: {e}")))?
        };
        if r.workload_token.is_empty() {
            // Renewal: the caller's verified certificate must be this same workload.
            match peer {
                Some(p) if p == id => {}
                Some(p) => {
                    if let Principal::Workload { .. } | Principal::Gateway { .. } = p.principal() {
                        return Err(Status::permission_denied(format!("{p} cannot renew the certificate of {id}")));
                    }
                    return Err(Status::permission_denied(format!("{p} is not a workload")));
                }
                None => {
                    return Err(Status::unauthenticated(format!(
                        "no workload token given and no client certificate presented; pass the token with \
                         --token-file or TRELLIS_WORKLOAD_TOKEN (create one with `trellis token workload create \
                         --namespace {} --service-account {}`)",
                        r.namespace, r.service_account
                    )));
                }
            }
        } else if r.gateway {
            check_gateway_token(&state, &r.workload_token, self.signer.cluster(), unix_now())?;
        } else {
            check_token(&state, &r.workload_token, &r.namespace, &r.service_account, unix_now())?;
        }
        let ttl = match r.ttl_seconds {
            0 => LEAF_TTL,
            s => Duration::from_secs(u64::from(s).max(60)),
        };
        let ca = self.signer.ca(&state)?;
        let leaf = ca.sign_csr(&r.csr_pem, &id, ttl).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(pb::SignResponse {
            certificate_pem: leaf.cert_pem,
            chain_pem: leaf.chain_pem,
            trust_bundle: Some(bundle_to_pb(&state)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, WorkloadToken};

    #[test]
    fn token_checks() {
        let (parts, text) = TokenParts::generate(WORKLOAD_PREFIX).unwrap();
        let (_, other) = TokenParts::generate(WORKLOAD_PREFIX).unwrap();
        let tampered = format!("{}.{}", &text[..21], &other[22..]);
        let mut s = State::default();
        let t = WorkloadToken {
            id: parts.id.clone(),
            secret_hash: parts.secret_hash(),
            namespace: "default".into(),
            service_account: "web".into(),
            expires_at: 1_000,
            created_at: 0,
            description: String::new(),
            revoked: false,
            gateway: false,
            cluster: String::new(),
        };
        s.apply(1, &Command::CreateWorkloadToken(t)).unwrap();
        type Case<'a> = (&'a str, &'a str, &'a str, u64, Option<(tonic::Code, &'a str)>);
        let cases: &[Case<'_>] = &[
            (&text, "default", "web", 10, None),
            (&text, "default", "web", 1_000, Some((tonic::Code::Unauthenticated, "expired"))),
            (&text, "default", "api", 10, Some((tonic::Code::PermissionDenied, "is for namespace"))),
            (&other, "default", "web", 10, Some((tonic::Code::Unauthenticated, "unknown"))),
            (&tampered, "default", "web", 10, Some((tonic::Code::Unauthenticated, "wrong secret"))),
            ("", "default", "web", 10, Some((tonic::Code::Unauthenticated, "empty"))),
            ("garbage", "default", "web", 10, Some((tonic::Code::Unauthenticated, "malformed"))),
        ];
        for (tok, ns, sa, now, want) in cases {
            let got = check_token(&s, tok, ns, sa, *now);
            match want {
                None => got.unwrap(),
                Some((code, text)) => {
                    let e = got.unwrap_err();
                    assert_eq!(e.code(), *code, "{}", e.message());
                    assert!(e.message().contains(text), "{}", e.message());
                    assert!(!e.message().contains(&tok[22.min(tok.len())..]) || tok.len() < 22, "secret leaked");
                }
            }
        }
        s.apply(2, &Command::RevokeWorkloadToken { id: parts.id.clone() }).unwrap();
        assert!(check_token(&s, &text, "default", "web", 10).unwrap_err().message().contains("revoked"));
    }

    #[test]
    fn limiter_blocks_after_failures() {
        let l = FailureLimiter::default();
        let ip = Some("127.0.0.9".parse().unwrap());
        for _ in 0..MAX_FAILURES {
            l.check(ip).unwrap();
            l.failed(ip);
        }
        assert_eq!(l.check(ip).unwrap_err().code(), tonic::Code::ResourceExhausted);
        l.check(Some("127.0.0.8".parse().unwrap())).unwrap();
    }
}
