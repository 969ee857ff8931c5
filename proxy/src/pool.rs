//! Dialing peers over mTLS, and a pool of HTTP/2 connections (one per endpoint, multiplexed).
//!
//! A peer of another cluster with east-west gateways is reached through one of them: an mTLS
//! HTTP/2 connection to the gateway (pooled, one per gateway) carries one `CONNECT` per
//! connection to the peer, and the mTLS with the peer runs inside that tunnel, end to end.
//!
//! The handshake proves the peer chains to the trust bundle and is a workload; right after it, and
//! before a single byte of the request, the peer's SPIFFE ID is compared with the identity the
//! control plane announced for the endpoint. A mismatch is a connection failure like a refused
//! connect (the request was not written, so any method may be retried elsewhere).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use trellis_proto::SpiffeId;
use trellis_proto::tls::{mesh_server_name, peer_id};

use crate::gateways::{GatewayPool, H2Tunnel, TunnelError};
use crate::metrics::{Direction, Metrics};
use crate::routes::Endpoint;

/// Why a connection to a peer could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} failed: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("connect to {addr} timed out")]
    Timeout { addr: String },
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake { addr: String, source: std::io::Error },
    #[error("{addr} is {got}, but the endpoint must be {expected}")]
    Identity { addr: String, expected: String, got: String },
    #[error("{addr} did not agree on ALPN {alpn}")]
    Alpn { addr: String, alpn: String },
    #[error("HTTP/2 handshake with {addr} failed: {source}")]
    Http2 { addr: String, source: h2::Error },
    #[error("tunnel through gateway {gateway} to {addr} failed: {reason}")]
    Tunnel { gateway: String, addr: String, reason: String, gateway_fault: bool },
}

impl ConnectError {
    fn tunnel(via: &Via, addr: String, e: TunnelError) -> Self {
        ConnectError::Tunnel { gateway: via.gateway.clone(), addr, reason: e.reason, gateway_fault: e.gateway_fault }
    }
}

/// How to reach a peer of another cluster: through one of its cluster's gateways.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Via {
    /// `host:port` of the gateway.
    pub gateway: String,
    /// `CONNECT` authority: `<service>.<namespace>:<port>`.
    pub authority: String,
    /// The endpoint chosen (the gateway splices to it).
    pub endpoint: String,
}

/// The transport under a peer's TLS: a TCP connection, or a tunnel through a gateway.
pub enum MeshIo {
    Tcp(TcpStream),
    Tunnel(H2Tunnel),
}

