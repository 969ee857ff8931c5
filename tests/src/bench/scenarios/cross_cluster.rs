//! `cross-cluster`: the path through another cluster's east-west gateway, next to the same
//! call inside the cluster and the direct call, alternating in one run. Two clusters on this
//! machine (A bootstraps, B joins and runs a gateway); one application serves `near.default`
//! (its server proxy in A) and `far.default` (its server proxy in B); a client proxy in A calls
//! both (`crate::mesh::TwoClusters`).
//!
//! - HTTP/1.1 at a fixed rate with 1 KiB bodies: p50, p90, p99 per path, and what the
//!   cross-cluster path adds over the in-cluster one (the gateway's cost: an mTLS HTTP/2 hop and
//!   a splice; both ends' mTLS are the same on both paths).
//! - New connections through a warm tunnel: opaque TCP (a connection per client connection, so a
//!   new `CONNECT` on the pooled gateway connection plus the inner mTLS handshake), one byte
//!   echoed; the cross-cluster time minus the in-cluster time is what a new connection pays for
//!   the tunnel.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bench::load::{self, Proto, Samples};
use crate::bench::procstat::cpu_seconds;
use crate::bench::report::Report;
use crate::bench::upstream;
use crate::mesh::TwoClusters;

const SCENARIO: &str = "cross-cluster";

/// Options of the scenario.
#[derive(Debug, Clone)]
pub struct Opts {
    pub rate: u32,
    pub duration: Duration,
    pub rounds: u32,
    pub conns: usize,
    /// New connections per path per round.
    pub new_conns: usize,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[(((v.len() - 1) as f64) * p).round() as usize]
}

/// One new connection: connect, one byte there and back. Microseconds.
async fn new_connection(addr: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(b"x").await?;
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut b)).await??;
    Ok(started.elapsed().as_secs_f64() * 1e6)
}

/// Runs the scenario.
pub async fn run(opts: &Opts, report: &mut Report) -> anyhow::Result<()> {
    http_latency(opts, report).await?;
    new_connections(opts, report).await
}

async fn http_latency(opts: &Opts, report: &mut Report) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let app = upstream::http("127.0.0.1", 1024).await?.to_string();
    let (d, a) = (dir.path().to_path_buf(), app.clone());
    let mesh = tokio::task::spawn_blocking(move || TwoClusters::start(&d, &a, "http")).await??;
    let paths = [("direct", app.clone()), ("in-cluster", mesh.near.clone()), ("cross-cluster", mesh.far.clone())];
    let body = Bytes::from(vec![b'y'; 1024]);
    for (name, addr) in &paths {
        let warm = load::fixed_rate(addr, Proto::Http1, 500, Duration::from_secs(1), opts.conns, body.clone()).await?;
        anyhow::ensure!(warm.latencies_us.len() > 100, "the {name} path does not answer ({} errors)", warm.errors);
    }
    let mut samples: Vec<Samples> = vec![Samples::default(); paths.len()];
    let (gw_pid, mut gw_cpu) = (mesh.gateway.pid(), 0.0);
    for _ in 0..opts.rounds {
        for (i, (name, addr)) in paths.iter().enumerate() {
            let before = cpu_seconds(gw_pid);
            let s = load::fixed_rate(addr, Proto::Http1, opts.rate, opts.duration, opts.conns, body.clone()).await?;
            if *name == "cross-cluster" {
                gw_cpu += cpu_seconds(gw_pid) - before;
            }
            samples[i].merge(s);
        }
    }
    let q = |s: &Samples| [0.5, 0.9, 0.99].map(|p| s.percentile_us(p));
    let (direct, near) = (q(&samples[0]), q(&samples[1]));
    for ((name, _), s) in paths.iter().zip(&samples) {
        let labels = json!({"protocol": "http1", "rate": opts.rate, "path": name});
        for (i, p) in ["p50", "p90", "p99"].iter().enumerate() {
            report.figure(SCENARIO, &format!("latency_{p}"), labels.clone(), q(s)[i], "us");
            if *name != "direct" {
                report.figure(SCENARIO, &format!("added_{p}_over_direct"), labels.clone(), q(s)[i] - direct[i], "us");
            }
            if *name == "cross-cluster" {
                report.figure(SCENARIO, &format!("added_{p}_over_in_cluster"), labels.clone(), q(s)[i] - near[i], "us");
            }
        }
        report.figure(SCENARIO, "errors", labels.clone(), s.errors as f64, "requests");
        report.figure(SCENARIO, "achieved_rps", labels, s.rps(), "req/s");
    }
    let requests = samples[2].latencies_us.len() as f64;
    report.figure(
        SCENARIO,
        "gateway_cpu_seconds_per_1000_requests",
        json!({"protocol": "http1", "rate": opts.rate}),
        gw_cpu / requests.max(1.0) * 1000.0,
        "s",
    );
    drop(mesh);
    Ok(())
}

async fn new_connections(opts: &Opts, report: &mut Report) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let echo = upstream::tcp_echo("127.0.0.1").await?.to_string();
    let (d, e) = (dir.path().to_path_buf(), echo.clone());
    let mesh = tokio::task::spawn_blocking(move || TwoClusters::start(&d, &e, "tcp")).await??;
    let paths = [("direct", echo.clone()), ("in-cluster", mesh.near.clone()), ("cross-cluster", mesh.far.clone())];
    // Warm: the pooled gateway connection exists before anything is timed.
    for (name, addr) in &paths {
        for _ in 0..20 {
            new_connection(addr).await.map_err(|e| anyhow::anyhow!("the {name} path does not echo: {e}"))?;
        }
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for _ in 0..opts.rounds {
        for (i, (name, addr)) in paths.iter().enumerate() {
            for _ in 0..opts.new_conns {
                let us = new_connection(addr).await.map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
                times[i].push(us);
            }
        }
    }
    let mut q = |i: usize| [percentile(&mut times[i], 0.5), percentile(&mut times[i], 0.99)];
    let all: Vec<[f64; 2]> = (0..paths.len()).map(&mut q).collect();
    for ((name, _), t) in paths.iter().zip(&all) {
        let labels = json!({"protocol": "tcp", "path": name, "connections": opts.new_conns as u32 * opts.rounds});
        report.figure(SCENARIO, "new_connection_p50", labels.clone(), t[0], "us");
        report.figure(SCENARIO, "new_connection_p99", labels, t[1], "us");
    }
    let labels = json!({"protocol": "tcp"});
    report.figure(SCENARIO, "new_connection_added_by_warm_tunnel_p50", labels.clone(), all[2][0] - all[1][0], "us");
    report.figure(SCENARIO, "new_connection_added_by_warm_tunnel_p99", labels, all[2][1] - all[1][1], "us");
    drop(mesh);
    Ok(())
}
