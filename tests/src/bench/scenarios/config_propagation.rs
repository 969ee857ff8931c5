//! `config-propagation`: how fast one change reaches every subscriber of a federation, and what
//! the control planes spend. Three clusters (A bootstraps, B and C join with tokens); each
//! cluster has 100 exported services with one endpoint each, registered by 100 discovery
//! streams that speak the real protocol with a workload certificate of that cluster (the
//! "3 clusters × 100 services" memory figure is taken here). Then, for each subscriber count,
//! that many lightweight subscribers (one process, spread evenly over the three clusters, each
//! its own discovery stream acking every version) connect and load their view; one new endpoint
//! of an exported service registers in cluster A; the time until every subscriber has received
//! and acked it is measured, with the bytes each received for it and the control planes' CPU
//! and memory.
//!
//! Each count runs twice. First every subscriber holds a full view (every change reaches every
//! one of them: the worst case). Then with scoped views, as proxies run by default: each
//! subscriber calls ten of the 300 services, and one in [`PROBE_CALLERS_ONE_IN`] also calls the
//! service that changes; the time until those have it, whether any other subscriber heard of
//! the change at all, and the bytes the control planes sent for it over all subscribers.
//!
//! After each round's change comes churn, as a rolling update makes it: endpoints of the changed
//! service come and go, one change every 20 ms, and each control plane's CPU per change (less its
//! idle CPU) is the figure; it shows what a busy mesh costs each instance as it grows.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use trellis_proto::pb;
use trellis_proto::pb::discovery_request::Kind;
use trellis_proto::tls::{IdentityStore, client_config};
use trellis_proto::verify::{IdMatcher, SharedBundle, TrustBundle};
use trellis_proto::{SpiffeId, grpc};

use crate::bench::procstat::{cpu_seconds, peak_rss_mib};
use crate::bench::report::Report;
use crate::harness::{ControlPlane, Proc, bin, trellis, wait_ready};
use crate::mesh::{workload_certificate, workload_token};

const SCENARIO: &str = "config-propagation";
const CLUSTERS: [&str; 3] = ["a", "b", "c"];
const SERVICES_PER_CLUSTER: usize = 100;
/// Discovery streams per HTTP/2 connection.
const STREAMS_PER_CONNECTION: usize = 200;
/// Services a scoped subscriber calls.
const CALLS_PER_SUBSCRIBER: usize = 10;
/// With scoped views, one subscriber in this many (in each cluster) calls the service that changes.
const PROBE_CALLERS_ONE_IN: usize = 30;

/// One cluster's control plane and the TLS its subscribers use.
struct Cluster {
    name: &'static str,
    grpc: String,
    pid: u32,
    tls: Arc<rustls::ClientConfig>,
    identity: SpiffeId,
}

/// What a subscriber reports of a response received while an endpoint is awaited.
#[derive(Debug, Clone, Copy)]
struct Seen {
    at: Instant,
    /// The response's encoded size.
    bytes: usize,
    /// It names the awaited endpoint.
    hit: bool,
    /// The subscriber's view includes the awaited endpoint's service.
    interested: bool,
}

/// Who a subscriber is and what it asks for.
struct Subscriber {
    cluster: &'static str,
    identity: String,
    instance: String,
    endpoint: Option<pb::EndpointRegistration>,
    /// `None`: a full view; otherwise the services it calls.
    calls: Option<Vec<String>>,
    /// Whether its view includes the service of the change.
    interested: bool,
}

