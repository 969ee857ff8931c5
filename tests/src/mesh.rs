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

/// Two clusters of real processes for the cross-cluster path: A bootstraps, B joins with a token
/// and runs an east-west gateway. One application serves both `near.default` (a server proxy in
/// A) and `far.default` (exported, a server proxy in B); a client proxy in A has a local listener
/// for each, so the in-cluster and the cross-cluster paths differ only by the gateway tunnel.
pub struct TwoClusters {
    pub a: ControlPlane,
    pub b: Proc,
    pub gateway: Proc,
    pub near_proxy: Proc,
    pub far_proxy: Proc,
    pub client_proxy: Proc,
    /// The client proxy's listener for `near.default` (in-cluster path).
    pub near: String,
    /// The client proxy's listener for `far.default` (through B's gateway).
    pub far: String,
    /// Admin address of the client proxy.
    pub client_admin: String,
    /// Admin address of B's gateway.
    pub gateway_admin: String,
    pub config: PathBuf,
}

impl TwoClusters {
    /// Starts the two clusters in `dir` for an application at `app` speaking `protocol`.
    pub fn start(dir: &Path, app: &str, protocol: &str) -> anyhow::Result<Self> {
        let spawn = |name: &str, program: &str, mut args: Vec<String>| -> (Proc, serde_json::Value) {
            let ready = dir.join(format!("{name}.ready"));
            args.extend(["--ready-file".to_string(), ready.display().to_string()]);
            let mut p =
                Proc::spawn(name, &bin(program), &args, &dir.join(format!("{name}.log")), &[("RUST_LOG", "warn")]);
            let v = wait_ready(&mut p, &ready, Duration::from_secs(60));
            (p, v)
        };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
        let a = ControlPlane::start(dir, "a", "127.0.1.1");
        let config = dir.join("trellis-config");
        let ok = |o: std::process::Output, what: &str| -> anyhow::Result<Vec<u8>> {
            anyhow::ensure!(o.status.success(), "{what} failed: {}", String::from_utf8_lossy(&o.stderr));
            Ok(o.stdout)
        };
        ok(trellis(&config, &["config", "import", a.admin_context.to_str().unwrap_or_default()]), "context import")?;
        for (svc, exported) in [("near.default", false), ("far.default", true)] {
            let mut args = vec!["create-service", svc, "--port", "80", "--protocol", protocol];
            if exported {
                args.push("--exported");
            }
            ok(trellis(&config, &args), "create-service")?;
        }
        let join = ok(trellis(&config, &["token", "create", "--ttl", "10m"]), "token create")?;
        std::fs::write(dir.join("join-b.token"), join)?;
        let (b, b_ready) = spawn(
            "cp-b",
            "trellis-cp",
            s(&["--data-dir", &dir.join("cp-b").display().to_string(), "--cluster", "b", "--listen", "127.0.2.1:0"])
                .into_iter()
                .chain(s(&["--join-token-file", &dir.join("join-b.token").display().to_string()]))
                .collect(),
        );
        let b_cp = b_ready["grpc"].as_str().unwrap_or_default().to_string();
        let b_bundle = b_ready["trust_bundle"].as_str().unwrap_or_default().to_string();
        crate::harness::wait_for("B's trust bundle", Duration::from_secs(30), || {
            Path::new(&b_bundle).exists().then_some(())
        });
        // A gateway token is for the cluster of the control plane that creates it.
        let config_b = dir.join("trellis-config-b");
        std::fs::write(&config_b, std::fs::read_to_string(&config)?.replace(&a.grpc, &b_cp))?;
        let gw_token = ok(trellis(&config_b, &["token", "gateway", "create", "--ttl", "2h"]), "gateway token")?;
        std::fs::write(dir.join("gateway-b.token"), gw_token)?;
        let (gateway, gw_ready) = spawn(
            "gateway-b",
            "trellis-gateway",
            s(&["--control-plane", &b_cp, "--trust-bundle", &b_bundle, "--cluster", "b", "--listen", "127.0.2.9:0"])
                .into_iter()
                .chain(s(&["--token-file", &dir.join("gateway-b.token").display().to_string()]))
                .collect(),
        );
        let proxy = |name: &str, cp: &str, bundle: &str, cluster: &str, extra: &[&str]| {
            let token = workload_token(&config, name)?;
            let mut args = s(&["--control-plane", cp, "--trust-bundle", bundle, "--token", &token]);
            args.extend(s(&["--service-account", name, "--cluster", cluster, "--instance", name]));
            args.extend(s(extra));
            anyhow::Ok(spawn(name, "trellis-proxy", args))
        };
        let a_bundle = a.trust_bundle.display().to_string();
        let (near_proxy, _) = proxy(
            "near",
            &a.grpc,
            &a_bundle,
            "a",
            &["--service", "near.default", "--protocol", protocol, "--app", app, "--inbound", "127.0.1.2:0"],
        )?;
        let (far_proxy, _) = proxy(
            "far",
            &b_cp,
            &b_bundle,
            "b",
            &["--service", "far.default", "--protocol", protocol, "--app", app, "--inbound", "127.0.2.2:0"],
        )?;
        let (client_proxy, ready) = proxy(
            "client",
            &a.grpc,
            &a_bundle,
            "a",
            &["--upstream", "near.default=127.0.1.3:0", "--upstream", "far.default=127.0.1.3:0"],
        )?;
        let near = ready["upstreams"]["near.default"].as_str().unwrap_or_default().to_string();
        let far = ready["upstreams"]["far.default"].as_str().unwrap_or_default().to_string();
        let client_admin = ready["admin"].as_str().unwrap_or_default().to_string();
        // Both paths answer before anyone measures them, and the far one goes through the gateway.
        let config_text = || crate::harness::http_get_path(&client_admin, "/config").unwrap_or_default();
        crate::harness::wait_for("both services' endpoints at the client", Duration::from_secs(30), || {
            let c = config_text();
            (c.contains("near.default") && c.contains("far.default") && c.contains("127.0.2.9")).then_some(())
        });
        Ok(Self {
            a,
            b,
            gateway,
            near_proxy,
            far_proxy,
            client_proxy,
            near,
            far,
            client_admin,
            gateway_admin: gw_ready["admin"].as_str().unwrap_or_default().to_string(),
            config,
        })
    }
}
