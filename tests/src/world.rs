//! Clusters of real processes in network namespaces (see [`crate::netns`]): each cluster's
//! control plane, proxies, applications and gateway run inside its own namespace, and a
//! constant load runs from inside a namespace too. Used by the fault suites.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Proc, bin, wait_for, wait_ready};
use crate::netns::Fabric;

/// Cluster names, by namespace index.
pub const NAMES: [&str; 3] = ["a", "b", "c"];

/// A workload started by [`World::workload`].
pub struct Workload {
    /// Index into [`World::procs`] of its application (if it serves) and of its proxy.
    pub app: Option<usize>,
    pub proxy: usize,
    /// Its upstream listeners: service → address (inside its namespace).
    pub upstreams: BTreeMap<String, String>,
}

/// Options of one workload.
#[derive(Debug, Clone, Default)]
pub struct WorkloadSpec<'a> {
    pub cluster: usize,
    pub service_account: &'a str,
    pub token: &'a str,
    /// The service it serves (with a sample application), if any.
    pub service: Option<&'a str>,
    pub upstreams: &'a [&'a str],
    /// Bind the inbound listener to loopback: reachable from its own cluster (the gateway) only.
    pub loopback_inbound: bool,
    pub extra_args: &'a [&'a str],
}

/// The clusters of one test.
pub struct World {
    // Dropped last: the processes inside go first.
    pub fabric: Fabric,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub procs: Vec<Proc>,
    /// Per cluster: its control plane's address and trust bundle file.
    pub cps: Vec<(String, PathBuf)>,
    /// Region of each cluster.
    pub regions: [&'static str; 3],
}

impl Drop for World {
    fn drop(&mut self) {
        // Processes first (reverse order of start), then the namespaces.
        while let Some(mut p) = self.procs.pop() {
            p.kill();
        }
    }
}

impl World {
    /// Three namespaces (tagged `tag`), clusters in `regions`; nothing started yet.
    pub fn new(tag: &str, dir: &Path, regions: [&'static str; 3]) -> Self {
        if let Some(why) = Fabric::unavailable() {
            panic!("network namespaces are not available here ({why}); run as root with iproute2 installed");
        }
        let fabric = Fabric::new(&format!("{tag}{}", std::process::id()), 3).expect("network namespaces");
        Self {
            fabric,
            dir: dir.to_path_buf(),
            config: dir.join("cli.yaml"),
            procs: Vec::new(),
            cps: Vec::new(),
            regions,
        }
    }

    /// `trellis` inside cluster `i`'s namespace, against `config`.
    pub fn cli_with(&self, i: usize, config: &Path, args: &[&str]) -> std::process::Output {
        self.fabric.command(i, &bin("trellis")).args(args).env("TRELLIS_CONFIG", config).output().expect("trellis")
    }

    /// `trellis` against cluster A.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_with(0, &self.config, args)
    }

    /// `trellis` against cluster A; its output, or a panic with its error.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "trellis {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// A CLI configuration that talks to cluster `i`'s control plane.
    pub fn config_for(&self, i: usize) -> PathBuf {
        let path = self.dir.join(format!("cli-{}.yaml", NAMES[i]));
        let text = std::fs::read_to_string(&self.config).expect("config");
        std::fs::write(&path, text.replace(&self.cps[0].0, &self.cps[i].0)).expect("config for a cluster");
        path
    }

    fn spawn_ready(&mut self, i: usize, name: &str, program: &str, mut args: Vec<String>) -> (usize, Value) {
        let ready = self.dir.join(format!("{name}.ready"));
        let _ = std::fs::remove_file(&ready);
        args.extend(["--ready-file".to_string(), ready.display().to_string()]);
        let log = self.dir.join(format!("{name}.log"));
        let mut p = self.fabric.spawn(i, name, &bin(program), &args, &log);
        let v = wait_ready(&mut p, &ready, Duration::from_secs(60));
        self.procs.push(p);
        (self.procs.len() - 1, v)
    }

