//! Assembly of a control-plane instance: store, bootstrap, gRPC services over mTLS, metrics,
//! background tasks; returns a handle with the addresses actually bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use trellis_proto::pb;
use trellis_proto::tls::{IdentityStore, server_config};
use trellis_proto::verify::{IdMatcher, SharedBundle, TrustBundle};

use crate::admin::AdminService;
use crate::bootstrap::{self, BootstrapError};
use crate::certs::{CertificateService, FailureLimiter, Signer};
use crate::config::{ConfigError, CpConfig, StoreKind};
use crate::discovery::{DiscoveryService, expire_orphans};
use crate::metrics::{self, Metrics};
use crate::proxies::ProxyTracker;
use crate::store::{LocalStore, Store, StoreError};

/// Why an instance cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("bootstrap: {0}")]
    Bootstrap(#[from] BootstrapError),
    #[error("cannot listen on {addr}: {source} (is another instance running? choose another port)")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("trust bundle: {0}")]
    Bundle(#[from] trellis_proto::VerifyError),
    #[error("TLS: {0}")]
    Tls(#[from] trellis_proto::tls::TlsError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A running instance.
pub struct Handle {
    /// Bound address of the gRPC mTLS listener.
    pub grpc_addr: SocketAddr,
    /// Bound address of the metrics listener.
    pub metrics_addr: SocketAddr,
    /// Path of the trust bundle file for proxies.
    pub trust_bundle: PathBuf,
    /// Path of the admin context.
    pub admin_context: PathBuf,
    /// The store, for in-process tests.
    pub store: Arc<dyn Store>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
}

impl Handle {
    /// Waits for SIGTERM or SIGINT, then shuts down gracefully.
    pub async fn wait_termination(self) {
        wait_signal().await;
        tracing::info!("shutting down");
        self.shutdown().await;
    }

    /// Stops accepting, lets streams end for a moment, then stops.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(3), &mut server).await.is_err() {
            server.abort();
        }
        for t in self.tasks {
            t.abort();
        }
    }
}

async fn wait_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Starts an instance.
pub async fn build(cfg: CpConfig) -> Result<Handle, AppError> {
    cfg.validate()?;
    tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "starting trellis-cp");
    let store = open_store(&cfg).await?;
    let created = bootstrap::ensure_federation(store.as_ref(), &cfg).await?;
    let state = store.current();
    let signer = Arc::new(Signer::new(&cfg.cluster));
    let identity = IdentityStore::new(bootstrap::serving_identity(&state, &signer, &cfg)?);
    let td = state.trust_domain().unwrap_or(&cfg.trust_domain).to_string();
    let bundle = SharedBundle::new(TrustBundle::from_pem(
        &td,
        &state.roots.iter().map(|r| r.cert_pem.clone()).collect::<Vec<_>>(),
    )?);
    bootstrap::write_trust_bundle(&cfg.data_dir, &state)?;

    let listener = TcpListener::bind(cfg.listen).await.map_err(|source| AppError::Bind { addr: cfg.listen, source })?;
    let grpc_addr = listener.local_addr()?;
    let metrics_listener =
        metrics::bind(cfg.metrics).await.map_err(|source| AppError::Bind { addr: cfg.metrics, source })?;
    let metrics_addr = metrics_listener.local_addr()?;
    let advertise = cfg.advertise.clone().unwrap_or_else(|| grpc_addr.to_string());
    let admin_context = bootstrap::write_admin_context(&cfg.data_dir, &state, &signer, &cfg, &advertise, created)?;
    if created {
        tracing::info!(path = %admin_context.display(), "admin credential written; import it with `trellis config import`");
    }

    let metrics = Metrics::new();
    let proxies = Arc::new(ProxyTracker::default());
    let tls = server_config(identity.clone(), bundle.clone(), IdMatcher::AnyInTrustDomain, false, &[b"h2"])?;
    let incoming = trellis_proto::grpc::tls_incoming(listener, TlsAcceptor::from(tls));
    let discovery = DiscoveryService {
        store: store.clone(),
        proxies: proxies.clone(),
        cluster: cfg.cluster.clone(),
        metrics: metrics.clone(),
    };
    let certs = CertificateService {
        store: store.clone(),
        signer: signer.clone(),
        limiter: FailureLimiter::default(),
        metrics: metrics.clone(),
    };
    let admin = AdminService {
        store: store.clone(),
        proxies: proxies.clone(),
        cluster: cfg.cluster.clone(),
        node: cfg.node.clone(),
    };
    let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
    let server = tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(15)))
            .add_service(pb::discovery_server::DiscoveryServer::new(discovery))
            .add_service(pb::certificates_server::CertificatesServer::new(certs))
            .add_service(pb::admin_server::AdminServer::new(admin))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = shutdown_rx.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });

    let mut tasks = vec![
        tokio::spawn(metrics::serve(metrics_listener, metrics.clone())),
        tokio::spawn(expire_orphans(store.clone(), proxies.clone(), cfg.cluster.clone(), cfg.endpoint_grace())),
        tokio::spawn(follow_state(store.clone(), bundle, metrics.clone(), cfg.data_dir.clone(), td)),
        tokio::spawn(renew_serving_identity(store.clone(), signer, identity, cfg.clone())),
    ];
    if let Some(expiry) = crate::certs::ca_not_after(&state, &cfg.cluster) {
        metrics.ca_expiry.set(expiry.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() as i64);
    }
    metrics.ready.store(true, Ordering::Relaxed);
    if let Some(path) = &cfg.ready_file {
        let ready = serde_json::json!({
            "grpc": grpc_addr.to_string(),
            "metrics": metrics_addr.to_string(),
            "trust_bundle": bootstrap::trust_bundle_path(&cfg.data_dir),
            "admin_context": admin_context,
            "cluster": cfg.cluster,
            "trust_domain": store.current().trust_domain().unwrap_or_default(),
        });
        crate::context::write_private(path, ready.to_string().as_bytes())?;
    }
    tasks.shrink_to_fit();
    tracing::info!(grpc = %grpc_addr, metrics = %metrics_addr, cluster = %cfg.cluster, "trellis-cp serving");
    Ok(Handle {
        grpc_addr,
        metrics_addr,
        trust_bundle: bootstrap::trust_bundle_path(&cfg.data_dir),
        admin_context,
        store,
        shutdown: shutdown_tx,
        server,
        tasks,
    })
}

