//! The east-west gateways of other clusters, as a proxy sees them: pooled outer connections,
//! health from probes and from failed dials, and the choice of a gateway for an endpoint.
//!
//! Every gateway this proxy has tunnelled through recently is probed once per
//! [`PROBE_EVERY`] with a `GET /trellis/probe` on its pooled connection; the round trip is a
//! metric. A gateway that refuses a dial, breaks a handshake or fails a probe is down at once and
//! its endpoints are skipped (callers fail over to another gateway of that cluster, or to
//! another cluster); the next successful probe brings it back. A tunnel refused by a healthy
//! gateway (`503` for one endpoint) is that endpoint's failure, not the gateway's: one bad
//! remote endpoint never takes its whole cluster out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use trellis_proto::tls::mesh_server_name;

use crate::drain::Drain;
use crate::metrics::{GatewayLabels, Metrics};
use crate::routes::{Endpoint, Routes};

/// How often gateways in use are probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A probe not answered within this is a failure.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// A gateway not used for this long is no longer probed.
pub const PROBE_IDLE: Duration = Duration::from_secs(60);
/// Path a gateway answers probes on (200 while it takes tunnels, 503 while it drains).
pub const PROBE_PATH: &str = "/trellis/probe";

type Outer = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;
/// One gateway's pooled connection, dialled by one task at a time.
type OuterSlot = Arc<tokio::sync::Mutex<Option<Outer>>>;

/// Why a tunnel could not be opened.
#[derive(Debug, Clone)]
pub struct TunnelError {
    /// The gateway itself failed (dial, handshake, connection): it is marked down.
    pub gateway_fault: bool,
    pub reason: String,
}

#[derive(Debug, Clone, Copy)]
struct GatewayState {
    up: bool,
    last_used: Instant,
    rtt: Option<Duration>,
}

/// How an endpoint is reached.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Way {
    /// Dialled directly (its own cluster, or a cluster without gateways).
    Direct,
    /// Through this gateway of its cluster.
    Gateway(String),
    /// Only through its cluster's gateways, and none is up.
    Unreachable,
}

/// Health of the gateways this proxy uses. A gateway never seen is presumed up.
#[derive(Debug)]
pub struct GatewayHealth {
    states: Mutex<HashMap<String, GatewayState>>,
    metrics: Arc<Metrics>,
}

impl GatewayHealth {
    /// Health reported in `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { states: Mutex::new(HashMap::new()), metrics })
    }

    /// May tunnels go through `gateway`?
    pub fn usable(&self, gateway: &str) -> bool {
        self.states.lock().unwrap_or_else(|p| p.into_inner()).get(gateway).is_none_or(|s| s.up)
    }

    /// Latest probe round trip of `gateway`.
    pub fn rtt(&self, gateway: &str) -> Option<Duration> {
        self.states.lock().unwrap_or_else(|p| p.into_inner()).get(gateway).and_then(|s| s.rtt)
    }

    fn set(&self, gateway: &str, up: bool, rtt: Option<Duration>, used: bool) {
        let now = Instant::now();
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let s = states.entry(gateway.to_string()).or_insert(GatewayState { up, last_used: now, rtt: None });
        if s.up != up {
            if up {
                tracing::info!(%gateway, "gateway is back");
            } else {
                tracing::warn!(%gateway, "gateway is down: its endpoints are skipped until it answers a probe");
            }
        }
        s.up = up;
        if rtt.is_some() {
            s.rtt = rtt;
        }
        if used {
            s.last_used = now;
        }
        let labels = GatewayLabels { gateway: gateway.to_string() };
        self.metrics.gateway_up.get_or_create(&labels).set(i64::from(up));
        if let Some(r) = rtt {
            self.metrics.gateway_rtt.get_or_create(&labels).set(r.as_secs_f64());
        }
    }

    /// A tunnel was opened through `gateway`.
    pub fn opened(&self, gateway: &str) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        match states.get_mut(gateway) {
            Some(s) if s.up => s.last_used = Instant::now(),
            _ => {
                drop(states);
                self.set(gateway, true, None, true);
            }
        }
    }

    /// `gateway` failed a dial, a handshake or a probe.
    pub fn failed(&self, gateway: &str, reason: &str) {
        tracing::debug!(%gateway, %reason, "gateway failed");
        self.set(gateway, false, None, false);
    }

    /// Gateways to probe: used recently, or down (to see them come back).
    fn to_probe(&self, known: &dyn Fn(&str) -> bool) -> Vec<String> {
        let now = Instant::now();
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states.retain(|g, _| {
            let keep = known(g);
            if !keep {
                let labels = GatewayLabels { gateway: g.clone() };
                self.metrics.gateway_up.remove(&labels);
                self.metrics.gateway_rtt.remove(&labels);
            }
            keep
        });
        states
            .iter()
            .filter(|(_, s)| !s.up || now.duration_since(s.last_used) < PROBE_IDLE)
            .map(|(g, _)| g.clone())
            .collect()
    }

    /// How a proxy of `cluster` reaches `ep`.
    pub fn way_to(&self, ep: &Endpoint, cluster: &str) -> Way {
        if cluster.is_empty() || ep.cluster == cluster {
            return Way::Direct;
        }
        if ep.gateways.is_empty() {
            return if ep.via_gateways { Way::Unreachable } else { Way::Direct };
        }
        let mut usable: Vec<&String> = ep.gateways.iter().filter(|g| self.usable(g)).collect();
        if usable.is_empty() {
            return Way::Unreachable;
        }
        // The same gateway for the same endpoint while the set is stable, so its pooled
        // connection is reused; endpoints spread over the gateways.
        usable.sort();
        let h = ep.id.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
        Way::Gateway(usable[(h % usable.len() as u64) as usize].clone())
    }
}

