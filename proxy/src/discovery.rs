//! The discovery client: one bidirectional stream to the control plane, and the single writer of
//! the proxy's [`Routes`].
//!
//! The proxy says `Hello` (who it is, the endpoint it serves, the version it holds), then applies
//! every response and answers it with `Ack` or `Nack`. Routes are published through a
//! `tokio::sync::watch`, so request paths read a snapshot without locks. When the stream breaks the
//! last good routes stay in place (static stability) and the client reconnects with jittered
//! exponential backoff. When the proxy drains it sends `Deregister` before closing.
//!
//! A proxy's view is scoped by default: the control plane sends every service's definition but
//! only the endpoints of the services the proxy calls: those of its `--upstream` listeners from
//! the start, and any other the first time the application calls it (transparent mode), through
//! a [`Subscriptions`] handle. At 100,000 endpoints a full view is about 15 MiB per proxy; a
//! scoped one is the size of what the proxy uses. Gateways ask for the full view; the control
//! plane sends them their own cluster's endpoints, the only ones they dial.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use trellis_proto::SpiffeId;
use trellis_proto::pb::discovery_client::DiscoveryClient;
use trellis_proto::pb::discovery_request::Kind;
use trellis_proto::pb::{
    Ack, Deregister, DiscoveryRequest, DiscoveryResponse, EndpointRegistration, Hello, Nack, Node, Subscribe,
};
use trellis_proto::verify::SharedBundle;

use crate::backoff::Backoff;
use crate::drain::Drain;
use crate::metrics::Metrics;
use crate::routes::{AppProtocol, Routes, ServiceName, bundle_from_proto};

/// Reconnect backoff bounds.
pub const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Reconnect backoff cap.
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How long a draining proxy waits for the control plane to close the stream after `Deregister`.
pub const DEREGISTER_WAIT: Duration = Duration::from_secs(1);
/// How long a connection to a service out of the proxy's view waits for the control plane to
/// bring that service's endpoints.
pub const SUBSCRIBE_WAIT: Duration = Duration::from_secs(3);

/// Which endpoints the proxy asks the control plane for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// Every endpoint the proxy may see.
    Full,
    /// The endpoints of these services, and of those it subscribes to later.
    Scoped(Vec<ServiceName>),
}

/// Asks for services' endpoints to be added to a scoped view, and waits for them. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Subscriptions {
    wanted: Arc<Mutex<BTreeSet<ServiceName>>>,
    notify: Arc<Notify>,
    routes: watch::Receiver<Arc<Routes>>,
}

impl Subscriptions {
    /// The routes of the view.
    pub fn routes(&self) -> watch::Receiver<Arc<Routes>> {
        self.routes.clone()
    }

    /// Waits until `service`'s endpoints are in the view, subscribing to it if need be; false if
    /// the control plane did not bring them within `wait` (the caller goes on with what it has).
    pub async fn ensure(&self, service: &ServiceName, wait: Duration) -> bool {
        if self.routes.borrow().in_view(service) {
            return true;
        }
        if self.wanted.lock().unwrap_or_else(|p| p.into_inner()).insert(service.clone()) {
            self.notify.notify_one();
        }
        let mut routes = self.routes.clone();
        let arrived = tokio::time::timeout(wait, routes.wait_for(|r| r.in_view(service))).await;
        matches!(arrived, Ok(Ok(_)))
    }
}

/// Who this proxy is, as told in `Hello`.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The SPIFFE ID of its certificate.
    pub identity: SpiffeId,
    /// Cluster name.
    pub cluster: String,
    /// Zone name.
    pub zone: String,
    /// Instance name, unique in the cluster.
    pub instance: String,
    /// The endpoint it serves, if any.
    pub serves: Option<Registration>,
    /// An east-west gateway: the address other clusters' proxies dial.
    pub gateway_address: Option<String>,
    /// Which endpoints it asks for.
    pub view: View,
}

/// The endpoint a proxy registers for its workload.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The service.
    pub service: ServiceName,
    /// `host:port` other proxies dial.
    pub address: String,
    /// Application protocol.
    pub protocol: AppProtocol,
}

