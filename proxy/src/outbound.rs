//! Outbound traffic (universal mode): one local listener per upstream service.
//!
//! Each accepted connection is sniffed ([`crate::detect`]). HTTP/1.1 and HTTP/2 are served by
//! hyper; every request picks an endpoint ([`crate::balance`]) and travels over the pooled mTLS
//! HTTP/2 connection to that endpoint's proxy, with timeouts and retries ([`crate::retry`]).
//! Anything else is spliced byte for byte over a fresh mTLS connection (ALPN `trellis/tcp`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::balance::{Balancer, EndpointLoad as LoadHandle, LoadGuard, Locality, Reach};
use crate::body::{self, Body, text};
use crate::coalesce::Coalesce;
use crate::detect::{FirstByte, Protocol, sniff};
use crate::discovery::{SUBSCRIBE_WAIT, Subscriptions};
use crate::drain::Drain;
use crate::gateways::{GatewayHealth, Way};
use crate::h2body::{self, RecvBody};
use crate::headers::strip_hop_by_hop;
use crate::metrics::{Direction, Metrics, RequestMetrics, ServiceLabels, TierChange, TierChangeLabels};
use crate::pool::{ConnectError, H2Pool, MeshConnector, Target, Via};
use crate::retry::{Failure, MAX_REPLAY_BODY, MAX_RETRIES, RetryBudget, should_retry};
use crate::routes::{AppProtocol, Endpoint, Routes, ServiceName};

/// How long a new client connection may take to show its protocol before it is treated as TCP.
pub const SNIFF_TIMEOUT: Duration = Duration::from_millis(500);

/// Timeouts of the outbound side.
#[derive(Debug, Clone, Copy)]
pub struct OutboundTimeouts {
    /// Whole request, until response headers.
    pub request: Duration,
    /// One attempt, if shorter than the request timeout.
    pub per_try: Option<Duration>,
    /// Protocol detection.
    pub sniff: Duration,
}

/// Where a proxy of `cluster` dials `ep`: through a usable gateway of the endpoint's cluster
/// when it is in another cluster reached through gateways, directly otherwise; `None` when it
/// can only be reached through gateways and none is up.
pub fn target_for(ep: &Arc<Endpoint>, cluster: &str, routes: &Routes, health: &GatewayHealth) -> Option<Target> {
    let via = match health.way_to(ep, cluster) {
        Way::Direct => None,
        Way::Unreachable => return None,
        Way::Gateway(gateway) => {
            let port = routes.services.get(&ep.service).and_then(|s| s.ports.first().map(|p| p.1)).unwrap_or(80);
            Some(Via { gateway, authority: format!("{}:{port}", ep.service), endpoint: ep.id.clone() })
        }
    };
    Some(Target { endpoint: ep.clone(), via })
}

/// The outbound side, shared by every upstream listener.
pub struct Outbound {
    routes: watch::Receiver<Arc<Routes>>,
    /// This proxy's cluster: endpoints of other clusters are reached through their gateways.
    cluster: String,
    balancer: Balancer,
    /// Health of other clusters' gateways (shared with the connectors).
    gateways: Arc<GatewayHealth>,
    pool: H2Pool,
    tcp: MeshConnector,
    metrics: Arc<Metrics>,
    timeouts: OutboundTimeouts,
    /// Tier of the endpoints that first attempts to each service go to now.
    tiers: std::sync::Mutex<std::collections::HashMap<ServiceName, u8>>,
    /// Brings the endpoints of a service called for the first time into a scoped view.
    subscriptions: Subscriptions,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound").field("timeouts", &self.timeouts).finish_non_exhaustive()
    }
}

/// One upstream listener's service and retry budget.
#[derive(Debug)]
struct Upstream {
    service: ServiceName,
    label: String,
    budget: RetryBudget,
    requests: RequestMetrics,
}

impl Upstream {
    fn new(service: ServiceName, metrics: &Metrics) -> Self {
        let label = service.to_string();
        let requests = metrics.requests_of(Direction::outbound, &label);
        Self { label, service, budget: RetryBudget::default(), requests }
    }
}

/// How one attempt went wrong, with a message for the final error.
#[derive(Debug)]
struct AttemptError {
    failure: Failure,
    message: String,
    /// Not the endpoint's fault: the gateway on the way failed, or the peer refused the stream
    /// before processing it (it is going away, or over its stream limit). Its record stays clean.
    blameless: bool,
}

