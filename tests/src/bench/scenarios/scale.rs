//! `scale`: the registry of a large federation, held the way a control plane holds it: the
//! replicated [`State`] built by applying the real commands (bootstrap with a real root and
//! intermediate CAs, 49 cluster joins, services, then one `UpsertEndpoint` per endpoint) in this
//! process. Figures: the memory the state takes (growth of this process's resident set while it
//! is built, after the CA material), the Raft snapshot's size (the same JSON encoding the
//! store's snapshots use) and the time to encode and decode it, the apply rate, and the size of
//! one proxy's discovery view: full (every endpoint it may see, `--full-view`), scoped to the ten
//! services it calls (the proxies' default) and a gateway's (its own cluster's endpoints), with
//! the time the control plane takes to build each.
//!
//! It does not start 50 control-plane processes: memory per endpoint is the state's, and the
//! process overhead of a control plane (about 25 MiB idle, see config-propagation) comes on top.

use std::time::{Duration, Instant};

use prost::Message;
use serde_json::json;
use trellis_controlplane::state::{
    Cluster, Command, Endpoint, Federation, JoinKind, JoinToken, Protocol, RootCa, Service, ServicePort, State,
};
use trellis_federation::ca::Ca;

use crate::bench::procstat::rss_mib;
use crate::bench::report::Report;

const SCENARIO: &str = "scale";

