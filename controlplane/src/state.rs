//! The replicated state machine: the federation's settings and trust material, clusters,
//! services, endpoints and workload tokens, changed only by applying [`Command`]s in log order.
//!
//! `apply` is deterministic (every timestamp travels inside the command), validates before it
//! changes anything, and leaves the state untouched when it refuses a command. The store that
//! orders commands (the Raft group, or etcd) calls it; nothing else mutates a `State`.

use std::collections::BTreeMap;

use imbl::{OrdMap, OrdSet, Vector};
use serde::{Deserialize, Serialize};
use trellis_proto::identity::validate_name;

/// How many recent changes are kept to answer delta requests; older subscribers get a full view.
pub const CHANGELOG_LEN: usize = 16_384;

/// Application protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    #[default]
    Http,
    Grpc,
}

impl Protocol {
    /// Parses the wire form ("" means http).
    pub fn parse(s: &str) -> Result<Self, ApplyError> {
        match s {
            "" | "http" => Ok(Self::Http),
            "tcp" => Ok(Self::Tcp),
            "grpc" => Ok(Self::Grpc),
            other => Err(ApplyError::Invalid(format!("protocol '{other}' is not one of tcp, http, grpc"))),
        }
    }

    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
            Self::Grpc => "grpc",
        }
    }
}

/// A root certificate authority of the federation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootCa {
    pub cert_pem: String,
    /// Secret: kept only in the store, which is readable by the control plane alone.
    pub key_pem: String,
    pub created_at: u64,
    /// This root's certificate issued by the root it replaced (empty for the first root): it
    /// rides in certificate chains so that peers which trust only the old root accept them.
    #[serde(default)]
    pub cross_cert_pem: String,
    /// 1 for the federation's first root, then one more per rotation (0 in older states: 1).
    #[serde(default)]
    pub generation: u32,
}

/// A cluster of the federation with its intermediate CA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub name: String,
    pub region: String,
    pub intermediate_cert_pem: String,
    /// Empty for a cluster that joined: its key stays in that cluster.
    pub intermediate_key_pem: String,
    pub created_at: u64,
    /// The join token it joined with (empty for the first cluster).
    #[serde(default)]
    pub join_token: String,
    /// Its east-west gateways that are connected: instance name → address other clusters dial.
    #[serde(default)]
    pub gateways: BTreeMap<String, String>,
    /// Other clusters reach it only through its gateways: set when its first gateway registers
    /// and kept when they all go away, so that its endpoints are then unreachable from outside
    /// (callers fail over) rather than dialled directly across networks.
    #[serde(default)]
    pub via_gateways: bool,
    /// `via_gateways` was set by an administrator (`trellis cluster reach`): gateway
    /// registrations no longer change it.
    #[serde(default)]
    pub reach_pinned: bool,
}

/// Federation-wide settings, set once at bootstrap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Federation {
    pub trust_domain: String,
    pub created_at: u64,
}

/// A service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
}

/// A service, keyed by `name.namespace`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub ports: Vec<ServicePort>,
    pub protocol: Protocol,
    pub exported: bool,
    pub revision: u64,
    /// Virtual IPv4 address in [`SERVICE_VIPS`], the same in every cluster: in transparent mode an
    /// application connects to `vip:port` and its proxy takes the connection. Given by the state
    /// machine when the service is first created, kept for its life.
    #[serde(default)]
    pub vip: String,
}

impl Cluster {
    /// A cluster record with only a name and a region (tests).
    #[cfg(test)]
    pub(crate) fn named(name: &str, region: &str) -> Self {
        Self {
            name: name.into(),
            region: region.into(),
            intermediate_cert_pem: String::new(),
            intermediate_key_pem: String::new(),
            created_at: 0,
            join_token: String::new(),
            gateways: Default::default(),
            via_gateways: false,
            reach_pinned: false,
        }
    }

    /// Whether other clusters reach it only through its gateways. A cluster recorded before the
    /// flag existed counts as such when it has gateways (unless an administrator pinned it).
    pub fn reached_via_gateways(&self) -> bool {
        self.via_gateways || (!self.reach_pinned && !self.gateways.is_empty())
    }
}

impl Service {
    /// `name.namespace`.
    pub fn key(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }
}

/// The range service virtual addresses come from: `198.19.0.0/16` (part of the benchmarking
/// block 198.18.0.0/15, never routed on the internet). Only proxies in transparent mode use it,
/// and only inside a workload's network namespace.
pub const SERVICE_VIPS: (std::net::Ipv4Addr, u8) = (std::net::Ipv4Addr::new(198, 19, 0, 0), 16);

/// A free virtual address for `key`: a hash of the name picks the first candidate (so a service
/// re-created gets the same address when it is free), the next free one otherwise. `.0` and
/// `.255` of each /24 are skipped.
fn allocate_vip(key: &str, taken: &std::collections::HashSet<String>) -> Option<String> {
    let base = u32::from(SERVICE_VIPS.0);
    let size = 1u32 << (32 - SERVICE_VIPS.1);
    let h = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let start = (h % u64::from(size)) as u32;
    (0..size).map(|i| (start + i) % size).filter(|o| !matches!(o & 0xff, 0 | 255)).find_map(|o| {
        let ip = std::net::Ipv4Addr::from(base + o).to_string();
        (!taken.contains(&ip)).then_some(ip)
    })
}

/// One workload behind one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// `<cluster>/<namespace>/<service>/<instance>`.
    pub id: String,
    /// `name.namespace`.
    pub service: String,
    pub cluster: String,
    pub zone: String,
    pub address: String,
    pub identity: String,
    pub healthy: bool,
    pub weight: u32,
    pub revision: u64,
    /// The control-plane instance (`cluster/node`) the proxy registered through; only it marks
    /// the endpoint unhealthy when the proxy goes away.
    #[serde(default)]
    pub registrar: String,
}

