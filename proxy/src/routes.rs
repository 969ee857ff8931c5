//! Domain types of what the proxy knows about the mesh: services and their endpoints.
//!
//! Discovery responses are converted here, once, from their protobuf form. Applying a response is
//! a pure function from the previous [`Routes`] to the next: every resource is converted on its
//! own, and one that cannot be converted keeps its previous value and is reported (the caller
//! NACKs), so a bad resource never poisons the rest.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::Serialize;
use trellis_proto::identity::validate_name;
use trellis_proto::{SpiffeId, pb};

/// Why a resource from the control plane (or a flag) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("'{0}' is not a service name: use NAME.NAMESPACE with lowercase letters, digits and '-'")]
    ServiceName(String),
    #[error("'{0}' is not an application protocol: use http, grpc or tcp")]
    Protocol(String),
    #[error("'{0}' is not a HOST:PORT address")]
    Address(String),
    #[error("endpoint '{id}': {reason}")]
    Endpoint { id: String, reason: String },
    #[error("service '{name}': {reason}")]
    Service { name: String, reason: String },
    #[error("trust bundle: {0}")]
    Bundle(String),
}

/// A service name, `name.namespace`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    /// The service's own name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
}

impl ServiceName {
    /// Builds a validated service name.
    pub fn new(name: &str, namespace: &str) -> Result<Self, RouteError> {
        let full = format!("{name}.{namespace}");
        validate_name(name).map_err(|_| RouteError::ServiceName(full.clone()))?;
        validate_name(namespace).map_err(|_| RouteError::ServiceName(full))?;
        Ok(Self { name: name.to_string(), namespace: namespace.to_string() })
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

impl FromStr for ServiceName {
    type Err = RouteError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, ns) = s.split_once('.').ok_or_else(|| RouteError::ServiceName(s.to_string()))?;
        Self::new(name, ns)
    }
}

impl Serialize for ServiceName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Application protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 towards the application.
    #[default]
    Http,
    /// gRPC: HTTP/2 prior knowledge (h2c) towards the application.
    Grpc,
    /// Opaque TCP.
    Tcp,
}

impl AppProtocol {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AppProtocol::Http => "http",
            AppProtocol::Grpc => "grpc",
            AppProtocol::Tcp => "tcp",
        }
    }
}

impl FromStr for AppProtocol {
    type Err = RouteError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            // An unset protocol is HTTP, like a Kubernetes Service port without appProtocol.
            "http" | "" => Ok(AppProtocol::Http),
            "grpc" => Ok(AppProtocol::Grpc),
            "tcp" => Ok(AppProtocol::Tcp),
            other => Err(RouteError::Protocol(other.to_string())),
        }
    }
}

/// Checks a `host:port` address (IP or DNS host) without resolving it.
pub fn validate_host_port(addr: &str) -> Result<(), RouteError> {
    let bad = || RouteError::Address(addr.to_string());
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
    if port == 0 || !host_ok {
        return Err(bad());
    }
    Ok(())
}

/// A service as the proxy sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    /// `name.namespace`.
    pub name: ServiceName,
    /// Application protocol.
    pub protocol: AppProtocol,
    /// Reachable from other clusters.
    pub exported: bool,
    /// Named ports.
    pub ports: Vec<(String, u16)>,
    /// Virtual address (transparent mode).
    pub vip: Option<std::net::Ipv4Addr>,
}

impl Service {
    /// Converts the wire form.
    pub fn from_proto(pb: &pb::Service) -> Result<Self, RouteError> {
        let name = ServiceName::new(&pb.name, &pb.namespace)?;
        let protocol = pb
            .protocol
            .parse()
            .map_err(|e: RouteError| RouteError::Service { name: name.to_string(), reason: e.to_string() })?;
        let mut ports = Vec::with_capacity(pb.ports.len());
        for p in &pb.ports {
            let port = u16::try_from(p.port).ok().filter(|p| *p != 0).ok_or_else(|| RouteError::Service {
                name: name.to_string(),
                reason: format!("bad port {}", p.port),
            })?;
            ports.push((p.name.clone(), port));
        }
        let vip = if pb.vip.is_empty() {
            None
        } else {
            Some(pb.vip.parse::<std::net::Ipv4Addr>().map_err(|e| RouteError::Service {
                name: name.to_string(),
                reason: format!("virtual address '{}': {e}", pb.vip),
            })?)
        };
        Ok(Self { name, protocol, exported: pb.exported, ports, vip })
    }
}

