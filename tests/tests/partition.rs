//! A cluster cut off from the federation, with real processes in network namespaces: clusters
//! A, B and C each in their own namespace on one bridge; C's link is taken down under constant
//! load. C keeps serving its own traffic, A and B keep calling each other, a workload that
//! starts in C during the cut is served to C's callers at once, and it reaches A and B after the
//! link comes back.
//!
//! Needs root and iproute2 (network namespaces); `.ci/run` runs it with `--ignored`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_tests::harness::{Proc, bin, wait_for, wait_ready};
use trellis_tests::netns::Fabric;

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const NAMES: [&str; 3] = ["a", "b", "c"];

struct World {
    // Dropped last: the processes inside go first.
    fabric: Fabric,
    dir: PathBuf,
    config: PathBuf,
    procs: Vec<Proc>,
    /// Per cluster: its control plane's address and trust bundle file.
    cps: Vec<(String, PathBuf)>,
}

impl Drop for World {
    fn drop(&mut self) {
        // Processes first (reverse order of start), then the namespaces.
        while let Some(mut p) = self.procs.pop() {
            p.kill();
        }
        let _ = &self.fabric;
    }
}

impl World {
    /// `trellis` inside cluster `i`'s namespace, against `config`.
    fn cli_with(&self, i: usize, config: &Path, args: &[&str]) -> std::process::Output {
        self.fabric.command(i, &bin("trellis")).args(args).env("TRELLIS_CONFIG", config).output().expect("trellis")
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_with(A, &self.config, args)
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "trellis {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn control_plane(&mut self, i: usize, token: Option<&Path>) {
        let name = NAMES[i];
        let ready = self.dir.join(format!("cp-{name}.ready"));
        let mut args: Vec<String> = [
            "--data-dir",
            &self.dir.join(format!("cp-{name}")).display().to_string(),
            "--listen",
            &format!("{}:0", Fabric::addr(i)),
            "--cluster",
            name,
            "--region",
            name,
            "--ready-file",
            &ready.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(t) = token {
            args.extend(["--join-token-file".to_string(), t.display().to_string()]);
        }
        let log = self.dir.join(format!("cp-{name}.log"));
        let mut p = self.fabric.spawn(i, &format!("cp-{name}"), &bin("trellis-cp"), &args, &log);
        let v = wait_ready(&mut p, &ready, Duration::from_secs(60));
        let bundle = PathBuf::from(v["trust_bundle"].as_str().unwrap_or_default());
        wait_for("the trust bundle file", Duration::from_secs(30), || bundle.exists().then_some(()));
        self.cps.push((v["grpc"].as_str().unwrap_or_default().to_string(), bundle));
        if i == A {
            let ctx = v["admin_context"].as_str().unwrap_or_default().to_string();
            let out = self.cli(&["config", "import", &ctx]);
            assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
        }
        self.procs.push(p);
    }

    /// A proxy in cluster `i` for service account `sa`; serves `service` (with a sample
    /// application) when given, and listens on 127.0.0.1 for each of `upstreams`. Returns the
    /// upstream listeners' addresses.
    fn workload(
        &mut self,
        i: usize,
        sa: &str,
        token: &str,
        service: Option<&str>,
        upstreams: &[&str],
    ) -> BTreeMap<String, String> {
        let cluster = NAMES[i];
        let (cp, bundle) = self.cps[i].clone();
        let mut args: Vec<String> = [
            "--control-plane",
            &cp,
            "--trust-bundle",
            &bundle.display().to_string(),
            "--token",
            token,
            "--service-account",
            sa,
            "--cluster",
            cluster,
            "--instance",
            &format!("{sa}-1"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(svc) = service {
            let ready = self.dir.join(format!("{sa}-app.ready"));
            let app_args: Vec<String> =
                ["demo-app", "--name", sa, "--cluster", cluster, "--listen", "127.0.0.1:0", "--ready-file"]
                    .iter()
                    .map(|s| s.to_string())
                    .chain(std::iter::once(ready.display().to_string()))
                    .collect();
            let mut app = self.fabric.spawn(
                i,
                &format!("{sa}-app"),
                &bin("trellis"),
                &app_args,
                &self.dir.join(format!("{sa}-app.log")),
            );
            let addr =
                wait_ready(&mut app, &ready, Duration::from_secs(30))["addr"].as_str().unwrap_or_default().to_string();
            self.procs.push(app);
            args.extend([
                "--service".into(),
                svc.into(),
                "--app".into(),
                addr,
                "--inbound".into(),
                format!("{}:0", Fabric::addr(i)),
            ]);
        }
        for up in upstreams {
            args.extend(["--upstream".into(), format!("{up}=127.0.0.1:0")]);
        }
        let ready = self.dir.join(format!("{sa}-proxy.ready"));
        args.extend(["--ready-file".into(), ready.display().to_string()]);
        let mut p = self.fabric.spawn(
            i,
            &format!("{sa}-proxy"),
            &bin("trellis-proxy"),
            &args,
            &self.dir.join(format!("{sa}-proxy.log")),
        );
        let v = wait_ready(&mut p, &ready, Duration::from_secs(30));
        self.procs.push(p);
        upstreams.iter().map(|u| (u.to_string(), v["upstreams"][*u].as_str().unwrap_or_default().to_string())).collect()
    }
}

/// One HTTP/1.1 GET; the JSON body of a 200.
fn get(addr: &str) -> Result<Value, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| format!("read: {e}"))?;
    if !out.starts_with("HTTP/1.1 200") {
        return Err(out.lines().next().unwrap_or("no answer").to_string());
    }
    serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap_or_default()).map_err(|e| format!("body: {e}"))
}

