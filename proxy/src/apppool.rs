//! Connections to the local application: pooled HTTP/1.1 connections ([`AppPool`]), or one
//! multiplexed HTTP/2 connection for a gRPC application ([`AppH2`]).
//!
//! An HTTP/1.1 request takes the most recently used idle connection (its socket is the warmest),
//! or dials a new one. The connection goes back to the pool as soon as its response body has been
//! read to the end and the connection is ready for another request; a response abandoned half-way
//! takes its connection with it, since the rest of that body is still on the wire. An idle
//! connection the application has closed is skipped, and a request that found its connection
//! closed before any of it was written is sent again on another. A connection idle for longer
//! than [`IDLE_TIMEOUT`] is not used again and is closed at the next sweep (every half of that
//! time); at most [`MAX_IDLE`] are kept.
//!
//! Compared with a general-purpose client this does no per-request URI or host lookup, spawns
//! nothing per request and copies no connection details into responses: every request goes to
//! one address.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::{Body, BoxError};
use crate::coalesce::Coalesce;
use crate::metrics::Metrics;

/// An idle connection older than this is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept at most; more are closed as they come back.
pub const MAX_IDLE: usize = 128;

/// Why a request to the application failed.
#[derive(Debug, thiserror::Error)]
pub enum AppRequestError {
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("HTTP handshake failed: {0}")]
    Handshake(hyper::Error),
    #[error("{0}")]
    Http(hyper::Error),
}

struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

/// HTTP/1.1 connections to one application address.
pub struct AppPool {
    addr: String,
    connect_timeout: Duration,
    idle: Mutex<Vec<Idle>>,
    /// `trellis_proxy_app_connections_total`.
    opened: prometheus_client::metrics::counter::Counter,
    /// `trellis_proxy_app_idle_connections`: the length of `idle`.
    idle_gauge: prometheus_client::metrics::gauge::Gauge,
}

impl std::fmt::Debug for AppPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppPool").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl AppPool {
    /// A pool of connections to `addr` (`host:port`), each dialled within `connect_timeout`,
    /// counted in `metrics`. It starts a task that closes connections idle for longer than
    /// [`IDLE_TIMEOUT`]; the task ends with the pool.
    pub fn new(addr: String, connect_timeout: Duration, metrics: &Metrics) -> Arc<Self> {
        let pool = Arc::new(Self {
            addr,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
            opened: metrics.app_connections.clone(),
            idle_gauge: metrics.app_idle_connections.clone(),
        });
        tokio::spawn(sweep(Arc::downgrade(&pool)));
        pool
    }

    /// Idle connections now (for tests and diagnostics).
    pub fn idle(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Sends `req` (origin-form URI, `Host` set) and returns the response, whose body streams
    /// from the connection.
    pub async fn send(self: &Arc<Self>, mut req: Request<Body>) -> Result<Response<Body>, AppRequestError> {
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let (parts, incoming) = resp.into_parts();
                    let body = PooledBody { incoming, back: Some((sender, self.clone())) };
                    let body = crate::body::boxed(body.release_if_done());
                    return Ok(Response::from_parts(parts, body));
                }
                Err(mut e) => match e.take_message() {
                    // Nothing was written: the pooled connection had closed. Another one.
                    Some(again) if reused => {
                        tracing::debug!(app = %self.addr, error = %e.error(), "pooled application connection closed; resending");
                        req = again;
                    }
                    _ => return Err(AppRequestError::Http(e.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection that is still open and ready.
    fn checkout(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let mut found = None;
        while let Some(Idle { sender, since }) = idle.pop() {
            if sender.is_ready() && since.elapsed() < IDLE_TIMEOUT {
                found = Some(sender);
                break;
            }
        }
        self.idle_gauge.set(idle.len() as i64);
        found
    }

    async fn connect(&self) -> Result<SendRequest<Body>, AppRequestError> {
        let tcp = dial(&self.addr, self.connect_timeout).await?;
        let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await.map_err(AppRequestError::Handshake)?;
        self.opened.inc();
        drive(conn, self.addr.clone());
        Ok(sender)
    }

    /// Back to the pool, if it is ready for another request now; otherwise once it is.
    fn put(self: Arc<Self>, mut sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        if !sender.is_ready() {
            // The request body is still being written, or the connection has not yet seen the
            // end of the response: it comes back once it has (or closes).
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    self.keep(sender);
                }
            });
            return;
        }
        self.keep(sender);
    }

    fn keep(&self, sender: SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle { sender, since: Instant::now() });
        }
        self.idle_gauge.set(idle.len() as i64);
    }

    /// Closes the connections idle for longer than [`IDLE_TIMEOUT`] (the oldest are first).
    fn expire(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let stale = idle.iter().take_while(|i| i.since.elapsed() >= IDLE_TIMEOUT).count();
        idle.drain(..stale);
        idle.retain(|i| !i.sender.is_closed());
        self.idle_gauge.set(idle.len() as i64);
    }
}

