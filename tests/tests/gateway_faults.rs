//! The fault suite of the east-west gateways, with real processes in network namespaces: three
//! clusters (a and b in one region, c in another), each in its own namespace with a gateway on
//! its fabric address. Every workload's inbound listener is bound to its namespace's loopback,
//! so another cluster can reach it only through that cluster's gateway. `api` runs in all
//! three, `db` in a and b. Constant load from a (web → api) and from c (visitor → db) runs
//! through every fault, and none of them may fail a request:
//!
//! 1. b's `db` application is paused (SIGSTOP): c's calls are served by a's `db`.
//! 2. a's gateway is killed: c's calls to `db` all go to b; it is started again.
//! 3. every `api` backend in a is killed: a's calls go to b (same region) within a second.
//! 4. b's link is cut: a's calls go to c; the link comes back, and so do the calls.
//! 5. b's gateway is killed: a's calls go to c.
//! 6. a's `api` comes back: a's calls return to a.
//!
//! A capture on b's fabric interface shows no plaintext application bytes (while a control
//! packet with a marker is seen), and b's server proxy logs the caller's identity.
//!
//! a's caller uses transparent mode: `trellis transparent-init` in a's namespace redirects
//! connections to service virtual addresses to web's proxy, and the load simply connects to
//! `api`'s virtual address on port 80.
//!
//! Needs root and iproute2 (network namespaces); `.ci/run` runs it with `--ignored`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use trellis_tests::netns::Fabric;
use trellis_tests::world::{Load, WorkloadSpec, World, get, served_from};

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

/// Plaintext that would show on the wire if a hop were not encrypted: the request line the
/// load sends and a field of the application's JSON answer.
const PLAINTEXT: [&[u8]; 2] = [b"GET /hello", b"\"caller\""];
/// Sent in the clear on purpose, to show the capture sees application bytes when there are any.
const CONTROL: &[u8] = b"trellis-capture-control";

fn signal(w: &World, proc: usize, sig: Signal) {
    kill(Pid::from_raw(w.procs[proc].pid() as i32), sig).expect("signal");
}

fn only(by: &BTreeMap<String, u64>, cluster: &str) -> bool {
    by.keys().all(|k| k == cluster) && by.get(cluster).copied().unwrap_or(0) > 20
}

