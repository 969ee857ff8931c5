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