/// Runs a connection to the application at `addr` until it ends.
fn drive<C>(conn: C, addr: String)
where
    C: Future<Output = hyper::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(app = %addr, error = %e, "application connection ended with an error");
        }
    });
}

/// Dials `addr` within `timeout`, with Nagle off.
async fn dial(addr: &str, timeout: Duration) -> Result<TcpStream, AppRequestError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            Ok(tcp)
        }
        Ok(Err(e)) => Err(AppRequestError::Connect(e)),
        Err(_) => Err(AppRequestError::ConnectTimeout(timeout)),
    }
}

/// One HTTP/2 (h2c, prior knowledge) connection to a gRPC application, shared by every request
/// and dialled again once it closes. Its writes are held until a flush ([`Coalesce`]): a
/// request's headers and body, and the requests of several streams, leave in one write.
pub struct AppH2 {
    addr: String,
    connect_timeout: Duration,
    /// The live connection, if any, with its number (one more for each dial).
    current: Mutex<Option<(u64, http2::SendRequest<Body>)>>,
    /// Held while dialling: concurrent requests wait for one dial instead of each making one.
    dialing: tokio::sync::Mutex<()>,
    /// Connections dialled so far (numbers them).
    dials: std::sync::atomic::AtomicU64,
    /// `trellis_proxy_app_connections_total`.
    opened: prometheus_client::metrics::counter::Counter,
}

impl std::fmt::Debug for AppH2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppH2").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl AppH2 {
    /// A connection to `addr` (`host:port`), dialled on first use within `connect_timeout`,
    /// counted in `metrics`.
    pub fn new(addr: String, connect_timeout: Duration, metrics: &Metrics) -> Self {
        Self {
            addr,
            connect_timeout,
            current: Mutex::new(None),
            dialing: tokio::sync::Mutex::new(()),
            dials: std::sync::atomic::AtomicU64::new(0),
            opened: metrics.app_connections.clone(),
        }
    }

    /// Sends `req` (absolute URI: the scheme and authority become the pseudo-headers).
    pub async fn send(&self, mut req: Request<Body>) -> Result<Response<Body>, AppRequestError> {
        let mut redialed = false;
        loop {
            let (dialed, mut sender) = self.sender().await?;
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(crate::body::boxed)),
                Err(mut e) => match e.take_message() {
                    // Not sent: the connection was closing. Once more on a new one.
                    Some(again) if !redialed => {
                        tracing::debug!(app = %self.addr, error = %e.error(), "application connection closed; resending");
                        self.forget(dialed);
                        redialed = true;
                        req = again;
                    }
                    _ => return Err(AppRequestError::Http(e.into_error())),
                },
            }
        }
    }

    fn live(&self) -> Option<(u64, http2::SendRequest<Body>)> {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        current.as_ref().filter(|(_, s)| !s.is_closed()).cloned()
    }

    async fn sender(&self) -> Result<(u64, http2::SendRequest<Body>), AppRequestError> {
        if let Some(s) = self.live() {
            return Ok(s);
        }
        let _dialing = self.dialing.lock().await;
        // Another request may have dialled while this one waited.
        if let Some(s) = self.live() {
            return Ok(s);
        }
        let tcp = dial(&self.addr, self.connect_timeout).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(Coalesce::new(tcp)))
            .await
            .map_err(AppRequestError::Handshake)?;
        self.opened.inc();
        drive(conn, self.addr.clone());
        let number = self.dials.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some((number, sender.clone()));
        Ok((number, sender))
    }

    /// Sets connection `number` aside after it refused a request (unless it was replaced already).
    fn forget(&self, number: u64) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|(n, _)| *n == number) {
            *current = None;
        }
    }
}