/// The request body, held so that it can be sent again when that is safe.
enum ReqBody {
    Empty,
    Buffered { data: Bytes, trailers: Option<http::HeaderMap> },
    Streaming(Option<Body>),
}

/// The endpoints one request has tried. The first is kept inline: most requests make one
/// attempt, and nothing is allocated for it.
#[derive(Default)]
struct Tried {
    first: Option<Arc<Endpoint>>,
    more: Vec<Arc<Endpoint>>,
}

impl Tried {
    fn push(&mut self, ep: Arc<Endpoint>) {
        match self.first {
            None => self.first = Some(ep),
            Some(_) => self.more.push(ep),
        }
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    fn contains(&self, ep: &Endpoint) -> bool {
        self.first.iter().chain(&self.more).any(|t| t.id == ep.id)
    }
}

/// A spawned task aborted when this is dropped, unless detached.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl AbortOnDrop {
    /// Lets the task run on by itself.
    fn detach(mut self) {
        self.0.take();
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

impl ReqBody {
    fn replayable(&self) -> bool {
        !matches!(self, ReqBody::Streaming(_))
    }
}

impl Outbound {
    /// The outbound side over the routes `view` publishes (subscribing to services as they are
    /// first called), dialing HTTP with `h2` and TCP with `tcp`.
    pub fn new(
        view: Subscriptions,
        h2: MeshConnector,
        tcp: MeshConnector,
        metrics: Arc<Metrics>,
        timeouts: OutboundTimeouts,
        locality: Locality,
        gateways: Arc<GatewayHealth>,
    ) -> Arc<Self> {
        let routes = view.routes();
        let cluster = locality.cluster.clone();
        let balancer = Balancer::with_locality(locality);
        Arc::new(Self {
            routes,
            cluster,
            balancer,
            gateways,
            pool: H2Pool::new(h2),
            tcp,
            metrics,
            timeouts,
            tiers: Default::default(),
            subscriptions: view,
        })
    }

    /// Forgets load and pooled connections of endpoints that left the configuration.
    pub fn prune(&self, routes: &Routes) {
        self.balancer.retain(&|id| routes.endpoints.contains_key(id));
        self.tiers.lock().unwrap_or_else(|p| p.into_inner()).retain(|s, _| routes.services.contains_key(s));
        let live: std::collections::HashSet<Target> =
            routes.endpoints.values().filter_map(|e| target_for(e, &self.cluster, routes, &self.gateways)).collect();
        self.pool.retain(&|t| live.contains(t));
    }

    /// Picks an endpoint of `up`'s service this proxy can reach now.
    fn pick(&self, up: &Upstream, routes: &Routes, tried: &Tried) -> Option<(Arc<Endpoint>, Arc<LoadHandle>)> {
        let reachable = |ep: &Endpoint| self.gateways.reachable(ep, &self.cluster);
        let reach = Reach { generation: self.gateways.generation(), reachable: &reachable };
        self.balancer.pick_where(routes.endpoint_list(&up.service)?, &|ep| tried.contains(ep), &routes.region, reach)
    }

    /// Records that `ep` served a first attempt to `up`'s service: the tier in use, and a
    /// failover or failback when it moved. (Retries say nothing about where traffic goes.)
    fn served(&self, up: &Upstream, ep: &Endpoint, region: &str) {
        let tier = self.balancer.tier(ep, region);
        let before = {
            let mut tiers = self.tiers.lock().unwrap_or_else(|p| p.into_inner());
            match tiers.get_mut(&up.service) {
                // The common case, once per request: no allocation.
                Some(t) => std::mem::replace(t, tier),
                None => {
                    tiers.insert(up.service.clone(), tier);
                    u8::MAX
                }
            }
        };
        if before != tier {
            let labels = ServiceLabels { service: up.label.clone() };
            self.metrics.tier.get_or_create(&labels).set(i64::from(tier));
            if before != u8::MAX {
                let change = if tier > before { TierChange::failover } else { TierChange::failback };
                tracing::info!(service = %up.label, from = before, to = tier, endpoint = %ep.id, ?change, "tier in use changed");
                self.metrics.tier_changes.get_or_create(&TierChangeLabels { service: up.label.clone(), change }).inc();
            }
        }
    }

    /// Records a failed attempt on an endpoint (not when the gateway on the way failed: that is
    /// the gateway's health, and the endpoint's record stays clean).
    fn failed(&self, up: &Upstream, guard: LoadGuard, blameless: bool) {
        if blameless {
            drop(guard);
        } else if guard.failure() {
            self.metrics.ejections.get_or_create(&ServiceLabels { service: up.label.clone() }).inc();
        }
    }

    /// Accepts local connections for `service` until the drain starts.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, service: ServiceName, drain: Drain) {
        let up = Arc::new(Upstream::new(service, &self.metrics));
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "outbound accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = drain.signaled() => break,
            };
            let _ = tcp.set_nodelay(true);
            let this = self.clone();
            let up = up.clone();
            let d = drain.clone();
            let span = tracing::debug_span!("outbound", service = %up.label, client = %peer);
            drain.spawn(this.connection(up, tcp, d).instrument(span));
        }
        tracing::debug!("outbound listener closed");
    }

    /// Transparent mode: accepts connections iptables redirected here, each to the virtual
    /// address of a service, until the drain starts. A connection to an address that is no
    /// service's (any more) is closed with a log line.
    pub async fn serve_transparent(self: Arc<Self>, listener: TcpListener, drain: Drain) {
        let upstreams: std::sync::Mutex<std::collections::HashMap<ServiceName, Arc<Upstream>>> = Default::default();
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "transparent accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = drain.signaled() => break,
            };
            let dst = match original_destination(&tcp) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(client = %peer, error = %e, "no original destination: was the connection redirected by iptables (trellis transparent-init)?");
                    continue;
                }
            };
            let service = {
                let routes = self.routes.borrow();
                match routes.service_at(*dst.ip()) {
                    Some(s) if s.ports.is_empty() || s.ports.iter().any(|p| p.1 == dst.port()) => Ok(s.name.clone()),
                    Some(s) => Err(format!("service {} has no port {}", s.name, dst.port())),
                    None => Err(format!("{} is not the virtual address of a known service", dst.ip())),
                }
            };
            let service = match service {
                Ok(s) => s,
                Err(reason) => {
                    tracing::info!(client = %peer, destination = %dst, %reason, "transparent connection refused");
                    continue;
                }
            };
            let up = {
                let mut map = upstreams.lock().unwrap_or_else(|p| p.into_inner());
                if !map.contains_key(&service) {
                    // Services deleted since leave with their retry budgets.
                    let routes = self.routes.borrow();
                    map.retain(|s, _| routes.services.contains_key(s));
                }
                map.entry(service.clone()).or_insert_with(|| Arc::new(Upstream::new(service, &self.metrics))).clone()
            };
            let _ = tcp.set_nodelay(true);
            let span = tracing::debug_span!("outbound", service = %up.label, client = %peer, destination = %dst);
            drain.spawn(self.clone().connection(up, tcp, drain.clone()).instrument(span));
        }
        tracing::debug!("transparent listener closed");
    }

    async fn connection(self: Arc<Self>, up: Arc<Upstream>, tcp: TcpStream, drain: Drain) {
        let _open = self.metrics.connection(Direction::outbound);
        // The first call to a service out of the proxy's view waits for its endpoints (one round
        // trip to the control plane); later ones find them there.
        if !self.subscriptions.ensure(&up.service, SUBSCRIBE_WAIT).await {
            tracing::warn!(
                service = %up.label,
                "the control plane has not sent this service's endpoints within {} s; calling it with the endpoints known",
                SUBSCRIBE_WAIT.as_secs()
            );
        }
        match self.declared(&up) {
            // A service declared TCP skips detection, so server-speaks-first protocols work at once.
            Some(AppProtocol::Tcp) => self.splice(&up, crate::detect::Prefixed::new(Bytes::new(), tcp)).await,
            declared => {
                // HTTP and gRPC clients speak first: a silent connection is an idle pooled one and
                // must not become opaque TCP (which would bypass identity headers and policy).
                let first =
                    if declared.is_some() { FirstByte::Patiently } else { FirstByte::Within(self.timeouts.sniff) };
                let Some((protocol, io)) = self.detect(&up, tcp, first).await else { return };
                match protocol {
                    Protocol::Http1 => self.serve_http(up, Coalesce::direct(io), Protocol::Http1, drain).await,
                    Protocol::Http2 => self.serve_http(up, Coalesce::new(io), Protocol::Http2, drain).await,
                    Protocol::Tcp => self.splice(&up, io).await,
                }
            }
        }
    }

    fn declared(&self, up: &Upstream) -> Option<AppProtocol> {
        self.routes.borrow().service(&up.service).map(|s| s.protocol)
    }

    /// Sniffs the protocol. A client that stayed silent while the service was still unknown is
    /// judged again once discovery has declared the service: if it is HTTP or gRPC after all, the
    /// connection is an idle HTTP one and is awaited patiently.
    async fn detect(
        &self,
        up: &Upstream,
        tcp: TcpStream,
        first: FirstByte,
    ) -> Option<(Protocol, crate::detect::Prefixed<TcpStream>)> {
        let sniffed = match sniff(tcp, first, self.timeouts.sniff).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "client connection failed during detection");
                return None;
            }
        };
        let (Protocol::Tcp, io) = sniffed else { return Some(sniffed) };
        let declared_http = matches!(self.declared(up), Some(AppProtocol::Http | AppProtocol::Grpc));
        match io.into_unread() {
            Ok(tcp) if declared_http => match sniff(tcp, FirstByte::Patiently, self.timeouts.sniff).await {
                Ok(x) => Some(x),
                Err(e) => {
                    tracing::debug!(error = %e, "client connection failed during detection");
                    None
                }
            },
            Ok(tcp) => Some((Protocol::Tcp, crate::detect::Prefixed::new(Bytes::new(), tcp))),
            Err(io) => Some((Protocol::Tcp, io)),
        }
    }

    /// Serves the application's HTTP connection, of the `protocol` detection found (HTTP/1.x or
    /// HTTP/2 with prior knowledge).
    async fn serve_http<I>(self: Arc<Self>, up: Arc<Upstream>, io: I, protocol: Protocol, drain: Drain)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let this = self.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            let up = up.clone();
            async move { Ok::<_, Infallible>(this.forward(&up, req).await) }
        });
        let io = TokioIo::new(io);
        let ended = if protocol == Protocol::Http2 {
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder.timer(TokioTimer::new());
            crate::drain::serve_until_drained!(builder.serve_connection(io, svc), drain)
        } else {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new());
            crate::drain::serve_until_drained!(builder.serve_connection(io, svc), drain)
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "outbound HTTP connection ended with an error");
        }
    }

    async fn forward(&self, up: &Upstream, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let resp = self.forward_inner(up, req, started).await;
        up.requests.record(resp.status().as_str(), started.elapsed());
        resp
    }

    async fn forward_inner(&self, up: &Upstream, req: Request<Incoming>, started: Instant) -> Response<Body> {
        let deadline = started + self.timeouts.request;
        let client_version = req.version();
        if req.method() == Method::CONNECT {
            return text(StatusCode::NOT_IMPLEMENTED, "trellis-proxy: CONNECT is not supported on an upstream port");
        }
        let (mut parts, incoming) = req.into_parts();
        let uri = match mesh_uri(&parts.uri, parts.headers.get(header::HOST), &up.service) {
            Some(u) => u,
            None => return text(StatusCode::BAD_REQUEST, "trellis-proxy: the request has no usable path"),
        };
        strip_hop_by_hop(&mut parts.headers);
        // HTTP/2 carries the authority in the URI; a Host header would be a second source of truth.
        parts.headers.remove(header::HOST);
        let mut body = match hold_body(incoming, deadline).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };

        up.budget.deposit();
        let mut tried = Tried::default();
        let mut last_error: Option<String> = None;
        let mut last_failure: Option<Failure> = None;
        // A 502/503/504 that was retried: returned as is if no other endpoint does better.
        let mut last_response: Option<Response<Body>> = None;
        loop {
            let routes = self.routes.borrow().clone();
            let Some((ep, load)) = self.pick(up, &routes, &tried) else {
                break;
            };
            if !tried.is_empty() {
                // A retry that can really go somewhere: only now does it cost budget.
                if !up.budget.try_withdraw() {
                    tracing::debug!(service = %up.label, "retry budget exhausted");
                    break;
                }
                self.metrics.retries.get_or_create(&ServiceLabels { service: up.label.clone() }).inc();
            }
            tried.push(ep.clone());
            let attempt_deadline = match self.timeouts.per_try {
                Some(t) => deadline.min(Instant::now() + t),
                None => deadline,
            };
            let guard = load.start();
            let retries = tried.len() as u32 - 1;
            match self.attempt(&ep, &parts, &uri, &mut body, attempt_deadline).await {
                Ok(resp) => {
                    let status = resp.status();
                    let failure = Failure::Status(status);
                    if !matches!(status.as_u16(), 502..=504) {
                        guard.success();
                        if retries == 0 {
                            self.served(up, &ep, &routes.region);
                        }
                        return client_response(resp, client_version);
                    }
                    self.failed(up, guard, false);
                    if !retry_eligible(&parts.method, &body, failure, retries, deadline) {
                        return client_response(resp, client_version);
                    }
                    tracing::debug!(endpoint = %ep.id, %status, "retrying on another endpoint");
                    last_error = Some(format!("{} answered {status}", ep.id));
                    last_failure = Some(failure);
                    last_response = Some(resp);
                }
                Err(e) => {
                    self.failed(up, guard, e.blameless);
                    tracing::debug!(endpoint = %ep.id, error = %e.message, "attempt failed");
                    last_error = Some(format!("{}: {}", ep.id, e.message));
                    last_failure = Some(e.failure);
                    if Instant::now() >= deadline {
                        return timeout_response(up, self.timeouts.request);
                    }
                    if !retry_eligible(&parts.method, &body, e.failure, retries, deadline) {
                        break;
                    }
                }
            }
        }
        match (last_response, last_failure) {
            (Some(resp), _) => client_response(resp, client_version),
            (None, Some(Failure::Timeout)) => timeout_response(up, self.timeouts.request),
            (None, _) => unavailable(up, last_error.as_deref()),
        }
    }

    async fn attempt(
        &self,
        ep: &Arc<Endpoint>,
        parts: &http::request::Parts,
        uri: &Uri,
        body: &mut ReqBody,
        deadline: Instant,
    ) -> Result<Response<Body>, AttemptError> {
        let before_write = |message: String| AttemptError { failure: Failure::BeforeWrite, message, blameless: false };
        let timeout =
            |message: &str| AttemptError { failure: Failure::Timeout, message: message.into(), blameless: false };
        let Some(target) = target_for(ep, &self.cluster, &self.routes.borrow(), &self.gateways) else {
            return Err(AttemptError {
                failure: Failure::BeforeWrite,
                message: "every gateway of its cluster is down".into(),
                blameless: true,
            });
        };
        // A pooled connection may turn out to be going away (the peer restarts, or it broke
        // while idle): nothing was written on it, so it is redialed once, blaming no one.
        let mut redialed = false;
        let (response, mut stream, conn) = loop {
            let conn = match tokio::time::timeout_at(deadline, self.pool.get(&target)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    let blameless = matches!(e, ConnectError::Tunnel { gateway_fault: true, .. });
                    return Err(AttemptError { blameless, ..before_write(e.to_string()) });
                }
                Err(_) => return Err(timeout("connect timed out")),
            };
            let sent = match tokio::time::timeout_at(deadline, conn.clone().ready()).await {
                Ok(Ok(mut sender)) => {
                    let mut req = Request::new(());
                    *req.method_mut() = parts.method.clone();
                    *req.uri_mut() = uri.clone();
                    *req.version_mut() = Version::HTTP_2;
                    *req.headers_mut() = parts.headers.clone();
                    sender.send_request(req, matches!(body, ReqBody::Empty))
                }
                Ok(Err(e)) => Err(e),
                Err(_) => return Err(timeout("connection not ready in time")),
            };
            match sent {
                Ok((response, stream)) => break (response, stream, conn),
                // Never written: the body is intact and any method may go elsewhere.
                Err(e) if e.is_io() || e.is_go_away() => {
                    self.pool.forget(&conn);
                    if !redialed {
                        redialed = true;
                        continue;
                    }
                    return Err(AttemptError {
                        blameless: true,
                        ..before_write(format!("pooled connection closed: {e}"))
                    });
                }
                Err(e) => return Err(before_write(e.to_string())),
            }
        };
        // A streamed body is written by a task of its own; if this attempt fails or is abandoned,
        // the task stops and the stream is reset, so the peer stops working on it.
        let mut pipe: Option<AbortOnDrop> = None;
        match body {
            ReqBody::Empty => {}
            // Queued behind the headers: both leave in the connection's next write.
            ReqBody::Buffered { data, trailers } => {
                let sent = match trailers {
                    None => stream.send_data(data.clone(), true),
                    Some(t) => stream.send_data(data.clone(), false).and_then(|()| stream.send_trailers(t.clone())),
                };
                if let Err(e) = sent {
                    return Err(AttemptError { failure: Failure::Reset, message: e.to_string(), blameless: false });
                }
            }
            ReqBody::Streaming(slot) => match slot.take() {
                Some(b) => pipe = Some(AbortOnDrop(Some(tokio::spawn(h2body::pipe(b, stream))))),
                None => {
                    stream.send_reset(h2::Reason::CANCEL);
                    return Err(AttemptError {
                        failure: Failure::Reset,
                        message: "request body already sent".into(),
                        blameless: false,
                    });
                }
            },
        }
        match tokio::time::timeout_at(deadline, response).await {
            Ok(Ok(resp)) => {
                // The request body may go on streaming while the response does (gRPC streams).
                if let Some(p) = pipe.take() {
                    p.detach();
                }
                let (parts, recv) = resp.into_parts();
                let body = RecvBody::new(recv, &parts.headers).boxed();
                Ok(Response::from_parts(parts, body))
            }
            Ok(Err(e)) => {
                // Refused by the peer before any processing (it is going away, or over its
                // stream limit): safe to send elsewhere, and not the endpoint's failure.
                let refused = e.is_reset() && e.is_remote() && e.reason() == Some(h2::Reason::REFUSED_STREAM);
                if e.is_io() || e.is_go_away() {
                    self.pool.forget(&conn);
                }
                let failure = if refused { Failure::BeforeWrite } else { Failure::Reset };
                Err(AttemptError { failure, message: e.to_string(), blameless: refused })
            }
            Err(_) => Err(timeout("no response in time")),
        }
    }

    async fn splice<I>(&self, up: &Upstream, mut io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let started = Instant::now();
        let mut tried = Tried::default();
        let mut last_error = None;
        for attempt in 0..=MAX_RETRIES {
            let routes = self.routes.borrow().clone();
            let Some((ep, load)) = self.pick(up, &routes, &tried) else {
                break;
            };
            // Nothing was sent on a failed connect: another endpoint may take the stream.
            if attempt > 0 {
                if !up.budget.try_withdraw() {
                    break;
                }
                self.metrics.retries.get_or_create(&ServiceLabels { service: up.label.clone() }).inc();
            }
            tried.push(ep.clone());
            let guard = load.start();
            let Some(target) = target_for(&ep, &self.cluster, &routes, &self.gateways) else {
                drop(guard);
                last_error = Some(format!("{}: every gateway of its cluster is down", ep.id));
                continue;
            };
            match self.tcp.connect(&target).await {
                Ok(mut tls) => {
                    guard.success();
                    if attempt == 0 {
                        self.served(up, &ep, &routes.region);
                    }
                    up.requests.record("tcp", started.elapsed());
                    match tokio::io::copy_bidirectional(&mut io, &mut tls).await {
                        Ok((sent, received)) => {
                            tracing::debug!(endpoint = %ep.id, sent, received, "TCP stream done")
                        }
                        Err(e) => tracing::debug!(endpoint = %ep.id, error = %e, "TCP stream broke"),
                    }
                    return;
                }
                Err(e) => {
                    self.failed(up, guard, matches!(e, ConnectError::Tunnel { gateway_fault: true, .. }));
                    tracing::debug!(endpoint = %ep.id, error = %e, "TCP connect failed");
                    last_error = Some(e.to_string());
                }
            }
        }
        up.requests.record("503", started.elapsed());
        tracing::info!(service = %up.label, error = ?last_error, "no endpoint accepted the TCP stream");
    }
}

