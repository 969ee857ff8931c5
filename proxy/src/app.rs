//! Assembles a proxy from its parts and runs it until termination.
//!
//! [`build`] validates the configuration, obtains the first certificate (or fails with a message
//! that says what to do), binds every listener and starts the tasks. It returns an [`App`] with the
//! addresses actually bound, so tests and harnesses can use port 0.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_proto::tls::{IdentityStore, client_config, server_config};
use trellis_proto::verify::SharedBundle;
use trellis_proto::{ALPN_MESH_HTTP, ALPN_MESH_TCP, IdMatcher, SpiffeId, grpc};

use crate::admin::{self, AdminState, not_ready_reason};
use crate::authz::AllowTrustDomain;
use crate::balance::Locality;
use crate::config::{Config, ConfigError};
use crate::discovery::{DiscoveryTask, NodeInfo, Registration, Subscriptions, View};
use crate::drain::Drain;
use crate::gateways::{self, GatewayHealth, GatewayPool};
use crate::identity::{self, IdentityError, Signer};
use crate::inbound::{AppTarget, Inbound};
use crate::metrics::Metrics;
use crate::outbound::{Outbound, OutboundTimeouts, SNIFF_TIMEOUT};
use crate::pool::MeshConnector;
use crate::routes::Routes;

/// Why the proxy cannot start or run.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot get a certificate: {0}")]
    Identity(#[from] IdentityError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { what: String, addr: String, source: std::io::Error },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("cannot reach the control plane at {addr}: {reason}")]
    ControlPlane { addr: String, reason: String },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// What a harness reads from `--ready-file`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ReadyFile {
    /// Bound inbound address.
    pub inbound: SocketAddr,
    /// Bound admin address.
    pub admin: SocketAddr,
    /// Bound upstream listeners by service.
    pub upstreams: BTreeMap<String, SocketAddr>,
    /// SPIFFE ID of the proxy's certificate.
    pub identity: String,
}

/// A running proxy.
pub struct App {
    inbound: SocketAddr,
    admin: SocketAddr,
    upstreams: BTreeMap<String, SocketAddr>,
    identity: Arc<IdentityStore>,
    routes: watch::Receiver<Arc<Routes>>,
    subscriptions: Subscriptions,
    metrics: Arc<Metrics>,
    drain: Drain,
    drain_timeout: Duration,
    shutdown: watch::Sender<bool>,
    discovery: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("inbound", &self.inbound)
            .field("admin", &self.admin)
            .field("upstreams", &self.upstreams)
            .finish_non_exhaustive()
    }
}

/// Triggers the same drain as SIGTERM (tests, embedding).
#[derive(Debug, Clone)]
pub struct ShutdownHandle(watch::Sender<bool>);

