//! In-process mesh tests over real TLS on 127.0.0.1:0, with a fake control plane (no
//! control-plane process): app ← server proxy ← client proxy ← test client.

mod support;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_proto::pb;

use support::*;

const CLIENT_ID: &str = "spiffe://trellis.local/ns/default/sa/client";

fn peer_line(id: &str) -> String {
    format!("peer={id}\n")
}

/// Sends `n` sequential requests and returns how many failed (non-200 or wrong caller).
async fn run_requests(url: &str, n: usize, method: &str) -> anyhow::Result<(usize, Vec<String>)> {
    let http = http_client();
    let mut failed = 0;
    let mut bodies = Vec::with_capacity(n);
    for i in 0..n {
        let body = if method == "POST" { format!("payload-{i}") } else { String::new() };
        match send(&http, method, url, &[], &body).await {
            Ok((200, text)) if text.contains(&peer_line(CLIENT_ID)) && text.contains(&format!("body={body}\n")) => {
                bodies.push(text)
            }
            Ok((status, text)) => {
                failed += 1;
                eprintln!("request {i}: {status} {text}");
            }
            Err(e) => {
                failed += 1;
                eprintln!("request {i}: {e}");
            }
        }
    }
    Ok((failed, bodies))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_identity_static_stability_and_failover() -> anyhow::Result<()> {
    let mut w = World::new().await?;
    let app1 = EchoApp::start("app1").await?;
    let s1 = w.server("web", "s1", "web.default", app1.addr, "http").await?;
    let ready_path = w.path("client.ready.json");
    let ready_arg = ready_path.display().to_string();
    let client = w.client("client", &["web.default"], &["--ready-file", &ready_arg]).await?;
    wait_endpoints(&client, "web.default", 1).await?;
    let upstream = client.upstream_addr("web.default").expect("upstream bound");
    let url = format!("http://{upstream}/hello");

    // The ready file carries the bound addresses and identity.
    wait_until(Duration::from_secs(5), "ready file", || ready_path.exists()).await?;
    let ready = read_json(&ready_path)?;
    assert_eq!(ready["identity"], CLIENT_ID);
    assert_eq!(ready["upstreams"]["web.default"], upstream.to_string());
    assert_eq!(ready["admin"], client.admin_addr().to_string());
    assert_eq!(ready["inbound"], client.inbound_addr().to_string());

    // The server proxy registered its bound inbound address with its identity.
    let hello = w.cp.seen(|s| s.hellos.iter().find(|h| h.node.as_ref().is_some_and(|n| n.instance == "s1")).cloned());
    let hello = hello.expect("s1 said Hello");
    assert_eq!(hello.node.as_ref().map(|n| n.identity.as_str()), Some("spiffe://trellis.local/ns/default/sa/web"));
    assert_eq!(hello.endpoints.len(), 1);
    assert_eq!(hello.endpoints[0].address, s1.inbound_addr().to_string());
    assert_eq!(hello.endpoints[0].service, "web.default");

    // The application sees the client's verified identity, and the Host the client used.
    let http = http_client();
    let (status, body) = send(&http, "GET", &url, &[], "").await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&peer_line(CLIENT_ID)), "{body}");
    assert!(body.contains(&format!("host={upstream}\n")), "{body}");

    // A forged identity header is replaced, not appended to.
    let forged = [(trellis_proto::PEER_IDENTITY_HEADER, "spiffe://trellis.local/ns/default/sa/admin")];
    let (status, body) = send(&http, "GET", &url, &forged, "").await?;
    assert_eq!(status, 200);
    assert!(body.contains(&peer_line(CLIENT_ID)), "forged header survived: {body}");

    // 200 sequential requests, GET and POST with bodies: none fails.
    let (failed_get, _) = run_requests(&url, 100, "GET").await?;
    let (failed_post, _) = run_requests(&url, 100, "POST").await?;
    assert_eq!(failed_get + failed_post, 0, "failed requests out of 200");
    assert_eq!(app1.hits(), 202);

    // Metrics on both sides, acks to the control plane, admin pages.
    let out_ok = metric(
        client.admin_addr(),
        "trellis_proxy_requests_total",
        &["direction=\"outbound\"", "service=\"web.default\"", "code=\"200\""],
    )
    .await?;
    assert_eq!(out_ok, 202.0);
    let in_ok =
        metric(s1.admin_addr(), "trellis_proxy_requests_total", &["direction=\"inbound\"", "code=\"200\""]).await?;
    assert_eq!(in_ok, 202.0);
    assert!(metric(client.admin_addr(), "trellis_proxy_config_acks_total", &[]).await? >= 1.0);
    assert!(metric(client.admin_addr(), "trellis_proxy_cert_expiry_timestamp_seconds", &[]).await? > 1.0e9);
    assert!(w.cp.seen(|s| s.acks.iter().any(|(i, _)| i == "client")));
    let (status, _) = send(&http, "GET", &format!("http://{}/ready", client.admin_addr()), &[], "").await?;
    assert_eq!(status, 200);
    let (status, config) = send(&http, "GET", &format!("http://{}/config", client.admin_addr()), &[], "").await?;
    assert_eq!(status, 200);
    assert!(config.contains(&s1.inbound_addr().to_string()), "{config}");

    // A second endpoint joins.
    let app2 = EchoApp::start("app2").await?;
    let s2 = w.server("web", "s2", "web.default", app2.addr, "http").await?;
    wait_endpoints(&client, "web.default", 2).await?;

    // Static stability: the control plane goes away, traffic does not notice.
    w.cp.stop().await?;
    let (failed, _) = run_requests(&url, 100, "GET").await?;
    assert_eq!(failed, 0, "failed requests out of 100 with the control plane down");
    let (status, _) = send(&http, "GET", &format!("http://{}/ready", client.admin_addr()), &[], "").await?;
    assert_eq!(status, 200, "still ready on the last good configuration");

    // The endpoint that took the traffic (s1, the one with real latency samples) loses its
    // proxy. It stays in the client's configuration (no control plane to say otherwise), so
    // the next GET goes there, fails to connect and is retried on s2.
    let retries_before = metric(client.admin_addr(), "trellis_proxy_retries_total", &[]).await?;
    let s1_hits = app1.hits();
    s1.shutdown().await;
    let (failed, bodies) = run_requests(&url, 100, "GET").await?;
    assert_eq!(failed, 0, "failed requests out of 100 after s1 went away");
    assert!(bodies.iter().all(|b| b.contains("app=app2\n")));
    assert_eq!(app1.hits(), s1_hits);
    let retries = metric(client.admin_addr(), "trellis_proxy_retries_total", &[]).await? - retries_before;
    assert!(retries >= 1.0, "the first request after s1 left must have been retried (retries: {retries})");
    assert!(retries <= 3.0, "the failed endpoint must be avoided after a failure (retries: {retries})");

    client.shutdown().await;
    s2.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_policy_on_peer_status() -> anyhow::Result<()> {
    let w = World::new().await?;
    let app1 = EchoApp::start("app1").await?;
    let app2 = EchoApp::start("app2").await?;
    let s1 = w.server("web", "s1", "web.default", app1.addr, "http").await?;
    let s2 = w.server("web", "s2", "web.default", app2.addr, "http").await?;
    let client = w.client("client", &["web.default"], &[]).await?;
    wait_endpoints(&client, "web.default", 2).await?;
    let upstream = client.upstream_addr("web.default").expect("upstream bound");
    let http = http_client();
    let hits = || app1.hits() + app2.hits();
    let retries = || metric(client.admin_addr(), "trellis_proxy_retries_total", &[]);

    // GET answered 503: retried once on the other endpoint (two endpoints only), then the peer's
    // 503 comes back as is.
    let (r0, h0) = (retries().await?, hits());
    let (status, body) = send(&http, "GET", &format!("http://{upstream}/status/503"), &[], "").await?;
    assert_eq!(status, 503);
    assert!(body.contains("app=app"), "the peer's own response is returned: {body}");
    assert_eq!(hits() - h0, 2);
    assert_eq!(retries().await? - r0, 1.0);

    // POST answered 503 is not retried; 500 is never retried.
    let (r0, h0) = (retries().await?, hits());
    let (status, _) = send(&http, "POST", &format!("http://{upstream}/status/503"), &[], "x").await?;
    assert_eq!(status, 503);
    let (status, _) = send(&http, "GET", &format!("http://{upstream}/status/500"), &[], "").await?;
    assert_eq!(status, 500);
    assert_eq!(hits() - h0, 2);
    assert_eq!(retries().await? - r0, 0.0);

    // No endpoint for a service: 503 from the proxy naming the service.
    let lonely = w.client("lonely", &["nothing.default"], &[]).await?;
    let url = format!("http://{}/", lonely.upstream_addr("nothing.default").expect("bound"));
    let (status, body) = send(&http, "GET", &url, &[], "").await?;
    assert_eq!(status, 503);
    assert!(body.contains("no healthy endpoint for service nothing.default"), "{body}");

    // A request that outlives --request-timeout gets 504 from the proxy, in time.
    let impatient = w.client("impatient", &["web.default"], &["--request-timeout", "300"]).await?;
    wait_endpoints(&impatient, "web.default", 2).await?;
    let url = format!("http://{}/hold", impatient.upstream_addr("web.default").expect("bound"));
    let started = std::time::Instant::now();
    let (status, body) = send(&http, "GET", &url, &[], "").await?;
    let took = started.elapsed();
    assert_eq!(status, 504, "{body}");
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(3), "took {took:?}");
    app1.release();
    app2.release();

    for p in [client, lonely, impatient, s1, s2] {
        p.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_mismatch_is_a_connection_failure() -> anyhow::Result<()> {
    let w = World::new().await?;
    let app = EchoApp::start("app1").await?;
    let server = w.server("web", "s1", "web.default", app.addr, "http").await?;
    let client = w.client("client", &["db.default"], &[]).await?;
    // The control plane says db.default is served at s1's address by the db identity; s1 is web.
    w.cp.push_endpoint(pb::Endpoint {
        id: "local/default/db/x".into(),
        service: "db.default".into(),
        cluster: "local".into(),
        zone: "zone-a".into(),
        address: server.inbound_addr().to_string(),
        identity: "spiffe://trellis.local/ns/default/sa/db".into(),
        healthy: true,
        weight: 1,
        revision: 1,
        region: String::new(),
        gateways: Vec::new(),
        via_gateways: false,
    });
    wait_endpoints(&client, "db.default", 1).await?;
    let url = format!("http://{}/", client.upstream_addr("db.default").expect("bound"));
    let (status, body) = send(&http_client(), "GET", &url, &[], "").await?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("spiffe://trellis.local/ns/default/sa/web"), "the error names who answered: {body}");
    assert_eq!(app.hits(), 0, "not a byte reached the impostor's application");
    let failures =
        metric(client.admin_addr(), "trellis_proxy_tls_handshake_failures_total", &["direction=\"outbound\""]).await?;
    assert!(failures >= 1.0);

    // A peer that does not speak TLS at all is counted on the inbound side.
    let mut plain = TcpStream::connect(server.inbound_addr()).await?;
    plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut sink)).await?;
    let admin = server.admin_addr();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = metric(admin, "trellis_proxy_tls_handshake_failures_total", &["direction=\"inbound\""]).await?;
        if n >= 1.0 {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "inbound handshake failure not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_certificate_failures_are_explained() -> anyhow::Result<()> {
    let w = World::new().await?;

    // Wrong token: refused by the control plane, the message says what to do.
    let err = w
        .try_proxy(&["--token", "wt_wrong", "--service-account", "web"])
        .await
        .expect_err("a wrong token must not start the proxy")
        .to_string();
    assert!(err.contains("cannot get a certificate: the control plane refused the workload token"), "{err}");
    assert!(err.contains("unknown or revoked"), "the control plane's reason is shown: {err}");
    assert!(err.contains("trellis token workload create --namespace default --service-account web"), "{err}");
    assert_eq!(w.cp.seen(|s| s.signs.len()), 1);

    // No token at all: detected before any network call.
    let err = w.try_proxy(&["--service-account", "web"]).await.expect_err("no token").to_string();
    assert!(err.contains("no workload token"), "{err}");
    assert_eq!(w.cp.seen(|s| s.signs.len()), 1, "no call for a missing token");

    // Unreachable control plane: bounded by the startup timeout.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut args = w.args(&["--token", GOOD_TOKEN, "--service-account", "web"]);
    let cp_pos = args.iter().position(|a| a == "--control-plane").expect("flag") + 1;
    args[cp_pos] = closed.to_string();
    let pos = args.iter().position(|a| a == "--startup-timeout").expect("flag") + 1;
    args[pos] = "1".into();
    let started = std::time::Instant::now();
    let config = <trellis_proxy::Config as clap::Parser>::try_parse_from(args)?;
    let err = trellis_proxy::build(config).await.expect_err("unreachable").to_string();
    assert!(err.contains("did not answer within 1 s"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_round_trip() -> anyhow::Result<()> {
    let w = World::new().await?;
    let echo = TcpEcho::start().await?;
    let server = w.server("db", "db-1", "db.default", echo.addr, "tcp").await?;
    let client = w.client("client", &["db.default"], &[]).await?;
    wait_endpoints(&client, "db.default", 1).await?;
    let upstream = client.upstream_addr("db.default").expect("bound");

    let mut rng = fastrand::Rng::with_seed(5);
    let mut payload = vec![0u8, 1, 2];
    payload.extend((0..200_000).map(|_| rng.u8(..)));
    for round in 0..3 {
        let mut tcp = TcpStream::connect(upstream).await?;
        let (mut rd, mut wr) = tcp.split();
        let send = async {
            wr.write_all(&payload).await?;
            // Half-close: the echo answers everything, then closes its side.
            wr.shutdown().await?;
            Ok::<_, std::io::Error>(())
        };
        let mut got = Vec::new();
        let recv = rd.read_to_end(&mut got);
        let (s, r) = tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(send, recv) }).await?;
        s?;
        r?;
        assert_eq!(got.len(), payload.len(), "round {round}");
        assert!(got == payload, "round {round}: bytes differ");
    }
    let streams = metric(client.admin_addr(), "trellis_proxy_requests_total", &["code=\"tcp\""]).await?;
    assert_eq!(streams, 3.0);
    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_style_http2_streaming_with_trailers() -> anyhow::Result<()> {
    let w = World::new().await?;
    let app = EchoApp::start("grpc-app").await?;
    let server = w.server("greeter", "g-1", "greeter.default", app.addr, "grpc").await?;
    let client = w.client("client", &["greeter.default"], &[]).await?;
    wait_endpoints(&client, "greeter.default", 1).await?;
    let upstream = client.upstream_addr("greeter.default").expect("bound");

    // HTTP/2 prior knowledge, like a gRPC client.
    let tcp = TcpStream::connect(upstream).await?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    let conn_task = TaskGuard(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{upstream}/stream"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)?;
    tx.send(Ok(Frame::data(Bytes::from_static(b"one")))).await?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await??;
    assert_eq!(resp.status(), 200);
    let mut resp_body = resp.into_body();
    let mut next_data = async || -> anyhow::Result<Bytes> {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), resp_body.frame())
                .await?
                .ok_or_else(|| anyhow::anyhow!("body ended"))??;
            if let Ok(d) = frame.into_data() {
                return Ok(d);
            }
        }
    };
    // Each message comes back before the next is sent: streaming, not buffering.
    assert_eq!(next_data().await?, Bytes::from_static(b"one"));
    tx.send(Ok(Frame::data(Bytes::from_static(b"two")))).await?;
    assert_eq!(next_data().await?, Bytes::from_static(b"two"));
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    tx.send(Ok(Frame::trailers(trailers))).await?;
    drop(tx);
    let mut got_trailers = None;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(10), resp_body.frame()).await? {
        if let Ok(t) = frame?.into_trailers() {
            got_trailers = Some(t);
        }
    }
    let got_trailers = got_trailers.expect("trailers crossed both proxies");
    assert_eq!(got_trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));

    // A small body of known length is held whole by the client proxy: its trailers go too.
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("7"));
    let body = http_body_util::Full::new(Bytes::from_static(b"held"))
        .map_err(|never| match never {})
        .with_trailers(std::future::ready(Some(Ok::<_, std::convert::Infallible>(trailers))));
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{upstream}/stream"))
        .header("content-type", "application/grpc")
        .header("content-length", "4")
        .header("te", "trailers")
        .body(body)?;
    let tcp = TcpStream::connect(upstream).await?;
    let (mut held_sender, held_conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    let _held_conn = TaskGuard(tokio::spawn(async move {
        let _ = held_conn.await;
    }));
    let resp = tokio::time::timeout(Duration::from_secs(10), held_sender.send_request(req)).await??;
    assert_eq!(resp.status(), 200);
    let got = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect()).await??;
    let got_trailers = got.trailers().cloned().expect("trailers of a held body crossed both proxies");
    assert_eq!(got_trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"7"[..]));
    assert_eq!(got.to_bytes(), Bytes::from_static(b"held"));

    drop(conn_task);
    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_then_stops() -> anyhow::Result<()> {
    let w = World::new().await?;
    let app = EchoApp::start("app1").await?;
    let server = w.server("web", "s1", "web.default", app.addr, "http").await?;
    let client = w.client("client", &["web.default"], &[]).await?;
    wait_endpoints(&client, "web.default", 1).await?;
    let url = format!("http://{}/hold", client.upstream_addr("web.default").expect("bound"));
    let inbound = server.inbound_addr();

    let held = tokio::spawn(async move { send(&http_client(), "GET", &url, &[], "").await });
    wait_until(Duration::from_secs(10), "request held by the app", || {
        app.held.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await?;

    let started = std::time::Instant::now();
    let draining = tokio::spawn(server.shutdown());
    // It stops accepting at once ...
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if TcpStream::connect(inbound).await.is_err() {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "inbound still accepting while draining");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ... deregisters ...
    wait_until(Duration::from_secs(5), "Deregister", || w.cp.seen(|s| s.deregistered.contains(&"s1".to_string())))
        .await?;
    wait_endpoints(&client, "web.default", 0).await?;
    // ... and the in-flight request still completes.
    app.release();
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), held).await???;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&peer_line(CLIENT_ID)));
    tokio::time::timeout(Duration::from_secs(10), draining).await??;
    assert!(started.elapsed() < Duration::from_secs(2), "drain waited for the request, not the timeout");
    client.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_is_bounded_by_the_drain_timeout() -> anyhow::Result<()> {
    let w = World::new().await?;
    let app = EchoApp::start("app1").await?;
    let server = w.server("web", "s1", "web.default", app.addr, "http").await?;
    let client = w.client("client", &["web.default"], &[]).await?;
    wait_endpoints(&client, "web.default", 1).await?;
    let url = format!("http://{}/hold", client.upstream_addr("web.default").expect("bound"));
    let held = TaskGuard(tokio::spawn(async move {
        let _ = send(&http_client(), "GET", &url, &[], "").await;
    }));
    wait_until(Duration::from_secs(10), "request held by the app", || {
        app.held.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await?;
    // The app never answers: the drain (2 s in these tests) forces the end.
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), server.shutdown()).await?;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(6), "drain took {took:?}");
    drop(held);
    client.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_hot_reloads_without_dropping_connections() -> anyhow::Result<()> {
    let w = World::new().await?;
    let app = EchoApp::start("app1").await?;
    let server = w.server("web", "s1", "web.default", app.addr, "http").await?;
    // A 3 s certificate: renewed every ~1.5 s over mTLS with an empty token.
    let client = w.client("client", &["web.default"], &["--cert-ttl", "3"]).await?;
    wait_endpoints(&client, "web.default", 1).await?;
    let url = format!("http://{}/", client.upstream_addr("web.default").expect("bound"));
    let first = client.identity().current().expect("certificate");

    let (failed, _) = run_requests(&url, 20, "GET").await?;
    assert_eq!(failed, 0);
    let store = client.identity().clone();
    wait_until(Duration::from_secs(10), "a renewed certificate", || {
        store.current().is_some_and(|c| c.not_after > first.not_after)
    })
    .await?;
    assert!(
        w.cp.seen(|s| s.signs.iter().any(|(id, renewal)| id == CLIENT_ID && *renewal)),
        "renewal used mTLS, no token"
    );
    // Past the first certificate's expiry, traffic still flows on the same pooled connection.
    wait_until(Duration::from_secs(10), "first certificate expired", || SystemTime::now() > first.not_after).await?;
    let (failed, _) = run_requests(&url, 20, "GET").await?;
    assert_eq!(failed, 0);
    let inbound_conns =
        metric(server.admin_addr(), "trellis_proxy_active_connections", &["direction=\"inbound\""]).await?;
    assert_eq!(inbound_conns, 1.0, "the client's pooled connection survived the renewals");
    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_resource_is_nacked_and_the_rest_keeps_working() -> anyhow::Result<()> {
    let w = World::new().await?;
    let app = EchoApp::start("app1").await?;
    let server = w.server("web", "s1", "web.default", app.addr, "http").await?;
    let client = w.client("client", &["web.default"], &[]).await?;
    wait_endpoints(&client, "web.default", 1).await?;
    let good = client.routes().borrow().endpoints.values().next().cloned().expect("endpoint");

    // The control plane pushes a malformed update of the same endpoint, plus a new good one.
    w.cp.push_endpoint(pb::Endpoint {
        id: good.id.clone(),
        service: "web.default".into(),
        cluster: "local".into(),
        zone: "zone-a".into(),
        address: "not an address".into(),
        identity: good.identity.as_ref().map(|i| i.to_string()).unwrap_or_default(),
        healthy: true,
        weight: 1,
        revision: 2,
        region: String::new(),
        gateways: Vec::new(),
        via_gateways: false,
    });
    w.cp.push_endpoint(pb::Endpoint {
        id: "local/default/other/x".into(),
        service: "other.default".into(),
        cluster: "local".into(),
        zone: "zone-a".into(),
        address: "127.0.0.1:9".into(),
        identity: String::new(),
        healthy: true,
        weight: 1,
        revision: 1,
        region: String::new(),
        gateways: Vec::new(),
        via_gateways: false,
    });
    wait_until(Duration::from_secs(10), "a NACK from the client", || {
        w.cp.seen(|s| s.nacks.iter().any(|(i, _, reason)| i == "client" && reason.contains("not an address")))
    })
    .await?;
    wait_endpoints(&client, "other.default", 1).await?;
    let kept = client.routes().borrow().endpoints.get(&good.id).cloned().expect("kept");
    assert_eq!(kept.address, good.address, "the previous value of the bad resource is kept");
    let url = format!("http://{}/", client.upstream_addr("web.default").expect("bound"));
    let (failed, _) = run_requests(&url, 20, "GET").await?;
    assert_eq!(failed, 0);
    assert!(metric(client.admin_addr(), "trellis_proxy_config_nacks_total", &[]).await? >= 1.0);
    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}
