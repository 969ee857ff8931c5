//! Protocol detection on a fresh client connection (client-speaks-first protocols).
//!
//! [`detect`] is a pure function over the bytes received so far: it answers HTTP/2 (prior-knowledge
//! preface), HTTP/1.x (a complete request line `METHOD SP TARGET SP HTTP/1.x CRLF`), opaque TCP, or
//! "need more bytes". Checking the whole request line (not only a method-looking word) avoids
//! sending a text protocol such as `SET key value` through the HTTP path. [`sniff`] reads until a
//! decision or a short timeout, and hands back the bytes in a [`Prefixed`] stream so that the
//! chosen path sees the connection from its first byte.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface a prior-knowledge client sends first.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// At most this many bytes are read before deciding (a longer request line goes the TCP way,
/// which still reaches the application, only without per-request balancing).
pub const MAX_SNIFF: usize = 16 * 1024;

const MAX_METHOD: usize = 32;

/// A detected protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.0 or HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge (h2c), e.g. gRPC.
    Http2,
    /// Anything else, forwarded as an opaque byte stream.
    Tcp,
}

/// The answer for the bytes seen so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detection {
    /// Decided.
    Is(Protocol),
    /// Still ambiguous: read more.
    NeedMore,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Decides the protocol from the first bytes of a connection.
pub fn detect(buf: &[u8]) -> Detection {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if buf.len() >= H2_PREFACE.len() { Detection::Is(Protocol::Http2) } else { Detection::NeedMore };
    }
    detect_http1(buf)
}

fn detect_http1(buf: &[u8]) -> Detection {
    const TCP: Detection = Detection::Is(Protocol::Tcp);
    // Method: 1..=MAX_METHOD token characters, then one space.
    let method_len = buf.iter().take_while(|b| is_tchar(**b)).count();
    if method_len == buf.len() {
        return if method_len <= MAX_METHOD { Detection::NeedMore } else { TCP };
    }
    if method_len == 0 || method_len > MAX_METHOD || buf[method_len] != b' ' {
        return TCP;
    }
    // Target: visible ASCII, no spaces, then one space.
    let rest = &buf[method_len + 1..];
    let target_len = rest.iter().take_while(|b| b.is_ascii_graphic()).count();
    if target_len == rest.len() {
        return Detection::NeedMore;
    }
    if target_len == 0 || rest[target_len] != b' ' {
        return TCP;
    }
    // Version and line end: "HTTP/1." DIGIT CR LF, compared byte by byte as far as we have.
    let tail = &rest[target_len + 1..];
    let expect = b"HTTP/1.";
    for (i, b) in tail.iter().enumerate() {
        let ok = match i {
            0..7 => *b == expect[i],
            7 => b.is_ascii_digit(),
            8 => *b == b'\r',
            9 => *b == b'\n',
            _ => return Detection::Is(Protocol::Http1),
        };
        if !ok {
            return TCP;
        }
    }
    if tail.len() >= 10 { Detection::Is(Protocol::Http1) } else { Detection::NeedMore }
}

/// How long `sniff` waits for a client's first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstByte {
    /// Give up after this long and call it TCP: the client may be waiting for a server-speaks-first
    /// greeting (SMTP, MySQL, ...). For services whose protocol is not known.
    Within(Duration),
    /// Wait as long as the client stays connected: the service is declared HTTP or gRPC, whose
    /// clients always speak first. A silent connection is an idle pooled connection, not TCP.
    Patiently,
}

