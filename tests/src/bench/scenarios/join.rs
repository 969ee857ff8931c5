//! `join`: time from starting a new cluster's control plane with a join token to the first
//! successful request from a workload of that cluster to an exported service of the first
//! cluster, over mTLS. Cluster A (control plane, `api.default` exported, its application and
//! proxy) runs throughout; each round joins a new cluster and starts a client proxy in it as soon
//! as its control plane is serving, then polls until a request succeeds.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::bench::report::Report;
use crate::harness::{ControlPlane, Proc, bin, trellis, wait_ready};
use crate::mesh::workload_token;

const SCENARIO: &str = "join";

fn spawn(dir: &Path, name: &str, program: &str, args: &[String]) -> anyhow::Result<(Proc, Value)> {
    let ready = dir.join(format!("{name}.ready"));
    let mut args = args.to_vec();
    args.push("--ready-file".into());
    args.push(ready.display().to_string());
    let mut p = Proc::spawn(name, &bin(program), &args, &dir.join(format!("{name}.log")), &[("RUST_LOG", "warn")]);
    let v = wait_ready(&mut p, &ready, Duration::from_secs(60));
    Ok((p, v))
}

fn get(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Runs `rounds` joins.
pub fn run(rounds: u32, report: &mut Report) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dir = dir.path();
    let config = dir.join("cli.yaml");
    let a = ControlPlane::start(dir, "a", "127.0.1.1");
    anyhow::ensure!(trellis(&config, &["config", "import", &a.admin_context.display().to_string()]).status.success());
    anyhow::ensure!(
        trellis(&config, &["create-service", "api.default", "--port", "80", "--exported"]).status.success(),
        "create-service failed"
    );
    let (_app, app) = spawn(
        dir,
        "api-app",
        "trellis",
        &s(&["demo-app", "--name", "api", "--cluster", "a", "--listen", "127.0.1.10:0"]),
    )?;
    let app_addr = app["addr"].as_str().unwrap_or_default().to_string();
    let token = workload_token(&config, "api")?;
    let (_server, _) = spawn(
        dir,
        "api-proxy",
        "trellis-proxy",
        &s(&[
            "--control-plane",
            &a.grpc,
            "--trust-bundle",
            &a.trust_bundle.display().to_string(),
            "--token",
            &token,
            "--service-account",
            "api",
            "--cluster",
            "a",
            "--service",
            "api.default",
            "--app",
            &app_addr,
            "--inbound",
            "127.0.1.2:0",
        ]),
    )?;
    let mut keep = Vec::new();
    let mut times = Vec::new();
    for round in 0..rounds {
        let cluster = format!("j{round}");
        let ip = format!("127.0.{}.1", round + 2);
        let out = trellis(&config, &["token", "create", "--ttl", "10m"]);
        anyhow::ensure!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
        let token_file = dir.join(format!("{cluster}.token"));
        std::fs::write(&token_file, &out.stdout)?;
        let workload = workload_token(&config, "client")?;
        let started = Instant::now();
        let (cp, ready) = spawn(
            dir,
            &format!("{cluster}-cp"),
            "trellis-cp",
            &s(&[
                "--data-dir",
                &dir.join(&cluster).display().to_string(),
                "--cluster",
                &cluster,
                "--region",
                "r",
                "--listen",
                &format!("{ip}:0"),
                "--join-token-file",
                &token_file.display().to_string(),
            ]),
        )?;
        let grpc = ready["grpc"].as_str().unwrap_or_default().to_string();
        // The new cluster's bundle file appears once its replica has caught up; the first
        // cluster's file holds the same root.
        let (client, ready) = spawn(
            dir,
            &format!("{cluster}-client"),
            "trellis-proxy",
            &s(&[
                "--control-plane",
                &grpc,
                "--trust-bundle",
                &a.trust_bundle.display().to_string(),
                "--token",
                &workload,
                "--service-account",
                "client",
                "--cluster",
                &cluster,
                "--upstream",
                &format!("api.default={ip}:0"),
            ]),
        )?;
        let upstream = ready["upstreams"]["api.default"].as_str().unwrap_or_default().to_string();
        while !get(&upstream) {
            anyhow::ensure!(started.elapsed() < Duration::from_secs(60), "{cluster}: no successful request in 60 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        times.push(started.elapsed());
        keep.push((cp, client));
    }
    let mut ms: Vec<f64> = times.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let labels = json!({"rounds": rounds});
    report.figure(SCENARIO, "join to first cross-cluster request (median)", labels.clone(), ms[ms.len() / 2], "ms");
    report.figure(SCENARIO, "join to first cross-cluster request (max)", labels, ms[ms.len() - 1], "ms");
    Ok(())
}