async fn sweep(pool: Weak<AppPool>) {
    let mut every = tokio::time::interval(IDLE_TIMEOUT / 2);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match pool.upgrade() {
            Some(pool) => pool.expire(),
            None => return,
        }
    }
}

/// A response body that returns its connection to the pool once read to the end. Dropped before
/// that, the connection goes with it.
struct PooledBody {
    incoming: Incoming,
    back: Option<(SendRequest<Body>, Arc<AppPool>)>,
}

impl PooledBody {
    /// A body with nothing to read (a `HEAD` response, a 204) gives its connection back at once.
    fn release_if_done(mut self) -> Self {
        if self.incoming.is_end_stream() {
            self.release();
        }
        self
    }

    fn release(&mut self) {
        if let Some((sender, pool)) = self.back.take() {
            pool.put(sender);
        }
    }
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.incoming).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.incoming.is_end_stream() => self.release(),
            // A broken body: the connection is not reused.
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::{HeaderValue, header};
    use http_body_util::BodyExt;
    use tokio::net::TcpListener;

    use super::*;

    /// An application counting the connections it accepted. `/big` answers 1 MiB; with
    /// `close_after_one` every connection is closed after its first response.
    async fn app(close_after_one: bool) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body = if req.uri().path() == "/big" { vec![7u8; 1 << 20] } else { b"hello".to_vec() };
                    Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from(body))))
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(!close_after_one)
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn get(path: &str) -> Request<Body> {
        let mut req = Request::new(crate::body::empty());
        *req.uri_mut() = path.parse().unwrap();
        req.headers_mut().insert(header::HOST, HeaderValue::from_static("app"));
        req
    }

    async fn read(resp: Response<Body>) -> Bytes {
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    /// The pool's connections come back once the conn task has seen the response end.
    async fn settle(pool: &AppPool, idle: usize) {
        for _ in 0..1000 {
            if pool.idle() == idle {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{} idle connections, want {idle}", pool.idle());
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (addr, accepted) = app(false).await;
        let metrics = Metrics::new();
        let pool = AppPool::new(addr, Duration::from_secs(1), &metrics);
        for _ in 0..20 {
            assert_eq!(read(pool.send(get("/")).await.unwrap()).await, "hello");
        }
        settle(&pool, 1).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(metrics.app_connections.get(), 1);
        assert_eq!(metrics.app_idle_connections.get(), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_open_connections_that_are_then_reused() {
        let (addr, accepted) = app(false).await;
        let pool = AppPool::new(addr, Duration::from_secs(1), &Metrics::new());
        let round = || async {
            let all = (0..8).map(|_| pool.send(get("/big")));
            let resps: Vec<_> = futures::future::join_all(all).await.into_iter().map(Result::unwrap).collect();
            for r in resps {
                assert_eq!(read(r).await.len(), 1 << 20);
            }
        };
        round().await;
        settle(&pool, 8).await;
        round().await;
        settle(&pool, 8).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 8, "the second round reused the first round's connections");
    }

    #[tokio::test]
    async fn a_connection_the_application_closed_is_not_used_again() {
        let (addr, accepted) = app(true).await;
        let pool = AppPool::new(addr, Duration::from_secs(1), &Metrics::new());
        for i in 1..=5 {
            assert_eq!(read(pool.send(get("/")).await.unwrap()).await, "hello", "request {i}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn an_idle_connection_the_application_closed_later_is_skipped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Answers one request with keep-alive, then closes the idle connection shortly after.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = tcp.read(&mut buf).await;
                    let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                });
            }
        });
        let pool = AppPool::new(addr, Duration::from_secs(1), &Metrics::new());
        assert_eq!(read(pool.send(get("/")).await.unwrap()).await, "hello");
        settle(&pool, 1).await;
        // Until this side has seen the application close it (the pool holds it meanwhile).
        let closed = || pool.idle.lock().unwrap().iter().all(|i| !i.sender.is_ready());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !closed() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(closed());
        assert_eq!(read(pool.send(get("/")).await.unwrap()).await, "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_response_dropped_half_read_takes_its_connection_with_it() {
        let (addr, accepted) = app(false).await;
        let pool = AppPool::new(addr, Duration::from_secs(1), &Metrics::new());
        let mut body = pool.send(get("/big")).await.unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop(body);
        assert_eq!(pool.idle(), 0, "the rest of the body is on the wire: not reusable");
        assert_eq!(read(pool.send(get("/")).await.unwrap()).await, "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// An HTTP/2 (h2c) application counting its connections; each connection is closed after
    /// `per_connection` requests (by a graceful shutdown once it has answered them).
    async fn h2_app(per_connection: usize) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let served = Arc::new(tokio::sync::Semaphore::new(0));
                    let done = served.clone();
                    let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                        let done = done.clone();
                        async move {
                            done.add_permits(1);
                            Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from_static(b"hi"))))
                        }
                    });
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = served.acquire_many(per_connection as u32) => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn h2_get(addr: &str) -> Request<Body> {
        let mut req = Request::new(crate::body::empty());
        *req.uri_mut() = format!("http://{addr}/svc/Method").parse().unwrap();
        *req.version_mut() = http::Version::HTTP_2;
        req
    }

    #[tokio::test]
    async fn grpc_requests_share_one_http2_connection() {
        let (addr, accepted) = h2_app(usize::MAX >> 40).await;
        let conn = AppH2::new(addr.clone(), Duration::from_secs(1), &Metrics::new());
        let all = (0..32).map(|_| conn.send(h2_get(&addr)));
        for r in futures::future::join_all(all).await {
            assert_eq!(read(r.unwrap()).await, "hi");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_closed_http2_connection_is_dialled_again() {
        let (addr, accepted) = h2_app(2).await;
        let metrics = Metrics::new();
        let conn = AppH2::new(addr.clone(), Duration::from_secs(1), &metrics);
        for i in 1..=6 {
            assert_eq!(read(conn.send(h2_get(&addr)).await.unwrap()).await, "hi", "request {i}");
            if i % 2 == 0 {
                // The application closes the connection after its second request: wait until
                // this side has seen it go.
                let deadline = Instant::now() + Duration::from_secs(5);
                while conn.live().is_some() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                assert!(conn.live().is_none(), "the connection closed after request {i}");
            }
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3, "two requests per connection");
        assert_eq!(metrics.app_connections.get(), 3);
    }

    #[tokio::test]
    async fn an_unreachable_application_is_an_error_that_says_so() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let pool = AppPool::new(addr.clone(), Duration::from_secs(1), &Metrics::new());
        let err = pool.send(get("/")).await.unwrap_err();
        assert!(matches!(err, AppRequestError::Connect(_)), "{err}");
        assert!(err.to_string().starts_with("connect failed"), "{err}");
        let err =
            AppH2::new(addr.clone(), Duration::from_secs(1), &Metrics::new()).send(h2_get(&addr)).await.unwrap_err();
        assert!(matches!(err, AppRequestError::Connect(_)), "{err}");
    }
}
