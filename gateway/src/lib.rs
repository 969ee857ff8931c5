//! The east-west gateway: an mTLS HTTP/2 listener that accepts one `CONNECT` per tunnelled
//! connection from proxies of other clusters and splices it to an endpoint of its own cluster,
//! without terminating the inner mTLS (the two proxies run theirs end to end through it).
//!
//! It is built from `trellis-proxy`'s parts: certificates ([`trellis_proxy::identity`]), the
//! discovery client and routes ([`trellis_proxy::discovery`], [`trellis_proxy::routes`]),
//! endpoint choice ([`trellis_proxy::balance`]) and the drain.
//!
//! A request is `CONNECT <service>.<namespace>:<port>` from a workload of the federation (its
//! certificate verified against the trust bundle). The gateway refuses, with a status and a
//! reason in the body: an unknown service (404), a service that is not exported (403), a
//! service with no healthy endpoint in this cluster (503), an unreachable endpoint (502). The
//! caller may name the endpoint it chose with the `trellis-endpoint` header (it keeps the health
//! of each backend and checks that backend's identity in the inner TLS); otherwise the gateway
//! picks one by power of two choices.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use trellis_proto::tls::{IdentityStore, client_config, server_config};
use trellis_proto::verify::{IdMatcher, SharedBundle, TrustBundle};
use trellis_proto::{SpiffeId, grpc};
use trellis_proxy::balance::Balancer;
use trellis_proxy::coalesce::Coalesce;
use trellis_proxy::discovery::{DiscoveryTask, NodeInfo, View};
use trellis_proxy::drain::Drain;
use trellis_proxy::identity::{self, Signer};
use trellis_proxy::routes::{EndpointList, Routes, ServiceName};

/// The header naming the endpoint the caller chose.
pub const ENDPOINT_HEADER: &str = "trellis-endpoint";
/// How long dialing a local endpoint may take.
const DIAL_TIMEOUT: Duration = Duration::from_millis(750);

