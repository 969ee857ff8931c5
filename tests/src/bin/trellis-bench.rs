//! `trellis-bench`: measures the mesh side by side with the direct path and a peer proxy.
//! Prints one JSON object per figure on stdout and a table on stderr. See tests/README.md.

use std::time::Duration;

use clap::Parser;
use trellis_tests::bench::load::Proto;
use trellis_tests::bench::relay;
use trellis_tests::bench::report::Report;
use trellis_tests::bench::scenarios::{
    self, config_propagation, cross_cluster, failover, join, proxy_latency, raft, scale, tcp_throughput,
};

#[derive(Parser)]
#[command(name = "trellis-bench", about = "Trellis benchmark scenarios (build the workspace in release mode first)")]
struct Args {
    /// Scenario to run, or `all`.
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(
        ["all", "proxy-latency", "tcp-throughput", "cross-cluster", "config-propagation", "failover", "join", "raft", "scale"]))]
    scenario: String,
    /// Request rates for proxy-latency, requests per second.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
    rates: Vec<u32>,
    /// Seconds per path per round.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Alternations of the paths.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Connections (HTTP/1.1) or concurrent streams (HTTP/2).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Protocols for proxy-latency.
    #[arg(long, value_delimiter = ',', default_value = "http1,grpc")]
    protocols: Vec<String>,
    /// Seconds of the one-core saturation run (0 skips it).
    #[arg(long, default_value_t = 5)]
    saturation: u64,
    /// Clusters joined by the join scenario (one measurement each).
    #[arg(long, default_value_t = 10)]
    joins: u32,
    /// Concurrent writers for the raft scenario's throughput figure.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Subscriber counts for config-propagation (spread over three clusters).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    subscribers: Vec<usize>,
    /// MiB per stream for tcp-throughput.
    #[arg(long, default_value_t = 256)]
    stream_mib: u64,
    /// Request rate of the cross-cluster latency figures, requests per second.
    #[arg(long, default_value_t = 1000)]
    cross_cluster_rate: u32,
    /// New connections per path per round for cross-cluster.
    #[arg(long, default_value_t = 300)]
    new_connections: usize,
    /// Runs of the failover scenario (each a whole failover and failback).
    #[arg(long, default_value_t = 10)]
    failover_runs: u32,
    /// Clusters of the scale scenario.
    #[arg(long, default_value_t = 50)]
    scale_clusters: usize,
    /// Endpoints of the scale scenario.
    #[arg(long, default_value_t = 100_000)]
    scale_endpoints: usize,
    /// Exported services of the scale scenario.
    #[arg(long, default_value_t = 1_000)]
    scale_services: usize,
}

fn main() -> anyhow::Result<()> {
    // The relay floor of proxy-latency runs as this executable in its own process.
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(relay::SUBCOMMAND) {
        let [_, _, listen, to] = argv.as_slice() else {
            anyhow::bail!("usage: trellis-bench relay LISTEN_ADDR TO_ADDR");
        };
        return relay::serve(listen, to);
    }
    tokio::runtime::Runtime::new()?.block_on(bench(Args::parse()))
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let protos = args
        .protocols
        .iter()
        .map(|p| match p.as_str() {
            "http1" | "http" => Ok(Proto::Http1),
            "grpc" | "h2" | "http2" => Ok(Proto::Http2),
            other => Err(anyhow::anyhow!("--protocols: '{other}' is not http1 or grpc")),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let names: Vec<&str> = if args.scenario == "all" { scenarios::ALL.to_vec() } else { vec![args.scenario.as_str()] };
    let mut report = Report::default();
    for name in names {
        if let Some(reason) = scenarios::not_built(name) {
            report.skipped(name, reason);
            continue;
        }
        match name {
            "proxy-latency" => {
                let opts = proxy_latency::Opts {
                    rates: args.rates.clone(),
                    duration: Duration::from_secs(args.duration),
                    rounds: args.rounds,
                    conns: args.connections,
                    protos: protos.clone(),
                    saturation: Duration::from_secs(args.saturation),
                };
                proxy_latency::run(&opts, &mut report).await?;
            }
            "tcp-throughput" => tcp_throughput::run(args.stream_mib, args.rounds, &mut report).await?,
            "cross-cluster" => {
                let opts = cross_cluster::Opts {
                    rate: args.cross_cluster_rate,
                    duration: Duration::from_secs(args.duration),
                    rounds: args.rounds,
                    conns: args.connections,
                    new_conns: args.new_connections,
                };
                cross_cluster::run(&opts, &mut report).await?;
            }
            "failover" => {
                let runs = args.failover_runs;
                let mut r = Report::default();
                let r = tokio::task::spawn_blocking(move || failover::run(runs, &mut r).map(|()| r)).await??;
                report.extend(r);
            }
            "join" => {
                let rounds = args.joins;
                let mut r = Report::default();
                let r = tokio::task::spawn_blocking(move || join::run(rounds, &mut r).map(|()| r)).await??;
                report.extend(r);
            }
            "config-propagation" => config_propagation::run(&args.subscribers, &mut report).await?,
            "raft" => {
                let opts = raft::Opts {
                    duration: Duration::from_secs(args.duration),
                    rounds: args.rounds,
                    clients: args.clients,
                };
                raft::run(&opts, &mut report).await?;
            }
            "scale" => scale::run(args.scale_clusters, args.scale_endpoints, args.scale_services, &mut report)?,
            other => report.skipped(other, "unknown scenario"),
        }
    }
    eprintln!("\n{}", report.table());
    Ok(())
}