    /// Starts cluster `i`'s control plane: it bootstraps without a token, joins with one.
    pub fn control_plane(&mut self, i: usize, token: Option<&Path>) {
        let name = NAMES[i];
        let mut args: Vec<String> = [
            "--data-dir",
            &self.dir.join(format!("cp-{name}")).display().to_string(),
            "--listen",
            &format!("{}:0", Fabric::addr(i)),
            "--cluster",
            name,
            "--region",
            self.regions[i],
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(t) = token {
            args.extend(["--join-token-file".to_string(), t.display().to_string()]);
        }
        let (_, v) = self.spawn_ready(i, &format!("cp-{name}"), "trellis-cp", args);
        let bundle = PathBuf::from(v["trust_bundle"].as_str().unwrap_or_default());
        wait_for("the trust bundle file", Duration::from_secs(30), || bundle.exists().then_some(()));
        self.cps.push((v["grpc"].as_str().unwrap_or_default().to_string(), bundle));
        if i == 0 {
            let ctx = v["admin_context"].as_str().unwrap_or_default().to_string();
            let out = self.cli(&["config", "import", &ctx]);
            assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    /// A bootstraps; B and C join with a token each; waits for three voters.
    pub fn federation(&mut self) {
        self.control_plane(0, None);
        for i in [1, 2] {
            let token = self.cli_ok(&["token", "create", "--ttl", "10m"]);
            let file = self.dir.join(format!("join-{}", NAMES[i]));
            std::fs::write(&file, token.trim()).expect("token file");
            self.control_plane(i, Some(&file));
        }
        wait_for("three voters", Duration::from_secs(60), || {
            let v: Value = serde_json::from_str(&self.cli_ok(&["get", "controlplanes", "-o", "json"])).ok()?;
            let voters =
                v["members"].as_array()?.iter().filter(|m| m["membership"] == "voter" && m["error"] == "").count();
            (voters == 3).then_some(())
        });
    }

    /// Starts cluster `i`'s east-west gateway on its fabric address (a gateway token from its own
    /// control plane); returns its index in `procs`.
    pub fn gateway(&mut self, i: usize) -> usize {
        let name = NAMES[i];
        let token_file = self.dir.join(format!("gateway-{name}.token"));
        if !token_file.exists() {
            let out = self.cli_with(i, &self.config_for(i), &["token", "gateway", "create", "--ttl", "2h"]);
            assert!(out.status.success(), "gateway token: {}", String::from_utf8_lossy(&out.stderr));
            std::fs::write(&token_file, &out.stdout).expect("gateway token file");
        }
        let (cp, bundle) = self.cps[i].clone();
        let args: Vec<String> = [
            "--control-plane",
            &cp,
            "--trust-bundle",
            &bundle.display().to_string(),
            "--cluster",
            name,
            "--listen",
            &format!("{}:0", Fabric::addr(i)),
            "--token-file",
            &token_file.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        self.spawn_ready(i, &format!("gateway-{name}"), "trellis-gateway", args).0
    }

    /// Starts a workload: a proxy (and a sample application when it serves a service).
    pub fn workload(&mut self, w: &WorkloadSpec) -> Workload {
        let i = w.cluster;
        let cluster = NAMES[i];
        let tag = format!("{}-{cluster}", w.service_account);
        let (cp, bundle) = self.cps[i].clone();
        let mut args: Vec<String> = [
            "--control-plane",
            &cp,
            "--trust-bundle",
            &bundle.display().to_string(),
            "--token",
            w.token,
            "--service-account",
            w.service_account,
            "--cluster",
            cluster,
            "--instance",
            &format!("{}-1", w.service_account),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut app = None;
        if let Some(svc) = w.service {
            let app_args: Vec<String> =
                ["demo-app", "--name", w.service_account, "--cluster", cluster, "--listen", "127.0.0.1:0"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
            let (idx, ready) = self.spawn_ready(i, &format!("{tag}-app"), "trellis", app_args);
            app = Some(idx);
            let inbound = if w.loopback_inbound { "127.0.0.1:0".to_string() } else { format!("{}:0", Fabric::addr(i)) };
            args.extend([
                "--service".into(),
                svc.into(),
                "--app".into(),
                ready["addr"].as_str().unwrap_or_default().to_string(),
                "--inbound".into(),
                inbound,
            ]);
        }
        for up in w.upstreams {
            args.extend(["--upstream".into(), format!("{up}=127.0.0.1:0")]);
        }
        args.extend(w.extra_args.iter().map(|s| s.to_string()));
        let (proxy, v) = self.spawn_ready(i, &format!("{tag}-proxy"), "trellis-proxy", args);
        let upstreams =
            w.upstreams.iter().map(|u| (u.to_string(), v["upstreams"][*u].as_str().unwrap_or_default().to_string()));
        Workload { app, proxy, upstreams: upstreams.collect() }
    }

    /// The endpoint ids in A's registry.
    pub fn endpoint_ids(&self) -> Vec<String> {
        let v: Value = serde_json::from_str(&self.cli_ok(&["get", "endpoints", "-o", "json"])).expect("json");
        v.as_array()
            .map(|a| a.iter().filter_map(|e| e["id"].as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }
}

/// One HTTP/1.1 GET; the JSON body of a 200.
pub fn get(addr: &str) -> Result<Value, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    s.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| format!("read: {e}"))?;
    if !out.starts_with("HTTP/1.1 200") {
        return Err(out.lines().next().unwrap_or("no answer").to_string());
    }
    serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap_or_default()).map_err(|e| format!("body: {e}"))
}

/// Constant load on one route, from inside a cluster's namespace: every outcome with its time.
#[derive(Default)]
pub struct Load {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub stop: AtomicBool,
    pub served_by: Mutex<BTreeMap<String, u64>>,
    pub errors: Mutex<Vec<String>>,
    /// When each request ended and which cluster served it (None: failed).
    pub outcomes: Mutex<Vec<(Instant, Option<String>)>>,
}

impl Load {
    /// Starts a thread in cluster `i`'s namespace sending a GET to `addr` every 10 ms.
    pub fn start(fabric: &Fabric, i: usize, addr: String) -> (Arc<Load>, std::thread::JoinHandle<()>) {
        let l = Arc::new(Load::default());
        let me = l.clone();
        let t = fabric.thread(i, move || {
            while !me.stop.load(Ordering::Relaxed) {
                let outcome = match get(&addr) {
                    Ok(v) => {
                        me.ok.fetch_add(1, Ordering::Relaxed);
                        let by = v["cluster"].as_str().unwrap_or("?").to_string();
                        *me.served_by.lock().unwrap_or_else(|p| p.into_inner()).entry(by.clone()).or_default() += 1;
                        Some(by)
                    }
                    Err(e) => {
                        me.failed.fetch_add(1, Ordering::Relaxed);
                        me.errors.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                        None
                    }
                };
                me.outcomes.lock().unwrap_or_else(|p| p.into_inner()).push((Instant::now(), outcome));
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        (l, t)
    }

    /// Requests served by each cluster (and `failed`) that ended in `[from, until)`.
    pub fn between(&self, from: Instant, until: Instant) -> BTreeMap<String, u64> {
        let mut by = BTreeMap::new();
        for (t, s) in self.outcomes.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if *t >= from && *t < until {
                *by.entry(s.clone().unwrap_or_else(|| "failed".into())).or_default() += 1;
            }
        }
        by
    }

    /// When the last request served by `cluster` after `from` ended.
    pub fn last_served_by(&self, cluster: &str, from: Instant) -> Option<Instant> {
        let o = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        o.iter().filter(|(t, s)| *t >= from && s.as_deref() == Some(cluster)).map(|(t, _)| *t).max()
    }
}

/// Waits (from inside cluster `i`) until a GET through `addr` is served by cluster `by`.
pub fn served_from(fabric: &Fabric, i: usize, addr: &str, by: &str, deadline: Duration) -> Result<Duration, String> {
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
