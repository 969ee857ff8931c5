//! Writes of many requests in one system call.
//!
//! An HTTP/2 connection flushes whenever its task runs, and its task runs as soon as one stream
//! hands it a frame: under load, every response leaves in a write of its own while the responses
//! of the other streams, woken by the same read, are still being produced. On loopback a write
//! also runs the receiver's whole TCP input path, so the writes were the largest share of a
//! proxy's CPU at saturation.
//!
//! [`Coalesce`] holds what is written across flushes until the connection's task has been
//! through the scheduler's queue once:
//!
//! - The first flush of a batch wakes the task and returns at once, holding the bytes. The
//!   connection goes on encoding: `h2` flushes after each DATA frame it hands over without
//!   copying (every body chunk over 256 bytes) and again when it is done, and all of those
//!   flushes land in the same batch.
//! - The tasks that are already runnable (the other streams) run and add their frames.
//! - When the task runs again, it reads first (an `h2` connection always does), which marks
//!   the batch as due; its next flush writes the whole batch in one call, together with
//!   what that run encoded before it.
//!
//! On an idle proxy nothing else is runnable, so the batch waits for one trip through the
//! queue and no longer.
//!
//! This relies on how an `h2` connection (client or server, through `hyper` or not) drives its
//! transport: each run of its task reads, then flushes. Anything else must use
//! [`Coalesce::direct`]. More than [`HOLD`] bytes, and a shutdown, are written at once.
//!
//! Only multiplexed (HTTP/2) connections hold: an HTTP/1.1 connection carries one message at a
//! time, so nothing would join the write and the hold would only delay it
//! ([`Coalesce::direct`]).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes held before a write goes out without waiting for a flush.
const HOLD: usize = 64 * 1024;
/// Buffer kept between flushes; a bigger burst's buffer is given back once written.
const KEEP: usize = 16 * 1024;

/// A transport whose writes are held across the flushes of one run of its task and written by
/// the first flush of the next run (see the module documentation).
#[derive(Debug)]
pub struct Coalesce<T> {
    io: T,
    /// Whether writes are held at all.
    hold: bool,
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    written: usize,
    /// The task was woken to come back for the held bytes.
    woken: bool,
    /// The task has read since it was woken: this is a later run, and the batch is due.
    due: bool,
}

impl<T> Coalesce<T> {
    /// Wraps `io`, holding its writes.
    pub fn new(io: T) -> Self {
        Self { io, hold: true, buf: Vec::new(), written: 0, woken: false, due: false }
    }

    /// Wraps `io` without holding anything: writes and flushes go straight through.
    pub fn direct(io: T) -> Self {
        Self { hold: false, ..Self::new(io) }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes everything held.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        self.woken = false;
        self.due = false;
        // A connection keeps a small buffer for its next flush, not the largest burst it saw.
        if self.buf.capacity() > KEEP {
            self.buf = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Room for `len` more bytes, writing what is held first if they would not fit.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if !self.buf.is_empty() && self.buf.len() + len > HOLD {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.due |= this.woken;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx, buf.len()))?;
        if this.buf.is_empty() && (!this.hold || buf.len() >= HOLD) {
            // Bulk data gains nothing from being held.
            return Pin::new(&mut this.io).poll_write(cx, buf);
        }
        this.buf.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        ready!(this.poll_room(cx, len))?;
        if this.buf.is_empty() && (!this.hold || len >= HOLD) {
            return Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        }
        this.buf.reserve(len);
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        self.hold || self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.buf.is_empty() {
            // A batch that has started going out is finished first, whoever flushes.
            if this.written == 0 && !this.due {
                if !this.woken {
                    this.woken = true;
                    cx.waker().wake_by_ref();
                }
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use bytes::Bytes;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Polls `a` for a read once, as a connection does at the start of each run of its task.
    async fn poll_read_once<T: AsyncRead + Unpin>(a: &mut Coalesce<T>) {
        let mut byte = [0u8; 1];
        std::future::poll_fn(|cx| {
            let _ = Pin::new(&mut *a).poll_read(cx, &mut ReadBuf::new(&mut byte));
            Poll::Ready(())
        })
        .await;
    }

    #[tokio::test]
    async fn flushes_hold_until_the_task_comes_back_and_reads() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut a = Coalesce::new(a);
        let mut got = [0u8; 16];
        a.write_all(b"one ").await.unwrap();
        a.flush().await.unwrap();
        a.write_all(b"two").await.unwrap();
        a.flush().await.unwrap();
        let nothing = tokio::time::timeout(std::time::Duration::from_millis(20), b.read(&mut got)).await;
        assert!(nothing.is_err(), "bytes were written before the task came back");
        poll_read_once(&mut a).await;
        a.write_all(b" three").await.unwrap();
        a.flush().await.unwrap();
        let n = b.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"one two three", "one write carries the whole batch");
    }

    #[tokio::test]
    async fn a_read_before_any_flush_does_not_make_a_batch_due() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut a = Coalesce::new(a);
        poll_read_once(&mut a).await;
        a.write_all(b"x").await.unwrap();
        a.flush().await.unwrap();
        let mut got = [0u8; 1];
        let nothing = tokio::time::timeout(std::time::Duration::from_millis(20), b.read(&mut got)).await;
        assert!(nothing.is_err(), "a read from an earlier run must not release a new batch");
    }

