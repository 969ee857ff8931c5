//! Test helpers: a throwaway PKI, a fake control plane (Certificates + Discovery over real mTLS),
//! small applications (HTTP echo, TCP echo) and a proxy builder. Everything binds 127.0.0.1:0 and
//! is stopped by its owner (or aborted on drop).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use trellis_proto::pb::certificates_server::{Certificates, CertificatesServer};
use trellis_proto::pb::discovery_request::Kind;
use trellis_proto::pb::discovery_server::{Discovery, DiscoveryServer};
use trellis_proto::pb::{self, DiscoveryRequest, DiscoveryResponse, SignRequest, SignResponse};
use trellis_proto::tls::{Identity, IdentityStore, server_config};
use trellis_proto::verify::SharedBundle;
use trellis_proto::{IdMatcher, SpiffeId, TrustBundle, grpc};
use trellis_proxy::{App, AppError, Config};

pub const TD: &str = "trellis.local";
pub const GOOD_TOKEN: &str = "wt_good-token-for-tests";

/// Logs to the test output when RUST_LOG is set.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

/// Polls `cond` until it holds or `timeout` passes.
pub async fn wait_until<F: FnMut() -> bool>(timeout: Duration, what: &str, mut cond: F) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// A root and an intermediate CA, P-256, made with rcgen.
pub struct Pki {
    pub root_pem: String,
    pub intermediate_pem: String,
    intermediate: Issuer<'static, KeyPair>,
}

impl Pki {
    pub fn new() -> anyhow::Result<Arc<Self>> {
        let ca_params = |cn: &str, path_len: Option<u8>| {
            let mut p = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, cn);
            p.distinguished_name = dn;
            p.is_ca = match path_len {
                Some(n) => IsCa::Ca(BasicConstraints::Constrained(n)),
                None => IsCa::Ca(BasicConstraints::Unconstrained),
            };
            p.key_usages =
                vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
            p.not_before = now() - time::Duration::days(1);
            p.not_after = now() + time::Duration::days(365);
            p
        };
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let root_params = ca_params("Trellis Test Root", None);
        let root_cert = root_params.self_signed(&root_key)?;
        let root = Issuer::new(root_params, root_key);
        let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let int_params = ca_params("Trellis Test Intermediate local", Some(0));
        let int_cert = int_params.signed_by(&int_key, &root)?;
        Ok(Arc::new(Self {
            root_pem: root_cert.pem(),
            intermediate_pem: int_cert.pem(),
            intermediate: Issuer::new(int_params, int_key),
        }))
    }

    pub fn bundle(&self) -> anyhow::Result<TrustBundle> {
        Ok(TrustBundle::from_pem(TD, std::slice::from_ref(&self.root_pem))?)
    }

    fn leaf_params(params: &mut CertificateParams, ttl: Duration) {
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = now() - time::Duration::seconds(1);
        params.not_after = now() + time::Duration::try_from(ttl).unwrap_or(time::Duration::hours(24));
    }

    /// A leaf for `id` with a fresh key: (chain PEM, key PEM).
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        Self::leaf_params(&mut params, ttl);
        let cert = params.signed_by(&key, &self.intermediate)?;
        Ok((format!("{}{}", cert.pem(), self.intermediate_pem), key.serialize_pem()))
    }

    /// Signs a CSR that must carry exactly `id`.
    pub fn sign_csr(&self, csr_pem: &str, id: &SpiffeId, ttl: Duration) -> Result<String, String> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| e.to_string())?;
        let sans: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| match s {
                SanType::URI(u) => u.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if sans != vec![id.to_string()] {
            return Err(format!("CSR SANs {sans:?} are not exactly {id}"));
        }
        Self::leaf_params(&mut csr.params, ttl);
        csr.signed_by(&self.intermediate).map(|c| c.pem()).map_err(|e| e.to_string())
    }
}