/// One workload behind one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// Stable id, `<cluster>/<namespace>/<service>/<instance>`.
    pub id: String,
    /// The service it serves.
    pub service: ServiceName,
    /// Cluster of the workload.
    pub cluster: String,
    /// Zone of the workload.
    pub zone: String,
    /// Region of the workload's cluster (empty when unknown).
    pub region: String,
    /// Gateways of the workload's cluster (reached through them from other clusters).
    pub gateways: Vec<String>,
    /// Its cluster is reached from other clusters only through those gateways.
    pub via_gateways: bool,
    /// `host:port` of the workload proxy's inbound mTLS listener.
    pub address: String,
    /// The identity it must present; `None` accepts any workload of the trust domain.
    pub identity: Option<SpiffeId>,
    /// Ready according to the control plane.
    pub healthy: bool,
    /// Relative weight (at least 1).
    pub weight: u32,
}

impl Endpoint {
    /// Converts the wire form.
    pub fn from_proto(pb: &pb::Endpoint) -> Result<Self, RouteError> {
        let err = |reason: String| RouteError::Endpoint { id: pb.id.clone(), reason };
        if pb.id.is_empty() {
            return Err(err("empty id".into()));
        }
        let service: ServiceName = pb.service.parse().map_err(|e: RouteError| err(e.to_string()))?;
        validate_host_port(&pb.address).map_err(|e| err(e.to_string()))?;
        let identity = if pb.identity.is_empty() {
            None
        } else {
            Some(pb.identity.parse::<SpiffeId>().map_err(|e| err(e.to_string()))?)
        };
        Ok(Self {
            id: pb.id.clone(),
            service,
            cluster: pb.cluster.clone(),
            zone: pb.zone.clone(),
            region: pb.region.clone(),
            gateways: pb.gateways.clone(),
            via_gateways: pb.via_gateways,
            address: pb.address.clone(),
            identity,
            healthy: pb.healthy,
            // proto3 cannot tell "unset" from 0; an unset weight means the default of 1.
            weight: pb.weight.max(1),
        })
    }
}

/// A service's endpoints as [`Routes`] hold them: shared, and replaced rather than changed when
/// the service's endpoints change, so a balancer knows a list it has already seen.
pub type EndpointList = Arc<[Arc<Endpoint>]>;

/// Everything the proxy currently routes on. Cheap to share: readers hold an `Arc`.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    /// Version of the last applied response (0: none yet).
    pub version: u64,
    /// True once a first response has been applied.
    pub loaded: bool,
    /// Services by name.
    pub services: BTreeMap<ServiceName, Service>,
    /// Endpoints by id.
    pub endpoints: BTreeMap<String, Arc<Endpoint>>,
    /// Region of this proxy's cluster, as the control plane says (empty when unknown).
    pub region: String,
    /// The services whose endpoints the control plane sends this proxy (a scoped view), as it
    /// confirmed them; `None`: every endpoint the proxy may see.
    pub scope: Option<BTreeSet<ServiceName>>,
    by_service: BTreeMap<ServiceName, EndpointList>,
    by_vip: HashMap<std::net::Ipv4Addr, ServiceName>,
}

/// The result of applying one discovery response.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The new routes.
    pub routes: Routes,
    /// One message per resource that was refused (empty: ACK).
    pub rejected: Vec<String>,
}

impl Routes {
    /// Every endpoint of `service`, healthy or not.
    pub fn endpoints_of(&self, service: &ServiceName) -> &[Arc<Endpoint>] {
        self.by_service.get(service).map_or(&[], |l| l)
    }

    /// The endpoints of `service` as one shared list, which stays the same list (the same `Arc`)
    /// across updates that leave the service's endpoints as they were. `None`: it has none.
    pub fn endpoint_list(&self, service: &ServiceName) -> Option<&EndpointList> {
        self.by_service.get(service)
    }

