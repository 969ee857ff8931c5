//! `trellis demo --scenario failover`: the reason to run a multi-cluster mesh, told live. Two
//! clusters (a bootstraps, b joins with a token), each with an east-west gateway; `api` runs in
//! both; `web` in cluster a calls `api.default` at a steady rate and its proxy prefers a's
//! instance. Then every backend of `api` in a is killed (SIGKILL): the calls move to b through
//! b's gateway, retried there when the dying instance fails them; then a's backend comes back and
//! the calls return to it. The table shows who serves each second; the report gives `failed`,
//! `failover_ms` and `failback_ms`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use super::demo::{DemoArgs, service_and_token, start_federation, start_workload, stop_signal};
use super::output::{Format, table};
use super::procs::Proc;

/// Final report of the failover scenario.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    pub requests: u64,
    pub failed: u64,
    /// Requests served by each cluster.
    pub served_by: BTreeMap<String, u64>,
    /// From killing a's backends to the last request a served (0: none after the kill).
    pub failover_ms: f64,
    /// From a's backend being ready again to the first request it served.
    pub failback_ms: Option<f64>,
    /// Requests served by a while its backends were down (must be 0).
    pub served_by_a_while_down: u64,
    pub duration_s: f64,
    pub workdir: Option<PathBuf>,
}

/// One request: when it ended, and who served it (None: failed).
type Outcome = (Instant, Option<String>);

async fn one(client: &Client<HttpConnector, Full<Bytes>>, url: &str) -> Option<String> {
    let req = hyper::Request::get(url).body(Full::new(Bytes::new())).ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req)).await.ok()?.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v["cluster"].as_str().map(str::to_string)
}

