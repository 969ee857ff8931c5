//! Inbound traffic: the mTLS listener other proxies dial, in front of the local application.
//!
//! Client certificates are mandatory and verified against the trust bundle during the handshake;
//! the verified SPIFFE ID is the caller. ALPN picks the mode: `trellis/h2` serves HTTP/2, checks
//! each request with the [`Authorizer`], replaces any client-sent peer-identity header with the
//! verified caller and forwards to the application ([`crate::apppool`]); `trellis/tcp` checks
//! the connection once and splices it to the application.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;
use trellis_proto::tls::peer_id;
use trellis_proto::{ALPN_MESH_HTTP, ALPN_MESH_TCP, SpiffeId};

use crate::apppool::{AppH2, AppPool};
use crate::authz::{Authorizer, Decision, InboundKind, RequestMeta};
use crate::body::{self, Body, text};
use crate::coalesce::Coalesce;
use crate::drain::Drain;
use crate::headers::{peer_identity_value, set_peer_identity, strip_hop_by_hop};
use crate::metrics::{Direction, Metrics, RequestMetrics};
use crate::routes::AppProtocol;

/// How long a peer may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to the local application may take.
pub const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The local application behind this proxy.
#[derive(Debug, Clone)]
pub struct AppTarget {
    /// `host:port` on localhost.
    pub addr: String,
    /// How it speaks.
    pub protocol: AppProtocol,
    /// `name.namespace` it serves (metric label).
    pub service: String,
}

/// How requests reach the application.
enum AppClient {
    /// Pooled HTTP/1.1 connections.
    Http1(Arc<AppPool>),
    /// One multiplexed HTTP/2 connection (gRPC), to the application's `host:port` as a URI
    /// authority (parsed once, shared by every request).
    H2c { conn: AppH2, authority: Authority },
}

/// The inbound side.
pub struct Inbound {
    tls: TlsAcceptor,
    app: Option<AppTarget>,
    /// How requests reach `app`; `None` without one, or when its address is unusable.
    client: Option<AppClient>,
    authorizer: Arc<dyn Authorizer>,
    metrics: Arc<Metrics>,
    requests: RequestMetrics,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound").field("app", &self.app).finish_non_exhaustive()
    }
}

impl Inbound {
    /// An inbound side terminating TLS with `tls` in front of `app` (none: a pure client).
    pub fn new(
        tls: Arc<rustls::ServerConfig>,
        app: Option<AppTarget>,
        authorizer: Arc<dyn Authorizer>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let client = app.as_ref().and_then(|a| match a.protocol {
            AppProtocol::Grpc => Some(AppClient::H2c {
                conn: AppH2::new(a.addr.clone(), APP_CONNECT_TIMEOUT, &metrics),
                authority: a.addr.parse().ok()?,
            }),
            AppProtocol::Http | AppProtocol::Tcp => {
                Some(AppClient::Http1(AppPool::new(a.addr.clone(), APP_CONNECT_TIMEOUT, &metrics)))
            }
        });
        let label = app.as_ref().map(|a| a.service.as_str()).unwrap_or("none");
        let requests = metrics.requests_of(Direction::inbound, label);
        Arc::new(Self { tls: TlsAcceptor::from(tls), app, client, authorizer, metrics, requests })
    }