/// What the fake control plane saw.
#[derive(Default)]
pub struct Seen {
    pub signs: Vec<(String, bool)>,
    pub hellos: Vec<pb::Hello>,
    pub acks: Vec<(String, u64)>,
    pub nacks: Vec<(String, u64, String)>,
    pub deregistered: Vec<String>,
}

struct CpState {
    pki: Arc<Pki>,
    version: Mutex<u64>,
    endpoints: Mutex<BTreeMap<String, pb::Endpoint>>,
    services: Mutex<BTreeMap<String, pb::Service>>,
    seen: Mutex<Seen>,
    changed: watch::Sender<u64>,
    kill: watch::Sender<bool>,
    streams: AtomicUsize,
    ignore_deregister: AtomicBool,
}

impl CpState {
    fn snapshot(&self) -> DiscoveryResponse {
        let version = *self.version.lock().unwrap();
        DiscoveryResponse {
            version,
            full: true,
            services: self.services.lock().unwrap().values().cloned().collect(),
            removed_services: vec![],
            endpoints: self.endpoints.lock().unwrap().values().cloned().collect(),
            removed_endpoints: vec![],
            trust_bundle: Some(pb::TrustBundle { trust_domain: TD.into(), roots_pem: vec![self.pki.root_pem.clone()] }),
            region: String::new(),
            // The fake control plane sends every endpoint (a proxy's scoped view is tested
            // against the real control plane in the tests crate).
            scoped: false,
            subscribed: vec![],
            provisional: false,
        }
    }

    fn bump(&self) {
        let v = {
            let mut v = self.version.lock().unwrap();
            *v += 1;
            *v
        };
        self.changed.send_replace(v);
    }
}

struct FakeCertificates(Arc<CpState>);

#[tonic::async_trait]
impl Certificates for FakeCertificates {
    async fn sign(&self, req: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let peer = grpc::peer_identity(&req);
        let r = req.into_inner();
        let id = SpiffeId::workload(TD, &r.namespace, &r.service_account)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let renewal = r.workload_token.is_empty();
        self.0.seen.lock().unwrap().signs.push((id.to_string(), renewal));
        if renewal {
            if peer.as_ref() != Some(&id) {
                return Err(Status::unauthenticated(format!(
                    "no workload token and no client certificate of {id}; pass a workload token"
                )));
            }
        } else if r.workload_token != GOOD_TOKEN {
            return Err(Status::unauthenticated("workload token wt_bad is unknown or revoked"));
        }
        let ttl =
            if r.ttl_seconds == 0 { Duration::from_secs(86_400) } else { Duration::from_secs(r.ttl_seconds.into()) };
        let cert = self.0.pki.sign_csr(&r.csr_pem, &id, ttl).map_err(Status::invalid_argument)?;
        Ok(Response::new(SignResponse {
            certificate_pem: cert,
            chain_pem: vec![self.0.pki.intermediate_pem.clone()],
            trust_bundle: Some(pb::TrustBundle {
                trust_domain: TD.into(),
                roots_pem: vec![self.0.pki.root_pem.clone()],
            }),
        }))
    }
}

struct FakeDiscovery(Arc<CpState>);

