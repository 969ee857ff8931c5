//! `trellis demo`: a whole federation on this machine. Cluster `a` bootstraps it; the other
//! clusters (three in all by default, each on its own loopback block) join with a join token each,
//! as an operator would. Every cluster runs one sample service with its proxy; each calls the next
//! cluster's exported service (web@a → api, api@b → db, db@c → web), so every request crosses
//! clusters, through the callee's east-west gateway (one per cluster), with the proxies' mTLS end
//! to end inside the tunnel, and the server reports the caller it saw. A live table shows the traffic;
//! with `--duration` it stops by itself and `-o json` prints one final report. While it runs, the
//! `trellis-demo` context is current, so `trellis cluster list` in another terminal talks to it.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use trellis_proto::pb;

use super::client;
use super::output::{Format, table};
use super::procs::{Proc, sibling_binary, wait_ready};
use crate::context::{ConfigFile, default_path, write_private};

/// What the demo shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Clusters calling each other's exported services through their gateways.
    Mesh,
    /// Every backend of a service in cluster a dies under load: its callers are served by
    /// another cluster through its gateway, and come back when a's backends return.
    Failover,
}

/// Options of `trellis demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// What to show.
    #[arg(long, value_enum, default_value_t = Scenario::Mesh)]
    pub scenario: Scenario,
    /// Failover: kill every backend of `api` in cluster a this many seconds into the run.
    #[arg(long, default_value_t = 4)]
    pub kill_backends_at: u64,
    /// Failover: then kill cluster b's gateway (SIGKILL), with a's traffic on b, this many seconds
    /// into the run (0: never).
    #[arg(long, default_value_t = 8)]
    pub kill_gateway_at: u64,
    /// Failover: start b's gateway again this many seconds into the run.
    #[arg(long, default_value_t = 12)]
    pub restore_gateway_at: u64,
    /// Failover: bring a's backends back this many seconds into the run.
    #[arg(long, default_value_t = 16)]
    pub restore_backends_at: u64,
    /// Number of clusters (1 to 5): the first bootstraps the federation, the others join it with
    /// a join token each.
    #[arg(long, default_value_t = 3)]
    pub clusters: u8,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Requests per second, over both routes.
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// Output: a live table, or one JSON (or YAML) report at the end.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// Kill cluster a's control plane (SIGKILL) this many seconds into the run, to show traffic
    /// goes on (and, with several clusters, that the others elect a new Raft leader).
    #[arg(long)]
    pub kill_controlplane_at: Option<u64>,
    /// Restart the killed control plane this many seconds into the run.
    #[arg(long, requires = "kill_controlplane_at")]
    pub restart_controlplane_at: Option<u64>,
    /// Rotate the federation's root CA (`trellis ca rotate`) this many seconds into the run, to
    /// show that no request fails while every certificate is re-issued under the new root.
    #[arg(long)]
    pub rotate_root_at: Option<u64>,
    /// Keep the working directory (logs, data) after the demo ends.
    #[arg(long)]
    pub keep: bool,
}

/// Final report of a demo run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub clusters: u8,
    pub duration_s: f64,
    pub requests: u64,
    pub failed: u64,
    /// True when every request crossed mTLS and the server saw the expected caller identity.
    pub mtls: bool,
    /// Successful responses whose server saw another caller identity than the calling workload.
    pub unexpected_caller: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub rps: f64,
    pub controlplane_restarts: u32,
    /// Root rotations made during the run.
    pub root_rotations: u32,
    /// Healthy endpoints known to the control plane at the end.
    pub endpoints_registered: usize,
    /// With several clusters: every route was served by another cluster than its caller's.
    pub cross_cluster: bool,
    /// The clusters that joined, and how long each took.
    pub joins: Vec<JoinReport>,
    /// Tunnels the east-west gateways opened (every cross-cluster connection is one).
    pub gateway_tunnels: u64,
    pub routes: Vec<RouteReport>,
    pub workdir: Option<PathBuf>,
}

