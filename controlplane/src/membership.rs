//! Joining the control-plane group with one token.
//!
//! A join token is printed once by `trellis controlplane token create`. Besides its secret it
//! carries what a new instance needs to find and trust the group: the members' addresses, the
//! trust domain and the SHA-256 pin of the root CA. The new instance dials a member, accepts it
//! only if it presents the pinned root and a control-plane identity, and sends the token with a
//! CSR. The member checks the token, signs the CSR for the new instance's control-plane identity,
//! adds it to the group as a learner (the leader promotes it to voter once it has caught up) and
//! answers with its Raft id, certificate, trust bundle and the member directory.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use trellis_federation::token::TokenParts;
use trellis_proto::verify::IdMatcher;
use trellis_proto::{SpiffeId, grpc, pb};

use crate::certs::{FailureLimiter, Signer};
use crate::state::{Cluster, Command, JoinKind, JoinToken, Member, State};
use crate::store::Store;
use crate::store::raft::{RaftHandle, new_member_id_for};
use crate::unix_now;
use trellis_proto::identity::validate_name;

/// How the TLS verifier words a server that lacks the pinned root (see
/// `trellis_proto::tls::PinnedServerVerifier`).
const PIN_MISMATCH: &str = "did not present the trust anchor pinned by the join token";

/// Kind prefix of the secret inside a join token.
pub const JOIN_PREFIX: &str = "tjt1";
/// Prefix of the printable join token.
const TOKEN_PREFIX: &str = "trellis-join-v1.";
/// Default and maximum lifetime of a join token.
pub const JOIN_TOKEN_TTL: Duration = Duration::from_secs(3600);
pub const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// What a printable join token holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinTicket {
    /// The secret, `tjt1.<id>.<secret>`.
    pub token: String,
    pub trust_domain: String,
    /// SHA-256 of the root CA certificate (DER), hex.
    pub pin: String,
    /// The cluster the new instance joins; empty for a token that admits a new cluster.
    #[serde(default)]
    pub cluster: String,
    /// Addresses of members to dial.
    pub addresses: Vec<String>,
}

impl JoinTicket {
    /// The printable form.
    pub fn encode(&self) -> String {
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).unwrap_or_default()))
    }

    /// Parses the printable form.
    pub fn decode(text: &str) -> Result<Self, String> {
        let bad = "the join token is malformed: use the whole text printed by `trellis controlplane token create`";
        let body = text.trim().strip_prefix(TOKEN_PREFIX).ok_or(bad)?;
        let json = URL_SAFE_NO_PAD.decode(body).map_err(|_| bad)?;
        let t: Self = serde_json::from_slice(&json).map_err(|_| bad)?;
        TokenParts::parse(&t.token, JOIN_PREFIX).map_err(|_| bad)?;
        if t.addresses.is_empty() || t.pin.len() != 64 {
            return Err(bad.into());
        }
        Ok(t)
    }
}

/// Creates a join token (for a control-plane instance of an existing cluster, or for a new
/// cluster); returns the stored token and the printable ticket.
pub fn new_join_token(
    state: &State,
    kind: JoinKind,
    addresses: Vec<String>,
    ttl: Duration,
    uses: u32,
    description: &str,
) -> Result<(JoinToken, String), Status> {
    let cluster = match &kind {
        JoinKind::ControlPlane { cluster } => {
            if !state.clusters.contains_key(cluster) {
                return Err(Status::not_found(format!("cluster '{cluster}' is not part of the federation")));
            }
            cluster.clone()
        }
        JoinKind::Cluster => String::new(),
    };
    let td = state.trust_domain().ok_or_else(|| Status::unavailable("the federation is not bootstrapped yet"))?;
    let root = state.roots.first().ok_or_else(|| Status::unavailable("no root CA"))?;
    let der = trellis_proto::tls::certs_from_pem(&root.cert_pem)
        .map_err(|e| Status::internal(format!("root CA: {e}")))?
        .into_iter()
        .next()
        .ok_or_else(|| Status::internal("root CA has no certificate"))?;
    let (parts, secret) = TokenParts::generate(JOIN_PREFIX).map_err(|e| Status::internal(e.to_string()))?;
    let now = unix_now();
    let stored = JoinToken {
        id: parts.id.clone(),
        secret_hash: parts.secret_hash(),
        kind,
        expires_at: now + ttl.as_secs(),
        created_at: now,
        description: description.to_string(),
        revoked: false,
        uses_left: uses.max(1),
    };
    let ticket = JoinTicket {
        token: secret,
        trust_domain: td.to_string(),
        pin: trellis_proto::tls::cert_pin(&der),
        cluster,
        addresses,
    };
    Ok((stored, ticket.encode()))
}

