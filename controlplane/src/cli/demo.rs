//! `trellis demo`: a whole mesh on this machine. It starts a control plane and two sample
//! services (`web`, `api`), each with its own proxy, links them through the control plane, sends
//! steady traffic through the proxies (web → api and api → web, over mTLS) and shows a live table.
//! With `--duration` it stops by itself; `-o json` prints one final report. While it runs, the
//! `trellis-demo` context is current, so `trellis get endpoints` in another terminal talks to it.

use std::collections::BTreeMap;
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

/// Options of `trellis demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Number of clusters. One cluster today; several arrive with federation (join tokens).
    #[arg(long, default_value_t = 1)]
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
    /// Kill the control plane (SIGKILL) this many seconds into the run, to show traffic goes on.
    #[arg(long)]
    pub kill_controlplane_at: Option<u64>,
    /// Restart the killed control plane this many seconds into the run.
    #[arg(long, requires = "kill_controlplane_at")]
    pub restart_controlplane_at: Option<u64>,
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
    /// Healthy endpoints known to the control plane at the end.
    pub endpoints_registered: usize,
    pub routes: Vec<RouteReport>,
    pub workdir: Option<PathBuf>,
}

/// Figures of one route.
#[derive(Debug, Clone, Serialize)]
pub struct RouteReport {
    pub route: String,
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
struct ContextGuard {
    path: PathBuf,
    previous: Option<String>,
    name: String,
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

struct Demo {
    workdir: PathBuf,
    cp: Proc,
    others: Vec<Proc>,
    _context: ContextGuard,
    ctx: crate::context::Context,
}

async fn start(workdir: &Path) -> Result<(Demo, Vec<Arc<Route>>), String> {
    let cp_bin = sibling_binary("trellis-cp")?;
    let proxy_bin = sibling_binary("trellis-proxy")?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let logs = workdir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    let io = |e: std::io::Error| e.to_string();

    // Cluster "a" lives on the loopback block 127.0.1.0/24. Every listener binds port 0 and reports
    // the port it got; a restarted control plane reuses its port so proxies find it again.
    let cp_dir = workdir.join("cp-a");
    let cp_ready = workdir.join("cp-a.ready");
    let cp_args = vec![
        "--data-dir".into(),
        cp_dir.display().to_string(),
        "--listen".into(),
        "127.0.1.1:0".into(),
        "--cluster".into(),
        "a".into(),
        "--region".into(),
        "local".into(),
        "--node".into(),
        "cp-1".into(),
        "--ready-file".into(),
        cp_ready.display().to_string(),
    ];
    let mut cp = Proc::spawn("trellis-cp", &cp_bin, cp_args, &logs.join("cp-a.log")).map_err(io)?;
    let ready = wait_ready(&mut cp, &cp_ready, Duration::from_secs(30)).await?;
    let cp_addr = ready["grpc"].as_str().unwrap_or_default().to_string();
    if let Some(listen) = cp.args.iter().position(|a| a == "--listen") {
        cp.args[listen + 1] = cp_addr.clone();
    }
    let admin_ctx = PathBuf::from(ready["admin_context"].as_str().unwrap_or_default());
    let bundle = PathBuf::from(ready["trust_bundle"].as_str().unwrap_or_default());
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
    let mut others = Vec::new();
    let mut routes = Vec::new();
    let services = [("web", "127.0.1.2", "api"), ("api", "127.0.1.3", "web")];
    let mut outbound: BTreeMap<&str, String> = BTreeMap::new();
    for (name, ip, peer) in services {
        let token = admin
            .create_workload_token(pb::CreateWorkloadTokenRequest {
                namespace: "default".into(),
                service_account: name.into(),
                ttl_seconds: 3600,
                description: "trellis demo".into(),
            })
            .await
            .map_err(|s| client::from_status(&ctx.server, s).to_string())?
            .into_inner()
            .token;
        let token_file = workdir.join(format!("{name}.token"));
        write_private(&token_file, token.as_bytes()).map_err(io)?;
        let app_ready = workdir.join(format!("{name}-app.ready"));
        let mut app = Proc::spawn(
            &format!("{name} app"),
            &me,
            vec![
                "demo-app".into(),
                "--name".into(),
                name.into(),
                "--cluster".into(),
                "a".into(),
                "--listen".into(),
                format!("{ip}:0"),
                "--ready-file".into(),
                app_ready.display().to_string(),
            ],
            &logs.join(format!("{name}-app.log")),
        )
        .map_err(io)?;
        let app_addr = wait_ready(&mut app, &app_ready, Duration::from_secs(30)).await?["addr"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        others.push(app);
        let ready_file = workdir.join(format!("{name}-proxy.ready"));
        let proxy_args = vec![
            "--control-plane".into(),
            cp_addr.clone(),
            "--trust-bundle".into(),
            bundle.display().to_string(),
            "--trust-domain".into(),
            td.clone(),
            "--token-file".into(),
            token_file.display().to_string(),
            "--namespace".into(),
            "default".into(),
            "--service-account".into(),
            name.into(),
            "--cluster".into(),
            "a".into(),
            "--zone".into(),
            "a-1".into(),
            "--instance".into(),
            format!("{name}-1"),
            "--service".into(),
            format!("{name}.default"),
            "--protocol".into(),
            "http".into(),
            "--inbound".into(),
            format!("{ip}:0"),
            "--app".into(),
            app_addr.clone(),
            "--upstream".into(),
            format!("{peer}.default={ip}:0"),
            "--ready-file".into(),
            ready_file.display().to_string(),
        ];
        let mut proxy =
            Proc::spawn(&format!("{name} proxy"), &proxy_bin, proxy_args, &logs.join(format!("{name}-proxy.log")))
                .map_err(io)?;
        let ready = wait_ready(&mut proxy, &ready_file, Duration::from_secs(30)).await?;
        let up = ready["upstreams"][format!("{peer}.default")].as_str().unwrap_or_default().to_string();
        if up.parse::<SocketAddr>().is_err() {
            return Err(format!("{name} proxy did not report its {peer}.default listener: {ready}"));
        }
        outbound.insert(name, up.clone());
        others.push(proxy);
        routes.push(Arc::new(Route {
            name: format!("{name} → {peer}.default"),
            url: format!("http://{up}/hello"),
            expected_caller: format!("spiffe://{td}/ns/default/sa/{name}"),
            stats: Mutex::new(RouteStats::default()),
        }));
    }
    Ok((Demo { workdir: workdir.to_path_buf(), cp, others, _context: guard, ctx }, routes))
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

fn render(routes: &[Arc<Route>], elapsed: Duration, total: Option<u64>, cp_state: &str) -> String {
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
        "Trellis demo: 1 cluster, 2 services, each with its proxy   {:.0}s{limit}   control plane: {cp_state}\n\n{}\n\
         Try in another terminal: trellis get endpoints | trellis get proxies | trellis status   (Ctrl-C stops)\n",
        elapsed.as_secs_f64(),
        table(&["ROUTE", "REQUESTS", "FAILED", "RPS", "P50 MS", "P99 MS", "SERVED BY", "CALLER SEEN BY SERVER"], &rows)
    )
}

async fn stop_signal() {
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
    if args.clusters != 1 {
        return Err(format!(
            "--clusters {}: this build runs one cluster; linking several clusters with join tokens is not available yet. Use --clusters 1",
            args.clusters
        ));
    }
    if args.rate == 0 || args.rate > 20_000 {
        return Err("--rate must be between 1 and 20000 requests per second".into());
    }
    let workdir = std::env::temp_dir().join(format!("trellis-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&workdir);
    std::fs::create_dir_all(&workdir).map_err(|e| format!("cannot create {}: {e}", workdir.display()))?;
    let live = args.output == Format::Table;
    if live {
        println!("Starting a control plane, two services and their proxies in {} ...", workdir.display());
    }
    let started = start(&workdir).await;
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
    demo.cp.stop(Duration::from_secs(5)).await;
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
                    demo.cp.kill().await;
                    killed = true;
                }
                if let Some(at) = args.restart_controlplane_at && secs >= at && killed && !demo.cp.running() {
                    demo.cp.start().map_err(|e| format!("cannot restart the control plane: {e}"))?;
                    restarts += 1;
                }
                let cp_state = if demo.cp.running() { format!("up (pid {})", demo.cp.pid().unwrap_or(0)) } else { "DOWN: proxies serve on their last configuration".into() };
                let text = render(routes, start.elapsed(), args.duration, &cp_state);
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
    if demo.cp.running() {
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
        endpoints_registered,
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
