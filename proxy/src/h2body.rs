//! HTTP/2 streams of the mesh client as bodies: a received stream read as a [`Body`], and a body
//! written into a send stream.
//!
//! The outbound proxy talks HTTP/2 to its peers with the `h2` crate directly, so that a request
//! whose body is already held leaves in one write with its headers: the peer proxy wakes once
//! for it, not once for the headers and again for the body.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};

use crate::body::{Body, BoxError};

/// A response (or request) stream received over HTTP/2: its data, then its trailers. Received
/// data is released to the flow-control window as it is read.
pub struct RecvBody {
    stream: RecvStream,
    data_done: bool,
    /// Bytes still expected, from `content-length`.
    remaining: Option<u64>,
}

impl RecvBody {
    /// The body of a message whose headers are `headers`.
    pub fn new(stream: RecvStream, headers: &HeaderMap) -> Self {
        let remaining =
            headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        Self { stream, data_done: false, remaining }
    }

    /// As a [`Body`] of the proxy.
    pub fn boxed(self) -> Body {
        self.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync()
    }
}

impl hyper::body::Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.stream.flow_control().release_capacity(data.len());
                    if let Some(r) = this.remaining.as_mut() {
                        *r = r.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(this.stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Writes `body` into `stream`: data as the peer's window allows, then trailers or the end of
/// the stream. Stops (and resets the stream) when the body fails, and stops when the peer resets
/// the stream.
pub async fn pipe(mut body: Body, mut stream: SendStream<Bytes>) {
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            reset = std::future::poll_fn(|cx| stream.poll_reset(cx)) => {
                tracing::debug!(reason = ?reset.ok(), "peer reset the request stream");
                return;
            }
        };
        let frame = match frame {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "request body failed; resetting the stream");
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(mut data) => {
                while !data.is_empty() {
                    stream.reserve_capacity(data.len());
                    // Capacity already assigned is used at once (`poll_capacity` reports increases).
                    let granted = loop {
                        match stream.capacity() {
                            0 => match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                                Some(Ok(_)) => continue,
                                Some(Err(_)) | None => return,
                            },
                            n => break n,
                        }
                    };
                    let chunk = data.split_to(granted.min(data.len()));
                    if stream.send_data(chunk, false).is_err() {
                        return;
                    }
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Counts the writes that reach the transport.
    struct CountingIo {
        inner: tokio::io::DuplexStream,
        writes: Arc<AtomicUsize>,
    }

    impl tokio::io::AsyncRead for CountingIo {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for CountingIo {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            let r = Pin::new(&mut self.inner).poll_write(cx, buf);
            if matches!(r, Poll::Ready(Ok(_))) {
                self.writes.fetch_add(1, Ordering::SeqCst);
            }
            r
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            // One write of everything, as writev(2) would do.
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.poll_write(cx, &all)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// A server that answers every request with its body echoed and the trailer `x-got: <bytes>`.
    async fn echo_server(io: tokio::io::DuplexStream) {
        let mut conn = h2::server::handshake(io).await.expect("server handshake");
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            tokio::spawn(async move {
                let (parts, recv) = req.into_parts();
                let got = RecvBody::new(recv, &parts.headers).collect().await.expect("request body");
                let trailers = got.trailers().cloned();
                let data = got.to_bytes();
                let mut resp = http::Response::builder().header("content-length", data.len());
                if let Some(t) = trailers.as_ref().and_then(|t| t.get("x-sent")) {
                    resp = resp.header("x-sent", t);
                }
                let send = respond.send_response(resp.body(()).expect("response"), false).expect("respond");
                let mut t = HeaderMap::new();
                t.insert("x-got", data.len().into());
                let body = http_body_util::Full::new(data)
                    .map_err(|never| match never {})
                    .with_trailers(async move { Some(Ok::<_, BoxError>(t)) })
                    .boxed_unsync();
                pipe(body, send).await;
            });
        }
    }

    async fn client(writes: Arc<AtomicUsize>) -> h2::client::SendRequest<Bytes> {
        let (client_io, server_io) = tokio::io::duplex(1024 * 1024);
        tokio::spawn(echo_server(server_io));
        let io = CountingIo { inner: client_io, writes };
        let (send, conn) = crate::pool::h2_client().handshake::<_, Bytes>(io).await.expect("client handshake");
        tokio::spawn(conn);
        send.ready().await.expect("ready")
    }

    fn request() -> http::Request<()> {
        http::Request::builder().method("POST").uri("http://api.default/echo").body(()).expect("request")
    }

    #[tokio::test]
    async fn a_held_body_leaves_in_the_same_write_as_its_headers() {
        let writes = Arc::new(AtomicUsize::new(0));
        let mut send = client(writes.clone()).await;
        // A first exchange settles the connection (settings and their acknowledgements).
        for round in 0..3 {
            let before = writes.load(Ordering::SeqCst);
            let (response, mut stream) = send.send_request(request(), false).expect("send");
            stream.send_data(Bytes::from(vec![b'y'; 1024]), true).expect("data");
            let resp = response.await.expect("response");
            let sent = writes.load(Ordering::SeqCst) - before;
            let (parts, recv) = resp.into_parts();
            let body = RecvBody::new(recv, &parts.headers);
            assert_eq!(hyper::body::Body::size_hint(&body).exact(), Some(1024));
            let got = body.collect().await.expect("body");
            assert_eq!(got.trailers().and_then(|t| t.get("x-got")).map(|v| v.as_bytes()), Some(&b"1024"[..]));
            assert_eq!(got.to_bytes().len(), 1024);
            if round > 0 {
                assert_eq!(sent, 1, "headers and body in one write (round {round})");
            }
        }
    }

    #[tokio::test]
    async fn a_streamed_body_and_its_trailers_arrive_whole() {
        let mut send = client(Arc::new(AtomicUsize::new(0))).await;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed_unsync();
        let (response, stream) = send.send_request(request(), false).expect("send");
        tokio::spawn(pipe(body, stream));
        // Three megabytes, more than a stream's window, in uneven chunks; then trailers.
        let chunk: Vec<u8> = (0..100_003u32).map(|i| (i % 251) as u8).collect();
        let mut total = 0;
        for _ in 0..30 {
            tx.send(Ok(Frame::data(Bytes::from(chunk.clone())))).await.expect("chunk");
            total += chunk.len();
        }
        let mut t = HeaderMap::new();
        t.insert("x-sent", "done".parse().expect("value"));
        tx.send(Ok(Frame::trailers(t))).await.expect("trailers");
        drop(tx);
        let resp = response.await.expect("response");
        assert_eq!(resp.headers().get("x-sent").map(|v| v.as_bytes()), Some(&b"done"[..]), "request trailers arrived");
        let (parts, recv) = resp.into_parts();
        let got = RecvBody::new(recv, &parts.headers).boxed().collect().await.expect("body");
        let expected = total.to_string();
        assert_eq!(got.trailers().and_then(|t| t.get("x-got")).map(|v| v.as_bytes()), Some(expected.as_bytes()));
        let bytes = got.to_bytes();
        assert_eq!(bytes.len(), total);
        assert!(bytes.chunks(chunk.len()).all(|c| c == &chunk[..]), "every byte in order");
    }
}
