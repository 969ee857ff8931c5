//! Writes of many requests in one system call.
//!
//! An HTTP/2 connection flushes whenever its task runs, and its task runs as soon as one stream
//! hands it a frame: under load, every response leaves in a write of its own while the responses
//! of the other streams, woken by the same read, are still being produced. On loopback a write
//! also runs the receiver's whole TCP input path, so the writes were the largest share of a
//! proxy's CPU at saturation.
//!
//! [`Coalesce`] holds what is written and, on the first flush, yields once: the tasks that are
//! already runnable (the other streams) add their frames, and the second flush writes them all
//! in one call. On an idle proxy nothing else is runnable, so the yield costs one trip through
//! the scheduler's queue and no wait.
//!
//! Only multiplexed (HTTP/2) connections hold: an HTTP/1.1 connection carries one message at a
//! time, so nothing would join the write and the yield would only delay it
//! ([`Coalesce::direct`]).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes held before a write goes out without waiting for a flush.
const HOLD: usize = 64 * 1024;
/// Buffer kept between flushes; a bigger burst's buffer is given back once written.
const KEEP: usize = 16 * 1024;

/// A transport whose writes are held until a flush, and whose flushes yield once first.
#[derive(Debug)]
pub struct Coalesce<T> {
    io: T,
    /// Whether writes are held at all.
    hold: bool,
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    written: usize,
    yielded: bool,
}

impl<T> Coalesce<T> {
    /// Wraps `io`, holding its writes.
    pub fn new(io: T) -> Self {
        Self { io, hold: true, buf: Vec::new(), written: 0, yielded: false }
    }

    /// Wraps `io` without holding anything: writes and flushes go straight through.
    pub fn direct(io: T) -> Self {
        Self { hold: false, ..Self::new(io) }
    }

    /// Holds writes if `hold`, else [`Coalesce::direct`].
    pub fn holding_if(io: T, hold: bool) -> Self {
        if hold { Self::new(io) } else { Self::direct(io) }
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

impl<T: hyper_util::client::legacy::connect::Connection> hyper_util::client::legacy::connect::Connection
    for Coalesce<T>
{
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.io.connected()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
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
            if !this.yielded {
                this.yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(this.poll_drain(cx))?;
        }
        this.yielded = false;
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn writes_wait_for_a_flush_and_leave_together() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut a = Coalesce::new(a);
        a.write_all(b"one ").await.unwrap();
        a.write_all(b"two").await.unwrap();
        let mut got = [0u8; 16];
        let nothing = tokio::time::timeout(std::time::Duration::from_millis(20), b.read(&mut got)).await;
        assert!(nothing.is_err(), "held bytes were written before a flush");
        a.flush().await.unwrap();
        let n = b.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"one two");
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
        b.read_exact(&mut got[HOLD / 2..]).await.unwrap();
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn direct_writes_go_straight_through() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut a = Coalesce::holding_if(a, false);
        a.write_all(b"now").await.unwrap();
        let mut got = [0u8; 3];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"now");
        let flushed = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut a).poll_flush(cx))).await;
        assert!(matches!(flushed, Poll::Ready(Ok(()))), "a direct flush never yields");
    }

    #[tokio::test]
    async fn shutdown_writes_what_is_held() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut a = Coalesce::new(a);
        a.write_all(b"last words").await.unwrap();
        a.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");
    }

    #[tokio::test]
    async fn a_flush_yields_once_then_writes() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut a = Coalesce::new(a);
        a.write_all(b"x").await.unwrap();
        let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut a).poll_flush(cx))).await;
        assert!(first.is_pending(), "the first flush yields");
        let second = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut a).poll_flush(cx))).await;
        assert!(matches!(second, Poll::Ready(Ok(()))));
        let mut got = [0u8; 1];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"x");
    }
}