    /// The service with virtual address `vip`, if any (transparent mode).
    pub fn service_at(&self, vip: std::net::Ipv4Addr) -> Option<&Service> {
        self.by_vip.get(&vip).and_then(|n| self.services.get(n))
    }

    /// Whether the endpoints of `service` are in this proxy's view (all of them, as the control
    /// plane knows them). A scoped proxy subscribes to a service before it calls it.
    pub fn in_view(&self, service: &ServiceName) -> bool {
        self.loaded && self.scope.as_ref().is_none_or(|s| s.contains(service))
    }

    /// The service's description, if the control plane sent one.
    pub fn service(&self, service: &ServiceName) -> Option<&Service> {
        self.services.get(service)
    }

    /// Applies a response: a full one replaces everything, a delta upserts and removes.
    pub fn apply(&self, resp: &pb::DiscoveryResponse) -> Applied {
        let mut rejected = Vec::new();
        let (mut services, mut endpoints) = if resp.full {
            (BTreeMap::new(), BTreeMap::new())
        } else {
            (self.services.clone(), self.endpoints.clone())
        };
        for name in &resp.removed_services {
            match name.parse::<ServiceName>() {
                Ok(n) => {
                    services.remove(&n);
                }
                Err(e) => rejected.push(format!("removed service: {e}")),
            }
        }
        for id in &resp.removed_endpoints {
            endpoints.remove(id);
        }
        for s in &resp.services {
            match Service::from_proto(s) {
                Ok(svc) => {
                    services.insert(svc.name.clone(), svc);
                }
                Err(e) => {
                    // Keep what we had for this service, if its name is usable at all.
                    if let Ok(n) = ServiceName::new(&s.name, &s.namespace)
                        && let Some(old) = self.services.get(&n)
                    {
                        services.insert(n, old.clone());
                    }
                    rejected.push(e.to_string());
                }
            }
        }
        for e in &resp.endpoints {
            match Endpoint::from_proto(e) {
                Ok(ep) => {
                    endpoints.insert(ep.id.clone(), Arc::new(ep));
                }
                Err(err) => {
                    if let Some(old) = self.endpoints.get(&e.id) {
                        endpoints.insert(e.id.clone(), old.clone());
                    }
                    rejected.push(err.to_string());
                }
            }
        }
        let mut scope = if resp.full { resp.scoped.then(BTreeSet::new) } else { self.scope.clone() };
        if let Some(scope) = &mut scope {
            for name in &resp.subscribed {
                match name.parse::<ServiceName>() {
                    Ok(n) => {
                        scope.insert(n);
                    }
                    Err(e) => rejected.push(format!("subscribed service: {e}")),
                }
            }
        }
        let mut routes = Routes {
            version: resp.version,
            loaded: true,
            services,
            endpoints,
            region: if resp.full { resp.region.clone() } else { self.region.clone() },
            scope,
            by_service: BTreeMap::new(),
            by_vip: HashMap::new(),
        };
        routes.reindex(self);
        Applied { routes, rejected }
    }

    /// Indexes the endpoints by service, keeping `before`'s list of a service whose endpoints
    /// are the same ones in the same order.
    fn reindex(&mut self, before: &Routes) {
        let mut lists: BTreeMap<&ServiceName, Vec<Arc<Endpoint>>> = BTreeMap::new();
        for ep in self.endpoints.values() {
            lists.entry(&ep.service).or_default().push(ep.clone());
        }
        let same = |a: &[Arc<Endpoint>], b: &[Arc<Endpoint>]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y))
        };
        self.by_service = lists
            .into_iter()
            .map(|(name, list)| {
                let list = match before.by_service.get(name) {
                    Some(old) if same(old, &list) => old.clone(),
                    _ => EndpointList::from(list),
                };
                (name.clone(), list)
            })
            .collect();
        self.by_vip = self.services.values().filter_map(|s| Some((s.vip?, s.name.clone()))).collect();
    }
}