/// Checks a join token's secret for what it is used for: `Some(cluster)` for a control-plane
/// instance of that cluster, `None` for a new cluster. Returns the token's id.
pub fn check_join_token(state: &State, token: &str, for_cluster: Option<&str>, now: u64) -> Result<String, Status> {
    let create = match for_cluster {
        Some(_) => "create a new one with `trellis controlplane token create`",
        None => "create a new one with `trellis token create` on a cluster of the federation",
    };
    let parts = TokenParts::parse(token, JOIN_PREFIX)
        .map_err(|e| Status::unauthenticated(format!("join token refused: {e}; {create}")))?;
    let stored = state
        .join_tokens
        .get(&parts.id)
        .ok_or_else(|| Status::unauthenticated(format!("join token {} is unknown; {create}", parts.id)))?;
    if !parts.matches(&stored.secret_hash) {
        return Err(Status::unauthenticated(format!(
            "join token {} has a wrong secret (mistyped or tampered); {create}",
            parts.id
        )));
    }
    if stored.revoked {
        return Err(Status::unauthenticated(format!("join token {} was revoked; {create}", parts.id)));
    }
    if stored.expires_at <= now {
        return Err(Status::unauthenticated(format!(
            "join token {} expired {} s ago; {create}",
            parts.id,
            now - stored.expires_at
        )));
    }
    match (&stored.kind, for_cluster) {
        // Uses are counted by the write that admits the instance (a learner whose answer was lost
        // may come back with the same token).
        (JoinKind::ControlPlane { cluster: c }, Some(cluster)) if c == cluster => Ok(parts.id),
        (JoinKind::ControlPlane { cluster: c }, Some(cluster)) => Err(Status::permission_denied(format!(
            "join token {} admits a control plane of cluster '{c}', not '{cluster}'; start with --cluster {c}",
            parts.id
        ))),
        (JoinKind::ControlPlane { cluster: c }, None) => Err(Status::permission_denied(format!(
            "join token {} admits another control plane of cluster '{c}', not a new cluster",
            parts.id
        ))),
        (JoinKind::Cluster, None) if stored.uses_left == 0 => {
            Err(Status::unauthenticated(format!("join token {} was already used; {create}", parts.id)))
        }
        (JoinKind::Cluster, None) => Ok(parts.id),
        (JoinKind::Cluster, Some(cluster)) => Err(Status::permission_denied(format!(
            "join token {} admits a new cluster, but cluster '{cluster}' is already in the federation; choose \
             a new --cluster name, or use `trellis controlplane token create` to add an instance to '{cluster}'",
            parts.id
        ))),
    }
}

/// The Membership gRPC service.
pub struct MembershipService {
    pub store: Arc<dyn Store>,
    pub raft: RaftHandle,
    pub limiter: FailureLimiter,
    /// This instance's signer: its own cluster's CA, whose key a cluster that joined keeps on
    /// its instances only.
    pub signer: Arc<Signer>,
}