/// One discovery stream: sends Hello (registering its endpoint if any), acks every version, and
/// reports on `loaded` once its first response arrived and on `seen` every response received
/// while `awaited` (an endpoint id) is set. Ends when `stop` turns true.
async fn subscriber(
    channel: tonic::transport::Channel,
    me: Subscriber,
    awaited: watch::Receiver<String>,
    loaded: mpsc::UnboundedSender<()>,
    seen: mpsc::UnboundedSender<Seen>,
    mut stop: watch::Receiver<bool>,
) {
    let (tx, rx) = mpsc::channel(4);
    let cluster = me.cluster;
    let hello = pb::DiscoveryRequest {
        kind: Some(Kind::Hello(pb::Hello {
            node: Some(pb::Node {
                identity: me.identity,
                cluster: cluster.into(),
                zone: format!("{cluster}-1"),
                instance: me.instance,
            }),
            endpoints: me.endpoint.into_iter().collect(),
            known_version: 0,
            gateway_address: String::new(),
            scoped: me.calls.is_some(),
            services: me.calls.unwrap_or_default(),
            scoped_known_version: 0,
        })),
    };
    if tx.send(hello).await.is_err() {
        return;
    }
    let mut client = pb::discovery_client::DiscoveryClient::new(channel).max_decoding_message_size(64 << 20);
    let Ok(resp) = client.stream(ReceiverStream::new(rx)).await else { return };
    let mut stream = resp.into_inner();
    let mut first = true;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            msg = stream.message() => {
                let Ok(Some(r)) = msg else { return };
                let now = Instant::now();
                if first {
                    first = false;
                    let _ = loaded.send(());
                }
                let want = awaited.borrow().clone();
                if !want.is_empty() {
                    let _ = seen.send(Seen {
                        at: now,
                        bytes: prost::Message::encoded_len(&r),
                        hit: r.endpoints.iter().any(|e| e.id == want),
                        interested: me.interested,
                    });
                }
                let ack = pb::DiscoveryRequest { kind: Some(Kind::Ack(pb::Ack { version: r.version })) };
                if tx.send(ack).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn join_cluster(dir: &Path, config: &Path, name: &str, index: usize) -> anyhow::Result<(Proc, Value)> {
    let out = trellis(config, &["token", "create", "--ttl", "10m"]);
    anyhow::ensure!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
    let token = dir.join(format!("{name}.token"));
    std::fs::write(&token, &out.stdout)?;
    let ready = dir.join(format!("{name}-cp.ready"));
    let args: Vec<String> = [
        "--data-dir",
        &dir.join(format!("{name}-cp")).display().to_string(),
        "--cluster",
        name,
        "--region",
        name,
        "--listen",
        &format!("127.0.{}.1:0", index + 1),
        "--join-token-file",
        &token.display().to_string(),
        "--ready-file",
        &ready.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = dir.join(format!("{name}-cp.log"));
    let mut p = Proc::spawn(&format!("{name}-cp"), &bin("trellis-cp"), &args, &log, &[("RUST_LOG", "warn")]);
    let v = wait_ready(&mut p, &ready, Duration::from_secs(60));
    Ok((p, v))
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

struct Running {
    stop: watch::Sender<bool>,
    loaded: mpsc::UnboundedReceiver<()>,
    seen: mpsc::UnboundedReceiver<Seen>,
    count: usize,
    /// How many have the changed service in their view.
    interested: usize,
}

/// Starts `count` subscribers spread over the clusters; subscriber `i < with_endpoints` of each
/// cluster registers one endpoint of `svc-<cluster>-<i>.default`. With `probe` (the service of the
/// change) the subscribers' views are scoped: each calls [`CALLS_PER_SUBSCRIBER`] services, and
/// one in [`PROBE_CALLERS_ONE_IN`] `probe` as well; without, each has the full view.
fn start(
    clusters: &[Cluster],
    count: usize,
    with_endpoints: usize,
    prefix: &str,
    awaited: &watch::Receiver<String>,
    probe: Option<&str>,
) -> anyhow::Result<Running> {
    let (stop, stop_rx) = watch::channel(false);
    let (loaded_tx, loaded) = mpsc::unbounded_channel();
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let mut channels: Vec<Vec<tonic::transport::Channel>> = vec![Vec::new(); clusters.len()];
    let mut interested_count = 0;
    for i in 0..count {
        let c = i % clusters.len();
        let k = i / clusters.len();
        let cl = &clusters[c];
        if k.is_multiple_of(STREAMS_PER_CONNECTION) {
            channels[c].push(grpc::channel(&cl.grpc, cl.tls.clone())?);
        }
        let channel = channels[c].last().cloned().ok_or_else(|| anyhow::anyhow!("no channel"))?;
        let endpoint = (k < with_endpoints).then(|| pb::EndpointRegistration {
            service: format!("svc-{}-{k}.default", cl.name),
            address: format!("127.0.{}.{}:{}", c + 1, 10 + k / 250, 10_000 + k),
            protocol: "http".into(),
            weight: 1,
            ready: true,
        });
        let (calls, interested) = match probe {
            None => (None, true),
            Some(probe) => {
                let mut calls: Vec<String> = (0..CALLS_PER_SUBSCRIBER)
                    .map(|j| {
                        let n = i * 7 + j * 31;
                        format!("svc-{}-{}.default", CLUSTERS[n % CLUSTERS.len()], n % SERVICES_PER_CLUSTER)
                    })
                    .collect();
                // Counted within the cluster, so the callers are spread over all of them (the
                // change then crosses the group to reach most of its callers).
                let interested = k.is_multiple_of(PROBE_CALLERS_ONE_IN);
                if interested {
                    calls.push(format!("{probe}.default"));
                }
                (Some(calls), interested)
            }
        };
        interested_count += usize::from(interested);
        let me = Subscriber {
            cluster: cl.name,
            identity: cl.identity.to_string(),
            instance: format!("{prefix}-{k}"),
            endpoint,
            calls,
            interested,
        };
        tokio::spawn(subscriber(channel, me, awaited.clone(), loaded_tx.clone(), seen_tx.clone(), stop_rx.clone()));
    }
    Ok(Running { stop, loaded, seen, count, interested: interested_count })
}

/// Waits until every subscriber has its first view, or `deadline`; how many did, and when the
/// last of them did.
async fn wait_loaded(r: &mut Running, deadline: Duration) -> (usize, Duration) {
    let start = Instant::now();
    let mut n = 0;
    let mut last = Duration::ZERO;
    while n < r.count {
        match tokio::time::timeout(deadline.saturating_sub(start.elapsed()), r.loaded.recv()).await {
            Ok(Some(())) => {
                n += 1;
                last = start.elapsed();
            }
            _ => break,
        }
    }
    (n, last)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The service whose new endpoint is the change of the round with `n` subscribers.
fn probe_service(n: usize, scoped: bool) -> String {
    if scoped { format!("probe-{n}-scoped") } else { format!("probe-{n}") }
}

/// One round: `n` subscribers (full or scoped views) load their view, then one new endpoint of
/// the round's probe service registers in A. The 300 registering streams of `base` hold full
/// views; they count in the full round's figures (as they always have), not in the scoped one's.
async fn round(
    clusters: &[Cluster],
    base: &mut Running,
    awaited_tx: &watch::Sender<String>,
    awaited: &watch::Receiver<String>,
    n: usize,
    scoped: bool,
    report: &mut Report,
) -> anyhow::Result<()> {
    let probe = probe_service(n, scoped);
    let view = if scoped { "scoped" } else { "full" };
    let mut subs = start(clusters, n, 0, &format!("sub{n}{view}"), awaited, scoped.then_some(probe.as_str()))?;
    let (loaded, load_time) = wait_loaded(&mut subs, Duration::from_secs(600)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0: Vec<f64> = clusters.iter().map(|c| cpu_seconds(c.pid)).collect();
    // Nothing seen before the change counts.
    while subs.seen.try_recv().is_ok() || base.seen.try_recv().is_ok() {}
    // The change: one new endpoint of an exported service in cluster A.
    awaited_tx.send_replace(format!("a/default/{probe}/{probe}"));
    let t0 = Instant::now();
    let (stop_probe, stop_rx) = watch::channel(false);
    let (l_tx, _l_rx) = mpsc::unbounded_channel();
    let (s_tx, _s_rx) = mpsc::unbounded_channel();
    let (dummy_tx, dummy) = watch::channel(String::new());
    tokio::spawn(subscriber(
        grpc::channel(&clusters[0].grpc, clusters[0].tls.clone())?,
        registrant(&clusters[0], &probe, probe.clone()),
        dummy,
        l_tx,
        s_tx,
        stop_rx,
    ));
    let expected = subs.interested + if scoped { 0 } else { base.count };
    let mut latencies = Vec::new();
    let (mut hit_bytes, mut all_bytes, mut needless) = (0usize, 0usize, 0usize);
    let mut record = |seen: Seen, latencies: &mut Vec<f64>| {
        all_bytes += seen.bytes;
        if seen.hit {
            latencies.push(seen.at.duration_since(t0).as_secs_f64() * 1000.0);
            hit_bytes += seen.bytes;
        } else if !seen.interested {
            needless += 1;
        }
    };
    let deadline = Duration::from_secs(120);
    while latencies.len() < expected {
        let next = tokio::time::timeout(deadline.saturating_sub(t0.elapsed()), async {
            tokio::select! {
                s = subs.seen.recv() => s,
                s = base.seen.recv(), if !scoped => s,
            }
        })
        .await;
        match next {
            Ok(Some(seen)) => record(seen, &mut latencies),
            _ => break,
        }
    }
    // Anything else the change set off (with scoped views: nothing, for those not calling it).
    let settle = Instant::now() + Duration::from_millis(500);
    while let Ok(Some(seen)) = tokio::time::timeout_at(settle.into(), subs.seen.recv()).await {
        record(seen, &mut latencies);
    }
    let total = n + if scoped { 0 } else { base.count };
    let missing = expected.saturating_sub(latencies.len());
    latencies.sort_by(f64::total_cmp);
    let labels = json!({"subscribers": total, "clusters": 3, "view": view});
    report.figure(SCENARIO, "propagation_p50", labels.clone(), percentile(&latencies, 0.5), "ms");
    report.figure(SCENARIO, "propagation_p99", labels.clone(), percentile(&latencies, 0.99), "ms");
    report.figure(SCENARIO, "propagation_max", labels.clone(), latencies.last().copied().unwrap_or(0.0), "ms");
    report.figure(SCENARIO, "subscribers_to_reach", labels.clone(), expected as f64, "count");
    report.figure(SCENARIO, "subscribers_missed", labels.clone(), missing as f64, "count");
    report.figure(SCENARIO, "responses_to_subscribers_not_calling_it", labels.clone(), needless as f64, "count");
    report.figure(
        SCENARIO,
        "bytes_per_subscriber_per_change",
        labels.clone(),
        hit_bytes as f64 / latencies.len().max(1) as f64,
        "bytes",
    );
    report.figure(SCENARIO, "bytes_all_subscribers_per_change", labels.clone(), all_bytes as f64, "bytes");
    report.figure(SCENARIO, "initial_load", labels.clone(), load_time.as_secs_f64(), "s");
    let loaded = loaded + if scoped { 0 } else { base.count };
    report.figure(SCENARIO, "subscribers_loaded", labels.clone(), loaded as f64, "count");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (c, before) in clusters.iter().zip(cpu0) {
        let l = json!({"subscribers": total, "instance": c.name, "view": view});
        report.figure(SCENARIO, "controlplane_cpu_for_change", l.clone(), cpu_seconds(c.pid) - before, "s");
        report.figure(SCENARIO, "controlplane_rss", l.clone(), rss_mib(c.pid), "MiB");
        report.figure(SCENARIO, "controlplane_peak_rss", l, peak_rss_mib(c.pid), "MiB");
    }
    // The next round awaits its own endpoint; this one stays registered (unhealthy once its
    // stream ends) and would otherwise be "seen" in every new subscriber's first view.
    awaited_tx.send_replace(String::new());
    churn(clusters, &probe, total, view, report).await?;
    let _ = subs.stop.send(true);
    let _ = stop_probe.send(true);
    drop(dummy_tx);
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

/// A stream of cluster A registering one endpoint of `probe` (instance `instance`) and calling
/// nothing.
fn registrant(a: &Cluster, probe: &str, instance: String) -> Subscriber {
    Subscriber {
        cluster: a.name,
        identity: a.identity.to_string(),
        instance,
        endpoint: Some(pb::EndpointRegistration {
            service: format!("{probe}.default"),
            address: "127.0.1.250:9".into(),
            protocol: "http".into(),
            weight: 1,
            ready: true,
        }),
        calls: Some(Vec::new()),
        interested: false,
    }
}

/// Endpoints that come and go in the churn that follows each round's change.
const CHURN_ENDPOINTS: usize = 100;
/// Time between two changes of the churn.
const CHURN_GAP: Duration = Duration::from_millis(20);

/// Churn, as a rolling update makes it: [`CHURN_ENDPOINTS`] endpoints of the round's service
/// register one by one and then go away one by one (each an endpoint change: registered, then
/// unhealthy), one change every [`CHURN_GAP`], while the round's subscribers are connected. The
/// control planes' CPU over the churn, less their CPU for as long idle just before, per change.
async fn churn(clusters: &[Cluster], probe: &str, total: usize, view: &str, report: &mut Report) -> anyhow::Result<()> {
    let changes = 2 * CHURN_ENDPOINTS;
    let span = CHURN_GAP * changes as u32;
    let idle0: Vec<f64> = clusters.iter().map(|c| cpu_seconds(c.pid)).collect();
    let t = Instant::now();
    tokio::time::sleep(span).await;
    let idle: Vec<f64> = clusters.iter().zip(&idle0).map(|(c, before)| cpu_seconds(c.pid) - before).collect();
    let idle_span = t.elapsed();

    let busy0: Vec<f64> = clusters.iter().map(|c| cpu_seconds(c.pid)).collect();
    let t = Instant::now();
    let channel = grpc::channel(&clusters[0].grpc, clusters[0].tls.clone())?;
    let (_keep, awaited) = watch::channel(String::new());
    let (loaded, _) = mpsc::unbounded_channel();
    let (seen, _) = mpsc::unbounded_channel();
    let mut stops = Vec::new();
    for k in 0..CHURN_ENDPOINTS {
        let (stop, stop_rx) = watch::channel(false);
        let me = registrant(&clusters[0], probe, format!("{probe}-churn-{k}"));
        tokio::spawn(subscriber(channel.clone(), me, awaited.clone(), loaded.clone(), seen.clone(), stop_rx));
        stops.push(stop);
        tokio::time::sleep(CHURN_GAP).await;
    }
    for stop in stops {
        let _ = stop.send(true);
        tokio::time::sleep(CHURN_GAP).await;
    }
    // The last changes' pushes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let busy_span = t.elapsed();
    for ((c, before), idle) in clusters.iter().zip(busy0).zip(idle) {
        let busy = cpu_seconds(c.pid) - before;
        let extra = busy - idle * busy_span.as_secs_f64() / idle_span.as_secs_f64();
        let round2 = |x: f64| (x * 100.0).round() / 100.0;
        let l = json!({"subscribers": total, "instance": c.name, "view": view, "changes": changes,
            "busy_s": round2(busy), "idle_s": round2(idle)});
        report.figure(SCENARIO, "controlplane_cpu_per_churn_change", l, extra.max(0.0) * 1000.0 / changes as f64, "ms");
    }
    Ok(())
}

/// Runs the scenario for each subscriber count in `counts`.
pub async fn run(counts: &[usize], report: &mut Report) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir: PathBuf = tmp.path().to_path_buf();
    let config = dir.join("cli.yaml");
    let (a, mut procs, readies) = {
        let dir = dir.clone();
        let config = config.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<(ControlPlane, Vec<Proc>, Vec<Value>)> {
            let a = ControlPlane::start(&dir, "a", "127.0.1.1");
            let out = trellis(&config, &["config", "import", &a.admin_context.display().to_string()]);
            anyhow::ensure!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
            let mut procs = Vec::new();
            let mut readies = Vec::new();
            for (i, name) in CLUSTERS.iter().enumerate().skip(1) {
                let (p, v) = join_cluster(&dir, &config, name, i)?;
                procs.push(p);
                readies.push(v);
            }
            Ok((a, procs, readies))
        })
        .await??
    };
    let td = a.trust_domain.clone();
    let root = std::fs::read_to_string(&a.trust_bundle)?;
    let bundle = SharedBundle::new(TrustBundle::from_pem(&td, std::slice::from_ref(&root))?);

    // Exported services, 100 per cluster, and one for the change.
    let ctx = trellis_controlplane::context::ConfigFile::load(&config)?.current()?.clone();
    let mut admin = trellis_controlplane::cli::client::admin(&ctx)?;
    let services = CLUSTERS
        .iter()
        .flat_map(|c| (0..SERVICES_PER_CLUSTER).map(move |k| format!("svc-{c}-{k}")))
        .chain(counts.iter().flat_map(|n| [probe_service(*n, false), probe_service(*n, true)]));
    for name in services {
        admin
            .apply_service(pb::Service {
                name,
                namespace: "default".into(),
                ports: vec![pb::ServicePort { name: "http".into(), port: 80 }],
                protocol: "http".into(),
                exported: true,
                revision: 0,
                vip: String::new(),
            })
            .await?;
    }
    let token = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || workload_token(&config, "bench")).await??
    };
    let mut clusters = Vec::new();
    let addrs: Vec<(String, u32)> = std::iter::once((a.grpc.clone(), a.proc.pid()))
        .chain(readies.iter().zip(&procs).map(|(v, p)| (v["grpc"].as_str().unwrap_or_default().to_string(), p.pid())))
        .collect();
    for (name, (grpc, pid)) in CLUSTERS.iter().zip(addrs) {
        let (identity, id) = workload_certificate(&grpc, &td, &bundle, &token, "bench").await?;
        let tls =
            client_config(Some(IdentityStore::new(identity)), bundle.clone(), IdMatcher::AnyControlPlane, &[b"h2"])?;
        clusters.push(Cluster { name, grpc, pid, tls, identity: id });
    }

    // The registry: 3 clusters × 100 services, each endpoint with its own stream.
    let (awaited_tx, awaited) = watch::channel(String::new());
    let mut base =
        start(&clusters, CLUSTERS.len() * SERVICES_PER_CLUSTER, SERVICES_PER_CLUSTER, "svc", &awaited, None)?;
    let (loaded, _) = wait_loaded(&mut base, Duration::from_secs(60)).await;
    anyhow::ensure!(
        loaded == base.count,
        "only {loaded} of {} registering streams were served within 60 s",
        base.count
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    for c in &clusters {
        let labels = json!({"clusters": 3, "services_per_cluster": SERVICES_PER_CLUSTER, "instance": c.name});
        report.figure(SCENARIO, "controlplane_rss", labels.clone(), rss_mib(c.pid), "MiB");
    }

    for &n in counts {
        for scoped in [false, true] {
            round(&clusters, &mut base, &awaited_tx, &awaited, n, scoped, report).await?;
        }
    }
    let _ = base.stop.send(true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    procs.clear();
    drop(a);
    Ok(())
}
