//! `proxy-latency`: HTTP/1.1 and HTTP/2 (gRPC-style) requests with 1 KiB bodies at fixed rates
//! over four paths, alternating: direct (the limit), two plain TCP relays (the floor of any two
//! sidecar processes), Trellis (client → proxy → mTLS → proxy → server) and HAProxy doing the
//! same two hops with mutual TLS between them. Reports latency added
//! over direct, CPU per 1,000 requests and peak RSS per proxy, and saturation throughput with
//! both proxies pinned to one core.

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

use crate::bench::load::{self, Proto, Samples};
use crate::bench::procstat::{cpu_seconds, peak_rss_mib, pin};
use crate::bench::report::Report;
use crate::bench::{haproxy, relay, upstream};
use crate::mesh::OneHop;

const SCENARIO: &str = "proxy-latency";

/// Options of the scenario.
#[derive(Debug, Clone)]
pub struct Opts {
    pub rates: Vec<u32>,
    pub duration: Duration,
    pub rounds: u32,
    pub conns: usize,
    pub protos: Vec<Proto>,
    pub saturation: Duration,
}

struct Path {
    name: &'static str,
    addr: String,
    /// Processes that do the proxying on this path, with a label each.
    pids: Vec<(&'static str, u32)>,
    samples: Samples,
    /// The p99 of each round at the current rate, µs.
    round_p99: Vec<f64>,
    /// CPU seconds of each process in `pids` at the current rate.
    cpu: Vec<f64>,
}

impl Path {
    fn new(name: &'static str, addr: String, pids: Vec<(&'static str, u32)>) -> Self {
        let cpu = vec![0.0; pids.len()];
        Self { name, addr, pids, samples: Samples::default(), round_p99: Vec::new(), cpu }
    }
}