fn check_address(address: &str) -> Result<(), Status> {
    if address.parse::<std::net::SocketAddr>().is_err()
        && address.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none()
    {
        return Err(Status::invalid_argument(format!(
            "address '{address}' is not host:port; set --advertise on the new instance"
        )));
    }
    Ok(())
}

fn member_to_pb(m: &Member) -> pb::GroupMember {
    pb::GroupMember { id: m.id, name: m.name.clone(), cluster: m.cluster.clone(), address: m.address.clone() }
}

#[tonic::async_trait]
impl pb::membership_server::Membership for MembershipService {
    async fn join_cluster(
        &self,
        req: Request<pb::JoinClusterRequest>,
    ) -> Result<Response<pb::JoinClusterResponse>, Status> {
        let ip = grpc::peer_addr(&req).map(|a| a.ip());
        let r = req.into_inner();
        self.limited(ip, &r.cluster, &r.node, self.join_cluster(&r)).await
    }

    async fn join_control_plane(
        &self,
        req: Request<pb::JoinControlPlaneRequest>,
    ) -> Result<Response<pb::JoinControlPlaneResponse>, Status> {
        let ip = grpc::peer_addr(&req).map(|a| a.ip());
        let r = req.into_inner();
        self.limited(ip, &r.cluster, &r.node, self.join(&r)).await
    }
}

impl MembershipService {
    /// Runs one join attempt from `ip` under the failure limiter: refused proofs count against
    /// the source, and every refusal is logged with its reason.
    async fn limited<T>(
        &self,
        ip: Option<std::net::IpAddr>,
        cluster: &str,
        node: &str,
        attempt: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        self.limiter.check(ip)?;
        let result = attempt.await;
        if let Err(s) = &result {
            if matches!(s.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) {
                self.limiter.failed(ip);
            }
            tracing::info!(%cluster, %node, reason = %s.message(), "join refused");
        }
        result.map(Response::new)
    }

    async fn join_cluster(&self, r: &pb::JoinClusterRequest) -> Result<pb::JoinClusterResponse, Status> {
        let state = self.store.read().await?;
        let now = unix_now();
        validate_name(&r.cluster).map_err(|e| Status::invalid_argument(format!("cluster name: {e}")))?;
        validate_name(&r.region).map_err(|e| Status::invalid_argument(format!("region: {e}")))?;
        validate_name(&r.node).map_err(|e| Status::invalid_argument(format!("node name: {e}")))?;
        check_address(&r.address)?;
        // A retry of a join whose answer was lost: the cluster is registered with this token, the
        // token's last use went to it. The same request (the same CA key) gets the same answer.
        if let Some(c) = state.clusters.get(&r.cluster)
            && !c.join_token.is_empty()
            && TokenParts::parse(&r.token, JOIN_PREFIX).is_ok_and(|p| {
                p.id == c.join_token
                    && state
                        .join_tokens
                        .get(&p.id)
                        .is_some_and(|t| p.matches(&t.secret_hash) && !t.revoked && t.expires_at > now)
            })
        {
            let same_key = trellis_federation::ca::csr_key_matches_cert(&r.ca_csr_pem, &c.intermediate_cert_pem)
                .map_err(|e| Status::invalid_argument(format!("intermediate CA request: {e}")))?;
            if !same_key {
                return Err(Status::already_exists(format!(
                    "cluster '{}' joined with this token already, with another CA key; a cluster that lost its \
                     data directory must be removed and joined again with a new token",
                    r.cluster
                )));
            }
            return self.admit_first_instance(r, c.intermediate_cert_pem.clone()).await;
        }
        let token_id = check_join_token(&state, &r.token, None, now)?;
        state.trust_domain().ok_or_else(|| Status::unavailable("the federation is not bootstrapped yet"))?;
        if state.clusters.contains_key(&r.cluster) {
            return Err(Status::already_exists(format!(
                "a cluster named '{}' is already in the federation; choose another --cluster",
                r.cluster
            )));
        }
        let root = state.roots.first().ok_or_else(|| Status::unavailable("no root CA"))?;
        let root_ca = trellis_federation::Ca::from_pem(&root.cert_pem, &root.key_pem, Vec::new())
            .map_err(|e| Status::internal(format!("root CA: {e}")))?;
        let cert = root_ca
            .sign_intermediate_csr(&r.ca_csr_pem, &r.cluster, trellis_federation::ca::INTERMEDIATE_TTL)
            .map_err(|e| Status::invalid_argument(format!("intermediate CA request: {e}")))?;
        let cluster = Cluster {
            name: r.cluster.clone(),
            region: r.region.clone(),
            intermediate_cert_pem: cert.clone(),
            // The key stays in the new cluster.
            intermediate_key_pem: String::new(),
            created_at: now,
            join_token: token_id.clone(),
            gateways: Default::default(),
            via_gateways: false,
            reach_pinned: false,
        };
        // One write consumes the token and registers the cluster: two joins racing for the last
        // use cannot both win, whatever member they reach.
        self.store.propose(Command::JoinCluster { token_id: token_id.clone(), now, cluster }).await.map_err(
            |e| match e {
                crate::store::StoreError::Rejected(a) => Status::unauthenticated(format!("join refused: {a}")),
                other => other.into(),
            },
        )?;
        tracing::info!(cluster = %r.cluster, region = %r.region, token = %token_id, "cluster registered");
        self.admit_first_instance(r, cert).await
    }