/// Runs the scenario: `endpoints` endpoints across `clusters` clusters, in `services` exported
/// services (each with endpoints in every cluster).
pub fn run(clusters: usize, endpoints: usize, services: usize, report: &mut Report) -> anyhow::Result<()> {
    anyhow::ensure!(clusters >= 1 && services >= 1, "--scale-clusters and --scale-services must be at least 1");
    let me = std::process::id();
    let td = "trellis.local";
    let ttl = Duration::from_secs(365 * 86_400);
    let root = Ca::new_root(td, ttl)?;
    let intermediates: Vec<Ca> =
        (0..clusters).map(|i| root.issue_intermediate(&format!("c{i:02}"), ttl)).collect::<Result<_, _>>()?;
    let rss_before = rss_mib(me);

    let mut state = State::default();
    let mut index = 0u64;
    let mut apply = |state: &mut State, cmd: Command| -> anyhow::Result<()> {
        index += 1;
        state.apply(index, &cmd).map_err(|e| anyhow::anyhow!("applying command {index}: {e}"))
    };
    let cluster = |i: usize, ca: &Ca| Cluster {
        name: format!("c{i:02}"),
        region: format!("r{}", i % 5),
        intermediate_cert_pem: ca.cert_pem().to_string(),
        intermediate_key_pem: String::new(),
        created_at: 0,
        join_token: String::new(),
        gateways: [("gw-1".to_string(), format!("10.{i}.0.1:15443"))].into(),
        via_gateways: true,
        reach_pinned: false,
    };
    apply(
        &mut state,
        Command::Bootstrap {
            federation: Federation { trust_domain: td.into(), created_at: 0 },
            root: RootCa {
                cert_pem: root.cert_pem().into(),
                key_pem: root.key_pem().into(),
                created_at: 0,
                cross_cert_pem: String::new(),
                generation: 1,
            },
            cluster: Cluster {
                intermediate_key_pem: intermediates[0].key_pem().into(),
                ..cluster(0, &intermediates[0])
            },
        },
    )?;
    for (i, ca) in intermediates.iter().enumerate().skip(1) {
        let token_id = format!("join-{i}");
        apply(
            &mut state,
            Command::CreateJoinToken(JoinToken {
                id: token_id.clone(),
                secret_hash: "0".repeat(64),
                kind: JoinKind::Cluster,
                expires_at: u64::MAX,
                created_at: 0,
                description: String::new(),
                revoked: false,
                uses_left: 1,
            }),
        )?;
        apply(&mut state, Command::JoinCluster { token_id, now: 1, cluster: cluster(i, ca) })?;
    }
    for s in 0..services {
        apply(
            &mut state,
            Command::UpsertService(Service {
                name: format!("svc-{s:04}"),
                namespace: "default".into(),
                ports: vec![ServicePort { name: "http".into(), port: 8080 }],
                protocol: Protocol::Http,
                exported: true,
                revision: 0,
                vip: String::new(),
            }),
        )?;
    }
    let started = Instant::now();
    for e in 0..endpoints {
        let (c, s) = (e % clusters, (e / clusters) % services);
        let instance = e / (clusters * services);
        apply(
            &mut state,
            Command::UpsertEndpoint {
                endpoint: Endpoint {
                    id: format!("c{c:02}/default/svc-{s:04}/pod-{instance}-{e}"),
                    service: format!("svc-{s:04}.default"),
                    cluster: format!("c{c:02}"),
                    zone: format!("z{}", e % 3),
                    address: format!("10.{c}.{}.{}:15006", (e / 250) % 250, e % 250 + 1),
                    identity: format!("spiffe://{td}/ns/default/sa/svc-{s:04}"),
                    healthy: true,
                    weight: 1,
                    revision: 0,
                    registrar: format!("c{c:02}/cp-1"),
                },
                protocol: Protocol::Http,
            },
        )?;
    }
    let apply_s = started.elapsed().as_secs_f64();
    let rss_after = rss_mib(me);

    let t = Instant::now();
    let snapshot = serde_json::to_vec(&state)?;
    let encode_ms = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    let restored: State = serde_json::from_slice(&snapshot)?;
    let decode_ms = t.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(restored.endpoints.len() == endpoints, "the snapshot lost endpoints");
    drop(restored);
    use trellis_controlplane::discovery::{Scope, build_response};
    // One proxy's first view of cluster c00 with `scope`, and the milliseconds it took to build.
    let first_view = |scope: &Scope, what: &str| {
        let t = Instant::now();
        let view = build_response(&state, 0, "c00", scope, &[])
            .ok_or_else(|| anyhow::anyhow!("no {what} discovery view for cluster c00"))?;
        anyhow::Ok((view, t.elapsed().as_secs_f64() * 1000.0))
    };
    let (view, full_ms) = first_view(&Scope::All, "full")?;
    let calls = Scope::Services((0..services.min(10)).map(|s| format!("svc-{s:04}.default")).collect());
    let (scoped, scoped_ms) = first_view(&calls, "scoped")?;
    let (gateway, gateway_ms) = first_view(&Scope::OwnCluster, "gateway")?;

    // What one commit costs each connected session once the change log is full: a health change
    // of a service the scoped proxy does not call, looked at by every kind of session.
    let id = state
        .endpoints_of(&format!("svc-{:04}.default", services - 1))
        .next()
        .map(|e| e.id.clone())
        .ok_or_else(|| anyhow::anyhow!("no endpoint of the last service"))?;
    apply(&mut state, Command::SetEndpointHealth { id, healthy: false, registrar: None })?;
    let since = state.revision - 1;
    const LOOKS: u32 = 2_000;
    let mut per_change = Vec::new();
    for (scope, what) in [(&Scope::All, "full"), (&calls, "scoped"), (&Scope::OwnCluster, "gateway")] {
        let t = Instant::now();
        let mut sent = 0usize;
        for _ in 0..LOOKS {
            sent += build_response(&state, since, "c00", scope, &[]).map_or(0, |r| r.encoded_len());
        }
        per_change.push((what, t.elapsed().as_secs_f64() * 1e6 / f64::from(LOOKS), sent / LOOKS as usize));
    }

    let labels = json!({"clusters": clusters, "endpoints": endpoints, "services": services});
    let state_mib = rss_after - rss_before;
    report.figure(SCENARIO, "state_memory", labels.clone(), state_mib, "MiB");
    report.figure(
        SCENARIO,
        "state_memory_per_endpoint",
        labels.clone(),
        state_mib * 1_048_576.0 / endpoints as f64,
        "B",
    );
    report.figure(SCENARIO, "snapshot_size", labels.clone(), snapshot.len() as f64 / 1_048_576.0, "MiB");
    report.figure(SCENARIO, "snapshot_encode", labels.clone(), encode_ms, "ms");
    report.figure(SCENARIO, "snapshot_decode", labels.clone(), decode_ms, "ms");
    report.figure(SCENARIO, "endpoint_applies_per_second", labels.clone(), endpoints as f64 / apply_s.max(1e-9), "1/s");
    report.figure(
        SCENARIO,
        "full_view_one_proxy",
        json!({"clusters": clusters, "endpoints": endpoints, "services": services, "endpoints_in_view": view.endpoints.len()}),
        view.encoded_len() as f64 / 1_048_576.0,
        "MiB",
    );
    report.figure(SCENARIO, "full_view_build", labels.clone(), full_ms, "ms");
    let scoped_labels = json!({"clusters": clusters, "endpoints": endpoints, "services": services,
        "subscribed": services.min(10), "endpoints_in_view": scoped.endpoints.len()});
    report.figure(
        SCENARIO,
        "scoped_view_one_proxy",
        scoped_labels.clone(),
        scoped.encoded_len() as f64 / 1_048_576.0,
        "MiB",
    );
    report.figure(SCENARIO, "scoped_view_build", scoped_labels, scoped_ms, "ms");
    let gateway_labels = json!({"clusters": clusters, "endpoints": endpoints, "services": services,
        "endpoints_in_view": gateway.endpoints.len()});
    report.figure(SCENARIO, "gateway_view", gateway_labels.clone(), gateway.encoded_len() as f64 / 1_048_576.0, "MiB");
    report.figure(SCENARIO, "gateway_view_build", gateway_labels, gateway_ms, "ms");
    for (what, us, bytes) in per_change {
        let labels = json!({"clusters": clusters, "endpoints": endpoints, "view": what, "bytes_sent": bytes,
            "change_log": state.changes.len()});
        report.figure(SCENARIO, "one_change_per_session", labels, us, "us");
    }
    endpoint_pick(clusters, report)
}

