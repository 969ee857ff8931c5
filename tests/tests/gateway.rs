//! The east-west gateway with real processes: cluster A bootstraps, B joins; B runs `api`
//! (exported), `secret` (cluster-local) and a gateway with a gateway token. A caller with a
//! workload certificate of cluster A opens an mTLS HTTP/2 connection to B's gateway, sends
//! `CONNECT api.default:80`, and runs its own mTLS (the mesh's HTTP/2) through the tunnel to the
//! server proxy, which sees the caller's identity: the gateway never terminates it. `secret` and
//! an unknown service are refused with their reasons, a plain request is refused, a caller
//! without a certificate cannot even connect, and the gateway's metrics count each outcome.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use trellis_proto::tls::{IdentityStore, client_config};
use trellis_proto::verify::{IdMatcher, SharedBundle, TrustBundle};
use trellis_proto::{ALPN_MESH_HTTP, SpiffeId};
use trellis_tests::harness::{ControlPlane, Proc, bin, failover_demo, http_get, trellis, wait_for, wait_ready};
use trellis_tests::mesh::{workload_certificate, workload_token};

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn spawn(dir: &Path, name: &str, program: &str, mut args: Vec<String>) -> (Proc, Value) {
    let ready = dir.join(format!("{name}.ready"));
    // A restarted process must not be taken for ready by its predecessor's file.
    let _ = std::fs::remove_file(&ready);
    args.extend(["--ready-file".to_string(), ready.display().to_string()]);
    let mut p = Proc::spawn(name, &bin(program), &args, &dir.join(format!("{name}.log")), &[]);
    let v = wait_ready(&mut p, &ready, Duration::from_secs(60));
    (p, v)
}

/// Cluster B joins A's federation (region eu, control plane on 127.0.2.1) with a token from
/// `config`'s context; its control plane, address and trust bundle file.
fn join_b(dir: &Path, config: &Path) -> (Proc, String, std::path::PathBuf) {
    let out = trellis(config, &["token", "create", "--ttl", "10m"]);
    assert!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(dir.join("token-b"), &out.stdout).expect("token");
    let (b, ready) = spawn(
        dir,
        "cp-b",
        "trellis-cp",
        s(&["--data-dir", &dir.join("cp-b").display().to_string(), "--cluster", "b", "--region", "eu"])
            .into_iter()
            .chain(s(&["--listen", "127.0.2.1:0", "--join-token-file", &dir.join("token-b").display().to_string()]))
            .collect(),
    );
    let b_cp = ready["grpc"].as_str().unwrap_or_default().to_string();
    let b_bundle = std::path::PathBuf::from(ready["trust_bundle"].as_str().unwrap_or_default());
    wait_for("b's trust bundle", Duration::from_secs(30), || b_bundle.exists().then_some(()));
    (b, b_cp, b_bundle)
}

