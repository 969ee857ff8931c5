//! The admin API: services, endpoints, workload tokens, proxies and status, for holders of an
//! admin credential (`spiffe://<td>/trellis/admin/<name>`, issued at bootstrap).

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use trellis_federation::token::{TokenParts, WORKLOAD_PREFIX};
use trellis_proto::identity::Principal;
use trellis_proto::{grpc, pb};

use crate::convert::{endpoint_to_pb, service_from_pb, service_to_pb};
use crate::membership::{Group, JOIN_TOKEN_TTL, MAX_JOIN_TOKEN_TTL, new_join_token};
use crate::proxies::ProxyTracker;
use crate::state::{Command, JoinKind, WorkloadToken, validate_service_key};
use crate::store::Store;
use crate::store::raft::MemberChange;
use crate::unix_now;

/// Default and maximum lifetime of a workload token.
pub const WORKLOAD_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
const MAX_WORKLOAD_TOKEN_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

/// The Admin gRPC service.
pub struct AdminService {
    pub store: Arc<dyn Store>,
    /// This cluster's observations waiting for the quorum.
    pub overlay: Arc<crate::overlay::Overlay>,
    pub proxies: Arc<ProxyTracker>,
    pub cluster: String,
    pub node: String,
    /// The Raft group; `None` on the etcd store.
    pub group: Option<Arc<Group>>,
}

fn no_group() -> Status {
    Status::failed_precondition(
        "this control plane runs on the etcd store; its members are etcd's (see `etcdctl member list`)",
    )
}

fn require_admin<T>(req: &Request<T>) -> Result<String, Status> {
    match grpc::peer_identity(req) {
        Some(id) => match id.principal() {
            Principal::Admin { name } => Ok(name.to_string()),
            _ => Err(Status::permission_denied(format!(
                "{id} is not an administrator; use the admin context written at bootstrap"
            ))),
        },
        None => Err(Status::unauthenticated(
            "the admin API needs an admin client certificate; use the context written at bootstrap \
             (`trellis config import <data-dir>/admin/context.yaml`)",
        )),
    }
}