/// Converts a trust bundle pushed by the control plane; it must be for our trust domain.
pub fn bundle_from_proto(pb: &pb::TrustBundle, trust_domain: &str) -> Result<trellis_proto::TrustBundle, RouteError> {
    if !pb.trust_domain.is_empty() && pb.trust_domain != trust_domain {
        return Err(RouteError::Bundle(format!(
            "it is for trust domain '{}', this proxy is in '{trust_domain}'",
            pb.trust_domain
        )));
    }
    trellis_proto::TrustBundle::from_pem(trust_domain, &pb.roots_pem).map_err(|e| RouteError::Bundle(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(id: &str, svc: &str, addr: &str) -> pb::Endpoint {
        pb::Endpoint {
            id: id.into(),
            service: svc.into(),
            cluster: "local".into(),
            zone: "zone-a".into(),
            address: addr.into(),
            identity: "spiffe://trellis.local/ns/default/sa/web".into(),
            healthy: true,
            weight: 0,
            revision: 1,
            region: String::new(),
            gateways: Vec::new(),
            via_gateways: false,
        }
    }

    fn svc(name: &str, protocol: &str) -> pb::Service {
        pb::Service {
            name: name.into(),
            namespace: "default".into(),
            ports: vec![],
            protocol: protocol.into(),
            exported: false,
            revision: 1,
            vip: String::new(),
        }
    }

    fn web() -> ServiceName {
        "web.default".parse().unwrap()
    }

    #[test]
    fn a_service_whose_endpoints_did_not_change_keeps_its_list() {
        let full = pb::DiscoveryResponse {
            version: 1,
            full: true,
            endpoints: vec![
                ep("local/default/web/a", "web.default", "127.0.0.1:1001"),
                ep("local/default/api/a", "api.default", "127.0.0.1:1002"),
            ],
            ..Default::default()
        };
        let r1 = Routes::default().apply(&full).routes;
        let delta = pb::DiscoveryResponse {
            version: 2,
            endpoints: vec![ep("local/default/api/b", "api.default", "127.0.0.1:1003")],
            ..Default::default()
        };
        let r2 = r1.apply(&delta).routes;
        let api: ServiceName = "api.default".parse().unwrap();
        let list = |r: &Routes, s: &ServiceName| r.endpoint_list(s).unwrap().clone();
        assert!(Arc::ptr_eq(&list(&r1, &web()), &list(&r2, &web())), "web's endpoints are as they were");
        assert!(!Arc::ptr_eq(&list(&r1, &api), &list(&r2, &api)));
        assert_eq!(list(&r2, &api).len(), 2);
        assert!(r2.endpoint_list(&"none.default".parse().unwrap()).is_none());
    }

    #[test]
    fn service_names_and_addresses() {
        let names = [
            ("web.default", true),
            ("web", false),
            ("Web.default", false),
            ("web.", false),
            (".default", false),
            ("a.b.c", false),
        ];
        for (s, ok) in names {
            assert_eq!(s.parse::<ServiceName>().is_ok(), ok, "{s}");
        }
        let addrs = [
            ("127.0.0.1:8080", true),
            ("[::1]:8080", true),
            ("web.local:80", true),
            ("web.local", false),
            ("web.local:0", false),
            ("web.local:99999", false),
            (":80", false),
            ("a b:80", false),
        ];
        for (s, ok) in addrs {
            assert_eq!(validate_host_port(s).is_ok(), ok, "{s}");
        }
    }

    #[test]
    fn full_then_delta_then_bad_resources() {
        let r0 = Routes::default();
        let full = pb::DiscoveryResponse {
            version: 1,
            full: true,
            services: vec![svc("web", "http")],
            endpoints: vec![ep("local/default/web/a", "web.default", "127.0.0.1:1001")],
            ..Default::default()
        };
        let a1 = r0.apply(&full);
        assert!(a1.rejected.is_empty());
        assert_eq!(a1.routes.endpoints_of(&web()).len(), 1);
        assert_eq!(a1.routes.endpoints_of(&web())[0].weight, 1);

        // A delta adds one endpoint and brings one malformed one plus a bad service update.
        let delta = pb::DiscoveryResponse {
            version: 2,
            full: false,
            services: vec![svc("web", "smtp")],
            endpoints: vec![
                ep("local/default/web/b", "web.default", "127.0.0.1:1002"),
                ep("local/default/web/a", "web.default", "not an address"),
            ],
            ..Default::default()
        };
        let a2 = a1.routes.apply(&delta);
        assert_eq!(a2.rejected.len(), 2, "{:?}", a2.rejected);
        let eps = a2.routes.endpoints_of(&web());
        assert_eq!(eps.len(), 2);
        // The bad update kept the previous value of endpoint a and of the service.
        let a = &a2.routes.endpoints["local/default/web/a"];
        assert_eq!(a.address, "127.0.0.1:1001");
        assert_eq!(a2.routes.service(&web()).map(|s| s.protocol), Some(AppProtocol::Http));

        // Removal by id and by service name.
        let removal = pb::DiscoveryResponse {
            version: 3,
            removed_endpoints: vec!["local/default/web/b".into()],
            removed_services: vec!["web.default".into()],
            ..Default::default()
        };
        let a3 = a2.routes.apply(&removal);
        assert!(a3.rejected.is_empty());
        assert_eq!(a3.routes.endpoints_of(&web()).len(), 1);
        assert!(a3.routes.service(&web()).is_none());
        assert_eq!(a3.routes.version, 3);

        // A full response drops what it does not mention.
        let empty_full = pb::DiscoveryResponse { version: 4, full: true, ..Default::default() };
        let a4 = a3.routes.apply(&empty_full);
        assert!(a4.routes.endpoints.is_empty());
        assert!(a4.routes.loaded);
    }

    #[test]
    fn endpoint_conversion_rejects_bad_fields() {
        let cases: Vec<(pb::Endpoint, bool)> = vec![
            (ep("x", "web.default", "127.0.0.1:1"), true),
            (ep("", "web.default", "127.0.0.1:1"), false),
            (ep("x", "web", "127.0.0.1:1"), false),
            (ep("x", "web.default", "127.0.0.1"), false),
            (pb::Endpoint { identity: "http://x".into(), ..ep("x", "web.default", "h:1") }, false),
            (pb::Endpoint { identity: String::new(), ..ep("x", "web.default", "h:1") }, true),
        ];
        for (input, ok) in cases {
            assert_eq!(Endpoint::from_proto(&input).is_ok(), ok, "{input:?}");
        }
    }

    #[test]
    fn the_view_scope_follows_the_control_plane_and_vips_are_indexed() {
        let db: ServiceName = "db.default".parse().unwrap();
        let mut with_vip = svc("web", "http");
        with_vip.vip = "10.96.0.7".into();
        let full = pb::DiscoveryResponse {
            version: 1,
            full: true,
            scoped: true,
            subscribed: vec!["web.default".into()],
            services: vec![with_vip, svc("db", "http")],
            endpoints: vec![ep("local/default/web/a", "web.default", "127.0.0.1:1001")],
            ..Default::default()
        };
        let r1 = Routes::default().apply(&full).routes;
        assert!(!Routes::default().in_view(&web()), "nothing is in view before the first response");
        assert!(r1.in_view(&web()) && !r1.in_view(&db));
        assert_eq!(r1.service_at("10.96.0.7".parse().unwrap()).map(|s| s.name.clone()), Some(web()));
        assert!(r1.service_at("10.96.0.8".parse().unwrap()).is_none());
        // A delta naming db brings it into view, even without endpoints.
        let sub = pb::DiscoveryResponse { version: 1, subscribed: vec!["db.default".into()], ..Default::default() };
        let r2 = r1.apply(&sub).routes;
        assert!(r2.in_view(&db) && r2.in_view(&web()));
        assert_eq!(r2.service_at("10.96.0.7".parse().unwrap()).map(|s| s.name.clone()), Some(web()));
        // A full view that is not scoped holds everything.
        let r3 = r2.apply(&pb::DiscoveryResponse { version: 2, full: true, ..Default::default() }).routes;
        assert!(r3.scope.is_none() && r3.in_view(&db));
        // A malformed name is refused (NACK) and the rest applies.
        let bad = pb::DiscoveryResponse { version: 2, subscribed: vec!["nope".into()], ..Default::default() };
        let a = r1.apply(&bad);
        assert_eq!(a.rejected.len(), 1);
        assert!(a.routes.in_view(&web()));
    }
}
