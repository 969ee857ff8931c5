//! `trellis-gateway`: the east-west gateway binary.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("trellis-gateway: {}", trellis_gateway::NOT_AVAILABLE);
    ExitCode::from(2)
}