/// What a proxy's endpoint choice costs per request for one service of 10 to 10,000 endpoints
/// spread over `clusters` clusters (five regions, three zones), seen from cluster c00: the pick,
/// the in-flight mark and the latency sample, as every request does them, with the outbound
/// side's real balancer and gateway-reachability check. Every endpoint is healthy; the nearest
/// tier (cluster c00's zone z0) holds a 150th of them.
fn endpoint_pick(clusters: usize, report: &mut Report) -> anyhow::Result<()> {
    use std::sync::Arc;
    use trellis_proxy::balance::{Balancer, Locality, Reach};
    use trellis_proxy::gateways::GatewayHealth;
    use trellis_proxy::metrics::Metrics;
    use trellis_proxy::routes::{Endpoint as ProxyEndpoint, EndpointList, ServiceName};

    let service = ServiceName::new("big", "default")?;
    for n in [10usize, 100, 1_000, 10_000] {
        let list: EndpointList = (0..n)
            .map(|e| {
                let c = e % clusters;
                Arc::new(ProxyEndpoint {
                    id: format!("c{c:02}/default/big/pod-{e}"),
                    service: service.clone(),
                    cluster: format!("c{c:02}"),
                    zone: format!("z{}", e % 3),
                    region: format!("r{}", c % 5),
                    gateways: vec![format!("10.{c}.0.1:15443")],
                    via_gateways: true,
                    address: format!("10.{c}.{}.{}:15006", (e / 250) % 250, e % 250 + 1),
                    identity: None,
                    healthy: true,
                    weight: 1,
                })
            })
            .collect();
        let balancer = Balancer::with_locality(Locality { cluster: "c00".into(), zone: "z0".into() });
        let gateways = GatewayHealth::new(Metrics::new());
        let reachable = |ep: &ProxyEndpoint| gateways.reachable(ep, "c00");
        let one = || -> anyhow::Result<()> {
            let reach = Reach { generation: gateways.generation(), reachable: &reachable };
            let (_, load) = balancer
                .pick_where(&list, &|_| false, "r0", reach)
                .ok_or_else(|| anyhow::anyhow!("no endpoint picked among {n}"))?;
            load.start().success();
            Ok(())
        };
        for _ in 0..100 {
            one()?;
        }
        let picks = (2_000_000 / n).clamp(200, 200_000);
        let t = Instant::now();
        for _ in 0..picks {
            one()?;
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / picks as f64;
        report.figure(SCENARIO, "endpoint_pick", json!({"endpoints": n, "clusters": clusters.min(n)}), us, "us");
    }
    Ok(())
}