/// A workload token as stored: the secret only as a hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadToken {
    pub id: String,
    pub secret_hash: String,
    pub namespace: String,
    pub service_account: String,
    pub expires_at: u64,
    pub created_at: u64,
    pub description: String,
    pub revoked: bool,
    /// A token for an east-west gateway (namespace and service account empty): it proves the
    /// gateway identity of `cluster`, and only a control plane of that cluster accepts it.
    #[serde(default)]
    pub gateway: bool,
    /// The cluster of a gateway token.
    #[serde(default)]
    pub cluster: String,
}

/// A member of the control-plane Raft group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Raft id, never reused.
    pub id: u64,
    /// Instance name (`--node`), unique within its cluster.
    pub name: String,
    pub cluster: String,
    /// Where the other members reach its gRPC listener.
    pub address: String,
    /// SHA-256 of the public key it joined with (control-plane token joins): a retry of a join
    /// whose answer was lost must come with the same key.
    #[serde(default)]
    pub key_pin: String,
}

/// What a join token admits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinKind {
    /// Another control-plane instance of an existing cluster.
    ControlPlane { cluster: String },
    /// A new cluster (its name chosen by the joiner).
    Cluster,
}

/// A join token as stored: the secret only as a hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub id: String,
    pub secret_hash: String,
    pub kind: JoinKind,
    pub expires_at: u64,
    pub created_at: u64,
    pub description: String,
    pub revoked: bool,
    /// Joins it still admits; 0 once used up.
    #[serde(default = "one")]
    pub uses_left: u32,
}

fn one() -> u32 {
    1
}

/// A change to the state. Every field a replica needs is inside, including times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Creates the federation with its first root and first cluster.
    Bootstrap {
        federation: Federation,
        root: RootCa,
        cluster: Cluster,
    },
    UpsertService(Service),
    DeleteService {
        key: String,
    },
    /// Registers or updates an endpoint; creates its service (cluster-local) if it is unknown.
    UpsertEndpoint {
        endpoint: Endpoint,
        protocol: Protocol,
    },
    /// Sets an endpoint's health; with `registrar`, only while the endpoint is still registered
    /// through that instance (a proxy that moved to another instance is left alone).
    SetEndpointHealth {
        id: String,
        healthy: bool,
        #[serde(default)]
        registrar: Option<String>,
    },
    /// Deletes an endpoint; `registrar` as for `SetEndpointHealth`.
    DeleteEndpoint {
        id: String,
        #[serde(default)]
        registrar: Option<String>,
    },
    CreateWorkloadToken(WorkloadToken),
    RevokeWorkloadToken {
        id: String,
    },
    /// Records (or updates the address of) a member of the control-plane group. Membership itself
    /// changes through Raft configuration changes; this is the directory that names the ids.
    SetMember(Member),
    /// Forgets a member removed from the group.
    RemoveMember {
        id: u64,
    },
    CreateJoinToken(JoinToken),
    RevokeJoinToken {
        id: String,
    },
    /// Consumes one use of a control-plane join token for `cluster`.
    ConsumeJoinToken {
        token_id: String,
        now: u64,
        cluster: String,
    },
    /// Consumes one use of a cluster join token and registers the new cluster, in one write: a
    /// token is never used more often than it allows, whatever member the joins reach.
    JoinCluster {
        token_id: String,
        /// When the join was asked for (Unix seconds), to check the expiry deterministically.
        now: u64,
        cluster: Cluster,
    },
    /// Removes a cluster whose control planes have left the group: its endpoints go, unused join
    /// tokens for its control planes are revoked, and its intermediate CA leaves the registry (its
    /// certificates still chain to the root until a root rotation re-issues only the others).
    RemoveCluster {
        name: String,
    },
    /// Starts a root rotation: `root` becomes the signing root (first in `roots`), the previous
    /// ones stay trusted, and every cluster's intermediate CA gets `intermediates[cluster]`, a
    /// certificate for its unchanged key issued by the new root.
    RotateRoot {
        root: RootCa,
        intermediates: BTreeMap<String, String>,
    },
    /// Ends a rotation: only the signing root stays trusted. Refused before every leaf issued
    /// under an older root can have expired (`now` is checked against the new root's age).
    FinishRootRotation {
        now: u64,
        min_age_secs: u64,
    },
    /// Records (or with no address, forgets) an east-west gateway of a cluster, as its control
    /// plane observes it connect and go away.
    SetGateway {
        cluster: String,
        instance: String,
        address: Option<String>,
        /// With no address: forget the gateway only if it is still registered at this address
        /// (a gateway that reconnected meanwhile keeps its new registration).
        #[serde(default)]
        only_if: Option<String>,
    },
    /// Sets how other clusters reach a cluster: through its gateways, or directly; pinned.
    SetClusterReach {
        cluster: String,
        via_gateways: bool,
    },
    /// Does nothing; used to check that the log is writable.
    Noop,
}

/// Why a command was refused. The state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ApplyError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

/// A key whose resource changed, for computing deltas.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChangeKey {
    Service(String),
    Endpoint(String),
    Trust,
}

