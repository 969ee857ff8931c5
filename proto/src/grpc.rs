//! mTLS plumbing for tonic: a server-side stream of verified TLS connections that carries the
//! peer's SPIFFE ID into every request, and channels that dial over our own rustls configuration.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

use crate::identity::SpiffeId;
use crate::tls::{mesh_server_name, peer_id};

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a server knows about the peer of a connection; found in every request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The verified SPIFFE ID, if the client presented a certificate.
    pub identity: Option<SpiffeId>,
    /// The peer's socket address.
    pub remote_addr: Option<SocketAddr>,
    /// The cluster whose CA issued the peer's certificate.
    pub issuer_cluster: Option<String>,
}

/// A server-side TLS connection with its peer information.
pub struct MeshServerStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for MeshServerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for MeshServerStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshServerStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections and yields those whose TLS handshake succeeded. Handshakes run
/// concurrently so one slow client cannot stall the others; failures are logged and dropped.
pub fn tls_incoming(listener: TcpListener, acceptor: TlsAcceptor) -> ReceiverStream<io::Result<MeshServerStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let certs = tls.get_ref().1.peer_certificates();
                        let identity = peer_id(certs);
                        let issuer_cluster = crate::tls::issuer_cluster(certs);
                        let info = PeerInfo { identity, remote_addr: Some(remote), issuer_cluster };
                        let _ = tx.send(Ok(MeshServerStream { inner: tls, info })).await;
                    }
                    Ok(Err(e)) => tracing::info!(peer = %remote, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::info!(peer = %remote, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The cluster whose CA issued the peer's certificate, for a request served through [`tls_incoming`].
pub fn peer_issuer_cluster<T>(req: &tonic::Request<T>) -> Option<String> {
    req.extensions().get::<PeerInfo>().and_then(|p| p.issuer_cluster.clone())
}

/// The verified peer identity of a gRPC request served through [`tls_incoming`].
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Option<SpiffeId> {
    req.extensions().get::<PeerInfo>().and_then(|p| p.identity.clone())
}

/// The peer's socket address of a gRPC request served through [`tls_incoming`].
pub fn peer_addr<T>(req: &tonic::Request<T>) -> Option<SocketAddr> {
    req.extensions().get::<PeerInfo>().and_then(|p| p.remote_addr)
}

/// A lazily connecting gRPC channel to `addr` (`host:port`) over mTLS with `config`. The channel
/// reconnects by itself after failures.
pub fn channel(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<Channel, tonic::transport::Error> {
    let connector = TlsConnector::from(config);
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let target = addr.to_string();
    Ok(endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri: tonic::codegen::http::Uri| {
        let connector = connector.clone();
        let target = target.clone();
        async move {
            let tcp = TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(mesh_server_name(), tcp).await?;
            Ok::<_, io::Error>(TokioIo::new(tls))
        }
    })))
}