/// Opens the store the configuration names.
async fn open_store(cfg: &CpConfig) -> Result<Arc<dyn Store>, AppError> {
    match cfg.store {
        StoreKind::Local => Ok(Arc::new(LocalStore::open(&cfg.data_dir.join("store"))?)),
        #[cfg(feature = "etcd")]
        StoreKind::Etcd => {
            // The data directory still holds the trust bundle and the admin context; the local
            // store creates it, etcd does not.
            std::fs::create_dir_all(&cfg.data_dir)?;
            Ok(Arc::new(crate::store::EtcdStore::connect(&cfg.etcd_endpoints, &cfg.etcd_prefix).await?))
        }
        // `validate` refuses this first; kept so that the message is the same whatever calls here.
        #[cfg(not(feature = "etcd"))]
        StoreKind::Etcd => {
            Err(ConfigError::Invalid { flag: "store", reason: crate::config::NO_ETCD_FEATURE.into() }.into())
        }
    }
}

/// Keeps the trust bundle (TLS and file) and the revision gauge in step with the store.
async fn follow_state(
    store: Arc<dyn Store>,
    bundle: SharedBundle,
    metrics: Arc<Metrics>,
    data_dir: PathBuf,
    td: String,
) {
    let mut rx = store.subscribe();
    let mut roots: Vec<String> = Vec::new();
    loop {
        let state = rx.borrow_and_update().clone();
        metrics.revision.set(state.revision as i64);
        let now: Vec<String> = state.roots.iter().map(|r| r.cert_pem.clone()).collect();
        if now != roots && !now.is_empty() {
            match TrustBundle::from_pem(&td, &now) {
                Ok(b) => {
                    bundle.store(b);
                    if let Err(e) = bootstrap::write_trust_bundle(&data_dir, &state) {
                        tracing::warn!(error = %e, "cannot write the trust bundle file");
                    }
                    roots = now;
                }
                Err(e) => tracing::error!(error = %e, "the stored trust bundle is invalid; keeping the previous one"),
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Renews this instance's serving certificate at half-life.
async fn renew_serving_identity(
    store: Arc<dyn Store>,
    signer: Arc<Signer>,
    identity: Arc<IdentityStore>,
    cfg: CpConfig,
) {
    loop {
        let at = identity.current().map(|i| i.renew_at()).unwrap_or_else(SystemTime::now);
        let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::time::sleep(wait.max(Duration::from_secs(1))).await;
        match bootstrap::serving_identity(&store.current(), &signer, &cfg) {
            Ok(id) => {
                tracing::info!(not_after = ?id.not_after, "serving certificate renewed");
                identity.replace(id);
            }
            Err(e) => {
                tracing::warn!(error = %e, "serving certificate renewal failed; retrying in 10 s");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
    }
}