/// The whole replicated state at one revision.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(from = "StateWire")]
pub struct State {
    /// Index of the last applied log entry.
    pub revision: u64,
    pub federation: Option<Federation>,
    pub roots: Vec<RootCa>,
    pub clusters: OrdMap<String, Cluster>,
    pub services: OrdMap<String, Service>,
    /// Endpoints by id. Changed only by [`State::apply`], which keeps `by_service` in step.
    pub endpoints: OrdMap<String, Endpoint>,
    pub workload_tokens: OrdMap<String, WorkloadToken>,
    /// Members of the control-plane group, by Raft id.
    #[serde(default)]
    pub members: OrdMap<u64, Member>,
    #[serde(default)]
    pub join_tokens: OrdMap<String, JoinToken>,
    /// Recent changes (revision, key), oldest first; rebuilt empty after a restart.
    #[serde(skip)]
    pub changes: Vector<(u64, ChangeKey)>,
    /// The newest revision some of whose changes have left `changes` (0: none have).
    #[serde(skip)]
    pub changes_dropped_through: u64,
    /// Endpoint ids by service: a proxy's scoped view and a service's changes cost what the
    /// service has, not the whole registry. Derived; rebuilt when a snapshot is read.
    #[serde(skip)]
    by_service: OrdMap<String, OrdSet<String>>,
}

/// [`State`] as snapshots hold it (without what is derived).
#[derive(Deserialize)]
struct StateWire {
    revision: u64,
    federation: Option<Federation>,
    roots: Vec<RootCa>,
    clusters: OrdMap<String, Cluster>,
    services: OrdMap<String, Service>,
    endpoints: OrdMap<String, Endpoint>,
    workload_tokens: OrdMap<String, WorkloadToken>,
    #[serde(default)]
    members: OrdMap<u64, Member>,
    #[serde(default)]
    join_tokens: OrdMap<String, JoinToken>,
}

impl From<StateWire> for State {
    fn from(w: StateWire) -> Self {
        let mut by_service: OrdMap<String, OrdSet<String>> = OrdMap::new();
        for e in w.endpoints.values() {
            by_service.entry(e.service.clone()).or_default().insert(e.id.clone());
        }
        State {
            revision: w.revision,
            federation: w.federation,
            roots: w.roots,
            clusters: w.clusters,
            services: w.services,
            endpoints: w.endpoints,
            workload_tokens: w.workload_tokens,
            members: w.members,
            join_tokens: w.join_tokens,
            changes: Vector::new(),
            changes_dropped_through: 0,
            by_service,
        }
    }
}

/// Validates `name.namespace`.
pub fn validate_service_key(key: &str) -> Result<(), ApplyError> {
    let (name, ns) = key
        .split_once('.')
        .ok_or_else(|| ApplyError::Invalid(format!("service '{key}' must be written name.namespace")))?;
    validate_name(name).map_err(|e| ApplyError::Invalid(format!("service name: {e}")))?;
    validate_name(ns).map_err(|e| ApplyError::Invalid(format!("service namespace: {e}")))?;
    Ok(())
}

fn validate_address(addr: &str) -> Result<(), ApplyError> {
    addr.parse::<std::net::SocketAddr>()
        .map(|_| ())
        .map_err(|_| ApplyError::Invalid(format!("endpoint address '{addr}' must be ip:port")))
}

impl State {
    /// The virtual address of service `key`: the one it has, or a free one.
    fn vip_for(&self, key: &str) -> Option<String> {
        if let Some(kept) = self.services.get(key).map(|s| s.vip.clone()).filter(|v| !v.is_empty()) {
            return Some(kept);
        }
        let taken: std::collections::HashSet<String> = self.services.values().map(|s| s.vip.clone()).collect();
        allocate_vip(key, &taken)
    }

    /// The trust domain, once bootstrapped.
    pub fn trust_domain(&self) -> Option<&str> {
        self.federation.as_ref().map(|f| f.trust_domain.as_str())
    }

