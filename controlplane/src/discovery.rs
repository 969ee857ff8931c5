//! The discovery API: one bidirectional stream per proxy. The proxy says who it is and which
//! endpoints it serves; this instance registers them, sends a full view, then deltas computed from
//! the store's changelog (cost grows with the change, not with the mesh), and records each
//! ACK/NACK so `trellis get proxies` shows stale or diverged proxies.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use trellis_proto::identity::Principal;
use trellis_proto::pb::{self, discovery_request::Kind};
use trellis_proto::{SpiffeId, grpc};

use crate::convert::{bundle_to_pb, endpoint_to_pb, service_to_pb};
use crate::fanout::Fanout;
use crate::metrics::Metrics;
use crate::proxies::{ProxyInfo, ProxyTracker};
use crate::state::{ChangeKey, Command, Endpoint, Protocol, State, validate_service_key};
use crate::store::Store;

/// How long a proxy has to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The discovery service of one instance.
#[derive(Clone)]
pub struct DiscoveryService {
    pub store: Arc<dyn Store>,
    /// This cluster's observations that wait for the quorum; proxies see them meanwhile.
    pub overlay: Arc<crate::overlay::Overlay>,
    pub proxies: Arc<ProxyTracker>,
    pub cluster: String,
    /// This instance's name, recorded on the endpoints registered through it.
    pub node: String,
    pub metrics: Arc<Metrics>,
    /// Hands each committed change to the sessions it concerns (its task runs in `app`).
    pub fanout: Arc<Fanout>,
}

/// Whether a proxy of cluster `viewer` sees endpoint `e`: its own cluster's endpoints, and other
/// clusters' endpoints of exported services. Cluster-local services never leave their cluster.
fn visible(state: &State, e: &crate::state::Endpoint, viewer: &str) -> bool {
    e.cluster == viewer || state.services.get(&e.service).is_some_and(|s| s.exported)
}

/// Most services one scoped session may subscribe to; a proxy that wants more gets the full view.
pub const MAX_SUBSCRIBED: usize = 10_000;

/// Which endpoints a session's view holds. Every service's definition is always sent (they are
/// few, and a proxy needs them to recognise a service's virtual address before it calls it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every endpoint the viewer may see (gateways; proxies run with a full view).
    All,
    /// Only the endpoints of these services (`name.namespace`): what the proxy calls.
    Services(BTreeSet<String>),
    /// Only the viewer's own cluster's endpoints: an east-west gateway, which routes other
    /// clusters' callers to them and never dials another cluster.
    OwnCluster,
}

impl Scope {
    /// The scope a Hello asks for.
    pub fn from_hello(hello: &pb::Hello) -> Self {
        if !hello.scoped {
            return Scope::All;
        }
        let mut scope = Scope::Services(BTreeSet::new());
        scope.add(&hello.services);
        scope
    }

    /// Adds `services`; returns those not in the scope before. Past [`MAX_SUBSCRIBED`] the scope
    /// becomes [`Scope::All`] (and nothing is returned: the caller sends a full view).
    pub fn add(&mut self, services: &[String]) -> Vec<String> {
        let new = self.missing(services);
        if !self.fits(new.len()) {
            *self = Scope::All;
            return Vec::new();
        }
        if let Scope::Services(set) = self {
            set.extend(new.iter().cloned());
        }
        new
    }

    /// The services of `services` this scope lacks, each once; none for a full or own-cluster
    /// view, which holds every service's endpoints it may see. A name that is not
    /// `name.namespace` is skipped with a log line (no such service can exist; ending the stream
    /// would only bring the same request back).
    fn missing(&self, services: &[String]) -> Vec<String> {
        let Scope::Services(set) = self else { return Vec::new() };
        services
            .iter()
            .filter(|s| match validate_service_key(s) {
                Ok(()) => !set.contains(*s),
                Err(e) => {
                    tracing::warn!(service = %s, error = %e, "subscription to an impossible service name ignored");
                    false
                }
            })
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// Whether `more` services can join the scope without passing [`MAX_SUBSCRIBED`].
    fn fits(&self, more: usize) -> bool {
        let Scope::Services(set) = self else { return true };
        let fits = set.len() + more <= MAX_SUBSCRIBED;
        if !fits {
            tracing::info!(services = set.len() + more, "subscriptions past {MAX_SUBSCRIBED}: sending the full view");
        }
        fits
    }

    /// How `trellis get proxies` shows it.
    pub fn describe(&self) -> String {
        match self {
            Scope::All => "full".into(),
            Scope::OwnCluster => "own cluster".into(),
            Scope::Services(set) if set.len() == 1 => "1 service".into(),
            Scope::Services(set) => format!("{} services", set.len()),
        }
    }

    /// Whether other clusters' endpoints of `service` are in scope (an own-cluster view holds
    /// none).
    fn holds_remote(&self, service: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::OwnCluster => false,
            Scope::Services(set) => set.contains(service),
        }
    }