impl ShutdownHandle {
    /// Starts the shutdown.
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

async fn bind(what: &str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), AppError> {
    let bind_err = |source| AppError::Bind { what: what.to_string(), addr: addr.to_string(), source };
    let l = TcpListener::bind(addr).await.map_err(bind_err)?;
    let local = l.local_addr().map_err(bind_err)?;
    Ok((l, local))
}

/// Builds and starts a proxy.
pub async fn build(config: Config) -> Result<App, AppError> {
    let config = config.validate()?;
    match serde_json::to_string(&config) {
        Ok(json) => tracing::info!(config = %json, "starting trellis-proxy"),
        Err(e) => tracing::warn!(error = %e, "cannot serialise the configuration for the log"),
    }
    // Everything that can be checked locally is, before any network call.
    let token = config.load_token()?;
    let id: SpiffeId = config.spiffe_id()?;
    let bundle = SharedBundle::new(config.load_trust_bundle()?);
    let store = IdentityStore::empty();
    let metrics = Metrics::new();
    let drain = Drain::new();
    let tls_err = |e: trellis_proto::tls::TlsError| AppError::Tls(e.to_string());

    // Control plane: the empty store means no client certificate on the first connection, which
    // is paid for with the token; later connections present the certificate.
    let cp_tls =
        client_config(Some(store.clone()), bundle.clone(), IdMatcher::AnyControlPlane, &[b"h2"]).map_err(tls_err)?;
    let cp_err = |e: tonic::transport::Error| AppError::ControlPlane {
        addr: config.control_plane.clone(),
        reason: e.to_string(),
    };
    let bootstrap = grpc::channel(&config.control_plane, cp_tls.clone()).map_err(cp_err)?;
    let signer = Signer::new(
        bootstrap,
        &config.control_plane,
        id.clone(),
        &config.namespace,
        &config.service_account,
        config.cert_ttl,
        bundle.clone(),
    );
    let signed = signer.first(&token, config.startup_timeout()).await?;
    identity::install(signed, &store, &bundle, &metrics);
    // A new channel, so its connection presents the certificate we just got.
    let channel = grpc::channel(&config.control_plane, cp_tls).map_err(cp_err)?;
    let signer = signer.with_channel(channel.clone());

    // Listeners first: the inbound address goes into Hello.
    let (inbound_l, inbound_addr) = bind("--inbound", config.inbound).await?;
    let (admin_l, admin_addr) = bind("--admin", config.admin).await?;
    let transparent_l = match config.transparent {
        Some(addr) => Some(bind("--transparent", addr).await?.0),
        None => None,
    };
    let mut upstream_ls = Vec::new();
    let mut upstreams = BTreeMap::new();
    for u in &config.upstreams {
        let (l, addr) = bind(&format!("--upstream {}", u.service), u.listen).await?;
        upstreams.insert(u.service.to_string(), addr);
        upstream_ls.push((l, u.service.clone()));
    }

    let advertise = config.advertise.clone().unwrap_or_else(|| inbound_addr.to_string());
    let node = NodeInfo {
        identity: id.clone(),
        cluster: config.cluster.clone(),
        zone: config.zone.clone(),
        instance: config.instance_name(),
        serves: config.service.clone().map(|service| Registration {
            service,
            address: advertise,
            protocol: config.protocol,
        }),
        gateway_address: None,
        view: if config.full_view {
            View::Full
        } else {
            View::Scoped(config.upstreams.iter().map(|u| u.service.clone()).collect())
        },
    };
    let (discovery, routes, subscriptions) =
        DiscoveryTask::new(channel, node, bundle.clone(), metrics.clone(), drain.clone());
    let discovery = tokio::spawn(discovery.run());

    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(identity::renew_forever(
        signer,
        store.clone(),
        bundle.clone(),
        metrics.clone(),
        token,
        drain.clone(),
    )));

    // Inbound.
    let inbound_tls = server_config(
        store.clone(),
        bundle.clone(),
        IdMatcher::AnyInTrustDomain,
        true,
        &[ALPN_MESH_HTTP, ALPN_MESH_TCP],
    )
    .map_err(tls_err)?;
    let app_target = match (&config.service, &config.app) {
        (Some(s), Some(a)) => Some(AppTarget { addr: a.clone(), protocol: config.protocol, service: s.to_string() }),
        _ => None,
    };
    let inbound =
        Inbound::new(inbound_tls, app_target, Arc::new(AllowTrustDomain::new(&config.trust_domain)), metrics.clone());
    tasks.push(tokio::spawn(inbound.serve(inbound_l, drain.clone())));

    // Outbound.
    let h2_tls = client_config(Some(store.clone()), bundle.clone(), IdMatcher::AnyWorkload, &[ALPN_MESH_HTTP])
        .map_err(tls_err)?;
    let tcp_tls = client_config(Some(store.clone()), bundle.clone(), IdMatcher::AnyWorkload, &[ALPN_MESH_TCP])
        .map_err(tls_err)?;
    // Other clusters' gateways: this proxy's identity, gateway servers, HTTP/2 for CONNECT.
    let gateway_tls =
        client_config(Some(store.clone()), bundle.clone(), IdMatcher::AnyGateway, &[b"h2"]).map_err(tls_err)?;
    let gateways = GatewayPool::new(gateway_tls, GatewayHealth::new(metrics.clone()));
    let outbound = Outbound::new(
        subscriptions.clone(),
        MeshConnector::new(h2_tls, ALPN_MESH_HTTP, config.connect_timeout(), metrics.clone())
            .with_gateways(gateways.clone()),
        MeshConnector::new(tcp_tls, ALPN_MESH_TCP, config.connect_timeout(), metrics.clone())
            .with_gateways(gateways.clone()),
        metrics.clone(),
        OutboundTimeouts { request: config.request_timeout(), per_try: config.per_try_timeout(), sniff: SNIFF_TIMEOUT },
        Locality { cluster: config.cluster.clone(), zone: config.zone.clone() },
        gateways.health().clone(),
    );
    tasks.push(tokio::spawn(gateways::probe_forever(gateways, routes.clone(), drain.clone())));
    for (l, service) in upstream_ls {
        tasks.push(tokio::spawn(outbound.clone().serve(l, service, drain.clone())));
    }
    if let Some(l) = transparent_l {
        tasks.push(tokio::spawn(outbound.clone().serve_transparent(l, drain.clone())));
    }
    tasks.push(tokio::spawn(prune_on_change(outbound, routes.clone())));