/// Runs the scenario; returns its report.
pub async fn run(args: &DemoArgs) -> Result<FailoverReport, String> {
    if args.kill_backends_at >= args.restore_backends_at {
        return Err("--kill-backends-at must come before --restore-backends-at".into());
    }
    let total = Duration::from_secs(args.duration.unwrap_or(args.restore_backends_at + 5));
    let workdir = std::env::temp_dir().join(format!("trellis-demo-failover-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&workdir);
    std::fs::create_dir_all(&workdir).map_err(|e| format!("cannot create {}: {e}", workdir.display()))?;
    let live = args.output == Format::Table;
    if live {
        println!("Starting two clusters with a gateway each, api in both, web in a, in {} ...", workdir.display());
    }
    let result = scenario(args, &workdir, total, live).await;
    match result {
        Ok(mut r) => {
            if args.keep {
                r.workdir = Some(workdir);
            } else {
                let _ = std::fs::remove_dir_all(&workdir);
            }
            Ok(r)
        }
        Err(e) => {
            if !args.keep {
                let _ = std::fs::remove_dir_all(&workdir);
            }
            Err(e)
        }
    }
}

async fn scenario(
    args: &DemoArgs,
    workdir: &std::path::Path,
    total: Duration,
    live: bool,
) -> Result<FailoverReport, String> {
    let fed = start_federation(workdir, 2, live).await?;
    let mut procs: Vec<Proc> = Vec::new();
    let api_token = service_and_token(workdir, &fed.ctx, "api", "api", Some(true)).await?;
    let web_token = service_and_token(workdir, &fed.ctx, "web", "web", None).await?;
    let (in_b, _) =
        start_workload(workdir, &fed.clusters[1].home(), 1, 10, &fed.td, &api_token, "api-b", "api", Some("api"), None)
            .await?;
    procs.extend(in_b);
    let (mut in_a, _) =
        start_workload(workdir, &fed.clusters[0].home(), 0, 10, &fed.td, &api_token, "api-a", "api", Some("api"), None)
            .await?;
    let (web, up) =
        start_workload(workdir, &fed.clusters[0].home(), 0, 20, &fed.td, &web_token, "web-a", "web", None, Some("api"))
            .await?;
    procs.extend(web);
    let url = format!("http://{}/hello", up.unwrap_or_default());

    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(64).build(http);
    let warm = Instant::now();
    while one(&client, &url).await.as_deref() != Some("a") {
        if warm.elapsed() > Duration::from_secs(30) {
            return Err("web@a never reached api in cluster a".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let start = Instant::now();
    let kill_at = Duration::from_secs(args.kill_backends_at);
    let restore_at = Duration::from_secs(args.restore_backends_at);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut screen = tokio::time::interval(Duration::from_secs(1));
    let stop = stop_signal();
    tokio::pin!(stop);
    let mut tasks = tokio::task::JoinSet::new();
    let (mut killed, mut restoring): (Option<Instant>, Option<tokio::task::JoinHandle<_>>) = (None, None);
    let mut back: Option<Instant> = None;
    let mut restore_started: Option<Instant> = None;
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut last_len = 0;
    let tty = std::io::stdout().is_terminal();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                if start.elapsed() >= total { break; }
                let (client, url, outcomes) = (client.clone(), url.clone(), outcomes.clone());
                tasks.spawn(async move {
                    let served = one(&client, &url).await;
                    outcomes.lock().unwrap_or_else(|p| p.into_inner()).push((Instant::now(), served));
                });
                while tasks.try_join_next().is_some() {}
            }
            _ = screen.tick() => {
                let now = start.elapsed();
                if killed.is_none() && now >= kill_at {
                    for p in in_a.iter_mut() { p.kill().await; }
                    killed = Some(Instant::now());
                }
                if restoring.is_none() && now >= restore_at {
                    let (dir, cluster, td, token) = (workdir.to_path_buf(), fed.clusters[0].home(), fed.td.clone(), api_token.clone());
                    restore_started = Some(Instant::now());
                    restoring = Some(tokio::spawn(async move {
                        let r = start_workload(&dir, &cluster, 0, 10, &td, &token, "api-a", "api", Some("api"), None).await;
                        (Instant::now(), r)
                    }));
                }
                if let Some(h) = &restoring && back.is_none() && h.is_finished() {
                    back = restore_started;
                }
                let o = outcomes.lock().unwrap_or_else(|p| p.into_inner());
                let window = &o[last_len..];
                last_len = o.len();
                let count = |c: &str| window.iter().filter(|(_, s)| s.as_deref() == Some(c)).count();
                let failed = window.iter().filter(|(_, s)| s.is_none()).count();
                let phase = match (killed, back) {
                    (None, _) => "a's backend serving".to_string(),
                    (Some(_), None) => "every backend in a killed".to_string(),
                    (Some(_), Some(_)) => "a's backend back".to_string(),
                };
                rows.push(vec![format!("{}", now.as_secs()), phase, window.len().to_string(), count("a").to_string(), count("b").to_string(), failed.to_string()]);
                if live {
                    let text = format!(
                        "Trellis demo: failover between clusters   {:.0}s / {}s\n\n{}\n",
                        now.as_secs_f64(), total.as_secs(),
                        table(&["T (S)", "PHASE", "REQUESTS", "SERVED BY A", "SERVED BY B (THROUGH ITS GATEWAY)", "FAILED"], &rows)
                    );
                    if tty { print!("\x1b[2J\x1b[H{text}"); } else { println!("{text}"); }
                }
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let mut ready_at = None;
    if let Some(h) = restoring
        && let Ok((at, result)) = h.await
    {
        ready_at = Some(at);
        if let Ok((p, _)) = result {
            in_a = p;
        }
    }
    let elapsed = start.elapsed();
    let o = outcomes.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut served_by = BTreeMap::new();
    for (_, s) in &o {
        if let Some(c) = s {
            *served_by.entry(c.clone()).or_insert(0u64) += 1;
        }
    }
    let failed = o.iter().filter(|(_, s)| s.is_none()).count() as u64;
    let (failover_ms, down) = match killed {
        Some(k) => {
            // a's backends are down from the kill until their restart begins.
            let until = restore_started.unwrap_or_else(Instant::now);
            let during: Vec<&Outcome> = o.iter().filter(|(t, _)| *t > k && *t < until).collect();
            let last_a = during.iter().rev().find(|(_, s)| s.as_deref() == Some("a")).map(|(t, _)| *t);
            // Requests that were in flight at the kill may still complete from a: count those
            // within the first second as the failover, anything later as served while down.
            let late = during
                .iter()
                .filter(|(t, s)| s.as_deref() == Some("a") && t.duration_since(k) > Duration::from_secs(1))
                .count();
            (last_a.map(|t| t.duration_since(k).as_secs_f64() * 1000.0).unwrap_or(0.0), late as u64)
        }
        None => (0.0, 0),
    };
    // From the restarted backend being ready (its proxy registered) to the first request it served
    // (0 when it served one before the ready file was read).
    let failback_ms = match (restore_started, ready_at) {
        (Some(r), Some(ready)) => o
            .iter()
            .find(|(t, s)| *t >= r && s.as_deref() == Some("a"))
            .map(|(t, _)| t.saturating_duration_since(ready).as_secs_f64() * 1000.0),
        _ => None,
    };
    drop(in_a);
    for mut p in procs.into_iter().rev() {
        p.stop(Duration::from_secs(5)).await;
    }
    for mut g in fed.gateways {
        g.stop(Duration::from_secs(5)).await;
    }
    for mut c in fed.clusters {
        c.cp.stop(Duration::from_secs(5)).await;
    }
    drop(fed.guard);
    Ok(FailoverReport {
        requests: o.len() as u64,
        failed,
        served_by,
        failover_ms,
        failback_ms,
        served_by_a_while_down: down,
        duration_s: elapsed.as_secs_f64(),
        workdir: None,
    })
}