    /// Whether endpoint `e`, visible to a proxy of `viewer`, is in scope.
    fn admits(&self, e: &crate::state::Endpoint, viewer: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::OwnCluster => e.cluster == viewer,
            Scope::Services(set) => set.contains(&e.service),
        }
    }

    /// Whether the endpoint with this id (`<cluster>/<namespace>/<name>/<instance>`) is in the
    /// scope of a proxy of `viewer`.
    fn covers_id(&self, id: &str, viewer: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::OwnCluster => id.split('/').next() == Some(viewer),
            Scope::Services(set) => match endpoint_id_service(id) {
                Some((_, service)) => set.contains(&service),
                // Not an id this control plane makes: let the proxy drop it if it has it.
                None => true,
            },
        }
    }
}

/// The cluster and the service (`name.namespace`) named by an endpoint id
/// (`<cluster>/<namespace>/<name>/<instance>`); none for an id this control plane does not make.
pub(crate) fn endpoint_id_service(id: &str) -> Option<(&str, String)> {
    let mut parts = id.splitn(4, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(cluster), Some(ns), Some(name)) => Some((cluster, format!("{name}.{ns}"))),
        _ => None,
    }
}

/// The endpoints of `services` a proxy of cluster `viewer` sees (through the state's index: the
/// cost is what the services have, not the registry's size).
fn endpoints_of(state: &State, viewer: &str, services: &[String]) -> Vec<pb::Endpoint> {
    services
        .iter()
        .flat_map(|s| state.endpoints_of(s))
        .filter(|e| visible(state, e, viewer))
        .map(|e| endpoint_to_pb(state, e))
        .collect()
}

/// Builds the response that brings a proxy of cluster `viewer` whose view is `scope` from `since`
/// to `state` (full when `since` is 0 or the changelog no longer reaches back), adding the
/// endpoints of the newly subscribed services `added` (not yet in `scope`). Pure: the stream only
/// sends what this returns.
pub fn build_response(
    state: &State,
    since: u64,
    viewer: &str,
    scope: &Scope,
    added: &[String],
) -> Option<pb::DiscoveryResponse> {
    let keys = if since == 0 { None } else { state.changes_since(since) };
    match keys {
        None => Some(full_view(state, viewer, scope, added)),
        Some(keys) => build_delta(state, &keys, viewer, scope, added),
    }
}

/// The full view of `state` for a proxy of cluster `viewer` whose view is `scope`, with the
/// endpoints of the newly subscribed services `added`.
pub fn full_view(state: &State, viewer: &str, scope: &Scope, added: &[String]) -> pb::DiscoveryResponse {
    let (endpoints, subscribed) = match scope {
        Scope::All => (
            state.endpoints.values().filter(|e| visible(state, e, viewer)).map(|e| endpoint_to_pb(state, e)).collect(),
            Vec::new(),
        ),
        Scope::OwnCluster => {
            // Registration names endpoints `<cluster>/...` (the only way they are made): a
            // cluster's endpoints are one range of the map.
            let prefix = format!("{viewer}/");
            let own = state.endpoints.range(prefix.clone()..).take_while(|(id, _)| id.starts_with(&prefix));
            (
                own.map(|(_, e)| e).filter(|e| scope.admits(e, viewer)).map(|e| endpoint_to_pb(state, e)).collect(),
                Vec::new(),
            )
        }
        Scope::Services(set) => {
            let subscribed: Vec<String> =
                set.iter().chain(added).cloned().collect::<BTreeSet<_>>().into_iter().collect();
            (endpoints_of(state, viewer, &subscribed), subscribed)
        }
    };
    pb::DiscoveryResponse {
        version: state.revision,
        full: true,
        services: state.services.values().map(service_to_pb).collect(),
        endpoints,
        trust_bundle: Some(bundle_to_pb(state)),
        region: state.clusters.get(viewer).map(|c| c.region.clone()).unwrap_or_default(),
        scoped: matches!(scope, Scope::Services(_)),
        subscribed,
        ..Default::default()
    }
}