    /// Adds the first instance of a new cluster as a learner (or finds it there after a retry).
    async fn admit_first_instance(
        &self,
        r: &pb::JoinClusterRequest,
        cert: String,
    ) -> Result<pb::JoinClusterResponse, Status> {
        let state = self.store.current();
        let td = state.trust_domain().unwrap_or_default().to_string();
        let member_id = match state.member_named(&r.cluster, &r.node) {
            Some(m) => m.id,
            None => {
                let member_id = new_member_id_for(&state);
                let member = Member {
                    id: member_id,
                    name: r.node.clone(),
                    cluster: r.cluster.clone(),
                    address: r.address.clone(),
                    // A retry of this join is bound to the cluster's CA key instead.
                    key_pin: String::new(),
                };
                self.raft.add_learner(member).await?;
                member_id
            }
        };
        tracing::info!(cluster = %r.cluster, node = %r.node, "first instance of the cluster added as learner");
        let state = self.store.current();
        Ok(pb::JoinClusterResponse {
            id: member_id,
            intermediate_cert_pem: cert,
            trust_bundle_pem: state.roots.iter().map(|r| r.cert_pem.as_str()).collect(),
            trust_domain: td.to_string(),
            members: state.members.values().map(member_to_pb).collect(),
        })
    }

    async fn join(&self, r: &pb::JoinControlPlaneRequest) -> Result<pb::JoinControlPlaneResponse, Status> {
        // A token created a moment ago on another member must be visible here: read linearizably.
        let state = self.store.read().await?;
        let token_id = check_join_token(&state, &r.token, Some(&r.cluster), unix_now())?;
        let td = state.trust_domain().ok_or_else(|| Status::unavailable("the federation is not bootstrapped yet"))?;
        let id = SpiffeId::control_plane(td, &r.cluster, &r.node)
            .map_err(|e| Status::invalid_argument(format!("cluster/node name: {e}")))?;
        check_address(&r.address)?;
        let key_pin = trellis_federation::ca::csr_key_pin(&r.csr_pem)
            .map_err(|e| Status::invalid_argument(format!("certificate request: {e}")))?;
        let member_id = match state.member_named(&r.cluster, &r.node) {
            // A retry of a join whose answer was lost: the learner is still waiting, and the retry
            // comes with the key it joined with (a spent token buys nothing else).
            Some(m) if self.is_learner(m.id) && m.key_pin == key_pin => m.id,
            Some(m) if self.is_learner(m.id) => {
                return Err(Status::permission_denied(format!(
                    "control plane {}/{} already joined with another key; only that instance may retry. To replace \
                     it, remove it (`trellis controlplane remove {}/{}`) and use a new token",
                    r.cluster, r.node, r.cluster, r.node
                )));
            }
            Some(m) => {
                return Err(Status::already_exists(format!(
                    "control plane {}/{} is already a voting member ({:x}); a restarted instance keeps its data \
                     directory and needs no token. To replace it, remove it first: `trellis controlplane remove {}/{}`",
                    r.cluster, r.node, m.id, r.cluster, r.node
                )));
            }
            None => new_member_id_for(&state),
        };
        // An instance of the same cluster signs with the key it keeps; any instance can sign for
        // a cluster whose key the federation holds. Others send the joiner to the next address.
        let own = r.cluster == self.signer.cluster();
        let ca = if own { self.signer.ca(&state) } else { Signer::new(&r.cluster).ca(&state) }.map_err(|e| {
            Status::failed_precondition(format!(
                "this control plane cannot sign for cluster '{}' ({}); an instance of that cluster can",
                r.cluster,
                e.message()
            ))
        })?;
        let leaf = ca
            .sign_csr(&r.csr_pem, &id, trellis_federation::ca::LEAF_TTL)
            .map_err(|e| Status::invalid_argument(format!("certificate request: {e}")))?;
        if !self.is_learner(member_id) {
            // One use of the token per admitted instance (a retry for a waiting learner is free).
            let consume =
                Command::ConsumeJoinToken { token_id: token_id.clone(), now: unix_now(), cluster: r.cluster.clone() };
            self.store.propose(consume).await.map_err(|e| match e {
                crate::store::StoreError::Rejected(a) => Status::unauthenticated(format!("join refused: {a}")),
                other => other.into(),
            })?;
            let member = Member {
                id: member_id,
                name: r.node.clone(),
                cluster: r.cluster.clone(),
                address: r.address.clone(),
                key_pin: key_pin.clone(),
            };
            self.raft.add_learner(member).await?;
        }
        tracing::info!(cluster = %r.cluster, node = %r.node, id = format!("{member_id:x}"), "control plane joined as learner");
        let state = self.store.current();
        Ok(pb::JoinControlPlaneResponse {
            id: member_id,
            cert_chain_pem: std::iter::once(leaf.cert_pem).chain(leaf.chain_pem).collect(),
            trust_bundle_pem: state.roots.iter().map(|r| r.cert_pem.as_str()).collect(),
            trust_domain: td.to_string(),
            members: state.members.values().map(member_to_pb).collect(),
            cluster_ca_key_pem: if own { self.signer.local_key_pem(&state).unwrap_or_default() } else { String::new() },
        })
    }

