//! Pooled HTTP/1.1 connections to the local application.
//!
//! A request takes the most recently used idle connection (its socket is the warmest), or dials a
//! new one. The connection goes back to the pool as soon as its response body has been read to
//! the end and the connection is ready for another request; a response abandoned half-way takes
//! its connection with it, since the rest of that body is still on the wire. An idle connection
//! the application has closed is skipped, and a request that found its connection closed before
//! any of it was written is sent again on another. Idle connections are closed after
//! [`IDLE_TIMEOUT`], and at most [`MAX_IDLE`] are kept.
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
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::{Body, BoxError};

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
    #[error("HTTP/1.1 handshake failed: {0}")]
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
}

impl std::fmt::Debug for AppPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppPool").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl AppPool {
    /// A pool of connections to `addr` (`host:port`), each dialled within `connect_timeout`. It
    /// starts a task that closes connections idle for longer than [`IDLE_TIMEOUT`]; the task ends
    /// with the pool.
    pub fn new(addr: String, connect_timeout: Duration) -> Arc<Self> {
        let pool = Arc::new(Self { addr, connect_timeout, idle: Mutex::new(Vec::new()) });
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
        while let Some(Idle { sender, since }) = idle.pop() {
            if sender.is_ready() && since.elapsed() < IDLE_TIMEOUT {
                return Some(sender);
            }
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<Body>, AppRequestError> {
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr.as_str())).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(AppRequestError::Connect(e)),
            Err(_) => return Err(AppRequestError::ConnectTimeout(self.connect_timeout)),
        };
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await.map_err(AppRequestError::Handshake)?;
        let addr = self.addr.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(app = %addr, error = %e, "application connection ended with an error");
            }
        });
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
    }

    /// Closes the connections idle for longer than [`IDLE_TIMEOUT`] (the oldest are first).
    fn expire(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let stale = idle.iter().take_while(|i| i.since.elapsed() >= IDLE_TIMEOUT).count();
        idle.drain(..stale);
        idle.retain(|i| !i.sender.is_closed());
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
        for _ in 0..100 {
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
        let pool = AppPool::new(addr, Duration::from_secs(1));
        for _ in 0..20 {
            assert_eq!(read(pool.send(get("/")).await.unwrap()).await, "hello");
        }
        settle(&pool, 1).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_open_connections_that_are_then_reused() {
        let (addr, accepted) = app(false).await;
        let pool = AppPool::new(addr, Duration::from_secs(1));
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
        let pool = AppPool::new(addr, Duration::from_secs(1));
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
        let pool = AppPool::new(addr, Duration::from_secs(1));
        assert_eq!(read(pool.send(get("/")).await.unwrap()).await, "hello");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(read(pool.send(get("/")).await.unwrap()).await, "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_response_dropped_half_read_takes_its_connection_with_it() {
        let (addr, accepted) = app(false).await;
        let pool = AppPool::new(addr, Duration::from_secs(1));
        let mut body = pool.send(get("/big")).await.unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop(body);
        assert_eq!(pool.idle(), 0, "the rest of the body is on the wire: not reusable");
        assert_eq!(read(pool.send(get("/")).await.unwrap()).await, "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_unreachable_application_is_an_error_that_says_so() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let pool = AppPool::new(addr, Duration::from_secs(1));
        let err = pool.send(get("/")).await.unwrap_err();
        assert!(matches!(err, AppRequestError::Connect(_)), "{err}");
        assert!(err.to_string().starts_with("connect failed"), "{err}");
    }
}