fn token_info(t: &WorkloadToken) -> pb::WorkloadTokenInfo {
    pb::WorkloadTokenInfo {
        id: t.id.clone(),
        namespace: t.namespace.clone(),
        service_account: t.service_account.clone(),
        expires_at: t.expires_at,
        created_at: t.created_at,
        description: t.description.clone(),
        revoked: t.revoked,
        gateway: t.gateway,
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn list_services(
        &self,
        req: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        require_admin(&req)?;
        let ns = req.into_inner().namespace;
        let state = self.store.read().await?;
        let services =
            state.services.values().filter(|s| ns.is_empty() || s.namespace == ns).map(service_to_pb).collect();
        Ok(Response::new(pb::ListServicesResponse { services }))
    }

    async fn apply_service(&self, req: Request<pb::Service>) -> Result<Response<pb::Service>, Status> {
        let who = require_admin(&req)?;
        let svc = service_from_pb(req.get_ref()).map_err(Status::invalid_argument)?;
        let key = svc.key();
        self.store.propose(Command::UpsertService(svc)).await?;
        tracing::info!(admin = %who, service = %key, "service applied");
        let state = self.store.current();
        let s = state.services.get(&key).ok_or_else(|| Status::internal("service vanished after apply"))?;
        Ok(Response::new(service_to_pb(s)))
    }

    async fn delete_service(
        &self,
        req: Request<pb::DeleteServiceRequest>,
    ) -> Result<Response<pb::DeleteServiceResponse>, Status> {
        let who = require_admin(&req)?;
        let r = req.into_inner();
        let key = format!("{}.{}", r.name, if r.namespace.is_empty() { "default" } else { &r.namespace });
        validate_service_key(&key).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.store.propose(Command::DeleteService { key: key.clone() }).await?;
        tracing::info!(admin = %who, service = %key, "service deleted");
        Ok(Response::new(pb::DeleteServiceResponse {}))
    }

    async fn list_endpoints(
        &self,
        req: Request<pb::ListEndpointsRequest>,
    ) -> Result<Response<pb::ListEndpointsResponse>, Status> {
        require_admin(&req)?;
        let service = req.into_inner().service;
        let state = self.store.read().await?;
        let endpoints = state
            .endpoints
            .values()
            .filter(|e| service.is_empty() || e.service == service)
            .map(|e| endpoint_to_pb(&state, e))
            .collect();
        Ok(Response::new(pb::ListEndpointsResponse { endpoints }))
    }

    async fn create_workload_token(
        &self,
        req: Request<pb::CreateWorkloadTokenRequest>,
    ) -> Result<Response<pb::CreateWorkloadTokenResponse>, Status> {
        let who = require_admin(&req)?;
        let r = req.into_inner();
        let ttl = match r.ttl_seconds {
            0 => WORKLOAD_TOKEN_TTL,
            s => Duration::from_secs(s),
        };
        if ttl > MAX_WORKLOAD_TOKEN_TTL {
            return Err(Status::invalid_argument("a workload token lives at most 366 days; use a shorter --ttl"));
        }
        let (parts, text) = TokenParts::generate(WORKLOAD_PREFIX).map_err(|e| Status::internal(e.to_string()))?;
        let now = unix_now();
        if r.gateway && (!r.namespace.is_empty() || !r.service_account.is_empty()) {
            return Err(Status::invalid_argument("a gateway token names no namespace or service account"));
        }
        let token = WorkloadToken {
            id: parts.id.clone(),
            secret_hash: parts.secret_hash(),
            namespace: if r.gateway || !r.namespace.is_empty() { r.namespace } else { "default".into() },
            service_account: r.service_account,
            expires_at: now + ttl.as_secs(),
            created_at: now,
            description: r.description,
            revoked: false,
            gateway: r.gateway,
            cluster: if r.gateway { self.cluster.clone() } else { String::new() },
        };
        self.store.propose(Command::CreateWorkloadToken(token.clone())).await?;
        tracing::info!(admin = %who, token = %token.id, namespace = %token.namespace, service_account = %token.service_account, "workload token created");
        Ok(Response::new(pb::CreateWorkloadTokenResponse { token: text, info: Some(token_info(&token)) }))
    }

    async fn list_workload_tokens(
        &self,
        req: Request<pb::ListWorkloadTokensRequest>,
    ) -> Result<Response<pb::ListWorkloadTokensResponse>, Status> {
        require_admin(&req)?;
        let state = self.store.read().await?;
        Ok(Response::new(pb::ListWorkloadTokensResponse {
            tokens: state.workload_tokens.values().map(token_info).collect(),
        }))
    }

    async fn revoke_workload_token(
        &self,
        req: Request<pb::RevokeWorkloadTokenRequest>,
    ) -> Result<Response<pb::RevokeWorkloadTokenResponse>, Status> {
        let who = require_admin(&req)?;
        let id = req.into_inner().id;
        self.store.propose(Command::RevokeWorkloadToken { id: id.clone() }).await?;
        tracing::info!(admin = %who, token = %id, "workload token revoked");
        Ok(Response::new(pb::RevokeWorkloadTokenResponse {}))
    }

    async fn list_proxies(
        &self,
        req: Request<pb::ListProxiesRequest>,
    ) -> Result<Response<pb::ListProxiesResponse>, Status> {
        require_admin(&req)?;
        let proxies = self
            .proxies
            .list()
            .into_iter()
            .map(|p| pb::ProxyStatus {
                identity: p.identity,
                cluster: p.cluster,
                instance: p.instance,
                acked_version: p.acked_version,
                sent_version: p.sent_version,
                last_nack: p.last_nack,
                connected: p.connected,
                peer_address: p.peer_address,
                view: p.view,
            })
            .collect();
        Ok(Response::new(pb::ListProxiesResponse { proxies }))
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        require_admin(&req)?;
        // Local: status must answer even when the group has no leader.
        let state = self.store.current();
        let raft = self.group.as_ref().map(|g| g.raft.status());
        let ca_expires_in = crate::certs::ca_not_after(&state, &self.cluster)
            .and_then(|na| na.duration_since(std::time::SystemTime::now()).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(Response::new(pb::StatusResponse {
            trust_domain: state.trust_domain().unwrap_or_default().to_string(),
            cluster: self.cluster.clone(),
            node: self.node.clone(),
            revision: state.revision,
            services: state.services.len() as u32,
            endpoints: state.endpoints.len() as u32,
            proxies_connected: self.proxies.connected() as u32,
            version: crate::VERSION.to_string(),
            ca_expires_in,
            raft_role: raft.as_ref().map(|s| s.role.to_string()).unwrap_or_default(),
            raft_term: raft.as_ref().map(|s| s.term).unwrap_or(0),
            raft_leader: raft.as_ref().map(|s| s.leader).unwrap_or(0),
            warnings: {
                let mut w = raft.as_ref().map(|s| voter_warnings(&state, &s.voters)).unwrap_or_default();
                let kept = self.overlay.len();
                if kept > 0 {
                    w.push(format!(
                        "{kept} change(s) observed in cluster {} wait for the group's quorum: this cluster's proxies \
                         are served with them; the other clusters see them once this instance reaches the quorum \
                         again (see `trellis get controlplanes`)",
                        self.cluster
                    ));
                }
                w
            },
        }))
    }

    async fn list_control_planes(
        &self,
        req: Request<pb::ListControlPlanesRequest>,
    ) -> Result<Response<pb::ListControlPlanesResponse>, Status> {
        require_admin(&req)?;
        let group = self.group.as_ref().ok_or_else(no_group)?;
        Ok(Response::new(group.statuses().await))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let who = require_admin(&req)?;
        self.group.as_ref().ok_or_else(no_group)?;
        let r = req.into_inner();
        let kind = if r.new_cluster {
            JoinKind::Cluster
        } else {
            JoinKind::ControlPlane { cluster: if r.cluster.is_empty() { self.cluster.clone() } else { r.cluster } }
        };
        if r.uses > 100 {
            return Err(Status::invalid_argument("--uses must be at most 100"));
        }
        let ttl = match r.ttl_seconds {
            0 => JOIN_TOKEN_TTL,
            s => Duration::from_secs(s),
        };
        if ttl > MAX_JOIN_TOKEN_TTL || ttl < Duration::from_secs(5) {
            return Err(Status::invalid_argument("--ttl must be between 5s and 7d"));
        }
        let state = self.store.read().await?;
        // A new instance of a cluster is best admitted by an instance of the same cluster (which
        // holds the cluster's CA key when the cluster joined): those come first.
        let mut members: Vec<&crate::state::Member> = state.members.values().collect();
        if let JoinKind::ControlPlane { cluster } = &kind {
            members.sort_by_key(|m| m.cluster != *cluster);
        }
        let addresses: Vec<String> = members.iter().map(|m| m.address.clone()).collect();
        if addresses.is_empty() {
            return Err(Status::unavailable("the group has not recorded its members' addresses yet; retry"));
        }
        let (stored, text) = new_join_token(&state, kind.clone(), addresses, ttl, r.uses, &r.description)?;
        let (id, expires_at) = (stored.id.clone(), stored.expires_at);
        self.store.propose(Command::CreateJoinToken(stored)).await?;
        tracing::info!(admin = %who, token = %id, kind = %kind_name(&kind), "join token created");
        Ok(Response::new(pb::CreateJoinTokenResponse { token: text, id, expires_at }))
    }

    async fn list_join_tokens(
        &self,
        req: Request<pb::ListJoinTokensRequest>,
    ) -> Result<Response<pb::ListJoinTokensResponse>, Status> {
        require_admin(&req)?;
        let state = self.store.read().await?;
        let tokens = state
            .join_tokens
            .values()
            .map(|t| pb::JoinTokenInfo {
                id: t.id.clone(),
                kind: kind_name(&t.kind),
                expires_at: t.expires_at,
                created_at: t.created_at,
                uses_left: t.uses_left,
                revoked: t.revoked,
                description: t.description.clone(),
            })
            .collect();
        Ok(Response::new(pb::ListJoinTokensResponse { tokens }))
    }

    async fn revoke_join_token(
        &self,
        req: Request<pb::RevokeJoinTokenRequest>,
    ) -> Result<Response<pb::RevokeJoinTokenResponse>, Status> {
        let who = require_admin(&req)?;
        let id = req.into_inner().id;
        self.store.propose(Command::RevokeJoinToken { id: id.clone() }).await?;
        tracing::info!(admin = %who, token = %id, "join token revoked");
        Ok(Response::new(pb::RevokeJoinTokenResponse {}))
    }

    async fn list_clusters(
        &self,
        req: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        require_admin(&req)?;
        let state = self.store.read().await?;
        let status = self.group.as_ref().map(|g| g.raft.status());
        // Liveness: which control planes answer now (each asked with a short deadline).
        let answering: Vec<(String, bool)> = match &self.group {
            Some(g) => g.statuses().await.members.into_iter().map(|m| (m.cluster, m.error.is_empty())).collect(),
            None => Vec::new(),
        };
        let clusters = state
            .clusters
            .values()
            .map(|c| {
                let members: Vec<u64> = state.members.values().filter(|m| m.cluster == c.name).map(|m| m.id).collect();
                let up = answering.iter().filter(|(cluster, ok)| *cluster == c.name && *ok).count();
                let voters =
                    status.as_ref().map(|s| members.iter().filter(|m| s.voters.contains(m)).count()).unwrap_or(0);
                pb::ClusterInfo {
                    name: c.name.clone(),
                    region: c.region.clone(),
                    created_at: c.created_at,
                    members: members.len() as u32,
                    voters: voters as u32,
                    endpoints: state.endpoints.values().filter(|e| e.cluster == c.name).count() as u32,
                    services_exported: state
                        .services
                        .values()
                        .filter(|s| {
                            s.exported && state.endpoints.values().any(|e| e.cluster == c.name && e.service == s.key())
                        })
                        .count() as u32,
                    ca_expires_at: crate::certs::ca_not_after(&state, &c.name)
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                    members_up: up as u32,
                    gateways: c.gateways.values().cloned().collect(),
                    via_gateways: c.reached_via_gateways(),
                    status: match (members.len(), up) {
                        _ if self.group.is_none() => String::new(),
                        (0, _) => "no control plane".into(),
                        (n, u) if u == n => "up".into(),
                        (_, 0) => "unreachable".into(),
                        _ => "degraded".into(),
                    },
                }
            })
            .collect();
        Ok(Response::new(pb::ListClustersResponse { clusters }))
    }

    async fn remove_control_plane(
        &self,
        req: Request<pb::RemoveControlPlaneRequest>,
    ) -> Result<Response<pb::RemoveControlPlaneResponse>, Status> {
        let who = require_admin(&req)?;
        let group = self.group.as_ref().ok_or_else(no_group)?;
        let state = self.store.read().await?;
        let member = group.find(&state, &req.get_ref().name)?;
        let status = group.raft.status();
        if status.leader == member.id {
            // The leader hands over first, so the group does not lose its leader mid-change.
            let to = status
                .voters
                .iter()
                .copied()
                .find(|v| *v != member.id)
                .ok_or_else(|| Status::failed_precondition("the last voter cannot be removed"))?;
            transfer(group, to).await?;
        }
        group.raft.change_membership(MemberChange::Remove(member.id), None).await?;
        tracing::info!(admin = %who, member = %member.name, cluster = %member.cluster, "control plane removed");
        Ok(Response::new(pb::RemoveControlPlaneResponse {}))
    }

    async fn rotate_root(
        &self,
        req: Request<pb::RotateRootRequest>,
    ) -> Result<Response<pb::RotateRootResponse>, Status> {
        use trellis_federation::ca::{Ca, MAX_LEAF_TTL, ROOT_TTL, root_name};
        let who = require_admin(&req)?;
        let r = req.into_inner();
        let state = self.store.read().await?;
        let mut reissued = 0;
        if r.finish {
            let min_age_secs = if r.force { 0 } else { MAX_LEAF_TTL.as_secs() };
            self.store.propose(Command::FinishRootRotation { now: unix_now(), min_age_secs }).await?;
            tracing::info!(admin = %who, forced = r.force, "root rotation finished: the old root is no longer trusted");
        } else {
            let td =
                state.trust_domain().ok_or_else(|| Status::unavailable("the federation is not bootstrapped yet"))?;
            let current =
                state.roots.first().ok_or_else(|| Status::failed_precondition("the federation has no root"))?;
            if state.roots.len() > 1 {
                return Err(Status::failed_precondition(format!(
                    "a rotation is under way ({} roots trusted); finish it first with `trellis ca rotate --finish`",
                    state.roots.len()
                )));
            }
            let old = Ca::from_pem(&current.cert_pem, &current.key_pem, Vec::new())
                .map_err(|e| Status::internal(format!("the current root cannot be loaded: {e}")))?;
            let generation = current.generation.max(1) + 1;
            let new = Ca::new_root_generation(td, generation, ROOT_TTL).map_err(|e| Status::internal(e.to_string()))?;
            let cross = old
                .cross_sign(new.cert_pem(), &root_name(td, generation))
                .map_err(|e| Status::internal(format!("cross-signing the new root: {e}")))?;
            let mut intermediates = std::collections::BTreeMap::new();
            for (name, c) in &state.clusters {
                let cert = new.resign_intermediate(&c.intermediate_cert_pem, name).map_err(|e| {
                    Status::internal(format!("issuing cluster {name}'s intermediate under the new root: {e}"))
                })?;
                intermediates.insert(name.clone(), cert);
            }
            reissued = intermediates.len() as u32;
            let root = crate::state::RootCa {
                cert_pem: new.cert_pem().to_string(),
                key_pem: new.key_pem().to_string(),
                created_at: unix_now(),
                cross_cert_pem: cross,
                generation,
            };
            self.store.propose(Command::RotateRoot { root, intermediates }).await?;
            tracing::info!(admin = %who, generation, clusters = reissued, "root rotation started");
        }
        let state = self.store.read().await?;
        let root_pins = state
            .roots
            .iter()
            .filter_map(|r| {
                trellis_proto::tls::certs_from_pem(&r.cert_pem).ok()?.first().map(trellis_proto::tls::cert_pin)
            })
            .collect();
        Ok(Response::new(pb::RotateRootResponse { root_pins, intermediates_reissued: reissued }))
    }

    async fn set_cluster_reach(
        &self,
        req: Request<pb::SetClusterReachRequest>,
    ) -> Result<Response<pb::SetClusterReachResponse>, Status> {
        let who = require_admin(&req)?;
        let r = req.into_inner();
        if !self.store.read().await?.clusters.contains_key(&r.name) {
            return Err(Status::not_found(format!(
                "no cluster named '{}' in the federation; `trellis cluster list` shows them",
                r.name
            )));
        }
        self.store.propose(Command::SetClusterReach { cluster: r.name.clone(), via_gateways: r.via_gateways }).await?;
        tracing::info!(admin = %who, cluster = %r.name, via_gateways = r.via_gateways, "cluster reach set");
        let gateways = self
            .store
            .current()
            .clusters
            .get(&r.name)
            .map(|c| c.gateways.values().cloned().collect())
            .unwrap_or_default();
        Ok(Response::new(pb::SetClusterReachResponse { gateways }))
    }

    async fn remove_cluster(
        &self,
        req: Request<pb::RemoveClusterRequest>,
    ) -> Result<Response<pb::RemoveClusterResponse>, Status> {
        let who = require_admin(&req)?;
        let group = self.group.as_ref().ok_or_else(no_group)?;
        let name = req.into_inner().name;
        let state = self.store.read().await?;
        if !state.clusters.contains_key(&name) {
            return Err(Status::not_found(format!("no cluster named '{name}'; see `trellis cluster list`")));
        }
        if state.clusters.len() == 1 {
            return Err(Status::failed_precondition(format!(
                "'{name}' is the federation's only cluster; there is nothing to remove it from"
            )));
        }
        if name == self.cluster {
            return Err(Status::failed_precondition(format!(
                "this control plane belongs to cluster '{name}'; ask a control plane of another cluster to remove it \
                 (`trellis --context <other> cluster remove {name}`)"
            )));
        }
        let endpoints = state.endpoints.values().filter(|e| e.cluster == name).count() as u32;
        let mut removed = Vec::new();
        // Its instances leave the group one by one; a leader among them hands over first, to a
        // voter of another cluster.
        for m in state.members.values().filter(|m| m.cluster == name) {
            let status = group.raft.status();
            if status.leader == m.id {
                let to = status
                    .voters
                    .iter()
                    .copied()
                    .filter(|v| state.members.get(v).is_none_or(|o| o.cluster != name))
                    .max_by_key(|v| status.matched.get(v).copied().unwrap_or(0))
                    .ok_or_else(|| {
                        Status::failed_precondition(format!("every voter is in cluster '{name}'; it cannot be removed"))
                    })?;
                transfer(group, to).await?;
            }
            group.raft.change_membership(MemberChange::Remove(m.id), None).await.map_err(|e| {
                Status::unavailable(format!(
                    "removing control plane {}/{} from the group: {e}; nothing else was removed, retry when the \
                     group has a quorum (`trellis get controlplanes`)",
                    m.cluster, m.name
                ))
            })?;
            removed.push(format!("{}/{}", m.cluster, m.name));
        }
        self.store.propose(Command::RemoveCluster { name: name.clone() }).await?;
        tracing::info!(admin = %who, cluster = %name, control_planes = ?removed, endpoints, "cluster removed");
        Ok(Response::new(pb::RemoveClusterResponse { removed_control_planes: removed, removed_endpoints: endpoints }))
    }

    async fn transfer_leadership(
        &self,
        req: Request<pb::TransferLeadershipRequest>,
    ) -> Result<Response<pb::TransferLeadershipResponse>, Status> {
        let who = require_admin(&req)?;
        let group = self.group.as_ref().ok_or_else(no_group)?;
        let status = group.raft.status();
        let to = if req.get_ref().to.is_empty() {
            status
                .voters
                .iter()
                .copied()
                .find(|v| *v != status.leader)
                .ok_or_else(|| Status::failed_precondition("there is no other voter to hand leadership to"))?
        } else {
            let state = self.store.current();
            let m = group.find(&state, &req.get_ref().to)?;
            if !status.voters.contains(&m.id) {
                return Err(Status::failed_precondition(format!("{} is not a voter", m.name)));
            }
            m.id
        };
        let leader = transfer(group, to).await?;
        tracing::info!(admin = %who, leader = format!("{leader:x}"), "leadership transferred");
        Ok(Response::new(pb::TransferLeadershipResponse { leader }))
    }
}

/// Placement warnings for the voters `voters`, named by cluster.
fn voter_warnings(state: &crate::state::State, voters: &[u64]) -> Vec<String> {
    let mut by_cluster = std::collections::BTreeMap::new();
    for v in voters {
        let cluster = state.members.get(v).map(|m| m.cluster.clone()).unwrap_or_else(|| "(unknown)".into());
        *by_cluster.entry(cluster).or_insert(0) += 1;
    }
    trellis_federation::placement::voter_warnings(&by_cluster)
}

fn kind_name(k: &JoinKind) -> String {
    match k {
        JoinKind::Cluster => "cluster".into(),
        JoinKind::ControlPlane { cluster } => format!("controlplane:{cluster}"),
    }
}

/// Asks for leadership to move to `to` and waits until it has (at most 5 s).
async fn transfer(group: &Group, to: u64) -> Result<u64, Status> {
    if group.raft.status().leader == to {
        return Ok(to);
    }
    group.raft.transfer_leader(to);
    let mut rx = group.raft.watch_status();
    match tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.leader == to)).await {
        Ok(Ok(_)) => Ok(to),
        _ => Err(Status::unavailable(format!(
            "leadership did not move to {to:x} within 5 s (is it caught up and reachable?); retry"
        ))),
    }
}
