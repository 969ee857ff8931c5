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
use std::future::Future as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;

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

/// A pooled HTTP/2 connection to a gateway, and whether it has ended.
#[derive(Clone)]
struct Outer {
    send: h2::client::SendRequest<Bytes>,
    closed: Arc<std::sync::atomic::AtomicBool>,
}
/// One gateway's pooled connection, dialled by one task at a time.
type OuterSlot = Arc<tokio::sync::Mutex<Option<Outer>>>;

/// Header the gateway sets on a refusal that is about the gateway itself (it drains).
pub const GATEWAY_REFUSAL_HEADER: &str = "trellis-gateway-refusal";

/// Why a tunnel could not be opened: before the `CONNECT` was sent, or the gateway's refusal
/// (which reaches the caller inside the I/O error of its first read or write).
#[derive(Debug, Clone)]
pub struct TunnelError {
    /// The gateway itself failed or refused for itself (dial, handshake, connection, drain): it
    /// is marked down, and the endpoint's record stays clean.
    pub gateway_fault: bool,
    pub reason: String,
}

impl std::fmt::Display for TunnelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for TunnelError {}

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
    /// Counts the gateways that went down or came back (see [`GatewayHealth::generation`]).
    changes: AtomicU64,
}

impl GatewayHealth {
    /// Health reported in `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { states: Mutex::new(HashMap::new()), metrics, changes: AtomicU64::new(0) })
    }

    /// A number that changes whenever a gateway goes down or comes back, that is whenever an
    /// answer of [`GatewayHealth::reachable`] may change.
    pub fn generation(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
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
        let s = states.entry(gateway.to_string()).or_insert_with(|| {
            if !up {
                // A gateway never seen was presumed up.
                self.changes.fetch_add(1, Ordering::AcqRel);
            }
            GatewayState { up, last_used: now, rtt: None }
        });
        if s.up != up {
            self.changes.fetch_add(1, Ordering::AcqRel);
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
        states.retain(|g, s| {
            let keep = known(g);
            if !keep && !s.up {
                // Forgotten, it would be presumed up again.
                self.changes.fetch_add(1, Ordering::AcqRel);
            }
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

    /// Can a proxy of `cluster` reach `ep` now? What [`GatewayHealth::way_to`] answers with
    /// anything but [`Way::Unreachable`], without choosing the gateway (nothing is allocated).
    pub fn reachable(&self, ep: &Endpoint, cluster: &str) -> bool {
        if cluster.is_empty() || ep.cluster == cluster {
            return true;
        }
        if ep.gateways.is_empty() {
            return !ep.via_gateways;
        }
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        ep.gateways.iter().any(|g| states.get(g.as_str()).is_none_or(|s| s.up))
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
            && !c.closed.load(Ordering::Relaxed)
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
        // The tunnels to one gateway share this connection; their writes are held so that
        // frames produced together leave together.
        let tls = crate::coalesce::Coalesce::new(tls);
        let (send, conn) = tokio::time::timeout(timeout, crate::pool::h2_client().handshake::<_, Bytes>(tls))
            .await
            .map_err(|_| "HTTP/2 handshake timed out".to_string())?
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (gw, done) = (gateway.to_string(), closed.clone());
        // No HTTP/2 pings: the probes every second find a dead gateway.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(gateway = %gw, error = %e, "gateway connection ended");
            }
            done.store(true, Ordering::Relaxed);
        });
        let outer = Outer { send, closed };
        *pooled = Some(outer.clone());
        Ok(outer)
    }

    /// A tunnel through `gateway` to `endpoint` of the service at `authority`. The tunnel is
    /// returned as soon as the `CONNECT` is sent: what the caller writes (its TLS ClientHello)
    /// travels right behind it, saving a round trip; the gateway's answer is read with the first
    /// bytes, and a refusal is an error of that read ([`TunnelError`]).
    pub async fn tunnel(
        &self,
        gateway: &str,
        authority: &str,
        endpoint: &str,
        timeout: Duration,
    ) -> Result<H2Tunnel, TunnelError> {
        let r = self.tunnel_inner(gateway, authority, endpoint, timeout).await;
        if let Err(e) = &r
            && e.gateway_fault
        {
            self.health.failed(gateway, &e.reason);
        }
        r
    }

    async fn tunnel_inner(
        &self,
        gateway: &str,
        authority: &str,
        endpoint: &str,
        timeout: Duration,
    ) -> Result<H2Tunnel, TunnelError> {
        let gw_err = |reason: String| TunnelError { gateway_fault: true, reason };
        let outer = self.outer(gateway, timeout).await.map_err(gw_err)?;
        let mut send = match tokio::time::timeout(timeout, outer.send.ready()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                outer.closed.store(true, Ordering::Relaxed);
                return Err(gw_err(format!("gateway connection: {e}")));
            }
            // Every stream of the connection busy: the gateway is loaded, not gone.
            Err(_) => return Err(TunnelError { gateway_fault: false, reason: "no stream free in time".into() }),
        };
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
            .header("trellis-endpoint", endpoint)
            .body(())
            .map_err(|e| TunnelError { gateway_fault: false, reason: e.to_string() })?;
        let (response, stream) = send.send_request(req, false).map_err(|e| gw_err(format!("CONNECT: {e}")))?;
        Ok(H2Tunnel {
            send: stream,
            state: TunnelState::Awaiting(response),
            pending: Bytes::new(),
            gateway: gateway.to_string(),
            health: self.health.clone(),
        })
    }

    /// Probes `gateway` once: the round trip of a request on its pooled connection.
    pub async fn probe(&self, gateway: &str) -> Result<Duration, String> {
        let r = tokio::time::timeout(PROBE_TIMEOUT, async {
            let outer = self.outer(gateway, PROBE_TIMEOUT).await?;
            let mut send = outer.send.ready().await.map_err(|e| format!("gateway connection: {e}"))?;
            let req = http::Request::builder()
                .method(http::Method::GET)
                .uri(format!("http://{gateway}{PROBE_PATH}"))
                .body(())
                .map_err(|e| e.to_string())?;
            let started = Instant::now();
            let (response, _) = send.send_request(req, true).map_err(|e| format!("probe: {e}"))?;
            let resp = response.await.map_err(|e| format!("probe: {e}"))?;
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

enum TunnelState {
    /// The `CONNECT` is sent; its answer not read yet.
    Awaiting(h2::client::ResponseFuture),
    /// Refused: its body is read for the reason.
    Refusing {
        status: http::StatusCode,
        gateway_fault: bool,
        recv: h2::RecvStream,
        body: Vec<u8>,
    },
    Open(h2::RecvStream),
    Ended,
}

/// A stream through a gateway: one HTTP/2 stream opened by `CONNECT`, carrying the bytes of the
/// caller's own connection (its mTLS) both ways.
pub struct H2Tunnel {
    send: h2::SendStream<Bytes>,
    state: TunnelState,
    /// Received and not yet read.
    pending: Bytes,
    gateway: String,
    health: Arc<GatewayHealth>,
}

fn h2_io(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| std::io::Error::other("HTTP/2 I/O error"))
    } else {
        std::io::Error::new(std::io::ErrorKind::ConnectionReset, e)
    }
}

impl H2Tunnel {
    /// Reads the gateway's answer to the `CONNECT` if it is not read yet: ready once the tunnel
    /// is open (or ended), an error with the reason when the gateway refused it.
    fn poll_answer(&mut self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        loop {
            match &mut self.state {
                TunnelState::Awaiting(response) => {
                    let resp = match std::pin::Pin::new(response).poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => {
                            self.state = TunnelState::Ended;
                            return Poll::Ready(Err(h2_io(e)));
                        }
                        Poll::Ready(Ok(r)) => r,
                    };
                    let status = resp.status();
                    let gateway_fault = resp.headers().contains_key(GATEWAY_REFUSAL_HEADER);
                    let recv = resp.into_body();
                    self.state = if status == http::StatusCode::OK {
                        self.health.opened(&self.gateway);
                        TunnelState::Open(recv)
                    } else {
                        TunnelState::Refusing { status, gateway_fault, recv, body: Vec::new() }
                    };
                }
                TunnelState::Refusing { status, gateway_fault, recv, body } => {
                    match recv.poll_data(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Some(Ok(data))) if body.len() < 4096 => {
                            let _ = recv.flow_control().release_capacity(data.len());
                            body.extend_from_slice(&data);
                            continue;
                        }
                        _ => {}
                    }
                    let refused = TunnelError {
                        gateway_fault: *gateway_fault,
                        reason: format!("{status}: {}", String::from_utf8_lossy(body).trim()),
                    };
                    if refused.gateway_fault {
                        self.health.failed(&self.gateway, &refused.reason);
                    }
                    self.state = TunnelState::Ended;
                    return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, refused)));
                }
                TunnelState::Open(_) | TunnelState::Ended => return Poll::Ready(Ok(())),
            }
        }
    }

    /// Our side of the stream failed: if the gateway refused the tunnel, that is the error.
    fn write_failed(&mut self, cx: &mut std::task::Context<'_>, e: std::io::Error) -> Poll<std::io::Result<usize>> {
        match self.poll_answer(cx) {
            Poll::Ready(Err(refused)) => Poll::Ready(Err(refused)),
            // The answer is on its way (it was sent before the stream closed).
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Err(e)),
        }
    }
}