/// Figures of one route.
#[derive(Debug, Clone, Serialize)]
pub struct RouteReport {
    pub route: String,
    /// The caller's cluster.
    pub cluster: String,
    pub requests: u64,
    pub failed: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub served_by: String,
    pub caller_seen: String,
    /// Successful responses whose server saw another caller, and the first such response.
    pub unexpected_caller: u64,
    pub unexpected_example: Option<serde_json::Value>,
}

#[derive(Default)]
struct RouteStats {
    requests: u64,
    failed: u64,
    mtls_ok: u64,
    latencies_us: Vec<u32>,
    window: u64,
    served_by: String,
    caller_seen: String,
    last_error: String,
    unexpected_example: Option<serde_json::Value>,
}

struct Route {
    name: String,
    /// The caller's cluster.
    cluster: String,
    url: String,
    expected_caller: String,
    stats: Mutex<RouteStats>,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[idx.min(sorted.len() - 1)]) / 1000.0
}

/// Restores the previous CLI context when the demo ends, however it ends.
pub(super) struct ContextGuard {
    path: PathBuf,
    previous: Option<String>,
    name: String,
}

impl DemoCluster {
    pub(super) fn home(&self) -> Home {
        Home { name: self.name.clone(), grpc: self.grpc.clone(), bundle: self.bundle.clone() }
    }
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        if let Ok(mut cfg) = ConfigFile::load(&self.path) {
            cfg.contexts.retain(|c| c.name != self.name);
            cfg.current_context = self.previous.clone().filter(|p| cfg.contexts.iter().any(|c| &c.name == p));
            let _ = cfg.save(&self.path);
        }
    }
}

/// Names, regions and loopback blocks of the demo's clusters, in order of creation.
/// a and b share a region, so b is a's first choice when a service fails in a.
const CLUSTERS: [(&str, &str); 5] =
    [("a", "us-east"), ("b", "us-east"), ("c", "eu-west"), ("d", "eu-west"), ("e", "ap-south")];
/// The sample services; service `k` runs in cluster `k mod N` and calls service `k + 1`.
const SERVICES: [&str; 5] = ["web", "api", "db", "cache", "auth"];

/// One cluster of the demo: its control plane and where its proxies find it.
/// Where a workload finds its cluster's control plane.
#[derive(Debug, Clone)]
pub(super) struct Home {
    pub(super) name: String,
    pub(super) grpc: String,
    pub(super) bundle: PathBuf,
}

pub(super) struct DemoCluster {
    pub(super) name: String,
    pub(super) region: String,
    pub(super) cp: Proc,
    pub(super) grpc: String,
    pub(super) bundle: PathBuf,
}

struct Demo {
    workdir: PathBuf,
    clusters: Vec<DemoCluster>,
    others: Vec<Proc>,
    joins: Vec<JoinReport>,
    /// Admin (metrics) addresses of the east-west gateways.
    gateway_admins: Vec<String>,
    _context: ContextGuard,
    ctx: crate::context::Context,
}

/// How long one cluster took to join.
#[derive(Debug, Clone, Serialize)]
pub struct JoinReport {
    pub cluster: String,
    pub region: String,
    /// From starting its control plane with the token to that control plane serving.
    pub join_ms: u64,
}

/// Loopback address `host` of cluster `index` (cluster a is 127.0.1.0/24, b 127.0.2.0/24, ...).
fn ip(index: usize, host: u8) -> String {
    format!("127.0.{}.{host}", index + 1)
}