/// Configuration of `trellis-gateway`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "trellis-gateway", version, about = "Trellis east-west gateway: mTLS CONNECT tunnels into a cluster")]
pub struct Config {
    /// `host:port` of a control plane of this gateway's cluster.
    #[arg(long, env = "TRELLIS_CONTROL_PLANE")]
    pub control_plane: String,
    /// PEM file of the federation's root certificates (the control plane writes it).
    #[arg(long, env = "TRELLIS_TRUST_BUNDLE")]
    pub trust_bundle: PathBuf,
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = trellis_proto::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// The gateway token (`trellis token gateway create`), for the first certificate.
    #[arg(long, env = "TRELLIS_GATEWAY_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// Read the gateway token from this file.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// This gateway's cluster.
    #[arg(long, env = "TRELLIS_CLUSTER")]
    pub cluster: String,
    /// Name of this gateway instance (several gateways may serve one cluster).
    #[arg(long, default_value = "gateway-1")]
    pub instance: String,
    /// The mTLS HTTP/2 listener other clusters' proxies connect to.
    #[arg(long, default_value = "0.0.0.0:15443")]
    pub listen: SocketAddr,
    /// The address other clusters' proxies dial (default: the bound listener, unless it is
    /// unspecified such as 0.0.0.0, when this is required).
    #[arg(long, env = "TRELLIS_ADVERTISE")]
    pub advertise: Option<SocketAddr>,
    /// Health (`/live`, `/ready`) and metrics (`/metrics`); must be loopback.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub admin: SocketAddr,
    /// Seconds a draining gateway waits for open tunnels after SIGTERM.
    #[arg(long, default_value_t = 10)]
    pub drain_timeout: u64,
    /// Worker threads (0: one per core). One, the default, has the lowest latency and CPU per
    /// tunnel on a small or busy node; give a gateway that carries a lot of traffic more.
    #[arg(long, env = "TRELLIS_THREADS", default_value_t = 1)]
    pub threads: usize,
    /// Write the bound addresses as JSON to this file once serving.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

/// Why the gateway cannot start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("--{flag}: {reason}")]
    Config { flag: &'static str, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("control plane {addr}: {reason}")]
    ControlPlane { addr: String, reason: String },
    #[error("certificate: {0}")]
    Identity(#[from] trellis_proxy::identity::IdentityError),
    #[error("TLS: {0}")]
    Tls(String),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    peer_cluster: String,
    service: String,
    result: String,
}

/// The gateway's own metrics, next to the discovery and certificate metrics of the proxy parts.
pub struct GatewayMetrics {
    registry: Registry,
    tunnels: Family<TunnelLabels, Counter>,
    open: Gauge,
    bytes: Counter,
}

impl GatewayMetrics {
    fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("trellis_gateway");
        let tunnels = Family::<TunnelLabels, Counter>::default();
        registry.register(
            "tunnels",
            "CONNECT requests by peer cluster, service and result (opened, not_exported, unknown_service, no_endpoint, dial_failed, bad_request, draining); unknown and malformed names count under an empty service",
            tunnels.clone(),
        );
        let open = Gauge::default();
        registry.register("tunnels_open", "Tunnels currently spliced", open.clone());
        let bytes = Counter::default();
        registry.register("tunnel_bytes", "Bytes carried through tunnels, both directions", bytes.clone());
        Arc::new(Self { registry, tunnels, open, bytes })
    }

    fn count(&self, peer_cluster: &str, service: &str, result: &str) {
        self.tunnels
            .get_or_create(&TunnelLabels {
                peer_cluster: peer_cluster.to_string(),
                service: service.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What a request handler needs.
struct Shared {
    cluster: String,
    routes: watch::Receiver<Arc<Routes>>,
    balancer: Balancer,
    metrics: Arc<GatewayMetrics>,
    drain: Drain,
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r
}

/// Handles one request on a caller's connection.
async fn handle(
    shared: Arc<Shared>,
    peer: Option<(SpiffeId, String)>,
    mut req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let peer_cluster = peer.as_ref().map(|(_, c)| c.clone()).unwrap_or_default();
    if shared.drain.is_draining() {
        shared.metrics.count(&peer_cluster, "", "draining");
        let mut r = text(
            StatusCode::SERVICE_UNAVAILABLE,
            "this gateway is shutting down; use another gateway of the cluster\n",
        );
        // The refusal is about this gateway, not the endpoint the caller asked for.
        r.headers_mut()
            .insert(trellis_proxy::gateways::GATEWAY_REFUSAL_HEADER, http::HeaderValue::from_static("draining"));
        return r;
    }
    if req.method() == Method::GET && req.uri().path() == trellis_proxy::gateways::PROBE_PATH {
        // Callers' probes: the round trip is their measure of this gateway.
        return text(StatusCode::OK, "ok\n");
    }
    if req.method() != Method::CONNECT {
        shared.metrics.count(&peer_cluster, "", "bad_request");
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "the gateway only tunnels: send CONNECT <service>.<namespace>:<port>\n",
        );
    }
    let Some(authority) = req.uri().authority().map(|a| a.as_str().to_string()) else {
        shared.metrics.count(&peer_cluster, "", "bad_request");
        return text(StatusCode::BAD_REQUEST, "CONNECT needs an authority <service>.<namespace>:<port>\n");
    };
    let host = authority.rsplit_once(':').map_or(authority.as_str(), |(h, _)| h);
    let service: ServiceName = match host.parse() {
        Ok(s) => s,
        Err(e) => {
            // Names the caller made up are not metric labels (they would grow without bound).
            shared.metrics.count(&peer_cluster, "", "bad_request");
            return text(StatusCode::BAD_REQUEST, format!("'{host}' is not <service>.<namespace>: {e}\n"));
        }
    };
    let svc = service.to_string();
    let routes = shared.routes.borrow().clone();
    let Some(s) = routes.services.get(&service) else {
        shared.metrics.count(&peer_cluster, "", "unknown_service");
        return text(StatusCode::NOT_FOUND, format!("service {svc} is unknown in cluster {}\n", shared.cluster));
    };
    if !s.exported {
        shared.metrics.count(&peer_cluster, &svc, "not_exported");
        return text(
            StatusCode::FORBIDDEN,
            format!("service {svc} is local to cluster {}: it is not exported to other clusters\n", shared.cluster),
        );
    }
    // A gateway's view holds its own cluster's endpoints: the list is used as it is (so the
    // balancer keeps what it built for it) unless another cluster's endpoint is in it.
    let local: EndpointList = match routes.endpoint_list(&service) {
        Some(all) if all.iter().all(|e| e.cluster == shared.cluster) => all.clone(),
        Some(all) => all.iter().filter(|e| e.cluster == shared.cluster).cloned().collect(),
        None => EndpointList::from(Vec::new()),
    };
    let wanted = req.headers().get(ENDPOINT_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
    let chosen = match &wanted {
        Some(id) => match local.iter().find(|e| &e.id == id) {
            Some(e) if e.healthy => Some(e.clone()),
            _ => None,
        },
        None => shared.balancer.pick(&local, &[]).map(|(e, _)| e),
    };
    let Some(ep) = chosen else {
        shared.metrics.count(&peer_cluster, &svc, "no_endpoint");
        let what = wanted
            .map(|w| format!("endpoint {w} is not a healthy endpoint of {svc}"))
            .unwrap_or_else(|| format!("service {svc} has no healthy endpoint in cluster {}", shared.cluster));
        return text(StatusCode::SERVICE_UNAVAILABLE, format!("{what}\n"));
    };
    let tcp = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(&ep.address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            shared.metrics.count(&peer_cluster, &svc, "dial_failed");
            return text(StatusCode::BAD_GATEWAY, format!("endpoint {} ({}) refused: {e}\n", ep.id, ep.address));
        }
        Err(_) => {
            shared.metrics.count(&peer_cluster, &svc, "dial_failed");
            return text(StatusCode::GATEWAY_TIMEOUT, format!("endpoint {} ({}) did not answer\n", ep.id, ep.address));
        }
    };
    let _ = tcp.set_nodelay(true);
    shared.metrics.count(&peer_cluster, &svc, "opened");
    let caller = peer.map(|(id, _)| id.to_string()).unwrap_or_default();
    tracing::debug!(%caller, service = %svc, endpoint = %ep.id, "tunnel opened");
    let upgrade = hyper::upgrade::on(&mut req);
    let metrics = shared.metrics.clone();
    shared.drain.spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                metrics.open.inc();
                let mut outer = TokioIo::new(upgraded);
                let mut inner = tcp;
                if let Ok((a, b)) = tokio::io::copy_bidirectional(&mut outer, &mut inner).await {
                    metrics.bytes.inc_by(a + b);
                }
                metrics.open.dec();
            }
            Err(e) => tracing::debug!(error = %e, "the caller went away before the tunnel opened"),
        }
    });
    Response::new(Full::new(Bytes::new()))
}

