//! HAProxy (Debian's package) doing the same two hops as two Trellis proxies: a local frontend
//! that forwards over mutual TLS (HTTP/2 with connection reuse) to a second HAProxy in front of
//! the application. Certificates come from the same kind of CA as the mesh's.

use std::path::Path;
use std::time::Duration;

use trellis_federation::ca::{Ca, INTERMEDIATE_TTL, LEAF_TTL, ROOT_TTL};
use trellis_proto::SpiffeId;

use crate::harness::{Proc, free_port};

/// The path is built when `haproxy` is installed.
pub fn available() -> bool {
    std::process::Command::new("haproxy").arg("-v").output().map(|o| o.status.success()).unwrap_or(false)
}

/// A running pair of HAProxy processes, shaped like two sidecars: the client-side one takes the
/// application's plain connection and forwards over mutual TLS to the server-side one in front of
/// the application. Each runs one thread, as each Trellis proxy does by default.
pub struct HaproxyPair {
    pub client: Proc,
    pub server: Proc,
    /// The client-side frontend.
    pub entry: String,
}

impl HaproxyPair {
    /// The two processes with a label each, client side first.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        vec![("client-haproxy", self.client.pid()), ("server-haproxy", self.server.pid())]
    }
}

/// Starts the pair in front of `app`; `mode` is "http" (HTTP/1.1 or HTTP/2 application as
/// `app_h2`) or "tcp".
pub fn start(dir: &Path, app: &str, mode: &str, app_h2: bool) -> anyhow::Result<HaproxyPair> {
    let root = Ca::new_root("trellis.local", ROOT_TTL)?;
    let inter = root.issue_intermediate("bench", INTERMEDIATE_TTL)?;
    let write_pair = |name: &str| -> anyhow::Result<()> {
        let id = SpiffeId::workload("trellis.local", "default", name)?;
        let (leaf, key) = inter.issue_leaf(&id, LEAF_TTL)?;
        let mut pem = leaf.cert_pem.clone();
        for c in &leaf.chain_pem {
            pem.push_str(c);
        }
        pem.push_str(&key);
        std::fs::write(dir.join(format!("{name}.pem")), pem)?;
        Ok(())
    };
    write_pair("haproxy-client")?;
    write_pair("haproxy-server")?;
    std::fs::write(dir.join("root.pem"), root.cert_pem())?;
    let entry = format!("127.0.3.1:{}", free_port("127.0.3.1"));
    let hop = format!("127.0.3.2:{}", free_port("127.0.3.2"));
    let d = dir.display();
    let (hop_alpn, app_proto) = match mode {
        "http" => (" alpn h2", if app_h2 { " proto h2" } else { "" }),
        _ => ("", ""),
    };
    let defaults = format!(
        "global\n  maxconn 4096\n  nbthread 1\n  tune.ssl.default-dh-param 2048\n\
         defaults\n  mode {mode}\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n{reuse}",
        reuse = if mode == "http" { "  http-reuse always\n" } else { "" },
    );
    let client_cfg = format!(
        "{defaults}frontend entry\n  bind {entry}{entry_proto}\n  default_backend hop\n\
         backend hop\n  server b {hop} ssl verify required ca-file {d}/root.pem crt {d}/haproxy-client.pem{hop_alpn}\n",
        entry_proto = if mode == "http" && app_h2 { " proto h2" } else { "" },
    );
    let server_cfg = format!(
        "{defaults}frontend inbound\n  bind {hop} ssl crt {d}/haproxy-server.pem ca-file {d}/root.pem verify required{hop_alpn}\n  default_backend app\n\
         backend app\n  server app {app}{app_proto}\n",
    );
    let server = spawn(dir, "haproxy-server", &server_cfg, &hop)?;
    let client = spawn(dir, "haproxy-client", &client_cfg, &entry)?;
    Ok(HaproxyPair { client, server, entry })
}

/// Starts one HAProxy process with `cfg` and waits until it listens on `addr`.
fn spawn(dir: &Path, name: &str, cfg: &str, addr: &str) -> anyhow::Result<Proc> {
    let cfg_path = dir.join(format!("{name}.cfg"));
    std::fs::write(&cfg_path, cfg)?;
    let mut proc = Proc::spawn(
        name,
        Path::new("haproxy"),
        &["-db".into(), "-f".into(), cfg_path.display().to_string()],
        &dir.join(format!("{name}.log")),
        &[],
    );
    proc.wait_listening(addr, Duration::from_secs(10))?;
    Ok(proc)
}