impl tokio::io::AsyncRead for MeshIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MeshIo::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            MeshIo::Tunnel(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for MeshIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MeshIo::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            MeshIo::Tunnel(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    // Vectored, so that TLS hands every record of a flush to one system call (and the peer
    // wakes once for a request's headers and body).
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MeshIo::Tcp(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            MeshIo::Tunnel(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MeshIo::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            MeshIo::Tunnel(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MeshIo::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            MeshIo::Tunnel(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Where to connect and who must answer: an endpoint's address and identity, and the way to it.
/// Two targets are the same peer when those are equal, whatever else their endpoints say, so
/// endpoints at one address share its pooled connection.
#[derive(Debug, Clone)]
pub struct Target {
    /// The endpoint (held, not copied: a target is made for every request).
    pub endpoint: Arc<Endpoint>,
    /// Through a gateway of the peer's cluster, or directly.
    pub via: Option<Via>,
}

impl Target {
    /// `host:port` of the peer's inbound listener.
    pub fn addr(&self) -> &str {
        &self.endpoint.address
    }

    /// Required peer identity; `None` accepts any identity the TLS config accepts.
    pub fn identity(&self) -> Option<&SpiffeId> {
        self.endpoint.identity.as_ref()
    }
}

impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        self.addr() == other.addr() && self.identity() == other.identity() && self.via == other.via
    }
}

impl Eq for Target {}

impl std::hash::Hash for Target {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.addr().hash(state);
        self.identity().hash(state);
        self.via.hash(state);
    }
}

/// Dials peers with one rustls client configuration (one ALPN).
#[derive(Clone)]
pub struct MeshConnector {
    tls: TlsConnector,
    alpn: &'static [u8],
    connect_timeout: Duration,
    metrics: Arc<Metrics>,
    gateways: Option<GatewayPool>,
}

impl std::fmt::Debug for MeshConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshConnector").field("alpn", &String::from_utf8_lossy(self.alpn)).finish()
    }
}

impl MeshConnector {
    /// A connector for `config`, whose ALPN list must be exactly `[alpn]`.
    pub fn new(
        config: Arc<rustls::ClientConfig>,
        alpn: &'static [u8],
        connect_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { tls: TlsConnector::from(config), alpn, connect_timeout, metrics, gateways: None }
    }

    /// The same connector, able to reach peers through the gateways of `pool`.
    pub fn with_gateways(self, pool: GatewayPool) -> Self {
        Self { gateways: Some(pool), ..self }
    }

    /// Connects, completes the handshake and checks ALPN and the peer identity.
    pub async fn connect(&self, target: &Target) -> Result<TlsStream<MeshIo>, ConnectError> {
        let addr = target.addr().to_string();
        let tcp = match (&target.via, &self.gateways) {
            (Some(via), Some(gw)) => {
                match gw.tunnel(&via.gateway, &via.authority, &via.endpoint, self.connect_timeout).await {
                    Ok(t) => MeshIo::Tunnel(t),
                    Err(e) => return Err(ConnectError::tunnel(via, addr, e)),
                }
            }
            _ => match tokio::time::timeout(self.connect_timeout, TcpStream::connect(target.addr())).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    MeshIo::Tcp(s)
                }
                Ok(Err(source)) => return Err(ConnectError::Connect { addr, source }),
                Err(_) => return Err(ConnectError::Timeout { addr }),
            },
        };
        let tls = match tokio::time::timeout(self.connect_timeout, self.tls.connect(mesh_server_name(), tcp)).await {
            Ok(Ok(s)) => s,
            // The gateway's answer to the CONNECT arrives with the handshake's first bytes.
            Ok(Err(ref source))
                if let Some(via) = &target.via
                    && let Some(refused) = source.get_ref().and_then(|e| e.downcast_ref::<TunnelError>()) =>
            {
                return Err(ConnectError::tunnel(via, addr, refused.clone()));
            }
            Ok(Err(source)) => {
                self.metrics.handshake_failed(Direction::outbound);
                return Err(ConnectError::Handshake { addr, source });
            }
            Err(_) => {
                self.metrics.handshake_failed(Direction::outbound);
                return Err(ConnectError::Timeout { addr });
            }
        };
        let conn = tls.get_ref().1;
        if conn.alpn_protocol() != Some(self.alpn) {
            return Err(ConnectError::Alpn { addr, alpn: String::from_utf8_lossy(self.alpn).into_owned() });
        }
        if let Some(expected) = target.identity() {
            let got = peer_id(conn.peer_certificates());
            if got.as_ref() != Some(expected) {
                self.metrics.handshake_failed(Direction::outbound);
                return Err(ConnectError::Identity {
                    addr,
                    expected: expected.to_string(),
                    got: got.map(|g| g.to_string()).unwrap_or_else(|| "anonymous".into()),
                });
            }
        }
        Ok(tls)
    }
}

/// How long a pooled connection may read nothing before it is pinged, and how long a ping may go
/// unanswered (with nothing else arriving) before the peer counts as gone: a host gone without
/// FIN is found before requests find it.
#[derive(Debug, Clone, Copy)]
struct Keepalive {
    interval: Duration,
    timeout: Duration,
}

const KEEPALIVE: Keepalive = Keepalive { interval: Duration::from_secs(10), timeout: Duration::from_secs(5) };

/// The HTTP/2 client settings of the mesh (peers and gateways): windows large enough that one
/// stream can fill a fast link (the defaults of the protocol, 64 KiB, cannot), header blocks up
/// to 16 KiB, no server push.
pub(crate) fn h2_client() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(5 * 1024 * 1024)
        .max_send_buffer_size(1024 * 1024)
        // Until the peer's SETTINGS arrive: a burst on a new connection stays within what the
        // peer allows (it would refuse the excess).
        .initial_max_send_streams(100)
        .max_header_list_size(16 * 1024)
        .enable_push(false);
    b
}