/// The delta that brings a proxy of cluster `viewer` whose view is `scope` the resources named by
/// `keys` as they are in `state` (and the endpoints of the newly subscribed services `added`);
/// none when nothing of it concerns the proxy.
pub fn build_delta<'a>(
    state: &State,
    keys: impl IntoIterator<Item = &'a ChangeKey>,
    viewer: &str,
    scope: &Scope,
    added: &[String],
) -> Option<pb::DiscoveryResponse> {
    let mut resp = pb::DiscoveryResponse { version: state.revision, full: false, ..Default::default() };
    let mut endpoint_ids = std::collections::BTreeSet::new();
    for key in keys {
        match key {
            ChangeKey::Service(k) => {
                match state.services.get(k) {
                    Some(s) => resp.services.push(service_to_pb(s)),
                    None => resp.removed_services.push(k.clone()),
                }
                // Exporting or unexporting a service changes which remote endpoints are seen.
                if scope.holds_remote(k) {
                    endpoint_ids.extend(state.endpoints_of(k).filter(|e| e.cluster != viewer).map(|e| e.id.clone()));
                }
            }
            ChangeKey::Endpoint(id) => {
                // Out of scope: the proxy does not hold it and need not hear of it.
                if scope.covers_id(id, viewer) {
                    endpoint_ids.insert(id.clone());
                }
            }
            ChangeKey::Trust => resp.trust_bundle = Some(bundle_to_pb(state)),
        }
    }
    for id in endpoint_ids {
        match state.endpoints.get(&id) {
            Some(e) if visible(state, e, viewer) => resp.endpoints.push(endpoint_to_pb(state, e)),
            // Gone, or no longer visible here; removing an id the proxy never had is harmless.
            _ => resp.removed_endpoints.push(id),
        }
    }
    if !added.is_empty() {
        // Everything of the new services: they were out of scope, so none is in the delta above.
        resp.endpoints.extend(endpoints_of(state, viewer, added));
        resp.subscribed = added.to_vec();
    }
    if resp.services.is_empty()
        && resp.removed_services.is_empty()
        && resp.endpoints.is_empty()
        && resp.removed_endpoints.is_empty()
        && resp.trust_bundle.is_none()
        && resp.subscribed.is_empty()
    {
        // Only changes out of this proxy's scope.
        return None;
    }
    Some(resp)
}

/// Turns a Hello's registrations into endpoints, refusing anything the proxy may not claim.
pub fn registrations(hello: &pb::Hello, peer: &SpiffeId, cluster: &str) -> Result<Vec<(Endpoint, Protocol)>, Status> {
    let node = hello.node.as_ref().ok_or_else(|| Status::invalid_argument("Hello.node is missing"))?;
    if !node.identity.is_empty() && node.identity != peer.to_string() {
        return Err(Status::permission_denied(format!(
            "Hello says identity {} but the client certificate is {peer}",
            node.identity
        )));
    }
    if !node.cluster.is_empty() && node.cluster != cluster {
        return Err(Status::invalid_argument(format!(
            "the proxy says it is in cluster '{}' but this control plane serves cluster '{cluster}'; \
             point --control-plane at a control plane of its own cluster",
            node.cluster
        )));
    }
    trellis_proto::identity::validate_name(&node.instance)
        .map_err(|e| Status::invalid_argument(format!("Hello.node.instance: {e}")))?;
    let namespace = match peer.principal() {
        Principal::Workload { namespace, .. } => namespace,
        // An east-west gateway of this cluster subscribes to route to its cluster's endpoints;
        // it serves none itself.
        Principal::Gateway { cluster: c } if c == cluster => {
            if !hello.endpoints.is_empty() {
                return Err(Status::invalid_argument("a gateway registers no endpoints"));
            }
            return Ok(Vec::new());
        }
        _ => {
            return Err(Status::permission_denied(format!("{peer} is not a workload or gateway of cluster {cluster}")));
        }
    };
    hello
        .endpoints
        .iter()
        .map(|r| {
            validate_service_key(&r.service).map_err(|e| Status::invalid_argument(e.to_string()))?;
            let (name, ns) = r.service.split_once('.').unwrap_or_default();
            if ns != namespace {
                return Err(Status::permission_denied(format!(
                    "workload of namespace '{namespace}' cannot register an endpoint of {}",
                    r.service
                )));
            }
            r.address
                .parse::<SocketAddr>()
                .map_err(|_| Status::invalid_argument(format!("endpoint address '{}' must be ip:port", r.address)))?;
            let protocol = Protocol::parse(&r.protocol).map_err(|e| Status::invalid_argument(e.to_string()))?;
            Ok((
                Endpoint {
                    id: format!("{cluster}/{ns}/{name}/{}", node.instance),
                    service: r.service.clone(),
                    cluster: cluster.to_string(),
                    zone: node.zone.clone(),
                    address: r.address.clone(),
                    identity: peer.to_string(),
                    healthy: r.ready,
                    weight: r.weight.max(1),
                    revision: 0,
                    registrar: String::new(),
                },
                protocol,
            ))
        })
        .collect()
}