/// Where a connection redirected by iptables (`REDIRECT`) was going (`SO_ORIGINAL_DST`).
#[cfg(target_os = "linux")]
pub fn original_destination(tcp: &TcpStream) -> std::io::Result<std::net::SocketAddrV4> {
    let sin = nix::sys::socket::getsockopt(tcp, nix::sys::socket::sockopt::OriginalDst)?;
    Ok(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    ))
}

/// Transparent mode needs Linux.
#[cfg(not(target_os = "linux"))]
pub fn original_destination(_: &TcpStream) -> std::io::Result<std::net::SocketAddrV4> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "transparent mode needs Linux"))
}

/// May a failed attempt be followed by another one (budget aside)?
fn retry_eligible(method: &Method, body: &ReqBody, failure: Failure, retries: u32, deadline: Instant) -> bool {
    retries < MAX_RETRIES
        && Instant::now() < deadline
        && should_retry(method, body.replayable(), failure)
        // A streamed body can only go again if it was never taken (failure before writing).
        && (body.replayable() || matches!(body, ReqBody::Streaming(Some(_))))
}

/// The request URI over the mesh: scheme `http`, the client's authority (or the Host header, or
/// the service name), and the path.
pub fn mesh_uri(uri: &Uri, host: Option<&http::HeaderValue>, service: &ServiceName) -> Option<Uri> {
    let authority = uri
        .authority()
        .cloned()
        .or_else(|| host.and_then(|h| h.to_str().ok()).and_then(|h| h.parse::<Authority>().ok()))
        .or_else(|| Authority::try_from(service.to_string()).ok())?;
    let pq = uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::builder().scheme(Scheme::HTTP).authority(authority).path_and_query(pq).build().ok()
}

