//! The admin listener: `/metrics`, `/ready`, `/live` and `/config`. Unauthenticated, hence bound
//! to loopback only (checked in [`crate::config`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use trellis_proto::tls::IdentityStore;

use crate::body::{Body, full, text};
use crate::drain::Drain;
use crate::metrics::Metrics;
use crate::routes::{Endpoint, Routes, Service};

/// What the admin pages read.
pub struct AdminState {
    /// Metrics to expose.
    pub metrics: Arc<Metrics>,
    /// Current routes.
    pub routes: watch::Receiver<Arc<Routes>>,
    /// Current certificate.
    pub identity: Arc<IdentityStore>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").finish_non_exhaustive()
    }
}

/// Why the proxy is not ready, if it is not.
pub fn not_ready_reason(identity: &IdentityStore, routes: &Routes) -> Option<&'static str> {
    if identity.current().is_none() {
        Some("no certificate yet")
    } else if !routes.loaded {
        Some("no configuration from the control plane yet")
    } else {
        None
    }
}

/// The JSON shape of `/config`.
#[derive(Debug, Serialize)]
pub struct ConfigView<'a> {
    /// Applied version.
    pub version: u64,
    /// Our identity.
    pub identity: Option<String>,
    /// Known services.
    pub services: Vec<&'a Service>,
    /// Known endpoints.
    pub endpoints: Vec<&'a Endpoint>,
    /// The services whose endpoints the view holds (`null`: a full view, every endpoint).
    pub subscribed: Option<Vec<String>>,
}

/// Serves admin requests until the drain starts.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, drain: Drain) {
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = drain.signaled() => break,
        };
        let state = state.clone();
        let d = drain.clone();
        // Not tracked by the drain: scrapes must not hold a shutdown back.
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = d.forced() => {}
            }
        });
    }
}

fn handle(state: &AdminState, req: &Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live"),
        "/ready" => {
            let routes = state.routes.borrow().clone();
            match not_ready_reason(&state.identity, &routes) {
                None => text(StatusCode::OK, "ready"),
                Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")),
            }
        }
        "/metrics" => {
            let mut resp = Response::new(full(state.metrics.encode()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            resp
        }
        "/config" => {
            let routes = state.routes.borrow().clone();
            let view = ConfigView {
                version: routes.version,
                identity: state.identity.current().map(|i| i.id.to_string()),
                services: routes.services.values().collect(),
                endpoints: routes.endpoints.values().map(|e| e.as_ref()).collect(),
                subscribed: routes.scope.as_ref().map(|s| s.iter().map(ToString::to_string).collect()),
            };
            match serde_json::to_string_pretty(&view) {
                Ok(json) => {
                    let mut resp = Response::new(full(json));
                    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    resp
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found; try /metrics, /ready, /live or /config"),
    }
}
