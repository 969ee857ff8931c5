//! Prometheus metrics of the control plane (`trellis_cp_*`) and the loopback HTTP listener that
//! serves them with liveness and readiness.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

type Labels = Vec<(String, String)>;

/// Every metric of one control-plane instance.
pub struct Metrics {
    registry: Registry,
    pub revision: Gauge,
    pub proxies_connected: Gauge,
    pub pushes: Family<Labels, Counter>,
    pub push_bytes: Counter,
    pub nacks: Counter,
    pub certs_signed: Family<Labels, Counter>,
    pub ca_expiry: Gauge,
    pub overlay_pending: Gauge,
    pub ready: AtomicBool,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("trellis_cp");
        let revision = Gauge::default();
        registry.register("store_revision", "Index of the last applied store entry", revision.clone());
        let proxies_connected = Gauge::default();
        registry.register("proxies_connected", "Proxies with an open discovery stream", proxies_connected.clone());
        let pushes = Family::<Labels, Counter>::default();
        registry.register("discovery_pushes", "Configuration responses sent, by kind (full or delta)", pushes.clone());
        let push_bytes = Counter::default();
        registry.register("discovery_push_bytes", "Encoded bytes of configuration responses sent", push_bytes.clone());
        let nacks = Counter::default();
        registry.register("discovery_nacks", "Configurations refused by proxies", nacks.clone());
        let certs_signed = Family::<Labels, Counter>::default();
        registry.register("certificates_signed", "Signing requests by result", certs_signed.clone());
        let ca_expiry = Gauge::default();
        registry.register("ca_expiry_timestamp_seconds", "Expiry of this cluster's intermediate CA", ca_expiry.clone());
        let overlay_pending = Gauge::default();
        registry.register(
            "overlay_pending",
            "Observations of this cluster served locally while they wait for the group's quorum",
            overlay_pending.clone(),
        );
        Arc::new(Self {
            registry,
            overlay_pending,
            revision,
            proxies_connected,
            pushes,
            push_bytes,
            nacks,
            certs_signed,
            ca_expiry,
            ready: AtomicBool::new(false),
        })
    }

    /// Records one configuration push.
    pub fn record_push(&self, full: bool, bytes: u64) {
        let kind = if full { "full" } else { "delta" };
        self.pushes.get_or_create(&vec![("kind".into(), kind.into())]).inc();
        self.push_bytes.inc_by(bytes);
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics`, `/live` and `/ready` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/metrics" => (StatusCode::OK, metrics.encode()),
                        "/live" => (StatusCode::OK, "ok\n".to_string()),
                        "/ready" if metrics.ready.load(Ordering::Relaxed) => (StatusCode::OK, "ready\n".to_string()),
                        "/ready" => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_string()),
                        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
                    };
                    Ok::<_, std::convert::Infallible>(
                        Response::builder().status(status).body(Full::new(Bytes::from(body))).unwrap_or_default(),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// Binds the metrics listener (loopback only, checked by the config).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
