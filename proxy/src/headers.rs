//! Header rewriting between hops: what HTTP/2 forbids, and what only the mesh may set.
//!
//! Connection-specific headers describe one TCP connection, not the request; HTTP/2 makes them a
//! protocol error, so they go before a request crosses the mesh (and before a response from an
//! HTTP/1.1 application goes back over HTTP/2). `te` survives only as `te: trailers`, which gRPC
//! needs.

use http::header::{CONNECTION, HeaderMap, HeaderName, HeaderValue, TE, TRANSFER_ENCODING, UPGRADE};

const KEEP_ALIVE: &str = "keep-alive";
const PROXY_CONNECTION: &str = "proxy-connection";

/// Removes hop-by-hop headers, including those named by `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        // `te: trailers` is handled below even when Connection lists it.
        if name != TE {
            headers.remove(&name);
        }
    }
    headers.remove(CONNECTION);
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
    headers.remove(TRANSFER_ENCODING);
    headers.remove(UPGRADE);
    let wants_trailers = headers
        .get_all(TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers")));
    headers.remove(TE);
    if wants_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// The peer-identity header value for a verified caller (made once per connection).
pub fn peer_identity_value(caller: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(caller).ok()
}

/// Replaces whatever a client claimed in the peer-identity header with the verified caller.
pub fn set_peer_identity(headers: &mut HeaderMap, caller: Option<&HeaderValue>) {
    headers.remove(trellis_proto::PEER_IDENTITY_HEADER);
    if let Some(v) = caller {
        headers.insert(trellis_proto::PEER_IDENTITY_HEADER, v.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut v: Vec<String> = h.iter().map(|(k, v)| format!("{k}={}", v.to_str().unwrap())).collect();
        v.sort();
        v
    }

    #[test]
    fn hop_by_hop_table() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case<'_>] = &[
            (&[("content-type", "text/plain")], &["content-type=text/plain"]),
            (&[("connection", "keep-alive"), ("keep-alive", "timeout=5"), ("accept", "*/*")], &["accept=*/*"]),
            (&[("connection", "close, x-custom"), ("x-custom", "1"), ("x-other", "2")], &["x-other=2"]),
            (&[("transfer-encoding", "chunked"), ("content-length", "3")], &["content-length=3"]),
            (&[("upgrade", "websocket"), ("proxy-connection", "keep-alive")], &[]),
            (&[("te", "trailers")], &["te=trailers"]),
            (&[("te", "gzip, trailers;q=0.5")], &["te=trailers"]),
            (&[("te", "gzip")], &[]),
            (&[("connection", "te"), ("te", "trailers")], &["te=trailers"]),
            (&[("grpc-timeout", "1S"), ("trailer", "grpc-status")], &["grpc-timeout=1S", "trailer=grpc-status"]),
        ];
        for (input, want) in cases {
            let mut h = map(input);
            strip_hop_by_hop(&mut h);
            assert_eq!(names(&h), want.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "{input:?}");
        }
    }

    #[test]
    fn forged_identity_is_replaced() {
        let mut h = map(&[
            ("x-trellis-peer-identity", "spiffe://trellis.local/ns/default/sa/admin"),
            ("x-trellis-peer-identity", "spiffe://evil/ns/x/sa/y"),
        ]);
        set_peer_identity(&mut h, peer_identity_value("spiffe://trellis.local/ns/default/sa/web").as_ref());
        assert_eq!(names(&h), vec!["x-trellis-peer-identity=spiffe://trellis.local/ns/default/sa/web"]);
    }
}