    fn is_learner(&self, id: u64) -> bool {
        self.raft.status().learners.contains(&id)
    }
}

/// What a new instance received when it joined.
pub struct Joined {
    pub id: u64,
    pub chain_pem: String,
    pub key_pem: String,
    pub trust_bundle_pem: String,
    pub trust_domain: String,
    pub members: Vec<Member>,
    /// A new cluster: its intermediate CA (certificate, key), to keep in the data directory.
    pub cluster_ca: Option<(String, String)>,
    /// The address of the member that admitted it.
    pub answered_by: String,
}

/// Joins the group with `ticket` as `cluster/node`, reachable at `address`: as another instance
/// of an existing cluster (a control-plane token), or as the first instance of a new cluster in
/// `region` (a cluster token). Tries each address in the ticket until one answers.
pub async fn join(
    ticket: &JoinTicket,
    cluster: &str,
    region: &str,
    node: &str,
    address: &str,
    progress: crate::app::Progress<'_>,
) -> Result<Joined, String> {
    let new_cluster = ticket.cluster.is_empty();
    if !new_cluster && ticket.cluster != cluster {
        return Err(format!(
            "this join token is for cluster '{}', but this instance is configured for '{cluster}'; start it with \
             --cluster {}",
            ticket.cluster, ticket.cluster
        ));
    }
    let tls = trellis_proto::tls::pinned_client_config(
        &ticket.pin,
        &ticket.trust_domain,
        IdMatcher::AnyControlPlane,
        &[b"h2"],
    )
    .map_err(|e| e.to_string())?;
    let id = SpiffeId::control_plane(&ticket.trust_domain, cluster, node).map_err(|e| e.to_string())?;
    let call = if new_cluster {
        // The cluster's CA key and this instance's key are made here and never sent.
        let (ca_csr_pem, ca_key_pem) = trellis_federation::ca::new_ca_csr(cluster).map_err(|e| e.to_string())?;
        Call::Cluster(
            pb::JoinClusterRequest {
                token: ticket.token.clone(),
                cluster: cluster.to_string(),
                region: region.to_string(),
                ca_csr_pem,
                node: node.to_string(),
                address: address.to_string(),
            },
            ca_key_pem,
            id,
        )
    } else {
        let (csr_pem, key_pem) = trellis_federation::ca::new_csr(&id).map_err(|e| e.to_string())?;
        Call::ControlPlane(
            pb::JoinControlPlaneRequest {
                token: ticket.token.clone(),
                csr_pem,
                cluster: cluster.to_string(),
                node: node.to_string(),
                address: address.to_string(),
            },
            key_pem,
        )
    };
    // A member busy with another membership change, or a group between leaders, answers
    // Unavailable: try the addresses again for a while.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match join_once(ticket, &tls, &call).await {
            Ok(j) => return Ok(j),
            Err((msg, false)) => return Err(msg),
            Err((msg, true)) if tokio::time::Instant::now() >= deadline => return Err(msg),
            Err((msg, true)) => {
                tracing::info!(reason = %msg, "the group cannot admit this instance yet; retrying");
                progress(&format!("the group cannot admit this instance yet ({msg}); retrying"));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The join call to make, with the keys that stay here.
enum Call {
    ControlPlane(pb::JoinControlPlaneRequest, String),
    /// Request, the cluster CA's key, this instance's identity.
    Cluster(pb::JoinClusterRequest, String, SpiffeId),
}

fn members_from_pb(members: Vec<pb::GroupMember>) -> Vec<Member> {
    members
        .into_iter()
        .map(|m| Member { id: m.id, name: m.name, cluster: m.cluster, address: m.address, key_pin: String::new() })
        .collect()
}

impl Call {
    async fn make(
        &self,
        client: &mut pb::membership_client::MembershipClient<tonic::transport::Channel>,
    ) -> Result<Joined, Status> {
        match self {
            Call::ControlPlane(req, key_pem) => {
                let r = client.join_control_plane(req.clone()).await?.into_inner();
                // The roots ride along, as on every control plane's serving chain, so that the
                // next instance joining with a pinned token accepts this one too.
                Ok(Joined {
                    id: r.id,
                    chain_pem: r.cert_chain_pem + &r.trust_bundle_pem,
                    key_pem: key_pem.clone(),
                    trust_bundle_pem: r.trust_bundle_pem,
                    trust_domain: r.trust_domain,
                    members: members_from_pb(r.members),
                    // The cluster's key, from another instance of it (empty cert: it is in the
                    // state already).
                    cluster_ca: (!r.cluster_ca_key_pem.is_empty()).then(|| (String::new(), r.cluster_ca_key_pem)),
                    answered_by: String::new(),
                })
            }
            Call::Cluster(req, ca_key_pem, id) => {
                let r = client.join_cluster(req.clone()).await?.into_inner();
                // The new cluster signs its own control-plane certificate.
                let ca = trellis_federation::Ca::from_pem(
                    &r.intermediate_cert_pem,
                    ca_key_pem,
                    vec![r.intermediate_cert_pem.clone()],
                )
                .map_err(|e| Status::internal(format!("the signed intermediate CA is unusable: {e}")))?;
                let (leaf, key_pem) = ca
                    .issue_leaf(id, trellis_federation::ca::LEAF_TTL)
                    .map_err(|e| Status::internal(format!("issuing this instance's certificate: {e}")))?;
                let chain_pem = std::iter::once(leaf.cert_pem.as_str())
                    .chain(leaf.chain_pem.iter().map(String::as_str))
                    .chain(std::iter::once(r.trust_bundle_pem.as_str()))
                    .collect();
                Ok(Joined {
                    id: r.id,
                    chain_pem,
                    key_pem,
                    trust_bundle_pem: r.trust_bundle_pem,
                    trust_domain: r.trust_domain,
                    members: members_from_pb(r.members),
                    cluster_ca: Some((r.intermediate_cert_pem, ca_key_pem.clone())),
                    answered_by: String::new(),
                })
            }
        }
    }
}

/// One round over the ticket's addresses; the error says whether a retry may help.
async fn join_once(
    ticket: &JoinTicket,
    tls: &Arc<rustls::ClientConfig>,
    call: &Call,
) -> Result<Joined, (String, bool)> {
    let mut errors = Vec::new();
    let mut pin_mismatches = Vec::new();
    for addr in &ticket.addresses {
        let channel = match grpc::channel(addr, tls.clone()) {
            Ok(c) => c,
            Err(e) => {
                errors.push(format!("{addr}: {e}"));
                continue;
            }
        };
        let mut client = pb::membership_client::MembershipClient::new(channel);
        let answer = tokio::time::timeout(Duration::from_secs(15), call.make(&mut client))
            .await
            .unwrap_or_else(|_| Err(Status::unavailable("no answer within 15 s")));
        match answer {
            Ok(mut j) => {
                j.answered_by = addr.clone();
                return Ok(j);
            }
            // Refusals are final: another member would say the same.
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unauthenticated
                        | tonic::Code::PermissionDenied
                        | tonic::Code::InvalidArgument
                        | tonic::Code::AlreadyExists
                        | tonic::Code::Internal
                ) =>
            {
                return Err((s.message().to_string(), false));
            }
            // This server is not of the federation the token names: try the others.
            Err(s) if s.message().contains(PIN_MISMATCH) => pin_mismatches.push(addr.clone()),
            Err(s) => errors.push(format!("{addr}: {}", s.message())),
        }
    }
    if errors.is_empty() && !pin_mismatches.is_empty() {
        // No address is of that federation: no retry changes that.
        return Err((
            format!(
                "the control plane at {} does not present the root CA pinned by the join token: the token belongs \
                 to another federation, or the address is not a Trellis control plane",
                pin_mismatches.join(", ")
            ),
            false,
        ));
    }
    errors.extend(pin_mismatches.iter().map(|a| format!("{a}: does not present the root CA pinned by the join token")));
    Err((format!("no member of the group admitted this instance: {}", errors.join("; ")), true))
}

/// The control-plane group as the admin API sees it.
pub struct Group {
    pub raft: RaftHandle,
    pub peers: Arc<crate::store::raft::transport::Peers>,
    /// Client TLS with this instance's identity, expecting control-plane servers.
    pub tls: Arc<rustls::ClientConfig>,
    pub state: tokio::sync::watch::Receiver<Arc<State>>,
}

impl Group {
    /// Finds a member by `node` or `cluster/node`.
    pub fn find(&self, state: &State, name: &str) -> Result<Member, Status> {
        let found: Vec<&Member> = match name.split_once('/') {
            Some((c, n)) => state.members.values().filter(|m| m.cluster == c && m.name == n).collect(),
            None => state.members.values().filter(|m| m.name == name).collect(),
        };
        match found.as_slice() {
            [m] => Ok((*m).clone()),
            [] => Err(Status::not_found(format!("no control plane named '{name}'; see `trellis get controlplanes`"))),
            _ => Err(Status::invalid_argument(format!("'{name}' names several control planes; write cluster/node"))),
        }
    }

    /// Every member's status: this one's directly, the others' over the peer service.
    pub async fn statuses(&self) -> pb::ListControlPlanesResponse {
        let state = self.state.borrow().clone();
        let me = self.raft.status();
        let mut ids: Vec<u64> = me.voters.iter().chain(me.learners.iter()).copied().collect();
        ids.extend(state.members.keys().copied());
        ids.sort_unstable();
        ids.dedup();
        let asks = ids.iter().map(|id| {
            let id = *id;
            let member = self.peers.get(id);
            let tls = self.tls.clone();
            let local = id == me.id;
            let state = state.clone();
            let me = me.clone();
            let peers = self.peers.clone();
            async move {
                if local {
                    return (id, member, Ok(crate::store::raft::transport::member_status(&me, &state, &peers)));
                }
                let Some(m) = member.clone() else { return (id, member, Err("address unknown".to_string())) };
                let ask = async {
                    let channel = grpc::channel(&m.address, tls).map_err(|e| e.to_string())?;
                    let mut client = pb::peer_client::PeerClient::new(channel);
                    client
                        .member_status(pb::MemberStatusRequest {})
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|s| s.message().to_string())
                };
                let r = tokio::time::timeout(Duration::from_secs(2), ask)
                    .await
                    .unwrap_or_else(|_| Err("no answer within 2 s".into()));
                (id, member, r)
            }
        });
        let answers = futures::future::join_all(asks).await;
        let leader = answers.iter().filter_map(|(_, _, r)| r.as_ref().ok()).find(|s| s.role == "leader").cloned();
        let mut out = pb::ListControlPlanesResponse {
            leader: leader.as_ref().map(|l| l.id).unwrap_or(0),
            term: leader.as_ref().map(|l| l.term).unwrap_or(me.term),
            members: Vec::new(),
        };
        for (id, member, r) in answers {
            let membership = if me.voters.contains(&id) {
                "voter"
            } else if me.learners.contains(&id) {
                "learner"
            } else {
                "none"
            };
            let mut s = pb::ControlPlaneStatus {
                id,
                name: member.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
                cluster: member.as_ref().map(|m| m.cluster.clone()).unwrap_or_default(),
                address: member.as_ref().map(|m| m.address.clone()).unwrap_or_default(),
                membership: membership.into(),
                leader: out.leader == id,
                ..Default::default()
            };
            match r {
                Ok(st) => {
                    s.role = st.role;
                    s.term = st.term;
                    s.commit = st.commit;
                    s.applied = st.applied;
                    s.state_hash = st.state_hash;
                    if let Some(l) = &leader {
                        let matched = l.matched.get(&id).copied().unwrap_or(st.last_index);
                        s.lag = l.last_index.saturating_sub(matched);
                    }
                }
                Err(e) => s.error = e,
            }
            out.members.push(s);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_round_trip_and_garbage_is_refused() {
        let (_, token) = TokenParts::generate(JOIN_PREFIX).unwrap();
        let t = JoinTicket {
            token,
            trust_domain: "mesh.local".into(),
            pin: "ab".repeat(32),
            cluster: "east".into(),
            addresses: vec!["127.0.0.1:7443".into()],
        };
        let text = t.encode();
        let back = JoinTicket::decode(&text).unwrap();
        assert_eq!((back.cluster.as_str(), back.addresses.len()), ("east", 1));
        for bad in ["", "trellis-join-v1.", "trellis-join-v1.!!!", &text[..text.len() - 8], "twt1.abc.def"] {
            let e = JoinTicket::decode(bad).unwrap_err();
            assert!(e.contains("malformed"), "{bad}: {e}");
        }
    }
}