/// B's gateway on 127.0.2.9, with a gateway token from B's own control plane (a gateway token
/// is for the cluster of the control plane that creates it); it and its ready file.
fn gateway_of_b(dir: &Path, config: &Path, a_cp: &str, b_cp: &str, b_bundle: &Path) -> (Proc, Value) {
    let config_b = dir.join("cli-b.yaml");
    let text = std::fs::read_to_string(config).expect("config");
    std::fs::write(&config_b, text.replace(a_cp, b_cp)).expect("config for B");
    let out = trellis(&config_b, &["token", "gateway", "create", "--ttl", "1h"]);
    assert!(out.status.success(), "gateway token: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(dir.join("gateway-token"), &out.stdout).expect("token");
    spawn(
        dir,
        "gateway-b",
        "trellis-gateway",
        s(&["--control-plane", b_cp, "--trust-bundle", &b_bundle.display().to_string(), "--cluster", "b"])
            .into_iter()
            .chain(s(&["--listen", "127.0.2.9:0", "--token-file", &dir.join("gateway-token").display().to_string()]))
            .collect(),
    )
}

type Outer = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

/// An mTLS HTTP/2 connection to the gateway, presenting `identity` (or nothing).
async fn dial_gateway(
    addr: &str,
    bundle: &SharedBundle,
    identity: Option<Arc<IdentityStore>>,
) -> Result<Outer, String> {
    let gateway = SpiffeId::gateway("trellis.local", "b").expect("id");
    let tls =
        client_config(identity, bundle.clone(), IdMatcher::Exact(gateway), &[b"h2"]).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(trellis_proto::tls::mesh_server_name(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut send = send;
    send.ready().await.map_err(|e| e.to_string())?;
    Ok(send)
}

async fn connect(outer: &mut Outer, authority: &str) -> hyper::Response<hyper::body::Incoming> {
    let req = hyper::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority)
        .body(Empty::<Bytes>::new())
        .expect("request");
    outer.send_request(req).await.expect("CONNECT answered")
}

async fn body_text(resp: hyper::Response<hyper::body::Incoming>) -> String {
    String::from_utf8_lossy(&resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default()).to_string()
}

fn metrics(admin: &str) -> String {
    metrics_path(admin, "/metrics")
}

fn metrics_path(admin: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).expect("admin");
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

#[test]
fn a_caller_of_another_cluster_reaches_an_exported_service_through_the_gateway_with_end_to_end_mtls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let config = dir.join("cli.yaml");
    let a = ControlPlane::start(dir, "a", "127.0.1.1");
    assert!(trellis(&config, &["config", "import", &a.admin_context.display().to_string()]).status.success());
    let (_b, b_cp, b_bundle) = join_b(dir, &config);
    for (svc, exported) in [("api.default", true), ("secret.default", false)] {
        let mut args = vec!["create-service", svc, "--port", "80"];
        if exported {
            args.push("--exported");
        }
        assert!(trellis(&config, &args).status.success());
    }

    // In B: the two services (one application, two proxies) and the gateway.
    let (_app, app) =
        spawn(dir, "app", "trellis", s(&["demo-app", "--name", "api", "--cluster", "b", "--listen", "127.0.2.10:0"]));
    let app_addr = app["addr"].as_str().unwrap_or_default().to_string();
    let mut keep = Vec::new();
    for (sa, svc, inbound) in [("api", "api.default", "127.0.2.2:0"), ("secret", "secret.default", "127.0.2.3:0")] {
        let token = workload_token(&config, sa).expect("token");
        let (p, _) = spawn(
            dir,
            &format!("{sa}-proxy"),
            "trellis-proxy",
            s(&["--control-plane", &b_cp, "--trust-bundle", &b_bundle.display().to_string(), "--token", &token])
                .into_iter()
                .chain(s(&["--service-account", sa, "--cluster", "b", "--service", svc, "--app", &app_addr]))
                .chain(s(&["--inbound", inbound]))
                .collect(),
        );
        keep.push(p);
    }
    let (_gw, gw) = gateway_of_b(dir, &config, &a.grpc, &b_cp, &b_bundle);
    let gw_addr = gw["listen"].as_str().unwrap_or_default().to_string();
    let gw_admin = gw["admin"].as_str().unwrap_or_default().to_string();
    assert_eq!(gw["identity"], "spiffe://trellis.local/trellis/cluster/b/gateway");
    // A gateway token made by A's control plane does not buy B's gateway identity.
    let out = trellis(&config, &["token", "gateway", "create", "--ttl", "1h"]);
    std::fs::write(dir.join("gateway-token-a"), &out.stdout).expect("token");
    let refused = std::process::Command::new(bin("trellis-gateway"))
        .args(["--control-plane", &b_cp, "--trust-bundle", &b_bundle.display().to_string(), "--cluster", "b"])
        .args(["--listen", "127.0.2.8:0", "--token-file", &dir.join("gateway-token-a").display().to_string()])
        .output()
        .expect("run trellis-gateway");
    let err = String::from_utf8_lossy(&refused.stderr).to_string();
    assert!(!refused.status.success() && err.contains("is for a gateway of cluster 'a'"), "{err}");

    let client_token = workload_token(&config, "client").expect("token");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let root = std::fs::read_to_string(&a.trust_bundle).expect("bundle");
        let bundle = SharedBundle::new(TrustBundle::from_pem("trellis.local", &[root]).expect("bundle"));
        // The caller is a workload of cluster A.
        let (client, _) = workload_certificate(&a.grpc, "trellis.local", &bundle, &client_token, "client")
            .await
            .expect("a workload certificate of cluster A");
        let client = IdentityStore::new(client);

        // Without a certificate there is no connection at all.
        let refused = match dial_gateway(&gw_addr, &bundle, None).await {
            Ok(mut o) => o.send_request(hyper::Request::new(Empty::new())).await.is_err(),
            Err(_) => true,
        };
        assert!(refused, "the gateway served a caller without a certificate");

        let mut outer = dial_gateway(&gw_addr, &bundle, Some(client.clone())).await.expect("mTLS to the gateway");
        // A plain request, a cluster-local service, an unknown service: refused with reasons.
        let resp = outer.send_request(hyper::Request::get("/").body(Empty::new()).expect("req")).await.expect("answer");
        assert_eq!(resp.status(), 405);
        let resp = connect(&mut outer, "secret.default:80").await;
        assert_eq!(resp.status(), 403);
        assert!(body_text(resp).await.contains("not exported"));
        let resp = connect(&mut outer, "nope.default:80").await;
        assert_eq!(resp.status(), 404);

        // The exported service: the API's endpoint may take a moment to reach the gateway.
        let mut attempts = 0;
        let resp = loop {
            let resp = connect(&mut outer, "api.default:80").await;
            if resp.status() == 200 || attempts > 100 {
                break resp;
            }
            attempts += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(resp.status(), 200, "CONNECT api.default: {}", body_text(resp).await);
        let tunnel = hyper::upgrade::on(resp).await.expect("tunnel");
        // The caller's own mTLS, to the server proxy, inside the tunnel.
        let api_id = SpiffeId::workload("trellis.local", "default", "api").expect("id");
        let inner_tls =
            client_config(Some(client), bundle.clone(), IdMatcher::Exact(api_id), &[ALPN_MESH_HTTP]).expect("tls");
        let inner = tokio_rustls::TlsConnector::from(inner_tls)
            .connect(trellis_proto::tls::mesh_server_name(), TokioIo::new(tunnel))
            .await
            .expect("end-to-end mTLS through the gateway");
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(inner)).await.expect("h2");
        tokio::spawn(conn);
        let req = hyper::Request::get("http://api.default/hello").body(Empty::<Bytes>::new()).expect("req");
        let resp = send.send_request(req).await.expect("answer through the tunnel");
        assert_eq!(resp.status(), 200);
        let v: Value = serde_json::from_str(&body_text(resp).await).expect("json");
        assert_eq!(v["cluster"], "b", "{v}");
        assert_eq!(v["caller"], "spiffe://trellis.local/ns/default/sa/client", "the server sees the real caller: {v}");
    });

    // A proxy of cluster A learns B's gateway with B's endpoints and goes through it: its
    // requests reach the server with its own identity, and the gateway counts the tunnel.
    let opened = || {
        metrics(&gw_admin)
            .lines()
            .find(|l| {
                l.starts_with("trellis_gateway_tunnels_total")
                    && l.contains("service=\"api.default\"")
                    && l.contains("result=\"opened\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = opened();
    let token = workload_token(&config, "web").expect("token");
    let (_web, web) = spawn(
        dir,
        "web-proxy",
        "trellis-proxy",
        s(&["--control-plane", &a.grpc, "--trust-bundle", &a.trust_bundle.display().to_string(), "--token", &token])
            .into_iter()
            .chain(s(&["--service-account", "web", "--cluster", "a", "--upstream", "api.default=127.0.1.20:0"]))
            .collect(),
    );
    let upstream = web["upstreams"]["api.default"].as_str().unwrap_or_default().to_string();
    let body = wait_for("a call from A's proxy through B's gateway", Duration::from_secs(30), || {
        let body = http_get(&upstream)?;
        (opened() > before).then_some(body)
    });
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["cluster"], "b", "{v}");
    assert_eq!(v["caller"], "spiffe://trellis.local/ns/default/sa/web", "{v}");

    let m = metrics(&gw_admin);
    for (service, result) in [("api.default", "opened"), ("secret.default", "not_exported"), ("", "unknown_service")] {
        let line = m
            .lines()
            .find(|l| {
                l.starts_with("trellis_gateway_tunnels_total")
                    && l.contains(&format!("service=\"{service}\""))
                    && l.contains(&format!("result=\"{result}\""))
                    && l.contains("peer_cluster=\"a\"")
            })
            .unwrap_or_else(|| panic!("no {service}/{result} tunnel count from cluster a in:\n{m}"));
        assert!(!line.ends_with(" 0"), "{line}");
    }
}

/// One request's outcome: when it ended, and the cluster that served it (None: failed).
type Outcome = (std::time::Instant, Option<String>);

#[test]
fn when_every_backend_in_the_callers_cluster_dies_requests_fail_over_through_the_gateway_and_come_back() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc as StdArc, Mutex};
    use std::time::Instant;

    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let config = dir.join("cli.yaml");
    let a = ControlPlane::start(dir, "a", "127.0.1.1");
    assert!(trellis(&config, &["config", "import", &a.admin_context.display().to_string()]).status.success());
    let (_b, b_cp, b_bundle) = join_b(dir, &config);
    assert!(trellis(&config, &["create-service", "api.default", "--port", "80", "--exported"]).status.success());
    let (_gw, _) = gateway_of_b(dir, &config, &a.grpc, &b_cp, &b_bundle);
    // api runs in both clusters; A's instance is the one A's callers prefer.
    let api_token = workload_token(&config, "api").expect("token");
    let backend = |cluster: &str, ip: &str, cp: &str, bundle: &Path, name: &str| -> (Proc, Proc) {
        let (app, ready) = spawn(
            dir,
            &format!("{name}-app"),
            "trellis",
            s(&["demo-app", "--name", "api", "--cluster", cluster, "--listen", &format!("{ip}:0")]),
        );
        let (proxy, _) = spawn(
            dir,
            &format!("{name}-proxy"),
            "trellis-proxy",
            s(&["--control-plane", cp, "--trust-bundle", &bundle.display().to_string(), "--token", &api_token])
                .into_iter()
                .chain(s(&["--service-account", "api", "--cluster", cluster, "--service", "api.default"]))
                .chain(s(&[
                    "--instance",
                    name,
                    "--app",
                    ready["addr"].as_str().unwrap_or_default(),
                    "--inbound",
                    &format!("{ip}:0"),
                ]))
                .collect(),
        );
        (app, proxy)
    };
    let _in_b = backend("b", "127.0.2.2", &b_cp, &b_bundle, "api-b");
    let (mut a_app, mut a_proxy) = backend("a", "127.0.1.2", &a.grpc, &a.trust_bundle, "api-a");
    let token = workload_token(&config, "web").expect("token");
    let (_web, web) = spawn(
        dir,
        "web-proxy",
        "trellis-proxy",
        s(&["--control-plane", &a.grpc, "--trust-bundle", &a.trust_bundle.display().to_string(), "--token", &token])
            .into_iter()
            .chain(s(&["--service-account", "web", "--cluster", "a", "--upstream", "api.default=127.0.1.20:0"]))
            .collect(),
    );
    let upstream = web["upstreams"]["api.default"].as_str().unwrap_or_default().to_string();
    wait_for("api served by A", Duration::from_secs(30), || {
        http_get(&upstream).filter(|b| b.contains("\"cluster\":\"a\"")).map(|_| ())
    });

    // Constant load: one request every 5 ms, each outcome recorded.
    let outcomes: StdArc<Mutex<Vec<Outcome>>> = StdArc::default();
    let stop = StdArc::new(AtomicBool::new(false));
    let load = {
        let (outcomes, stop, upstream) = (outcomes.clone(), stop.clone(), upstream.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let served = http_get(&upstream)
                    .and_then(|b| serde_json::from_str::<Value>(&b).ok())
                    .map(|v| v["cluster"].as_str().unwrap_or_default().to_string());
                outcomes.lock().unwrap_or_else(|p| p.into_inner()).push((Instant::now(), served));
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));

    // Every backend of A dies.
    let killed = Instant::now();
    a_proxy.kill();
    a_app.kill();
    std::thread::sleep(Duration::from_secs(3));
    // They come back (same instance name, new ports).
    let restarting = Instant::now();
    let (new_app, new_proxy) = backend("a", "127.0.1.2", &a.grpc, &a.trust_bundle, "api-a");
    let back = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = outcomes.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let recent: Vec<&Outcome> = o.iter().filter(|(t, _)| *t > back).collect();
        if recent.len() > 20 && recent.iter().rev().take(20).all(|(_, c)| c.as_deref() == Some("a")) {
            break;
        }
        if Instant::now() > deadline {
            let mut by: std::collections::BTreeMap<String, usize> = Default::default();
            for (_, c) in &recent {
                *by.entry(c.clone().unwrap_or_else(|| "failed".into())).or_default() += 1;
            }
            let eps = trellis(&config, &["get", "endpoints", "-o", "json"]);
            let view = web["admin"].as_str().map(|a| metrics_path(a, "/config")).unwrap_or_default();
            panic!(
                "traffic did not come back to A within 30 s: since the restart {by:?}; endpoints: {}; the \
                 caller's view:\n{view}",
                String::from_utf8_lossy(&eps.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load");
    drop((new_app, new_proxy));

    let o = outcomes.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let failed = o.iter().filter(|(_, c)| c.is_none()).count();
    // Failover: from the kill to the first request after which A served nothing until it came back.
    let during: Vec<&Outcome> = o.iter().filter(|(t, _)| *t > killed && *t < restarting).collect();
    let last_a = during.iter().rev().find(|(_, c)| c.as_deref() == Some("a")).map(|(t, _)| *t).unwrap_or(killed);
    let failover = last_a.duration_since(killed);
    let on_b = during.iter().filter(|(_, c)| c.as_deref() == Some("b")).count();
    // Failback: from A's proxy being ready again to the first request A served (0 when A served
    // one before the proxy's ready file was read).
    let failback = o
        .iter()
        .filter(|(t, _)| *t > restarting)
        .find(|(_, c)| c.as_deref() == Some("a"))
        .map(|(t, _)| t.saturating_duration_since(back))
        .unwrap_or_default();
    eprintln!(
        "{} requests, {failed} failed; after the kill {on_b} served by B, failover {failover:?}, failback {failback:?}",
        o.len()
    );
    assert_eq!(failed, 0, "requests failed while A's backends died and came back");
    assert!(on_b > 100, "B should have served the traffic while A's backends were gone ({on_b})");
    assert!(failover < Duration::from_secs(3), "A kept being chosen after its backends died ({failover:?})");
    // The caller's metrics tell the story: one failover to B, one failback, B's gateway probed.
    let m = metrics(web["admin"].as_str().unwrap_or_default());
    let value = |prefix: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    for change in ["failover", "failback"] {
        let n = value(&format!("trellis_proxy_tier_changes_total{{service=\"api.default\",change=\"{change}\"}}"));
        assert!(n >= 1.0, "no {change} counted:\n{m}");
    }
    assert_eq!(value("trellis_proxy_tier{service=\"api.default\"}"), 0.0, "back on the nearest tier:\n{m}");
    assert_eq!(value("trellis_proxy_gateway_up{"), 1.0, "B's gateway is probed and up:\n{m}");
    assert!(value("trellis_proxy_gateway_rtt_seconds{") > 0.0, "{m}");
}

#[test]
fn the_failover_demo_moves_traffic_to_the_nearest_other_cluster_then_past_a_dead_gateway_and_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config");
    let (ok, r) = failover_demo(&config, [3, 6, 9, 12], 16).unwrap_or_else(|e| panic!("demo failed: {e}"));
    assert!(ok, "demo failed: {r:#}");
    assert_eq!(r["failed"], 0, "{r:#}");
    assert_eq!(r["served_by_a_while_down"], 0, "{r:#}");
    assert_eq!(r["served_by_b_while_gateway_down"], 0, "{r:#}");
    assert!(r["failover_ms"].as_f64().is_some_and(|ms| ms < 1000.0), "every request on b within 1 s: {r:#}");
    let phase = |name: &str| -> Value {
        r["phases"].as_array().and_then(|p| p.iter().find(|p| p["phase"] == name).cloned()).unwrap_or_default()
    };
    let served = |p: &Value, c: &str| p["served_by"][c].as_u64().unwrap_or(0);
    // Each phase is served where it should be: b (a's region) while a's backends are gone, c once
    // b's gateway is gone too, b again when its gateway is back, a at the end.
    let (down, no_gw, gw_back, back) = (
        phase("a's backends killed"),
        phase("b's gateway killed too"),
        phase("b's gateway back"),
        phase("a's backends back"),
    );
    assert!(served(&down, "b") > 400 && served(&down, "c") == 0, "{down:#}");
    assert!(served(&no_gw, "c") > 400 && served(&no_gw, "a") == 0, "{no_gw:#}");
    assert!(served(&gw_back, "b") > 300, "{gw_back:#}");
    assert!(served(&back, "a") > 300, "{back:#}");
    assert!(r["gateway_failback_ms"].as_f64().is_some(), "traffic came back to b: {r:#}");
    assert!(r["failback_ms"].as_f64().is_some(), "traffic came back to a: {r:#}");
}