/// A pooled HTTP/2 connection to a peer.
#[derive(Clone)]
pub struct PeerConnection {
    send: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl PeerConnection {
    /// Whether the connection has ended (the peer closed it, broke it or stopped answering pings).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// A sender once the peer allows one more concurrent stream.
    pub async fn ready(self) -> Result<h2::client::SendRequest<Bytes>, h2::Error> {
        self.send.ready().await
    }
}

/// A transport that records when it last read anything (milliseconds since `epoch`): a
/// connection carrying data needs no ping to show it is alive.
struct Stamped<T> {
    io: T,
    epoch: tokio::time::Instant,
    last_read: Arc<AtomicU64>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Stamped<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            let ms = u64::try_from(this.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            this.last_read.store(ms, Ordering::Relaxed);
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Stamped<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Drives a client connection until it ends or the peer stops answering: after
/// `keepalive.interval` without reading anything, a ping; the connection is given up when
/// neither the answer nor any other data arrives for `keepalive.timeout` (an answer queued
/// behind a lot of data on a slow link is not a dead peer).
async fn drive<T>(
    mut conn: h2::client::Connection<T, Bytes>,
    addr: String,
    closed: Arc<AtomicBool>,
    epoch: tokio::time::Instant,
    last_read: Arc<AtomicU64>,
    keepalive: Keepalive,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let ping_pong = conn.ping_pong();
    let keepalive = async move {
        let Some(mut pp) = ping_pong else { return std::future::pending::<&'static str>().await };
        loop {
            tokio::time::sleep(keepalive.interval).await;
            let last = Duration::from_millis(last_read.load(Ordering::Relaxed));
            if epoch.elapsed().saturating_sub(last) < keepalive.interval {
                continue;
            }
            let ping = pp.ping(h2::Ping::opaque());
            tokio::pin!(ping);
            let mut heard = last_read.load(Ordering::Relaxed);
            loop {
                tokio::select! {
                    r = &mut ping => match r {
                        Ok(_) => break,
                        Err(_) => return "the connection failed a ping",
                    },
                    _ = tokio::time::sleep(keepalive.timeout) => {
                        let now = last_read.load(Ordering::Relaxed);
                        if now == heard {
                            return "the peer did not answer a ping in time";
                        }
                        heard = now;
                    }
                }
            }
        }
    };
    tokio::select! {
        r = &mut conn => {
            if let Err(e) = r {
                tracing::debug!(peer = %addr, error = %e, "pooled connection ended");
            }
        }
        why = keepalive => tracing::info!(peer = %addr, why, "closing a pooled connection"),
    }
    closed.store(true, Ordering::Release);
}

#[derive(Default)]
struct Slot {
    sender: tokio::sync::Mutex<Option<PeerConnection>>,
}

/// Pooled HTTP/2 connections to peers: one per target, shared by every request to it, and
/// re-established when it breaks.
pub struct H2Pool {
    connector: MeshConnector,
    slots: Mutex<HashMap<Target, Arc<Slot>>>,
    tasks: Mutex<JoinSet<()>>,
}

impl std::fmt::Debug for H2Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Pool").field("connector", &self.connector).finish_non_exhaustive()
    }
}

impl H2Pool {
    /// A pool dialing with `connector` (ALPN `trellis/h2`).
    pub fn new(connector: MeshConnector) -> Self {
        Self { connector, slots: Mutex::new(HashMap::new()), tasks: Mutex::new(JoinSet::new()) }
    }