#[tonic::async_trait]
impl pb::discovery_server::Discovery for DiscoveryService {
    type StreamStream = ReceiverStream<Result<pb::DiscoveryResponse, Status>>;

    async fn stream(
        &self,
        req: Request<Streaming<pb::DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = grpc::peer_identity(&req)
            .ok_or_else(|| Status::unauthenticated("discovery needs a workload client certificate"))?;
        // A proxy's cluster is the cluster whose CA issued its certificate: it sees that
        // cluster's local services, so it must talk to that cluster's control plane.
        let issuer = grpc::peer_issuer_cluster(&req);
        if issuer.as_deref() != Some(self.cluster.as_str()) {
            return Err(Status::permission_denied(format!(
                "{peer}'s certificate was issued by cluster '{}', and this control plane serves cluster '{}'; \
                 connect the proxy to a control plane of its own cluster",
                issuer.as_deref().unwrap_or("unknown"),
                self.cluster
            )));
        }
        let peer_addr = grpc::peer_addr(&req).map(|a| a.to_string()).unwrap_or_default();
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10 s"))??
            .ok_or_else(|| Status::cancelled("stream closed before Hello"))?;
        let Some(Kind::Hello(hello)) = first.kind else {
            return Err(Status::invalid_argument("the first message of a discovery stream must be Hello"));
        };
        let mut regs = registrations(&hello, &peer, &self.cluster)?;
        let (scope, known) = match peer.principal() {
            // A gateway routes only to its own cluster's endpoints: the rest of the federation's
            // would be memory and pushes it never uses. It starts from a full view of those (it
            // may hold more, from a control plane that sent it everything).
            Principal::Gateway { .. } => (Scope::OwnCluster, 0),
            _ if hello.scoped => (Scope::from_hello(&hello), hello.scoped_known_version),
            _ => (Scope::All, hello.known_version),
        };
        for (e, _) in &mut regs {
            e.registrar = self.registrar();
        }
        for (endpoint, protocol) in &regs {
            self.overlay.observe(Command::UpsertEndpoint { endpoint: endpoint.clone(), protocol: *protocol }).await?;
        }
        let node = hello.node.clone().unwrap_or_default();
        // An east-west gateway of this cluster: other clusters' proxies reach this cluster's
        // endpoints through it while its stream is open.
        let gateway = match (peer.principal(), hello.gateway_address.as_str()) {
            (Principal::Gateway { .. }, "") => None,
            (Principal::Gateway { .. }, addr) => {
                addr.parse::<SocketAddr>().map_err(|_| {
                    Status::invalid_argument(format!("gateway address '{addr}' must be ip:port (use --advertise)"))
                })?;
                let cmd = Command::SetGateway {
                    cluster: self.cluster.clone(),
                    instance: node.instance.clone(),
                    address: Some(addr.to_string()),
                    only_if: None,
                };
                self.overlay.observe(cmd).await?;
                tracing::info!(instance = %node.instance, address = %addr, "gateway registered");
                Some((node.instance.clone(), addr.to_string()))
            }
            (_, "") => None,
            (_, _) => return Err(Status::permission_denied(format!("{peer} is not a gateway"))),
        };
        let session = self.proxies.open(ProxyInfo {
            identity: peer.to_string(),
            cluster: self.cluster.clone(),
            instance: node.instance.clone(),
            peer_address: peer_addr,
            endpoints: regs.iter().map(|(e, _)| e.id.clone()).collect(),
            view: scope.describe(),
            ..Default::default()
        });
        tracing::info!(%peer, instance = %node.instance, endpoints = regs.len(), "proxy connected");
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            let deregistered = this.serve(session, known, scope, &mut inbound, tx).await;
            let owned = this.proxies.close(session);
            for id in owned {
                let registrar = Some(this.registrar());
                let cmd = if deregistered {
                    Command::DeleteEndpoint { id: id.clone(), registrar }
                } else {
                    Command::SetEndpointHealth { id: id.clone(), healthy: false, registrar }
                };
                if let Err(e) = this.overlay.observe(cmd).await {
                    tracing::warn!(endpoint = %id, error = %e, "could not update endpoint after disconnect");
                }
            }
            if let Some((instance, addr)) = gateway {
                let cmd =
                    Command::SetGateway { cluster: this.cluster.clone(), instance, address: None, only_if: Some(addr) };
                if let Err(e) = this.overlay.observe(cmd).await {
                    tracing::warn!(error = %e, "could not forget a gateway that went away");
                }
            }
            this.metrics.proxies_connected.set(this.proxies.connected() as i64);
            tracing::info!(%peer, instance = %node.instance, deregistered, "proxy disconnected");
        });
        self.metrics.proxies_connected.set(self.proxies.connected() as i64);
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl DiscoveryService {
    /// This instance as endpoints record it.
    fn registrar(&self) -> String {
        format!("{}/{}", self.cluster, self.node)
    }

    /// Runs one session until the proxy goes away; returns true if it deregistered.
    async fn serve(
        &self,
        session: u64,
        known: u64,
        mut scope: Scope,
        inbound: &mut Streaming<pb::DiscoveryRequest>,
        tx: mpsc::Sender<Result<pb::DiscoveryResponse, Status>>,
    ) -> bool {
        // Interest first, state second: a change committed in between is in the state read below
        // or reaches this session through the fanout.
        let mut membership = self.fanout.join(session, &scope, &self.cluster);
        let mut kept = self.overlay.subscribe();
        // A proxy that already holds a version newer than ours (we restarted from an older
        // snapshot, or it talked to another instance) gets a full view.
        let mut sent = if known > self.store.current().revision { 0 } else { known };
        // The first response brings the proxy from the version it says it has, through the
        // change log; later ones carry the changes the fanout hands this session.
        let mut first = true;
        // Whether the last response included observations not yet committed.
        let mut showed_overlay = false;
        // Services subscribed since the last response, not yet in `scope`.
        let mut added: Vec<String> = Vec::new();
        // Something to look at: changes were handed over, the kept observations or the scope
        // changed. (An ACK alone sends nothing; while observations are kept every response is a
        // full view, and answering each ACK with another would never end.)
        let mut dirty = true;
        loop {
            if dirty {
                dirty = false;
                // In this order: see `Fanout::through`.
                let through = self.fanout.through();
                let pending = membership.take();
                if pending.closed {
                    return false;
                }
                let state = self.store.current();
                kept.borrow_and_update();
                // Observations that wait for the quorum: a full view of the state with them
                // applied (they have no revision of their own); once they are gone, one more full
                // view.
                let view = self.overlay.view(&state);
                let (resp, version) = match &view {
                    Some(v) => (Some(full_view(v, &self.cluster, &scope, &added)), v.revision),
                    None if showed_overlay || pending.full => {
                        (Some(full_view(&state, &self.cluster, &scope, &added)), state.revision)
                    }
                    None if first => (build_response(&state, sent, &self.cluster, &scope, &added), state.revision),
                    // Every change up to `through` (and up to what was handed over) that
                    // concerns this proxy is in `pending` or was sent before; one committed since
                    // is on its way here and will be sent again, which is harmless.
                    None => (
                        build_delta(&state, &pending.keys, &self.cluster, &scope, &added),
                        sent.max(through).max(pending.through),
                    ),
                };
                first = false;
                showed_overlay = view.is_some();
                let resp = resp.map(|mut r| {
                    r.provisional = showed_overlay;
                    r.version = version;
                    r
                });
                if let Scope::Services(set) = &mut scope
                    && !added.is_empty()
                {
                    set.extend(added.drain(..));
                    self.proxies.set_view(session, scope.describe());
                }
                sent = version;
                if let Some(resp) = resp {
                    let bytes = resp.encoded_len() as u64;
                    let full = resp.full;
                    if tx.send(Ok(resp)).await.is_err() {
                        return false;
                    }
                    self.proxies.sent(session, sent);
                    self.metrics.record_push(full, bytes);
                }
            }
            tokio::select! {
                () = membership.wait() => dirty = true,
                changed = kept.changed() => if changed.is_err() { return false } else { dirty = true },
                msg = inbound.message() => match msg {
                    Ok(Some(pb::DiscoveryRequest { kind: Some(Kind::Ack(a)) })) => self.proxies.acked(session, a.version),
                    Ok(Some(pb::DiscoveryRequest { kind: Some(Kind::Nack(n)) })) => {
                        tracing::warn!(session, version = n.version, reason = %n.reason, "proxy refused a configuration");
                        self.metrics.nacks.inc();
                        self.proxies.nacked(session, &n.reason);
                    }
                    Ok(Some(pb::DiscoveryRequest { kind: Some(Kind::Subscribe(sub)) })) => {
                        // `added` is empty here: each pass of the loop moves it into `scope`.
                        let new = scope.missing(&sub.services);
                        if !new.is_empty() {
                            dirty = true;
                            if scope.fits(new.len()) {
                                // Changes reach the session from now on; into `scope` once the
                                // response carrying their endpoints is built.
                                membership.add_services(&new);
                                added = new;
                            } else {
                                // Past the limit: the whole view, once.
                                membership.widen_to_all();
                                scope = Scope::All;
                                sent = 0;
                                first = true;
                                self.proxies.set_view(session, scope.describe());
                            }
                        }
                    }
                    Ok(Some(pb::DiscoveryRequest { kind: Some(Kind::Deregister(_)) })) => return true,
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return false,
                },
            }
        }
    }
}