/// Constant load on one route, from inside a cluster's namespace.
#[derive(Default)]
struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
    served_by: Mutex<BTreeMap<String, u64>>,
    errors: Mutex<Vec<String>>,
}

fn load(fabric: &Fabric, i: usize, addr: String) -> (Arc<Load>, std::thread::JoinHandle<()>) {
    let l = Arc::new(Load::default());
    let me = l.clone();
    let t = fabric.thread(i, move || {
        while !me.stop.load(Ordering::Relaxed) {
            match get(&addr) {
                Ok(v) => {
                    me.ok.fetch_add(1, Ordering::Relaxed);
                    let by = v["cluster"].as_str().unwrap_or("?").to_string();
                    *me.served_by.lock().unwrap_or_else(|p| p.into_inner()).entry(by).or_default() += 1;
                }
                Err(e) => {
                    me.failed.fetch_add(1, Ordering::Relaxed);
                    me.errors.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    (l, t)
}

/// Waits (from inside cluster `i`) until a GET through `addr` is served by cluster `by`.
fn served_from(fabric: &Fabric, i: usize, addr: &str, by: &str, deadline: Duration) -> Result<Duration, String> {
    let (addr, by) = (addr.to_string(), by.to_string());
    fabric
        .thread(i, move || {
            let start = Instant::now();
            let mut last = String::new();
            while start.elapsed() < deadline {
                match get(&addr) {
                    Ok(v) if v["cluster"] == by.as_str() => return Ok(start.elapsed()),
                    Ok(v) => last = format!("served by {}", v["cluster"]),
                    Err(e) => last = e,
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(format!("not served by cluster {by} within {deadline:?}; last: {last}"))
        })
        .join()
        .unwrap_or_else(|_| Err("the probe thread panicked".into()))
}

fn endpoint_ids(w: &World) -> Vec<String> {
    let v: Value = serde_json::from_str(&w.cli_ok(&["get", "endpoints", "-o", "json"])).expect("json");
    v.as_array().map(|a| a.iter().filter_map(|e| e["id"].as_str().map(str::to_string)).collect()).unwrap_or_default()
}

#[test]
#[ignore = "needs root and iproute2 (network namespaces); run by .ci/run with --ignored"]
fn a_cluster_cut_off_keeps_serving_itself_and_its_changes_reach_the_others_after_the_heal() {
    if let Some(why) = Fabric::unavailable() {
        panic!("network namespaces are not available here ({why}); run as root with iproute2 installed");
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let fabric = Fabric::new(&format!("trp{}", std::process::id()), 3).expect("network namespaces");
    let mut w = World {
        fabric,
        dir: tmp.path().to_path_buf(),
        config: tmp.path().join("cli.yaml"),
        procs: Vec::new(),
        cps: Vec::new(),
    };

    // A bootstraps; B and C join with a token each.
    w.control_plane(A, None);
    for i in [B, C] {
        let token = w.cli_ok(&["token", "create", "--ttl", "10m"]);
        let file = w.dir.join(format!("join-{}", NAMES[i]));
        std::fs::write(&file, token.trim()).expect("token file");
        w.control_plane(i, Some(&file));
    }
    wait_for("three voters", Duration::from_secs(60), || {
        let v: Value = serde_json::from_str(&w.cli_ok(&["get", "controlplanes", "-o", "json"])).ok()?;
        let voters = v["members"].as_array()?.iter().filter(|m| m["membership"] == "voter" && m["error"] == "").count();
        (voters == 3).then_some(())
    });

    // api is exported and runs in B; local is C's own; late is exported and starts in C during
    // the cut. Tokens are made now: creating one is a write, and C cannot write during the cut.
    w.cli_ok(&["create-service", "api.default", "--port", "80", "--exported"]);
    w.cli_ok(&["create-service", "home.default", "--port", "80", "--exported"]);
    w.cli_ok(&["create-service", "local.default", "--port", "80"]);
    w.cli_ok(&["create-service", "late.default", "--port", "80", "--exported"]);
    let token = |sa: &str| {
        w.cli_ok(&["token", "workload", "create", "--service-account", sa, "--ttl", "2h"]).trim().to_string()
    };
    let tokens: BTreeMap<&str, String> =
        ["api", "home", "local", "late", "web", "visitor", "client"].map(|sa| (sa, token(sa))).into();
    w.workload(B, "api", &tokens["api"], Some("api.default"), &[]);
    w.workload(A, "home", &tokens["home"], Some("home.default"), &[]);
    let in_b = w.workload(B, "visitor", &tokens["visitor"], None, &["home.default"]);
    w.workload(C, "local", &tokens["local"], Some("local.default"), &[]);
    let in_a = w.workload(A, "web", &tokens["web"], None, &["api.default", "late.default"]);
    let in_c = w.workload(C, "client", &tokens["client"], None, &["local.default", "late.default"]);
    served_from(&w.fabric, A, &in_a["api.default"], "b", Duration::from_secs(30)).expect("A → api in B");
    served_from(&w.fabric, B, &in_b["home.default"], "a", Duration::from_secs(30)).expect("B → home in A");
    served_from(&w.fabric, C, &in_c["local.default"], "c", Duration::from_secs(30)).expect("C → local in C");

    // Constant load: A → B and C → C.
    let (a_to_b, ta) = load(&w.fabric, A, in_a["api.default"].clone());
    let (b_to_a, tb) = load(&w.fabric, B, in_b["home.default"].clone());
    let (c_local, tc) = load(&w.fabric, C, in_c["local.default"].clone());
    std::thread::sleep(Duration::from_secs(2));

    // Cut C off.
    w.fabric.cut(C);
    let cut_at = Instant::now();
    // A workload starts in C during the cut: C's control plane cannot commit its registration,
    // serves it to C's proxies anyway, and says so.
    w.workload(C, "late", &tokens["late"], Some("late.default"), &[]);
    let took = served_from(&w.fabric, C, &in_c["late.default"], "c", Duration::from_secs(30))
        .expect("C's callers reach the workload that started during the cut");
    eprintln!("during the cut: C's callers reached the new workload {took:?} after it started");
    let config_c = w.dir.join("cli-c.yaml");
    let text = std::fs::read_to_string(&w.config).expect("config");
    std::fs::write(&config_c, text.replace(&w.cps[A].0, &w.cps[C].0)).expect("config for C");
    let status = w.cli_with(C, &config_c, &["status", "-o", "json"]);
    let status: Value = serde_json::from_slice(&status.stdout).expect("status of C");
    let warnings = status["warnings"].to_string();
    assert!(warnings.contains("wait for the group's quorum"), "C's status should say so: {status}");
    // A and B have not heard of it.
    assert!(!endpoint_ids(&w).iter().any(|id| id.contains("/late/")), "A saw C's change through a cut link");
    std::thread::sleep(Duration::from_secs(3).saturating_sub(cut_at.elapsed()));

    // Heal: C's change commits and A's callers reach the workload in C.
    w.fabric.heal(C);
    let healed = Instant::now();
    let took = served_from(&w.fabric, A, &in_a["late.default"], "c", Duration::from_secs(60))
        .expect("after the heal, A's callers reach the workload that started in C during the cut");
    eprintln!("after the heal: A reached it {took:?} after the link came back");
    let ids = endpoint_ids(&w);
    assert!(ids.iter().any(|id| id == "c/default/late/late-1"), "A's registry: {ids:?}");
    assert!(healed.elapsed() < Duration::from_secs(60));

    std::thread::sleep(Duration::from_secs(1));
    for l in [&a_to_b, &b_to_a, &c_local] {
        l.stop.store(true, Ordering::Relaxed);
    }
    ta.join().expect("load thread");
    tb.join().expect("load thread");
    tc.join().expect("load thread");
    for (name, l) in [("A → api (B)", &a_to_b), ("B → home (A)", &b_to_a), ("C → local (C)", &c_local)] {
        let (ok, failed) = (l.ok.load(Ordering::Relaxed), l.failed.load(Ordering::Relaxed));
        let by = l.served_by.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let errors = l.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
        eprintln!("{name}: {ok} served ({by:?}), {failed} failed");
        assert!(ok > 200, "{name}: too little traffic to tell ({ok})");
        assert_eq!(failed, 0, "{name}: requests failed during the cut: {:?}", &errors[..errors.len().min(5)]);
    }
}
