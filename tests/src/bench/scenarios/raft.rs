//! `raft`: the control-plane store's Raft group against Debian's etcd, both three members on
//! this machine with fsync on, same load, alternating in rounds.
//!
//! - commit latency, one client: sequential writes to the leader (Trellis: `ApplyService` over
//!   the admin API, mTLS gRPC; etcd: `put` through its HTTP/JSON gateway on a kept-alive
//!   connection). Each write is durable on a quorum and applied before it is answered.
//! - throughput, 16 clients writing concurrently.
//! - time to a new leader after the leader is SIGKILLed, with each system's default timing
//!   (Trellis: 100 ms ticks, election timeout 1–2 s; etcd: 100 ms heartbeat, 1 s election),
//!   measured by polling the surviving members every 20 ms.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use trellis_controlplane::cli::client;
use trellis_proto::pb;

use crate::bench::load::Samples;
use crate::bench::report::Report;
use crate::group::Group;
use crate::harness::{Proc, free_port};

const SCENARIO: &str = "raft";

/// Options.
pub struct Opts {
    pub duration: Duration,
    pub rounds: u32,
    pub clients: usize,
}

/// Whether Debian's etcd is installed.
pub fn etcd_available() -> bool {
    std::process::Command::new("etcd").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// A three-member etcd cluster on loopback.
struct Etcd {
    members: Vec<EtcdMember>,
}

struct EtcdMember {
    name: String,
    client: String,
    args: Vec<String>,
    proc: Option<Proc>,
    log: std::path::PathBuf,
}

impl Etcd {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port("127.0.0.1"), free_port("127.0.0.1"))).collect();
        let cluster: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}")).collect();
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("e{i}");
            let args: Vec<String> = vec![
                "--name".into(),
                name.clone(),
                "--data-dir".into(),
                dir.join(&name).display().to_string(),
                "--listen-client-urls".into(),
                format!("http://127.0.0.1:{client}"),
                "--advertise-client-urls".into(),
                format!("http://127.0.0.1:{client}"),
                "--listen-peer-urls".into(),
                format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls".into(),
                format!("http://127.0.0.1:{peer}"),
                "--initial-cluster".into(),
                cluster.join(","),
                "--initial-cluster-state".into(),
                "new".into(),
                "--log-level".into(),
                "error".into(),
            ];
            let log = dir.join(format!("{name}.log"));
            let proc = Proc::spawn(&name, Path::new("etcd"), &args, &log, &[]);
            members.push(EtcdMember { name, client: format!("127.0.0.1:{client}"), args, proc: Some(proc), log });
        }
        Ok(Self { members })
    }

    fn restart(&mut self, i: usize) {
        let m = &mut self.members[i];
        if let Some(mut p) = m.proc.take() {
            p.kill();
        }
        m.proc = Some(Proc::spawn(&m.name, Path::new("etcd"), &m.args, &m.log, &[]));
    }
}

/// A kept-alive HTTP/1.1 connection to one etcd member's JSON gateway.
struct EtcdConn(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

impl EtcdConn {
    async fn open(addr: &str) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(Self(send))
    }

    async fn call(&mut self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.0.ready().await?;
        let req = http::Request::post(path)
            .header("host", "etcd")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let resp = self.0.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        anyhow::ensure!(status.is_success(), "etcd {path}: {status} {}", String::from_utf8_lossy(&bytes));
        Ok(serde_json::from_slice(&bytes)?)
    }

    async fn put(&mut self, key: &str, value: &str) -> anyhow::Result<()> {
        self.call("/v3/kv/put", json!({"key": STANDARD.encode(key), "value": STANDARD.encode(value)})).await?;
        Ok(())
    }

    /// (this member's id, the leader it knows; 0 for none).
    async fn status(&mut self) -> anyhow::Result<(String, String)> {
        let v = self.call("/v3/maintenance/status", json!({})).await?;
        let me = v["header"]["member_id"].as_str().unwrap_or_default().to_string();
        let leader = v["leader"].as_str().unwrap_or("0").to_string();
        Ok((me, leader))
    }
}