#[tonic::async_trait]
impl Discovery for FakeDiscovery {
    type StreamStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn stream(&self, req: Request<Streaming<DiscoveryRequest>>) -> Result<Response<Self::StreamStream>, Status> {
        let peer = grpc::peer_identity(&req).ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await? {
            Some(DiscoveryRequest { kind: Some(Kind::Hello(h)) }) => h,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        let node = hello.node.clone().unwrap_or_default();
        if node.identity != peer.to_string() {
            return Err(Status::permission_denied(format!(
                "Hello says {} but the certificate is {peer}",
                node.identity
            )));
        }
        let state = self.0.clone();
        let mut ids = Vec::new();
        for reg in &hello.endpoints {
            let (name, ns) = reg.service.split_once('.').unwrap_or((&reg.service, "default"));
            let id = format!("{}/{ns}/{name}/{}", node.cluster, node.instance);
            state.endpoints.lock().unwrap().insert(
                id.clone(),
                pb::Endpoint {
                    id: id.clone(),
                    service: reg.service.clone(),
                    cluster: node.cluster.clone(),
                    zone: node.zone.clone(),
                    address: reg.address.clone(),
                    identity: node.identity.clone(),
                    healthy: reg.ready,
                    weight: reg.weight,
                    revision: 1,
                    region: String::new(),
                    gateways: Vec::new(),
                    via_gateways: false,
                },
            );
            state.services.lock().unwrap().insert(
                reg.service.clone(),
                pb::Service {
                    name: name.into(),
                    namespace: ns.into(),
                    ports: vec![],
                    protocol: reg.protocol.clone(),
                    exported: false,
                    revision: 1,
                    vip: String::new(),
                },
            );
            ids.push(id);
        }
        state.seen.lock().unwrap().hellos.push(hello);
        state.bump();
        let (tx, rx) = mpsc::channel(16);
        state.streams.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let mut changed = state.changed.subscribe();
            changed.mark_changed();
            let mut kill = state.kill.subscribe();
            loop {
                tokio::select! {
                    r = changed.changed() => {
                        if r.is_err() || tx.send(Ok(state.snapshot())).await.is_err() {
                            break;
                        }
                    }
                    msg = inbound.message() => match msg {
                        Ok(Some(DiscoveryRequest { kind: Some(Kind::Ack(a)) })) => {
                            state.seen.lock().unwrap().acks.push((node.instance.clone(), a.version));
                        }
                        Ok(Some(DiscoveryRequest { kind: Some(Kind::Nack(n)) })) => {
                            state.seen.lock().unwrap().nacks.push((node.instance.clone(), n.version, n.reason));
                        }
                        Ok(Some(DiscoveryRequest { kind: Some(Kind::Deregister(_)) })) => {
                            state.seen.lock().unwrap().deregistered.push(node.instance.clone());
                            if !state.ignore_deregister.load(Ordering::SeqCst) {
                                let mut eps = state.endpoints.lock().unwrap();
                                for id in &ids {
                                    eps.remove(id);
                                }
                                drop(eps);
                                state.bump();
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    },
                    _ = async { let _ = kill.wait_for(|k| *k).await; } => {
                        let _ = tx.send(Err(Status::unavailable("control plane stopping"))).await;
                        break;
                    }
                }
            }
            state.streams.fetch_sub(1, Ordering::SeqCst);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A fake control plane: signs CSRs for [`GOOD_TOKEN`] (or a matching client certificate) and
/// pushes full snapshots of the endpoints proxies registered in their Hello.
pub struct FakeCp {
    pub addr: SocketAddr,
    state: Arc<CpState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl FakeCp {
    pub async fn start(pki: Arc<Pki>) -> anyhow::Result<Self> {
        let id = SpiffeId::control_plane(TD, "local", "cp-1")?;
        let (chain, key) = pki.issue(&id, Duration::from_secs(3600))?;
        let store = IdentityStore::new(Identity::from_pem(&chain, &key)?);
        let cfg = server_config(store, SharedBundle::new(pki.bundle()?), IdMatcher::AnyInTrustDomain, false, &[b"h2"])?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(CpState {
            pki,
            version: Mutex::new(0),
            endpoints: Mutex::new(BTreeMap::new()),
            services: Mutex::new(BTreeMap::new()),
            seen: Mutex::new(Seen::default()),
            changed: watch::channel(0).0,
            kill: watch::channel(false).0,
            streams: AtomicUsize::new(0),
            ignore_deregister: AtomicBool::new(false),
        });
        let incoming = grpc::tls_incoming(listener, tokio_rustls::TlsAcceptor::from(cfg));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .add_service(CertificatesServer::new(FakeCertificates(state.clone())))
            .add_service(DiscoveryServer::new(FakeDiscovery(state.clone())));
        let task = tokio::spawn(async move {
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                })
                .await
            {
                tracing::warn!(error = %e, "fake control plane ended");
            }
        });
        Ok(Self { addr, state, stop: Some(stop_tx), task: Some(task) })
    }

    pub fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.state.seen.lock().unwrap())
    }

    pub fn active_streams(&self) -> usize {
        self.state.streams.load(Ordering::SeqCst)
    }

    pub fn ignore_deregister(&self) {
        self.state.ignore_deregister.store(true, Ordering::SeqCst);
    }

    /// Replaces the address of an endpoint (to push a malformed one).
    pub fn push_endpoint(&self, ep: pb::Endpoint) {
        self.state.endpoints.lock().unwrap().insert(ep.id.clone(), ep);
        self.state.bump();
    }

    /// Ends every stream, stops the server and closes the listener.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.state.kill.send_replace(true);
        wait_until(Duration::from_secs(5), "discovery streams to end", || self.active_streams() == 0).await?;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task).await.context("fake CP did not stop")??;
        }
        Ok(())
    }
}

