//! Dialing peers over mTLS, and a pool of HTTP/2 connections (one per endpoint, multiplexed).
//!
//! The handshake proves the peer chains to the trust bundle and is a workload; right after it, and
//! before a single byte of the request, the peer's SPIFFE ID is compared with the identity the
//! control plane announced for the endpoint. A mismatch is a connection failure like a refused
//! connect (the request was not written, so any method may be retried elsewhere).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use trellis_proto::SpiffeId;
use trellis_proto::tls::{mesh_server_name, peer_id};

use crate::body::Body;
use crate::metrics::{Direction, Metrics};

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
    Http2 { addr: String, source: hyper::Error },
}

/// Where to connect and who must answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// `host:port` of the peer's inbound listener.
    pub addr: String,
    /// Required peer identity; `None` accepts any identity the TLS config accepts.
    pub identity: Option<SpiffeId>,
}

/// Dials peers with one rustls client configuration (one ALPN).
#[derive(Clone)]
pub struct MeshConnector {
    tls: TlsConnector,
    alpn: &'static [u8],
    connect_timeout: Duration,
    metrics: Arc<Metrics>,
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
        Self { tls: TlsConnector::from(config), alpn, connect_timeout, metrics }
    }

    /// Connects, completes the handshake and checks ALPN and the peer identity.
    pub async fn connect(&self, target: &Target) -> Result<TlsStream<TcpStream>, ConnectError> {
        let addr = target.addr.clone();
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(&target.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(ConnectError::Connect { addr, source }),
            Err(_) => return Err(ConnectError::Timeout { addr }),
        };
        let _ = tcp.set_nodelay(true);
        let tls = match tokio::time::timeout(self.connect_timeout, self.tls.connect(mesh_server_name(), tcp)).await {
            Ok(Ok(s)) => s,
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
        if let Some(expected) = &target.identity {
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

#[derive(Default)]
struct Slot {
    sender: tokio::sync::Mutex<Option<SendRequest<Body>>>,
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

    /// A ready sender to `target`, connecting if there is no live connection.
    pub async fn get(&self, target: &Target) -> Result<SendRequest<Body>, ConnectError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.entry(target.clone()).or_default().clone()
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
        tracing::debug!(peer = %target.addr, replacing, "opening a pooled connection");
        let tls = self.connector.connect(target).await?;
        let (s, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Pings find dead peers (a host gone without FIN) before requests do.
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| ConnectError::Http2 { addr: target.addr.clone(), source })?;
        let addr = target.addr.clone();
        {
            let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
            while tasks.try_join_next().is_some() {}
            tasks.spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(peer = %addr, error = %e, "pooled connection ended");
                }
            });
        }
        *sender = Some(s.clone());
        Ok(s)
    }

    /// Drops the connection to `target` if it is the one given (after it failed a request).
    pub fn forget(&self, target: &Target) {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).remove(target);
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