/// After a restart, marks unhealthy the endpoints of this cluster whose proxy did not come back
/// within the grace period (a proxy that died while the control plane was down).
pub async fn expire_orphans(
    store: Arc<dyn Store>,
    overlay: Arc<crate::overlay::Overlay>,
    proxies: Arc<ProxyTracker>,
    cluster: String,
    node: String,
    grace: Duration,
) {
    tokio::time::sleep(grace).await;
    let state = store.current();
    let registrar = format!("{cluster}/{node}");
    // Only endpoints registered through this instance: a proxy of another instance of the same
    // cluster is that instance's business.
    let orphans: BTreeSet<String> = state
        .endpoints
        .values()
        .filter(|e| e.cluster == cluster && e.healthy && e.registrar == registrar && !proxies.is_owned(&e.id))
        .map(|e| e.id.clone())
        .collect();
    for id in orphans {
        tracing::info!(endpoint = %id, "proxy did not reconnect after restart; marking unhealthy");
        let cmd = Command::SetEndpointHealth { id, healthy: false, registrar: Some(registrar.clone()) };
        let _ = overlay.observe(cmd).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(identity: &str, service: &str, address: &str) -> pb::Hello {
        pb::Hello {
            node: Some(pb::Node {
                identity: identity.into(),
                cluster: "a".into(),
                zone: "z".into(),
                instance: "web-1".into(),
            }),
            endpoints: vec![pb::EndpointRegistration {
                service: service.into(),
                address: address.into(),
                protocol: "http".into(),
                weight: 0,
                ready: true,
            }],
            known_version: 0,
            gateway_address: String::new(),
            scoped: false,
            services: Vec::new(),
            scoped_known_version: 0,
        }
    }

    #[test]
    fn registrations_are_checked_against_the_certificate() {
        let peer: SpiffeId = "spiffe://trellis.local/ns/default/sa/web".parse().unwrap();
        let ok = registrations(&hello(&peer.to_string(), "web.default", "127.0.0.1:9"), &peer, "a").unwrap();
        assert_eq!(ok[0].0.id, "a/default/web/web-1");
        assert_eq!(ok[0].0.weight, 1);
        let cases = [
            (
                hello("spiffe://trellis.local/ns/default/sa/other", "web.default", "127.0.0.1:9"),
                tonic::Code::PermissionDenied,
            ),
            (hello("", "web.prod", "127.0.0.1:9"), tonic::Code::PermissionDenied),
            (hello("", "web", "127.0.0.1:9"), tonic::Code::InvalidArgument),
            (hello("", "web.default", "localhost"), tonic::Code::InvalidArgument),
        ];
        for (h, code) in cases {
            assert_eq!(registrations(&h, &peer, "a").unwrap_err().code(), code, "{h:?}");
        }
        let mut other_cluster = hello("", "web.default", "127.0.0.1:9");
        other_cluster.node.as_mut().unwrap().cluster = "b".into();
        assert_eq!(registrations(&other_cluster, &peer, "a").unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn deltas_carry_only_changes() {
        let mut s = State::default();
        let regs = registrations(
            &hello("", "web.default", "127.0.0.1:9"),
            &"spiffe://trellis.local/ns/default/sa/web".parse().unwrap(),
            "a",
        )
        .unwrap();
        for i in 0..100u64 {
            let mut e = regs[0].0.clone();
            e.id = format!("a/default/web/{i}");
            s.apply(i + 1, &Command::UpsertEndpoint { endpoint: e, protocol: Protocol::Http }).unwrap();
        }
        let full = build_response(&s, 0, "a", &Scope::All, &[]).unwrap();
        assert!(full.full);
        assert_eq!(full.endpoints.len(), 100);
        let v = s.revision;
        s.apply(v + 1, &Command::SetEndpointHealth { id: "a/default/web/7".into(), healthy: false, registrar: None })
            .unwrap();
        s.apply(v + 2, &Command::DeleteEndpoint { id: "a/default/web/8".into(), registrar: None }).unwrap();
        let delta = build_response(&s, v, "a", &Scope::All, &[]).unwrap();
        assert!(!delta.full);
        assert_eq!(delta.endpoints.len(), 1);
        assert!(!delta.endpoints[0].healthy);
        assert_eq!(delta.removed_endpoints, vec!["a/default/web/8".to_string()]);
        assert!(delta.encoded_len() * 20 < full.encoded_len(), "a delta must be far smaller than the full view");
        assert!(build_response(&s, s.revision, "a", &Scope::All, &[]).is_none());
    }

    fn endpoint(cluster: &str, service: &str, i: u32) -> Command {
        Command::UpsertEndpoint {
            endpoint: crate::state::Endpoint {
                id: format!("{cluster}/default/{service}/{i}"),
                service: format!("{service}.default"),
                cluster: cluster.into(),
                zone: "z".into(),
                address: format!("127.0.0.1:{}", 9000 + i),
                identity: String::new(),
                healthy: true,
                weight: 1,
                revision: 0,
                registrar: String::new(),
            },
            protocol: Protocol::Http,
        }
    }

    fn ids(r: &pb::DiscoveryResponse) -> Vec<String> {
        let mut v: Vec<String> = r.endpoints.iter().map(|e| e.id.clone()).collect();
        v.sort();
        v
    }

    #[test]
    fn local_services_stay_in_their_cluster_and_exported_ones_are_seen_everywhere() {
        let mut s = State::default();
        s.apply(1, &endpoint("a", "web", 1)).unwrap();
        s.apply(2, &endpoint("b", "web", 1)).unwrap();
        s.apply(3, &endpoint("b", "db", 1)).unwrap();
        // Nothing is exported: each cluster sees its own.
        assert_eq!(ids(&build_response(&s, 0, "a", &Scope::All, &[]).unwrap()), vec!["a/default/web/1"]);
        assert_eq!(
            ids(&build_response(&s, 0, "b", &Scope::All, &[]).unwrap()),
            vec!["b/default/db/1", "b/default/web/1"]
        );
        // Exporting web brings b's web endpoint to a, as a delta.
        let v = s.revision;
        let mut web = s.services.get("web.default").cloned().unwrap();
        web.exported = true;
        s.apply(4, &Command::UpsertService(web.clone())).unwrap();
        let d = build_response(&s, v, "a", &Scope::All, &[]).unwrap();
        assert_eq!(ids(&d), vec!["b/default/web/1"]);
        assert!(d.removed_endpoints.is_empty());
        assert_eq!(
            ids(&build_response(&s, 0, "a", &Scope::All, &[]).unwrap()),
            vec!["a/default/web/1", "b/default/web/1"]
        );
        // Endpoints carry their cluster's region, and a full response the viewer's, for the
        // proxy's failover order.
        for (name, region) in [("a", "us"), ("b", "eu")] {
            let c = crate::state::Cluster::named(name, region);
            s.clusters.insert(name.into(), c);
        }
        let full = build_response(&s, 0, "a", &Scope::All, &[]).unwrap();
        assert_eq!(full.region, "us");
        let regions: Vec<&str> = full.endpoints.iter().map(|e| e.region.as_str()).collect();
        assert_eq!(regions, ["us", "eu"]);
        // A new endpoint of b's local db is not sent to a, even as a delta: at most a removal.
        let v = s.revision;
        s.apply(5, &endpoint("b", "db", 2)).unwrap();
        let d = build_response(&s, v, "a", &Scope::All, &[]).unwrap();
        assert!(d.endpoints.is_empty(), "{:?}", d.endpoints);
        // Unexporting takes b's web endpoint away from a again.
        let v = s.revision;
        web.exported = false;
        s.apply(6, &Command::UpsertService(web)).unwrap();
        let d = build_response(&s, v, "a", &Scope::All, &[]).unwrap();
        assert_eq!(d.removed_endpoints, vec!["b/default/web/1".to_string()]);
    }

    fn scope(services: &[&str]) -> Scope {
        Scope::Services(services.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn a_scoped_view_holds_the_subscribed_services_and_hears_only_of_their_changes() {
        let mut s = State::default();
        s.apply(1, &endpoint("a", "web", 1)).unwrap();
        s.apply(2, &endpoint("a", "db", 1)).unwrap();
        s.apply(3, &endpoint("a", "cache", 1)).unwrap();
        let web = scope(&["web.default"]);
        let full = build_response(&s, 0, "a", &web, &[]).unwrap();
        assert!(full.full && full.scoped);
        assert_eq!(ids(&full), vec!["a/default/web/1"]);
        assert_eq!(full.subscribed, vec!["web.default".to_string()]);
        // Every service's definition is still there (virtual addresses, policy).
        assert_eq!(full.services.len(), 3);
        let all = build_response(&s, 0, "a", &Scope::All, &[]).unwrap();
        assert!(!all.scoped && all.subscribed.is_empty());
        assert_eq!(all.endpoints.len(), 3);

        // A change of a service out of scope is not sent at all, not even as a removal.
        let v = s.revision;
        s.apply(4, &endpoint("a", "db", 2)).unwrap();
        s.apply(5, &Command::DeleteEndpoint { id: "a/default/cache/1".into(), registrar: None }).unwrap();
        assert!(build_response(&s, v, "a", &web, &[]).is_none());
        // One in scope is.
        s.apply(6, &endpoint("a", "web", 2)).unwrap();
        let d = build_response(&s, v, "a", &web, &[]).unwrap();
        assert_eq!(ids(&d), vec!["a/default/web/2"]);
        assert!(d.removed_endpoints.is_empty(), "{:?}", d.removed_endpoints);

        // Subscribing to db brings all of its endpoints, with or without other changes, once.
        let v = s.revision;
        let d = build_response(&s, v, "a", &web, &["db.default".to_string()]).unwrap();
        assert!(!d.full);
        assert_eq!(ids(&d), vec!["a/default/db/1", "a/default/db/2"]);
        assert_eq!(d.subscribed, vec!["db.default".to_string()]);
        s.apply(7, &endpoint("a", "db", 3)).unwrap();
        s.apply(8, &endpoint("a", "web", 3)).unwrap();
        let d = build_response(&s, v, "a", &web, &["db.default".to_string()]).unwrap();
        assert_eq!(ids(&d), vec!["a/default/db/1", "a/default/db/2", "a/default/db/3", "a/default/web/3"]);
        // A service with no endpoint yet is confirmed all the same: the proxy stops waiting.
        let d = build_response(&s, s.revision, "a", &web, &["new.default".to_string()]).unwrap();
        assert!(d.endpoints.is_empty());
        assert_eq!(d.subscribed, vec!["new.default".to_string()]);
        // A full view names the whole scope, the services added with it included.
        let full = build_response(&s, 0, "a", &web, &["db.default".to_string()]).unwrap();
        assert_eq!(full.subscribed, vec!["db.default".to_string(), "web.default".to_string()]);
        assert_eq!(full.endpoints.len(), 6);
    }

    #[test]
    fn subscriptions_skip_impossible_names_and_too_many_become_the_full_view() {
        let mut sc = scope(&["web.default"]);
        assert_eq!(sc.add(&["db.default".into(), "web.default".into(), "db.default".into()]), ["db.default"]);
        assert!(sc.add(&["not a service".into()]).is_empty());
        assert_eq!(sc, scope(&["db.default", "web.default"]), "an impossible name is not subscribed");
        let many: Vec<String> = (0..MAX_SUBSCRIBED).map(|i| format!("s{i}.default")).collect();
        assert!(sc.add(&many).is_empty());
        assert_eq!(sc, Scope::All);
        let mut hello = hello("", "web.default", "127.0.0.1:9");
        assert_eq!(Scope::from_hello(&hello), Scope::All);
        hello.scoped = true;
        hello.services = vec!["api.default".into(), "Bad".into()];
        assert_eq!(Scope::from_hello(&hello), scope(&["api.default"]));
    }

    #[test]
    fn a_gateway_sees_its_own_clusters_endpoints_only() {
        let mut s = State::default();
        s.apply(1, &endpoint("a", "web", 1)).unwrap();
        s.apply(2, &endpoint("b", "web", 1)).unwrap();
        let mut web = s.services.get("web.default").cloned().unwrap();
        web.exported = true;
        s.apply(3, &Command::UpsertService(web.clone())).unwrap();
        assert_eq!(ids(&build_response(&s, 0, "a", &Scope::All, &[]).unwrap()), ["a/default/web/1", "b/default/web/1"]);
        let full = build_response(&s, 0, "a", &Scope::OwnCluster, &[]).unwrap();
        assert_eq!(ids(&full), ["a/default/web/1"]);
        assert!(!full.scoped);
        // Changes in other clusters, and exporting or not, send it nothing; its own cluster's do.
        let v = s.revision;
        s.apply(4, &endpoint("b", "web", 2)).unwrap();
        web.exported = false;
        s.apply(5, &Command::UpsertService(web)).unwrap();
        let d = build_response(&s, v, "a", &Scope::OwnCluster, &[]).unwrap();
        assert!(d.endpoints.is_empty() && d.removed_endpoints.is_empty(), "{d:?}");
        assert_eq!(d.services.len(), 1, "the service definition itself is sent");
        let v = s.revision;
        s.apply(6, &endpoint("a", "web", 2)).unwrap();
        assert_eq!(ids(&build_response(&s, v, "a", &Scope::OwnCluster, &[]).unwrap()), ["a/default/web/2"]);
        let mut own = Scope::OwnCluster;
        assert!(own.add(&["db.default".into()]).is_empty());
        assert_eq!(own, Scope::OwnCluster);
    }
}
