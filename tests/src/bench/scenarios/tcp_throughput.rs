//! `tcp-throughput`: one bulk stream through the direct path, Trellis (opaque TCP over mTLS) and
//! HAProxy (TCP over mutual TLS), alternating. The sink echoes the byte count, so every byte is
//! known to have arrived.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::bench::report::Report;
use crate::bench::{haproxy, upstream};
use crate::mesh::OneHop;

const SCENARIO: &str = "tcp-throughput";

async fn stream(addr: &str, bytes: u64) -> anyhow::Result<Duration> {
    let mut tcp = TcpStream::connect(addr).await?;
    let chunk = vec![b'z'; 64 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        tcp.write_all(&chunk).await?;
        sent += chunk.len() as u64;
    }
    tcp.shutdown().await?;
    let mut count = [0u8; 8];
    tcp.read_exact(&mut count).await?;
    let elapsed = start.elapsed();
    anyhow::ensure!(u64::from_be_bytes(count) == sent, "sink got {} of {sent} bytes", u64::from_be_bytes(count));
    Ok(elapsed)
}

/// Runs the scenario: `mib` MiB per stream, `rounds` alternations.
pub async fn run(mib: u64, rounds: u32, report: &mut Report) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sink = upstream::tcp_sink("127.0.0.1").await?.to_string();
    let dir_path = dir.path().to_path_buf();
    let sink2 = sink.clone();
    let mesh = tokio::task::spawn_blocking(move || OneHop::start(&dir_path, &sink2, "tcp")).await??;
    let ha = if haproxy::available() {
        let dir_path = dir.path().to_path_buf();
        let sink2 = sink.clone();
        Some(tokio::task::spawn_blocking(move || haproxy::start(&dir_path, &sink2, "tcp", false)).await??)
    } else {
        report.skipped(SCENARIO, "haproxy path: `haproxy` is not installed");
        None
    };
    let mut paths = vec![("direct", sink.clone()), ("trellis", mesh.outbound.clone())];
    if let Some(h) = &ha {
        paths.push(("haproxy", h.entry.clone()));
    }
    let bytes = mib * 1024 * 1024;
    let mut totals = vec![Duration::ZERO; paths.len()];
    for _ in 0..rounds {
        for (i, (_, addr)) in paths.iter().enumerate() {
            totals[i] += stream(addr, bytes).await?;
        }
    }
    for (i, (name, _)) in paths.iter().enumerate() {
        let mibs = (mib * u64::from(rounds)) as f64 / totals[i].as_secs_f64();
        report.figure(SCENARIO, "throughput", json!({"path": name, "stream_mib": mib}), mibs, "MiB/s");
    }
    Ok(())
}
