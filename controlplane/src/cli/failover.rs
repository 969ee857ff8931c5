//! `trellis demo --scenario failover`: the reason to run a multi-cluster mesh, told live. Three
//! clusters (a bootstraps, b and c join with a token), each with an east-west gateway; a and b
//! share a region, c is in another. `api` runs in all three; `web` in cluster a calls
//! `api.default` at a steady rate and its proxy prefers a's instance. Then every backend of `api`
//! in a is killed (SIGKILL): the calls move to b, the nearest other cluster, through b's gateway
//! (retried there when the dying instance fails them). Then b's gateway is killed: the calls move
//! to c. b's gateway comes back, and the calls with it; a's backend comes back, and the calls
//! return to a. The table shows who serves each second; the report gives `failed`,
//! `failover_ms`, `failback_ms` and the same for the gateway.

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

use super::demo::{DemoArgs, service_and_token, start_federation, start_gateway, start_workload, stop_signal};
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
    /// From killing a's backends to the first request b served (every request completes, the
    /// ones in flight at the kill retried on b).
    pub failover_to_b_ms: Option<f64>,
    /// From a's backend being ready again to the first request it served.
    pub failback_ms: Option<f64>,
    /// From killing b's gateway to the last request b served through it (None: not killed).
    pub gateway_failover_ms: Option<f64>,
    /// From killing b's gateway to the first request c served.
    pub gateway_failover_to_c_ms: Option<f64>,
    /// From b's new gateway being ready to the first request b served again.
    pub gateway_failback_ms: Option<f64>,
    /// Requests served by a while its backends were down, after the first second (must be 0).
    pub served_by_a_while_down: u64,
    /// Requests served by b while its gateway was down, after the first second (must be 0).
    pub served_by_b_while_gateway_down: u64,
    /// What happened in each phase.
    pub phases: Vec<PhaseReport>,
    pub duration_s: f64,
    pub workdir: Option<PathBuf>,
}

/// Requests of one phase of the scenario.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub phase: String,
    /// Seconds into the run when it began.
    pub from_s: f64,
    pub requests: u64,
    pub served_by: BTreeMap<String, u64>,
    pub failed: u64,
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

/// The events of the run, checked against each other.
fn timeline(args: &DemoArgs) -> Result<Vec<(u64, Event)>, String> {
    let mut events = vec![(args.kill_backends_at, Event::KillBackends)];
    if args.kill_gateway_at > 0 {
        events.push((args.kill_gateway_at, Event::KillGateway));
        events.push((args.restore_gateway_at, Event::RestoreGateway));
    }
    events.push((args.restore_backends_at, Event::RestoreBackends));
    if events.windows(2).any(|w| w[0].0 >= w[1].0) {
        return Err(if args.kill_gateway_at > 0 {
            "the failover steps must come in this order: --kill-backends-at < --kill-gateway-at < \
             --restore-gateway-at < --restore-backends-at (or --kill-gateway-at 0 to keep b's gateway)"
                .into()
        } else {
            "--kill-backends-at must come before --restore-backends-at".into()
        });
    }
    Ok(events)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    KillBackends,
    KillGateway,
    RestoreGateway,
    RestoreBackends,
}

impl Event {
    /// The phase that begins with this event.
    fn phase(self) -> &'static str {
        match self {
            Event::KillBackends => "a's backends killed",
            Event::KillGateway => "b's gateway killed too",
            Event::RestoreGateway => "b's gateway back",
            Event::RestoreBackends => "a's backends back",
        }
    }
}

