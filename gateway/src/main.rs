//! `trellis-gateway`: the east-west gateway binary.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let config = trellis_gateway::Config::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,h2=warn,hyper=warn,rustls=warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    let runtime = match trellis_proxy::runtime(config.threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("trellis-gateway: cannot start the runtime with --threads {}: {e}", config.threads);
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(trellis_gateway::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}