    // Admin.
    let admin_state =
        Arc::new(AdminState { metrics: metrics.clone(), routes: routes.clone(), identity: store.clone() });
    tasks.push(tokio::spawn(admin::serve(admin_l, admin_state, drain.clone())));

    if let Some(path) = config.ready_file.clone() {
        let ready = ReadyFile {
            inbound: inbound_addr,
            admin: admin_addr,
            upstreams: upstreams.clone(),
            identity: id.to_string(),
        };
        tasks.push(tokio::spawn(write_ready_file_when_ready(path, ready, routes.clone())));
    }

    tracing::info!(%id, inbound = %inbound_addr, admin = %admin_addr, ?upstreams, "proxy started");
    Ok(App {
        inbound: inbound_addr,
        admin: admin_addr,
        upstreams,
        identity: store,
        routes,
        subscriptions,
        metrics,
        drain,
        drain_timeout: config.drain_timeout(),
        shutdown: watch::channel(false).0,
        discovery,
        tasks,
    })
}

async fn prune_on_change(outbound: Arc<Outbound>, mut routes: watch::Receiver<Arc<Routes>>) {
    while routes.changed().await.is_ok() {
        let current = routes.borrow_and_update().clone();
        outbound.prune(&current);
    }
}

async fn write_ready_file_when_ready(
    path: std::path::PathBuf,
    ready: ReadyFile,
    mut routes: watch::Receiver<Arc<Routes>>,
) {
    if routes.wait_for(|r| r.loaded).await.is_err() {
        return;
    }
    match write_atomically(&path, &ready) {
        Ok(()) => tracing::info!(path = %path.display(), "ready file written"),
        Err(e) => tracing::error!(path = %path.display(), error = %e, "cannot write the ready file"),
    }
}

/// Writes JSON to a temporary file next to `path`, then renames it, so readers never see half.
fn write_atomically(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let json = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "ready".into());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}

impl App {
    /// The bound inbound (mTLS) address.
    pub fn inbound_addr(&self) -> SocketAddr {
        self.inbound
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The bound local listener of an upstream service (`name.namespace`).
    pub fn upstream_addr(&self, service: &str) -> Option<SocketAddr> {
        self.upstreams.get(service).copied()
    }

    /// The certificate store (current identity and expiry).
    pub fn identity(&self) -> &Arc<IdentityStore> {
        &self.identity
    }

    /// The routes as published by the discovery client.
    pub fn routes(&self) -> watch::Receiver<Arc<Routes>> {
        self.routes.clone()
    }

    /// What brings a service's endpoints into a scoped view (as a first call to it does).
    pub fn subscriptions(&self) -> &Subscriptions {
        &self.subscriptions
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// True when a certificate and a first configuration are present.
    pub fn is_ready(&self) -> bool {
        not_ready_reason(&self.identity, &self.routes.borrow()).is_none()
    }

    /// Waits until ready, up to `timeout`; returns whether it is.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut routes = self.routes.clone();
        let _ = tokio::time::timeout(timeout, routes.wait_for(|r| r.loaded)).await;
        self.is_ready()
    }

    /// A handle that starts the drain like SIGTERM does.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// Runs until SIGTERM, SIGINT or [`ShutdownHandle::shutdown`], then drains.
    pub async fn wait_termination(self) -> Result<(), AppError> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(AppError::Signals)?;
        let mut int = signal(SignalKind::interrupt()).map_err(AppError::Signals)?;
        let mut requested = self.shutdown.subscribe();
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
            _ = requested.wait_for(|s| *s) => tracing::info!("shutdown requested"),
        }
        self.drain().await;
        Ok(())
    }

    /// Drains at once (without waiting for a signal): stop accepting, deregister, let in-flight
    /// work finish up to the drain timeout, then force.
    pub async fn shutdown(self) {
        self.drain().await;
    }

    async fn drain(self) {
        let App { drain, drain_timeout, mut discovery, tasks, .. } = self;
        tracing::info!(timeout = ?drain_timeout, "draining");
        drain.start();
        // The discovery task sends Deregister and ends by itself; it is bounded all the same.
        let deregister = async {
            if tokio::time::timeout(drain_timeout.max(Duration::from_secs(2)), &mut discovery).await.is_err() {
                discovery.abort();
            }
        };
        let (left, ()) = tokio::join!(drain.wait_idle(drain_timeout), deregister);
        if left > 0 {
            tracing::warn!(connections = left, "drain timeout reached; closing the remaining connections");
        }
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        tracing::info!("drained");
    }
}
