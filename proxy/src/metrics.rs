//! Prometheus metrics of the proxy, all named `trellis_proxy_*`, with labels from enums.

use std::sync::{Arc, Mutex};
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
    /// Connections opened to the local application.
    pub app_connections: Counter,
    /// Idle pooled HTTP/1.1 connections to the local application.
    pub app_idle_connections: Gauge,
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
        let app_connections = Counter::default();
        registry.register("app_connections", "Connections opened to the local application", app_connections.clone());
        let app_idle_connections = Gauge::default();
        registry.register(
            "app_idle_connections",
            "Idle pooled HTTP/1.1 connections to the local application",
            app_idle_connections.clone(),
        );
        Arc::new(Self {
            app_connections,
            app_idle_connections,
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

    /// The request metrics of `service` in `direction`, looked up once for every request to
    /// come.
    pub fn requests_of(&self, direction: Direction, service: &str) -> RequestMetrics {
        RequestMetrics {
            direction,
            service: service.to_string(),
            requests: self.requests.clone(),
            duration: self
                .request_duration
                .get_or_create_owned(&DurationLabels { direction, service: service.to_string() }),
            codes: Mutex::new(Vec::new()),
        }
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

/// The request counters and latency histogram of one direction and service. Recording a request
/// builds no label set and takes no lock of a metric family: each status code's counter is looked
/// up the first time the code is seen.
#[derive(Debug)]
pub struct RequestMetrics {
    direction: Direction,
    service: String,
    requests: Family<RequestLabels, Counter>,
    duration: Histogram,
    /// Counters by status code (or `tcp`), in order of first use: a service answers with a
    /// handful of codes.
    codes: Mutex<Vec<(Box<str>, Counter)>>,
}

impl RequestMetrics {
    /// Records one finished request.
    pub fn record(&self, code: &str, elapsed: std::time::Duration) {
        {
            let mut codes = self.codes.lock().unwrap_or_else(|p| p.into_inner());
            match codes.iter().find(|(c, _)| &**c == code) {
                Some((_, counter)) => {
                    counter.inc();
                }
                None => {
                    let labels = RequestLabels {
                        direction: self.direction,
                        service: self.service.clone(),
                        code: code.to_string(),
                    };
                    let counter = self.requests.get_or_create_owned(&labels);
                    counter.inc();
                    codes.push((code.into(), counter));
                }
            }
        }
        self.duration.observe(elapsed.as_secs_f64());
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn recorded_requests_appear_by_code_and_handles_of_one_service_share_their_series() {
        let metrics = Metrics::new();
        let a = metrics.requests_of(Direction::outbound, "web.shop");
        let again = metrics.requests_of(Direction::outbound, "web.shop");
        let other = metrics.requests_of(Direction::inbound, "web.shop");
        a.record("200", Duration::from_millis(1));
        a.record("200", Duration::from_millis(2));
        a.record("503", Duration::from_millis(3));
        again.record("200", Duration::from_millis(1));
        other.record("tcp", Duration::from_millis(1));
        let text = metrics.encode();
        let line = |needle: &str| text.lines().find(|l| l.starts_with(needle)).map(str::to_string);
        assert_eq!(
            line(r#"trellis_proxy_requests_total{direction="outbound",service="web.shop",code="200"}"#).as_deref(),
            Some(r#"trellis_proxy_requests_total{direction="outbound",service="web.shop",code="200"} 3"#)
        );
        assert_eq!(
            line(r#"trellis_proxy_requests_total{direction="outbound",service="web.shop",code="503"}"#).as_deref(),
            Some(r#"trellis_proxy_requests_total{direction="outbound",service="web.shop",code="503"} 1"#)
        );
        assert_eq!(
            line(r#"trellis_proxy_requests_total{direction="inbound",service="web.shop",code="tcp"}"#).as_deref(),
            Some(r#"trellis_proxy_requests_total{direction="inbound",service="web.shop",code="tcp"} 1"#)
        );
        assert_eq!(
            line(r#"trellis_proxy_request_duration_seconds_count{direction="outbound",service="web.shop"}"#).as_deref(),
            Some(r#"trellis_proxy_request_duration_seconds_count{direction="outbound",service="web.shop"} 4"#)
        );
    }
}