/// Pooled mTLS HTTP/2 connections to gateways, one per gateway address, shared by the HTTP and
/// the TCP sides of a proxy. Each gateway has its own slot: dialling one that does not answer
/// holds up only the tunnels through it.
#[derive(Clone)]
pub struct GatewayPool {
    tls: TlsConnector,
    conns: Arc<Mutex<HashMap<String, OuterSlot>>>,
    health: Arc<GatewayHealth>,
}

impl std::fmt::Debug for GatewayPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayPool").finish_non_exhaustive()
    }
}

impl GatewayPool {
    /// A pool dialling with `tls` (this proxy's identity, gateway servers, ALPN `h2`).
    pub fn new(tls: Arc<rustls::ClientConfig>, health: Arc<GatewayHealth>) -> Self {
        Self { tls: TlsConnector::from(tls), conns: Arc::default(), health }
    }

    /// The health shared with the balancer.
    pub fn health(&self) -> &Arc<GatewayHealth> {
        &self.health
    }

    async fn outer(&self, gateway: &str, timeout: Duration) -> Result<Outer, String> {
        let slot = self.conns.lock().unwrap_or_else(|p| p.into_inner()).entry(gateway.to_string()).or_default().clone();
        let mut pooled = slot.lock().await;
        if let Some(c) = pooled.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        *pooled = None;
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(gateway))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(timeout, self.tls.connect(mesh_server_name(), tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let (send, conn) = crate::pool::h2_handshake(tls).await.map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        let gw = gateway.to_string();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(gateway = %gw, error = %e, "gateway connection ended");
            }
        });
        *pooled = Some(send.clone());
        Ok(send)
    }

    /// A tunnel through `gateway` to `endpoint` of the service at `authority`.
    pub async fn tunnel(
        &self,
        gateway: &str,
        authority: &str,
        endpoint: &str,
        timeout: Duration,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, TunnelError> {
        let r = self.tunnel_inner(gateway, authority, endpoint, timeout).await;
        match &r {
            Ok(_) => self.health.opened(gateway),
            Err(e) if e.gateway_fault => self.health.failed(gateway, &e.reason),
            Err(_) => {}
        }
        r
    }

    async fn tunnel_inner(
        &self,
        gateway: &str,
        authority: &str,
        endpoint: &str,
        timeout: Duration,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, TunnelError> {
        let gw_err = |reason: String| TunnelError { gateway_fault: true, reason };
        let mut outer = self.outer(gateway, timeout).await.map_err(gw_err)?;
        match tokio::time::timeout(timeout, outer.ready()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(gw_err(format!("gateway connection: {e}"))),
            // Every stream of the connection busy: the gateway is loaded, not gone.
            Err(_) => return Err(TunnelError { gateway_fault: false, reason: "no stream free in time".into() }),
        }
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
            .header("trellis-endpoint", endpoint)
            .body(http_body_util::Empty::new())
            .map_err(|e| TunnelError { gateway_fault: false, reason: e.to_string() })?;
        // A slow answer is the endpoint's (the gateway dials it before answering, within less than
        // a proxy's connect timeout); a gateway that hangs altogether fails its probes.
        let resp = tokio::time::timeout(timeout, outer.send_request(req))
            .await
            .map_err(|_| TunnelError { gateway_fault: false, reason: "CONNECT not answered in time".into() })?
            .map_err(|e| gw_err(format!("CONNECT: {e}")))?;
        if resp.status() != http::StatusCode::OK {
            let status = resp.status();
            let body =
                http_body_util::BodyExt::collect(resp.into_body()).await.map(|b| b.to_bytes()).unwrap_or_default();
            // A draining gateway refuses every tunnel: that is the gateway's state, not the
            // endpoint's.
            let draining = status == http::StatusCode::SERVICE_UNAVAILABLE && body.starts_with(b"this gateway");
            return Err(TunnelError {
                gateway_fault: draining,
                reason: format!("{status}: {}", String::from_utf8_lossy(&body).trim()),
            });
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| TunnelError { gateway_fault: false, reason: format!("upgrade: {e}") })?;
        Ok(TokioIo::new(upgraded))
    }

    /// Probes `gateway` once: the round trip of a request on its pooled connection.
    pub async fn probe(&self, gateway: &str) -> Result<Duration, String> {
        let r = tokio::time::timeout(PROBE_TIMEOUT, async {
            let mut outer = self.outer(gateway, PROBE_TIMEOUT).await?;
            outer.ready().await.map_err(|e| format!("gateway connection: {e}"))?;
            let req = http::Request::builder()
                .method(http::Method::GET)
                .uri(format!("http://{gateway}{PROBE_PATH}"))
                .body(http_body_util::Empty::new())
                .map_err(|e| e.to_string())?;
            let started = Instant::now();
            let resp = outer.send_request(req).await.map_err(|e| format!("probe: {e}"))?;
            let rtt = started.elapsed();
            if resp.status() != http::StatusCode::OK {
                return Err(format!("probe answered {}", resp.status()));
            }
            Ok(rtt)
        })
        .await
        .unwrap_or_else(|_| Err("probe not answered in time".into()));
        match &r {
            Ok(rtt) => self.health.set(gateway, true, Some(*rtt), false),
            Err(e) => self.health.failed(gateway, e),
        }
        r
    }

    /// Closes the connections to gateways that no endpoint names any more.
    pub fn retain(&self, live: &dyn Fn(&str) -> bool) {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).retain(|g, _| live(g));
    }
}