/// Starts a cluster's control plane and waits until it serves. The first one bootstraps the
/// federation; the others join with `token_file`.
async fn start_controlplane(
    workdir: &Path,
    index: usize,
    token_file: Option<&Path>,
) -> Result<(DemoCluster, serde_json::Value), String> {
    let (name, region) = CLUSTERS[index];
    let cp_bin = sibling_binary("trellis-cp")?;
    let ready_file = workdir.join(format!("cp-{name}.ready"));
    let mut args: Vec<String> = vec![
        "--data-dir".into(),
        workdir.join(format!("cp-{name}")).display().to_string(),
        "--listen".into(),
        format!("{}:0", ip(index, 1)),
        "--cluster".into(),
        name.into(),
        "--region".into(),
        region.into(),
        "--node".into(),
        "cp-1".into(),
        "--ready-file".into(),
        ready_file.display().to_string(),
    ];
    if let Some(t) = token_file {
        args.extend(["--join-token-file".into(), t.display().to_string()]);
    }
    let log = workdir.join("logs").join(format!("cp-{name}.log"));
    let mut cp = Proc::spawn(&format!("control plane of cluster {name}"), &cp_bin, args, &log)
        .map_err(|e| format!("cannot start trellis-cp: {e}"))?;
    let ready = wait_ready(&mut cp, &ready_file, Duration::from_secs(60)).await?;
    let grpc = ready["grpc"].as_str().unwrap_or_default().to_string();
    // A restarted control plane reuses its port so that proxies find it again.
    if let Some(listen) = cp.args.iter().position(|a| a == "--listen") {
        cp.args[listen + 1] = grpc.clone();
    }
    let bundle = PathBuf::from(ready["trust_bundle"].as_str().unwrap_or_default());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !bundle.is_file() {
        if Instant::now() > deadline {
            return Err(format!("cluster {name}'s control plane wrote no trust bundle at {}", bundle.display()));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok((DemoCluster { name: name.into(), region: region.into(), cp, grpc, bundle }, ready))
}

/// A federation of the demo: its clusters' control planes and gateways, and the context.
pub(super) struct Federation {
    pub(super) clusters: Vec<DemoCluster>,
    pub(super) joins: Vec<JoinReport>,
    pub(super) gateways: Vec<Proc>,
    pub(super) gateway_admins: Vec<String>,
    pub(super) guard: ContextGuard,
    pub(super) ctx: crate::context::Context,
    pub(super) td: String,
}

/// Starts `n` clusters: a bootstraps, the others join with a token each, and with several
/// clusters each runs an east-west gateway. The demo's context becomes current.
pub(super) async fn start_federation(workdir: &Path, n: usize, live: bool) -> Result<Federation, String> {
    let logs = workdir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    let io = |e: std::io::Error| e.to_string();

    // Cluster a bootstraps the federation. Every listener binds port 0 and reports the port it got.
    let (first, ready) = start_controlplane(workdir, 0, None).await?;
    if live {
        println!("  cluster a ({}): control plane serving on {} (new federation)", first.region, first.grpc);
    }
    let admin_ctx = PathBuf::from(ready["admin_context"].as_str().unwrap_or_default());
    let td = ready["trust_domain"].as_str().unwrap_or(trellis_proto::DEFAULT_TRUST_DOMAIN).to_string();

    // Make the demo's context current for `trellis` in other terminals.
    let imported = ConfigFile::load(&admin_ctx).map_err(|e| e.to_string())?;
    let mut ctx = imported.current().map_err(|e| e.to_string())?.clone();
    ctx.name = "trellis-demo".into();
    let cfg_path = default_path();
    let mut user_cfg = ConfigFile::load(&cfg_path).map_err(|e| e.to_string())?;
    let guard =
        ContextGuard { path: cfg_path.clone(), previous: user_cfg.current_context.clone(), name: ctx.name.clone() };
    user_cfg.upsert(ctx.clone());
    user_cfg.current_context = Some(ctx.name.clone());
    user_cfg.save(&cfg_path).map_err(|e| e.to_string())?;
    let mut admin = client::admin(&ctx).map_err(|e| e.to_string())?;
    let status = |s: tonic::Status| client::from_status(&ctx.server, s).to_string();

    // The other clusters join with one token each, as an operator would with `trellis token create`.
    let mut clusters = vec![first];
    let mut joins = Vec::new();
    for (index, &(name, region)) in CLUSTERS.iter().enumerate().take(n).skip(1) {
        let token = admin
            .create_join_token(pb::CreateJoinTokenRequest {
                new_cluster: true,
                ttl_seconds: 600,
                uses: 1,
                description: format!("trellis demo: cluster {name}"),
                ..Default::default()
            })
            .await
            .map_err(status)?
            .into_inner()
            .token;
        let token_file = workdir.join(format!("join-{name}.token"));
        write_private(&token_file, token.as_bytes()).map_err(io)?;
        let began = Instant::now();
        let (cluster, _) = start_controlplane(workdir, index, Some(&token_file)).await?;
        let join_ms = began.elapsed().as_millis() as u64;
        if live {
            println!(
                "  cluster {name} ({region}): joined with a token in {join_ms} ms; control plane serving on {}",
                cluster.grpc
            );
        }
        joins.push(JoinReport { cluster: name.into(), region: region.into(), join_ms });
        clusters.push(cluster);
    }

    // With several clusters, each runs an east-west gateway (its own gateway token): calls
    // between clusters go through the callee's gateway, the proxies' mTLS inside the tunnel.
    let mut gateway_admins = Vec::new();
    let mut gateways = Vec::new();
    if n > 1 {
        for (i, c) in clusters.iter().enumerate() {
            let (gw, ready) = start_gateway(workdir, i, &c.home(), &ctx).await?;
            gateway_admins.push(ready["admin"].as_str().unwrap_or_default().to_string());
            if live {
                println!("  cluster {}: east-west gateway on {}", c.name, ready["listen"].as_str().unwrap_or_default());
            }
            gateways.push(gw);
        }
    }

    Ok(Federation { clusters, joins, gateways, gateway_admins, guard, ctx, td })
}

/// Starts the east-west gateway of cluster `c` (number `i`) with a gateway token of its own
/// control plane, and waits until it is ready; returns it and its ready file.
pub(super) async fn start_gateway(
    workdir: &Path,
    i: usize,
    c: &Home,
    ctx: &crate::context::Context,
) -> Result<(Proc, serde_json::Value), String> {
    let io = |e: std::io::Error| e.to_string();
    let gateway_bin = sibling_binary("trellis-gateway")?;
    // A gateway token is for the cluster of the control plane that creates it.
    let c_ctx = crate::context::Context { server: c.grpc.clone(), ..ctx.clone() };
    let token = client::admin(&c_ctx)
        .map_err(|e| e.to_string())?
        .create_workload_token(pb::CreateWorkloadTokenRequest {
            ttl_seconds: 3600,
            description: format!("trellis demo: gateway of cluster {}", c.name),
            gateway: true,
            ..Default::default()
        })
        .await
        .map_err(|s| client::from_status(&c.grpc, s).to_string())?
        .into_inner()
        .token;
    let token_file = workdir.join(format!("gateway-{}.token", c.name));
    write_private(&token_file, token.as_bytes()).map_err(io)?;
    let ready_file = workdir.join(format!("gateway-{}.ready", c.name));
    let _ = std::fs::remove_file(&ready_file);
    let args = vec![
        "--control-plane".into(),
        c.grpc.clone(),
        "--trust-bundle".into(),
        c.bundle.display().to_string(),
        "--cluster".into(),
        c.name.clone(),
        "--listen".into(),
        format!("{}:0", ip(i, 9)),
        "--token-file".into(),
        token_file.display().to_string(),
        "--ready-file".into(),
        ready_file.display().to_string(),
    ];
    let log = workdir.join("logs").join(format!("gateway-{}.log", c.name));
    let mut gw = Proc::spawn(&format!("gateway of cluster {}", c.name), &gateway_bin, args, &log).map_err(io)?;
    let ready = wait_ready(&mut gw, &ready_file, Duration::from_secs(30)).await?;
    Ok((gw, ready))
}

/// Creates (or updates) service `name.default` (when `exported` is given: whether it is) and a
/// workload token for service account `sa`; returns the token file.
pub(super) async fn service_and_token(
    workdir: &Path,
    ctx: &crate::context::Context,
    name: &str,
    sa: &str,
    exported: Option<bool>,
) -> Result<PathBuf, String> {
    let status = |s: tonic::Status| client::from_status(&ctx.server, s).to_string();
    let mut admin = client::admin(ctx).map_err(|e| e.to_string())?;
    if let Some(exported) = exported {
        admin
            .apply_service(pb::Service {
                name: name.into(),
                namespace: "default".into(),
                ports: vec![pb::ServicePort { name: "http".into(), port: 80 }],
                protocol: "http".into(),
                exported,
                revision: 0,
                vip: String::new(),
            })
            .await
            .map_err(status)?;
    }
    let token = admin
        .create_workload_token(pb::CreateWorkloadTokenRequest {
            namespace: "default".into(),
            service_account: sa.into(),
            ttl_seconds: 3600,
            description: "trellis demo".into(),
            gateway: false,
        })
        .await
        .map_err(status)?
        .into_inner()
        .token;
    let token_file = workdir.join(format!("{sa}.token"));
    write_private(&token_file, token.as_bytes()).map_err(|e| e.to_string())?;
    Ok(token_file)
}

/// A sample workload in `cluster` (index `home`) at host `host` of its loopback block: its
/// application (when it serves `service`) and proxy, with a local listener for `upstream`.
/// Returns the processes and the upstream listener's address.
#[allow(clippy::too_many_arguments)]
pub(super) async fn start_workload(
    workdir: &Path,
    cluster: &Home,
    home: usize,
    host: u8,
    td: &str,
    token_file: &Path,
    instance: &str,
    sa: &str,
    service: Option<&str>,
    upstream: Option<&str>,
) -> Result<(Vec<Proc>, Option<String>), String> {
    let logs = workdir.join("logs");
    let io = |e: std::io::Error| e.to_string();
    let addr = ip(home, host);
    let mut procs = Vec::new();
    let mut proxy_args = vec![
        "--control-plane".into(),
        cluster.grpc.clone(),
        "--trust-bundle".into(),
        cluster.bundle.display().to_string(),
        "--trust-domain".into(),
        td.to_string(),
        "--token-file".into(),
        token_file.display().to_string(),
        "--namespace".into(),
        "default".into(),
        "--service-account".into(),
        sa.into(),
        "--cluster".into(),
        cluster.name.clone(),
        "--zone".into(),
        format!("{}-1", cluster.name),
        "--instance".into(),
        instance.into(),
    ];
    if let Some(svc) = service {
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        let app_ready = workdir.join(format!("{instance}-app.ready"));
        let _ = std::fs::remove_file(&app_ready);
        let mut app = Proc::spawn(
            &format!("{instance} app"),
            &me,
            vec![
                "demo-app".into(),
                "--name".into(),
                sa.into(),
                "--cluster".into(),
                cluster.name.clone(),
                "--listen".into(),
                format!("{addr}:0"),
                "--ready-file".into(),
                app_ready.display().to_string(),
            ],
            &logs.join(format!("{instance}-app.log")),
        )
        .map_err(io)?;
        let app_addr = wait_ready(&mut app, &app_ready, Duration::from_secs(30)).await?["addr"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        procs.push(app);
        proxy_args.extend([
            "--service".into(),
            format!("{svc}.default"),
            "--protocol".into(),
            "http".into(),
            "--inbound".into(),
            format!("{addr}:0"),
            "--app".into(),
            app_addr,
        ]);
    }
    if let Some(peer) = upstream {
        proxy_args.extend(["--upstream".into(), format!("{peer}.default={addr}:0")]);
    }
    let ready_file = workdir.join(format!("{instance}-proxy.ready"));
    let _ = std::fs::remove_file(&ready_file);
    proxy_args.extend(["--ready-file".into(), ready_file.display().to_string()]);
    let proxy_bin = sibling_binary("trellis-proxy")?;
    let mut proxy =
        Proc::spawn(&format!("{instance} proxy"), &proxy_bin, proxy_args, &logs.join(format!("{instance}-proxy.log")))
            .map_err(io)?;
    let ready = wait_ready(&mut proxy, &ready_file, Duration::from_secs(30)).await?;
    procs.push(proxy);
    let up = match upstream {
        Some(peer) => {
            let up = ready["upstreams"][format!("{peer}.default")].as_str().unwrap_or_default().to_string();
            if up.parse::<SocketAddr>().is_err() {
                return Err(format!("{instance} proxy did not report its {peer}.default listener: {ready}"));
            }
            Some(up)
        }
        None => None,
    };
    Ok((procs, up))
}

async fn start(workdir: &Path, n: usize, live: bool) -> Result<(Demo, Vec<Arc<Route>>), String> {
    let fed = start_federation(workdir, n, live).await?;
    // The services: with one cluster, web and api call each other; with several, each cluster runs
    // one exported service that calls the next cluster's, in a ring.
    let count = n.max(2);
    let mut others = Vec::new();
    let mut routes = Vec::new();
    for k in 0..count {
        let name = SERVICES[k];
        let peer = SERVICES[(k + 1) % count];
        let home = k % n;
        let cluster = &fed.clusters[home];
        let token_file = service_and_token(workdir, &fed.ctx, name, name, Some(n > 1)).await?;
        let instance = format!("{name}-1");
        let (procs, up) = start_workload(
            workdir,
            &cluster.home(),
            home,
            10 + k as u8,
            &fed.td,
            &token_file,
            &instance,
            name,
            Some(name),
            Some(peer),
        )
        .await?;
        others.extend(procs);
        routes.push(Arc::new(Route {
            name: format!("{name}@{} → {peer}.default", cluster.name),
            cluster: cluster.name.clone(),
            url: format!("http://{}/hello", up.unwrap_or_default()),
            expected_caller: format!("spiffe://{}/ns/default/sa/{name}", fed.td),
            stats: Mutex::new(RouteStats::default()),
        }));
    }
    others.extend(fed.gateways);
    let demo = Demo {
        workdir: workdir.to_path_buf(),
        clusters: fed.clusters,
        others,
        joins: fed.joins,
        gateway_admins: fed.gateway_admins,
        _context: fed.guard,
        ctx: fed.ctx,
    };
    Ok((demo, routes))
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn one_request(client: &HttpClient, route: &Route) -> Result<(Duration, serde_json::Value), String> {
    let req = hyper::Request::get(&route.url).body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .map_err(|_| "timed out after 5 s".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    let elapsed = start.elapsed();
    if !status.is_success() {
        return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body).chars().take(120).collect::<String>()));
    }
    let v = serde_json::from_slice(&body).map_err(|e| format!("bad body: {e}"))?;
    Ok((elapsed, v))
}

/// Waits until every route answers once (proxies have each other's endpoints).
async fn warm_up(client: &HttpClient, routes: &[Arc<Route>]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for r in routes {
        loop {
            match one_request(client, r).await {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => return Err(format!("{} never answered: {e}", r.name)),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    Ok(())
}

fn record(route: &Route, result: Result<(Duration, serde_json::Value), String>) {
    let mut s = route.stats.lock().unwrap_or_else(|p| p.into_inner());
    s.requests += 1;
    s.window += 1;
    match result {
        Ok((lat, body)) => {
            s.latencies_us.push(lat.as_micros().min(u128::from(u32::MAX)) as u32);
            let caller = body["caller"].as_str().unwrap_or_default().to_string();
            if caller == route.expected_caller {
                s.mtls_ok += 1;
            } else if s.unexpected_example.is_none() {
                s.unexpected_example = Some(body.clone());
            }
            s.served_by =
                format!("{}@{}", body["service"].as_str().unwrap_or("?"), body["cluster"].as_str().unwrap_or("?"));
            s.caller_seen = caller;
        }
        Err(e) => {
            s.failed += 1;
            s.last_error = e;
        }
    }
}

fn render(routes: &[Arc<Route>], elapsed: Duration, total: Option<u64>, clusters: usize, cp_state: &str) -> String {
    let mut rows = Vec::new();
    for r in routes {
        let mut s = r.stats.lock().unwrap_or_else(|p| p.into_inner());
        let mut sorted = s.latencies_us.clone();
        sorted.sort_unstable();
        rows.push(vec![
            r.name.clone(),
            s.requests.to_string(),
            s.failed.to_string(),
            s.window.to_string(),
            format!("{:.2}", percentile(&sorted, 0.5)),
            format!("{:.2}", percentile(&sorted, 0.99)),
            s.served_by.clone(),
            s.caller_seen.clone(),
        ]);
        s.window = 0;
    }
    let limit = total.map(|t| format!(" / {t}s")).unwrap_or_default();
    format!(
        "Trellis demo: {clusters} cluster{}, {} services, each with its proxy   {:.0}s{limit}\ncontrol planes: {cp_state}\n\n{}\n\
         Try in another terminal: trellis cluster list | trellis get controlplanes | trellis get endpoints | trellis status   (Ctrl-C stops)\n",
        if clusters == 1 { "" } else { "s" },
        routes.len(),
        elapsed.as_secs_f64(),
        table(&["ROUTE", "REQUESTS", "FAILED", "RPS", "P50 MS", "P99 MS", "SERVED BY", "CALLER SEEN BY SERVER"], &rows)
    )
}

/// Tunnels a gateway opened, from its metrics (0 if it does not answer).
fn tunnels_opened(admin: &str) -> u64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(admin) else { return 0 };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /metrics HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n\r\n").is_err() {
        return 0;
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with("trellis_gateway_tunnels_total") && l.contains("result=\"opened\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

pub(super) async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs the demo; returns the report (also printed).
pub async fn run(args: DemoArgs) -> Result<Report, String> {
    if args.clusters == 0 || usize::from(args.clusters) > CLUSTERS.len() {
        return Err(format!("--clusters {}: the demo runs 1 to {} clusters", args.clusters, CLUSTERS.len()));
    }
    if args.rate == 0 || args.rate > 20_000 {
        return Err("--rate must be between 1 and 20000 requests per second".into());
    }
    let workdir = std::env::temp_dir().join(format!("trellis-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&workdir);
    std::fs::create_dir_all(&workdir).map_err(|e| format!("cannot create {}: {e}", workdir.display()))?;
    let live = args.output == Format::Table;
    if live {
        println!(
            "Starting {} cluster{} (a control plane each), their services and proxies in {} ...",
            args.clusters,
            if args.clusters == 1 { "" } else { "s" },
            workdir.display()
        );
    }
    let started = start(&workdir, usize::from(args.clusters), live).await;
    let (mut demo, routes) = match started {
        Ok(x) => x,
        Err(e) => {
            let _ = if args.keep { Ok(()) } else { std::fs::remove_dir_all(&workdir) };
            return Err(e);
        }
    };
    let result = drive(&args, &mut demo, &routes, live).await;
    for p in demo.others.iter_mut().rev() {
        p.stop(Duration::from_secs(5)).await;
    }
    for c in demo.clusters.iter_mut().rev() {
        c.cp.stop(Duration::from_secs(5)).await;
    }
    let mut report = result?;
    if args.keep {
        report.workdir = Some(demo.workdir.clone());
    } else {
        let _ = std::fs::remove_dir_all(&demo.workdir);
    }
    Ok(report)
}

async fn drive(args: &DemoArgs, demo: &mut Demo, routes: &[Arc<Route>], live: bool) -> Result<Report, String> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(64).build(http);
    warm_up(&client, routes).await?;

    let start = Instant::now();
    let total = args.duration.map(Duration::from_secs);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut screen = tokio::time::interval(Duration::from_secs(1));
    let stop = stop_signal();
    tokio::pin!(stop);
    let inflight = Arc::new(tokio::sync::Semaphore::new(512));
    let mut tasks = tokio::task::JoinSet::new();
    let mut n: u64 = 0;
    let mut restarts = 0u32;
    let mut rotations = 0u32;
    let mut killed = false;
    let tty = std::io::stdout().is_terminal();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                if total.is_some_and(|t| start.elapsed() >= t) { break; }
                let route = routes[(n % routes.len() as u64) as usize].clone();
                n += 1;
                let client = client.clone();
                let Ok(permit) = inflight.clone().try_acquire_owned() else {
                    record(&route, Err("more than 512 requests in flight".into()));
                    continue;
                };
                tasks.spawn(async move {
                    let r = one_request(&client, &route).await;
                    record(&route, r);
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            _ = screen.tick() => {
                let secs = start.elapsed().as_secs();
                if let Some(at) = args.kill_controlplane_at && secs >= at && !killed {
                    demo.clusters[0].cp.kill().await;
                    killed = true;
                }
                if let Some(at) = args.restart_controlplane_at && secs >= at && killed && !demo.clusters[0].cp.running() {
                    demo.clusters[0].cp.start().map_err(|e| format!("cannot restart the control plane: {e}"))?;
                    restarts += 1;
                }
                if let Some(at) = args.rotate_root_at && secs >= at && rotations == 0 {
                    let mut admin = client::admin(&demo.ctx).map_err(|e| e.to_string())?;
                    admin
                        .rotate_root(pb::RotateRootRequest { finish: false, force: false })
                        .await
                        .map_err(|s| format!("root rotation: {}", client::from_status(&demo.ctx.server, s)))?;
                    rotations += 1;
                }
                let cp_state = demo
                    .clusters
                    .iter_mut()
                    .map(|c| {
                        let state = if c.cp.running() { "up" } else { "DOWN (its proxies serve on their last configuration)" };
                        format!("{} ({}) {state}", c.name, c.region)
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                let text = render(routes, start.elapsed(), args.duration, demo.clusters.len(), &cp_state);
                if live {
                    if tty { print!("\x1b[2J\x1b[H{text}"); } else { println!("{text}"); }
                }
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed();

    // Registrations as the control plane sees them now (after any restart).
    let mut endpoints_registered = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    if demo.clusters[0].cp.running() {
        let mut admin = client::admin(&demo.ctx).map_err(|e| e.to_string())?;
        loop {
            match admin.list_endpoints(pb::ListEndpointsRequest::default()).await {
                Ok(r) => {
                    endpoints_registered = r.into_inner().endpoints.iter().filter(|e| e.healthy).count();
                    if endpoints_registered >= routes.len() || Instant::now() > deadline {
                        break;
                    }
                }
                Err(_) if Instant::now() < deadline => {}
                Err(s) => return Err(client::from_status(&demo.ctx.server, s).to_string()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let mut all = Vec::new();
    let (mut requests, mut failed, mut mtls_ok) = (0, 0, 0);
    let mut route_reports = Vec::new();
    for r in routes {
        let s = r.stats.lock().unwrap_or_else(|p| p.into_inner());
        let mut sorted = s.latencies_us.clone();
        sorted.sort_unstable();
        route_reports.push(RouteReport {
            route: r.name.clone(),
            cluster: r.cluster.clone(),
            requests: s.requests,
            failed: s.failed,
            p50_ms: percentile(&sorted, 0.5),
            p99_ms: percentile(&sorted, 0.99),
            served_by: s.served_by.clone(),
            caller_seen: s.caller_seen.clone(),
            unexpected_caller: s.requests - s.failed - s.mtls_ok,
            unexpected_example: s.unexpected_example.clone(),
        });
        if s.failed > 0 {
            tracing::warn!(route = %r.name, error = %s.last_error, "requests failed");
        }
        requests += s.requests;
        failed += s.failed;
        mtls_ok += s.mtls_ok;
        all.extend(sorted);
    }
    all.sort_unstable();
    Ok(Report {
        clusters: args.clusters,
        duration_s: elapsed.as_secs_f64(),
        requests,
        failed,
        mtls: requests > 0 && mtls_ok == requests,
        unexpected_caller: requests - failed - mtls_ok,
        p50_ms: percentile(&all, 0.5),
        p90_ms: percentile(&all, 0.9),
        p99_ms: percentile(&all, 0.99),
        max_ms: all.last().map(|v| f64::from(*v) / 1000.0).unwrap_or(0.0),
        rps: requests as f64 / elapsed.as_secs_f64().max(0.001),
        controlplane_restarts: restarts,
        root_rotations: rotations,
        endpoints_registered,
        cross_cluster: demo.clusters.len() > 1
            && route_reports
                .iter()
                .all(|r| !r.served_by.is_empty() && !r.served_by.ends_with(&format!("@{}", r.cluster))),
        joins: demo.joins.clone(),
        gateway_tunnels: demo.gateway_admins.iter().map(|a| tunnels_opened(a)).sum(),
        routes: route_reports,
        workdir: None,
    })
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