/// Runs the scenario; returns its report.
pub async fn run(args: &DemoArgs) -> Result<FailoverReport, String> {
    let events = timeline(args)?;
    let total = Duration::from_secs(args.duration.unwrap_or(args.restore_backends_at + 5));
    let workdir = std::env::temp_dir().join(format!("trellis-demo-failover-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&workdir);
    std::fs::create_dir_all(&workdir).map_err(|e| format!("cannot create {}: {e}", workdir.display()))?;
    let live = args.output == Format::Table;
    if live {
        println!(
            "Starting three clusters with a gateway each (a and b in one region, c in another), api in all three, \
             web in a, in {} ...",
            workdir.display()
        );
    }
    let result = scenario(args, &events, &workdir, total, live).await;
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

/// When each event happened: begun, and (for restores) ready.
#[derive(Debug, Default, Clone, Copy)]
struct Marks {
    backends_killed: Option<Instant>,
    gateway_killed: Option<Instant>,
    gateway_restarting: Option<Instant>,
    gateway_ready: Option<Instant>,
    backends_restarting: Option<Instant>,
    backends_ready: Option<Instant>,
}

/// From `from` to the last request `cluster` served before `until` (0 when none after `from`).
fn last_served(o: &[Outcome], cluster: &str, from: Instant, until: Instant) -> f64 {
    o.iter()
        .filter(|(t, s)| *t > from && *t < until && s.as_deref() == Some(cluster))
        .map(|(t, _)| t.duration_since(from).as_secs_f64() * 1000.0)
        .fold(0.0, f64::max)
}

/// From `ready` to the first request `cluster` served after `began` (0 when it served one before
/// `ready` was seen).
fn first_served(o: &[Outcome], cluster: &str, began: Instant, ready: Instant) -> Option<f64> {
    o.iter()
        .find(|(t, s)| *t >= began && s.as_deref() == Some(cluster))
        .map(|(t, _)| t.saturating_duration_since(ready).as_secs_f64() * 1000.0)
}

/// Requests `cluster` served between `from` + 1 s (in flight at the event, or just after) and
/// `until`.
fn served_late(o: &[Outcome], cluster: &str, from: Instant, until: Instant) -> u64 {
    let from = from + Duration::from_secs(1);
    o.iter().filter(|(t, s)| *t > from && *t < until && s.as_deref() == Some(cluster)).count() as u64
}

type Restore = tokio::task::JoinHandle<(Instant, Result<Vec<Proc>, String>)>;

async fn scenario(
    args: &DemoArgs,
    events: &[(u64, Event)],
    workdir: &std::path::Path,
    total: Duration,
    live: bool,
) -> Result<FailoverReport, String> {
    let mut fed = start_federation(workdir, 3, live).await?;
    let mut procs: Vec<Proc> = Vec::new();
    let api_token = service_and_token(workdir, &fed.ctx, "api", "api", Some(true)).await?;
    let web_token = service_and_token(workdir, &fed.ctx, "web", "web", None).await?;
    for (i, name) in [(1, "api-b"), (2, "api-c")] {
        let (p, _) = start_workload(
            workdir,
            &fed.clusters[i].home(),
            i,
            10,
            &fed.td,
            &api_token,
            name,
            "api",
            Some("api"),
            None,
        )
        .await?;
        procs.extend(p);
    }
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
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut screen = tokio::time::interval(Duration::from_secs(1));
    let stop = stop_signal();
    tokio::pin!(stop);
    let mut tasks = tokio::task::JoinSet::new();
    let mut pending = events.iter().copied().peekable();
    let mut marks = Marks::default();
    let mut phases: Vec<(String, Instant)> = vec![("a serving".into(), start)];
    let (mut restoring_backends, mut restoring_gateway): (Option<Restore>, Option<Restore>) = (None, None);
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
                // The second that just ended, under the phase it ran in (the first tick comes at once).
                if now >= Duration::from_millis(500) {
                    let o = outcomes.lock().unwrap_or_else(|p| p.into_inner());
                    let window = &o[last_len..];
                    last_len = o.len();
                    let count = |c: &str| window.iter().filter(|(_, s)| s.as_deref() == Some(c)).count().to_string();
                    let failed = window.iter().filter(|(_, s)| s.is_none()).count();
                    let phase = phases.last().map(|(p, _)| p.clone()).unwrap_or_default();
                    rows.push(vec![format!("{}-{}", now.as_secs().saturating_sub(1), now.as_secs()), phase, window.len().to_string(), count("a"), count("b"), count("c"), failed.to_string()]);
                    if live {
                        let text = format!(
                            "Trellis demo: failover between clusters   {:.0}s / {}s\n\n{}\n",
                            now.as_secs_f64(), total.as_secs(),
                            table(&["SECONDS", "PHASE", "REQUESTS", "SERVED BY A", "BY B (SAME REGION)", "BY C (OTHER REGION)", "FAILED"], &rows)
                        );
                        if tty { print!("\x1b[2J\x1b[H{text}"); } else { println!("{text}"); }
                    }
                }
                while let Some(&(at, event)) = pending.peek() && now >= Duration::from_secs(at) {
                    pending.next();
                    let when = Instant::now();
                    phases.push((event.phase().to_string(), when));
                    match event {
                        Event::KillBackends => {
                            for p in in_a.iter_mut() { p.kill().await; }
                            marks.backends_killed = Some(when);
                        }
                        Event::KillGateway => {
                            fed.gateways[1].kill().await;
                            marks.gateway_killed = Some(when);
                        }
                        Event::RestoreGateway => {
                            let (dir, ctx) = (workdir.to_path_buf(), fed.ctx.clone());
                            let b = fed.clusters[1].home();
                            marks.gateway_restarting = Some(when);
                            restoring_gateway = Some(tokio::spawn(async move {
                                let r = start_gateway(&dir, 1, &b, &ctx).await.map(|(p, _)| vec![p]);
                                (Instant::now(), r)
                            }));
                        }
                        Event::RestoreBackends => {
                            let (dir, home, td, token) = (workdir.to_path_buf(), fed.clusters[0].home(), fed.td.clone(), api_token.clone());
                            marks.backends_restarting = Some(when);
                            restoring_backends = Some(tokio::spawn(async move {
                                let r = start_workload(&dir, &home, 0, 10, &td, &token, "api-a", "api", Some("api"), None).await;
                                (Instant::now(), r.map(|(p, _)| p))
                            }));
                        }
                    }
                }
                for (slot, mark) in [(&mut restoring_gateway, &mut marks.gateway_ready), (&mut restoring_backends, &mut marks.backends_ready)] {
                    if mark.is_none() && slot.as_ref().is_some_and(|h| h.is_finished()) && let Some(h) = slot.take() {
                        match h.await {
                            Ok((at, Ok(p))) => { *mark = Some(at); procs.extend(p); }
                            Ok((_, Err(e))) => return Err(e),
                            Err(e) => return Err(format!("restart task failed: {e}")),
                        }
                    }
                }
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    for (slot, mark) in [(restoring_gateway, &mut marks.gateway_ready), (restoring_backends, &mut marks.backends_ready)]
    {
        if let Some(h) = slot
            && let Ok((at, result)) = h.await
        {
            *mark = Some(at);
            procs.extend(result?);
        }
    }
    let elapsed = start.elapsed();
    let end = Instant::now();
    let o = outcomes.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let tally = |from: Instant, until: Instant| {
        let mut served_by = BTreeMap::new();
        let mut n = 0;
        let mut failed = 0;
        for (_, s) in o.iter().filter(|(t, _)| *t >= from && *t < until) {
            n += 1;
            match s {
                Some(c) => *served_by.entry(c.clone()).or_insert(0u64) += 1,
                None => failed += 1,
            }
        }
        (n, served_by, failed)
    };
    let (requests, served_by, failed) = tally(start, end);
    let phase_reports = phases
        .iter()
        .enumerate()
        .map(|(i, (phase, from))| {
            let until = phases.get(i + 1).map(|(_, t)| *t).unwrap_or(end);
            let (requests, served_by, failed) = tally(*from, until);
            PhaseReport {
                phase: phase.clone(),
                from_s: from.duration_since(start).as_secs_f64(),
                requests,
                served_by,
                failed,
            }
        })
        .collect();
    let a_down_until = marks.backends_restarting.unwrap_or(end);
    let gw_down_until = marks.gateway_restarting.unwrap_or(end);
    let report = FailoverReport {
        requests,
        failed,
        served_by,
        failover_ms: marks.backends_killed.map(|k| last_served(&o, "a", k, a_down_until)).unwrap_or(0.0),
        failover_to_b_ms: marks.backends_killed.and_then(|k| first_served(&o, "b", k, k)),
        gateway_failover_to_c_ms: marks.gateway_killed.and_then(|k| first_served(&o, "c", k, k)),
        failback_ms: marks
            .backends_restarting
            .zip(marks.backends_ready)
            .and_then(|(began, ready)| first_served(&o, "a", began, ready)),
        gateway_failover_ms: marks.gateway_killed.map(|k| last_served(&o, "b", k, gw_down_until)),
        // b serves again once its gateway is back, unless a's backends are back already.
        gateway_failback_ms: marks
            .gateway_restarting
            .zip(marks.gateway_ready)
            .and_then(|(began, ready)| first_served(&o, "b", began, ready)),
        served_by_a_while_down: marks.backends_killed.map(|k| served_late(&o, "a", k, a_down_until)).unwrap_or(0),
        served_by_b_while_gateway_down: marks
            .gateway_killed
            .map(|k| served_late(&o, "b", k, gw_down_until))
            .unwrap_or(0),
        phases: phase_reports,
        duration_s: elapsed.as_secs_f64(),
        workdir: None,
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
    Ok(report)
}