/// Runs the scenario.
pub async fn run(opts: &Opts, report: &mut Report) -> anyhow::Result<()> {
    for &proto in &opts.protos {
        let dir = tempfile::tempdir()?;
        let app = upstream::http("127.0.0.1", 1024).await?.to_string();
        let app_proto = if proto == Proto::Http2 { "grpc" } else { "http" };
        let dir_path = dir.path().to_path_buf();
        let app2 = app.clone();
        let mesh = tokio::task::spawn_blocking(move || OneHop::start(&dir_path, &app2, app_proto)).await??;
        let ha = if haproxy::available() {
            let dir_path = dir.path().to_path_buf();
            let app2 = app.clone();
            Some(
                tokio::task::spawn_blocking(move || haproxy::start(&dir_path, &app2, "http", proto == Proto::Http2))
                    .await??,
            )
        } else {
            report.skipped(SCENARIO, "haproxy path: `haproxy` is not installed (Debian package haproxy)");
            None
        };
        let dir_path = dir.path().to_path_buf();
        let app2 = app.clone();
        let relays = tokio::task::spawn_blocking(move || relay::start(&dir_path, &app2)).await??;
        let mut paths = vec![
            Path::new("direct", app.clone(), vec![]),
            Path::new("relays", relays.entry.clone(), relays.pids()),
            Path::new(
                "trellis",
                mesh.outbound.clone(),
                vec![("client-proxy", mesh.client_proxy.pid()), ("server-proxy", mesh.server_proxy.pid())],
            ),
        ];
        if let Some(h) = &ha {
            paths.push(Path::new("haproxy", h.entry.clone(), h.pids()));
        }
        let body = Bytes::from(vec![b'y'; 1024]);
        for p in &paths {
            let warm = load::fixed_rate(&p.addr, proto, 500, Duration::from_secs(1), opts.conns, body.clone()).await?;
            anyhow::ensure!(warm.errors == 0 || warm.latencies_us.len() > 100, "{} path does not answer", p.name);
        }
        for &rate in &opts.rates {
            for p in &mut paths {
                p.samples = Samples::default();
                p.round_p99.clear();
                p.cpu.iter_mut().for_each(|c| *c = 0.0);
            }
            for _ in 0..opts.rounds {
                for p in &mut paths {
                    let before: Vec<f64> = p.pids.iter().map(|(_, pid)| cpu_seconds(*pid)).collect();
                    let s = load::fixed_rate(&p.addr, proto, rate, opts.duration, opts.conns, body.clone()).await?;
                    for (i, (_, pid)) in p.pids.iter().enumerate() {
                        p.cpu[i] += cpu_seconds(*pid) - before[i];
                    }
                    p.round_p99.push(s.percentile_us(0.99));
                    p.samples.merge(s);
                }
            }
            let direct = [0.5, 0.9, 0.99].map(|q| paths[0].samples.percentile_us(q));
            for p in &paths {
                let labels = |extra: serde_json::Value| {
                    let mut l = json!({"protocol": proto.label(), "rate": rate, "path": p.name});
                    if let (Some(m), Some(e)) = (l.as_object_mut(), extra.as_object()) {
                        m.extend(e.clone());
                    }
                    l
                };
                for (q, name) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99")] {
                    report.figure(
                        SCENARIO,
                        &format!("latency_{name}"),
                        labels(json!({})),
                        p.samples.percentile_us(q),
                        "us",
                    );
                }
                // A p99 over several rounds can be one bad round's: the spread tells a steady tail
                // from an episode.
                let (lo, hi) = p.round_p99.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
                if lo.is_finite() {
                    report.figure(SCENARIO, "latency_p99_best_round", labels(json!({})), lo, "us");
                    report.figure(SCENARIO, "latency_p99_worst_round", labels(json!({})), hi, "us");
                }
                report.figure(SCENARIO, "achieved_rps", labels(json!({})), p.samples.rps(), "req/s");
                report.figure(SCENARIO, "errors", labels(json!({})), p.samples.errors as f64, "requests");
                if p.name != "direct" {
                    for (i, name) in ["p50", "p90", "p99"].iter().enumerate() {
                        let added = p.samples.percentile_us([0.5, 0.9, 0.99][i]) - direct[i];
                        report.figure(SCENARIO, &format!("added_{name}_over_direct"), labels(json!({})), added, "us");
                    }
                }
                let requests = p.samples.latencies_us.len() as f64;
                for (i, (who, _)) in p.pids.iter().enumerate() {
                    let l = labels(json!({"process": who}));
                    report.figure(
                        SCENARIO,
                        "cpu_seconds_per_1000_requests",
                        l.clone(),
                        p.cpu[i] / requests.max(1.0) * 1000.0,
                        "s",
                    );
                    report.figure(
                        SCENARIO,
                        "cpu_cores",
                        l,
                        p.cpu[i] / p.samples.elapsed.as_secs_f64().max(1e-9),
                        "cores",
                    );
                }
            }
        }
        for p in &paths {
            for (who, pid) in &p.pids {
                report.figure(
                    SCENARIO,
                    "peak_rss",
                    json!({"protocol": proto.label(), "path": p.name, "process": who}),
                    peak_rss_mib(*pid),
                    "MiB",
                );
            }
        }
        if !opts.saturation.is_zero() {
            // Both proxies (or relays, or HAProxy processes) on core 0, the load generator on core 1.
            let me = std::process::id();
            pin(me, "1")?;
            for p in paths.iter().filter(|p| p.name != "direct") {
                for (_, pid) in &p.pids {
                    pin(*pid, "0")?;
                }
                let before: f64 = p.pids.iter().map(|(_, pid)| cpu_seconds(*pid)).sum();
                let s = load::saturate(&p.addr, proto, opts.saturation, 64, body.clone()).await?;
                let used: f64 = p.pids.iter().map(|(_, pid)| cpu_seconds(*pid)).sum::<f64>() - before;
                report.figure(
                    SCENARIO,
                    "saturation_rps_one_core",
                    json!({"protocol": proto.label(), "path": p.name}),
                    s.rps(),
                    "req/s",
                );
                // Below ~0.95 the core was not the limit: the load generator (on the other core)
                // or the server was, and the figure is a lower bound for that path.
                let core_use = used / s.elapsed.as_secs_f64().max(1e-9);
                report.figure(
                    SCENARIO,
                    "saturation_core_use",
                    json!({"protocol": proto.label(), "path": p.name}),
                    core_use,
                    "cores",
                );
                // Requests per CPU second of the pinned processes: the throughput of one whole
                // core, read off a run that another limit kept below it.
                if core_use > 0.0 {
                    report.figure(
                        SCENARIO,
                        "saturation_rps_per_core",
                        json!({"protocol": proto.label(), "path": p.name}),
                        s.rps() / core_use,
                        "req/s",
                    );
                }
                for (_, pid) in &p.pids {
                    pin(*pid, "0-1")?;
                }
            }
            pin(me, "0-1")?;
        }
        drop(ha);
        drop(relays);
        drop(mesh);
    }
    Ok(())
}