/// Holds a small body of known length whole (it can be replayed, and it leaves in the same write
/// as the request's headers); streams the others.
async fn hold_body(incoming: Incoming, deadline: Instant) -> Result<ReqBody, Response<Body>> {
    if incoming.is_end_stream() {
        return Ok(ReqBody::Empty);
    }
    let small = incoming.size_hint().exact().is_some_and(|n| n <= MAX_REPLAY_BODY);
    if !small {
        return Ok(ReqBody::Streaming(Some(body::boxed(incoming))));
    }
    match tokio::time::timeout_at(deadline, collect_small(incoming)).await {
        Ok(Ok((data, trailers))) => Ok(ReqBody::Buffered { data, trailers }),
        Ok(Err(e)) => {
            Err(text(StatusCode::BAD_REQUEST, format!("trellis-proxy: reading the request body failed: {e}")))
        }
        Err(_) => Err(text(StatusCode::REQUEST_TIMEOUT, "trellis-proxy: the request body did not arrive in time")),
    }
}

/// A small body whole, with its trailers. A body that arrives in one frame (most do) is kept
/// as that frame, not copied.
async fn collect_small(mut incoming: Incoming) -> Result<(Bytes, Option<http::HeaderMap>), hyper::Error> {
    let mut data = Bytes::new();
    let mut more: Option<bytes::BytesMut> = None;
    let mut trailers = None;
    while let Some(frame) = incoming.frame().await {
        match frame?.into_data() {
            Ok(chunk) if data.is_empty() && more.is_none() => data = chunk,
            Ok(chunk) => more.get_or_insert_with(|| bytes::BytesMut::from(&data[..])).extend_from_slice(&chunk),
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    Ok((more.map(bytes::BytesMut::freeze).unwrap_or(data), trailers))
}

/// Turns the peer's response into one for the local client.
fn client_response(resp: Response<Body>, version: Version) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = version;
    Response::from_parts(parts, body)
}

fn unavailable(up: &Upstream, last_error: Option<&str>) -> Response<Body> {
    let msg = match last_error {
        None => format!("trellis-proxy: no healthy endpoint for service {}", up.label),
        Some(e) => format!("trellis-proxy: no healthy endpoint of service {} answered (last error: {e})", up.label),
    };
    text(StatusCode::SERVICE_UNAVAILABLE, msg)
}

fn timeout_response(up: &Upstream, timeout: Duration) -> Response<Body> {
    text(
        StatusCode::GATEWAY_TIMEOUT,
        format!("trellis-proxy: service {} did not answer within {} ms", up.label, timeout.as_millis()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_uri_table() {
        let svc: ServiceName = "web.default".parse().unwrap();
        let host = |s: &'static str| http::HeaderValue::from_static(s);
        let cases: Vec<(&str, Option<http::HeaderValue>, &str)> = vec![
            ("/a?b=c", Some(host("127.0.0.1:15001")), "http://127.0.0.1:15001/a?b=c"),
            ("/a", None, "http://web.default/a"),
            ("http://api.example:8080/x", Some(host("ignored")), "http://api.example:8080/x"),
            ("/", Some(host("bad host header")), "http://web.default/"),
        ];
        for (uri, h, want) in cases {
            let uri: Uri = uri.parse().unwrap();
            let got = mesh_uri(&uri, h.as_ref(), &svc).unwrap();
            assert_eq!(got.to_string(), want);
        }
    }
}