/// Serves the admin listener: liveness, readiness (a certificate and a first configuration),
/// metrics.
async fn admin(
    listener: TcpListener,
    routes: watch::Receiver<Arc<Routes>>,
    store: Arc<IdentityStore>,
    proxy_metrics: Arc<trellis_proxy::metrics::Metrics>,
    metrics: Arc<GatewayMetrics>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (routes, store, pm, m) = (routes.clone(), store.clone(), proxy_metrics.clone(), metrics.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let ready = store.current().is_some() && routes.borrow().loaded;
                let body = match req.uri().path() {
                    "/live" => text(StatusCode::OK, "live\n"),
                    "/ready" if ready => text(StatusCode::OK, "ready\n"),
                    "/ready" => {
                        text(StatusCode::SERVICE_UNAVAILABLE, "waiting for a certificate and a configuration\n")
                    }
                    "/metrics" => text(StatusCode::OK, m.encode() + &pm.encode()),
                    _ => text(StatusCode::NOT_FOUND, "/live, /ready or /metrics\n"),
                };
                async move { Ok::<_, std::convert::Infallible>(body) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn wait_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs the gateway until SIGTERM or Ctrl-C, then drains.
pub async fn run(config: Config) -> Result<(), GatewayError> {
    if !config.admin.ip().is_loopback() {
        return Err(GatewayError::Config {
            flag: "admin",
            reason: format!(
                "{} is not loopback: the admin listener is unauthenticated; use 127.0.0.1:PORT",
                config.admin
            ),
        });
    }
    let token = match (&config.token, &config.token_file) {
        (Some(t), _) => t.trim().to_string(),
        (None, Some(p)) => std::fs::read_to_string(p).map(|t| t.trim().to_string()).map_err(|e| {
            GatewayError::Config { flag: "token-file", reason: format!("cannot read {}: {e}", p.display()) }
        })?,
        (None, None) => {
            return Err(GatewayError::Config {
                flag: "token",
                reason: "a gateway token is needed for the first certificate: `trellis token gateway create` against \
                         a control plane of this cluster, then --token-file FILE"
                    .into(),
            });
        }
    };
    let pem = std::fs::read_to_string(&config.trust_bundle).map_err(|e| GatewayError::Config {
        flag: "trust-bundle",
        reason: format!("cannot read {}: {e}", config.trust_bundle.display()),
    })?;
    let bundle = TrustBundle::from_pem(&config.trust_domain, &[pem])
        .map_err(|e| GatewayError::Config { flag: "trust-bundle", reason: e.to_string() })?;
    let bundle = SharedBundle::new(bundle);
    let id = SpiffeId::gateway(&config.trust_domain, &config.cluster)
        .map_err(|e| GatewayError::Config { flag: "cluster", reason: e.to_string() })?;
    let tls_err = |e: trellis_proto::tls::TlsError| GatewayError::Tls(e.to_string());
    let cp_err = |e: tonic::transport::Error| GatewayError::ControlPlane {
        addr: config.control_plane.clone(),
        reason: e.to_string(),
    };

    // The first certificate is paid for with the gateway token; renewals present it.
    let store = IdentityStore::empty();
    let proxy_metrics = trellis_proxy::metrics::Metrics::new();
    let cp_tls =
        client_config(Some(store.clone()), bundle.clone(), IdMatcher::AnyControlPlane, &[b"h2"]).map_err(tls_err)?;
    let bootstrap = grpc::channel(&config.control_plane, cp_tls.clone()).map_err(cp_err)?;
    let signer = Signer::new(bootstrap, &config.control_plane, id.clone(), "", "", 0, bundle.clone()).for_gateway();
    let signed = signer.first(&token, Duration::from_secs(30)).await?;
    identity::install(signed, &store, &bundle, &proxy_metrics);
    let channel = grpc::channel(&config.control_plane, cp_tls).map_err(cp_err)?;
    let signer = signer.with_channel(channel.clone());

    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| GatewayError::Bind { addr: config.listen, source })?;
    let admin_l =
        TcpListener::bind(config.admin).await.map_err(|source| GatewayError::Bind { addr: config.admin, source })?;
    let listen_addr = listener.local_addr().map_err(|source| GatewayError::Bind { addr: config.listen, source })?;
    let admin_addr = admin_l.local_addr().map_err(|source| GatewayError::Bind { addr: config.admin, source })?;

    let advertise = match config.advertise {
        Some(a) => a,
        None if listen_addr.ip().is_unspecified() => {
            return Err(GatewayError::Config {
                flag: "advertise",
                reason: format!(
                    "--listen {listen_addr} is not an address other clusters can dial; give the one they use with \
                     --advertise IP:PORT"
                ),
            });
        }
        None => listen_addr,
    };
    let drain = Drain::new();
    let node = NodeInfo {
        identity: id.clone(),
        cluster: config.cluster.clone(),
        zone: String::new(),
        instance: config.instance.clone(),
        serves: None,
        gateway_address: Some(advertise.to_string()),
        // A gateway routes to any endpoint of its cluster's exported services.
        view: View::Full,
    };
    let (discovery, routes, _) =
        DiscoveryTask::new(channel, node, bundle.clone(), proxy_metrics.clone(), drain.clone());
    let discovery = tokio::spawn(discovery.run());
    let renew = tokio::spawn(identity::renew_forever(
        signer,
        store.clone(),
        bundle.clone(),
        proxy_metrics.clone(),
        token,
        drain.clone(),
    ));
    let metrics = GatewayMetrics::new();
    let admin_task =
        tokio::spawn(admin(admin_l, routes.clone(), store.clone(), proxy_metrics.clone(), metrics.clone()));

    // Callers must be workloads of the federation; the inner TLS is theirs.
    let tls = server_config(store.clone(), bundle.clone(), IdMatcher::AnyWorkload, true, &[b"h2"]).map_err(tls_err)?;
    let acceptor = TlsAcceptor::from(tls);
    let shared = Arc::new(Shared {
        cluster: config.cluster.clone(),
        routes,
        balancer: Balancer::default(),
        metrics,
        drain: drain.clone(),
    });
    // The balancer's per-endpoint state follows the registry: endpoints that leave are forgotten.
    let pruner = {
        let (shared, mut routes) = (shared.clone(), shared.routes.clone());
        tokio::spawn(async move {
            while routes.changed().await.is_ok() {
                let current = routes.borrow_and_update().clone();
                shared.balancer.retain(&|id| current.endpoints.contains_key(id));
            }
        })
    };
    if let Some(path) = &config.ready_file {
        let v = serde_json::json!({
            "listen": listen_addr.to_string(),
            "advertise": advertise.to_string(),
            "admin": admin_addr.to_string(),
            "identity": id.to_string(),
        });
        let _ = std::fs::write(path, v.to_string());
    }
    tracing::info!(listen = %listen_addr, admin = %admin_addr, identity = %id, "gateway serving");

    let accept = async {
        loop {
            let Ok((tcp, from)) = listener.accept().await else { continue };
            let _ = tcp.set_nodelay(true);
            let (acceptor, shared) = (acceptor.clone(), shared.clone());
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(%from, error = %e, "TLS handshake refused");
                        return;
                    }
                };
                let certs = tls.get_ref().1.peer_certificates().map(<[_]>::to_vec);
                let peer = trellis_proto::tls::peer_id(certs.as_deref())
                    .map(|id| (id, trellis_proto::tls::issuer_cluster(certs.as_deref()).unwrap_or_default()));
                let svc = hyper::service::service_fn(move |req| {
                    let (shared, peer) = (shared.clone(), peer.clone());
                    async move { Ok::<_, std::convert::Infallible>(handle(shared, peer, req).await) }
                });
                // The tunnels of one caller share this connection: what they write while one
                // read is handled leaves in one write (see `trellis_proxy::coalesce`).
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(Coalesce::new(tls)), svc);
                if let Err(e) = conn.await {
                    tracing::debug!(%from, error = %e, "caller connection ended");
                }
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = wait_signal() => {}
    }
    tracing::info!(open = drain.active(), "draining: new tunnels are refused (503); waiting for open ones");
    drain.start();
    let deadline = Duration::from_secs(config.drain_timeout);
    let _ = tokio::time::timeout(deadline, async {
        while drain.active() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    discovery.abort();
    renew.abort();
    admin_task.abort();
    pruner.abort();
    Ok(())
}
