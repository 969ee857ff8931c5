//! A one-cluster mesh of real processes: a control plane, a server proxy in front of an
//! application and a client proxy with a local listener for that application's service.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::{ControlPlane, Proc, bin, trellis, wait_ready};

/// A control plane and two proxies: client → (mTLS) → server → application.
pub struct OneHop {
    pub cp: ControlPlane,
    pub server_proxy: Proc,
    pub client_proxy: Proc,
    /// The client proxy's local listener for the service.
    pub outbound: String,
    pub config: PathBuf,
}

/// Creates a workload token with the CLI.
pub fn workload_token(config: &Path, service_account: &str) -> anyhow::Result<String> {
    let o = trellis(config, &["token", "workload", "create", "--service-account", service_account, "--ttl", "2h"]);
    anyhow::ensure!(o.status.success(), "token creation failed: {}", String::from_utf8_lossy(&o.stderr));
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

impl OneHop {
    /// Starts the mesh in `dir` for an application at `app` speaking `protocol` (http, grpc, tcp).
    pub fn start(dir: &Path, app: &str, protocol: &str) -> anyhow::Result<Self> {
        let cp = ControlPlane::start(dir, "a", "127.0.1.1");
        let config = dir.join("trellis-config");
        let o = trellis(&config, &["config", "import", cp.admin_context.to_str().unwrap_or_default()]);
        anyhow::ensure!(o.status.success(), "context import failed: {}", String::from_utf8_lossy(&o.stderr));
        let proxy = |name: &str, sa: &str, extra: &[String]| -> anyhow::Result<(Proc, serde_json::Value)> {
            let token = workload_token(&config, sa)?;
            let ready = dir.join(format!("{name}.ready"));
            let mut args: Vec<String> = vec![
                "--control-plane".into(),
                cp.grpc.clone(),
                "--trust-bundle".into(),
                cp.trust_bundle.display().to_string(),
                "--token".into(),
                token,
                "--service-account".into(),
                sa.into(),
                "--cluster".into(),
                "a".into(),
                "--instance".into(),
                name.into(),
                "--ready-file".into(),
                ready.display().to_string(),
            ];
            args.extend_from_slice(extra);
            let mut p = Proc::spawn(
                name,
                &bin("trellis-proxy"),
                &args,
                &dir.join(format!("{name}.log")),
                &[("RUST_LOG", "warn")],
            );
            let v = wait_ready(&mut p, &ready, Duration::from_secs(30));
            Ok((p, v))
        };
        let (server_proxy, _) = proxy(
            "server-proxy",
            "server",
            &[
                "--service".into(),
                "bench.default".into(),
                "--protocol".into(),
                protocol.into(),
                "--app".into(),
                app.into(),
                "--inbound".into(),
                "127.0.1.2:0".into(),
            ],
        )?;
        let (client_proxy, ready) =
            proxy("client-proxy", "client", &["--upstream".into(), "bench.default=127.0.1.3:0".into()])?;
        let outbound = ready["upstreams"]["bench.default"].as_str().unwrap_or_default().to_string();
        anyhow::ensure!(!outbound.is_empty(), "client proxy reported no upstream listener: {ready}");
        Ok(Self { cp, server_proxy, client_proxy, outbound, config })
    }
}

/// A workload certificate for `ns/default/sa/<sa>` from the control plane at `cp`, paid for with
/// a workload `token` (the key is made here); the identity and its SPIFFE ID.
pub async fn workload_certificate(
    cp: &str,
    td: &str,
    bundle: &trellis_proto::verify::SharedBundle,
    token: &str,
    sa: &str,
) -> anyhow::Result<(trellis_proto::tls::Identity, trellis_proto::SpiffeId)> {
    use trellis_proto::pb;
    let id = trellis_proto::SpiffeId::workload(td, "default", sa)?;
    let (csr_pem, key_pem) = trellis_federation::ca::new_csr(&id)?;
    let tls = trellis_proto::tls::client_config(
        None,
        bundle.clone(),
        trellis_proto::verify::IdMatcher::AnyControlPlane,
        &[b"h2"],
    )?;
    let mut client = pb::certificates_client::CertificatesClient::new(trellis_proto::grpc::channel(cp, tls)?);
    let r = client
        .sign(pb::SignRequest {
            csr_pem,
            workload_token: token.to_string(),
            namespace: "default".into(),
            service_account: sa.into(),
            ttl_seconds: 0,
            gateway: false,
        })
        .await?
        .into_inner();
    let chain: String = std::iter::once(r.certificate_pem).chain(r.chain_pem).collect();
    Ok((trellis_proto::tls::Identity::from_pem(&chain, &key_pem)?, id))
}