async fn etcd_leader(etcd: &Etcd, skip: Option<usize>) -> Option<(usize, String)> {
    let mut ids = Vec::new();
    let mut leader = None;
    for (i, m) in etcd.members.iter().enumerate() {
        if Some(i) == skip {
            ids.push(String::new());
            continue;
        }
        let r =
            tokio::time::timeout(Duration::from_millis(300), async { EtcdConn::open(&m.client).await?.status().await })
                .await;
        match r {
            Ok(Ok((me, l))) => {
                if l != "0" && !l.is_empty() {
                    leader = Some(l);
                }
                ids.push(me);
            }
            _ => ids.push(String::new()),
        }
    }
    let l = leader?;
    let i = ids.iter().position(|id| *id == l)?;
    Some((i, l))
}

async fn trellis_leader(group: &Group) -> Option<usize> {
    group.leader().await
}

fn service(name: &str, port: u32) -> pb::Service {
    pb::Service {
        name: name.into(),
        namespace: "bench".into(),
        ports: vec![pb::ServicePort { name: "v".into(), port }],
        protocol: "http".into(),
        exported: false,
        revision: 0,
        vip: String::new(),
    }
}

/// Sequential writes by `clients` clients for `duration`.
async fn trellis_writes(group: &Group, leader: usize, clients: usize, duration: Duration) -> anyhow::Result<Samples> {
    let ctx = group.context_for(leader);
    let end = Instant::now() + duration;
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let mut admin = client::admin(&ctx)?;
                let mut s = Samples::default();
                let mut n = 0u32;
                while Instant::now() < end {
                    n += 1;
                    let t = Instant::now();
                    match admin.apply_service(service(&format!("k{c}"), n % 60_000 + 1)).await {
                        Ok(_) => s.latencies_us.push(t.elapsed().as_micros() as u32),
                        Err(_) => s.errors += 1,
                    }
                }
                anyhow::Ok(s)
            })
        })
        .collect();
    let mut total = Samples::default();
    for t in tasks {
        total.merge(t.await??);
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

async fn etcd_writes(addr: &str, clients: usize, duration: Duration) -> anyhow::Result<Samples> {
    let end = Instant::now() + duration;
    let start = Instant::now();
    let addr: Arc<str> = addr.into();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let addr = addr.clone();
            tokio::spawn(async move {
                let mut conn = EtcdConn::open(&addr).await?;
                let mut s = Samples::default();
                let mut n = 0u32;
                while Instant::now() < end {
                    n += 1;
                    let t = Instant::now();
                    match conn.put(&format!("/bench/k{c}"), &n.to_string()).await {
                        Ok(()) => s.latencies_us.push(t.elapsed().as_micros() as u32),
                        Err(_) => {
                            s.errors += 1;
                            conn = EtcdConn::open(&addr).await?;
                        }
                    }
                }
                anyhow::Ok(s)
            })
        })
        .collect();
    let mut total = Samples::default();
    for t in tasks {
        total.merge(t.await??);
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

fn record(report: &mut Report, system: &str, load: &str, s: &Samples) {
    let labels = json!({"system": system, "load": load});
    report.figure(SCENARIO, "commit p50", labels.clone(), s.percentile_us(0.5) / 1000.0, "ms");
    report.figure(SCENARIO, "commit p99", labels.clone(), s.percentile_us(0.99) / 1000.0, "ms");
    report.figure(SCENARIO, "throughput", labels.clone(), s.rps(), "writes/s");
    report.figure(SCENARIO, "errors", labels, s.errors as f64, "writes");
}

/// Runs the scenario.
pub async fn run(opts: &Opts, report: &mut Report) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tdir = dir.path().join("trellis");
    std::fs::create_dir_all(&tdir)?;
    let mut group = tokio::task::spawn_blocking(move || Group::start(&tdir, 3, &[])).await?;
    let mut etcd = if etcd_available() {
        let edir = dir.path().join("etcd");
        std::fs::create_dir_all(&edir)?;
        let e = Etcd::start(&edir)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while etcd_leader(&e, None).await.is_none() {
            anyhow::ensure!(Instant::now() < deadline, "etcd did not elect a leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some(e)
    } else {
        report.skipped(SCENARIO, "etcd path: `etcd` is not installed (apt-get install etcd-server)");
        None
    };

    // A group of one: the same write path without replication, to split the figure.
    let sdir = dir.path().join("solo");
    std::fs::create_dir_all(&sdir)?;
    let solo = tokio::task::spawn_blocking(move || Group::start(&sdir, 1, &[])).await?;
    let mut t_solo = Samples::default();
    let (mut t_one, mut t_many, mut e_one, mut e_many) =
        (Samples::default(), Samples::default(), Samples::default(), Samples::default());
    let mut t_elect = Vec::new();
    let mut e_elect = Vec::new();
    for _ in 0..opts.rounds {
        t_solo.merge(trellis_writes(&solo, 0, 1, opts.duration).await?);
        let l = trellis_leader(&group).await.ok_or_else(|| anyhow::anyhow!("no Trellis leader"))?;
        t_one.merge(trellis_writes(&group, l, 1, opts.duration).await?);
        if let Some(e) = &etcd {
            let (l, _) = etcd_leader(e, None).await.ok_or_else(|| anyhow::anyhow!("no etcd leader"))?;
            e_one.merge(etcd_writes(&e.members[l].client, 1, opts.duration).await?);
        }
        t_many.merge(trellis_writes(&group, l, opts.clients, opts.duration).await?);
        if let Some(e) = &etcd {
            let (l, _) = etcd_leader(e, None).await.ok_or_else(|| anyhow::anyhow!("no etcd leader"))?;
            e_many.merge(etcd_writes(&e.members[l].client, opts.clients, opts.duration).await?);
        }

        // Leader SIGKILL, then the time until a survivor reports a new leader.
        let l = trellis_leader(&group).await.ok_or_else(|| anyhow::anyhow!("no Trellis leader"))?;
        group.members[l].kill();
        let killed = Instant::now();
        loop {
            if let Some(n) = trellis_leader(&group).await
                && n != l
            {
                break;
            }
            anyhow::ensure!(killed.elapsed() < Duration::from_secs(30), "Trellis elected no new leader in 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        t_elect.push(killed.elapsed());
        let m = &mut group.members[l];
        tokio::task::block_in_place(|| m.restart());
        if let Some(e) = &mut etcd {
            let (l, old) = etcd_leader(e, None).await.ok_or_else(|| anyhow::anyhow!("no etcd leader"))?;
            if let Some(mut p) = e.members[l].proc.take() {
                p.kill();
            }
            let killed = Instant::now();
            loop {
                if let Some((_, n)) = etcd_leader(e, Some(l)).await
                    && n != old
                {
                    break;
                }
                anyhow::ensure!(killed.elapsed() < Duration::from_secs(30), "etcd elected no new leader in 30 s");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            e_elect.push(killed.elapsed());
            e.restart(l);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    record(report, "trellis, group of 1", "1 client", &t_solo);
    record(report, "trellis", "1 client", &t_one);
    record(report, "trellis", &format!("{} clients", opts.clients), &t_many);
    if etcd.is_some() {
        record(report, "etcd", "1 client", &e_one);
        record(report, "etcd", &format!("{} clients", opts.clients), &e_many);
    }
    for (system, times) in [("trellis", &t_elect), ("etcd", &e_elect)] {
        if times.is_empty() {
            continue;
        }
        let mut ms: Vec<f64> = times.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        report.figure(SCENARIO, "new leader after SIGKILL (median)", json!({"system": system}), ms[ms.len() / 2], "ms");
        report.figure(SCENARIO, "new leader after SIGKILL (max)", json!({"system": system}), ms[ms.len() - 1], "ms");
    }
    Ok(())
}
