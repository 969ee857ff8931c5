//! Prometheus metrics of the proxy, all named `trellis_proxy_*`, with labels from enums.

use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Which way traffic flows through the proxy.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    /// From the local application to the mesh.
    outbound,
    /// From the mesh to the local application.
    inbound,
}

/// Labels of request counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Direction.
    pub direction: Direction,
    /// `name.namespace` of the service.
    pub service: String,
    /// HTTP status code, or `tcp` for opaque streams.
    pub code: String,
}

/// Labels of duration histograms.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    /// Direction.
    pub direction: Direction,
    /// `name.namespace` of the service.
    pub service: String,
}

/// Labels by direction only.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// Direction.
    pub direction: Direction,
}

/// Labels by service only.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// `name.namespace` of the service.
    pub service: String,
}

/// Labels by gateway address.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayLabels {
    /// `host:port` of a gateway of another cluster.
    pub gateway: String,
}

/// Labels of tier changes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierChangeLabels {
    /// `name.namespace` of the service.
    pub service: String,
    /// `failover` (to a farther tier) or `failback` (to a nearer one).
    pub change: TierChange,
}

/// Which way the tier in use moved.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum TierChange {
    /// To a farther tier.
    failover,
    /// Back to a nearer tier.
    failback,
}

fn duration_histogram() -> Histogram {
    // 0.5 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric of one proxy process.
pub struct Metrics {
    registry: Registry,
    /// Requests by direction, service and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Request latency until response headers.
    pub request_duration: Family<DurationLabels, Histogram, fn() -> Histogram>,
    /// Retries sent.
    pub retries: Family<ServiceLabels, Counter>,
    /// Version of the applied configuration.
    pub config_version: Gauge,
    /// Configuration versions acknowledged.
    pub config_acks: Counter,
    /// Configuration versions refused.
    pub config_nacks: Counter,
    /// Expiry of the current certificate, Unix seconds.
    pub cert_expiry: Gauge,
    /// TLS handshakes that failed.
    pub tls_handshake_failures: Family<DirectionLabels, Counter>,
    /// Open connections.
    pub active_connections: Family<DirectionLabels, Gauge>,
    /// Tier of the endpoints serving each service now: 0 this zone, 1 this cluster, 2 another
    /// cluster of the region, 3 another region.
    pub tier: Family<ServiceLabels, Gauge>,
    /// Times the tier in use changed, by direction.
    pub tier_changes: Family<TierChangeLabels, Counter>,
    /// Endpoints set aside after failing in a row (passive outlier detection).
    pub ejections: Family<ServiceLabels, Counter>,
    /// Whether each gateway of another cluster in use answers its probes (1) or not (0).
    pub gateway_up: Family<GatewayLabels, Gauge>,
    /// Round trip of the latest probe of each gateway, seconds.
    pub gateway_rtt: Family<GatewayLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("trellis_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Requests by direction, service and status code", requests.clone());
        let request_duration = Family::<DurationLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Request latency until the response headers",
            request_duration.clone(),
        );
        let retries = Family::<ServiceLabels, Counter>::default();
        registry.register("retries", "Retries sent to another endpoint", retries.clone());
        let config_version = Gauge::default();
        registry.register("config_version", "Version of the applied configuration", config_version.clone());
        let config_acks = Counter::default();
        registry.register("config_acks", "Configuration versions acknowledged", config_acks.clone());
        let config_nacks = Counter::default();
        registry.register("config_nacks", "Configuration versions refused", config_nacks.clone());
        let cert_expiry = Gauge::default();
        registry.register(
            "cert_expiry_timestamp_seconds",
            "Expiry of the current workload certificate (Unix time)",
            cert_expiry.clone(),
        );
        let tls_handshake_failures = Family::<DirectionLabels, Counter>::default();
        registry.register("tls_handshake_failures", "TLS handshakes that failed", tls_handshake_failures.clone());
        let active_connections = Family::<DirectionLabels, Gauge>::default();
        registry.register("active_connections", "Open connections", active_connections.clone());
        let tier = Family::<ServiceLabels, Gauge>::default();
        registry.register(
            "tier",
            "Tier serving each service: 0 this zone, 1 this cluster, 2 another cluster of the region, 3 another region",
            tier.clone(),
        );
        let tier_changes = Family::<TierChangeLabels, Counter>::default();
        registry.register(
            "tier_changes",
            "Changes of the tier serving a service (failover, failback)",
            tier_changes.clone(),
        );
        let ejections = Family::<ServiceLabels, Counter>::default();
        registry.register("ejections", "Endpoints set aside after failing in a row", ejections.clone());
        let gateway_up = Family::<GatewayLabels, Gauge>::default();
        registry.register(
            "gateway_up",
            "Gateway of another cluster answering its probes (1) or not (0)",
            gateway_up.clone(),
        );
        let gateway_rtt = Family::<GatewayLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register("gateway_rtt_seconds", "Round trip of the latest probe of a gateway", gateway_rtt.clone());
        Arc::new(Self {
            registry,
            tier,
            tier_changes,
            ejections,
            gateway_up,
            gateway_rtt,
            requests,
            request_duration,
            retries,
            config_version,
            config_acks,
            config_nacks,
            cert_expiry,
            tls_handshake_failures,
            active_connections,
        })
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// Records one finished request.
    pub fn request(&self, direction: Direction, service: &str, code: &str, elapsed: std::time::Duration) {
        self.requests
            .get_or_create(&RequestLabels { direction, service: service.to_string(), code: code.to_string() })
            .inc();
        self.request_duration
            .get_or_create(&DurationLabels { direction, service: service.to_string() })
            .observe(elapsed.as_secs_f64());
    }

    /// Sets the certificate expiry gauge.
    pub fn set_cert_expiry(&self, not_after: SystemTime) {
        let secs = not_after.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.cert_expiry.set(i64::try_from(secs).unwrap_or(i64::MAX));
    }

    /// Counts a failed TLS handshake.
    pub fn handshake_failed(&self, direction: Direction) {
        self.tls_handshake_failures.get_or_create(&DirectionLabels { direction }).inc();
    }

    /// Marks a connection open until the guard drops.
    pub fn connection(self: &Arc<Self>, direction: Direction) -> ConnectionGuard {
        self.active_connections.get_or_create(&DirectionLabels { direction }).inc();
        ConnectionGuard { metrics: self.clone(), direction }
    }
}

/// Decrements the active-connection gauge when the connection ends.
#[derive(Debug)]
pub struct ConnectionGuard {
    metrics: Arc<Metrics>,
    direction: Direction,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.metrics.active_connections.get_or_create(&DirectionLabels { direction: self.direction }).dec();
    }
}