/// Reads from `io` until [`detect`] decides, the peer stops sending (EOF) or `MAX_SNIFF` bytes.
/// The first byte is awaited as `first` says; once bytes flow, detection must finish within
/// `timeout`. Undecided means TCP.
pub async fn sniff<S>(mut io: S, first: FirstByte, timeout: Duration) -> io::Result<(Protocol, Prefixed<S>)>
where
    S: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    match first {
        FirstByte::Within(wait) => match tokio::time::timeout(wait, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => return Ok((Protocol::Tcp, Prefixed::new(buf.freeze(), io))),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        },
        FirstByte::Patiently => {
            if io.read_buf(&mut buf).await? == 0 {
                return Ok((Protocol::Tcp, Prefixed::new(buf.freeze(), io)));
            }
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let protocol = loop {
        if let Detection::Is(p) = detect(&buf) {
            break p;
        }
        if buf.len() >= MAX_SNIFF {
            break Protocol::Tcp;
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break Protocol::Tcp,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    };
    Ok((protocol, Prefixed::new(buf.freeze(), io)))
}

/// A stream that first replays bytes already read from it.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Replays `prefix`, then reads from `inner`.
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The stream back, if nothing was read from it yet (so it can be sniffed again).
    pub fn into_unread(self) -> Result<S, Self> {
        if self.prefix.is_empty() { Ok(self.inner) } else { Err(self) }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use Detection::{Is, NeedMore};
    use Protocol::{Http1, Http2, Tcp};

    #[test]
    fn detection_table() {
        let long_method = [b'A'; 40];
        let cases: &[(&[u8], Detection)] = &[
            (b"", NeedMore),
            (b"P", NeedMore),
            (b"PRI * HTTP/2", NeedMore),
            (H2_PREFACE, Is(Http2)),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04", Is(Http2)),
            (b"PRI * HTTP/2.0\r\n\r\nXX", Is(Tcp)),
            (b"G", NeedMore),
            (b"GET", NeedMore),
            (b"GET /", NeedMore),
            (b"GET / HTTP/1.", NeedMore),
            (b"GET / HTTP/1.1\r", NeedMore),
            (b"GET / HTTP/1.1\r\n", Is(Http1)),
            (b"GET /index.html?a=b HTTP/1.0\r\nHost: x\r\n\r\n", Is(Http1)),
            (b"POST /api HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", Is(Http1)),
            (b"OPTIONS * HTTP/1.1\r\n", Is(Http1)),
            (b"CONNECT web.default:80 HTTP/1.1\r\n", Is(Http1)),
            (b"GET / HTTP/2.0\r\n", Is(Tcp)),
            (b"GET / HTTP/1.1\n", Is(Tcp)),
            (b"GET  / HTTP/1.1\r\n", Is(Tcp)),
            (b"SET key value\r\n", Is(Tcp)),
            (b"PING\r\n", Is(Tcp)),
            (b"SSH-2.0-OpenSSH_9.2\r\n", Is(Tcp)),
            (b"\x16\x03\x01\x02\x00\x01", Is(Tcp)),
            (b"{\"hello\":1}", Is(Tcp)),
            (b"\x00\x01\x02", Is(Tcp)),
            (&long_method, Is(Tcp)),
        ];
        for (input, want) in cases {
            assert_eq!(detect(input), *want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[tokio::test]
    async fn a_silent_client_of_a_declared_http_service_is_still_detected_as_http() {
        // An idle pooled connection: nothing for longer than the detection timeout, then a request.
        let (mut client, server) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
            client
        });
        let (p, _) = sniff(server, FirstByte::Patiently, Duration::from_millis(50)).await.unwrap();
        assert_eq!(p, Http1);
        drop(writer.await.unwrap());
        // The same silence with a bounded first-byte wait is treated as server-speaks-first TCP.
        let (_client, server) = tokio::io::duplex(1024);
        let (p, _) =
            sniff(server, FirstByte::Within(Duration::from_millis(50)), Duration::from_millis(50)).await.unwrap();
        assert_eq!(p, Tcp);
    }

    #[tokio::test]
    async fn sniff_replays_the_bytes_and_times_out_to_tcp() {
        let (mut client, server) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
        let (p, mut io) =
            sniff(server, FirstByte::Within(Duration::from_secs(5)), Duration::from_secs(5)).await.unwrap();
        assert_eq!(p, Http1);
        let mut got = vec![0u8; 27];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");

        // A server-speaks-first protocol: the client sends nothing.
        let (_client, server) = tokio::io::duplex(1024);
        let started = std::time::Instant::now();
        let (p, _) =
            sniff(server, FirstByte::Within(Duration::from_millis(50)), Duration::from_millis(50)).await.unwrap();
        assert_eq!(p, Tcp);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
