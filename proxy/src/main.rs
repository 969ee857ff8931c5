//! `trellis-proxy`: parses the configuration, sets up logging and runs [`trellis_proxy::app`].

use std::process::ExitCode;

use clap::Parser;
use trellis_proxy::Config;
use trellis_proxy::config::LogFormat;

const DEFAULT_FILTER: &str = "info,h2=warn,hyper=warn,tower=warn,rustls=warn";

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let app = trellis_proxy::build(config).await?;
    app.wait_termination().await?;
    Ok(())
}

fn main() -> ExitCode {
    let config = Config::parse();
    init_tracing(config.log_format);
    let runtime = match trellis_proxy::runtime(config.threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("trellis-proxy: cannot start the runtime with --threads {}: {e}", config.threads);
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, the message already says what to do.
            eprintln!("trellis-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
