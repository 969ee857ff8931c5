//! The floor under any pair of sidecars: two plain TCP relays, each its own process on one
//! Tokio thread, that copy bytes both ways (no TLS, no HTTP). What they add over the direct path
//! is what two extra processes on the path cost on this machine, before any proxy does any work.

use std::path::Path;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::harness::{Proc, free_port};

/// The subcommand of `trellis-bench` that runs one relay: `trellis-bench relay LISTEN TO`.
pub const SUBCOMMAND: &str = "relay";

/// Runs one relay until the process is killed: every connection to `listen` is copied both ways
/// to a new connection to `to`.
pub fn serve(listen: &str, to: &str) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let listener = TcpListener::bind(listen).await?;
        loop {
            let mut inbound = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors under saturation, say: wait and go on.
                    eprintln!("relay: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let to = to.to_string();
            tokio::spawn(async move {
                let Ok(mut outbound) = TcpStream::connect(&to).await else { return };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    })
}

/// Two running relays: entry → second relay → the application.
pub struct RelayPair {
    pub client: Proc,
    pub server: Proc,
    pub entry: String,
}

impl RelayPair {
    /// The two processes with a label each, client side first.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        vec![("client-relay", self.client.pid()), ("server-relay", self.server.pid())]
    }
}

/// Starts the pair in front of `app`, re-running this executable as `relay`.
pub fn start(dir: &Path, app: &str) -> anyhow::Result<RelayPair> {
    let exe = std::env::current_exe()?;
    let entry = format!("127.0.4.1:{}", free_port("127.0.4.1"));
    let hop = format!("127.0.4.2:{}", free_port("127.0.4.2"));
    let spawn = |name: &str, listen: &str, to: &str| -> anyhow::Result<Proc> {
        let mut p = Proc::spawn(
            name,
            &exe,
            &[SUBCOMMAND.into(), listen.into(), to.into()],
            &dir.join(format!("{name}.log")),
            &[],
        );
        p.wait_listening(listen, Duration::from_secs(10))?;
        Ok(p)
    };
    let server = spawn("server-relay", &hop, app)?;
    let client = spawn("client-relay", &entry, &hop)?;
    Ok(RelayPair { client, server, entry })
}