impl Drop for FakeCp {
    fn drop(&mut self) {
        self.state.kill.send_replace(true);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Aborts a task when dropped.
pub struct TaskGuard(pub JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An HTTP application (HTTP/1.1 and h2c) that reports what it received.
pub struct EchoApp {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub held: Arc<AtomicUsize>,
    release: watch::Sender<bool>,
    _task: TaskGuard,
}

impl EchoApp {
    pub async fn start(name: &'static str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(AtomicUsize::new(0));
        let release = watch::channel(false).0;
        let (h, hd, rel) = (hits.clone(), held.clone(), release.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let (h, hd, rel) = (h.clone(), hd.clone(), rel.clone());
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                        let (h, hd, rel) = (h.clone(), hd.clone(), rel.clone());
                        async move { Ok::<_, Infallible>(echo(name, req, &h, &hd, &rel).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Ok(Self { addr, hits, held, release, _task: TaskGuard(task) })
    }

    /// Lets every held request (path /hold) answer.
    pub fn release(&self) {
        self.release.send_replace(true);
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

type EchoBody = http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>;

async fn echo(
    name: &str,
    req: http::Request<Incoming>,
    hits: &AtomicUsize,
    held: &AtomicUsize,
    release: &watch::Sender<bool>,
) -> http::Response<EchoBody> {
    hits.fetch_add(1, Ordering::SeqCst);
    if req.uri().path() == "/stream" {
        // Echo frames as they come: proves streaming in both directions.
        return http::Response::new(req.into_body().boxed_unsync());
    }
    if req.uri().path() == "/hold" {
        held.fetch_add(1, Ordering::SeqCst);
        let mut rx = release.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }
    let peer = req
        .headers()
        .get_all(trellis_proto::PEER_IDENTITY_HEADER)
        .iter()
        .map(|v| v.to_str().unwrap_or("?").to_string())
        .collect::<Vec<_>>()
        .join(",");
    let host = req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("").to_string();
    let method = req.method().clone();
    let version = req.version();
    let path = req.uri().path().to_string();
    let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let text = format!(
        "peer={peer}\napp={name}\nmethod={method}\nversion={version:?}\nhost={host}\nbody={}\n",
        String::from_utf8_lossy(&body)
    );
    let mut resp = http::Response::new(Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed_unsync());
    if let Some(code) = path.strip_prefix("/status/") {
        *resp.status_mut() = code.parse().unwrap_or(http::StatusCode::OK);
    }
    resp
}

/// A TCP echo server that half-closes after the client does.
pub struct TcpEcho {
    pub addr: SocketAddr,
    _task: TaskGuard,
}

impl TcpEcho {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut tcp, _)) = listener.accept().await {
                conns.spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if tcp.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = tcp.shutdown().await;
                });
            }
        });
        Ok(Self { addr, _task: TaskGuard(task) })
    }
}

/// Writes the trust bundle file and starts proxies against one fake control plane.
pub struct World {
    pub pki: Arc<Pki>,
    pub cp: FakeCp,
    pub dir: tempfile::TempDir,
    pub bundle_path: PathBuf,
}

impl World {
    pub async fn new() -> anyhow::Result<Self> {
        init_logging();
        let pki = Pki::new()?;
        let cp = FakeCp::start(pki.clone()).await?;
        let dir = tempfile::tempdir()?;
        let bundle_path = dir.path().join("bundle.pem");
        std::fs::write(&bundle_path, &pki.root_pem)?;
        Ok(Self { pki, cp, dir, bundle_path })
    }