/// Probes the gateways in use every [`PROBE_EVERY`] until the drain starts.
pub async fn probe_forever(pool: GatewayPool, routes: watch::Receiver<Arc<Routes>>, drain: Drain) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = drain.signaled() => return,
        }
        let known: std::collections::HashSet<String> = {
            let r = routes.borrow();
            r.endpoints.values().flat_map(|e| e.gateways.iter().cloned()).collect()
        };
        pool.retain(&|g| known.contains(g));
        let due = pool.health.to_probe(&|g| known.contains(g));
        let probes = due.into_iter().map(|g| {
            let pool = pool.clone();
            async move {
                if let Err(e) = pool.probe(&g).await {
                    tracing::debug!(gateway = %g, error = %e, "gateway probe failed");
                }
            }
        });
        futures::future::join_all(probes).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(id: &str, cluster: &str, gateways: &[&str], via: bool) -> Endpoint {
        Endpoint {
            id: id.into(),
            service: "api.default".parse().unwrap(),
            cluster: cluster.into(),
            zone: String::new(),
            region: String::new(),
            gateways: gateways.iter().map(|g| g.to_string()).collect(),
            via_gateways: via,
            address: "10.0.0.1:15006".into(),
            identity: None,
            healthy: true,
            weight: 1,
        }
    }

    #[test]
    fn gateway_choice_table() {
        let h = GatewayHealth::new(Metrics::new());
        // (endpoint, caller's cluster, want)
        let cases: Vec<(Endpoint, &str, Way)> = vec![
            (ep("a/1", "a", &["g1:1"], true), "a", Way::Direct),
            (ep("b/1", "b", &[], false), "a", Way::Direct),
            (ep("b/1", "b", &[], true), "a", Way::Unreachable),
            (ep("b/1", "b", &["g1:1"], true), "a", Way::Gateway("g1:1".into())),
            (ep("b/1", "b", &["g1:1"], false), "", Way::Direct),
        ];
        for (i, (e, cluster, want)) in cases.into_iter().enumerate() {
            assert_eq!(h.way_to(&e, cluster), want, "case {i}");
        }
    }

    #[test]
    fn a_down_gateway_is_skipped_and_its_cluster_unreachable_when_it_was_the_last() {
        let h = GatewayHealth::new(Metrics::new());
        let eps: Vec<Endpoint> = (0..20).map(|i| ep(&format!("b/{i}"), "b", &["g1:1", "g2:1"], true)).collect();
        let spread: std::collections::BTreeSet<Way> = eps.iter().map(|e| h.way_to(e, "a")).collect();
        assert_eq!(spread.len(), 2, "endpoints spread over both gateways");
        h.failed("g1:1", "connect refused");
        for e in &eps {
            assert_eq!(h.way_to(e, "a"), Way::Gateway("g2:1".into()));
        }
        h.failed("g2:1", "connect refused");
        assert_eq!(h.way_to(&eps[0], "a"), Way::Unreachable);
        h.set("g1:1", true, Some(Duration::from_millis(1)), false);
        assert_eq!(h.way_to(&eps[0], "a"), Way::Gateway("g1:1".into()));
        assert_eq!(h.rtt("g1:1"), Some(Duration::from_millis(1)));
    }

    #[test]
    fn probed_are_the_gateways_in_use_and_those_down() {
        let h = GatewayHealth::new(Metrics::new());
        h.opened("used:1");
        h.failed("down:1", "refused");
        let mut due = h.to_probe(&|_| true);
        due.sort();
        assert_eq!(due, vec!["down:1".to_string(), "used:1".to_string()]);
        // Gateways no endpoint names any more are forgotten.
        assert!(h.to_probe(&|g| g == "used:1") == vec!["used:1".to_string()]);
        assert!(h.usable("down:1"), "forgotten, so presumed up if it comes back in a configuration");
    }
}