    /// A live connection to `target`, connecting if there is none.
    pub async fn get(&self, target: &Target) -> Result<PeerConnection, ConnectError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            match slots.get(target) {
                Some(slot) => slot.clone(),
                None => slots.entry(target.clone()).or_default().clone(),
            }
        };
        // One dial at a time per target: concurrent requests wait for it instead of each
        // opening a connection of its own.
        let mut sender = slot.sender.lock().await;
        if let Some(s) = sender.as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let replacing = sender.is_some();
        *sender = None;
        tracing::debug!(peer = %target.addr(), replacing, "opening a pooled connection");
        let tls = self.connector.connect(target).await?;
        let (epoch, last_read) = (tokio::time::Instant::now(), Arc::new(AtomicU64::new(0)));
        let io = Stamped { io: crate::coalesce::Coalesce::new(tls), epoch, last_read: last_read.clone() };
        let (send, conn) = h2_client()
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|source| ConnectError::Http2 { addr: target.addr().to_string(), source })?;
        let closed = Arc::new(AtomicBool::new(false));
        {
            let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
            while tasks.try_join_next().is_some() {}
            tasks.spawn(drive(conn, target.addr().to_string(), closed.clone(), epoch, last_read, KEEPALIVE));
        }
        let peer = PeerConnection { send, closed };
        *sender = Some(peer.clone());
        Ok(peer)
    }

    /// Sets `conn` aside after it failed: the next request to its target dials a new one. (A
    /// late failure of an old connection leaves a newer one alone.)
    pub fn forget(&self, conn: &PeerConnection) {
        conn.closed.store(true, Ordering::Release);
    }

    /// Closes connections to targets that are no longer known.
    pub fn retain(&self, live: &dyn Fn(&Target) -> bool) {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).retain(|t, _| live(t));
    }

    /// Number of targets with a slot (tests, metrics).
    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True when no target has a slot.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_the_same_peer_when_address_identity_and_route_are() {
        use std::hash::{BuildHasher, RandomState};
        let ep = |id: &str, address: &str, identity: Option<&str>| {
            Arc::new(Endpoint {
                id: id.into(),
                service: "api.default".parse().unwrap(),
                cluster: "a".into(),
                zone: String::new(),
                region: String::new(),
                gateways: Vec::new(),
                via_gateways: false,
                address: address.into(),
                identity: identity.map(|i| i.parse().unwrap()),
                healthy: true,
                weight: 1,
            })
        };
        let direct = |e: Arc<Endpoint>| Target { endpoint: e, via: None };
        let id = Some("spiffe://trellis.local/ns/default/sa/api");
        let a = direct(ep("a/default/api/1", "10.0.0.1:15006", id));
        let hasher = RandomState::new();
        // Another endpoint record for the same instance: the same peer, one pooled connection.
        let same = direct(ep("a/default/api/other", "10.0.0.1:15006", id));
        assert_eq!(a, same);
        assert_eq!(hasher.hash_one(&a), hasher.hash_one(&same));
        assert_ne!(a, direct(ep("a/default/api/1", "10.0.0.2:15006", id)), "another address");
        assert_ne!(a, direct(ep("a/default/api/1", "10.0.0.1:15006", None)), "another identity");
        let via = Via { gateway: "g:1".into(), authority: "api.default:80".into(), endpoint: "a/default/api/1".into() };
        assert_ne!(a, Target { via: Some(via), ..a.clone() }, "through a gateway");
    }

    const QUICK: Keepalive = Keepalive { interval: Duration::from_millis(50), timeout: Duration::from_millis(100) };

    /// A client connection over an in-memory pipe, driven with [`QUICK`] keepalives; the server
    /// end is handed to `server`. Returns the closed flag and the sender.
    async fn connection<F, Fut>(server: F) -> (Arc<AtomicBool>, h2::client::SendRequest<Bytes>)
    where
        F: FnOnce(tokio::io::DuplexStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(server(server_io));
        let (epoch, last_read) = (tokio::time::Instant::now(), Arc::new(AtomicU64::new(0)));
        let io = Stamped { io: client_io, epoch, last_read: last_read.clone() };
        let (send, conn) = h2_client().handshake::<_, Bytes>(io).await.expect("handshake");
        let closed = Arc::new(AtomicBool::new(false));
        tokio::spawn(drive(conn, "peer:1".into(), closed.clone(), epoch, last_read, QUICK));
        (closed, send)
    }

    #[tokio::test]
    async fn an_idle_connection_to_a_peer_that_answers_pings_stays_open() {
        let (closed, _send) = connection(|io| async move {
            // Polling the connection answers pings.
            let mut conn = h2::server::handshake(io).await.expect("server handshake");
            while conn.accept().await.is_some() {}
        })
        .await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!closed.load(Ordering::Acquire), "pings answered: the connection stays");
    }

    #[tokio::test]
    async fn a_peer_that_stops_answering_is_given_up() {
        let (closed, _send) = connection(|io| async move {
            // Settings exchanged, then never polled again: no answer to anything.
            let conn = h2::server::handshake(io).await.expect("server handshake");
            std::future::pending::<()>().await;
            drop(conn);
        })
        .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !closed.load(Ordering::Acquire) {
            assert!(tokio::time::Instant::now() < deadline, "a silent peer must be given up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
