//! A cluster cut off from the federation, with real processes in network namespaces: clusters
//! A, B and C each in their own namespace on one bridge; C's link is taken down under constant
//! load. C keeps serving its own traffic, A and B keep calling each other, a workload that
//! starts in C during the cut is served to C's callers at once, and it reaches A and B after the
//! link comes back.
//!
//! Needs root and iproute2 (network namespaces); `.ci/run` runs it with `--ignored`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_tests::world::{Load, NAMES, WorkloadSpec, World, served_from};

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

#[test]
#[ignore = "needs root and iproute2 (network namespaces); run by .ci/run with --ignored"]
fn a_cluster_cut_off_keeps_serving_itself_and_its_changes_reach_the_others_after_the_heal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut w = World::new("trp", tmp.path(), NAMES);

    // A bootstraps; B and C join with a token each.
    w.federation();

    // api is exported and runs in B; local is C's own; late is exported and starts in C during
    // the cut. Tokens are made now: creating one is a write, and C cannot write during the cut.
    w.cli_ok(&["create-service", "api.default", "--port", "80", "--exported"]);
    w.cli_ok(&["create-service", "home.default", "--port", "80", "--exported"]);
    w.cli_ok(&["create-service", "local.default", "--port", "80"]);
    w.cli_ok(&["create-service", "late.default", "--port", "80", "--exported"]);
    let token = |sa: &str| {
        w.cli_ok(&["token", "workload", "create", "--service-account", sa, "--ttl", "2h"]).trim().to_string()
    };
    let tokens: BTreeMap<&str, String> =
        ["api", "home", "local", "late", "web", "visitor", "client"].map(|sa| (sa, token(sa))).into();
    let spec = |cluster: usize, sa: &'static str, service: Option<&'static str>, upstreams: &'static [&'static str]| {
        WorkloadSpec { cluster, service_account: sa, token: &tokens[sa], service, upstreams, ..Default::default() }
    };
    w.workload(&spec(B, "api", Some("api.default"), &[]));
    w.workload(&spec(A, "home", Some("home.default"), &[]));
    let in_b = w.workload(&spec(B, "visitor", None, &["home.default"])).upstreams;
    w.workload(&spec(C, "local", Some("local.default"), &[]));
    let in_a = w.workload(&spec(A, "web", None, &["api.default", "late.default"])).upstreams;
    let in_c = w.workload(&spec(C, "client", None, &["local.default", "late.default"])).upstreams;
    served_from(&w.fabric, A, &in_a["api.default"], "b", Duration::from_secs(30)).expect("A → api in B");
    served_from(&w.fabric, B, &in_b["home.default"], "a", Duration::from_secs(30)).expect("B → home in A");
    served_from(&w.fabric, C, &in_c["local.default"], "c", Duration::from_secs(30)).expect("C → local in C");

    // Constant load: A → B and C → C.
    let (a_to_b, ta) = Load::start(&w.fabric, A, in_a["api.default"].clone());
    let (b_to_a, tb) = Load::start(&w.fabric, B, in_b["home.default"].clone());
    let (c_local, tc) = Load::start(&w.fabric, C, in_c["local.default"].clone());
    std::thread::sleep(Duration::from_secs(2));

    // Cut C off.
    w.fabric.cut(C);
    let cut_at = Instant::now();
    // A workload starts in C during the cut: C's control plane cannot commit its registration,
    // serves it to C's proxies anyway, and says so.
    w.workload(&spec(C, "late", Some("late.default"), &[]));
    let took = served_from(&w.fabric, C, &in_c["late.default"], "c", Duration::from_secs(30))
        .expect("C's callers reach the workload that started during the cut");
    eprintln!("during the cut: C's callers reached the new workload {took:?} after it started");
    let config_c = w.config_for(C);
    let status = w.cli_with(C, &config_c, &["status", "-o", "json"]);
    let status: Value = serde_json::from_slice(&status.stdout).expect("status of C");
    let warnings = status["warnings"].to_string();
    assert!(warnings.contains("wait for the group's quorum"), "C's status should say so: {status}");
    // A and B have not heard of it.
    assert!(!w.endpoint_ids().iter().any(|id| id.contains("/late/")), "A saw C's change through a cut link");
    std::thread::sleep(Duration::from_secs(3).saturating_sub(cut_at.elapsed()));

    // Heal: C's change commits and A's callers reach the workload in C.
    w.fabric.heal(C);
    let healed = Instant::now();
    let took = served_from(&w.fabric, A, &in_a["late.default"], "c", Duration::from_secs(60))
        .expect("after the heal, A's callers reach the workload that started in C during the cut");
    eprintln!("after the heal: A reached it {took:?} after the link came back");
    let ids = w.endpoint_ids();
    assert!(ids.iter().any(|id| id == "c/default/late/late-1"), "A's registry: {ids:?}");
    assert!(healed.elapsed() < Duration::from_secs(60));

    std::thread::sleep(Duration::from_secs(1));
    for l in [&a_to_b, &b_to_a, &c_local] {
        l.stop.store(true, Ordering::Relaxed);
    }
    ta.join().expect("load thread");
    tb.join().expect("load thread");
    tc.join().expect("load thread");
    for (name, l) in [("A → api (B)", &a_to_b), ("B → home (A)", &b_to_a), ("C → local (C)", &c_local)] {
        let (ok, failed) = (l.ok.load(Ordering::Relaxed), l.failed.load(Ordering::Relaxed));
        let by = l.served_by.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let errors = l.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
        eprintln!("{name}: {ok} served ({by:?}), {failed} failed");
        assert!(ok > 200, "{name}: too little traffic to tell ({ok})");
        assert_eq!(failed, 0, "{name}: requests failed during the cut: {:?}", &errors[..errors.len().min(5)]);
    }
}