    struct CountWakes(AtomicUsize);

    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_batch_wakes_its_task_once() {
        let wakes = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let (a, _b) = tokio::io::duplex(1 << 20);
        let mut a = Coalesce::new(a);
        for _ in 0..5 {
            assert!(matches!(Pin::new(&mut a).poll_write(&mut cx, b"frame"), Poll::Ready(Ok(5))));
            assert!(matches!(Pin::new(&mut a).poll_flush(&mut cx), Poll::Ready(Ok(()))));
        }
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1, "one wake brings the task back for the batch");
        assert_eq!(a.buf.len(), 25, "everything is held");
        let mut byte = [0u8; 1];
        let _ = Pin::new(&mut a).poll_read(&mut cx, &mut ReadBuf::new(&mut byte));
        assert!(matches!(Pin::new(&mut a).poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert!(a.buf.is_empty(), "the flush after the read writes the batch");
    }

    #[tokio::test]
    async fn a_full_hold_is_written_without_a_flush_and_in_order() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut a = Coalesce::new(a);
        let chunk: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut sent = Vec::new();
        for _ in 0..100 {
            a.write_all(&chunk).await.unwrap();
            sent.extend_from_slice(&chunk);
        }
        // More than HOLD was written: at least one HOLD-sized batch is readable already.
        let mut got = vec![0u8; sent.len()];
        b.read_exact(&mut got[..HOLD / 2]).await.unwrap();
        a.flush().await.unwrap();
        poll_read_once(&mut a).await;
        a.flush().await.unwrap();
        b.read_exact(&mut got[HOLD / 2..]).await.unwrap();
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn direct_writes_go_straight_through() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut a = Coalesce::direct(a);
        a.write_all(b"now").await.unwrap();
        let mut got = [0u8; 3];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"now");
        let flushed = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut a).poll_flush(cx))).await;
        assert!(matches!(flushed, Poll::Ready(Ok(()))), "a direct flush never holds");
    }

    #[tokio::test]
    async fn shutdown_writes_what_is_held() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut a = Coalesce::new(a);
        a.write_all(b"last words").await.unwrap();
        a.flush().await.unwrap();
        a.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");
    }

    /// A transport that counts the writes that reach it.
    struct Counted<T> {
        io: T,
        writes: Arc<AtomicUsize>,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.io).poll_write(cx, buf);
            if matches!(r, Poll::Ready(Ok(_))) {
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            r
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// Concurrent requests with 1 KiB bodies through an `h2` client and server, both over
    /// [`Coalesce`], on one thread as in the proxy: every request is answered, and the client's
    /// requests leave in a few writes, not one (or more) each.
    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_h2_requests_share_writes() {
        const REQUESTS: usize = 64;
        let (c, s) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(AtomicUsize::new(0));
        let client_io = Coalesce::new(Counted { io: c, writes: writes.clone() });
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(Coalesce::new(s)).await.expect("server handshake");
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    let mut len = 0;
                    while let Some(chunk) = body.data().await {
                        let chunk = chunk.expect("request body");
                        len += chunk.len();
                        let _ = body.flow_control().release_capacity(chunk.len());
                    }
                    let mut send = respond.send_response(http::Response::new(()), false).expect("response");
                    send.send_data(Bytes::from(len.to_string()), true).expect("response body");
                });
            }
        });
        let (send, conn) = h2::client::handshake(client_io).await.expect("client handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut send = send.ready().await.expect("ready");
        let before = writes.load(Ordering::Relaxed);
        let mut calls = Vec::new();
        for _ in 0..REQUESTS {
            let (resp, mut body) =
                send.send_request(http::Request::post("http://peer/x").body(()).unwrap(), false).expect("request");
            body.send_data(Bytes::from(vec![b'y'; 1024]), true).expect("request body");
            calls.push(resp);
        }
        for resp in calls {
            let mut body = resp.await.expect("response").into_body();
            let got = body.data().await.expect("a body").expect("response body");
            assert_eq!(&got[..], b"1024");
        }
        let used = writes.load(Ordering::Relaxed) - before;
        assert!(used <= REQUESTS / 8, "{REQUESTS} requests took {used} writes");
    }
}