    pub fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "trellis-proxy".into(),
            "--control-plane".into(),
            self.cp.addr.to_string(),
            "--trust-bundle".into(),
            self.bundle_path.display().to_string(),
            "--startup-timeout".into(),
            "5".into(),
            "--drain-timeout".into(),
            "2".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    pub async fn try_proxy(&self, extra: &[&str]) -> Result<App, AppError> {
        let config = Config::try_parse_from(self.args(extra)).expect("test flags parse");
        trellis_proxy::build(config).await
    }

    /// A proxy serving `service` from `app`.
    pub async fn server(
        &self,
        sa: &str,
        instance: &str,
        service: &str,
        app: SocketAddr,
        protocol: &str,
    ) -> anyhow::Result<App> {
        let app = app.to_string();
        let p = self
            .try_proxy(&[
                "--token",
                GOOD_TOKEN,
                "--service-account",
                sa,
                "--instance",
                instance,
                "--service",
                service,
                "--app",
                &app,
                "--protocol",
                protocol,
            ])
            .await?;
        anyhow::ensure!(p.wait_ready(Duration::from_secs(10)).await, "server proxy {instance} not ready");
        Ok(p)
    }

    /// A pure client proxy with one local port per upstream.
    pub async fn client(&self, sa: &str, upstreams: &[&str], extra: &[&str]) -> anyhow::Result<App> {
        let mut args = vec!["--token", GOOD_TOKEN, "--service-account", sa, "--instance", sa];
        let ups: Vec<String> = upstreams.iter().map(|u| format!("{u}=127.0.0.1:0")).collect();
        for u in &ups {
            args.push("--upstream");
            args.push(u);
        }
        args.extend_from_slice(extra);
        let p = self.try_proxy(&args).await?;
        anyhow::ensure!(p.wait_ready(Duration::from_secs(10)).await, "client proxy {sa} not ready");
        Ok(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Waits until `proxy` knows `n` endpoints of `service`.
pub async fn wait_endpoints(proxy: &App, service: &str, n: usize) -> anyhow::Result<()> {
    let svc = service.parse()?;
    let routes = proxy.routes();
    wait_until(Duration::from_secs(10), &format!("{n} endpoints of {service}"), || {
        routes.borrow().endpoints_of(&svc).len() == n
    })
    .await
}

/// A plain HTTP/1.1 client.
pub fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// Sends one request; returns (status, body).
pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::from(body.to_string())))?;
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req)).await??;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Reads a metric value (sum over label sets containing every `labels` fragment).
pub async fn metric(admin: SocketAddr, name: &str, labels: &[&str]) -> anyhow::Result<f64> {
    let client = http_client();
    let (status, text) = send(&client, "GET", &format!("http://{admin}/metrics"), &[], "").await?;
    anyhow::ensure!(status == 200, "metrics answered {status}");
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && (l.len() == name.len() || matches!(l.as_bytes()[name.len()], b'{' | b' ')))
        .filter(|l| labels.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum())
}

pub fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}