    /// Endpoints of one service.
    pub fn endpoints_of<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Endpoint> + 'a {
        self.by_service.get(service).into_iter().flat_map(|ids| ids.iter().filter_map(|id| self.endpoints.get(id)))
    }

    fn insert_endpoint(&mut self, ep: Endpoint) {
        if let Some(old) = self.endpoints.get(&ep.id)
            && old.service != ep.service
        {
            let (id, service) = (old.id.clone(), old.service.clone());
            self.unindex(&service, &id);
        }
        self.by_service.entry(ep.service.clone()).or_default().insert(ep.id.clone());
        self.endpoints.insert(ep.id.clone(), ep);
    }

    fn remove_endpoint(&mut self, id: &str) {
        if let Some(old) = self.endpoints.remove(id) {
            self.unindex(&old.service, id);
        }
    }

    fn unindex(&mut self, service: &str, id: &str) {
        if let Some(ids) = self.by_service.get_mut(service) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_service.remove(service);
            }
        }
    }

    /// Changes after `since`, or `None` when the changelog no longer reaches back that far.
    pub fn changes_since(&self, since: u64) -> Option<Vec<ChangeKey>> {
        if since >= self.revision {
            return Some(Vec::new());
        }
        let oldest = self.changes.front().map(|(r, _)| *r)?;
        // A revision may record many changes (a gateway of a big cluster): when the window cut
        // through the middle of one, `oldest` alone would not show that part of it is gone.
        if oldest > since + 1 || since < self.changes_dropped_through {
            return None;
        }
        // The log is in revision order: read it from the newest end and stop at `since`, rather
        // than the whole window (every session asks after every commit, usually for one change).
        let mut keys: Vec<ChangeKey> =
            self.changes.iter().rev().take_while(|(r, _)| *r > since).map(|(_, k)| k.clone()).collect();
        keys.sort();
        keys.dedup();
        Some(keys)
    }

    fn record(&mut self, key: ChangeKey) {
        self.changes.push_back((self.revision, key));
        while self.changes.len() > CHANGELOG_LEN {
            if let Some((r, _)) = self.changes.pop_front() {
                self.changes_dropped_through = self.changes_dropped_through.max(r);
            }
        }
    }

    /// Applies the command at log index `index`. On error the state is unchanged except for
    /// `revision`, which always advances so every replica agrees on the applied index.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Result<(), ApplyError> {
        self.revision = index;
        match cmd {
            Command::Noop => Ok(()),
            Command::Bootstrap { federation, root, cluster } => {
                if self.federation.is_some() {
                    return Err(ApplyError::Conflict("the federation is already bootstrapped".into()));
                }
                validate_name(&cluster.name).map_err(|e| ApplyError::Invalid(e.to_string()))?;
                self.federation = Some(federation.clone());
                self.roots = vec![root.clone()];
                self.clusters.insert(cluster.name.clone(), cluster.clone());
                self.record(ChangeKey::Trust);
                Ok(())
            }
            Command::UpsertService(svc) => {
                let key = svc.key();
                validate_service_key(&key)?;
                if svc.ports.iter().any(|p| p.port == 0) {
                    return Err(ApplyError::Invalid(format!("service {key}: port 0 is not a valid port")));
                }
                let mut svc = svc.clone();
                svc.revision = index;
                svc.vip = self.vip_for(&key).ok_or_else(|| {
                    ApplyError::Invalid(format!(
                        "service {key}: every virtual address of {}/{} is taken; delete unused services",
                        SERVICE_VIPS.0, SERVICE_VIPS.1
                    ))
                })?;
                self.services.insert(key.clone(), svc);
                self.record(ChangeKey::Service(key));
                Ok(())
            }
            Command::DeleteService { key } => {
                if self.services.remove(key).is_none() {
                    return Err(ApplyError::NotFound(format!("service {key}")));
                }
                let ids: Vec<String> = self.endpoints_of(key).map(|e| e.id.clone()).collect();
                for id in ids {
                    self.remove_endpoint(&id);
                    self.record(ChangeKey::Endpoint(id));
                }
                self.record(ChangeKey::Service(key.clone()));
                Ok(())
            }
            Command::UpsertEndpoint { endpoint, protocol } => {
                validate_service_key(&endpoint.service)?;
                validate_address(&endpoint.address)?;
                if endpoint.id.is_empty() {
                    return Err(ApplyError::Invalid("endpoint id is empty".into()));
                }
                if !self.services.contains_key(&endpoint.service) {
                    let (name, ns) = endpoint.service.split_once('.').unwrap_or_default();
                    let svc = Service {
                        name: name.to_string(),
                        namespace: ns.to_string(),
                        ports: Vec::new(),
                        protocol: *protocol,
                        exported: false,
                        revision: index,
                        // None left: the service works, only not in transparent mode.
                        vip: self.vip_for(&endpoint.service).unwrap_or_default(),
                    };
                    self.services.insert(endpoint.service.clone(), svc);
                    self.record(ChangeKey::Service(endpoint.service.clone()));
                }
                let mut ep = endpoint.clone();
                ep.revision = index;
                ep.weight = ep.weight.max(1);
                if self.endpoints.get(&ep.id).map(|old| {
                    let mut o = old.clone();
                    o.revision = index;
                    o == ep
                }) == Some(true)
                {
                    // Unchanged re-registration (proxy reconnect): no change to push.
                    return Ok(());
                }
                let id = ep.id.clone();
                self.insert_endpoint(ep);
                self.record(ChangeKey::Endpoint(id));
                Ok(())
            }
            Command::SetEndpointHealth { id, healthy, registrar } => {
                let Some(ep) = self.endpoints.get_mut(id) else {
                    return Err(ApplyError::NotFound(format!("endpoint {id}")));
                };
                if ep.healthy == *healthy || registrar.as_ref().is_some_and(|r| *r != ep.registrar) {
                    return Ok(());
                }
                ep.healthy = *healthy;
                ep.revision = index;
                self.record(ChangeKey::Endpoint(id.clone()));
                Ok(())
            }
            Command::DeleteEndpoint { id, registrar } => {
                match self.endpoints.get(id) {
                    None => return Err(ApplyError::NotFound(format!("endpoint {id}"))),
                    Some(ep) if registrar.as_ref().is_some_and(|r| *r != ep.registrar) => return Ok(()),
                    Some(_) => self.remove_endpoint(id),
                };
                self.record(ChangeKey::Endpoint(id.clone()));
                Ok(())
            }
            Command::CreateWorkloadToken(t) => {
                if t.gateway {
                    if !t.namespace.is_empty() || !t.service_account.is_empty() {
                        return Err(ApplyError::Invalid(
                            "a gateway token names no namespace or service account".into(),
                        ));
                    }
                } else {
                    validate_name(&t.namespace).map_err(|e| ApplyError::Invalid(e.to_string()))?;
                    validate_name(&t.service_account).map_err(|e| ApplyError::Invalid(e.to_string()))?;
                }
                if self.workload_tokens.contains_key(&t.id) {
                    return Err(ApplyError::Conflict(format!("workload token {} already exists", t.id)));
                }
                self.workload_tokens.insert(t.id.clone(), t.clone());
                Ok(())
            }
            Command::RevokeWorkloadToken { id } => {
                let Some(t) = self.workload_tokens.get_mut(id) else {
                    return Err(ApplyError::NotFound(format!("workload token {id}")));
                };
                t.revoked = true;
                Ok(())
            }
            Command::SetMember(m) => {
                if m.id == 0 {
                    return Err(ApplyError::Invalid("member id 0 is reserved by raft".into()));
                }
                validate_name(&m.name).map_err(|e| ApplyError::Invalid(format!("member name: {e}")))?;
                validate_name(&m.cluster).map_err(|e| ApplyError::Invalid(format!("member cluster: {e}")))?;
                if let Some(other) =
                    self.members.values().find(|o| o.id != m.id && o.name == m.name && o.cluster == m.cluster)
                {
                    return Err(ApplyError::Conflict(format!(
                        "control plane {}/{} is already member {:x}; remove it first",
                        m.cluster, m.name, other.id
                    )));
                }
                self.members.insert(m.id, m.clone());
                Ok(())
            }
            Command::RemoveMember { id } => {
                if self.members.remove(id).is_none() {
                    return Err(ApplyError::NotFound(format!("member {id:x}")));
                }
                Ok(())
            }
            Command::CreateJoinToken(t) => {
                if self.join_tokens.contains_key(&t.id) {
                    return Err(ApplyError::Conflict(format!("join token {} exists", t.id)));
                }
                self.join_tokens.insert(t.id.clone(), t.clone());
                Ok(())
            }
            Command::RevokeJoinToken { id } => {
                let Some(t) = self.join_tokens.get_mut(id) else {
                    return Err(ApplyError::NotFound(format!("join token {id}")));
                };
                t.revoked = true;
                Ok(())
            }
            Command::ConsumeJoinToken { token_id, now, cluster } => {
                let kind = JoinKind::ControlPlane { cluster: cluster.clone() };
                self.check_join_use(token_id, *now, &kind)?;
                self.spend_join_use(token_id);
                Ok(())
            }
            Command::RotateRoot { root, intermediates } => {
                if self.roots.is_empty() {
                    return Err(ApplyError::Invalid("the federation has no root to rotate".into()));
                }
                if self.roots.iter().any(|r| r.cert_pem == root.cert_pem) {
                    return Err(ApplyError::Conflict("this root is already in the trust bundle".into()));
                }
                if self.roots.len() > 1 {
                    return Err(ApplyError::Conflict(format!(
                        "a rotation is under way ({} roots trusted); finish it first with `trellis ca rotate --finish`",
                        self.roots.len()
                    )));
                }
                let missing: Vec<&String> = self.clusters.keys().filter(|c| !intermediates.contains_key(*c)).collect();
                if !missing.is_empty() || intermediates.keys().any(|c| !self.clusters.contains_key(c)) {
                    return Err(ApplyError::Conflict(format!(
                        "the clusters changed while the rotation was prepared (missing: {missing:?}); run it again"
                    )));
                }
                for (name, cert) in intermediates {
                    if let Some(c) = self.clusters.get_mut(name) {
                        c.intermediate_cert_pem = cert.clone();
                    }
                }
                self.roots.insert(0, root.clone());
                self.record(ChangeKey::Trust);
                Ok(())
            }
            Command::FinishRootRotation { now, min_age_secs } => {
                let Some(current) = self.roots.first() else {
                    return Err(ApplyError::Invalid("the federation has no root".into()));
                };
                if self.roots.len() == 1 {
                    return Err(ApplyError::Invalid("no rotation is under way: only one root is trusted".into()));
                }
                let age = now.saturating_sub(current.created_at);
                if age < *min_age_secs {
                    return Err(ApplyError::Invalid(format!(
                        "the new root is {age} s old; certificates issued under the old root may live {min_age_secs} \
                         s, so dropping it now could break them. Finish after {} s more (or with --force once every \
                         workload has renewed)",
                        min_age_secs - age
                    )));
                }
                self.roots.truncate(1);
                self.roots[0].cross_cert_pem.clear();
                self.record(ChangeKey::Trust);
                Ok(())
            }
            Command::SetClusterReach { cluster, via_gateways } => {
                let Some(c) = self.clusters.get_mut(cluster) else {
                    return Err(ApplyError::NotFound(format!("cluster '{cluster}'")));
                };
                c.via_gateways = *via_gateways;
                c.reach_pinned = true;
                let ids: Vec<String> =
                    self.endpoints.values().filter(|e| e.cluster == *cluster).map(|e| e.id.clone()).collect();
                for id in ids {
                    self.record(ChangeKey::Endpoint(id));
                }
                Ok(())
            }
            Command::SetGateway { cluster, instance, address, only_if } => {
                let Some(c) = self.clusters.get_mut(cluster) else {
                    return Err(ApplyError::NotFound(format!("cluster '{cluster}'")));
                };
                let changed = match address {
                    Some(a) => {
                        let first = !c.via_gateways && !c.reach_pinned;
                        if !c.reach_pinned {
                            c.via_gateways = true;
                        }
                        c.gateways.insert(instance.clone(), a.clone()).as_ref() != Some(a) || first
                    }
                    None if only_if.as_ref().is_some_and(|o| c.gateways.get(instance) != Some(o)) => false,
                    None => c.gateways.remove(instance).is_some(),
                };
                if changed {
                    // Every endpoint of the cluster is reached through its gateways: resend them.
                    let ids: Vec<String> =
                        self.endpoints.values().filter(|e| e.cluster == *cluster).map(|e| e.id.clone()).collect();
                    for id in ids {
                        self.record(ChangeKey::Endpoint(id));
                    }
                }
                Ok(())
            }
            Command::RemoveCluster { name } => {
                if !self.clusters.contains_key(name) {
                    return Err(ApplyError::NotFound(format!("cluster '{name}'")));
                }
                if self.clusters.len() == 1 {
                    return Err(ApplyError::Invalid(format!("'{name}' is the federation's only cluster")));
                }
                if let Some(m) = self.members.values().find(|m| m.cluster == *name) {
                    return Err(ApplyError::Conflict(format!(
                        "cluster '{name}' still has control plane {} in the group; remove it first",
                        m.name
                    )));
                }
                let gone: Vec<String> =
                    self.endpoints.values().filter(|e| e.cluster == *name).map(|e| e.id.clone()).collect();
                for id in gone {
                    self.remove_endpoint(&id);
                    self.record(ChangeKey::Endpoint(id));
                }
                let tokens: Vec<String> = self
                    .join_tokens
                    .values()
                    .filter(|t| matches!(&t.kind, JoinKind::ControlPlane { cluster } if cluster == name))
                    .map(|t| t.id.clone())
                    .collect();
                for id in tokens {
                    if let Some(t) = self.join_tokens.get_mut(&id) {
                        t.revoked = true;
                    }
                }
                self.clusters.remove(name);
                self.record(ChangeKey::Trust);
                Ok(())
            }
            Command::JoinCluster { token_id, now, cluster } => {
                self.check_join_use(token_id, *now, &JoinKind::Cluster)?;
                validate_name(&cluster.name).map_err(|e| ApplyError::Invalid(format!("cluster name: {e}")))?;
                if self.clusters.contains_key(&cluster.name) {
                    return Err(ApplyError::Conflict(format!(
                        "a cluster named '{}' is already in the federation; choose another --cluster",
                        cluster.name
                    )));
                }
                self.spend_join_use(token_id);
                self.clusters.insert(cluster.name.clone(), cluster.clone());
                self.record(ChangeKey::Trust);
                Ok(())
            }
        }
    }

    /// Whether join token `id` admits one more join of `kind` at `now`.
    fn check_join_use(&self, id: &str, now: u64, kind: &JoinKind) -> Result<(), ApplyError> {
        let t = self.join_tokens.get(id).ok_or_else(|| ApplyError::NotFound(format!("join token {id}")))?;
        if t.kind != *kind {
            return Err(ApplyError::Invalid(match kind {
                JoinKind::Cluster => format!("join token {id} does not admit a new cluster"),
                JoinKind::ControlPlane { cluster } => {
                    format!("join token {id} does not admit a control plane of cluster '{cluster}'")
                }
            }));
        }
        if t.revoked {
            return Err(ApplyError::Invalid(format!("join token {id} was revoked")));
        }
        if t.expires_at <= now {
            return Err(ApplyError::Invalid(format!("join token {id} has expired")));
        }
        if t.uses_left == 0 {
            return Err(ApplyError::Invalid(format!("join token {id} was already used")));
        }
        Ok(())
    }

    /// Takes one use of a join token that [`Self::check_join_use`] accepted.
    fn spend_join_use(&mut self, id: &str) {
        if let Some(t) = self.join_tokens.get_mut(id) {
            t.uses_left -= 1;
        }
    }

    /// The member named `name` of `cluster`.
    pub fn member_named(&self, cluster: &str, name: &str) -> Option<&Member> {
        self.members.values().find(|m| m.cluster == cluster && m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(id: &str, service: &str) -> Endpoint {
        Endpoint {
            id: id.into(),
            service: service.into(),
            cluster: "a".into(),
            zone: "z1".into(),
            address: "127.0.0.1:1000".into(),
            identity: "spiffe://trellis.local/ns/default/sa/web".into(),
            healthy: true,
            weight: 1,
            revision: 0,
            registrar: String::new(),
        }
    }

    #[test]
    fn endpoint_registration_creates_service_and_records_changes() {
        let mut s = State::default();
        s.apply(
            1,
            &Command::UpsertEndpoint { endpoint: ep("a/default/web/1", "web.default"), protocol: Protocol::Http },
        )
        .unwrap();
        assert_eq!(s.services["web.default"].protocol, Protocol::Http);
        assert!(!s.services["web.default"].exported);
        assert_eq!(s.endpoints["a/default/web/1"].revision, 1);
        assert_eq!(
            s.changes_since(0).unwrap(),
            vec![ChangeKey::Service("web.default".into()), ChangeKey::Endpoint("a/default/web/1".into())]
        );
        // Identical re-registration changes nothing.
        s.apply(
            2,
            &Command::UpsertEndpoint { endpoint: ep("a/default/web/1", "web.default"), protocol: Protocol::Http },
        )
        .unwrap();
        assert_eq!(s.changes_since(1).unwrap(), vec![]);
        s.apply(3, &Command::SetEndpointHealth { id: "a/default/web/1".into(), healthy: false, registrar: None })
            .unwrap();
        assert_eq!(s.changes_since(2).unwrap(), vec![ChangeKey::Endpoint("a/default/web/1".into())]);
    }

    #[test]
    fn invalid_commands_leave_state_unchanged() {
        let mut s = State::default();
        let before = serde_json::to_string(&s).unwrap();
        let bad = [
            Command::UpsertEndpoint { endpoint: ep("x", "no-namespace"), protocol: Protocol::Http },
            Command::UpsertEndpoint {
                endpoint: Endpoint { address: "nowhere".into(), ..ep("x", "web.default") },
                protocol: Protocol::Http,
            },
            Command::DeleteService { key: "web.default".into() },
            Command::SetEndpointHealth { id: "missing".into(), healthy: true, registrar: None },
            Command::RevokeWorkloadToken { id: "missing".into() },
        ];
        for (i, c) in bad.iter().enumerate() {
            assert!(s.apply(i as u64 + 1, c).is_err(), "{c:?}");
        }
        let mut after: serde_json::Value = serde_json::to_value(&s).unwrap();
        after["revision"] = 0.into();
        assert_eq!(after, serde_json::from_str::<serde_json::Value>(&before).unwrap());
    }

    #[test]
    fn deleting_a_service_removes_its_endpoints() {
        let mut s = State::default();
        s.apply(1, &Command::UpsertEndpoint { endpoint: ep("e1", "web.default"), protocol: Protocol::Http }).unwrap();
        s.apply(2, &Command::UpsertEndpoint { endpoint: ep("e2", "api.default"), protocol: Protocol::Grpc }).unwrap();
        s.apply(3, &Command::DeleteService { key: "web.default".into() }).unwrap();
        assert!(!s.endpoints.contains_key("e1"));
        assert!(s.endpoints.contains_key("e2"));
    }

    #[test]
    fn changelog_window_forces_full_resync() {
        let mut s = State::default();
        for i in 1..=(CHANGELOG_LEN as u64 + 10) {
            s.apply(i, &Command::SetEndpointHealth { id: "none".into(), healthy: true, registrar: None }).ok();
            s.apply(
                i,
                &Command::UpsertEndpoint { endpoint: ep(&format!("e{i}"), "web.default"), protocol: Protocol::Http },
            )
            .unwrap();
        }
        assert!(s.changes_since(1).is_none());
        assert!(s.changes_since(s.revision - 5).is_some());
    }

    #[test]
    fn changes_since_returns_exactly_the_later_revisions() {
        let mut s = State::default();
        s.clusters.insert("a".into(), Cluster::named("a", "r"));
        // Revisions 1..=40, one endpoint each; revision 41 touches every endpoint at once.
        for i in 1..=40u64 {
            let cmd =
                Command::UpsertEndpoint { endpoint: ep(&format!("e{i:02}"), "web.default"), protocol: Protocol::Http };
            s.apply(i, &cmd).unwrap();
        }
        let gw = Command::SetGateway {
            cluster: "a".into(),
            instance: "gw".into(),
            address: Some("10.0.0.1:15443".into()),
            only_if: None,
        };
        s.apply(41, &gw).unwrap();
        let endpoint_keys = |keys: Vec<ChangeKey>| -> Vec<String> {
            keys.into_iter()
                .filter_map(|k| match k {
                    ChangeKey::Endpoint(id) => Some(id),
                    _ => None,
                })
                .collect()
        };
        for since in [0u64, 1, 17, 39, 40] {
            // What a scan of the whole log finds, against what the search finds.
            let mut scanned: Vec<ChangeKey> =
                s.changes.iter().filter(|(r, _)| *r > since).map(|(_, k)| k.clone()).collect();
            scanned.sort();
            scanned.dedup();
            assert_eq!(s.changes_since(since), Some(scanned), "since {since}");
        }
        assert_eq!(endpoint_keys(s.changes_since(40).unwrap()).len(), 40, "revision 41 is every endpoint");
        assert_eq!(s.changes_since(41), Some(Vec::new()));
        assert_eq!(s.changes_since(99), Some(Vec::new()));
    }

    #[test]
    fn a_revision_cut_by_the_changelog_window_forces_a_full_resync() {
        let mut s = State::default();
        s.clusters.insert("a".into(), Cluster::named("a", "r"));
        let n = CHANGELOG_LEN as u64 + 10;
        for i in 1..=n {
            let cmd =
                Command::UpsertEndpoint { endpoint: ep(&format!("e{i}"), "web.default"), protocol: Protocol::Http };
            s.apply(i, &cmd).unwrap();
        }
        // One command touches every endpoint of the cluster: more changes than the window holds.
        let gw = Command::SetGateway {
            cluster: "a".into(),
            instance: "gw".into(),
            address: Some("10.0.0.1:15443".into()),
            only_if: None,
        };
        s.apply(n + 1, &gw).unwrap();
        assert_eq!(s.changes.front().map(|(r, _)| *r), Some(n + 1), "the window holds only that revision");
        assert!(s.changes_since(n).is_none(), "part of revision {} is gone: a delta would miss endpoints", n + 1);
        assert_eq!(s.changes_since(n + 1), Some(Vec::new()));
    }

    /// The index by service agrees with a scan of every endpoint.
    fn assert_index_agrees(s: &State) {
        let services: std::collections::BTreeSet<&String> = s.endpoints.values().map(|e| &e.service).collect();
        for svc in services.iter().copied().chain([&"nothing.default".to_string()]) {
            let indexed: Vec<&str> = s.endpoints_of(svc).map(|e| e.id.as_str()).collect();
            let scanned: Vec<&str> =
                s.endpoints.values().filter(|e| e.service == *svc).map(|e| e.id.as_str()).collect();
            assert_eq!(indexed, scanned, "{svc}");
        }
        let indexed: usize = s.by_service.values().map(|ids| ids.len()).sum();
        assert_eq!(indexed, s.endpoints.len(), "ids indexed under services they no longer belong to");
    }

    #[test]
    fn endpoints_by_service_stay_in_step_through_every_change_and_a_snapshot() {
        let mut s = State::default();
        for c in ["a", "b"] {
            s.clusters.insert(c.into(), Cluster::named(c, "r"));
        }
        let mut n = 0;
        let mut apply = |s: &mut State, cmd: Command| {
            n += 1;
            let _ = s.apply(n, &cmd);
        };
        for i in 0..30 {
            let (cluster, service) = (["a", "b"][i % 2], ["web", "db", "cache"][i % 3]);
            let mut e = ep(&format!("{cluster}/default/{service}/{i}"), &format!("{service}.default"));
            e.cluster = cluster.into();
            apply(&mut s, Command::UpsertEndpoint { endpoint: e, protocol: Protocol::Http });
        }
        assert_index_agrees(&s);
        // The same id registered again under another service moves in the index.
        apply(
            &mut s,
            Command::UpsertEndpoint { endpoint: ep("a/default/web/0", "db.default"), protocol: Protocol::Http },
        );
        assert_index_agrees(&s);
        apply(&mut s, Command::DeleteEndpoint { id: "b/default/db/1".into(), registrar: None });
        apply(&mut s, Command::SetEndpointHealth { id: "a/default/web/6".into(), healthy: false, registrar: None });
        assert_index_agrees(&s);
        apply(&mut s, Command::DeleteService { key: "cache.default".into() });
        assert_index_agrees(&s);
        assert_eq!(s.endpoints_of("cache.default").count(), 0);
        apply(&mut s, Command::RemoveCluster { name: "b".into() });
        assert_index_agrees(&s);
        assert!(s.endpoints.values().all(|e| e.cluster == "a"));
        // Read back from a snapshot, the index is rebuilt.
        let restored: State = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_index_agrees(&restored);
        assert_eq!(restored.endpoints_of("web.default").count(), s.endpoints_of("web.default").count());
        assert!(restored.endpoints_of("web.default").count() > 0);
    }

    #[test]
    fn removing_a_cluster_needs_its_members_gone_and_takes_its_endpoints() {
        let cluster = |name: &str| Cluster::named(name, "r");
        let mut s = State::default();
        s.clusters.insert("a".into(), cluster("a"));
        let only = s.apply(1, &Command::RemoveCluster { name: "a".into() });
        assert!(matches!(only, Err(ApplyError::Invalid(_))), "{only:?}");
        s.clusters.insert("b".into(), cluster("b"));
        let mut in_b = ep("b/default/web/1", "web.default");
        in_b.cluster = "b".into();
        s.apply(2, &Command::UpsertEndpoint { endpoint: in_b, protocol: Protocol::Http }).unwrap();
        s.apply(
            3,
            &Command::UpsertEndpoint { endpoint: ep("a/default/web/1", "web.default"), protocol: Protocol::Http },
        )
        .unwrap();
        let m =
            Member { id: 7, name: "cp-1".into(), cluster: "b".into(), address: "x:1".into(), key_pin: String::new() };
        s.apply(4, &Command::SetMember(m)).unwrap();
        let busy = s.apply(5, &Command::RemoveCluster { name: "b".into() });
        assert!(matches!(busy, Err(ApplyError::Conflict(_))), "{busy:?}");
        assert!(s.clusters.contains_key("b") && s.endpoints.contains_key("b/default/web/1"));
        s.apply(6, &Command::RemoveMember { id: 7 }).unwrap();
        s.apply(7, &Command::RemoveCluster { name: "b".into() }).unwrap();
        assert!(!s.clusters.contains_key("b"));
        assert!(!s.endpoints.contains_key("b/default/web/1"));
        assert!(s.endpoints.contains_key("a/default/web/1"));
        let changed = s.changes_since(6).unwrap_or_default();
        assert!(changed.contains(&ChangeKey::Endpoint("b/default/web/1".into())), "{changed:?}");
        let missing = s.apply(8, &Command::RemoveCluster { name: "b".into() });
        assert!(matches!(missing, Err(ApplyError::NotFound(_))), "{missing:?}");
    }

    #[test]
    fn a_root_rotation_covers_every_cluster_and_ends_only_when_old_leaves_can_have_expired() {
        let root = |n: &str, created_at: u64| RootCa {
            cert_pem: n.into(),
            key_pem: String::new(),
            created_at,
            cross_cert_pem: String::new(),
            generation: 1,
        };
        let mut s = State { roots: vec![root("r1", 0)], ..Default::default() };
        for c in ["a", "b"] {
            let cluster = Cluster { intermediate_cert_pem: format!("{c}-old"), ..Cluster::named(c, "r") };
            s.clusters.insert(c.into(), cluster);
        }
        let only_a: BTreeMap<String, String> = [("a".to_string(), "a-new".to_string())].into();
        let partial = s.apply(1, &Command::RotateRoot { root: root("r2", 100), intermediates: only_a });
        assert!(matches!(partial, Err(ApplyError::Conflict(_))), "{partial:?}");
        assert_eq!(s.roots.len(), 1);
        let both: BTreeMap<String, String> =
            [("a".to_string(), "a-new".to_string()), ("b".to_string(), "b-new".to_string())].into();
        s.apply(2, &Command::RotateRoot { root: root("r2", 100), intermediates: both.clone() }).unwrap();
        assert_eq!(s.roots.iter().map(|r| r.cert_pem.as_str()).collect::<Vec<_>>(), ["r2", "r1"]);
        assert_eq!(s.clusters["b"].intermediate_cert_pem, "b-new");
        assert!(s.changes_since(1).unwrap_or_default().contains(&ChangeKey::Trust));
        let again = s.apply(3, &Command::RotateRoot { root: root("r3", 200), intermediates: both });
        assert!(matches!(again, Err(ApplyError::Conflict(_))), "one rotation at a time: {again:?}");
        let early = s.apply(4, &Command::FinishRootRotation { now: 150, min_age_secs: 100 });
        assert!(matches!(early, Err(ApplyError::Invalid(_))), "{early:?}");
        s.apply(5, &Command::FinishRootRotation { now: 200, min_age_secs: 100 }).unwrap();
        assert_eq!(s.roots.len(), 1);
        assert_eq!(s.roots[0].cert_pem, "r2");
    }

    #[test]
    fn a_cluster_is_reached_through_gateways_from_the_first_one_unless_an_administrator_pins_it() {
        let mut s = State::default();
        s.clusters.insert("b".into(), Cluster::named("b", "r"));
        let gw = |address: Option<&str>| Command::SetGateway {
            cluster: "b".into(),
            instance: "gw-1".into(),
            address: address.map(str::to_string),
            only_if: None,
        };
        s.apply(1, &gw(Some("10.0.0.9:15443"))).unwrap();
        assert!(s.clusters["b"].via_gateways, "the first gateway makes the cluster reached through gateways");
        s.apply(2, &gw(None)).unwrap();
        assert!(s.clusters["b"].via_gateways, "and it stays so with none up (callers fail over)");
        s.apply(3, &Command::SetClusterReach { cluster: "b".into(), via_gateways: false }).unwrap();
        s.apply(4, &gw(Some("10.0.0.9:15443"))).unwrap();
        let b = &s.clusters["b"];
        assert!(!b.via_gateways && b.reach_pinned, "a pinned direct cluster stays direct: {b:?}");
        let missing = s.apply(5, &Command::SetClusterReach { cluster: "x".into(), via_gateways: true });
        assert!(matches!(missing, Err(ApplyError::NotFound(_))), "{missing:?}");
    }
}
