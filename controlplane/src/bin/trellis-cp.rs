//! `trellis-cp`: one control-plane instance.

use clap::Parser;
use trellis_controlplane::config::CpConfig;
use trellis_controlplane::telemetry::{self, LogFormat};

/// The Trellis control plane.
#[derive(Parser)]
#[command(name = "trellis-cp", version, about = "Trellis control plane: registry, discovery, certificates, admin")]
struct Args {
    #[command(flatten)]
    config: CpConfig,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "TRELLIS_LOG_FORMAT")]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    telemetry::init(args.log_format, "info");
    match trellis_controlplane::app::build(args.config).await {
        Ok(handle) => {
            if handle.wait_termination().await {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("trellis-cp: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