impl NodeInfo {
    fn hello(&self, known_version: u64, services: &BTreeSet<ServiceName>) -> DiscoveryRequest {
        let scoped = self.view != View::Full;
        let endpoints = self
            .serves
            .iter()
            .map(|r| EndpointRegistration {
                service: r.service.to_string(),
                address: r.address.clone(),
                protocol: r.protocol.as_str().to_string(),
                weight: 1,
                ready: true,
            })
            .collect();
        DiscoveryRequest {
            kind: Some(Kind::Hello(Hello {
                node: Some(Node {
                    identity: self.identity.to_string(),
                    cluster: self.cluster.clone(),
                    zone: self.zone.clone(),
                    instance: self.instance.clone(),
                }),
                endpoints,
                // A scoped proxy's version travels in a field of its own: a control plane that
                // does not know scoped views answers known_version 0 with a full view.
                known_version: if scoped { 0 } else { known_version },
                scoped_known_version: if scoped { known_version } else { 0 },
                gateway_address: self.gateway_address.clone().unwrap_or_default(),
                scoped,
                services: if scoped { services.iter().map(ToString::to_string).collect() } else { Vec::new() },
            })),
        }
    }
}

/// How a stream session ended.
enum SessionEnd {
    Drained,
    Broken(String),
}

/// The discovery client task.
pub struct DiscoveryTask {
    client: DiscoveryClient<Channel>,
    node: NodeInfo,
    trust_domain: String,
    bundle: SharedBundle,
    metrics: Arc<Metrics>,
    routes: watch::Sender<Arc<Routes>>,
    acked: u64,
    drain: Drain,
    /// Services a scoped view subscribes to (asked for in every Hello).
    interest: BTreeSet<ServiceName>,
    wanted: Arc<Mutex<BTreeSet<ServiceName>>>,
    notify: Arc<Notify>,
}

impl DiscoveryTask {
    /// A task streaming from `channel`; returns it, the routes it will publish and the handle
    /// that subscribes to more services.
    pub fn new(
        channel: Channel,
        node: NodeInfo,
        bundle: SharedBundle,
        metrics: Arc<Metrics>,
        drain: Drain,
    ) -> (Self, watch::Receiver<Arc<Routes>>, Subscriptions) {
        let (tx, rx) = watch::channel(Arc::new(Routes::default()));
        let trust_domain = node.identity.trust_domain().to_string();
        let interest = match &node.view {
            View::Full => BTreeSet::new(),
            View::Scoped(calls) => calls.iter().cloned().collect(),
        };
        let subscriptions =
            Subscriptions { wanted: Default::default(), notify: Arc::new(Notify::new()), routes: rx.clone() };
        let task = Self {
            interest,
            wanted: subscriptions.wanted.clone(),
            notify: subscriptions.notify.clone(),
            client: DiscoveryClient::new(channel),
            node,
            trust_domain,
            bundle,
            metrics,
            routes: tx,
            acked: 0,
            drain,
        };
        (task, rx, subscriptions)
    }

    /// Services wanted since they were last looked at and not yet subscribed to.
    fn newly_wanted(&mut self) -> Vec<ServiceName> {
        let wanted = std::mem::take(&mut *self.wanted.lock().unwrap_or_else(|p| p.into_inner()));
        let new: Vec<ServiceName> = wanted.into_iter().filter(|s| !self.interest.contains(s)).collect();
        self.interest.extend(new.iter().cloned());
        new
    }

