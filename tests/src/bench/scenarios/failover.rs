//! `failover`: `trellis demo --scenario failover` run several times (three clusters; `api` in
//! each; its backends in a killed under constant load from a, then b's gateway killed while a's
//! traffic is on b, then both restored). Figures: median and max over the runs of the time from
//! the kill to the last request served by the lost side (0: none after the kill), from the kill
//! to the first request served by the next cluster, the failback time (from the restored side
//! being ready to its first request; it includes the proxy's 1 s failback hold), and the failed
//! requests (all runs together).

use serde_json::json;

use crate::bench::report::Report;
use crate::harness::failover_demo;

const SCENARIO: &str = "failover";

fn median_max(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() - 1])
}

/// Runs the demo scenario `runs` times.
pub fn run(runs: u32, report: &mut Report) -> anyhow::Result<()> {
    anyhow::ensure!(runs > 0, "--failover-runs must be at least 1");
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    let keys = [
        "failover_ms",
        "failover_to_b_ms",
        "failback_ms",
        "gateway_failover_ms",
        "gateway_failover_to_c_ms",
        "gateway_failback_ms",
    ];
    let mut figures: Vec<Vec<f64>> = vec![Vec::new(); keys.len()];
    let (mut failed, mut requests) = (0u64, 0u64);
    for run in 0..runs {
        let (_, r) =
            failover_demo(&config, [2, 4, 6, 8], 11).map_err(|e| anyhow::anyhow!("failover run {run}: {e}"))?;
        failed += r["failed"].as_u64().unwrap_or(0);
        requests += r["requests"].as_u64().unwrap_or(0);
        for (i, k) in keys.iter().enumerate() {
            let v = r[*k].as_f64().ok_or_else(|| anyhow::anyhow!("run {run}: {k} not seen: {r}"))?;
            figures[i].push(v);
        }
        eprintln!(
            "failover run {}/{runs}: failed {}, {}",
            run + 1,
            r["failed"],
            keys.map(|k| format!("{k} {}", r[k])).join(", ")
        );
    }
    for (k, v) in keys.iter().zip(figures.iter_mut()) {
        let (median, max) = median_max(v);
        let name = k.trim_end_matches("_ms");
        report.figure(SCENARIO, &format!("{name}_median"), json!({"runs": runs}), median, "ms");
        report.figure(SCENARIO, &format!("{name}_max"), json!({"runs": runs}), max, "ms");
    }
    report.figure(SCENARIO, "failed_requests", json!({"runs": runs, "requests": requests}), failed as f64, "requests");
    Ok(())
}