    /// Accepts peer connections until the drain starts.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: Drain) {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "inbound accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = drain.signaled() => break,
            };
            let _ = tcp.set_nodelay(true);
            let span = tracing::debug_span!("inbound", peer = %peer);
            drain.spawn(self.clone().connection(tcp, drain.clone()).instrument(span));
        }
        tracing::debug!("inbound listener closed");
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, drain: Drain) {
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.tls.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                self.metrics.handshake_failed(Direction::inbound);
                tracing::info!(error = %e, "inbound TLS handshake refused");
                return;
            }
            Err(_) => {
                self.metrics.handshake_failed(Direction::inbound);
                tracing::info!("inbound TLS handshake timed out");
                return;
            }
        };
        // Counted once established: a peer that fails the handshake never was a connection.
        let _open = self.metrics.connection(Direction::inbound);
        let (_, conn) = tls.get_ref();
        let Some(caller) = peer_id(conn.peer_certificates()) else {
            // The verifier makes certificates mandatory; this is only a belt to those braces.
            tracing::info!("inbound connection without a client identity");
            return;
        };
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        // One line per mesh connection (HTTP ones are pooled and long-lived): who called, as the
        // certificate proves it, whatever the path it came by (directly or through a gateway).
        tracing::info!(%caller, alpn = ?alpn.as_deref().map(String::from_utf8_lossy), "inbound connection");
        match alpn.as_deref() {
            Some(p) if p == ALPN_MESH_HTTP => self.serve_h2(tls, caller, drain).await,
            Some(p) if p == ALPN_MESH_TCP => self.splice(tls, caller).await,
            other => tracing::info!(
                alpn = ?other.map(String::from_utf8_lossy),
                "inbound connection without a mesh ALPN; closing"
            ),
        }
    }

    async fn serve_h2(
        self: Arc<Self>,
        tls: tokio_rustls::server::TlsStream<TcpStream>,
        caller: SpiffeId,
        drain: Drain,
    ) {
        let header = peer_identity_value(&caller.to_string());
        let caller = Arc::new((caller, header));
        let this = self.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            let caller = caller.clone();
            async move { Ok::<_, Infallible>(this.request(&caller.0, caller.1.as_ref(), req).await) }
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(TokioIo::new(Coalesce::new(tls)), svc);
        if let Err(e) = crate::drain::serve_until_drained!(conn, drain) {
            tracing::debug!(error = %e, "inbound HTTP/2 connection ended with an error");
        }
    }

    async fn request(&self, caller: &SpiffeId, header: Option<&HeaderValue>, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let resp = self.forward(caller, header, req).await;
        self.requests.record(resp.status().as_str(), started.elapsed());
        resp
    }

    /// `header`: the caller's identity as the header the application receives.
    async fn forward(&self, caller: &SpiffeId, header: Option<&HeaderValue>, req: Request<Incoming>) -> Response<Body> {
        let meta = RequestMeta { kind: InboundKind::Http, method: Some(req.method()), path: Some(req.uri().path()) };
        if let Decision::Deny(reason) = self.authorizer.check(caller, &meta) {
            return text(StatusCode::FORBIDDEN, format!("trellis-proxy: denied: {reason}"));
        }
        let Some(app) = &self.app else {
            return text(StatusCode::NOT_FOUND, "trellis-proxy: this workload serves no service");
        };
        let (mut parts, incoming) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        set_peer_identity(&mut parts.headers, header);
        let authority = parts.uri.authority().cloned();
        let pq = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        let sent = match &self.client {
            None => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("trellis-proxy: the application address '{}' is not HOST:PORT; fix --app", app.addr),
                );
            }
            Some(AppClient::H2c { conn, authority: app_authority }) => {
                // The same path and query, to the application: built from shared parts, not reparsed.
                let mut uri = http::uri::Parts::default();
                uri.scheme = Some(Scheme::HTTP);
                uri.authority = Some(app_authority.clone());
                uri.path_and_query = Some(pq);
                parts.uri = match Uri::from_parts(uri) {
                    Ok(u) => u,
                    Err(_) => return text(StatusCode::BAD_REQUEST, "trellis-proxy: unusable request path"),
                };
                parts.version = Version::HTTP_2;
                parts.headers.remove(header::HOST);
                let req = Request::from_parts(parts, body::boxed(incoming));
                conn.send(req).await.map_err(|e| e.to_string())
            }
            Some(AppClient::Http1(pool)) => {
                parts.uri = Uri::from(pq);
                parts.version = Version::HTTP_11;
                // The application sees the authority the caller used, not our loopback address.
                let host = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok());
                if let Some(v) = host.or_else(|| HeaderValue::from_str(&app.addr).ok()) {
                    parts.headers.insert(header::HOST, v);
                }
                let req = Request::from_parts(parts, body::boxed(incoming));
                pool.send(req).await.map_err(|e| e.to_string())
            }
        };
        match sent {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts.version = Version::HTTP_2;
                Response::from_parts(parts, body)
            }
            Err(e) => {
                tracing::info!(app = %app.addr, error = %e, "application request failed");
                text(
                    StatusCode::BAD_GATEWAY,
                    format!("trellis-proxy: the application at {} is unreachable: {e}", app.addr),
                )
            }
        }
    }

    async fn splice(&self, mut tls: tokio_rustls::server::TlsStream<TcpStream>, caller: SpiffeId) {
        let started = Instant::now();
        let meta = RequestMeta { kind: InboundKind::Tcp, method: None, path: None };
        if let Decision::Deny(reason) = self.authorizer.check(&caller, &meta) {
            tracing::info!(%caller, %reason, "TCP connection denied");
            self.requests.record("403", started.elapsed());
            return;
        }
        let Some(app) = &self.app else { return };
        let mut upstream = match tokio::time::timeout(APP_CONNECT_TIMEOUT, TcpStream::connect(app.addr.as_str())).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::info!(app = %app.addr, error = %e, "application unreachable");
                self.requests.record("502", started.elapsed());
                return;
            }
            Err(_) => {
                tracing::info!(app = %app.addr, "application connect timed out");
                self.requests.record("502", started.elapsed());
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        self.requests.record("tcp", started.elapsed());
        if let Err(e) = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await {
            tracing::debug!(error = %e, "inbound TCP stream broke");
        }
    }
}