impl tokio::io::AsyncRead for H2Tunnel {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if let Poll::Ready(Err(e)) = this.poll_answer(cx) {
                return Poll::Ready(Err(e));
            }
            match &mut this.state {
                TunnelState::Awaiting(_) | TunnelState::Refusing { .. } => return Poll::Pending,
                TunnelState::Open(recv) => match recv.poll_data(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(data))) => {
                        let _ = recv.flow_control().release_capacity(data.len());
                        this.pending = data;
                    }
                    Poll::Ready(Some(Err(e))) => {
                        this.state = TunnelState::Ended;
                        return Poll::Ready(Err(h2_io(e)));
                    }
                    Poll::Ready(None) => {
                        this.state = TunnelState::Ended;
                        return Poll::Ready(Ok(()));
                    }
                },
                TunnelState::Ended => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl tokio::io::AsyncWrite for H2Tunnel {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[std::io::IoSlice::new(buf)])
    }

    /// Every slice goes into one send on the stream (as much as its window allows; h2 frames it).
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let this = self.get_mut();
        this.send.reserve_capacity(total);
        // Capacity already assigned is used at once (`poll_capacity` only reports increases).
        let n = match this.send.capacity() {
            0 => match this.send.poll_capacity(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return this.write_failed(cx, std::io::ErrorKind::BrokenPipe.into()),
                Poll::Ready(Some(Err(e))) => return this.write_failed(cx, h2_io(e)),
                Poll::Ready(Some(Ok(n))) => n,
            },
            available => available,
        };
        let n = n.min(total);
        let mut data = bytes::BytesMut::with_capacity(n);
        for b in bufs {
            let take = (n - data.len()).min(b.len());
            data.extend_from_slice(&b[..take]);
            if data.len() == n {
                break;
            }
        }
        match this.send.send_data(data.freeze(), false) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(e) => this.write_failed(cx, h2_io(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        // Data is handed to the connection as it is written; the connection task sends it.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        // End of our direction; a stream already reset or ended has nothing more to close.
        let _ = this.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
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
            assert_eq!(h.reachable(&e, cluster), want != Way::Unreachable, "case {i}");
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
        assert!(h.reachable(&eps[0], "a"), "one gateway is still up");
        h.failed("g2:1", "connect refused");
        assert_eq!(h.way_to(&eps[0], "a"), Way::Unreachable);
        assert!(!h.reachable(&eps[0], "a"));
        h.set("g1:1", true, Some(Duration::from_millis(1)), false);
        assert_eq!(h.way_to(&eps[0], "a"), Way::Gateway("g1:1".into()));
        assert!(h.reachable(&eps[0], "a"));
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

    /// A gateway on the other end of an in-memory pipe answering one CONNECT with `status` (and
    /// echoing what it receives when it is 200); the caller's tunnel.
    async fn tunnel_against(status: u16, refusal: bool) -> (H2Tunnel, Arc<GatewayHealth>) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.expect("server handshake");
            if let Some(Ok((req, mut respond))) = conn.accept().await {
                tokio::spawn(async move { while conn.accept().await.is_some() {} });
                let mut resp = http::Response::builder().status(status);
                if refusal {
                    resp = resp.header(GATEWAY_REFUSAL_HEADER, "draining");
                }
                let mut send = respond.send_response(resp.body(()).expect("response"), false).expect("respond");
                if status != 200 {
                    send.send_data(Bytes::from_static(b"the reason\n"), true).expect("body");
                    return;
                }
                let mut body = req.into_body();
                while let Some(Ok(data)) = body.data().await {
                    let _ = body.flow_control().release_capacity(data.len());
                    send.reserve_capacity(data.len());
                    send.send_data(data, false).expect("echo");
                }
                let _ = send.send_data(Bytes::new(), true);
            }
        });
        let (send, conn) = h2::client::handshake(client_io).await.expect("client handshake");
        tokio::spawn(conn);
        let mut send = send.ready().await.expect("ready");
        let req = http::Request::builder().method(http::Method::CONNECT).uri("api.default:80").body(()).expect("req");
        let (response, stream) = send.send_request(req, false).expect("connect");
        let health = GatewayHealth::new(Metrics::new());
        let t = H2Tunnel {
            send: stream,
            state: TunnelState::Awaiting(response),
            pending: Bytes::new(),
            gateway: "gw:1".into(),
            health: health.clone(),
        };
        (t, health)
    }

    #[tokio::test]
    async fn data_written_before_the_answer_goes_through_and_refusals_carry_their_reason() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Written at once, before the gateway answers: it arrives, and comes back.
        let (mut t, health) = tunnel_against(200, false).await;
        t.write_all(b"client hello").await.expect("write");
        let mut buf = [0u8; 12];
        t.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"client hello");
        t.shutdown().await.expect("shutdown");
        assert_eq!(t.read(&mut buf).await.expect("eof"), 0);
        assert!(health.usable("gw:1"));

        // A refusal for the endpoint: an error naming the reason; the gateway stays usable.
        let (mut t, health) = tunnel_against(503, false).await;
        // The refusal surfaces on whichever comes first: the write (the stream is closed) or a read.
        let err = match t.write_all(b"client hello").await {
            Err(e) => e,
            Ok(()) => t.read(&mut buf).await.expect_err("refused"),
        };
        let refused = err.get_ref().and_then(|e| e.downcast_ref::<TunnelError>()).expect("a TunnelError");
        assert!(!refused.gateway_fault && refused.reason.contains("the reason"), "{refused:?}");
        assert!(health.usable("gw:1"));

        // A refusal about the gateway (it drains): the gateway is set aside.
        let (mut t, health) = tunnel_against(503, true).await;
        let err = t.read(&mut buf).await.expect_err("refused");
        let refused = err.get_ref().and_then(|e| e.downcast_ref::<TunnelError>()).expect("a TunnelError");
        assert!(refused.gateway_fault, "{refused:?}");
        assert!(!health.usable("gw:1"));
    }

    #[tokio::test]
    async fn a_megabyte_each_way_goes_through_the_tunnels_flow_control() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (t, _) = tunnel_against(200, false).await;
        let (mut r, mut w) = tokio::io::split(t);
        let data: Vec<u8> = (0..1_048_576u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(16 * 1024 + 7) {
                w.write_all(chunk).await.expect("write");
            }
            w.shutdown().await.expect("shutdown");
        });
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut got)).await.expect("no stall").expect("read");
        writer.await.expect("writer");
        assert!(got == data, "echoed {} bytes of {}", got.len(), data.len());
    }
}