    /// Streams until the drain; reconnects on every failure.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
        loop {
            if self.drain.is_draining() {
                return;
            }
            match self.session(&mut backoff).await {
                SessionEnd::Drained => return,
                SessionEnd::Broken(reason) => tracing::warn!(
                    %reason,
                    version = self.routes.borrow().version,
                    "discovery stream lost; serving the last configuration and reconnecting"
                ),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = self.drain.signaled() => return,
            }
        }
    }

    async fn session(&mut self, backoff: &mut Backoff) -> SessionEnd {
        let (tx, rx) = mpsc::channel(16);
        self.newly_wanted();
        // Subscriptions to services that no longer exist (or never did) end with the stream, so
        // a long-lived proxy's interest follows the services it can still call.
        // (The view held still counts them in: a full view replaces it.)
        let mut pruned = false;
        if let View::Scoped(calls) = &self.node.view {
            let routes = self.routes.borrow().clone();
            if routes.loaded {
                let before = self.interest.len();
                self.interest.retain(|s| routes.services.contains_key(s) || calls.contains(s));
                pruned = self.interest.len() != before;
            }
        }
        // A delta from the version held brings only changes, within the view asked for now: the
        // view held must be that view (a service subscribed to while the stream was down, or a
        // full view held where a scoped one is asked for, needs a full response).
        let confirmed = self.routes.borrow().scope.clone();
        let known = match (&self.node.view, confirmed) {
            (View::Full, None) => self.acked,
            (View::Scoped(_), Some(scope)) if !pruned && self.interest.is_subset(&scope) => self.acked,
            _ => 0,
        };
        if tx.send(self.node.hello(known, &self.interest)).await.is_err() {
            return SessionEnd::Broken("request stream closed".into());
        }
        let drain = self.drain.clone();
        let notify = self.notify.clone();
        let mut client = self.client.clone();
        let opened = tokio::select! {
            r = client.stream(ReceiverStream::new(rx)) => r,
            _ = drain.signaled() => return SessionEnd::Drained,
        };
        let mut inbound = match opened {
            Ok(r) => r.into_inner(),
            Err(status) => return SessionEnd::Broken(status.to_string()),
        };
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(resp)) => {
                        backoff.reset();
                        let reply = self.apply(&resp);
                        if tx.send(reply).await.is_err() {
                            return SessionEnd::Broken("request stream closed".into());
                        }
                    }
                    Ok(None) => return SessionEnd::Broken("closed by the control plane".into()),
                    Err(status) => return SessionEnd::Broken(status.to_string()),
                },
                _ = notify.notified() => {
                    let new = self.newly_wanted();
                    if !new.is_empty() && self.node.view != View::Full {
                        tracing::debug!(services = ?new, "subscribing");
                        let services = new.iter().map(ToString::to_string).collect();
                        let sub = DiscoveryRequest { kind: Some(Kind::Subscribe(Subscribe { services })) };
                        if tx.send(sub).await.is_err() {
                            return SessionEnd::Broken("request stream closed".into());
                        }
                    }
                },
                _ = drain.signaled() => {
                    let _ = tx.send(DiscoveryRequest { kind: Some(Kind::Deregister(Deregister {})) }).await;
                    // Half-close, then give the control plane a moment to take the message and
                    // end the stream, so the Deregister is not lost in a reset.
                    drop(tx);
                    let _ = tokio::time::timeout(DEREGISTER_WAIT, async {
                        while let Ok(Some(_)) = inbound.message().await {}
                    })
                    .await;
                    tracing::info!("deregistered from the control plane");
                    return SessionEnd::Drained;
                }
            }
        }
    }

    /// Applies one response and says what to answer.
    fn apply(&mut self, resp: &DiscoveryResponse) -> DiscoveryRequest {
        let mut rejected = Vec::new();
        // The bundle first: new endpoints may already carry certificates of a new root.
        if let Some(pb) = &resp.trust_bundle {
            match bundle_from_proto(pb, &self.trust_domain) {
                Ok(b) => self.bundle.store(b),
                Err(e) => rejected.push(e.to_string()),
            }
        }
        let current = self.routes.borrow().clone();
        let applied = current.apply(resp);
        rejected.extend(applied.rejected);
        let endpoints = applied.routes.endpoints.len();
        self.routes.send_replace(Arc::new(applied.routes));
        self.metrics.config_version.set(i64::try_from(resp.version).unwrap_or(i64::MAX));
        if rejected.is_empty() {
            // A view with uncommitted observations is no base for a delta from another instance.
            self.acked = if resp.provisional { 0 } else { resp.version };
            self.metrics.config_acks.inc();
            tracing::debug!(version = resp.version, full = resp.full, endpoints, "configuration applied");
            DiscoveryRequest { kind: Some(Kind::Ack(Ack { version: resp.version })) }
        } else {
            self.metrics.config_nacks.inc();
            let reason = rejected.join("; ");
            tracing::warn!(version = resp.version, %reason, "configuration partly refused (NACK)");
            DiscoveryRequest { kind: Some(Kind::Nack(Nack { version: resp.version, reason })) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(view: View) -> NodeInfo {
        NodeInfo {
            identity: "spiffe://trellis.local/ns/default/sa/web".parse().expect("id"),
            cluster: "a".into(),
            zone: "z".into(),
            instance: "web-1".into(),
            serves: None,
            gateway_address: None,
            view,
        }
    }

    fn hello_of(r: DiscoveryRequest) -> Hello {
        match r.kind {
            Some(Kind::Hello(h)) => h,
            other => panic!("not a Hello: {other:?}"),
        }
    }

    #[test]
    fn a_scoped_hello_keeps_its_version_where_only_a_scope_aware_control_plane_reads_it() {
        let web: ServiceName = "web.default".parse().expect("name");
        let services = BTreeSet::from([web.clone()]);
        let scoped = hello_of(node(View::Scoped(vec![web])).hello(42, &services));
        assert!(scoped.scoped);
        assert_eq!(scoped.services, ["web.default"]);
        // A control plane that ignores the scope sees known_version 0 and sends a full view.
        assert_eq!((scoped.known_version, scoped.scoped_known_version), (0, 42));
        let full = hello_of(node(View::Full).hello(42, &services));
        assert!(!full.scoped && full.services.is_empty());
        assert_eq!((full.known_version, full.scoped_known_version), (42, 0));
    }
}