#[test]
#[ignore = "needs root and iproute2 (network namespaces); run by .ci/run with --ignored"]
fn gateway_faults_under_load_fail_no_request_and_traffic_follows_the_tiers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut w = World::new("trg", tmp.path(), ["east", "east", "west"]);
    w.federation();
    for i in [A, B, C] {
        w.gateway(i);
    }
    w.cli_ok(&["create-service", "api.default", "--port", "80", "--exported"]);
    w.cli_ok(&["create-service", "db.default", "--port", "80", "--exported"]);
    let token = |sa: &str| {
        w.cli_ok(&["token", "workload", "create", "--service-account", sa, "--ttl", "2h"]).trim().to_string()
    };
    let tokens: BTreeMap<&str, String> = ["api", "db", "web", "visitor"].map(|sa| (sa, token(sa))).into();
    // A hung backend must cost a caller one attempt, not the request.
    let client_args: &[&str] = &["--per-try-timeout", "1000", "--request-timeout", "8000"];
    let web_args: &[&str] =
        &["--per-try-timeout", "1000", "--request-timeout", "8000", "--transparent", "127.0.0.1:15001"];
    let services: serde_json::Value =
        serde_json::from_str(&w.cli_ok(&["get", "services", "-o", "json"])).expect("services");
    let api_vip = services
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "api"))
        .and_then(|s| s["vip"].as_str())
        .filter(|v| v.starts_with("198.19."))
        .unwrap_or_else(|| panic!("api has no virtual address: {services}"))
        .to_string();
    let init =
        w.fabric.command(A, &trellis_tests::harness::bin("trellis")).arg("transparent-init").output().expect("init");
    assert!(init.status.success(), "transparent-init: {}", String::from_utf8_lossy(&init.stderr));
    let backend = |cluster: usize, sa: &'static str, service: &'static str| WorkloadSpec {
        cluster,
        service_account: sa,
        token: &tokens[sa],
        service: Some(service),
        loopback_inbound: true,
        ..Default::default()
    };
    let mut api_a = Vec::new();
    for i in [A, B, C] {
        let wl = w.workload(&backend(i, "api", "api.default"));
        if i == A {
            api_a = vec![wl.app.expect("app"), wl.proxy];
        }
    }
    w.workload(&backend(A, "db", "db.default"));
    let db_b = w.workload(&backend(B, "db", "db.default")).app.expect("app");
    w.workload(&WorkloadSpec {
        cluster: A,
        service_account: "web",
        token: &tokens["web"],
        extra_args: web_args,
        ..Default::default()
    });
    let visitor = w.workload(&WorkloadSpec {
        cluster: C,
        service_account: "visitor",
        token: &tokens["visitor"],
        upstreams: &["db.default"],
        extra_args: client_args,
        ..Default::default()
    });
    // a's application dials api's virtual address; iptables hands the connection to web's proxy.
    let (to_api, to_db) = (format!("{api_vip}:80"), visitor.upstreams["db.default"].clone());
    served_from(&w.fabric, A, &to_api, "a", Duration::from_secs(30)).expect("a → api in a");
    served_from(&w.fabric, C, &to_db, "b", Duration::from_secs(30)).expect("c → db in b, through b's gateway");
    served_from(&w.fabric, C, &to_db, "a", Duration::from_secs(30)).expect("c → db in a, through a's gateway");
    let describe = w.cli_ok(&["cluster", "describe", "b"]);
    assert!(describe.contains("through its gateways"), "{describe}");

    let capture = w.fabric.capture(B, &[PLAINTEXT[0], PLAINTEXT[1], CONTROL]);
    w.fabric
        .thread(A, || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp");
            s.send_to(CONTROL, format!("{}:9", Fabric::addr(B))).expect("control packet");
        })
        .join()
        .expect("control packet");
    let (web_load, t1) = Load::start(&w.fabric, A, to_api.clone());
    let (db_load, t2) = Load::start(&w.fabric, C, to_db.clone());
    std::thread::sleep(Duration::from_secs(2));
    let settle = Duration::from_millis(1500);
    let mut report = Vec::new();

    // 1. b's db application hangs.
    let t = Instant::now();
    signal(&w, db_b, Signal::SIGSTOP);
    std::thread::sleep(Duration::from_secs(5));
    let by = db_load.between(t + settle + Duration::from_secs(1), Instant::now());
    signal(&w, db_b, Signal::SIGCONT);
    report.push(format!("1. b's db paused: c's calls {by:?}"));
    assert!(only(&by, "a"), "with b's db paused, c's calls should be served by a's: {by:?}");

    // 2. a's gateway dies: c's calls to db go to b only.
    let gw_a = w.procs.iter().position(|p| p.name == "gateway-a").expect("a's gateway");
    let t = Instant::now();
    w.procs[gw_a].kill();
    std::thread::sleep(Duration::from_secs(4));
    let by = db_load.between(t + settle, Instant::now());
    report.push(format!("2. a's gateway killed: c's calls {by:?}"));
    assert!(only(&by, "b"), "with a's gateway gone, c's calls should be served by b: {by:?}");
    w.gateway(A);

    // 3. every api backend in a dies: a's calls go to b, its region.
    let t = Instant::now();
    for p in &api_a {
        w.procs[*p].kill();
    }
    std::thread::sleep(Duration::from_secs(3));
    let last_a = web_load.last_served_by("a", t).map(|l| l.duration_since(t));
    let by = web_load.between(t + Duration::from_secs(1), Instant::now());
    report.push(format!("3. a's api killed: a's calls {by:?}, last served by a {last_a:?} after the kill"));
    assert!(only(&by, "b"), "within 1 s of losing a's api, a's calls should be served by b: {by:?}");
    let api = to_api.clone();
    let caller = w.fabric.thread(A, move || get(&api)).join().expect("thread").expect("a call served by b");
    assert_eq!(caller["cluster"], "b");
    assert!(
        caller["caller"].as_str().is_some_and(|c| c.ends_with("/ns/default/sa/web")),
        "b's server saw the real caller through the gateway: {caller}"
    );
    let api_b_log = std::fs::read_to_string(tmp.path().join("api-b-proxy.log")).unwrap_or_default();
    assert!(
        api_b_log.lines().any(|l| l.contains("inbound connection") && l.contains("/ns/default/sa/web")),
        "b's api proxy logs the caller's identity"
    );

    // 4. b's link is cut: a's calls go to c; after the heal, back to b.
    let t = Instant::now();
    w.fabric.cut(B);
    std::thread::sleep(Duration::from_secs(5));
    let by = web_load.between(t + Duration::from_secs(3), Instant::now());
    w.fabric.heal(B);
    report.push(format!("4. b's link cut: a's calls {by:?} from 3 s after the cut"));
    assert!(only(&by, "c"), "with b cut off, a's calls should be served by c: {by:?}");
    let back =
        served_from(&w.fabric, A, &to_api, "b", Duration::from_secs(30)).expect("a's calls back on b after the heal");
    report.push(format!("   healed: a's calls on b again {back:?} after the heal"));
    std::thread::sleep(Duration::from_secs(2));

    // 5. b's gateway dies: a's calls go to c.
    let gw_b = w.procs.iter().position(|p| p.name == "gateway-b").expect("b's gateway");
    let t = Instant::now();
    w.procs[gw_b].kill();
    std::thread::sleep(Duration::from_secs(3));
    let last_b = web_load.last_served_by("b", t).map(|l| l.duration_since(t));
    let by = web_load.between(t + settle, Instant::now());
    report.push(format!("5. b's gateway killed: a's calls {by:?}, last served by b {last_b:?} after the kill"));
    assert!(only(&by, "c"), "with b's gateway gone, a's calls should be served by c: {by:?}");

    // 6. a's api comes back: a's calls return to a.
    let wl = w.workload(&backend(A, "api", "api.default"));
    drop(wl);
    let t = Instant::now();
    let took = served_from(&w.fabric, A, &to_api, "a", Duration::from_secs(30)).expect("a's calls back on a");
    std::thread::sleep(Duration::from_secs(2));
    let by = web_load.between(t + took + Duration::from_millis(200), Instant::now());
    report.push(format!("6. a's api back: served by a {took:?} after it was ready; then {by:?}"));
    assert!(only(&by, "a"), "a's calls should be back on a: {by:?}");

    for l in [&web_load, &db_load] {
        l.stop.store(true, Ordering::Relaxed);
    }
    t1.join().expect("load");
    t2.join().expect("load");
    let seen = capture.finish().expect("capture");
    report.push(format!(
        "capture on b's interface: {} frames, {} bytes; plaintext hits {:?}; control {}",
        seen.packets,
        seen.bytes,
        &seen.hits[..2],
        seen.hits[2]
    ));
    for (name, l) in [("a → api", &web_load), ("c → db", &db_load)] {
        let (ok, failed) = (l.ok.load(Ordering::Relaxed), l.failed.load(Ordering::Relaxed));
        let errors = l.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
        report.push(format!("{name}: {ok} served ({:?}), {failed} failed", l.served_by.lock().unwrap()));
        assert_eq!(failed, 0, "{name}: requests failed: {:?}\n{}", &errors[..errors.len().min(5)], report.join("\n"));
    }
    eprintln!("{}", report.join("\n"));
    assert!(seen.hits[2] >= 1, "the capture did not see the control packet: it proves nothing");
    assert!(seen.bytes > 100_000, "too little traffic crossed b's interface to tell ({} bytes)", seen.bytes);
    assert_eq!(seen.hits[..2], [0, 0], "plaintext application bytes on b's interface");
}
